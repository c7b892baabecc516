//! [`SqliteQueue`]: the embedded durable backend, one SQLite file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::backend::ext::BackendExt;
use apalis_core::backend::ext::poll_strategy::Strategy;
use apalis_core::error::WorkerError;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_sqlite::{Config, SqliteStorage};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::backend::{
    ABANDONED_PAGE, APALIS_MAX_ATTEMPTS, LocalWake, abandoned_letter, current_second, due_second,
    encode_job, ops::DeadPage, ops::Ops,
};
use super::dead_letter::{DeadLetter, DeadLetters};
use super::error::QueueError;
use super::worker::{Deliver, RunOptions};
use super::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MISSED_HEARTBEATS, QueuedEvent};
use crate::BoxError;

/// How long a connection waits for a lock held by another before failing
/// with "database is locked". 5 s, the value the apalis notes found to
/// ride out a busy writer; past it the worker restarts.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in the queue's pool. 4: SQLite has one writer at a time;
/// more connections only wait on each other.
const MAX_CONNECTIONS: u32 = 4;

/// The dead letters, one per `(queue, letter_key)`: the key of the
/// event's jobs, `{queue}:{kind}:{id}`. `chain` says which delivery chain
/// wrote the letter, so that a replay removes only the letter it replayed.
const DEAD_LETTER_TABLE: &str = "CREATE TABLE IF NOT EXISTS eventsink_dead_letters (
    queue TEXT NOT NULL,
    letter_key TEXT NOT NULL,
    chain TEXT NOT NULL,
    event_id TEXT NOT NULL,
    failed_at INTEGER NOT NULL,
    letter TEXT NOT NULL,
    PRIMARY KEY (queue, letter_key)
);
CREATE INDEX IF NOT EXISTS eventsink_dead_letters_order
    ON eventsink_dead_letters (queue, failed_at, letter_key);";

/// Whether the dead-letter table is the first layout (keyed by event id
/// alone), which [`UPGRADE_DEAD_LETTERS`] converts.
const OLD_DEAD_LETTERS: &str = "SELECT COUNT(*) FROM pragma_table_info('eventsink_dead_letters') \
     WHERE name = 'event_id' AND NOT EXISTS \
     (SELECT 1 FROM pragma_table_info('eventsink_dead_letters') WHERE name = 'letter_key')";

/// Sets the table of the first layout aside for [`UPGRADE_DEAD_LETTERS`].
const RENAME_OLD_DEAD_LETTERS: &str =
    "ALTER TABLE eventsink_dead_letters RENAME TO eventsink_dead_letters_v1";

/// Moves letters of the first layout, renamed to
/// `eventsink_dead_letters_v1`, into the current table, keyed
/// `{queue}:{kind}:{id}`; their chain is unknown (empty).
const UPGRADE_DEAD_LETTERS: &str =
    "INSERT INTO eventsink_dead_letters (queue, letter_key, chain, event_id, failed_at, letter)
    SELECT queue, key, '', event_id, failed_at, json_set(letter, '$.key', key, '$.chain', '')
    FROM (SELECT *, queue || ':' || json_extract(letter, '$.event.kind') || ':' || event_id AS key
          FROM eventsink_dead_letters_v1);
DROP TABLE eventsink_dead_letters_v1;";

/// Planner statistics for apalis' `Jobs` table, written at every open:
/// those of a large table whose `status` and `lock_by` columns tell rows
/// apart poorly. Without statistics SQLite finds the jobs to lock by
/// scanning every pending job, and the jobs to acknowledge by scanning
/// every job the worker ever ran: draining a backlog is quadratic
/// (10,000 queued events drained at ~330/s). With them both go through the
/// primary key. `ANALYZE sqlite_schema` creates `sqlite_stat1` if needed
/// and reloads it.
const JOBS_PLANNER_STATS: &str = "ANALYZE sqlite_schema;
DELETE FROM sqlite_stat1 WHERE tbl = 'Jobs';
INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
    ('Jobs', 'sqlite_autoindex_Jobs_1', '1000000 1'),
    ('Jobs', 'LIdx', '1000000 100000'),
    ('Jobs', 'idx_jobs_status_run_at', '1000000 250000 2'),
    ('Jobs', 'idx_jobs_job_type_status_run_at', '1000000 500000 250000 2'),
    ('Jobs', 'idx_jobs_completed_done_at', '1000000 250000 2 2'),
    ('Jobs', 'idx_jobs_running', '1000000 2'),
    ('Jobs', 'idx_jobs_idempotency_key', '1000000 500000 1'),
    ('Jobs', 'idx_jobs_pending', '1000000 500000 500000 2 1'),
    ('Jobs', 'idx_jobs_failed', '1000000 500000 500000 2 1'),
    ('Jobs', 'idx_jobs_claimable', '1000000 250000 100000');
ANALYZE sqlite_schema;";

/// Rows per `INSERT` of [`insert_jobs`]. 64 rows of 7 values stay far
/// below SQLite's 32,766 bound parameters. One statement per 64 jobs
/// instead of one per job: each statement is a round trip to sqlx's
/// connection thread, and that, not SQLite, was most of a batch's time.
const ROWS_PER_INSERT: usize = 64;

/// Stores jobs in apalis-sqlite 1.0's `Jobs` table as its own push does
/// (same columns and values; a duplicate idempotency key is skipped), but
/// [`ROWS_PER_INSERT`] rows per statement, all in one transaction.
async fn insert_jobs<P: Serialize>(
    pool: &SqlitePool,
    queue: &Arc<str>,
    jobs: &[(QueuedEvent<P>, Duration)],
) -> Result<(), QueueError> {
    let fail = |e: sqlx::Error| QueueError::backend(queue, "pushing jobs", e);
    let now = current_second();
    let mut tx = pool.begin().await.map_err(fail)?;
    for chunk in jobs.chunks(ROWS_PER_INSERT) {
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, \
             priority, metadata, idempotency_key) ",
        );
        let mut rows = Vec::with_capacity(chunk.len());
        for (job, delay) in chunk {
            let data = encode_job(queue, job)?;
            let due = if delay.is_zero() {
                now
            } else {
                due_second(*delay)
            };
            rows.push((data, job.idempotency_key(), due));
        }
        insert.push_values(rows, |mut row, (data, key, due)| {
            row.push_bind(data)
                .push_bind(ulid::Ulid::generate().to_string())
                .push_bind(&**queue)
                .push("'Pending', 0")
                .push_bind(i64::from(APALIS_MAX_ATTEMPTS))
                .push_bind(i64::try_from(due).unwrap_or(i64::MAX))
                .push("0, '{}'")
                .push_bind(key);
        });
        insert.push(" ON CONFLICT (job_type, idempotency_key) DO NOTHING");
        insert
            .build()
            .persistent(chunk.len() == ROWS_PER_INSERT)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
    }
    tx.commit().await.map_err(fail)
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
    executor: impl sqlx::Executor<'c, Database = sqlx::Sqlite>,
    name: &str,
    letter: &DeadLetter<P>,
    json: String,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT OR REPLACE INTO eventsink_dead_letters \
         (queue, letter_key, chain, event_id, failed_at, letter) VALUES (?, ?, ?, ?, ?, ?)",
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

/// Creates the dead-letter table, or converts one of the first layout, in
/// one transaction.
async fn prepare_dead_letters(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    // IMMEDIATE: two processes opening an old file at once must not both
    // read "old layout" and then fail to upgrade it.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let (old,): (i64,) = sqlx::query_as(OLD_DEAD_LETTERS).fetch_one(&mut *tx).await?;
    if old > 0 {
        sqlx::raw_sql(RENAME_OLD_DEAD_LETTERS)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::raw_sql(DEAD_LETTER_TABLE).execute(&mut *tx).await?;
    if old > 0 {
        sqlx::raw_sql(UPGRADE_DEAD_LETTERS)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// A queue in its own SQLite file (the embedded default; feature `sqlite`).
///
/// [`open`](SqliteQueue::open) creates the file if needed, opens its own
/// pool with WAL, `synchronous=NORMAL` ([`synchronous_full`] for power-loss
/// durability), a [`SQLITE_BUSY_TIMEOUT`], and runs apalis' migrations
/// plus the dead-letter table — not apalis' `setup()`, which turns
/// `synchronous` off on one connection. Use a file of its own: apalis'
/// `_sqlx_migrations` table would collide with the application's.
///
/// Several processes can share the file (one writer at a time). A worker
/// that dies leaves its jobs to others after `heartbeat × missed`
/// ([`lease`](SqliteQueueBuilder::lease), 15 s by default).
///
/// [`synchronous_full`]: SqliteQueueBuilder::synchronous_full
///
/// ```
/// use eventsink::queue::{SqliteQueue, ThroughTaskQueue};
/// use eventsink::{Event, RecordingSink, SinkExt};
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// # let tmp = tempfile::tempdir()?;
/// let queue = SqliteQueue::open(tmp.path().join("queue.db"), "webhooks").await?;
/// let recorder = RecordingSink::new();
/// let mut sink = ThroughTaskQueue::new(queue).layer(recorder.clone());
/// let worker = sink.worker().spawn();
/// sink.publish(Event::new("ping", serde_json::json!(1))).await?;
/// recorder.wait_for(1, std::time::Duration::from_secs(10)).await?;
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct SqliteQueue<P = serde_json::Value> {
    name: Arc<str>,
    wake: LocalWake,
    pool: SqlitePool,
    storage: SqliteStorage<QueuedEvent<P>>,
    config: Config,
}

impl<P> Clone for SqliteQueue<P> {
    fn clone(&self) -> Self {
        SqliteQueue {
            name: Arc::clone(&self.name),
            wake: self.wake.clone(),
            pool: self.pool.clone(),
            storage: self.storage.clone(),
            config: self.config.clone(),
        }
    }
}

impl<P> fmt::Debug for SqliteQueue<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteQueue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`SqliteQueue`] before it is opened.
///
/// ```
/// use std::time::Duration;
/// use eventsink::queue::SqliteQueue;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
/// # let tmp = tempfile::tempdir().unwrap();
/// let queue: SqliteQueue = SqliteQueue::builder(tmp.path().join("q.db"), "webhooks")
///     .synchronous_full(true)
///     .lease(Duration::from_secs(2), 3)
///     .open()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteQueueBuilder {
    path: PathBuf,
    name: Arc<str>,
    full: bool,
    busy_timeout: Duration,
    heartbeat: Duration,
    missed: usize,
}

impl SqliteQueueBuilder {
    /// `synchronous=FULL` (every commit survives power loss, each costs an
    /// fsync) instead of `NORMAL` (a crash of the process loses nothing;
    /// power loss may lose the last commits).
    ///
    /// ```
    /// # let b = eventsink::queue::SqliteQueue::builder("q.db", "q");
    /// let b = b.synchronous_full(true);
    /// ```
    pub fn synchronous_full(mut self, full: bool) -> Self {
        self.full = full;
        self
    }

    /// How long to wait for another connection's lock
    /// ([`SQLITE_BUSY_TIMEOUT`]).
    ///
    /// ```
    /// # let b = eventsink::queue::SqliteQueue::builder("q.db", "q");
    /// let b = b.busy_timeout(std::time::Duration::from_secs(10));
    /// ```
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Worker heartbeat and how many may be missed before another worker
    /// takes over the jobs of a dead one ([`DEFAULT_HEARTBEAT_INTERVAL`] ×
    /// [`DEFAULT_MISSED_HEARTBEATS`]).
    ///
    /// ```
    /// # let b = eventsink::queue::SqliteQueue::builder("q.db", "q");
    /// let b = b.lease(std::time::Duration::from_secs(1), 2); // takeover after ~2 s
    /// ```
    pub fn lease(mut self, heartbeat: Duration, missed: usize) -> Self {
        self.heartbeat = heartbeat;
        self.missed = missed.max(1);
        self
    }

    /// Creates the file if needed, opens the pool and migrates.
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the file cannot be opened or migrated.
    /// [`QueueError::NewerSchema`] if a newer apalis migrated it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let queue: eventsink::queue::SqliteQueue = eventsink::queue::SqliteQueue::builder(tmp.path().join("q.db"), "q").open().await?;
    /// # Ok(()) }
    /// ```
    pub async fn open<P>(self) -> Result<SqliteQueue<P>, QueueError> {
        let name = self.name;
        let fail = |action| {
            let name = Arc::clone(&name);
            move |e: sqlx::Error| QueueError::backend(&name, action, e)
        };
        let options = SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if self.full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(self.busy_timeout);
        // Migrate on a connection of its own, so that every connection of
        // the queue's pool loads the schema with the planner statistics.
        let setup = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(fail("opening the SQLite file"))?;
        super::contract::check_sqlite(&setup, &name).await?;
        SqliteStorage::migrations()
            .run(&setup)
            .await
            .map_err(|e| QueueError::backend(&name, "migrating the SQLite file", e))?;
        prepare_dead_letters(&setup)
            .await
            .map_err(fail("creating the dead-letter table"))?;
        sqlx::raw_sql(JOBS_PLANNER_STATS)
            .execute(&setup)
            .await
            .map_err(fail("writing planner statistics"))?;
        setup.close().await;
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(fail("opening the SQLite file"))?;
        let config = Config::default()
            .queue(&*name)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed);
        let storage = SqliteStorage::new(&pool).with_config(config.clone());
        Ok(SqliteQueue {
            name,
            wake: LocalWake::new(),
            pool,
            storage,
            config,
        })
    }
}

impl SqliteQueue {
    /// Settings for the queue `name` in the SQLite file at `path`.
    ///
    /// ```
    /// let builder = eventsink::queue::SqliteQueue::builder("queue.db", "webhooks");
    /// # let _ = builder;
    /// ```
    pub fn builder(path: impl AsRef<Path>, name: &str) -> SqliteQueueBuilder {
        SqliteQueueBuilder {
            path: path.as_ref().to_path_buf(),
            name: name.into(),
            full: false,
            busy_timeout: SQLITE_BUSY_TIMEOUT,
            heartbeat: DEFAULT_HEARTBEAT_INTERVAL,
            missed: DEFAULT_MISSED_HEARTBEATS,
        }
    }
}

impl<P> SqliteQueue<P> {
    /// Opens (creating if needed) the queue `name` in the SQLite file at
    /// `path`, with the defaults of [`builder`](SqliteQueue::builder).
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the file cannot be opened or migrated.
    /// [`QueueError::NewerSchema`] if a newer apalis migrated it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let queue: eventsink::queue::SqliteQueue = eventsink::queue::SqliteQueue::open(tmp.path().join("q.db"), "q").await?;
    /// # Ok(()) }
    /// ```
    pub async fn open(path: impl AsRef<Path>, name: &str) -> Result<Self, QueueError> {
        SqliteQueue::builder(path, name).open().await
    }

    /// The queue's name.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let queue: eventsink::queue::SqliteQueue = eventsink::queue::SqliteQueue::open(tmp.path().join("q.db"), "q").await?;
    /// assert_eq!(queue.name(), "q");
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's pool, for inspection.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let queue: eventsink::queue::SqliteQueue = eventsink::queue::SqliteQueue::open(tmp.path().join("q.db"), "q").await?;
    /// assert!(queue.pool().size() >= 1);
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The queue's dead letters.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let queue: eventsink::queue::SqliteQueue = eventsink::queue::SqliteQueue::open(tmp.path().join("q.db"), "q").await?;
    /// assert_eq!(queue.dead_letters().count().await?, 0);
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

fn decode<P: DeserializeOwned>(name: &Arc<str>, json: &str) -> Result<DeadLetter<P>, QueueError> {
    serde_json::from_str(json).map_err(|e| QueueError::backend(name, "reading a dead letter", e))
}

impl<P> Ops<P> for SqliteQueue<P>
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
        let (pool, name, wake) = (self.pool.clone(), Arc::clone(&self.name), self.wake.clone());
        let due_now = jobs.iter().any(|(_, delay)| delay.is_zero());
        Box::pin(async move {
            insert_jobs(&pool, &name, &jobs).await?;
            if due_now {
                wake.notify();
            }
            Ok(())
        })
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
                "SELECT letter FROM eventsink_dead_letters WHERE queue = ? \
                 ORDER BY failed_at, letter_key LIMIT ? OFFSET ?",
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
                "SELECT failed_at, letter_key, letter FROM eventsink_dead_letters WHERE queue = ? AND failed_at <= ? \
                 AND (failed_at, letter_key) > (?, ?) ORDER BY failed_at, letter_key LIMIT ?",
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
                "SELECT letter FROM eventsink_dead_letters WHERE queue = ? AND letter_key = ?",
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
                 WHERE queue = ? AND letter_key = ? AND chain = ? AND failed_at = ?",
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
            let done = sqlx::query("DELETE FROM eventsink_dead_letters WHERE queue = ?")
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
                sqlx::query_as("SELECT COUNT(*) FROM eventsink_dead_letters WHERE queue = ?")
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
            let cutoff =
                chrono::Utc::now().timestamp() - i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
            let done = sqlx::query(
                "DELETE FROM Jobs WHERE job_type = ? AND status = 'Done' \
                 AND done_at IS NOT NULL AND done_at <= ?",
            )
            .bind(&*name)
            .bind(cutoff)
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
                let rows: Vec<(String, Vec<u8>, i64, Option<String>)> = sqlx::query_as(
                    "SELECT id, job, attempts, last_result FROM Jobs WHERE job_type = ? \
                     AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts)) \
                     AND id > ? ORDER BY id LIMIT ?",
                )
                .bind(&*this.name)
                .bind(&after)
                .bind(ABANDONED_PAGE as i64)
                .fetch_all(&this.pool)
                .await
                .map_err(&fail)?;
                for (id, job, runs, last) in &rows {
                    let Some(letter) =
                        abandoned_letter::<P>(&this.name, job, *runs, last.as_deref())
                    else {
                        continue;
                    };
                    let json = encode_letter(&this.name, &letter)?;
                    // Claim the job and write its letter in one transaction:
                    // two workers' maintenance never both bury it, and a
                    // crash leaves neither or both.
                    let mut tx = this
                        .pool
                        .begin_with("BEGIN IMMEDIATE")
                        .await
                        .map_err(&fail)?;
                    let claimed = sqlx::query(
                        "UPDATE Jobs SET status = 'Done' WHERE id = ? AND (status = 'Killed' \
                         OR (status = 'Failed' AND attempts >= max_attempts))",
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

    fn drops_run_on_stop(&self) -> bool {
        true
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
            let done = serde_json::to_string(&done)
                .map_err(|e| QueueError::backend(&Arc::from(name.as_str()), "releasing", e))?;
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(&fail)?;
            sqlx::query(
                "UPDATE Jobs SET status = 'Done', done_at = strftime('%s', 'now') \
                 WHERE lock_by = ? AND status IN ('Queued', 'Running') \
                 AND id IN (SELECT value FROM json_each(?))",
            )
            .bind(&name)
            .bind(done)
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
            sqlx::query(
                "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL \
                 WHERE lock_by = ? AND status IN ('Queued', 'Running')",
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
            // apalis-sqlite's keep_alive.sql.
            sqlx::query(
                "UPDATE Workers SET last_seen = strftime('%s', 'now') WHERE id = ? AND worker_type = ?",
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
                .stream(self.wake.stream())
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
