//! Browser sessions: a login sets an HttpOnly, SameSite=Strict cookie that
//! holds a short-lived personal token (named `session`), so the UI can call
//! the API without handling secrets in script. Logging out revokes it.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dockyard_core::identity::{Login, Principal, TokenKind};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use super::{ApiError, ApiState, ClientAddress};

/// The session cookie's name.
pub const COOKIE: &str = "dockyard_session";
/// How long a session lasts.
const SESSION_SECS: i64 = 12 * 3600;

#[derive(Deserialize, ToSchema)]
pub struct Credentials {
    username: String,
    password: String,
}

/// The session token in a `Cookie` header, if any.
pub fn from_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn cookie(state: &ApiState, value: &str, max_age: i64) -> String {
    let secure = if state.tls { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

/// Logs in with a password and sets the session cookie.
#[utoipa::path(post, path = "/api/v1/session", tag = "accounts", request_body = Credentials,
    responses((status = 201, description = "Signed in; the cookie is set"), (status = 401, description = "Wrong credentials")))]
pub async fn login(
    State(state): State<Arc<ApiState>>,
    ClientAddress(addr): ClientAddress,
    Json(body): Json<Credentials>,
) -> Result<Response, ApiError> {
    let who = match state
        .identity
        .login_limited(&body.username, &body.password, &addr, "session")
        .await?
    {
        Login::Ok(p @ Principal::User { .. }) => p,
        Login::Limited(wait) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "too many failed logins; retry in {} s",
                    wait.as_secs().max(1)
                ),
            ));
        }
        _ => return Err(ApiError::unauthorized()),
    };
    let Principal::User { id, .. } = &who else {
        return Err(ApiError::unauthorized());
    };
    let expires = dockyard_core::now_millis() + SESSION_SECS * 1000;
    let (_, token) = state
        .identity
        .create_token(
            TokenKind::Personal,
            Some(*id),
            None,
            "session",
            Some(expires),
        )
        .await?;
    state
        .identity
        .audit(&who, "login", who.name(), &addr, true, Some("session"))
        .await?;
    Ok((
        StatusCode::CREATED,
        [(header::SET_COOKIE, cookie(&state, &token, SESSION_SECS))],
        Json(json!({ "name": who.name() })),
    )
        .into_response())
}

/// Logs out: revokes the session's token and clears the cookie.
#[utoipa::path(delete, path = "/api/v1/session", tag = "accounts",
    responses((status = 204, description = "Signed out")))]
pub async fn logout(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Only a cookie that authenticates may revoke: token ids are not secret.
    if let Some(token) = from_cookie(&headers)
        && state
            .identity
            .authenticate_token(&token, None)
            .await?
            .is_some()
        && let Some(id) = token.split('_').nth(1)
    {
        state.identity.revoke_token(id).await?;
    }
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, cookie(&state, "", 0))],
    )
        .into_response())
}
