//! Manifest parsing and validation for OCI image manifests and indexes and
//! Docker schema 2 manifests and manifest lists.
//!
//! Parsing is deliberately lenient about fields the registry does not need
//! (annotations, platform details, URLs) and strict about what it relies on:
//! `schemaVersion`, the media type, and every descriptor's `mediaType`,
//! `digest` and `size`, because those decide what a manifest references.

use serde::Deserialize;

use crate::digest::Digest;
use crate::media_type::{self, is_index};

/// A content descriptor: what a manifest points at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A parsed, validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest's media type (one of [`media_type::MANIFEST_TYPES`]).
    pub media_type: String,
    /// `config` of an image manifest.
    pub config: Option<Descriptor>,
    /// `layers` of an image manifest (or `blobs` of the old artifact manifest).
    pub layers: Vec<Descriptor>,
    /// `manifests` of an index.
    pub manifests: Vec<Descriptor>,
    /// `subject`, which makes this manifest a referrer of another one.
    pub subject: Option<Descriptor>,
    /// `artifactType`, or for an image manifest without one, the config's
    /// media type (as the referrers API defines it).
    pub artifact_type: Option<String>,
    /// `annotations` of the manifest itself.
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest is not valid: {0}")]
    Invalid(String),
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: Option<String>,
    size: Option<i64>,
    artifact_type: Option<String>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    blobs: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

fn descriptor(raw: RawDescriptor, what: &str) -> Result<Descriptor, ManifestError> {
    let media_type = raw
        .media_type
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ManifestError::Invalid(format!("{what}: mediaType is required")))?;
    let digest = raw
        .digest
        .ok_or_else(|| ManifestError::Invalid(format!("{what}: digest is required")))?
        .parse()
        .map_err(|e| ManifestError::Invalid(format!("{what}: {e}")))?;
    let size = raw
        .size
        .ok_or_else(|| ManifestError::Invalid(format!("{what}: size is required")))?;
    let size = u64::try_from(size)
        .map_err(|_| ManifestError::Invalid(format!("{what}: size must not be negative")))?;
    Ok(Descriptor {
        media_type,
        digest,
        size,
        artifact_type: raw.artifact_type,
        annotations: raw.annotations,
    })
}

impl Manifest {
    /// Parses `body`, sent with `content_type` (may be empty).
    ///
    /// The media type is the request's `Content-Type` when it names a manifest
    /// type, else the body's `mediaType`, else inferred from the shape (an OCI
    /// manifest has `config`, an OCI index has `manifests`). A `mediaType`
    /// field that contradicts the `Content-Type` is refused.
    pub fn parse(content_type: &str, body: &[u8]) -> Result<Manifest, ManifestError> {
        let raw: RawManifest =
            serde_json::from_slice(body).map_err(|e| ManifestError::Json(e.to_string()))?;
        let header = media_type::essence(content_type);
        if header == media_type::DOCKER_SCHEMA1 || header == media_type::DOCKER_SCHEMA1_SIGNED {
            return Err(ManifestError::UnsupportedMediaType(header.to_string()));
        }
        let header_known = media_type::MANIFEST_TYPES.contains(&header);
        let media_type = match (&raw.media_type, header_known) {
            (Some(field), true) if field != header => {
                return Err(ManifestError::Invalid(format!(
                    "mediaType {field:?} does not match Content-Type {header:?}"
                )));
            }
            (_, true) => header.to_string(),
            (Some(field), false) => field.clone(),
            (None, false) if raw.manifests.is_some() => media_type::OCI_INDEX.to_string(),
            (None, false) if raw.config.is_some() => media_type::OCI_MANIFEST.to_string(),
            (None, false) => {
                return Err(ManifestError::Invalid(
                    "cannot tell the manifest's media type".into(),
                ));
            }
        };
        if !media_type::MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(ManifestError::UnsupportedMediaType(media_type));
        }
        if raw.schema_version != Some(2) {
            return Err(ManifestError::Invalid("schemaVersion must be 2".into()));
        }
        let subject = raw.subject.map(|s| descriptor(s, "subject")).transpose()?;
        let annotations = raw.annotations;
        if is_index(&media_type) {
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(ManifestError::Invalid(
                    "an index has no config or layers".into(),
                ));
            }
            let manifests = raw
                .manifests
                .ok_or_else(|| ManifestError::Invalid("manifests is required".into()))?
                .into_iter()
                .enumerate()
                .map(|(i, d)| descriptor(d, &format!("manifests[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Manifest {
                media_type,
                config: None,
                layers: vec![],
                manifests,
                subject,
                artifact_type: raw.artifact_type,
                annotations,
            });
        }
        if raw.manifests.is_some() {
            return Err(ManifestError::Invalid(
                "an image manifest has no manifests list".into(),
            ));
        }
        let config = descriptor(
            raw.config
                .ok_or_else(|| ManifestError::Invalid("config is required".into()))?,
            "config",
        )?;
        let layers = raw
            .layers
            .or(raw.blobs)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, d)| descriptor(d, &format!("layers[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if media_type == media_type::DOCKER_MANIFEST && layers.is_empty() {
            return Err(ManifestError::Invalid(
                "a Docker image manifest needs at least one layer".into(),
            ));
        }
        let artifact_type = raw
            .artifact_type
            .or_else(|| Some(config.media_type.clone()));
        Ok(Manifest {
            media_type,
            config: Some(config),
            layers,
            manifests: vec![],
            subject,
            artifact_type,
            annotations,
        })
    }

    /// Blobs this manifest needs in the repository (config and layers).
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":0}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D}","size":0}}]{extra}}}"#,
            media_type::OCI_MANIFEST
        )
    }

    #[test]
    fn parses_image() {
        let m = Manifest::parse(media_type::OCI_MANIFEST, image("").as_bytes()).unwrap();
        assert_eq!(m.blobs().count(), 2);
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        let m = Manifest::parse("", image("").as_bytes()).unwrap();
        assert_eq!(m.media_type, media_type::OCI_MANIFEST);
    }

    #[test]
    fn refuses_bad() {
        assert!(matches!(
            Manifest::parse("", b"{not json"),
            Err(ManifestError::Json(_))
        ));
        assert!(Manifest::parse(media_type::OCI_INDEX, image("").as_bytes()).is_err());
        let bad_digest = image("").replace(D, "sha256:abc");
        assert!(Manifest::parse("", bad_digest.as_bytes()).is_err());
        let neg = image("").replace("\"size\":0}]", "\"size\":-1}]");
        assert!(Manifest::parse("", neg.as_bytes()).is_err());
        assert!(Manifest::parse("", br#"{"schemaVersion":1}"#).is_err());
        assert!(matches!(
            Manifest::parse(media_type::DOCKER_SCHEMA1_SIGNED, b"{}"),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn subject() {
        let extra = format!(
            r#","subject":{{"mediaType":"{}","digest":"{D}","size":1}},"artifactType":"application/x-sig""#,
            media_type::OCI_MANIFEST
        );
        let m = Manifest::parse("", image(&extra).as_bytes()).unwrap();
        assert_eq!(m.subject.unwrap().digest.to_string(), D);
        assert_eq!(m.artifact_type.as_deref(), Some("application/x-sig"));
    }
}
