//! A stand-alone publisher process: an axum app that stores each event it
//! is sent in a shared queue, for `worker` processes to deliver.
//!
//! - `POST /events/{kind}` with a JSON body publishes an event of `kind`
//!   with the body as its payload through `ThroughTaskQueue`, and answers
//!   `202 Accepted` with `{"id": "..."}` once the backend has stored it
//!   (it will be delivered at least once), or `200 OK` with
//!   `{"id": "...", "already_queued": true}` when an event with that id is
//!   queued already (nothing new is stored). The id is the request's
//!   `Idempotency-Key` header, or a new UUID v7 without one. `503` with the
//!   error means the backend is down or slow, and the event may or may not
//!   be stored: send the request again with the same `Idempotency-Key`
//!   (without one, a retry is a second event). `422` means the event cannot
//!   be stored (an id or kind the wire format refuses).
//! - `GET /healthz` answers `200 ok`.
//!
//! It runs no worker: start `worker` processes on the same queue (see
//! `examples/worker.rs` for two workers and a publisher by hand):
//!
//! ```text
//! export QUEUE_POSTGRES_URL=postgres://postgres@127.0.0.1/test
//! cargo run --example publisher --features postgres,redis -- --listen 127.0.0.1:8080
//! curl -i http://127.0.0.1:8080/events/order.placed -d '{"order_id": 7}' -H 'content-type: application/json'
//! ```
//!
//! The first line on stdout is `listening on http://ADDR`, with the port
//! the system chose for the default `--listen 127.0.0.1:0`; logs go to
//! stderr, filtered by `RUST_LOG` (`info` by default). The backend's URL is
//! never logged. An unreachable backend at start is retried with a backoff
//! (1 s doubling to 30 s); later outages fail the publishes meanwhile
//! (`503`), and the connection pool reconnects by itself. Ctrl-C or
//! SIGTERM stops accepting connections, lets the requests in flight finish
//! (each publish ends within its 15 s deadline), then exits 0.

mod shared;

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::Router;
use axum::extract::{Json, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use eventsink::queue::{PostgresQueue, QueueBackend, RedisQueue, SqliteQueue, ThroughTaskQueue};
use eventsink::queue::{Published, Publisher};
use eventsink::{BoxError, Event, NoopSink, Retryable, SinkExt};
use serde_json::{Value, json};
use shared::{Location, QueueArgs};
use tower::Layer;

/// Publishes events into a shared queue over HTTP.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    queue: QueueArgs,
    /// Address to listen on; port 0 lets the system choose.
    #[arg(long, env = "PUBLISHER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    shared::init_tracing();
    shared::exit_code(run(args).await)
}

async fn run(args: Args) -> Result<(), BoxError> {
    let mut stop = Box::pin(shared::shutdown_signal()?);
    let location = args.queue.location()?;
    let sink = tokio::select! {
        sink = open(location, &args.queue.name) => sink?,
        signal = &mut stop => {
            tracing::info!(signal, "stopped before the queue was open");
            return Ok(());
        }
    };
    let app = Router::new()
        .route("/events/{kind}", post(publish))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sink);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    println!("listening on http://{}", listener.local_addr()?);
    tracing::info!(queue = %args.queue.name, "publishing");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let signal = stop.await;
            tracing::info!(signal, "stopping; requests in flight finish first");
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// Opens the queue at `location` and returns its publishing service.
async fn open(location: Location<'_>, name: &str) -> Result<Publisher, BoxError> {
    Ok(match location {
        Location::Postgres(url) => {
            publisher::<PostgresQueue>(shared::open(|| PostgresQueue::connect(url, name)).await?)
        }
        Location::Redis(url) => {
            publisher::<RedisQueue>(shared::open(|| RedisQueue::connect(url, name)).await?)
        }
        Location::Sqlite(path) => {
            publisher::<SqliteQueue>(shared::open(|| SqliteQueue::open(path, name)).await?)
        }
    })
}

/// Publishing only: the inner sink is the worker's, and no worker runs
/// here, so it is a `NoopSink` that is never called.
fn publisher<B: QueueBackend<Value>>(queue: B) -> Publisher {
    ThroughTaskQueue::new(queue)
        .layer(NoopSink::new())
        .boxed_sink()
}

/// `POST /events/{kind}`: stores the event; `202` with its id once stored.
async fn publish(
    State(mut sink): State<Publisher>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    Json(payload): Json<Value>,
) -> Response {
    let event = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        None => Event::new(kind, payload),
        Some(Ok(key)) => Event::with_id(kind, key, payload),
        Some(Err(_)) => {
            let error = "the Idempotency-Key header must be visible ASCII; use a UUID";
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
        }
    };
    let id = event.id.clone();
    match sink.publish(event).await {
        Ok(Published::Stored) => (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response(),
        // A retry with the same Idempotency-Key: the first request stored it.
        Ok(Published::AlreadyQueued) => {
            let body = json!({ "id": id, "already_queued": true });
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => {
            let error = shared::chain(&*e);
            tracing::warn!(event = %id, %error, "publish failed");
            let status = if e.is_retryable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            (status, Json(json!({ "error": error }))).into_response()
        }
    }
}
