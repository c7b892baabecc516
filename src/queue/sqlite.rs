//! [`SqliteQueue`]: the embedded durable backend, one SQLite file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apalis_sqlite::{Config, SqliteStorage};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};

use super::Published;
use super::backend::ops::{Answer, Jobs, Ops, Payload, Store, WorkerRun};
use super::backend::{
    APALIS_MAX_ATTEMPTS, BuryJson, Fetched, LocalWake, Probe, Tolerant, Wakes, current_second,
    due_second, encode_job, lease_setter, outcomes, polled, queue_handle, run_apalis,
};
use super::error::QueueError;
use super::job::QueuedEvent;
use super::sql::{Dialect, SqlStore, Statements, Writers, stats_statement};
use super::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MISSED_HEARTBEATS};
use crate::BoxError;

/// How long a connection waits for a lock held by another before failing
/// with "database is locked". 5 s, the value the apalis notes found to
/// ride out a busy writer; past it the worker restarts.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in the queue's pool. 4: SQLite has one writer at a time;
/// more connections only wait on each other.
const MAX_CONNECTIONS: u32 = 4;

/// Marks done the jobs of worker `$1` in the JSON array `$2` it holds.
const MARK_DONE: &str = "UPDATE Jobs SET status = 'Done', done_at = strftime('%s', 'now') \
    WHERE lock_by = $1 AND status IN ('Queued', 'Running') \
    AND id IN (SELECT value FROM json_each($2))";

impl Dialect for sqlx::Sqlite {
    const SQL: Statements = Statements {
        // Two processes opening an old file at once must not both read
        // "old layout" and then fail to upgrade it.
        begin: "BEGIN IMMEDIATE",
        lock: None,
        old_layout: "SELECT EXISTS (SELECT 1 FROM pragma_table_info('eventsink_dead_letters') \
             WHERE name = 'event_id') AND NOT EXISTS \
             (SELECT 1 FROM pragma_table_info('eventsink_dead_letters') WHERE name = 'letter_key')",
        upgrade: "INSERT INTO eventsink_dead_letters \
             (queue, letter_key, chain, event_id, failed_at, letter)
            SELECT queue, key, '', event_id, failed_at,
                json_set(letter, '$.key', key, '$.chain', '')
            FROM (SELECT *, queue || ':' || json_extract(letter, '$.event.kind') || ':' || event_id
                  AS key FROM eventsink_dead_letters_v1);
            DROP TABLE eventsink_dead_letters_v1;",
        abandoned: "SELECT id, job, attempts, last_result FROM Jobs WHERE job_type = $1 \
             AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts)) \
             AND id > $2 ORDER BY id LIMIT $3",
        claim_abandoned: "UPDATE Jobs SET status = 'Done' WHERE id = $1 AND (status = 'Killed' \
             OR (status = 'Failed' AND attempts >= max_attempts))",
        delete_completed: "DELETE FROM Jobs WHERE job_type = $1 AND status = 'Done' \
             AND done_at IS NOT NULL AND done_at <= CAST(strftime('%s', 'now') AS INTEGER) - $2",
        release_done: MARK_DONE,
        // One writer at a time: nothing is ever skipped.
        mark_done: MARK_DONE,
        release_rest: "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL \
             WHERE lock_by = $1 AND status IN ('Queued', 'Running')",
        // apalis-sqlite's keep_alive.sql.
        keep_alive: "UPDATE Workers SET last_seen = strftime('%s', 'now') \
             WHERE id = $1 AND worker_type = $2",
        stats: stats_statement!("Jobs", "run_at"),
        migrations_exist: "SELECT EXISTS \
             (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1)",
        versions: "SELECT version FROM \"{table}\"",
        // sqlx's SQLite driver rolls back a `BEGIN` whose caller went away.
        outside_transaction: None,
    };

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    fn apalis() -> (&'static str, sqlx::migrate::Migrator) {
        ("apalis-sqlite", SqliteStorage::<()>::migrations())
    }
}

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
/// (same columns and values; a duplicate idempotency key is skipped, and
/// is [`Published::AlreadyQueued`]), but
/// [`ROWS_PER_INSERT`] rows per statement, all in one transaction. A batch
/// that fits one statement is that statement alone: SQLite makes every
/// statement atomic and durable by itself, and `BEGIN` and `COMMIT` would
/// be two more round trips to sqlx's connection thread (most of a lone
/// publish's time).
async fn insert_jobs<P: Serialize>(
    conn: &mut sqlx::SqliteConnection,
    queue: &Arc<str>,
    jobs: &[(QueuedEvent<P>, Duration)],
) -> Result<Vec<Published>, QueueError> {
    let fail = |e: sqlx::Error| QueueError::backend(queue, "pushing jobs", e);
    let now = current_second();
    if jobs.len() <= ROWS_PER_INSERT {
        let mut insert = insert_statement(queue, jobs, now)?;
        let stored = insert
            .build_query_scalar()
            .fetch_all(&mut *conn)
            .await
            .map_err(fail)?;
        return Ok(outcomes(jobs, stored));
    }
    let mut stored = Vec::with_capacity(jobs.len());
    let mut tx = sqlx::Connection::begin(conn).await.map_err(fail)?;
    for chunk in jobs.chunks(ROWS_PER_INSERT) {
        let mut insert = insert_statement(queue, chunk, now)?;
        let keys: Vec<String> = insert
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(fail)?;
        stored.extend(keys);
    }
    tx.commit().await.map_err(fail)?;
    Ok(outcomes(jobs, stored))
}

/// One `INSERT` of `jobs` (at most [`ROWS_PER_INSERT`]), due from `now`.
/// sqlx keeps it prepared on each connection: one statement per row count,
/// at most 64, within sqlx's default cache of 100 statements.
fn insert_statement<P: Serialize>(
    queue: &Arc<str>,
    jobs: &[(QueuedEvent<P>, Duration)],
    now: u64,
) -> Result<sqlx::QueryBuilder<sqlx::Sqlite>, QueueError> {
    let mut insert = sqlx::QueryBuilder::new(
        "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, \
         priority, metadata, idempotency_key) ",
    );
    let mut rows = Vec::with_capacity(jobs.len());
    for (job, delay) in jobs {
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
            .push_bind(queue.to_string())
            .push("'Pending', 0")
            .push_bind(i64::from(APALIS_MAX_ATTEMPTS))
            .push_bind(i64::try_from(due).unwrap_or(i64::MAX))
            .push("0, '{}'")
            .push_bind(key);
    });
    // The keys of the rows stored: a duplicate is skipped, not returned.
    insert.push(" ON CONFLICT (job_type, idempotency_key) DO NOTHING RETURNING idempotency_key");
    Ok(insert)
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
/// **Several processes** on one machine can share the file: publishers
/// and workers alike, each opening it with `open` (there is no lock to
/// take and nothing is refused). A worker takes its jobs in one write
/// statement (apalis' `UPDATE ... RETURNING`, which holds the file's write
/// lock from its read to its write), marking them as its own, so two
/// workers do not take the same job (unless its lease expired: then it
/// runs again, at-least-once), and a job is acknowledged only by the
/// worker that holds it. Writers queue behind each other (one writer at a
/// time, each waiting up to the busy timeout): a second worker shares the
/// load, it does not add write throughput. A worker that dies leaves its
/// jobs to others after `heartbeat × missed`
/// ([`lease`](SqliteQueueBuilder::lease), 15 s by default).
/// `tests/processes.rs` runs two worker processes and a publisher process
/// on one file: every event arrives, none is lost. Keep the file on a
/// local file system: WAL needs shared memory between the processes,
/// which network file systems do not provide.
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
    /// The file's write-ahead log (`<file>-wal`), which idle workers watch.
    wal: Arc<Path>,
    store: SqlStore<sqlx::Sqlite>,
    storage: SqliteStorage<QueuedEvent<P>>,
    config: Config,
    writers: Writers<sqlx::Sqlite>,
}

queue_handle! {
    SqliteQueue { name, wake, wal, store, storage, config, writers }, store(store: SqlStore<sqlx::Sqlite>), leased,
    " let queue: eventsink::queue::SqliteQueue = eventsink::queue::SqliteQueue::open(\"queue.db\", \"q\").await?;"
}

/// Settings of a [`SqliteQueue`] before it is opened with
/// [`open`](SqliteQueueBuilder::open).
///
/// ```
/// use std::time::Duration;
/// use eventsink::queue::SqliteQueue;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
/// # let tmp = tempfile::tempdir().unwrap();
/// let queue: SqliteQueue = SqliteQueue::builder("webhooks")
///     .synchronous_full(true)
///     .lease(Duration::from_secs(2), 3)
///     .open(tmp.path().join("q.db"))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct SqliteQueueBuilder {
    name: Arc<str>,
    create: bool,
    full: bool,
    busy_timeout: Duration,
    heartbeat: Duration,
    missed: usize,
}

impl SqliteQueueBuilder {
    lease_setter!("eventsink::queue::SqliteQueue::builder(\"q\")");

    /// `synchronous=FULL` (every commit survives power loss, each costs an
    /// fsync) instead of `NORMAL` (a crash of the process loses nothing;
    /// power loss may lose the last commits).
    ///
    /// ```
    /// # let b = eventsink::queue::SqliteQueue::builder("q");
    /// let b = b.synchronous_full(true);
    /// ```
    pub fn synchronous_full(mut self, full: bool) -> Self {
        self.full = full;
        self
    }

    /// Whether [`open`](SqliteQueueBuilder::open) creates the file and
    /// its tables when they are missing (`true`, the default). With
    /// `false` it opens only a file that already holds a queue (apalis'
    /// `Jobs` table), and otherwise fails with [`QueueError::Missing`],
    /// leaving the path as it was: for tools that inspect a queue, where
    /// a mistyped path must not become an empty queue.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use eventsink::queue::{QueueError, SqliteQueue};
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let path = tmp.path().join("typo.db");
    /// let opened = SqliteQueue::builder("q").create_if_missing(false).open::<serde_json::Value>(&path).await;
    /// assert!(matches!(opened, Err(QueueError::Missing { .. })));
    /// assert!(!path.exists());
    /// # }
    /// ```
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// How long to wait for another connection's lock
    /// ([`SQLITE_BUSY_TIMEOUT`]).
    ///
    /// ```
    /// # let b = eventsink::queue::SqliteQueue::builder("q");
    /// let b = b.busy_timeout(std::time::Duration::from_secs(10));
    /// ```
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Opens the queue in the SQLite file at `path`: creates the file if
    /// needed (see [`create_if_missing`](SqliteQueueBuilder::create_if_missing)),
    /// opens the pool and migrates.
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the file cannot be opened or migrated;
    /// [`QueueError::Misconfigured`] if it is not a SQLite database or is
    /// read-only.
    /// [`QueueError::NewerSchema`] if a newer apalis migrated it.
    /// [`QueueError::Missing`] if it holds no queue and
    /// `create_if_missing` is off.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let queue: eventsink::queue::SqliteQueue = eventsink::queue::SqliteQueue::builder("q").open(tmp.path().join("q.db")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn open<P>(self, path: impl AsRef<Path>) -> Result<SqliteQueue<P>, QueueError>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let name = self.name;
        let fail = |action| {
            let name = Arc::clone(&name);
            move |e: sqlx::Error| QueueError::backend(&name, action, e)
        };
        let missing = |what: &str| QueueError::Missing {
            queue: Arc::clone(&name),
            what: format!("the SQLite file {:?} {what}", path.as_ref()),
        };
        if !self.create && !path.as_ref().is_file() {
            return Err(missing("does not exist"));
        }
        if !self.create
            && !holds_queue(path.as_ref())
                .await
                .map_err(fail("opening the SQLite file"))?
        {
            return Err(missing("holds no queue (no apalis Jobs table)"));
        }
        let options = SqliteConnectOptions::new()
            .filename(path.as_ref())
            .create_if_missing(self.create)
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
        super::contract::check(&setup, &name).await?;
        SqliteStorage::migrations()
            .run(&setup)
            .await
            .map_err(|e| QueueError::backend(&name, "migrating the SQLite file", e))?;
        Store::<P>::prepare(&SqlStore::new(setup.clone(), Arc::clone(&name))).await?;
        sqlx::raw_sql(JOBS_PLANNER_STATS)
            .execute(&setup)
            .await
            .map_err(fail("writing planner statistics"))?;
        setup.close().await;
        // No ping before each use of a pooled connection: a connection to a
        // local file does not go stale as a network one does (a failing
        // statement still fails its publish), and the ping was one more
        // round trip to sqlx's connection thread on every publish.
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(fail("opening the SQLite file"))?;
        let config = Config::default()
            .queue(&*name)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed);
        let storage = SqliteStorage::new(&pool).with_config(config.clone());
        Ok(SqliteQueue {
            writers: Writers::new(MAX_CONNECTIONS),
            store: SqlStore::new(pool, Arc::clone(&name)),
            name,
            wake: LocalWake::new(),
            wal: wal_path(path.as_ref()).into(),
            storage,
            config,
        })
    }
}

/// The write-ahead log of the SQLite file at `db`: `<db>-wal`, absolute,
/// so that a later change of directory does not lose it.
fn wal_path(db: &Path) -> PathBuf {
    let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_owned());
    let mut wal = db.into_os_string();
    wal.push("-wal");
    wal.into()
}

/// A [`Probe`] of the write-ahead log `wal`: its size and modification
/// time, which every commit to the file, by any connection of any process,
/// changes (it appends to the log, or writes it again from the start after
/// a checkpoint), and which a fetch that finds nothing leaves alone. One
/// `stat`, no query, so an idle worker's tick costs next to nothing.
///
/// Never by opening the log or the WAL index: closing any descriptor of a
/// file ends every POSIX lock the process holds on it, SQLite's included,
/// and with its locks gone two processes overwrite each other's
/// transactions. Two commits within one tick of the file system's clock
/// that leave the size alone may look like one; the worker then finds the
/// second within a second (see `Wakes`). Metadata that cannot be read
/// counts as changed: the worker then fetches at every tick.
fn wal_probe(wal: Arc<Path>) -> Probe {
    let mut last = None;
    Box::new(move || {
        let now = std::fs::metadata(&wal)
            .and_then(|meta| Ok((meta.len(), meta.modified()?)))
            .ok();
        let changed = now.is_none() || now != last;
        last = now;
        changed
    })
}

/// Whether the SQLite file at `path` has apalis' `Jobs` table; read on a
/// read-only connection, which changes nothing in a file that is not a
/// queue (opening the queue's pool would switch it to WAL).
async fn holds_queue(path: &Path) -> Result<bool, sqlx::Error> {
    use sqlx::ConnectOptions as _;
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await?;
    let holds = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'Jobs')",
    )
    .fetch_one(&mut conn)
    .await;
    sqlx::Connection::close(conn).await?;
    holds
}

impl SqliteQueue {
    /// Settings for the queue `name`, to [`open`](SqliteQueueBuilder::open)
    /// in a SQLite file.
    ///
    /// ```
    /// let builder = eventsink::queue::SqliteQueue::builder("webhooks");
    /// # let _ = builder;
    /// ```
    pub fn builder(name: &str) -> SqliteQueueBuilder {
        SqliteQueueBuilder {
            name: name.into(),
            create: true,
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
    pub async fn open(path: impl AsRef<Path>, name: &str) -> Result<Self, QueueError>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        SqliteQueue::builder(name).open(path).await
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
        self.store.pool()
    }
}

impl<P: Payload> Ops<P> for SqliteQueue<P> {
    fn push(&self, jobs: Jobs<P>) -> Answer<Vec<Published>> {
        let (pool, name, wake) = (
            self.pool().clone(),
            Arc::clone(&self.name),
            self.wake.clone(),
        );
        let writers = self.writers.clone();
        let due_now = jobs.iter().any(|(_, delay)| delay.is_zero());
        Box::pin(async move {
            let fail = |e| QueueError::backend(&name, "pushing jobs", e);
            let mut conn = writers.take(&pool).await.map_err(fail)?;
            let outcomes = insert_jobs(&mut conn, &name, &jobs).await?;
            // Kept only once its statements ended (see `Writers`).
            writers.keep(conn);
            if due_now {
                wake.notify();
            }
            Ok(outcomes)
        })
    }

    fn drops_run_on_stop(&self) -> bool {
        true
    }

    fn run_worker(&self, run: WorkerRun<P>) -> BoxFuture<'static, Result<(), BoxError>> {
        let storage = SqliteStorage::<Fetched<P>>::new(self.store.pool());
        let probe = wal_probe(Arc::clone(&self.wal));
        let wakes = Wakes::new(self.wake.stream(), run.poll_interval, Some(probe));
        let storage = polled!(
            storage.with_config(self.config.clone()),
            self.config,
            wakes,
            run
        );
        let store = self.store.clone();
        let bury: BuryJson =
            Arc::new(move |letter| Store::<serde_json::Value>::bury(&store, letter));
        Box::pin(run_apalis!(storage, run, |deliver| Tolerant {
            deliver,
            bury
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe sees what another pool (as another process would) commits,
    /// and not what changes nothing: a read, or an update of no rows (what
    /// an idle worker's fetch is).
    #[tokio::test]
    async fn the_wal_probe_sees_commits_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q.db");
        let queue: SqliteQueue = SqliteQueue::open(&path, "q").await.unwrap();
        let other: SqliteQueue = SqliteQueue::open(&path, "q").await.unwrap();
        let mut probe = wal_probe(Arc::clone(&queue.wal));
        assert!(probe(), "the first look counts as a change");
        assert!(!probe(), "nothing was committed since");
        sqlx::query("UPDATE Jobs SET status = 'Queued' WHERE job_type = 'no such queue'")
            .execute(queue.pool())
            .await
            .unwrap();
        sqlx::query("SELECT COUNT(*) FROM Jobs")
            .execute(queue.pool())
            .await
            .unwrap();
        assert!(!probe(), "an update of no rows and a read commit nothing");
        let job = QueuedEvent::new("q", crate::Event::new("k", serde_json::json!(1)));
        other.push(vec![(job, Duration::ZERO)]).await.unwrap();
        assert!(probe(), "another pool's commit");
        assert!(!probe());
    }

    #[test]
    fn an_unreadable_wal_counts_as_a_change() {
        let mut probe = wal_probe(Path::new("/nonexistent/q.db-wal").into());
        assert!(probe());
        assert!(probe());
    }
}
