//! An idle worker starts a job that another process published at once: on
//! Redis through the queue's pub/sub announcement, which the worker
//! subscribes to again when its subscription drops; without one, polling
//! still finds jobs. On SQLite the worker watches the file's WAL index on a
//! thread of its own, which ends with the worker.
//!
//! The Redis publisher is a second `RedisQueue` on connections of its own,
//! which shares no in-process wake-up with the worker's (as another
//! process). The worker polls every 60 s, so within [`ARRIVAL_BOUND`] only
//! the announcement can wake it: a bound between "announced"
//! (milliseconds) and "found by polling" (60 s), not a timing claim.
#![cfg(feature = "queue")]
mod support;

use std::time::{Duration, Instant};

/// How long a job may take to arrive; a third of the Redis tests' slow poll
/// interval and heartbeat.
const ARRIVAL_BOUND: Duration = Duration::from_secs(20);

/// How often a test looks again while it waits for a state it cannot be
/// told about.
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// Threads of this process named `name`.
#[cfg(target_os = "linux")]
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[cfg(all(feature = "sqlite", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_worker_stops_watching_its_file_when_it_stops() {
    use eventsink::queue::{SqliteQueue, ThroughTaskQueue};
    use eventsink::{Event, RecordingSink, SinkExt};
    use tower::Layer;

    let tmp = tempfile::tempdir().expect("temp dir");
    let queue: SqliteQueue = SqliteQueue::open(tmp.path().join("q.db"), "q")
        .await
        .expect("open sqlite queue");
    let recorder = RecordingSink::new();
    let mut sink = ThroughTaskQueue::new(queue).layer(recorder.clone());
    let worker = sink.worker().spawn();
    sink.publish(Event::new("test.xproc", serde_json::json!(1)))
        .await
        .expect("publish");
    recorder
        .wait_for(1, ARRIVAL_BOUND)
        .await
        .expect("the worker runs");
    assert_eq!(
        threads_named("eventsink-watch"),
        1,
        "the worker watches its file"
    );
    worker.shutdown().await;
    let started = Instant::now();
    while threads_named("eventsink-watch") > 0 {
        assert!(
            started.elapsed() < ARRIVAL_BOUND,
            "the stopped worker's thread still watches the file after {ARRIVAL_BOUND:?}"
        );
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

#[cfg(feature = "redis")]
mod redis_wakes {
    use std::collections::HashSet;

    use eventsink::queue::{RedisQueue, RetrySchedule, ThroughTaskQueue, WorkerHandle};
    use eventsink::{Event, NoopSink, RecordingSink, SinkExt};
    use serde_json::{Value, json};
    use tower::Layer;

    use super::support::queue::{backend_url, delete_redis_keys, unique_name};
    use super::{ARRIVAL_BOUND, Duration, Instant, LOOK_EVERY};

    /// The worker's poll interval and heartbeat: far longer than
    /// [`ARRIVAL_BOUND`].
    const SLOW_POLL: Duration = Duration::from_secs(60);

    /// How long the worker may take to subscribe (again).
    const SUBSCRIBE_BOUND: Duration = Duration::from_secs(20);

    /// Held by the tests that tell their worker's subscription apart from the
    /// others by being the only new pub/sub client.
    static PUBSUB_CLIENTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
        redis::Client::open(url)
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis")
    }

    /// The ids of the clients connected in pub/sub mode.
    async fn pubsub_clients(conn: &mut redis::aio::MultiplexedConnection) -> HashSet<String> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(conn)
            .await
            .expect("CLIENT LIST");
        list.lines()
            .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
            .map(str::to_owned)
            .collect()
    }

    /// Subscribers of the queue `name`'s wake channel.
    async fn subscribers(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> u64 {
        let (_, count): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("tasks:{name}:active:available"))
            .query_async(conn)
            .await
            .expect("PUBSUB NUMSUB");
        count
    }

    /// Waits until one client that was not in `known` is subscribed to the
    /// queue's wake channel; its id.
    async fn new_subscriber(
        conn: &mut redis::aio::MultiplexedConnection,
        name: &str,
        known: &HashSet<String>,
    ) -> String {
        let started = Instant::now();
        loop {
            let new: Vec<_> = pubsub_clients(conn)
                .await
                .difference(known)
                .cloned()
                .collect();
            if let [id] = new.as_slice()
                && subscribers(conn, name).await == 1
            {
                return id.clone();
            }
            assert!(
                started.elapsed() < SUBSCRIBE_BOUND,
                "no worker subscribed to the queue's wake channel within {SUBSCRIBE_BOUND:?} \
                 (new pub/sub clients: {new:?})"
            );
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }

    /// A worker polling every [`SLOW_POLL`] on its own queue handle.
    async fn slow_worker(url: &str, name: &str, recorder: &RecordingSink) -> WorkerHandle {
        let queue: RedisQueue = RedisQueue::builder(name)
            .lease(SLOW_POLL, 3)
            .connect(url)
            .await
            .expect("connect the worker's queue");
        ThroughTaskQueue::new(queue)
            .layer(recorder.clone())
            .worker()
            .poll_interval(SLOW_POLL)
            .spawn()
    }

    /// Publishes one event through a queue handle of its own (as another
    /// process would) and waits for it at `recorder`.
    async fn publish_elsewhere(url: &str, name: &str, recorder: &RecordingSink, n: usize) {
        let queue: RedisQueue = RedisQueue::connect(url, name)
            .await
            .expect("connect the publisher's queue");
        let mut publisher = ThroughTaskQueue::new(queue).layer(NoopSink::new());
        publisher
            .publish(Event::new("test.xproc", json!(n)))
            .await
            .expect("publish");
        let arrived = recorder.wait_for(n, ARRIVAL_BOUND).await;
        assert!(
            arrived.is_ok(),
            "event {n} was not delivered within {ARRIVAL_BOUND:?}: nothing woke the idle \
             worker ({} attempts)",
            recorder.calls()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "needs EVENTSINK_REDIS_URL (a Redis server)"
    )]
    async fn redis_announcement_wakes_a_worker_of_another_handle() {
        let url = backend_url("EVENTSINK_REDIS_URL");
        let name = unique_name("xproc-wake");
        let _alone = PUBSUB_CLIENTS.lock().await;
        let mut conn = redis(&url).await;
        let known = pubsub_clients(&mut conn).await;
        let recorder: RecordingSink<Value> = RecordingSink::new();
        let worker = slow_worker(&url, &name, &recorder).await;
        new_subscriber(&mut conn, &name, &known).await;
        publish_elsewhere(&url, &name, &recorder, 1).await;
        publish_elsewhere(&url, &name, &recorder, 2).await;
        worker.shutdown().await;
        delete_redis_keys(&url, &[name]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "needs EVENTSINK_REDIS_URL (a Redis server)"
    )]
    async fn redis_worker_subscribes_again_after_its_connection_drops() {
        let url = backend_url("EVENTSINK_REDIS_URL");
        let name = unique_name("xproc-resubscribe");
        let _alone = PUBSUB_CLIENTS.lock().await;
        let mut conn = redis(&url).await;
        let mut known = pubsub_clients(&mut conn).await;
        let recorder: RecordingSink<Value> = RecordingSink::new();
        let worker = slow_worker(&url, &name, &recorder).await;
        let first = new_subscriber(&mut conn, &name, &known).await;
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(&first)
            .query_async(&mut conn)
            .await
            .expect("CLIENT KILL");
        assert_eq!(killed, 1, "the subscription's connection was closed");
        known.insert(first);
        new_subscriber(&mut conn, &name, &known).await;
        publish_elsewhere(&url, &name, &recorder, 1).await;
        worker.shutdown().await;
        delete_redis_keys(&url, &[name]).await;
    }

    /// A worker without a subscription (its queue attached to a connection
    /// manager) finds by polling what nobody announces: the retry of an event
    /// another handle published, stored due a second later (only jobs due now
    /// are announced, and the worker's heartbeat is 60 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "needs EVENTSINK_REDIS_URL (a Redis server)"
    )]
    async fn redis_worker_without_subscription_finds_jobs_by_polling() {
        let url = backend_url("EVENTSINK_REDIS_URL");
        let name = unique_name("xproc-poll");
        let conn = redis::Client::open(url.as_str())
            .expect("Redis URL")
            .get_connection_manager()
            .await
            .expect("connect to Redis");
        let queue: RedisQueue = RedisQueue::builder(&name).lease(SLOW_POLL, 3).attach(conn);
        let recorder: RecordingSink<Value> = RecordingSink::new();
        recorder.fail_next(1);
        let worker = ThroughTaskQueue::new(queue)
            .layer(recorder.clone())
            .worker()
            .schedule(RetrySchedule::fixed([Duration::from_secs(1)]))
            .spawn();
        publish_elsewhere(&url, &name, &recorder, 1).await;
        worker.shutdown().await;
        assert_eq!(recorder.calls(), 2, "one failure, then the retry");
        delete_redis_keys(&url, &[name]).await;
    }
}
