//! [`QueueBackend`]: what the publishing service, the worker and the
//! dead-letter API need from a backend. Implemented by the four backends of
//! this crate only (the operations live in a private supertrait).

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Published;
use super::error::QueueError;
use super::job::DeadLetter;
use super::job::QueuedEvent;
use super::stats::QueueStats;
use crate::BoxError;

/// A queue backend: [`MemoryQueue`](super::MemoryQueue), and with their
/// features `SqliteQueue`, `PostgresQueue` and `RedisQueue`. Sealed: the
/// guarantees of the module docs rest on each backend's details.
///
/// ```
/// use eventsink::queue::{MemoryQueue, QueueBackend};
///
/// fn queue_name<B: QueueBackend<serde_json::Value>>(backend: &B) -> &str {
///     QueueBackend::name(backend)
/// }
/// assert_eq!(queue_name(&MemoryQueue::new("orders")), "orders");
/// ```
pub trait QueueBackend<P>: ops::Ops<P> + Clone + Send + Sync + fmt::Debug + 'static {
    /// The queue's name.
    ///
    /// ```
    /// use eventsink::queue::{MemoryQueue, QueueBackend};
    /// assert_eq!(QueueBackend::<()>::name(&MemoryQueue::<()>::new("q")), "q");
    /// ```
    fn name(&self) -> &str {
        self.queue_name()
    }

    /// Deletes this queue's completed jobs that finished at least
    /// `older_than` ago; how many. A job is completed when its outcome is
    /// recorded: delivered, its next attempt stored, or its dead letter
    /// written. Jobs that are not (due, scheduled, running, or left failed
    /// by apalis) are never removed. The [`QueueWorker`](super::QueueWorker) does
    /// this hourly (its `retention`); call it yourself if you turned that
    /// off. Completed jobs hold the idempotency keys, so this also ends the
    /// window in which publishing the same event again is ignored. The
    /// memory backend keeps no completed jobs (0).
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventsink::queue::{MemoryQueue, QueueBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::queue::QueueError> {
    /// let queue: MemoryQueue = MemoryQueue::new("q");
    /// assert_eq!(queue.remove_completed(Duration::from_secs(3600)).await?, 0);
    /// # Ok(()) }
    /// ```
    fn remove_completed(
        &self,
        older_than: Duration,
    ) -> BoxFuture<'static, Result<u64, QueueError>> {
        ops::Store::delete_completed(self.store(), older_than)
    }

    /// A snapshot of the queue: jobs pending, scheduled and running, dead
    /// letters, and the oldest pending job's due time. What each counts on
    /// each backend is on [`QueueStats`].
    ///
    /// ```
    /// use eventsink::queue::{MemoryQueue, QueueBackend, ThroughTaskQueue};
    /// use eventsink::{Event, NoopSink, SinkExt};
    /// use tower::Layer;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// let queue: MemoryQueue = MemoryQueue::new("q");
    /// let mut sink = ThroughTaskQueue::new(queue.clone()).layer(NoopSink::new());
    /// sink.publish(Event::new("ping", serde_json::json!(1))).await?;
    /// assert_eq!(queue.stats().await?.pending, 1); // no worker yet
    /// # Ok(()) }
    /// ```
    fn stats(&self) -> BoxFuture<'static, Result<QueueStats, QueueError>> {
        ops::Store::stats(self.store())
    }
}

/// The payload type a backend stores: `P` of `MemoryQueue<P>`,
/// `SqliteQueue<P>`, `PostgresQueue<P>` and `RedisQueue<P>`. It lets types
/// that hold a backend name the payload from it, as
/// [`DeadLetters<B>`](super::DeadLetters) does.
///
/// ```
/// use eventsink::queue::{BackendPayload, MemoryQueue};
///
/// let payload: <MemoryQueue<u32> as BackendPayload>::Payload = 7u32;
/// # let _ = payload;
/// ```
pub trait BackendPayload {
    /// The payload of the events the backend stores.
    type Payload;
}

impl<P, T> QueueBackend<P> for T where T: ops::Ops<P> + Clone + Send + Sync + fmt::Debug + 'static {}

pub(crate) mod ops {
    use super::*;

    /// The job handler a worker gives the backend's apalis worker: one
    /// delivery attempt of a job, then its consequence. Boxed, so that a
    /// backend needs nothing of the worker.
    pub struct Delivery<P>(
        tower::util::BoxCloneService<apalis_core::task::Task<QueuedEvent<P>>, (), BoxError>,
    );

    impl<P> Delivery<P> {
        /// Boxes the worker's handler.
        pub(crate) fn new<S>(handler: S) -> Self
        where
            S: tower::Service<
                    apalis_core::task::Task<QueuedEvent<P>>,
                    Response = (),
                    Error = BoxError,
                    Future = BoxFuture<'static, Result<(), BoxError>>,
                > + Clone
                + Send
                + 'static,
        {
            Delivery(tower::util::BoxCloneService::new(handler))
        }
    }

    impl<P> fmt::Debug for Delivery<P> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Delivery").finish_non_exhaustive()
        }
    }

    impl<P> Clone for Delivery<P> {
        fn clone(&self) -> Self {
            Delivery(self.0.clone())
        }
    }

    impl<P> tower::Service<apalis_core::task::Task<QueuedEvent<P>>> for Delivery<P> {
        type Response = ();
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<(), BoxError>>;

        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, task: apalis_core::task::Task<QueuedEvent<P>>) -> Self::Future {
            self.0.call(task)
        }
    }

    /// What a backend operation returns: a `'static` future (it owns a
    /// clone of the pool or connection) of its result.
    pub(crate) type Answer<T> = BoxFuture<'static, Result<T, QueueError>>;

    /// Jobs to store, each with the delay after which it is due.
    pub(crate) type Jobs<P> = Vec<(QueuedEvent<P>, Duration)>;

    /// A payload the queue can store: every bound the backends need, once.
    pub trait Payload: Serialize + DeserializeOwned + Send + Sync + 'static {}

    impl<P: Serialize + DeserializeOwned + Send + Sync + 'static> Payload for P {}

    /// One run of an apalis worker: its name, its handler, how many
    /// deliveries at once, how often it polls when idle, and the future
    /// that stops it.
    pub struct WorkerRun<P> {
        /// The worker's name, unique per run.
        pub name: String,
        /// The job handler.
        pub deliver: Delivery<P>,
        /// Deliveries at once.
        pub concurrency: usize,
        /// Idle polling interval.
        pub poll_interval: Duration,
        /// Most jobs fetched in one query (at least `concurrency`).
        pub fetch_batch: usize,
        /// Resolves when the run should stop.
        pub stop: BoxFuture<'static, ()>,
    }

    impl<P> fmt::Debug for WorkerRun<P> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("WorkerRun")
                .field("name", &self.name)
                .field("concurrency", &self.concurrency)
                .field("poll_interval", &self.poll_interval)
                .field("fetch_batch", &self.fetch_batch)
                .finish_non_exhaustive()
        }
    }

    /// A page of [`Store::dead_after`]: the letters, and the place (stored
    /// failure time, key) of the last one in the order (`None` for an empty
    /// page). The place comes from the order itself: a letter rewritten since
    /// may carry a later time than the one it was listed at.
    #[derive(Debug)]
    pub struct DeadPage<P> {
        /// The letters.
        pub letters: Vec<DeadLetter<P>>,
        /// The place of the last one.
        pub last: Option<Place>,
    }

    /// The operations behind [`QueueBackend`] that move jobs: publishing
    /// and running apalis' worker. Every future is `'static` (it owns a
    /// clone of the pool or connection).
    pub trait Ops<P>: Parts<P> {
        /// Stores jobs, each due after its delay, in one backend call;
        /// per job, in order, whether it was stored or its idempotency key
        /// was already held (by the backend, or an earlier job of `jobs`).
        fn push(&self, jobs: Jobs<P>) -> Answer<Vec<Published>>;

        /// How many group-commit batches may be written at once: 1 where
        /// writers only queue behind each other (SQLite, memory).
        fn parallel_batches(&self) -> usize {
            1
        }

        /// How many jobs a worker fetches at once unless told
        /// ([`QueueWorker::fetch_batch`](crate::queue::QueueWorker::fetch_batch)).
        fn fetch_batch(&self) -> usize {
            crate::queue::DEFAULT_FETCH_BATCH
        }

        /// Whether a stopping worker drops its apalis run at once (and lets
        /// its deliveries finish on their own tasks) instead of letting
        /// apalis stop it. SQLite: a stopping apalis worker no longer polls
        /// a fetch it is in the middle of, whose transaction then holds the
        /// file's write lock until the run is dropped. The store's
        /// [`release_worker`](Store::release_worker) must hand the run's
        /// jobs back.
        fn drops_run_on_stop(&self) -> bool {
            false
        }

        /// Runs one apalis worker until its `stop` resolves (then `Ok`) or
        /// the backend fails (then `Err`, and the caller restarts).
        fn run_worker(&self, run: WorkerRun<P>) -> BoxFuture<'static, Result<(), BoxError>>;
    }

    /// What every backend has: a name, a [`Store`], a lease. Written by
    /// [`queue_handle`](super::queue_handle).
    pub trait Parts<P> {
        /// Where the backend keeps dead letters and does its upkeep.
        type Store: Store<P>;

        /// The backend's [`Store`].
        fn store(&self) -> &Self::Store;

        /// The queue's name.
        fn queue_name(&self) -> &str;

        /// The heartbeat interval, and the lease: how long after a worker's
        /// last heartbeat other workers take over its jobs.
        fn lease(&self) -> (Duration, Duration) {
            lease(
                super::super::DEFAULT_HEARTBEAT_INTERVAL,
                super::super::DEFAULT_MISSED_HEARTBEATS,
            )
        }
    }

    /// A place in the order of dead letters: failure time in
    /// microseconds, key.
    pub(crate) type Place = (i64, String);

    /// The heartbeat interval and the lease of `missed` heartbeats.
    pub(crate) fn lease(beat: Duration, missed: usize) -> (Duration, Duration) {
        let missed = u32::try_from(missed).unwrap_or(u32::MAX);
        (beat, beat.saturating_mul(missed))
    }

    /// The operations behind [`QueueBackend`] that keep records: dead
    /// letters, and the worker's upkeep of apalis' jobs.
    pub trait Store<P>: Send + Sync {
        /// Creates what the store keeps its records in, or upgrades it;
        /// run once when the backend opens.
        fn prepare(&self) -> Answer<()> {
            Box::pin(async { Ok(()) })
        }

        /// Stores a dead letter, replacing the one with the same key.
        fn bury(&self, dead: DeadLetter<P>) -> Answer<()>;

        /// Dead letters, oldest first (by failure time, then key).
        fn dead_page(&self, offset: u64, limit: u64) -> Answer<Vec<DeadLetter<P>>>;

        /// Up to `limit` dead letters stored as failed at or before `until`
        /// (Unix microseconds) after the place `after` (failure time in
        /// microseconds, key) in the order of [`dead_page`](Store::dead_page),
        /// with the place of the last one listed: the next call's `after`.
        fn dead_after(&self, after: Option<Place>, until: i64, limit: u64) -> Answer<DeadPage<P>>;

        /// One dead letter by key.
        fn dead_get(&self, key: &str) -> Answer<Option<DeadLetter<P>>>;

        /// Deletes exactly `letter` (same key, chain and failure time) if
        /// it is still stored; whether it did. A letter written since under
        /// the same key, even by the same chain, stays.
        fn dead_remove(&self, letter: &DeadLetter<P>) -> Answer<bool>;

        /// Deletes every dead letter of the queue; how many.
        fn dead_purge(&self) -> Answer<u64>;

        /// How many dead letters the queue has.
        fn dead_count(&self) -> Answer<u64>;

        /// A snapshot of the queue's jobs and dead letters, as
        /// [`QueueStats`] defines them for each backend.
        fn stats(&self) -> Answer<QueueStats>;

        /// Deletes this queue's jobs that finished with their outcome
        /// recorded (apalis' `Done`) at least `age` ago; how many. A job
        /// apalis holds as failed, killed or scheduled is never removed.
        fn delete_completed(&self, age: Duration) -> Answer<u64>;

        /// Turns the jobs of this queue that apalis gave up on (killed, or
        /// failed past its own attempt limit: the worker could not record
        /// their outcome) into dead letters and marks them done; how many.
        fn bury_abandoned(&self) -> Answer<u64> {
            Box::pin(async { Ok(0) })
        }

        /// Ends a worker run's hold on its jobs, so that others need not
        /// wait for its lease to expire: the jobs in `done` (whose outcome
        /// the run recorded, but apalis may not have acknowledged) are
        /// marked done, every other job it holds goes back to the queue.
        /// At worst a job whose outcome was recorded but is missing from
        /// `done` runs again (at-least-once).
        fn release_worker(&self, _name: &str, _done: Vec<String>) -> Answer<()> {
            Box::pin(async { Ok(()) })
        }

        /// Marks done the jobs of `done` that worker `name` still holds,
        /// ahead of apalis' own acknowledgement: apalis acknowledges a
        /// fetched batch's jobs only once it has handed out the whole
        /// batch, and a worker killed meanwhile would deliver them again.
        /// Answers the ids it skipped because another transaction (apalis'
        /// own acknowledgement) held them, to try again; `None` (nothing
        /// done: keep them for [`release_worker`](Store::release_worker))
        /// where apalis acknowledges at once (memory) or the batch stays
        /// small (Redis).
        fn mark_done(&self, _name: &str, _done: Vec<String>) -> Answer<Option<Vec<String>>> {
            Box::pin(async { Ok(None) })
        }

        /// Renews the lease of worker `name` (what apalis' heartbeat
        /// does), every heartbeat while it runs and while it finishes its
        /// deliveries after a stop: apalis sends no heartbeat while its
        /// fetched jobs wait for a free delivery slot, nor once its worker
        /// is stopping. Nothing for the memory backend, which has no
        /// leases.
        fn keep_alive(&self, _name: &str) -> Answer<()> {
            Box::pin(async { Ok(()) })
        }
    }
}

/// Runs the [`WorkerRun`](ops::WorkerRun) `$run` on the apalis backend
/// `$storage`; a `'static` future of `Result<(), BoxError>`. Every backend's `run_worker` ends
/// here. A macro because apalis' `Worker::run` puts bounds on the backend
/// that are long and different for each storage type.
macro_rules! run_apalis {
    ($storage:expr, $run:expr) => {
        run_apalis!($storage, $run, std::convert::identity)
    };
    ($storage:expr, $run:expr, $deliver:expr) => {{
        use apalis::prelude::WorkerBuilderExt as _;
        let run: $crate::queue::backend::ops::WorkerRun<_> = $run;
        let worker = apalis_core::worker::builder::WorkerBuilder::new(run.name)
            .backend($storage)
            .concurrency(run.concurrency)
            .build($deliver(run.deliver));
        let stop = run.stop;
        async move {
            let ran: Result<(), crate::BoxError> = worker
                .run_until(async move {
                    stop.await;
                    Ok::<(), apalis_core::error::WorkerError>(())
                })
                .await
                .map_err(Into::into);
            ran
        }
    }};
}
pub(crate) use run_apalis;

/// A durable backend's apalis storage `$storage` (cloned) with its config
/// `$config`, fetching the [`WorkerRun`](ops::WorkerRun) `$run`'s
/// `fetch_batch` jobs at once, whenever the [`Wakes`] `$wakes` wake it.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
macro_rules! polled {
    ($storage:expr, $config:expr, $wakes:expr, $run:expr) => {{
        use apalis_core::backend::ext::BackendExt as _;
        let config = $config.clone().batch_size($run.fetch_batch.max(1));
        let wakes: $crate::queue::backend::Wakes<_> = $wakes;
        $storage.clone().with_config(config).poll_with_strategy(
            apalis_core::backend::ext::poll_strategy::Strategy::new().stream(wakes),
        )
    }};
}
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) use polled;

/// A backend's cheap check, run at every idle tick, of whether its jobs
/// may have changed since the previous one (SQLite: its write-ahead log's
/// size and modification time).
/// Answering `true` when unsure is always safe: it only costs a fetch.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) type Probe = Box<dyn FnMut() -> bool + Send + Sync>;

/// What wakes an idle apalis worker, which then fetches: the backend's own
/// wake stream `S` (this process's pushes, Postgres' notifications), the
/// ticks of the poll interval that may find something (see [`tick`] and
/// [`watch`]), and the backend's feeders (Redis' subscription), each on a
/// task of its own until this is dropped with the worker run.
///
/// apalis fetches whenever the worker's task is polled, whatever woke it,
/// so the poll interval's timer cannot be polled in that task: every tick
/// would be a fetch. Ticks run elsewhere and wake the worker only when a
/// fetch may find something.
///
/// Each poll drains every source until it is pending, so the worker's
/// waker is always registered with all of them; each wake is followed by
/// one more a poll interval later (`follow_up`). (apalis' own
/// `IntervalStrategy` starts its next interval without polling it: when the
/// fetch that a tick starts completes on its first poll, nothing woke the
/// worker until its next heartbeat, 5 s later, and retries ran in waves.)
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) struct Wakes<S> {
    wake: futures::stream::Fuse<S>,
    /// What the ticks and feeders wake.
    fed: LocalWake,
    fed_wakes: std::pin::Pin<Box<dyn futures::Stream<Item = ()> + Send + Sync>>,
    feeders: Vec<tokio::task::JoinHandle<std::convert::Infallible>>,
    /// The poll interval: how long after a wake the follow-up comes.
    every: Duration,
    /// One more fetch a poll interval after the last wake: the fetch a
    /// wake started may have begun before the job that woke it was
    /// committed, and a wake that comes during a fetch starts none.
    follow_up: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl<S: futures::Stream> Wakes<S> {
    /// Wakes from `wake`, and from ticks of `every` that may find jobs:
    /// with a `probe`, those that [`watch`] lets through, on a thread of its
    /// own; without one, a [`tick`] per second. Call it on the runtime (a
    /// backend's `run_worker` is called there).
    pub(crate) fn new(wake: S, every: Duration, probe: Option<Probe>) -> Self {
        use futures::StreamExt as _;
        let fed = LocalWake::new();
        let wakes = Wakes {
            wake: wake.fuse(),
            fed_wakes: fed.stream(),
            fed,
            feeders: Vec::new(),
            every,
            follow_up: None,
        };
        match probe {
            Some(probe) => {
                let fed = wakes.fed.clone();
                let watching = std::thread::Builder::new()
                    .name("eventsink-watch".into())
                    .spawn(move || watch(every, probe, fed));
                if let Err(error) = watching {
                    // Without the thread, a tick per second still finds jobs.
                    tracing::warn!(%error, "could not start the thread that watches the queue's file");
                    return wakes.fed_by(|fed| tick(every, fed));
                }
                wakes
            }
            None => wakes.fed_by(|fed| tick(every, fed)),
        }
    }

    /// Also wakes whenever the future that `feeder` makes notifies the
    /// wake it is given; the future runs on a task of its own.
    pub(crate) fn fed_by<F>(mut self, feeder: impl FnOnce(LocalWake) -> F) -> Self
    where
        F: Future<Output = std::convert::Infallible> + Send + 'static,
    {
        let feeder = feeder(self.fed.clone());
        self.feeders.push(tokio::spawn(feeder));
        self
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl<S> Drop for Wakes<S> {
    fn drop(&mut self) {
        for feeder in &self.feeders {
            feeder.abort();
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl<S: futures::Stream + Unpin> futures::Stream for Wakes<S> {
    type Item = ();

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<()>> {
        use futures::StreamExt as _;
        let this = &mut *self;
        let mut woken = false;
        while let std::task::Poll::Ready(Some(_)) = this.wake.poll_next_unpin(cx) {
            woken = true;
        }
        while let std::task::Poll::Ready(Some(())) = this.fed_wakes.poll_next_unpin(cx) {
            woken = true;
        }
        if woken {
            this.follow_up = Some(Box::pin(tokio::time::sleep(this.every)));
        }
        if let Some(follow_up) = &mut this.follow_up
            && follow_up.as_mut().poll(cx).is_ready()
        {
            this.follow_up = None;
            woken = true;
        }
        match woken {
            true => std::task::Poll::Ready(Some(())),
            false => std::task::Poll::Pending,
        }
    }
}

/// Wakes the worker through `wake` just after each whole second begins
/// (or every `every`, if that is longer): due times are whole seconds, so
/// retries, and jobs nobody announced (such as those taken over from a dead
/// worker), are found as soon as by a fetch at every tick of `every`, and
/// an idle worker's task wakes once a second instead of at every tick.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
async fn tick(every: Duration, wake: LocalWake) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(every.max(until_next_second())).await;
        wake.notify();
    }
}

/// The wait until the next whole Unix second.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
fn until_next_second() -> Duration {
    let into_second = Duration::from_nanos(u64::from(since_epoch().subsec_nanos()));
    Duration::from_secs(1) - into_second
}

/// Runs `probe` every `every` and wakes the worker through `wake` when it
/// saw a change or a new whole second began (see [`tick`]), until the
/// worker's [`Wakes`] is dropped. On a thread of its own: a thread's sleep
/// costs far less than a wake of the runtime, which the probe's frequent
/// ticks would pay for nothing on an idle queue.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
fn watch(every: Duration, mut probe: Probe, wake: LocalWake) {
    // A zero interval would spin.
    let every = every.max(Duration::from_millis(1));
    let mut woke_in = 0;
    while !wake.is_unheard() {
        std::thread::sleep(every);
        let changed = probe();
        let second = current_second();
        if changed || second != woke_in {
            woke_in = second;
            wake.notify();
        }
    }
}

/// What every backend type has alike, written once: `Clone` (each field is
/// a handle, so no `P: Clone`), a `Debug` that shows only the queue's name,
/// the methods `name` and `dead_letters`, and its [`Parts`](ops::Parts):
/// its store (`self`, or the field that holds it, and its type), and with
/// `leased`, the lease of its apalis `config` field. `$open` is a doc-test
/// line that makes a `queue` of the type.
macro_rules! queue_handle {
    (@store self) => {
        type Store = Self;

        fn store(&self) -> &Self {
            self
        }
    };
    (@store $field:ident: $store:ty) => {
        type Store = $store;

        fn store(&self) -> &$store {
            &self.$field
        }
    };
    (@lease leased) => {
        fn lease(&self) -> (std::time::Duration, std::time::Duration) {
            let config = &self.config;
            $crate::queue::backend::ops::lease(config.heartbeat_interval, config.missed_heartbeats)
        }
    };
    (
        $queue:ident { $($field:ident),+ $(,)? },
        store($($store:tt)+),
        $($leased:ident,)?
        $open:literal
    ) => {
        impl<P: $crate::queue::backend::ops::Payload> $crate::queue::backend::ops::Parts<P>
            for $queue<P>
        {
            $crate::queue::backend::queue_handle!(@store $($store)+);

            fn queue_name(&self) -> &str {
                &self.name
            }

            $($crate::queue::backend::queue_handle!(@lease $leased);)?
        }

        impl<P> $crate::queue::BackendPayload for $queue<P> {
            type Payload = P;
        }

        impl<P> Clone for $queue<P> {
            fn clone(&self) -> Self {
                $queue { $($field: self.$field.clone()),+ }
            }
        }

        impl<P> std::fmt::Debug for $queue<P> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($queue))
                    .field("name", &self.name)
                    .finish_non_exhaustive()
            }
        }

        impl<P> $queue<P> {
            /// The queue's name.
            ///
            /// ```no_run
            /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
            #[doc = $open]
            /// assert_eq!(queue.name(), "q");
            /// # Ok(()) }
            /// ```
            pub fn name(&self) -> &str {
                &self.name
            }
        }

        impl<P: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static> $queue<P> {
            /// The queue's dead letters: list, replay, purge.
            ///
            /// ```no_run
            /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
            #[doc = $open]
            /// println!("{} dead", queue.dead_letters().count().await?);
            /// # Ok(()) }
            /// ```
            pub fn dead_letters(&self) -> $crate::queue::DeadLetters<Self> {
                $crate::queue::DeadLetters::new(self.clone())
            }
        }
    };
}
pub(crate) use queue_handle;

/// The `lease` setter every durable backend's builder has, written once;
/// the builder has the fields `heartbeat` and `missed`. `$builder` is a
/// doc-test expression for a builder of the type.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
macro_rules! lease_setter {
    ($builder:literal) => {
        /// Worker heartbeat and how many may be missed before another worker
        /// takes over the jobs of a dead one
        /// ([`DEFAULT_HEARTBEAT_INTERVAL`](crate::queue::DEFAULT_HEARTBEAT_INTERVAL) ×
        /// [`DEFAULT_MISSED_HEARTBEATS`](crate::queue::DEFAULT_MISSED_HEARTBEATS)).
        ///
        /// ```
        #[doc = concat!("let b = ", $builder, ";")]
        /// let b = b.lease(std::time::Duration::from_secs(1), 2); // takeover after ~2 s
        /// ```
        pub fn lease(mut self, heartbeat: Duration, missed: usize) -> Self {
            self.heartbeat = heartbeat;
            self.missed = missed.max(1);
            self
        }
    };
}
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) use lease_setter;

/// The first whole Unix second at least `delay` from now: the durable
/// backends store due times in seconds, and rounding down would run a
/// 250 ms retry at once. (apalis' `run_after` rounds down, and panics on a
/// clock before 1970.)
pub(crate) fn due_second(delay: Duration) -> u64 {
    let due = since_epoch().saturating_add(delay);
    due.as_secs() + u64::from(due.subsec_nanos() > 0)
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
/// The current whole Unix second, rounded down: a job stored due at it is
/// due now.
pub(crate) fn current_second() -> u64 {
    since_epoch().as_secs()
}

fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
/// The `max_attempts` stored with each job when we write jobs ourselves:
/// apalis' default. Our worker counts attempts itself.
pub(crate) const APALIS_MAX_ATTEMPTS: u32 = 25;

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
/// A job as the JSON bytes apalis' `JsonCodec` stores; a payload that
/// cannot be encoded is [`QueueError::Encode`].
pub(crate) fn encode_job<P: serde::Serialize>(
    queue: &std::sync::Arc<str>,
    job: &QueuedEvent<P>,
) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(job).map_err(|e| QueueError::Encode {
        queue: std::sync::Arc::clone(queue),
        source: crate::Error::Serialize(e),
    })
}

/// Pushes `jobs` through any apalis storage in one `push_all` (one
/// transaction on the SQL backends, one script call on Redis), each with its
/// idempotency key and due time, never earlier than its delay (the durable
/// backends keep whole seconds, so up to a second later).
pub(crate) async fn push_tasks<St, K, P>(
    storage: &St,
    jobs: ops::Jobs<P>,
) -> Result<(), apalis_core::backend::TaskSinkError<St::Error>>
where
    St: apalis_core::backend::TaskSink<QueuedEvent<P>, K> + Clone + Send,
    P: Send + Sync,
{
    use apalis_core::task::builder::TaskBuilder;
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(job, delay)| {
            let key = job.idempotency_key();
            let builder = TaskBuilder::new(job).idempotency_key(key);
            if delay.is_zero() {
                builder.build()
            } else {
                builder.run_at_timestamp(due_second(delay)).build()
            }
        })
        .collect();
    let mut storage = storage.clone();
    storage.push_all(futures::stream::iter(tasks)).await
}

/// Each job's outcome, in order, from the idempotency keys an insert
/// returned (the rows it stored): the first job with a returned key was
/// stored, any other was already queued.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn outcomes<P>(
    jobs: &[(QueuedEvent<P>, Duration)],
    stored: Vec<String>,
) -> Vec<Published> {
    let mut stored: std::collections::HashSet<String> = stored.into_iter().collect();
    jobs.iter()
        .map(|(job, _)| {
            if stored.remove(&job.idempotency_key()) {
                Published::Stored
            } else {
                Published::AlreadyQueued
            }
        })
        .collect()
}

/// Most abandoned jobs buried per query by `bury_abandoned`.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) const ABANDONED_PAGE: usize = 1_000;

/// A stored job's bytes as the dead letter of a job apalis gave up on;
/// `None` (with a warning) if they are not a job of this crate.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) fn abandoned_letter<P: serde::de::DeserializeOwned>(
    queue: &str,
    bytes: &[u8],
    runs: i64,
    last_result: Option<&str>,
) -> Option<DeadLetter<P>> {
    match serde_json::from_slice::<QueuedEvent<P>>(bytes) {
        Ok(job) => Some(DeadLetter::abandoned(job, runs, last_result)),
        Err(e) => {
            tracing::warn!(queue, error = %e, "a job apalis gave up on is not an event; left as it is");
            None
        }
    }
}

/// A job as a worker of a durable backend fetches it: an event of the
/// queue's payload type, or a job of this crate whose payload no longer
/// decodes as that type (it changed since the event was stored). apalis
/// fails the whole fetch on a job it cannot decode, again at every fetch,
/// so the worker decodes in two steps and buries such a job instead.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) enum Fetched<P> {
    /// A job of the queue's payload type.
    Job(QueuedEvent<P>),
    /// A job whose payload does not decode: the job as stored, and its
    /// dead letter.
    Undecodable(Box<(serde_json::Value, DeadLetter<serde_json::Value>)>),
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl<'de, P: DeserializeOwned> serde::Deserialize<'de> for Fetched<P> {
    /// Fails only for JSON that is not a job of this crate at all.
    fn deserialize<D: serde::Deserializer<'de>>(from: D) -> Result<Self, D::Error> {
        let json = serde_json::Value::deserialize(from)?;
        match QueuedEvent::<P>::deserialize(&json) {
            Ok(job) => Ok(Fetched::Job(job)),
            Err(error) => {
                let job = QueuedEvent::deserialize(&json).map_err(serde::de::Error::custom)?;
                let letter = DeadLetter::undecodable(job, &error.to_string());
                Ok(Fetched::Undecodable(Box::new((json, letter))))
            }
        }
    }
}

/// Written as the job it holds (apalis' codec needs both directions).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl<P: Serialize> Serialize for Fetched<P> {
    fn serialize<S: serde::Serializer>(&self, to: S) -> Result<S::Ok, S::Error> {
        match self {
            Fetched::Job(job) => job.serialize(to),
            Fetched::Undecodable(stored) => stored.0.serialize(to),
        }
    }
}

/// A stored dead letter that does not decode as the queue's payload type:
/// permanent, and saying how to read it.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) fn undecodable_letter(
    queue: &std::sync::Arc<str>,
    source: serde_json::Error,
) -> QueueError {
    QueueError::Misconfigured {
        queue: std::sync::Arc::clone(queue),
        action: "reading a dead letter",
        problem: "a letter does not decode as the queue's payload type (the type changed since \
                  the event failed); read the letters through a queue of serde_json::Value",
        source: Box::new(source),
    }
}

/// How a durable backend stores the dead letter of an undecodable job.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) type BuryJson =
    std::sync::Arc<dyn Fn(DeadLetter<serde_json::Value>) -> ops::Answer<()> + Send + Sync>;

/// The worker's handler for [`Fetched`] jobs: delivers the decodable ones,
/// and buries the others as permanent dead letters (the stored job then
/// counts as done), so the worker goes on with the next job.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
#[derive(Clone)]
pub(crate) struct Tolerant<P> {
    pub(crate) deliver: ops::Delivery<P>,
    pub(crate) bury: BuryJson,
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl<P: Send + 'static> tower::Service<apalis_core::task::Task<Fetched<P>>> for Tolerant<P> {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.deliver.poll_ready(cx)
    }

    fn call(&mut self, task: apalis_core::task::Task<Fetched<P>>) -> Self::Future {
        let decoded = task.try_map_args(|fetched| match fetched {
            Fetched::Job(job) => Ok(job),
            Fetched::Undecodable(stored) => Err(stored),
        });
        match decoded {
            Ok(task) => self.deliver.call(task),
            Err(stored) => {
                let (_, letter) = *stored;
                tracing::warn!(
                    event = %letter.event.id, error = %letter.last_error,
                    "a stored job is now a dead letter"
                );
                let bury = (self.bury)(letter);
                Box::pin(async move { Ok(bury.await?) })
            }
        }
    }
}

/// A push failure as a [`QueueError`]: an encoding failure is permanent
/// (the payload's `Serialize`), anything else the backend's.
pub(crate) fn push_error<E>(
    queue: &std::sync::Arc<str>,
    err: apalis_core::backend::TaskSinkError<E>,
) -> QueueError
where
    E: Into<BoxError>,
{
    use apalis_core::backend::TaskSinkError;
    match err {
        TaskSinkError::CodecError(source) => match source.downcast::<serde_json::Error>() {
            Ok(json) => QueueError::Encode {
                queue: std::sync::Arc::clone(queue),
                source: crate::Error::Serialize(*json),
            },
            Err(other) => QueueError::backend(queue, "encoding a job", other),
        },
        TaskSinkError::PushError(e) => QueueError::backend(queue, "pushing jobs", e),
        TaskSinkError::SendError(e) => QueueError::backend(queue, "pushing jobs", e),
        _ => QueueError::backend(queue, "pushing jobs", "an unknown apalis push error"),
    }
}

/// Wakes idle workers of this process: those of a queue when this process
/// pushed a job due now, so they need not wait for their next poll, and a
/// worker whose [`Wakes`] feeders (its ticks, Redis' announcements) found a
/// reason to fetch.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
#[derive(Debug, Clone)]
pub(crate) struct LocalWake(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl LocalWake {
    pub(crate) fn new() -> Self {
        LocalWake(std::sync::Arc::new(tokio::sync::watch::channel(0).0))
    }

    pub(crate) fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether every stream of it was dropped.
    pub(crate) fn is_unheard(&self) -> bool {
        self.0.is_closed()
    }

    /// One item per notification (several quick ones may merge into one).
    pub(crate) fn stream(
        &self,
    ) -> std::pin::Pin<Box<dyn futures::Stream<Item = ()> + Send + Sync>> {
        let rx = self.0.subscribe();
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        }))
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, Serialize)]
    struct Order {
        order_id: u64,
    }

    fn fetch(json: &serde_json::Value) -> Result<Fetched<Order>, serde_json::Error> {
        serde_json::from_value(json.clone())
    }

    #[test]
    fn a_job_decodes_or_becomes_its_dead_letter() {
        let job = QueuedEvent::new("q", crate::Event::with_id("k", "1", serde_json::json!({})));
        let stored = serde_json::to_value(&job).unwrap();
        let Ok(Fetched::Undecodable(undecodable)) = fetch(&stored) else {
            panic!("a payload without order_id does not decode as Order");
        };
        let (json, letter) = *undecodable;
        assert_eq!(json, stored, "kept as stored");
        assert_eq!(letter.key, "q:k:1");
        assert!(
            letter.last_error.contains("order_id"),
            "{}",
            letter.last_error
        );

        let good = QueuedEvent::new("q", crate::Event::new("k", Order { order_id: 7 }));
        let good = serde_json::to_value(&good).unwrap();
        assert!(matches!(fetch(&good), Ok(Fetched::Job(job)) if job.event.payload.order_id == 7));
        assert!(fetch(&serde_json::json!({"not": "a job"})).is_err());
    }
}
