//! The small interface through which feature crates (the build manager,
//! later signing) write images into the registry without knowing its
//! internals. The registry implements it; manifests written through it get
//! the same validation as a `PUT /v2/<name>/manifests/<reference>`.

/// A manifest as stored.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: String,
    pub media_type: String,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    /// The manifest was refused (invalid, references something missing).
    #[error("{0}")]
    Invalid(String),
    #[error("registry storage: {0}")]
    Other(String),
}

/// Reads and writes manifests and tags of the registry.
#[async_trait::async_trait]
pub trait ImageStore: Send + Sync {
    /// A manifest by tag or digest.
    async fn manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<StoredManifest>, ImageStoreError>;
    /// Stores a manifest, tagged when `tag` is given; returns its digest.
    async fn put_manifest(
        &self,
        repository: &str,
        tag: Option<&str>,
        media_type: &str,
        body: &[u8],
    ) -> Result<String, ImageStoreError>;
    /// Removes a tag (the manifest stays); false when there was none.
    async fn delete_tag(&self, repository: &str, tag: &str) -> Result<bool, ImageStoreError>;
}
