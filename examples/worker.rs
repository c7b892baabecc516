//! A stand-alone worker process: delivers the events of a shared queue as
//! signed webhooks, until Ctrl-C or SIGTERM.
//!
//! Run as many as you like, on as many machines, against one Postgres or
//! Redis queue (or one SQLite file, on one machine): each job is delivered
//! by one of them. Events get into the queue from `publisher` processes
//! (see `examples/publisher.rs`) or from any app that publishes through
//! `ThroughTaskQueue` onto the same queue name.
//!
//! Two workers and a publisher by hand, with the `receiver` example as the
//! destination. Make a secret once (`echo whsec_$(openssl rand -base64
//! 32)`), then run each command in its own terminal, after the two
//! `export`s:
//!
//! ```text
//! export WEBHOOK_SECRET=whsec_...    # the same secret in every terminal
//! export QUEUE_POSTGRES_URL=postgres://postgres@127.0.0.1/test
//! EVENTSINK_WEBHOOK_SECRET=$WEBHOOK_SECRET cargo run --example receiver --features axum
//! cargo run --example worker --features postgres,redis -- --url http://127.0.0.1:3000/webhooks
//! cargo run --example worker --features postgres,redis -- --url http://127.0.0.1:3000/webhooks
//! cargo run --example publisher --features postgres,redis -- --listen 127.0.0.1:8080
//! curl -i http://127.0.0.1:8080/events/order.placed -d '{"order_id": 7}' -H 'content-type: application/json'
//! ```
//!
//! Every flag has an environment variable (`--help` lists them); pass the
//! secret as `WEBHOOK_SECRET` rather than `--secret`, since other users of
//! the machine can read command lines. Neither the secret nor the backend's
//! URL is ever logged. Logs go to stderr, filtered by `RUST_LOG` (`info`
//! by default); stdout gets one line, `ready`, once the queue is open.
//!
//! **Outages.** If the backend is unreachable at start, the worker tries
//! again with a backoff (1 s doubling to 30 s) until it is. Once running,
//! a backend error ends the current apalis run and `QueueWorker` starts a
//! new one after a backoff (100 ms doubling to 30 s), under a new name so
//! that it never meets its own stale lease: the process does not exit, and
//! it logs each restart. Jobs it had leased are taken over after the lease
//! (15 s by default), by it or by another worker.
//!
//! **Stopping.** Ctrl-C or SIGTERM stops fetching, lets the deliveries in
//! flight finish (at most the attempt timeout plus 5 s) and hands back the
//! jobs fetched but not started, then exits 0.

mod shared;

use std::process::ExitCode;

use clap::Parser;
use eventsink::queue::{
    DEFAULT_CONCURRENCY, PostgresQueue, QueueBackend, QueueWorker, RedisQueue, SqliteQueue,
    WorkerHandle,
};
use eventsink::signature::Secret;
use eventsink::{BoxError, WebhookSink};
use shared::{Location, QueueArgs};

/// Delivers the events of a shared queue as signed webhooks.
// Not `Debug`: it holds the secret.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    queue: QueueArgs,
    /// The receiver's webhook URL.
    #[arg(long, env = "WEBHOOK_URL")]
    url: String,
    /// The signing secret, `whsec_...` (prefer the environment variable).
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    secret: String,
    /// Deliveries at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    shared::init_tracing();
    shared::exit_code(run(args).await)
}

async fn run(args: Args) -> Result<(), BoxError> {
    let mut stop = Box::pin(shared::shutdown_signal()?);
    // A `SecretError` never contains the secret.
    let secret =
        Secret::from_whsec(&args.secret).map_err(|e| format!("--secret (WEBHOOK_SECRET): {e}"))?;
    let webhook = WebhookSink::builder(&args.url)
        .secret(secret)
        .build()
        .map_err(|e| format!("--url (WEBHOOK_URL): {e}"))?;
    tracing::info!(queue = %args.queue.name, ?webhook, "starting");
    let location = args.queue.location()?;
    let worker = tokio::select! {
        worker = start(location, &args.queue.name, webhook, args.concurrency) => worker?,
        signal = &mut stop => {
            tracing::info!(signal, "stopped before the queue was open");
            return Ok(());
        }
    };
    println!("ready");
    let signal = stop.await;
    tracing::info!(signal, "stopping; deliveries in flight finish first");
    worker.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Opens the queue at `location` and spawns its worker.
async fn start(
    location: Location<'_>,
    name: &str,
    webhook: WebhookSink,
    concurrency: usize,
) -> Result<WorkerHandle, BoxError> {
    Ok(match location {
        Location::Postgres(url) => {
            let queue: PostgresQueue = shared::open(|| PostgresQueue::connect(url, name)).await?;
            spawn(queue, webhook, concurrency)
        }
        Location::Redis(url) => {
            let queue: RedisQueue = shared::open(|| RedisQueue::connect(url, name)).await?;
            spawn(queue, webhook, concurrency)
        }
        Location::Sqlite(path) => {
            let queue: SqliteQueue = shared::open(|| SqliteQueue::open(path, name)).await?;
            spawn(queue, webhook, concurrency)
        }
    })
}

fn spawn<B: QueueBackend<serde_json::Value>>(
    queue: B,
    webhook: WebhookSink,
    concurrency: usize,
) -> WorkerHandle {
    QueueWorker::new(queue, webhook)
        .concurrency(concurrency)
        .spawn()
}
