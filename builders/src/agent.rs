//! The executor loop: register with the manager, heartbeat, long-poll for
//! jobs with `capacity` workers, and run each job through its phases
//! (fetching_source → pulling_base → building → pushing) to a result.
//!
//! A job's log goes through one sender task per job, in order, batched
//! (every 200 ms or 64 KiB; phase changes at once). A 409 on any call for a
//! job means its lease was lost: the job stops and reports nothing. The
//! manager can cancel jobs through heartbeat and log answers. A job that runs
//! past its `timeout_seconds` is cancelled and reported failed.
//!
//! The agent owns its work directory: every job gets a fresh directory under
//! it, removed when the job ends (and stale ones are removed at start).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dockyard_oci::build::{
    BaseImage, Heartbeat, JobAssignment, JobLog, JobResult, JobSource, Phase, Platform,
    PollRequest, RegisterRequest, RegisterResponse, TokenRequest, TokenResponse,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientError, ManagerClient};
use crate::dockerfile::Dockerfile;
use crate::engine::{BuildSpec, Built, Engine, LogEvent, LogReceiver, LogSink, PushTarget, Secret};
use crate::{Error, Result, registry, source};

/// How an executor runs.
#[derive(Clone)]
pub struct AgentConfig {
    /// The manager's base URL (`https://dockyard.example.com`).
    pub manager: String,
    /// The node token (`dyn_...`).
    pub token: String,
    /// A name for people (the host name by default).
    pub name: String,
    /// Platforms to advertise; the engine's own when empty.
    pub platforms: Vec<Platform>,
    /// Jobs run at once.
    pub capacity: u32,
    pub engine: Arc<dyn Engine>,
    /// Where jobs' sources are checked out.
    pub work_dir: PathBuf,
    /// How long one poll waits for a job on the manager.
    pub poll_wait: Duration,
    /// After `shutdown`, how long running jobs may go on before they are
    /// abandoned (without a result: their leases expire and the manager
    /// gives them to another executor).
    pub drain_timeout: Duration,
    /// The HTTP client for the manager and registries (custom roots,
    /// proxies); a default one when `None`.
    pub http: Option<reqwest::Client>,
    /// The executor's version, as registered.
    pub version: String,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("manager", &self.manager)
            .field("token", &"***")
            .field("name", &self.name)
            .field("platforms", &self.platforms)
            .field("capacity", &self.capacity)
            .field("engine", &self.engine.name())
            .field("work_dir", &self.work_dir)
            .field("poll_wait", &self.poll_wait)
            .field("drain_timeout", &self.drain_timeout)
            .finish()
    }
}

impl AgentConfig {
    /// A configuration with the defaults: the host's name, the engine's
    /// platforms, one job at a time, 25 s polls, 10 min drain.
    pub fn new(
        manager: impl Into<String>,
        token: impl Into<String>,
        engine: Arc<dyn Engine>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        AgentConfig {
            manager: manager.into(),
            token: token.into(),
            name: host_name(),
            platforms: Vec::new(),
            capacity: 1,
            engine,
            work_dir: work_dir.into(),
            poll_wait: Duration::from_secs(25),
            drain_timeout: Duration::from_secs(600),
            http: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The machine's host name, or `executor`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "executor".to_string())
}

/// Why a job was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// The manager asked (build cancelled).
    Cancelled,
    /// A 409/404 on a job call: someone else has it now.
    LeaseLost,
    TimedOut,
    /// The agent is shutting down and the drain time is over.
    Shutdown,
}

/// A running job, as the heartbeat and log tasks see it.
struct RunningJob {
    cancel: CancellationToken,
    reason: Mutex<Option<StopReason>>,
}

impl RunningJob {
    fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.cancel.cancel();
    }

    fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The current registration and its generation (bumped on re-registration).
struct Session {
    current: Mutex<(RegisterResponse, u64)>,
    reregistering: tokio::sync::Mutex<()>,
}

struct Agent {
    config: AgentConfig,
    client: ManagerClient,
    http: reqwest::Client,
    register: RegisterRequest,
    session: Session,
    jobs: Mutex<HashMap<String, Arc<RunningJob>>>,
    /// Stop taking jobs (shutdown, or a fatal error).
    stop: CancellationToken,
    fatal: Mutex<Option<Error>>,
}

/// Runs an executor until `shutdown` fires (then lets running jobs finish
/// for up to `drain_timeout`) or the manager refuses the node token.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    if config.token.trim().is_empty() {
        return Err(Error::Config("the node token is empty".into()));
    }
    if config.capacity == 0 {
        return Err(Error::Config("capacity must be at least 1".into()));
    }
    std::fs::create_dir_all(&config.work_dir).map_err(|e| {
        Error::io(
            format!("creating the work directory {}", config.work_dir.display()),
            e,
        )
    })?;
    remove_stale_job_dirs(&config.work_dir);
    let http = config.http.clone().unwrap_or_else(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("dockyard-executor/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default()
    });
    let client = ManagerClient::with_http(http.clone(), &config.manager, &config.token)
        .map_err(|e| Error::Config(e.to_string()))?;
    let platforms = if config.platforms.is_empty() {
        config.engine.platforms().await?
    } else {
        config.platforms.clone()
    };
    let register = RegisterRequest {
        name: config.name.clone(),
        platforms: platforms.iter().map(ToString::to_string).collect(),
        capacity: config.capacity,
        engine: config.engine.name().to_string(),
        version: config.version.clone(),
    };
    let stop = shutdown.child_token();
    let first = match register_with_backoff(&client, &register, &stop).await {
        Ok(r) => r,
        Err(Error::Cancelled) => return Ok(()),
        Err(e) => return Err(e),
    };
    tracing::info!(
        executor = %first.executor_id,
        platforms = ?register.platforms,
        capacity = config.capacity,
        "registered with the build manager"
    );
    let agent = Arc::new(Agent {
        client,
        http,
        register,
        session: Session {
            current: Mutex::new((first, 0)),
            reregistering: tokio::sync::Mutex::new(()),
        },
        jobs: Mutex::new(HashMap::new()),
        stop: stop.clone(),
        fatal: Mutex::new(None),
        config,
    });

    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(agent.clone(), heartbeat_stop.clone()));
    let mut workers = JoinSet::new();
    for n in 0..agent.config.capacity {
        workers.spawn(worker(agent.clone(), n));
    }

    // After the stop, give running jobs the drain time, then abandon them.
    let drain = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent.stop.cancelled().await;
            tokio::time::sleep(agent.config.drain_timeout).await;
            for job in agent.running() {
                job.stop(StopReason::Shutdown);
            }
        })
    };
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "an executor worker failed");
        }
    }
    drain.abort();
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    let fatal = agent.fatal.lock().unwrap_or_else(|e| e.into_inner()).take();
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn remove_stale_job_dirs(work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("job-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Registers, retrying while the manager is unreachable or failing. A
/// refused node token is fatal; a stop ends with [`Error::Cancelled`].
async fn register_with_backoff(
    client: &ManagerClient,
    req: &RegisterRequest,
    stop: &CancellationToken,
) -> Result<RegisterResponse> {
    let mut delay = Duration::from_secs(1);
    loop {
        let r = tokio::select! {
            r = client.register(req) => r,
            _ = stop.cancelled() => return Err(Error::Cancelled),
        };
        match r {
            Ok(r) => return Ok(r),
            Err(e @ ClientError::Unauthorized { .. }) | Err(e @ ClientError::BadUrl(_)) => {
                return Err(Error::Manager(e));
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot register with the build manager");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Err(Error::Cancelled),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

impl Agent {
    fn executor(&self) -> (String, u64) {
        let c = self
            .session
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (c.0.executor_id.clone(), c.1)
    }

    fn heartbeat_interval(&self) -> Duration {
        let c = self
            .session
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Duration::from_secs(c.0.heartbeat_seconds.clamp(1, 300))
    }

    fn running(&self) -> Vec<Arc<RunningJob>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn job(&self, id: &str) -> Option<Arc<RunningJob>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Registers again after the manager forgot us (unless another task
    /// already did since generation `seen`).
    async fn reregister(&self, seen: u64) {
        let _guard = self.session.reregistering.lock().await;
        if self.executor().1 != seen {
            return;
        }
        tracing::warn!("the build manager does not know this executor any more; registering again");
        match register_with_backoff(&self.client, &self.register, &self.stop).await {
            Ok(r) => {
                tracing::info!(executor = %r.executor_id, "registered again");
                let mut c = self
                    .session
                    .current
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *c = (r, seen + 1);
            }
            Err(Error::Cancelled) => {}
            Err(e) => self.fail(e),
        }
    }

    /// Stops the agent for good.
    fn fail(&self, e: Error) {
        tracing::error!(error = %e, "the executor stops");
        self.fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
        self.stop.cancel();
    }
}

async fn heartbeat_loop(agent: Arc<Agent>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(agent.heartbeat_interval()) => {}
            _ = stop.cancelled() => return,
        }
        let (executor_id, generation) = agent.executor();
        let jobs: Vec<String> = agent
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let hb = Heartbeat { executor_id, jobs };
        let r = tokio::select! {
            r = agent.client.heartbeat(&hb) => r,
            _ = stop.cancelled() => return,
        };
        match r {
            Ok(resp) => {
                for id in resp.cancel {
                    if let Some(job) = agent.job(&id) {
                        tracing::info!(job = %id, "the manager cancelled the job");
                        job.stop(StopReason::Cancelled);
                    }
                }
            }
            Err(ClientError::Unauthorized { .. }) | Err(ClientError::NotFound(_)) => {
                if !agent.stop.is_cancelled() {
                    agent.reregister(generation).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

async fn worker(agent: Arc<Agent>, n: u32) {
    let mut delay = Duration::from_secs(1);
    while !agent.stop.is_cancelled() {
        let (executor_id, generation) = agent.executor();
        let req = PollRequest {
            executor_id: executor_id.clone(),
            wait_seconds: agent.config.poll_wait.as_secs().max(1),
        };
        let polled = tokio::select! {
            r = agent.client.poll(&req) => r,
            _ = agent.stop.cancelled() => break,
        };
        match polled {
            Ok(Some(job)) => {
                delay = Duration::from_secs(1);
                tracing::info!(worker = n, job = %job.job_id, build = %job.build_id, platform = %job.platform, "job received");
                run_job(&agent, &executor_id, job).await;
                continue;
            }
            Ok(None) => {
                delay = Duration::from_secs(1);
                continue;
            }
            Err(ClientError::Unauthorized { .. }) | Err(ClientError::NotFound(_)) => {
                agent.reregister(generation).await;
                continue;
            }
            Err(ClientError::BadJob { job_id, message }) => {
                tracing::error!(job = ?job_id, error = %message, "unreadable job assignment");
                if let Some(id) = job_id {
                    let result = JobResult {
                        phase: Phase::InternalError,
                        error: Some(format!("the executor could not read the job: {message}")),
                        manifest_digest: None,
                        config_digest: None,
                        base_images: Vec::new(),
                    };
                    post_result(&agent, &executor_id, &id, &result).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "poll failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = agent.stop.cancelled() => break,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The job's directory name: `job-<safe id>-<random>`.
fn job_dir_prefix(job_id: &str) -> String {
    let safe: String = job_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    format!("job-{safe}-")
}

/// What a successful job produced.
struct Done {
    manifest_digest: String,
    config_digest: String,
    bases: Vec<BaseImage>,
}

async fn run_job(agent: &Arc<Agent>, executor_id: &str, job: JobAssignment) {
    let handle = Arc::new(RunningJob {
        cancel: CancellationToken::new(),
        reason: Mutex::new(None),
    });
    agent
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(job.job_id.clone(), handle.clone());
    let (logs, rx) = LogSink::channel();
    let sender = tokio::spawn(log_sender(
        agent.client.clone(),
        executor_id.to_string(),
        job.job_id.clone(),
        handle.clone(),
        rx,
    ));

    let dir = tempfile::Builder::new()
        .prefix(&job_dir_prefix(&job.job_id))
        .tempdir_in(&agent.config.work_dir);
    let mut built: Option<(Built, PushTarget)> = None;
    let started = Instant::now();
    let outcome = match &dir {
        Err(e) => Err(Error::io(
            "creating the job directory",
            std::io::Error::new(e.kind(), e.to_string()),
        )),
        Ok(dir) => {
            let work = execute(
                agent,
                executor_id,
                &job,
                dir.path(),
                &logs,
                &handle.cancel,
                &mut built,
            );
            let timeout =
                (job.timeout_seconds > 0).then(|| Duration::from_secs(job.timeout_seconds));
            tokio::select! {
                r = work => r,
                _ = handle.cancel.cancelled() => Err(Error::Cancelled),
                _ = sleep_or_forever(timeout) => {
                    handle.stop(StopReason::TimedOut);
                    Err(Error::Cancelled)
                }
            }
        }
    };

    let result = match (outcome, handle.reason()) {
        (Ok(done), _) => {
            logs.line(format!(
                "Build complete in {} s: {}",
                started.elapsed().as_secs(),
                done.manifest_digest
            ));
            Some(JobResult {
                phase: Phase::Complete,
                error: None,
                manifest_digest: Some(done.manifest_digest),
                config_digest: Some(done.config_digest),
                base_images: done.bases,
            })
        }
        (Err(_), Some(StopReason::LeaseLost)) => {
            tracing::warn!(job = %job.job_id, "lease lost; the job stops without a result");
            None
        }
        (Err(_), Some(StopReason::Shutdown)) => {
            tracing::warn!(job = %job.job_id, "abandoned at shutdown; the manager will requeue it");
            None
        }
        (Err(_), Some(StopReason::Cancelled)) => {
            logs.line("Build cancelled");
            Some(failed(Phase::Cancelled, "cancelled".into()))
        }
        (Err(_), Some(StopReason::TimedOut)) => {
            let msg = format!("timed out after {} s", job.timeout_seconds);
            logs.line(format!("Error: {msg}"));
            Some(failed(Phase::Failed, msg))
        }
        (Err(Error::Manager(ClientError::LeaseLost(_) | ClientError::NotFound(_))), None) => {
            tracing::warn!(job = %job.job_id, "lease lost; the job stops without a result");
            None
        }
        (Err(e), None) => {
            let phase = if e.is_internal() {
                Phase::InternalError
            } else {
                Phase::Failed
            };
            logs.line(format!("Error: {e}"));
            tracing::info!(job = %job.job_id, error = %e, phase = %phase, "job failed");
            Some(failed(phase, e.to_string()))
        }
    };

    // The log goes out before the result.
    drop(logs);
    if tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .is_err()
    {
        tracing::warn!(job = %job.job_id, "gave up sending the rest of the log");
    }
    if let Some(result) = result {
        post_result(agent, executor_id, &job.job_id, &result).await;
    }
    if let Some((image, target)) = built
        && let Err(e) = agent.config.engine.remove(&image, Some(&target)).await
    {
        tracing::debug!(job = %job.job_id, error = %e, "could not remove the image");
    }
    if let Ok(dir) = dir {
        // Removing a large checkout blocks; do it off the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
    }
    agent
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&job.job_id);
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn failed(phase: Phase, error: String) -> JobResult {
    JobResult {
        phase,
        error: Some(error),
        manifest_digest: None,
        config_digest: None,
        base_images: Vec::new(),
    }
}

async fn post_result(agent: &Agent, executor_id: &str, job_id: &str, result: &JobResult) {
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=6 {
        match agent.client.result(executor_id, job_id, result).await {
            Ok(()) => {
                tracing::info!(job = %job_id, phase = %result.phase, "result reported");
                return;
            }
            Err(e) if e.is_transient() && attempt < 6 => {
                tracing::warn!(job = %job_id, error = %e, "reporting the result failed; retrying");
            }
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "the manager did not take the result");
                return;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(15));
    }
}

/// A job token and when it was issued (to renew it before the push).
struct JobToken {
    token: TokenResponse,
    at: Instant,
}

impl JobToken {
    fn fresh(&self, margin: Duration) -> bool {
        self.at.elapsed() + margin < Duration::from_secs(self.token.expires_in)
    }
}

async fn execute(
    agent: &Agent,
    executor_id: &str,
    job: &JobAssignment,
    dir: &Path,
    logs: &LogSink,
    cancel: &CancellationToken,
    built: &mut Option<(Built, PushTarget)>,
) -> Result<Done> {
    let platform: Platform = job
        .platform
        .parse()
        .map_err(|e| Error::Config(format!("job platform: {e}")))?;

    logs.phase(Phase::FetchingSource);
    let src = dir.join("src");
    match &job.source {
        JobSource::Git { .. } => {
            source::fetch_git(&job.source, &src, logs, cancel).await?;
        }
        JobSource::Context => {
            source::fetch_context(&agent.client, executor_id, &job.job_id, &src, logs, cancel)
                .await?;
        }
    }
    let context = source::resolve_inside(&src, &job.context_dir)
        .map_err(|e| Error::Source(format!("context directory: {e}")))?;
    let dockerfile_path = source::resolve_inside(&context, &job.dockerfile)
        .map_err(|_| Error::Dockerfile(format!("{} not found in the context", job.dockerfile)))?;
    let text = read_dockerfile(&dockerfile_path, &job.dockerfile).await?;
    let target = job.target.as_deref().filter(|t| !t.is_empty());
    let parsed = Dockerfile::parse(&text, &job.build_args)
        .map_err(|e| Error::Dockerfile(format!("{}: {e}", job.dockerfile)))?;
    let bases = parsed
        .base_images(target)
        .map_err(|e| Error::Dockerfile(format!("{}: {e}", job.dockerfile)))?;
    let pulled = parsed
        .pulled_images(target)
        .map_err(|e| Error::Dockerfile(format!("{}: {e}", job.dockerfile)))?;

    logs.phase(Phase::PullingBase);
    let pull: Vec<String> = pulled
        .iter()
        .filter(|i| i.is_on(&job.registry))
        .map(|i| i.repository.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let token_req = TokenRequest { pull };
    let mut token = JobToken {
        token: agent
            .client
            .token(executor_id, &job.job_id, &token_req)
            .await?,
        at: Instant::now(),
    };
    let mut base_images = Vec::new();
    for b in &bases {
        let own = b.is_on(&job.registry);
        // Other registries are asked anonymously, briefly: the digest is
        // nice to have, and the engine pulls them either way.
        let limit = if own {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(10)
        };
        let digest = tokio::time::timeout(
            limit,
            registry::resolve_digest(
                &agent.http,
                b,
                own && job.registry_insecure,
                own.then_some(token.token.token.as_str()),
            ),
        )
        .await
        .unwrap_or_else(|_| Err(Error::Registry(format!("{b}: no answer"))));
        let digest = match digest {
            Ok(d) => d,
            Err(e) => {
                logs.line(format!("Warning: cannot resolve {b}: {e}"));
                None
            }
        };
        logs.line(format!(
            "Base image {b}{}",
            digest
                .as_deref()
                .map(|d| format!(" = {d}"))
                .unwrap_or_default()
        ));
        base_images.push(BaseImage {
            reference: b.to_string(),
            digest,
        });
    }

    // Build from exactly the manifests resolved for this platform.
    let mut pins = Vec::new();
    for (b, base) in bases.iter().zip(&base_images) {
        let (Some(digest), true) = (&base.digest, b.is_on(&job.registry)) else {
            continue;
        };
        match registry::platform_digest(
            &agent.http,
            b,
            digest,
            &platform,
            job.registry_insecure,
            Some(token.token.token.as_str()),
        )
        .await
        {
            Ok(Some(d)) => pins.push((b.clone(), d)),
            Ok(None) => {
                return Err(Error::Dockerfile(format!(
                    "base image {b} has no {platform} image"
                )));
            }
            Err(e) => logs.line(format!("Warning: cannot pin {b}: {e}")),
        }
    }
    if !pins.is_empty() {
        let stages = parsed
            .stages_for(target)
            .map_err(|e| Error::Dockerfile(format!("{}: {e}", job.dockerfile)))?;
        let pinned = crate::dockerfile::pin_bases(&text, stages, &pins);
        tokio::fs::write(&dockerfile_path, pinned)
            .await
            .map_err(|e| Error::Source(format!("writing the pinned Dockerfile: {e}")))?;
    }

    logs.phase(Phase::Building);
    let mut spec = BuildSpec::new(&context);
    spec.dockerfile = relative_slash(&context, &dockerfile_path);
    spec.build_args = job.build_args.clone();
    spec.target = target.map(str::to_string);
    spec.platform = Some(platform);
    spec.registry_auth
        .insert(job.registry.clone(), Secret::new(token.token.token.clone()));
    let image = agent.config.engine.build(&spec, logs, cancel).await?;

    logs.phase(Phase::Pushing);
    if !token.fresh(Duration::from_secs(60)) {
        token = JobToken {
            token: agent
                .client
                .token(executor_id, &job.job_id, &token_req)
                .await?,
            at: Instant::now(),
        };
    }
    let target = PushTarget {
        registry: job.registry.clone(),
        repository: job.repository.clone(),
        tag: job.push_tag.clone(),
        token: Some(Secret::new(token.token.token.clone())),
    };
    *built = Some((image.clone(), target.clone()));
    let pushed = agent
        .config
        .engine
        .push(&image, &target, logs, cancel)
        .await?;
    Ok(Done {
        manifest_digest: pushed.manifest_digest,
        config_digest: pushed.config_digest,
        bases: base_images,
    })
}

/// `path` relative to `root`, with `/` separators.
fn relative_slash(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

async fn read_dockerfile(path: &Path, name: &str) -> Result<String> {
    const MAX: u64 = 4 << 20;
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|_| Error::Dockerfile(format!("{name} not found in the context")))?;
    if !meta.is_file() {
        return Err(Error::Dockerfile(format!("{name} is not a file")));
    }
    if meta.len() > MAX {
        return Err(Error::Dockerfile(format!("{name} is larger than 4 MiB")));
    }
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| Error::io(format!("reading {name}"), e))?;
    String::from_utf8(bytes).map_err(|_| Error::Dockerfile(format!("{name} is not UTF-8")))
}

/// Batches of log text are sent when this old...
const FLUSH_AFTER: Duration = Duration::from_millis(200);
/// ...or this large.
const FLUSH_SIZE: usize = 64 << 10;

/// Sends a job's log to the manager in order: text batched, phases at once.
async fn log_sender(
    client: ManagerClient,
    executor_id: String,
    job_id: String,
    job: Arc<RunningJob>,
    mut rx: LogReceiver,
) {
    let mut buf = String::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut alive = true;
    loop {
        let ev = match deadline {
            Some(d) => tokio::select! {
                ev = rx.recv() => ev,
                _ = tokio::time::sleep_until(d) => {
                    deadline = None;
                    flush_text(&client, &executor_id, &job_id, &job, &mut buf, &mut alive, &rx).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match ev {
            None => {
                flush_text(
                    &client,
                    &executor_id,
                    &job_id,
                    &job,
                    &mut buf,
                    &mut alive,
                    &rx,
                )
                .await;
                return;
            }
            Some(LogEvent::Text(t)) => {
                buf.push_str(&t);
                if buf.len() >= FLUSH_SIZE {
                    deadline = None;
                    flush_text(
                        &client,
                        &executor_id,
                        &job_id,
                        &job,
                        &mut buf,
                        &mut alive,
                        &rx,
                    )
                    .await;
                } else if deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + FLUSH_AFTER);
                }
            }
            Some(LogEvent::Phase(p)) => {
                deadline = None;
                flush_text(
                    &client,
                    &executor_id,
                    &job_id,
                    &job,
                    &mut buf,
                    &mut alive,
                    &rx,
                )
                .await;
                let log = JobLog {
                    phase: Some(p),
                    text: String::new(),
                };
                send_log(&client, &executor_id, &job_id, &job, &log, &mut alive).await;
            }
        }
    }
}

async fn flush_text(
    client: &ManagerClient,
    executor_id: &str,
    job_id: &str,
    job: &RunningJob,
    buf: &mut String,
    alive: &mut bool,
    rx: &LogReceiver,
) {
    let dropped = rx.take_dropped();
    if dropped > 0 {
        buf.push_str(&format!(
            "\n[{dropped} bytes of log dropped: the build wrote faster than the log could be sent]\n"
        ));
    }
    if buf.is_empty() {
        return;
    }
    let log = JobLog {
        phase: None,
        text: std::mem::take(buf),
    };
    send_log(client, executor_id, job_id, job, &log, alive).await;
}

async fn send_log(
    client: &ManagerClient,
    executor_id: &str,
    job_id: &str,
    job: &RunningJob,
    log: &JobLog,
    alive: &mut bool,
) {
    if !*alive {
        return;
    }
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=4 {
        match client.log(executor_id, job_id, log).await {
            Ok(resp) => {
                if resp.cancel.iter().any(|id| id == job_id) {
                    job.stop(StopReason::Cancelled);
                }
                return;
            }
            Err(ClientError::LeaseLost(_)) | Err(ClientError::NotFound(_)) => {
                job.stop(StopReason::LeaseLost);
                *alive = false;
                return;
            }
            Err(e) if e.is_transient() && attempt < 4 => {
                tracing::debug!(job = %job_id, error = %e, "sending the log failed; retrying");
            }
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "a part of the log was not sent");
                return;
            }
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_dirs_are_safe_names() {
        assert_eq!(job_dir_prefix("../../etc"), "job-etc-");
        assert_eq!(job_dir_prefix("0b1c-22_x"), "job-0b1c-22_x-");
    }

    #[test]
    fn config_debug_hides_the_token() {
        struct Nope;
        #[async_trait::async_trait]
        impl Engine for Nope {
            fn name(&self) -> &str {
                "nope"
            }
            async fn platforms(&self) -> Result<Vec<Platform>> {
                Ok(vec![])
            }
            async fn build(
                &self,
                _: &BuildSpec,
                _: &LogSink,
                _: &CancellationToken,
            ) -> Result<Built> {
                Err(Error::Cancelled)
            }
            async fn push(
                &self,
                _: &Built,
                _: &PushTarget,
                _: &LogSink,
                _: &CancellationToken,
            ) -> Result<crate::Pushed> {
                Err(Error::Cancelled)
            }
        }
        let c = AgentConfig::new("http://m", "dyn_secret", Arc::new(Nope), "/tmp/x");
        assert!(!format!("{c:?}").contains("dyn_secret"));
    }
}
