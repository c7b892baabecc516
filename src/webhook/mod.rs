//! [`WebhookSink`]: delivers each event as a signed HTTP POST that receivers
//! can trust.
//!
//! The default wire format is [Standard Webhooks]: the body is the event's
//! JSON, and three headers let the receiver check it —
//! `webhook-id` (the event id, for deduplication), `webhook-timestamp` (unix
//! seconds of this attempt, against replays) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256>` over `"{id}.{timestamp}.{body}"`, one entry
//! per secret so keys can be rotated). [`Scheme::GoCompatible`] speaks the
//! Go original's format instead, and [`Scheme::Both`] sends both header sets
//! while receivers migrate.
//!
//! The signature is computed inside each call, over the exact bytes sent, so
//! every retry carries a fresh timestamp. Redirects are never followed. Every
//! answer is classified: 2xx is success; 3xx, 408, 409, 425, 429 and 5xx (but
//! 501 and 505) are transient; other 4xx are permanent; connection errors
//! and timeouts are transient. A `Retry-After` is carried on the error for
//! [`RetryPolicy`](crate::RetryPolicy) and the queue to honour.
//!
//! ```no_run
//! use std::time::Duration;
//! use eventsink::{Event, RetryPolicy, SinkExt};
//! use eventsink::signature::{Scheme, Secret};
//! use eventsink::webhook::{EgressPolicy, WebhookSink};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main] async fn main() -> Result<(), eventsink::BoxError> {
//! let webhook = WebhookSink::builder("https://receiver.example.com/hooks/orders")
//!     .secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse()?) // current key
//!     .scheme(Scheme::Standard)
//!     .egress(EgressPolicy::public_only()) // the URL came from a user
//!     .build()?;
//!
//! let mut sink = ServiceBuilder::new()
//!     .buffer(1024)
//!     .retry(RetryPolicy::default())
//!     .timeout(Duration::from_secs(20)) // around each attempt; the sink's own is 15 s
//!     .service(webhook);
//! sink.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
//! # Ok(()) }
//! ```
//!
//! Every event is checked against the [rule for ids and
//! kinds](crate::wire#the-rule) that
//! [`VerifyWebhookLayer`](crate::verify::VerifyWebhookLayer) checks too, in
//! every [`Scheme`]; an event it refuses fails with a permanent
//! [`Error::InvalidEvent`] before anything is sent, never with the
//! receiver's `400`.
//!
//! **Always configure a secret.** An unsigned webhook can be forged by
//! anyone who learns the URL, and replayed by anyone who sees one request;
//! the receiver has no way to tell. Unsigned delivery exists for receivers
//! behind other authentication (mutual TLS, a private network).
//!
//! The parts: [`WebhookSinkBuilder`] (configuration), `sign.rs` (the signed
//! request of one attempt), [`classify`] (the answer, as success or
//! [`Error`]), [`egress`] (where the sink may connect) and [`BuildError`].
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com

mod builder;
pub mod classify;
pub mod egress;
mod error;
mod sign;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Client, StatusCode, Url};
use serde::Serialize;
use tower::Service;
use tracing::Instrument;

pub use self::builder::WebhookSinkBuilder;
pub use self::egress::EgressPolicy;
pub use self::error::BuildError;
use crate::signature::{Scheme, Secret};
use crate::{Error, Event};

/// Per-attempt timeout, connecting and reading the answer included. 15 s:
/// the Go original gave each delivery 15 s, and Standard Webhooks
/// recommends 15–30 s.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// Timeout for establishing a connection. 5 s, as Hook0.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest body sent, in bytes: 256 KiB, between Convoy's 50 KB, Svix's
/// ~350 KB and Hook0's 512 KiB. Standard Webhooks advises keeping payloads
/// under 20 KB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// The `user-agent` header: `eventsink/<version>`.
pub const USER_AGENT_VALUE: &str = concat!("eventsink/", env!("CARGO_PKG_VERSION"));

/// Overrides the classification of an HTTP status: return `Some(retryable)`
/// to decide, `None` to keep the default ([`classify::is_retryable_status`]).
pub type StatusClassifier = Arc<dyn Fn(StatusCode) -> Option<bool> + Send + Sync>;

/// A sink that POSTs each event to one URL. Cheap to clone: clones share the
/// HTTP client, its connection pool and the configuration.
///
/// Build one with [`WebhookSink::builder`]; see the [module docs](self).
#[derive(Clone)]
pub struct WebhookSink {
    client: Client,
    config: Arc<Config>,
}

/// What every attempt is made with; shared by the sink's clones.
struct Config {
    url: Url,
    /// The URL without credentials, query or fragment: safe to log.
    display_url: String,
    host: String,
    secrets: Vec<Secret>,
    scheme: Scheme,
    /// The custom headers plus `content-type` and `user-agent`: the start
    /// of every request's headers.
    headers: HeaderMap,
    attempt_timeout: Duration,
    max_body_bytes: usize,
    status_classifier: Option<StatusClassifier>,
}

impl WebhookSink {
    /// Starts building a sink that delivers to `url`.
    ///
    /// ```
    /// let sink = eventsink::webhook::WebhookSink::builder("https://example.com/hook").build()?;
    /// assert_eq!(sink.url(), "https://example.com/hook");
    /// # Ok::<(), eventsink::webhook::BuildError>(())
    /// ```
    pub fn builder(url: impl Into<String>) -> WebhookSinkBuilder {
        WebhookSinkBuilder::new(url.into())
    }

    /// The destination, without credentials, query string or fragment.
    ///
    /// ```
    /// let sink = eventsink::webhook::WebhookSink::builder("https://u:p@example.com/h?token=x").build()?;
    /// assert_eq!(sink.url(), "https://example.com/h");
    /// # Ok::<(), eventsink::webhook::BuildError>(())
    /// ```
    pub fn url(&self) -> &str {
        &self.config.display_url
    }
}

impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("WebhookSink")
            .field("url", &c.display_url)
            .field("scheme", &c.scheme)
            .field("secrets", &c.secrets.len())
            .field("headers", &c.headers.keys().collect::<Vec<_>>())
            .field("attempt_timeout", &c.attempt_timeout)
            .field("max_body_bytes", &c.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl<P: Serialize> Service<Event<P>> for WebhookSink {
    type Response = ();
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event<P>) -> Self::Future {
        // Field names of the OpenTelemetry HTTP client conventions; see
        // the table in `crate::trace`.
        let span = tracing::info_span!(
            "webhook",
            http.request.method = "POST",
            url.full = %self.config.display_url,
            server.address = %self.config.host,
            http.response.status_code = tracing::field::Empty,
            messaging.message.id = %event.id,
            eventsink.event.kind = %event.kind,
            eventsink.duration_ms = tracing::field::Empty,
            otel.kind = "client",
        );
        match sign::request(&self.config, &event) {
            Ok(mut request) => {
                if let Some(traceparent) = crate::trace::traceparent(&span)
                    .and_then(|t| reqwest::header::HeaderValue::try_from(t).ok())
                {
                    request
                        .headers_mut()
                        .insert(crate::trace::TRACEPARENT, traceparent);
                }
                let sending = self.client.execute(request);
                let attempt = classify::attempt(Arc::clone(&self.config), sending);
                ResponseFuture::sending(attempt.instrument(span))
            }
            Err(error) => {
                span.in_scope(|| tracing::warn!("not sent: {error}"));
                ResponseFuture::refused(error)
            }
        }
    }
}

/// The future of [`WebhookSink`]'s `call`: one signed HTTP attempt, or the
/// error of an event refused before sending.
///
/// ```
/// use eventsink::Retryable;
/// use eventsink::webhook::{ResponseFuture, WebhookSink};
/// use tower::Service;
///
/// # #[tokio::main] async fn main() -> Result<(), eventsink::BoxError> {
/// let mut sink = WebhookSink::builder("http://127.0.0.1:9/unreachable").build()?;
/// let attempt: ResponseFuture = sink.call(eventsink::Event::new("ping", ()));
/// assert!(attempt.await.unwrap_err().is_retryable());
/// # Ok(()) }
/// ```
pub struct ResponseFuture {
    state: State,
}

enum State {
    /// Boxed: an async block doing I/O through reqwest.
    Sending(Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>),
    Refused(Option<Error>),
}

impl ResponseFuture {
    fn sending(attempt: impl Future<Output = Result<(), Error>> + Send + 'static) -> Self {
        ResponseFuture {
            state: State::Sending(Box::pin(attempt)),
        }
    }

    fn refused(error: Error) -> Self {
        ResponseFuture {
            state: State::Refused(Some(error)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Sending(attempt) => attempt.as_mut().poll(cx),
            State::Refused(error) => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Sending(_) => "sending",
            State::Refused(_) => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
