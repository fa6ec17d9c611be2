//! Robot accounts of a namespace and their tokens.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use dockyard_core::identity::{Principal, TokenKind};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller, ClientAddress};

#[derive(Deserialize, ToSchema)]
pub struct CreateRobot {
    /// The robot's name; its full name is `namespace+name`.
    name: String,
}

#[derive(Deserialize, ToSchema, Default)]
pub struct CreateToken {
    /// Days until the token expires; never when absent.
    expires_in_days: Option<u32>,
}

/// Whether `who` administers namespace `ns` (its user, an org owner/admin,
/// or a superuser).
pub(super) async fn namespace_admin(
    state: &ApiState,
    who: &Principal,
    ns: &str,
) -> Result<(), ApiError> {
    if state.identity.namespace(ns).await?.is_none() {
        return Err(ApiError::not_found("namespace"));
    }
    if state.identity.namespace_role(who, ns).await? == Some(dockyard_core::identity::Role::Admin) {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

#[derive(Deserialize, ToSchema)]
pub struct UpdateNamespace {
    /// Whether a push to a missing repository creates it.
    create_on_push: bool,
}

/// Namespace settings (namespace admins).
#[utoipa::path(patch, path = "/api/v1/namespaces/{namespace}", tag = "accounts",
    params(("namespace" = String, Path)), request_body = UpdateNamespace,
    responses((status = 200, description = "Updated")))]
pub async fn update_namespace(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(ns): Path<String>,
    Json(body): Json<UpdateNamespace>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    namespace_admin(&state, who, &ns).await?;
    state
        .identity
        .set_create_on_push(&ns, body.create_on_push)
        .await?;
    let detail = format!("create_on_push={}", body.create_on_push);
    state
        .identity
        .audit(who, "namespace.changed", &ns, &addr, true, Some(&detail))
        .await?;
    Ok(Json(
        json!({ "namespace": ns, "create_on_push": body.create_on_push }),
    ))
}

pub(super) fn expiry(days: Option<u32>) -> Option<i64> {
    days.map(|d| dockyard_core::now_millis() + i64::from(d) * 86_400_000)
}

/// Creates a robot and its first token (shown once).
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/robots", tag = "robots",
    params(("namespace" = String, Path)), request_body = CreateRobot,
    responses((status = 201, description = "The robot and its token")))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(ns): Path<String>,
    Json(body): Json<CreateRobot>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    namespace_admin(&state, who, &ns).await?;
    let (id, full) = state.identity.create_robot(&ns, &body.name).await?;
    let (token_id, token) = state
        .identity
        .create_token(TokenKind::Robot, None, Some(id), "initial", None)
        .await?;
    state
        .identity
        .audit(who, "robot.created", &full, &addr, true, None)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": full, "token_id": token_id, "token": token })),
    ))
}

/// Issues another token for a robot (rotation: revoke the old one after).
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/robots/{robot}/tokens", tag = "robots",
    params(("namespace" = String, Path), ("robot" = String, Path)), request_body = CreateToken,
    responses((status = 201, description = "The new token, shown once")))]
pub async fn create_token(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, robot)): Path<(String, String)>,
    body: Option<Json<CreateToken>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    namespace_admin(&state, who, &ns).await?;
    let full = format!("{ns}+{robot}");
    let Some(Principal::Robot { id, .. }) = state.identity.principal_by_name(&full).await? else {
        return Err(ApiError::not_found("robot"));
    };
    let body = body.map(|b| b.0).unwrap_or_default();
    let (token_id, token) = state
        .identity
        .create_token(
            TokenKind::Robot,
            None,
            Some(id),
            "api",
            expiry(body.expires_in_days),
        )
        .await?;
    state
        .identity
        .audit(who, "token.created", &full, &addr, true, Some(&token_id))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": full, "token_id": token_id, "token": token })),
    ))
}

/// The robots of a namespace (namespace admins).
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/robots", tag = "robots",
    params(("namespace" = String, Path)), responses((status = 200, description = "Robots")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(ns): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    namespace_admin(&state, who, &ns).await?;
    let robots: Vec<Value> = state
        .identity
        .robots(&ns)
        .await?
        .into_iter()
        .map(|(name, created_at)| json!({ "name": name, "created_at": created_at }))
        .collect();
    Ok(Json(json!({ "robots": robots })))
}

/// Deletes a robot, its tokens and its permissions (namespace admins).
#[utoipa::path(delete, path = "/api/v1/namespaces/{namespace}/robots/{robot}", tag = "robots",
    params(("namespace" = String, Path), ("robot" = String, Path)),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, robot)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let who = caller.required()?;
    namespace_admin(&state, who, &ns).await?;
    let full = format!("{ns}+{robot}");
    let Some(Principal::Robot { id, .. }) = state.identity.principal_by_name(&full).await? else {
        return Err(ApiError::not_found("robot"));
    };
    state.identity.delete_robot(id).await?;
    state
        .identity
        .audit(who, "robot.deleted", &full, &addr, true, None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
