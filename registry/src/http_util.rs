//! Small HTTP helpers for the `/v2` handlers: query strings, headers, ranges
//! and content negotiation.

use std::ops::Range;

use axum::http::HeaderMap;
use dockyard_oci::media_type::essence;

/// A header value from text that may not be a valid header (then empty).
pub fn hv(s: &str) -> axum::http::HeaderValue {
    axum::http::HeaderValue::from_str(s)
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static(""))
}

/// A digest from a query parameter, or DIGEST_INVALID.
pub fn digest_param(s: &str) -> crate::Result<dockyard_oci::Digest> {
    s.parse().map_err(|e: dockyard_oci::digest::DigestError| {
        crate::RegistryError::with_message(dockyard_oci::ErrorCode::DigestInvalid, e.to_string())
    })
}

/// The request's query parameters (later duplicates win).
pub fn query(uri: &axum::http::Uri) -> Vec<(String, String)> {
    uri.query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default()
}

pub fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub fn content_length(h: &HeaderMap) -> Option<u64> {
    header(h, "content-length").and_then(|v| v.trim().parse().ok())
}

/// Parses an upload's `Content-Range: <start>-<end>` (also accepting a
/// `bytes ` or `bytes=` prefix and a `/<total>` suffix).
pub fn content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v
        .strip_prefix("bytes=")
        .or_else(|| v.strip_prefix("bytes "))
        .unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// Parses a `Range: bytes=…` request header against an object of `size`
/// bytes. `Ok(None)`: no usable range, serve everything. `Err`: not
/// satisfiable (416).
pub fn byte_range(v: &str, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    // Several ranges would need multipart/byteranges; serve the whole body.
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        size.saturating_sub(n)..size
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            let e: u64 = b.parse().map_err(|_| ())?;
            if e < start {
                return Err(());
            }
            e.saturating_add(1).min(size)
        };
        start..end
    };
    if range.start >= size {
        return Err(());
    }
    Ok(Some(range))
}

/// Whether the client's `Accept` headers allow `media_type`. No `Accept`
/// header (or a wildcard) accepts everything.
pub fn accepts(h: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in h.get_all("accept") {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let e = essence(item);
            if e.is_empty() {
                continue;
            }
            any = true;
            if e == media_type || e == "*/*" || e == "application/*" {
                return true;
            }
        }
    }
    !any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(content_range("0-99"), Some((0, 99)));
        assert_eq!(content_range("bytes 5-9/10"), Some((5, 9)));
        assert_eq!(content_range("9-5"), None);
        assert_eq!(content_range("x"), None);
        assert_eq!(byte_range("bytes=0-9", 100), Ok(Some(0..10)));
        assert_eq!(byte_range("bytes=90-", 100), Ok(Some(90..100)));
        assert_eq!(byte_range("bytes=-10", 100), Ok(Some(90..100)));
        assert_eq!(byte_range("bytes=95-200", 100), Ok(Some(95..100)));
        assert_eq!(byte_range("bytes=100-", 100), Err(()));
        assert_eq!(byte_range("bytes=5-1", 100), Err(()));
        assert_eq!(byte_range("items=0-1", 100), Ok(None));
    }

    #[test]
    fn accept() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, "a/b"));
        h.append("accept", "a/c, a/d;q=0.5".parse().unwrap());
        assert!(!accepts(&h, "a/b"));
        h.append("accept", "a/b".parse().unwrap());
        assert!(accepts(&h, "a/b"));
    }
}
