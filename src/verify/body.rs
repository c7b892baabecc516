//! [`ResponseBody`]: the inner service's response body, or the layer's own
//! short text.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`VerifyWebhook`](super::VerifyWebhook): the
    /// inner service's body when the request reached it, or the layer's
    /// plain-text answer (a rejection, or "already handled").
    ///
    /// It is a plain [`http_body::Body`] with `Bytes` data, so the layer's
    /// responses work in axum (`Response<ResponseBody<axum::body::Body>>` is
    /// `IntoResponse`) and in hyper alike.
    ///
    /// ```
    /// use http_body::Body as _;
    /// use eventsink::verify::ResponseBody;
    ///
    /// let body: ResponseBody<http_body_util::Empty<bytes::Bytes>> = ResponseBody::text("no");
    /// assert_eq!(body.size_hint().exact(), Some(2));
    /// ```
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Local { body: Full<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    ///
    /// ```
    /// let body = eventsink::verify::ResponseBody::inner(http_body_util::Empty::<bytes::Bytes>::new());
    /// # let _ = body;
    /// ```
    pub fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
        }
    }

    /// A body of the layer's own, such as a rejection's reason.
    ///
    /// ```
    /// let body: eventsink::verify::ResponseBody<String> = eventsink::verify::ResponseBody::text("already handled");
    /// # let _ = body;
    /// ```
    pub fn text(text: impl Into<Bytes>) -> Self {
        ResponseBody::local(Full::new(text.into()))
    }

    pub(crate) fn local(body: Full<Bytes>) -> Self {
        ResponseBody {
            kind: Kind::Local { body },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Local { body } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Local { body } => body.size_hint(),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Local { .. } => "local",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}
