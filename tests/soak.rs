//! Soak with faults: 10,000 events through `ThroughTaskQueue`, a worker
//! process and `WebhookSink` to a loopback receiver behind
//! `VerifyWebhookLayer` with a replay guard, per durable backend.
//!
//! While the events flow, the receiver answers 503 to half the requests
//! for a while, then 429 with `Retry-After: 1`, then refuses connections
//! for 10 s (its listener is closed and bound again on the same port), then
//! answers some requests slower than the worker's attempt timeout; and the
//! worker process is killed with SIGKILL twice and started again. The
//! phases start when the handler has seen enough events (no sleeps as
//! signals).
//!
//! The worker is this test binary run again with `EVENTSINK_SOAK_*`
//! variables (`child_soak_worker`); it stops gracefully when its stdin
//! closes. The receiver counts each request before the verification layer
//! (by its `webhook-id` header: 2xx answers per id, rejections, attempts
//! the client gave up on) and each event its handler accepted.
//!
//! Asserted: every event reached the handler; duplicates (2xx answers
//! beyond the first per id) stay within concurrency × kills plus the
//! attempts that outlived the timeout; no dead letters; no request was
//! rejected by the verification layer.
//!
//! SQLite runs under the default features; Postgres and Redis need their
//! features and are ignored (with the reason) unless their URL variable was
//! set at build time (see `build.rs`).
#![cfg(all(feature = "sqlite", feature = "webhook", feature = "axum"))]
mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
#[cfg(feature = "postgres")]
use eventsink::queue::PostgresQueue;
#[cfg(feature = "redis")]
use eventsink::queue::RedisQueue;
use eventsink::queue::{
    DeadLetters, QueueBackend, QueueWorker, RetrySchedule, SqliteQueue, ThroughTaskQueue,
};
use eventsink::signature::Secret;
use eventsink::verify::{MemoryReplayGuard, VerifyConfig, VerifyWebhookLayer};
use eventsink::{Event, NoopSink, SinkExt, WebhookSink};
use serde_json::{Value, json};
#[cfg(any(feature = "postgres", feature = "redis"))]
use support::queue::backend_url;
use support::queue::unique_name;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{oneshot, watch};
use tower::Layer;

/// Events per backend.
const EVENTS: usize = 10_000;
/// Deliveries at once in the worker process.
const CONCURRENCY: usize = 16;
/// The worker's attempt timeout: short, so that slow answers time out.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a slow answer takes: longer than the attempt timeout.
const SLOW_ANSWER: Duration = Duration::from_secs(3);
/// Attempts per event, 1 s apart: far more than the faults can use up.
const ATTEMPTS: u32 = 100;
/// Short leases, so that a killed worker's jobs are taken over in ~2 s.
const HEARTBEAT: Duration = Duration::from_secs(1);
const MISSED: usize = 2;
/// How long the receiver refuses connections.
const OUTAGE: Duration = Duration::from_secs(10);
/// Worker processes killed with SIGKILL per run.
const KILLS: usize = 2;
/// Upper bound on each wait of the parent.
const PATIENCE: Duration = Duration::from_secs(180);
/// The signing secret shared by the worker and the receiver.
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// What the receiver's handler does wrong at the moment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Fault {
    None,
    /// 503 to every other request.
    Unavailable,
    /// 429 with `Retry-After: 1` to every other request.
    TooMany,
    /// Every tenth request answers after `SLOW_ANSWER`.
    Slow,
}

/// What the receiver saw.
struct Tally {
    fault: AtomicU8,
    /// Requests that reached the handler.
    calls: AtomicUsize,
    /// Ids the handler accepted; its size is published on `handled_count`.
    handled: Mutex<HashSet<String>>,
    handled_count: watch::Sender<usize>,
    /// Handler runs for an id it had accepted before.
    handled_again: AtomicUsize,
    /// Requests at the outer layer, before verification.
    requests: AtomicUsize,
    /// 2xx answers per `webhook-id`, before verification (replay-guard
    /// answers included).
    ok_by_id: Mutex<HashMap<String, usize>>,
    /// Answers of the verification layer to a bad request (400, 401, 413).
    rejected: AtomicUsize,
    /// Answers per status, before verification.
    statuses: Mutex<HashMap<u16, usize>>,
    /// Requests the client hung up on, or answered after the attempt timeout.
    timed_out: AtomicUsize,
}

impl Tally {
    fn new() -> Arc<Self> {
        Arc::new(Tally {
            fault: AtomicU8::new(Fault::None as u8),
            calls: AtomicUsize::new(0),
            handled: Mutex::new(HashSet::new()),
            handled_count: watch::channel(0).0,
            handled_again: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            ok_by_id: Mutex::new(HashMap::new()),
            rejected: AtomicUsize::new(0),
            statuses: Mutex::new(HashMap::new()),
            timed_out: AtomicUsize::new(0),
        })
    }

    fn set_fault(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    fn fault(&self) -> Fault {
        match self.fault.load(Ordering::SeqCst) {
            1 => Fault::Unavailable,
            2 => Fault::TooMany,
            3 => Fault::Slow,
            _ => Fault::None,
        }
    }

    fn handle(&self, id: String) {
        let mut handled = self.handled.lock().unwrap();
        if !handled.insert(id) {
            self.handled_again.fetch_add(1, Ordering::SeqCst);
        }
        self.handled_count.send_replace(handled.len());
    }

    fn answered(&self, id: String, status: StatusCode) {
        *self
            .statuses
            .lock()
            .unwrap()
            .entry(status.as_u16())
            .or_default() += 1;
        if status.is_success() {
            *self.ok_by_id.lock().unwrap().entry(id).or_default() += 1;
        } else if matches!(status.as_u16(), 400 | 401 | 413) {
            self.rejected.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// 2xx answers beyond the first, over all ids.
    fn duplicates(&self) -> usize {
        let ok = self.ok_by_id.lock().unwrap();
        ok.values().map(|n| n - 1).sum()
    }
}

/// One request at the outer layer; counts it as timed out when dropped
/// unanswered (the client hung up) or answered after the attempt timeout.
struct Attempt {
    tally: Arc<Tally>,
    started: Instant,
    answered: bool,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.answered || self.started.elapsed() >= ATTEMPT_TIMEOUT {
            self.tally.timed_out.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The outer layer: counts every request before the verification layer.
async fn count(State(tally): State<Arc<Tally>>, request: Request, next: Next) -> Response {
    tally.requests.fetch_add(1, Ordering::SeqCst);
    let id = header(request.headers(), "webhook-id");
    let mut attempt = Attempt {
        tally: Arc::clone(&tally),
        started: Instant::now(),
        answered: false,
    };
    let response = next.run(request).await;
    attempt.answered = true;
    tally.answered(id, response.status());
    response
}

/// The handler, behind the verification layer: fails as the fault says.
async fn hook(State(tally): State<Arc<Tally>>, headers: HeaderMap) -> Response {
    let n = tally.calls.fetch_add(1, Ordering::SeqCst);
    match tally.fault() {
        Fault::Unavailable if n % 2 == 0 => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Fault::TooMany if n % 2 == 0 => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
        }
        // The fault itself, not a wait for something.
        Fault::Slow if n % 10 == 0 => tokio::time::sleep(SLOW_ANSWER).await,
        _ => {}
    }
    tally.handle(header(&headers, "webhook-id"));
    StatusCode::NO_CONTENT.into_response()
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The loopback receiver; it can close its port for a while.
struct Receiver {
    addr: SocketAddr,
    tally: Arc<Tally>,
    app: axum::Router,
    serving: Option<Serving>,
}

impl Receiver {
    fn start() -> Receiver {
        let tally = Tally::new();
        let listener = bind_outside_ephemeral();
        let addr = listener.local_addr().unwrap();
        let app = app(&tally);
        let serving = Some(Serving::start(listener, app.clone()));
        Receiver {
            addr,
            tally,
            app,
            serving,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Closes the port (connections in flight finish first), keeps it
    /// closed for `OUTAGE`, then serves on it again.
    async fn outage(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.close().await;
        }
        // The outage itself, not a wait for something.
        tokio::time::sleep(OUTAGE).await;
        self.serving = Some(Serving::start(bind(self.addr), self.app.clone()));
    }
}

/// An axum server on one listener.
struct Serving {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    fn start(listener: tokio::net::TcpListener, app: axum::Router) -> Serving {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("receiver server");
        });
        Serving { stop, task }
    }

    /// Closes the listener, lets the requests in flight finish and closes
    /// every connection.
    async fn close(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("receiver connections close")
            .expect("receiver server");
    }
}

/// Binds a port below the kernel's ephemeral range: while the receiver's
/// port is closed, the worker's connection attempts (from ephemeral ports)
/// can then neither take it nor connect to themselves on it, so it can be
/// bound again.
fn bind_outside_ephemeral() -> tokio::net::TcpListener {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low = range
        .split_whitespace()
        .next()
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or(32_768);
    for _ in 0..100 {
        let port = fastrand::u16(10_000..low.max(10_001));
        if let Ok(listener) = try_bind(SocketAddr::from(([127, 0, 0, 1], port))) {
            return listener;
        }
    }
    panic!("found no free port in 10000..{low} for the receiver");
}

fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    try_bind(addr).unwrap_or_else(|e| panic!("bind the receiver's port {addr} again: {e}"))
}

fn try_bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The receiver's routes; one replay guard for its whole life, outages
/// included.
fn app(tally: &Arc<Tally>) -> axum::Router {
    let secret: Secret = SECRET.parse().unwrap();
    let config = VerifyConfig::new(secret)
        .replay_guard(MemoryReplayGuard::new())
        // Longer than a slow answer, so that no duplicate reaches the handler.
        .in_flight_ttl(SLOW_ANSWER * 2);
    axum::Router::new()
        .route("/hooks", post(hook))
        .route_layer(VerifyWebhookLayer::new(config))
        .layer(middleware::from_fn_with_state(Arc::clone(tally), count))
        .with_state(Arc::clone(tally))
}

/// Where the worker's queue is.
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

/// The retry schedule of the soak: `ATTEMPTS` attempts, 1 s apart.
fn schedule() -> RetrySchedule {
    RetrySchedule::fixed((1..ATTEMPTS).map(|_| Duration::from_secs(1)))
}

/// The worker process's body; does nothing in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_soak_worker() {
    let Ok(backend) = std::env::var("EVENTSINK_SOAK_BACKEND") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let (location, queue, url) = (
        var("EVENTSINK_SOAK_LOCATION"),
        var("EVENTSINK_SOAK_QUEUE"),
        var("EVENTSINK_SOAK_URL"),
    );
    let webhook = WebhookSink::builder(url)
        .secret(SECRET.parse().unwrap())
        .build()
        .expect("webhook sink");
    // Stops when the parent closes our stdin.
    let stop = async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
    };
    crate::with_child_queue!(
        backend.as_str(),
        &queue,
        &location,
        (HEARTBEAT, MISSED),
        |q| work(q, webhook, stop).await
    );
}

async fn work<B: QueueBackend<Value>>(queue: B, webhook: WebhookSink, stop: impl Future + Send) {
    QueueWorker::new(queue, webhook)
        .concurrency(CONCURRENCY)
        .attempt_timeout(ATTEMPT_TIMEOUT)
        .schedule(schedule())
        .poll_interval(Duration::from_millis(10))
        .run_until(stop)
        .await;
}

/// A worker process. Its stdin is kept apart from the `Child`, whose
/// `wait` would close it (and so stop the worker).
struct Worker {
    child: Child,
    stdin: ChildStdin,
}

/// Starts a worker process on the queue at `location`.
fn spawn_worker(location: &Location, queue: &str, url: &str) -> Worker {
    let (backend, place) = location.env();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_soak_worker",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("EVENTSINK_SOAK_BACKEND", backend)
        .env("EVENTSINK_SOAK_LOCATION", place)
        .env("EVENTSINK_SOAK_QUEUE", queue)
        .env("EVENTSINK_SOAK_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn worker process");
    let stdin = child.stdin.take().expect("stdin");
    Worker { child, stdin }
}

/// Waits until the handler accepted `n` events; fails if the worker exits.
async fn until_handled(receiver: &Receiver, worker: &mut Worker, n: usize) {
    eprintln!("soak: waiting for {n} events at the handler");
    let mut handled = receiver.tally.handled_count.subscribe();
    tokio::select! {
        seen = handled.wait_for(|&c| c >= n) => { seen.expect("tally"); }
        status = worker.child.wait() => panic!("the worker process exited: {status:?}"),
        () = tokio::time::sleep(PATIENCE) => panic!(
            "waited {PATIENCE:?} for {n} events, the handler accepted {}",
            *receiver.tally.handled_count.borrow()
        ),
    }
}

/// SIGKILL, then a new worker process on the same queue.
async fn kill_and_restart(worker: &mut Worker, location: &Location, queue: &str, url: &str) {
    worker.child.start_kill().expect("SIGKILL");
    worker.child.wait().await.expect("reap");
    *worker = spawn_worker(location, queue, url);
}

/// Polls the queue's counts until nothing is pending, scheduled or running
/// (no signal exists for that); fails if the worker exits.
async fn until_drained<B: QueueBackend<Value>>(backend: &B, worker: &mut Worker) {
    let drained = async {
        loop {
            let stats = backend.stats().await.expect("stats");
            if stats.pending + stats.scheduled + stats.running == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        () = drained => {}
        status = worker.child.wait() => panic!("the worker process exited: {status:?}"),
        () = tokio::time::sleep(PATIENCE) => panic!("the queue did not drain in {PATIENCE:?}"),
    }
}

async fn publish_all<B: QueueBackend<Value>>(backend: &B) -> HashSet<String> {
    let sink = ThroughTaskQueue::new(backend.clone()).layer(NoopSink::new());
    let events: Vec<_> = (0..EVENTS)
        .map(|i| Event::new("soak.event", json!({ "n": i })))
        .collect();
    let ids = events.iter().map(|e| e.id.to_string()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in events.chunks(EVENTS / 16) {
        let (mut sink, chunk) = (sink.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for event in chunk {
                sink.publish(event).await.expect("publish");
            }
        });
    }
    tasks.join_all().await;
    ids
}

async fn soak<B: QueueBackend<Value>>(backend: B, location: Location, label: &str) {
    let _watchdog = support::Watchdog::new(PATIENCE * 3, "the soak hangs");
    let started = Instant::now();
    let queue = backend.name().to_owned();
    let mut receiver = Receiver::start();
    let url = receiver.url();
    // All stored first, so that the phases below meet a full queue.
    let sent = publish_all(&backend).await;
    let published = started.elapsed();
    let mut worker = spawn_worker(&location, &queue, &url);
    let tally = Arc::clone(&receiver.tally);

    until_handled(&receiver, &mut worker, 1_000).await;
    tally.set_fault(Fault::Unavailable);
    until_handled(&receiver, &mut worker, 2_000).await;
    tally.set_fault(Fault::None);
    kill_and_restart(&mut worker, &location, &queue, &url).await;
    until_handled(&receiver, &mut worker, 3_000).await;
    tally.set_fault(Fault::TooMany);
    until_handled(&receiver, &mut worker, 4_000).await;
    tally.set_fault(Fault::None);
    receiver.outage().await;
    until_handled(&receiver, &mut worker, 5_500).await;
    kill_and_restart(&mut worker, &location, &queue, &url).await;
    until_handled(&receiver, &mut worker, 6_500).await;
    tally.set_fault(Fault::Slow);
    until_handled(&receiver, &mut worker, 7_500).await;
    tally.set_fault(Fault::None);
    until_handled(&receiver, &mut worker, EVENTS).await;
    until_drained(&backend, &mut worker).await;
    let wall = started.elapsed();

    drop(worker.stdin);
    let status = tokio::time::timeout(PATIENCE, worker.child.wait())
        .await
        .expect("the worker process stops")
        .expect("reap");
    assert!(status.success(), "the worker process failed: {status}");

    let stats = backend.stats().await.expect("stats");
    let dead = DeadLetters::<B, Value>::new(backend.clone())
        .count()
        .await
        .expect("count dead letters");
    let handled = tally.handled.lock().unwrap().clone();
    let duplicates = tally.duplicates();
    let timed_out = tally.timed_out.load(Ordering::SeqCst);
    let rejected = tally.rejected.load(Ordering::SeqCst);
    let statuses = tally.statuses.lock().unwrap().clone();
    let mut answers: Vec<_> = statuses.iter().collect();
    answers.sort();
    println!(
        "soak {label}: sent {}, unique received {}, duplicates {duplicates}, dead letters {dead}, \
         wall time {:.1} s (publishing {:.1} s, requests {}, timed-out attempts {timed_out}, rejected {rejected}, \
         handled again {}, answers by status {answers:?})",
        sent.len(),
        handled.len(),
        wall.as_secs_f64(),
        published.as_secs_f64(),
        tally.requests.load(Ordering::SeqCst),
        tally.handled_again.load(Ordering::SeqCst),
    );
    assert_eq!(handled, sent, "every event reached the handler");
    assert!(
        duplicates <= CONCURRENCY * KILLS + timed_out,
        "{duplicates} duplicates, more than {CONCURRENCY} × {KILLS} kills + {timed_out} \
         timed-out attempts"
    );
    assert_eq!((dead, stats.dead), (0, 0), "no dead letters");
    assert_eq!(rejected, 0, "every request was validly signed");
    for status in [503, 429] {
        assert!(statuses.contains_key(&status), "no {status} was answered");
    }
    assert!(timed_out > 0, "no attempt timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_soak_with_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("soak.db");
    let name = unique_name("soak");
    let queue: SqliteQueue = SqliteQueue::open(&path, &name).await.unwrap();
    soak(queue, Location::Sqlite(path), "sqlite").await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_soak_with_faults() {
    let url = backend_url("EVENTSINK_POSTGRES_URL");
    let name = unique_name("soak");
    let queue: PostgresQueue = PostgresQueue::connect(&url, &name).await.unwrap();
    soak(queue, Location::Postgres(url.clone()), "postgres").await;
    support::queue::delete_postgres_rows(&url, &[name]).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_soak_with_faults() {
    let url = backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("soak");
    let queue: RedisQueue = RedisQueue::connect(&url, &name).await.unwrap();
    soak(queue, Location::Redis(url.clone()), "redis").await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}
