//! Pressure and outages where the publisher meets the queue's backend, and
//! a draining worker meets the others: a full queue shows in `poll_ready`,
//! a locked, hung or absent backend gives publishers a transient error
//! within the deadline, and a stopping worker keeps the lease of the jobs
//! it is still delivering. Real parts: a SQLite file locked by another
//! connection, and Postgres and Redis behind a loopback TCP proxy that the
//! test can hang or take down.
#![cfg(feature = "sqlite")]
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsink::queue::{QueueError, QueueWorker, SqliteQueue, ThroughTaskQueue};
use eventsink::{Event, RecordingSink, Retryable};
use futures::FutureExt;
use serde_json::json;
use sqlx::Connection;
use tokio::sync::{Semaphore, mpsc};
use tower::{Layer, Service, ServiceExt};

use support::Watchdog;

/// How much longer than its deadline a publish may take before the test
/// calls it a hang: a guard against hanging, not a timing claim.
const HANG_GUARD: Duration = Duration::from_secs(5);

/// A second connection holding SQLite's write lock (`BEGIN EXCLUSIVE`),
/// as another process writing a long transaction would.
struct WriteLock(sqlx::SqliteConnection);

impl WriteLock {
    async fn take(path: &Path) -> Self {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("second connection");
        sqlx::raw_sql("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .expect("take the write lock");
        WriteLock(conn)
    }

    async fn release(mut self) {
        sqlx::raw_sql("COMMIT")
            .execute(&mut self.0)
            .await
            .expect("release the write lock");
    }
}

fn events(kind: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event::new(kind, json!({ "n": i })))
        .collect()
}

/// Runs a worker until every id in `want` was delivered to `recorder`;
/// on failure, shows where the missing jobs are.
async fn deliver_all(queue: SqliteQueue, recorder: &RecordingSink, want: &HashSet<String>) {
    let worker = QueueWorker::new(queue.clone(), recorder.clone())
        .poll_interval(Duration::from_millis(10))
        .spawn();
    let arrived = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let got: HashSet<_> = recorder.events().iter().map(|e| e.id.to_string()).collect();
            if want.is_subset(&got) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    worker.shutdown().await;
    if arrived.is_err() {
        let got: HashSet<_> = recorder.events().iter().map(|e| e.id.to_string()).collect();
        let missing: Vec<_> = want.difference(&got).collect();
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT idempotency_key, status, lock_by FROM Jobs")
                .fetch_all(queue.pool())
                .await
                .expect("read jobs");
        let rows: Vec<_> = rows
            .iter()
            .filter(|(key, ..)| missing.iter().any(|id| key.contains(id.as_str())))
            .collect();
        panic!("published with Ok but not delivered: {missing:?}; their jobs: {rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_makes_poll_ready_pending_and_load_shed_sheds() {
    let _watchdog = Watchdog::new(Duration::from_secs(120), "full queue test hung");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q.db");
    // The backend waits as long as the lock is held: a blocked backend.
    let queue: SqliteQueue = SqliteQueue::builder("full")
        .busy_timeout(Duration::from_secs(60))
        .open(&path)
        .await
        .expect("open");
    let recorder = RecordingSink::new();
    let sink = ThroughTaskQueue::new(queue.clone())
        .max_batch(2)
        .publish_timeout(Duration::from_secs(60))
        .layer(recorder.clone());
    let lock = WriteLock::take(&path).await;

    // Reserve slots while the service says it is ready, and publish.
    const GIVE_UP: usize = 10_000;
    let mut accepted = Vec::new();
    let mut publishes = tokio::task::JoinSet::new();
    while accepted.len() < GIVE_UP {
        let mut publisher = sink.clone();
        match publisher.ready().now_or_never() {
            Some(ready) => ready.expect("ready"),
            None => break,
        };
        let event = Event::new("test.full", json!(accepted.len()));
        accepted.push(event.id.to_string());
        publishes.spawn(publisher.call(event));
    }
    assert!(
        accepted.len() < GIVE_UP,
        "poll_ready was still Ready after {} publishes into a blocked backend: \
         readiness does not show the full queue",
        accepted.len()
    );
    assert_eq!(accepted.len(), 8, "max_batch(2) × 4 events held at most");
    assert!(
        sink.clone().ready().now_or_never().is_none(),
        "poll_ready is Pending while the queue is full"
    );
    let mut shed = tower::load_shed::LoadShed::new(sink.clone());
    let refused = shed
        .ready()
        .await
        .expect("LoadShed is ready")
        .call(Event::new("test.full", json!("shed")))
        .await
        .expect_err("a full queue sheds the publish");
    assert!(
        refused.is::<tower::load_shed::error::Overloaded>(),
        "LoadShed answered {refused}"
    );

    lock.release().await;
    while let Some(done) = publishes.join_next().await {
        done.expect("task")
            .expect("publish after the lock is released");
    }
    // Every publish that got Ok is delivered.
    deliver_all(queue, &recorder, &accepted.into_iter().collect()).await;
}

#[tokio::test]
async fn a_clone_starts_without_the_reserved_slot_and_call_without_poll_ready_works() {
    use eventsink::queue::MemoryQueue;
    let recorder = RecordingSink::new();
    // max_batch(1): 4 slots.
    let sink = ThroughTaskQueue::new(MemoryQueue::new("slots"))
        .max_batch(1)
        .layer(recorder.clone());
    let mut reserved = Vec::new();
    for _ in 0..4 {
        let mut publisher = sink.clone();
        publisher
            .ready()
            .now_or_never()
            .expect("a free slot")
            .expect("ready");
        reserved.push(publisher);
    }
    let mut clone = reserved[0].clone();
    assert!(
        clone.ready().now_or_never().is_none(),
        "a clone of a reserved service has no slot of its own while all are taken"
    );
    // A call without poll_ready waits for a slot, and publishes once one is
    // free; the reserved ones publish with theirs.
    let unready = tokio::spawn(
        sink.clone()
            .call(Event::new("test.slots", json!("unready"))),
    );
    for (n, mut publisher) in reserved.into_iter().enumerate() {
        publisher
            .call(Event::new("test.slots", json!(n)))
            .await
            .expect("publish with the reserved slot");
    }
    unready
        .await
        .expect("task")
        .expect("publish without poll_ready");
    drop(clone);
    let worker = sink.worker().spawn();
    recorder
        .wait_for(5, Duration::from_secs(10))
        .await
        .expect("all five delivered");
    worker.shutdown().await;

    // A batch size far too large for a semaphore is not a panic.
    let mut huge = ThroughTaskQueue::new(MemoryQueue::new("huge"))
        .max_batch(usize::MAX)
        .layer(RecordingSink::<serde_json::Value>::new());
    huge.ready().await.expect("ready");
    huge.call(Event::new("test.slots", json!("huge")))
        .await
        .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_sqlite_gives_publishers_a_timeout_within_the_deadline_then_ok_ones_are_delivered() {
    let _watchdog = Watchdog::new(Duration::from_secs(120), "locked SQLite test hung");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q.db");
    // SQLite's own busy timeout (5 s) is longer than the deadline.
    let queue: SqliteQueue = SqliteQueue::open(&path, "locked").await.expect("open");
    let deadline = Duration::from_secs(1);
    let recorder = RecordingSink::new();
    let sink = ThroughTaskQueue::new(queue.clone())
        .publish_timeout(deadline)
        .layer(recorder.clone());
    let mut stored = HashSet::new();
    for event in events("test.locked", 5) {
        stored.insert(event.id.to_string());
        sink.clone()
            .oneshot(event)
            .await
            .expect("publish before the lock");
    }

    let lock = WriteLock::take(&path).await;
    let mut publishes = tokio::task::JoinSet::new();
    for event in events("test.locked", 20) {
        let sink = sink.clone();
        publishes.spawn(async move {
            let started = Instant::now();
            (sink.oneshot(event).await, started.elapsed())
        });
    }
    while let Some(done) = tokio::time::timeout(deadline + HANG_GUARD, publishes.join_next())
        .await
        .expect("a publisher still waits long after its deadline: the publish hangs")
    {
        let (result, took) = done.expect("task");
        let err = result.expect_err("no publish can succeed while the file is locked");
        assert!(
            matches!(err, QueueError::Timeout { .. }),
            "expected the deadline's error, got: {err}"
        );
        assert!(err.is_retryable());
        assert!(took < deadline + HANG_GUARD, "answered after {took:?}");
    }
    // The lock was held past every publisher's deadline.
    lock.release().await;

    for event in events("test.locked", 5) {
        stored.insert(event.id.to_string());
        sink.clone()
            .oneshot(event)
            .await
            .expect("publish after the lock");
    }
    deliver_all(queue, &recorder, &stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_error_fails_the_whole_batch_at_once() {
    let _watchdog = Watchdog::new(Duration::from_secs(120), "failed batch test hung");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q.db");
    let busy = Duration::from_millis(500);
    let queue: SqliteQueue = SqliteQueue::builder("batch")
        .busy_timeout(busy)
        .open(&path)
        .await
        .expect("open");
    let sink = ThroughTaskQueue::new(queue).layer(RecordingSink::<serde_json::Value>::new());
    let lock = WriteLock::take(&path).await;
    // 64 publishers land in one or two batches; one at a time, the
    // locked file would hold the last of them for 64 × 500 ms.
    let mut publishes = tokio::task::JoinSet::new();
    for event in events("test.batch", 64) {
        publishes.spawn(sink.clone().oneshot(event));
    }
    let guard = 2 * busy + HANG_GUARD;
    while let Some(done) = tokio::time::timeout(guard, publishes.join_next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a publisher still waits {guard:?} after the backend failed: \
                 the failed batch is retried one job at a time"
            )
        })
    {
        let err = done.expect("task").expect_err("the file is locked");
        assert!(
            matches!(err, QueueError::Backend { .. }),
            "expected the backend's error (database is locked), got: {err}"
        );
        assert!(err.is_retryable());
    }
    lock.release().await;
}

/// A job that the sink of worker `a` is delivering when `a` is told to
/// stop; worker `b`, another instance on the same file, starts next to it.
/// `b` must not deliver the job while `a` is still finishing it: `a`
/// keeps its lease while it drains, or, if it cannot renew it, drops the
/// delivery before the lease lapses (then `b` delivers it again, after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_worker_keeps_its_lease_so_no_other_worker_takes_its_job() {
    const HEARTBEAT_SECS: u64 = 2;
    const LEASE_BEATS: usize = 3;
    let _watchdog = Watchdog::new(Duration::from_secs(120), "drain test hung");
    let tmp = tempfile::tempdir().unwrap();
    // A 6 s lease (2 s heartbeat × 3), far shorter than the drain below.
    let (queue_a, queue_b) = two_handles(
        &tmp.path().join("q.db"),
        "drain",
        HEARTBEAT_SECS,
        LEASE_BEATS,
    )
    .await;

    let (started_tx, mut started) = mpsc::unbounded_channel::<(&'static str, String)>();
    let release = Arc::new(Semaphore::new(0));
    let a_delivering = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let (started_tx, release) = (started_tx.clone(), Arc::clone(&release));
        let a_delivering = Arc::clone(&a_delivering);
        tower::service_fn(move |event: Event| {
            let (started_tx, release) = (started_tx.clone(), Arc::clone(&release));
            let delivering = Delivering::new(&a_delivering);
            async move {
                let _delivering = delivering;
                let _ = started_tx.send(("a", event.id.to_string()));
                let _permit = release.acquire().await.expect("not closed");
                Ok::<(), eventsink::Error>(())
            }
        })
    };
    let quick = reports_as_b(started_tx);

    let event = Event::new("test.drain", json!(1));
    ThroughTaskQueue::new(queue_a.clone())
        .layer(slow.clone())
        .oneshot(event.clone())
        .await
        .expect("publish");
    // a polls rarely and beats every 2 s.
    let a = QueueWorker::new(queue_a.clone(), slow)
        .attempt_timeout(Duration::from_secs(60))
        .poll_interval(Duration::from_secs(2))
        .spawn();
    assert_eq!(
        started.recv().await,
        Some(("a", event.id.to_string())),
        "a delivers first"
    );
    let (a_name,): (String,) = sqlx::query_as(
        "SELECT lock_by FROM Jobs WHERE job_type = 'drain' AND status IN ('Queued', 'Running')",
    )
    .fetch_one(queue_a.pool())
    .await
    .expect("the job is leased to a");

    let stop_second = unix_now();
    let a_stopped = tokio::spawn(a.shutdown());
    let b = QueueWorker::new(queue_b.clone(), quick)
        .poll_interval(Duration::from_millis(50))
        .spawn();
    // Wait until b has sent heartbeats past the moment a's lease would
    // have lapsed without a's own heartbeats (each of b's heartbeats takes
    // over the jobs of workers silent for the lease), and then one more.
    let past_lease = stop_second + (HEARTBEAT_SECS as i64) * (LEASE_BEATS as i64 + 1);
    loop {
        let (b_seen,): (Option<i64>,) = sqlx::query_as(
            "SELECT MAX(last_seen) FROM Workers WHERE worker_type = 'drain' AND id != ?",
        )
        .bind(&a_name)
        .fetch_one(queue_b.pool())
        .await
        .expect("read workers");
        if b_seen.is_some_and(|seen| seen >= past_lease) {
            break;
        }
        if let Ok((who, id)) = started.try_recv() {
            if !a_delivering.load(std::sync::atomic::Ordering::SeqCst) {
                // a gave up its drain (it could not renew its lease) and
                // dropped the delivery first: b delivering now is a
                // duplicate, not a concurrent run.
                assert!(a_stopped.await.is_ok(), "a stops");
                assert_eq!((who, id), ("b", event.id.to_string()));
                b.shutdown().await;
                return;
            }
            let (a_seen,): (i64,) = sqlx::query_as("SELECT last_seen FROM Workers WHERE id = ?")
                .bind(&a_name)
                .fetch_one(queue_b.pool())
                .await
                .expect("read workers");
            panic!(
                "worker {who} started delivering {id} while worker a was still delivering it \
                 (a stopped at {stop_second}, a's last heartbeat at {a_seen}, now {})",
                unix_now()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if a_stopped.is_finished() || !a_delivering.load(std::sync::atomic::Ordering::SeqCst) {
        // a gave up its drain before its lease could lapse: b delivers the
        // job again, after a dropped it.
        let next = tokio::time::timeout(Duration::from_secs(30), started.recv()).await;
        assert_eq!(
            next.expect("b delivers the job a gave up"),
            Some(("b", event.id.to_string()))
        );
        assert!(!a_delivering.load(std::sync::atomic::Ordering::SeqCst));
        b.shutdown().await;
        return;
    }
    if let Ok((who, id)) = started.try_recv() {
        panic!(
            "worker {who} started delivering {id} while worker a was still delivering it: \
             a's lease lapsed during its drain"
        );
    }

    release.add_permits(1);
    a_stopped.await.expect("a stops");
    let (status,): (String,) = sqlx::query_as("SELECT status FROM Jobs WHERE job_type = 'drain'")
        .fetch_one(queue_b.pool())
        .await
        .expect("the job");
    assert_eq!(status, "Done", "a's delivery was recorded");
    b.shutdown().await;
    assert!(
        started.try_recv().is_err(),
        "the job was delivered again after a finished it"
    );
}

/// `support::lease::busy_worker_keeps_its_lease` on a SQLite file, with a
/// 3 s lease (1 s heartbeat × 3), far shorter than a's delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_keeps_its_lease_while_fetched_jobs_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let (queue_a, queue_b) = two_handles(&tmp.path().join("q.db"), "busy", 1, 3).await;
    let pool = queue_b.pool().clone();
    let held = {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move {
                let (held,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM Jobs WHERE job_type = 'busy' \
                     AND status IN ('Queued', 'Running')",
                )
                .fetch_one(&pool)
                .await
                .expect("jobs");
                usize::try_from(held).expect("a count")
            }
            .boxed()
        }
    };
    let idle_seen = move || {
        let pool = pool.clone();
        async move {
            let (seen,): (Option<i64>,) = sqlx::query_as(
                "SELECT MAX(last_seen) FROM Workers WHERE worker_type = 'busy' AND id NOT IN \
                 (SELECT lock_by FROM Jobs WHERE job_type = 'busy' AND lock_by IS NOT NULL)",
            )
            .fetch_one(&pool)
            .await
            .expect("read workers");
            seen.map(|s| s as f64)
        }
        .boxed()
    };
    let probe = support::lease::Probe {
        held: Box::new(held),
        idle_seen: Box::new(idle_seen),
    };
    support::lease::busy_worker_keeps_its_lease(queue_a, queue_b, Duration::from_secs(1), 3, probe)
        .await;
}

/// Two handles (two workers' instances) of the queue `name` in the SQLite
/// file `path`, with a lease of `beats` heartbeats of `heartbeat_secs`.
async fn two_handles(
    path: &Path,
    name: &str,
    heartbeat_secs: u64,
    beats: usize,
) -> (SqliteQueue, SqliteQueue) {
    let open = || async {
        SqliteQueue::builder(name)
            .lease(Duration::from_secs(heartbeat_secs), beats)
            .open(path)
            .await
            .expect("open")
    };
    (open().await, open().await)
}

/// A sink for worker `b`: reports each delivery it starts on `started`.
fn reports_as_b(
    started: mpsc::UnboundedSender<(&'static str, String)>,
) -> impl Service<Event, Response = (), Error = eventsink::Error, Future: Send> + Clone + Send {
    tower::service_fn(move |event: Event| {
        let started = started.clone();
        async move {
            let _ = started.send(("b", event.id.to_string()));
            Ok::<(), eventsink::Error>(())
        }
    })
}

/// Marks a delivery of worker `a` as running for as long as it lives
/// (its future finishing or being dropped ends it).
struct Delivering(Arc<std::sync::atomic::AtomicBool>);

impl Delivering {
    fn new(flag: &Arc<std::sync::atomic::AtomicBool>) -> Self {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Delivering(Arc::clone(flag))
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A loopback TCP proxy in front of a real server, which the test can
/// hang (connections stay open, nothing is forwarded: a hung server) or
/// take down (connections closed, new ones refused: a dead server).
#[cfg(any(feature = "postgres", feature = "redis"))]
mod proxy {
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        Forward,
        Hang,
        Down,
    }

    pub struct Proxy {
        pub addr: std::net::SocketAddr,
        mode: watch::Sender<Mode>,
    }

    impl Proxy {
        pub async fn start(upstream: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let addr = listener.local_addr().unwrap();
            let (mode, modes) = watch::channel(Mode::Forward);
            tokio::spawn(async move {
                let mut down = modes.clone();
                loop {
                    let accepted = tokio::select! {
                        accepted = listener.accept() => accepted,
                        _ = down.wait_for(|m| *m == Mode::Down) => return,
                    };
                    let Ok((client, _)) = accepted else { return };
                    tokio::spawn(pump(client, upstream.clone(), modes.clone()));
                }
            });
            Proxy { addr, mode }
        }

        pub fn set(&self, mode: Mode) {
            self.mode.send_replace(mode);
        }

        /// `url` with its host and port replaced by the proxy's.
        pub fn url(&self, url: &str) -> String {
            let (scheme, rest) = url.split_once("://").expect("a URL");
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let user = authority
                .rfind('@')
                .map(|at| &authority[..=at])
                .unwrap_or("");
            format!("{scheme}://{user}{}{path}", self.addr)
        }
    }

    /// The `host:port` of `url`.
    pub fn upstream(url: &str, default_port: u16) -> String {
        let rest = url.split_once("://").expect("a URL").1;
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        let host = &authority[authority.rfind('@').map_or(0, |at| at + 1)..];
        if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:{default_port}")
        }
    }

    async fn pump(mut client: TcpStream, upstream: String, mut mode: watch::Receiver<Mode>) {
        if *mode.borrow() == Mode::Forward {
            let Ok(mut server) = TcpStream::connect(&upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                _ = mode.wait_for(|m| *m != Mode::Forward) => {}
            }
            // Hung: keep both ends open, forward nothing, until down.
            let _ = mode.wait_for(|m| *m == Mode::Down).await;
            drop(server);
        } else {
            let _ = mode.wait_for(|m| *m == Mode::Down).await;
        }
        drop(client);
    }
}

/// Publishes while the proxy is hung, then while it is down: each time
/// the publisher gets a transient error within the deadline.
#[cfg(any(feature = "postgres", feature = "redis"))]
async fn outage_gives_transient_errors<B>(backend: B, proxy: &proxy::Proxy)
where
    B: eventsink::queue::QueueBackend<serde_json::Value>,
{
    let deadline = Duration::from_secs(2);
    let sink = ThroughTaskQueue::new(backend)
        .publish_timeout(deadline)
        .layer(eventsink::NoopSink::new());
    sink.clone()
        .oneshot(Event::new("test.outage", json!("before")))
        .await
        .expect("publish through the proxy");
    for (mode, what) in [
        (proxy::Mode::Hang, "a hung backend"),
        (proxy::Mode::Down, "a dead backend"),
    ] {
        proxy.set(mode);
        let publish = sink.clone().oneshot(Event::new("test.outage", json!(what)));
        let err = tokio::time::timeout(deadline + HANG_GUARD, publish)
            .await
            .unwrap_or_else(|_| panic!("publishing to {what} hangs past its deadline"))
            .expect_err("nothing can be stored");
        assert!(err.is_retryable(), "{what}: {err}");
        println!("{what}: {err}");
    }
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_outage_gives_publishers_a_transient_error_within_the_deadline() {
    let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
    let _watchdog = Watchdog::new(Duration::from_secs(60), "Redis outage test hung");
    let proxy = proxy::Proxy::start(proxy::upstream(&url, 6379)).await;
    let name = support::queue::unique_name("redis-outage");
    let queue: eventsink::queue::RedisQueue =
        eventsink::queue::RedisQueue::connect(&proxy.url(&url), &name)
            .await
            .expect("connect through the proxy");
    outage_gives_transient_errors(queue, &proxy).await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_outage_gives_publishers_a_transient_error_within_the_deadline() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let _watchdog = Watchdog::new(Duration::from_secs(60), "Postgres outage test hung");
    let proxy = proxy::Proxy::start(proxy::upstream(&url, 5432)).await;
    let name = support::queue::unique_name("pg-outage");
    let queue: eventsink::queue::PostgresQueue =
        eventsink::queue::PostgresQueue::connect(&proxy.url(&url), &name)
            .await
            .expect("connect through the proxy");
    outage_gives_transient_errors(queue, &proxy).await;
    if let Ok(pool) = sqlx::PgPool::connect(&url).await {
        let _ = sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
            .bind(&name)
            .execute(&pool)
            .await;
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_pool_on_a_dead_port_fails_fast() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let _watchdog = Watchdog::new(Duration::from_secs(60), "dead Postgres port test hung");
    // A pool whose connections all die once the proxy is down, and that
    // cannot open new ones: acquiring fails after the acquire timeout.
    let proxy = proxy::Proxy::start(proxy::upstream(&url, 5432)).await;
    let name = support::queue::unique_name("pg-dead");
    let queue: eventsink::queue::PostgresQueue =
        eventsink::queue::PostgresQueue::connect(&proxy.url(&url), &name)
            .await
            .expect("connect through the proxy");
    proxy.set(proxy::Mode::Down);
    // A deadline far above the acquire timeout: the pool's own error.
    let sink = ThroughTaskQueue::new(queue)
        .publish_timeout(Duration::from_secs(30))
        .layer(eventsink::NoopSink::new());
    let guard = eventsink::queue::POSTGRES_ACQUIRE_TIMEOUT + HANG_GUARD;
    let err = tokio::time::timeout(guard, sink.oneshot(Event::new("test.dead", json!(1))))
        .await
        .expect("the pool gives up within its acquire timeout")
        .expect_err("nothing can be stored");
    assert!(
        matches!(err, QueueError::Backend { .. }),
        "expected the pool's error, got: {err}"
    );
    println!("dead Postgres: {err}");
}

/// A publisher that waited for a slot and then is held ready (a fan-out
/// holds every destination ready while events go elsewhere) gets the time
/// it had left when the call comes, not a deadline that passed meanwhile.
#[tokio::test(start_paused = true)]
async fn a_publisher_held_ready_after_waiting_keeps_the_time_it_had_left() {
    use eventsink::queue::MemoryQueue;
    const TIMEOUT: Duration = Duration::from_secs(1);
    let recorder = RecordingSink::<serde_json::Value>::new();
    // max_batch(1): 4 slots.
    let sink = ThroughTaskQueue::new(MemoryQueue::new("held"))
        .max_batch(1)
        .publish_timeout(TIMEOUT)
        .layer(recorder.clone());
    let mut reserved = Vec::new();
    for _ in 0..4 {
        let mut publisher = sink.clone();
        publisher
            .ready()
            .now_or_never()
            .expect("a free slot")
            .expect("ready");
        reserved.push(publisher);
    }
    let mut waiting = sink.clone();
    assert!(
        waiting.ready().now_or_never().is_none(),
        "all four slots are reserved: the fifth waits"
    );
    drop(reserved.pop());
    waiting.ready().await.expect("ready once a slot is free");
    tokio::time::advance(TIMEOUT * 3).await;
    waiting
        .call(Event::new("test.held", json!("late")))
        .await
        .expect("a publisher held ready publishes when called");
}
