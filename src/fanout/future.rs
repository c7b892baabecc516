//! [`ResponseFuture`]: the calls of one event to its destinations, driven
//! together on the caller's task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use super::error::{Failure, FanOutError};
use super::{Names, Routed};
use crate::BoxError;

pin_project! {
    /// The future of [`FanOut`](super::FanOut): waits for every destination
    /// the event was sent to, concurrently, then answers [`Routed`] if all
    /// took it, or [`FanOutError::Failed`] naming those that did not.
    ///
    /// Up to four calls are held inline, so a fan-out to four or fewer
    /// destinations allocates nothing of its own while it succeeds.
    ///
    /// ```
    /// use eventsink::fanout::{FanOut, ResponseFuture};
    /// use eventsink::{Event, NoopSink};
    /// use tower::{Service, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// let mut fanout = FanOut::builder().to("a", NoopSink::new()).build()?;
    /// ServiceExt::<Event<()>>::ready(&mut fanout).await?;
    /// let future: ResponseFuture<_> = fanout.call(Event::new("ping", ()));
    /// assert_eq!(future.await?.destinations(), 1);
    /// # Ok(()) }
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        a: Call<F>,
        #[pin]
        b: Call<F>,
        #[pin]
        c: Call<F>,
        #[pin]
        d: Call<F>,
        // Calls placed so far (inline first).
        placed: usize,
        // Calls not finished yet.
        running: usize,
        names: Names,
        // What only some events need, boxed to keep the future small (it
        // is moved into the caller's future).
        rare: Option<Box<Rare<F>>>,
    }
}

/// The parts of a [`ResponseFuture`] that a fan-out to four destinations
/// or fewer, all succeeding, does not need.
struct Rare<F> {
    /// Calls beyond the fourth.
    more: Vec<Pin<Box<Call<F>>>>,
    failures: Vec<Failure>,
    /// Set when the event was refused for want of a destination.
    unrouted: Option<Arc<str>>,
}

impl<F> Default for Rare<F> {
    fn default() -> Self {
        Rare {
            more: Vec::new(),
            failures: Vec::new(),
            unrouted: None,
        }
    }
}

pin_project! {
    #[project = CallProj]
    enum Call<F> {
        Empty,
        Running { #[pin] future: F, destination: usize },
        Succeeded { destination: usize },
        Failed,
    }
}

impl<F> ResponseFuture<F> {
    /// A future with no call yet; `names` are the fan-out's destinations.
    pub(super) fn new(names: Names) -> Self {
        ResponseFuture {
            a: Call::Empty,
            b: Call::Empty,
            c: Call::Empty,
            d: Call::Empty,
            placed: 0,
            running: 0,
            names,
            rare: None,
        }
    }

    /// A future that answers that no destination takes `kind`.
    pub(super) fn unrouted(names: Names, kind: Arc<str>) -> Self {
        let mut future = ResponseFuture::new(names);
        future.rare_mut().unrouted = Some(kind);
        future
    }

    /// Adds the call to `destination`. Done in `FanOut::call`, before the
    /// future is pinned.
    #[inline(always)]
    pub(super) fn push(&mut self, destination: usize, future: F) {
        let call = Call::Running {
            future,
            destination,
        };
        match self.placed {
            0 => self.a = call,
            1 => self.b = call,
            2 => self.c = call,
            3 => self.d = call,
            _ => self.rare_mut().more.push(Box::pin(call)),
        }
        self.placed += 1;
        self.running += 1;
    }

    /// Records that `destination` could not be called.
    pub(super) fn fail(&mut self, destination: usize, error: BoxError) {
        let failure = Failure::new(&self.names, destination, error);
        self.rare_mut().failures.push(failure);
    }

    fn rare_mut(&mut self) -> &mut Rare<F> {
        self.rare.get_or_insert_with(Box::default)
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Routed, FanOutError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(kind) = this.rare.as_mut().and_then(|r| r.unrouted.take()) {
            return Poll::Ready(Err(FanOutError::Unrouted { kind }));
        }
        let mut done = Finished {
            names: &this.names[..],
            failures: Vec::new(),
            running: this.running,
        };
        for call in [
            this.a.as_mut(),
            this.b.as_mut(),
            this.c.as_mut(),
            this.d.as_mut(),
        ] {
            done.poll(call, cx);
        }
        if let Some(rare) = this.rare.as_deref_mut() {
            for call in rare.more.iter_mut() {
                done.poll(call.as_mut(), cx);
            }
        }
        if !done.failures.is_empty() {
            let failures = done.failures;
            let rare = this.rare.get_or_insert_with(Box::default);
            rare.failures.extend(failures);
        }
        if *this.running > 0 {
            return Poll::Pending;
        }
        let Some(rare) = this.rare.as_deref_mut().filter(|r| !r.failures.is_empty()) else {
            return Poll::Ready(Ok(Routed {
                destinations: *this.placed,
            }));
        };
        let mut failures = std::mem::take(&mut rare.failures);
        failures.sort_by_key(|f| f.index);
        let inline = [&*this.a, &*this.b, &*this.c, &*this.d];
        let succeeded = inline
            .into_iter()
            .chain(rare.more.iter().map(|call| &**call))
            .filter_map(|call| match call {
                Call::Succeeded { destination } => Some(Arc::clone(&this.names[*destination])),
                _ => None,
            })
            .collect();
        Poll::Ready(Err(FanOutError::Failed {
            failures,
            succeeded,
        }))
    }
}

/// What polling the calls updates.
struct Finished<'a> {
    names: &'a [Arc<str>],
    failures: Vec<Failure>,
    running: &'a mut usize,
}

impl Finished<'_> {
    /// Polls one call if it is still running, and records how it ended.
    #[inline]
    fn poll<F, R, E>(&mut self, mut call: Pin<&mut Call<F>>, cx: &mut Context<'_>)
    where
        F: Future<Output = Result<R, E>>,
        E: Into<BoxError>,
    {
        let CallProj::Running {
            future,
            destination,
        } = call.as_mut().project()
        else {
            return;
        };
        let destination = *destination;
        let ended = match future.poll(cx) {
            Poll::Pending => return,
            Poll::Ready(Ok(_)) => Call::Succeeded { destination },
            Poll::Ready(Err(e)) => {
                let failure = Failure::new(self.names, destination, e.into());
                self.failures.push(failure);
                Call::Failed
            }
        };
        call.set(ended);
        *self.running -= 1;
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("calls", &self.placed)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}
