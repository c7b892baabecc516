//! [`Clock`]: where the layer reads "now", so tests can set it.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The source of the current time for the timestamp tolerance check and the
/// in-memory replay guard's expiry.
///
/// [`Clock::system`] (the default) reads the system clock. Tests inject
/// their own with [`Clock::from_fn`] or [`Clock::fixed`], so a timestamp
/// "301 seconds old" is a value, not a wait.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicI64, Ordering};
/// use chrono::{TimeZone, Utc};
/// use eventsink::verify::Clock;
///
/// let now = Arc::new(AtomicI64::new(1_700_000_000));
/// let clock = Clock::from_fn({
///     let now = Arc::clone(&now);
///     move || Utc.timestamp_opt(now.load(Ordering::SeqCst), 0).single().unwrap_or_default()
/// });
/// assert_eq!(clock.now().timestamp(), 1_700_000_000);
/// now.fetch_add(301, Ordering::SeqCst);
/// assert_eq!(clock.now().timestamp(), 1_700_000_301);
/// ```
#[derive(Clone)]
pub struct Clock {
    now: Option<Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>>,
}

impl Clock {
    /// The system clock.
    ///
    /// ```
    /// let clock = eventsink::verify::Clock::system();
    /// assert!(clock.now().timestamp() > 1_600_000_000);
    /// ```
    pub fn system() -> Self {
        Clock { now: None }
    }

    /// A clock that calls `now` whenever it needs the time.
    ///
    /// ```
    /// use chrono::Utc;
    /// let clock = eventsink::verify::Clock::from_fn(Utc::now);
    /// assert!(clock.now() <= Utc::now());
    /// ```
    pub fn from_fn(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Clock {
            now: Some(Arc::new(now)),
        }
    }

    /// A clock that is always at `at`.
    ///
    /// ```
    /// use chrono::{TimeZone, Utc};
    /// let at = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    /// assert_eq!(eventsink::verify::Clock::fixed(at).now(), at);
    /// ```
    pub fn fixed(at: DateTime<Utc>) -> Self {
        Clock::from_fn(move || at)
    }

    /// The current time by this clock.
    ///
    /// ```
    /// let now = eventsink::verify::Clock::default().now();
    /// assert!(now.timestamp() > 0);
    /// ```
    pub fn now(&self) -> DateTime<Utc> {
        match &self.now {
            Some(now) => now(),
            None => Utc::now(),
        }
    }
}

impl Default for Clock {
    /// [`Clock::system`].
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.now {
            Some(_) => f.write_str("Clock(custom)"),
            None => f.write_str("Clock(system)"),
        }
    }
}
