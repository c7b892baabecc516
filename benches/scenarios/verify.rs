//! Scenarios of the verify feature: the receiver's cost per request.

use std::hint::black_box;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use eventsink::Event;
use eventsink::signature::Secret;
use eventsink::verify::{self, Clock, VerifyConfig, VerifyWebhookLayer};
use http::{HeaderMap, Request};
use http_body_util::Full;
use tower::{Layer, ServiceExt};

use crate::harness::{Options, Scenario, paired, per_second, report, runtime, timed};

/// Size of the webhook body: 1 KiB of event JSON.
const BODY_BYTES: usize = 1024;
/// The fixed time the requests are signed at and verified at.
const NOW: i64 = 1_800_000_000;

pub fn all() -> Vec<Scenario> {
    vec![Scenario {
        name: "verify",
        run: verify_scenario,
    }]
}

/// A receiver handler doing the least a real one does: read the body and
/// parse the event. (Against a handler that does nothing at all, any layer
/// looks expensive; the line printed before `BENCH` gives the layer's cost
/// per request in microseconds, which does not depend on the handler.)
async fn handler(
    request: Request<Full<Bytes>>,
) -> Result<http::Response<String>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let body = request
        .into_body()
        .collect()
        .await
        .unwrap_or_default()
        .to_bytes();
    let event: Event = serde_json::from_slice(&body).expect("the bench body is an event");
    black_box(event);
    Ok(http::Response::new(String::new()))
}

/// An event whose JSON is exactly [`BODY_BYTES`] long: a realistic payload
/// of a few fields, padded by a note.
fn event_body() -> Bytes {
    let json = |note: &str| {
        format!(
            r#"{{"kind":"order.placed","id":"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","created_at":"2026-11-27T12:00:00Z","payload":{{"order_id":7,"customer":"c_123","lines":[{{"sku":"A-1","quantity":2,"price_cents":1250}},{{"sku":"B-2","quantity":1,"price_cents":300}}],"note":"{note}"}}}}"#
        )
    };
    let short = json("").len();
    let body = json(&"x".repeat(BODY_BYTES.saturating_sub(short)));
    assert_eq!(body.len(), BODY_BYTES);
    Bytes::from(body)
}

/// Verified requests/s through `VerifyWebhookLayer` (headers, tolerance,
/// size-limited body read, HMAC-SHA256 over 1 KiB, extension) against the
/// same handler without the layer, both called in process with `oneshot`.
fn verify_scenario(options: &Options) {
    let count = options.size(20_000, 200_000);
    let rt = runtime();
    let secret: Secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
        .parse()
        .expect("secret");
    let body = event_body();
    let headers: HeaderMap = verify::sign(
        std::slice::from_ref(&secret),
        "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        NOW,
        &body,
    )
    .expect("valid id");
    let layer_secret = secret.clone();
    let layer = VerifyWebhookLayer::new(VerifyConfig::new(secret).clock(Clock::fixed(
        Utc.timestamp_opt(NOW, 0).single().expect("valid time"),
    )));
    let request = || {
        let mut request = Request::post("/hook")
            .body(Full::new(body.clone()))
            .expect("request");
        *request.headers_mut() = headers.clone();
        request
    };
    let ours = layer.layer(tower::service_fn(handler));
    let baseline = tower::service_fn(handler);

    let m = paired(
        || {
            let (_, elapsed) = timed(|| {
                rt.block_on(async {
                    for _ in 0..count {
                        let response = ours.clone().oneshot(request()).await.expect("infallible");
                        assert!(response.status().is_success(), "{}", response.status());
                    }
                })
            });
            per_second(count, elapsed)
        },
        || {
            let (_, elapsed) = timed(|| {
                rt.block_on(async {
                    for _ in 0..count {
                        // `baseline` is Copy: each oneshot gets a copy, as `ours` a clone.
                        let response = baseline.oneshot(request()).await.expect("infallible");
                        assert!(response.status().is_success(), "{}", response.status());
                    }
                })
            });
            per_second(count, elapsed)
        },
    );
    // The floor: the signature check alone, on the same input.
    let signatures = headers["webhook-signature"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let secrets = [layer_secret];
    let (_, elapsed) = timed(|| {
        for _ in 0..count {
            black_box(eventsink::signature::matches(
                black_box(&secrets),
                "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
                NOW,
                black_box(&body),
                &signatures,
            ));
        }
    });
    println!(
        "verify: the layer adds {:.2} µs per request; the HMAC-SHA256 check alone takes {:.2} µs",
        1e6 / m.ours - 1e6 / m.baseline,
        elapsed.as_secs_f64() * 1e6 / count as f64,
    );
    report(
        "verify",
        m.ours,
        m.baseline,
        m.ratio,
        "requests/s",
        "same handler without the layer",
    );
}
