//! Outbound webhook subscriptions and their delivery log. Who manages a
//! subscription depends on its scope: a repository's admins, an
//! organization's owners and admins, or superusers for global ones. By id,
//! a subscription the caller may not manage is not found.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use dockyard_core::identity::{Principal, Role};
use dockyard_webhooks::{
    Attempt, Delivery, Scope, Subscription, SubscriptionInput, SubscriptionPatch,
};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::{ApiError, ApiState, Caller, ClientAddress};

/// A JSON body whose rejection (bad JSON, a missing or unknown field, a
/// wrong type) is a 400 in the API's error shape, naming the problem.
pub struct Body<T>(T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::invalid(e.body_text())),
        }
    }
}

/// Admin on the repository: 404 when the caller cannot read it, 403 when
/// they can but are not an admin.
async fn repository_admin(state: &ApiState, who: &Principal, repo: &str) -> Result<(), ApiError> {
    let (role, _) = super::repositories::role(state, who, repo).await?;
    if role == Role::Admin {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

/// Owner or admin of the organization: 404 when it does not exist, 403 when
/// the caller does not administer it.
async fn organization_admin(state: &ApiState, who: &Principal, org: &str) -> Result<(), ApiError> {
    match state.identity.namespace(org).await? {
        Some((_, kind)) if kind == "org" => {}
        _ => return Err(ApiError::not_found("organization")),
    }
    if state.identity.namespace_role(who, org).await? == Some(Role::Admin) {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

/// Whether `who` may manage subscriptions of `scope`.
async fn manages(state: &ApiState, who: &Principal, scope: &Scope) -> Result<bool, ApiError> {
    Ok(match scope {
        Scope::Repository(r) => state.identity.repository_role(who, r).await? == Some(Role::Admin),
        Scope::Namespace(ns) => state.identity.namespace_role(who, ns).await? == Some(Role::Admin),
        Scope::Global => matches!(
            who,
            Principal::User {
                superuser: true,
                ..
            }
        ),
    })
}

/// The subscription `id` if the caller manages it (else 404: ids of other
/// people's subscriptions are not confirmed).
async fn managed(state: &ApiState, caller: &Caller, id: &str) -> Result<Subscription, ApiError> {
    let who = caller.required()?;
    let s = state.webhooks.get(id).await?;
    if manages(state, who, &s.scope()).await? {
        Ok(s)
    } else {
        Err(ApiError::not_found("webhook"))
    }
}

fn audit_target(scope: &Scope) -> String {
    match scope {
        Scope::Repository(r) => r.clone(),
        Scope::Namespace(ns) => ns.clone(),
        Scope::Global => "*".into(),
    }
}

async fn create(
    state: &ApiState,
    who: &Principal,
    addr: &str,
    scope: Scope,
    body: SubscriptionInput,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let target = audit_target(&scope);
    let (s, secret) = state.webhooks.create(scope, body, who.name()).await?;
    state
        .identity
        .audit(who, "webhook.created", &target, addr, true, Some(&s.id))
        .await?;
    let mut v = serde_json::to_value(&s).expect("serializable");
    v["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(v)))
}

/// Subscribes a URL to a repository's events (repository admins). The
/// response carries the signing `secret`, shown this once.
#[utoipa::path(post, path = "/api/v1/repositories/{namespace}/{name}/webhooks", tag = "webhooks",
    params(("namespace" = String, Path), ("name" = String, Path)), request_body = SubscriptionInput,
    responses((status = 201, description = "Created; includes `secret`", body = Subscription),
        (status = 400, description = "Invalid URL, format, event type, glob or regex")))]
pub async fn create_repository(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, name)): Path<(String, String)>,
    Body(body): Body<SubscriptionInput>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    let repo = format!("{ns}/{name}");
    repository_admin(&state, who, &repo).await?;
    create(&state, who, &addr, Scope::Repository(repo), body).await
}

/// A repository's subscriptions (repository admins).
#[utoipa::path(get, path = "/api/v1/repositories/{namespace}/{name}/webhooks", tag = "webhooks",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Subscriptions", body = Vec<Subscription>)))]
pub async fn list_repository(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    let repo = format!("{ns}/{name}");
    repository_admin(&state, who, &repo).await?;
    let list = state.webhooks.list(&Scope::Repository(repo)).await?;
    Ok(Json(json!({ "webhooks": list })))
}

/// Subscribes a URL to the events of every repository of an organization
/// (its owners and admins). The `secret` is shown this once.
#[utoipa::path(post, path = "/api/v1/organizations/{org}/webhooks", tag = "webhooks",
    params(("org" = String, Path)), request_body = SubscriptionInput,
    responses((status = 201, description = "Created; includes `secret`", body = Subscription),
        (status = 400, description = "Invalid URL, format, event type, glob or regex")))]
pub async fn create_organization(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(org): Path<String>,
    Body(body): Body<SubscriptionInput>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.required()?;
    organization_admin(&state, who, &org).await?;
    create(&state, who, &addr, Scope::Namespace(org), body).await
}

/// An organization's subscriptions (its owners and admins).
#[utoipa::path(get, path = "/api/v1/organizations/{org}/webhooks", tag = "webhooks",
    params(("org" = String, Path)),
    responses((status = 200, description = "Subscriptions", body = Vec<Subscription>)))]
pub async fn list_organization(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(org): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller.required()?;
    organization_admin(&state, who, &org).await?;
    let list = state.webhooks.list(&Scope::Namespace(org)).await?;
    Ok(Json(json!({ "webhooks": list })))
}

/// Subscribes a URL to every event of the registry (superusers). The
/// `secret` is shown this once.
#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", request_body = SubscriptionInput,
    responses((status = 201, description = "Created; includes `secret`", body = Subscription),
        (status = 400, description = "Invalid URL, format, event type, glob or regex")))]
pub async fn create_global(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Body(body): Body<SubscriptionInput>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller.superuser()?;
    create(&state, who, &addr, Scope::Global, body).await
}

/// Global subscriptions (superusers).
#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks",
    responses((status = 200, description = "Subscriptions", body = Vec<Subscription>)))]
pub async fn list_global(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.superuser()?;
    let list = state.webhooks.list(&Scope::Global).await?;
    Ok(Json(json!({ "webhooks": list })))
}

/// A subscription (who manages its scope).
#[utoipa::path(get, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path)),
    responses((status = 200, description = "The subscription", body = Subscription)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Subscription>, ApiError> {
    Ok(Json(managed(&state, &caller, &id).await?))
}

/// Changes a subscription's URL, format, filters or state, or rotates its
/// secret (`rotate_secret: true`; the new one is returned this once).
#[utoipa::path(patch, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path)), request_body = SubscriptionPatch,
    responses((status = 200, description = "Updated", body = Subscription),
        (status = 400, description = "Invalid URL, format, event type, glob or regex")))]
pub async fn update(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
    Body(body): Body<SubscriptionPatch>,
) -> Result<Json<Value>, ApiError> {
    let s = managed(&state, &caller, &id).await?;
    let (s2, secret) = state.webhooks.update(&id, body).await?;
    let detail = if secret.is_some() {
        format!("{id}: secret rotated")
    } else {
        id.clone()
    };
    state
        .identity
        .audit(
            &caller.0,
            "webhook.updated",
            &audit_target(&s.scope()),
            &addr,
            true,
            Some(&detail),
        )
        .await?;
    let mut v = serde_json::to_value(&s2).expect("serializable");
    if let Some(secret) = secret {
        v["secret"] = json!(secret);
    }
    Ok(Json(v))
}

/// Deletes a subscription and its delivery log.
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path)),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let s = managed(&state, &caller, &id).await?;
    state.webhooks.delete(&id).await?;
    state
        .identity
        .audit(
            &caller.0,
            "webhook.deleted",
            &audit_target(&s.scope()),
            &addr,
            true,
            Some(&id),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
pub struct DeliveriesQuery {
    /// Page size (1 to 500, default 50).
    n: Option<i64>,
    /// The `next` of the previous page.
    before: Option<i64>,
    /// Only `pending`, `delivered` or `dead` deliveries.
    state: Option<String>,
}

/// A subscription's deliveries, newest first, without bodies.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path), DeliveriesQuery),
    responses((status = 200, description = "A page of deliveries and the cursor of the next one", body = Vec<Delivery>)))]
pub async fn deliveries(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Json<Value>, ApiError> {
    managed(&state, &caller, &id).await?;
    let n = q.n.unwrap_or(50);
    if !(1..=500).contains(&n) {
        return Err(ApiError::invalid("n must be from 1 to 500"));
    }
    let (list, next) = state
        .webhooks
        .deliveries(&id, q.state.as_deref(), q.before, n)
        .await?;
    Ok(Json(json!({ "deliveries": list, "next": next })))
}

/// One delivery with the body sent and, in `attempt_log`, every attempt
/// (request headers, response status, up to 4 KiB of the response, error).
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries/{delivery}", tag = "webhooks",
    params(("id" = String, Path), ("delivery" = String, Path)),
    responses((status = 200, description = "The delivery and its attempts", body = Delivery)))]
pub async fn delivery(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    managed(&state, &caller, &id).await?;
    let (d, attempts): (Delivery, Vec<Attempt>) = state.webhooks.delivery(&id, &delivery).await?;
    let mut v = serde_json::to_value(&d).expect("serializable");
    v["attempt_log"] = json!(attempts);
    Ok(Json(v))
}

/// Sends a delivery's body again, as a new delivery at the end of the
/// subscription's queue (`redelivery_of` names the original).
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/deliveries/{delivery}/redeliver", tag = "webhooks",
    params(("id" = String, Path), ("delivery" = String, Path)),
    responses((status = 201, description = "The new delivery", body = Delivery)))]
pub async fn redeliver(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Delivery>), ApiError> {
    managed(&state, &caller, &id).await?;
    let d = state.webhooks.redeliver(&id, &delivery).await?;
    Ok((StatusCode::CREATED, Json(d)))
}
