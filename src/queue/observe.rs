//! [`Attempt`]: what the worker tells an attempt hook
//! ([`QueueWorker::on_attempt`](super::QueueWorker::on_attempt)) after every
//! delivery attempt, and the spans and metrics of a delivery.
//!
//! A hook lets an application keep its own attempt log (as Svix shows its
//! customers each attempt of a message) in its own database, next to the
//! queue's dead letters.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use eventsink::queue::{Attempt, AttemptOutcome, MemoryQueue, ThroughTaskQueue};
//! use eventsink::{Event, RecordingSink, SinkExt};
//! use tower::Layer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! let log = Arc::new(Mutex::new(Vec::new()));
//! let recorder = RecordingSink::new();
//! let queue = ThroughTaskQueue::new(MemoryQueue::new("orders"));
//! let worker = queue
//!     .worker(recorder.clone())
//!     .on_attempt({
//!         let log = Arc::clone(&log);
//!         move |a: &Attempt<'_>| log.lock().unwrap().push((a.event_id.to_owned(), a.attempt, a.outcome))
//!     })
//!     .spawn();
//! queue.layer(recorder.clone()).publish(Event::with_id("order.placed", "evt_1", serde_json::json!(7))).await?;
//! recorder.wait_for(1, std::time::Duration::from_secs(5)).await?;
//! worker.shutdown().await;
//! assert_eq!(log.lock().unwrap()[0], ("evt_1".to_owned(), 1, AttemptOutcome::Delivered));
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::job::{DeathCause, QueuedEvent};
use crate::BoxError;
use crate::trace::MESSAGING_SYSTEM;

/// One delivery attempt, as the worker reports it to the hook of
/// [`QueueWorker::on_attempt`](super::QueueWorker::on_attempt).
///
/// It carries no payload and no secret: `error` is the sink's error as
/// displayed (a webhook's URL without credentials or query, and the start
/// of the receiver's answer).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Attempt<'a> {
    /// The event's id.
    pub event_id: &'a str,
    /// The event's kind.
    pub kind: &'a str,
    /// The queue's name: the destination.
    pub queue: &'a str,
    /// The delivery chain (one per publish or replay; see
    /// [`QueuedEvent`]).
    pub chain: &'a str,
    /// Which attempt of the chain this was, from 1.
    pub attempt: u32,
    /// What follows from it.
    pub outcome: AttemptOutcome,
    /// The HTTP status the receiver answered, when the error carries one
    /// (a webhook's non-2xx answer); `None` on success and for other errors.
    pub status: Option<u16>,
    /// The error, as the sink displayed it; `None` on success.
    pub error: Option<&'a str>,
    /// How long the attempt took (the sink's call, within the attempt
    /// timeout).
    pub duration: Duration,
}

/// What the worker does after an [`Attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// The sink took the event.
    Delivered,
    /// The attempt failed; the next one is scheduled, due at `next_due`.
    Retrying {
        /// When the next attempt is due.
        next_due: DateTime<Utc>,
    },
    /// The attempt failed and the event becomes a dead letter.
    Dead {
        /// Why.
        cause: DeathCause,
    },
}

impl AttemptOutcome {
    /// `delivered`, `retrying` or `dead`: the value of the span field
    /// `eventsink.outcome` and of the metrics' `outcome` label.
    ///
    /// ```
    /// assert_eq!(eventsink::queue::AttemptOutcome::Delivered.as_str(), "delivered");
    /// ```
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retrying { .. } => "retrying",
            AttemptOutcome::Dead { .. } => "dead",
        }
    }
}

/// The hook of [`QueueWorker::on_attempt`](super::QueueWorker::on_attempt).
pub(crate) type AttemptHook = Arc<dyn Fn(&Attempt<'_>) + Send + Sync>;

/// What a delivery reports besides its consequence: its span's fields,
/// the metrics, the hook.
#[derive(Clone, Default)]
pub(crate) struct Observer {
    pub(crate) hook: Option<AttemptHook>,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Observer {
    /// Reports an attempt of `job` in `queue` that ended with `outcome`
    /// (and `error`, if it failed) after `duration`: on the current span
    /// (the delivery's), to the metrics, and to the hook. A hook that
    /// panics is logged and ignored: the delivery's outcome is still
    /// written.
    pub(crate) fn report<P>(
        &self,
        queue: &Arc<str>,
        job: &QueuedEvent<P>,
        outcome: AttemptOutcome,
        error: Option<&BoxError>,
        duration: Duration,
    ) {
        let span = tracing::Span::current();
        span.record("eventsink.outcome", outcome.as_str());
        span.record("eventsink.duration_ms", duration.as_millis() as u64);
        if let AttemptOutcome::Retrying { next_due } = outcome {
            span.record("eventsink.next_due", tracing::field::display(next_due));
        }
        #[cfg(feature = "metrics")]
        record_metrics(queue, job, outcome, duration);
        let Some(hook) = &self.hook else {
            return;
        };
        let message = error.map(ToString::to_string);
        let attempt = Attempt {
            event_id: &job.event.id,
            kind: &job.event.kind,
            queue,
            chain: &job.chain,
            attempt: job.attempt,
            outcome,
            status: error.and_then(status_of),
            error: message.as_deref(),
            duration,
        };
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&attempt)));
        if called.is_err() {
            tracing::error!(event = %job.event.id, "the attempt hook panicked; ignored");
        }
    }
}

/// The metrics of one attempt.
#[cfg(feature = "metrics")]
fn record_metrics<P>(
    queue: &Arc<str>,
    job: &QueuedEvent<P>,
    outcome: AttemptOutcome,
    duration: Duration,
) {
    let kind = &job.event.kind;
    crate::metrics::attempt(queue, kind, outcome.as_str(), duration);
    match outcome {
        AttemptOutcome::Delivered => {
            let latency = (Utc::now() - job.event.created_at)
                .to_std()
                .unwrap_or_default();
            crate::metrics::delivered(queue, kind, latency);
        }
        AttemptOutcome::Retrying { .. } => crate::metrics::retried(queue, kind),
        AttemptOutcome::Dead { cause } => crate::metrics::dead(queue, kind, cause),
    }
}

/// The HTTP status an error carries (a webhook's [`Error::Http`](crate::Error::Http)).
fn status_of(error: &BoxError) -> Option<u16> {
    match crate::Error::find(&**error)? {
        crate::Error::Http { status, .. } => Some(status.as_u16()),
        _ => None,
    }
}

/// The span of one delivery attempt of `job` (see [`trace`](crate::trace)),
/// the child of its publisher's span when the job carries its context.
pub(crate) fn delivery_span<P>(queue: &str, job: &QueuedEvent<P>) -> tracing::Span {
    let span = tracing::info_span!(
        "eventsink.process",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "process",
        messaging.destination.name = queue,
        messaging.message.id = &*job.event.id,
        eventsink.event.kind = &*job.event.kind,
        eventsink.attempt = job.attempt,
        eventsink.outcome = tracing::field::Empty,
        eventsink.next_due = tracing::field::Empty,
        eventsink.duration_ms = tracing::field::Empty,
        otel.kind = "consumer",
    );
    if let Some(traceparent) = &job.traceparent {
        crate::trace::set_parent(&span, traceparent);
    }
    span
}

/// The span of writing `job`'s dead letter.
pub(crate) fn dead_letter_span<P>(
    queue: &str,
    job: &QueuedEvent<P>,
    cause: DeathCause,
) -> tracing::Span {
    tracing::info_span!(
        "eventsink.dead_letter",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "settle",
        messaging.destination.name = queue,
        messaging.message.id = &*job.event.id,
        eventsink.death.cause = cause.as_str(),
    )
}
