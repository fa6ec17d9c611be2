//! The event log, read-only: everything, for superusers; one repository's
//! events, for its admins.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use dockyard_core::identity::Role;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::{ApiError, ApiState, Caller};

#[derive(Deserialize, IntoParams)]
pub struct EventsQuery {
    /// Events after this id (the `next` of the previous page); default 0.
    after: Option<i64>,
    /// Page size (1 to 1000, default 100).
    n: Option<i64>,
}

async fn page(
    state: &ApiState,
    q: &EventsQuery,
    repository: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let n = q.n.unwrap_or(100);
    if !(1..=1000).contains(&n) {
        return Err(ApiError::invalid("n must be from 1 to 1000"));
    }
    let events = dockyard_core::events::list(
        &state.identity.db,
        q.after.unwrap_or(0).max(0),
        repository,
        n,
    )
    .await
    .map_err(|e| ApiError::from(dockyard_core::identity::IdentityError::from(e)))?;
    let next = events.last().map(|e| e.id);
    Ok(Json(json!({ "events": events, "next": next })))
}

/// Every event, oldest first (superusers).
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, description = "A page of events and the cursor of the next one")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.superuser()?;
    page(&state, &q, None).await
}

/// A repository's events, oldest first (repository admins).
#[utoipa::path(get, path = "/api/v1/repositories/{namespace}/{name}/events", tag = "events",
    params(("namespace" = String, Path), ("name" = String, Path), EventsQuery),
    responses((status = 200, description = "A page of events and the cursor of the next one")))]
pub async fn repository(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    let full = format!("{ns}/{name}");
    let (role, _) = super::repositories::role(&state, who, &full).await?;
    if role != Role::Admin {
        return Err(ApiError::forbidden());
    }
    page(&state, &q, Some(&full)).await
}
