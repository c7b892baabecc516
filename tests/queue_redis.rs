//! ThroughTaskQueue on Redis (`EVENTSINK_REDIS_URL`): the shared queue tests.
//! Ignored (with the reason) when the variable was not set at build time
//! (see `build.rs`).
#![cfg(feature = "redis")]
mod support;

use std::sync::Mutex;

use eventsink::queue::RedisQueue;
use support::queue::{Backends, Payload, backend_url, unique_name};

struct Redis {
    url: String,
    names: Mutex<Vec<String>>,
}

impl Backends for Redis {
    type B<P: Payload> = RedisQueue<P>;

    async fn make<P: Payload>(&self) -> RedisQueue<P> {
        let name = unique_name("redis");
        self.names.lock().unwrap().push(name.clone());
        RedisQueue::connect(&self.url, &name)
            .await
            .expect("connect to Redis")
    }

    async fn cleanup(&self) {
        let names = self.names.lock().unwrap().clone();
        support::queue::delete_redis_keys(&self.url, &names).await;
    }
}

fn redis() -> Redis {
    Redis {
        url: backend_url("EVENTSINK_REDIS_URL"),
        names: Mutex::new(Vec::new()),
    }
}

queue_tests!(
    redis(),
    unless eventsink_redis: "set EVENTSINK_REDIS_URL to run against Redis"
);

/// apalis-redis moves every due job from its scheduled set to the active
/// list in one Lua `unpack`, which fails above about 8,000 items: a backlog
/// published while no worker ran must still be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn a_backlog_larger_than_lua_unpack_is_delivered() {
    use std::time::Duration;

    use eventsink::queue::ThroughTaskQueue;
    use eventsink::{Event, RecordingSink, SinkExt};
    use tower::Layer;

    const BACKLOG: usize = 16 * 563;
    let backends = redis();
    let queue: RedisQueue = backends.make().await;
    let recorder = RecordingSink::new();
    let sink = ThroughTaskQueue::new(queue).layer(recorder.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..16 {
        let mut sink = sink.clone();
        tasks.spawn(async move {
            for n in 0..BACKLOG / 16 {
                let event = Event::new("test.backlog", serde_json::json!([p, n]));
                sink.publish(event).await.expect("publish");
            }
        });
    }
    tasks.join_all().await;
    let worker = sink
        .worker()
        .poll_interval(Duration::from_millis(10))
        .spawn();
    let got = recorder.wait_for(BACKLOG, Duration::from_secs(60)).await;
    worker.shutdown().await;
    backends.cleanup().await;
    assert_eq!(got.expect("the whole backlog delivered").len(), BACKLOG);
}

/// As `queue_pressure::a_busy_worker_keeps_its_lease_while_fetched_jobs_wait`
/// on Redis: worker `a` delivers one job at a time and has fetched three,
/// so apalis sends no heartbeat while its one delivery runs; worker `b`, on
/// another connection, must not take over `a`'s jobs meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn a_busy_worker_keeps_its_lease_while_fetched_jobs_wait() {
    use std::sync::Arc;
    use std::time::Duration;

    use eventsink::Event;
    use eventsink::queue::{QueueWorker, ThroughTaskQueue};
    use tokio::sync::{Semaphore, mpsc};
    use tower::{Layer, Service, ServiceExt};

    const HEARTBEAT: Duration = Duration::from_secs(1);
    const BEATS: usize = 3;
    const EVENTS: usize = 3;
    let _watchdog = support::Watchdog::new(Duration::from_secs(120), "busy-lease test hung");
    let url = backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("busy");
    let open = || async {
        RedisQueue::builder(&name)
            .lease(HEARTBEAT, BEATS)
            .connect(&url)
            .await
            .expect("connect")
    };
    let (queue_a, queue_b): (RedisQueue, RedisQueue) = (open().await, open().await);
    let config = apalis_redis::Config::default().queue(&*name);
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
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
        let event = Event::new("test.busy", serde_json::json!(n));
        publisher.call(event).await.expect("publish");
    }
    let a = QueueWorker::new(queue_a.clone(), slow)
        .concurrency(1)
        .fetch_batch(EVENTS)
        .attempt_timeout(Duration::from_secs(60))
        .spawn();
    let (who, first) = started.recv().await.expect("a delivers");
    assert_eq!(who, "a");
    let workers: Vec<String> = redis::cmd("ZRANGE")
        .arg(config.workers_set())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("workers");
    let [a_name] = &workers[..] else {
        panic!("one worker: {workers:?}")
    };
    let held: usize = redis::cmd("SCARD")
        .arg(format!("{}:{a_name}", config.inflight_jobs_set()))
        .query_async(&mut conn)
        .await
        .expect("in flight");
    assert_eq!(held, EVENTS, "a fetched every job");
    let b = QueueWorker::new(queue_b.clone(), quick)
        .poll_interval(Duration::from_millis(50))
        .spawn();
    // Until b has sent heartbeats past the moment a's lease would have
    // lapsed without one from a (each of b's takes over the jobs of workers
    // silent for the lease), and then one more.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let past_lease = now + (HEARTBEAT * (BEATS as u32 + 2)).as_secs_f64();
    loop {
        if let Ok((who, id)) = started.try_recv() {
            panic!("worker {who} started delivering {id} while worker a held it");
        }
        let scores: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(config.workers_set())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .expect("workers");
        let b_seen = scores.iter().find(|(w, _)| w != a_name).map(|(_, s)| *s);
        if b_seen.is_some_and(|seen| seen >= past_lease) {
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
    let unique: std::collections::HashSet<_> = delivered.iter().collect();
    assert_eq!(unique.len(), EVENTS, "each event once: {delivered:?}");
    assert!(started.try_recv().is_err(), "no event delivered again");
    support::queue::delete_redis_keys(&url, &[name]).await;
}
