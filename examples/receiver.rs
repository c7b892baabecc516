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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    app::main().await
}

mod app {

    use axum::Router;
    use axum::routing::{get, post};
    use eventsink::signature::{Scheme, Secret};
    use eventsink::verify::{self, MemoryReplayGuard, Verified, VerifyConfig, VerifyWebhookLayer};
    use tower_http::trace::TraceLayer;
    use tracing_subscriber::EnvFilter;

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
            // Remember handled ids for the default window (covers the queue's retry
            // schedule) and up to 200 000 of them (about 40 MiB).
            .replay_guard(MemoryReplayGuard::new().capacity(200_000));
        let verify = VerifyWebhookLayer::new(config);

        let app = Router::new()
            .route("/webhooks", post(webhook))
            .route_layer(verify) // only the routes above need a signature
            .route("/health", get(|| async { "ok" }))
            .layer(TraceLayer::new_for_http());

        let listener = tokio::net::TcpListener::bind(&addr).await?;
        let local = listener.local_addr()?;
        print_sample_request(&secret, &format!("http://{local}/webhooks"))?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
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
