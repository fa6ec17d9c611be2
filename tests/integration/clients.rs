//! Real clients against a real server: skopeo, podman, buildah, the docker
//! CLI through a running dockerd, and a 1 GiB layer pushed in chunks.
//!
//! Nothing comes from the internet: images are written by hand as OCI
//! layouts (tar layers built here, gzip-framed) or built from scratch with
//! Debian's static busybox. podman and buildah use private storage (vfs) in
//! a temporary directory. A missing tool fails the test and names the
//! Debian package (`cargo xtask test` installs them all and starts dockerd).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::harness::{ADMIN, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, TestApp, header, location};

const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const BUSYBOX: &str = "/bin/busybox";
/// Upper bound for one client command (a push or a pull of a few MB).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// helpers: tools and commands

/// Fails the test unless `tool` is on `PATH`, naming the Debian package.
pub(crate) fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed but this test needs it: install the Debian package \
         `{package}` (`cargo xtask test` installs every test prerequisite)"
    );
}

/// Debian's static busybox, the only binary in the images built here.
pub(crate) fn busybox() -> Vec<u8> {
    std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("cannot read {BUSYBOX} ({e}): install the Debian package `busybox-static`")
    })
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// A repository name no other test (or earlier run) uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Runs `program args…`; panics with the command, status and both outputs
/// unless it exits 0 within [`COMMAND_TIMEOUT`]. Returns stdout.
pub(crate) async fn run<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = output(program, args).await;
    assert!(
        out.status.success(),
        "{}\nexited with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.shown,
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

pub(crate) struct Output {
    pub shown: String,
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub(crate) async fn output<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let shown = format!("{:?}", cmd.as_std());
    let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish within {COMMAND_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    Output {
        shown,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------
// helpers: tar, gzip, OCI layouts

pub(crate) enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
}

/// A tar archive of `entries` (root-owned, mtime 0), built with the `tar`
/// crate.
pub(crate) fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = ::tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Entry::Dir(n) => {
                h.set_entry_type(::tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, n, std::io::empty()).unwrap();
            }
            Entry::File(n, m, d) => {
                h.set_entry_type(::tar::EntryType::Regular);
                h.set_mode(*m);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, n, *d).unwrap();
            }
            Entry::Symlink(n, target) => {
                h.set_entry_type(::tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, n, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A gzip stream of `data` (for the `+gzip` layer media types).
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Deterministic filler bytes (xorshift), different per seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An OCI image layout directory written by hand.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir }
    }

    fn open(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
        }
    }

    /// Stores a blob; returns its descriptor.
    fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let hex = sha256_hex(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    }

    fn read_blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let path = self.dir.join("blobs/sha256").join(hex);
        std::fs::read(&path).unwrap_or_else(|e| panic!("blob {digest} missing from {path:?}: {e}"))
    }

    /// An image for `linux/<arch>` whose layers are the given tar archives
    /// (stored gzip-framed); returns the manifest descriptor.
    fn image(&self, arch: &str, layers: &[Vec<u8>]) -> Value {
        let mut descs = vec![];
        let mut diff_ids = vec![];
        let mut history = vec![];
        for (i, l) in layers.iter().enumerate() {
            descs.push(self.blob(OCI_LAYER_GZIP, &gzip(l)));
            diff_ids.push(sha256_digest(l));
            history.push(json!({"created_by": format!("dockyard test layer {i}")}));
        }
        let mut config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["echo", "hello"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        if arch == "arm64" {
            config["variant"] = json!("v8");
        }
        let config = self.blob(OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": descs,
        });
        let mut desc = self.blob(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap());
        desc["platform"] = json!({"architecture": arch, "os": "linux"});
        if arch == "arm64" {
            desc["platform"]["variant"] = json!("v8");
        }
        desc
    }

    /// Writes `index.json` naming `desc` as `tag`.
    fn tag(&self, tag: &str, mut desc: Value) {
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

fn layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// GETs a manifest over HTTP accepting OCI and Docker types; checks the
/// digest header against the body and returns (digest, media type, body).
async fn http_manifest(app: &TestApp, repo: &str, reference: &str) -> (String, String, Vec<u8>) {
    let r = app
        .req(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
        .header(
            "accept",
            format!("{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, application/vnd.docker.distribution.manifest.list.v2+json"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "GET manifest {repo}:{reference}");
    let digest = header(&r, "docker-content-digest").expect("Docker-Content-Digest");
    let ct = header(&r, "content-type").expect("Content-Type");
    let body = r.bytes().await.unwrap().to_vec();
    assert_eq!(digest, sha256_digest(&body), "digest header vs body");
    (digest, ct, body)
}

/// GETs a blob over HTTP and checks its bytes against its digest.
async fn http_blob(app: &TestApp, repo: &str, digest: &str) -> Vec<u8> {
    let r = app.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.status(), 200, "GET blob {digest}");
    let body = r.bytes().await.unwrap().to_vec();
    assert_eq!(sha256_digest(&body), digest, "blob bytes vs digest");
    body
}

// ---------------------------------------------------------------------------
// skopeo

/// `user:password` of the test servers' superuser, for the clients' flags.
fn creds() -> String {
    format!("{}:{}", ADMIN.0, ADMIN.1)
}

async fn skopeo_raw(image: &str) -> Vec<u8> {
    let out = if image.starts_with("docker://") {
        run(
            "skopeo",
            [
                "inspect",
                "--raw",
                "--tls-verify=false",
                "--creds",
                &creds(),
                image,
            ],
        )
        .await
    } else {
        run("skopeo", ["inspect", "--raw", image]).await
    };
    // `--raw` prints the manifest bytes exactly as stored.
    out.into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_a_multi_layer_image_in_and_out_unchanged() {
    require("skopeo", "skopeo");
    let app = TestApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let bb = busybox();
    let src = Layout::new(tmp.path().join("src"));
    let layers = vec![
        tar(&[Entry::Dir("bin/"), Entry::File("bin/busybox", 0o755, &bb)]),
        tar(&[
            Entry::Dir("bin/"),
            Entry::Symlink("bin/sh", "busybox"),
            Entry::Dir("etc/"),
            Entry::File("etc/motd", 0o644, b"pushed by skopeo\n"),
        ]),
        tar(&[
            Entry::Dir("data/"),
            Entry::File("data/noise", 0o644, &noise(1, 3 << 20)),
        ]),
        tar(&[Entry::File("data/empty", 0o644, b"")]),
    ];
    let desc = src.image("amd64", &layers);
    src.tag("v1", desc.clone());
    let src_manifest: Value =
        serde_json::from_slice(&src.read_blob(desc["digest"].as_str().unwrap())).unwrap();

    let repo = unique("clients/skopeo-multi");
    let remote = format!("docker://{}/{repo}:v1", app.addr);
    let src_ref = format!("oci:{}:v1", path_str(&src.dir));
    let dst_dir = tmp.path().join("dst");
    let dst_ref = format!("oci:{}:v1", path_str(&dst_dir));

    run(
        "skopeo",
        [
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds(),
            &src_ref,
            &remote,
        ],
    )
    .await;
    run(
        "skopeo",
        [
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--src-creds",
            &creds(),
            &remote,
            &dst_ref,
        ],
    )
    .await;

    // The manifest is byte-for-byte the same at every stop.
    let raw_src = skopeo_raw(&src_ref).await;
    let raw_remote = skopeo_raw(&remote).await;
    let raw_dst = skopeo_raw(&dst_ref).await;
    assert_eq!(raw_src, raw_remote, "manifest changed on the way in");
    assert_eq!(raw_src, raw_dst, "manifest changed on the way out");
    let digest = desc["digest"].as_str().unwrap();
    assert_eq!(sha256_digest(&raw_remote), digest);

    // Over HTTP: same digest by tag and by digest, and the tag is listed.
    let (d, ct, body) = http_manifest(&app, &repo, "v1").await;
    assert_eq!(d, digest);
    assert_eq!(ct, OCI_MANIFEST);
    assert_eq!(body, raw_src);
    let (d, _, _) = http_manifest(&app, &repo, digest).await;
    assert_eq!(d, digest);
    let tags: Value = app
        .get(&format!("/v2/{repo}/tags/list"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!(["v1"]));

    // skopeo's parsed view of the registry copy: digest and layers.
    let inspect: Value = serde_json::from_str(
        &run(
            "skopeo",
            [
                "inspect",
                "--tls-verify=false",
                "--creds",
                &creds(),
                &remote,
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(inspect["Digest"], digest);
    let layers_src = layer_digests(&src_manifest);
    assert_eq!(layers_src.len(), 4);
    assert_eq!(inspect["Layers"], json!(layers_src));

    // Every layer and the config arrived intact in the second layout.
    let dst = Layout::open(&dst_dir);
    let dst_manifest: Value = serde_json::from_slice(&dst.read_blob(digest)).unwrap();
    assert_eq!(layer_digests(&dst_manifest), layers_src);
    for d in layers_src.iter().chain(
        [src_manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .to_string()]
        .iter(),
    ) {
        assert_eq!(dst.read_blob(d), src.read_blob(d), "blob {d} differs");
        assert_eq!(http_blob(&app, &repo, d).await, src.read_blob(d));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_a_multi_arch_index_with_all_platforms() {
    require("skopeo", "skopeo");
    let app = TestApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = Layout::new(tmp.path().join("src"));
    let bb = busybox();
    let amd64 = src.image(
        "amd64",
        &[
            tar(&[Entry::Dir("bin/"), Entry::File("bin/busybox", 0o755, &bb)]),
            tar(&[Entry::File("arch", 0o644, b"amd64\n")]),
        ],
    );
    // A hand-made arm64 image: its own config and layer.
    let arm64 = src.image(
        "arm64",
        &[tar(&[
            Entry::File("arch", 0o644, b"arm64\n"),
            Entry::File("payload", 0o644, &noise(2, 100_000)),
        ])],
    );
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [amd64, arm64],
    });
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_desc = src.blob(OCI_INDEX, &index_bytes);
    src.tag("multi", index_desc.clone());
    let index_digest = index_desc["digest"].as_str().unwrap();

    let repo = unique("clients/skopeo-index");
    let remote = format!("docker://{}/{repo}:multi", app.addr);
    let src_ref = format!("oci:{}:multi", path_str(&src.dir));
    let dst_dir = tmp.path().join("dst");
    let dst_ref = format!("oci:{}:multi", path_str(&dst_dir));

    run(
        "skopeo",
        [
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds(),
            &src_ref,
            &remote,
        ],
    )
    .await;
    run(
        "skopeo",
        [
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--src-creds",
            &creds(),
            &remote,
            &dst_ref,
        ],
    )
    .await;

    let raw_remote = skopeo_raw(&remote).await;
    assert_eq!(raw_remote, index_bytes, "index changed on the way in");
    assert_eq!(
        skopeo_raw(&dst_ref).await,
        index_bytes,
        "index changed on the way out"
    );
    assert_eq!(sha256_digest(&raw_remote), index_digest);
    let parsed: Value = serde_json::from_slice(&raw_remote).unwrap();
    assert_eq!(parsed["mediaType"], OCI_INDEX);
    let mut platforms: Vec<String> = parsed["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    platforms.sort();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);

    let (d, ct, _) = http_manifest(&app, &repo, "multi").await;
    assert_eq!(d, index_digest);
    assert_eq!(ct, OCI_INDEX);

    // Both platform manifests (and their blobs) made the round trip.
    let dst = Layout::open(&dst_dir);
    for child in [&amd64, &arm64] {
        let cd = child["digest"].as_str().unwrap();
        let (d, ct, body) = http_manifest(&app, &repo, cd).await;
        assert_eq!((d.as_str(), ct.as_str()), (cd, OCI_MANIFEST));
        assert_eq!(body, src.read_blob(cd));
        assert_eq!(dst.read_blob(cd), body);
        let m: Value = serde_json::from_slice(&body).unwrap();
        for b in layer_digests(&m)
            .into_iter()
            .chain([m["config"]["digest"].as_str().unwrap().to_string()])
        {
            assert_eq!(dst.read_blob(&b), src.read_blob(&b));
            http_blob(&app, &repo, &b).await;
        }
        let arch = child["platform"]["architecture"].as_str().unwrap();
        let raw = skopeo_raw(&format!("docker://{}/{repo}@{cd}", app.addr)).await;
        assert_eq!(raw, src.read_blob(cd), "{arch} manifest by digest");
    }
    // skopeo resolves a platform out of the index.
    let arm: Value = serde_json::from_str(
        &run(
            "skopeo",
            [
                "--override-arch",
                "arm64",
                "inspect",
                "--tls-verify=false",
                "--creds",
                &creds(),
                &remote,
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(arm["Architecture"], "arm64");
    // (`Digest` is the digest of what the tag names: the index.)
    assert_eq!(arm["Digest"], index_digest);
    let arm_manifest: Value =
        serde_json::from_slice(&src.read_blob(arm64["digest"].as_str().unwrap())).unwrap();
    assert_eq!(arm["Layers"], json!(layer_digests(&arm_manifest)));
}

// ---------------------------------------------------------------------------
// podman and buildah

/// Private container storage for podman/buildah (vfs, in a temp dir).
struct Storage {
    _dir: tempfile::TempDir,
    flags: Vec<String>,
    tmpdir: String,
}

impl Storage {
    fn new() -> Storage {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| {
            let d = dir.path().join(s);
            std::fs::create_dir_all(&d).unwrap();
            path_str(&d).to_string()
        };
        let flags = vec![
            "--root".into(),
            p("root"),
            "--runroot".into(),
            p("runroot"),
            "--storage-driver".into(),
            "vfs".into(),
        ];
        let tmpdir = p("tmp");
        Storage {
            _dir: dir,
            flags,
            tmpdir,
        }
    }

    async fn buildah(&self, args: &[&str]) -> String {
        let all: Vec<&str> = self
            .flags
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect();
        run("buildah", all).await
    }

    async fn podman(&self, args: &[&str]) -> String {
        let all: Vec<&str> = self
            .flags
            .iter()
            .map(String::as_str)
            .chain([
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
                "--tmpdir",
                &self.tmpdir,
            ])
            .chain(args.iter().copied())
            .collect();
        run("podman", all).await
    }

    /// Builds `name` from scratch: busybox plus a file, run as `busybox echo`.
    async fn build_busybox_image(&self, name: &str, message: &str) {
        let c = self.buildah(&["from", "scratch"]).await;
        let c = c.trim();
        self.buildah(&["copy", c, BUSYBOX, "/bin/busybox"]).await;
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), message).unwrap();
        self.buildah(&["copy", c, path_str(tmp.path()), "/message"])
            .await;
        let cmd = format!(r#"["/bin/busybox", "echo", "{message}"]"#);
        self.buildah(&[
            "config", "--cmd", &cmd, "--os", "linux", "--arch", "amd64", c,
        ])
        .await;
        self.buildah(&["commit", "--rm", c, name]).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_pushes_and_pulls_an_image_that_runs() {
    require("podman", "podman");
    require("buildah", "buildah");
    require("runc", "runc");
    let app = TestApp::start().await;
    let local = "localhost/dockyard-podman-test:1";
    let message = format!("hello from dockyard {}", uuid::Uuid::new_v4().simple());

    // Build and push from one storage...
    let a = Storage::new();
    a.build_busybox_image(local, &message).await;
    let id = a
        .podman(&["image", "inspect", "--format", "{{.Id}}", local])
        .await;
    let repo = unique("clients/podman");
    let remote = format!("{}/{repo}:1", app.addr);
    let digestfile = tempfile::NamedTempFile::new().unwrap();
    a.podman(&[
        "push",
        "--tls-verify=false",
        "--creds",
        &creds(),
        "--format",
        "v2s2",
        "--digestfile",
        path_str(digestfile.path()),
        local,
        &format!("docker://{remote}"),
    ])
    .await;
    let pushed = std::fs::read_to_string(digestfile.path()).unwrap();
    let (d, ct, body) = http_manifest(&app, &repo, "1").await;
    assert_eq!(d, pushed.trim());
    assert_eq!(ct, DOCKER_MANIFEST);
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        manifest["config"]["digest"].as_str().unwrap(),
        format!("sha256:{}", id.trim()),
        "config digest is podman's image ID"
    );

    // ...pull into an empty one: same image ID and manifest digest.
    let b = Storage::new();
    b.podman(&["pull", "--tls-verify=false", "--creds", &creds(), &remote])
        .await;
    let pulled = b
        .podman(&[
            "image",
            "inspect",
            "--format",
            "{{.Id}} {{.Digest}}",
            &remote,
        ])
        .await;
    assert_eq!(pulled.trim(), format!("{} {}", id.trim(), pushed.trim()));

    // And it runs. runc with explicit ulimits works both on plain Debian and
    // in VMs/containers where the hard limits are below podman's defaults.
    let out = b
        .podman(&[
            "run",
            "--rm",
            "--network=none",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            &remote,
        ])
        .await;
    assert_eq!(out.trim(), message);
    let out = b
        .podman(&[
            "run",
            "--rm",
            "--network=none",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            &remote,
            "/bin/busybox",
            "cat",
            "/message",
        ])
        .await;
    assert_eq!(out.trim(), message);
}

#[tokio::test(flavor = "multi_thread")]
async fn buildah_push_is_served_over_http() {
    require("buildah", "buildah");
    let app = TestApp::start().await;
    let s = Storage::new();
    let local = "localhost/dockyard-buildah-test:1";
    s.build_busybox_image(local, "built by buildah").await;
    let id = s
        .buildah(&[
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.FromImageID}}",
            local,
        ])
        .await;
    let repo = unique("clients/buildah");
    let digestfile = tempfile::NamedTempFile::new().unwrap();
    s.buildah(&[
        "push",
        "--tls-verify=false",
        "--creds",
        &creds(),
        "--digestfile",
        path_str(digestfile.path()),
        local,
        &format!("docker://{}/{repo}:latest", app.addr),
    ])
    .await;
    let pushed = std::fs::read_to_string(digestfile.path()).unwrap();

    let (digest, ct, body) = http_manifest(&app, &repo, "latest").await;
    assert_eq!(digest, pushed.trim());
    assert_eq!(ct, OCI_MANIFEST, "buildah pushes its native OCI format");
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    assert_eq!(config_digest, format!("sha256:{}", id.trim()));
    let config: Value =
        serde_json::from_slice(&http_blob(&app, &repo, config_digest).await).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(
        config["config"]["Cmd"],
        json!(["/bin/busybox", "echo", "built by buildah"])
    );
    let layers = layer_digests(&manifest);
    assert_eq!(
        layers.len(),
        config["rootfs"]["diff_ids"].as_array().unwrap().len()
    );
    for l in &layers {
        let bytes = http_blob(&app, &repo, l).await;
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip layer");
    }
    // HEAD agrees with GET, by tag and by digest.
    for reference in ["latest", digest.as_str()] {
        let r = app
            .req(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert_eq!(header(&r, "content-length"), Some(body.len().to_string()));
    }
}

// ---------------------------------------------------------------------------
// docker

/// Removes the test's images from the shared dockerd, whatever happens.
struct DockerImages(Vec<String>);

impl Drop for DockerImages {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "--force", image])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn digest_after(text: &str, marker: &str) -> String {
    let i = text
        .find(marker)
        .unwrap_or_else(|| panic!("no `{marker}` in docker output:\n{text}"));
    text[i + marker.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_pushes_and_pulls_through_dockerd() {
    require("docker", "docker.io");
    let info = output("docker", ["info", "--format", "{{.ServerVersion}}"]).await;
    assert!(
        info.status.success(),
        "dockerd is not answering (`docker info` failed: {}); `cargo xtask test` starts it",
        info.stderr.trim()
    );
    let app = TestApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs.tar");
    let marker = uuid::Uuid::new_v4().to_string();
    std::fs::write(
        &rootfs,
        tar(&[
            Entry::Dir("bin/"),
            Entry::File("bin/busybox", 0o755, &busybox()),
            Entry::Symlink("bin/sh", "busybox"),
            Entry::File("marker", 0o644, marker.as_bytes()),
        ]),
    )
    .unwrap();
    let repo = unique("clients/docker");
    let image = format!("{}/{repo}:1", app.addr);
    let _cleanup = DockerImages(vec![image.clone()]);

    let id = run("docker", ["import", path_str(&rootfs), &image]).await;
    let id = id.trim().to_string();
    assert!(id.starts_with("sha256:"), "docker import printed {id}");

    // Unauthenticated, the push is refused with docker's usual message.
    let refused = output("docker", ["push", &image]).await;
    assert!(!refused.status.success(), "anonymous push succeeded");
    assert!(
        refused
            .stderr
            .contains("denied: requested access to the resource is denied"),
        "{}",
        refused.stderr
    );
    let addr = app.addr.to_string();
    run(
        "docker",
        ["login", "--username", ADMIN.0, "--password", ADMIN.1, &addr],
    )
    .await;
    let push = run("docker", ["push", &image]).await;
    let digest = digest_after(&push, "digest: ");
    let (d, ct, body) = http_manifest(&app, &repo, "1").await;
    assert_eq!(d, digest);
    assert_eq!(ct, DOCKER_MANIFEST);
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(manifest["config"]["digest"].as_str(), Some(id.as_str()));
    for l in layer_digests(&manifest) {
        http_blob(&app, &repo, &l).await;
    }

    // Forget the image locally, then pull it back.
    run("docker", ["rmi", &image]).await;
    let gone = output("docker", ["image", "inspect", &image]).await;
    assert!(!gone.status.success(), "image still present after rmi");
    let pull = run("docker", ["pull", &image]).await;
    assert_eq!(digest_after(&pull, "Digest: "), digest);
    let inspect = run(
        "docker",
        [
            "image",
            "inspect",
            "--format",
            "{{.Id}} {{json .RepoDigests}}",
            &image,
        ],
    )
    .await;
    assert_eq!(
        inspect.trim(),
        format!("{id} [\"{}/{repo}@{digest}\"]", app.addr)
    );

    // Pull by digest too.
    let by_digest = format!("{}/{repo}@{digest}", app.addr);
    run("docker", ["rmi", &image]).await;
    let pull = run("docker", ["pull", &by_digest]).await;
    assert_eq!(digest_after(&pull, "Digest: "), digest);
    let got = run(
        "docker",
        ["image", "inspect", "--format", "{{.Id}}", &by_digest],
    )
    .await;
    assert_eq!(got.trim(), id);
    run("docker", ["rmi", &by_digest]).await;
}

// ---------------------------------------------------------------------------
// a 1 GiB layer over HTTP, chunked

#[tokio::test(flavor = "multi_thread")]
async fn large_layer_of_1_gib_pushed_in_chunks_and_streamed_back() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: u64 = 64 << 20;
    let app = TestApp::start().await;
    let repo = unique("clients/large");

    let r = app
        .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "start upload");
    let mut loc = location(&r);

    // Chunks are generated one at a time; only one is ever in memory.
    let mut hasher = Some(Sha256::new());
    let mut offset = 0u64;
    let started = std::time::Instant::now();
    while offset < TOTAL {
        let seed = offset / CHUNK + 7;
        let h = hasher.take().unwrap();
        let (chunk, h) = tokio::task::spawn_blocking(move || {
            let mut h = h;
            let chunk = noise(seed, CHUNK as usize);
            h.update(&chunk);
            (chunk, h)
        })
        .await
        .unwrap();
        hasher = Some(h);
        let end = offset + CHUNK - 1;
        let r = app
            .client
            .patch(app.abs(&loc))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{end}"))
            .header("content-length", CHUNK.to_string())
            .body(chunk)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let range = header(&r, "range");
        let next = r
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            status,
            202,
            "PATCH {offset}-{end}: {}",
            r.text().await.unwrap()
        );
        assert_eq!(
            range.as_deref(),
            Some(format!("0-{end}").as_str()),
            "Range after PATCH"
        );
        loc = next.expect("Location after PATCH");
        offset += CHUNK;
    }
    let digest = format!("sha256:{}", hex::encode(hasher.unwrap().finalize()));

    // The session reports its size before it is closed.
    let r = app.client.get(app.abs(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204, "upload status");
    assert_eq!(header(&r, "range"), Some(format!("0-{}", TOTAL - 1)));

    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = app
        .client
        .put(format!("{}{sep}digest={digest}", app.abs(&loc)))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let got = header(&r, "docker-content-digest");
    assert_eq!(status, 201, "finish upload: {}", r.text().await.unwrap());
    assert_eq!(got.as_deref(), Some(digest.as_str()));
    let push_time = started.elapsed();

    let r = app
        .req(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), Some(TOTAL.to_string()));

    // Stream it back, hashing as it arrives.
    let r = app.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(b) = stream.next().await {
        let b = b.expect("blob stream");
        n += b.len() as u64;
        h.update(&b);
    }
    assert_eq!(n, TOTAL, "bytes streamed back");
    assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), digest);

    // A range from the middle of the blob, across a chunk boundary.
    let start = CHUNK * 3 - 10;
    let r = app
        .req(Method::GET, &format!("/v2/{repo}/blobs/{digest}"))
        .header("range", format!("bytes={start}-{}", start + 19))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let body = r.bytes().await.unwrap();
    let mut want = noise(2 + 7, CHUNK as usize)[(CHUNK - 10) as usize..].to_vec();
    want.extend_from_slice(&noise(3 + 7, 10));
    assert_eq!(&body[..], &want[..]);
    eprintln!(
        "large blob: pushed 1 GiB in {push_time:.1?}, whole test {:.1?}",
        started.elapsed()
    );
}

/// Robots, read-only denial and anonymous pulls with the real clients.
#[tokio::test(flavor = "multi_thread")]
async fn robots_and_anonymous_pulls_with_skopeo_and_podman() {
    require("skopeo", "skopeo");
    require("podman", "podman");
    let app = TestApp::start().await;
    let id = app.identity().await;
    let admin_id = match id.login(ADMIN.0, ADMIN.1).await.unwrap().unwrap() {
        dockyard_core::identity::Principal::User { id, .. } => id,
        p => panic!("{p:?}"),
    };
    let org = unique("org").replace('-', "");
    id.create_org(&org, admin_id).await.unwrap();
    let repo = format!("{org}/app");
    app.push_blob(&repo, b"creates the repository").await;
    let repo_id: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT id FROM repositories WHERE name = $1")
            .bind(&repo)
            .fetch_one(&id.db.read)
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    let robot = |name: &'static str, role| {
        let id = id.clone();
        let org = org.clone();
        async move {
            let (rid, full) = id.create_robot(&org, name).await.unwrap();
            id.grant(repo_id, "robot", rid, role).await.unwrap();
            let (_, secret) = id
                .create_token(
                    dockyard_core::identity::TokenKind::Robot,
                    None,
                    Some(rid),
                    "ci",
                    None,
                )
                .await
                .unwrap();
            format!("{full}:{secret}")
        }
    };
    let pusher = robot("pusher", dockyard_core::identity::Role::Write).await;
    let reader = robot("reader", dockyard_core::identity::Role::Read).await;

    let tmp = tempfile::tempdir().unwrap();
    let src = Layout::new(tmp.path().join("src"));
    let desc = src.image(
        "amd64",
        &[tar(&[Entry::File(
            "robot.txt",
            0o644,
            b"pushed by a robot\n",
        )])],
    );
    src.tag("v1", desc);
    let src_ref = format!("oci:{}:v1", path_str(&src.dir));
    let remote = format!("docker://{}/{repo}:v1", app.addr);

    // The write robot pushes with skopeo.
    run(
        "skopeo",
        [
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &pusher,
            &src_ref,
            &remote,
        ],
    )
    .await;
    // The read-only robot cannot push: the client's usual refusal.
    let denied = output(
        "skopeo",
        [
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &reader,
            &src_ref,
            &format!("docker://{}/{repo}:v2", app.addr),
        ],
    )
    .await;
    assert!(!denied.status.success(), "read-only robot pushed");
    assert!(
        denied
            .stderr
            .contains("denied: requested access to the resource is denied"),
        "{}",
        denied.stderr
    );
    // ...but it pulls, with podman, after a `skopeo login` into an auth file too.
    let s = Storage::new();
    s.podman(&[
        "pull",
        "--tls-verify=false",
        "--creds",
        &reader,
        &format!("{}/{repo}:v1", app.addr),
    ])
    .await;
    let authfile = tmp.path().join("auth.json");
    let (user, secret) = reader.split_once(':').unwrap();
    // `podman login` stores the robot's token; a pull then needs no flags.
    let podman_auth = tmp.path().join("podman-auth.json");
    let addr = app.addr.to_string();
    s.podman(&[
        "login",
        "--tls-verify=false",
        "--authfile",
        path_str(&podman_auth),
        "--username",
        user,
        "--password",
        secret,
        &addr,
    ])
    .await;
    let b = Storage::new();
    b.podman(&[
        "pull",
        "--tls-verify=false",
        "--authfile",
        path_str(&podman_auth),
        &format!("{}/{repo}:v1", app.addr),
    ])
    .await;
    run(
        "skopeo",
        [
            "login",
            "--tls-verify=false",
            "--authfile",
            path_str(&authfile),
            "--username",
            user,
            "--password",
            secret,
            &app.addr.to_string(),
        ],
    )
    .await;
    run(
        "skopeo",
        [
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--authfile",
            path_str(&authfile),
            &remote,
        ],
    )
    .await;

    // Private: an anonymous pull fails; public: it works.
    let anon = output(
        "skopeo",
        [
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--no-creds",
            &remote,
        ],
    )
    .await;
    assert!(
        !anon.status.success(),
        "anonymous pull of a private repository succeeded"
    );
    sqlx::query("UPDATE repositories SET visibility = 'public' WHERE id = $1")
        .bind(repo_id)
        .execute(&id.db.write)
        .await
        .unwrap();
    let raw = run(
        "skopeo",
        [
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--no-creds",
            &remote,
        ],
    )
    .await;
    assert!(raw.contains("schemaVersion"));
    let dst = tmp.path().join("anon");
    run(
        "skopeo",
        [
            "copy",
            "--src-tls-verify=false",
            "--src-no-creds",
            &remote,
            &format!("oci:{}:v1", path_str(&dst)),
        ],
    )
    .await;
}
