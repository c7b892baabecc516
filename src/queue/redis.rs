//! [`RedisQueue`]: a queue in Redis, for many workers that already share a
//! Redis.

use std::sync::Arc;
use std::time::Duration;

use apalis_redis::{Config, RedisStorage};
use futures::future::BoxFuture;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Published;
use super::backend::ops::{Answer, DeadPage, Jobs, Ops, Payload, Place, Store, WorkerRun};
use super::backend::{
    ABANDONED_PAGE, APALIS_MAX_ATTEMPTS, BuryJson, Fetched, LocalWake, Tolerant, Wakes,
    abandoned_letter, current_second, due_second, encode_job, lease_setter, polled, queue_handle,
    run_apalis, undecodable_letter,
};
use super::error::QueueError;
use super::job::DeadLetter;
use super::job::QueuedEvent;
use super::stats::QueueStats;
use super::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MISSED_HEARTBEATS};
use crate::BoxError;

/// How long a Redis command may take before it fails. 10 s: redis-rs'
/// default of 500 ms turns a busy moment into a worker failure (apalis-redis
/// #76); 10 s still notices a dead server.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A Lua function the scripts that make jobs due begin with: appends the
/// job ids `ids` to the active list `KEYS[2]`, signals the workers
/// (`KEYS[3]`), as apalis' push does, and announces them, once per call, on
/// the queue's wake channel (see [`wake_channel`]), where idle workers of
/// every process listen.
macro_rules! lua_activate {
    () => {
        r#"
local function activate(ids)
    if #ids > 0 then
        redis.call("rpush", KEYS[2], unpack(ids))
        redis.call("del", KEYS[3])
        redis.call("lpush", KEYS[3], 1)
        redis.call("publish", "tasks:" .. KEYS[2] .. ":available", #ids)
    end
end
"#
    };
}

/// The channel on which the scripts announce jobs made due now (in the
/// same script that stores or moves them), and idle workers listen:
/// apalis-redis' own (`tasks:<active list>:available`), so that apalis'
/// shared storage listens to ours, and ours to its push.
fn wake_channel(config: &Config) -> String {
    format!("tasks:{}:available", config.active_jobs_list())
}

/// First wait before subscribing again after the wake channel's
/// subscription failed or dropped; doubles up to [`MAX_RESUBSCRIBE_BACKOFF`].
/// Meanwhile the worker still polls.
const MIN_RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait between attempts to subscribe again. 5 s: a worker found
/// without its wake-ups polls about once a second meanwhile, and Redis
/// coming back should not wait longer than a heartbeat.
const MAX_RESUBSCRIBE_BACKOFF: Duration = Duration::from_secs(5);

/// Wakes `wake` at each announcement on the queue's wake `channel`, from
/// any process, on a connection of its own: subscribes, and whenever the
/// subscription fails or its connection drops, subscribes again (with
/// backoff). It wakes once after each subscription, since announcements
/// made without one were missed. Never returns: it is aborted with the
/// worker run's [`Wakes`]. Polling stays the safety net throughout.
async fn listen(
    client: redis::Client,
    channel: String,
    wake: LocalWake,
    queue: Arc<str>,
) -> std::convert::Infallible {
    use futures::StreamExt as _;
    let backoff = crate::Backoff::new()
        .min(MIN_RESUBSCRIBE_BACKOFF)
        .max(MAX_RESUBSCRIBE_BACKOFF)
        .jitter(0.0);
    let mut failures = 0;
    loop {
        match tokio::time::timeout(CONNECTION_TIMEOUT, subscribe(&client, &channel)).await {
            Ok(Ok(mut announced)) => {
                failures = 0;
                wake.notify();
                while announced.next().await.is_some() {
                    wake.notify();
                }
                tracing::warn!(
                    %queue,
                    "lost the Redis subscription that wakes idle workers; polling until it is back"
                );
            }
            Ok(Err(error)) => tracing::warn!(
                %queue, %error,
                "could not subscribe to the Redis channel that wakes idle workers; polling meanwhile"
            ),
            Err(_) => tracing::warn!(
                %queue,
                "subscribing to the Redis channel that wakes idle workers timed out; polling meanwhile"
            ),
        }
        tokio::time::sleep(backoff.step(failures)).await;
        failures = failures.saturating_add(1);
    }
}

/// A subscription to `channel` on a new connection: its messages.
async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> Result<redis::aio::PubSubStream, redis::RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub.into_on_message())
}

/// Ends stopped worker `ARGV[1]`'s hold on its jobs: those among
/// `ARGV[3..]` (whose outcome it recorded) are marked done at `ARGV[2]`
/// (done set `KEYS[5]`, meta prefix `KEYS[6]`), as apalis' acknowledgement
/// does; the others go back on the active list, as apalis' orphan recovery
/// does, without waiting for the lease.
const RELEASE_WORKER: &str = concat!(
    lua_activate!(),
    r#"
local inflight = KEYS[4] .. ":" .. ARGV[1]
for i = 3, #ARGV do
    if redis.call("srem", inflight, ARGV[i]) == 1 then
        redis.call("sadd", KEYS[5], ARGV[i])
        redis.call("hset", KEYS[6] .. ":" .. ARGV[i], "status", "Done", "done_at", ARGV[2])
    end
end
local jobs = redis.call("smembers", inflight)
activate(jobs)
redis.call("del", inflight)
redis.call("zrem", KEYS[1], ARGV[1])
return #jobs
"#
);

/// Moves up to `ARGV[2]` due jobs from the scheduled set to the active list,
/// as apalis' fetch does, but in bounded chunks: apalis moves all of them
/// with one Lua `unpack`, which fails above about 8,000 items, and then
/// every fetch fails and the queue is stuck.
const PROMOTE_DUE: &str = concat!(
    lua_activate!(),
    r#"
local ids = redis.call("zrangebyscore", KEYS[1], 0, ARGV[1], "LIMIT", 0, tonumber(ARGV[2]))
if #ids > 0 then
    redis.call("zrem", KEYS[1], unpack(ids))
end
activate(ids)
return #ids
"#
);

/// Removes dead letter `ARGV[1]` from the hash `KEYS[1]` and the order
/// `KEYS[2]` only if it is still the one of chain `ARGV[2]` that failed at
/// `ARGV[3]` (its score, Unix microseconds): compare and delete.
const REMOVE_LETTER: &str = r#"
local json = redis.call("hget", KEYS[1], ARGV[1])
if not json or (cjson.decode(json).chain or "") ~= ARGV[2]
    or tonumber(redis.call("zscore", KEYS[2], ARGV[1])) ~= tonumber(ARGV[3]) then
    return 0
end
redis.call("hdel", KEYS[1], ARGV[1])
redis.call("zrem", KEYS[2], ARGV[1])
return 1
"#;

/// Removes the jobs among `ARGV[2..]` (ids from the done set `KEYS[1]`)
/// whose outcome was recorded (`Done`) at or before `ARGV[1]` (Unix
/// seconds): their data (`KEYS[2]`), result and meta hash (prefix
/// `KEYS[3]`) and done-set entry. Ids whose meta hash is gone leave the
/// done set; any other status is left alone. (apalis' own vacuum also
/// removes `Failed` jobs, which it is still retrying, and never trims the
/// done set.)
const REMOVE_DONE: &str = r#"
local removed = 0
local cutoff = tonumber(ARGV[1])
for i = 2, #ARGV do
    local id = ARGV[i]
    local meta = KEYS[3] .. ":" .. id
    local status = redis.call("hget", meta, "status")
    if not status then
        redis.call("srem", KEYS[1], id)
    elseif status == "Done" and (tonumber(redis.call("hget", meta, "done_at")) or cutoff + 1) <= cutoff then
        redis.call("hdel", KEYS[2], id)
        redis.call("hdel", KEYS[3] .. ":result", id)
        redis.call("del", meta)
        redis.call("srem", KEYS[1], id)
        removed = removed + 1
    end
end
return removed
"#;

/// Buries job `ARGV[1]` of apalis' dead set `KEYS[1]`: if it is still
/// there, it leaves the set, its letter `ARGV[4]` (key `ARGV[3]`, failure
/// time `ARGV[5]`) goes into the letters' hash `KEYS[4]` and order
/// `KEYS[5]`, and the job is marked done (`KEYS[3]`, `KEYS[2]`) at
/// `ARGV[2]`. Without a letter (its data `KEYS[6]` is gone), the id only
/// leaves the dead set, so a job stored later under it is not buried.
const BURY_ABANDONED: &str = r#"
if redis.call("srem", KEYS[1], ARGV[1]) == 0 then
    return 0
end
if not ARGV[3] then
    if redis.call("hexists", KEYS[6], ARGV[1]) == 1 then
        redis.call("sadd", KEYS[1], ARGV[1])
    end
    return 0
end
redis.call("hset", KEYS[4], ARGV[3], ARGV[4])
redis.call("zadd", KEYS[5], ARGV[5], ARGV[3])
redis.call("sadd", KEYS[2], ARGV[1])
redis.call("hset", KEYS[3], "status", "Done", "done_at", ARGV[2])
return 1
"#;

/// The queue's stats at Unix second `ARGV[1]`: the active list `KEYS[1]`
/// and the due part of the scheduled set `KEYS[2]` are pending, the rest
/// of that set scheduled; running are the in-flight sets (prefix `KEYS[4]`)
/// of the workers registered in `KEYS[3]`; dead the letters' hash
/// `KEYS[5]`. Then the oldest due score in the scheduled set, and the data
/// (hash `KEYS[6]`) of the job at the head of the active list.
const STATS: &str = r#"
local pending = redis.call("llen", KEYS[1])
local due = redis.call("zcount", KEYS[2], "-inf", ARGV[1])
local later = redis.call("zcount", KEYS[2], "(" .. ARGV[1], "+inf")
local running = 0
for _, worker in ipairs(redis.call("zrange", KEYS[3], 0, -1)) do
    running = running + redis.call("scard", KEYS[4] .. ":" .. worker)
end
local dead = redis.call("hlen", KEYS[5])
local oldest = redis.call("zrangebyscore", KEYS[2], "-inf", ARGV[1], "WITHSCORES", "LIMIT", 0, 1)
local head = redis.call("lindex", KEYS[1], 0)
local head_job = false
if head then
    head_job = redis.call("hget", KEYS[6], head)
end
return {pending + due, later, running, dead, oldest[2] or false, head_job}
"#;

/// The part of a stored job that [`STATS`] needs: when its event was
/// created.
#[derive(serde::Deserialize)]
struct HeadJob {
    event: HeadEvent,
}

#[derive(serde::Deserialize)]
struct HeadEvent {
    created_at: chrono::DateTime<chrono::Utc>,
}

/// Jobs moved per `PROMOTE_DUE` or `PUSH_JOBS` call: well under Lua's
/// `unpack` limit (about 8,000).
const LUA_CHUNK: usize = 1_000;

/// Stores jobs the way apalis-redis 1.0's own push does (data hash, a meta
/// hash per job, the active list or the scheduled set, the signal list), in
/// one call for the whole batch. The job id is derived from the idempotency
/// key, so the data hash's `HSETNX` is the duplicate check: no separate
/// idempotency key per job. That is about half of Redis' work per job
/// compared to apalis' script (which also decodes metadata JSON and
/// publishes an event per job), and Redis' CPU is what limits publishing.
///
/// `ARGV`: `max_attempts`, then per job: id, data, due second (0 = now),
/// idempotency key. Returns how many jobs are due now, and one character
/// per job: `1` stored, `0` already there.
const PUSH_JOBS: &str = concat!(
    lua_activate!(),
    r#"
local now = {}
local stored = {}
for i = 2, #ARGV, 4 do
    local id = ARGV[i]
    local new = redis.call("hsetnx", KEYS[1], id, ARGV[i + 1])
    stored[#stored + 1] = new
    if new == 1 then
        redis.call("hset", KEYS[4] .. ":" .. id, "attempts", 0, "max_attempts", ARGV[1],
            "status", "Pending", "idempotency_key", ARGV[i + 3])
        local due = tonumber(ARGV[i + 2])
        if due > 0 then
            redis.call("zadd", KEYS[5], due, id)
        else
            now[#now + 1] = id
        end
    end
end
activate(now)
return {#now, table.concat(stored)}
"#
);

/// The apalis job id of an idempotency key: a UUID (version 8) made of the
/// key's SHA-256, so the same key always gives the same id, and a short one.
fn job_id(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// Stores `jobs` with [`PUSH_JOBS`], [`LUA_CHUNK`] at a time; how many are
/// due now, and each job's outcome.
async fn push_jobs<P: Serialize>(
    mut conn: ConnectionManager,
    config: &Config,
    name: &Arc<str>,
    jobs: &[(QueuedEvent<P>, Duration)],
) -> Result<(usize, Vec<Published>), QueueError> {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(PUSH_JOBS));
    let mut due_now = 0;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(LUA_CHUNK) {
        let mut call = SCRIPT.prepare_invoke();
        call.key(config.job_data_hash())
            .key(config.active_jobs_list())
            .key(config.signal_list())
            .key(config.job_meta_hash())
            .key(config.scheduled_jobs_set())
            .arg(APALIS_MAX_ATTEMPTS);
        for (job, delay) in chunk {
            let data = encode_job(name, job)?;
            let key = job.idempotency_key();
            let due = if delay.is_zero() {
                0
            } else {
                due_second(*delay)
            };
            call.arg(job_id(&key)).arg(data).arg(due).arg(key);
        }
        let (now, stored) = call
            .invoke_async::<(usize, String)>(&mut conn)
            .await
            .map_err(|e| QueueError::backend(name, "pushing jobs", e))?;
        due_now += now;
        outcomes.extend(stored.bytes().map(|b| match b {
            b'1' => Published::Stored,
            _ => Published::AlreadyQueued,
        }));
    }
    Ok((due_now, outcomes))
}

/// Before a worker starts: moves every due job to the active list, in
/// chunks, so that apalis' own promotion never meets a backlog it cannot
/// unpack (a backlog builds up while no worker runs).
async fn promote_due_jobs(mut conn: ConnectionManager, config: Config) -> Result<(), BoxError> {
    let now = current_second();
    let script = redis::Script::new(PROMOTE_DUE);
    loop {
        let moved: u64 = script
            .key(config.scheduled_jobs_set())
            .key(config.active_jobs_list())
            .key(config.signal_list())
            .arg(now)
            .arg(LUA_CHUNK)
            .invoke_async(&mut conn)
            .await?;
        if moved < LUA_CHUNK as u64 {
            return Ok(());
        }
    }
}

/// One step of `SSCAN` over the set `key` from `cursor`, asking for about
/// `count` members: the next cursor (0 at the end) and the members.
async fn sscan(
    conn: &mut ConnectionManager,
    key: &str,
    cursor: u64,
    count: usize,
) -> Result<(u64, Vec<String>), redis::RedisError> {
    redis::cmd("SSCAN")
        .arg(key)
        .arg(cursor)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
}

/// Walks the done set with `SSCAN` and removes, [`LUA_CHUNK`] ids per
/// script call, the jobs done at least `age` ago.
async fn remove_done(
    mut conn: ConnectionManager,
    config: &Config,
    age: Duration,
) -> Result<u64, redis::RedisError> {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(REMOVE_DONE));
    let done = config.done_jobs_set();
    let cutoff = current_second().saturating_sub(age.as_secs());
    let (mut cursor, mut removed) = (0u64, 0u64);
    loop {
        let (next, ids) = sscan(&mut conn, &done, cursor, LUA_CHUNK).await?;
        if !ids.is_empty() {
            let mut call = SCRIPT.prepare_invoke();
            call.key(&done)
                .key(config.job_data_hash())
                .key(config.job_meta_hash())
                .arg(cutoff)
                .arg(ids);
            removed += call.invoke_async::<u64>(&mut conn).await?;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// How long connecting may take. 5 s, for a server on the same network.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A queue in Redis (feature `redis`), on its own connection manager with a
/// [`REDIS_RESPONSE_TIMEOUT`] well above redis-rs' 500 ms.
///
/// Dead letters are kept in the hash `eventsink:{queue}:dead` (with the
/// sorted set `eventsink:{queue}:dead:order` for paging). A job's id is
/// derived from its idempotency key, so a key is remembered as long as its
/// job: until the worker's retention
/// ([`DEFAULT_RETENTION`](super::DEFAULT_RETENTION)) removes the completed
/// job. Redis loses what it holds in memory on a restart unless it
/// persists (AOF, `appendfsync always` for no loss at all). A worker that dies leaves its jobs to others after
/// `heartbeat × missed` ([`lease`](RedisQueueBuilder::lease), 15 s by
/// default).
///
/// Publishing a job due now announces it on the channel
/// `tasks:<queue>:active:available` (apalis-redis' own), in the script that
/// stores it; each worker of a queue opened with
/// [`connect`](RedisQueueBuilder::connect) subscribes to it on a connection
/// of its own, so an idle worker in any process starts the job at once.
/// If the subscription drops, the worker subscribes again; meanwhile its
/// polling, which never stops, finds the jobs within about a second, as it
/// does for a worker of an [`attach`](RedisQueueBuilder::attach)ed queue.
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
    /// Where workers subscribe to the wake channel: the client
    /// [`connect`](RedisQueueBuilder::connect) opened (`None` when
    /// [`attach`](RedisQueueBuilder::attach)ed).
    subscriber: Option<redis::Client>,
    conn: ConnectionManager,
    storage: RedisStorage<QueuedEvent<P>>,
    config: Config,
}

queue_handle! {
    RedisQueue { name, wake, subscriber, conn, storage, config }, store(self), leased,
    " let queue: eventsink::queue::RedisQueue = eventsink::queue::RedisQueue::connect(\"redis://127.0.0.1/\", \"q\").await?;"
}

/// Settings of a [`RedisQueue`] before it [`connect`](RedisQueueBuilder::connect)s
/// to a URL or [`attach`](RedisQueueBuilder::attach)es to a connection.
///
/// ```no_run
/// use std::time::Duration;
/// use eventsink::queue::RedisQueue;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
/// let queue: RedisQueue = RedisQueue::builder("webhooks")
///     .lease(Duration::from_secs(2), 3)
///     .connect("redis://127.0.0.1/")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisQueueBuilder {
    name: Arc<str>,
    response_timeout: Duration,
    heartbeat: Duration,
    missed: usize,
}

impl RedisQueueBuilder {
    lease_setter!("eventsink::queue::RedisQueue::builder(\"q\")");

    /// How long a command may take on the connection that
    /// [`connect`](RedisQueueBuilder::connect) opens
    /// ([`REDIS_RESPONSE_TIMEOUT`]).
    ///
    /// ```
    /// # let b = eventsink::queue::RedisQueue::builder("q");
    /// let b = b.response_timeout(std::time::Duration::from_secs(30));
    /// ```
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Connects to the Redis at `url` on a connection manager of its own.
    ///
    /// # Errors
    ///
    /// [`QueueError::Misconfigured`] if the URL is invalid or Redis refuses
    /// the credentials or the database number; [`QueueError::Backend`] if
    /// Redis cannot be reached.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::RedisQueue =
    ///     eventsink::queue::RedisQueue::builder("q").connect("redis://127.0.0.1/").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<P>(self, url: &str) -> Result<RedisQueue<P>, QueueError> {
        let fail = |e: redis::RedisError| QueueError::backend(&self.name, "connecting to Redis", e);
        let client = redis::Client::open(url).map_err(fail)?;
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT));
        let conn = client
            .get_connection_manager_with_config(manager)
            .await
            .map_err(fail)?;
        let mut queue = self.attach(conn);
        queue.subscriber = Some(client);
        Ok(queue)
    }

    /// Uses `conn` (the application's, say) instead of connecting; its own
    /// response timeout applies, not
    /// [`response_timeout`](RedisQueueBuilder::response_timeout) (redis-rs'
    /// default of 500 ms turns a busy moment into a worker failure). With
    /// no URL to open a connection of their own, its workers do not
    /// subscribe to announcements of new jobs: they find jobs published by
    /// other processes by polling (within about a second), those published
    /// through this queue at once.
    ///
    /// ```no_run
    /// # fn f(conn: redis::aio::ConnectionManager) {
    /// let queue: eventsink::queue::RedisQueue = eventsink::queue::RedisQueue::builder("q").attach(conn);
    /// # }
    /// ```
    pub fn attach<P>(self, conn: ConnectionManager) -> RedisQueue<P> {
        // No task locks: apalis' lock script (`acquire_leases.lua`) runs
        // `LREM` on the whole active list for every job it starts, though
        // the fetch already took the job off that list, so draining a
        // backlog of N jobs cost O(N²) (50,000 queued jobs drained 5× slower
        // per job than 5,000). The lock only writes `Running` into the
        // job's meta hash, which nothing reads; the fetch's in-flight set
        // is the lease that orphan recovery and acknowledgements use.
        let config = Config::default()
            .queue(&*self.name)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed)
            .lock_tasks(false);
        let storage = RedisStorage::new(conn.clone()).with_config(config.clone());
        RedisQueue {
            name: self.name,
            wake: LocalWake::new(),
            subscriber: None,
            conn,
            storage,
            config,
        }
    }
}

impl RedisQueue {
    /// Settings for the queue `name`, to [`connect`](RedisQueueBuilder::connect)
    /// or [`attach`](RedisQueueBuilder::attach).
    ///
    /// ```
    /// let builder = eventsink::queue::RedisQueue::builder("webhooks");
    /// # let _ = builder;
    /// ```
    pub fn builder(name: &str) -> RedisQueueBuilder {
        RedisQueueBuilder {
            name: name.into(),
            response_timeout: REDIS_RESPONSE_TIMEOUT,
            heartbeat: DEFAULT_HEARTBEAT_INTERVAL,
            missed: DEFAULT_MISSED_HEARTBEATS,
        }
    }
}

impl<P> RedisQueue<P> {
    /// Connects to `url` and opens the queue `name`, with the defaults of
    /// [`builder`](RedisQueue::builder).
    ///
    /// # Errors
    ///
    /// [`QueueError::Misconfigured`] if the URL is invalid or Redis refuses
    /// the credentials or the database number; [`QueueError::Backend`] if
    /// Redis cannot be reached.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::RedisQueue =
    ///     eventsink::queue::RedisQueue::connect("redis://127.0.0.1/", "q").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str, name: &str) -> Result<Self, QueueError> {
        RedisQueue::builder(name).connect(url).await
    }

    /// Opens the queue `name` on an existing connection, with the defaults
    /// of [`builder`](RedisQueue::builder).
    ///
    /// ```no_run
    /// # fn f(conn: redis::aio::ConnectionManager) {
    /// let queue: eventsink::queue::RedisQueue = eventsink::queue::RedisQueue::attach(conn, "q");
    /// # }
    /// ```
    pub fn attach(conn: ConnectionManager, name: &str) -> Self {
        RedisQueue::builder(name).attach(conn)
    }

    /// Buries the job `id` of apalis' dead set and moves it to the done
    /// set, in one script ([`BURY_ABANDONED`]); `false` if another worker
    /// did first, or if its data is not an event (it stays).
    async fn bury_one_abandoned(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
    ) -> Result<bool, QueueError>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(BURY_ABANDONED));
        let fail = |e| QueueError::backend(&self.name, "burying jobs apalis gave up on", e);
        let meta = format!("{}:{id}", self.config.job_meta_hash());
        let data: Option<Vec<u8>> = conn
            .hget(self.config.job_data_hash(), id)
            .await
            .map_err(fail)?;
        let (runs, last): (Option<i64>, Option<String>) = redis::cmd("HMGET")
            .arg(&meta)
            .arg("attempts")
            .arg("result")
            .query_async(conn)
            .await
            .map_err(fail)?;
        let letter = data.as_deref().and_then(|data| {
            abandoned_letter::<P>(&self.name, data, runs.unwrap_or(0), last.as_deref())
        });
        let (hash, order) = self.keys();
        let mut call = SCRIPT.prepare_invoke();
        call.key(self.config.dead_jobs_set())
            .key(self.config.done_jobs_set())
            .key(&meta)
            .key(hash)
            .key(order)
            .key(self.config.job_data_hash())
            .arg(id)
            .arg(current_second());
        if let Some(letter) = &letter {
            let json = serde_json::to_string(letter)
                .map_err(|e| QueueError::backend(&self.name, "encoding a dead letter", e))?;
            call.arg(&letter.key)
                .arg(json)
                .arg(letter.failed_at.timestamp_micros());
        } else if data.is_some() {
            return Ok(false);
        }
        let buried: u64 = call.invoke_async(conn).await.map_err(fail)?;
        Ok(buried > 0)
    }

    /// Stores a dead letter of any payload type, replacing the one with
    /// the same key: [`Store::bury`], and the letter of a job that no longer
    /// decodes as `P`.
    fn bury_any<T>(&self, letter: DeadLetter<T>) -> Answer<()>
    where
        T: Serialize + Send + Sync + 'static,
        P: 'static,
    {
        let (mut conn, name, fail) = self.parts("storing a dead letter");
        let (hash, order) = self.keys();
        Box::pin(async move {
            let json = serde_json::to_string(&letter)
                .map_err(|e| QueueError::backend(&name, "encoding a dead letter", e))?;
            redis::pipe()
                .atomic()
                .hset(&hash, &letter.key, json)
                .ignore()
                .zadd(&order, &letter.key, letter.failed_at.timestamp_micros())
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(fail)
        })
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

/// The letters stored under `keys`, in their order (a key removed
/// meanwhile is skipped).
async fn letters_of<P: DeserializeOwned>(
    conn: &mut ConnectionManager,
    hash: &str,
    keys: &[String],
    name: &Arc<str>,
) -> Result<Vec<DeadLetter<P>>, QueueError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let letters: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(hash)
        .arg(keys)
        .query_async(conn)
        .await
        .map_err(|e| QueueError::backend(name, "listing dead letters", e))?;
    letters
        .iter()
        .flatten()
        .map(|json| decode(name, json))
        .collect()
}

fn decode<P: DeserializeOwned>(name: &Arc<str>, json: &str) -> Result<DeadLetter<P>, QueueError> {
    serde_json::from_str(json).map_err(|e| undecodable_letter(name, e))
}

impl<P: Payload> Ops<P> for RedisQueue<P> {
    fn push(&self, jobs: Jobs<P>) -> Answer<Vec<Published>> {
        let (conn, config, wake) = (self.conn.clone(), self.config.clone(), self.wake.clone());
        let name = Arc::clone(&self.name);
        Box::pin(async move {
            let (due_now, outcomes) = push_jobs(conn, &config, &name, &jobs).await?;
            if due_now > 0 {
                wake.notify();
            }
            Ok(outcomes)
        })
    }

    fn parallel_batches(&self) -> usize {
        // Redis pipelines the scripts of concurrent batches on one
        // connection. Measured with 64 publishers (events/s, bench
        // `queue_publish_redis`): 1 → 82k, 2 → 122k, 4 → 125k, 8 → 115k,
        // 16 → 104k, 32 → 92k; more batches are smaller ones, and each
        // script call has a fixed cost in Redis.
        4
    }

    fn run_worker(&self, mut run: WorkerRun<P>) -> BoxFuture<'static, Result<(), BoxError>> {
        // apalis acknowledges a fetched batch only once it has handed it
        // all out, and this store has no early `mark_done`: a batch the
        // size of the deliveries at once keeps what a killed worker
        // delivers again as small as before.
        run.fetch_batch = run.concurrency.max(10);
        let promote = promote_due_jobs(self.conn.clone(), self.config.clone());
        let mut wakes = Wakes::new(self.wake.stream(), run.poll_interval, None);
        if let Some(client) = self.subscriber.clone() {
            let (channel, name) = (wake_channel(&self.config), Arc::clone(&self.name));
            wakes = wakes.fed_by(|announced| listen(client, channel, announced, name));
        }
        let storage = RedisStorage::<Fetched<P>>::new(self.conn.clone());
        let storage = polled!(
            storage.with_config(self.config.clone()),
            self.config,
            wakes,
            run
        );
        let queue = self.clone();
        let bury: BuryJson = Arc::new(move |letter| queue.bury_any(letter));
        let run = run_apalis!(storage, run, |deliver| Tolerant { deliver, bury });
        Box::pin(async move {
            promote.await?;
            run.await
        })
    }
}

impl<P: Payload> Store<P> for RedisQueue<P> {
    fn bury(&self, letter: DeadLetter<P>) -> Answer<()> {
        self.bury_any(letter)
    }

    fn dead_page(&self, offset: u64, limit: u64) -> Answer<Vec<DeadLetter<P>>> {
        let (mut conn, name, fail) = self.parts("listing dead letters");
        let (hash, order) = self.keys();
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let start = isize::try_from(offset).unwrap_or(isize::MAX);
            let stop = isize::try_from(offset.saturating_add(limit - 1)).unwrap_or(isize::MAX);
            let keys: Vec<String> = conn.zrange(&order, start, stop).await.map_err(&fail)?;
            letters_of(&mut conn, &hash, &keys, &name).await
        })
    }

    fn dead_after(&self, after: Option<Place>, until: i64, limit: u64) -> Answer<DeadPage<P>> {
        let (mut conn, name, fail) = self.parts("listing dead letters");
        let (hash, order) = self.keys();
        Box::pin(async move {
            let limit = isize::try_from(limit).unwrap_or(isize::MAX);
            // The set orders equal scores by key: first the rest of the
            // cursor's score, then the scores after it.
            let (mut places, from) = match after {
                None => (Vec::new(), "-inf".to_owned()),
                Some((at, key)) => {
                    let ties: Vec<String> =
                        conn.zrangebyscore(&order, at, at).await.map_err(&fail)?;
                    let rest = ties
                        .into_iter()
                        .filter(|k| k.as_bytes() > key.as_bytes())
                        .map(|k| (k, at));
                    (rest.collect::<Vec<_>>(), format!("({at}"))
                }
            };
            let more = limit.saturating_sub(places.len() as isize);
            if more > 0 {
                let next: Vec<(String, i64)> = conn
                    .zrangebyscore_limit_withscores(&order, from, until, 0, more)
                    .await
                    .map_err(&fail)?;
                places.extend(next);
            }
            places.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            let keys: Vec<_> = places.iter().map(|(key, _)| key.clone()).collect();
            let letters = letters_of(&mut conn, &hash, &keys, &name).await?;
            let last = places.pop().map(|(key, at)| (at, key));
            Ok(DeadPage { letters, last })
        })
    }

    fn dead_get(&self, key: &str) -> Answer<Option<DeadLetter<P>>> {
        let (mut conn, name, fail) = self.parts("reading a dead letter");
        let (hash, _) = self.keys();
        let key = key.to_owned();
        Box::pin(async move {
            let json: Option<String> = conn.hget(&hash, &key).await.map_err(fail)?;
            json.map(|json| decode(&name, &json)).transpose()
        })
    }

    fn dead_remove(&self, letter: &DeadLetter<P>) -> Answer<bool> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(REMOVE_LETTER));
        let (mut conn, _, fail) = self.parts("removing a dead letter");
        let (hash, order) = self.keys();
        let (key, chain) = (letter.key.clone(), letter.chain.clone());
        let failed_at = letter.failed_at.timestamp_micros();
        Box::pin(async move {
            let removed: u64 = SCRIPT
                .key(hash)
                .key(order)
                .arg(key)
                .arg(chain)
                .arg(failed_at)
                .invoke_async(&mut conn)
                .await
                .map_err(fail)?;
            Ok(removed > 0)
        })
    }

    fn dead_purge(&self) -> Answer<u64> {
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

    fn dead_count(&self) -> Answer<u64> {
        let (mut conn, _, fail) = self.parts("counting dead letters");
        let (hash, _) = self.keys();
        Box::pin(async move { conn.hlen(&hash).await.map_err(fail) })
    }

    fn stats(&self) -> Answer<QueueStats> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(STATS));
        let (mut conn, _, fail) = self.parts("reading the queue's stats");
        let (hash, _) = self.keys();
        let config = self.config.clone();
        Box::pin(async move {
            type Reply = (u64, u64, u64, u64, Option<String>, Option<Vec<u8>>);
            let (pending, scheduled, running, dead, oldest, head): Reply = SCRIPT
                .key(config.active_jobs_list())
                .key(config.scheduled_jobs_set())
                .key(config.workers_set())
                .key(config.inflight_jobs_set())
                .key(hash)
                .key(config.job_data_hash())
                .arg(current_second())
                .invoke_async(&mut conn)
                .await
                .map_err(fail)?;
            // A score is a float in Redis' reply; due seconds are whole.
            let due = oldest.and_then(|s| s.parse::<f64>().ok()).map(|s| s as i64);
            let mut stats = QueueStats::from_counts([pending, scheduled, running, dead], due);
            let head = head.and_then(|job| serde_json::from_slice::<HeadJob>(&job).ok());
            if let Some(head) = head {
                let created = head.event.created_at;
                stats.oldest_due = Some(stats.oldest_due.map_or(created, |due| due.min(created)));
            }
            Ok(stats)
        })
    }

    fn delete_completed(&self, age: Duration) -> Answer<u64> {
        let (conn, _, fail) = self.parts("removing completed jobs");
        let config = self.config.clone();
        Box::pin(async move { remove_done(conn, &config, age).await.map_err(fail) })
    }

    fn bury_abandoned(&self) -> Answer<u64> {
        let this = self.clone();
        let (_, _, fail) = self.parts("burying jobs apalis gave up on");
        Box::pin(async move {
            let mut conn = this.conn.clone();
            let dead = this.config.dead_jobs_set();
            let (mut cursor, mut buried) = (0u64, 0u64);
            loop {
                let (next, ids) = sscan(&mut conn, &dead, cursor, ABANDONED_PAGE)
                    .await
                    .map_err(&fail)?;
                for id in &ids {
                    buried += u64::from(this.bury_one_abandoned(&mut conn, id).await?);
                }
                if next == 0 {
                    return Ok(buried);
                }
                cursor = next;
            }
        })
    }

    fn release_worker(&self, name: &str, done: Vec<String>) -> Answer<()> {
        let (mut conn, _, fail) = self.parts("releasing a stopped worker's jobs");
        let config = self.config.clone();
        let name = name.to_owned();
        Box::pin(async move {
            redis::Script::new(RELEASE_WORKER)
                .key(config.workers_set())
                .key(config.active_jobs_list())
                .key(config.signal_list())
                .key(config.inflight_jobs_set())
                .key(config.done_jobs_set())
                .key(config.job_meta_hash())
                .arg(&name)
                .arg(current_second())
                .arg(done)
                .invoke_async::<u64>(&mut conn)
                .await
                .map_err(fail)?;
            Ok(())
        })
    }

    fn keep_alive(&self, name: &str) -> Answer<()> {
        let (mut conn, _, fail) = self.parts("renewing a worker's lease");
        let workers = self.config.workers_set();
        let name = name.to_owned();
        Box::pin(async move {
            // apalis-redis' keep_alive.lua: the worker's score in the
            // workers set is its last heartbeat (XX: only while it is
            // registered).
            redis::cmd("ZADD")
                .arg(&workers)
                .arg("XX")
                .arg(current_second())
                .arg(&name)
                .query_async::<()>(&mut conn)
                .await
                .map_err(fail)
        })
    }
}
