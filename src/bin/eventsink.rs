//! `eventsink`: the admin CLI of eventsink's durable queues — dead letters
//! and queue stats (feature `cli`, plus the features of the backends it
//! should reach: `sqlite` by default, `postgres`, `redis`).
//!
//! ```text
//! cargo install eventsink --features cli,postgres,redis
//!
//! eventsink --sqlite events.db --queue webhooks stats
//! eventsink --sqlite events.db --queue webhooks dead list --limit 20 --offset 40
//! eventsink --sqlite events.db --queue webhooks dead show webhooks:order.placed:evt_1
//! eventsink --sqlite events.db --queue webhooks dead replay webhooks:order.placed:evt_1
//! eventsink --sqlite events.db --queue webhooks dead replay --all --yes
//! eventsink --sqlite events.db --queue webhooks dead purge --yes
//!
//! export EVENTSINK_POSTGRES=postgres://app:secret@db/app EVENTSINK_QUEUE=webhooks
//! eventsink stats --json
//! eventsink dead list --json | jq '.letters[].key'
//! ```
//!
//! Exactly one backend: `--sqlite PATH`, `--postgres URL` or `--redis URL`
//! (or `EVENTSINK_SQLITE`, `EVENTSINK_POSTGRES`, `EVENTSINK_REDIS`), and
//! the queue's name, `--queue NAME` (or `EVENTSINK_QUEUE`). The SQLite
//! file must already hold a queue: a mistyped path is an error, never a
//! new empty queue. Output is a table for people, or with `--json` one JSON
//! document for scripts. Passwords in URLs are never printed.
//!
//! `dead replay KEY` puts one letter's event back into the queue (it is
//! delivered again by the application's worker); naming the key is the
//! confirmation. `dead replay --all` and `dead purge` act on every letter
//! and need `--yes`.
//!
//! Exit codes: 0 done; 1 an error (bad arguments, no such file or key, the
//! backend failed), with a message saying what to do; 2 a destructive
//! command refused for lack of `--yes` (nothing was changed).
// Built without any durable backend, the CLI can only say which feature
// is missing: everything that talks to a queue is unused then.
#![cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "redis")),
    allow(dead_code, unreachable_code, unused_imports, unused_variables)
)]

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use eventsink::queue::{DeadLetter, DeadLetters, QueueBackend, QueueError, QueueStats};
use serde_json::{Value, json};

/// Dead letters `dead list` shows unless `--limit` says otherwise: about a
/// screenful.
const DEFAULT_LIMIT: u64 = 50;

/// Characters of a letter's last error in `dead list`'s table: the table
/// stays one line per letter on a wide terminal; `dead show` has it all.
const ERROR_WIDTH: usize = 60;

/// Exit code of an error.
const EXIT_ERROR: u8 = 1;

/// Exit code of a destructive command refused without `--yes`.
const EXIT_REFUSED: u8 = 2;

#[derive(Parser)]
#[command(
    name = "eventsink",
    version,
    about = "Inspect an eventsink queue and repair its dead letters",
    after_help = "Exit codes: 0 done, 1 error, 2 refused without --yes (nothing changed)."
)]
struct Cli {
    /// The queue's SQLite file (it must exist: nothing is created).
    #[arg(long, env = "EVENTSINK_SQLITE", value_name = "PATH", global = true)]
    sqlite: Option<PathBuf>,
    /// The queue's Postgres database.
    #[arg(
        long,
        env = "EVENTSINK_POSTGRES",
        value_name = "URL",
        hide_env_values = true,
        global = true
    )]
    postgres: Option<String>,
    /// The queue's Redis.
    #[arg(
        long,
        env = "EVENTSINK_REDIS",
        value_name = "URL",
        hide_env_values = true,
        global = true
    )]
    redis: Option<String>,
    /// The queue's name.
    #[arg(long, env = "EVENTSINK_QUEUE", value_name = "NAME", global = true)]
    queue: Option<String>,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Jobs pending, scheduled and running, dead letters, and the oldest
    /// due time.
    Stats,
    /// The events the queue gave up on.
    #[command(subcommand)]
    Dead(Dead),
}

#[derive(Subcommand)]
enum Dead {
    /// Dead letters, oldest first.
    List {
        /// How many.
        #[arg(long, default_value_t = DEFAULT_LIMIT)]
        limit: u64,
        /// How many to skip.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// One dead letter, with its payload.
    Show {
        /// The letter's key, `{queue}:{kind}:{id}` (see `dead list`).
        key: String,
    },
    /// Puts a dead letter's event back into the queue, to be delivered again.
    Replay {
        /// The letter's key; naming it is the confirmation.
        key: Option<String>,
        /// Every dead letter instead (needs --yes).
        #[arg(long, conflicts_with = "key")]
        all: bool,
        /// Confirms --all.
        #[arg(long)]
        yes: bool,
    },
    /// Deletes every dead letter of the queue, for good (needs --yes).
    Purge {
        /// Confirms the purge.
        #[arg(long)]
        yes: bool,
    },
}

/// Why the CLI did not do what it was asked.
#[derive(Debug)]
enum Failure {
    /// An error: exit 1.
    Error(String),
    /// A destructive command without `--yes`: exit 2.
    Refused(String),
}

impl From<QueueError> for Failure {
    fn from(e: QueueError) -> Self {
        Failure::Error(chain(&e))
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let done = match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => Err(Failure::Error(format!(
            "cannot start the async runtime: {e}"
        ))),
    };
    match done {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(Failure::Error(message)) => {
            eprintln!("eventsink: error: {message}");
            ExitCode::from(EXIT_ERROR)
        }
        Err(Failure::Refused(message)) => {
            eprintln!("eventsink: refused: {message}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

/// Where the queue is, as given.
enum Location {
    Sqlite(PathBuf),
    Postgres(String),
    Redis(String),
}

impl Location {
    /// The one backend given; an error for none or several.
    fn of(cli: &Cli) -> Result<Location, Failure> {
        let mut given = Vec::new();
        given.extend(cli.sqlite.clone().map(Location::Sqlite));
        given.extend(cli.postgres.clone().map(Location::Postgres));
        given.extend(cli.redis.clone().map(Location::Redis));
        if given.len() > 1 {
            let flags: Vec<_> = given.iter().map(Location::flag).collect();
            return Err(Failure::Error(format!(
                "several backends given: {} (flags or EVENTSINK_* variables); give exactly one",
                flags.join(" and ")
            )));
        }
        given.pop().ok_or_else(|| {
            Failure::Error(
                "no backend given: add --sqlite PATH, --postgres URL or --redis URL \
                 (or set EVENTSINK_SQLITE, EVENTSINK_POSTGRES or EVENTSINK_REDIS)"
                    .into(),
            )
        })
    }

    fn flag(&self) -> &'static str {
        match self {
            Location::Sqlite(_) => "--sqlite",
            Location::Postgres(_) => "--postgres",
            Location::Redis(_) => "--redis",
        }
    }

    /// Where, for messages: URLs without their password.
    fn describe(&self) -> String {
        match self {
            Location::Sqlite(path) => format!("the SQLite file {path:?}"),
            Location::Postgres(url) => format!("Postgres at {}", redact(url).0),
            Location::Redis(url) => format!("Redis at {}", redact(url).0),
        }
    }

    /// The passwords in the location, never to be printed.
    fn secrets(&self) -> Vec<String> {
        match self {
            Location::Sqlite(_) => Vec::new(),
            Location::Postgres(url) | Location::Redis(url) => redact(url).1,
        }
    }
}

/// `url` with its passwords (in the user info, or a `password=` parameter)
/// replaced by `***`, and the passwords.
fn redact(url: &str) -> (String, Vec<String>) {
    let mut secrets = Vec::new();
    let mut shown = url.to_owned();
    if let Some(start) = url.find("://").map(|i| i + 3) {
        let rest = &url[start..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@')
            && let Some(colon) = authority[..at].find(':')
            && colon + 1 < at
        {
            secrets.push(authority[colon + 1..at].to_owned());
            shown = format!("{}{}***{}", &url[..start], &rest[..=colon], &rest[at..]);
        }
    }
    if let Some(start) = shown.find("password=").map(|i| i + "password=".len()) {
        let end = shown[start..]
            .find(['&', '#'])
            .map_or(shown.len(), |i| start + i);
        if end > start {
            secrets.push(shown[start..end].to_owned());
            shown.replace_range(start..end, "***");
        }
    }
    (shown, secrets)
}

/// The queues this build can open.
enum Backend {
    #[cfg(feature = "sqlite")]
    Sqlite(eventsink::queue::SqliteQueue),
    #[cfg(feature = "postgres")]
    Postgres(eventsink::queue::PostgresQueue),
    #[cfg(feature = "redis")]
    Redis(eventsink::queue::RedisQueue),
}

/// The error of a backend this build lacks.
fn not_built(feature: &str, flag: &str) -> Failure {
    Failure::Error(format!(
        "{flag} needs the `{feature}` feature, and this eventsink was built without it: \
         install it with `cargo install eventsink --features cli,{feature}`"
    ))
}

async fn open(location: &Location, queue: &str) -> Result<Backend, Failure> {
    let failed = |e: QueueError| {
        let at = location.describe();
        Failure::Error(format!(
            "cannot open queue {queue:?} in {at}: {}",
            chain(&e)
        ))
    };
    match location {
        #[cfg(feature = "sqlite")]
        Location::Sqlite(path) => eventsink::queue::SqliteQueue::builder(queue)
            .create_if_missing(false)
            .open(path)
            .await
            .map(Backend::Sqlite)
            .map_err(failed),
        #[cfg(feature = "postgres")]
        Location::Postgres(url) => eventsink::queue::PostgresQueue::builder(queue)
            .create_if_missing(false)
            .connect(url)
            .await
            .map(Backend::Postgres)
            .map_err(failed),
        #[cfg(feature = "redis")]
        Location::Redis(url) => eventsink::queue::RedisQueue::connect(url, queue)
            .await
            .map(Backend::Redis)
            .map_err(failed),
        #[allow(unreachable_patterns)]
        other => Err(not_built(&other.flag()[2..], other.flag())),
    }
}

async fn run(cli: Cli) -> Result<String, Failure> {
    let location = Location::of(&cli)?;
    let Some(queue) = cli.queue.clone() else {
        return Err(Failure::Error(
            "no queue given: add --queue NAME (or set EVENTSINK_QUEUE)".into(),
        ));
    };
    if let Command::Dead(Dead::Replay {
        key: None,
        all: false,
        ..
    }) = cli.command
    {
        return Err(Failure::Error(
            "replay what? give a letter's KEY (see `dead list`), or --all --yes for every one"
                .into(),
        ));
    }
    let secrets = location.secrets();
    let done = async {
        let out: Result<String, Failure> = match open(&location, &queue).await? {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(backend) => command(backend, &cli, &queue).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(backend) => command(backend, &cli, &queue).await,
            #[cfg(feature = "redis")]
            Backend::Redis(backend) => command(backend, &cli, &queue).await,
        };
        out
    };
    done.await.map_err(|failure| scrub(failure, &secrets))
}

/// `failure` without any of `secrets` (a backend's error might quote them).
fn scrub(failure: Failure, secrets: &[String]) -> Failure {
    let clean = |mut text: String| {
        for secret in secrets {
            text = text.replace(secret.as_str(), "***");
        }
        text
    };
    match failure {
        Failure::Error(text) => Failure::Error(clean(text)),
        Failure::Refused(text) => Failure::Refused(clean(text)),
    }
}

/// Runs the command on the opened queue; what to print.
async fn command<B: QueueBackend<Value>>(
    backend: B,
    cli: &Cli,
    queue: &str,
) -> Result<String, Failure> {
    let dead = DeadLetters::<B, Value>::new(backend.clone());
    let json = cli.json;
    match &cli.command {
        Command::Stats => Ok(stats(&backend.stats().await?, queue, json)),
        Command::Dead(Dead::List { limit, offset }) => {
            let letters = dead.list(*offset, *limit).await?;
            let total = dead.count().await?;
            Ok(list(&letters, total, *offset, queue, json))
        }
        Command::Dead(Dead::Show { key }) => match dead.get(key).await? {
            Some(letter) => Ok(show(&letter, json)),
            None => Err(unknown_key(key, queue)),
        },
        Command::Dead(Dead::Replay { key: Some(key), .. }) => {
            if !dead.replay(key).await? {
                return Err(unknown_key(key, queue));
            }
            Ok(done(
                json,
                json!({"queue": queue, "replayed": 1, "key": key}),
                format!("replayed {key}: its event is back in queue {queue:?}\n"),
            ))
        }
        Command::Dead(Dead::Replay { yes, .. }) => {
            if !yes {
                let n = dead.count().await?;
                return Err(Failure::Refused(format!(
                    "replay --all would put {n} dead letter(s) of queue {queue:?} back into \
                     the queue, each to be delivered again; add --yes to do it"
                )));
            }
            let n = dead.replay_all().await?;
            Ok(done(
                json,
                json!({"queue": queue, "replayed": n}),
                format!("replayed {n} dead letter(s) of queue {queue:?}\n"),
            ))
        }
        Command::Dead(Dead::Purge { yes }) => {
            if !yes {
                let n = dead.count().await?;
                return Err(Failure::Refused(format!(
                    "purge would delete {n} dead letter(s) of queue {queue:?} for good; \
                     add --yes to do it (`dead list` shows them first)"
                )));
            }
            let n = dead.purge().await?;
            Ok(done(
                json,
                json!({"queue": queue, "purged": n}),
                format!("purged {n} dead letter(s) of queue {queue:?}\n"),
            ))
        }
    }
}

fn unknown_key(key: &str, queue: &str) -> Failure {
    Failure::Error(format!(
        "queue {queue:?} has no dead letter {key:?}: `eventsink dead list` shows the keys \
         ({{queue}}:{{kind}}:{{id}})"
    ))
}

/// `document` as JSON, or `text`.
fn done(json: bool, document: Value, text: String) -> String {
    if json { format!("{document}\n") } else { text }
}

fn stats(stats: &QueueStats, queue: &str, json: bool) -> String {
    if json {
        let mut document = serde_json::to_value(stats).unwrap_or_default();
        document["queue"] = json!(queue);
        return format!("{document}\n");
    }
    let oldest = stats.oldest_due.map_or_else(
        || "-".to_owned(),
        |due| {
            let behind = (Utc::now() - due).num_seconds().max(0);
            format!("{} ({behind} s ago)", time(due))
        },
    );
    table(
        None,
        vec![
            vec!["queue".into(), queue.into()],
            vec!["pending".into(), stats.pending.to_string()],
            vec!["scheduled".into(), stats.scheduled.to_string()],
            vec!["running".into(), stats.running.to_string()],
            vec!["dead".into(), stats.dead.to_string()],
            vec!["oldest due".into(), oldest],
        ],
    )
}

fn list(letters: &[DeadLetter], total: u64, offset: u64, queue: &str, json: bool) -> String {
    if json {
        let document =
            json!({"queue": queue, "total": total, "offset": offset, "letters": letters});
        return format!("{document}\n");
    }
    if letters.is_empty() {
        return format!(
            "no dead letters in queue {queue:?} from offset {offset} ({total} in all)\n"
        );
    }
    let rows = letters
        .iter()
        .map(|letter| {
            vec![
                letter.key.clone(),
                cause(letter),
                letter.attempts.to_string(),
                time(letter.failed_at),
                one_line(&letter.last_error, ERROR_WIDTH),
            ]
        })
        .collect();
    let header = ["KEY", "CAUSE", "ATTEMPTS", "FAILED AT", "LAST ERROR"];
    let shown = letters.len() as u64;
    format!(
        "{}{shown} of {total} dead letter(s) from offset {offset}; `dead show KEY` shows one\n",
        table(Some(&header), rows)
    )
}

fn show(letter: &DeadLetter, json: bool) -> String {
    if json {
        return format!("{}\n", json!(letter));
    }
    let payload = serde_json::to_string_pretty(&*letter.event.payload).unwrap_or_default();
    let rows = vec![
        vec!["key".into(), letter.key.clone()],
        vec!["kind".into(), letter.event.kind.to_string()],
        vec!["id".into(), letter.event.id.to_string()],
        vec!["created at".into(), time(letter.event.created_at)],
        vec!["cause".into(), cause(letter)],
        vec!["attempts".into(), letter.attempts.to_string()],
        vec!["failed at".into(), time(letter.failed_at)],
        vec!["chain".into(), letter.chain.clone()],
        vec!["last error".into(), letter.last_error.clone()],
    ];
    format!("{}payload:\n{payload}\n", table(None, rows))
}

/// Why a letter died, as its JSON says it (`permanent`, ...).
fn cause(letter: &DeadLetter) -> String {
    match json!(letter.cause) {
        Value::String(cause) => cause,
        other => other.to_string(),
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `text` on one line, cut to `width` characters.
fn one_line(text: &str, width: usize) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= width {
        return line;
    }
    let cut: String = line.chars().take(width.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// `rows` (under `header`) in columns aligned with spaces; the last column
/// is not padded.
fn table(header: Option<&[&str]>, rows: Vec<Vec<String>>) -> String {
    let header = header.map(|h| h.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
    let all: Vec<&Vec<String>> = header.iter().chain(rows.iter()).collect();
    let columns = all.iter().map(|row| row.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            let widest = all.iter().filter_map(|row| row.get(c));
            widest.map(|cell| cell.chars().count()).max().unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in all {
        let last = row.len().saturating_sub(1);
        for (c, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if c < last {
                let pad = widths[c] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords_in_user_info_and_parameters() {
        let (shown, secrets) = redact("postgres://app:s3cret@db:5432/app?sslmode=require");
        assert_eq!(shown, "postgres://app:***@db:5432/app?sslmode=require");
        assert_eq!(secrets, ["s3cret"]);
        let (shown, secrets) = redact("postgres://app@db/app?password=s3cret&x=1");
        assert_eq!(shown, "postgres://app@db/app?password=***&x=1");
        assert_eq!(secrets, ["s3cret"]);
        let (shown, secrets) = redact("redis://:pw@127.0.0.1:6379/");
        assert_eq!(shown, "redis://:***@127.0.0.1:6379/");
        assert_eq!(secrets, ["pw"]);
        assert_eq!(redact("redis://127.0.0.1/").0, "redis://127.0.0.1/");
    }

    #[test]
    fn table_aligns_columns() {
        let out = table(
            Some(&["A", "B"]),
            vec![
                vec!["long cell".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        assert_eq!(out, "A          B\nlong cell  x\ns          y\n");
    }
}
