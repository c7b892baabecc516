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
//! use eventsink::verify::{MemoryReplayGuard, VerifyConfig, VerifyWebhookLayer};
//!
//! let config = VerifyConfig::new(Secret::generate()?).replay_guard(MemoryReplayGuard::new());
//! let layer = VerifyWebhookLayer::new(config);
//! # let _ = layer;
//! # Ok::<(), eventsink::signature::SecretError>(())
//! ```
//!
//! [`MemoryReplayGuard`] serves one process; [`RedisReplayGuard`] (feature
//! `redis-replay`) serves several receiver processes behind a load balancer.

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

/// How many ids [`MemoryReplayGuard`] keeps at most: 100 000, about 20 MiB
/// with UUID ids (see [`MemoryReplayGuard`]'s memory bound). With the
/// default 56-hour window ([`DEFAULT_REPLAY_TTL`](super::DEFAULT_REPLAY_TTL))
/// this capacity, not the window, decides how long an id is remembered once
/// more than about one delivery every two seconds arrives: raise it for busier receivers.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

/// Who holds a claim: [`ReplayGuard::claim`] hands one out with
/// [`Claim::Claimed`], and only that token releases the claim. A delivery
/// whose handler outlived the in-flight TTL therefore cannot clear the claim
/// of a later delivery of the same id.
///
/// ```
/// use eventsink::verify::ClaimToken;
/// let token = ClaimToken::random();
/// assert_ne!(token, ClaimToken::random());
/// assert_eq!(ClaimToken::from_u128(token.as_u128()), token);
/// assert_eq!(token.to_string().len(), 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken(u128);

impl ClaimToken {
    /// A random token (128 bits, so two claims never share one).
    ///
    /// ```
    /// let token = eventsink::verify::ClaimToken::random();
    /// # let _ = token;
    /// ```
    pub fn random() -> Self {
        ClaimToken(fastrand::u128(..))
    }

    /// A token from its number, for stores that keep it as one.
    ///
    /// ```
    /// let token = eventsink::verify::ClaimToken::from_u128(7);
    /// assert_eq!(token.as_u128(), 7);
    /// ```
    pub fn from_u128(value: u128) -> Self {
        ClaimToken(value)
    }

    /// The token's number.
    ///
    /// ```
    /// assert_eq!(eventsink::verify::ClaimToken::from_u128(1).as_u128(), 1);
    /// ```
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

/// 32 lowercase hexadecimal digits.
impl fmt::Display for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What [`ReplayGuard::claim`] found for an id.
///
/// ```
/// use eventsink::verify::{Claim, ClaimToken};
/// assert_ne!(Claim::Claimed(ClaimToken::random()), Claim::AlreadyHandled);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The id was unknown; it is now marked in flight for this delivery,
    /// which holds it with this token.
    Claimed(ClaimToken),
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
/// reaches the handler again), each with the [`ClaimToken`] the claim
/// returned. The `ttl` of `claim` is how long the in-flight mark lasts
/// ([`in_flight_ttl`](super::VerifyConfig::in_flight_ttl)); the
/// `ttl` of `complete` is how long to remember the handled id
/// ([`replay_ttl`](super::VerifyConfig::replay_ttl)), at least
/// twice the layer's timestamp tolerance, the window in which a replayed
/// request could still pass the timestamp check.
///
/// **Ownership.** A handler can outlive its in-flight mark; another delivery
/// of the id may then claim it. So `release` must compare and delete: it
/// forgets the id only while the mark is still the one made with its token
/// (in one atomic step: a Lua script on Redis, a conditional `DELETE … WHERE
/// token = ?` in SQL). `complete` records the id as handled whoever holds it
/// now: the handler did succeed, and remembering that only stops later
/// deliveries (the later holder's `release` then finds no mark of its own
/// and leaves the handled mark alone).
///
/// Implement it for another store (a SQL table with a unique key works):
///
/// ```
/// use std::time::Duration;
/// use eventsink::verify::{BoxFuture, Claim, ClaimToken, ReplayError, ReplayGuard};
///
/// /// Never deduplicates.
/// #[derive(Debug)]
/// struct Nothing;
///
/// impl ReplayGuard for Nothing {
///     fn claim<'a>(&'a self, _id: &'a str, _ttl: Duration) -> BoxFuture<'a, Result<Claim, ReplayError>> {
///         Box::pin(async { Ok(Claim::Claimed(ClaimToken::random())) })
///     }
///     fn complete<'a>(&'a self, _id: &'a str, _token: ClaimToken, _ttl: Duration) -> BoxFuture<'a, Result<(), ReplayError>> {
///         Box::pin(async { Ok(()) })
///     }
///     fn release<'a>(&'a self, _id: &'a str, _token: ClaimToken) -> BoxFuture<'a, Result<(), ReplayError>> {
///         Box::pin(async { Ok(()) })
///     }
/// }
/// ```
pub trait ReplayGuard: fmt::Debug + Send + Sync + 'static {
    /// Atomically: if `id` is unknown (or its mark expired), mark it in
    /// flight for `ttl` with a new token and answer [`Claim::Claimed`] with
    /// it; otherwise say what it is.
    fn claim<'a>(&'a self, id: &'a str, ttl: Duration)
    -> BoxFuture<'a, Result<Claim, ReplayError>>;

    /// Marks `id` handled, remembered for `ttl`, whoever holds it now (see
    /// *Ownership* above); `token` is the claim whose handler succeeded.
    fn complete<'a>(
        &'a self,
        id: &'a str,
        token: ClaimToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>>;

    /// Forgets `id` if it is still in flight under `token` (the handler
    /// failed or was cancelled), so the next delivery is handled; a mark made
    /// by another claim, or a handled id, stays.
    fn release<'a>(
        &'a self,
        id: &'a str,
        token: ClaimToken,
    ) -> BoxFuture<'a, Result<(), ReplayError>>;
}

/// A [`ReplayGuard`]'s store failed. The layer answers 503, so the sender
/// retries later.
///
/// ```
/// use eventsink::verify::ReplayError;
/// let err = ReplayError::new(std::io::Error::other("connection refused"));
/// // Display says what failed; the store's own error is the source.
/// assert!(!err.to_string().contains("connection refused"));
/// assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "connection refused");
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
        f.write_str(
            "the webhook replay guard's store failed; deliveries are answered 503 until it is back",
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
/// Clones share one store. Ids are lost when the process stops: use
/// [`RedisReplayGuard`] (feature `redis-replay`) for several processes or
/// restarts.
///
/// # Memory bound
///
/// The guard keeps at most [`capacity`](MemoryReplayGuard::capacity)
/// ids ([`DEFAULT_REPLAY_CAPACITY`] by default), handled and in flight
/// together. Each costs about 200 bytes with a 36-byte UUID id (the id
/// behind an `Arc` with its counts, ~64 bytes from the allocator; a map slot
/// of key and entry with the map's spare room, ~90; up to two write-order
/// items of 24 bytes), plus one byte per id byte beyond 36: about 20 MiB
/// for 100 000 UUIDs, at most about 45 MiB for 100 000 ids of the longest
/// allowed size ([`MAX_ID_BYTES`](crate::wire::MAX_ID_BYTES)).
///
/// When it is full, a new id first sweeps expired ids, then evicts the
/// **oldest handled id** (in the order they were written). With the default
/// 56-hour window the capacity is what bounds memory, so on a busy receiver
/// an evicted id is one handled less than 40 hours ago: if its sender
/// retries it after that (a lost `2xx`), the handler runs a second time —
/// never concurrently with another run, because **in-flight claims are never
/// evicted**. If every stored id is in flight (as many deliveries running at
/// once as the capacity), a new claim fails with a [`ReplayError`] and the
/// layer answers 503, so the sender retries later; nothing is forgotten
/// silently and nothing panics.
///
/// ```
/// use std::time::Duration;
/// use eventsink::verify::{Claim, MemoryReplayGuard, ReplayGuard};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::verify::ReplayError> {
/// let guard = MemoryReplayGuard::new();
/// let ttl = Duration::from_secs(600);
/// let Claim::Claimed(token) = guard.claim("evt_1", ttl).await? else { unreachable!() };
/// assert_eq!(guard.claim("evt_1", ttl).await?, Claim::InFlight);
/// guard.complete("evt_1", token, ttl).await?;
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
    /// `None` once handled; the holder's token while in flight.
    holder: Option<ClaimToken>,
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

    /// Keeps at most `capacity` ids, handled and in flight (at least 1);
    /// see the [memory bound](MemoryReplayGuard#memory-bound).
    ///
    /// ```
    /// let guard = eventsink::verify::MemoryReplayGuard::new().capacity(1_000);
    /// # let _ = guard;
    /// ```
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Reads expiry times from `clock` (for tests) instead of the system
    /// clock.
    ///
    /// ```
    /// use chrono::Utc;
    /// use eventsink::verify::{Clock, MemoryReplayGuard};
    /// let guard = MemoryReplayGuard::new().clock(Clock::fixed(Utc::now()));
    /// # let _ = guard;
    /// ```
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
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

    fn claim_now(&self, id: &str, ttl: Duration) -> Result<Claim, ReplayError> {
        let now = self.now_ms();
        let mut state = self.lock();
        state.sweep(now);
        if let Some(entry) = state.entries.get(id)
            && entry.expires_ms > now
        {
            return Ok(match entry.holder {
                None => Claim::AlreadyHandled,
                Some(_) => Claim::InFlight,
            });
        }
        let token = ClaimToken::random();
        state.write(id, Some(token), expiry(now, ttl), self.capacity, now)?;
        Ok(Claim::Claimed(token))
    }

    fn complete_now(&self, id: &str, ttl: Duration) -> Result<(), ReplayError> {
        let now = self.now_ms();
        let mut state = self.lock();
        state.sweep(now);
        state.write(id, None, expiry(now, ttl), self.capacity, now)
    }

    fn release_now(&self, id: &str, token: ClaimToken) {
        let mut state = self.lock();
        if state
            .entries
            .get(id)
            .is_some_and(|entry| entry.holder == Some(token))
        {
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

    fn write(
        &mut self,
        id: &str,
        holder: Option<ClaimToken>,
        expires_ms: i64,
        capacity: usize,
        now_ms: i64,
    ) -> Result<(), ReplayError> {
        let key: Arc<str> = match self.entries.get_key_value(id) {
            Some((key, _)) => Arc::clone(key),
            None => {
                while self.entries.len() >= capacity {
                    if !self.evict_one(now_ms) {
                        return Err(ReplayError::new(format!(
                            "the in-memory replay guard is full: all {capacity} ids are \
                             deliveries in flight; raise MemoryReplayGuard::capacity"
                        )));
                    }
                }
                Arc::from(id)
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            Arc::clone(&key),
            Entry {
                holder,
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
        Ok(())
    }

    /// Removes the oldest entry that is handled or expired; in-flight claims
    /// are never evicted. `false` when every entry is a live claim.
    fn evict_one(&mut self, now_ms: i64) -> bool {
        let mut skipped = Vec::new();
        let mut evicted = false;
        while let Some((id, seq)) = self.order.pop_front() {
            let Some(entry) = self.entries.get(&id).filter(|e| e.seq == seq) else {
                continue; // a stale item
            };
            if entry.holder.is_none() || entry.expires_ms <= now_ms {
                self.entries.remove(&id);
                evicted = true;
                break;
            }
            skipped.push((id, seq));
        }
        // Put the live claims back in front, in their order.
        for item in skipped.into_iter().rev() {
            self.order.push_front(item);
        }
        evicted
    }
}

impl ReplayGuard for MemoryReplayGuard {
    fn claim<'a>(
        &'a self,
        id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, ReplayError>> {
        ready(self.claim_now(id, ttl))
    }

    fn complete<'a>(
        &'a self,
        id: &'a str,
        _token: ClaimToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        ready(self.complete_now(id, ttl))
    }

    fn release<'a>(
        &'a self,
        id: &'a str,
        token: ClaimToken,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        self.release_now(id, token);
        ready(Ok(()))
    }
}

/// An answer known without waiting, as the trait's future.
fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

#[cfg(feature = "redis-replay")]
pub use self::redis_guard::RedisReplayGuard;

#[cfg(feature = "redis-replay")]
mod redis_guard {
    use std::time::Duration;

    use redis::aio::ConnectionManager;

    use super::{BoxFuture, Claim, ClaimToken, ReplayError, ReplayGuard};

    /// The value of an in-flight key: this prefix and the holder's token.
    const IN_FLIGHT: &str = "in-flight:";
    const HANDLED: &str = "handled";

    /// Compare and delete: deletes the key only while it is still in flight
    /// under the releasing claim's token, so a release neither forgets a
    /// handled id nor clears a later delivery's claim.
    const RELEASE: &str = r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
    ";

    fn in_flight(token: ClaimToken) -> String {
        format!("{IN_FLIGHT}{token}")
    }

    /// A [`ReplayGuard`] in Redis, shared by every receiver process that
    /// uses the same key prefix.
    ///
    /// Each id is one key, `{prefix}{id}`, holding `in-flight:<token>` or
    /// `handled` with the layer's TTL (`SET NX PX` claims it atomically; a
    /// Lua script releases it only for the token that claimed it). A process
    /// that dies mid-delivery leaves its id in flight until the in-flight TTL
    /// ends ([`DEFAULT_IN_FLIGHT_TTL`](crate::verify::DEFAULT_IN_FLIGHT_TTL));
    /// meanwhile deliveries of that id are answered 409.
    ///
    /// ```no_run
    /// use eventsink::signature::Secret;
    /// use eventsink::verify::{RedisReplayGuard, VerifyConfig, VerifyWebhookLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = RedisReplayGuard::connect("redis://127.0.0.1:6379/", "myapp:webhooks:").await?;
    /// let layer = VerifyWebhookLayer::new(VerifyConfig::new(Secret::generate()?).replay_guard(guard));
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
                    let token = ClaimToken::random();
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(in_flight(token))
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(ttl))
                        .query_async(&mut connection)
                        .await
                        .map_err(ReplayError::new)?;
                    if set.is_some() {
                        return Ok(Claim::Claimed(token));
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
            _token: ClaimToken,
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

        fn release<'a>(
            &'a self,
            id: &'a str,
            token: ClaimToken,
        ) -> BoxFuture<'a, Result<(), ReplayError>> {
            Box::pin(async move {
                let mut connection = self.connection.clone();
                let _: i64 = self
                    .release
                    .key(self.key(id))
                    .arg(in_flight(token))
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

    fn claimed(guard: &MemoryReplayGuard, id: &str, ttl: Duration) -> ClaimToken {
        match guard.claim_now(id, ttl).unwrap() {
            Claim::Claimed(token) => token,
            other => panic!("{id} should be claimed, is {other:?}"),
        }
    }

    fn claim(guard: &MemoryReplayGuard, id: &str) -> Claim {
        guard.claim_now(id, TTL).unwrap()
    }

    #[test]
    fn handled_ids_expire_after_the_ttl() {
        let (now, clock) = manual_clock();
        let guard = MemoryReplayGuard::new().clock(clock);
        claimed(&guard, "a", TTL);
        guard.complete_now("a", TTL).unwrap();
        now.fetch_add(599, Ordering::SeqCst);
        assert_eq!(claim(&guard, "a"), Claim::AlreadyHandled);
        now.fetch_add(1, Ordering::SeqCst);
        claimed(&guard, "a", TTL);
    }

    #[test]
    fn release_forgets_in_flight_but_never_handled_ids() {
        let guard = MemoryReplayGuard::new();
        let token = claimed(&guard, "a", TTL);
        guard.release_now("a", token);
        let token = claimed(&guard, "a", TTL);
        guard.complete_now("a", TTL).unwrap();
        guard.release_now("a", token);
        assert_eq!(claim(&guard, "a"), Claim::AlreadyHandled);
    }

    #[test]
    fn only_the_holder_releases_a_claim() {
        let (now, clock) = manual_clock();
        let guard = MemoryReplayGuard::new().clock(clock);
        let in_flight = Duration::from_secs(60);
        let first = claimed(&guard, "a", in_flight);
        now.fetch_add(61, Ordering::SeqCst); // the first handler is slow
        let second = claimed(&guard, "a", in_flight);
        assert_ne!(first, second);
        guard.release_now("a", first); // the slow one fails
        assert_eq!(claim(&guard, "a"), Claim::InFlight);
        guard.release_now("a", second);
        claimed(&guard, "a", in_flight);
    }

    #[test]
    fn a_full_guard_evicts_handled_ids_but_never_an_in_flight_claim() {
        let guard = MemoryReplayGuard::new().capacity(3);
        claimed(&guard, "old", TTL);
        claimed(&guard, "done", TTL);
        guard.complete_now("done", TTL).unwrap();
        claimed(&guard, "newer", TTL);
        // Full: the handled id goes, though "old" was written first.
        claimed(&guard, "new", TTL);
        assert_eq!(guard.len(), 3);
        assert_eq!(claim(&guard, "old"), Claim::InFlight);
        assert_eq!(claim(&guard, "newer"), Claim::InFlight);
        // Now every id is in flight: a new claim is an error (503), not a
        // forgotten claim and not a panic. ("done" was evicted: it would
        // answer AlreadyHandled otherwise.)
        assert!(guard.claim_now("done", TTL).is_err());
        let err = guard.claim_now("another", TTL).unwrap_err();
        assert!(
            std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains("full"),
            "{err}"
        );
        assert_eq!(claim(&guard, "old"), Claim::InFlight);
    }

    #[test]
    fn memory_stays_bounded_by_the_capacity() {
        let (now, clock) = manual_clock();
        let guard = MemoryReplayGuard::new().capacity(100).clock(clock);
        for n in 0..10_000 {
            let id = format!("evt_{n}");
            claimed(&guard, &id, TTL);
            guard.complete_now(&id, TTL).unwrap();
            if n % 7 == 0 {
                now.fetch_add(1, Ordering::SeqCst);
            }
            let state = guard.lock();
            assert!(state.entries.len() <= 100, "{}", state.entries.len());
            assert!(state.order.len() <= 201, "{}", state.order.len());
        }
        // The newest ids are still remembered.
        assert_eq!(claim(&guard, "evt_9999"), Claim::AlreadyHandled);
        // Once everything expires a sweep empties the map.
        now.fetch_add(601, Ordering::SeqCst);
        claimed(&guard, "fresh", TTL);
        assert_eq!(guard.len(), 1);
    }
}
