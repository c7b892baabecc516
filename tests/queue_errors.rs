//! What a queue says when it cannot connect: settings the backend refuses
//! are permanent and say what is wrong; an unreachable backend is
//! transient; a printed chain of causes names each cause once.
#![cfg(any(feature = "postgres", feature = "redis"))]
mod support;

use std::error::Error as StdError;

use eventsink::Retryable;
use eventsink::queue::QueueError;

/// The error and its causes, one line each, as a log would print them.
fn chain(err: &(dyn StdError + 'static)) -> Vec<String> {
    let mut lines = vec![err.to_string()];
    let mut next = err.source();
    while let Some(cause) = next {
        lines.push(cause.to_string());
        next = cause.source();
    }
    lines
}

/// `url` (`scheme://[user[:password]@]rest`) with the user info `user`.
fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{rest}")
}

/// No line of `chain` repeats a line before it (or is part of it).
fn assert_each_cause_once(chain: &[String]) {
    for (n, line) in chain.iter().enumerate() {
        for earlier in &chain[..n] {
            assert!(
                !earlier.contains(line.as_str()),
                "the cause {line:?} is printed twice: {chain:#?}"
            );
        }
    }
}

#[cfg(feature = "postgres")]
#[tokio::test]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_unknown_role_is_permanent_and_says_authentication_failed() {
    // The server of EVENTSINK_POSTGRES_URL, as a role it does not have.
    let url = with_user(
        &support::queue::backend_url("EVENTSINK_POSTGRES_URL"),
        "eventsink_no_such_role",
    );
    let err = eventsink::queue::PostgresQueue::<serde_json::Value>::connect(&url, "q")
        .await
        .expect_err("an unknown role cannot connect");
    assert!(matches!(err, QueueError::Misconfigured { .. }), "{err:?}");
    assert!(!err.is_retryable(), "retrying cannot help: {err}");
    let lines = chain(&err);
    assert!(lines[0].contains("authentication failed"), "{lines:#?}");
    assert!(!lines[0].contains("try again later"), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("eventsink_no_such_role")),
        "the chain names the role: {lines:#?}"
    );
    assert_each_cause_once(&lines);
}

#[cfg(feature = "postgres")]
#[tokio::test]
#[cfg_attr(
    not(eventsink_postgres),
    ignore = "set EVENTSINK_POSTGRES_URL to run against Postgres"
)]
async fn postgres_unknown_database_is_permanent() {
    let url = support::queue::backend_url("EVENTSINK_POSTGRES_URL");
    let (server, _) = url.rsplit_once('/').expect("a URL with a database");
    let url = format!("{server}/eventsink_no_such_database");
    let err = eventsink::queue::PostgresQueue::<serde_json::Value>::connect(&url, "q")
        .await
        .expect_err("an unknown database cannot be opened");
    assert!(matches!(err, QueueError::Misconfigured { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("database does not exist"), "{err}");
    assert_each_cause_once(&chain(&err));
}

/// A loopback port nothing listens on: bound, then released.
#[cfg(any(feature = "postgres", feature = "redis"))]
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `opened` failed because nothing listens: a transient backend error
/// whose chain says so (not only that a wait timed out), each cause once.
#[cfg(any(feature = "postgres", feature = "redis"))]
fn assert_refused<T: std::fmt::Debug>(opened: Result<T, QueueError>) {
    let err = opened.expect_err("nothing listens");
    assert!(matches!(err, QueueError::Backend { .. }), "{err:?}");
    assert!(err.is_retryable(), "the server may come up: {err}");
    let lines = chain(&err);
    assert!(
        lines.iter().any(|l| l.contains("Connection refused")),
        "{lines:#?}"
    );
    assert_each_cause_once(&lines);
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_on_a_closed_port_is_transient_and_names_the_cause_once() {
    let url = format!("postgres://app@127.0.0.1:{}/app", closed_port());
    assert_refused(eventsink::queue::PostgresQueue::<serde_json::Value>::connect(&url, "q").await);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_on_a_closed_port_is_transient_and_names_the_cause_once() {
    let url = format!("redis://127.0.0.1:{}/", closed_port());
    assert_refused(eventsink::queue::RedisQueue::<serde_json::Value>::connect(&url, "q").await);
}

#[cfg(feature = "redis")]
#[tokio::test]
#[cfg_attr(
    not(eventsink_redis),
    ignore = "set EVENTSINK_REDIS_URL to run against Redis"
)]
async fn redis_wrong_password_is_permanent() {
    let url = with_user(
        &support::queue::backend_url("EVENTSINK_REDIS_URL"),
        "eventsink_no_such_user:s3cr3t-pw",
    );
    let err = eventsink::queue::RedisQueue::<serde_json::Value>::connect(&url, "q")
        .await
        .expect_err("a wrong password cannot connect");
    assert!(matches!(err, QueueError::Misconfigured { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let lines = chain(&err);
    assert!(lines[0].contains("authentication failed"), "{lines:#?}");
    assert!(
        !format!("{err:?} {lines:?}").contains("s3cr3t-pw"),
        "the password leaked: {err:?}"
    );
    assert_each_cause_once(&lines);
}
