//! FsSink against a real temporary directory.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use eventsink::{Error, Event, FsSink, Retryable, SinkExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use support::conformance::{self, Destination};
use support::read_event_files;
use tempfile::TempDir;

struct Dir(TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().expect("temp dir"))
    }
}

impl<P: Serialize + DeserializeOwned + Send> Destination<P> for Dir {
    type Sink = FsSink;

    fn sink(&self) -> FsSink {
        FsSink::new(self.0.path()).expect("fs sink")
    }

    async fn arrived(&self, _n: usize) -> Option<Vec<Event<P>>> {
        // The file is in place once publish returned.
        Some(read_event_files(self.0.path()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_sink_passes_conformance() {
    conformance::run(Dir::new, Dir::new).await;
}

#[tokio::test]
async fn creates_missing_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/c");
    let mut sink = FsSink::new(&dir).unwrap();
    sink.publish(Event::new("k", json!(1))).await.unwrap();
    assert_eq!(read_event_files::<serde_json::Value>(&dir).len(), 1);
}

#[test]
fn a_directory_that_cannot_be_created_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = FsSink::new(file.join("sub")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[tokio::test]
async fn names_files_by_time_kind_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = FsSink::new(tmp.path()).unwrap();
    let at = chrono::DateTime::from_timestamp(1_700_000_000, 5_000).unwrap();
    let event = Event {
        created_at: at,
        ..Event::with_id("user.signed_up", "evt_1", json!({"user_id": 1}))
    };
    sink.publish(event.clone()).await.unwrap();
    let path = tmp.path().join("1700000000_user.signed_up_evt_1.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\n  \"kind\": \"user.signed_up\""),
        "pretty JSON: {text}"
    );
    assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), event);
}

#[tokio::test]
async fn a_kind_or_id_that_escapes_the_directory_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = tmp.path().join("events");
    let mut sink = FsSink::new(&inner).unwrap();
    for event in [
        Event::new("../escape", json!(1)),
        Event::with_id("ok", "../../escape", json!(1)),
        Event::with_id("ok", "a\\b", json!(1)),
        Event::new("nul\0", json!(1)),
    ] {
        let err = sink.publish(event).await.unwrap_err();
        assert!(matches!(err, Error::InvalidEvent { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }
    assert_eq!(std::fs::read_dir(&inner).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[tokio::test]
async fn republishing_an_event_replaces_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = FsSink::new(tmp.path()).unwrap().fsync(true);
    let event = Event::new("k", json!({"v": 1}));
    sink.publish(event.clone()).await.unwrap();
    sink.publish(event.clone()).await.unwrap();
    assert_eq!(
        read_event_files::<serde_json::Value>(tmp.path()),
        vec![event]
    );
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_a_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, done) = (dir.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut files_read = 0usize;
            loop {
                // One more whole pass after the writer finished, so the
                // final file is always read.
                let finished = done.load(Ordering::Acquire);
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.extension().is_none_or(|e| e != "json") {
                        continue;
                    }
                    let bytes = std::fs::read(&path).unwrap();
                    serde_json::from_slice::<Event>(&bytes)
                        .unwrap_or_else(|e| panic!("partial file {}: {e}", path.display()));
                    files_read += 1;
                }
                if finished {
                    break;
                }
            }
            files_read
        })
    };
    let mut sink = FsSink::new(&dir).unwrap();
    let blob = "x".repeat(256 * 1024);
    // The same id every time: each publish rewrites a file the reader reads.
    let event = Event::with_id("big", "same", json!({"blob": blob}));
    for _ in 0..100 {
        sink.publish(event.clone()).await.unwrap();
    }
    done.store(true, Ordering::Release);
    let files_read = reader.join().expect("reader saw only whole files");
    assert!(files_read > 0);
}

#[tokio::test]
async fn an_unserialisable_payload_is_a_permanent_error() {
    use std::collections::HashMap;
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = FsSink::new(tmp.path()).unwrap();
    // JSON object keys must be strings: a map keyed by tuples cannot be written.
    let payload: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    let err = sink.publish(Event::new("k", payload)).await.unwrap_err();
    assert!(matches!(err, Error::Serialize(_)), "{err:?}");
    assert!(!err.is_retryable());
}
