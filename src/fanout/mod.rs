//! [`FanOut`]: publishes each event to several named destinations at
//! once, or only to those subscribed to its kind.
//!
//! One event often has several consumers: billing wants `invoice.paid`,
//! the CRM every `customer.*`, an audit log everything. A `FanOut` is one
//! sink over those destinations. Each event goes to the destinations that
//! take its kind (every kind, exact kinds, or `prefix.*` patterns; see
//! [`KindPattern`]), all called concurrently on the caller's task; the
//! publish answers `Ok` once all of them took it, or a [`FanOutError`]
//! naming each destination that failed and why. An event no destination
//! takes is dropped, rejected, or sent to a destination for unmatched
//! events, as configured.
//!
//! ```
//! use eventsink::fanout::FanOut;
//! use eventsink::{Event, RecordingSink, SinkExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! let (billing, crm, audit) = (RecordingSink::new(), RecordingSink::new(), RecordingSink::new());
//! let mut events = FanOut::builder()
//!     .to_kinds("billing", ["invoice.paid", "order.*"], billing.clone())
//!     .to_kinds("crm", ["customer.*"], crm.clone())
//!     .unmatched_to("audit", audit.clone())   // what nobody else takes
//!     .build()?;                               // checks names and patterns
//!
//! events.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
//! events.publish(Event::new("user.signed_up", serde_json::json!({"user_id": 1}))).await?;
//! assert_eq!((billing.events().len(), crm.events().len(), audit.events().len()), (1, 0, 1));
//! # Ok(()) }
//! ```
//!
//! Destinations of different types are boxed into one type with
//! [`SinkExt::boxed_sink`](crate::SinkExt::boxed_sink) (a webhook and a
//! file sink, say: `FanOut<BoxSink>`).
//!
//! # Failures and retries
//!
//! A failed destination does not stop the others: the event reaches every
//! destination that can take it, and the error lists the failed ones
//! ([`FanOutError::failed`]) and those that took it
//! ([`FanOutError::succeeded`]). It is
//! [`Retryable`](crate::Retryable) when every failure is. Retrying the
//! publish sends the event to *every* destination again, so wrap each
//! destination in its own retry (a `RetryPolicy` layer) when destinations
//! must not be sent twice, or put each behind its own queue:
//! `QueuedFanOut` (feature `queue`) gives each destination a queue of its
//! own, and a publish retried with the same event id stores nothing twice.
//!
//! # Readiness
//!
//! `poll_ready` is `Ready` once every destination is ready, so the slowest
//! destination sets the pace of all, as tower's `Steer` does. A
//! destination whose `poll_ready` fails is not called again until an event
//! is routed to it; that event reports the failure for it (the others still
//! get the event), and the next `poll_ready` asks it again.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use crate::{BoxError, Event};

mod error;
mod future;
mod kinds;
#[cfg(feature = "queue")]
mod queue;

pub use error::{BuildError, Failure, FanOutError};
pub use future::ResponseFuture;
pub use kinds::{InvalidPattern, KindPattern};
#[cfg(feature = "queue")]
pub use queue::{QueuedFanOut, QueuedFanOutBuilder};

use error::NotReady;
use kinds::Subscription;

/// A sink that publishes each event to the destinations that take its
/// kind, concurrently. Build it with [`FanOut::builder`]; see the
/// [module docs](self).
///
/// Cloning it clones every destination; a clone reserves readiness of its
/// own.
pub struct FanOut<S> {
    routes: Arc<Routes>,
    destinations: Vec<Destination<S>>,
    /// The `poll_ready` errors of the [`Readiness::Broken`] destinations,
    /// by index.
    broken: Vec<(usize, BoxError)>,
}

/// Who takes what: shared by the clones of a fan-out.
#[derive(Debug)]
struct Routes {
    /// The destinations' names, in order; each call's future holds a
    /// clone, to name a failed destination.
    names: Names,
    subscriptions: Box<[Subscription]>,
    unmatched: Unmatched,
}

/// The names of a fan-out's destinations, in the order they were added.
pub(super) type Names = Arc<[Arc<str>]>;

/// What happens to an event no destination takes.
#[derive(Debug, Clone, Copy)]
enum Unmatched {
    Drop,
    Reject,
    /// Sent to the destination at this index.
    To(usize),
}

struct Destination<S> {
    service: S,
    readiness: Readiness,
}

/// Where a destination's `poll_ready` stands. One byte, so that the
/// readiness an event consumes is cheap to read and reset.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Readiness {
    NotReady,
    Ready,
    /// Its `poll_ready` failed (the error is in `FanOut::broken`); the
    /// next event routed to it reports this.
    Broken,
}

/// What a [`FanOut`] did with an event that every destination took.
///
/// ```
/// use eventsink::fanout::FanOut;
/// use eventsink::{Event, NoopSink, SinkExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let mut fanout = FanOut::builder().to_kinds("billing", ["invoice.*"], NoopSink::new()).build()?;
/// let routed = fanout.publish(Event::new("user.signed_up", ())).await?;
/// assert!(routed.is_dropped()); // no destination takes it
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Routed {
    destinations: usize,
}

impl Routed {
    /// How many destinations took the event.
    ///
    /// ```
    /// # use eventsink::{fanout::FanOut, Event, NoopSink, SinkExt};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// let mut fanout = FanOut::builder().to("a", NoopSink::new()).to("b", NoopSink::new()).build()?;
    /// assert_eq!(fanout.publish(Event::new("ping", ())).await?.destinations(), 2);
    /// # Ok(()) }
    /// ```
    pub fn destinations(self) -> usize {
        self.destinations
    }

    /// Whether no destination took the event and it was dropped (the
    /// default for unmatched events).
    ///
    /// ```
    /// # use eventsink::{fanout::FanOut, Event, NoopSink, SinkExt};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// let mut fanout = FanOut::builder().to("a", NoopSink::new()).build()?;
    /// assert!(!fanout.publish(Event::new("ping", ())).await?.is_dropped());
    /// # Ok(()) }
    /// ```
    pub fn is_dropped(self) -> bool {
        self.destinations == 0
    }
}

impl<S> FanOut<S> {
    /// A builder with no destination, dropping unmatched events.
    ///
    /// ```
    /// let builder = eventsink::fanout::FanOut::<eventsink::NoopSink>::builder();
    /// # let _ = builder;
    /// ```
    pub fn builder() -> FanOutBuilder<S> {
        FanOutBuilder {
            destinations: Vec::new(),
            unmatched: UnmatchedChoice::Drop,
        }
    }

    /// The destinations' names, in the order they were added (the one for
    /// unmatched events last).
    ///
    /// ```
    /// # use eventsink::{fanout::FanOut, NoopSink};
    /// let fanout = FanOut::builder()
    ///     .to_kinds("a", ["invoice.*"], NoopSink::new())
    ///     .unmatched_to("b", NoopSink::new())
    ///     .build()?;
    /// assert_eq!(fanout.destinations().collect::<Vec<_>>(), ["a", "b"]);
    /// # Ok::<(), eventsink::fanout::BuildError>(())
    /// ```
    pub fn destinations(&self) -> impl Iterator<Item = &str> {
        self.routes.names.iter().map(|name| &**name)
    }

    /// The names of the destinations an event of `kind` goes to: empty
    /// when it is dropped or rejected.
    ///
    /// ```
    /// # use eventsink::{fanout::FanOut, NoopSink};
    /// let fanout = FanOut::builder()
    ///     .to_kinds("billing", ["invoice.*"], NoopSink::new())
    ///     .to("audit", NoopSink::new())
    ///     .build()?;
    /// assert_eq!(fanout.routes_for("invoice.paid"), ["billing", "audit"]);
    /// assert_eq!(fanout.routes_for("user.signed_up"), ["audit"]);
    /// # Ok::<(), eventsink::fanout::BuildError>(())
    /// ```
    pub fn routes_for(&self, kind: &str) -> Vec<&str> {
        let routes = &self.routes;
        let taken: Vec<&str> = (0..routes.names.len())
            .filter(|&i| routes.subscriptions[i].takes(kind))
            .map(|i| &*routes.names[i])
            .collect();
        match routes.unmatched {
            Unmatched::To(i) if taken.is_empty() => vec![&*routes.names[i]],
            _ => taken,
        }
    }

    /// The destination named `name`.
    ///
    /// ```
    /// # use eventsink::{fanout::FanOut, RecordingSink};
    /// let fanout = FanOut::builder().to("a", RecordingSink::<()>::new()).build()?;
    /// assert!(fanout.get("a").is_some());
    /// # Ok::<(), eventsink::fanout::BuildError>(())
    /// ```
    pub fn get(&self, name: &str) -> Option<&S> {
        let i = self.routes.names.iter().position(|n| **n == *name)?;
        Some(&self.destinations[i].service)
    }

    /// Where an event of `kind` goes.
    fn route(&self, kind: &str) -> Route {
        let routes = &self.routes;
        if let Some(last) = routes.subscriptions.iter().rposition(|s| s.takes(kind)) {
            return Route::UpTo(last);
        }
        match routes.unmatched {
            Unmatched::To(i) => Route::UpTo(i),
            Unmatched::Drop => Route::Drop,
            Unmatched::Reject => Route::Reject,
        }
    }
}

/// Where one event goes.
enum Route {
    /// To the destinations before this index that take it, and to this one.
    UpTo(usize),
    Drop,
    Reject,
}

/// Calls one destination with `event` if it is ready, or records why not
/// (its error from `broken`).
#[inline(always)]
fn send<S, P>(
    destination: &mut Destination<S>,
    index: usize,
    event: Event<P>,
    future: &mut ResponseFuture<S::Future>,
    broken: &mut Vec<(usize, BoxError)>,
) where
    S: Service<Event<P>>,
{
    match std::mem::replace(&mut destination.readiness, Readiness::NotReady) {
        Readiness::Ready => future.push(index, destination.service.call(event)),
        Readiness::Broken => {
            let error = match broken.iter().position(|(i, _)| *i == index) {
                Some(at) => broken.swap_remove(at).1,
                None => Box::new(NotReady),
            };
            future.fail(index, error);
        }
        Readiness::NotReady => future.fail(index, Box::new(NotReady)),
    }
}

impl<S, P> Service<Event<P>> for FanOut<S>
where
    S: Service<Event<P>>,
    S::Error: Into<BoxError>,
{
    /// How many destinations took the event.
    type Response = Routed;
    /// The destinations that failed, or that none takes the event.
    type Error = FanOutError;
    type Future = ResponseFuture<S::Future>;

    /// `Ready` once every destination is; never an error (a destination's
    /// readiness error is reported by the next event routed to it).
    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut pending = false;
        for (i, destination) in self.destinations.iter_mut().enumerate() {
            if destination.readiness == Readiness::NotReady {
                match destination.service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => destination.readiness = Readiness::Ready,
                    Poll::Ready(Err(e)) => {
                        destination.readiness = Readiness::Broken;
                        self.broken.push((i, e.into()));
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    #[inline]
    fn call(&mut self, event: Event<P>) -> Self::Future {
        let last = match self.route(&event.kind) {
            Route::UpTo(last) => last,
            Route::Drop => {
                tracing::debug!(kind = %event.kind, "no destination takes this kind; dropped");
                return ResponseFuture::new(Arc::clone(&self.routes.names));
            }
            Route::Reject => {
                let kind = Arc::clone(&event.kind);
                return ResponseFuture::unrouted(Arc::clone(&self.routes.names), kind);
            }
        };
        let routes = &self.routes;
        let broken = &mut self.broken;
        let mut future = ResponseFuture::new(Arc::clone(&routes.names));
        for (i, destination) in self.destinations[..last].iter_mut().enumerate() {
            if routes.subscriptions[i].takes(&event.kind) {
                // A clone costs three reference counts; the last
                // destination gets the caller's event itself.
                send(destination, i, event.clone(), &mut future, broken);
            }
        }
        let last_one = &mut self.destinations[last];
        send(last_one, last, event, &mut future, broken);
        future
    }
}

impl<S: Clone> Clone for FanOut<S> {
    fn clone(&self) -> Self {
        FanOut {
            routes: Arc::clone(&self.routes),
            destinations: self
                .destinations
                .iter()
                .map(|d| Destination {
                    service: d.service.clone(),
                    // A clone reserves its own readiness.
                    readiness: Readiness::NotReady,
                })
                .collect(),
            broken: Vec::new(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for FanOut<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (i, destination) in self.destinations.iter().enumerate() {
            map.entry(&self.routes.names[i], &destination.service);
        }
        map.finish()
    }
}

/// Destinations and the treatment of unmatched events, checked by
/// [`build`](FanOutBuilder::build). From [`FanOut::builder`].
///
/// Destination names are configuration: every clone of the fan-out and
/// every publish share one list of them (a reference count, no copy).
///
/// ```
/// use eventsink::fanout::FanOut;
/// use eventsink::{BoxSink, FsSink, NoopSink, SinkExt};
///
/// # fn main() -> Result<(), eventsink::BoxError> {
/// # let tmp = tempfile::tempdir()?;
/// let fanout: FanOut<BoxSink> = FanOut::builder()
///     .to("archive", FsSink::new(tmp.path())?.boxed_sink())        // every event
///     .to_kinds("billing", ["invoice.paid"], NoopSink::new().boxed_sink())
///     .reject_unmatched()
///     .build()?;
/// # let _ = fanout;
/// # Ok(()) }
/// ```
#[must_use]
pub struct FanOutBuilder<S> {
    destinations: Vec<Added<S>>,
    unmatched: UnmatchedChoice<S>,
}

/// A destination as given to the builder.
struct Added<S> {
    name: Arc<str>,
    kinds: Option<Result<Vec<KindPattern>, InvalidPattern>>,
    sink: S,
}

enum UnmatchedChoice<S> {
    Drop,
    Reject,
    To(Arc<str>, S),
}

impl<S> FanOutBuilder<S> {
    /// Adds the destination `name`, which takes every event.
    ///
    /// ```
    /// let b = eventsink::fanout::FanOut::builder().to("audit", eventsink::NoopSink::new());
    /// # let _ = b;
    /// ```
    pub fn to(mut self, name: impl Into<Arc<str>>, sink: S) -> Self {
        self.destinations.push(Added {
            name: name.into(),
            kinds: None,
            sink,
        });
        self
    }

    /// Adds the destination `name`, which takes the events whose kind one
    /// of `patterns` takes: exact kinds (`invoice.paid`) or prefixes
    /// (`order.*`, see [`KindPattern`]). The patterns are checked by
    /// [`build`](FanOutBuilder::build).
    ///
    /// ```
    /// let b = eventsink::fanout::FanOut::builder()
    ///     .to_kinds("billing", ["invoice.paid", "order.*"], eventsink::NoopSink::new());
    /// # let _ = b;
    /// ```
    pub fn to_kinds<I>(mut self, name: impl Into<Arc<str>>, patterns: I, sink: S) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let kinds = patterns
            .into_iter()
            .map(|p| KindPattern::new(p.as_ref()))
            .collect();
        self.destinations.push(Added {
            name: name.into(),
            kinds: Some(kinds),
            sink,
        });
        self
    }

    /// Drops events that no destination takes: the publish answers `Ok`
    /// with [`Routed::is_dropped`]. The default.
    ///
    /// ```
    /// let b = eventsink::fanout::FanOut::<eventsink::NoopSink>::builder().drop_unmatched();
    /// # let _ = b;
    /// ```
    pub fn drop_unmatched(mut self) -> Self {
        self.unmatched = UnmatchedChoice::Drop;
        self
    }

    /// Rejects events that no destination takes with
    /// [`FanOutError::Unrouted`] (permanent).
    ///
    /// ```
    /// let b = eventsink::fanout::FanOut::<eventsink::NoopSink>::builder().reject_unmatched();
    /// # let _ = b;
    /// ```
    pub fn reject_unmatched(mut self) -> Self {
        self.unmatched = UnmatchedChoice::Reject;
        self
    }

    /// Sends events that no other destination takes to the destination
    /// `name`.
    ///
    /// ```
    /// let b = eventsink::fanout::FanOut::builder().unmatched_to("dead-end", eventsink::NoopSink::new());
    /// # let _ = b;
    /// ```
    pub fn unmatched_to(mut self, name: impl Into<Arc<str>>, sink: S) -> Self {
        self.unmatched = UnmatchedChoice::To(name.into(), sink);
        self
    }

    /// Checks the configuration and builds the fan-out.
    ///
    /// # Errors
    ///
    /// [`BuildError`]: an invalid kind pattern, an empty or repeated
    /// destination name, a destination subscribed to no kind, or a
    /// destination for unmatched events that another destination, taking
    /// every kind, leaves nothing.
    ///
    /// ```
    /// use eventsink::fanout::{BuildError, FanOut};
    /// use eventsink::NoopSink;
    ///
    /// let err = FanOut::builder().to("a", NoopSink::new()).to("a", NoopSink::new()).build().unwrap_err();
    /// assert!(matches!(err, BuildError::DuplicateName { .. }));
    /// ```
    pub fn build(self) -> Result<FanOut<S>, BuildError> {
        let mut names: Vec<Arc<str>> = Vec::with_capacity(self.destinations.len() + 1);
        let mut subscriptions = Vec::with_capacity(names.capacity());
        let mut services = Vec::with_capacity(names.capacity());
        for added in self.destinations {
            let subscription = subscription(&added)?;
            check_name(&names, &added.name)?;
            names.push(added.name);
            subscriptions.push(subscription);
            services.push(added.sink);
        }
        let unmatched = match self.unmatched {
            UnmatchedChoice::Drop => Unmatched::Drop,
            UnmatchedChoice::Reject => Unmatched::Reject,
            UnmatchedChoice::To(name, sink) => {
                check_name(&names, &name)?;
                if let Some(i) = subscriptions
                    .iter()
                    .position(|s| matches!(s, Subscription::All))
                {
                    return Err(BuildError::UnreachableFallback {
                        fallback: name,
                        takes_all: Arc::clone(&names[i]),
                    });
                }
                names.push(name);
                subscriptions.push(Subscription::Unmatched);
                services.push(sink);
                Unmatched::To(names.len() - 1)
            }
        };
        Ok(FanOut {
            routes: Arc::new(Routes {
                names: names.into(),
                subscriptions: subscriptions.into(),
                unmatched,
            }),
            destinations: services
                .into_iter()
                .map(|service| Destination {
                    service,
                    readiness: Readiness::NotReady,
                })
                .collect(),
            broken: Vec::new(),
        })
    }
}

/// The subscription of a destination as added, or why it is invalid.
fn subscription<S>(added: &Added<S>) -> Result<Subscription, BuildError> {
    match &added.kinds {
        None => Ok(Subscription::All),
        Some(Err(source)) => Err(BuildError::Pattern {
            destination: Arc::clone(&added.name),
            source: source.clone(),
        }),
        Some(Ok(kinds)) if kinds.is_empty() => Err(BuildError::NoKinds {
            destination: Arc::clone(&added.name),
        }),
        Some(Ok(kinds)) => Ok(Subscription::Kinds(kinds.clone().into())),
    }
}

/// Refuses an empty name, or one already taken.
fn check_name(names: &[Arc<str>], name: &Arc<str>) -> Result<(), BuildError> {
    if name.is_empty() {
        return Err(BuildError::EmptyName);
    }
    if names.contains(name) {
        return Err(BuildError::DuplicateName {
            destination: Arc::clone(name),
        });
    }
    Ok(())
}

impl<S: fmt::Debug> fmt::Debug for FanOutBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanOutBuilder")
            .field(
                "destinations",
                &self
                    .destinations
                    .iter()
                    .map(|d| (&d.name, &d.sink))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}
