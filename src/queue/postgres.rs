//! [`PostgresQueue`]: many workers on many machines, one Postgres database.

use std::sync::Arc;
use std::time::Duration;

use apalis_postgres::{Config, PostgresStorage, Pubsub};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::pool::PoolConnectionMetadata;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgQueryResult};

use super::Published;
use super::backend::ops::{Answer, Jobs, Ops, Payload, Store, WorkerRun};
use super::backend::{
    APALIS_MAX_ATTEMPTS, BuryJson, Fetched, Tolerant, Wakes, current_second, due_second,
    encode_job, lease_setter, outcomes, polled, queue_handle, run_apalis,
};
use super::error::QueueError;
use super::job::QueuedEvent;
use super::sql::{Dialect, SqlStore, Statements, Writers, outside_transaction, stats_statement};
use super::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MISSED_HEARTBEATS};
use crate::BoxError;

/// Connections in the queue's pool. 8: publishing, the worker's fetches
/// and acks, and the dead-letter API each get a few.
/// [`connect`](PostgresQueueBuilder::connect) opens them all at once and
/// keeps them open (a fixed-size pool, as HikariCP advises): opening one
/// took ~90 ms here with TLS (`sslmode=prefer`, sqlx's default), a wait a
/// publish would otherwise meet whenever the pool grew or replaced one.
pub const POSTGRES_MAX_CONNECTIONS: u32 = 8;

/// How long a pooled connection may sit idle before the pool checks it
/// (one round trip) before handing it out. sqlx checks every time by
/// default: a publish by one caller paid two round trips instead of one.
/// 1 s, as HikariCP skips its check for connections used in the last
/// 500 ms; a connection the server or a proxy closed while idle is found
/// and replaced, one that breaks mid-use fails its statement either way.
const POSTGRES_PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Most jobs a Postgres worker fetches at once (elsewhere
/// [`DEFAULT_FETCH_BATCH`](super::DEFAULT_FETCH_BATCH)). apalis
/// acknowledges them in one statement of ~90 bytes per job, and sqlx 0.9.0
/// does not set `TCP_NODELAY` (sqlx issue #4335): over TLS, a statement
/// longer than one TLS record (16 KiB) goes out in two writes, and the
/// second waits for the server's delayed ACK, ~40 ms. 128 jobs keep it in
/// one record. Measured with `cargo bench --bench throughput -- --quick
/// queue_backlog_postgres`: 3,900 events/s with 256, 6,150 with 128 over
/// TLS; 6,270 and 6,600 over plain TCP.
pub const POSTGRES_FETCH_BATCH: usize = 128;

/// How long taking a connection from the pool may wait (connecting a new
/// one included) before the operation fails. 5 s, as SQLite's busy timeout:
/// sqlx's default of 30 s would outlast the publish deadline
/// ([`DEFAULT_PUBLISH_TIMEOUT`](super::DEFAULT_PUBLISH_TIMEOUT)), and a
/// server that cannot be reached, or a pool that stays exhausted, for 5 s
/// is an outage to report, not to wait out.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes of rows per `INSERT` of a group commit. A statement longer
/// than one TLS record (16 KiB) waits ~40 ms for the server's delayed ACK
/// (see [`POSTGRES_FETCH_BATCH`]; measured here as 45 ms for 63 small jobs
/// against 1.5 ms for 35); 14 KiB leaves room for the statement's framing.
/// A job larger than this goes alone, and over TLS pays that wait.
const INSERT_BYTES: usize = 14 * 1024;

/// Whether the session is outside any transaction block (see
/// [`acquire_clean`](super::sql::acquire_clean)). Sent as a simple query,
/// one statement is its own transaction, which starts with it; inside a
/// block, the transaction started with an earlier statement. (Through the
/// extended protocol the two differ even alone: the statement's time is
/// taken again at `Execute`.)
const OUTSIDE_TRANSACTION: &str = "SELECT statement_timestamp() = transaction_timestamp()";

/// apalis-postgres 1.0's own insert (its `queries/task/sink.sql`) with the
/// values apalis' push gives every job of ours (priority 0, 25 attempts,
/// no metadata), run as one statement: apalis wraps it in `BEGIN` and
/// `COMMIT`, two more round trips to the server for nothing, as one
/// statement is atomic by itself. A duplicate idempotency key is skipped
/// (`ON CONFLICT DO NOTHING`, where apalis fails the whole batch) and the
/// keys of the rows stored are returned, so each publisher learns whether
/// its event was stored or already queued. `tests/queue_contract.rs` shows
/// the rows equal to apalis' own push and consumed by apalis' worker.
const INSERT_JOBS: &str = "INSERT INTO apalis.jobs \
    (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key) \
    SELECT unnest($1::text[]), $2::text, unnest($3::bytea[]), 'Pending', 0, $4::integer, \
    to_timestamp(unnest($5::bigint[])), 0, ''::hstore, unnest($6::text[]) \
    ON CONFLICT (job_type, idempotency_key) DO NOTHING RETURNING idempotency_key";

impl Dialect for sqlx::Postgres {
    const SQL: Statements = Statements {
        begin: "BEGIN",
        // Concurrent CREATE TABLE IF NOT EXISTS can collide in Postgres;
        // an advisory lock serialises them.
        lock: Some("SELECT pg_advisory_xact_lock(4242420001)"),
        old_layout: "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'eventsink_dead_letters' \
             AND column_name = 'event_id') AND NOT EXISTS (SELECT 1 FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'eventsink_dead_letters' \
             AND column_name = 'letter_key')",
        upgrade: "INSERT INTO eventsink_dead_letters \
             (queue, letter_key, chain, event_id, failed_at, letter)
            SELECT queue, key, '', event_id, failed_at,
                jsonb_set(jsonb_set(letter::jsonb, '{key}', to_jsonb(key)), '{chain}', '\"\"')::text
            FROM (SELECT *, queue || ':' || (letter::jsonb -> 'event' ->> 'kind') || ':' || event_id
                  AS key FROM eventsink_dead_letters_v1) AS old;
            DROP TABLE eventsink_dead_letters_v1;",
        abandoned: "SELECT id, job, attempts::bigint, last_result::text FROM apalis.jobs \
             WHERE job_type = $1 AND (status = 'Killed' \
             OR (status = 'Failed' AND attempts >= max_attempts)) \
             AND id > $2 ORDER BY id LIMIT $3",
        claim_abandoned: "UPDATE apalis.jobs SET status = 'Done' WHERE id = $1 \
             AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))",
        delete_completed: "DELETE FROM apalis.jobs WHERE job_type = $1 AND status = 'Done' \
             AND done_at IS NOT NULL AND done_at < now() - make_interval(secs => $2::float8)",
        release_done: "UPDATE apalis.jobs SET status = 'Done', done_at = now() \
             WHERE lock_by = $1 AND status IN ('Queued', 'Running') \
             AND id IN (SELECT jsonb_array_elements_text($2::jsonb))",
        // apalis acknowledges in one transaction that locks the jobs it
        // acknowledges (by id) and then those it marks running (in any
        // order): an UPDATE that waited for those rows deadlocked with it
        // (Postgres aborts one after `deadlock_timeout`, 1 s, and when that
        // was apalis', its worker run ended). `SKIP LOCKED` never waits; all
        // parts of the statement share one snapshot, so the last SELECT
        // sees the skipped jobs as still held. Clearing `lock_by` leaves
        // apalis' own acknowledgement of the job nothing to write (it
        // updates only jobs its worker still holds): one write per job
        // instead of two.
        mark_done: "WITH wanted AS (SELECT jsonb_array_elements_text($2::jsonb) AS id), \
             free AS (SELECT jobs.id FROM apalis.jobs AS jobs JOIN wanted ON wanted.id = jobs.id \
                 WHERE jobs.lock_by = $1 AND jobs.status IN ('Queued', 'Running') \
                 FOR UPDATE OF jobs SKIP LOCKED), \
             marked AS (UPDATE apalis.jobs AS jobs SET status = 'Done', done_at = now(), lock_by = NULL \
                 FROM free WHERE jobs.id = free.id RETURNING jobs.id) \
             SELECT jobs.id FROM apalis.jobs AS jobs JOIN wanted ON wanted.id = jobs.id \
             WHERE jobs.lock_by = $1 AND jobs.status IN ('Queued', 'Running') \
             AND jobs.id NOT IN (SELECT id FROM marked)",
        release_rest: "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL \
             WHERE lock_by = $1 AND status IN ('Queued', 'Running')",
        // apalis-postgres' keep_alive.sql, for a worker that holds its
        // jobs as they are.
        keep_alive: "UPDATE apalis.workers SET last_seen = NOW() \
             WHERE id = $1 AND worker_type = $2",
        // `apalis._sqlx_migrations`: a name to_regclass resolves, and that
        // comes from apalis-postgres, not from input.
        stats: stats_statement!(
            "apalis.jobs",
            "CAST(FLOOR(EXTRACT(EPOCH FROM run_at)) AS BIGINT)"
        ),
        migrations_exist: "SELECT to_regclass($1) IS NOT NULL",
        versions: "SELECT version FROM {table}",
        outside_transaction: Some(OUTSIDE_TRANSACTION),
    };

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }

    fn apalis() -> (&'static str, sqlx::migrate::Migrator) {
        ("apalis-postgres", PostgresStorage::<()>::migrations())
    }
}

/// A queue in a Postgres database (feature `postgres`): jobs are fetched
/// with `FOR UPDATE SKIP LOCKED`, so any number of workers on any number of
/// machines share it; new jobs wake idle workers through `LISTEN/NOTIFY`.
///
/// [`connect`](PostgresQueue::connect) opens its own pool
/// ([`attach`](PostgresQueue::attach) takes yours) and runs apalis'
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
    store: SqlStore<sqlx::Postgres>,
    storage: PostgresStorage<QueuedEvent<P>>,
    config: Config,
    writers: Writers<sqlx::Postgres>,
}

queue_handle! {
    PostgresQueue { name, store, storage, config, writers }, store(store: SqlStore<sqlx::Postgres>), leased,
    " let queue: eventsink::queue::PostgresQueue = eventsink::queue::PostgresQueue::connect(\"postgres://localhost/app\", \"q\").await?;"
}

/// Settings of a [`PostgresQueue`] before it [`connect`](PostgresQueueBuilder::connect)s
/// to a URL or [`attach`](PostgresQueueBuilder::attach)es to a pool.
///
/// ```no_run
/// use std::time::Duration;
/// use eventsink::queue::PostgresQueue;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
/// let queue: PostgresQueue = PostgresQueue::builder("webhooks")
///     .lease(Duration::from_secs(2), 3)
///     .connect("postgres://app@db/app")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PostgresQueueBuilder {
    name: Arc<str>,
    max_connections: u32,
    heartbeat: Duration,
    missed: usize,
    create: bool,
}

impl PostgresQueueBuilder {
    lease_setter!("eventsink::queue::PostgresQueue::builder(\"q\")");

    /// Connections in the pool that [`connect`](PostgresQueueBuilder::connect)
    /// opens ([`POSTGRES_MAX_CONNECTIONS`]).
    ///
    /// ```
    /// # let b = eventsink::queue::PostgresQueue::builder("q");
    /// let b = b.max_connections(16);
    /// ```
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(2);
        self
    }

    /// Whether [`connect`](PostgresQueueBuilder::connect) and
    /// [`attach`](PostgresQueueBuilder::attach) create apalis' schema (and
    /// the `hstore` extension it needs) when the database has none (`true`,
    /// the default). With `false` they open only a database that already
    /// holds apalis' `apalis.jobs` table, and otherwise fail with
    /// [`QueueError::Missing`], changing nothing: for tools that inspect a
    /// queue, where a mistyped URL must not migrate another database.
    ///
    /// ```
    /// let b = eventsink::queue::PostgresQueue::builder("q").create_if_missing(false);
    /// # let _ = b;
    /// ```
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Connects to the database at `url` with a pool of its own, migrates
    /// and creates the dead-letter table.
    ///
    /// # Errors
    ///
    /// [`QueueError::Misconfigured`] if the server refuses the role, the
    /// database or a privilege the migrations need (for instance the right
    /// to create `hstore`); [`QueueError::Backend`] if the database cannot
    /// be reached or migrated; [`QueueError::NewerSchema`] if a newer
    /// apalis migrated it.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue =
    ///     eventsink::queue::PostgresQueue::builder("q").connect("postgres://app@db/app").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<P>(self, url: &str) -> Result<PostgresQueue<P>, QueueError>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let fail = |e| QueueError::backend(&self.name, "connecting to Postgres", e);
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(self.max_connections)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= POSTGRES_PING_AFTER_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .after_release(postgres_after_release)
            .connect_lazy(url)
            .map_err(fail)?;
        // All at once: `PgPoolOptions::connect` opens `min_connections`
        // one after another.
        let opening = (0..self.max_connections).map(|_| pool.acquire());
        for opened in futures::future::join_all(opening).await {
            if let Err(e) = opened {
                return Err(fail(why_not_connected(&pool, e).await));
            }
        }
        self.attach(pool).await
    }

    /// Uses `pool` (the application's, say) instead of opening one:
    /// migrates and creates the dead-letter table. `max_connections` does
    /// not apply; give the pool an acquire timeout shorter than the publish
    /// deadline (as [`POSTGRES_ACQUIRE_TIMEOUT`]), and
    /// [`postgres_after_release`] as its `after_release` check.
    ///
    /// # Errors
    ///
    /// As [`connect`](PostgresQueueBuilder::connect), but for reaching the
    /// database.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue =
    ///     eventsink::queue::PostgresQueue::builder("q").attach(pool).await?;
    /// # Ok(()) }
    /// ```
    pub async fn attach<P>(self, pool: PgPool) -> Result<PostgresQueue<P>, QueueError>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let name = self.name;
        if !self.create && !holds_queue(&pool, &name).await? {
            return Err(QueueError::Missing {
                queue: name,
                what: "the database holds no queue (no apalis.jobs table)".into(),
            });
        }
        super::contract::check(&pool, &name).await?;
        PostgresStorage::<()>::setup(&pool)
            .await
            .map_err(|e| QueueError::backend(&name, "migrating Postgres (needs hstore)", e))?;
        let writers = Writers::new(pool.options().get_max_connections());
        let store = SqlStore::new(pool, Arc::clone(&name));
        Store::<P>::prepare(&store).await?;
        let config = Config::default()
            .queue(&*name)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed);
        let storage = PostgresStorage::new(store.pool()).with_config(config.clone());
        Ok(PostgresQueue {
            name,
            store,
            storage,
            config,
            writers,
        })
    }
}

/// The `after_release` check of the pool [`connect`](PostgresQueueBuilder::connect)
/// opens; give it to a pool of your own that a queue
/// [`attach`](PostgresQueueBuilder::attach)es to. It closes a connection
/// given back inside a transaction, instead of pooling it (one round
/// trip per connection given back).
///
/// sqlx 0.9.0 gives a connection back to its pool still inside a
/// transaction when a `BEGIN` on it was cancelled before its answer came
/// (sqlx#4393). apalis' worker does that when it stops in the middle of
/// an acknowledgement, and so may any task of the application that shares
/// the pool (a request handler dropped mid-`begin`). Every statement later
/// run on that connection runs inside that transaction: never committed,
/// holding its row locks, and lost when the connection closes. The
/// queue's own durable writes (publishing, dead letters) check each
/// connection they take whatever the pool; this check keeps apalis'
/// fetches and acknowledgements, and the application's own statements,
/// out of such a transaction too.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::postgres::PgPoolOptions::new()
///     .after_release(eventsink::queue::postgres_after_release)
///     .connect("postgres://app@db/app")
///     .await?;
/// let queue: eventsink::queue::PostgresQueue =
///     eventsink::queue::PostgresQueue::attach(pool, "q").await?;
/// # Ok(()) }
/// ```
pub fn postgres_after_release(
    conn: &mut PgConnection,
    _: PoolConnectionMetadata,
) -> BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(outside_transaction::<sqlx::Postgres>(
        conn,
        OUTSIDE_TRANSACTION,
    ))
}

/// The cause of `error`, a failure to open `pool`'s connections: when
/// every attempt failed until the acquire timeout, sqlx answers only
/// `PoolTimedOut`, so one more attempt, outside the pool, says why (the
/// server refused the connection, the host is unknown, TLS failed).
async fn why_not_connected(pool: &PgPool, error: sqlx::Error) -> sqlx::Error {
    use sqlx::ConnectOptions;
    if !matches!(error, sqlx::Error::PoolTimedOut) {
        return error;
    }
    let options = pool.connect_options();
    match tokio::time::timeout(POSTGRES_ACQUIRE_TIMEOUT, options.connect()).await {
        Ok(Err(cause)) => cause,
        Ok(Ok(conn)) => {
            let _ = sqlx::Connection::close(conn).await;
            error
        }
        Err(_) => error,
    }
}

/// Whether the database behind `pool` has apalis' jobs table.
async fn holds_queue(pool: &PgPool, name: &Arc<str>) -> Result<bool, QueueError> {
    sqlx::query_scalar("SELECT to_regclass('apalis.jobs') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(|e| QueueError::backend(name, "looking for apalis' jobs table", e))
}

impl PostgresQueue {
    /// Settings for the queue `name`, to [`connect`](PostgresQueueBuilder::connect)
    /// or [`attach`](PostgresQueueBuilder::attach).
    ///
    /// ```
    /// let builder = eventsink::queue::PostgresQueue::builder("webhooks");
    /// # let _ = builder;
    /// ```
    pub fn builder(name: &str) -> PostgresQueueBuilder {
        PostgresQueueBuilder {
            name: name.into(),
            max_connections: POSTGRES_MAX_CONNECTIONS,
            heartbeat: DEFAULT_HEARTBEAT_INTERVAL,
            missed: DEFAULT_MISSED_HEARTBEATS,
            create: true,
        }
    }
}

impl<P> PostgresQueue<P>
where
    P: Payload,
{
    /// Connects to `url` and opens the queue `name`, with the defaults of
    /// [`builder`](PostgresQueue::builder).
    ///
    /// # Errors
    ///
    /// [`QueueError::Misconfigured`] if the server refuses the role or the
    /// database; [`QueueError::Backend`] if the database cannot be reached or
    /// migrated; [`QueueError::NewerSchema`] if a newer apalis migrated it.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue =
    ///     eventsink::queue::PostgresQueue::connect("postgres://app@db/app", "q").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str, name: &str) -> Result<Self, QueueError> {
        PostgresQueue::builder(name).connect(url).await
    }

    /// Opens the queue `name` on an existing pool, with the defaults of
    /// [`builder`](PostgresQueue::builder).
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if the database cannot be migrated.
    /// [`QueueError::NewerSchema`] if a newer apalis migrated it.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), eventsink::queue::QueueError> {
    /// let queue: eventsink::queue::PostgresQueue = eventsink::queue::PostgresQueue::attach(pool, "q").await?;
    /// # Ok(()) }
    /// ```
    pub async fn attach(pool: PgPool, name: &str) -> Result<Self, QueueError> {
        PostgresQueue::builder(name).attach(pool).await
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
        self.store.pool()
    }
}

impl<P: Payload> Ops<P> for PostgresQueue<P> {
    fn push(&self, jobs: Jobs<P>) -> Answer<Vec<Published>> {
        let (pool, name) = (self.pool().clone(), Arc::clone(&self.name));
        let writers = self.writers.clone();
        Box::pin(async move {
            let rows = by_size(encode_rows(&name, &jobs)?);
            let fail = |e| QueueError::backend(&name, "pushing jobs", e);
            let mut conn = writers.take(&pool).await.map_err(fail)?;
            let mut stored = Vec::with_capacity(jobs.len());
            for rows in rows {
                stored.extend(insert_rows(&mut conn, &name, rows).await.map_err(fail)?);
            }
            // Only a connection that finished its statements is kept; one
            // that failed, or whose push was dropped half way, goes back
            // to the pool, which checks it.
            writers.keep(conn);
            Ok(outcomes(&jobs, stored))
        })
    }

    fn parallel_batches(&self) -> usize {
        // each batch has its own connection and transaction.
        2
    }

    fn fetch_batch(&self) -> usize {
        POSTGRES_FETCH_BATCH
    }

    fn run_worker(&self, run: WorkerRun<P>) -> BoxFuture<'static, Result<(), BoxError>> {
        let notified = Pubsub::new(self.pool().clone(), self.name.to_string());
        let wakes = Wakes::new(notified, run.poll_interval, None);
        let storage = PostgresStorage::<Fetched<P>>::new(self.store.pool());
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

/// One job as [`INSERT_JOBS`] stores it.
struct Row {
    id: String,
    data: Vec<u8>,
    due: i64,
    key: String,
}

impl Row {
    /// Its bytes in the statement (the due time and each array element's
    /// length included).
    fn size(&self) -> usize {
        self.id.len() + self.data.len() + self.key.len() + 8 + 3 * 4
    }
}

/// The rows of `jobs`, due from now.
fn encode_rows<P: Serialize>(
    queue: &Arc<str>,
    jobs: &[(QueuedEvent<P>, Duration)],
) -> Result<Vec<Row>, QueueError> {
    let now = current_second();
    jobs.iter()
        .map(|(job, delay)| {
            let due = if delay.is_zero() {
                now
            } else {
                due_second(*delay)
            };
            Ok(Row {
                id: ulid::Ulid::generate().to_string(),
                data: encode_job(queue, job)?,
                due: i64::try_from(due).unwrap_or(i64::MAX),
                key: job.idempotency_key(),
            })
        })
        .collect()
}

/// `rows` in order, cut into statements of at most [`INSERT_BYTES`] (or
/// one row).
fn by_size(rows: Vec<Row>) -> Vec<Vec<Row>> {
    let mut statements: Vec<Vec<Row>> = Vec::new();
    let mut bytes = 0;
    for row in rows {
        match statements.last_mut() {
            Some(last) if bytes + row.size() <= INSERT_BYTES => {
                bytes += row.size();
                last.push(row);
            }
            _ => {
                bytes = row.size();
                statements.push(vec![row]);
            }
        }
    }
    statements
}

/// Stores `rows` with [`INSERT_JOBS`]; the idempotency keys of the rows
/// stored (a duplicate is skipped).
async fn insert_rows(
    conn: &mut sqlx::PgConnection,
    queue: &Arc<str>,
    rows: Vec<Row>,
) -> Result<Vec<String>, sqlx::Error> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut data = Vec::with_capacity(rows.len());
    let mut due = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.id);
        data.push(row.data);
        due.push(row.due);
        keys.push(row.key);
    }
    sqlx::query_scalar(INSERT_JOBS)
        .bind(ids)
        .bind(&**queue)
        .bind(data)
        .bind(i32::try_from(APALIS_MAX_ATTEMPTS).unwrap_or(i32::MAX))
        .bind(due)
        .bind(keys)
        .fetch_all(conn)
        .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Event;

    /// Longer than any write here takes, far shorter than the row lock
    /// the test holds (until it commits): only a statement that waits for
    /// the lock reaches it.
    const LIVENESS: Duration = Duration::from_secs(10);

    fn row(n: usize, bytes: usize) -> Row {
        Row {
            id: n.to_string(),
            data: vec![b'x'; bytes],
            due: 0,
            key: String::new(),
        }
    }

    /// Statements stay within one TLS record where the rows allow, keep
    /// the rows' order, and a row larger than the limit goes alone.
    #[test]
    fn rows_are_cut_into_statements_by_size() {
        let sizes = [6_000, 6_000, 6_000, 20_000, 100, 100];
        let rows = sizes.iter().enumerate().map(|(n, &b)| row(n, b)).collect();
        let statements: Vec<Vec<String>> = by_size(rows)
            .into_iter()
            .map(|s| s.into_iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(
            statements,
            [vec!["0", "1"], vec!["2"], vec!["3"], vec!["4", "5"]]
        );
        let small = (0..200).map(|n| row(n, 300)).collect();
        let cut = by_size(small);
        assert!(
            cut.iter()
                .all(|s| s.iter().map(Row::size).sum::<usize>() <= INSERT_BYTES)
        );
        assert_eq!(cut.iter().map(Vec::len).sum::<usize>(), 200);
        assert!(
            cut[0].len() > 32,
            "small events fill a statement: {}",
            cut[0].len()
        );
    }

    fn jobs(queue: &str, count: usize) -> Jobs<serde_json::Value> {
        (0..count)
            .map(|n| {
                let event = Event::new("test.kept", serde_json::json!(n));
                (QueuedEvent::new(queue, event), Duration::ZERO)
            })
            .collect()
    }

    async fn delete_queue(pool: &PgPool, queue: &str) {
        let _ = sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
            .bind(queue)
            .execute(pool)
            .await;
    }

    /// A kept connection the server closed fails one push with a
    /// retryable error and is not kept again; a later push stores its
    /// jobs, and nothing a push answered `Ok` for is missing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_postgres),
        ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
    )]
    async fn a_kept_connection_the_server_closed_fails_one_push_and_is_dropped() {
        use crate::Retryable;
        let url = std::env::var("EVENTSINK_POSTGRES_URL").expect("EVENTSINK_POSTGRES_URL");
        let name = format!("t-killed-{}", uuid::Uuid::now_v7().simple());
        let sep = if url.contains('?') { '&' } else { '?' };
        let queue: PostgresQueue =
            PostgresQueue::connect(&format!("{url}{sep}application_name={name}"), &name)
                .await
                .expect("connect");
        let admin = PgPool::connect(&url).await.expect("admin connection");
        queue.push(jobs(&name, 2)).await.expect("push");
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1) AS t",
        )
        .bind(&name)
        .fetch_one(&admin)
        .await
        .expect("terminate the queue's connections");
        assert!(killed >= 1, "the queue's connections are found by name");
        let mut stored = 2;
        let mut failures = 0;
        for _ in 0..=POSTGRES_MAX_CONNECTIONS {
            match queue.push(jobs(&name, 1)).await {
                Ok(published) => {
                    stored += published.len();
                    break;
                }
                Err(e) => {
                    assert!(e.is_retryable(), "a closed connection is transient: {e}");
                    failures += 1;
                }
            }
        }
        assert!(failures >= 1, "the killed kept connection failed a push");
        assert!(stored == 3, "a push succeeded after the kill");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .expect("count");
        assert_eq!(rows, 3, "every job a push answered Ok for is stored");
        delete_queue(&admin, &name).await;
    }

    async fn statuses(pool: &PgPool, queue: &str) -> Vec<(String, String)> {
        sqlx::query_as("SELECT id, status FROM apalis.jobs WHERE job_type = $1 ORDER BY id")
            .bind(queue)
            .fetch_all(pool)
            .await
            .expect("read the jobs")
    }

    /// apalis acknowledges in a transaction that locks jobs the worker
    /// also marks done; marking them must skip what it holds, not wait
    /// (waiting deadlocked with apalis, which lost its worker run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_postgres),
        ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
    )]
    async fn marking_done_skips_jobs_another_transaction_holds() {
        let url = std::env::var("EVENTSINK_POSTGRES_URL").expect("EVENTSINK_POSTGRES_URL");
        let name = format!("t-mark-{}", uuid::Uuid::now_v7().simple());
        let queue: PostgresQueue = PostgresQueue::connect(&url, &name).await.expect("connect");
        let jobs = (0..2)
            .map(|n| {
                let event = Event::new("test.mark", serde_json::json!(n));
                (QueuedEvent::new(&name, event), Duration::ZERO)
            })
            .collect();
        queue.push(jobs).await.expect("push");
        let pool = queue.pool().clone();
        let worker = format!("{name}-w");
        sqlx::query(
            "INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen) \
             VALUES ($1, $2, 'test', '', now())",
        )
        .bind(&worker)
        .bind(&name)
        .execute(&pool)
        .await
        .expect("register worker w");
        sqlx::query("UPDATE apalis.jobs SET status = 'Running', lock_by = $2 WHERE job_type = $1")
            .bind(&name)
            .bind(&worker)
            .execute(&pool)
            .await
            .expect("lease the jobs to worker w");
        let ids: Vec<String> = statuses(&pool, &name)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let (held, free) = (ids[0].clone(), ids[1].clone());

        let mut apalis = pool.begin().await.expect("begin");
        sqlx::query("SELECT id FROM apalis.jobs WHERE id = $1 FOR UPDATE")
            .bind(&held)
            .execute(&mut *apalis)
            .await
            .expect("lock one job");
        let marked = tokio::time::timeout(
            LIVENESS,
            Store::<serde_json::Value>::mark_done(&queue.store, &worker, ids.clone()),
        )
        .await
        .expect("marking done waited for a locked job")
        .expect("mark done");
        assert_eq!(
            marked,
            Some(vec![held.clone()]),
            "the held job is given back"
        );
        apalis.commit().await.expect("commit");
        let after = statuses(&pool, &name).await;
        assert_eq!(
            after,
            vec![(held.clone(), "Running".into()), (free, "Done".into())]
        );

        let again = Store::<serde_json::Value>::mark_done(&queue.store, &worker, vec![held])
            .await
            .expect("mark done");
        assert_eq!(again, Some(Vec::new()), "nothing left to skip");
        let done = statuses(&pool, &name).await;
        assert!(done.iter().all(|(_, s)| s == "Done"), "{done:?}");
        for cleanup in [
            "DELETE FROM apalis.jobs WHERE job_type = $1",
            "DELETE FROM apalis.workers WHERE worker_type = $1",
        ] {
            let _ = sqlx::query(cleanup).bind(&name).execute(&pool).await;
        }
    }
}
