//! The executor agent of build nodes: the client side of the executor
//! protocol defined in [`dockyard_oci::build`].
//!
//! An executor registers with the build manager, long-polls it for jobs, and
//! runs each job on the node: it fetches the source (a git commit through
//! `git2`, or a context archive uploaded to the manager), reads the
//! Dockerfile's `FROM` lines to learn the base images, asks the manager for a
//! job-scoped registry token, resolves the bases' digests, builds with an
//! [`Engine`] (the Docker Engine API through `bollard` today; BuildKit can be
//! added as another implementation), pushes the image with the token, streams
//! the build's log back, and reports the result.
//!
//! Modules:
//! - [`agent`]: the executor loop ([`agent::run`], [`AgentConfig`]).
//! - [`client`]: the HTTP client of the executor protocol ([`ManagerClient`]).
//! - [`source`]: git checkouts, safe unpacking of context archives, and
//!   [`pack_context`] (also used by the CLI to upload a local context).
//! - [`dockerfile`]: base images of a Dockerfile ([`base_images`], [`ImageRef`]).
//! - [`engine`]: the [`Engine`] trait, [`LogSink`] and [`DockerEngine`].
//! - [`registry`]: resolving a tag's digest on a registry.
//!
//! **Architecture invariant:** this crate depends on nothing server-side (only
//! `dockyard-oci`): it speaks the executor protocol and the registry's HTTP API
//! and nothing else, so it runs on a machine with no database and no access to
//! the server's configuration. It never logs tokens, passwords or SSH keys,
//! and it reads no environment variable except where a caller asks it to
//! (`DockerEngine::connect(None)` follows `DOCKER_HOST` like the docker CLI).

pub mod agent;
pub mod cli;
pub mod client;
pub mod dockerfile;
pub mod engine;
pub mod registry;
pub mod source;

pub use agent::{AgentConfig, run};
pub use client::{ClientError, ManagerClient};
pub use dockerfile::{ImageRef, base_images};
pub use engine::{
    BuildSpec, Built, DockerEngine, Engine, LogEvent, LogReceiver, LogSink, PushTarget, Pushed,
    Secret,
};
pub use source::{PackStats, pack_context};

/// Everything that can go wrong while running a job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job was stopped from outside (the manager cancelled it, the lease
    /// was lost, the agent shut down) before it finished.
    #[error("cancelled")]
    Cancelled,
    /// The Dockerfile could not be read or makes no sense.
    #[error("{0}")]
    Dockerfile(String),
    /// The source could not be fetched (bad repository, missing commit,
    /// refused credentials, unsafe archive).
    #[error("source: {0}")]
    Source(String),
    /// The engine ran the build and the build failed (a `RUN` that exited
    /// non-zero, a missing base image, a bad instruction): the user's problem.
    #[error("build failed: {0}")]
    BuildFailed(String),
    /// The engine could not push the image.
    #[error("push failed: {0}")]
    PushFailed(String),
    /// The engine itself is unreachable or misbehaves: the node's problem.
    #[error("engine: {0}")]
    Engine(String),
    /// The registry answered something unexpected.
    #[error("registry: {0}")]
    Registry(String),
    /// The build manager refused or failed a call.
    #[error("manager: {0}")]
    Manager(#[from] ClientError),
    /// A local file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The agent was configured wrongly.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the failure is the node's (engine, disk, manager) rather than
    /// the build's; such jobs end as `internal_error`.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Error::Engine(_) | Error::Io { .. } | Error::Manager(_) | Error::Config(_)
        )
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
