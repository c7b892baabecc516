//! [`RetryPolicy`]: a `tower::retry::Policy` for any service whose error is
//! [`Retryable`] — retryable errors only, a [`Backoff`] between attempts,
//! an optional retry budget, and the receiver's `Retry-After` honoured.
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
//! behind a durable queue, whose retry schedule is persisted and described
//! by the same [`Backoff`].

use std::fmt;
use std::sync::Arc;

use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::{Backoff, Retryable};

/// Retries retryable failures of a service, waiting a jittered exponential
/// [`Backoff`] between attempts. Other failures are returned at once.
///
/// It works over any request that is `Clone` and any error that implements
/// [`Retryable`]: every sink of this crate, tower's `Timeout` and `Buffer`
/// around them ([`BoxError`](crate::BoxError)), and your own services once
/// their error implements [`Retryable`]. An error that carries a
/// `Retry-After` follows [`Backoff::delay`]'s rule: it lengthens the wait up
/// to twice its step (never past the backoff's maximum), never shortens it.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use eventsink::{Backoff, RetryPolicy};
/// use tower::retry::budget::TpsBudget;
///
/// let backoff = Backoff::new()
///     .min(Duration::from_millis(200))
///     .max(Duration::from_secs(5))
///     .attempts(3);
/// let policy = RetryPolicy::new(backoff)
///     .budget(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)));
/// # let _ = policy;
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RetryPolicy {
    backoff: Backoff,
    budget: Option<Arc<TpsBudget>>,
    /// Retries made so far for the current request. tower clones the policy
    /// for every request, so this count is per request.
    retries: u32,
}

impl RetryPolicy {
    /// A policy that waits `backoff` between attempts, without a budget.
    /// [`RetryPolicy::default`] uses [`Backoff::default`].
    ///
    /// ```
    /// let policy = eventsink::RetryPolicy::new(eventsink::Backoff::new().attempts(3));
    /// # let _ = policy;
    /// ```
    pub fn new(backoff: Backoff) -> Self {
        RetryPolicy {
            backoff,
            budget: None,
            retries: 0,
        }
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
    /// let policy = eventsink::RetryPolicy::default().budget(budget);
    /// # let _ = policy;
    /// ```
    pub fn budget(mut self, budget: Arc<TpsBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Decides on one failed or successful attempt.
    fn decide<E: Retryable + fmt::Display>(
        &mut self,
        outcome: Result<(), &E>,
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
        if !error.is_retryable() || self.retries + 1 >= self.backoff.max_attempts() {
            return None;
        }
        if let Some(budget) = &self.budget
            && !budget.withdraw()
        {
            tracing::debug!("retry budget exhausted; not retrying: {error}");
            return None;
        }
        let delay = self.backoff.delay(self.retries, error.retry_after());
        self.retries += 1;
        tracing::debug!(
            attempt = self.retries + 1,
            ?delay,
            "retrying after: {error}"
        );
        Some(tokio::time::sleep(delay))
    }
}

impl<Req, Res, E> Policy<Req, Res, E> for RetryPolicy
where
    Req: Clone,
    E: Retryable + fmt::Display,
{
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        self.decide(result.as_ref().map(|_| ()))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Error;

    /// The delay `policy` picks after a retryable error that asked for
    /// `retry_after`.
    fn delay_after(policy: &RetryPolicy, retry_after: Option<Duration>) -> Duration {
        let err = Error::Simulated {
            retryable: true,
            retry_after,
        };
        let start = tokio::time::Instant::now();
        let sleep = policy
            .clone()
            .decide(Err(&err))
            .expect("a retryable error is retried");
        sleep.deadline() - start
    }

    fn no_jitter() -> RetryPolicy {
        RetryPolicy::new(
            Backoff::new()
                .min(Duration::from_secs(1))
                .max(Duration::from_secs(30))
                .jitter(0.0),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_zero_or_a_past_date_waits_the_backoff() {
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
            let delay = delay_after(&no_jitter(), asked);
            assert_eq!(
                delay,
                Duration::from_secs(1),
                "Retry-After {asked:?} gave a delay of {delay:?}, not the 1 s backoff"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_larger_retry_after_wins_up_to_twice_the_step_within_the_maximum() {
        let policy = no_jitter();
        let asked = Some(Duration::from_millis(1500));
        assert_eq!(delay_after(&policy, asked), Duration::from_millis(1500));
        let asked = Some(Duration::from_secs(10));
        assert_eq!(delay_after(&policy, asked), Duration::from_secs(2));
        let capped = RetryPolicy::new(
            Backoff::new()
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(1200))
                .jitter(0.0),
        );
        let asked = Some(Duration::from_secs(3600));
        assert_eq!(delay_after(&capped, asked), Duration::from_millis(1200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_or_the_last_attempt_is_not_retried() {
        let permanent = Error::Simulated {
            retryable: false,
            retry_after: None,
        };
        assert!(no_jitter().decide(Err(&permanent)).is_none());
        let mut once = RetryPolicy::new(Backoff::new().attempts(2));
        let transient = Error::Simulated {
            retryable: true,
            retry_after: None,
        };
        assert!(once.decide(Err(&transient)).is_some());
        assert!(once.decide(Err(&transient)).is_none());
    }
}
