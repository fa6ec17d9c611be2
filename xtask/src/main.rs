//! `cargo xtask`: developer automation. `test` installs and starts what the
//! tests need (Debian packages, dockerd, PostgreSQL, an S3 server) and runs
//! every test; `bench` compares Dockyard with CNCF Distribution.

mod bench;
mod test_env;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install test prerequisites, start services, run every test.
    Test(test_env::TestArgs),
    /// Run the benchmark against Dockyard and CNCF Distribution.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Test(a) => test_env::run(a),
        Cmd::Bench(a) => bench::run(a),
    }
}

/// The workspace root. Taken from `CARGO_MANIFEST_DIR` as cargo sets it when
/// it runs this binary, not as it was at compile time: a target directory
/// shared between checkouts (CI's cache) may hold a binary built in another
/// checkout.
pub(crate) fn workspace_root() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    Ok(manifest
        .parent()
        .context("workspace root of the xtask crate")?
        .to_path_buf())
}
