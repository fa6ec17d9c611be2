//! The REST API `/api/v1`: repositories, robots, tokens, permissions and
//! audit, with the OpenAPI document and a permission matrix over every
//! operation it lists.

use std::collections::BTreeSet;

use dockyard_core::identity::Identity;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::*;

async fn setup() -> (TestApp, Identity) {
    let app = TestApp::start().await;
    let id = app.identity().await;
    id.create_user("alice", Some("alice-password"), false)
        .await
        .unwrap();
    id.create_user("bob", Some("bob-password"), false)
        .await
        .unwrap();
    (app, id)
}

fn as_user(
    app: &TestApp,
    m: Method,
    path: &str,
    user: Option<(&str, &str)>,
) -> reqwest::RequestBuilder {
    let r = app.anon.request(m, app.url(path));
    match user {
        Some((u, p)) => r.basic_auth(u, Some(p)),
        None => r,
    }
}

const ALICE: Option<(&str, &str)> = Some(("alice", "alice-password"));
const BOB: Option<(&str, &str)> = Some(("bob", "bob-password"));

async fn api_error(r: reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status().as_u16(), status);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn repositories_robots_tokens_and_audit() {
    let (app, _id) = setup().await;
    // Create, refuse duplicates, bad names, foreign namespaces, anonymous.
    let r = as_user(&app, Method::POST, "/api/v1/repositories", ALICE)
        .json(&json!({ "name": "alice/app", "description": "the app" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["visibility"], "private");
    assert_eq!(v["description"], "the app");
    let create = |user, body: Value| {
        as_user(&app, Method::POST, "/api/v1/repositories", user)
            .json(&body)
            .send()
    };
    api_error(
        create(ALICE, json!({ "name": "alice/app" })).await.unwrap(),
        409,
        "exists",
    )
    .await;
    api_error(
        create(ALICE, json!({ "name": "alice/../x" }))
            .await
            .unwrap(),
        400,
        "invalid",
    )
    .await;
    api_error(
        create(ALICE, json!({ "name": "alice/x", "visibility": "secret" }))
            .await
            .unwrap(),
        400,
        "invalid",
    )
    .await;
    api_error(
        create(ALICE, json!({ "name": "bob/app" })).await.unwrap(),
        403,
        "forbidden",
    )
    .await;
    api_error(
        create(None, json!({ "name": "alice/y" })).await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    create(
        ALICE,
        json!({ "name": "alice/second", "visibility": "public" }),
    )
    .await
    .unwrap();

    // Visibility: bob sees only the public one; the private one is a 404.
    let list = |user| as_user(&app, Method::GET, "/api/v1/repositories", user).send();
    let v: Value = list(BOB).await.unwrap().json().await.unwrap();
    assert_eq!(v["repositories"].as_array().unwrap().len(), 1);
    assert_eq!(v["repositories"][0]["name"], "alice/second");
    api_error(
        as_user(&app, Method::GET, "/api/v1/repositories/alice/app", BOB)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    // Pagination for alice.
    let v: Value = as_user(&app, Method::GET, "/api/v1/repositories?n=1", ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"][0]["name"], "alice/app");
    assert_eq!(v["next"], "alice/app");
    let v: Value = as_user(
        &app,
        Method::GET,
        "/api/v1/repositories?n=1&last=alice/app",
        ALICE,
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(v["repositories"][0]["name"], "alice/second");
    assert!(v["next"].is_null());
    // Grant bob read; bob sees it, cannot change it.
    let r = as_user(
        &app,
        Method::PUT,
        "/api/v1/repositories/alice/app/permissions/user/bob",
        ALICE,
    )
    .json(&json!({ "role": "read" }))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = as_user(&app, Method::GET, "/api/v1/repositories/alice/app", BOB)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["your_role"], "read");
    let r = as_user(&app, Method::PATCH, "/api/v1/repositories/alice/app", BOB)
        .json(&json!({ "visibility": "public" }))
        .send()
        .await
        .unwrap();
    api_error(r, 403, "forbidden").await;
    // Alice makes it public: anonymous pulls through the registry work.
    let r = as_user(&app, Method::PATCH, "/api/v1/repositories/alice/app", ALICE)
        .json(&json!({ "visibility": "public" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["visibility"], "public");
    let t = fetch_token(&app, None, "dockyard", "repository:alice/app:pull").await;
    assert_eq!(
        app.anon
            .get(app.url("/v2/alice/app/tags/list"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A robot for alice's namespace, given write, pushes with its token.
    let r = as_user(&app, Method::POST, "/api/v1/namespaces/alice/robots", ALICE)
        .json(&json!({ "name": "ci" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let robot: Value = r.json().await.unwrap();
    assert_eq!(robot["name"], "alice+ci");
    let secret = robot["token"].as_str().unwrap().to_string();
    assert!(secret.starts_with("dyr_"));
    let r = as_user(&app, Method::POST, "/api/v1/namespaces/alice/robots", BOB)
        .json(&json!({ "name": "evil" }))
        .send()
        .await
        .unwrap();
    api_error(r, 403, "forbidden").await;
    let push = |secret: String| {
        app.anon
            .post(app.url("/v2/alice/app/blobs/uploads/"))
            .basic_auth("alice+ci", Some(secret))
            .send()
    };
    assert_eq!(
        push(secret.clone()).await.unwrap().status(),
        403,
        "no permission yet"
    );
    as_user(
        &app,
        Method::PUT,
        "/api/v1/repositories/alice/app/permissions/robot/alice+ci",
        ALICE,
    )
    .json(&json!({ "role": "write" }))
    .send()
    .await
    .unwrap();
    assert_eq!(push(secret.clone()).await.unwrap().status(), 202);
    // Rotation: a new token, then the old one revoked.
    let r = as_user(
        &app,
        Method::POST,
        "/api/v1/namespaces/alice/robots/ci/tokens",
        ALICE,
    )
    .json(&json!({ "expires_in_days": 30 }))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let new_secret = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let old_id = robot["token_id"].as_str().unwrap();
    api_error(
        as_user(
            &app,
            Method::DELETE,
            &format!("/api/v1/tokens/{old_id}"),
            BOB,
        )
        .send()
        .await
        .unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        as_user(
            &app,
            Method::DELETE,
            &format!("/api/v1/tokens/{old_id}"),
            ALICE
        )
        .send()
        .await
        .unwrap()
        .status(),
        204
    );
    assert_eq!(push(secret).await.unwrap().status(), 401, "revoked");
    assert_eq!(push(new_secret).await.unwrap().status(), 202);

    // Personal tokens: create, use as bearer on the API, listed without secret, revoke.
    let r = as_user(&app, Method::POST, "/api/v1/user/tokens", BOB)
        .json(&json!({ "name": "laptop" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pat: Value = r.json().await.unwrap();
    let pat_secret = pat["token"].as_str().unwrap().to_string();
    assert!(pat_secret.starts_with("dyp_"));
    let r = app
        .anon
        .get(app.url("/api/v1/user/tokens"))
        .bearer_auth(&pat_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains(&pat_secret), "secrets are never listed");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["tokens"][0]["name"], "laptop");
    assert!(
        v["tokens"][0]["last_used_at"].is_i64(),
        "last use is recorded"
    );
    let pat_id = pat["id"].as_str().unwrap();
    assert_eq!(
        app.anon
            .delete(app.url(&format!("/api/v1/tokens/{pat_id}")))
            .bearer_auth(&pat_secret)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    api_error(
        app.anon
            .get(app.url("/api/v1/user/tokens"))
            .bearer_auth(&pat_secret)
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;

    // Delete the repository.
    api_error(
        as_user(&app, Method::DELETE, "/api/v1/repositories/alice/app", BOB)
            .send()
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;
    assert_eq!(
        as_user(
            &app,
            Method::DELETE,
            "/api/v1/repositories/alice/app",
            ALICE
        )
        .send()
        .await
        .unwrap()
        .status(),
        204
    );
    api_error(
        as_user(&app, Method::GET, "/api/v1/repositories/alice/app", ALICE)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;

    // The audit log has it all, for superusers only.
    api_error(
        as_user(&app, Method::GET, "/api/v1/audit", ALICE)
            .send()
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;
    let v: Value = app.get("/api/v1/audit?n=500").await.json().await.unwrap();
    let actions: BTreeSet<String> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    for a in [
        "repository.created",
        "repository.visibility",
        "permission.changed",
        "robot.created",
        "token.created",
        "token.revoked",
        "repository.deleted",
    ] {
        assert!(actions.contains(a), "{a} not audited: {actions:?}");
    }
    let v: Value = app
        .get("/api/v1/audit?action=repository.deleted")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    assert_eq!(v["entries"][0]["actor"], "alice");
    assert_eq!(v["entries"][0]["target"], "alice/app");
    assert_eq!(v["entries"][0]["address"], "127.0.0.1");
}

/// One matrix row: operation as the OpenAPI document names it, concrete
/// path, JSON body (null for none), and the statuses expected for the
/// anonymous caller, an unrelated user (bob) and the owner (alice).
type Row = (
    &'static str,
    String,
    Value,
    u16,
    &'static [u16],
    &'static [u16],
);

/// Every operation of the OpenAPI document, called anonymously, as an
/// unrelated user, and as the owner: refused, refused (or hidden), allowed.
#[tokio::test]
async fn api_permission_matrix_covers_every_operation() {
    let (app, id) = setup().await;
    as_user(&app, Method::POST, "/api/v1/repositories", ALICE)
        .json(&json!({ "name": "alice/app" }))
        .send()
        .await
        .unwrap();
    as_user(&app, Method::POST, "/api/v1/namespaces/alice/robots", ALICE)
        .json(&json!({ "name": "ci" }))
        .send()
        .await
        .unwrap();
    let r = as_user(&app, Method::POST, "/api/v1/organizations", ALICE)
        .json(&json!({ "name": "acme" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    drop(id);
    // Build objects of alice/app for the build routes.
    let created = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // A webhook of alice/app (created before the build, whose build.queued
    // event it then gets a delivery of).
    let webhook = created(
        as_user(
            &app,
            Method::POST,
            "/api/v1/repositories/alice/app/webhooks",
            ALICE,
        )
        .json(&json!({"url": "https://hooks.example.com/alice"}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    let build = created(
        as_user(
            &app,
            Method::POST,
            "/api/v1/repositories/alice/app/builds/context",
            ALICE,
        )
        .body("not really an archive")
        .send()
        .await
        .unwrap(),
    )
    .await;
    let definition = created(
        as_user(
            &app,
            Method::POST,
            "/api/v1/repositories/alice/app/build-definitions",
            ALICE,
        )
        .json(&json!({"name": "main", "git_url": "https://git.example/app.git"}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    let trigger = created(
        as_user(
            &app,
            Method::POST,
            "/api/v1/namespaces/alice/triggers",
            ALICE,
        )
        .json(&json!({"kind": "github"}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    let mut delivery = String::new();
    for _ in 0..200 {
        let v: Value = as_user(
            &app,
            Method::GET,
            &format!("/api/v1/webhooks/{webhook}/deliveries"),
            ALICE,
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        if let Some(id) = v["deliveries"][0]["id"].as_str() {
            delivery = id.to_string();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(!delivery.is_empty(), "no delivery of build.queued");
    let doc: Value = app
        .anon
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["info"]["title"], "Dockyard API");
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    // (operation, concrete path, body, anonymous, bob, alice)
    let table: Vec<Row> = vec![
        (
            "GET /api/v1/user",
            "/api/v1/user".into(),
            json!(null),
            401,
            &[200],
            &[200],
        ),
        (
            "POST /api/v1/session",
            "/api/v1/session".into(),
            json!({"username": "bob", "password": "bob-password"}),
            201,
            &[201],
            &[201],
        ),
        (
            "DELETE /api/v1/session",
            "/api/v1/session".into(),
            json!(null),
            204,
            &[204],
            &[204],
        ),
        (
            "PATCH /api/v1/namespaces/{namespace}",
            "/api/v1/namespaces/alice".into(),
            json!({"create_on_push": true}),
            401,
            &[403],
            &[200],
        ),
        (
            "POST /api/v1/users",
            "/api/v1/users".into(),
            json!({"username": "newbie", "password": "long-password"}),
            401,
            &[403],
            &[403],
        ),
        (
            "POST /api/v1/organizations",
            "/api/v1/organizations".into(),
            json!({"name": "neworg"}),
            401,
            &[201],
            &[409],
        ),
        (
            "PUT /api/v1/organizations/{org}/members/{user}",
            "/api/v1/organizations/acme/members/bob".into(),
            json!({"role": "member"}),
            401,
            &[403],
            &[200],
        ),
        (
            "POST /api/v1/organizations/{org}/teams",
            "/api/v1/organizations/acme/teams".into(),
            json!({"name": "devs"}),
            401,
            &[403],
            &[201],
        ),
        (
            "PUT /api/v1/organizations/{org}/teams/{team}/members/{user}",
            "/api/v1/organizations/acme/teams/devs/members/bob".into(),
            json!(null),
            401,
            &[403],
            &[200],
        ),
        (
            "GET /api/v1/repositories",
            "/api/v1/repositories".into(),
            json!(null),
            200,
            &[200],
            &[200],
        ),
        (
            "POST /api/v1/repositories",
            "/api/v1/repositories".into(),
            json!({"name": "alice/new"}),
            401,
            &[403],
            &[201],
        ),
        (
            "GET /api/v1/repositories/{namespace}/{name}",
            "/api/v1/repositories/alice/app".into(),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "PATCH /api/v1/repositories/{namespace}/{name}",
            "/api/v1/repositories/alice/app".into(),
            json!({"description": "x"}),
            401,
            &[404],
            &[200],
        ),
        // Builds: the repository's roles decide; who cannot read it does
        // not learn that it (or its builds) exist.
        (
            "GET /api/v1/repositories/{namespace}/{name}/builds",
            "/api/v1/repositories/alice/app/builds".into(),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "GET /api/v1/repositories/{namespace}/{name}/builds/rebuilds",
            "/api/v1/repositories/alice/app/builds/rebuilds".into(),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "POST /api/v1/repositories/{namespace}/{name}/builds/context",
            "/api/v1/repositories/alice/app/builds/context".into(),
            json!({}),
            401,
            &[404],
            &[201],
        ),
        (
            "GET /api/v1/builds/{id}",
            format!("/api/v1/builds/{build}"),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "GET /api/v1/builds/{id}/logs",
            format!("/api/v1/builds/{build}/logs"),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "POST /api/v1/builds/{id}/cancel",
            format!("/api/v1/builds/{build}/cancel"),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "GET /api/v1/repositories/{namespace}/{name}/build-definitions",
            "/api/v1/repositories/alice/app/build-definitions".into(),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "POST /api/v1/repositories/{namespace}/{name}/build-definitions",
            "/api/v1/repositories/alice/app/build-definitions".into(),
            json!({"name": "other", "git_url": "https://git.example/other.git"}),
            401,
            &[404],
            &[201],
        ),
        (
            "GET /api/v1/build-definitions/{id}",
            format!("/api/v1/build-definitions/{definition}"),
            json!(null),
            404,
            &[404],
            &[200],
        ),
        (
            "POST /api/v1/build-definitions/{id}/run",
            format!("/api/v1/build-definitions/{definition}/run"),
            json!({"ref": "main"}),
            404,
            &[404],
            &[201],
        ),
        (
            "PATCH /api/v1/build-definitions/{id}",
            format!("/api/v1/build-definitions/{definition}"),
            json!({"auto_rebuild": false, "base_check_schedule": "0 0 * * * *"}),
            404,
            &[404],
            &[200],
        ),
        (
            "DELETE /api/v1/build-definitions/{id}",
            format!("/api/v1/build-definitions/{definition}"),
            json!(null),
            404,
            &[404],
            &[204],
        ),
        (
            "POST /api/v1/namespaces/{namespace}/triggers",
            "/api/v1/namespaces/alice/triggers".into(),
            json!({"kind": "gitlab"}),
            401,
            &[403],
            &[201],
        ),
        (
            "GET /api/v1/namespaces/{namespace}/triggers",
            "/api/v1/namespaces/alice/triggers".into(),
            json!(null),
            401,
            &[403],
            &[200],
        ),
        // A webhook is authenticated by its signature only.
        (
            "POST /api/v1/triggers/{id}/webhook",
            format!("/api/v1/triggers/{trigger}/webhook"),
            json!({"ref": "refs/heads/main", "after": "0123456789abcdef"}),
            401,
            &[401],
            &[401],
        ),
        (
            "GET /api/v1/triggers/{id}/deliveries",
            format!("/api/v1/triggers/{trigger}/deliveries"),
            json!(null),
            401,
            &[403],
            &[200],
        ),
        (
            "DELETE /api/v1/triggers/{id}",
            format!("/api/v1/triggers/{trigger}"),
            json!(null),
            401,
            &[403],
            &[204],
        ),
        // Executors: superusers only; the protocol takes node tokens only.
        (
            "POST /api/v1/executor-tokens",
            "/api/v1/executor-tokens".into(),
            json!({"name": "node"}),
            401,
            &[403],
            &[403],
        ),
        (
            "GET /api/v1/executor-tokens",
            "/api/v1/executor-tokens".into(),
            json!(null),
            401,
            &[403],
            &[403],
        ),
        (
            "DELETE /api/v1/executor-tokens/{id}",
            "/api/v1/executor-tokens/node".into(),
            json!(null),
            401,
            &[403],
            &[403],
        ),
        (
            "GET /api/v1/executors",
            "/api/v1/executors".into(),
            json!(null),
            401,
            &[403],
            &[403],
        ),
        (
            "POST /api/v1/executor/register",
            "/api/v1/executor/register".into(),
            json!({"name": "x", "platforms": ["linux/amd64"], "capacity": 1, "engine": "docker", "version": "1"}),
            401,
            &[401],
            &[401],
        ),
        (
            "POST /api/v1/executor/poll",
            "/api/v1/executor/poll".into(),
            json!({"executor_id": "x", "wait_seconds": 0}),
            401,
            &[401],
            &[401],
        ),
        (
            "POST /api/v1/executor/heartbeat",
            "/api/v1/executor/heartbeat".into(),
            json!({"executor_id": "x", "jobs": []}),
            401,
            &[401],
            &[401],
        ),
        (
            "POST /api/v1/executor/jobs/{job}/log",
            "/api/v1/executor/jobs/x/log".into(),
            json!({"text": "x"}),
            401,
            &[401],
            &[401],
        ),
        (
            "POST /api/v1/executor/jobs/{job}/token",
            "/api/v1/executor/jobs/x/token".into(),
            json!({"pull": []}),
            401,
            &[401],
            &[401],
        ),
        (
            "GET /api/v1/executor/jobs/{job}/context",
            "/api/v1/executor/jobs/x/context".into(),
            json!(null),
            401,
            &[401],
            &[401],
        ),
        (
            "POST /api/v1/executor/jobs/{job}/result",
            "/api/v1/executor/jobs/x/result".into(),
            json!({"phase": "complete"}),
            401,
            &[401],
            &[401],
        ),
        // Webhooks: by the subscription's scope (repository admins,
        // organization admins, superusers); by id, who does not manage it
        // does not learn that it exists.
        (
            "POST /api/v1/repositories/{namespace}/{name}/webhooks",
            "/api/v1/repositories/alice/app/webhooks".into(),
            json!({"url": "https://hooks.example.com/other", "format": "cloudevents"}),
            401,
            &[404],
            &[201],
        ),
        (
            "GET /api/v1/repositories/{namespace}/{name}/webhooks",
            "/api/v1/repositories/alice/app/webhooks".into(),
            json!(null),
            401,
            &[404],
            &[200],
        ),
        (
            "POST /api/v1/organizations/{org}/webhooks",
            "/api/v1/organizations/acme/webhooks".into(),
            json!({"url": "https://hooks.example.com/acme", "event_types": ["tag.created"]}),
            401,
            &[403],
            &[201],
        ),
        (
            "GET /api/v1/organizations/{org}/webhooks",
            "/api/v1/organizations/acme/webhooks".into(),
            json!(null),
            401,
            &[403],
            &[200],
        ),
        (
            "POST /api/v1/webhooks",
            "/api/v1/webhooks".into(),
            json!({"url": "https://hooks.example.com/all"}),
            401,
            &[403],
            &[403],
        ),
        (
            "GET /api/v1/webhooks",
            "/api/v1/webhooks".into(),
            json!(null),
            401,
            &[403],
            &[403],
        ),
        (
            "GET /api/v1/webhooks/{id}",
            format!("/api/v1/webhooks/{webhook}"),
            json!(null),
            401,
            &[404],
            &[200],
        ),
        (
            "PATCH /api/v1/webhooks/{id}",
            format!("/api/v1/webhooks/{webhook}"),
            json!({"tag_regex": "v.*"}),
            401,
            &[404],
            &[200],
        ),
        (
            "GET /api/v1/webhooks/{id}/deliveries",
            format!("/api/v1/webhooks/{webhook}/deliveries"),
            json!(null),
            401,
            &[404],
            &[200],
        ),
        (
            "GET /api/v1/webhooks/{id}/deliveries/{delivery}",
            format!("/api/v1/webhooks/{webhook}/deliveries/{delivery}"),
            json!(null),
            401,
            &[404],
            &[200],
        ),
        (
            "POST /api/v1/webhooks/{id}/deliveries/{delivery}/redeliver",
            format!("/api/v1/webhooks/{webhook}/deliveries/{delivery}/redeliver"),
            json!(null),
            401,
            &[404],
            &[201],
        ),
        (
            "DELETE /api/v1/webhooks/{id}",
            format!("/api/v1/webhooks/{webhook}"),
            json!(null),
            401,
            &[404],
            &[204],
        ),
        (
            "PUT /api/v1/repositories/{namespace}/{name}/permissions/{kind}/{subject}",
            "/api/v1/repositories/alice/app/permissions/user/bob".into(),
            json!({"role": "read"}),
            401,
            &[404],
            &[200],
        ),
        (
            "POST /api/v1/namespaces/{namespace}/robots",
            "/api/v1/namespaces/alice/robots".into(),
            json!({"name": "other"}),
            401,
            &[403],
            &[201],
        ),
        (
            "POST /api/v1/namespaces/{namespace}/robots/{robot}/tokens",
            "/api/v1/namespaces/alice/robots/ci/tokens".into(),
            json!({}),
            401,
            &[403],
            &[201],
        ),
        (
            "POST /api/v1/user/tokens",
            "/api/v1/user/tokens".into(),
            json!({"name": "t"}),
            401,
            &[201],
            &[201],
        ),
        (
            "GET /api/v1/user/tokens",
            "/api/v1/user/tokens".into(),
            json!(null),
            401,
            &[200],
            &[200],
        ),
        (
            "DELETE /api/v1/tokens/{id}",
            "/api/v1/tokens/unknown".into(),
            json!(null),
            401,
            &[404],
            &[404],
        ),
        (
            "GET /api/v1/audit",
            "/api/v1/audit".into(),
            json!(null),
            401,
            &[403],
            &[403],
        ),
        (
            "GET /api/v1/events",
            "/api/v1/events".into(),
            json!(null),
            401,
            &[403],
            &[403],
        ),
        (
            "GET /api/v1/repositories/{namespace}/{name}/events",
            "/api/v1/repositories/alice/app/events".into(),
            json!(null),
            401,
            &[403],
            &[200],
        ),
        (
            "GET /api/v1/users",
            "/api/v1/users".into(),
            json!(null),
            401,
            &[403],
            &[403],
        ),
        (
            "GET /api/v1/namespaces/{namespace}/robots",
            "/api/v1/namespaces/alice/robots".into(),
            json!(null),
            401,
            &[403],
            &[200],
        ),
        (
            "DELETE /api/v1/namespaces/{namespace}/robots/{robot}",
            "/api/v1/namespaces/alice/robots/other".into(),
            json!(null),
            401,
            &[403],
            &[204],
        ),
        // Bob was granted read by the permissions row above: 403, not 404.
        (
            "DELETE /api/v1/repositories/{namespace}/{name}/permissions/{kind}/{subject}",
            "/api/v1/repositories/alice/app/permissions/user/bob".into(),
            json!(null),
            401,
            &[403],
            &[204],
        ),
        // ...and has lost it again: the repository is hidden from him.
        (
            "DELETE /api/v1/repositories/{namespace}/{name}",
            "/api/v1/repositories/alice/app".into(),
            json!(null),
            401,
            &[404],
            &[204],
        ),
    ];
    let listed: BTreeSet<String> = table.iter().map(|t| t.0.to_string()).collect();
    assert_eq!(
        listed, operations,
        "an API operation is missing from the permission matrix"
    );
    let mut failures = vec![];
    // Invalid credentials are refused on every operation that takes a
    // caller (signing in and out take none).
    let id = app.identity().await;
    let bob_id = match id.login("bob", "bob-password").await.unwrap().unwrap() {
        dockyard_core::identity::Principal::User { id, .. } => id,
        p => panic!("{p:?}"),
    };
    let (revoked_id, revoked) = id
        .create_token(
            dockyard_core::identity::TokenKind::Personal,
            Some(bob_id),
            None,
            "r",
            None,
        )
        .await
        .unwrap();
    id.revoke_token(&revoked_id).await.unwrap();
    let (_, expired) = id
        .create_token(
            dockyard_core::identity::TokenKind::Personal,
            Some(bob_id),
            None,
            "e",
            Some(dockyard_core::now_millis() - 1),
        )
        .await
        .unwrap();
    let (_, refresh) = id
        .create_token(
            dockyard_core::identity::TokenKind::Refresh,
            Some(bob_id),
            None,
            "f",
            None,
        )
        .await
        .unwrap();
    let registry_jwt = fetch_token(&app, BOB, "dockyard", "repository:bob/x:pull").await;
    let invalid = [
        ("revoked token", revoked),
        ("expired token", expired),
        ("refresh token as bearer", refresh),
        ("registry JWT as bearer", registry_jwt),
        (
            "garbage bearer",
            "dyp_aaaaaaaaaaaaaaaa_".to_string() + &"b".repeat(43),
        ),
    ];
    for (op, path, body, _, _, _) in &table {
        if op.contains("/api/v1/session") {
            continue;
        }
        let method: Method = op.split(' ').next().unwrap().parse().unwrap();
        for (who, bearer) in &invalid {
            let mut req = app
                .anon
                .request(method.clone(), app.url(path))
                .bearer_auth(bearer);
            if !body.is_null() {
                req = req.json(body);
            }
            let status = req.send().await.unwrap().status();
            if status != 401 {
                failures.push(format!("{who}: {op} -> {status}, expected 401"));
            }
        }
    }
    for (op, path, body, anon, bob, alice) in &table {
        let method: Method = op.split(' ').next().unwrap().parse().unwrap();
        for (who, creds, expected) in [
            ("anonymous", None, &[*anon][..]),
            ("bob", BOB, *bob),
            ("alice", ALICE, *alice),
        ] {
            let mut req = as_user(&app, method.clone(), path, creds);
            if !body.is_null() {
                req = req.json(body);
            }
            let status = req.send().await.unwrap().status();
            if !expected.contains(&status.as_u16()) {
                failures.push(format!("{who}: {op} -> {status}, expected {expected:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "API permission matrix:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn users_organizations_and_teams() {
    let (app, _id) = setup().await;
    // Superusers create users; the new user can log in.
    let r = app
        .req(Method::POST, "/api/v1/users")
        .json(&json!({ "username": "carol", "password": "carol-password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = as_user(
        &app,
        Method::GET,
        "/api/v1/user",
        Some(("carol", "carol-password")),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        v,
        json!({ "kind": "user", "name": "carol", "superuser": false })
    );
    let r = app
        .req(Method::POST, "/api/v1/users")
        .json(&json!({ "username": "dan", "password": "short" }))
        .send()
        .await
        .unwrap();
    api_error(r, 400, "invalid").await;
    // Alice's organization: she owns its repositories; bob, a plain member, does not.
    assert_eq!(
        as_user(&app, Method::POST, "/api/v1/organizations", ALICE)
            .json(&json!({ "name": "acme" }))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    as_user(
        &app,
        Method::PUT,
        "/api/v1/organizations/acme/members/bob",
        ALICE,
    )
    .json(&json!({ "role": "member" }))
    .send()
    .await
    .unwrap();
    assert_eq!(
        as_user(&app, Method::POST, "/api/v1/repositories", ALICE)
            .json(&json!({ "name": "acme/app" }))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    api_error(
        as_user(&app, Method::GET, "/api/v1/repositories/acme/app", BOB)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    // A team with write on the repository gives bob push.
    let r = as_user(
        &app,
        Method::POST,
        "/api/v1/organizations/acme/teams",
        ALICE,
    )
    .json(&json!({ "name": "devs" }))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let team_id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    as_user(
        &app,
        Method::PUT,
        "/api/v1/organizations/acme/teams/devs/members/bob",
        ALICE,
    )
    .send()
    .await
    .unwrap();
    let r = as_user(
        &app,
        Method::PUT,
        &format!("/api/v1/repositories/acme/app/permissions/team/{team_id}"),
        ALICE,
    )
    .json(&json!({ "role": "write" }))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let t = fetch_token(&app, BOB, "dockyard", "repository:acme/app:pull,push").await;
    let r = app
        .anon
        .post(app.url("/v2/acme/app/blobs/uploads/"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "team write grants push");
    // Promoted to admin, bob may manage the organization.
    as_user(
        &app,
        Method::PUT,
        "/api/v1/organizations/acme/members/bob",
        ALICE,
    )
    .json(&json!({ "role": "admin" }))
    .send()
    .await
    .unwrap();
    let r = as_user(&app, Method::POST, "/api/v1/organizations/acme/teams", BOB)
        .json(&json!({ "name": "ops" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = as_user(
        &app,
        Method::PUT,
        "/api/v1/organizations/acme/members/carol",
        BOB,
    )
    .json(&json!({ "role": "king" }))
    .send()
    .await
    .unwrap();
    api_error(r, 400, "invalid").await;
}

#[tokio::test]
async fn create_on_push_can_be_turned_off_per_namespace() {
    let (app, _id) = setup().await;
    let push = |repo: &'static str| {
        let app = &app;
        async move {
            let t = fetch_token(
                app,
                ALICE,
                "dockyard",
                &format!("repository:{repo}:pull,push"),
            )
            .await;
            app.anon
                .post(app.url(&format!("/v2/{repo}/blobs/uploads/")))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        push("alice/first").await,
        202,
        "created on first push by default"
    );
    let r = as_user(&app, Method::PATCH, "/api/v1/namespaces/alice", ALICE)
        .json(&json!({ "create_on_push": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        push("alice/second").await,
        401,
        "no implicit creation any more"
    );
    assert_eq!(
        push("alice/first").await,
        202,
        "existing repositories still take pushes"
    );
    // Created explicitly, it takes pushes.
    let r = as_user(&app, Method::POST, "/api/v1/repositories", ALICE)
        .json(&json!({ "name": "alice/second" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(push("alice/second").await, 202);
    api_error(
        as_user(&app, Method::PATCH, "/api/v1/namespaces/alice", BOB)
            .json(&json!({ "create_on_push": true }))
            .send()
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;
    api_error(
        as_user(&app, Method::PATCH, "/api/v1/namespaces/nobody", ALICE)
            .json(&json!({ "create_on_push": true }))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn browser_sessions_by_cookie() {
    let (app, _id) = setup().await;
    let r = app
        .anon
        .post(app.url("/api/v1/session"))
        .json(&json!({ "username": "bob", "password": "wrong" }))
        .send()
        .await
        .unwrap();
    api_error(r, 401, "unauthorized").await;
    let r = app
        .anon
        .post(app.url("/api/v1/session"))
        .json(&json!({ "username": "bob", "password": "bob-password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let set = header(&r, "set-cookie").unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attr), "{attr} missing: {set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let me = |cookie: String| {
        app.anon
            .get(app.url("/api/v1/user"))
            .header("cookie", cookie)
            .send()
    };
    let r = me(cookie.clone()).await.unwrap();
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{cookie}: {text}"));
    assert_eq!(v["name"], "bob");
    // A crafted cookie with a known token id but no secret cannot log anyone out.
    let id = cookie.split('_').nth(1).unwrap();
    let forged = format!("dockyard_session=dyp_{id}_{}", "A".repeat(43));
    api_error(me(forged.clone()).await.unwrap(), 401, "unauthorized").await;
    let r = app
        .anon
        .delete(app.url("/api/v1/session"))
        .header("cookie", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        me(cookie.clone()).await.unwrap().status(),
        200,
        "still signed in"
    );
    // Logging out revokes the session and clears the cookie.
    let r = app
        .anon
        .delete(app.url("/api/v1/session"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(header(&r, "set-cookie").unwrap().contains("Max-Age=0"));
    api_error(me(cookie).await.unwrap(), 401, "unauthorized").await;
}

#[tokio::test]
async fn deleting_robots_and_grants_removes_access() {
    let (app, _id) = setup().await;
    as_user(&app, Method::POST, "/api/v1/repositories", ALICE)
        .json(&json!({ "name": "alice/app" }))
        .send()
        .await
        .unwrap();
    let robot: Value = as_user(&app, Method::POST, "/api/v1/namespaces/alice/robots", ALICE)
        .json(&json!({ "name": "bot" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = robot["token"].as_str().unwrap().to_string();
    as_user(
        &app,
        Method::PUT,
        "/api/v1/repositories/alice/app/permissions/robot/alice+bot",
        ALICE,
    )
    .json(&json!({ "role": "read" }))
    .send()
    .await
    .unwrap();
    as_user(
        &app,
        Method::PUT,
        "/api/v1/repositories/alice/app/permissions/user/bob",
        ALICE,
    )
    .json(&json!({ "role": "read" }))
    .send()
    .await
    .unwrap();
    let pull = |u: &'static str, p: String| {
        app.anon
            .get(app.url("/v2/alice/app/tags/list"))
            .basic_auth(u, Some(p))
            .send()
    };
    assert_eq!(
        pull("alice+bot", secret.clone()).await.unwrap().status(),
        200
    );
    assert_eq!(
        pull("bob", "bob-password".into()).await.unwrap().status(),
        200
    );
    let v: Value = as_user(&app, Method::GET, "/api/v1/namespaces/alice/robots", ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["robots"][0]["name"], "alice+bot");
    // Removing bob's grant and the robot takes their access away at once.
    let r = as_user(
        &app,
        Method::DELETE,
        "/api/v1/repositories/alice/app/permissions/user/bob",
        ALICE,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    api_error(
        as_user(
            &app,
            Method::DELETE,
            "/api/v1/repositories/alice/app/permissions/user/bob",
            ALICE,
        )
        .send()
        .await
        .unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        pull("bob", "bob-password".into()).await.unwrap().status(),
        403
    );
    assert_eq!(
        as_user(
            &app,
            Method::DELETE,
            "/api/v1/namespaces/alice/robots/bot",
            ALICE
        )
        .send()
        .await
        .unwrap()
        .status(),
        204
    );
    assert_eq!(pull("alice+bot", secret).await.unwrap().status(), 401);
    let v: Value = as_user(&app, Method::GET, "/api/v1/namespaces/alice/robots", ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["robots"], json!([]));
    // Superusers list users.
    let v: Value = app.get("/api/v1/users").await.json().await.unwrap();
    let names: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "alice", "bob"]);
}
