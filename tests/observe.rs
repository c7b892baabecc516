//! Tracing through a real SQLite queue to a real loopback receiver: the
//! publisher's trace survives the queue (the delivery span's parent, the
//! webhook's `traceparent` header), every span has its OpenTelemetry
//! fields, and no field holds a payload or a secret.
#![cfg(all(feature = "opentelemetry", feature = "webhook", feature = "sqlite"))]
mod support;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use eventsink::queue::{SqliteQueue, ThroughTaskQueue};
use eventsink::webhook::WebhookSink;
use eventsink::{Event, SinkExt};
use opentelemetry::trace::{SpanId, TraceContextExt, TracerProvider as _};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use support::conformance::ARRIVAL_TIMEOUT;
use support::queue::{fast_schedule, unique_name};
use support::receiver::{Receiver, Reply};
use tower::Layer;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const CARD: &str = "4111-1111-1111-1111";

/// The spans exported through OpenTelemetry by this test binary, and the
/// fields of every closed span as `tracing` recorded them; installed once,
/// globally, so the worker's tasks report too.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("observe-test")))
            .with(FieldRecorder);
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        exporter
    })
}

/// A queue on SQLite delivering to `url` through a signed webhook.
async fn queue(
    dir: &std::path::Path,
    url: String,
) -> (
    String,
    ThroughTaskQueue<SqliteQueue>,
    WebhookSink,
    eventsink::queue::WorkerHandle,
) {
    let name = unique_name("observe");
    let queue = ThroughTaskQueue::new(SqliteQueue::open(dir.join("q.db"), &name).await.unwrap());
    let webhook = WebhookSink::builder(url)
        .secret(SECRET.parse().unwrap())
        .build()
        .unwrap();
    let worker = queue
        .worker(webhook.clone())
        .schedule(fast_schedule(3))
        .poll_interval(Duration::from_millis(10))
        .spawn();
    (name, queue, webhook, worker)
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == Key::from(key.to_owned()))
        .map(|kv| &kv.value)
}

/// The one exported span named `name` about event `id`.
fn exported(name: &str, id: &str) -> SpanData {
    let spans: Vec<SpanData> = exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            attribute(s, "messaging.message.id")
                .map(Value::as_str)
                .as_deref()
                == Some(id)
        })
        .collect();
    assert_eq!(spans.len(), 1, "one {name} span of {id}: {spans:#?}");
    spans.into_iter().next().unwrap()
}

#[tokio::test]
async fn the_publishers_trace_reaches_the_delivery_and_the_receiver() {
    exporter();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, queue, webhook, worker) = queue(dir.path(), receiver.url("/hook")).await;
    let request = tracing::info_span!("http.request");
    let request_context = request.context().span().span_context().clone();
    assert!(
        request_context.is_valid(),
        "the OpenTelemetry layer is installed"
    );
    queue
        .layer(webhook)
        .publish(Event::with_id(
            "order.placed",
            "evt_traced",
            json!({"n": 1}),
        ))
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);
    let got = receiver.wait_for(1, ARRIVAL_TIMEOUT).await;
    worker.shutdown().await;

    let trace_id = request_context.trace_id();
    let publish = exported("eventsink.publish", "evt_traced");
    let process = exported("eventsink.process", "evt_traced");
    let http = exported("webhook", "evt_traced");
    assert_eq!(publish.span_context.trace_id(), trace_id);
    assert_eq!(publish.parent_span_id, request_context.span_id());
    assert_eq!(
        process.span_context.trace_id(),
        trace_id,
        "across the queue"
    );
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert_eq!(http.span_context.trace_id(), trace_id);
    assert_eq!(http.parent_span_id, process.span_context.span_id());

    // The receiver got the webhook span's context: version, trace, span, sampled.
    let traceparent = got[0].header("traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent:?}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], format!("{trace_id:032x}"));
    assert_eq!(
        SpanId::from_hex(parts[2]).unwrap(),
        http.span_context.span_id()
    );
    assert_eq!(parts[3], "01");
}

#[tokio::test]
async fn every_span_has_its_fields_and_none_holds_a_payload_or_a_secret() {
    exporter();
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(503), Reply::status(204), Reply::status(410)]);
    let dir = tempfile::tempdir().unwrap();
    let (name, queue, webhook, worker) =
        queue(dir.path(), receiver.url("/hook?token=query-secret")).await;
    let mut sink = queue.layer(webhook);
    // A: 503, then delivered. B (after A): 410, a dead letter, replayed.
    let payload = json!({ "card": CARD });
    sink.publish(Event::with_id(
        "order.placed",
        "evt_fields_a",
        payload.clone(),
    ))
    .await
    .unwrap();
    receiver.wait_for(2, ARRIVAL_TIMEOUT).await;
    sink.publish(Event::with_id("order.placed", "evt_fields_b", payload))
        .await
        .unwrap();
    let letters = SqliteQueue::<serde_json::Value>::open(dir.path().join("q.db"), &name)
        .await
        .unwrap()
        .dead_letters();
    letters.wait_for(1, ARRIVAL_TIMEOUT).await.unwrap();
    assert!(
        letters
            .replay(&format!("{name}:order.placed:evt_fields_b"))
            .await
            .unwrap()
    );
    receiver.wait_for(4, ARRIVAL_TIMEOUT).await;
    worker.shutdown().await;

    let spans = closed_spans();
    let has = |span: &str, fields: &[&str]| {
        assert!(
            spans
                .iter()
                .any(|(n, f)| n == span && fields.iter().all(|x| f.contains(x))),
            "no {span} span with {fields:?} among {spans:#?}"
        )
    };
    let queue_field = format!("messaging.destination.name={name}");
    let common = ["messaging.system=eventsink", queue_field.as_str()];
    has(
        "eventsink.publish",
        &[
            common[0],
            common[1],
            "messaging.operation.type=create",
            "messaging.message.id=evt_fields_a",
            "eventsink.event.kind=order.placed",
            "eventsink.published=stored",
        ],
    );
    has(
        "eventsink.send",
        &[
            common[0],
            common[1],
            "messaging.operation.type=send",
            "messaging.batch.message_count=1",
        ],
    );
    has(
        "eventsink.process",
        &[
            common[0],
            common[1],
            "messaging.operation.type=process",
            "messaging.message.id=evt_fields_a",
            "eventsink.attempt=1",
            "eventsink.outcome=retrying",
            "eventsink.next_due=",
            "eventsink.duration_ms=",
        ],
    );
    has(
        "eventsink.process",
        &[
            "messaging.message.id=evt_fields_a",
            "eventsink.attempt=2",
            "eventsink.outcome=delivered",
        ],
    );
    has(
        "eventsink.process",
        &[
            "messaging.message.id=evt_fields_b",
            "eventsink.attempt=1",
            "eventsink.outcome=dead",
        ],
    );
    has(
        "eventsink.dead_letter",
        &[
            common[1],
            "messaging.operation.type=settle",
            "messaging.message.id=evt_fields_b",
            "eventsink.death.cause=permanent",
        ],
    );
    has(
        "eventsink.replay",
        &[
            common[1],
            "messaging.operation.type=send",
            "messaging.batch.message_count=1",
        ],
    );
    has(
        "webhook",
        &[
            "messaging.message.id=evt_fields_b",
            "http.request.method=POST",
            "http.response.status_code=410",
            "server.address=127.0.0.1",
        ],
    );
    for (span, fields) in &spans {
        for secret in [CARD, SECRET, "query-secret", "card"] {
            assert!(
                !fields.contains(secret),
                "{secret} in the {span} span: {fields}"
            );
        }
    }
}

/// Every closed span so far: its name and its fields (`name=value ...`).
fn closed_spans() -> Vec<(String, String)> {
    CLOSED.lock().unwrap().clone()
}

static CLOSED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Records the fields of every span, given at its start or recorded later.
struct FieldRecorder;

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }
}

impl<S> tracing_subscriber::Layer<S> for FieldRecorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let fields = span
            .extensions()
            .get::<Fields>()
            .map(|f| {
                let mut all: Vec<String> = f.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
                all.sort();
                all.join(" ")
            })
            .unwrap_or_default();
        CLOSED
            .lock()
            .unwrap()
            .push((span.name().to_owned(), fields));
    }
}
