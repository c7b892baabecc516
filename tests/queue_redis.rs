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

/// `support::lease::busy_worker_keeps_its_lease` on Redis, two
/// connections, with a 3 s lease (1 s heartbeat × 3), far shorter than a's
/// delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn a_busy_worker_keeps_its_lease_while_fetched_jobs_wait() {
    use futures::FutureExt;
    use std::time::Duration;

    let url = backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("busy");
    let open = || async {
        RedisQueue::builder(&name)
            .lease(Duration::from_secs(1), 3)
            .connect(&url)
            .await
            .expect("connect")
    };
    let (queue_a, queue_b): (RedisQueue, RedisQueue) = (open().await, open().await);
    let config = apalis_redis::Config::default().queue(&*name);
    let conn = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let (workers, inflight) = (config.workers_set(), config.inflight_jobs_set());
    // Each worker, its last heartbeat, and how many jobs it holds.
    let read = move || {
        let (mut conn, workers, inflight) = (conn.clone(), workers.clone(), inflight.clone());
        async move {
            let scores: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(&workers)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .expect("workers");
            let mut each = Vec::new();
            for (worker, seen) in scores {
                let held: usize = redis::cmd("SCARD")
                    .arg(format!("{inflight}:{worker}"))
                    .query_async(&mut conn)
                    .await
                    .expect("in flight");
                each.push((seen, held));
            }
            each
        }
    };
    let held = {
        let read = read.clone();
        move || {
            let read = read();
            async move { read.await.iter().map(|(_, held)| held).sum() }.boxed()
        }
    };
    let idle_seen = move || {
        let read = read();
        async move {
            read.await
                .into_iter()
                .filter(|(_, held)| *held == 0)
                .map(|(seen, _)| seen)
                .reduce(f64::max)
        }
        .boxed()
    };
    let probe = support::lease::Probe {
        held: Box::new(held),
        idle_seen: Box::new(idle_seen),
    };
    support::lease::busy_worker_keeps_its_lease(queue_a, queue_b, Duration::from_secs(1), 3, probe)
        .await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}
