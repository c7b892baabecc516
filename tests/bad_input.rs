//! The bad-input table: every input a user can get wrong, one row each,
//! with the exact error it gets, whether retrying can help, and the words
//! the message must hold (what was wrong, and what to do). Nothing panics,
//! nothing is dropped silently.

mod support;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use eventsink::signature::{Secret, SecretError};
use eventsink::webhook::{BuildError, WebhookSink};
use eventsink::{Error, Event, FsSink, Retryable, SinkExt};
use support::receiver::Receiver;

/// An error's message and every cause below it, one string.
fn chain(err: &(dyn StdError + 'static)) -> String {
    std::iter::successors(Some(err), |&e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Fails unless `text` holds every one of `words`.
fn assert_says(row: &str, text: &str, words: &[&str]) {
    for word in words {
        assert!(text.contains(word), "{row}: {text:?} does not say {word:?}");
    }
}

/// A payload serde_json cannot write: a map whose keys are not strings.
fn tuple_keyed() -> HashMap<(u8, u8), u32> {
    HashMap::from([((1, 2), 3)])
}

// ---------------------------------------------------------------- webhook

#[test]
fn bad_webhook_urls_are_refused_when_building() {
    type Check = fn(&BuildError) -> bool;
    let rows: Vec<(&str, &str, Check, &[&str])> = vec![
        (
            "not a URL",
            "not a url",
            |e| matches!(e, BuildError::InvalidUrl { .. }),
            &["not valid", "http:// or https://"],
        ),
        (
            "empty",
            "",
            |e| matches!(e, BuildError::InvalidUrl { .. }),
            &["not valid", "http:// or https://"],
        ),
        (
            "no host",
            "http://",
            |e| matches!(e, BuildError::InvalidUrl { .. }),
            &["not valid", "http:// or https://"],
        ),
        (
            "ftp",
            "ftp://example.com/hook",
            |e| matches!(e, BuildError::UnsupportedScheme { scheme } if scheme == "ftp"),
            &["ftp://", "http:// or https://"],
        ),
        (
            "mailto",
            "mailto:ops@example.com",
            |e| matches!(e, BuildError::UnsupportedScheme { .. }),
            &["mailto://", "http:// or https://"],
        ),
        (
            "file",
            "file:///etc/passwd",
            |e| matches!(e, BuildError::UnsupportedScheme { .. }),
            &["file://", "http:// or https://"],
        ),
    ];
    for (row, url, check, words) in rows {
        let err = WebhookSink::builder(url).build().expect_err(row);
        assert!(check(&err), "{row}: {err:?}");
        assert_says(row, &err.to_string(), words);
    }
}

#[tokio::test]
async fn an_unresolvable_host_is_a_transient_transport_error() {
    let mut sink = WebhookSink::builder("http://no-such-receiver.invalid/hook")
        .attempt_timeout(Duration::from_secs(10))
        .build()
        .expect("a well-formed URL builds");
    let err = sink
        .publish(Event::new("order.placed", 1))
        .await
        .expect_err("a name under .invalid never resolves");
    support::assert_transient_transport(&err, false);
    assert_says(
        "unresolvable host",
        &err.to_string(),
        &[
            "no-such-receiver.invalid",
            "could not be reached",
            "check the URL",
        ],
    );
}

#[test]
fn bad_secrets_are_refused_without_showing_them() {
    /// The row, what was parsed, the error expected, the words it says.
    type Row = (
        &'static str,
        Result<Secret, SecretError>,
        SecretError,
        &'static [&'static str],
    );
    let rows: Vec<Row> = vec![
        (
            "not base64",
            Secret::from_whsec("whsec_%%%not-base64%%%"),
            SecretError::NotBase64,
            &["not `whsec_` followed by standard base64", "copy it again"],
        ),
        (
            "too short",
            Secret::from_whsec("whsec_dG9vIHNob3J0"),
            SecretError::Length(9),
            &["9 bytes", "24 to 64", "Secret::generate"],
        ),
        (
            "too long",
            Secret::from_whsec(&format!("whsec_{}", "QUFB".repeat(22))),
            SecretError::Length(66),
            &["66 bytes", "24 to 64"],
        ),
        (
            "empty whsec",
            Secret::from_whsec(""),
            SecretError::Empty,
            &["empty", "configure a secret"],
        ),
        (
            "prefix only",
            Secret::from_whsec("whsec_"),
            SecretError::Empty,
            &["empty", "configure a secret"],
        ),
        (
            "empty raw",
            Secret::from_raw(""),
            SecretError::Empty,
            &["empty", "configure a secret"],
        ),
    ];
    for (row, parsed, expected, words) in rows {
        let err = parsed.expect_err(row);
        assert_eq!(err, expected, "{row}");
        let text = err.to_string();
        assert_says(row, &text, words);
        assert!(
            !text.contains("%%%") && !text.contains("dG9v"),
            "{row}: {text}"
        );
    }
}

#[tokio::test]
async fn a_payload_that_cannot_be_serialised_is_a_permanent_serialize_error() {
    let tmp = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let mut webhook = WebhookSink::builder(receiver.url("/hook")).build().unwrap();
    let mut fs = FsSink::new(tmp.path()).unwrap();
    let errors = [
        (
            "webhook",
            webhook.publish(Event::new("k", tuple_keyed())).await,
        ),
        ("fs", fs.publish(Event::new("k", tuple_keyed())).await),
    ];
    for (row, result) in errors {
        let err = result.expect_err(row);
        assert!(matches!(err, Error::Serialize(_)), "{row}: {err:?}");
        assert!(!err.is_retryable(), "{row}");
        assert_says(
            row,
            &chain(&err),
            &["serialised to JSON", "Serialize", "key must be a string"],
        );
    }
    assert!(receiver.requests().is_empty(), "nothing was sent");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing was written"
    );
}

#[tokio::test]
async fn a_payload_over_the_size_limit_is_refused_before_sending() {
    let receiver = Receiver::start().await;
    let mut sink = WebhookSink::builder(receiver.url("/hook"))
        .max_body_bytes(1024)
        .build()
        .unwrap();
    let err = sink
        .publish(Event::new("k", "x".repeat(2000)))
        .await
        .expect_err("over the limit");
    assert!(
        matches!(err, Error::TooLarge { limit: 1024, size } if size > 2000),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert_says(
        "too large",
        &err.to_string(),
        &["1024 bytes", "smaller payload", "raise the limit"],
    );
    assert!(receiver.requests().is_empty(), "nothing was sent");
}

// -------------------------------------------------------- kinds and ids

/// What a sink does with a kind or id: delivers it, or refuses it naming
/// the field and the problem.
enum Expect {
    Delivered,
    Refused(&'static str, &'static str),
}

/// The kinds and ids of the table, for `sink`: `(row, kind, id, expected)`.
fn names(sink: &str) -> Vec<(String, String, String, Expect)> {
    use Expect::{Delivered, Refused};
    let long = "x".repeat(300);
    let fs = sink == "fs";
    let rows = [
        (
            "slash in id",
            "k",
            "a/b",
            if fs {
                Refused("id", "path separator")
            } else {
                Delivered
            },
        ),
        (
            "slash in kind",
            "a/b",
            "1",
            if fs {
                Refused("kind", "path separator")
            } else {
                Delivered
            },
        ),
        ("dot-dot id", "k", "..", Delivered),
        ("dot-dot kind", "..", "1", Delivered),
        (
            "dot-dot path id",
            "k",
            "../../etc/passwd",
            if fs {
                Refused("id", "path separator")
            } else {
                Delivered
            },
        ),
        (
            "NUL in id",
            "k",
            "a\0b",
            Refused(
                "id",
                if fs {
                    "control character"
                } else {
                    "not visible ASCII"
                },
            ),
        ),
        (
            "NUL in kind",
            "a\0b",
            "1",
            Refused("kind", "control character"),
        ),
        (
            "300-byte id",
            "k",
            &long,
            Refused(
                "id",
                if fs {
                    "longer than 100 bytes"
                } else {
                    "longer than 256 bytes"
                },
            ),
        ),
        (
            "300-byte kind",
            &long,
            "1",
            Refused(
                "kind",
                if fs {
                    "longer than 100 bytes"
                } else {
                    "longer than 256 bytes"
                },
            ),
        ),
    ];
    rows.into_iter()
        .map(|(row, kind, id, expect)| {
            (
                format!("{sink}: {row}"),
                kind.to_owned(),
                id.to_owned(),
                expect,
            )
        })
        .collect()
}

/// Checks one row's outcome: delivered, or the exact refusal.
fn check_name_row(row: &str, result: Result<(), Error>, expect: &Expect) {
    match (expect, result) {
        (Expect::Delivered, Ok(())) => {}
        (Expect::Refused(field, problem), Err(err)) => {
            assert!(
                matches!(&err, Error::InvalidEvent { field: f, problem: p, .. } if f == field && p.contains(problem)),
                "{row}: {err:?}"
            );
            assert!(!err.is_retryable(), "{row}");
            assert_says(
                row,
                &err.to_string(),
                &[field, problem, "cannot be delivered", "publish it with"],
            );
        }
        (_, result) => panic!("{row}: unexpected {result:?}"),
    }
}

#[tokio::test]
async fn fs_sink_refuses_names_that_escape_or_break_file_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("events");
    let mut sink = FsSink::new(&dir).unwrap();
    for (row, kind, id, expect) in names("fs") {
        let result = sink
            .publish(Event::with_id(kind.as_str(), id.as_str(), 1))
            .await;
        check_name_row(&row, result, &expect);
    }
    // Whatever was delivered stayed inside the directory.
    let outside: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["events"]);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "the two delivered rows"
    );
}

#[tokio::test]
async fn webhook_sink_refuses_names_the_receiver_would_refuse() {
    let receiver = Receiver::start().await;
    let mut sink = WebhookSink::builder(receiver.url("/hook")).build().unwrap();
    let mut delivered = Vec::new();
    for (row, kind, id, expect) in names("webhook") {
        let result = sink
            .publish(Event::with_id(kind.as_str(), id.as_str(), 1))
            .await;
        if matches!(expect, Expect::Delivered) {
            delivered.push(id.clone());
        }
        check_name_row(&row, result, &expect);
    }
    let got: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(
        got, delivered,
        "exactly the delivered rows arrived, ids unchanged"
    );
}

// ------------------------------------------------------ FsSink's target

/// Makes `path` unwritable even for root: `chmod 000` binds other users;
/// root ignores permissions, so there the directory is made immutable
/// (`chattr +i`, which binds root too). Undone on drop.
struct Unwritable(PathBuf);

impl Unwritable {
    fn new(path: &Path) -> Option<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o000)).unwrap();
        let probe = path.join(".probe");
        if std::fs::write(&probe, b"").is_err() {
            return Some(Unwritable(path.to_owned()));
        }
        // Root: permissions do not bite.
        std::fs::remove_file(&probe).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let immutable = Command::new("chattr").arg("+i").arg(path).status();
        immutable
            .is_ok_and(|s| s.success())
            .then(|| Unwritable(path.to_owned()))
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
    }
}

#[tokio::test]
async fn fs_sink_targets_that_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();

    // Refused when building: the target is a file, or under one.
    for (row, target) in [
        ("a file", file.clone()),
        ("under a file", file.join("events")),
    ] {
        let err = FsSink::new(&target).expect_err(row);
        assert!(
            matches!(&err, Error::Io { path, .. } if *path == target),
            "{row}: {err:?}"
        );
        assert_says(
            row,
            &chain(&err),
            &["is a file, not a directory", &target.display().to_string()],
        );
    }

    // Refused when publishing: the directory went away, became a file, or
    // cannot be written. Transient: fixing the directory fixes delivery.
    let gone = tmp.path().join("gone");
    let mut gone_sink = FsSink::new(&gone).unwrap();
    std::fs::remove_dir(&gone).unwrap();
    let replaced = tmp.path().join("replaced");
    let mut replaced_sink = FsSink::new(&replaced).unwrap();
    std::fs::remove_dir(&replaced).unwrap();
    std::fs::write(&replaced, b"").unwrap();
    let locked = tmp.path().join("locked");
    let mut locked_sink = FsSink::new(&locked).unwrap();
    let guard =
        Unwritable::new(&locked).expect("chmod, or chattr as root, makes a directory unwritable");
    let rows = [
        (
            "directory removed",
            gone_sink.publish(Event::new("k", 1)).await,
            "No such file or directory",
        ),
        (
            "directory became a file",
            replaced_sink.publish(Event::new("k", 1)).await,
            "Not a directory",
        ),
        (
            "unwritable directory",
            locked_sink.publish(Event::new("k", 1)).await,
            if is_root() {
                "Operation not permitted"
            } else {
                "Permission denied"
            },
        ),
    ];
    drop(guard);
    for (row, result, cause) in rows {
        let err = result.expect_err(row);
        assert!(matches!(err, Error::Io { .. }), "{row}: {err:?}");
        assert!(err.is_retryable(), "{row}");
        assert_says(
            row,
            &chain(&err),
            &[
                "file operation on",
                "failed",
                "check that the directory exists",
                cause,
            ],
        );
    }
}

/// Whether the tests run as root (who ignores file permissions).
fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// The environment variable that makes [`full_disk_child`] act.
const FULL_DISK_DIR: &str = "EVENTSINK_BAD_INPUT_FULL_DISK_DIR";

#[test]
fn a_full_disk_is_a_transient_io_error() {
    // A file-size limit (RLIMIT_FSIZE, `ulimit -f`) stands for a full disk;
    // SIGXFSZ is ignored so the write fails with EFBIG instead of killing
    // the process. Both are inherited by the test binary run as a child.
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 8 && trap '' XFSZ && exec \"$0\" --exact full_disk_child --nocapture")
        .arg(&exe)
        .env(FULL_DISK_DIR, tmp.path())
        .output()
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("FULL-DISK-CHECKED"),
        "the child did not run the check: {stdout}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "a failed write leaves no file: {leftovers:?}"
    );
}

/// Runs only as the child of [`a_full_disk_is_a_transient_io_error`].
#[tokio::test]
async fn full_disk_child() {
    let Some(dir) = std::env::var_os(FULL_DISK_DIR) else {
        return;
    };
    let mut sink = FsSink::new(PathBuf::from(dir)).unwrap();
    let err = sink
        .publish(Event::new("k", "x".repeat(64 * 1024)))
        .await
        .expect_err("64 KiB over a 4 KiB file-size limit");
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::FileTooLarge),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_says(
        "full disk",
        &chain(&err),
        &["has free space", "File too large"],
    );
    println!("FULL-DISK-CHECKED");
}

// ------------------------------------------------------------- the queue

#[cfg(feature = "sqlite")]
mod queue {
    use super::*;
    use eventsink::RecordingSink;
    use eventsink::queue::{DeathCause, QueueBackend, QueueError, SqliteQueue, ThroughTaskQueue};
    use serde::{Deserialize, Serialize};
    use tower::Layer;

    const WAIT: Duration = Duration::from_secs(20);

    /// Opens (creating) the queue `q` in `path`.
    async fn open<P>(path: &Path) -> Result<SqliteQueue<P>, QueueError>
    where
        P: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        SqliteQueue::builder("q").open(path).await
    }

    #[tokio::test]
    async fn queue_files_that_cannot_be_used_are_refused_with_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("typo.db");
        let garbage = tmp.path().join("notes.db");
        std::fs::write(&garbage, "these are my notes, not a database\n".repeat(200)).unwrap();
        let readonly = tmp.path().join("ro").join("q.db");
        std::fs::create_dir(readonly.parent().unwrap()).unwrap();
        drop(open::<serde_json::Value>(&readonly).await.unwrap());
        let guard =
            ReadOnly::new(&readonly).expect("chmod, or chattr as root, makes a file read-only");

        type Check = fn(&QueueError) -> bool;
        /// The row, what opening answered, the check, the words it says.
        type Row = (
            &'static str,
            Result<SqliteQueue, QueueError>,
            Check,
            Vec<String>,
        );
        let rows: Vec<Row> = vec![
            (
                "missing file",
                SqliteQueue::builder("q")
                    .create_if_missing(false)
                    .open(&missing)
                    .await,
                |e| matches!(e, QueueError::Missing { .. }),
                vec![
                    format!("{missing:?}"),
                    "does not exist".into(),
                    "check the path".into(),
                ],
            ),
            (
                "not a database",
                open(&garbage).await,
                |e| matches!(e, QueueError::Misconfigured { .. }),
                vec![
                    "not a SQLite database".into(),
                    "retrying cannot help".into(),
                ],
            ),
            (
                "not a database, open only",
                SqliteQueue::builder("q")
                    .create_if_missing(false)
                    .open(&garbage)
                    .await,
                |e| matches!(e, QueueError::Misconfigured { .. }),
                vec!["not a SQLite database".into()],
            ),
            (
                "read-only file",
                open(&readonly).await,
                |e| matches!(e, QueueError::Misconfigured { .. }),
                vec!["read-only".into(), "retrying cannot help".into()],
            ),
        ];
        drop(guard);
        for (row, opened, check, words) in rows {
            let err = opened.expect_err(row);
            assert!(check(&err), "{row}: {err:?}");
            assert!(!err.is_retryable(), "{row}");
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            assert_says(row, &chain(&err), &words);
        }
        assert!(!missing.exists(), "nothing was created");
        let notes = std::fs::read_to_string(&garbage).unwrap();
        assert!(
            notes.starts_with("these are my notes"),
            "the file was left alone"
        );
    }

    /// Makes a file read-only even for root (`chattr +i` there); undone on
    /// drop.
    struct ReadOnly(PathBuf);

    impl ReadOnly {
        fn new(path: &Path) -> Option<Self> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
            if !is_root() {
                return Some(ReadOnly(path.to_owned()));
            }
            let immutable = Command::new("chattr").arg("+i").arg(path).status();
            immutable
                .is_ok_and(|s| s.success())
                .then(|| ReadOnly(path.to_owned()))
        }
    }

    impl Drop for ReadOnly {
        fn drop(&mut self) {
            use std::os::unix::fs::PermissionsExt;
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o644));
        }
    }

    #[tokio::test]
    async fn a_payload_that_cannot_be_serialised_is_refused_at_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let backend: SqliteQueue<HashMap<(u8, u8), u32>> =
            open(&tmp.path().join("q.db")).await.unwrap();
        let mut publisher = ThroughTaskQueue::new(backend.clone())
            .layer(RecordingSink::<HashMap<(u8, u8), u32>>::new());
        let err = publisher
            .publish(Event::new("k", tuple_keyed()))
            .await
            .expect_err("tuple keys");
        assert!(
            matches!(
                &err,
                QueueError::Encode {
                    source: Error::Serialize(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert_says(
            "queue serialise",
            &chain(&err),
            &["cannot be stored as a job", "key must be a string"],
        );
        assert_eq!(backend.stats().await.unwrap().pending, 0);
    }

    #[tokio::test]
    async fn publishing_after_the_worker_stopped_is_stored_for_the_next_worker() {
        let tmp = tempfile::tempdir().unwrap();
        let queue = ThroughTaskQueue::new(open(&tmp.path().join("q.db")).await.unwrap());
        let sink = RecordingSink::new();
        let mut publisher = queue.layer(sink.clone());
        queue.worker(sink.clone()).spawn().shutdown().await;
        publisher
            .publish(Event::with_id("k", "after-stop", serde_json::json!(1)))
            .await
            .unwrap();
        let worker = queue.worker(sink.clone()).spawn();
        sink.wait_for(1, WAIT).await.unwrap();
        worker.shutdown().await;
        assert_eq!(&*sink.events()[0].id, "after-stop");
    }

    #[test]
    fn publishing_after_the_queues_runtime_ended_still_stores() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q.db");
        let sink = RecordingSink::new();
        let first = tokio::runtime::Runtime::new().unwrap();
        let mut publisher = first.block_on(async {
            let queue = ThroughTaskQueue::new(open(&path).await.unwrap());
            let mut publisher = queue.layer(sink.clone());
            publisher
                .publish(Event::with_id("k", "before", serde_json::json!(1)))
                .await
                .unwrap();
            publisher
        });
        drop(first);
        // Outside any runtime: a clear error, not a panic.
        let err = futures::executor::block_on(publisher.publish(Event::with_id(
            "k",
            "nowhere",
            serde_json::json!(2),
        )))
        .expect_err("no runtime");
        assert!(matches!(err, QueueError::NoRuntime), "{err:?}");
        assert!(err.is_retryable());
        assert_says("no runtime", &err.to_string(), &["needs a tokio runtime"]);
        // In a new runtime: the publisher starts a new publishing task, and
        // both events are delivered.
        let second = tokio::runtime::Runtime::new().unwrap();
        second.block_on(async {
            let after = Event::with_id("k", "after", serde_json::json!(3));
            publisher
                .publish(after)
                .await
                .expect("a new runtime publishes");
            let queue = ThroughTaskQueue::new(open::<serde_json::Value>(&path).await.unwrap());
            let worker = queue.worker(sink.clone()).spawn();
            sink.wait_for(2, WAIT).await.unwrap();
            worker.shutdown().await;
        });
        let mut ids: Vec<String> = sink.events().iter().map(|e| e.id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["after", "before"], "stored events only, each once");
    }

    /// What the jobs were written with.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Before {
        order_id: u64,
    }

    /// What the worker now expects: a field the old jobs lack.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct After {
        order_id: u64,
        currency: String,
    }

    /// Publishes a job of `Before` through `old`, runs a worker of `After`
    /// on `new` (the same queue), and checks that the job is a permanent
    /// dead letter saying decode (read through `json`), that the worker
    /// delivers the next good job, and that it never restarted.
    async fn undecodable_job_is_buried<O, N, J>(old: O, new: N, json: J)
    where
        O: QueueBackend<Before>,
        N: QueueBackend<After>,
        J: QueueBackend<serde_json::Value>,
    {
        let _watchdog = support::Watchdog::new(Duration::from_secs(120), "decode row hung");
        let mut publisher = ThroughTaskQueue::new(old).layer(RecordingSink::<Before>::new());
        let stale = Event::with_id("order.placed", "old-1", Before { order_id: 1 });
        publisher.publish(stale).await.unwrap();

        let typed = eventsink::queue::DeadLetters::new(new.clone());
        let new = ThroughTaskQueue::new(new);
        let sink = RecordingSink::new();
        let worker = new.worker(sink.clone()).spawn();
        let good = After {
            order_id: 2,
            currency: "EUR".into(),
        };
        let mut publisher = new.layer(sink.clone());
        publisher
            .publish(Event::with_id("order.placed", "new-2", good))
            .await
            .unwrap();
        sink.wait_for(1, WAIT).await.unwrap();

        let dead: eventsink::queue::DeadLetters<J, serde_json::Value> =
            eventsink::queue::DeadLetters::new(json);
        dead.wait_for(1, WAIT).await.unwrap();
        let letter = dead.list(0, 10).await.unwrap().remove(0);
        assert_eq!(&*letter.event.id, "old-1");
        assert_eq!(*letter.event.payload, serde_json::json!({"order_id": 1}));
        assert_eq!(letter.cause, DeathCause::Permanent);
        assert_says(
            "decode",
            &letter.last_error,
            &["does not decode", "currency", "replay"],
        );
        assert_eq!(worker.restarts(), 0, "no crash loop");
        // Listed as the new type, the letter is a clear, permanent error.
        let err = typed
            .list(0, 10)
            .await
            .expect_err("the letter is not an After");
        assert!(matches!(err, QueueError::Misconfigured { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert_says(
            "typed letters",
            &err.to_string(),
            &["does not decode", "serde_json::Value"],
        );
        worker.shutdown().await;
        assert_eq!(sink.events().len(), 1, "the good job, once");
    }

    #[tokio::test]
    async fn sqlite_a_job_that_no_longer_decodes_is_a_dead_letter() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q.db");
        let (old, new, json) = (open(&path).await, open(&path).await, open(&path).await);
        undecodable_job_is_buried(old.unwrap(), new.unwrap(), json.unwrap()).await;
    }

    #[cfg(all(feature = "postgres", feature = "test-util"))]
    #[tokio::test]
    #[cfg_attr(
        not(eventsink_postgres),
        ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
    )]
    async fn postgres_a_job_that_no_longer_decodes_is_a_dead_letter() {
        use eventsink::queue::PostgresQueue;
        let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
        let name = support::queue::unique_name("bad-decode");
        let (old, new, json) = (
            PostgresQueue::connect(&url, &name).await,
            PostgresQueue::connect(&url, &name).await,
            PostgresQueue::connect(&url, &name).await,
        );
        undecodable_job_is_buried(old.unwrap(), new.unwrap(), json.unwrap()).await;
        support::queue::delete_postgres_rows(&url, &[name]).await;
    }

    #[cfg(all(feature = "redis", feature = "test-util"))]
    #[tokio::test]
    #[cfg_attr(
        not(eventsink_redis),
        ignore = "set EVENTSINK_REDIS_URL to run against Redis"
    )]
    async fn redis_a_job_that_no_longer_decodes_is_a_dead_letter() {
        use eventsink::queue::RedisQueue;
        let url = support::queue::backend_url("EVENTSINK_REDIS_URL");
        let name = support::queue::unique_name("bad-decode");
        let (old, new, json) = (
            RedisQueue::connect(&url, &name).await,
            RedisQueue::connect(&url, &name).await,
            RedisQueue::connect(&url, &name).await,
        );
        undecodable_job_is_buried(old.unwrap(), new.unwrap(), json.unwrap()).await;
        support::queue::delete_redis_keys(&url, &[name]).await;
    }
}
