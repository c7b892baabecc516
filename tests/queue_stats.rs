//! `QueueBackend::stats` on every backend, against the real thing: jobs
//! published without a worker are pending, a retry due later is scheduled,
//! a permanent failure is dead, and a drained queue has nothing pending or
//! running. Postgres and Redis are ignored (with the reason) unless their
//! URL was set at build time (see `build.rs`).
mod support;

use std::time::Duration;

use eventsink::queue::{QueueBackend, QueueStats, RetrySchedule, ThroughTaskQueue};
use eventsink::{Event, RecordingSink, SinkExt};
use serde_json::{Value, json};
use support::queue::unique_name;
use tower::Layer;

/// How long a test waits for the stats it expects.
const STATS_TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `backend`'s stats until `done` holds; the last stats, or a
/// failure naming `what` and them.
async fn wait_for_stats<B: QueueBackend<Value>>(
    backend: &B,
    what: &str,
    done: impl Fn(&QueueStats) -> bool,
) -> QueueStats {
    let deadline = tokio::time::Instant::now() + STATS_TIMEOUT;
    loop {
        let stats = backend.stats().await.expect("stats");
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {STATS_TIMEOUT:?} for {what}; stats are {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn counts_each_state<B: QueueBackend<Value>>(backend: B) {
    let recorder = RecordingSink::new();
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(recorder.clone());
    let empty = backend.stats().await.expect("stats");
    assert_eq!(empty, QueueStats::default(), "a new queue is empty");

    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    for n in 0..3 {
        sink.publish(Event::new("test.stats", json!(n)))
            .await
            .expect("publish");
    }
    let stats = backend.stats().await.expect("stats");
    assert_eq!(
        (stats.pending, stats.scheduled, stats.running, stats.dead),
        (3, 0, 0, 0),
        "published without a worker: {stats:?}"
    );
    let oldest = stats
        .oldest_due
        .expect("pending jobs have an oldest due time");
    assert!(
        oldest >= before && oldest <= chrono::Utc::now(),
        "oldest due {oldest} is when they were published"
    );

    // One attempt, then a retry an hour later.
    let schedule = RetrySchedule::fixed([Duration::from_secs(3600)]).jitter(0.0);
    let worker = sink
        .worker()
        .schedule(schedule)
        .concurrency(1)
        .poll_interval(Duration::from_millis(10))
        .spawn();
    recorder
        .wait_for(3, STATS_TIMEOUT)
        .await
        .expect("delivered");
    let drained = wait_for_stats(&backend, "the queue to drain", |s| {
        s.pending == 0 && s.running == 0
    })
    .await;
    assert_eq!(drained, QueueStats::default(), "drained: {drained:?}");

    recorder.fail_next_permanently(1);
    sink.publish(Event::new("test.stats.dead", json!(0)))
        .await
        .expect("publish");
    wait_for_stats(&backend, "a dead letter", |s| s.dead == 1).await;

    recorder.fail_next(1);
    sink.publish(Event::new("test.stats.retry", json!(0)))
        .await
        .expect("publish");
    let last = wait_for_stats(&backend, "a scheduled retry", |s| {
        s.scheduled == 1 && s.running == 0
    })
    .await;
    worker.shutdown().await;
    assert_eq!(
        (last.pending, last.scheduled, last.running, last.dead),
        (0, 1, 0, 1),
        "a retry due in an hour and a dead letter: {last:?}"
    );
    assert_eq!(last.oldest_due, None, "nothing is due");
    let json = serde_json::to_value(last).expect("serialise");
    assert_eq!(
        json,
        json!({"pending": 0, "scheduled": 1, "running": 0, "dead": 1, "oldest_due": null})
    );

    // A delivery under way is running until it ends.
    let (started, mut starts) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let held = {
        let release = std::sync::Arc::clone(&release);
        tower::service_fn(move |_: Event| {
            let _ = started.send(());
            let release = std::sync::Arc::clone(&release);
            async move {
                let _permit = release.acquire().await;
                Ok::<(), eventsink::Error>(())
            }
        })
    };
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(held);
    sink.publish(Event::new("test.stats.held", json!(0)))
        .await
        .expect("publish");
    let worker = sink
        .worker()
        .poll_interval(Duration::from_millis(10))
        .spawn();
    starts.recv().await.expect("the delivery started");
    let holding = backend.stats().await.expect("stats");
    assert_eq!(
        (
            holding.pending,
            holding.scheduled,
            holding.running,
            holding.dead
        ),
        (0, 1, 1, 1),
        "one delivery under way: {holding:?}"
    );
    release.add_permits(1);
    wait_for_stats(&backend, "the delivery to end", |s| s.running == 0).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_counts_each_state() {
    counts_each_state(eventsink::queue::MemoryQueue::new(unique_name("mem"))).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_counts_each_state() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let name = unique_name("sqlite");
    let queue = eventsink::queue::SqliteQueue::open(tmp.path().join("q.db"), &name)
        .await
        .expect("open");
    counts_each_state(queue).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_counts_each_state() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let name = unique_name("pg");
    let queue = eventsink::queue::PostgresQueue::connect(&url, &name)
        .await
        .expect("connect to Postgres");
    counts_each_state(queue).await;
    support::queue::delete_postgres_rows(&url, &[name]).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_counts_each_state() {
    let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("redis");
    let queue = eventsink::queue::RedisQueue::connect(&url, &name)
        .await
        .expect("connect to Redis");
    counts_each_state(queue).await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}

/// A worker takes up to its fetch batch of due jobs in one query, and holds
/// them leased (counted as running) until it delivers them: the default
/// batch takes all 40 at once; a batch of 5 takes 5 (and at most one more
/// batch while the first waits).
async fn fetch_batch_sets_how_many_jobs_a_worker_takes<B: QueueBackend<Value>>(
    backend: B,
    fetch_batch: Option<usize>,
) {
    const EVENTS: u64 = 40;
    let (started, mut starts) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let held = {
        let release = std::sync::Arc::clone(&release);
        tower::service_fn(move |_: Event| {
            let _ = started.send(());
            let release = std::sync::Arc::clone(&release);
            async move {
                release.acquire().await.expect("open").forget();
                Ok::<(), eventsink::Error>(())
            }
        })
    };
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(held);
    for n in 0..EVENTS {
        sink.publish(Event::new("test.stats.batch", json!(n)))
            .await
            .expect("publish");
    }
    let mut worker = sink
        .worker()
        .concurrency(1)
        .poll_interval(Duration::from_millis(10));
    if let Some(jobs) = fetch_batch {
        worker = worker.fetch_batch(jobs);
    }
    let worker = worker.spawn();
    starts.recv().await.expect("the first delivery started");
    match fetch_batch {
        None => {
            wait_for_stats(&backend, "all 40 jobs taken in one batch", |s| {
                s.running == EVENTS && s.pending == 0
            })
            .await;
        }
        Some(jobs) => {
            let stats = backend.stats().await.expect("stats");
            let most = 2 * u64::try_from(jobs).expect("small");
            assert!(
                stats.running >= 1 && stats.running <= most && stats.pending >= EVENTS - most,
                "a fetch batch of {jobs} takes at most {most} jobs: {stats:?}"
            );
        }
    }
    release.add_permits(usize::try_from(EVENTS).expect("small"));
    wait_for_stats(&backend, "the queue to drain", |s| {
        s.running == 0 && s.pending == 0
    })
    .await;
    worker.shutdown().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_fetch_batch_sets_how_many_jobs_a_worker_takes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    for batch in [None, Some(5)] {
        let name = unique_name("sqlite-batch");
        let queue =
            eventsink::queue::SqliteQueue::open(tmp.path().join(format!("{name}.db")), &name)
                .await
                .expect("open");
        fetch_batch_sets_how_many_jobs_a_worker_takes(queue, batch).await;
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_fetch_batch_sets_how_many_jobs_a_worker_takes() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    for batch in [None, Some(5)] {
        let name = unique_name("pg-batch");
        let queue = eventsink::queue::PostgresQueue::connect(&url, &name)
            .await
            .expect("connect to Postgres");
        fetch_batch_sets_how_many_jobs_a_worker_takes(queue, batch).await;
        support::queue::delete_postgres_rows(&url, &[name]).await;
    }
}
