//! WebhookSink against a real HTTP server on 127.0.0.1: signing in every
//! mode checked by independent code, status classes, timeouts, limits and
//! the egress guard.
#![cfg(feature = "webhook")]

mod support;

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use eventsink::signature::{Scheme, Secret};
use eventsink::webhook::{BuildError, EgressPolicy, WebhookSink};
use eventsink::{Backoff, Error, Event, RetryPolicy, Retryable, SinkExt};
use hmac::{KeyInit, Mac};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use support::conformance::{self, ARRIVAL_TIMEOUT, Destination};
use support::receiver::{Received, Receiver, Reply};

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const OLD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// HMAC-SHA256 written here with the hmac crate directly, not through the
/// crate's signing code.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn whsec_key(secret: &str) -> Vec<u8> {
    BASE64
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap()
}

/// The receiver's own Standard Webhooks check: is `expected_key`'s
/// signature among the header's `v1` entries?
fn standard_signature_present(request: &Received, secret: &str) -> bool {
    let (id, ts) = (
        request.header("webhook-id"),
        request.header("webhook-timestamp"),
    );
    let mac = hmac_sha256(
        &whsec_key(secret),
        &[id.as_bytes(), b".", ts.as_bytes(), b".", &request.body],
    );
    let expected = format!("v1,{}", BASE64.encode(mac));
    request
        .header("webhook-signature")
        .split(' ')
        .any(|entry| entry == expected)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sink(
    receiver: &Receiver,
    configure: impl FnOnce(
        eventsink::webhook::WebhookSinkBuilder,
    ) -> eventsink::webhook::WebhookSinkBuilder,
) -> WebhookSink {
    configure(WebhookSink::builder(receiver.url("/hook")))
        .build()
        .expect("sink builds")
}

#[test]
fn the_receivers_hmac_code_passes_the_reference_vector() {
    let request = Received {
        method: axum::http::Method::POST,
        path: "/".into(),
        headers: [
            ("webhook-id", "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
            ("webhook-timestamp", "1649367553"),
            (
                "webhook-signature",
                "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (axum::http::HeaderName::from_static(k), v.parse().unwrap()))
        .collect(),
        body: br#"{"email":"test@example.com","username":"test_user"}"#
            .as_slice()
            .into(),
    };
    assert!(standard_signature_present(&request, SECRET));
}

#[tokio::test]
async fn standard_signing_sends_every_header_and_a_verifiable_signature() {
    let receiver = Receiver::start().await;
    let mut sink = sink(&receiver, |b| b.secret(SECRET.parse().unwrap()));
    let event = Event::new("order.placed", json!({"order_id": 7}));
    let before = unix_now();
    sink.publish(event.clone()).await.unwrap();
    let after = unix_now();

    let request = &receiver.requests()[0];
    assert_eq!(request.method, axum::http::Method::POST);
    assert_eq!(request.path, "/hook");
    assert_eq!(request.header("content-type"), "application/json");
    assert_eq!(
        request.header("user-agent"),
        format!("eventsink/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(request.header("webhook-id"), &*event.id);
    let ts: i64 = request.header("webhook-timestamp").parse().unwrap();
    assert!(
        (before..=after).contains(&ts),
        "{ts} not in {before}..={after}"
    );
    assert!(standard_signature_present(request, SECRET));
    assert!(request.header("signature").is_empty());
    assert_eq!(
        serde_json::from_slice::<Event>(&request.body).unwrap(),
        event
    );

    // And an independent implementation agrees.
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    verifier
        .verify(&request.body, &request.headers)
        .expect("standardwebhooks verifies");
}

#[tokio::test]
async fn two_secrets_give_one_signature_each() {
    let receiver = Receiver::start().await;
    let mut sink = sink(&receiver, |b| {
        b.secret(SECRET.parse().unwrap())
            .secret(OLD_SECRET.parse().unwrap())
    });
    sink.publish(Event::new("k", json!(1))).await.unwrap();
    let request = &receiver.requests()[0];
    assert_eq!(request.header("webhook-signature").split(' ').count(), 2);
    assert!(standard_signature_present(request, SECRET));
    assert!(standard_signature_present(request, OLD_SECRET));
    for secret in [SECRET, OLD_SECRET] {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&request.body, &request.headers)
            .unwrap();
    }
}

#[tokio::test]
async fn go_compatible_signing_is_what_go_receivers_check() {
    let receiver = Receiver::start().await;
    let raw = "the-go-app-secret";
    let mut sink = sink(&receiver, |b| {
        b.secret(Secret::from_raw(raw).unwrap())
            .scheme(Scheme::GoCompatible)
    });
    let event = Event::new("account-registered", json!({"account_id": "a1"}));
    let before = unix_now();
    sink.publish(event.clone()).await.unwrap();

    let request = &receiver.requests()[0];
    let expected = hmac_sha256(raw.as_bytes(), &[&request.body]);
    let expected_hex: String = expected.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(request.header("signature"), expected_hex);
    assert!(request.header("webhook-signature").is_empty());

    let text = std::str::from_utf8(&request.body).unwrap();
    let keys: Vec<_> = [
        "\"kind\"",
        "\"id\"",
        "\"payload\"",
        "\"created_at\"",
        "\"now\"",
    ]
    .iter()
    .map(|k| {
        text.find(k)
            .unwrap_or_else(|| panic!("{k} missing in {text}"))
    })
    .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "Go field order: {text}"
    );
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["id"], *event.id);
    let now = chrono::DateTime::parse_from_rfc3339(body["now"].as_str().unwrap()).unwrap();
    assert_eq!(now.timestamp_subsec_nanos(), 0, "now is whole seconds");
    assert!(body["now"].as_str().unwrap().ends_with('Z'), "now is UTC");
    assert!(now.timestamp() >= before);
}

#[tokio::test]
async fn both_mode_sends_both_header_sets() {
    let receiver = Receiver::start().await;
    let mut sink = sink(&receiver, |b| {
        b.secret(SECRET.parse().unwrap()).scheme(Scheme::Both)
    });
    sink.publish(Event::new("k", json!({"x": 1})))
        .await
        .unwrap();
    let request = &receiver.requests()[0];
    assert!(standard_signature_present(request, SECRET));
    let hex: String = hmac_sha256(&whsec_key(SECRET), &[&request.body])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(request.header("signature"), hex);
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert!(body.get("now").is_some());
}

#[tokio::test]
async fn without_a_secret_nothing_is_signed() {
    let receiver = Receiver::start().await;
    let mut sink = sink(&receiver, |b| b);
    let event = Event::new("k", json!(1));
    sink.publish(event.clone()).await.unwrap();
    let request = &receiver.requests()[0];
    assert_eq!(request.header("webhook-id"), &*event.id);
    assert!(request.header("webhook-signature").is_empty());
    assert!(request.header("signature").is_empty());
}

#[tokio::test]
async fn every_attempt_is_signed_with_its_own_timestamp() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(503)]);
    let mut sink = sink(&receiver, |b| b.secret(SECRET.parse().unwrap()));
    let event = Event::new("k", json!(1));
    assert!(sink.publish(event.clone()).await.is_err());
    sink.publish(event).await.unwrap();
    let requests = receiver.requests();
    assert_eq!(
        requests[0].header("webhook-id"),
        requests[1].header("webhook-id")
    );
    for request in &requests {
        standardwebhooks::Webhook::new(SECRET)
            .unwrap()
            .verify(&request.body, &request.headers)
            .unwrap();
    }
}

async fn failure(reply: Reply) -> Error {
    let receiver = Receiver::start().await;
    receiver.script([reply]);
    let mut sink = sink(&receiver, |b| b);
    sink.publish(Event::new("k", json!({"request": "body"})))
        .await
        .unwrap_err()
}

#[tokio::test]
async fn statuses_are_classified_and_carry_the_response_body() {
    let cases = [
        (200, None),
        (201, None),
        (204, None),
        (301, Some(true)),
        (400, Some(false)),
        (401, Some(false)),
        (404, Some(false)),
        (408, Some(true)),
        (409, Some(true)),
        (410, Some(false)),
        (422, Some(false)),
        (425, Some(true)),
        (429, Some(true)),
        (500, Some(true)),
        (501, Some(false)),
        (502, Some(true)),
        (503, Some(true)),
        (504, Some(true)),
    ];
    let receiver = Receiver::start().await;
    let mut sink = sink(&receiver, |b| b);
    for (status, expected) in cases {
        receiver.script([Reply::status(status).body(format!("answer {status}"))]);
        let result = sink
            .publish(Event::new("k", json!({"request": "body"})))
            .await;
        match (expected, result) {
            (None, Ok(())) => {}
            (
                Some(retryable),
                Err(Error::Http {
                    status: got,
                    retryable: got_retryable,
                    body,
                    ..
                }),
            ) => {
                assert_eq!(
                    (got.as_u16(), got_retryable),
                    (status, retryable),
                    "status {status}"
                );
                assert_eq!(
                    body,
                    format!("answer {status}"),
                    "the response body, not the request's"
                );
            }
            (expected, other) => panic!("status {status}: expected {expected:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn retry_after_is_read_in_both_forms() {
    let err = failure(Reply::status(429).header("retry-after", "7")).await;
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let err = failure(Reply::status(503).header("retry-after", &date)).await;
    let waited = err.retry_after().expect("an HTTP date is read");
    assert!(
        waited > Duration::from_secs(100) && waited <= Duration::from_secs(120),
        "{waited:?}"
    );
    let err = failure(Reply::status(503).header("retry-after", "whenever")).await;
    assert_eq!(err.retry_after(), None);
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(302).header("location", &receiver.url("/elsewhere"))]);
    let mut sink = sink(&receiver, |b| b);
    let err = sink.publish(Event::new("k", json!(1))).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Http {
                status: http::StatusCode::FOUND,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    // Nothing followed: prove it with a later request that arrives second.
    sink.publish(Event::new("k", json!(2))).await.unwrap();
    let paths: Vec<_> = receiver.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/hook", "/hook"]);
}

#[tokio::test]
async fn a_slow_server_times_out_transiently() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(204).delay(Duration::from_secs(30))]);
    let mut sink = sink(&receiver, |b| b.attempt_timeout(Duration::from_millis(200)));
    let err = sink.publish(Event::new("k", json!(1))).await.unwrap_err();
    support::assert_transient_transport(&err, true);
}

#[tokio::test]
async fn a_closed_port_is_a_transient_connect_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut sink = WebhookSink::builder(format!("http://127.0.0.1:{port}/hook"))
        .build()
        .unwrap();
    let err = sink.publish(Event::new("k", json!(1))).await.unwrap_err();
    support::assert_transient_transport(&err, false);
    assert!(err.to_string().contains("could not be reached"), "{err}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_any_request() {
    let receiver = Receiver::start().await;
    let mut sink = sink(&receiver, |b| b.max_body_bytes(1024));
    let err = sink
        .publish(Event::new("k", json!({"blob": "x".repeat(2048)})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { limit: 1024, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let small = Event::new("k", json!(1));
    sink.publish(small.clone()).await.unwrap();
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("webhook-id"), &*small.id);
}

#[test]
fn invalid_urls_and_schemes_are_build_errors() {
    for (url, check) in [
        (
            "not a url",
            (|e: &BuildError| matches!(e, BuildError::InvalidUrl { .. }))
                as fn(&BuildError) -> bool,
        ),
        ("/relative/path", |e| {
            matches!(e, BuildError::InvalidUrl { .. })
        }),
        ("ftp://example.com/x", |e| {
            matches!(e, BuildError::UnsupportedScheme { .. })
        }),
        ("file:///etc/passwd", |e| {
            matches!(e, BuildError::UnsupportedScheme { .. })
        }),
    ] {
        let err = WebhookSink::builder(url).build().unwrap_err();
        assert!(check(&err), "{url}: {err:?}");
        assert!(!err.to_string().is_empty());
    }
    assert!(matches!(
        WebhookSink::builder("http://example.com")
            .https_only(true)
            .build(),
        Err(BuildError::HttpsRequired)
    ));
    assert!(
        WebhookSink::builder("https://example.com")
            .https_only(true)
            .build()
            .is_ok()
    );
}

#[tokio::test]
async fn public_only_refuses_private_destinations_without_sending() {
    let receiver = Receiver::start().await;
    let port = receiver.addr.port();
    for host in [
        "127.0.0.1",
        "[::1]",
        "10.0.0.1",
        "169.254.169.254",
        "[::ffff:127.0.0.1]",
    ] {
        let err = WebhookSink::builder(format!("http://{host}:{port}/hook"))
            .egress(EgressPolicy::public_only())
            .build()
            .unwrap_err();
        assert!(matches!(err, BuildError::Refused(_)), "{host}: {err:?}");
    }
    // A host name resolving to loopback is refused at the attempt.
    let mut guarded = WebhookSink::builder(format!("http://localhost:{port}/hook"))
        .egress(EgressPolicy::public_only())
        .build()
        .unwrap();
    let err = guarded
        .publish(Event::new("k", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("loopback"), "{err}");

    // With an allow-list entry, loopback is reachable again.
    let allow = || {
        EgressPolicy::public_only()
            .allow("127.0.0.0/8".parse().unwrap())
            .allow("::1/128".parse().unwrap())
    };
    let mut allowed = WebhookSink::builder(format!("http://localhost:{port}/hook"))
        .egress(allow())
        .build()
        .unwrap();
    let event = Event::new("k", json!(2));
    allowed.publish(event.clone()).await.unwrap();
    let mut literal = WebhookSink::builder(receiver.url("/hook"))
        .egress(allow())
        .build()
        .unwrap();
    literal.publish(Event::new("k", json!(3))).await.unwrap();
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2, "the refused attempt sent nothing");
    assert_eq!(requests[0].header("webhook-id"), &*event.id);
}

#[tokio::test]
async fn the_status_classification_can_be_overridden() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(404), Reply::status(503)]);
    let mut sink = sink(&receiver, |b| {
        b.classify_status(|s| match s {
            StatusCode::NOT_FOUND => Some(true),
            StatusCode::SERVICE_UNAVAILABLE => Some(false),
            _ => None,
        })
    });
    let err = sink.publish(Event::new("k", json!(1))).await.unwrap_err();
    assert!(err.is_retryable(), "404 overridden to retryable: {err}");
    let err = sink.publish(Event::new("k", json!(1))).await.unwrap_err();
    assert!(!err.is_retryable(), "503 overridden to permanent: {err}");
}

#[tokio::test]
async fn secrets_and_custom_header_values_stay_out_of_debug_and_errors() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(401).body("bad signature")]);
    let mut sink = WebhookSink::builder(format!(
        "http://user:hunter2@{}/hook?token=t0ps3cret",
        receiver.addr
    ))
    .secret(SECRET.parse().unwrap())
    .header("authorization", "Bearer s3cr3t-t0k3n")
    .build()
    .unwrap();
    let err = sink.publish(Event::new("k", json!(1))).await.unwrap_err();
    let texts = [format!("{sink:?}"), format!("{err:?}"), err.to_string()];
    for text in &texts {
        for secret in [
            "C2FVsBQIhrscChlQIMV",
            "s3cr3t-t0k3n",
            "hunter2",
            "t0ps3cret",
        ] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
    }
    // The credentials were still sent where they belong.
    assert_eq!(
        receiver.requests()[0].header("authorization"),
        "Bearer s3cr3t-t0k3n"
    );
}

#[tokio::test]
async fn a_long_error_body_is_cut_and_cleaned() {
    let err = failure(Reply::status(500).body("line\n".repeat(3000))).await;
    let Error::Http { body, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(body.len() <= 4096, "{}", body.len());
    assert!(!body.contains('\n'));
}

#[tokio::test]
async fn with_retry_policy_two_503s_then_204_deliver_once_after_three_attempts() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(503), Reply::status(503), Reply::status(204)]);
    let webhook = sink(&receiver, |b| b.secret(SECRET.parse().unwrap()));
    let mut stack = tower::ServiceBuilder::new()
        .buffer(8)
        .retry(RetryPolicy::new(
            Backoff::new().min(Duration::from_millis(10)),
        ))
        .timeout(Duration::from_secs(15))
        .service(webhook);
    let event = Event::new("order.placed", json!({"order_id": 1}));
    stack.publish(event.clone()).await.unwrap();
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.header("webhook-id") == *event.id));
}

#[tokio::test]
async fn a_permanent_answer_is_not_retried_by_the_stack() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(410)]);
    let mut stack = tower::ServiceBuilder::new()
        .buffer(8)
        .retry(RetryPolicy::new(
            Backoff::new().min(Duration::from_millis(10)),
        ))
        .timeout(Duration::from_secs(15))
        .service(sink(&receiver, |b| b));
    let err = stack.publish(Event::new("k", json!(1))).await.unwrap_err();
    assert!(!err.is_retryable());
    assert_eq!(receiver.requests().len(), 1);
}

#[tokio::test]
async fn an_id_that_cannot_be_a_header_is_a_permanent_error() {
    let receiver = Receiver::start().await;
    let mut sink = sink(&receiver, |b| b);
    let err = sink
        .publish(Event::with_id("k", "has spaces", json!(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidEvent { field: "id", .. }),
        "{err:?}"
    );
}

#[test]
fn each_attempt_has_a_span_with_the_event_and_the_outcome() {
    record_webhook_spans();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let event = Event::with_id("order.placed", "evt_span", json!(1));
    rt.block_on(async {
        let receiver = Receiver::start().await;
        sink(&receiver, |b| b).publish(event.clone()).await.unwrap();
    });
    let fields = webhook_span_of("evt_span");
    for expected in [
        "messaging.message.id=evt_span",
        "eventsink.event.kind=order.placed",
        "server.address=127.0.0.1",
        "http.request.method=POST",
        "url.full=http://127.0.0.1:",
        "http.response.status_code=204",
        "eventsink.duration_ms=",
    ] {
        assert!(fields.contains(expected), "{expected} missing in {fields}");
    }
}

/// A secret in the URL's path (as Slack's, Discord's and Zapier's webhook
/// URLs have) appears nowhere the sink shows its destination: not in its
/// `Debug`, its errors or its span, unless the path is asked for.
#[test]
fn a_secret_in_the_url_path_is_never_shown() {
    const TOKEN: &str = "xoxs3cr3tT0k3nInThePath";
    record_webhook_spans();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = format!("/services/T0/B0/{TOKEN}");
    let (sink, err, shown) = rt.block_on(async {
        let receiver = Receiver::start().await;
        receiver.script([Reply::status(500)]);
        let sink = WebhookSink::builder(receiver.url(&path))
            .build()
            .expect("sink builds");
        let event = Event::with_id("order.placed", "evt_path", json!(1));
        let err = sink
            .clone()
            .publish(event)
            .await
            .expect_err("the receiver answers 500");
        assert_eq!(receiver.requests()[0].path, path, "sent to the whole URL");
        let shown = WebhookSink::builder(receiver.url(&path))
            .show_path(true)
            .build()
            .expect("sink builds");
        (sink, err, shown)
    });
    for (what, text) in [
        ("the sink's Debug", format!("{sink:?}")),
        ("the error", format!("{err} {err:?}")),
        ("the span", webhook_span_of("evt_path")),
    ] {
        assert!(!text.contains(TOKEN), "{what} shows the path: {text}");
        assert!(text.contains("/REDACTED"), "{what}: {text}");
    }
    assert!(shown.url().ends_with(&path), "{}", shown.url());
}

/// The fields of every `webhook` span of this test binary, by span id.
static WEBHOOK_SPANS: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());

/// Records every `webhook` span into [`WEBHOOK_SPANS`], with one subscriber
/// for the whole binary: tracing caches process-wide whether a callsite is
/// enabled, so a subscriber set for one test's thread misses spans while
/// other tests run.
fn record_webhook_spans() {
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(FieldRecorder);
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
    });
}

/// The fields of the `webhook` span of the event `id`, joined.
fn webhook_span_of(id: &str) -> String {
    let spans = WEBHOOK_SPANS.lock().unwrap();
    let marker = format!("messaging.message.id={id}");
    let span = spans.iter().find(|(_, field)| *field == marker);
    let Some(&(span, _)) = span else {
        panic!("no webhook span for {id}")
    };
    let fields: Vec<&str> = spans
        .iter()
        .filter(|(s, _)| *s == span)
        .map(|(_, field)| field.as_str())
        .collect();
    fields.join(" ")
}

/// Records the fields of every `webhook` span.
struct FieldRecorder;

struct Visitor(u64);

impl tracing::field::Visit for Visitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let field = format!("{}={value:?}", field.name()).replace('"', "");
        WEBHOOK_SPANS.lock().unwrap().push((self.0, field));
    }
}

impl<S> tracing_subscriber::Layer<S> for FieldRecorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "webhook" {
            attrs.record(&mut Visitor(id.into_u64()));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if ctx.metadata(id).is_some_and(|m| m.name() == "webhook") {
            values.record(&mut Visitor(id.into_u64()));
        }
    }
}

/// The webhook destination of the conformance suite: what the receiver got,
/// parsed back into events.
struct Http {
    receiver: Receiver,
}

impl<P: Serialize + DeserializeOwned + Send + Sync + 'static> Destination<P> for Http {
    type Sink = WebhookSink;

    fn sink(&self) -> WebhookSink {
        sink(&self.receiver, |b| b.secret(SECRET.parse().unwrap()))
    }

    async fn arrived(&self, n: usize) -> Option<Vec<Event<P>>> {
        let requests = self.receiver.wait_for(n, ARRIVAL_TIMEOUT).await;
        let mut events: Vec<Event<P>> = requests
            .iter()
            .inspect(|r| assert!(standard_signature_present(r, SECRET)))
            .map(|r| serde_json::from_slice(&r.body).expect("an event body"))
            .collect();
        events.sort_by(|a, b| a.id.cmp(&b.id));
        Some(events)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_sink_passes_conformance() {
    let mut receivers = Vec::new();
    for _ in 0..4 {
        receivers.push(Receiver::start().await);
    }
    let (typed, json) = (receivers.pop().unwrap(), Mutex::new(receivers));
    let typed = Mutex::new(Some(typed));
    conformance::run(
        || Http {
            receiver: json.lock().unwrap().pop().expect("a receiver per case"),
        },
        || Http {
            receiver: typed.lock().unwrap().take().expect("one typed case"),
        },
    )
    .await;
}
