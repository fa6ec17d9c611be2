//! Access control for `/v2`: every request needs credentials that allow the
//! action its route needs, else it gets the spec's 401 with a Bearer
//! challenge naming Dockyard's token service (or 403/401 DENIED when the
//! credentials are valid but not enough).
//!
//! Accepted credentials:
//! - `Authorization: Bearer <jwt>` from the token service: signature, issuer,
//!   audience and expiry verified once, then cached until it expires; the
//!   `access` claim must list the action (or `*`) for the repository;
//! - `Authorization: Basic` with a password, robot token or personal token
//!   (convenient for scripts): checked against the identity store (password
//!   logins cached for a minute, tokens checked every time so revocation is
//!   immediate), and the action checked against the caller's current role.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use dockyard_core::identity::{Identity, Login, Principal, parse_basic};
use dockyard_core::token::{Claims, TokenKeys};
use dockyard_oci::{ErrorCode, RepoName};
use sha2::Digest as _;

use crate::error::{RegistryError, Result};

/// How long verified basic credentials are trusted without a new check.
const BASIC_TTL: Duration = Duration::from_secs(60);
/// Entries kept in each cache before it is emptied.
const CACHE_LIMIT: usize = 10_000;

/// Who is calling, as far as the registry can tell.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A verified token.
    Token(Arc<Claims>),
    /// Basic credentials.
    Principal(Principal),
}

impl Caller {
    /// The name events and the audit log record; `None` for anonymous.
    pub fn name(&self) -> Option<&str> {
        let n = match self {
            Caller::Token(c) => c.sub.as_str(),
            Caller::Principal(p) => p.name(),
        };
        (!n.is_empty()).then_some(n)
    }
}

/// The `/v2` access check.
pub struct Gate {
    /// Verifies tokens.
    keys: Arc<TokenKeys>,
    /// Accounts and roles, for basic auth and the catalog.
    pub identity: Identity,
    issuer: String,
    service: String,
    realm: Option<String>,
    tls: bool,
    tokens: Mutex<HashMap<String, Arc<Claims>>>,
    basic: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
}

impl Gate {
    pub fn new(keys: Arc<TokenKeys>, identity: Identity, config: &dockyard_core::Config) -> Gate {
        Gate {
            keys,
            identity,
            issuer: config.auth.issuer.clone(),
            service: config.auth.service.clone(),
            realm: config.auth.realm.clone(),
            tls: config.tls.cert.is_some(),
            tokens: Mutex::new(HashMap::new()),
            basic: Mutex::new(HashMap::new()),
        }
    }

    fn internal(e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Internal(format!("access control: {e}"))
    }

    /// The caller behind the request's credentials; `None` without any.
    /// Invalid credentials are an error (401).
    pub async fn caller(&self, headers: &HeaderMap, address: &str) -> Result<Option<Caller>> {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Ok(None);
        };
        if let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        {
            let token = token.trim();
            let now = dockyard_core::now_millis() / 1000;
            if let Some(c) = self.tokens.lock().expect("token cache").get(token)
                && c.exp > now
            {
                return Ok(Some(Caller::Token(c.clone())));
            }
            let claims = self
                .keys
                .verify(token, &self.issuer, &self.service)
                .map_err(|e| {
                    self.unauthorized(headers, None, Some("invalid_token"), &e.to_string())
                })?;
            let claims = Arc::new(claims);
            let mut cache = self.tokens.lock().expect("token cache");
            if cache.len() >= CACHE_LIMIT {
                cache.retain(|_, c| c.exp > now);
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
            }
            cache.insert(token.to_string(), claims.clone());
            return Ok(Some(Caller::Token(claims)));
        }
        let Some((user, secret)) = parse_basic(value) else {
            return Err(self.unauthorized(headers, None, None, "unsupported Authorization header"));
        };
        // Passwords are cached briefly (argon2 is slow on purpose); tokens
        // are cheap to check and must stop working the moment they are
        // revoked, so they are checked every time.
        let is_token = dockyard_core::identity::looks_like_token(&secret);
        let key: [u8; 32] = sha2::Sha256::digest(value.as_bytes()).into();
        if !is_token
            && let Some((p, at)) = self.basic.lock().expect("basic cache").get(&key)
            && at.elapsed() < BASIC_TTL
        {
            return Ok(Some(Caller::Principal(p.clone())));
        }
        let principal = match self
            .identity
            .login_limited(&user, &secret, address, "registry basic")
            .await
            .map_err(Self::internal)?
        {
            Login::Ok(p) => p,
            Login::Failed => {
                return Err(self.unauthorized(headers, None, None, "invalid username or password"));
            }
            Login::Limited(wait) => {
                return Err(RegistryError::with_message(
                    ErrorCode::TooManyRequests,
                    "too many failed logins; retry later",
                )
                .header(
                    header::RETRY_AFTER,
                    HeaderValue::from(wait.as_secs().max(1)),
                ));
            }
        };
        if !is_token {
            let mut cache = self.basic.lock().expect("basic cache");
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, (principal.clone(), Instant::now()));
        }
        Ok(Some(Caller::Principal(principal)))
    }

    /// Whether `caller` may do `action` (`pull`, `push`, `delete`) on `repo`.
    pub async fn allows(&self, caller: &Caller, repo: &RepoName, action: &str) -> Result<bool> {
        match caller {
            Caller::Token(c) => Ok(c.access.iter().any(|a| {
                a.kind == "repository"
                    && a.name == repo.as_str()
                    && a.actions.iter().any(|x| x == action || x == "*")
            })),
            Caller::Principal(p) => Ok(self
                .identity
                .repository_role(p, repo.as_str())
                .await
                .map_err(Self::internal)?
                .is_some_and(|r| r.actions().contains(&action))),
        }
    }

    /// The principal a caller stands for (the token's subject).
    pub async fn principal(&self, caller: &Caller) -> Result<Option<Principal>> {
        match caller {
            Caller::Principal(p) => Ok(Some(p.clone())),
            Caller::Token(c) => self
                .identity
                .principal_by_name(&c.sub)
                .await
                .map_err(Self::internal),
        }
    }

    /// Records a successful push or delete in the audit log. A failure to
    /// record is logged, not returned: the change already happened.
    pub async fn audit(&self, caller: &Caller, action: &str, target: &str, address: &str) {
        let who = match caller {
            Caller::Principal(p) => p.clone(),
            Caller::Token(c) => match self.identity.principal_by_name(&c.sub).await {
                Ok(Some(p)) => p,
                _ => Principal::Anonymous,
            },
        };
        if let Err(e) = self
            .identity
            .audit(&who, action, target, address, true, None)
            .await
        {
            tracing::error!(error = %e, action, target, "could not write the audit log");
        }
    }

    /// `WWW-Authenticate: Bearer realm=…,service=…[,scope=…][,error=…]`.
    fn challenge(
        &self,
        headers: &HeaderMap,
        scope: Option<&str>,
        error: Option<&str>,
    ) -> HeaderValue {
        let realm = self.realm.clone().unwrap_or_else(|| {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| {
                    h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                })
                .unwrap_or("localhost");
            format!("{}://{host}", if self.tls { "https" } else { "http" })
        });
        let realm = realm.trim_end_matches('/');
        let mut v = format!(
            "Bearer realm=\"{realm}/v2/auth\",service=\"{}\"",
            self.service
        );
        if let Some(s) = scope {
            v.push_str(&format!(",scope=\"{s}\""));
        }
        if let Some(e) = error {
            v.push_str(&format!(",error=\"{e}\""));
        }
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }

    /// 401 UNAUTHORIZED with a challenge.
    pub fn unauthorized(
        &self,
        headers: &HeaderMap,
        scope: Option<&str>,
        error: Option<&str>,
        message: &str,
    ) -> RegistryError {
        RegistryError::with_message(ErrorCode::Unauthorized, message).header(
            header::WWW_AUTHENTICATE,
            self.challenge(headers, scope, error),
        )
    }

    /// The answer for valid credentials that lack the action: a token gets
    /// 401 with `error="insufficient_scope"` (clients then ask for a new
    /// token, and report DENIED if it is no better); basic credentials 403.
    pub fn denied(&self, headers: &HeaderMap, caller: &Caller, scope: &str) -> RegistryError {
        let e = RegistryError::spec(ErrorCode::Denied);
        match caller {
            Caller::Token(_) => e.status(StatusCode::UNAUTHORIZED).header(
                header::WWW_AUTHENTICATE,
                self.challenge(headers, Some(scope), Some("insufficient_scope")),
            ),
            Caller::Principal(Principal::Anonymous) => e.status(StatusCode::UNAUTHORIZED),
            Caller::Principal(_) => e,
        }
    }
}
