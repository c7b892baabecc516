//! [`VerifyWebhook`]: the service that [`VerifyWebhookLayer`] wraps around
//! a handler.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::{Layer, Service};

use super::check::{Checks, Rejection, plain_text};
use super::replay::{BoxFuture, Claim, ClaimToken, ReplayError, ReplayGuard};
use super::{ResponseBody, VerifyConfig, VerifyWebhookLayer};
use crate::BoxError;

/// Verifies webhook requests before they reach the inner service `S`.
///
/// Built by [`VerifyWebhookLayer`] (or [`VerifyWebhook::layer`]); see the
/// [module docs](super) for what it checks and answers. The inner service
/// receives the request with the *same bytes* as a [`Full<Bytes>`] body and
/// a [`VerifiedWebhook`](super::VerifiedWebhook) extension.
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use eventsink::signature::Secret;
/// use eventsink::verify::{VerifiedWebhook, VerifyWebhook};
///
/// let handler = tower::service_fn(|req: Request<Full<Bytes>>| async move {
///     let id = req.extensions().get::<VerifiedWebhook>().map(|w| w.id.clone());
///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(id.unwrap_or_default()))))
/// });
/// let mut service = VerifyWebhook::new(handler, Secret::generate()?);
/// let _handler = service.get_mut();
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Debug, Clone)]
pub struct VerifyWebhook<S> {
    inner: S,
    checks: Arc<Checks>,
}

impl<S> VerifyWebhook<S> {
    /// Wraps `inner`, verifying with `config` (a [`VerifyConfig`] or a
    /// [`Secret`](crate::signature::Secret)).
    pub fn new(inner: S, config: impl Into<VerifyConfig>) -> Self {
        VerifyWebhookLayer::new(config).layer(inner)
    }

    inner_service_accessors!();
}

impl VerifyWebhook<()> {
    /// The layer that wraps services with `config`; the same as
    /// [`VerifyWebhookLayer::new`], named after the service as in
    /// tower-http. (It sits on `VerifyWebhook<()>` so that
    /// `VerifyWebhook::layer(..)` needs no type annotation.)
    ///
    /// ```
    /// use eventsink::verify::{MemoryReplayGuard, VerifyConfig, VerifyWebhook};
    /// let secret = eventsink::signature::Secret::generate()?;
    /// let layer = VerifyWebhook::layer(VerifyConfig::new(secret).replay_guard(MemoryReplayGuard::new()));
    /// # let _ = layer;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn layer(config: impl Into<VerifyConfig>) -> VerifyWebhookLayer {
        VerifyWebhookLayer::new(config)
    }
}

impl<S> Layer<S> for VerifyWebhookLayer {
    type Service = VerifyWebhook<S>;

    fn layer(&self, inner: S) -> VerifyWebhook<S> {
        VerifyWebhook {
            inner,
            checks: Arc::clone(&self.checks),
        }
    }
}

impl<S, B, ResBody> Service<Request<B>> for VerifyWebhook<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Call the service that was polled ready; leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let checks = Arc::clone(&self.checks);
        ResponseFuture {
            inner: Box::pin(handle(checks, inner, request)),
        }
    }
}

/// The future of [`VerifyWebhook`]'s `call`: the inner service's response,
/// or the layer's own answer.
///
/// Boxed inside: it reads the body asynchronously and asks the replay guard
/// before and after the inner call.
pub struct ResponseFuture<B, E> {
    inner: BoxFuture<'static, Result<Response<ResponseBody<B>>, E>>,
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

async fn handle<S, B, ResBody>(
    config: Arc<Checks>,
    mut inner: S,
    request: Request<B>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let verified = match read_and_verify(&config, &parts.headers, body).await {
        Ok(verified) => verified,
        Err(rejection) => return Ok(reject(&rejection, None)),
    };
    let (bytes, verified) = verified;

    let claim = match &config.replay {
        None => None,
        Some(replay) => match replay.guard.claim(&verified.id, replay.in_flight_ttl).await {
            Ok(Claim::Claimed(token)) => Some(ClaimGuard {
                guard: Arc::clone(&replay.guard),
                id: verified.id.clone(),
                token,
                ttl: replay.ttl,
                armed: true,
            }),
            Ok(Claim::AlreadyHandled) => {
                tracing::debug!(webhook.id = %verified.id, "webhook already handled");
                return Ok(plain_text(StatusCode::OK, "already handled").map(ResponseBody::local));
            }
            Ok(Claim::InFlight) => return Ok(reject(&Rejection::InFlight, Some(&verified.id))),
            Err(error) => {
                tracing::warn!(webhook.id = %verified.id, error = %with_cause(&error), "webhook replay guard failed");
                return Ok(reject(
                    &Rejection::ReplayGuardUnavailable,
                    Some(&verified.id),
                ));
            }
        },
    };

    let mut request = Request::from_parts(parts, Full::new(bytes));
    request.extensions_mut().insert(verified);
    let result = inner.call(request).await;
    if let Some(claim) = claim {
        let handled = matches!(&result, Ok(response) if response.status().is_success());
        if handled {
            claim.complete().await;
        } else {
            claim.release().await;
        }
    }
    result.map(|response| response.map(ResponseBody::inner))
}

type Verified = (Bytes, super::VerifiedWebhook);

/// Headers, then the size-limited body, then the signature.
async fn read_and_verify<B>(
    config: &Checks,
    headers: &http::HeaderMap,
    body: B,
) -> Result<Verified, Rejection>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let plan = config.plan(headers)?;
    let too_large = Rejection::BodyTooLarge {
        limit: config.max_body_bytes,
    };
    // A declared length over the limit is refused before reading a byte.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = u64::try_from(config.max_body_bytes).unwrap_or(u64::MAX);
    if declared.is_some_and(|len| len > limit) || body.size_hint().lower() > limit {
        return Err(too_large);
    }
    let bytes = match read_body(config, body).await {
        Ok(bytes) => bytes,
        Err(error) if error.is::<LengthLimitError>() => return Err(too_large),
        Err(error) if error.is::<tokio::time::error::Elapsed>() => {
            return Err(Rejection::BodyTimeout {
                limit: config.body_timeout,
            });
        }
        Err(_) => return Err(Rejection::BodyUnreadable),
    };
    let verified = config.finish(plan, &bytes)?;
    Ok((bytes, verified))
}

/// The body, within the size limit and the deadline.
///
/// `Limited` stops reading as soon as the body passes the limit, so an
/// oversized body is never buffered whole; the deadline stops a dripping
/// one. A body already in memory is taken without starting a timer (so
/// in-memory use needs no tokio timer).
async fn read_body<B>(config: &Checks, body: B) -> Result<Bytes, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut reading = std::pin::pin!(Limited::new(body, config.max_body_bytes).collect());
    let first = std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await;
    let collected = match first {
        Poll::Ready(collected) => collected?,
        Poll::Pending => tokio::time::timeout(config.body_timeout, reading).await??,
    };
    Ok(collected.to_bytes())
}

fn reject<B>(rejection: &Rejection, id: Option<&str>) -> Response<ResponseBody<B>> {
    tracing::debug!(
        status = rejection.status().as_u16(),
        reason = %rejection,
        webhook.id = id.unwrap_or(""),
        "webhook rejected"
    );
    rejection
        .clone()
        .into_http_response()
        .map(ResponseBody::local)
}

/// An in-flight claim and the token that owns it. Dropped without
/// [`complete`](ClaimGuard::complete) or [`release`](ClaimGuard::release)
/// (the request future was cancelled, the handler panicked), it releases
/// the id on a spawned task, so the sender's retry is not answered 409
/// until the TTL ends. Every release is by token: a claim another delivery
/// made after this one's in-flight TTL ran out stays.
struct ClaimGuard {
    guard: Arc<dyn ReplayGuard>,
    id: String,
    token: ClaimToken,
    ttl: Duration,
    armed: bool,
}

impl ClaimGuard {
    async fn complete(mut self) {
        self.armed = false;
        if let Err(error) = self.guard.complete(&self.id, self.token, self.ttl).await {
            tracing::warn!(webhook.id = %self.id, error = %with_cause(&error), "could not record the handled webhook id");
            // Do not leave the id in flight: the next delivery gets handled.
            self.armed = true;
        }
    }

    async fn release(mut self) {
        self.armed = false;
        if let Err(error) = self.guard.release(&self.id, self.token).await {
            tracing::warn!(webhook.id = %self.id, error = %with_cause(&error), "could not release the webhook id");
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(webhook.id = %self.id, "no tokio runtime to release the webhook id; it stays in flight until its TTL ends");
            return;
        };
        let guard = Arc::clone(&self.guard);
        let id = std::mem::take(&mut self.id);
        let token = self.token;
        runtime.spawn(async move {
            if let Err(error) = guard.release(&id, token).await {
                tracing::warn!(webhook.id = %id, error = %with_cause(&error), "could not release the webhook id");
            }
        });
    }
}

/// The error and its source, for logs (`Display` does not repeat the
/// source).
fn with_cause(error: &ReplayError) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}
