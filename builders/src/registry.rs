//! Resolving what a tag points to on a registry: `HEAD
//! /v2/<repository>/manifests/<tag>` with the Accept types of every manifest
//! format, authenticated with a job's bearer token, or anonymously through
//! the registry's token service for public images elsewhere.
//!
//! Only reads; never pushes (the engine does) and never stores credentials.

use std::time::Duration;

use dockyard_oci::Digest;
use dockyard_oci::media_type::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};

use crate::dockerfile::{DOCKER_HUB, ImageRef};
use crate::{Error, Result};

const TIMEOUT: Duration = Duration::from_secs(20);

fn accept() -> String {
    [
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        DOCKER_MANIFEST,
    ]
    .join(", ")
}

/// The base URL of a registry host.
pub fn registry_url(host: &str, insecure: bool) -> String {
    let host = if host == DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        host
    };
    let plain = insecure
        || host.starts_with("localhost")
        || host.starts_with("127.")
        || host.starts_with("[::1]");
    format!("{}://{host}", if plain { "http" } else { "https" })
}

/// The digest `image`'s tag points to now (the index's digest for a
/// multi-platform image), or its pinned digest. `token` is a bearer token
/// for the registry; without one, the registry's anonymous token flow is
/// tried. `Ok(None)` when the registry does not say.
pub async fn resolve_digest(
    http: &reqwest::Client,
    image: &ImageRef,
    insecure: bool,
    token: Option<&str>,
) -> Result<Option<String>> {
    if let Some(d) = &image.digest {
        return Ok(Some(d.clone()));
    }
    let url = format!(
        "{}/v2/{}/manifests/{}",
        registry_url(&image.registry, insecure),
        image.repository,
        image.manifest_reference()
    );
    let head = |bearer: Option<String>| {
        let mut req = http.head(&url).header(ACCEPT, accept()).timeout(TIMEOUT);
        if let Some(t) = bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        req.send()
    };
    let err = |e: reqwest::Error| Error::Registry(format!("{image}: {}", e.without_url()));
    let mut resp = head(token.map(str::to_string)).await.map_err(err)?;
    if resp.status() == StatusCode::UNAUTHORIZED && token.is_none() {
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(anon) = match challenge {
            Some(c) => anonymous_token(http, &c, &image.repository).await,
            None => None,
        } {
            resp = head(Some(anon)).await.map_err(err)?;
        }
    }
    match resp.status() {
        s if s.is_success() => {}
        StatusCode::NOT_FOUND => {
            return Err(Error::Registry(format!("{image} not found")));
        }
        s => {
            return Err(Error::Registry(format!(
                "{image}: the registry answered {s}"
            )));
        }
    }
    let header = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    if let Some(d) = header {
        return Ok(Some(d.to_string()));
    }
    // Some registries omit the header on HEAD: hash the manifest instead.
    let mut req = http.get(&url).header(ACCEPT, accept()).timeout(TIMEOUT);
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = req.send().await.map_err(err)?;
    if !resp.status().is_success() {
        return Ok(None);
    }
    let body = resp.bytes().await.map_err(err)?;
    Ok(Some(Digest::sha256(&body).to_string()))
}

/// The manifest of `image` at `digest` for `platform`: the matching entry
/// when `digest` names an index, else `digest` itself. `Ok(None)` when an
/// index has no entry for the platform.
pub async fn platform_digest(
    http: &reqwest::Client,
    image: &ImageRef,
    digest: &str,
    platform: &dockyard_oci::build::Platform,
    insecure: bool,
    token: Option<&str>,
) -> Result<Option<String>> {
    let url = format!(
        "{}/v2/{}/manifests/{digest}",
        registry_url(&image.registry, insecure),
        image.repository,
    );
    let mut req = http.get(&url).header(ACCEPT, accept()).timeout(TIMEOUT);
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let err = |e: reqwest::Error| Error::Registry(format!("{image}: {}", e.without_url()));
    let resp = req.send().await.map_err(err)?;
    if !resp.status().is_success() {
        return Err(Error::Registry(format!(
            "{image}@{digest}: the registry answered {}",
            resp.status()
        )));
    }
    let v: serde_json::Value = resp.json().await.map_err(err)?;
    let Some(entries) = v["manifests"].as_array() else {
        return Ok(Some(digest.to_string()));
    };
    let matches = |m: &serde_json::Value, with_variant: bool| {
        let p = &m["platform"];
        p["os"] == platform.os.as_str()
            && p["architecture"] == platform.architecture.as_str()
            && (!with_variant
                || platform.variant.is_none()
                || p["variant"].as_str() == platform.variant.as_deref())
    };
    Ok(entries
        .iter()
        .find(|m| matches(m, true))
        .or_else(|| entries.iter().find(|m| matches(m, false)))
        .and_then(|m| m["digest"].as_str())
        .map(str::to_string))
}

/// The value of `key` in a `Bearer realm="...",service="..."` challenge.
fn challenge_param(challenge: &str, key: &str) -> Option<String> {
    let rest = challenge.trim();
    let rest = rest
        .strip_prefix("Bearer ")
        .or_else(|| rest.strip_prefix("bearer "))?;
    let mut s = rest;
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if k.eq_ignore_ascii_case(key) {
            return Some(v.to_string());
        }
        s = tail.trim_start_matches([',', ' ']);
    }
    None
}

/// An anonymous pull token from the token service a challenge names.
async fn anonymous_token(http: &reqwest::Client, challenge: &str, repo: &str) -> Option<String> {
    let realm = challenge_param(challenge, "realm")?;
    let mut url = url::Url::parse(&realm).ok()?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = challenge_param(challenge, "service") {
            q.append_pair("service", &service);
        }
        q.append_pair("scope", &format!("repository:{repo}:pull"));
    }
    let resp = http.get(url).timeout(TIMEOUT).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    v.get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            challenge_param(c, "realm").as_deref(),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(
            challenge_param(c, "service").as_deref(),
            Some("registry.docker.io")
        );
        assert_eq!(
            challenge_param(c, "scope").as_deref(),
            Some("repository:library/alpine:pull")
        );
        assert_eq!(challenge_param("Basic realm=x", "realm"), None);
        assert_eq!(
            challenge_param("Bearer realm=x, service=y", "service").as_deref(),
            Some("y")
        );
        assert_eq!(challenge_param("Bearer garbage", "realm"), None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            registry_url("docker.io", false),
            "https://registry-1.docker.io"
        );
        assert_eq!(registry_url("reg:5000", true), "http://reg:5000");
        assert_eq!(
            registry_url("127.0.0.1:5000", false),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            registry_url("reg.example.com", false),
            "https://reg.example.com"
        );
    }
}
