//! [`QueueError`]: what went wrong between a publisher, the queue's backend
//! and its workers.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{BoxError, Retryable};

/// A failure of the queue itself (not of the delivery behind it).
///
/// Every variant is transient except [`QueueError::Encode`] (whose source is
/// an [`eventsink::Error::Serialize`](crate::Error::Serialize)),
/// [`QueueError::Misconfigured`] and [`QueueError::NewerSchema`], so
/// [`Retryable`] answers correctly for a boxed `QueueError`.
///
/// ```
/// use eventsink::queue::QueueError;
/// use eventsink::{BoxError, Retryable};
///
/// let err: BoxError = QueueError::Stopped { queue: "orders".into() }.into();
/// assert!(err.is_retryable());
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
    /// The backend refused the queue's settings: authentication or
    /// authorization failed, the database does not exist, the URL is
    /// invalid, or the SQLite file is not a database or is read-only.
    /// Permanent: fix the URL, the credentials, the file or the server's
    /// settings.
    ///
    /// ```
    /// use eventsink::queue::QueueError;
    /// use eventsink::Retryable;
    ///
    /// let err = QueueError::Misconfigured {
    ///     queue: "orders".into(),
    ///     action: "connecting to Postgres",
    ///     problem: "the database does not exist",
    ///     source: "database \"ordrs\" does not exist".into(),
    /// };
    /// assert!(!err.is_retryable());
    /// assert!(err.to_string().contains("the database does not exist"));
    /// ```
    Misconfigured {
        /// The queue's name.
        queue: Arc<str>,
        /// What was being done, e.g. `"connecting to Postgres"`.
        action: &'static str,
        /// What the backend refused, e.g. `"authentication failed"`.
        problem: &'static str,
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
    /// is already queued. Not returned by this crate: a publish answers
    /// [`Published::AlreadyQueued`](super::Published::AlreadyQueued)
    /// instead. Kept so that matches on `QueueError` keep compiling.
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
    /// The queue was to be opened only if it exists
    /// (`create_if_missing(false)` on the SQLite or Postgres builder), and
    /// it does not: the file is missing, or the file or database holds no
    /// queue. Nothing was created. Permanent: check the path or URL.
    Missing {
        /// The queue's name.
        queue: Arc<str>,
        /// What is missing, e.g. `the SQLite file "q.db" does not exist`.
        what: String,
    },
    /// The backend did not store the event within the publish deadline
    /// ([`ThroughTaskQueue::publish_timeout`](super::ThroughTaskQueue::publish_timeout)):
    /// it is slow, hung or unreachable. Transient. The event may or may not
    /// be stored; publishing it again with the same id is safe, as the
    /// backend recognises a duplicate by its idempotency key.
    Timeout {
        /// The queue's name.
        queue: Arc<str>,
        /// The deadline that passed.
        after: Duration,
    },
}

impl QueueError {
    /// A backend's error while doing `action`: [`QueueError::Misconfigured`]
    /// if the backend refused the settings, else [`QueueError::Backend`].
    pub(crate) fn backend(
        queue: &Arc<str>,
        action: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        let source: BoxError = Box::new(Cause(source.into()));
        let queue = Arc::clone(queue);
        match refused_settings(&*source) {
            Some(problem) => QueueError::Misconfigured {
                queue,
                action,
                problem,
                source,
            },
            None => QueueError::Backend {
                queue,
                action,
                source,
            },
        }
    }

    /// Whether the error concerns one job of a batch (its payload, its
    /// key), so that the other jobs of the batch may still be stored one
    /// at a time; any other error (the backend is down, slow or locked)
    /// would only repeat for each of them.
    pub(crate) fn concerns_one_job(&self) -> bool {
        matches!(
            self,
            QueueError::Encode { .. } | QueueError::AlreadyQueued { .. }
        )
    }

    /// This error, once for each of the `n` publishers of a batch. A
    /// backend's error is shared (its message and source chain are the
    /// same for each).
    pub(crate) fn for_each(self, queue: &Arc<str>, n: usize) -> Vec<QueueError> {
        if n <= 1 {
            return vec![self];
        }
        let copy: Box<dyn Fn() -> QueueError + Send> = match self {
            QueueError::Backend {
                queue,
                action,
                source,
            } => {
                let shared = Shared(Arc::from(source));
                Box::new(move || QueueError::Backend {
                    queue: Arc::clone(&queue),
                    action,
                    source: Box::new(shared.clone()),
                })
            }
            QueueError::Misconfigured {
                queue,
                action,
                problem,
                source,
            } => {
                let shared = Shared(Arc::from(source));
                Box::new(move || QueueError::Misconfigured {
                    queue: Arc::clone(&queue),
                    action,
                    problem,
                    source: Box::new(shared.clone()),
                })
            }
            QueueError::Stopped { queue } => Box::new(move || QueueError::Stopped {
                queue: Arc::clone(&queue),
            }),
            QueueError::Timeout { queue, after } => Box::new(move || QueueError::Timeout {
                queue: Arc::clone(&queue),
                after,
            }),
            QueueError::NoRuntime => Box::new(|| QueueError::NoRuntime),
            other => {
                let shared = Shared(Arc::new(other));
                let queue = Arc::clone(queue);
                Box::new(move || QueueError::Backend {
                    queue: Arc::clone(&queue),
                    action: "pushing jobs",
                    source: Box::new(shared.clone()),
                })
            }
        };
        (0..n).map(|_| copy()).collect()
    }
}

impl Retryable for QueueError {
    /// ```
    /// use eventsink::{Retryable, queue::QueueError};
    /// assert!(QueueError::NoRuntime.is_retryable());
    /// ```
    fn is_retryable(&self) -> bool {
        match self {
            QueueError::Encode { source, .. } => source.is_retryable(),
            QueueError::NewerSchema { .. }
            | QueueError::Missing { .. }
            | QueueError::Misconfigured { .. } => false,
            _ => true,
        }
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Backend { queue, action, .. } => write!(
                f,
                "queue {queue:?}: {action} failed; the backend is down, busy or locked, try \
                 again later"
            ),
            QueueError::Misconfigured {
                queue,
                action,
                problem,
                ..
            } => write!(
                f,
                "queue {queue:?}: {action} failed: {problem}; fix the URL, the credentials or \
                 the server's settings, retrying cannot help"
            ),
            QueueError::Encode { queue, .. } => write!(
                f,
                "queue {queue:?}: the event cannot be stored as a job; fix the event (its id, \
                 kind or payload), retrying it cannot help"
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
            QueueError::Missing { queue, what } => write!(
                f,
                "queue {queue:?}: {what}; nothing was created: check the path or URL"
            ),
            QueueError::Timeout { queue, after } => write!(
                f,
                "queue {queue:?}: the backend did not store the event within {after:?} (it is \
                 slow, hung or unreachable); the event may or may not be stored: publishing it \
                 again with the same id is safe, a duplicate is recognised by its idempotency key"
            ),
        }
    }
}

impl StdError for QueueError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            QueueError::Backend { source, .. } | QueueError::Misconfigured { source, .. } => {
                Some(&**source)
            }
            QueueError::Encode { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What the backend's error `err` says the backend refused, if it refused
/// the queue's settings (a permanent failure). The memory backend alone
/// has no such errors.
#[cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "redis")),
    allow(unused_variables)
)]
fn refused_settings(err: &(dyn StdError + 'static)) -> Option<&'static str> {
    let err = err.downcast_ref::<Cause>().map_or(err, |cause| &*cause.0);
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    if let Some(err) = err.downcast_ref::<sqlx::Error>() {
        return refused_by_sql(err);
    }
    #[cfg(feature = "redis")]
    if let Some(err) = err.downcast_ref::<redis::RedisError>() {
        return refused_by_redis(err);
    }
    None
}

/// A URL sqlx cannot use, and Postgres' SQLSTATEs for refused settings
/// (class 28: authentication; 3D000: no such database; 42501: insufficient
/// privilege).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn refused_by_sql(err: &sqlx::Error) -> Option<&'static str> {
    match err {
        sqlx::Error::Configuration(_) => Some("the URL or the connection settings are invalid"),
        #[cfg(feature = "postgres")]
        sqlx::Error::Database(db)
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some() =>
        {
            match db.code()?.as_ref() {
                code if code.starts_with("28") => Some(
                    "authentication failed: the role does not exist, its password is wrong, or \
                 the server's pg_hba.conf does not admit it",
                ),
                "3D000" => Some("the database does not exist"),
                "42501" => Some("permission denied: the role lacks a privilege the queue needs"),
                _ => None,
            }
        }
        #[cfg(feature = "sqlite")]
        sqlx::Error::Database(db)
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
        {
            sqlite_refusal(db.code()?.parse().ok()?)
        }
        _ => None,
    }
}

/// SQLite's result codes for a file that cannot be a queue:
/// `SQLITE_READONLY` (8, and its extended codes but
/// `SQLITE_READONLY_RECOVERY`, 264: another process is recovering the WAL,
/// which passes) and `SQLITE_NOTADB` (26).
#[cfg(feature = "sqlite")]
fn sqlite_refusal(code: i32) -> Option<&'static str> {
    const READONLY_RECOVERY: i32 = 264;
    match code & 0xff {
        8 if code != READONLY_RECOVERY => Some(
            "the SQLite file or its directory is read-only; make both writable by this process",
        ),
        26 => Some("the file is not a SQLite database; give the path of a queue file or a new one"),
        _ => None,
    }
}

/// Redis errors for refused settings: authentication, ACL permissions, an
/// invalid URL, a database number the server does not have.
#[cfg(feature = "redis")]
fn refused_by_redis(err: &redis::RedisError) -> Option<&'static str> {
    use redis::{ErrorKind, ServerErrorKind};
    match err.kind() {
        ErrorKind::AuthenticationFailed => {
            Some("authentication failed: the user does not exist or its password is wrong")
        }
        ErrorKind::InvalidClientConfig => Some("the URL or the connection settings are invalid"),
        ErrorKind::Server(ServerErrorKind::NoPerm) => {
            Some("permission denied: the user's ACL forbids a command the queue needs")
        }
        // redis reports a `SELECT` of a database the server lacks only
        // in its message.
        _ if err.to_string().contains("refused to switch database") => {
            Some("the database number in the URL does not exist on the server")
        }
        _ => None,
    }
}

/// A backend's error as the source of a [`QueueError`]: shows as the error
/// itself; its chain skips the causes whose message the error already
/// shows (sqlx and redis repeat their cause's message in their own), so a
/// printed chain has each cause once.
struct Cause(BoxError);

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl StdError for Cause {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        let shown = self.0.to_string();
        let mut next = self.0.source();
        while let Some(cause) = next {
            if !shown.contains(&cause.to_string()) {
                return Some(cause);
            }
            next = cause.source();
        }
        None
    }
}

/// One error given to several publishers: shows as the error itself, and
/// continues the chain with the error's own source (so `Display` is not
/// repeated).
#[derive(Clone)]
struct Shared(Arc<dyn StdError + Send + Sync>);

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl StdError for Shared {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_error_is_shared_with_every_publisher_of_a_batch() {
        let queue: Arc<str> = "q".into();
        let err = QueueError::backend(&queue, "pushing jobs", "connection refused");
        let each = err.for_each(&queue, 3);
        assert_eq!(each.len(), 3);
        for e in &each {
            assert!(matches!(e, QueueError::Backend { .. }), "{e:?}");
            assert!(e.is_retryable());
            // Display says it once: the cause is the source, not the text.
            assert!(!e.to_string().contains("connection refused"), "{e}");
            let source = e.source().expect("the backend's error");
            assert_eq!(source.to_string(), "connection refused");
        }
    }

    #[test]
    fn a_cause_the_backend_error_repeats_is_skipped_in_the_chain() {
        /// An error that shows its source's message, as sqlx and redis do.
        #[derive(Debug)]
        struct Repeats(std::io::Error);
        impl fmt::Display for Repeats {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "error communicating: {}", self.0)
            }
        }
        impl StdError for Repeats {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = QueueError::backend(&"q".into(), "connecting", Repeats(refused));
        let source = err.source().expect("the backend's error");
        assert!(source.to_string().contains("refused"), "{source}");
        assert!(source.source().is_none(), "{:?}", source.source());
        assert!(err.is_retryable());
    }

    #[test]
    fn timeout_says_the_event_may_be_stored_and_is_transient() {
        let err = QueueError::Timeout {
            queue: "orders".into(),
            after: Duration::from_secs(2),
        };
        assert!(err.is_retryable());
        let text = err.to_string();
        for part in ["orders", "2s", "may or may not be stored", "same id"] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
        assert!(!err.concerns_one_job());
    }
}
