//! Subscriptions: who gets which events, where, in which format.

use dockyard_core::events::kinds;
use dockyard_core::now_millis;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::format::{DISTRIBUTION_TYPES, Format};
use crate::{Result, WebhookError, Webhooks, target};

/// What a subscription listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One repository's events (`namespace/name`).
    Repository(String),
    /// Every repository of a namespace (an organization).
    Namespace(String),
    /// Everything.
    Global,
}

impl Scope {
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Repository(_) => "repository",
            Scope::Namespace(_) => "namespace",
            Scope::Global => "global",
        }
    }
}

/// A subscription as shown to its admins (never with its secret).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Subscription {
    pub id: String,
    /// `repository`, `namespace` or `global`.
    pub scope: String,
    pub repository: Option<String>,
    pub namespace: Option<String>,
    pub url: String,
    /// `dockyard`, `cloudevents` or `distribution`.
    pub format: String,
    /// Event types delivered; empty for every type.
    pub event_types: Vec<String>,
    /// Only repositories matching this glob (`*` stays within a path segment).
    pub repository_glob: Option<String>,
    /// Only events whose tag matches this regular expression in full.
    pub tag_regex: Option<String>,
    pub enabled: bool,
    pub created_by: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(skip)]
    pub(crate) secret: String,
    #[serde(skip)]
    pub(crate) from_event_id: i64,
}

impl Subscription {
    /// Its scope, from the stored columns.
    pub fn scope(&self) -> Scope {
        match self.scope.as_str() {
            "repository" => Scope::Repository(self.repository.clone().unwrap_or_default()),
            "namespace" => Scope::Namespace(self.namespace.clone().unwrap_or_default()),
            _ => Scope::Global,
        }
    }
}

/// A new subscription.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionInput {
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// `dockyard` (default), `cloudevents` or `distribution`.
    pub format: Option<String>,
    /// Event types to deliver (default: every type).
    pub event_types: Option<Vec<String>>,
    /// Only repositories matching this glob, e.g. `acme/web-*`.
    pub repository_glob: Option<String>,
    /// Only events whose tag matches this regular expression in full, e.g.
    /// `v[0-9]+(\.[0-9]+)*`; events without a tag are then not delivered.
    pub tag_regex: Option<String>,
    /// Default true.
    pub enabled: Option<bool>,
}

/// Changes to a subscription; absent fields stay as they are, an empty
/// `repository_glob` or `tag_regex` removes that filter.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionPatch {
    pub url: Option<String>,
    pub format: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub repository_glob: Option<String>,
    pub tag_regex: Option<String>,
    pub enabled: Option<bool>,
    /// A new secret is generated and returned once.
    pub rotate_secret: Option<bool>,
}

/// Compiled filters of a subscription.
pub(crate) struct Filters {
    glob: Option<globset::GlobMatcher>,
    tag: Option<regex::Regex>,
}

fn compile_glob(g: &str) -> Result<globset::GlobMatcher> {
    if g.len() > 512 {
        return Err(WebhookError::Invalid(
            "repository_glob: at most 512 characters are allowed".into(),
        ));
    }
    globset::GlobBuilder::new(g)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| WebhookError::Invalid(format!("repository_glob: {g:?} is not a glob: {e}")))
}

fn compile_regex(r: &str) -> Result<regex::Regex> {
    if r.len() > 512 {
        return Err(WebhookError::Invalid(
            "tag_regex: at most 512 characters are allowed".into(),
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{r})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            WebhookError::Invalid(format!("tag_regex: {r:?} is not a regular expression: {e}"))
        })
}

impl Filters {
    pub(crate) fn compile(s: &Subscription) -> Result<Filters> {
        Ok(Filters {
            glob: s.repository_glob.as_deref().map(compile_glob).transpose()?,
            tag: s.tag_regex.as_deref().map(compile_regex).transpose()?,
        })
    }

    /// Whether `s` (with these filters) wants `e`.
    pub(crate) fn wants(&self, s: &Subscription, e: &dockyard_core::events::Event) -> bool {
        if e.id <= s.from_event_id {
            return false;
        }
        let in_scope = match s.scope() {
            Scope::Repository(r) => e.repository.as_deref() == Some(r.as_str()),
            Scope::Namespace(ns) => e.namespace.as_deref() == Some(ns.as_str()),
            Scope::Global => true,
        };
        in_scope
            && (s.event_types.is_empty() || s.event_types.contains(&e.kind))
            && self
                .glob
                .as_ref()
                .is_none_or(|g| e.repository.as_deref().is_some_and(|r| g.is_match(r)))
            && self
                .tag
                .as_ref()
                .is_none_or(|re| e.tag.as_deref().is_some_and(|t| re.is_match(t)))
    }
}

fn check_format(f: &str) -> Result<Format> {
    Format::parse(f).ok_or_else(|| {
        WebhookError::Invalid(format!(
            "format: must be dockyard, cloudevents or distribution, not {f:?}"
        ))
    })
}

fn check_types(types: &[String], format: Format) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for t in types {
        if !kinds::ALL.contains(&t.as_str()) {
            return Err(WebhookError::Invalid(format!(
                "event_types: {t:?} is not an event type (one of {})",
                kinds::ALL.join(", ")
            )));
        }
        if !format.carries(t) {
            return Err(WebhookError::Invalid(format!(
                "event_types: the distribution format does not carry {t:?} (only {})",
                DISTRIBUTION_TYPES.join(", ")
            )));
        }
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    Ok(out)
}

/// An empty filter string is no filter.
fn filter(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn new_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

const COLUMNS: &str = "id, scope, repository, namespace, url, format, event_types, repository_glob, \
     tag_regex, secret, enabled, from_event_id, created_by, created_at, updated_at";

pub(crate) fn row(r: &sqlx::any::AnyRow) -> sqlx::Result<Subscription> {
    let types: String = r.try_get(6)?;
    Ok(Subscription {
        id: r.try_get(0)?,
        scope: r.try_get(1)?,
        repository: r.try_get(2)?,
        namespace: r.try_get(3)?,
        url: r.try_get(4)?,
        format: r.try_get(5)?,
        event_types: serde_json::from_str(&types).unwrap_or_default(),
        repository_glob: r.try_get(7)?,
        tag_regex: r.try_get(8)?,
        secret: r.try_get(9)?,
        enabled: r.try_get::<i64, _>(10)? != 0,
        from_event_id: r.try_get(11)?,
        created_by: r.try_get(12)?,
        created_at: r.try_get(13)?,
        updated_at: r.try_get(14)?,
    })
}

/// Enabled subscriptions that may want events of these namespaces (global
/// ones, and those of the namespaces), read inside `conn`'s transaction.
pub(crate) async fn candidates(
    conn: &mut sqlx::AnyConnection,
    namespaces: &[&str],
) -> sqlx::Result<Vec<Subscription>> {
    let mut sql = format!(
        "SELECT {COLUMNS} FROM webhook_subscriptions WHERE enabled = 1 AND (scope = 'global'"
    );
    if !namespaces.is_empty() {
        sql.push_str(&format!(
            " OR namespace IN ({})",
            dockyard_core::db::placeholders(1, namespaces.len())
        ));
    }
    sql.push_str(") ORDER BY created_at, id");
    let mut q = sqlx::query(&sql);
    for ns in namespaces {
        q = q.bind(*ns);
    }
    q.fetch_all(&mut *conn).await?.iter().map(row).collect()
}

impl Webhooks {
    /// Creates a subscription; returns it and its secret (shown once). It
    /// receives events written from now on.
    pub async fn create(
        &self,
        scope: Scope,
        input: SubscriptionInput,
        created_by: &str,
    ) -> Result<(Subscription, String)> {
        let url = target::check_url(&input.url, self.settings.allow_private_targets)?;
        let format = check_format(input.format.as_deref().unwrap_or("dockyard"))?;
        let types = check_types(&input.event_types.unwrap_or_default(), format)?;
        let glob = filter(input.repository_glob);
        let tag = filter(input.tag_regex);
        glob.as_deref().map(compile_glob).transpose()?;
        tag.as_deref().map(compile_regex).transpose()?;
        let (repository, namespace) = match &scope {
            Scope::Repository(r) => (
                Some(r.clone()),
                Some(r.split('/').next().unwrap_or(r).to_string()),
            ),
            Scope::Namespace(ns) => (None, Some(ns.clone())),
            Scope::Global => (None, None),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let secret = new_secret();
        let now = now_millis();
        let from: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM events")
            .fetch_one(&self.db.read)
            .await?
            .try_get(0)?;
        sqlx::query(
            "INSERT INTO webhook_subscriptions (id, scope, repository, namespace, url, format, \
             event_types, repository_glob, tag_regex, secret, enabled, from_event_id, created_by, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)",
        )
        .bind(&id)
        .bind(scope.kind())
        .bind(&repository)
        .bind(&namespace)
        .bind(&url)
        .bind(format.as_str())
        .bind(serde_json::to_string(&types).expect("strings serialize"))
        .bind(&glob)
        .bind(&tag)
        .bind(&secret)
        .bind(i64::from(input.enabled.unwrap_or(true)))
        .bind(from)
        .bind(created_by)
        .bind(now)
        .execute(&self.db.write)
        .await?;
        Ok((self.get(&id).await?, secret))
    }

    /// A subscription by id.
    pub async fn get(&self, id: &str) -> Result<Subscription> {
        let r = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM webhook_subscriptions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.db.read)
        .await?
        .ok_or_else(|| WebhookError::NotFound("webhook".into()))?;
        Ok(row(&r)?)
    }

    /// The subscriptions of exactly this scope, oldest first.
    pub async fn list(&self, scope: &Scope) -> Result<Vec<Subscription>> {
        let (filter, value) = match scope {
            Scope::Repository(r) => ("scope = 'repository' AND repository = $1", r.as_str()),
            Scope::Namespace(ns) => ("scope = 'namespace' AND namespace = $1", ns.as_str()),
            Scope::Global => ("scope = 'global' AND $1 = ''", ""),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM webhook_subscriptions WHERE {filter} ORDER BY created_at, id"
        );
        let q = sqlx::query(&sql).bind(value);
        let rows = q.fetch_all(&self.db.read).await?;
        Ok(rows.iter().map(row).collect::<sqlx::Result<_>>()?)
    }

    /// Changes a subscription; returns it, and the new secret when rotated.
    /// New filters apply to events fanned out from now on; deliveries
    /// already queued keep their bodies.
    pub async fn update(
        &self,
        id: &str,
        patch: SubscriptionPatch,
    ) -> Result<(Subscription, Option<String>)> {
        let mut s = self.get(id).await?;
        if let Some(url) = &patch.url {
            s.url = target::check_url(url, self.settings.allow_private_targets)?;
        }
        if let Some(f) = &patch.format {
            s.format = check_format(f)?.as_str().to_string();
        }
        let format = check_format(&s.format)?;
        if let Some(t) = patch.event_types {
            s.event_types = t;
        }
        s.event_types = check_types(&s.event_types, format)?;
        if let Some(g) = patch.repository_glob {
            s.repository_glob = filter(Some(g));
        }
        if let Some(t) = patch.tag_regex {
            s.tag_regex = filter(Some(t));
        }
        Filters::compile(&s)?;
        if let Some(e) = patch.enabled {
            s.enabled = e;
        }
        let rotated = patch.rotate_secret.unwrap_or(false).then(new_secret);
        if let Some(secret) = &rotated {
            s.secret = secret.clone();
        }
        let n = sqlx::query(
            "UPDATE webhook_subscriptions SET url = $1, format = $2, event_types = $3, \
             repository_glob = $4, tag_regex = $5, enabled = $6, secret = $7, updated_at = $8 WHERE id = $9",
        )
        .bind(&s.url)
        .bind(&s.format)
        .bind(serde_json::to_string(&s.event_types).expect("strings serialize"))
        .bind(&s.repository_glob)
        .bind(&s.tag_regex)
        .bind(i64::from(s.enabled))
        .bind(&s.secret)
        .bind(now_millis())
        .bind(id)
        .execute(&self.db.write)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(WebhookError::NotFound("webhook".into()));
        }
        if s.enabled {
            // Re-enabled: its queue may be due.
            self.wake();
        }
        Ok((self.get(id).await?, rotated))
    }

    /// Deletes a subscription with its deliveries and their attempts.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let mut tx = self.db.write.begin().await?;
        sqlx::query(
            "DELETE FROM webhook_attempts WHERE delivery_id IN \
             (SELECT id FROM webhook_deliveries WHERE subscription_id = $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE subscription_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("DELETE FROM webhook_subscriptions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(WebhookError::NotFound("webhook".into()));
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dockyard_core::events::Event;
    use serde_json::json;

    fn sub(scope: Scope) -> Subscription {
        let (repository, namespace) = match &scope {
            Scope::Repository(r) => (Some(r.clone()), Some("acme".to_string())),
            Scope::Namespace(n) => (None, Some(n.clone())),
            Scope::Global => (None, None),
        };
        Subscription {
            id: "s".into(),
            scope: scope.kind().into(),
            repository,
            namespace,
            url: "https://x.example/".into(),
            format: "dockyard".into(),
            event_types: vec![],
            repository_glob: None,
            tag_regex: None,
            enabled: true,
            created_by: "alice".into(),
            created_at: 0,
            updated_at: 0,
            secret: "k".into(),
            from_event_id: 10,
        }
    }

    fn ev(id: i64, kind: &str, repo: &str, tag: Option<&str>) -> Event {
        Event {
            id,
            kind: kind.into(),
            namespace: Some(repo.split('/').next().unwrap().into()),
            repository: Some(repo.into()),
            tag: tag.map(str::to_string),
            digest: None,
            actor: None,
            data: json!({}),
            created_at: 0,
        }
    }

    #[test]
    fn scopes_and_filters() {
        let wants = |s: &Subscription, e: &Event| Filters::compile(s).unwrap().wants(s, e);
        let repo = sub(Scope::Repository("acme/app".into()));
        assert!(wants(&repo, &ev(11, "tag.created", "acme/app", Some("v1"))));
        assert!(!wants(
            &repo,
            &ev(11, "tag.created", "acme/other", Some("v1"))
        ));
        // Events from before the subscription are not delivered.
        assert!(!wants(
            &repo,
            &ev(10, "tag.created", "acme/app", Some("v1"))
        ));
        let ns = sub(Scope::Namespace("acme".into()));
        assert!(wants(&ns, &ev(11, "manifest.pushed", "acme/x", None)));
        assert!(!wants(&ns, &ev(11, "manifest.pushed", "acmecorp/x", None)));
        let mut g = sub(Scope::Global);
        assert!(wants(&g, &ev(11, "repository.created", "other/x", None)));
        g.event_types = vec!["tag.created".into(), "tag.moved".into()];
        assert!(wants(&g, &ev(11, "tag.moved", "other/x", Some("a"))));
        assert!(!wants(&g, &ev(11, "tag.deleted", "other/x", Some("a"))));
        g.repository_glob = Some("acme/web-*".into());
        assert!(wants(&g, &ev(11, "tag.moved", "acme/web-api", Some("a"))));
        assert!(!wants(&g, &ev(11, "tag.moved", "acme/web/api", Some("a"))));
        assert!(!wants(&g, &ev(11, "tag.moved", "acme/api", Some("a"))));
        g.tag_regex = Some(r"v[0-9]+(\.[0-9]+)*".into());
        assert!(wants(
            &g,
            &ev(11, "tag.moved", "acme/web-api", Some("v1.2"))
        ));
        // The whole tag must match; no tag, no match.
        assert!(!wants(
            &g,
            &ev(11, "tag.moved", "acme/web-api", Some("v1.2-rc"))
        ));
        assert!(!wants(&g, &ev(11, "tag.moved", "acme/web-api", None)));
    }

    #[test]
    fn bad_input_is_named() {
        let e = compile_glob("acme/[").err().unwrap().to_string();
        assert!(e.starts_with("repository_glob:"), "{e}");
        let e = compile_regex("v(").err().unwrap().to_string();
        assert!(e.starts_with("tag_regex:"), "{e}");
        let e = check_format("xml").err().unwrap().to_string();
        assert!(e.contains("dockyard, cloudevents or distribution"), "{e}");
        let e = check_types(&["tag.exploded".into()], Format::Dockyard)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not an event type"), "{e}");
        let e = check_types(&["build.queued".into()], Format::Distribution)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not carry"), "{e}");
        assert_eq!(
            check_types(
                &["tag.created".into(), "tag.created".into()],
                Format::Dockyard
            )
            .unwrap(),
            vec!["tag.created".to_string()]
        );
    }
}
