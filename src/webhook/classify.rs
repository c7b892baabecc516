//! How a receiver's answer becomes an [`Error`]: status
//! classes, `Retry-After`, and the response body kept for the error.
//!
//! ```
//! use eventsink::webhook::classify::is_retryable_status;
//! use http::StatusCode;
//!
//! assert!(is_retryable_status(StatusCode::SERVICE_UNAVAILABLE));
//! assert!(!is_retryable_status(StatusCode::GONE));
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Buf;
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::{Instant, timeout_at};

use super::Config;
use super::egress::EgressRefused;
use crate::{BoxError, Error};

/// How much of a failed response's body is kept in the error: 4 KiB, enough
/// for a JSON error document, small enough to log.
pub const MAX_ERROR_BODY_BYTES: usize = 4 * 1024;

/// Whether a non-2xx status is worth retrying.
///
/// - 3xx: transient. Redirects are never followed; a moved endpoint may be
///   fixed by its owner.
/// - 408, 409, 425, 429: transient (the receiver timed out, is busy with
///   another delivery of the same event — what
///   [`VerifyWebhookLayer`](crate::verify::VerifyWebhookLayer)'s replay
///   guard answers —, is not ready, or throttles).
/// - 500, 502, 503, 504 and other 5xx: transient, except 501 and 505, which
///   say the request itself is not supported.
/// - Other 4xx, 410 included: permanent.
///
/// ```
/// use eventsink::webhook::classify::is_retryable_status;
/// use http::StatusCode;
/// assert!(is_retryable_status(StatusCode::MOVED_PERMANENTLY));
/// assert!(!is_retryable_status(StatusCode::UNPROCESSABLE_ENTITY));
/// assert!(!is_retryable_status(StatusCode::NOT_IMPLEMENTED));
/// ```
pub fn is_retryable_status(status: StatusCode) -> bool {
    match status.as_u16() {
        300..=399 | 408 | 409 | 425 | 429 => true,
        501 | 505 => false,
        500..=599 => true,
        _ => false,
    }
}

/// Parses a `Retry-After` value: delta-seconds (`120`) or an HTTP date
/// (`Wed, 21 Oct 2026 07:28:00 GMT`), relative to `now`. A date in the past
/// means "now" (zero); anything unreadable is `None`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use eventsink::webhook::classify::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
/// assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
/// let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
/// assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
/// assert_eq!(parse_retry_after("soon", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The start of a response body, safe to print: at most
/// [`MAX_ERROR_BODY_BYTES`], cut on a character boundary, invalid UTF-8
/// replaced, control characters (newlines included) shown as spaces.
///
/// ```
/// use eventsink::webhook::classify::sanitize_body;
/// assert_eq!(sanitize_body(b"line one\nline two\x1b[31m"), "line one line two [31m");
/// ```
pub fn sanitize_body(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ERROR_BODY_BYTES)]);
    let mut kept = String::with_capacity(text.len().min(MAX_ERROR_BODY_BYTES));
    for c in text.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        // A character cut by the byte limit decodes as a 3-byte U+FFFD.
        if kept.len() + c.len_utf8() > MAX_ERROR_BODY_BYTES {
            break;
        }
        kept.push(c);
    }
    kept.trim().to_owned()
}

/// How much of a successful answer's body is read (and discarded) so that
/// the connection can be reused: 64 KiB.
const MAX_DRAINED_BODY_BYTES: usize = 64 * 1024;

/// How long the answer's body is read once its status is known: 2 s. The
/// status decides the outcome; the body is read only to reuse the
/// connection (at most 64 KiB) or to quote a failure (at most
/// [`MAX_ERROR_BODY_BYTES`]), which takes well under a second on any
/// working link (64 KiB in 2 s is 256 kbit/s). So a receiver that answers
/// and then drips its body holds `publish` for 2 s, not for the whole
/// [attempt timeout](super::DEFAULT_ATTEMPT_TIMEOUT).
pub const RESPONSE_BODY_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits for the answer to one attempt (`sending`), for at most the attempt
/// timeout, and turns it into the sink's result, recording the status and
/// duration on the current span.
pub(super) async fn attempt<B: Body>(
    config: Arc<Config>,
    sending: impl Future<Output = Result<Response<B>, BoxError>>,
) -> Result<(), Error> {
    let started = Instant::now();
    let deadline = started + config.attempt_timeout;
    let span = tracing::Span::current();
    let result = match timeout_at(deadline, sending).await {
        Ok(Ok(response)) => {
            span.record("http.response.status_code", response.status().as_u16());
            answer(&config, response, deadline).await
        }
        Ok(Err(error)) => Err(transport_error(&config, error)),
        Err(elapsed) => Err(Error::Transport {
            url: config.display_url.clone(),
            timed_out: true,
            source: Box::new(elapsed),
        }),
    };
    span.record(
        "eventsink.duration_ms",
        started.elapsed().as_millis() as u64,
    );
    match &result {
        Ok(()) => tracing::debug!("delivered"),
        Err(error) => tracing::warn!("delivery failed: {error}"),
    }
    result
}

/// Success for 2xx; otherwise [`Error::Http`] retryable or not by its status, the
/// `Retry-After` and the start of the body, read until `deadline` at the
/// latest.
async fn answer<B: Body>(
    config: &Config,
    response: Response<B>,
    deadline: Instant,
) -> Result<(), Error> {
    let status = response.status();
    let deadline = deadline.min(Instant::now() + RESPONSE_BODY_TIMEOUT);
    if status.is_success() {
        // Read what the receiver sent so the connection can be reused; a
        // failure or a timeout here does not undo the delivery.
        read_prefix(response.into_body(), MAX_DRAINED_BODY_BYTES, deadline).await;
        return Ok(());
    }
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let body = read_prefix(response.into_body(), MAX_ERROR_BODY_BYTES, deadline).await;
    let retryable = config
        .status_classifier
        .as_ref()
        .and_then(|classify| classify(status))
        .unwrap_or_else(|| is_retryable_status(status));
    Err(Error::Http {
        url: config.display_url.clone(),
        status,
        retryable,
        retry_after,
        body: sanitize_body(&body),
    })
}

/// What an error of the HTTP leg means: [`Error::Refused`] when the egress
/// guard refused every address, otherwise a transient [`Error::Transport`]
/// (connection refused or reset, TLS, a timeout, a layer's own error),
/// timed out when a reqwest or tower timeout, or an I/O `TimedOut`, is in
/// its chain.
pub(super) fn transport_error(config: &Config, error: BoxError) -> Error {
    let url = config.display_url.clone();
    let chain = || {
        std::iter::successors(Some(&*error as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
    };
    if let Some(refused) = chain().find_map(|e| e.downcast_ref::<EgressRefused>()) {
        return Error::Refused {
            url,
            reason: refused.to_string(),
        };
    }
    Error::Transport {
        url,
        timed_out: chain().any(is_timeout),
        source: error,
    }
}

fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(e) = error.downcast_ref::<reqwest::Error>() {
        e.is_timeout()
    } else if let Some(e) = error.downcast_ref::<std::io::Error>() {
        e.kind() == std::io::ErrorKind::TimedOut
    } else {
        error.is::<tower::timeout::error::Elapsed>() || error.is::<tokio::time::error::Elapsed>()
    }
}

/// Reads at most `limit` bytes of the body, until `deadline` at the latest:
/// what arrived by then, or before an error.
async fn read_prefix<B: Body>(body: B, limit: usize, deadline: Instant) -> Vec<u8> {
    let mut kept = Vec::new();
    let reading = async {
        let mut body = std::pin::pin!(body);
        while kept.len() < limit {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() && kept.len() < limit {
                            let chunk = data.chunk();
                            let take = chunk.len().min(limit - kept.len());
                            kept.extend_from_slice(&chunk[..take]);
                            data.advance(take);
                        }
                    }
                }
                None | Some(Err(_)) => break,
            }
        }
    };
    if timeout_at(deadline, reading).await.is_err() {
        tracing::debug!(
            "the answer's body was still arriving at the attempt's deadline or \
             {RESPONSE_BODY_TIMEOUT:?} after its head; stopped reading it"
        );
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_class() {
        let retryable = |s: u16| is_retryable_status(StatusCode::from_u16(s).unwrap());
        for s in [
            300, 301, 302, 307, 308, 408, 409, 425, 429, 500, 502, 503, 504, 507,
        ] {
            assert!(retryable(s), "{s}");
        }
        for s in [400, 401, 403, 404, 405, 410, 413, 415, 422, 501, 505] {
            assert!(!retryable(s), "{s}");
        }
    }

    #[test]
    fn retry_after_in_the_past_is_zero_and_garbage_is_none() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        for bad in ["", "-1", "1.5", "tomorrow", "Wed, 99 Foo 2026"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn bodies_are_cut_on_a_char_boundary() {
        let body = "é".repeat(MAX_ERROR_BODY_BYTES);
        let kept = sanitize_body(body.as_bytes());
        assert!(kept.len() <= MAX_ERROR_BODY_BYTES);
        assert!(kept.chars().all(|c| c == 'é' || c == '\u{fffd}'));
    }
}
