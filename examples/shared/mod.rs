//! What the `worker` and `publisher` examples share: the backend flags,
//! opening the queue (retrying while the backend is unreachable), the
//! shutdown signals and logging.

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Args};
use eventsink::queue::QueueError;
use eventsink::{Backoff, BoxError, Retryable};
use sqlx::postgres::PgConnectOptions;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// The queue both processes share: exactly one backend, and its name.
///
/// Not `Debug`: the URLs may carry passwords.
#[derive(Args)]
#[command(group(ArgGroup::new("backend").required(true).args(["postgres", "redis", "sqlite"])))]
pub(crate) struct QueueArgs {
    /// Postgres URL of a queue shared by several machines.
    #[arg(
        long,
        env = "QUEUE_POSTGRES_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) postgres: Option<String>,
    /// Redis URL of a queue shared by several machines.
    #[arg(
        long,
        env = "QUEUE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(crate) redis: Option<String>,
    /// SQLite file of a queue shared by processes of one machine.
    #[arg(long, env = "QUEUE_SQLITE_PATH", value_name = "PATH")]
    pub(crate) sqlite: Option<PathBuf>,
    /// The queue's name: workers deliver what publishers of the same name store.
    #[arg(long = "queue", env = "QUEUE_NAME", default_value = "webhooks")]
    pub(crate) name: String,
}

/// Where the queue is, checked: a malformed URL or a missing directory
/// would otherwise look like an outage and be retried for ever.
pub(crate) enum Location<'a> {
    Postgres(&'a str),
    Redis(&'a str),
    Sqlite(&'a Path),
}

impl QueueArgs {
    /// The backend chosen, once its URL or path is checked.
    pub(crate) fn location(&self) -> Result<Location<'_>, BoxError> {
        if let Some(url) = &self.postgres {
            url.parse::<PgConnectOptions>().map_err(|e| {
                format!("--postgres is not a Postgres URL ({e}); use postgres://USER@HOST/DB")
            })?;
            return Ok(Location::Postgres(url));
        }
        if let Some(url) = &self.redis {
            redis::Client::open(url.as_str())
                .map_err(|e| format!("--redis is not a Redis URL ({e}); use redis://HOST:PORT/"))?;
            return Ok(Location::Redis(url));
        }
        if let Some(path) = &self.sqlite {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(format!(
                    "--sqlite: the directory {} does not exist; create it",
                    dir.display()
                )
                .into());
            }
            return Ok(Location::Sqlite(path));
        }
        Err("no queue backend: give one of --postgres, --redis or --sqlite".into())
    }
}

/// Opens the queue with `open`, again and again while the backend is
/// unreachable (a database still starting, a network outage), with a
/// jittered backoff of 1 s doubling up to 30 s ([`Backoff`]'s defaults).
/// Returns an error the first time the failure is permanent.
pub(crate) async fn open<B, F>(mut open: impl FnMut() -> F) -> Result<B, QueueError>
where
    F: Future<Output = Result<B, QueueError>>,
{
    let backoff = Backoff::new();
    let mut retry = 0;
    loop {
        match open().await {
            Ok(queue) => return Ok(queue),
            Err(e) if e.is_retryable() => {
                let wait = backoff.delay(retry, None);
                tracing::warn!(error = %chain(&e), ?wait, "could not open the queue; trying again");
                tokio::time::sleep(wait).await;
                retry = retry.saturating_add(1);
            }
            Err(e) => return Err(e),
        }
    }
}

/// `error: its sources` for a log line: a queue error's message says what
/// failed, its source why.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The process's exit code: on an error, prints it (its message and
/// sources, never its `Debug`) and fails.
pub(crate) fn exit_code(result: Result<(), BoxError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, with the name of the signal.
/// Both are registered here, at once: a signal that arrives before the
/// future is polled is not lost, and does not kill the process.
pub(crate) fn shutdown_signal()
-> Result<impl Future<Output = &'static str> + Send + 'static, BoxError> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => "Ctrl-C",
            _ = terminate.recv() => "SIGTERM",
        }
    })
}

/// Logs to stderr as `RUST_LOG` says (`info` by default), in colour only
/// on a terminal.
pub(crate) fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
}
