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
//! # The HTTP leg
//!
//! The sink builds each attempt's request, signed, as an
//! `http::Request<`[`RequestBody`]`>`, and hands it to an inner HTTP
//! service: [`ReqwestClient`] by default, under any tower layers added
//! with [`WebhookSinkBuilder::http_layer`], or a service of your own given
//! to [`WebhookSinkBuilder::build_with`] (hyper-util's client, a test
//! double). Whatever it is, the sink still signs, bounds each attempt by
//! its [timeout](WebhookSinkBuilder::attempt_timeout), reads a bounded
//! answer, and classifies it; errors of the leg are transient
//! [`Error::Transport`]s (timed out when a reqwest, tower or I/O timeout is
//! among their causes), and the egress guard's refusal stays
//! [`Error::Refused`]. The sink is ready when the leg is, so a concurrency
//! limit there is felt by `poll_ready`, as tower's layers expect.
//!
//! ```
//! use eventsink::webhook::{EgressPolicy, WebhookSink};
//! use http::header::AUTHORIZATION;
//! use tower::limit::ConcurrencyLimitLayer;
//! use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
//! use tower_http::trace::{DefaultMakeSpan, TraceLayer};
//!
//! let sink = WebhookSink::builder("https://receiver.example.com/hooks")
//!     .secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse()?)
//!     .egress(EgressPolicy::public_only()) // still enforced under layers
//!     // outermost first: hide a header your own layers add...
//!     .http_layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
//!     // ...before the trace records the headers...
//!     .http_layer(TraceLayer::new_for_http().make_span_with(DefaultMakeSpan::new().include_headers(true)))
//!     // ...and at most 8 requests in flight to this destination.
//!     .http_layer(ConcurrencyLimitLayer::new(8))
//!     .build()?;
//! # let _ = sink;
//! # Ok::<(), eventsink::BoxError>(())
//! ```
//!
//! The signature headers and every [custom header](WebhookSinkBuilder::header)
//! are marked [sensitive](http::HeaderValue::set_sensitive) already, so a
//! trace that records headers shows `Sensitive` in their place; mark what
//! your own layers add with tower-http's `SetSensitiveRequestHeadersLayer`.
//! Layers must not change the body or the signed headers, or the receiver
//! will refuse the signature.
//!
//! The parts: [`WebhookSinkBuilder`] (configuration), `sign.rs` (the signed
//! request of one attempt), [`classify`] (the answer, as success or
//! [`Error`]), [`egress`] (where the sink may connect), `client.rs` (the HTTP
//! leg and [`ReqwestClient`]), `cloudevents.rs` (`CloudEvents`, feature
//! `cloudevents`) and [`BuildError`].
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com

mod builder;
pub mod classify;
mod client;
#[cfg(feature = "cloudevents")]
mod cloudevents;
pub mod egress;
mod error;
mod sign;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, StatusCode, Uri};
use serde::Serialize;
use tower::Service;
use tracing::Instrument;

pub use self::builder::WebhookSinkBuilder;
pub use self::client::{RequestBody, ReqwestClient, ReqwestFuture};
#[cfg(feature = "cloudevents")]
pub use self::cloudevents::CloudEvents;
pub use self::egress::EgressPolicy;
pub use self::error::BuildError;
use crate::signature::{Scheme, Secret};
use crate::{BoxError, Error, Event};

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
/// `S` is the [HTTP leg](self#the-http-leg): [`ReqwestClient`] unless the
/// sink was built with [`http_layer`](WebhookSinkBuilder::http_layer) or
/// [`build_with`](WebhookSinkBuilder::build_with).
#[derive(Clone)]
pub struct WebhookSink<S = ReqwestClient> {
    client: S,
    config: Arc<Config>,
}

/// What every attempt is made with; shared by the sink's clones.
struct Config {
    uri: Uri,
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
    #[cfg(feature = "cloudevents")]
    cloudevents: Option<cloudevents::Format>,
}

impl WebhookSink {
    /// Starts building a sink that delivers to `url`.
    ///
    /// ```
    /// let sink = eventsink::webhook::WebhookSink::builder("https://example.com/hook").build()?;
    /// assert_eq!(sink.url(), "https://example.com/REDACTED"); // see `show_path`
    /// # Ok::<(), eventsink::webhook::BuildError>(())
    /// ```
    pub fn builder(url: impl Into<String>) -> WebhookSinkBuilder {
        WebhookSinkBuilder::new(url.into())
    }
}

impl<S> WebhookSink<S> {
    /// The destination, without credentials, query string or fragment, and
    /// with its path shown only if [asked](WebhookSinkBuilder::show_path).
    ///
    /// ```
    /// let sink = eventsink::webhook::WebhookSink::builder("https://u:p@example.com/h?token=x").build()?;
    /// assert_eq!(sink.url(), "https://example.com/REDACTED");
    /// # Ok::<(), eventsink::webhook::BuildError>(())
    /// ```
    pub fn url(&self) -> &str {
        &self.config.display_url
    }

    /// The HTTP leg.
    pub fn get_ref(&self) -> &S {
        &self.client
    }

    /// The HTTP leg, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.client
    }

    /// The HTTP leg, without the sink's configuration.
    pub fn into_inner(self) -> S {
        self.client
    }
}

impl<S> fmt::Debug for WebhookSink<S> {
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

impl<S, B, P> Service<Event<P>> for WebhookSink<S>
where
    P: Serialize,
    S: Service<http::Request<RequestBody>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    type Response = ();
    type Error = Error;
    type Future = ResponseFuture;

    /// Ready when the HTTP leg is: a concurrency limit in it makes the sink
    /// wait here. Its error is a transient [`Error::Transport`].
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.client
            .poll_ready(cx)
            .map_err(|e| classify::transport_error(&self.config, e.into()))
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
                    .and_then(|t| http::HeaderValue::try_from(t).ok())
                {
                    request
                        .headers_mut()
                        .insert(crate::trace::TRACEPARENT, traceparent);
                }
                let sending = self.client.call(request);
                let sending = async move { sending.await.map_err(Into::into) };
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
    /// Boxed: an async block doing I/O through the HTTP leg.
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
