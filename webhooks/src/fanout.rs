//! Fan-out: the `webhooks` consumer of the event log. For each event, one
//! pending delivery per enabled subscription that wants it, with the body
//! rendered in the subscription's format, written in the transaction that
//! moves the consumer's position (so each event is fanned out once).

use std::collections::HashMap;
use std::sync::Arc;

use dockyard_core::events::{Event, Handler};
use dockyard_core::now_millis;
use sqlx::AnyConnection;

use crate::Webhooks;
use crate::format::{self, Format, Origin};
use crate::subscriptions::{self, Filters};

/// The consumer's name in `event_consumers`.
pub(crate) const CONSUMER: &str = "webhooks";

/// Rows per INSERT statement.
const CHUNK: usize = 50;

pub(crate) struct FanOut {
    hooks: Arc<Webhooks>,
}

impl FanOut {
    pub(crate) fn new(hooks: Arc<Webhooks>) -> FanOut {
        FanOut { hooks }
    }
}

struct Row {
    id: String,
    subscription: String,
    event_id: i64,
    event_type: String,
    content_type: &'static str,
    body: Arc<str>,
}

#[async_trait::async_trait]
impl Handler for FanOut {
    async fn handle(&self, tx: &mut AnyConnection, events: &[Event]) -> Result<(), String> {
        self.fan_out(tx, events).await
    }

    fn committed(&self) {
        self.hooks.wake();
    }
}

impl FanOut {
    /// Inserts the deliveries of `events` through `tx`.
    async fn fan_out(&self, tx: &mut AnyConnection, events: &[Event]) -> Result<(), String> {
        let mut namespaces: Vec<&str> = events
            .iter()
            .filter_map(|e| e.namespace.as_deref())
            .collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        let subs = subscriptions::candidates(tx, &namespaces)
            .await
            .map_err(|e| e.to_string())?;
        if subs.is_empty() {
            return Ok(());
        }
        let mut compiled = Vec::with_capacity(subs.len());
        for s in subs {
            match (Filters::compile(&s), Format::parse(&s.format)) {
                (Ok(f), Some(fmt)) => compiled.push((s, f, fmt)),
                // Saved filters were valid; never block the log on one.
                _ => tracing::warn!(webhook = %s.id, "skipping a webhook with invalid filters"),
            }
        }
        let origin = Origin {
            public_url: &self.hooks.settings.public_url,
            source_addr: &self.hooks.settings.source_addr,
            instance_id: &self.hooks.instance,
        };
        let mut rows = Vec::new();
        for e in events {
            let mut bodies: HashMap<Format, Option<Arc<str>>> = HashMap::new();
            for (s, filters, fmt) in &compiled {
                if !filters.wants(s, e) {
                    continue;
                }
                let body = bodies
                    .entry(*fmt)
                    .or_insert_with(|| format::render(*fmt, e, &origin).map(Arc::from))
                    .clone();
                let Some(body) = body else { continue };
                rows.push(Row {
                    id: uuid::Uuid::new_v4().to_string(),
                    subscription: s.id.clone(),
                    event_id: e.id,
                    event_type: e.kind.clone(),
                    content_type: fmt.content_type(),
                    body,
                });
            }
        }
        let now = now_millis();
        for chunk in rows.chunks(CHUNK) {
            let mut sql = String::from(
                "INSERT INTO webhook_deliveries (id, subscription_id, event_id, event_type, state, \
                 attempts, next_attempt_at, content_type, body, created_at) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 6;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, 'pending', 0, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    chunk.len() * 6 + 1,
                    b + 5,
                    b + 6,
                    chunk.len() * 6 + 1,
                ));
            }
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.id.clone())
                    .bind(r.subscription.clone())
                    .bind(r.event_id)
                    .bind(r.event_type.clone())
                    .bind(r.content_type)
                    .bind(r.body.to_string());
            }
            q.bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
