//! CloudEvents from `WebhookSink` (feature `cloudevents`), delivered over
//! loopback to an axum receiver behind `VerifyWebhookLayer`, and read back
//! by the `cloudevents-sdk` crate's HTTP binding: binary and structured
//! mode, the signature over the bytes sent, and the build-time checks.
#![cfg(all(feature = "cloudevents", feature = "axum"))]

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use cloudevents::AttributesReader;
use eventsink::signature::{Scheme, Secret};
use eventsink::verify::{VerifiedWebhook, VerifyWebhookLayer};
use eventsink::webhook::{BuildError, CloudEvents, WebhookSink};
use eventsink::{Error, Event, Retryable, SinkExt};
use http::HeaderMap;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SOURCE: &str = "https://shop.example.com/orders";
/// How long a test waits for a delivery before it fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

fn key(text: &str) -> Secret {
    text.parse().unwrap()
}

/// What the verified handler got.
struct Delivery {
    webhook_id: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A receiver on 127.0.0.1 that verifies with `secret` and sends each
/// verified request to the channel.
async fn receiver(secret: &str) -> (String, mpsc::UnboundedReceiver<Delivery>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/hook",
            post(
                move |webhook: VerifiedWebhook, headers: HeaderMap, body: Bytes| {
                    let tx = tx.clone();
                    async move {
                        let webhook_id = webhook.id.to_string();
                        tx.send(Delivery {
                            webhook_id,
                            headers,
                            body,
                        })
                        .unwrap();
                        http::StatusCode::NO_CONTENT
                    }
                },
            ),
        )
        .route_layer(VerifyWebhookLayer::new(key(secret)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

fn order() -> Event<Value> {
    Event::new(
        "order.placed",
        json!({"order_id": 7, "note": "Zoë \"quotes\" <tags>"}),
    )
}

/// Publishes `event` through a sink in `format` and gives what the
/// verifying receiver got.
async fn deliver(format: CloudEvents, event: &Event<Value>) -> Delivery {
    let (url, mut deliveries) = receiver(SECRET).await;
    let mut sink = WebhookSink::builder(url)
        .secret(key(SECRET))
        .cloudevents(format)
        .build()
        .unwrap();
    // The receiver answers 401 to a signature it cannot verify, which
    // fails this publish.
    sink.publish(event.clone()).await.unwrap();
    tokio::time::timeout(PATIENCE, deliveries.recv())
        .await
        .unwrap()
        .unwrap()
}

/// The SDK's reading of a delivery is our event, attribute by attribute.
fn assert_same_event(delivery: &Delivery, event: &Event<Value>) {
    let parsed = cloudevents::binding::http::to_event(&delivery.headers, delivery.body.to_vec())
        .expect("cloudevents-sdk reads the request");
    assert_eq!(parsed.specversion(), cloudevents::event::SpecVersion::V10);
    assert_eq!(parsed.id(), &*event.id);
    assert_eq!(parsed.ty(), &*event.kind);
    assert_eq!(parsed.source(), SOURCE);
    assert_eq!(parsed.time(), Some(&event.created_at));
    assert_eq!(parsed.datacontenttype(), Some("application/json"));
    let data = Value::try_from(parsed.data().cloned().expect("data")).unwrap();
    assert_eq!(data, *event.payload);
    assert_eq!(delivery.webhook_id, &*event.id);
}

#[tokio::test]
async fn binary_mode_is_read_back_by_the_sdk_and_verifies() {
    let event = order();
    let delivery = deliver(CloudEvents::binary(SOURCE), &event).await;
    assert_same_event(&delivery, &event);
    let header = |name| delivery.headers.get(name).unwrap().to_str().unwrap();
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(header("ce-specversion"), "1.0");
    // The body is the payload, byte for byte as serde_json writes it.
    assert_eq!(delivery.body, serde_json::to_vec(&event.payload).unwrap());
}

#[tokio::test]
async fn structured_mode_is_read_back_by_the_sdk_and_verifies() {
    let event = order();
    let delivery = deliver(CloudEvents::structured(SOURCE), &event).await;
    assert_same_event(&delivery, &event);
    assert_eq!(
        delivery.headers.get("content-type").unwrap(),
        "application/cloudevents+json"
    );
    assert!(!delivery.headers.contains_key("ce-id"));
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["data"], *event.payload);
}

#[tokio::test]
async fn binary_mode_percent_encodes_a_kind_with_spaces_and_unicode() {
    let event = Event::new("order placed ✓", json!(1));
    let delivery = deliver(CloudEvents::binary(SOURCE), &event).await;
    assert_eq!(
        delivery.headers.get("ce-type").unwrap(),
        "order%20placed%20%E2%9C%93"
    );
}

#[tokio::test]
async fn a_receiver_with_another_secret_refuses_the_cloudevent() {
    let (url, mut deliveries) = receiver(OTHER_SECRET).await;
    let mut sink = WebhookSink::builder(url)
        .secret(key(SECRET))
        .cloudevents(CloudEvents::binary(SOURCE))
        .build()
        .unwrap();
    let err = sink.publish(order()).await.unwrap_err();
    assert!(
        matches!(err, Error::Http { status, .. } if status == 401),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(deliveries.try_recv().is_err());
}

#[test]
fn bad_cloudevents_configurations_are_refused_at_build() {
    let build = |builder: eventsink::webhook::WebhookSinkBuilder| builder.build().unwrap_err();
    let base = || WebhookSink::builder("https://example.com/hook");
    for source in ["", "not a uri", "https://shop.example.com/ö", "a\"b"] {
        let err = build(base().cloudevents(CloudEvents::binary(source)));
        assert!(
            matches!(err, BuildError::InvalidCloudEventsSource { .. }),
            "{source:?}: {err:?}"
        );
        assert!(err.to_string().contains("give a URI-reference"), "{err}");
    }
    let err = build(
        base()
            .scheme(Scheme::GoCompatible)
            .cloudevents(CloudEvents::structured(SOURCE)),
    );
    assert!(
        matches!(err, BuildError::CloudEventsScheme { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("use Scheme::Standard"), "{err}");
    let err = build(
        base()
            .header("ce-type", "spoofed")
            .cloudevents(CloudEvents::binary(SOURCE)),
    );
    assert!(matches!(err, BuildError::ReservedHeader { .. }), "{err:?}");
    // An extension attribute of one's own is fine.
    assert!(
        base()
            .header("ce-tenant", "acme")
            .cloudevents(CloudEvents::binary("/orders"))
            .build()
            .is_ok()
    );
}
