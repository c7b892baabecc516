//! Both ends from one crate: our `WebhookSink` delivers over loopback to an
//! axum app behind `VerifyWebhookLayer`, in every scheme, with two
//! secrets; and the `standardwebhooks` crate verifies what our sink sends.
#![cfg(all(feature = "webhook", feature = "axum"))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use eventsink::signature::{Scheme, Secret};
use eventsink::verify::{MemoryReplayGuard, Verified, VerifyConfig, VerifyWebhookLayer};
use eventsink::webhook::WebhookSink;
use eventsink::{Event, SinkExt};
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The sender's current key and the previous one (rotation).
const CURRENT: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const PREVIOUS: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const UNRELATED: &str = "whsec_dW5yZWxhdGVkLWtleS1vZi0yNC1ieXRlcw==";
/// How long a test waits for a delivery before it fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

fn key(text: &str) -> Secret {
    text.parse().unwrap()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
    note: String,
}

fn event(n: u64) -> Event<OrderPlaced> {
    Event::new(
        "order.placed",
        OrderPlaced {
            order_id: n,
            note: "Zoë \"quotes\" <tags> & ünïcode".into(),
        },
    )
}

/// What the receiving handler saw.
#[derive(Debug)]
struct Received {
    event: Event<OrderPlaced>,
    webhook_id: String,
    scheme: Scheme,
}

/// A receiver on 127.0.0.1 (port 0) behind `layer`; each verified delivery
/// is sent to the returned channel, and the handler's calls are counted.
async fn receiver(
    layer: VerifyWebhookLayer,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Received>,
    Arc<AtomicUsize>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move |Verified { event, webhook }: Verified<OrderPlaced>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(Received {
                event,
                webhook_id: webhook.id,
                scheme: webhook.scheme,
            });
            async { "ok" }
        }
    };
    let app = Router::new()
        .route("/hook", post(handler))
        .route_layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx, calls)
}

fn sink(addr: SocketAddr, scheme: Scheme) -> WebhookSink {
    WebhookSink::builder(format!("http://{addr}/hook"))
        .secret(key(CURRENT))
        .secret(key(PREVIOUS))
        .scheme(scheme)
        .build()
        .unwrap()
}

async fn deliver_and_receive(scheme: Scheme, layer: VerifyWebhookLayer, expected_scheme: Scheme) {
    let (addr, mut received, calls) = receiver(layer).await;
    let mut sink = sink(addr, scheme);
    let sent = event(7);
    sink.publish(sent.clone()).await.unwrap();
    let got = tokio::time::timeout(PATIENCE, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.event, sent, "{scheme:?}");
    assert_eq!(got.webhook_id, &*sent.id);
    assert_eq!(got.scheme, expected_scheme);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn standard_signed_by_two_keys_verifies_with_either_key() {
    // A receiver that still has only the previous key…
    let old_only = VerifyWebhookLayer::new(VerifyConfig::new(key(UNRELATED)).secret(key(PREVIOUS)));
    deliver_and_receive(Scheme::Standard, old_only, Scheme::Standard).await;
    // …and one that already moved to the current key.
    deliver_and_receive(
        Scheme::Standard,
        VerifyWebhookLayer::new(key(CURRENT)),
        Scheme::Standard,
    )
    .await;
}

#[tokio::test]
async fn go_compatible_verifies_with_the_go_scheme() {
    // The Go format is signed with the sender's first key only.
    let layer = VerifyWebhookLayer::new(
        VerifyConfig::new(key(PREVIOUS))
            .secret(key(CURRENT))
            .scheme(Scheme::GoCompatible),
    );
    deliver_and_receive(Scheme::GoCompatible, layer, Scheme::GoCompatible).await;
}

#[tokio::test]
async fn both_header_sets_verify_as_standard_or_as_go() {
    let either = VerifyWebhookLayer::new(VerifyConfig::new(key(PREVIOUS)).scheme(Scheme::Both));
    deliver_and_receive(Scheme::Both, either, Scheme::Standard).await;
    let go = VerifyWebhookLayer::new(VerifyConfig::new(key(CURRENT)).scheme(Scheme::GoCompatible));
    deliver_and_receive(Scheme::Both, go, Scheme::GoCompatible).await;
}

#[tokio::test]
async fn either_scheme_takes_standard_and_go_senders() {
    let layer = || VerifyWebhookLayer::new(VerifyConfig::new(key(CURRENT)).scheme(Scheme::Both));
    deliver_and_receive(Scheme::Standard, layer(), Scheme::Standard).await;
    deliver_and_receive(Scheme::GoCompatible, layer(), Scheme::GoCompatible).await;
}

#[tokio::test]
async fn a_receiver_with_other_keys_refuses_and_the_sender_sees_401() {
    let (addr, _received, calls) = receiver(VerifyWebhookLayer::new(key(UNRELATED))).await;
    let err = sink(addr, Scheme::Standard)
        .publish(event(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_redelivered_event_reaches_the_handler_once() {
    let layer = VerifyWebhookLayer::new(
        VerifyConfig::new(key(CURRENT)).replay_guard(MemoryReplayGuard::new()),
    );
    let (addr, mut received, calls) = receiver(layer).await;
    let mut sink = sink(addr, Scheme::Standard);
    let sent = event(3);
    sink.publish(sent.clone()).await.unwrap();
    // The sender retries (its first answer was lost): same id, new attempt.
    sink.publish(sent.clone()).await.unwrap();
    let got = tokio::time::timeout(PATIENCE, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.event, sent);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A new event is handled.
    sink.publish(event(4)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A receiver that hands each raw request to the test.
async fn capture() -> (SocketAddr, mpsc::UnboundedReceiver<(HeaderMap, Bytes)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let _ = tx.send((headers, body));
            async { "ok" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx)
}

#[tokio::test]
async fn the_standardwebhooks_crate_verifies_what_our_sink_sends() {
    let (addr, mut requests) = capture().await;
    let mut sink = sink(addr, Scheme::Standard);
    sink.publish(event(9)).await.unwrap();
    let (headers, body) = tokio::time::timeout(PATIENCE, requests.recv())
        .await
        .unwrap()
        .unwrap();
    // Each of the two keys verifies on its own, with an independent
    // implementation (its own clock and 5-minute tolerance).
    for secret in [CURRENT, PREVIOUS] {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&body, &headers)
            .unwrap();
    }
    assert!(
        standardwebhooks::Webhook::new(UNRELATED)
            .unwrap()
            .verify(&body, &headers)
            .is_err()
    );
    // And our layer accepts the very same request.
    let verified = VerifyWebhookLayer::new(key(PREVIOUS))
        .verify(&headers, &body)
        .unwrap();
    assert_eq!(verified.id, headers["webhook-id"].to_str().unwrap());
}
