//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;
#[cfg(feature = "test-util")]
pub mod lease;
#[cfg(feature = "test-util")]
pub mod queue;
pub mod receiver;

use std::path::Path;

use eventsink::Event;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Ends the test process if it is still alive after `limit`: a deadlocked
/// test then fails with `message` instead of hanging CI. Dropping it
/// disarms it.
pub struct Watchdog {
    _disarm: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    pub fn new(limit: std::time::Duration, message: &'static str) -> Self {
        let (disarm, armed) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(limit) {
                eprintln!("watchdog: {message} (still running after {limit:?})");
                std::process::exit(101);
            }
        });
        Watchdog { _disarm: disarm }
    }
}

/// A typed payload, to check that structs survive every sink unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: u64,
    pub customer: String,
    pub lines: Vec<OrderLine>,
    pub note: Option<String>,
}

/// One line of [`OrderPlaced`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: u32,
    pub price_cents: i64,
}

/// An order with a few lines and characters that need escaping.
pub fn order(order_id: u64) -> OrderPlaced {
    OrderPlaced {
        order_id,
        customer: "Zoë \"the tester\" <zoe@example.com>".into(),
        lines: vec![
            OrderLine {
                sku: "A-1".into(),
                quantity: 2,
                price_cents: 1250,
            },
            OrderLine {
                sku: "B-2".into(),
                quantity: 1,
                price_cents: -300,
            },
        ],
        note: None,
    }
}

/// Reads back every `*.json` event file in `dir`, sorted by id.
pub fn read_event_files<P: DeserializeOwned>(dir: &Path) -> Vec<Event<P>> {
    let mut events: Vec<Event<P>> = std::fs::read_dir(dir)
        .expect("read event directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let bytes = std::fs::read(&path).expect("read event file");
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{} is not an event: {e}", path.display()))
        })
        .collect();
    events.sort_by(|a, b| a.id.cmp(&b.id));
    events
}

/// Asserts that `err` is a retryable transport error, timed out or not.
pub fn assert_transient_transport(err: &eventsink::Error, timed_out: bool) {
    assert!(
        matches!(err, eventsink::Error::Transport { timed_out: t, .. } if *t == timed_out),
        "expected a transport error (timed out: {timed_out}), got {err:?}"
    );
    assert!(eventsink::Retryable::is_retryable(err), "{err}");
}
