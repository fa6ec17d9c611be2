//! `cargo xtask test` (to be written).

#[derive(clap::Args)]
pub struct TestArgs {}

pub fn run(_args: TestArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
