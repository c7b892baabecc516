//! The whole product in one process: an application publishes signups
//! through a durable queue, a worker delivers them as signed webhooks, and a
//! receiver verifies and deduplicates them.
//!
//! ```text
//! cargo run --example quickstart                           # 1,000 signups, SQLite in a temp dir, a flaky receiver
//! cargo run --example quickstart -- --steady               # a receiver that never fails
//! cargo run --example quickstart -- --events 10 --serve    # then try it yourself with curl
//! cargo run --example quickstart --features postgres -- --postgres postgres://localhost/test
//! cargo run --example quickstart --features redis -- --redis redis://127.0.0.1:6379/
//! ```
//!
//! The application (axum) answers `POST /signup` by publishing a
//! `user.signed_up` event through [`ThroughTaskQueue`]: the request returns
//! once the queue has stored the event, whatever the receiver's health. A
//! worker delivers the events with [`WebhookSink`] and retries failures. The
//! receiver (axum) sits behind [`VerifyWebhookLayer`] with a
//! [`MemoryReplayGuard`]: a redelivered event is answered `200 already
//! handled` without running the handler twice. The run shows progress, prints
//! a summary, and exits 0 only if every event arrived and none is a dead letter.
//!
//! Flags: `--events N` (1,000), `--flaky` (the default: for a few seconds,
//! 503s, one 429 with `Retry-After`, answers lost after the handler ran),
//! `--steady` (a receiver that never fails), `--postgres URL`
//! or `--redis URL` (another backend, with that feature), `--serve` (keep
//! both apps running until Ctrl-C), `--help`.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRef, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use eventsink::queue::{
    DeadLetters, Published, Publisher, QueueBackend, RetrySchedule, SqliteQueue, ThroughTaskQueue,
};
use eventsink::signature::Secret;
use eventsink::verify::{MemoryReplayGuard, VerifyConfig, VerifyWebhookLayer};
use eventsink::{Backoff, BoxError, Event, SinkExt, WebhookSink};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tower::{Layer, ServiceBuilder};

/// Requests to `/signup` in flight at once: 16, the worker's default
/// concurrency, so both sides of the queue work at the same pace.
const IN_FLIGHT: u64 = 16;
/// How long `--flaky` lasts, from the receiver's first request: 3 s, a few
/// rounds of the demo's retry schedule.
const FLAKY_FOR: Duration = Duration::from_secs(3);
/// Share of requests `--flaky` refuses with 503 before the receiver sees them.
const REFUSED: f64 = 0.2;
/// Share of requests `--flaky` lets the receiver handle and then answers 503
/// (a lost answer): their retries are the duplicates the replay guard catches.
const ANSWER_LOST: f64 = 0.1;
/// How often the progress is refreshed and the run checked for its end:
/// 100 ms, smooth for the eye, a few cheap queries for the backend.
const TICK: Duration = Duration::from_millis(100);
/// How long the run waits without any progress before it gives up: 30 s,
/// ten times the demo schedule's longest step (2 s, at most 3 s with jitter).
const PATIENCE: Duration = Duration::from_secs(30);

/// Publish signups through a durable queue, deliver them as signed webhooks,
/// verify them: the whole of eventsink in one process.
///
/// An axum application answers POST /signup by publishing a `user.signed_up`
/// event into a durable queue; a worker delivers the events as signed webhooks
/// to an axum receiver behind VerifyWebhookLayer (signature, timestamp, replay
/// guard). Progress shows while the worker catches up. Exits 0 only if every
/// published event reached the receiver's handler and none is a dead letter.
#[derive(Debug, Parser)]
#[command(after_help = "\
Examples:
  cargo run --example quickstart -- --steady
  cargo run --example quickstart -- --events 10 --serve
  cargo run --example quickstart --features postgres -- --postgres postgres://localhost/test
  cargo run --example quickstart --features redis -- --redis redis://127.0.0.1:6379/")]
struct Args {
    /// How many signups to send to the application's POST /signup.
    #[arg(long, default_value_t = 1000)]
    events: u64,
    /// Make delivery fail for the receiver's first 3 s: ~20 % answered 503, one
    /// 429 with Retry-After, ~10 % handled but their answer lost (their retries are
    /// duplicates, answered by the replay guard). The queue retries them all.
    /// This is the default; the flag only says so.
    #[arg(long)]
    flaky: bool,
    /// A receiver that never fails (no retries, no duplicates).
    #[arg(long, conflicts_with = "flaky")]
    steady: bool,
    /// Queue on this Postgres database instead of SQLite (needs the `postgres` feature).
    #[arg(long, value_name = "URL", conflicts_with = "redis")]
    postgres: Option<String>,
    /// Queue on this Redis instead of SQLite (needs the `redis` feature).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// After the run, keep the application and the receiver running (with curl
    /// commands to try) until Ctrl-C.
    #[arg(long)]
    serve: bool,
}

/// The application's event, and the body of `POST /signup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Signup {
    email: String,
}

/// The application's publishing sink: [`Publisher`], a boxed publishing
/// stack. The backend is chosen at run time, so it is boxed; with one backend
/// it could be `QueuePublisher<WebhookSink, SqliteQueue<Signup>>`. Cheap to
/// clone: axum hands every request its own clone, and they share one group
/// commit.
type Events = Publisher<Signup>;

/// What the three parts saw, for the progress line and the summary.
#[derive(Debug, Default)]
struct Stats {
    /// Signups whose publish returned `Ok`: stored in the queue.
    published: AtomicU64,
    /// Delivery attempts the receiver acknowledged (2xx): each ends the
    /// delivery of its event.
    acknowledged: AtomicU64,
    /// Delivery attempts that failed; the queue retries each (or buries it).
    failed_attempts: AtomicU64,
    /// Receiver answers 2xx (some lost on the way with `--flaky`): first
    /// deliveries and duplicates.
    answered_ok: AtomicU64,
    /// Event ids the receiver's handler ran for.
    ids: Mutex<HashSet<Arc<str>>>,
    /// Print each event the receiver handles (in `--serve`).
    echo: AtomicBool,
}

impl Stats {
    fn unique(&self) -> u64 {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match open_and_run(&Args::parse()).await {
        Ok(summary) => summary.verdict(),
        Err(e) => {
            eprintln!("quickstart failed: {e}");
            let mut cause = e.source();
            while let Some(source) = cause {
                eprintln!("  caused by: {source}");
                cause = source.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// Opens the queue the flags ask for, under a fresh name, and runs on it.
async fn open_and_run(args: &Args) -> Result<Summary, BoxError> {
    let queue = format!("quickstart-{}", uuid::Uuid::now_v7().simple());
    #[cfg(feature = "postgres")]
    if let Some(url) = &args.postgres {
        println!("queue {queue} on Postgres"); // not the URL: it may hold a password
        let backend = eventsink::queue::PostgresQueue::connect(url, &queue).await?;
        return run(backend, args).await;
    }
    #[cfg(feature = "redis")]
    if let Some(url) = &args.redis {
        println!("queue {queue} on Redis");
        let backend = eventsink::queue::RedisQueue::connect(url, &queue).await?;
        return run(backend, args).await;
    }
    // Still here with a URL: its backend's feature is not compiled in.
    for (flag, wanted) in [("postgres", &args.postgres), ("redis", &args.redis)] {
        if wanted.is_some() {
            return Err(format!(
                "--{flag} needs the `{flag}` feature, which this build lacks: \
                 cargo run --example quickstart --features {flag} -- --{flag} URL"
            )
            .into());
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("eventsink-quickstart-")
        .tempdir()?;
    let path = dir.path().join("queue.db");
    println!("queue {queue} on SQLite in {}", path.display());
    run(SqliteQueue::open(&path, &queue).await?, args).await
}

/// Starts the receiver, the worker and the application on `backend`, sends
/// the signups, waits for their delivery, and shuts everything down.
async fn run<B: QueueBackend<Signup>>(backend: B, args: &Args) -> Result<Summary, BoxError> {
    let stats = Arc::new(Stats::default());
    let secret = Secret::generate()?;
    let receiver = Server::start(receiver_app(
        secret.clone(),
        &stats,
        args.flaky || !args.steady,
    ))
    .await?;
    let webhook = WebhookSink::builder(format!("{}/hooks", receiver.url))
        .secret(secret)
        .build()?;

    let queue = ThroughTaskQueue::new(backend.clone());
    let events: Events = queue.layer(webhook.clone()).boxed_sink();
    // The worker's sink: the webhook, counting each attempt's outcome.
    let attempts = Arc::clone(&stats);
    let counting_attempts = ServiceBuilder::new()
        .map_result(move |result: Result<(), eventsink::Error>| {
            let counter = match result {
                Ok(()) => &attempts.acknowledged,
                Err(_) => &attempts.failed_attempts,
            };
            counter.fetch_add(1, Relaxed);
            result
        })
        .service(webhook);
    let worker = queue
        .worker(counting_attempts)
        .schedule(demo_schedule())
        .spawn();
    let app = Server::start(signup_app(events, &stats)).await?;

    let started = Instant::now();
    let signups = tokio::spawn(send_signups(format!("{}/signup", app.url), args.events));
    let dead_letters = DeadLetters::new(backend);
    let counts = watch_progress(&stats, &dead_letters, args.events, &signups).await?;
    let (requested, elapsed) = (args.events, started.elapsed());
    let summary = Summary {
        requested,
        counts,
        elapsed,
    };
    summary.print();

    if args.serve {
        stats.echo.store(true, Relaxed);
        print_curl_commands(&app.url, &receiver.url);
        tokio::signal::ctrl_c().await?;
    }
    // Shut down in dependency order. The application first, so nothing new
    // is published; then the worker, which lets the deliveries in flight
    // finish and write their outcome, and needs the receiver for that; the
    // receiver last. (In production the receiver is someone else's server.)
    app.stop().await?;
    worker.shutdown().await;
    receiver.stop().await?;
    Ok(summary)
}

/// A short retry schedule so the demo ends quickly: 10 attempts, 1 s
/// doubling to 2 s. Production uses `RetrySchedule::standard()` (5 s up to
/// 10 h, 27 h 35 min in all).
fn demo_schedule() -> RetrySchedule {
    let backoff = Backoff::new()
        .min(Duration::from_secs(1))
        .max(Duration::from_secs(2))
        .attempts(10);
    RetrySchedule::exponential(backoff)
}

/// The application's state; each handler takes the part it needs.
#[derive(Clone, FromRef)]
struct AppState {
    events: Events,
    stats: Arc<Stats>,
}

fn signup_app(events: Events, stats: &Arc<Stats>) -> Router {
    let state = AppState {
        events,
        stats: Arc::clone(stats),
    };
    Router::new()
        .route("/signup", post(signup))
        .with_state(state)
}

/// `POST /signup`: publishes `user.signed_up`, answers 202 with its id once
/// the queue has stored it. Delivery happens later, on the worker.
async fn signup(
    State(mut events): State<Events>,
    State(stats): State<Arc<Stats>>,
    Json(signup): Json<Signup>,
) -> Response {
    let event = Event::new("user.signed_up", signup);
    let id = event.id.to_string();
    match events.publish(event).await {
        Ok(Published::Stored) => {
            stats.published.fetch_add(1, Relaxed);
            (StatusCode::ACCEPTED, id).into_response()
        }
        // An event with this id is queued already (a client retrying with
        // the same id): nothing new was stored.
        Ok(Published::AlreadyQueued) => (StatusCode::OK, id).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not queued: {e}")).into_response(),
    }
}

/// The receiver: verification and replay guard in front of the handler,
/// counting answers outside them, and `--flaky`'s bad network outermost.
fn receiver_app(secret: Secret, stats: &Arc<Stats>, flaky: bool) -> Router {
    let verify = VerifyConfig::new(secret).replay_guard(MemoryReplayGuard::new());
    let app = Router::new()
        .route("/hooks", post(receive))
        .route_layer(VerifyWebhookLayer::new(verify))
        .layer(from_fn_with_state(Arc::clone(stats), count_answers))
        .with_state(Arc::clone(stats));
    match flaky {
        true => app.layer(from_fn_with_state(Arc::default(), flaky_network)),
        false => app,
    }
}

/// The handler: only verified, new event ids get here.
async fn receive(State(stats): State<Arc<Stats>>, body: Bytes) -> StatusCode {
    let Ok(event) = serde_json::from_slice::<Event<Signup>>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    if stats.echo.load(Relaxed) {
        println!(
            "receiver: {} {} for {}",
            event.kind, event.id, event.payload.email
        );
    }
    let mut ids = stats.ids.lock().unwrap_or_else(PoisonError::into_inner);
    ids.insert(event.id);
    StatusCode::NO_CONTENT
}

/// Counts the 2xx answers of the verified app: the handler's, and the
/// replay guard's `200 already handled` to duplicates.
async fn count_answers(State(stats): State<Arc<Stats>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.status().is_success() {
        stats.answered_ok.fetch_add(1, Relaxed);
    }
    response
}

/// `--flaky`'s state: when the trouble started, and whether the 429 was sent.
#[derive(Debug, Default)]
struct Flaky {
    since: OnceLock<Instant>,
    throttled: AtomicBool,
}

/// A bad network in front of the receiver for its first [`FLAKY_FOR`].
async fn flaky_network(State(flaky): State<Arc<Flaky>>, request: Request, next: Next) -> Response {
    if flaky.since.get_or_init(Instant::now).elapsed() > FLAKY_FOR {
        return next.run(request).await;
    }
    if !flaky.throttled.swap(true, Relaxed) {
        let retry_after = [(header::RETRY_AFTER, "2")];
        return (StatusCode::TOO_MANY_REQUESTS, retry_after, "slow down").into_response();
    }
    let roll = fastrand::f64();
    if roll < REFUSED {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let response = next.run(request).await;
    match roll < REFUSED + ANSWER_LOST {
        true => (StatusCode::SERVICE_UNAVAILABLE, "answer lost").into_response(),
        false => response,
    }
}

/// Sends `count` signups, [`IN_FLIGHT`] at a time; reports failures.
async fn send_signups(url: String, count: u64) {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (client, url, next) = (client.clone(), url.clone(), Arc::clone(&next));
        senders.spawn(async move {
            loop {
                let n = next.fetch_add(1, Relaxed);
                if n >= count {
                    return;
                }
                let body = format!(r#"{{"email":"user{n}@example.com"}}"#);
                let post = client.post(&url).header("content-type", "application/json");
                match post.body(body).send().await {
                    Ok(response) if response.status().is_success() => {}
                    Ok(response) => eprintln!(
                        "POST /signup: {}",
                        response.text().await.unwrap_or_default()
                    ),
                    Err(e) => eprintln!("POST /signup: {e}"),
                }
            }
        });
    }
    senders.join_all().await;
}

/// Shows progress until the queue has finished with every published event,
/// acknowledged or buried (or nothing moved for [`PATIENCE`]); the counts then.
async fn watch_progress<B: QueueBackend<Signup>>(
    stats: &Stats,
    dead_letters: &DeadLetters<B, Signup>,
    total: u64,
    signups: &tokio::task::JoinHandle<()>,
) -> Result<Counts, BoxError> {
    let mut progress = Progress::new(total);
    let mut tick = tokio::time::interval(TICK);
    let mut last_change = (Instant::now(), Counts::default());
    loop {
        tick.tick().await;
        let now = Counts::take(stats, dead_letters.count().await?);
        progress.show(&now);
        let settled = now.acknowledged + now.dead >= now.published;
        if signups.is_finished() && settled || last_change.0.elapsed() > PATIENCE {
            progress.bar.finish_and_clear();
            return Ok(now);
        }
        if now != last_change.1 {
            last_change = (Instant::now(), now);
        }
    }
}

/// What the three parts have seen so far.
#[derive(Debug, Default, PartialEq)]
struct Counts {
    published: u64,
    delivered: u64,
    acknowledged: u64,
    duplicates: u64,
    retried: u64,
    dead: u64,
}

impl Counts {
    fn take(stats: &Stats, dead: u64) -> Self {
        let delivered = stats.unique();
        Counts {
            published: stats.published.load(Relaxed),
            delivered,
            acknowledged: stats.acknowledged.load(Relaxed),
            duplicates: stats.answered_ok.load(Relaxed).saturating_sub(delivered),
            retried: stats.failed_attempts.load(Relaxed),
            dead,
        }
    }

    fn line(&self) -> String {
        let (published, delivered) = (self.published, self.delivered);
        let (retried, dead) = (self.retried, self.dead);
        format!("published {published}  delivered {delivered}  retried {retried}  dead {dead}")
    }
}

/// A progress bar on a terminal; without one, a plain line every second.
struct Progress {
    bar: ProgressBar,
    printed: Option<Instant>,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = match std::io::stdout().is_terminal() {
            true => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout()),
            false => ProgressBar::hidden(),
        };
        let style = ProgressStyle::with_template("{msg}  {wide_bar}");
        bar.set_style(style.unwrap_or_else(|_| ProgressStyle::default_bar()));
        Progress { bar, printed: None }
    }

    fn show(&mut self, now: &Counts) {
        self.bar.set_position(now.delivered);
        self.bar.set_message(now.line());
        let due = self
            .printed
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if self.bar.is_hidden() && due {
            println!("{}", now.line());
            self.printed = Some(Instant::now());
        }
    }
}

/// The run's outcome, and the exit code it earns.
#[derive(Debug)]
struct Summary {
    requested: u64,
    counts: Counts,
    elapsed: Duration,
}

impl Summary {
    fn print(&self) {
        let c = &self.counts;
        let seconds = self.elapsed.as_secs_f64();
        let rate = c.delivered as f64 / seconds.max(1e-3);
        println!(
            "published {}, delivered {} (unique ids), duplicates {} (answered by the replay guard), \
             retried {}, dead letters {}; {seconds:.1} s, {rate:.0} events/s",
            c.published, c.delivered, c.duplicates, c.retried, c.dead
        );
    }

    /// Success only if every signup was published and every published
    /// event arrived, none as a dead letter; otherwise says what is missing.
    fn verdict(&self) -> ExitCode {
        let c = &self.counts;
        let unpublished = self.requested.saturating_sub(c.published);
        let undelivered = c.published.saturating_sub(c.delivered);
        let problems: Vec<String> = [
            (unpublished, "signups not published (see the errors above)"),
            (undelivered, "published events never reached the receiver"),
            (c.dead, "events ended as dead letters"),
        ]
        .into_iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, what)| format!("{count} {what}"))
        .collect();
        if problems.is_empty() {
            println!("ok: every event arrived, once at the handler");
            return ExitCode::SUCCESS;
        }
        eprintln!("FAILED: {}", problems.join("; "));
        ExitCode::FAILURE
    }
}

fn print_curl_commands(app: &str, receiver: &str) {
    let json = "-H 'content-type: application/json'";
    println!("\nboth apps keep running; try (Ctrl-C to stop):");
    println!("  curl -i {app}/signup {json} -d '{{\"email\":\"ada@example.com\"}}'");
    println!("  curl -i {receiver}/hooks {json} -d '{{}}'    # unsigned: refused");
}

/// An axum app on a loopback port of its own.
struct Server {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(app: Router) -> Result<Self, BoxError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { serve.await });
        Ok(Server { url, stop, task })
    }

    /// Stops accepting connections and waits for the requests in flight.
    async fn stop(self) -> Result<(), BoxError> {
        let _ = self.stop.send(());
        Ok(self.task.await??)
    }
}
