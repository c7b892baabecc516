//! The receiving side: [`VerifyWebhookLayer`] checks the signature,
//! timestamp, size and (optionally) the novelty of webhooks before your
//! handler sees them.
//!
//! Receivers get webhook verification wrong in known ways: they verify
//! re-serialised JSON instead of the raw bytes, skip the timestamp check
//! (so a captured request can be replayed forever), buffer bodies of any
//! size, and run the handler again for every retry of one event. This layer
//! does it in one place, for the Standard Webhooks format our
//! [`WebhookSink`](crate::webhook::WebhookSink) sends and for the Go
//! original's format, as a tower layer that fits axum's `Router::layer` /
//! `route_layer` and plain hyper services.
//!
//! ```
//! use axum::{Router, routing::post, Extension};
//! use eventsink::signature::Secret;
//! use eventsink::verify::{MemoryReplayGuard, VerifiedWebhook, VerifyWebhookLayer};
//!
//! async fn hook(Extension(webhook): Extension<VerifiedWebhook>, body: String) -> &'static str {
//!     println!("event {} (sent at {}): {body}", webhook.id, webhook.timestamp);
//!     "ok"
//! }
//!
//! let secret: Secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse()?;
//! let app: Router = Router::new()
//!     .route("/webhooks", post(hook))
//!     .route_layer(
//!         VerifyWebhookLayer::builder(secret)
//!             .replay_guard(MemoryReplayGuard::new())
//!             .build(),
//!     );
//! # let _ = app;
//! # Ok::<(), eventsink::signature::SecretError>(())
//! ```
//!
//! # What a request goes through
//!
//! | step | failure | answer |
//! | --- | --- | --- |
//! | `webhook-id`, `webhook-timestamp`, `webhook-signature` present, single, visible ASCII, in format (Go format: `signature`, 64 hex digits); the id follows the [rule the sender follows](crate::wire#the-rule) (`.` allowed) | missing or malformed | 400 |
//! | timestamp within ± [tolerance](VerifyWebhookLayerBuilder::tolerance) of the [`Clock`] | too old or too far ahead | 401 |
//! | body read through [`http_body_util::Limited`] | over [`max_body`](VerifyWebhookLayerBuilder::max_body) | 413 |
//! | one listed `v1,` signature matches one secret (constant time; `v1a` and other versions ignored) | none matches | 401 |
//! | Go format: the signed body's `id` and `now` (tolerance checked on `now`) | missing / too old | 400 / 401 |
//! | [replay guard](VerifyWebhookLayerBuilder::replay_guard), if set | id in flight / already handled / store down | 409 / 200 without calling the handler / 503 |
//!
//! Every answer of the layer has a short `text/plain` reason and never a
//! secret. A request that passes reaches the inner service with the same
//! bytes as body (a [`Full<Bytes>`](http_body_util::Full)) and a
//! [`VerifiedWebhook`] extension. With a replay guard, the id is recorded as
//! handled only when the inner service answers 2xx, so a failed handler gets
//! the sender's retry.
//!
//! In plain hyper, wrap the layered service with hyper-util's
//! `TowerToHyperService`: the layer takes any `Request<B>` whose `B` is an
//! `http_body::Body` (hyper's `Incoming` included) and answers with a
//! [`ResponseBody`], a `Body` of `Bytes`.
//!
//! Outside tower, [`verify`] and [`sign`] do the same checks on a header
//! map and a body in memory; with feature `axum`, the [`Verified`]
//! extractor deserialises the verified body into an [`Event`](crate::Event).

mod body;
mod check;
mod clock;
#[cfg(feature = "axum")]
mod extract;
mod replay;
mod service;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::signature::{self, Secret};
use crate::wire::{self, InvalidField};

pub use self::body::ResponseBody;
pub use self::check::Rejection;
use self::check::{Config, Replay};
pub use self::clock::Clock;
#[cfg(feature = "axum")]
pub use self::extract::{Verified, VerifiedRejection};
#[cfg(feature = "redis-replay")]
pub use self::replay::RedisReplayGuard;
pub use self::replay::{
    BoxFuture, Claim, ClaimToken, DEFAULT_REPLAY_CAPACITY, MemoryReplayGuard, ReplayError,
    ReplayGuard,
};
pub use self::service::VerifyWebhook;

/// How far a webhook's timestamp may be from now, either way: 5 minutes, as
/// every Standard Webhooks reference library (and the `standardwebhooks`
/// crate) checks.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Largest body the layer reads: 1 MiB. Standard Webhooks advises payloads
/// under about 20 KB and senders cap them at 50 KB–512 KiB (Convoy, Svix,
/// Hook0), so this leaves room without letting a client fill memory.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// How long a replay guard remembers a handled id: 56 hours, the longest a
/// sender on the queue's default schedule (`RetrySchedule::standard()`:
/// steps of 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, 27 h 35 min in all)
/// can keep retrying one event. Jitter (+20 %) stretches that to 33 h 6 min;
/// a receiver's `Retry-After`, honoured up to twice each step, to 55 h
/// 10 min; eight attempts of at most 15 s add 2 min; rounded up to whole
/// hours. So an event whose `2xx` was lost is answered "already handled" on
/// every retry instead of running the handler again. (A queue backlog can
/// delay attempts further; raise
/// [`replay_ttl`](VerifyWebhookLayerBuilder::replay_ttl) if yours does.)
///
/// It is never less than twice the tolerance (a request is accepted for one
/// tolerance before and after its timestamp, so a replay can arrive up to two
/// tolerances after it). With [`MemoryReplayGuard`] the
/// [capacity](MemoryReplayGuard#memory-bound), not this window, bounds memory.
pub const DEFAULT_REPLAY_TTL: Duration = Duration::from_secs(56 * 3600);

/// How long an id stays claimed by a delivery still in flight: 1 minute.
/// Standard Webhooks senders give up on an attempt after 15–30 s, so by
/// then the sender has retried or will; the bound also keeps a receiver
/// that crashed mid-delivery (with a shared store such as Redis) from
/// answering 409 for that id any longer.
pub const DEFAULT_IN_FLIGHT_TTL: Duration = Duration::from_secs(60);

/// Which signature format the layer accepts.
///
/// ```
/// use eventsink::verify::Scheme;
/// assert_eq!(Scheme::default(), Scheme::Standard);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scheme {
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature: v1,<base64>` over `"{id}.{timestamp}.{body}"`.
    #[default]
    Standard,
    /// The Go original's format: `signature: <hex HMAC of the body>` keyed
    /// with the secret's raw bytes; the id and the time to check come from
    /// the body's `id` and `now` fields.
    GoCompatible,
    /// Standard when `webhook-signature` is present, else Go-compatible when
    /// `signature` is: for migrating senders. A sender that sends both
    /// header sets is checked as Standard.
    Either,
}

/// What the layer verified, in the request's extensions for the handler.
///
/// ```
/// use axum::Extension;
/// use eventsink::verify::VerifiedWebhook;
///
/// async fn hook(Extension(webhook): Extension<VerifiedWebhook>) -> String {
///     format!("got {}", webhook.id)
/// }
/// # let _ = axum::routing::post::<_, _, ()>(hook);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedWebhook {
    /// The webhook id (the event id): `webhook-id`, or the Go body's `id`.
    pub id: String,
    /// Unix seconds the sender signed at: `webhook-timestamp`, or the Go
    /// body's `now`.
    pub timestamp: i64,
    /// The scheme that verified: [`Scheme::Standard`] or
    /// [`Scheme::GoCompatible`], never [`Scheme::Either`].
    pub scheme: Scheme,
}

/// Verifies webhook requests; see the [module docs](self).
///
/// ```
/// use eventsink::signature::Secret;
/// use eventsink::verify::VerifyWebhookLayer;
///
/// // One secret, defaults for everything else.
/// let layer = VerifyWebhookLayer::new(Secret::generate()?);
/// # let _ = layer;
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Debug, Clone)]
pub struct VerifyWebhookLayer {
    config: Arc<Config>,
}

impl VerifyWebhookLayer {
    /// A layer that accepts Standard Webhooks signed with `secret`, with the
    /// default tolerance and body limit and no replay guard.
    ///
    /// ```
    /// let layer = eventsink::verify::VerifyWebhookLayer::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse()?);
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn new(secret: Secret) -> Self {
        VerifyWebhookLayer::builder(secret).build()
    }

    /// A builder starting with `secret`; add older ones with
    /// [`secret`](VerifyWebhookLayerBuilder::secret).
    ///
    /// ```
    /// use std::time::Duration;
    /// use eventsink::signature::Secret;
    /// use eventsink::verify::{MemoryReplayGuard, Scheme, VerifyWebhookLayer};
    ///
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?)
    ///     .secret(Secret::generate()?)                   // the previous key, during rotation
    ///     .scheme(Scheme::Either)
    ///     .tolerance(Duration::from_secs(60))
    ///     .max_body(64 * 1024)
    ///     .replay_guard(MemoryReplayGuard::new())
    ///     .build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn builder(secret: Secret) -> VerifyWebhookLayerBuilder {
        VerifyWebhookLayerBuilder {
            secrets: vec![secret],
            scheme: Scheme::default(),
            tolerance: DEFAULT_TOLERANCE,
            max_body: DEFAULT_MAX_BODY,
            clock: Clock::system(),
            replay_guard: None,
            replay_ttl: DEFAULT_REPLAY_TTL,
            in_flight_ttl: DEFAULT_IN_FLIGHT_TTL,
        }
    }

    /// Runs this layer's checks (without the replay guard) on headers and
    /// a body in memory, for code outside tower that needs a non-default
    /// configuration.
    ///
    /// # Errors
    ///
    /// The [`Rejection`] the layer would answer with.
    ///
    /// ```
    /// use eventsink::signature::Secret;
    /// use eventsink::verify::{self, VerifyWebhookLayer};
    ///
    /// let secret = Secret::generate()?;
    /// let headers = verify::sign(&[secret.clone()], "evt_1", chrono::Utc::now().timestamp(), b"{}")?;
    /// let layer = VerifyWebhookLayer::new(secret);
    /// assert_eq!(layer.verify(&headers, b"{}").unwrap().id, "evt_1");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<VerifiedWebhook, Rejection> {
        self.config.verify(headers, body)
    }
}

/// Configures a [`VerifyWebhookLayer`]; from [`VerifyWebhookLayer::builder`].
///
/// ```
/// use eventsink::signature::Secret;
/// use eventsink::verify::{Scheme, VerifyWebhookLayer};
///
/// let layer = VerifyWebhookLayer::builder(Secret::from_raw("the-go-app-secret")?)
///     .scheme(Scheme::GoCompatible)
///     .build();
/// # let _ = layer;
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the layer"]
pub struct VerifyWebhookLayerBuilder {
    secrets: Vec<Secret>,
    scheme: Scheme,
    tolerance: Duration,
    max_body: usize,
    clock: Clock,
    replay_guard: Option<Arc<dyn ReplayGuard>>,
    replay_ttl: Duration,
    in_flight_ttl: Duration,
}

impl VerifyWebhookLayerBuilder {
    /// Accepts signatures made with `secret` too: during a key rotation,
    /// configure the new key and the old one.
    ///
    /// ```
    /// # use eventsink::{signature::Secret, verify::VerifyWebhookLayer};
    /// let (new, old) = (Secret::generate()?, Secret::generate()?);
    /// let layer = VerifyWebhookLayer::builder(new).secret(old).build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// Which format to accept; [`Scheme::Standard`] by default.
    ///
    /// ```
    /// # use eventsink::{signature::Secret, verify::{Scheme, VerifyWebhookLayer}};
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?).scheme(Scheme::Either).build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// How far the timestamp may be from now, either way (whole seconds);
    /// [`DEFAULT_TOLERANCE`] by default. The Go original's docs advise 30 s
    /// for its format.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use eventsink::{signature::Secret, verify::VerifyWebhookLayer};
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?).tolerance(Duration::from_secs(30)).build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The largest body accepted, in bytes; [`DEFAULT_MAX_BODY`] by default.
    ///
    /// ```
    /// # use eventsink::{signature::Secret, verify::VerifyWebhookLayer};
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?).max_body(64 * 1024).build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Where "now" comes from; the system clock by default. Tests set it to
    /// check the tolerance without waiting.
    ///
    /// ```
    /// # use eventsink::{signature::Secret, verify::{Clock, VerifyWebhookLayer}};
    /// use chrono::{TimeZone, Utc};
    /// let at = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?).clock(Clock::fixed(at)).build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Deduplicates deliveries by id with `guard` (none by default): an id
    /// already handled answers 200 without calling the handler, and one in
    /// flight answers 409.
    ///
    /// ```
    /// # use eventsink::{signature::Secret, verify::{MemoryReplayGuard, VerifyWebhookLayer}};
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?)
    ///     .replay_guard(MemoryReplayGuard::new())
    ///     .build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn replay_guard(mut self, guard: impl ReplayGuard) -> Self {
        self.replay_guard = Some(Arc::new(guard));
        self
    }

    /// How long the replay guard remembers an id; [`DEFAULT_REPLAY_TTL`] by
    /// default (it covers the queue's default retry schedule), and never
    /// less than twice the tolerance (a shorter value is raised to that).
    /// Keep it at least as long as your sender keeps retrying one event, or a
    /// retry after a lost `2xx` runs the handler again.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use eventsink::{signature::Secret, verify::{MemoryReplayGuard, VerifyWebhookLayer}};
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?)
    ///     .replay_guard(MemoryReplayGuard::new())
    ///     .replay_ttl(Duration::from_secs(72 * 3600)) // a sender that retries for 3 days
    ///     .build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn replay_ttl(mut self, ttl: Duration) -> Self {
        self.replay_ttl = ttl;
        self
    }

    /// How long a delivery in flight holds its id (answering 409 to
    /// duplicates); [`DEFAULT_IN_FLIGHT_TTL`] by default. A handler that runs
    /// longer loses the hold, and a duplicate then reaches the handler too.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use eventsink::{signature::Secret, verify::{MemoryReplayGuard, VerifyWebhookLayer}};
    /// let layer = VerifyWebhookLayer::builder(Secret::generate()?)
    ///     .replay_guard(MemoryReplayGuard::new())
    ///     .in_flight_ttl(Duration::from_secs(120)) // a slow handler
    ///     .build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn in_flight_ttl(mut self, ttl: Duration) -> Self {
        self.in_flight_ttl = ttl;
        self
    }

    /// The layer.
    ///
    /// ```
    /// # use eventsink::{signature::Secret, verify::VerifyWebhookLayer};
    /// let layer: VerifyWebhookLayer = VerifyWebhookLayer::builder(Secret::generate()?).build();
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn build(self) -> VerifyWebhookLayer {
        let tolerance = Duration::from_secs(self.tolerance.as_secs());
        let replay = self.replay_guard.map(|guard| Replay {
            guard,
            ttl: self.replay_ttl.max(tolerance.saturating_mul(2)),
            in_flight_ttl: self.in_flight_ttl.max(Duration::from_secs(1)),
        });
        VerifyWebhookLayer {
            config: Arc::new(Config {
                secrets: self.secrets,
                scheme: self.scheme,
                tolerance,
                max_body: self.max_body,
                clock: self.clock,
                replay,
            }),
        }
    }
}

/// The Standard Webhooks headers (`webhook-id`, `webhook-timestamp`,
/// `webhook-signature` with one `v1,` entry per secret) for sending `body`,
/// for senders outside [`WebhookSink`](crate::webhook::WebhookSink) and for
/// tests. The Go format's header is
/// [`signature::sign_go`].
///
/// # Errors
///
/// [`InvalidField`] if `id` breaks the [rule for ids](crate::wire#the-rule)
/// (the one [`WebhookSink`](crate::webhook::WebhookSink) follows and the
/// layer checks).
///
/// ```
/// use eventsink::signature::Secret;
/// use eventsink::verify;
///
/// let secret = Secret::generate()?;
/// let now = chrono::Utc::now().timestamp();
/// let headers = verify::sign(&[secret.clone()], "evt_1", now, b"{}")?;
/// assert_eq!(headers["webhook-id"], "evt_1");
/// assert!(verify::verify(&[secret], &headers, b"{}").is_ok());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn sign(
    secrets: &[Secret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<HeaderMap, InvalidField> {
    wire::check_id(id)?;
    // The rule allows visible ASCII only: always a valid header value.
    let Ok(id_value) = HeaderValue::from_str(id) else {
        unreachable!("an id that passes wire::check_id is visible ASCII")
    };
    let signatures = signature::sign(secrets, id, timestamp, body);
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(wire::WEBHOOK_ID, id_value);
    headers.insert(wire::WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    // base64, ',' and ' ' are all valid header characters.
    let Ok(signatures) = HeaderValue::from_str(&signatures) else {
        unreachable!("a v1 signature list is visible ASCII")
    };
    headers.insert(wire::WEBHOOK_SIGNATURE, signatures);
    Ok(headers)
}

/// Checks a Standard Webhooks request given as headers and a body in
/// memory, with the defaults: [`DEFAULT_TOLERANCE`] on the system clock and
/// [`DEFAULT_MAX_BODY`]. For other settings build a layer and call
/// [`VerifyWebhookLayer::verify`].
///
/// # Errors
///
/// The [`Rejection`] the layer would answer with.
///
/// ```
/// use eventsink::signature::Secret;
/// use eventsink::verify::{self, Rejection};
///
/// let secret = Secret::generate()?;
/// let headers = verify::sign(&[secret.clone()], "evt_1", chrono::Utc::now().timestamp(), b"{}")?;
/// assert_eq!(verify::verify(&[secret.clone()], &headers, b"{}")?.id, "evt_1");
/// assert_eq!(verify::verify(&[secret], &headers, b"{ }"), Err(Rejection::SignatureMismatch));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn verify(
    secrets: &[Secret],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<VerifiedWebhook, Rejection> {
    let config = Config {
        secrets: secrets.to_vec(),
        scheme: Scheme::Standard,
        tolerance: DEFAULT_TOLERANCE,
        max_body: DEFAULT_MAX_BODY,
        clock: Clock::system(),
        replay: None,
    };
    config.verify(headers, body)
}
