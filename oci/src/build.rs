//! The build vocabulary shared by the build manager (server) and executors
//! (build nodes): platforms, job phases, and the executor protocol's messages.
//!
//! The executor protocol is JSON over HTTP; executors always call the
//! manager (they may sit behind NAT), authenticated with a node token
//! (`Authorization: Bearer dyn_...`):
//!
//! | call | body | answer |
//! | --- | --- | --- |
//! | `POST /api/v1/executor/register` | [`RegisterRequest`] | [`RegisterResponse`] |
//! | `POST /api/v1/executor/poll` | [`PollRequest`] | 200 [`JobAssignment`] or 204 after `wait_seconds` |
//! | `POST /api/v1/executor/heartbeat` | [`Heartbeat`] | [`HeartbeatResponse`] |
//! | `POST /api/v1/executor/jobs/{job}/log` | [`JobLog`] | [`HeartbeatResponse`] |
//! | `POST /api/v1/executor/jobs/{job}/token` | [`TokenRequest`] | [`TokenResponse`] |
//! | `GET /api/v1/executor/jobs/{job}/context` | | the uploaded context (`.tar` or `.tar.gz`) |
//! | `POST /api/v1/executor/jobs/{job}/result` | [`JobResult`] | 204 |
//!
//! Every `jobs/{job}` call carries the executor id in the `x-dockyard-executor`
//! header; the manager refuses calls for jobs leased to someone else (409),
//! which is how an executor learns that its lease was lost.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Header naming the executor on per-job calls.
pub const EXECUTOR_HEADER: &str = "x-dockyard-executor";

/// An OCI platform: `os/architecture[/variant]`, e.g. `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// Why a platform string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?} (expected os/architecture[/variant], e.g. linux/amd64)")]
pub struct PlatformError(pub String);

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 32
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(PlatformError(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Whether an executor advertising `self` can build for `wanted`
    /// (a platform without variant accepts any variant, `linux/arm64` builds
    /// `linux/arm64/v8`).
    pub fn serves(&self, wanted: &Platform) -> bool {
        self.os == wanted.os
            && self.architecture == wanted.architecture
            && (self.variant.is_none() || self.variant == wanted.variant)
    }
}

/// Where a job is in its life. Stored as the lowercase snake-case string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    FetchingSource,
    PullingBase,
    Building,
    Pushing,
    Complete,
    Failed,
    Cancelled,
    InternalError,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Queued,
        Phase::FetchingSource,
        Phase::PullingBase,
        Phase::Building,
        Phase::Pushing,
        Phase::Complete,
        Phase::Failed,
        Phase::Cancelled,
        Phase::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::FetchingSource => "fetching_source",
            Phase::PullingBase => "pulling_base",
            Phase::Building => "building",
            Phase::Pushing => "pushing",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
            Phase::InternalError => "internal_error",
        }
    }

    /// Whether nothing more happens after this phase.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Complete | Phase::Failed | Phase::Cancelled | Phase::InternalError
        )
    }
}

impl FromStr for Phase {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s).ok_or(())
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An executor introducing itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// A name for people (host name by default).
    pub name: String,
    /// Platforms this node builds, e.g. `["linux/amd64"]`.
    pub platforms: Vec<String>,
    /// How many jobs it runs at once.
    pub capacity: u32,
    /// The engine, e.g. `docker`.
    pub engine: String,
    /// The executor's version.
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// Names this executor in every later call.
    pub executor_id: String,
    /// How often to send [`Heartbeat`]s.
    pub heartbeat_seconds: u64,
    /// A job whose lease is not renewed for this long is given to another
    /// executor.
    pub lease_seconds: u64,
}

/// Ask for a job; the manager answers as soon as one is available, or with
/// 204 after `wait_seconds` (long poll).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PollRequest {
    pub executor_id: String,
    pub wait_seconds: u64,
}

/// Where the source of a job comes from. `Debug` hides the credentials.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSource {
    /// A git repository, checked out at `commit`.
    Git {
        url: String,
        /// The full commit id to build.
        commit: String,
        /// The ref that was pushed (`refs/heads/main`), for fetching.
        #[serde(default)]
        git_ref: Option<String>,
        /// HTTPS credentials (token as password) or none.
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
        /// An SSH private key (PEM/OpenSSH) for `ssh://` or `git@` URLs.
        #[serde(default)]
        ssh_key: Option<String>,
    },
    /// An uploaded archive, fetched from `GET /api/v1/executor/jobs/{job}/context`.
    Context,
}

impl fmt::Debug for JobSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobSource::Git {
                url,
                commit,
                git_ref,
                username,
                password,
                ssh_key,
            } => f
                .debug_struct("Git")
                .field("url", url)
                .field("commit", commit)
                .field("git_ref", git_ref)
                .field("username", username)
                .field("password", &password.as_ref().map(|_| "***"))
                .field("ssh_key", &ssh_key.as_ref().map(|_| "***"))
                .finish(),
            JobSource::Context => f.write_str("Context"),
        }
    }
}

/// A job leased to an executor: build one platform of one build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobAssignment {
    pub job_id: String,
    pub build_id: String,
    /// The platform to build, e.g. `linux/arm64`.
    pub platform: String,
    pub source: JobSource,
    /// Dockerfile path, relative to the context directory.
    pub dockerfile: String,
    /// Context subdirectory inside the source ("" for the root).
    pub context_dir: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// The registry as the engine reaches it (`host:port`).
    pub registry: String,
    /// Whether the registry speaks plain HTTP.
    pub registry_insecure: bool,
    /// Destination repository (`team/app`).
    pub repository: String,
    /// The tag to push this platform's image under; the manager moves the
    /// build's real tags and removes this one when the build completes.
    pub push_tag: String,
    /// The job is failed when it runs longer.
    pub timeout_seconds: u64,
}

/// Renews the leases of the jobs an executor runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub executor_id: String,
    pub jobs: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Jobs to stop now (build cancelled, lease lost, timed out).
    pub cancel: Vec<String>,
}

/// Progress of a job: a phase change and/or log text.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobLog {
    #[serde(default)]
    pub phase: Option<Phase>,
    /// Log text (any number of lines).
    #[serde(default)]
    pub text: String,
}

/// Ask for the registry token of a job, once the base images are known.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Repositories on the job's registry to pull base images from.
    pub pull: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    /// A registry bearer token: push+pull on the destination, pull on the
    /// requested repositories the build's owner may read.
    pub token: String,
    pub expires_in: u64,
}

/// A base image a job used: a `FROM` after build-argument expansion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    /// As written, expanded and normalised: `registry/repository:tag`.
    pub reference: String,
    /// The manifest (or index) digest the tag pointed to when pulled.
    #[serde(default)]
    pub digest: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    /// `complete`, `failed`, `cancelled` or `internal_error`.
    pub phase: Phase,
    /// What went wrong, for people.
    #[serde(default)]
    pub error: Option<String>,
    /// The pushed image manifest's digest.
    #[serde(default)]
    pub manifest_digest: Option<String>,
    /// Its config digest.
    #[serde(default)]
    pub config_digest: Option<String>,
    #[serde(default)]
    pub base_images: Vec<BaseImage>,
}

/// Tag templates of build definitions: `{branch}`, `{tag}`, `{short_sha}`,
/// `{sha}`, `{build}`; a template that uses a variable the trigger does not
/// have (no `{tag}` on a branch push) expands to nothing. Characters not
/// allowed in tags become `-`.
pub fn expand_tag_template(template: &str, vars: &BTreeMap<&str, String>) -> Option<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        let name = &rest[start + 1..end];
        out.push_str(vars.get(name)?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    let tag: String = out
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let tag = tag.trim_start_matches(['.', '-']).to_string();
    let tag: String = tag.chars().take(128).collect();
    (!tag.is_empty()).then_some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/AMD64".parse::<Platform>().is_err());
        assert!("linux/amd64/v1/x".parse::<Platform>().is_err());
        let any_arm: Platform = "linux/arm64".parse().unwrap();
        assert!(any_arm.serves(&p));
        assert!(!p.serves(&"linux/arm64/v9".parse().unwrap()));
        assert!(!any_arm.serves(&"linux/amd64".parse().unwrap()));
    }

    #[test]
    fn phases_round_trip() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>(), Ok(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert!(Phase::Failed.is_final() && !Phase::Building.is_final());
    }

    #[test]
    fn tag_templates() {
        let vars: BTreeMap<&str, String> = [
            ("branch", "feature/x".to_string()),
            ("short_sha", "abc1234".to_string()),
        ]
        .into();
        assert_eq!(
            expand_tag_template("{branch}", &vars).as_deref(),
            Some("feature-x")
        );
        assert_eq!(
            expand_tag_template("v-{short_sha}", &vars).as_deref(),
            Some("v-abc1234")
        );
        assert_eq!(expand_tag_template("{tag}", &vars), None);
        assert_eq!(
            expand_tag_template("latest", &vars).as_deref(),
            Some("latest")
        );
        assert_eq!(expand_tag_template("{branch", &vars), None);
    }
}
