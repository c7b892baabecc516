//! The apalis schema contract: a queue opens only on a database whose apalis
//! migrations this crate knows.
//!
//! The SQLite backend writes apalis' `Jobs` rows itself, and every SQL
//! backend relies on apalis' tables as the pinned apalis crates define them.
//! A database migrated by a newer apalis (another program, or another build
//! of the application, ran its migrations) may have a schema in which the
//! rows written here are never fetched: `publish` would return `Ok` and
//! nothing would be delivered. So before migrating, `open`/`connect` compare
//! the migrations recorded in the database (`_sqlx_migrations`, or
//! `apalis._sqlx_migrations` on Postgres) with the ones embedded in the
//! pinned apalis crate, and refuse with [`QueueError::NewerSchema`] when the
//! database has one this crate does not know.
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use eventsink::queue::{QueueError, SqliteQueue};
//! # let tmp = tempfile::tempdir()?;
//! # let path = tmp.path().join("queue.db");
//!
//! let queue: SqliteQueue = SqliteQueue::open(&path, "webhooks").await?;
//! // A newer apalis migrates the same file...
//! sqlx::query(
//!     "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
//!      VALUES (29991231000000, 'from a newer apalis', 1, x'00', 0)",
//! )
//! .execute(queue.pool())
//! .await?;
//! // ...and this eventsink no longer opens it.
//! let err = SqliteQueue::<serde_json::Value>::open(&path, "webhooks").await.unwrap_err();
//! assert!(matches!(err, QueueError::NewerSchema { .. }));
//! assert!(err.to_string().contains("Upgrade eventsink"));
//! # Ok(()) }
//! # #[cfg(not(feature = "sqlite"))] fn main() {}
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;

use sqlx::migrate::Migrator;
use sqlx::{ColumnIndex, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};

use super::error::QueueError;
use super::sql::Dialect;

/// The versions of the migrations `migrator` would apply.
fn known_versions(migrator: &Migrator) -> BTreeSet<i64> {
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .collect()
}

/// `Ok` when every applied migration is one `migrator` knows; otherwise
/// [`QueueError::NewerSchema`] naming the unknown ones.
fn compare(
    queue: &Arc<str>,
    apalis: &'static str,
    applied: impl IntoIterator<Item = i64>,
    migrator: &Migrator,
) -> Result<(), QueueError> {
    let known = known_versions(migrator);
    let mut unknown: Vec<i64> = applied.into_iter().filter(|v| !known.contains(v)).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    Err(QueueError::NewerSchema {
        queue: Arc::clone(queue),
        apalis,
        unknown,
        newest_known: known.last().copied().unwrap_or_default(),
    })
}

/// Checks the apalis migrations recorded in the database of `pool` against
/// those of the pinned apalis crate of its [`Dialect`] (a database without
/// apalis' migrations table passes).
pub(crate) async fn check<DB>(pool: &Pool<DB>, queue: &Arc<str>) -> Result<(), QueueError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'r> bool: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
{
    let (apalis, migrator) = DB::apalis();
    let fail = |e| QueueError::backend(queue, "reading apalis' migrations", e);
    let table = migrator.table_name.to_string();
    let exists = sqlx::query(DB::SQL.migrations_exist)
        .bind(table.clone())
        .fetch_one(pool)
        .await
        .map_err(fail)?;
    if !exists.try_get::<bool, _>(0).map_err(fail)? {
        return Ok(());
    }
    let versions = DB::SQL.versions.replace("{table}", &table);
    let rows = sqlx::query(sqlx::AssertSqlSafe(versions))
        .fetch_all(pool)
        .await
        .map_err(fail)?;
    let applied: Vec<i64> = rows
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    compare(queue, apalis, applied, &migrator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migrator() -> Migrator {
        let mut migrator = Migrator::DEFAULT;
        migrator.migrations = vec![
            sqlx::migrate::Migration::new(
                1,
                "one".into(),
                sqlx::migrate::MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(""),
                false,
            ),
            sqlx::migrate::Migration::new(
                2,
                "two".into(),
                sqlx::migrate::MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(""),
                false,
            ),
        ]
        .into();
        migrator
    }

    #[test]
    fn known_or_fewer_migrations_pass() {
        let q: Arc<str> = "q".into();
        assert!(compare(&q, "apalis-x", [], &migrator()).is_ok());
        assert!(compare(&q, "apalis-x", [1], &migrator()).is_ok());
        assert!(compare(&q, "apalis-x", [2, 1], &migrator()).is_ok());
    }

    #[test]
    fn an_unknown_migration_is_a_permanent_error_naming_both_versions() {
        let q: Arc<str> = "q".into();
        let err = compare(&q, "apalis-x", [1, 2, 7, 5], &migrator()).unwrap_err();
        assert!(!crate::Retryable::is_retryable(&err));
        match &err {
            QueueError::NewerSchema {
                unknown,
                newest_known,
                ..
            } => assert_eq!((unknown.as_slice(), *newest_known), (&[5, 7][..], 2)),
            other => panic!("{other:?}"),
        }
        let text = err.to_string();
        for part in ["[5, 7]", "is 2", "apalis-x", "Upgrade eventsink"] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
    }
}
