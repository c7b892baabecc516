//! What becomes of jobs that end: retention removes only jobs whose outcome
//! is recorded, never one that apalis still retries or gave up on, on any
//! backend, and it leaves no completed bookkeeping behind (Redis' done
//! set); a job apalis gave up on becomes a dead letter (the worker's
//! maintenance) that replays like any other. The jobs apalis fails or
//! kills are made by a plain apalis worker, with no code of this crate,
//! over the jobs this crate wrote.
#![cfg(feature = "sqlite")]
mod support;

use std::time::Duration;

use apalis::prelude::{AbortError, BoxDynError, Task, WorkerBuilder};
use apalis_core::backend::ext::BackendExt;
use apalis_core::error::WorkerError;
use eventsink::queue::{
    DeadLetters, DeathCause, QueueBackend, QueuedEvent, SqliteQueue, ThroughTaskQueue,
};
use eventsink::{Event, NoopSink, RecordingSink, SinkExt};
use serde_json::{Value, json};
use support::conformance::ARRIVAL_TIMEOUT;
use tokio::sync::mpsc;
use tower::Layer;

type Job = Task<QueuedEvent<Value>>;

/// A plain apalis handler that ends every job with an error (`abort`:
/// `AbortError`, which apalis records as `Killed`; otherwise a plain error,
/// `Failed` and scheduled again), and says so on `tx`.
fn failing_handler(
    abort: bool,
    tx: mpsc::UnboundedSender<()>,
) -> impl tower::Service<Job, Response = (), Error = BoxDynError, Future: Send> + Clone + Send + 'static
{
    tower::service_fn(move |_job: Job| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(());
            let err: BoxDynError = if abort {
                AbortError::new("killed by the test").into()
            } else {
                "failed by the test".into()
            };
            Err::<(), BoxDynError>(err)
        }
    })
}

/// Runs a plain apalis worker over `storage` until its handler (see
/// [`failing_handler`]) has ended one job, then stops it. A macro: the
/// worker's bounds differ per backend.
macro_rules! fail_one_job_in_apalis {
    ($storage:expr, $abort:expr, $name:expr) => {{
        let (tx, rx) = mpsc::unbounded_channel();
        WorkerBuilder::new(format!("plain-apalis-{}", $name))
            .backend($storage.poll_with_interval(Duration::from_millis(10)))
            .build(failing_handler($abort, tx))
            .run_until(handled_once(rx))
            .await
            .expect("the apalis worker");
    }};
}

/// Resolves once the handler has run once (then the worker stops and
/// writes the job's outcome).
async fn handled_once(mut rx: mpsc::UnboundedReceiver<()>) -> Result<(), WorkerError> {
    rx.recv().await;
    Ok(())
}

async fn publish_one<B: QueueBackend<Value>>(backend: &B) -> Event {
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(NoopSink::new());
    let event = Event::new("test.retention", json!({"keep": true}));
    sink.publish(event.clone()).await.expect("publish");
    event
}

/// A worker of this crate finds the job apalis gave up on, buries it as a
/// dead letter, and the replayed letter is delivered.
async fn abandoned_job_is_buried_and_replays<B: QueueBackend<Value>>(queue: &B, event: &Event) {
    let recorder = RecordingSink::new();
    let sink = ThroughTaskQueue::new(queue.clone()).layer(recorder.clone());
    let worker = sink
        .worker()
        .poll_interval(Duration::from_millis(10))
        .spawn();
    let dead = DeadLetters::<_, Value>::new(queue.clone());
    dead.wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("the job apalis gave up on is a dead letter");
    let letter = dead
        .get(&dead.key_of(event))
        .await
        .expect("get")
        .expect("the letter");
    assert_eq!(letter.cause, DeathCause::Abandoned);
    assert_eq!(letter.event, *event);
    assert!(dead.replay(&letter.key).await.expect("replay"));
    let got = recorder
        .wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("the replayed event is delivered");
    worker.shutdown().await;
    assert_eq!(got, vec![event.clone()]);
    assert_eq!(dead.count().await.expect("count"), 0);
}

/// Polls `query` (a `COUNT(*)`) until it answers `want`, for at most the
/// arrival timeout.
async fn wait_for_sqlite_count(
    pool: &sqlx::SqlitePool,
    query: &'static str,
    name: &str,
    want: i64,
) {
    let deadline = tokio::time::Instant::now() + ARRIVAL_TIMEOUT;
    loop {
        let (n,): (i64,) = sqlx::query_as(query)
            .bind(name)
            .fetch_one(pool)
            .await
            .expect("count");
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{query}: {n}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const SQLITE_KILLED: &str = "SELECT COUNT(*) FROM Jobs WHERE job_type = ? AND status = 'Killed'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention_keeps_a_job_apalis_killed_and_the_worker_buries_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = support::queue::unique_name("retain");
    let queue: SqliteQueue = SqliteQueue::open(dir.path().join("q.db"), &name)
        .await
        .expect("open");
    let event = publish_one(&queue).await;
    fail_one_job_in_apalis!(
        apalis_sqlite::SqliteStorage::<QueuedEvent<Value>>::new(queue.pool())
            .with_config(apalis_sqlite::Config::default().queue(&name)),
        true,
        &name
    );
    wait_for_sqlite_count(queue.pool(), SQLITE_KILLED, &name, 1).await;

    let removed = queue
        .remove_completed(Duration::ZERO)
        .await
        .expect("retention");
    assert_eq!(removed, 0, "a killed job is not delivered: keep it");
    wait_for_sqlite_count(queue.pool(), SQLITE_KILLED, &name, 1).await;
    abandoned_job_is_buried_and_replays(&queue, &event).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_retention_keeps_a_job_apalis_killed_and_the_worker_buries_it() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let name = support::queue::unique_name("retain");
    let queue: eventsink::queue::PostgresQueue =
        eventsink::queue::PostgresQueue::connect(&url, &name)
            .await
            .expect("connect");
    let event = publish_one(&queue).await;
    fail_one_job_in_apalis!(
        apalis_postgres::PostgresStorage::<QueuedEvent<Value>>::new(queue.pool())
            .with_config(apalis_postgres::Config::default().queue(&name)),
        true,
        &name
    );
    let killed = || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Killed'",
        )
        .bind(&name)
        .fetch_one(queue.pool())
        .await
        .expect("count");
        n
    };
    let deadline = tokio::time::Instant::now() + ARRIVAL_TIMEOUT;
    while killed().await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job was never killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let removed = queue
        .remove_completed(Duration::ZERO)
        .await
        .expect("retention");
    assert_eq!(removed, 0, "a killed job is not delivered: keep it");
    assert_eq!(killed().await, 1);
    abandoned_job_is_buried_and_replays(&queue, &event).await;
    let _ = sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
        .bind(&name)
        .execute(queue.pool())
        .await;
}

#[cfg(feature = "redis")]
mod redis_backend {
    use super::*;
    use eventsink::queue::RedisQueue;
    use redis::AsyncCommands;

    async fn open(url: &str, name: &str) -> (RedisQueue, redis::aio::ConnectionManager) {
        let queue = RedisQueue::connect(url, name).await.expect("connect");
        let conn = redis::Client::open(url)
            .expect("url")
            .get_connection_manager()
            .await
            .expect("connect");
        (queue, conn)
    }

    fn config(name: &str) -> apalis_redis::Config {
        apalis_redis::Config::default().queue(name)
    }

    /// apalis schedules a failed job again and marks it `Failed` with a
    /// `done_at`; its own vacuum then deletes the job's data although it
    /// is still to run. Ours keeps it, and the job is delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn redis_retention_keeps_a_job_apalis_still_retries() {
        let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
        let name = support::queue::unique_name("retain");
        let (queue, mut conn) = open(&url, &name).await;
        let event = publish_one(&queue).await;
        fail_one_job_in_apalis!(
            apalis_redis::RedisStorage::<QueuedEvent<Value>>::new(conn.clone())
                .with_config(config(&name)),
            false,
            &name
        );
        let scheduled: u64 = conn
            .zcard(config(&name).scheduled_jobs_set())
            .await
            .expect("zcard");
        assert_eq!(scheduled, 1, "apalis scheduled the failed job again");

        queue
            .remove_completed(Duration::ZERO)
            .await
            .expect("retention");
        let kept: u64 = conn
            .hlen(config(&name).job_data_hash())
            .await
            .expect("hlen");
        assert_eq!(kept, 1, "retention deleted the data of a job still to run");

        let recorder = RecordingSink::new();
        let sink = ThroughTaskQueue::new(queue.clone()).layer(recorder.clone());
        let worker = sink
            .worker()
            .poll_interval(Duration::from_millis(10))
            .spawn();
        let got = recorder
            .wait_for(1, ARRIVAL_TIMEOUT)
            .await
            .expect("the retried job is delivered");
        worker.shutdown().await;
        assert_eq!(got, vec![event]);
        support::queue::delete_redis_keys(&url, &[name]).await;
    }

    /// A job apalis killed sits in apalis' dead set; the worker buries it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn redis_a_job_apalis_killed_becomes_a_dead_letter() {
        let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
        let name = support::queue::unique_name("retain");
        let (queue, mut conn) = open(&url, &name).await;
        let event = publish_one(&queue).await;
        fail_one_job_in_apalis!(
            apalis_redis::RedisStorage::<QueuedEvent<Value>>::new(conn.clone())
                .with_config(config(&name)),
            true,
            &name
        );
        let dead: u64 = conn
            .scard(config(&name).dead_jobs_set())
            .await
            .expect("scard");
        assert_eq!(dead, 1, "apalis put the killed job in its dead set");
        abandoned_job_is_buried_and_replays(&queue, &event).await;
        let dead: u64 = conn
            .scard(config(&name).dead_jobs_set())
            .await
            .expect("scard");
        assert_eq!(dead, 0, "the buried job left apalis' dead set");
        support::queue::delete_redis_keys(&url, &[name]).await;
    }

    /// Delivered jobs leave nothing behind once retention ran: no data, no
    /// meta hash, no entry in apalis' done set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn redis_retention_trims_the_done_set() {
        let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
        let name = support::queue::unique_name("retain");
        let (queue, mut conn) = open(&url, &name).await;
        let recorder = RecordingSink::new();
        let mut sink = ThroughTaskQueue::new(queue.clone()).layer(recorder.clone());
        for n in 0..5 {
            sink.publish(Event::new("test.retention", json!(n)))
                .await
                .expect("publish");
        }
        let worker = sink
            .worker()
            .poll_interval(Duration::from_millis(10))
            .spawn();
        recorder
            .wait_for(5, ARRIVAL_TIMEOUT)
            .await
            .expect("delivered");
        worker.shutdown().await;
        let done: u64 = conn
            .scard(config(&name).done_jobs_set())
            .await
            .expect("scard");
        assert_eq!(done, 5, "apalis recorded five done jobs");

        let removed = queue
            .remove_completed(Duration::ZERO)
            .await
            .expect("retention");
        assert_eq!(removed, 5);
        let done: u64 = conn
            .scard(config(&name).done_jobs_set())
            .await
            .expect("scard");
        let data: u64 = conn
            .hlen(config(&name).job_data_hash())
            .await
            .expect("hlen");
        let metas: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", config(&name).job_meta_hash()))
            .query_async(&mut conn)
            .await
            .expect("keys");
        assert_eq!(
            (done, data, metas.len()),
            (0, 0, 0),
            "done set, data and meta hashes are empty after retention"
        );
        support::queue::delete_redis_keys(&url, &[name]).await;
    }
}
