//! [`ImageStore`] for the registry: how other crates (the build manager)
//! read and write manifests and tags, with the same validation as the
//! `/v2` API.

use async_trait::async_trait;
use dockyard_core::images::{ImageStore, ImageStoreError, StoredManifest};
use dockyard_oci::{Digest, Manifest, Reference};

use crate::Registry;
use crate::meta::PutManifestError;

fn other(e: impl std::fmt::Display) -> ImageStoreError {
    ImageStoreError::Other(e.to_string())
}

#[async_trait]
impl ImageStore for Registry {
    async fn manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<StoredManifest>, ImageStoreError> {
        let reference: Reference = reference
            .parse()
            .map_err(|_| ImageStoreError::Invalid(format!("invalid reference {reference:?}")))?;
        let row = match &reference {
            Reference::Digest(d) => self.meta.manifest_by_digest(repository, d).await,
            Reference::Tag(t) => self.meta.manifest_by_tag(repository, t.as_str()).await,
        }
        .map_err(other)?;
        Ok(row.map(|r| StoredManifest {
            digest: r.digest,
            media_type: r.media_type,
            body: r.body,
        }))
    }

    async fn put_manifest(
        &self,
        repository: &str,
        tag: Option<&str>,
        media_type: &str,
        body: &[u8],
    ) -> Result<String, ImageStoreError> {
        if let Some(t) = tag {
            t.parse::<dockyard_oci::Tag>()
                .map_err(|_| ImageStoreError::Invalid(format!("invalid tag {t:?}")))?;
        }
        let manifest = Manifest::parse(media_type, body)
            .map_err(|e| ImageStoreError::Invalid(e.to_string()))?;
        let digest = Digest::sha256(body);
        match self
            .meta
            .put_manifest(repository, &digest, &manifest, body, tag, None)
            .await
        {
            Ok(()) => Ok(digest.to_string()),
            Err(PutManifestError::Missing(d)) => Err(ImageStoreError::Invalid(format!(
                "{d} is not in repository {repository}"
            ))),
            Err(PutManifestError::SizeMismatch(d, said, actual)) => Err(ImageStoreError::Invalid(
                format!("descriptor of {d} says {said} bytes, the blob has {actual}"),
            )),
            Err(PutManifestError::Db(e)) => Err(other(e)),
        }
    }

    async fn delete_tag(&self, repository: &str, tag: &str) -> Result<bool, ImageStoreError> {
        self.meta
            .delete_tag(repository, tag, None)
            .await
            .map_err(other)
    }
}
