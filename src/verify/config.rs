//! [`VerifyConfig`]: what [`VerifyWebhookLayer`](super::VerifyWebhookLayer)
//! accepts, built once and shared by every clone of the layer.

use std::sync::Arc;
use std::time::Duration;

use super::check::{Checks, Replay};
use super::{
    Clock, DEFAULT_BODY_TIMEOUT, DEFAULT_IN_FLIGHT_TTL, DEFAULT_MAX_BODY_BYTES, DEFAULT_REPLAY_TTL,
    DEFAULT_TOLERANCE, ReplayGuard,
};
use crate::signature::{Scheme, Secret};

/// The configuration of [`VerifyWebhookLayer`](super::VerifyWebhookLayer):
/// a secret, and defaults for everything else, each setter documented with
/// its default. A [`Secret`] converts into one, so
/// `VerifyWebhookLayer::new(secret)` is the common case.
///
/// ```
/// use std::time::Duration;
/// use eventsink::signature::{Scheme, Secret};
/// use eventsink::verify::{MemoryReplayGuard, VerifyConfig, VerifyWebhookLayer};
///
/// let config = VerifyConfig::new(Secret::generate()?)
///     .secret(Secret::generate()?)           // the previous key, during a rotation
///     .scheme(Scheme::Both)                  // while senders migrate
///     .tolerance(Duration::from_secs(60))
///     .max_body_bytes(64 * 1024)
///     .body_timeout(Duration::from_secs(5))
///     .replay_guard(MemoryReplayGuard::new())
///     .replay_ttl(Duration::from_secs(72 * 3600)) // a sender that retries for 3 days
///     .in_flight_ttl(Duration::from_secs(120));   // a slow handler
/// let layer = VerifyWebhookLayer::new(config.clone()); // configurations are Clone
/// # let _ = layer;
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "give the configuration to VerifyWebhookLayer::new"]
pub struct VerifyConfig {
    secrets: Vec<Secret>,
    scheme: Scheme,
    tolerance: Duration,
    max_body_bytes: usize,
    body_timeout: Duration,
    clock: Clock,
    replay_guard: Option<Arc<dyn ReplayGuard>>,
    replay_ttl: Duration,
    in_flight_ttl: Duration,
}

impl VerifyConfig {
    /// Accepts Standard Webhooks signed with `secret`, with the default
    /// tolerance and body limit and no replay guard.
    pub fn new(secret: Secret) -> Self {
        VerifyConfig::with_secrets(vec![secret])
    }

    /// The defaults, with `secrets`.
    pub(crate) fn with_secrets(secrets: Vec<Secret>) -> Self {
        VerifyConfig {
            secrets,
            scheme: Scheme::default(),
            tolerance: DEFAULT_TOLERANCE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            clock: Clock::system(),
            replay_guard: None,
            replay_ttl: DEFAULT_REPLAY_TTL,
            in_flight_ttl: DEFAULT_IN_FLIGHT_TTL,
        }
    }

    /// Accepts signatures made with `secret` too: during a key rotation,
    /// configure the new key and the old one.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// Which format to accept; [`Scheme::Standard`] by default, and
    /// [`Scheme::Both`] accepts either (Standard when `webhook-signature`
    /// is present).
    pub fn scheme(self, scheme: Scheme) -> Self {
        Self { scheme, ..self }
    }

    /// How far the timestamp may be from now, either way (whole seconds);
    /// [`DEFAULT_TOLERANCE`] by default. The Go original's docs advise 30 s
    /// for its format.
    pub fn tolerance(self, tolerance: Duration) -> Self {
        Self { tolerance, ..self }
    }

    /// The largest body accepted, in bytes; [`DEFAULT_MAX_BODY_BYTES`] by
    /// default.
    pub fn max_body_bytes(self, max_body_bytes: usize) -> Self {
        Self {
            max_body_bytes,
            ..self
        }
    }

    /// How long the body may take to arrive once the headers are in;
    /// [`DEFAULT_BODY_TIMEOUT`] by default. A slower body is answered 408
    /// ([`Rejection::BodyTimeout`](super::Rejection::BodyTimeout)) with
    /// `connection: close`. Header reads are the server's to bound (see the
    /// receiver example's production setup).
    pub fn body_timeout(self, body_timeout: Duration) -> Self {
        Self {
            body_timeout,
            ..self
        }
    }

    /// Where "now" comes from; the system clock by default. Tests set it to
    /// check the tolerance without waiting.
    ///
    /// ```
    /// # use eventsink::{signature::Secret, verify::{Clock, VerifyConfig}};
    /// use chrono::{TimeZone, Utc};
    /// let at = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    /// let config = VerifyConfig::new(Secret::generate()?).clock(Clock::fixed(at));
    /// # let _ = config;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn clock(self, clock: Clock) -> Self {
        Self { clock, ..self }
    }

    /// Deduplicates deliveries by id with `guard` (none by default): an id
    /// already handled answers 200 without calling the handler, and one in
    /// flight answers 409.
    pub fn replay_guard(mut self, guard: impl ReplayGuard) -> Self {
        self.replay_guard = Some(Arc::new(guard));
        self
    }

    /// How long the replay guard remembers an id; [`DEFAULT_REPLAY_TTL`] by
    /// default (it covers the queue's default retry schedule), and never
    /// less than twice the tolerance (a shorter value is raised to that).
    /// Keep it at least as long as your sender keeps retrying one event, or a
    /// retry after a lost `2xx` runs the handler again.
    pub fn replay_ttl(self, replay_ttl: Duration) -> Self {
        Self { replay_ttl, ..self }
    }

    /// How long a delivery in flight holds its id (answering 409 to
    /// duplicates); [`DEFAULT_IN_FLIGHT_TTL`] by default. A handler that runs
    /// longer loses the hold, and a duplicate then reaches the handler too.
    pub fn in_flight_ttl(self, in_flight_ttl: Duration) -> Self {
        Self {
            in_flight_ttl,
            ..self
        }
    }

    /// The checks this configuration describes, TTLs raised to their floors.
    pub(crate) fn into_checks(self) -> Checks {
        let tolerance = Duration::from_secs(self.tolerance.as_secs());
        let replay = self.replay_guard.map(|guard| Replay {
            guard,
            ttl: self.replay_ttl.max(tolerance.saturating_mul(2)),
            in_flight_ttl: self.in_flight_ttl.max(Duration::from_secs(1)),
        });
        Checks {
            secrets: self.secrets,
            scheme: self.scheme,
            tolerance,
            max_body_bytes: self.max_body_bytes,
            body_timeout: self.body_timeout,
            clock: self.clock,
            replay,
        }
    }
}

impl From<Secret> for VerifyConfig {
    /// [`VerifyConfig::new`].
    fn from(secret: Secret) -> Self {
        VerifyConfig::new(secret)
    }
}
