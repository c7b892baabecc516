//! The axum extractors: [`VerifiedWebhook`] (what the layer verified) and
//! [`Verified<T>`] (that, plus the body as an [`Event<T>`]).

use std::fmt;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use super::VerifiedWebhook;
use super::check::{Rejection, plain_text};
use crate::Event;
use crate::wire::{self, InvalidField};

/// The verified body deserialised into an [`Event<T>`], and what
/// [`VerifyWebhookLayer`](super::VerifyWebhookLayer) verified.
///
/// Use it in handlers behind the layer. It answers like axum's `Json`: 400
/// for a body that is not JSON, 422 for JSON that is not an `Event<T>` or
/// whose id or kind breaks the [rule both sides share](crate::wire#the-rule)
/// (which [`WebhookSink`](crate::webhook::WebhookSink) never sends); a route
/// without the layer answers 500, so a missing layer cannot go unnoticed.
/// It reads the body through axum's `Bytes` extractor, so axum's
/// `DefaultBodyLimit` (2 MB) applies as well: raise it too if you set the
/// layer's [`max_body_bytes`](super::VerifyConfig::max_body_bytes) above
/// that.
///
/// ```
/// use axum::{Router, routing::post};
/// use eventsink::verify::{Verified, VerifyWebhookLayer};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct OrderPlaced { order_id: u64 }
///
/// async fn hook(Verified { event, webhook }: Verified<OrderPlaced>) -> String {
///     format!("order {} from webhook {}", event.payload.order_id, webhook.id)
/// }
///
/// let layer = VerifyWebhookLayer::new(eventsink::signature::Secret::generate()?);
/// let app: Router = Router::new().route("/hook", post(hook)).route_layer(layer);
/// # let _ = app;
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Verified<T = serde_json::Value> {
    /// The event of the body. A Go-format body's extra `now` field is
    /// skipped.
    pub event: Event<T>,
    /// The verified id, timestamp and scheme.
    pub webhook: VerifiedWebhook,
}

impl<S> FromRequestParts<S> for VerifiedWebhook
where
    S: Send + Sync,
{
    type Rejection = VerifiedRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, VerifiedRejection> {
        parts
            .extensions
            .get::<VerifiedWebhook>()
            .cloned()
            .ok_or(VerifiedRejection::NotVerified)
    }
}

impl<S, T> FromRequest<S> for Verified<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = VerifiedRejection;

    async fn from_request(request: Request, state: &S) -> Result<Self, VerifiedRejection> {
        let (mut parts, body) = request.into_parts();
        let webhook = VerifiedWebhook::from_request_parts(&mut parts, state).await?;
        let bytes = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(VerifiedRejection::Body)?;
        let event: Event<T> = serde_json::from_slice(&bytes).map_err(VerifiedRejection::Json)?;
        wire::check_event(&event).map_err(VerifiedRejection::InvalidEvent)?;
        Ok(Verified { event, webhook })
    }
}

/// Why [`Verified`] or [`VerifiedWebhook`] could not extract. The response
/// is the [`status`](VerifiedRejection::status) and a `text/plain` reason
/// that includes the cause.
///
/// ```
/// use axum::response::IntoResponse;
/// use eventsink::verify::VerifiedRejection;
///
/// let syntax = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
/// assert_eq!(VerifiedRejection::Json(syntax).into_response().status(), 400);
/// let data = serde_json::from_str::<u64>("\"seven\"").unwrap_err();
/// assert_eq!(VerifiedRejection::Json(data).into_response().status(), 422);
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum VerifiedRejection {
    /// The request has no [`VerifiedWebhook`]: the route lacks the layer.
    /// 500, a server configuration error.
    NotVerified,
    /// The body could not be read; answered as axum answers it.
    Body(BytesRejection),
    /// The body is not the JSON of an `Event<T>`: 400 for a syntax error
    /// (or a truncated body), 422 for valid JSON of the wrong shape.
    Json(serde_json::Error),
    /// The event's id or kind breaks the [wire rule](crate::wire#the-rule).
    /// 422.
    InvalidEvent(InvalidField),
}

impl VerifiedRejection {
    /// The status this rejection answers with.
    ///
    /// ```
    /// use eventsink::verify::VerifiedRejection;
    /// assert_eq!(VerifiedRejection::NotVerified.status(), 500);
    /// ```
    pub fn status(&self) -> StatusCode {
        match self {
            VerifiedRejection::NotVerified => StatusCode::INTERNAL_SERVER_ERROR,
            VerifiedRejection::Body(e) => e.status(),
            VerifiedRejection::Json(e) => match e.classify() {
                Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
                Category::Syntax | Category::Eof | Category::Io => StatusCode::BAD_REQUEST,
            },
            VerifiedRejection::InvalidEvent(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

impl fmt::Display for VerifiedRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifiedRejection::NotVerified => f.write_str(
                "webhook not verified: add VerifyWebhookLayer to this route before extracting \
                 VerifiedWebhook or Verified",
            ),
            VerifiedRejection::Body(_) => f.write_str("could not read the webhook body; if it is large, raise axum's DefaultBodyLimit too"),
            VerifiedRejection::Json(_) if self.status() == StatusCode::BAD_REQUEST => {
                f.write_str("the webhook body is not valid JSON")
            }
            VerifiedRejection::Json(_) => {
                f.write_str("the webhook body is not an event of the expected type")
            }
            VerifiedRejection::InvalidEvent(_) => {
                f.write_str("the webhook's event breaks the rule for ids and kinds")
            }
        }
    }
}

impl std::error::Error for VerifiedRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VerifiedRejection::NotVerified => None,
            VerifiedRejection::Body(e) => Some(e),
            VerifiedRejection::Json(e) => Some(e),
            VerifiedRejection::InvalidEvent(e) => Some(e),
        }
    }
}

impl IntoResponse for VerifiedRejection {
    fn into_response(self) -> Response {
        let text = match std::error::Error::source(&self) {
            Some(source) => format!("{self}: {source}"),
            None => self.to_string(),
        };
        if let VerifiedRejection::NotVerified = self {
            tracing::error!("{text}");
        }
        plain_text(self.status(), text).into_response()
    }
}

impl IntoResponse for Rejection {
    /// The same response the layer sends.
    fn into_response(self) -> Response {
        self.into_http_response().into_response()
    }
}
