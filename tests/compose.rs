//! The recommended stack, buffer → retry → timeout → sink, on tokio's paused
//! clock: delays are virtual, so the assertions on them are exact.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventsink::{BoxError, ErrorKind, Event, RecordingSink, RetryPolicy, SinkExt, classify};
use serde_json::json;
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;
use tower::{Service, ServiceBuilder};

const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

fn stack<S>(
    policy: RetryPolicy,
    sink: S,
) -> impl Service<Event, Response = (), Error = BoxError, Future: Send> + Clone + Send
where
    S: Service<Event, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Future: Send,
{
    ServiceBuilder::new()
        .buffer(16)
        .retry(policy)
        .timeout(ATTEMPT_TIMEOUT)
        .service(sink)
}

#[tokio::test(start_paused = true)]
async fn two_transient_failures_then_success_takes_three_calls() {
    let recorder = RecordingSink::new();
    recorder.fail_next(2, ErrorKind::Transient);
    let mut sink = stack(RetryPolicy::default(), recorder.clone());
    sink.publish(Event::new("a", json!(1))).await.unwrap();
    assert_eq!(recorder.calls(), 3);
    recorder.assert_published(&[Event::new("a", json!(1))]);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_not_retried() {
    let recorder = RecordingSink::new();
    recorder.fail_next(1, ErrorKind::Permanent);
    let mut sink = stack(RetryPolicy::default(), recorder.clone());
    let err = sink.publish(Event::new("a", json!(1))).await.unwrap_err();
    assert_eq!(classify(&err), ErrorKind::Permanent);
    assert_eq!(recorder.calls(), 1);
    assert!(recorder.events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_retried_with_the_same_event() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = RecordingSink::new();
    let hangs_once = {
        let (calls, seen) = (Arc::clone(&calls), seen.clone());
        tower::service_fn(move |event: Event| {
            let (calls, mut seen) = (Arc::clone(&calls), seen.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::future::pending::<()>().await;
                }
                seen.publish(event).await
            }
        })
    };
    let mut sink = stack(RetryPolicy::default(), hangs_once);
    let event = Event::new("a", json!(1));
    let started = Instant::now();
    sink.publish(event.clone()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(seen.events(), vec![event]);
    assert!(started.elapsed() >= ATTEMPT_TIMEOUT + Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn attempts_stop_at_the_maximum_and_return_the_last_error() {
    let recorder = RecordingSink::new();
    recorder.fail_next(usize::MAX, ErrorKind::Transient);
    let mut sink = stack(RetryPolicy::new().max_attempts(4), recorder.clone());
    let err = sink.publish(Event::new("a", json!(1))).await.unwrap_err();
    assert_eq!(classify(&err), ErrorKind::Transient);
    assert_eq!(recorder.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn backoff_waits_between_min_and_twice_min_before_the_first_retry() {
    let recorder = RecordingSink::new();
    recorder.fail_next(1, ErrorKind::Transient);
    let min = Duration::from_millis(300);
    let mut sink = stack(RetryPolicy::new().min_backoff(min), recorder.clone());
    let started = Instant::now();
    sink.publish(Event::new("a", json!(1))).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= min && waited <= 2 * min + Duration::from_millis(5),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_clamped_to_the_cap() {
    for (asked, expected) in [(7, 7), (600, 30)] {
        let recorder = RecordingSink::new();
        recorder.fail_next_with_retry_after(1, Duration::from_secs(asked));
        let mut sink = stack(RetryPolicy::default(), recorder.clone());
        let started = Instant::now();
        sink.publish(Event::new("a", json!(1))).await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(expected)
                && waited < Duration::from_secs(expected) + Duration::from_millis(5),
            "asked {asked}s, waited {waited:?}"
        );
        assert_eq!(recorder.calls(), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_stops_retries() {
    let recorder = RecordingSink::new();
    recorder.fail_next(1, ErrorKind::Transient);
    let empty = Arc::new(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
    let mut sink = stack(RetryPolicy::default().budget(empty), recorder.clone());
    let err = sink.publish(Event::new("a", json!(1))).await.unwrap_err();
    assert_eq!(classify(&err), ErrorKind::Transient);
    assert_eq!(recorder.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_stack_is_shared_by_concurrent_publishers() {
    let recorder = RecordingSink::new();
    recorder.fail_next(10, ErrorKind::Transient);
    let sink = stack(RetryPolicy::default(), recorder.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..32 {
        let mut sink = sink.clone();
        tasks.spawn(async move { sink.publish(Event::new("a", json!(n))).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(recorder.events().len(), 32);
    assert_eq!(recorder.calls(), 42);
}
