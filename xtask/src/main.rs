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
