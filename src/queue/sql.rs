//! [`SqlStore`]: the dead letters and the worker's upkeep of apalis' jobs in
//! a SQL database, written once for SQLite and Postgres.
//!
//! The statements that both databases accept are here; those that differ
//! (apalis' table names, JSON functions, locking) are each database's
//! [`Statements`], given by its [`Dialect`].

use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::pool::PoolConnection;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};

use super::backend::ops::{Answer, DeadPage, Payload, Place, Store};
use super::backend::{ABANDONED_PAGE, abandoned_letter, current_second, undecodable_letter};
use super::error::QueueError;
use super::job::DeadLetter;
use super::stats::QueueStats;

/// The dead letters, one per `(queue, letter_key)`: the key of the
/// event's jobs, `{queue}:{kind}:{id}`. `chain` says which delivery chain
/// wrote the letter, so that a replay removes only the letter it replayed.
/// (`BIGINT` is an integer column in SQLite too.)
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

/// Sets the table of the first layout (keyed by event id alone) aside for
/// the dialect's `upgrade`.
const RENAME_OLD_DEAD_LETTERS: &str =
    "ALTER TABLE eventsink_dead_letters RENAME TO eventsink_dead_letters_v1";

/// Stores a letter, replacing the one with its key.
const STORE_LETTER: &str = "INSERT INTO eventsink_dead_letters \
     (queue, letter_key, chain, event_id, failed_at, letter) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (queue, letter_key) \
     DO UPDATE SET chain = excluded.chain, event_id = excluded.event_id, \
     failed_at = excluded.failed_at, letter = excluded.letter";

const PAGE: &str = "SELECT letter FROM eventsink_dead_letters WHERE queue = $1 \
     ORDER BY failed_at, letter_key LIMIT $2 OFFSET $3";

const AFTER: &str = "SELECT failed_at, letter_key, letter FROM eventsink_dead_letters \
     WHERE queue = $1 AND failed_at <= $2 AND (failed_at, letter_key) > ($3, $4) \
     ORDER BY failed_at, letter_key LIMIT $5";

const GET: &str = "SELECT letter FROM eventsink_dead_letters WHERE queue = $1 AND letter_key = $2";

/// Compare and delete: only the letter of this chain and failure time.
const REMOVE: &str = "DELETE FROM eventsink_dead_letters \
     WHERE queue = $1 AND letter_key = $2 AND chain = $3 AND failed_at = $4";

const PURGE: &str = "DELETE FROM eventsink_dead_letters WHERE queue = $1";

const COUNT: &str = "SELECT COUNT(*) FROM eventsink_dead_letters WHERE queue = $1";

/// The statement of [`Store::stats`] on apalis' jobs table `$jobs`, where
/// `$due` is a job's `run_at` in Unix seconds: for queue `$1` at Unix
/// second `$2`, the counts pending, scheduled, running and dead, then the
/// oldest pending job's due second. Waiting jobs are `Pending` ones and
/// `Failed` ones apalis runs again; `Queued` (fetched) and `Running` ones
/// are held by a worker, as apalis' orphan recovery has it.
macro_rules! stats_statement {
    ($jobs:literal, $due:literal) => {
        concat!(
            "SELECT CAST(COALESCE(SUM(CASE WHEN status NOT IN ('Queued', 'Running') AND ",
            $due,
            " <= $2 THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN status NOT IN ('Queued', 'Running') AND ",
            $due,
            " > $2 THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN status IN ('Queued', 'Running') THEN 1 ELSE 0 END), 0) AS BIGINT), \
             (SELECT COUNT(*) FROM eventsink_dead_letters WHERE queue = $1), \
             MIN(CASE WHEN status NOT IN ('Queued', 'Running') AND ",
            $due,
            " <= $2 THEN ",
            $due,
            " END) FROM ",
            $jobs,
            " WHERE job_type = $1 AND (status IN ('Pending', 'Queued', 'Running') \
             OR (status = 'Failed' AND attempts < max_attempts))"
        )
    };
}
pub(crate) use stats_statement;

/// The statements one database writes its own way. Parameters are `$1`,
/// `$2`, … in both.
#[derive(Debug)]
pub struct Statements {
    /// Starts a transaction that writes (SQLite: `BEGIN IMMEDIATE`, so two
    /// processes never both read and then both fail to write).
    pub(crate) begin: &'static str,
    /// Run first when preparing the table, to serialise concurrent opens,
    /// where `begin` does not.
    pub(crate) lock: Option<&'static str>,
    /// One boolean: whether the dead-letter table has the first layout.
    pub(crate) old_layout: &'static str,
    /// Moves the letters of `eventsink_dead_letters_v1` into the current
    /// table, keyed `{queue}:{kind}:{id}`, with an unknown (empty) chain.
    pub(crate) upgrade: &'static str,
    /// The jobs of queue `$1` apalis gave up on, with an id after `$2`, at
    /// most `$3`: id, job bytes, runs (`BIGINT`), last result (text).
    pub(crate) abandoned: &'static str,
    /// Marks job `$1` done if apalis still holds it as given up on.
    pub(crate) claim_abandoned: &'static str,
    /// Deletes queue `$1`'s jobs done at least `$2` seconds ago.
    pub(crate) delete_completed: &'static str,
    /// Marks done the jobs of worker `$1` whose ids are in the JSON array
    /// `$2`, if it still holds them.
    pub(crate) release_done: &'static str,
    /// [`release_done`](Statements::release_done) while the worker runs:
    /// never waits for a row another transaction has locked (apalis'
    /// acknowledgement locks the same jobs, in another order: waiting would
    /// deadlock), and returns the ids of the jobs it skipped for that
    /// reason, to try again.
    pub(crate) mark_done: &'static str,
    /// Puts the other jobs worker `$1` holds back in the queue.
    pub(crate) release_rest: &'static str,
    /// Renews the heartbeat of worker `$1` of queue `$2`.
    pub(crate) keep_alive: &'static str,
    /// The queue's stats: [`stats_statement`] on this database's table.
    pub(crate) stats: &'static str,
    /// One boolean: whether apalis' migrations table `$1` exists.
    pub(crate) migrations_exist: &'static str,
    /// The versions in apalis' migrations table `{table}`.
    pub(crate) versions: &'static str,
    /// Where a pooled connection can be left inside a transaction nobody
    /// tracks: one boolean, whether the session is outside any transaction
    /// block, run as a simple query (see [`acquire_clean`]).
    pub(crate) outside_transaction: Option<&'static str>,
}

/// A SQL database the queue runs on: its statements, and how many rows a
/// statement changed.
pub trait Dialect: Database {
    /// The statements this database writes its own way.
    const SQL: Statements;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// The pinned apalis crate of this database, and its migrations.
    fn apalis() -> (&'static str, sqlx::migrate::Migrator);
}

/// The dead letters and upkeep of one queue in a SQL database.
#[derive(Debug)]
pub struct SqlStore<DB: Database> {
    pool: Pool<DB>,
    name: Arc<str>,
    _db: PhantomData<fn() -> DB>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            name: Arc::clone(&self.name),
            _db: PhantomData,
        }
    }
}

impl<DB: Database> SqlStore<DB> {
    pub(crate) fn new(pool: Pool<DB>, name: Arc<str>) -> Self {
        SqlStore {
            pool,
            name,
            _db: PhantomData,
        }
    }

    pub(crate) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The pool, the queue's name, and how a `sqlx::Error` of `action`
    /// becomes a [`QueueError`].
    fn parts(
        &self,
        action: &'static str,
    ) -> (
        Pool<DB>,
        Arc<str>,
        impl Fn(sqlx::Error) -> QueueError + Send + Sync + 'static,
    ) {
        let name = Arc::clone(&self.name);
        (self.pool.clone(), Arc::clone(&self.name), move |e| {
            QueueError::backend(&name, action, e)
        })
    }
}

/// A dead letter as the JSON the table keeps.
fn encode<P: Serialize>(name: &Arc<str>, letter: &DeadLetter<P>) -> Result<String, QueueError> {
    serde_json::to_string(letter)
        .map_err(|e| QueueError::backend(name, "encoding a dead letter", e))
}

fn decode<P: DeserializeOwned>(name: &Arc<str>, json: &str) -> Result<DeadLetter<P>, QueueError> {
    serde_json::from_str(json).map_err(|e| undecodable_letter(name, e))
}

fn limit(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl<DB, P> Store<P> for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'r> bool: Decode<'r, DB> + Type<DB>,
    for<'r> Vec<u8>: Decode<'r, DB> + Type<DB>,
    P: Payload,
{
    fn prepare(&self) -> Answer<()> {
        let (pool, _, fail) = self.parts("creating the dead-letter table");
        Box::pin(async move {
            let mut tx = pool.begin_with(DB::SQL.begin).await.map_err(&fail)?;
            if let Some(lock) = DB::SQL.lock {
                sqlx::query(lock).execute(&mut *tx).await.map_err(&fail)?;
            }
            let row = sqlx::query(DB::SQL.old_layout)
                .fetch_one(&mut *tx)
                .await
                .map_err(&fail)?;
            let old: bool = row.try_get(0).map_err(&fail)?;
            if old {
                sqlx::raw_sql(RENAME_OLD_DEAD_LETTERS)
                    .execute(&mut *tx)
                    .await
                    .map_err(&fail)?;
            }
            sqlx::raw_sql(DEAD_LETTER_TABLE)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
            if old {
                sqlx::raw_sql(DB::SQL.upgrade)
                    .execute(&mut *tx)
                    .await
                    .map_err(&fail)?;
            }
            tx.commit().await.map_err(&fail)
        })
    }

    fn bury(&self, letter: DeadLetter<P>) -> Answer<()> {
        let (pool, name, fail) = self.parts("storing a dead letter");
        Box::pin(async move {
            let json = encode(&name, &letter)?;
            let mut conn = acquire_clean(&pool).await.map_err(&fail)?;
            store_letter::<DB, P>(&mut *conn, &name, &letter, json)
                .await
                .map_err(fail)
        })
    }

    fn dead_page(&self, offset: u64, count: u64) -> Answer<Vec<DeadLetter<P>>> {
        let (pool, name, fail) = self.parts("listing dead letters");
        Box::pin(async move {
            let rows = sqlx::query(PAGE)
                .bind(name.to_string())
                .bind(limit(count))
                .bind(limit(offset))
                .fetch_all(&pool)
                .await
                .map_err(&fail)?;
            rows.iter()
                .map(|row| decode(&name, &row.try_get::<String, _>(0).map_err(&fail)?))
                .collect()
        })
    }

    fn dead_after(&self, after: Option<Place>, until: i64, count: u64) -> Answer<DeadPage<P>> {
        let (pool, name, fail) = self.parts("listing dead letters");
        let (at, key) = after.unwrap_or((i64::MIN, String::new()));
        Box::pin(async move {
            let rows = sqlx::query(AFTER)
                .bind(name.to_string())
                .bind(until)
                .bind(at)
                .bind(key)
                .bind(limit(count))
                .fetch_all(&pool)
                .await
                .map_err(&fail)?;
            let mut page = DeadPage {
                letters: Vec::with_capacity(rows.len()),
                last: None,
            };
            for row in &rows {
                let at: i64 = row.try_get(0).map_err(&fail)?;
                let key: String = row.try_get(1).map_err(&fail)?;
                let json: String = row.try_get(2).map_err(&fail)?;
                page.letters.push(decode(&name, &json)?);
                page.last = Some((at, key));
            }
            Ok(page)
        })
    }

    fn dead_get(&self, key: &str) -> Answer<Option<DeadLetter<P>>> {
        let (pool, name, fail) = self.parts("reading a dead letter");
        let key = key.to_owned();
        Box::pin(async move {
            let row = sqlx::query(GET)
                .bind(name.to_string())
                .bind(key)
                .fetch_optional(&pool)
                .await
                .map_err(&fail)?;
            let Some(row) = row else {
                return Ok(None);
            };
            decode(&name, &row.try_get::<String, _>(0).map_err(&fail)?).map(Some)
        })
    }

    fn dead_remove(&self, letter: &DeadLetter<P>) -> Answer<bool> {
        let (pool, name, fail) = self.parts("removing a dead letter");
        let failed_at = letter.failed_at.timestamp_micros();
        let remove = sqlx::query(REMOVE)
            .bind(name.to_string())
            .bind(letter.key.clone())
            .bind(letter.chain.clone())
            .bind(failed_at);
        let removed = changed(pool, remove, fail);
        Box::pin(async move { Ok(removed.await? > 0) })
    }

    fn dead_purge(&self) -> Answer<u64> {
        let (pool, name, fail) = self.parts("purging dead letters");
        changed(pool, sqlx::query(PURGE).bind(name.to_string()), fail)
    }

    fn dead_count(&self) -> Answer<u64> {
        let (pool, name, fail) = self.parts("counting dead letters");
        Box::pin(async move {
            let row = sqlx::query(COUNT)
                .bind(name.to_string())
                .fetch_one(&pool)
                .await
                .map_err(&fail)?;
            let n: i64 = row.try_get(0).map_err(&fail)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn stats(&self) -> Answer<QueueStats> {
        let (pool, name, fail) = self.parts("reading the queue's stats");
        let now = i64::try_from(current_second()).unwrap_or(i64::MAX);
        Box::pin(async move {
            let row = sqlx::query(DB::SQL.stats)
                .bind(name.to_string())
                .bind(now)
                .fetch_one(&pool)
                .await
                .map_err(&fail)?;
            let mut counts = [0u64; 4];
            for (i, count) in counts.iter_mut().enumerate() {
                let n: i64 = row.try_get(i).map_err(&fail)?;
                *count = u64::try_from(n).unwrap_or(0);
            }
            let oldest: Option<i64> = row.try_get(4).map_err(&fail)?;
            Ok(QueueStats::from_counts(counts, oldest))
        })
    }

    fn delete_completed(&self, age: Duration) -> Answer<u64> {
        let (pool, name, fail) = self.parts("removing completed jobs");
        let age = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        let delete = sqlx::query(DB::SQL.delete_completed).bind(name.to_string());
        changed(pool, delete.bind(age), fail)
    }

    fn bury_abandoned(&self) -> Answer<u64> {
        let (pool, name, fail) = self.parts("burying jobs apalis gave up on");
        Box::pin(async move {
            let (mut buried, mut after) = (0, String::new());
            loop {
                let rows = sqlx::query(DB::SQL.abandoned)
                    .bind(name.to_string())
                    .bind(after.clone())
                    .bind(ABANDONED_PAGE as i64)
                    .fetch_all(&pool)
                    .await
                    .map_err(&fail)?;
                for row in &rows {
                    let id: String = row.try_get(0).map_err(&fail)?;
                    after.clone_from(&id);
                    let job: Vec<u8> = row.try_get(1).map_err(&fail)?;
                    let runs: i64 = row.try_get(2).map_err(&fail)?;
                    let last: Option<String> = row.try_get(3).map_err(&fail)?;
                    let Some(letter) = abandoned_letter::<P>(&name, &job, runs, last.as_deref())
                    else {
                        continue;
                    };
                    let json = encode(&name, &letter)?;
                    // Claim the job and write its letter in one transaction:
                    // two workers' maintenance never both bury it, and a
                    // crash leaves neither or both.
                    let mut tx = pool.begin_with(DB::SQL.begin).await.map_err(&fail)?;
                    let claimed = sqlx::query(DB::SQL.claim_abandoned)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(&fail)?;
                    if DB::rows_affected(&claimed) == 1 {
                        store_letter::<DB, P>(&mut *tx, &name, &letter, json)
                            .await
                            .map_err(&fail)?;
                        buried += 1;
                    }
                    tx.commit().await.map_err(&fail)?;
                }
                if rows.len() < ABANDONED_PAGE {
                    return Ok(buried);
                }
            }
        })
    }

    fn mark_done(&self, worker: &str, done: Vec<String>) -> Answer<Option<Vec<String>>> {
        let (pool, name, fail) = self.parts("marking delivered jobs done");
        let worker = worker.to_owned();
        Box::pin(async move {
            let done = serde_json::to_string(&done)
                .map_err(|e| QueueError::backend(&name, "marking delivered jobs done", e))?;
            let skipped = sqlx::query_scalar(DB::SQL.mark_done)
                .bind(worker)
                .bind(done)
                .fetch_all(&pool)
                .await
                .map_err(&fail)?;
            Ok(Some(skipped))
        })
    }

    fn release_worker(&self, worker: &str, done: Vec<String>) -> Answer<()> {
        let (pool, name, fail) = self.parts("releasing a stopped worker's jobs");
        let worker = worker.to_owned();
        Box::pin(async move {
            let done = serde_json::to_string(&done)
                .map_err(|e| QueueError::backend(&name, "releasing a stopped worker's jobs", e))?;
            let mut tx = pool.begin_with(DB::SQL.begin).await.map_err(&fail)?;
            sqlx::query(DB::SQL.release_done)
                .bind(worker.clone())
                .bind(done)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
            sqlx::query(DB::SQL.release_rest)
                .bind(worker)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
            tx.commit().await.map_err(&fail)
        })
    }

    fn keep_alive(&self, worker: &str) -> Answer<()> {
        let (pool, name, fail) = self.parts("renewing a worker's lease");
        let worker = worker.to_owned();
        Box::pin(async move {
            sqlx::query(DB::SQL.keep_alive)
                .bind(worker)
                .bind(name.to_string())
                .execute(&pool)
                .await
                .map_err(fail)?;
            Ok(())
        })
    }
}

/// Runs `query` on `pool`; how many rows it changed.
fn changed<DB>(
    pool: Pool<DB>,
    query: sqlx::query::Query<'static, DB, DB::Arguments>,
    fail: impl Fn(sqlx::Error) -> QueueError + Send + 'static,
) -> Answer<u64>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
{
    Box::pin(async move {
        Ok(DB::rows_affected(
            &query.execute(&pool).await.map_err(fail)?,
        ))
    })
}

/// Stores `letter` (encoded as `json`) on `conn`, replacing the one with
/// its key.
async fn store_letter<DB, P>(
    conn: &mut DB::Connection,
    name: &str,
    letter: &DeadLetter<P>,
    json: String,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(STORE_LETTER)
        .bind(name.to_owned())
        .bind(letter.key.clone())
        .bind(letter.chain.clone())
        .bind(letter.event.id.to_string())
        .bind(letter.failed_at.timestamp_micros())
        .bind(json)
        .execute(conn)
        .await?;
    Ok(())
}

/// A connection of `pool` that is outside any transaction, for a write
/// that must be committed when it returns. sqlx 0.9.0 gives a Postgres
/// connection back to its pool still inside a transaction when a `BEGIN`
/// on it was cancelled before its answer came (sqlx#4393: apalis' worker
/// does that when it stops in the middle of an acknowledgement, and so
/// may any task of the application that shares the pool). What is
/// written on such a connection is never committed, and is lost when it
/// closes. Where the database has [`Statements::outside_transaction`],
/// each connection taken is checked (one round trip) and one found inside
/// a transaction is closed, which rolls that transaction back.
pub(crate) async fn acquire_clean<DB>(pool: &Pool<DB>) -> Result<PoolConnection<DB>, sqlx::Error>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    for<'r> bool: Decode<'r, DB> + Type<DB>,
{
    let Some(check) = DB::SQL.outside_transaction else {
        return pool.acquire().await;
    };
    // Each connection found inside a transaction (or inside one that
    // failed, where the check itself fails) is closed: at most every
    // connection of the pool, then a new one. One the check fails on for
    // another reason (the server is gone) is closed too, and the error
    // answered, as for any failed statement.
    for _ in 0..=pool.options().get_max_connections() {
        let mut conn = pool.acquire().await?;
        let outside = outside_transaction(&mut *conn, check).await;
        if matches!(outside, Ok(true)) {
            return Ok(conn);
        }
        conn.close_on_drop();
        match outside {
            Err(e) if !in_failed_transaction(&e) => return Err(e),
            _ => continue,
        }
    }
    Err(sqlx::Error::Protocol(INSIDE_TRANSACTION.into()))
}

/// Whether `error` is Postgres' "current transaction is aborted" (SQLSTATE
/// `25P02`): the session is inside a transaction that failed.
fn in_failed_transaction(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "25P02")
}

/// Why [`acquire_clean`] found no connection to write on.
const INSIDE_TRANSACTION: &str = "every connection the pool gave was inside a transaction \
     that nobody will commit (a BEGIN cancelled before its answer, sqlx#4393); they were \
     closed and nothing was written: try again";

/// Whether the session of `conn` is outside any transaction block, by
/// the simple query `check`.
pub(crate) async fn outside_transaction<DB>(
    conn: &mut DB::Connection,
    check: &'static str,
) -> Result<bool, sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    for<'r> bool: Decode<'r, DB> + Type<DB>,
{
    sqlx::raw_sql(check).fetch_one(conn).await?.try_get(0)
}

/// Connections a publisher keeps between its batches, at most (and no
/// more than a quarter of the pool, so the worker always has the rest):
/// Postgres' parallel batches. sqlx checks every connection given back to
/// its pool with a round trip (`ping` on release, not configurable in
/// 0.9.0; on SQLite a round trip to the connection's thread): one caller's
/// publish made two, and the next publish took another connection while
/// the check ran. Kept connections skip that, and are given back once idle
/// for [`KEPT_IDLE`], so the worker and the application get them when
/// nobody publishes.
pub(crate) const KEPT_WRITERS: usize = 2;

/// How long a kept connection may stay idle before it goes back to the
/// pool: 1 s, as `POSTGRES_PING_AFTER_IDLE` (a connection idle longer is
/// checked before use).
pub(crate) const KEPT_IDLE: Duration = Duration::from_secs(1);

/// The publisher's kept connections (see [`KEPT_WRITERS`]), with
/// when each was last used; shared by the clones of a queue.
pub(crate) struct Writers<DB: Database>(Arc<Mutex<Kept<DB>>>);

impl<DB: Database> Clone for Writers<DB> {
    fn clone(&self) -> Self {
        Writers(Arc::clone(&self.0))
    }
}

struct Kept<DB: Database> {
    /// How many may be kept.
    most: usize,
    idle: Vec<(PoolConnection<DB>, Instant)>,
    /// The task that gives back connections that stay idle (it ends when
    /// none is kept, or with its runtime).
    reaper: Option<tokio::task::JoinHandle<()>>,
}

impl<DB: Database> Drop for Kept<DB> {
    fn drop(&mut self) {
        // sqlx gives a pooled connection back on a task of the runtime, and
        // panics outside one: the last handle of a queue may be dropped
        // after its runtime ended. Closed without the pool then.
        if tokio::runtime::Handle::try_current().is_err() {
            for (conn, _) in self.idle.drain(..) {
                drop(conn.detach());
            }
        }
    }
}

impl<DB: Database> Writers<DB> {
    /// Keeps up to [`KEPT_WRITERS`] connections of a pool of
    /// `pool_size`, and no more than a quarter of them.
    pub(crate) fn new(pool_size: u32) -> Self {
        let quarter = usize::try_from(pool_size / 4).unwrap_or(usize::MAX);
        Writers(Arc::new(Mutex::new(Kept {
            most: quarter.min(KEPT_WRITERS),
            idle: Vec::new(),
            reaper: None,
        })))
    }

    /// A kept connection used within [`KEPT_IDLE`], or one
    /// from the pool (see [`acquire_clean`]).
    pub(crate) async fn take(&self, pool: &Pool<DB>) -> Result<PoolConnection<DB>, sqlx::Error>
    where
        DB: Dialect,
        for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
        usize: ColumnIndex<DB::Row>,
        for<'r> bool: Decode<'r, DB> + Type<DB>,
    {
        let kept = self.lock().idle.pop();
        match kept {
            Some((conn, used)) if used.elapsed() < KEPT_IDLE => Ok(conn),
            // An idle one goes back to the pool, which checks it.
            _ => acquire_clean(pool).await,
        }
    }

    /// Keeps `conn` for the next batch, or gives it back to the pool if
    /// enough are kept.
    pub(crate) fn keep(&self, conn: PoolConnection<DB>) {
        let mut kept = self.lock();
        if kept.idle.len() >= kept.most {
            return;
        }
        kept.idle.push((conn, Instant::now()));
        if kept.reaper.as_ref().is_none_or(|r| r.is_finished()) {
            kept.reaper = Some(tokio::spawn(reap(Arc::downgrade(&self.0))));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept<DB>> {
        // Nothing panics while holding it; a poisoned list is still valid.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Gives back to the pool each kept connection idle for
/// [`KEPT_IDLE`]; ends when none is kept, or the queue is
/// dropped.
async fn reap<DB: Database>(writers: std::sync::Weak<Mutex<Kept<DB>>>) {
    loop {
        tokio::time::sleep(KEPT_IDLE).await;
        let Some(writers) = writers.upgrade() else {
            return;
        };
        let mut kept = writers.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = std::mem::take(&mut kept.idle);
        let (stale, fresh): (Vec<_>, Vec<_>) = idle
            .into_iter()
            .partition(|(_, used)| used.elapsed() >= KEPT_IDLE);
        let done = fresh.is_empty();
        if done {
            // Under the lock: the next connection kept starts a new task.
            kept.reaper = None;
        }
        kept.idle = fresh;
        drop(kept);
        drop(stale);
        if done {
            return;
        }
    }
}
