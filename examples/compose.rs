//! The recommended tower stack around a sink, and what each layer does when
//! the sink misbehaves.
//!
//! Run with `cargo run --example compose --features test-util` (the
//! feature lets `RecordingSink` fail on purpose).

use std::time::{Duration, Instant};

use eventsink::{Backoff, BoxError, Event, RecordingSink, RetryPolicy, Retryable, SinkExt};
use serde_json::json;
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // A sink we can make fail on purpose; in production this is a webhook
    // or a file sink.
    let recorder = RecordingSink::new();

    let sink = ServiceBuilder::new()
        // Outermost: a bounded queue in front of the stack. It makes the
        // stack Clone (one handle per publisher) and gives backpressure.
        .buffer(1024)
        // Retries retryable errors with jittered exponential backoff.
        .retry(RetryPolicy::new(
            Backoff::new()
                .min(Duration::from_millis(100))
                .max(Duration::from_secs(2))
                .attempts(4),
        ))
        // Innermost: bounds each attempt, so a hung attempt is retried.
        .timeout(Duration::from_secs(15))
        .service(recorder.clone());

    // Two transient failures: the third attempt succeeds.
    recorder.fail_next(2);
    let started = Instant::now();
    sink.clone()
        .publish(Event::new("order.placed", json!({"order_id": 1})))
        .await?;
    println!(
        "transient failures: delivered after {} calls in {:?}",
        recorder.calls(),
        started.elapsed()
    );

    // A permanent failure: returned at once, never retried.
    recorder.fail_next_permanently(1);
    let calls_before = recorder.calls();
    let err = sink
        .clone()
        .publish(Event::new("order.placed", json!({"order_id": 2})))
        .await
        .unwrap_err();
    println!(
        "permanent failure after {} call: {err} (retryable: {})",
        recorder.calls() - calls_before,
        err.is_retryable()
    );

    println!("events delivered: {}", recorder.events().len());
    Ok(())
}
