//! Scenarios of the queue feature, per backend (SQLite always; Postgres and
//! Redis when `EVENTSINK_POSTGRES_URL` / `EVENTSINK_REDIS_URL` are set):
//!
//! - `queue_publish_<backend>`: events/s of 64 concurrent publishers through
//!   `ThroughTaskQueue` (group commit) against the same publishers each
//!   calling apalis' `push` on a cloned storage;
//! - `queue_publish_<backend>_c1` (and `queue_publish_sqlite_c8`): events/s
//!   of one task (eight tasks) awaiting each publish, against one caller
//!   writing the same rows as directly as the driver allows on one
//!   connection: SQLite `BEGIN; INSERT; COMMIT` into apalis' `Jobs` table,
//!   a Postgres autocommit `INSERT` into `apalis.jobs`, a Redis
//!   `HSET`+`LPUSH` pipeline;
//! - `queue_e2e_<backend>`: events/s from the first publish until the last
//!   event reached the sink through the worker, against an apalis worker
//!   with a no-op handler draining the same number of pushed jobs;
//! - `queue_latency_<backend>`: median ms from `publish` returning to the
//!   sink being called, events published one at a time into an idle
//!   worker, against a 20 ms budget;
//! - `queue_backlog_<backend>`: µs per event to drain a backlog of 200,000
//!   events (`--quick`: 50,000) queued with no worker running, to a
//!   `NoopSink`, against the same drain of 20,000 (5,000): a drain that
//!   stays linear as the backlog grows has a ratio near 1. Prints the peak
//!   RSS during the large drain too.

use crate::harness::Scenario;

pub fn all() -> Vec<Scenario> {
    #[cfg(all(feature = "sqlite", feature = "postgres", feature = "redis"))]
    return backends::all();
    #[cfg(not(all(feature = "sqlite", feature = "postgres", feature = "redis")))]
    {
        println!("queue scenarios need the sqlite, postgres and redis features");
        Vec::new()
    }
}

#[cfg(all(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) mod backends {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use apalis::prelude::WorkerBuilderExt;
    use apalis_core::backend::TaskSink;
    use apalis_core::backend::ext::BackendExt;
    use apalis_core::error::{BoxDynError, WorkerError};
    use apalis_core::task::Task;
    use apalis_core::worker::builder::WorkerBuilder;
    use eventsink::queue::{
        DEFAULT_CONCURRENCY, DEFAULT_MAX_BATCH, DEFAULT_POLL_INTERVAL, PostgresQueue, QueueBackend,
        QueuedEvent, RedisQueue, SQLITE_BUSY_TIMEOUT, SqliteQueue, ThroughTaskQueue,
    };
    use eventsink::{Event, NoopSink, SinkExt};
    use serde_json::json;
    use tokio::sync::{mpsc, watch};
    use tower::Layer;

    use crate::harness::{
        Options, RssSampler, Scenario, paired_rounds, per_second, report, rss_mib, runtime,
    };

    /// Concurrent publishers in the publish and e2e scenarios.
    const PUBLISHERS: usize = 64;
    /// The latency budget of `queue_latency_*`.
    const LATENCY_BUDGET_MS: f64 = 20.0;

    pub(crate) fn all() -> Vec<Scenario> {
        vec![
            Scenario {
                name: "queue_publish_sqlite",
                run: |o| publish(o, Kind::Sqlite),
            },
            Scenario {
                name: "queue_publish_postgres",
                run: |o| publish(o, Kind::Postgres),
            },
            Scenario {
                name: "queue_publish_redis",
                run: |o| publish(o, Kind::Redis),
            },
            Scenario {
                name: "queue_publish_sqlite_c1",
                run: |o| publish_few(o, Kind::Sqlite, 1),
            },
            Scenario {
                name: "queue_publish_sqlite_c8",
                run: |o| publish_few(o, Kind::Sqlite, 8),
            },
            Scenario {
                name: "queue_publish_postgres_c1",
                run: |o| publish_few(o, Kind::Postgres, 1),
            },
            Scenario {
                name: "queue_publish_redis_c1",
                run: |o| publish_few(o, Kind::Redis, 1),
            },
            Scenario {
                name: "queue_e2e_sqlite",
                run: |o| e2e(o, Kind::Sqlite),
            },
            Scenario {
                name: "queue_e2e_postgres",
                run: |o| e2e(o, Kind::Postgres),
            },
            Scenario {
                name: "queue_e2e_redis",
                run: |o| e2e(o, Kind::Redis),
            },
            Scenario {
                name: "queue_latency_sqlite",
                run: |o| latency(o, Kind::Sqlite),
            },
            Scenario {
                name: "queue_latency_postgres",
                run: |o| latency(o, Kind::Postgres),
            },
            Scenario {
                name: "queue_latency_redis",
                run: |o| latency(o, Kind::Redis),
            },
            Scenario {
                name: "queue_backlog_sqlite",
                run: |o| backlog(o, Kind::Sqlite),
            },
            Scenario {
                name: "queue_backlog_postgres",
                run: |o| backlog(o, Kind::Postgres),
            },
            Scenario {
                name: "queue_backlog_redis",
                run: |o| backlog(o, Kind::Redis),
            },
        ]
    }

    #[derive(Clone, Copy, PartialEq)]
    pub(crate) enum Kind {
        Sqlite,
        Postgres,
        Redis,
    }

    impl Kind {
        pub(crate) fn label(self) -> &'static str {
            match self {
                Kind::Sqlite => "sqlite",
                Kind::Postgres => "postgres",
                Kind::Redis => "redis",
            }
        }

        /// Where the backend is, or `None` (said on stdout) when its variable
        /// is unset.
        pub(crate) fn location(self, scenario: &str) -> Option<String> {
            let var = match self {
                Kind::Sqlite => return Some(String::new()),
                Kind::Postgres => "EVENTSINK_POSTGRES_URL",
                Kind::Redis => "EVENTSINK_REDIS_URL",
            };
            match std::env::var(var) {
                Ok(url) if !url.is_empty() => Some(url),
                _ => {
                    println!("{scenario}: not run, {var} is not set");
                    None
                }
            }
        }
    }

    fn name(what: &str) -> String {
        format!("bench-{what}-{}", uuid::Uuid::now_v7().simple())
    }

    pub(crate) fn event(n: usize) -> Event {
        Event::new("bench.queue", json!({"order_id": n, "total_cents": 1250}))
    }

    /// A backend for one round: the queue, and what the baseline needs.
    pub(crate) struct Round {
        pub(crate) kind: Kind,
        pub(crate) location: String,
        _dir: tempfile::TempDir,
        pub(crate) queue: String,
    }

    impl Round {
        pub(crate) fn new(kind: Kind, location: &str, what: &str) -> Self {
            Round {
                kind,
                location: location.to_owned(),
                _dir: tempfile::tempdir().expect("temp dir"),
                queue: name(what),
            }
        }

        pub(crate) fn sqlite_path(&self) -> std::path::PathBuf {
            self._dir.path().join("bench.db")
        }

        pub(crate) async fn cleanup(&self) {
            match self.kind {
                Kind::Sqlite => {}
                Kind::Postgres => {
                    if let Ok(pool) = sqlx::PgPool::connect(&self.location).await {
                        let _ = sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
                            .bind(&self.queue)
                            .execute(&pool)
                            .await;
                        let _ = sqlx::query("DELETE FROM apalis.workers WHERE worker_type = $1")
                            .bind(&self.queue)
                            .execute(&pool)
                            .await;
                    }
                }
                Kind::Redis => {
                    if let Ok(client) = redis::Client::open(self.location.as_str())
                        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                    {
                        let keys: Vec<String> = redis::cmd("KEYS")
                            .arg(format!("*{}*", self.queue))
                            .query_async(&mut conn)
                            .await
                            .unwrap_or_default();
                        if !keys.is_empty() {
                            let _: Result<(), _> =
                                redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                        }
                        let _: Result<(), _> = redis::cmd("ZREM")
                            .arg("core:apalis:queues:list")
                            .arg(format!("{}:workers", self.queue))
                            .query_async(&mut conn)
                            .await;
                    }
                }
            }
        }
    }

    /// Runs `f` with our queue of the round's backend.
    macro_rules! with_queue {
        ($round:expr, |$q:ident| $body:expr) => {
            match $round.kind {
                Kind::Sqlite => {
                    let $q: SqliteQueue = SqliteQueue::open($round.sqlite_path(), &$round.queue)
                        .await
                        .expect("sqlite queue");
                    $body
                }
                Kind::Postgres => {
                    let $q: PostgresQueue = PostgresQueue::connect(&$round.location, &$round.queue)
                        .await
                        .expect("postgres queue");
                    $body
                }
                Kind::Redis => {
                    let $q: RedisQueue = RedisQueue::connect(&$round.location, &$round.queue)
                        .await
                        .expect("redis queue");
                    $body
                }
            }
        };
    }
    pub(crate) use with_queue;

    /// Runs `f` with a raw apalis storage of the round's backend (jobs are
    /// plain events, no idempotency key), on the same database as our queue.
    macro_rules! with_raw_storage {
        ($round:expr, |$s:ident| $body:expr) => {
            match $round.kind {
                Kind::Sqlite => {
                    // Our queue's pool: WAL, synchronous=NORMAL, migrated.
                    let ours: SqliteQueue = SqliteQueue::open($round.sqlite_path(), &$round.queue)
                        .await
                        .expect("sqlite queue");
                    let config = apalis_sqlite::Config::default().queue(&$round.queue);
                    let $s =
                        apalis_sqlite::SqliteStorage::<Event>::new(ours.pool()).with_config(config);
                    $body
                }
                Kind::Postgres => {
                    let ours: PostgresQueue =
                        PostgresQueue::connect(&$round.location, &$round.queue)
                            .await
                            .expect("postgres queue");
                    let config = apalis_postgres::Config::default().queue(&$round.queue);
                    let $s = apalis_postgres::PostgresStorage::<Event>::new(ours.pool())
                        .with_config(config);
                    $body
                }
                Kind::Redis => {
                    let conn = apalis_redis::connect($round.location.as_str())
                        .await
                        .expect("redis");
                    let config = apalis_redis::Config::default().queue(&$round.queue);
                    let $s = apalis_redis::RedisStorage::<Event>::new(conn).with_config(config);
                    $body
                }
            }
        };
    }

    // ---------------------------------------------------------------- publish

    fn publish(options: &Options, kind: Kind) {
        let scenario = format!("queue_publish_{}", kind.label());
        let Some(location) = kind.location(&scenario) else {
            return;
        };
        let per_publisher = options.size(20, 150);
        let rt = runtime();
        let m = paired_rounds(
            3,
            || {
                rt.block_on(publish_ours(
                    kind,
                    location.clone(),
                    PUBLISHERS,
                    per_publisher,
                ))
            },
            || rt.block_on(publish_raw(kind, &location, per_publisher)),
        );
        report(
            &scenario,
            m.ours,
            m.baseline,
            m.ratio,
            "events/s",
            "64 publishers calling apalis push on cloned storages",
        );
    }

    /// Events/s of `publishers` tasks each awaiting `per_publisher`
    /// publishes through our queue.
    async fn publish_ours(
        kind: Kind,
        location: String,
        publishers: usize,
        per_publisher: usize,
    ) -> f64 {
        let round = Round::new(kind, &location, "publish");
        let rate = with_queue!(round, |queue| {
            let sink = ThroughTaskQueue::new(queue).layer(NoopSink::new());
            let started = tokio::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for p in 0..publishers {
                let mut sink = sink.clone();
                tasks.spawn(async move {
                    for n in 0..per_publisher {
                        sink.publish(event(p * per_publisher + n))
                            .await
                            .expect("publish");
                    }
                });
            }
            tasks.join_all().await;
            per_second(publishers * per_publisher, started.elapsed())
        });
        round.cleanup().await;
        rate
    }

    async fn publish_raw(kind: Kind, location: &str, per_publisher: usize) -> f64 {
        let round = Round::new(kind, location, "publish-raw");
        let rate = with_raw_storage!(round, |storage| {
            let started = tokio::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for p in 0..PUBLISHERS {
                let mut storage = storage.clone();
                tasks.spawn(async move {
                    for n in 0..per_publisher {
                        storage
                            .push(event(p * per_publisher + n))
                            .await
                            .expect("apalis push");
                    }
                });
            }
            tasks.join_all().await;
            per_second(PUBLISHERS * per_publisher, started.elapsed())
        });
        round.cleanup().await;
        rate
    }

    // ------------------------------------------------- publish, few callers

    /// Rounds of the few-callers publish scenarios.
    const FEW_ROUNDS: usize = 5;
    /// `max_attempts` of the floors' rows: apalis' default, which our queue
    /// stores too.
    const APALIS_MAX_ATTEMPTS: i32 = 25;

    /// apalis' `Jobs` row as our SQLite queue inserts it (same columns and
    /// values), one per transaction, in one call to sqlx's connection thread.
    const SQLITE_FLOOR: &str = "BEGIN; \
        INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, \
        priority, metadata, idempotency_key) VALUES (?, ?, ?, 'Pending', 0, ?, ?, 0, '{}', ?) \
        ON CONFLICT (job_type, idempotency_key) DO NOTHING; \
        COMMIT;";

    /// apalis-postgres' row (its `queries/task/sink.sql`), one event per
    /// statement.
    const POSTGRES_FLOOR: &str = "INSERT INTO apalis.jobs (id, job_type, job, status, \
        attempts, max_attempts, run_at, priority, metadata, idempotency_key) \
        VALUES ($1, $2, $3, 'Pending', 0, $4, to_timestamp($5::bigint), 0, $6, $7)";

    /// `callers` tasks each awaiting its publishes, against the floor of one
    /// caller on one connection.
    fn publish_few(options: &Options, kind: Kind, callers: usize) {
        let scenario = format!("queue_publish_{}_c{callers}", kind.label());
        let Some(location) = kind.location(&scenario) else {
            return;
        };
        let events = match kind {
            Kind::Postgres => options.size(500, 3_000),
            Kind::Sqlite | Kind::Redis => options.size(2_000, 8_000),
        };
        let rt = runtime();
        let m = paired_rounds(
            FEW_ROUNDS,
            || {
                let ours = publish_ours(kind, location.clone(), callers, events / callers);
                rt.block_on(rt.spawn(ours)).expect("publishers")
            },
            || {
                rt.block_on(rt.spawn(floor(kind, location.clone(), events)))
                    .expect("floor")
            },
        );
        let baseline = match kind {
            Kind::Sqlite => "one caller, BEGIN+INSERT+COMMIT into apalis' Jobs, one connection",
            Kind::Postgres => "one caller, autocommit INSERT into apalis.jobs, one connection",
            Kind::Redis => "one caller, HSET+LPUSH pipeline, one connection",
        };
        report(&scenario, m.ours, m.baseline, m.ratio, "events/s", baseline);
    }

    /// Events/s of one caller writing `events` rows of our queue's shape
    /// straight through the driver, on one connection.
    async fn floor(kind: Kind, location: String, events: usize) -> f64 {
        let round = Round::new(kind, &location, "floor");
        // Our queue creates the schema (apalis' migrations, indexes and, on
        // SQLite, the planner statistics); the floor then writes to it
        // without our queue.
        with_queue!(round, |queue| drop(queue));
        let rate = match kind {
            Kind::Sqlite => sqlite_floor(&round, events).await,
            Kind::Postgres => postgres_floor(&round, events).await,
            Kind::Redis => redis_floor(&round, events).await,
        };
        round.cleanup().await;
        rate
    }

    /// A job of the round's queue as our queue stores it: its JSON, its
    /// idempotency key.
    fn job(round: &Round, n: usize) -> (Vec<u8>, String) {
        let job = QueuedEvent::new(&round.queue, event(n));
        let data = serde_json::to_vec(&job).expect("job JSON");
        (data, job.idempotency_key())
    }

    fn now_second() -> i64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        i64::try_from(now.expect("clock after 1970").as_secs()).expect("seconds fit i64")
    }

    async fn sqlite_floor(round: &Round, events: usize) -> f64 {
        use sqlx::ConnectOptions;
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
        let mut conn = SqliteConnectOptions::new()
            .filename(round.sqlite_path())
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .connect()
            .await
            .expect("sqlite connection");
        let started = tokio::time::Instant::now();
        for n in 0..events {
            let (data, key) = job(round, n);
            sqlx::query(SQLITE_FLOOR)
                .bind(data)
                .bind(ulid::Ulid::generate().to_string())
                .bind(&round.queue)
                .bind(APALIS_MAX_ATTEMPTS)
                .bind(now_second())
                .bind(key)
                .execute(&mut conn)
                .await
                .expect("insert");
        }
        let rate = per_second(events, started.elapsed());
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM Jobs WHERE job_type = ?")
            .bind(&round.queue)
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(usize::try_from(stored), Ok(events), "the floor's rows");
        sqlx::Connection::close(conn).await.expect("close");
        rate
    }

    async fn postgres_floor(round: &Round, events: usize) -> f64 {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&round.location)
            .await
            .expect("postgres connection");
        let started = tokio::time::Instant::now();
        for n in 0..events {
            let (data, key) = job(round, n);
            sqlx::query(POSTGRES_FLOOR)
                .bind(ulid::Ulid::generate().to_string())
                .bind(&round.queue)
                .bind(data)
                .bind(APALIS_MAX_ATTEMPTS)
                .bind(now_second())
                .bind(sqlx::postgres::types::PgHstore::default())
                .bind(key)
                .execute(&mut conn)
                .await
                .expect("insert");
        }
        let rate = per_second(events, started.elapsed());
        let stored: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1")
                .bind(&round.queue)
                .fetch_one(&mut conn)
                .await
                .expect("count");
        assert_eq!(usize::try_from(stored), Ok(events), "the floor's rows");
        sqlx::Connection::close(conn).await.expect("close");
        rate
    }

    async fn redis_floor(round: &Round, events: usize) -> f64 {
        let mut conn = redis::Client::open(round.location.as_str())
            .expect("redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection");
        // Under the round's queue name, so that its cleanup deletes them.
        let (data_key, list_key) = (
            format!("{}:floor:data", round.queue),
            format!("{}:floor:active", round.queue),
        );
        let started = tokio::time::Instant::now();
        for n in 0..events {
            let (data, _) = job(round, n);
            let id = uuid::Uuid::now_v7().to_string();
            redis::pipe()
                .hset(&data_key, &id, data)
                .ignore()
                .lpush(&list_key, &id)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .expect("HSET+LPUSH");
        }
        let rate = per_second(events, started.elapsed());
        let stored: usize = redis::cmd("HLEN")
            .arg(&data_key)
            .query_async(&mut conn)
            .await
            .expect("HLEN");
        assert_eq!(stored, events, "the floor's jobs");
        rate
    }

    // ---------------------------------------------------------------- e2e

    fn e2e(options: &Options, kind: Kind) {
        let scenario = format!("queue_e2e_{}", kind.label());
        let Some(location) = kind.location(&scenario) else {
            return;
        };
        let events = options.size(1_000, 10_000);
        let rt = runtime();
        let m = paired_rounds(
            3,
            || rt.block_on(e2e_ours(kind, &location, events)),
            || rt.block_on(e2e_raw(kind, &location, events)),
        );
        report(
            &scenario,
            m.ours,
            m.baseline,
            m.ratio,
            "events/s",
            "apalis worker with a no-op handler draining pushed jobs",
        );
    }

    /// Counts calls and says when `target` were made.
    #[derive(Clone)]
    struct Counter {
        seen: Arc<AtomicUsize>,
        done: Arc<watch::Sender<bool>>,
        target: usize,
    }

    impl Counter {
        fn new(target: usize) -> Self {
            Counter {
                seen: Arc::new(AtomicUsize::new(0)),
                done: Arc::new(watch::channel(false).0),
                target,
            }
        }

        fn hit(&self) {
            if self.seen.fetch_add(1, Ordering::Relaxed) + 1 >= self.target {
                self.done.send_replace(true);
            }
        }

        async fn wait(&self) {
            let mut done = self.done.subscribe();
            let _ = done.wait_for(|&d| d).await;
        }
    }

    async fn e2e_ours(kind: Kind, location: &str, events: usize) -> f64 {
        let round = Round::new(kind, location, "e2e");
        let rate = with_queue!(round, |queue| {
            let counter = Counter::new(events);
            let sink = {
                let counter = counter.clone();
                tower::service_fn(move |_: Event| {
                    counter.hit();
                    std::future::ready(Ok::<(), eventsink::Error>(()))
                })
            };
            let publisher = ThroughTaskQueue::new(queue).layer(sink);
            let worker = publisher.worker().spawn();
            let started = tokio::time::Instant::now();
            let per_publisher = events / PUBLISHERS;
            let mut tasks = tokio::task::JoinSet::new();
            for p in 0..PUBLISHERS {
                let mut publisher = publisher.clone();
                let count = if p == 0 {
                    per_publisher + events % PUBLISHERS
                } else {
                    per_publisher
                };
                tasks.spawn(async move {
                    for n in 0..count {
                        publisher
                            .publish(event(p * 100_000 + n))
                            .await
                            .expect("publish");
                    }
                });
            }
            tasks.join_all().await;
            counter.wait().await;
            let rate = per_second(events, started.elapsed());
            worker.shutdown().await;
            rate
        });
        round.cleanup().await;
        rate
    }

    async fn e2e_raw(kind: Kind, location: &str, events: usize) -> f64 {
        let round = Round::new(kind, location, "e2e-raw");
        let rate = with_raw_storage!(round, |storage| {
            let counter = Counter::new(events);
            let handler = {
                let counter = counter.clone();
                tower::service_fn(move |_: Task<Event>| {
                    counter.hit();
                    std::future::ready(Ok::<(), BoxDynError>(()))
                })
            };
            // The worker runs while the jobs are pushed, as ours does: a
            // Redis backlog above ~8,000 due jobs stops apalis' fetch (one
            // Lua `unpack` of all of them), which our queue works around.
            let mut pusher = storage.clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let worker = WorkerBuilder::new(format!("{}-raw", round.queue))
                .backend(storage.poll_with_interval(DEFAULT_POLL_INTERVAL))
                .concurrency(DEFAULT_CONCURRENCY)
                .build(handler);
            let started = tokio::time::Instant::now();
            let mut running = tokio::spawn(worker.run_until(async move {
                let _ = stopped.await;
                Ok::<(), WorkerError>(())
            }));
            let all: Vec<_> = (0..events).map(event).collect();
            for chunk in all.chunks(1_000) {
                pusher.push_bulk(chunk.to_vec()).await.expect("push_bulk");
            }
            tokio::select! {
                () = counter.wait() => {}
                ended = &mut running => panic!("the apalis worker ended early: {ended:?}"),
            }
            let rate = per_second(events, started.elapsed());
            let _ = stop.send(());
            let _ = running.await;
            rate
        });
        round.cleanup().await;
        rate
    }

    // ---------------------------------------------------------------- latency

    fn latency(options: &Options, kind: Kind) {
        let scenario = format!("queue_latency_{}", kind.label());
        let Some(location) = kind.location(&scenario) else {
            return;
        };
        let events = options.size(60, 200);
        let rt = runtime();
        let median = rt.block_on(latency_round(kind, &location, events));
        report(
            &scenario,
            median,
            LATENCY_BUDGET_MS,
            median / LATENCY_BUDGET_MS,
            "ms median",
            "budget",
        );
    }

    async fn latency_round(kind: Kind, location: &str, events: usize) -> f64 {
        let round = Round::new(kind, location, "latency");
        let median = with_queue!(round, |queue| {
            let (called, mut calls) = mpsc::unbounded_channel();
            let sink = tower::service_fn(move |_: Event| {
                let _ = called.send(tokio::time::Instant::now());
                std::future::ready(Ok::<(), eventsink::Error>(()))
            });
            let mut publisher = ThroughTaskQueue::new(queue).layer(sink);
            let worker = publisher.worker().spawn();
            let mut latencies = Vec::with_capacity(events);
            for n in 0..events {
                publisher.publish(event(n)).await.expect("publish");
                let returned = tokio::time::Instant::now();
                let at = calls.recv().await.expect("the sink was called");
                latencies.push(at.saturating_duration_since(returned).as_secs_f64() * 1000.0);
            }
            worker.shutdown().await;
            latencies.sort_by(f64::total_cmp);
            latencies[latencies.len() / 2]
        });
        round.cleanup().await;
        median
    }

    // ---------------------------------------------------------------- backlog

    fn backlog(options: &Options, kind: Kind) {
        let scenario = format!("queue_backlog_{}", kind.label());
        let Some(location) = kind.location(&scenario) else {
            return;
        };
        let (small, large) = (options.size(5_000, 20_000), options.size(50_000, 200_000));
        let rt = runtime();
        let baseline = rt.block_on(backlog_round(kind, &location, small));
        let ours = rt.block_on(backlog_round(kind, &location, large));
        for (events, drain) in [(small, &baseline), (large, &ours)] {
            println!(
                "{scenario}: {events} events queued in {:.1} s, drained in {:.1} s \
                 ({:.0} events/s); RSS {:.1} MiB before the drain, peak {:.1} MiB during it \
                 (VmRSS every 10 ms)",
                drain.fill_secs,
                drain.drain_secs,
                events as f64 / drain.drain_secs,
                drain.rss_before_mib,
                drain.rss_peak_mib,
            );
        }
        let (ours, baseline) = (ours.us_per_event(large), baseline.us_per_event(small));
        report(
            &scenario,
            ours,
            baseline,
            ours / baseline,
            "µs/event",
            &format!("the same drain of {small} events"),
        );
    }

    /// One backlog's fill and drain.
    struct Drain {
        fill_secs: f64,
        drain_secs: f64,
        rss_before_mib: f64,
        rss_peak_mib: f64,
    }

    impl Drain {
        fn us_per_event(&self, events: usize) -> f64 {
            self.drain_secs * 1e6 / events as f64
        }
    }

    /// Queues `events` with no worker running, then times a worker
    /// draining them to a `NoopSink`; checks that the queue is empty after.
    async fn backlog_round(kind: Kind, location: &str, events: usize) -> Drain {
        let round = Round::new(kind, location, "backlog");
        let drain = with_queue!(round, |queue| {
            let counter = Counter::new(events);
            let sink = {
                let counter = counter.clone();
                tower::ServiceBuilder::new()
                    .map_request(move |event: Event| {
                        counter.hit();
                        event
                    })
                    .service(NoopSink::new())
            };
            let publisher = ThroughTaskQueue::new(queue.clone()).layer(sink);
            let started = tokio::time::Instant::now();
            fill(&publisher, events).await;
            let fill_secs = started.elapsed().as_secs_f64();
            let queued = queue.stats().await.expect("stats");
            assert_eq!(
                queued.pending, events as u64,
                "the backlog before the drain"
            );

            let rss_before_mib = rss_mib();
            let sampler = RssSampler::start();
            let started = tokio::time::Instant::now();
            let worker = publisher.worker().spawn();
            counter.wait().await;
            let drain_secs = started.elapsed().as_secs_f64();
            let rss_peak_mib = sampler.stop();
            worker.shutdown().await;
            let left = queue.stats().await.expect("stats");
            assert_eq!(
                (left.pending, left.scheduled, left.running, left.dead),
                (0, 0, 0, 0),
                "the queue after the drain: {left:?}"
            );
            Drain {
                fill_secs,
                drain_secs,
                rss_before_mib,
                rss_peak_mib,
            }
        });
        round.cleanup().await;
        drain
    }

    /// Publishes `events` from [`DEFAULT_MAX_BATCH`] tasks, so that each
    /// group commit writes a full batch.
    async fn fill<S>(publisher: &S, events: usize)
    where
        S: tower::Service<Event> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Debug,
    {
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..DEFAULT_MAX_BATCH {
            let mut publisher = publisher.clone();
            tasks.spawn(async move {
                for n in (task..events).step_by(DEFAULT_MAX_BATCH) {
                    publisher.publish(event(n)).await.expect("publish");
                }
            });
        }
        tasks.join_all().await;
    }
}
