//! Argument parsing, timing and reporting shared by the scenarios.

use std::time::{Duration, Instant};

/// What the command line asked for.
pub struct Options {
    /// Smaller workloads, so that every scenario together stays under 60 s.
    pub quick: bool,
    /// Run the scenarios whose name contains one of these (all if empty).
    pub filters: Vec<String>,
}

impl Options {
    pub fn from_args() -> Self {
        let mut quick = false;
        let mut filters = Vec::new();
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--quick" => quick = true,
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                other if other.starts_with('-') => {
                    eprintln!("unknown flag {other}; use --quick and scenario names");
                    std::process::exit(2);
                }
                name => filters.push(name.to_owned()),
            }
        }
        Options { quick, filters }
    }

    pub fn selects(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }

    /// `quick` in quick mode, `full` otherwise.
    pub fn size(&self, quick: usize, full: usize) -> usize {
        if self.quick { quick } else { full }
    }
}

/// A named benchmark.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&Options),
}

/// Units per second of `count` units done in `elapsed`.
pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// Rounds of [`paired`] measurements.
const PAIRED_ROUNDS: usize = 7;

/// Medians of a paired measurement.
pub struct Paired {
    pub ours: f64,
    pub baseline: f64,
    /// The median of the per-round ratios ours / baseline.
    pub ratio: f64,
}

/// Runs `ours` then `baseline` back to back, [`PAIRED_ROUNDS`] times; the
/// ratio is the median of the rounds' ratios, so that load from other
/// processes, which drifts between rounds, cancels out within each pair.
pub fn paired(ours: impl FnMut() -> f64, baseline: impl FnMut() -> f64) -> Paired {
    paired_rounds(PAIRED_ROUNDS, ours, baseline)
}

/// [`paired`] with `rounds` rounds, for scenarios whose rounds are long.
pub fn paired_rounds(
    rounds: usize,
    mut ours: impl FnMut() -> f64,
    mut baseline: impl FnMut() -> f64,
) -> Paired {
    let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let (x, y) = (ours(), baseline());
        a.push(x);
        b.push(y);
        r.push(x / y);
    }
    Paired {
        ours: median(a),
        baseline: median(b),
        ratio: median(r),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Times `f`, returning its result and the elapsed time.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

/// Prints the scenario's result and its `BENCH` line.
pub fn report(
    scenario: &str,
    ours: f64,
    baseline: f64,
    ratio: f64,
    unit: &str,
    baseline_name: &str,
) {
    println!(
        "{scenario}: ours {} {unit}, baseline ({baseline_name}) {} {unit}, ratio {ratio:.3}",
        round(ours),
        round(baseline)
    );
    println!(
        "BENCH {{\"scenario\":\"{scenario}\",\"ours\":{},\"baseline\":{},\"ratio\":{ratio:.3},\"unit\":\"{unit}\"}}",
        round(ours),
        round(baseline)
    );
}

fn round(x: f64) -> f64 {
    if x >= 100.0 {
        x.round()
    } else {
        (x * 100.0).round() / 100.0
    }
}

/// A multi-threaded tokio runtime on both cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Peak resident memory of this process in MiB (`VmHWM`).
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Resets the peak-memory mark so a scenario measures only itself.
pub fn reset_peak_rss() {
    // "5" resets VmHWM to the current RSS (Linux >= 4.0).
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("could not reset the peak RSS mark ({e}); the peak includes earlier scenarios");
    }
}

/// How often [`RssSampler`] reads the resident memory.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Resident memory of this process in MiB now (`VmRSS`).
pub fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// A `/proc/self/status` line's value in MiB (`NaN` if missing).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The highest `VmRSS` seen while it runs, read every [`RSS_SAMPLE_EVERY`]
/// on a thread of its own: the peak of one phase of a scenario, where
/// `VmHWM` holds the peak of the whole process and may not be resettable.
pub struct RssSampler {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    pub fn start() -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut peak = rss_mib();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(RSS_SAMPLE_EVERY)
            {
                peak = peak.max(rss_mib());
            }
            peak.max(rss_mib())
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling; the peak in MiB.
    pub fn stop(self) -> f64 {
        let _ = self.stop.send(());
        self.thread.join().expect("the RSS sampler")
    }
}
