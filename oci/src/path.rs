//! The `/v2` path grammar. Repository names contain `/`, so the server routes
//! `/v2/{*rest}` once and this module turns the path into a closed [`Route`];
//! authorization and dispatch then match on it.

use crate::digest::Digest;
use crate::name::{Reference, RepoName};

/// An endpoint of the Distribution API, with its validated parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(RepoName, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, Digest),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(RepoName, String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepoName, Digest),
}

impl Route {
    /// Every value [`Route::kind`] can return; tests that must cover every
    /// endpoint (the permission matrix) check against this list.
    pub const KINDS: [&'static str; 8] = [
        "base",
        "catalog",
        "tags",
        "manifest",
        "blob",
        "upload_start",
        "upload",
        "referrers",
    ];

    /// A short, low-cardinality name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) => "upload_start",
            Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }

    /// The repository the route addresses, if any.
    pub fn repository(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(n)
            | Route::Manifest(n, _)
            | Route::Blob(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Referrers(n, _) => Some(n),
        }
    }
}

/// Why a `/v2` path does not name an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint")]
    NotFound,
    #[error("{0}")]
    NameInvalid(String),
    #[error("invalid manifest reference: {0}")]
    ReferenceInvalid(String),
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    #[error("invalid upload id")]
    UploadInvalid,
}

fn name(s: &str) -> Result<RepoName, RouteError> {
    s.parse()
        .map_err(|e: crate::name::NameError| RouteError::NameInvalid(e.to_string()))
}

fn digest(s: &str) -> Result<Digest, RouteError> {
    s.parse()
        .map_err(|e: crate::digest::DigestError| RouteError::DigestInvalid(e.to_string()))
}

/// Splits `path` at the last `sep` whose tail is one path segment.
fn split_tail<'a>(path: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let i = path.rfind(sep)?;
    let tail = &path[i + sep.len()..];
    if tail.is_empty() || tail.contains('/') {
        return None;
    }
    Some((&path[..i], tail))
}

fn valid_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Parses a request path (raw, not percent-decoded) starting with `/v2`.
pub fn parse_route(path: &str) -> Result<Route, RouteError> {
    let rest = path.strip_prefix("/v2").ok_or(RouteError::NotFound)?;
    if rest.is_empty() || rest == "/" {
        return Ok(Route::Base);
    }
    let rest = rest.strip_prefix('/').ok_or(RouteError::NotFound)?;
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    if let Some(n) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags(name(n)?));
    }
    if let Some(n) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Ok(Route::UploadStart(name(n)?));
    }
    if let Some((n, id)) = split_tail(rest, "/blobs/uploads/") {
        let n = name(n)?;
        if !valid_upload_id(id) {
            return Err(RouteError::UploadInvalid);
        }
        return Ok(Route::Upload(n, id.to_string()));
    }
    if let Some((n, r)) = split_tail(rest, "/manifests/") {
        let n = name(n)?;
        let r: Reference = r.parse().map_err(|e: crate::name::ReferenceError| {
            RouteError::ReferenceInvalid(e.to_string())
        })?;
        return Ok(Route::Manifest(n, r));
    }
    if let Some((n, d)) = split_tail(rest, "/blobs/") {
        let n = name(n)?;
        return Ok(Route::Blob(n, digest(d)?));
    }
    if let Some((n, d)) = split_tail(rest, "/referrers/") {
        let n = name(n)?;
        return Ok(Route::Referrers(n, digest(d)?));
    }
    Err(RouteError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/").unwrap(), Route::Base);
        assert_eq!(parse_route("/v2").unwrap(), Route::Base);
        assert_eq!(parse_route("/v2/_catalog").unwrap(), Route::Catalog);
        assert_eq!(parse_route("/v2/a/b/tags/list").unwrap().kind(), "tags");
        assert_eq!(
            parse_route("/v2/a/blobs/uploads/").unwrap(),
            Route::UploadStart("a".parse().unwrap())
        );
        assert_eq!(
            parse_route("/v2/a/manifests/blobs/uploads/x").unwrap(),
            Route::Upload("a/manifests".parse().unwrap(), "x".into())
        );
        match parse_route(&format!("/v2/x/manifests/y/manifests/{D}")).unwrap() {
            Route::Manifest(n, Reference::Digest(d)) => {
                assert_eq!(n.as_str(), "x/manifests/y");
                assert_eq!(d.to_string(), D);
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(
            parse_route(&format!("/v2/a/blobs/{D}")).unwrap().kind(),
            "blob"
        );
        assert_eq!(
            parse_route(&format!("/v2/a/referrers/{D}")).unwrap().kind(),
            "referrers"
        );
    }

    #[test]
    fn kinds_are_listed() {
        let d: crate::Digest = D.parse().unwrap();
        let n: RepoName = "a".parse().unwrap();
        for r in [
            Route::Base,
            Route::Catalog,
            Route::Tags(n.clone()),
            Route::Manifest(n.clone(), Reference::Digest(d.clone())),
            Route::Blob(n.clone(), d.clone()),
            Route::UploadStart(n.clone()),
            Route::Upload(n.clone(), "x".into()),
            Route::Referrers(n, d),
        ] {
            assert!(Route::KINDS.contains(&r.kind()), "{r:?}");
        }
    }

    #[test]
    fn bad_paths() {
        assert_eq!(parse_route("/v2/a/b"), Err(RouteError::NotFound));
        assert_eq!(parse_route("/v3/"), Err(RouteError::NotFound));
        assert!(matches!(
            parse_route("/v2/../etc/manifests/latest"),
            Err(RouteError::NameInvalid(_))
        ));
        assert!(matches!(
            parse_route("/v2/a/manifests/..%2f"),
            Err(RouteError::ReferenceInvalid(_))
        ));
        assert!(matches!(
            parse_route("/v2/a/blobs/sha256:..%2f..%2f"),
            Err(RouteError::DigestInvalid(_))
        ));
        assert!(matches!(
            parse_route("/v2/A/tags/list"),
            Err(RouteError::NameInvalid(_))
        ));
        assert_eq!(
            parse_route("/v2/a/blobs/uploads/..%2f"),
            Err(RouteError::UploadInvalid)
        );
    }
}
