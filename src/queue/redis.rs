//! [`RedisQueue`]: a queue in Redis, for many workers that already share a
//! Redis.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::backend::Vacuum;
use apalis_core::backend::ext::BackendExt;
use apalis_core::backend::ext::poll_strategy::Strategy;
use apalis_core::error::WorkerError;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_redis::{Config, RedisStorage};
use futures::future::BoxFuture;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::backend::{LocalWake, ops::Ops, push_error, push_tasks};
use super::dead_letter::{DeadLetter, DeadLetters};
use super::error::QueueError;
use super::worker::{DEFAULT_RETENTION, Deliver, RunOptions};
use super::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MISSED_HEARTBEATS, QueuedEvent};
use crate::BoxError;

/// How long a Redis command may take before it fails. 10 s: redis-rs'
/// default of 500 ms turns a busy moment into a worker failure (apalis-redis
/// #76); 10 s still notices a dead server.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Puts the jobs a stopped worker still holds back on the active list (as
/// apalis' orphan recovery does, without waiting for the lease).
const RELEASE_WORKER: &str = r#"
local inflight = KEYS[4] .. ":" .. ARGV[1]
local jobs = redis.call("smembers", inflight)
if #jobs > 0 then
    redis.call("rpush", KEYS[2], unpack(jobs))
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
redis.call("del", inflight)
redis.call("zrem", KEYS[1], ARGV[1])
return #jobs
"#;

/// Moves up to `ARGV[2]` due jobs from the scheduled set to the active list,
/// as apalis' fetch does, but in bounded chunks: apalis moves all of them
/// with one Lua `unpack`, which fails above about 8,000 items, and then
/// every fetch fails and the queue is stuck.
const PROMOTE_DUE: &str = r#"
local ids = redis.call("zrangebyscore", KEYS[1], 0, ARGV[1], "LIMIT", 0, tonumber(ARGV[2]))
if #ids > 0 then
    redis.call("rpush", KEYS[2], unpack(ids))
    redis.call("zrem", KEYS[1], unpack(ids))
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
return #ids
"#;

/// Jobs moved per `PROMOTE_DUE` call: well under Lua's `unpack` limit.
const PROMOTE_CHUNK: u64 = 1_000;

/// Before a worker starts: moves every due job to the active list, in
/// chunks, so that apalis' own promotion never meets a backlog it cannot
/// unpack (a backlog builds up while no worker runs).
async fn promote_due_jobs(mut conn: ConnectionManager, config: Config) -> Result<(), BoxError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let script = redis::Script::new(PROMOTE_DUE);
    loop {
        let moved: u64 = script
            .key(config.scheduled_jobs_set())
            .key(config.active_jobs_list())
            .key(config.signal_list())
            .arg(now)
            .arg(PROMOTE_CHUNK)
            .invoke_async(&mut conn)
            .await?;
        if moved < PROMOTE_CHUNK {
            return Ok(());
        }
    }
}

/// How long connecting may take. 5 s, for a server on the same network.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A queue in Redis (feature `redis`), on its own connection manager with a
/// [`REDIS_RESPONSE_TIMEOUT`] well above redis-rs' 500 ms.
///
/// Dead letters are kept in the hash `eventsink:{queue}:dead` (with the
/// sorted set `eventsink:{queue}:dead:order` for paging). Idempotency keys
/// live as long as the worker's retention ([`DEFAULT_RETENTION`]), and the
/// worker's retention removes completed jobs. Redis loses what it holds in
/// memory on a restart unless it persists (AOF, `appendfsync always` for no
/// loss at all). A worker that dies leaves its jobs to others after
/// `heartbeat × missed` ([`lease`](RedisQueueBuilder::lease), 15 s by
/// default).
///
/// ```no_run
/// use eventsink::queue::{RedisQueue, ThroughTaskQueue};
/// use eventsink::{Event, NoopSink, SinkExt};
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let queue = RedisQueue::connect("redis://127.0.0.1:6379/", "webhooks").await?;
/// let mut sink = ThroughTaskQueue::new(queue).layer(NoopSink::new());
/// let worker = sink.worker().spawn();
/// sink.publish(Event::new("ping", serde_json::json!(1))).await?;
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct RedisQueue<P = serde_json::Value> {
    name: Arc<str>,
    wake: LocalWake,
    conn: ConnectionManager,
    storage: RedisStorage<QueuedEvent<P>>,
    config: Config,
}

impl<P> Clone for RedisQueue<P> {
    fn clone(&self) -> Self {
        RedisQueue {
            name: Arc::clone(&self.name),
            wake: self.wake.clone(),
            conn: self.conn.clone(),
            storage: self.storage.clone(),
            config: self.config.clone(),
        }
    }
}

impl<P> fmt::Debug for RedisQueue<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`RedisQueue`] before it connects. Its `Debug` does not
/// show the URL (it may hold a password).
///
/// ```no_run
/// use std::time::Duration;
/// use eventsink::queue::RedisQueue;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
/// let queue: RedisQueue = RedisQueue::builder("redis://127.0.0.1/", "webhooks")
///     .lease(Duration::from_secs(2), 3)
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisQueueBuilder {
    url: String,
    name: Arc<str>,
    response_timeout: Duration,
    heartbeat: Duration,
    missed: usize,
    dedup_for: Duration,
}

impl fmt::Debug for RedisQueueBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueueBuilder")
            .field("url", &"<redacted>")
            .field("name", &self.name)
            .field("response_timeout", &self.response_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("missed", &self.missed)
            .field("dedup_for", &self.dedup_for)
            .finish()
    }
}

impl RedisQueueBuilder {
    /// How long a command may take ([`REDIS_RESPONSE_TIMEOUT`]).
    ///
    /// ```
    /// # let b = eventsink::queue::RedisQueue::builder("redis://127.0.0.1/", "q");
    /// let b = b.response_timeout(std::time::Duration::from_secs(30));
    /// ```
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Worker heartbeat and how many may be missed before another worker
    /// takes over the jobs of a dead one ([`DEFAULT_HEARTBEAT_INTERVAL`] ×
    /// [`DEFAULT_MISSED_HEARTBEATS`]).
    ///
    /// ```
    /// # let b = eventsink::queue::RedisQueue::builder("redis://127.0.0.1/", "q");
    /// let b = b.lease(std::time::Duration::from_secs(1), 2); // takeover after ~2 s
    /// ```
    pub fn lease(mut self, heartbeat: Duration, missed: usize) -> Self {
        self.heartbeat = heartbeat;
        self.missed = missed.max(1);
        self
    }

    /// How long an idempotency key is remembered ([`DEFAULT_RETENTION`]):
    /// publishing the same event again within this time stores nothing.
    /// Whole seconds, at least one.
    ///
    /// ```
    /// # let b = eventsink::queue::RedisQueue::builder("redis://127.0.0.1/", "q");
    /// let b = b.dedup_for(std::time::Duration::from_secs(3600));
    /// ```
    pub fn dedup_for(mut self, ttl: Duration) -> Self {
        self.dedup_for = ttl.max(Duration::from_secs(1));
        self
    }

    /// Connects.
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the URL is invalid or Redis cannot be
    /// reached.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::RedisQueue =
    ///     eventsink::queue::RedisQueue::builder("redis://127.0.0.1/", "q").connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<P>(self) -> Result<RedisQueue<P>, QueueError> {
        let name = self.name;
        let fail = |e: redis::RedisError| QueueError::backend(&name, "connecting to Redis", e);
        let client = redis::Client::open(self.url.as_str()).map_err(fail)?;
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT));
        let conn = client
            .get_connection_manager_with_config(manager)
            .await
            .map_err(fail)?;
        let config = Config::default()
            .queue(&*name)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed)
            // Without a TTL apalis-redis 1.0 expires each key at once
            // (`EXPIRE key 0`): no deduplication at all.
            .idempotency_ttl(Some(self.dedup_for));
        let storage = RedisStorage::new(conn.clone()).with_config(config.clone());
        Ok(RedisQueue {
            name,
            wake: LocalWake::new(),
            conn,
            storage,
            config,
        })
    }
}

impl RedisQueue {
    /// Settings for the queue `name` in the Redis at `url`.
    ///
    /// ```
    /// let builder = eventsink::queue::RedisQueue::builder("redis://127.0.0.1/", "webhooks");
    /// # let _ = builder;
    /// ```
    pub fn builder(url: &str, name: &str) -> RedisQueueBuilder {
        RedisQueueBuilder {
            url: url.to_owned(),
            name: name.into(),
            response_timeout: REDIS_RESPONSE_TIMEOUT,
            heartbeat: DEFAULT_HEARTBEAT_INTERVAL,
            missed: DEFAULT_MISSED_HEARTBEATS,
            dedup_for: DEFAULT_RETENTION,
        }
    }
}

impl<P> RedisQueue<P> {
    /// Connects to `url` and opens the queue `name`, with the defaults of
    /// [`builder`](RedisQueue::builder).
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the URL is invalid or Redis cannot be
    /// reached.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::RedisQueue =
    ///     eventsink::queue::RedisQueue::connect("redis://127.0.0.1/", "q").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str, name: &str) -> Result<Self, QueueError> {
        RedisQueue::builder(url, name).connect().await
    }

    /// The queue's name.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::RedisQueue = eventsink::queue::RedisQueue::connect("redis://127.0.0.1/", "q").await?;
    /// assert_eq!(queue.name(), "q");
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's dead letters.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::RedisQueue = eventsink::queue::RedisQueue::connect("redis://127.0.0.1/", "q").await?;
    /// println!("{} dead", queue.dead_letters().count().await?);
    /// # Ok(()) }
    /// ```
    pub fn dead_letters(&self) -> DeadLetters<Self, P>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        DeadLetters::new(self.clone())
    }

    fn keys(&self) -> (String, String) {
        let hash = format!("eventsink:{}:dead", self.name);
        let order = format!("{hash}:order");
        (hash, order)
    }

    fn parts(
        &self,
        action: &'static str,
    ) -> (
        ConnectionManager,
        Arc<str>,
        impl Fn(redis::RedisError) -> QueueError + use<P>,
    ) {
        let name = Arc::clone(&self.name);
        let fail_name = Arc::clone(&self.name);
        (self.conn.clone(), name, move |e| {
            QueueError::backend(&fail_name, action, e)
        })
    }
}

fn decode<P: DeserializeOwned>(name: &Arc<str>, json: &str) -> Result<DeadLetter<P>, QueueError> {
    serde_json::from_str(json).map_err(|e| QueueError::backend(name, "reading a dead letter", e))
}

impl<P> Ops<P> for RedisQueue<P>
where
    P: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn queue_name(&self) -> &str {
        &self.name
    }

    fn push(
        &self,
        jobs: Vec<(QueuedEvent<P>, Duration)>,
    ) -> BoxFuture<'static, Result<(), QueueError>> {
        let (storage, name, wake) = (
            self.storage.clone(),
            Arc::clone(&self.name),
            self.wake.clone(),
        );
        let due_now = jobs.iter().any(|(_, delay)| delay.is_zero());
        Box::pin(async move {
            push_tasks(&storage, jobs)
                .await
                .map_err(|e| push_error(&name, e))?;
            if due_now {
                wake.notify();
            }
            Ok(())
        })
    }

    fn parallel_batches(&self) -> usize {
        // Redis pipelines the scripts of concurrent batches on one
        // connection; more batches in flight keep it busy.
        16
    }

    fn bury(&self, letter: DeadLetter<P>) -> BoxFuture<'static, Result<(), QueueError>> {
        let (mut conn, name, fail) = self.parts("storing a dead letter");
        let (hash, order) = self.keys();
        Box::pin(async move {
            let json = serde_json::to_string(&letter)
                .map_err(|e| QueueError::backend(&name, "encoding a dead letter", e))?;
            let id = letter.event.id.to_string();
            redis::pipe()
                .atomic()
                .hset(&hash, &id, json)
                .ignore()
                .zadd(&order, &id, letter.failed_at.timestamp_micros())
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(fail)
        })
    }

    fn dead_page(
        &self,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter<P>>, QueueError>> {
        let (mut conn, name, fail) = self.parts("listing dead letters");
        let (hash, order) = self.keys();
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let start = isize::try_from(offset).unwrap_or(isize::MAX);
            let stop = isize::try_from(offset.saturating_add(limit - 1)).unwrap_or(isize::MAX);
            let ids: Vec<String> = conn.zrange(&order, start, stop).await.map_err(&fail)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let letters: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(&hash)
                .arg(&ids)
                .query_async(&mut conn)
                .await
                .map_err(&fail)?;
            letters
                .iter()
                .flatten()
                .map(|json| decode(&name, json))
                .collect()
        })
    }

    fn dead_get(&self, id: &str) -> BoxFuture<'static, Result<Option<DeadLetter<P>>, QueueError>> {
        let (mut conn, name, fail) = self.parts("reading a dead letter");
        let (hash, _) = self.keys();
        let id = id.to_owned();
        Box::pin(async move {
            let json: Option<String> = conn.hget(&hash, &id).await.map_err(fail)?;
            json.map(|json| decode(&name, &json)).transpose()
        })
    }

    fn dead_remove(&self, id: &str) -> BoxFuture<'static, Result<bool, QueueError>> {
        let (mut conn, _, fail) = self.parts("removing a dead letter");
        let (hash, order) = self.keys();
        let id = id.to_owned();
        Box::pin(async move {
            let (removed, _): (u64, u64) = redis::pipe()
                .atomic()
                .hdel(&hash, &id)
                .zrem(&order, &id)
                .query_async(&mut conn)
                .await
                .map_err(fail)?;
            Ok(removed > 0)
        })
    }

    fn dead_purge(&self) -> BoxFuture<'static, Result<u64, QueueError>> {
        let (mut conn, _, fail) = self.parts("purging dead letters");
        let (hash, order) = self.keys();
        Box::pin(async move {
            let (count, _, _): (u64, u64, u64) = redis::pipe()
                .atomic()
                .hlen(&hash)
                .del(&hash)
                .del(&order)
                .query_async(&mut conn)
                .await
                .map_err(fail)?;
            Ok(count)
        })
    }

    fn dead_count(&self) -> BoxFuture<'static, Result<u64, QueueError>> {
        let (mut conn, _, fail) = self.parts("counting dead letters");
        let (hash, _) = self.keys();
        Box::pin(async move { conn.hlen(&hash).await.map_err(fail) })
    }

    fn delete_completed(&self, age: Duration) -> BoxFuture<'static, Result<u64, QueueError>> {
        let (mut storage, name) = (self.storage.clone(), Arc::clone(&self.name));
        Box::pin(async move {
            storage
                .vacuum_before(age)
                .await
                .map(|n| n as u64)
                .map_err(|e| QueueError::backend(&name, "removing completed jobs", e))
        })
    }

    fn release_worker(&self, name: &str) -> BoxFuture<'static, Result<(), QueueError>> {
        let (mut conn, _, fail) = self.parts("releasing a stopped worker's jobs");
        let config = self.config.clone();
        let name = name.to_owned();
        Box::pin(async move {
            redis::Script::new(RELEASE_WORKER)
                .key(config.workers_set())
                .key(config.active_jobs_list())
                .key(config.signal_list())
                .key(config.inflight_jobs_set())
                .arg(&name)
                .invoke_async::<u64>(&mut conn)
                .await
                .map_err(fail)?;
            Ok(())
        })
    }

    fn run_worker(
        &self,
        name: String,
        deliver: Deliver<P, Self>,
        options: &RunOptions,
        stop: BoxFuture<'static, ()>,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let config = self.config.clone().batch_size(options.concurrency.max(10));
        let promote = promote_due_jobs(self.conn.clone(), config.clone());
        let storage = self.storage.clone().with_config(config).poll_with_strategy(
            Strategy::new()
                .stream(self.wake.stream())
                .interval(options.poll_interval),
        );
        let worker = WorkerBuilder::new(name)
            .backend(storage)
            .concurrency(options.concurrency)
            .build(deliver);
        Box::pin(async move {
            promote.await?;
            worker
                .run_until(async move {
                    stop.await;
                    Ok::<(), WorkerError>(())
                })
                .await
                .map_err(Into::into)
        })
    }
}
