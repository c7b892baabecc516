//! A webhook receiver: an axum app that verifies the webhooks a
//! `WebhookSink` sends (Standard Webhooks, or the Go original's format),
//! answers duplicates without running the handler twice, and logs every
//! request with tower-http's `TraceLayer`.
//!
//! ```text
//! cargo run --example receiver --features axum
//! EVENTSINK_WEBHOOK_SECRET=whsec_... EVENTSINK_RECEIVER_ADDR=127.0.0.1:3000 \
//!     cargo run --example receiver --features axum
//! ```
//!
//! Without `EVENTSINK_WEBHOOK_SECRET` it makes a secret for this run (and
//! never prints it). Either way it prints a `curl` command carrying a
//! correctly signed sample event: run it twice to see `200` from the handler
//! and then `200 already handled`; change a byte of the body to see `401`.
//!
//! It is served as in production, where anyone can open connections: every
//! wait a client controls is bounded. Headers must arrive within
//! [`HEADER_READ_TIMEOUT`] (hyper's `header_read_timeout`, also between
//! requests on a kept-alive connection), the body within the layer's
//! `body_timeout`, the whole request within [`REQUEST_TIMEOUT`]
//! (tower-http's `TimeoutLayer`), and at most [`MAX_CONNECTIONS`] are open
//! at once (the rest wait in the listen backlog). `axum::serve` sets no
//! header timeout, so a slow-loris client could hold its connections open
//! indefinitely.

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    app::main().await
}

/// How long a client may take to send a request's headers: 10 s. A sender
/// on a working link sends them in one packet; hyper's own default (30 s)
/// lets a slow-loris client hold a connection three times as long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one request may take, body and handler included: 30 s, the
/// longest attempt Standard Webhooks recommends senders to wait (15–30 s);
/// after that the sender has given up and will retry anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections open at once: 1000, under the usual limit of 1024 open files
/// per process (`ulimit -n`) with room for the process's other files, so
/// that accepting does not fail for lack of file descriptors. Raise both
/// together.
const MAX_CONNECTIONS: usize = 1000;

mod app {

    use std::sync::Arc;

    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use eventsink::signature::{Scheme, Secret};
    use eventsink::verify::{self, MemoryReplayGuard, Verified, VerifyConfig, VerifyWebhookLayer};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;
    use tower_http::timeout::TimeoutLayer;
    use tower_http::trace::TraceLayer;
    use tracing_subscriber::EnvFilter;

    use super::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, REQUEST_TIMEOUT};

    /// The handler: runs once per event id, and only for verified requests.
    async fn webhook(Verified { event, webhook }: Verified) -> &'static str {
        tracing::info!(
            kind = %event.kind,
            id = %event.id,
            signed_at = webhook.timestamp,
            payload = %event.payload,
            "event received"
        );
        "ok"
    }

    pub(crate) async fn main() -> Result<(), Box<dyn std::error::Error>> {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr) // stdout keeps the sample command alone
            .with_env_filter(
                EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| EnvFilter::new("info,tower_http=debug,eventsink=debug")),
            )
            .init();

        let secret = match std::env::var("EVENTSINK_WEBHOOK_SECRET") {
            Ok(text) => text.parse::<Secret>()?,
            Err(_) => {
                tracing::warn!(
                    "EVENTSINK_WEBHOOK_SECRET is not set; using a secret made for this run"
                );
                Secret::generate()?
            }
        };
        let addr =
            std::env::var("EVENTSINK_RECEIVER_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());

        let config = VerifyConfig::new(secret.clone())
            // Standard Webhooks from current senders, the `signature` header from Go ones.
            .scheme(Scheme::Both)
            .tolerance(verify::DEFAULT_TOLERANCE)
            .max_body_bytes(256 * 1024)
            .body_timeout(verify::DEFAULT_BODY_TIMEOUT) // a dripped body gets 408
            // Remember handled ids for the default window (covers the queue's retry
            // schedule) and up to 200 000 of them (about 40 MiB).
            .replay_guard(MemoryReplayGuard::new().capacity(200_000));
        let verify = VerifyWebhookLayer::new(config);

        let app = Router::new()
            .route("/webhooks", post(webhook))
            .route_layer(verify) // only the routes above need a signature
            .route("/health", get(|| async { "ok" }))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                REQUEST_TIMEOUT,
            ))
            .layer(TraceLayer::new_for_http());

        let listener = TcpListener::bind(&addr).await?;
        let local = listener.local_addr()?;
        print_sample_request(&secret, &format!("http://{local}/webhooks"))?;
        tokio::select! {
            result = serve(listener, app) => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    }

    /// Accepts connections, at most [`MAX_CONNECTIONS`] at once, and serves
    /// each with HTTP/1 and a header-read timeout.
    async fn serve(listener: TcpListener, app: Router) -> Result<(), Box<dyn std::error::Error>> {
        let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            // Wait for a free slot before accepting: excess clients wait in
            // the kernel's backlog instead of holding a task and a socket.
            let slot = Arc::clone(&open).acquire_owned().await?;
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, a connection reset before
                    // accept: the listener itself is fine.
                    tracing::warn!("accept failed: {error}");
                    continue;
                }
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(error) = served {
                    tracing::debug!("connection closed: {error}");
                }
                drop(slot);
            });
        }
    }

    /// Prints a `curl` command with a sample event signed now.
    fn print_sample_request(secret: &Secret, url: &str) -> Result<(), Box<dyn std::error::Error>> {
        let event = eventsink::Event::new("order.placed", serde_json::json!({"order_id": 7}));
        let body = serde_json::to_string(&event)?;
        let timestamp = chrono::Utc::now().timestamp();
        let headers = verify::sign(
            std::slice::from_ref(secret),
            &event.id,
            timestamp,
            body.as_bytes(),
        )?;
        println!("listening on {url}; within 5 minutes, try (twice):\n");
        print!("curl -i {url} -H 'content-type: application/json'");
        for (name, value) in &headers {
            print!(" -H '{name}: {}'", value.to_str()?);
        }
        println!(" --data-raw '{body}'\n");
        Ok(())
    }
}
