//! [`FsSink`]: writes each event as a JSON file into a directory.
//!
//! **For local development and tests only.** Every event becomes one file, so
//! a busy application fills a single directory with many files, and nothing
//! cleans them up.
//!
//! The file is named `{created_at unix seconds}_{kind}_{id}.json` and holds
//! the event as pretty-printed JSON. It is written to a hidden temporary file
//! in the same directory and then renamed into place, so a reader never sees
//! half a file; publishing the same event again replaces its file. Writing
//! happens on tokio's blocking thread pool, off the async threads. With
//! [`FsSink::fsync`] each file (and the directory entry) is flushed to disk
//! before the publish returns.
//!
//! ```
//! use eventsink::{Event, FsSink, SinkExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::Error> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let dir = tmp.path().join("events");
//! let mut sink = FsSink::new(&dir)?;
//! let event = Event::new("user.signed_up", serde_json::json!({"user_id": 1}));
//! sink.publish(event.clone()).await?;
//!
//! let written = std::fs::read(dir.join(FsSink::file_name(&event)?)).unwrap();
//! let back: Event = serde_json::from_slice(&written).unwrap();
//! assert_eq!(back, event);
//! # Ok(()) }
//! ```

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Serialize;
use tokio::task::JoinHandle;
use tower::Service;

use crate::{Error, Event};

/// Longest `kind` or `id` accepted, in bytes: two of them plus the time and
/// the separators stay under the 255-byte file-name limit of common file
/// systems.
///
/// ```
/// use eventsink::{Event, FsSink, fs::MAX_NAME_PART_BYTES};
/// let long = "k".repeat(MAX_NAME_PART_BYTES + 1);
/// assert!(FsSink::file_name(&Event::new(long, ())).is_err());
/// ```
pub const MAX_NAME_PART_BYTES: usize = 100;

/// Characters refused in a `kind` or `id`: path separators, and characters
/// that are not allowed in file names on some systems.
const FORBIDDEN: &[char] = &['/', '\\', ':', '*', '?', '"', '<', '>', '|'];

/// A sink that writes one JSON file per event into a directory. Local
/// development and tests only (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct FsSink {
    dir: Arc<Path>,
    fsync: bool,
}

impl FsSink {
    /// A sink writing into `dir`, which is created (with its parents) if it
    /// does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory cannot be created.
    ///
    /// ```
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let sink = eventsink::FsSink::new(tmp.path().join("a/b"))?;
    /// assert!(sink.dir().is_dir());
    /// # Ok::<(), eventsink::Error>(())
    /// ```
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            source: not_a_directory(&dir).unwrap_or(source),
            path: dir.clone(),
        })?;
        Ok(FsSink {
            dir: dir.into(),
            fsync: false,
        })
    }

    /// Whether to flush each file and the directory to disk before a publish
    /// returns (off by default: this sink is for development).
    ///
    /// ```
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let sink = eventsink::FsSink::new(tmp.path())?.fsync(true);
    /// # Ok::<(), eventsink::Error>(())
    /// ```
    pub fn fsync(mut self, enabled: bool) -> Self {
        self.fsync = enabled;
        self
    }

    /// The directory events are written to.
    ///
    /// ```
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let sink = eventsink::FsSink::new(tmp.path())?;
    /// assert_eq!(sink.dir(), tmp.path());
    /// # Ok::<(), eventsink::Error>(())
    /// ```
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file name `event` is written to: `{created_at unix
    /// seconds}_{kind}_{id}.json`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] if the kind or id is empty, longer than
    /// [`MAX_NAME_PART_BYTES`], or holds a path separator, a control
    /// character or one of `: * ? " < > |`.
    ///
    /// ```
    /// use chrono::DateTime;
    /// use eventsink::{Event, FsSink};
    ///
    /// let event = Event {
    ///     created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    ///     ..Event::with_id("user.signed_up", "evt_1", ())
    /// };
    /// assert_eq!(FsSink::file_name(&event)?, "1700000000_user.signed_up_evt_1.json");
    ///
    /// let escaping = Event::with_id("user.signed_up", "../../etc/passwd", ());
    /// assert!(FsSink::file_name(&escaping).is_err());
    /// # Ok::<(), eventsink::Error>(())
    /// ```
    pub fn file_name<P>(event: &Event<P>) -> Result<String, Error> {
        check_name_part("kind", &event.kind)?;
        check_name_part("id", &event.id)?;
        Ok(format!(
            "{}_{}_{}.json",
            event.created_at.timestamp(),
            event.kind,
            event.id
        ))
    }
}

/// The error to report when `dir` cannot be created because it, or one of
/// its parents, is a file: the OS only says "File exists" or "Not a
/// directory", without saying which.
fn not_a_directory(dir: &Path) -> Option<io::Error> {
    let file = dir.ancestors().find(|p| p.is_file())?;
    Some(io::Error::new(
        io::ErrorKind::NotADirectory,
        format!("{} is a file, not a directory", file.display()),
    ))
}

fn check_name_part(field: &'static str, value: &str) -> Result<(), Error> {
    let problem = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_NAME_PART_BYTES {
        Some("it is longer than 100 bytes")
    } else if value.contains(['/', '\\']) {
        Some("it contains a path separator")
    } else if value.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if value.contains(FORBIDDEN) {
        Some("it contains a character not allowed in file names")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(Error::InvalidEvent {
            field,
            value: value.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

impl<P: Serialize> Service<Event<P>> for FsSink {
    type Response = ();
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event<P>) -> Self::Future {
        let prepared = FsSink::file_name(&event).and_then(|name| {
            let body = serde_json::to_vec_pretty(&event).map_err(Error::Serialize)?;
            Ok((name, body))
        });
        let (name, body) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return ResponseFuture(State::Failed(Some(e))),
        };
        ResponseFuture(State::Start(Some(PendingWrite {
            dir: Arc::clone(&self.dir),
            name,
            body,
            fsync: self.fsync,
        })))
    }
}

/// Writes `body` to `dir/name` through a temporary file and a rename.
fn write_atomically(dir: &Path, name: &str, body: &[u8], fsync: bool) -> Result<(), Error> {
    let temp = dir.join(format!(".eventsink-{:016x}.tmp", fastrand::u64(..)));
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let written = write_new(&temp, body, fsync).and_then(|()| fs::rename(&temp, dir.join(name)));
    if let Err(source) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_error(&dir.join(name))(source));
    }
    if fsync {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))?;
    }
    Ok(())
}

fn write_new(path: &Path, body: &[u8], fsync: bool) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(body)?;
    if fsync {
        file.sync_all()?;
    }
    Ok(())
}

/// The future of [`FsSink`]'s `call`: the file write, run off the async
/// threads.
///
/// ```
/// use eventsink::{Event, FsSink, fs::ResponseFuture};
/// use tower::Service;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::Error> {
/// # let tmp = tempfile::tempdir().unwrap();
/// let mut sink = FsSink::new(tmp.path())?;
/// let writing: ResponseFuture = sink.call(Event::new("ping", ()));
/// writing.await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture(State);

#[derive(Debug)]
enum State {
    Start(Option<PendingWrite>),
    Failed(Option<Error>),
    Writing {
        task: JoinHandle<Result<(), Error>>,
        dir: Arc<Path>,
    },
}

/// One file to write.
#[derive(Debug)]
struct PendingWrite {
    dir: Arc<Path>,
    name: String,
    body: Vec<u8>,
    fsync: bool,
}

impl PendingWrite {
    fn run(&self) -> Result<(), Error> {
        write_atomically(&self.dir, &self.name, &self.body, self.fsync)
    }

    /// Runs the write off the async threads: in place on a multi-thread
    /// runtime, whose scheduler hands this thread's other tasks to another
    /// worker meanwhile ([`tokio::task::block_in_place`]; no round trip to
    /// another thread), and on the blocking pool elsewhere.
    fn start(self) -> State {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            return State::Failed(tokio::task::block_in_place(|| self.run()).err());
        }
        let dir = Arc::clone(&self.dir);
        State::Writing {
            task: tokio::task::spawn_blocking(move || self.run()),
            dir,
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let State::Start(write) = &mut self.0 {
            // `Start` is left on the first poll and never re-entered: `None`
            // only if the future is polled again after completing, a misuse.
            let write = write
                .take()
                .expect("FsSink ResponseFuture polled after completion");
            self.0 = write.start();
        }
        match &mut self.0 {
            State::Start(_) => unreachable!("the write was started above"),
            // `Failed(None)` is the end state of a successful in-place write.
            State::Failed(error) => Poll::Ready(error.take().map_or(Ok(()), Err)),
            // The write task only ends without a result if it panicked or
            // the runtime is shutting down; report it as a failed write.
            State::Writing { task, dir } => Pin::new(task).poll(cx).map(|joined| {
                joined.unwrap_or_else(|join_error| {
                    Err(Error::Io {
                        path: dir.to_path_buf(),
                        source: io::Error::other(join_error),
                    })
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Retryable;

    fn named(kind: &str, id: &str) -> Result<String, Error> {
        FsSink::file_name(&Event::with_id(kind, id, ()))
    }

    #[test]
    fn names_that_escape_or_are_invalid_are_refused() {
        for (kind, id) in [
            ("a/b", "1"),
            ("a", "../x"),
            ("a\\b", "1"),
            ("", "1"),
            ("a", ""),
            ("a\0", "1"),
            ("a\n", "1"),
            ("a", "c:d"),
        ] {
            let err = named(kind, id).expect_err(&format!("{kind:?} {id:?}"));
            assert!(!err.is_retryable());
        }
        assert!(named(&"k".repeat(101), "1").is_err());
    }

    #[test]
    fn ordinary_names_are_accepted() {
        let long = "k".repeat(MAX_NAME_PART_BYTES);
        for (kind, id) in [
            ("order.placed", "evt_1"),
            ("..", "x"),
            (long.as_str(), long.as_str()),
        ] {
            let name = named(kind, id).unwrap();
            assert!(name.len() <= 255, "{name}");
        }
    }
}
