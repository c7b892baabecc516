//! [`MemoryQueue`]: the in-process backend, for tests and demos. Nothing
//! survives the process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use apalis_core::backend::dequeue::VecDequeBackend;
use apalis_core::task::Task;
use futures::future::BoxFuture;

use super::Published;
use super::backend::ops::{
    Answer, DeadPage, Delivery, Jobs, Ops, Payload, Place, Store, WorkerRun,
};
use super::backend::{push_error, push_tasks, queue_handle, run_apalis};
use super::error::QueueError;
use super::job::DeadLetter;
use super::job::QueuedEvent;
use crate::BoxError;

/// An in-memory queue on apalis' `VecDequeBackend` (cloneable and safe with
/// concurrent publishers, unlike `MemoryStorage`). For tests and demos:
/// queued jobs, scheduled retries and dead letters live in this process
/// only. A duplicate is recognised only while its job waits (until a
/// worker takes it).
///
/// ```
/// use eventsink::queue::{MemoryQueue, ThroughTaskQueue};
/// use eventsink::{Event, RecordingSink, SinkExt};
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// let recorder = RecordingSink::new();
/// let mut sink = ThroughTaskQueue::new(MemoryQueue::new("demo")).layer(recorder.clone());
/// let worker = sink.worker().spawn();
/// sink.publish(Event::new("ping", serde_json::json!({}))).await?;
/// recorder.wait_for(1, std::time::Duration::from_secs(5)).await?;
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct MemoryQueue<P = serde_json::Value> {
    name: Arc<str>,
    storage: VecDequeBackend<QueuedEvent<P>>,
    dead: Arc<Mutex<Vec<DeadLetter<P>>>>,
    /// The idempotency keys of the jobs pushed and not yet handed to a
    /// delivery: the duplicate check (`VecDequeBackend` skips a duplicate
    /// without saying so).
    waiting: Arc<Mutex<HashSet<String>>>,
}

queue_handle! {
    MemoryQueue { name, storage, dead, waiting }, store(self),
    " let queue = eventsink::queue::MemoryQueue::<serde_json::Value>::new(\"q\");"
}

impl<P> MemoryQueue<P> {
    /// An empty queue called `name`.
    ///
    /// ```
    /// let queue: eventsink::queue::MemoryQueue = eventsink::queue::MemoryQueue::new("demo");
    /// assert_eq!(queue.name(), "demo");
    /// ```
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        MemoryQueue {
            name: name.into(),
            storage: VecDequeBackend::new(),
            dead: Arc::new(Mutex::new(Vec::new())),
            waiting: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    fn dead(&self) -> MutexGuard<'_, Vec<DeadLetter<P>>> {
        // Each update is a single push, retain or clear: a panic elsewhere
        // cannot leave the list half changed.
        self.dead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks each job's key as waiting; per job, whether it was new.
    fn mark_waiting(&self, jobs: &Jobs<P>) -> Vec<Published> {
        let mut waiting = lock(&self.waiting);
        jobs.iter()
            .map(|(job, _)| match waiting.insert(job.idempotency_key()) {
                true => Published::Stored,
                false => Published::AlreadyQueued,
            })
            .collect()
    }
}

/// A poisoned lock only means a panic elsewhere between two statements
/// that each leave the set whole.
fn lock(waiting: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

impl<P: Payload> Ops<P> for MemoryQueue<P> {
    fn push(&self, jobs: Jobs<P>) -> Answer<Vec<Published>> {
        let outcomes = self.mark_waiting(&jobs);
        let jobs = jobs
            .into_iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_stored())
            .map(|(job, _)| job);
        // VecDequeBackend ignores due times: hold delayed jobs in a timer
        // task (in memory, like everything here).
        let (now, later): (Vec<_>, Vec<_>) = jobs.partition(|(_, d)| d.is_zero());
        if !later.is_empty() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                self.unmark(later.iter().chain(&now));
                return Box::pin(async { Err(QueueError::NoRuntime) });
            };
            for (job, delay) in later {
                let (storage, name) = (self.storage.clone(), Arc::clone(&self.name));
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = push_tasks(&storage, vec![(job, Duration::ZERO)]).await {
                        tracing::error!(queue = %name, error = %e, "memory queue lost a retry");
                    }
                });
            }
        }
        let queue = self.clone();
        Box::pin(async move {
            match push_tasks(&queue.storage, now.clone()).await {
                Ok(()) => Ok(outcomes),
                Err(e) => {
                    // Not stored: a publish of it again must store it.
                    queue.unmark(&now);
                    Err(push_error(&queue.name, e))
                }
            }
        })
    }

    fn run_worker(&self, mut run: WorkerRun<P>) -> BoxFuture<'static, Result<(), BoxError>> {
        // A job handed to a delivery no longer waits: publishing its event
        // again stores it anew.
        let waiting = Arc::clone(&self.waiting);
        let unmark = move |task: Task<QueuedEvent<P>>| {
            lock(&waiting).remove(&task.args.idempotency_key());
            task
        };
        run.deliver = Delivery::new(tower::util::MapRequest::new(run.deliver, unmark));
        Box::pin(run_apalis!(self.storage.clone(), run))
    }
}

impl<P> MemoryQueue<P> {
    /// Forgets the keys of `jobs`, which were not stored.
    fn unmark<'a>(&self, jobs: impl IntoIterator<Item = &'a (QueuedEvent<P>, Duration)>)
    where
        P: 'a,
    {
        let mut waiting = lock(&self.waiting);
        for (job, _) in jobs {
            waiting.remove(&job.idempotency_key());
        }
    }
}

impl<P: Payload> Store<P> for MemoryQueue<P> {
    fn bury(&self, letter: DeadLetter<P>) -> Answer<()> {
        let mut dead = self.dead();
        dead.retain(|d| d.key != letter.key);
        dead.push(letter);
        Box::pin(async { Ok(()) })
    }

    fn dead_page(&self, offset: u64, limit: u64) -> Answer<Vec<DeadLetter<P>>> {
        let page = self
            .dead()
            .iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .cloned()
            .collect();
        Box::pin(async { Ok(page) })
    }

    fn dead_after(&self, after: Option<Place>, until: i64, limit: u64) -> Answer<DeadPage<P>> {
        let place = |d: &DeadLetter<P>| (d.failed_at.timestamp_micros(), d.key.clone());
        let mut letters: Vec<_> = self
            .dead()
            .iter()
            .filter(|d| d.failed_at.timestamp_micros() <= until)
            .filter(|d| after.as_ref().is_none_or(|after| place(d) > *after))
            .cloned()
            .collect();
        letters.sort_by_key(place);
        letters.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let last = letters.last().map(place);
        Box::pin(async { Ok(DeadPage { letters, last }) })
    }

    fn dead_get(&self, key: &str) -> Answer<Option<DeadLetter<P>>> {
        let found = self.dead().iter().find(|d| d.key == key).cloned();
        Box::pin(async { Ok(found) })
    }

    fn dead_remove(&self, letter: &DeadLetter<P>) -> Answer<bool> {
        let mut dead = self.dead();
        let before = dead.len();
        dead.retain(|d| {
            (&d.key, &d.chain, d.failed_at) != (&letter.key, &letter.chain, letter.failed_at)
        });
        let removed = dead.len() < before;
        Box::pin(async move { Ok(removed) })
    }

    fn dead_purge(&self) -> Answer<u64> {
        let mut dead = self.dead();
        let n = dead.len() as u64;
        dead.clear();
        Box::pin(async move { Ok(n) })
    }

    fn dead_count(&self) -> Answer<u64> {
        let n = self.dead().len() as u64;
        Box::pin(async move { Ok(n) })
    }

    fn delete_completed(&self, _age: Duration) -> Answer<u64> {
        // Completed jobs are not kept in memory.
        Box::pin(async { Ok(0) })
    }
}
