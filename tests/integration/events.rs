//! The event log as users see it through `/api/v1/.../events`: every
//! registry change is an event, in order, with its details; pulls are
//! counted and written in aggregate.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{OCI_MANIFEST, TestApp};

async fn events(app: &TestApp, repo: &str) -> Vec<Value> {
    let page: Value = app
        .get(&format!("/api/v1/repositories/{repo}/events?n=1000"))
        .await
        .json()
        .await
        .unwrap();
    page["events"].as_array().unwrap().clone()
}

fn summary(events: &[Value]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["tag"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[tokio::test]
async fn registry_changes_are_events_in_order_with_their_details() {
    let app = TestApp::start_with(|c| {
        c.events.pull_flush_interval = Duration::from_millis(200);
    })
    .await;
    let repo = "admin/app";
    let (first, body) = app.push_image(repo, "v1", &[b"layer one"]).await;
    let (second, _) = app.push_image(repo, "v1", &[b"layer two"]).await;
    // The same manifest again under a new tag: no new manifest.
    let v: Value = serde_json::from_slice(&body).unwrap();
    app.put_manifest(repo, "v2", OCI_MANIFEST, &v).await;
    // The same tag to the same digest again: nothing changed, no event.
    app.put_manifest(repo, "v2", OCI_MANIFEST, &v).await;
    let r = app
        .req(reqwest::Method::DELETE, &format!("/v2/{repo}/manifests/v2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = app
        .req(
            reqwest::Method::DELETE,
            &format!("/v2/{repo}/manifests/{second}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let evs = events(&app, repo).await;
    let tag = |t: &str| Some(t.to_string());
    assert_eq!(
        summary(&evs),
        vec![
            ("repository.created".into(), None),
            ("manifest.pushed".into(), tag("v1")),
            ("tag.created".into(), tag("v1")),
            ("manifest.pushed".into(), tag("v1")),
            ("tag.moved".into(), tag("v1")),
            ("tag.created".into(), tag("v2")),
            ("tag.deleted".into(), tag("v2")),
            ("tag.deleted".into(), tag("v1")),
            ("manifest.deleted".into(), None),
        ]
    );
    let ids: Vec<i64> = evs.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order: {ids:?}");
    for e in &evs {
        assert_eq!(e["actor"], "admin", "{e}");
        assert_eq!(e["repository"], repo);
        assert_eq!(e["namespace"], "admin");
    }
    assert_eq!(evs[1]["digest"], first.to_string());
    assert_eq!(evs[1]["data"]["media_type"], OCI_MANIFEST);
    assert_eq!(evs[1]["data"]["size"], body.len());
    assert_eq!(evs[4]["digest"], second.to_string());
    assert_eq!(evs[4]["data"]["previous_digest"], first.to_string());
    assert_eq!(evs[4]["data"]["manifest_new"], true);
    assert_eq!(evs[5]["digest"], first.to_string());
    assert_eq!(evs[5]["data"]["manifest_new"], false);
    assert_eq!(evs[7]["digest"], second.to_string());
    assert_eq!(evs[8]["digest"], second.to_string());
    assert_eq!(evs[8]["data"]["tags"], serde_json::json!(["v1"]));

    // Pulls: counted, then written as one event per manifest and reference.
    for _ in 0..5 {
        let r = app
            .req(
                reqwest::Method::GET,
                &format!("/v2/{repo}/manifests/{first}"),
            )
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // HEAD is not a pull.
    app.req(
        reqwest::Method::HEAD,
        &format!("/v2/{repo}/manifests/{first}"),
    )
    .header("accept", OCI_MANIFEST)
    .send()
    .await
    .unwrap();
    let mut pulled = vec![];
    for _ in 0..50 {
        pulled = events(&app, repo)
            .await
            .into_iter()
            .filter(|e| e["type"] == "manifest.pulled")
            .collect();
        if !pulled.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(pulled[0]["data"]["count"], 5);
    assert_eq!(pulled[0]["digest"], first.to_string());
    assert!(pulled[0]["tag"].is_null());

    // The global log is for superusers; it has the same events.
    let all: Value = app.get("/api/v1/events?n=1000").await.json().await.unwrap();
    assert_eq!(all["events"].as_array().unwrap().len(), evs.len() + 1);
}

#[tokio::test]
async fn repository_api_changes_and_builds_are_events() {
    let app = TestApp::start().await;
    let r = app
        .req(reqwest::Method::POST, "/api/v1/repositories")
        .json(&serde_json::json!({"name": "admin/made", "visibility": "private"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // An uploaded build that no executor takes, then cancelled.
    let r = app
        .req(
            reqwest::Method::POST,
            "/api/v1/repositories/admin/made/builds/context?tags=x",
        )
        .header("content-type", "application/x-tar")
        .body(crate::clients::tar(&[crate::clients::Entry::File(
            "Dockerfile",
            0o644,
            b"FROM scratch\n",
        )]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let b: Value = r.json().await.unwrap();
    let id = b["id"].as_str().unwrap();
    let r = app
        .req(
            reqwest::Method::POST,
            &format!("/api/v1/builds/{id}/cancel"),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let evs = events(&app, "admin/made").await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["repository.created", "build.queued", "build.cancelled"]
    );
    assert_eq!(evs[1]["data"]["build_id"], id);
    assert_eq!(evs[1]["data"]["trigger_kind"], "upload");
    assert_eq!(evs[2]["data"]["status"], "cancelled");
    let r = app
        .req(reqwest::Method::DELETE, "/api/v1/repositories/admin/made")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let all: Value = app.get("/api/v1/events?n=1000").await.json().await.unwrap();
    let last = all["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["type"], "repository.deleted");
    assert_eq!(last["repository"], "admin/made");
}
