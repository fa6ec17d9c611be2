//! Registry bearer tokens (Docker token authentication): the signing keys,
//! and issuing and verifying the JWTs.
//!
//! Keys are ECDSA P-256 (ES256). Each key has a self-signed certificate; a
//! token's header carries the key id in Docker's libtrust fingerprint format
//! (`kid`) and the certificate (`x5c`), so a stock `notary-server` configured
//! with the certificate in its `rootcertbundle` accepts the tokens.
//!
//! Rotation: keys live in `<data_dir>/keys/token-<unix seconds>.{key,crt}`.
//! The newest signs; every key present verifies, so tokens signed before a
//! rotation stay valid until they expire. Remove an old key once its tokens
//! have expired.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// One access grant of a token, as in Docker's token specification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// `repository` (or `registry` for the catalog).
    #[serde(rename = "type")]
    pub kind: String,
    /// The resource name, e.g. `library/app`.
    pub name: String,
    /// Granted actions: `pull`, `push`, `delete`, `*`.
    pub actions: Vec<String>,
}

/// The claims of a registry token. `aud` is one string: notary-server
/// refuses an array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token key storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("token key: {0}")]
    Key(String),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token signed by an unknown key")]
    UnknownKey,
}

/// A key that signs (the newest) or only verifies (older ones).
struct Key {
    kid: String,
    /// Base64 (standard) DER of the certificate, for `x5c`.
    cert_b64: String,
    cert_pem: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The token keys of this installation.
pub struct TokenKeys {
    /// Newest first.
    keys: Vec<Key>,
}

/// Docker's libtrust key id: SHA-256 of the DER SubjectPublicKeyInfo,
/// truncated to 240 bits, base32 without padding, in 12 groups of 4
/// characters joined by `:`.
pub fn libtrust_kid(spki_der: &[u8]) -> String {
    let hash = sha2::Sha256::digest(spki_der);
    let b32 = data_encoding::BASE32_NOPAD.encode(&hash[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("base32 is ASCII"))
        .collect::<Vec<_>>()
        .join(":")
}

fn load_key(key_path: &Path, cert_path: &Path) -> Result<Key, TokenError> {
    let key_pem = std::fs::read_to_string(key_path)?;
    let cert_pem = std::fs::read_to_string(cert_path)?;
    let kp = rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| TokenError::Key(format!("{}: {e}", key_path.display())))?;
    let cert = pem::parse(&cert_pem)
        .map_err(|e| TokenError::Key(format!("{}: {e}", cert_path.display())))?;
    use base64::Engine as _;
    Ok(Key {
        kid: libtrust_kid(&rcgen::PublicKeyData::subject_public_key_info(&kp)),
        cert_b64: base64::engine::general_purpose::STANDARD.encode(cert.contents()),
        cert_pem,
        encoding: EncodingKey::from_ec_pem(key_pem.as_bytes())
            .map_err(|e| TokenError::Key(e.to_string()))?,
        decoding: DecodingKey::from_ec_pem(kp.public_key_pem().as_bytes())
            .map_err(|e| TokenError::Key(e.to_string()))?,
    })
}

fn create_key(dir: &Path, issuer: &str) -> Result<(), TokenError> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TokenError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| TokenError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{issuer} token signer"));
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params
        .self_signed(&kp)
        .map_err(|e| TokenError::Key(e.to_string()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::fs::create_dir_all(dir)?;
    let key_path = dir.join(format!("token-{stamp}.key"));
    write_private(&key_path, kp.serialize_pem().as_bytes())?;
    std::fs::write(dir.join(format!("token-{stamp}.crt")), cert.pem())?;
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

fn key_files(dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, TokenError> {
    let mut stamps: Vec<u128> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("token-")?
                    .strip_suffix(".key")?
                    .parse()
                    .ok()
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e.into()),
    };
    stamps.sort_unstable_by(|a, b| b.cmp(a));
    Ok(stamps
        .into_iter()
        .map(|s| {
            (
                dir.join(format!("token-{s}.key")),
                dir.join(format!("token-{s}.crt")),
            )
        })
        .collect())
}

impl TokenKeys {
    /// Loads the keys in `dir`, creating the first one if there is none.
    pub fn load_or_create(dir: &Path, issuer: &str) -> Result<TokenKeys, TokenError> {
        if key_files(dir)?.is_empty() {
            create_key(dir, issuer)?;
        }
        Self::load(dir)
    }

    /// Adds a new signing key; older keys keep verifying.
    pub fn rotate(dir: &Path, issuer: &str) -> Result<TokenKeys, TokenError> {
        create_key(dir, issuer)?;
        Self::load(dir)
    }

    fn load(dir: &Path) -> Result<TokenKeys, TokenError> {
        let keys = key_files(dir)?
            .iter()
            .map(|(k, c)| load_key(k, c))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(TokenError::Key(format!(
                "no token key in {}",
                dir.display()
            )));
        }
        Ok(TokenKeys { keys })
    }

    /// The key id of the signing key.
    pub fn kid(&self) -> &str {
        &self.keys[0].kid
    }

    /// PEM certificates of every key (for notary's `rootcertbundle`).
    pub fn certificates_pem(&self) -> String {
        self.keys.iter().map(|k| k.cert_pem.as_str()).collect()
    }

    /// Signs `claims` with the newest key.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let k = &self.keys[0];
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(k.kid.clone());
        header.x5c = Some(vec![k.cert_b64.clone()]);
        jsonwebtoken::encode(&header, claims, &k.encoding)
            .map_err(|e| TokenError::Key(e.to_string()))
    }

    /// Verifies signature, issuer, audience and time, with any known key.
    pub fn verify(&self, token: &str, issuer: &str, audience: &str) -> Result<Claims, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = self
            .keys
            .iter()
            .find(|k| header.kid.as_deref() == Some(k.kid.as_str()))
            .ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[issuer]);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        v.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(aud: &str, exp_in: i64) -> Claims {
        let now = crate::now_millis() / 1000;
        Claims {
            iss: "dockyard".into(),
            sub: "alice".into(),
            aud: aud.into(),
            exp: now + exp_in,
            nbf: now - 1,
            iat: now,
            jti: "j1".into(),
            access: vec![Access {
                kind: "repository".into(),
                name: "a/b".into(),
                actions: vec!["pull".into()],
            }],
        }
    }

    #[test]
    fn libtrust_kid_format() {
        let kid = libtrust_kid(b"anything");
        assert_eq!(kid.len(), 12 * 4 + 11);
        assert!(kid.split(':').all(|g| {
            g.len() == 4
                && g.chars()
                    .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))
        }));
    }

    #[test]
    fn sign_verify_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TokenKeys::load_or_create(dir.path(), "dockyard").unwrap();
        let t = keys.sign(&claims("svc", 300)).unwrap();
        let header = jsonwebtoken::decode_header(&t).unwrap();
        assert_eq!(header.kid.as_deref(), Some(keys.kid()));
        assert_eq!(header.x5c.as_ref().map(Vec::len), Some(1));
        // `aud` is a string, not an array.
        use base64::Engine as _;
        let payload = t.split('.').nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert!(json["aud"].is_string());
        assert_eq!(keys.verify(&t, "dockyard", "svc").unwrap().sub, "alice");
        assert!(keys.verify(&t, "dockyard", "other").is_err());
        assert!(keys.verify(&t, "someone", "svc").is_err());
        // Expired.
        let old = keys.sign(&claims("svc", -60)).unwrap();
        assert!(keys.verify(&old, "dockyard", "svc").is_err());
        // Tampered payload.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&claims("svc", 9999)).unwrap());
        parts[1] = &forged;
        assert!(keys.verify(&parts.join("."), "dockyard", "svc").is_err());
        // Rotation: the new key signs, the old token still verifies.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let rotated = TokenKeys::rotate(dir.path(), "dockyard").unwrap();
        assert_ne!(rotated.kid(), keys.kid());
        assert_eq!(rotated.verify(&t, "dockyard", "svc").unwrap().sub, "alice");
        assert_eq!(
            rotated
                .certificates_pem()
                .matches("BEGIN CERTIFICATE")
                .count(),
            2
        );
        // A key from another installation is unknown.
        let other_dir = tempfile::tempdir().unwrap();
        let other = TokenKeys::load_or_create(other_dir.path(), "dockyard").unwrap();
        let foreign = other.sign(&claims("svc", 300)).unwrap();
        assert!(matches!(
            rotated.verify(&foreign, "dockyard", "svc"),
            Err(TokenError::UnknownKey)
        ));
    }
}
