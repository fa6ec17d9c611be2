//! Dockyard's integration tests: one binary that boots the real server on
//! an ephemeral port and drives it over HTTP, and with real clients.
//!
//! Backends are chosen by the environment (set by `cargo xtask test`):
//! - `DOCKYARD_TEST_POSTGRES_URL`: run on PostgreSQL (a fresh database per
//!   test) instead of SQLite;
//! - `DOCKYARD_TEST_S3_ENDPOINT`: store blobs in that S3 server (a fresh
//!   bucket per test) instead of the filesystem.

mod access;
mod api;
mod auth;
mod builds;
mod cli;
mod clients;
mod crash;
mod events;
mod harness;
mod notary;
mod rebuilds;
mod registry_api;
mod webhooks;
