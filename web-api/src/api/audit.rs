//! The audit log (superusers).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::{ApiError, ApiState, Caller};

#[derive(Deserialize, IntoParams)]
pub struct AuditQuery {
    /// Only this actor.
    actor: Option<String>,
    /// Only this action (`login`, `push`, `token.created`, …).
    action: Option<String>,
    /// Entries older than this id (the `next` of the previous page).
    before: Option<i64>,
    /// Page size (1 to 500, default 100).
    n: Option<i64>,
}

/// Audit entries, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "A page of entries and the cursor of the next one")))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.superuser()?;
    let n = q.n.unwrap_or(100);
    if !(1..=500).contains(&n) {
        return Err(ApiError::invalid("n must be from 1 to 500"));
    }
    let entries = state
        .identity
        .audit_entries(q.actor.as_deref(), q.action.as_deref(), q.before, n + 1)
        .await?;
    let next = (entries.len() as i64 > n).then(|| entries[n as usize - 1].id);
    let page: Vec<_> = entries.into_iter().take(n as usize).collect();
    Ok(Json(json!({ "entries": page, "next": next })))
}
