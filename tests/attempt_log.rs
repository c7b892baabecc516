//! The attempt hook (`QueueWorker::on_attempt`): every delivery attempt of
//! a real SQLite queue to a real loopback receiver is reported once, with
//! its number, outcome, HTTP status, error and duration.
#![cfg(all(feature = "webhook", feature = "sqlite"))]
mod support;

use std::time::Duration;

use chrono::Utc;
use eventsink::queue::{
    Attempt, AttemptOutcome, DeathCause, QueueBackend, SqliteQueue, ThroughTaskQueue,
};
use eventsink::signature::Secret;
use eventsink::webhook::WebhookSink;
use eventsink::{Event, SinkExt};
use serde_json::json;
use support::conformance::ARRIVAL_TIMEOUT;
use support::queue::{fast_schedule, unique_name};
use support::receiver::{Receiver, Reply};
use tokio::sync::mpsc;
use tower::Layer;

/// An attempt as the hook saw it, owned.
#[derive(Debug, Clone, PartialEq)]
struct Logged {
    event_id: String,
    kind: String,
    queue: String,
    chain: String,
    attempt: u32,
    outcome: AttemptOutcome,
    status: Option<u16>,
    error: Option<String>,
    duration: Duration,
}

impl From<&Attempt<'_>> for Logged {
    fn from(a: &Attempt<'_>) -> Self {
        Logged {
            event_id: a.event_id.to_owned(),
            kind: a.kind.to_owned(),
            queue: a.queue.to_owned(),
            chain: a.chain.to_owned(),
            attempt: a.attempt,
            outcome: a.outcome,
            status: a.status,
            error: a.error.map(str::to_owned),
            duration: a.duration,
        }
    }
}

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// A SQLite queue delivering to `receiver` through a webhook whose URL
/// carries a token in its query; the hook's attempts arrive on the channel.
async fn run(
    receiver: &Receiver,
    dir: &std::path::Path,
) -> (
    String,
    eventsink::queue::QueuePublisher<WebhookSink, SqliteQueue>,
    eventsink::queue::WorkerHandle,
    mpsc::UnboundedReceiver<Logged>,
) {
    let name = unique_name("attempt-log");
    let backend = SqliteQueue::open(dir.join("q.db"), &name).await.unwrap();
    let webhook = WebhookSink::builder(receiver.url("/hook?token=query-secret"))
        .secret(SECRET.parse::<Secret>().unwrap())
        .build()
        .unwrap();
    let queue = ThroughTaskQueue::new(backend);
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = queue
        .worker(webhook.clone())
        .schedule(fast_schedule(5))
        .poll_interval(Duration::from_millis(10))
        .on_attempt(move |a: &Attempt<'_>| {
            let _ = tx.send(Logged::from(a));
        })
        .spawn();
    (name, queue.layer(webhook), worker, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Logged>) -> Logged {
    tokio::time::timeout(ARRIVAL_TIMEOUT, rx.recv())
        .await
        .expect("an attempt within the timeout")
        .expect("the worker is running")
}

#[tokio::test]
async fn two_503s_then_200_log_three_attempts() {
    let receiver = Receiver::start().await;
    receiver.script([
        Reply::status(503).body("busy, try later"),
        Reply::status(503),
        Reply::status(200),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let (queue, mut sink, worker, mut rx) = run(&receiver, dir.path()).await;
    let published_at = Utc::now();
    sink.publish(Event::with_id(
        "order.placed",
        "evt_log",
        json!({"card": "4111-1111"}),
    ))
    .await
    .unwrap();
    let log = [
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
    ];
    worker.shutdown().await;
    assert!(rx.try_recv().is_err(), "one report per attempt");
    assert_eq!(receiver.requests().len(), 3);

    for (n, entry) in log.iter().enumerate() {
        assert_eq!(entry.attempt, n as u32 + 1);
        assert_eq!(
            (&*entry.event_id, &*entry.kind, &*entry.queue),
            ("evt_log", "order.placed", &*queue)
        );
        assert_eq!(entry.chain, log[0].chain, "one delivery chain");
        assert!(entry.duration > Duration::ZERO && entry.duration < ARRIVAL_TIMEOUT);
    }
    for entry in &log[..2] {
        let AttemptOutcome::Retrying { next_due } = entry.outcome else {
            panic!("{entry:?}");
        };
        assert!(next_due >= published_at, "{next_due} before {published_at}");
        assert_eq!(entry.status, Some(503));
        let error = entry.error.as_deref().expect("an error");
        assert!(error.contains("503"), "{error}");
        for secret in ["query-secret", SECRET, "4111"] {
            assert!(!error.contains(secret), "{secret} in {error}");
        }
    }
    assert!(log[0].error.as_deref().unwrap().contains("busy, try later"));
    assert_eq!(log[2].outcome, AttemptOutcome::Delivered);
    assert_eq!((log[2].status, log[2].error.as_deref()), (None, None));
}

#[tokio::test]
async fn a_410_logs_one_dead_attempt() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(410)]);
    let dir = tempfile::tempdir().unwrap();
    let (_, mut sink, worker, mut rx) = run(&receiver, dir.path()).await;
    sink.publish(Event::with_id("order.placed", "evt_gone", json!(1)))
        .await
        .unwrap();
    let entry = next(&mut rx).await;
    worker.shutdown().await;
    assert_eq!(
        entry.outcome,
        AttemptOutcome::Dead {
            cause: DeathCause::Permanent
        }
    );
    assert_eq!((entry.attempt, entry.status), (1, Some(410)));
    assert!(rx.try_recv().is_err(), "no second attempt");
}

#[tokio::test]
async fn a_hook_that_panics_does_not_stop_delivery() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("attempt-panic");
    let backend = SqliteQueue::open(dir.path().join("q.db"), &name)
        .await
        .unwrap();
    let queue = ThroughTaskQueue::new(backend.clone());
    let webhook = WebhookSink::builder(receiver.url("/hook")).build().unwrap();
    let worker = queue
        .worker(webhook.clone())
        .poll_interval(Duration::from_millis(10))
        .on_attempt(|_: &Attempt<'_>| panic!("the hook failed"))
        .spawn();
    let mut sink = queue.layer(webhook);
    for id in ["p1", "p2"] {
        sink.publish(Event::with_id("k", id, json!(1)))
            .await
            .unwrap();
    }
    receiver.wait_for(2, ARRIVAL_TIMEOUT).await;
    worker.shutdown().await;
    // Each job's outcome was recorded: none is left for apalis to run again.
    let stats = backend.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.scheduled, stats.running, stats.dead),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(receiver.requests().len(), 2, "no second delivery");
}
