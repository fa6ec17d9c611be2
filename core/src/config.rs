//! Configuration: one typed tree, loaded once at start-up from defaults, an
//! optional TOML file and `DOCKYARD_*` environment variables (in that order of
//! precedence, the last winning). Nothing reads the environment after this.
//!
//! Environment names are the setting's path joined by `_` and upper-cased:
//! `storage.kind` is `DOCKYARD_STORAGE_KIND`, `data_dir` is
//! `DOCKYARD_DATA_DIR`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Directory for the SQLite database and filesystem blob storage.
    pub data_dir: PathBuf,
    /// Metadata database.
    pub database: DatabaseConfig,
    /// Blob storage.
    pub storage: StorageConfig,
    /// TLS: serve HTTPS when both files are set.
    pub tls: TlsConfig,
    /// Registry limits.
    pub registry: RegistryConfig,
    /// Garbage collection.
    pub gc: GcConfig,
    /// Logging.
    pub log: LogConfig,
    /// Token authentication.
    pub auth: AuthConfig,
    /// The Notary server that trusts Dockyard's tokens.
    pub notary: NotaryConfig,
    /// The build manager and the in-process executor.
    pub builds: BuildsConfig,
    /// The event log.
    pub events: EventsConfig,
    /// Outbound webhook delivery.
    pub webhooks: WebhooksConfig,
    /// `user:password` of a superuser to create at start-up if no user of
    /// that name exists (`DOCKYARD_BOOTSTRAP_ADMIN`).
    pub bootstrap_admin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `iss` of the tokens Dockyard issues.
    pub issuer: String,
    /// The registry's service name (`aud` of its tokens).
    pub service: String,
    /// Lifetime of registry tokens.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Public base URL used in the `WWW-Authenticate` realm (default: taken
    /// from each request's `Host` and scheme).
    pub realm: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: "dockyard".into(),
            service: "dockyard".into(),
            token_ttl: Duration::from_secs(300),
            realm: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotaryConfig {
    /// Service name the Notary server is configured with (`aud` of tokens
    /// issued for it).
    pub service: String,
}

impl Default for NotaryConfig {
    fn default() -> Self {
        NotaryConfig {
            service: "dockyard-notary".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildsConfig {
    /// Run an executor inside `dockyard serve` when a Docker engine is
    /// reachable (`DOCKYARD_BUILDS_LOCAL_EXECUTOR`).
    pub local_executor: bool,
    /// Jobs the in-process executor runs at once.
    pub local_capacity: u32,
    /// The registry as executors' engines reach it (`host:port`); default
    /// `127.0.0.1:<listen port>`, right for executors on this machine.
    pub registry_host: Option<String>,
    /// Public base URL of this server for webhook URLs shown to users
    /// (default: from each request's `Host`).
    pub public_url: Option<String>,
    /// A build running longer is failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A job whose executor is silent this long is given to another one.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How many executors may try a job before the build fails.
    pub max_attempts: u32,
    /// Largest uploaded build context.
    pub max_context_size: u64,
    /// Allow build definitions whose git source is a local path or
    /// `file://` URL. Off by default: it would let repository admins build
    /// any repository on the executors' disks.
    pub allow_local_git: bool,
    /// Pushes of a base image within this window cause one rebuild of each
    /// dependent definition.
    #[serde(with = "humantime_serde")]
    pub rebuild_debounce: Duration,
    /// When base images in other registries are checked for a new digest: a
    /// cron expression with seconds (`sec min hour day month weekday`);
    /// definitions may set their own.
    pub base_check_schedule: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Pulls are counted in memory and written as one event per manifest
    /// this often, so a pull storm is not a write storm.
    #[serde(with = "humantime_serde")]
    pub pull_flush_interval: Duration,
    /// Events older than this are pruned once every consumer has read them.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            pull_flush_interval: Duration::from_secs(10),
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Attempts per delivery before it is marked dead.
    pub max_attempts: u32,
    /// Time allowed for one attempt (connect, send, response).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay; doubles each attempt, with jitter.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Deliveries in flight at once across all targets.
    pub concurrency: u32,
    /// Allow targets on loopback and private addresses. Off by default so
    /// that a repository admin cannot make the server call internal
    /// services.
    pub allow_private_targets: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            max_attempts: 10,
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            concurrency: 32,
            allow_private_targets: false,
        }
    }
}

impl Default for BuildsConfig {
    fn default() -> Self {
        BuildsConfig {
            local_executor: true,
            local_capacity: 2,
            registry_host: None,
            public_url: None,
            timeout: Duration::from_secs(3600),
            lease: Duration::from_secs(30),
            max_attempts: 3,
            max_context_size: 2 << 30,
            allow_local_git: false,
            rebuild_debounce: Duration::from_secs(30),
            base_check_schedule: "0 */15 * * * *".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:5000".parse().expect("static address"),
            data_dir: PathBuf::from("dockyard-data"),
            database: DatabaseConfig::default(),
            storage: StorageConfig::default(),
            tls: TlsConfig::default(),
            registry: RegistryConfig::default(),
            gc: GcConfig::default(),
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            notary: NotaryConfig::default(),
            builds: BuildsConfig::default(),
            events: EventsConfig::default(),
            webhooks: WebhooksConfig::default(),
            bootstrap_admin: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://…`. Default: `sqlite://<data_dir>/dockyard.db`.
    pub url: Option<String>,
    /// Largest number of pooled connections.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            max_connections: 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    Filesystem,
    S3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `filesystem` (default) or `s3`.
    pub kind: StorageKind,
    /// Filesystem root. Default: `<data_dir>/storage`.
    pub path: Option<PathBuf>,
    /// S3 bucket.
    pub bucket: Option<String>,
    /// S3 endpoint URL, for S3-compatible servers (MinIO, Garage, …).
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: String,
    /// S3 access key id; from the environment's usual AWS variables if unset.
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain-HTTP endpoints (for a local S3 server).
    pub allow_http: bool,
    /// Key prefix inside the bucket.
    pub prefix: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::Filesystem,
            path: None,
            bucket: None,
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            prefix: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Largest manifest accepted, in bytes.
    pub max_manifest_size: u64,
    /// Largest page of `_catalog` and tag lists.
    pub max_page_size: u32,
    /// Upload sessions untouched this long are abandoned and removed.
    #[serde(with = "humantime_serde")]
    pub upload_expiry: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_size: 4 * 1024 * 1024,
            max_page_size: 10_000,
            upload_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Blobs younger than this are never collected, so in-flight pushes are
    /// safe.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace_period: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (default) or `text`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `dockyard=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

/// Sections whose keys can be set from the environment as
/// `DOCKYARD_<SECTION>_<KEY>`.
const SECTIONS: [&str; 11] = [
    "database", "storage", "tls", "registry", "gc", "log", "auth", "notary", "builds", "events",
    "webhooks",
];
const TOP_LEVEL: [&str; 3] = ["listen", "data_dir", "bootstrap_admin"];

/// Maps an environment variable name (without `DOCKYARD_`, lower-cased) to a
/// setting path, or `None` when it is not a setting (e.g. `DOCKYARD_URL` used
/// by the CLI).
fn env_key(key: &str) -> Option<String> {
    if TOP_LEVEL.contains(&key) {
        return Some(key.to_string());
    }
    SECTIONS.iter().find_map(|s| {
        key.strip_prefix(s)
            .and_then(|r| r.strip_prefix('_'))
            .filter(|r| !r.is_empty())
            .map(|r| format!("{s}.{r}"))
    })
}

/// A configuration that could not be loaded or is inconsistent; `Display`
/// lists every problem, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// The figment this configuration is extracted from; exposed so the
    /// binary can merge command-line flags on top.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut f = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            f = f.merge(Toml::file_exact(file));
        }
        f.merge(
            Env::prefixed("DOCKYARD_")
                .filter_map(|k| env_key(&k.as_str().to_ascii_lowercase()).map(Into::into))
                .split("."),
        )
    }

    /// Loads and validates.
    pub fn load(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| ConfigError {
            problems: e.into_iter().map(|e| e.to_string()).collect(),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Every inconsistency between settings, in words an operator can act on.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) | (None, Some(_)) => p.push(
                "tls: set both tls.cert and tls.key (DOCKYARD_TLS_CERT, DOCKYARD_TLS_KEY), or neither"
                    .into(),
            ),
            (Some(c), Some(k)) => {
                for (what, f) in [("tls.cert", c), ("tls.key", k)] {
                    if !f.is_file() {
                        p.push(format!("{what}: {} is not a readable file", f.display()));
                    }
                }
            }
            (None, None) => {}
        }
        if self.storage.kind == StorageKind::S3 && self.storage.bucket.is_none() {
            p.push(
                "storage.bucket: required when storage.kind = \"s3\" (DOCKYARD_STORAGE_BUCKET)"
                    .into(),
            );
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres:")
                || url.starts_with("postgresql:"))
        {
            p.push(format!(
                "database.url: {url:?} must start with sqlite:// or postgres://"
            ));
        }
        if let Err(e) = self.builds.base_check_schedule.parse::<cron::Schedule>() {
            p.push(format!(
                "builds.base_check_schedule: {:?} is not a cron expression with seconds: {e}",
                self.builds.base_check_schedule
            ));
        }
        if self.webhooks.max_attempts == 0 || self.webhooks.concurrency == 0 {
            p.push("webhooks.max_attempts and webhooks.concurrency: must be at least 1".into());
        }
        if self.database.max_connections == 0 {
            p.push("database.max_connections: must be at least 1".into());
        }
        if self.registry.max_manifest_size < 1024 {
            p.push("registry.max_manifest_size: must be at least 1024 bytes".into());
        }
        if self.registry.max_page_size == 0 {
            p.push("registry.max_page_size: must be at least 1".into());
        }
        if let Some(b) = &self.bootstrap_admin
            && !b
                .split_once(':')
                .is_some_and(|(u, p)| !u.is_empty() && !p.is_empty())
        {
            p.push("bootstrap_admin: must be user:password (DOCKYARD_BOOTSTRAP_ADMIN)".into());
        }
        if self.builds.lease.as_secs() < 5 {
            p.push("builds.lease: must be at least 5s".into());
        }
        if self.builds.max_attempts == 0 {
            p.push("builds.max_attempts: must be at least 1".into());
        }
        if let Some(h) = &self.builds.registry_host
            && (h.is_empty() || h.contains('/') || h.contains("://"))
        {
            p.push(format!(
                "builds.registry_host: {h:?} must be host:port as build engines reach the registry"
            ));
        }
        if self.auth.token_ttl.as_secs() < 30 {
            p.push("auth.token_ttl: must be at least 30s".into());
        }
        if self.auth.service == self.notary.service {
            p.push("notary.service: must differ from auth.service".into());
        }
        if let Err(e) = self.log.level.parse::<LevelCheck>() {
            p.push(format!("log.level: {e}"));
        }
        p
    }

    /// The database URL, defaulting to SQLite in the data directory.
    pub fn database_url(&self) -> String {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("dockyard.db").display()))
    }

    /// Where the token signing keys live.
    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }

    /// The filesystem storage root.
    pub fn storage_path(&self) -> PathBuf {
        self.storage
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("storage"))
    }
}

/// A light syntax check of a `tracing` filter string, so that `config check`
/// can report it without this crate depending on `tracing-subscriber`.
struct LevelCheck;

impl std::str::FromStr for LevelCheck {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        for directive in s.split(',').filter(|d| !d.is_empty()) {
            let level = directive.rsplit('=').next().unwrap_or("");
            let bare = !directive.contains('=');
            if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) && !bare {
                return Err(format!("{level:?} is not a level ({})", LEVELS.join(", ")));
            }
            if bare
                && !LEVELS.contains(&level.to_ascii_lowercase().as_str())
                && !level
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            {
                return Err(format!("{directive:?} is not a level or a target"));
            }
        }
        Ok(LevelCheck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys() {
        assert_eq!(env_key("listen").as_deref(), Some("listen"));
        assert_eq!(env_key("data_dir").as_deref(), Some("data_dir"));
        assert_eq!(env_key("storage_kind").as_deref(), Some("storage.kind"));
        assert_eq!(
            env_key("registry_max_manifest_size").as_deref(),
            Some("registry.max_manifest_size")
        );
        assert_eq!(env_key("url"), None);
        assert_eq!(env_key("notary_service").as_deref(), Some("notary.service"));
        assert_eq!(
            env_key("bootstrap_admin").as_deref(),
            Some("bootstrap_admin")
        );
        assert_eq!(env_key("storage"), None);
        assert_eq!(
            env_key("builds_local_executor").as_deref(),
            Some("builds.local_executor")
        );
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail API returns its own error type"
    )]
    fn file_env_and_problems() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "d.toml",
                "listen = \"127.0.0.1:7000\"\n[storage]\nkind = \"s3\"\n[tls]\ncert = \"nope.pem\"\n",
            )?;
            jail.set_env("DOCKYARD_LISTEN", "127.0.0.1:7001");
            let err = Config::load(Config::figment(Some(Path::new("d.toml")))).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("storage.bucket"), "{text}");
            assert!(text.contains("tls.key"), "{text}");
            jail.set_env("DOCKYARD_STORAGE_BUCKET", "b");
            jail.create_file("d.toml", "listen = \"127.0.0.1:7000\"\n")?;
            let c = Config::load(Config::figment(Some(Path::new("d.toml")))).unwrap();
            assert_eq!(c.listen.port(), 7001);
            assert_eq!(c.storage.bucket.as_deref(), Some("b"));
            Ok(())
        });
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail API returns its own error type"
    )]
    fn unknown_and_mistyped_keys_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "d.toml",
                "listn = \"x\"\n[registry]\nmax_manifest_size = \"big\"\n",
            )?;
            let err = Config::load(Config::figment(Some(Path::new("d.toml")))).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("listn") || text.contains("max_manifest_size"),
                "{text}"
            );
            Ok(())
        });
    }
}
