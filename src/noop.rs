//! [`NoopSink`]: accepts every event and drops it.
//!
//! For applications where events are switched off by configuration, and for
//! tests that do not look at events. It allocates nothing and is always
//! ready.
//!
//! ```
//! use eventsink::{Event, NoopSink, SinkExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut sink = NoopSink::new();
//! sink.publish(Event::new("user.signed_up", serde_json::json!({"user_id": 1}))).await.unwrap();
//! # }
//! ```

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use tower::Service;

use crate::Event;

/// A sink that drops every event and never fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopSink {
    _priv: (),
}

impl NoopSink {
    /// A new `NoopSink`.
    ///
    /// ```
    /// let sink = eventsink::NoopSink::new();
    /// # let _ = sink;
    /// ```
    pub const fn new() -> Self {
        NoopSink { _priv: () }
    }
}

impl<P> Service<Event<P>> for NoopSink {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _event: Event<P>) -> Self::Future {
        ready(Ok(()))
    }
}
