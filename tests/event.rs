//! Event: JSON form, explicit ids and times, typed payloads.
mod support;

use chrono::{DateTime, TimeZone, Utc};
use eventsink::Event;
use serde_json::json;
use support::{OrderPlaced, order};

#[test]
fn typed_payload_round_trips_through_json_unchanged() {
    let event = Event::new("order.placed", order(42));
    let json = serde_json::to_string(&event).unwrap();
    let back: Event<OrderPlaced> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, event);
    assert_eq!(back.payload.lines[1].price_cents, -300);
}

#[test]
fn typed_payload_reads_as_plain_json_too() {
    let event = Event::new("order.placed", order(42));
    let value: Event = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
    assert_eq!(value.payload["order_id"], 42);
    assert_eq!(value.payload["lines"][0]["sku"], "A-1");
}

#[test]
fn json_has_exactly_the_four_fields() {
    let at = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    let event = Event {
        created_at: at,
        ..Event::with_id("a.b", "evt_1", json!({"k": "v"}))
    };
    let value = serde_json::to_value(&event).unwrap();
    let object = value.as_object().unwrap();
    let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["created_at", "id", "kind", "payload"]);
    assert_eq!(object["created_at"], "2026-11-27T12:00:00Z");
}

#[test]
fn sub_second_times_round_trip_exactly() {
    let event = Event::new("a", json!(null));
    let back: Event = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
    assert_eq!(back.created_at, event.created_at);
    let text = serde_json::to_value(&event).unwrap()["created_at"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.ends_with('Z'), "UTC with a Z suffix: {text}");
    assert!(
        DateTime::parse_from_rfc3339(&text).is_ok(),
        "RFC 3339: {text}"
    );
}

#[test]
fn events_from_the_go_original_parse() {
    // The Go encoder writes RFC 3339 with nanoseconds and a numeric offset
    // when the time is not UTC.
    let go = r#"{"kind":"account-registered","id":"5f0c","created_at":"2026-11-27T13:00:00.123456789+01:00","payload":{"account_id":"a1"}}"#;
    let event: Event = serde_json::from_str(go).unwrap();
    assert_eq!(&*event.kind, "account-registered");
    assert_eq!(
        event.created_at,
        Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
            + chrono::Duration::nanoseconds(123_456_789)
    );
}

#[test]
fn malformed_events_are_errors_not_panics() {
    for bad in [
        r#"{}"#,
        r#"{"kind":1,"id":"x","created_at":"2026-11-27T12:00:00Z","payload":null}"#,
        r#"{"kind":"a","id":"x","created_at":"yesterday","payload":null}"#,
    ] {
        assert!(serde_json::from_str::<Event>(bad).is_err(), "{bad}");
    }
}
