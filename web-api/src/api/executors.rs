//! Executors: node tokens (superusers create and revoke them), the list of
//! registered executors, and the executor protocol itself
//! (`/api/v1/executor/...`, node tokens only; see `dockyard_oci::build`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use dockyard_buildmanager::jobs::{ExecutorInfo, NodeAuth, NodeTokenInfo};
use dockyard_oci::build::{
    EXECUTOR_HEADER, Heartbeat, HeartbeatResponse, JobLog, JobResult, PollRequest, RegisterRequest,
    RegisterResponse, TokenRequest, TokenResponse,
};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller, ClientAddress};

#[derive(Deserialize, ToSchema)]
pub struct CreateNodeToken {
    /// A name for people, e.g. the build node's host name.
    name: String,
}

/// Creates a node token for `dockyard executor --token` (superuser). The
/// token is shown once.
#[utoipa::path(post, path = "/api/v1/executor-tokens", tag = "executors",
    request_body = CreateNodeToken,
    responses((status = 201, description = "Created; includes `token`")))]
pub async fn create_token(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Json(body): Json<CreateNodeToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.superuser()?;
    let (info, token) = state
        .builds
        .create_node_token(&body.name, caller.0.name())
        .await?;
    state
        .identity
        .audit(
            &caller.0,
            "executor_token.created",
            &info.name,
            &addr,
            true,
            Some(&info.id),
        )
        .await?;
    let mut v = serde_json::to_value(&info).expect("serializable");
    v["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(v)))
}

/// Node tokens, without their secrets (superuser).
#[utoipa::path(get, path = "/api/v1/executor-tokens", tag = "executors",
    responses((status = 200, description = "Node tokens", body = Vec<NodeTokenInfo>)))]
pub async fn list_tokens(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.superuser()?;
    Ok(Json(json!({ "tokens": state.builds.node_tokens().await? })))
}

/// Revokes a node token by id or name (superuser); its executors' jobs go
/// to other executors.
#[utoipa::path(delete, path = "/api/v1/executor-tokens/{id}", tag = "executors",
    params(("id" = String, Path)),
    responses((status = 204, description = "Revoked")))]
pub async fn revoke_token(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.superuser()?;
    state.builds.revoke_node_token(&id).await?;
    state
        .identity
        .audit(&caller.0, "executor_token.revoked", &id, &addr, true, None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Registered executors with their platforms, capacity and load (superuser).
#[utoipa::path(get, path = "/api/v1/executors", tag = "executors",
    responses((status = 200, description = "Executors", body = Vec<ExecutorInfo>)))]
pub async fn list_executors(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.superuser()?;
    Ok(Json(
        json!({ "executors": state.builds.executors().await? }),
    ))
}

// ---- the protocol ----

/// A caller holding a valid node token.
pub struct Node(NodeAuth);

impl FromRequestParts<Arc<ApiState>> for Node {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(ApiError::unauthorized)?;
        match state.builds.authenticate_node(token.trim()).await? {
            Some(a) => Ok(Node(a)),
            None => Err(ApiError::unauthorized()),
        }
    }
}

/// The executor named by the `x-dockyard-executor` header.
pub struct ExecutorId(String);

impl<S: Send + Sync> FromRequestParts<S> for ExecutorId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .headers
            .get(EXECUTOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| ExecutorId(v.to_string()))
            .ok_or_else(|| ApiError::invalid(format!("the {EXECUTOR_HEADER} header is missing")))
    }
}

/// An executor introduces itself (node token).
#[utoipa::path(post, path = "/api/v1/executor/register", tag = "executors",
    request_body(content = Object), responses((status = 200, description = "RegisterResponse")))]
pub async fn register(
    State(state): State<Arc<ApiState>>,
    Node(auth): Node,
    Json(body): Json<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    Ok(Json(state.builds.register_executor(&auth, &body).await?))
}

/// Long poll for a job (node token): 200 with a JobAssignment, or 204.
#[utoipa::path(post, path = "/api/v1/executor/poll", tag = "executors",
    request_body(content = Object), responses((status = 200, description = "JobAssignment"), (status = 204, description = "Nothing to do")))]
pub async fn poll(
    State(state): State<Arc<ApiState>>,
    Node(auth): Node,
    Json(body): Json<PollRequest>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_secs(body.wait_seconds.min(50));
    match state.builds.poll(&auth, &body.executor_id, wait).await? {
        Some(job) => Ok(Json(job).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Renews the leases of an executor's jobs (node token).
#[utoipa::path(post, path = "/api/v1/executor/heartbeat", tag = "executors",
    request_body(content = Object), responses((status = 200, description = "HeartbeatResponse")))]
pub async fn heartbeat(
    State(state): State<Arc<ApiState>>,
    Node(auth): Node,
    Json(body): Json<Heartbeat>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    Ok(Json(
        state
            .builds
            .heartbeat(&auth, &body.executor_id, &body.jobs)
            .await?,
    ))
}

/// Phase and log text of a job (node token, holder of the lease).
#[utoipa::path(post, path = "/api/v1/executor/jobs/{job}/log", tag = "executors",
    params(("job" = String, Path)), request_body(content = Object),
    responses((status = 200, description = "HeartbeatResponse"), (status = 409, description = "Lease lost")))]
pub async fn job_log(
    State(state): State<Arc<ApiState>>,
    Node(auth): Node,
    ExecutorId(executor): ExecutorId,
    Path(job): Path<String>,
    Json(body): Json<JobLog>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    Ok(Json(
        state.builds.job_log(&auth, &executor, &job, &body).await?,
    ))
}

/// The job's registry token (node token, holder of the lease).
#[utoipa::path(post, path = "/api/v1/executor/jobs/{job}/token", tag = "executors",
    params(("job" = String, Path)), request_body(content = Object),
    responses((status = 200, description = "TokenResponse")))]
pub async fn job_token(
    State(state): State<Arc<ApiState>>,
    Node(auth): Node,
    ExecutorId(executor): ExecutorId,
    Path(job): Path<String>,
    Json(body): Json<TokenRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    Ok(Json(
        state
            .builds
            .job_token(&auth, &executor, &job, &body.pull)
            .await?,
    ))
}

/// The uploaded context of the job's build (node token, holder of the lease).
#[utoipa::path(get, path = "/api/v1/executor/jobs/{job}/context", tag = "executors",
    params(("job" = String, Path)),
    responses((status = 200, description = "The archive")))]
pub async fn job_context(
    State(state): State<Arc<ApiState>>,
    Node(auth): Node,
    ExecutorId(executor): ExecutorId,
    Path(job): Path<String>,
) -> Result<Response, ApiError> {
    let r = state.builds.job_context(&auth, &executor, &job).await?;
    let size = r.meta.size;
    let body = Body::from_stream(r.into_stream());
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

/// How a job ended (node token, holder of the lease).
#[utoipa::path(post, path = "/api/v1/executor/jobs/{job}/result", tag = "executors",
    params(("job" = String, Path)), request_body(content = Object),
    responses((status = 204, description = "Recorded"), (status = 409, description = "Lease lost")))]
pub async fn job_result(
    State(state): State<Arc<ApiState>>,
    Node(auth): Node,
    ExecutorId(executor): ExecutorId,
    Path(job): Path<String>,
    Json(body): Json<JobResult>,
) -> Result<StatusCode, ApiError> {
    state
        .builds
        .job_result(&auth, &executor, &job, &body)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
