//! The agent against an in-process fake build manager that speaks the
//! executor protocol (and answers registry `HEAD`s for base images), with a
//! scripted engine, and once end to end with dockerd and a real registry.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dockyard_builders::{
    AgentConfig, BuildSpec, Built, Engine, Error, LogSink, PushTarget, Pushed, pack_context,
};
use dockyard_oci::build::{
    EXECUTOR_HEADER, Heartbeat, HeartbeatResponse, JobAssignment, JobLog, JobResult, JobSource,
    Phase, Platform, PollRequest, RegisterRequest, RegisterResponse, TokenRequest, TokenResponse,
};
use tokio_util::sync::CancellationToken;

use crate::harness::{Registry, engine, push_busybox_base, untag, write};

const NODE_TOKEN: &str = "dyn_test_node_token";
const BASE_DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

#[derive(Default)]
struct Manager {
    queue: VecDeque<JobAssignment>,
    contexts: BTreeMap<String, Vec<u8>>,
    registrations: Vec<RegisterRequest>,
    executor: Option<String>,
    heartbeats: Vec<Heartbeat>,
    logs: Vec<(String, JobLog)>,
    tokens: Vec<(String, TokenRequest)>,
    results: Vec<(String, JobResult)>,
    /// Jobs the manager wants stopped.
    cancel: HashSet<String>,
    /// Jobs whose lease is lost (409 on job calls).
    lost: HashSet<String>,
    /// Answer the next heartbeat with 404.
    forget: bool,
    /// Executor headers of job calls that did not match.
    bad_headers: usize,
}

type Shared = Arc<Mutex<Manager>>;

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {NODE_TOKEN}"))
}

fn job_call(m: &mut Manager, h: &HeaderMap, job: &str) -> Option<Response> {
    if !authorized(h) {
        return Some(StatusCode::UNAUTHORIZED.into_response());
    }
    if h.get(EXECUTOR_HEADER).and_then(|v| v.to_str().ok()) != m.executor.as_deref() {
        m.bad_headers += 1;
    }
    if m.lost.contains(job) {
        return Some((StatusCode::CONFLICT, "leased to another executor").into_response());
    }
    None
}

async fn register(
    State(s): State<Shared>,
    h: HeaderMap,
    Json(r): Json<RegisterRequest>,
) -> Response {
    if !authorized(&h) {
        return (StatusCode::UNAUTHORIZED, "bad node token").into_response();
    }
    let mut m = s.lock().unwrap();
    m.registrations.push(r);
    let id = format!("ex-{}", m.registrations.len());
    m.executor = Some(id.clone());
    Json(RegisterResponse {
        executor_id: id,
        heartbeat_seconds: 1,
        lease_seconds: 30,
    })
    .into_response()
}

async fn poll(State(s): State<Shared>, h: HeaderMap, Json(r): Json<PollRequest>) -> Response {
    if !authorized(&h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(r.wait_seconds.min(2));
    loop {
        {
            let mut m = s.lock().unwrap();
            if m.executor.as_deref() != Some(&r.executor_id) {
                return StatusCode::NOT_FOUND.into_response();
            }
            if let Some(job) = m.queue.pop_front() {
                return Json(job).into_response();
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn heartbeat(State(s): State<Shared>, h: HeaderMap, Json(hb): Json<Heartbeat>) -> Response {
    if !authorized(&h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut m = s.lock().unwrap();
    if m.forget || m.executor.as_deref() != Some(&hb.executor_id) {
        m.forget = false;
        m.executor = None;
        return StatusCode::NOT_FOUND.into_response();
    }
    let cancel = hb
        .jobs
        .iter()
        .filter(|j| m.cancel.contains(*j))
        .cloned()
        .collect();
    m.heartbeats.push(hb);
    Json(HeartbeatResponse { cancel }).into_response()
}

async fn log(
    State(s): State<Shared>,
    UrlPath(job): UrlPath<String>,
    h: HeaderMap,
    Json(l): Json<JobLog>,
) -> Response {
    let mut m = s.lock().unwrap();
    if let Some(r) = job_call(&mut m, &h, &job) {
        return r;
    }
    m.logs.push((job.clone(), l));
    let cancel = if m.cancel.contains(&job) {
        vec![job]
    } else {
        vec![]
    };
    Json(HeartbeatResponse { cancel }).into_response()
}

async fn token(
    State(s): State<Shared>,
    UrlPath(job): UrlPath<String>,
    h: HeaderMap,
    Json(t): Json<TokenRequest>,
) -> Response {
    let mut m = s.lock().unwrap();
    if let Some(r) = job_call(&mut m, &h, &job) {
        return r;
    }
    m.tokens.push((job.clone(), t));
    Json(TokenResponse {
        token: format!("job-token-{job}"),
        expires_in: 300,
    })
    .into_response()
}

async fn context(State(s): State<Shared>, UrlPath(job): UrlPath<String>, h: HeaderMap) -> Response {
    let mut m = s.lock().unwrap();
    if let Some(r) = job_call(&mut m, &h, &job) {
        return r;
    }
    match m.contexts.get(&job) {
        Some(c) => c.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn result(
    State(s): State<Shared>,
    UrlPath(job): UrlPath<String>,
    h: HeaderMap,
    Json(r): Json<JobResult>,
) -> Response {
    let mut m = s.lock().unwrap();
    if let Some(resp) = job_call(&mut m, &h, &job) {
        return resp;
    }
    m.results.push((job, r));
    StatusCode::NO_CONTENT.into_response()
}

/// The registry side: `HEAD /v2/<repo>/manifests/<tag>` of base images,
/// answered only with the job's token.
async fn registry_head(UrlPath(path): UrlPath<String>, h: HeaderMap) -> Response {
    let auth = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !auth.starts_with("Bearer job-token-") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if path.starts_with("base/") && path.contains("/manifests/") {
        ([("docker-content-digest", BASE_DIGEST)], Bytes::new()).into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

struct FakeManager {
    state: Shared,
    addr: String,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeManager {
    async fn start() -> FakeManager {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/api/v1/executor/register", post(register))
            .route("/api/v1/executor/poll", post(poll))
            .route("/api/v1/executor/heartbeat", post(heartbeat))
            .route("/api/v1/executor/jobs/{job}/log", post(log))
            .route("/api/v1/executor/jobs/{job}/token", post(token))
            .route("/api/v1/executor/jobs/{job}/context", get(context))
            .route("/api/v1/executor/jobs/{job}/result", post(result))
            .route("/v2/{*path}", get(registry_head).head(registry_head))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeManager {
            state,
            addr,
            _server: server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn m(&self) -> std::sync::MutexGuard<'_, Manager> {
        self.state.lock().unwrap()
    }

    fn job(&self, id: &str, source: JobSource) -> JobAssignment {
        JobAssignment {
            job_id: id.to_string(),
            build_id: "b1".to_string(),
            platform: "linux/amd64".to_string(),
            source,
            dockerfile: "Dockerfile".to_string(),
            context_dir: String::new(),
            build_args: BTreeMap::new(),
            target: None,
            registry: self.addr.clone(),
            registry_insecure: true,
            repository: "team/app".to_string(),
            push_tag: format!("dockyard-{id}"),
            timeout_seconds: 60,
        }
    }

    fn push(&self, job: JobAssignment) {
        self.m().queue.push_back(job);
    }

    /// Waits for the result of `job`.
    async fn result(&self, job: &str) -> JobResult {
        for _ in 0..600 {
            if let Some((_, r)) = self.m().results.iter().find(|(j, _)| j == job) {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no result for {job}");
    }

    fn phases(&self, job: &str) -> Vec<Phase> {
        self.m()
            .logs
            .iter()
            .filter(|(j, _)| j == job)
            .filter_map(|(_, l)| l.phase)
            .collect()
    }

    fn log_text(&self, job: &str) -> String {
        self.m()
            .logs
            .iter()
            .filter(|(j, _)| j == job)
            .map(|(_, l)| l.text.clone())
            .collect()
    }
}

/// What the scripted engine does in `build`.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    Succeed,
    Fail,
    /// Wait until cancelled.
    Hang,
}

struct ScriptedEngine {
    script: Script,
    specs: Mutex<Vec<(BuildSpec, BTreeMap<String, String>)>>,
    pushes: Mutex<Vec<PushTarget>>,
}

impl ScriptedEngine {
    fn new(script: Script) -> Arc<Self> {
        Arc::new(ScriptedEngine {
            script,
            specs: Mutex::default(),
            pushes: Mutex::default(),
        })
    }
}

fn read_tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == ".git" {
            continue;
        }
        if p.is_dir() {
            for (k, v) in read_tree(&p) {
                out.insert(format!("{name}/{k}"), v);
            }
        } else {
            out.insert(name, std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

#[async_trait]
impl Engine for ScriptedEngine {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn platforms(&self) -> dockyard_builders::Result<Vec<Platform>> {
        Ok(vec!["linux/amd64".parse().unwrap()])
    }

    async fn build(
        &self,
        spec: &BuildSpec,
        logs: &LogSink,
        cancel: &CancellationToken,
    ) -> dockyard_builders::Result<Built> {
        self.specs
            .lock()
            .unwrap()
            .push((spec.clone(), read_tree(&spec.context_dir)));
        logs.line("Step 1/2 : FROM base");
        match self.script {
            Script::Succeed => {
                logs.line("Successfully built 0123456789ab");
                Ok(Built {
                    id: format!("sha256:{}", "c".repeat(64)),
                })
            }
            Script::Fail => Err(Error::BuildFailed(
                "The command '/bin/sh -c exit 1' returned a non-zero code: 1".into(),
            )),
            Script::Hang => {
                cancel.cancelled().await;
                Err(Error::Cancelled)
            }
        }
    }

    async fn push(
        &self,
        image: &Built,
        target: &PushTarget,
        _logs: &LogSink,
        _cancel: &CancellationToken,
    ) -> dockyard_builders::Result<Pushed> {
        self.pushes.lock().unwrap().push(target.clone());
        Ok(Pushed {
            reference: target.reference(),
            manifest_digest: format!("sha256:{}", "d".repeat(64)),
            config_digest: image.id.clone(),
        })
    }
}

struct Running {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<dockyard_builders::Result<()>>,
    work: tempfile::TempDir,
}

impl Running {
    async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the agent did not stop")
            .unwrap()
            .unwrap();
        self.work
    }
}

fn start_agent(mgr: &FakeManager, engine: Arc<dyn Engine>, capacity: u32) -> Running {
    let work = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(mgr.url(), NODE_TOKEN, engine, work.path());
    config.capacity = capacity;
    config.poll_wait = Duration::from_secs(1);
    config.drain_timeout = Duration::from_secs(5);
    config.name = "test-node".into();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(dockyard_builders::run(config, shutdown.clone()));
    Running {
        shutdown,
        handle,
        work,
    }
}

fn context_archive(files: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    for (p, c) in files {
        write(dir.path(), p, c);
    }
    let mut out = Vec::new();
    pack_context(dir.path(), "Dockerfile", &mut out).unwrap();
    out
}

/// A git repository with two commits on `main`; returns (dir, first, second).
fn git_repo() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init(dir.path()).unwrap();
    let sig = git2::Signature::now("t", "t@example.com").unwrap();
    let mut parent: Option<git2::Oid> = None;
    let mut ids = Vec::new();
    for (n, content) in ["first\n", "second\n"].iter().enumerate() {
        write(
            dir.path(),
            "app/Dockerfile",
            "ARG V=1\nARG REG\nFROM ${REG}/base/img:${V}\nCOPY x /x\n",
        );
        write(dir.path(), "app/x", content);
        write(dir.path(), "README", &format!("commit {n}\n"));
        let mut index = repo.index().unwrap();
        index
            .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let parents: Vec<git2::Commit> = parent
            .iter()
            .map(|p| repo.find_commit(*p).unwrap())
            .collect();
        let refs: Vec<&git2::Commit> = parents.iter().collect();
        let id = repo
            .commit(Some("refs/heads/main"), &sig, &sig, "c", &tree, &refs)
            .unwrap();
        parent = Some(id);
        ids.push(id.to_string());
    }
    (dir, ids[0].clone(), ids[1].clone())
}

#[tokio::test]
async fn a_git_job_runs_through_every_phase() {
    let mgr = FakeManager::start().await;
    let engine = ScriptedEngine::new(Script::Succeed);
    let agent = start_agent(&mgr, engine.clone(), 2);
    let (repo, first, _second) = git_repo();
    let mut job = mgr.job(
        "j1",
        JobSource::Git {
            url: format!("file://{}", repo.path().display()),
            commit: first.clone(),
            git_ref: Some("refs/heads/main".into()),
            username: None,
            password: None,
            ssh_key: None,
        },
    );
    job.context_dir = "app".into();
    job.build_args.insert("REG".into(), mgr.addr.clone());
    job.build_args.insert("V".into(), "7".into());
    job.target = None;
    mgr.push(job);

    let r = mgr.result("j1").await;
    assert_eq!(r.phase, Phase::Complete, "{r:?}");
    assert_eq!(
        r.manifest_digest.as_deref(),
        Some(&*format!("sha256:{}", "d".repeat(64)))
    );
    assert_eq!(
        r.config_digest.as_deref(),
        Some(&*format!("sha256:{}", "c".repeat(64)))
    );
    assert_eq!(
        r.base_images,
        vec![dockyard_oci::build::BaseImage {
            reference: format!("{}/base/img:7", mgr.addr),
            digest: Some(BASE_DIGEST.into()),
        }]
    );
    assert_eq!(
        mgr.phases("j1"),
        [
            Phase::FetchingSource,
            Phase::PullingBase,
            Phase::Building,
            Phase::Pushing
        ]
    );
    let text = mgr.log_text("j1");
    assert!(text.contains("Step 1/2"), "{text}");
    assert!(text.contains(&format!("Checked out {first}")), "{text}");
    {
        let m = mgr.m();
        assert_eq!(m.tokens.len(), 1);
        assert_eq!(m.tokens[0].1.pull, ["base/img"]);
        assert_eq!(m.bad_headers, 0);
        assert_eq!(m.registrations.len(), 1);
        assert_eq!(m.registrations[0].name, "test-node");
        assert_eq!(m.registrations[0].capacity, 2);
        assert_eq!(m.registrations[0].engine, "scripted");
        assert_eq!(m.registrations[0].platforms, ["linux/amd64"]);
    }
    let (spec, tree) = engine.specs.lock().unwrap()[0].clone();
    assert_eq!(tree.get("x").map(String::as_str), Some("first\n"));
    assert!(
        !tree.contains_key("README"),
        "the context is the app directory"
    );
    assert_eq!(spec.dockerfile, "Dockerfile");
    assert_eq!(spec.platform, Some("linux/amd64".parse().unwrap()));
    assert_eq!(spec.build_args.get("V").map(String::as_str), Some("7"));
    assert_eq!(
        spec.registry_auth
            .get(&mgr.addr)
            .map(|s| s.expose().to_string()),
        Some("job-token-j1".to_string())
    );
    let push = engine.pushes.lock().unwrap()[0].clone();
    assert_eq!(
        push.reference(),
        format!("{}/team/app:dockyard-j1", mgr.addr)
    );
    assert_eq!(push.token.unwrap().expose(), "job-token-j1");

    // The job's directory is gone.
    let work = agent.stop().await;
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn failures_timeouts_and_cancellations_are_reported() {
    let mgr = FakeManager::start().await;
    let (repo, _first, _) = git_repo();
    let url = format!("file://{}", repo.path().display());
    let git = |commit: &str| JobSource::Git {
        url: url.clone(),
        commit: commit.to_string(),
        git_ref: Some("refs/heads/main".into()),
        username: None,
        password: None,
        ssh_key: None,
    };

    // A commit that does not exist.
    let failing = ScriptedEngine::new(Script::Fail);
    let agent = start_agent(&mgr, failing.clone(), 1);
    mgr.push(mgr.job("missing", git(&"e".repeat(40))));
    let r = mgr.result("missing").await;
    assert_eq!(r.phase, Phase::Failed);
    assert!(r.error.as_deref().unwrap().contains("not found"), "{r:?}");

    // A build failure carries the engine's message, in the result and log.
    mgr.contexts_insert(
        "bad",
        context_archive(&[("Dockerfile", "FROM scratch\nRUN exit 1\n")]),
    );
    mgr.push(mgr.job("bad", JobSource::Context));
    let r = mgr.result("bad").await;
    assert_eq!(r.phase, Phase::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("non-zero code: 1"),
        "{r:?}"
    );
    assert!(mgr.log_text("bad").contains("non-zero code: 1"));
    assert!(r.base_images.is_empty());

    // A Dockerfile that is not there.
    mgr.contexts_insert("nodf", context_archive(&[("Dockerfile", "FROM scratch\n")]));
    let mut job = mgr.job("nodf", JobSource::Context);
    job.dockerfile = "Missing.Dockerfile".into();
    mgr.push(job);
    let r = mgr.result("nodf").await;
    assert_eq!(r.phase, Phase::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("Missing.Dockerfile"),
        "{r:?}"
    );
    agent.stop().await;

    let hanging = ScriptedEngine::new(Script::Hang);
    let agent = start_agent(&mgr, hanging.clone(), 2);
    // Timed out.
    mgr.contexts_insert("slow", context_archive(&[("Dockerfile", "FROM scratch\n")]));
    let mut job = mgr.job("slow", JobSource::Context);
    job.timeout_seconds = 1;
    mgr.push(job);
    // Cancelled by the manager.
    mgr.contexts_insert(
        "cancel",
        context_archive(&[("Dockerfile", "FROM scratch\n")]),
    );
    mgr.m().cancel.insert("cancel".into());
    mgr.push(mgr.job("cancel", JobSource::Context));
    let r = mgr.result("slow").await;
    assert_eq!(r.phase, Phase::Failed);
    assert_eq!(r.error.as_deref(), Some("timed out after 1 s"));
    let r = mgr.result("cancel").await;
    assert_eq!(r.phase, Phase::Cancelled, "{r:?}");

    // A lost lease stops the job without a result.
    mgr.contexts_insert("lost", context_archive(&[("Dockerfile", "FROM scratch\n")]));
    mgr.m().lost.insert("lost".into());
    mgr.push(mgr.job("lost", JobSource::Context));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!mgr.m().results.iter().any(|(j, _)| j == "lost"));
    assert!(
        !hanging
            .specs
            .lock()
            .unwrap()
            .iter()
            .any(|(s, _)| s.context_dir.to_string_lossy().contains("job-lost-")),
        "a job whose lease is lost does not build"
    );

    // Forgotten executors register again.
    mgr.m().forget = true;
    for _ in 0..100 {
        if mgr.m().registrations.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(mgr.m().registrations.len() >= 2);
    let work = agent.stop().await;
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

impl FakeManager {
    fn contexts_insert(&self, job: &str, archive: Vec<u8>) {
        self.m().contexts.insert(job.to_string(), archive);
    }
}

#[tokio::test]
async fn a_refused_node_token_stops_the_agent() {
    let mgr = FakeManager::start().await;
    let work = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(
        mgr.url(),
        "dyn_wrong",
        ScriptedEngine::new(Script::Succeed),
        work.path(),
    );
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        dockyard_builders::run(config, CancellationToken::new()),
    )
    .await
    .unwrap();
    let e = r.unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(!e.to_string().contains("dyn_wrong"));
}

#[tokio::test]
async fn a_context_job_builds_with_dockerd_and_pushes() {
    let e = engine().await;
    let reg = Registry::start().await;
    let base = push_busybox_base(&e, &reg, "base/busybox", "1").await;
    let mgr = FakeManager::start().await;
    let agent = start_agent(&mgr, Arc::new(e), 1);
    mgr.contexts_insert(
        "real",
        context_archive(&[
            (
                "Dockerfile",
                &format!(
                    "FROM {}/base/busybox:1\nARG WHO\nRUN echo \"hello $WHO\" > /hello\n",
                    reg.host
                ),
            ),
            (".dockerignore", "junk\n"),
            ("junk", "x"),
        ]),
    );
    let mut job = mgr.job("real", JobSource::Context);
    job.registry = reg.host.clone();
    job.build_args.insert("WHO".into(), "world".into());
    mgr.push(job);
    let r = mgr.result("real").await;
    assert_eq!(r.phase, Phase::Complete, "{r:?}\n{}", mgr.log_text("real"));
    let pushed = reg.digest("team/app", "dockyard-real").await;
    assert_eq!(r.manifest_digest, pushed);
    assert!(r.config_digest.as_deref().unwrap().starts_with("sha256:"));
    assert_eq!(
        r.base_images,
        vec![dockyard_oci::build::BaseImage {
            reference: format!("{}/base/busybox:1", reg.host),
            digest: Some(base.manifest_digest.clone()),
        }]
    );
    let text = mgr.log_text("real");
    assert!(text.contains("Step 1/3"), "{text}");
    assert!(text.contains("Pushed"), "{text}");
    assert_eq!(mgr.m().tokens[0].1.pull, ["base/busybox"]);
    agent.stop().await;
    untag(&engine().await, &format!("{}/base/busybox:1", reg.host)).await;
}
