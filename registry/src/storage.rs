//! The content store: blobs and upload parts in an object store
//! (`object_store`: local filesystem or S3).
//!
//! **Key layout** (stable; keys never change once written):
//! - blobs: `docker/registry/v2/blobs/<alg>/<first two hex>/<hex>/data`, the
//!   layout of CNCF Distribution, so an existing registry's storage can be
//!   adopted in place;
//! - upload data, filesystem backend: `dockyard/uploads/<upload id>/data`, one
//!   file appended to chunk by chunk (as Distribution does);
//! - upload data, object stores: `dockyard/uploads/<upload id>/<offset, 20
//!   digits>`, one object per chunk, concatenated on completion;
//! - scratch files of the filesystem backend: `dockyard/tmp/<uuid>`;
//! - build logs (build manager): `dockyard/builds/<build id>/<job id>.log`;
//! - uploaded build contexts: `dockyard/build-contexts/<build id>`.
//!
//! Writes never expose partial objects: the filesystem backend writes to a
//! scratch file and renames it into place, the object-store backend uses a
//! multipart upload that only becomes visible when completed. An upload's
//! accepted size lives in the database; bytes past it (from a request that
//! failed half-way) are ignored and overwritten by the next chunk.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use dockyard_core::config::{StorageConfig, StorageKind};
use dockyard_oci::{Digest, DigestHasher};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Why a streamed write did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The client's body failed (disconnect, timeout).
    #[error("request body: {0}")]
    Body(String),
    /// The body is longer than allowed.
    #[error("body exceeds {0} bytes")]
    TooLarge(u64),
    /// The store failed.
    #[error("storage: {0}")]
    Store(String),
}

/// Errors of reads and metadata operations on the store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object not found")]
    NotFound,
    #[error("storage: {0}")]
    Other(String),
}

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound,
            e => StorageError::Other(e.to_string()),
        }
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            StorageError::NotFound
        } else {
            StorageError::Other(e.to_string())
        }
    }
}

/// Read buffer for streaming blobs out of local files.
const READ_CHUNK: usize = 256 * 1024;
/// Write buffer for local files.
const WRITE_BUFFER: usize = 1024 * 1024;
/// Part size of multipart uploads to remote stores.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// The content store.
#[derive(Clone, Debug)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Set for the filesystem backend: its root, for direct file I/O on the
    /// hot paths (streaming reads and writes with large buffers).
    local: Option<Arc<LocalFileSystem>>,
}

/// A stored piece of an upload.
struct Piece {
    key: Path,
    len: u64,
}

/// A listed object.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: Path,
    pub size: u64,
    pub modified_millis: i64,
}

impl Storage {
    /// The underlying object store, for other crates' objects under their
    /// own `dockyard/<crate>/` prefixes (build logs and contexts).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Opens the store the configuration names.
    pub fn from_config(cfg: &StorageConfig, fs_root: PathBuf) -> Result<Storage, StorageError> {
        match cfg.kind {
            StorageKind::Filesystem => {
                std::fs::create_dir_all(&fs_root)?;
                let local = Arc::new(LocalFileSystem::new_with_prefix(&fs_root)?);
                Ok(Storage {
                    store: local.clone(),
                    local: Some(local),
                })
            }
            StorageKind::S3 => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_region(&cfg.region)
                    .with_allow_http(cfg.allow_http)
                    .with_bucket_name(cfg.bucket.clone().unwrap_or_default());
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                }
                if let Some(k) = &cfg.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = &cfg.secret_access_key {
                    b = b.with_secret_access_key(s);
                }
                let s3: Arc<dyn ObjectStore> = Arc::new(b.build()?);
                let store = match &cfg.prefix {
                    Some(p) => Arc::new(object_store::prefix::PrefixStore::new(s3, p.as_str())),
                    None => s3,
                };
                Ok(Storage { store, local: None })
            }
        }
    }

    pub fn blob_key(d: &Digest) -> Path {
        let hex = d.hex();
        Path::from(format!(
            "docker/registry/v2/blobs/{}/{}/{}/data",
            d.algorithm().as_str(),
            &hex[..2],
            hex
        ))
    }

    fn upload_prefix(id: &str) -> Path {
        Path::from(format!("dockyard/uploads/{id}"))
    }

    fn upload_part_key(id: &str, offset: u64) -> Path {
        Path::from(format!("dockyard/uploads/{id}/{offset:020}"))
    }

    fn upload_data_key(id: &str) -> Path {
        Path::from(format!("dockyard/uploads/{id}/data"))
    }

    /// Writes a chunk of upload `id` at `offset` (the session's accepted
    /// size), hashing it into `hasher`, refusing more than `limit` bytes.
    /// Returns the chunk's length. On error the session's accepted bytes are
    /// untouched.
    pub async fn upload_append<S, E>(
        &self,
        id: &str,
        offset: u64,
        body: S,
        hasher: Option<&mut DigestHasher>,
        limit: Option<u64>,
    ) -> Result<u64, WriteError>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let Some(local) = &self.local else {
            return self
                .write(&Self::upload_part_key(id, offset), body, hasher, limit)
                .await;
        };
        let store_err = |e: std::io::Error| WriteError::Store(e.to_string());
        let path = local
            .path_to_filesystem(&Self::upload_data_key(id))
            .map_err(|e| WriteError::Store(e.to_string()))?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(store_err)?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .await
            .map_err(store_err)?;
        // Drop whatever a failed request left past the accepted size.
        file.set_len(offset).await.map_err(store_err)?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(store_err)?;
        let mut w = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut body = body;
        let mut hasher = hasher;
        let mut n: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
            n += chunk.len() as u64;
            if let Some(l) = limit
                && n > l
            {
                return Err(WriteError::TooLarge(l));
            }
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&chunk);
            }
            w.write_all(&chunk).await.map_err(store_err)?;
        }
        w.flush().await.map_err(store_err)?;
        w.into_inner().sync_data().await.map_err(store_err)?;
        Ok(n)
    }

    /// The stored pieces of upload `id`, in order, checked to hold exactly
    /// `size` bytes.
    async fn upload_pieces(&self, id: &str, size: u64) -> Result<Vec<Piece>, StorageError> {
        if self.local.is_some() {
            if size == 0 {
                return Ok(vec![]);
            }
            return Ok(vec![Piece {
                key: Self::upload_data_key(id),
                len: size,
            }]);
        }
        let mut listed = self.list(&Self::upload_prefix(id)).await?;
        listed.sort_by(|a, b| a.key.as_ref().cmp(b.key.as_ref()));
        let mut pieces = Vec::new();
        let mut offset = 0u64;
        for p in listed {
            let Some(o) = p.key.filename().and_then(|f| f.parse::<u64>().ok()) else {
                continue;
            };
            if o >= size || p.size == 0 {
                // Written by a request that failed before it was recorded.
                continue;
            }
            if o != offset {
                return Err(StorageError::Other(format!(
                    "upload {id}: chunk at {o}, expected {offset}"
                )));
            }
            offset += p.size;
            pieces.push(Piece {
                key: p.key,
                len: p.size,
            });
        }
        if offset != size {
            return Err(StorageError::Other(format!(
                "upload {id}: chunks hold {offset} bytes, the session {size}"
            )));
        }
        Ok(pieces)
    }

    /// Hashes the first `size` bytes of upload `id` (after a restart lost
    /// the running hash).
    pub async fn upload_hash(
        &self,
        id: &str,
        size: u64,
        hasher: &mut DigestHasher,
    ) -> Result<(), StorageError> {
        for p in self.upload_pieces(id, size).await? {
            let mut s = self.read(&p.key, Some(0..p.len)).await?;
            while let Some(chunk) = s.next().await {
                hasher.update(&chunk?);
            }
        }
        Ok(())
    }

    /// Moves the first `size` bytes of upload `id` to `dest` (a rename when
    /// they are one piece).
    pub async fn upload_commit(&self, id: &str, size: u64, dest: &Path) -> Result<(), WriteError> {
        let store = |e: StorageError| WriteError::Store(e.to_string());
        let pieces = self.upload_pieces(id, size).await.map_err(store)?;
        match pieces.as_slice() {
            [] => {
                let empty = futures::stream::empty::<Result<Bytes, std::io::Error>>();
                self.write(dest, empty, None, None).await?;
            }
            [one] => {
                if let Some(local) = &self.local {
                    let path = local
                        .path_to_filesystem(&one.key)
                        .map_err(|e| WriteError::Store(e.to_string()))?;
                    let f = tokio::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .await
                        .map_err(|e| WriteError::Store(e.to_string()))?;
                    f.set_len(one.len)
                        .await
                        .map_err(|e| WriteError::Store(e.to_string()))?;
                }
                self.rename(&one.key, dest).await.map_err(store)?;
            }
            many => {
                let keys: Vec<Path> = many.iter().map(|p| p.key.clone()).collect();
                self.concat(&keys, dest, None).await?;
            }
        }
        Ok(())
    }

    /// Deletes everything stored for upload `id`.
    pub async fn upload_delete(&self, id: &str) -> Result<(), StorageError> {
        self.delete_prefix(&Self::upload_prefix(id)).await
    }

    fn local_path(&self, key: &Path) -> Option<Result<PathBuf, StorageError>> {
        self.local
            .as_ref()
            .map(|l| l.path_to_filesystem(key).map_err(StorageError::from))
    }

    /// Streams `body` into `key`, updating `hasher` with every byte, refusing
    /// more than `limit` bytes. Returns the number of bytes written. Nothing
    /// is visible at `key` unless this returns `Ok`.
    pub async fn write<S, E>(
        &self,
        key: &Path,
        body: S,
        mut hasher: Option<&mut DigestHasher>,
        limit: Option<u64>,
    ) -> Result<u64, WriteError>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut body = body;
        let mut n: u64 = 0;
        let check = |chunk: &Bytes, n: &mut u64| -> Result<(), WriteError> {
            *n += chunk.len() as u64;
            if let Some(l) = limit
                && *n > l
            {
                return Err(WriteError::TooLarge(l));
            }
            Ok(())
        };
        if let Some(local) = &self.local {
            let store_err = |e: std::io::Error| WriteError::Store(e.to_string());
            let final_path = local
                .path_to_filesystem(key)
                .map_err(|e| WriteError::Store(e.to_string()))?;
            let tmp = local
                .path_to_filesystem(&Path::from(format!(
                    "dockyard/tmp/{}",
                    uuid::Uuid::new_v4().simple()
                )))
                .map_err(|e| WriteError::Store(e.to_string()))?;
            let result: Result<(), WriteError> = async {
                if let Some(dir) = tmp.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(store_err)?;
                }
                let file = tokio::fs::File::create(&tmp).await.map_err(store_err)?;
                let mut w = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
                    check(&chunk, &mut n)?;
                    if let Some(h) = hasher.as_deref_mut() {
                        h.update(&chunk);
                    }
                    w.write_all(&chunk).await.map_err(store_err)?;
                }
                w.flush().await.map_err(store_err)?;
                w.into_inner().sync_data().await.map_err(store_err)?;
                if let Some(dir) = final_path.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(store_err)?;
                }
                tokio::fs::rename(&tmp, &final_path)
                    .await
                    .map_err(store_err)?;
                Ok(())
            }
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            return result.map(|()| n);
        }
        let upload = self
            .store
            .put_multipart(key)
            .await
            .map_err(|e| WriteError::Store(e.to_string()))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let result: Result<(), WriteError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
                check(&chunk, &mut n)?;
                if let Some(h) = hasher.as_deref_mut() {
                    h.update(&chunk);
                }
                w.wait_for_capacity(4)
                    .await
                    .map_err(|e| WriteError::Store(e.to_string()))?;
                w.write(&chunk);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                w.finish()
                    .await
                    .map_err(|e| WriteError::Store(e.to_string()))?;
                Ok(n)
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }

    /// Streams the object at `key`, or the byte `range` of it.
    pub async fn read(
        &self,
        key: &Path,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>, StorageError> {
        if let Some(path) = self.local_path(key) {
            let mut file = tokio::fs::File::open(path?).await?;
            let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match range {
                Some(r) => {
                    file.seek(std::io::SeekFrom::Start(r.start)).await?;
                    Box::new(file.take(r.end - r.start))
                }
                None => Box::new(file),
            };
            return Ok(tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK).boxed());
        }
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let r = self.store.get_opts(key, opts).await?;
        Ok(r.into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed())
    }

    /// The object's size, or `None` if absent.
    pub async fn size(&self, key: &Path) -> Result<Option<u64>, StorageError> {
        if let Some(path) = self.local_path(key) {
            return match tokio::fs::metadata(path?).await {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
        match self.store.head(key).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves an object (atomic rename on the filesystem; copy and delete on
    /// object stores).
    pub async fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        Ok(self.store.rename(from, to).await?)
    }

    /// Deletes an object; absent is fine.
    pub async fn delete(&self, key: &Path) -> Result<(), StorageError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists every object under `prefix`.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<Listed>, StorageError> {
        let items: Vec<_> = self.store.list(Some(prefix)).try_collect().await?;
        Ok(items
            .into_iter()
            .map(|m| Listed {
                key: m.location,
                size: m.size,
                modified_millis: m.last_modified.timestamp_millis(),
            })
            .collect())
    }

    /// Deletes every object under `prefix`.
    pub async fn delete_prefix(&self, prefix: &Path) -> Result<(), StorageError> {
        for item in self.list(prefix).await? {
            self.delete(&item.key).await?;
        }
        Ok(())
    }

    /// Writes the concatenation of `parts` to `to`, hashing it on the way.
    async fn concat(
        &self,
        parts: &[Path],
        to: &Path,
        hasher: Option<&mut DigestHasher>,
    ) -> Result<u64, WriteError> {
        let this = self.clone();
        let parts = parts.to_vec();
        let stream = futures::stream::iter(parts)
            .then(move |p| {
                let this = this.clone();
                async move { this.read(&p, None).await }
            })
            .map_err(|e| std::io::Error::other(e.to_string()))
            .try_flatten()
            .boxed();
        self.write(to, stream, hasher, None)
            .await
            .map_err(|e| match e {
                WriteError::Body(m) => WriteError::Store(m),
                e => e,
            })
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StorageError> {
        if let Some(l) = &self.local {
            let root = l.path_to_filesystem(&Path::from("probe"))?;
            let root = root.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            tokio::fs::metadata(root).await?;
            return Ok(());
        }
        match self.store.head(&Path::from("dockyard/probe")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
