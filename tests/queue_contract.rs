//! What this crate writes into apalis' tables and keys, apalis reads (the
//! apalis crates are pinned exactly in Cargo.toml; this file is the test of
//! that pin). Per backend:
//!
//! - a plain apalis worker — apalis' own `WorkerBuilder` and storage, a
//!   handler that only records, no code of this crate — consumes the jobs
//!   this crate published and the retry job its worker wrote, decoding them
//!   as [`QueuedEvent`], each once;
//! - a job row (SQLite, Postgres) or job hash (Redis) written by this crate
//!   equals, field by field, the one apalis' own push writes for the same
//!   job; every field that may differ is listed with the reason;
//! - a database migrated by a newer apalis does not open (SQLite,
//!   Postgres).
//!
//! SQLite always runs; Postgres and Redis are ignored (with the reason)
//! unless their URL variable was set at build time (see `build.rs`).
#![cfg(feature = "sqlite")]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis::prelude::{BoxDynError, Data};
use eventsink::queue::{QueueBackend, QueuedEvent, RetrySchedule, ThroughTaskQueue};
use eventsink::{Event, NoopSink, Retryable, SinkExt};
use serde_json::{Value, json};
use support::queue::unique_name;
use tower::Layer;

/// The delay of the retry job: long enough that the worker of this crate
/// that wrote it has stopped before it is due, short enough for the plain
/// apalis worker to wait for it.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Upper bound on any wait.
const PATIENCE: Duration = Duration::from_secs(60);

/// How far two due times computed from the clock at two pushes may be
/// apart: both are whole Unix seconds, pushed a moment apart. A unit error
/// (milliseconds) or a lost delay is far outside it.
const CLOCK_TOLERANCE_SECS: i64 = 5;

/// Events published in the worker tests.
const PUBLISHED: usize = 20;

/// Publishes `n` events through this crate's publishing service.
async fn publish<B: QueueBackend<Value>>(backend: &B, n: usize) -> Vec<Event> {
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(NoopSink::new());
    let mut events = Vec::new();
    for i in 0..n {
        let event = Event::new("contract.published", json!({ "n": i, "text": "Zoë \"q\"" }));
        sink.publish(event.clone()).await.expect("publish");
        events.push(event);
    }
    events
}

/// Publishes one event and runs this crate's worker with a sink that fails
/// it transiently, stopping the worker once that attempt ran: the worker has
/// then written the next attempt as a job due after [`RETRY_DELAY`], as
/// every retry does. Returns the event.
async fn write_retry_job<B: QueueBackend<Value>>(backend: &B) -> Event {
    let calls = Arc::new(AtomicUsize::new(0));
    let (called, mut was_called) = tokio::sync::mpsc::unbounded_channel::<()>();
    let failing = {
        let calls = Arc::clone(&calls);
        tower::service_fn(move |_event: Event| {
            calls.fetch_add(1, Ordering::SeqCst);
            let _ = called.send(());
            async {
                Err::<(), _>(eventsink::Error::Simulated {
                    retryable: true,
                    retry_after: None,
                })
            }
        })
    };
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(failing);
    let event = Event::new("contract.retried", json!({ "retry": true }));
    sink.publish(event.clone()).await.expect("publish");
    let worker = sink
        .worker()
        .schedule(RetrySchedule::fixed([RETRY_DELAY]))
        .poll_interval(Duration::from_millis(10))
        .spawn();
    tokio::time::timeout(PATIENCE, was_called.recv())
        .await
        .expect("the first attempt ran");
    // Waits for the delivery in flight, including writing its retry job.
    worker.shutdown().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "precondition: the worker stopped before the retry was due"
    );
    event
}

/// What the plain apalis worker saw.
#[derive(Clone)]
struct Seen {
    jobs: Arc<Mutex<Vec<QueuedEvent<Value>>>>,
    count: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Seen {
    fn new() -> Self {
        Seen {
            jobs: Arc::default(),
            count: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Resolves once `n` jobs were seen.
    fn reached(&self, n: usize) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.count.subscribe();
        async move {
            let _ = rx.wait_for(|&c| c >= n).await;
        }
    }

    fn jobs(&self) -> Vec<QueuedEvent<Value>> {
        self.jobs.lock().unwrap().clone()
    }
}

/// The plain apalis handler: records the job, nothing else.
async fn record(job: QueuedEvent<Value>, seen: Data<Seen>) -> Result<(), BoxDynError> {
    seen.jobs.lock().unwrap().push(job);
    seen.count.send_modify(|n| *n += 1);
    Ok(())
}

/// Runs a plain apalis worker on `$storage` (an apalis storage of
/// `QueuedEvent<Value>`) until it has seen `$want` jobs; what it saw.
macro_rules! consume_with_apalis {
    ($storage:expr, $want:expr) => {{
        use apalis::prelude::{BackendExt, WorkerBuilder, WorkerError};
        let seen = Seen::new();
        let enough = seen.reached($want);
        let worker = WorkerBuilder::new(unique_name("plain-apalis"))
            .backend($storage.poll_with_interval(Duration::from_millis(50)))
            .data(seen.clone())
            .build(record);
        let run = worker.run_until(async move {
            enough.await;
            Ok::<(), WorkerError>(())
        });
        match tokio::time::timeout(PATIENCE, run).await {
            Ok(result) => result.expect("the apalis worker ran without error"),
            Err(_) => panic!(
                "the apalis worker saw {} of {} jobs this crate wrote: {:?}",
                seen.jobs().len(),
                $want,
                seen.jobs()
            ),
        }
        seen.jobs()
    }};
}

/// Every published event and the retry job were seen, each once, unchanged.
fn assert_each_seen_once(seen: &[QueuedEvent<Value>], published: &[Event], retried: &Event) {
    let ids: Vec<&str> = seen.iter().map(|job| &*job.event.id).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a job was seen twice: {ids:?}");
    for event in published.iter().chain([retried]) {
        let job = seen
            .iter()
            .find(|job| job.event.id == event.id)
            .unwrap_or_else(|| panic!("the apalis worker never saw event {}", event.id));
        assert_eq!(&job.event, event, "the event changed on the way");
    }
    assert_eq!(seen.len(), published.len() + 1, "nothing else was seen");
    let retry = seen.iter().find(|job| job.event.id == retried.id).unwrap();
    assert_eq!(retry.attempt, 2, "the retry job is the second attempt");
}

/// A field that may differ between this crate's job and apalis' own, why,
/// and the rule both values must still follow.
struct Exception<V> {
    field: &'static str,
    why: &'static str,
    check: fn(&V, &V) -> Result<(), String>,
}

/// Compares two jobs field by field: every field equal, except the listed
/// exceptions, each of which must pass its own check. Lists every
/// difference at once.
fn assert_same_fields<V: PartialEq + Debug>(
    job: &str,
    ours: &BTreeMap<String, V>,
    apalis: &BTreeMap<String, V>,
    exceptions: &[Exception<V>],
) {
    let fields = |m: &BTreeMap<String, V>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        fields(ours),
        fields(apalis),
        "{job}: this crate's job and apalis' have different fields"
    );
    for exception in exceptions {
        assert!(
            ours.contains_key(exception.field),
            "{job}: the exception {:?} names no field of the job",
            exception.field
        );
    }
    let mut problems = Vec::new();
    for (field, mine) in ours {
        let theirs = &apalis[field];
        match exceptions.iter().find(|e| e.field == field) {
            Some(exception) => {
                if let Err(why_not) = (exception.check)(mine, theirs) {
                    problems.push(format!(
                        "{field} (may differ: {}): {why_not}; this crate wrote {mine:?}, \
                         apalis {theirs:?}",
                        exception.why
                    ));
                }
            }
            None if mine != theirs => problems.push(format!(
                "{field}: this crate wrote {mine:?}, apalis' own push {theirs:?}"
            )),
            None => {}
        }
    }
    assert!(
        problems.is_empty(),
        "{job}: the job this crate wrote differs from apalis' own push:\n  {}",
        problems.join("\n  ")
    );
    println!(
        "{job}: {} fields compared, {} equal, {} listed exceptions",
        ours.len(),
        ours.len() - exceptions.len(),
        exceptions.len()
    );
}

/// Two due times (whole Unix seconds) from two clocks a moment apart.
fn close_seconds(ours: i64, apalis: i64) -> Result<(), String> {
    if (ours - apalis).abs() <= CLOCK_TOLERANCE_SECS {
        Ok(())
    } else {
        Err(format!(
            "{ours} and {apalis} are more than {CLOCK_TOLERANCE_SECS} s apart"
        ))
    }
}

mod sqlite {
    use super::*;
    use apalis::prelude::{TaskBuilder, TaskSink};
    use apalis_sqlite::{Config, SqliteStorage};
    use eventsink::queue::{QueueError, SqliteQueue};
    use sqlx::SqlitePool;
    use sqlx::sqlite::SqliteConnectOptions;

    async fn pool(path: &std::path::Path) -> SqlitePool {
        SqlitePool::connect_with(SqliteConnectOptions::new().filename(path))
            .await
            .expect("open the SQLite file")
    }

    /// One `Jobs` row: every column as `typeof` and `quote` (so that TEXT
    /// and BLOB, or an integer and its text, differ).
    async fn row(pool: &SqlitePool, id: &str) -> BTreeMap<String, String> {
        let columns: Vec<(String,)> = sqlx::query_as("SELECT name FROM pragma_table_info('Jobs')")
            .fetch_all(pool)
            .await
            .unwrap();
        let mut row = BTreeMap::new();
        for (column,) in columns {
            let sql =
                format!("SELECT typeof(\"{column}\"), quote(\"{column}\") FROM Jobs WHERE id = ?");
            let (kind, value): (String, String) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
            row.insert(column, format!("{kind} {value}"));
        }
        row
    }

    /// The pending jobs of `queue`, by event id: (row id, job).
    async fn pending(
        pool: &SqlitePool,
        queue: &str,
    ) -> BTreeMap<String, (String, QueuedEvent<Value>)> {
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, job FROM Jobs WHERE job_type = ? AND status = 'Pending'")
                .bind(queue)
                .fetch_all(pool)
                .await
                .unwrap();
        super::by_event_id(rows)
    }

    fn exceptions() -> Vec<Exception<String>> {
        vec![
            Exception {
                field: "id",
                why: "each push generates its own ULID, the row's primary key",
                check: |ours, apalis| {
                    let ulid = |v: &str| v.starts_with("text '") && v.len() == "text ''".len() + 26;
                    if ulid(ours) && ulid(apalis) && ours != apalis {
                        Ok(())
                    } else {
                        Err("both must be distinct 26-character ULID texts".into())
                    }
                },
            },
            Exception {
                field: "run_at",
                why: "the due second is computed from the clock at each push",
                check: |ours, apalis| {
                    let seconds = |v: &str| -> Result<i64, String> {
                        v.strip_prefix("integer ")
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| format!("{v} is not an integer of Unix seconds"))
                    };
                    close_seconds(seconds(ours)?, seconds(apalis)?)
                },
            },
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_plain_apalis_worker_consumes_jobs_this_crate_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("queue.db");
        let name = unique_name("contract");
        let queue: SqliteQueue = SqliteQueue::open(&path, &name).await.unwrap();
        let retried = write_retry_job(&queue).await;
        let published = publish(&queue, PUBLISHED).await;

        let pool = pool(&path).await;
        let storage = SqliteStorage::<QueuedEvent<Value>>::new(&pool)
            .with_config(Config::default().queue(&*name));
        let seen = consume_with_apalis!(storage, PUBLISHED + 1);
        assert_each_seen_once(&seen, &published, &retried);

        // apalis' acknowledgements found this crate's rows: all completed.
        let statuses: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM Jobs WHERE job_type = ? GROUP BY status")
                .bind(&*name)
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            statuses,
            vec![("Done".to_owned(), PUBLISHED as i64 + 2)],
            "every job done: the published ones, the failed first attempt and its retry"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_rows_this_crate_writes_equal_apalis_own_push() {
        let tmp = tempfile::tempdir().unwrap();
        let name = unique_name("contract");
        let ours_path = tmp.path().join("ours.db");
        let queue: SqliteQueue = SqliteQueue::open(&ours_path, &name).await.unwrap();
        let retried = write_retry_job(&queue).await;
        let published = publish(&queue, 1).await.remove(0);
        let ours_pool = pool(&ours_path).await;
        let ours = pending(&ours_pool, &name).await;
        assert_eq!(
            ours.len(),
            2,
            "the published job and the retry job are pending"
        );

        // The same jobs pushed by apalis itself, into a file of apalis' own.
        let apalis_path = tmp.path().join("apalis.db");
        let apalis_pool = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(&apalis_path)
                .create_if_missing(true),
        )
        .await
        .unwrap();
        SqliteStorage::<()>::migrations()
            .run(&apalis_pool)
            .await
            .unwrap();
        let mut storage = SqliteStorage::<QueuedEvent<Value>>::new(&apalis_pool)
            .with_config(Config::default().queue(&*name));
        for (event, delayed) in [(&published, false), (&retried, true)] {
            let (id, job) = &ours[&*event.id];
            let (key,): (String,) = sqlx::query_as("SELECT idempotency_key FROM Jobs WHERE id = ?")
                .bind(id)
                .fetch_one(&ours_pool)
                .await
                .unwrap();
            let mut task = TaskBuilder::new(job.clone()).idempotency_key(key);
            if delayed {
                task = task.run_after(RETRY_DELAY);
            }
            storage
                .push_task(task.build())
                .await
                .expect("apalis' own push");
        }
        let theirs = pending(&apalis_pool, &name).await;
        for (event, what) in [(&published, "published job"), (&retried, "retry job")] {
            let ours_row = row(&ours_pool, &ours[&*event.id].0).await;
            let theirs_row = row(&apalis_pool, &theirs[&*event.id].0).await;
            assert_same_fields(
                &format!("SQLite {what}"),
                &ours_row,
                &theirs_row,
                &exceptions(),
            );
        }
    }

    #[tokio::test]
    async fn sqlite_database_migrated_by_a_newer_apalis_does_not_open() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("queue.db");
        let queue: SqliteQueue = SqliteQueue::open(&path, "q").await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (29991231000000, 'from a newer apalis', 1, x'00', 0)",
        )
        .execute(queue.pool())
        .await
        .unwrap();
        queue.pool().close().await;
        let newest_known = SqliteStorage::<()>::migrations()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap();

        let err = SqliteQueue::<Value>::open(&path, "q")
            .await
            .expect_err("a database with an unknown apalis migration must not open");
        let text = err.to_string();
        println!("{text}");
        assert!(
            matches!(err, QueueError::NewerSchema { .. }),
            "want QueueError::NewerSchema, got {err:?}"
        );
        assert!(!err.is_retryable(), "retrying cannot help");
        for part in [
            "29991231000000".to_owned(),
            newest_known.to_string(),
            "Upgrade eventsink".to_owned(),
        ] {
            assert!(text.contains(&part), "the message lacks {part:?}: {text}");
        }
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use apalis::prelude::{TaskBuilder, TaskSink};
    use apalis_postgres::{Config, PostgresStorage};
    use eventsink::queue::{PostgresQueue, QueueError};
    use sqlx::PgPool;
    use support::queue::backend_url;

    /// One `apalis.jobs` row as JSON, one field per column.
    async fn row(pool: &PgPool, id: &str) -> BTreeMap<String, Value> {
        let (json,): (String,) =
            sqlx::query_as("SELECT to_jsonb(j)::text FROM apalis.jobs j WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
        serde_json::from_str(&json).unwrap()
    }

    /// The pending jobs of `queue`, by event id: (row id, job).
    async fn pending(pool: &PgPool, queue: &str) -> BTreeMap<String, (String, QueuedEvent<Value>)> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, job FROM apalis.jobs WHERE job_type = $1 AND status = 'Pending'",
        )
        .bind(queue)
        .fetch_all(pool)
        .await
        .unwrap();
        super::by_event_id(rows)
    }

    fn exceptions() -> Vec<Exception<Value>> {
        vec![
            Exception {
                field: "id",
                why: "each push generates its own id, the row's primary key",
                check: |ours, apalis| match (ours.as_str(), apalis.as_str()) {
                    (Some(a), Some(b)) if a != b && a.len() == b.len() => Ok(()),
                    _ => Err("both must be distinct ids of the same form".into()),
                },
            },
            Exception {
                field: "run_at",
                why: "the due time is computed from the clock at each push",
                check: |ours, apalis| {
                    let seconds = |v: &Value| -> Result<i64, String> {
                        v.as_str()
                            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                            .map(|t| t.timestamp())
                            .ok_or_else(|| format!("{v} is not a timestamp"))
                    };
                    close_seconds(seconds(ours)?, seconds(apalis)?)
                },
            },
        ]
    }

    async fn clean(pool: &PgPool, name: &str) {
        for sql in [
            "DELETE FROM apalis.jobs WHERE job_type = $1",
            "DELETE FROM apalis.workers WHERE worker_type = $1",
            "DELETE FROM eventsink_dead_letters WHERE queue = $1",
        ] {
            let _ = sqlx::query(sql).bind(name).execute(pool).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_postgres),
        ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
    )]
    async fn postgres_plain_apalis_worker_consumes_jobs_this_crate_wrote() {
        let url = backend_url("EVENTSINK_POSTGRES_URL");
        let name = unique_name("contract");
        let queue: PostgresQueue = PostgresQueue::connect(&url, &name).await.unwrap();
        let retried = write_retry_job(&queue).await;
        let published = publish(&queue, PUBLISHED).await;

        let pool = PgPool::connect(&url).await.unwrap();
        let storage = PostgresStorage::<QueuedEvent<Value>>::new(&pool)
            .with_config(Config::default().queue(&*name));
        let seen = consume_with_apalis!(storage, PUBLISHED + 1);
        assert_each_seen_once(&seen, &published, &retried);

        let statuses: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM apalis.jobs WHERE job_type = $1 GROUP BY status",
        )
        .bind(&*name)
        .fetch_all(&pool)
        .await
        .unwrap();
        clean(&pool, &name).await;
        assert_eq!(
            statuses,
            vec![("Done".to_owned(), PUBLISHED as i64 + 2)],
            "every job done: the published ones, the failed first attempt and its retry"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_postgres),
        ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
    )]
    async fn postgres_rows_this_crate_writes_equal_apalis_own_push() {
        let url = backend_url("EVENTSINK_POSTGRES_URL");
        let name = unique_name("contract");
        let queue: PostgresQueue = PostgresQueue::connect(&url, &name).await.unwrap();
        let retried = write_retry_job(&queue).await;
        let published = publish(&queue, 1).await.remove(0);
        let pool = queue.pool().clone();
        let ours = pending(&pool, &name).await;
        assert_eq!(
            ours.len(),
            2,
            "the published job and the retry job are pending"
        );
        let mut ours_rows = BTreeMap::new();
        for (event_id, (id, _)) in &ours {
            ours_rows.insert(event_id.clone(), row(&pool, id).await);
        }
        // The idempotency keys are unique per queue: remove this crate's
        // rows before apalis pushes the same jobs under the same keys.
        for (id, _) in ours.values() {
            sqlx::query("DELETE FROM apalis.jobs WHERE id = $1")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
        }
        let mut storage = PostgresStorage::<QueuedEvent<Value>>::new(&pool)
            .with_config(Config::default().queue(&*name));
        for (event, delayed) in [(&published, false), (&retried, true)] {
            let (id, job) = &ours[&*event.id];
            let key = ours_rows[&*event.id]["idempotency_key"]
                .as_str()
                .unwrap_or_else(|| panic!("job {id} has an idempotency key"))
                .to_owned();
            let mut task = TaskBuilder::new(job.clone()).idempotency_key(key);
            if delayed {
                task = task.run_after(RETRY_DELAY);
            }
            storage
                .push_task(task.build())
                .await
                .expect("apalis' own push");
        }
        let theirs = pending(&pool, &name).await;
        let mut results = Vec::new();
        for (event, what) in [(&published, "published job"), (&retried, "retry job")] {
            let theirs_row = row(&pool, &theirs[&*event.id].0).await;
            results.push((what, ours_rows[&*event.id].clone(), theirs_row));
        }
        clean(&pool, &name).await;
        for (what, ours_row, theirs_row) in results {
            assert_same_fields(
                &format!("Postgres {what}"),
                &ours_row,
                &theirs_row,
                &exceptions(),
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_postgres),
        ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
    )]
    async fn postgres_database_migrated_by_a_newer_apalis_does_not_open() {
        use std::str::FromStr;
        let url = backend_url("EVENTSINK_POSTGRES_URL");
        // A database of its own: the other tests share apalis' tables in
        // the test database and must not see the fake migration.
        let database = format!("eventsink_contract_{}", uuid::Uuid::now_v7().simple());
        let admin = PgPool::connect(&url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&admin)
            .await
            .unwrap();
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .unwrap()
            .database(&database);
        let outcome = async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect_with(options)
                .await
                .unwrap();
            let _first: PostgresQueue = PostgresQueue::attach(pool.clone(), "q")
                .await
                .expect("a new database opens");
            sqlx::query(
                "INSERT INTO apalis._sqlx_migrations \
                 (version, description, success, checksum, execution_time) \
                 VALUES (29991231000000, 'from a newer apalis', true, '\\x00', 0)",
            )
            .execute(&pool)
            .await
            .unwrap();
            let result = PostgresQueue::<Value>::attach(pool.clone(), "q").await;
            pool.close().await;
            result
        }
        .await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {database} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .unwrap();

        let newest_known = PostgresStorage::<()>::migrations()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap();
        let err = outcome.expect_err("a database with an unknown apalis migration must not open");
        let text = err.to_string();
        println!("{text}");
        assert!(
            matches!(err, QueueError::NewerSchema { .. }),
            "want QueueError::NewerSchema, got {err:?}"
        );
        for part in [
            "29991231000000".to_owned(),
            newest_known.to_string(),
            "Upgrade eventsink".to_owned(),
        ] {
            assert!(text.contains(&part), "the message lacks {part:?}: {text}");
        }
    }
}

#[cfg(feature = "redis")]
mod redis_backend {
    use super::*;
    use apalis::prelude::{TaskBuilder, TaskSink};
    use apalis_redis::{Config, RedisStorage};
    use eventsink::queue::RedisQueue;
    use redis::aio::ConnectionManager;
    use support::queue::backend_url;

    /// A job in apalis' Redis keys, as fields: its meta hash (`meta.*`), its
    /// data (`data`), its id, where it waits (`active`, `scheduled_at`) and
    /// apalis' idempotency marker.
    async fn job(
        conn: &mut ConnectionManager,
        config: &Config,
        id: &str,
        key: &str,
    ) -> BTreeMap<String, String> {
        let mut fields = BTreeMap::new();
        let meta: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{}:{id}", config.job_meta_hash()))
            .query_async(conn)
            .await
            .unwrap();
        for (field, value) in meta {
            fields.insert(format!("meta.{field}"), value);
        }
        let data: Vec<u8> = redis::cmd("HGET")
            .arg(config.job_data_hash())
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
        fields.insert("data".into(), String::from_utf8(data).expect("JSON"));
        fields.insert("id".into(), id.to_owned());
        let active: Option<i64> = redis::cmd("LPOS")
            .arg(config.active_jobs_list())
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
        fields.insert("active".into(), active.is_some().to_string());
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(config.scheduled_jobs_set())
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
        fields.insert(
            "scheduled_at".into(),
            score.map_or("none".into(), |s| (s as i64).to_string()),
        );
        // Compared, not an exception: apalis' push claims the key with
        // `SETNX {queue}:idempotency:{key}` and then `EXPIRE`s it with the
        // configured TTL, 0 by default ("forever"), which deletes it at once
        // (apalis-redis 1.0.0, lua/batch_push.lua). This crate writes no
        // marker (its duplicate check is the job id derived from the key),
        // so today both are "none"; an apalis that keeps its marker shows
        // up here.
        let marker: Option<String> = redis::cmd("GET")
            .arg(format!("{}:{key}", config.idempotency_key_set()))
            .query_async(conn)
            .await
            .unwrap();
        fields.insert("idempotency_marker".into(), marker.unwrap_or("none".into()));
        fields
    }

    /// The pending jobs of a queue, by event id: (job id, job).
    async fn pending(
        conn: &mut ConnectionManager,
        config: &Config,
    ) -> BTreeMap<String, (String, QueuedEvent<Value>)> {
        let all: BTreeMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(config.job_data_hash())
            .query_async(conn)
            .await
            .unwrap();
        let mut pending = BTreeMap::new();
        for (id, data) in all {
            let status: Option<String> = redis::cmd("HGET")
                .arg(format!("{}:{id}", config.job_meta_hash()))
                .arg("status")
                .query_async(conn)
                .await
                .unwrap();
            if status.as_deref() == Some("Pending") {
                let job: QueuedEvent<Value> =
                    serde_json::from_slice(&data).expect("a job is a QueuedEvent");
                pending.insert(job.event.id.to_string(), (id, job));
            }
        }
        pending
    }

    fn exceptions(delayed: bool) -> Vec<Exception<String>> {
        let mut exceptions = vec![Exception {
            field: "id",
            why: "this crate derives the job id from the idempotency key (so that HSETNX on \
                      the data hash is its duplicate check); apalis generates a ULID",
            check: |ours: &String, apalis: &String| {
                if ours != apalis && !ours.is_empty() && !apalis.is_empty() {
                    Ok(())
                } else {
                    Err("both must be distinct, non-empty ids".into())
                }
            },
        }];
        if !delayed {
            exceptions.push(Exception {
                field: "active",
                why: "apalis' push puts every job in the scheduled set (a job due now at the \
                      current second) and its fetch moves due jobs to the active list; this \
                      crate puts a job due now straight onto the active list",
                check: |ours: &String, apalis: &String| {
                    if ours == "true" && apalis == "false" {
                        Ok(())
                    } else {
                        Err("this crate's job due now is active, apalis' not yet".into())
                    }
                },
            });
            exceptions.push(Exception {
                field: "scheduled_at",
                why: "the other half of `active`: apalis schedules a job due now at the current \
                      second, this crate does not schedule it",
                check: |ours: &String, apalis: &String| match (ours.as_str(), apalis.parse::<i64>())
                {
                    ("none", Ok(due)) => close_seconds(chrono::Utc::now().timestamp(), due),
                    _ => Err("this crate's job is not scheduled, apalis' is, due now".into()),
                },
            });
        } else {
            exceptions.push(Exception {
                field: "scheduled_at",
                why: "the due second is computed from the clock at each push",
                check: |ours: &String, apalis: &String| match (
                    ours.parse::<i64>(),
                    apalis.parse::<i64>(),
                ) {
                    (Ok(a), Ok(b)) => close_seconds(a, b),
                    _ => Err("both must be scheduled".into()),
                },
            });
        }
        exceptions
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn redis_plain_apalis_worker_consumes_jobs_this_crate_wrote() {
        let url = backend_url("EVENTSINK_REDIS_URL");
        let name = unique_name("contract");
        let queue: RedisQueue = RedisQueue::connect(&url, &name).await.unwrap();
        let retried = write_retry_job(&queue).await;
        let published = publish(&queue, PUBLISHED).await;

        let conn = apalis_redis::connect(url.as_str()).await.unwrap();
        let config = Config::default().queue(&*name);
        let storage =
            RedisStorage::<QueuedEvent<Value>>::new(conn.clone()).with_config(config.clone());
        let seen = consume_with_apalis!(storage, PUBLISHED + 1);

        // apalis' acknowledgements found this crate's jobs: all done.
        let mut conn = conn;
        let ids: Vec<String> = redis::cmd("HKEYS")
            .arg(config.job_data_hash())
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut not_done = Vec::new();
        for id in &ids {
            let status: Option<String> = redis::cmd("HGET")
                .arg(format!("{}:{id}", config.job_meta_hash()))
                .arg("status")
                .query_async(&mut conn)
                .await
                .unwrap();
            if status.as_deref() != Some("Done") {
                not_done.push((id.clone(), status));
            }
        }
        support::queue::delete_redis_keys(&url, std::slice::from_ref(&name)).await;
        assert_each_seen_once(&seen, &published, &retried);
        assert_eq!(
            ids.len(),
            PUBLISHED + 2,
            "the published jobs, the first attempt, the retry"
        );
        assert!(not_done.is_empty(), "jobs not done: {not_done:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn redis_jobs_this_crate_writes_equal_apalis_own_push() {
        let url = backend_url("EVENTSINK_REDIS_URL");
        let name = unique_name("contract");
        let queue: RedisQueue = RedisQueue::connect(&url, &name).await.unwrap();
        let retried = write_retry_job(&queue).await;
        let published = publish(&queue, 1).await.remove(0);
        let mut conn = apalis_redis::connect(url.as_str()).await.unwrap();
        let ours_config = Config::default().queue(&*name);
        let ours = pending(&mut conn, &ours_config).await;
        assert_eq!(
            ours.len(),
            2,
            "the published job and the retry job are pending"
        );

        // The same jobs pushed by apalis itself, into a queue of its own.
        let apalis_name = unique_name("contract-apalis");
        let apalis_config = Config::default().queue(&*apalis_name);
        let mut storage = RedisStorage::<QueuedEvent<Value>>::new(conn.clone())
            .with_config(apalis_config.clone());
        let mut keys = BTreeMap::new();
        for (event, delayed) in [(&published, false), (&retried, true)] {
            let (id, job) = &ours[&*event.id];
            let key: String = redis::cmd("HGET")
                .arg(format!("{}:{id}", ours_config.job_meta_hash()))
                .arg("idempotency_key")
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut task = TaskBuilder::new(job.clone()).idempotency_key(&key);
            if delayed {
                task = task.run_after(RETRY_DELAY);
            }
            storage
                .push_task(task.build())
                .await
                .expect("apalis' own push");
            keys.insert(event.id.to_string(), key);
        }
        let theirs = pending(&mut conn, &apalis_config).await;
        let mut results = Vec::new();
        for (event, delayed, what) in [
            (&published, false, "published job"),
            (&retried, true, "retry job"),
        ] {
            let key = &keys[&*event.id];
            let ours_job = job(&mut conn, &ours_config, &ours[&*event.id].0, key).await;
            let theirs_job = job(&mut conn, &apalis_config, &theirs[&*event.id].0, key).await;
            results.push((what, delayed, ours_job, theirs_job));
        }
        support::queue::delete_redis_keys(&url, &[name, apalis_name]).await;
        for (what, delayed, ours_job, theirs_job) in results {
            assert_same_fields(
                &format!("Redis {what}"),
                &ours_job,
                &theirs_job,
                &exceptions(delayed),
            );
        }
    }
}

/// Stored jobs `(row id, job bytes)`, decoded and keyed by event id.
fn by_event_id(rows: Vec<(String, Vec<u8>)>) -> BTreeMap<String, (String, QueuedEvent<Value>)> {
    rows.into_iter()
        .map(|(id, job)| {
            let job: QueuedEvent<Value> =
                serde_json::from_slice(&job).expect("a job is a QueuedEvent");
            (job.event.id.to_string(), (id, job))
        })
        .collect()
}
