//! Scenarios of the core: the tower stack, the file sink, memory under
//! backpressure, and the cost of cloning an event.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use eventsink::{Event, FsSink, NoopSink, RetryPolicy, SinkExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tower::ServiceBuilder;

use crate::harness::{
    Options, Scenario, paired, peak_rss_mib, per_second, report, reset_peak_rss, runtime, timed,
};

/// Concurrent publishers in the stack scenarios.
const PUBLISHERS: usize = 64;
/// The buffer bound of the recommended stack: at least the publishers.
const BUFFER: usize = 1024;

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "noop_stack",
            run: noop_stack,
        },
        Scenario {
            name: "fs",
            run: fs,
        },
        Scenario {
            name: "memory_bound",
            run: memory_bound,
        },
        Scenario {
            name: "event_clone",
            run: event_clone,
        },
    ]
}

fn small_event() -> Event {
    Event::new("bench.noop", json!({"order_id": 7, "total_cents": 1250}))
}

/// 64 publishers through buffer + retry + timeout over `NoopSink`, against
/// the same publishers doing an mpsc send plus a oneshot reply to one task.
fn noop_stack(options: &Options) {
    let per_publisher = options.size(1_000, 10_000);
    let total = PUBLISHERS * per_publisher;
    let rt = runtime();
    let m = paired(
        || rt.block_on(stack_round(per_publisher, total)),
        || rt.block_on(channel_round(per_publisher, total)),
    );
    report(
        "noop_stack",
        m.ours,
        m.baseline,
        m.ratio,
        "events/s",
        "mpsc send + oneshot reply",
    );
}

// Each publisher clones its own event: distinct events, as in an application,
// without every task contending on one shared reference count.

async fn stack_round(per_publisher: usize, total: usize) -> f64 {
    let sink = ServiceBuilder::new()
        .buffer(BUFFER)
        .retry(RetryPolicy::default())
        .timeout(Duration::from_secs(15))
        .service(NoopSink::new());
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..PUBLISHERS {
        let (mut sink, event) = (sink.clone(), small_event());
        tasks.spawn(async move {
            for _ in 0..per_publisher {
                sink.publish(event.clone()).await.expect("noop publish");
            }
        });
    }
    tasks.join_all().await;
    per_second(total, started.elapsed())
}

async fn channel_round(per_publisher: usize, total: usize) -> f64 {
    let (tx, mut rx) = mpsc::channel::<(Event, oneshot::Sender<()>)>(BUFFER);
    let server = tokio::spawn(async move {
        while let Some((event, reply)) = rx.recv().await {
            black_box(event);
            let _ = reply.send(());
        }
    });
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..PUBLISHERS {
        let (tx, event) = (tx.clone(), small_event());
        tasks.spawn(async move {
            for _ in 0..per_publisher {
                let (reply, answered) = oneshot::channel();
                tx.send((event.clone(), reply)).await.expect("server alive");
                answered.await.expect("server replied");
            }
        });
    }
    tasks.join_all().await;
    let rate = per_second(total, started.elapsed());
    drop(tx);
    server.await.expect("server task");
    rate
}

/// `FsSink` against a raw loop doing the same serialise, write-temp and
/// rename with `std::fs`, in the same directory.
fn fs(options: &Options) {
    let count = options.size(500, 5_000);
    let rt = runtime();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_path_buf();
    let events: Vec<_> = (0..count)
        .map(|n| Event::new("bench.fs", json!({"n": n, "text": "x".repeat(200)})))
        .collect();
    let m = paired(
        || {
            clear(&dir);
            let mut sink = FsSink::new(&dir).expect("fs sink");
            let (_, elapsed) = timed(|| {
                rt.block_on(async {
                    for event in &events {
                        sink.publish(event.clone()).await.expect("fs publish");
                    }
                })
            });
            per_second(count, elapsed)
        },
        || {
            clear(&dir);
            let (_, elapsed) = timed(|| {
                for event in &events {
                    raw_write(&dir, event);
                }
            });
            per_second(count, elapsed)
        },
    );
    report(
        "fs",
        m.ours,
        m.baseline,
        m.ratio,
        "events/s",
        "std::fs write temp + rename loop",
    );
}

fn raw_write(dir: &Path, event: &Event) {
    let name = format!(
        "{}_{}_{}.json",
        event.created_at.timestamp(),
        event.kind,
        event.id
    );
    let body = serde_json::to_vec_pretty(event).expect("serialise");
    let temp = dir.join(format!(".raw-{:016x}.tmp", fastrand::u64(..)));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .expect("create temp");
    file.write_all(&body).expect("write temp");
    drop(file);
    std::fs::rename(&temp, dir.join(name)).expect("rename");
}

fn clear(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove");
    }
}

/// A sink that never answers, behind the recommended stack and a
/// concurrency limit; 64 publishers abandon every publish after 1 ms. Peak
/// RSS must stay within the budget: backpressure and cancellation leak
/// nothing.
fn memory_bound(options: &Options) {
    const BUDGET_MIB: f64 = 64.0;
    let attempts = options.size(200_000, 1_000_000);
    let per_publisher = attempts / PUBLISHERS;
    let rt = runtime();
    reset_peak_rss();
    let (abandoned, elapsed) = timed(|| rt.block_on(abandon_publishes(per_publisher)));
    let peak = peak_rss_mib();
    println!(
        "memory_bound: {abandoned} of {} publishes abandoned after 1 ms in {:.1} s",
        per_publisher * PUBLISHERS,
        elapsed.as_secs_f64()
    );
    report(
        "memory_bound",
        peak,
        BUDGET_MIB,
        peak / BUDGET_MIB,
        "MiB peak RSS",
        "budget",
    );
}

async fn abandon_publishes(per_publisher: usize) -> usize {
    let never =
        tower::service_fn(|_: Event| std::future::pending::<Result<(), eventsink::Error>>());
    let sink = ServiceBuilder::new()
        .buffer(BUFFER)
        .concurrency_limit(PUBLISHERS)
        .retry(RetryPolicy::default())
        .timeout(Duration::from_secs(15))
        .service(never);
    let mut tasks = tokio::task::JoinSet::new();
    for publisher in 0..PUBLISHERS {
        let mut sink = sink.clone();
        tasks.spawn(async move {
            let mut abandoned = 0;
            for n in 0..per_publisher {
                let event = Event::new("bench.stuck", json!({"publisher": publisher, "n": n}));
                let attempt = tokio::time::timeout(Duration::from_millis(1), sink.publish(event));
                if attempt.await.is_err() {
                    abandoned += 1;
                }
            }
            abandoned
        });
    }
    tasks.join_all().await.into_iter().sum()
}

/// Cloning an `Event` (shared payload) against cloning the same data held
/// by value, as a retry does once per attempt.
fn event_clone(options: &Options) {
    #[derive(Clone)]
    #[expect(
        dead_code,
        reason = "only cloned: copying the fields is what is measured"
    )]
    struct ByValue {
        kind: String,
        id: String,
        created_at: chrono::DateTime<chrono::Utc>,
        payload: Value,
    }
    let clones = options.size(200_000, 2_000_000);
    let payload: Value = (0..24)
        .map(|i| {
            (
                format!("field_{i}"),
                json!(format!("value number {i} of the payload")),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let event = Event::new("order.placed", payload.clone());
    let by_value = ByValue {
        kind: event.kind.to_string(),
        id: event.id.to_string(),
        created_at: event.created_at,
        payload,
    };
    let m = paired(
        || {
            let (_, elapsed) = timed(|| {
                for _ in 0..clones {
                    black_box(black_box(&event).clone());
                }
            });
            per_second(clones, elapsed)
        },
        || {
            let (_, elapsed) = timed(|| {
                for _ in 0..clones {
                    black_box(black_box(&by_value).clone());
                }
            });
            per_second(clones, elapsed)
        },
    );
    report(
        "event_clone",
        m.ours,
        m.baseline,
        m.ratio,
        "clones/s",
        "same event held by value",
    );
}
