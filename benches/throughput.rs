//! Throughput benchmarks, each beside its raw baseline in the same run.
//!
//! ```text
//! cargo bench --bench throughput                    # every scenario, full size
//! cargo bench --bench throughput -- --quick         # every scenario, < 60 s in total
//! cargo bench --bench throughput -- --quick fs      # scenarios whose name contains "fs"
//! ```
//!
//! Absolute numbers on a shared 2-core machine are noise; the ratio of ours
//! to the baseline, measured in the same process, is the result. Each
//! scenario ends with one line:
//! `BENCH {"scenario":"...","ours":N,"baseline":N,"ratio":R,"unit":"..."}`.

#[path = "scenarios/core.rs"]
mod core_scenarios;
#[path = "scenarios/fanout.rs"]
mod fanout_scenarios;
#[path = "scenarios/harness.rs"]
mod harness;
#[cfg(feature = "queue")]
#[path = "scenarios/queue.rs"]
mod queue_scenarios;
#[cfg(feature = "verify")]
#[path = "scenarios/verify.rs"]
mod verify_scenarios;
#[cfg(feature = "webhook")]
#[path = "scenarios/webhook.rs"]
mod webhook_scenarios;
#[cfg(feature = "queue")]
#[path = "scenarios/xproc.rs"]
mod xproc_scenarios;

use harness::{Options, Scenario};

fn scenarios() -> Vec<Scenario> {
    let mut all = core_scenarios::all();
    all.extend(fanout_scenarios::all());
    #[cfg(feature = "webhook")]
    all.extend(webhook_scenarios::all());
    #[cfg(feature = "queue")]
    all.extend(queue_scenarios::all());
    #[cfg(feature = "queue")]
    all.extend(xproc_scenarios::all());
    #[cfg(feature = "verify")]
    all.extend(verify_scenarios::all());
    all
}

fn main() {
    #[cfg(feature = "queue")]
    if xproc_scenarios::child_worker() {
        return;
    }
    let options = Options::from_args();
    let selected: Vec<_> = scenarios()
        .into_iter()
        .filter(|s| options.selects(s.name))
        .collect();
    if selected.is_empty() {
        eprintln!("no scenario matches {:?}", options.filters);
        std::process::exit(2);
    }
    for scenario in selected {
        (scenario.run)(&options);
    }
}
