//! The sinks' [`Error`], and [`Retryable`]: whether an error is worth
//! retrying, for this crate's errors, the boxed errors of a whole tower
//! stack, and your own.
//!
//! Callers of a sink have one question: *will trying again later help?*
//! [`Retryable::is_retryable`] answers it. Layers such as
//! [`Timeout`](tower::timeout::Timeout) and [`Buffer`](tower::buffer::Buffer)
//! box their errors, so the implementation for [`BoxError`] looks through
//! the `source()` chain and also knows tower's own error types.
//!
//! ```
//! use eventsink::{BoxError, Retryable};
//!
//! let timed_out: BoxError = tower::timeout::error::Elapsed::new().into();
//! assert!(timed_out.is_retryable());
//! ```

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// The boxed error type of tower layers (`Timeout`, `Buffer`, ...).
///
/// ```
/// use eventsink::{BoxError, Error};
///
/// let boxed: BoxError = Error::TooLarge { size: 10, limit: 5 }.into();
/// assert!(boxed.is::<Error>());
/// ```
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Whether a failed attempt can succeed when tried again later, and how long
/// the other side asked us to wait.
///
/// [`RetryPolicy`](crate::RetryPolicy) retries any service whose error
/// implements it, and the queue's worker asks it before scheduling the next
/// attempt. Implement it for your own service's error:
///
/// ```
/// use eventsink::Retryable;
///
/// #[derive(Debug)]
/// enum MyError { Busy, Rejected }
///
/// impl Retryable for MyError {
///     fn is_retryable(&self) -> bool {
///         matches!(self, MyError::Busy)
///     }
/// }
/// assert!(MyError::Busy.is_retryable());
/// assert!(!MyError::Rejected.is_retryable());
/// ```
pub trait Retryable {
    /// `true` if trying again later can help (the receiver was down, slow
    /// or busy); `false` if it cannot (the event or the destination is
    /// wrong).
    fn is_retryable(&self) -> bool;

    /// How long the receiver asked us to wait before the next attempt (an
    /// HTTP `Retry-After`), if it said. `None` by default.
    ///
    /// Both [`RetryPolicy`](crate::RetryPolicy) and the queue's
    /// `RetrySchedule` apply it by one rule ([`Backoff::delay`](crate::Backoff::delay)):
    /// the wait is at least the backoff delay and at most the backoff's
    /// maximum; within those, the receiver's wish wins.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// Why a sink failed to deliver an event.
///
/// Match on the variant for details, or ask [`Retryable::is_retryable`]
/// whether a retry can help. The `Display` text says what failed and what to
/// do about it; the cause is its [`source`](StdError::source).
///
/// ```
/// use eventsink::{Error, Retryable};
///
/// let err = Error::TooLarge { size: 300_000, limit: 262_144 };
/// assert!(!err.is_retryable());
/// assert!(err.to_string().contains("not retrying"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The event could not be serialised to JSON (a failing `Serialize`
    /// implementation, or a map with non-string keys). Permanent.
    Serialize(serde_json::Error),
    /// A field of the event cannot be used by this sink, such as a `kind`
    /// that is not a valid file name for [`FsSink`](crate::FsSink). Permanent.
    InvalidEvent {
        /// The field: `"kind"` or `"id"`.
        field: &'static str,
        /// Its value, as given.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Reading or writing a file failed. Transient, unless the error says
    /// the input itself is invalid.
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// An HTTP receiver answered with a status outside 2xx. Whether it is
    /// retryable follows the status: 3xx, 408, 425, 429 and most 5xx are,
    /// other 4xx not (a sink may let users override that).
    Http {
        /// The destination, without credentials or query string.
        url: String,
        /// The status code.
        status: http::StatusCode,
        /// Whether retrying can help, decided from the status.
        retryable: bool,
        /// The receiver's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// The first bytes of the response body, with control characters
        /// replaced, safe to log.
        body: String,
    },
    /// No answer came back: the connection was refused or reset, the name
    /// did not resolve, or the attempt timed out. Transient.
    Transport {
        /// The destination, without credentials or query string.
        url: String,
        /// Whether the attempt ran out of time.
        timed_out: bool,
        /// The HTTP client's error.
        source: BoxError,
    },
    /// The serialised event is larger than the sink accepts; nothing was
    /// sent. Permanent.
    TooLarge {
        /// The body's size in bytes.
        size: usize,
        /// The sink's limit in bytes.
        limit: usize,
    },
    /// The egress policy refused the destination's address; nothing was
    /// sent. Permanent.
    Refused {
        /// The destination, without credentials or query string.
        url: String,
        /// Which address was refused and why.
        reason: String,
    },
    /// A failure injected by
    /// [`RecordingSink::fail_next`](crate::RecordingSink::fail_next), for
    /// tests of retries and queues (feature `test-util`).
    #[cfg(feature = "test-util")]
    Simulated {
        /// Whether to report the failure as retryable.
        retryable: bool,
        /// A `Retry-After` hint to carry, as an HTTP receiver would send.
        retry_after: Option<Duration>,
    },
}

impl Error {
    /// Finds an [`Error`] in `err` or in its chain of `source()`s, as left by
    /// layers that wrap or box errors.
    ///
    /// ```
    /// use eventsink::{BoxError, Error};
    ///
    /// let boxed: BoxError = Error::TooLarge { size: 10, limit: 5 }.into();
    /// assert!(Error::find(&*boxed).is_some());
    /// ```
    pub fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
        chain(err).find_map(|e| e.downcast_ref::<Error>())
    }
}

impl Retryable for Error {
    /// ```
    /// use eventsink::{Error, Retryable};
    /// assert!(!Error::TooLarge { size: 10, limit: 5 }.is_retryable());
    /// ```
    fn is_retryable(&self) -> bool {
        match self {
            Error::Serialize(_)
            | Error::InvalidEvent { .. }
            | Error::TooLarge { .. }
            | Error::Refused { .. } => false,
            Error::Io { source, .. } => source.is_retryable(),
            Error::Transport { .. } => true,
            Error::Http { retryable, .. } => *retryable,
            #[cfg(feature = "test-util")]
            Error::Simulated { retryable, .. } => *retryable,
        }
    }

    /// The receiver's `Retry-After`, carried by [`Error::Http`].
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Http { retry_after, .. } => *retry_after,
            #[cfg(feature = "test-util")]
            Error::Simulated { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Serialize(_) => write!(
                f,
                "the event could not be serialised to JSON; fix the payload type's \
                 Serialize implementation"
            )?,
            Error::InvalidEvent {
                field,
                value,
                problem,
            } => write!(
                f,
                "event {field} {value:?} cannot be delivered by this sink: {problem}; \
                 publish it with a {field} made of letters, digits, '.', '_' and '-'"
            )?,
            Error::Io { path, .. } => write!(
                f,
                "file operation on {} failed; check that the directory exists, \
                 is writable and has free space",
                path.display()
            )?,
            Error::Http {
                url, status, body, ..
            } => {
                write!(
                    f,
                    "webhook {url} answered HTTP {status}: {}",
                    status_advice(*status)
                )?;
                if !body.is_empty() {
                    write!(f, "; response body: {body}")?;
                }
            }
            Error::Transport {
                url,
                timed_out: true,
                ..
            } => write!(
                f,
                "webhook {url} did not answer in time; the receiver is slow or unreachable"
            )?,
            Error::Transport { url, .. } => write!(
                f,
                "webhook {url} could not be reached; check the URL and that the \
                 receiver is up"
            )?,
            Error::TooLarge { size, limit } => write!(
                f,
                "the event is {size} bytes as JSON, over the sink's limit of {limit} bytes; \
                 send a smaller payload (a reference the receiver can fetch) or raise the limit"
            )?,
            Error::Refused { url, reason } => write!(
                f,
                "the egress policy refused webhook {url}: {reason}; allow the address \
                 explicitly if it is trusted"
            )?,
            #[cfg(feature = "test-util")]
            Error::Simulated { .. } => write!(
                f,
                "simulated failure requested with RecordingSink::fail_next"
            )?,
        }
        f.write_str(if self.is_retryable() {
            " (transient, retrying later can help)"
        } else {
            " (permanent, not retrying)"
        })
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Serialize(e) => Some(e),
            Error::Io { source, .. } => Some(source),
            Error::Transport { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// Reads a boxed error of any sink or stack of layers.
///
/// It walks the error and its `source()` chain and answers from the first
/// error it recognises:
///
/// - this crate's [`Error`], `queue::QueueError` and
///   [`FanOutError`](crate::fanout::FanOutError): their own answer;
/// - tower's `timeout::error::Elapsed` and tokio's `time::error::Elapsed`:
///   retryable (the next attempt may be faster);
/// - tower's `load_shed::error::Overloaded`: retryable;
/// - tower's `buffer::error::Closed` and `buffer::error::ServiceError`:
///   retryable (the event itself was fine; that buffer stopped, a new stack
///   or a queued retry can deliver it);
/// - an [`std::io::Error`]: retryable unless it says the input is invalid.
///
/// Anything else is retryable too: an error we cannot read is no proof that
/// the event is undeliverable, and at-least-once delivery prefers a needless
/// retry to a lost event.
///
/// ```
/// use eventsink::{BoxError, Error, Retryable};
///
/// let err: BoxError = Error::TooLarge { size: 10, limit: 5 }.into();
/// assert!(!err.is_retryable());
///
/// let overloaded: BoxError = tower::load_shed::error::Overloaded::new().into();
/// assert!(overloaded.is_retryable());
/// ```
impl Retryable for BoxError {
    fn is_retryable(&self) -> bool {
        first_known(&**self).is_none_or(|known| known.is_retryable())
    }

    fn retry_after(&self) -> Option<Duration> {
        first_known(&**self).and_then(|known| known.retry_after())
    }
}

/// Never fails, so never retried ([`NoopSink`](crate::NoopSink)'s error).
impl Retryable for Infallible {
    fn is_retryable(&self) -> bool {
        match *self {}
    }
}

/// Retryable unless the error says the input itself is invalid.
///
/// ```
/// use eventsink::Retryable;
/// use std::io;
/// assert!(io::Error::from(io::ErrorKind::ConnectionReset).is_retryable());
/// assert!(!io::Error::from(io::ErrorKind::InvalidData).is_retryable());
/// ```
impl Retryable for io::Error {
    fn is_retryable(&self) -> bool {
        !matches!(
            self.kind(),
            io::ErrorKind::InvalidInput
                | io::ErrorKind::InvalidData
                | io::ErrorKind::InvalidFilename
        )
    }
}

/// A sink that cannot be built never will be: fix its configuration.
///
/// ```
/// use eventsink::{BoxError, Retryable};
/// let err: BoxError = eventsink::WebhookSink::builder("not a url").build().unwrap_err().into();
/// assert!(!err.is_retryable());
/// ```
#[cfg(feature = "webhook")]
impl Retryable for crate::webhook::BuildError {
    fn is_retryable(&self) -> bool {
        false
    }
}

/// A secret that does not parse never will: fix the configured value.
///
/// ```
/// use eventsink::{BoxError, Retryable};
/// let err: BoxError = "not a secret".parse::<eventsink::signature::Secret>().unwrap_err().into();
/// assert!(!err.is_retryable());
/// ```
#[cfg(feature = "signing")]
impl Retryable for crate::signature::SecretError {
    fn is_retryable(&self) -> bool {
        false
    }
}

/// The answer for tower's and tokio's own errors: always retryable.
struct TowerError;

impl Retryable for TowerError {
    fn is_retryable(&self) -> bool {
        true
    }
}

/// The first error of `err`'s `source()` chain that has a known answer.
fn first_known<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a dyn Retryable> {
    chain(err).find_map(known)
}

fn known<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a dyn Retryable> {
    if let Some(ours) = e.downcast_ref::<Error>() {
        return Some(ours);
    }
    #[cfg(feature = "queue")]
    if let Some(queue) = e.downcast_ref::<crate::queue::QueueError>() {
        return Some(queue);
    }
    if let Some(fanout) = e.downcast_ref::<crate::fanout::FanOutError>() {
        return Some(fanout);
    }
    if let Some(io) = e.downcast_ref::<io::Error>() {
        return Some(io);
    }
    #[cfg(feature = "webhook")]
    if let Some(build) = e.downcast_ref::<crate::webhook::BuildError>() {
        return Some(build);
    }
    #[cfg(feature = "signing")]
    if let Some(secret) = e.downcast_ref::<crate::signature::SecretError>() {
        return Some(secret);
    }
    is_tower_transient(e).then_some(&TowerError)
}

/// What an HTTP status usually means for the sender, in a few words.
fn status_advice(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        300..=399 => "a redirect, which webhooks never follow; configure the final URL",
        401 | 403 => "the receiver refused our credentials; check its secret and configuration",
        404 => "no endpoint at this URL; check the URL",
        410 => "the endpoint was removed; stop sending to it",
        408 | 425 => "the receiver gave up waiting; it may accept a later attempt",
        409 => "the receiver is handling another delivery of this event; retry later",
        413 => "the event is too large for the receiver",
        429 => "the receiver is throttling us; slow down",
        400..=499 => "the receiver rejected the request",
        501 | 505 => "the receiver does not support this request",
        _ => "the receiver failed; a later attempt may succeed",
    }
}

fn is_tower_transient(e: &(dyn StdError + 'static)) -> bool {
    e.is::<tower::timeout::error::Elapsed>()
        || e.is::<tokio::time::error::Elapsed>()
        || e.is::<tower::load_shed::error::Overloaded>()
        || e.is::<tower::buffer::error::Closed>()
        || e.is::<tower::buffer::error::ServiceError>()
}

fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |&e| e.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permanent() -> Error {
        Error::TooLarge { size: 2, limit: 1 }
    }

    #[derive(Debug)]
    struct Wrapper(Error);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_boxed_error_finds_ours_behind_a_wrapper() {
        let err: BoxError = Box::new(Wrapper(permanent()));
        assert!(!err.is_retryable());
    }

    #[test]
    fn an_unknown_error_is_retryable() {
        let err: BoxError = "something odd".into();
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), None);
    }

    #[test]
    fn tower_errors_are_retryable() {
        let errs: Vec<BoxError> = vec![
            tower::timeout::error::Elapsed::new().into(),
            tower::load_shed::error::Overloaded::new().into(),
        ];
        for e in &errs {
            assert!(e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn a_boxed_http_error_carries_its_retry_after() {
        let wait = Some(Duration::from_secs(30));
        let err: BoxError = Box::new(Wrapper(Error::Http {
            url: "https://example.com/hook".into(),
            status: http::StatusCode::SERVICE_UNAVAILABLE,
            retryable: true,
            retry_after: wait,
            body: String::new(),
        }));
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), wait);
    }

    /// A service whose readiness fails with a permanent error.
    struct Broken;
    impl tower::Service<()> for Broken {
        type Response = ();
        type Error = Error;
        type Future = std::future::Ready<Result<(), Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Error>> {
            std::task::Poll::Ready(Err(permanent()))
        }
        fn call(&mut self, _: ()) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_dead_buffer_is_retryable_whatever_killed_it() {
        use tower::{Service, ServiceExt};
        let mut buffer = tower::buffer::Buffer::new(Broken, 1);
        // The buffer's worker meets the failing readiness with the first request.
        buffer.ready().await.expect("the buffer has room");
        let err = buffer
            .call(())
            .await
            .expect_err("the inner service is broken");
        assert!(err.is::<tower::buffer::error::ServiceError>(), "{err}");
        // The event was never tried: a new stack or a queued retry can deliver it.
        assert!(err.is_retryable());
    }

    #[test]
    fn io_errors_are_read_by_kind() {
        let invalid: BoxError = io::Error::new(io::ErrorKind::InvalidInput, "bad").into();
        let denied: BoxError = io::Error::new(io::ErrorKind::PermissionDenied, "no").into();
        assert!(!invalid.is_retryable());
        assert!(denied.is_retryable());
    }

    #[test]
    fn display_says_what_failed_and_what_to_do() {
        let err = Error::InvalidEvent {
            field: "kind",
            value: "../etc".into(),
            problem: "contains a path separator",
        };
        let text = err.to_string();
        assert!(text.contains("\"../etc\""), "{text}");
        assert!(text.contains("contains a path separator"), "{text}");
        assert!(text.contains("not retrying"), "{text}");
    }

    #[test]
    fn display_does_not_repeat_the_source() {
        let source = io::Error::other("disk on fire");
        let errs = [
            Error::Io {
                path: "/tmp/x".into(),
                source: io::Error::other("disk on fire"),
            },
            Error::Transport {
                url: "https://example.com/hook".into(),
                timed_out: false,
                source: Box::new(Wrapper(Error::Io {
                    path: "/tmp/x".into(),
                    source,
                })),
            },
            Error::Serialize(serde_json::from_str::<u8>("\"disk on fire\"").unwrap_err()),
        ];
        for err in errs {
            let text = err.to_string();
            assert!(!text.contains("disk on fire"), "{text}");
            assert!(err.source().is_some(), "{text}");
        }
    }
}
