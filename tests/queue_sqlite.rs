//! ThroughTaskQueue on SQLite: the shared queue tests against real files,
//! and the settings the backend promises.
#![cfg(feature = "sqlite")]
mod support;

use eventsink::queue::{SqliteQueue, ThroughTaskQueue};
use eventsink::{Event, NoopSink, SinkExt};
use serde_json::json;
use support::queue::{Backends, Payload, unique_name};
use tempfile::TempDir;
use tower::Layer;

struct Sqlite(TempDir);

impl Backends for Sqlite {
    type B<P: Payload> = SqliteQueue<P>;

    async fn make<P: Payload>(&self) -> SqliteQueue<P> {
        let name = unique_name("sqlite");
        let path = self.0.path().join(format!("{name}.db"));
        SqliteQueue::open(path, &name)
            .await
            .expect("open sqlite queue")
    }
}

fn sqlite() -> Sqlite {
    Sqlite(tempfile::tempdir().expect("temp dir"))
}

queue_tests!(sqlite());

#[tokio::test]
async fn opens_with_wal_and_normal_sync_and_can_choose_full() {
    let tmp = tempfile::tempdir().unwrap();
    let queue: SqliteQueue = SqliteQueue::open(tmp.path().join("a.db"), "a")
        .await
        .unwrap();
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(queue.pool())
        .await
        .unwrap();
    assert_eq!(mode.to_lowercase(), "wal");
    // Every pooled connection, not just one: 1 = NORMAL, 2 = FULL.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(queue.pool().acquire().await.unwrap());
    }
    for conn in &mut conns {
        let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(sync, 1);
    }
    drop(conns);
    let full: SqliteQueue = SqliteQueue::builder("b")
        .synchronous_full(true)
        .open(tmp.path().join("b.db"))
        .await
        .unwrap();
    let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
        .fetch_one(full.pool())
        .await
        .unwrap();
    assert_eq!(sync, 2);
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let err = SqliteQueue::<serde_json::Value>::open(file.join("q.db"), "q")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("opening the SQLite file"), "{text}");
}

/// A payload whose `Serialize` fails when asked to.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
struct Fragile {
    n: u32,
    broken: bool,
}

impl serde::Serialize for Fragile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeStruct};
        if self.broken {
            return Err(S::Error::custom("this payload refuses to be serialised"));
        }
        let mut st = s.serialize_struct("Fragile", 2)?;
        st.serialize_field("n", &self.n)?;
        st.serialize_field("broken", &self.broken)?;
        st.end()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_payload_fails_only_its_own_publish_in_a_batch() {
    use eventsink::queue::ThroughTaskQueue;
    use eventsink::{Event, RecordingSink, Retryable, SinkExt};
    use tower::Layer;
    let tmp = tempfile::tempdir().unwrap();
    let queue: SqliteQueue<Fragile> = SqliteQueue::open(tmp.path().join("q.db"), "fragile")
        .await
        .unwrap();
    let recorder = RecordingSink::new();
    let sink = ThroughTaskQueue::new(queue).layer(recorder.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..32 {
        let mut sink = sink.clone();
        let event = Event::new("test.fragile", Fragile { n, broken: n == 5 });
        tasks.spawn(async move { (n, sink.publish(event).await) });
    }
    let mut failed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (n, result) = done.unwrap();
        if let Err(e) = result {
            let boxed: eventsink::BoxError = e.into();
            assert!(!boxed.is_retryable(), "{boxed}");
            // The payload's own message is in the error's source chain.
            let mut chain =
                std::iter::successors(Some(&*boxed as &dyn std::error::Error), |e| e.source());
            assert!(chain.any(|e| e.to_string().contains("refuses")), "{boxed}");
            failed.push(n);
        }
    }
    assert_eq!(failed, vec![5], "only the broken event fails");
    let worker = sink.worker().spawn();
    let got = recorder
        .wait_for(31, support::conformance::ARRIVAL_TIMEOUT)
        .await
        .expect("the others are delivered");
    worker.shutdown().await;
    assert!(got.iter().all(|e| !e.payload.broken));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_restarts_the_worker_instead_of_ending_it() {
    use eventsink::queue::ThroughTaskQueue;
    use eventsink::{Event, RecordingSink, SinkExt};
    use sqlx::Connection;
    use std::time::Duration;
    use tower::Layer;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("locked.db");
    let queue: SqliteQueue = SqliteQueue::builder("locked")
        .busy_timeout(Duration::from_millis(50))
        .open(&path)
        .await
        .unwrap();
    let recorder = RecordingSink::new();
    let mut sink = ThroughTaskQueue::new(queue).layer(recorder.clone());
    sink.publish(Event::new("test.locked", serde_json::json!(1)))
        .await
        .unwrap();
    // Another connection holds the write lock: the worker's first writes
    // fail with "database is locked" after the 50 ms busy timeout.
    let mut locker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    let worker = sink
        .worker()
        .poll_interval(Duration::from_millis(10))
        .spawn();
    // Signal: the handle's restart count (polled; there is no event for it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while worker.restarts() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never restarted"
        );
        assert!(
            !worker.is_finished(),
            "the worker ended instead of restarting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    recorder
        .wait_for(1, support::conformance::ARRIVAL_TIMEOUT)
        .await
        .expect("delivered once the lock is gone");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_job_published_now_is_due_now() {
    let tmp = tempfile::tempdir().unwrap();
    let queue: SqliteQueue = SqliteQueue::open(tmp.path().join("due.db"), "due")
        .await
        .unwrap();
    let mut sink = ThroughTaskQueue::new(queue.clone()).layer(NoopSink::new());
    sink.publish(Event::new("due.now", json!(1))).await.unwrap();
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (run_at,): (i64,) = sqlx::query_as("SELECT run_at FROM Jobs")
        .fetch_one(queue.pool())
        .await
        .unwrap();
    // Stored in whole seconds: due in the second it was published, not the
    // next one (a fetch before then would skip it).
    assert!(
        u64::try_from(run_at).unwrap() <= after,
        "run_at {run_at} is after {after}"
    );
}

/// The plans SQLite picks for apalis' statements that lock and acknowledge
/// jobs by id (the shapes of apalis-sqlite 1.0's `lock.sql` and `ack.sql`):
/// through the primary key, on every pooled connection. Without planner
/// statistics SQLite scans all pending jobs, or all jobs the worker ever
/// ran, for each one, and a backlog drains in quadratic time.
#[tokio::test]
async fn jobs_are_locked_and_acknowledged_through_the_primary_key() {
    let tmp = tempfile::tempdir().unwrap();
    let queue: SqliteQueue = SqliteQueue::open(tmp.path().join("plan.db"), "plan")
        .await
        .unwrap();
    let lock = "EXPLAIN QUERY PLAN UPDATE Jobs SET status = 'Running', lock_by = ?2 \
        WHERE id IN (SELECT value FROM json_each(?1)) AND (status = 'Queued' \
        OR status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))";
    let ack = "EXPLAIN QUERY PLAN WITH j AS (SELECT value ->> 'task_id' AS task_id, \
        value ->> 'status' AS status FROM json_each(?1)) UPDATE Jobs SET status = j.status \
        FROM j WHERE Jobs.id = j.task_id AND Jobs.lock_by = ?2";
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(queue.pool().acquire().await.unwrap());
    }
    for conn in &mut conns {
        for statement in [lock, ack] {
            let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(statement)
                .bind("[]")
                .bind("worker")
                .fetch_all(&mut **conn)
                .await
                .unwrap();
            let plan: Vec<_> = plan.into_iter().map(|row| row.3).collect();
            assert!(
                plan.iter()
                    .any(|step| step.contains("sqlite_autoindex_Jobs_1 (id=?)")),
                "{statement}\nplan: {plan:#?}"
            );
        }
    }
}

/// A file whose dead-letter table has the first layout (one letter per
/// event id) opens: its letters are kept, keyed like jobs, and replay.
#[tokio::test]
async fn dead_letters_of_the_first_layout_are_kept_when_the_file_opens() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("old.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let old = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE eventsink_dead_letters (queue TEXT NOT NULL, event_id TEXT NOT NULL, \
         failed_at INTEGER NOT NULL, letter TEXT NOT NULL, PRIMARY KEY (queue, event_id))",
    )
    .execute(&old)
    .await
    .unwrap();
    let letter = json!({
        "event": {"kind": "order.placed", "id": "evt_1", "created_at": "2026-11-27T12:00:00Z",
                  "payload": {"order_id": 7}},
        "attempts": 3,
        "last_error": "503",
        "cause": "out_of_attempts",
        "failed_at": "2026-11-28T12:00:00Z",
        "key": "old:order.placed:evt_1~replay-0194",
    });
    sqlx::query("INSERT INTO eventsink_dead_letters VALUES ('old', 'evt_1', 1795867200000000, ?)")
        .bind(letter.to_string())
        .execute(&old)
        .await
        .unwrap();
    old.close().await;

    let queue: SqliteQueue = SqliteQueue::open(&path, "old").await.expect("open");
    let dead = queue.dead_letters();
    assert_eq!(dead.count().await.unwrap(), 1, "the old letter is kept");
    let kept = dead
        .get("old:order.placed:evt_1")
        .await
        .unwrap()
        .expect("keyed {queue}:{kind}:{id}");
    assert_eq!(
        (kept.attempts, kept.key.as_str()),
        (3, "old:order.placed:evt_1")
    );
    let recorder = eventsink::RecordingSink::new();
    let worker = ThroughTaskQueue::new(queue.clone())
        .layer(recorder.clone())
        .worker()
        .poll_interval(std::time::Duration::from_millis(10))
        .spawn();
    assert!(dead.replay(&kept.key).await.unwrap());
    let got = recorder
        .wait_for(1, support::conformance::ARRIVAL_TIMEOUT)
        .await
        .expect("the replayed old letter is delivered");
    worker.shutdown().await;
    assert_eq!(&*got[0].id, "evt_1");
    assert_eq!(dead.count().await.unwrap(), 0);
}

/// The publisher keeps one of the pool's 4 connections between batches
/// (a connection given back to sqlx's pool costs a round trip to its
/// thread), and gives it back once nobody has published for a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_keeps_one_connection_only_while_busy() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("kept");
    let queue: SqliteQueue = SqliteQueue::open(tmp.path().join("q.db"), &name)
        .await
        .expect("open");
    let pool = queue.pool().clone();
    let size = usize::try_from(pool.size()).expect("pool size");
    let mut publisher = ThroughTaskQueue::new(queue).layer(NoopSink::new());
    for n in 0..3 {
        publisher
            .publish(Event::new("test.kept", json!(n)))
            .await
            .expect("publish");
        support::queue::until_idle(&pool, size - 1).await;
    }
    support::queue::until_idle(&pool, size).await;
}
