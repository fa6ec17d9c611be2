//! Build triggers: git push webhooks. Namespace admins create and delete
//! triggers and read their delivery log; the git host posts to the
//! trigger's webhook URL, authenticated by the payload signature only.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use dockyard_buildmanager::TriggerInfo;
use dockyard_core::identity::Role;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiState, Caller, ClientAddress};

async fn namespace_admin(state: &ApiState, caller: &Caller, ns: &str) -> Result<(), ApiError> {
    let who = caller.required()?;
    if state.identity.namespace_role(who, ns).await? == Some(Role::Admin) {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

#[derive(Deserialize, ToSchema)]
pub struct CreateTrigger {
    /// `github`, `gitlab` or `generic`.
    kind: String,
}

/// Creates a push trigger in a namespace (namespace admin). The secret is
/// shown once: configure it at the git host with the webhook URL.
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/triggers", tag = "builds",
    params(("namespace" = String, Path)), request_body = CreateTrigger,
    responses((status = 201, description = "Created; includes `secret` and `webhook_url`")))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(ns): Path<String>,
    headers: HeaderMap,
    Json(body): Json<CreateTrigger>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    namespace_admin(&state, &caller, &ns).await?;
    let who = caller.required()?;
    let (trigger, secret) = state
        .builds
        .create_trigger(&ns, &body.kind, who.name())
        .await?;
    state
        .identity
        .audit(who, "trigger.created", &ns, &addr, true, Some(&trigger.id))
        .await?;
    let base = state.public_url.clone().unwrap_or_else(|| {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let scheme = if state.tls { "https" } else { "http" };
        format!("{scheme}://{host}")
    });
    let mut v = serde_json::to_value(&trigger).expect("serializable");
    v["secret"] = json!(secret);
    v["webhook_url"] = json!(format!("{base}{}", trigger.webhook_path));
    Ok((StatusCode::CREATED, Json(v)))
}

/// Triggers of a namespace (namespace admin).
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/triggers", tag = "builds",
    params(("namespace" = String, Path)),
    responses((status = 200, description = "Triggers", body = Vec<TriggerInfo>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(ns): Path<String>,
) -> Result<Json<Value>, ApiError> {
    namespace_admin(&state, &caller, &ns).await?;
    Ok(Json(
        json!({ "triggers": state.builds.triggers(&ns).await? }),
    ))
}

async fn trigger_admin(
    state: &ApiState,
    caller: &Caller,
    id: &str,
) -> Result<TriggerInfo, ApiError> {
    caller.required()?;
    let t = state.builds.trigger(id).await?;
    namespace_admin(state, caller, &t.namespace).await?;
    Ok(t)
}

/// Deletes a trigger (namespace admin); its definitions stay, untriggered.
#[utoipa::path(delete, path = "/api/v1/triggers/{id}", tag = "builds",
    params(("id" = String, Path)),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let t = trigger_admin(&state, &caller, &id).await?;
    state.builds.delete_trigger(&id).await?;
    state
        .identity
        .audit(
            &caller.0,
            "trigger.deleted",
            &t.namespace,
            &addr,
            true,
            Some(&id),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
pub struct DeliveriesQuery {
    /// How many (default 50, at most 500).
    n: Option<u32>,
}

/// Recent deliveries of a trigger: accepted, ignored and rejected
/// (namespace admin).
#[utoipa::path(get, path = "/api/v1/triggers/{id}/deliveries", tag = "builds",
    params(("id" = String, Path), DeliveriesQuery),
    responses((status = 200, description = "Deliveries, newest first")))]
pub async fn deliveries(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Json<Value>, ApiError> {
    trigger_admin(&state, &caller, &id).await?;
    let d = state.builds.deliveries(&id, q.n.unwrap_or(50)).await?;
    Ok(Json(json!({ "deliveries": d })))
}

/// Receives a push from GitHub (`X-Hub-Signature-256`), GitLab
/// (`X-Gitlab-Token`) or the generic format (`X-Dockyard-Signature-256`).
/// 401 for a missing or wrong signature; every delivery is recorded.
#[utoipa::path(post, path = "/api/v1/triggers/{id}/webhook", tag = "builds",
    params(("id" = String, Path)), request_body(content = Object, description = "The git host's push payload"),
    responses((status = 202, description = "Accepted; the builds started"), (status = 401, description = "Bad signature")))]
pub async fn webhook(
    State(state): State<Arc<ApiState>>,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let builds = state.builds.webhook(&id, &headers, &body, &addr).await?;
    let ids: Vec<&str> = builds.iter().map(|b| b.id.as_str()).collect();
    Ok((StatusCode::ACCEPTED, Json(json!({ "builds": ids }))))
}
