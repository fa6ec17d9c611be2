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
    /// Administration: users, token keys, executor node tokens.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Run a build node: register with the build manager, pull jobs, build
    /// them with the local engine, push the results.
    Executor(ExecutorArgs),
    /// Build a local directory on the server's executors and stream the logs
    /// (like `docker build`, but remote).
    Build(BuildArgs),
    /// Save the server URL and credentials for `dockyard build`.
    Login {
        /// The server, e.g. https://registry.example.com.
        url: String,
        /// User (or robot) name.
        #[arg(long, short = 'u')]
        username: String,
        /// Read the password or token from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Args, Debug)]
struct ExecutorArgs {
    /// The build manager: the Dockyard server's base URL.
    #[arg(long, value_name = "URL", env = "DOCKYARD_MANAGER")]
    manager: String,
    /// Node token (`dockyard admin executor-token create NAME`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "DOCKYARD_EXECUTOR_TOKEN",
        hide_env_values = true
    )]
    token: String,
    /// Platforms this node builds, comma-separated (default: the host's).
    #[arg(long, value_delimiter = ',', value_name = "PLATFORMS")]
    platforms: Vec<String>,
    /// Build engine.
    #[arg(long, default_value = "docker", value_parser = ["docker"])]
    engine: String,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    capacity: u32,
    /// Name shown in the API (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Where sources are checked out.
    #[arg(long, value_name = "DIR", env = "DOCKYARD_EXECUTOR_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// Dockerfile, relative to DIR.
    #[arg(long, short = 'f', default_value = "Dockerfile")]
    file: String,
    /// Build argument KEY=VALUE (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// Stage to build.
    #[arg(long)]
    target: Option<String>,
    /// Platforms, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "linux/amd64")]
    platform: Vec<String>,
    /// Image name namespace/name[:tag] (repeatable, one repository).
    #[arg(long, short = 't', required = true)]
    tag: Vec<String>,
    /// No progress bars.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// The build context.
    dir: PathBuf,
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
    /// Node tokens of build executors.
    ExecutorToken {
        #[command(subcommand)]
        command: ExecutorTokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ExecutorTokenCommand {
    /// Create a node token and print it (shown once).
    Create {
        #[command(flatten)]
        config: ConfigArgs,
        /// A name for the node.
        name: String,
    },
    /// Revoke node tokens by id or name; their jobs go to other executors.
    Revoke {
        #[command(flatten)]
        config: ConfigArgs,
        id_or_name: String,
    },
    /// List node tokens.
    List {
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
        Command::Executor(args) => executor(args).await?,
        Command::Build(args) => {
            let code = build(args).await?;
            std::process::exit(code);
        }
        Command::Login {
            url,
            username,
            password_stdin,
        } => {
            let password = if password_stdin {
                let mut p = String::new();
                std::io::stdin().read_line(&mut p)?;
                p.trim_end_matches(['\r', '\n']).to_string()
            } else {
                std::env::var("DOCKYARD_PASSWORD").map_err(|_| {
                    anyhow::anyhow!("give the password with --password-stdin or DOCKYARD_PASSWORD")
                })?
            };
            let path = dockyard_builders::cli::Credentials {
                url: url.trim_end_matches('/').to_string(),
                username,
                password,
            }
            .login()
            .await?;
            println!("login succeeded; credentials saved in {}", path.display());
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
        AdminCommand::ExecutorToken { command } => executor_tokens(command).await?,
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

async fn build_manager(config: &Config) -> anyhow::Result<dockyard_buildmanager::BuildManager> {
    std::fs::create_dir_all(&config.data_dir)?;
    let db = dockyard_core::Db::connect(&config.database_url(), 2).await?;
    let registry = std::sync::Arc::new(dockyard_registry::Registry::open_with(db.clone(), config)?);
    let keys = std::sync::Arc::new(dockyard_core::token::TokenKeys::load_or_create(
        &config.keys_dir(),
        &config.auth.issuer,
    )?);
    Ok(dockyard_buildmanager::BuildManager::new(
        db.clone(),
        dockyard_core::identity::Identity::new(db),
        keys,
        registry.clone(),
        registry.storage.object_store(),
        dockyard_buildmanager::Settings::from_config(config, config.listen),
    ))
}

async fn executor_tokens(command: ExecutorTokenCommand) -> anyhow::Result<()> {
    let invalid =
        |e: dockyard_core::config::ConfigError| anyhow::anyhow!("invalid configuration:\n{e}");
    match command {
        ExecutorTokenCommand::Create { config, name } => {
            let config = load(&config, None).map_err(invalid)?;
            let m = build_manager(&config).await?;
            let (info, token) = m.create_node_token(&name, "admin-cli").await?;
            eprintln!(
                "created node token {} ({}); it is shown once:",
                info.id, info.name
            );
            println!("{token}");
        }
        ExecutorTokenCommand::Revoke { config, id_or_name } => {
            let config = load(&config, None).map_err(invalid)?;
            let m = build_manager(&config).await?;
            let n = m.revoke_node_token(&id_or_name).await?;
            println!("revoked {n} node token(s)");
        }
        ExecutorTokenCommand::List { config } => {
            let config = load(&config, None).map_err(invalid)?;
            let m = build_manager(&config).await?;
            for t in m.node_tokens().await? {
                println!(
                    "{}\t{}\t{}",
                    t.id,
                    t.name,
                    if t.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
        }
    }
    Ok(())
}

async fn executor(args: ExecutorArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOCKYARD_LOG_LEVEL")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let platforms = args
        .platforms
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| p.parse())
        .collect::<Result<Vec<dockyard_oci::build::Platform>, _>>()?;
    let engine = dockyard_builders::engine::DockerEngine::connect(None)
        .await
        .context("cannot reach the Docker engine (is dockerd running? DOCKER_HOST?)")?;
    let work_dir = args
        .work_dir
        .unwrap_or_else(|| std::env::temp_dir().join("dockyard-executor"));
    let mut config = dockyard_builders::AgentConfig::new(
        args.manager.trim_end_matches('/'),
        args.token,
        std::sync::Arc::new(engine),
        work_dir,
    );
    if let Some(name) = args.name {
        config.name = name;
    }
    config.platforms = platforms;
    config.capacity = args.capacity;
    config.drain_timeout = Duration::from_secs(10);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        s.cancel();
    });
    dockyard_builders::run(config, shutdown).await?;
    Ok(())
}

/// `dockyard build`: the process exit code (0 when the build completed).
async fn build(args: BuildArgs) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    let creds = dockyard_builders::cli::Credentials::find()?;
    let mut build_args = std::collections::BTreeMap::new();
    for a in &args.build_args {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            // `--build-arg NAME` takes the value from the environment.
            None => (a.clone(), std::env::var(a).unwrap_or_default()),
        };
        build_args.insert(k, v);
    }
    let cmd = dockyard_builders::cli::BuildCommand {
        context: args.dir,
        dockerfile: args.file,
        build_args,
        target: args.target,
        platforms: args.platform,
        tags: args.tag,
        quiet: args.quiet || !std::io::stderr().is_terminal(),
    };
    let outcome = dockyard_builders::cli::build(&creds, &cmd).await?;
    if outcome.status == "complete" {
        eprintln!(
            "build {} complete: {}",
            outcome.build_id,
            outcome.manifest_digest.as_deref().unwrap_or("")
        );
        Ok(0)
    } else {
        eprintln!(
            "build {} {}: {}",
            outcome.build_id,
            outcome.status,
            outcome.error.as_deref().unwrap_or("no error reported")
        );
        Ok(1)
    }
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
