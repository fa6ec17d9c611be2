//! A stock `notary-server` (Debian package `notary`), configured with
//! `auth.type = token`, Dockyard's token service as realm and the
//! certificate from `dockyard admin token-cert` as `rootcertbundle`, accepts
//! Dockyard's tokens for its service and refuses the others.

use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::*;

struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn notary_server_accepts_dockyard_tokens() {
    assert!(
        Command::new("notary-server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok(),
        "notary-server is not installed (Debian package `notary`); `cargo xtask test` installs it"
    );
    let app =
        TestApp::start_with(|c| c.bootstrap_admin = Some(format!("{}:{}", ADMIN.0, ADMIN.1))).await;
    let dir = tempfile::tempdir().unwrap();
    // The operator's step: export the token certificate for notary.
    let out = Command::new(env!("CARGO_BIN_EXE_dockyard"))
        .args(["admin", "token-cert", "--data-dir"])
        .arg(&app.config.data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = dir.path().join("dockyard-token.pem");
    std::fs::write(&bundle, &out.stdout).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = json!({
        "server": { "http_addr": format!("127.0.0.1:{port}") },
        "trust_service": { "type": "local", "hostname": "", "port": "", "key_algorithm": "ecdsa" },
        "storage": { "backend": "memory" },
        "auth": { "type": "token", "options": {
            "realm": app.url("/v2/auth"),
            "service": "dockyard-notary",
            "issuer": "dockyard",
            "rootcertbundle": bundle.to_str().unwrap(),
        }},
        "logging": { "level": "info" },
    });
    let config_path = dir.path().join("server.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let log = std::fs::File::create(dir.path().join("notary.log")).unwrap();
    let _notary = Server(
        Command::new("notary-server")
            .arg("-config")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let gun = "registry.example:5000/team/app";
    let url = format!("http://127.0.0.1:{port}/v2/{gun}/_trust/tuf/root.json");
    let mut up = false;
    for _ in 0..100 {
        if client.get(&url).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        up,
        "notary-server did not start: {}",
        std::fs::read_to_string(dir.path().join("notary.log")).unwrap_or_default()
    );

    // Without a token: a challenge pointing at Dockyard.
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = header(&r, "www-authenticate").unwrap();
    assert!(
        challenge.contains(&app.url("/v2/auth")) && challenge.contains("dockyard-notary"),
        "{challenge}"
    );

    // A Dockyard token for the notary service with pull: accepted (the
    // collection has no trust data yet, hence 404, not 401).
    let t = fetch_token(
        &app,
        Some(ADMIN),
        "dockyard-notary",
        &format!("repository:{gun}:pull"),
    )
    .await;
    let r = client.get(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "{}",
        r.text().await.unwrap()
    );

    // Publishing needs push+pull: the admin's token passes the auth check.
    let t = fetch_token(
        &app,
        Some(ADMIN),
        "dockyard-notary",
        &format!("repository:{gun}:pull,push,*"),
    )
    .await;
    let r = client
        .post(format!("http://127.0.0.1:{port}/v2/{gun}/_trust/tuf/"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_ne!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "push token refused: {}",
        r.text().await.unwrap()
    );

    // Refused: an anonymous token for a private repository (no access), a
    // token for the registry's own service, and a forged one.
    let anon = fetch_token(
        &app,
        None,
        "dockyard-notary",
        &format!("repository:{gun}:pull"),
    )
    .await;
    assert_eq!(
        client
            .get(&url)
            .bearer_auth(&anon)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let registry_token = fetch_token(
        &app,
        Some(ADMIN),
        "dockyard",
        &format!("repository:{gun}:pull"),
    )
    .await;
    assert_eq!(
        client
            .get(&url)
            .bearer_auth(&registry_token)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let t = fetch_token(
        &app,
        Some(ADMIN),
        "dockyard-notary",
        &format!("repository:{gun}:pull"),
    )
    .await;
    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
    parts[2] = parts[2].chars().rev().collect();
    assert_eq!(
        client
            .get(&url)
            .bearer_auth(parts.join("."))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );

    // The notary CLI reads anonymously: once the repository is public, an
    // anonymous token for the notary service reads its trust data.
    app.push_blob("team/app", b"make the repository exist")
        .await;
    let id = app.identity().await;
    id.update_repository("team/app", Some("public"), None)
        .await
        .unwrap();
    let anon = fetch_token(
        &app,
        None,
        "dockyard-notary",
        &format!("repository:{gun}:pull"),
    )
    .await;
    let r = client.get(&url).bearer_auth(&anon).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "anonymous read of a public repository"
    );
    // ...but cannot publish.
    let anon = fetch_token(
        &app,
        None,
        "dockyard-notary",
        &format!("repository:{gun}:pull,push"),
    )
    .await;
    let r = client
        .post(format!("http://127.0.0.1:{port}/v2/{gun}/_trust/tuf/"))
        .bearer_auth(&anon)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
