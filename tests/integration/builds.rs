//! Builds end to end with a real engine: a busybox base image made here is
//! pushed into Dockyard, executors (`dockyard executor` processes) build
//! through the local `dockerd`, and the results are pulled back with
//! `docker` and `skopeo`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::clients::{Entry, busybox, gzip, output, path_str, require, run, sha256_digest, tar};
use crate::harness::*;

const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Pushes `repo:tag` as an index of a runnable linux/amd64 busybox image
/// and a linux/arm64 image holding one text file (nothing runs on arm64
/// here). Returns the index digest.
async fn push_base(app: &TestApp, repo: &str, tag: &str) -> String {
    let bb = busybox();
    let mut entries = vec![Entry::Dir("bin/"), Entry::File("bin/busybox", 0o755, &bb)];
    let applets = [
        "sh", "cat", "echo", "sleep", "ls", "test", "true", "false", "mkdir",
    ];
    let links: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
    for l in &links {
        entries.push(Entry::Symlink(l, "busybox"));
    }
    entries.push(Entry::Dir("tmp/"));
    let amd64 = tar(&entries);
    let arm64 = tar(&[Entry::File("arch.txt", 0o644, b"arm64 base\n")]);
    let mut descs = vec![];
    for (arch, layer) in [("amd64", amd64), ("arm64", arm64)] {
        let gz = gzip(&layer);
        let layer_digest = app.push_blob(repo, &gz).await;
        let mut config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&layer)]},
        });
        if arch == "arm64" {
            config["variant"] = json!("v8");
        }
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = app.push_blob(repo, &config).await;
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest.to_string(), "size": gz.len()}],
        });
        let (d, body) = app
            .put_manifest(repo, &format!("base-{arch}"), OCI_MANIFEST, &manifest)
            .await;
        let mut platform = json!({"architecture": arch, "os": "linux"});
        if arch == "arm64" {
            platform["variant"] = json!("v8");
        }
        descs.push(json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": body.len(), "platform": platform}));
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs});
    let (d, _) = app.put_manifest(repo, tag, OCI_INDEX, &index).await;
    d.to_string()
}

/// A `dockyard executor` process, killed when dropped.
pub(crate) struct Executor {
    child: tokio::process::Child,
    name: String,
}

impl Executor {
    pub(crate) async fn start(
        app: &TestApp,
        name: &str,
        platforms: &str,
        capacity: u32,
    ) -> Executor {
        let r = app
            .req(Method::POST, "/api/v1/executor-tokens")
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let token = r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string();
        let log = std::fs::File::create(app.data_dir.path().join(format!("executor-{name}.log")))
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dockyard"))
            .args(["executor", "--manager", &app.base, "--name", name])
            .args([
                "--platforms",
                platforms,
                "--capacity",
                &capacity.to_string(),
            ])
            .env("DOCKYARD_EXECUTOR_TOKEN", token)
            .env(
                "DOCKYARD_EXECUTOR_WORK_DIR",
                app.data_dir.path().join(format!("work-{name}")),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start dockyard executor");
        let e = Executor {
            child,
            name: name.to_string(),
        };
        // Registered when the manager lists it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v: Value = app.get("/api/v1/executors").await.json().await.unwrap();
            if v["executors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["name"] == name && x["online"] == true)
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "executor {name} did not register: {}",
                e.log(app)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn log(&self, app: &TestApp) -> String {
        std::fs::read_to_string(
            app.data_dir
                .path()
                .join(format!("executor-{}.log", self.name)),
        )
        .unwrap_or_default()
    }

    async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }
}

pub(crate) async fn build_detail(app: &TestApp, id: &str) -> Value {
    let r = app.get(&format!("/api/v1/builds/{id}")).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Polls a build until `done(build)` or the deadline; returns the build.
pub(crate) async fn wait_for(
    app: &TestApp,
    id: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let b = build_detail(app, id).await;
        if done(&b) {
            return b;
        }
        if Instant::now() > deadline {
            let logs = app
                .get(&format!("/api/v1/builds/{id}/logs"))
                .await
                .text()
                .await
                .unwrap();
            panic!("build {id} did not get there in {secs} s: {b:#}\n--- logs\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn is_final(b: &Value) -> bool {
    ["complete", "failed", "cancelled", "internal_error"].contains(&b["status"].as_str().unwrap())
}

pub(crate) async fn wait_final(app: &TestApp, id: &str, secs: u64) -> Value {
    wait_for(app, id, secs, is_final).await
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A git repository with `files`, committed on `main`; returns its head.
pub(crate) fn git_repo(dir: &Path, files: &[(&str, &str)]) -> String {
    git(dir, &["init", "-q", "-b", "main"]);
    for (name, content) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "build me"]);
    git(dir, &["rev-parse", "HEAD"])
}

pub(crate) fn host(app: &TestApp) -> String {
    app.addr.to_string()
}

async fn docker_login(app: &TestApp) {
    let mut child = tokio::process::Command::new("docker")
        .args(["login", &host(app), "-u", ADMIN.0, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(ADMIN.1.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn require_engine() {
    require("docker", "docker.io");
    require("git", "git");
    require("skopeo", "skopeo");
}

#[tokio::test]
async fn github_push_builds_a_multi_stage_image_with_build_args() {
    require_engine();
    let app = TestApp::start().await;
    let base_digest = push_base(&app, "library/busybox", "1").await;
    let _exec = Executor::start(&app, "amd64-node", "linux/amd64", 2).await;
    let src = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "ARG BASE={}/library/busybox:1\n\
         FROM ${{BASE}} AS builder\n\
         ARG GREETING=hello\n\
         RUN echo \"$GREETING from the builder\" > /greeting.txt\n\
         FROM $BASE\n\
         COPY --from=builder /greeting.txt /greeting.txt\n\
         CMD [\"cat\", \"/greeting.txt\"]\n",
        host(&app)
    );
    let tools = format!(
        "FROM {}/library/busybox:1\nCOPY tool.txt /tool.txt\n",
        host(&app)
    );
    let commit = git_repo(
        src.path(),
        &[
            ("app/Dockerfile", &dockerfile),
            ("tools/build.Dockerfile", &tools),
            ("tools/tool.txt", "a tool\n"),
        ],
    );
    let r = app
        .req(Method::POST, "/api/v1/repositories")
        .json(&json!({"name": "admin/app"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .req(Method::POST, "/api/v1/namespaces/admin/triggers")
        .json(&json!({"kind": "github"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let trigger: Value = r.json().await.unwrap();
    let secret = trigger["secret"].as_str().unwrap();
    let hook = format!(
        "/api/v1/triggers/{}/webhook",
        trigger["id"].as_str().unwrap()
    );
    assert!(trigger["webhook_url"].as_str().unwrap().ends_with(&hook));
    let r = app
        .req(
            Method::POST,
            "/api/v1/repositories/admin/app/build-definitions",
        )
        .json(&json!({
            "name": "main",
            "git_url": path_str(src.path()),
            "context_dir": "app",
            "build_args": {"GREETING": "bonjour"},
            "tag_templates": ["{branch}", "latest", "sha-{short_sha}"],
            "ref_filter": "^heads/main$",
            "trigger_id": trigger["id"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let definition: Value = r.json().await.unwrap();
    // A second definition on the same trigger: one push, two images.
    let tools_definition = json!({
        "name": "tools",
        "git_url": path_str(src.path()),
        "context_dir": "tools",
        "dockerfile": "build.Dockerfile",
        "tag_templates": ["{branch}"],
        "ref_filter": "^heads/main$",
        "trigger_id": trigger["id"],
    });
    let r = app
        .req(
            Method::POST,
            "/api/v1/repositories/admin/tools/build-definitions",
        )
        .json(&tools_definition)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no such repository yet");
    let r = app
        .req(Method::POST, "/api/v1/repositories")
        .json(&json!({"name": "admin/tools"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .req(
            Method::POST,
            "/api/v1/repositories/admin/tools/build-definitions",
        )
        .json(&tools_definition)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // A local path is refused unless builds.allow_local_git is on (it is
    // in tests); check the refusal on a server with the default.
    let strict = TestApp::start_with(|c| c.builds.allow_local_git = false).await;
    strict
        .req(Method::POST, "/api/v1/repositories")
        .json(&json!({"name": "admin/app"}))
        .send()
        .await
        .unwrap();
    for url in [
        path_str(src.path()).to_string(),
        format!("file://{}", path_str(src.path())),
    ] {
        let r = strict
            .req(
                Method::POST,
                "/api/v1/repositories/admin/app/build-definitions",
            )
            .json(&json!({"name": "local", "git_url": url}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
    }

    let payload = json!({
        "ref": "refs/heads/main", "after": commit,
        "repository": {"default_branch": "main", "clone_url": path_str(src.path())},
    })
    .to_string();
    // A wrong signature, and none at all, are refused and start nothing.
    for sig in [Some("sha256=0000"), None] {
        let mut req = app
            .anon
            .post(app.url(&hook))
            .header("x-github-event", "push")
            .body(payload.clone());
        if let Some(s) = sig {
            req = req.header("x-hub-signature-256", s);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    let v: Value = app
        .get("/api/v1/repositories/admin/app/builds")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["builds"], json!([]));
    // A push to a branch the filter excludes starts nothing either.
    let other = json!({"ref": "refs/heads/feature", "after": commit}).to_string();
    let r = app
        .anon
        .post(app.url(&hook))
        .header("x-github-event", "push")
        .header("x-hub-signature-256", sign(secret, &other))
        .body(other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["builds"], json!([]));

    let r = app
        .anon
        .post(app.url(&hook))
        .header("x-github-event", "push")
        .header("x-hub-signature-256", sign(secret, &payload))
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ids = r.json::<Value>().await.unwrap()["builds"].clone();
    assert_eq!(ids.as_array().unwrap().len(), 2, "one build per definition");
    let mut app_build = None;
    for id in ids.as_array().unwrap() {
        let b = wait_final(&app, id.as_str().unwrap(), 240).await;
        assert_eq!(b["status"], "complete", "{b:#}");
        if b["repository"] == "admin/app" {
            app_build = Some(b["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        app.get("/v2/admin/tools/manifests/main").await.status(),
        200
    );
    let id = app_build.expect("a build of admin/app");
    let b = wait_final(&app, &id, 240).await;
    assert_eq!(b["status"], "complete", "{b:#}");
    assert_eq!(b["trigger_kind"], "webhook");
    assert_eq!(b["commit"], commit);
    let short = &commit[..7];
    assert_eq!(b["tags"], json!(["main", "latest", format!("sha-{short}")]));
    let job = &b["jobs"][0];
    assert_eq!(job["phase"], "complete");
    assert_eq!(
        job["base_images"],
        json!([{"reference": format!("{}/library/busybox:1", host(&app)), "digest": base_digest}]),
        "the build records the base image it resolved"
    );
    for t in ["main", "latest", &format!("sha-{short}")] {
        let r = app
            .req(Method::HEAD, &format!("/v2/admin/app/manifests/{t}"))
            .header("accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "tag {t}");
        assert_eq!(
            header(&r, "docker-content-digest").as_deref(),
            b["manifest_digest"].as_str()
        );
    }
    // The temporary push tag is gone.
    let tags: Value = app
        .get("/v2/admin/app/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"].as_array().unwrap().len(), 3, "{tags}");
    // The log has the engine's output.
    let logs = app
        .get(&format!("/api/v1/builds/{id}/logs"))
        .await
        .text()
        .await
        .unwrap();
    assert!(logs.contains("bonjour") || logs.contains("RUN"), "{logs}");

    // The image runs and says what the build argument said.
    docker_login(&app).await;
    let image = format!("{}/admin/app:main", host(&app));
    run("docker", ["pull", image.as_str()]).await;
    let out = run(
        "docker",
        ["run", "--rm", "--network", "none", image.as_str()],
    )
    .await;
    assert_eq!(out.trim(), "bonjour from the builder");
    let _ = output("docker", ["rmi", "-f", image.as_str()]).await;

    // A manual rebuild of the branch head.
    let r = app
        .req(
            Method::POST,
            &format!(
                "/api/v1/build-definitions/{}/run",
                definition["id"].as_str().unwrap()
            ),
        )
        .json(&json!({"ref": "main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let manual: Value = r.json().await.unwrap();
    assert_eq!(manual["trigger_kind"], "manual");
    let m = wait_final(&app, manual["id"].as_str().unwrap(), 240).await;
    assert_eq!(m["status"], "complete", "{m:#}");
    assert_eq!(m["tags"], json!(["main", "latest"]));

    // Every delivery is recorded, refusals included.
    let v: Value = app
        .get(&format!(
            "/api/v1/triggers/{}/deliveries",
            trigger["id"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    let outcomes: Vec<&str> = v["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["accepted", "ignored", "rejected", "rejected"]);
}

fn sign(secret: &str, body: &str) -> String {
    dockyard_buildmanager::webhook::sign(secret, body.as_bytes())
}

/// `dockyard build` of a local directory: uploads the context, streams
/// the logs, exits 0; `.dockerignore` is respected.
fn cli(app: &TestApp) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_dockyard"));
    c.env("DOCKYARD_URL", &app.base)
        .env("DOCKYARD_USERNAME", ADMIN.0)
        .env("DOCKYARD_PASSWORD", ADMIN.1)
        .env("HOME", app.data_dir.path())
        .stdin(Stdio::null());
    c
}

#[tokio::test]
async fn two_platform_build_runs_both_jobs_at_once_and_yields_an_index() {
    require_engine();
    let app = TestApp::start().await;
    push_base(&app, "library/busybox", "1").await;
    let _amd = Executor::start(&app, "amd64-node", "linux/amd64", 1).await;
    let _arm = Executor::start(&app, "arm64-node", "linux/arm64", 1).await;
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {}/library/busybox:1\nCOPY hello.txt /hello.txt\n",
            host(&app)
        ),
    )
    .unwrap();
    std::fs::write(ctx.path().join("hello.txt"), "hello\n").unwrap();
    let out = cli(&app)
        .args(["build", "--platform", "linux/amd64,linux/arm64", "--quiet"])
        .args(["-t", "admin/multi:1", "-t", "admin/multi:latest"])
        .arg(ctx.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("[linux/arm64]"), "{stdout}");
    let v: Value = app
        .get("/api/v1/repositories/admin/multi/builds")
        .await
        .json()
        .await
        .unwrap();
    let id = v["builds"][0]["id"].as_str().unwrap().to_string();
    let b = build_detail(&app, &id).await;
    assert_eq!(b["status"], "complete");
    let jobs = b["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    // Both platforms ran at the same time, each on its own executor.
    let (a, c) = (&jobs[0], &jobs[1]);
    assert_ne!(a["executor_id"], c["executor_id"]);
    let overlap = a["started_at"].as_i64().unwrap() < c["finished_at"].as_i64().unwrap()
        && c["started_at"].as_i64().unwrap() < a["finished_at"].as_i64().unwrap();
    assert!(overlap, "the platform jobs ran one after the other: {b:#}");

    let raw = run(
        "skopeo",
        [
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            &admin_pair(),
            &format!("docker://{}/admin/multi:1", host(&app)),
        ],
    )
    .await;
    let index: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(index["mediaType"], OCI_INDEX);
    let mut platforms: Vec<String> = index["manifests"]
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
    assert_eq!(
        sha256_digest(raw.as_bytes()),
        b["manifest_digest"].as_str().unwrap()
    );
    // The arm64 image really is arm64.
    let arm = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "arm64")
        .unwrap();
    let config = run(
        "skopeo",
        [
            "inspect",
            "--config",
            "--tls-verify=false",
            "--creds",
            &admin_pair(),
            &format!(
                "docker://{}/admin/multi@{}",
                host(&app),
                arm["digest"].as_str().unwrap()
            ),
        ],
    )
    .await;
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["architecture"], "arm64");
}

#[tokio::test]
async fn cli_build_respects_dockerignore_and_fails_with_the_engine_error() {
    require_engine();
    let app = TestApp::start().await;
    push_base(&app, "library/busybox", "1").await;
    let _exec = Executor::start(&app, "node", "linux/amd64", 1).await;
    let ctx = tempfile::tempdir().unwrap();
    let base = format!("{}/library/busybox:1", host(&app));
    std::fs::create_dir_all(ctx.path().join("build")).unwrap();
    std::fs::write(
        ctx.path().join("build/Dockerfile"),
        format!(
            "FROM {base} AS first\nARG MSG\nCOPY . /ctx/\n\
             RUN test ! -e /ctx/secret.txt && test ! -e /ctx/logs/x.log && cat /ctx/kept.txt && echo \"msg=$MSG\"\n\
             FROM first AS final\nRUN echo final-stage\n\
             FROM first AS unused\nRUN echo never-built && exit 9\n"
        ),
    )
    .unwrap();
    std::fs::write(ctx.path().join("kept.txt"), "kept-file\n").unwrap();
    std::fs::write(ctx.path().join("secret.txt"), "do not upload\n").unwrap();
    std::fs::create_dir_all(ctx.path().join("logs")).unwrap();
    std::fs::write(ctx.path().join("logs/x.log"), "noise\n").unwrap();
    std::fs::write(ctx.path().join(".dockerignore"), "secret.txt\nlogs/\n").unwrap();
    let out = cli(&app)
        .args([
            "build",
            "-f",
            "build/Dockerfile",
            "--build-arg",
            "MSG=from-cli",
        ])
        .args(["--target", "final", "--quiet", "-t", "admin/cli:1"])
        .arg(ctx.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for needle in ["kept-file", "msg=from-cli", "final-stage"] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    assert!(!stdout.contains("never-built"), "{stdout}");
    let r = app.get("/v2/admin/cli/manifests/1").await;
    assert_eq!(r.status(), 200);

    // A failing RUN: non-zero exit, the engine's error in the output and
    // in the build record.
    std::fs::write(
        ctx.path().join("build/Dockerfile"),
        format!("FROM {base}\nRUN echo boom-marker && exit 3\n"),
    )
    .unwrap();
    let out = cli(&app)
        .args([
            "build",
            "-f",
            "build/Dockerfile",
            "--quiet",
            "-t",
            "admin/cli:broken",
        ])
        .arg(ctx.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed build must exit non-zero");
    assert!(stdout.contains("boom-marker"), "{stdout}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("non-zero code: 3"),
        "engine error missing:\n{all}"
    );
    let v: Value = app
        .get("/api/v1/repositories/admin/cli/builds")
        .await
        .json()
        .await
        .unwrap();
    let failed = &v["builds"][0];
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("non-zero code: 3"),
        "{failed}"
    );
    let r = app.get("/v2/admin/cli/manifests/broken").await;
    assert_eq!(r.status(), 404, "a failed build tags nothing");
}

/// Starts a build whose RUN sleeps, through the API (an uploaded context).
async fn start_sleeping_build(app: &TestApp, repo: &str, secs: u32) -> String {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {}/library/busybox:1\nRUN echo started-sleeping && sleep {secs} && echo woke-up\n",
            host(app)
        ),
    )
    .unwrap();
    let mut archive = Vec::new();
    dockyard_builders::source::pack_context(ctx.path(), "Dockerfile", &mut archive).unwrap();
    let r = app
        .req(
            Method::POST,
            &format!("/api/v1/repositories/{repo}/builds/context?tags=1"),
        )
        .header("content-type", "application/gzip")
        .body(archive)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn building(b: &Value) -> bool {
    b["jobs"][0]["phase"] == "building"
}

#[tokio::test]
async fn a_killed_executor_loses_its_job_to_another_and_the_build_succeeds() {
    require_engine();
    let app = TestApp::start_with(|c| c.builds.lease = Duration::from_secs(5)).await;
    push_base(&app, "library/busybox", "1").await;
    let mut first = Executor::start(&app, "doomed", "linux/amd64", 1).await;
    let id = start_sleeping_build(&app, "admin/retry", 6).await;
    let b = wait_for(&app, &id, 120, building).await;
    let first_executor = b["jobs"][0]["executor_id"].clone();
    first.kill().await;
    let _second = Executor::start(&app, "survivor", "linux/amd64", 1).await;
    let b = wait_final(&app, &id, 240).await;
    assert_eq!(b["status"], "complete", "{b:#}");
    let job = &b["jobs"][0];
    assert_eq!(job["attempt"], 2, "{b:#}");
    assert_ne!(job["executor_id"], first_executor);
    let logs = app
        .get(&format!("/api/v1/builds/{id}/logs"))
        .await
        .text()
        .await
        .unwrap();
    assert!(logs.contains("retrying on another executor"), "{logs}");
    assert!(logs.contains("woke-up"), "{logs}");
}

#[tokio::test]
async fn cancel_stops_a_running_build() {
    require_engine();
    let app = TestApp::start().await;
    push_base(&app, "library/busybox", "1").await;
    let exec = Executor::start(&app, "node", "linux/amd64", 1).await;
    let id = start_sleeping_build(&app, "admin/cancelled", 120).await;
    wait_for(&app, &id, 120, building).await;
    let asked = Instant::now();
    let r = app
        .req(Method::POST, &format!("/api/v1/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b = wait_final(&app, &id, 60).await;
    assert_eq!(b["status"], "cancelled", "{b:#}\n{}", exec.log(&app));
    assert_eq!(b["jobs"][0]["phase"], "cancelled");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "cancelling took {:?}",
        asked.elapsed()
    );
    // Cancelling again is a conflict; nothing was tagged.
    let r = app
        .req(Method::POST, &format!("/api/v1/builds/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        app.get("/v2/admin/cancelled/manifests/1").await.status(),
        404
    );
}

/// Right after install: `dockyard serve` (its in-process executor, no
/// other process), `dockyard login`, `dockyard build`.
#[tokio::test]
async fn serve_builds_out_of_the_box_with_its_in_process_executor() {
    require_engine();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut serve = tokio::process::Command::from(dockyard_command());
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let _server = serve
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("DOCKYARD_BOOTSTRAP_ADMIN", admin_pair())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = admin_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.get(format!("{base}/api/v1/executors")).send().await;
        if let Ok(r) = r
            && r.status() == 200
            && r.json::<Value>().await.unwrap()["executors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "local executor" && e["online"] == true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no in-process executor registered:\n{}",
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY hello.txt /\n").unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello\n").unwrap();
    let home = dir.path().join("home");
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::from(dockyard_command());
        c.args(args).env("HOME", &home).stdin(Stdio::piped());
        c
    };
    // `dockyard login` checks and saves the credentials; `build` uses them.
    let mut login = cli(&["login", &base, "-u", ADMIN.0, "--password-stdin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = login.stdin.take().unwrap();
        stdin
            .write_all(format!("{}\n", ADMIN.1).as_bytes())
            .await
            .unwrap();
    }
    let out = login.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = home.join(".config/dockyard/credentials.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = cli(&["build", "--quiet", "-t", "admin/hello:1"])
        .arg(&ctx)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = client
        .get(format!("{base}/v2/admin/hello/manifests/1"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_build_past_its_timeout_fails_and_stops() {
    require_engine();
    let app = TestApp::start_with(|c| c.builds.timeout = Duration::from_secs(8)).await;
    push_base(&app, "library/busybox", "1").await;
    let _exec = Executor::start(&app, "node", "linux/amd64", 1).await;
    let id = start_sleeping_build(&app, "admin/slow", 120).await;
    let b = wait_final(&app, &id, 60).await;
    assert_eq!(b["status"], "failed", "{b:#}");
    // The executor (which got the time left with the job) or the manager's
    // sweep stops it, whichever comes first.
    assert!(
        b["error"].as_str().unwrap().contains("timed out after"),
        "{b:#}"
    );
    assert!(
        ["failed", "cancelled"].contains(&b["jobs"][0]["phase"].as_str().unwrap()),
        "{b:#}"
    );
    let took = b["finished_at"].as_i64().unwrap() - b["created_at"].as_i64().unwrap();
    assert!(took < 30_000, "stopped after {took} ms");
    assert_eq!(app.get("/v2/admin/slow/manifests/1").await.status(), 404);
}
