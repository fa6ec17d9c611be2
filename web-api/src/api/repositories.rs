//! Repositories: list, create, read, change visibility and description,
//! delete, and grant permissions on them.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use dockyard_core::identity::{Principal, RepositoryInfo, Role};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiState, Caller, ClientAddress};

#[derive(Deserialize, IntoParams)]
pub struct ListQuery {
    /// Only repositories of this namespace.
    namespace: Option<String>,
    /// Page size (1 to 100, default 50).
    n: Option<usize>,
    /// The last name of the previous page.
    last: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct CreateRepository {
    /// `namespace/name`.
    name: String,
    /// `private` (default) or `public`.
    visibility: Option<String>,
    description: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct UpdateRepository {
    visibility: Option<String>,
    description: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct Grant {
    /// `read`, `write` or `admin`.
    role: String,
}

fn view(r: &RepositoryInfo) -> Value {
    json!({ "name": r.name, "visibility": r.visibility, "description": r.description, "created_at": r.created_at })
}

fn check_visibility(v: Option<&str>) -> Result<(), ApiError> {
    match v {
        None | Some("public" | "private") => Ok(()),
        Some(other) => Err(ApiError::invalid(format!(
            "visibility must be public or private, not {other:?}"
        ))),
    }
}

/// The caller's role on `name`, 404 when it may not even read it.
pub(super) async fn role(
    state: &ApiState,
    who: &Principal,
    name: &str,
) -> Result<(Role, RepositoryInfo), ApiError> {
    let repo = state
        .identity
        .repository(name)
        .await?
        .ok_or_else(|| ApiError::not_found("repository"))?;
    let role = state
        .identity
        .repository_role(who, name)
        .await?
        .ok_or_else(|| ApiError::not_found("repository"))?;
    Ok((role, repo))
}

/// Lists the repositories the caller may read, by name.
#[utoipa::path(get, path = "/api/v1/repositories", tag = "repositories", params(ListQuery),
    responses((status = 200, description = "A page of repositories and the cursor of the next one")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let n = q.n.unwrap_or(50);
    if !(1..=100).contains(&n) {
        return Err(ApiError::invalid("n must be from 1 to 100"));
    }
    let repos = state
        .identity
        .visible_repositories(
            &caller.0,
            q.namespace.as_deref(),
            q.last.as_deref().unwrap_or(""),
            n + 1,
        )
        .await?;
    let next = (repos.len() > n).then(|| repos[n - 1].name.clone());
    let items: Vec<Value> = repos.iter().take(n).map(view).collect();
    Ok(Json(json!({ "repositories": items, "next": next })))
}

/// Creates an empty repository (write on its namespace needed).
#[utoipa::path(post, path = "/api/v1/repositories", tag = "repositories", request_body = CreateRepository,
    responses((status = 201, description = "Created"), (status = 409, description = "Exists")))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Json(body): Json<CreateRepository>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    if body.name.parse::<dockyard_oci::RepoName>().is_err() || !body.name.contains('/') {
        return Err(ApiError::invalid(
            "name must be namespace/name in the registry's name grammar",
        ));
    }
    check_visibility(body.visibility.as_deref())?;
    // Creating through the API needs admin on the namespace, whether or not
    // pushes create repositories there.
    let ns = body.name.split('/').next().unwrap_or("");
    if state.identity.namespace_role(who, ns).await? != Some(Role::Admin) {
        return Err(ApiError::forbidden());
    }
    let repo = state
        .identity
        .create_repository(
            &body.name,
            body.visibility.as_deref().unwrap_or("private"),
            body.description.as_deref().unwrap_or(""),
            who.name(),
        )
        .await?;
    state
        .identity
        .audit(who, "repository.created", &repo.name, &addr, true, None)
        .await?;
    Ok((StatusCode::CREATED, Json(view(&repo))))
}

/// A repository.
#[utoipa::path(get, path = "/api/v1/repositories/{namespace}/{name}", tag = "repositories",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "The repository"), (status = 404, description = "Unknown or not visible")))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (role, repo) = role(&state, &caller.0, &format!("{ns}/{name}")).await?;
    let mut v = view(&repo);
    v["your_role"] = json!(role.as_str());
    Ok(Json(v))
}

/// Changes visibility or description (admin on the repository).
#[utoipa::path(patch, path = "/api/v1/repositories/{namespace}/{name}", tag = "repositories",
    params(("namespace" = String, Path), ("name" = String, Path)), request_body = UpdateRepository,
    responses((status = 200, description = "Updated")))]
pub async fn update(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, name)): Path<(String, String)>,
    Json(body): Json<UpdateRepository>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    let full = format!("{ns}/{name}");
    let (role, _) = role(&state, who, &full).await?;
    if role != Role::Admin {
        return Err(ApiError::forbidden());
    }
    check_visibility(body.visibility.as_deref())?;
    state
        .identity
        .update_repository(
            &full,
            body.visibility.as_deref(),
            body.description.as_deref(),
        )
        .await?;
    if let Some(v) = &body.visibility {
        state
            .identity
            .audit(who, "repository.visibility", &full, &addr, true, Some(v))
            .await?;
    }
    let repo = state
        .identity
        .repository(&full)
        .await?
        .ok_or_else(|| ApiError::not_found("repository"))?;
    Ok(Json(view(&repo)))
}

/// Deletes a repository and everything in it (admin on the repository).
#[utoipa::path(delete, path = "/api/v1/repositories/{namespace}/{name}", tag = "repositories",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let who = caller.required()?;
    let full = format!("{ns}/{name}");
    let (role, _) = role(&state, who, &full).await?;
    if role != Role::Admin {
        return Err(ApiError::forbidden());
    }
    state.identity.delete_repository(&full, who.name()).await?;
    state
        .identity
        .audit(who, "repository.deleted", &full, &addr, true, None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The subject id of a `user`, `robot` or `team` (by id) path segment.
async fn subject_id(state: &ApiState, kind: &str, subject: &str) -> Result<i64, ApiError> {
    match kind {
        "user" | "robot" => match state.identity.principal_by_name(subject).await? {
            Some(Principal::User { id, .. }) if kind == "user" => Ok(id),
            Some(Principal::Robot { id, .. }) if kind == "robot" => Ok(id),
            _ => Err(ApiError::not_found(kind)),
        },
        "team" => subject
            .parse()
            .map_err(|_| ApiError::invalid("a team is named by its id")),
        _ => Err(ApiError::invalid("kind must be user, robot or team")),
    }
}

/// Removes a grant from the repository (admin needed).
#[utoipa::path(delete, path = "/api/v1/repositories/{namespace}/{name}/permissions/{kind}/{subject}", tag = "repositories",
    params(("namespace" = String, Path), ("name" = String, Path), ("kind" = String, Path), ("subject" = String, Path)),
    responses((status = 204, description = "Removed"), (status = 404, description = "No such grant")))]
pub async fn revoke(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, name, kind, subject)): Path<(String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let who = caller.required()?;
    let full = format!("{ns}/{name}");
    let (role, repo) = role(&state, who, &full).await?;
    if role != Role::Admin {
        return Err(ApiError::forbidden());
    }
    let id = subject_id(&state, &kind, &subject).await?;
    if !state.identity.revoke_grant(repo.id, &kind, id).await? {
        return Err(ApiError::not_found("grant"));
    }
    let detail = format!("{kind} {subject}: removed");
    state
        .identity
        .audit(who, "permission.changed", &full, &addr, true, Some(&detail))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grants a user, team or robot a role on the repository (admin needed).
/// `subject` is a user name, a robot's `namespace+name`, or a team's id.
#[utoipa::path(put, path = "/api/v1/repositories/{namespace}/{name}/permissions/{kind}/{subject}", tag = "repositories",
    params(("namespace" = String, Path), ("name" = String, Path), ("kind" = String, Path, description = "user, robot or team"), ("subject" = String, Path)),
    request_body = Grant, responses((status = 200, description = "Granted")))]
pub async fn grant(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, name, kind, subject)): Path<(String, String, String, String)>,
    Json(body): Json<Grant>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    let full = format!("{ns}/{name}");
    let (role, repo) = role(&state, who, &full).await?;
    if role != Role::Admin {
        return Err(ApiError::forbidden());
    }
    let granted = Role::parse(&body.role)
        .ok_or_else(|| ApiError::invalid("role must be read, write or admin"))?;
    let subject_id = subject_id(&state, &kind, &subject).await?;
    state
        .identity
        .grant(repo.id, &kind, subject_id, granted)
        .await?;
    state
        .identity
        .audit(
            who,
            "permission.changed",
            &full,
            &addr,
            true,
            Some(&format!("{kind} {subject}: {}", granted.as_str())),
        )
        .await?;
    Ok(Json(
        json!({ "repository": full, "kind": kind, "subject": subject, "role": granted.as_str() }),
    ))
}
