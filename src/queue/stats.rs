//! [`QueueStats`]: how many jobs of a queue wait, are scheduled, run, or
//! died, and how far behind it is — without SQL.
//!
//! ```
//! use eventsink::queue::{MemoryQueue, QueueBackend};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
//! let queue: MemoryQueue = MemoryQueue::new("orders");
//! let stats = queue.stats().await?;
//! assert_eq!((stats.pending, stats.scheduled, stats.running, stats.dead), (0, 0, 0, 0));
//! assert!(stats.oldest_due.is_none());
//! # Ok(()) }
//! ```

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A snapshot of one queue's jobs, from
/// [`QueueBackend::stats`](super::QueueBackend::stats). Completed jobs
/// (delivered, or whose next attempt or dead letter was written) are not
/// counted, nor are jobs apalis gave up on until the worker's maintenance
/// buries them as dead letters.
///
/// What each field counts, in apalis' terms:
///
/// | field | SQLite, Postgres (`Jobs` / `apalis.jobs` of the queue) | Redis (apalis' keys of the queue) | memory |
/// |---|---|---|---|
/// | `pending` | `status = 'Pending'`, or `'Failed'` with `attempts < max_attempts` (apalis runs it again), and `run_at <= now` | the active list, plus the scheduled set's jobs whose due score is `<= now` (not moved yet) | jobs due whose delivery has not started |
/// | `scheduled` | the same statuses with `run_at > now`: future retries | the scheduled set's jobs due later | retries waiting for their delay |
/// | `running` | `status` `'Queued'` (fetched, `lock_by` set) or `'Running'`: leased by a worker, also a dead one until its lease expires | the in-flight sets of the registered workers | deliveries under way |
/// | `dead` | rows of `eventsink_dead_letters` | entries of the hash `eventsink:{queue}:dead` | dead letters in memory |
///
/// `oldest_due` is the due time of the oldest pending job: how far behind
/// the queue is (`None` when nothing is pending). The durable backends keep
/// due times in whole seconds. Redis' active list keeps no due time: for a
/// job there it is its event's `created_at`, which for a retry is earlier
/// than its due time.
///
/// A snapshot is one statement (SQL) or one script (Redis), so its counts
/// agree with each other; memory reads them under one lock.
///
/// Serialises as `{"pending":…,"scheduled":…,"running":…,"dead":…,"oldest_due":…}`
/// (`oldest_due` in RFC 3339, or `null`).
///
/// ```
/// # use eventsink::queue::QueueStats;
/// fn drained(stats: &QueueStats) -> bool {
///     stats.pending + stats.scheduled + stats.running == 0
/// }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueStats {
    /// Jobs due now that no worker holds.
    pub pending: u64,
    /// Jobs due later: retries waiting for their delay.
    pub scheduled: u64,
    /// Jobs a worker holds (fetched or being delivered).
    pub running: u64,
    /// Dead letters.
    pub dead: u64,
    /// When the oldest pending job became due.
    pub oldest_due: Option<DateTime<Utc>>,
}

impl QueueStats {
    /// The counts in this order, with the oldest due time given as Unix
    /// seconds (as the durable backends store it).
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
    pub(crate) fn from_counts(
        [pending, scheduled, running, dead]: [u64; 4],
        oldest_due_second: Option<i64>,
    ) -> Self {
        QueueStats {
            pending,
            scheduled,
            running,
            dead,
            oldest_due: oldest_due_second.and_then(|s| DateTime::from_timestamp(s, 0)),
        }
    }
}
