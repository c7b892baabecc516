//! The main job, end to end on the embedded default; no server needed.
//!
//! Events are published into a durable SQLite queue; a worker delivers them
//! as signed webhooks to a receiver (in this process) that is down for its
//! first requests; the queue retries on its schedule until every event has
//! reached the receiver's handler, verified, exactly once.
//!
//! Run with `cargo run --example quickstart`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use eventsink::queue::{RetrySchedule, SqliteQueue, ThroughTaskQueue};
use eventsink::signature::Secret;
use eventsink::verify::{MemoryReplayGuard, VerifyConfig, VerifyWebhookLayer};
use eventsink::{Backoff, BoxError, Event, SinkExt, WebhookSink};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tower::Layer;

/// Events the example publishes.
const EVENTS: u64 = 5;
/// Requests the receiver refuses with 503 before it "comes back up".
const DOWN_FOR: usize = 3;
/// How long the example waits for every event before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
    total_cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = tempfile::Builder::new()
        .prefix("eventsink-quickstart-")
        .tempdir()?;
    let secret = Secret::generate()?;
    let receiver = Receiver::start(secret.clone()).await?;

    // The sender: a signed webhook behind a durable queue in its own file.
    let webhook = WebhookSink::builder(&receiver.url).secret(secret).build()?;
    let queue =
        ThroughTaskQueue::new(SqliteQueue::open(dir.path().join("queue.db"), "quickstart").await?);
    let mut sink = queue.layer(webhook.clone()); // publishes: stores each event as a job
    let backoff = Backoff::new()
        .min(Duration::from_secs(1))
        .max(Duration::from_secs(4))
        .attempts(10);
    let schedule = RetrySchedule::exponential(backoff);
    let worker = queue.worker(webhook).schedule(schedule).spawn(); // delivers them

    let started = Instant::now();
    for order_id in 1..=EVENTS {
        let event = Event::new(
            "order.placed",
            OrderPlaced {
                order_id,
                total_cents: 1250 * order_id,
            },
        );
        sink.publish(event.clone()).await?; // returns once SQLite has the job
        println!("queued    {} {} (order {order_id})", event.kind, event.id);
    }

    let mut arrived = receiver.arrived;
    for _ in 0..EVENTS {
        let event = tokio::time::timeout(PATIENCE, arrived.recv())
            .await
            .map_err(|_| "timed out waiting for deliveries")?
            .ok_or("the receiver stopped")?;
        let order: &OrderPlaced = &event.payload;
        println!(
            "delivered {} {} (order {}, {} cents) after {:?}",
            event.kind,
            event.id,
            order.order_id,
            order.total_cents,
            started.elapsed()
        );
    }
    worker.shutdown().await;

    let requests = receiver.requests.load(Ordering::SeqCst);
    println!(
        "\n{EVENTS} events delivered through {} ({requests} requests: the receiver refused the first \
         {DOWN_FOR} with 503, the queue retried them on its schedule; every request was signed and verified)",
        dir.path().join("queue.db").display()
    );
    Ok(())
}

/// A receiver in this process: axum with `VerifyWebhookLayer` in front of
/// a handler that answers 503 to its first [`DOWN_FOR`] requests.
struct Receiver {
    url: String,
    requests: Arc<AtomicUsize>,
    arrived: mpsc::UnboundedReceiver<Event<OrderPlaced>>,
}

impl Receiver {
    async fn start(secret: Secret) -> Result<Self, BoxError> {
        let requests = Arc::new(AtomicUsize::new(0));
        let (tx, arrived) = mpsc::unbounded_channel();
        let handler = {
            let requests = Arc::clone(&requests);
            // Behind the layer, the body is the exact bytes that were signed.
            move |body: Bytes| {
                let (requests, tx) = (Arc::clone(&requests), tx.clone());
                async move {
                    let Ok(event) = serde_json::from_slice::<Event<OrderPlaced>>(&body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    if requests.fetch_add(1, Ordering::SeqCst) < DOWN_FOR {
                        println!("receiver  down: 503 for {}", event.id);
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let _ = tx.send(event);
                    StatusCode::NO_CONTENT
                }
            }
        };
        let verify = VerifyWebhookLayer::new(
            VerifyConfig::new(secret).replay_guard(MemoryReplayGuard::new()),
        );
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(handler))
            .route_layer(verify);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Receiver {
            url,
            requests,
            arrived,
        })
    }
}
