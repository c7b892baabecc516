//! An idle worker finds a retry as soon as it is due, on every durable
//! backend: by polling, never only at its next heartbeat.
//!
//! The heartbeat here is 60 s. apalis' poll interval used to lose its
//! waker whenever the fetch it started completed on its first poll; the
//! worker then slept until its next heartbeat, and retries ran in waves a
//! heartbeat apart. Each test waits 20 s for four retries due about a
//! second apart (each at most 2 s after the previous attempt, due times
//! being whole seconds): not a timing claim, but a bound between "found
//! by polling" (a few seconds) and "found at a heartbeat" (60 s or more).
#![cfg(feature = "queue")]
mod support;

use std::time::Duration;

use eventsink::queue::{QueueBackend, RetrySchedule, ThroughTaskQueue};
use eventsink::{Event, RecordingSink, SinkExt};
use serde_json::{Value, json};
use tower::Layer;

/// A heartbeat far longer than [`ARRIVAL_BOUND`].
const HEARTBEAT: Duration = Duration::from_secs(60);

/// Ample for four retries due a second apart; a third of [`HEARTBEAT`].
const ARRIVAL_BOUND: Duration = Duration::from_secs(20);

/// Failures before the delivery.
const FAILURES: usize = 4;

/// Fails an event [`FAILURES`] times, retrying after 10 ms (due the next
/// whole second on the durable backends), polling every millisecond (many
/// polls: many chances to lose a waker); the event must arrive within
/// [`ARRIVAL_BOUND`].
async fn retries_are_found_by_polling<B: QueueBackend<Value>>(queue: B) {
    let recorder = RecordingSink::new();
    recorder.fail_next(FAILURES);
    let mut sink = ThroughTaskQueue::new(queue).layer(recorder.clone());
    let worker = sink
        .worker()
        .poll_interval(Duration::from_millis(1))
        .schedule(RetrySchedule::fixed([Duration::from_millis(10); FAILURES]))
        .spawn();
    sink.publish(Event::new("test.wakeup", json!(1)))
        .await
        .expect("publish");
    let arrived = recorder.wait_for(1, ARRIVAL_BOUND).await;
    worker.shutdown().await;
    assert!(
        arrived.is_ok(),
        "the retries were not found by polling: {} of {} attempts ran in {ARRIVAL_BOUND:?}",
        recorder.calls(),
        FAILURES + 1
    );
    assert_eq!(recorder.calls(), FAILURES + 1);
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retries_are_found_by_polling() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let name = support::queue::unique_name("wakeup");
    let queue = eventsink::queue::SqliteQueue::builder(&name)
        .lease(HEARTBEAT, 3)
        .open(tmp.path().join("queue.db"))
        .await
        .expect("open sqlite queue");
    retries_are_found_by_polling(queue).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_retries_are_found_by_polling() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let name = support::queue::unique_name("wakeup");
    let queue = eventsink::queue::PostgresQueue::builder(&name)
        .lease(HEARTBEAT, 3)
        .connect(&url)
        .await
        .expect("connect to Postgres");
    retries_are_found_by_polling(queue).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    for sql in [
        "DELETE FROM apalis.jobs WHERE job_type = $1",
        "DELETE FROM apalis.workers WHERE worker_type = $1",
    ] {
        let _ = sqlx::query(sql).bind(&name).execute(&pool).await;
    }
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_retries_are_found_by_polling() {
    let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
    let name = support::queue::unique_name("wakeup");
    let queue = eventsink::queue::RedisQueue::builder(&name)
        .lease(HEARTBEAT, 3)
        .connect(&url)
        .await
        .expect("connect to Redis");
    retries_are_found_by_polling(queue).await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}
