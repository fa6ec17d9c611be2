//! The `dockyard` binary: subcommands only. Each subcommand loads the
//! configuration once and hands it to the crate that does the work.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dockyard_core::Config;
use dockyard_core::config::LogFormat;
use figment::providers::Serialized;

#[derive(Parser, Debug)]
#[command(
    name = "dockyard",
    version,
    about = "Dockyard: an OCI container registry with a build and supply-chain platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every subcommand that reads the configuration.
#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML). Settings can also come from DOCKYARD_* environment variables.
    #[arg(long, short = 'c', value_name = "FILE", env = "DOCKYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the SQLite database and filesystem storage.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the registry server.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address to listen on, e.g. 0.0.0.0:5000.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Delete blobs that no manifest references (run with the server stopped or read-only).
    Gc {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Keep blobs younger than this (e.g. 30m, 2h); default from gc.grace_period.
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        /// Also delete manifests that no tag, index or subject keeps.
        #[arg(long)]
        delete_untagged: bool,
    },
    /// Create or upgrade the database schema and exit.
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Check the configuration and explain every problem found.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print the effective configuration as TOML.
    Show {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn load(
    args: &ConfigArgs,
    listen: Option<std::net::SocketAddr>,
) -> Result<Config, dockyard_core::config::ConfigError> {
    let mut f = Config::figment(args.config.as_deref());
    if let Some(d) = &args.data_dir {
        f = f.merge(Serialized::default("data_dir", d));
    }
    if let Some(l) = listen {
        f = f.merge(Serialized::default("listen", l.to_string()));
    }
    Config::load(f)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen } => {
            let config = load(&config, listen)
                .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
            init_logging(&config);
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("cannot create data directory {}", config.data_dir.display())
            })?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let s = shutdown.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down");
                s.cancel();
            });
            let tls = config.tls.cert.is_some();
            dockyard_web_api::serve(config, shutdown, |addr| {
                tracing::info!(%addr, tls, "dockyard listening");
            })
            .await?;
        }
        Command::Config { command } => match command {
            ConfigCommand::Check { config } => match load(&config, None) {
                Ok(c) => {
                    println!("configuration is valid");
                    println!("  listen:   {}", c.listen);
                    println!("  database: {}", redact(&c.database_url()));
                    println!(
                        "  storage:  {:?} {}",
                        c.storage.kind,
                        c.storage_path().display()
                    );
                }
                Err(e) => {
                    eprintln!("configuration has {} problem(s):", e.problems.len());
                    for p in &e.problems {
                        eprintln!("  - {p}");
                    }
                    std::process::exit(2);
                }
            },
            ConfigCommand::Show { config } => {
                let c = load(&config, None)
                    .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
                let mut c = c;
                if c.storage.secret_access_key.is_some() {
                    c.storage.secret_access_key = Some("<redacted>".into());
                }
                c.database.url = c.database.url.as_deref().map(redact);
                print!("{}", toml::to_string_pretty(&c)?);
            }
        },
        Command::Gc {
            config,
            dry_run,
            grace,
            delete_untagged,
        } => {
            let config =
                load(&config, None).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
            init_logging(&config);
            let registry = dockyard_registry::Registry::open(&config).await?;
            let opts = dockyard_registry::gc::GcOptions {
                grace: grace.unwrap_or(config.gc.grace_period),
                dry_run,
                delete_untagged,
            };
            let report = dockyard_registry::gc::collect(&registry, &opts).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Migrate { config } => {
            let config =
                load(&config, None).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
            std::fs::create_dir_all(&config.data_dir)?;
            dockyard_core::Db::connect(&config.database_url(), 1).await?;
            println!("database is up to date");
        }
    }
    Ok(())
}

/// Hides the password of a database URL.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:<redacted>{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h/db"),
            "postgres://u:<redacted>@h/db"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
