//! [`PostgresQueue`]: many workers on many machines, one Postgres database.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::backend::ext::BackendExt;
use apalis_core::backend::ext::poll_strategy::Strategy;
use apalis_core::error::WorkerError;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_postgres::{Config, PostgresStorage, Pubsub};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::backend::{
    ABANDONED_PAGE, abandoned_letter, ops::DeadPage, ops::Ops, push_error, push_tasks,
};
use super::dead_letter::{DeadLetter, DeadLetters};
use super::error::QueueError;
use super::worker::{Deliver, RunOptions};
use super::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MISSED_HEARTBEATS, QueuedEvent};
use crate::BoxError;

/// Connections in the queue's pool. 8: publishing, the worker's fetches
/// and acks, and the dead-letter API each get a few.
pub const POSTGRES_MAX_CONNECTIONS: u32 = 8;

/// How long taking a connection from the pool may wait (connecting a new
/// one included) before the operation fails. 5 s, as SQLite's busy timeout:
/// sqlx's default of 30 s would outlast the publish deadline
/// ([`DEFAULT_PUBLISH_TIMEOUT`](super::DEFAULT_PUBLISH_TIMEOUT)), and a
/// server that cannot be reached, or a pool that stays exhausted, for 5 s
/// is an outage to report, not to wait out.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most jobs per `INSERT` of a group commit. 32 keeps the statement of
/// small events under 8 KiB: larger ones stall about 40 ms on TCP (sqlx does
/// not set `TCP_NODELAY`, and Nagle's algorithm meets the server's delayed
/// ACK), measured here as 45 ms for 63 jobs against 1.5 ms for 35.
const ROWS_PER_INSERT: usize = 32;

/// The dead letters, one per `(queue, letter_key)`: the key of the
/// event's jobs, `{queue}:{kind}:{id}`. `chain` says which delivery chain
/// wrote the letter, so that a replay removes only the letter it replayed.
const DEAD_LETTER_TABLE: &str = "CREATE TABLE IF NOT EXISTS eventsink_dead_letters (
    queue TEXT NOT NULL,
    letter_key TEXT NOT NULL,
    chain TEXT NOT NULL,
    event_id TEXT NOT NULL,
    failed_at BIGINT NOT NULL,
    letter TEXT NOT NULL,
    PRIMARY KEY (queue, letter_key)
);
CREATE INDEX IF NOT EXISTS eventsink_dead_letters_order
    ON eventsink_dead_letters (queue, failed_at, letter_key);";

/// Whether the dead-letter table is the first layout (keyed by event id
/// alone), which [`UPGRADE_DEAD_LETTERS`] converts.
const OLD_DEAD_LETTERS: &str = "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
     WHERE table_schema = current_schema() AND table_name = 'eventsink_dead_letters' \
     AND column_name = 'event_id') AND NOT EXISTS (SELECT 1 FROM information_schema.columns \
     WHERE table_schema = current_schema() AND table_name = 'eventsink_dead_letters' \
     AND column_name = 'letter_key')";

/// Sets the table of the first layout aside for [`UPGRADE_DEAD_LETTERS`].
const RENAME_OLD_DEAD_LETTERS: &str =
    "ALTER TABLE eventsink_dead_letters RENAME TO eventsink_dead_letters_v1";

/// Moves letters of the first layout, renamed to
/// `eventsink_dead_letters_v1`, into the current table, keyed
/// `{queue}:{kind}:{id}`; their chain is unknown (empty).
const UPGRADE_DEAD_LETTERS: &str =
    "INSERT INTO eventsink_dead_letters (queue, letter_key, chain, event_id, failed_at, letter)
    SELECT queue, key, '', event_id, failed_at,
        jsonb_set(jsonb_set(letter::jsonb, '{key}', to_jsonb(key)), '{chain}', '\"\"')::text
    FROM (SELECT *, queue || ':' || (letter::jsonb -> 'event' ->> 'kind') || ':' || event_id AS key
          FROM eventsink_dead_letters_v1) AS old;
DROP TABLE eventsink_dead_letters_v1;";

/// A queue in a Postgres database (feature `postgres`): jobs are fetched
/// with `FOR UPDATE SKIP LOCKED`, so any number of workers on any number of
/// machines share it; new jobs wake idle workers through `LISTEN/NOTIFY`.
///
/// [`connect`](PostgresQueue::connect) opens its own pool and runs apalis'
/// migrations (schema `apalis`; they run `CREATE EXTENSION IF NOT EXISTS
/// hstore`, so the role needs that right — hstore is a trusted extension
/// from PostgreSQL 13) and creates the `eventsink_dead_letters` table. A
/// worker that dies leaves its jobs to others after `heartbeat × missed`
/// ([`lease`](PostgresQueueBuilder::lease), 15 s by default). apalis has no
/// clean-up for Postgres; the worker's retention deletes completed jobs.
///
/// ```no_run
/// use eventsink::queue::{PostgresQueue, ThroughTaskQueue};
/// use eventsink::{Event, NoopSink, SinkExt};
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let queue = PostgresQueue::connect("postgres://app@db/app", "webhooks").await?;
/// let mut sink = ThroughTaskQueue::new(queue).layer(NoopSink::new());
/// let worker = sink.worker().spawn();
/// sink.publish(Event::new("ping", serde_json::json!(1))).await?;
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct PostgresQueue<P = serde_json::Value> {
    name: Arc<str>,
    pool: PgPool,
    storage: PostgresStorage<QueuedEvent<P>>,
    config: Config,
}

impl<P> Clone for PostgresQueue<P> {
    fn clone(&self) -> Self {
        PostgresQueue {
            name: Arc::clone(&self.name),
            pool: self.pool.clone(),
            storage: self.storage.clone(),
            config: self.config.clone(),
        }
    }
}

impl<P> fmt::Debug for PostgresQueue<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresQueue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`PostgresQueue`] before it connects. Its `Debug` does not
/// show the URL (it may hold a password).
///
/// ```no_run
/// use std::time::Duration;
/// use eventsink::queue::PostgresQueue;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
/// let queue: PostgresQueue = PostgresQueue::builder("postgres://app@db/app", "webhooks")
///     .lease(Duration::from_secs(2), 3)
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresQueueBuilder {
    url: String,
    pool: Option<PgPool>,
    name: Arc<str>,
    max_connections: u32,
    heartbeat: Duration,
    missed: usize,
}

impl fmt::Debug for PostgresQueueBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresQueueBuilder")
            .field("url", &"<redacted>")
            .field("name", &self.name)
            .field("max_connections", &self.max_connections)
            .field("heartbeat", &self.heartbeat)
            .field("missed", &self.missed)
            .finish()
    }
}

impl PostgresQueueBuilder {
    /// Connections in the pool ([`POSTGRES_MAX_CONNECTIONS`]).
    ///
    /// ```
    /// # let b = eventsink::queue::PostgresQueue::builder("postgres://localhost/app", "q");
    /// let b = b.max_connections(16);
    /// ```
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(2);
        self
    }

    /// Use this pool instead of connecting to the URL.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) {
    /// let b = eventsink::queue::PostgresQueue::builder("", "q").pool(pool);
    /// # }
    /// ```
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Worker heartbeat and how many may be missed before another worker
    /// takes over the jobs of a dead one ([`DEFAULT_HEARTBEAT_INTERVAL`] ×
    /// [`DEFAULT_MISSED_HEARTBEATS`]).
    ///
    /// ```
    /// # let b = eventsink::queue::PostgresQueue::builder("postgres://localhost/app", "q");
    /// let b = b.lease(std::time::Duration::from_secs(1), 2); // takeover after ~2 s
    /// ```
    pub fn lease(mut self, heartbeat: Duration, missed: usize) -> Self {
        self.heartbeat = heartbeat;
        self.missed = missed.max(1);
        self
    }

    /// Connects, migrates and creates the dead-letter table.
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the database cannot be reached or
    /// migrated (for instance without the right to create `hstore`);
    /// [`QueueError::NewerSchema`] if a newer apalis migrated it.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue =
    ///     eventsink::queue::PostgresQueue::builder("postgres://app@db/app", "q").connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<P>(self) -> Result<PostgresQueue<P>, QueueError> {
        let name = self.name;
        let fail = |action| {
            let name = Arc::clone(&name);
            move |e: sqlx::Error| QueueError::backend(&name, action, e)
        };
        let pool = match self.pool {
            Some(pool) => pool,
            None => PgPoolOptions::new()
                .max_connections(self.max_connections)
                .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
                .connect(&self.url)
                .await
                .map_err(fail("connecting to Postgres"))?,
        };
        super::contract::check_postgres(&pool, &name).await?;
        PostgresStorage::<()>::setup(&pool)
            .await
            .map_err(|e| QueueError::backend(&name, "migrating Postgres (needs hstore)", e))?;
        // Concurrent CREATE TABLE IF NOT EXISTS can collide in Postgres;
        // an advisory lock serialises them.
        let mut tx = pool
            .begin()
            .await
            .map_err(fail("creating the dead-letter table"))?;
        sqlx::query("SELECT pg_advisory_xact_lock(4242420001)")
            .execute(&mut *tx)
            .await
            .map_err(fail("creating the dead-letter table"))?;
        let (old,): (bool,) = sqlx::query_as(OLD_DEAD_LETTERS)
            .fetch_one(&mut *tx)
            .await
            .map_err(fail("creating the dead-letter table"))?;
        if old {
            sqlx::raw_sql(RENAME_OLD_DEAD_LETTERS)
                .execute(&mut *tx)
                .await
                .map_err(fail("converting the dead-letter table"))?;
        }
        sqlx::raw_sql(DEAD_LETTER_TABLE)
            .execute(&mut *tx)
            .await
            .map_err(fail("creating the dead-letter table"))?;
        if old {
            sqlx::raw_sql(UPGRADE_DEAD_LETTERS)
                .execute(&mut *tx)
                .await
                .map_err(fail("converting the dead-letter table"))?;
        }
        tx.commit()
            .await
            .map_err(fail("creating the dead-letter table"))?;
        let config = Config::default()
            .queue(&*name)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed);
        let storage = PostgresStorage::new(&pool).with_config(config.clone());
        Ok(PostgresQueue {
            name,
            pool,
            storage,
            config,
        })
    }
}

impl PostgresQueue {
    /// Settings for the queue `name` in the database at `url`.
    ///
    /// ```
    /// let builder = eventsink::queue::PostgresQueue::builder("postgres://localhost/app", "webhooks");
    /// # let _ = builder;
    /// ```
    pub fn builder(url: &str, name: &str) -> PostgresQueueBuilder {
        PostgresQueueBuilder {
            url: url.to_owned(),
            pool: None,
            name: name.into(),
            max_connections: POSTGRES_MAX_CONNECTIONS,
            heartbeat: DEFAULT_HEARTBEAT_INTERVAL,
            missed: DEFAULT_MISSED_HEARTBEATS,
        }
    }
}

impl<P> PostgresQueue<P> {
    /// Connects to `url` and opens the queue `name`, with the defaults of
    /// [`builder`](PostgresQueue::builder).
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the database cannot be reached or migrated.
    /// [`QueueError::NewerSchema`] if a newer apalis migrated it.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue =
    ///     eventsink::queue::PostgresQueue::connect("postgres://app@db/app", "q").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str, name: &str) -> Result<Self, QueueError> {
        PostgresQueue::builder(url, name).connect().await
    }

    /// The queue's name.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue = eventsink::queue::PostgresQueue::connect("postgres://localhost/app", "q").await?;
    /// assert_eq!(queue.name(), "q");
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's pool.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue = eventsink::queue::PostgresQueue::connect("postgres://localhost/app", "q").await?;
    /// let _pool = queue.pool();
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The queue's dead letters.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue = eventsink::queue::PostgresQueue::connect("postgres://localhost/app", "q").await?;
    /// println!("{} dead", queue.dead_letters().count().await?);
    /// # Ok(()) }
    /// ```
    pub fn dead_letters(&self) -> DeadLetters<Self, P>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        DeadLetters::new(self.clone())
    }

    fn fail(&self, action: &'static str) -> impl Fn(sqlx::Error) -> QueueError + use<P> {
        let name = Arc::clone(&self.name);
        move |e| QueueError::backend(&name, action, e)
    }
}
/// A dead letter as the JSON the table keeps.
fn encode_letter<P: Serialize>(
    name: &Arc<str>,
    letter: &DeadLetter<P>,
) -> Result<String, QueueError> {
    serde_json::to_string(letter)
        .map_err(|e| QueueError::backend(name, "encoding a dead letter", e))
}

/// Stores `letter` (encoded as `json`), replacing the one with its key.
async fn store_letter<'c, P>(
    executor: impl sqlx::Executor<'c, Database = sqlx::Postgres>,
    name: &str,
    letter: &DeadLetter<P>,
    json: String,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO eventsink_dead_letters \
         (queue, letter_key, chain, event_id, failed_at, letter) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (queue, letter_key) \
         DO UPDATE SET chain = EXCLUDED.chain, event_id = EXCLUDED.event_id, \
         failed_at = EXCLUDED.failed_at, letter = EXCLUDED.letter",
    )
    .bind(name)
    .bind(&letter.key)
    .bind(&letter.chain)
    .bind(&*letter.event.id)
    .bind(letter.failed_at.timestamp_micros())
    .bind(json)
    .execute(executor)
    .await?;
    Ok(())
}

fn decode<P: DeserializeOwned>(name: &Arc<str>, json: &str) -> Result<DeadLetter<P>, QueueError> {
    serde_json::from_str(json).map_err(|e| QueueError::backend(name, "reading a dead letter", e))
}

impl<P> Ops<P> for PostgresQueue<P>
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
        let (storage, name) = (self.storage.clone(), Arc::clone(&self.name));
        Box::pin(async move {
            let mut jobs = jobs.into_iter().peekable();
            while jobs.peek().is_some() {
                let chunk: Vec<_> = jobs.by_ref().take(ROWS_PER_INSERT).collect();
                push_tasks(&storage, chunk).await.map_err(|e| {
                    if unique_violation(&e) {
                        QueueError::AlreadyQueued {
                            key: "(one of the batch)".into(),
                        }
                    } else {
                        push_error(&name, e)
                    }
                })?;
            }
            Ok(())
        })
    }

    fn parallel_batches(&self) -> usize {
        // each batch has its own connection and transaction.
        2
    }

    fn bury(&self, letter: DeadLetter<P>) -> BoxFuture<'static, Result<(), QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("storing a dead letter"),
        );
        Box::pin(async move {
            let json = encode_letter(&name, &letter)?;
            store_letter(&pool, &name, &letter, json)
                .await
                .map_err(fail)
        })
    }

    fn dead_page(
        &self,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'static, Result<Vec<DeadLetter<P>>, QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("listing dead letters"),
        );
        Box::pin(async move {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT letter FROM eventsink_dead_letters WHERE queue = $1 \
                 ORDER BY failed_at, letter_key LIMIT $2 OFFSET $3",
            )
            .bind(&*name)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(&pool)
            .await
            .map_err(fail)?;
            rows.iter().map(|(json,)| decode(&name, json)).collect()
        })
    }

    fn dead_after(
        &self,
        after: Option<(i64, String)>,
        until: i64,
        limit: u64,
    ) -> BoxFuture<'static, Result<DeadPage<P>, QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("listing dead letters"),
        );
        let (at, key) = after.unwrap_or((i64::MIN, String::new()));
        Box::pin(async move {
            let rows: Vec<(i64, String, String)> = sqlx::query_as(
                "SELECT failed_at, letter_key, letter FROM eventsink_dead_letters WHERE queue = $1 AND failed_at <= $2 \
                 AND (failed_at, letter_key) > ($3, $4) ORDER BY failed_at, letter_key LIMIT $5",
            )
            .bind(&*name)
            .bind(until)
            .bind(at)
            .bind(key)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&pool)
            .await
            .map_err(fail)?;
            let last = rows.last().map(|(at, key, _)| (*at, key.clone()));
            let letters = rows
                .iter()
                .map(|(_, _, json)| decode(&name, json))
                .collect::<Result<_, _>>()?;
            Ok(DeadPage { letters, last })
        })
    }

    fn dead_get(&self, key: &str) -> BoxFuture<'static, Result<Option<DeadLetter<P>>, QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("reading a dead letter"),
        );
        let key = key.to_owned();
        Box::pin(async move {
            let row: Option<(String,)> = sqlx::query_as(
                "SELECT letter FROM eventsink_dead_letters WHERE queue = $1 AND letter_key = $2",
            )
            .bind(&*name)
            .bind(key)
            .fetch_optional(&pool)
            .await
            .map_err(fail)?;
            row.map(|(json,)| decode(&name, &json)).transpose()
        })
    }

    fn dead_remove(&self, letter: &DeadLetter<P>) -> BoxFuture<'static, Result<bool, QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("removing a dead letter"),
        );
        let (key, chain) = (letter.key.clone(), letter.chain.clone());
        let failed_at = letter.failed_at.timestamp_micros();
        Box::pin(async move {
            let done = sqlx::query(
                "DELETE FROM eventsink_dead_letters \
                 WHERE queue = $1 AND letter_key = $2 AND chain = $3 AND failed_at = $4",
            )
            .bind(&*name)
            .bind(key)
            .bind(chain)
            .bind(failed_at)
            .execute(&pool)
            .await
            .map_err(fail)?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn dead_purge(&self) -> BoxFuture<'static, Result<u64, QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("purging dead letters"),
        );
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM eventsink_dead_letters WHERE queue = $1")
                .bind(&*name)
                .execute(&pool)
                .await
                .map_err(fail)?;
            Ok(done.rows_affected())
        })
    }

    fn dead_count(&self) -> BoxFuture<'static, Result<u64, QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("counting dead letters"),
        );
        Box::pin(async move {
            let (n,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM eventsink_dead_letters WHERE queue = $1")
                    .bind(&*name)
                    .fetch_one(&pool)
                    .await
                    .map_err(fail)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn delete_completed(&self, age: Duration) -> BoxFuture<'static, Result<u64, QueueError>> {
        let (pool, name, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("removing completed jobs"),
        );
        Box::pin(async move {
            let done = sqlx::query(
                "DELETE FROM apalis.jobs WHERE job_type = $1 AND status = 'Done' \
                 AND done_at IS NOT NULL AND done_at < now() - make_interval(secs => $2)",
            )
            .bind(&*name)
            .bind(age.as_secs_f64())
            .execute(&pool)
            .await
            .map_err(fail)?;
            Ok(done.rows_affected())
        })
    }

    fn bury_abandoned(&self) -> BoxFuture<'static, Result<u64, QueueError>> {
        let this = self.clone();
        let fail = self.fail("burying jobs apalis gave up on");
        Box::pin(async move {
            let (mut buried, mut after) = (0, String::new());
            loop {
                let rows: Vec<(String, Vec<u8>, i32, Option<String>)> = sqlx::query_as(
                    "SELECT id, job, attempts, last_result::text FROM apalis.jobs \
                     WHERE job_type = $1 AND (status = 'Killed' \
                     OR (status = 'Failed' AND attempts >= max_attempts)) \
                     AND id > $2 ORDER BY id LIMIT $3",
                )
                .bind(&*this.name)
                .bind(&after)
                .bind(ABANDONED_PAGE as i64)
                .fetch_all(&this.pool)
                .await
                .map_err(&fail)?;
                for (id, job, runs, last) in &rows {
                    let runs = i64::from(*runs);
                    let Some(letter) =
                        abandoned_letter::<P>(&this.name, job, runs, last.as_deref())
                    else {
                        continue;
                    };
                    let json = encode_letter(&this.name, &letter)?;
                    // Claim the job and write its letter in one transaction:
                    // two workers' maintenance never both bury it, and a
                    // crash leaves neither or both.
                    let mut tx = this.pool.begin().await.map_err(&fail)?;
                    let claimed = sqlx::query(
                        "UPDATE apalis.jobs SET status = 'Done' WHERE id = $1 \
                         AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))",
                    )
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(&fail)?;
                    if claimed.rows_affected() == 1 {
                        store_letter(&mut *tx, &this.name, &letter, json)
                            .await
                            .map_err(&fail)?;
                        buried += 1;
                    }
                    tx.commit().await.map_err(&fail)?;
                }
                match rows.last() {
                    Some((id, ..)) if rows.len() == ABANDONED_PAGE => after = id.clone(),
                    _ => return Ok(buried),
                }
            }
        })
    }

    fn release_worker(
        &self,
        name: &str,
        done: Vec<String>,
    ) -> BoxFuture<'static, Result<(), QueueError>> {
        let (pool, fail) = (
            self.pool.clone(),
            self.fail("releasing a stopped worker's jobs"),
        );
        let name = name.to_owned();
        Box::pin(async move {
            let mut tx = pool.begin().await.map_err(&fail)?;
            sqlx::query(
                "UPDATE apalis.jobs SET status = 'Done', done_at = now() \
                 WHERE lock_by = $1 AND status IN ('Queued', 'Running') AND id = ANY($2)",
            )
            .bind(&name)
            .bind(done)
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
            sqlx::query(
                "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL \
                 WHERE lock_by = $1 AND status IN ('Queued', 'Running')",
            )
            .bind(&name)
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
            tx.commit().await.map_err(&fail)
        })
    }

    fn keep_alive(&self, name: &str) -> BoxFuture<'static, Result<(), QueueError>> {
        let (pool, queue, fail) = (
            self.pool.clone(),
            Arc::clone(&self.name),
            self.fail("renewing a worker's lease"),
        );
        let name = name.to_owned();
        Box::pin(async move {
            // apalis-postgres' keep_alive.sql, for a worker that holds
            // its jobs as they are.
            sqlx::query(
                "UPDATE apalis.workers SET last_seen = NOW() WHERE id = $1 AND worker_type = $2",
            )
            .bind(name)
            .bind(&*queue)
            .execute(&pool)
            .await
            .map_err(fail)?;
            Ok(())
        })
    }

    fn lease(&self) -> (Duration, Duration) {
        let beat = self.config.heartbeat_interval;
        let missed = u32::try_from(self.config.missed_heartbeats).unwrap_or(u32::MAX);
        (beat, beat.saturating_mul(missed))
    }

    fn run_worker(
        &self,
        name: String,
        deliver: Deliver<P, Self>,
        options: &RunOptions,
        stop: BoxFuture<'static, ()>,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let config = self.config.clone().batch_size(options.concurrency.max(10));
        let storage = self.storage.clone().with_config(config).poll_with_strategy(
            Strategy::new()
                .stream(Pubsub::new(self.pool.clone(), self.name.to_string()))
                .interval(options.poll_interval),
        );
        let worker = WorkerBuilder::new(name)
            .backend(storage)
            .concurrency(options.concurrency)
            .build(deliver);
        Box::pin(async move {
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

/// Whether a push failed on a duplicate idempotency key (SQLSTATE 23505).
fn unique_violation(err: &apalis_core::backend::TaskSinkError<apalis_postgres::Error>) -> bool {
    use apalis_core::backend::TaskSinkError;
    match err {
        TaskSinkError::PushError(apalis_postgres::Error::Database(sqlx::Error::Database(db))) => {
            db.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}
