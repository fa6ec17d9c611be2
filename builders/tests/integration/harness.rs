//! What the tests need: a reachable dockerd (a clear failure otherwise, never
//! a silent skip), a throw-away registry, base images made from the host's
//! static busybox, and helpers to read what was pushed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dockyard_builders::{BuildSpec, DockerEngine, Engine, LogSink, PushTarget, Pushed, Secret};
use dockyard_oci::Digest;
use tokio_util::sync::CancellationToken;

/// The dockerd of this machine; panics with what to do when it is not there.
pub async fn engine() -> DockerEngine {
    match DockerEngine::connect(None).await {
        Ok(e) => e,
        Err(e) => panic!(
            "these tests need a running dockerd (`cargo xtask test` starts one; or run \
             `dockerd --storage-driver vfs --iptables=false --bridge=none &`): {e}"
        ),
    }
}

/// A CNCF Distribution registry on 127.0.0.1 (which dockerd treats as an
/// insecure registry), removed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:port`.
    pub host: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub async fn start() -> Registry {
        let bin = ["/usr/bin/docker-registry", "/usr/local/bin/registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("these tests need CNCF Distribution: apt-get install docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n  relativeurls: true\nlog:\n  level: error\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start docker-registry");
        let reg = Registry {
            child,
            host,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/v2/", reg.url())).await
                && r.status().is_success()
            {
                return reg;
            }
            assert!(Instant::now() < deadline, "docker-registry did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// HEAD of a manifest: its digest.
    pub async fn digest(&self, repo: &str, reference: &str) -> Option<String> {
        let r = reqwest::Client::new()
            .head(format!("{}/v2/{repo}/manifests/{reference}", self.url()))
            .header(
                "accept",
                "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json, \
                 application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await
            .unwrap();
        r.status().is_success().then(|| {
            r.headers()["docker-content-digest"]
                .to_str()
                .unwrap()
                .to_string()
        })
    }

    pub async fn get_json(&self, path: &str, accept: &str) -> serde_json::Value {
        let r = reqwest::Client::new()
            .get(format!("{}/v2/{path}", self.url()))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn get_blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let r = reqwest::get(format!("{}/v2/{repo}/blobs/{digest}", self.url()))
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap().to_vec()
    }

    /// The config of a pushed single-platform image.
    pub async fn config(&self, repo: &str, manifest_digest: &str) -> serde_json::Value {
        let m = self
            .get_json(
                &format!("{repo}/manifests/{manifest_digest}"),
                "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            )
            .await;
        let cfg = m["config"]["digest"].as_str().unwrap().to_string();
        serde_json::from_slice(&self.get_blob(repo, &cfg).await).unwrap()
    }

    pub async fn put_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = Digest::sha256(data).to_string();
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with('/') {
            format!("{}{loc}", self.url())
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = http
            .put(format!("{loc}{sep}digest={digest}"))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "blob upload");
        digest
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let r = reqwest::Client::new()
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.url()))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "manifest upload: {}",
            r.text().await.unwrap()
        );
        Digest::sha256(body).to_string()
    }

    /// A two-platform image (linux/amd64 and linux/arm64), each a single
    /// layer with `/hello.txt` saying its architecture; returns the index
    /// digest.
    pub async fn push_multi_platform(&self, repo: &str, tag: &str) -> String {
        let mut entries = Vec::new();
        for arch in ["amd64", "arm64"] {
            let mut tar = tar::Builder::new(Vec::new());
            let data = format!("hello from {arch}\n");
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, "hello.txt", data.as_bytes())
                .unwrap();
            let raw = tar.into_inner().unwrap();
            let diff_id = Digest::sha256(&raw).to_string();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &raw).unwrap();
            let gz = gz.finish().unwrap();
            let layer = self.put_blob(repo, &gz).await;
            let config = serde_json::to_vec(&serde_json::json!({
                "architecture": arch, "os": "linux", "config": {},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]}
            }))
            .unwrap();
            let config_digest = self.put_blob(repo, &config).await;
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": gz.len()}]
            }))
            .unwrap();
            let md = self
                .put_manifest(
                    repo,
                    &format!("{tag}-{arch}"),
                    "application/vnd.oci.image.manifest.v1+json",
                    &manifest,
                )
                .await;
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md, "size": manifest.len(),
                "platform": {"architecture": arch, "os": "linux"}
            }));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries
        }))
        .unwrap();
        self.put_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &index)
            .await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("these tests need a static busybox: apt-get install busybox-static")
}

/// Builds `FROM scratch` + a static busybox with the engine and pushes it as
/// `<registry>/<repo>:<tag>`.
pub async fn push_busybox_base(
    engine: &DockerEngine,
    registry: &Registry,
    repo: &str,
    tag: &str,
) -> Pushed {
    let ctx = tempfile::tempdir().unwrap();
    let bin = ctx.path().join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(busybox(), bin.join("busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "ls", "true", "false", "test", "uname",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    write(ctx.path(), "Dockerfile", "FROM scratch\nCOPY rootfs/ /\n");
    let mut spec = BuildSpec::new(ctx.path());
    spec.pull = false;
    let cancel = CancellationToken::new();
    let built = engine
        .build(&spec, &LogSink::discard(), &cancel)
        .await
        .expect("building the busybox base");
    let target = PushTarget {
        registry: registry.host.clone(),
        repository: repo.to_string(),
        tag: tag.to_string(),
        token: Some(Secret::new("unused-by-docker-registry")),
    };
    let pushed = engine
        .push(&built, &target, &LogSink::discard(), &cancel)
        .await
        .expect("pushing the busybox base");
    // Builds pull it from the registry.
    untag(engine, &target.reference()).await;
    pushed
}

/// Removes a local tag (best effort), so tests leave dockerd as they found it.
pub async fn untag(engine: &DockerEngine, name: &str) {
    let _ = engine
        .client()
        .remove_image(
            name,
            Some(bollard::query_parameters::RemoveImageOptions {
                force: false,
                noprune: true,
                platforms: None,
            }),
            None,
        )
        .await;
}

/// A reverse proxy in front of a registry that demands `Authorization:
/// Bearer <token>` like a registry with token auth (it answers others with a
/// Bearer challenge) and records what came with which credential.
pub struct TokenGate {
    pub host: String,
    pub seen: Arc<Mutex<Vec<(String, String, bool)>>>,
    _server: tokio::task::JoinHandle<()>,
}

struct Gate {
    token: String,
    addr: String,
    backend: String,
    http: reqwest::Client,
    seen: Arc<Mutex<Vec<(String, String, bool)>>>,
}

async fn gate(
    axum::extract::State(g): axum::extract::State<Arc<Gate>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let path_q = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let ok = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {}", g.token));
    g.seen
        .lock()
        .unwrap()
        .push((parts.method.to_string(), parts.uri.path().to_string(), ok));
    if !ok {
        let challenge = format!("Bearer realm=\"http://{}/token\",service=\"gate\"", g.addr);
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            [("www-authenticate", challenge)],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"a bearer token is required"}]}"#,
        )
            .into_response();
    }
    let mut fwd = g
        .http
        .request(
            parts.method.clone(),
            format!("http://{}{path_q}", g.backend),
        )
        .body(reqwest::Body::wrap_stream(body.into_data_stream()));
    for (k, v) in &parts.headers {
        if k != "host" && k != "authorization" {
            fwd = fwd.header(k, v);
        }
    }
    let resp = match fwd.send().await {
        Ok(r) => r,
        Err(e) => return (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let mut out = axum::response::Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    out.body(axum::body::Body::from_stream(resp.bytes_stream()))
        .unwrap()
}

impl TokenGate {
    pub async fn start(backend: &Registry, token: &str) -> TokenGate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Gate {
            token: token.to_string(),
            addr: addr.clone(),
            backend: backend.host.clone(),
            http: reqwest::Client::new(),
            seen: seen.clone(),
        });
        let app = axum::Router::new().fallback(gate).with_state(state);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        TokenGate {
            host: addr,
            seen,
            _server: server,
        }
    }
}
