//! [`ResponseFuture`]: the calls of one event to its destinations, driven
//! together on the caller's task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use super::Routed;
use super::error::{Failure, FanOutError};
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
        more: Vec<Pin<Box<Call<F>>>>,
        // Calls placed so far (inline first).
        placed: usize,
        // Calls not finished yet.
        running: usize,
        names: Arc<[Arc<str>]>,
        failures: Vec<Failure>,
        // Set when the event was refused for want of a destination.
        unrouted: Option<Arc<str>>,
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
    pub(super) fn new(names: Arc<[Arc<str>]>) -> Self {
        ResponseFuture {
            a: Call::Empty,
            b: Call::Empty,
            c: Call::Empty,
            d: Call::Empty,
            more: Vec::new(),
            placed: 0,
            running: 0,
            names,
            failures: Vec::new(),
            unrouted: None,
        }
    }

    /// A future that answers that no destination takes `kind`.
    pub(super) fn unrouted(names: Arc<[Arc<str>]>, kind: Arc<str>) -> Self {
        ResponseFuture {
            unrouted: Some(kind),
            ..ResponseFuture::new(names)
        }
    }

    /// Adds the call to `destination`. Done in `FanOut::call`, before the
    /// future is pinned.
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
            _ => self.more.push(Box::pin(call)),
        }
        self.placed += 1;
        self.running += 1;
    }

    /// Records that `destination` could not be called.
    pub(super) fn fail(&mut self, destination: usize, error: BoxError) {
        self.failures
            .push(Failure::new(&self.names, destination, error));
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Routed, FanOutError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(kind) = this.unrouted.take() {
            return Poll::Ready(Err(FanOutError::Unrouted { kind }));
        }
        let mut done = Finished {
            names: this.names,
            failures: this.failures,
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
        for call in this.more.iter_mut() {
            done.poll(call.as_mut(), cx);
        }
        if *this.running > 0 {
            return Poll::Pending;
        }
        if this.failures.is_empty() {
            return Poll::Ready(Ok(Routed {
                destinations: *this.placed,
            }));
        }
        let inline = [&*this.a, &*this.b, &*this.c, &*this.d];
        let succeeded = inline
            .into_iter()
            .chain(this.more.iter().map(|call| &**call))
            .filter_map(|call| match call {
                Call::Succeeded { destination } => Some(Arc::clone(&this.names[*destination])),
                _ => None,
            })
            .collect();
        let mut failures = std::mem::take(this.failures);
        failures.sort_by_key(|f| f.index);
        Poll::Ready(Err(FanOutError::Failed {
            failures,
            succeeded,
        }))
    }
}

/// What polling the calls updates.
struct Finished<'a> {
    names: &'a Arc<[Arc<str>]>,
    failures: &'a mut Vec<Failure>,
    running: &'a mut usize,
}

impl Finished<'_> {
    /// Polls one call if it is still running, and records how it ended.
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
