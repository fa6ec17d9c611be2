//! Blob reads, blob deletion and upload sessions (monolithic, chunked,
//! streamed, cross-repository mount).
//!
//! An upload's bytes are staged by the content store (see `storage`); the session
//! row in the database records how many bytes were accepted, so a session
//! survives a restart and the client resumes at the same `Location`. A blob
//! becomes visible (blob row + repository link) only after its digest was
//! verified.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dockyard_oci::{Digest, DigestHasher, ErrorCode, RepoName};
use futures::StreamExt;

use crate::error::{RegistryError, Result};
use crate::http_util::{
    byte_range, content_length, content_range, digest_param, header as hdr, hv, param, query,
};
use crate::meta::{Unlink, UploadRow};
use crate::storage::{Storage, WriteError};
use crate::{Registry, UploadState};

/// Counts an upload request while its body streams.
struct InFlight;

impl InFlight {
    fn new() -> InFlight {
        metrics::gauge!("dockyard_uploads_in_flight").increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("dockyard_uploads_in_flight").decrement(1.0);
    }
}

fn upload_location(name: &RepoName, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// `Range` header value for an upload of `size` bytes.
fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn upload_unknown() -> RegistryError {
    RegistryError::spec(ErrorCode::BlobUploadUnknown)
}

fn accepted(name: &RepoName, id: &str, size: u64, status: StatusCode) -> Response {
    (
        status,
        [
            (header::LOCATION, hv(&upload_location(name, id))),
            (header::RANGE, hv(&upload_range(size))),
            (
                header::HeaderName::from_static("docker-upload-uuid"),
                hv(id),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response()
}

fn created(name: &RepoName, digest: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, hv(&format!("/v2/{name}/blobs/{digest}"))),
            (
                header::HeaderName::from_static("docker-content-digest"),
                hv(&digest.to_string()),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
        ],
    )
        .into_response()
}

fn write_error(e: WriteError) -> RegistryError {
    match e {
        WriteError::Body(m) => RegistryError::with_message(
            ErrorCode::BlobUploadInvalid,
            format!("the request body could not be read: {m}"),
        ),
        WriteError::TooLarge(l) => {
            RegistryError::with_message(ErrorCode::SizeInvalid, format!("body exceeds {l} bytes"))
                .status(StatusCode::PAYLOAD_TOO_LARGE)
        }
        WriteError::Store(m) => RegistryError::Internal(m),
    }
}

/// `GET`/`HEAD /v2/<name>/blobs/<digest>`, with `Range` support.
pub async fn get(
    reg: &Arc<Registry>,
    name: &RepoName,
    digest: &Digest,
    req: Request,
    with_body: bool,
) -> Result<Response> {
    let Some(size) = reg.meta.blob_in_repo(name.as_str(), digest).await? else {
        // Manifests are content too: serve one by digest through the blob
        // endpoint, as Distribution does.
        if let Some(m) = reg.meta.manifest_by_digest(name.as_str(), digest).await? {
            let len = m.body.len();
            let body = if with_body {
                Body::from(m.body)
            } else {
                Body::empty()
            };
            return Ok((
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, hv(&m.media_type)),
                    (header::CONTENT_LENGTH, hv(&len.to_string())),
                    (
                        header::HeaderName::from_static("docker-content-digest"),
                        hv(&m.digest),
                    ),
                ],
                body,
            )
                .into_response());
        }
        return Err(RegistryError::spec(ErrorCode::BlobUnknown));
    };
    let range = match hdr(req.headers(), "range") {
        Some(r) => byte_range(r, size).map_err(|()| {
            RegistryError::with_message(ErrorCode::BlobUnknown, "requested range not satisfiable")
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, hv(&format!("bytes */{size}")))
        })?,
        None => None,
    };
    let mut headers = vec![
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (
            header::HeaderName::from_static("docker-content-digest"),
            hv(&digest.to_string()),
        ),
        (header::ETAG, hv(&format!("\"{digest}\""))),
        (header::ACCEPT_RANGES, HeaderValue::from_static("bytes")),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=31536000"),
        ),
    ];
    let status = match &range {
        Some(r) => {
            headers.push((
                header::CONTENT_RANGE,
                hv(&format!("bytes {}-{}/{size}", r.start, r.end - 1)),
            ));
            headers.push((header::CONTENT_LENGTH, hv(&(r.end - r.start).to_string())));
            StatusCode::PARTIAL_CONTENT
        }
        None => {
            headers.push((header::CONTENT_LENGTH, hv(&size.to_string())));
            StatusCode::OK
        }
    };
    let body = if with_body {
        let stream = match reg.storage.read(&Storage::blob_key(digest), range).await {
            Ok(s) => s,
            Err(crate::storage::StorageError::NotFound) => {
                tracing::error!(%digest, "blob is recorded but missing from storage");
                return Err(RegistryError::spec(ErrorCode::BlobUnknown));
            }
            Err(e) => return Err(RegistryError::Internal(e.to_string())),
        };
        Body::from_stream(stream.map(|chunk| {
            if let Ok(c) = &chunk {
                metrics::counter!("dockyard_registry_bytes_sent_total").increment(c.len() as u64);
            }
            chunk
        }))
    } else {
        Body::empty()
    };
    let mut resp = (status, body).into_response();
    for (k, v) in headers {
        resp.headers_mut().insert(k, v);
    }
    Ok(resp)
}

/// `DELETE /v2/<name>/blobs/<digest>`: removes the blob from the repository.
/// The bytes are reclaimed by `dockyard gc` once nothing references them.
pub async fn delete(reg: &Arc<Registry>, name: &RepoName, digest: &Digest) -> Result<Response> {
    match reg.meta.unlink_blob(name.as_str(), digest).await? {
        Unlink::Done => Ok((StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response()),
        Unlink::NotFound => Err(RegistryError::spec(ErrorCode::BlobUnknown)),
        Unlink::InUse(m) => Err(RegistryError::with_message(
            ErrorCode::Denied,
            format!("blob is referenced by manifest {m}; delete the manifest first"),
        )
        .status(StatusCode::CONFLICT)),
    }
}

/// `POST /v2/<name>/blobs/uploads/`: mount, monolithic upload, or a new
/// session.
pub async fn start_upload(
    reg: &Arc<Registry>,
    name: &RepoName,
    req: Request,
    ctx: &crate::Ctx,
) -> Result<Response> {
    let q = query(req.uri());
    let repo_id = reg.meta.ensure_repo(name.as_str(), ctx.actor()).await?;
    if let Some(mount) = param(&q, "mount") {
        let digest = digest_param(mount)?;
        let from = param(&q, "from").and_then(|f| f.parse::<RepoName>().ok());
        // Mounting reads the source: the caller must be allowed to pull it.
        let readable = match (&from, &ctx.caller) {
            (Some(f), Some(c)) => ctx.gate.allows(c, f, "pull").await?,
            _ => false,
        };
        if let Some(from) = from.filter(|_| readable)
            && let Some(size) = reg.meta.blob_in_repo(from.as_str(), &digest).await?
        {
            reg.meta.link_blob(repo_id, &digest, size, None).await?;
            return Ok(created(name, &digest));
        }
        // The mount cannot be done: fall back to a regular upload session.
    }
    let id = uuid::Uuid::new_v4().to_string();
    reg.meta.create_upload(repo_id, &id).await?;
    reg.start_upload_state(&id);
    if let Some(d) = param(&q, "digest") {
        let digest = digest_param(d)?;
        let row = UploadRow {
            repository_id: repo_id,
            size: 0,
        };
        return complete(reg, name, &id, row, digest, req).await;
    }
    Ok(accepted(name, &id, 0, StatusCode::ACCEPTED))
}

/// `GET /v2/<name>/blobs/uploads/<id>`: where the session stands.
pub async fn upload_status(reg: &Arc<Registry>, name: &RepoName, id: &str) -> Result<Response> {
    let row = reg
        .meta
        .upload(name.as_str(), id)
        .await?
        .ok_or_else(upload_unknown)?;
    Ok(accepted(name, id, row.size, StatusCode::NO_CONTENT))
}

/// `DELETE /v2/<name>/blobs/uploads/<id>`: cancels the session.
pub async fn cancel_upload(reg: &Arc<Registry>, name: &RepoName, id: &str) -> Result<Response> {
    reg.meta
        .upload(name.as_str(), id)
        .await?
        .ok_or_else(upload_unknown)?;
    let state = reg.upload_state(id);
    let _guard = state.lock().await;
    reg.meta.delete_upload(id).await?;
    reg.forget_upload(id);
    reg.storage
        .upload_delete(id)
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?;
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_LENGTH, "0")]).into_response())
}

/// Appends the request body to the session as one part. The caller holds
/// the session's lock. Returns the new size.
async fn append(
    reg: &Arc<Registry>,
    name: &RepoName,
    id: &str,
    row: &UploadRow,
    state: &mut UploadState,
    req: Request,
) -> Result<u64> {
    let headers = req.headers().clone();
    let range_error = |size: u64| {
        RegistryError::with_message(
            ErrorCode::BlobUploadInvalid,
            format!("Content-Range must continue the upload at offset {size}"),
        )
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
        .header(header::RANGE, hv(&upload_range(size)))
        .header(header::LOCATION, hv(&upload_location(name, id)))
        .header(
            header::HeaderName::from_static("docker-upload-uuid"),
            hv(id),
        )
    };
    let expected = match hdr(&headers, "content-range") {
        Some(v) => {
            let (start, end) = content_range(v).ok_or_else(|| range_error(row.size))?;
            if start != row.size {
                return Err(range_error(row.size));
            }
            let len = end - start + 1;
            if let Some(cl) = content_length(&headers)
                && cl != len
            {
                return Err(RegistryError::with_message(
                    ErrorCode::SizeInvalid,
                    format!("Content-Range announces {len} bytes but Content-Length is {cl}"),
                ));
            }
            Some(len)
        }
        None => None,
    };
    let mut hasher = if state.size == row.size {
        state.hasher.take()
    } else {
        None
    };
    state.size = u64::MAX;
    let _in_flight = InFlight::new();
    let body = req.into_body().into_data_stream().map(|c| {
        if let Ok(c) = &c {
            metrics::counter!("dockyard_registry_bytes_received_total").increment(c.len() as u64);
        }
        c
    });
    let n = reg
        .storage
        .upload_append(id, row.size, body, hasher.as_mut(), expected)
        .await
        .map_err(write_error)?;
    if let Some(len) = expected
        && len != n
    {
        return Err(RegistryError::with_message(
            ErrorCode::SizeInvalid,
            format!("Content-Range announces {len} bytes but {n} arrived"),
        ));
    }
    if n == 0 {
        state.size = row.size;
        state.hasher = hasher;
        return Ok(row.size);
    }
    let new_size = row.size + n;
    if !reg.meta.advance_upload(id, row.size, new_size).await? {
        return Err(range_error(row.size));
    }
    state.size = new_size;
    state.hasher = hasher;
    Ok(new_size)
}

/// `PATCH /v2/<name>/blobs/uploads/<id>`: a chunk (with `Content-Range`) or
/// a stream (without).
pub async fn patch_upload(
    reg: &Arc<Registry>,
    name: &RepoName,
    id: &str,
    req: Request,
) -> Result<Response> {
    let state = reg.upload_state(id);
    let mut state = state.lock().await;
    let row = reg
        .meta
        .upload(name.as_str(), id)
        .await?
        .ok_or_else(upload_unknown)?;
    let size = append(reg, name, id, &row, &mut state, req).await?;
    Ok(accepted(name, id, size, StatusCode::ACCEPTED))
}

/// `PUT /v2/<name>/blobs/uploads/<id>?digest=…`: the last chunk (optional)
/// and completion.
pub async fn finish_upload(
    reg: &Arc<Registry>,
    name: &RepoName,
    id: &str,
    req: Request,
) -> Result<Response> {
    let q = query(req.uri());
    let digest = digest_param(param(&q, "digest").ok_or_else(|| {
        RegistryError::with_message(
            ErrorCode::DigestInvalid,
            "the digest query parameter is required",
        )
    })?)?;
    let row = reg
        .meta
        .upload(name.as_str(), id)
        .await?
        .ok_or_else(upload_unknown)?;
    complete(reg, name, id, row, digest, req).await
}

/// Appends the request's body, verifies the digest and makes the blob
/// visible.
async fn complete(
    reg: &Arc<Registry>,
    name: &RepoName,
    id: &str,
    row: UploadRow,
    digest: Digest,
    req: Request,
) -> Result<Response> {
    let state = reg.upload_state(id);
    let mut state = state.lock().await;
    // Re-read under the lock: a concurrent request may have appended.
    let mut row = reg.meta.upload(name.as_str(), id).await?.unwrap_or(row);
    let has_body = content_length(req.headers()).is_none_or(|l| l > 0);
    if has_body {
        row.size = append(reg, name, id, &row, &mut state, req).await?;
    }
    let computed = match state.hasher.take() {
        Some(h) if state.size == row.size && h.algorithm() == digest.algorithm() => h.finish(),
        _ => {
            let mut h = DigestHasher::new(digest.algorithm());
            reg.storage
                .upload_hash(id, row.size, &mut h)
                .await
                .map_err(|e| RegistryError::Internal(e.to_string()))?;
            h.finish()
        }
    };
    state.size = u64::MAX;
    if computed != digest {
        reg.meta.delete_upload(id).await?;
        reg.forget_upload(id);
        let _ = reg.storage.upload_delete(id).await;
        return Err(RegistryError::with_message(
            ErrorCode::DigestInvalid,
            format!("uploaded content has digest {computed}, not {digest}"),
        ));
    }
    let key = Storage::blob_key(&digest);
    let stored = reg.meta.blob_size(&digest).await?.is_some()
        && reg
            .storage
            .size(&key)
            .await
            .map_err(|e| RegistryError::Internal(e.to_string()))?
            == Some(row.size);
    if !stored {
        reg.storage
            .upload_commit(id, row.size, &key)
            .await
            .map_err(write_error)?;
    }
    reg.meta
        .link_blob(row.repository_id, &digest, row.size, Some(id))
        .await?;
    reg.forget_upload(id);
    let storage = reg.storage.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        if let Err(e) = storage.upload_delete(&id).await {
            tracing::warn!(upload = %id, error = %e, "could not delete upload data");
        }
    });
    Ok(created(name, &digest))
}
