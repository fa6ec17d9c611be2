//! The two servers under test: started on loopback with a fresh temporary
//! data directory each, killed and cleaned up when dropped (also on error
//! and on panic).

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running server process with its data directory.
pub struct Server {
    /// "Dockyard" or "Distribution".
    pub name: &'static str,
    /// `http://127.0.0.1:PORT`.
    pub base: reqwest::Url,
    child: Child,
    log: PathBuf,
    // Dropped after the process is killed (see `Drop`).
    dir: tempfile::TempDir,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        proc_status_kib(self.pid(), "VmHWM").map(|k| k * 1024)
    }

    /// Current resident set size (VmRSS), in bytes.
    pub fn rss(&self) -> Result<u64> {
        proc_status_kib(self.pid(), "VmRSS").map(|k| k * 1024)
    }

    /// Bytes the data directory holds (for the progress log).
    pub fn disk_usage(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(self.dir.path())
    }

    /// The last lines the server logged, to explain a failure.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` is removed after this, when the fields drop.
    }
}

fn proc_status_kib(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let v = rest.trim().trim_end_matches("kB").trim();
            return v.parse().with_context(|| format!("parsing {key} {v:?}"));
        }
    }
    bail!("{key} missing from /proc/{pid}/status")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(
    name: &'static str,
    mut cmd: Command,
    dir: tempfile::TempDir,
    port: u16,
) -> Result<Server> {
    let log = dir.path().join("server.log");
    let out = File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    Ok(Server {
        name,
        base: format!("http://127.0.0.1:{port}").parse()?,
        child,
        log,
        dir,
    })
}

/// Starts `dockyard serve` with SQLite and filesystem storage in a fresh
/// temporary directory.
pub fn start_dockyard(bin: &Path) -> Result<Server> {
    let dir = tempfile::Builder::new()
        .prefix("bench-dockyard-")
        .tempdir()?;
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("DOCKYARD_LOG_LEVEL", "warn")
        // The build figures start their own executors.
        .env("DOCKYARD_BUILDS_LOCAL_EXECUTOR", "false")
        .env(
            "DOCKYARD_BOOTSTRAP_ADMIN",
            format!("{BENCH_USER}:{BENCH_PASSWORD}"),
        )
        .env_remove("DOCKYARD_CONFIG");
    spawn("Dockyard", cmd, dir, port)
}

/// Starts CNCF Distribution with filesystem storage in a fresh temporary
/// directory.
pub fn start_distribution(bin: &Path) -> Result<Server> {
    let dir = tempfile::Builder::new()
        .prefix("bench-distribution-")
        .tempdir()?;
    let port = free_port()?;
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root)?;
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:{port}
",
            root.display()
        ),
    )?;
    let mut cmd = Command::new(bin);
    // Distribution reads REGISTRY_* variables as configuration overrides.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("serve").arg(&config);
    spawn("Distribution", cmd, dir, port)
}

/// Waits until `GET /v2/` answers 200.
pub async fn wait_ready(server: &mut Server, client: &reqwest::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = server.base.join("/v2/")?;
    loop {
        server.check_alive()?;
        match client.get(url.clone()).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::OK => return Ok(()),
            Ok(r) if Instant::now() > deadline => {
                bail!("{} answers {} on /v2/", server.name, r.status())
            }
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "{} did not come up within 30 s: {e}; log:\n{}",
                    server.name,
                    server.log_tail()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The account the workload uses. Dockyard requires credentials; Distribution,
/// run without auth, ignores them, so both servers get the same requests.
pub const BENCH_USER: &str = "bench";
pub const BENCH_PASSWORD: &str = "bench-password-1";

/// `Authorization` header value for the bench account.
pub fn authorization() -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{BENCH_USER}:{BENCH_PASSWORD}"))
    )
}

/// Default headers for the workload's HTTP clients.
pub fn auth_headers() -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        authorization().parse().expect("ASCII header value"),
    );
    h
}
