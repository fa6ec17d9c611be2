//! Job logs: appended in the database while a job runs (so every replica
//! can serve them live), archived to the object store
//! (`dockyard/builds/<build>/<job>.log`) when the job ends, and read by
//! followers from a byte cursor that survives the move.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, PutPayload};
use serde::Serialize;
use sqlx::Row;

use crate::builds::FINAL_STATUSES;
use crate::{BuildManager, Result};

/// Largest piece of text kept from one log call.
const MAX_CHUNK: usize = 1 << 20;

/// Something that happened in a build, for followers.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogEvent {
    /// Log text of one job.
    Log {
        job: String,
        platform: String,
        text: String,
    },
    /// A job changed phase.
    Phase {
        job: String,
        platform: String,
        phase: String,
    },
    /// The build ended.
    End {
        status: String,
        error: Option<String>,
        manifest_digest: Option<String>,
    },
}

/// Where a follower is in each job's log.
#[derive(Debug, Default, Clone)]
pub struct Cursor {
    /// Per job: bytes sent, last chunk seq seen, last phase sent.
    jobs: HashMap<String, (u64, i64, String)>,
    ended: bool,
}

impl Cursor {
    pub fn ended(&self) -> bool {
        self.ended
    }
}

fn log_key(build: &str, job: &str) -> Path {
    Path::from(format!("dockyard/builds/{build}/{job}.log"))
}

impl BuildManager {
    pub(crate) async fn append_log(&self, job: &str, text: &str) -> Result<()> {
        let mut text = text;
        if text.len() > MAX_CHUNK {
            let mut end = MAX_CHUNK;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text = &text[..end];
        }
        let mut tx = self.db.write.begin().await?;
        let seq: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq), 0) + 1 FROM build_log_chunks WHERE job_id = $1")
                .bind(job)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
        sqlx::query("INSERT INTO build_log_chunks (job_id, seq, data) VALUES ($1, $2, $3)")
            .bind(job)
            .bind(seq)
            .bind(text)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves a finished job's log to the object store. Failures are logged:
    /// the log then stays in the database, still readable.
    pub(crate) async fn archive_log(&self, job: &str, build: &str) {
        if let Err(e) = self.try_archive(job, build).await {
            tracing::warn!(job, error = %e, "could not archive the job log");
        }
    }

    async fn try_archive(&self, job: &str, build: &str) -> Result<()> {
        let rows = sqlx::query("SELECT data FROM build_log_chunks WHERE job_id = $1 ORDER BY seq")
            .bind(job)
            .fetch_all(&self.db.read)
            .await?;
        let mut all = String::new();
        for r in rows {
            all.push_str(&r.try_get::<String, _>(0)?);
        }
        let key = log_key(build, job);
        self.store
            .put(&key, PutPayload::from(Bytes::from(all)))
            .await?;
        let mut tx = self.db.write.begin().await?;
        sqlx::query("UPDATE build_jobs SET log_key = $1 WHERE id = $2")
            .bind(key.to_string())
            .bind(job)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM build_log_chunks WHERE job_id = $1")
            .bind(job)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The whole log of a job so far.
    pub async fn job_log_text(&self, build: &str, job: &str) -> Result<String> {
        let mut cursor = Cursor::default();
        let events = self.read_job(build, job, "", &mut cursor).await?;
        Ok(events
            .into_iter()
            .filter_map(|e| match e {
                LogEvent::Log { text, .. } => Some(text),
                _ => None,
            })
            .collect())
    }

    async fn read_job(
        &self,
        build: &str,
        job: &str,
        platform: &str,
        cursor: &mut Cursor,
    ) -> Result<Vec<LogEvent>> {
        let row =
            sqlx::query("SELECT phase, log_key FROM build_jobs WHERE id = $1 AND build_id = $2")
                .bind(job)
                .bind(build)
                .fetch_optional(&self.db.read)
                .await?
                .ok_or_else(|| crate::BuildError::NotFound(format!("job {job}")))?;
        let phase: String = row.try_get(0)?;
        let key: Option<String> = row.try_get(1)?;
        let state = cursor
            .jobs
            .entry(job.to_string())
            .or_insert((0, 0, String::new()));
        let mut out = Vec::new();
        let mut text = String::new();
        match key {
            None => {
                let rows = sqlx::query(
                    "SELECT seq, data FROM build_log_chunks WHERE job_id = $1 AND seq > $2 ORDER BY seq",
                )
                .bind(job)
                .bind(state.1)
                .fetch_all(&self.db.read)
                .await?;
                for r in rows {
                    state.1 = r.try_get(0)?;
                    let d: String = r.try_get(1)?;
                    state.0 += d.len() as u64;
                    text.push_str(&d);
                }
            }
            Some(key) => {
                let path = Path::from(key);
                let size = self.store.head(&path).await?.size;
                if size > state.0 {
                    let opts = GetOptions {
                        range: Some(GetRange::Offset(state.0)),
                        ..Default::default()
                    };
                    let bytes = self.store.get_opts(&path, opts).await?.bytes().await?;
                    state.0 += bytes.len() as u64;
                    text.push_str(&String::from_utf8_lossy(&bytes));
                }
            }
        }
        if !text.is_empty() {
            out.push(LogEvent::Log {
                job: job.to_string(),
                platform: platform.to_string(),
                text,
            });
        }
        if state.2 != phase {
            state.2 = phase.clone();
            out.push(LogEvent::Phase {
                job: job.to_string(),
                platform: platform.to_string(),
                phase,
            });
        }
        Ok(out)
    }

    /// Everything new in a build since `cursor`; ends with [`LogEvent::End`]
    /// once the build is over and every log was read.
    pub async fn read_build(&self, build: &str, cursor: &mut Cursor) -> Result<Vec<LogEvent>> {
        let detail = self.build(build).await?;
        let mut out = Vec::new();
        for j in &detail.jobs {
            out.extend(self.read_job(build, &j.id, &j.platform, cursor).await?);
        }
        let b = &detail.build;
        if FINAL_STATUSES.contains(&b.status.as_str()) && !cursor.ended {
            // One more pass: logs archived after we looked.
            let detail = self.build(build).await?;
            for j in &detail.jobs {
                out.extend(self.read_job(build, &j.id, &j.platform, cursor).await?);
            }
            cursor.ended = true;
            out.push(LogEvent::End {
                status: b.status.clone(),
                error: b.error.clone(),
                manifest_digest: b.manifest_digest.clone(),
            });
        }
        Ok(out)
    }

    /// Waits until something may have changed (or `max`).
    pub async fn wait_progress(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.progress.notified()).await;
    }
}
