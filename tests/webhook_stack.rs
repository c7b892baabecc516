//! The webhook's HTTP leg as a tower stack, against real receivers on
//! 127.0.0.1: a hyper-util client as the inner service, tower-http's
//! `TraceLayer` and `SetSensitiveRequestHeadersLayer`, tower's
//! `ConcurrencyLimitLayer` and `TimeoutLayer`, the classification of the
//! leg's errors, and the egress guard under layers.
#![cfg(all(feature = "webhook", feature = "axum"))]

mod support;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use eventsink::signature::Secret;
use eventsink::verify::{VerifiedWebhook, VerifyWebhookLayer};
use eventsink::webhook::{BuildError, EgressPolicy, RequestBody, WebhookSink};
use eventsink::{Error, Event, Retryable, SinkExt};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use support::receiver::{Receiver, Reply};
use tokio::sync::{mpsc, watch};
use tower::Service;
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::TimeoutLayer;
use tower::util::MapRequestLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultMakeSpan, TraceLayer};

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// How long a test waits for something that should happen at once, before
/// it fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

fn secret() -> Secret {
    SECRET.parse().unwrap()
}

fn hyper_client() -> Client<HttpConnector, RequestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn a_hyper_client_as_the_http_leg_delivers_a_verified_webhook() {
    let (seen, mut arrivals) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/hook",
            post(move |webhook: VerifiedWebhook, body: Bytes| {
                let seen = seen.clone();
                async move {
                    seen.send((webhook.id.to_string(), body)).unwrap();
                    http::StatusCode::NO_CONTENT
                }
            }),
        )
        .route_layer(VerifyWebhookLayer::new(secret()));
    let addr = serve(app).await;

    let mut sink = WebhookSink::builder(format!("http://{addr}/hook"))
        .secret(secret())
        .build_with(hyper_client())
        .unwrap();
    let event = Event::new("order.placed", json!({"order_id": 7}));
    // The receiver answers 401 to a signature it cannot verify, which
    // fails this publish.
    sink.publish(event.clone()).await.unwrap();

    let (id, body) = tokio::time::timeout(PATIENCE, arrivals.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, &*event.id);
    assert_eq!(
        serde_json::from_slice::<Event>(&body).unwrap().payload,
        event.payload
    );
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn a_trace_of_the_http_leg_records_the_request_but_no_secret() {
    let receiver = Receiver::start().await;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    // This test's runtime has one thread: every poll of the sink runs under
    // this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut sink = WebhookSink::builder(receiver.url("/hook"))
        .secret(secret())
        .header("x-api-key", "key-from-the-custom-header")
        // Outermost first: a layer of ours adds a secret header, the
        // sensitive-headers layer marks it, the trace records the headers.
        .http_layer(MapRequestLayer::new(|mut request: Request<RequestBody>| {
            let token = HeaderValue::from_static("Bearer token-from-a-layer");
            request.headers_mut().insert(AUTHORIZATION, token);
            request
        }))
        .http_layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        .http_layer(
            TraceLayer::new_for_http().make_span_with(DefaultMakeSpan::new().include_headers(true)),
        )
        .build()
        .unwrap();
    sink.publish(Event::new("order.placed", json!({"order_id": 7})))
        .await
        .unwrap();

    let sent = &receiver.wait_for(1, PATIENCE).await[0];
    let signature = sent.header("webhook-signature");
    assert!(signature.starts_with("v1,"), "{signature}");
    assert_eq!(sent.header("authorization"), "Bearer token-from-a-layer");
    let trace = captured.text();
    // The trace saw the request and its headers...
    for expected in [
        "started processing request",
        "finished processing request",
        "uri=http://127.0.0.1",
        "\"webhook-signature\": Sensitive",
        "\"x-api-key\": Sensitive",
        "\"authorization\": Sensitive",
        "\"webhook-id\"",
    ] {
        assert!(trace.contains(expected), "{expected:?} not in:\n{trace}");
    }
    // ...but none of the secrets.
    for secret in [
        &signature[3..],
        "key-from-the-custom-header",
        "token-from-a-layer",
    ] {
        assert!(!trace.contains(secret), "{secret:?} in:\n{trace}");
    }
}

#[tokio::test]
async fn a_layer_may_rewrite_the_request_the_default_client_sends() {
    let (intended, actual) = (Receiver::start().await, Receiver::start().await);
    let elsewhere: http::Uri = actual.url("/elsewhere").parse().unwrap();
    let mut sink = WebhookSink::builder(intended.url("/hook"))
        .secret(secret())
        .http_layer(MapRequestLayer::new(
            move |mut request: Request<RequestBody>| {
                *request.uri_mut() = elsewhere.clone();
                request.extensions_mut().insert("a layer's note");
                request
            },
        ))
        .build()
        .unwrap();
    sink.publish(Event::new("order.placed", json!({"order_id": 7})))
        .await
        .unwrap();
    let sent = &actual.wait_for(1, PATIENCE).await[0];
    assert_eq!(sent.path, "/elsewhere");
    assert!(sent.header("webhook-signature").starts_with("v1,"));
    assert!(intended.requests().is_empty());
}

/// Polls the sink's readiness once, without waiting.
fn poll_ready_once<S: Service<Event>>(sink: &mut S) -> Poll<Result<(), S::Error>> {
    sink.poll_ready(&mut Context::from_waker(Waker::noop()))
}

#[tokio::test]
async fn a_concurrency_limit_caps_requests_in_flight_at_the_receiver() {
    const LIMIT: usize = 2;
    const PUBLISHERS: usize = 6;
    // The receiver holds every request until the gate opens, and counts
    // how many it holds at once.
    let (gate, gate_rx) = watch::channel(false);
    let (arrived, mut arrived_rx) = watch::channel(0usize);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most_in_flight = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/hook",
        post({
            let (in_flight, most_in_flight) = (in_flight.clone(), most_in_flight.clone());
            move |_: Bytes| async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most_in_flight.fetch_max(now, Ordering::SeqCst);
                arrived.send_modify(|n| *n += 1);
                gate_rx.clone().wait_for(|open| *open).await.unwrap();
                in_flight.fetch_sub(1, Ordering::SeqCst);
                http::StatusCode::NO_CONTENT
            }
        }),
    );
    let addr = serve(app).await;

    let sink = WebhookSink::builder(format!("http://{addr}/hook"))
        .http_layer(ConcurrencyLimitLayer::new(LIMIT))
        .build()
        .unwrap();
    let mut publishers = tokio::task::JoinSet::new();
    for n in 0..PUBLISHERS {
        let mut sink = sink.clone();
        publishers.spawn(async move { sink.publish(Event::new("order.placed", n)).await });
    }
    tokio::time::timeout(PATIENCE, arrived_rx.wait_for(|&n| n >= LIMIT))
        .await
        .unwrap()
        .unwrap();
    // Both permits are taken: the sink says so in poll_ready.
    assert!(poll_ready_once(&mut sink.clone()).is_pending());

    gate.send_replace(true);
    for result in tokio::time::timeout(PATIENCE, publishers.join_all())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    assert_eq!(*arrived_rx.borrow(), PUBLISHERS);
    assert_eq!(most_in_flight.load(Ordering::SeqCst), LIMIT);
}

#[tokio::test]
async fn an_http_leg_that_cannot_connect_fails_transiently() {
    // A port nothing listens on any more.
    let addr = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let mut sink = WebhookSink::builder(format!("http://{addr}/hook"))
        .build_with(hyper_client())
        .unwrap();
    let err = sink
        .publish(Event::new("order.placed", ()))
        .await
        .unwrap_err();
    support::assert_transient_transport(&err, false);
    assert!(err.to_string().contains("could not be reached"), "{err}");
}

#[tokio::test]
async fn a_timeout_layer_on_the_http_leg_is_a_transient_timeout() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(204).delay(PATIENCE)]);
    let mut sink = WebhookSink::builder(receiver.url("/hook"))
        .http_layer(TimeoutLayer::new(Duration::from_millis(50)))
        .build()
        .unwrap();
    let err = sink
        .publish(Event::new("order.placed", ()))
        .await
        .unwrap_err();
    support::assert_transient_transport(&err, true);
}

#[tokio::test]
async fn the_egress_guard_still_refuses_private_addresses_under_layers() {
    let receiver = Receiver::start().await;
    let port = receiver.addr.port();
    let mut guarded = WebhookSink::builder(format!("http://localhost:{port}/hook"))
        .egress(EgressPolicy::public_only())
        .http_layer(TraceLayer::new_for_http())
        .http_layer(ConcurrencyLimitLayer::new(4))
        .build()
        .unwrap();
    let err = guarded
        .publish(Event::new("order.placed", ()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(receiver.requests().is_empty());

    // A service of one's own cannot enforce the policy: refused at build.
    let err = WebhookSink::builder(format!("http://localhost:{port}/hook"))
        .egress(EgressPolicy::public_only())
        .build_with(hyper_client())
        .unwrap_err();
    assert!(matches!(err, BuildError::ClientWithEgress), "{err:?}");
}
