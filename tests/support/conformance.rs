//! The conformance suite every sink passes: one event, many concurrent
//! events, a large payload and a typed payload, each checked against what
//! reached the sink's destination.

use std::time::Duration;

use eventsink::{BoxError, Event, SinkExt};
use serde_json::{Value, json};
use tower::Service;

use super::{OrderPlaced, order};

/// How many publishers the concurrency case runs at once.
pub const CONCURRENT_PUBLISHERS: usize = 16;
/// How many events each of them publishes.
pub const EVENTS_PER_PUBLISHER: usize = 25;
/// The size of the large payload: below the webhook's default body limit.
pub const LARGE_PAYLOAD_BYTES: usize = 128 * 1024;
/// How long to wait for events that arrive asynchronously.
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a sink delivers, and how to read back what arrived there.
pub trait Destination<P> {
    /// The sink under test.
    type Sink: Service<Event<P>, Error: Into<BoxError>, Future: Send> + Clone + Send + 'static;

    /// A sink delivering to this destination.
    fn sink(&self) -> Self::Sink;

    /// The events that arrived, sorted by id, once at least `n` did; `None`
    /// for a sink that keeps nothing.
    fn arrived(&self, n: usize) -> impl Future<Output = Option<Vec<Event<P>>>> + Send;
}

/// Runs every case, each against a fresh destination from `json` (for
/// `serde_json::Value` payloads) or `typed` (for a struct payload).
pub async fn run<J, T>(json: impl Fn() -> J, typed: impl Fn() -> T)
where
    J: Destination<Value>,
    T: Destination<OrderPlaced>,
{
    one_event(json()).await;
    many_concurrent_events(json()).await;
    large_payload(json()).await;
    typed_payload(typed()).await;
}

async fn publish_all<P, D: Destination<P>>(dest: &D, events: &[Event<P>]) {
    let mut sink = dest.sink();
    for event in events {
        sink.publish(event.clone())
            .await
            .map_err(Into::into)
            .unwrap_or_else(|e| panic!("publishing {} failed: {e}", event.id));
    }
}

async fn check_arrived<P, D>(dest: &D, mut sent: Vec<Event<P>>, case: &str)
where
    D: Destination<P>,
    P: PartialEq + std::fmt::Debug,
{
    let Some(arrived) = dest.arrived(sent.len()).await else {
        return;
    };
    sent.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        arrived.len(),
        sent.len(),
        "{case}: count of events that arrived"
    );
    for (got, want) in arrived.iter().zip(&sent) {
        assert_eq!(got, want, "{case}: event arrived changed");
    }
}

async fn one_event<D: Destination<Value>>(dest: D) {
    let event = Event::new(
        "conformance.one",
        json!({"n": 1, "text": "héllo\n\"quoted\""}),
    );
    publish_all(&dest, std::slice::from_ref(&event)).await;
    check_arrived(&dest, vec![event], "one event").await;
}

async fn many_concurrent_events<D: Destination<Value>>(dest: D) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = Vec::new();
    for publisher in 0..CONCURRENT_PUBLISHERS {
        let events: Vec<_> = (0..EVENTS_PER_PUBLISHER)
            .map(|n| Event::new("conformance.many", json!({"publisher": publisher, "n": n})))
            .collect();
        sent.extend(events.iter().cloned());
        let mut sink = dest.sink();
        tasks.spawn(async move {
            for event in events {
                sink.publish(event).await.map_err(Into::into)?;
            }
            Ok::<(), BoxError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("publisher task").expect("concurrent publish");
    }
    check_arrived(&dest, sent, "many concurrent events").await;
}

async fn large_payload<D: Destination<Value>>(dest: D) {
    let blob: String = (0..LARGE_PAYLOAD_BYTES)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let event = Event::new("conformance.large", json!({"blob": blob}));
    publish_all(&dest, std::slice::from_ref(&event)).await;
    check_arrived(&dest, vec![event], "large payload").await;
}

async fn typed_payload<D: Destination<OrderPlaced>>(dest: D) {
    let events: Vec<_> = (1..=3)
        .map(|n| Event::new("conformance.typed", order(n)))
        .collect();
    publish_all(&dest, &events).await;
    check_arrived(&dest, events, "typed payload").await;
}
