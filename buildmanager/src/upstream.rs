//! Upstream base checks: base images in **other** registries have no events
//! here, so they are polled. Every definition with `auto_rebuild` on
//! contributes the bases of its latest successful build that live
//! elsewhere, each with the definition's `base_check_schedule` (or the
//! server's `builds.base_check_schedule`); a base shared by several
//! definitions is checked at the earliest of their schedules.
//!
//! A check asks the registry for the tag's digest (anonymously, with
//! `oci-client`: `HEAD` of the manifest, plain HTTP for loopback hosts,
//! HTTPS otherwise) and keeps it in `upstream_bases`. When it differs from
//! the digest seen last time (or on the first check), dependents whose
//! latest build used another digest get a pending rebuild exactly as for a
//! tag moved here ([`BuildManager::enqueue_rebuilds`]). Failures are kept
//! in `upstream_bases.last_error` and logged; the loop goes on.
//!
//! Several replicas: a check is claimed by moving `next_check_at` with a
//! compare-and-set, so one replica makes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use dockyard_core::now_millis;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sqlx::Row;

use crate::rebuild::{LATEST_BUILD, is_loopback_host, split_reference};
use crate::{BuildManager, Result};

/// How often the set of upstream bases is recomputed from the builds (and
/// at once when a definition's settings change).
const REPLAN: Duration = Duration::from_secs(5);
/// How often due checks are looked for.
const TICK: Duration = Duration::from_secs(1);
/// Longest a check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// Checks in flight at once.
const CONCURRENCY: usize = 8;

/// Upstream references to check, each with the schedules of the
/// definitions that use it.
type Watched = HashMap<String, Vec<cron::Schedule>>;

/// Registry clients: plain HTTP for loopback registries, HTTPS for others.
struct Clients {
    http: Client,
    https: Client,
}

impl Clients {
    fn new() -> std::result::Result<Clients, String> {
        // The workspace's rustls provider (reqwest is built without one).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let make = |protocol| {
            Client::try_from(ClientConfig {
                protocol,
                connect_timeout: Some(Duration::from_secs(10)),
                read_timeout: Some(Duration::from_secs(20)),
                ..ClientConfig::default()
            })
            .map_err(|e| e.to_string())
        };
        Ok(Clients {
            http: make(ClientProtocol::Http)?,
            https: make(ClientProtocol::Https)?,
        })
    }
}

/// The earliest time after `after_ms` (Unix ms) any of `schedules` fires.
fn next_after(schedules: &[cron::Schedule], after_ms: i64) -> i64 {
    let after = chrono::DateTime::<Utc>::from_timestamp_millis(after_ms).unwrap_or_else(Utc::now);
    schedules
        .iter()
        .filter_map(|s| s.after(&after).next())
        .map(|t| t.timestamp_millis())
        .min()
        .unwrap_or(i64::MAX)
}

impl BuildManager {
    /// Checks upstream bases on their schedules until `shutdown`.
    pub(crate) async fn run_upstream_checks(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let clients = match Clients::new() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the registry client: upstream base checks are off");
                return;
            }
        };
        let mut watched = Watched::new();
        let mut planned: Option<Instant> = None;
        loop {
            let changed = self.upstream_changed.notified();
            let replan = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed => true,
                _ = tokio::time::sleep(TICK) => planned.is_none_or(|t| t.elapsed() >= REPLAN),
            };
            if replan {
                match self.plan_upstream().await {
                    Ok(w) => watched = w,
                    Err(e) => tracing::warn!(error = %e, "cannot list upstream base images"),
                }
                planned = Some(Instant::now());
            }
            if let Err(e) = self.check_due_upstream(&clients, &watched).await {
                tracing::warn!(error = %e, "upstream base checks failed");
            }
        }
    }

    /// The upstream bases of every definition's latest successful build,
    /// with their schedules; makes sure each has a row whose next check is
    /// no later than its schedules say.
    async fn plan_upstream(&self) -> Result<Watched> {
        let global = match self.settings.base_check_schedule.parse::<cron::Schedule>() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "builds.base_check_schedule is invalid; checking every 15 minutes");
                "0 */15 * * * *".parse().expect("static schedule")
            }
        };
        let rows = sqlx::query(&format!(
            "SELECT l.definition_id, l.schedule, i.reference FROM \
             (SELECT d.id AS definition_id, d.base_check_schedule AS schedule, {LATEST_BUILD} AS build_id \
              FROM build_definitions d WHERE d.auto_rebuild <> 0) l \
             JOIN build_base_images i ON i.build_id = l.build_id"
        ))
        .fetch_all(&self.db.read)
        .await?;
        // The bases of each definition's latest successful build.
        let mut latest: HashMap<String, (Option<String>, Vec<String>)> = HashMap::new();
        for r in rows {
            let def: String = r.try_get(0)?;
            let schedule: Option<String> = r.try_get(1)?;
            let reference: String = r.try_get(2)?;
            latest
                .entry(def)
                .or_insert_with(|| (schedule, Vec::new()))
                .1
                .push(reference);
        }
        let mut watched = Watched::new();
        for (def, (schedule, references)) in latest {
            let schedule = match schedule.as_deref().map(str::parse::<cron::Schedule>) {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::warn!(definition = %def, error = %e, "invalid base_check_schedule; using the server's");
                    global.clone()
                }
                None => global.clone(),
            };
            for reference in references {
                match split_reference(&reference) {
                    Some((host, _, _)) if !self.is_local_host(host) => {}
                    _ => continue,
                }
                let list = watched.entry(reference).or_default();
                if !list.iter().any(|s| s.source() == schedule.source()) {
                    list.push(schedule.clone());
                }
            }
        }
        let known: HashMap<String, i64> =
            sqlx::query("SELECT reference, next_check_at FROM upstream_bases")
                .fetch_all(&self.db.read)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<sqlx::Result<_>>()?;
        let now = now_millis();
        for (reference, schedules) in &watched {
            let next = next_after(schedules, now);
            match known.get(reference) {
                None => {
                    sqlx::query(
                        "INSERT INTO upstream_bases (reference, digest, checked_at, next_check_at, last_error) \
                         VALUES ($1, NULL, NULL, $2, NULL) ON CONFLICT (reference) DO NOTHING",
                    )
                    .bind(reference)
                    .bind(next)
                    .execute(&self.db.write)
                    .await?;
                }
                // A shorter schedule takes effect now, not after the old one's next check.
                Some(at) if *at > next => {
                    sqlx::query(
                        "UPDATE upstream_bases SET next_check_at = $1 WHERE reference = $2 AND next_check_at > $1",
                    )
                    .bind(next)
                    .bind(reference)
                    .execute(&self.db.write)
                    .await?;
                }
                Some(_) => {}
            }
        }
        Ok(watched)
    }

    /// Runs the checks that are due (claimed first).
    async fn check_due_upstream(&self, clients: &Clients, watched: &Watched) -> Result<()> {
        if watched.is_empty() {
            return Ok(());
        }
        let now = now_millis();
        let due = sqlx::query(
            "SELECT reference, next_check_at FROM upstream_bases WHERE next_check_at <= $1",
        )
        .bind(now)
        .fetch_all(&self.db.read)
        .await?;
        let mut claimed = Vec::new();
        for r in due {
            let reference: String = r.try_get(0)?;
            let at: i64 = r.try_get(1)?;
            let Some(schedules) = watched.get(&reference) else {
                continue;
            };
            let n = sqlx::query(
                "UPDATE upstream_bases SET next_check_at = $1 WHERE reference = $2 AND next_check_at = $3",
            )
            .bind(next_after(schedules, now))
            .bind(&reference)
            .bind(at)
            .execute(&self.db.write)
            .await?
            .rows_affected();
            if n == 1 {
                claimed.push(reference);
            }
        }
        futures::stream::iter(claimed)
            .for_each_concurrent(CONCURRENCY, |reference| async move {
                if let Err(e) = self.check_upstream(clients, &reference).await {
                    tracing::warn!(reference = %reference, error = %e, "could not record an upstream base check");
                }
            })
            .await;
        Ok(())
    }

    /// One check: the tag's digest now, recorded; dependents enqueued when
    /// it moved.
    async fn check_upstream(&self, clients: &Clients, reference: &str) -> Result<()> {
        let now = now_millis();
        let digest = match fetch_digest(clients, reference).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(reference, error = %e, "upstream base check failed");
                sqlx::query(
                    "UPDATE upstream_bases SET checked_at = $1, last_error = $2 WHERE reference = $3",
                )
                .bind(now)
                .bind(e.chars().take(1000).collect::<String>())
                .bind(reference)
                .execute(&self.db.write)
                .await?;
                return Ok(());
            }
        };
        let mut tx = self.db.write.begin().await?;
        let previous: Option<String> =
            sqlx::query("SELECT digest FROM upstream_bases WHERE reference = $1")
                .bind(reference)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get::<Option<String>, _>(0))
                .transpose()?
                .flatten();
        sqlx::query(
            "UPDATE upstream_bases SET digest = $1, checked_at = $2, last_error = NULL WHERE reference = $3",
        )
        .bind(&digest)
        .bind(now)
        .bind(reference)
        .execute(&mut *tx)
        .await?;
        let moved = previous.as_deref() != Some(digest.as_str());
        let enqueued = if moved {
            self.enqueue_rebuilds(&mut tx, &[reference.to_string()], &digest, now)
                .await?
        } else {
            0
        };
        tx.commit().await?;
        if moved && previous.is_some() {
            tracing::info!(reference, from = ?previous, to = %digest, dependents = enqueued, "upstream base image moved");
        }
        if enqueued > 0 {
            self.rebuilds_ready.notify_one();
        }
        Ok(())
    }
}

/// The digest `reference`'s tag points to on its registry, asked anonymously.
async fn fetch_digest(clients: &Clients, reference: &str) -> std::result::Result<String, String> {
    let host = split_reference(reference)
        .map(|(h, _, _)| h)
        .ok_or_else(|| format!("{reference} names no tag"))?;
    let parsed: Reference = reference
        .parse()
        .map_err(|e| format!("invalid reference: {e}"))?;
    let client = if is_loopback_host(host) {
        &clients.http
    } else {
        &clients.https
    };
    let digest = tokio::time::timeout(
        CHECK_TIMEOUT,
        client.fetch_manifest_digest(&parsed, &RegistryAuth::Anonymous),
    )
    .await
    .map_err(|_| format!("no answer in {} s", CHECK_TIMEOUT.as_secs()))?
    .map_err(|e| e.to_string())?;
    digest
        .parse::<dockyard_oci::Digest>()
        .map_err(|_| format!("the registry answered an invalid digest {digest:?}"))?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_schedule_wins() {
        let every_second: cron::Schedule = "* * * * * *".parse().unwrap();
        let hourly: cron::Schedule = "0 0 * * * *".parse().unwrap();
        let at = 1_700_000_000_500; // mid-second
        assert_eq!(next_after(std::slice::from_ref(&hourly), at) % 3_600_000, 0);
        assert_eq!(next_after(&[hourly, every_second], at), 1_700_000_001_000);
        assert_eq!(next_after(&[], at), i64::MAX);
    }
}
