//! The replay guard's claims belong to the delivery that made them: a
//! handler slower than the in-flight TTL that then fails must not clear a
//! later delivery's claim, so a third delivery is answered 409 while the
//! second runs. Run against the in-memory guard and against the real Redis
//! at `EVENTSINK_REDIS_URL`.
#![cfg(feature = "verify")]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use eventsink::signature::Secret;
use eventsink::verify::{
    self, Clock, MemoryReplayGuard, ReplayGuard, VerifyConfig, VerifyWebhookLayer,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, oneshot};
use tower::{Layer, Service, ServiceExt};

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const BODY: &[u8] =
    br#"{"kind":"order.placed","id":"evt_slow","created_at":"2026-11-27T12:00:00Z","payload":{}}"#;
/// The shortest in-flight TTL the layer allows.
const IN_FLIGHT_TTL: Duration = Duration::from_secs(1);
/// How long a test waits for something that should happen soon, before it
/// fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

/// A handler call waiting for the test to say which status it answers.
type Gate = oneshot::Sender<StatusCode>;

/// A handler that announces each call and answers when the test says so.
fn gated_handler(
    started: mpsc::UnboundedSender<Gate>,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_request: Request<Full<Bytes>>| {
        let started = started.clone();
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let (gate, status) = oneshot::channel();
            started.send(gate).unwrap();
            let status = status.await.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    })
}

fn delivery(id: &str) -> Request<Full<Bytes>> {
    let secret: Secret = SECRET.parse().unwrap();
    let headers = verify::sign(&[secret], id, Utc::now().timestamp(), BODY).unwrap();
    let mut request = Request::post("/hook")
        .body(Full::new(Bytes::from_static(BODY)))
        .unwrap();
    *request.headers_mut() = headers;
    request
}

async fn next_start(starts: &mut mpsc::UnboundedReceiver<Gate>) -> Gate {
    tokio::time::timeout(PATIENCE, starts.recv())
        .await
        .expect("the handler should start")
        .unwrap()
}

/// The scenario: A claims and runs past the in-flight TTL; B claims; A
/// fails and releases; C must get 409 while B runs; B succeeds; D gets
/// "already handled". `expire` makes A's claim run out.
async fn slow_failure_keeps_the_later_claim<G, E>(guard: G, id: &str, expire: E)
where
    G: ReplayGuard,
    E: FnOnce() -> Pin<Box<dyn Future<Output = ()>>>,
{
    let (started, mut starts) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = VerifyWebhookLayer::new(
        VerifyConfig::new(SECRET.parse().unwrap())
            .replay_guard(guard)
            .in_flight_ttl(IN_FLIGHT_TTL),
    );
    let service = layer.layer(gated_handler(started, Arc::clone(&calls)));
    let a = tokio::spawn(service.clone().oneshot(delivery(id)));
    let gate_a = next_start(&mut starts).await;
    expire().await;
    let b = tokio::spawn(service.clone().oneshot(delivery(id)));
    let gate_b = next_start(&mut starts).await;

    gate_a.send(StatusCode::INTERNAL_SERVER_ERROR).unwrap();
    let a = a.await.unwrap().unwrap();
    assert_eq!(a.status(), StatusCode::INTERNAL_SERVER_ERROR);

    // B is still running: a third delivery must not reach the handler.
    let c = service.clone().oneshot(delivery(id));
    tokio::select! {
        response = c => {
            let status = response.unwrap().status();
            assert_eq!(
                status,
                StatusCode::CONFLICT,
                "a third delivery while the second runs must be answered 409"
            );
        }
        gate_c = starts.recv() => {
            drop(gate_c);
            panic!(
                "the first delivery's release cleared the second's claim: a third delivery \
                 ran the handler while the second was still running"
            );
        }
    }

    gate_b.send(StatusCode::OK).unwrap();
    let b = b.await.unwrap().unwrap();
    assert_eq!(b.status(), StatusCode::OK);
    let d = service.clone().oneshot(delivery(id)).await.unwrap();
    assert_eq!(d.status(), StatusCode::OK);
    let text = d.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"already handled");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn memory_guard_a_slow_failed_handler_does_not_release_a_later_claim() {
    let now_ms = Arc::new(AtomicI64::new(1_800_000_000_000));
    let clock = Clock::from_fn({
        let now_ms = Arc::clone(&now_ms);
        move || {
            Utc.timestamp_millis_opt(now_ms.load(Ordering::SeqCst))
                .unwrap()
        }
    });
    let guard = MemoryReplayGuard::new().clock(clock);
    slow_failure_keeps_the_later_claim(guard, "evt_slow", move || {
        Box::pin(async move {
            // Past the in-flight TTL by the guard's clock.
            now_ms.fetch_add(2 * IN_FLIGHT_TTL.as_millis() as i64, Ordering::SeqCst);
        })
    })
    .await;
}

#[cfg(feature = "redis-replay")]
#[tokio::test]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_guard_a_slow_failed_handler_does_not_release_a_later_claim() {
    use eventsink::verify::RedisReplayGuard;

    let url = std::env::var("EVENTSINK_REDIS_URL")
        .expect("EVENTSINK_REDIS_URL was set when this test was built; set it again");
    let prefix = format!("eventsink-test:replay:{:016x}:", fastrand::u64(..));
    let guard = RedisReplayGuard::connect(&url, prefix.clone())
        .await
        .unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = redis::aio::ConnectionManager::new(client).await.unwrap();
    let key = format!("{prefix}evt_slow");
    let mut watcher = connection.clone();
    let watched = key.clone();
    slow_failure_keeps_the_later_claim(guard, "evt_slow", move || {
        Box::pin(async move {
            // Redis expires the in-flight key itself; wait until it has.
            tokio::time::timeout(PATIENCE, async {
                loop {
                    let exists: bool = redis::cmd("EXISTS")
                        .arg(&watched)
                        .query_async(&mut watcher)
                        .await
                        .unwrap();
                    if !exists {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the in-flight key should expire after its TTL");
        })
    })
    .await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// The default dedup window covers the longest the queue's default schedule
/// can keep retrying one event, so a retry after a lost `2xx` is answered
/// "already handled" instead of running the handler again.
#[cfg(feature = "queue")]
#[test]
fn the_default_replay_window_covers_the_default_retry_schedule() {
    use eventsink::queue::{DEFAULT_ATTEMPT_TIMEOUT, RetrySchedule};

    let schedule = RetrySchedule::standard();
    // Every wait of a chain, as long as the jitter or a receiver's
    // Retry-After can make it (the most either can ask, sampled) ...
    let mut waits = Duration::ZERO;
    for attempt in 1..schedule.max_attempts() {
        let longest = (0..200)
            .map(|_| schedule.delay_after(attempt, Some(Duration::MAX)).unwrap())
            .max()
            .unwrap();
        waits += longest;
    }
    assert!(waits <= schedule.longest_span(), "{waits:?}");
    // ... plus the attempts themselves.
    let longest = schedule.longest_span() + DEFAULT_ATTEMPT_TIMEOUT * schedule.max_attempts();
    assert!(
        verify::DEFAULT_REPLAY_TTL >= longest,
        "DEFAULT_REPLAY_TTL is {:?}, but the default schedule can retry for {longest:?}",
        verify::DEFAULT_REPLAY_TTL
    );
    // Not absurdly longer either: within two hours of the span.
    assert!(
        verify::DEFAULT_REPLAY_TTL <= longest + Duration::from_secs(2 * 3600),
        "{longest:?}"
    );
}
