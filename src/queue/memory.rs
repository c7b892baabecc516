//! [`MemoryQueue`]: the in-process backend, for tests and demos. Nothing
//! survives the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::dequeue::VecDequeBackend;
use apalis_core::task::Task;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use super::Published;
use super::backend::ops::{
    Answer, DeadPage, Delivery, Jobs, Ops, Payload, Place, Store, WorkerRun,
};
use super::backend::{push_error, push_tasks, queue_handle, run_apalis};
use super::error::QueueError;
use super::job::DeadLetter;
use super::job::QueuedEvent;
use super::stats::QueueStats;
use crate::BoxError;

/// An in-memory queue on apalis' `VecDequeBackend` (cloneable and safe with
/// concurrent publishers, unlike `MemoryStorage`). For tests and demos:
/// queued jobs, scheduled retries and dead letters live in this process
/// only. A duplicate is recognised only while its job waits (for its
/// delay or for a worker).
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
    jobs: Arc<Mutex<Tally>>,
}

/// What [`MemoryQueue::stats`](super::QueueBackend::stats) counts, as
/// apalis' `VecDequeBackend` shows nothing of its queue: the jobs that
/// wait (for their delay or for a worker) by idempotency key, with their
/// due time, and how many deliveries are under way. The waiting keys are
/// also the duplicate check.
#[derive(Debug, Default)]
struct Tally {
    waiting: HashMap<String, DateTime<Utc>>,
    running: u64,
}

queue_handle! {
    MemoryQueue { name, storage, dead, jobs }, store(self),
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
            jobs: Arc::new(Mutex::new(Tally::default())),
        }
    }

    fn tally(&self) -> MutexGuard<'_, Tally> {
        lock(&self.jobs)
    }

    /// Notes `jobs` as waiting: per job, whether it is new (its key did
    /// not wait already), and the new ones with their keys.
    fn admit(&self, jobs: Jobs<P>) -> (Vec<Published>, Admitted<P>) {
        let mut tally = self.tally();
        let now = Utc::now();
        let mut admitted = Vec::new();
        let outcomes = jobs
            .into_iter()
            .map(|(job, delay)| {
                let key = job.idempotency_key();
                if tally.waiting.contains_key(&key) {
                    return Published::AlreadyQueued;
                }
                let due = chrono::Duration::from_std(delay)
                    .ok()
                    .and_then(|delay| now.checked_add_signed(delay))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                tally.waiting.insert(key.clone(), due);
                admitted.push((job, delay, key));
                Published::Stored
            })
            .collect();
        (outcomes, admitted)
    }

    fn dead(&self) -> MutexGuard<'_, Vec<DeadLetter<P>>> {
        lock(&self.dead)
    }
}

/// Jobs admitted to the queue, with their idempotency keys.
type Admitted<P> = Vec<(QueuedEvent<P>, Duration, String)>;

/// Locks `mutex`. Each update under these locks is a single push, retain,
/// insert or removal: a panic elsewhere cannot leave them half changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forgets the waiting `keys` (their jobs were not stored after all).
fn forget(jobs: &Mutex<Tally>, keys: impl IntoIterator<Item = String>) {
    let mut tally = lock(jobs);
    for key in keys {
        tally.waiting.remove(&key);
    }
}

impl<P: Payload> Ops<P> for MemoryQueue<P> {
    fn push(&self, jobs: Jobs<P>) -> Answer<Vec<Published>> {
        let (outcomes, admitted) = self.admit(jobs);
        // VecDequeBackend ignores due times: hold delayed jobs in a timer
        // task (in memory, like everything here).
        let (now, later): (Vec<_>, Vec<_>) =
            admitted.into_iter().partition(|(_, d, _)| d.is_zero());
        if !later.is_empty() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                // Nothing is stored: a publish of these again must store them.
                let keys = later.into_iter().chain(now).map(|(_, _, key)| key);
                forget(&self.jobs, keys);
                return Box::pin(async { Err(QueueError::NoRuntime) });
            };
            for (job, delay, key) in later {
                let (storage, name) = (self.storage.clone(), Arc::clone(&self.name));
                let jobs = Arc::clone(&self.jobs);
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = push_tasks(&storage, vec![(job, Duration::ZERO)]).await {
                        forget(&jobs, [key]);
                        tracing::error!(queue = %name, error = %e, "memory queue lost a retry");
                    }
                });
            }
        }
        let (storage, name) = (self.storage.clone(), Arc::clone(&self.name));
        let jobs = Arc::clone(&self.jobs);
        Box::pin(async move {
            let keys: Vec<_> = now.iter().map(|(_, _, key)| key.clone()).collect();
            let now = now
                .into_iter()
                .map(|(job, delay, _)| (job, delay))
                .collect();
            match push_tasks(&storage, now).await {
                Ok(()) => Ok(outcomes),
                Err(e) => {
                    forget(&jobs, keys);
                    Err(push_error(&name, e))
                }
            }
        })
    }

    fn run_worker(&self, mut run: WorkerRun<P>) -> BoxFuture<'static, Result<(), BoxError>> {
        run.deliver = Delivery::new(Counted {
            inner: run.deliver,
            jobs: Arc::clone(&self.jobs),
        });
        Box::pin(run_apalis!(self.storage.clone(), run))
    }
}

/// The worker's handler, counting its deliveries in the [`Tally`]: a job
/// stops waiting when its delivery starts, and runs until it ends.
struct Counted<P> {
    inner: Delivery<P>,
    jobs: Arc<Mutex<Tally>>,
}

impl<P> Clone for Counted<P> {
    fn clone(&self) -> Self {
        Counted {
            inner: self.inner.clone(),
            jobs: Arc::clone(&self.jobs),
        }
    }
}

impl<P: Payload> tower::Service<Task<QueuedEvent<P>>> for Counted<P> {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, task: Task<QueuedEvent<P>>) -> Self::Future {
        {
            let mut tally = lock(&self.jobs);
            tally.waiting.remove(&task.args.idempotency_key());
            tally.running += 1;
        }
        let running = Running(Arc::clone(&self.jobs));
        let delivery = self.inner.call(task);
        Box::pin(async move {
            let _running = running;
            delivery.await
        })
    }
}

/// One delivery under way; counted off when dropped (ended or cancelled).
struct Running(Arc<Mutex<Tally>>);

impl Drop for Running {
    fn drop(&mut self) {
        let mut tally = lock(&self.0);
        tally.running = tally.running.saturating_sub(1);
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

    fn stats(&self) -> Answer<QueueStats> {
        let now = Utc::now();
        let dead = self.dead().len() as u64;
        let tally = self.tally();
        let due = || tally.waiting.values().filter(|due| **due <= now);
        let pending = due().count() as u64;
        let stats = QueueStats {
            pending,
            scheduled: tally.waiting.len() as u64 - pending,
            running: tally.running,
            dead,
            oldest_due: due().min().copied(),
        };
        Box::pin(async move { Ok(stats) })
    }

    fn delete_completed(&self, _age: Duration) -> Answer<u64> {
        // Completed jobs are not kept in memory.
        Box::pin(async { Ok(0) })
    }
}
