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

    // Each consumer's lag is exported; the webhooks consumer has caught up.
    let mut lag = String::new();
    for _ in 0..50 {
        let metrics = app.get("/metrics").await.text().await.unwrap();
        lag = metrics
            .lines()
            .find(|l| l.starts_with("dockyard_events_consumer_lag{consumer=\"webhooks\"}"))
            .unwrap_or_default()
            .to_string();
        if lag.ends_with(" 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(lag.ends_with(" 0"), "webhooks consumer lag: {lag:?}");

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

/// Records which process handled which event.
struct Tally {
    replica: usize,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(usize, i64)>>>,
}

#[async_trait::async_trait]
impl dockyard_core::events::Handler for Tally {
    async fn handle(
        &self,
        _tx: &mut sqlx::AnyConnection,
        events: &[dockyard_core::events::Event],
    ) -> Result<(), String> {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(events.iter().map(|e| (self.replica, e.id)));
        Ok(())
    }
}

/// Two "replicas" (two connection pools to the same database, as two
/// processes would have) run the same consumer while writers commit events
/// concurrently: every event is handled once, by one replica, in id order,
/// and none is skipped even though PostgreSQL transactions commit in any
/// order. When the lease holder stops, the other takes over where it was.
#[tokio::test]
async fn one_replica_consumes_each_event_once_in_order() {
    use dockyard_core::events::{self, ConsumerOptions, NewEvent, kinds};
    let app = TestApp::start().await;
    let url = app.config.database_url();
    let replicas = [
        dockyard_core::Db::connect(&url, 4).await.unwrap(),
        dockyard_core::Db::connect(&url, 4).await.unwrap(),
    ];
    // Events the server itself wrote (the admin's bootstrap) come first.
    let start = events::list(&replicas[0], 0, None, 1000)
        .await
        .unwrap()
        .last()
        .map_or(0, |e| e.id);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let opts = ConsumerOptions {
        batch: 7,
        lease: Duration::from_secs(2),
        idle: Duration::from_millis(5),
    };
    let stops: Vec<_> = (0..2)
        .map(|_| tokio_util::sync::CancellationToken::new())
        .collect();
    let mut runs = Vec::new();
    for (i, db) in replicas.iter().enumerate() {
        runs.push(tokio::spawn(events::run_consumer(
            db.clone(),
            "test-consumer",
            std::sync::Arc::new(Tally {
                replica: i,
                seen: seen.clone(),
            }),
            opts.clone(),
            stops[i].clone(),
        )));
    }
    // 8 writers × 40 events, each in its own transaction, committed in
    // whatever order the database decides.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let db = replicas[w % 2].clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    let mut tx = db.write.begin().await.unwrap();
                    events::append(
                        &mut tx,
                        db.backend,
                        &[NewEvent::new(kinds::TAG_CREATED, "x/y").tag(format!("w{w}-{i}"))],
                    )
                    .await
                    .unwrap();
                    if i % 2 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let wait_for = |n: usize| {
        let seen = seen.clone();
        async move {
            for _ in 0..500 {
                if seen
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, id)| *id > start)
                    .count()
                    >= n
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(320).await;
    let first_holder = seen.lock().unwrap().last().unwrap().0;
    // The holder stops; the other replica continues after its position.
    stops[first_holder].cancel();
    let db = &replicas[1 - first_holder];
    for i in 0..20 {
        events::append_now(
            db,
            &[NewEvent::new(kinds::TAG_DELETED, "x/y").tag(format!("d{i}"))],
        )
        .await
        .unwrap();
    }
    wait_for(340).await;
    for s in &stops {
        s.cancel();
    }
    for r in runs {
        r.await.unwrap();
    }
    let seen: Vec<(usize, i64)> = seen
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|(_, id)| *id > start)
        .collect();
    let ids: Vec<i64> = seen.iter().map(|(_, id)| *id).collect();
    let all: Vec<i64> = events::list(&replicas[0], start, None, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(all.len(), 340);
    assert_eq!(ids, all, "each event once, in id order, none skipped");
    // Before the stop, one replica did all the work.
    let before: std::collections::BTreeSet<usize> =
        seen.iter().take(320).map(|(r, _)| *r).collect();
    assert_eq!(before.len(), 1, "both replicas consumed: {before:?}");
    assert!(
        seen.iter().skip(320).all(|(r, _)| *r != first_holder),
        "the stopped replica kept consuming"
    );
}
