//! The queue's metrics (feature `metrics`) after a known run on a real
//! SQLite queue: a debugging recorder counts what publishing, delivering,
//! retrying, burying and replaying reported.
#![cfg(all(feature = "metrics", feature = "sqlite"))]
mod support;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use eventsink::metrics::{
    ATTEMPT_DURATION_SECONDS, DEAD_TOTAL, DELIVERED_TOTAL, DELIVERY_LATENCY_SECONDS,
    ENQUEUED_TOTAL, PUBLISHED_TOTAL, QUEUE_DEPTH, RETRIED_TOTAL,
};
use eventsink::queue::{Published, SqliteQueue, ThroughTaskQueue};
use eventsink::{Event, RecordingSink, SinkExt};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::json;
use support::conformance::ARRIVAL_TIMEOUT;
use support::queue::{fast_schedule, unique_name};
use tower::Layer;

/// The recorder of this test binary, installed once.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snapshotter
    })
}

/// What the recorder saw, added up: a snapshot resets its counters and
/// histograms, so every read is added to the totals (gauges keep the last
/// value read).
#[derive(Default)]
struct Seen {
    counters: HashMap<String, u64>,
    histograms: HashMap<String, Vec<f64>>,
    gauges: HashMap<String, f64>,
}

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

/// `name{label=value,...}`, labels sorted.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// Reads the recorder into the totals and returns them to `look`.
fn read<T>(look: impl FnOnce(&Seen) -> T) -> T {
    let mut seen = SEEN.lock().unwrap();
    let seen = seen.get_or_insert_with(Seen::default);
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let name = series(key.name(), &labels);
        match value {
            DebugValue::Counter(n) => *seen.counters.entry(name).or_default() += n,
            DebugValue::Gauge(v) => {
                seen.gauges.insert(name, v.into_inner());
            }
            DebugValue::Histogram(values) => seen
                .histograms
                .entry(name)
                .or_default()
                .extend(values.into_iter().map(|v| v.into_inner())),
        }
    }
    look(seen)
}

fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    read(|seen| {
        seen.counters
            .get(&series(name, labels))
            .copied()
            .unwrap_or(0)
    })
}

fn histogram(name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    read(|seen| {
        seen.histograms
            .get(&series(name, labels))
            .cloned()
            .unwrap_or_default()
    })
}

/// Waits until the depth gauge of `queue` reads `dead` dead letters and
/// nothing pending, scheduled or running (the worker sets it every 10 ms
/// here). A snapshot resets a gauge to 0, so only a `dead` above 0 proves
/// that the worker reported.
async fn wait_for_depth(queue: &str, dead: f64) {
    // One snapshot for the four: each read resets them.
    let gauges = || {
        read(|seen| {
            ["pending", "scheduled", "running", "dead"].map(|state| {
                seen.gauges
                    .get(&series(QUEUE_DEPTH, &[("queue", queue), ("state", state)]))
                    .copied()
            })
        })
    };
    let deadline = tokio::time::Instant::now() + ARRIVAL_TIMEOUT;
    loop {
        let now = gauges();
        if now == [Some(0.0), Some(0.0), Some(0.0), Some(dead)] {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the depth gauge of {queue} never read {dead} dead and nothing else; last {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `base` and one more label.
fn with<'a>(base: &[(&'a str, &'a str)], extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut labels = base.to_vec();
    labels.push(extra);
    labels
}

#[tokio::test]
async fn a_known_run_gives_known_numbers() {
    snapshotter();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("metrics");
    let backend = SqliteQueue::open(dir.path().join("q.db"), &name)
        .await
        .unwrap();
    let recorder = RecordingSink::new();
    let queue = ThroughTaskQueue::new(backend.clone());
    let mut sink = queue.layer(recorder.clone());
    let worker = queue
        .worker(recorder.clone())
        .schedule(fast_schedule(5))
        .poll_interval(Duration::from_millis(10))
        .depth_interval(Some(Duration::from_millis(10)))
        .spawn();

    // Three orders, two transient failures among their attempts.
    recorder.fail_next(2);
    for n in 0..3 {
        let event = Event::with_id("order.placed", format!("o{n}"), json!({ "n": n }));
        assert_eq!(sink.publish(event).await.unwrap(), Published::Stored);
    }
    recorder.wait_for(3, ARRIVAL_TIMEOUT).await.unwrap();
    // The same order again, within retention: stored nothing new.
    let again = Event::with_id("order.placed", "o0", json!({ "n": 0 }));
    assert_eq!(sink.publish(again).await.unwrap(), Published::AlreadyQueued);

    // One cancellation that fails permanently, then is replayed.
    recorder.fail_next_permanently(1);
    sink.publish(Event::with_id("order.cancelled", "c0", json!(0)))
        .await
        .unwrap();
    let dead = backend.dead_letters();
    dead.wait_for(1, ARRIVAL_TIMEOUT).await.unwrap();
    wait_for_depth(&name, 1.0).await;
    assert!(
        dead.replay(&format!("{name}:order.cancelled:c0"))
            .await
            .unwrap()
    );
    recorder.wait_for(4, ARRIVAL_TIMEOUT).await.unwrap();
    worker.shutdown().await; // every delivery has reported

    let placed = [("queue", name.as_str()), ("kind", "order.placed")];
    let cancelled = [("queue", name.as_str()), ("kind", "order.cancelled")];
    assert_eq!(
        counter(PUBLISHED_TOTAL, &with(&placed, ("result", "stored"))),
        3
    );
    assert_eq!(
        counter(
            PUBLISHED_TOTAL,
            &with(&placed, ("result", "already_queued"))
        ),
        1
    );
    assert_eq!(counter(ENQUEUED_TOTAL, &placed), 3);
    assert_eq!(counter(ENQUEUED_TOTAL, &cancelled), 2, "publish and replay");
    assert_eq!(counter(DELIVERED_TOTAL, &placed), 3);
    assert_eq!(counter(DELIVERED_TOTAL, &cancelled), 1);
    assert_eq!(counter(RETRIED_TOTAL, &placed), 2);
    assert_eq!(counter(RETRIED_TOTAL, &cancelled), 0);
    assert_eq!(
        counter(DEAD_TOTAL, &with(&cancelled, ("cause", "permanent"))),
        1
    );
    assert_eq!(
        counter(DEAD_TOTAL, &with(&placed, ("cause", "permanent"))),
        0
    );

    let attempts = |kind: &[(&str, &str)], outcome| {
        histogram(ATTEMPT_DURATION_SECONDS, &with(kind, ("outcome", outcome)))
    };
    assert_eq!(attempts(&placed, "delivered").len(), 3);
    assert_eq!(attempts(&placed, "retrying").len(), 2);
    assert_eq!(attempts(&cancelled, "dead").len(), 1);
    assert_eq!(attempts(&cancelled, "delivered").len(), 1);
    let latency = histogram(DELIVERY_LATENCY_SECONDS, &placed);
    assert_eq!(latency.len(), 3);
    assert!(
        latency.iter().all(|s| (0.0..60.0).contains(s)),
        "{latency:?}"
    );
}
