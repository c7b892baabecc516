//! FanOut against real receivers: every destination gets each event, the
//! error names exactly the destinations that failed, calls run
//! concurrently, readiness is honoured; and QueuedFanOut on SQLite files
//! (and Postgres): one job per destination, so a failing destination is
//! retried alone and a republished event is stored nowhere twice.
#![cfg(all(feature = "webhook", feature = "sqlite"))]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use eventsink::fanout::{FanOut, FanOutError, QueuedFanOut};
use eventsink::queue::{MemoryQueue, QueueBackend, QueuePublisher, SqliteQueue};
use eventsink::{BoxError, BoxSink, Event, RecordingSink, Retryable, SinkExt, WebhookSink};
use serde_json::{Value, json};
use support::conformance::{self, ARRIVAL_TIMEOUT, Destination};
use support::queue::fast_schedule;
use support::receiver::{Received, Receiver, Reply};
use tower::{Service, ServiceExt};

const WAIT: Duration = Duration::from_secs(30);

fn webhook(receiver: &Receiver) -> WebhookSink {
    WebhookSink::builder(receiver.url("/hook"))
        .build()
        .expect("webhook sink")
}

fn events(kind: &str, n: usize) -> Vec<Event> {
    (0..n).map(|i| Event::new(kind, json!({"n": i}))).collect()
}

fn sorted_ids(events: &[Event]) -> Vec<String> {
    let mut ids: Vec<_> = events.iter().map(|e| e.id.to_string()).collect();
    ids.sort();
    ids
}

/// How many requests each event id got.
fn per_id(requests: &[Received]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in requests {
        *counts.entry(request.header("webhook-id")).or_default() += 1;
    }
    counts
}

/// Each sent id exactly once.
fn once_each(sent: &[Event]) -> BTreeMap<String, usize> {
    sorted_ids(sent).into_iter().map(|id| (id, 1)).collect()
}

#[tokio::test]
async fn every_destination_gets_each_event_once() {
    let receivers = [
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    ];
    let mut fanout = FanOut::builder()
        .to("a", webhook(&receivers[0]))
        .to("b", webhook(&receivers[1]))
        .to("c", webhook(&receivers[2]))
        .build()
        .expect("fan-out");
    let sent = events("order.placed", 5);
    for event in &sent {
        let routed = fanout.publish(event.clone()).await.expect("publish");
        assert_eq!(routed.destinations(), 3);
    }
    for receiver in &receivers {
        assert_eq!(per_id(&receiver.wait_for(5, WAIT).await), once_each(&sent));
    }
}

#[tokio::test]
async fn the_error_names_exactly_the_destinations_that_failed() {
    let (a, b, c) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    a.script([Reply::status(503).header("retry-after", "7")]);
    c.script([Reply::status(410)]);
    let mut fanout = FanOut::builder()
        .to("a", webhook(&a))
        .to("b", webhook(&b))
        .to("c", webhook(&c))
        .build()
        .expect("fan-out");

    let err = fanout
        .publish(Event::new("order.placed", json!(1)))
        .await
        .expect_err("a and c fail");
    assert_eq!(err.failed().collect::<Vec<_>>(), ["a", "c"]);
    assert_eq!(err.succeeded().collect::<Vec<_>>(), ["b"]);
    assert!(!err.is_retryable(), "410 is permanent: {err}");
    let text = err.to_string();
    for part in [
        "2 of 3 destinations failed",
        "a: webhook",
        "c: webhook",
        "took it: b",
    ] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
    assert_eq!(b.wait_for(1, WAIT).await.len(), 1);

    // Only a transient failure now: retryable, with the receiver's wait,
    // also once boxed by a layer.
    a.script([Reply::status(503).header("retry-after", "7")]);
    let err = fanout
        .publish(Event::new("order.placed", json!(2)))
        .await
        .expect_err("a fails");
    assert_eq!(err.failed().collect::<Vec<_>>(), ["a"]);
    assert_eq!(err.succeeded().collect::<Vec<_>>(), ["b", "c"]);
    assert!(err.is_retryable(), "{err}");
    let boxed: BoxError = err.into();
    assert!(boxed.is_retryable());
    assert_eq!(boxed.retry_after(), Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn destinations_are_called_concurrently() {
    // "first" finishes only once "second" has run: a fan-out that awaited
    // one destination before calling, or polling, the next would never end.
    let (ran, second_ran) = tokio::sync::watch::channel(false);
    let ran = std::sync::Arc::new(ran);
    let first = tower::service_fn(move |_: Event| {
        let mut second_ran = second_ran.clone();
        async move {
            second_ran
                .wait_for(|&r| r)
                .await
                .map_err(|_| "sender gone")?;
            Ok::<_, BoxError>(())
        }
    });
    let second = tower::service_fn(move |_: Event| {
        let ran = std::sync::Arc::clone(&ran);
        async move {
            ran.send_replace(true);
            Ok::<_, BoxError>(())
        }
    });
    let mut fanout = FanOut::builder()
        .to("first", first.boxed_sink())
        .to("second", second.boxed_sink())
        .build()
        .expect("fan-out");
    let publish = fanout.publish(Event::new("ping", json!(null)));
    let routed = tokio::time::timeout(WAIT, publish)
        .await
        .expect("both destinations called together")
        .expect("publish");
    assert_eq!(routed.destinations(), 2);
}

#[tokio::test]
async fn a_destination_that_is_not_ready_holds_the_fan_out() {
    // "slow" takes one event at a time and holds it until the gate opens.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let (entered, mut inside) = tokio::sync::mpsc::unbounded_channel::<()>();
    let slow = tower::limit::ConcurrencyLimit::new(
        tower::service_fn(move |_: Event| {
            let (mut opened, entered) = (opened.clone(), entered.clone());
            async move {
                let _ = entered.send(());
                opened
                    .wait_for(|&open| open)
                    .await
                    .map_err(|_| "gate gone")?;
                Ok::<_, BoxError>(())
            }
        }),
        1,
    );
    let fast = RecordingSink::new();
    let fanout: FanOut<BoxSink> = FanOut::builder()
        .to("slow", slow.boxed_sink())
        .to("fast", fast.clone().boxed_sink())
        .build()
        .expect("fan-out");

    let mut first = fanout.clone();
    // `ready` + `call` rather than `publish` in a spawned task: rustc
    // cannot prove `Publish` over a `BoxSink` stack `Send` (the same holds
    // for tower's `Timeout`).
    let held =
        tokio::spawn(async move { first.ready().await?.call(Event::new("one", json!(1))).await });
    inside.recv().await.expect("slow got the first event");

    let mut second = fanout.clone();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        second.poll_ready(&mut cx).is_pending(),
        "slow has no room: the fan-out is not ready"
    );
    assert_eq!(fast.events().len(), 1, "nothing sent while not ready");

    gate.send_replace(true);
    held.await.expect("task").expect("first publish");
    second
        .ready()
        .await
        .expect("ready once slow has room")
        .call(Event::new("two", json!(2)))
        .await
        .expect("second publish");
    assert_eq!(fast.events().len(), 2);
}

/// A destination whose readiness fails, as a `Buffer` whose worker died.
#[derive(Clone)]
struct Closed;

impl Service<Event> for Closed {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Err("closed: this destination is gone".into()))
    }

    fn call(&mut self, _: Event) -> Self::Future {
        panic!("called although poll_ready failed")
    }
}

#[tokio::test]
async fn a_destination_whose_readiness_fails_fails_alone() {
    let receiver = Receiver::start().await;
    let mut fanout = FanOut::builder()
        .to("closed", Closed.boxed_sink())
        .to("hook", webhook(&receiver).boxed_sink())
        .build()
        .expect("fan-out");
    for n in 1..=2 {
        let err = fanout
            .publish(Event::new("order.placed", json!(n)))
            .await
            .expect_err("closed fails");
        assert_eq!(err.failed().collect::<Vec<_>>(), ["closed"]);
        assert_eq!(err.succeeded().collect::<Vec<_>>(), ["hook"]);
        assert!(
            err.to_string().contains("this destination is gone"),
            "{err}"
        );
        assert_eq!(receiver.wait_for(n, WAIT).await.len(), n);
    }
}

#[tokio::test]
async fn a_call_without_poll_ready_is_reported_not_sent() {
    let recorder = RecordingSink::new();
    let mut fanout = FanOut::builder()
        .to("rec", recorder.clone())
        .build()
        .expect("fan-out");
    let err = fanout
        .call(Event::new("ping", json!(null)))
        .await
        .expect_err("not polled ready");
    assert_eq!(err.failed().collect::<Vec<_>>(), ["rec"]);
    assert!(err.to_string().contains("poll_ready"), "{err}");
    assert!(recorder.events().is_empty());
}

/// A fan-out to two recorders: each must hold exactly what was published.
struct TwoRecorders<P>([RecordingSink<P>; 2]);

impl<P: Send + Sync + Clone + 'static> Destination<P> for TwoRecorders<P>
where
    Event<P>: PartialEq + std::fmt::Debug,
{
    type Sink = FanOut<RecordingSink<P>>;

    fn sink(&self) -> Self::Sink {
        FanOut::builder()
            .to("one", self.0[0].clone())
            .to("two", self.0[1].clone())
            .build()
            .expect("fan-out")
    }

    async fn arrived(&self, n: usize) -> Option<Vec<Event<P>>> {
        let mut got = Vec::new();
        for recorder in &self.0 {
            let mut events = recorder
                .wait_for(n, ARRIVAL_TIMEOUT)
                .await
                .expect("arrived");
            events.sort_by(|a, b| a.id.cmp(&b.id));
            got.push(events);
        }
        assert_eq!(got[0], got[1], "both destinations got the same events");
        got.pop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_passes_conformance() {
    conformance::run(
        || TwoRecorders([RecordingSink::new(), RecordingSink::new()]),
        || TwoRecorders([RecordingSink::new(), RecordingSink::new()]),
    )
    .await;
}

/// A queued fan-out (memory queues) to two recorders, workers running.
struct TwoQueues<P: support::queue::Payload> {
    fanout: QueuedFanOut<RecordingSink<P>, MemoryQueue<P>>,
    recorders: TwoRecorders<P>,
}

impl<P: support::queue::Payload + Clone> TwoQueues<P> {
    fn new() -> Self {
        let recorders = TwoRecorders([RecordingSink::new(), RecordingSink::new()]);
        let fanout = QueuedFanOut::builder()
            .to(MemoryQueue::new("conformance.one"), recorders.0[0].clone())
            .to(MemoryQueue::new("conformance.two"), recorders.0[1].clone())
            .spawn_with(|w| w.poll_interval(Duration::from_millis(10)))
            .expect("queued fan-out");
        TwoQueues { fanout, recorders }
    }
}

impl<P: support::queue::Payload + Clone> Destination<P> for TwoQueues<P>
where
    Event<P>: PartialEq + std::fmt::Debug,
{
    type Sink = FanOut<QueuePublisher<RecordingSink<P>, MemoryQueue<P>>>;

    fn sink(&self) -> Self::Sink {
        self.fanout.publisher()
    }

    async fn arrived(&self, n: usize) -> Option<Vec<Event<P>>> {
        self.recorders.arrived(n).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_fan_out_passes_conformance() {
    conformance::run(TwoQueues::new, TwoQueues::new).await;
}

// --- QueuedFanOut: one job per destination ---------------------------------

/// `good` always answers; `bad` answers 503 twice first. Three events
/// through one queue per destination: `good` gets each exactly once,
/// `bad` each once it succeeds, after retries of its own.
async fn a_failing_destination_is_retried_alone<B>(good_queue: B, bad_queue: B)
where
    B: QueueBackend<Value>,
{
    let (good, bad) = (Receiver::start().await, Receiver::start().await);
    bad.script([Reply::status(503), Reply::status(503)]);
    let fanout = QueuedFanOut::builder()
        .to(good_queue.clone(), webhook(&good))
        .to(bad_queue.clone(), webhook(&bad))
        .spawn_with(|w| {
            w.schedule(fast_schedule(5))
                .poll_interval(Duration::from_millis(10))
        })
        .expect("queued fan-out");
    let sent = events("order.placed", 3);
    let mut publisher = fanout.publisher();
    for event in &sent {
        let routed = publisher.publish(event.clone()).await.expect("stored");
        assert_eq!(routed.destinations(), 2);
    }
    bad.wait_for(5, WAIT).await;
    good.wait_for(3, WAIT).await;
    fanout.shutdown().await;

    assert_eq!(
        per_id(&good.requests()),
        once_each(&sent),
        "good: once each"
    );
    let bad_counts = per_id(&bad.requests());
    assert_eq!(
        bad_counts.keys().collect::<BTreeSet<_>>(),
        sorted_ids(&sent).iter().collect(),
        "bad: every event"
    );
    assert_eq!(bad_counts.values().sum::<usize>(), 5, "two retries in all");
    for queue in [&good_queue, &bad_queue] {
        let stats = queue.stats().await.expect("stats");
        assert_eq!(
            (stats.pending, stats.scheduled, stats.dead),
            (0, 0, 0),
            "{}: nothing left",
            QueueBackend::name(queue)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_failing_destination_is_retried_alone() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("events.db");
    let good = SqliteQueue::open(&path, "orders.good").await.expect("open");
    let bad = SqliteQueue::open(&path, "orders.bad").await.expect("open");
    a_failing_destination_is_retried_alone(good, bad).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "needs EVENTSINK_POSTGRES_URL (a Postgres server)"
)]
async fn postgres_a_failing_destination_is_retried_alone() {
    use eventsink::queue::PostgresQueue;
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let names = [
        support::queue::unique_name("fanout-good"),
        support::queue::unique_name("fanout-bad"),
    ];
    let good = PostgresQueue::connect(&url, &names[0])
        .await
        .expect("connect");
    let bad = PostgresQueue::connect(&url, &names[1])
        .await
        .expect("connect");
    a_failing_destination_is_retried_alone(good, bad).await;
    support::queue::delete_postgres_rows(&url, &names).await;
}

/// Holds SQLite's write lock on the file at `path` until dropped.
async fn lock_for_writes(path: &std::path::Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .expect("take the write lock");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_event_is_stored_nowhere_twice() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let open = |file: &str, name: &str| {
        SqliteQueue::builder(name)
            .busy_timeout(Duration::from_millis(200))
            .open(tmp.path().join(file))
    };
    let billing_queue = open("billing.db", "orders.billing").await.expect("open");
    let crm_queue = open("crm.db", "orders.crm").await.expect("open");
    let (billing, crm) = (Receiver::start().await, Receiver::start().await);
    let fanout = QueuedFanOut::builder()
        .to(billing_queue.clone(), webhook(&billing))
        .to(crm_queue.clone(), webhook(&crm))
        .spawn_with(|w| w.poll_interval(Duration::from_millis(10)))
        .expect("queued fan-out");
    let mut publisher = fanout.publisher();
    let event = Event::with_id("order.placed", "order-7", json!({"order_id": 7}));

    // The CRM's file is locked: only billing stores the event.
    let lock = lock_for_writes(&tmp.path().join("crm.db")).await;
    let err = publisher
        .publish(event.clone())
        .await
        .expect_err("crm's queue is locked");
    assert!(matches!(err, FanOutError::Failed { .. }));
    assert_eq!(err.failed().collect::<Vec<_>>(), ["orders.crm"]);
    assert_eq!(err.succeeded().collect::<Vec<_>>(), ["orders.billing"]);
    assert!(err.is_retryable(), "a locked database is transient: {err}");
    drop(lock);

    // The caller retries the same event: billing already holds it.
    publisher.publish(event.clone()).await.expect("republished");
    crm.wait_for(1, WAIT).await;
    billing.wait_for(1, WAIT).await;
    fanout.shutdown().await;

    let once = once_each(std::slice::from_ref(&event));
    assert_eq!(per_id(&billing.requests()), once, "billing: once");
    assert_eq!(per_id(&crm.requests()), once, "crm: once");
    for queue in [&billing_queue, &crm_queue] {
        let stats = queue.stats().await.expect("stats");
        assert_eq!((stats.pending, stats.scheduled), (0, 0), "no second job");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_subscribed_queues_get_a_job() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("events.db");
    let billing_queue = SqliteQueue::open(&path, "app.billing").await.expect("open");
    let crm_queue = SqliteQueue::open(&path, "app.crm").await.expect("open");
    let (billing, crm) = (Receiver::start().await, Receiver::start().await);
    let fanout = QueuedFanOut::builder()
        .to_kinds(billing_queue.clone(), ["invoice.*"], webhook(&billing))
        .to_kinds(crm_queue.clone(), ["customer.created"], webhook(&crm))
        .reject_unmatched()
        .spawn_with(|w| w.poll_interval(Duration::from_millis(10)))
        .expect("queued fan-out");
    let mut publisher = fanout.publisher();
    let invoice = Event::new("invoice.paid", json!({"invoice": 1}));
    publisher.publish(invoice.clone()).await.expect("stored");
    let err = publisher
        .publish(Event::new("user.deleted", json!({})))
        .await
        .expect_err("nobody takes user.deleted");
    assert!(matches!(err, FanOutError::Unrouted { .. }), "{err}");
    billing.wait_for(1, WAIT).await;
    fanout.shutdown().await;

    assert_eq!(per_id(&billing.requests()), once_each(&[invoice]));
    assert!(crm.requests().is_empty(), "crm does not take invoices");
    let stats = crm_queue.stats().await.expect("stats");
    assert_eq!(
        (stats.pending, stats.scheduled, stats.running),
        (0, 0, 0),
        "crm's queue never got a job"
    );
}

#[tokio::test]
async fn queued_unmatched_events_go_to_their_own_queue() {
    let (billing, rest) = (RecordingSink::new(), RecordingSink::new());
    let fanout = QueuedFanOut::builder()
        .unmatched_to(MemoryQueue::new("app.rest"), rest.clone())
        .to_kinds(
            MemoryQueue::new("app.billing"),
            ["invoice.*"],
            billing.clone(),
        )
        .spawn_with(|w| w.poll_interval(Duration::from_millis(10)))
        .expect("queued fan-out");
    let names: Vec<_> = fanout.workers().map(|(name, _)| name).collect();
    assert_eq!(names, ["app.billing", "app.rest"]);
    let mut publisher = fanout.publisher();
    for kind in ["invoice.paid", "user.signed_up"] {
        let routed = publisher
            .publish(Event::new(kind, json!({})))
            .await
            .expect("stored");
        assert_eq!(routed.destinations(), 1);
    }
    let billed = billing.wait_for(1, WAIT).await.expect("billing");
    let others = rest.wait_for(1, WAIT).await.expect("rest");
    fanout.shutdown().await;
    assert_eq!(&*billed[0].kind, "invoice.paid");
    assert_eq!(&*others[0].kind, "user.signed_up");
    assert_eq!((billing.events().len(), rest.events().len()), (1, 1));
}
