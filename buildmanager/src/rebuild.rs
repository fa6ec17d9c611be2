//! Base-image rebuilds: when a tag that a definition's image was built FROM
//! moves, the definition is built again.
//!
//! - **What depends on what** is learnt from builds, not declared: each
//!   successful job records the base references it resolved
//!   (`build_base_images`), and a definition depends on the bases of its
//!   **latest successful build**. A definition's outputs are the
//!   `repository:tag`s of that build (and of its builds in progress), so
//!   "my base is your output" links definitions into chains.
//! - **Moves** arrive as `tag.created` / `tag.moved` events (consumer
//!   [`CONSUMER`], in the transaction that moves its position) for this
//!   registry's tags, and from [`crate::upstream`] for other registries. A
//!   move of a base to a digest other than the one recorded enqueues one
//!   `pending` row of `base_rebuilds` per dependent definition and base, due
//!   after `builds.rebuild_debounce`; later moves in the window update the
//!   target digest and push the due time back, so a burst of pushes is one
//!   rebuild.
//! - **The scheduler** starts due rows: a definition waits while one it
//!   depends on (directly or transitively) has a pending rebuild or a build
//!   in progress, or while it is being built itself; a definition in a
//!   dependency cycle is refused (named in the row's message, and logged);
//!   one switched off (`auto_rebuild`) is refused; one whose latest build
//!   already used the new digest is superseded. A started rebuild runs the
//!   definition on the ref of its latest successful build with trigger
//!   `base_image`. Its pushes move its own tags, which rebuild the next
//!   level of a chain through the same path.
//!
//! Several replicas: the consumer runs where its lease is held; rows are
//! claimed by compare-and-set (`pending` → `started`), so one replica starts
//! a given rebuild.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dockyard_core::db::placeholders;
use dockyard_core::events::{self, ConsumerOptions, Event, Handler, kinds};
use dockyard_core::now_millis;
use serde::{Deserialize, Deserializer, Serialize};
use sqlx::{AnyConnection, Row};

use crate::builds::push_tag;
use crate::{BuildError, BuildManager, Result, new_id};

/// Name of the event consumer that turns tag moves into rebuilds.
pub const CONSUMER: &str = "base-rebuild";

/// `builds.trigger_kind` of the builds started here.
pub const TRIGGER_KIND: &str = "base_image";

/// The latest successful build of the definition `d` (a subquery; the
/// `builds_definition` index answers it).
pub(crate) const LATEST_BUILD: &str = "(SELECT b2.id FROM builds b2 \
     WHERE b2.definition_id = d.id AND b2.status = 'complete' \
     ORDER BY b2.finished_at DESC, b2.id DESC LIMIT 1)";

/// How often the scheduler looks for due rebuilds (it is also woken when
/// rows are written).
const TICK: Duration = Duration::from_millis(500);

/// One auto-rebuild decision.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RebuildInfo {
    pub id: String,
    pub definition_id: String,
    pub definition_name: Option<String>,
    pub repository: String,
    /// The base as the build recorded it (`host/repository:tag`).
    pub base_reference: String,
    /// The digest the definition's latest build used (null: unknown).
    pub from_digest: Option<String>,
    /// The digest the base moved to.
    pub to_digest: String,
    /// `pending` (waiting for the debounce window or for the definitions it
    /// depends on), `started` (see `build_id`), `refused` (cycle, switched
    /// off, nothing to rebuild; see `message`) or `superseded` (a build
    /// already used the new digest).
    pub state: String,
    /// When a pending rebuild may start (Unix ms).
    pub due_at: i64,
    pub build_id: Option<String>,
    pub message: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A change of a definition's rebuild settings; absent fields are kept.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefinitionUpdate {
    /// Rebuild when a base image moves.
    #[serde(default)]
    pub auto_rebuild: Option<bool>,
    /// Cron expression with seconds (`sec min hour day month weekday`) for
    /// checking base images in other registries; `null` returns to the
    /// server's `builds.base_check_schedule`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub base_check_schedule: Option<Option<String>>,
}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Parses a cron schedule with seconds, or says why not (400).
pub fn validate_schedule(s: &str) -> Result<cron::Schedule> {
    s.parse::<cron::Schedule>().map_err(|e| {
        BuildError::Invalid(format!(
            "base_check_schedule {s:?} is not a cron expression with seconds \
             (sec min hour day month weekday): {e}"
        ))
    })
}

/// `host/repository:tag` split in three; `None` for references pinned by
/// digest (they never move) or without a tag.
pub(crate) fn split_reference(r: &str) -> Option<(&str, &str, &str)> {
    if r.contains('@') {
        return None;
    }
    let (host, rest) = r.split_once('/')?;
    let (repository, tag) = rest.rsplit_once(':')?;
    if host.is_empty() || repository.is_empty() || tag.is_empty() || repository.contains(':') {
        return None;
    }
    Some((host, repository, tag))
}

/// `host[:port]` split, IPv6 literals in brackets included.
fn host_port(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[')
        && let Some((h, after)) = rest.split_once(']')
    {
        return (h, after.strip_prefix(':'));
    }
    match host.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    }
}

/// Whether a registry host is on the loopback interface.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let (h, _) = host_port(host);
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn rebuild_info(r: &sqlx::any::AnyRow) -> sqlx::Result<RebuildInfo> {
    Ok(RebuildInfo {
        id: r.try_get(0)?,
        definition_id: r.try_get(1)?,
        definition_name: r.try_get(2)?,
        repository: r.try_get(3)?,
        base_reference: r.try_get(4)?,
        from_digest: r.try_get(5)?,
        to_digest: r.try_get(6)?,
        state: r.try_get(7)?,
        due_at: r.try_get(8)?,
        build_id: r.try_get(9)?,
        message: r.try_get(10)?,
        created_at: r.try_get(11)?,
        updated_at: r.try_get(12)?,
    })
}

/// A definition's latest successful build.
#[derive(Debug, Clone)]
struct Latest {
    id: String,
    git_ref: Option<String>,
    commit: Option<String>,
}

impl BuildManager {
    /// The host names under which engines reach this registry: the
    /// configured one, and its loopback aliases when it is on loopback.
    pub(crate) fn local_hosts(&self) -> Vec<String> {
        let me = self.settings.registry_host.to_ascii_lowercase();
        let mut hosts = vec![me.clone()];
        if is_loopback_host(&me)
            && let (_, Some(port)) = host_port(&me)
        {
            for h in ["localhost", "127.0.0.1", "[::1]"] {
                let alias = format!("{h}:{port}");
                if !hosts.contains(&alias) {
                    hosts.push(alias);
                }
            }
        }
        hosts
    }

    pub(crate) fn is_local_host(&self, host: &str) -> bool {
        self.local_hosts().contains(&host.to_ascii_lowercase())
    }

    /// A base as users write it: `repository:tag` for this registry's
    /// images, the whole reference for others.
    pub(crate) fn display_reference(&self, reference: &str) -> String {
        match split_reference(reference) {
            Some((host, repo, tag)) if self.is_local_host(host) => format!("{repo}:{tag}"),
            _ => reference.to_string(),
        }
    }

    /// Starts the base-image rebuild machinery until `shutdown`: the
    /// [`CONSUMER`] of tag events, the scheduler of due rebuilds, and the
    /// upstream checks. The handle ends when all three have stopped.
    ///
    /// The first start reads the event log from its end: pushes made
    /// before rebuilds existed are history, not moves to react to.
    pub fn start_rebuilds(
        self: &Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            if let Err(e) = sqlx::query(
                "INSERT INTO event_consumers (name, position, owner, lease_expires, updated_at) \
                 SELECT $1, COALESCE(MAX(id), 0), NULL, 0, $2 FROM events WHERE TRUE \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(CONSUMER)
            .bind(now_millis())
            .execute(&manager.db.write)
            .await
            {
                tracing::warn!(error = %e, "cannot register the base-rebuild event consumer");
            }
            let consumer = tokio::spawn(events::run_consumer(
                manager.db.clone(),
                CONSUMER,
                Arc::new(RebuildConsumer(manager.clone())),
                ConsumerOptions::default(),
                shutdown.clone(),
            ));
            let upstream = tokio::spawn(manager.clone().run_upstream_checks(shutdown.clone()));
            loop {
                let woken = manager.rebuilds_ready.notified();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = woken => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
                if let Err(e) = manager.start_due_rebuilds().await {
                    tracing::warn!(error = %e, "base-image rebuild scheduling failed");
                }
            }
            let _ = consumer.await;
            let _ = upstream.await;
        })
    }

    /// The latest successful build of a definition.
    async fn latest_build(
        conn: &mut AnyConnection,
        definition: &str,
    ) -> sqlx::Result<Option<Latest>> {
        let row = sqlx::query(
            "SELECT id, git_ref, commit_sha FROM builds WHERE definition_id = $1 \
             AND status = 'complete' ORDER BY finished_at DESC, id DESC LIMIT 1",
        )
        .bind(definition)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| {
            Ok(Latest {
                id: r.try_get(0)?,
                git_ref: r.try_get(1)?,
                commit: r.try_get(2)?,
            })
        })
        .transpose()
    }

    /// Records that the base known as any of `references` (aliases of one
    /// tag) points to `digest` since `at` (Unix ms): each definition with
    /// `auto_rebuild` on whose latest successful build used it at another
    /// digest gets a pending rebuild, due `rebuild_debounce` after `at`.
    /// Runs inside the caller's transaction. Returns how many rows were
    /// written.
    pub(crate) async fn enqueue_rebuilds(
        &self,
        conn: &mut AnyConnection,
        references: &[String],
        digest: &str,
        at: i64,
    ) -> sqlx::Result<usize> {
        if references.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "SELECT DISTINCT b.definition_id FROM build_base_images i \
             JOIN builds b ON b.id = i.build_id \
             WHERE b.definition_id IS NOT NULL AND b.status = 'complete' AND i.reference IN ({})",
            placeholders(1, references.len())
        );
        let mut q = sqlx::query(&sql);
        for r in references {
            q = q.bind(r);
        }
        let definitions: Vec<String> = q
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<sqlx::Result<_>>()?;
        let now = now_millis();
        let due = at.max(0) + self.settings.rebuild_debounce.as_millis() as i64;
        let mut written = 0;
        for definition in definitions {
            let Some(def) =
                sqlx::query("SELECT repository, auto_rebuild FROM build_definitions WHERE id = $1")
                    .bind(&definition)
                    .fetch_optional(&mut *conn)
                    .await?
            else {
                continue;
            };
            let repository: String = def.try_get(0)?;
            if def.try_get::<i64, _>(1)? == 0 {
                continue;
            }
            let Some(latest) = Self::latest_build(conn, &definition).await? else {
                continue;
            };
            let sql = format!(
                "SELECT reference, digest FROM build_base_images WHERE build_id = $1 \
                 AND reference IN ({}) ORDER BY reference",
                placeholders(2, references.len())
            );
            let mut q = sqlx::query(&sql).bind(&latest.id);
            for r in references {
                q = q.bind(r);
            }
            let recorded: Vec<(String, Option<String>)> = q
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<sqlx::Result<_>>()?;
            let Some((reference, _)) = recorded.first().cloned() else {
                // Only older builds used it.
                continue;
            };
            if recorded.iter().all(|(_, d)| d.as_deref() == Some(digest)) {
                // Back where the latest build was: nothing to rebuild.
                written += sqlx::query(
                    "UPDATE base_rebuilds SET state = 'superseded', message = $1, updated_at = $2 \
                     WHERE definition_id = $3 AND base_reference = $4 AND state = 'pending'",
                )
                .bind(format!(
                    "the base moved back to {digest}, which build {} used",
                    latest.id
                ))
                .bind(now)
                .bind(&definition)
                .bind(&reference)
                .execute(&mut *conn)
                .await?
                .rows_affected() as usize;
                continue;
            }
            let from = recorded
                .iter()
                .find_map(|(_, d)| d.clone().filter(|d| d != digest));
            if self
                .upsert_pending(
                    conn,
                    &definition,
                    &repository,
                    &reference,
                    from.as_deref(),
                    digest,
                    due,
                    now,
                )
                .await?
            {
                written += 1;
                tracing::info!(definition = %definition, repository = %repository, base = %reference, digest, "base image moved; rebuild pending");
            }
        }
        Ok(written)
    }

    /// One pending row per definition and base: a later move keeps the
    /// first `from_digest`, takes the new target and pushes `due_at` back.
    /// False when nothing changed (same target).
    #[expect(
        clippy::too_many_arguments,
        reason = "the columns of the row, each distinct"
    )]
    async fn upsert_pending(
        &self,
        conn: &mut AnyConnection,
        definition: &str,
        repository: &str,
        reference: &str,
        from: Option<&str>,
        to: &str,
        due: i64,
        now: i64,
    ) -> sqlx::Result<bool> {
        let existing = sqlx::query(
            "SELECT id, to_digest FROM base_rebuilds \
             WHERE definition_id = $1 AND base_reference = $2 AND state = 'pending'",
        )
        .bind(definition)
        .bind(reference)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = existing {
            let id: String = row.try_get(0)?;
            let target: String = row.try_get(1)?;
            if target == to {
                return Ok(false);
            }
            let n = sqlx::query(
                "UPDATE base_rebuilds SET to_digest = $1, due_at = $2, updated_at = $3 \
                 WHERE id = $4 AND state = 'pending'",
            )
            .bind(to)
            .bind(due)
            .bind(now)
            .bind(&id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if n == 1 {
                return Ok(true);
            }
            // Started meanwhile: this move needs a rebuild of its own.
        }
        sqlx::query(
            "INSERT INTO base_rebuilds (id, definition_id, repository, base_reference, from_digest, \
             to_digest, state, due_at, build_id, message, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, NULL, '', $8, $8)",
        )
        .bind(new_id())
        .bind(definition)
        .bind(repository)
        .bind(reference)
        .bind(from)
        .bind(to)
        .bind(due)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(true)
    }

    /// Whether the [`CONSUMER`] has read every event written so far
    /// (waiting a little for it). Builds seen finished before this call
    /// then have their tag moves recorded as pending rows.
    async fn consumer_caught_up(&self) -> Result<bool> {
        let last: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM events")
            .fetch_one(&self.db.read)
            .await?
            .try_get(0)?;
        for _ in 0..40 {
            let position: Option<i64> =
                sqlx::query("SELECT position FROM event_consumers WHERE name = $1")
                    .bind(CONSUMER)
                    .fetch_optional(&self.db.read)
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?;
            if position.unwrap_or(0) >= last {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(false)
    }

    /// Starts (or refuses, or supersedes) the pending rebuilds that are
    /// due. Returns how many builds were started.
    pub(crate) async fn start_due_rebuilds(&self) -> Result<usize> {
        let now = now_millis();
        let any_due = sqlx::query(
            "SELECT 1 FROM base_rebuilds WHERE state = 'pending' AND due_at <= $1 LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.db.read)
        .await?
        .is_some();
        if !any_due {
            return Ok(0);
        }
        // Order matters: builds first, then the consumer's progress, then
        // the pending rows (see `consumer_caught_up`).
        let mut graph = Graph::load(self).await?;
        if !self.consumer_caught_up().await? {
            return Ok(0);
        }
        let rows = sqlx::query(
            "SELECT id, definition_id, base_reference, from_digest, to_digest, due_at \
             FROM base_rebuilds WHERE state = 'pending' ORDER BY due_at, id",
        )
        .fetch_all(&self.db.read)
        .await?;
        // Per definition: its pending rows, the first and the last due time.
        let mut per_def: HashMap<String, (Vec<Pending>, i64, i64)> = HashMap::new();
        for r in &rows {
            let p = Pending {
                id: r.try_get(0)?,
                definition: r.try_get(1)?,
                reference: r.try_get(2)?,
                from: r.try_get(3)?,
                to: r.try_get(4)?,
            };
            let due_at: i64 = r.try_get(5)?;
            let e = per_def
                .entry(p.definition.clone())
                .or_insert_with(|| (Vec::new(), due_at, due_at));
            e.1 = e.1.min(due_at);
            e.2 = e.2.max(due_at);
            e.0.push(p);
        }
        let mut pending_defs: HashSet<String> = per_def.keys().cloned().collect();
        // A definition starts once all its rows are due (a base still in its
        // window would otherwise need a second rebuild), oldest first.
        let due: BTreeMap<(i64, String), Vec<Pending>> = per_def
            .into_iter()
            .filter(|(_, (_, _, last))| *last <= now)
            .map(|(def, (rows, first, _))| ((first, def), rows))
            .collect();
        let mut started = 0;
        for ((_, definition), rows) in due {
            match self
                .decide(&definition, rows, &mut graph, &pending_defs, now)
                .await
            {
                Ok(true) => {
                    started += 1;
                    pending_defs.remove(&definition);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(definition = %definition, error = %e, "base-image rebuild failed")
                }
            }
        }
        Ok(started)
    }

    /// What becomes of one definition's due rows. True when a build started.
    async fn decide(
        &self,
        definition: &str,
        rows: Vec<Pending>,
        graph: &mut Graph,
        pending_defs: &HashSet<String>,
        now: i64,
    ) -> Result<bool> {
        let Some(node) = graph.nodes.get(definition).cloned() else {
            return Ok(false); // deleted: its rows go with it
        };
        if !node.auto_rebuild {
            self.refuse(&rows, "auto_rebuild is off for this definition", now)
                .await?;
            return Ok(false);
        }
        let Some(latest) = node.latest.clone() else {
            self.refuse(
                &rows,
                "the definition has no successful build to rebuild",
                now,
            )
            .await?;
            return Ok(false);
        };
        if let Some(cycle) = graph.cycle_through(definition) {
            let names: Vec<String> = cycle.iter().map(|d| graph.label(d)).collect();
            let message = format!(
                "cycle: {} (each is built FROM the next); not rebuilt",
                names.join(" → ")
            );
            tracing::warn!(definition = %definition, repository = %node.repository, %message, "base-image rebuild refused");
            self.refuse(&rows, &message, now).await?;
            return Ok(false);
        }
        if node.active {
            return Ok(false); // wait for its own build to end
        }
        if let Some(busy) = graph.busy_ancestor(definition, pending_defs) {
            tracing::debug!(definition = %definition, waits_for = %busy, "base-image rebuild waits for a dependency");
            return Ok(false);
        }
        // Rows whose target the latest build already used are done.
        let mut todo = Vec::new();
        for r in rows {
            let used = node.bases.iter().any(|(reference, digest)| {
                *reference == r.reference && digest.as_deref() == Some(r.to.as_str())
            });
            if used {
                sqlx::query(
                    "UPDATE base_rebuilds SET state = 'superseded', message = $1, updated_at = $2 \
                     WHERE id = $3 AND state = 'pending'",
                )
                .bind(format!("build {} already used {}", latest.id, r.to))
                .bind(now)
                .bind(&r.id)
                .execute(&self.db.write)
                .await?;
            } else {
                todo.push(r);
            }
        }
        // Claim them (another replica may be looking at the same rows).
        let mut claimed = Vec::new();
        for r in todo {
            let n = sqlx::query(
                "UPDATE base_rebuilds SET state = 'started', message = 'starting', updated_at = $1 \
                 WHERE id = $2 AND state = 'pending' AND due_at <= $3",
            )
            .bind(now)
            .bind(&r.id)
            .bind(now)
            .execute(&self.db.write)
            .await?
            .rows_affected();
            if n == 1 {
                claimed.push(r);
            }
        }
        if claimed.is_empty() {
            return Ok(false);
        }
        let detail = claimed
            .iter()
            .map(|r| {
                format!(
                    "base image {} moved from {} to {}",
                    self.display_reference(&r.reference),
                    r.from.as_deref().unwrap_or("an unknown digest"),
                    r.to
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let started = match self.definition(definition).await {
            Ok(def) => {
                let commit = if latest.git_ref.is_some() {
                    None
                } else {
                    latest.commit.clone()
                };
                let by = def.created_by.clone();
                self.run_definition(
                    &def,
                    latest.git_ref.clone(),
                    commit,
                    TRIGGER_KIND,
                    detail,
                    &by,
                    now,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let ids: Vec<&str> = claimed.iter().map(|r| r.id.as_str()).collect();
        match started {
            Ok(build) => {
                for id in &ids {
                    sqlx::query(
                        "UPDATE base_rebuilds SET build_id = $1, message = $2, updated_at = $3 WHERE id = $4",
                    )
                    .bind(&build.id)
                    .bind(format!("started build {}", build.id))
                    .bind(now_millis())
                    .bind(id)
                    .execute(&self.db.write)
                    .await?;
                }
                tracing::info!(definition = %definition, repository = %node.repository, build = %build.id, "base image moved: rebuild started");
                graph.mark_active(definition, &build.tags);
                Ok(true)
            }
            Err(e) => {
                let message = format!("could not start a build: {e}");
                tracing::warn!(definition = %definition, %message, "base-image rebuild refused");
                for id in &ids {
                    sqlx::query(
                        "UPDATE base_rebuilds SET state = 'refused', message = $1, updated_at = $2 WHERE id = $3",
                    )
                    .bind(&message)
                    .bind(now_millis())
                    .bind(id)
                    .execute(&self.db.write)
                    .await?;
                }
                Ok(false)
            }
        }
    }

    async fn refuse(&self, rows: &[Pending], message: &str, now: i64) -> Result<()> {
        for r in rows {
            sqlx::query(
                "UPDATE base_rebuilds SET state = 'refused', message = $1, updated_at = $2 \
                 WHERE id = $3 AND state = 'pending'",
            )
            .bind(message)
            .bind(now)
            .bind(&r.id)
            .execute(&self.db.write)
            .await?;
        }
        Ok(())
    }

    /// Rebuild decisions about a repository's definitions, newest first.
    pub async fn rebuilds(&self, repository: &str, limit: u32) -> Result<Vec<RebuildInfo>> {
        let rows = sqlx::query(
            "SELECT r.id, r.definition_id, d.name, r.repository, r.base_reference, r.from_digest, \
             r.to_digest, r.state, r.due_at, r.build_id, r.message, r.created_at, r.updated_at \
             FROM base_rebuilds r LEFT JOIN build_definitions d ON d.id = r.definition_id \
             WHERE r.repository = $1 ORDER BY r.created_at DESC, r.id DESC LIMIT $2",
        )
        .bind(repository)
        .bind(limit.clamp(1, 500) as i64)
        .fetch_all(&self.db.read)
        .await?;
        Ok(rows.iter().map(rebuild_info).collect::<sqlx::Result<_>>()?)
    }

    /// Changes a definition's rebuild settings.
    pub async fn update_definition(
        &self,
        id: &str,
        update: DefinitionUpdate,
    ) -> Result<crate::DefinitionInfo> {
        self.definition(id).await?;
        if let Some(Some(s)) = &update.base_check_schedule {
            validate_schedule(s)?;
        }
        let mut tx = self.db.write.begin().await?;
        if let Some(on) = update.auto_rebuild {
            sqlx::query("UPDATE build_definitions SET auto_rebuild = $1 WHERE id = $2")
                .bind(on as i64)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(schedule) = &update.base_check_schedule {
            sqlx::query("UPDATE build_definitions SET base_check_schedule = $1 WHERE id = $2")
                .bind(schedule)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.upstream_changed.notify_one();
        self.definition(id).await
    }
}

/// A pending row.
#[derive(Debug, Clone)]
struct Pending {
    id: String,
    definition: String,
    reference: String,
    from: Option<String>,
    to: String,
}

/// A definition as the dependency graph sees it.
#[derive(Debug, Clone)]
struct Node {
    repository: String,
    name: String,
    auto_rebuild: bool,
    latest: Option<Latest>,
    /// Being built now.
    active: bool,
    /// `repository:tag` it pushes (latest successful build, builds in
    /// progress).
    outputs: HashSet<String>,
    /// Bases of its latest successful build: (reference, digest).
    bases: Vec<(String, Option<String>)>,
}

/// Definitions linked by "your output is my base".
struct Graph {
    nodes: HashMap<String, Node>,
    /// `repository:tag` → definitions that push it.
    producers: HashMap<String, Vec<String>>,
    /// Local bases, as `repository:tag`, of each definition.
    local_bases: HashMap<String, Vec<String>>,
    /// Repositories with more than one definition (labels name them).
    shared_repositories: HashSet<String>,
}

impl Graph {
    async fn load(m: &BuildManager) -> Result<Graph> {
        let mut nodes: HashMap<String, Node> = HashMap::new();
        let mut per_repo: HashMap<String, usize> = HashMap::new();
        for r in sqlx::query("SELECT id, repository, name, auto_rebuild FROM build_definitions")
            .fetch_all(&m.db.read)
            .await?
        {
            let repository: String = r.try_get(1)?;
            *per_repo.entry(repository.clone()).or_default() += 1;
            nodes.insert(
                r.try_get(0)?,
                Node {
                    repository,
                    name: r.try_get(2)?,
                    auto_rebuild: r.try_get::<i64, _>(3)? != 0,
                    latest: None,
                    active: false,
                    outputs: HashSet::new(),
                    bases: Vec::new(),
                },
            );
        }
        // Latest successful build per definition (one index lookup each).
        let mut latest_tags: HashMap<String, Vec<String>> = HashMap::new();
        for r in sqlx::query(&format!(
            "SELECT b.id, l.definition_id, b.tags, b.git_ref, b.commit_sha \
             FROM (SELECT d.id AS definition_id, {LATEST_BUILD} AS build_id FROM build_definitions d) l \
             JOIN builds b ON b.id = l.build_id"
        ))
        .fetch_all(&m.db.read)
        .await?
        {
            let def: String = r.try_get(1)?;
            if let Some(n) = nodes.get_mut(&def) {
                n.latest = Some(Latest {
                    id: r.try_get(0)?,
                    git_ref: r.try_get(3)?,
                    commit: r.try_get(4)?,
                });
                latest_tags.insert(
                    def,
                    serde_json::from_str(&r.try_get::<String, _>(2)?).unwrap_or_default(),
                );
            }
        }
        let latest_ids: HashMap<String, String> = nodes
            .iter()
            .filter_map(|(d, n)| n.latest.as_ref().map(|l| (l.id.clone(), d.clone())))
            .collect();
        for r in sqlx::query(&format!(
            "SELECT i.build_id, i.reference, i.digest \
             FROM (SELECT {LATEST_BUILD} AS build_id FROM build_definitions d) l \
             JOIN build_base_images i ON i.build_id = l.build_id"
        ))
        .fetch_all(&m.db.read)
        .await?
        {
            let build: String = r.try_get(0)?;
            if let Some(def) = latest_ids.get(&build)
                && let Some(n) = nodes.get_mut(def)
            {
                let base = (r.try_get(1)?, r.try_get(2)?);
                if !n.bases.contains(&base) {
                    n.bases.push(base);
                }
            }
        }
        for (def, tags) in latest_tags {
            if let Some(n) = nodes.get_mut(&def) {
                let repo = n.repository.clone();
                n.outputs.extend(tags.iter().map(|t| format!("{repo}:{t}")));
            }
        }
        for r in sqlx::query(
            "SELECT definition_id, tags FROM builds \
             WHERE status IN ('queued', 'running', 'pushing') AND definition_id IS NOT NULL",
        )
        .fetch_all(&m.db.read)
        .await?
        {
            let def: String = r.try_get(0)?;
            if let Some(n) = nodes.get_mut(&def) {
                n.active = true;
                let tags: Vec<String> =
                    serde_json::from_str(&r.try_get::<String, _>(1)?).unwrap_or_default();
                let repo = n.repository.clone();
                n.outputs.extend(tags.iter().map(|t| format!("{repo}:{t}")));
            }
        }
        let mut graph = Graph {
            producers: HashMap::new(),
            local_bases: HashMap::new(),
            shared_repositories: per_repo
                .into_iter()
                .filter(|(_, n)| *n > 1)
                .map(|(r, _)| r)
                .collect(),
            nodes,
        };
        for (def, n) in &graph.nodes {
            for o in &n.outputs {
                graph
                    .producers
                    .entry(o.clone())
                    .or_default()
                    .push(def.clone());
            }
            let locals: Vec<String> = n
                .bases
                .iter()
                .filter_map(|(r, _)| split_reference(r))
                .filter(|(host, _, _)| m.is_local_host(host))
                .map(|(_, repo, tag)| format!("{repo}:{tag}"))
                .collect();
            graph.local_bases.insert(def.clone(), locals);
        }
        for v in graph.producers.values_mut() {
            v.sort();
            v.dedup();
        }
        Ok(graph)
    }

    /// The definitions `def` is built FROM.
    fn parents(&self, def: &str) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .local_bases
            .get(def)
            .into_iter()
            .flatten()
            .flat_map(|b| self.producers.get(b).into_iter().flatten())
            .map(String::as_str)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A cycle of dependencies through `start`: `[start, ..., start]`.
    fn cycle_through(&self, start: &str) -> Option<Vec<String>> {
        fn walk<'a>(
            g: &'a Graph,
            node: &'a str,
            start: &str,
            path: &mut Vec<&'a str>,
            seen: &mut HashSet<&'a str>,
        ) -> bool {
            for p in g.parents(node) {
                if p == start {
                    path.push(p);
                    return true;
                }
                if seen.insert(p) {
                    path.push(p);
                    if walk(g, p, start, path, seen) {
                        return true;
                    }
                    path.pop();
                }
            }
            false
        }
        let (start, _) = self.nodes.get_key_value(start)?;
        let mut path = vec![start.as_str()];
        let mut seen = HashSet::new();
        walk(self, start, start, &mut path, &mut seen)
            .then(|| path.into_iter().map(str::to_string).collect())
    }

    /// A definition `def` depends on (transitively) that has a pending
    /// rebuild or a build in progress.
    fn busy_ancestor(&self, def: &str, pending: &HashSet<String>) -> Option<String> {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack = self.parents(def);
        while let Some(p) = stack.pop() {
            if p == def || !seen.insert(p) {
                continue;
            }
            if pending.contains(p) || self.nodes.get(p).is_some_and(|n| n.active) {
                return Some(self.label(p));
            }
            stack.extend(self.parents(p));
        }
        None
    }

    fn mark_active(&mut self, def: &str, tags: &[String]) {
        if let Some(n) = self.nodes.get_mut(def) {
            n.active = true;
            let repo = n.repository.clone();
            for t in tags {
                let o = format!("{repo}:{t}");
                if n.outputs.insert(o.clone()) {
                    self.producers.entry(o).or_default().push(def.to_string());
                }
            }
        }
    }

    /// A definition for people: its repository, with its name when the
    /// repository has several.
    fn label(&self, def: &str) -> String {
        match self.nodes.get(def) {
            Some(n) if self.shared_repositories.contains(&n.repository) => {
                format!("{} ({})", n.repository, n.name)
            }
            Some(n) => n.repository.clone(),
            None => def.to_string(),
        }
    }
}

/// The events consumer: tag moves of this registry become pending rows.
struct RebuildConsumer(Arc<BuildManager>);

#[async_trait::async_trait]
impl Handler for RebuildConsumer {
    async fn handle(&self, tx: &mut AnyConnection, events: &[Event]) -> Result<(), String> {
        for e in events {
            if e.kind != kinds::TAG_CREATED && e.kind != kinds::TAG_MOVED {
                continue;
            }
            let (Some(repository), Some(tag), Some(digest)) = (&e.repository, &e.tag, &e.digest)
            else {
                continue;
            };
            // The per-job push tags are nobody's base.
            if tag.starts_with(&push_tag("")) {
                continue;
            }
            let references: Vec<String> = self
                .0
                .local_hosts()
                .iter()
                .map(|h| format!("{h}/{repository}:{tag}"))
                .collect();
            self.0
                .enqueue_rebuilds(tx, &references, digest, e.created_at)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn committed(&self) {
        self.0.rebuilds_ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(
            split_reference("127.0.0.1:5000/library/base:1"),
            Some(("127.0.0.1:5000", "library/base", "1"))
        );
        assert_eq!(
            split_reference("docker.io/library/busybox:latest"),
            Some(("docker.io", "library/busybox", "latest"))
        );
        assert_eq!(split_reference("host/a/b:1@sha256:00"), None);
        assert_eq!(split_reference("host/a/b@sha256:00"), None);
        assert_eq!(split_reference("nohost"), None);
        for l in ["127.0.0.1:5000", "localhost:1", "[::1]:80", "127.5.0.1"] {
            assert!(is_loopback_host(l), "{l}");
        }
        for r in [
            "registry.example:5000",
            "10.0.0.1:5000",
            "[2001:db8::1]:5000",
        ] {
            assert!(!is_loopback_host(r), "{r}");
        }
    }

    #[test]
    fn schedules() {
        assert!(validate_schedule("* * * * * *").is_ok());
        assert!(validate_schedule("0 */15 * * * *").is_ok());
        let e = validate_schedule("every minute").unwrap_err().to_string();
        assert!(e.contains("not a cron expression"), "{e}");
        assert!(validate_schedule("").is_err());
    }

    #[test]
    fn updates_tell_absent_from_null() {
        let u: DefinitionUpdate = serde_json::from_str(r#"{"auto_rebuild": false}"#).unwrap();
        assert_eq!(u.auto_rebuild, Some(false));
        assert_eq!(u.base_check_schedule, None);
        let u: DefinitionUpdate = serde_json::from_str(r#"{"base_check_schedule": null}"#).unwrap();
        assert_eq!(u.base_check_schedule, Some(None));
        let u: DefinitionUpdate =
            serde_json::from_str(r#"{"base_check_schedule": "* * * * * *"}"#).unwrap();
        assert_eq!(u.base_check_schedule, Some(Some("* * * * * *".into())));
        assert!(serde_json::from_str::<DefinitionUpdate>(r#"{"name": "x"}"#).is_err());
    }
}
