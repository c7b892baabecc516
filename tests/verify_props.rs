//! Property tests of the receiver: garbage never panics, whatever our
//! signer makes verifies, and any single-bit change fails.
#![cfg(feature = "verify")]

use std::convert::Infallible;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use eventsink::signature::{self, Scheme, Secret};
use eventsink::verify::{self, Clock, Rejection, VerifyConfig, VerifyWebhookLayer};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tower::{Layer, ServiceExt};

const NOW: i64 = 1_800_000_000;

/// Cases per property: each verifies a few HMACs, well under a millisecond.
const CASES: u32 = 256;

/// Bounded cases for CI, and failures saved in
/// `proptest-regressions/verify_props.txt` (committed; replayed first on every run).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/verify_props.txt",
        ))),
        ..ProptestConfig::default()
    }
}

fn layer(secrets: &[Secret], scheme: Scheme, now: i64) -> VerifyWebhookLayer {
    let mut config = VerifyConfig::new(secrets[0].clone())
        .scheme(scheme)
        .max_body_bytes(4096)
        .clock(Clock::fixed(Utc.timestamp_opt(now, 0).unwrap()));
    for secret in &secrets[1..] {
        config = config.secret(secret.clone());
    }
    VerifyWebhookLayer::new(config)
}

/// A header value: any bytes HTTP allows in one, or none at all.
fn header_value() -> impl Strategy<Value = Option<HeaderValue>> {
    prop_oneof![
        Just(None),
        prop::collection::vec(any::<u8>(), 0..120)
            .prop_filter_map("not a header value", |b| HeaderValue::from_bytes(&b).ok())
            .prop_map(Some),
        // Near misses: plausible shapes with random content.
        "(v1|v1a|v2)?,?[A-Za-z0-9+/=,. -]{0,90}".prop_map(|s| HeaderValue::from_str(&s).ok()),
        (-5_i64..=5).prop_map(|d| Some(HeaderValue::from(NOW + d * 100))),
    ]
}

fn secret() -> impl Strategy<Value = Secret> {
    prop::collection::vec(any::<u8>(), 24..=64).prop_map(|key| Secret::from_raw(key).unwrap())
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn flip(bytes: &mut [u8], bit: usize) {
    bytes[bit / 8 % bytes.len()] ^= 1 << (bit % 8);
}

#[test]
fn arbitrary_headers_and_bodies_never_panic() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let secrets = [Secret::from_raw([7_u8; 32]).unwrap()];
    let handler = tower::service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    proptest!(config(CASES), |(
        id in header_value(),
        timestamp in header_value(),
        signatures in header_value(),
        go in header_value(),
        body in prop::collection::vec(any::<u8>(), 0..5000),
        scheme in prop_oneof![Just(Scheme::Standard), Just(Scheme::GoCompatible), Just(Scheme::Both)],
    )| {
        let layer = layer(&secrets, scheme, NOW);
        let mut headers = HeaderMap::new();
        for (name, value) in [("webhook-id", id), ("webhook-timestamp", timestamp), ("webhook-signature", signatures), ("signature", go)] {
            if let Some(value) = value {
                headers.insert(name, value);
            }
        }
        let direct = layer.verify(&headers, &body);
        prop_assert!(direct.is_err(), "random input verified: {direct:?}");

        let mut request = Request::post("/").body(Full::new(Bytes::from(body))).unwrap();
        *request.headers_mut() = headers;
        let response = rt.block_on(layer.layer(handler).oneshot(request)).unwrap();
        let status = response.status();
        prop_assert!(
            [StatusCode::BAD_REQUEST, StatusCode::UNAUTHORIZED, StatusCode::PAYLOAD_TOO_LARGE].contains(&status),
            "{status}"
        );
    });
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn what_our_signer_makes_verifies(
        secrets in prop::collection::vec(secret(), 1..4),
        which in 0_usize..3,
        id in id(),
        timestamp in 0_i64..4_000_000_000,
        skew in -300_i64..=300,
        body in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        // The sender signs with one key; the receiver knows them all.
        let key = &secrets[which % secrets.len()];
        let headers = verify::sign(std::slice::from_ref(key), &id, timestamp, &body).unwrap();
        let verified = layer(&secrets, Scheme::Standard, timestamp + skew).verify(&headers, &body).unwrap();
        prop_assert_eq!(verified.id, id);
        prop_assert_eq!(verified.timestamp, timestamp);
    }

    #[test]
    fn a_valid_entry_among_arbitrary_ones_verifies(
        key in secret(),
        id in id(),
        body in prop::collection::vec(any::<u8>(), 0..512),
        before in prop::collection::vec("[!-~]{0,60}", 0..4),
        after in prop::collection::vec("[!-~]{0,60}", 0..4),
    ) {
        // Other versions, other keys' signatures, garbage: the parser skips
        // them and still finds ours, wherever it stands.
        let ours = signature::sign(std::slice::from_ref(&key), &id, NOW, &body);
        let header = before.iter().chain([&ours]).chain(&after).cloned().collect::<Vec<_>>().join(" ");
        prop_assert!(signature::matches(std::slice::from_ref(&key), &id, NOW, &body, &header));
        let noise = before.iter().chain(&after).cloned().collect::<Vec<_>>().join(" ");
        prop_assert!(!signature::matches(&[key], &id, NOW, &body, &noise));
    }

    #[test]
    fn a_flipped_body_bit_fails(
        key in secret(),
        id in id(),
        body in prop::collection::vec(any::<u8>(), 1..2048),
        bit in any::<usize>(),
    ) {
        let headers = verify::sign(std::slice::from_ref(&key), &id, NOW, &body).unwrap();
        let mut tampered = body.clone();
        flip(&mut tampered, bit);
        let result = layer(&[key], Scheme::Standard, NOW).verify(&headers, &tampered);
        prop_assert_eq!(result, Err(Rejection::SignatureMismatch));
    }

    #[test]
    fn a_flipped_id_bit_fails(
        key in secret(),
        id in id(),
        body in prop::collection::vec(any::<u8>(), 0..512),
        bit in any::<usize>(),
    ) {
        let mut headers = verify::sign(std::slice::from_ref(&key), &id, NOW, &body).unwrap();
        let mut tampered = id.clone().into_bytes();
        flip(&mut tampered, bit);
        // The flipped id may not even be a header value: then it cannot be sent.
        if let Ok(value) = HeaderValue::from_bytes(&tampered) {
            headers.insert("webhook-id", value);
            let result = layer(&[key], Scheme::Standard, NOW).verify(&headers, &body);
            prop_assert!(result.is_err(), "{result:?}");
        }
    }

    #[test]
    fn a_flipped_timestamp_bit_fails_on_the_signature(
        key in secret(),
        id in id(),
        timestamp in 0_i64..4_000_000_000,
        bit in 0_u32..63,
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut headers = verify::sign(std::slice::from_ref(&key), &id, timestamp, &body).unwrap();
        let tampered = timestamp ^ (1 << bit);
        headers.insert("webhook-timestamp", HeaderValue::from(tampered));
        // The clock is at the tampered time, so only the signature can catch it.
        let now = tampered.min(8_000_000_000_000);
        let result = layer(std::slice::from_ref(&key), Scheme::Standard, now).verify(&headers, &body);
        prop_assert!(result.is_err(), "{result:?}");
        if tampered < 8_000_000_000_000 {
            prop_assert_eq!(result, Err(Rejection::SignatureMismatch));
        }
        prop_assert!(!signature::matches(&[key], &id, tampered, &body, headers["webhook-signature"].to_str().unwrap()));
    }

    #[test]
    fn a_flipped_go_body_bit_fails(
        key in secret(),
        id in id(),
        bit in any::<usize>(),
    ) {
        let body = format!(r#"{{"kind":"k","id":"{id}","payload":null,"created_at":"2026-11-27T12:00:00Z","now":"2027-01-15T08:00:00Z"}}"#).into_bytes();
        let now = NOW;
        let mut headers = HeaderMap::new();
        headers.insert("signature", HeaderValue::from_str(&signature::sign_go(&key, &body)).unwrap());
        let mut tampered = body.clone();
        flip(&mut tampered, bit);
        let result = layer(&[key], Scheme::GoCompatible, now).verify(&headers, &tampered);
        prop_assert_eq!(result, Err(Rejection::SignatureMismatch));
    }
}
