//! Deliver application events reliably, as tower services.
//!
//! An [`Event`] (`kind`, `id`, `created_at`, `payload`) is published to a
//! *sink*: nowhere ([`NoopSink`]), into memory for tests ([`RecordingSink`]),
//! into files for local development ([`FsSink`]), or to an HTTP endpoint as a
//! signed webhook ([`webhook::WebhookSink`]). Every sink is a
//! [`tower::Service`], so tower's retry, timeout, buffer, rate and concurrency
//! layers compose around it, and it fits axum and hyper stacks.
//! [`queue::ThroughTaskQueue`] puts a sink behind a durable job queue (apalis:
//! in memory, SQLite, Postgres, Redis), so a receiver that is down for an
//! hour still gets every event, and [`verify::VerifyWebhookLayer`] is the
//! receiving half that checks what [`webhook::WebhookSink`] sends.
//! [`FanOut`] publishes one event to several sinks at once, or only to those
//! subscribed to its kind (`invoice.paid`, `order.*`); with the queue,
//! `fanout::QueuedFanOut` gives each destination a queue of its own.
//!
//! # Features
//!
//! | feature | what it enables |
//! | --- | --- |
//! | `webhook` (default) | [`webhook::WebhookSink`], signed HTTP delivery over reqwest (rustls) or any HTTP client service, under tower layers |
//! | `cloudevents` | [`webhook::WebhookSink`] sends CloudEvents 1.0, binary or structured mode |
//! | `verify` (default) | [`verify::VerifyWebhookLayer`], the receiver-side checks |
//! | `axum` | [`verify::VerifiedWebhook`] and [`verify::Verified`] as axum extractors |
//! | `sqlite` (default) | [`queue`] with its SQLite backend, the embedded default |
//! | `postgres` | [`queue`]'s Postgres backend |
//! | `redis` | [`queue`]'s Redis backend |
//! | `redis-replay` | a Redis replay guard for [`verify`], shared by several receiver processes |
//! | `queue` | [`queue`] with only the in-memory backend (implied by the three above) |
//! | `metrics` | counters, histograms and a queue-depth gauge through the `metrics` facade (module `metrics`) |
//! | `opentelemetry` | W3C trace context through the queue and in webhook requests ([`trace`]) |
//! | `test-util` | failure injection for tests: `RecordingSink::fail_next`, `Error::Simulated` |
//!
//! # The recommended stack
//!
//! ```
//! use std::time::Duration;
//! use eventsink::{Event, FsSink, RetryPolicy, SinkExt};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), eventsink::BoxError> {
//! # let tmp = tempfile::tempdir()?;
//! # let dir = tmp.path();
//! let sink = ServiceBuilder::new()
//!     .buffer(1024)                        // outermost: makes the stack Clone
//!     .retry(RetryPolicy::default())       // retryable errors, jittered backoff
//!     .timeout(Duration::from_secs(15))    // per attempt, inside the retry
//!     .service(FsSink::new(dir)?);
//!
//! let mut publisher = sink.clone();        // one clone per task
//! publisher.publish(Event::new("order.placed", serde_json::json!({"order_id": 7}))).await?;
//! # Ok(()) }
//! ```
//!
//! Why this order:
//!
//! - **Timeout inside retry.** The timeout bounds each attempt; a slow attempt
//!   fails with a transient error and the retry layer tries again. A timeout
//!   outside the retry would bound the whole series instead, and is worth
//!   adding only if you also want an overall deadline.
//! - **Buffer outermost.** `Buffer` runs the stack on its own task behind a
//!   bounded channel, so the handle is cheap to clone for every publisher,
//!   and its bound gives backpressure: publishers wait when it is full.
//!   Set the bound at least to the number of concurrent publishers.
//! - **Errors.** `Timeout` and `Buffer` box their errors into [`BoxError`];
//!   its [`Retryable`] implementation tells whether any of them is worth
//!   retrying. [`RetryPolicy`] retries any service whose error is
//!   [`Retryable`], and describes its waits with a [`Backoff`], as the
//!   queue's persisted retries do.
//!
//! # Delivery guarantee
//!
//! Delivery is **at-least-once**: an event may arrive more than once (a
//! retry after a timeout whose first attempt did arrive), so receivers
//! deduplicate by `id`. In-process layers are not durable: events waiting in
//! a `Buffer` or between retries are lost if the process stops. A publish
//! that you abandon (drop, or time out around `publish`) after the buffer
//! accepted it may still be delivered.
//!
//! # Relation to the Go original
//!
//! The behaviour is ported from a Go package (`Sink.PublishEvent`,
//! `NewNoopSink`, `NewFsSink`, `RecordingSink.AssertPublished`, ...). The
//! JSON form of an event is the same. Where the Go code ignores errors (the
//! file sink's `MkdirAll`) or trusts its input (file names built from `kind`
//! and `id`), this crate reports and refuses instead.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    unreachable_pub,
    rust_2018_idioms,
    missing_debug_implementations
)]

pub mod backoff;
#[cfg(any(feature = "queue", feature = "verify"))]
#[macro_use]
mod macros;

pub mod error;
pub mod event;
pub mod fanout;
pub mod fs;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod noop;
#[cfg(feature = "queue")]
pub mod queue;
pub mod recording;
pub mod retry;
#[cfg(feature = "signing")]
pub mod signature;
pub mod sink;
pub mod trace;
#[cfg(feature = "verify")]
pub mod verify;
#[cfg(feature = "webhook")]
pub mod webhook;
pub mod wire;

pub use backoff::Backoff;
pub use error::{BoxError, Error, Retryable};
pub use event::Event;
pub use fanout::FanOut;
pub use fs::FsSink;
pub use noop::NoopSink;
#[cfg(feature = "queue")]
pub use queue::ThroughTaskQueue;
pub use recording::{RecordingSink, WaitTimedOut};
pub use retry::RetryPolicy;
pub use sink::{BoxSink, Publish, Sink, SinkExt};
#[cfg(feature = "verify")]
pub use verify::VerifyWebhookLayer;
#[cfg(feature = "webhook")]
pub use webhook::WebhookSink;

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
