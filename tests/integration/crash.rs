//! Crash safety: a server killed with SIGKILL at arbitrary moments during
//! pushes never leaves a manifest that references a missing or corrupt blob,
//! and a restarted server serves everything it acknowledged.

use std::process::Stdio;
use std::time::Duration;

use dockyard_oci::Digest;
use serde_json::{Value, json};

struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data: &std::path::Path, port: u16) -> Server {
    let mut c = crate::harness::dockyard_command();
    Server(
        c.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data)
        .env("DOCKYARD_LOG_LEVEL", "warn")
        .env("DOCKYARD_BOOTSTRAP_ADMIN", crate::harness::admin_pair())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    )
}

async fn wait_up(client: &reqwest::Client, base: &str) {
    for _ in 0..100 {
        if client.get(format!("{base}/v2/")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not start");
}

/// Pushes one image with two ~512 KiB layers; errors (the server dying) end
/// the attempt. Returns the manifest digest when the server acknowledged it.
async fn push_one(client: &reqwest::Client, base: &str, i: u64) -> Option<Digest> {
    let mut descs = vec![];
    let mut blobs = vec![];
    for l in 0..2u64 {
        let data: Vec<u8> = (0..512 * 1024u64)
            .map(|b| ((b * 31 + i * 7 + l) % 251) as u8)
            .collect();
        blobs.push(data);
    }
    let config = json!({"architecture": "amd64", "os": "linux", "i": i})
        .to_string()
        .into_bytes();
    blobs.push(config);
    for b in &blobs {
        let d = Digest::sha256(b);
        let r = client
            .post(format!("{base}/v2/crash/app/blobs/uploads/"))
            .send()
            .await
            .ok()?;
        let loc = r.headers().get("location")?.to_str().ok()?.to_string();
        let r = client
            .patch(format!("{base}{loc}"))
            .body(b.clone())
            .send()
            .await
            .ok()?;
        let loc = r.headers().get("location")?.to_str().ok()?.to_string();
        let r = client
            .put(format!("{base}{loc}?digest={d}"))
            .send()
            .await
            .ok()?;
        if r.status() != 201 {
            return None;
        }
        descs.push((d, b.len()));
    }
    let (cd, cl) = descs.pop().unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cl},
        "layers": descs.iter().map(|(d, l)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": l})).collect::<Vec<_>>(),
    })
    .to_string();
    let r = client
        .put(format!("{base}/v2/crash/app/manifests/t{i}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .ok()?;
    (r.status() == 201).then(|| Digest::sha256(manifest.as_bytes()))
}

#[tokio::test]
async fn sigkill_during_pushes_never_leaves_dangling_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        crate::harness::admin_basic().parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(auth)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut acknowledged = vec![];
    let mut i = 0u64;
    for round in 0..4u64 {
        let server = start(dir.path(), port);
        wait_up(&client, &base).await;
        let pushes = {
            let client = client.clone();
            let base = base.clone();
            let start_i = i;
            tokio::spawn(async move {
                let mut acked = vec![];
                let mut j = start_i;
                loop {
                    let (a, b) =
                        tokio::join!(push_one(&client, &base, j), push_one(&client, &base, j + 1));
                    let mut any = false;
                    for (k, r) in [(j, a), (j + 1, b)] {
                        if let Some(d) = r {
                            acked.push((k, d));
                            any = true;
                        }
                    }
                    j += 2;
                    if !any {
                        return (acked, j);
                    }
                }
            })
        };
        // Kill at a different moment each round, mid-traffic.
        tokio::time::sleep(Duration::from_millis(300 + round * 170)).await;
        drop(server);
        let (acked, next) = pushes.await.unwrap();
        acknowledged.extend(acked);
        i = next;
    }
    let _server = start(dir.path(), port);
    wait_up(&client, &base).await;
    assert!(
        !acknowledged.is_empty(),
        "no push completed before the kills"
    );
    // Everything acknowledged is there.
    for (k, d) in &acknowledged {
        let r = client
            .get(format!("{base}/v2/crash/app/manifests/t{k}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged manifest t{k} lost");
        assert_eq!(
            r.headers()["docker-content-digest"].to_str().unwrap(),
            d.to_string()
        );
    }
    // Every manifest that exists, acknowledged or not, is complete.
    let tags: Value = client
        .get(format!("{base}/v2/crash/app/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tags = tags["tags"].as_array().unwrap();
    assert!(tags.len() >= acknowledged.len());
    for t in tags {
        let m: Value = client
            .get(format!(
                "{base}/v2/crash/app/manifests/{}",
                t.as_str().unwrap()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut descs = vec![m["config"].clone()];
        descs.extend(m["layers"].as_array().unwrap().iter().cloned());
        for desc in descs {
            let d = desc["digest"].as_str().unwrap();
            let r = client
                .get(format!("{base}/v2/crash/app/blobs/{d}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "manifest {t} references missing blob {d}");
            let bytes = r.bytes().await.unwrap();
            assert_eq!(Digest::sha256(&bytes).to_string(), d, "blob {d} is corrupt");
            assert_eq!(bytes.len() as u64, desc["size"].as_u64().unwrap());
        }
    }
    // Each change was committed with its event: every tag that exists has
    // exactly one tag.created event with its digest, and no event names a
    // tag that does not exist.
    let mut created = std::collections::BTreeMap::new();
    let mut after = 0;
    loop {
        let page: Value = client
            .get(format!(
                "{base}/api/v1/repositories/crash/app/events?n=1000&after={after}"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        for e in events {
            if e["type"] == "tag.created" {
                let t = e["tag"].as_str().unwrap().to_string();
                assert!(
                    created.insert(t.clone(), e["digest"].clone()).is_none(),
                    "two tag.created events for {t}"
                );
            }
        }
        after = page["next"].as_i64().unwrap();
    }
    assert_eq!(
        created.len(),
        tags.len(),
        "tags and tag.created events differ"
    );
    for t in tags {
        let t = t.as_str().unwrap();
        let r = client
            .head(format!("{base}/v2/crash/app/manifests/{t}"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        assert_eq!(
            created.get(t).and_then(Value::as_str),
            r.headers()["docker-content-digest"].to_str().ok(),
            "tag {t} has no matching event"
        );
    }
}
