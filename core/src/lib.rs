//! Dockyard's shared foundation: the typed configuration (one TOML file with
//! `DOCKYARD_*` environment overrides), the metadata database (SQLite or
//! PostgreSQL through `sqlx`, with migrations) and the registry token keys
//! (Docker token authentication JWTs), and the event log that feature
//! crates react to.
//!
//! Every feature crate may use this crate; it must not depend on any of them
//! and must not serve HTTP.

pub mod config;
pub mod db;
pub mod events;
pub mod identity;
pub mod images;
pub mod ratelimit;
pub mod token;

pub use config::Config;
pub use db::{Backend, Db, DbError};

/// Milliseconds since the Unix epoch, the unit of every timestamp column.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
