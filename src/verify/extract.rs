//! [`Verified<T>`]: the axum extractor of a verified webhook's event.

use std::fmt;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use serde::de::DeserializeOwned;

use super::VerifiedWebhook;
use super::check::{Rejection, plain_text};
use crate::Event;

/// The verified body deserialised into an [`Event<T>`], and what
/// [`VerifyWebhookLayer`](super::VerifyWebhookLayer) verified.
///
/// Use it in handlers behind the layer. Bad JSON answers 400 with the
/// parser's message, and so does an event whose id or kind breaks the
/// [rule both sides share](crate::wire#the-rule) (which
/// [`WebhookSink`](crate::webhook::WebhookSink) never sends); a route without the layer answers 500, so a missing
/// layer cannot go unnoticed. It reads the body through axum's `Bytes`
/// extractor, so axum's `DefaultBodyLimit` (2 MB) applies as well: raise it
/// too if you set the layer's `max_body` above that.
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

impl<S, T> FromRequest<S> for Verified<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = VerifiedRejection;

    async fn from_request(request: Request, state: &S) -> Result<Self, VerifiedRejection> {
        let webhook = request
            .extensions()
            .get::<VerifiedWebhook>()
            .cloned()
            .ok_or(VerifiedRejection::NotVerified)?;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(VerifiedRejection::Body)?;
        let event: Event<T> = serde_json::from_slice(&bytes)
            .map_err(|e| VerifiedRejection::InvalidEvent(e.to_string()))?;
        crate::wire::check_event(&event)
            .map_err(|e| VerifiedRejection::InvalidEvent(e.to_string()))?;
        Ok(Verified { event, webhook })
    }
}

/// Why [`Verified`] could not extract.
///
/// ```
/// use axum::response::IntoResponse;
/// use eventsink::verify::VerifiedRejection;
/// let response = VerifiedRejection::InvalidEvent("expected value at line 1 column 1".into()).into_response();
/// assert_eq!(response.status(), 400);
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum VerifiedRejection {
    /// The request has no [`VerifiedWebhook`]: the route lacks the layer.
    /// 500, a server configuration error.
    NotVerified,
    /// The body could not be read.
    Body(BytesRejection),
    /// The body is not the JSON of an `Event<T>`; the parser's message. 400.
    InvalidEvent(String),
}

impl fmt::Display for VerifiedRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifiedRejection::NotVerified => f.write_str(
                "webhook not verified: add VerifyWebhookLayer to this route before using Verified",
            ),
            VerifiedRejection::Body(e) => write!(f, "could not read the webhook body: {e}"),
            VerifiedRejection::InvalidEvent(e) => write!(f, "webhook body is not an event: {e}"),
        }
    }
}

impl std::error::Error for VerifiedRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VerifiedRejection::Body(e) => Some(e),
            _ => None,
        }
    }
}

impl IntoResponse for VerifiedRejection {
    fn into_response(self) -> Response {
        match self {
            VerifiedRejection::Body(e) => e.into_response(),
            VerifiedRejection::NotVerified => {
                tracing::error!("{self}");
                plain_text(StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
            }
            VerifiedRejection::InvalidEvent(_) => {
                plain_text(StatusCode::BAD_REQUEST, self.to_string()).into_response()
            }
        }
    }
}

impl IntoResponse for Rejection {
    /// The same response the layer sends.
    fn into_response(self) -> Response {
        self.into_http_response().into_response()
    }
}
