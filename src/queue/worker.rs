//! [`QueueWorker`]: delivers queued events to the sink, retries on the
//! schedule, buries the hopeless, and restarts itself when the backend
//! fails.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::task::Task;
use chrono::Utc;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::backend::QueueBackend;
use super::backend::ops::{Delivery, Store, WorkerRun};
use super::job::QueuedEvent;
use super::job::{DeadLetter, DeathCause};
use super::observe::{self, Attempt, AttemptOutcome, Observer};
use super::schedule::RetrySchedule;
use crate::{Backoff, Retryable};
use crate::{BoxError, Event, Sink};

/// Deliveries running at once per worker. 16, as the issue's default: enough
/// to hide a slow receiver's latency, few enough not to overwhelm it.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Timeout of one delivery attempt. 15 s, as the Go original; Standard
/// Webhooks recommends 15–30 s.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// How often an idle worker looks for due jobs. 20 ms: on SQLite a job
/// another process published starts within about 10 ms on average (the Go
/// original sleeps 1 s when idle). A look queries the backend only when it
/// may find something: a new second began (due times are whole seconds),
/// or SQLite's file changed; two queries a second on an idle queue.
/// Announced jobs start at once: those published by this process, and on
/// Postgres (`LISTEN/NOTIFY`) and Redis (pub/sub) by any.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Most jobs a worker takes from the backend in one query. 256: apalis'
/// default of 10 makes every 10 deliveries pay for a fetch and an
/// acknowledgement, each its own transaction. On SQLite, where that is CPU,
/// 256 took `queue_e2e_sqlite` (`cargo bench --bench throughput`, full size,
/// idle machine) from 1.10 to 2.40 × apalis' own worker and a backlog drain
/// from ~8,000 to ~22,000 events/s. Postgres fetches
/// `POSTGRES_FETCH_BATCH` (128) unless
/// told, and Redis batches the size of the deliveries at once. The
/// jobs taken stay leased to the worker until delivered (it renews the
/// lease every heartbeat, also while they wait for a free delivery slot),
/// are marked done within 10 ms of their outcome, and a worker that stops
/// hands back the ones it has not started.
pub const DEFAULT_FETCH_BATCH: usize = 256;

/// How long completed jobs are kept before the worker deletes them. One
/// day: the window in which publishing the same event again is recognised
/// as a duplicate.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How often the worker buries the jobs apalis gave up on and applies
/// retention. Hourly: retention is about days, and a job apalis gave up on
/// is found at the next start or within the hour.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// First wait before restarting a failed worker; doubles up to
/// [`MAX_RESTART_BACKOFF`].
const MIN_RESTART_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait between restarts of a failing worker.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// Time a stopping worker gets beyond its attempt timeout to finish the
/// deliveries in flight and write their outcome.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// Most time kept between the moment a stopping worker gives up draining
/// and the moment its lease could lapse: 2 s covers the whole seconds
/// leases are counted in and dropping the run's deliveries (a quarter of
/// the lease if that is less).
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// A worker that has run this long without failing starts its backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Delivers the events of a queue to a sink. Build it with
/// [`ThroughTaskQueue::worker`](super::ThroughTaskQueue::worker) or [`QueueWorker::new`], then
/// [`spawn`](QueueWorker::spawn) it (stop it through the [`WorkerHandle`]) or
/// [`run_until`](QueueWorker::run_until) a shutdown signal.
///
/// Each delivery attempt gets a timeout; a transient failure schedules the
/// next attempt in the backend after the [`RetrySchedule`]'s delay; a
/// permanent failure or the last attempt's failure stores a dead letter.
/// When the backend fails (SQLite busy, a Redis timeout, a Postgres
/// restart) the worker starts again after a backoff, under a new name, so
/// it never collides with its own stale lease.
///
/// ```
/// use std::time::Duration;
/// use eventsink::queue::{MemoryQueue, RetrySchedule, QueueWorker};
/// use eventsink::RecordingSink;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let queue: MemoryQueue = MemoryQueue::new("webhooks");
/// let worker = QueueWorker::new(queue, RecordingSink::new())
///     .concurrency(32)
///     .attempt_timeout(Duration::from_secs(10))
///     .schedule(RetrySchedule::go_original())
///     .spawn();
/// worker.shutdown().await;
/// # }
/// ```
#[must_use = "a worker does nothing until it is spawned or run"]
pub struct QueueWorker<S, B, P = serde_json::Value> {
    backend: B,
    sink: S,
    concurrency: usize,
    attempt_timeout: Duration,
    poll_interval: Duration,
    /// `None`: the backend's own.
    fetch_batch: Option<usize>,
    schedule: RetrySchedule,
    retention: Option<Duration>,
    observer: Observer,
    #[cfg(feature = "metrics")]
    depth_interval: Option<Duration>,
    _payload: PhantomData<fn() -> P>,
}

impl<S: fmt::Debug, B: fmt::Debug, P> fmt::Debug for QueueWorker<S, B, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueWorker")
            .field("backend", &self.backend)
            .field("sink", &self.sink)
            .field("concurrency", &self.concurrency)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("fetch_batch", &self.fetch_batch)
            .field("schedule", &self.schedule)
            .field("retention", &self.retention)
            .field("observer", &self.observer)
            .finish()
    }
}

impl<S, B: QueueBackend<P>, P> QueueWorker<S, B, P> {
    /// A worker delivering the events of `backend` to `sink`, with the
    /// defaults: [`DEFAULT_CONCURRENCY`], [`DEFAULT_ATTEMPT_TIMEOUT`],
    /// [`DEFAULT_POLL_INTERVAL`], [`DEFAULT_FETCH_BATCH`], [`RetrySchedule::standard`],
    /// [`DEFAULT_RETENTION`].
    ///
    /// ```
    /// let worker = eventsink::queue::QueueWorker::new(
    ///     eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"),
    ///     eventsink::NoopSink::new(),
    /// );
    /// # let _ = worker;
    /// ```
    pub fn new(backend: B, sink: S) -> Self {
        QueueWorker {
            backend,
            sink,
            concurrency: DEFAULT_CONCURRENCY,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            fetch_batch: None,
            schedule: RetrySchedule::standard(),
            retention: Some(DEFAULT_RETENTION),
            observer: Observer::default(),
            #[cfg(feature = "metrics")]
            depth_interval: Some(crate::metrics::DEFAULT_DEPTH_INTERVAL),
            _payload: PhantomData,
        }
    }

    /// Calls `hook` after every delivery attempt, with the event's id and
    /// kind, the attempt number, its outcome (delivered, retrying with the
    /// next due time, or dead), the HTTP status and error if it failed,
    /// and its duration: what an application needs to keep its own attempt
    /// log (see [`Attempt`]). Replaces an earlier hook.
    ///
    /// The hook runs on the delivery's task before the outcome is written
    /// to the backend, so keep it quick (send to a channel, or spawn, to
    /// write to a database). If writing the outcome fails, apalis runs the
    /// job again and the hook hears of that attempt again. A hook that
    /// panics is logged and ignored.
    ///
    /// ```
    /// use eventsink::queue::{Attempt, AttemptOutcome};
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.on_attempt(|a: &Attempt<'_>| {
    ///     if let AttemptOutcome::Dead { cause } = a.outcome {
    ///         eprintln!("{} is a dead letter ({cause:?}): {:?}", a.event_id, a.error);
    ///     }
    /// });
    /// ```
    pub fn on_attempt(mut self, hook: impl Fn(&Attempt<'_>) + Send + Sync + 'static) -> Self {
        self.observer.hook = Some(Arc::new(hook));
        self
    }

    /// How often the worker reads the queue's stats for the
    /// [`QUEUE_DEPTH`](crate::metrics::QUEUE_DEPTH) gauge
    /// ([`DEFAULT_DEPTH_INTERVAL`](crate::metrics::DEFAULT_DEPTH_INTERVAL));
    /// `None` reports no depth (when another process does). Feature
    /// `metrics`.
    ///
    /// ```
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.depth_interval(Some(std::time::Duration::from_secs(60)));
    /// ```
    #[cfg(feature = "metrics")]
    pub fn depth_interval(mut self, every: Option<Duration>) -> Self {
        self.depth_interval = every.map(|d| d.max(Duration::from_millis(1)));
        self
    }

    /// Timeout of each delivery attempt ([`DEFAULT_ATTEMPT_TIMEOUT`]); a
    /// timed-out attempt is a transient failure.
    ///
    /// ```
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.attempt_timeout(std::time::Duration::from_secs(5));
    /// ```
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Deliveries at once ([`DEFAULT_CONCURRENCY`]); 0 counts as 1.
    ///
    /// ```
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.concurrency(4);
    /// ```
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How often an idle worker polls ([`DEFAULT_POLL_INTERVAL`]).
    ///
    /// ```
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.poll_interval(std::time::Duration::from_millis(100));
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Most jobs taken from the backend in one query
    /// ([`DEFAULT_FETCH_BATCH`]; on Postgres
    /// `POSTGRES_FETCH_BATCH`); never fewer than the
    /// [`concurrency`](QueueWorker::concurrency). Smaller spreads a short
    /// burst more evenly over several worker processes; larger saves
    /// queries when a backlog drains. The memory backend ignores it.
    ///
    /// ```
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.fetch_batch(64);
    /// ```
    pub fn fetch_batch(mut self, jobs: usize) -> Self {
        self.fetch_batch = Some(jobs.max(1));
        self
    }

    /// The retry schedule ([`RetrySchedule::standard`]).
    ///
    /// ```
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.schedule(eventsink::queue::RetrySchedule::go_original());
    /// ```
    pub fn schedule(mut self, schedule: RetrySchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Delete completed jobs older than this, hourly ([`DEFAULT_RETENTION`]);
    /// `None` keeps them (for an external clean-up).
    ///
    /// ```
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let w = w.retention(Some(std::time::Duration::from_secs(7 * 24 * 3600)));
    /// ```
    pub fn retention(mut self, keep_for: Option<Duration>) -> Self {
        self.retention = keep_for;
        self
    }
}

impl<S, B, P> QueueWorker<S, B, P>
where
    S: Sink<P, Error: Into<BoxError>, Future: Send> + Clone + Send + 'static,
    B: QueueBackend<P>,
    P: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Runs the worker on a new tokio task until the handle's
    /// [`shutdown`](WorkerHandle::shutdown). Call it inside a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let handle = w.spawn();
    /// handle.shutdown().await;
    /// # }
    /// ```
    pub fn spawn(self) -> WorkerHandle {
        let (stop, stopped) = watch::channel(false);
        let restarts = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(self.supervise(stopped, Arc::clone(&restarts)));
        WorkerHandle {
            stop,
            task,
            restarts,
        }
    }

    /// Runs the worker until `signal` resolves (e.g.
    /// `tokio::signal::ctrl_c()`), then lets deliveries in flight finish.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// w.run_until(async {}).await;
    /// # }
    /// ```
    pub async fn run_until<F>(self, signal: F)
    where
        F: Future + Send,
    {
        let (stop, stopped) = watch::channel(false);
        let supervise = self.supervise(stopped, Arc::new(AtomicU64::new(0)));
        let signal = async move {
            signal.await;
            let _ = stop.send(true);
        };
        futures::future::join(supervise, signal).await;
    }

    async fn supervise(self, stop: watch::Receiver<bool>, restarts: Arc<AtomicU64>) {
        let queue = self.backend.name().to_owned();
        let deliveries = Arc::new(Deliveries::default());
        let deliver: Delivery<P> = Delivery::new(Deliver {
            inner: BoxCloneService::new(self.sink.map_response(drop).map_err(Into::into)),
            backend: self.backend.clone(),
            schedule: Arc::new(self.schedule),
            timeout: self.attempt_timeout,
            deliveries: Arc::clone(&deliveries),
            queue: queue.as_str().into(),
            observer: self.observer.clone(),
        });
        let mut maintenance =
            tokio::spawn(maintain(self.backend.clone(), self.retention, stop.clone()));
        #[cfg(feature = "metrics")]
        let depth = self
            .depth_interval
            .map(|every| tokio::spawn(report_depth(self.backend.clone(), every, stop.clone())));
        let instance = worker_instance();
        let restart_backoff = Backoff::new()
            .min(MIN_RESTART_BACKOFF)
            .max(MAX_RESTART_BACKOFF)
            .jitter(0.0);
        let mut failed_runs = 0;
        for run in 0u64.. {
            if *stop.borrow() {
                break;
            }
            // Unique per process, queue, worker and run: a restart never
            // meets the lease of its own previous run.
            let name = format!("eventsink-{queue}-{instance}-{run}");
            let started = tokio::time::Instant::now();
            // On its own task, so that a panic inside apalis ends this run,
            // not the supervisor.
            let mut run = tokio::spawn(
                self.backend.run_worker(WorkerRun {
                    name: name.clone(),
                    deliver: deliver.clone(),
                    concurrency: self.concurrency,
                    poll_interval: self.poll_interval,
                    fetch_batch: self
                        .fetch_batch
                        .unwrap_or_else(|| self.backend.fetch_batch())
                        .max(self.concurrency),
                    stop: stopped(stop.clone()).boxed(),
                }),
            );
            let lease = tokio::spawn(renew_lease(self.backend.clone(), name.clone()));
            let (end_acks, acks_ended) = tokio::sync::oneshot::channel();
            let acks = tokio::spawn(acknowledge(
                self.backend.clone(),
                Arc::clone(&deliveries),
                name.clone(),
                acks_ended,
            ));
            let ended = {
                let ended = std::pin::pin!(&mut run);
                let stopping = std::pin::pin!(stopped(stop.clone()));
                match futures::future::select(ended, stopping).await {
                    futures::future::Either::Left((ended, _)) => Some(ended),
                    // Stopping on SQLite: drop apalis' run at once (a fetch
                    // it is in the middle of would otherwise hold its
                    // transaction, and the file's write lock, for the whole
                    // drain); the deliveries in flight run on tasks of their
                    // own and finish below, and the jobs it fetched are
                    // handed back.
                    futures::future::Either::Right(((), _)) if self.backend.drops_run_on_stop() => {
                        run.abort();
                        let _ = (&mut run).await;
                        Some(Ok(Ok(())))
                    }
                    // Elsewhere apalis stops its run itself, letting the
                    // deliveries finish, while we keep the run's lease (a
                    // stopping apalis worker sends no heartbeats).
                    futures::future::Either::Right(((), _)) => {
                        let drain = std::pin::pin!(tokio::time::timeout(
                            self.attempt_timeout + SHUTDOWN_MARGIN,
                            &mut run
                        ));
                        let lease = std::pin::pin!(keep_lease(&self.backend, &name));
                        match futures::future::select(drain, lease).await {
                            futures::future::Either::Left((drained, _)) => drained.ok(),
                            futures::future::Either::Right(((), _)) => None,
                        }
                    }
                }
            };
            let result = match ended {
                Some(Ok(result)) => result,
                Some(Err(panic)) => Err(format!("the worker panicked: {panic}").into()),
                None => {
                    run.abort();
                    tracing::warn!(worker = %name, "worker did not stop in time; abandoned");
                    Ok(())
                }
            };
            drain(&self.backend, self.attempt_timeout, &deliveries, &name).await;
            // One statement at most is cut short: no transaction.
            lease.abort();
            let _ = end_acks.send(());
            let _ = acks.await;
            if let Err(e) = self
                .backend
                .store()
                .release_worker(&name, deliveries.take_done())
                .await
            {
                tracing::warn!(worker = %name, error = %e, "could not hand back the worker's jobs");
            }
            if *stop.borrow() {
                if let Err(e) = result {
                    tracing::warn!(worker = %name, error = %e, "worker failed while stopping");
                }
                break;
            }
            if started.elapsed() >= HEALTHY_RUN {
                failed_runs = 0;
            }
            let backoff = restart_backoff.step(failed_runs);
            match result {
                Ok(()) => tracing::warn!(worker = %name, "worker ended unasked; restarting"),
                Err(e) => tracing::error!(
                    worker = %name, error = %e, ?backoff, "worker failed; restarting after backoff"
                ),
            }
            if sleep_or_stop(backoff, &stop).await {
                break;
            }
            restarts.fetch_add(1, Ordering::Relaxed);
            failed_runs += 1;
        }
        // Stopped, not aborted: a statement it sent still ends (or its
        // transaction is rolled back) before `shutdown` returns.
        if tokio::time::timeout(SHUTDOWN_MARGIN, &mut maintenance)
            .await
            .is_err()
        {
            maintenance.abort();
        }
        #[cfg(feature = "metrics")]
        if let Some(depth) = depth {
            depth.abort();
        }
    }
}

/// Sets the queue's depth gauge from its stats every `every`, until `stop`.
#[cfg(feature = "metrics")]
async fn report_depth<B: QueueBackend<P>, P>(
    backend: B,
    every: Duration,
    stop: watch::Receiver<bool>,
) {
    let queue = backend.name().to_owned();
    loop {
        match backend.stats().await {
            Ok(stats) => crate::metrics::depth(&queue, &stats),
            Err(e) => tracing::debug!(%queue, error = %e, "could not read the queue's depth"),
        }
        if sleep_or_stop(every, &stop).await {
            return;
        }
    }
}

/// Renews the lease of the run `name` every heartbeat for as long as it
/// runs. apalis sends its heartbeat only when it can hand out a job: while
/// every delivery slot is busy and fetched jobs wait in its buffer (a slow
/// sink, a fetch batch larger than the concurrency), it sends none, and
/// after the lease other workers took over the jobs this one still held,
/// and delivered them at the same time.
async fn renew_lease<B: QueueBackend<P>, P>(backend: B, name: String) {
    let (beat, _) = backend.lease();
    loop {
        tokio::time::sleep(beat).await;
        if let Err(e) = backend.store().keep_alive(&name).await {
            tracing::warn!(worker = %name, error = %e, "could not renew the worker's lease");
        }
    }
}

/// Lets the deliveries of the run `name` finish (at most the attempt
/// timeout plus a margin) while keeping its lease; those still running
/// then, or when the lease could no longer be renewed, are dropped (and
/// their jobs handed back), so no other worker ever runs a job while one of
/// this run's deliveries still does.
async fn drain<B: QueueBackend<P>, P>(
    backend: &B,
    attempt_timeout: Duration,
    deliveries: &Deliveries,
    name: &str,
) {
    let idle = std::pin::pin!(tokio::time::timeout(
        attempt_timeout + SHUTDOWN_MARGIN,
        deliveries.idle()
    ));
    let lease = std::pin::pin!(keep_lease(backend, name));
    let drained = match futures::future::select(idle, lease).await {
        futures::future::Either::Left((idle, _)) => idle.is_ok(),
        futures::future::Either::Right(((), _)) => false,
    };
    if !drained {
        tracing::warn!(worker = %name, "deliveries did not finish in time; dropped");
        deliveries.abort_all();
    }
}

/// Most ids of recorded outcomes kept for [`Deliveries::take_done`]: far
/// more than are recorded between two of [`acknowledge`]'s writes, or than
/// apalis leaves unacknowledged where nothing else marks them done.
const DONE_KEPT: usize = 4096;

/// How long [`acknowledge`] gathers recorded outcomes before it marks
/// their jobs done in one write: 10 ms. A worker killed in that window
/// delivers those jobs again; a shorter one costs more writes (a commit
/// each, an fsync on Postgres) while a backlog drains.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// The deliveries of one worker. Each runs on a task of its own, so that a
/// stopping worker can drop its apalis run at once while they finish; the
/// ids of the jobs whose outcome they recorded are kept, to be marked done
/// if apalis did not acknowledge them before its run was dropped.
#[derive(Default)]
pub(crate) struct Deliveries {
    running: std::sync::Mutex<std::collections::HashMap<u64, tokio::task::AbortHandle>>,
    count: watch::Sender<usize>,
    next: AtomicU64,
    done: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// Notified when an id joins `done`.
    recorded: tokio::sync::Notify,
}

impl Deliveries {
    /// Runs `work` (the delivery of job `id`) on its own task; the future
    /// waits for it.
    fn spawn(
        self: &Arc<Self>,
        id: Option<String>,
        work: BoxFuture<'static, Result<(), BoxError>>,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let this = Arc::clone(self);
        let mut running = self.lock_running();
        let task = tokio::spawn(async move {
            let result = work.await;
            if let (Ok(()), Some(id)) = (&result, id) {
                let mut done = this.done.lock().unwrap_or_else(|p| p.into_inner());
                if done.len() == DONE_KEPT {
                    done.pop_front();
                }
                done.push_back(id);
                drop(done);
                this.recorded.notify_one();
            }
            this.lock_running().remove(&key);
            this.count.send_modify(|n| *n = n.saturating_sub(1));
            result
        });
        running.insert(key, task.abort_handle());
        self.count.send_modify(|n| *n += 1);
        drop(running);
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the delivery task ended: {e}").into()))
        })
    }

    /// Resolves once no delivery runs.
    async fn idle(&self) {
        let _ = self.count.subscribe().wait_for(|&n| n == 0).await;
    }

    /// Drops every delivery still running.
    fn abort_all(&self) {
        for (_, task) in self.lock_running().drain() {
            task.abort();
        }
        self.count.send_replace(0);
    }

    /// The ids of the jobs whose outcome was recorded since the last call.
    fn take_done(&self) -> Vec<String> {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.drain(..).collect()
    }

    /// Puts back ids [`take_done`](Deliveries::take_done) gave, that
    /// could not be marked done.
    fn give_back(&self, ids: Vec<String>) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids.into_iter().rev() {
            if done.len() == DONE_KEPT {
                break;
            }
            done.push_front(id);
        }
    }

    fn lock_running(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, tokio::task::AbortHandle>> {
        // Each update is one insert, remove or drain: a panic elsewhere
        // cannot leave the map half changed.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks the jobs of the run `name` done as their outcomes are recorded,
/// [`ACK_DELAY`] after the first of a group, until `end` resolves (a write
/// under way finishes first). apalis acknowledges a fetched batch only once
/// it has handed it all out, so without this a killed worker would deliver
/// up to a whole fetch batch again, not only the deliveries under way.
/// Ends at once where the store leaves that to apalis; ids that could not
/// be marked are kept for the run's release.
async fn acknowledge<B: QueueBackend<P>, P>(
    backend: B,
    deliveries: Arc<Deliveries>,
    name: String,
    mut end: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let recorded = std::pin::pin!(deliveries.recorded.notified());
        if let futures::future::Either::Right(_) = futures::future::select(recorded, &mut end).await
        {
            return;
        }
        tokio::time::sleep(ACK_DELAY).await;
        let ids = deliveries.take_done();
        if ids.is_empty() {
            continue;
        }
        match backend.store().mark_done(&name, ids.clone()).await {
            Ok(Some(skipped)) => deliveries.give_back(skipped),
            Ok(None) => return deliveries.give_back(ids),
            Err(e) => {
                tracing::debug!(worker = %name, error = %e, "could not mark delivered jobs done");
                deliveries.give_back(ids);
            }
        }
    }
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|&s| s).await;
}

/// Renews the lease of the worker run `name` while it drains. A stopping
/// apalis worker sends no heartbeats while its deliveries finish (it no
/// longer polls its backend, where apalis drives them), so without this a
/// drain longer than the lease (heartbeat × missed; the default drain of
/// attempt timeout + 5 s = 20 s outlasts the default 15 s lease) lets other
/// workers deliver the same jobs at the same time. Renews twice per
/// heartbeat interval (leases are counted in whole seconds).
///
/// Returns, so that the drain is cut short, when renewing has failed for
/// so long that the lease could lapse: then the run's deliveries are
/// dropped and its jobs handed back, and no other worker runs them while
/// this one still does. (On SQLite, a stop that meets apalis mid-fetch
/// leaves that write transaction open until the run is dropped, and every
/// renewal fails meanwhile.)
async fn keep_lease<B: QueueBackend<P>, P>(backend: &B, name: &str) {
    let (beat, lease) = backend.lease();
    let every = (beat / 2).max(Duration::from_millis(100));
    // apalis' last heartbeat may be a beat old; then whole-second rounding
    // and the abort itself get LEASE_MARGIN.
    let mut deadline =
        tokio::time::Instant::now() + lease.saturating_sub(beat).saturating_sub(LEASE_MARGIN);
    loop {
        match tokio::time::timeout_at(deadline, backend.store().keep_alive(name)).await {
            Ok(Ok(())) => {
                deadline = tokio::time::Instant::now() + lease.saturating_sub(LEASE_MARGIN)
            }
            Ok(Err(e)) => {
                tracing::warn!(worker = %name, error = %e, "could not renew the lease while stopping")
            }
            Err(_) => {}
        }
        let next = tokio::time::Instant::now() + every;
        if next >= deadline {
            tokio::time::sleep_until(deadline).await;
            tracing::warn!(
                worker = %name,
                "the lease could not be renewed while stopping; deliveries in flight are dropped \
                 before it lapses, and their jobs handed back"
            );
            return;
        }
        tokio::time::sleep_until(next).await;
    }
}

/// Sleeps for `duration`; `true` if `stop` came first.
async fn sleep_or_stop(duration: Duration, stop: &watch::Receiver<bool>) -> bool {
    let sleep = std::pin::pin!(tokio::time::sleep(duration));
    let stop = std::pin::pin!(stopped(stop.clone()));
    matches!(
        futures::future::select(sleep, stop).await,
        futures::future::Either::Right(_)
    )
}

/// `{pid}-{counter}-{random}`: unique among the workers of this process and
/// very likely among processes sharing a backend.
fn worker_instance() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// The worker's upkeep, at start and then every [`RETENTION_EVERY`]: bury
/// the jobs apalis gave up on, then apply retention (if any).
async fn maintain<B: QueueBackend<P>, P>(
    backend: B,
    retention: Option<Duration>,
    stop: watch::Receiver<bool>,
) {
    let queue = backend.name().to_owned();
    loop {
        match backend.store().bury_abandoned().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(%queue, buried = n, "jobs apalis gave up on are dead letters now")
            }
            Err(e) => {
                tracing::warn!(%queue, error = %e, "could not bury the jobs apalis gave up on")
            }
        }
        if let Some(age) = retention {
            match backend.store().delete_completed(age).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(%queue, removed = n, "retention"),
                Err(e) => tracing::warn!(%queue, error = %e, "retention failed"),
            }
        }
        if sleep_or_stop(RETENTION_EVERY, &stop).await {
            return;
        }
    }
}

/// Stops a spawned [`QueueWorker`]. Dropping the handle stops the worker too
/// (gracefully, in the background): keep it for as long as it should run.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
/// let handle = w.spawn();
/// handle.shutdown().await; // deliveries in flight finish first
/// # }
/// ```
#[derive(Debug)]
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    restarts: Arc<AtomicU64>,
}

impl WorkerHandle {
    /// Stops taking new jobs, waits for deliveries in flight to finish and
    /// their outcome to be written, hands back the jobs fetched but not
    /// started, then returns. On SQLite the apalis worker is dropped at
    /// once (the deliveries run on tasks of their own), so a fetch it was in
    /// the middle of never holds the file's write lock during the wait.
    /// While it waits, the worker renews its lease, so no other
    /// worker takes over a job it is still delivering, however long the
    /// lease. It waits at most the attempt timeout plus 5 s, and never
    /// past the moment its lease could lapse if it cannot renew it; then
    /// the deliveries still running are dropped, and the jobs they held
    /// are delivered again by others (at-least-once, never at the same
    /// time).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// w.spawn().shutdown().await;
    /// # }
    /// ```
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "queue worker task panicked");
        }
    }

    /// How many times the worker was restarted after a backend failure.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let handle = w.spawn();
    /// assert_eq!(handle.restarts(), 0);
    /// # handle.shutdown().await;
    /// # }
    /// ```
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Whether the worker's task has ended (only after a shutdown or a
    /// panic: backend failures restart it).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let w = eventsink::queue::QueueWorker::new(eventsink::queue::MemoryQueue::<serde_json::Value>::new("q"), eventsink::NoopSink::new());
    /// let handle = w.spawn();
    /// assert!(!handle.is_finished());
    /// # handle.shutdown().await;
    /// # }
    /// ```
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The apalis job handler: one delivery attempt of a [`QueuedEvent`], then
/// its consequence (done, next attempt scheduled, or dead letter).
///
/// It answers `Ok` whenever the outcome is recorded, so apalis marks the
/// job done and never applies its own retries (see the module docs). It
/// answers `Err` only when recording the outcome failed; apalis then runs
/// the job again.
struct Deliver<P, B> {
    inner: BoxCloneService<Event<P>, (), BoxError>,
    backend: B,
    schedule: Arc<RetrySchedule>,
    timeout: Duration,
    deliveries: Arc<Deliveries>,
    queue: Arc<str>,
    observer: Observer,
}

impl<P, B: Clone> Clone for Deliver<P, B> {
    fn clone(&self) -> Self {
        Deliver {
            inner: self.inner.clone(),
            backend: self.backend.clone(),
            schedule: Arc::clone(&self.schedule),
            timeout: self.timeout,
            deliveries: Arc::clone(&self.deliveries),
            queue: Arc::clone(&self.queue),
            observer: self.observer.clone(),
        }
    }
}

impl<P, B: fmt::Debug> fmt::Debug for Deliver<P, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliver")
            .field("backend", &self.backend)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<P, B> Service<Task<QueuedEvent<P>>> for Deliver<P, B>
where
    B: QueueBackend<P>,
    P: Send + Sync + 'static,
{
    type Response = ();
    type Error = BoxError;
    /// An async block: the attempt, then writing its consequence.
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, task: Task<QueuedEvent<P>>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let chain = chain_of(&task);
        let id = task.task_id().map(|id| id.to_string());
        let mut job = task.args;
        job.chain = chain;
        let backend = self.backend.clone();
        let schedule = Arc::clone(&self.schedule);
        let timeout = self.timeout;
        let queue = Arc::clone(&self.queue);
        let observer = self.observer.clone();
        let span = observe::delivery_span(&queue, &job);
        let work = async move {
            let started = std::time::Instant::now();
            let failure = attempt(&mut inner, job.event.clone(), timeout).await.err();
            let duration = started.elapsed();
            let consequence = match &failure {
                None => Consequence::Done,
                Some((err, transient)) => consequence(&schedule, &job, err, *transient),
            };
            observer.report(
                &queue,
                &job,
                consequence.outcome(),
                failure.as_ref().map(|(err, _)| err),
                duration,
            );
            let err = match failure {
                Some((err, _)) => err,
                None => return Ok(()),
            };
            match consequence {
                Consequence::Done => {}
                Consequence::Retry(delay) => {
                    tracing::debug!(
                        event = %job.event.id, attempt = job.attempt, ?delay, error = %err,
                        "delivery failed; next attempt scheduled"
                    );
                    // The key names this chain and attempt: a conflict can
                    // only be this same job run twice (its acknowledgement
                    // was lost), whose next attempt is stored already.
                    backend.push(vec![(job.next_attempt(), delay)]).await?;
                }
                Consequence::Bury(cause) => {
                    tracing::warn!(
                        event = %job.event.id, attempt = job.attempt, ?cause, error = %err,
                        "delivery failed; event is now a dead letter"
                    );
                    let span = observe::dead_letter_span(&queue, &job, cause);
                    backend
                        .store()
                        .bury(DeadLetter {
                            event: job.event,
                            attempts: job.attempt,
                            last_error: err.to_string(),
                            cause,
                            failed_at: Utc::now(),
                            key: job.key,
                            chain: job.chain,
                        })
                        .instrument(span)
                        .await?;
                }
            }
            Ok(())
        }
        .instrument(span);
        self.deliveries.spawn(id, Box::pin(work))
    }
}

/// What follows a delivery attempt.
enum Consequence {
    /// Delivered.
    Done,
    /// The next attempt, after this delay.
    Retry(Duration),
    /// A dead letter.
    Bury(DeathCause),
}

impl Consequence {
    /// The outcome the hook, the span and the metrics report.
    fn outcome(&self) -> AttemptOutcome {
        match *self {
            Consequence::Done => AttemptOutcome::Delivered,
            Consequence::Retry(delay) => AttemptOutcome::Retrying {
                next_due: Utc::now() + delay,
            },
            Consequence::Bury(cause) => AttemptOutcome::Dead { cause },
        }
    }
}

/// One attempt: `event` to `inner` within `timeout`. A failure comes with
/// whether it is transient; a sink that panics (in `call` or in its
/// future) fails permanently (it would panic again), and the worker lives
/// on.
async fn attempt<P>(
    inner: &mut BoxCloneService<Event<P>, (), BoxError>,
    event: Event<P>,
    timeout: Duration,
) -> Result<(), (BoxError, bool)> {
    // `call` itself runs inside `catch_unwind` too: a sink may panic
    // before it returns its future.
    let attempt = std::panic::AssertUnwindSafe(tokio::time::timeout(timeout, async move {
        inner.call(event).await
    }))
    .catch_unwind();
    match attempt.await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => {
            let transient = e.is_retryable();
            Err((e, transient))
        }
        Ok(Err(elapsed)) => Err((elapsed.into(), true)),
        Err(panic) => Err((
            format!("the sink panicked: {}", panic_message(&*panic)).into(),
            false,
        )),
    }
}

/// The consequence of `job`'s failed attempt: the next attempt if `err`
/// is transient and the schedule has one, else a dead letter.
fn consequence<P>(
    schedule: &RetrySchedule,
    job: &QueuedEvent<P>,
    err: &BoxError,
    transient: bool,
) -> Consequence {
    if !transient {
        return Consequence::Bury(DeathCause::Permanent);
    }
    match schedule.delay_after(job.attempt, err.retry_after()) {
        Some(delay) => Consequence::Retry(delay),
        None => Consequence::Bury(DeathCause::OutOfAttempts),
    }
}

/// The delivery chain of `task`: its own, or for a job written before
/// chains existed the backend's id of the job, the same each time the job
/// runs (a new id where a backend has none).
fn chain_of<P>(task: &Task<QueuedEvent<P>>) -> String {
    if !task.args.chain.is_empty() {
        return task.args.chain.clone();
    }
    match task.task_id() {
        Some(id) => id.to_string(),
        None => uuid::Uuid::now_v7().simple().to_string(),
    }
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&'static str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}
