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
    /// Administration: users, token keys.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Create a user; the password is read from standard input.
    CreateUser {
        #[command(flatten)]
        config: ConfigArgs,
        /// User name (lowercase letters, digits, '-' and '_').
        name: String,
        /// Make the user a superuser.
        #[arg(long)]
        superuser: bool,
    },
    /// Print the PEM certificates that verify Dockyard's tokens (for
    /// notary-server's `rootcertbundle`).
    TokenCert {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Add a new token signing key; tokens signed by older keys stay valid
    /// until they expire.
    RotateTokenKey {
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
                if let Some(b) = &c.bootstrap_admin {
                    let user = b.split(':').next().unwrap_or("");
                    c.bootstrap_admin = Some(format!("{user}:<redacted>"));
                }
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
        Command::Admin { command } => admin(command).await?,
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

async fn admin(command: AdminCommand) -> anyhow::Result<()> {
    let invalid =
        |e: dockyard_core::config::ConfigError| anyhow::anyhow!("invalid configuration:\n{e}");
    match command {
        AdminCommand::CreateUser {
            config,
            name,
            superuser,
        } => {
            let config = load(&config, None).map_err(invalid)?;
            std::fs::create_dir_all(&config.data_dir)?;
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.len() < 8 {
                anyhow::bail!("the password must have at least 8 characters");
            }
            let db = dockyard_core::Db::connect(&config.database_url(), 2).await?;
            let identity = dockyard_core::identity::Identity::new(db);
            identity
                .create_user(&name, Some(password), superuser)
                .await?;
            println!(
                "created user {name}{}",
                if superuser { " (superuser)" } else { "" }
            );
        }
        AdminCommand::TokenCert { config } => {
            let config = load(&config, None).map_err(invalid)?;
            let keys = dockyard_core::token::TokenKeys::load_or_create(
                &config.keys_dir(),
                &config.auth.issuer,
            )?;
            print!("{}", keys.certificates_pem());
        }
        AdminCommand::RotateTokenKey { config } => {
            let config = load(&config, None).map_err(invalid)?;
            let keys =
                dockyard_core::token::TokenKeys::rotate(&config.keys_dir(), &config.auth.issuer)?;
            println!(
                "new signing key {}; restart the servers to use it",
                keys.kid()
            );
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
