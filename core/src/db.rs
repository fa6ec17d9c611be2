//! The metadata database: SQLite (default, one file) or PostgreSQL, through
//! `sqlx`'s `Any` driver so one set of queries serves both. Queries use `$1`
//! placeholders, which both backends accept.
//!
//! SQLite allows one writer at a time; instead of letting writers fight over
//! the lock (and fail with `SQLITE_BUSY` when a read transaction upgrades),
//! writes go through a one-connection pool and reads through a wider one.
//! With PostgreSQL both pools are the same.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions};

/// Which database is behind the pool; a few statements differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot prepare the database: {0}")]
    Setup(String),
}

/// Pools for reading and writing metadata.
#[derive(Clone, Debug)]
pub struct Db {
    /// Pool for queries that only read.
    pub read: AnyPool,
    /// Pool for transactions that write (one connection on SQLite).
    pub write: AnyPool,
    /// The backend in use.
    pub backend: Backend,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// Connects (creating a SQLite file if needed) and runs migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let db = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                let opts = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
                let pool = |n: u32| {
                    AnyPoolOptions::new()
                        .max_connections(n)
                        .min_connections(1)
                        .acquire_timeout(Duration::from_secs(30))
                        .after_connect(|conn, _| {
                            Box::pin(async move {
                                for pragma in [
                                    "PRAGMA journal_mode = WAL",
                                    "PRAGMA synchronous = NORMAL",
                                    "PRAGMA foreign_keys = ON",
                                    "PRAGMA busy_timeout = 10000",
                                ] {
                                    sqlx::Executor::execute(&mut *conn, pragma).await?;
                                }
                                Ok(())
                            })
                        })
                        .connect_with(opts.clone())
                };
                let write = pool(1).await?;
                let read = pool(max_connections.max(2)).await?;
                Db {
                    read,
                    write,
                    backend,
                }
            }
            Backend::Postgres => {
                let opts = AnyConnectOptions::from_str(url)?.disable_statement_logging();
                let pool = AnyPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(opts)
                    .await?;
                Db {
                    read: pool.clone(),
                    write: pool,
                    backend,
                }
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), DbError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.write).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.write).await?,
        }
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }
}

/// `$first, $first+1, …` (`n` of them), for an `IN (…)` list of binds.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_connects_migrates_and_binds_dollar_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::connect(&url, 4).await.unwrap();
        db.ping().await.unwrap();
        sqlx::query("INSERT INTO repositories (name, created_at) VALUES ($1, $2)")
            .bind("a/b")
            .bind(1_i64)
            .execute(&db.write)
            .await
            .unwrap();
        let (n,): (String,) = sqlx::query_as("SELECT name FROM repositories WHERE name = $1")
            .bind("a/b")
            .fetch_one(&db.read)
            .await
            .unwrap();
        assert_eq!(n, "a/b");
        // Migrating twice is a no-op.
        db.migrate().await.unwrap();
    }

    #[test]
    fn placeholders_number_binds_from_first() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(placeholders(1, 0), "");
    }
}
