//! [`QueuedFanOut`]: a fan-out in which every destination has a durable
//! queue and a worker of its own.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::Layer;

use super::{BuildError, FanOut, FanOutBuilder};
use crate::queue::{QueueBackend, QueuePublisher, QueueWorker, ThroughTaskQueue, WorkerHandle};
use crate::{BoxError, Sink};

/// A [`FanOut`] over durable queues, one per destination, with their
/// workers running, so one destination's retries never re-send to
/// another. Build it with [`QueuedFanOut::builder`].
///
/// Publishing stores one job per destination that takes the event (one
/// [`QueuePublisher`] per destination, under a [`FanOut`]); each
/// destination's [`QueueWorker`] delivers and retries its own jobs. If a
/// publish fails for some destinations (their backend was down), publish
/// the same event again (same id): the queues that already hold it answer
/// [`Published::AlreadyQueued`](crate::queue::Published::AlreadyQueued)
/// and store nothing, so only the missing destinations get a job. The
/// durable backends recognise the event as long as they keep its completed
/// job ([`DEFAULT_RETENTION`](crate::queue::DEFAULT_RETENTION), a day); the
/// memory backend only while the job waits.
///
/// `Ok` from the publisher means every destination that takes the event
/// stored it: each then delivers it at least once, or keeps it as a dead
/// letter in its own queue.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
/// use eventsink::fanout::QueuedFanOut;
/// use eventsink::queue::SqliteQueue;
/// use eventsink::{Event, RecordingSink, SinkExt};
/// # let tmp = tempfile::tempdir()?;
/// # let path = tmp.path().join("events.db");
/// # let (billing, crm) = (RecordingSink::new(), RecordingSink::new());
///
/// // One queue per destination, here in one SQLite file; the queue's name
/// // is the destination's name.
/// let fanout = QueuedFanOut::builder()
///     .to_kinds(SqliteQueue::open(&path, "orders.billing").await?, ["invoice.*", "order.*"], billing.clone())
///     .to(SqliteQueue::open(&path, "orders.crm").await?, crm.clone())
///     .spawn_with(|worker| worker.concurrency(4))?;   // one worker per destination
///
/// let mut events = fanout.publisher();                 // clone it per task
/// events.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
/// # billing.wait_for(1, std::time::Duration::from_secs(10)).await?;
/// # crm.wait_for(1, std::time::Duration::from_secs(10)).await?;
/// fanout.shutdown().await;                             // stops every worker
/// # Ok(()) }
/// # #[cfg(not(feature = "sqlite"))] fn main() {}
/// ```
pub struct QueuedFanOut<S, B> {
    publisher: FanOut<QueuePublisher<S, B>>,
    workers: Vec<(Arc<str>, WorkerHandle)>,
}

impl<S, B> QueuedFanOut<S, B> {
    /// A builder with no destination, dropping unmatched events.
    ///
    /// ```
    /// let builder = eventsink::fanout::QueuedFanOut::builder()
    ///     .to(eventsink::queue::MemoryQueue::<serde_json::Value>::new("orders.audit"), eventsink::NoopSink::new());
    /// # let _ = builder;
    /// ```
    pub fn builder<P>() -> QueuedFanOutBuilder<S, B, P> {
        QueuedFanOutBuilder {
            fanout: FanOut::builder(),
            workers: Vec::new(),
            unmatched: None,
            _payload: PhantomData,
        }
    }
}

impl<S: Clone, B: Clone> QueuedFanOut<S, B> {
    /// The publishing service: a [`FanOut`] of the destinations' queue
    /// publishers. `Ok` means every destination that takes the event has
    /// stored it (or already held it). Clone it per task; clones share
    /// each queue's group commit.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, Event, NoopSink, SinkExt};
    /// let fanout = QueuedFanOut::builder().to(MemoryQueue::new("q.a"), NoopSink::new()).spawn()?;
    /// fanout.publisher().publish(Event::new("ping", serde_json::json!(1))).await?;
    /// fanout.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn publisher(&self) -> FanOut<QueuePublisher<S, B>> {
        self.publisher.clone()
    }
}

impl<S, B> QueuedFanOut<S, B> {
    /// Each destination's name with its worker's handle (for
    /// [`WorkerHandle::restarts`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let fanout = QueuedFanOut::builder().to(MemoryQueue::<serde_json::Value>::new("q.a"), NoopSink::new()).spawn()?;
    /// for (name, worker) in fanout.workers() {
    ///     println!("{name}: {} restarts", worker.restarts());
    /// }
    /// # fanout.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn workers(&self) -> impl Iterator<Item = (&str, &WorkerHandle)> {
        self.workers.iter().map(|(name, handle)| (&**name, handle))
    }

    /// Stops every destination's worker, letting their deliveries in
    /// flight finish ([`WorkerHandle::shutdown`]), all at once.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let fanout = QueuedFanOut::builder().to(MemoryQueue::<serde_json::Value>::new("q.a"), NoopSink::new()).spawn()?;
    /// fanout.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(self) {
        futures::future::join_all(self.workers.into_iter().map(|(_, w)| w.shutdown())).await;
    }
}

impl<S: fmt::Debug, B: fmt::Debug> fmt::Debug for QueuedFanOut<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuedFanOut")
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}

/// Destinations (each a queue backend and the sink its worker delivers
/// to) and the treatment of unmatched events. From
/// [`QueuedFanOut::builder`]; ends with [`spawn`](QueuedFanOutBuilder::spawn).
///
/// A destination is named after its queue
/// ([`QueueBackend::name`]); `{application}.{destination}` names keep them
/// apart in a shared database. Every destination has the same backend
/// type and sink type (box sinks of different types with
/// [`SinkExt::boxed_sink`](crate::SinkExt::boxed_sink)).
#[must_use]
pub struct QueuedFanOutBuilder<S, B, P = serde_json::Value> {
    fanout: FanOutBuilder<QueuePublisher<S, B>>,
    /// The workers of the destinations that take kinds, in order.
    workers: Vec<QueueWorker<S, B, P>>,
    /// The worker of the destination for unmatched events, if any.
    unmatched: Option<QueueWorker<S, B, P>>,
    _payload: PhantomData<fn() -> P>,
}

impl<S, B, P> QueuedFanOutBuilder<S, B, P>
where
    S: Clone,
    B: QueueBackend<P>,
{
    /// Adds a destination that takes every event: its queue `backend`,
    /// delivered to `sink`.
    ///
    /// ```
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let b = QueuedFanOut::builder().to(MemoryQueue::<serde_json::Value>::new("orders.audit"), NoopSink::new());
    /// # let _ = b;
    /// ```
    pub fn to(mut self, backend: B, sink: S) -> Self {
        let (name, publisher, worker) = parts(backend, sink);
        self.workers.push(worker);
        self.fanout = self.fanout.to(name, publisher);
        self
    }

    /// Adds a destination that takes the events whose kind one of
    /// `patterns` takes (see [`KindPattern`](super::KindPattern)).
    ///
    /// ```
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let b = QueuedFanOut::builder()
    ///     .to_kinds(MemoryQueue::<serde_json::Value>::new("orders.billing"), ["invoice.*"], NoopSink::new());
    /// # let _ = b;
    /// ```
    pub fn to_kinds<I>(mut self, backend: B, patterns: I, sink: S) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let (name, publisher, worker) = parts(backend, sink);
        self.workers.push(worker);
        self.fanout = self.fanout.to_kinds(name, patterns, publisher);
        self
    }

    /// Sends events that no other destination takes to this one.
    ///
    /// ```
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let b = QueuedFanOut::builder()
    ///     .unmatched_to(MemoryQueue::<serde_json::Value>::new("orders.other"), NoopSink::new());
    /// # let _ = b;
    /// ```
    pub fn unmatched_to(mut self, backend: B, sink: S) -> Self {
        let (name, publisher, worker) = parts(backend, sink);
        self.unmatched = Some(worker);
        self.fanout = self.fanout.unmatched_to(name, publisher);
        self
    }

    /// Drops events that no destination takes (the default); see
    /// [`FanOutBuilder::drop_unmatched`].
    ///
    /// ```
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let b = QueuedFanOut::builder().to(MemoryQueue::<serde_json::Value>::new("q.a"), NoopSink::new()).drop_unmatched();
    /// # let _ = b;
    /// ```
    pub fn drop_unmatched(mut self) -> Self {
        self.unmatched = None;
        self.fanout = self.fanout.drop_unmatched();
        self
    }

    /// Rejects events that no destination takes; see
    /// [`FanOutBuilder::reject_unmatched`].
    ///
    /// ```
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let b = QueuedFanOut::builder().to(MemoryQueue::<serde_json::Value>::new("q.a"), NoopSink::new()).reject_unmatched();
    /// # let _ = b;
    /// ```
    pub fn reject_unmatched(mut self) -> Self {
        self.unmatched = None;
        self.fanout = self.fanout.reject_unmatched();
        self
    }
}

/// A destination's name (its queue's), publisher and worker.
fn parts<S: Clone, B: QueueBackend<P>, P>(
    backend: B,
    sink: S,
) -> (Arc<str>, QueuePublisher<S, B>, QueueWorker<S, B, P>) {
    let name: Arc<str> = QueueBackend::name(&backend).into();
    let publisher = ThroughTaskQueue::new(backend.clone()).layer(sink.clone());
    (name, publisher, QueueWorker::new(backend, sink))
}

impl<S, B, P> QueuedFanOutBuilder<S, B, P>
where
    S: Sink<P, Error: Into<BoxError>, Future: Send> + Clone + Send + 'static,
    B: QueueBackend<P>,
    P: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Checks the configuration (as [`FanOutBuilder::build`]), then spawns
    /// one worker per destination with the worker defaults. Call it inside
    /// a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError`], before any worker is started.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// # use eventsink::{fanout::QueuedFanOut, queue::MemoryQueue, NoopSink};
    /// let fanout = QueuedFanOut::builder().to(MemoryQueue::<serde_json::Value>::new("q.a"), NoopSink::new()).spawn()?;
    /// # fanout.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn spawn(self) -> Result<QueuedFanOut<S, B>, BuildError> {
        self.spawn_with(|worker| worker)
    }

    /// [`spawn`](QueuedFanOutBuilder::spawn), configuring each
    /// destination's worker with `configure` (concurrency, attempt
    /// timeout, retry schedule, ...).
    ///
    /// # Errors
    ///
    /// [`BuildError`], before any worker is started.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// # use eventsink::{fanout::QueuedFanOut, queue::{MemoryQueue, RetrySchedule}, NoopSink};
    /// let fanout = QueuedFanOut::builder()
    ///     .to(MemoryQueue::<serde_json::Value>::new("q.a"), NoopSink::new())
    ///     .spawn_with(|worker| worker.concurrency(4).schedule(RetrySchedule::go_original()))?;
    /// # fanout.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn spawn_with(
        self,
        configure: impl Fn(QueueWorker<S, B, P>) -> QueueWorker<S, B, P>,
    ) -> Result<QueuedFanOut<S, B>, BuildError> {
        let publisher = self.fanout.build()?;
        // The fan-out lists the destinations as added, the one for
        // unmatched events last.
        let names: Vec<Arc<str>> = publisher.destinations().map(Arc::from).collect();
        let workers = names
            .into_iter()
            .zip(self.workers.into_iter().chain(self.unmatched))
            .map(|(name, worker)| (name, configure(worker).spawn()))
            .collect();
        Ok(QueuedFanOut { publisher, workers })
    }
}

impl<S: fmt::Debug, B: fmt::Debug, P> fmt::Debug for QueuedFanOutBuilder<S, B, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuedFanOutBuilder")
            .field("fanout", &self.fanout)
            .finish_non_exhaustive()
    }
}
