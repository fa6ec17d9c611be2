//! `TestApp`: a real Dockyard server on 127.0.0.1:0 with its own data
//! directory, database and bucket, plus helpers to push content.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use dockyard_core::Config;
use dockyard_core::config::StorageKind;
use dockyard_oci::Digest;
use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The superuser every test server is bootstrapped with.
pub const ADMIN: (&str, &str) = ("admin", "admin-password-1");

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    /// A client that sends the admin's basic credentials on every request.
    pub client: Client,
    /// A client without credentials.
    pub anon: Client,
    pub config: Config,
    pub data_dir: Arc<tempfile::TempDir>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A database URL for this test: SQLite in the data dir, or a fresh
/// PostgreSQL database when `DOCKYARD_TEST_POSTGRES_URL` is set.
async fn database_url(dir: &std::path::Path) -> Option<String> {
    let base = std::env::var("DOCKYARD_TEST_POSTGRES_URL").ok()?;
    sqlx::any::install_default_drivers();
    let name = format!("dockyard_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&base)
        .await
        .expect("connect to DOCKYARD_TEST_POSTGRES_URL");
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create test database");
    let _ = dir;
    let (prefix, _) = base.rsplit_once('/').expect("postgres URL with a database");
    Some(format!("{prefix}/{name}"))
}

/// Creates a fresh bucket when `DOCKYARD_TEST_S3_ENDPOINT` is set.
async fn s3_bucket() -> Option<(String, String)> {
    let endpoint = std::env::var("DOCKYARD_TEST_S3_ENDPOINT").ok()?;
    let bucket = format!("dockyard-{}", uuid::Uuid::new_v4().simple());
    let r = Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("S3 server reachable");
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    Some((endpoint, bucket))
}

impl TestApp {
    /// Boots a server with the default test configuration.
    pub async fn start() -> TestApp {
        Self::start_with(|_| {}).await
    }

    /// Boots a server after `tweak` adjusted the configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.database.url = database_url(dir.path()).await;
        if let Some((endpoint, bucket)) = s3_bucket().await {
            config.storage.kind = StorageKind::S3;
            config.storage.endpoint = Some(endpoint);
            config.storage.bucket = Some(bucket);
            config.storage.allow_http = true;
            config.storage.access_key_id = Some("test".into());
            config.storage.secret_access_key = Some("test".into());
        }
        config.bootstrap_admin = Some(format!("{}:{}", ADMIN.0, ADMIN.1));
        // Build tests start their executors explicitly.
        config.builds.local_executor = false;
        // Build tests serve sources from local repositories.
        config.builds.allow_local_git = true;
        tweak(&mut config);
        Self::boot(config, Arc::new(dir)).await
    }

    async fn boot(config: Config, data_dir: Arc<tempfile::TempDir>) -> TestApp {
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cfg = config.clone();
        let s = shutdown.clone();
        let task = tokio::spawn(async move {
            dockyard_web_api::serve(cfg, s, move |a| {
                let _ = tx.send(a);
            })
            .await
            .expect("server failed");
        });
        let addr = rx.await.expect("server did not start");
        TestApp {
            addr,
            base: format!("http://{addr}"),
            client: admin_client(),
            anon: Client::new(),
            config,
            data_dir,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the server and starts a new one on the same data (database and
    /// storage), as after a restart. The address changes.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await;
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".parse().unwrap();
        Self::boot(config, self.data_dir.clone()).await
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub async fn get(&self, path: &str) -> Response {
        self.req(Method::GET, path).send().await.unwrap()
    }

    /// The server's identity store (accounts, grants, audit), opened on the
    /// same database, for setting up and checking what the API cannot.
    pub async fn identity(&self) -> dockyard_core::identity::Identity {
        let db = dockyard_core::Db::connect(&self.config.database_url(), 2)
            .await
            .expect("open the test database");
        dockyard_core::identity::Identity::new(db)
    }

    pub fn storage_path(&self) -> PathBuf {
        self.config.storage_path()
    }

    /// Pushes a blob monolithically (POST then PUT) and returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Digest {
        let digest = Digest::sha256(bytes);
        let r = self
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "start upload");
        let loc = location(&r);
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .client
            .put(format!("{}{sep}digest={digest}", self.abs(&loc)))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "finish upload: {}",
            r.text().await.unwrap()
        );
        digest
    }

    /// Resolves a `Location` header against the server.
    pub fn abs(&self, loc: &str) -> String {
        if loc.starts_with("http") {
            loc.to_string()
        } else {
            self.url(loc)
        }
    }

    /// Pushes an image (config + layers) and its manifest under `reference`;
    /// returns (manifest digest, manifest body).
    pub async fn push_image(
        &self,
        repo: &str,
        reference: &str,
        layers: &[&[u8]],
    ) -> (Digest, Vec<u8>) {
        let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}, "n": uuid::Uuid::new_v4().to_string()})
            .to_string()
            .into_bytes();
        let cd = self.push_blob(repo, &config).await;
        let mut descs = vec![];
        for l in layers {
            let d = self.push_blob(repo, l).await;
            descs.push(json!({"mediaType": OCI_LAYER, "digest": d.to_string(), "size": l.len()}));
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": config.len()},
            "layers": descs,
        });
        self.put_manifest(repo, reference, OCI_MANIFEST, &manifest)
            .await
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &Value,
    ) -> (Digest, Vec<u8>) {
        let bytes = serde_json::to_vec(body).unwrap();
        let r = self
            .req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let digest = r
            .headers()
            .get("docker-content-digest")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status, 201, "put manifest: {}", r.text().await.unwrap());
        let digest: Digest = digest.expect("digest header").parse().unwrap();
        assert_eq!(digest, Digest::sha256(&bytes));
        (digest, bytes)
    }
}

/// The `dockyard` binary with no `DOCKYARD_*` variable of the test's own
/// environment: only the variables a test sets reach the process.
pub fn dockyard_command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dockyard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DOCKYARD_") {
            c.env_remove(k);
        }
    }
    c
}

/// `user:password` of the admin, as `DOCKYARD_BOOTSTRAP_ADMIN` takes it.
pub fn admin_pair() -> String {
    format!("{}:{}", ADMIN.0, ADMIN.1)
}

/// The `Authorization` header value of the admin's basic credentials.
pub fn admin_basic() -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ADMIN.0, ADMIN.1))
    )
}

/// A client sending the admin's basic credentials on every request.
pub fn admin_client() -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        admin_basic().parse().unwrap(),
    );
    Client::builder().default_headers(headers).build().unwrap()
}

/// A token from the server's token service for `service` and `scope`,
/// with basic credentials or anonymously.
pub async fn fetch_token(
    app: &TestApp,
    creds: Option<(&str, &str)>,
    service: &str,
    scope: &str,
) -> String {
    let mut req = app
        .anon
        .get(app.url("/v2/auth"))
        .query(&[("service", service), ("scope", scope)]);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200, "token request");
    r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn location(r: &Response) -> String {
    r.headers()
        .get("location")
        .expect("Location header")
        .to_str()
        .unwrap()
        .to_string()
}

pub fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// Asserts a spec error response: status and `errors[0].code`.
pub async fn assert_error(r: Response, status: u16, code: &str) -> Value {
    let got = r.status().as_u16();
    let ct = header(&r, "content-type");
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "status (body: {text})");
    assert_eq!(ct.as_deref(), Some("application/json"), "content type");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    assert_eq!(v["errors"][0]["code"], code, "{text}");
    assert!(v["errors"][0]["message"].is_string(), "{text}");
    v
}
