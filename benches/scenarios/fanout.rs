//! Scenarios of the fan-out: its overhead over calling the destinations
//! directly.

use std::hint::black_box;

use eventsink::fanout::FanOut;
use eventsink::{Event, NoopSink, SinkExt};
use serde_json::json;

use crate::harness::{Options, Scenario, paired, per_second, report, runtime, timed};

/// Destinations of `fanout_4`.
const DESTINATIONS: usize = 4;

pub fn all() -> Vec<Scenario> {
    vec![Scenario {
        name: "fanout_4",
        run: fanout_4,
    }]
}

/// One event to 4 `NoopSink`s through `FanOut`, against the same 4 sinks
/// called one after the other in a loop. Both clone the event once per
/// destination.
fn fanout_4(options: &Options) {
    let count = options.size(200_000, 2_000_000);
    let rt = runtime();
    let event = Event::new("bench.fanout", json!({"order_id": 7, "total_cents": 1250}));
    let mut fanout = (0..DESTINATIONS)
        .fold(FanOut::builder(), |b, n| {
            b.to(format!("noop-{n}"), NoopSink::new())
        })
        .build()
        .expect("fan-out");
    let mut sinks = [NoopSink::new(); DESTINATIONS];
    let m = paired(
        || {
            let (_, elapsed) = timed(|| {
                rt.block_on(async {
                    for _ in 0..count {
                        let event = black_box(&event).clone();
                        fanout.publish(event).await.expect("noop fan-out");
                    }
                })
            });
            per_second(count, elapsed)
        },
        || {
            let (_, elapsed) = timed(|| {
                rt.block_on(async {
                    for _ in 0..count {
                        for sink in &mut sinks {
                            let event = black_box(&event).clone();
                            sink.publish(event).await.expect("noop publish");
                        }
                    }
                })
            });
            per_second(count, elapsed)
        },
    );
    report(
        "fanout_4",
        m.ours,
        m.baseline,
        m.ratio,
        "events/s",
        "the 4 sinks called in a loop",
    );
}
