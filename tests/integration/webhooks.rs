//! Outbound webhooks against real receivers (axum servers on 127.0.0.1):
//! signed bodies in the three formats and in event order, filters and
//! scopes, retries with backoff while a receiver is down, dead deliveries
//! and redelivery, a server SIGKILLed mid-delivery, two replicas sharing
//! the queues, and a burst of pushes with a dead target among the live ones.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::harness::{OCI_MANIFEST, TestApp};

// ---------------------------------------------------------------------------
// The receiver

/// A request the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
            .unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    fn delivery(&self) -> String {
        self.header("dockyard-delivery").to_string()
    }
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Default)]
struct RxState {
    got: Mutex<Vec<Got>>,
    /// Answer this status to everything (default 200).
    status: Mutex<Option<u16>>,
    /// Answer 503 to bodies containing this.
    fail_if: Mutex<Option<String>>,
    /// Hold requests whose body contains this until released.
    hold_if: Mutex<Option<String>>,
    release: tokio::sync::Notify,
    /// Answer with `Connection: close`, so that a stopped receiver is
    /// really unreachable (no kept-alive connection survives it).
    close: bool,
}

struct Receiver {
    state: Arc<RxState>,
    addr: SocketAddr,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

async fn receive(
    State(st): State<Arc<RxState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let contains = |m: &Mutex<Option<String>>| {
        m.lock()
            .unwrap()
            .as_deref()
            .is_some_and(|s| text.contains(s))
    };
    let status = if contains(&st.fail_if) {
        503
    } else {
        st.status.lock().unwrap().unwrap_or(200)
    };
    let hold = contains(&st.hold_if);
    let released = st.release.notified();
    st.got.lock().unwrap().push(Got {
        path: uri.path().to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body.to_vec(),
        status,
    });
    if hold {
        tokio::select! {
            _ = released => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
    let mut r = (StatusCode::from_u16(status).unwrap(), "thanks").into_response();
    if st.close {
        r.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    r
}

impl Receiver {
    async fn start() -> Receiver {
        Self::start_on(0, false).await
    }

    async fn start_on(port: u16, close: bool) -> Receiver {
        let state = Arc::new(RxState {
            close,
            ..RxState::default()
        });
        let mut rx = Receiver {
            state,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            task: Mutex::new(None),
        };
        rx.listen().await;
        rx
    }

    /// (Re)opens the port.
    async fn listen(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(self.state.clone());
        *self.task.lock().unwrap() = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// Closes the port: connections are refused until [`Receiver::listen`].
    async fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.state.got.lock().unwrap().clone()
    }

    /// Accepted requests (2xx) on `path`.
    fn ok(&self, path: &str) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| g.ok() && g.path == path)
            .collect()
    }

    /// Waits until `cond` holds for what arrived, or panics after `secs`.
    async fn wait(&self, secs: u64, what: &str, cond: impl Fn(&[Got]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if cond(&self.got()) {
                return;
            }
            if Instant::now() > deadline {
                let got: Vec<String> = self
                    .got()
                    .iter()
                    .map(|g| {
                        format!(
                            "{} {} {}",
                            g.path,
                            g.status,
                            String::from_utf8_lossy(&g.body)
                        )
                    })
                    .collect();
                panic!(
                    "timed out waiting for {what}; received:\n{}",
                    got.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// HMAC-SHA256 written out from its definition (RFC 2104), so that the
/// signature is checked independently of the server's implementation.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// Checks the documented signature scheme on a received request.
fn assert_signed(g: &Got, secret: &str) {
    let ts = g.header("dockyard-timestamp");
    let n: i64 = ts.parse().expect("Dockyard-Timestamp is Unix seconds");
    let now = (dockyard_core::now_millis() / 1000) as i64;
    assert!((now - n).abs() < 600, "timestamp {n} is not recent ({now})");
    let mut msg = ts.as_bytes().to_vec();
    msg.push(b'.');
    msg.extend_from_slice(&g.body);
    let expected = format!("v1={}", hex::encode(hmac_sha256(secret.as_bytes(), &msg)));
    assert_eq!(g.header("dockyard-signature"), expected, "signature");
    assert!(
        g.header("user-agent").starts_with("Dockyard-Webhooks/"),
        "{}",
        g.header("user-agent")
    );
    assert!(!g.delivery().is_empty());
}

async fn test_app(tweak: impl FnOnce(&mut dockyard_core::Config)) -> TestApp {
    TestApp::start_with(|c| {
        c.webhooks.allow_private_targets = true;
        c.webhooks.timeout = Duration::from_secs(3);
        c.webhooks.backoff_base = Duration::from_millis(100);
        c.webhooks.backoff_max = Duration::from_millis(400);
        c.events.pull_flush_interval = Duration::from_millis(200);
        tweak(c);
    })
    .await
}

async fn api(app: &TestApp, method: Method, path: &str, body: Value) -> (u16, Value) {
    let mut r = app.req(method, path);
    if !body.is_null() {
        r = r.json(&body);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates a subscription at `path`; returns (id, secret).
async fn subscribe(app: &TestApp, path: &str, body: Value) -> (String, String) {
    let (status, v) = api(app, Method::POST, path, body).await;
    assert_eq!(status, 201, "{v}");
    assert!(v.get("secret").is_some(), "{v}");
    (
        v["id"].as_str().unwrap().to_string(),
        v["secret"].as_str().unwrap().to_string(),
    )
}

async fn create_repo(app: &TestApp, name: &str) {
    let (status, v) = api(
        app,
        Method::POST,
        "/api/v1/repositories",
        json!({ "name": name }),
    )
    .await;
    assert_eq!(status, 201, "{v}");
}

/// Every event of a repository after `after`, oldest first.
async fn events(app: &TestApp, repo: &str) -> Vec<Value> {
    let mut all = vec![];
    let mut after = 0;
    loop {
        let (_, v) = api(
            app,
            Method::GET,
            &format!("/api/v1/repositories/{repo}/events?after={after}&n=1000"),
            Value::Null,
        )
        .await;
        let page = v["events"].as_array().unwrap().clone();
        if page.is_empty() {
            return all;
        }
        after = page.last().unwrap()["id"].as_i64().unwrap();
        all.extend(page);
    }
}

fn ids(got: &[Got], key: &str) -> Vec<i64> {
    got.iter()
        .map(|g| {
            let v = g.json();
            match key {
                "dockyard" => v["id"].as_i64().unwrap(),
                "cloudevents" => v["id"].as_str().unwrap().parse().unwrap(),
                _ => v["events"][0]["id"].as_str().unwrap().parse().unwrap(),
            }
        })
        .collect()
}

fn strictly_increasing(ids: &[i64]) -> bool {
    ids.windows(2).all(|w| w[0] < w[1])
}

async fn delete(app: &TestApp, path: &str) {
    let r = app.req(Method::DELETE, path).send().await.unwrap();
    assert_eq!(r.status(), 202, "DELETE {path}");
}

// ---------------------------------------------------------------------------
// Tests

/// Pushes, a retag, a pull and deletes reach three subscriptions of one
/// repository, one per format, in event order, signed as documented.
#[tokio::test]
async fn signed_events_arrive_in_order_in_each_format() {
    let app = test_app(|_| {}).await;
    let repo = "admin/app";
    create_repo(&app, repo).await;
    let rx = Receiver::start().await;
    let mut secrets = HashMap::new();
    let mut sub_ids = HashMap::new();
    for format in ["dockyard", "cloudevents", "distribution"] {
        let (id, secret) = subscribe(
            &app,
            &format!("/api/v1/repositories/{repo}/webhooks"),
            json!({ "url": rx.url(&format!("/{format}")), "format": format }),
        )
        .await;
        secrets.insert(format, secret);
        sub_ids.insert(format, id);
    }
    let (first, body) = app.push_image(repo, "v1", &[b"layer one"]).await;
    let (second, _) = app.push_image(repo, "v1", &[b"layer two"]).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    app.put_manifest(repo, "v2", OCI_MANIFEST, &v).await;
    let r = app
        .req(Method::GET, &format!("/v2/{repo}/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The pull is written at the next flush; wait for it so the order of
    // what follows is known.
    for _ in 0..100 {
        if events(&app, repo)
            .await
            .iter()
            .any(|e| e["type"] == "manifest.pulled")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delete(&app, &format!("/v2/{repo}/manifests/v2")).await;
    delete(&app, &format!("/v2/{repo}/manifests/{second}")).await;

    let evs: Vec<Value> = events(&app, repo)
        .await
        .into_iter()
        .filter(|e| e["type"] != "repository.created")
        .collect();
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "manifest.pushed",
            "tag.created",
            "manifest.pushed",
            "tag.moved",
            "tag.created",
            "manifest.pulled",
            "tag.deleted",
            "tag.deleted",
            "manifest.deleted"
        ]
    );
    let event_ids: Vec<i64> = evs.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    rx.wait(20, "every event in every format", |g| {
        let ok = |p: &str| g.iter().filter(|x| x.ok() && x.path == p).count();
        ok("/dockyard") >= 9 && ok("/cloudevents") >= 9 && ok("/distribution") >= 7
    })
    .await;
    // Nothing more arrives (repository.created came before the
    // subscriptions; the distribution format skips what it cannot say).
    tokio::time::sleep(Duration::from_millis(300)).await;

    // dockyard
    let got = rx.ok("/dockyard");
    assert_eq!(ids(&got, "dockyard"), event_ids, "every event, in order");
    let mut deliveries = BTreeSet::new();
    for (g, e) in got.iter().zip(&evs) {
        assert_signed(g, &secrets["dockyard"]);
        assert!(deliveries.insert(g.delivery()), "one delivery per event");
        assert_eq!(g.header("content-type"), "application/json");
        assert_eq!(g.header("dockyard-event"), e["type"].as_str().unwrap());
        let b = g.json();
        assert_eq!(b["type"], e["type"]);
        assert_eq!(b["repository"], repo);
        assert_eq!(b["tag"], e["tag"]);
        assert_eq!(b["digest"], e["digest"]);
        assert_eq!(b["actor"], "admin");
        assert_eq!(b["data"], e["data"]);
        let t = b["time"].as_str().unwrap();
        assert!(
            t.len() >= 20 && t.as_bytes()[10] == b'T' && t.ends_with('Z'),
            "RFC 3339: {t}"
        );
        let keys: BTreeSet<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "id",
                "type",
                "time",
                "repository",
                "tag",
                "digest",
                "actor",
                "data"
            ])
        );
    }
    assert_eq!(got[0].json()["digest"], first.to_string());
    assert_eq!(got[3].json()["data"]["previous_digest"], first.to_string());

    // cloudevents
    let got = rx.ok("/cloudevents");
    assert_eq!(ids(&got, "cloudevents"), event_ids);
    for (g, e) in got.iter().zip(&evs) {
        assert_signed(g, &secrets["cloudevents"]);
        assert_eq!(g.header("content-type"), "application/cloudevents+json");
        let b = g.json();
        assert_eq!(b["specversion"], "1.0");
        assert_eq!(b["id"], e["id"].as_i64().unwrap().to_string());
        assert_eq!(b["source"], format!("{}/{repo}", app.base));
        assert_eq!(
            b["type"],
            format!("io.dockyard.{}", e["type"].as_str().unwrap())
        );
        assert_eq!(b["datacontenttype"], "application/json");
        let subject = if e["tag"].is_null() {
            &e["digest"]
        } else {
            &e["tag"]
        };
        assert_eq!(&b["subject"], subject);
        assert_eq!(b["data"]["repository"], repo);
        assert_eq!(b["data"]["digest"], e["digest"]);
        assert_eq!(b["data"]["actor"], "admin");
        assert!(b["time"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(got[0].json()["data"]["size"], body.len());

    // distribution: pushes (a retag of an existing manifest is a push of
    // it with the tag), the pull, deletes; no tag.created/moved of a new
    // manifest (its manifest.pushed said it).
    let got = rx.ok("/distribution");
    let carried: Vec<&Value> = evs
        .iter()
        .filter(|e| {
            !(matches!(e["type"].as_str(), Some("tag.created" | "tag.moved"))
                && e["data"]["manifest_new"] == true)
        })
        .collect();
    assert_eq!(carried.len(), 7);
    assert_eq!(
        ids(&got, "distribution"),
        carried
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    );
    let expected = [
        ("push", Some(first.to_string()), Some("v1")),
        ("push", Some(second.to_string()), Some("v1")),
        ("push", Some(first.to_string()), Some("v2")),
        // v1 was moved to the second manifest before the pull.
        ("pull", Some(second.to_string()), Some("v1")),
        ("delete", Some(first.to_string()), Some("v2")),
        ("delete", Some(second.to_string()), Some("v1")),
        ("delete", Some(second.to_string()), None),
    ];
    for (g, (action, digest, tag)) in got.iter().zip(expected) {
        assert_signed(g, &secrets["distribution"]);
        assert_eq!(
            g.header("content-type"),
            "application/vnd.docker.distribution.events.v1+json"
        );
        let env = g.json();
        let evs = env["events"].as_array().unwrap();
        assert_eq!(evs.len(), 1);
        let ev = &evs[0];
        assert_eq!(ev["action"], action, "{ev}");
        let t = &ev["target"];
        assert_eq!(t["repository"], repo);
        assert_eq!(t["digest"].as_str(), digest.as_deref());
        assert_eq!(t["tag"].as_str(), tag, "{ev}");
        assert_eq!(
            t["url"],
            format!("{}/v2/{repo}/manifests/{}", app.base, digest.unwrap())
        );
        if action == "push" {
            assert_eq!(t["mediaType"], OCI_MANIFEST);
            assert!(t["size"].as_i64().unwrap() > 0);
            assert_eq!(t["length"], t["size"]);
        }
        if action == "pull" {
            assert_eq!(t["mediaType"], OCI_MANIFEST);
        }
        assert!(ev["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(ev["actor"]["name"], "admin");
        assert_eq!(ev["source"]["addr"], app.addr.to_string());
        assert!(!ev["source"]["instanceID"].as_str().unwrap().is_empty());
        assert_eq!(
            ev["request"]["method"],
            match action {
                "push" => "PUT",
                "pull" => "GET",
                _ => "DELETE",
            }
        );
    }

    // The delivery log has each delivery with its attempt and headers.
    let (status, page) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{}/deliveries?n=5", sub_ids["dockyard"]),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    let list = page["deliveries"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    assert!(
        list.iter()
            .all(|d| d["state"] == "delivered" && d["attempts"] == 1)
    );
    assert_eq!(list[0]["event_type"], "manifest.deleted", "newest first");
    let (_, rest) = api(
        &app,
        Method::GET,
        &format!(
            "/api/v1/webhooks/{}/deliveries?n=5&before={}",
            sub_ids["dockyard"], page["next"]
        ),
        Value::Null,
    )
    .await;
    assert_eq!(rest["deliveries"].as_array().unwrap().len(), 4);
    assert!(rest["next"].is_null());
    let last = &list[0];
    let (status, d) = api(
        &app,
        Method::GET,
        &format!(
            "/api/v1/webhooks/{}/deliveries/{}",
            sub_ids["dockyard"],
            last["id"].as_str().unwrap()
        ),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    let sent = rx
        .ok("/dockyard")
        .into_iter()
        .find(|g| g.delivery() == last["id"].as_str().unwrap())
        .unwrap();
    assert_eq!(d["body"].as_str().unwrap().as_bytes(), &sent.body[..]);
    assert_eq!(d["attempt_log"][0]["response_status"], 200);
    assert_eq!(d["attempt_log"][0]["response_body"], "thanks");
    assert_eq!(
        d["attempt_log"][0]["request_headers"]["Dockyard-Signature"],
        sent.header("dockyard-signature")
    );

    // Rotating the secret: later deliveries are signed with the new one.
    let (status, v) = api(
        &app,
        Method::PATCH,
        &format!("/api/v1/webhooks/{}", sub_ids["dockyard"]),
        json!({ "rotate_secret": true }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let rotated = v["secret"].as_str().unwrap().to_string();
    assert_ne!(rotated, secrets["dockyard"]);
    let (status, v) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{}", sub_ids["dockyard"]),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    assert!(v.get("secret").is_none(), "the secret is shown once: {v}");
    app.put_manifest(repo, "v3", OCI_MANIFEST, &v_of(&body))
        .await;
    rx.wait(10, "the tag after rotation", |g| {
        g.iter()
            .any(|x| x.path == "/dockyard" && x.json()["tag"] == "v3")
    })
    .await;
    let g = rx
        .ok("/dockyard")
        .into_iter()
        .find(|x| x.json()["tag"] == "v3")
        .unwrap();
    assert_signed(&g, &rotated);

    // Audit: creations are recorded.
    let (_, audit) = api(
        &app,
        Method::GET,
        "/api/v1/audit?action=webhook.created",
        Value::Null,
    )
    .await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 3, "{audit}");
}

fn v_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

/// Type lists, repository globs and tag regexes select events; an
/// organization's subscription never sees another organization's
/// repositories; disabled subscriptions get nothing.
#[tokio::test]
async fn filters_and_scopes_select_events() {
    let app = test_app(|_| {}).await;
    for org in ["acme", "umbrella"] {
        let (status, v) = api(
            &app,
            Method::POST,
            "/api/v1/organizations",
            json!({ "name": org }),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
    for r in ["acme/web-api", "acme/web-ui", "acme/db", "umbrella/web-x"] {
        create_repo(&app, r).await;
    }
    let rx = Receiver::start().await;
    subscribe(
        &app,
        "/api/v1/organizations/acme/webhooks",
        json!({ "url": rx.url("/acme-all") }),
    )
    .await;
    subscribe(
        &app,
        "/api/v1/organizations/acme/webhooks",
        json!({
            "url": rx.url("/acme-web-releases"),
            "event_types": ["tag.created"],
            "repository_glob": "acme/web-*",
            "tag_regex": "v[0-9]+",
        }),
    )
    .await;
    subscribe(
        &app,
        "/api/v1/webhooks",
        json!({ "url": rx.url("/global-umbrella"), "repository_glob": "umbrella/*", "format": "cloudevents" }),
    )
    .await;
    subscribe(
        &app,
        "/api/v1/repositories/acme/db/webhooks",
        json!({ "url": rx.url("/db-deletes"), "event_types": ["tag.deleted", "manifest.deleted"] }),
    )
    .await;
    let (off, _) = subscribe(
        &app,
        "/api/v1/webhooks",
        json!({ "url": rx.url("/disabled"), "enabled": false }),
    )
    .await;
    let pushes = [
        ("acme/web-api", "v1"),
        ("acme/web-api", "latest"),
        ("acme/db", "v2"),
        ("umbrella/web-x", "v3"),
        ("acme/web-ui", "v10"),
        ("acme/web-ui", "v10-rc1"),
    ];
    for (repo, tag) in pushes {
        app.push_image(repo, tag, &[format!("{repo}:{tag}").as_bytes()])
            .await;
    }
    delete(&app, "/v2/acme/db/manifests/v2").await;

    let path_events = |rx: &Receiver, path: &str| -> Vec<(String, String, String)> {
        rx.ok(path)
            .iter()
            .map(|g| {
                let v = g.json();
                let (kind, repo, tag) = if path.starts_with("/global") {
                    (
                        v["type"]
                            .as_str()
                            .unwrap()
                            .trim_start_matches("io.dockyard.")
                            .to_string(),
                        v["data"]["repository"].clone(),
                        v["data"]["tag"].clone(),
                    )
                } else {
                    (
                        v["type"].as_str().unwrap().to_string(),
                        v["repository"].clone(),
                        v["tag"].clone(),
                    )
                };
                (
                    kind,
                    repo.as_str().unwrap().to_string(),
                    tag.as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let e = |k: &str, r: &str, t: &str| (k.to_string(), r.to_string(), t.to_string());
    rx.wait(20, "every selected event", |g| {
        let n = |p: &str| g.iter().filter(|x| x.ok() && x.path == p).count();
        n("/acme-all") >= 11
            && n("/acme-web-releases") >= 2
            && n("/global-umbrella") >= 2
            && n("/db-deletes") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut acme = vec![];
    for (repo, tag) in pushes.iter().filter(|(r, _)| r.starts_with("acme/")) {
        acme.push(e("manifest.pushed", repo, tag));
        acme.push(e("tag.created", repo, tag));
    }
    acme.push(e("tag.deleted", "acme/db", "v2"));
    assert_eq!(path_events(&rx, "/acme-all"), acme);
    assert_eq!(
        path_events(&rx, "/acme-web-releases"),
        vec![
            e("tag.created", "acme/web-api", "v1"),
            e("tag.created", "acme/web-ui", "v10")
        ]
    );
    assert_eq!(
        path_events(&rx, "/global-umbrella"),
        vec![
            e("manifest.pushed", "umbrella/web-x", "v3"),
            e("tag.created", "umbrella/web-x", "v3")
        ]
    );
    assert_eq!(
        path_events(&rx, "/db-deletes"),
        vec![e("tag.deleted", "acme/db", "v2")]
    );
    assert!(rx.ok("/disabled").is_empty());
    let (_, page) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{off}/deliveries"),
        Value::Null,
    )
    .await;
    assert_eq!(page["deliveries"], json!([]));

    // Lists per scope.
    let (_, v) = api(
        &app,
        Method::GET,
        "/api/v1/organizations/acme/webhooks",
        Value::Null,
    )
    .await;
    assert_eq!(v["webhooks"].as_array().unwrap().len(), 2);
    assert_eq!(v["webhooks"][1]["tag_regex"], "v[0-9]+");
    assert_eq!(v["webhooks"][1]["event_types"], json!(["tag.created"]));
    assert!(v["webhooks"][0].get("secret").is_none());
    let (_, v) = api(&app, Method::GET, "/api/v1/webhooks", Value::Null).await;
    assert_eq!(v["webhooks"].as_array().unwrap().len(), 2);
    let (_, v) = api(
        &app,
        Method::GET,
        "/api/v1/organizations/umbrella/webhooks",
        Value::Null,
    )
    .await;
    assert_eq!(v["webhooks"], json!([]));
}

/// Bad input is a 400 naming what is wrong; loopback and private targets
/// are refused unless the operator allows them.
#[tokio::test]
async fn bad_input_and_private_targets_are_refused() {
    let app = TestApp::start().await;
    create_repo(&app, "admin/app").await;
    let path = "/api/v1/repositories/admin/app/webhooks";
    for (body, words) in [
        (json!({ "url": "not a url" }), "url"),
        (json!({ "url": "ftp://hooks.example.com/" }), "scheme"),
        (json!({ "url": "http://127.0.0.1:9/hook" }), "private"),
        (json!({ "url": "http://localhost:8080/" }), "private"),
        (json!({ "url": "http://[::1]/" }), "private"),
        (json!({ "url": "http://10.0.0.8/" }), "private"),
        (json!({ "url": "http://169.254.169.254/latest" }), "private"),
        (
            json!({ "url": "https://hooks.example.com/", "format": "xml" }),
            "format",
        ),
        (
            json!({ "url": "https://hooks.example.com/", "event_types": ["tag.exploded"] }),
            "event_types",
        ),
        (
            json!({ "url": "https://hooks.example.com/", "format": "distribution", "event_types": ["build.queued"] }),
            "distribution",
        ),
        (
            json!({ "url": "https://hooks.example.com/", "repository_glob": "admin/[" }),
            "repository_glob",
        ),
        (
            json!({ "url": "https://hooks.example.com/", "tag_regex": "v(" }),
            "tag_regex",
        ),
        (
            json!({ "url": "https://hooks.example.com/", "tag_regex": "x{99999999}" }),
            "tag_regex",
        ),
        (
            json!({ "url": "https://hooks.example.com/", "colour": "red" }),
            "colour",
        ),
        (json!({ "format": "dockyard" }), "url"),
    ] {
        let r = app
            .req(Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{body} -> {text}");
        let v: Value = serde_json::from_str(&text).expect("the API's error shape");
        assert_eq!(v["error"]["code"], "invalid", "{text}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{body} -> {message}");
    }
    // Not JSON at all.
    let r = app
        .req(Method::POST, path)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A public target is fine; updating it to a private one is not.
    let (id, _) = subscribe(&app, path, json!({ "url": "https://hooks.example.com/x" })).await;
    let (status, v) = api(
        &app,
        Method::PATCH,
        &format!("/api/v1/webhooks/{id}"),
        json!({ "url": "http://192.168.0.1/" }),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid");
    let (status, v) = api(
        &app,
        Method::PATCH,
        &format!("/api/v1/webhooks/{id}"),
        json!({ "tag_regex": "(" }),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, _) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{id}/deliveries?n=0"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{id}/deliveries?state=lost"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = api(
        &app,
        Method::POST,
        &format!("/api/v1/webhooks/{id}/deliveries/nope/redeliver"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = api(
        &app,
        Method::DELETE,
        &format!("/api/v1/webhooks/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 404);
}

/// Waits until the oldest delivery of `sub` has had `n` attempts.
async fn wait_attempts(app: &TestApp, sub: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, v) = api(
            app,
            Method::GET,
            &format!("/api/v1/webhooks/{sub}/deliveries?n=500"),
            Value::Null,
        )
        .await;
        // Recorded attempts (finished, not just started: the counter
        // counts an attempt when it is claimed).
        if let Some(id) = v["deliveries"]
            .as_array()
            .and_then(|l| l.last())
            .and_then(|d| d["id"].as_str())
        {
            let (_, d) = api(
                app,
                Method::GET,
                &format!("/api/v1/webhooks/{sub}/deliveries/{id}"),
                Value::Null,
            )
            .await;
            if d["attempt_log"].as_array().is_some_and(|l| l.len() >= n) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no attempt {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A receiver that is down (port closed, then 503) gets the events once it
/// is back, in order, after retries spaced by a growing backoff; a
/// delivery that fails `max_attempts` times is dead and the next one goes
/// on; redelivery sends the same bytes again.
#[tokio::test]
async fn retries_with_backoff_dead_deliveries_and_redelivery() {
    let app = test_app(|c| {
        c.webhooks.max_attempts = 6;
        c.webhooks.backoff_base = Duration::from_millis(200);
        c.webhooks.backoff_max = Duration::from_millis(800);
    })
    .await;
    let repo = "admin/app";
    create_repo(&app, repo).await;
    let (_, body) = app.push_image(repo, "base", &[b"base layer"]).await;
    let manifest = v_of(&body);
    let mut rx = Receiver::start_on(0, true).await;
    let (sub, secret) = subscribe(
        &app,
        &format!("/api/v1/repositories/{repo}/webhooks"),
        json!({ "url": rx.url("/hook"), "event_types": ["tag.created"] }),
    )
    .await;
    rx.stop().await;
    for t in ["t1", "t2", "t3"] {
        app.put_manifest(repo, t, OCI_MANIFEST, &manifest).await;
    }
    // Port closed for two attempts, 503 for two more, then up.
    wait_attempts(&app, &sub, 2).await;
    *rx.state.status.lock().unwrap() = Some(503);
    rx.listen().await;
    wait_attempts(&app, &sub, 4).await;
    *rx.state.status.lock().unwrap() = None;
    rx.wait(15, "t1..t3", |g| g.iter().filter(|x| x.ok()).count() >= 3)
        .await;
    let got = rx.got();
    let ok: Vec<&Got> = got.iter().filter(|g| g.ok()).collect();
    let tags: Vec<String> = ok
        .iter()
        .map(|g| g.json()["tag"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tags, ["t1", "t2", "t3"]);
    // Only the head was tried while the receiver was failing.
    let refused: BTreeSet<String> = got.iter().filter(|g| !g.ok()).map(Got::delivery).collect();
    assert_eq!(refused, BTreeSet::from([ok[0].delivery()]));
    for g in &got {
        assert_signed(g, &secret);
    }
    let first = ok[0].delivery();
    let (_, d) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{sub}/deliveries/{first}"),
        Value::Null,
    )
    .await;
    assert_eq!(d["state"], "delivered");
    assert_eq!(d["attempts"], 5, "{d}");
    let list = d["attempt_log"].as_array().unwrap().clone();
    assert_eq!(list.len(), 5, "{d}");
    assert!(list[0]["error"].as_str().unwrap().len() > 3, "{d}");
    assert!(list[0]["response_status"].is_null());
    assert!(list[1]["response_status"].is_null());
    assert_eq!(list[2]["response_status"], 503);
    assert_eq!(list[2]["error"], "HTTP 503");
    assert_eq!(list[3]["response_status"], 503);
    assert_eq!(list[4]["response_status"], 200);
    // Backoff: base × 2^(n-1), at most the maximum, at least half of that.
    let starts: Vec<i64> = list
        .iter()
        .map(|a| a["started_at"].as_i64().unwrap())
        .collect();
    for (i, w) in starts.windows(2).enumerate() {
        let floor = (200i64 << i).min(800) / 2;
        assert!(
            w[1] - w[0] >= floor - 5,
            "gap {} before attempt {} is below {floor} ms: {starts:?}",
            w[1] - w[0],
            i + 2
        );
    }
    assert!(
        starts[3] - starts[2] > starts[1] - starts[0] - 5,
        "{starts:?}"
    );

    // A delivery that keeps failing dies after max_attempts; the next
    // proceeds.
    *rx.state.fail_if.lock().unwrap() = Some("\"doomed\"".into());
    app.put_manifest(repo, "doomed", OCI_MANIFEST, &manifest)
        .await;
    app.put_manifest(repo, "after", OCI_MANIFEST, &manifest)
        .await;
    rx.wait(20, "the delivery after the dead one", |g| {
        g.iter().any(|x| x.ok() && x.json()["tag"] == "after")
    })
    .await;
    let got = rx.got();
    let doomed: Vec<&Got> = got.iter().filter(|g| g.json()["tag"] == "doomed").collect();
    assert_eq!(doomed.len(), 6, "six attempts");
    assert!(
        doomed
            .iter()
            .all(|g| g.status == 503 && g.body == doomed[0].body)
    );
    let doomed_id = doomed[0].delivery();
    assert!(doomed.iter().all(|g| g.delivery() == doomed_id));
    let after_at = got.iter().position(|g| g.json()["tag"] == "after").unwrap();
    let last_doomed = got
        .iter()
        .rposition(|g| g.json()["tag"] == "doomed")
        .unwrap();
    assert!(last_doomed < after_at, "the next waited for the dead one");
    let (_, d) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{sub}/deliveries/{doomed_id}"),
        Value::Null,
    )
    .await;
    assert_eq!(d["state"], "dead", "{d}");
    assert_eq!(d["last_status"], 503);
    assert_eq!(d["attempts"], 6);
    assert_eq!(d["attempt_log"].as_array().map(Vec::len), Some(6));
    let (_, dead) = api(
        &app,
        Method::GET,
        &format!("/api/v1/webhooks/{sub}/deliveries?state=dead"),
        Value::Null,
    )
    .await;
    assert_eq!(dead["deliveries"].as_array().unwrap().len(), 1);

    // Redelivery: the same bytes, as a new delivery.
    *rx.state.fail_if.lock().unwrap() = None;
    let (status, redo) = api(
        &app,
        Method::POST,
        &format!("/api/v1/webhooks/{sub}/deliveries/{doomed_id}/redeliver"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 201, "{redo}");
    assert_eq!(redo["redelivery_of"], doomed_id.as_str());
    let redo_id = redo["id"].as_str().unwrap().to_string();
    assert_ne!(redo_id, doomed_id);
    rx.wait(10, "the redelivery", |g| {
        g.iter().any(|x| x.ok() && x.delivery() == redo_id)
    })
    .await;
    let again = rx
        .got()
        .into_iter()
        .find(|g| g.delivery() == redo_id)
        .unwrap();
    assert_eq!(again.body, doomed[0].body, "the same body");
    assert_signed(&again, &secret);
    // (The receiver has it a moment before its answer is recorded.)
    let mut state = Value::Null;
    for _ in 0..100 {
        let (_, d) = api(
            &app,
            Method::GET,
            &format!("/api/v1/webhooks/{sub}/deliveries/{redo_id}"),
            Value::Null,
        )
        .await;
        state = d["state"].clone();
        if state == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, "delivered");

    let metrics = app.get("/metrics").await.text().await.unwrap();
    for name in [
        "dockyard_webhook_deliveries_total{outcome=\"dead\"}",
        "dockyard_webhook_deliveries_total{outcome=\"delivered\"}",
        "dockyard_webhook_deliveries_total{outcome=\"failed\"}",
        "dockyard_webhook_delivery_seconds_bucket",
        "dockyard_webhook_pending",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

// ---------------------------------------------------------------------------
// A server killed mid-delivery

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(app: &TestApp, port: u16) -> Server {
    let mut c = crate::harness::dockyard_command();
    c.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(app.data_dir.path())
    .env("DOCKYARD_DATABASE_URL", app.config.database_url())
    .env("DOCKYARD_LOG_LEVEL", "warn")
    .env("DOCKYARD_BOOTSTRAP_ADMIN", crate::harness::admin_pair())
    .env("DOCKYARD_BUILDS_LOCAL_EXECUTOR", "false")
    .env("DOCKYARD_WEBHOOKS_ALLOW_PRIVATE_TARGETS", "true")
    .env("DOCKYARD_WEBHOOKS_TIMEOUT", "4s")
    .env("DOCKYARD_WEBHOOKS_BACKOFF_BASE", "100ms")
    .env("DOCKYARD_WEBHOOKS_BACKOFF_MAX", "400ms")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    Server(c.spawn().unwrap())
}

async fn wait_up(base: &str) {
    for _ in 0..200 {
        if reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not start");
}

/// `dockyard serve` is SIGKILLed while a receiver holds a delivery open;
/// restarted on the same data, it sends that delivery again (same
/// `Dockyard-Delivery`) once its claim expired, then every later event,
/// in order.
#[tokio::test]
async fn a_server_killed_mid_delivery_delivers_everything_after_restart() {
    // Set up with an in-process server, then hand its data to a process.
    let mut app = test_app(|_| {}).await;
    let repo = "admin/app";
    create_repo(&app, repo).await;
    let (_, body) = app.push_image(repo, "base", &[b"base layer"]).await;
    let rx = Receiver::start().await;
    *rx.state.hold_if.lock().unwrap() = Some("\"held\"".into());
    let (_, secret) = subscribe(
        &app,
        &format!("/api/v1/repositories/{repo}/webhooks"),
        json!({ "url": rx.url("/hook") }),
    )
    .await;
    app.stop().await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let client = crate::harness::admin_client();
    let tag = |t: &'static str| {
        let client = client.clone();
        let base = base.clone();
        let body = body.clone();
        async move {
            let r = client
                .put(format!("{base}/v2/{repo}/manifests/{t}"))
                .header("content-type", OCI_MANIFEST)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    };
    let mut server = serve(&app, port);
    wait_up(&base).await;
    for t in ["e1", "e2", "held", "e4", "e5"] {
        tag(t).await;
    }
    rx.wait(15, "the held delivery in flight", |g| {
        g.iter().any(|x| x.json()["tag"] == "held")
    })
    .await;
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);
    *rx.state.hold_if.lock().unwrap() = None;
    rx.state.release.notify_waiters();
    let held_id = rx
        .got()
        .iter()
        .find(|g| g.json()["tag"] == "held")
        .unwrap()
        .delivery();

    let _server = serve(&app, port);
    wait_up(&base).await;
    tag("e6").await;
    let all = ["e1", "e2", "held", "e4", "e5", "e6"];
    rx.wait(40, "every event after the restart", |g| {
        let ok: BTreeSet<String> = g
            .iter()
            .filter(|x| x.ok())
            .map(|x| x.json()["tag"].as_str().unwrap_or("").to_string())
            .collect();
        all.iter().all(|t| ok.contains(*t))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = rx.got();
    for g in &got {
        assert_signed(g, &secret);
    }
    // First arrivals in event order; repeats only of the one in flight.
    let mut seen = BTreeSet::new();
    let mut first_ids = vec![];
    let mut tags = vec![];
    for g in &got {
        if seen.insert(g.delivery()) {
            first_ids.push(g.json()["id"].as_i64().unwrap());
            tags.push(g.json()["tag"].as_str().unwrap().to_string());
        } else {
            assert_eq!(g.delivery(), held_id, "only the in-flight delivery repeats");
        }
    }
    assert_eq!(tags, all, "each event once, in order");
    assert!(strictly_increasing(&first_ids));
    let held: Vec<&Got> = got.iter().filter(|g| g.delivery() == held_id).collect();
    assert!(held.len() >= 2, "the held delivery was sent again");
    assert!(held.iter().all(|g| g.body == held[0].body));
}

// ---------------------------------------------------------------------------
// Two replicas

/// Two replicas (the test server and a second `Webhooks` with its own
/// pools on the same database) share the queues: every delivery reaches
/// the receiver once, in order.
#[tokio::test]
async fn two_replicas_attempt_each_delivery_once() {
    let app = test_app(|_| {}).await;
    let repo = "admin/app";
    create_repo(&app, repo).await;
    let (_, body) = app.push_image(repo, "base", &[b"base layer"]).await;
    let db = dockyard_core::Db::connect(&app.config.database_url(), 4)
        .await
        .unwrap();
    let second = dockyard_webhooks::Webhooks::new(
        db,
        dockyard_webhooks::Settings::from_config(&app.config.webhooks, &app.base, "replica-2"),
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = second.start(stop.clone());
    let rx = Receiver::start().await;
    let mut subs = vec![];
    for i in 0..4 {
        subs.push(
            subscribe(
                &app,
                &format!("/api/v1/repositories/{repo}/webhooks"),
                json!({ "url": rx.url(&format!("/s{i}")) }),
            )
            .await,
        );
    }
    let manifest = v_of(&body);
    for i in 0..40 {
        app.put_manifest(repo, &format!("t{i}"), OCI_MANIFEST, &manifest)
            .await;
    }
    rx.wait(30, "40 events × 4 subscriptions", |g| {
        g.iter().filter(|x| x.ok()).count() >= 160
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = rx.got();
    assert_eq!(got.len(), 160, "no delivery attempted twice");
    for i in 0..4 {
        let path = format!("/s{i}");
        let mine = rx.ok(&path);
        let ids = ids(&mine, "dockyard");
        assert_eq!(ids.len(), 40);
        assert!(strictly_increasing(&ids), "{path}: {ids:?}");
    }
    stop.cancel();
    running.await.unwrap();
}

// ---------------------------------------------------------------------------
// Load

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// 1,000 manifest pushes from 8 clients; returns the sorted latencies.
async fn burst(app: &TestApp, repo: &str, prefix: &str, config: &Value) -> Vec<Duration> {
    let per = 125;
    let mut tasks = vec![];
    for c in 0..8 {
        let client = app.client.clone();
        let base = app.base.clone();
        let repo = repo.to_string();
        let prefix = prefix.to_string();
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            for i in 0..per {
                let n = c * per + i;
                let mut m = config.clone();
                m["annotations"] = json!({ "n": format!("{prefix}-{n}") });
                let body = serde_json::to_vec(&m).unwrap();
                let start = Instant::now();
                let r = client
                    .put(format!("{base}/v2/{repo}/manifests/{prefix}{n}"))
                    .header("content-type", OCI_MANIFEST)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                lat.push(start.elapsed());
            }
            lat
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

/// A burst of 1,000 pushes with three subscribed targets, one of them
/// dead: the live targets get every event in order, and pushing is not
/// slowed beyond 2× the p99 without webhooks (+50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_burst_with_a_dead_target_delivers_everything_to_the_live_ones() {
    let app = test_app(|c| {
        c.webhooks.max_attempts = 3;
        c.webhooks.backoff_base = Duration::from_millis(200);
        c.webhooks.backoff_max = Duration::from_secs(1);
    })
    .await;
    let repo = "admin/load";
    create_repo(&app, repo).await;
    let (_, body) = app.push_image(repo, "base", &[b"base layer"]).await;
    let manifest = v_of(&body);
    // Warm up (connections, caches), then the baseline.
    burst(&app, repo, "pre", &manifest).await;
    let base = burst(&app, repo, "b", &manifest).await;

    let live = [Receiver::start().await, Receiver::start().await];
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    subscribe(
        &app,
        &format!("/api/v1/repositories/{repo}/webhooks"),
        json!({ "url": live[0].url("/a") }),
    )
    .await;
    subscribe(
        &app,
        &format!("/api/v1/repositories/{repo}/webhooks"),
        json!({ "url": live[1].url("/b"), "format": "cloudevents" }),
    )
    .await;
    subscribe(
        &app,
        &format!("/api/v1/repositories/{repo}/webhooks"),
        json!({ "url": format!("http://127.0.0.1:{dead_port}/dead") }),
    )
    .await;
    let started = Instant::now();
    let with = burst(&app, repo, "w", &manifest).await;
    let pushed = started.elapsed();
    // Each push is a manifest.pushed and a tag.created.
    for (rx, path) in live.iter().zip(["/a", "/b"]) {
        rx.wait(60, "2,000 deliveries", |g| {
            g.iter().filter(|x| x.ok() && x.path == path).count() >= 2000
        })
        .await;
    }
    let last = started.elapsed();
    let expected: Vec<i64> = events(&app, repo)
        .await
        .iter()
        .filter(|e| e["tag"].as_str().is_some_and(|t| t.starts_with('w')))
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(expected.len(), 2000);
    for (rx, (path, key)) in live.iter().zip([("/a", "dockyard"), ("/b", "cloudevents")]) {
        let got = rx.ok(path);
        assert_eq!(got.len(), 2000, "{path}: each delivery once");
        assert_eq!(ids(&got, key), expected, "{path}: every event, in order");
    }
    let (b50, b99) = (percentile(&base, 0.5), percentile(&base, 0.99));
    let (w50, w99) = (percentile(&with, 0.5), percentile(&with, 0.99));
    println!(
        "push latency without webhooks: p50 {b50:?} p99 {b99:?}; with 3 targets (1 dead): \
         p50 {w50:?} p99 {w99:?}; burst {pushed:?}; 4,000 live deliveries, last arrived \
         {last:?} after the burst began ({:.0} deliveries/s)",
        4000.0 / last.as_secs_f64()
    );
    assert!(
        w99 < b99 * 2 + Duration::from_millis(50),
        "p99 with webhooks {w99:?} vs {b99:?} without"
    );
}
