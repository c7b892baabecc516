//! [`WebhookSinkBuilder`]: the configuration of a [`WebhookSink`], checked
//! once when the sink is built.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use reqwest::{Client, Url};
use tower::Layer;
use tower::layer::util::{Identity, Stack};

#[cfg(feature = "cloudevents")]
use super::CloudEvents;
use super::egress::{EgressPolicy, EgressRefused, GuardedResolver};
use super::{
    BuildError, Config, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
    ReqwestClient, StatusClassifier, USER_AGENT_VALUE, WebhookSink,
};
use crate::signature::{Scheme, Secret};
use crate::wire;

/// Headers the sink sets itself; [`WebhookSinkBuilder::header`] refuses
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

/// Builds a [`WebhookSink`]; from [`WebhookSink::builder`]. Every option has
/// a default, so `WebhookSink::builder(url).build()` works; each setter is
/// documented with its default.
///
/// ```
/// use std::time::Duration;
/// use eventsink::signature::{Scheme, Secret};
/// use eventsink::webhook::{EgressPolicy, WebhookSink};
///
/// let base = WebhookSink::builder("https://example.com/hook")
///     .secret(Secret::generate()?)          // the current key first
///     .secret(Secret::generate()?)          // an older one, during a rotation
///     .scheme(Scheme::Both)                 // while receivers migrate
///     .header("authorization", "Bearer 123")
///     .attempt_timeout(Duration::from_secs(30))
///     .connect_timeout(Duration::from_secs(2))
///     .max_body_bytes(64 * 1024)
///     .egress(EgressPolicy::public_only())  // the URL came from a user
///     .https_only(true);
/// let sink = base.clone().build()?;         // builders are Clone
/// # let _ = sink;
/// # Ok::<(), eventsink::BoxError>(())
/// ```
///
/// `L` is the stack of layers added with [`http_layer`](Self::http_layer).
#[derive(Clone)]
#[must_use = "call build() to get the sink"]
pub struct WebhookSinkBuilder<L = Identity> {
    url: String,
    secrets: Vec<Secret>,
    scheme: Scheme,
    headers: Vec<(String, String)>,
    client: Option<Client>,
    attempt_timeout: Duration,
    connect_timeout: Duration,
    max_body_bytes: usize,
    egress: EgressPolicy,
    https_only: bool,
    show_path: bool,
    status_classifier: Option<StatusClassifier>,
    #[cfg(feature = "cloudevents")]
    cloudevents: Option<CloudEvents>,
    layer: L,
}

impl<L> fmt::Debug for WebhookSinkBuilder<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSinkBuilder")
            .field("scheme", &self.scheme)
            .field("secrets", &self.secrets.len())
            .field("attempt_timeout", &self.attempt_timeout)
            .finish_non_exhaustive()
    }
}

impl<L> WebhookSinkBuilder<L> {
    /// Adds a signing secret (none by default: unsigned). Add the current
    /// one first; every further one adds a signature entry so receivers
    /// still holding an older key keep verifying during a rotation.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// Adds a header sent with every request, such as an API key the
    /// receiver's gateway wants (none by default). Its value never appears
    /// in `Debug`.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The signature headers and body format; [`Scheme::Standard`] by
    /// default, and [`Scheme::Both`] sends both header sets.
    pub fn scheme(self, scheme: Scheme) -> Self {
        Self { scheme, ..self }
    }

    /// Uses `client` instead of building one, to share its connection pool
    /// or TLS settings. The client must not follow redirects (build it with
    /// `reqwest::redirect::Policy::none()`); the sink's attempt timeout
    /// still applies, but the connect timeout is the client's. A custom
    /// client cannot be combined with a restricting [`EgressPolicy`], whose
    /// DNS resolver must be installed in the client the sink builds.
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

    /// Timeout of one attempt, connecting and reading the answer included;
    /// [`DEFAULT_ATTEMPT_TIMEOUT`] by default.
    pub fn attempt_timeout(self, attempt_timeout: Duration) -> Self {
        Self {
            attempt_timeout,
            ..self
        }
    }

    /// Timeout for establishing a connection; [`DEFAULT_CONNECT_TIMEOUT`]
    /// by default.
    pub fn connect_timeout(self, connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            ..self
        }
    }

    /// Largest body sent, in bytes; [`DEFAULT_MAX_BODY_BYTES`] by default.
    /// A larger event fails with [`Error::TooLarge`](crate::Error::TooLarge)
    /// before any network I/O.
    pub fn max_body_bytes(self, max_body_bytes: usize) -> Self {
        Self {
            max_body_bytes,
            ..self
        }
    }

    /// Which addresses the sink may connect to; any by default. Use
    /// [`EgressPolicy::public_only`] whenever URLs come from end users.
    pub fn egress(self, egress: EgressPolicy) -> Self {
        Self { egress, ..self }
    }

    /// Refuses `http://` URLs when `true`; `false` by default.
    ///
    /// ```
    /// use eventsink::webhook::{BuildError, WebhookSink};
    /// let err = WebhookSink::builder("http://example.com/hook").https_only(true).build().unwrap_err();
    /// assert!(matches!(err, BuildError::HttpsRequired));
    /// ```
    pub fn https_only(self, https_only: bool) -> Self {
        Self { https_only, ..self }
    }

    /// Whether the URL's path appears where the sink shows its destination
    /// ([`url`](super::WebhookSink::url), `Debug`, errors, the `url.full`
    /// span field); `false` by default, which shows it as `/REDACTED`.
    /// Credentials, query and fragment never appear. Many services (Slack,
    /// Discord, Zapier) put a webhook's secret in its path; show it only
    /// where it holds none.
    ///
    /// ```
    /// use eventsink::webhook::WebhookSink;
    /// let hidden = WebhookSink::builder("https://hooks.example.com/T1/B2/s3cr3t").build()?;
    /// assert_eq!(hidden.url(), "https://hooks.example.com/REDACTED");
    /// let shown = WebhookSink::builder("https://example.com/hooks/orders").show_path(true).build()?;
    /// assert_eq!(shown.url(), "https://example.com/hooks/orders");
    /// # Ok::<(), eventsink::webhook::BuildError>(())
    /// ```
    pub fn show_path(self, show_path: bool) -> Self {
        Self { show_path, ..self }
    }

    /// Overrides how statuses are classified: return `Some(true)` to retry,
    /// `Some(false)` to give up, `None` to keep the default
    /// ([`is_retryable_status`](super::classify::is_retryable_status)).
    /// For example, a receiver that answers 404 while it deploys:
    ///
    /// ```
    /// use http::StatusCode;
    /// let builder = eventsink::webhook::WebhookSink::builder("https://example.com/hook")
    ///     .classify_status(|status| (status == StatusCode::NOT_FOUND).then_some(true));
    /// ```
    pub fn classify_status(
        mut self,
        classify: impl Fn(StatusCode) -> Option<bool> + Send + Sync + 'static,
    ) -> Self {
        self.status_classifier = Some(Arc::new(classify));
        self
    }

    /// Sends each event as a [CloudEvent](super::CloudEvents) (feature
    /// `cloudevents`); the Standard Webhooks headers still sign the bytes
    /// sent. Needs [`Scheme::Standard`].
    ///
    /// ```
    /// use eventsink::webhook::{CloudEvents, WebhookSink};
    /// let sink = WebhookSink::builder("https://example.com/hook")
    ///     .cloudevents(CloudEvents::binary("https://shop.example.com/orders"))
    ///     .build()?;
    /// # Ok::<(), eventsink::webhook::BuildError>(())
    /// ```
    #[cfg(feature = "cloudevents")]
    pub fn cloudevents(mut self, cloudevents: CloudEvents) -> Self {
        self.cloudevents = Some(cloudevents);
        self
    }

    /// Adds a tower layer around the HTTP leg, the service that sends each
    /// signed request: tower-http's `TraceLayer`, a `ConcurrencyLimitLayer`
    /// or `RateLimitLayer` for this destination, your own. The first layer
    /// added is the outermost, as with [`tower::ServiceBuilder`]. See
    /// [the HTTP leg](super#the-http-leg).
    pub fn http_layer<T>(self, layer: T) -> WebhookSinkBuilder<Stack<T, L>> {
        let WebhookSinkBuilder {
            url,
            secrets,
            scheme,
            headers,
            client,
            attempt_timeout,
            connect_timeout,
            max_body_bytes,
            egress,
            https_only,
            show_path,
            status_classifier,
            #[cfg(feature = "cloudevents")]
            cloudevents,
            layer: outer,
        } = self;
        WebhookSinkBuilder {
            url,
            secrets,
            scheme,
            headers,
            client,
            attempt_timeout,
            connect_timeout,
            max_body_bytes,
            egress,
            https_only,
            show_path,
            status_classifier,
            #[cfg(feature = "cloudevents")]
            cloudevents,
            layer: Stack::new(layer, outer),
        }
    }

    /// Checks the configuration and builds the sink, sending through
    /// [`ReqwestClient`] (the [`client`](Self::client) given, or one it
    /// builds with the egress guard) under the [`http_layer`](Self::http_layer)s.
    ///
    /// # Errors
    ///
    /// [`BuildError`] for a URL that does not parse, is not http(s), is not
    /// https while [`https_only`](Self::https_only) is set, or is an IP
    /// address the egress policy refuses; for an invalid or reserved header;
    /// for a custom client with a restricting egress policy; for an invalid
    /// CloudEvents configuration; or if the HTTP client cannot be built.
    ///
    /// ```
    /// use eventsink::webhook::{BuildError, WebhookSink};
    /// assert!(matches!(WebhookSink::builder("ftp://example.com").build(), Err(BuildError::UnsupportedScheme { .. })));
    /// assert!(matches!(WebhookSink::builder("not a url").build(), Err(BuildError::InvalidUrl { .. })));
    /// ```
    pub fn build(mut self) -> Result<WebhookSink<L::Service>, BuildError>
    where
        L: Layer<ReqwestClient>,
    {
        let config = self.config()?;
        let client = match self.client.take() {
            Some(_) if self.egress.is_restricted() => return Err(BuildError::ClientWithEgress),
            Some(client) => client,
            None => own_client(self.connect_timeout, self.egress.clone())?,
        };
        let url = self.checked_url()?;
        let client = ReqwestClient::new(client).with_destination(config.uri.clone(), url);
        Ok(WebhookSink {
            client: self.layer.layer(client),
            config,
        })
    }

    /// Checks the configuration and builds the sink, sending through
    /// `service` under the [`http_layer`](Self::http_layer)s: any
    /// `Service<http::Request<RequestBody>, Response = http::Response<B>>`,
    /// such as hyper-util's client. See [the HTTP leg](super#the-http-leg).
    ///
    /// The service is used as given: it must not follow redirects, and the
    /// [`connect_timeout`](Self::connect_timeout) is its own to set (the
    /// [`attempt_timeout`](Self::attempt_timeout) still applies).
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build), and [`BuildError::ClientWithEgress`] with a
    /// restricting egress policy (only the client `build` makes can enforce
    /// it) or [`BuildError::ClientWithService`] if a reqwest
    /// [`client`](Self::client) was given too.
    ///
    /// ```
    /// use eventsink::webhook::{BuildError, EgressPolicy, RequestBody, WebhookSink};
    /// use eventsink::{Event, SinkExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
    /// // A test double: answers 200 to anything.
    /// let answer_200 = tower::service_fn(|_: http::Request<RequestBody>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// });
    /// let mut sink = WebhookSink::builder("https://example.com/hook").build_with(answer_200)?;
    /// sink.publish(Event::new("ping", ())).await?;
    ///
    /// let err = WebhookSink::builder("https://example.com/hook")
    ///     .egress(EgressPolicy::public_only())
    ///     .build_with(answer_200)
    ///     .unwrap_err();
    /// assert!(matches!(err, BuildError::ClientWithEgress));
    /// # Ok(()) }
    /// ```
    pub fn build_with<S>(self, service: S) -> Result<WebhookSink<L::Service>, BuildError>
    where
        L: Layer<S>,
    {
        if self.egress.is_restricted() {
            return Err(BuildError::ClientWithEgress);
        }
        if self.client.is_some() {
            return Err(BuildError::ClientWithService);
        }
        Ok(WebhookSink {
            config: self.config()?,
            client: self.layer.layer(service),
        })
    }

    /// The checked configuration every attempt is made with.
    fn config(&self) -> Result<Arc<Config>, BuildError> {
        let url = self.checked_url()?;
        let host = url
            .host_str()
            .ok_or(BuildError::InvalidUrl {
                reason: "it has no host".into(),
            })?
            .to_owned();
        check_ip_literal(&url, &self.egress)?;
        let uri =
            url.as_str()
                .parse()
                .map_err(|e: http::uri::InvalidUri| BuildError::InvalidUrl {
                    reason: e.to_string(),
                })?;
        #[cfg_attr(not(feature = "cloudevents"), allow(unused_mut))]
        let mut headers = static_headers(&self.headers)?;
        #[cfg(feature = "cloudevents")]
        let cloudevents = match &self.cloudevents {
            Some(ce) => Some(ce.format(self.scheme, &mut headers)?),
            None => None,
        };
        Ok(Arc::new(Config {
            display_url: display_url(&url, self.show_path),
            uri,
            host,
            secrets: self.secrets.clone(),
            scheme: self.scheme,
            headers,
            attempt_timeout: self.attempt_timeout,
            max_body_bytes: self.max_body_bytes,
            status_classifier: self.status_classifier.clone(),
            #[cfg(feature = "cloudevents")]
            cloudevents,
        }))
    }
}

impl WebhookSinkBuilder {
    /// The defaults, for `url`.
    pub(super) fn new(url: String) -> Self {
        WebhookSinkBuilder {
            url,
            secrets: Vec::new(),
            scheme: Scheme::default(),
            headers: Vec::new(),
            client: None,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            egress: EgressPolicy::default(),
            https_only: false,
            show_path: false,
            status_classifier: None,
            #[cfg(feature = "cloudevents")]
            cloudevents: None,
            layer: Identity::new(),
        }
    }
}

impl<L> WebhookSinkBuilder<L> {
    /// The URL, parsed, with a scheme this builder accepts.
    fn checked_url(&self) -> Result<Url, BuildError> {
        let url = Url::parse(&self.url).map_err(|e| BuildError::InvalidUrl {
            reason: e.to_string(),
        })?;
        match url.scheme() {
            "https" => Ok(url),
            "http" if !self.https_only => Ok(url),
            "http" => Err(BuildError::HttpsRequired),
            other => Err(BuildError::UnsupportedScheme {
                scheme: other.to_owned(),
            }),
        }
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
        let invalid = || BuildError::InvalidHeader { name: name.clone() };
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err(BuildError::ReservedHeader { name: name.clone() });
        }
        let mut value = HeaderValue::from_str(value).map_err(|_| invalid())?;
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

/// How the sink shows `url`: without credentials, query or fragment, and
/// with its path only if `show_path` (see [`WebhookSinkBuilder::show_path`]).
fn display_url(url: &Url, show_path: bool) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let path = match url.path() {
        path if show_path || path == "/" => path,
        _ => "/REDACTED",
    };
    format!(
        "{}://{}{port}{path}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_url_drops_credentials_query_and_fragment_and_hides_the_path() {
        let url = Url::parse("https://user:pw@example.com:8443/a/b?token=secret#frag").unwrap();
        assert_eq!(display_url(&url, true), "https://example.com:8443/a/b");
        assert_eq!(
            display_url(&url, false),
            "https://example.com:8443/REDACTED"
        );
        let bare = Url::parse("https://example.com").unwrap();
        assert_eq!(display_url(&bare, false), "https://example.com/");
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
}
