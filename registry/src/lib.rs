//! The registry: the OCI Distribution API under `/v2`, the content store,
//! registry metadata, upload sessions and garbage collection.
//!
//! It owns everything a `/v2` request touches. It must not know about users,
//! builds, signing or webhooks: those crates react to what happens here
//! through the event log (a later issue) and reach the registry through the
//! HTTP API or small traits owned by `dockyard-core`.
//!
//! **API boundary:** [`router`] is the whole HTTP surface; [`Registry`] is the
//! state it serves from; [`gc`] is the offline collector.

pub mod auth;
pub mod error;
pub mod gc;
mod images;
pub mod meta;
pub mod storage;

mod blobs;
mod http_util;
mod manifests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use dockyard_core::Config;
use dockyard_core::config::RegistryConfig;
use dockyard_oci::{DigestHasher, ErrorCode, RepoName, Route, RouteError, parse_route};

pub use auth::{Caller, Gate};
pub use error::{RegistryError, Result};
pub use meta::Meta;
pub use storage::Storage;

/// State of an upload session kept in memory between requests, so that the
/// digest is computed while bytes stream in. Lost on restart, which only
/// costs a re-read of the upload's parts when it completes.
pub(crate) struct UploadState {
    /// Bytes hashed so far; valid only while equal to the session's size.
    pub size: u64,
    /// Running hash of the bytes so far (sha256), if known.
    pub hasher: Option<DigestHasher>,
}

/// Everything a registry request needs.
pub struct Registry {
    /// Metadata database.
    pub meta: Meta,
    /// Blob store.
    pub storage: Storage,
    /// Limits.
    pub config: RegistryConfig,
    /// In-memory state of upload sessions, one lock per session so that two
    /// requests for the same session never write at the same offset.
    uploads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<UploadState>>>>,
    /// Manifest pulls counted since the last flush, by (repository, digest,
    /// tag): written as one `manifest.pulled` event each by [`Registry::flush_pulls`].
    pulls: Mutex<HashMap<PullKey, PullCount>>,
}

type PullKey = (String, String, Option<String>);

struct PullCount {
    count: u64,
    media_type: String,
    actor: Option<String>,
}

impl Registry {
    pub fn new(meta: Meta, storage: Storage, config: RegistryConfig) -> Registry {
        Registry {
            meta,
            storage,
            config,
            uploads: Mutex::new(HashMap::new()),
            pulls: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a manifest pull (no database write on the pull path).
    pub(crate) fn record_pull(
        &self,
        repo: &str,
        digest: &str,
        tag: Option<&str>,
        media_type: &str,
        actor: Option<&str>,
    ) {
        let mut map = self.pulls.lock().expect("pull counts poisoned");
        let key = (
            repo.to_string(),
            digest.to_string(),
            tag.map(str::to_string),
        );
        let e = map.entry(key).or_insert_with(|| PullCount {
            count: 0,
            media_type: media_type.to_string(),
            actor: None,
        });
        e.count += 1;
        e.actor = actor.map(str::to_string);
    }

    /// Writes the pulls counted so far as `manifest.pulled` events (one per
    /// repository, digest and tag, with `data.count`) in one transaction.
    /// On failure the counts are kept for the next flush.
    pub async fn flush_pulls(&self) -> std::result::Result<usize, sqlx::Error> {
        let taken: Vec<(PullKey, PullCount)> = {
            let mut map = self.pulls.lock().expect("pull counts poisoned");
            map.drain().collect()
        };
        if taken.is_empty() {
            return Ok(0);
        }
        let evs: Vec<_> = taken
            .iter()
            .map(|((repo, digest, tag), c)| {
                let mut e = dockyard_core::events::NewEvent::new(
                    dockyard_core::events::kinds::MANIFEST_PULLED,
                    repo,
                )
                .digest(digest)
                .actor(c.actor.as_deref())
                .data(serde_json::json!({ "count": c.count, "media_type": c.media_type }));
                e.tag = tag.clone();
                e
            })
            .collect();
        match dockyard_core::events::append_now(&self.meta.db, &evs).await {
            Ok(()) => Ok(evs.len()),
            Err(e) => {
                let mut map = self.pulls.lock().expect("pull counts poisoned");
                for (k, c) in taken {
                    let entry = map.entry(k).or_insert(PullCount {
                        count: 0,
                        media_type: c.media_type.clone(),
                        actor: None,
                    });
                    entry.count += c.count;
                    if entry.actor.is_none() {
                        entry.actor = c.actor;
                    }
                }
                Err(e)
            }
        }
    }

    /// Opens storage and database from the configuration.
    pub async fn open(config: &Config) -> std::result::Result<Registry, OpenError> {
        let db =
            dockyard_core::Db::connect(&config.database_url(), config.database.max_connections)
                .await?;
        Self::open_with(db, config)
    }

    /// Opens storage from the configuration, with an already connected
    /// database.
    pub fn open_with(
        db: dockyard_core::Db,
        config: &Config,
    ) -> std::result::Result<Registry, OpenError> {
        let storage = Storage::from_config(&config.storage, config.storage_path())?;
        Ok(Registry::new(
            Meta::new(db),
            storage,
            config.registry.clone(),
        ))
    }

    pub(crate) fn upload_state(&self, id: &str) -> Arc<tokio::sync::Mutex<UploadState>> {
        let mut map = self.uploads.lock().expect("upload map poisoned");
        map.entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(UploadState {
                    size: u64::MAX,
                    hasher: None,
                }))
            })
            .clone()
    }

    pub(crate) fn forget_upload(&self, id: &str) {
        self.uploads.lock().expect("upload map poisoned").remove(id);
    }

    pub(crate) fn start_upload_state(&self, id: &str) {
        self.uploads.lock().expect("upload map poisoned").insert(
            id.to_string(),
            Arc::new(tokio::sync::Mutex::new(UploadState {
                size: 0,
                hasher: Some(DigestHasher::new(dockyard_oci::Algorithm::Sha256)),
            })),
        );
    }

    /// Removes upload sessions idle for longer than the configured expiry,
    /// with their stored parts. Returns how many were removed.
    pub async fn expire_uploads(&self) -> Result<usize> {
        let before = dockyard_core::now_millis() - self.config.upload_expiry.as_millis() as i64;
        let stale = self.meta.stale_uploads(before).await?;
        for id in &stale {
            self.meta.delete_upload(id).await?;
            self.forget_upload(id);
            if let Err(e) = self.storage.upload_delete(id).await {
                tracing::warn!(upload = %id, error = %e, "could not delete parts of an expired upload");
            }
        }
        Ok(stale.len())
    }

    /// Whether database and storage answer.
    pub async fn ready(&self) -> std::result::Result<(), String> {
        self.meta.db.ping().await.map_err(|e| e.to_string())?;
        self.storage.ping().await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Why the registry could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Db(#[from] dockyard_core::DbError),
    #[error("cannot open storage: {0}")]
    Storage(#[from] storage::StorageError),
}

/// The `/v2` router.
pub fn router(registry: Arc<Registry>, gate: Arc<Gate>) -> Router {
    Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .with_state((registry, gate))
        .layer(axum::middleware::map_response(api_version_header))
}

async fn api_version_header(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

/// The route a request was parsed into, stored as a request extension so
/// middleware (metrics, auth) can label and authorize by it.
#[derive(Clone, Debug)]
pub struct RouteKind(pub &'static str);

fn route_error(e: RouteError, method: &Method) -> RegistryError {
    match e {
        RouteError::NotFound => RegistryError::NotFound,
        RouteError::NameInvalid(m) => RegistryError::with_message(ErrorCode::NameInvalid, m),
        RouteError::DigestInvalid(m) => RegistryError::with_message(ErrorCode::DigestInvalid, m),
        RouteError::UploadInvalid => RegistryError::spec(ErrorCode::BlobUploadUnknown),
        RouteError::ReferenceInvalid(m) if method == Method::PUT => {
            RegistryError::with_message(ErrorCode::ManifestInvalid, m)
        }
        RouteError::ReferenceInvalid(m) => {
            RegistryError::with_message(ErrorCode::ManifestUnknown, m)
        }
    }
}

/// What a request needs from its caller.
enum Need<'a> {
    /// Nothing: the method is not supported anyway (405 follows).
    Nothing,
    /// Any valid credentials or token (`/v2/`, the catalog).
    Authenticated,
    /// An action on a repository.
    Repo(&'a RepoName, &'static str),
}

fn need<'a>(route: &'a Route, method: &Method) -> Need<'a> {
    match (route, method) {
        (Route::Base, &Method::GET | &Method::HEAD) | (Route::Catalog, &Method::GET) => {
            Need::Authenticated
        }
        (Route::Tags(n), &Method::GET)
        | (Route::Referrers(n, _), &Method::GET)
        | (Route::Manifest(n, _), &Method::GET | &Method::HEAD)
        | (Route::Blob(n, _), &Method::GET | &Method::HEAD) => Need::Repo(n, "pull"),
        (Route::Manifest(n, _), &Method::PUT)
        | (Route::UploadStart(n), &Method::POST)
        | (Route::Upload(n, _), &Method::GET | &Method::PATCH | &Method::PUT | &Method::DELETE) => {
            Need::Repo(n, "push")
        }
        (Route::Manifest(n, _), &Method::DELETE) | (Route::Blob(n, _), &Method::DELETE) => {
            Need::Repo(n, "delete")
        }
        _ => Need::Nothing,
    }
}

/// The scope a client should ask for to do `action` on `name`.
fn scope(name: &RepoName, action: &str) -> String {
    match action {
        "push" => format!("repository:{name}:pull,push"),
        a => format!("repository:{name}:{a}"),
    }
}

/// The caller and what it may see, for handlers that filter by it.
pub(crate) struct Ctx {
    pub gate: Arc<Gate>,
    pub caller: Option<Caller>,
}

impl Ctx {
    /// Who is acting, for events.
    pub fn actor(&self) -> Option<&str> {
        self.caller.as_ref().and_then(Caller::name)
    }
}

async fn authorize(
    gate: &Gate,
    route: &Route,
    method: &Method,
    headers: &axum::http::HeaderMap,
    address: &str,
) -> Result<Option<Caller>> {
    let caller = gate.caller(headers, address).await?;
    match need(route, method) {
        Need::Nothing => {}
        Need::Authenticated => {
            if caller.is_none() {
                return Err(gate.unauthorized(headers, None, None, "authentication required"));
            }
        }
        Need::Repo(name, action) => {
            let scope = scope(name, action);
            let Some(c) = &caller else {
                return Err(gate.unauthorized(
                    headers,
                    Some(&scope),
                    None,
                    "authentication required",
                ));
            };
            if !gate.allows(c, name, action).await? {
                return Err(gate.denied(headers, c, &scope));
            }
        }
    }
    Ok(caller)
}

async fn dispatch(
    State((reg, gate)): State<(Arc<Registry>, Arc<Gate>)>,
    mut req: Request,
) -> Response {
    // HTTP/2 carries the host in the URI's authority, not a Host header;
    // the challenge's realm is built from the latter.
    if !req.headers().contains_key(axum::http::header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(axum::http::header::HOST, v);
    }
    let method = req.method().clone();
    let route = match parse_route(req.uri().path()) {
        Ok(r) => r,
        Err(e) => return route_error(e, &method).into_response(),
    };
    let kind = route.kind();
    let address = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    // Pushes and deletes are security-relevant: audited once they succeed.
    let audited = match (&route, &method) {
        (Route::Manifest(n, r), &Method::PUT) => Some(("push", format!("{n}:{r}"))),
        (Route::Manifest(n, r), &Method::DELETE) => Some(("delete", format!("{n}:{r}"))),
        (Route::Blob(n, d), &Method::DELETE) => Some(("delete", format!("{n}@{d}"))),
        _ => None,
    };
    let (result, caller) = match authorize(&gate, &route, &method, req.headers(), &address).await {
        Ok(caller) => {
            let ctx = Ctx {
                gate: gate.clone(),
                caller: caller.clone(),
            };
            (handle(&reg, route, req, ctx).await, caller)
        }
        Err(e) => (Err(e), None),
    };
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    if let (Some((action, target)), Some(caller)) = (audited, caller)
        && resp.status().is_success()
    {
        gate.audit(&caller, action, &target, &address).await;
    }
    resp.extensions_mut().insert(RouteKind(kind));
    resp
}

async fn handle(reg: &Arc<Registry>, route: Route, req: Request, ctx: Ctx) -> Result<Response> {
    let method = req.method().clone();
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => Ok((
            StatusCode::OK,
            [("content-type", "application/json")],
            Body::from("{}"),
        )
            .into_response()),
        (Route::Catalog, Method::GET) => manifests::catalog(reg, req, &ctx).await,
        (Route::Tags(name), Method::GET) => manifests::tags(reg, &name, req).await,
        (Route::Manifest(name, r), Method::GET) => {
            manifests::get(reg, &name, &r, req, true, &ctx).await
        }
        (Route::Manifest(name, r), Method::HEAD) => {
            manifests::get(reg, &name, &r, req, false, &ctx).await
        }
        (Route::Manifest(name, r), Method::PUT) => {
            manifests::put(reg, &name, &r, req, ctx.actor()).await
        }
        (Route::Manifest(name, r), Method::DELETE) => {
            manifests::delete(reg, &name, &r, ctx.actor()).await
        }
        (Route::Referrers(name, d), Method::GET) => manifests::referrers(reg, &name, &d, req).await,
        (Route::Blob(name, d), Method::GET) => blobs::get(reg, &name, &d, req, true).await,
        (Route::Blob(name, d), Method::HEAD) => blobs::get(reg, &name, &d, req, false).await,
        (Route::Blob(name, d), Method::DELETE) => blobs::delete(reg, &name, &d).await,
        (Route::UploadStart(name), Method::POST) => {
            blobs::start_upload(reg, &name, req, &ctx).await
        }
        (Route::Upload(name, id), Method::GET) => blobs::upload_status(reg, &name, &id).await,
        (Route::Upload(name, id), Method::PATCH) => blobs::patch_upload(reg, &name, &id, req).await,
        (Route::Upload(name, id), Method::PUT) => blobs::finish_upload(reg, &name, &id, req).await,
        (Route::Upload(name, id), Method::DELETE) => blobs::cancel_upload(reg, &name, &id).await,
        (_, m) => Err(RegistryError::with_message(
            ErrorCode::Unsupported,
            format!("method {m} is not supported on this endpoint"),
        )),
    }
}
