//! The `dockyard` command line: help, `config check`, and `serve` as a real
//! process (flags, environment overrides, TLS 1.2 and 1.3).

use std::process::{Command, Stdio};
use std::time::Duration;

fn dockyard() -> Command {
    crate::harness::dockyard_command()
}

#[test]
fn help_lists_subcommands() {
    let out = dockyard().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["serve", "config", "gc", "migrate"] {
        assert!(text.contains(sub), "{sub} missing from --help:\n{text}");
    }
    let out = dockyard().args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--listen") && text.contains("--data-dir") && text.contains("--config"),
        "{text}"
    );
}

#[test]
fn config_check_explains_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dockyard.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:5000\"\n[storage]\nkind = \"s3\"\n[tls]\ncert = \"/nonexistent/cert.pem\"\n[database]\nurl = \"mysql://x\"\n",
    )
    .unwrap();
    let out = dockyard()
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["storage.bucket", "tls", "database.url", "problem"] {
        assert!(err.contains(needle), "{needle} not explained:\n{err}");
    }
    // Unknown keys and wrong types are named too.
    std::fs::write(&file, "listn = \"x\"\n").unwrap();
    let out = dockyard()
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listn"));
    std::fs::write(&file, "[registry]\nmax_manifest_size = \"big\"\n").unwrap();
    let out = dockyard()
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_manifest_size"));
    // Environment overrides the file.
    std::fs::write(&file, "[storage]\nkind = \"s3\"\n").unwrap();
    let out = dockyard()
        .args(["config", "check", "--config"])
        .arg(&file)
        .env("DOCKYARD_STORAGE_KIND", "filesystem")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dockyard()
        .args(["config", "show", "--config"])
        .arg(&file)
        .env("DOCKYARD_STORAGE_KIND", "filesystem")
        .env("DOCKYARD_LISTEN", "127.0.0.1:7777")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("kind = \"filesystem\"") && shown.contains("127.0.0.1:7777"),
        "{shown}"
    );
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_up(client: &reqwest::Client, url: &str) -> reqwest::Response {
    for _ in 0..100 {
        if let Ok(r) = client.get(url).send().await {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server at {url} did not come up");
}

#[tokio::test]
async fn serve_with_flags_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("log");
    let child = Child(
        dockyard()
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .env("DOCKYARD_BOOTSTRAP_ADMIN", crate::harness::admin_pair())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = crate::harness::admin_client();
    let r = wait_up(&client, &format!("http://127.0.0.1:{port}/v2/")).await;
    assert_eq!(r.status(), 200);
    client
        .get(format!("http://127.0.0.1:{port}/v2/x/tags/list"))
        .header("authorization", "Basic c2VjcmV0OnNlY3JldA==")
        .send()
        .await
        .unwrap();
    assert!(dir.path().join("data/dockyard.db").exists());
    drop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("listening")),
        "{text}"
    );
    // Every request line carries its request id; credentials never appear.
    assert!(
        lines.iter().any(|l| l["span"]["request_id"]
            .as_str()
            .is_some_and(|s| s.len() == 36)),
        "{text}"
    );
    assert!(
        !text.contains("c2VjcmV0") && !text.to_lowercase().contains("authorization"),
        "{text}"
    );
}

#[tokio::test]
async fn serve_tls_12_and_13() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let _child = Child(
        dockyard()
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .env("DOCKYARD_TLS_CERT", dir.path().join("cert.pem"))
            .env("DOCKYARD_TLS_KEY", dir.path().join("key.pem"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let url = format!("https://localhost:{port}/v2/");
    for (min, max) in [
        (
            reqwest::tls::Version::TLS_1_2,
            reqwest::tls::Version::TLS_1_2,
        ),
        (
            reqwest::tls::Version::TLS_1_3,
            reqwest::tls::Version::TLS_1_3,
        ),
    ] {
        let client = reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .min_tls_version(min)
            .max_tls_version(max)
            .resolve("localhost", ([127, 0, 0, 1], port).into())
            .build()
            .unwrap();
        let r = wait_up(&client, &url).await;
        assert_eq!(r.status(), 401, "{min:?}");
        assert_eq!(
            r.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        let challenge = r.headers()["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with(&format!(
                "Bearer realm=\"https://localhost:{port}/v2/auth\""
            )),
            "{challenge}"
        );
    }
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v2/"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

#[tokio::test]
async fn migrate_and_gc_commands() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dockyard()
        .arg("migrate")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("dockyard.db").exists());
    // A blob nobody references, pushed through a running server.
    let port = free_port();
    let server = Child(
        dockyard()
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data)
            .env("DOCKYARD_BOOTSTRAP_ADMIN", crate::harness::admin_pair())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = crate::harness::admin_client();
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&client, &format!("{base}/v2/")).await;
    let d = dockyard_oci::Digest::sha256(b"garbage");
    let r = client
        .post(format!("{base}/v2/g/c/blobs/uploads/?digest={d}"))
        .body("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    drop(server);
    let gc = |args: &[&str]| {
        let out = dockyard()
            .arg("gc")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(gc(&[])["blobs_deleted"], 0, "default grace keeps new blobs");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(gc(&["--grace", "1ms", "--dry-run"])["blobs_deleted"], 1);
    assert_eq!(gc(&["--grace", "1ms"])["blobs_deleted"], 1);
    assert_eq!(gc(&["--grace", "1ms"])["blobs_deleted"], 0);
}

#[test]
fn admin_create_user_and_token_cert() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut child = dockyard()
        .args([
            "admin",
            "create-user",
            "root-user",
            "--superuser",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"long-enough-password\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("superuser"));
    // Short passwords are refused with a readable message.
    let mut child = dockyard()
        .args(["admin", "create-user", "other", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"short\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 8"));
    // The token certificate is stable across calls and changes set on rotation.
    let cert = |args: &[&str]| {
        let out = dockyard()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = cert(&["admin", "token-cert"]);
    assert_eq!(first.matches("BEGIN CERTIFICATE").count(), 1);
    assert_eq!(cert(&["admin", "token-cert"]), first);
    cert(&["admin", "rotate-token-key"]);
    let after = cert(&["admin", "token-cert"]);
    assert_eq!(after.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(after.contains(first.trim()));
}
