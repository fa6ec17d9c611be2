//! Builds, build definitions and triggers: creation (one job per platform),
//! listing, cancellation, and the end of a build (index assembly, tags).

use std::collections::BTreeMap;

use dockyard_core::now_millis;
use dockyard_oci::build::Platform;
use dockyard_oci::build::{BaseImage, JobSource, Phase, expand_tag_template};
use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::webhook::{self, Delivery, Push};
use crate::{BuildError, BuildManager, Result, new_id};
use dockyard_core::events::{self, NewEvent, kinds};

/// A build to start.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub repository: String,
    pub definition_id: Option<String>,
    /// `webhook`, `manual`, `upload`, `base_image`.
    pub trigger_kind: String,
    /// For people: "push of refs/heads/main", "uploaded by alice", ...
    pub trigger_detail: String,
    /// Source without credentials (they are read from the definition when a
    /// job is handed out).
    pub source: JobSource,
    pub git_ref: Option<String>,
    pub commit: Option<String>,
    pub dockerfile: String,
    pub context_dir: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub platforms: Vec<Platform>,
    pub tags: Vec<String>,
    pub created_by: String,
    /// When the trigger arrived (Unix ms), for start latency.
    pub received_at: i64,
}

/// A build definition to create.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
pub struct NewDefinition {
    /// Unique in the repository.
    pub name: String,
    /// Git repository URL (https, ssh, git, file or a local path).
    pub git_url: String,
    #[serde(default)]
    pub git_username: Option<String>,
    /// Password or token for HTTPS.
    #[serde(default)]
    pub git_password: Option<String>,
    /// SSH private key (deploy key).
    #[serde(default)]
    pub git_ssh_key: Option<String>,
    /// Dockerfile path relative to the context directory (default `Dockerfile`).
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// Context subdirectory (default: the repository root).
    #[serde(default)]
    pub context_dir: Option<String>,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    #[serde(default)]
    pub target: Option<String>,
    /// Default `["linux/amd64"]`.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Default `["{branch}", "{tag}", "latest"]`; `latest` applies on the
    /// default branch only.
    #[serde(default)]
    pub tag_templates: Vec<String>,
    /// Regular expression on `heads/<branch>` or `tags/<tag>`; default: all.
    #[serde(default)]
    pub ref_filter: Option<String>,
    /// The trigger whose pushes start this definition.
    #[serde(default)]
    pub trigger_id: Option<String>,
    /// Rebuild when a base image moves (default true).
    #[serde(default)]
    pub auto_rebuild: Option<bool>,
    /// When base images in other registries are checked: a cron expression
    /// with seconds; default `builds.base_check_schedule`.
    #[serde(default)]
    pub base_check_schedule: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DefinitionInfo {
    pub id: String,
    pub repository: String,
    pub name: String,
    pub trigger_id: Option<String>,
    pub git_url: Option<String>,
    /// Whether git credentials are stored (they are never shown).
    pub has_credentials: bool,
    pub dockerfile: String,
    pub context_dir: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub platforms: Vec<String>,
    pub tag_templates: Vec<String>,
    pub ref_filter: Option<String>,
    pub auto_rebuild: bool,
    /// Own schedule of upstream base checks (null: the server's).
    pub base_check_schedule: Option<String>,
    pub created_by: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TriggerInfo {
    pub id: String,
    pub namespace: String,
    /// `github`, `gitlab` or `generic`.
    pub kind: String,
    /// Path to configure at the git host: `POST` pushes here.
    pub webhook_path: String,
    pub created_by: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryInfo {
    pub id: String,
    pub received_at: i64,
    pub address: String,
    pub event: String,
    pub git_ref: Option<String>,
    pub commit: Option<String>,
    /// `accepted`, `rejected` or `ignored`.
    pub outcome: String,
    pub message: String,
    pub builds: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BuildInfo {
    pub id: String,
    pub repository: String,
    pub definition_id: Option<String>,
    pub trigger_kind: String,
    pub trigger_detail: String,
    pub git_ref: Option<String>,
    pub commit: Option<String>,
    pub dockerfile: String,
    pub target: Option<String>,
    pub platforms: Vec<String>,
    pub tags: Vec<String>,
    /// `queued`, `running`, `pushing`, `complete`, `failed`, `cancelled`,
    /// `internal_error`.
    pub status: String,
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The image (single platform) or index (several) the tags point to.
    pub manifest_digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobInfo {
    pub id: String,
    pub platform: String,
    pub phase: String,
    pub attempt: i64,
    pub executor_id: Option<String>,
    pub queued_at: i64,
    pub started_at: Option<i64>,
    pub reported_at: Option<i64>,
    pub building_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub manifest_digest: Option<String>,
    pub config_digest: Option<String>,
    pub error: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub base_images: Vec<BaseImage>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub build: BuildInfo,
    pub jobs: Vec<JobInfo>,
}

/// Build statuses after which nothing changes.
pub const FINAL_STATUSES: [&str; 4] = ["complete", "failed", "cancelled", "internal_error"];

fn strings(json_text: &str) -> Vec<String> {
    serde_json::from_str(json_text).unwrap_or_default()
}

fn safe_relative(path: &str) -> bool {
    !path.starts_with('/')
        && !path.contains('\\')
        && !path.split('/').any(|c| c == "..")
        && !path.contains('\0')
}

pub(crate) fn build_info(r: &AnyRow) -> sqlx::Result<BuildInfo> {
    Ok(BuildInfo {
        id: r.try_get("id")?,
        repository: r.try_get("repository")?,
        definition_id: r.try_get("definition_id")?,
        trigger_kind: r.try_get("trigger_kind")?,
        trigger_detail: r.try_get("trigger_detail")?,
        git_ref: r.try_get("git_ref")?,
        commit: r.try_get("commit_sha")?,
        dockerfile: r.try_get("dockerfile")?,
        target: r.try_get("target")?,
        platforms: strings(&r.try_get::<String, _>("platforms")?),
        tags: strings(&r.try_get::<String, _>("tags")?),
        status: r.try_get("status")?,
        error: r.try_get("error")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        manifest_digest: r.try_get("manifest_digest")?,
    })
}

const BUILD_COLUMNS: &str = "id, repository, definition_id, trigger_kind, trigger_detail, git_ref, \
     commit_sha, dockerfile, target, platforms, tags, status, error, created_by, created_at, \
     started_at, finished_at, manifest_digest";

fn definition_info(r: &AnyRow) -> sqlx::Result<DefinitionInfo> {
    let creds = r.try_get::<Option<String>, _>("git_password")?.is_some()
        || r.try_get::<Option<String>, _>("git_ssh_key")?.is_some();
    Ok(DefinitionInfo {
        id: r.try_get("id")?,
        repository: r.try_get("repository")?,
        name: r.try_get("name")?,
        trigger_id: r.try_get("trigger_id")?,
        git_url: r.try_get("git_url")?,
        has_credentials: creds,
        dockerfile: r.try_get("dockerfile")?,
        context_dir: r.try_get("context_dir")?,
        build_args: serde_json::from_str(&r.try_get::<String, _>("build_args")?)
            .unwrap_or_default(),
        target: r.try_get("target")?,
        platforms: strings(&r.try_get::<String, _>("platforms")?),
        tag_templates: strings(&r.try_get::<String, _>("tag_templates")?),
        ref_filter: r.try_get("ref_filter")?,
        auto_rebuild: r.try_get::<i64, _>("auto_rebuild")? != 0,
        base_check_schedule: r.try_get("base_check_schedule")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
    })
}

/// Validates the parts every build shares.
pub fn validate_build_parts(
    dockerfile: &str,
    context_dir: &str,
    platforms: &[String],
    target: Option<&str>,
    build_args: &BTreeMap<String, String>,
) -> Result<Vec<Platform>> {
    if dockerfile.is_empty() || !safe_relative(dockerfile) {
        return Err(BuildError::Invalid(format!(
            "dockerfile {dockerfile:?} must be a relative path inside the context"
        )));
    }
    if !safe_relative(context_dir) {
        return Err(BuildError::Invalid(format!(
            "context_dir {context_dir:?} must be a relative path inside the source"
        )));
    }
    if platforms.is_empty() {
        return Err(BuildError::Invalid(
            "at least one platform is needed".into(),
        ));
    }
    let mut parsed = Vec::new();
    for p in platforms {
        let p: Platform = p
            .parse()
            .map_err(|e: dockyard_oci::build::PlatformError| BuildError::Invalid(e.to_string()))?;
        if parsed.contains(&p) {
            return Err(BuildError::Invalid(format!("platform {p} given twice")));
        }
        parsed.push(p);
    }
    if let Some(t) = target
        && (t.is_empty() || t.len() > 128 || t.contains(char::is_whitespace))
    {
        return Err(BuildError::Invalid(format!("invalid target stage {t:?}")));
    }
    for k in build_args.keys() {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(BuildError::Invalid(format!(
                "invalid build argument name {k:?}"
            )));
        }
    }
    Ok(parsed)
}

/// Validates tags given directly (upload builds).
pub fn validate_tags(tags: &[String]) -> Result<()> {
    for t in tags {
        t.parse::<dockyard_oci::Tag>()
            .map_err(|_| BuildError::Invalid(format!("invalid tag {t:?}")))?;
    }
    Ok(())
}

/// Tags a push produces from a definition's templates.
pub fn tags_for_push(templates: &[String], push: &Push, build_id: &str) -> Vec<String> {
    let mut vars: BTreeMap<&str, String> = BTreeMap::new();
    let branch = push.git_ref.strip_prefix("refs/heads/");
    if let Some(b) = branch {
        vars.insert("branch", b.to_string());
    }
    if let Some(t) = push.git_ref.strip_prefix("refs/tags/") {
        vars.insert("tag", t.to_string());
    }
    if !push.commit.is_empty() {
        vars.insert("sha", push.commit.clone());
        vars.insert("short_sha", push.commit.chars().take(7).collect());
    }
    vars.insert("build", build_id.to_string());
    let on_default = match (branch, &push.default_branch) {
        (Some(b), Some(d)) => b == d,
        (Some(_), None) => true,
        _ => false,
    };
    let mut out: Vec<String> = Vec::new();
    for t in templates {
        if t == "latest" && !on_default {
            continue;
        }
        if let Some(tag) = expand_tag_template(t, &vars)
            && !out.contains(&tag)
        {
            out.push(tag);
        }
    }
    out
}

impl BuildManager {
    // ---- builds ----

    /// Records a build and queues one job per platform.
    pub async fn create_build(&self, nb: NewBuild) -> Result<BuildInfo> {
        self.create_build_with_id(new_id(), nb).await
    }

    pub(crate) async fn create_build_with_id(&self, id: String, nb: NewBuild) -> Result<BuildInfo> {
        let now = now_millis();
        let platforms: Vec<String> = nb.platforms.iter().map(|p| p.to_string()).collect();
        let mut tx = self.db.write.begin().await?;
        sqlx::query(
            "INSERT INTO builds (id, repository, definition_id, trigger_kind, trigger_detail, source, \
             git_ref, commit_sha, dockerfile, context_dir, build_args, target, platforms, tags, status, \
             timeout_ms, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'queued', $15, $16, $17)",
        )
        .bind(&id)
        .bind(&nb.repository)
        .bind(&nb.definition_id)
        .bind(&nb.trigger_kind)
        .bind(&nb.trigger_detail)
        .bind(serde_json::to_string(&nb.source).expect("serializable"))
        .bind(&nb.git_ref)
        .bind(&nb.commit)
        .bind(&nb.dockerfile)
        .bind(&nb.context_dir)
        .bind(serde_json::to_string(&nb.build_args).expect("serializable"))
        .bind(&nb.target)
        .bind(serde_json::to_string(&platforms).expect("serializable"))
        .bind(serde_json::to_string(&nb.tags).expect("serializable"))
        .bind(self.settings.timeout.as_millis() as i64)
        .bind(&nb.created_by)
        .bind(nb.received_at.min(now))
        .execute(&mut *tx)
        .await?;
        for p in &platforms {
            sqlx::query(
                "INSERT INTO build_jobs (id, build_id, platform, phase, queued_at) \
                 VALUES ($1, $2, $3, 'queued', $4)",
            )
            .bind(new_id())
            .bind(&id)
            .bind(p)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        build_event(&mut tx, self.db.backend, &id, kinds::BUILD_QUEUED).await?;
        tx.commit().await?;
        dockyard_core::events::wake();
        metrics::counter!("dockyard_builds_total", "trigger" => nb.trigger_kind.clone())
            .increment(1);
        self.jobs_ready.notify_waiters();
        tracing::info!(build = %id, repository = %nb.repository, trigger = %nb.trigger_kind, "build queued");
        self.build(&id).await.map(|d| d.build)
    }

    /// Stores an uploaded context (streamed, bounded by
    /// `max_context_size`), then queues the build. Nothing is queued when
    /// the upload fails.
    pub async fn upload_build<S>(&self, nb: NewBuild, mut body: S) -> Result<BuildInfo>
    where
        S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin + Send,
    {
        use futures::StreamExt;
        let id = new_id();
        let key = crate::jobs::context_key(&id);
        let upload = self.store.put_multipart(&key).await?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, 8 << 20);
        let mut size = 0u64;
        let limit = self.settings.max_context_size;
        let failure = loop {
            match body.next().await {
                None => break None,
                Some(Err(e)) => break Some(BuildError::Invalid(format!("context upload: {e}"))),
                Some(Ok(chunk)) => {
                    size += chunk.len() as u64;
                    if size > limit {
                        break Some(BuildError::TooLarge(format!(
                            "the build context exceeds the limit of {limit} bytes"
                        )));
                    }
                    if let Err(e) = writer.wait_for_capacity(4).await {
                        break Some(e.into());
                    }
                    writer.write(&chunk);
                }
            }
        };
        if let Some(e) = failure {
            let _ = writer.abort().await;
            return Err(e);
        }
        if size == 0 {
            let _ = writer.abort().await;
            return Err(BuildError::Invalid("the build context is empty".into()));
        }
        writer.finish().await?;
        self.create_build_with_id(id, nb).await
    }

    /// One build with its jobs.
    pub async fn build(&self, id: &str) -> Result<BuildDetail> {
        let row = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.db.read)
            .await?
            .ok_or_else(|| BuildError::NotFound(format!("build {id}")))?;
        let build = build_info(&row)?;
        let jobs = sqlx::query(
            "SELECT id, platform, phase, attempt, executor_id, queued_at, started_at, reported_at, \
             building_at, finished_at, manifest_digest, config_digest, error \
             FROM build_jobs WHERE build_id = $1 ORDER BY platform",
        )
        .bind(id)
        .fetch_all(&self.db.read)
        .await?;
        let bases = sqlx::query(
            "SELECT job_id, reference, digest FROM build_base_images WHERE build_id = $1",
        )
        .bind(id)
        .fetch_all(&self.db.read)
        .await?;
        let mut out = Vec::new();
        for j in jobs {
            let job_id: String = j.try_get("id")?;
            let mut base_images = Vec::new();
            for b in &bases {
                if b.try_get::<String, _>(0)? == job_id {
                    base_images.push(BaseImage {
                        reference: b.try_get(1)?,
                        digest: b.try_get(2)?,
                    });
                }
            }
            out.push(JobInfo {
                id: job_id,
                platform: j.try_get("platform")?,
                phase: j.try_get("phase")?,
                attempt: j.try_get("attempt")?,
                executor_id: j.try_get("executor_id")?,
                queued_at: j.try_get("queued_at")?,
                started_at: j.try_get("started_at")?,
                reported_at: j.try_get("reported_at")?,
                building_at: j.try_get("building_at")?,
                finished_at: j.try_get("finished_at")?,
                manifest_digest: j.try_get("manifest_digest")?,
                config_digest: j.try_get("config_digest")?,
                error: j.try_get("error")?,
                base_images,
            });
        }
        Ok(BuildDetail { build, jobs: out })
    }

    /// Builds of a repository, newest first; `before` is a `created_at`
    /// cursor from the previous page.
    pub async fn builds(
        &self,
        repository: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<BuildInfo>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE repository = $1 AND created_at < $2 \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .bind(repository)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit.clamp(1, 500) as i64)
        .fetch_all(&self.db.read)
        .await?;
        Ok(rows.iter().map(build_info).collect::<sqlx::Result<_>>()?)
    }

    /// Asks a build to stop: queued jobs end now, running ones when their
    /// executor hears of it (next heartbeat or log call).
    pub async fn cancel(&self, id: &str) -> Result<BuildInfo> {
        let now = now_millis();
        let mut tx = self.db.write.begin().await?;
        let n = sqlx::query(
            "UPDATE builds SET cancel_requested = 1 WHERE id = $1 \
             AND status NOT IN ('complete', 'failed', 'cancelled', 'internal_error')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            tx.rollback().await?;
            let b = self.build(id).await?;
            return Err(BuildError::Conflict(format!(
                "build {id} already ended ({})",
                b.build.status
            )));
        }
        cancel_queued_jobs(id, now).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(build = %id, "build cancellation requested");
        self.settle(id).await?;
        self.progress.notify_waiters();
        self.build(id).await.map(|d| d.build)
    }

    /// Moves a build to its end state once its jobs allow it: all complete
    /// → assemble and tag; any failed → stop the others, then failed.
    pub(crate) async fn settle(&self, build_id: &str) -> Result<()> {
        let rows = sqlx::query("SELECT phase, error FROM build_jobs WHERE build_id = $1")
            .bind(build_id)
            .fetch_all(&self.db.read)
            .await?;
        let phases: Vec<(Phase, Option<String>)> = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)?
                        .parse()
                        .unwrap_or(Phase::InternalError),
                    r.try_get(1)?,
                ))
            })
            .collect::<sqlx::Result<_>>()?;
        let active = phases.iter().any(|(p, _)| !p.is_final());
        let all_complete = phases.iter().all(|(p, _)| *p == Phase::Complete);
        let failure = phases
            .iter()
            .find(|(p, _)| matches!(p, Phase::Failed | Phase::InternalError))
            .cloned();
        let now = now_millis();
        if all_complete {
            let claimed = sqlx::query(
                "UPDATE builds SET status = 'pushing' WHERE id = $1 AND status IN ('queued', 'running')",
            )
            .bind(build_id)
            .execute(&self.db.write)
            .await?
            .rows_affected();
            if claimed == 1 {
                let (status, digest, error) = match self.assemble(build_id).await {
                    Ok(d) => ("complete", Some(d), None),
                    Err(e) => {
                        tracing::error!(build = %build_id, error = %e, "could not assemble the build's image");
                        (
                            "internal_error",
                            None,
                            Some(format!("assembling the image: {e}")),
                        )
                    }
                };
                self.finish_build(build_id, status, digest, error, now)
                    .await?;
            }
            return Ok(());
        }
        if let Some((phase, error)) = &failure {
            // Stop the other platforms; the build fails when they are done.
            sqlx::query("UPDATE builds SET cancel_requested = 1 WHERE id = $1")
                .bind(build_id)
                .execute(&self.db.write)
                .await?;
            cancel_queued_jobs(build_id, now)
                .execute(&self.db.write)
                .await?;
            if !active {
                let status = if *phase == Phase::Failed {
                    "failed"
                } else {
                    "internal_error"
                };
                self.finish_build(build_id, status, None, error.clone(), now)
                    .await?;
            }
            return Ok(());
        }
        if !active {
            // Only cancelled (and complete) jobs left. A build cancelled by
            // its timeout carries that error and counts as failed.
            let error: Option<String> = sqlx::query("SELECT error FROM builds WHERE id = $1")
                .bind(build_id)
                .fetch_one(&self.db.read)
                .await?
                .try_get(0)?;
            let status = if error.is_some() {
                "failed"
            } else {
                "cancelled"
            };
            let error = error.or_else(|| Some("cancelled".into()));
            self.finish_build(build_id, status, None, error, now)
                .await?;
        }
        Ok(())
    }

    async fn finish_build(
        &self,
        build_id: &str,
        status: &str,
        digest: Option<String>,
        error: Option<String>,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.db.write.begin().await?;
        let n = sqlx::query(
            "UPDATE builds SET status = $1, manifest_digest = $2, error = $3, finished_at = $4 \
             WHERE id = $5 AND status NOT IN ('complete', 'failed', 'cancelled', 'internal_error')",
        )
        .bind(status)
        .bind(&digest)
        .bind(&error)
        .bind(now)
        .bind(build_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            let kind = match status {
                "complete" => kinds::BUILD_SUCCEEDED,
                "cancelled" => kinds::BUILD_CANCELLED,
                _ => kinds::BUILD_FAILED,
            };
            build_event(&mut tx, self.db.backend, build_id, kind).await?;
        }
        tx.commit().await?;
        dockyard_core::events::wake();
        if n == 1 {
            metrics::counter!("dockyard_builds_finished_total", "status" => status.to_string())
                .increment(1);
            tracing::info!(build = %build_id, status, digest = ?digest, "build finished");
            // The build already ended: a failed read only costs the sample.
            if let Ok(row) = sqlx::query("SELECT created_at FROM builds WHERE id = $1")
                .bind(build_id)
                .fetch_one(&self.db.read)
                .await
                && let Ok(created) = row.try_get::<i64, _>(0)
            {
                metrics::histogram!("dockyard_build_duration_seconds", "status" => status.to_string())
                    .record((now - created).max(0) as f64 / 1000.0);
            }
        }
        self.progress.notify_waiters();
        Ok(())
    }

    /// Puts the build's image (or the index of its platforms) under its tags
    /// and removes the per-job push tags. Returns the tagged digest.
    async fn assemble(&self, build_id: &str) -> Result<String> {
        let detail = self.build(build_id).await?;
        let b = &detail.build;
        let repo = &b.repository;
        let mut children = Vec::new();
        for j in &detail.jobs {
            let digest = j
                .manifest_digest
                .as_deref()
                .ok_or_else(|| BuildError::Internal(format!("job {} has no digest", j.id)))?;
            let m = self
                .images
                .manifest(repo, digest)
                .await
                .map_err(|e| BuildError::Internal(e.to_string()))?
                .ok_or_else(|| {
                    BuildError::Internal(format!("{digest} of job {} is not in {repo}", j.id))
                })?;
            children.push((j, m));
        }
        let (media_type, body) = if children.len() == 1 {
            let (_, m) = &children[0];
            (m.media_type.clone(), m.body.clone())
        } else {
            let manifests: Vec<_> = children
                .iter()
                .map(|(j, m)| {
                    let p: Platform = j.platform.parse().expect("validated at creation");
                    let mut platform = json!({ "architecture": p.architecture, "os": p.os });
                    if let Some(v) = &p.variant {
                        platform["variant"] = json!(v);
                    }
                    json!({
                        "mediaType": m.media_type,
                        "digest": m.digest,
                        "size": m.body.len(),
                        "platform": platform,
                    })
                })
                .collect();
            let index = json!({
                "schemaVersion": 2,
                "mediaType": dockyard_oci::media_type::OCI_INDEX,
                "manifests": manifests,
                "annotations": {
                    "org.opencontainers.image.revision": b.commit.clone().unwrap_or_default(),
                    "io.dockyard.build": b.id,
                }
            });
            (
                dockyard_oci::media_type::OCI_INDEX.to_string(),
                serde_json::to_vec(&index).expect("serializable"),
            )
        };
        let put = |tag: Option<String>| {
            let media_type = media_type.clone();
            let body = body.clone();
            async move {
                self.images
                    .put_manifest(repo, tag.as_deref(), &media_type, &body)
                    .await
                    .map_err(|e| BuildError::Internal(e.to_string()))
            }
        };
        let mut digest = put(None).await?;
        for t in &b.tags {
            digest = put(Some(t.clone())).await?;
        }
        for j in &detail.jobs {
            let _ = self.images.delete_tag(repo, &push_tag(&j.id)).await;
        }
        Ok(digest)
    }

    // ---- definitions ----

    pub async fn create_definition(
        &self,
        repository: &str,
        d: NewDefinition,
        by: &str,
    ) -> Result<DefinitionInfo> {
        if !dockyard_core::identity::valid_name(&d.name) {
            return Err(BuildError::Invalid(format!(
                "invalid definition name {:?}",
                d.name
            )));
        }
        if d.git_url.trim().is_empty() {
            return Err(BuildError::Invalid("git_url is required".into()));
        }
        if !self.settings.allow_local_git && !is_remote_git_url(d.git_url.trim()) {
            return Err(BuildError::Invalid(
                "git_url must be an https, http, ssh or git URL (or user@host:path); local paths need builds.allow_local_git".into(),
            ));
        }
        let dockerfile = d.dockerfile.unwrap_or_else(|| "Dockerfile".into());
        let context_dir = d.context_dir.unwrap_or_default();
        let platforms = if d.platforms.is_empty() {
            vec!["linux/amd64".to_string()]
        } else {
            d.platforms
        };
        validate_build_parts(
            &dockerfile,
            &context_dir,
            &platforms,
            d.target.as_deref(),
            &d.build_args,
        )?;
        let templates = if d.tag_templates.is_empty() {
            vec!["{branch}".into(), "{tag}".into(), "latest".into()]
        } else {
            d.tag_templates
        };
        if let Some(f) = &d.ref_filter {
            regex::Regex::new(f).map_err(|e| BuildError::Invalid(format!("ref_filter: {e}")))?;
        }
        if let Some(t) = &d.trigger_id {
            self.trigger(t).await?;
        }
        if let Some(s) = &d.base_check_schedule {
            crate::rebuild::validate_schedule(s)?;
        }
        let id = new_id();
        let r = sqlx::query(
            "INSERT INTO build_definitions (id, repository, name, trigger_id, git_url, git_username, \
             git_password, git_ssh_key, dockerfile, context_dir, build_args, target, platforms, \
             tag_templates, ref_filter, auto_rebuild, created_by, created_at, base_check_schedule) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
        .bind(&id)
        .bind(repository)
        .bind(&d.name)
        .bind(&d.trigger_id)
        .bind(d.git_url.trim())
        .bind(&d.git_username)
        .bind(&d.git_password)
        .bind(&d.git_ssh_key)
        .bind(&dockerfile)
        .bind(&context_dir)
        .bind(serde_json::to_string(&d.build_args).expect("serializable"))
        .bind(&d.target)
        .bind(serde_json::to_string(&platforms).expect("serializable"))
        .bind(serde_json::to_string(&templates).expect("serializable"))
        .bind(&d.ref_filter)
        .bind(d.auto_rebuild.unwrap_or(true) as i64)
        .bind(by)
        .bind(now_millis())
        .bind(&d.base_check_schedule)
        .execute(&self.db.write)
        .await;
        match r {
            Ok(_) => self.definition(&id).await,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(BuildError::Conflict(
                format!("definition {} already exists in {repository}", d.name),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn definition(&self, id: &str) -> Result<DefinitionInfo> {
        let row = sqlx::query("SELECT * FROM build_definitions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.read)
            .await?
            .ok_or_else(|| BuildError::NotFound(format!("build definition {id}")))?;
        Ok(definition_info(&row)?)
    }

    pub async fn definitions(&self, repository: &str) -> Result<Vec<DefinitionInfo>> {
        let rows =
            sqlx::query("SELECT * FROM build_definitions WHERE repository = $1 ORDER BY name")
                .bind(repository)
                .fetch_all(&self.db.read)
                .await?;
        Ok(rows
            .iter()
            .map(definition_info)
            .collect::<sqlx::Result<_>>()?)
    }

    pub async fn delete_definition(&self, id: &str) -> Result<()> {
        let n = sqlx::query("DELETE FROM build_definitions WHERE id = $1")
            .bind(id)
            .execute(&self.db.write)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(BuildError::NotFound(format!("build definition {id}")));
        }
        Ok(())
    }

    /// Starts a definition for a ref and/or commit (manual rebuild).
    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is a distinct fact of the trigger"
    )]
    pub async fn run_definition(
        &self,
        def: &DefinitionInfo,
        git_ref: Option<String>,
        commit: Option<String>,
        trigger_kind: &str,
        detail: String,
        by: &str,
        received_at: i64,
    ) -> Result<BuildInfo> {
        let git_ref = git_ref.map(|r| {
            if r.starts_with("refs/") {
                r
            } else {
                format!("refs/heads/{r}")
            }
        });
        if let Some(c) = &commit
            && (c.len() < 7 || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(BuildError::Invalid(format!("{c:?} is not a commit id")));
        }
        if git_ref.is_none() && commit.is_none() {
            return Err(BuildError::Invalid(
                "give a ref (branch) or a commit".into(),
            ));
        }
        let push = Push {
            git_ref: git_ref.clone().unwrap_or_default(),
            commit: commit.clone().unwrap_or_default(),
            default_branch: None,
            clone_url: None,
        };
        self.start_from_definition(def, &push, trigger_kind, detail, by, received_at)
            .await
    }

    async fn start_from_definition(
        &self,
        def: &DefinitionInfo,
        push: &Push,
        trigger_kind: &str,
        detail: String,
        by: &str,
        received_at: i64,
    ) -> Result<BuildInfo> {
        let id = new_id();
        let platforms = def
            .platforms
            .iter()
            .map(|p| p.parse().expect("validated at creation"))
            .collect();
        let tags = tags_for_push(&def.tag_templates, push, &id);
        let nb = NewBuild {
            repository: def.repository.clone(),
            definition_id: Some(def.id.clone()),
            trigger_kind: trigger_kind.to_string(),
            trigger_detail: detail,
            source: JobSource::Git {
                url: def.git_url.clone().unwrap_or_default(),
                commit: push.commit.clone(),
                git_ref: (!push.git_ref.is_empty()).then(|| push.git_ref.clone()),
                username: None,
                password: None,
                ssh_key: None,
            },
            git_ref: (!push.git_ref.is_empty()).then(|| push.git_ref.clone()),
            commit: (!push.commit.is_empty()).then(|| push.commit.clone()),
            dockerfile: def.dockerfile.clone(),
            context_dir: def.context_dir.clone(),
            build_args: def.build_args.clone(),
            target: def.target.clone(),
            platforms,
            tags,
            created_by: by.to_string(),
            received_at,
        };
        self.create_build_with_id(id, nb).await
    }

    // ---- triggers ----

    /// Creates a trigger; returns it and its secret (shown once).
    pub async fn create_trigger(
        &self,
        namespace: &str,
        kind: &str,
        by: &str,
    ) -> Result<(TriggerInfo, String)> {
        if !webhook::KINDS.contains(&kind) {
            return Err(BuildError::Invalid(format!(
                "trigger kind must be one of {}",
                webhook::KINDS.join(", ")
            )));
        }
        let id = new_id();
        let (_, secret, _) = dockyard_core::identity::mint_opaque("dyw");
        sqlx::query(
            "INSERT INTO build_triggers (id, namespace, kind, secret, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(namespace)
        .bind(kind)
        .bind(&secret)
        .bind(by)
        .bind(now_millis())
        .execute(&self.db.write)
        .await?;
        Ok((self.trigger(&id).await?, secret))
    }

    pub async fn trigger(&self, id: &str) -> Result<TriggerInfo> {
        let r = sqlx::query(
            "SELECT id, namespace, kind, created_by, created_at FROM build_triggers WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db.read)
        .await?
        .ok_or_else(|| BuildError::NotFound(format!("trigger {id}")))?;
        trigger_info(&r)
    }

    pub async fn triggers(&self, namespace: &str) -> Result<Vec<TriggerInfo>> {
        let rows = sqlx::query(
            "SELECT id, namespace, kind, created_by, created_at FROM build_triggers \
             WHERE namespace = $1 ORDER BY created_at",
        )
        .bind(namespace)
        .fetch_all(&self.db.read)
        .await?;
        rows.iter().map(trigger_info).collect()
    }

    pub async fn delete_trigger(&self, id: &str) -> Result<()> {
        let n = sqlx::query("DELETE FROM build_triggers WHERE id = $1")
            .bind(id)
            .execute(&self.db.write)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(BuildError::NotFound(format!("trigger {id}")));
        }
        Ok(())
    }

    pub async fn deliveries(&self, trigger_id: &str, limit: u32) -> Result<Vec<DeliveryInfo>> {
        let rows = sqlx::query(
            "SELECT id, received_at, address, event, git_ref, commit_sha, outcome, message, builds \
             FROM trigger_deliveries WHERE trigger_id = $1 ORDER BY received_at DESC LIMIT $2",
        )
        .bind(trigger_id)
        .bind(limit.clamp(1, 500) as i64)
        .fetch_all(&self.db.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryInfo {
                    id: r.try_get(0)?,
                    received_at: r.try_get(1)?,
                    address: r.try_get(2)?,
                    event: r.try_get(3)?,
                    git_ref: r.try_get(4)?,
                    commit: r.try_get(5)?,
                    outcome: r.try_get(6)?,
                    message: r.try_get(7)?,
                    builds: strings(&r.try_get::<String, _>(8)?),
                })
            })
            .collect()
    }

    /// Handles one webhook delivery: verify, record, start the builds of
    /// every matching definition. Rejections are recorded too and returned
    /// as [`BuildError::Unauthenticated`] (bad signature) or `Invalid`.
    pub async fn webhook(
        &self,
        trigger_id: &str,
        headers: &http::HeaderMap,
        body: &[u8],
        address: &str,
    ) -> Result<Vec<BuildInfo>> {
        let received_at = now_millis();
        let row = sqlx::query("SELECT kind, secret FROM build_triggers WHERE id = $1")
            .bind(trigger_id)
            .fetch_optional(&self.db.read)
            .await?
            .ok_or_else(|| BuildError::NotFound(format!("trigger {trigger_id}")))?;
        let kind: String = row.try_get(0)?;
        let secret: String = row.try_get(1)?;
        let event = ["x-github-event", "x-gitlab-event"]
            .iter()
            .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
            .unwrap_or("push")
            .chars()
            .take(64)
            .collect::<String>();
        let record =
            |outcome: &'static str, message: String, push: Option<&Push>, builds: Vec<String>| {
                let event = event.clone();
                let git_ref = push.map(|p| p.git_ref.clone());
                let commit = push.map(|p| p.commit.clone());
                async move {
                    sqlx::query(
                    "INSERT INTO trigger_deliveries (id, trigger_id, received_at, address, event, \
                     git_ref, commit_sha, outcome, message, builds) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(new_id())
                .bind(trigger_id)
                .bind(received_at)
                .bind(address)
                .bind(event)
                .bind(git_ref)
                .bind(commit)
                .bind(outcome)
                .bind(message)
                .bind(serde_json::to_string(&builds).expect("serializable"))
                .execute(&self.db.write)
                .await
                }
            };
        let push = match webhook::verify_and_parse(&kind, &secret, headers, body) {
            Ok(Delivery::Push(p)) => p,
            Ok(Delivery::Ignored(why)) => {
                record("ignored", why, None, vec![]).await?;
                return Ok(vec![]);
            }
            Err(e) => {
                tracing::warn!(trigger = %trigger_id, address, error = %e, "webhook rejected");
                record("rejected", e.to_string(), None, vec![]).await?;
                return Err(match e {
                    webhook::Rejection::Malformed(m) => BuildError::Invalid(m),
                    _ => BuildError::Unauthenticated,
                });
            }
        };
        let defs = sqlx::query("SELECT * FROM build_definitions WHERE trigger_id = $1")
            .bind(trigger_id)
            .fetch_all(&self.db.read)
            .await?;
        let short_ref = push.git_ref.trim_start_matches("refs/");
        let mut started = Vec::new();
        for d in defs.iter().map(definition_info) {
            let d = d?;
            if let Some(f) = &d.ref_filter {
                let re = regex::Regex::new(f)
                    .map_err(|e| BuildError::Internal(format!("stored ref_filter: {e}")))?;
                if !re.is_match(short_ref) {
                    continue;
                }
            }
            let detail = format!(
                "{kind} push of {} at {}",
                push.git_ref,
                &push.commit[..push.commit.len().min(12)]
            );
            started.push(
                self.start_from_definition(
                    &d,
                    &push,
                    "webhook",
                    detail,
                    &d.created_by,
                    received_at,
                )
                .await?,
            );
        }
        let ids: Vec<String> = started.iter().map(|b| b.id.clone()).collect();
        let message = if ids.is_empty() {
            format!("no build definition matches {short_ref}")
        } else {
            format!("started {} build(s)", ids.len())
        };
        record(
            if ids.is_empty() {
                "ignored"
            } else {
                "accepted"
            },
            message,
            Some(&push),
            ids,
        )
        .await?;
        Ok(started)
    }
}

fn trigger_info(r: &AnyRow) -> Result<TriggerInfo> {
    let id: String = r.try_get(0)?;
    Ok(TriggerInfo {
        webhook_path: format!("/api/v1/triggers/{id}/webhook"),
        id,
        namespace: r.try_get(1)?,
        kind: r.try_get(2)?,
        created_by: r.try_get(3)?,
        created_at: r.try_get(4)?,
    })
}

/// Whether a git URL names a remote repository (not a path or `file://`).
pub fn is_remote_git_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    if ["https://", "http://", "ssh://", "git://"]
        .iter()
        .any(|p| lower.starts_with(p))
    {
        return true;
    }
    // scp-like `user@host:path`, not a path with a colon.
    match url.split_once(':') {
        Some((left, _)) => {
            left.contains('@') && !left.contains('/') && !left.starts_with('.') && !left.is_empty()
        }
        None => false,
    }
}

/// Ends the jobs of a build that no executor took yet.
fn cancel_queued_jobs(
    build_id: &str,
    now: i64,
) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(
        "UPDATE build_jobs SET phase = 'cancelled', finished_at = $1 \
         WHERE build_id = $2 AND phase = 'queued'",
    )
    .bind(now)
    .bind(build_id)
}

/// The temporary tag a job pushes its platform image under.
pub fn push_tag(job_id: &str) -> String {
    format!("dockyard-build-{job_id}")
}

/// Writes a `build.*` event for a build inside the transaction that changed
/// it (as its last statements, see `dockyard_core::events`).
pub(crate) async fn build_event(
    conn: &mut sqlx::AnyConnection,
    backend: dockyard_core::Backend,
    build_id: &str,
    kind: &'static str,
) -> sqlx::Result<()> {
    let r = sqlx::query(
        "SELECT repository, definition_id, trigger_kind, trigger_detail, tags, status, error, \
         manifest_digest, created_by FROM builds WHERE id = $1",
    )
    .bind(build_id)
    .fetch_one(&mut *conn)
    .await?;
    let repository: String = r.try_get(0)?;
    let tags: Vec<String> = serde_json::from_str(&r.try_get::<String, _>(4)?).unwrap_or_default();
    let created_by: String = r.try_get(8)?;
    let mut e = NewEvent::new(kind, &repository)
        .actor(Some(&created_by))
        .data(json!({
            "build_id": build_id,
            "definition_id": r.try_get::<Option<String>, _>(1)?,
            "trigger_kind": r.try_get::<String, _>(2)?,
            "trigger_detail": r.try_get::<String, _>(3)?,
            "tags": tags,
            "status": r.try_get::<String, _>(5)?,
            "error": r.try_get::<Option<String>, _>(6)?,
        }));
    e.digest = r.try_get(7)?;
    events::append(conn, backend, &[e]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_from_templates() {
        let templates: Vec<String> = ["{branch}", "{tag}", "latest", "sha-{short_sha}"]
            .map(String::from)
            .to_vec();
        let push = Push {
            git_ref: "refs/heads/main".into(),
            commit: "0123456789abcdef".into(),
            default_branch: Some("main".into()),
            clone_url: None,
        };
        assert_eq!(
            tags_for_push(&templates, &push, "b1"),
            ["main", "latest", "sha-0123456"]
        );
        let feature = Push {
            git_ref: "refs/heads/feature/x".into(),
            ..push.clone()
        };
        assert_eq!(
            tags_for_push(&templates, &feature, "b1"),
            ["feature-x", "sha-0123456"]
        );
        let tag = Push {
            git_ref: "refs/tags/v1.2".into(),
            ..push
        };
        assert_eq!(
            tags_for_push(&templates, &tag, "b1"),
            ["v1.2", "sha-0123456"]
        );
    }

    #[test]
    fn remote_git_urls() {
        for ok in [
            "https://github.com/a/b.git",
            "ssh://git@host/a.git",
            "git://host/a",
            "git@github.com:a/b.git",
        ] {
            assert!(is_remote_git_url(ok), "{ok}");
        }
        for local in [
            "/srv/git/a",
            "file:///srv/a",
            "./a",
            "a/b",
            "C:/x",
            "../x@y:z",
        ] {
            assert!(!is_remote_git_url(local), "{local}");
        }
    }

    #[test]
    fn build_parts() {
        let none = BTreeMap::new();
        let p = ["linux/amd64".to_string()];
        assert!(validate_build_parts("Dockerfile", "", &p, None, &none).is_ok());
        assert!(validate_build_parts("../Dockerfile", "", &p, None, &none).is_err());
        assert!(validate_build_parts("Dockerfile", "/abs", &p, None, &none).is_err());
        assert!(validate_build_parts("Dockerfile", "", &[], None, &none).is_err());
        assert!(
            validate_build_parts("Dockerfile", "", &["linux".to_string()], None, &none).is_err()
        );
        let twice = ["linux/amd64".to_string(), "linux/amd64".to_string()];
        assert!(validate_build_parts("Dockerfile", "", &twice, None, &none).is_err());
        let bad_arg: BTreeMap<String, String> = [("A B".to_string(), "x".to_string())].into();
        assert!(validate_build_parts("Dockerfile", "", &p, None, &bad_arg).is_err());
    }
}
