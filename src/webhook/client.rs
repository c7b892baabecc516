//! The HTTP leg: the service a [`WebhookSink`](super::WebhookSink) hands its
//! signed requests to, and [`ReqwestClient`], the default one.
//!
//! The sink builds one `http::Request<RequestBody>` per attempt, complete
//! with its signature headers, and calls an inner
//! `Service<http::Request<RequestBody>, Response = http::Response<B>>`.
//! By default that is [`ReqwestClient`]; any other HTTP client that speaks
//! the `http` types fits (hyper-util's `Client`, a test service), and
//! tower and tower-http layers can be stacked on it with
//! [`WebhookSinkBuilder::http_layer`](super::WebhookSinkBuilder::http_layer).
//!
//! ```
//! use eventsink::webhook::{ReqwestClient, RequestBody};
//! use tower::Service;
//!
//! fn is_an_http_leg<S: Service<http::Request<RequestBody>>>(_: &S) {}
//! is_an_http_leg(&ReqwestClient::new(reqwest::Client::new()));
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Uri;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use reqwest::Url;
use tower::Service;

/// The body of every request the sink sends: the signed bytes, in one
/// frame, with an exact size (so it goes out with `content-length`).
///
/// ```
/// use http_body_util::BodyExt;
/// use eventsink::webhook::RequestBody;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let body = RequestBody::from(b"{}".to_vec());
/// assert_eq!(body.collect().await.unwrap().to_bytes(), "{}");
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct RequestBody {
    bytes: Option<Bytes>,
}

impl RequestBody {
    /// The bytes, without polling.
    pub fn into_bytes(self) -> Bytes {
        self.bytes.unwrap_or_default()
    }
}

impl From<Vec<u8>> for RequestBody {
    fn from(bytes: Vec<u8>) -> Self {
        RequestBody {
            bytes: Some(bytes.into()),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.bytes.take().map(|bytes| Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// The default HTTP leg: a [`reqwest::Client`] as a
/// `Service<http::Request<RequestBody>>`. Cheap to clone (clones share the
/// connection pool).
///
/// Its errors carry no URL (reqwest's would include the query string and
/// credentials), so that they are safe to log in any layer above it.
#[derive(Debug, Clone)]
pub struct ReqwestClient {
    client: reqwest::Client,
    /// The sink's destination, parsed once: requests to it skip reqwest's
    /// parsing of the URI again into a URL.
    destination: Option<Arc<(Uri, Url)>>,
}

impl ReqwestClient {
    /// Wraps `client`. It should not follow redirects (build it with
    /// `reqwest::redirect::Policy::none()`): a redirect would be sent the
    /// signed request, and the egress guard checks only the first address.
    pub fn new(client: reqwest::Client) -> Self {
        ReqwestClient {
            client,
            destination: None,
        }
    }

    /// Remembers `url`, the sink's destination, as parsed.
    pub(super) fn with_destination(self, uri: Uri, url: Url) -> Self {
        ReqwestClient {
            destination: Some(Arc::new((uri, url))),
            ..self
        }
    }

    /// `request` for reqwest: the destination's URL if it goes there and
    /// carries no extensions (which only reqwest's own conversion keeps).
    fn convert(&self, request: http::Request<RequestBody>) -> reqwest::Result<reqwest::Request> {
        let request = request.map(|body| reqwest::Body::from(body.into_bytes()));
        match &self.destination {
            Some(to) if to.0 == *request.uri() && request.extensions().is_empty() => {
                let (parts, body) = request.into_parts();
                let mut converted = reqwest::Request::new(parts.method, to.1.clone());
                *converted.headers_mut() = parts.headers;
                *converted.version_mut() = parts.version;
                *converted.body_mut() = Some(body);
                Ok(converted)
            }
            _ => reqwest::Request::try_from(request),
        }
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Service<http::Request<RequestBody>> for ReqwestClient {
    type Response = http::Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = ReqwestFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let state = match self.convert(request) {
            Ok(request) => State::Sending {
                inner: self.client.call(request),
            },
            Err(error) => State::Failed {
                error: Some(error.without_url()),
            },
        };
        ReqwestFuture { state }
    }
}

type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

pin_project! {
    /// The future of [`ReqwestClient`]'s `call`: reqwest's, with the
    /// answer as an `http::Response` and errors without the URL.
    pub struct ReqwestFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = Projected]
    enum State {
        /// Waiting for the answer's head.
        Sending { #[pin] inner: Pending },
        /// The request could not be converted (never for a request the
        /// sink built).
        Failed { error: Option<reqwest::Error> },
    }
}

impl Future for ReqwestFuture {
    type Output = Result<http::Response<reqwest::Body>, reqwest::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            Projected::Sending { inner } => inner
                .poll(cx)
                .map_ok(http::Response::from)
                .map_err(reqwest::Error::without_url),
            Projected::Failed { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => panic!("ReqwestFuture polled after completion"),
            },
        }
    }
}

impl fmt::Debug for ReqwestFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReqwestFuture")
    }
}
