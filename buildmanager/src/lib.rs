//! The build manager: turns triggers (git push webhooks, API and CLI
//! requests, uploaded contexts) into builds, splits a build into one job per
//! platform, leases jobs to executors that pull them (long poll), renews and
//! expires leases, keeps phases and logs (live in the database, archived to
//! the object store when a job ends), and when every platform is built,
//! assembles the OCI index and applies the tags through
//! [`dockyard_core::images::ImageStore`].
//!
//! Owns: the build tables (migrations `0003_builds`, `0006_rebuilds`), node tokens, the
//! executor protocol's server side ([`jobs`]; the HTTP handlers are in `web-api`), inbound webhook
//! verification ([`webhook`]), base-image rebuilds ([`rebuild`], with
//! upstream checks in [`upstream`]). It must not reach into the registry's
//! internals (only the `ImageStore` trait) and does not talk to build
//! engines itself: executors do.

pub mod builds;
pub mod jobs;
pub mod logs;
pub mod rebuild;
pub mod upstream;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use dockyard_core::identity::Identity;
use dockyard_core::images::ImageStore;
use dockyard_core::token::TokenKeys;
use dockyard_core::{Config, Db};
use object_store::ObjectStore;
use tokio::sync::Notify;

pub use builds::{
    BuildDetail, BuildInfo, DefinitionInfo, JobInfo, NewBuild, NewDefinition, TriggerInfo,
};

/// Errors of the build manager, mapped to HTTP statuses by the API layer.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("permission denied")]
    Forbidden,
    #[error("unauthenticated")]
    Unauthenticated,
    #[error("{0}")]
    TooLarge(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("{0}")]
    Internal(String),
}

impl From<dockyard_core::identity::IdentityError> for BuildError {
    fn from(e: dockyard_core::identity::IdentityError) -> Self {
        BuildError::Internal(e.to_string())
    }
}

pub type Result<T, E = BuildError> = std::result::Result<T, E>;

/// Settings the manager runs with (from [`Config`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The registry as engines reach it.
    pub registry_host: String,
    pub registry_insecure: bool,
    pub timeout: Duration,
    pub lease: Duration,
    pub max_attempts: u32,
    pub max_context_size: u64,
    pub allow_local_git: bool,
    pub issuer: String,
    pub service: String,
    /// Moves of a base within this window cause one rebuild per dependent.
    pub rebuild_debounce: Duration,
    /// Default cron schedule (with seconds) of upstream base checks.
    pub base_check_schedule: String,
}

impl Settings {
    /// `bound` is the address the server listens on.
    pub fn from_config(config: &Config, bound: std::net::SocketAddr) -> Settings {
        let b = &config.builds;
        Settings {
            registry_host: b
                .registry_host
                .clone()
                .unwrap_or_else(|| loopback_address(bound).to_string()),
            registry_insecure: config.tls.cert.is_none(),
            timeout: b.timeout,
            lease: b.lease,
            max_attempts: b.max_attempts,
            max_context_size: b.max_context_size,
            allow_local_git: b.allow_local_git,
            issuer: config.auth.issuer.clone(),
            service: config.auth.service.clone(),
            rebuild_debounce: b.rebuild_debounce,
            base_check_schedule: b.base_check_schedule.clone(),
        }
    }
}

/// The build manager's state, shared by the API, the executor protocol and
/// the maintenance loop.
pub struct BuildManager {
    pub(crate) db: Db,
    pub(crate) identity: Identity,
    pub(crate) keys: Arc<TokenKeys>,
    pub(crate) images: Arc<dyn ImageStore>,
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) settings: Settings,
    /// Signalled when jobs become available (wakes long polls).
    pub(crate) jobs_ready: Notify,
    /// Signalled on new log text or state changes (wakes log followers).
    pub(crate) progress: Notify,
    /// Signalled when base rebuilds were recorded (wakes their scheduler).
    pub(crate) rebuilds_ready: Notify,
    /// Signalled when rebuild settings changed (upstream checks re-plan).
    pub(crate) upstream_changed: Notify,
}

impl BuildManager {
    pub fn new(
        db: Db,
        identity: Identity,
        keys: Arc<TokenKeys>,
        images: Arc<dyn ImageStore>,
        store: Arc<dyn ObjectStore>,
        settings: Settings,
    ) -> BuildManager {
        BuildManager {
            db,
            identity,
            keys,
            images,
            store,
            settings,
            jobs_ready: Notify::new(),
            progress: Notify::new(),
            rebuilds_ready: Notify::new(),
            upstream_changed: Notify::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Expires leases and times builds out until `shutdown`.
    pub async fn run_maintenance(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(error = %e, "build maintenance failed");
                    }
                }
            }
        }
    }
}

/// How a process on this machine reaches a server bound to `bound`
/// (`0.0.0.0:5000` → `127.0.0.1:5000`).
pub fn loopback_address(bound: std::net::SocketAddr) -> std::net::SocketAddr {
    let ip = match bound.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, bound.port())
}

/// A short random id (lowercase base32, 16 characters).
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..20].to_string()
}
