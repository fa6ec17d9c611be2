//! Inbound git push webhooks: signature verification (constant time) and
//! payload parsing for GitHub (`X-Hub-Signature-256`), GitLab
//! (`X-Gitlab-Token`) and a generic format (`{commit, ref, default_branch}`
//! signed with `X-Dockyard-Signature-256: sha256=<hex HMAC-SHA256 of the body>`).

use hmac::{Hmac, Mac};
use http::HeaderMap;
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Header carrying the generic format's signature.
pub const GENERIC_SIGNATURE: &str = "x-dockyard-signature-256";

/// Kinds of trigger.
pub const KINDS: [&str; 3] = ["github", "gitlab", "generic"];

/// A push, as the webhook describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// `refs/heads/main` or `refs/tags/v1`.
    pub git_ref: String,
    /// Full commit id.
    pub commit: String,
    pub default_branch: Option<String>,
    /// Clone URL from the payload, if any.
    pub clone_url: Option<String>,
}

/// What to do with a delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A push to build.
    Push(Push),
    /// Valid, but nothing to build (ping, branch deletion, other events).
    Ignored(String),
}

/// Why a delivery was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("missing signature header {0}")]
    MissingSignature(&'static str),
    #[error("signature does not match")]
    BadSignature,
    #[error("malformed payload: {0}")]
    Malformed(String),
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Checks `sha256=<hex>` against the HMAC-SHA256 of `body` under `secret`.
pub fn hmac_matches(secret: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// The `sha256=<hex>` signature of `body` (for tests and clients).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Verifies and parses one delivery of a trigger of `kind`.
pub fn verify_and_parse(
    kind: &str,
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Delivery, Rejection> {
    match kind {
        "github" => {
            let sig = header(headers, "x-hub-signature-256")
                .ok_or(Rejection::MissingSignature("X-Hub-Signature-256"))?;
            if !hmac_matches(secret, body, sig) {
                return Err(Rejection::BadSignature);
            }
            let event = header(headers, "x-github-event").unwrap_or("push");
            if event != "push" {
                return Ok(Delivery::Ignored(format!("event {event:?} is not a push")));
            }
            let v = json(body)?;
            if v["deleted"].as_bool() == Some(true) {
                return Ok(Delivery::Ignored("ref deleted".into()));
            }
            push_from(
                &v,
                "after",
                &v["repository"]["default_branch"],
                &v["repository"]["clone_url"],
            )
        }
        "gitlab" => {
            let token = header(headers, "x-gitlab-token")
                .ok_or(Rejection::MissingSignature("X-Gitlab-Token"))?;
            if !bool::from(token.as_bytes().ct_eq(secret.as_bytes())) {
                return Err(Rejection::BadSignature);
            }
            let event = header(headers, "x-gitlab-event").unwrap_or("Push Hook");
            if event != "Push Hook" && event != "Tag Push Hook" {
                return Ok(Delivery::Ignored(format!("event {event:?} is not a push")));
            }
            let v = json(body)?;
            let commit_key = if v["checkout_sha"].is_string() {
                "checkout_sha"
            } else {
                "after"
            };
            push_from(
                &v,
                commit_key,
                &v["project"]["default_branch"],
                &v["project"]["git_http_url"],
            )
        }
        "generic" => {
            let sig = header(headers, GENERIC_SIGNATURE)
                .ok_or(Rejection::MissingSignature("X-Dockyard-Signature-256"))?;
            if !hmac_matches(secret, body, sig) {
                return Err(Rejection::BadSignature);
            }
            let v = json(body)?;
            push_from(&v, "commit", &v["default_branch"], &v["clone_url"])
        }
        other => Err(Rejection::Malformed(format!(
            "unknown trigger kind {other}"
        ))),
    }
}

fn json(body: &[u8]) -> Result<Value, Rejection> {
    serde_json::from_slice(body).map_err(|e| Rejection::Malformed(e.to_string()))
}

fn push_from(
    v: &Value,
    commit_key: &str,
    default_branch: &Value,
    clone_url: &Value,
) -> Result<Delivery, Rejection> {
    let git_ref = v["ref"]
        .as_str()
        .ok_or_else(|| Rejection::Malformed("no \"ref\"".into()))?;
    let commit = v[commit_key]
        .as_str()
        .ok_or_else(|| Rejection::Malformed(format!("no \"{commit_key}\"")))?;
    let git_ref = if git_ref.starts_with("refs/") {
        git_ref.to_string()
    } else {
        format!("refs/heads/{git_ref}")
    };
    if !(git_ref.starts_with("refs/heads/") || git_ref.starts_with("refs/tags/")) {
        return Ok(Delivery::Ignored(format!(
            "{git_ref} is not a branch or tag"
        )));
    }
    if commit.len() < 7 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Rejection::Malformed(format!(
            "{commit:?} is not a commit id"
        )));
    }
    if commit.bytes().all(|b| b == b'0') {
        return Ok(Delivery::Ignored("ref deleted".into()));
    }
    Ok(Delivery::Push(Push {
        git_ref,
        commit: commit.to_ascii_lowercase(),
        default_branch: default_branch.as_str().map(str::to_string),
        clone_url: clone_url.as_str().map(str::to_string),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn github() {
        let body = br#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567","repository":{"default_branch":"main","clone_url":"https://x/y.git"}}"#;
        let sig = sign("s3cret", body);
        let d = verify_and_parse(
            "github",
            "s3cret",
            &headers(&[("x-hub-signature-256", &sig), ("x-github-event", "push")]),
            body,
        )
        .unwrap();
        let Delivery::Push(p) = d else { panic!() };
        assert_eq!(p.git_ref, "refs/heads/main");
        assert_eq!(p.default_branch.as_deref(), Some("main"));
        assert_eq!(
            verify_and_parse(
                "github",
                "other",
                &headers(&[("x-hub-signature-256", &sig)]),
                body
            ),
            Err(Rejection::BadSignature)
        );
        assert!(matches!(
            verify_and_parse("github", "s3cret", &HeaderMap::new(), body),
            Err(Rejection::MissingSignature(_))
        ));
        let ping = verify_and_parse(
            "github",
            "s3cret",
            &headers(&[("x-hub-signature-256", &sig), ("x-github-event", "ping")]),
            body,
        )
        .unwrap();
        assert!(matches!(ping, Delivery::Ignored(_)));
    }

    #[test]
    fn gitlab_and_generic() {
        let body = br#"{"ref":"refs/tags/v1","checkout_sha":"0123456789abcdef0123456789abcdef01234567","project":{"default_branch":"main"}}"#;
        let d = verify_and_parse(
            "gitlab",
            "tok",
            &headers(&[
                ("x-gitlab-token", "tok"),
                ("x-gitlab-event", "Tag Push Hook"),
            ]),
            body,
        )
        .unwrap();
        assert!(matches!(d, Delivery::Push(p) if p.git_ref == "refs/tags/v1"));
        assert_eq!(
            verify_and_parse(
                "gitlab",
                "tok",
                &headers(&[("x-gitlab-token", "nope")]),
                body
            ),
            Err(Rejection::BadSignature)
        );
        let body = br#"{"ref":"main","commit":"abcdef0","default_branch":"main"}"#;
        let sig = sign("k", body);
        let d =
            verify_and_parse("generic", "k", &headers(&[(GENERIC_SIGNATURE, &sig)]), body).unwrap();
        assert!(matches!(d, Delivery::Push(p) if p.git_ref == "refs/heads/main"));
        let bad = verify_and_parse(
            "generic",
            "k",
            &headers(&[(GENERIC_SIGNATURE, "sha256=00")]),
            body,
        );
        assert_eq!(bad, Err(Rejection::BadSignature));
        let sig = sign("k", b"{}");
        assert!(matches!(
            verify_and_parse(
                "generic",
                "k",
                &headers(&[(GENERIC_SIGNATURE, &sig)]),
                b"{}"
            ),
            Err(Rejection::Malformed(_))
        ));
    }
}
