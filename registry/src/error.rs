//! The registry's one error type and its mapping to the Distribution spec's
//! error JSON (`{"errors":[{"code","message","detail"}]}`), in one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dockyard_oci::ErrorCode;
use serde_json::{Value, json};

/// An error answered to a registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A spec error: code, message and optional detail.
    #[error("{code:?}: {message}")]
    Spec {
        code: ErrorCode,
        message: String,
        detail: Option<Value>,
        /// Overrides the code's usual status (e.g. 413 for an oversized body).
        status: Option<StatusCode>,
        /// Extra headers, e.g. `Range` on a 416.
        headers: Vec<(header::HeaderName, HeaderValue)>,
    },
    /// No such endpoint.
    #[error("not found")]
    NotFound,
    /// Something failed on our side; logged, answered with 500.
    #[error("internal error: {0}")]
    Internal(String),
    /// Storage or database unavailable; answered with 503.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl RegistryError {
    pub fn spec(code: ErrorCode) -> Self {
        RegistryError::Spec {
            code,
            message: code.message().to_string(),
            detail: None,
            status: None,
            headers: vec![],
        }
    }

    /// A spec error with a more specific message.
    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> Self {
        RegistryError::Spec {
            code,
            message: message.into(),
            detail: None,
            status: None,
            headers: vec![],
        }
    }

    pub fn detail(mut self, d: Value) -> Self {
        if let RegistryError::Spec { detail, .. } = &mut self {
            *detail = Some(d);
        }
        self
    }

    pub fn status(mut self, s: StatusCode) -> Self {
        if let RegistryError::Spec { status, .. } = &mut self {
            *status = Some(s);
        }
        self
    }

    pub fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        if let RegistryError::Spec { headers, .. } = &mut self {
            headers.push((name, value));
        }
        self
    }

    /// The spec code, for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::Spec { code, .. } => code.as_str(),
            RegistryError::NotFound => "NOT_FOUND",
            RegistryError::Internal(_) => "INTERNAL",
            RegistryError::Unavailable(_) => "UNAVAILABLE",
        }
    }
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                RegistryError::Unavailable(format!("database: {e}"))
            }
            e => RegistryError::Internal(format!("database: {e}")),
        }
    }
}

impl From<object_store::Error> for RegistryError {
    fn from(e: object_store::Error) -> Self {
        RegistryError::Internal(format!("storage: {e}"))
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        RegistryError::Internal(format!("io: {e}"))
    }
}

fn body(code: &str, message: &str, detail: Option<Value>) -> String {
    let mut e = json!({ "code": code, "message": message });
    if let Some(d) = detail {
        e["detail"] = d;
    }
    json!({ "errors": [e] }).to_string()
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, text, headers) = match self {
            RegistryError::Spec {
                code,
                message,
                detail,
                status,
                headers,
            } => {
                let status = status.unwrap_or_else(|| {
                    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST)
                });
                (status, body(code.as_str(), &message, detail), headers)
            }
            RegistryError::NotFound => (
                StatusCode::NOT_FOUND,
                body("NOT_FOUND", "no such endpoint", None),
                vec![],
            ),
            RegistryError::Internal(cause) => {
                // Logged once here, inside the request's span (which carries the
                // request id); the client gets the id, not the cause.
                tracing::error!(%cause, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    body(
                        "UNKNOWN",
                        "internal error; see the server log for this request id",
                        None,
                    ),
                    vec![],
                )
            }
            RegistryError::Unavailable(cause) => {
                tracing::warn!(%cause, "service unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    body(
                        "UNAVAILABLE",
                        "a backing service is unavailable; retry later",
                        None,
                    ),
                    vec![],
                )
            }
        };
        let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], text).into_response();
        for (k, v) in headers {
            resp.headers_mut().append(k, v);
        }
        resp
    }
}
