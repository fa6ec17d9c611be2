//! The manager's side of the executor protocol: node tokens, executor
//! registration, leasing jobs (long poll), heartbeats, progress, job
//! tokens, results, and the sweep that expires leases and times builds out.

use std::time::{Duration, Instant};

use dockyard_core::now_millis;
use dockyard_core::token::{Access, Claims};
use dockyard_oci::build::Platform;
use dockyard_oci::build::{
    HeartbeatResponse, JobAssignment, JobLog, JobResult, JobSource, Phase, RegisterRequest,
    RegisterResponse, TokenResponse,
};
use serde::Serialize;
use sqlx::Row;

use crate::builds::push_tag;
use crate::{BuildError, BuildManager, Result, new_id};

/// Prefix of node tokens: `dyn_<id>_<secret>`.
pub const NODE_TOKEN_PREFIX: &str = "dyn";

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeTokenInfo {
    pub id: String,
    pub name: String,
    pub created_by: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExecutorInfo {
    pub id: String,
    pub name: String,
    pub token_id: String,
    pub platforms: Vec<String>,
    pub capacity: i64,
    pub engine: String,
    pub version: String,
    pub registered_at: i64,
    pub last_seen: i64,
    /// Seen within two lease periods.
    pub online: bool,
    /// Jobs it holds now.
    pub running_jobs: i64,
}

/// An authenticated executor call: the node token, and for per-job calls
/// the executor it claims to be.
#[derive(Debug, Clone)]
pub struct NodeAuth {
    pub token_id: String,
}

const ACTIVE_PHASES: &str = "('fetching_source', 'pulling_base', 'building', 'pushing')";

impl BuildManager {
    // ---- node tokens ----

    /// Creates a node token; the token string is shown once.
    pub async fn create_node_token(&self, name: &str, by: &str) -> Result<(NodeTokenInfo, String)> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(BuildError::Invalid(format!("invalid token name {name:?}")));
        }
        let (id, token, hash) = dockyard_core::identity::mint_opaque(NODE_TOKEN_PREFIX);
        sqlx::query(
            "INSERT INTO executor_tokens (id, name, secret_hash, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(&hash)
        .bind(by)
        .bind(now_millis())
        .execute(&self.db.write)
        .await?;
        let info = self
            .node_tokens()
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| BuildError::Internal("token vanished".into()))?;
        Ok((info, token))
    }

    pub async fn node_tokens(&self) -> Result<Vec<NodeTokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, created_by, created_at, last_used_at, revoked_at \
             FROM executor_tokens ORDER BY created_at",
        )
        .fetch_all(&self.db.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeTokenInfo {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    created_by: r.try_get(2)?,
                    created_at: r.try_get(3)?,
                    last_used_at: r.try_get(4)?,
                    revoked_at: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Revokes a node token by id or name (every token of that name);
    /// its executors are forgotten and their jobs go back to the queue.
    pub async fn revoke_node_token(&self, id_or_name: &str) -> Result<usize> {
        let now = now_millis();
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM executor_tokens WHERE (id = $1 OR name = $1) AND revoked_at IS NULL",
        )
        .bind(id_or_name)
        .fetch_all(&self.db.read)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<sqlx::Result<_>>()?;
        if ids.is_empty() {
            return Err(BuildError::NotFound(format!("node token {id_or_name}")));
        }
        for id in &ids {
            sqlx::query("UPDATE executor_tokens SET revoked_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&self.db.write)
                .await?;
            // Their leases end now; the sweep requeues the jobs.
            sqlx::query(&format!(
                "UPDATE build_jobs SET lease_expires = 0 WHERE phase IN {ACTIVE_PHASES} AND executor_id IN \
                 (SELECT id FROM executors WHERE token_id = $1)"
            ))
            .bind(id)
            .execute(&self.db.write)
            .await?;
        }
        Ok(ids.len())
    }

    /// The node token a bearer credential stands for, if valid and not revoked.
    pub async fn authenticate_node(&self, token: &str) -> Result<Option<NodeAuth>> {
        let Some((id, secret)) = dockyard_core::identity::split_opaque(token, NODE_TOKEN_PREFIX)
        else {
            return Ok(None);
        };
        let row = sqlx::query("SELECT secret_hash, revoked_at FROM executor_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.read)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = row.try_get(0)?;
        let revoked: Option<i64> = row.try_get(1)?;
        if !dockyard_core::identity::secret_matches(&hash, secret) || revoked.is_some() {
            return Ok(None);
        }
        Ok(Some(NodeAuth {
            token_id: id.to_string(),
        }))
    }

    // ---- executors ----

    pub async fn register_executor(
        &self,
        auth: &NodeAuth,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse> {
        if req.platforms.is_empty() {
            return Err(BuildError::Invalid("an executor needs a platform".into()));
        }
        for p in &req.platforms {
            p.parse::<Platform>()
                .map_err(|e| BuildError::Invalid(e.to_string()))?;
        }
        if req.capacity == 0 || req.capacity > 256 {
            return Err(BuildError::Invalid("capacity must be 1 to 256".into()));
        }
        let id = new_id();
        let now = now_millis();
        let clip = |s: &str| s.chars().take(128).collect::<String>();
        sqlx::query(
            "INSERT INTO executors (id, token_id, name, platforms, capacity, engine, version, \
             registered_at, last_seen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(&id)
        .bind(&auth.token_id)
        .bind(clip(&req.name))
        .bind(serde_json::to_string(&req.platforms).expect("serializable"))
        .bind(req.capacity as i64)
        .bind(clip(&req.engine))
        .bind(clip(&req.version))
        .bind(now)
        .execute(&self.db.write)
        .await?;
        sqlx::query("UPDATE executor_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&auth.token_id)
            .execute(&self.db.write)
            .await?;
        tracing::info!(executor = %id, name = %req.name, platforms = ?req.platforms, capacity = req.capacity, "executor registered");
        let lease = self.settings.lease.as_secs();
        Ok(RegisterResponse {
            executor_id: id,
            heartbeat_seconds: (lease / 3).max(1),
            lease_seconds: lease,
        })
    }

    pub async fn executors(&self) -> Result<Vec<ExecutorInfo>> {
        let rows = sqlx::query(&format!(
            "SELECT e.id, e.name, e.token_id, e.platforms, e.capacity, e.engine, e.version, \
             e.registered_at, e.last_seen, \
             (SELECT COUNT(*) FROM build_jobs j WHERE j.executor_id = e.id AND j.phase IN {ACTIVE_PHASES}) \
             FROM executors e JOIN executor_tokens t ON t.id = e.token_id \
             WHERE t.revoked_at IS NULL ORDER BY e.last_seen DESC"
        ))
        .fetch_all(&self.db.read)
        .await?;
        let fresh = now_millis() - 2 * self.settings.lease.as_millis() as i64;
        rows.iter()
            .map(|r| {
                let last_seen: i64 = r.try_get(8)?;
                Ok(ExecutorInfo {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    token_id: r.try_get(2)?,
                    platforms: serde_json::from_str(&r.try_get::<String, _>(3)?)
                        .unwrap_or_default(),
                    capacity: r.try_get(4)?,
                    engine: r.try_get(5)?,
                    version: r.try_get(6)?,
                    registered_at: r.try_get(7)?,
                    last_seen,
                    online: last_seen >= fresh,
                    running_jobs: r.try_get(9)?,
                })
            })
            .collect()
    }

    /// The executor's platforms, checking that it belongs to the token.
    async fn executor_platforms(&self, auth: &NodeAuth, executor: &str) -> Result<Vec<Platform>> {
        let row = sqlx::query("SELECT platforms FROM executors WHERE id = $1 AND token_id = $2")
            .bind(executor)
            .bind(&auth.token_id)
            .fetch_optional(&self.db.read)
            .await?
            .ok_or_else(|| BuildError::NotFound(format!("executor {executor}")))?;
        let platforms: Vec<String> =
            serde_json::from_str(&row.try_get::<String, _>(0)?).unwrap_or_default();
        Ok(platforms.iter().filter_map(|p| p.parse().ok()).collect())
    }

    /// Long poll: leases the oldest queued job this executor can build, or
    /// returns `None` after `wait`.
    pub async fn poll(
        &self,
        auth: &NodeAuth,
        executor: &str,
        wait: Duration,
    ) -> Result<Option<JobAssignment>> {
        let platforms = self.executor_platforms(auth, executor).await?;
        let deadline = Instant::now() + wait.min(Duration::from_secs(60));
        loop {
            // Register interest before looking, so a job queued in between
            // still wakes us.
            let notified = self.jobs_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.touch_executor(executor).await?;
            if let Some(job) = self.try_lease(executor, &platforms).await? {
                return Ok(Some(job));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Other replicas queue jobs without notifying us: look again
            // every second.
            let nap = (deadline - now).min(Duration::from_secs(1));
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn touch_executor(&self, executor: &str) -> Result<()> {
        sqlx::query("UPDATE executors SET last_seen = $1 WHERE id = $2")
            .bind(now_millis())
            .bind(executor)
            .execute(&self.db.write)
            .await?;
        Ok(())
    }

    async fn try_lease(
        &self,
        executor: &str,
        platforms: &[Platform],
    ) -> Result<Option<JobAssignment>> {
        let candidates = sqlx::query(
            "SELECT j.id, j.platform, j.build_id, j.queued_at FROM build_jobs j JOIN builds b ON b.id = j.build_id \
             WHERE j.phase = 'queued' AND b.cancel_requested = 0 ORDER BY j.queued_at, j.id LIMIT 100",
        )
        .fetch_all(&self.db.read)
        .await?;
        for c in candidates {
            let job_id: String = c.try_get(0)?;
            let platform: String = c.try_get(1)?;
            let build_id: String = c.try_get(2)?;
            let queued_at: i64 = c.try_get(3)?;
            let Ok(wanted) = platform.parse::<Platform>() else {
                continue;
            };
            if !platforms.iter().any(|p| p.serves(&wanted)) {
                continue;
            }
            let now = now_millis();
            let lease_until = now + self.settings.lease.as_millis() as i64;
            let mut tx = self.db.write.begin().await?;
            let n = sqlx::query(
                "UPDATE build_jobs SET phase = 'fetching_source', executor_id = $1, lease_expires = $2, \
                 started_at = $3, reported_at = NULL, building_at = NULL, attempt = attempt + 1, error = NULL \
                 WHERE id = $4 AND phase = 'queued'",
            )
            .bind(executor)
            .bind(lease_until)
            .bind(now)
            .bind(&job_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n != 1 {
                tx.rollback().await?;
                continue; // another executor won it
            }
            let started = sqlx::query(
                "UPDATE builds SET status = 'running', started_at = COALESCE(started_at, $1) \
                 WHERE id = $2 AND status = 'queued'",
            )
            .bind(now)
            .bind(&build_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if started == 1 {
                crate::builds::build_event(
                    &mut tx,
                    self.db.backend,
                    &build_id,
                    dockyard_core::events::kinds::BUILD_STARTED,
                )
                .await?;
            }
            tx.commit().await?;
            dockyard_core::events::wake();
            let assignment = self.assignment(&job_id).await?;
            metrics::histogram!("dockyard_build_queue_latency_seconds")
                .record((now - queued_at).max(0) as f64 / 1000.0);
            self.append_log(
                &job_id,
                &format!("dockyard: job taken by executor {executor}\n"),
            )
            .await?;
            self.progress.notify_waiters();
            tracing::info!(job = %job_id, build = %build_id, executor, platform, "job leased");
            return Ok(Some(assignment));
        }
        Ok(None)
    }

    async fn assignment(&self, job_id: &str) -> Result<JobAssignment> {
        let r = sqlx::query(
            "SELECT j.build_id, j.platform, b.source, b.dockerfile, b.context_dir, b.build_args, \
             b.target, b.repository, b.definition_id, b.created_at, b.timeout_ms \
             FROM build_jobs j JOIN builds b ON b.id = j.build_id WHERE j.id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.db.read)
        .await?;
        let mut source: JobSource = serde_json::from_str(&r.try_get::<String, _>(2)?)
            .map_err(|e| BuildError::Internal(format!("stored source: {e}")))?;
        let definition: Option<String> = r.try_get(8)?;
        if let (
            JobSource::Git {
                username,
                password,
                ssh_key,
                ..
            },
            Some(def),
        ) = (&mut source, &definition)
            && let Some(row) = sqlx::query(
                "SELECT git_username, git_password, git_ssh_key FROM build_definitions WHERE id = $1",
            )
            .bind(def)
            .fetch_optional(&self.db.read)
            .await?
        {
            *username = row.try_get(0)?;
            *password = row.try_get(1)?;
            *ssh_key = row.try_get(2)?;
        }
        let created_at: i64 = r.try_get(9)?;
        let timeout_ms: i64 = r.try_get(10)?;
        let left = (created_at + timeout_ms - now_millis()).max(1000);
        Ok(JobAssignment {
            job_id: job_id.to_string(),
            build_id: r.try_get(0)?,
            platform: r.try_get(1)?,
            source,
            dockerfile: r.try_get(3)?,
            context_dir: r.try_get(4)?,
            build_args: serde_json::from_str(&r.try_get::<String, _>(5)?).unwrap_or_default(),
            target: r.try_get(6)?,
            registry: self.settings.registry_host.clone(),
            registry_insecure: self.settings.registry_insecure,
            repository: r.try_get(7)?,
            push_tag: push_tag(job_id),
            timeout_seconds: (left as u64).div_ceil(1000),
        })
    }

    /// Renews the leases of an executor's jobs; answers which to stop.
    pub async fn heartbeat(
        &self,
        auth: &NodeAuth,
        executor: &str,
        jobs: &[String],
    ) -> Result<HeartbeatResponse> {
        self.executor_platforms(auth, executor).await?;
        self.touch_executor(executor).await?;
        let mut cancel = Vec::new();
        for job in jobs {
            if !self.renew(executor, job).await? {
                cancel.push(job.clone());
            }
        }
        Ok(HeartbeatResponse { cancel })
    }

    /// Renews one lease; false when the job is not this executor's any more
    /// or its build is being cancelled.
    async fn renew(&self, executor: &str, job: &str) -> Result<bool> {
        let lease_until = now_millis() + self.settings.lease.as_millis() as i64;
        let n = sqlx::query(&format!(
            "UPDATE build_jobs SET lease_expires = $1 WHERE id = $2 AND executor_id = $3 \
             AND phase IN {ACTIVE_PHASES} \
             AND build_id IN (SELECT id FROM builds WHERE cancel_requested = 0)"
        ))
        .bind(lease_until)
        .bind(job)
        .bind(executor)
        .execute(&self.db.write)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Whether `executor` holds `job` now (409 otherwise).
    async fn check_holder(&self, auth: &NodeAuth, executor: &str, job: &str) -> Result<String> {
        self.executor_platforms(auth, executor).await?;
        let row = sqlx::query("SELECT executor_id, phase, build_id FROM build_jobs WHERE id = $1")
            .bind(job)
            .fetch_optional(&self.db.read)
            .await?
            .ok_or_else(|| BuildError::NotFound(format!("job {job}")))?;
        let holder: Option<String> = row.try_get(0)?;
        let phase: String = row.try_get(1)?;
        let active = phase
            .parse::<Phase>()
            .is_ok_and(|p| !p.is_final() && p != Phase::Queued);
        if holder.as_deref() != Some(executor) || !active {
            return Err(BuildError::Conflict(format!(
                "job {job} is not leased to executor {executor}"
            )));
        }
        Ok(row.try_get(2)?)
    }

    /// Progress of a job: phase and log text. Renews the lease.
    pub async fn job_log(
        &self,
        auth: &NodeAuth,
        executor: &str,
        job: &str,
        log: &JobLog,
    ) -> Result<HeartbeatResponse> {
        let build_id = self.check_holder(auth, executor, job).await?;
        let now = now_millis();
        let first = sqlx::query(
            "UPDATE build_jobs SET reported_at = $1 WHERE id = $2 AND reported_at IS NULL",
        )
        .bind(now)
        .bind(job)
        .execute(&self.db.write)
        .await?
        .rows_affected();
        if first == 1 {
            let created: i64 = sqlx::query("SELECT created_at FROM builds WHERE id = $1")
                .bind(&build_id)
                .fetch_one(&self.db.read)
                .await?
                .try_get(0)?;
            metrics::histogram!("dockyard_build_start_latency_seconds")
                .record((now - created).max(0) as f64 / 1000.0);
        }
        if let Some(phase) = log.phase {
            if phase.is_final() || phase == Phase::Queued {
                return Err(BuildError::Invalid(format!(
                    "phase {phase} is reported through the result call"
                )));
            }
            sqlx::query(&format!(
                "UPDATE build_jobs SET phase = $1, building_at = CASE WHEN $1 = 'building' \
                 THEN COALESCE(building_at, $2) ELSE building_at END \
                 WHERE id = $3 AND phase IN {ACTIVE_PHASES}"
            ))
            .bind(phase.as_str())
            .bind(now)
            .bind(job)
            .execute(&self.db.write)
            .await?;
        }
        if !log.text.is_empty() {
            self.append_log(job, &log.text).await?;
        }
        self.progress.notify_waiters();
        let keep = self.renew(executor, job).await?;
        Ok(HeartbeatResponse {
            cancel: if keep { vec![] } else { vec![job.to_string()] },
        })
    }

    /// A registry token for a job: push+pull on its repository, pull on the
    /// requested base repositories its build's owner may read.
    pub async fn job_token(
        &self,
        auth: &NodeAuth,
        executor: &str,
        job: &str,
        pull: &[String],
    ) -> Result<TokenResponse> {
        let build_id = self.check_holder(auth, executor, job).await?;
        let b = self.build(&build_id).await?.build;
        let owner = self
            .identity
            .principal_by_name(&b.created_by)
            .await?
            .ok_or_else(|| BuildError::Forbidden)?;
        let mut access = vec![Access {
            kind: "repository".into(),
            name: b.repository.clone(),
            actions: vec!["pull".into(), "push".into()],
        }];
        for repo in pull.iter().take(64) {
            if repo == &b.repository || access.iter().any(|a| &a.name == repo) {
                continue;
            }
            if self.identity.repository_role(&owner, repo).await?.is_some() {
                access.push(Access {
                    kind: "repository".into(),
                    name: repo.clone(),
                    actions: vec!["pull".into()],
                });
            }
        }
        // Public repositories are readable by everyone, including this token:
        // repository_role answers Read for them.
        let now = now_millis() / 1000;
        let ttl =
            (b.created_at / 1000 + self.settings.timeout.as_secs() as i64 - now).clamp(60, 3600);
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: b.created_by.clone(),
            aud: self.settings.service.clone(),
            exp: now + ttl,
            nbf: now - 1,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
        };
        let token = self
            .keys
            .sign(&claims)
            .map_err(|e| BuildError::Internal(e.to_string()))?;
        Ok(TokenResponse {
            token,
            expires_in: ttl as u64,
        })
    }

    /// The uploaded context of a job's build.
    pub async fn job_context(
        &self,
        auth: &NodeAuth,
        executor: &str,
        job: &str,
    ) -> Result<object_store::GetResult> {
        let build_id = self.check_holder(auth, executor, job).await?;
        Ok(self.store.get(&context_key(&build_id)).await?)
    }

    /// How a job ended. Lost leases get 409; internal errors are retried
    /// while attempts remain.
    pub async fn job_result(
        &self,
        auth: &NodeAuth,
        executor: &str,
        job: &str,
        result: &JobResult,
    ) -> Result<()> {
        let build_id = self.check_holder(auth, executor, job).await?;
        if !result.phase.is_final() {
            return Err(BuildError::Invalid(format!(
                "{} is not a final phase",
                result.phase
            )));
        }
        let now = now_millis();
        if result.phase == Phase::Complete {
            let (Some(m), Some(c)) = (&result.manifest_digest, &result.config_digest) else {
                return Err(BuildError::Invalid(
                    "a complete job reports its manifest and config digests".into(),
                ));
            };
            for d in [m, c] {
                d.parse::<dockyard_oci::Digest>()
                    .map_err(|_| BuildError::Invalid(format!("invalid digest {d:?}")))?;
            }
        }
        let attempt: i64 = sqlx::query("SELECT attempt FROM build_jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&self.db.read)
            .await?
            .try_get(0)?;
        if let Some(e) = &result.error {
            self.append_log(job, &format!("dockyard: {e}\n")).await?;
        }
        if result.phase == Phase::InternalError && attempt < self.settings.max_attempts as i64 {
            self.requeue(
                job,
                &format!(
                    "executor {executor} hit an internal error ({}); retrying (attempt {} of {})",
                    result.error.as_deref().unwrap_or("unknown"),
                    attempt + 1,
                    self.settings.max_attempts
                ),
            )
            .await?;
            return Ok(());
        }
        let mut tx = self.db.write.begin().await?;
        sqlx::query(
            "UPDATE build_jobs SET phase = $1, error = $2, manifest_digest = $3, config_digest = $4, \
             finished_at = $5, lease_expires = NULL WHERE id = $6",
        )
        .bind(result.phase.as_str())
        .bind(&result.error)
        .bind(&result.manifest_digest)
        .bind(&result.config_digest)
        .bind(now)
        .bind(job)
        .execute(&mut *tx)
        .await?;
        if result.phase == Phase::Complete {
            sqlx::query("DELETE FROM build_base_images WHERE job_id = $1")
                .bind(job)
                .execute(&mut *tx)
                .await?;
            for b in result.base_images.iter().take(256) {
                sqlx::query(
                    "INSERT INTO build_base_images (job_id, build_id, reference, digest) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(job)
                .bind(&build_id)
                .bind(&b.reference)
                .bind(&b.digest)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        tracing::info!(job, build = %build_id, executor, phase = %result.phase, "job finished");
        self.archive_log(job, &build_id).await;
        self.settle(&build_id).await?;
        self.progress.notify_waiters();
        Ok(())
    }

    /// Puts a job back in the queue (lost executor, internal error).
    async fn requeue(&self, job: &str, why: &str) -> Result<()> {
        sqlx::query(
            "UPDATE build_jobs SET phase = 'queued', executor_id = NULL, lease_expires = NULL, \
             queued_at = $1 WHERE id = $2",
        )
        .bind(now_millis())
        .bind(job)
        .execute(&self.db.write)
        .await?;
        self.append_log(job, &format!("dockyard: {why}\n")).await?;
        tracing::warn!(job, "{why}");
        self.jobs_ready.notify_waiters();
        self.progress.notify_waiters();
        Ok(())
    }

    /// Expired leases: retry elsewhere or fail; builds past their timeout:
    /// cancel with an error.
    pub(crate) async fn sweep(&self) -> Result<()> {
        let now = now_millis();
        let expired = sqlx::query(&format!(
            "SELECT j.id, j.build_id, j.attempt, j.executor_id, b.cancel_requested \
             FROM build_jobs j JOIN builds b ON b.id = j.build_id \
             WHERE j.phase IN {ACTIVE_PHASES} AND j.lease_expires < $1"
        ))
        .bind(now)
        .fetch_all(&self.db.read)
        .await?;
        for r in expired {
            let job: String = r.try_get(0)?;
            let build: String = r.try_get(1)?;
            let attempt: i64 = r.try_get(2)?;
            let executor: Option<String> = r.try_get(3)?;
            let cancelled: i64 = r.try_get(4)?;
            let executor = executor.unwrap_or_default();
            if cancelled == 0 && attempt < self.settings.max_attempts as i64 {
                self.requeue(
                    &job,
                    &format!(
                        "executor {executor} stopped renewing its lease; retrying on another executor (attempt {} of {})",
                        attempt + 1,
                        self.settings.max_attempts
                    ),
                )
                .await?;
                metrics::counter!("dockyard_build_jobs_retried_total").increment(1);
                continue;
            }
            let (phase, error) = if cancelled != 0 {
                ("cancelled", "cancelled".to_string())
            } else {
                (
                    "failed",
                    format!("executor {executor} was lost and no attempts are left"),
                )
            };
            sqlx::query(
                "UPDATE build_jobs SET phase = $1, error = $2, finished_at = $3, lease_expires = NULL \
                 WHERE id = $4",
            )
            .bind(phase)
            .bind(&error)
            .bind(now)
            .bind(&job)
            .execute(&self.db.write)
            .await?;
            self.append_log(&job, &format!("dockyard: {error}\n"))
                .await?;
            self.archive_log(&job, &build).await;
            self.settle(&build).await?;
        }
        // Timeouts.
        let late = sqlx::query(
            "SELECT id FROM builds WHERE status IN ('queued', 'running') AND cancel_requested = 0 \
             AND created_at + timeout_ms < $1",
        )
        .bind(now)
        .fetch_all(&self.db.read)
        .await?;
        for r in late {
            let id: String = r.try_get(0)?;
            let secs = self.settings.timeout.as_secs();
            sqlx::query("UPDATE builds SET error = $1 WHERE id = $2")
                .bind(format!("timed out after {secs} s"))
                .bind(&id)
                .execute(&self.db.write)
                .await?;
            tracing::warn!(build = %id, "build timed out");
            let _ = self.cancel(&id).await;
        }
        Ok(())
    }
}

/// Object key of a build's uploaded context.
pub fn context_key(build_id: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("dockyard/build-contexts/{build_id}"))
}
