//! Base-image rebuilds end to end with a real engine: bases are pushed into
//! Dockyard (or into CNCF Distribution as an upstream registry),
//! definitions built from local git repositories by `dockyard executor`
//! processes through the local `dockerd`, then the bases move and the
//! dependents are rebuilt by themselves.

use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::{Client, Method};
use serde_json::{Value, json};

use crate::builds::{Executor, build_detail, git, git_repo, host, require_engine, wait_final};
use crate::clients::{Entry, busybox, gzip, path_str, sha256_digest, tar};
use crate::harness::*;

const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// How long test servers wait for more pushes of a base: short, yet long
/// enough for two pushes in a row to fall in one window on a slow machine.
const DEBOUNCE: Duration = Duration::from_secs(3);

/// A test server with a short rebuild debounce.
async fn start_app() -> TestApp {
    TestApp::start_with(|c| c.builds.rebuild_debounce = DEBOUNCE).await
}

/// A base image as pushed: its manifest digest, and the digests (compressed)
/// and diff ids (uncompressed) of its layers. The first layer (busybox) is
/// the same in every version; the second says which version it is.
struct Base {
    digest: String,
    layers: Vec<String>,
    diff_ids: Vec<String>,
}

/// Pushes a blob to any registry under `base` (monolithic upload).
async fn upload(client: &Client, base: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let r = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "start upload to {base}");
    let loc = location(&r);
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = client
        .put(format!("{loc}{sep}digest={digest}"))
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

/// Pushes a runnable linux/amd64 busybox image with a second layer holding
/// `/base-version.txt` = `version`, as `repo:tag`, to the registry at
/// `base` (Dockyard with the admin's client, or Distribution anonymously).
async fn push_version(client: &Client, base: &str, repo: &str, tag: &str, version: &str) -> Base {
    let bb = busybox();
    let mut entries = vec![Entry::Dir("bin/"), Entry::File("bin/busybox", 0o755, &bb)];
    let links: Vec<String> = ["sh", "cat", "echo", "ls", "true"]
        .iter()
        .map(|a| format!("bin/{a}"))
        .collect();
    for l in &links {
        entries.push(Entry::Symlink(l, "busybox"));
    }
    entries.push(Entry::Dir("tmp/"));
    let text = format!("{version}\n");
    let tars = [
        tar(&entries),
        tar(&[Entry::File("base-version.txt", 0o644, text.as_bytes())]),
    ];
    let mut layers = vec![];
    let mut descriptors = vec![];
    for t in &tars {
        let gz = gzip(t);
        let d = upload(client, base, repo, &gz).await;
        descriptors.push(json!({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": gz.len()}));
        layers.push(d);
    }
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256_digest(t)).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = upload(client, base, repo, &config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let r = client
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "put manifest: {}", r.text().await.unwrap());
    Base {
        digest: sha256_digest(&manifest),
        layers,
        diff_ids,
    }
}

async fn push_local(app: &TestApp, repo: &str, tag: &str, version: &str) -> Base {
    push_version(&app.client, &app.base, repo, tag, version).await
}

async fn create_repository(app: &TestApp, name: &str) {
    let r = app
        .req(Method::POST, "/api/v1/repositories")
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// Creates a definition of `repo` building the git repository at `src`.
async fn create_definition(
    app: &TestApp,
    repo: &str,
    src: &std::path::Path,
    extra: Value,
) -> Value {
    let mut body = json!({
        "name": "main",
        "git_url": path_str(src),
        "tag_templates": ["{branch}"],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = app
        .req(
            Method::POST,
            &format!("/api/v1/repositories/{repo}/build-definitions"),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

/// Runs a definition on `main` by hand and waits for it to succeed.
async fn run_and_wait(app: &TestApp, definition: &Value) -> Value {
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
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = wait_final(app, &id, 240).await;
    assert_eq!(b["status"], "complete", "{b:#}");
    b
}

async fn builds_of(app: &TestApp, repo: &str) -> Vec<Value> {
    let r = app
        .get(&format!("/api/v1/repositories/{repo}/builds?n=100"))
        .await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["builds"]
        .as_array()
        .unwrap()
        .clone()
}

async fn base_image_builds(app: &TestApp, repo: &str) -> Vec<Value> {
    builds_of(app, repo)
        .await
        .into_iter()
        .filter(|b| b["trigger_kind"] == "base_image")
        .collect()
}

async fn rebuilds_of(app: &TestApp, repo: &str) -> Vec<Value> {
    let r = app
        .get(&format!("/api/v1/repositories/{repo}/builds/rebuilds"))
        .await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["rebuilds"]
        .as_array()
        .unwrap()
        .clone()
}

/// Waits for the first base-image build of `repo` to appear, then for it
/// to succeed; returns it.
async fn wait_rebuilt(app: &TestApp, repo: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(b) = base_image_builds(app, repo).await.pop() {
            let b = wait_final(app, b["id"].as_str().unwrap(), 240).await;
            assert_eq!(b["status"], "complete", "{b:#}");
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "{repo} was not rebuilt within {secs} s; rebuild records: {:#}",
            Value::Array(rebuilds_of(app, repo).await)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The config (as JSON) and layer digests of `repo:tag` read through `/v2`.
async fn image(app: &TestApp, repo: &str, tag: &str) -> (Value, Vec<String>) {
    let r = app
        .req(Method::GET, &format!("/v2/{repo}/manifests/{tag}"))
        .header("accept", ACCEPT_MANIFESTS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let manifest: Value = r.json().await.unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("not an image manifest: {manifest:#}"))
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let config = app
        .get(&format!(
            "/v2/{repo}/blobs/{}",
            manifest["config"]["digest"].as_str().unwrap()
        ))
        .await;
    assert_eq!(config.status(), 200);
    (config.json().await.unwrap(), layers)
}

/// The digests of `layers` (blobs of `repo`) once uncompressed.
async fn uncompressed(app: &TestApp, repo: &str, layers: &[String]) -> Vec<String> {
    let mut out = vec![];
    for l in layers {
        let r = app.get(&format!("/v2/{repo}/blobs/{l}")).await;
        assert_eq!(r.status(), 200, "{l}");
        let gz = r.bytes().await.unwrap();
        let mut raw = vec![];
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&gz[..]), &mut raw)
            .unwrap_or_else(|e| panic!("{l} is not gzip: {e}"));
        out.push(sha256_digest(&raw));
    }
    out
}

fn diff_ids(config: &Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

fn recorded_bases(build: &Value) -> Value {
    build["jobs"][0]["base_images"].clone()
}

#[tokio::test]
async fn rebuild_settings_are_validated_and_changed_by_repository_admins() {
    let app = start_app().await;
    create_repository(&app, "admin/app").await;
    let r = app
        .req(
            Method::POST,
            "/api/v1/repositories/admin/app/build-definitions",
        )
        .json(&json!({"name": "bad", "git_url": "https://git.example/a.git", "base_check_schedule": "every minute"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a cron expression with seconds"),
        "{v}"
    );
    let r = app
        .req(
            Method::POST,
            "/api/v1/repositories/admin/app/build-definitions",
        )
        .json(&json!({"name": "main", "git_url": "https://git.example/a.git"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let def: Value = r.json().await.unwrap();
    assert_eq!(def["auto_rebuild"], true);
    assert_eq!(def["base_check_schedule"], Value::Null);
    let path = format!("/api/v1/build-definitions/{}", def["id"].as_str().unwrap());
    let patch = |body: Value| app.req(Method::PATCH, &path).json(&body).send();
    // A bad schedule changes nothing, the switch included.
    // Five fields (no seconds) is the usual mistake.
    for bad in ["* * * * *", "", "61 * * * * *"] {
        let r = patch(json!({"auto_rebuild": false, "base_check_schedule": bad}))
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad:?}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("base_check_schedule"),
            "{v}"
        );
    }
    let v: Value = app.get(&path).await.json().await.unwrap();
    assert_eq!(v["auto_rebuild"], true);
    let r = patch(json!({"base_check_schedule": "*/5 * * * * *"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["base_check_schedule"], "*/5 * * * * *");
    assert_eq!(v["auto_rebuild"], true, "absent fields are kept");
    let r = patch(json!({"auto_rebuild": false})).await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["auto_rebuild"], false);
    assert_eq!(v["base_check_schedule"], "*/5 * * * * *");
    let r = patch(json!({"base_check_schedule": null})).await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["base_check_schedule"], Value::Null, "null clears it");
    let v: Value = app.get(&path).await.json().await.unwrap();
    assert_eq!(v["auto_rebuild"], false);
    assert_eq!(v["base_check_schedule"], Value::Null);
    // Unknown fields and definitions are refused.
    let r = patch(json!({"git_url": "https://elsewhere"}))
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let r = app
        .req(Method::PATCH, "/api/v1/build-definitions/nope")
        .json(&json!({"auto_rebuild": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The listing starts empty; its page size is checked.
    assert_eq!(rebuilds_of(&app, "admin/app").await, Vec::<Value>::new());
    let r = app
        .get("/api/v1/repositories/admin/app/builds/rebuilds?n=0")
        .await;
    assert_eq!(r.status(), 400);
}

/// Two pushes of the base within the debounce window: one rebuild of the
/// dependent, from the last one; a definition switched off is left alone.
#[tokio::test]
async fn a_moved_base_rebuilds_its_dependents_once_and_not_those_switched_off() {
    require_engine();
    let app = start_app().await;
    let v1 = push_local(&app, "library/base", "1", "v1").await;
    let _exec = Executor::start(&app, "node", "linux/amd64", 2).await;
    let src = tempfile::tempdir().unwrap();
    git_repo(
        src.path(),
        &[
            (
                "Dockerfile",
                &format!(
                    "FROM {}/library/base:1\nCOPY app.txt /app.txt\n",
                    host(&app)
                ),
            ),
            ("app.txt", "the app\n"),
        ],
    );
    create_repository(&app, "admin/app").await;
    create_repository(&app, "admin/quiet").await;
    let app_def = create_definition(&app, "admin/app", src.path(), json!({})).await;
    assert_eq!(app_def["auto_rebuild"], true);
    let quiet_def = create_definition(&app, "admin/quiet", src.path(), json!({})).await;
    let r = app
        .req(
            Method::PATCH,
            &format!(
                "/api/v1/build-definitions/{}",
                quiet_def["id"].as_str().unwrap()
            ),
        )
        .json(&json!({"auto_rebuild": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["auto_rebuild"], false);
    let first = run_and_wait(&app, &app_def).await;
    let first = build_detail(&app, first["id"].as_str().unwrap()).await;
    assert_eq!(
        recorded_bases(&first),
        json!([{"reference": format!("{}/library/base:1", host(&app)), "digest": v1.digest}])
    );
    run_and_wait(&app, &quiet_def).await;

    // Two pushes in the window.
    let v2a = push_local(&app, "library/base", "1", "v2a").await;
    let v2 = push_local(&app, "library/base", "1", "v2").await;
    assert_ne!(v2a.digest, v2.digest);
    let rebuilt = wait_rebuilt(&app, "admin/app", 60).await;
    assert_eq!(rebuilt["trigger_kind"], "base_image");
    assert_eq!(
        rebuilt["trigger_detail"],
        format!(
            "base image library/base:1 moved from {} to {}",
            v1.digest, v2.digest
        )
    );
    assert_eq!(rebuilt["git_ref"], "refs/heads/main");
    assert_eq!(rebuilt["tags"], json!(["main"]));
    assert_eq!(
        recorded_bases(&rebuilt),
        json!([{"reference": format!("{}/library/base:1", host(&app)), "digest": v2.digest}])
    );
    // The new image is built on v2: its layers, not v1's own one.
    let (config, layers) = image(&app, "admin/app", "main").await;
    let ids = diff_ids(&config);
    assert_eq!(&ids[..2], &v2.diff_ids[..], "{config:#}");
    assert!(!ids.contains(&v1.diff_ids[1]), "{config:#}");
    assert!(!ids.contains(&v2a.diff_ids[1]), "{config:#}");
    // The engine recompresses layers when it pushes, so the manifest's
    // layers are compared by content: each blob, uncompressed, is hashed.
    let contents = uncompressed(&app, "admin/app", &layers).await;
    assert_eq!(contents, ids, "the manifest's layers are the config's");
    assert_eq!(&contents[..2], &v2.diff_ids[..]);
    assert!(!contents.contains(&v1.diff_ids[1]));
    assert!(!layers.contains(&v1.layers[1]), "{layers:?}");
    assert_ne!(rebuilt["manifest_digest"], first["manifest_digest"]);

    // The decision is on record.
    let records = rebuilds_of(&app, "admin/app").await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["state"], "started", "{r:#}");
    assert_eq!(r["build_id"], rebuilt["id"]);
    assert_eq!(r["definition_id"], app_def["id"]);
    assert_eq!(r["definition_name"], "main");
    assert_eq!(
        r["base_reference"],
        format!("{}/library/base:1", host(&app))
    );
    assert_eq!(r["from_digest"], v1.digest);
    assert_eq!(r["to_digest"], v2.digest);

    // Exactly one rebuild, even after the window; the rebuild's own push
    // (app:main) has no dependents; the switched-off definition built
    // nothing more.
    tokio::time::sleep(DEBOUNCE + Duration::from_secs(2)).await;
    assert_eq!(base_image_builds(&app, "admin/app").await.len(), 1);
    assert_eq!(builds_of(&app, "admin/app").await.len(), 2);
    assert_eq!(builds_of(&app, "admin/quiet").await.len(), 1);
    assert_eq!(rebuilds_of(&app, "admin/quiet").await, Vec::<Value>::new());
}

/// base → middle → app: middle is rebuilt first, and app afterwards FROM
/// the new middle. A definition built FROM both base and middle (a
/// diamond) waits for middle too, and is rebuilt once, from both.
#[tokio::test]
async fn a_chain_is_rebuilt_in_dependency_order() {
    require_engine();
    let app = start_app().await;
    let v1 = push_local(&app, "library/base", "1", "v1").await;
    let _exec = Executor::start(&app, "node", "linux/amd64", 2).await;
    let middle_src = tempfile::tempdir().unwrap();
    git_repo(
        middle_src.path(),
        &[
            (
                "Dockerfile",
                &format!(
                    "FROM {}/library/base:1\nCOPY middle.txt /middle.txt\n",
                    host(&app)
                ),
            ),
            ("middle.txt", "middle\n"),
        ],
    );
    let app_src = tempfile::tempdir().unwrap();
    git_repo(
        app_src.path(),
        &[
            (
                "Dockerfile",
                &format!(
                    "FROM {}/admin/middle:1\nCOPY app.txt /app.txt\n",
                    host(&app)
                ),
            ),
            ("app.txt", "app\n"),
        ],
    );
    let both_src = tempfile::tempdir().unwrap();
    git_repo(
        both_src.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM {h}/library/base:1 AS base
FROM {h}/admin/middle:1
\
                 COPY --from=base /base-version.txt /from-base.txt
",
                h = host(&app)
            ),
        )],
    );
    create_repository(&app, "admin/middle").await;
    create_repository(&app, "admin/app").await;
    create_repository(&app, "admin/both").await;
    let middle_def = create_definition(
        &app,
        "admin/middle",
        middle_src.path(),
        json!({"tag_templates": ["1"]}),
    )
    .await;
    let app_def = create_definition(&app, "admin/app", app_src.path(), json!({})).await;
    let both_def = create_definition(&app, "admin/both", both_src.path(), json!({})).await;
    let middle_first = run_and_wait(&app, &middle_def).await;
    let app_first = build_detail(
        &app,
        run_and_wait(&app, &app_def).await["id"].as_str().unwrap(),
    )
    .await;
    let both_first = build_detail(
        &app,
        run_and_wait(&app, &both_def).await["id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        recorded_bases(&both_first).as_array().unwrap().len(),
        2,
        "{both_first:#}"
    );
    assert_eq!(
        recorded_bases(&app_first)[0]["digest"],
        middle_first["manifest_digest"]
    );

    let v2 = push_local(&app, "library/base", "1", "v2").await;
    let middle = wait_rebuilt(&app, "admin/middle", 60).await;
    assert_eq!(
        middle["trigger_detail"],
        format!(
            "base image library/base:1 moved from {} to {}",
            v1.digest, v2.digest
        )
    );
    let app_rebuilt = wait_rebuilt(&app, "admin/app", 60).await;
    assert!(
        app_rebuilt["created_at"].as_i64().unwrap() >= middle["finished_at"].as_i64().unwrap(),
        "app was rebuilt before middle's rebuild ended:\nmiddle {middle:#}\napp {app_rebuilt:#}"
    );
    let middle_new = middle["manifest_digest"].as_str().unwrap();
    assert_ne!(
        middle_new,
        middle_first["manifest_digest"].as_str().unwrap()
    );
    assert_eq!(
        app_rebuilt["trigger_detail"],
        format!(
            "base image admin/middle:1 moved from {} to {middle_new}",
            middle_first["manifest_digest"].as_str().unwrap()
        )
    );
    assert_eq!(
        recorded_bases(&app_rebuilt),
        json!([{"reference": format!("{}/admin/middle:1", host(&app)), "digest": middle_new}])
    );
    // app now stands on v2, through middle.
    let (config, layers) = image(&app, "admin/app", "main").await;
    let ids = diff_ids(&config);
    assert_eq!(uncompressed(&app, "admin/app", &layers).await, ids);
    assert_eq!(&ids[..2], &v2.diff_ids[..], "{config:#}");
    assert!(!ids.contains(&v1.diff_ids[1]), "{config:#}");

    // The diamond: both bases moved; one rebuild, after middle's.
    let both = wait_rebuilt(&app, "admin/both", 60).await;
    assert!(
        both["created_at"].as_i64().unwrap() >= middle["finished_at"].as_i64().unwrap(),
        "both was rebuilt before middle's rebuild ended:\nmiddle {middle:#}\nboth {both:#}"
    );
    assert_eq!(
        both["trigger_detail"],
        format!(
            "base image library/base:1 moved from {} to {}; \
             base image admin/middle:1 moved from {} to {middle_new}",
            v1.digest,
            v2.digest,
            middle_first["manifest_digest"].as_str().unwrap()
        )
    );
    let mut bases = recorded_bases(&both).as_array().unwrap().clone();
    bases.sort_by_key(|b| b["reference"].as_str().unwrap().to_string());
    assert_eq!(
        bases,
        [
            json!({"reference": format!("{}/admin/middle:1", host(&app)), "digest": middle_new}),
            json!({"reference": format!("{}/library/base:1", host(&app)), "digest": v2.digest}),
        ]
    );
    let records = rebuilds_of(&app, "admin/both").await;
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(r["state"], "started", "{r:#}");
        assert_eq!(r["build_id"], both["id"]);
    }

    tokio::time::sleep(DEBOUNCE + Duration::from_secs(2)).await;
    assert_eq!(base_image_builds(&app, "admin/middle").await.len(), 1);
    assert_eq!(base_image_builds(&app, "admin/app").await.len(), 1);
    assert_eq!(base_image_builds(&app, "admin/both").await.len(), 1);
}

/// a:1 FROM b:1 and b:1 FROM a:1: the rebuild is refused, naming the
/// cycle, and nothing more is built.
#[tokio::test]
async fn a_dependency_cycle_is_refused() {
    require_engine();
    let app = start_app().await;
    push_local(&app, "library/base", "1", "v1").await;
    let _exec = Executor::start(&app, "node", "linux/amd64", 2).await;
    let h = host(&app);
    let a_src = tempfile::tempdir().unwrap();
    git_repo(
        a_src.path(),
        &[
            (
                "Dockerfile",
                &format!("FROM {h}/library/base:1\nCOPY a.txt /a.txt\n"),
            ),
            ("a.txt", "a\n"),
        ],
    );
    let b_src = tempfile::tempdir().unwrap();
    git_repo(
        b_src.path(),
        &[
            (
                "Dockerfile",
                &format!("FROM {h}/admin/a:1\nCOPY b.txt /b.txt\n"),
            ),
            ("b.txt", "b\n"),
        ],
    );
    create_repository(&app, "admin/a").await;
    create_repository(&app, "admin/b").await;
    let a_def = create_definition(
        &app,
        "admin/a",
        a_src.path(),
        json!({"tag_templates": ["1"]}),
    )
    .await;
    let b_def = create_definition(
        &app,
        "admin/b",
        b_src.path(),
        json!({"tag_templates": ["1"]}),
    )
    .await;
    run_and_wait(&app, &a_def).await;
    run_and_wait(&app, &b_def).await;
    // A now builds FROM b:1; its manual run moves a:1, which b is built FROM.
    std::fs::write(
        a_src.path().join("Dockerfile"),
        format!("FROM {h}/admin/b:1\nCOPY a.txt /a.txt\n"),
    )
    .unwrap();
    git(a_src.path(), &["commit", "-q", "-am", "FROM b"]);
    run_and_wait(&app, &a_def).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let records = rebuilds_of(&app, "admin/b").await;
        if let Some(r) = records.iter().find(|r| r["state"] != "pending") {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "no decision: {records:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(refused["state"], "refused", "{refused:#}");
    assert_eq!(refused["build_id"], Value::Null);
    assert_eq!(
        refused["message"],
        "cycle: admin/b → admin/a → admin/b (each is built FROM the next); not rebuilt",
        "{refused:#}"
    );
    assert_eq!(refused["base_reference"], format!("{h}/admin/a:1"));
    tokio::time::sleep(DEBOUNCE + Duration::from_secs(2)).await;
    assert_eq!(builds_of(&app, "admin/a").await.len(), 2);
    assert_eq!(builds_of(&app, "admin/b").await.len(), 1);
    assert_eq!(rebuilds_of(&app, "admin/a").await, Vec::<Value>::new());
    assert_eq!(rebuilds_of(&app, "admin/b").await.len(), 1);
}

/// CNCF Distribution on a loopback port, killed when dropped.
struct Distribution {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    host: String,
}

impl Distribution {
    async fn start() -> Distribution {
        const BIN: &str = "/usr/bin/docker-registry";
        assert!(
            std::path::Path::new(BIN).is_file(),
            "{BIN} is missing: install the Debian package `docker-registry` (`cargo xtask test` does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let mut cmd = tokio::process::Command::new(BIN);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start docker-registry");
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = Client::new().get(format!("http://{host}/v2/")).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start: {}",
                std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Distribution {
            _child: child,
            _dir: dir,
            host,
        }
    }
}

/// A base in another registry: checked on the definition's own schedule,
/// and its move rebuilds the dependent.
#[tokio::test]
async fn a_base_moved_in_an_upstream_registry_is_noticed_on_schedule() {
    require_engine();
    let upstream = Distribution::start().await;
    let up = format!("http://{}", upstream.host);
    let anon = Client::new();
    let v1 = push_version(&anon, &up, "lib/base", "1", "v1").await;
    let app = start_app().await;
    let _exec = Executor::start(&app, "node", "linux/amd64", 1).await;
    let reference = format!("{}/lib/base:1", upstream.host);
    let src = tempfile::tempdir().unwrap();
    git_repo(
        src.path(),
        &[
            (
                "Dockerfile",
                &format!("FROM {reference}\nCOPY app.txt /app.txt\n"),
            ),
            ("app.txt", "app\n"),
        ],
    );
    create_repository(&app, "admin/app").await;
    let def = create_definition(&app, "admin/app", src.path(), json!({})).await;
    let first = run_and_wait(&app, &def).await;
    let first = build_detail(&app, first["id"].as_str().unwrap()).await;
    assert_eq!(
        recorded_bases(&first),
        json!([{"reference": reference, "digest": v1.digest}])
    );
    let r = app
        .req(
            Method::PATCH,
            &format!("/api/v1/build-definitions/{}", def["id"].as_str().unwrap()),
        )
        .json(&json!({"base_check_schedule": "* * * * * *"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["base_check_schedule"],
        "* * * * * *"
    );
    // A check sees v1 (within a second or so): no rebuild for a base that
    // did not move.
    wait_upstream(&app, &reference, |(digest, _)| {
        digest.as_deref() == Some(v1.digest.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rebuilds_of(&app, "admin/app").await, Vec::<Value>::new());
    assert_eq!(base_image_builds(&app, "admin/app").await.len(), 0);

    let v2 = push_version(&anon, &up, "lib/base", "1", "v2").await;
    let rebuilt = wait_rebuilt(&app, "admin/app", 60).await;
    assert_eq!(
        rebuilt["trigger_detail"],
        format!(
            "base image {reference} moved from {} to {}",
            v1.digest, v2.digest
        )
    );
    assert_eq!(
        recorded_bases(&rebuilt),
        json!([{"reference": reference, "digest": v2.digest}])
    );
    let (config, layers) = image(&app, "admin/app", "main").await;
    let ids = diff_ids(&config);
    assert_eq!(uncompressed(&app, "admin/app", &layers).await, ids);
    assert_eq!(&ids[..2], &v2.diff_ids[..], "{config:#}");
    let records = rebuilds_of(&app, "admin/app").await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["state"], "started");
    assert_eq!(records[0]["build_id"], rebuilt["id"]);
    assert_eq!(records[0]["base_reference"], reference);
    // Checks go on every second; the base stays put: nothing more.
    tokio::time::sleep(DEBOUNCE + Duration::from_secs(2)).await;
    assert_eq!(base_image_builds(&app, "admin/app").await.len(), 1);
    // The upstream goes away: the failure is recorded, the last digest
    // kept, and nothing is rebuilt.
    drop(upstream);
    let (digest, error) = wait_upstream(&app, &reference, |(_, e)| e.is_some()).await;
    assert_eq!(digest.as_deref(), Some(v2.digest.as_str()));
    assert!(!error.unwrap().is_empty());
    assert_eq!(base_image_builds(&app, "admin/app").await.len(), 1);
    assert_eq!(rebuilds_of(&app, "admin/app").await.len(), 1);
}

/// What the server last saw of an upstream base, `(digest, last_error)`,
/// once `ready` says so (read from its database: it is not in the API).
async fn wait_upstream(
    app: &TestApp,
    reference: &str,
    ready: impl Fn(&(Option<String>, Option<String>)) -> bool,
) -> (Option<String>, Option<String>) {
    use sqlx::Row;
    let db = dockyard_core::Db::connect(&app.config.database_url(), 2)
        .await
        .expect("open the test database");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen =
            sqlx::query("SELECT digest, last_error FROM upstream_bases WHERE reference = $1")
                .bind(reference)
                .fetch_optional(&db.read)
                .await
                .unwrap()
                .map(|r| (r.try_get(0).unwrap(), r.try_get(1).unwrap()));
        if let Some(seen) = seen
            && ready(&seen)
        {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "upstream base {reference}: not there in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
