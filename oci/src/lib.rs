//! The OCI vocabulary: digests, repository names, references, media types,
//! manifest parsing and validation, the Distribution spec's error codes and the
//! `/v2` path grammar.
//!
//! This crate owns *definitions*, shared by the server (registry) and client
//! code (executors, signing, mirroring). It must not do I/O: no tokio, no HTTP
//! framework, no database. Everything here is pure and cheap to test.

pub mod build;
pub mod digest;
pub mod error;
pub mod manifest;
pub mod media_type;
pub mod name;
pub mod path;

pub use digest::{Algorithm, Digest, DigestHasher};
pub use error::ErrorCode;
pub use manifest::{Descriptor, Manifest, ManifestError};
pub use name::{Reference, RepoName, Tag};
pub use path::{Route, RouteError, parse_route};
