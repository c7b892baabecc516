//! [`QueuedEvent`] and [`DeadLetter`]: what a backend stores, a delivery
//! attempt of an event and an event the queue gave up on. Their fields are
//! the stored format (JSON in every durable backend).
//!
//! ```
//! use eventsink::queue::{DeadLetter, DeathCause, QueuedEvent};
//! use eventsink::Event;
//!
//! let job = QueuedEvent::new("orders", Event::with_id("order.placed", "evt_1", 7));
//! assert_eq!(job.key, "orders:order.placed:evt_1"); // also the key of its dead letter
//! # fn look(letter: DeadLetter<i32>) -> bool { letter.cause == DeathCause::Permanent }
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Event;

/// The job stored in the backend for one delivery attempt of an event.
///
/// It is JSON in every durable backend; the field names are part of the
/// stored format.
///
/// Every job of an event shares its [`key`](QueuedEvent::key),
/// `{queue}:{kind}:{id}`, which is also the key of the event's dead
/// letter. The attempts that follow one another after failures form a
/// *delivery chain* with an id of its own: publishing the event again, or
/// replaying its dead letter, starts a new chain, so the retries of one
/// chain never meet the stored jobs of another.
///
/// ```
/// use eventsink::{queue::QueuedEvent, Event};
///
/// let job = QueuedEvent::new("orders", Event::new("order.placed", 7));
/// assert_eq!(job.attempt, 1);
/// assert!(job.key.starts_with("orders:order.placed:"));
/// ```
#[derive(Debug, Serialize, Deserialize)]
pub struct QueuedEvent<P = serde_json::Value> {
    /// The event to deliver.
    pub event: Event<P>,
    /// Which attempt of its chain this job makes, from 1.
    pub attempt: u32,
    /// The event's key, `{queue}:{kind}:{id}`: the idempotency key of its
    /// published first attempt and the key of its dead letter.
    pub key: String,
    /// The delivery chain's id, new for each publish and each replay. A
    /// job that runs twice (its acknowledgement was lost) schedules the
    /// same next attempt, which the backend stores once. Empty in jobs
    /// written before chains existed; the worker then names the chain
    /// after the backend's id of the job, which is as stable.
    #[serde(default)]
    pub chain: String,
    /// Whether a replay started the chain (its first attempt is then keyed
    /// by its chain, like a retry).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// The W3C `traceparent` of the span that published (or replayed) the
    /// event, which the delivery span takes as its parent: stored only with
    /// the feature `opentelemetry` and an OpenTelemetry layer installed
    /// (see [`trace`](crate::trace)). Every attempt of a chain keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A fresh delivery chain id: a UUID v7, 32 hex digits.
fn new_chain() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

impl<P> QueuedEvent<P> {
    /// The first attempt of `event` in `queue`, keyed `{queue}:{kind}:{id}`,
    /// on a new chain.
    ///
    /// ```
    /// let job = eventsink::queue::QueuedEvent::new("q", eventsink::Event::with_id("k", "1", ()));
    /// assert_eq!(job.key, "q:k:1");
    /// assert_eq!(job.chain.len(), 32);
    /// ```
    pub fn new(queue: &str, event: Event<P>) -> Self {
        let key = format!("{queue}:{}:{}", event.kind, event.id);
        QueuedEvent {
            event,
            attempt: 1,
            key,
            chain: new_chain(),
            replayed: false,
            traceparent: None,
        }
    }

    /// The idempotency key of this job: [`key`](QueuedEvent::key) for the
    /// first attempt of a published event (publishing it again while that
    /// job is kept stores nothing new), `{key}~{chain}#{attempt}` for every
    /// other job.
    ///
    /// ```
    /// let mut job = eventsink::queue::QueuedEvent::new("q", eventsink::Event::with_id("k", "1", ()));
    /// assert_eq!(job.idempotency_key(), "q:k:1");
    /// job.attempt = 3;
    /// job.chain = "c7".into();
    /// assert_eq!(job.idempotency_key(), "q:k:1~c7#3");
    /// ```
    pub fn idempotency_key(&self) -> String {
        if self.attempt <= 1 && !self.replayed {
            self.key.clone()
        } else {
            format!("{}~{}#{}", self.key, self.chain, self.attempt)
        }
    }

    /// The next attempt of this job's chain.
    pub(crate) fn next_attempt(&self) -> Self {
        QueuedEvent {
            event: self.event.clone(),
            attempt: self.attempt.saturating_add(1),
            key: self.key.clone(),
            chain: self.chain.clone(),
            replayed: self.replayed,
            traceparent: self.traceparent.clone(),
        }
    }

    /// The first attempt of a new chain for `event`, stored under `key`
    /// (a replay).
    pub(crate) fn replay(key: String, event: Event<P>) -> Self {
        QueuedEvent {
            event,
            attempt: 1,
            key,
            chain: new_chain(),
            replayed: true,
            traceparent: None,
        }
    }
}

impl<P> Clone for QueuedEvent<P> {
    fn clone(&self) -> Self {
        QueuedEvent {
            event: self.event.clone(),
            attempt: self.attempt,
            key: self.key.clone(),
            chain: self.chain.clone(),
            replayed: self.replayed,
            traceparent: self.traceparent.clone(),
        }
    }
}

/// Why an event became a dead letter.
///
/// ```
/// use eventsink::queue::DeathCause;
/// assert_ne!(DeathCause::Permanent, DeathCause::OutOfAttempts);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathCause {
    /// The sink failed permanently: retrying cannot help. Also a stored job
    /// whose payload no longer decodes as the queue's payload type (the
    /// type changed since it was published); its letter says so.
    Permanent,
    /// The last attempt of the retry schedule failed.
    OutOfAttempts,
    /// apalis gave up on the job (it ran it until its own attempt limit, or
    /// killed it) because the worker could not record the job's outcome:
    /// the backend kept failing. The worker's maintenance found the job and
    /// buried it, so that it is not lost silently.
    Abandoned,
}

impl DeathCause {
    /// The cause as stored: `permanent`, `out_of_attempts` or `abandoned`.
    ///
    /// ```
    /// assert_eq!(eventsink::queue::DeathCause::OutOfAttempts.as_str(), "out_of_attempts");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            DeathCause::Permanent => "permanent",
            DeathCause::OutOfAttempts => "out_of_attempts",
            DeathCause::Abandoned => "abandoned",
        }
    }
}

/// An event the queue gave up on, with why.
///
/// ```
/// use eventsink::queue::{DeadLetter, DeathCause};
/// # fn look(letter: DeadLetter) {
/// if letter.cause == DeathCause::OutOfAttempts {
///     println!("{} failed {} times: {}", letter.event.id, letter.attempts, letter.last_error);
/// }
/// # }
/// ```
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetter<P = serde_json::Value> {
    /// The event.
    pub event: Event<P>,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last attempt's error, as the sink displayed it.
    pub last_error: String,
    /// Why the queue gave up.
    pub cause: DeathCause,
    /// When the queue gave up.
    pub failed_at: DateTime<Utc>,
    /// The letter's key, `{queue}:{kind}:{id}`: the key of the event's
    /// jobs ([`QueuedEvent::key`]). A queue keeps one letter per key.
    pub key: String,
    /// The id of the delivery chain that died (see [`QueuedEvent`]): a
    /// replay removes the letter only while it is still this chain's.
    #[serde(default)]
    pub chain: String,
}

impl<P> Clone for DeadLetter<P> {
    fn clone(&self) -> Self {
        DeadLetter {
            event: self.event.clone(),
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            cause: self.cause,
            failed_at: self.failed_at,
            key: self.key.clone(),
            chain: self.chain.clone(),
        }
    }
}

impl<P> DeadLetter<P> {
    /// The letter of a stored job whose payload does not decode as the
    /// queue's payload type: permanent, with serde's `error`.
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
    pub(crate) fn undecodable(job: QueuedEvent<P>, error: &str) -> Self {
        DeadLetter {
            last_error: format!(
                "the stored job does not decode as the queue's payload type ({error}); the \
                 payload type changed since the event was published: read the letter through \
                 a queue of serde_json::Value, fix it and replay it"
            ),
            event: job.event,
            attempts: job.attempt,
            cause: DeathCause::Permanent,
            failed_at: Utc::now(),
            key: job.key,
            chain: job.chain,
        }
    }

    /// The letter of a job apalis gave up on after `runs` runs, the last
    /// of which left `last_result`.
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
    pub(crate) fn abandoned(job: QueuedEvent<P>, runs: i64, last_result: Option<&str>) -> Self {
        DeadLetter {
            last_error: format!(
                "apalis gave up on the job after {runs} runs whose outcome could not be \
                 recorded; last result: {}",
                last_result.unwrap_or("(none)")
            ),
            event: job.event,
            attempts: job.attempt,
            cause: DeathCause::Abandoned,
            failed_at: Utc::now(),
            key: job.key,
            chain: job.chain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_without_trace_context_stores_no_traceparent_and_old_jobs_decode() {
        let job = QueuedEvent::new("q", Event::with_id("k", "1", 7));
        let json = serde_json::to_value(&job).unwrap();
        assert!(json.get("traceparent").is_none(), "{json}");
        let old: QueuedEvent<i32> = serde_json::from_value(json).unwrap();
        assert_eq!(old.traceparent, None);

        let traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut job = job;
        job.traceparent = Some(traced.to_owned());
        let back: QueuedEvent<i32> =
            serde_json::from_value(serde_json::to_value(job.next_attempt()).unwrap()).unwrap();
        assert_eq!(
            back.traceparent.as_deref(),
            Some(traced),
            "every attempt keeps it"
        );
    }

    #[test]
    fn death_causes_read_as_they_are_stored() {
        for cause in [
            DeathCause::Permanent,
            DeathCause::OutOfAttempts,
            DeathCause::Abandoned,
        ] {
            let stored = serde_json::to_value(cause).unwrap();
            assert_eq!(stored, cause.as_str());
        }
    }
}
