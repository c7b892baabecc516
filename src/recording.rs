//! [`RecordingSink`]: keeps published events in memory, for tests.
//!
//! Hand a clone to the code under test and keep one to look at what it
//! published. [`assert_published`](RecordingSink::assert_published) checks
//! events as the Go original's `AssertPublished` does: the count, then per
//! position the `kind` and `payload`, ignoring `id` and `created_at`, which
//! are random in real code. [`wait_for`](RecordingSink::wait_for) waits for
//! events that arrive asynchronously (through a queue worker), and
//! with the `test-util` feature, `fail_next` makes the next calls fail, to
//! test retries.
//!
//! ```
//! use eventsink::{Event, RecordingSink, SinkExt};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let recorder = RecordingSink::new();
//! let mut sink = recorder.clone(); // what the application holds
//! sink.publish(Event::new("user.signed_up", json!({"user_id": 1}))).await.unwrap();
//!
//! recorder.assert_published(&[Event::new("user.signed_up", json!({"user_id": 1}))]);
//! # }
//! ```

use std::fmt;
use std::fmt::Write as _;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tower::Service;

use crate::{Error, Event};

/// A sink that records every event it accepts. Cloning gives another handle
/// to the same record; it is safe to publish from many tasks at once.
pub struct RecordingSink<P = serde_json::Value> {
    shared: Arc<Shared<P>>,
}

struct Shared<P> {
    state: Mutex<State<P>>,
    /// How many events have been recorded; wakes [`RecordingSink::wait_for`].
    recorded: watch::Sender<usize>,
}

struct State<P> {
    events: Vec<Event<P>>,
    calls: usize,
    /// Failures injected by `fail_next` (feature `test-util`).
    #[cfg(feature = "test-util")]
    failing: Failing,
}

/// The next `left` calls fail with `Error::Simulated`.
#[cfg(feature = "test-util")]
#[derive(Debug, Clone, Copy, Default)]
struct Failing {
    left: usize,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl<P> RecordingSink<P> {
    /// An empty recorder.
    ///
    /// ```
    /// let recorder: eventsink::RecordingSink = eventsink::RecordingSink::new();
    /// assert!(recorder.events().is_empty());
    /// ```
    pub fn new() -> Self {
        RecordingSink {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    events: Vec::new(),
                    calls: 0,
                    #[cfg(feature = "test-util")]
                    failing: Failing::default(),
                }),
                recorded: watch::channel(0).0,
            }),
        }
    }

    /// The events recorded so far, in the order they were accepted.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use eventsink::{Event, RecordingSink, SinkExt};
    /// let mut recorder = RecordingSink::new();
    /// recorder.publish(Event::new("a", 1)).await.unwrap();
    /// assert_eq!(*recorder.events()[0].payload, 1);
    /// # }
    /// ```
    pub fn events(&self) -> Vec<Event<P>> {
        self.lock().events.clone()
    }

    /// How many times the sink was called, failed calls included: a sink
    /// that failed twice and then accepted the event was called three times.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use eventsink::{Event, RecordingSink, SinkExt};
    /// let mut recorder = RecordingSink::new();
    /// recorder.publish(Event::new("a", ())).await.unwrap();
    /// assert_eq!(recorder.calls(), 1);
    /// # }
    /// ```
    pub fn calls(&self) -> usize {
        self.lock().calls
    }

    /// Makes the next `n` calls fail with a retryable [`Error::Simulated`]
    /// instead of recording the event (feature `test-util`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use eventsink::{Event, RecordingSink, Retryable, SinkExt};
    /// let mut recorder = RecordingSink::new();
    /// recorder.fail_next(1);
    /// let err = recorder.publish(Event::new("a", ())).await.unwrap_err();
    /// assert!(err.is_retryable());
    /// assert_eq!(recorder.calls(), 1);
    /// assert!(recorder.events().is_empty());
    /// # }
    /// ```
    #[cfg(feature = "test-util")]
    pub fn fail_next(&self, n: usize) {
        self.set_failing(n, true, None);
    }

    /// Makes the next `n` calls fail with an [`Error::Simulated`] that is
    /// not retryable (feature `test-util`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use eventsink::{Event, RecordingSink, Retryable, SinkExt};
    /// let mut recorder = RecordingSink::new();
    /// recorder.fail_next_permanently(1);
    /// let err = recorder.publish(Event::new("a", ())).await.unwrap_err();
    /// assert!(!err.is_retryable());
    /// recorder.publish(Event::new("a", ())).await.unwrap();
    /// # }
    /// ```
    #[cfg(feature = "test-util")]
    pub fn fail_next_permanently(&self, n: usize) {
        self.set_failing(n, false, None);
    }

    /// Makes the next `n` calls fail with a retryable [`Error::Simulated`]
    /// carrying a `Retry-After` hint of `retry_after`, as a throttling HTTP
    /// receiver would (feature `test-util`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use eventsink::{Event, RecordingSink, Retryable, SinkExt};
    /// let mut recorder = RecordingSink::new();
    /// recorder.fail_next_with_retry_after(1, Duration::from_secs(3));
    /// let err = recorder.publish(Event::new("a", ())).await.unwrap_err();
    /// assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
    /// # }
    /// ```
    #[cfg(feature = "test-util")]
    pub fn fail_next_with_retry_after(&self, n: usize, retry_after: Duration) {
        self.set_failing(n, true, Some(retry_after));
    }

    /// Waits until at least `n` events were recorded and returns them all,
    /// or fails once `timeout` has passed. For events that arrive through a
    /// queue worker or another task.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use eventsink::{Event, RecordingSink, SinkExt};
    /// let recorder = RecordingSink::new();
    /// let mut sink = recorder.clone();
    /// tokio::spawn(async move { sink.publish(Event::new("a", ())).await });
    /// let events = recorder.wait_for(1, Duration::from_secs(5)).await.unwrap();
    /// assert_eq!(events.len(), 1);
    /// # }
    /// ```
    pub async fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Event<P>>, WaitTimedOut> {
        let mut recorded = self.shared.recorded.subscribe();
        // Drop the watch guard (a read lock) before taking the state lock:
        // `call` takes them in the other order.
        let reached = tokio::time::timeout(timeout, async {
            recorded.wait_for(|&count| count >= n).await.is_ok()
        })
        .await;
        // The sender lives in `shared`, which we hold, so the channel cannot
        // close: `Ok(true)` is the only success.
        match reached {
            Ok(true) => Ok(self.events()),
            _ => Err(WaitTimedOut {
                wanted: n,
                recorded: self.lock().events.len(),
                timeout,
            }),
        }
    }

    #[cfg(feature = "test-util")]
    fn set_failing(&self, left: usize, retryable: bool, retry_after: Option<Duration>) {
        self.lock().failing = Failing {
            left,
            retryable,
            retry_after,
        };
    }

    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // A panic while holding this lock cannot leave the state half
        // updated (each update is one push or counter change), so a poisoned
        // lock is still consistent.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<P: PartialEq + Serialize> RecordingSink<P> {
    /// Asserts that exactly `expected` was published: first the count, then
    /// per position the `kind` and `payload`. `id` and `created_at` are not
    /// compared (they are random in real code); use
    /// [`events`](RecordingSink::events) for stricter checks.
    ///
    /// # Panics
    ///
    /// On any difference, with a message listing every difference and both
    /// lists of events, pointing at the caller's line.
    ///
    /// ```should_panic
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use eventsink::{Event, RecordingSink, SinkExt};
    /// use serde_json::json;
    /// let mut recorder = RecordingSink::new();
    /// recorder.publish(Event::new("a", json!(1))).await.unwrap();
    /// recorder.assert_published(&[Event::new("a", json!(2))]); // panics: payload differs
    /// # }
    /// ```
    #[track_caller]
    pub fn assert_published(&self, expected: &[Event<P>]) {
        let got = self.events();
        let problems = differences(expected, &got);
        if !problems.is_empty() {
            panic!(
                "RecordingSink::assert_published failed:\n{}\n  want:\n{}  got:\n{}",
                problems.join("\n"),
                listing(expected),
                listing(&got)
            );
        }
    }
}

fn differences<P: PartialEq + Serialize>(want: &[Event<P>], got: &[Event<P>]) -> Vec<String> {
    if want.len() != got.len() {
        return vec![format!(
            "  want {} events published, got {}",
            want.len(),
            got.len()
        )];
    }
    let mut problems = Vec::new();
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        if w.kind != g.kind {
            problems.push(format!(
                "  event {i}: want kind {:?}, got {:?}",
                w.kind, g.kind
            ));
        }
        if w.payload != g.payload {
            problems.push(format!(
                "  event {i}: want payload {}, got {}",
                json(&w.payload),
                json(&g.payload)
            ));
        }
    }
    problems
}

fn listing<P: Serialize>(events: &[Event<P>]) -> String {
    let mut out = String::new();
    for (i, e) in events.iter().enumerate() {
        let _ = writeln!(
            out,
            "    [{i}] kind {:?} payload {}",
            e.kind,
            json(&e.payload)
        );
    }
    if events.is_empty() {
        out.push_str("    (none)\n");
    }
    out
}

fn json<P: Serialize>(payload: &P) -> String {
    serde_json::to_string(payload).unwrap_or_else(|e| format!("<not serialisable: {e}>"))
}

impl<P> Service<Event<P>> for RecordingSink<P> {
    type Response = ();
    type Error = Error;
    type Future = Ready<Result<(), Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event<P>) -> Self::Future {
        let mut state = self.lock();
        state.calls += 1;
        #[cfg(feature = "test-util")]
        if state.failing.left > 0 {
            state.failing.left -= 1;
            return ready(Err(Error::Simulated {
                retryable: state.failing.retryable,
                retry_after: state.failing.retry_after,
            }));
        }
        state.events.push(event);
        self.shared.recorded.send_replace(state.events.len());
        ready(Ok(()))
    }
}

impl<P> Clone for RecordingSink<P> {
    fn clone(&self) -> Self {
        RecordingSink {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P> Default for RecordingSink<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> fmt::Debug for RecordingSink<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        let mut debug = f.debug_struct("RecordingSink");
        debug
            .field("events", &state.events.len())
            .field("calls", &state.calls);
        #[cfg(feature = "test-util")]
        debug.field("failing", &state.failing);
        debug.finish()
    }
}

/// [`RecordingSink::wait_for`] gave up: fewer events than wanted arrived in
/// time.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// let recorder: eventsink::RecordingSink = eventsink::RecordingSink::new();
/// let err = recorder.wait_for(1, Duration::from_millis(1)).await.unwrap_err();
/// assert_eq!((err.wanted, err.recorded), (1, 0));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitTimedOut {
    /// How many events the caller waited for.
    pub wanted: usize,
    /// How many had been recorded when the time ran out.
    pub recorded: usize,
    /// How long the caller waited.
    pub timeout: Duration,
}

impl fmt::Display for WaitTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "waited {:?} for {} events but only {} were recorded; check that a worker is \
             running and that deliveries succeed",
            self.timeout, self.wanted, self.recorded
        )
    }
}

impl std::error::Error for WaitTimedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn published(events: &[(&str, serde_json::Value)]) -> RecordingSink {
        let sink = RecordingSink::new();
        let mut state = sink.lock();
        for (kind, payload) in events {
            state.events.push(Event::new(*kind, payload.clone()));
        }
        drop(state);
        sink
    }

    #[test]
    fn count_mismatch_is_reported_first() {
        let sink = published(&[("a", json!(1))]);
        let want = [Event::new("a", json!(1)), Event::new("b", json!(2))];
        assert_eq!(
            differences(&want, &sink.events()),
            vec!["  want 2 events published, got 1".to_string()]
        );
    }

    #[test]
    fn kind_and_payload_differences_are_all_listed() {
        let sink = published(&[("a", json!(1)), ("b", json!({"x": 1}))]);
        let want = [Event::new("a", json!(1)), Event::new("c", json!({"x": 2}))];
        assert_eq!(
            differences(&want, &sink.events()),
            vec![
                "  event 1: want kind \"c\", got \"b\"".to_string(),
                "  event 1: want payload {\"x\":2}, got {\"x\":1}".to_string(),
            ]
        );
    }

    #[test]
    fn ids_and_times_are_ignored() {
        let sink = published(&[("a", json!(1))]);
        sink.assert_published(&[Event::with_id("a", "other", json!(1))]);
    }

    #[test]
    fn panic_names_the_callers_line() {
        use std::sync::mpsc;
        let sink = published(&[("a", json!(1))]);
        let me = std::thread::current().id();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == me {
                let line = info.location().map(|l| (l.file().to_string(), l.line()));
                let _ = tx.lock().unwrap().send(line);
            }
        }));
        let expected_line = line!() + 2;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sink.assert_published(&[]);
        }));
        let _ = std::panic::take_hook();
        std::panic::set_hook(previous);

        let payload = result.expect_err("must panic");
        let message = payload.downcast_ref::<String>().expect("string panic");
        assert!(
            message.contains("want 0 events published, got 1"),
            "{message}"
        );
        assert!(message.contains("[0] kind \"a\" payload 1"), "{message}");
        let (file, line) = rx.recv().unwrap().expect("panic location");
        assert!(file.ends_with("recording.rs"), "{file}");
        assert_eq!(line, expected_line);
    }
}
