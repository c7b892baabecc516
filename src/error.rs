//! The sinks' [`Error`], whether it is worth retrying ([`ErrorKind`]), and
//! [`classify`] for the boxed errors of a whole tower stack.
//!
//! Callers of a sink have one question: *will trying again later help?* Every
//! [`Error`] answers it with [`Error::kind`]. Layers such as
//! [`Timeout`](tower::timeout::Timeout) and [`Buffer`](tower::buffer::Buffer)
//! box their errors, so [`classify`] looks through a [`BoxError`] (and its
//! `source()` chain) and also knows tower's own error types.
//!
//! ```
//! use eventsink::{classify, BoxError, ErrorKind};
//!
//! let timed_out: BoxError = tower::timeout::error::Elapsed::new().into();
//! assert_eq!(classify(&timed_out), ErrorKind::Transient);
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// The boxed error type of tower layers (`Timeout`, `Buffer`, ...).
///
/// ```
/// use eventsink::{BoxError, Error, ErrorKind};
///
/// let boxed: BoxError = Error::Simulated { kind: ErrorKind::Transient, retry_after: None }.into();
/// assert!(boxed.is::<Error>());
/// ```
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Whether a failed delivery can succeed when tried again later.
///
/// ```
/// use eventsink::ErrorKind;
///
/// assert!(ErrorKind::Transient.is_transient());
/// assert!(!ErrorKind::Permanent.is_transient());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Trying again later can help: the receiver was down, slow or busy.
    Transient,
    /// Trying again cannot help: the event or the destination is wrong.
    Permanent,
}

impl ErrorKind {
    /// `true` for [`ErrorKind::Transient`].
    ///
    /// ```
    /// assert!(eventsink::ErrorKind::Transient.is_transient());
    /// ```
    pub fn is_transient(self) -> bool {
        self == ErrorKind::Transient
    }

    fn verdict(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient, retrying later can help",
            ErrorKind::Permanent => "permanent, not retrying",
        }
    }
}

/// Why a sink failed to deliver an event.
///
/// Match on the variant for details, or ask [`Error::kind`] whether a retry
/// can help. The `Display` text says what failed and what to do about it.
///
/// ```
/// use eventsink::{Error, ErrorKind};
///
/// let err = Error::Simulated { kind: ErrorKind::Permanent, retry_after: None };
/// assert_eq!(err.kind(), ErrorKind::Permanent);
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
    /// An HTTP receiver answered with a status outside 2xx. Its kind follows
    /// the status: 3xx, 408, 425, 429 and most 5xx are transient, other 4xx
    /// permanent (a sink may let users override that).
    Http {
        /// The destination, without credentials or query string.
        url: String,
        /// The status code.
        status: u16,
        /// Whether retrying can help, decided from the status.
        kind: ErrorKind,
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
    /// tests of retries and queues.
    Simulated {
        /// The kind of failure to report.
        kind: ErrorKind,
        /// A `Retry-After` hint to carry, as an HTTP receiver would send.
        retry_after: Option<Duration>,
    },
}

impl Error {
    /// Whether retrying later can help.
    ///
    /// ```
    /// use eventsink::{Error, ErrorKind};
    ///
    /// let err = Error::Simulated { kind: ErrorKind::Transient, retry_after: None };
    /// assert!(err.kind().is_transient());
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Serialize(_)
            | Error::InvalidEvent { .. }
            | Error::TooLarge { .. }
            | Error::Refused { .. } => ErrorKind::Permanent,
            Error::Io { source, .. } => io_kind(source),
            Error::Transport { .. } => ErrorKind::Transient,
            Error::Http { kind, .. } | Error::Simulated { kind, .. } => *kind,
        }
    }

    /// How long the receiver asked us to wait before the next attempt, if it
    /// said (an HTTP `Retry-After`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventsink::{Error, ErrorKind};
    ///
    /// let wait = Some(Duration::from_secs(30));
    /// let err = Error::Simulated { kind: ErrorKind::Transient, retry_after: wait };
    /// assert_eq!(err.retry_after(), wait);
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Http { retry_after, .. } | Error::Simulated { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Finds an [`Error`] in `err` or in its chain of `source()`s, as left by
    /// layers that wrap or box errors.
    ///
    /// ```
    /// use eventsink::{BoxError, Error, ErrorKind};
    ///
    /// let boxed: BoxError = Error::Simulated { kind: ErrorKind::Permanent, retry_after: None }.into();
    /// assert!(Error::find(&*boxed).is_some());
    /// ```
    pub fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
        chain(err).find_map(|e| e.downcast_ref::<Error>())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Serialize(e) => write!(
                f,
                "the event could not be serialised to JSON ({e}); fix the payload type's \
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
            Error::Io { path, source } => write!(
                f,
                "file operation on {} failed ({source}); check that the directory exists, \
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
            Error::Transport { url, source, .. } => write!(
                f,
                "webhook {url} could not be reached ({}); check the URL and that the \
                 receiver is up",
                chain_text(&**source)
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
            Error::Simulated { kind, .. } => write!(
                f,
                "simulated {} failure requested with RecordingSink::fail_next",
                match kind {
                    ErrorKind::Transient => "transient",
                    ErrorKind::Permanent => "permanent",
                }
            )?,
        }
        write!(f, " ({})", self.kind().verdict())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Serialize(e) => Some(e),
            Error::Io { source, .. } => Some(source),
            Error::Transport { source, .. } => Some(&**source),
            Error::InvalidEvent { .. }
            | Error::Simulated { .. }
            | Error::Http { .. }
            | Error::TooLarge { .. }
            | Error::Refused { .. } => None,
        }
    }
}

/// Tells whether the error of any sink or stack of layers is worth retrying.
///
/// It walks `err` and its `source()` chain and answers from the first error
/// it recognises:
///
/// - this crate's [`Error`]: its [`kind`](Error::kind);
/// - tower's `timeout::error::Elapsed` and tokio's `time::error::Elapsed`:
///   transient (the next attempt may be faster);
/// - tower's `load_shed::error::Overloaded`: transient;
/// - tower's `buffer::error::Closed` and `buffer::error::ServiceError`:
///   transient (the event itself was fine; that buffer stopped, a new stack
///   or a queued retry can deliver it);
/// - an [`std::io::Error`]: transient unless it says the input is invalid.
///
/// Anything else is transient too: an error we cannot read is no proof that
/// the event is undeliverable, and at-least-once delivery prefers a needless
/// retry to a lost event.
///
/// ```
/// use eventsink::{classify, BoxError, Error, ErrorKind};
///
/// let err: BoxError = Error::Simulated { kind: ErrorKind::Permanent, retry_after: None }.into();
/// assert_eq!(classify(&err), ErrorKind::Permanent);
///
/// let overloaded: BoxError = tower::load_shed::error::Overloaded::new().into();
/// assert_eq!(classify(&overloaded), ErrorKind::Transient);
/// ```
pub fn classify(err: &BoxError) -> ErrorKind {
    classify_dyn(&**err)
}

/// [`classify`] for a borrowed `dyn Error`.
pub(crate) fn classify_dyn(err: &(dyn StdError + 'static)) -> ErrorKind {
    for e in chain(err) {
        if let Some(ours) = e.downcast_ref::<Error>() {
            return ours.kind();
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return io_kind(io);
        }
        if is_tower_transient(e) {
            return ErrorKind::Transient;
        }
    }
    ErrorKind::Transient
}

/// The `Retry-After` hint carried anywhere in a boxed error's chain.
pub(crate) fn retry_after_dyn(err: &(dyn StdError + 'static)) -> Option<Duration> {
    Error::find(err).and_then(Error::retry_after)
}

/// What an HTTP status usually means for the sender, in a few words.
fn status_advice(status: u16) -> &'static str {
    match status {
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

/// An error and its sources, joined with ": ".
fn chain_text(err: &(dyn StdError + 'static)) -> String {
    let parts: Vec<String> = chain(err).map(ToString::to_string).collect();
    parts.join(": ")
}

fn is_tower_transient(e: &(dyn StdError + 'static)) -> bool {
    e.is::<tower::timeout::error::Elapsed>()
        || e.is::<tokio::time::error::Elapsed>()
        || e.is::<tower::load_shed::error::Overloaded>()
        || e.is::<tower::buffer::error::Closed>()
        || e.is::<tower::buffer::error::ServiceError>()
}

fn io_kind(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::InvalidInput
        | io::ErrorKind::InvalidData
        | io::ErrorKind::InvalidFilename => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
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
        Error::Simulated {
            kind: ErrorKind::Permanent,
            retry_after: None,
        }
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
    fn classify_finds_our_error_behind_a_wrapper() {
        let err: BoxError = Box::new(Wrapper(permanent()));
        assert_eq!(classify(&err), ErrorKind::Permanent);
    }

    #[test]
    fn tower_errors_are_transient() {
        let errs: Vec<BoxError> = vec![
            tower::timeout::error::Elapsed::new().into(),
            tower::load_shed::error::Overloaded::new().into(),
        ];
        for e in &errs {
            assert_eq!(classify(e), ErrorKind::Transient, "{e}");
        }
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
    async fn a_dead_buffer_is_transient_whatever_killed_it() {
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
        assert_eq!(classify(&err), ErrorKind::Transient);
    }

    #[test]
    fn io_errors_classify_by_kind() {
        let invalid: BoxError = io::Error::new(io::ErrorKind::InvalidInput, "bad").into();
        let denied: BoxError = io::Error::new(io::ErrorKind::PermissionDenied, "no").into();
        assert_eq!(classify(&invalid), ErrorKind::Permanent);
        assert_eq!(classify(&denied), ErrorKind::Transient);
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
}
