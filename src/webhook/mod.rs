//! [`WebhookSink`]: delivers each event as a signed HTTP POST that receivers
//! can trust.
//!
//! The default wire format is [Standard Webhooks]: the body is the event's
//! JSON, and three headers let the receiver check it —
//! `webhook-id` (the event id, for deduplication), `webhook-timestamp` (unix
//! seconds of this attempt, against replays) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256>` over `"{id}.{timestamp}.{body}"`, one entry
//! per secret so keys can be rotated). [`Signing::GoCompatible`] speaks the
//! Go original's format instead, and [`Signing::Both`] sends both header sets
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
//! use eventsink::signature::Secret;
//! use eventsink::webhook::{EgressPolicy, Signing, WebhookSink};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main] async fn main() -> Result<(), eventsink::BoxError> {
//! let webhook = WebhookSink::builder("https://receiver.example.com/hooks/orders")
//!     .secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse()?) // current key
//!     .signing(Signing::Standard)
//!     .egress(EgressPolicy::public_only()) // the URL came from a user
//!     .build()?;
//!
//! let mut sink = ServiceBuilder::new()
//!     .buffer(1024)
//!     .retry(RetryPolicy::default())
//!     .timeout(Duration::from_secs(20)) // per attempt; the sink's own is 15 s
//!     .service(webhook);
//! sink.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
//! # Ok(()) }
//! ```
//!
//! Every event is checked against the [rule for ids and
//! kinds](crate::wire#the-rule) that
//! [`VerifyWebhookLayer`](crate::verify::VerifyWebhookLayer) checks too, in
//! every [`Signing`] mode; an event it refuses fails with a permanent
//! [`Error::InvalidEvent`] before anything is sent, never with the
//! receiver's `400`.
//!
//! **Always configure a secret.** An unsigned webhook can be forged by
//! anyone who learns the URL, and replayed by anyone who sees one request;
//! the receiver has no way to tell. Unsigned delivery exists for receivers
//! behind other authentication (mutual TLS, a private network).
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com

pub mod classify;
pub mod egress;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, SubsecRound, Utc};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use reqwest::{Client, Method, Request, Response, Url};
use serde::Serialize;
use tower::Service;
use tracing::Instrument;

use crate::signature::{self, Secret};
use crate::{Error, Event, wire};
pub use egress::EgressPolicy;
use egress::{EgressRefused, GuardedResolver};

/// Per-request timeout, connecting and reading the answer included. 15 s:
/// the Go original gave each delivery 15 s, and Standard Webhooks
/// recommends 15–30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Timeout for establishing a connection. 5 s, as Hook0.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest body sent, in bytes: 256 KiB, between Convoy's 50 KB, Svix's
/// ~350 KB and Hook0's 512 KiB. Standard Webhooks advises keeping payloads
/// under 20 KB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// The `user-agent` header: `eventsink/<version>`.
pub const USER_AGENT_VALUE: &str = concat!("eventsink/", env!("CARGO_PKG_VERSION"));

const WEBHOOK_ID: HeaderName = HeaderName::from_static(wire::WEBHOOK_ID);
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static(wire::WEBHOOK_TIMESTAMP);
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static(wire::WEBHOOK_SIGNATURE);
const GO_SIGNATURE: HeaderName = HeaderName::from_static(wire::GO_SIGNATURE);

/// How much of a successful answer's body is read (and discarded) so that
/// the connection can be reused: 64 KiB.
const MAX_DRAINED_BODY_BYTES: usize = 64 * 1024;

/// Headers this sink sets itself; [`WebhookSinkBuilder::header`] refuses
/// them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "user-agent",
    wire::WEBHOOK_ID,
    wire::WEBHOOK_TIMESTAMP,
    wire::WEBHOOK_SIGNATURE,
    wire::GO_SIGNATURE,
];

/// Which signature headers and body format a [`WebhookSink`] sends.
///
/// ```
/// use eventsink::webhook::Signing;
/// assert_eq!(Signing::default(), Signing::Standard);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Signing {
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature: v1,<base64>` (one entry per secret); the body is
    /// the event's JSON.
    #[default]
    Standard,
    /// The Go original's format, byte for byte: the body is
    /// `{"kind","id","payload","created_at","now"}` with `now` the send time
    /// (UTC, whole seconds), and `signature: <lowercase hex HMAC-SHA256 of
    /// the body>` keyed with the first secret's bytes (build it with
    /// [`Secret::from_raw`] from the Go application's secret string).
    GoCompatible,
    /// The Go-compatible body with both header sets, Standard and
    /// `signature`, computed with the same secrets: the migration path while
    /// receivers move from one check to the other.
    Both,
}

impl Signing {
    fn standard_headers(self) -> bool {
        matches!(self, Signing::Standard | Signing::Both)
    }

    fn go_format(self) -> bool {
        matches!(self, Signing::GoCompatible | Signing::Both)
    }
}

/// Overrides the classification of an HTTP status: return `Some(retryable)`
/// to decide, `None` to keep the default ([`classify::is_retryable_status`]).
pub type StatusClassifier = Arc<dyn Fn(u16) -> Option<bool> + Send + Sync>;

/// A sink that POSTs each event to one URL. Cheap to clone: clones share the
/// HTTP client, its connection pool and the configuration.
///
/// Build one with [`WebhookSink::builder`]; see the [module docs](self).
#[derive(Clone)]
pub struct WebhookSink {
    client: Client,
    config: Arc<Config>,
}

struct Config {
    url: Url,
    /// The URL without credentials, query or fragment: safe to log.
    display_url: String,
    host: String,
    secrets: Vec<Secret>,
    signing: Signing,
    /// The custom headers plus `content-type` and `user-agent`: the start
    /// of every request's headers.
    headers: HeaderMap,
    timeout: Duration,
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
        WebhookSinkBuilder {
            url: url.into(),
            secrets: Vec::new(),
            signing: Signing::default(),
            headers: Vec::new(),
            client: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            egress: EgressPolicy::default(),
            https_only: false,
            status_classifier: None,
        }
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
            .field("signing", &c.signing)
            .field("secrets", &c.secrets.len())
            .field("headers", &c.headers.keys().collect::<Vec<_>>())
            .field("timeout", &c.timeout)
            .field("max_body_bytes", &c.max_body_bytes)
            .finish_non_exhaustive()
    }
}

/// Builds a [`WebhookSink`]; from [`WebhookSink::builder`].
///
/// ```
/// use std::time::Duration;
/// use eventsink::signature::Secret;
/// use eventsink::webhook::{Signing, WebhookSink};
///
/// let sink = WebhookSink::builder("https://example.com/hook")
///     .secret(Secret::generate()?)
///     .signing(Signing::Both)
///     .header("authorization", "Bearer 123")
///     .timeout(Duration::from_secs(30))
///     .max_body_bytes(64 * 1024)
///     .build()?;
/// # Ok::<(), eventsink::BoxError>(())
/// ```
#[must_use = "call build() to get the sink"]
pub struct WebhookSinkBuilder {
    url: String,
    secrets: Vec<Secret>,
    signing: Signing,
    headers: Vec<(String, String)>,
    client: Option<Client>,
    timeout: Duration,
    connect_timeout: Duration,
    max_body_bytes: usize,
    egress: EgressPolicy,
    https_only: bool,
    status_classifier: Option<StatusClassifier>,
}

impl fmt::Debug for WebhookSinkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSinkBuilder")
            .field("signing", &self.signing)
            .field("secrets", &self.secrets.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WebhookSinkBuilder {
    /// Adds a signing secret. Add the current one first; every further one
    /// adds a signature entry so receivers still holding an older key keep
    /// verifying during a rotation.
    ///
    /// ```
    /// use eventsink::{signature::Secret, webhook::WebhookSink};
    /// let builder = WebhookSink::builder("https://example.com/hook")
    ///     .secret(Secret::generate()?)  // new
    ///     .secret(Secret::generate()?); // old, until receivers switched
    /// # Ok::<(), eventsink::BoxError>(())
    /// ```
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// The signature headers and body format (default
    /// [`Signing::Standard`]).
    ///
    /// ```
    /// use eventsink::webhook::{Signing, WebhookSink};
    /// let builder = WebhookSink::builder("https://example.com/hook").signing(Signing::GoCompatible);
    /// ```
    pub fn signing(mut self, signing: Signing) -> Self {
        self.signing = signing;
        self
    }

    /// Adds a header sent with every request, such as an API key the
    /// receiver's gateway wants. Its value never appears in `Debug`.
    ///
    /// ```
    /// let builder = eventsink::webhook::WebhookSink::builder("https://example.com/hook")
    ///     .header("x-tenant", "acme");
    /// ```
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Uses `client` instead of building one, to share its connection pool
    /// or TLS settings. The client must not follow redirects (build it with
    /// `reqwest::redirect::Policy::none()`); the sink's timeout still applies
    /// per request, but the connect timeout is the client's. A custom client
    /// cannot be combined with a restricting [`EgressPolicy`], whose DNS
    /// resolver must be installed in the client the sink builds.
    ///
    /// ```
    /// let client = reqwest::Client::builder()
    ///     .redirect(reqwest::redirect::Policy::none())
    ///     .build()?;
    /// let sink = eventsink::webhook::WebhookSink::builder("https://example.com/hook")
    ///     .client(client)
    ///     .build()?;
    /// # Ok::<(), eventsink::BoxError>(())
    /// ```
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Per-request timeout, connecting and reading the answer included
    /// (default [`DEFAULT_TIMEOUT`]).
    ///
    /// ```
    /// let builder = eventsink::webhook::WebhookSink::builder("https://example.com/hook")
    ///     .timeout(std::time::Duration::from_secs(30));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Timeout for establishing a connection (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]).
    ///
    /// ```
    /// let builder = eventsink::webhook::WebhookSink::builder("https://example.com/hook")
    ///     .connect_timeout(std::time::Duration::from_secs(2));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Largest body sent (default [`DEFAULT_MAX_BODY_BYTES`]); a larger event
    /// fails with [`Error::TooLarge`] before any network I/O.
    ///
    /// ```
    /// let builder = eventsink::webhook::WebhookSink::builder("https://example.com/hook")
    ///     .max_body_bytes(32 * 1024);
    /// ```
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// Which addresses the sink may connect to (default: any). Use
    /// [`EgressPolicy::public_only`] whenever URLs come from end users.
    ///
    /// ```
    /// use eventsink::webhook::{EgressPolicy, WebhookSink};
    /// let builder = WebhookSink::builder("https://example.com/hook").egress(EgressPolicy::public_only());
    /// ```
    pub fn egress(mut self, policy: EgressPolicy) -> Self {
        self.egress = policy;
        self
    }

    /// Refuses `http://` URLs when `true`.
    ///
    /// ```
    /// use eventsink::webhook::{BuildError, WebhookSink};
    /// let err = WebhookSink::builder("http://example.com/hook").https_only(true).build().unwrap_err();
    /// assert!(matches!(err, BuildError::HttpsRequired));
    /// ```
    pub fn https_only(mut self, https_only: bool) -> Self {
        self.https_only = https_only;
        self
    }

    /// Overrides how statuses are classified: return `Some(true)` to retry,
    /// `Some(false)` to give up, `None` to keep the default. For example, a
    /// receiver that answers 404 while it deploys:
    ///
    /// ```
    /// let builder = eventsink::webhook::WebhookSink::builder("https://example.com/hook")
    ///     .classify_status(|status| (status == 404).then_some(true));
    /// ```
    pub fn classify_status(
        mut self,
        classify: impl Fn(u16) -> Option<bool> + Send + Sync + 'static,
    ) -> Self {
        self.status_classifier = Some(Arc::new(classify));
        self
    }

    /// Checks the configuration and builds the sink.
    ///
    /// # Errors
    ///
    /// [`BuildError`] for a URL that does not parse, is not http(s), is not
    /// https while [`https_only`](Self::https_only) is set, or is an IP
    /// address the egress policy refuses; for an invalid or reserved header;
    /// for a custom client with a restricting egress policy; or if the HTTP
    /// client cannot be built.
    ///
    /// ```
    /// use eventsink::webhook::{BuildError, WebhookSink};
    /// assert!(matches!(WebhookSink::builder("ftp://example.com").build(), Err(BuildError::UnsupportedScheme { .. })));
    /// assert!(matches!(WebhookSink::builder("not a url").build(), Err(BuildError::InvalidUrl { .. })));
    /// ```
    pub fn build(self) -> Result<WebhookSink, BuildError> {
        let url = Url::parse(&self.url).map_err(|e| BuildError::InvalidUrl {
            reason: e.to_string(),
        })?;
        match url.scheme() {
            "https" => {}
            "http" if !self.https_only => {}
            "http" => return Err(BuildError::HttpsRequired),
            other => {
                return Err(BuildError::UnsupportedScheme {
                    scheme: other.to_owned(),
                });
            }
        }
        let host = url
            .host_str()
            .ok_or(BuildError::InvalidUrl {
                reason: "it has no host".into(),
            })?
            .to_owned();
        check_ip_literal(&url, &self.egress)?;
        let headers = static_headers(&self.headers)?;
        let client = match self.client {
            Some(_) if self.egress.is_restricted() => return Err(BuildError::ClientWithEgress),
            Some(client) => client,
            None => own_client(self.connect_timeout, self.egress)?,
        };
        Ok(WebhookSink {
            client,
            config: Arc::new(Config {
                display_url: display_url(&url),
                url,
                host,
                secrets: self.secrets,
                signing: self.signing,
                headers,
                timeout: self.timeout,
                max_body_bytes: self.max_body_bytes,
                status_classifier: self.status_classifier,
            }),
        })
    }
}

fn check_ip_literal(url: &Url, egress: &EgressPolicy) -> Result<(), BuildError> {
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => v4.into(),
        Some(url::Host::Ipv6(v6)) => v6.into(),
        _ => return Ok(()),
    };
    egress.check(ip).map_err(|reason| {
        BuildError::Refused(EgressRefused {
            host: ip.to_string(),
            addr: ip,
            reason,
        })
    })
}

fn static_headers(pairs: &[(String, String)]) -> Result<HeaderMap, BuildError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    for (name, value) in pairs {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| BuildError::InvalidHeader { name: name.clone() })?;
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err(BuildError::ReservedHeader { name: name.clone() });
        }
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| BuildError::InvalidHeader { name: name.clone() })?;
        value.set_sensitive(true);
        headers.append(header, value);
    }
    Ok(headers)
}

fn own_client(connect_timeout: Duration, egress: EgressPolicy) -> Result<Client, BuildError> {
    let mut builder = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout);
    if egress.is_restricted() {
        // A proxy would resolve names itself, around the guard.
        builder = builder.no_proxy().dns_resolver(Arc::new(GuardedResolver {
            policy: Arc::new(egress),
        }));
    }
    builder.build().map_err(|e| BuildError::Client(Box::new(e)))
}

fn display_url(url: &Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{}{port}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.path()
    )
}

/// The configuration of a [`WebhookSink`] is not usable.
///
/// ```
/// let err = eventsink::webhook::WebhookSink::builder("gopher://example.com").build().unwrap_err();
/// assert!(err.to_string().contains("gopher"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// The URL does not parse.
    InvalidUrl {
        /// What is wrong with it.
        reason: String,
    },
    /// The URL's scheme is neither `http` nor `https`.
    UnsupportedScheme {
        /// The scheme given.
        scheme: String,
    },
    /// The URL is `http://` but [`WebhookSinkBuilder::https_only`] is set.
    HttpsRequired,
    /// The URL is an IP address the egress policy refuses.
    Refused(EgressRefused),
    /// A custom header's name or value is not valid in HTTP.
    InvalidHeader {
        /// The header's name.
        name: String,
    },
    /// A custom header would replace one the sink sets itself.
    ReservedHeader {
        /// The header's name.
        name: String,
    },
    /// A custom client was given together with a restricting egress policy.
    ClientWithEgress,
    /// The HTTP client could not be built (TLS set-up failed).
    Client(crate::BoxError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::InvalidUrl { reason } => {
                write!(
                    f,
                    "the webhook URL is not valid ({reason}); give an absolute http:// or https:// URL"
                )
            }
            BuildError::UnsupportedScheme { scheme } => {
                write!(
                    f,
                    "webhook URLs must be http:// or https://, not {scheme}://"
                )
            }
            BuildError::HttpsRequired => {
                f.write_str("the webhook URL is http:// but https_only is set; use https://")
            }
            BuildError::Refused(refused) => write!(
                f,
                "the egress policy refuses the webhook URL: {refused}; allow that address \
                 explicitly if the receiver is trusted"
            ),
            BuildError::InvalidHeader { name } => {
                write!(
                    f,
                    "the custom header {name:?} has an invalid name or value; use visible ASCII"
                )
            }
            BuildError::ReservedHeader { name } => {
                write!(
                    f,
                    "the custom header {name:?} is set by the sink itself; remove it"
                )
            }
            BuildError::ClientWithEgress => f.write_str(
                "a custom reqwest client cannot enforce the egress policy; let the sink build its \
                 own client, or drop the policy",
            ),
            BuildError::Client(e) => write!(f, "the HTTP client could not be built: {e}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Refused(refused) => Some(refused),
            BuildError::Client(e) => Some(&**e),
            _ => None,
        }
    }
}

/// The future of [`WebhookSink`]'s `call`: one signed HTTP attempt.
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
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

impl<P: Serialize> Service<Event<P>> for WebhookSink {
    type Response = ();
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event<P>) -> Self::Future {
        let span = tracing::info_span!(
            "webhook",
            event.id = %event.id,
            event.kind = %event.kind,
            url.host = %self.config.host,
            http.status = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let request = match self.request(&event) {
            Ok(request) => request,
            Err(error) => {
                span.in_scope(|| tracing::warn!("not sent: {error}"));
                return Box::pin(std::future::ready(Err(error)));
            }
        };
        let attempt = Attempt {
            config: Arc::clone(&self.config),
        };
        let sending = self.client.execute(request);
        Box::pin(attempt.send(sending).instrument(span))
    }
}

impl WebhookSink {
    /// Serialises, checks and signs `event` into the request of one attempt.
    fn request<P: Serialize>(&self, event: &Event<P>) -> Result<Request, Error> {
        let c = &self.config;
        // The rule the receiver checks, in every signing mode: an event it
        // would answer 400 is refused here, before anything is sent.
        let id = wire_id(event)?;
        let now = Utc::now().trunc_subsecs(0);
        let mut body = Vec::with_capacity(512);
        if c.signing.go_format() {
            serde_json::to_writer(&mut body, &GoBody::new(event, now))
        } else {
            serde_json::to_writer(&mut body, event)
        }
        .map_err(Error::Serialize)?;
        if body.len() > c.max_body_bytes {
            return Err(Error::TooLarge {
                size: body.len(),
                limit: c.max_body_bytes,
            });
        }
        let mut headers = c.headers.clone();
        if c.signing.standard_headers() {
            headers.insert(WEBHOOK_ID, id);
            headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(now.timestamp()));
            if !c.secrets.is_empty() {
                let signatures = signature::sign(&c.secrets, &event.id, now.timestamp(), &body);
                headers.insert(WEBHOOK_SIGNATURE, to_header_value(signatures));
            }
        }
        if let (true, Some(first)) = (c.signing.go_format(), c.secrets.first()) {
            let signature = signature::sign_go(first, &body);
            headers.insert(GO_SIGNATURE, to_header_value(signature));
        }
        let mut request = Request::new(Method::POST, c.url.clone());
        *request.headers_mut() = headers;
        *request.body_mut() = Some(body.into());
        *request.timeout_mut() = Some(c.timeout);
        Ok(request)
    }
}

/// Checks `event` against [`wire::check_event`], and gives its id as a
/// header value (the rule allows only visible ASCII, always a valid one).
fn wire_id<P>(event: &Event<P>) -> Result<HeaderValue, Error> {
    wire::validate(event)?;
    HeaderValue::from_str(&event.id).map_err(|_| Error::InvalidEvent {
        field: "id",
        value: event.id.to_string(),
        problem: "it is not a valid header value",
    })
}

/// Base64 and hex signatures are ASCII, always valid header values.
fn to_header_value(ascii: String) -> HeaderValue {
    HeaderValue::try_from(ascii).expect("signatures are base64 or hex ASCII")
}

/// The Go original's body: its field order, plus `now`.
#[derive(Serialize)]
struct GoBody<'a, P> {
    kind: &'a str,
    id: &'a str,
    payload: &'a P,
    created_at: DateTime<Utc>,
    now: DateTime<Utc>,
}

impl<'a, P> GoBody<'a, P> {
    fn new(event: &'a Event<P>, now: DateTime<Utc>) -> Self {
        GoBody {
            kind: &event.kind,
            id: &event.id,
            payload: &event.payload,
            created_at: event.created_at,
            now,
        }
    }
}

/// What one attempt needs, owned by its future.
struct Attempt {
    config: Arc<Config>,
}

impl Attempt {
    async fn send(
        self,
        sending: impl Future<Output = Result<Response, reqwest::Error>>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let outcome = sending.await;
        let span = tracing::Span::current();
        let result = match outcome {
            Ok(response) => {
                span.record("http.status", response.status().as_u16());
                self.answer(response).await
            }
            Err(error) => Err(self.transport_error(error)),
        };
        span.record("duration_ms", started.elapsed().as_millis() as u64);
        match &result {
            Ok(()) => tracing::debug!("delivered"),
            Err(error) => tracing::warn!("delivery failed: {error}"),
        }
        result
    }

    async fn answer(&self, response: Response) -> Result<(), Error> {
        let status = response.status().as_u16();
        if response.status().is_success() {
            // Read what the receiver sent so the connection can be reused; a
            // failure here does not undo the delivery.
            let _ = read_prefix(response, MAX_DRAINED_BODY_BYTES).await;
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| classify::parse_retry_after(v, SystemTime::now()));
        let body = read_prefix(response, classify::MAX_ERROR_BODY_BYTES)
            .await
            .unwrap_or_default();
        let retryable = self
            .config
            .status_classifier
            .as_ref()
            .and_then(|classify| classify(status))
            .unwrap_or_else(|| classify::is_retryable_status(status));
        Err(Error::Http {
            url: self.config.display_url.clone(),
            status,
            retryable,
            retry_after,
            body: classify::sanitize_body(&body),
        })
    }

    fn transport_error(&self, error: reqwest::Error) -> Error {
        let url = self.config.display_url.clone();
        let refused =
            std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .find_map(|e| e.downcast_ref::<EgressRefused>());
        match refused {
            Some(refused) => Error::Refused {
                url,
                reason: refused.to_string(),
            },
            None => Error::Transport {
                url,
                timed_out: error.is_timeout(),
                source: Box::new(error.without_url()),
            },
        }
    }
}

/// Reads at most `limit` bytes of the body.
async fn read_prefix(mut response: Response, limit: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut kept = Vec::new();
    while kept.len() < limit {
        match response.chunk().await? {
            Some(chunk) => kept.extend_from_slice(&chunk[..chunk.len().min(limit - kept.len())]),
            None => break,
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Retryable;

    #[test]
    fn display_url_drops_credentials_query_and_fragment() {
        let url = Url::parse("https://user:pw@example.com:8443/a/b?token=secret#frag").unwrap();
        assert_eq!(display_url(&url), "https://example.com:8443/a/b");
    }

    #[test]
    fn ids_and_kinds_follow_the_wire_rule() {
        let ok = Event::new("order.placed", ()).with_id("evt_01J.x-y");
        assert_eq!(wire_id(&ok).unwrap(), "evt_01J.x-y");
        let longest = "x".repeat(wire::MAX_ID_BYTES);
        assert!(wire_id(&ok.clone().with_id(longest.as_str())).is_ok());
        for bad in [
            "",
            "has space",
            "tab\t",
            "é",
            &"x".repeat(wire::MAX_ID_BYTES + 1),
        ] {
            let err = wire_id(&ok.clone().with_id(bad)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidEvent { field: "id", .. }),
                "{bad:?}: {err}"
            );
            assert!(!err.is_retryable());
        }
        let err = wire_id(&Event::new("a\nb", ())).unwrap_err();
        assert!(
            matches!(err, Error::InvalidEvent { field: "kind", .. }),
            "{err}"
        );
    }

    #[test]
    fn reserved_and_invalid_headers_are_refused() {
        let build = |name: &str, value: &str| {
            WebhookSink::builder("https://example.com")
                .header(name, value)
                .build()
        };
        assert!(matches!(
            build("Webhook-Signature", "x"),
            Err(BuildError::ReservedHeader { .. })
        ));
        assert!(matches!(
            build("bad name", "x"),
            Err(BuildError::InvalidHeader { .. })
        ));
        assert!(matches!(
            build("x-ok", "line\nbreak"),
            Err(BuildError::InvalidHeader { .. })
        ));
        assert!(build("x-ok", "fine").is_ok());
    }

    #[test]
    fn go_body_has_the_go_field_order() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let event = Event::new("k", serde_json::json!({"a": 1}))
            .with_id("i")
            .with_created_at(at);
        let json = serde_json::to_string(&GoBody::new(&event, at)).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"k","id":"i","payload":{"a":1},"created_at":"2027-01-15T08:00:00Z","now":"2027-01-15T08:00:00Z"}"#
        );
    }
}
