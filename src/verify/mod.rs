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
//! # #[cfg(feature = "axum")] fn main() -> Result<(), eventsink::signature::SecretError> {
//! use axum::{Router, routing::post};
//! use eventsink::signature::Secret;
//! use eventsink::verify::{MemoryReplayGuard, VerifiedWebhook, VerifyConfig, VerifyWebhookLayer};
//!
//! async fn hook(webhook: VerifiedWebhook, body: String) -> &'static str {
//!     println!("event {} (sent at {}): {body}", webhook.id, webhook.timestamp);
//!     "ok"
//! }
//!
//! let secret: Secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse()?;
//! let config = VerifyConfig::new(secret).replay_guard(MemoryReplayGuard::new());
//! let app: Router = Router::new()
//!     .route("/webhooks", post(hook))
//!     .route_layer(VerifyWebhookLayer::new(config));
//! # let _ = app;
//! # Ok(()) }
//! # #[cfg(not(feature = "axum"))] fn main() {}
//! ```
//!
//! [`VerifyWebhookLayer::new`] takes a [`VerifyConfig`] (or just a
//! [`Secret`]); [`VerifyWebhook::layer`] is the same, named after the
//! service, as in tower-http.
//!
//! # What a request goes through
//!
//! | step | failure | answer |
//! | --- | --- | --- |
//! | `webhook-id`, `webhook-timestamp`, `webhook-signature` present, single, visible ASCII, in format (Go format: `signature`, 64 hex digits); the id follows the [rule the sender follows](crate::wire#the-rule) (`.` allowed) | missing or malformed | 400 |
//! | timestamp within ± [tolerance](VerifyConfig::tolerance) of the [`Clock`] | too old or too far ahead | 401 |
//! | body read through [`http_body_util::Limited`] | over [`max_body_bytes`](VerifyConfig::max_body_bytes) | 413 |
//! | the whole body arrives within [`body_timeout`](VerifyConfig::body_timeout) | too slow | 408, connection closed |
//! | one listed `v1,` signature matches one secret (constant time; `v1a` and other versions ignored) | none matches | 401 |
//! | Go format: the signed body's `id` and `now` (tolerance checked on `now`) | missing / too old | 400 / 401 |
//! | [replay guard](VerifyConfig::replay_guard), if set | id in flight / already handled / store down | 409 / 200 without calling the handler / 503 |
//!
//! Every answer of the layer has a short `text/plain` reason and never a
//! secret. A request that passes reaches the inner service with the same
//! bytes as body (a [`Full<Bytes>`](http_body_util::Full)) and a
//! [`VerifiedWebhook`] extension (with feature `axum`, a handler takes it as
//! an argument). With a replay guard, the id is recorded as
//! handled only when the inner service answers 2xx, so a failed handler gets
//! the sender's retry.
//!
//! In plain hyper, wrap the layered service with hyper-util's
//! `TowerToHyperService`: the layer takes any `Request<B>` whose `B` is an
//! `http_body::Body` (hyper's `Incoming` included) and answers with a
//! [`ResponseBody`], a `Body` of `Bytes`.
//!
//! # Serving it in production
//!
//! The layer bounds what it reads: the body's size
//! ([`max_body_bytes`](VerifyConfig::max_body_bytes)) and its arrival time
//! ([`body_timeout`](VerifyConfig::body_timeout), 408). Everything before
//! the body is the server's to bound, and `axum::serve` bounds none of it:
//! a client sending its headers at one byte a second holds a connection
//! indefinitely. Serve the app with hyper directly and set
//!
//! - a header-read timeout: hyper's
//!   `http1::Builder::timer(TokioTimer::new()).header_read_timeout(..)`;
//! - a timeout on the whole request: tower-http's
//!   `TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, ..)`;
//! - a limit on open connections: a `tokio::sync::Semaphore` permit taken
//!   before each `accept` and held by the connection's task.
//!
//! `examples/receiver.rs` does all three, with the numbers explained.
//!
//! Outside tower, [`verify`] and [`sign`] do the same checks on a header
//! map and a body in memory; with feature `axum`, the [`Verified`]
//! extractor deserialises the verified body into an [`Event`](crate::Event).

mod body;
mod check;
mod clock;
mod config;
#[cfg(feature = "axum")]
mod extract;
mod replay;
mod service;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::signature::{self, Scheme, Secret};
use crate::wire::{self, InvalidField};

pub use self::body::ResponseBody;
use self::check::Checks;
pub use self::check::Rejection;
pub use self::clock::Clock;
pub use self::config::VerifyConfig;
#[cfg(feature = "axum")]
pub use self::extract::{Verified, VerifiedRejection};
#[cfg(feature = "redis-replay")]
pub use self::replay::RedisReplayGuard;
pub use self::replay::{
    BoxFuture, Claim, ClaimToken, DEFAULT_REPLAY_CAPACITY, MemoryReplayGuard, ReplayError,
    ReplayGuard,
};
pub use self::service::{ResponseFuture, VerifyWebhook};

/// How far a webhook's timestamp may be from now, either way: 5 minutes, as
/// every Standard Webhooks reference library (and the `standardwebhooks`
/// crate) checks.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Largest body the layer reads: 1 MiB. Standard Webhooks advises payloads
/// under about 20 KB and senders cap them at 50 KB–512 KiB (Convoy, Svix,
/// Hook0), so this leaves room without letting a client fill memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long the layer waits for the whole body once the headers are in:
/// 10 s. A [`DEFAULT_MAX_BODY_BYTES`] body (1 MiB) takes about 8.4 s at
/// 1 Mbit/s, rounded up; and a sender's attempt lasts 15 s (Standard
/// Webhooks recommends 15–30 s), so the handler keeps the rest. A client
/// that drips its body (a slow-loris attack) is answered 408 and
/// disconnected instead of holding a connection and a task indefinitely.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a replay guard remembers a handled id: 40 hours, the longest a
/// sender on the queue's default schedule (`RetrySchedule::standard()`:
/// steps of 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, 27 h 35 min in all)
/// can keep retrying one event. A receiver's `Retry-After` can stretch a
/// wait to twice its step but not past the longest step (10 h), and jitter
/// adds up to 20 % to each: at most 39 h 10 min of waits
/// (`RetrySchedule::longest_span`); eight attempts of at most 15 s add
/// 2 min; rounded up to whole hours. So an event whose `2xx` was lost is answered "already handled" on
/// every retry instead of running the handler again. (A queue backlog can
/// delay attempts further; raise
/// [`replay_ttl`](VerifyConfig::replay_ttl) if yours does.)
///
/// It is never less than twice the tolerance (a request is accepted for one
/// tolerance before and after its timestamp, so a replay can arrive up to two
/// tolerances after it). With [`MemoryReplayGuard`] the
/// [capacity](MemoryReplayGuard#memory-bound), not this window, bounds memory.
pub const DEFAULT_REPLAY_TTL: Duration = Duration::from_secs(40 * 3600);

/// How long an id stays claimed by a delivery still in flight: 1 minute.
/// Standard Webhooks senders give up on an attempt after 15–30 s, so by
/// then the sender has retried or will; the bound also keeps a receiver
/// that crashed mid-delivery (with a shared store such as Redis) from
/// answering 409 for that id any longer.
pub const DEFAULT_IN_FLIGHT_TTL: Duration = Duration::from_secs(60);

/// What the layer verified: a handler's argument (axum, feature `axum`) and
/// the request's extension (any tower service).
///
/// With feature `axum` it is an extractor; on a route without
/// [`VerifyWebhookLayer`] it answers 500 with a text saying so.
///
/// ```
/// # #[cfg(feature = "axum")] fn main() {
/// use eventsink::verify::VerifiedWebhook;
///
/// async fn hook(webhook: VerifiedWebhook) -> String {
///     format!("got {}", webhook.id)
/// }
/// # let _ = axum::routing::post::<_, _, ()>(hook);
/// # }
/// # #[cfg(not(feature = "axum"))] fn main() {}
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
    /// [`Scheme::GoCompatible`], never [`Scheme::Both`].
    pub scheme: Scheme,
}

/// Verifies webhook requests; see the [module docs](self). Built from a
/// [`VerifyConfig`], or from a [`Secret`] alone for the defaults.
///
/// ```
/// use eventsink::signature::Secret;
/// use eventsink::verify::{MemoryReplayGuard, VerifyConfig, VerifyWebhookLayer};
///
/// // One secret, defaults for everything else.
/// let layer = VerifyWebhookLayer::new(Secret::generate()?);
/// // Or a configuration.
/// let layer = VerifyWebhookLayer::new(
///     VerifyConfig::new(Secret::generate()?).replay_guard(MemoryReplayGuard::new()),
/// );
/// # let _ = layer;
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Debug, Clone)]
pub struct VerifyWebhookLayer {
    checks: Arc<Checks>,
}

impl VerifyWebhookLayer {
    /// A layer that verifies with `config` (a [`VerifyConfig`] or a
    /// [`Secret`]).
    pub fn new(config: impl Into<VerifyConfig>) -> Self {
        VerifyWebhookLayer {
            checks: Arc::new(config.into().into_checks()),
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
        self.checks.verify(headers, body)
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
/// [`DEFAULT_MAX_BODY_BYTES`]. For other settings build a layer and call
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
    VerifyConfig::with_secrets(secrets.to_vec())
        .into_checks()
        .verify(headers, body)
}
