//! Worker processes: a worker killed with SIGKILL mid-delivery loses nothing
//! (per durable backend), and two worker processes share one queue.
//!
//! The worker processes are this test binary run again with
//! `EVENTSINK_CHILD_*` variables: `child_worker_process` then runs a worker
//! whose sink writes each event into an `FsSink` directory and prints
//! `DELIVERED <id>`; it stops gracefully when its stdin closes. The parent
//! reads those lines as its signal (no sleeps) and counts ids.
//!
//! SQLite runs under the default features; the Postgres and Redis tests
//! need their features and are ignored (with the reason) unless their URL
//! variable was set at build time (see `build.rs`).
#![cfg(feature = "sqlite")]
mod support;

#[cfg(any(feature = "postgres", feature = "redis"))]
use std::collections::HashMap;
use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

#[cfg(feature = "postgres")]
use eventsink::queue::PostgresQueue;
#[cfg(feature = "redis")]
use eventsink::queue::RedisQueue;
use eventsink::queue::{QueueBackend, QueueWorker, SqliteQueue, ThroughTaskQueue};
use eventsink::{Event, FsSink, NoopSink, SinkExt};
use serde_json::{Value, json};
#[cfg(any(feature = "postgres", feature = "redis"))]
use support::queue::backend_url;
use support::queue::unique_name;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tower::Layer;

/// Events in the crash test.
const CRASH_EVENTS: usize = 1_000;
/// Deliveries seen before the first worker is killed.
const KILL_AFTER: usize = 300;
/// Events shared by two worker processes.
#[cfg(any(feature = "postgres", feature = "redis"))]
const SHARED_EVENTS: usize = 2_000;
/// Short leases, so that the takeover is quick: 1 s heartbeat × 2.
const HEARTBEAT: Duration = Duration::from_secs(1);
const MISSED: usize = 2;
/// Deliveries at once in each child.
const CONCURRENCY: usize = 16;
/// Upper bound on any wait of the parent.
const PATIENCE: Duration = Duration::from_secs(90);

/// Where a child's queue is.
#[derive(Clone)]
enum Location {
    Sqlite(std::path::PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(String),
    #[cfg(feature = "redis")]
    Redis(String),
}

impl Location {
    fn env(&self) -> (&'static str, String) {
        match self {
            Location::Sqlite(path) => ("sqlite", path.display().to_string()),
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => ("postgres", url.clone()),
            #[cfg(feature = "redis")]
            Location::Redis(url) => ("redis", url.clone()),
        }
    }
}

/// The child process's body; does nothing in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_worker_process() {
    let Ok(backend) = std::env::var("EVENTSINK_CHILD_BACKEND") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let (location, queue, dir) = (
        var("EVENTSINK_CHILD_LOCATION"),
        var("EVENTSINK_CHILD_QUEUE"),
        var("EVENTSINK_CHILD_DIR"),
    );
    let delay = Duration::from_millis(var("EVENTSINK_CHILD_DELAY_MS").parse().unwrap());
    let files = FsSink::new(dir).expect("fs sink");
    let sink = tower::service_fn(move |event: Event| {
        let mut files = files.clone();
        async move {
            tokio::time::sleep(delay).await;
            files.publish(event.clone()).await?;
            println!("DELIVERED {}", event.id);
            Ok::<(), eventsink::Error>(())
        }
    });
    // Stops when the parent closes our stdin.
    let stop = async {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
    };
    crate::with_child_queue!(
        backend.as_str(),
        &queue,
        &location,
        (HEARTBEAT, MISSED),
        |q| run_child(q, sink, stop).await
    );
    println!("CHILD STOPPED");
}

async fn run_child<B, S>(queue: B, sink: S, stop: impl Future + Send)
where
    B: QueueBackend<Value>,
    S: eventsink::Sink<Value, Error = eventsink::Error, Future: Send> + Clone + Send + 'static,
{
    println!("CHILD READY");
    QueueWorker::new(queue, sink)
        .concurrency(CONCURRENCY)
        .poll_interval(Duration::from_millis(10))
        .run_until(stop)
        .await;
}

/// A running child worker and the ids it reported.
struct ChildWorker {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    delivered: Vec<String>,
}

impl ChildWorker {
    fn spawn(location: &Location, queue: &str, dir: &Path, delay_ms: u64) -> Self {
        let (backend, place) = location.env();
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "child_worker_process",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("EVENTSINK_CHILD_BACKEND", backend)
            .env("EVENTSINK_CHILD_LOCATION", place)
            .env("EVENTSINK_CHILD_QUEUE", queue)
            .env("EVENTSINK_CHILD_DIR", dir)
            .env("EVENTSINK_CHILD_DELAY_MS", delay_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn child worker");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        ChildWorker {
            child,
            lines,
            delivered: Vec::new(),
        }
    }

    /// Reads the child's output until `done(delivered so far)` holds.
    async fn read_until(&mut self, mut done: impl FnMut(&[String]) -> bool) {
        let read = async {
            while !done(&self.delivered) {
                match self.lines.next_line().await.expect("read child output") {
                    Some(line) => {
                        if let Some(id) = line.strip_prefix("DELIVERED ") {
                            self.delivered.push(id.to_owned());
                        }
                    }
                    None => panic!("child worker exited early"),
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .unwrap_or_else(|_| panic!("child delivered only {}", self.delivered.len()));
    }

    /// SIGKILL, then the lines it printed before dying.
    async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("reap");
        while let Ok(Some(line)) = self.lines.next_line().await {
            if let Some(id) = line.strip_prefix("DELIVERED ") {
                self.delivered.push(id.to_owned());
            }
        }
    }

    /// Graceful stop: close stdin, read to the end.
    async fn stop(mut self) -> Vec<String> {
        drop(self.child.stdin.take());
        let rest = async {
            while let Some(line) = self.lines.next_line().await.expect("read") {
                if let Some(id) = line.strip_prefix("DELIVERED ") {
                    self.delivered.push(id.to_owned());
                }
            }
            self.child.wait().await.expect("reap")
        };
        let status = tokio::time::timeout(PATIENCE, rest)
            .await
            .expect("child stops");
        assert!(status.success(), "child worker failed: {status}");
        self.delivered
    }
}

async fn publish_all<B: QueueBackend<Value>>(backend: &B, n: usize) -> Vec<Event> {
    let sink = ThroughTaskQueue::new(backend.clone()).layer(NoopSink::new());
    let events: Vec<_> = (0..n)
        .map(|i| Event::new("test.crash", json!({ "n": i })))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in events.chunks(n / 16) {
        let (mut sink, chunk) = (sink.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for event in chunk {
                sink.publish(event).await.expect("publish");
            }
        });
    }
    tasks.join_all().await;
    events
}

/// Jobs leased to workers (fetched, not completed): what a crash can
/// deliver twice.
async fn leased(location: &Location, queue: &str) -> i64 {
    match location {
        Location::Sqlite(path) => {
            let q: SqliteQueue = SqliteQueue::open(path, queue).await.unwrap();
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM Jobs WHERE job_type = ? AND status IN ('Queued', 'Running')",
            )
            .bind(queue)
            .fetch_one(q.pool())
            .await
            .unwrap();
            n
        }
        #[cfg(feature = "postgres")]
        Location::Postgres(url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1 \
                 AND status IN ('Queued', 'Running')",
            )
            .bind(queue)
            .fetch_one(&pool)
            .await
            .unwrap();
            n
        }
        #[cfg(feature = "redis")]
        Location::Redis(url) => {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{queue}*inflight*"))
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut n = 0;
            for key in keys {
                let kind: String = redis::cmd("TYPE")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if kind == "set" {
                    let count: i64 = redis::cmd("SCARD")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    n += count;
                }
            }
            n
        }
    }
}

async fn crash_test<B: QueueBackend<Value>>(backend: B, location: Location, label: &str) {
    let queue = backend.name().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let sent = publish_all(&backend, CRASH_EVENTS).await;

    let mut first = ChildWorker::spawn(&location, &queue, dir.path(), 5);
    first.read_until(|d| d.len() >= KILL_AFTER).await;
    first.kill().await;
    let before_kill = first.delivered.len();
    let in_flight = leased(&location, &queue).await;

    let mut second = ChildWorker::spawn(&location, &queue, dir.path(), 1);
    let seen: HashSet<String> = first.delivered.iter().cloned().collect();
    second
        .read_until(|d| {
            seen.len() + d.iter().filter(|id| !seen.contains(*id)).count() >= CRASH_EVENTS
        })
        .await;
    let second_ids = second.stop().await;

    let all: Vec<_> = first.delivered.iter().chain(&second_ids).cloned().collect();
    let unique: HashSet<_> = all.iter().cloned().collect();
    let duplicates = all.len() - unique.len();
    println!(
        "crash test {label}: events sent {}, delivered before SIGKILL {before_kill}, \
         leased at the kill {in_flight}, unique received {}, duplicates {duplicates}",
        sent.len(),
        unique.len()
    );
    let want: HashSet<_> = sent.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(unique, want, "every event arrived at least once");
    assert_eq!(
        support::read_event_files::<Value>(dir.path()).len(),
        CRASH_EVENTS,
        "one file per event in the FsSink directory"
    );
    assert!(
        duplicates as i64 <= in_flight,
        "{duplicates} duplicates, but only {in_flight} jobs were in flight"
    );
}

#[cfg(any(feature = "postgres", feature = "redis"))]
async fn two_workers_share<B: QueueBackend<Value>>(backend: B, location: Location, label: &str) {
    let queue = backend.name().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChildWorker::spawn(&location, &queue, dir.path(), 1);
    let mut b = ChildWorker::spawn(&location, &queue, dir.path(), 1);
    for child in [&mut a, &mut b] {
        let ready = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = child.lines.next_line().await.expect("read") {
                if line.ends_with("CHILD READY") {
                    return;
                }
            }
            panic!("child exited before it was ready");
        });
        ready.await.expect("child ready");
    }
    let sent = publish_all(&backend, SHARED_EVENTS).await;
    let want: HashSet<_> = sent.iter().map(|e| e.id.to_string()).collect();
    // Read both until every id was seen by one of them.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.len() < want.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} arrived",
            seen.len(),
            want.len()
        );
        tokio::select! {
            line = a.lines.next_line() => record(line.expect("read a"), &mut a.delivered, &mut seen),
            line = b.lines.next_line() => record(line.expect("read b"), &mut b.delivered, &mut seen),
        }
    }
    let (a_ids, b_ids) = (a.stop().await, b.stop().await);
    let unique: HashSet<_> = a_ids.iter().chain(&b_ids).cloned().collect();
    println!(
        "two workers {label}: events sent {}, worker A delivered {}, worker B delivered {}, \
         unique received {}",
        sent.len(),
        a_ids.len(),
        b_ids.len(),
        unique.len()
    );
    assert_eq!(unique, want, "all arrived, none lost");
    assert_eq!(
        support::read_event_files::<Value>(dir.path()).len(),
        SHARED_EVENTS
    );
}

#[cfg(any(feature = "postgres", feature = "redis"))]
fn record(line: Option<String>, delivered: &mut Vec<String>, seen: &mut HashMap<String, usize>) {
    let line = line.expect("a child worker exited early");
    if let Some(id) = line.strip_prefix("DELIVERED ") {
        delivered.push(id.to_owned());
        *seen.entry(id.to_owned()).or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_worker_loses_no_event() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("crash.db");
    let name = unique_name("crash");
    let queue: SqliteQueue = SqliteQueue::open(&path, &name).await.unwrap();
    crash_test(queue, Location::Sqlite(path), "sqlite").await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_killed_worker_loses_no_event() {
    let url = backend_url("EVENTSINK_POSTGRES_URL");
    let name = unique_name("crash");
    let queue: PostgresQueue = PostgresQueue::connect(&url, &name).await.unwrap();
    crash_test(queue, Location::Postgres(url.clone()), "postgres").await;
    support::queue::delete_postgres_rows(&url, &[name]).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_killed_worker_loses_no_event() {
    let url = backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("crash");
    let queue: RedisQueue = RedisQueue::connect(&url, &name).await.unwrap();
    crash_test(queue, Location::Redis(url.clone()), "redis").await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn two_worker_processes_share_a_postgres_queue() {
    let url = backend_url("EVENTSINK_POSTGRES_URL");
    let name = unique_name("two");
    let queue: PostgresQueue = PostgresQueue::connect(&url, &name).await.unwrap();
    two_workers_share(queue, Location::Postgres(url.clone()), "postgres").await;
    support::queue::delete_postgres_rows(&url, &[name]).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn two_worker_processes_share_a_redis_queue() {
    let url = backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("two");
    let queue: RedisQueue = RedisQueue::connect(&url, &name).await.unwrap();
    two_workers_share(queue, Location::Redis(url.clone()), "redis").await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}
