//! RecordingSink: conformance, concurrent publishers, waiting and failures.
mod support;

use std::time::Duration;

use eventsink::{Event, RecordingSink, Retryable, SinkExt};
use serde_json::json;
use support::conformance::{self, ARRIVAL_TIMEOUT, Destination};

struct Recorder<P>(RecordingSink<P>);

impl<P: Send + Sync + 'static> Destination<P> for Recorder<P> {
    type Sink = RecordingSink<P>;

    fn sink(&self) -> RecordingSink<P> {
        self.0.clone()
    }

    async fn arrived(&self, n: usize) -> Option<Vec<Event<P>>> {
        let mut events = self
            .0
            .wait_for(n, ARRIVAL_TIMEOUT)
            .await
            .expect("events recorded");
        events.sort_by(|a, b| a.id.cmp(&b.id));
        Some(events)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_sink_passes_conformance() {
    conformance::run(
        || Recorder(RecordingSink::new()),
        || Recorder(RecordingSink::new()),
    )
    .await;
}

#[tokio::test]
async fn wait_for_reports_how_many_arrived_when_it_gives_up() {
    let mut recorder = RecordingSink::new();
    recorder.publish(Event::new("a", json!(1))).await.unwrap();
    let err = recorder
        .wait_for(2, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!((err.wanted, err.recorded), (2, 1));
    assert!(err.to_string().contains("only 1 were recorded"), "{err}");
}

#[tokio::test]
async fn wait_for_wakes_when_events_arrive_from_another_task() {
    let recorder = RecordingSink::new();
    let mut sink = recorder.clone();
    let publisher = tokio::spawn(async move {
        for n in 0..3 {
            tokio::task::yield_now().await;
            sink.publish(Event::new("a", json!(n))).await.unwrap();
        }
    });
    let events = recorder.wait_for(3, ARRIVAL_TIMEOUT).await.unwrap();
    assert_eq!(events.len(), 3);
    publisher.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_while_events_keep_arriving_does_not_deadlock() {
    let _watchdog = support::Watchdog::new(
        Duration::from_secs(60),
        "RecordingSink::wait_for deadlocked",
    );
    const EVENTS: usize = 20_000;
    let recorder = RecordingSink::new();
    let mut publishers = tokio::task::JoinSet::new();
    for task in 0..2 {
        let mut sink = recorder.clone();
        publishers.spawn(async move {
            for n in 0..EVENTS / 2 {
                sink.publish(Event::new("a", json!([task, n])))
                    .await
                    .unwrap();
            }
        });
    }
    for target in (1..=EVENTS).step_by(97) {
        recorder.wait_for(target, ARRIVAL_TIMEOUT).await.unwrap();
    }
    publishers.join_all().await;
    assert_eq!(
        recorder
            .wait_for(EVENTS, ARRIVAL_TIMEOUT)
            .await
            .unwrap()
            .len(),
        EVENTS
    );
}

#[tokio::test]
async fn failures_are_counted_as_calls_and_not_recorded() {
    let mut recorder = RecordingSink::new();
    recorder.fail_next(2);
    for _ in 0..2 {
        let err = recorder
            .publish(Event::new("a", json!(1)))
            .await
            .unwrap_err();
        assert!(err.is_retryable());
    }
    recorder.publish(Event::new("a", json!(1))).await.unwrap();
    assert_eq!(recorder.calls(), 3);
    recorder.assert_published(&[Event::new("a", json!(1))]);
}

#[tokio::test]
#[should_panic(expected = "event 0: want payload {\"x\":2}, got {\"x\":1}")]
async fn assert_published_compares_payloads() {
    let mut recorder = RecordingSink::new();
    recorder
        .publish(Event::new("a", json!({"x": 1})))
        .await
        .unwrap();
    recorder.assert_published(&[Event::new("a", json!({"x": 2}))]);
}

#[tokio::test]
#[should_panic(expected = "event 0: want kind \"b\", got \"a\"")]
async fn assert_published_compares_kinds() {
    let mut recorder = RecordingSink::new();
    recorder.publish(Event::new("a", json!(1))).await.unwrap();
    recorder.assert_published(&[Event::new("b", json!(1))]);
}

#[tokio::test]
async fn permanent_failures_are_not_retryable_and_throttling_carries_retry_after() {
    let mut recorder = RecordingSink::new();
    recorder.fail_next_permanently(1);
    let err = recorder
        .publish(Event::new("a", json!(1)))
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert_eq!(err.retry_after(), None);
    recorder.fail_next_with_retry_after(1, std::time::Duration::from_secs(9));
    let err = recorder
        .publish(Event::new("a", json!(1)))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.retry_after(), Some(std::time::Duration::from_secs(9)));
    recorder.publish(Event::new("a", json!(1))).await.unwrap();
    assert_eq!(recorder.calls(), 3);
}
