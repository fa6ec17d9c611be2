//! The HTTP client of the executor protocol (see [`dockyard_oci::build`]):
//! one method per call, the node token on every request, the executor id
//! header on per-job calls, and the manager's answers mapped to
//! [`ClientError`]s the agent can act on (409 = lease lost, 401/404 on
//! executor calls = unknown executor).
//!
//! It knows nothing of jobs' contents or of engines; it never logs or
//! formats the node token.

use std::time::Duration;

use dockyard_oci::build::{
    EXECUTOR_HEADER, Heartbeat, HeartbeatResponse, JobAssignment, JobLog, JobResult, PollRequest,
    RegisterRequest, RegisterResponse, TokenRequest, TokenResponse,
};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

use crate::engine::Secret;

/// How a call to the manager failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No answer (connection refused, timeout, broken stream).
    #[error("cannot reach the manager: {0}")]
    Unreachable(String),
    /// 401/403: the node token was refused, or the manager does not know
    /// this executor any more.
    #[error("the manager refused the call ({status}): {body}")]
    Unauthorized { status: u16, body: String },
    /// 404: the executor (or job) is unknown.
    #[error("the manager does not know this executor or job: {0}")]
    NotFound(String),
    /// 409: the job is leased to someone else (or over).
    #[error("the job's lease was lost: {0}")]
    LeaseLost(String),
    /// Any other status.
    #[error("the manager answered {status}: {body}")]
    Status { status: u16, body: String },
    /// An answer that is not what the protocol says.
    #[error("unexpected answer from the manager: {0}")]
    Decode(String),
    /// A job assignment that could not be read; `job_id` when it was found.
    #[error("unreadable job {job_id:?}: {message}")]
    BadJob {
        job_id: Option<String>,
        message: String,
    },
    /// The manager URL is wrong.
    #[error("invalid manager URL: {0}")]
    BadUrl(String),
}

impl ClientError {
    /// Whether retrying the same call later may work.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// A client of the executor protocol.
#[derive(Clone)]
pub struct ManagerClient {
    http: reqwest::Client,
    base: Url,
    token: Secret,
}

impl std::fmt::Debug for ManagerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerClient")
            .field("base", &self.base.as_str())
            .finish()
    }
}

/// Calls that are not long polls or downloads answer within this.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn default_http() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!("dockyard-executor/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

impl ManagerClient {
    /// A client of the manager at `base` (`https://dockyard.example.com`,
    /// with or without a path prefix) authenticating with the node `token`.
    pub fn new(base: &str, token: &str) -> Result<Self, ClientError> {
        Self::with_http(default_http(), base, token)
    }

    /// The same, with a caller-built HTTP client (custom roots, proxies).
    pub fn with_http(http: reqwest::Client, base: &str, token: &str) -> Result<Self, ClientError> {
        let mut base = Url::parse(base.trim()).map_err(|e| ClientError::BadUrl(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::BadUrl(format!("{base} is not an http(s) URL")));
        }
        base.set_query(None);
        base.set_fragment(None);
        Ok(ManagerClient {
            http,
            base,
            token: Secret::new(token),
        })
    }

    /// The manager's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut s) = u.path_segments_mut() {
            s.pop_if_empty();
            s.extend(["api", "v1", "executor"]);
            s.extend(segments);
        }
        u
    }

    fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .bearer_auth(self.token.expose())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(500)
            .collect();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ClientError::Unauthorized {
                status: status.as_u16(),
                body,
            },
            StatusCode::NOT_FOUND => ClientError::NotFound(body),
            StatusCode::CONFLICT => ClientError::LeaseLost(body),
            _ => ClientError::Status {
                status: status.as_u16(),
                body,
            },
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        url: Url,
        executor: Option<&str>,
        body: &B,
    ) -> Result<T, ClientError> {
        let mut req = self
            .request(reqwest::Method::POST, url)
            .timeout(CALL_TIMEOUT)
            .json(body);
        if let Some(e) = executor {
            req = req.header(EXECUTOR_HEADER, e);
        }
        let resp = self.send(req).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable(e.without_url().to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `POST /register`.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.call(self.url(&["register"]), None, req).await
    }

    /// `POST /poll`: a job, or `None` when none came within `wait_seconds`.
    pub async fn poll(&self, req: &PollRequest) -> Result<Option<JobAssignment>, ClientError> {
        let req_b = self
            .request(reqwest::Method::POST, self.url(&["poll"]))
            .timeout(Duration::from_secs(req.wait_seconds + 15))
            .json(req);
        let resp = self.send(req_b).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable(e.without_url().to_string()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        match serde_json::from_slice::<JobAssignment>(&bytes) {
            Ok(job) => Ok(Some(job)),
            Err(e) => {
                let job_id = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("job_id")?.as_str().map(str::to_string));
                Err(ClientError::BadJob {
                    job_id,
                    message: e.to_string(),
                })
            }
        }
    }

    /// `POST /heartbeat`.
    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatResponse, ClientError> {
        self.call(self.url(&["heartbeat"]), None, hb).await
    }

    /// `POST /jobs/{job}/log`.
    pub async fn log(
        &self,
        executor_id: &str,
        job_id: &str,
        log: &JobLog,
    ) -> Result<HeartbeatResponse, ClientError> {
        let url = self.url(&["jobs", job_id, "log"]);
        // An empty or non-JSON 2xx answer means "nothing to cancel".
        let mut req = self
            .request(reqwest::Method::POST, url)
            .timeout(CALL_TIMEOUT)
            .json(log);
        req = req.header(EXECUTOR_HEADER, executor_id);
        let resp = self.send(req).await?;
        let bytes = resp.bytes().await.unwrap_or_default();
        Ok(serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// `POST /jobs/{job}/token`.
    pub async fn token(
        &self,
        executor_id: &str,
        job_id: &str,
        req: &TokenRequest,
    ) -> Result<TokenResponse, ClientError> {
        self.call(self.url(&["jobs", job_id, "token"]), Some(executor_id), req)
            .await
    }

    /// `GET /jobs/{job}/context`: the response, to stream.
    pub async fn context(
        &self,
        executor_id: &str,
        job_id: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let req = self
            .request(reqwest::Method::GET, self.url(&["jobs", job_id, "context"]))
            .header(EXECUTOR_HEADER, executor_id);
        self.send(req).await
    }

    /// `POST /jobs/{job}/result`.
    pub async fn result(
        &self,
        executor_id: &str,
        job_id: &str,
        result: &JobResult,
    ) -> Result<(), ClientError> {
        let req = self
            .request(reqwest::Method::POST, self.url(&["jobs", job_id, "result"]))
            .timeout(CALL_TIMEOUT)
            .header(EXECUTOR_HEADER, executor_id)
            .json(result);
        self.send(req).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = ManagerClient::new("https://dy.example.com", "dyn_x").unwrap();
        assert_eq!(
            c.url(&["poll"]).as_str(),
            "https://dy.example.com/api/v1/executor/poll"
        );
        let c = ManagerClient::new("http://h:8080/prefix/", "dyn_x").unwrap();
        assert_eq!(
            c.url(&["jobs", "a/b c", "log"]).as_str(),
            "http://h:8080/prefix/api/v1/executor/jobs/a%2Fb%20c/log"
        );
        assert!(ManagerClient::new("ftp://h", "t").is_err());
        assert!(ManagerClient::new("not a url", "t").is_err());
        assert!(!format!("{c:?}").contains("dyn_x"));
    }
}
