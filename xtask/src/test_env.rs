//! `cargo xtask test`: installs and starts everything the tests need on a
//! Debian 12 machine (as root), then runs every test on each backend.
//!
//! Steps, each idempotent (a second run reuses what the first one started):
//! 1. Debian packages (`apt-get install` only when `dpkg -s` says missing);
//! 2. moto's S3 server from PyPI, listening on 127.0.0.1:55900;
//! 3. `dockerd` (vfs storage, no iptables, no bridge) unless `docker info`
//!    already answers;
//! 4. a private PostgreSQL cluster on 127.0.0.1:55432 (trust auth);
//! 5. `cargo test --workspace` (SQLite + filesystem, real clients included),
//!    then the registry API, access-control, token and REST API tests on
//!    PostgreSQL, and the registry API tests on S3.
//!
//! Services are left running; state and logs live under
//! `/tmp/dockyard-test` (or `DOCKYARD_TEST_STATE_DIR`).

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Debian packages the tests (and the clients they drive) need.
const PACKAGES: &[&str] = &[
    "skopeo",
    "podman",
    "buildah",
    "docker.io",
    "docker-registry",
    "postgresql",
    "busybox-static",
    "notary",
    // Build sources in the build tests; perl and make build the vendored
    // OpenSSL of git2.
    "git",
    "perl",
    "make",
    "uidmap",
    // Runtimes, storage and networking helpers podman/buildah use.
    "runc",
    "crun",
    "conmon",
    "containernetworking-plugins",
    "fuse-overlayfs",
    "slirp4netns",
    "iptables",
    // moto's S3 server is installed from PyPI.
    "python3",
    "python3-pip",
    "python3-venv",
    "ca-certificates",
];

const S3_PORT: u16 = 55900;
const PG_PORT: u16 = 55432;
pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:55432/postgres";
pub const S3_ENDPOINT: &str = "http://127.0.0.1:55900";

#[derive(clap::Args)]
pub struct TestArgs {
    /// Install and start the services, but run no test.
    #[arg(long)]
    setup_only: bool,
    /// Run the tests without checking or starting anything first.
    #[arg(long, conflicts_with = "setup_only")]
    skip_setup: bool,
}

pub fn run(args: TestArgs) -> Result<()> {
    let state = state_dir();
    if !args.skip_setup {
        std::fs::create_dir_all(&state)
            .with_context(|| format!("cannot create the state directory {}", state.display()))?;
        header("test environment");
        println!("state and logs: {}", state.display());
        install_packages()?;
        start_s3(&state)?;
        start_dockerd(&state)?;
        start_postgres(&state)?;
    }
    if args.setup_only {
        println!("\nenvironment ready:");
        println!("  DOCKYARD_TEST_POSTGRES_URL={POSTGRES_URL}");
        println!("  DOCKYARD_TEST_S3_ENDPOINT={S3_ENDPOINT}");
        return Ok(());
    }
    run_tests()
}

fn state_dir() -> PathBuf {
    std::env::var_os("DOCKYARD_TEST_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/dockyard-test"))
}

fn header(title: &str) {
    let line = "=".repeat(72);
    println!("\n{line}\n== {title}\n{line}");
}

/// Whether `program` is an executable somewhere on `PATH`.
fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

/// Runs a command to completion, inheriting stdout/stderr; fails with the
/// command line when it cannot start or exits non-zero.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown} (is the program installed?)"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs a command quietly; `true` when it exits 0.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Polls `ready` every 250 ms until it holds or `timeout` passes.
fn wait_for(
    what: &str,
    timeout: Duration,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready() {
            println!("{what}: ready after {:.1?}", start.elapsed());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let tail = std::fs::read_to_string(log)
        .map(|s| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        })
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", log.display()));
    bail!(
        "{what} was not ready after {timeout:?}; last lines of {}:\n{tail}",
        log.display()
    )
}

/// Starts `cmd` in the background in its own process group (so it outlives
/// this process and ignores the terminal's Ctrl-C), output appended to `log`.
fn spawn_daemon(cmd: &mut Command, log: &Path) -> Result<u32> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {shown} (is the program installed?)"))?;
    println!(
        "started {shown} (pid {}, log {})",
        child.id(),
        log.display()
    );
    Ok(child.id())
}

// ---------------------------------------------------------------------------
// 1. Debian packages

fn install_packages() -> Result<()> {
    if !on_path("dpkg") {
        bail!("dpkg not found: `cargo xtask test` expects Debian 12 (or a derivative)");
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        println!("Debian packages: all {} present", PACKAGES.len());
        return Ok(());
    }
    println!("Debian packages missing: {}", missing.join(" "));
    if !is_root() {
        bail!(
            "installing packages needs root; run as root, or install them first:\n  sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get update")?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("apt-get install {}", missing.join(" ")))?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if !still.is_empty() {
        bail!("still not installed after apt-get: {}", still.join(" "));
    }
    Ok(())
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).ends_with(" installed"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// 2. moto (S3)

fn has_moto(python: &Path) -> bool {
    succeeds(Command::new(python).args(["-c", "import moto.server"]))
}

/// A Python interpreter that can import `moto.server`, installing moto from
/// PyPI when none can: into the default `python3` when pip allows it, else
/// (Debian's "externally managed" Python) into a virtualenv.
fn moto_python(state: &Path) -> Result<PathBuf> {
    let system = PathBuf::from("python3");
    if has_moto(&system) {
        return Ok(system);
    }
    let venv = state.join("moto-venv");
    let venv_python = venv.join("bin/python3");
    if venv_python.exists() && has_moto(&venv_python) {
        return Ok(venv_python);
    }
    if !on_path("python3") {
        bail!("python3 not found: install Debian's python3 and python3-venv");
    }
    println!("installing moto[server] from PyPI");
    let pip_ok = succeeds(Command::new("python3").args(["-m", "pip", "--version"]))
        && Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "moto[server]"])
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                // Debian's Python refuses (PEP 668): say so in one line.
                if !o.status.success() {
                    let err = String::from_utf8_lossy(&o.stderr);
                    let why = if err.contains("externally-managed-environment") {
                        "externally managed environment (PEP 668)".to_string()
                    } else {
                        err.lines().last().unwrap_or("").to_string()
                    };
                    println!("pip install into python3 failed: {why}");
                }
                o.status.success()
            })
            .unwrap_or(false);
    if pip_ok && has_moto(&system) {
        return Ok(system);
    }
    println!("installing moto into a virtualenv at {}", venv.display());
    if !venv_python.exists() {
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating a virtualenv for moto (is python3-venv installed?)")?;
    }
    run_cmd(Command::new(&venv_python).args(["-m", "pip", "install", "--quiet", "moto[server]"]))
        .context("pip install 'moto[server]'")?;
    if !has_moto(&venv_python) {
        bail!("moto was installed but `import moto.server` still fails");
    }
    Ok(venv_python)
}

fn start_s3(state: &Path) -> Result<()> {
    if listening(S3_PORT) {
        println!("S3 (moto): already listening on 127.0.0.1:{S3_PORT}");
        return Ok(());
    }
    let python = moto_python(state)?;
    let log = state.join("moto.log");
    spawn_daemon(
        Command::new(&python).args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &S3_PORT.to_string(),
        ]),
        &log,
    )?;
    wait_for("S3 (moto)", Duration::from_secs(60), &log, || {
        listening(S3_PORT)
    })
}

// ---------------------------------------------------------------------------
// 3. dockerd

fn docker_answers() -> bool {
    succeeds(Command::new("docker").arg("info"))
}

fn start_dockerd(state: &Path) -> Result<()> {
    if !on_path("docker") || !on_path("dockerd") {
        bail!("docker / dockerd not found: install Debian's docker.io");
    }
    if docker_answers() {
        println!("dockerd: already running (`docker info` answers)");
        return Ok(());
    }
    if !is_root() {
        bail!("`docker info` fails and starting dockerd needs root");
    }
    let log = state.join("dockerd.log");
    spawn_daemon(
        Command::new("dockerd").args([
            "--storage-driver",
            "vfs",
            "--iptables=false",
            "--bridge=none",
        ]),
        &log,
    )?;
    wait_for("dockerd", Duration::from_secs(90), &log, docker_answers)
}

// ---------------------------------------------------------------------------
// 4. PostgreSQL

fn postgres_bin() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("{} not found: install Debian's postgresql", root.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .context("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install Debian's postgresql")
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

fn start_postgres(state: &Path) -> Result<()> {
    if listening(PG_PORT) {
        println!("PostgreSQL: already listening on 127.0.0.1:{PG_PORT}");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "starting the private PostgreSQL cluster needs root (to run it as the postgres user)"
        );
    }
    let bin = postgres_bin()?;
    let dir = state.join("postgres");
    let data = dir.join("data");
    std::fs::create_dir_all(&dir)?;
    // The cluster belongs to the postgres user (root cannot run a server).
    run_cmd(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir),
    )?;
    if !data.join("PG_VERSION").exists() {
        println!("PostgreSQL: initdb {}", data.display());
        run_cmd(
            as_postgres(&bin.join("initdb"))
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ])
                .stdout(Stdio::null()),
        )
        .context("initdb")?;
    }
    let log = dir.join("postgres.log");
    let opts = format!(
        "-p {PG_PORT} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
        dir.display()
    );
    run_cmd(
        as_postgres(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .process_group(0),
    )
    .with_context(|| format!("starting PostgreSQL (see {})", log.display()))?;
    wait_for("PostgreSQL", Duration::from_secs(30), &log, || {
        listening(PG_PORT)
    })
}

// ---------------------------------------------------------------------------
// 5. the tests

fn run_tests() -> Result<()> {
    let root = crate::workspace_root()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/dockyard-target").into()
    });
    /// (title, cargo arguments, backend variable)
    type Run = (
        &'static str,
        &'static [&'static str],
        Option<(&'static str, &'static str)>,
    );
    let runs: [Run; 3] = [
        (
            "all tests, SQLite + filesystem (cargo test --workspace)",
            &["test", "--workspace"],
            None,
        ),
        (
            "registry API, access control, token service, REST API and build tests on PostgreSQL",
            &[
                "test",
                "--test",
                "integration",
                "--",
                "registry_api",
                "access",
                "auth",
                "api",
                "builds",
                "events",
                "rebuilds",
                "webhooks",
            ],
            Some(("DOCKYARD_TEST_POSTGRES_URL", POSTGRES_URL)),
        ),
        (
            "registry API tests on S3 (moto)",
            &["test", "--test", "integration", "registry_api"],
            Some(("DOCKYARD_TEST_S3_ENDPOINT", S3_ENDPOINT)),
        ),
    ];
    let total = Instant::now();
    for (i, (title, args, env)) in runs.iter().enumerate() {
        let shown_env = env.map(|(k, v)| format!("{k}={v} ")).unwrap_or_default();
        header(&format!(
            "test run {}/{}: {title}\n== {shown_env}cargo {}",
            i + 1,
            runs.len(),
            args.join(" ")
        ));
        let started = Instant::now();
        let mut cmd = Command::new(&cargo);
        cmd.args(*args)
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            // Each run picks its backend only from what is set here.
            .env_remove("DOCKYARD_TEST_POSTGRES_URL")
            .env_remove("DOCKYARD_TEST_S3_ENDPOINT");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let status = cmd.status().context("cannot run cargo")?;
        if !status.success() {
            bail!(
                "test run {}/{} ({title}) failed after {:.0?}: {status}",
                i + 1,
                runs.len(),
                started.elapsed()
            );
        }
        println!(
            "test run {}/{} passed in {:.0?}",
            i + 1,
            runs.len(),
            started.elapsed()
        );
    }
    header(&format!(
        "all {} test runs passed in {:.0?}",
        runs.len(),
        total.elapsed()
    ));
    Ok(())
}
