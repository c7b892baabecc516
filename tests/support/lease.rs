//! The lease scenario every durable backend runs: a busy worker keeps the
//! jobs it fetched, however long its deliveries take.
#![cfg(feature = "queue")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use eventsink::Event;
use eventsink::queue::{QueueBackend, QueueWorker, ThroughTaskQueue};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tower::{Layer, Service, ServiceExt};

/// Events of the scenario: one delivered, two waiting in the buffer.
const EVENTS: usize = 3;

/// What the scenario reads of a backend, each as a fresh future.
pub struct Probe {
    /// How many jobs some worker holds.
    pub held: Box<dyn Fn() -> BoxFuture<'static, usize> + Send + Sync>,
    /// The latest heartbeat (Unix seconds) of a worker that holds no job.
    pub idle_seen: Box<dyn Fn() -> BoxFuture<'static, Option<f64>> + Send + Sync>,
}

/// Worker `a` (on `queue_a`) delivers one job at a time and has fetched
/// three: while its one delivery runs, two jobs wait in its buffer, and
/// apalis sends no heartbeat until it can hand them out. Worker `b` (on
/// `queue_b`, another handle of the same queue, whose lease is `beats`
/// heartbeats of `beat`) must not take over `a`'s jobs meanwhile.
pub async fn busy_worker_keeps_its_lease<B>(
    queue_a: B,
    queue_b: B,
    beat: Duration,
    beats: usize,
    probe: Probe,
) where
    B: QueueBackend<Value> + Clone,
{
    let _watchdog = super::Watchdog::new(Duration::from_secs(120), "busy-lease test hung");
    let (started_tx, mut started) = mpsc::unbounded_channel::<(&'static str, String)>();
    let release = Arc::new(Semaphore::new(0));
    let slow = {
        let (started_tx, release) = (started_tx.clone(), Arc::clone(&release));
        tower::service_fn(move |event: Event| {
            let (started_tx, release) = (started_tx.clone(), Arc::clone(&release));
            async move {
                let _ = started_tx.send(("a", event.id.to_string()));
                release.acquire().await.expect("not closed").forget();
                Ok::<(), eventsink::Error>(())
            }
        })
    };
    let quick = tower::service_fn(move |event: Event| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(("b", event.id.to_string()));
            Ok::<(), eventsink::Error>(())
        }
    });
    let mut publisher = ThroughTaskQueue::new(queue_a.clone()).layer(slow.clone());
    for n in 0..EVENTS {
        publisher.ready().await.expect("ready");
        let event = Event::new("test.busy", json!(n));
        publisher.call(event).await.expect("publish");
    }
    let a = QueueWorker::new(queue_a, slow)
        .concurrency(1)
        .fetch_batch(EVENTS)
        .attempt_timeout(Duration::from_secs(60))
        .spawn();
    let (who, first) = started.recv().await.expect("a delivers");
    assert_eq!(who, "a");
    assert_eq!((probe.held)().await, EVENTS, "a fetched every job");
    let b = QueueWorker::new(queue_b, quick)
        .poll_interval(Duration::from_millis(50))
        .spawn();
    // Until b has sent heartbeats past the moment a's lease would have
    // lapsed without one from a (each of b's takes over the jobs of workers
    // silent for the lease), and then one more.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let past_lease = now + (beat * (beats as u32 + 2)).as_secs_f64();
    loop {
        if let Ok((who, id)) = started.try_recv() {
            panic!("worker {who} started delivering {id} while worker a held it");
        }
        if (probe.idle_seen)()
            .await
            .is_some_and(|seen| seen >= past_lease)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    release.add_permits(EVENTS);
    let mut delivered = vec![first];
    while delivered.len() < EVENTS {
        let (who, id) = started.recv().await.expect("deliveries");
        assert_eq!(who, "a", "b delivered {id}, which a held");
        delivered.push(id);
    }
    a.shutdown().await;
    b.shutdown().await;
    let unique: HashSet<_> = delivered.iter().collect();
    assert_eq!(unique.len(), EVENTS, "each event once: {delivered:?}");
    assert!(started.try_recv().is_err(), "no event delivered again");
}
