//! Composes Dockyard's HTTP surface into one router and serves it.
//!
//! Owns: the router composition (registry `/v2`, and later `/api/v1` and the
//! UI), cross-cutting middleware (request ids, tracing spans, Prometheus
//! metrics, timeouts), the operations endpoints (`/healthz`, `/readyz`,
//! `/metrics`) and the listener (plain HTTP or rustls TLS 1.2/1.3).
//! It must not implement registry behaviour itself: it only wires crates.

pub mod api;
pub mod token_service;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dockyard_core::Config;
use dockyard_registry::{Registry, RouteKind};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tower_http::LatencyUnit;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Open(#[from] dockyard_registry::OpenError),
    #[error(transparent)]
    Db(#[from] dockyard_core::DbError),
    #[error(transparent)]
    Keys(#[from] dockyard_core::token::TokenError),
    #[error("bootstrap admin: {0}")]
    Bootstrap(#[from] dockyard_core::identity::IdentityError),
    #[error("webhooks: {0}")]
    Webhooks(#[from] dockyard_webhooks::WebhookError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// State of the operations endpoints.
#[derive(Clone)]
struct Ops {
    /// The registry, for readiness checks.
    registry: Arc<Registry>,
    /// Renders the Prometheus exposition.
    metrics: PrometheusHandle,
}

/// The process-wide Prometheus recorder (installed once, shared by every
/// server in the process, e.g. in tests).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ])
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); our
            // handle then renders nothing, which the tests would notice.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole application router.
pub fn app(
    registry: Arc<Registry>,
    gate: Arc<dockyard_registry::Gate>,
    tokens: Arc<token_service::TokenService>,
    api: Arc<api::ApiState>,
) -> Router {
    let ops = Ops {
        registry: registry.clone(),
        metrics: metrics_handle(),
    };
    // Everything but /v2 gets a global timeout; blob transfers may take as
    // long as they need.
    let ops_routes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(ops)
        .merge(
            Router::new()
                .route(
                    "/v2/auth",
                    get(token_service::token_endpoint).post(token_service::token_endpoint),
                )
                .with_state(tokens),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ));
    Router::new()
        .merge(dockyard_registry::router(registry, gate))
        .merge(api::router(api))
        .merge(ops_routes)
        .layer(axum::middleware::from_fn(record_metrics))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|id| id.header_value().to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO).latency_unit(LatencyUnit::Micros)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

async fn readyz(State(ops): State<Ops>) -> Response {
    match ops.registry.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")).into_response(),
    }
}

async fn render_metrics(State(ops): State<Ops>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        ops.metrics.render(),
    )
        .into_response()
}

/// Requests by route and status, and latency by route.
async fn record_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let resp = next.run(req).await;
    let route = resp
        .extensions()
        .get::<RouteKind>()
        .map(|k| k.0.to_string())
        .or(matched)
        .unwrap_or_else(|| "unmatched".into());
    let status = resp.status().as_u16().to_string();
    let labels = [("route", route), ("method", method)];
    metrics::counter!(
        "dockyard_http_requests_total",
        &[
            ("route", labels[0].1.clone()),
            ("method", labels[1].1.clone()),
            ("status", status)
        ]
    )
    .increment(1);
    metrics::histogram!("dockyard_http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// Opens the registry from `config` and serves until `shutdown` fires.
/// `on_listen` receives the bound address (useful with port 0).
pub async fn serve(
    config: Config,
    shutdown: CancellationToken,
    on_listen: impl FnOnce(std::net::SocketAddr) + Send,
) -> Result<(), ServeError> {
    let db =
        dockyard_core::Db::connect(&config.database_url(), config.database.max_connections).await?;
    let registry = Arc::new(Registry::open_with(db.clone(), &config)?);
    let identity = dockyard_core::identity::Identity::new(db.clone());
    bootstrap_admin(&config, &identity).await?;
    let keys = Arc::new(dockyard_core::token::TokenKeys::load_or_create(
        &config.keys_dir(),
        &config.auth.issuer,
    )?);
    let gate = Arc::new(dockyard_registry::Gate::new(
        keys.clone(),
        identity.clone(),
        &config,
    ));
    let addr = config.listen;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let builds = Arc::new(dockyard_buildmanager::BuildManager::new(
        db.clone(),
        identity.clone(),
        keys.clone(),
        registry.clone(),
        registry.storage.object_store(),
        dockyard_buildmanager::Settings::from_config(&config, bound),
    ));
    let webhooks = dockyard_webhooks::Webhooks::new(db.clone(), webhook_settings(&config, bound))?;
    let api = Arc::new(api::ApiState {
        identity: identity.clone(),
        tls: config.tls.cert.is_some(),
        builds: builds.clone(),
        webhooks: webhooks.clone(),
        public_url: config.builds.public_url.clone(),
    });
    let tokens = Arc::new(token_service::TokenService::new(&config, identity, keys));
    let maintenance = tokio::spawn(maintenance(registry.clone(), shutdown.clone()));
    let event_maintenance = tokio::spawn(event_maintenance(
        registry.clone(),
        config.events.clone(),
        shutdown.clone(),
    ));
    let build_maintenance = tokio::spawn(builds.clone().run_maintenance(shutdown.clone()));
    // Base-image rebuilds: the tag-event consumer, its scheduler, upstream checks.
    let rebuilds = builds.start_rebuilds(shutdown.clone());
    let webhook_workers = webhooks.start(shutdown.clone());
    let local_executor = if config.builds.local_executor {
        start_local_executor(&config, &builds, bound, shutdown.clone()).await
    } else {
        None
    };
    let app = app(registry, gate, tokens, api)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let result = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|e| ServeError::Tls(e.to_string()))?;
            on_listen(bound);
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            let s = shutdown.clone();
            tokio::spawn(async move {
                s.cancelled().await;
                h.graceful_shutdown(Some(Duration::from_secs(30)));
            });
            axum_server::from_tcp_rustls(listener, tls)
                .handle(handle)
                .serve(app)
                .await
                .map_err(ServeError::Io)
        }
        _ => {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            on_listen(bound);
            let s = shutdown.clone();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .map_err(ServeError::Io)
        }
    };
    shutdown.cancel();
    let _ = maintenance.await;
    let _ = event_maintenance.await;
    let _ = build_maintenance.await;
    let _ = rebuilds.await;
    let _ = webhook_workers.await;
    if let Some(e) = local_executor {
        let _ = e.await;
    }
    result
}

/// Where webhook bodies say events come from: `builds.public_url`, else
/// this server's own address.
fn webhook_settings(config: &Config, bound: std::net::SocketAddr) -> dockyard_webhooks::Settings {
    let scheme = if config.tls.cert.is_some() {
        "https"
    } else {
        "http"
    };
    let local = dockyard_buildmanager::loopback_address(bound);
    let public_url = config
        .builds
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let source_addr = public_url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .filter(|h| !h.is_empty())
        .map_or_else(|| local.to_string(), str::to_string);
    dockyard_webhooks::Settings::from_config(&config.webhooks, &public_url, &source_addr)
}

/// Name of the node token of the in-process executor.
const LOCAL_EXECUTOR: &str = "local executor";

/// Runs an executor inside this process when a Docker engine answers, so
/// that `dockyard build` works with nothing else started. It speaks the
/// same protocol as remote executors, over loopback, with a node token
/// minted at start-up (the previous one is revoked).
async fn start_local_executor(
    config: &Config,
    builds: &Arc<dockyard_buildmanager::BuildManager>,
    bound: std::net::SocketAddr,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if config.tls.cert.is_some() {
        tracing::warn!(
            "builds.local_executor is not started with TLS on; run `dockyard executor` against the public URL"
        );
        return None;
    }
    let engine = match dockyard_builders::engine::DockerEngine::connect(None).await {
        Ok(e) => e,
        Err(e) => {
            tracing::info!(error = %e, "no Docker engine: the in-process executor is off");
            return None;
        }
    };
    let _ = builds.revoke_node_token(LOCAL_EXECUTOR).await;
    let token = match builds.create_node_token(LOCAL_EXECUTOR, "dockyard").await {
        Ok((_, t)) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the local executor's token");
            return None;
        }
    };
    let manager = format!("http://{}", dockyard_buildmanager::loopback_address(bound));
    let mut agent = dockyard_builders::AgentConfig::new(
        manager,
        token,
        Arc::new(engine),
        config.data_dir.join("executor"),
    );
    agent.name = LOCAL_EXECUTOR.into();
    agent.capacity = config.builds.local_capacity.max(1);
    agent.drain_timeout = Duration::from_secs(5);
    tracing::info!(
        capacity = agent.capacity,
        "starting the in-process executor"
    );
    Some(tokio::spawn(async move {
        if let Err(e) = dockyard_builders::run(agent, shutdown).await {
            tracing::error!(error = %e, "the in-process executor stopped");
        }
    }))
}

/// Creates the superuser named by `bootstrap_admin` unless that user exists.
async fn bootstrap_admin(
    config: &Config,
    identity: &dockyard_core::identity::Identity,
) -> Result<(), ServeError> {
    let Some((user, password)) = config
        .bootstrap_admin
        .as_deref()
        .and_then(|b| b.split_once(':'))
    else {
        return Ok(());
    };
    match identity.create_user(user, Some(password), true).await {
        Ok(_) => {
            tracing::info!(user, "created bootstrap superuser");
            Ok(())
        }
        Err(dockyard_core::identity::IdentityError::Exists(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The event log's housekeeping: writes the pull counts every
/// `events.pull_flush_interval` (and once more at shutdown), prunes events
/// past `events.retention` that every consumer has read.
async fn event_maintenance(
    registry: Arc<Registry>,
    config: dockyard_core::config::EventsConfig,
    shutdown: CancellationToken,
) {
    let mut flush =
        tokio::time::interval(config.pull_flush_interval.max(Duration::from_millis(100)));
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = flush.tick() => {
                if let Err(e) = registry.flush_pulls().await {
                    tracing::warn!(error = %e, "could not record pulls; kept for the next flush");
                }
                let _ = dockyard_core::events::record_lag(&registry.meta.db).await;
            }
            _ = prune.tick() => {
                let before = dockyard_core::now_millis() - config.retention.as_millis() as i64;
                match dockyard_core::events::prune(&registry.meta.db, before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(pruned = n, "pruned old events"),
                    Err(e) => tracing::warn!(error = %e, "event pruning failed"),
                }
            }
        }
    }
    if let Err(e) = registry.flush_pulls().await {
        tracing::warn!(error = %e, "could not record the last pulls");
    }
}

/// Periodic housekeeping: expire abandoned upload sessions.
async fn maintenance(registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                match registry.expire_uploads().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "removed abandoned upload sessions"),
                    Err(e) => tracing::warn!(error = %e, "upload expiry failed"),
                }
            }
        }
    }
}
