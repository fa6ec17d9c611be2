//! Base-image rebuilds: a definition's rebuild settings (admin) and the
//! rebuild decisions of a repository (read).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use dockyard_buildmanager::DefinitionInfo;
use dockyard_buildmanager::rebuild::{DefinitionUpdate, RebuildInfo};
use dockyard_core::identity::Role;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::builds::{definition_with_role, need};
use super::{ApiError, ApiState, Caller, ClientAddress};

/// Changes a build definition's rebuild settings: `auto_rebuild` and
/// `base_check_schedule` (admin on the repository).
#[utoipa::path(patch, path = "/api/v1/build-definitions/{id}", tag = "builds",
    params(("id" = String, Path)), request_body = DefinitionUpdate,
    responses((status = 200, description = "The definition", body = DefinitionInfo),
        (status = 400, description = "Invalid schedule")))]
pub async fn update_definition(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
    Json(body): Json<DefinitionUpdate>,
) -> Result<Json<DefinitionInfo>, ApiError> {
    let def = definition_with_role(&state, &caller, &id, Role::Admin).await?;
    let updated = state.builds.update_definition(&id, body).await?;
    state
        .identity
        .audit(
            &caller.0,
            "build_definition.updated",
            &def.repository,
            &addr,
            true,
            Some(&def.name),
        )
        .await?;
    Ok(Json(updated))
}

#[derive(Deserialize, IntoParams)]
pub struct RebuildQuery {
    /// How many (1 to 100, default 50), newest first.
    n: Option<u32>,
}

/// The base-image rebuild decisions about a repository's definitions:
/// pending, started (with the build), refused (why) or superseded.
#[utoipa::path(get, path = "/api/v1/repositories/{namespace}/{name}/builds/rebuilds", tag = "builds",
    params(("namespace" = String, Path), ("name" = String, Path), RebuildQuery),
    responses((status = 200, description = "Rebuild records, newest first", body = Vec<RebuildInfo>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<RebuildQuery>,
) -> Result<Json<Value>, ApiError> {
    let repo = format!("{ns}/{name}");
    need(&state, &caller, &repo, Role::Read).await?;
    let n = q.n.unwrap_or(50);
    if !(1..=100).contains(&n) {
        return Err(ApiError::invalid("n must be from 1 to 100"));
    }
    let rebuilds = state.builds.rebuilds(&repo, n).await?;
    Ok(Json(json!({ "rebuilds": rebuilds })))
}
