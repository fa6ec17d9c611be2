//! The REST API, `/api/v1`: JSON in and out, one error shape
//! (`{"error": {"code", "message"}}`), authentication by bearer token
//! (a personal or robot token), basic auth, or a session cookie (for the
//! UI; `POST /api/v1/session`). The OpenAPI document is generated from the handlers and served at
//! `/api/v1/openapi.json`.
//!
//! Every route is in the flat list in [`router`]; each handler checks the
//! caller's permission itself, through [`Caller`].

mod accounts;
mod audit;
mod builds;
mod events;
mod executors;
mod rebuilds;
mod repositories;
mod robots;
mod session;
mod tokens;
mod triggers;
mod webhooks;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use dockyard_core::identity::{Identity, IdentityError, Login, Principal, TokenKind, parse_basic};
use serde_json::json;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// State of the API handlers.
pub struct ApiState {
    /// Accounts, repositories' access data, audit.
    pub identity: Identity,
    /// Served over TLS (session cookies are then `Secure`).
    pub tls: bool,
    /// Builds, triggers, executors.
    pub builds: Arc<dockyard_buildmanager::BuildManager>,
    /// Outbound webhook subscriptions and their deliveries.
    pub webhooks: Arc<dockyard_webhooks::Webhooks>,
    /// Public base URL for links shown to users (webhook URLs).
    pub public_url: Option<String>,
}

/// An API error: status, a stable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authentication required",
        )
    }
    fn forbidden() -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "permission denied")
    }
    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message)
    }
    /// A failure that is not the caller's: logged (inside the request span),
    /// answered with a generic 500.
    fn internal(e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "api");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Exists(what) => Self::new(
                StatusCode::CONFLICT,
                "exists",
                format!("{what} already exists"),
            ),
            IdentityError::NotFound(what) => Self::not_found(&what),
            IdentityError::Invalid(what) => Self::invalid(format!("invalid {what}")),
            e => Self::internal(&e),
        }
    }
}

impl From<dockyard_buildmanager::BuildError> for ApiError {
    fn from(e: dockyard_buildmanager::BuildError) -> Self {
        use dockyard_buildmanager::BuildError as B;
        match e {
            B::NotFound(what) => Self::not_found(&what),
            B::Invalid(m) => Self::invalid(m),
            B::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            B::Forbidden => Self::forbidden(),
            B::Unauthenticated => Self::unauthorized(),
            B::TooLarge(m) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", m),
            e => Self::internal(&e),
        }
    }
}

impl From<dockyard_webhooks::WebhookError> for ApiError {
    fn from(e: dockyard_webhooks::WebhookError) -> Self {
        use dockyard_webhooks::WebhookError as W;
        match e {
            W::NotFound(what) => Self::not_found(&what),
            W::Invalid(m) => Self::invalid(m),
            e => Self::internal(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"dockyard\""),
            );
        }
        r
    }
}

/// The authenticated caller of an API request (anonymous when no
/// credentials were sent; invalid credentials are refused).
pub struct Caller(pub Principal);

impl Caller {
    /// The caller, or 401 when anonymous.
    pub fn required(&self) -> Result<&Principal, ApiError> {
        match &self.0 {
            Principal::Anonymous => Err(ApiError::unauthorized()),
            p => Ok(p),
        }
    }

    /// The caller if a superuser; 401 when anonymous, else 403.
    pub fn superuser(&self) -> Result<&Principal, ApiError> {
        match self.required()? {
            p @ Principal::User {
                superuser: true, ..
            } => Ok(p),
            _ => Err(ApiError::forbidden()),
        }
    }
}

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let Some(value) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            // A browser session, else nobody.
            let Some(token) = session::from_cookie(&parts.headers) else {
                return Ok(Caller(Principal::Anonymous));
            };
            return match state.identity.authenticate_token(&token, None).await? {
                Some((p, TokenKind::Personal)) => Ok(Caller(p)),
                _ => Err(ApiError::unauthorized()),
            };
        };
        let address = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_default();
        if let Some(token) = value.strip_prefix("Bearer ") {
            return match state
                .identity
                .authenticate_token(token.trim(), None)
                .await?
            {
                Some((p, TokenKind::Personal | TokenKind::Robot)) => Ok(Caller(p)),
                _ => Err(ApiError::unauthorized()),
            };
        }
        let (user, secret) = parse_basic(value).ok_or_else(ApiError::unauthorized)?;
        match state
            .identity
            .login_limited(&user, &secret, &address, "api basic")
            .await?
        {
            Login::Ok(p) => Ok(Caller(p)),
            Login::Failed => Err(ApiError::unauthorized()),
            Login::Limited(wait) => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "too many failed logins; retry in {} s",
                    wait.as_secs().max(1)
                ),
            )),
        }
    }
}

/// The client address, for the audit log.
pub struct ClientAddress(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default(),
        ))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Dockyard API", version = "1", description = "Repositories, robots, tokens, audit, builds and executors of a Dockyard registry."),
    tags((name = "accounts"), (name = "repositories"), (name = "robots"), (name = "tokens"), (name = "audit"), (name = "events"), (name = "builds"), (name = "executors"), (name = "webhooks"))
)]
struct ApiDoc;

/// Every `/api/v1` route, and the OpenAPI document built from them.
pub fn router(state: Arc<ApiState>) -> Router {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(session::login, session::logout))
        .routes(routes!(accounts::me))
        .routes(routes!(accounts::create_user, accounts::list_users))
        .routes(routes!(accounts::create_org))
        .routes(routes!(accounts::set_member))
        .routes(routes!(accounts::create_team))
        .routes(routes!(accounts::add_team_member))
        .routes(routes!(repositories::list, repositories::create))
        .routes(routes!(
            repositories::get,
            repositories::update,
            repositories::delete
        ))
        .routes(routes!(repositories::grant, repositories::revoke))
        .routes(routes!(robots::update_namespace))
        .routes(routes!(robots::create, robots::list))
        .routes(routes!(robots::delete))
        .routes(routes!(robots::create_token))
        .routes(routes!(tokens::create, tokens::list))
        .routes(routes!(tokens::revoke))
        .routes(routes!(audit::list))
        .routes(routes!(events::list))
        .routes(routes!(events::repository))
        .routes(routes!(builds::list))
        .routes(routes!(builds::upload))
        .routes(routes!(builds::get))
        .routes(routes!(builds::cancel))
        .routes(routes!(builds::logs))
        .routes(routes!(builds::list_definitions, builds::create_definition))
        .routes(routes!(
            builds::get_definition,
            rebuilds::update_definition,
            builds::delete_definition
        ))
        .routes(routes!(builds::run_definition))
        .routes(routes!(rebuilds::list))
        .routes(routes!(triggers::create, triggers::list))
        .routes(routes!(triggers::delete))
        .routes(routes!(triggers::deliveries))
        .routes(routes!(triggers::webhook))
        .routes(routes!(
            webhooks::create_repository,
            webhooks::list_repository
        ))
        .routes(routes!(
            webhooks::create_organization,
            webhooks::list_organization
        ))
        .routes(routes!(webhooks::create_global, webhooks::list_global))
        .routes(routes!(webhooks::get, webhooks::update, webhooks::delete))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(webhooks::delivery))
        .routes(routes!(webhooks::redeliver))
        .routes(routes!(executors::create_token, executors::list_tokens))
        .routes(routes!(executors::revoke_token))
        .routes(routes!(executors::list_executors))
        .routes(routes!(executors::register))
        .routes(routes!(executors::poll))
        .routes(routes!(executors::heartbeat))
        .routes(routes!(executors::job_log))
        .routes(routes!(executors::job_token))
        .routes(routes!(executors::job_context))
        .routes(routes!(executors::job_result))
        .with_state(state)
        .split_for_parts();
    let doc = Arc::new(doc);
    router.route(
        "/api/v1/openapi.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { Json(doc.as_ref().clone()) }
        }),
    )
}
