//! The checks themselves, without tower: header parsing, tolerance, size and
//! signature, and the [`Rejection`] each failure answers with.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Deserialize;

use super::replay::ReplayGuard;
use super::{Clock, VerifiedWebhook};
use crate::signature::{self, Scheme, Secret};
use crate::wire::{self, GO_SIGNATURE, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};

/// Why a webhook request was refused, with the HTTP status it answers.
///
/// `Display` is the short plain-text reason sent as the response body. It
/// names what was wrong and never contains a secret or a signature.
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use eventsink::signature::Secret;
/// use eventsink::verify::{self, Rejection};
///
/// let secret = Secret::generate()?;
/// let rejection = verify::verify(&[secret], &HeaderMap::new(), b"{}").unwrap_err();
/// assert_eq!(rejection, Rejection::MissingHeader { header: "webhook-id" });
/// assert_eq!(rejection.status(), StatusCode::BAD_REQUEST);
/// assert_eq!(rejection.to_string(), "missing webhook-id header");
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// A required header is absent. 400.
    MissingHeader {
        /// The header's name.
        header: &'static str,
    },
    /// A header is present but unusable: not visible ASCII, repeated, or not
    /// in its format. 400.
    MalformedHeader {
        /// The header's name.
        header: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The timestamp is older than the tolerance allows. 401.
    TimestampTooOld,
    /// The timestamp is further in the future than the tolerance allows. 401.
    TimestampInFuture,
    /// The body is larger than the configured maximum. 413.
    BodyTooLarge {
        /// The maximum, in bytes.
        limit: usize,
    },
    /// Reading the body failed (the client went away, a transfer error). 400.
    BodyUnreadable,
    /// The body did not arrive within the
    /// [`body_timeout`](super::VerifyConfig::body_timeout). 408, and the
    /// connection is closed.
    BodyTimeout {
        /// The deadline.
        limit: Duration,
    },
    /// A Go-compatible body lacks the `id` or `now` the check needs. 400.
    MalformedBody {
        /// What is wrong with it.
        problem: &'static str,
    },
    /// No listed signature matches any configured secret. 401.
    SignatureMismatch,
    /// Another delivery of the same id is being handled right now. 409.
    InFlight,
    /// The replay guard could not be asked (its store is down). 503, so the
    /// sender retries later.
    ReplayGuardUnavailable,
}

impl Rejection {
    /// The HTTP status this rejection answers with.
    ///
    /// ```
    /// use http::StatusCode;
    /// use eventsink::verify::Rejection;
    /// assert_eq!(Rejection::SignatureMismatch.status(), StatusCode::UNAUTHORIZED);
    /// assert_eq!(Rejection::BodyTooLarge { limit: 10 }.status(), StatusCode::PAYLOAD_TOO_LARGE);
    /// ```
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::MissingHeader { .. }
            | Rejection::MalformedHeader { .. }
            | Rejection::BodyUnreadable
            | Rejection::MalformedBody { .. } => StatusCode::BAD_REQUEST,
            Rejection::TimestampTooOld
            | Rejection::TimestampInFuture
            | Rejection::SignatureMismatch => StatusCode::UNAUTHORIZED,
            Rejection::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Rejection::InFlight => StatusCode::CONFLICT,
            Rejection::ReplayGuardUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response the layer sends: [`status`](Rejection::status) and the
    /// reason as a `text/plain` body.
    ///
    /// ```
    /// use eventsink::verify::Rejection;
    /// let response = Rejection::InFlight.into_http_response();
    /// assert_eq!(response.status(), 409);
    /// assert_eq!(response.headers()["content-type"], "text/plain; charset=utf-8");
    /// ```
    pub fn into_http_response(self) -> Response<Full<Bytes>> {
        let mut response = plain_text(self.status(), self.to_string());
        if matches!(self, Rejection::BodyTimeout { .. }) {
            // The rest of a dripped body is not worth waiting for.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::MissingHeader { header } => write!(f, "missing {header} header"),
            Rejection::MalformedHeader { header, problem } => {
                write!(f, "malformed {header} header: {problem}")
            }
            Rejection::TimestampTooOld => f.write_str(
                "webhook timestamp is too old; sign each attempt as it is sent, and check the sender's clock",
            ),
            Rejection::TimestampInFuture => {
                f.write_str("webhook timestamp is too far in the future; check the sender's clock")
            }
            Rejection::BodyTooLarge { limit } => {
                write!(f, "webhook body is larger than {limit} bytes; send a smaller event")
            }
            Rejection::BodyUnreadable => f.write_str("could not read the webhook body; send it again"),
            Rejection::BodyTimeout { limit } => write!(
                f,
                "the webhook body did not arrive within {} ms; send the whole body at once",
                limit.as_millis()
            ),
            Rejection::MalformedBody { problem } => write!(f, "malformed webhook body: {problem}"),
            Rejection::SignatureMismatch => f.write_str(
                "no webhook signature matches; check that both sides use the same secret and the body is sent unchanged",
            ),
            Rejection::InFlight => {
                f.write_str("this webhook id is being handled by another delivery; retry later")
            }
            Rejection::ReplayGuardUnavailable => {
                f.write_str("could not check for duplicate deliveries; retry later")
            }
        }
    }
}

impl std::error::Error for Rejection {}

/// A `text/plain` response with `status` and `text`.
pub(crate) fn plain_text(status: StatusCode, text: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The replay guard and how long it remembers an id.
#[derive(Debug, Clone)]
pub(crate) struct Replay {
    pub(crate) guard: Arc<dyn ReplayGuard>,
    pub(crate) ttl: Duration,
    pub(crate) in_flight_ttl: Duration,
}

/// Everything the layer checks with; shared by its clones.
#[derive(Debug)]
pub(crate) struct Checks {
    pub(crate) secrets: Vec<Secret>,
    pub(crate) scheme: Scheme,
    pub(crate) tolerance: Duration,
    pub(crate) max_body_bytes: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) clock: Clock,
    pub(crate) replay: Option<Replay>,
}

/// What the headers say, before the body is read.
#[derive(Debug)]
pub(crate) enum Plan {
    Standard {
        id: String,
        timestamp: i64,
        signatures: String,
    },
    Go {
        signature: String,
    },
}

impl Checks {
    /// The whole check on a body already in memory.
    pub(crate) fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<VerifiedWebhook, Rejection> {
        let plan = self.plan(headers)?;
        if body.len() > self.max_body_bytes {
            return Err(Rejection::BodyTooLarge {
                limit: self.max_body_bytes,
            });
        }
        self.finish(plan, body)
    }

    /// The checks that need only the headers: presence and format (400) and,
    /// for Standard Webhooks, the timestamp tolerance (401).
    pub(crate) fn plan(&self, headers: &HeaderMap) -> Result<Plan, Rejection> {
        let standard = match self.scheme {
            Scheme::Standard => true,
            Scheme::GoCompatible => false,
            Scheme::Both => {
                if headers.contains_key(WEBHOOK_SIGNATURE) {
                    true
                } else if headers.contains_key(GO_SIGNATURE) {
                    false
                } else {
                    return Err(Rejection::MissingHeader {
                        header: "webhook-signature (or signature)",
                    });
                }
            }
        };
        if standard {
            self.plan_standard(headers)
        } else {
            let signature = required(headers, GO_SIGNATURE)?.trim();
            if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Rejection::MalformedHeader {
                    header: GO_SIGNATURE,
                    problem: "not 64 hexadecimal digits",
                });
            }
            Ok(Plan::Go {
                signature: signature.to_owned(),
            })
        }
    }

    fn plan_standard(&self, headers: &HeaderMap) -> Result<Plan, Rejection> {
        let id = required(headers, WEBHOOK_ID)?;
        wire::check_id(id).map_err(|invalid| Rejection::MalformedHeader {
            header: WEBHOOK_ID,
            problem: invalid.problem(),
        })?;
        let timestamp = required(headers, WEBHOOK_TIMESTAMP)?;
        if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Rejection::MalformedHeader {
                header: WEBHOOK_TIMESTAMP,
                problem: "not unix seconds",
            });
        }
        let timestamp: i64 = timestamp.parse().map_err(|_| Rejection::MalformedHeader {
            header: WEBHOOK_TIMESTAMP,
            problem: "out of range",
        })?;
        let signatures = required(headers, WEBHOOK_SIGNATURE)?;
        if signatures.trim().is_empty() {
            return Err(Rejection::MalformedHeader {
                header: WEBHOOK_SIGNATURE,
                problem: "empty",
            });
        }
        self.check_tolerance(timestamp)?;
        Ok(Plan::Standard {
            id: id.to_owned(),
            timestamp,
            signatures: signatures.to_owned(),
        })
    }

    /// The checks that need the body: signature (401) and, for the Go
    /// format, the body's `id` and `now` (400) and tolerance (401).
    pub(crate) fn finish(&self, plan: Plan, body: &[u8]) -> Result<VerifiedWebhook, Rejection> {
        match plan {
            Plan::Standard {
                id,
                timestamp,
                signatures,
            } => {
                if !signature::matches(&self.secrets, &id, timestamp, body, &signatures) {
                    return Err(Rejection::SignatureMismatch);
                }
                Ok(VerifiedWebhook {
                    id,
                    timestamp,
                    scheme: Scheme::Standard,
                })
            }
            Plan::Go { signature } => {
                if !signature::matches_go(&self.secrets, body, &signature) {
                    return Err(Rejection::SignatureMismatch);
                }
                // Only a signed body is parsed.
                let envelope: GoEnvelope<'_> =
                    serde_json::from_slice(body).map_err(|_| Rejection::MalformedBody {
                        problem: "not a JSON object with string fields `id` and `now`",
                    })?;
                let id = envelope.id.into_owned();
                if wire::check_id(&id).is_err() {
                    return Err(Rejection::MalformedBody {
                        problem: "`id` is not 1 to 256 bytes of visible ASCII",
                    });
                }
                let timestamp = DateTime::parse_from_rfc3339(&envelope.now)
                    .map_err(|_| Rejection::MalformedBody {
                        problem: "`now` is not an RFC 3339 time",
                    })?
                    .timestamp();
                self.check_tolerance(timestamp)?;
                Ok(VerifiedWebhook {
                    id,
                    timestamp,
                    scheme: Scheme::GoCompatible,
                })
            }
        }
    }

    fn check_tolerance(&self, timestamp: i64) -> Result<(), Rejection> {
        let now = i128::from(self.clock.now().timestamp());
        let tolerance = i128::from(self.tolerance.as_secs());
        let age = now - i128::from(timestamp);
        if age > tolerance {
            Err(Rejection::TimestampTooOld)
        } else if -age > tolerance {
            Err(Rejection::TimestampInFuture)
        } else {
            Ok(())
        }
    }
}

/// The two fields of a Go-compatible body the check reads; the rest of the
/// JSON is skipped.
#[derive(Deserialize)]
struct GoEnvelope<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    now: Cow<'a, str>,
}

/// The single value of header `name` as text; 400 if it is absent, repeated
/// or not visible ASCII.
fn required<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, Rejection> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Err(Rejection::MissingHeader { header: name });
    };
    if values.next().is_some() {
        return Err(Rejection::MalformedHeader {
            header: name,
            problem: "sent more than once",
        });
    }
    value.to_str().map_err(|_| Rejection::MalformedHeader {
        header: name,
        problem: "not visible ASCII",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn config(scheme: Scheme, now: i64) -> Checks {
        Checks {
            secrets: vec![Secret::from_whsec("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap()],
            scheme,
            tolerance: Duration::from_secs(300),
            max_body_bytes: 64,
            body_timeout: Duration::from_secs(1),
            clock: Clock::fixed(Utc.timestamp_opt(now, 0).unwrap()),
            replay: None,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn reference_vector_verifies_within_tolerance() {
        let cfg = config(Scheme::Standard, 1649367553 + 300);
        let map = headers(&[
            ("webhook-id", "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
            ("webhook-timestamp", "1649367553"),
            (
                "webhook-signature",
                "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
            ),
        ]);
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let verified = cfg.verify(&map, body).unwrap();
        assert_eq!(verified.id, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk");
        assert_eq!(verified.timestamp, 1649367553);
        let late = config(Scheme::Standard, 1649367553 + 301);
        assert_eq!(late.verify(&map, body), Err(Rejection::TimestampTooOld));
    }

    #[test]
    fn timestamps_must_be_plain_digits_in_range() {
        let cfg = config(Scheme::Standard, 0);
        for bad in ["", "+1", "-1", "1.5", "1e3", "99999999999999999999"] {
            let map = headers(&[
                ("webhook-id", "a"),
                ("webhook-timestamp", bad),
                ("webhook-signature", "v1,x"),
            ]);
            assert!(
                matches!(
                    cfg.plan(&map),
                    Err(Rejection::MalformedHeader {
                        header: "webhook-timestamp",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let cfg = config(Scheme::Standard, 0);
        let map = headers(&[
            ("webhook-id", "a"),
            ("webhook-timestamp", &i64::MAX.to_string()),
            ("webhook-signature", "v1,x"),
        ]);
        assert!(matches!(cfg.plan(&map), Err(Rejection::TimestampInFuture)));
    }

    #[test]
    fn ids_with_dots_pass_and_repeated_headers_are_malformed() {
        let cfg = config(Scheme::Standard, 0);
        let dotted = headers(&[
            ("webhook-id", "evt_01J.x-y"),
            ("webhook-timestamp", "0"),
            ("webhook-signature", "v1,x"),
        ]);
        assert!(matches!(cfg.plan(&dotted), Ok(Plan::Standard { id, .. }) if id == "evt_01J.x-y"));
        let spaced = headers(&[
            ("webhook-id", "a b"),
            ("webhook-timestamp", "0"),
            ("webhook-signature", "v1,x"),
        ]);
        assert!(matches!(
            cfg.plan(&spaced),
            Err(Rejection::MalformedHeader {
                header: "webhook-id",
                ..
            })
        ));
        let twice = headers(&[
            ("webhook-id", "a"),
            ("webhook-timestamp", "0"),
            ("webhook-signature", "v1,x"),
            ("webhook-signature", "v1,y"),
        ]);
        assert_eq!(
            cfg.plan(&twice).unwrap_err(),
            Rejection::MalformedHeader {
                header: "webhook-signature",
                problem: "sent more than once"
            }
        );
    }

    #[test]
    fn both_picks_the_scheme_by_header() {
        let cfg = config(Scheme::Both, 0);
        let go = headers(&[("signature", &"ab".repeat(32))]);
        assert!(matches!(cfg.plan(&go), Ok(Plan::Go { .. })));
        assert!(matches!(
            cfg.plan(&HeaderMap::new()),
            Err(Rejection::MissingHeader { .. })
        ));
    }

    #[test]
    fn reasons_never_contain_secrets() {
        let all = [
            Rejection::MissingHeader { header: "x" },
            Rejection::MalformedHeader {
                header: "x",
                problem: "y",
            },
            Rejection::TimestampTooOld,
            Rejection::TimestampInFuture,
            Rejection::BodyTooLarge { limit: 1 },
            Rejection::BodyUnreadable,
            Rejection::MalformedBody { problem: "p" },
            Rejection::SignatureMismatch,
            Rejection::InFlight,
            Rejection::ReplayGuardUnavailable,
        ];
        for rejection in all {
            let text = rejection.to_string();
            assert!(!text.contains("C2FV") && !text.contains("whsec"), "{text}");
            assert!(rejection.status().is_client_error() || rejection.status().is_server_error());
        }
    }
}
