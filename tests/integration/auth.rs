//! The Docker token service (`/v2/auth`): who gets which actions, in which
//! token format, and how failures answer.

use base64::Engine as _;
use dockyard_core::identity::{Role, TokenKind};
use dockyard_core::token::TokenKeys;
use reqwest::Method;
use serde_json::Value;

use crate::harness::*;

async fn app() -> TestApp {
    TestApp::start().await
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

fn jwt_header(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .unwrap(),
    )
    .unwrap()
}

async fn token(app: &TestApp, creds: Option<(&str, &str)>, query: &str) -> reqwest::Response {
    let mut req = app.anon.get(app.url(&format!("/v2/auth?{query}")));
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn password_login_issues_scoped_verifiable_tokens() {
    let app = app().await;
    let r = token(
        &app,
        Some(ADMIN),
        "service=dockyard&scope=repository:team/app:pull,push&scope=repository:other/x:pull",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "cache-control").as_deref(), Some("no-store"));
    let body: Value = r.json().await.unwrap();
    let t = body["token"].as_str().unwrap();
    assert_eq!(body["access_token"], body["token"]);
    assert_eq!(body["expires_in"], 300);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    let c = claims(t);
    assert_eq!(c["iss"], "dockyard");
    assert_eq!(c["aud"], "dockyard", "aud is one string");
    assert_eq!(c["sub"], "admin");
    assert_eq!(c["access"].as_array().unwrap().len(), 2);
    assert_eq!(c["access"][0]["type"], "repository");
    assert_eq!(c["access"][0]["name"], "team/app");
    assert_eq!(
        c["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );
    // The signature verifies with the installation's keys, and the header
    // carries the libtrust kid and the certificate.
    let keys = TokenKeys::load_or_create(&app.config.keys_dir(), "dockyard").unwrap();
    assert_eq!(keys.verify(t, "dockyard", "dockyard").unwrap().sub, "admin");
    let h = jwt_header(t);
    assert_eq!(h["alg"], "ES256");
    assert_eq!(h["kid"], keys.kid());
    let x5c = h["x5c"][0].as_str().unwrap();
    let pem = keys.certificates_pem();
    let der = pem::parse(&pem).unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(x5c)
            .unwrap(),
        der.contents()
    );

    // Wrong password, unknown user, garbage header: 401, and failures are audited.
    for creds in [(ADMIN.0, "wrong"), ("ghost", "whatever")] {
        let r = token(
            &app,
            Some(creds),
            "service=dockyard&scope=repository:team/app:pull",
        )
        .await;
        assert_error(r, 401, "UNAUTHORIZED").await;
    }
    let r = app
        .req(Method::GET, "/v2/auth?service=dockyard")
        .header("authorization", "Bearer nonsense")
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "UNAUTHORIZED").await;
    let id = app.identity().await;
    let failures: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT COUNT(*) FROM audit_log WHERE action = 'login' AND success = 0")
            .fetch_one(&id.db.read)
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    assert_eq!(failures, 2);
    // Unknown service, malformed scope.
    assert_error(
        token(&app, Some(ADMIN), "service=elsewhere").await,
        400,
        "UNSUPPORTED",
    )
    .await;
    assert_error(
        token(&app, Some(ADMIN), "service=dockyard&scope=nonsense").await,
        400,
        "UNSUPPORTED",
    )
    .await;
}

#[tokio::test]
async fn grants_follow_permissions() {
    let app = app().await;
    let id = app.identity().await;
    let alice = id
        .create_user("alice", Some("alice-password"), false)
        .await
        .unwrap();
    id.create_org("acme", alice).await.unwrap();
    id.create_user("bob", Some("bob-password"), false)
        .await
        .unwrap();
    app.push_blob("acme/app", b"x").await;
    app.push_blob("acme/site", b"y").await;
    sqlx::query("UPDATE repositories SET visibility = 'public' WHERE name = 'acme/site'")
        .execute(&id.db.write)
        .await
        .unwrap();
    let repo_id: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT id FROM repositories WHERE name = 'acme/app'")
            .fetch_one(&id.db.read)
            .await
            .unwrap(),
        0,
    )
    .unwrap();

    let actions = |v: &Value, name: &str| -> Vec<String> {
        claims(v["token"].as_str().unwrap())["access"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .map(|a| serde_json::from_value(a["actions"].clone()).unwrap())
            .unwrap_or_default()
    };
    let ask = |creds: Option<(&'static str, &'static str)>| {
        let app = &app;
        async move {
            let r = token(app, creds, "service=dockyard&scope=repository:acme/app:pull,push,delete&scope=repository:acme/site:pull,push").await;
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    // The org owner gets everything asked for.
    let v = ask(Some(("alice", "alice-password"))).await;
    assert_eq!(actions(&v, "acme/app"), ["pull", "push", "delete"]);
    // Bob: nothing on the private repository, read on the public one.
    let v = ask(Some(("bob", "bob-password"))).await;
    assert!(actions(&v, "acme/app").is_empty());
    assert_eq!(actions(&v, "acme/site"), ["pull"]);
    // Anonymous: public pull only.
    let v = ask(None).await;
    assert!(actions(&v, "acme/app").is_empty());
    assert_eq!(actions(&v, "acme/site"), ["pull"]);
    assert_eq!(claims(v["token"].as_str().unwrap())["sub"], "");
    // A read-only robot with its token (not a password).
    let (robot, name) = id.create_robot("acme", "reader").await.unwrap();
    id.grant(repo_id, "robot", robot, Role::Read).await.unwrap();
    let (tid, secret) = id
        .create_token(TokenKind::Robot, None, Some(robot), "ci", None)
        .await
        .unwrap();
    let r = app
        .req(
            Method::GET,
            "/v2/auth?service=dockyard&scope=repository:acme/app:pull,push",
        )
        .basic_auth(&name, Some(&secret))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(actions(&v, "acme/app"), ["pull"]);
    // The token under another name, and after revocation, is refused.
    let r = app
        .req(Method::GET, "/v2/auth?service=dockyard")
        .basic_auth("bob", Some(&secret))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "UNAUTHORIZED").await;
    id.revoke_token(&tid).await.unwrap();
    let r = app
        .req(Method::GET, "/v2/auth?service=dockyard")
        .basic_auth(&name, Some(&secret))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "UNAUTHORIZED").await;
}

#[tokio::test]
async fn notary_service_and_oauth2_form() {
    let app = app().await;
    // Notary names carry the registry host; the claim keeps it, the
    // permission lookup strips it. A superuser gets `*`.
    let r = token(
        &app,
        Some(ADMIN),
        "service=dockyard-notary&scope=repository:registry.example:5000/team/app:pull,push,*",
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let c = claims(v["token"].as_str().unwrap());
    assert_eq!(c["aud"], "dockyard-notary");
    assert_eq!(c["access"][0]["name"], "registry.example:5000/team/app");
    assert_eq!(
        c["access"][0]["actions"],
        serde_json::json!(["pull", "push", "*"])
    );

    // OAuth2 password grant with a refresh token, then the refresh grant.
    let r = app
        .anon
        .post(app.url("/v2/auth"))
        .form(&[
            ("grant_type", "password"),
            ("username", ADMIN.0),
            ("password", ADMIN.1),
            ("service", "dockyard"),
            ("scope", "repository:team/app:pull"),
            ("access_type", "offline"),
            ("client_id", "test"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    assert!(refresh.starts_with("dyf_"));
    assert_eq!(
        claims(v["access_token"].as_str().unwrap())["access"][0]["actions"],
        serde_json::json!(["pull"])
    );
    let r = app
        .anon
        .post(app.url("/v2/auth"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("service", "dockyard"),
            ("scope", "repository:team/app:pull,push"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(claims(v["access_token"].as_str().unwrap())["sub"], "admin");
    // A refresh token is not a password, and a bad one is refused.
    let r = token(&app, Some((ADMIN.0, refresh.as_str())), "service=dockyard").await;
    assert_error(r, 401, "UNAUTHORIZED").await;
    let r = app
        .anon
        .post(app.url("/v2/auth"))
        .form(&[
            ("grant_type", "refresh_token"),
            (
                "refresh_token",
                "dyf_aaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            ),
        ])
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "UNAUTHORIZED").await;
    let r = app
        .anon
        .post(app.url("/v2/auth"))
        .form(&[
            ("grant_type", "password"),
            ("username", ADMIN.0),
            ("password", "nope"),
        ])
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "UNAUTHORIZED").await;
    let r = app
        .anon
        .post(app.url("/v2/auth"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "UNSUPPORTED").await;
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let app = app().await;
    let id = app.identity().await;
    id.create_user("carol", Some("carol-password"), false)
        .await
        .unwrap();
    id.create_user("dave", Some("dave-password"), false)
        .await
        .unwrap();
    for _ in 0..dockyard_core::ratelimit::PER_ACCOUNT {
        let r = token(&app, Some(("carol", "guess")), "service=dockyard").await;
        assert_error(r, 401, "UNAUTHORIZED").await;
    }
    // Now even the right password waits, on the token service and on /v2.
    let r = token(&app, Some(("carol", "carol-password")), "service=dockyard").await;
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 300);
    assert_error(r, 429, "TOOMANYREQUESTS").await;
    let r = app
        .anon
        .get(app.url("/v2/"))
        .basic_auth("carol", Some("carol-password"))
        .send()
        .await
        .unwrap();
    assert!(header(&r, "retry-after").is_some());
    assert_error(r, 429, "TOOMANYREQUESTS").await;
    // Another account from the same address is not affected yet.
    let r = token(&app, Some(("dave", "dave-password")), "service=dockyard").await;
    assert_eq!(r.status(), 200);
    let failures: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT COUNT(*) FROM audit_log WHERE action = 'login' AND success = 0 AND target = 'carol'")
            .fetch_one(&id.db.read)
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    assert_eq!(failures as usize, dockyard_core::ratelimit::PER_ACCOUNT);
}
