//! What the webhook sender and receiver agree on: the header names and the
//! one rule for event ids and kinds.
//!
//! [`WebhookSink`](crate::webhook::WebhookSink) refuses, before sending
//! anything, every event this rule refuses, and
//! [`VerifyWebhookLayer`](crate::verify::VerifyWebhookLayer) accepts every
//! id and kind it accepts. Both call the functions below, so the two sides
//! cannot drift apart: an event the sender sends is never answered `400`
//! (a permanent failure, so a dead letter) for its id.
//!
//! This module is compiled with every feature set, because [`Event`] is:
//! an application can check its ids with [`check_event`] without the
//! `webhook` or `verify` features (for example before enqueueing into a
//! queue whose worker delivers webhooks).
//!
//! ```
//! use eventsink::{Event, wire};
//!
//! // Ids may contain '.', as the Standard Webhooks reference libraries accept.
//! let event = Event::with_id("order.placed", "evt_01J.x-y", ());
//! assert!(wire::check_event(&event).is_ok());
//!
//! // A header cannot carry a space or non-ASCII text.
//! let err = wire::check_id("évènement 1").unwrap_err();
//! assert_eq!(err.to_string(), "event id: it contains a character that is not visible ASCII \
//!     (a space, a control character or a non-ASCII character)");
//! assert_eq!(wire::WEBHOOK_ID, "webhook-id");
//! ```
//!
//! # The rule
//!
//! - **id**: 1 to [`MAX_ID_BYTES`] bytes of visible ASCII (`!` to `~`):
//!   letters, digits and punctuation, `.` included; no spaces, control or
//!   non-ASCII characters. The id travels in the `webhook-id` header, where
//!   only visible ASCII survives unchanged (proxies trim spaces at the
//!   ends), and it is the replay guard's key. UUIDs (36 bytes), KSUID-based
//!   `msg_…` ids (31) and ULIDs (26) all fit. The Standard Webhooks reference
//!   libraries check nothing about the id beyond it being a header value; a
//!   `.` in it is harmless because the signed content
//!   `"{id}.{timestamp}.{body}"` can only be split differently by moving
//!   digits from the id into the timestamp and the timestamp into the body,
//!   which gives a body that starts with a digit: never the JSON object the
//!   sender signed, and never an [`Event`].
//! - **kind**: 1 to [`MAX_KIND_BYTES`] bytes without control characters;
//!   any other Unicode is fine. The kind travels only inside the JSON body.

use std::fmt;

use crate::Event;

/// Header of the Standard Webhooks message id (the event id).
pub const WEBHOOK_ID: &str = "webhook-id";

/// Header of the Standard Webhooks attempt timestamp, unix seconds.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";

/// Header of the Standard Webhooks signatures, `v1,<base64>` entries
/// separated by spaces.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Header of the Go original's signature, lowercase hex.
pub const GO_SIGNATURE: &str = "signature";

/// Longest event id, in bytes: 256. Ids are UUIDs (36 bytes) or `msg_` +
/// KSUID (31) in practice; the bound keeps headers and the replay guard's
/// memory small.
pub const MAX_ID_BYTES: usize = 256;

/// Longest event kind, in bytes: 256, the bound Svix puts on event type
/// names.
pub const MAX_KIND_BYTES: usize = 256;

/// An event's id or kind breaks the [rule](self#the-rule).
///
/// ```
/// let err = eventsink::wire::check_kind("").unwrap_err();
/// assert_eq!(err.field(), "kind");
/// assert_eq!(err.problem(), "it is empty");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidField {
    field: &'static str,
    problem: &'static str,
}

impl InvalidField {
    /// Which field: `"id"` or `"kind"`.
    ///
    /// ```
    /// assert_eq!(eventsink::wire::check_id("").unwrap_err().field(), "id");
    /// ```
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it, such as `"it is empty"`.
    ///
    /// ```
    /// let long = "x".repeat(257);
    /// assert_eq!(eventsink::wire::check_id(&long).unwrap_err().problem(), "it is longer than 256 bytes");
    /// ```
    pub fn problem(&self) -> &'static str {
        self.problem
    }
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event {}: {}", self.field, self.problem)
    }
}

impl std::error::Error for InvalidField {}

/// Checks an event id against the [rule](self#the-rule).
///
/// # Errors
///
/// [`InvalidField`] saying what is wrong.
///
/// ```
/// use eventsink::wire::check_id;
/// assert!(check_id("0194f3c2-7d1e-7a51-9a3e-1c2b3d4e5f60").is_ok());
/// assert!(check_id("evt_01J.x-y").is_ok());
/// assert!(check_id("has space").is_err());
/// ```
pub fn check_id(id: &str) -> Result<(), InvalidField> {
    let problem = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_ID_BYTES {
        "it is longer than 256 bytes"
    } else if !id.bytes().all(|b| b.is_ascii_graphic()) {
        "it contains a character that is not visible ASCII \
         (a space, a control character or a non-ASCII character)"
    } else {
        return Ok(());
    };
    Err(InvalidField {
        field: "id",
        problem,
    })
}

/// Checks an event kind against the [rule](self#the-rule).
///
/// # Errors
///
/// [`InvalidField`] saying what is wrong.
///
/// ```
/// use eventsink::wire::check_kind;
/// assert!(check_kind("order.placed").is_ok());
/// assert!(check_kind("commande passée").is_ok());
/// assert!(check_kind("line\nbreak").is_err());
/// ```
pub fn check_kind(kind: &str) -> Result<(), InvalidField> {
    let problem = if kind.is_empty() {
        "it is empty"
    } else if kind.len() > MAX_KIND_BYTES {
        "it is longer than 256 bytes"
    } else if kind.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(InvalidField {
        field: "kind",
        problem,
    })
}

/// Checks an event's id and kind: what
/// [`WebhookSink`](crate::webhook::WebhookSink) checks before sending and
/// the [`Verified`](crate::verify::Verified) extractor after receiving.
///
/// # Errors
///
/// [`InvalidField`] for the id first, then the kind.
///
/// ```
/// use eventsink::{Event, wire};
/// assert!(wire::check_event(&Event::new("ping", ())).is_ok());
/// assert_eq!(wire::check_event(&Event::new("", ())).unwrap_err().field(), "kind");
/// ```
pub fn check_event<P>(event: &Event<P>) -> Result<(), InvalidField> {
    check_id(&event.id)?;
    check_kind(&event.kind)
}

/// [`check_event`] as the crate's [`Error::InvalidEvent`](crate::Error::InvalidEvent),
/// with the value that was refused: what the senders (the webhook sink,
/// the task queue's publishing service) answer.
#[cfg(any(feature = "webhook", feature = "queue"))]
pub(crate) fn validate<P>(event: &Event<P>) -> Result<(), crate::Error> {
    check_event(event).map_err(|e| {
        let value = if e.field() == "id" {
            &event.id
        } else {
            &event.kind
        };
        crate::Error::InvalidEvent {
            field: e.field(),
            value: value.to_string(),
            problem: e.problem(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_problems_name_the_constants() {
        let id = check_id(&"x".repeat(MAX_ID_BYTES + 1)).unwrap_err();
        assert!(id.problem().contains(&MAX_ID_BYTES.to_string()));
        let kind = check_kind(&"x".repeat(MAX_KIND_BYTES + 1)).unwrap_err();
        assert!(kind.problem().contains(&MAX_KIND_BYTES.to_string()));
        assert!(check_id(&"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(check_kind(&"x".repeat(MAX_KIND_BYTES)).is_ok());
    }

    #[test]
    fn ids_are_visible_ascii_dots_included() {
        for good in [
            "evt_01J.x-y",
            ".",
            "a.b.c",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            "!~",
        ] {
            assert!(check_id(good).is_ok(), "{good:?}");
        }
        for bad in ["", " ", "a b", "tab\t", "é", "\u{7f}", "a\nb"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_are_unicode_without_control_characters() {
        for good in ["order.placed", "commande passée", "注文", " spaced "] {
            assert!(check_kind(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a\nb", "\u{0}", "\u{85}"] {
            assert!(check_kind(bad).is_err(), "{bad:?}");
        }
    }
}
