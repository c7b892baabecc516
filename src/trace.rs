//! Tracing: the spans this crate opens, their fields, and how a trace
//! survives the queue (W3C `traceparent`, feature `opentelemetry`).
//!
//! Every span follows the OpenTelemetry semantic conventions where one
//! exists ([messaging] for the queue, [HTTP client] for the webhook), so an
//! OpenTelemetry exporter (through `tracing-opentelemetry`) shows them as
//! any other messaging system's, and a plain `tracing_subscriber::fmt`
//! prints the same names. No field holds a secret (no signing key, no
//! `Authorization`, no URL query or credentials) or a payload.
//!
//! | span | when | `messaging.operation.type` | `otel.kind` | fields besides `messaging.system = "eventsink"` |
//! |---|---|---|---|---|
//! | `eventsink.publish` | each publish | `create` | producer | `messaging.destination.name` (queue), `messaging.message.id` (event id), `eventsink.event.kind`, `eventsink.published` (`stored` / `already_queued`) |
//! | `eventsink.send` | each group-commit batch written | `send` | producer | `messaging.destination.name`, `messaging.batch.message_count` |
//! | `eventsink.process` | each delivery attempt of a queued event | `process` | consumer | `messaging.destination.name`, `messaging.message.id`, `eventsink.event.kind`, `eventsink.attempt`, `eventsink.outcome` (`delivered` / `retrying` / `dead`), `eventsink.next_due` (RFC 3339, when retrying), `eventsink.duration_ms` |
//! | `eventsink.dead_letter` | an event becomes a dead letter (inside `eventsink.process`) | `settle` | internal | `messaging.destination.name`, `messaging.message.id`, `eventsink.death.cause` |
//! | `eventsink.replay` | [`DeadLetters::replay`](crate::queue::DeadLetters::replay), `replay_all` | `send` | producer | `messaging.destination.name`, `messaging.batch.message_count` |
//! | `webhook` | each HTTP attempt of [`WebhookSink`](crate::webhook::WebhookSink) | — | client | `http.request.method`, `url.full` (no credentials, query or fragment; the path only with `show_path`), `server.address`, `http.response.status_code`, `messaging.message.id`, `eventsink.event.kind`, `eventsink.duration_ms` |
//!
//! `publish` and the legacy `messaging.operation` values are deprecated in
//! the conventions (v1.26+); `create` is the span of one message, `send`
//! the write of a batch.
//!
//! # Trace context through the queue
//!
//! With the feature `opentelemetry`, and a `tracing-opentelemetry` layer
//! installed, a publish stores its span's context with the job as a W3C
//! `traceparent` ([`QueuedEvent::traceparent`](crate::queue::QueuedEvent::traceparent)),
//! the delivery span (`eventsink.process`) takes it as its parent (even in
//! another process, hours later), and [`WebhookSink`](crate::webhook::WebhookSink)
//! sends the `webhook` span's context as a `traceparent` header, so the
//! receiver's spans join the publisher's trace. Without the feature (or
//! without the layer) nothing is stored and no header is sent.
//!
//! ```
//! # #[cfg(feature = "opentelemetry")] {
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("app")));
//! let _guard = tracing::subscriber::set_default(subscriber);
//! // publishes made here carry their trace through the queue
//! # }
//! ```
//!
//! [messaging]: https://opentelemetry.io/docs/specs/semconv/messaging/messaging-spans/
//! [HTTP client]: https://opentelemetry.io/docs/specs/semconv/http/http-spans/

/// The value of `messaging.system` on every span of the queue.
pub const MESSAGING_SYSTEM: &str = "eventsink";

/// The name of the W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C `traceparent` of `span` (`00-{trace id}-{span id}-{flags}`),
/// if an OpenTelemetry layer gave it a valid context.
#[cfg(all(feature = "opentelemetry", any(feature = "queue", feature = "webhook")))]
pub(crate) fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Without the feature `opentelemetry`: never a context.
#[cfg(all(
    not(feature = "opentelemetry"),
    any(feature = "queue", feature = "webhook")
))]
#[inline(always)]
pub(crate) fn traceparent(_span: &tracing::Span) -> Option<String> {
    None
}

/// Makes the context of `traceparent` the parent of `span`, which must be
/// new (not yet entered). An unreadable value is ignored (logged at
/// debug): a trace is worth less than the delivery.
#[cfg(all(feature = "opentelemetry", feature = "queue"))]
pub(crate) fn set_parent(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    match parse(traceparent) {
        Some(sc) => {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
        }
        None => tracing::debug!(
            traceparent,
            "ignored a stored traceparent that does not parse"
        ),
    }
}

/// Without the feature `opentelemetry`: nothing.
#[cfg(all(not(feature = "opentelemetry"), feature = "queue"))]
#[inline(always)]
pub(crate) fn set_parent(_span: &tracing::Span, _traceparent: &str) {}

/// The span context of a version-00 `traceparent`; `None` unless it is
/// well formed and valid (non-zero ids).
#[cfg(all(feature = "opentelemetry", feature = "queue"))]
fn parse(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if *version != "00" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

#[cfg(all(test, feature = "opentelemetry", feature = "queue"))]
mod tests {
    use super::*;

    #[test]
    fn parses_the_w3c_example_and_refuses_the_rest() {
        let sc = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            format!("{:032x}", sc.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format!("{:016x}", sc.span_id()), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
