//! Offline garbage collection (mark and sweep).
//!
//! Mark: a blob is live while some manifest references it (`manifest_blobs`)
//! or it is younger than the grace period (so blobs of pushes in flight,
//! whose manifest has not arrived yet, are kept). Sweep: dead blobs lose
//! their rows first (in a transaction that re-checks they are unreferenced)
//! and their objects after, so a crash in between leaves an orphan object,
//! never a row without bytes. Orphan objects older than the grace period
//! (from such crashes or interrupted writes) and expired upload sessions are
//! removed too.
//!
//! The server should be read-only while this runs; online GC is future work.

use std::collections::HashSet;
use std::time::Duration;

use dockyard_core::now_millis;
use object_store::path::Path;
use sqlx::Row;

use crate::Registry;
use crate::error::Result;
use crate::storage::Storage;

/// What a collection did (or would do, in a dry run).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
    pub orphan_objects_deleted: u64,
    pub uploads_expired: u64,
    pub untagged_manifests_deleted: u64,
}

/// Options of a collection.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Blobs and objects younger than this are kept.
    pub grace: Duration,
    /// Report only.
    pub dry_run: bool,
    /// Also delete manifests that no tag and no index reference.
    pub delete_untagged: bool,
}

/// Runs one collection.
pub async fn collect(reg: &Registry, opts: &GcOptions) -> Result<GcReport> {
    let mut report = GcReport::default();
    let cutoff = now_millis() - opts.grace.as_millis() as i64;
    let db = &reg.meta.db;

    if opts.delete_untagged {
        let rows = sqlx::query(
            "SELECT r.name, m.digest FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE m.created_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository_id = m.repository_id AND t.digest = m.digest) \
             AND NOT EXISTS (SELECT 1 FROM manifest_children c WHERE c.repository_id = m.repository_id AND c.child_digest = m.digest) \
             AND m.subject IS NULL",
        )
        .bind(cutoff)
        .fetch_all(&db.read)
        .await?;
        for r in rows {
            let (repo, digest): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            if let Ok(d) = digest.parse() {
                if !opts.dry_run {
                    reg.meta.delete_manifest(&repo, &d, Some("gc")).await?;
                }
                report.untagged_manifests_deleted += 1;
            }
        }
    }

    let dead = sqlx::query(
        "SELECT b.digest, b.size FROM blobs b WHERE b.created_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM manifest_blobs mb WHERE mb.blob_digest = b.digest)",
    )
    .bind(cutoff)
    .fetch_all(&db.read)
    .await?;
    for r in dead {
        let (digest, size): (String, i64) = (r.try_get(0)?, r.try_get(1)?);
        let Ok(d) = digest.parse::<dockyard_oci::Digest>() else {
            continue;
        };
        if !opts.dry_run {
            let mut tx = db.write.begin().await?;
            let still_used =
                sqlx::query("SELECT 1 FROM manifest_blobs WHERE blob_digest = $1 LIMIT 1")
                    .bind(&digest)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
            if still_used {
                continue;
            }
            sqlx::query("DELETE FROM repository_blobs WHERE digest = $1")
                .bind(&digest)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM blobs WHERE digest = $1")
                .bind(&digest)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            reg.storage
                .delete(&Storage::blob_key(&d))
                .await
                .map_err(|e| crate::RegistryError::Internal(e.to_string()))?;
        }
        report.blobs_deleted += 1;
        report.bytes_freed += size as u64;
    }

    // Orphan objects: stored bytes with no blob row, older than the grace.
    let known: HashSet<String> = sqlx::query("SELECT digest FROM blobs")
        .fetch_all(&db.read)
        .await?
        .into_iter()
        .map(|r| r.try_get(0))
        .collect::<sqlx::Result<_>>()?;
    let listed = reg
        .storage
        .list(&Path::from("docker/registry/v2/blobs"))
        .await
        .map_err(|e| crate::RegistryError::Internal(e.to_string()))?;
    for obj in listed {
        let parts: Vec<_> = obj.key.parts().collect();
        // docker/registry/v2/blobs/<alg>/<2>/<hex>/data
        if parts.len() != 8 || obj.modified_millis >= cutoff {
            continue;
        }
        let digest = format!("{}:{}", parts[4].as_ref(), parts[6].as_ref());
        if !known.contains(&digest) {
            if !opts.dry_run {
                reg.storage
                    .delete(&obj.key)
                    .await
                    .map_err(|e| crate::RegistryError::Internal(e.to_string()))?;
            }
            report.orphan_objects_deleted += 1;
        }
    }
    for prefix in ["dockyard/tmp"] {
        let listed = reg
            .storage
            .list(&Path::from(prefix))
            .await
            .map_err(|e| crate::RegistryError::Internal(e.to_string()))?;
        for obj in listed.into_iter().filter(|o| o.modified_millis < cutoff) {
            if !opts.dry_run {
                let _ = reg.storage.delete(&obj.key).await;
            }
            report.orphan_objects_deleted += 1;
        }
    }
    if !opts.dry_run {
        report.uploads_expired = reg.expire_uploads().await? as u64;
    }
    Ok(report)
}
