//! Metrics of publishing and delivery, through the [`metrics`] facade
//! (feature `metrics`): install any recorder (Prometheus, StatsD,
//! OpenTelemetry…) and the queue reports to it.
//!
//! Without a recorder the facade discards everything. The names follow
//! Prometheus' conventions (`_total` counters, `_seconds` histograms):
//!
//! | metric | type | labels | counts |
//! |---|---|---|---|
//! | [`PUBLISHED_TOTAL`] | counter | `queue`, `kind`, `result` (`stored` / `already_queued`) | publishes answered `Ok` |
//! | [`ENQUEUED_TOTAL`] | counter | `queue`, `kind` | jobs a publish or a replay stored (new deliveries, not retries) |
//! | [`DELIVERED_TOTAL`] | counter | `queue`, `kind` | events delivered |
//! | [`RETRIED_TOTAL`] | counter | `queue`, `kind` | failed attempts whose next attempt was scheduled |
//! | [`DEAD_TOTAL`] | counter | `queue`, `kind`, `cause` (`permanent` / `out_of_attempts`) | events the worker made dead letters |
//! | [`DELIVERY_LATENCY_SECONDS`] | histogram | `queue`, `kind` | from the event's `created_at` to its delivery, retries included |
//! | [`ATTEMPT_DURATION_SECONDS`] | histogram | `queue`, `kind`, `outcome` (`delivered` / `retrying` / `dead`) | one delivery attempt (the sink's call) |
//! | [`QUEUE_DEPTH`] | gauge | `queue`, `state` (`pending` / `scheduled` / `running` / `dead`) | the queue's [`QueueStats`], read by each worker every [`DEFAULT_DEPTH_INTERVAL`] |
//!
//! `queue` is the queue's name, the destination (one queue per
//! receiver). **`kind` is the application's event kind**: every distinct
//! kind is a time series per metric, so keep kinds a small fixed set
//! (`order.placed`, not `order.placed.7`); a Prometheus server degrades
//! with hundreds of thousands of series.
//!
//! Not counted: jobs that the worker's maintenance buries because apalis
//! gave up on them, and stored jobs that no longer decode (both are dead
//! letters written outside a delivery, without a kind at hand); the
//! depth gauge's `dead` includes them.
//!
//! ```
//! use eventsink::queue::{MemoryQueue, ThroughTaskQueue};
//! use eventsink::{Event, RecordingSink, SinkExt};
//! use tower::Layer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! // metrics_exporter_prometheus::PrometheusBuilder::new().install()?; // or any recorder
//! let recorder = RecordingSink::new();
//! let mut sink = ThroughTaskQueue::new(MemoryQueue::new("orders")).layer(recorder.clone());
//! let worker = sink.worker().spawn();
//! sink.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
//! recorder.wait_for(1, std::time::Duration::from_secs(5)).await?;
//! worker.shutdown().await; // eventsink_published_total, _enqueued_total, _delivered_total: 1
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::queue::{DeathCause, QueueStats};

// Labels are the queue's and the event's shared names (`Arc<str>`): no
// copy per call.

/// Publishes answered `Ok`, by `queue`, `kind` and `result`.
pub const PUBLISHED_TOTAL: &str = "eventsink_published_total";
/// New jobs stored by publishes and replays, by `queue` and `kind`.
pub const ENQUEUED_TOTAL: &str = "eventsink_enqueued_total";
/// Events delivered, by `queue` and `kind`.
pub const DELIVERED_TOTAL: &str = "eventsink_delivered_total";
/// Failed attempts whose next attempt was scheduled, by `queue` and `kind`.
pub const RETRIED_TOTAL: &str = "eventsink_retried_total";
/// Events the worker made dead letters, by `queue`, `kind` and `cause`.
pub const DEAD_TOTAL: &str = "eventsink_dead_total";
/// Seconds from an event's `created_at` to its delivery.
pub const DELIVERY_LATENCY_SECONDS: &str = "eventsink_delivery_latency_seconds";
/// Seconds of one delivery attempt, by `queue`, `kind` and `outcome`.
pub const ATTEMPT_DURATION_SECONDS: &str = "eventsink_attempt_duration_seconds";
/// Jobs of a queue by `state`, from [`QueueStats`].
pub const QUEUE_DEPTH: &str = "eventsink_queue_depth";

/// How often a worker reads its queue's stats for [`QUEUE_DEPTH`]. 15 s:
/// a common Prometheus scrape interval, so each scrape sees a fresh
/// value, while the read (one statement or script) stays negligible next
/// to the deliveries.
pub const DEFAULT_DEPTH_INTERVAL: Duration = Duration::from_secs(15);

/// A publish answered `Ok`; `stored` if it stored a new job.
pub(crate) fn published(queue: &Arc<str>, kind: &Arc<str>, stored: bool) {
    let result = if stored { "stored" } else { "already_queued" };
    metrics::counter!(PUBLISHED_TOTAL, "queue" => Arc::clone(queue), "kind" => Arc::clone(kind), "result" => result)
        .increment(1);
    if stored {
        enqueued(queue, kind);
    }
}

/// A publish or a replay stored a new job.
pub(crate) fn enqueued(queue: &Arc<str>, kind: &Arc<str>) {
    metrics::counter!(ENQUEUED_TOTAL, "queue" => Arc::clone(queue), "kind" => Arc::clone(kind))
        .increment(1);
}

/// One delivery attempt ended with `outcome` after `duration`.
pub(crate) fn attempt(
    queue: &Arc<str>,
    kind: &Arc<str>,
    outcome: &'static str,
    duration: Duration,
) {
    metrics::histogram!(ATTEMPT_DURATION_SECONDS, "queue" => Arc::clone(queue), "kind" => Arc::clone(kind), "outcome" => outcome)
        .record(duration.as_secs_f64());
}

/// An event was delivered `latency` after it was created.
pub(crate) fn delivered(queue: &Arc<str>, kind: &Arc<str>, latency: Duration) {
    let labels = [("queue", Arc::clone(queue)), ("kind", Arc::clone(kind))];
    metrics::counter!(DELIVERED_TOTAL, &labels).increment(1);
    metrics::histogram!(DELIVERY_LATENCY_SECONDS, &labels).record(latency.as_secs_f64());
}

/// A failed attempt's next attempt was scheduled.
pub(crate) fn retried(queue: &Arc<str>, kind: &Arc<str>) {
    metrics::counter!(RETRIED_TOTAL, "queue" => Arc::clone(queue), "kind" => Arc::clone(kind))
        .increment(1);
}

/// The worker made an event a dead letter.
pub(crate) fn dead(queue: &Arc<str>, kind: &Arc<str>, cause: DeathCause) {
    metrics::counter!(DEAD_TOTAL, "queue" => Arc::clone(queue), "kind" => Arc::clone(kind), "cause" => cause.as_str())
        .increment(1);
}

/// The queue's depth, from a stats snapshot.
pub(crate) fn depth(queue: &str, stats: &QueueStats) {
    for (state, n) in [
        ("pending", stats.pending),
        ("scheduled", stats.scheduled),
        ("running", stats.running),
        ("dead", stats.dead),
    ] {
        metrics::gauge!(QUEUE_DEPTH, "queue" => queue.to_owned(), "state" => state).set(n as f64);
    }
}
