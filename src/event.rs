//! The [`Event`]: what happened (`kind`), which instance (`id`), when
//! (`created_at`) and the data (`payload`).
//!
//! Every sink takes an `Event<P>`. The JSON form has exactly the fields `kind`,
//! `id`, `created_at` (RFC 3339, UTC) and `payload`, as the Go original has, so
//! receivers of either library read the same document.
//!
//! Cloning is cheap whatever the payload: the `kind` and `id` are `Arc<str>` and
//! the payload sits behind an `Arc`, so the per-attempt clone that
//! [`tower::retry`] makes costs three reference-count increments instead of a
//! deep copy of the payload (`cargo bench --bench throughput -- event_clone`
//! measures both).
//!
//! ```
//! use eventsink::Event;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct OrderPlaced {
//!     order_id: u64,
//!     total_cents: u64,
//! }
//!
//! let event = Event::new("order.placed", OrderPlaced { order_id: 7, total_cents: 1250 });
//! assert_eq!(event.payload.order_id, 7);
//!
//! let json = serde_json::to_string(&event).unwrap();
//! let back: Event<OrderPlaced> = serde_json::from_str(&json).unwrap();
//! assert_eq!(back, event);
//! ```

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

/// One occurrence of something that happened in the application.
///
/// `P` is the payload type: `serde_json::Value` by default, or any
/// `Serialize + DeserializeOwned` type, which survives a queue round trip
/// unchanged (the Go original degrades structs to maps).
///
/// Delivery is at-least-once, so receivers deduplicate by [`id`](Event::id):
/// publish the same event again (same id) rather than a new one when you retry
/// by hand.
///
/// ```
/// use eventsink::Event;
/// use serde_json::json;
///
/// let event = Event::new("user.signed_up", json!({ "user_id": 42 }));
/// assert_eq!(&*event.kind, "user.signed_up");
/// assert_eq!(event.payload["user_id"], 42);
/// ```
#[derive(Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Event<P = serde_json::Value> {
    /// What happened, e.g. `order.placed`. Receivers route on it.
    pub kind: Arc<str>,
    /// This occurrence's unique id: a UUID v7 from [`Event::new`], or your own
    /// from [`Event::with_id`]. Receivers deduplicate on it.
    pub id: Arc<str>,
    /// When it happened, UTC; serialised as RFC 3339.
    pub created_at: DateTime<Utc>,
    /// The event's data, shared so that clones do not copy it.
    pub payload: Arc<P>,
}

impl<P> Event<P> {
    /// An event of `kind` with a fresh UUID v7 id, created now.
    ///
    /// The time is truncated to microseconds, the precision every queue
    /// backend stores, so an event compares equal after a round trip.
    ///
    /// ```
    /// let event = eventsink::Event::new("ping", ());
    /// assert_eq!(event.id.len(), 36);
    /// ```
    pub fn new(kind: impl Into<Arc<str>>, payload: P) -> Self {
        Event {
            kind: kind.into(),
            id: uuid::Uuid::now_v7().to_string().into(),
            created_at: now(),
            payload: Arc::new(payload),
        }
    }

    /// An event of `kind` with the id `id`, created now: for publishing an
    /// event again that you already know (idempotent retries by hand,
    /// imports) and for tests. The fields are public; set `created_at`
    /// with struct update syntax.
    ///
    /// ```
    /// use chrono::{TimeZone, Utc};
    /// use eventsink::Event;
    ///
    /// let event = Event::with_id("ping", "evt_1", ());
    /// assert_eq!(&*event.id, "evt_1");
    ///
    /// let at = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
    /// let imported = Event { created_at: at, ..Event::with_id("ping", "evt_2", ()) };
    /// assert_eq!(imported.created_at, at);
    /// ```
    pub fn with_id(kind: impl Into<Arc<str>>, id: impl Into<Arc<str>>, payload: P) -> Self {
        Event {
            kind: kind.into(),
            id: id.into(),
            created_at: now(),
            payload: Arc::new(payload),
        }
    }
}

/// Now, truncated to microseconds (the precision every queue backend
/// stores, so an event compares equal after a round trip).
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Cheap whatever `P` is: no `P: Clone` needed, the payload is shared.
impl<P> Clone for Event<P> {
    fn clone(&self) -> Self {
        Event {
            kind: Arc::clone(&self.kind),
            id: Arc::clone(&self.id),
            created_at: self.created_at,
            payload: Arc::clone(&self.payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn json_field_names_and_rfc3339_utc_time() {
        let at = Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap();
        let event = Event {
            created_at: at,
            ..Event::with_id("a.b", "evt_1", json!({"x": 1}))
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            json!({"kind": "a.b", "id": "evt_1", "created_at": "2026-11-27T12:00:00Z", "payload": {"x": 1}})
        );
    }

    #[test]
    fn new_ids_are_unique_uuid_v7() {
        let a = Event::new("k", ());
        let b = Event::new("k", ());
        assert_ne!(a.id, b.id);
        let parsed = uuid::Uuid::parse_str(&a.id).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
    }

    #[test]
    fn clone_shares_the_payload() {
        let event = Event::new("k", json!({"big": "x".repeat(1000)}));
        let copy = event.clone();
        assert!(Arc::ptr_eq(&event.payload, &copy.payload));
    }
}
