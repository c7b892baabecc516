//! The signed request of one attempt: the body in the configured
//! [`Scheme`](crate::signature::Scheme), checked against the
//! [wire rule](crate::wire#the-rule) and the size limit, and its headers.

use chrono::{DateTime, SubsecRound, Utc};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use serde::Serialize;

use super::{Config, RequestBody};
use crate::signature;
use crate::{Error, Event, wire};

const WEBHOOK_ID: HeaderName = HeaderName::from_static(wire::WEBHOOK_ID);
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static(wire::WEBHOOK_TIMESTAMP);
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static(wire::WEBHOOK_SIGNATURE);
const GO_SIGNATURE: HeaderName = HeaderName::from_static(wire::GO_SIGNATURE);

/// Serialises, checks and signs `event` into the request of one attempt.
pub(super) fn request<P: Serialize>(
    c: &Config,
    event: &Event<P>,
) -> Result<Request<RequestBody>, Error> {
    // The rule the receiver checks, in every scheme: an event it would
    // answer 400 is refused here, before anything is sent.
    let id = wire_id(event)?;
    let now = Utc::now().trunc_subsecs(0);
    let body = body(c, event, now)?;
    let mut headers = c.headers.clone();
    #[cfg(feature = "cloudevents")]
    if let Some(format) = &c.cloudevents {
        format.insert_headers(event, &mut headers);
    }
    if c.scheme.sends_standard() {
        headers.insert(WEBHOOK_ID, id);
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(now.timestamp()));
        if !c.secrets.is_empty() {
            let signatures = signature::sign(&c.secrets, &event.id, now.timestamp(), &body);
            headers.insert(WEBHOOK_SIGNATURE, to_header_value(signatures));
        }
    }
    if let (true, Some(first)) = (c.scheme.sends_go(), c.secrets.first()) {
        let signature = signature::sign_go(first, &body);
        headers.insert(GO_SIGNATURE, to_header_value(signature));
    }
    let mut request = Request::new(RequestBody::from(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = c.uri.clone();
    *request.headers_mut() = headers;
    Ok(request)
}

/// The body in the configured scheme, at most `max_body_bytes` long.
fn body<P: Serialize>(c: &Config, event: &Event<P>, now: DateTime<Utc>) -> Result<Vec<u8>, Error> {
    let mut body = Vec::with_capacity(512);
    write_body(c, event, now, &mut body).map_err(Error::Serialize)?;
    if body.len() > c.max_body_bytes {
        return Err(Error::TooLarge {
            size: body.len(),
            limit: c.max_body_bytes,
        });
    }
    Ok(body)
}

/// The Go original's body with [`Scheme::GoCompatible`](crate::signature::Scheme),
/// a CloudEvent if configured, otherwise the event's JSON.
fn write_body<P: Serialize>(
    c: &Config,
    event: &Event<P>,
    now: DateTime<Utc>,
    body: &mut Vec<u8>,
) -> serde_json::Result<()> {
    #[cfg(feature = "cloudevents")]
    if let Some(format) = &c.cloudevents {
        return format.write_body(event, body);
    }
    if c.scheme.sends_go() {
        serde_json::to_writer(body, &GoBody::new(event, now))
    } else {
        serde_json::to_writer(body, event)
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

/// Base64 and hex signatures are ASCII, always valid header values; marked
/// sensitive, so that layers on the HTTP leg do not log them.
fn to_header_value(ascii: String) -> HeaderValue {
    let mut value = HeaderValue::try_from(ascii).expect("signatures are base64 or hex ASCII");
    value.set_sensitive(true);
    value
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Retryable;

    #[test]
    fn ids_and_kinds_follow_the_wire_rule() {
        let ok = Event::with_id("order.placed", "evt_01J.x-y", ());
        assert_eq!(wire_id(&ok).unwrap(), "evt_01J.x-y");
        let longest = "x".repeat(wire::MAX_ID_BYTES);
        assert!(
            wire_id(&Event {
                id: longest.as_str().into(),
                ..ok.clone()
            })
            .is_ok()
        );
        for bad in [
            "",
            "has space",
            "tab\t",
            "é",
            &"x".repeat(wire::MAX_ID_BYTES + 1),
        ] {
            let err = wire_id(&Event {
                id: bad.into(),
                ..ok.clone()
            })
            .unwrap_err();
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
    fn go_body_has_the_go_field_order() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let event = Event {
            created_at: at,
            ..Event::with_id("k", "i", serde_json::json!({"a": 1}))
        };
        let json = serde_json::to_string(&GoBody::new(&event, at)).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"k","id":"i","payload":{"a":1},"created_at":"2027-01-15T08:00:00Z","now":"2027-01-15T08:00:00Z"}"#
        );
    }
}
