//! Scenarios of the webhook sink: one publisher and 64 concurrent
//! publishers, each against a bare reqwest POST loop of the same request on
//! the same client settings, to an HTTP/1.1 receiver on loopback that reads
//! the body and answers 204.
//!
//! "The same request": the baseline sends the same body *and* the same
//! headers (`user-agent`, `webhook-id`, `webhook-timestamp`,
//! `webhook-signature`), computed once before the loop. The receiver runs
//! in this process, so header bytes cost both sides alike; the ratio is what
//! the sink itself adds per event: serialising, signing, classifying.
//!
//! `webhook_c64_layered` is `webhook_c64` with tower layers on the sink's
//! HTTP leg (tower-http's `TraceLayer`, no subscriber listening, and a
//! `ConcurrencyLimitLayer` of 64): what a user's stack adds on top.

use std::net::SocketAddr;

use eventsink::signature::Secret;
use eventsink::webhook::{
    DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, WebhookSink, WebhookSinkBuilder,
};
use eventsink::{Error, Event, SinkExt};
use serde_json::json;
use tower::Service;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::trace::TraceLayer;

use crate::harness::{Options, Scenario, paired, per_second, report, runtime};

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "webhook_c1",
            run: webhook_c1,
        },
        Scenario {
            name: "webhook_c64",
            run: webhook_c64,
        },
        Scenario {
            name: "webhook_c64_layered",
            run: webhook_c64_layered,
        },
    ]
}

fn webhook_c1(options: &Options) {
    run("webhook_c1", 1, options.size(1_000, 5_000), plain);
}

fn webhook_c64(options: &Options) {
    run("webhook_c64", 64, options.size(50, 250), plain);
}

fn webhook_c64_layered(options: &Options) {
    run(
        "webhook_c64_layered",
        64,
        options.size(50, 250),
        |builder| {
            builder
                .http_layer(TraceLayer::new_for_http())
                .http_layer(ConcurrencyLimitLayer::new(64))
                .build()
                .expect("sink")
        },
    );
}

fn plain(builder: WebhookSinkBuilder) -> WebhookSink {
    builder.build().expect("sink")
}

fn run<S>(name: &str, publishers: usize, per_publisher: usize, build: fn(WebhookSinkBuilder) -> S)
where
    S: Service<Event, Response = (), Error = Error> + Clone + Send + 'static,
    S::Future: Send,
{
    let rt = runtime();
    let addr = rt.block_on(start_receiver());
    let url = format!("http://{addr}/hook");
    let total = publishers * per_publisher;
    let m = paired(
        || {
            let sink = build(WebhookSink::builder(&url).secret(secret()));
            rt.block_on(sink_round(sink, publishers, per_publisher, total))
        },
        || rt.block_on(reqwest_round(&url, publishers, per_publisher, total)),
    );
    report(
        name,
        m.ours,
        m.baseline,
        m.ratio,
        "events/s",
        "bare reqwest POST loop, same body and headers",
    );
}

async fn start_receiver() -> SocketAddr {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|body: axum::body::Bytes| async move {
            std::hint::black_box(body);
            axum::http::StatusCode::NO_CONTENT
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("receiver") });
    addr
}

fn event(publisher: usize) -> Event {
    Event::new(
        "bench.webhook",
        json!({"publisher": publisher, "order_id": 7, "total_cents": 1250, "note": "x".repeat(200)}),
    )
}

fn secret() -> Secret {
    "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
        .parse()
        .expect("secret")
}

async fn sink_round<S>(sink: S, publishers: usize, per_publisher: usize, total: usize) -> f64
where
    S: Service<Event, Response = (), Error = Error> + Clone + Send + 'static,
    S::Future: Send,
{
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for publisher in 0..publishers {
        let (mut sink, event) = (sink.clone(), event(publisher));
        tasks.spawn(async move {
            for _ in 0..per_publisher {
                sink.publish(event.clone()).await.expect("delivered");
            }
        });
    }
    tasks.join_all().await;
    per_second(total, started.elapsed())
}

async fn reqwest_round(url: &str, publishers: usize, per_publisher: usize, total: usize) -> f64 {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
        .build()
        .expect("client");
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for publisher in 0..publishers {
        let event = event(publisher);
        let body = serde_json::to_vec(&event).expect("body");
        let timestamp = chrono::Utc::now().timestamp();
        let signature = eventsink::signature::sign(&[secret()], &event.id, timestamp, &body);
        let (client, url) = (client.clone(), url.to_owned());
        tasks.spawn(async move {
            for _ in 0..per_publisher {
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("user-agent", eventsink::webhook::USER_AGENT_VALUE)
                    .header("webhook-id", &*event.id)
                    .header("webhook-timestamp", timestamp)
                    .header("webhook-signature", &signature)
                    .timeout(DEFAULT_ATTEMPT_TIMEOUT)
                    .body(body.clone())
                    .send()
                    .await
                    .expect("sent");
                assert_eq!(response.status(), 204);
            }
        });
    }
    tasks.join_all().await;
    per_second(total, started.elapsed())
}
