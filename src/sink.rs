//! [`Sink`]: any `tower::Service` that takes an [`Event`];
//! [`SinkExt::publish`] to send one; [`BoxSink`] to store sinks of different
//! types.
//!
//! A sink is a plain tower service, so retry, timeout, buffer, rate and
//! concurrency layers compose around it, and any service you write that
//! takes events is a sink without further ceremony.
//!
//! ```
//! use eventsink::{Event, RecordingSink, SinkExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::Error> {
//! let mut sink = RecordingSink::new();
//! sink.publish(Event::new("user.signed_up", serde_json::json!({"user_id": 1}))).await?;
//! assert_eq!(sink.events().len(), 1);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::{Service, ServiceExt};

use crate::{BoxError, Event};

/// A service that takes [`Event`]s: `tower::Service<Event<P>>`.
///
/// Its `Response` is what the sink tells the caller about the event: `()`
/// for the sinks that deliver (webhook, files, memory, nothing), and
/// [`Published`](crate::queue::Published) for the queue's publisher
/// (stored, or already queued). Code that only cares that the event was
/// taken ignores it.
///
/// This is a trait alias with a blanket implementation; you never implement
/// it yourself. Use it in bounds:
///
/// ```
/// use eventsink::{Event, Sink, SinkExt};
///
/// async fn announce<S: Sink>(sink: &mut S) -> Result<(), S::Error> {
///     sink.publish(Event::new("app.started", serde_json::Value::Null)).await?;
///     Ok(())
/// }
/// # let mut sink = eventsink::NoopSink::new();
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(announce(&mut sink)).unwrap();
/// ```
pub trait Sink<P = serde_json::Value>: Service<Event<P>> {}

impl<S, P> Sink<P> for S where S: Service<Event<P>> + ?Sized {}

/// Methods for every [`Sink`].
pub trait SinkExt<P>: Sink<P> {
    /// Waits until the sink is ready, then publishes `event` and waits for the
    /// sink's answer. Like [`ServiceExt::oneshot`], but the sink is borrowed,
    /// not consumed.
    ///
    /// ```
    /// use eventsink::{Event, NoopSink, SinkExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut sink = NoopSink::new();
    /// sink.publish(Event::new("ping", ())).await.unwrap();
    /// # }
    /// ```
    fn publish(&mut self, event: Event<P>) -> Publish<'_, Self, P>
    where
        Self: Sized,
    {
        Publish {
            state: State::Waiting {
                service: self,
                event: Some(event),
            },
        }
    }

    /// Boxes the sink into a [`BoxSink`], erasing its type; errors become
    /// [`BoxError`]s, the response stays (`()` for a delivering sink,
    /// [`Published`](crate::queue::Published) for the queue's publisher).
    ///
    /// ```
    /// use eventsink::{BoxSink, NoopSink, RecordingSink, SinkExt};
    ///
    /// let sinks: Vec<BoxSink> = vec![NoopSink::new().boxed_sink(), RecordingSink::new().boxed_sink()];
    /// assert_eq!(sinks.len(), 2);
    /// ```
    fn boxed_sink(self) -> BoxSink<P, Self::Response>
    where
        Self: Sized + Clone + Send + Sync + 'static,
        Self::Future: Send + 'static,
        Self::Error: Into<BoxError> + 'static,
        P: 'static,
    {
        tower::util::BoxCloneSyncService::new(self.map_err(Into::into))
    }
}

impl<S, P> SinkExt<P> for S where S: Sink<P> + ?Sized {}

/// A type-erased, cloneable (and `Sync`) sink, for storing sinks of
/// different types together (configuration chooses webhook or file at run
/// time), or a long stack of layers under a short name (axum state). `R`
/// is the response: `()` for the sinks that deliver; a boxed queue
/// publisher is a [`Publisher`](crate::queue::Publisher), a
/// `BoxSink<P, Published>`.
///
/// Build one with [`SinkExt::boxed_sink`].
///
/// ```
/// use eventsink::{BoxSink, Event, FsSink, NoopSink, SinkExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// # let tmp = tempfile::tempdir()?;
/// let write_files = true; // from configuration
/// let mut sink: BoxSink = if write_files {
///     FsSink::new(tmp.path())?.boxed_sink()
/// } else {
///     NoopSink::new().boxed_sink()
/// };
/// sink.publish(Event::new("app.started", serde_json::Value::Null)).await?;
/// # Ok(()) }
/// ```
pub type BoxSink<P = serde_json::Value, R = ()> =
    tower::util::BoxCloneSyncService<Event<P>, R, BoxError>;

pin_project! {
    /// The future of [`SinkExt::publish`]: readiness, then the call.
    ///
    /// ```
    /// use eventsink::{Event, NoopSink, Publish, SinkExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut sink = NoopSink::new();
    /// let publishing: Publish<'_, NoopSink, ()> = sink.publish(Event::new("ping", ()));
    /// publishing.await.unwrap();
    /// # }
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct Publish<'a, S, P>
    where
        S: Service<Event<P>>,
    {
        #[pin]
        state: State<'a, S, P>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<'a, S, P>
    where
        S: Service<Event<P>>,
    {
        Waiting { service: &'a mut S, event: Option<Event<P>> },
        Calling { #[pin] future: S::Future },
    }
}

impl<S, P> Future for Publish<'_, S, P>
where
    S: Service<Event<P>>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { service, event } => {
                    ready!(service.poll_ready(cx))?;
                    // `Waiting` always holds the event until this single
                    // transition to `Calling`, so `take` cannot be `None`.
                    let Some(event) = event.take() else {
                        unreachable!("Publish polled after its event was sent")
                    };
                    let future = service.call(event);
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => return future.poll(cx),
            }
        }
    }
}

impl<S, P> fmt::Debug for Publish<'_, S, P>
where
    S: Service<Event<P>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish").finish_non_exhaustive()
    }
}
