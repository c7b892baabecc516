//! The queue tests every backend runs: the same bodies, a fresh queue (a
//! unique name) per test, the real backend.
#![cfg(feature = "queue")]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use eventsink::queue::{
    DeathCause, Published, QueueBackend, QueuePublisher, RetrySchedule, ThroughTaskQueue,
    WorkerHandle,
};
use eventsink::{Event, RecordingSink, Retryable, SinkExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tower::Layer;

use super::OrderPlaced;
use super::conformance::{self, ARRIVAL_TIMEOUT, Destination};

/// What a queue test needs of its payload type.
pub trait Payload: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<P: Serialize + DeserializeOwned + Send + Sync + 'static> Payload for P {}

/// Makes fresh, isolated queues of one backend.
pub trait Backends: Send + Sync + 'static {
    /// The backend type for payload `P`.
    type B<P: Payload>: QueueBackend<P>;

    /// A new queue with a unique name.
    fn make<P: Payload>(&self) -> impl Future<Output = Self::B<P>> + Send;

    /// Whether the backend keeps completed jobs (all but memory).
    const KEEPS_COMPLETED: bool = true;

    /// Deletes what the test's queues left in a shared backend.
    fn cleanup(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The value of a backend's URL variable. Only called by tests that
/// `build.rs` enabled because the variable was set when they were built
/// (without it they are ignored), so a missing variable now is a mistake
/// worth a clear failure, never a silent `ok`.
pub fn backend_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} was set when this test was built but is not set now: set it again \
             (.ci/run sets it to the local service), or rebuild without it to ignore the test"
        ),
    }
}

/// A unique queue name for one test.
pub fn unique_name(test: &str) -> String {
    format!("t-{test}-{}", uuid::Uuid::now_v7().simple())
}

/// Retries after 1 ms: schedules of milliseconds in tests. The durable
/// backends store due times in whole seconds, so there they are "due now".
pub fn fast_schedule(attempts: u32) -> RetrySchedule {
    RetrySchedule::fixed((1..attempts).map(|_| Duration::from_millis(1)))
}

type Sink<B, P> = QueuePublisher<RecordingSink<P>, B>;

fn publisher<B: QueueBackend<P> + Clone, P: Payload>(
    backend: &B,
    recorder: &RecordingSink<P>,
) -> Sink<B, P> {
    ThroughTaskQueue::new(backend.clone()).layer(recorder.clone())
}

fn spawn_worker<B: QueueBackend<P>, P: Payload>(
    sink: &Sink<B, P>,
    schedule: RetrySchedule,
) -> WorkerHandle {
    sink.worker()
        .schedule(schedule)
        .poll_interval(Duration::from_millis(10))
        .spawn()
}

fn ids<P>(events: &[Event<P>]) -> Vec<String> {
    let mut ids: Vec<_> = events.iter().map(|e| e.id.to_string()).collect();
    ids.sort();
    ids
}

/// Publish → worker → each event delivered exactly once.
pub async fn delivers_each_event_exactly_once(backends: &impl Backends) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    let mut sink = publisher(&backend, &recorder);
    let sent: Vec<_> = (0..50)
        .map(|n| Event::new("test.once", json!({ "n": n })))
        .collect();
    for event in &sent {
        sink.publish(event.clone()).await.expect("publish");
    }
    let worker = spawn_worker(&sink, fast_schedule(3));
    recorder
        .wait_for(sent.len(), ARRIVAL_TIMEOUT)
        .await
        .expect("all delivered");
    worker.shutdown().await;
    let got = recorder.events();
    assert_eq!(ids(&got), ids(&sent), "each event exactly once");
    assert_eq!(recorder.calls(), sent.len(), "no extra calls");
    for event in &sent {
        let arrived = got.iter().find(|e| e.id == event.id).unwrap();
        assert_eq!(arrived, event, "event changed on the way");
    }
}

/// Transient failures are retried on the schedule, then delivered.
pub async fn transient_failures_are_retried_then_delivered(backends: &impl Backends) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    recorder.fail_next(2);
    let mut sink = publisher(&backend, &recorder);
    let worker = spawn_worker(&sink, fast_schedule(5));
    let event = Event::new("test.retry", json!({"x": 1}));
    sink.publish(event.clone()).await.expect("publish");
    let got = recorder
        .wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("delivered");
    worker.shutdown().await;
    assert_eq!(got, vec![event]);
    assert_eq!(recorder.calls(), 3, "two failures, then the delivery");
    let dead = backend_dead(&backend).await;
    assert_eq!(dead, 0, "nothing dead");
}

async fn backend_dead<B: QueueBackend<P>, P: Payload>(backend: &B) -> u64 {
    eventsink::queue::DeadLetters::<B, P>::new(backend.clone())
        .count()
        .await
        .expect("count dead letters")
}

/// A permanent failure goes straight to the dead letters; replay delivers.
pub async fn permanent_failure_is_a_dead_letter_at_once(backends: &impl Backends) {
    let backend = backends.make::<Value>().await;
    let dead = eventsink::queue::DeadLetters::<_, Value>::new(backend.clone());
    let recorder = RecordingSink::new();
    recorder.fail_next_permanently(1);
    let mut sink = publisher(&backend, &recorder);
    let worker = spawn_worker(&sink, fast_schedule(5));
    let event = Event::new("test.permanent", json!({"x": 2}));
    sink.publish(event.clone()).await.expect("publish");
    dead.wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("a dead letter");
    let letter = dead
        .get(&dead.key_of(&event))
        .await
        .expect("get")
        .expect("the letter");
    assert_eq!(letter.event, event);
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.cause, DeathCause::Permanent);
    assert!(
        letter.last_error.contains("permanent"),
        "{}",
        letter.last_error
    );
    assert_eq!(recorder.calls(), 1, "a permanent failure is not retried");
    assert!(recorder.events().is_empty());

    assert!(dead.replay(&letter.key).await.expect("replay"));
    let got = recorder
        .wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("replayed");
    worker.shutdown().await;
    assert_eq!(got, vec![event]);
    assert_eq!(dead.count().await.expect("count"), 0, "replay removes it");
}

/// Out of attempts → dead letter; list pages, show, replay all, purge.
pub async fn dead_letters_list_show_replay_and_purge(backends: &impl Backends) {
    let backend = backends.make::<Value>().await;
    let dead = eventsink::queue::DeadLetters::<_, Value>::new(backend.clone());
    let recorder = RecordingSink::new();
    // 3 events × 2 attempts each.
    recorder.fail_next(6);
    let mut sink = publisher(&backend, &recorder);
    let worker = spawn_worker(&sink, fast_schedule(2));
    let sent: Vec<_> = (0..3)
        .map(|n| Event::new("test.dead", json!({ "n": n })))
        .collect();
    for event in &sent {
        sink.publish(event.clone()).await.expect("publish");
    }
    dead.wait_for(3, ARRIVAL_TIMEOUT)
        .await
        .expect("three dead letters");
    assert_eq!(recorder.calls(), 6, "two attempts each");

    let first = dead.list(0, 2).await.expect("page 1");
    let second = dead.list(2, 2).await.expect("page 2");
    assert_eq!((first.len(), second.len()), (2, 1));
    let listed: Vec<_> = first
        .iter()
        .chain(&second)
        .map(|d| d.event.clone())
        .collect();
    assert_eq!(
        ids(&listed),
        ids(&sent),
        "pages cover every dead letter once"
    );
    for letter in first.iter().chain(&second) {
        assert_eq!(letter.attempts, 2);
        assert_eq!(letter.cause, DeathCause::OutOfAttempts);
    }
    let shown = dead
        .get(&dead.key_of(&sent[1]))
        .await
        .expect("get")
        .expect("shown");
    assert_eq!(shown.event, sent[1]);
    assert!(dead.get("no-such-id").await.expect("get").is_none());

    assert_eq!(dead.replay_all().await.expect("replay all"), 3);
    let got = recorder
        .wait_for(3, ARRIVAL_TIMEOUT)
        .await
        .expect("replayed");
    assert_eq!(ids(&got), ids(&sent));

    // Purge: bury one more, then purge it.
    recorder.fail_next_permanently(1);
    sink.publish(Event::new("test.dead", json!("last")))
        .await
        .expect("publish");
    dead.wait_for(1, ARRIVAL_TIMEOUT).await.expect("dead");
    worker.shutdown().await;
    assert_eq!(dead.purge().await.expect("purge"), 1);
    assert_eq!(dead.count().await.expect("count"), 0);
}

/// Publishing an event again while it is queued delivers it once.
pub async fn duplicate_publish_is_delivered_once<B: Backends>(backends: &B) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    let mut sink = publisher(&backend, &recorder);
    let twice = Event::new("test.dup", json!({"dup": true}));
    sink.publish(twice.clone()).await.expect("publish");
    sink.publish(twice.clone()).await.expect("publish again");
    // Concurrent duplicates land in one group-commit batch.
    let mut concurrent = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (mut sink, twice) = (sink.clone(), twice.clone());
        concurrent.spawn(async move { sink.publish(twice).await });
    }
    while let Some(done) = concurrent.join_next().await {
        done.expect("task").expect("duplicate publish is Ok");
    }
    let others: Vec<_> = (0..10)
        .map(|n| Event::new("test.dup", json!({ "n": n })))
        .collect();
    for event in &others {
        sink.publish(event.clone()).await.expect("publish");
    }
    let worker = spawn_worker(&sink, fast_schedule(3));
    recorder
        .wait_for(11, ARRIVAL_TIMEOUT)
        .await
        .expect("delivered");
    if B::KEEPS_COMPLETED {
        // The completed job keeps its key until retention removes it.
        sink.publish(twice.clone())
            .await
            .expect("publish after delivery");
    }
    // A marker published after everything else: once it is in, any second
    // copy would have been fetched too.
    let marker = Event::new("test.dup.marker", json!(null));
    sink.publish(marker).await.expect("publish marker");
    recorder
        .wait_for(12, ARRIVAL_TIMEOUT)
        .await
        .expect("marker");
    worker.shutdown().await;
    let got = recorder.events();
    let copies = got.iter().filter(|e| e.id == twice.id).count();
    assert_eq!(copies, 1, "the duplicate was delivered {copies} times");
    assert_eq!(got.len(), 12);
}

/// A publish answers `Stored`, the same event again `AlreadyQueued`; once
/// delivered, a durable backend still holds its key (until retention), the
/// memory backend no longer does.
pub async fn publish_twice_is_stored_then_already_queued<B: Backends>(backends: &B) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    let mut sink = publisher(&backend, &recorder);
    let event = Event::new("test.twice", json!({"n": 1}));
    let first = sink.publish(event.clone()).await.expect("publish");
    assert_eq!(first, Published::Stored);
    let second = sink.publish(event.clone()).await.expect("publish again");
    assert_eq!(second, Published::AlreadyQueued);
    let worker = spawn_worker(&sink, fast_schedule(3));
    recorder
        .wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("delivered");
    let after = sink.publish(event).await.expect("publish after delivery");
    let expected = if B::KEEPS_COMPLETED {
        Published::AlreadyQueued
    } else {
        Published::Stored
    };
    assert_eq!(after, expected, "a publish after the delivery");
    worker.shutdown().await;
}

/// 8 concurrent publishers, several with the same event, one with an event
/// stored before: whatever batches the group commit makes of them, each
/// new event is `Stored` for exactly one of its publishers and
/// `AlreadyQueued` for the others, and each is delivered once.
pub async fn concurrent_duplicates_each_get_their_own_answer<B: Backends>(backends: &B) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    let sink = publisher(&backend, &recorder);
    let [a, b, c, d, e] =
        ["a", "b", "c", "d", "e"].map(|n| Event::new("test.mixed", json!({ "n": n })));
    let stored = sink.clone().publish(a.clone()).await.expect("publish a");
    assert_eq!(stored, Published::Stored);
    let events = [&a, &b, &b, &c, &c, &c, &d, &e].map(|event| event.clone());
    // Built and polled together, so that they meet in the group commit.
    let publishes = events.iter().map(|event| {
        let mut sink = sink.clone();
        let event = event.clone();
        async move { sink.publish(event).await }
    });
    let answers = futures::future::join_all(publishes).await;
    let mut stored_per_id = std::collections::HashMap::<String, usize>::new();
    for (event, answer) in events.iter().zip(answers) {
        let answer = answer.expect("every publish succeeds, the duplicates too");
        let count = stored_per_id.entry(event.id.to_string()).or_default();
        *count += usize::from(answer == Published::Stored);
    }
    assert_eq!(stored_per_id[&a.id.to_string()], 0, "a was stored before");
    for (name, event) in [("b", &b), ("c", &c), ("d", &d), ("e", &e)] {
        assert_eq!(
            stored_per_id[&event.id.to_string()],
            1,
            "{name}: exactly one of its publishers stores it"
        );
    }
    let worker = spawn_worker(&sink, fast_schedule(3));
    recorder
        .wait_for(5, ARRIVAL_TIMEOUT)
        .await
        .expect("delivered");
    // A marker published after everything else: once it is in, any second
    // copy would have been fetched too.
    let mut marker_sink = sink.clone();
    marker_sink
        .publish(Event::new("test.mixed.marker", json!(null)))
        .await
        .expect("publish marker");
    recorder.wait_for(6, ARRIVAL_TIMEOUT).await.expect("marker");
    worker.shutdown().await;
    assert_eq!(recorder.events().len(), 6, "each event delivered once");
}

/// Counts completed deliveries, for waiting without
/// `RecordingSink::wait_for` (which can deadlock against a concurrent
/// `call`: it holds its watch guard while taking the state lock).
#[derive(Clone)]
pub struct Delivered(std::sync::Arc<tokio::sync::watch::Sender<usize>>);

impl Delivered {
    pub fn new() -> Self {
        Delivered(std::sync::Arc::new(tokio::sync::watch::channel(0).0))
    }

    pub fn add(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    /// Waits until at least `n` deliveries completed.
    pub async fn wait(&self, n: usize) {
        let mut rx = self.0.subscribe();
        let reached = tokio::time::timeout(ARRIVAL_TIMEOUT, async {
            rx.wait_for(|&c| c >= n).await.map(|_| ())
        })
        .await;
        let count = *self.0.borrow();
        assert!(
            matches!(reached, Ok(Ok(()))),
            "waited for {n} deliveries, {count} arrived"
        );
    }
}

/// Stopping the worker mid-load loses nothing: a new worker delivers the
/// rest. The sink is slow (5 ms), so the stop meets deliveries in flight
/// and jobs fetched but not started.
pub async fn shutdown_mid_load_loses_nothing(backends: &impl Backends) {
    use tower::Service;
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    let delivered = Delivered::new();
    let slow = {
        let (recorder, delivered) = (recorder.clone(), delivered.clone());
        tower::service_fn(move |event: Event| {
            let (mut recorder, delivered) = (recorder.clone(), delivered.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                recorder.call(event).await?;
                delivered.add();
                Ok::<(), eventsink::Error>(())
            }
        })
    };
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(slow);
    let sent: Vec<_> = (0..300)
        .map(|n| Event::new("test.shutdown", json!({ "n": n })))
        .collect();
    for event in &sent {
        sink.publish(event.clone()).await.expect("publish");
    }
    // A stop waits at most the attempt timeout plus 5 s for apalis to wind
    // down; keep that short here.
    let start = || {
        sink.worker()
            .schedule(fast_schedule(3))
            .attempt_timeout(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(10))
            .spawn()
    };
    let worker = start();
    delivered.wait(20).await;
    worker.shutdown().await;
    let after_stop = recorder.events().len();
    assert!(after_stop < sent.len(), "the stop came mid-load");
    let worker = start();
    let want: HashSet<_> = sent.iter().map(|e| e.id.clone()).collect();
    // Duplicates count too; wait until every id is in.
    let mut total = sent.len();
    loop {
        delivered.wait(total).await;
        let got = recorder.events();
        let unique: HashSet<_> = got.iter().map(|e| e.id.clone()).collect();
        if unique == want {
            break;
        }
        total = got.len() + 1;
    }
    worker.shutdown().await;
}

/// Retention deletes completed jobs (the worker's hourly clean-up, here
/// called directly).
pub async fn retention_removes_completed_jobs<Bk: Backends>(backends: &Bk) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    let mut sink = publisher(&backend, &recorder);
    for n in 0..3 {
        sink.publish(Event::new("test.retention", json!(n)))
            .await
            .expect("publish");
    }
    let worker = spawn_worker(&sink, fast_schedule(3));
    recorder
        .wait_for(3, ARRIVAL_TIMEOUT)
        .await
        .expect("delivered");
    worker.shutdown().await;
    let kept = backend
        .remove_completed(Duration::from_secs(3600))
        .await
        .expect("retention");
    assert_eq!(kept, 0, "jobs completed just now are younger than an hour");
    let removed = backend
        .remove_completed(Duration::ZERO)
        .await
        .expect("retention");
    let want = if Bk::KEEPS_COMPLETED { 3 } else { 0 };
    assert_eq!(removed, want, "completed jobs removed");
}

/// A sink that fails every event permanently, counting its calls.
fn failing_sink(
    calls: &Delivered,
) -> impl tower::Service<Event, Response = (), Error = eventsink::Error, Future: Send>
+ Clone
+ Send
+ 'static {
    let calls = calls.clone();
    tower::service_fn(move |_event: Event| {
        let calls = calls.clone();
        async move {
            calls.add();
            Err(eventsink::Error::Simulated {
                retryable: false,
                retry_after: None,
            })
        }
    })
}

/// Replaying the dead letters of a sink that still fails, and fails fast,
/// replays each letter once and loses none: every event is a dead letter
/// again afterwards (a replay must never delete the letter that the
/// replayed job's own failure wrote).
pub async fn replay_all_racing_fast_failures_loses_nothing(backends: &impl Backends) {
    const N: usize = 200;
    let backend = backends.make::<Value>().await;
    let dead = eventsink::queue::DeadLetters::<_, Value>::new(backend.clone());
    let calls = Delivered::new();
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(failing_sink(&calls));
    let sent: Vec<_> = (0..N)
        .map(|n| Event::new("test.replay", json!({ "n": n })))
        .collect();
    for event in &sent {
        sink.publish(event.clone()).await.expect("publish");
    }
    let worker = sink
        .worker()
        .schedule(fast_schedule(3))
        .poll_interval(Duration::from_millis(10))
        .spawn();
    dead.wait_for(N as u64, ARRIVAL_TIMEOUT)
        .await
        .expect("every event is a dead letter");
    let before = dead.list(0, N as u64 + 1).await.expect("list");
    let replayed = tokio::time::timeout(ARRIVAL_TIMEOUT, dead.replay_all())
        .await
        .expect("replay_all must end")
        .expect("replay_all");
    assert_eq!(replayed, N as u64, "each dead letter is replayed once");
    calls.wait(2 * N).await;
    let count = dead
        .wait_for(N as u64, ARRIVAL_TIMEOUT)
        .await
        .expect("every replayed event is a dead letter again");
    worker.shutdown().await;
    assert_eq!(count, N as u64);
    let after = dead.list(0, N as u64 + 1).await.expect("list");
    let want: Vec<_> = sent.iter().map(|e| e.id.to_string()).collect();
    let mut got: Vec<_> = after.iter().map(|d| d.event.id.to_string()).collect();
    got.sort();
    let mut want = want;
    want.sort();
    assert_eq!(got, want, "one dead letter per event");
    for letter in &after {
        let old = before
            .iter()
            .find(|d| d.key == letter.key)
            .expect("same key");
        assert_ne!(old.chain, letter.chain, "the letter is the replay's");
    }
    assert_eq!(*calls.0.borrow(), 2 * N, "each event ran once more");
}

/// Two events of different kinds that share an id are two jobs, and so
/// two dead letters: one must not overwrite the other.
pub async fn two_kinds_sharing_an_id_keep_two_dead_letters(backends: &impl Backends) {
    let backend = backends.make::<Value>().await;
    let dead = eventsink::queue::DeadLetters::<_, Value>::new(backend.clone());
    let recorder = RecordingSink::new();
    recorder.fail_next_permanently(2);
    let mut sink = publisher(&backend, &recorder);
    let worker = spawn_worker(&sink, fast_schedule(3));
    let a = Event::with_id("test.kind.a", "shared-id", json!("a"));
    let b = Event::with_id("test.kind.b", "shared-id", json!("b"));
    sink.publish(a.clone()).await.expect("publish a");
    sink.publish(b.clone()).await.expect("publish b");
    dead.wait_for(2, ARRIVAL_TIMEOUT)
        .await
        .expect("one dead letter per kind");
    let letters = dead.list(0, 10).await.expect("list");
    let mut kinds: Vec<_> = letters.iter().map(|d| d.event.kind.to_string()).collect();
    kinds.sort();
    assert_eq!(kinds, ["test.kind.a", "test.kind.b"]);
    for letter in &letters {
        let shown = dead.get(&letter.key).await.expect("get").expect("shown");
        assert_eq!(shown.event, letter.event);
        assert!(dead.replay(&letter.key).await.expect("replay"));
    }
    let got = recorder
        .wait_for(2, ARRIVAL_TIMEOUT)
        .await
        .expect("both replayed");
    worker.shutdown().await;
    let mut got_kinds: Vec<_> = got.iter().map(|e| e.kind.to_string()).collect();
    got_kinds.sort();
    assert_eq!(got_kinds, ["test.kind.a", "test.kind.b"]);
    assert_eq!(dead.count().await.expect("count"), 0);
}

/// An event published again after retention removed its first job, while
/// rows of its first delivery chain's retries are still kept, gets a
/// chain of its own: its retries never meet the old chain's rows (which
/// used to make the retry count as "already stored": no job, no letter).
pub async fn republished_event_never_meets_an_old_chains_retries<Bk: Backends>(backends: &Bk) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    // Chain 1: attempts 1 and 2 fail, attempt 3 waits an hour. Chain 2:
    // attempt 1 fails, attempt 2 delivers.
    recorder.fail_next(3);
    let mut sink = publisher(&backend, &recorder);
    let schedule = RetrySchedule::fixed([Duration::from_secs(3), Duration::from_secs(3600)]);
    let worker = sink
        .worker()
        .schedule(schedule)
        .poll_interval(Duration::from_millis(10))
        .spawn();
    let event = Event::new("test.chain", json!({"x": 1}));
    sink.publish(event.clone()).await.expect("publish");
    let deadline = tokio::time::Instant::now() + ARRIVAL_TIMEOUT;
    while recorder.calls() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "attempt 2 never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Attempt 1 finished at least 3 s before attempt 2: removing what
    // finished over 2 s ago removes the first job only, as a retention of
    // 24 h does while the retries of a 28 h schedule are kept.
    let removed = backend
        .remove_completed(Duration::from_secs(2))
        .await
        .expect("retention");
    if Bk::KEEPS_COMPLETED {
        assert_eq!(removed, 1, "retention removed the first job only");
    }
    sink.publish(event.clone()).await.expect("publish again");
    let got = recorder
        .wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("the second chain's retry delivers the event");
    worker.shutdown().await;
    assert_eq!(got, vec![event]);
    assert_eq!(recorder.calls(), 4);
}

/// An event whose id or kind the crate's rule refuses (and a webhook
/// receiver would) is refused at publish with a permanent error: never a
/// job that could only become a dead letter.
pub async fn an_event_the_wire_rule_refuses_is_refused_at_publish(backends: &impl Backends) {
    let backend = backends.make::<Value>().await;
    let recorder = RecordingSink::new();
    let mut sink = publisher(&backend, &recorder);
    for bad in [
        Event::with_id("test.bad", "has space", json!(1)),
        Event::with_id("test.bad", "", json!(1)),
        Event::new("line\nbreak", json!(1)),
    ] {
        let err = sink.publish(bad.clone()).await.expect_err("refused");
        assert!(!err.is_retryable(), "{:?}/{:?}: {err}", bad.kind, bad.id);
    }
    let good = Event::with_id("test.good", "evt_01J.x-y", json!(2));
    sink.publish(good.clone()).await.expect("publish");
    let worker = spawn_worker(&sink, fast_schedule(3));
    let got = recorder
        .wait_for(1, ARRIVAL_TIMEOUT)
        .await
        .expect("delivered");
    worker.shutdown().await;
    assert_eq!(got, vec![good]);
    assert_eq!(recorder.calls(), 1, "nothing else was stored");
}

/// The publishing service passes the conformance suite, with a worker
/// draining into a `RecordingSink`.
pub async fn passes_conformance<Bk: Backends>(backends: &Bk) {
    let mut json_dests = Vec::new();
    for _ in 0..3 {
        json_dests.push(Drained::new(backends.make::<Value>().await));
    }
    let typed = Mutex::new(vec![Drained::new(backends.make::<OrderPlaced>().await)]);
    let json_dests = Mutex::new(json_dests);
    conformance::run(
        || json_dests.lock().unwrap().pop().expect("a prepared queue"),
        || typed.lock().unwrap().pop().expect("a prepared queue"),
    )
    .await;
}

/// A queue with a running worker that delivers into a recorder.
pub struct Drained<B, P> {
    sink: Sink<B, P>,
    recorder: RecordingSink<P>,
    _worker: WorkerHandle,
}

impl<B: QueueBackend<P>, P: Payload> Drained<B, P> {
    fn new(backend: B) -> Self {
        let recorder = RecordingSink::new();
        let sink = publisher(&backend, &recorder);
        let worker = spawn_worker(&sink, fast_schedule(3));
        Drained {
            sink,
            recorder,
            _worker: worker,
        }
    }
}

impl<B: QueueBackend<P>, P: Payload> Destination<P> for Drained<B, P> {
    type Sink = Sink<B, P>;

    fn sink(&self) -> Self::Sink {
        self.sink.clone()
    }

    async fn arrived(&self, n: usize) -> Option<Vec<Event<P>>> {
        let mut events = self
            .recorder
            .wait_for(n, ARRIVAL_TIMEOUT)
            .await
            .expect("events delivered through the queue");
        events.sort_by(|a, b| a.id.cmp(&b.id));
        Some(events)
    }
}

/// Declares one `#[tokio::test]` per shared test body for a backend.
///
/// `queue_tests!(sqlite())` always runs them; `queue_tests!(postgres(),
/// unless eventsink_postgres: "set EVENTSINK_POSTGRES_URL ...")` marks
/// them ignored, with that reason, unless `build.rs` set the cfg (the
/// backend's URL variable was set at build time).
#[macro_export]
macro_rules! queue_tests {
    ($backends:expr) => {
        $crate::queue_tests!(@list [] $backends);
    };
    ($backends:expr, unless $cfg:ident: $reason:literal) => {
        $crate::queue_tests!(@list [#[cfg_attr(not($cfg), ignore = $reason)]] $backends);
    };
    (@list [$($gate:tt)*] $backends:expr) => {
        $crate::queue_tests!(@each [$($gate)*] $backends;
            delivers_each_event_exactly_once,
            transient_failures_are_retried_then_delivered,
            permanent_failure_is_a_dead_letter_at_once,
            dead_letters_list_show_replay_and_purge,
            duplicate_publish_is_delivered_once,
            publish_twice_is_stored_then_already_queued,
            concurrent_duplicates_each_get_their_own_answer,
            shutdown_mid_load_loses_nothing,
            retention_removes_completed_jobs,
            passes_conformance,
            replay_all_racing_fast_failures_loses_nothing,
            two_kinds_sharing_an_id_keep_two_dead_letters,
            republished_event_never_meets_an_old_chains_retries,
            an_event_the_wire_rule_refuses_is_refused_at_publish,
        );
    };
    (@each [$($gate:tt)*] $backends:expr; $name:ident, $($rest:ident,)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($gate)*
        async fn $name() {
            let backends = $backends;
            support::queue::$name(&backends).await;
            support::queue::Backends::cleanup(&backends).await;
        }
        $crate::queue_tests!(@each [$($gate)*] $backends; $($rest,)*);
    };
    (@each [$($gate:tt)*] $backends:expr;) => {};
}

/// Deletes the jobs, dead letters and workers of the queue `names` in
/// Postgres.
#[cfg(feature = "postgres")]
pub async fn delete_postgres_rows(url: &str, names: &[String]) {
    let Ok(pool) = sqlx::PgPool::connect(url).await else {
        return;
    };
    for name in names {
        for sql in [
            "DELETE FROM apalis.jobs WHERE job_type = $1",
            "DELETE FROM eventsink_dead_letters WHERE queue = $1",
            "DELETE FROM apalis.workers WHERE worker_type = $1",
        ] {
            let _ = sqlx::query(sql).bind(name).execute(&pool).await;
        }
    }
}

/// Deletes every Redis key that mentions one of the queue `names`.
#[cfg(feature = "redis")]
pub async fn delete_redis_keys(url: &str, names: &[String]) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for name in names {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{name}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        // apalis-redis lists every queue it has seen.
        let _: Result<(), _> = redis::cmd("ZREM")
            .arg("core:apalis:queues:list")
            .arg(format!("{name}:workers"))
            .query_async(&mut conn)
            .await;
    }
}

/// Opens the queue a child process was told to open — `$backend` is
/// `"sqlite"`, `"postgres"` or `"redis"`, `$location` its path or URL —
/// with the lease `$heartbeat` × `$missed`, binds it to `$q` and evaluates
/// `$body` (each backend is its own type, so the body is expanded per
/// backend).
#[macro_export]
macro_rules! with_child_queue {
    ($backend:expr, $queue:expr, $location:expr, ($heartbeat:expr, $missed:expr), |$q:ident| $body:expr) => {
        match $backend {
            "sqlite" => {
                let $q: eventsink::queue::SqliteQueue =
                    eventsink::queue::SqliteQueue::builder($queue)
                        .lease($heartbeat, $missed)
                        .open($location)
                        .await
                        .expect("open the SQLite queue");
                $body
            }
            #[cfg(feature = "postgres")]
            "postgres" => {
                let $q: eventsink::queue::PostgresQueue =
                    eventsink::queue::PostgresQueue::builder($queue)
                        .lease($heartbeat, $missed)
                        .connect($location)
                        .await
                        .expect("connect to Postgres");
                $body
            }
            #[cfg(feature = "redis")]
            "redis" => {
                let $q: eventsink::queue::RedisQueue =
                    eventsink::queue::RedisQueue::builder($queue)
                        .lease($heartbeat, $missed)
                        .connect($location)
                        .await
                        .expect("connect to Redis");
                $body
            }
            other => panic!("unknown backend {other}"),
        }
    };
}

/// Waits (at most 10 s) until `pool` has `idle` idle connections: a
/// publisher keeps its write connections while busy and gives them back
/// after a second idle.
#[allow(dead_code)]
pub async fn until_idle<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, idle: usize) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while pool.num_idle() != idle {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    waited.await.unwrap_or_else(|_| {
        panic!(
            "{} of {} connections idle, not {idle}",
            pool.num_idle(),
            pool.size()
        )
    });
}
