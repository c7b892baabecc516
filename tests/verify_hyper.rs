//! VerifyWebhookLayer served by plain hyper (no axum), receiving from our
//! WebhookSink over loopback.
#![cfg(all(feature = "verify", feature = "webhook"))]

use std::convert::Infallible;

use bytes::Bytes;
use eventsink::signature::Secret;
use eventsink::verify::{VerifiedWebhook, VerifyWebhookLayer};
use eventsink::{Error, Event, SinkExt, WebhookSink};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::sync::mpsc;
use tower::ServiceBuilder;

/// Serves `layer` around a handler that forwards each verified event, on
/// one connection at a time, with hyper's own HTTP/1 server.
async fn serve(
    layer: VerifyWebhookLayer,
) -> (String, mpsc::UnboundedReceiver<(VerifiedWebhook, Event)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let tx = tx.clone();
        async move {
            let webhook = request
                .extensions()
                .get::<VerifiedWebhook>()
                .cloned()
                .expect("verified");
            let body = request
                .into_body()
                .collect()
                .await
                .expect("full body")
                .to_bytes();
            let event: Event = serde_json::from_slice(&body).expect("event JSON");
            let _ = tx.send((webhook, event));
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let service = ServiceBuilder::new().layer(layer).service(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn plain_hyper_receives_verified_events_and_refuses_bad_signatures() {
    let secret = Secret::generate().unwrap();
    let (url, mut received) = serve(VerifyWebhookLayer::new(secret.clone())).await;

    let mut sink = WebhookSink::builder(&url).secret(secret).build().unwrap();
    let event = Event::new("order.placed", json!({"order_id": 7}));
    sink.publish(event.clone()).await.unwrap();
    let (webhook, got) = received.recv().await.unwrap();
    assert_eq!(got, event);
    assert_eq!(webhook.id, *event.id);

    let mut forger = WebhookSink::builder(&url)
        .secret(Secret::generate().unwrap())
        .build()
        .unwrap();
    let err = forger
        .publish(Event::new("order.placed", json!({"order_id": 8})))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Http {
                status: http::StatusCode::UNAUTHORIZED,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        received.try_recv().is_err(),
        "the forged event never reached the handler"
    );
}
