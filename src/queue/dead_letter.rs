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
//! use eventsink::{Event, RecordingSink, SinkExt};
//! use tower::Layer;
//!
//! # #[cfg(not(feature = "test-util"))] fn main() {}
//! # #[cfg(feature = "test-util")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! let recorder = RecordingSink::new();
//! recorder.fail_next_permanently(1); // feature `test-util`
//! let queue = MemoryQueue::new("demo");
//! let mut sink = ThroughTaskQueue::new(queue.clone()).layer(recorder.clone());
//! let worker = sink.worker().spawn();
//! sink.publish(Event::with_id("ping", "evt_1", serde_json::json!(1))).await?;
//!
//! let dead = queue.dead_letters();
//! dead.wait_for(1, std::time::Duration::from_secs(5)).await?;
//! let letter = dead.get("demo:ping:evt_1").await?.unwrap(); // {queue}:{kind}:{id}
//! assert_eq!(letter.attempts, 1);
//! assert!(dead.replay(&letter.key).await?);           // back into the queue
//! recorder.wait_for(1, std::time::Duration::from_secs(5)).await?;
//! worker.shutdown().await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use chrono::Utc;
use tracing::Instrument;

use super::backend::ops::Store;
use super::backend::{BackendPayload, QueueBackend};
use super::error::QueueError;
use super::job::{DeadLetter, QueuedEvent};
use super::push_each;
use crate::Event;

/// Most dead letters replayed per backend call by
/// [`DeadLetters::replay_all`]: the group commit's batch size.
const REPLAY_PAGE: u64 = super::DEFAULT_MAX_BATCH as u64;

/// The dead letters of one queue. Get it from the backend
/// (`queue.dead_letters()`).
///
/// A dead letter is identified by its [`key`](DeadLetter::key),
/// `{queue}:{kind}:{id}`, the key of the event's jobs.
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
pub struct DeadLetters<B, P = <B as BackendPayload>::Payload> {
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
    /// The dead letters kept in `backend`; the payload type is the
    /// backend's, so `DeadLetters<SqliteQueue<Order>>` needs no second
    /// parameter.
    ///
    /// ```
    /// use eventsink::queue::{DeadLetters, MemoryQueue};
    /// let dead: DeadLetters<MemoryQueue<u32>> = DeadLetters::new(MemoryQueue::new("q"));
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
        self.backend.store().dead_page(offset, limit).await
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
        self.backend.store().dead_count().await
    }

    /// The dead letter with this key (`{queue}:{kind}:{id}`), if there is
    /// one.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert!(dead.get("q:order.placed:evt_1").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, key: &str) -> Result<Option<DeadLetter<P>>, QueueError> {
        self.backend.store().dead_get(key).await
    }

    /// The key of `event`'s dead letter in this queue, for
    /// [`get`](DeadLetters::get) and [`replay`](DeadLetters::replay).
    ///
    /// ```
    /// use eventsink::Event;
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// let event = Event::with_id("order.placed", "evt_1", serde_json::json!(1));
    /// assert_eq!(dead.key_of(&event), "q:order.placed:evt_1");
    /// ```
    pub fn key_of(&self, event: &Event<P>) -> String {
        format!("{}:{}:{}", self.backend.name(), event.kind, event.id)
    }

    /// Puts the event back into the queue as a new delivery chain with a
    /// fresh set of attempts, then removes the letter; `false` if there was
    /// none. The letter is removed only if it is still the one replayed: if
    /// the replayed job has already failed again, its new letter stays.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert!(!dead.replay("q:order.placed:evt_1").await?);
    /// # Ok(()) }
    /// ```
    pub async fn replay(&self, key: &str) -> Result<bool, QueueError> {
        let span = self.replay_span();
        async {
            let Some(letter) = self.get(key).await? else {
                tracing::Span::current().record("messaging.batch.message_count", 0);
                return Ok(false);
            };
            self.requeue(vec![letter]).await?;
            tracing::Span::current().record("messaging.batch.message_count", 1);
            Ok(true)
        }
        .instrument(span)
        .await
    }

    /// Replays every dead letter that existed when it was called, each
    /// once, oldest first; how many. Letters written meanwhile (by the
    /// replayed events failing again, say) are left for a later call.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert_eq!(dead.replay_all().await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn replay_all(&self) -> Result<u64, QueueError> {
        let span = self.replay_span();
        let replayed = self.replay_until_now().instrument(span.clone()).await?;
        span.record("messaging.batch.message_count", replayed);
        Ok(replayed)
    }

    /// [`replay_all`](DeadLetters::replay_all), without its span.
    async fn replay_until_now(&self) -> Result<u64, QueueError> {
        let until = Utc::now().timestamp_micros();
        let (mut after, mut replayed) = (None, 0);
        // The chains this call started: a worker whose clock runs behind
        // this one's could date their letters before `until`.
        let mut ours = std::collections::HashSet::new();
        loop {
            let page = self
                .backend
                .store()
                .dead_after(after, until, REPLAY_PAGE)
                .await?;
            let Some(last) = page.last else {
                return Ok(replayed);
            };
            after = Some(last);
            let letters: Vec<_> = page
                .letters
                .into_iter()
                .filter(|letter| !ours.contains(&letter.chain))
                .collect();
            replayed += letters.len() as u64;
            ours.extend(self.requeue(letters).await?);
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
        self.backend.store().dead_purge().await
    }

    /// Waits until there are at least `n` dead letters (polling every
    /// 10 ms), for tests and scripts; returns the count.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// let dead = eventsink::queue::MemoryQueue::<serde_json::Value>::new("q").dead_letters();
    /// assert_eq!(dead.wait_for(0, std::time::Duration::from_millis(10)).await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> Result<u64, crate::BoxError> {
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

    /// The span of a replay (see [`trace`](crate::trace)); its
    /// `messaging.batch.message_count` is recorded at the end.
    fn replay_span(&self) -> tracing::Span {
        tracing::info_span!(
            "eventsink.replay",
            messaging.system = crate::trace::MESSAGING_SYSTEM,
            messaging.operation.type = "send",
            messaging.destination.name = self.backend.name(),
            messaging.batch.message_count = tracing::field::Empty,
            otel.kind = "producer",
        )
    }

    /// Pushes each letter's event as a new chain, then removes exactly
    /// the letters replayed (same key, chain and failure time): a crash in between
    /// leaves a letter beside its job (a second replay would deliver
    /// twice), never neither.
    /// The chains started, one per letter.
    async fn requeue(&self, letters: Vec<DeadLetter<P>>) -> Result<Vec<String>, QueueError> {
        // The replay's span is the parent of the replayed deliveries.
        let traceparent = crate::trace::traceparent(&tracing::Span::current());
        let jobs: Vec<_> = letters
            .iter()
            .map(|letter| {
                let mut job = QueuedEvent::replay(letter.key.clone(), letter.event.clone());
                job.traceparent = traceparent.clone();
                job
            })
            .collect();
        let chains = jobs.iter().map(|job| job.chain.clone()).collect();
        let results = push_each(&self.backend, jobs).await;
        #[cfg(feature = "metrics")]
        {
            let queue: std::sync::Arc<str> = self.backend.name().into();
            for (letter, result) in letters.iter().zip(&results) {
                if let Ok(super::Published::Stored) = result {
                    crate::metrics::enqueued(&queue, &letter.event.kind);
                }
            }
        }
        for result in results {
            result?;
        }
        for letter in &letters {
            self.backend.store().dead_remove(letter).await?;
        }
        Ok(chains)
    }
}
