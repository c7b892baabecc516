//! Queue scenarios with the worker in another process: this bench binary
//! run again as a worker (`EVENTSINK_XPROC_BACKEND` set), which writes the
//! id of each event it delivers as a line on its stdout and stops when its
//! stdin closes.
//!
//! - `queue_latency_<backend>_xproc`: median ms from `publish` returning in
//!   this process to the worker process's line for the event being read
//!   here, events published one at a time into the idle worker (after a
//!   random pause of up to [`MAX_PAUSE`], so that publishes fall anywhere
//!   in the worker's poll cycle), against the budget (5 ms for Postgres and
//!   Redis, which notify workers, 25 ms for SQLite, which polls); the ratio
//!   is median / budget, lower is better;
//! - `queue_idle_cpu_<backend>`: the CPU time (user + system, from
//!   `/proc/<pid>/stat`) of the worker process while it idles on an empty
//!   queue, in percent of one core, against a budget of 1 %.

use crate::harness::Scenario;

pub fn all() -> Vec<Scenario> {
    #[cfg(all(feature = "sqlite", feature = "postgres", feature = "redis"))]
    return backends::all();
    #[cfg(not(all(feature = "sqlite", feature = "postgres", feature = "redis")))]
    Vec::new()
}

/// Runs the worker process's body if this process is one (then `true`).
pub fn child_worker() -> bool {
    #[cfg(all(feature = "sqlite", feature = "postgres", feature = "redis"))]
    return backends::child_worker();
    #[cfg(not(all(feature = "sqlite", feature = "postgres", feature = "redis")))]
    false
}

/// Longest pause before each publish of the latency scenarios: twice the
/// worker's default poll interval, so a publish is as likely to fall early
/// as late in a poll cycle.
#[cfg(all(feature = "sqlite", feature = "postgres", feature = "redis"))]
const MAX_PAUSE: std::time::Duration = std::time::Duration::from_millis(40);

#[cfg(all(feature = "sqlite", feature = "postgres", feature = "redis"))]
mod backends {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use eventsink::queue::{PostgresQueue, QueueWorker, RedisQueue, SqliteQueue, ThroughTaskQueue};
    use eventsink::{Event, NoopSink, SinkExt};
    use tokio::io::{AsyncBufReadExt, BufReader, Lines};
    use tokio::process::{Child, ChildStdin, ChildStdout, Command};
    use tower::Layer;

    use super::MAX_PAUSE;
    use crate::harness::{Options, Scenario, report, runtime};
    use crate::queue_scenarios::backends::{Kind, Round, event, with_queue};

    /// The variables that make this binary a worker process.
    const BACKEND_VAR: &str = "EVENTSINK_XPROC_BACKEND";
    const LOCATION_VAR: &str = "EVENTSINK_XPROC_LOCATION";
    const QUEUE_VAR: &str = "EVENTSINK_XPROC_QUEUE";

    /// The latency budget with notifications (Postgres, Redis).
    const NOTIFIED_BUDGET_MS: f64 = 5.0;
    /// The latency budget when polling (SQLite).
    const POLLED_BUDGET_MS: f64 = 25.0;
    /// The idle worker's CPU budget, percent of one core.
    const IDLE_BUDGET_PERCENT: f64 = 1.0;
    /// Upper bound on any wait for the worker process.
    const PATIENCE: Duration = Duration::from_secs(30);

    pub(crate) fn all() -> Vec<Scenario> {
        vec![
            Scenario {
                name: "queue_latency_sqlite_xproc",
                run: |o| latency(o, Kind::Sqlite),
            },
            Scenario {
                name: "queue_latency_postgres_xproc",
                run: |o| latency(o, Kind::Postgres),
            },
            Scenario {
                name: "queue_latency_redis_xproc",
                run: |o| latency(o, Kind::Redis),
            },
            Scenario {
                name: "queue_idle_cpu_sqlite",
                run: |o| idle_cpu(o, Kind::Sqlite),
            },
            Scenario {
                name: "queue_idle_cpu_postgres",
                run: |o| idle_cpu(o, Kind::Postgres),
            },
            Scenario {
                name: "queue_idle_cpu_redis",
                run: |o| idle_cpu(o, Kind::Redis),
            },
        ]
    }

    // ---------------------------------------------------------- the worker

    /// Where the worker process finds the queue.
    struct Target {
        kind: Kind,
        location: String,
        queue: String,
    }

    impl Target {
        fn sqlite_path(&self) -> std::path::PathBuf {
            self.location.clone().into()
        }
    }

    fn kind_of(label: &str) -> Kind {
        [Kind::Sqlite, Kind::Postgres, Kind::Redis]
            .into_iter()
            .find(|kind| kind.label() == label)
            .unwrap_or_else(|| panic!("{BACKEND_VAR}={label}: not sqlite, postgres or redis"))
    }

    pub(crate) fn child_worker() -> bool {
        let Ok(backend) = std::env::var(BACKEND_VAR) else {
            return false;
        };
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
        let target = Target {
            kind: kind_of(&backend),
            location: var(LOCATION_VAR),
            queue: var(QUEUE_VAR),
        };
        runtime().block_on(async {
            with_queue!(target, |queue| work(queue).await);
        });
        true
    }

    /// Delivers with the worker's defaults, writing each event's id on
    /// stdout, until stdin closes.
    async fn work<B: eventsink::queue::QueueBackend<serde_json::Value>>(queue: B) {
        let sink = tower::service_fn(|event: Event| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let written = writeln!(out, "{}", event.id).and_then(|()| out.flush());
            std::future::ready(written.map_err(|source| eventsink::Error::Io {
                path: "<stdout>".into(),
                source,
            }))
        });
        let stop = async {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(_)) = lines.next_line().await {}
        };
        QueueWorker::new(queue, sink).run_until(stop).await;
    }

    /// A worker process; it stops when `stdin` is dropped.
    struct Worker {
        child: Child,
        stdin: ChildStdin,
        delivered: Lines<BufReader<ChildStdout>>,
    }

    impl Worker {
        fn spawn(round: &Round) -> Self {
            let location = match round.kind {
                Kind::Sqlite => round.sqlite_path().to_string_lossy().into_owned(),
                _ => round.location.clone(),
            };
            let mut child = Command::new(std::env::current_exe().expect("bench binary"))
                .env(BACKEND_VAR, round.kind.label())
                .env(LOCATION_VAR, location)
                .env(QUEUE_VAR, &round.queue)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn the worker process");
            let stdin = child.stdin.take().expect("stdin");
            let stdout = child.stdout.take().expect("stdout");
            Worker {
                child,
                stdin,
                delivered: BufReader::new(stdout).lines(),
            }
        }

        /// Waits for the worker's next line: the id of an event delivered.
        async fn next_delivered(&mut self) -> String {
            let line = tokio::time::timeout(PATIENCE, self.delivered.next_line()).await;
            match line {
                Ok(Ok(Some(id))) => id,
                other => panic!("the worker process delivered nothing: {other:?}"),
            }
        }

        /// Publishes `event` and waits for its delivery: the time from the
        /// publish returning to the worker's line being read.
        async fn round_trip<S>(&mut self, publisher: &mut S, event: Event) -> Duration
        where
            S: eventsink::Sink,
            S::Error: std::fmt::Debug,
        {
            publisher.publish(event.clone()).await.expect("publish");
            let returned = Instant::now();
            let id = self.next_delivered().await;
            let took = returned.elapsed();
            assert_eq!(*id, *event.id, "the worker delivered another event");
            took
        }

        fn pid(&self) -> u32 {
            self.child.id().expect("the worker process runs")
        }

        /// Closes its stdin and waits for it to exit.
        async fn stop(self) {
            let Worker {
                mut child, stdin, ..
            } = self;
            drop(stdin);
            match tokio::time::timeout(PATIENCE, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                other => eprintln!("the worker process ended badly: {other:?}"),
            }
        }
    }

    // ---------------------------------------------------------- latency

    fn budget_ms(kind: Kind) -> f64 {
        match kind {
            Kind::Sqlite => POLLED_BUDGET_MS,
            Kind::Postgres | Kind::Redis => NOTIFIED_BUDGET_MS,
        }
    }

    fn latency(options: &Options, kind: Kind) {
        let scenario = format!("queue_latency_{}_xproc", kind.label());
        let Some(location) = kind.location(&scenario) else {
            return;
        };
        let events = options.size(60, 200);
        let median = runtime().block_on(latency_round(kind, &location, events));
        let budget = budget_ms(kind);
        println!("{scenario}: ratio = median / budget, lower is better (<= 1 meets the budget)");
        report(
            &scenario,
            median,
            budget,
            median / budget,
            "ms median",
            "budget",
        );
    }

    async fn latency_round(kind: Kind, location: &str, events: usize) -> f64 {
        let round = Round::new(kind, location, "xproc");
        let median = with_queue!(round, |queue| {
            // Opened (and migrated) before the worker process opens it.
            let mut publisher = ThroughTaskQueue::new(queue).layer(NoopSink::new());
            let mut worker = Worker::spawn(&round);
            // The first delivery shows the worker runs.
            worker.round_trip(&mut publisher, event(0)).await;
            let mut latencies = Vec::with_capacity(events);
            for n in 1..=events {
                tokio::time::sleep(MAX_PAUSE.mul_f64(fastrand::f64())).await;
                let took = worker.round_trip(&mut publisher, event(n)).await;
                latencies.push(took.as_secs_f64() * 1000.0);
            }
            worker.stop().await;
            latencies.sort_by(f64::total_cmp);
            latencies[latencies.len() / 2]
        });
        round.cleanup().await;
        median
    }

    // ---------------------------------------------------------- idle CPU

    fn idle_cpu(options: &Options, kind: Kind) {
        let scenario = format!("queue_idle_cpu_{}", kind.label());
        let Some(location) = kind.location(&scenario) else {
            return;
        };
        let window = Duration::from_secs(options.size(5, 30) as u64);
        let percent = runtime().block_on(idle_round(kind, &location, window));
        let tick = 100.0 / clock_ticks_per_second() / window.as_secs_f64();
        println!(
            "{scenario}: CPU of the idle worker process over {window:?}, percent of one core \
             (resolution {tick:.2} %: one clock tick); ratio = percent / budget, lower is better"
        );
        report(
            &scenario,
            percent,
            IDLE_BUDGET_PERCENT,
            percent / IDLE_BUDGET_PERCENT,
            "% of a core",
            "budget",
        );
    }

    /// How long the worker process runs after its first delivery before
    /// its idle CPU is read: its start-up is not idling.
    const SETTLE: Duration = Duration::from_secs(1);

    async fn idle_round(kind: Kind, location: &str, window: Duration) -> f64 {
        let round = Round::new(kind, location, "idle");
        let percent = with_queue!(round, |queue| {
            let mut publisher = ThroughTaskQueue::new(queue).layer(NoopSink::new());
            let mut worker = Worker::spawn(&round);
            worker.round_trip(&mut publisher, event(0)).await;
            tokio::time::sleep(SETTLE).await;
            let pid = worker.pid();
            let (before, started) = (cpu_ticks(pid), Instant::now());
            tokio::time::sleep(window).await;
            let (after, elapsed) = (cpu_ticks(pid), started.elapsed());
            worker.stop().await;
            let busy = (after - before) as f64 / clock_ticks_per_second();
            busy / elapsed.as_secs_f64() * 100.0
        });
        round.cleanup().await;
        percent
    }

    /// User plus system CPU time of process `pid` (all its threads), in
    /// clock ticks: fields 14 and 15 of `/proc/<pid>/stat`.
    fn cpu_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
        // The command name (field 2) may hold spaces; it ends at the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| -> u64 {
            // fields[0] is field 3 (the state).
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .expect("a CPU time field")
        };
        field(14) + field(15)
    }

    /// `getconf CLK_TCK`, or 100 (Linux' usual value) if it cannot be run.
    fn clock_ticks_per_second() -> f64 {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    }
}
