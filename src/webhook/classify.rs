//! How a receiver's answer becomes an [`Error`](crate::Error): status
//! classes, `Retry-After`, and the response body kept for the error.
//!
//! ```
//! use eventsink::webhook::classify::is_retryable_status;
//!
//! assert!(is_retryable_status(503));
//! assert!(!is_retryable_status(410));
//! ```

use std::time::{Duration, SystemTime};

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
/// assert!(is_retryable_status(301));
/// assert!(!is_retryable_status(422));
/// assert!(!is_retryable_status(501));
/// ```
pub fn is_retryable_status(status: u16) -> bool {
    match status {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_class() {
        for s in [
            300, 301, 302, 307, 308, 408, 409, 425, 429, 500, 502, 503, 504, 507,
        ] {
            assert!(is_retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 405, 410, 413, 415, 422, 501, 505] {
            assert!(!is_retryable_status(s), "{s}");
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
