//! The `worker` and `publisher` examples as processes on one shared queue
//! (Postgres with two workers; SQLite with one and with two; Redis with
//! one): events POSTed to a publisher process reach a verifying receiver
//! in this test through the worker processes, none lost, and every process
//! exits 0 on SIGTERM.
//!
//! **The binaries.** Examples get no `CARGO_BIN_EXE_*`, and a binary found
//! under `target/*/examples` may be stale (`cargo test --test processes`
//! does not build examples) or built with other features. So the test runs
//! `cargo build --example worker --example publisher` once per test binary
//! (a `OnceLock`), with this test's own features and profile, and takes the
//! executables' paths from cargo's JSON messages. When the examples are
//! fresh that build does nothing; the library's features match the test's,
//! so it is never rebuilt for them.
//!
//! **No sleeps.** The test waits for each child's first line on stdout
//! (`ready`, `listening on http://...`) and for the receiver's count of
//! distinct events, each with a deadline. A guard kills every child that is
//! still running when the test ends (a failed assertion included) and then
//! prints the tail of its log.
mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use eventsink::Event;
use eventsink::signature::Secret;
use eventsink::verify::{VerifyConfig, VerifyWebhookLayer};
use serde_json::{Value, json};
use support::queue::{backend_url, unique_name};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Events POSTed to the publisher.
const EVENTS: usize = 500;
/// POSTs in flight at once.
const CLIENTS: usize = 16;
/// Deliveries at once in each worker.
const CONCURRENCY: usize = 8;
/// How long the receiver takes to answer: a worker then delivers at most
/// 8 / 10 ms = 800 events a second, fewer than the publisher stores, so
/// that the workers share the load (on loopback one worker alone keeps up,
/// and the other may deliver nothing: Postgres split 499 / 1 without it).
const RECEIVER_DELAY: Duration = Duration::from_millis(10);
/// Upper bound on building the examples, a child's first line, and every
/// event's arrival.
const PATIENCE: Duration = Duration::from_secs(120);
/// How long a child may take to exit after SIGTERM: a worker lets its
/// deliveries finish, at most the attempt timeout (15 s) plus 5 s.
const EXIT_PATIENCE: Duration = Duration::from_secs(30);
/// The flags' environment variables, removed from the children's
/// environment so that only the test's flags configure them.
const EXAMPLE_VARS: [&str; 8] = [
    "QUEUE_POSTGRES_URL",
    "QUEUE_REDIS_URL",
    "QUEUE_SQLITE_PATH",
    "QUEUE_NAME",
    "WEBHOOK_URL",
    "WEBHOOK_SECRET",
    "WORKER_CONCURRENCY",
    "PUBLISHER_LISTEN",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn two_worker_processes_and_a_publisher_share_a_postgres_queue() {
    let url = backend_url("EVENTSINK_POSTGRES_URL");
    let name = unique_name("proc");
    let report = run(&["--postgres", &url], &name, &["a", "b"]).await;
    support::queue::delete_postgres_rows(&url, &[name]).await;
    // Which worker delivered how many is printed, not asserted: usually
    // about half each, but in about one run in five one of them delivers
    // almost nothing. Its apalis trace ends in "fetch_next returned empty
    // batch -> Ready, parking waker" and then stays silent for seconds
    // while hundreds of jobs are pending: apalis' poll strategy polled
    // only the wake stream, so no interval tick was armed to wake it.
    report.check("postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn a_worker_process_and_a_publisher_share_a_redis_queue() {
    let url = backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("proc");
    let report = run(&["--redis", &url], &name, &["a"]).await;
    support::queue::delete_redis_keys(&url, &[name]).await;
    report.check("redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_and_a_publisher_share_a_sqlite_file() {
    sqlite_run(&["a"]).await.check("sqlite");
}

/// Two worker processes on one SQLite file share it: each fetch locks its
/// jobs in one write statement (`UPDATE ... RETURNING` under the file's
/// write lock), so no job is lost between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_and_a_publisher_share_a_sqlite_file() {
    sqlite_run(&["a", "b"]).await.check("sqlite, two workers");
}

/// [`run`] on a SQLite file of its own, with the workers `workers`.
async fn sqlite_run(workers: &[&str]) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let path = path.to_str().expect("a UTF-8 temp path");
    run(&["--sqlite", path], &unique_name("proc"), workers).await
}

/// What one run saw.
struct Report {
    sent: HashSet<String>,
    arrivals: Vec<(String, String)>,
    by_worker: HashMap<String, usize>,
}

impl Report {
    /// Every sent event arrived at least once; prints the counts.
    fn check(&self, label: &str) {
        let unique: HashSet<String> = self.arrivals.iter().map(|(_, id)| id.clone()).collect();
        println!(
            "processes {label}: events sent {}, requests received {}, unique {}, duplicates {}, \
             deliveries per worker {:?}",
            self.sent.len(),
            self.arrivals.len(),
            unique.len(),
            self.arrivals.len() - unique.len(),
            self.by_worker
        );
        assert_eq!(
            unique, self.sent,
            "every event arrived, and only those sent"
        );
    }
}

/// Starts a receiver, one worker process per name in `workers` (each
/// delivering to `/hooks/{name}`) and a publisher, all on the queue `name`
/// of the backend `backend` (flag and value); POSTs [`EVENTS`] events to
/// the publisher, waits for all of them, then stops every process with
/// SIGTERM.
async fn run(backend: &[&str], name: &str, workers: &[&str]) -> Report {
    let bins = binaries();
    let logs = tempfile::tempdir().unwrap();
    let secret = Secret::generate().unwrap();
    let receiver = Receiver::start(secret.clone()).await;
    let queue = [backend, &["--queue", name]].concat();

    let mut children = Vec::new();
    for worker in workers {
        let url = format!("http://{}/hooks/{worker}", receiver.addr);
        let concurrency = CONCURRENCY.to_string();
        let args = [&queue[..], &["--url", &url, "--concurrency", &concurrency]].concat();
        let mut child = Running::spawn(&bins.worker, &args, &secret, logs.path(), worker);
        assert_eq!(child.first_line().await, "ready");
        children.push(child);
    }
    let mut publisher = Running::spawn(&bins.publisher, &queue, &secret, logs.path(), "publisher");
    let line = publisher.first_line().await;
    let base = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the publisher's first line is {line:?}"))
        .to_owned();

    let sent = post_events(&format!("{base}/events/test.process")).await;
    receiver.wait_for(&sent).await;

    children.push(publisher);
    for child in &mut children {
        child.terminate().await;
    }
    let arrivals = receiver.arrivals.lock().unwrap().clone();
    let mut by_worker = HashMap::new();
    for (worker, _) in &arrivals {
        *by_worker.entry(worker.clone()).or_default() += 1;
    }
    Report {
        sent,
        arrivals,
        by_worker,
    }
}

/// POSTs [`EVENTS`] events to `url` from [`CLIENTS`] tasks; the ids the
/// publisher answered with. Every tenth event carries an `Idempotency-Key`
/// and is POSTed twice, as a client whose first answer was lost would: the
/// second answer has the same id and says it stored nothing new.
async fn post_events(url: &str) -> HashSet<String> {
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..CLIENTS {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for n in (task..EVENTS).step_by(CLIENTS) {
                let key = (n % 10 == 0).then(|| format!("evt-{n}"));
                let (status, id) = post_event(&client, &url, n, key.as_deref()).await;
                assert_eq!(status, 202, "the first POST of event {n} stores it");
                if let Some(key) = key {
                    assert_eq!(id, key);
                    let again = post_event(&client, &url, n, Some(&key)).await;
                    assert_eq!(again, (200, key), "the second POST stores nothing");
                }
                ids.push(id);
            }
            ids
        });
    }
    let ids: HashSet<String> = tasks.join_all().await.into_iter().flatten().collect();
    assert_eq!(ids.len(), EVENTS, "one distinct id per event");
    ids
}

/// POSTs the event `{"n": n}`; the answer's status (`202` stored, `200`
/// already queued) and id.
async fn post_event(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    key: Option<&str>,
) -> (u16, String) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(json!({ "n": n }).to_string());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("POST to the publisher");
    let status = response.status();
    let body = response.bytes().await.expect("the publisher's answer");
    assert!(
        status == 202 || status == 200,
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    let answer: Value = serde_json::from_slice(&body).expect("JSON answer");
    let already = answer["already_queued"].as_bool().unwrap_or(false);
    assert_eq!(already, status == 200, "{answer}");
    (
        status.as_u16(),
        answer["id"].as_str().expect("an id").to_owned(),
    )
}

/// Variables cargo sets for a test besides `CARGO_PKG_*`, which describe
/// this package rather than configure cargo.
const PACKAGE_VARS: [&str; 7] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "OUT_DIR",
];

/// The examples' executables.
struct Binaries {
    worker: PathBuf,
    publisher: PathBuf,
}

/// Builds the examples once per test binary (see the module docs).
fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(build_examples)
}

fn build_examples() -> Binaries {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cargo = std::process::Command::new(env!("CARGO"));
    // Cargo describes the package to the test in these variables; some
    // build scripts watch them (ring's `CARGO_MANIFEST_DIR`), so passing
    // them on would rebuild those dependencies here and again in the next
    // plain `cargo build`.
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        if var.starts_with("CARGO_PKG_") || PACKAGE_VARS.contains(&&*var) {
            cargo.env_remove(&*var);
        }
    }
    let output = cargo
        .args(["build", "--example", "worker", "--example", "publisher"])
        .args([
            "--message-format",
            "json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .args(["--profile", &profile()])
        .args(["--no-default-features", "--features", &features().join(",")])
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(output.status.success(), "building the examples failed");
    let mut executables = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(name), Some(path)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            executables.insert(name.to_owned(), PathBuf::from(path));
        }
    }
    let mut take = |name: &str| {
        executables
            .remove(name)
            .unwrap_or_else(|| panic!("cargo built no executable for the example {name}"))
    };
    Binaries {
        worker: take("worker"),
        publisher: take("publisher"),
    }
}

/// The cargo profile this test was built with, from its own path
/// (`target/<dir>/deps/processes-<hash>`): `dev` builds into `debug`.
fn profile() -> String {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .expect("the test binary lives in target/<profile>/deps")
        .to_string_lossy()
        .into_owned();
    if dir == "debug" {
        "dev".to_owned()
    } else {
        dir
    }
}

/// The crate features this test was built with.
fn features() -> Vec<&'static str> {
    [
        ("default", cfg!(feature = "default")),
        ("signing", cfg!(feature = "signing")),
        ("webhook", cfg!(feature = "webhook")),
        ("verify", cfg!(feature = "verify")),
        ("axum", cfg!(feature = "axum")),
        ("queue", cfg!(feature = "queue")),
        ("sqlite", cfg!(feature = "sqlite")),
        ("postgres", cfg!(feature = "postgres")),
        ("redis", cfg!(feature = "redis")),
        ("redis-replay", cfg!(feature = "redis-replay")),
        ("test-util", cfg!(feature = "test-util")),
        ("cli", cfg!(feature = "cli")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

/// A child process; killed (SIGKILL) if still running when dropped, with
/// the tail of its log printed then, so that a failing test leaves no
/// process behind and shows what the children said.
struct Running {
    label: String,
    child: Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    log: PathBuf,
}

impl Running {
    fn spawn(exe: &Path, args: &[&str], secret: &Secret, logs: &Path, label: &str) -> Self {
        let log = logs.join(format!("{label}.log"));
        let mut command = Command::new(exe);
        for var in EXAMPLE_VARS {
            command.env_remove(var);
        }
        let mut child = command
            .args(args)
            .env("WEBHOOK_SECRET", secret.expose_whsec())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the child's log"))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", exe.display()));
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Running {
            label: label.to_owned(),
            child,
            stdout,
            log,
        }
    }

    /// The child's first line on stdout.
    async fn first_line(&mut self) -> String {
        let line = tokio::time::timeout(PATIENCE, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("{} printed nothing within {PATIENCE:?}", self.label))
            .expect("read the child's stdout");
        line.unwrap_or_else(|| panic!("{} exited before its first line", self.label))
    }

    /// SIGTERM, then waits for the child to exit 0.
    async fn terminate(&mut self) {
        let pid = self.child.id().expect("the child is running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(EXIT_PATIENCE, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} still running {EXIT_PATIENCE:?} after SIGTERM",
                    self.label
                )
            })
            .expect("wait for the child");
        assert!(status.success(), "{} exited with {status}", self.label);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- last lines of {}'s log:", self.label);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The destination: axum behind `VerifyWebhookLayer` (no replay guard, so
/// that duplicates arrive and are counted), recording which worker's path
/// each event came through.
struct Receiver {
    addr: std::net::SocketAddr,
    arrivals: Arc<Mutex<Vec<(String, String)>>>,
    unique: watch::Receiver<usize>,
}

#[derive(Clone)]
struct Seen {
    arrivals: Arc<Mutex<Vec<(String, String)>>>,
    ids: Arc<Mutex<HashSet<String>>>,
    unique: Arc<watch::Sender<usize>>,
}

impl Receiver {
    async fn start(secret: Secret) -> Receiver {
        let (unique_tx, unique) = watch::channel(0);
        let seen = Seen {
            arrivals: Arc::default(),
            ids: Arc::default(),
            unique: Arc::new(unique_tx),
        };
        let app = axum::Router::new()
            .route("/hooks/{worker}", axum::routing::post(arrived))
            .route_layer(VerifyWebhookLayer::new(VerifyConfig::new(secret)))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            addr,
            arrivals: seen.arrivals,
            unique,
        }
    }

    /// Waits until every event of `sent` arrived (or [`PATIENCE`] passed).
    async fn wait_for(&self, sent: &HashSet<String>) {
        let mut unique = self.unique.clone();
        let arrived = tokio::time::timeout(PATIENCE, unique.wait_for(|&n| n >= sent.len())).await;
        assert!(
            arrived.is_ok(),
            "only {} of {} events arrived within {PATIENCE:?}",
            *self.unique.borrow(),
            sent.len()
        );
    }
}

/// `POST /hooks/{worker}`, verified: records the event's id.
async fn arrived(
    State(seen): State<Seen>,
    UrlPath(worker): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    let Ok(event) = serde_json::from_slice::<Event>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    tokio::time::sleep(RECEIVER_DELAY).await;
    let id = event.id.to_string();
    seen.arrivals.lock().unwrap().push((worker, id.clone()));
    let mut ids = seen.ids.lock().unwrap();
    ids.insert(id);
    seen.unique.send_replace(ids.len());
    StatusCode::NO_CONTENT
}
