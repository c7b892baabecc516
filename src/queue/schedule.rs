//! [`RetrySchedule`]: when the queue tries a failed delivery again, and when
//! it gives up.
//!
//! The schedule is the queue's, not the worker's: after a transient failure
//! the next attempt is written into the backend as a new job that becomes
//! due at `now + delay`, so it survives a restart of every process in the
//! meantime. After the last attempt the event becomes a dead letter.
//!
//! It is described by the same [`Backoff`] as the in-process
//! [`RetryPolicy`](crate::RetryPolicy), or by a fixed list of steps, and
//! follows the same `Retry-After` rule (see [`Backoff::delay`]).
//!
//! ```
//! use std::time::Duration;
//! use eventsink::Backoff;
//! use eventsink::queue::RetrySchedule;
//!
//! let backoff = Backoff::new().min(Duration::from_secs(1)).max(Duration::from_secs(60)).attempts(5).jitter(0.0);
//! let schedule = RetrySchedule::exponential(backoff);
//! assert_eq!(schedule.max_attempts(), 5);
//! assert_eq!(schedule.delay_after(1, None), Some(Duration::from_secs(1)));
//! assert_eq!(schedule.delay_after(5, None), None); // out of attempts
//! ```

use std::time::Duration;

use crate::Backoff;

/// Jitter of the [`standard`](RetrySchedule::standard) schedule: ±20 %, as
/// Svix spreads its retries.
pub const STANDARD_JITTER: f64 = 0.2;

/// Delays between attempts, and how many attempts there are.
///
/// `delay_after(n)` is the wait after failed attempt `n` (counted from 1)
/// before attempt `n + 1`. A receiver's `Retry-After` follows
/// [`Backoff`]'s rule: it lengthens the wait up to twice its step and at
/// most the longest step, never shortens it, so a receiver can neither make
/// the queue hammer it nor park an event for days.
///
/// ```
/// use std::time::Duration;
/// use eventsink::queue::RetrySchedule;
///
/// let schedule = RetrySchedule::fixed([Duration::from_millis(5), Duration::from_millis(10)]);
/// assert_eq!(schedule.max_attempts(), 3);
/// // Retry-After lengthens the wait up to twice the step, within the longest.
/// let asked = Some(Duration::from_secs(60));
/// assert_eq!(schedule.delay_after(1, asked), Some(Duration::from_millis(10)));
/// assert_eq!(schedule.delay_after(2, asked), Some(Duration::from_millis(10)));
/// assert_eq!(schedule.delay_after(3, asked), None);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct RetrySchedule {
    backoff: Backoff,
    /// Steps given one by one; `None` for doubling steps of `backoff`.
    steps: Option<Vec<Duration>>,
}

impl Default for RetrySchedule {
    /// The [`standard`](RetrySchedule::standard) schedule.
    fn default() -> Self {
        Self::standard()
    }
}

impl From<Backoff> for RetrySchedule {
    /// [`RetrySchedule::exponential`].
    fn from(backoff: Backoff) -> Self {
        Self::exponential(backoff)
    }
}

impl RetrySchedule {
    /// Svix's schedule, which Standard Webhooks follows: retries after 5 s,
    /// 5 min, 30 min, 2 h, 5 h, 10 h and 10 h (8 attempts over about 28
    /// hours), each ±20 % ([`STANDARD_JITTER`]).
    ///
    /// ```
    /// let schedule = eventsink::queue::RetrySchedule::standard();
    /// assert_eq!(schedule.max_attempts(), 8);
    /// ```
    pub fn standard() -> Self {
        const MIN: u64 = 60;
        const HOUR: u64 = 3600;
        let secs = [
            5,
            5 * MIN,
            30 * MIN,
            2 * HOUR,
            5 * HOUR,
            10 * HOUR,
            10 * HOUR,
        ];
        Self::fixed(secs.into_iter().map(Duration::from_secs)).jitter(STANDARD_JITTER)
    }

    /// The Go original's schedule: 10 attempts, the `n`-th failure waits
    /// `n²` minutes (1, 4, 9, … 81 min), no jitter.
    ///
    /// ```
    /// use std::time::Duration;
    /// let schedule = eventsink::queue::RetrySchedule::go_original();
    /// assert_eq!(schedule.max_attempts(), 10);
    /// assert_eq!(schedule.delay_after(3, None), Some(Duration::from_secs(9 * 60)));
    /// ```
    pub fn go_original() -> Self {
        Self::fixed((1..10u64).map(|n| Duration::from_secs(n * n * 60)))
    }

    /// The steps of `backoff`: `backoff.attempts` attempts in all, the
    /// delays doubling from `min` up to `max`, spread by its jitter.
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventsink::{Backoff, queue::RetrySchedule};
    ///
    /// let ms = Duration::from_millis;
    /// let s = RetrySchedule::exponential(Backoff::new().min(ms(10)).max(ms(30)).attempts(4).jitter(0.0));
    /// let delays: Vec<_> = (1..4).map(|n| s.delay_after(n, None).unwrap().as_millis()).collect();
    /// assert_eq!(delays, [10, 20, 30]);
    /// ```
    pub fn exponential(backoff: Backoff) -> Self {
        RetrySchedule {
            backoff,
            steps: None,
        }
    }

    /// Exactly these delays, no jitter: one attempt more than delays. For
    /// tests (milliseconds) and hand-made schedules.
    ///
    /// ```
    /// use std::time::Duration;
    /// let s = eventsink::queue::RetrySchedule::fixed([Duration::from_millis(1)]);
    /// assert_eq!(s.max_attempts(), 2);
    /// ```
    pub fn fixed(delays: impl IntoIterator<Item = Duration>) -> Self {
        let steps: Vec<Duration> = delays.into_iter().collect();
        let attempts = u32::try_from(steps.len())
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1);
        let backoff = Backoff::new()
            .min(steps.first().copied().unwrap_or_default())
            .max(steps.iter().copied().max().unwrap_or_default())
            .attempts(attempts)
            .jitter(0.0);
        RetrySchedule {
            backoff,
            steps: Some(steps),
        }
    }

    /// Spreads each delay randomly by ± `fraction` (clamped to 0..=1), as
    /// [`Backoff::jitter`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let s = eventsink::queue::RetrySchedule::fixed([Duration::from_secs(10)]).jitter(0.5);
    /// let d = s.delay_after(1, None).unwrap();
    /// assert!(d >= Duration::from_secs(5) && d <= Duration::from_secs(15));
    /// ```
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.backoff = self.backoff.jitter(fraction);
        self
    }

    /// Attempts in all, the first one included.
    ///
    /// ```
    /// assert_eq!(eventsink::queue::RetrySchedule::go_original().max_attempts(), 10);
    /// ```
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.backoff.max_attempts()
    }

    /// The wait after failed attempt `attempt` (from 1) before the next one,
    /// or `None` when that was the last attempt. `retry_after` is the
    /// receiver's hint, applied by [`Backoff::delay`]'s rule: at least the
    /// step, at most twice the step and the longest step.
    ///
    /// ```
    /// use std::time::Duration;
    /// let secs = Duration::from_secs;
    /// let s = eventsink::queue::RetrySchedule::fixed([secs(4), secs(8)]);
    /// assert_eq!(s.delay_after(1, Some(secs(1))), Some(secs(4)));
    /// assert_eq!(s.delay_after(1, Some(secs(6))), Some(secs(6)));
    /// assert_eq!(s.delay_after(1, Some(secs(60))), Some(secs(8)));
    /// assert_eq!(s.delay_after(3, None), None);
    /// ```
    #[must_use]
    pub fn delay_after(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        let retry = attempt.checked_sub(1)?;
        if attempt >= self.max_attempts() {
            return None;
        }
        Some(self.backoff.delay_from_step(self.step(retry)?, retry_after))
    }

    /// The longest the waits of one delivery chain can add up to: every
    /// step at the top of its jitter, or stretched by a receiver's
    /// `Retry-After` as far as the rule lets it, whichever is longer.
    /// Size a receiver's replay window by it (plus the attempts'
    /// timeouts): `verify::DEFAULT_REPLAY_TTL` is sized by the standard
    /// schedule's.
    ///
    /// ```
    /// use std::time::Duration;
    /// let secs = Duration::from_secs;
    /// let s = eventsink::queue::RetrySchedule::fixed([secs(4), secs(8)]);
    /// assert_eq!(s.longest_span(), secs(8 + 8));
    /// ```
    #[must_use]
    pub fn longest_span(&self) -> Duration {
        (0..self.max_attempts() - 1)
            .filter_map(|retry| self.step(retry))
            .map(|step| self.backoff.longest_from_step(step))
            .fold(Duration::ZERO, Duration::saturating_add)
    }

    /// The step before retry `retry` (from 0), if there is one.
    fn step(&self, retry: u32) -> Option<Duration> {
        match &self.steps {
            Some(steps) => steps.get(usize::try_from(retry).ok()?).copied(),
            None => Some(self.backoff.step(retry)),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_schedules_longest_span_is_39_hours_10_minutes() {
        // The five short steps at twice their length (a Retry-After), the
        // two 10 h steps at +20 % (jitter; a Retry-After stops at 10 h).
        let short = 2 * (5 + 300 + 1800 + 7200 + 18_000);
        let long = 2 * 43_200;
        let span = RetrySchedule::standard().longest_span();
        assert_eq!(span, Duration::from_secs(short + long));
        assert_eq!(span.as_secs(), 39 * 3600 + 10 * 60 + 10);
    }

    #[test]
    fn standard_is_svix_with_twenty_percent_jitter() {
        let s = RetrySchedule::standard();
        let want = [5, 300, 1800, 7200, 18000, 36000, 36000];
        for (i, secs) in want.into_iter().enumerate() {
            let d = s.delay_after(i as u32 + 1, None).unwrap().as_secs_f64();
            let secs = secs as f64;
            assert!(d >= secs * 0.8 - 1e-9 && d <= secs * 1.2 + 1e-9, "{i}: {d}");
        }
        assert_eq!(s.delay_after(8, None), None);
    }

    #[test]
    fn go_original_waits_failures_squared_minutes() {
        let s = RetrySchedule::go_original();
        for n in 1..10u32 {
            assert_eq!(
                s.delay_after(n, None),
                Some(Duration::from_secs(u64::from(n * n) * 60))
            );
        }
        assert_eq!(s.delay_after(10, None), None);
    }

    #[test]
    fn attempt_zero_and_single_attempt_schedules_have_no_delay() {
        assert_eq!(RetrySchedule::standard().delay_after(0, None), None);
        let once = RetrySchedule::exponential(Backoff::new().attempts(0));
        assert_eq!(once.max_attempts(), 1);
        assert_eq!(once.delay_after(1, None), None);
    }

    #[test]
    fn retry_after_is_kept_between_the_step_and_twice_the_step_within_the_longest() {
        let s = RetrySchedule::fixed([
            Duration::from_secs(10),
            Duration::from_secs(40),
            Duration::from_secs(30),
        ]);
        let d = |attempt, secs| {
            s.delay_after(attempt, Some(Duration::from_secs(secs)))
                .unwrap()
        };
        assert_eq!(d(1, 1), Duration::from_secs(10));
        assert_eq!(d(1, 15), Duration::from_secs(15));
        assert_eq!(d(1, 3600), Duration::from_secs(20));
        assert_eq!(d(3, 3600), Duration::from_secs(40));
        assert_eq!(d(2, 3600), Duration::from_secs(40));
    }

    #[test]
    fn exponential_stops_after_its_attempts() {
        let backoff = Backoff::new()
            .min(Duration::from_secs(1))
            .attempts(3)
            .jitter(0.0);
        let s = RetrySchedule::from(backoff);
        assert_eq!(s.delay_after(1, None), Some(Duration::from_secs(1)));
        assert_eq!(s.delay_after(2, None), Some(Duration::from_secs(2)));
        assert_eq!(s.delay_after(3, None), None);
    }

    #[test]
    fn nonsense_jitter_is_ignored_or_clamped() {
        let s = RetrySchedule::fixed([Duration::from_secs(1)]).jitter(f64::NAN);
        assert_eq!(s.delay_after(1, None), Some(Duration::from_secs(1)));
        let s = RetrySchedule::fixed([Duration::from_secs(1)]).jitter(7.0);
        assert!(s.delay_after(1, None).unwrap() <= Duration::from_secs(2));
    }
}
