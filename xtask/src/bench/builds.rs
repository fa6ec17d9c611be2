//! Build figures (Dockyard only: Distribution has no builds). Two
//! `dockyard executor` processes (linux/amd64 and linux/arm64, capacity 1
//! each) build through the local dockerd:
//! - start latency (trigger accepted → the executor reports that it started
//!   the job) and queue latency (job queued → leased), p50/p95 over N
//!   sequential builds of a trivial Dockerfile, each with the executors idle
//!   and waiting;
//! - wall time of a two-platform build against the same build for one
//!   platform, and against both platforms built one after the other.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Client;
use serde_json::{Value, json};
use sha2::Digest as _;

/// The build figures.
pub struct BuildFigures {
    pub builds: usize,
    pub start_p50_ms: f64,
    pub start_p95_ms: f64,
    pub queue_p50_ms: f64,
    pub queue_p95_ms: f64,
    pub single_ms: f64,
    pub two_ms: f64,
    pub sequential_ms: f64,
    /// Whether /metrics exports the latency histograms.
    pub metrics_exported: bool,
}

struct Executor(Child);

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

fn tar_of(files: &[(&str, u32, &[u8], Option<&str>)]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, mode, data, link) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(*mode);
        h.set_mtime(0);
        match link {
            Some(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, target)?;
            }
            None => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

async fn push_blob(c: &Client, base: &str, repo: &str, bytes: Vec<u8>) -> Result<String> {
    let digest = sha256(&bytes);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await?;
    if r.status() != 201 {
        bail!("blob push: {}", r.status());
    }
    Ok(digest)
}

async fn put_manifest(
    c: &Client,
    base: &str,
    repo: &str,
    reference: &str,
    mt: &str,
    m: &Value,
) -> Result<(String, usize)> {
    let body = serde_json::to_vec(m)?;
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", mt)
        .body(body.clone())
        .send()
        .await?;
    if r.status() != 201 {
        bail!("manifest push: {} {}", r.status(), r.text().await?);
    }
    Ok((sha256(&body), body.len()))
}

/// Pushes `bench/base:1`: busybox for linux/amd64, one file for linux/arm64.
async fn push_base(c: &Client, base: &str) -> Result<()> {
    let bb = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (apt-get install busybox-static)")?;
    let amd64 = tar_of(&[
        ("bin/busybox", 0o755, &bb, None),
        ("bin/sh", 0o777, b"", Some("busybox")),
    ])?;
    let arm64 = tar_of(&[("arch.txt", 0o644, b"arm64\n", None)])?;
    let repo = "bench/base";
    let mut descs = vec![];
    for (arch, layer) in [("amd64", amd64), ("arm64", arm64)] {
        let gz = gzip(&layer)?;
        let gz_len = gz.len();
        let layer_digest = push_blob(c, base, repo, gz).await?;
        let mut config = json!({"architecture": arch, "os": "linux", "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]}});
        if arch == "arm64" {
            config["variant"] = json!("v8");
        }
        let config = serde_json::to_vec(&config)?;
        let config_len = config.len();
        let config_digest = push_blob(c, base, repo, config).await?;
        let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": gz_len}]});
        let (d, size) = put_manifest(
            c,
            base,
            repo,
            &format!("base-{arch}"),
            "application/vnd.oci.image.manifest.v1+json",
            &m,
        )
        .await?;
        let mut platform = json!({"architecture": arch, "os": "linux"});
        if arch == "arm64" {
            platform["variant"] = json!("v8");
        }
        descs.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": size, "platform": platform}));
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": descs});
    put_manifest(
        c,
        base,
        repo,
        "1",
        "application/vnd.oci.image.index.v1+json",
        &index,
    )
    .await?;
    Ok(())
}

async fn start_executor(
    c: &Client,
    base: &str,
    bin: &Path,
    name: &str,
    platform: &str,
    work: &Path,
) -> Result<Executor> {
    let r = c
        .post(format!("{base}/api/v1/executor-tokens"))
        .json(&json!({"name": name}))
        .send()
        .await?;
    if r.status() != 201 {
        bail!("node token: {}", r.status());
    }
    let token = r.json::<Value>().await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let child = Command::new(bin)
        .args([
            "executor",
            "--manager",
            base,
            "--name",
            name,
            "--platforms",
            platform,
        ])
        .env("DOCKYARD_EXECUTOR_TOKEN", token)
        .env("DOCKYARD_EXECUTOR_WORK_DIR", work.join(name))
        .env("DOCKYARD_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting dockyard executor")?;
    let e = Executor(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = c
            .get(format!("{base}/api/v1/executors"))
            .send()
            .await?
            .json()
            .await?;
        if v["executors"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == name))
        {
            return Ok(e);
        }
        if Instant::now() > deadline {
            bail!("executor {name} did not register");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Uploads the context and returns the build id.
async fn start_build(
    c: &Client,
    base: &str,
    context: &[u8],
    platforms: &str,
    tag: &str,
) -> Result<String> {
    let r = c
        .post(format!(
            "{base}/api/v1/repositories/bench/app/builds/context?platforms={platforms}&tags={tag}"
        ))
        .header("content-type", "application/gzip")
        .body(context.to_vec())
        .send()
        .await?;
    if r.status() != 201 {
        bail!("build upload: {} {}", r.status(), r.text().await?);
    }
    Ok(r.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

async fn wait_build(c: &Client, base: &str, id: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let b: Value = c
            .get(format!("{base}/api/v1/builds/{id}"))
            .send()
            .await?
            .json()
            .await?;
        match b["status"].as_str() {
            Some("complete") => return Ok(b),
            Some("failed" | "cancelled" | "internal_error") => {
                let logs = c
                    .get(format!("{base}/api/v1/builds/{id}/logs"))
                    .send()
                    .await?
                    .text()
                    .await?;
                bail!("build {id} ended {}: {}\n{logs}", b["status"], b["error"]);
            }
            _ if Instant::now() > deadline => bail!("build {id} did not finish"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn ms(b: &Value, a: &str, z: &str) -> f64 {
    (b[z].as_i64().unwrap_or(0) - b[a].as_i64().unwrap_or(0)) as f64
}

pub async fn run(c: &Client, base: &str, bin: &Path, builds: usize) -> Result<BuildFigures> {
    let work = tempfile::Builder::new()
        .prefix("bench-executors-")
        .tempdir()?;
    push_base(c, base).await?;
    let _amd = start_executor(c, base, bin, "bench-amd64", "linux/amd64", work.path()).await?;
    let _arm = start_executor(c, base, bin, "bench-arm64", "linux/arm64", work.path()).await?;
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let dockerfile = format!("FROM {host}/bench/base:1\nCOPY hello.txt /hello.txt\n");
    let context = gzip(&tar_of(&[
        ("Dockerfile", 0o644, dockerfile.as_bytes(), None),
        ("hello.txt", 0o644, b"hello\n", None),
    ])?)?;
    // Warm-up: base pulled for both platforms.
    let id = start_build(c, base, &context, "linux/amd64,linux/arm64", "warm").await?;
    wait_build(c, base, &id).await?;
    let mut start = vec![];
    let mut queue = vec![];
    for i in 0..builds {
        // The executors are idle, waiting in their long poll.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let id = start_build(c, base, &context, "linux/amd64", &format!("s{i}")).await?;
        let b = wait_build(c, base, &id).await?;
        let job = &b["jobs"][0];
        start.push(
            (job["reported_at"].as_i64().unwrap_or(0) - b["created_at"].as_i64().unwrap_or(0))
                as f64,
        );
        queue.push(ms(job, "queued_at", "started_at"));
    }
    let mut single = vec![];
    let mut two = vec![];
    let mut sequential = vec![];
    for i in 0..3 {
        let id = start_build(c, base, &context, "linux/amd64", &format!("one{i}")).await?;
        let a = wait_build(c, base, &id).await?;
        let id = start_build(c, base, &context, "linux/arm64", &format!("arm{i}")).await?;
        let b = wait_build(c, base, &id).await?;
        single.push(ms(&a, "created_at", "finished_at"));
        sequential.push(ms(&a, "created_at", "finished_at") + ms(&b, "created_at", "finished_at"));
        let id = start_build(
            c,
            base,
            &context,
            "linux/amd64,linux/arm64",
            &format!("two{i}"),
        )
        .await?;
        let t = wait_build(c, base, &id).await?;
        two.push(ms(&t, "created_at", "finished_at"));
    }
    let metrics = c
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(BuildFigures {
        builds,
        start_p50_ms: percentile(&start, 0.5),
        start_p95_ms: percentile(&start, 0.95),
        queue_p50_ms: percentile(&queue, 0.5),
        queue_p95_ms: percentile(&queue, 0.95),
        single_ms: percentile(&single, 0.5),
        two_ms: percentile(&two, 0.5),
        sequential_ms: percentile(&sequential, 0.5),
        metrics_exported: metrics.contains("dockyard_build_start_latency_seconds")
            && metrics.contains("dockyard_build_queue_latency_seconds")
            && metrics.contains("dockyard_build_duration_seconds"),
    })
}

pub fn print(f: &BuildFigures) {
    println!();
    println!("Builds (Dockyard only; two executors, linux/amd64 and linux/arm64, local dockerd)");
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!(
        "| start latency p50 ({} builds, idle executor) | {:.0} ms | < 250 ms |",
        f.builds, f.start_p50_ms
    );
    println!("| start latency p95 | {:.0} ms | |", f.start_p95_ms);
    println!("| queue latency p50 | {:.0} ms | |", f.queue_p50_ms);
    println!("| queue latency p95 | {:.0} ms | |", f.queue_p95_ms);
    println!(
        "| single-platform build wall time (median of 3) | {:.0} ms | |",
        f.single_ms
    );
    println!(
        "| two-platform build wall time (median of 3) | {:.0} ms | |",
        f.two_ms
    );
    println!(
        "| both platforms one after the other | {:.0} ms | |",
        f.sequential_ms
    );
    println!(
        "| two-platform / single-platform | {:.2}× | < 1.3× |",
        f.two_ms / f.single_ms
    );
    println!(
        "| two-platform / sequential | {:.2}× | |",
        f.two_ms / f.sequential_ms
    );
    println!(
        "| exported on /metrics (dockyard_build_start_latency_seconds, _queue_latency_, _duration_) | {} | |",
        if f.metrics_exported { "yes" } else { "NO" }
    );
}
