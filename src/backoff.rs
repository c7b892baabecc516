//! [`Backoff`]: how long to wait between attempts and how many attempts to
//! make, for in-process retries ([`RetryPolicy`](crate::RetryPolicy)) and
//! persisted queue retries (`queue::RetrySchedule`) alike.
//!
//! One description, one piece of arithmetic: the delay before retry `n`
//! (from 0) is the *step* `min × 2ⁿ`, at most `max`, spread by ± `jitter`.
//! A receiver's `Retry-After` follows one rule everywhere (see
//! [`Backoff::delay`]): it can lengthen a wait to twice its step (never past
//! `max`), never shorten it.
//!
//! tower's `ExponentialBackoff` yields `Sleep` futures, not durations, so it
//! cannot compute the due time of a persisted retry; this module keeps the
//! few lines of arithmetic itself so both kinds of retry share them.
//!
//! ```
//! use std::time::Duration;
//! use eventsink::Backoff;
//!
//! let backoff = Backoff::new()
//!     .min(Duration::from_millis(100))
//!     .max(Duration::from_secs(2))
//!     .attempts(4)
//!     .jitter(0.0);
//! assert_eq!(backoff.step(0), Duration::from_millis(100));
//! assert_eq!(backoff.step(3), Duration::from_millis(800));
//! assert_eq!(backoff.step(9), Duration::from_secs(2));
//! // A receiver's Retry-After lengthens the wait, up to twice the step.
//! assert_eq!(backoff.delay(3, Some(Duration::from_secs(1))), Duration::from_millis(1000));
//! assert_eq!(backoff.delay(3, Some(Duration::from_secs(60))), Duration::from_millis(1600));
//! ```

use std::time::Duration;

/// The first step, and the shortest un-jittered delay. 1 s, as Vector's
/// `RETRY_INITIAL_BACKOFF_SECS`.
pub const DEFAULT_MIN: Duration = Duration::from_secs(1);

/// The longest step, and the longest wait a receiver's `Retry-After` can
/// ask for. 30 s, as
/// Vector's `RETRY_MAX_DURATION_SECS`.
pub const DEFAULT_MAX: Duration = Duration::from_secs(30);

/// Attempts in all, the first one included. 5 attempts wait about 1, 2, 4
/// and 8 s between them: about as long as a publisher on a request path
/// should be held; longer outages belong to a durable queue.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// Spread of each delay: ± 50 % of the step, so publishers that failed
/// together retry spread over a whole step's width (AWS's "Exponential
/// Backoff and Jitter" shows that without a spread they fail together
/// again).
pub const DEFAULT_JITTER: f64 = 0.5;

/// Exponential backoff: `min`, `max`, `attempts` and `jitter`.
///
/// The step before retry `n` (from 0) is `min × 2ⁿ`, at most `max` (a `max`
/// below `min` wins). Each delay is the step times a random factor in
/// `[1 − jitter, 1 + jitter]`.
///
/// ```
/// use std::time::Duration;
/// use eventsink::{Backoff, RetryPolicy};
///
/// let backoff = Backoff::new().min(Duration::from_millis(200)).max(Duration::from_secs(5)).attempts(3);
/// let policy = RetryPolicy::new(backoff.clone());
/// # #[cfg(feature = "queue")]
/// let schedule = eventsink::queue::RetrySchedule::exponential(backoff);
/// # let _ = policy;
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Backoff {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    pub(crate) attempts: u32,
    pub(crate) jitter: f64,
}

impl Default for Backoff {
    /// [`DEFAULT_MIN`], [`DEFAULT_MAX`], [`DEFAULT_ATTEMPTS`],
    /// [`DEFAULT_JITTER`].
    fn default() -> Self {
        Backoff {
            min: DEFAULT_MIN,
            max: DEFAULT_MAX,
            attempts: DEFAULT_ATTEMPTS,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl Backoff {
    /// The default backoff, as [`Backoff::default`].
    ///
    /// ```
    /// assert_eq!(eventsink::Backoff::new().step(0), eventsink::backoff::DEFAULT_MIN);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The first step.
    ///
    /// ```
    /// use std::time::Duration;
    /// let backoff = eventsink::Backoff::new().min(Duration::from_millis(50));
    /// assert_eq!(backoff.step(0), Duration::from_millis(50));
    /// ```
    pub fn min(mut self, min: Duration) -> Self {
        self.min = min;
        self
    }

    /// The longest step, and the longest wait a receiver's `Retry-After` can
    /// ask for. A
    /// maximum below the minimum lowers the minimum to it.
    ///
    /// ```
    /// use std::time::Duration;
    /// let backoff = eventsink::Backoff::new().max(Duration::from_secs(10));
    /// assert_eq!(backoff.step(20), Duration::from_secs(10));
    /// ```
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Attempts in all, the first included; `0` and `1` both mean "never
    /// retry".
    ///
    /// ```
    /// let backoff = eventsink::Backoff::new().attempts(3);
    /// assert_eq!(backoff.max_attempts(), 3);
    /// ```
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Spreads each delay randomly by ± `fraction` of its step (clamped to
    /// 0..=1; not a number means 0), so that many events failing together
    /// do not retry together.
    ///
    /// ```
    /// use std::time::Duration;
    /// let backoff = eventsink::Backoff::new().min(Duration::from_secs(10)).jitter(0.5);
    /// let d = backoff.delay(0, None);
    /// assert!(d >= Duration::from_secs(5) && d <= Duration::from_secs(15));
    /// ```
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Attempts in all, the first one included; at least 1.
    ///
    /// ```
    /// assert_eq!(eventsink::Backoff::new().attempts(0).max_attempts(), 1);
    /// ```
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.attempts.max(1)
    }

    /// The un-jittered step before retry number `retry` (from 0): `min ×
    /// 2^retry`, at most `max`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let backoff = eventsink::Backoff::new();
    /// assert_eq!(backoff.step(2), Duration::from_secs(4));
    /// assert_eq!(backoff.step(10), Duration::from_secs(30));
    /// ```
    #[must_use]
    pub fn step(&self, retry: u32) -> Duration {
        let mut step = self.min.min(self.max);
        for _ in 0..retry {
            if step >= self.max || step.is_zero() {
                break;
            }
            step = step.saturating_mul(2);
        }
        step.min(self.max)
    }

    /// The wait before retry number `retry` (from 0): the
    /// [`step`](Self::step), jittered, then the `Retry-After` rule.
    ///
    /// **The `Retry-After` rule**, the same for in-process and queued
    /// retries: wait at least the backoff delay (a `Retry-After: 0` or a
    /// date in the past cannot make every publisher retry at once), and
    /// longer if the receiver asked, but at most twice the step and at most
    /// `max` (a receiver cannot park an event for days, and the whole
    /// series stays within twice its planned length, which is what a
    /// receiver's replay window is sized by).
    ///
    /// ```
    /// use std::time::Duration;
    /// let backoff = eventsink::Backoff::new().jitter(0.0);
    /// let secs = Duration::from_secs;
    /// assert_eq!(backoff.delay(1, None), secs(2));
    /// assert_eq!(backoff.delay(1, Some(secs(0))), secs(2));
    /// assert_eq!(backoff.delay(1, Some(secs(3))), secs(3));
    /// assert_eq!(backoff.delay(1, Some(secs(7))), secs(4));
    /// assert_eq!(backoff.delay(9, Some(secs(3600))), secs(30));
    /// ```
    #[must_use]
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        self.delay_from_step(self.step(retry), retry_after)
    }

    /// [`delay`](Self::delay) for a step given from outside (the fixed
    /// steps of a `RetrySchedule`).
    pub(crate) fn delay_from_step(
        &self,
        step: Duration,
        retry_after: Option<Duration>,
    ) -> Duration {
        let delay = spread(step, self.jitter);
        match retry_after {
            Some(asked) => delay.max(asked.min(self.most_asked(step))),
            None => delay,
        }
    }

    /// The longest wait a `Retry-After` can ask for after `step`.
    fn most_asked(&self, step: Duration) -> Duration {
        step.saturating_mul(2).min(self.max)
    }

    /// The longest [`delay_from_step`](Self::delay_from_step) can be:
    /// `step` at the top of its jitter, or the most a `Retry-After` can ask.
    #[cfg(feature = "queue")]
    pub(crate) fn longest_from_step(&self, step: Duration) -> Duration {
        step.mul_f64(1.0 + self.jitter).max(self.most_asked(step))
    }
}

/// `step` times a random factor in `[1 − jitter, 1 + jitter]`.
fn spread(step: Duration, jitter: f64) -> Duration {
    if jitter == 0.0 {
        return step;
    }
    let factor = 1.0 + jitter * (fastrand::f64() * 2.0 - 1.0);
    Duration::try_from_secs_f64(step.as_secs_f64() * factor.max(0.0)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_from_the_minimum_up_to_the_maximum() {
        let backoff = Backoff::new()
            .min(Duration::from_millis(100))
            .max(Duration::from_secs(1));
        let steps: Vec<_> = (0..6).map(|n| backoff.step(n).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jittered_delays_stay_within_the_spread_and_vary() {
        let backoff = Backoff::new().min(Duration::from_secs(4)).jitter(0.25);
        let delays: Vec<_> = (0..200).map(|_| backoff.delay(0, None)).collect();
        for d in &delays {
            assert!(
                *d >= Duration::from_secs(3) && *d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
        let distinct: std::collections::HashSet<_> = delays.into_iter().collect();
        assert!(distinct.len() > 1);
    }

    #[test]
    fn a_maximum_below_the_minimum_wins() {
        let backoff = Backoff::new()
            .min(Duration::from_secs(10))
            .max(Duration::from_secs(2));
        assert_eq!(backoff.step(0), Duration::from_secs(2));
    }

    #[test]
    fn retry_after_lengthens_up_to_twice_the_step_within_the_maximum_and_never_shortens() {
        let backoff = Backoff::new().jitter(0.0);
        let secs = Duration::from_secs;
        assert_eq!(backoff.delay(2, Some(Duration::ZERO)), secs(4));
        assert_eq!(backoff.delay(2, Some(secs(6))), secs(6));
        assert_eq!(backoff.delay(2, Some(secs(10))), secs(8));
        assert_eq!(backoff.delay(4, Some(secs(86_400))), secs(30));
    }

    #[test]
    fn huge_retry_numbers_and_zero_minimum_do_not_overflow_or_spin() {
        let backoff = Backoff::new().max(Duration::MAX).jitter(1.0);
        assert_eq!(backoff.step(u32::MAX), Duration::MAX);
        assert!(backoff.delay(u32::MAX, None) <= Duration::MAX);
        let zero = Backoff::new().min(Duration::ZERO);
        assert_eq!(zero.step(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn nonsense_jitter_is_ignored_or_clamped() {
        assert_eq!(Backoff::new().jitter(f64::NAN).jitter, 0.0);
        assert_eq!(Backoff::new().jitter(7.0).jitter, 1.0);
    }
}
