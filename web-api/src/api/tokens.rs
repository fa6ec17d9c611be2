//! Personal access tokens, and revoking any token one controls.

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
pub struct CreatePersonalToken {
    /// What the token is for.
    name: String,
    /// Days until it expires; never when absent.
    expires_in_days: Option<u32>,
}

fn user_id(p: &Principal) -> Result<i64, ApiError> {
    match p {
        Principal::User { id, .. } => Ok(*id),
        _ => Err(ApiError::forbidden()),
    }
}

/// Creates a personal access token for the calling user (shown once).
#[utoipa::path(post, path = "/api/v1/user/tokens", tag = "tokens", request_body = CreatePersonalToken,
    responses((status = 201, description = "The token, shown once")))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Json(body): Json<CreatePersonalToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    let uid = user_id(who)?;
    let (id, token) = state
        .identity
        .create_token(
            TokenKind::Personal,
            Some(uid),
            None,
            &body.name,
            super::robots::expiry(body.expires_in_days),
        )
        .await?;
    state
        .identity
        .audit(who, "token.created", who.name(), &addr, true, Some(&id))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "name": body.name, "token": token })),
    ))
}

/// The calling user's personal tokens, without secrets, with last use.
#[utoipa::path(get, path = "/api/v1/user/tokens", tag = "tokens", responses((status = 200, description = "Tokens")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let uid = user_id(caller.required()?)?;
    Ok(Json(
        json!({ "tokens": state.identity.personal_tokens(uid).await? }),
    ))
}

/// Revokes a token: one's own personal token, a robot token of a namespace
/// one administers, or any token for a superuser.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 404, description = "Unknown")))]
pub async fn revoke(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = caller.required()?;
    let (owner, robot) = state
        .identity
        .token_owner(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("token"))?;
    let allowed = match (who, owner, &robot) {
        (
            Principal::User {
                superuser: true, ..
            },
            _,
            _,
        ) => true,
        (Principal::User { id: me, .. }, Some(o), _) => *me == o,
        (p, None, Some(r)) => {
            let ns = r.split('+').next().unwrap_or("");
            state.identity.namespace_role(p, ns).await?
                == Some(dockyard_core::identity::Role::Admin)
        }
        _ => false,
    };
    if !allowed {
        // Do not reveal that someone else's token exists.
        return Err(ApiError::not_found("token"));
    }
    if !state.identity.revoke_token(&id).await? {
        return Err(ApiError::not_found("token"));
    }
    state
        .identity
        .audit(
            who,
            "token.revoked",
            robot.as_deref().unwrap_or(""),
            &addr,
            true,
            Some(&id),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
