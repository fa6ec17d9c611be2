//! `cargo xtask bench`: builds Dockyard in release mode, starts it and CNCF
//! Distribution side by side on loopback (each with a fresh temporary data
//! directory), runs the same workload against both and prints one table.
//!
//! Progress goes to stderr, the table to stdout. Every response status is
//! checked: an unexpected one aborts the run. Both servers are killed and
//! their data directories removed at the end, also on error or Ctrl-C.

mod builds;
mod servers;
mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Client;

use servers::Server;
use workload::{Blob, MIB};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Small sizes and short durations, for a smoke test of about a minute.
    #[arg(long)]
    quick: bool,
    /// Size of the blob for the push and pull figures, in MiB [default: 256; quick: 32].
    #[arg(long)]
    blob_mib: Option<u64>,
    /// Chunk size of the chunked push, in MiB [default: 16; quick: 8].
    #[arg(long)]
    chunk_mib: Option<u64>,
    /// Number of small images pushed [default: 200; quick: 40].
    #[arg(long)]
    images: Option<u64>,
    /// Small images pushed concurrently.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Duration of the manifest GET load, in seconds [default: 10; quick: 3].
    #[arg(long)]
    duration: Option<u64>,
    /// Connections of the manifest GET load.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Size of the big blob pushed while RSS is sampled, in GiB; 0 skips
    /// [default: 2; quick: 0.25].
    #[arg(long)]
    big_gib: Option<f64>,
    /// Repeat the blob push/pull figures this many times and report the
    /// median (each round pushes new blobs) [default: 3; quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Use this dockyard binary instead of building one.
    #[arg(long, value_name = "PATH")]
    dockyard_bin: Option<PathBuf>,
    /// The CNCF Distribution binary.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/docker-registry")]
    distribution_bin: PathBuf,
    /// Use the built-in tokio load generator even if wrk is installed.
    #[arg(long)]
    no_wrk: bool,
    /// Builds timed for the start-latency figures (needs dockerd); 0 skips
    /// the build figures [default: 50; quick: 10].
    #[arg(long)]
    builds: Option<usize>,
}

/// Effective settings.
#[derive(Debug)]
struct Settings {
    blob: u64,
    chunk: u64,
    images: u64,
    concurrency: usize,
    duration: u64,
    connections: usize,
    big: u64,
    rounds: usize,
    use_wrk: bool,
    builds: usize,
}

impl Settings {
    fn from(a: &BenchArgs) -> Result<Settings> {
        let q = a.quick;
        let s = Settings {
            blob: a.blob_mib.unwrap_or(if q { 32 } else { 256 }) * MIB,
            chunk: a.chunk_mib.unwrap_or(if q { 8 } else { 16 }) * MIB,
            images: a.images.unwrap_or(if q { 40 } else { 200 }),
            concurrency: a.concurrency,
            duration: a.duration.unwrap_or(if q { 3 } else { 10 }),
            connections: a.connections,
            big: (a.big_gib.unwrap_or(if q { 0.25 } else { 2.0 }) * 1024.0 * MIB as f64) as u64,
            rounds: a.rounds.unwrap_or(if q { 1 } else { 3 }).max(1),
            use_wrk: !a.no_wrk && wrk_available(),
            builds: a.builds.unwrap_or(if q { 10 } else { 50 }),
        };
        if s.blob == 0 || s.chunk == 0 || s.images == 0 || s.concurrency == 0 {
            bail!("--blob-mib, --chunk-mib, --images and --concurrency must be positive");
        }
        if s.duration == 0 || s.connections == 0 {
            bail!("--duration and --connections must be positive");
        }
        Ok(s)
    }
}

fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

macro_rules! progress {
    ($($t:tt)*) => { eprintln!("[bench {:>7.1}s] {}", crate::bench::elapsed(), format!($($t)*)) };
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn elapsed() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

pub fn run(args: BenchArgs) -> Result<()> {
    elapsed();
    let settings = Settings::from(&args)?;
    if !args.distribution_bin.exists() {
        bail!(
            "{} not found (apt-get install docker-registry, or pass --distribution-bin)",
            args.distribution_bin.display()
        );
    }
    let dockyard_bin = match &args.dockyard_bin {
        Some(p) => p.clone(),
        None => build_dockyard()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = bench(&settings, &dockyard_bin, &args.distribution_bin) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    })
    // Servers were dropped (killed, data removed) when `bench` returned or
    // was cancelled.
}

/// `cargo build --release -p dockyard`; returns the binary's path.
fn build_dockyard() -> Result<PathBuf> {
    progress!("building dockyard (cargo build --release -p dockyard)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = &crate::workspace_root()?;
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "dockyard",
            "--bin",
            "dockyard",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo build --release -p dockyard failed ({})", out.status);
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["name"] == "dockyard"
            && let Some(exe) = v["executable"].as_str()
        {
            progress!("built {exe}");
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo did not report the dockyard executable")
}

/// One figure for both servers.
struct Row {
    figure: String,
    unit: &'static str,
    values: [f64; 2],
    higher_is_better: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

async fn bench(s: &Settings, dockyard_bin: &Path, distribution_bin: &Path) -> Result<()> {
    progress!("settings: {s:?}");
    let client = Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(64)
        .default_headers(servers::auth_headers())
        .build()?;
    let mut servers = [
        servers::start_dockyard(dockyard_bin)?,
        servers::start_distribution(distribution_bin)?,
    ];
    for srv in servers.iter_mut() {
        servers::wait_ready(srv, &client).await?;
        progress!("{} is up at {} (pid {})", srv.name, srv.base, srv.pid());
    }
    let result = workload_all(s, &client, &mut servers).await;
    if let Err(e) = &result {
        for srv in servers.iter_mut() {
            if let Err(dead) = srv.check_alive() {
                progress!("{dead}");
            } else {
                progress!("{} log tail:\n{}", srv.name, srv.log_tail());
            }
        }
        progress!("failed: {e:#}");
    }
    let rows = result?;
    let build_figures = if s.builds > 0 {
        progress!("build figures: {} builds through two executors", s.builds);
        let base = servers[0].base.as_str().trim_end_matches('/').to_string();
        let f = builds::run(&client, &base, dockyard_bin, s.builds).await;
        if f.is_err() {
            progress!("Dockyard log tail:\n{}", servers[0].log_tail());
        }
        Some(f?)
    } else {
        None
    };
    progress!("stopping servers and removing their data directories");
    drop(servers);
    print_table(&rows);
    if let Some(f) = &build_figures {
        builds::print(f);
    }
    Ok(())
}

async fn workload_all(s: &Settings, c: &Client, servers: &mut [Server; 2]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let blob_mib = s.blob / MIB;

    // 1-3: monolithic push, chunked push, pull.
    let mut mono = [vec![], vec![]];
    let mut chunked = [vec![], vec![]];
    let mut pulls = [vec![], vec![]];
    let mut discards = [vec![], vec![]];
    for round in 0..s.rounds {
        let seed = 1000 + round as u64 * 10;
        progress!(
            "round {}: generating two {blob_mib} MiB blobs and their digests",
            round + 1
        );
        let b1 = Blob::new(seed, s.blob).await?;
        let b2 = Blob::new(seed + 1, s.blob).await?;
        for (i, srv) in servers.iter_mut().enumerate() {
            let d = workload::push_monolithic(c, &srv.base, "bench/blobs", &b1).await?;
            workload::check_blob(c, &srv.base, "bench/blobs", &b1).await?;
            progress!(
                "{}: monolithic push {blob_mib} MiB in {d:.2?} = {:.0} MiB/s",
                srv.name,
                mib_per_s(s.blob, d)
            );
            mono[i].push(mib_per_s(s.blob, d));
            srv.check_alive()?;
        }
        for (i, srv) in servers.iter_mut().enumerate() {
            let d = workload::push_chunked(c, &srv.base, "bench/blobs", &b2, s.chunk).await?;
            workload::check_blob(c, &srv.base, "bench/blobs", &b2).await?;
            progress!(
                "{}: chunked push {blob_mib} MiB in {d:.2?} = {:.0} MiB/s",
                srv.name,
                mib_per_s(s.blob, d)
            );
            chunked[i].push(mib_per_s(s.blob, d));
            srv.check_alive()?;
        }
        for (i, srv) in servers.iter_mut().enumerate() {
            let d = workload::pull(c, &srv.base, "bench/blobs", &b1).await?;
            progress!(
                "{}: pull {blob_mib} MiB in {d:.2?} = {:.0} MiB/s (digest verified)",
                srv.name,
                mib_per_s(s.blob, d)
            );
            pulls[i].push(mib_per_s(s.blob, d));
            srv.check_alive()?;
        }
        for (i, srv) in servers.iter_mut().enumerate() {
            let d = workload::pull_discard(c, &srv.base, "bench/blobs", &b2).await?;
            progress!(
                "{}: pull {blob_mib} MiB, discarded, in {d:.2?} = {:.0} MiB/s",
                srv.name,
                mib_per_s(s.blob, d)
            );
            discards[i].push(mib_per_s(s.blob, d));
            srv.check_alive()?;
        }
    }
    let of = if s.rounds > 1 {
        format!(", median of {}", s.rounds)
    } else {
        String::new()
    };
    rows.push(Row {
        figure: format!("1. blob push, monolithic ({blob_mib} MiB{of})"),
        unit: "MiB/s",
        values: [median(mono[0].clone()), median(mono[1].clone())],
        higher_is_better: true,
    });
    rows.push(Row {
        figure: format!(
            "2. blob push, chunked ({blob_mib} MiB, {} MiB chunks{of})",
            s.chunk / MIB
        ),
        unit: "MiB/s",
        values: [median(chunked[0].clone()), median(chunked[1].clone())],
        higher_is_better: true,
    });
    rows.push(Row {
        figure: format!("3. blob pull ({blob_mib} MiB, hashed{of})"),
        unit: "MiB/s",
        values: [median(pulls[0].clone()), median(pulls[1].clone())],
        higher_is_better: true,
    });

    rows.push(Row {
        figure: format!("3. blob pull ({blob_mib} MiB, not hashed{of})"),
        unit: "MiB/s",
        values: [median(discards[0].clone()), median(discards[1].clone())],
        higher_is_better: true,
    });

    // 4: small images.
    let mut rate = [0.0; 2];
    for (i, srv) in servers.iter_mut().enumerate() {
        let d =
            workload::push_images(c, &srv.base, "bench/small", s.images, s.concurrency, 7).await?;
        rate[i] = s.images as f64 / d.as_secs_f64();
        progress!(
            "{}: pushed {} small images in {d:.2?} = {:.1} images/s",
            srv.name,
            s.images,
            rate[i]
        );
        srv.check_alive()?;
    }
    rows.push(Row {
        figure: format!(
            "4. small-image push ({} images, {} concurrent)",
            s.images, s.concurrency
        ),
        unit: "images/s",
        values: rate,
        higher_is_better: true,
    });

    // 5: manifest GET by tag.
    let (_, _, manifest) = workload::small_image(0, 7);
    let mut rps = [0.0; 2];
    let mut p99 = [None; 2];
    let mut tool = "";
    for (i, srv) in servers.iter_mut().enumerate() {
        let url = srv.base.join("/v2/bench/small/manifests/img-0")?;
        workload::check_manifest(c, &url, &manifest).await?;
        let load = if s.use_wrk {
            workload::wrk(&url, s.connections, s.duration).await?
        } else {
            workload::tokio_load(&url, s.connections, s.duration, manifest.len()).await?
        };
        progress!(
            "{}: manifest GET {:.0} req/s, p99 {} ({})",
            srv.name,
            load.requests_per_sec,
            load.p99.map_or("n/a".into(), |d| format!("{d:.2?}")),
            load.tool
        );
        rps[i] = load.requests_per_sec;
        p99[i] = load.p99;
        tool = load.tool;
        srv.check_alive()?;
    }
    rows.push(Row {
        figure: format!(
            "5. manifest GET by tag ({} conns, {} s, {tool})",
            s.connections, s.duration
        ),
        unit: "req/s",
        values: rps,
        higher_is_better: true,
    });
    if let [Some(a), Some(b)] = p99 {
        rows.push(Row {
            figure: "5. manifest GET by tag, p99 latency".into(),
            unit: "ms",
            values: [a.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3],
            higher_is_better: false,
        });
    }

    // 7: RSS while a big blob is pushed (streamed PATCH, as docker does).
    let mut big_rows = Vec::new();
    if s.big > 0 {
        let gib = s.big as f64 / (1024.0 * MIB as f64);
        progress!("generating the {gib} GiB blob and its digest");
        let big = Blob::new(4242, s.big).await?;
        let mut before = [0u64; 2];
        let mut max = [0u64; 2];
        let mut speed = [0.0; 2];
        for (i, srv) in servers.iter_mut().enumerate() {
            before[i] = srv.rss()?;
            let pid = srv.pid();
            let sampler = workload::RssSampler::start(move || {
                let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
                let kib = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .context("VmRSS")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()?;
                Ok(kib * 1024)
            });
            let pushed = workload::push_streamed(c, &srv.base, "bench/big", &big).await;
            let (m, samples) = sampler.finish().await?;
            let d = pushed?;
            workload::check_blob(c, &srv.base, "bench/big", &big).await?;
            max[i] = m.max(before[i]);
            speed[i] = mib_per_s(s.big, d);
            progress!(
                "{}: pushed {gib} GiB in {d:.2?} = {:.0} MiB/s; RSS before {:.1} MiB, max during {:.1} MiB ({samples} samples), data dir {:.0} MiB",
                srv.name,
                speed[i],
                mib(before[i]),
                mib(max[i]),
                mib(srv.disk_usage())
            );
            srv.check_alive()?;
        }
        big_rows.push(Row {
            figure: "7. RSS before the big push".into(),
            unit: "MiB",
            values: [mib(before[0]), mib(before[1])],
            higher_is_better: false,
        });
        big_rows.push(Row {
            figure: format!("7. max RSS during {gib} GiB streamed push (100 ms samples)"),
            unit: "MiB",
            values: [mib(max[0]), mib(max[1])],
            higher_is_better: false,
        });
        big_rows.push(Row {
            figure: format!("7. RSS growth during the {gib} GiB push"),
            unit: "MiB",
            values: [mib(max[0] - before[0]), mib(max[1] - before[1])],
            higher_is_better: false,
        });
        big_rows.push(Row {
            figure: format!("7. {gib} GiB streamed push throughput"),
            unit: "MiB/s",
            values: speed,
            higher_is_better: true,
        });
    }

    // 6: peak RSS over the whole run.
    let peak = [servers[0].peak_rss()?, servers[1].peak_rss()?];
    rows.push(Row {
        figure: "6. peak RSS over the whole run (VmHWM)".into(),
        unit: "MiB",
        values: [mib(peak[0]), mib(peak[1])],
        higher_is_better: false,
    });
    rows.extend(big_rows);
    Ok(rows)
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn print_table(rows: &[Row]) {
    let header = vec![
        "figure".to_string(),
        "unit".to_string(),
        "Dockyard".to_string(),
        "Distribution".to_string(),
        "Dockyard/Distribution".to_string(),
        "ratio better when".to_string(),
    ];
    let mut table = vec![header];
    for r in rows {
        // A ratio of two near-zero memory deltas means nothing.
        let tiny = r.unit == "MiB" && r.values.iter().any(|v| v.abs() < 1.0);
        let ratio = if tiny {
            "n/a (< 1 MiB)".into()
        } else if r.values[1] != 0.0 {
            format!("{:.2}", r.values[0] / r.values[1])
        } else {
            "n/a".into()
        };
        table.push(vec![
            r.figure.clone(),
            r.unit.to_string(),
            fmt_value(r.values[0]),
            fmt_value(r.values[1]),
            ratio,
            if r.higher_is_better {
                "higher (> 1: Dockyard better)".into()
            } else {
                "lower (< 1: Dockyard better)".into()
            },
        ]);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String]| {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if (2..=4).contains(&i) {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        format!("| {} |", cells.join(" | "))
    };
    println!(
        "Dockyard vs CNCF Distribution on loopback ({} CPUs), fresh data dirs, same workload",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("{}", line(&table[0]));
    let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", sep.join("-|-"));
    for r in &table[1..] {
        println!("{}", line(r));
    }
}
