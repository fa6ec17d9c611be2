//! Access control on every registry route: the permission matrix, the
//! Docker token flow a client follows, catalog filtering and mounts.

use std::collections::BTreeSet;

use dockyard_core::identity::{Role, TokenKind};
use dockyard_oci::{Digest, Route};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

use crate::harness::*;

/// One kind of caller.
#[derive(Clone)]
enum Cred {
    None,
    Basic(String, String),
    Bearer(String),
}

fn apply(req: RequestBuilder, c: &Cred) -> RequestBuilder {
    match c {
        Cred::None => req,
        Cred::Basic(u, p) => req.basic_auth(u, Some(p)),
        Cred::Bearer(t) => req.bearer_auth(t),
    }
}

/// What a caller may do on the matrix repository.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    /// Invalid or missing credentials: 401 everywhere, `/v2/` included.
    Rejected,
    /// Valid, no access to the repository.
    Authenticated,
    Pull,
    Push,
    Delete,
}

#[tokio::test]
async fn permission_matrix_covers_every_route() {
    let app = TestApp::start_with(|c| c.auth.token_ttl = std::time::Duration::from_secs(30)).await;
    let id = app.identity().await;
    let owner = id
        .create_user("owner", Some("owner-password"), false)
        .await
        .unwrap();
    id.create_org("acme", owner).await.unwrap();
    for (u, p) in [
        ("reader", "reader-password"),
        ("writer", "writer-password"),
        ("outsider", "outsider-password"),
    ] {
        id.create_user(u, Some(p), false).await.unwrap();
    }
    let (digest, _) = app.push_image("acme/app", "v1", &[b"matrix layer"]).await;
    let layer = Digest::sha256(b"matrix layer");
    let repo_id: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT id FROM repositories WHERE name = 'acme/app'")
            .fetch_one(&id.db.read)
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    let uid = |name: &'static str| {
        let id = id.clone();
        async move {
            let row = sqlx::query("SELECT id FROM users WHERE username = $1")
                .bind(name)
                .fetch_one(&id.db.read)
                .await
                .unwrap();
            sqlx::Row::try_get::<i64, _>(&row, 0).unwrap()
        }
    };
    id.grant(repo_id, "user", uid("reader").await, Role::Read)
        .await
        .unwrap();
    id.grant(repo_id, "user", uid("writer").await, Role::Write)
        .await
        .unwrap();
    let (robot_ro, ro_name) = id.create_robot("acme", "ro").await.unwrap();
    let (robot_rw, rw_name) = id.create_robot("acme", "rw").await.unwrap();
    let (robot_none, none_name) = id.create_robot("acme", "none").await.unwrap();
    id.grant(repo_id, "robot", robot_ro, Role::Read)
        .await
        .unwrap();
    id.grant(repo_id, "robot", robot_rw, Role::Write)
        .await
        .unwrap();
    let (_, ro_secret) = id
        .create_token(TokenKind::Robot, None, Some(robot_ro), "t", None)
        .await
        .unwrap();
    let (_, rw_secret) = id
        .create_token(TokenKind::Robot, None, Some(robot_rw), "t", None)
        .await
        .unwrap();
    let (_, none_secret) = id
        .create_token(TokenKind::Robot, None, Some(robot_none), "t", None)
        .await
        .unwrap();
    let (revoked_id, revoked_secret) = id
        .create_token(TokenKind::Robot, None, Some(robot_rw), "old", None)
        .await
        .unwrap();
    id.revoke_token(&revoked_id).await.unwrap();
    let (_, expired_secret) = id
        .create_token(
            TokenKind::Robot,
            None,
            Some(robot_rw),
            "exp",
            Some(dockyard_core::now_millis() - 1000),
        )
        .await
        .unwrap();

    let all = "repository:acme/app:pull,push,delete";
    let admin_token = fetch_token(&app, Some(ADMIN), "dockyard", all).await;
    let reader_token =
        fetch_token(&app, Some(("reader", "reader-password")), "dockyard", all).await;
    let robot_ro_token = fetch_token(&app, Some((&ro_name, &ro_secret)), "dockyard", all).await;
    let robot_rw_token = fetch_token(&app, Some((&rw_name, &rw_secret)), "dockyard", all).await;
    let notary_token = fetch_token(&app, Some(ADMIN), "dockyard-notary", all).await;
    let mut forged: Vec<String> = admin_token.split('.').map(str::to_string).collect();
    forged[2] = forged[2].chars().rev().collect();
    let forged = forged.join(".");
    // A correctly signed token that expired: signed with the server's key.
    let keys = dockyard_core::token::TokenKeys::load_or_create(&app.config.keys_dir(), "dockyard")
        .unwrap();
    let now = dockyard_core::now_millis() / 1000;
    let expired_jwt = keys
        .sign(&dockyard_core::token::Claims {
            iss: "dockyard".into(),
            sub: "admin".into(),
            aud: "dockyard".into(),
            exp: now - 120,
            nbf: now - 600,
            iat: now - 600,
            jti: "x".into(),
            access: vec![dockyard_core::token::Access {
                kind: "repository".into(),
                name: "acme/app".into(),
                actions: vec!["*".into()],
            }],
        })
        .unwrap();

    let callers: Vec<(&str, Cred, Level)> = vec![
        ("anonymous", Cred::None, Level::Rejected),
        (
            "admin basic",
            Cred::Basic(ADMIN.0.into(), ADMIN.1.into()),
            Level::Delete,
        ),
        ("admin token", Cred::Bearer(admin_token), Level::Delete),
        (
            "owner basic",
            Cred::Basic("owner".into(), "owner-password".into()),
            Level::Delete,
        ),
        (
            "writer basic",
            Cred::Basic("writer".into(), "writer-password".into()),
            Level::Push,
        ),
        (
            "reader basic",
            Cred::Basic("reader".into(), "reader-password".into()),
            Level::Pull,
        ),
        ("reader token", Cred::Bearer(reader_token), Level::Pull),
        (
            "outsider basic",
            Cred::Basic("outsider".into(), "outsider-password".into()),
            Level::Authenticated,
        ),
        (
            "wrong password",
            Cred::Basic("reader".into(), "nope".into()),
            Level::Rejected,
        ),
        (
            "robot ro basic",
            Cred::Basic(ro_name.clone(), ro_secret.clone()),
            Level::Pull,
        ),
        ("robot ro token", Cred::Bearer(robot_ro_token), Level::Pull),
        ("robot rw token", Cred::Bearer(robot_rw_token), Level::Push),
        (
            "robot without permission",
            Cred::Basic(none_name.clone(), none_secret.clone()),
            Level::Authenticated,
        ),
        (
            "revoked robot token",
            Cred::Basic(rw_name.clone(), revoked_secret),
            Level::Rejected,
        ),
        (
            "expired robot token",
            Cred::Basic(rw_name.clone(), expired_secret),
            Level::Rejected,
        ),
        ("expired jwt", Cred::Bearer(expired_jwt), Level::Rejected),
        ("forged jwt", Cred::Bearer(forged), Level::Rejected),
        (
            "jwt for another service",
            Cred::Bearer(notary_token),
            Level::Rejected,
        ),
    ];

    // Every route and method, with the level it needs. Deletes and pushes
    // aim at things that do not exist (or are invalid), so an allowed
    // request changes nothing and shows up as a 4xx other than 401/403.
    let unknown = Digest::sha256(b"unknown");
    let routes: Vec<(&str, Method, String, Level)> = vec![
        ("base", Method::GET, "/v2/".into(), Level::Authenticated),
        (
            "catalog",
            Method::GET,
            "/v2/_catalog".into(),
            Level::Authenticated,
        ),
        (
            "tags",
            Method::GET,
            "/v2/acme/app/tags/list".into(),
            Level::Pull,
        ),
        (
            "manifest",
            Method::GET,
            "/v2/acme/app/manifests/v1".into(),
            Level::Pull,
        ),
        (
            "manifest",
            Method::HEAD,
            format!("/v2/acme/app/manifests/{digest}"),
            Level::Pull,
        ),
        (
            "manifest",
            Method::PUT,
            "/v2/acme/app/manifests/new".into(),
            Level::Push,
        ),
        (
            "manifest",
            Method::DELETE,
            format!("/v2/acme/app/manifests/{unknown}"),
            Level::Delete,
        ),
        (
            "blob",
            Method::GET,
            format!("/v2/acme/app/blobs/{layer}"),
            Level::Pull,
        ),
        (
            "blob",
            Method::HEAD,
            format!("/v2/acme/app/blobs/{layer}"),
            Level::Pull,
        ),
        (
            "blob",
            Method::DELETE,
            format!("/v2/acme/app/blobs/{unknown}"),
            Level::Delete,
        ),
        (
            "upload_start",
            Method::POST,
            "/v2/acme/app/blobs/uploads/".into(),
            Level::Push,
        ),
        (
            "upload",
            Method::GET,
            "/v2/acme/app/blobs/uploads/nonexistent".into(),
            Level::Push,
        ),
        (
            "upload",
            Method::PATCH,
            "/v2/acme/app/blobs/uploads/nonexistent".into(),
            Level::Push,
        ),
        (
            "upload",
            Method::PUT,
            format!("/v2/acme/app/blobs/uploads/nonexistent?digest={unknown}"),
            Level::Push,
        ),
        (
            "upload",
            Method::DELETE,
            "/v2/acme/app/blobs/uploads/nonexistent".into(),
            Level::Push,
        ),
        (
            "referrers",
            Method::GET,
            format!("/v2/acme/app/referrers/{digest}"),
            Level::Pull,
        ),
    ];
    let covered: BTreeSet<&str> = routes.iter().map(|r| r.0).collect();
    let all_kinds: BTreeSet<&str> = Route::KINDS.iter().copied().collect();
    assert_eq!(
        covered, all_kinds,
        "a registry route is missing from the permission matrix"
    );

    let mut failures = vec![];
    for (cname, cred, level) in &callers {
        for (kind, method, path, needed) in &routes {
            let body = if *method == Method::PUT && *kind == "manifest" {
                "{not json".to_string()
            } else {
                String::new()
            };
            let req = apply(
                app.anon
                    .request(method.clone(), app.url(path))
                    .header("content-type", OCI_MANIFEST)
                    .body(body),
                cred,
            );
            let r = req.send().await.unwrap();
            let status = r.status();
            let allowed = match level {
                Level::Rejected => false,
                _ => {
                    *level >= *needed
                        || *needed == Level::Authenticated && *level != Level::Rejected
                }
            };
            let ok = if allowed {
                status != StatusCode::UNAUTHORIZED
                    && status != StatusCode::FORBIDDEN
                    && !status.is_server_error()
            } else if *level == Level::Rejected || matches!(cred, Cred::None) {
                // Repeated failed logins from this address end in 429.
                status == StatusCode::UNAUTHORIZED
                    || matches!(cred, Cred::Basic(..)) && status == StatusCode::TOO_MANY_REQUESTS
            } else {
                // Valid but not enough: 401 DENIED for tokens, 403 for basic.
                status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED
            };
            if !ok {
                failures.push(format!(
                    "{cname}: {method} {path} -> {status} (allowed: {allowed})"
                ));
            }
            if status == StatusCode::UNAUTHORIZED && *method != Method::HEAD {
                let challenge = header(&r, "www-authenticate");
                let text = r.text().await.unwrap();
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                let code = v["errors"][0]["code"].as_str().unwrap_or("").to_string();
                if !(code == "UNAUTHORIZED" || code == "DENIED") {
                    failures.push(format!("{cname}: {method} {path}: 401 with code {code:?}"));
                }
                if code == "UNAUTHORIZED" && challenge.is_none() {
                    failures.push(format!("{cname}: {method} {path}: 401 without a challenge"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "permission matrix:\n{}",
        failures.join("\n")
    );
    // The repository is as it was.
    assert_eq!(
        app.get(&format!("/v2/acme/app/manifests/{digest}"))
            .await
            .status(),
        200
    );
}

impl PartialOrd for Level {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        fn rank(l: &Level) -> u8 {
            match l {
                Level::Rejected => 0,
                Level::Authenticated => 1,
                Level::Pull => 2,
                Level::Push => 3,
                Level::Delete => 4,
            }
        }
        rank(self).partial_cmp(&rank(other))
    }
}

#[tokio::test]
async fn docker_token_flow_and_catalog_filtering() {
    let app = TestApp::start().await;
    let id = app.identity().await;
    id.create_user("alice", Some("alice-password"), false)
        .await
        .unwrap();
    app.push_image("alice/app", "v1", &[b"alice layer"]).await;
    app.push_image("secret/app", "v1", &[b"secret layer"]).await;
    app.push_image("open/site", "v1", &[b"open layer"]).await;
    sqlx::query("UPDATE repositories SET visibility = 'public' WHERE name = 'open/site'")
        .execute(&id.db.write)
        .await
        .unwrap();

    // A client's first request: 401 with where to get a token and for what.
    let r = app
        .anon
        .get(app.url("/v2/alice/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = header(&r, "www-authenticate").unwrap();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"http://{}/v2/auth\",service=\"dockyard\",scope=\"repository:alice/app:pull\"",
            app.addr
        )
    );
    assert_error(r, 401, "UNAUTHORIZED").await;
    let r = app
        .anon
        .post(app.url("/v2/alice/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert!(
        header(&r, "www-authenticate")
            .unwrap()
            .contains("scope=\"repository:alice/app:pull,push\"")
    );
    // Then the token, then the request with it.
    let t = fetch_token(
        &app,
        Some(("alice", "alice-password")),
        "dockyard",
        "repository:alice/app:pull",
    )
    .await;
    let r = app
        .anon
        .get(app.url("/v2/alice/app/manifests/v1"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The same token cannot push: 401 DENIED asking for more scope.
    let r = app
        .anon
        .post(app.url("/v2/alice/app/blobs/uploads/"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    let challenge = header(&r, "www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert_error(r, 401, "DENIED").await;
    // Public repositories pull anonymously (with an anonymous token).
    let t = fetch_token(&app, None, "dockyard", "repository:open/site:pull").await;
    assert_eq!(
        app.anon
            .get(app.url("/v2/open/site/manifests/v1"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.anon
            .get(app.url("/v2/"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // ...but not push.
    let t = fetch_token(&app, None, "dockyard", "repository:open/site:pull,push").await;
    let r = app
        .anon
        .post(app.url("/v2/open/site/blobs/uploads/"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "DENIED").await;

    // The catalog lists what the caller can read.
    let list = |r: reqwest::Response| async move {
        r.json::<Value>().await.unwrap()["repositories"].clone()
    };
    let v = list(
        app.anon
            .get(app.url("/v2/_catalog"))
            .basic_auth("alice", Some("alice-password"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v, serde_json::json!(["alice/app", "open/site"]));
    let v = list(app.get("/v2/_catalog").await).await;
    assert_eq!(
        v,
        serde_json::json!(["alice/app", "open/site", "secret/app"])
    );
    let v = list(
        app.anon
            .get(app.url("/v2/_catalog?n=1"))
            .basic_auth("alice", Some("alice-password"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v, serde_json::json!(["alice/app"]));
    let t = fetch_token(&app, None, "dockyard", "registry:catalog:*").await;
    let r = app
        .anon
        .get(app.url("/v2/_catalog"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(
        list(r).await,
        serde_json::json!(["open/site"]),
        "anonymous sees public repositories only"
    );

    // Mounting needs pull on the source: alice cannot mount from secret/app.
    let secret_layer = Digest::sha256(b"secret layer");
    let r = app
        .anon
        .post(app.url(&format!(
            "/v2/alice/app/blobs/uploads/?mount={secret_layer}&from=secret/app"
        )))
        .basic_auth("alice", Some("alice-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        202,
        "a refused mount falls back to an upload session"
    );
    let r = app
        .anon
        .get(app.url(&format!("/v2/alice/app/blobs/{secret_layer}")))
        .basic_auth("alice", Some("alice-password"))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn pushes_and_deletes_are_audited() {
    let app = TestApp::start().await;
    let (d, _) = app.push_image("audit/app", "v1", &[b"audited layer"]).await;
    assert_eq!(
        app.req(Method::DELETE, "/v2/audit/app/manifests/v1")
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        app.req(Method::DELETE, &format!("/v2/audit/app/manifests/{d}"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    // A refused push is not recorded as a push.
    let r = app
        .anon
        .put(app.url("/v2/audit/app/manifests/v2"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let id = app.identity().await;
    let rows = sqlx::query("SELECT actor, action, target, address FROM audit_log WHERE action IN ('push', 'delete') ORDER BY id")
        .fetch_all(&id.db.read)
        .await
        .unwrap();
    let got: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| {
            use sqlx::Row;
            (
                r.try_get(0).unwrap(),
                r.try_get(1).unwrap(),
                r.try_get(2).unwrap(),
                r.try_get(3).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "admin".into(),
                "push".into(),
                "audit/app:v1".into(),
                "127.0.0.1".into()
            ),
            (
                "admin".into(),
                "delete".into(),
                "audit/app:v1".into(),
                "127.0.0.1".into()
            ),
            (
                "admin".into(),
                "delete".into(),
                format!("audit/app:{d}"),
                "127.0.0.1".into()
            ),
        ]
    );
}
