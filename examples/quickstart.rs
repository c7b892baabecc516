//! Publishes a few events through the recommended stack into a directory,
//! then lists what was written.
//!
//! Run with `cargo run --example quickstart`; no server is needed.

use std::time::Duration;

use eventsink::{BoxError, Event, FsSink, RetryPolicy, SinkExt};
use serde::Serialize;
use tower::ServiceBuilder;

#[derive(Serialize)]
struct OrderPlaced {
    order_id: u64,
    total_cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = std::env::temp_dir().join("eventsink-quickstart");
    let sink = ServiceBuilder::new()
        .buffer(64)
        .retry(RetryPolicy::default())
        .timeout(Duration::from_secs(15))
        .service(FsSink::new(&dir)?);

    let events: Vec<_> = (1..=5)
        .map(|order_id| {
            let total_cents = 1250 * order_id;
            Event::new(
                "order.placed",
                OrderPlaced {
                    order_id,
                    total_cents,
                },
            )
        })
        .collect();

    // One clone of the stack per publishing task, as an application would.
    let mut publishers = tokio::task::JoinSet::new();
    for event in events.clone() {
        let mut sink = sink.clone();
        publishers.spawn(async move { sink.publish(event).await });
    }
    while let Some(published) = publishers.join_next().await {
        published??;
    }

    println!("published {} events into {}:", events.len(), dir.display());
    for event in &events {
        println!("  {}", FsSink::file_name(event)?);
    }
    let last = FsSink::file_name(&events[events.len() - 1])?;
    println!("\n{last}:\n{}", std::fs::read_to_string(dir.join(&last))?);
    Ok(())
}
