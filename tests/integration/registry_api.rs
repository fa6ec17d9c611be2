//! The Distribution API, endpoint by endpoint, against the real server:
//! success paths, the spec's error codes, and robustness (restart, client
//! disconnects, concurrency, adversarial input).

use std::time::Duration;

use dockyard_oci::{Algorithm, Digest};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test]
async fn base_endpoint_and_headers() {
    let app = TestApp::start().await;
    let r = app.get("/v2/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    assert!(header(&r, "x-request-id").is_some());
    assert_eq!(app.get("/v2").await.status(), 200);
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
    let r = app.get("/v2/a/b").await;
    assert_error(r, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn monolithic_push_then_head_get_and_range() {
    let app = TestApp::start().await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = app.push_blob("lib/mono", &data).await;

    let r = app
        .req(Method::HEAD, &format!("/v2/lib/mono/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length").as_deref(), Some("100000"));
    assert_eq!(header(&r, "docker-content-digest"), Some(d.to_string()));

    let r = app.get(&format!("/v2/lib/mono/blobs/{d}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    let r = app
        .req(Method::GET, &format!("/v2/lib/mono/blobs/{d}"))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range").as_deref(),
        Some("bytes 10-19/100000")
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);

    let r = app
        .req(Method::GET, &format!("/v2/lib/mono/blobs/{d}"))
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[99_995..]);

    let r = app
        .req(Method::GET, &format!("/v2/lib/mono/blobs/{d}"))
        .header("range", "bytes=200000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        header(&r, "content-range").as_deref(),
        Some("bytes */100000")
    );

    // Blobs are per repository: another repository does not see it.
    let r = app.get(&format!("/v2/lib/other/blobs/{d}")).await;
    assert_error(r, 404, "BLOB_UNKNOWN").await;
    let r = app
        .req(Method::HEAD, &format!("/v2/lib/other/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn single_post_with_digest() {
    let app = TestApp::start().await;
    let data = b"single post".to_vec();
    let d = Digest::sha256(&data);
    let r = app
        .req(Method::POST, &format!("/v2/one/blobs/uploads/?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/one/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), Some(d.to_string()));
    assert_eq!(
        app.get(&format!("/v2/one/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        &data[..]
    );

    // The same with a wrong digest leaves nothing behind.
    let wrong = Digest::sha256(b"other");
    let r = app
        .req(
            Method::POST,
            &format!("/v2/one/blobs/uploads/?digest={wrong}"),
        )
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "DIGEST_INVALID").await;
    let r = app
        .req(Method::HEAD, &format!("/v2/one/blobs/{wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

async fn start_upload(app: &TestApp, repo: &str) -> String {
    let r = app
        .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range").as_deref(), Some("0-0"));
    assert!(header(&r, "docker-upload-uuid").is_some());
    assert_eq!(header(&r, "content-length").as_deref(), Some("0"));
    location(&r)
}

async fn patch(
    app: &TestApp,
    loc: &str,
    range: Option<(u64, u64)>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut req = app
        .client
        .patch(app.abs(loc))
        .header("content-type", "application/octet-stream");
    if let Some((a, b)) = range {
        req = req.header("content-range", format!("{a}-{b}"));
    }
    req.body(body).send().await.unwrap()
}

#[tokio::test]
async fn chunked_upload_with_status_and_out_of_order_chunk() {
    let app = TestApp::start().await;
    let data: Vec<u8> = (0..30_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let d = Digest::sha256(&data);
    let loc = start_upload(&app, "chunks").await;

    let r = patch(&app, &loc, Some((0, 9_999)), data[..10_000].to_vec()).await;
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range").as_deref(), Some("0-9999"));
    let loc = location(&r);

    // Out of order: starts past the end.
    let r = patch(&app, &loc, Some((20_000, 29_999)), data[20_000..].to_vec()).await;
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "range").as_deref(), Some("0-9999"));
    // Overlapping: starts before the end.
    let r = patch(
        &app,
        &loc,
        Some((5_000, 14_999)),
        data[5_000..15_000].to_vec(),
    )
    .await;
    assert_eq!(r.status(), 416);
    // Malformed Content-Range.
    let r = app
        .client
        .patch(app.abs(&loc))
        .header("content-range", "bytes=abc")
        .body(vec![1u8])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    // Content-Range disagreeing with the body length.
    let r = patch(&app, &loc, Some((10_000, 10_009)), vec![0u8; 3]).await;
    assert_error(r, 400, "SIZE_INVALID").await;

    let r = app.get(&loc).await;
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range").as_deref(), Some("0-9999"));

    let r = patch(
        &app,
        &loc,
        Some((10_000, 19_999)),
        data[10_000..20_000].to_vec(),
    )
    .await;
    assert_eq!(r.status(), 202);
    // A streamed chunk (no Content-Range) continues at the end.
    let r = patch(&app, &location(&r), None, data[20_000..25_000].to_vec()).await;
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range").as_deref(), Some("0-24999"));
    // The last chunk travels with the PUT.
    let r = app
        .client
        .put(format!("{}?digest={d}", app.abs(&location(&r))))
        .header("content-range", "25000-29999")
        .body(data[25_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let got = app
        .get(&format!("/v2/chunks/blobs/{d}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), &data[..]);
    // The session is gone once completed.
    assert_error(app.get(&loc).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
}

#[tokio::test]
async fn upload_errors() {
    let app = TestApp::start().await;
    let loc = start_upload(&app, "errs").await;
    // PUT without digest, with a malformed one, and with an unsupported algorithm.
    assert_error(
        app.client.put(app.abs(&loc)).send().await.unwrap(),
        400,
        "DIGEST_INVALID",
    )
    .await;
    assert_error(
        app.client
            .put(format!("{}?digest=sha256:xyz", app.abs(&loc)))
            .send()
            .await
            .unwrap(),
        400,
        "DIGEST_INVALID",
    )
    .await;
    assert_error(
        app.client
            .put(format!(
                "{}?digest=md5:d41d8cd98f00b204e9800998ecf8427e",
                app.abs(&loc)
            ))
            .send()
            .await
            .unwrap(),
        400,
        "DIGEST_INVALID",
    )
    .await;
    // Wrong digest: refused, session dropped, nothing visible.
    let r = patch(&app, &loc, None, b"abc".to_vec()).await;
    assert_eq!(r.status(), 202);
    let wrong = Digest::sha256(b"abd");
    let r = app
        .client
        .put(format!("{}?digest={wrong}", app.abs(&loc)))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "DIGEST_INVALID").await;
    assert_eq!(
        app.req(Method::HEAD, &format!("/v2/errs/blobs/{wrong}"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        app.req(
            Method::HEAD,
            &format!("/v2/errs/blobs/{}", Digest::sha256(b"abc"))
        )
        .send()
        .await
        .unwrap()
        .status(),
        404
    );
    // Unknown sessions, and sessions addressed through another repository.
    assert_error(
        app.get("/v2/errs/blobs/uploads/nope").await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    let loc2 = start_upload(&app, "errs").await;
    let id = loc2.rsplit('/').next().unwrap();
    assert_error(
        app.get(&format!("/v2/other/blobs/uploads/{id}")).await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    assert_error(
        app.get("/v2/errs/blobs/uploads/..%2f..%2fetc").await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    // Cancel.
    let r = app.req(Method::DELETE, &loc2).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_error(app.get(&loc2).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    assert_error(
        app.req(Method::DELETE, &loc2).send().await.unwrap(),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn sha512_blobs() {
    let app = TestApp::start().await;
    let data = b"five hundred and twelve".to_vec();
    let d = Digest::compute(Algorithm::Sha512, &data);
    let loc = start_upload(&app, "s512").await;
    let r = patch(&app, &loc, None, data.clone()).await;
    let r = app
        .client
        .put(format!("{}?digest={d}", app.abs(&location(&r))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app.get(&format!("/v2/s512/blobs/{d}")).await;
    assert_eq!(header(&r, "docker-content-digest"), Some(d.to_string()));
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
}

#[tokio::test]
async fn cross_repository_mount() {
    let app = TestApp::start().await;
    let d = app.push_blob("src/repo", b"mount me").await;
    let r = app
        .req(
            Method::POST,
            &format!("/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/dst/repo/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), Some(d.to_string()));
    assert_eq!(
        app.get(&format!("/v2/dst/repo/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        b"mount me"
    );
    // Not in the source: a normal upload session instead.
    let missing = Digest::sha256(b"absent");
    let r = app
        .req(
            Method::POST,
            &format!("/v2/dst/repo/blobs/uploads/?mount={missing}&from=src/repo"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(location(&r).starts_with("/v2/dst/repo/blobs/uploads/"));
    // Blobs are stored once whatever the number of repositories.
    let mut files = 0;
    for e in walk(&app.storage_path().join("docker/registry/v2/blobs")) {
        if e.ends_with("data") {
            files += 1;
        }
    }
    if app.config.storage.kind == dockyard_core::config::StorageKind::Filesystem {
        assert_eq!(files, 1);
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn upload_survives_restart() {
    let app = TestApp::start().await;
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 13) as u8).collect();
    let d = Digest::sha256(&data);
    let loc = start_upload(&app, "restart/me").await;
    let r = patch(&app, &loc, Some((0, 24_999)), data[..25_000].to_vec()).await;
    assert_eq!(r.status(), 202);
    let loc = location(&r);
    let app = app.restart().await;
    let r = app.get(&loc).await;
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range").as_deref(), Some("0-24999"));
    let r = patch(&app, &loc, Some((25_000, 49_999)), data[25_000..].to_vec()).await;
    assert_eq!(r.status(), 202);
    let r = app
        .client
        .put(format!("{}?digest={d}", app.abs(&location(&r))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        app.get(&format!("/v2/restart/me/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        &data[..]
    );
}

#[tokio::test]
async fn client_disconnect_mid_upload_leaves_nothing() {
    let app = TestApp::start().await;
    let loc = start_upload(&app, "cut").await;
    // Announce 1 MiB, send 100 KiB, hang up.
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n",
        app.addr
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![7u8; 100 * 1024]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = app.get(&loc).await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        header(&r, "range").as_deref(),
        Some("0-0"),
        "no partial chunk is accepted"
    );
    // The session still works afterwards.
    let data = vec![7u8; 1000];
    let d = Digest::sha256(&data);
    let r = patch(&app, &loc, None, data).await;
    assert_eq!(r.status(), 202);
    let r = app
        .client
        .put(format!("{}?digest={d}", app.abs(&loc)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let partial = Digest::sha256(&vec![7u8; 100 * 1024]);
    assert_eq!(
        app.req(Method::HEAD, &format!("/v2/cut/blobs/{partial}"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn manifests_by_tag_and_digest_with_accept() {
    let app = TestApp::start().await;
    let (d, body) = app
        .push_image("img/app", "v1", &[b"layer one", b"layer two"])
        .await;
    for path in [
        "/v2/img/app/manifests/v1".to_string(),
        format!("/v2/img/app/manifests/{d}"),
    ] {
        let r = app.get(&path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_MANIFEST));
        assert_eq!(header(&r, "docker-content-digest"), Some(d.to_string()));
        assert_eq!(header(&r, "content-length"), Some(body.len().to_string()));
        assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
        let r = app.req(Method::HEAD, &path).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-length"), Some(body.len().to_string()));
        assert_eq!(header(&r, "docker-content-digest"), Some(d.to_string()));
    }
    let r = app
        .req(Method::GET, "/v2/img/app/manifests/v1")
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .req(Method::GET, "/v2/img/app/manifests/v1")
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "MANIFEST_UNKNOWN").await;
    assert_error(
        app.get("/v2/img/app/manifests/v2").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_error(
        app.get(&format!("/v2/img/app/manifests/{}", Digest::sha256(b"x")))
            .await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    // Manifests are content: also served through the blob endpoint.
    let r = app.get(&format!("/v2/img/app/blobs/{d}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    // Moving a tag.
    let (d2, _) = app.push_image("img/app", "v1", &[b"layer three"]).await;
    let r = app.get("/v2/img/app/manifests/v1").await;
    assert_eq!(header(&r, "docker-content-digest"), Some(d2.to_string()));
    // Pushing by digest.
    let r = app
        .req(Method::PUT, &format!("/v2/img/app/manifests/{d}"))
        .header("content-type", OCI_MANIFEST)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/img/app/manifests/{d}"));
}

#[tokio::test]
async fn docker_schema2_and_manifest_list() {
    let app = TestApp::start().await;
    let cfg = br#"{"architecture":"amd64","os":"linux"}"#;
    let c = app.push_blob("dk", cfg).await;
    let l = app.push_blob("dk", b"docker layer").await;
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": c.to_string(), "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": l.to_string(), "size": 12}]
    });
    let (md, mb) = app
        .put_manifest(
            "dk",
            "amd64",
            "application/vnd.docker.distribution.manifest.v2+json",
            &m,
        )
        .await;
    let list = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [{"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": md.to_string(), "size": mb.len(), "platform": {"architecture": "amd64", "os": "linux"}}]
    });
    let (ld, _) = app
        .put_manifest(
            "dk",
            "latest",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            &list,
        )
        .await;
    let r = app.get("/v2/dk/manifests/latest").await;
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/vnd.docker.distribution.manifest.list.v2+json")
    );
    assert_eq!(header(&r, "docker-content-digest"), Some(ld.to_string()));
    // An OCI index with an unknown child is refused.
    let bad = json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": Digest::sha256(b"nope").to_string(), "size": 10}]
    });
    let r = app
        .req(Method::PUT, "/v2/dk/manifests/bad")
        .header("content-type", OCI_INDEX)
        .body(bad.to_string())
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_put_errors() {
    let app = TestApp::start().await;
    let c = app.push_blob("bad", b"{}").await;
    let put = |reference: &str, ct: &str, body: Vec<u8>| {
        app.req(Method::PUT, &format!("/v2/bad/manifests/{reference}"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    // Malformed JSON, wrong schema, missing fields, negative size.
    assert_error(
        put("t", OCI_MANIFEST, b"{not json".to_vec()).await.unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    assert_error(
        put("t", OCI_MANIFEST, b"[]".to_vec()).await.unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    assert_error(
        put("t", OCI_MANIFEST, br#"{"schemaVersion":1}"#.to_vec())
            .await
            .unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    let neg = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": c.to_string(), "size": -2}, "layers": []});
    assert_error(
        put("t", OCI_MANIFEST, neg.to_string().into_bytes())
            .await
            .unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    // Content-Type and mediaType disagree.
    let ok = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": c.to_string(), "size": 2}, "layers": []});
    assert_error(
        put("t", OCI_INDEX, ok.to_string().into_bytes())
            .await
            .unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    // Unknown layer.
    let unknown = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": c.to_string(), "size": 2},
        "layers": [{"mediaType": OCI_LAYER, "digest": Digest::sha256(b"ghost").to_string(), "size": 5}]});
    let v = assert_error(
        put("t", OCI_MANIFEST, unknown.to_string().into_bytes())
            .await
            .unwrap(),
        400,
        "MANIFEST_BLOB_UNKNOWN",
    )
    .await;
    assert_eq!(
        v["errors"][0]["detail"]["digest"],
        Digest::sha256(b"ghost").to_string()
    );
    // Wrong size for a known blob.
    let size = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": c.to_string(), "size": 3}, "layers": []});
    assert_error(
        put("t", OCI_MANIFEST, size.to_string().into_bytes())
            .await
            .unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    // Digest reference that does not match the body.
    let wrong = Digest::sha256(b"not the body");
    assert_error(
        put(
            &wrong.to_string(),
            OCI_MANIFEST,
            ok.to_string().into_bytes(),
        )
        .await
        .unwrap(),
        400,
        "DIGEST_INVALID",
    )
    .await;
    // Invalid tags.
    assert_error(
        put("-bad", OCI_MANIFEST, ok.to_string().into_bytes())
            .await
            .unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    assert_error(
        put(&"a".repeat(129), OCI_MANIFEST, ok.to_string().into_bytes())
            .await
            .unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    // Schema 1 is not supported.
    assert_error(
        put(
            "t",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            b"{}".to_vec(),
        )
        .await
        .unwrap(),
        400,
        "MANIFEST_INVALID",
    )
    .await;
    // Oversized, with and without a Content-Length.
    let big = vec![b' '; 4 * 1024 * 1024 + 1];
    let r = put("t", OCI_MANIFEST, big.clone()).await.unwrap();
    assert_eq!(r.status(), 413);
    let stream = futures::stream::iter(
        big.chunks(65536)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = app
        .req(Method::PUT, "/v2/bad/manifests/t")
        .header("content-type", OCI_MANIFEST)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Nothing above was stored.
    assert_error(
        app.get("/v2/bad/manifests/t").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let r = app.get("/v2/bad/tags/list").await;
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!([]));
    // The valid one is accepted.
    app.put_manifest("bad", "t", OCI_MANIFEST, &ok).await;
}

#[tokio::test]
async fn artifacts_and_referrers() {
    let app = TestApp::start().await;
    let (subject, sbody) = app.push_image("ref/app", "v1", &[b"app layer"]).await;
    let empty = app.push_blob("ref/app", b"{}").await;
    let sig = app.push_blob("ref/app", b"signature bytes").await;
    let mk = |artifact: &str, ann: &str| {
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sig.to_string(), "size": 15}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": sbody.len()},
            "annotations": {"org.example.note": ann}
        })
    };
    let a1 = mk("application/vnd.example.sig", "one");
    let r = app
        .req(Method::PUT, "/v2/ref/app/manifests/sig")
        .header("content-type", OCI_MANIFEST)
        .body(a1.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "oci-subject"), Some(subject.to_string()));
    let a1d = Digest::sha256(a1.to_string().as_bytes());
    let a2 = mk("application/vnd.example.sbom", "two");
    let (a2d, _) = app
        .put_manifest(
            "ref/app",
            &Digest::sha256(a2.to_string().as_bytes()).to_string(),
            OCI_MANIFEST,
            &a2,
        )
        .await;
    // A custom config media type without artifactType is an artifact too.
    let cfg = app.push_blob("ref/app", b"custom config").await;
    let a3 = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.config.v1+json", "digest": cfg.to_string(), "size": 13},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": sbody.len()}
    });
    let (a3d, _) = app.put_manifest("ref/app", "a3", OCI_MANIFEST, &a3).await;

    let r = app.get(&format!("/v2/ref/app/referrers/{subject}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_INDEX));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["schemaVersion"], 2);
    let ms = v["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 3);
    let by = |d: &Digest| {
        ms.iter()
            .find(|m| m["digest"] == d.to_string())
            .unwrap()
            .clone()
    };
    assert_eq!(by(&a1d)["artifactType"], "application/vnd.example.sig");
    assert_eq!(by(&a1d)["annotations"]["org.example.note"], "one");
    assert_eq!(by(&a2d)["artifactType"], "application/vnd.example.sbom");
    assert_eq!(
        by(&a3d)["artifactType"],
        "application/vnd.example.config.v1+json"
    );

    let r = app
        .get(&format!(
            "/v2/ref/app/referrers/{subject}?artifactType=application/vnd.example.sbom"
        ))
        .await;
    assert_eq!(
        header(&r, "oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], a2d.to_string());

    // Unknown subject: an empty index, not an error.
    let r = app
        .get(&format!(
            "/v2/ref/app/referrers/{}",
            Digest::sha256(b"none")
        ))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["manifests"], json!([]));
    assert_error(
        app.get("/v2/ref/app/referrers/sha256:bad").await,
        400,
        "DIGEST_INVALID",
    )
    .await;
    // A manifest may refer to a subject that is not (yet) in the registry.
    let mut orphan = mk("application/vnd.example.sig", "three");
    orphan["subject"]["digest"] = json!(Digest::sha256(b"later").to_string());
    app.put_manifest("ref/app", "orphan", OCI_MANIFEST, &orphan)
        .await;
}

#[tokio::test]
async fn tag_listing_and_catalog_pagination() {
    let app = TestApp::start().await;
    let (d, body) = app.push_image("pg/app", "seed", &[b"l"]).await;
    let _ = d;
    let names: Vec<String> = (0..25).map(|i| format!("t{i:03}")).collect();
    for n in &names {
        let r = app
            .req(Method::PUT, &format!("/v2/pg/app/manifests/{n}"))
            .header("content-type", OCI_MANIFEST)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let mut all: Vec<String> = names.clone();
    all.push("seed".into());
    all.sort();
    let mut got = vec![];
    let mut next = Some("/v2/pg/app/tags/list?n=10".to_string());
    while let Some(path) = next.take() {
        let r = app.get(&path).await;
        assert_eq!(r.status(), 200);
        next = header(&r, "link").map(|l| {
            assert!(l.ends_with("; rel=\"next\""), "{l}");
            l[1..l.find('>').unwrap()].to_string()
        });
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["name"], "pg/app");
        let page: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
        assert!(page.len() <= 10);
        got.extend(page);
    }
    assert_eq!(got, all);
    let v: Value = app
        .get("/v2/pg/app/tags/list?last=t020")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!(["t021", "t022", "t023", "t024"]));
    let v: Value = app
        .get("/v2/pg/app/tags/list?n=0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!([]));
    assert_error(
        app.get("/v2/pg/app/tags/list?n=abc").await,
        400,
        "PAGINATION_NUMBER_INVALID",
    )
    .await;
    assert_error(
        app.get("/v2/pg/app/tags/list?n=-1").await,
        400,
        "PAGINATION_NUMBER_INVALID",
    )
    .await;
    assert_error(
        app.get("/v2/pg/nothing/tags/list").await,
        404,
        "NAME_UNKNOWN",
    )
    .await;

    for r in ["a/one", "b/two", "c/three"] {
        app.push_blob(r, b"x").await;
    }
    let r = app.get("/v2/_catalog?n=2").await;
    let link = header(&r, "link").unwrap();
    assert_eq!(link, "</v2/_catalog?n=2&last=b/two>; rel=\"next\"");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["a/one", "b/two"]));
    let v: Value = app
        .get("/v2/_catalog?n=2&last=b/two")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], json!(["c/three", "pg/app"]));
    let v: Value = app.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(v["repositories"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn ten_thousand_tags_paginate() {
    let app = TestApp::start().await;
    let (_, body) = app.push_image("many/tags", "t00000", &[b"l"]).await;
    let body = bytes::Bytes::from(body);
    let total = 10_000usize;
    futures::stream::iter(1..total)
        .map(|i| {
            let req = app
                .req(Method::PUT, &format!("/v2/many/tags/manifests/t{i:05}"))
                .header("content-type", OCI_MANIFEST)
                .body(body.clone());
            async move {
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 201);
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut count = 0;
    let mut last_seen = String::new();
    let mut next = Some("/v2/many/tags/tags/list?n=1000".to_string());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let r = app.get(&path).await;
        assert_eq!(r.status(), 200);
        next = header(&r, "link").map(|l| l[1..l.find('>').unwrap()].to_string());
        let v: Value = r.json().await.unwrap();
        for t in v["tags"].as_array().unwrap() {
            let t = t.as_str().unwrap().to_string();
            assert!(t > last_seen, "tags are sorted and not repeated");
            last_seen = t;
            count += 1;
        }
        pages += 1;
    }
    assert_eq!(count, total);
    assert_eq!(pages, 10);
}

#[tokio::test]
async fn deletion() {
    let app = TestApp::start().await;
    let (d, _) = app.push_image("del/app", "v1", &[b"del layer"]).await;
    let layer = Digest::sha256(b"del layer");
    let r = app
        .req(Method::PUT, "/v2/del/app/manifests/v2")
        .header("content-type", OCI_MANIFEST)
        .body(
            app.get("/v2/del/app/manifests/v1")
                .await
                .bytes()
                .await
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A blob a manifest uses cannot be removed from the repository.
    let r = app
        .req(Method::DELETE, &format!("/v2/del/app/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_error(r, 409, "DENIED").await;
    // Tag delete removes only the tag.
    assert_eq!(
        app.req(Method::DELETE, "/v2/del/app/manifests/v2")
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_error(
        app.get("/v2/del/app/manifests/v2").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_eq!(app.get("/v2/del/app/manifests/v1").await.status(), 200);
    assert_error(
        app.req(Method::DELETE, "/v2/del/app/manifests/v2")
            .send()
            .await
            .unwrap(),
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    // Digest delete removes the manifest and its tags.
    assert_eq!(
        app.req(Method::DELETE, &format!("/v2/del/app/manifests/{d}"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_error(
        app.get("/v2/del/app/manifests/v1").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_error(
        app.get(&format!("/v2/del/app/manifests/{d}")).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let v: Value = app.get("/v2/del/app/tags/list").await.json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
    // Now the blob link can go.
    assert_eq!(
        app.req(Method::DELETE, &format!("/v2/del/app/blobs/{layer}"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_error(
        app.get(&format!("/v2/del/app/blobs/{layer}")).await,
        404,
        "BLOB_UNKNOWN",
    )
    .await;
    assert_error(
        app.req(Method::DELETE, &format!("/v2/del/app/blobs/{layer}"))
            .send()
            .await
            .unwrap(),
        404,
        "BLOB_UNKNOWN",
    )
    .await;
}

/// Sends a raw request line (reqwest would normalise `..`) and returns the
/// status and body.
async fn raw(app: &TestApp, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test]
async fn adversarial_paths_and_methods() {
    let app = TestApp::start().await;
    app.push_image("safe/app", "v1", &[b"x"]).await;
    for (method, path, status, code) in [
        (
            "GET",
            "/v2/../../etc/passwd/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        ("GET", "/v2/safe/../app/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/safe%2fapp/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/Safe/App/tags/list", 400, "NAME_INVALID"),
        (
            "PUT",
            "/v2/safe/app/manifests/..%2f..%2fx",
            400,
            "MANIFEST_INVALID",
        ),
        ("GET", "/v2/safe/app/manifests/..", 404, "MANIFEST_UNKNOWN"),
        (
            "GET",
            "/v2/safe/app/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
            400,
            "DIGEST_INVALID",
        ),
        ("GET", "/v2/safe/app/blobs/sha256:../../x", 404, "NOT_FOUND"),
        ("POST", "/v2/safe/app/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/_catalog", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/safe/app/blobs/uploads/", 405, "UNSUPPORTED"),
    ] {
        let (s, body) = raw(&app, method, path).await;
        assert_eq!(s, status, "{method} {path}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{method} {path}: {body}"));
        assert_eq!(v["errors"][0]["code"], code, "{method} {path}");
    }
    let long = format!("/v2/{}/tags/list", "a".repeat(300));
    assert_error(app.get(&long).await, 400, "NAME_INVALID").await;
}

#[tokio::test]
async fn concurrent_pushes_of_the_same_content() {
    let app = TestApp::start().await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
    let results = futures::future::join_all((0..8).map(|_| app.push_blob("race/app", &data))).await;
    assert!(results.iter().all(|d| *d == results[0]));
    let (_, body) = app.push_image("race/app", "seed", &[&data]).await;
    let body = bytes::Bytes::from(body);
    let rs = futures::future::join_all((0..8).map(|i| {
        app.req(
            Method::PUT,
            &format!(
                "/v2/race/app/manifests/{}",
                if i % 2 == 0 { "same" } else { "seed" }
            ),
        )
        .header("content-type", OCI_MANIFEST)
        .body(body.clone())
        .send()
    }))
    .await;
    for r in rs {
        assert_eq!(r.unwrap().status(), 201);
    }
    let r = app.get(&format!("/v2/race/app/blobs/{}", results[0])).await;
    assert_eq!(r.bytes().await.unwrap().len(), data.len());
}

#[tokio::test]
async fn metrics_are_exported() {
    let app = TestApp::start().await;
    app.push_blob("m/app", b"metric").await;
    app.get("/v2/m/app/tags/list").await;
    let text = app.get("/metrics").await.text().await.unwrap();
    for needle in [
        "dockyard_http_requests_total{",
        "route=\"upload_start\"",
        "dockyard_http_request_duration_seconds_bucket{",
        "dockyard_registry_bytes_received_total",
        "dockyard_uploads_in_flight",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
}

#[tokio::test]
async fn garbage_collection_removes_only_unreferenced_blobs() {
    let app = TestApp::start().await;
    let (keep_d, _) = app.push_image("gc/keep", "v1", &[b"kept layer"]).await;
    let (drop_d, _) = app.push_image("gc/drop", "v1", &[b"dropped layer"]).await;
    let stray = app.push_blob("gc/stray", b"never referenced").await;
    assert_eq!(
        app.req(Method::DELETE, &format!("/v2/gc/drop/manifests/{drop_d}"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let mut app = app;
    app.stop().await;
    let reg = dockyard_registry::Registry::open(&app.config)
        .await
        .unwrap();
    // Inside the grace period nothing goes.
    let opts = dockyard_registry::gc::GcOptions {
        grace: Duration::from_secs(3600),
        dry_run: false,
        delete_untagged: false,
    };
    let rep = dockyard_registry::gc::collect(&reg, &opts).await.unwrap();
    assert_eq!(rep.blobs_deleted, 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let opts = dockyard_registry::gc::GcOptions {
        grace: Duration::from_millis(1),
        dry_run: true,
        delete_untagged: false,
    };
    let dry = dockyard_registry::gc::collect(&reg, &opts).await.unwrap();
    let opts = dockyard_registry::gc::GcOptions {
        dry_run: false,
        ..opts
    };
    let rep = dockyard_registry::gc::collect(&reg, &opts).await.unwrap();
    // dropped layer + its config + the stray blob.
    assert_eq!(rep.blobs_deleted, 3, "{rep:?}");
    assert_eq!(dry.blobs_deleted, rep.blobs_deleted);
    drop(reg);
    let app = app.restart().await;
    assert_error(
        app.get(&format!("/v2/gc/stray/blobs/{stray}")).await,
        404,
        "BLOB_UNKNOWN",
    )
    .await;
    assert_error(
        app.get(&format!(
            "/v2/gc/drop/blobs/{}",
            Digest::sha256(b"dropped layer")
        ))
        .await,
        404,
        "BLOB_UNKNOWN",
    )
    .await;
    assert_eq!(
        app.get(&format!("/v2/gc/keep/manifests/{keep_d}"))
            .await
            .status(),
        200
    );
    let r = app
        .get(&format!(
            "/v2/gc/keep/blobs/{}",
            Digest::sha256(b"kept layer")
        ))
        .await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"kept layer");
    if app.config.storage.kind == dockyard_core::config::StorageKind::Filesystem {
        let files: Vec<_> = walk(&app.storage_path().join("docker/registry/v2/blobs"));
        assert_eq!(
            files.len(),
            2,
            "only the kept layer and config remain: {files:?}"
        );
    }
}
