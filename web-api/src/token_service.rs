//! The Docker token service (`/v2/auth`): authenticates a caller (password,
//! robot token, personal token, refresh token, or nobody) and issues a
//! short-lived JWT whose `access` claim lists only the actions the caller's
//! permissions grant on the requested scopes.
//!
//! `GET /v2/auth?service=&scope=…&account=` with optional basic auth (the
//! Docker token specification), and `POST /v2/auth` with an
//! `application/x-www-form-urlencoded` body (the OAuth2 flavour: `grant_type`
//! `password` or `refresh_token`, `access_type=offline` for a refresh token).
//!
//! Tokens are issued for the registry's own service and for the configured
//! Notary service; for the latter, repository names carry the registry host
//! (`registry.example.com:5000/library/app`), which is stripped before the
//! permission lookup and kept in the claim.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dockyard_core::config::Config;
use dockyard_core::identity::{Identity, Login, Principal, Role, TokenKind};
use dockyard_core::token::{Access, Claims, TokenKeys};
use serde_json::json;

/// State of the token service.
pub struct TokenService {
    /// Accounts and permissions.
    pub identity: Identity,
    /// Signing keys.
    pub keys: Arc<TokenKeys>,
    /// `iss` of issued tokens.
    pub issuer: String,
    /// The registry's service name.
    pub service: String,
    /// The Notary service name.
    pub notary_service: String,
    /// Token lifetime in seconds.
    pub ttl: i64,
}

impl TokenService {
    pub fn new(config: &Config, identity: Identity, keys: Arc<TokenKeys>) -> TokenService {
        TokenService {
            identity,
            keys,
            issuer: config.auth.issuer.clone(),
            service: config.auth.service.clone(),
            notary_service: config.notary.service.clone(),
            ttl: config.auth.token_ttl.as_secs() as i64,
        }
    }
}

/// An error of the token service, answered in the registry's error shape.
#[derive(Debug)]
pub struct TokenError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds, for 429.
    retry_after: Option<u64>,
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            json!({ "errors": [{ "code": self.code, "message": self.message }] }).to_string(),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        r
    }
}

fn error(status: StatusCode, code: &'static str, message: &str) -> TokenError {
    TokenError {
        status,
        code,
        message: message.to_string(),
        retry_after: None,
    }
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// `type:name:actions`, where the name may itself contain `:` (a registry
/// host with a port).
fn parse_scope(s: &str) -> Option<(String, String, Vec<String>)> {
    let (kind, rest) = s.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if name.is_empty() {
        return None;
    }
    Some((
        kind.to_string(),
        name.to_string(),
        actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// Credentials from `Authorization: Basic`.
fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    dockyard_core::identity::parse_basic(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// Authenticates under the failed-login limits; answers 401 or 429 itself.
async fn authenticate(
    ts: &TokenService,
    username: &str,
    secret: &str,
    address: &str,
    via: &str,
) -> Result<Principal, TokenError> {
    match ts
        .identity
        .login_limited(username, secret, address, via)
        .await
    {
        Ok(Login::Ok(p)) => Ok(p),
        Ok(Login::Failed) => Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "invalid username or password",
        )),
        Ok(Login::Limited(wait)) => Err(TokenError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "TOOMANYREQUESTS",
            message: "too many failed logins; retry later".into(),
            retry_after: Some(wait.as_secs().max(1)),
        }),
        Err(e) => {
            tracing::error!(error = %e, "token service");
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error",
            ))
        }
    }
}

/// The repository a scope name addresses for `service`: the Notary service
/// names images with the registry host in front.
fn repository_for(ts: &TokenService, service: &str, name: &str) -> String {
    if service == ts.notary_service
        && let Some((first, rest)) = name.split_once('/')
        && (first.contains('.') || first.contains(':') || first == "localhost")
    {
        return rest.to_string();
    }
    name.to_string()
}

async fn grant(
    ts: &TokenService,
    who: &Principal,
    service: &str,
    scopes: &[String],
) -> Result<Vec<Access>, TokenError> {
    let mut access = Vec::new();
    for s in scopes
        .iter()
        .flat_map(|s| s.split(' '))
        .filter(|s| !s.is_empty())
    {
        let Some((kind, name, wanted)) = parse_scope(s) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                &format!("invalid scope {s:?}"),
            ));
        };
        let granted: Vec<String> = match kind.as_str() {
            "repository" => {
                let repo = repository_for(ts, service, &name);
                let role = ts.identity.repository_role(who, &repo).await.map_err(|e| {
                    tracing::error!(error = %e, "permission lookup");
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "UNKNOWN",
                        "internal error",
                    )
                })?;
                let allowed: &[&str] = role.map(Role::actions).unwrap_or(&[]);
                wanted
                    .into_iter()
                    .filter(|a| allowed.contains(&a.as_str()))
                    .collect()
            }
            // The catalog is filtered per caller, so any signed-in caller may list it.
            "registry" if name == "catalog" && *who != Principal::Anonymous => {
                wanted.into_iter().filter(|a| a == "*").collect()
            }
            _ => vec![],
        };
        if !granted.is_empty() {
            access.push(Access {
                kind,
                name,
                actions: granted,
            });
        }
    }
    Ok(access)
}

fn issue(
    ts: &TokenService,
    who: &Principal,
    service: &str,
    access: Vec<Access>,
) -> Result<(String, i64), TokenError> {
    let now = dockyard_core::now_millis() / 1000;
    let claims = Claims {
        iss: ts.issuer.clone(),
        sub: who.name().to_string(),
        aud: service.to_string(),
        exp: now + ts.ttl,
        nbf: now - 1,
        iat: now,
        jti: uuid::Uuid::new_v4().to_string(),
        access,
    };
    let token = ts.keys.sign(&claims).map_err(|e| {
        tracing::error!(error = %e, "token signing");
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            "internal error",
        )
    })?;
    Ok((token, now))
}

/// The caller's address for the audit log (the TCP peer; a proxy's
/// forwarded-for headers are not trusted).
fn client_address(peer: Option<std::net::SocketAddr>) -> String {
    peer.map(|p| p.ip().to_string()).unwrap_or_default()
}

/// `GET`/`POST /v2/auth`.
pub async fn token_endpoint(State(ts): State<Arc<TokenService>>, req: Request) -> Response {
    handle(&ts, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn handle(ts: &TokenService, req: Request) -> Result<Response, TokenError> {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let method = req.method().clone();
    let headers = req.headers().clone();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let form: Vec<(String, String)> = if method == Method::POST {
        match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
            Ok(b) => serde_urlencoded::from_bytes::<Vec<(String, String)>>(&b).unwrap_or_default(),
            Err(_) => {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "UNSUPPORTED",
                    "request body too large",
                ));
            }
        }
    } else {
        vec![]
    };
    let params = if method == Method::POST {
        &form
    } else {
        &query
    };
    let address = client_address(peer);
    let service = param(params, "service").unwrap_or(&ts.service).to_string();
    if service != ts.service && service != ts.notary_service {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            &format!("unknown service {service:?}"),
        ));
    }
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();

    let mut refresh = None;
    let who = if method == Method::POST {
        match param(params, "grant_type") {
            Some("password") => {
                let (Some(u), Some(p)) = (param(params, "username"), param(params, "password"))
                else {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "UNSUPPORTED",
                        "username and password are required",
                    ));
                };
                authenticate(ts, u, p, &address, "password grant").await?
            }
            Some("refresh_token") => {
                let Some(t) = param(params, "refresh_token") else {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "UNSUPPORTED",
                        "refresh_token is required",
                    ));
                };
                match ts.identity.authenticate_token(t, None).await {
                    Ok(Some((p, TokenKind::Refresh))) => {
                        refresh = Some(t.to_string());
                        p
                    }
                    Ok(_) => {
                        return Err(error(
                            StatusCode::UNAUTHORIZED,
                            "UNAUTHORIZED",
                            "invalid refresh token",
                        ));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "refresh token");
                        return Err(error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "UNKNOWN",
                            "internal error",
                        ));
                    }
                }
            }
            _ => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "UNSUPPORTED",
                    "grant_type must be password or refresh_token",
                ));
            }
        }
    } else {
        match basic(&headers) {
            Some((u, p)) => authenticate(ts, &u, &p, &address, "token service basic").await?,
            None if headers.contains_key(header::AUTHORIZATION) => {
                return Err(error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "unsupported Authorization header",
                ));
            }
            None => Principal::Anonymous,
        }
    };
    if method == Method::POST
        && refresh.is_none()
        && param(params, "access_type") == Some("offline")
        && let Principal::User { id, .. } = &who
    {
        match ts
            .identity
            .create_token(TokenKind::Refresh, Some(*id), None, "refresh", None)
            .await
        {
            Ok((_, t)) => refresh = Some(t),
            Err(e) => {
                tracing::error!(error = %e, "refresh token");
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "internal error",
                ));
            }
        }
    }
    let access = match grant(ts, &who, &service, &scopes).await {
        Ok(a) => a,
        Err(r) => return Err(r),
    };
    let granted: Vec<String> = access
        .iter()
        .map(|a| format!("{}:{}:{}", a.kind, a.name, a.actions.join(",")))
        .collect();
    let (token, now) = match issue(ts, &who, &service, access) {
        Ok(t) => t,
        Err(r) => return Err(r),
    };
    if who != Principal::Anonymous {
        let _ = ts
            .identity
            .audit(
                &who,
                "token.issued",
                &granted.join(" "),
                &address,
                true,
                Some(&service),
            )
            .await;
    }
    let issued_at = time::OffsetDateTime::from_unix_timestamp(now)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let mut body = json!({
        "token": token,
        "access_token": token,
        "expires_in": ts.ttl,
        "issued_at": issued_at,
        "scope": granted.join(" "),
    });
    if let Some(r) = refresh {
        body["refresh_token"] = json!(r);
    }
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(
            parse_scope("repository:a/b:pull,push"),
            Some((
                "repository".into(),
                "a/b".into(),
                vec!["pull".into(), "push".into()]
            ))
        );
        assert_eq!(
            parse_scope("repository:reg.example:5000/a/b:pull"),
            Some((
                "repository".into(),
                "reg.example:5000/a/b".into(),
                vec!["pull".into()]
            ))
        );
        assert_eq!(
            parse_scope("registry:catalog:*").unwrap().2,
            vec!["*".to_string()]
        );
        assert_eq!(parse_scope("nonsense"), None);
        assert_eq!(parse_scope("repository::pull"), None);
    }
}
