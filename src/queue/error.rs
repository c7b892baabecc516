//! [`QueueError`]: what went wrong between a publisher, the queue's backend
//! and its workers.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use crate::{BoxError, ErrorKind};

/// A failure of the queue itself (not of the delivery behind it).
///
/// Every variant is transient except [`QueueError::Encode`], whose source is
/// an [`eventsink::Error::Serialize`](crate::Error::Serialize), so
/// [`classify`](crate::classify) answers correctly for a boxed `QueueError`.
///
/// ```
/// use eventsink::queue::QueueError;
/// use eventsink::{classify, BoxError, ErrorKind};
///
/// let err: BoxError = QueueError::Stopped { queue: "orders".into() }.into();
/// assert_eq!(classify(&err), ErrorKind::Transient);
/// assert!(err.to_string().contains("orders"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum QueueError {
    /// The backend (SQLite, Postgres, Redis) failed an operation: it is down,
    /// busy or locked. Transient.
    Backend {
        /// The queue's name.
        queue: Arc<str>,
        /// What was being done, e.g. `"pushing jobs"`.
        action: &'static str,
        /// The backend's error.
        source: BoxError,
    },
    /// The job could not be encoded for the backend (the payload's
    /// `Serialize` failed). Permanent.
    Encode {
        /// The queue's name.
        queue: Arc<str>,
        /// An [`Error::Serialize`](crate::Error::Serialize) or
        /// [`Error::InvalidEvent`](crate::Error::InvalidEvent).
        source: crate::Error,
    },
    /// The backend already holds a job with this idempotency key: the event
    /// is already queued. Publishing treats this as success and never
    /// returns it.
    AlreadyQueued {
        /// The idempotency key.
        key: String,
    },
    /// The publishing task of this queue has stopped (its tokio runtime shut
    /// down). Transient: a new publishing service can push the event.
    Stopped {
        /// The queue's name.
        queue: Arc<str>,
    },
    /// Publishing was called outside a tokio runtime. Transient, as the
    /// crate treats every error it cannot prove permanent.
    NoRuntime,
    /// The database was migrated by a newer apalis than the one this crate
    /// is built with (and pinned to): it has apalis migrations this crate
    /// does not know, so the jobs it writes might never be fetched. The
    /// queue does not open. Permanent: upgrade eventsink.
    NewerSchema {
        /// The queue's name.
        queue: Arc<str>,
        /// The apalis crate whose migrations these are, e.g. `"apalis-sqlite"`.
        apalis: &'static str,
        /// The applied migrations (versions) this crate does not know.
        unknown: Vec<i64>,
        /// The newest migration this crate knows.
        newest_known: i64,
    },
}

impl QueueError {
    pub(crate) fn backend(
        queue: &Arc<str>,
        action: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        QueueError::Backend {
            queue: Arc::clone(queue),
            action,
            source: source.into(),
        }
    }

    /// Whether retrying later can help.
    ///
    /// ```
    /// use eventsink::queue::QueueError;
    /// assert!(QueueError::NoRuntime.kind().is_transient());
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            QueueError::Encode { source, .. } => source.kind(),
            QueueError::NewerSchema { .. } => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Backend {
                queue,
                action,
                source,
            } => write!(
                f,
                "queue {queue:?}: {action} failed ({source}); the backend is down, busy or \
                 locked, try again later"
            ),
            QueueError::Encode { queue, source } => write!(
                f,
                "queue {queue:?}: the event cannot be stored as a job: {source}"
            ),
            QueueError::AlreadyQueued { key } => {
                write!(f, "a job with idempotency key {key:?} is already queued")
            }
            QueueError::Stopped { queue } => write!(
                f,
                "queue {queue:?}: the publishing task stopped (its runtime shut down); \
                 publish through a new ThroughTaskQueue service"
            ),
            QueueError::NoRuntime => f.write_str(
                "publishing to a task queue needs a tokio runtime; call it from async code \
                 running on tokio",
            ),
            QueueError::NewerSchema {
                queue,
                apalis,
                unknown,
                newest_known,
            } => write!(
                f,
                "queue {queue:?}: the database was migrated by a newer {apalis} than this \
                 eventsink {} knows: found apalis migration(s) {unknown:?}, the newest this \
                 eventsink knows is {newest_known}; jobs written now might never be fetched. \
                 Upgrade eventsink to a release built on that {apalis}",
                env!("CARGO_PKG_VERSION")
            ),
        }
    }
}

impl StdError for QueueError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            QueueError::Backend { source, .. } => Some(&**source),
            QueueError::Encode { source, .. } => Some(source),
            _ => None,
        }
    }
}
