//! Builds: definitions, manual runs, uploaded-context builds (what
//! `dockyard build` calls), listing, cancellation and live logs (Server-Sent
//! Events). Repository roles decide: read to see builds and logs, write to
//! start and cancel, admin to manage definitions (they hold git credentials).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dockyard_buildmanager::logs::{Cursor, LogEvent};
use dockyard_buildmanager::{BuildDetail, BuildInfo, DefinitionInfo, NewBuild, NewDefinition};
use dockyard_core::identity::{Principal, Role};
use dockyard_oci::build::JobSource;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiState, Caller, ClientAddress};

pub(super) async fn need(
    state: &ApiState,
    caller: &Caller,
    repo: &str,
    role: Role,
) -> Result<(), ApiError> {
    let (have, _) = super::repositories::role(state, &caller.0, repo).await?;
    if have >= role {
        Ok(())
    } else if caller.0 == Principal::Anonymous {
        Err(ApiError::unauthorized())
    } else {
        Err(ApiError::forbidden())
    }
}

#[derive(Deserialize, IntoParams)]
pub struct ListQuery {
    /// Page size (1 to 100, default 20).
    n: Option<u32>,
    /// `created_at` of the last build of the previous page.
    before: Option<i64>,
}

/// Builds of a repository, newest first.
#[utoipa::path(get, path = "/api/v1/repositories/{namespace}/{name}/builds", tag = "builds",
    params(("namespace" = String, Path), ("name" = String, Path), ListQuery),
    responses((status = 200, description = "A page of builds", body = Vec<BuildInfo>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let repo = format!("{ns}/{name}");
    need(&state, &caller, &repo, Role::Read).await?;
    let n = q.n.unwrap_or(20);
    if !(1..=100).contains(&n) {
        return Err(ApiError::invalid("n must be from 1 to 100"));
    }
    let builds = state.builds.builds(&repo, n, q.before).await?;
    let next = (builds.len() == n as usize).then(|| builds[builds.len() - 1].created_at);
    Ok(Json(json!({ "builds": builds, "next_before": next })))
}

#[derive(Deserialize, IntoParams)]
pub struct UploadQuery {
    /// Dockerfile path inside the context (default `Dockerfile`).
    dockerfile: Option<String>,
    /// Target stage.
    target: Option<String>,
    /// Comma-separated platforms (default `linux/amd64`).
    platforms: Option<String>,
    /// Comma-separated tags.
    tags: Option<String>,
    /// Build arguments as a JSON object of strings.
    build_args: Option<String>,
}

/// Builds an uploaded context (`.tar` or `.tar.gz` body) and tags the
/// result in this repository (write needed; the repository is created when
/// the caller may create it).
#[utoipa::path(post, path = "/api/v1/repositories/{namespace}/{name}/builds/context", tag = "builds",
    params(("namespace" = String, Path), ("name" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/gzip"),
    responses((status = 201, description = "Queued", body = BuildInfo), (status = 413, description = "Context too large")))]
pub async fn upload(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<(StatusCode, Json<BuildInfo>), ApiError> {
    let received_at = dockyard_core::now_millis();
    let who = caller.required()?;
    let repo = format!("{ns}/{name}");
    if repo.parse::<dockyard_oci::RepoName>().is_err() {
        return Err(ApiError::invalid("invalid repository name"));
    }
    if state.identity.repository(&repo).await?.is_none() {
        // Creating a repository needs admin on its namespace.
        if state.identity.namespace_role(who, &ns).await? != Some(Role::Admin) {
            return Err(ApiError::not_found("repository"));
        }
        state
            .identity
            .create_repository(&repo, "private", "", who.name())
            .await?;
        state
            .identity
            .audit(who, "repository.created", &repo, &addr, true, None)
            .await?;
    }
    need(&state, &caller, &repo, Role::Write).await?;
    let dockerfile = q.dockerfile.unwrap_or_else(|| "Dockerfile".into());
    let platforms: Vec<String> = q
        .platforms
        .as_deref()
        .unwrap_or("linux/amd64")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let tags: Vec<String> = q
        .tags
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let build_args: BTreeMap<String, String> = match &q.build_args {
        Some(s) => {
            serde_json::from_str(s).map_err(|e| ApiError::invalid(format!("build_args: {e}")))?
        }
        None => BTreeMap::new(),
    };
    let platforms = dockyard_buildmanager::builds::validate_build_parts(
        &dockerfile,
        "",
        &platforms,
        q.target.as_deref(),
        &build_args,
    )?;
    dockyard_buildmanager::builds::validate_tags(&tags)?;
    let nb = NewBuild {
        repository: repo.clone(),
        definition_id: None,
        trigger_kind: "upload".into(),
        trigger_detail: format!("context uploaded by {}", who.name()),
        source: JobSource::Context,
        git_ref: None,
        commit: None,
        dockerfile,
        context_dir: String::new(),
        build_args,
        target: q.target,
        platforms,
        tags,
        created_by: who.name().to_string(),
        received_at,
    };
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(|e| std::io::Error::other(e.to_string())));
    let build = state.builds.upload_build(nb, stream).await?;
    state
        .identity
        .audit(who, "build.started", &repo, &addr, true, Some(&build.id))
        .await?;
    Ok((StatusCode::CREATED, Json(build)))
}

async fn build_repo(state: &ApiState, id: &str) -> Result<BuildDetail, ApiError> {
    Ok(state.builds.build(id).await?)
}

/// A build with its platform jobs (phases, timings, executor, digests,
/// base images).
#[utoipa::path(get, path = "/api/v1/builds/{id}", tag = "builds",
    params(("id" = String, Path)),
    responses((status = 200, description = "The build", body = BuildDetail), (status = 404, description = "Unknown or not visible")))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<BuildDetail>, ApiError> {
    let b = build_repo(&state, &id).await?;
    need(&state, &caller, &b.build.repository, Role::Read)
        .await
        .map_err(|e| hide(e, "build"))?;
    Ok(Json(b))
}

/// Whoever may not read the repository does not learn that a build exists.
fn hide(e: ApiError, what: &str) -> ApiError {
    if e.status == StatusCode::NOT_FOUND {
        ApiError::not_found(what)
    } else {
        e
    }
}

/// Cancels a build (write on its repository).
#[utoipa::path(post, path = "/api/v1/builds/{id}/cancel", tag = "builds",
    params(("id" = String, Path)),
    responses((status = 200, description = "Cancellation requested", body = BuildInfo), (status = 409, description = "Already ended")))]
pub async fn cancel(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
) -> Result<Json<BuildInfo>, ApiError> {
    let b = build_repo(&state, &id).await?;
    need(&state, &caller, &b.build.repository, Role::Write)
        .await
        .map_err(|e| hide(e, "build"))?;
    let info = state.builds.cancel(&id).await?;
    state
        .identity
        .audit(
            &caller.0,
            "build.cancelled",
            &b.build.repository,
            &addr,
            true,
            Some(&id),
        )
        .await?;
    Ok(Json(info))
}

#[derive(Deserialize, IntoParams)]
pub struct LogQuery {
    /// Stream as Server-Sent Events until the build ends (also chosen by
    /// `Accept: text/event-stream`).
    follow: Option<bool>,
}

/// The build's logs: plain text of every job, or a live Server-Sent Events
/// stream (`log`, `phase` and a final `end` event, JSON data).
#[utoipa::path(get, path = "/api/v1/builds/{id}/logs", tag = "builds",
    params(("id" = String, Path), LogQuery),
    responses((status = 200, description = "text/plain, or text/event-stream when following")))]
pub async fn logs(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let b = build_repo(&state, &id).await?;
    need(&state, &caller, &b.build.repository, Role::Read)
        .await
        .map_err(|e| hide(e, "build"))?;
    let wants_sse = q.follow.unwrap_or(false)
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_sse {
        let mut text = String::new();
        for j in &b.jobs {
            let log = state.builds.job_log_text(&id, &j.id).await?;
            for line in log.lines() {
                if b.jobs.len() > 1 {
                    text.push_str(&format!("[{}] ", j.platform));
                }
                text.push_str(line);
                text.push('\n');
            }
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    let manager = state.builds.clone();
    let stream = futures::stream::unfold(
        (
            manager,
            Cursor::default(),
            id,
            std::collections::VecDeque::new(),
        ),
        |(m, mut cursor, id, mut pending)| async move {
            loop {
                if let Some(ev) = pending.pop_front() {
                    return Some((
                        Ok::<_, Infallible>(sse_event(&ev)),
                        (m, cursor, id, pending),
                    ));
                }
                if cursor.ended() {
                    return None;
                }
                match m.read_build(&id, &mut cursor).await {
                    Ok(events) if !events.is_empty() => pending.extend(events),
                    Ok(_) => m.wait_progress(Duration::from_secs(1)).await,
                    Err(e) => {
                        tracing::warn!(build = %id, error = %e, "log stream failed");
                        return None;
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn sse_event(ev: &LogEvent) -> Event {
    let name = match ev {
        LogEvent::Log { .. } => "log",
        LogEvent::Phase { .. } => "phase",
        LogEvent::End { .. } => "end",
    };
    Event::default()
        .event(name)
        .data(serde_json::to_string(ev).expect("serializable"))
}

// ---- definitions ----

/// Build definitions of a repository (read).
#[utoipa::path(get, path = "/api/v1/repositories/{namespace}/{name}/build-definitions", tag = "builds",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "Definitions", body = Vec<DefinitionInfo>)))]
pub async fn list_definitions(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let repo = format!("{ns}/{name}");
    need(&state, &caller, &repo, Role::Read).await?;
    let defs = state.builds.definitions(&repo).await?;
    Ok(Json(json!({ "definitions": defs })))
}

/// Creates a build definition (admin on the repository).
#[utoipa::path(post, path = "/api/v1/repositories/{namespace}/{name}/build-definitions", tag = "builds",
    params(("namespace" = String, Path), ("name" = String, Path)), request_body = NewDefinition,
    responses((status = 201, description = "Created", body = DefinitionInfo)))]
pub async fn create_definition(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path((ns, name)): Path<(String, String)>,
    Json(body): Json<NewDefinition>,
) -> Result<(StatusCode, Json<DefinitionInfo>), ApiError> {
    let who = caller.required()?;
    let repo = format!("{ns}/{name}");
    need(&state, &caller, &repo, Role::Admin).await?;
    if let Some(t) = &body.trigger_id {
        // The trigger must belong to the repository's namespace.
        let trigger = state.builds.trigger(t).await?;
        if trigger.namespace != ns {
            return Err(ApiError::invalid(
                "the trigger belongs to another namespace",
            ));
        }
    }
    let def = state
        .builds
        .create_definition(&repo, body, who.name())
        .await?;
    state
        .identity
        .audit(
            who,
            "build_definition.created",
            &repo,
            &addr,
            true,
            Some(&def.name),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(def)))
}

pub(super) async fn definition_with_role(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    role: Role,
) -> Result<DefinitionInfo, ApiError> {
    let def = state.builds.definition(id).await?;
    need(state, caller, &def.repository, role)
        .await
        .map_err(|e| hide(e, "build definition"))?;
    Ok(def)
}

/// A build definition (read).
#[utoipa::path(get, path = "/api/v1/build-definitions/{id}", tag = "builds",
    params(("id" = String, Path)),
    responses((status = 200, description = "The definition", body = DefinitionInfo)))]
pub async fn get_definition(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DefinitionInfo>, ApiError> {
    Ok(Json(
        definition_with_role(&state, &caller, &id, Role::Read).await?,
    ))
}

/// Deletes a build definition (admin).
#[utoipa::path(delete, path = "/api/v1/build-definitions/{id}", tag = "builds",
    params(("id" = String, Path)),
    responses((status = 204, description = "Deleted")))]
pub async fn delete_definition(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let def = definition_with_role(&state, &caller, &id, Role::Admin).await?;
    state.builds.delete_definition(&id).await?;
    state
        .identity
        .audit(
            &caller.0,
            "build_definition.deleted",
            &def.repository,
            &addr,
            true,
            Some(&def.name),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
pub struct RunDefinition {
    /// Branch (`main`) or full ref (`refs/tags/v1`).
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    /// Commit to build (default: the head of `ref`).
    commit: Option<String>,
}

/// Starts a definition by hand: rebuild this commit or branch (write).
#[utoipa::path(post, path = "/api/v1/build-definitions/{id}/run", tag = "builds",
    params(("id" = String, Path)), request_body = RunDefinition,
    responses((status = 201, description = "Queued", body = BuildInfo)))]
pub async fn run_definition(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ClientAddress(addr): ClientAddress,
    Path(id): Path<String>,
    Json(body): Json<RunDefinition>,
) -> Result<(StatusCode, Json<BuildInfo>), ApiError> {
    let received_at = dockyard_core::now_millis();
    let def = definition_with_role(&state, &caller, &id, Role::Write).await?;
    let who = caller.required()?;
    let what = body
        .commit
        .clone()
        .or_else(|| body.git_ref.clone())
        .unwrap_or_default();
    let build = state
        .builds
        .run_definition(
            &def,
            body.git_ref,
            body.commit,
            "manual",
            format!("started by {} for {what}", who.name()),
            who.name(),
            received_at,
        )
        .await?;
    state
        .identity
        .audit(
            who,
            "build.started",
            &def.repository,
            &addr,
            true,
            Some(&build.id),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(build)))
}
