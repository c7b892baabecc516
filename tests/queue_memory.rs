//! ThroughTaskQueue on the in-memory backend: the shared queue tests, and
//! what only memory shows.
#![cfg(feature = "queue")]
mod support;

use eventsink::queue::MemoryQueue;
use support::queue::{Backends, Payload, unique_name};

struct Memory;

impl Backends for Memory {
    type B<P: Payload> = MemoryQueue<P>;
    const KEEPS_COMPLETED: bool = false;

    async fn make<P: Payload>(&self) -> MemoryQueue<P> {
        MemoryQueue::new(unique_name("memory"))
    }
}

queue_tests!(Memory);

#[tokio::test]
async fn publishing_outside_a_runtime_is_an_error_not_a_panic() {
    use eventsink::queue::{QueueError, ThroughTaskQueue};
    use eventsink::{Event, NoopSink};
    use tower::{Layer, Service};
    let mut sink = ThroughTaskQueue::new(MemoryQueue::<()>::new("q")).layer(NoopSink::new());
    // The call happens on a thread without a runtime; awaiting it elsewhere.
    let future = std::thread::spawn(move || sink.call(Event::new("k", ())))
        .join()
        .unwrap();
    let err = future.await.unwrap_err();
    assert!(matches!(err, QueueError::NoRuntime), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sink_makes_a_dead_letter_and_the_worker_lives_on() {
    use eventsink::queue::{DeathCause, ThroughTaskQueue};
    use eventsink::{Event, RecordingSink, SinkExt};
    use std::time::Duration;
    use tower::{Layer, Service};
    let recorder = RecordingSink::new();
    let sink = {
        let recorder = recorder.clone();
        tower::service_fn(move |event: Event| {
            if event.kind.as_ref() == "test.boom" {
                panic!("boom on {}", event.id);
            }
            recorder.clone().call(event)
        })
    };
    let queue = MemoryQueue::new(unique_name("panic"));
    let mut publisher = ThroughTaskQueue::new(queue.clone()).layer(sink);
    let worker = publisher.worker().spawn();
    let boom = Event::new("test.boom", serde_json::json!(1));
    publisher.publish(boom.clone()).await.unwrap();
    let dead = queue.dead_letters();
    dead.wait_for(1, Duration::from_secs(10)).await.unwrap();
    let letter = dead.get(&dead.key_of(&boom)).await.unwrap().unwrap();
    assert_eq!(letter.cause, DeathCause::Permanent);
    assert!(
        letter.last_error.contains("boom on"),
        "{}",
        letter.last_error
    );
    publisher
        .publish(Event::new("test.fine", serde_json::json!(2)))
        .await
        .unwrap();
    recorder.wait_for(1, Duration::from_secs(10)).await.unwrap();
    assert!(!worker.is_finished());
    worker.shutdown().await;
}

#[tokio::test]
async fn the_publishing_service_boxes_into_a_box_sink() {
    use eventsink::queue::{Published, Publisher, ThroughTaskQueue};
    use eventsink::{BoxSink, Event, NoopSink, SinkExt};
    use tower::{Layer, ServiceExt};
    let queue: MemoryQueue = MemoryQueue::new(unique_name("boxed"));
    let layer = ThroughTaskQueue::new(queue.clone());
    let mut sink: Publisher = layer.layer(NoopSink::new()).boxed_sink();
    let published = sink
        .publish(Event::new("test.boxed", serde_json::json!(1)))
        .await
        .expect("publish through a Publisher");
    assert_eq!(published, Published::Stored);
    // Where a sink of `()` is expected, drop the answer.
    let mut plain: BoxSink = layer.layer(NoopSink::new()).map_response(drop).boxed_sink();
    plain
        .publish(Event::new("test.boxed", serde_json::json!(2)))
        .await
        .expect("publish through a BoxSink");
}

/// A worker that stops while it holds jobs it has taken but not started
/// (and one delivery that outlives the stop) leaves every event to the next
/// worker: nothing is lost while the process lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_leaves_its_untouched_jobs_to_the_next() {
    use eventsink::queue::ThroughTaskQueue;
    use eventsink::{Event, RecordingSink, SinkExt};
    use std::time::Duration;
    use tower::Layer;
    const EVENTS: usize = 50;
    let (started, mut starts) = tokio::sync::mpsc::unbounded_channel();
    let held = tower::service_fn(move |_: Event| {
        let _ = started.send(());
        std::future::pending::<Result<(), eventsink::Error>>()
    });
    let queue = MemoryQueue::new(unique_name("stop-held"));
    let mut publisher = ThroughTaskQueue::new(queue.clone()).layer(held);
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let event = Event::new("test.held", serde_json::json!(n));
        ids.push(event.id.to_string());
        publisher.publish(event).await.expect("publish");
    }
    let worker = publisher
        .worker()
        .concurrency(4)
        .attempt_timeout(Duration::from_millis(300))
        .schedule(support::queue::fast_schedule(5))
        .spawn();
    starts.recv().await.expect("the first delivery started");
    worker.shutdown().await;

    let recorder = RecordingSink::new();
    let next = ThroughTaskQueue::new(queue.clone())
        .layer(recorder.clone())
        .worker()
        .spawn();
    recorder
        .wait_for(EVENTS, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("every event reaches the next worker: {e}"));
    next.shutdown().await;
    let mut got: Vec<String> = recorder.events().iter().map(|e| e.id.to_string()).collect();
    got.sort();
    got.dedup();
    ids.sort();
    assert_eq!(got, ids);
}
