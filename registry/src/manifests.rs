//! Manifests, tags, the catalog and the referrers API.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dockyard_oci::{Digest, ErrorCode, Manifest, ManifestError, Reference, RepoName, media_type};
use serde_json::json;

use crate::Registry;
use crate::error::{RegistryError, Result};
use crate::http_util::{accepts, content_length, header as hdr, hv, param, query};
use crate::meta::PutManifestError;

const DIGEST_HEADER: header::HeaderName = header::HeaderName::from_static("docker-content-digest");

/// `GET`/`HEAD /v2/<name>/manifests/<reference>`.
pub async fn get(
    reg: &Arc<Registry>,
    name: &RepoName,
    reference: &Reference,
    req: Request,
    with_body: bool,
    ctx: &crate::Ctx,
) -> Result<Response> {
    let actor = ctx.actor();
    let row = match reference {
        Reference::Tag(t) => reg.meta.manifest_by_tag(name.as_str(), t.as_str()).await?,
        Reference::Digest(d) => reg.meta.manifest_by_digest(name.as_str(), d).await?,
    };
    let Some(row) = row else {
        return Err(RegistryError::spec(ErrorCode::ManifestUnknown));
    };
    if !accepts(req.headers(), &row.media_type) {
        return Err(RegistryError::with_message(
            ErrorCode::ManifestUnknown,
            format!(
                "the manifest is {}, which the Accept header does not allow",
                row.media_type
            ),
        ));
    }
    let len = row.body.len();
    let body = if with_body {
        let tag = match reference {
            Reference::Tag(t) => Some(t.as_str()),
            Reference::Digest(_) => None,
        };
        reg.record_pull(name.as_str(), &row.digest, tag, &row.media_type, actor);
        metrics::counter!("dockyard_registry_bytes_sent_total").increment(len as u64);
        Body::from(row.body)
    } else {
        Body::empty()
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, hv(&row.media_type)),
            (header::CONTENT_LENGTH, hv(&len.to_string())),
            (DIGEST_HEADER, hv(&row.digest)),
            (header::ETAG, hv(&format!("\"{}\"", row.digest))),
        ],
        body,
    )
        .into_response())
}

fn manifest_invalid(e: ManifestError) -> RegistryError {
    RegistryError::with_message(ErrorCode::ManifestInvalid, e.to_string())
}

/// `PUT /v2/<name>/manifests/<reference>`.
pub async fn put(
    reg: &Arc<Registry>,
    name: &RepoName,
    reference: &Reference,
    req: Request,
    actor: Option<&str>,
) -> Result<Response> {
    let limit = reg.config.max_manifest_size;
    let too_large = || {
        RegistryError::with_message(
            ErrorCode::ManifestInvalid,
            format!("manifest exceeds the limit of {limit} bytes"),
        )
        .status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    if content_length(req.headers()).is_some_and(|l| l > limit) {
        return Err(too_large());
    }
    let content_type = hdr(req.headers(), "content-type").unwrap_or("").to_string();
    let body = axum::body::to_bytes(req.into_body(), limit as usize)
        .await
        .map_err(|_| too_large())?;
    metrics::counter!("dockyard_registry_bytes_received_total").increment(body.len() as u64);
    let manifest = Manifest::parse(&content_type, &body).map_err(manifest_invalid)?;
    let (digest, tag) = match reference {
        Reference::Digest(d) => {
            let computed = Digest::compute(d.algorithm(), &body);
            if &computed != d {
                return Err(RegistryError::with_message(
                    ErrorCode::DigestInvalid,
                    format!("manifest body has digest {computed}, not {d}"),
                ));
            }
            (computed, None)
        }
        Reference::Tag(t) => (Digest::sha256(&body), Some(t.as_str())),
    };
    match reg
        .meta
        .put_manifest(name.as_str(), &digest, &manifest, &body, tag, actor)
        .await
    {
        Ok(()) => {}
        Err(PutManifestError::Missing(d)) => {
            return Err(RegistryError::with_message(
                ErrorCode::ManifestBlobUnknown,
                format!("{d} is not in repository {name}"),
            )
            .detail(json!({ "digest": d.to_string() })));
        }
        Err(PutManifestError::SizeMismatch(d, said, actual)) => {
            return Err(RegistryError::with_message(
                ErrorCode::ManifestInvalid,
                format!("descriptor of {d} says {said} bytes, the blob has {actual}"),
            ));
        }
        Err(PutManifestError::Db(e)) => return Err(e.into()),
    }
    let mut resp = (
        StatusCode::CREATED,
        [
            (
                header::LOCATION,
                hv(&format!("/v2/{name}/manifests/{digest}")),
            ),
            (DIGEST_HEADER, hv(&digest.to_string())),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response();
    if let Some(s) = &manifest.subject {
        resp.headers_mut()
            .insert("oci-subject", hv(&s.digest.to_string()));
    }
    Ok(resp)
}

/// `DELETE /v2/<name>/manifests/<reference>`: by digest removes the manifest
/// and its tags; by tag removes the tag only.
pub async fn delete(
    reg: &Arc<Registry>,
    name: &RepoName,
    reference: &Reference,
    actor: Option<&str>,
) -> Result<Response> {
    let found = match reference {
        Reference::Digest(d) => reg.meta.delete_manifest(name.as_str(), d, actor).await?,
        Reference::Tag(t) => {
            reg.meta
                .delete_tag(name.as_str(), t.as_str(), actor)
                .await?
        }
    };
    if !found {
        return Err(RegistryError::spec(ErrorCode::ManifestUnknown));
    }
    Ok((StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response())
}

/// Reads `n` and `last` for a paginated list: `(page size, last)`.
fn pagination(reg: &Registry, q: &[(String, String)]) -> Result<(u32, Option<String>)> {
    let max = reg.config.max_page_size;
    let n = match param(q, "n") {
        None | Some("") => max,
        Some(v) => v.parse::<u32>().map_err(|_| {
            RegistryError::with_message(
                ErrorCode::PaginationNumberInvalid,
                format!("n must be a number from 0 to {max}"),
            )
        })?,
    };
    Ok((n.min(max), param(q, "last").map(str::to_string)))
}

fn page(
    path: &str,
    key: &str,
    mut items: Vec<String>,
    n: u32,
    extra: serde_json::Value,
) -> Response {
    let more = items.len() > n as usize;
    items.truncate(n as usize);
    let mut body = extra;
    body[key] = json!(items);
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if more && let Some(last) = items.last() {
        resp.headers_mut().insert(
            header::LINK,
            hv(&format!("<{path}?n={n}&last={last}>; rel=\"next\"")),
        );
    }
    resp
}

/// `GET /v2/<name>/tags/list?n=&last=`.
pub async fn tags(reg: &Arc<Registry>, name: &RepoName, req: Request) -> Result<Response> {
    let (n, last) = pagination(reg, &query(req.uri()))?;
    let tags = reg
        .meta
        .tags(name.as_str(), last.as_deref(), n + 1)
        .await?
        .ok_or_else(|| RegistryError::spec(ErrorCode::NameUnknown))?;
    Ok(page(
        &format!("/v2/{name}/tags/list"),
        "tags",
        tags,
        n,
        json!({ "name": name.as_str() }),
    ))
}

/// `GET /v2/_catalog?n=&last=`.
/// Lists only the repositories the caller may pull from.
pub async fn catalog(reg: &Arc<Registry>, req: Request, ctx: &crate::Ctx) -> Result<Response> {
    let (n, last) = pagination(reg, &query(req.uri()))?;
    let principal = match &ctx.caller {
        Some(c) => ctx.gate.principal(c).await?,
        None => None,
    };
    let Some(principal) = principal else {
        return Ok(page("/v2/_catalog", "repositories", vec![], n, json!({})));
    };
    if let dockyard_core::identity::Principal::User {
        superuser: true, ..
    } = principal
    {
        let repos = reg.meta.catalog(last.as_deref(), n + 1).await?;
        return Ok(page("/v2/_catalog", "repositories", repos, n, json!({})));
    }
    // Walk the catalog in batches, keeping what the caller can read, until
    // the page (plus one, to know whether there is more) is full.
    let mut visible = Vec::new();
    let mut cursor = last;
    let batch = n.clamp(100, 1000) + 1;
    loop {
        let names = reg.meta.catalog(cursor.as_deref(), batch).await?;
        let done = names.len() < batch as usize;
        for name in names {
            cursor = Some(name.clone());
            let role = ctx
                .gate
                .identity
                .repository_role(&principal, &name)
                .await
                .map_err(|e| RegistryError::Internal(e.to_string()))?;
            if role.is_some() {
                visible.push(name);
                if visible.len() > n as usize {
                    break;
                }
            }
        }
        if done || visible.len() > n as usize {
            break;
        }
    }
    Ok(page("/v2/_catalog", "repositories", visible, n, json!({})))
}

/// `GET /v2/<name>/referrers/<digest>?artifactType=`.
pub async fn referrers(
    reg: &Arc<Registry>,
    name: &RepoName,
    digest: &Digest,
    req: Request,
) -> Result<Response> {
    let q = query(req.uri());
    let filter = param(&q, "artifactType");
    let rows = reg.meta.referrers(name.as_str(), digest).await?;
    let manifests: Vec<_> = rows
        .into_iter()
        .filter(|r| filter.is_none_or(|f| r.artifact_type.as_deref() == Some(f)))
        .map(|r| {
            let mut d = json!({ "mediaType": r.media_type, "digest": r.digest, "size": r.size });
            if let Some(a) = r.artifact_type {
                d["artifactType"] = json!(a);
            }
            if let Some(a) = r
                .annotations
                .and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok())
            {
                d["annotations"] = a;
            }
            d
        })
        .collect();
    let body =
        json!({ "schemaVersion": 2, "mediaType": media_type::OCI_INDEX, "manifests": manifests });
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, media_type::OCI_INDEX)],
        body.to_string(),
    )
        .into_response();
    if filter.is_some() {
        resp.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}
