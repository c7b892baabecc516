//! Routing by kind: exact kinds and `prefix.*` patterns, events no
//! destination takes (dropped, rejected, or sent to a destination of
//! their own), and configurations refused at build time; against
//! recording sinks, a loopback webhook receiver and real files.

mod support;

use std::time::Duration;

use eventsink::fanout::{BuildError, FanOut, FanOutError};
use eventsink::{BoxError, Event, RecordingSink, Retryable, SinkExt};
use serde_json::json;

fn kinds(recorder: &RecordingSink) -> Vec<String> {
    recorder
        .events()
        .iter()
        .map(|e| e.kind.to_string())
        .collect()
}

#[tokio::test]
async fn exact_and_prefix_patterns_route_each_kind() {
    let (billing, crm, audit) = (
        RecordingSink::new(),
        RecordingSink::new(),
        RecordingSink::new(),
    );
    let mut fanout = FanOut::builder()
        .to_kinds("billing", ["invoice.paid", "order.*"], billing.clone())
        .to_kinds("crm", ["customer.*"], crm.clone())
        .to("audit", audit.clone())
        .build()
        .expect("fan-out");
    let sent = [
        ("invoice.paid", vec!["billing", "audit"]),
        ("invoice.voided", vec!["audit"]),
        ("order.placed", vec!["billing", "audit"]),
        ("order.line.added", vec!["billing", "audit"]),
        ("order", vec!["audit"]),
        ("orders.placed", vec!["audit"]),
        ("customer.created", vec!["crm", "audit"]),
    ];
    for (kind, expected) in &sent {
        assert_eq!(&fanout.routes_for(kind), expected, "{kind}");
        let routed = fanout
            .publish(Event::new(*kind, json!({})))
            .await
            .expect("publish");
        assert_eq!(routed.destinations(), expected.len(), "{kind}");
    }
    assert_eq!(
        kinds(&billing),
        ["invoice.paid", "order.placed", "order.line.added"]
    );
    assert_eq!(kinds(&crm), ["customer.created"]);
    assert_eq!(kinds(&audit).len(), sent.len());
}

#[tokio::test]
async fn unmatched_events_are_dropped_by_default() {
    let billing = RecordingSink::new();
    let mut fanout = FanOut::builder()
        .to_kinds("billing", ["invoice.*"], billing.clone())
        .build()
        .expect("fan-out");
    let routed = fanout
        .publish(Event::new("user.signed_up", json!({})))
        .await
        .expect("dropped is not an error");
    assert!(routed.is_dropped());
    assert_eq!(routed.destinations(), 0);
    assert!(billing.events().is_empty());
}

#[tokio::test]
async fn unmatched_events_can_be_rejected() {
    let billing = RecordingSink::new();
    let mut fanout = FanOut::builder()
        .to_kinds("billing", ["invoice.*"], billing.clone())
        .reject_unmatched()
        .build()
        .expect("fan-out");
    let err = fanout
        .publish(Event::new("user.signed_up", json!({})))
        .await
        .expect_err("nobody takes it");
    assert!(
        matches!(&err, FanOutError::Unrouted { kind } if &**kind == "user.signed_up"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("\"user.signed_up\"") && text.contains("unmatched_to"),
        "{text}"
    );
    assert!(!BoxError::from(err).is_retryable(), "also once boxed");
    assert!(billing.events().is_empty());
    // A matched event still goes through.
    fanout
        .publish(Event::new("invoice.paid", json!({})))
        .await
        .expect("matched");
    assert_eq!(billing.events().len(), 1);
}

#[tokio::test]
async fn unmatched_events_go_to_their_own_destination_only() {
    let (billing, rest) = (RecordingSink::new(), RecordingSink::new());
    let mut fanout = FanOut::builder()
        .unmatched_to("rest", rest.clone())
        .to_kinds("billing", ["invoice.*"], billing.clone())
        .build()
        .expect("fan-out");
    assert_eq!(
        fanout.destinations().collect::<Vec<_>>(),
        ["billing", "rest"]
    );
    for kind in [
        "invoice.paid",
        "user.signed_up",
        "invoice.voided",
        "order.placed",
    ] {
        let routed = fanout
            .publish(Event::new(kind, json!({})))
            .await
            .expect("publish");
        assert_eq!(routed.destinations(), 1, "{kind}");
    }
    assert_eq!(kinds(&billing), ["invoice.paid", "invoice.voided"]);
    assert_eq!(kinds(&rest), ["user.signed_up", "order.placed"]);
}

#[test]
fn invalid_patterns_are_refused_at_build_naming_the_destination() {
    for bad in ["", "*", "order*", "order.*.paid", "*.paid", ".*", "a\nb"] {
        let err = FanOut::builder()
            .to_kinds("ok", ["invoice.paid"], RecordingSink::<()>::new())
            .to_kinds("billing", ["order.placed", bad], RecordingSink::new())
            .build()
            .expect_err(bad);
        let BuildError::Pattern {
            destination,
            source,
        } = &err
        else {
            panic!("{bad:?}: {err:?}");
        };
        assert_eq!(&**destination, "billing");
        assert_eq!(source.pattern(), bad);
        // What anyhow or eyre would print: the error and its source.
        let chain = format!("{err}: {source}");
        assert!(chain.contains("\"billing\""), "{chain}");
        assert!(chain.contains(&format!("{bad:?}")), "{chain}");
        assert!(chain.contains("\"order.*\""), "says what to write: {chain}");
    }
}

#[test]
fn configurations_that_cannot_work_are_refused_at_build() {
    let sink = RecordingSink::<()>::new;
    let duplicate = FanOut::builder()
        .to("a", sink())
        .to_kinds("a", ["x"], sink())
        .build()
        .unwrap_err();
    assert_eq!(
        duplicate,
        BuildError::DuplicateName {
            destination: "a".into()
        }
    );
    let fallback_named_twice = FanOut::builder()
        .to_kinds("a", ["x"], sink())
        .unmatched_to("a", sink())
        .build()
        .unwrap_err();
    assert!(matches!(
        fallback_named_twice,
        BuildError::DuplicateName { .. }
    ));
    let empty = FanOut::builder().to("", sink()).build().unwrap_err();
    assert_eq!(empty, BuildError::EmptyName);
    let no_kinds = FanOut::builder()
        .to_kinds("a", Vec::<&str>::new(), sink())
        .build()
        .unwrap_err();
    assert!(
        no_kinds.to_string().contains("subscribes to no kind"),
        "{no_kinds}"
    );
    let unreachable = FanOut::builder()
        .to("audit", sink())
        .unmatched_to("rest", sink())
        .build()
        .unwrap_err();
    assert_eq!(
        unreachable,
        BuildError::UnreachableFallback {
            fallback: "rest".into(),
            takes_all: "audit".into()
        }
    );
    assert!(unreachable.to_string().contains("never get one"));
}

#[cfg(feature = "webhook")]
#[tokio::test]
async fn routes_to_a_webhook_and_files_together() {
    use eventsink::{BoxSink, FsSink, WebhookSink};
    let receiver = support::receiver::Receiver::start().await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut fanout: FanOut<BoxSink> = FanOut::builder()
        .to_kinds(
            "billing",
            ["invoice.*"],
            WebhookSink::builder(receiver.url("/billing"))
                .build()
                .expect("webhook")
                .boxed_sink(),
        )
        .to("archive", FsSink::new(tmp.path()).expect("fs").boxed_sink())
        .build()
        .expect("fan-out");
    let invoice = Event::new("invoice.paid", json!({"invoice": 1}));
    let signup = Event::new("user.signed_up", json!({"user": 2}));
    fanout.publish(invoice.clone()).await.expect("invoice");
    fanout.publish(signup.clone()).await.expect("signup");

    let requests = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("webhook-id"), &*invoice.id);
    let mut archived = vec![invoice, signup];
    archived.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        support::read_event_files::<serde_json::Value>(tmp.path()),
        archived
    );
}
