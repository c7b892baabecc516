//! The recommended stack, buffer → retry → timeout → sink, on tokio's paused
//! clock: delays are virtual, so the assertions on them are exact.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventsink::{
    Backoff, BoxError, Event, FsSink, NoopSink, RecordingSink, RetryPolicy, Retryable, SinkExt,
};
use serde_json::json;
use tokio::time::Instant;
use tower::retry::Policy;
use tower::retry::budget::TpsBudget;
use tower::{Service, ServiceBuilder, ServiceExt};

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
    recorder.fail_next(2);
    let mut sink = stack(RetryPolicy::default(), recorder.clone());
    sink.publish(Event::new("a", json!(1))).await.unwrap();
    assert_eq!(recorder.calls(), 3);
    recorder.assert_published(&[Event::new("a", json!(1))]);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_not_retried() {
    let recorder = RecordingSink::new();
    recorder.fail_next_permanently(1);
    let mut sink = stack(RetryPolicy::default(), recorder.clone());
    let err = sink.publish(Event::new("a", json!(1))).await.unwrap_err();
    assert!(!err.is_retryable());
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
    // The timed-out attempt, then the first step less its ±50 % jitter.
    assert!(started.elapsed() >= ATTEMPT_TIMEOUT + eventsink::backoff::DEFAULT_MIN / 2);
}

#[tokio::test(start_paused = true)]
async fn attempts_stop_at_the_maximum_and_return_the_last_error() {
    let recorder = RecordingSink::new();
    recorder.fail_next(usize::MAX);
    let mut sink = stack(
        RetryPolicy::new(Backoff::new().attempts(4)),
        recorder.clone(),
    );
    let err = sink.publish(Event::new("a", json!(1))).await.unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(recorder.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_first_retry_waits_the_first_step_spread_by_its_jitter() {
    let recorder = RecordingSink::new();
    recorder.fail_next(1);
    let min = Duration::from_millis(400);
    let backoff = Backoff::new().min(min).jitter(0.5);
    let mut sink = stack(RetryPolicy::new(backoff), recorder.clone());
    let started = Instant::now();
    sink.publish(Event::new("a", json!(1))).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= min / 2 && waited <= min * 3 / 2 + Duration::from_millis(5),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn without_jitter_the_retries_wait_the_doubling_steps() {
    let recorder = RecordingSink::new();
    recorder.fail_next(3);
    let backoff = Backoff::new().min(Duration::from_secs(1)).jitter(0.0);
    let mut sink = stack(RetryPolicy::new(backoff), recorder.clone());
    let started = Instant::now();
    sink.publish(Event::new("a", json!(1))).await.unwrap();
    let waited = started.elapsed();
    // 1 + 2 + 4 s.
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_millis(7005),
        "{waited:?}"
    );
    assert_eq!(recorder.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_up_to_twice_the_step_within_the_cap() {
    let default = RetryPolicy::default();
    // Steps of 20 s (jittered to 10–30 s) under a 30 s cap.
    let slow = RetryPolicy::new(
        Backoff::new()
            .min(Duration::from_secs(20))
            .max(Duration::from_secs(30)),
    );
    // The first step is 1 s, jittered to at most 1.5 s: the 2 s asked wins.
    for (policy, asked, expected) in [(&default, 2, 2), (&default, 600, 2), (&slow, 600, 30)] {
        let recorder = RecordingSink::new();
        recorder.fail_next_with_retry_after(1, Duration::from_secs(asked));
        let mut sink = stack(policy.clone(), recorder.clone());
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
    recorder.fail_next(1);
    let empty = Arc::new(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
    let mut sink = stack(RetryPolicy::default().budget(empty), recorder.clone());
    let err = sink.publish(Event::new("a", json!(1))).await.unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(recorder.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_stack_is_shared_by_concurrent_publishers() {
    let recorder = RecordingSink::new();
    recorder.fail_next(10);
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

/// `service` behind `.retry(RetryPolicy::default())`; the `where` clause is
/// the compile test: it holds for every sink of the crate.
fn retried<S, R>(service: S) -> tower::retry::Retry<RetryPolicy, S>
where
    S: Service<R> + Clone,
    RetryPolicy: Policy<R, S::Response, S::Error>,
{
    ServiceBuilder::new()
        .retry(RetryPolicy::default())
        .service(service)
}

#[tokio::test]
async fn the_retry_policy_fits_every_sink_of_the_crate() {
    let event = || Event::new("a", json!(1));
    retried::<_, Event>(NoopSink::new())
        .publish(event())
        .await
        .unwrap();
    let recorder = RecordingSink::new();
    retried(recorder.clone()).publish(event()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    retried::<_, Event>(FsSink::new(dir.path()).unwrap())
        .publish(event())
        .await
        .unwrap();
    retried(recorder.clone().boxed_sink())
        .publish(event())
        .await
        .unwrap();
    let buffered = ServiceBuilder::new()
        .buffer(4)
        .timeout(ATTEMPT_TIMEOUT)
        .service(recorder.clone());
    retried(buffered).publish(event()).await.unwrap();
    assert_eq!(recorder.events().len(), 3);
    #[cfg(feature = "webhook")]
    {
        let webhook = eventsink::WebhookSink::builder("https://example.com/hook")
            .build()
            .unwrap();
        // Built, not called: no receiver in this test.
        let _ = retried::<_, Event>(webhook);
    }
    #[cfg(feature = "queue")]
    {
        use tower::Layer;
        let queue = eventsink::queue::MemoryQueue::new("compose");
        let publisher = eventsink::ThroughTaskQueue::new(queue).layer(NoopSink::new());
        retried(publisher).publish(event()).await.unwrap();
    }
}

/// A user's own error: retryable when the other side was busy.
#[derive(Debug)]
enum MyError {
    Busy,
    Rejected,
}

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MyError::Busy => "busy",
            MyError::Rejected => "rejected",
        })
    }
}

impl Retryable for MyError {
    fn is_retryable(&self) -> bool {
        matches!(self, MyError::Busy)
    }
}

#[tokio::test(start_paused = true)]
async fn the_retry_policy_fits_a_users_own_service_and_error() {
    let calls = Arc::new(AtomicUsize::new(0));
    let busy_once_then_rejects = {
        let calls = Arc::clone(&calls);
        tower::service_fn(move |_: String| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match call {
                    0 => Err(MyError::Busy),
                    1 => Ok(()),
                    _ => Err(MyError::Rejected),
                }
            }
        })
    };
    let mut service = retried(busy_once_then_rejects);
    service.ready().await.unwrap();
    service.call("first".to_owned()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "Busy was retried");
    service.ready().await.unwrap();
    let err = service.call("second".to_owned()).await.unwrap_err();
    assert!(matches!(err, MyError::Rejected));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "Rejected was not retried");
}
