//! Registry metadata in SQL: repositories, blob links, manifests, tags,
//! references between them, and upload sessions.
//!
//! Invariant kept here: a manifest row is only inserted, in one transaction,
//! after every blob and child manifest it references was found in its
//! repository; so no crash can leave a manifest that references a missing
//! blob.

use dockyard_core::events::{self, NewEvent, kinds};
use dockyard_core::{Db, now_millis};
use dockyard_oci::{Digest, Manifest};
use sqlx::Row;

use crate::error::Result;

/// Metadata access.
#[derive(Clone, Debug)]
pub struct Meta {
    pub db: Db,
}

/// A stored manifest.
#[derive(Debug, Clone)]
pub struct ManifestRow {
    pub digest: String,
    pub media_type: String,
    pub body: Vec<u8>,
}

/// A manifest whose `subject` is some digest.
#[derive(Debug, Clone)]
pub struct ReferrerRow {
    pub digest: String,
    pub media_type: String,
    pub size: i64,
    pub artifact_type: Option<String>,
    pub annotations: Option<String>,
}

/// An upload session.
#[derive(Debug, Clone)]
pub struct UploadRow {
    pub repository_id: i64,
    pub size: u64,
}

/// Why a manifest could not be stored.
#[derive(Debug)]
pub enum PutManifestError {
    /// A referenced blob or child manifest is not in the repository.
    Missing(Digest),
    /// A referenced blob exists with another size.
    SizeMismatch(Digest, u64, u64),
    Db(sqlx::Error),
}

impl From<sqlx::Error> for PutManifestError {
    fn from(e: sqlx::Error) -> Self {
        PutManifestError::Db(e)
    }
}

/// Result of removing a blob from a repository.
#[derive(Debug, PartialEq, Eq)]
pub enum Unlink {
    Done,
    NotFound,
    /// A manifest of the repository still references it.
    InUse(String),
}

/// The repository's id, creating it if needed; true when it was created
/// (the caller then records a `repository.created` event).
async fn ensure_repo(conn: &mut sqlx::AnyConnection, name: &str) -> sqlx::Result<(i64, bool)> {
    let created = sqlx::query(
        "INSERT INTO repositories (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(now_millis())
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    let row = sqlx::query("SELECT id FROM repositories WHERE name = $1")
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
    Ok((row.try_get(0)?, created))
}

impl Meta {
    pub fn new(db: Db) -> Meta {
        Meta { db }
    }

    pub async fn repo_id(&self, name: &str) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT id FROM repositories WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.read)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// The repository's id, creating it on first use.
    pub async fn ensure_repo(&self, name: &str, actor: Option<&str>) -> Result<i64> {
        if let Some(id) = self.repo_id(name).await? {
            return Ok(id);
        }
        let mut tx = self.db.write.begin().await?;
        let (id, created) = ensure_repo(&mut tx, name).await?;
        if created {
            let e = NewEvent::new(kinds::REPOSITORY_CREATED, name).actor(actor);
            events::append(&mut tx, self.db.backend, &[e]).await?;
        }
        tx.commit().await?;
        events::wake();
        Ok(id)
    }

    /// Size of a blob if it is linked in the repository.
    pub async fn blob_in_repo(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let row = sqlx::query(
            "SELECT b.size FROM repository_blobs rb \
             JOIN repositories r ON r.id = rb.repository_id \
             JOIN blobs b ON b.digest = rb.digest \
             WHERE r.name = $1 AND rb.digest = $2",
        )
        .bind(repo)
        .bind(digest.to_string())
        .fetch_optional(&self.db.read)
        .await?;
        Ok(row
            .map(|r| r.try_get::<i64, _>(0).map(|s| s as u64))
            .transpose()?)
    }

    /// Size of a blob stored anywhere.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let row = sqlx::query("SELECT size FROM blobs WHERE digest = $1")
            .bind(digest.to_string())
            .fetch_optional(&self.db.read)
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64, _>(0).map(|s| s as u64))
            .transpose()?)
    }

    /// Records a stored blob and links it into the repository. When
    /// `upload` is given, that session is removed in the same transaction.
    pub async fn link_blob(
        &self,
        repo_id: i64,
        digest: &Digest,
        size: u64,
        upload: Option<&str>,
    ) -> Result<()> {
        let now = now_millis();
        let mut tx = self.db.write.begin().await?;
        sqlx::query("INSERT INTO blobs (digest, size, created_at) VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING")
            .bind(digest.to_string())
            .bind(size as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO repository_blobs (repository_id, digest, created_at) VALUES ($1, $2, $3) ON CONFLICT (repository_id, digest) DO NOTHING")
            .bind(repo_id)
            .bind(digest.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if let Some(id) = upload {
            sqlx::query("DELETE FROM uploads WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes a blob's link from a repository, unless a manifest there
    /// still references it.
    pub async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<Unlink> {
        let Some(repo_id) = self.repo_id(repo).await? else {
            return Ok(Unlink::NotFound);
        };
        let mut tx = self.db.write.begin().await?;
        let user = sqlx::query(
            "SELECT manifest_digest FROM manifest_blobs WHERE repository_id = $1 AND blob_digest = $2 LIMIT 1",
        )
        .bind(repo_id)
        .bind(digest.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = user {
            return Ok(Unlink::InUse(row.try_get(0)?));
        }
        let n =
            sqlx::query("DELETE FROM repository_blobs WHERE repository_id = $1 AND digest = $2")
                .bind(repo_id)
                .bind(digest.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(if n == 0 {
            Unlink::NotFound
        } else {
            Unlink::Done
        })
    }

    // ---- uploads ----

    pub async fn create_upload(&self, repo_id: i64, id: &str) -> Result<()> {
        let now = now_millis();
        sqlx::query("INSERT INTO uploads (id, repository_id, size, parts, created_at, updated_at) VALUES ($1, $2, 0, 0, $3, $3)")
            .bind(id)
            .bind(repo_id)
            .bind(now)
            .execute(&self.db.write)
            .await?;
        Ok(())
    }

    pub async fn upload(&self, repo: &str, id: &str) -> Result<Option<UploadRow>> {
        let row = sqlx::query(
            "SELECT u.repository_id, u.size FROM uploads u JOIN repositories r ON r.id = u.repository_id \
             WHERE u.id = $1 AND r.name = $2",
        )
        .bind(id)
        .bind(repo)
        .fetch_optional(&self.db.read)
        .await?;
        Ok(row
            .map(|r| -> sqlx::Result<UploadRow> {
                Ok(UploadRow {
                    repository_id: r.try_get(0)?,
                    size: r.try_get::<i64, _>(1)? as u64,
                })
            })
            .transpose()?)
    }

    /// Moves an upload from `from` to `to` bytes; false if it was not at
    /// `from` any more (a concurrent request won).
    pub async fn advance_upload(&self, id: &str, from: u64, to: u64) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE uploads SET size = $1, parts = parts + 1, updated_at = $2 WHERE id = $3 AND size = $4",
        )
        .bind(to as i64)
        .bind(now_millis())
        .bind(id)
        .bind(from as i64)
        .execute(&self.db.write)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub async fn delete_upload(&self, id: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM uploads WHERE id = $1")
            .bind(id)
            .execute(&self.db.write)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Upload sessions not touched since `before` (Unix ms).
    pub async fn stale_uploads(&self, before: i64) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM uploads WHERE updated_at < $1")
            .bind(before)
            .fetch_all(&self.db.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| r.try_get(0))
            .collect::<sqlx::Result<_>>()?)
    }

    // ---- manifests ----

    /// Stores a manifest (and tags it), after checking that everything it
    /// references is in the repository, all in one transaction with the
    /// events it causes (repository created, manifest pushed, tag created
    /// or moved).
    pub async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        manifest: &Manifest,
        body: &[u8],
        tag: Option<&str>,
        actor: Option<&str>,
    ) -> std::result::Result<(), PutManifestError> {
        let now = now_millis();
        let mut tx = self.db.write.begin().await?;
        let (repo_id, repo_created) = ensure_repo(&mut tx, repo).await?;
        let mut new_events = Vec::new();
        if repo_created {
            new_events.push(NewEvent::new(kinds::REPOSITORY_CREATED, repo).actor(actor));
        }
        for d in manifest.blobs() {
            let row = sqlx::query(
                "SELECT b.size FROM repository_blobs rb JOIN blobs b ON b.digest = rb.digest \
                 WHERE rb.repository_id = $1 AND rb.digest = $2",
            )
            .bind(repo_id)
            .bind(d.digest.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => return Err(PutManifestError::Missing(d.digest.clone())),
                Some(r) => {
                    let size = r.try_get::<i64, _>(0)? as u64;
                    if size != d.size {
                        return Err(PutManifestError::SizeMismatch(
                            d.digest.clone(),
                            d.size,
                            size,
                        ));
                    }
                }
            }
        }
        for d in &manifest.manifests {
            let found =
                sqlx::query("SELECT 1 FROM manifests WHERE repository_id = $1 AND digest = $2")
                    .bind(repo_id)
                    .bind(d.digest.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            if found.is_none() {
                return Err(PutManifestError::Missing(d.digest.clone()));
            }
        }
        let annotations = manifest
            .annotations
            .as_ref()
            .map(|a| serde_json::Value::Object(a.clone()).to_string());
        let inserted = sqlx::query(
            "INSERT INTO manifests (repository_id, digest, media_type, artifact_type, subject, size, body, annotations, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (repository_id, digest) DO NOTHING",
        )
        .bind(repo_id)
        .bind(digest.to_string())
        .bind(&manifest.media_type)
        .bind(manifest.artifact_type.clone())
        .bind(manifest.subject.as_ref().map(|s| s.digest.to_string()))
        .bind(body.len() as i64)
        .bind(body.to_vec())
        .bind(annotations)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            for d in manifest.blobs() {
                sqlx::query(
                    "INSERT INTO manifest_blobs (repository_id, manifest_digest, blob_digest) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(repo_id)
                .bind(digest.to_string())
                .bind(d.digest.to_string())
                .execute(&mut *tx)
                .await?;
            }
            for d in &manifest.manifests {
                sqlx::query(
                    "INSERT INTO manifest_children (repository_id, parent_digest, child_digest) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(repo_id)
                .bind(digest.to_string())
                .bind(d.digest.to_string())
                .execute(&mut *tx)
                .await?;
            }
        }
        let details = serde_json::json!({
            "media_type": manifest.media_type,
            "size": body.len(),
        });
        if inserted == 1 {
            let mut e = NewEvent::new(kinds::MANIFEST_PUSHED, repo)
                .digest(digest.to_string())
                .actor(actor)
                .data(details.clone());
            e.tag = tag.map(str::to_string);
            new_events.push(e);
        }
        if let Some(tag) = tag {
            let previous: Option<String> =
                sqlx::query("SELECT digest FROM tags WHERE repository_id = $1 AND name = $2")
                    .bind(repo_id)
                    .bind(tag)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?;
            let mut data = details;
            data["manifest_new"] = (inserted == 1).into();
            let kind = match &previous {
                None => Some(kinds::TAG_CREATED),
                Some(p) if *p != digest.to_string() => {
                    data["previous_digest"] = p.clone().into();
                    Some(kinds::TAG_MOVED)
                }
                Some(_) => None,
            };
            if let Some(kind) = kind {
                new_events.push(
                    NewEvent::new(kind, repo)
                        .tag(tag)
                        .digest(digest.to_string())
                        .actor(actor)
                        .data(data),
                );
            }
            sqlx::query(
                "INSERT INTO tags (repository_id, name, digest, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (repository_id, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
            )
            .bind(repo_id)
            .bind(tag)
            .bind(digest.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        events::append(&mut tx, self.db.backend, &new_events).await?;
        tx.commit().await?;
        events::wake();
        Ok(())
    }

    fn manifest_row(r: sqlx::any::AnyRow) -> sqlx::Result<ManifestRow> {
        Ok(ManifestRow {
            digest: r.try_get(0)?,
            media_type: r.try_get(1)?,
            body: r.try_get(2)?,
        })
    }

    pub async fn manifest_by_tag(&self, repo: &str, tag: &str) -> Result<Option<ManifestRow>> {
        let row = sqlx::query(
            "SELECT m.digest, m.media_type, m.body FROM tags t \
             JOIN repositories r ON r.id = t.repository_id \
             JOIN manifests m ON m.repository_id = t.repository_id AND m.digest = t.digest \
             WHERE r.name = $1 AND t.name = $2",
        )
        .bind(repo)
        .bind(tag)
        .fetch_optional(&self.db.read)
        .await?;
        Ok(row.map(Self::manifest_row).transpose()?)
    }

    pub async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestRow>> {
        let row = sqlx::query(
            "SELECT m.digest, m.media_type, m.body FROM manifests m \
             JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = $1 AND m.digest = $2",
        )
        .bind(repo)
        .bind(digest.to_string())
        .fetch_optional(&self.db.read)
        .await?;
        Ok(row.map(Self::manifest_row).transpose()?)
    }

    /// Deletes a manifest and its tags and references, with a
    /// `manifest.deleted` event and a `tag.deleted` event per tag.
    pub async fn delete_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        actor: Option<&str>,
    ) -> Result<bool> {
        let Some(repo_id) = self.repo_id(repo).await? else {
            return Ok(false);
        };
        let mut tx = self.db.write.begin().await?;
        let tags: Vec<String> = sqlx::query(
            "SELECT name FROM tags WHERE repository_id = $1 AND digest = $2 ORDER BY name",
        )
        .bind(repo_id)
        .bind(digest.to_string())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<sqlx::Result<_>>()?;
        // Explicit deletes so that the result does not depend on foreign-key
        // enforcement being on.
        for q in [
            "DELETE FROM tags WHERE repository_id = $1 AND digest = $2",
            "DELETE FROM manifest_blobs WHERE repository_id = $1 AND manifest_digest = $2",
            "DELETE FROM manifest_children WHERE repository_id = $1 AND parent_digest = $2",
        ] {
            sqlx::query(q)
                .bind(repo_id)
                .bind(digest.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let n = sqlx::query("DELETE FROM manifests WHERE repository_id = $1 AND digest = $2")
            .bind(repo_id)
            .bind(digest.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            let d = digest.to_string();
            let mut evs: Vec<NewEvent> = tags
                .iter()
                .map(|t| {
                    NewEvent::new(kinds::TAG_DELETED, repo)
                        .tag(t)
                        .digest(&d)
                        .actor(actor)
                })
                .collect();
            evs.push(
                NewEvent::new(kinds::MANIFEST_DELETED, repo)
                    .digest(&d)
                    .actor(actor)
                    .data(serde_json::json!({ "tags": tags })),
            );
            events::append(&mut tx, self.db.backend, &evs).await?;
        }
        tx.commit().await?;
        events::wake();
        Ok(n == 1)
    }

    /// Removes a tag (the manifest stays), with a `tag.deleted` event.
    pub async fn delete_tag(&self, repo: &str, tag: &str, actor: Option<&str>) -> Result<bool> {
        let Some(repo_id) = self.repo_id(repo).await? else {
            return Ok(false);
        };
        let mut tx = self.db.write.begin().await?;
        let Some(row) =
            sqlx::query("SELECT digest FROM tags WHERE repository_id = $1 AND name = $2")
                .bind(repo_id)
                .bind(tag)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(false);
        };
        let digest: String = row.try_get(0)?;
        sqlx::query("DELETE FROM tags WHERE repository_id = $1 AND name = $2")
            .bind(repo_id)
            .bind(tag)
            .execute(&mut *tx)
            .await?;
        let e = NewEvent::new(kinds::TAG_DELETED, repo)
            .tag(tag)
            .digest(digest)
            .actor(actor);
        events::append(&mut tx, self.db.backend, &[e]).await?;
        tx.commit().await?;
        events::wake();
        Ok(true)
    }

    /// Up to `n` tags after `last`, in lexical order; `None` if the
    /// repository does not exist.
    pub async fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        n: u32,
    ) -> Result<Option<Vec<String>>> {
        let Some(repo_id) = self.repo_id(repo).await? else {
            return Ok(None);
        };
        let rows = sqlx::query(
            "SELECT name FROM tags WHERE repository_id = $1 AND name > $2 ORDER BY name LIMIT $3",
        )
        .bind(repo_id)
        .bind(last.unwrap_or(""))
        .bind(i64::from(n))
        .fetch_all(&self.db.read)
        .await?;
        Ok(Some(
            rows.into_iter()
                .map(|r| r.try_get(0))
                .collect::<sqlx::Result<_>>()?,
        ))
    }

    /// Up to `n` repository names after `last`, in lexical order.
    pub async fn catalog(&self, last: Option<&str>, n: u32) -> Result<Vec<String>> {
        let rows =
            sqlx::query("SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2")
                .bind(last.unwrap_or(""))
                .bind(i64::from(n))
                .fetch_all(&self.db.read)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| r.try_get(0))
            .collect::<sqlx::Result<_>>()?)
    }

    /// Manifests of the repository whose subject is `digest`.
    pub async fn referrers(&self, repo: &str, digest: &Digest) -> Result<Vec<ReferrerRow>> {
        let rows = sqlx::query(
            "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations FROM manifests m \
             JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = $1 AND m.subject = $2 ORDER BY m.created_at, m.digest",
        )
        .bind(repo)
        .bind(digest.to_string())
        .fetch_all(&self.db.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| -> sqlx::Result<ReferrerRow> {
                Ok(ReferrerRow {
                    digest: r.try_get(0)?,
                    media_type: r.try_get(1)?,
                    size: r.try_get(2)?,
                    artifact_type: r.try_get(3)?,
                    annotations: r.try_get(4)?,
                })
            })
            .collect::<sqlx::Result<_>>()?)
    }
}
