//! Tells the tests which external services they may use.
//!
//! The Postgres and Redis tests need a running server, named by
//! `EVENTSINK_POSTGRES_URL` and `EVENTSINK_REDIS_URL`. When a variable is
//! set (and not empty) at build time, this script sets the cfg
//! `eventsink_postgres` or `eventsink_redis`; the tests that need the
//! server carry `#[cfg_attr(not(eventsink_postgres), ignore = "...")]`, so
//! without the server libtest lists them as *ignored* (with the reason)
//! instead of printing `ok` for a test that did nothing. `.ci/run` sets
//! both variables and fails if any test was ignored.

/// Each service variable and the cfg it sets.
const SERVICES: [(&str, &str); 2] = [
    ("EVENTSINK_POSTGRES_URL", "eventsink_postgres"),
    ("EVENTSINK_REDIS_URL", "eventsink_redis"),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for (var, cfg) in SERVICES {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if std::env::var_os(var).is_some_and(|url| !url.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
