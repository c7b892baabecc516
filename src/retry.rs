//! [`RetryPolicy`]: a `tower::retry::Policy` for sinks — transient errors
//! only, exponential backoff with full jitter, an attempt limit, an optional
//! retry budget, and the receiver's `Retry-After` honoured.
//!
//! Put the per-attempt timeout *inside* the retry layer, so that a slow
//! attempt is cut off and tried again, and a buffer outside it, so the whole
//! stack is `Clone` and shared by every publisher:
//!
//! ```
//! use std::time::Duration;
//! use eventsink::{Event, RecordingSink, RetryPolicy, SinkExt};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! let recorder = RecordingSink::new();
//! let mut sink = ServiceBuilder::new()
//!     .buffer(1024)
//!     .retry(RetryPolicy::default())
//!     .timeout(Duration::from_secs(15))
//!     .service(recorder.clone());
//! sink.publish(Event::new("user.signed_up", serde_json::json!({"user_id": 1}))).await?;
//! assert_eq!(recorder.events().len(), 1);
//! # Ok(()) }
//! ```
//!
//! In-process retries hold the publisher until they end, so they suit short
//! outages (seconds). For receivers that are down for an hour, put the sink
//! behind a durable queue, whose retry schedule is persisted.

use std::sync::Arc;
use std::time::Duration;

use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::error::{classify_dyn, retry_after_dyn};
use crate::{BoxError, Error, ErrorKind, Event};

/// Delay before the first retry, and the floor of every delay. 1 s, as
/// Vector's `RETRY_INITIAL_BACKOFF_SECS`.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_secs(1);

/// Ceiling of any delay, including one a receiver asks for with
/// `Retry-After`. 30 s, as Vector's `RETRY_MAX_DURATION_SECS`.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Attempts in all, the first one included. 5 attempts wait up to 2, 4, 8
/// and 16 s between them: about as long as a publisher on a request path
/// should be held; longer outages belong to a durable queue.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// Retries transient failures of a sink with capped, jittered exponential
/// backoff. Permanent failures are returned at once.
///
/// Retry number `n` (from 0) waits a random time between the minimum and
/// `min(max, min × 2ⁿ⁺¹)` ("full jitter" above a floor, so that many
/// publishers retrying together spread out). An error that carries a
/// `Retry-After` waits that long instead, kept between the minimum and the
/// maximum: `Retry-After: 0` or a date in the past waits the minimum.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use eventsink::RetryPolicy;
/// use tower::retry::budget::TpsBudget;
///
/// let policy = RetryPolicy::new()
///     .min_backoff(Duration::from_millis(200))
///     .max_backoff(Duration::from_secs(5))
///     .max_attempts(3)
///     .budget(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)));
/// # let _ = policy;
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    min_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
    budget: Option<Arc<TpsBudget>>,
    /// Retries made so far for the current request. tower clones the policy
    /// for every request, so this count is per request.
    retries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            budget: None,
            retries: 0,
        }
    }
}

impl RetryPolicy {
    /// The default policy: [`DEFAULT_MIN_BACKOFF`], [`DEFAULT_MAX_BACKOFF`],
    /// [`DEFAULT_MAX_ATTEMPTS`], no budget.
    ///
    /// ```
    /// let policy = eventsink::RetryPolicy::new();
    /// # let _ = policy;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The shortest delay between attempts.
    ///
    /// ```
    /// let policy = eventsink::RetryPolicy::new().min_backoff(std::time::Duration::from_millis(50));
    /// # let _ = policy;
    /// ```
    pub fn min_backoff(mut self, min: Duration) -> Self {
        self.min_backoff = min;
        self
    }

    /// The longest delay between attempts, also the cap on `Retry-After`.
    /// A maximum below the minimum lowers the minimum to it.
    ///
    /// ```
    /// let policy = eventsink::RetryPolicy::new().max_backoff(std::time::Duration::from_secs(10));
    /// # let _ = policy;
    /// ```
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Attempts in all, the first included; `0` and `1` both mean "never
    /// retry".
    ///
    /// ```
    /// let policy = eventsink::RetryPolicy::new().max_attempts(3);
    /// # let _ = policy;
    /// ```
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Shares a retry budget with other stacks: successes deposit into it,
    /// every retry withdraws, and when it is empty failures are returned
    /// without retrying, so an outage does not multiply the load on the
    /// receiver.
    ///
    /// ```
    /// use std::{sync::Arc, time::Duration};
    /// use tower::retry::budget::TpsBudget;
    ///
    /// let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
    /// let policy = eventsink::RetryPolicy::new().budget(budget);
    /// # let _ = policy;
    /// ```
    pub fn budget(mut self, budget: Arc<TpsBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The delay before retry number `retry` (from 0), ignoring any
    /// `Retry-After`: a random duration within [`backoff_range`](Self::backoff_range).
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = eventsink::RetryPolicy::new();
    /// let delay = policy.backoff(0);
    /// assert!(delay >= Duration::from_secs(1) && delay <= Duration::from_secs(2));
    /// ```
    pub fn backoff(&self, retry: u32) -> Duration {
        let (low, high) = self.backoff_range(retry);
        let spread = high.saturating_sub(low).as_nanos().min(u64::MAX as u128) as u64;
        low + Duration::from_nanos(fastrand::u64(0..=spread))
    }

    /// The bounds of the delay before retry number `retry` (from 0):
    /// `(min, min(max, min × 2ⁿ⁺¹))`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = eventsink::RetryPolicy::new();
    /// assert_eq!(policy.backoff_range(2), (Duration::from_secs(1), Duration::from_secs(8)));
    /// assert_eq!(policy.backoff_range(10), (Duration::from_secs(1), Duration::from_secs(30)));
    /// ```
    pub fn backoff_range(&self, retry: u32) -> (Duration, Duration) {
        let cap = self.max_backoff;
        let low = self.min_backoff.min(cap);
        let factor = 2u32.saturating_pow(retry.saturating_add(1));
        let high = low.checked_mul(factor).unwrap_or(cap).min(cap);
        (low, high)
    }

    /// The delay for a receiver's `Retry-After`: what it asked, but never
    /// less than the minimum (`Retry-After: 0` or a date in the past must
    /// not make every publisher retry at once) nor more than the maximum.
    fn honour_retry_after(&self, asked: Duration) -> Duration {
        let (floor, _) = self.backoff_range(0);
        asked.max(floor).min(self.max_backoff)
    }

    /// Decides on one failed or successful attempt; shared by the `Policy`
    /// implementations for each error type.
    fn decide(
        &mut self,
        outcome: Result<(), &(dyn std::error::Error + 'static)>,
        id: &str,
    ) -> Option<tokio::time::Sleep> {
        let error = match outcome {
            Ok(()) => {
                if let Some(budget) = &self.budget {
                    budget.deposit();
                }
                return None;
            }
            Err(error) => error,
        };
        if classify_dyn(error) == ErrorKind::Permanent || self.retries + 1 >= self.max_attempts {
            return None;
        }
        if let Some(budget) = &self.budget
            && !budget.withdraw()
        {
            tracing::debug!(
                event.id = id,
                "retry budget exhausted; not retrying: {error}"
            );
            return None;
        }
        let delay = match retry_after_dyn(error) {
            Some(asked) => self.honour_retry_after(asked),
            None => self.backoff(self.retries),
        };
        self.retries += 1;
        tracing::debug!(
            event.id = id,
            attempt = self.retries + 1,
            ?delay,
            "retrying after: {error}"
        );
        Some(tokio::time::sleep(delay))
    }
}

impl<P, Res> Policy<Event<P>, Res, BoxError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Event<P>,
        result: &mut Result<Res, BoxError>,
    ) -> Option<Self::Future> {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err(e) => Err(&**e as &(dyn std::error::Error + 'static)),
        };
        self.decide(outcome, &req.id)
    }

    fn clone_request(&mut self, req: &Event<P>) -> Option<Event<P>> {
        Some(req.clone())
    }
}

impl<P, Res> Policy<Event<P>, Res, Error> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Event<P>,
        result: &mut Result<Res, Error>,
    ) -> Option<Self::Future> {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err(e) => Err(e as &(dyn std::error::Error + 'static)),
        };
        self.decide(outcome, &req.id)
    }

    fn clone_request(&mut self, req: &Event<P>) -> Option<Event<P>> {
        Some(req.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_range_and_grows_to_the_cap() {
        let policy = RetryPolicy::new()
            .min_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(1));
        let expected_high = [200, 400, 800, 1000, 1000];
        for (retry, high) in expected_high.into_iter().enumerate() {
            let range = policy.backoff_range(retry as u32);
            assert_eq!(
                range,
                (Duration::from_millis(100), Duration::from_millis(high))
            );
            for _ in 0..100 {
                let d = policy.backoff(retry as u32);
                assert!(d >= range.0 && d <= range.1, "{d:?} outside {range:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let policy = RetryPolicy::new();
        let delays: std::collections::HashSet<_> = (0..20).map(|_| policy.backoff(3)).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn a_maximum_below_the_minimum_wins() {
        let policy = RetryPolicy::new()
            .min_backoff(Duration::from_secs(10))
            .max_backoff(Duration::from_secs(2));
        assert_eq!(
            policy.backoff_range(0),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
    }

    /// The delay `policy` picks after a transient error that asked for
    /// `retry_after`.
    fn delay_after(policy: &RetryPolicy, retry_after: Option<Duration>) -> Duration {
        let err = Error::Simulated {
            kind: ErrorKind::Transient,
            retry_after,
        };
        let start = tokio::time::Instant::now();
        let sleep = policy
            .clone()
            .decide(Err(&err), "evt_1")
            .expect("a transient error is retried");
        sleep.deadline() - start
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_zero_or_a_past_date_waits_the_minimum() {
        let policy = RetryPolicy::new()
            .min_backoff(Duration::from_secs(1))
            .max_backoff(Duration::from_secs(30));
        #[allow(unused_mut)]
        let mut asks = vec![Some(Duration::ZERO), Some(Duration::from_millis(10))];
        #[cfg(feature = "webhook")]
        {
            // What WebhookSink reads from `Retry-After: <a date an hour ago>`.
            let now = std::time::SystemTime::now();
            let past = httpdate::fmt_http_date(now - Duration::from_secs(3600));
            asks.push(crate::webhook::classify::parse_retry_after(&past, now));
        }
        for asked in asks {
            let delay = delay_after(&policy, asked);
            assert!(
                delay >= Duration::from_secs(1),
                "Retry-After {asked:?} gave a delay of {delay:?}, below the 1 s minimum"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_larger_retry_after_wins_up_to_the_maximum() {
        let policy = RetryPolicy::new()
            .min_backoff(Duration::from_secs(1))
            .max_backoff(Duration::from_secs(30));
        let asked = Some(Duration::from_secs(10));
        assert_eq!(delay_after(&policy, asked), Duration::from_secs(10));
        let asked = Some(Duration::from_secs(3600));
        assert_eq!(delay_after(&policy, asked), Duration::from_secs(30));
        // A maximum below the minimum lowers the minimum, as for backoff.
        let inverted = policy.min_backoff(Duration::from_secs(60));
        assert_eq!(
            delay_after(&inverted, Some(Duration::ZERO)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn huge_retry_numbers_do_not_overflow() {
        let policy = RetryPolicy::new().max_backoff(Duration::MAX);
        let (low, high) = policy.backoff_range(u32::MAX);
        assert!(high >= low * 1_000_000, "{high:?}");
        assert!(policy.backoff(u32::MAX) >= low);
    }
}
