//! Users, organizations, their members and teams.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use dockyard_core::identity::{Principal, Role};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller, ClientAddress};

#[derive(Deserialize, ToSchema)]
pub struct CreateUser {
    username: String,
    password: String,
    #[serde(default)]
    superuser: bool,
}

#[derive(Deserialize, ToSchema)]
pub struct CreateOrganization {
    name: String,
}

#[derive(Deserialize, ToSchema)]
pub struct Membership {
    /// `member`, `admin` or `owner`.
    role: String,
}

#[derive(Deserialize, ToSchema)]
pub struct CreateTeam {
    name: String,
}

/// The organization's namespace id, when `who` administers it (404 when it
/// does not exist, 403 when `who` is not an owner or admin).
async fn org_admin(state: &ApiState, who: &Principal, org: &str) -> Result<i64, ApiError> {
    let (ns, kind) = state
        .identity
        .namespace(org)
        .await?
        .ok_or_else(|| ApiError::not_found("organization"))?;
    if kind != "org" {
        return Err(ApiError::not_found("organization"));
    }
    if state.identity.namespace_role(who, org).await? != Some(Role::Admin) {
        return Err(ApiError::forbidden());
    }
    Ok(ns)
}

async fn user_id(state: &ApiState, name: &str) -> Result<i64, ApiError> {
    match state.identity.principal_by_name(name).await? {
        Some(Principal::User { id, .. }) => Ok(id),
        _ => Err(ApiError::not_found("user")),
    }
}

/// The calling account.
#[utoipa::path(get, path = "/api/v1/user", tag = "accounts", responses((status = 200, description = "The caller")))]
pub async fn me(caller: Caller) -> Result<Json<Value>, ApiError> {
    Ok(Json(match caller.required()? {
        Principal::User {
            name, superuser, ..
        } => json!({ "kind": "user", "name": name, "superuser": superuser }),
        p => json!({ "kind": p.kind(), "name": p.name() }),
    }))
}

/// Creates a user (superusers only).
#[utoipa::path(post, path = "/api/v1/users", tag = "accounts", request_body = CreateUser,
    responses((status = 201, description = "Created")))]
pub async fn create_user(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Json(body): Json<CreateUser>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.superuser()?;
    if body.password.len() < 8 {
        return Err(ApiError::invalid(
            "the password must have at least 8 characters",
        ));
    }
    state
        .identity
        .create_user(&body.username, Some(&body.password), body.superuser)
        .await?;
    state
        .identity
        .audit(who, "user.created", &body.username, &addr, true, None)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": body.username, "superuser": body.superuser })),
    ))
}

/// Creates an organization owned by the calling user.
#[utoipa::path(post, path = "/api/v1/organizations", tag = "accounts", request_body = CreateOrganization,
    responses((status = 201, description = "Created")))]
pub async fn create_org(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Json(body): Json<CreateOrganization>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    let Principal::User { id, .. } = who else {
        return Err(ApiError::forbidden());
    };
    state.identity.create_org(&body.name, *id).await?;
    state
        .identity
        .audit(who, "organization.created", &body.name, &addr, true, None)
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "name": body.name }))))
}

/// Adds a member to an organization or changes their role (owners and admins).
#[utoipa::path(put, path = "/api/v1/organizations/{org}/members/{user}", tag = "accounts",
    params(("org" = String, Path), ("user" = String, Path)), request_body = Membership,
    responses((status = 200, description = "Member set")))]
pub async fn set_member(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((org, user)): Path<(String, String)>,
    Json(body): Json<Membership>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    let ns = org_admin(&state, who, &org).await?;
    let uid = user_id(&state, &user).await?;
    state.identity.set_org_member(ns, uid, &body.role).await?;
    state
        .identity
        .audit(
            who,
            "permission.changed",
            &org,
            &addr,
            true,
            Some(&format!("member {user}: {}", body.role)),
        )
        .await?;
    Ok(Json(
        json!({ "organization": org, "user": user, "role": body.role }),
    ))
}

/// Creates a team in an organization (owners and admins).
#[utoipa::path(post, path = "/api/v1/organizations/{org}/teams", tag = "accounts",
    params(("org" = String, Path)), request_body = CreateTeam,
    responses((status = 201, description = "The team and its id")))]
pub async fn create_team(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(org): Path<String>,
    Json(body): Json<CreateTeam>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    let ns = org_admin(&state, who, &org).await?;
    let id = state.identity.create_team(ns, &body.name).await?;
    state
        .identity
        .audit(
            who,
            "team.created",
            &format!("{org}/{}", body.name),
            &addr,
            true,
            None,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "organization": org, "name": body.name, "id": id })),
    ))
}

/// Adds a user to a team (owners and admins of the organization).
#[utoipa::path(put, path = "/api/v1/organizations/{org}/teams/{team}/members/{user}", tag = "accounts",
    params(("org" = String, Path), ("team" = String, Path), ("user" = String, Path)),
    responses((status = 200, description = "Added")))]
pub async fn add_team_member(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((org, team, user)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    let ns = org_admin(&state, who, &org).await?;
    let team_id = state
        .identity
        .team(ns, &team)
        .await?
        .ok_or_else(|| ApiError::not_found("team"))?;
    let uid = user_id(&state, &user).await?;
    state.identity.add_team_member(team_id, uid).await?;
    state
        .identity
        .audit(
            who,
            "permission.changed",
            &format!("{org}/{team}"),
            &addr,
            true,
            Some(&format!("team member {user}")),
        )
        .await?;
    Ok(Json(
        json!({ "organization": org, "team": team, "user": user }),
    ))
}

/// All users (superusers).
#[utoipa::path(get, path = "/api/v1/users", tag = "accounts", responses((status = 200, description = "Users")))]
pub async fn list_users(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.superuser()?;
    let users: Vec<Value> = state
        .identity
        .users()
        .await?
        .into_iter()
        .map(|(name, superuser, created_at)| json!({ "name": name, "superuser": superuser, "created_at": created_at }))
        .collect();
    Ok(Json(json!({ "users": users })))
}
