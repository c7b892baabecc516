//! [`ThroughTaskQueue`]: durable, at-least-once delivery through a job queue
//! (apalis 1.0) — in memory, SQLite, Postgres or Redis.
//!
//! Publishing to a webhook on the request path ties the request to the
//! receiver's health, and in-process retries die with the process. Put the
//! sink behind a task queue instead: `publish` returns as soon as the
//! backend has stored the event as a job, and a [`QueueWorker`] delivers it with
//! bounded concurrency, a timeout per attempt and a retry schedule that is
//! written into the backend, so it survives restarts. Concurrent publishes
//! are written together (group commit), which is what makes a durable
//! publish cheap on SQLite and Postgres.
//!
//! A SQLite setup (the embedded default; needs the `sqlite` feature):
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! use eventsink::queue::{SqliteQueue, ThroughTaskQueue};
//! use eventsink::{Event, RecordingSink, SinkExt};
//! use tower::Layer;
//! # let tmp = tempfile::tempdir()?;
//! # let path = tmp.path().join("events.db");
//! # let webhook = RecordingSink::new();
//!
//! let queue = ThroughTaskQueue::new(SqliteQueue::open(&path, "webhooks").await?); // own file, WAL
//! let mut sink = queue.layer(webhook.clone());              // publishes: stores jobs
//! let worker = queue.worker(webhook.clone()).spawn();       // delivers in the background
//!
//! sink.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
//! # webhook.wait_for(1, std::time::Duration::from_secs(10)).await?;
//! worker.shutdown().await;                                  // lets deliveries in flight finish
//! # Ok(()) }
//! # #[cfg(not(feature = "sqlite"))] fn main() {}
//! ```
//!
//! # Roles and backends
//!
//! [`ThroughTaskQueue`] is the layer; the service it wraps a sink in is a
//! [`QueuePublisher`] (stores each event as a job), and a [`QueueWorker`]
//! (from [`ThroughTaskQueue::worker`] or [`QueueWorker::new`]) delivers the
//! jobs to a sink; [`WorkerHandle`] stops it. Every backend opens the same
//! way, with a shortcut or a builder that ends in the same verb, and infers
//! its payload type from use (`serde_json::Value` when written without one):
//!
//! | backend | shortcut | builder |
//! |---|---|---|
//! | [`MemoryQueue`] | `MemoryQueue::new(name)` | — |
//! | `SqliteQueue` | `SqliteQueue::open(path, name)` | `SqliteQueue::builder(name)….open(path)` |
//! | `PostgresQueue` | `PostgresQueue::connect(url, name)`, `::attach(pool, name)` | `PostgresQueue::builder(name)….connect(url)` or `.attach(pool)` |
//! | `RedisQueue` | `RedisQueue::connect(url, name)`, `::attach(conn, name)` | `RedisQueue::builder(name)….connect(url)` or `.attach(conn)` |
//!
//! # Guarantees
//!
//! - **At-least-once.** An event whose `publish` returned `Ok` is stored in
//!   the backend and is delivered at least once, or ends as a dead letter.
//!   It may be delivered more than once, so receivers deduplicate by
//!   [`Event::id`](crate::Event::id) (webhooks carry it as `webhook-id`).
//! - **Crash.** A worker that dies mid-delivery (kill, power loss) leaves its
//!   jobs leased to its name; another worker (or the same process restarted)
//!   takes them over once the lease expires, after
//!   `heartbeat × missed` ([`DEFAULT_HEARTBEAT_INTERVAL`] ×
//!   [`DEFAULT_MISSED_HEARTBEATS`] = 15 s; each backend's builder has
//!   `lease`), and delivers them again. Deliveries that had completed but
//!   whose completion was not yet written are delivered twice; at most the
//!   jobs the dead worker held (its concurrency plus one fetch). A worker
//!   that fails on a backend error is restarted with backoff under a new
//!   name; one stopped gracefully finishes its deliveries and hands back the
//!   jobs it had fetched but not started.
//! - **Retries.** A retryable failure (see [`Retryable`](crate::Retryable)),
//!   including an attempt that exceeds its timeout, writes the next attempt
//!   into the backend as a new job due after the [`RetrySchedule`]'s delay
//!   (a `Retry-After` from the receiver is honoured within limits). The
//!   durable backends keep due times in whole seconds: an attempt runs no
//!   earlier than its delay and up to a second later. A permanent failure,
//!   or a sink that panics, is not retried.
//! - **Dead letters.** A permanently failed event, or one out of attempts,
//!   is kept with its last error and attempt count in the backend: a
//!   `eventsink_dead_letters` table (SQLite, Postgres), a Redis hash
//!   (`eventsink:{queue}:dead`), or the process memory (memory backend).
//!   A stored job whose payload no longer decodes as the queue's payload
//!   type (the type changed since it was published) is a permanent dead
//!   letter too, saying so, and the worker goes on with the next job; read
//!   such letters through a queue of `serde_json::Value`.
//!   A letter has the key of the event's jobs, `{queue}:{kind}:{id}`, so
//!   two kinds that share an id keep two letters. [`DeadLetters`] lists,
//!   shows, replays and purges them. A replay stores the event as a new
//!   delivery chain, then removes the letter only if it is still the one
//!   it replayed (a replayed event that failed again at once keeps its new
//!   letter); `replay_all` replays each letter that existed when it was
//!   called exactly once.
//! - **Delivery chains.** The attempts of one publish (or one replay) are
//!   a chain with its own id, and retries are keyed by it
//!   (`{queue}:{kind}:{id}~{chain}#{attempt}`): the retries of a chain
//!   never meet the stored jobs of an earlier publish of the same event.
//! - **Jobs apalis gave up on.** If writing a delivery's outcome (the next
//!   attempt, or the dead letter) fails, the job is left to apalis, which
//!   runs it again; after 25 such failures in a row it gives up on it. The
//!   worker's maintenance (at start, then hourly) buries such jobs as dead
//!   letters ([`DeathCause::Abandoned`]).
//! - **Retention** ([`DEFAULT_RETENTION`]) removes only jobs whose outcome
//!   was recorded (delivered, next attempt stored, or dead letter
//!   written); never a job that is due, scheduled, running, or that apalis
//!   still retries or gave up on. On Redis it also trims apalis' done set.
//! - **Duplicates.** A published event's first job is keyed
//!   `{queue}:{kind}:{id}`: publishing the event again while that job is
//!   queued, or until retention removes it once completed, stores nothing
//!   new and answers [`Published::AlreadyQueued`] (a new job answers
//!   [`Published::Stored`]), to each publisher of a batch its own answer.
//!   Redis does the same (its job ids are derived from the keys); the
//!   memory backend only while the job waits.
//!
//! # Observing the queue
//!
//! Each publish, batch write, delivery attempt, dead letter and replay has
//! a `tracing` span with OpenTelemetry messaging fields (the table is in
//! [`trace`](crate::trace)); with the feature `opentelemetry` the
//! publisher's trace continues in the delivery and the webhook request. The
//! feature `metrics` counts publishes, deliveries, retries and dead letters
//! and gauges the queue's depth (module `metrics`), and
//! [`QueueWorker::on_attempt`] hands every attempt ([`Attempt`]) to the
//! application, for an attempt log of its own.
//!
//! # What can lose an event
//!
//! - The **memory backend** keeps everything in the process: queued jobs,
//!   scheduled retries and dead letters are gone when it exits.
//! - **SQLite** with `synchronous=NORMAL` (the default) can lose the last
//!   transactions on power loss or an OS crash (not on a process crash);
//!   choose `SqliteQueueBuilder::synchronous_full` if that matters.
//!   Deleting the file loses everything.
//! - **Redis** without persistence (AOF with `appendfsync always`) loses
//!   what it held in memory when it restarts.
//! - [`DeadLetters::purge`] deletes dead letters: what you purge is gone.
//!
//! A `publish` that returns an error, or is dropped before it returns, may
//! or may not have stored the event: publish it again with the same id
//! (a stored first job makes that a no-op, answered
//! [`Published::AlreadyQueued`]).
//!
//! # Tower layers with ThroughTaskQueue
//!
//! The worker already does, durably, what in-process layers would do
//! around a sink: it delivers with bounded **concurrency**
//! ([`QueueWorker::concurrency`]), bounds each **attempt** with a timeout
//! ([`QueueWorker::attempt_timeout`]) and writes each **retry** into the
//! backend ([`QueueWorker::schedule`]), where it survives a restart. So
//! put no `RetryPolicy`, `Timeout` or `ConcurrencyLimit` between the queue
//! and the sink (an in-process retry there would die with the process and
//! hold a delivery slot while it waits); wrap the sink only in what shapes
//! one request, such as a rate limit toward the receiver.
//!
//! The publish path is where layers belong: a request handler publishes
//! and should neither wait long nor pile up while the backend is slow.
//!
//! - **A timeout** (`ServiceBuilder::timeout`) sized to the request's
//!   budget, shorter than the built-in [`DEFAULT_PUBLISH_TIMEOUT`].
//! - **Load shedding** (`ServiceBuilder::load_shed`): the publisher's
//!   `poll_ready` is `Pending` while its group commit is full, so a
//!   shedding stack answers `Overloaded` at once instead of queueing
//!   requests in memory; answer 503 and let the client retry.
//!   `concurrency_limit` bounds the publishes in flight further.
//! - **Stable ids.** A publish that timed out (or was shed after its
//!   `call`, or whose connection dropped) may still have stored the event:
//!   a caller that retries must publish the same event again, with the same
//!   id ([`Event::with_id`](crate::Event::with_id), e.g. the order id), so
//!   the queue recognises it ([`Published::AlreadyQueued`]) and the
//!   receiver gets it once, not under two ids.
//!
//! Box the stack as a [`Publisher`] to keep it in application state.
//!
//! **Graceful shutdown.** When the receiver is served by the same server
//! (a monolith that sends webhooks to itself, or a test), stop in this
//! order: stop accepting the requests that publish; then
//! [`WorkerHandle::shutdown`], which waits for the deliveries in flight,
//! and those need the receiving routes; then the server. Stopping the
//! server first fails those deliveries; nothing is lost (their retries are
//! stored and run after the restart), but they arrive late.
//!
//! ```
//! # #[cfg(all(feature = "axum", feature = "webhook"))]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//!
//! use axum::http::StatusCode;
//! use eventsink::queue::{MemoryQueue, Publisher, ThroughTaskQueue};
//! use eventsink::{Event, SinkExt, WebhookSink};
//! use tower::ServiceBuilder;
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let webhook = WebhookSink::builder(format!("http://{}/hooks", listener.local_addr()?)).build()?;
//! let queue = ThroughTaskQueue::new(MemoryQueue::new("orders"));
//! let publisher: Publisher = ServiceBuilder::new()
//!     .load_shed()                      // a full queue answers at once
//!     .timeout(Duration::from_secs(2))  // the request's budget for storing
//!     .layer(queue.clone())
//!     .service(webhook.clone())
//!     .boxed_sink();
//! let worker = queue
//!     .worker(webhook)                  // no retry or timeout layers here:
//!     .concurrency(16)                  // the worker bounds deliveries,
//!     .attempt_timeout(Duration::from_secs(10)) // each attempt,
//!     .spawn();                         // and stores each retry
//!
//! let accepting = Arc::new(AtomicBool::new(true));
//! let place_order = {
//!     let accepting = Arc::clone(&accepting);
//!     move |axum::extract::Path(id): axum::extract::Path<u64>| {
//!         let (accepting, mut events) = (Arc::clone(&accepting), publisher.clone());
//!         async move {
//!             if !accepting.load(Ordering::SeqCst) {
//!                 return StatusCode::SERVICE_UNAVAILABLE;
//!             }
//!             // The order id as the event id: a client's retry is the same event.
//!             let event = Event::with_id("order.placed", format!("order-{id}"), serde_json::json!({"id": id}));
//!             match events.publish(event).await {
//!                 Ok(_) => StatusCode::ACCEPTED,
//!                 Err(_) => StatusCode::SERVICE_UNAVAILABLE, // shed, timed out, backend down
//!             }
//!         }
//!     }
//! };
//! let app = axum::Router::new()
//!     .route("/orders/{id}", axum::routing::post(place_order))
//!     .route("/hooks", axum::routing::post(|| async { StatusCode::NO_CONTENT }));
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(async move {
//!     axum::serve(listener, app)
//!         .with_graceful_shutdown(async { let _ = stopped.await; })
//!         .await
//! });
//!
//! // … serve until asked to stop, then:
//! accepting.store(false, Ordering::SeqCst); // 1. no new publishes
//! worker.shutdown().await;                  // 2. deliveries in flight reach /hooks
//! let _ = stop.send(());                    // 3. the server, last
//! server.await??;
//! # Ok(()) }
//! # #[cfg(not(all(feature = "axum", feature = "webhook")))] fn main() {}
//! ```
//!
//! # What a publish costs
//!
//! `publish` returns once the backend has the event, so its cost is one
//! durable write, shared by every publish that waits at the same time
//! (group commit, up to [`DEFAULT_MAX_BATCH`] events per write). Measured
//! with `cargo bench --bench throughput --all-features -- --quick
//! queue_publish`, as a ratio to the bare write of the same row on the
//! same machine in the same run (2 cores; see the README's performance
//! table):
//!
//! - **One caller awaiting each publish** pays about one bare commit:
//!   0.96 × a bare `INSERT` + `COMMIT` into apalis' `Jobs` table on SQLite
//!   (9,100 commits/s in that run; the table's ten indexes are most of a
//!   commit's cost), 0.81 × a bare autocommit `INSERT` on Postgres, and
//!   0.83 × a bare `HSET` + `LPUSH` pipeline on Redis, where the publish
//!   script (six commands in Lua, for the duplicate check and apalis'
//!   layout) is most of the difference. On a slower machine the same
//!   script made Redis 0.5 ×: it took ~33 µs of Redis' time there, the
//!   pipeline ~4 µs, in a round trip of ~57 µs.
//! - **Several callers** share commits: 8 callers publish 2.8 × as many
//!   events per second as one caller's bare commits on SQLite; 64 callers
//!   8.3 × on SQLite and 7.5 × on Postgres as many as 64 callers of
//!   apalis' own push.
//!
//! To get the most from group commit, publish concurrently rather than in
//! a loop that awaits each event: share one publisher (clones share its
//! group commit) between request handlers, and when one task has many
//! events, start their publishes together (e.g. `futures::future::join_all`
//! over clones of the publisher) instead of awaiting them one by one. With
//! `synchronous_full` every SQLite commit waits for the disk: group commit
//! then matters even more.
//!
//! # Latency across processes
//!
//! A worker starts a job that another process published (or another queue
//! handle: only handles of the same queue value share in-process wake-ups)
//! without waiting for a poll where the backend can tell it:
//!
//! - **Postgres**: apalis' insert trigger `NOTIFY`s, and every worker
//!   `LISTEN`s.
//! - **Redis**: the script that stores jobs due now also `PUBLISH`es on
//!   the queue's channel (`tasks:<queue>:active:available`, apalis-redis'
//!   own); every worker of a queue opened with `connect` subscribes on a
//!   connection of its own, and again if it drops. A queue opened with
//!   `attach` has no URL to open one with: its workers rely on polling.
//! - **SQLite** has no notifications: an idle worker looks at the size
//!   and modification time of the file's write-ahead log every poll
//!   interval ([`DEFAULT_POLL_INTERVAL`], 20 ms), one `stat` on a thread of
//!   its own, and fetches when a commit changed them.
//!
//! Besides, an idle worker fetches as each whole second begins (and once
//! more a poll interval later, as after every wake): due times are whole
//! seconds, so retries, jobs taken over from a dead worker, and jobs whose
//! announcement was missed (while a subscription was down) are found
//! within a second. Jobs this process published wake its workers at once
//! on every backend. Measured with `cargo bench --bench throughput
//! --all-features -- --quick xproc idle_cpu`: the worker in a child
//! process, events published one at a time into it while it idles, on 2
//! cores shared with other work (the range: the medians of five or six
//! runs); the idle worker's CPU over 5 s, from `/proc/<pid>/stat`, whose
//! resolution there is 0.2 %:
//!
//! | backend | median publish → delivered (budget) | idle worker's CPU (budget 1 %) |
//! |---|---|---|
//! | SQLite | 11.1 ms, 9.5–12.7 (25 ms) | 0.2–0.4 % of a core (3.4 % when every tick queried) |
//! | Postgres | 3.3 ms, 1.0–4.0 (5 ms) | under 0.2 % (1.6 %) |
//! | Redis | 0.28 ms, 0.26–0.32 (5 ms; 10 ms when it polled) | under 0.2 % (1.0 %) |
//!
//! # Pressure and outages
//!
//! - **Readiness tells the truth.** At most `max_batch × 4` events wait for
//!   or are in a group commit; past that `poll_ready` is `Pending`, so
//!   tower's `LoadShed` and `ConcurrencyLimit` see a full queue and memory
//!   stays bounded while the backend is slow or down.
//! - **A deadline on every publish** ([`DEFAULT_PUBLISH_TIMEOUT`],
//!   [`ThroughTaskQueue::publish_timeout`]): a hung or unreachable backend
//!   gives [`QueueError::Timeout`], transient, never a hang; the deadline
//!   covers the wait for a slot in a full group commit (`poll_ready`) too. A write that
//!   is under way is not cancelled, so the event may still be stored.
//! - **A backend error fails its whole batch at once**; only an error that
//!   concerns one job (its payload, a duplicate key) retries the others one
//!   at a time. Postgres' pool gives up acquiring a connection after
//!   `POSTGRES_ACQUIRE_TIMEOUT`.
//! - **A stopping worker keeps its lease** while its deliveries finish; if
//!   it cannot renew it, it drops them and hands their jobs back before the
//!   lease could lapse, so no other worker runs a job while it still does.
//!   On SQLite it drops apalis' own worker at once (its deliveries run on
//!   tasks of their own): a stopping apalis worker would hold a fetch's
//!   transaction, and with it the file's write lock, open until it ends.
//!
//! apalis' own retry mechanisms are not used: its SQL backends re-run a
//! failed job at once and Redis ignores `max_attempts`, so the worker
//! records the outcome of every delivery as completed and schedules retries
//! and dead letters itself.
//!
//! The apalis crates are pinned exactly (`=1.0.0`): this crate writes
//! their tables and keys itself, and `tests/queue_contract.rs` shows
//! apalis' own worker consuming what it wrote, row for row equal to what
//! apalis' own push writes. Opening a database that a newer apalis
//! migrated fails with [`QueueError::NewerSchema`].
//!
//! Jobs are stored in apalis' own tables and keys, so apalis' workers and
//! tools see them, but the durable backends write them without apalis'
//! push, which was the cost that limited publishing: SQLite inserts 64 rows
//! per statement (apalis one), and a batch that fits one statement is that
//! statement alone, without `BEGIN`/`COMMIT`; Postgres runs apalis' own
//! insert statement alone (apalis wraps it in a transaction: two more round
//! trips); Redis runs one script per batch that uses the job id, derived
//! from the idempotency key, as the duplicate check (apalis' script keeps a
//! separate expiring key per job). At open, the SQLite
//! backend also writes planner statistics for apalis' `Jobs` table; without
//! them a backlog drains in quadratic time.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::Event;

mod backend;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod contract;
mod dead_letter;
mod error;
mod job;
mod memory;
mod observe;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod schedule;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;
mod stats;
mod worker;

pub use backend::{BackendPayload, QueueBackend};
pub use dead_letter::DeadLetters;
pub use error::QueueError;
pub use job::{DeadLetter, DeathCause, QueuedEvent};
pub use memory::MemoryQueue;
pub use observe::{Attempt, AttemptOutcome};
#[cfg(feature = "postgres")]
pub use postgres::{
    POSTGRES_ACQUIRE_TIMEOUT, POSTGRES_FETCH_BATCH, POSTGRES_MAX_CONNECTIONS, PostgresQueue,
    PostgresQueueBuilder, postgres_after_release,
};
#[cfg(feature = "redis")]
pub use redis::{REDIS_RESPONSE_TIMEOUT, RedisQueue, RedisQueueBuilder};
pub use schedule::{RetrySchedule, STANDARD_JITTER};
#[cfg(feature = "sqlite")]
pub use sqlite::{SQLITE_BUSY_TIMEOUT, SqliteQueue, SqliteQueueBuilder};
pub use stats::QueueStats;
pub use worker::{
    DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_CONCURRENCY, DEFAULT_FETCH_BATCH, DEFAULT_POLL_INTERVAL,
    DEFAULT_RETENTION, QueueWorker, WorkerHandle,
};

/// Most jobs written in one group commit. 256 keeps one SQLite or Postgres
/// transaction short (a few milliseconds) while 64 concurrent publishers
/// still fit in one batch.
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Events the group commit holds at most, waiting or being written, in
/// batches of `max_batch`: 4 batches ([`DEFAULT_MAX_BATCH`] × 4 = 1,024
/// events), enough to keep every backend's parallel batches busy (Redis
/// writes 4 at once). Past it `poll_ready` is `Pending`, so memory stays
/// bounded while the backend is slow or down.
const PENDING_BATCHES: usize = 4;

/// How long `publish` waits for the backend to store an event. 15 s: the
/// longest backend timeout (Redis' response timeout, 10 s; SQLite's busy
/// timeout and Postgres' acquire timeout are 5 s) plus
/// 5 s, so a backend's own, more precise error normally arrives first; the
/// same as a delivery attempt's timeout.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// How often a worker of a durable backend says it is alive. 5 s: with
/// [`DEFAULT_MISSED_HEARTBEATS`], another worker takes over the jobs of a
/// dead one after 15 s (apalis' defaults take 60 s, or 300 s on Redis).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Heartbeats a worker may miss before its jobs are given to others. 3, as
/// the apalis notes recommend: one late beat under load is not a death.
pub const DEFAULT_MISSED_HEARTBEATS: usize = 3;

/// A layer that publishes events into a task queue instead of calling the
/// sink it wraps. Three roles, three types: this layer holds the queue's
/// backend, the [`QueuePublisher`] it wraps a sink in stores each event as
/// a job, and a [`QueueWorker`] ([`ThroughTaskQueue::worker`]) calls the
/// sink for every queued event.
///
/// ```
/// use eventsink::queue::{MemoryQueue, ThroughTaskQueue};
/// use eventsink::NoopSink;
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let queue: ThroughTaskQueue<MemoryQueue> = ThroughTaskQueue::new(MemoryQueue::new("demo"));
/// let sink = queue.layer(NoopSink::new());
/// let worker = queue.worker(NoopSink::new()).spawn();
/// # let _ = sink;
/// worker.shutdown().await;
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ThroughTaskQueue<B> {
    backend: B,
    max_batch: usize,
    publish_timeout: Duration,
}

impl<B> ThroughTaskQueue<B> {
    /// A layer publishing into `backend` ([`MemoryQueue`], `SqliteQueue`,
    /// `PostgresQueue` or `RedisQueue`).
    ///
    /// ```
    /// let layer = eventsink::queue::ThroughTaskQueue::new(eventsink::queue::MemoryQueue::<()>::new("q"));
    /// # let _ = layer;
    /// ```
    pub fn new(backend: B) -> Self {
        ThroughTaskQueue {
            backend,
            max_batch: DEFAULT_MAX_BATCH,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
        }
    }

    /// Most jobs written together by one group commit
    /// ([`DEFAULT_MAX_BATCH`]); 1 turns group commit off. 0 counts as 1.
    /// The group commit holds at most 4 batches of events (waiting or
    /// being written); past that, the service is not ready.
    ///
    /// ```
    /// let layer = eventsink::queue::ThroughTaskQueue::new(eventsink::queue::MemoryQueue::<()>::new("q")).max_batch(1);
    /// # let _ = layer;
    /// ```
    pub fn max_batch(mut self, max: usize) -> Self {
        self.max_batch = max.max(1);
        self
    }

    /// How long a publish waits for the backend to store its event
    /// ([`DEFAULT_PUBLISH_TIMEOUT`]), waiting for a free slot in the group
    /// commit included (in `poll_ready`, or in `call` without it): a
    /// `poll_ready` still waiting for a slot when it passes is `Ready`, and
    /// the `call` that follows answers the timeout at once. When it passes
    /// the publisher gets
    /// [`QueueError::Timeout`]: the event may or may not be stored, and
    /// publishing it again with the same id is safe.
    ///
    /// ```
    /// let layer = eventsink::queue::ThroughTaskQueue::new(eventsink::queue::MemoryQueue::<()>::new("q"))
    ///     .publish_timeout(std::time::Duration::from_secs(2));
    /// # let _ = layer;
    /// ```
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// A worker that delivers this queue's events to `sink`; configure it,
    /// then [`spawn`](QueueWorker::spawn) or
    /// [`run_until`](QueueWorker::run_until) it. Built from the queue, not
    /// from the publishing service, so it stays reachable when that service
    /// is wrapped (in `Buffer`, `Timeout`, a [`BoxSink`](crate::BoxSink)…).
    /// The same as [`QueueWorker::new`] with this layer's backend.
    ///
    /// ```
    /// use eventsink::queue::{MemoryQueue, ThroughTaskQueue};
    /// use eventsink::NoopSink;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let queue: ThroughTaskQueue<MemoryQueue> = ThroughTaskQueue::new(MemoryQueue::new("q"));
    /// queue.worker(NoopSink::new()).concurrency(4).spawn().shutdown().await;
    /// # }
    /// ```
    pub fn worker<S, P>(&self, sink: S) -> QueueWorker<S, B, P>
    where
        B: QueueBackend<P>,
    {
        QueueWorker::new(self.backend.clone(), sink)
    }
}

impl<S, B: Clone> Layer<S> for ThroughTaskQueue<B> {
    type Service = QueuePublisher<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        QueuePublisher {
            inner,
            backend: self.backend.clone(),
            committer: Arc::new(Committer {
                max_batch: self.max_batch,
                timeout: self.publish_timeout,
                slots: Arc::new(Semaphore::new(
                    self.max_batch
                        .saturating_mul(PENDING_BATCHES)
                        .min(Semaphore::MAX_PERMITS),
                )),
                sender: Mutex::new(None),
            }),
            slot: Mutex::new(Slot::Free),
        }
    }
}

/// The publishing service of [`ThroughTaskQueue`]: each event becomes a job
/// in the backend; `Ok` means the backend holds it (never that it was
/// delivered), [`Published::Stored`] by this publish or
/// [`Published::AlreadyQueued`] before it. Cheap to clone; clones share
/// one group commit.
///
/// Concurrent publishes are written together: while one batch is being
/// written, the next collects, and is written as soon as the first is done.
/// Each publisher still gets its own answer once its batch is stored. A
/// batch that fails because of one job (a duplicate key, a payload that
/// cannot be encoded) is retried one job at a time, so that job fails only
/// its own publisher; a batch that fails because of the backend (down,
/// locked, unreachable) fails at once, every publisher of it getting the
/// backend's error.
///
/// **Backpressure.** The group commit holds at most `max_batch × 4` events
/// (waiting or being written). [`poll_ready`](Service::poll_ready) reserves
/// one of those slots and is `Pending` while all are taken, as tower's
/// `Buffer` is, so `LoadShed`, `ConcurrencyLimit` and friends see a slow
/// backend; `call` uses the slot. A clone starts without a slot. A `call`
/// without `poll_ready` waits for a slot inside its future. Every publish
/// ends within its [`publish_timeout`](ThroughTaskQueue::publish_timeout),
/// with [`QueueError::Timeout`] if the backend did not answer by then.
///
/// ```
/// use eventsink::queue::{MemoryQueue, ThroughTaskQueue};
/// use eventsink::{Event, RecordingSink, SinkExt};
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let recorder = RecordingSink::new();
/// let mut sink = ThroughTaskQueue::new(MemoryQueue::new("demo")).layer(recorder.clone());
/// let worker = sink.worker().spawn();
/// sink.publish(Event::new("ping", serde_json::json!(1))).await?;
/// recorder.wait_for(1, std::time::Duration::from_secs(5)).await?;
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct QueuePublisher<S, B> {
    inner: S,
    backend: B,
    committer: Arc<Committer>,
    /// The slot `poll_ready` reserved for the next `call`. In a `Mutex`
    /// only to keep the service `Sync`: it is reached through `&mut self`
    /// (`get_mut`), never locked.
    slot: Mutex<Slot>,
}

/// Where `poll_ready`'s reservation of a group-commit slot stands.
enum Slot {
    Free,
    /// Waiting for a slot, until the publish timeout (`deadline`) passes.
    Acquiring {
        permit: BoxFuture<'static, Result<OwnedSemaphorePermit, AcquireError>>,
        deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    },
    /// A slot; if `poll_ready` waited for it, the time the publish had left
    /// when it got it, which the `call` gets (counted from the call: a
    /// caller may hold a ready publisher for a while before calling it).
    Reserved(OwnedSemaphorePermit, Option<Duration>),
    /// The publish timeout passed while waiting: the next `call` times out.
    Expired,
}

impl<S, B> QueuePublisher<S, B> {
    inner_service_accessors!();

    /// The queue's backend (for its [`DeadLetters`]).
    ///
    /// ```
    /// # use eventsink::{NoopSink, queue::{MemoryQueue, ThroughTaskQueue}}; use tower::Layer;
    /// let sink = ThroughTaskQueue::new(MemoryQueue::<()>::new("q")).layer(NoopSink::new());
    /// assert_eq!(sink.backend().name(), "q");
    /// ```
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A worker that delivers this queue's events to the wrapped sink: the
    /// same as [`ThroughTaskQueue::worker`] with that sink. Once this
    /// service is wrapped, build the worker from the layer instead.
    ///
    /// ```
    /// # use eventsink::{NoopSink, queue::{MemoryQueue, ThroughTaskQueue}}; use tower::Layer;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let sink = ThroughTaskQueue::new(MemoryQueue::<serde_json::Value>::new("q")).layer(NoopSink::new());
    /// sink.worker().concurrency(4).spawn().shutdown().await;
    /// # }
    /// ```
    pub fn worker<P>(&self) -> QueueWorker<S, B, P>
    where
        S: Clone,
        B: QueueBackend<P>,
    {
        QueueWorker::new(self.backend.clone(), self.inner.clone())
    }

    /// The reserved slot, if `poll_ready` got one (and forgets it), and
    /// the time the publish had left if it waited for it; `Err` if
    /// `poll_ready` waited for a slot until the publish timeout.
    fn take_slot(&mut self) -> Result<(Option<OwnedSemaphorePermit>, Option<Duration>), ()> {
        let slot = self.slot.get_mut().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(slot, Slot::Free) {
            Slot::Reserved(permit, deadline) => Ok((Some(permit), deadline)),
            Slot::Expired => Err(()),
            Slot::Free | Slot::Acquiring { .. } => Ok((None, None)),
        }
    }
}

impl<S: Clone, B: Clone> Clone for QueuePublisher<S, B> {
    fn clone(&self) -> Self {
        QueuePublisher {
            inner: self.inner.clone(),
            backend: self.backend.clone(),
            committer: Arc::clone(&self.committer),
            // A clone reserves its own slot.
            slot: Mutex::new(Slot::Free),
        }
    }
}

impl<S: fmt::Debug, B: fmt::Debug> fmt::Debug for QueuePublisher<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePublisher")
            .field("inner", &self.inner)
            .field("backend", &self.backend)
            .field("max_batch", &self.committer.max_batch)
            .field("publish_timeout", &self.committer.timeout)
            .finish()
    }
}

impl<S, B, P> Service<Event<P>> for QueuePublisher<S, B>
where
    B: QueueBackend<P>,
    P: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Whether this publish stored the event, or found it already queued.
    type Response = Published;
    type Error = QueueError;
    /// An async block: hand the job to the group commit, wait (at most the
    /// publish timeout) for its batch to be stored.
    type Future = BoxFuture<'static, Result<Published, QueueError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner sink is the worker's, not ours: publishing only needs
        // a slot in the group commit.
        let (slots, timeout) = (&self.committer.slots, self.committer.timeout);
        let slot = self.slot.get_mut().unwrap_or_else(|p| p.into_inner());
        loop {
            match slot {
                Slot::Reserved(..) | Slot::Expired => return Poll::Ready(Ok(())),
                Slot::Free => {
                    *slot = match Arc::clone(slots).try_acquire_owned() {
                        Ok(permit) => Slot::Reserved(permit, None),
                        Err(_) => Slot::Acquiring {
                            permit: Arc::clone(slots).acquire_owned().boxed(),
                            deadline: Box::pin(tokio::time::sleep(timeout)),
                        },
                    }
                }
                Slot::Acquiring { permit, deadline } => match permit.poll_unpin(cx) {
                    // Past the deadline, `call` answers the timeout: a
                    // publish never waits for readiness longer than that.
                    Poll::Pending if deadline.as_mut().poll(cx).is_ready() => *slot = Slot::Expired,
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(permit)) => {
                        let left = deadline
                            .deadline()
                            .saturating_duration_since(Instant::now());
                        *slot = Slot::Reserved(permit, Some(left));
                    }
                    // The semaphore is never closed; answer as a stopped
                    // queue all the same rather than assume.
                    Poll::Ready(Err(_)) => {
                        *slot = Slot::Free;
                        return Poll::Ready(Err(QueueError::Stopped {
                            queue: self.backend.name().into(),
                        }));
                    }
                },
            }
        }
    }

    fn call(&mut self, event: Event<P>) -> Self::Future {
        // The crate's one rule for ids and kinds: refuse now what the
        // webhook sink and receiver would refuse later.
        if let Err(source) = crate::wire::validate(&event) {
            let queue = self.backend.name().into();
            return Box::pin(async move { Err(QueueError::Encode { queue, source }) });
        }
        let timeout = self.committer.timeout;
        let queue: Arc<str> = self.backend.name().into();
        let Ok((reserved, left)) = self.take_slot() else {
            return Box::pin(async move {
                Err(QueueError::Timeout {
                    queue,
                    after: timeout,
                })
            });
        };
        let span = publish_span(&queue, &event);
        let mut job = QueuedEvent::new(self.backend.name(), event);
        job.traceparent = crate::trace::traceparent(&span);
        #[cfg(feature = "metrics")]
        let kind = Arc::clone(&job.event.kind);
        let sender = self.committer.sender::<B, P>(&self.backend);
        let slots = Arc::clone(&self.committer.slots);
        let publishing = async move {
            let sender = sender?;
            let stopped = || QueueError::Stopped {
                queue: Arc::clone(&sender.queue),
            };
            let publish = async {
                // Called without `poll_ready`: wait for a slot here.
                let slot = match reserved {
                    Some(slot) => slot,
                    None => slots.acquire_owned().await.map_err(|_| stopped())?,
                };
                let (reply, answer) = oneshot::channel();
                sender
                    .tx
                    .send(Pending {
                        job,
                        reply,
                        _slot: slot,
                    })
                    .map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())?
            };
            let result = match tokio::time::timeout(left.unwrap_or(timeout), publish).await {
                Ok(result) => result,
                Err(_) => Err(QueueError::Timeout {
                    queue,
                    after: timeout,
                }),
            };
            if let Ok(published) = &result {
                let answer = match published {
                    Published::Stored => "stored",
                    Published::AlreadyQueued => "already_queued",
                };
                tracing::Span::current().record("eventsink.published", answer);
                #[cfg(feature = "metrics")]
                crate::metrics::published(&sender.queue, &kind, published.is_stored());
            }
            result
        };
        Box::pin(publishing.instrument(span))
    }
}

/// The span of one publish (see [`trace`](crate::trace)).
fn publish_span<P>(queue: &str, event: &Event<P>) -> tracing::Span {
    tracing::info_span!(
        "eventsink.publish",
        messaging.system = crate::trace::MESSAGING_SYSTEM,
        messaging.operation.type = "create",
        messaging.destination.name = queue,
        messaging.message.id = &*event.id,
        eventsink.event.kind = &*event.kind,
        eventsink.published = tracing::field::Empty,
        otel.kind = "producer",
    )
}

/// What a publish did: the answer of [`QueuePublisher`], per event (each
/// publisher of a group-commit batch gets its own).
///
/// Both mean the event is in the queue and will be delivered (at least
/// once): `Ok` keeps its meaning. The difference is whose job delivers it.
/// [`AlreadyQueued`](Published::AlreadyQueued) means the backend already
/// held the first job of this event (same kind and id; see *Duplicates* in
/// the [module docs](self)) and stored nothing new: the job queued first
/// is the one delivered, with the payload it was published with. A caller
/// that reuses ids on purpose, or counts what it stored, tells them apart;
/// most callers ignore it.
///
/// It is the publisher's `Response` rather than a separate method so that
/// it travels through whatever tower layers wrap the publisher (`Timeout`,
/// `LoadShed`, `ConcurrencyLimit`, `Buffer`, a boxed service) unchanged:
/// the same choice tower makes for every service. A [`Sink`](crate::Sink)
/// may answer anything, so the publisher stays a sink; box it as a
/// [`BoxSink<P, Published>`](crate::BoxSink) (or [`Publisher`]), or drop
/// the answer with `ServiceExt::map_response` where a `BoxSink<P>` of `()`
/// is expected.
///
/// ```
/// use eventsink::queue::{MemoryQueue, Published, ThroughTaskQueue};
/// use eventsink::{Event, NoopSink, SinkExt};
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let mut sink = ThroughTaskQueue::new(MemoryQueue::new("demo")).layer(NoopSink::new());
/// let event = Event::with_id("order.placed", "order-7", serde_json::json!({"order_id": 7}));
/// assert_eq!(sink.publish(event.clone()).await?, Published::Stored);
/// assert_eq!(sink.publish(event).await?, Published::AlreadyQueued); // no worker yet: still waiting
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Published {
    /// The backend stored the event as a new job.
    Stored,
    /// The backend already held this event's first job (queued, or
    /// completed within retention) and stored nothing new.
    AlreadyQueued,
}

impl Published {
    /// Whether this publish stored a new job.
    ///
    /// ```
    /// assert!(eventsink::queue::Published::Stored.is_stored());
    /// assert!(!eventsink::queue::Published::AlreadyQueued.is_stored());
    /// ```
    pub fn is_stored(self) -> bool {
        self == Published::Stored
    }
}

/// A queue's publishing service with its layers, boxed: what to keep in
/// application state (axum's `State`, a struct field) instead of spelling
/// `LoadShed<ConcurrencyLimit<Timeout<QueuePublisher<WebhookSink, SqliteQueue<P>>>>>`.
/// Clone it per request; clones share the queue's group commit. It is a
/// [`BoxSink`](crate::BoxSink) whose response is [`Published`]; errors are
/// boxed ([`QueueError`], tower's `Elapsed` or `Overloaded`), and
/// [`Retryable`](crate::Retryable) tells which are worth a retry. Boxing
/// costs one allocation per publish, nothing next to a backend's write.
///
/// ```
/// use std::time::Duration;
/// use eventsink::queue::{MemoryQueue, Publisher, ThroughTaskQueue};
/// use eventsink::{Event, NoopSink, SinkExt};
/// use tower::ServiceBuilder;
///
/// #[derive(Clone)]
/// struct AppState {
///     events: Publisher, // Publisher<serde_json::Value>
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let queue = ThroughTaskQueue::new(MemoryQueue::new("orders"));
/// let state = AppState {
///     events: ServiceBuilder::new()
///         .load_shed()
///         .concurrency_limit(64)
///         .timeout(Duration::from_secs(2))
///         .layer(queue.clone())
///         .service(NoopSink::new())
///         .boxed_sink(),
/// };
/// let worker = queue.worker(NoopSink::new()).spawn();
///
/// let mut events = state.events.clone(); // in a handler
/// events.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
pub type Publisher<P = serde_json::Value> = crate::BoxSink<P, Published>;

/// The group commit shared by the clones of one [`QueuePublisher`].
struct Committer {
    max_batch: usize,
    /// The publish deadline.
    timeout: Duration,
    /// One permit per event the group commit may hold, waiting or being
    /// written: `max_batch × PENDING_BATCHES`.
    slots: Arc<Semaphore>,
    /// A `BatchSender<P>`, started on the first publish (that is where a
    /// runtime is known). Type-erased because the service is generic over
    /// the payload only in its `Service` impl.
    sender: Mutex<Option<Box<dyn Any + Send>>>,
}

struct BatchSender<P> {
    /// Unbounded: every event sent holds one of the committer's slots,
    /// which bound the channel and the batches being written together.
    tx: mpsc::UnboundedSender<Pending<P>>,
    queue: Arc<str>,
}

impl<P> Clone for BatchSender<P> {
    fn clone(&self) -> Self {
        BatchSender {
            tx: self.tx.clone(),
            queue: Arc::clone(&self.queue),
        }
    }
}

/// A job waiting for its batch, where to send its answer, and the slot it
/// holds until it is answered.
struct Pending<P> {
    job: QueuedEvent<P>,
    reply: oneshot::Sender<Result<Published, QueueError>>,
    _slot: OwnedSemaphorePermit,
}

impl Committer {
    fn sender<B, P>(&self, backend: &B) -> Result<BatchSender<P>, QueueError>
    where
        B: QueueBackend<P>,
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        // A poisoned lock only means another publisher panicked between
        // two statements below; the Option is still valid.
        let mut slot = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = slot
            .as_ref()
            .and_then(|s| s.downcast_ref::<BatchSender<P>>())
            && !sender.tx.is_closed()
        {
            return Ok(sender.clone());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| QueueError::NoRuntime)?;
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(commit_batches(
            backend.clone(),
            rx,
            self.max_batch,
            self.timeout,
        ));
        let sender = BatchSender {
            tx,
            queue: backend.name().into(),
        };
        *slot = Some(Box::new(sender.clone()));
        Ok(sender)
    }
}

/// The group commit: takes whatever publishes are waiting (up to
/// `max_batch`), writes them in one backend call, answers each, repeats.
/// While all of the backend's batch slots are busy, publishes collect into
/// the next batch. A batch's publishers are answered within `timeout`
/// (the publish deadline) even if the backend is hung; their slots are
/// freed then, and the write goes on to its end. Ends when every
/// publishing service is dropped.
async fn commit_batches<B, P>(
    backend: B,
    mut rx: mpsc::UnboundedReceiver<Pending<P>>,
    max_batch: usize,
    timeout: Duration,
) where
    B: QueueBackend<P>,
    P: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let writers = Arc::new(Semaphore::new(backend.parallel_batches().max(1)));
    let queue: Arc<str> = backend.name().into();
    loop {
        // The semaphore is never closed, so acquiring only waits.
        let Ok(writer) = Arc::clone(&writers).acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(max_batch.min(DEFAULT_MAX_BATCH));
        if rx.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        // A publisher that gave up before its job was written (its
        // deadline passed, or it was dropped) was told the event may not
        // be stored: write nothing for it.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let backend = backend.clone();
        let queue = Arc::clone(&queue);
        let span = send_span(&queue, batch.len());
        let write = async move {
            let jobs: Vec<_> = batch.iter().map(|p| p.job.clone()).collect();
            let count = jobs.len();
            let mut push = std::pin::pin!(push_each(&backend, jobs));
            let results = match tokio::time::timeout(timeout, &mut push).await {
                Ok(results) => results,
                Err(_) => {
                    // The deadline passed: answer the publishers (their
                    // slots are freed), but let the write finish, never
                    // cancel it half way (a backend's connection may not
                    // survive that), and keep this writer's place until
                    // it ends, so that a hung backend is not given more
                    // and more batches.
                    let timeout = QueueError::Timeout {
                        queue: Arc::clone(&queue),
                        after: timeout,
                    };
                    for (pending, err) in batch.into_iter().zip(timeout.for_each(&queue, count)) {
                        let _ = pending.reply.send(Err(err));
                    }
                    let _ = push.await;
                    drop(writer);
                    return;
                }
            };
            for (pending, result) in batch.into_iter().zip(results) {
                // A publisher that gave up no longer listens; its job may
                // be stored all the same (at-least-once).
                let _ = pending.reply.send(result);
            }
            drop(writer);
        };
        tokio::spawn(write.instrument(span));
    }
}

/// The span of one batch written (see [`trace`](crate::trace)).
fn send_span(queue: &str, count: usize) -> tracing::Span {
    tracing::info_span!(
        "eventsink.send",
        messaging.system = crate::trace::MESSAGING_SYSTEM,
        messaging.operation.type = "send",
        messaging.destination.name = queue,
        messaging.batch.message_count = count,
        otel.kind = "producer",
    )
}

/// Pushes `jobs` due now in one call. If that fails because of one job (a
/// payload that cannot be encoded), pushes them one at a time, so that job
/// fails only itself; if it fails because of the backend (down, locked,
/// unreachable), every job gets that error at once. Each job that is
/// stored is [`Published::Stored`]; one whose key the backend already
/// holds (or an earlier job of the same batch took) is
/// [`Published::AlreadyQueued`].
pub(crate) async fn push_each<B, P>(
    backend: &B,
    jobs: Vec<QueuedEvent<P>>,
) -> Vec<Result<Published, QueueError>>
where
    B: QueueBackend<P>,
{
    let count = jobs.len();
    let queue: Arc<str> = backend.name().into();
    let batch: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|job| (job, Duration::ZERO))
        .collect();
    match backend.push(batch).await {
        Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
        Err(e) if count == 1 => return vec![Err(e)],
        Err(e) if e.concerns_one_job() => {
            tracing::debug!(error = %e, count, "batch push failed on one job; pushing one at a time")
        }
        Err(e) => return e.for_each(&queue, count).into_iter().map(Err).collect(),
    }
    let mut results = Vec::with_capacity(count);
    let mut jobs = jobs.into_iter();
    while let Some(job) = jobs.next() {
        match backend.push(vec![(job, Duration::ZERO)]).await {
            Ok(outcomes) => results.extend(outcomes.into_iter().map(Ok)),
            Err(e) if e.concerns_one_job() => results.push(Err(e)),
            // The backend failed: the jobs left would only fail the same way.
            Err(e) => {
                results.extend(e.for_each(&queue, jobs.len() + 1).into_iter().map(Err));
                break;
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch of `ids` in `backend`, answered per job.
    async fn answers<B: QueueBackend<serde_json::Value>>(
        backend: &B,
        ids: &[&str],
    ) -> Vec<Published> {
        let jobs = ids
            .iter()
            .map(|id| {
                QueuedEvent::new(
                    backend.name(),
                    Event::with_id("k", *id, serde_json::json!(id)),
                )
            })
            .collect();
        push_each(backend, jobs)
            .await
            .into_iter()
            .map(|r| r.expect("push"))
            .collect()
    }

    /// Duplicates inside one backend call: the first copy is stored, the
    /// others, and a key stored by an earlier call, are already queued.
    async fn one_batch_answers_each_job<B: QueueBackend<serde_json::Value>>(backend: B) {
        use Published::{AlreadyQueued, Stored};
        assert_eq!(answers(&backend, &["a"]).await, [Stored]);
        let got = answers(&backend, &["b", "a", "b", "c", "b"]).await;
        assert_eq!(
            got,
            [Stored, AlreadyQueued, AlreadyQueued, Stored, AlreadyQueued]
        );
    }

    #[tokio::test]
    async fn memory_answers_each_job_of_a_batch() {
        one_batch_answers_each_job(MemoryQueue::new("batch")).await;
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_answers_each_job_of_a_batch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let queue = SqliteQueue::open(dir.path().join("q.db"), "batch")
            .await
            .expect("open");
        one_batch_answers_each_job(queue).await;
    }

    /// A queue name of its own, for the shared Postgres and Redis.
    #[cfg(any(feature = "postgres", feature = "redis"))]
    fn unique_name() -> String {
        format!("t-batch-{}", uuid::Uuid::now_v7().simple())
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    #[cfg_attr(
        not(eventsink_postgres),
        ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
    )]
    async fn postgres_answers_each_job_of_a_batch() {
        let url = std::env::var("EVENTSINK_POSTGRES_URL").expect("EVENTSINK_POSTGRES_URL");
        let name = unique_name();
        let queue = PostgresQueue::connect(&url, &name).await.expect("connect");
        one_batch_answers_each_job(queue.clone()).await;
        sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
            .bind(&name)
            .execute(queue.pool())
            .await
            .expect("clean up");
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn redis_answers_each_job_of_a_batch() {
        let url = std::env::var("EVENTSINK_REDIS_URL").expect("EVENTSINK_REDIS_URL");
        let name = unique_name();
        let queue = RedisQueue::connect(&url, &name).await.expect("connect");
        one_batch_answers_each_job(queue).await;
        let client = ::redis::Client::open(url).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("*{name}*"))
            .query_async(&mut conn)
            .await
            .expect("keys");
        if !keys.is_empty() {
            let () = ::redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .expect("clean up");
        }
    }
}
