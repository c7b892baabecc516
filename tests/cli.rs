//! The `eventsink` admin CLI, run as a built binary against real queues:
//! dead letters seeded by a worker whose sink fails permanently, then
//! listed, shown, replayed and purged in table and JSON form; refusals
//! without `--yes` and bad input with their exit codes. SQLite always;
//! Postgres and Redis are ignored (with the reason) unless their URL was
//! set at build time (see `build.rs`).
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use eventsink::queue::{DeadLetters, QueueBackend, SqliteQueue, ThroughTaskQueue};
use eventsink::{Event, RecordingSink, SinkExt};
use serde_json::{Value, json};
use support::queue::unique_name;
use tower::Layer;

/// How long seeding waits for its dead letters.
const SEED_TIMEOUT: Duration = Duration::from_secs(20);

/// What a run of the binary gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", self.stdout))
    }
}

/// Runs `eventsink` with `args` and the environment `env` only (none of
/// the caller's `EVENTSINK_*` variables).
fn eventsink_env(args: &[impl AsRef<std::ffi::OsStr>], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventsink"));
    for var in [
        "EVENTSINK_SQLITE",
        "EVENTSINK_POSTGRES",
        "EVENTSINK_REDIS",
        "EVENTSINK_QUEUE",
    ] {
        command.env_remove(var);
    }
    let out = command.args(args).envs(env.iter().copied()).output();
    let out = out.expect("run the eventsink binary");
    Run {
        code: out.status.code().expect("an exit code"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    }
}

fn eventsink(args: &[impl AsRef<std::ffi::OsStr>]) -> Run {
    eventsink_env(args, &[])
}

/// Publishes `ids` (kind `test.cli`) and lets a worker whose sink fails
/// the next `failures` deliveries permanently run until that many dead
/// letters exist.
async fn seed<B: QueueBackend<Value>>(backend: &B, ids: &[&str], failures: usize) {
    let recorder = RecordingSink::new();
    recorder.fail_next_permanently(failures);
    let mut sink = ThroughTaskQueue::new(backend.clone()).layer(recorder.clone());
    let worker = sink
        .worker()
        .poll_interval(Duration::from_millis(10))
        .spawn();
    for (n, id) in ids.iter().enumerate() {
        let event = Event::with_id("test.cli", *id, json!({"n": n, "note": "café"}));
        sink.publish(event).await.expect("publish");
    }
    letters(backend)
        .wait_for(failures as u64, SEED_TIMEOUT)
        .await
        .expect("dead letters");
    worker.shutdown().await;
}

fn letters<B: QueueBackend<Value>>(backend: &B) -> DeadLetters<B, Value> {
    DeadLetters::new(backend.clone())
}

/// The whole tour on one backend, reached with `args` (backend and queue).
async fn tour<B: QueueBackend<Value>>(backend: B, args: &[&str]) {
    let queue = backend.name().to_owned();
    let with = |more: &[&str]| -> Vec<String> {
        args.iter().chain(more).map(|arg| arg.to_string()).collect()
    };
    let key = |id: &str| format!("{queue}:test.cli:{id}");
    seed(&backend, &["evt_1", "evt_2", "evt_3", "evt_4"], 4).await;

    let table = eventsink(&with(&["dead", "list"]));
    assert_eq!(table.code, 0, "{}", table.stderr);
    let header = table.stdout.lines().next().expect("a header");
    for column in ["KEY", "CAUSE", "ATTEMPTS", "FAILED AT", "LAST ERROR"] {
        assert!(header.contains(column), "{header:?} lacks {column}");
    }
    for id in ["evt_1", "evt_2", "evt_3", "evt_4"] {
        assert!(table.stdout.contains(&key(id)), "{}", table.stdout);
    }
    assert!(table.stdout.contains("permanent"), "{}", table.stdout);
    assert!(table.stdout.contains("4 of 4"), "{}", table.stdout);

    let all = eventsink(&with(&["dead", "list", "--json"])).json();
    assert_eq!(all["total"], 4);
    assert_eq!(all["letters"].as_array().expect("letters").len(), 4);
    let page = eventsink(&with(&[
        "--json", "dead", "list", "--limit", "2", "--offset", "3",
    ]))
    .json();
    assert_eq!(page["letters"].as_array().expect("letters").len(), 1);
    assert_eq!(page["letters"][0], all["letters"][3], "the same order");

    let shown = eventsink(&with(&["dead", "show", &key("evt_2")]));
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    for part in ["payload:", "café", "evt_2", "permanent"] {
        assert!(shown.stdout.contains(part), "{} lacks {part}", shown.stdout);
    }
    let shown = eventsink(&with(&["dead", "show", &key("evt_2"), "--json"])).json();
    assert_eq!(shown["key"], json!(key("evt_2")));
    assert_eq!(shown["event"]["payload"]["note"], "café");
    assert_eq!(shown["cause"], "permanent");

    let unknown = eventsink(&with(&["dead", "show", &key("nope")]));
    assert_eq!(unknown.code, 1, "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("no dead letter"),
        "{}",
        unknown.stderr
    );
    assert!(unknown.stderr.contains("dead list"), "{}", unknown.stderr);

    for refused in [&["dead", "purge"][..], &["dead", "replay", "--all"][..]] {
        let run = eventsink(&with(refused));
        assert_eq!(run.code, 2, "{refused:?} without --yes: {}", run.stderr);
        assert!(run.stderr.contains("--yes"), "{}", run.stderr);
        assert!(run.stderr.contains("4 dead letter"), "{}", run.stderr);
        assert_eq!(letters(&backend).count().await.expect("count"), 4, "kept");
    }

    let stats = eventsink(&with(&["stats", "--json"])).json();
    assert_eq!(
        stats,
        json!({"queue": queue, "pending": 0, "scheduled": 0, "running": 0, "dead": 4, "oldest_due": null})
    );
    let table = eventsink(&with(&["stats"]));
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.contains("dead        4\n"), "{}", table.stdout);

    let replayed = eventsink(&with(&["dead", "replay", &key("evt_1")]));
    assert_eq!(replayed.code, 0, "{}", replayed.stderr);
    assert!(replayed.stdout.contains("replayed"), "{}", replayed.stdout);
    assert_eq!(letters(&backend).count().await.expect("count"), 3);
    assert_eq!(
        backend.stats().await.expect("stats").pending,
        1,
        "back in the queue"
    );
    let again = eventsink(&with(&["dead", "replay", &key("evt_1")]));
    assert_eq!(again.code, 1, "replayed already: {}", again.stderr);

    let all = eventsink(&with(&["dead", "replay", "--all", "--yes", "--json"])).json();
    assert_eq!(all, json!({"queue": queue, "replayed": 3}));
    assert_eq!(letters(&backend).count().await.expect("count"), 0);
    assert_eq!(backend.stats().await.expect("stats").pending, 4);

    // The four replayed jobs and two new events meet a sink that fails
    // twice: two dead letters to purge.
    seed(&backend, &["evt_5", "evt_6"], 2).await;
    let purged = eventsink(&with(&["dead", "purge", "--yes", "--json"])).json();
    assert_eq!(purged, json!({"queue": queue, "purged": 2}));
    assert_eq!(letters(&backend).count().await.expect("count"), 0);
    let empty = eventsink(&with(&["dead", "list"]));
    assert_eq!(empty.code, 0, "{}", empty.stderr);
    assert!(empty.stdout.contains("no dead letters"), "{}", empty.stdout);
}

async fn sqlite_queue(dir: &Path) -> (SqliteQueue, String) {
    let path = dir.join("queue.db");
    let queue = SqliteQueue::open(&path, &unique_name("cli"))
        .await
        .expect("open");
    (queue, path.to_str().expect("UTF-8 path").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_tour() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (queue, path) = sqlite_queue(tmp.path()).await;
    let name = queue.name().to_owned();
    tour(queue, &["--sqlite", &path, "--queue", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_and_queue_may_come_from_the_environment() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (queue, path) = sqlite_queue(tmp.path()).await;
    seed(&queue, &["evt_1"], 1).await;
    let env = [
        ("EVENTSINK_SQLITE", path.as_str()),
        ("EVENTSINK_QUEUE", queue.name()),
    ];
    let stats = eventsink_env(&["stats", "--json"], &env).json();
    assert_eq!(stats["dead"], 1);
    let two = eventsink_env(&["--redis", "redis://127.0.0.1/", "stats"], &env);
    assert_eq!(two.code, 1, "{}", two.stderr);
    assert!(two.stderr.contains("several backends"), "{}", two.stderr);
}

#[test]
fn a_missing_sqlite_file_is_an_error_and_is_not_created() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("typo.db");
    let run = eventsink(&["--sqlite", path.to_str().unwrap(), "--queue", "q", "stats"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);
    assert!(run.stderr.contains("check the path"), "{}", run.stderr);
    assert!(!path.exists(), "the CLI created {path:?}");
}

#[tokio::test]
async fn a_sqlite_file_without_a_queue_is_an_error_and_is_left_alone() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("other.db");
    std::fs::write(&path, b"").expect("an empty file");
    let run = eventsink(&["--sqlite", path.to_str().unwrap(), "--queue", "q", "stats"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("holds no queue"), "{}", run.stderr);
    assert_eq!(
        std::fs::read(&path).expect("read").len(),
        0,
        "the file changed"
    );
}

#[test]
fn bad_arguments_say_what_to_do_and_exit_1() {
    let cases: [(&[&str], &str); 5] = [
        (&["--queue", "q", "stats"], "no backend given"),
        (
            &[
                "--sqlite",
                "a.db",
                "--redis",
                "redis://127.0.0.1/",
                "--queue",
                "q",
                "stats",
            ],
            "several backends given: --sqlite and --redis",
        ),
        (&["--sqlite", "a.db", "stats"], "no queue given"),
        (
            &["--sqlite", "a.db", "--queue", "q", "dead", "replay"],
            "--all --yes",
        ),
        (
            &["--sqlite", "a.db", "--queue", "q", "dead", "frobnicate"],
            "unrecognized",
        ),
    ];
    for (args, message) in cases {
        let run = eventsink(args);
        assert_eq!(run.code, 1, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
    assert_eq!(eventsink(&["--help"]).code, 0);
}

#[cfg(feature = "redis")]
#[test]
fn passwords_in_urls_are_never_printed() {
    let run = eventsink(&[
        "--redis",
        "redis://:hunter22@127.0.0.1:1/",
        "--queue",
        "q",
        "stats",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(!run.stderr.contains("hunter22"), "{}", run.stderr);
    assert!(
        run.stderr.contains("redis://:***@127.0.0.1:1/"),
        "{}",
        run.stderr
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_tour() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let name = unique_name("cli-pg");
    let queue = eventsink::queue::PostgresQueue::connect(&url, &name)
        .await
        .expect("connect to Postgres");
    tour(queue, &["--postgres", &url, "--queue", &name]).await;
    support::queue::delete_postgres_rows(&url, &[name]).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_tour() {
    let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
    let name = unique_name("cli-redis");
    let queue = eventsink::queue::RedisQueue::connect(&url, &name)
        .await
        .expect("connect to Redis");
    tour(queue, &["--redis", &url, "--queue", &name]).await;
    support::queue::delete_redis_keys(&url, &[name]).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn a_postgres_database_without_a_queue_is_an_error_and_is_not_migrated() {
    use sqlx::Connection as _;
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let database = unique_name("cli_empty").replace('-', "_");
    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await
        .expect("create an empty database");
    let (server, _) = url
        .rsplit_once('/')
        .expect("a Postgres URL ends in /DATABASE");
    let empty = format!("{server}/{database}");

    let run = eventsink(&["--postgres", &empty, "--queue", "q", "stats"]);
    let mut conn = sqlx::PgConnection::connect(&empty).await.expect("connect");
    let schema: Option<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname = 'apalis'")
            .fetch_optional(&mut conn)
            .await
            .expect("look for the apalis schema");
    conn.close().await.expect("close");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop the database");

    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("holds no queue"), "{}", run.stderr);
    assert_eq!(
        schema, None,
        "the CLI migrated the database it only inspects"
    );
}
