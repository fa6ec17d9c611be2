//! Build engines: the [`Engine`] trait the agent drives, the [`LogSink`]
//! engines write their output to, and [`DockerEngine`], an engine over the
//! Docker Engine API (through `bollard`).
//!
//! An engine builds a context directory into an image and pushes that image
//! to a registry with a bearer token. It owns nothing else: it does not talk
//! to the build manager and does not know about jobs. A BuildKit engine (which
//! builds and pushes in one solve) fits the same trait: its `build` can keep
//! the solve's result in [`Built`] and its `push` export it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::{
    BuildImageOptions, BuilderVersion, PushImageOptions, RemoveImageOptions, TagImageOptions,
};
use bytes::Bytes;
use dockyard_oci::build::{Phase, Platform};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::source::pack_context_tar;
use crate::{Error, Result};

/// A secret string (a registry token, a password): `Debug` and `Display`
/// never show it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// One thing written to a [`LogSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Log text (any number of lines).
    Text(String),
    /// The job moved to a new phase.
    Phase(Phase),
}

/// Text that waits in a [`LogSink`] beyond this is dropped (and counted), so
/// a build that prints faster than the manager accepts cannot exhaust memory.
const MAX_PENDING_LOG: usize = 16 << 20;

/// Where build output goes: an ordered, non-blocking channel. Cheap to clone;
/// writing never fails (when the reader is gone, text is dropped).
#[derive(Clone)]
pub struct LogSink {
    tx: Option<mpsc::UnboundedSender<LogEvent>>,
    pending: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

/// The reading end of [`LogSink::channel`].
pub struct LogReceiver {
    rx: mpsc::UnboundedReceiver<LogEvent>,
    pending: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl LogReceiver {
    /// The next event; `None` once every sink is dropped and all was read.
    pub async fn recv(&mut self) -> Option<LogEvent> {
        let ev = self.rx.recv().await;
        if let Some(LogEvent::Text(t)) = &ev {
            self.pending.fetch_sub(t.len(), Ordering::Relaxed);
        }
        ev
    }

    /// How many bytes of text were dropped because too much was pending
    /// (reset by this call).
    pub fn take_dropped(&self) -> usize {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Everything written so far, without waiting (for tests and callers
    /// that collect a whole log).
    pub fn drain_text(&mut self) -> String {
        let mut out = String::new();
        while let Ok(ev) = self.rx.try_recv() {
            if let LogEvent::Text(t) = ev {
                self.pending.fetch_sub(t.len(), Ordering::Relaxed);
                out.push_str(&t);
            }
        }
        out
    }
}

impl LogSink {
    /// A sink and the receiver that reads it.
    pub fn channel() -> (LogSink, LogReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        (
            LogSink {
                tx: Some(tx),
                pending: pending.clone(),
                dropped: dropped.clone(),
            },
            LogReceiver {
                rx,
                pending,
                dropped,
            },
        )
    }

    /// A sink that drops everything.
    pub fn discard() -> LogSink {
        LogSink {
            tx: None,
            pending: Arc::default(),
            dropped: Arc::default(),
        }
    }

    /// Writes text as it is.
    pub fn text(&self, text: impl Into<String>) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        let Some(tx) = &self.tx else { return };
        if self.pending.load(Ordering::Relaxed) + text.len() > MAX_PENDING_LOG {
            self.dropped.fetch_add(text.len(), Ordering::Relaxed);
            return;
        }
        self.pending.fetch_add(text.len(), Ordering::Relaxed);
        if let Err(e) = tx.send(LogEvent::Text(text))
            && let LogEvent::Text(t) = e.0
        {
            self.pending.fetch_sub(t.len(), Ordering::Relaxed);
        }
    }

    /// Writes one line (a newline is added when missing).
    pub fn line(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        if line.ends_with('\n') {
            self.text(line);
        } else {
            self.text(format!("{line}\n"));
        }
    }

    /// Announces a phase change (never dropped).
    pub fn phase(&self, phase: Phase) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(LogEvent::Phase(phase));
        }
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSink")
            .field("open", &self.tx.is_some())
            .finish()
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// The context directory.
    pub context_dir: PathBuf,
    /// The Dockerfile, relative to the context directory.
    pub dockerfile: String,
    pub build_args: BTreeMap<String, String>,
    /// The stage to build (the last one when `None`).
    pub target: Option<String>,
    /// The platform to build for (the engine's own when `None`).
    pub platform: Option<Platform>,
    /// Labels added to the image.
    pub labels: BTreeMap<String, String>,
    /// Registry bearer tokens for pulling bases, by registry host
    /// (`host:port`, as `FROM` lines name it).
    pub registry_auth: BTreeMap<String, Secret>,
    /// Always pull base images (so they come from the registry, not the
    /// engine's cache).
    pub pull: bool,
    /// Do not use the engine's build cache.
    pub no_cache: bool,
    /// A name to give the image in the engine, if any.
    pub tag: Option<String>,
}

impl BuildSpec {
    /// A spec with the defaults: `Dockerfile`, pull bases, use the cache.
    pub fn new(context_dir: impl Into<PathBuf>) -> Self {
        BuildSpec {
            context_dir: context_dir.into(),
            dockerfile: "Dockerfile".to_string(),
            build_args: BTreeMap::new(),
            target: None,
            platform: None,
            labels: BTreeMap::new(),
            registry_auth: BTreeMap::new(),
            pull: true,
            no_cache: false,
            tag: None,
        }
    }
}

/// A built image, as the engine knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The engine's id of the image (for dockerd, the config digest).
    pub id: String,
}

/// Where to push.
#[derive(Debug, Clone)]
pub struct PushTarget {
    /// `host:port` as the engine reaches it.
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// A registry bearer token with push access.
    pub token: Option<Secret>,
}

impl PushTarget {
    /// `registry/repository:tag`.
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

/// A pushed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// `registry/repository:tag`.
    pub reference: String,
    /// The pushed manifest's digest.
    pub manifest_digest: String,
    /// Its config's digest.
    pub config_digest: String,
}

/// A build engine.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Its name in [`RegisterRequest::engine`](dockyard_oci::build::RegisterRequest).
    fn name(&self) -> &str;

    /// The platforms it builds without being told (the host's).
    async fn platforms(&self) -> Result<Vec<Platform>>;

    /// Builds `spec`, writing the engine's output to `logs`. Returns
    /// [`Error::BuildFailed`] with the engine's message when the build fails
    /// and [`Error::Cancelled`] soon after `cancel` fires.
    async fn build(
        &self,
        spec: &BuildSpec,
        logs: &LogSink,
        cancel: &CancellationToken,
    ) -> Result<Built>;

    /// Pushes a built image to `target`.
    async fn push(
        &self,
        image: &Built,
        target: &PushTarget,
        logs: &LogSink,
        cancel: &CancellationToken,
    ) -> Result<Pushed>;

    /// Forgets what a job left in the engine (best effort).
    async fn remove(&self, _image: &Built, _target: Option<&PushTarget>) -> Result<()> {
        Ok(())
    }
}

/// How long a quick call (tag, inspect, remove) may take.
const SHORT_CALL: Duration = Duration::from_secs(120);

/// An engine over the Docker Engine API: the classic builder (`POST /build`),
/// `docker tag`, `docker push`.
#[derive(Clone)]
pub struct DockerEngine {
    docker: Docker,
    api_version: String,
}

impl fmt::Debug for DockerEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerEngine")
            .field("api_version", &self.api_version)
            .finish()
    }
}

impl DockerEngine {
    /// Connects to dockerd at `host` (`unix:///var/run/docker.sock`, a socket
    /// path, `tcp://host:2375` or `http://...`), or where the docker CLI would
    /// (`DOCKER_HOST`, else the local socket) when `None`, and negotiates the
    /// API version (docker 20.10 speaks 1.41 and refuses newer clients).
    pub async fn connect(host: Option<&str>) -> Result<DockerEngine> {
        // Streams (builds, pushes) last as long as they last: cancellation
        // ends them, not a client timeout.
        const TIMEOUT: u64 = 24 * 3600;
        let version = bollard::API_DEFAULT_VERSION;
        let where_ = host.unwrap_or("the default docker host").to_string();
        let docker = match host {
            None => Docker::connect_with_local_defaults(),
            Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
                Docker::connect_with_socket(h, TIMEOUT, version)
            }
            Some(h) if h.starts_with("tcp://") || h.starts_with("http://") => {
                Docker::connect_with_http(h, TIMEOUT, version)
            }
            Some(h) => {
                return Err(Error::Config(format!(
                    "unsupported docker host {h:?} (use unix://, tcp:// or http://)"
                )));
            }
        }
        .map_err(|e| Error::Engine(format!("cannot connect to dockerd at {where_}: {e}")))?
        .with_timeout(Duration::from_secs(TIMEOUT));
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| Error::Engine(format!("cannot reach dockerd at {where_}: {e}")))?;
        Ok(DockerEngine::from_client(docker))
    }

    /// An engine over an existing client (whose API version is already
    /// right).
    pub fn from_client(docker: Docker) -> DockerEngine {
        let api_version = docker.client_version().to_string();
        DockerEngine {
            docker: docker.with_request_modifier(url_safe_auth_headers),
            api_version,
        }
    }

    /// The API version in use (`1.41` against docker 20.10).
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The bollard client.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    async fn inspect(&self, image: &str) -> Result<bollard::models::ImageInspect> {
        tokio::time::timeout(SHORT_CALL, self.docker.inspect_image(image))
            .await
            .map_err(|_| Error::Engine(format!("dockerd did not answer inspecting {image}")))?
            .map_err(|e| Error::Engine(format!("inspecting {image}: {e}")))
    }
}

/// dockerd decodes `X-Registry-Auth` and `X-Registry-Config` as URL-safe
/// base64 and silently ignores what does not decode; bollard encodes them
/// with the standard alphabet. Tokens are plain ASCII, whose JSON only
/// produces `+` or `/` for a few characters (`>`, `?`, `~`), but a password
/// with one of them would be dropped without a word. Translate.
fn url_safe_auth_headers(mut req: bollard::BollardRequest) -> bollard::BollardRequest {
    for name in ["x-registry-auth", "x-registry-config"] {
        if let Some(v) = req.headers().get(name).and_then(|v| v.to_str().ok())
            && v.contains(['+', '/'])
        {
            let fixed = v.replace('+', "-").replace('/', "_");
            if let Ok(value) = http::HeaderValue::from_str(&fixed) {
                req.headers_mut().insert(name, value);
            }
        }
    }
    req
}

/// Credentials for dockerd: a registry token, which it sends as a bearer
/// token as it is.
fn token_credentials(registry: &str, token: &Secret) -> DockerCredentials {
    DockerCredentials {
        serveraddress: Some(registry.to_string()),
        registrytoken: Some(token.expose().to_string()),
        ..Default::default()
    }
}

/// A `Write` that sends what is written, in chunks, into a channel feeding a
/// request body.
struct ChannelWriter {
    tx: mpsc::Sender<std::result::Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 << 10;

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Whether a status line is a progress report (noise in a build log).
fn is_progress(status: &str, has_detail: bool) -> bool {
    has_detail
        && matches!(
            status,
            "Downloading" | "Extracting" | "Pushing" | "Waiting" | "Verifying Checksum"
        )
}

fn status_line(id: Option<&str>, status: &str) -> String {
    match id {
        Some(id) if !id.is_empty() => format!("{id}: {status}"),
        _ => status.to_string(),
    }
}

/// The digest in a push's final status line,
/// `<tag>: digest: sha256:<hex> size: <n>`.
fn digest_in_status(status: &str) -> Option<String> {
    let rest = &status[status.find("digest: ")? + "digest: ".len()..];
    let d = rest.split_whitespace().next()?;
    d.parse::<dockyard_oci::Digest>()
        .ok()
        .map(|d| d.to_string())
}

#[async_trait]
impl Engine for DockerEngine {
    fn name(&self) -> &str {
        "docker"
    }

    async fn platforms(&self) -> Result<Vec<Platform>> {
        let v = tokio::time::timeout(SHORT_CALL, self.docker.version())
            .await
            .map_err(|_| Error::Engine("dockerd did not answer /version".into()))?
            .map_err(|e| Error::Engine(format!("dockerd /version: {e}")))?;
        let os = v.os.unwrap_or_else(|| "linux".into());
        let arch = v.arch.unwrap_or_else(|| host_architecture().into());
        let p = format!("{os}/{arch}")
            .parse()
            .map_err(|e| Error::Engine(format!("dockerd reports an odd platform: {e}")))?;
        Ok(vec![p])
    }

    async fn build(
        &self,
        spec: &BuildSpec,
        logs: &LogSink,
        cancel: &CancellationToken,
    ) -> Result<Built> {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        // Stream the context as a tar built on a blocking thread, so a large
        // context is never held in memory.
        let (tx, mut rx) = mpsc::channel::<std::result::Result<Bytes, io::Error>>(4);
        let dir = spec.context_dir.clone();
        let dockerfile = spec.dockerfile.clone();
        let pack = tokio::task::spawn_blocking(move || {
            let err_tx = tx.clone();
            let mut w = ChannelWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            let r = pack_context_tar(&dir, &dockerfile, &mut w, false).and_then(|stats| {
                w.flush()
                    .map_err(|e| Error::io("sending the build context", e))?;
                Ok(stats)
            });
            if let Err(e) = &r {
                // Abort the request body so dockerd does not build a
                // truncated context.
                let _ = err_tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
            r
        });
        let body = bollard::body_try_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));

        let options = BuildImageOptions {
            dockerfile: spec.dockerfile.replace('\\', "/"),
            t: spec.tag.clone(),
            pull: spec.pull.then(|| "1".to_string()),
            rm: true,
            forcerm: true,
            nocache: spec.no_cache,
            buildargs: Some(
                spec.build_args
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>(),
            ),
            labels: (!spec.labels.is_empty()).then(|| {
                spec.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
            networkmode: Some("host".to_string()),
            platform: spec
                .platform
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            target: spec.target.clone().unwrap_or_default(),
            version: BuilderVersion::BuilderV1,
            ..Default::default()
        };
        let credentials: HashMap<String, DockerCredentials> = spec
            .registry_auth
            .iter()
            .map(|(host, token)| (host.clone(), token_credentials(host, token)))
            .collect();

        let mut stream = self
            .docker
            .build_image(options, Some(credentials), Some(body));
        let mut image_id: Option<String> = None;
        let mut short_id: Option<String> = None;
        let outcome: Result<()> = loop {
            let item = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Err(Error::Cancelled),
                item = stream.next() => item,
            };
            match item {
                None => break Ok(()),
                Some(Ok(info)) => {
                    if let Some(s) = &info.stream {
                        if let Some(id) = s.trim().strip_prefix("Successfully built ") {
                            short_id = Some(id.trim().to_string());
                        }
                        logs.text(s.clone());
                    }
                    if let Some(status) = &info.status {
                        let detail = info
                            .progress_detail
                            .as_ref()
                            .is_some_and(|d| d.current.is_some() || d.total.is_some());
                        if !is_progress(status, detail) {
                            logs.line(status_line(info.id.as_deref(), status));
                        }
                    }
                    if let Some(id) = info.aux.as_ref().and_then(|a| a.id.clone()) {
                        image_id = Some(id);
                    }
                }
                Some(Err(bollard::errors::Error::DockerStreamError { error })) => {
                    logs.line(&error);
                    break Err(Error::BuildFailed(error.trim().to_string()));
                }
                Some(Err(bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                })) if (400..500).contains(&status_code) => {
                    logs.line(&message);
                    break Err(Error::BuildFailed(message.trim().to_string()));
                }
                Some(Err(e)) => break Err(Error::Engine(format!("build: {e}"))),
            }
        };
        drop(stream);
        // The packer's own error explains a broken request best.
        let packed = pack.await;
        match (&outcome, packed) {
            (Err(Error::Cancelled), _) => return Err(Error::Cancelled),
            (_, Ok(Err(e))) if outcome.is_err() => return Err(e),
            (_, Ok(Ok(stats))) => {
                tracing::debug!(files = stats.files, bytes = stats.bytes, "context sent");
            }
            _ => {}
        }
        outcome?;
        let id = match (image_id, short_id) {
            (Some(id), _) => id,
            (None, Some(short)) => self.inspect(&short).await?.id.unwrap_or(short),
            (None, None) => {
                return Err(Error::BuildFailed(
                    "the engine finished without reporting an image".into(),
                ));
            }
        };
        Ok(Built { id })
    }

    async fn push(
        &self,
        image: &Built,
        target: &PushTarget,
        logs: &LogSink,
        cancel: &CancellationToken,
    ) -> Result<Pushed> {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let repo = format!("{}/{}", target.registry, target.repository);
        let reference = target.reference();
        tokio::time::timeout(
            SHORT_CALL,
            self.docker.tag_image(
                &image.id,
                Some(TagImageOptions {
                    repo: Some(repo.clone()),
                    tag: Some(target.tag.clone()),
                }),
            ),
        )
        .await
        .map_err(|_| Error::Engine("dockerd did not answer tagging the image".into()))?
        .map_err(|e| Error::Engine(format!("tagging {reference}: {e}")))?;
        logs.line(format!("Pushing {reference}"));

        let credentials = target
            .token
            .as_ref()
            .map(|t| token_credentials(&target.registry, t));
        let mut stream = self.docker.push_image(
            &repo,
            Some(PushImageOptions {
                tag: Some(target.tag.clone()),
                platform: None,
            }),
            credentials,
        );
        let mut manifest_digest = None;
        loop {
            let item = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                item = stream.next() => item,
            };
            match item {
                None => break,
                Some(Ok(info)) => {
                    if let Some(status) = &info.status {
                        if let Some(d) = digest_in_status(status) {
                            manifest_digest = Some(d);
                        }
                        let detail = info
                            .progress_detail
                            .as_ref()
                            .is_some_and(|d| d.current.is_some() || d.total.is_some());
                        if !is_progress(status, detail) {
                            logs.line(status);
                        }
                    }
                }
                Some(Err(bollard::errors::Error::DockerStreamError { error })) => {
                    logs.line(&error);
                    return Err(Error::PushFailed(error.trim().to_string()));
                }
                Some(Err(bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                })) if (400..500).contains(&status_code) => {
                    logs.line(&message);
                    return Err(Error::PushFailed(message.trim().to_string()));
                }
                Some(Err(e)) => return Err(Error::Engine(format!("push: {e}"))),
            }
        }
        drop(stream);

        let inspect = self.inspect(&reference).await?;
        let config_digest = inspect
            .id
            .clone()
            .ok_or_else(|| Error::Engine(format!("{reference} has no image id")))?;
        let manifest_digest = match manifest_digest {
            Some(d) => d,
            None => {
                let prefix = format!("{repo}@");
                inspect
                    .repo_digests
                    .unwrap_or_default()
                    .iter()
                    .find_map(|d| d.strip_prefix(&prefix).map(str::to_string))
                    .ok_or_else(|| {
                        Error::PushFailed(format!(
                            "the engine did not report the digest of {reference}"
                        ))
                    })?
            }
        };
        logs.line(format!("Pushed {reference}@{manifest_digest}"));
        Ok(Pushed {
            reference,
            manifest_digest,
            config_digest,
        })
    }

    async fn remove(&self, image: &Built, target: Option<&PushTarget>) -> Result<()> {
        // Untag what the job pushed; `noprune` keeps the parent layers as
        // build cache for later jobs.
        let name = target.map_or_else(|| image.id.clone(), PushTarget::reference);
        let options = RemoveImageOptions {
            force: false,
            noprune: true,
            platforms: None,
        };
        match tokio::time::timeout(
            SHORT_CALL,
            self.docker.remove_image(&name, Some(options), None),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::Engine(format!("removing {name}: {e}"))),
            Err(_) => Err(Error::Engine(format!(
                "dockerd did not answer removing {name}"
            ))),
        }
    }
}

/// The host's architecture in OCI terms.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "arm" => "arm",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_digest_is_parsed() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            digest_in_status(&format!("job-1: digest: {d} size: 528")),
            Some(d)
        );
        assert_eq!(digest_in_status("Pushed"), None);
        assert_eq!(digest_in_status("x: digest: sha256:zz size: 1"), None);
    }

    #[test]
    fn secrets_do_not_show() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let mut spec = BuildSpec::new("/tmp");
        spec.registry_auth.insert("reg:5000".into(), s);
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn auth_headers_become_url_safe() {
        let req = http::Request::builder()
            .header("X-Registry-Config", "ab+c/d==")
            .body(bollard::body_full(Bytes::new()))
            .unwrap();
        let req = url_safe_auth_headers(req);
        assert_eq!(req.headers()["x-registry-config"], "ab-c_d==");
    }

    #[tokio::test]
    async fn log_sink_orders_and_caps() {
        let (sink, mut rx) = LogSink::channel();
        sink.line("one");
        sink.phase(Phase::Building);
        sink.text("two\n");
        assert_eq!(rx.recv().await, Some(LogEvent::Text("one\n".into())));
        assert_eq!(rx.recv().await, Some(LogEvent::Phase(Phase::Building)));
        assert_eq!(rx.drain_text(), "two\n");
        let big = "x".repeat(MAX_PENDING_LOG);
        sink.text(big.clone());
        sink.text("y");
        assert_eq!(rx.take_dropped(), 1);
        drop(sink);
        assert_eq!(rx.recv().await, Some(LogEvent::Text(big)));
        assert_eq!(rx.recv().await, None);
        LogSink::discard().line("nowhere");
    }
}
