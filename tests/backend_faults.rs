//! The backend fails under a running queue: Redis restarted, Postgres
//! connections killed, the SQLite file held by another writer, and a
//! publish flood while Redis is down for 20 s. Publishers and the worker
//! recover by themselves, every publish answers within its deadline (`Ok`
//! or a transient error), and every event whose publish returned `Ok` is
//! delivered. Each test prints what it measured (`FAULTS …` lines; run
//! with `--nocapture` to see them).
//!
//! The tests run one at a time (they share a lock): the flood measures the
//! process' RSS, which the others would disturb.
#![cfg(all(feature = "sqlite", feature = "test-util"))]
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsink::queue::{Published, QueueBackend, ThroughTaskQueue, WorkerHandle};
use eventsink::{BoxError, Event, RecordingSink, Retryable};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::load_shed::LoadShedLayer;
use tower::load_shed::error::Overloaded;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// One test at a time: the flood's RSS must be its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a publish may take past its deadline before it counts as hung:
/// room for a loaded machine, less than a second deadline.
const HANG_MARGIN: Duration = Duration::from_secs(2);

/// How long the accepted events may take to arrive once the backend is
/// back: the worker's restart backoff (up to 30 s) plus the drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a phase of a test may wait for publishers or the worker to
/// move on (make progress, or notice the fault).
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the publishers saw: the ids of the events whose publish returned
/// `Ok`, and the errors (all transient, or the publisher panics).
#[derive(Default)]
struct Tally {
    accepted: Mutex<HashSet<String>>,
    accepted_count: watch::Sender<usize>,
    errors: watch::Sender<usize>,
    last_error: Mutex<Option<String>>,
    /// Publishes answered `Overloaded` at once by `load_shed` (flood only).
    shed: AtomicUsize,
    /// The longest time a publish took to answer.
    longest: Mutex<Duration>,
}

impl Tally {
    fn accept(&self, id: String) {
        self.accepted.lock().unwrap().insert(id);
        self.accepted_count.send_modify(|n| *n += 1);
    }

    /// Records a publish's answer; panics on a permanent error.
    fn answer<E>(&self, id: String, took: Duration, outcome: Result<Published, E>)
    where
        E: Retryable + std::fmt::Display + Into<BoxError>,
    {
        let mut longest = self.longest.lock().unwrap();
        *longest = (*longest).max(took);
        drop(longest);
        match outcome {
            Ok(_) => self.accept(id),
            Err(err) => {
                assert!(err.is_retryable(), "a fault must be transient: {err}");
                let err: BoxError = err.into();
                if err.is::<Overloaded>() {
                    self.shed.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.fail(&*err);
                }
            }
        }
    }

    fn fail(&self, err: &(dyn std::error::Error + 'static)) {
        let mut chain = err.to_string();
        let mut cause = err.source();
        while let Some(c) = cause {
            chain = format!("{chain}: {c}");
            cause = c.source();
        }
        *self.last_error.lock().unwrap() = Some(chain);
        self.errors.send_modify(|n| *n += 1);
    }

    /// Accepted, failed and shed publishes so far.
    fn counts(&self) -> Counts {
        Counts(
            self.accepted(),
            self.errors(),
            self.shed.load(Ordering::Relaxed),
        )
    }

    fn accepted(&self) -> usize {
        *self.accepted_count.borrow()
    }

    fn errors(&self) -> usize {
        *self.errors.borrow()
    }

    /// Waits until `count` (one of the tally's counters) reaches `n`.
    async fn reach(&self, count: &watch::Sender<usize>, n: usize, what: &str) {
        let mut rx = count.subscribe();
        let reached = tokio::time::timeout(PHASE_TIMEOUT, rx.wait_for(|&c| c >= n)).await;
        assert!(
            reached.is_ok(),
            "{what}: {} of {n} after {PHASE_TIMEOUT:?}",
            *count.borrow()
        );
    }
}

/// Accepted, failed and shed publishes.
#[derive(Debug, Clone, Copy)]
struct Counts(usize, usize, usize);

impl Counts {
    fn since(self, earlier: Counts) -> Counts {
        Counts(self.0 - earlier.0, self.1 - earlier.1, self.2 - earlier.2)
    }
}

/// Publishers that keep publishing, each event under a new id, until
/// stopped.
struct Load {
    tally: Arc<Tally>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Load {
    /// `publishers` tasks, each publishing one event, then pausing `pace`.
    fn start<B>(queue: &ThroughTaskQueue<B>, publishers: usize, pace: Duration) -> Load
    where
        B: QueueBackend<Value> + Clone,
    {
        let (tally, stop) = (Arc::new(Tally::default()), watch::channel(false).0);
        let mut tasks = JoinSet::new();
        for who in 0..publishers {
            let sink = queue.layer(RecordingSink::<Value>::new());
            let (tally, stop) = (Arc::clone(&tally), stop.subscribe());
            tasks.spawn(async move {
                let mut n = 0;
                while !*stop.borrow() {
                    publish_once(sink.clone(), Arc::clone(&tally), format!("p{who}-{n}")).await;
                    n += 1;
                    tokio::time::sleep(pace).await;
                }
            });
        }
        Load { tally, stop, tasks }
    }

    /// An open-loop flood, as a server's requests arrive: one publish every
    /// `every`, each on a task of its own, its ids starting with `prefix`.
    /// With `shed`, through `load_shed` as the module docs advise (a full
    /// group commit answers `Overloaded` at once); without, each publish
    /// waits for a slot, within its deadline.
    fn flood<B>(queue: &ThroughTaskQueue<B>, every: Duration, prefix: &str, shed: bool) -> Load
    where
        B: QueueBackend<Value> + Clone,
    {
        let (tally, stop) = (Arc::new(Tally::default()), watch::channel(false).0);
        let service = ServiceBuilder::new()
            .option_layer(shed.then(LoadShedLayer::new))
            .map_err(Into::<BoxError>::into)
            .service(queue.layer(RecordingSink::<Value>::new()));
        let prefix = prefix.to_owned();
        let (spawner_tally, stopped) = (Arc::clone(&tally), stop.subscribe());
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut publishes = JoinSet::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            for n in 0.. {
                if *stopped.borrow() {
                    break;
                }
                tick.tick().await;
                let (service, tally) = (service.clone(), Arc::clone(&spawner_tally));
                publishes.spawn(publish_once(service, tally, format!("{prefix}-{n}")));
                while let Some(done) = publishes.try_join_next() {
                    done.expect("a publish task");
                }
            }
            while let Some(done) = publishes.join_next().await {
                done.expect("a publish task");
            }
        });
        Load { tally, stop, tasks }
    }

    /// Stops the publishers; the ids they saw accepted.
    async fn stop(mut self) -> (HashSet<String>, Arc<Tally>) {
        self.stop.send_replace(true);
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        let accepted = self.tally.accepted.lock().unwrap().clone();
        (accepted, self.tally)
    }
}

/// One publish, which must answer within its deadline.
async fn publish_once<S>(service: S, tally: Arc<Tally>, id: String)
where
    S: Service<Event<Value>, Response = Published>,
    S::Error: Retryable + std::fmt::Display + Into<BoxError>,
{
    let deadline = PUBLISH_TIMEOUT + HANG_MARGIN;
    let event = Event::with_id("fault.test", id.clone(), json!({"id": id}));
    let started = Instant::now();
    let outcome = tokio::time::timeout(deadline, service.oneshot(event))
        .await
        .unwrap_or_else(|_| panic!("publish {id} still running after {deadline:?}"));
    tally.answer(id, started.elapsed(), outcome);
}

/// Waits until every id of `accepted` has been delivered to `recorder`;
/// the number of distinct ids delivered and of duplicate deliveries.
async fn all_delivered(
    recorder: &RecordingSink<Value>,
    accepted: &HashSet<String>,
) -> (usize, usize) {
    let until = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let events = recorder.events();
        let got: HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
        let missing = accepted.iter().filter(|id| !got.contains(*id)).count();
        if missing == 0 {
            return (got.len(), events.len() - got.len());
        }
        let left = until.saturating_duration_since(Instant::now());
        if recorder.wait_for(events.len() + 1, left).await.is_err() {
            let example = accepted.iter().find(|id| !got.contains(*id));
            panic!(
                "LOST: {missing} of {} accepted events not delivered after {DRAIN_TIMEOUT:?} \
                 (e.g. {example:?})",
                accepted.len()
            );
        }
    }
}

/// Waits until `recorder` has at least `n` deliveries.
async fn deliveries(recorder: &RecordingSink<Value>, n: usize, what: &str) {
    if let Err(e) = recorder.wait_for(n, PHASE_TIMEOUT).await {
        panic!("{what}: {e}");
    }
}

/// The resident set size of this process, from /proc/self/status, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line in /proc/self/status")
}

/// The publish deadline of every queue in these tests: shorter than the
/// default (15 s) so that a flood's timeouts come back within the outage.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);

fn queue<B>(backend: B) -> ThroughTaskQueue<B> {
    ThroughTaskQueue::new(backend).publish_timeout(PUBLISH_TIMEOUT)
}

fn worker<B: QueueBackend<Value> + Clone>(
    queue: &ThroughTaskQueue<B>,
    recorder: &RecordingSink<Value>,
) -> WorkerHandle {
    queue
        .worker(recorder.clone())
        .poll_interval(Duration::from_millis(10))
        .spawn()
}

// ---------------------------------------------------------------- SQLite

/// Another connection holds the file's write lock (`BEGIN IMMEDIATE`)
/// longer than the busy timeout: publishes fail with a transient error
/// (not a hang), and after the release publishers and the worker go on;
/// nothing accepted is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_held_by_another_writer() {
    use sqlx::Connection;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("faults.db");
    let busy = Duration::from_millis(500);
    let backend = eventsink::queue::SqliteQueue::builder("faults")
        .busy_timeout(busy)
        .open(&path)
        .await
        .expect("open the queue");
    let queue = queue(backend);
    let recorder = RecordingSink::new();
    let handle = worker(&queue, &recorder);
    let load = Load::start(&queue, 8, Duration::from_millis(5));
    deliveries(&recorder, 200, "deliveries before the lock").await;

    let mut holder = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
        .await
        .expect("a second connection");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("take the write lock");
    let held = Instant::now();
    let errors_before = load.tally.errors();
    load.tally
        .reach(
            &load.tally.errors,
            errors_before + 8,
            "publish errors while locked",
        )
        .await;
    let held_for = held.elapsed();
    let during = (load.tally.accepted(), recorder.events().len());
    sqlx::raw_sql("COMMIT")
        .execute(&mut holder)
        .await
        .expect("release the write lock");
    let last_error = load.tally.last_error.lock().unwrap().clone();

    let after = load.tally.accepted() + 200;
    load.tally
        .reach(
            &load.tally.accepted_count,
            after,
            "publishes after the release",
        )
        .await;
    let (accepted, tally) = load.stop().await;
    let (unique, duplicates) = all_delivered(&recorder, &accepted).await;
    let restarts = handle.restarts();
    handle.shutdown().await;
    println!(
        "FAULTS sqlite_locked: held {held_for:?} (busy timeout {busy:?}); accepted {}, \
         publish errors {}, accepted/delivered at release {during:?}, delivered unique {unique}, \
         duplicates {duplicates}, worker restarts {restarts}, longest publish {:?}; last error: {last_error:?}",
        accepted.len(),
        tally.errors(),
        tally.longest.lock().unwrap(),
    );
    let last_error = last_error.expect("an error while locked");
    assert!(
        last_error.contains("database is locked"),
        "the error says the file is locked: {last_error}"
    );
}

// ---------------------------------------------------------------- Postgres

/// The pool's connections are killed (`pg_terminate_backend`) three times
/// during a run: publishers and the worker reconnect; nothing accepted is
/// lost.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_connections_killed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let name = support::queue::unique_name("pg-faults");
    // Only the queue's connections carry this name.
    let app = format!("eventsink-{name}");
    let sep = if url.contains('?') { '&' } else { '?' };
    let backend = eventsink::queue::PostgresQueue::connect(
        &format!("{url}{sep}application_name={app}"),
        &name,
    )
    .await
    .expect("connect the queue");
    let admin = sqlx::PgPool::connect(&url).await.expect("admin connection");
    let queue = queue(backend);
    let recorder = RecordingSink::new();
    let handle = worker(&queue, &recorder);
    let load = Load::start(&queue, 8, Duration::from_millis(5));

    let mut killed = Vec::new();
    for round in 1..=3 {
        deliveries(&recorder, 300 * round, "deliveries between kills").await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()) AS t",
        )
        .bind(&app)
        .fetch_one(&admin)
        .await
        .expect("terminate the queue's connections");
        assert!(n > 0, "the queue had connections to kill");
        killed.push(n);
    }
    let after = load.tally.accepted() + 300;
    load.tally
        .reach(
            &load.tally.accepted_count,
            after,
            "publishes after the last kill",
        )
        .await;
    let (accepted, tally) = load.stop().await;
    let (unique, duplicates) = all_delivered(&recorder, &accepted).await;
    let restarts = handle.restarts();
    handle.shutdown().await;
    support::queue::delete_postgres_rows(&url, &[name]).await;
    println!(
        "FAULTS postgres_killed: connections killed per round {killed:?}; accepted {}, \
         publish errors {}, delivered unique {unique}, duplicates {duplicates}, \
         worker restarts {restarts}, longest publish {:?}; last error: {:?}",
        accepted.len(),
        tally.errors(),
        tally.longest.lock().unwrap(),
        tally.last_error.lock().unwrap(),
    );
}

// ---------------------------------------------------------------- Redis

/// A `redis-server` of the test's own, on a free loopback port, with AOF
/// fsynced on every write (without it a restart loses what Redis held).
#[cfg(feature = "redis")]
struct OwnRedis {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

#[cfg(feature = "redis")]
impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Self::spawn(port, &dir).await;
        OwnRedis { child, port, dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: what was fsynced is all that is kept).
    async fn kill(&mut self) {
        self.child.kill().await.expect("kill redis-server");
    }

    /// Starts the server again on the same port and directory.
    async fn restart(&mut self) {
        self.child = Self::spawn(self.port, &self.dir).await;
    }

    /// Starts `redis-server` and waits until it says it accepts connections.
    async fn spawn(port: u16, dir: &tempfile::TempDir) -> tokio::process::Child {
        use tokio::io::AsyncBufReadExt;

        let mut child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (install Redis to run this test)");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(PHASE_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.expect("read redis-server's log") {
                if line.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "redis-server on port {port} did not get ready"
        );
        // Keep reading its log so that the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        child
    }
}

/// Redis is killed mid-run and started again on the same port: publishers
/// get transient errors meanwhile, then succeed again; the worker
/// reconnects; nothing accepted is lost (AOF, `appendfsync always`).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_restarted_mid_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut redis = OwnRedis::start().await;
    let backend = eventsink::queue::RedisQueue::connect(&redis.url(), "faults")
        .await
        .expect("connect the queue");
    let queue = queue(backend);
    let recorder = RecordingSink::new();
    let handle = worker(&queue, &recorder);
    let load = Load::start(&queue, 8, Duration::from_millis(5));
    deliveries(&recorder, 300, "deliveries before the restart").await;

    redis.kill().await;
    let down = Instant::now();
    let errors = load.tally.errors();
    load.tally
        .reach(
            &load.tally.errors,
            errors + 8,
            "publish errors while Redis is down",
        )
        .await;
    redis.restart().await;
    let outage = down.elapsed();
    let delivered = recorder.events().len();
    let after = load.tally.accepted() + 300;
    load.tally
        .reach(
            &load.tally.accepted_count,
            after,
            "publishes after the restart",
        )
        .await;
    deliveries(&recorder, delivered + 300, "deliveries after the restart").await;
    let (accepted, tally) = load.stop().await;
    let (unique, duplicates) = all_delivered(&recorder, &accepted).await;
    let restarts = handle.restarts();
    handle.shutdown().await;
    println!(
        "FAULTS redis_restart: down {outage:?}; accepted {}, publish errors {}, delivered unique \
         {unique}, duplicates {duplicates}, worker restarts {restarts}, longest publish {:?}; last error: {:?}",
        accepted.len(),
        tally.errors(),
        tally.longest.lock().unwrap(),
        tally.last_error.lock().unwrap(),
    );
}

/// How long the flood's Redis stays down: what the issue asks.
#[cfg(feature = "redis")]
const OUTAGE: Duration = Duration::from_secs(20);

/// Publishers keep publishing while Redis is down for 20 s: memory stays
/// bounded, every publish answers `Ok` or a transient error within its
/// deadline, and everything accepted is delivered once Redis is back.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_publish_flood_during_an_outage() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut redis = OwnRedis::start().await;
    let backend = eventsink::queue::RedisQueue::connect(&redis.url(), "flood")
        .await
        .expect("connect the queue");
    let queue = queue(backend);
    let recorder = RecordingSink::new();
    let handle = worker(&queue, &recorder);
    let every = Duration::from_millis(2);
    let (shedding, waiting) = (
        Load::flood(&queue, every, "shed", true),
        Load::flood(&queue, every, "wait", false),
    );
    deliveries(&recorder, 1000, "deliveries before the outage").await;
    let rss_before = rss_kib();

    redis.kill().await;
    let at_kill = [shedding.tally.counts(), waiting.tally.counts()];
    let (peak, sampler) = rss_sampler();
    tokio::time::sleep(OUTAGE).await;
    let during = [
        shedding.tally.counts().since(at_kill[0]),
        waiting.tally.counts().since(at_kill[1]),
    ];
    sampler.abort();
    let rss_peak = *peak.borrow();
    redis.restart().await;

    for load in [&shedding, &waiting] {
        let after = load.tally.accepted() + 500;
        let what = "publishes after the outage";
        load.tally
            .reach(&load.tally.accepted_count, after, what)
            .await;
    }
    let (mut accepted, shed_tally) = shedding.stop().await;
    let (waited, wait_tally) = waiting.stop().await;
    accepted.extend(waited);
    let (unique, duplicates) = all_delivered(&recorder, &accepted).await;
    let rss_after = rss_kib();
    let restarts = handle.restarts();
    handle.shutdown().await;
    println!(
        "FAULTS redis_flood: outage {OUTAGE:?}, a publish every {every:?} through load_shed \
         and one every {every:?} without; RSS KiB before {rss_before}, peak during \
         {rss_peak}, after {rss_after}; during the outage (accepted, errors, shed): with \
         load_shed {:?}, without {:?}; in all: with load_shed {:?}, longest publish {:?}; \
         without {:?}, longest publish {:?}; accepted {}, delivered unique {unique}, \
         duplicates {duplicates}, worker restarts {restarts}; last error: {:?}",
        during[0],
        during[1],
        shed_tally.counts(),
        shed_tally.longest.lock().unwrap(),
        wait_tally.counts(),
        wait_tally.longest.lock().unwrap(),
        accepted.len(),
        wait_tally.last_error.lock().unwrap(),
    );
    for counts in during {
        assert_eq!(counts.0, 0, "nothing is accepted while Redis is down");
        assert!(
            counts.1 + counts.2 > 0,
            "publishes failed while Redis was down"
        );
    }
    // Generous: the group commit holds at most 1,024 events and each
    // publish waits at most its deadline; 64 MiB is far above what that
    // uses and far below an unbounded pile.
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_peak} KiB during the outage"
    );
}

/// Samples the RSS every 100 ms; the peak so far.
#[cfg(feature = "redis")]
fn rss_sampler() -> (watch::Receiver<u64>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(rss_kib());
    let task = tokio::spawn(async move {
        loop {
            let now = rss_kib();
            tx.send_modify(|peak| *peak = (*peak).max(now));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (rx, task)
}
