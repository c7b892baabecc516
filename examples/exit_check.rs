//! Checks that a program using the queue stops at once when `main`
//! returns: nothing the crate starts (a blocking task, a connection
//! thread, a timer) may hold the runtime's shutdown or the process' exit.
//!
//! The example runs itself as a child process that opens a SQLite queue,
//! builds a webhook sink, publishes one event, spawns a worker, shuts it
//! down and returns from `main`; it measures the time from that return to
//! the child's exit and fails if it exceeds [`MAX_EXIT_DELAY`]. `.ci/run`
//! runs it.
//!
//! Run with `cargo run --example exit_check`.

use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventsink::queue::{SqliteQueue, ThroughTaskQueue};
use eventsink::{BoxError, Event, SinkExt, WebhookSink};
use tower::Layer;

/// Set in the child's environment: run the program instead of checking it.
const CHILD: &str = "EVENTSINK_EXIT_CHECK_CHILD";

/// The longest acceptable time from `main`'s return to the process' exit.
/// 500 ms: a program that stops at once takes about a millisecond here
/// (tearing down the runtime and the process); a task that holds the
/// runtime's shutdown (a blocking task, a timer) takes seconds, and this
/// leaves room for a loaded CI machine.
const MAX_EXIT_DELAY: Duration = Duration::from_millis(500);

fn main() -> Result<ExitCode, BoxError> {
    if std::env::var_os(CHILD).is_some() {
        run_program()?;
        return Ok(ExitCode::SUCCESS);
    }
    let output = Command::new(std::env::current_exe()?)
        .env(CHILD, "1")
        .output()?;
    let exited = since_epoch();
    if !output.status.success() {
        return Err(format!(
            "the program failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let returned: u128 = String::from_utf8(output.stdout)?.trim().parse()?;
    let delay = Duration::from_micros(u64::try_from(exited.saturating_sub(returned))?);
    println!("exit took {delay:?} after main returned (at most {MAX_EXIT_DELAY:?})");
    Ok(if delay > MAX_EXIT_DELAY {
        eprintln!("FAILED: something holds the runtime's shutdown or the process' exit");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The program under test: everything a first app does, then return.
#[tokio::main]
async fn run_program() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    {
        let queue =
            ThroughTaskQueue::new(SqliteQueue::open(dir.path().join("q.db"), "exit").await?);
        // Nothing listens there: the delivery fails and is retried later.
        let webhook = WebhookSink::builder("http://127.0.0.1:9/hooks").build()?;
        let mut sink = queue.layer(webhook.clone());
        let worker = queue.worker(webhook).spawn();
        sink.publish(Event::new("app.started", serde_json::json!({})))
            .await?;
        worker.shutdown().await;
    }
    dir.close()?;
    // The last thing `main` does: the parent measures from here.
    println!("{}", since_epoch());
    Ok(())
}

/// Microseconds since the Unix epoch, comparable between the processes.
fn since_epoch() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}
