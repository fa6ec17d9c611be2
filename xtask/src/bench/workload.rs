//! The HTTP operations of the benchmark: blob pushes (monolithic, chunked,
//! streamed), blob pulls, small image pushes and the manifest GET load.
//! Every response status is checked; anything unexpected is an error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Client, Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};

pub const MIB: u64 = 1024 * 1024;
const PATTERN_LEN: usize = MIB as usize;
const OCTET: &str = "application/octet-stream";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob generated on the fly: a 1 MiB pseudo-random pattern repeated up to
/// `len` bytes. Only the pattern is ever held in memory.
#[derive(Clone)]
pub struct Blob {
    pattern: Bytes,
    pub len: u64,
    /// `sha256:<hex>` of the whole blob.
    pub digest: String,
}

impl Blob {
    /// Builds the blob and computes its digest over the full stream (on a
    /// blocking thread; 2 GiB take a couple of seconds).
    pub async fn new(seed: u64, len: u64) -> Result<Blob> {
        tokio::task::spawn_blocking(move || {
            let pattern = Bytes::from(random_bytes(seed, PATTERN_LEN));
            let mut h = Sha256::new();
            let mut pos = 0;
            while pos < len {
                let piece = piece_at(&pattern, pos, len);
                h.update(&piece);
                pos += piece.len() as u64;
            }
            Blob {
                pattern,
                len,
                digest: format!("sha256:{}", hex::encode(h.finalize())),
            }
        })
        .await
        .context("digest thread")
    }

    /// Bytes `start..end` of the blob as a stream of up to 1 MiB pieces.
    pub fn stream(
        &self,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let pattern = self.pattern.clone();
        futures::stream::unfold(start, move |pos| {
            let pattern = pattern.clone();
            async move {
                if pos >= end {
                    return None;
                }
                let piece = piece_at(&pattern, pos, end);
                let next = pos + piece.len() as u64;
                Some((Ok(piece), next))
            }
        })
    }

    pub fn body(&self, start: u64, end: u64) -> reqwest::Body {
        reqwest::Body::wrap_stream(self.stream(start, end))
    }
}

/// The piece of a pattern-repeating blob at `pos`, not crossing `end` nor a
/// pattern boundary.
fn piece_at(pattern: &Bytes, pos: u64, end: u64) -> Bytes {
    let off = (pos % pattern.len() as u64) as usize;
    let n = (pattern.len() - off).min((end - pos) as usize);
    pattern.slice(off..off + n)
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Fails with the response body unless the status is `want`.
pub async fn expect(resp: Response, want: StatusCode, what: &str) -> Result<Response> {
    if resp.status() == want {
        return Ok(resp);
    }
    let status = resp.status();
    let url = resp.url().clone();
    let body = resp.text().await.unwrap_or_default();
    bail!(
        "{what}: expected {want}, got {status} from {url}: {}",
        body.chars().take(500).collect::<String>()
    )
}

fn header<'a>(resp: &'a Response, name: &str) -> Result<&'a str> {
    resp.headers()
        .get(name)
        .with_context(|| format!("{} has no {name} header", resp.url()))?
        .to_str()
        .with_context(|| format!("{name} header is not text"))
}

/// The upload URL a 202 response points to (absolute or relative).
fn location(base: &Url, resp: &Response) -> Result<Url> {
    let loc = header(resp, LOCATION.as_str())?;
    base.join(loc)
        .with_context(|| format!("bad Location {loc:?}"))
}

fn with_digest(mut url: Url, digest: &str) -> Url {
    url.query_pairs_mut().append_pair("digest", digest);
    url
}

fn check_digest_header(resp: &Response, digest: &str) -> Result<()> {
    let got = header(resp, "docker-content-digest")?;
    ensure!(
        got == digest,
        "{}: Docker-Content-Digest is {got}, expected {digest}",
        resp.url()
    );
    Ok(())
}

/// `POST /v2/<repo>/blobs/uploads/`: a new session's URL.
async fn start_upload(c: &Client, base: &Url, repo: &str) -> Result<Url> {
    let resp = c
        .post(base.join(&format!("/v2/{repo}/blobs/uploads/"))?)
        .header(CONTENT_LENGTH, 0)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::ACCEPTED, "POST upload").await?;
    location(base, &resp)
}

/// Monolithic push: POST, then PUT ?digest= with the whole blob streamed.
pub async fn push_monolithic(c: &Client, base: &Url, repo: &str, blob: &Blob) -> Result<Duration> {
    let t = Instant::now();
    let loc = start_upload(c, base, repo).await?;
    let resp = c
        .put(with_digest(loc, &blob.digest))
        .header(CONTENT_TYPE, OCTET)
        .header(CONTENT_LENGTH, blob.len)
        .body(blob.body(0, blob.len))
        .send()
        .await?;
    let resp = expect(resp, StatusCode::CREATED, "PUT blob (monolithic)").await?;
    let elapsed = t.elapsed();
    check_digest_header(&resp, &blob.digest)?;
    Ok(elapsed)
}

/// Chunked push: POST, PATCH with Content-Range per chunk, PUT ?digest=.
pub async fn push_chunked(
    c: &Client,
    base: &Url,
    repo: &str,
    blob: &Blob,
    chunk: u64,
) -> Result<Duration> {
    let t = Instant::now();
    let mut loc = start_upload(c, base, repo).await?;
    let mut pos = 0;
    while pos < blob.len {
        let end = (pos + chunk).min(blob.len);
        let resp = c
            .patch(loc.clone())
            .header(CONTENT_TYPE, OCTET)
            .header(CONTENT_LENGTH, end - pos)
            .header("content-range", format!("{pos}-{}", end - 1))
            .body(blob.body(pos, end))
            .send()
            .await?;
        let resp = expect(resp, StatusCode::ACCEPTED, "PATCH chunk").await?;
        let range = header(&resp, "range")?;
        ensure!(
            range == format!("0-{}", end - 1),
            "PATCH chunk: Range is {range}, expected 0-{}",
            end - 1
        );
        loc = location(base, &resp)?;
        pos = end;
    }
    let resp = c
        .put(with_digest(loc, &blob.digest))
        .header(CONTENT_LENGTH, 0)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::CREATED, "PUT (finish chunked upload)").await?;
    let elapsed = t.elapsed();
    check_digest_header(&resp, &blob.digest)?;
    Ok(elapsed)
}

/// Streamed push as `docker push` does it: POST, one PATCH without
/// Content-Range or Content-Length (chunked transfer encoding), PUT ?digest=.
pub async fn push_streamed(c: &Client, base: &Url, repo: &str, blob: &Blob) -> Result<Duration> {
    let t = Instant::now();
    let loc = start_upload(c, base, repo).await?;
    let resp = c
        .patch(loc)
        .header(CONTENT_TYPE, OCTET)
        .body(blob.body(0, blob.len))
        .send()
        .await?;
    let resp = expect(resp, StatusCode::ACCEPTED, "PATCH (streamed)").await?;
    let loc = location(base, &resp)?;
    let resp = c
        .put(with_digest(loc, &blob.digest))
        .header(CONTENT_LENGTH, 0)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::CREATED, "PUT (finish streamed upload)").await?;
    let elapsed = t.elapsed();
    check_digest_header(&resp, &blob.digest)?;
    Ok(elapsed)
}

/// `HEAD` of a blob: checks it exists with the right size.
pub async fn check_blob(c: &Client, base: &Url, repo: &str, blob: &Blob) -> Result<()> {
    let resp = c
        .head(base.join(&format!("/v2/{repo}/blobs/{}", blob.digest))?)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::OK, "HEAD blob").await?;
    let len: u64 = header(&resp, CONTENT_LENGTH.as_str())?.parse()?;
    ensure!(
        len == blob.len,
        "HEAD blob: size {len}, expected {}",
        blob.len
    );
    Ok(())
}

/// GET of a blob, streamed; the body is hashed on a separate thread (so
/// the client's hashing overlaps the transfer) and discarded. Fails unless
/// length and digest match.
pub async fn pull(c: &Client, base: &Url, repo: &str, blob: &Blob) -> Result<Duration> {
    let t = Instant::now();
    let resp = c
        .get(base.join(&format!("/v2/{repo}/blobs/{}", blob.digest))?)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::OK, "GET blob").await?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
    let hasher = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut n = 0u64;
        for b in rx {
            n += b.len() as u64;
            h.update(&b);
        }
        (n, format!("sha256:{}", hex::encode(h.finalize())))
    });
    let mut body = resp.bytes_stream();
    let mut failed = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => {
                // Blocks this worker only when the hasher is 64 chunks behind.
                if tx.send(b).is_err() {
                    break;
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let (n, digest) = hasher
        .join()
        .map_err(|_| anyhow::anyhow!("hash thread panicked"))?;
    let elapsed = t.elapsed();
    if let Some(e) = failed {
        bail!("GET blob: body failed after {n} bytes: {e}");
    }
    ensure!(n == blob.len, "GET blob: {n} bytes, expected {}", blob.len);
    ensure!(
        digest == blob.digest,
        "GET blob: content has digest {digest}, expected {}",
        blob.digest
    );
    Ok(elapsed)
}

/// GET of a blob, streamed and discarded (only the length is checked; the
/// content is verified by `pull`). Shows what the server can send when the
/// client does not hash.
pub async fn pull_discard(c: &Client, base: &Url, repo: &str, blob: &Blob) -> Result<Duration> {
    let t = Instant::now();
    let resp = c
        .get(base.join(&format!("/v2/{repo}/blobs/{}", blob.digest))?)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::OK, "GET blob").await?;
    let mut body = resp.bytes_stream();
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        n += chunk.context("GET blob: body failed")?.len() as u64;
    }
    let elapsed = t.elapsed();
    ensure!(n == blob.len, "GET blob: {n} bytes, expected {}", blob.len);
    Ok(elapsed)
}

/// Pushes one small blob as a client does: HEAD (expect 404), POST, PUT
/// ?digest= with the body.
async fn push_small_blob(c: &Client, base: &Url, repo: &str, data: Bytes) -> Result<String> {
    let digest = sha256_digest(&data);
    let resp = c
        .head(base.join(&format!("/v2/{repo}/blobs/{digest}"))?)
        .send()
        .await?;
    expect(resp, StatusCode::NOT_FOUND, "HEAD new blob").await?;
    let loc = start_upload(c, base, repo).await?;
    let resp = c
        .put(with_digest(loc, &digest))
        .header(CONTENT_TYPE, OCTET)
        .header(CONTENT_LENGTH, data.len())
        .body(data)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::CREATED, "PUT small blob").await?;
    check_digest_header(&resp, &digest)?;
    Ok(digest)
}

/// Content of small image `i`: (config, layer, manifest).
pub fn small_image(i: u64, seed: u64) -> (Bytes, Bytes, Bytes) {
    let layer = Bytes::from(random_bytes(seed ^ (i << 20) ^ 0xABCD, 1024));
    let layer_digest = sha256_digest(&layer);
    let config = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": { "bench.image": i.to_string(), "bench.seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        }))
        .expect("json"),
    );
    let manifest = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": sha256_digest(&config), "size": config.len() },
            "layers": [ { "mediaType": OCI_LAYER, "digest": layer_digest, "size": layer.len() } ],
        }))
        .expect("json"),
    );
    (config, layer, manifest)
}

/// Pushes small image `i` under tag `img-<i>`.
async fn push_image(c: &Client, base: &Url, repo: &str, i: u64, seed: u64) -> Result<()> {
    let (config, layer, manifest) = small_image(i, seed);
    let digest = sha256_digest(&manifest);
    push_small_blob(c, base, repo, config).await?;
    push_small_blob(c, base, repo, layer).await?;
    let resp = c
        .put(base.join(&format!("/v2/{repo}/manifests/img-{i}"))?)
        .header(CONTENT_TYPE, OCI_MANIFEST)
        .body(manifest)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::CREATED, "PUT manifest").await?;
    check_digest_header(&resp, &digest)?;
    Ok(())
}

/// Pushes `count` small images with `concurrency` in flight; returns the
/// wall time.
pub async fn push_images(
    c: &Client,
    base: &Url,
    repo: &str,
    count: u64,
    concurrency: usize,
    seed: u64,
) -> Result<Duration> {
    let t = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| push_image(c, base, repo, i, seed))
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(t.elapsed())
}

/// Fetches the manifest once and checks it, before load is put on it.
pub async fn check_manifest(c: &Client, url: &Url, expected: &[u8]) -> Result<()> {
    let resp = c
        .get(url.clone())
        .header("accept", OCI_MANIFEST)
        .send()
        .await?;
    let resp = expect(resp, StatusCode::OK, "GET manifest").await?;
    let ct = header(&resp, CONTENT_TYPE.as_str())?.to_string();
    ensure!(ct == OCI_MANIFEST, "GET manifest: Content-Type {ct}");
    let body = resp.bytes().await?;
    ensure!(
        body == expected,
        "GET manifest: body differs from what was pushed"
    );
    Ok(())
}

/// Result of the manifest GET load.
pub struct Load {
    pub requests_per_sec: f64,
    pub p99: Option<Duration>,
    pub tool: &'static str,
}

/// Runs `wrk` against `url`; fails on any non-2xx/3xx response or socket
/// error.
pub async fn wrk(url: &Url, connections: usize, secs: u64) -> Result<Load> {
    // Killed if the benchmark is cancelled (Ctrl-C) while it runs.
    let out = tokio::process::Command::new("wrk")
        .arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("-H")
        .arg(format!("Accept: {OCI_MANIFEST}"))
        .arg("-H")
        .arg(format!(
            "Authorization: {}",
            super::servers::authorization()
        ))
        .arg(url.as_str())
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "wrk failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(l) = text
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses"))
    {
        bail!("wrk saw error responses: {}\n{text}", l.trim());
    }
    if let Some(l) = text.lines().find(|l| l.contains("Socket errors")) {
        bail!("wrk saw socket errors: {}\n{text}", l.trim());
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?
        .trim()
        .parse::<f64>()?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| parse_wrk_duration(v.trim()))
        .transpose()?;
    Ok(Load {
        requests_per_sec: rps,
        p99,
        tool: "wrk",
    })
}

fn parse_wrk_duration(v: &str) -> Result<Duration> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("m") {
        (n, 60.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        bail!("unknown wrk duration {v:?}")
    };
    Ok(Duration::from_secs_f64(num.parse::<f64>()? * mult))
}

/// The same load without wrk: `connections` tasks in a loop for `secs`.
pub async fn tokio_load(
    url: &Url,
    connections: usize,
    secs: u64,
    expected_len: usize,
) -> Result<Load> {
    let client = Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(connections)
        .default_headers(super::servers::auth_headers())
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let resp = client
                        .get(url.clone())
                        .header("accept", OCI_MANIFEST)
                        .send()
                        .await?;
                    let resp = expect(resp, StatusCode::OK, "GET manifest").await?;
                    let body = resp.bytes().await?;
                    ensure!(body.len() == expected_len, "GET manifest: wrong length");
                    lat.push(t.elapsed());
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    all.sort();
    ensure!(!all.is_empty(), "no request completed");
    let p99 = all[(all.len() * 99 / 100).min(all.len() - 1)];
    Ok(Load {
        requests_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p99: Some(p99),
        tool: "tokio loop",
    })
}

/// Samples a process's RSS every 100 ms until stopped; returns the maximum
/// and the number of samples.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<(u64, usize)>>,
}

impl RssSampler {
    pub fn start(read: impl Fn() -> Result<u64> + Send + 'static) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut max = 0;
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                max = max.max(read()?);
                n += 1;
            }
            Ok((max, n))
        });
        RssSampler { stop, task }
    }

    pub async fn finish(self) -> Result<(u64, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}
