//! VerifyWebhookLayer: every negative case with its exact status, the Go
//! format, interop with the `standardwebhooks` crate, deduplication, and the
//! layer inside a real axum server on loopback.
#![cfg(feature = "verify")]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use eventsink::signature::{self, Scheme, Secret};
use eventsink::verify::{
    self, BoxFuture, Claim, ClaimToken, Clock, MemoryReplayGuard, ReplayError, ReplayGuard,
    VerifiedWebhook, VerifyConfig, VerifyWebhook, VerifyWebhookLayer,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Notify, mpsc};
use tower::{Layer, Service, ServiceExt};

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The fixed "now" of the injected clock.
const NOW: i64 = 1_800_000_000;
const TOLERANCE: i64 = 300;
const BODY: &[u8] = br#"{"kind":"order.placed","id":"evt_1","created_at":"2026-11-27T12:00:00Z","payload":{"order_id":7}}"#;
/// How long a test waits for something that should happen at once, before
/// it fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

fn secret() -> Secret {
    SECRET.parse().unwrap()
}

fn config() -> VerifyConfig {
    VerifyConfig::new(secret()).clock(Clock::fixed(Utc.timestamp_opt(NOW, 0).unwrap()))
}

/// A handler that counts its calls and echoes the body it got, with the
/// verified id in a header.
#[derive(Clone, Default)]
struct Echo {
    calls: Arc<AtomicUsize>,
}

impl Echo {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let calls = Arc::clone(&self.calls);
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let webhook = request.extensions().get::<VerifiedWebhook>().cloned();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let mut response = Response::new(Full::new(body));
                if let Some(webhook) = webhook {
                    response
                        .headers_mut()
                        .insert("x-verified-id", HeaderValue::from_str(&webhook.id).unwrap());
                }
                Ok::<_, Infallible>(response)
            }
        })
    }
}

fn request(headers: HeaderMap, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut request = Request::post("/hook").body(Full::new(body.into())).unwrap();
    *request.headers_mut() = headers;
    request
}

fn signed(id: &str, timestamp: i64, body: &[u8]) -> HeaderMap {
    verify::sign(&[secret()], id, timestamp, body).unwrap()
}

/// Runs one request through `layer` over a fresh `Echo`: status, response
/// body, and how often the handler ran.
async fn send<B>(layer: &VerifyWebhookLayer, request: Request<B>) -> (StatusCode, Bytes, usize)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<eventsink::BoxError>,
{
    let echo = Echo::default();
    let response = layer.layer(echo.service()).oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body, echo.calls())
}

async fn status_of(layer: &VerifyWebhookLayer, headers: HeaderMap, body: &[u8]) -> StatusCode {
    let (status, text, calls) = send(layer, request(headers, Bytes::copy_from_slice(body))).await;
    if status != StatusCode::OK {
        assert_eq!(calls, 0, "a rejected request reached the handler");
        let text = String::from_utf8_lossy(&text);
        assert!(!text.contains("C2FV") && !text.contains("whsec"), "{text}");
    }
    status
}

#[tokio::test]
async fn a_signed_request_reaches_the_handler_with_the_same_bytes_and_its_id() {
    let layer = VerifyWebhookLayer::new(config());
    let echo = Echo::default();
    let response = layer
        .layer(echo.service())
        .oneshot(request(signed("evt_1", NOW, BODY), BODY))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-verified-id"], "evt_1");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], BODY);
    assert_eq!(echo.calls(), 1);
}

#[tokio::test]
async fn the_reference_vector_verifies() {
    let layer = VerifyWebhookLayer::new(
        VerifyConfig::new(secret()).clock(Clock::fixed(Utc.timestamp_opt(1649367553, 0).unwrap())),
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        "webhook-id",
        HeaderValue::from_static("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
    );
    headers.insert("webhook-timestamp", HeaderValue::from_static("1649367553"));
    headers.insert(
        "webhook-signature",
        HeaderValue::from_static("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="),
    );
    let body = br#"{"email":"test@example.com","username":"test_user"}"#;
    assert_eq!(status_of(&layer, headers, body).await, StatusCode::OK);
}

#[tokio::test]
async fn wrong_key_is_401() {
    let layer = VerifyWebhookLayer::new(config());
    let headers = verify::sign(&[OTHER_SECRET.parse().unwrap()], "evt_1", NOW, BODY).unwrap();
    assert_eq!(
        status_of(&layer, headers, BODY).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn tampered_body_is_401() {
    let layer = VerifyWebhookLayer::new(config());
    let mut tampered = BODY.to_vec();
    tampered[60] ^= 1;
    assert_eq!(
        status_of(&layer, signed("evt_1", NOW, BODY), &tampered).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn tampered_id_is_401() {
    let layer = VerifyWebhookLayer::new(config());
    let mut headers = signed("evt_1", NOW, BODY);
    headers.insert("webhook-id", HeaderValue::from_static("evt_2"));
    assert_eq!(
        status_of(&layer, headers, BODY).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn tampered_timestamp_is_401() {
    let layer = VerifyWebhookLayer::new(config());
    let mut headers = signed("evt_1", NOW, BODY);
    headers.insert("webhook-timestamp", HeaderValue::from(NOW - 1));
    assert_eq!(
        status_of(&layer, headers, BODY).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn timestamps_one_second_outside_the_tolerance_are_401_and_at_its_edge_200() {
    let layer = VerifyWebhookLayer::new(config());
    for (timestamp, expected) in [
        (NOW - TOLERANCE - 1, StatusCode::UNAUTHORIZED),
        (NOW + TOLERANCE + 1, StatusCode::UNAUTHORIZED),
        (NOW - TOLERANCE, StatusCode::OK),
        (NOW + TOLERANCE, StatusCode::OK),
    ] {
        // Correctly signed: only the time is wrong.
        let status = status_of(&layer, signed("evt_1", timestamp, BODY), BODY).await;
        assert_eq!(status, expected, "timestamp now{:+}", timestamp - NOW);
    }
}

#[tokio::test]
async fn the_tolerance_is_configurable() {
    let layer = VerifyWebhookLayer::new(config().tolerance(Duration::from_secs(30)));
    let old = signed("evt_1", NOW - 31, BODY);
    let (status, text, _) = send(&layer, request(old, BODY)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        text.starts_with(b"webhook timestamp is too old;"),
        "{text:?}"
    );
    assert_eq!(
        status_of(&layer, signed("evt_1", NOW - 30, BODY), BODY).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn each_missing_header_is_400_with_its_name() {
    let layer = VerifyWebhookLayer::new(config());
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let mut headers = signed("evt_1", NOW, BODY);
        headers.remove(name);
        let (status, text, calls) = send(&layer, request(headers, BODY)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(text, format!("missing {name} header"));
        assert_eq!(calls, 0);
    }
}

#[tokio::test]
async fn an_empty_v1_signature_is_401() {
    let layer = VerifyWebhookLayer::new(config());
    let mut headers = signed("evt_1", NOW, BODY);
    headers.insert("webhook-signature", HeaderValue::from_static("v1,"));
    assert_eq!(
        status_of(&layer, headers, BODY).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn one_valid_entry_among_garbage_is_accepted() {
    let layer = VerifyWebhookLayer::new(config());
    let valid = signature::sign(&[secret()], "evt_1", NOW, BODY);
    let list = format!(
        "v1a,c2lnbmF0dXJl garbage v1,!!! v2,{} v1, {valid} ,,",
        &valid[3..]
    );
    let mut headers = signed("evt_1", NOW, BODY);
    headers.insert("webhook-signature", HeaderValue::from_str(&list).unwrap());
    assert_eq!(status_of(&layer, headers, BODY).await, StatusCode::OK);
}

#[tokio::test]
async fn only_v1a_entries_are_401() {
    let layer = VerifyWebhookLayer::new(config());
    let valid = signature::sign(&[secret()], "evt_1", NOW, BODY);
    let mut headers = signed("evt_1", NOW, BODY);
    let v1a = format!("v1a,{}", &valid[3..]);
    headers.insert("webhook-signature", HeaderValue::from_str(&v1a).unwrap());
    assert_eq!(
        status_of(&layer, headers, BODY).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn invalid_utf8_in_each_header_is_400() {
    let layer = VerifyWebhookLayer::new(config());
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let mut headers = signed("evt_1", NOW, BODY);
        headers.insert(name, HeaderValue::from_bytes(b"v1,\xff\xfe\x80").unwrap());
        let (status, text, _) = send(&layer, request(headers, BODY)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(text, format!("malformed {name} header: not visible ASCII"));
    }
}

#[tokio::test]
async fn malformed_ids_and_timestamps_and_repeated_headers_are_400() {
    let layer = VerifyWebhookLayer::new(config());
    let cases: [(&str, &[&str]); 3] = [
        ("webhook-id", &["evt 1", ""]),
        (
            "webhook-timestamp",
            &["soon", "-5", "1.0", "99999999999999999999"],
        ),
        ("webhook-signature", &[" "]),
    ];
    for (name, values) in cases {
        for value in values {
            let mut headers = signed("evt_1", NOW, BODY);
            headers.insert(name, HeaderValue::from_str(value).unwrap());
            let status = status_of(&layer, headers, BODY).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {value:?}");
        }
    }
    let mut twice = signed("evt_1", NOW, BODY);
    twice.append("webhook-id", HeaderValue::from_static("evt_2"));
    assert_eq!(
        status_of(&layer, twice, BODY).await,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn a_2_mib_body_is_413() {
    let layer = VerifyWebhookLayer::new(config());
    let big = vec![b'x'; 2 * 1024 * 1024];
    let (status, text, calls) = send(&layer, request(signed("evt_1", NOW, &big), big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        text,
        "webhook body is larger than 1048576 bytes; send a smaller event"
    );
    assert_eq!(calls, 0);
}

/// A body of unknown length that yields 64 KiB chunks and counts the bytes
/// taken from it.
struct Endless {
    pulled: Arc<AtomicUsize>,
}

const CHUNK: usize = 64 * 1024;

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.pulled.fetch_add(CHUNK, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; CHUNK])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_413_without_reading_it_all() {
    let layer = VerifyWebhookLayer::new(config().max_body_bytes(256 * 1024));
    let pulled = Arc::new(AtomicUsize::new(0));
    let mut request = Request::post("/hook")
        .body(Endless {
            pulled: Arc::clone(&pulled),
        })
        .unwrap();
    *request.headers_mut() = signed("evt_1", NOW, b"");
    let (status, _, calls) = send(&layer, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls, 0);
    // It stopped within one chunk past the limit of an endless body.
    assert!(pulled.load(Ordering::SeqCst) <= 256 * 1024 + CHUNK);
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_413_before_reading() {
    let layer = VerifyWebhookLayer::new(config().max_body_bytes(16));
    let pulled = Arc::new(AtomicUsize::new(0));
    let mut request = Request::post("/hook")
        .body(Endless {
            pulled: Arc::clone(&pulled),
        })
        .unwrap();
    *request.headers_mut() = signed("evt_1", NOW, b"");
    request
        .headers_mut()
        .insert("content-length", HeaderValue::from(17));
    let (status, _, _) = send(&layer, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(pulled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn headers_are_checked_before_the_body_is_read() {
    let layer = VerifyWebhookLayer::new(config());
    let pulled = Arc::new(AtomicUsize::new(0));
    let request = Request::post("/hook")
        .body(Endless {
            pulled: Arc::clone(&pulled),
        })
        .unwrap();
    let (status, _, _) = send(&layer, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(pulled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn either_of_two_secrets_verifies_during_rotation() {
    let layer = VerifyWebhookLayer::new(config().secret(OTHER_SECRET.parse().unwrap()));
    let by_other = verify::sign(&[OTHER_SECRET.parse().unwrap()], "evt_1", NOW, BODY).unwrap();
    assert_eq!(status_of(&layer, by_other, BODY).await, StatusCode::OK);
    assert_eq!(
        status_of(&layer, signed("evt_1", NOW, BODY), BODY).await,
        StatusCode::OK
    );
}

// --- the Go original's format

fn go_body(id: &str, now: &str) -> Vec<u8> {
    format!(
        r#"{{"kind":"order.placed","id":"{id}","payload":{{"order_id":7}},"created_at":"2026-11-27T12:00:00Z","now":"{now}"}}"#
    )
    .into_bytes()
}

fn go_headers(key: &Secret, body: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let signature = signature::sign_go(key, body);
    headers.insert("signature", HeaderValue::from_str(&signature).unwrap());
    headers
}

fn rfc3339(unix: i64) -> String {
    Utc.timestamp_opt(unix, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn go_format_verifies_on_the_body_and_checks_its_now() {
    let key = Secret::from_raw("the-go-app-secret").unwrap();
    let layer = VerifyWebhookLayer::new(
        VerifyConfig::new(key.clone())
            .scheme(Scheme::GoCompatible)
            .clock(Clock::fixed(Utc.timestamp_opt(NOW, 0).unwrap())),
    );
    let body = go_body("evt_go", &rfc3339(NOW - 10));
    let echo = Echo::default();
    let response = layer
        .layer(echo.service())
        .oneshot(request(go_headers(&key, &body), body.clone()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-verified-id"], "evt_go");

    let stale = go_body("evt_go", &rfc3339(NOW - TOLERANCE - 1));
    assert_eq!(
        status_of(&layer, go_headers(&key, &stale), &stale).await,
        StatusCode::UNAUTHORIZED
    );
    let ahead = go_body("evt_go", &rfc3339(NOW + TOLERANCE + 1));
    assert_eq!(
        status_of(&layer, go_headers(&key, &ahead), &ahead).await,
        StatusCode::UNAUTHORIZED
    );
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert_eq!(
        status_of(&layer, go_headers(&key, &body), &tampered).await,
        StatusCode::UNAUTHORIZED
    );
    let wrong = Secret::from_raw("another-secret").unwrap();
    assert_eq!(
        status_of(&layer, go_headers(&wrong, &body), &body).await,
        StatusCode::UNAUTHORIZED
    );
    let no_now =
        br#"{"kind":"k","id":"evt_go","payload":null,"created_at":"2026-11-27T12:00:00Z"}"#;
    assert_eq!(
        status_of(&layer, go_headers(&key, no_now), no_now).await,
        StatusCode::BAD_REQUEST
    );
    let bad_now = go_body("evt_go", "yesterday");
    assert_eq!(
        status_of(&layer, go_headers(&key, &bad_now), &bad_now).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(&layer, HeaderMap::new(), &body).await,
        StatusCode::BAD_REQUEST
    );
    let mut short = HeaderMap::new();
    short.insert("signature", HeaderValue::from_static("abc"));
    assert_eq!(
        status_of(&layer, short, &body).await,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn either_scheme_accepts_both_formats() {
    let layer = VerifyWebhookLayer::new(config().scheme(Scheme::Both));
    assert_eq!(
        status_of(&layer, signed("evt_1", NOW, BODY), BODY).await,
        StatusCode::OK
    );
    let body = go_body("evt_go", &rfc3339(NOW));
    assert_eq!(
        status_of(&layer, go_headers(&secret(), &body), &body).await,
        StatusCode::OK
    );
    let (status, text, _) = send(&layer, request(HeaderMap::new(), BODY)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(text, "missing webhook-signature (or signature) header");
    // Standard is not accepted as Go and the other way round.
    let standard_only = VerifyWebhookLayer::new(config());
    assert_eq!(
        status_of(&standard_only, go_headers(&secret(), &body), &body).await,
        StatusCode::BAD_REQUEST
    );
}

// --- interop with the `standardwebhooks` crate (its signer; the verifier
// --- direction is in verify_roundtrip.rs, signed by our WebhookSink)

#[tokio::test]
async fn requests_signed_by_the_standardwebhooks_crate_verify() {
    let theirs = standardwebhooks::Webhook::new(SECRET).unwrap();
    // That crate has no injectable clock: both sides use the system clock.
    let layer = VerifyWebhookLayer::new(secret());
    let now = Utc::now().timestamp();
    let signature = theirs.sign("msg_2Lh9KR1Hd2", now, BODY).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("webhook-id", HeaderValue::from_static("msg_2Lh9KR1Hd2"));
    headers.insert("webhook-timestamp", HeaderValue::from(now));
    headers.insert(
        "webhook-signature",
        HeaderValue::from_str(&signature).unwrap(),
    );
    assert_eq!(
        status_of(&layer, headers.clone(), BODY).await,
        StatusCode::OK
    );
    // And theirs accepts what our `verify::sign` makes.
    let ours = verify::sign(&[secret()], "msg_2Lh9KR1Hd2", now, BODY).unwrap();
    theirs.verify(BODY, &ours).unwrap();
    assert_eq!(ours["webhook-signature"], headers["webhook-signature"]);
}

// --- deduplication

#[tokio::test]
async fn the_same_id_twice_calls_the_handler_once() {
    let layer = VerifyWebhookLayer::new(config().replay_guard(MemoryReplayGuard::new()));
    let echo = Echo::default();
    let service = layer.layer(echo.service());
    let first = service
        .clone()
        .oneshot(request(signed("evt_1", NOW, BODY), BODY))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // A retry: new timestamp, same id.
    let second = service
        .oneshot(request(signed("evt_1", NOW + 5, BODY), BODY))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert!(second.headers().get("x-verified-id").is_none());
    let text = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"already handled");
    assert_eq!(echo.calls(), 1);
}

#[tokio::test]
async fn a_failed_handler_gets_the_retry() {
    let layer = VerifyWebhookLayer::new(config().replay_guard(MemoryReplayGuard::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = tower::service_fn({
        let calls = Arc::clone(&calls);
        move |_: Request<Full<Bytes>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let status = if n == 0 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::NO_CONTENT
            };
            async move {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = status;
                Ok::<_, Infallible>(response)
            }
        }
    });
    let service = layer.layer(handler);
    let statuses = [
        service
            .clone()
            .oneshot(request(signed("evt_1", NOW, BODY), BODY))
            .await
            .unwrap()
            .status(),
        service
            .clone()
            .oneshot(request(signed("evt_1", NOW + 5, BODY), BODY))
            .await
            .unwrap()
            .status(),
        service
            .oneshot(request(signed("evt_1", NOW + 60, BODY), BODY))
            .await
            .unwrap()
            .status(),
    ];
    assert_eq!(
        statuses,
        [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::NO_CONTENT,
            StatusCode::OK
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler that tells `entered` when it starts and answers once `release`
/// is notified.
fn blocking_handler(
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let (entered, release) = (entered.clone(), Arc::clone(&release));
        async move {
            // Registered before telling the test, so that `notify_waiters`
            // right after `entered` cannot miss this handler.
            let notified = release.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let _ = entered.send(());
            notified.await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        }
    })
}

#[tokio::test]
async fn a_concurrent_duplicate_is_409_while_the_first_is_in_flight() {
    let layer = VerifyWebhookLayer::new(config().replay_guard(MemoryReplayGuard::new()));
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(blocking_handler(
        entered_tx,
        Arc::clone(&release),
        Arc::clone(&calls),
    ));

    let first = tokio::spawn(
        service
            .clone()
            .oneshot(request(signed("evt_1", NOW, BODY), BODY)),
    );
    tokio::time::timeout(PATIENCE, entered.recv())
        .await
        .unwrap()
        .unwrap();

    // A duplicate that reached the blocked handler would never answer: fail
    // after PATIENCE instead of hanging.
    let second = tokio::time::timeout(
        PATIENCE,
        service
            .clone()
            .oneshot(request(signed("evt_1", NOW, BODY), BODY)),
    )
    .await
    .expect("the duplicate was answered at once, not sent to the busy handler")
    .unwrap();
    assert_eq!(second.status(), StatusCode::CONFLICT);

    release.notify_one();
    let first = tokio::time::timeout(PATIENCE, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let third = service
        .oneshot(request(signed("evt_1", NOW + 1, BODY), BODY))
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::OK);
    let text = third.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"already handled");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_in_flight_hold_ends_after_the_in_flight_ttl() {
    // One manual clock for the layer and the guard.
    let now = Arc::new(std::sync::atomic::AtomicI64::new(NOW));
    let clock = Clock::from_fn({
        let now = Arc::clone(&now);
        move || Utc.timestamp_opt(now.load(Ordering::SeqCst), 0).unwrap()
    });
    let layer = VerifyWebhookLayer::new(
        VerifyConfig::new(secret())
            .clock(clock.clone())
            .replay_guard(MemoryReplayGuard::new().clock(clock))
            .in_flight_ttl(Duration::from_secs(60)),
    );
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(blocking_handler(
        entered_tx,
        Arc::clone(&release),
        Arc::clone(&calls),
    ));

    let first = tokio::spawn(
        service
            .clone()
            .oneshot(request(signed("evt_1", NOW, BODY), BODY)),
    );
    tokio::time::timeout(PATIENCE, entered.recv())
        .await
        .unwrap()
        .unwrap();
    now.store(NOW + 59, Ordering::SeqCst);
    let held = service
        .clone()
        .oneshot(request(signed("evt_1", NOW + 59, BODY), BODY));
    let held = tokio::time::timeout(PATIENCE, held).await.unwrap().unwrap();
    assert_eq!(held.status(), StatusCode::CONFLICT);

    // The first handler is stuck past the hold: the retry gets through.
    now.store(NOW + 61, Ordering::SeqCst);
    let retry = tokio::spawn(
        service
            .clone()
            .oneshot(request(signed("evt_1", NOW + 61, BODY), BODY)),
    );
    tokio::time::timeout(PATIENCE, entered.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    release.notify_waiters();
    for task in [first, retry] {
        let response = tokio::time::timeout(PATIENCE, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// A memory guard that reports each release.
#[derive(Debug)]
struct ReportingGuard {
    inner: MemoryReplayGuard,
    released: mpsc::UnboundedSender<String>,
}

impl ReplayGuard for ReportingGuard {
    fn claim<'a>(
        &'a self,
        id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, ReplayError>> {
        self.inner.claim(id, ttl)
    }
    fn complete<'a>(
        &'a self,
        id: &'a str,
        token: ClaimToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        self.inner.complete(id, token, ttl)
    }
    fn release<'a>(
        &'a self,
        id: &'a str,
        token: ClaimToken,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        Box::pin(async move {
            self.inner.release(id, token).await?;
            let _ = self.released.send(id.to_owned());
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_cancelled_delivery_releases_its_id() {
    let (released_tx, mut released) = mpsc::unbounded_channel();
    let guard = ReportingGuard {
        inner: MemoryReplayGuard::new(),
        released: released_tx,
    };
    let layer = VerifyWebhookLayer::new(config().replay_guard(guard));
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(blocking_handler(
        entered_tx,
        Arc::clone(&release),
        Arc::clone(&calls),
    ));

    // The client goes away mid-handler: the server drops the future.
    let first = tokio::spawn(
        service
            .clone()
            .oneshot(request(signed("evt_1", NOW, BODY), BODY)),
    );
    tokio::time::timeout(PATIENCE, entered.recv())
        .await
        .unwrap()
        .unwrap();
    first.abort();
    let id = tokio::time::timeout(PATIENCE, released.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, "evt_1");

    // The retry is handled, not answered 409.
    let retry = tokio::spawn(service.oneshot(request(signed("evt_1", NOW + 5, BODY), BODY)));
    tokio::time::timeout(PATIENCE, entered.recv())
        .await
        .unwrap()
        .unwrap();
    release.notify_one();
    let retry = tokio::time::timeout(PATIENCE, retry)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A guard whose store is down.
#[derive(Debug)]
struct DownGuard;

impl ReplayGuard for DownGuard {
    fn claim<'a>(&'a self, _: &'a str, _: Duration) -> BoxFuture<'a, Result<Claim, ReplayError>> {
        Box::pin(async { Err(ReplayError::new("connection refused")) })
    }
    fn complete<'a>(
        &'a self,
        _: &'a str,
        _: ClaimToken,
        _: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        Box::pin(async { Err(ReplayError::new("connection refused")) })
    }
    fn release<'a>(&'a self, _: &'a str, _: ClaimToken) -> BoxFuture<'a, Result<(), ReplayError>> {
        Box::pin(async { Err(ReplayError::new("connection refused")) })
    }
}

#[tokio::test]
async fn a_replay_guard_that_is_down_answers_503_so_the_sender_retries() {
    let layer = VerifyWebhookLayer::new(config().replay_guard(DownGuard));
    let (status, text, calls) = send(&layer, request(signed("evt_1", NOW, BODY), BODY)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls, 0);
    assert!(!String::from_utf8_lossy(&text).contains("connection refused"));
}

#[tokio::test]
async fn dedup_is_not_fooled_by_an_unsigned_duplicate() {
    // A forged request with a handled id must be refused (401), not
    // answered "already handled".
    let layer = VerifyWebhookLayer::new(config().replay_guard(MemoryReplayGuard::new()));
    assert_eq!(
        status_of(&layer, signed("evt_1", NOW, BODY), BODY).await,
        StatusCode::OK
    );
    let mut forged = signed("evt_1", NOW, BODY);
    forged.insert("webhook-signature", HeaderValue::from_static("v1,Zm9yZ2Vk"));
    assert_eq!(
        status_of(&layer, forged, BODY).await,
        StatusCode::UNAUTHORIZED
    );
}

// --- inside a real axum server on loopback

#[cfg(feature = "axum")]
mod over_http {
    use super::*;
    use axum::Router;
    use axum::routing::post;
    use eventsink::verify::Verified;
    use serde::Deserialize;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Debug, Deserialize)]
    struct Order {
        order_id: u64,
    }

    /// Serves `app` on 127.0.0.1, port 0.
    async fn serve(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// One HTTP/1.1 POST over a fresh connection: status and body.
    async fn post_raw(
        addr: SocketAddr,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            body.len()
        )
        .into_bytes();
        for (name, value) in headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(body);
        stream.write_all(&head).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    async fn hook(Verified { event, webhook }: Verified<Order>) -> String {
        format!("order {} via {}", event.payload.order_id, webhook.id)
    }

    #[tokio::test]
    async fn route_layer_with_the_extractor_and_dedup() {
        let layer = VerifyWebhookLayer::new(config().replay_guard(MemoryReplayGuard::new()));
        let app = Router::new()
            .route("/hook", post(hook))
            .route("/open", post(|| async { "no verification here" }))
            .route_layer(layer);
        let addr = serve(app).await;

        let (status, text) = post_raw(addr, "/hook", &signed("evt_1", NOW, BODY), BODY).await;
        assert_eq!((status, text.as_str()), (200, "order 7 via evt_1"));
        let (status, text) = post_raw(addr, "/hook", &signed("evt_1", NOW + 3, BODY), BODY).await;
        assert_eq!((status, text.as_str()), (200, "already handled"));

        let (status, text) = post_raw(addr, "/hook", &HeaderMap::new(), BODY).await;
        assert_eq!((status, text.as_str()), (400, "missing webhook-id header"));
        let mut tampered = BODY.to_vec();
        tampered[80] ^= 1;
        let (status, _) = post_raw(addr, "/hook", &signed("evt_2", NOW, BODY), &tampered).await;
        assert_eq!(status, 401);

        // Signed, but not an event: answered as axum's `Json` answers.
        let cases: [(&[u8], u16, &str); 4] = [
            (b"{\"kind\":", 400, "the webhook body is not valid JSON: "),
            (br#"{"hello":"world"}"#, 422, "the webhook body is not an event of the expected type: "),
            (
                br#"{"kind":"k","id":"e","created_at":"2026-11-27T12:00:00Z","payload":{"order_id":"seven"}}"#,
                422,
                "the webhook body is not an event of the expected type: ",
            ),
            (
                br#"{"kind":"k","id":"has space","created_at":"2026-11-27T12:00:00Z","payload":{"order_id":7}}"#,
                422,
                "the webhook's event breaks the rule for ids and kinds: event id",
            ),
        ];
        for (n, (body, expected, prefix)) in cases.into_iter().enumerate() {
            let id = format!("evt_bad_{n}");
            let (status, text) = post_raw(addr, "/hook", &signed(&id, NOW, body), body).await;
            assert_eq!(status, expected, "{text}");
            assert!(text.starts_with(prefix), "{text}");
        }
        // route_layer covers every route of the router it was added to.
        let (status, _) = post_raw(addr, "/open", &HeaderMap::new(), b"").await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn router_layer_and_the_verified_webhook_extractor() {
        async fn by_extractor(webhook: VerifiedWebhook, body: Bytes) -> String {
            format!(
                "{} {} bytes at {}",
                webhook.id,
                body.len(),
                webhook.timestamp
            )
        }
        let app = Router::new()
            .route("/hook", post(by_extractor))
            .layer(VerifyWebhook::layer(config()));
        let addr = serve(app).await;
        let (status, text) = post_raw(addr, "/hook", &signed("evt_9", NOW, BODY), BODY).await;
        assert_eq!(status, 200);
        assert_eq!(text, format!("evt_9 {} bytes at {NOW}", BODY.len()));
        // The layer wraps the fallback too: unknown paths need a signature.
        let (status, _) = post_raw(addr, "/elsewhere", &HeaderMap::new(), BODY).await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn the_extractors_without_the_layer_are_a_500() {
        async fn id_only(webhook: VerifiedWebhook) -> String {
            webhook.id
        }
        let app = Router::new()
            .route("/hook", post(hook))
            .route("/id", post(id_only));
        let addr = serve(app).await;
        for path in ["/hook", "/id"] {
            let (status, text) = post_raw(addr, path, &signed("evt_1", NOW, BODY), BODY).await;
            assert_eq!(status, 500, "{path}");
            assert!(text.contains("add VerifyWebhookLayer"), "{path}: {text}");
        }
    }

    #[tokio::test]
    async fn the_verified_rejection_keeps_the_serde_error() {
        use axum::extract::FromRequest;
        use eventsink::verify::VerifiedRejection;

        // The extension the layer inserts, from the layer's own checks.
        let layer = VerifyWebhookLayer::new(config());
        let webhook = layer.verify(&signed("evt_1", NOW, BODY), BODY).unwrap();
        let extract_with = |body: &'static [u8]| {
            let mut request = axum::extract::Request::new(axum::body::Body::from(body));
            request.extensions_mut().insert(webhook.clone());
            Verified::<Order>::from_request(request, &())
        };

        let err = extract_with(
            br#"{"kind":"k","id":"e","created_at":"2026-11-27T12:00:00Z","payload":{}}"#,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, VerifiedRejection::Json(_)), "{err:?}");
        assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let source = std::error::Error::source(&err).unwrap();
        let serde = source.downcast_ref::<serde_json::Error>().unwrap();
        assert!(serde.is_data(), "{serde}");
        // Display says what happened once; the parser's words are the source's.
        assert!(!err.to_string().contains(&serde.to_string()), "{err}");

        let err = extract_with(br#"{"kind":"#).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let source = std::error::Error::source(&err).unwrap();
        assert!(source.downcast_ref::<serde_json::Error>().unwrap().is_eof());

        let ok = extract_with(BODY).await.unwrap();
        assert_eq!(
            (ok.event.payload.order_id, ok.webhook.id.as_str()),
            (7, "evt_1")
        );
    }
}

// --- the Redis replay guard (ignored unless EVENTSINK_REDIS_URL was set at
// build time, see build.rs; CI sets it)

#[cfg(feature = "redis-replay")]
mod redis_guard {
    use super::*;
    use eventsink::verify::RedisReplayGuard;

    /// A guard on a key prefix of its own.
    async fn guard() -> (RedisReplayGuard, redis::aio::ConnectionManager, String) {
        let url = std::env::var("EVENTSINK_REDIS_URL").expect(
            "EVENTSINK_REDIS_URL was set when this test was built but is not set now: \
             set it, or rebuild without it to ignore the test",
        );
        let prefix = format!("eventsink-test:verify:{:016x}:", fastrand::u64(..));
        let client = redis::Client::open(url.as_str()).unwrap();
        let connection = redis::aio::ConnectionManager::new(client).await.unwrap();
        let guard = RedisReplayGuard::connect(&url, prefix.clone())
            .await
            .unwrap();
        (guard, connection, prefix)
    }

    const TTL: Duration = Duration::from_secs(600);

    #[tokio::test]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn claim_complete_release_in_redis() {
        let (guard, mut connection, prefix) = guard().await;
        let Claim::Claimed(first) = guard.claim("a", TTL).await.unwrap() else {
            panic!("a new id is claimed")
        };
        assert_eq!(guard.claim("a", TTL).await.unwrap(), Claim::InFlight);
        guard.release("a", ClaimToken::random()).await.unwrap(); // not the holder
        assert_eq!(guard.claim("a", TTL).await.unwrap(), Claim::InFlight);
        guard.release("a", first).await.unwrap();
        let Claim::Claimed(second) = guard.claim("a", TTL).await.unwrap() else {
            panic!("a released id is claimed again")
        };
        guard.complete("a", second, TTL).await.unwrap();
        guard.release("a", second).await.unwrap(); // never forgets a handled id
        assert_eq!(guard.claim("a", TTL).await.unwrap(), Claim::AlreadyHandled);

        let ttl_ms: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}a"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(ttl_ms > 0 && ttl_ms <= 600_000, "{ttl_ms}");
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}a"))
            .query_async(&mut connection)
            .await
            .unwrap();
    }

    #[tokio::test]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn concurrent_claims_in_redis_have_one_winner() {
        let (guard, mut connection, prefix) = guard().await;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let guard = guard.clone();
            tasks.spawn(async move { guard.claim("race", TTL).await.unwrap() });
        }
        let claims = tasks.join_all().await;
        assert_eq!(
            claims
                .iter()
                .filter(|c| matches!(c, Claim::Claimed(_)))
                .count(),
            1,
            "{claims:?}"
        );
        assert_eq!(claims.iter().filter(|c| **c == Claim::InFlight).count(), 15);
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}race"))
            .query_async(&mut connection)
            .await
            .unwrap();
    }

    #[tokio::test]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn the_layer_deduplicates_through_redis_across_two_receivers() {
        let (guard, mut connection, prefix) = guard().await;
        // Two receiver processes share one Redis.
        let echo = Echo::default();
        let first =
            VerifyWebhookLayer::new(config().replay_guard(guard.clone())).layer(echo.service());
        let second = VerifyWebhookLayer::new(config().replay_guard(guard)).layer(echo.service());
        let a = first
            .oneshot(request(signed("evt_r", NOW, BODY), BODY))
            .await
            .unwrap();
        let b = second
            .oneshot(request(signed("evt_r", NOW + 2, BODY), BODY))
            .await
            .unwrap();
        assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
        let text = b.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&text[..], b"already handled");
        assert_eq!(echo.calls(), 1);
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}evt_r"))
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}

#[test]
fn debug_output_never_shows_a_secret() {
    let layer = VerifyWebhookLayer::new(
        config()
            .secret(OTHER_SECRET.parse().unwrap())
            .replay_guard(MemoryReplayGuard::new()),
    );
    let config_text = format!("{:?}", config());
    let layer_text = format!("{layer:?}");
    let service_text = format!("{:?}", layer.layer(()));
    for text in [config_text, layer_text, service_text] {
        assert!(text.contains("Secret(<redacted>)"), "{text}");
        for secret in [SECRET, OTHER_SECRET] {
            assert!(!text.contains(&secret[6..14]), "{text}");
        }
    }
}
