//! NoopSink passes the conformance suite (it keeps nothing to compare).
mod support;

use eventsink::{Event, NoopSink};
use support::conformance::{self, Destination};

struct Nowhere;

impl<P> Destination<P> for Nowhere {
    type Sink = NoopSink;

    fn sink(&self) -> NoopSink {
        NoopSink::new()
    }

    async fn arrived(&self, _n: usize) -> Option<Vec<Event<P>>> {
        None
    }
}

#[tokio::test]
async fn noop_sink_passes_conformance() {
    conformance::run(|| Nowhere, || Nowhere).await;
}
