//! [`DeadLetters`]: the events a queue gave up on — list, show, replay,
//! purge.
//!
//! An event becomes a dead letter when its sink fails permanently (a 4xx
//! webhook answer, an event the sink cannot take) or when its last attempt
//! of the [`RetrySchedule`](super::RetrySchedule) fails. It is kept in the
//! queue's backend with its last error and attempt count until replayed or
//! purged.
//!
//! ```
//! use eventsink::queue::{MemoryQueue, RetrySchedule, ThroughTaskQueue};
//! use eventsink::{ErrorKind, Event, RecordingSink, SinkExt};
//! use tower::Layer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! let recorder = RecordingSink::new();
//! recorder.fail_next(1, ErrorKind::Permanent);
//! let queue = MemoryQueue::new("demo");
//! let mut sink = ThroughTaskQueue::new(queue.clone()).layer(recorder.clone());
//! let worker = sink.worker().spawn();
//! sink.publish(Event::new("ping", serde_json::json!(1)).with_id("evt_1")).await?;
//!
//! let dead = queue.dead_letters();
//! let letter = dead.wait_for_count(1, std::time::Duration::from_secs(5)).await?;
//! assert_eq!(dead.get("evt_1").await?.unwrap().attempts, 1);
//! assert!(dead.replay("evt_1").await?);               // back into the queue
//! recorder.wait_for(1, std::time::Duration::from_secs(5)).await?;
//! worker.shutdown().await;
//! # let _ = letter;
//! # Ok(()) }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::backend::QueueBackend;
use super::error::QueueError;
use super::{QueuedEvent, push_each};
use crate::Event;

/// Why an event became a dead letter.
///
/// ```
/// use eventsink::queue::DeathCause;
/// assert_ne!(DeathCause::Permanent, DeathCause::OutOfAttempts);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathCause {
    /// The sink failed permanently: retrying cannot help.
    Permanent,
    /// The last attempt of the retry schedule failed.
    OutOfAttempts,
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
    /// The idempotency key of the event's job chain.
    pub key: String,
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
        }
    }
}

/// Most dead letters replayed per backend call by
/// [`DeadLetters::replay_all`]: the group commit's batch size.
const REPLAY_PAGE: u64 = super::DEFAULT_MAX_BATCH as u64;

/// The dead letters of one queue. Get it from the backend
/// (`queue.dead_letters()`).
///
/// Dead letters are identified by their event's id.
///
/// ```
/// use eventsink::queue::MemoryQueue;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
/// let queue: MemoryQueue = MemoryQueue::new("demo");
/// let dead = queue.dead_letters();
/// assert!(dead.list(0, 50).await?.is_empty());
/// assert_eq!(dead.purge().await?, 0);
/// # Ok(()) }
/// ```
pub struct DeadLetters<B, P = serde_json::Value> {
    backend: B,
    _payload: PhantomData<fn() -> P>,
}

impl<B: Clone, P> Clone for DeadLetters<B, P> {
    fn clone(&self) -> Self {
        DeadLetters {
            backend: self.backend.clone(),
            _payload: PhantomData,
        }
    }
}

impl<B: fmt::Debug, P> fmt::Debug for DeadLetters<B, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("backend", &self.backend)
            .finish()
    }
}

impl<B: QueueBackend<P>, P: Send + 'static> DeadLetters<B, P> {
    /// The dead letters kept in `backend`.
    ///
    /// ```
    /// use eventsink::queue::{DeadLetters, MemoryQueue};
    /// let dead: DeadLetters<_, serde_json::Value> = DeadLetters::new(MemoryQueue::new("q"));
    /// # let _ = dead;
    /// ```
    pub fn new(backend: B) -> Self {
        DeadLetters {
            backend,
            _payload: PhantomData,
        }
    }

    /// Up to `limit` dead letters from position `offset`, oldest first.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// let first_page = dead.list(0, 100).await?;
    /// # assert!(first_page.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn list(&self, offset: u64, limit: u64) -> Result<Vec<DeadLetter<P>>, QueueError> {
        self.backend.dead_page(offset, limit).await
    }

    /// How many dead letters there are.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert_eq!(dead.count().await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn count(&self) -> Result<u64, QueueError> {
        self.backend.dead_count().await
    }

    /// The dead letter of the event with this id, if there is one.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert!(dead.get("evt_1").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, event_id: &str) -> Result<Option<DeadLetter<P>>, QueueError> {
        self.backend.dead_get(event_id).await
    }

    /// Puts the event back into the queue with a fresh set of attempts and
    /// removes its dead letter; `false` if there was none.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert!(!dead.replay("evt_1").await?);
    /// # Ok(()) }
    /// ```
    pub async fn replay(&self, event_id: &str) -> Result<bool, QueueError> {
        let Some(letter) = self.get(event_id).await? else {
            return Ok(false);
        };
        self.requeue(vec![letter]).await?;
        Ok(true)
    }

    /// Replays every dead letter; how many.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert_eq!(dead.replay_all().await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn replay_all(&self) -> Result<u64, QueueError> {
        let mut replayed = 0;
        loop {
            let page = self.list(0, REPLAY_PAGE).await?;
            if page.is_empty() {
                return Ok(replayed);
            }
            replayed += page.len() as u64;
            self.requeue(page).await?;
        }
    }

    /// Deletes every dead letter; how many.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert_eq!(dead.purge().await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn purge(&self) -> Result<u64, QueueError> {
        self.backend.dead_purge().await
    }

    /// Waits until there are at least `n` dead letters (polling every
    /// 10 ms), for tests and scripts; returns the count.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert_eq!(dead.wait_for_count(0, std::time::Duration::from_millis(10)).await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn wait_for_count(&self, n: u64, timeout: Duration) -> Result<u64, crate::BoxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let count = self.count().await?;
            if count >= n {
                return Ok(count);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "waited {timeout:?} for {n} dead letters in queue {:?}, found {count}",
                    self.backend.name()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn requeue(&self, letters: Vec<DeadLetter<P>>) -> Result<(), QueueError> {
        let jobs: Vec<_> = letters
            .iter()
            .map(|letter| {
                let base = letter.key.split("~replay-").next().unwrap_or(&letter.key);
                QueuedEvent {
                    event: letter.event.clone(),
                    attempt: 1,
                    key: format!("{base}~replay-{}", uuid::Uuid::now_v7()),
                }
            })
            .collect();
        for result in push_each(&self.backend, jobs).await {
            result?;
        }
        for letter in &letters {
            self.backend.dead_remove(&letter.event.id).await?;
        }
        Ok(())
    }
}
