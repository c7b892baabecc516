//! The fan-out's errors: [`FanOutError`] when publishing, [`BuildError`]
//! when building.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::kinds::InvalidPattern;
use crate::{BoxError, Retryable};

/// Why a [`FanOut`](super::FanOut) publish failed.
///
/// ```
/// use eventsink::fanout::FanOut;
/// use eventsink::{Event, NoopSink, SinkExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let mut fanout = FanOut::builder()
///     .to_kinds("billing", ["invoice.*"], NoopSink::new())
///     .reject_unmatched()
///     .build()?;
/// let err = fanout.publish(Event::new("user.signed_up", ())).await.unwrap_err();
/// assert!(err.to_string().contains("\"user.signed_up\""));
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum FanOutError {
    /// One or more destinations failed; the others took the event.
    Failed {
        /// Each failed destination with its error, in the order the
        /// destinations were added.
        failures: Vec<Failure>,
        /// The destinations that took the event.
        succeeded: Vec<Arc<str>>,
    },
    /// No destination takes the event's kind, and the fan-out was built
    /// with [`reject_unmatched`](super::FanOutBuilder::reject_unmatched).
    /// Permanent.
    Unrouted {
        /// The event's kind.
        kind: Arc<str>,
    },
}

impl FanOutError {
    /// The names of the destinations that failed.
    ///
    /// ```
    /// # let err = eventsink::fanout::FanOutError::Unrouted { kind: "k".into() };
    /// let failed: Vec<&str> = err.failed().collect();
    /// # assert!(failed.is_empty());
    /// ```
    pub fn failed(&self) -> impl Iterator<Item = &str> {
        self.failures().iter().map(Failure::destination)
    }

    /// The names of the destinations that took the event (none when
    /// [`Unrouted`](FanOutError::Unrouted)).
    ///
    /// ```
    /// # let err = eventsink::fanout::FanOutError::Unrouted { kind: "k".into() };
    /// assert_eq!(err.succeeded().count(), 0);
    /// ```
    pub fn succeeded(&self) -> impl Iterator<Item = &str> {
        let names: &[Arc<str>] = match self {
            FanOutError::Failed { succeeded, .. } => succeeded,
            FanOutError::Unrouted { .. } => &[],
        };
        names.iter().map(|name| &**name)
    }

    /// Each failed destination with its error.
    ///
    /// ```
    /// # let err = eventsink::fanout::FanOutError::Unrouted { kind: "k".into() };
    /// for failure in err.failures() {
    ///     eprintln!("{}: {}", failure.destination(), failure.error());
    /// }
    /// ```
    pub fn failures(&self) -> &[Failure] {
        match self {
            FanOutError::Failed { failures, .. } => failures,
            FanOutError::Unrouted { .. } => &[],
        }
    }
}

/// Retryable when every failed destination's error is: a retry of a
/// permanent failure cannot help, and the caller retries the whole event.
impl Retryable for FanOutError {
    fn is_retryable(&self) -> bool {
        match self {
            FanOutError::Failed { failures, .. } => failures.iter().all(|f| f.error.is_retryable()),
            FanOutError::Unrouted { .. } => false,
        }
    }

    /// The longest wait any failed destination asked for.
    fn retry_after(&self) -> Option<Duration> {
        self.failures()
            .iter()
            .filter_map(|f| f.error.retry_after())
            .max()
    }
}

impl fmt::Display for FanOutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FanOutError::Failed {
                failures,
                succeeded,
            } => {
                let total = failures.len() + succeeded.len();
                write!(f, "{} of {total} destinations failed: ", failures.len())?;
                for (n, failure) in failures.iter().enumerate() {
                    let sep = if n == 0 { "" } else { "; " };
                    write!(f, "{sep}{}: {}", failure.destination, failure.error)?;
                }
                if !succeeded.is_empty() {
                    f.write_str("; took it: ")?;
                    for (n, name) in succeeded.iter().enumerate() {
                        write!(f, "{}{name}", if n == 0 { "" } else { ", " })?;
                    }
                }
                f.write_str(
                    "; to retry, publish the event again with the same id \
                     (receivers deduplicate by id)",
                )
            }
            FanOutError::Unrouted { kind } => write!(
                f,
                "no destination takes events of kind {kind:?} and unmatched events are \
                 rejected; subscribe a destination to it or add one with `unmatched_to` \
                 (permanent, not retrying)"
            ),
        }
    }
}

/// The failures are named in `Display`, with their messages; each one's
/// error is on [`FanOutError::failures`].
impl StdError for FanOutError {}

/// One destination's failure in a [`FanOutError`].
///
/// ```
/// # let err = eventsink::fanout::FanOutError::Unrouted { kind: "k".into() };
/// if let Some(first) = err.failures().first() {
///     println!("{} failed: {}", first.destination(), first.error());
/// }
/// ```
#[derive(Debug)]
pub struct Failure {
    destination: Arc<str>,
    /// The destination's place in the fan-out, to list failures in order.
    pub(super) index: usize,
    error: BoxError,
}

impl Failure {
    /// The failure of destination number `index` of `names`.
    pub(super) fn new(names: &[Arc<str>], index: usize, error: BoxError) -> Self {
        Failure {
            destination: Arc::clone(&names[index]),
            index,
            error,
        }
    }

    /// The destination's name.
    ///
    /// ```
    /// # let err = eventsink::fanout::FanOutError::Unrouted { kind: "k".into() };
    /// let names: Vec<&str> = err.failures().iter().map(|f| f.destination()).collect();
    /// # assert!(names.is_empty());
    /// ```
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The destination's error (ask it [`Retryable`]).
    ///
    /// ```
    /// use eventsink::Retryable;
    /// # let err = eventsink::fanout::FanOutError::Unrouted { kind: "k".into() };
    /// let transient = err.failures().iter().filter(|f| f.error().is_retryable()).count();
    /// # assert_eq!(transient, 0);
    /// ```
    pub fn error(&self) -> &BoxError {
        &self.error
    }
}

/// A destination was called before it answered `poll_ready` with
/// `Ready`: a caller of the fan-out skipped `poll_ready` (use
/// `SinkExt::publish` or `ServiceExt::ready`). The event was not sent
/// there.
#[derive(Debug)]
pub(super) struct NotReady;

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the fan-out was called before poll_ready answered Ready, so this destination \
             was not called; publish with SinkExt::publish or after ServiceExt::ready",
        )
    }
}

impl StdError for NotReady {}

/// Why [`FanOutBuilder::build`](super::FanOutBuilder::build) refused a
/// configuration.
///
/// ```
/// use eventsink::fanout::{BuildError, FanOut};
/// use eventsink::NoopSink;
///
/// let err = FanOut::builder()
///     .to_kinds("billing", ["invoice.*.paid"], NoopSink::new())
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, BuildError::Pattern { .. }));
/// assert!(err.to_string().contains("billing"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// A destination's kind pattern is invalid.
    Pattern {
        /// The destination.
        destination: Arc<str>,
        /// The pattern and its problem.
        source: InvalidPattern,
    },
    /// Two destinations have the same name.
    DuplicateName {
        /// The name.
        destination: Arc<str>,
    },
    /// A destination's name is empty.
    EmptyName,
    /// A destination subscribes to no kind at all.
    NoKinds {
        /// The destination.
        destination: Arc<str>,
    },
    /// The destination for unmatched events can never get one: another
    /// destination takes every kind.
    UnreachableFallback {
        /// The destination for unmatched events.
        fallback: Arc<str>,
        /// The destination that takes every kind.
        takes_all: Arc<str>,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Pattern { destination, .. } => {
                write!(f, "destination {destination:?} has an invalid kind pattern")
            }
            BuildError::DuplicateName { destination } => write!(
                f,
                "two destinations are named {destination:?}; give each a name of its own \
                 (errors report destinations by name)"
            ),
            BuildError::EmptyName => f.write_str("a destination has an empty name; name it"),
            BuildError::NoKinds { destination } => write!(
                f,
                "destination {destination:?} subscribes to no kind, so it would get nothing; \
                 list its kinds, or add it with `to` to send it every event"
            ),
            BuildError::UnreachableFallback {
                fallback,
                takes_all,
            } => write!(
                f,
                "destination {fallback:?} for unmatched events would never get one: \
                 {takes_all:?} takes every kind; subscribe {takes_all:?} to kinds, or drop \
                 the destination for unmatched events"
            ),
        }
    }
}

impl StdError for BuildError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            BuildError::Pattern { source, .. } => Some(source),
            _ => None,
        }
    }
}
