//! [`RetrySchedule`]: when the queue tries a failed delivery again, and when
//! it gives up.
//!
//! The schedule is the queue's, not the worker's: after a transient failure
//! the next attempt is written into the backend as a new job that becomes
//! due at `now + delay`, so it survives a restart of every process in the
//! meantime. After the last attempt the event becomes a dead letter.
//!
//! ```
//! use std::time::Duration;
//! use eventsink::queue::RetrySchedule;
//!
//! let schedule = RetrySchedule::exponential(Duration::from_secs(1), Duration::from_secs(60), 5);
//! assert_eq!(schedule.max_attempts(), 5);
//! assert_eq!(schedule.delay_after(1, None), Some(Duration::from_secs(1)));
//! assert_eq!(schedule.delay_after(5, None), None); // out of attempts
//! ```

use std::time::Duration;

/// Jitter of the [`standard`](RetrySchedule::standard) schedule: ±20 %, as
/// Svix spreads its retries.
pub const STANDARD_JITTER: f64 = 0.2;

/// Delays between attempts, and how many attempts there are.
///
/// `delay_after(n)` is the wait after failed attempt `n` (counted from 1)
/// before attempt `n + 1`. A receiver's `Retry-After` is honoured but kept
/// between the step and twice the step, so a receiver can neither make the
/// queue hammer it nor park an event for days.
///
/// ```
/// use std::time::Duration;
/// use eventsink::queue::RetrySchedule;
///
/// let schedule = RetrySchedule::fixed([Duration::from_millis(5), Duration::from_millis(10)]);
/// assert_eq!(schedule.max_attempts(), 3);
/// // Retry-After is clamped to [step, 2 × step].
/// let asked = Some(Duration::from_secs(60));
/// assert_eq!(schedule.delay_after(1, asked), Some(Duration::from_millis(10)));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    steps: Vec<Duration>,
    jitter: f64,
}

impl Default for RetrySchedule {
    /// The [`standard`](RetrySchedule::standard) schedule.
    fn default() -> Self {
        Self::standard()
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
        RetrySchedule {
            steps: secs.into_iter().map(Duration::from_secs).collect(),
            jitter: STANDARD_JITTER,
        }
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
        RetrySchedule {
            steps: (1..10u64)
                .map(|n| Duration::from_secs(n * n * 60))
                .collect(),
            jitter: 0.0,
        }
    }

    /// `attempts` attempts in all; the delays double from `min` and stop
    /// growing at `max`. No jitter (add some with
    /// [`jitter`](RetrySchedule::jitter)). `attempts` of 0 counts as 1.
    ///
    /// ```
    /// use std::time::Duration;
    /// let s = eventsink::queue::RetrySchedule::exponential(Duration::from_millis(10), Duration::from_millis(30), 4);
    /// let delays: Vec<_> = (1..4).map(|n| s.delay_after(n, None).unwrap().as_millis()).collect();
    /// assert_eq!(delays, [10, 20, 30]);
    /// ```
    pub fn exponential(min: Duration, max: Duration, attempts: u32) -> Self {
        let mut steps = Vec::new();
        let mut delay = min.min(max);
        for _ in 1..attempts.max(1) {
            steps.push(delay);
            delay = delay.saturating_mul(2).min(max);
        }
        RetrySchedule { steps, jitter: 0.0 }
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
        RetrySchedule {
            steps: delays.into_iter().collect(),
            jitter: 0.0,
        }
    }

    /// Spreads each delay randomly by ± `fraction` (clamped to 0..=1), so
    /// that many events failing together do not retry together.
    ///
    /// ```
    /// use std::time::Duration;
    /// let s = eventsink::queue::RetrySchedule::fixed([Duration::from_secs(10)]).jitter(0.5);
    /// let d = s.delay_after(1, None).unwrap();
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

    /// Attempts in all, the first one included.
    ///
    /// ```
    /// assert_eq!(eventsink::queue::RetrySchedule::go_original().max_attempts(), 10);
    /// ```
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.steps.len())
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }

    /// The wait after failed attempt `attempt` (from 1) before the next one,
    /// or `None` when that was the last attempt. `retry_after` is the
    /// receiver's hint, clamped to between the step and twice the step.
    ///
    /// ```
    /// use std::time::Duration;
    /// let s = eventsink::queue::RetrySchedule::fixed([Duration::from_secs(4)]);
    /// assert_eq!(s.delay_after(1, Some(Duration::from_secs(1))), Some(Duration::from_secs(4)));
    /// assert_eq!(s.delay_after(1, Some(Duration::from_secs(6))), Some(Duration::from_secs(6)));
    /// assert_eq!(s.delay_after(2, None), None);
    /// ```
    pub fn delay_after(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
        let step = *self.steps.get(index)?;
        if let Some(asked) = retry_after {
            return Some(asked.clamp(step, step.saturating_mul(2)));
        }
        if self.jitter == 0.0 {
            return Some(step);
        }
        // A factor in [1 - jitter, 1 + jitter].
        let factor = 1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0);
        Some(step.mul_f64(factor.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let once = RetrySchedule::exponential(Duration::from_secs(1), Duration::from_secs(2), 0);
        assert_eq!(once.max_attempts(), 1);
        assert_eq!(once.delay_after(1, None), None);
    }

    #[test]
    fn retry_after_is_clamped_to_step_and_twice_step() {
        let s = RetrySchedule::fixed([Duration::from_secs(10)]);
        let d = |secs| s.delay_after(1, Some(Duration::from_secs(secs))).unwrap();
        assert_eq!(d(1), Duration::from_secs(10));
        assert_eq!(d(15), Duration::from_secs(15));
        assert_eq!(d(3600), Duration::from_secs(20));
    }

    #[test]
    fn nonsense_jitter_is_ignored_or_clamped() {
        let s = RetrySchedule::fixed([Duration::from_secs(1)]).jitter(f64::NAN);
        assert_eq!(s.delay_after(1, None), Some(Duration::from_secs(1)));
        let s = RetrySchedule::fixed([Duration::from_secs(1)]).jitter(7.0);
        assert!(s.delay_after(1, None).unwrap() <= Duration::from_secs(2));
    }
}
