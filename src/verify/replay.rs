//! [`ReplayGuard`]: remembers which webhook ids were handled, so a
//! duplicate delivery answers 200 without running the handler twice.
//!
//! Delivery is at-least-once: a sender whose attempt timed out sends the same
//! event again, and an attacker who captured a request can replay it within
//! the timestamp tolerance. A replay guard records each id once the handler
//! answered 2xx; a later delivery of that id is answered `200 already
//! handled` (so the sender stops retrying) and a delivery that arrives while
//! the first is still running is answered `409`.
//!
//! ```
//! use eventsink::signature::Secret;
//! use eventsink::verify::{MemoryReplayGuard, VerifyWebhookLayer};
//!
//! let layer = VerifyWebhookLayer::builder(Secret::generate()?)
//!     .replay_guard(MemoryReplayGuard::new())
//!     .build();
//! # let _ = layer;
//! # Ok::<(), eventsink::signature::SecretError>(())
//! ```
//!
//! [`MemoryReplayGuard`] serves one process; [`RedisReplayGuard`] (feature
//! `redis`) serves several receiver processes behind a load balancer.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::Clock;
use crate::BoxError;

/// A boxed `Send` future, the return type of [`ReplayGuard`]'s methods (a
/// trait object cannot have `async fn`s).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How many ids [`MemoryReplayGuard`] keeps at most: 100 000. At a 36-byte
/// UUID and the map's overhead that is about 15 MiB, and it covers 160
/// deliveries a second for the default 10 minutes.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

/// What [`ReplayGuard::claim`] found for an id.
///
/// ```
/// use eventsink::verify::Claim;
/// assert_ne!(Claim::Claimed, Claim::AlreadyHandled);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The id was unknown; it is now marked in flight for this delivery.
    Claimed,
    /// Another delivery of the id is in flight.
    InFlight,
    /// A delivery of the id was handled successfully within the TTL.
    AlreadyHandled,
}

/// The store behind deduplication by webhook id.
///
/// The layer calls [`claim`](ReplayGuard::claim) before the handler, then
/// [`complete`](ReplayGuard::complete) if the handler answered 2xx or
/// [`release`](ReplayGuard::release) if it failed (so the sender's retry
/// reaches the handler again). The `ttl` of `claim` is how long the
/// in-flight mark lasts
/// ([`in_flight_ttl`](super::VerifyWebhookLayerBuilder::in_flight_ttl)); the
/// `ttl` of `complete` is how long to remember the handled id, at least
/// twice the layer's timestamp tolerance, the window in which a replayed
/// request could still pass the timestamp check.
///
/// Implement it for another store (a SQL table with a unique key works):
///
/// ```
/// use std::time::Duration;
/// use eventsink::verify::{BoxFuture, Claim, ReplayError, ReplayGuard};
///
/// /// Never deduplicates.
/// #[derive(Debug)]
/// struct Nothing;
///
/// impl ReplayGuard for Nothing {
///     fn claim<'a>(&'a self, _id: &'a str, _ttl: Duration) -> BoxFuture<'a, Result<Claim, ReplayError>> {
///         Box::pin(async { Ok(Claim::Claimed) })
///     }
///     fn complete<'a>(&'a self, _id: &'a str, _ttl: Duration) -> BoxFuture<'a, Result<(), ReplayError>> {
///         Box::pin(async { Ok(()) })
///     }
///     fn release<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), ReplayError>> {
///         Box::pin(async { Ok(()) })
///     }
/// }
/// ```
pub trait ReplayGuard: fmt::Debug + Send + Sync + 'static {
    /// Atomically: if `id` is unknown (or its mark expired), mark it in
    /// flight for `ttl` and answer [`Claim::Claimed`]; otherwise say what it
    /// is.
    fn claim<'a>(&'a self, id: &'a str, ttl: Duration)
    -> BoxFuture<'a, Result<Claim, ReplayError>>;

    /// Marks `id` handled, remembered for `ttl`.
    fn complete<'a>(&'a self, id: &'a str, ttl: Duration)
    -> BoxFuture<'a, Result<(), ReplayError>>;

    /// Forgets an in-flight `id` (the handler failed or was cancelled), so the
    /// next delivery is handled.
    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ReplayError>>;
}

/// A [`ReplayGuard`]'s store failed. The layer answers 503, so the sender
/// retries later.
///
/// ```
/// use eventsink::verify::ReplayError;
/// let err = ReplayError::new(std::io::Error::other("connection refused"));
/// assert!(err.to_string().contains("connection refused"));
/// ```
#[derive(Debug)]
pub struct ReplayError {
    source: BoxError,
}

impl ReplayError {
    /// Wraps the store's error.
    ///
    /// ```
    /// let err = eventsink::verify::ReplayError::new("timeout");
    /// assert!(std::error::Error::source(&err).is_some());
    /// ```
    pub fn new(source: impl Into<BoxError>) -> Self {
        ReplayError {
            source: source.into(),
        }
    }
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the webhook replay guard's store failed ({}); deliveries are answered 503 until it \
             is back",
            self.source
        )
    }
}

impl std::error::Error for ReplayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// An in-process [`ReplayGuard`] with bounded memory.
///
/// Keeps at most [`capacity`](MemoryReplayGuard::with_capacity) ids; when
/// full it drops expired ids first and then the oldest, which only weakens
/// deduplication for that old id. Clones share one store. Ids are lost when
/// the process stops: use [`RedisReplayGuard`] (feature `redis`) for several
/// processes or restarts.
///
/// ```
/// use std::time::Duration;
/// use eventsink::verify::{Claim, MemoryReplayGuard, ReplayGuard};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::verify::ReplayError> {
/// let guard = MemoryReplayGuard::new();
/// let ttl = Duration::from_secs(600);
/// assert_eq!(guard.claim("evt_1", ttl).await?, Claim::Claimed);
/// assert_eq!(guard.claim("evt_1", ttl).await?, Claim::InFlight);
/// guard.complete("evt_1", ttl).await?;
/// assert_eq!(guard.claim("evt_1", ttl).await?, Claim::AlreadyHandled);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryReplayGuard {
    state: Arc<Mutex<State>>,
    clock: Clock,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Arc<str>, Entry>,
    /// Ids in the order their entries were written, with the write's
    /// sequence number; items whose entry was rewritten since are stale.
    order: VecDeque<(Arc<str>, u64)>,
    next_seq: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    handled: bool,
    /// Unix milliseconds by the guard's clock.
    expires_ms: i64,
    seq: u64,
}

impl MemoryReplayGuard {
    /// A guard of [`DEFAULT_REPLAY_CAPACITY`] ids on the system clock.
    ///
    /// ```
    /// let guard = eventsink::verify::MemoryReplayGuard::new();
    /// assert!(guard.is_empty());
    /// ```
    pub fn new() -> Self {
        MemoryReplayGuard {
            state: Arc::default(),
            clock: Clock::system(),
            capacity: DEFAULT_REPLAY_CAPACITY,
        }
    }

    /// Keeps at most `capacity` ids (at least 1).
    ///
    /// ```
    /// let guard = eventsink::verify::MemoryReplayGuard::new().with_capacity(1_000);
    /// # let _ = guard;
    /// ```
    #[must_use]
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Reads expiry times from `clock` (for tests) instead of the system
    /// clock.
    ///
    /// ```
    /// use chrono::Utc;
    /// use eventsink::verify::{Clock, MemoryReplayGuard};
    /// let guard = MemoryReplayGuard::new().with_clock(Clock::fixed(Utc::now()));
    /// # let _ = guard;
    /// ```
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How many ids are stored now, expired ones included until they are
    /// swept.
    ///
    /// ```
    /// assert_eq!(eventsink::verify::MemoryReplayGuard::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no id is stored.
    ///
    /// ```
    /// assert!(eventsink::verify::MemoryReplayGuard::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every await-free step, so a panic
        // elsewhere while holding the lock leaves nothing half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().timestamp_millis()
    }

    fn claim_now(&self, id: &str, ttl: Duration) -> Claim {
        let now = self.now_ms();
        let mut state = self.lock();
        state.sweep(now);
        if let Some(entry) = state.entries.get(id)
            && entry.expires_ms > now
        {
            return if entry.handled {
                Claim::AlreadyHandled
            } else {
                Claim::InFlight
            };
        }
        state.write(id, false, expiry(now, ttl), self.capacity);
        Claim::Claimed
    }

    fn complete_now(&self, id: &str, ttl: Duration) {
        let now = self.now_ms();
        let mut state = self.lock();
        state.sweep(now);
        state.write(id, true, expiry(now, ttl), self.capacity);
    }

    fn release_now(&self, id: &str) {
        let mut state = self.lock();
        if state.entries.get(id).is_some_and(|entry| !entry.handled) {
            state.entries.remove(id);
        }
    }
}

impl Default for MemoryReplayGuard {
    fn default() -> Self {
        MemoryReplayGuard::new()
    }
}

fn expiry(now_ms: i64, ttl: Duration) -> i64 {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_add(ttl_ms)
}

impl State {
    /// Drops expired entries from the front of the write order. TTLs are
    /// about equal, so the oldest writes expire first; an entry behind a
    /// longer-lived one waits for the next sweep or for eviction.
    fn sweep(&mut self, now_ms: i64) {
        while let Some((id, seq)) = self.order.front() {
            match self.entries.get(id) {
                Some(entry) if entry.seq == *seq => {
                    if entry.expires_ms > now_ms {
                        break;
                    }
                    let id = Arc::clone(id);
                    self.entries.remove(&id);
                }
                // Rewritten or removed since: a stale item.
                _ => {}
            }
            self.order.pop_front();
        }
    }

    fn write(&mut self, id: &str, handled: bool, expires_ms: i64, capacity: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let key: Arc<str> = match self.entries.get_key_value(id) {
            Some((key, _)) => Arc::clone(key),
            None => {
                while self.entries.len() >= capacity {
                    self.evict_oldest();
                }
                Arc::from(id)
            }
        };
        self.entries.insert(
            Arc::clone(&key),
            Entry {
                handled,
                expires_ms,
                seq,
            },
        );
        self.order.push_back((key, seq));
        // Stale order items are at most one per rewrite; compact when they
        // outnumber the live entries, so memory stays O(capacity).
        if self.order.len() > 2 * capacity.max(self.entries.len()) {
            let entries = &self.entries;
            self.order
                .retain(|(id, seq)| entries.get(id).is_some_and(|e| e.seq == *seq));
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((id, seq)) = self.order.pop_front() {
            if self.entries.get(&id).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&id);
                return;
            }
        }
        // Every live entry has a current item in `order`, so an empty order
        // means an empty map; clear to be safe against an endless loop.
        self.entries.clear();
    }
}

impl ReplayGuard for MemoryReplayGuard {
    fn claim<'a>(
        &'a self,
        id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, ReplayError>> {
        let claim = self.claim_now(id, ttl);
        Box::pin(async move { Ok(claim) })
    }

    fn complete<'a>(
        &'a self,
        id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        self.complete_now(id, ttl);
        Box::pin(async { Ok(()) })
    }

    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ReplayError>> {
        self.release_now(id);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(feature = "redis")]
pub use self::redis_guard::RedisReplayGuard;

#[cfg(feature = "redis")]
mod redis_guard {
    use std::time::Duration;

    use redis::aio::ConnectionManager;

    use super::{BoxFuture, Claim, ReplayError, ReplayGuard};

    const IN_FLIGHT: &str = "in-flight";
    const HANDLED: &str = "handled";

    /// Deletes the key only while it is still in flight: a release never
    /// forgets a handled id.
    const RELEASE: &str = r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
    ";

    /// A [`ReplayGuard`] in Redis, shared by every receiver process that
    /// uses the same key prefix.
    ///
    /// Each id is one key, `{prefix}{id}`, holding `in-flight` or `handled`
    /// with the layer's TTL (`SET NX PX` claims it atomically). A process
    /// that dies mid-delivery leaves its id in flight until the in-flight TTL
    /// ends ([`DEFAULT_IN_FLIGHT_TTL`](crate::verify::DEFAULT_IN_FLIGHT_TTL));
    /// meanwhile deliveries of that id are answered 409.
    ///
    /// ```no_run
    /// use eventsink::signature::Secret;
    /// use eventsink::verify::{RedisReplayGuard, VerifyWebhookLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = RedisReplayGuard::connect("redis://127.0.0.1:6379/", "myapp:webhooks:").await?;
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?).replay_guard(guard).build();
    /// # let _ = layer;
    /// # Ok(()) }
    /// ```
    #[derive(Clone)]
    pub struct RedisReplayGuard {
        connection: ConnectionManager,
        prefix: String,
        release: redis::Script,
    }

    impl std::fmt::Debug for RedisReplayGuard {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            // The connection's Debug could show the URL and its password.
            f.debug_struct("RedisReplayGuard")
                .field("prefix", &self.prefix)
                .finish_non_exhaustive()
        }
    }

    impl RedisReplayGuard {
        /// A guard on an existing connection, with keys `{prefix}{id}`.
        ///
        /// ```no_run
        /// # #[tokio::main(flavor = "current_thread")] async fn main() -> redis::RedisResult<()> {
        /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
        /// let connection = redis::aio::ConnectionManager::new(client).await?;
        /// let guard = eventsink::verify::RedisReplayGuard::new(connection, "myapp:webhooks:");
        /// # let _ = guard;
        /// # Ok(()) }
        /// ```
        pub fn new(connection: ConnectionManager, prefix: impl Into<String>) -> Self {
            RedisReplayGuard {
                connection,
                prefix: prefix.into(),
                release: redis::Script::new(RELEASE),
            }
        }

        /// Connects to `url` (`redis://host:port/db`) with a reconnecting
        /// connection manager.
        ///
        /// # Errors
        ///
        /// The URL is invalid or the server cannot be reached.
        ///
        /// ```no_run
        /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::verify::ReplayError> {
        /// let guard = eventsink::verify::RedisReplayGuard::connect("redis://127.0.0.1:6379/", "app:").await?;
        /// # let _ = guard;
        /// # Ok(()) }
        /// ```
        pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, ReplayError> {
            let client = redis::Client::open(url).map_err(ReplayError::new)?;
            let connection = ConnectionManager::new(client)
                .await
                .map_err(ReplayError::new)?;
            Ok(RedisReplayGuard::new(connection, prefix))
        }

        fn key(&self, id: &str) -> String {
            format!("{}{id}", self.prefix)
        }
    }

    fn millis(ttl: Duration) -> u64 {
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    impl ReplayGuard for RedisReplayGuard {
        fn claim<'a>(
            &'a self,
            id: &'a str,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<Claim, ReplayError>> {
            Box::pin(async move {
                let mut connection = self.connection.clone();
                let key = self.key(id);
                // SET NX returns nil when the key exists; one retry covers a
                // key that expired between the SET and the GET.
                for _ in 0..2 {
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(IN_FLIGHT)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(ttl))
                        .query_async(&mut connection)
                        .await
                        .map_err(ReplayError::new)?;
                    if set.is_some() {
                        return Ok(Claim::Claimed);
                    }
                    let state: Option<String> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await
                        .map_err(ReplayError::new)?;
                    match state.as_deref() {
                        Some(HANDLED) => return Ok(Claim::AlreadyHandled),
                        Some(_) => return Ok(Claim::InFlight),
                        None => {}
                    }
                }
                Ok(Claim::InFlight)
            })
        }

        fn complete<'a>(
            &'a self,
            id: &'a str,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<(), ReplayError>> {
            Box::pin(async move {
                let mut connection = self.connection.clone();
                let _: () = redis::cmd("SET")
                    .arg(self.key(id))
                    .arg(HANDLED)
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut connection)
                    .await
                    .map_err(ReplayError::new)?;
                Ok(())
            })
        }

        fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ReplayError>> {
            Box::pin(async move {
                let mut connection = self.connection.clone();
                let _: i64 = self
                    .release
                    .key(self.key(id))
                    .arg(IN_FLIGHT)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(ReplayError::new)?;
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use std::sync::atomic::{AtomicI64, Ordering};

    fn manual_clock() -> (Arc<AtomicI64>, Clock) {
        let now = Arc::new(AtomicI64::new(1_700_000_000));
        let clock = Clock::from_fn({
            let now = Arc::clone(&now);
            move || Utc.timestamp_opt(now.load(Ordering::SeqCst), 0).unwrap()
        });
        (now, clock)
    }

    const TTL: Duration = Duration::from_secs(600);

    #[test]
    fn handled_ids_expire_after_the_ttl() {
        let (now, clock) = manual_clock();
        let guard = MemoryReplayGuard::new().with_clock(clock);
        assert_eq!(guard.claim_now("a", TTL), Claim::Claimed);
        guard.complete_now("a", TTL);
        now.fetch_add(599, Ordering::SeqCst);
        assert_eq!(guard.claim_now("a", TTL), Claim::AlreadyHandled);
        now.fetch_add(1, Ordering::SeqCst);
        assert_eq!(guard.claim_now("a", TTL), Claim::Claimed);
    }

    #[test]
    fn release_forgets_in_flight_but_never_handled_ids() {
        let guard = MemoryReplayGuard::new();
        assert_eq!(guard.claim_now("a", TTL), Claim::Claimed);
        guard.release_now("a");
        assert_eq!(guard.claim_now("a", TTL), Claim::Claimed);
        guard.complete_now("a", TTL);
        guard.release_now("a");
        assert_eq!(guard.claim_now("a", TTL), Claim::AlreadyHandled);
    }

    #[test]
    fn memory_stays_bounded_by_the_capacity() {
        let (now, clock) = manual_clock();
        let guard = MemoryReplayGuard::new()
            .with_capacity(100)
            .with_clock(clock);
        for n in 0..10_000 {
            let id = format!("evt_{n}");
            assert_eq!(guard.claim_now(&id, TTL), Claim::Claimed);
            guard.complete_now(&id, TTL);
            if n % 7 == 0 {
                now.fetch_add(1, Ordering::SeqCst);
            }
            let state = guard.lock();
            assert!(state.entries.len() <= 100, "{}", state.entries.len());
            assert!(state.order.len() <= 201, "{}", state.order.len());
        }
        // The newest ids are still remembered.
        assert_eq!(guard.claim_now("evt_9999", TTL), Claim::AlreadyHandled);
        // Once everything expires a sweep empties the map.
        now.fetch_add(601, Ordering::SeqCst);
        assert_eq!(guard.claim_now("fresh", TTL), Claim::Claimed);
        assert_eq!(guard.len(), 1);
    }
}
