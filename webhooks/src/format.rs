//! Request bodies, rendered once per delivery at fan-out.
//!
//! - `dockyard`: `{id, type, time, repository, tag, digest, actor, data}`.
//! - `cloudevents`: a CloudEvents 1.0 event in structured mode
//!   (`application/cloudevents+json`): `specversion`, `id` (the event id),
//!   `source` (`<public url>/<repository>`), `type` (`io.dockyard.<type>`),
//!   `time`, `subject` (the tag, else the digest), `datacontenttype` and
//!   `data` (the event's details with `repository`, `tag`, `digest` and
//!   `actor` added).
//! - `distribution`: CNCF Distribution's notification envelope
//!   (`application/vnd.docker.distribution.events.v1+json`), for receivers
//!   written for it; it carries pushes, pulls and deletes of manifests only
//!   (see [`distribution_action`]).

use dockyard_core::events::{Event, kinds};
use serde_json::{Map, Value, json};

/// A body format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Dockyard,
    CloudEvents,
    Distribution,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Dockyard, Format::CloudEvents, Format::Distribution];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Dockyard => "dockyard",
            Format::CloudEvents => "cloudevents",
            Format::Distribution => "distribution",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// The `Content-Type` of its requests.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Dockyard => "application/json",
            Format::CloudEvents => "application/cloudevents+json",
            Format::Distribution => "application/vnd.docker.distribution.events.v1+json",
        }
    }

    /// Whether events of type `kind` can be sent in this format at all.
    pub fn carries(self, kind: &str) -> bool {
        match self {
            Format::Distribution => DISTRIBUTION_TYPES.contains(&kind),
            _ => true,
        }
    }
}

/// The event types the Distribution format carries (`tag.created` and
/// `tag.moved` only when the manifest was not new, see
/// [`distribution_action`]).
pub const DISTRIBUTION_TYPES: &[&str] = &[
    kinds::MANIFEST_PUSHED,
    kinds::TAG_CREATED,
    kinds::TAG_MOVED,
    kinds::MANIFEST_PULLED,
    kinds::MANIFEST_DELETED,
    kinds::TAG_DELETED,
];

/// What bodies link to and say about their origin.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    /// Public base URL, no trailing slash.
    pub public_url: &'a str,
    /// `host:port` of the server.
    pub source_addr: &'a str,
    /// This process's id.
    pub instance_id: &'a str,
}

/// RFC 3339 time of a Unix-milliseconds timestamp, in UTC.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// The body of `event` in `format`, or `None` when the format does not
/// carry this event.
pub fn render(format: Format, event: &Event, origin: &Origin<'_>) -> Option<String> {
    let v = match format {
        Format::Dockyard => dockyard(event),
        Format::CloudEvents => cloudevents(event, origin),
        Format::Distribution => distribution(event, origin)?,
    };
    Some(v.to_string())
}

fn dockyard(e: &Event) -> Value {
    json!({
        "id": e.id,
        "type": e.kind,
        "time": rfc3339(e.created_at),
        "repository": e.repository,
        "tag": e.tag,
        "digest": e.digest,
        "actor": e.actor,
        "data": e.data,
    })
}

fn cloudevents(e: &Event, origin: &Origin<'_>) -> Value {
    let source = match &e.repository {
        Some(r) => format!("{}/{r}", origin.public_url),
        None => origin.public_url.to_string(),
    };
    let mut data = match &e.data {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("value".into(), other.clone());
            m
        }
    };
    for (k, v) in [
        ("repository", &e.repository),
        ("tag", &e.tag),
        ("digest", &e.digest),
        ("actor", &e.actor),
    ] {
        data.insert(k.into(), json!(v));
    }
    let mut ce = json!({
        "specversion": "1.0",
        "id": e.id.to_string(),
        "source": source,
        "type": format!("io.dockyard.{}", e.kind),
        "time": rfc3339(e.created_at),
        "datacontenttype": "application/json",
        "data": data,
    });
    if let Some(subject) = e.tag.as_ref().or(e.digest.as_ref()) {
        ce["subject"] = json!(subject);
    }
    ce
}

/// Distribution's `action` for an event, or `None` when that format does
/// not carry it: `manifest.pushed` → push; `tag.created` / `tag.moved` →
/// push only when the manifest already existed (`data.manifest_new` false;
/// otherwise the `manifest.pushed` of the same push already says it);
/// `manifest.pulled` → pull; `manifest.deleted` / `tag.deleted` → delete.
pub fn distribution_action(e: &Event) -> Option<&'static str> {
    match e.kind.as_str() {
        kinds::MANIFEST_PUSHED => Some("push"),
        kinds::TAG_CREATED | kinds::TAG_MOVED
            if e.data.get("manifest_new").and_then(Value::as_bool) == Some(false) =>
        {
            Some("push")
        }
        kinds::MANIFEST_PULLED => Some("pull"),
        kinds::MANIFEST_DELETED | kinds::TAG_DELETED => Some("delete"),
        _ => None,
    }
}

fn distribution(e: &Event, origin: &Origin<'_>) -> Option<Value> {
    let action = distribution_action(e)?;
    let repository = e.repository.clone().unwrap_or_default();
    let mut target = Map::new();
    if let Some(mt) = e.data.get("media_type").and_then(Value::as_str) {
        target.insert("mediaType".into(), json!(mt));
    }
    if let Some(size) = e.data.get("size").and_then(Value::as_i64) {
        target.insert("size".into(), json!(size));
    }
    if let Some(d) = &e.digest {
        target.insert("digest".into(), json!(d));
    }
    if let Some(size) = e.data.get("size").and_then(Value::as_i64) {
        // Distribution sends both (`length` for backwards compatibility).
        target.insert("length".into(), json!(size));
    }
    target.insert("repository".into(), json!(repository));
    if let Some(reference) = e.digest.as_ref().or(e.tag.as_ref()) {
        target.insert(
            "url".into(),
            json!(format!(
                "{}/v2/{repository}/manifests/{reference}",
                origin.public_url
            )),
        );
    }
    if let Some(t) = &e.tag {
        target.insert("tag".into(), json!(t));
    }
    let method = match action {
        "push" => "PUT",
        "pull" => "GET",
        _ => "DELETE",
    };
    let host = url::Url::parse(origin.public_url)
        .ok()
        .and_then(|u| {
            u.host_str()
                .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
        })
        .unwrap_or_default();
    let mut actor = Map::new();
    if let Some(a) = &e.actor {
        actor.insert("name".into(), json!(a));
    }
    Some(json!({
        "events": [{
            "id": e.id.to_string(),
            "timestamp": rfc3339(e.created_at),
            "action": action,
            "target": target,
            // The event log does not keep the request that caused an
            // event; its id and user agent are empty, as Distribution's
            // format allows for unknown values.
            "request": {
                "id": "",
                "host": host,
                "method": method,
                "useragent": "",
            },
            "actor": actor,
            "source": {
                "addr": origin.source_addr,
                "instanceID": origin.instance_id,
            },
        }]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, tag: Option<&str>, data: Value) -> Event {
        Event {
            id: 42,
            kind: kind.into(),
            namespace: Some("acme".into()),
            repository: Some("acme/app".into()),
            tag: tag.map(str::to_string),
            digest: Some("sha256:abc".into()),
            actor: Some("alice".into()),
            data,
            created_at: 1_700_000_000_123,
        }
    }

    const ORIGIN: Origin<'static> = Origin {
        public_url: "https://registry.example:5000",
        source_addr: "registry.example:5000",
        instance_id: "i-1",
    };

    #[test]
    fn time_is_rfc3339_utc() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn dockyard_and_cloudevents_bodies() {
        let e = event(
            "manifest.pushed",
            Some("v1"),
            json!({"media_type": "application/vnd.oci.image.manifest.v1+json", "size": 7}),
        );
        let d: Value =
            serde_json::from_str(&render(Format::Dockyard, &e, &ORIGIN).unwrap()).unwrap();
        assert_eq!(
            d,
            json!({"id": 42, "type": "manifest.pushed", "time": "2023-11-14T22:13:20.123Z",
                   "repository": "acme/app", "tag": "v1", "digest": "sha256:abc", "actor": "alice",
                   "data": {"media_type": "application/vnd.oci.image.manifest.v1+json", "size": 7}})
        );
        let c: Value =
            serde_json::from_str(&render(Format::CloudEvents, &e, &ORIGIN).unwrap()).unwrap();
        assert_eq!(c["specversion"], "1.0");
        assert_eq!(c["id"], "42");
        assert_eq!(c["source"], "https://registry.example:5000/acme/app");
        assert_eq!(c["type"], "io.dockyard.manifest.pushed");
        assert_eq!(c["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(c["subject"], "v1");
        assert_eq!(c["datacontenttype"], "application/json");
        assert_eq!(c["data"]["size"], 7);
        assert_eq!(c["data"]["digest"], "sha256:abc");
        assert_eq!(c["data"]["repository"], "acme/app");
        // No tag: the subject is the digest.
        let e = event("manifest.deleted", None, json!({"tags": []}));
        let c: Value =
            serde_json::from_str(&render(Format::CloudEvents, &e, &ORIGIN).unwrap()).unwrap();
        assert_eq!(c["subject"], "sha256:abc");
    }

    #[test]
    fn distribution_envelope_and_mapping() {
        let e = event(
            "manifest.pushed",
            Some("v1"),
            json!({"media_type": "application/vnd.oci.image.manifest.v1+json", "size": 7}),
        );
        let v: Value =
            serde_json::from_str(&render(Format::Distribution, &e, &ORIGIN).unwrap()).unwrap();
        let ev = &v["events"][0];
        assert_eq!(v["events"].as_array().unwrap().len(), 1);
        assert_eq!(ev["id"], "42");
        assert_eq!(ev["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(ev["action"], "push");
        assert_eq!(
            ev["target"],
            json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 7,
                   "digest": "sha256:abc", "length": 7, "repository": "acme/app",
                   "url": "https://registry.example:5000/v2/acme/app/manifests/sha256:abc",
                   "tag": "v1"})
        );
        assert_eq!(ev["request"]["method"], "PUT");
        assert_eq!(ev["request"]["host"], "registry.example:5000");
        assert_eq!(ev["actor"], json!({"name": "alice"}));
        assert_eq!(
            ev["source"],
            json!({"addr": "registry.example:5000", "instanceID": "i-1"})
        );
        let map = |kind: &str, data: Value| distribution_action(&event(kind, Some("t"), data));
        assert_eq!(map("tag.created", json!({"manifest_new": true})), None);
        assert_eq!(
            map("tag.created", json!({"manifest_new": false})),
            Some("push")
        );
        assert_eq!(
            map("tag.moved", json!({"manifest_new": false})),
            Some("push")
        );
        assert_eq!(map("manifest.pulled", json!({"count": 3})), Some("pull"));
        assert_eq!(map("manifest.deleted", json!({})), Some("delete"));
        assert_eq!(map("tag.deleted", json!({})), Some("delete"));
        for kind in ["repository.created", "build.queued", "build.succeeded"] {
            assert_eq!(map(kind, json!({})), None);
            assert!(render(Format::Distribution, &event(kind, None, json!({})), &ORIGIN).is_none());
        }
    }
}
