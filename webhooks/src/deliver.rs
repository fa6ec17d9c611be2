//! Delivery: the dispatcher, attempts, backoff, the delivery log and
//! redelivery.
//!
//! Each subscription is a queue ordered by `seq`; only its head (smallest
//! pending `seq`) is ever attempted, so a receiver sees a subscription's
//! events in order, and the next waits until the head is delivered or dead.
//! The dispatcher claims due heads (`claimed_until` in the future; an
//! expired claim is free again, so a replica that died mid-attempt loses
//! its claims) up to `webhooks.concurrency` attempts in flight, and each
//! attempt runs on its own task with no transaction open: claim (one short
//! write), POST (bounded by `webhooks.timeout`), then record the result
//! and, when the next head of the same subscription is due, claim it in the
//! same short write and go on (a run of up to [`CHAIN`] deliveries per
//! task, so a busy subscription costs one write per delivery).
//!
//! Delivery is at least once: a crash after the receiver answered and
//! before the result was written sends the same delivery (same
//! `Dockyard-Delivery`) again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dockyard_core::now_millis;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Row;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::{Result, WebhookError, Webhooks, sign, target};

/// Deliveries one task attempts in a row for a subscription before it
/// hands its slot back (fairness across subscriptions).
const CHAIN: usize = 64;
/// Polling interval when nothing woke the dispatcher.
const POLL: Duration = Duration::from_secs(1);
/// Most response bytes kept per attempt.
const MAX_RESPONSE: usize = 4096;
/// Most heads considered per dispatcher pass.
const HEADS: i64 = 1000;

/// A delivery of one event to one subscription.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Delivery {
    pub id: String,
    pub subscription_id: String,
    pub event_id: i64,
    pub event_type: String,
    /// `pending`, `delivered` or `dead`.
    pub state: String,
    pub attempts: i64,
    /// Unix ms of the next attempt, while pending.
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
    /// HTTP status of the last attempt, if it got an answer.
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    /// The delivery this one repeats.
    pub redelivery_of: Option<String>,
    pub content_type: String,
    /// The exact bytes sent (every attempt sends the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip)]
    pub(crate) seq: i64,
    /// While an attempt is in flight: when its claim expires (Unix ms).
    pub claimed_until: Option<i64>,
}

/// One HTTP attempt of a delivery.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Attempt {
    pub attempt: i64,
    pub started_at: i64,
    pub duration_ms: i64,
    /// Headers sent.
    #[schema(value_type = Object)]
    pub request_headers: Value,
    pub response_status: Option<i64>,
    /// At most 4 KiB of the response.
    pub response_body: Option<String>,
    pub error: Option<String>,
}

const DELIVERY_COLUMNS: &str = "seq, id, subscription_id, event_id, event_type, state, attempts, \
     next_attempt_at, created_at, delivered_at, last_status, last_error, redelivery_of, content_type, \
     claimed_until";

fn delivery_row(r: &sqlx::any::AnyRow, with_body: bool) -> sqlx::Result<Delivery> {
    Ok(Delivery {
        seq: r.try_get(0)?,
        id: r.try_get(1)?,
        subscription_id: r.try_get(2)?,
        event_id: r.try_get(3)?,
        event_type: r.try_get(4)?,
        state: r.try_get(5)?,
        attempts: r.try_get(6)?,
        next_attempt_at: r.try_get(7)?,
        created_at: r.try_get(8)?,
        delivered_at: r.try_get(9)?,
        last_status: r.try_get(10)?,
        last_error: r.try_get(11)?,
        redelivery_of: r.try_get(12)?,
        content_type: r.try_get(13)?,
        claimed_until: r.try_get(14)?,
        body: if with_body { r.try_get(15)? } else { None },
    })
}

/// The delay before attempt `attempts + 1`: `base × 2^(attempts-1)`, at most
/// `max`, then a random value between half of it and all of it.
pub(crate) fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    use rand::Rng;
    let exp = attempts.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let ms = full.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
}

/// What one task attempts: a claimed delivery.
struct Claimed {
    seq: i64,
    id: String,
    subscription: String,
    event_type: String,
    /// The attempt number (counted when claimed).
    attempt: i64,
    content_type: String,
    body: String,
}

fn claimed_row(r: &sqlx::any::AnyRow) -> sqlx::Result<Claimed> {
    Ok(Claimed {
        seq: r.try_get(0)?,
        id: r.try_get(1)?,
        subscription: r.try_get(2)?,
        event_type: r.try_get(3)?,
        attempt: r.try_get(4)?,
        content_type: r.try_get(5)?,
        body: r.try_get(6)?,
    })
}

const CLAIMED_COLUMNS: &str = "seq, id, subscription_id, event_type, attempts, content_type, body";

impl Webhooks {
    /// How long a claim lasts: an attempt, plus slack for writing its result.
    fn claim_ms(&self) -> i64 {
        (self.settings.timeout + Duration::from_secs(2)).as_millis() as i64
    }

    /// Claims a head by `seq` when still free; counts the attempt.
    async fn claim(&self, seq: i64, owner: &str) -> sqlx::Result<Option<Claimed>> {
        let now = now_millis();
        let row = sqlx::query(&format!(
            "UPDATE webhook_deliveries SET claimed_by = $1, claimed_until = $2, attempts = attempts + 1 \
             WHERE seq = $3 AND state = 'pending' AND next_attempt_at <= $4 \
             AND (claimed_until IS NULL OR claimed_until < $4) RETURNING {CLAIMED_COLUMNS}"
        ))
        .bind(owner)
        .bind(now + self.claim_ms())
        .bind(seq)
        .bind(now)
        .fetch_optional(&self.db.write)
        .await?;
        row.as_ref().map(claimed_row).transpose()
    }

    /// The heads of the queues of enabled subscriptions: `(seq,
    /// next_attempt_at, claimed_until)`, soonest first.
    async fn heads(&self) -> sqlx::Result<Vec<(i64, i64, Option<i64>)>> {
        let rows = sqlx::query(
            "SELECT d.seq, d.next_attempt_at, d.claimed_until FROM webhook_deliveries d \
             JOIN (SELECT subscription_id, MIN(seq) AS head FROM webhook_deliveries \
                   WHERE state = 'pending' GROUP BY subscription_id) h ON d.seq = h.head \
             JOIN webhook_subscriptions s ON s.id = d.subscription_id \
             WHERE s.enabled = 1 ORDER BY d.next_attempt_at LIMIT $1",
        )
        .bind(HEADS)
        .fetch_all(&self.db.read)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// Makes one attempt and records it; returns the next claimed delivery
    /// of the same subscription when it was due (and `chain` allows).
    async fn attempt(
        &self,
        d: Claimed,
        owner: &str,
        chain: bool,
        shutdown: &CancellationToken,
    ) -> Result<Option<Claimed>> {
        let sub = match self.get(&d.subscription).await {
            Ok(s) => s,
            // Deleted meanwhile: its deliveries went with it.
            Err(WebhookError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let started_at = now_millis();
        let ts = started_at / 1000;
        let signature = sign::signature(&sub.secret, ts, d.body.as_bytes());
        let user_agent = format!("Dockyard-Webhooks/{}", env!("CARGO_PKG_VERSION"));
        let headers = json!({
            "Content-Type": d.content_type,
            "User-Agent": user_agent,
            sign::DELIVERY: d.id,
            sign::EVENT: d.event_type,
            sign::TIMESTAMP: ts.to_string(),
            sign::SIGNATURE: signature,
        });
        let clock = Instant::now();
        let outcome = if target::literal_refused(&sub.url, self.settings.allow_private_targets) {
            Err("the target is a loopback or private address (webhooks.allow_private_targets is off)".to_string())
        } else {
            let send = self
                .client
                .post(&sub.url)
                .header("content-type", &d.content_type)
                .header("user-agent", &user_agent)
                .header(sign::DELIVERY, &d.id)
                .header(sign::EVENT, &d.event_type)
                .header(sign::TIMESTAMP, ts.to_string())
                .header(sign::SIGNATURE, &signature)
                .body(d.body.clone())
                .send();
            tokio::select! {
                r = exchange(send) => r,
                _ = shutdown.cancelled() => {
                    // Abandoned, not attempted: hand it back at once.
                    sqlx::query(
                        "UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until = NULL, \
                         attempts = attempts - 1 WHERE seq = $1 AND claimed_by = $2",
                    )
                    .bind(d.seq)
                    .bind(owner)
                    .execute(&self.db.write)
                    .await?;
                    return Ok(None);
                }
            }
        };
        let elapsed = clock.elapsed();
        metrics::histogram!("dockyard_webhook_delivery_seconds").record(elapsed.as_secs_f64());
        let (status, response, error) = match &outcome {
            Ok((status, body)) => (
                Some(i64::from(*status)),
                Some(body.clone()),
                (!(200..300).contains(status)).then(|| format!("HTTP {status}")),
            ),
            Err(e) => (None, None, Some(e.clone())),
        };
        let success = error.is_none();
        let dead = !success && d.attempt >= i64::from(self.settings.max_attempts);
        let outcome_label = if success {
            "delivered"
        } else if dead {
            "dead"
        } else {
            "failed"
        };
        metrics::counter!("dockyard_webhook_deliveries_total", "outcome" => outcome_label)
            .increment(1);
        if !success {
            tracing::info!(webhook = %sub.id, delivery = %d.id, attempt = d.attempt,
                error = error.as_deref().unwrap_or(""), dead, "webhook delivery failed");
        }
        let now = now_millis();
        let mut tx = self.db.write.begin().await?;
        // (Not if the subscription, and so the delivery, was deleted meanwhile.)
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, \
             request_headers, response_status, response_body, error) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = $1) \
             ON CONFLICT (delivery_id, attempt) DO NOTHING",
        )
        .bind(&d.id)
        .bind(d.attempt)
        .bind(started_at)
        .bind(elapsed.as_millis() as i64)
        .bind(headers.to_string())
        .bind(status)
        .bind(&response)
        .bind(&error)
        .execute(&mut *tx)
        .await?;
        // Settled only while the claim is still ours (it outlives an
        // attempt by 2 s; past that another replica may have taken over).
        let settled = if success {
            sqlx::query(
                "UPDATE webhook_deliveries SET state = 'delivered', delivered_at = $1, last_status = $2, \
                 last_error = NULL, claimed_by = NULL, claimed_until = NULL WHERE seq = $3 AND claimed_by = $4",
            )
            .bind(now)
            .bind(status)
            .bind(d.seq)
            .bind(owner)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            let delay = backoff(
                self.settings.backoff_base,
                self.settings.backoff_max,
                d.attempt as u32,
            );
            sqlx::query(
                "UPDATE webhook_deliveries SET state = $1, next_attempt_at = $2, last_status = $3, \
                 last_error = $4, claimed_by = NULL, claimed_until = NULL WHERE seq = $5 AND claimed_by = $6",
            )
            .bind(if dead { "dead" } else { "pending" })
            .bind(now + delay.as_millis() as i64)
            .bind(status)
            .bind(&error)
            .bind(d.seq)
            .bind(owner)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        };
        // The next head of this subscription, if it is due now.
        let next = if settled == 1
            && (success || dead)
            && chain
            && !shutdown.is_cancelled()
            && sub.enabled
        {
            let row = sqlx::query(&format!(
                "UPDATE webhook_deliveries SET claimed_by = $1, claimed_until = $2, attempts = attempts + 1 \
                 WHERE seq = (SELECT MIN(seq) FROM webhook_deliveries WHERE subscription_id = $3 AND state = 'pending') \
                 AND state = 'pending' AND next_attempt_at <= $4 \
                 AND (claimed_until IS NULL OR claimed_until < $4) RETURNING {CLAIMED_COLUMNS}"
            ))
            .bind(owner)
            .bind(now + self.claim_ms())
            .bind(&d.subscription)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            row.as_ref().map(claimed_row).transpose()?
        } else {
            None
        };
        tx.commit().await?;
        Ok(next)
    }

    /// Deliveries of a subscription, newest first, before the cursor `before`
    /// (a `seq`), optionally only those in `state`.
    pub async fn deliveries(
        &self,
        subscription: &str,
        state: Option<&str>,
        before: Option<i64>,
        n: i64,
    ) -> Result<(Vec<Delivery>, Option<i64>)> {
        if let Some(s) = state
            && !matches!(s, "pending" | "delivered" | "dead")
        {
            return Err(WebhookError::Invalid(format!(
                "state: must be pending, delivered or dead, not {s:?}"
            )));
        }
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE subscription_id = $1 \
             AND seq < $2 AND ($3 = '' OR state = $3) ORDER BY seq DESC LIMIT $4"
        ))
        .bind(subscription)
        .bind(before.unwrap_or(i64::MAX))
        .bind(state.unwrap_or(""))
        .bind(n + 1)
        .fetch_all(&self.db.read)
        .await?;
        let mut list: Vec<Delivery> = rows
            .iter()
            .map(|r| delivery_row(r, false))
            .collect::<sqlx::Result<_>>()?;
        let next = if list.len() as i64 > n {
            list.truncate(n as usize);
            list.last().map(|d| d.seq)
        } else {
            None
        };
        Ok((list, next))
    }

    /// One delivery of a subscription with its body and attempts.
    pub async fn delivery(&self, subscription: &str, id: &str) -> Result<(Delivery, Vec<Attempt>)> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS}, body FROM webhook_deliveries WHERE subscription_id = $1 AND id = $2"
        ))
        .bind(subscription)
        .bind(id)
        .fetch_optional(&self.db.read)
        .await?
        .ok_or_else(|| WebhookError::NotFound("delivery".into()))?;
        let d = delivery_row(&row, true)?;
        let rows = sqlx::query(
            "SELECT attempt, started_at, duration_ms, request_headers, response_status, response_body, error \
             FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.db.read)
        .await?;
        let attempts = rows
            .iter()
            .map(|r| {
                let headers: String = r.try_get(3)?;
                Ok(Attempt {
                    attempt: r.try_get(0)?,
                    started_at: r.try_get(1)?,
                    duration_ms: r.try_get(2)?,
                    request_headers: serde_json::from_str(&headers).unwrap_or(Value::Null),
                    response_status: r.try_get(4)?,
                    response_body: r.try_get(5)?,
                    error: r.try_get(6)?,
                })
            })
            .collect::<sqlx::Result<_>>()?;
        Ok((d, attempts))
    }

    /// Queues the same body again as a new delivery (at the end of the
    /// subscription's queue), whatever the original's state.
    pub async fn redeliver(&self, subscription: &str, id: &str) -> Result<Delivery> {
        let new_id = uuid::Uuid::new_v4().to_string();
        let now = now_millis();
        let n = sqlx::query(
            "INSERT INTO webhook_deliveries (id, subscription_id, event_id, event_type, state, attempts, \
             next_attempt_at, content_type, body, redelivery_of, created_at) \
             SELECT $1, subscription_id, event_id, event_type, 'pending', 0, $2, content_type, body, id, $2 \
             FROM webhook_deliveries WHERE subscription_id = $3 AND id = $4",
        )
        .bind(&new_id)
        .bind(now)
        .bind(subscription)
        .bind(id)
        .execute(&self.db.write)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(WebhookError::NotFound("delivery".into()));
        }
        self.wake();
        Ok(self.delivery(subscription, &new_id).await?.0)
    }

    /// Pending deliveries, for the gauge.
    async fn pending(&self) -> sqlx::Result<i64> {
        sqlx::query("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'")
            .fetch_one(&self.db.read)
            .await?
            .try_get(0)
    }
}

/// Sends a request and reads at most [`MAX_RESPONSE`] bytes of the answer.
async fn exchange(
    send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
) -> Result<(u16, String), String> {
    let mut resp = send.await.map_err(describe)?;
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while body.len() < MAX_RESPONSE {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) => break,
            // The status is what counts; a broken body is noted.
            Err(e) => {
                body.extend_from_slice(format!("[response body: {}]", describe(e)).as_bytes());
                break;
            }
        }
    }
    body.truncate(MAX_RESPONSE);
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An error with its causes, in words.
fn describe(e: reqwest::Error) -> String {
    use std::error::Error;
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// The dispatcher: claims due heads while slots are free, runs each on a
/// task, sleeps until woken, the next head is due, or [`POLL`].
pub(crate) async fn run(hooks: Arc<Webhooks>, shutdown: CancellationToken) {
    let owner = format!("{}-{}", hooks.instance, uuid::Uuid::new_v4().simple());
    let slots = Arc::new(Semaphore::new(hooks.settings.concurrency as usize));
    let mut tasks = tokio::task::JoinSet::new();
    let mut gauge_at = Instant::now() - Duration::from_secs(60);
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let mut sleep = POLL;
        if gauge_at.elapsed() >= Duration::from_secs(5) {
            gauge_at = Instant::now();
            if let Ok(n) = hooks.pending().await {
                metrics::gauge!("dockyard_webhook_pending").set(n as f64);
            }
        }
        if slots.available_permits() > 0 {
            match hooks.heads().await {
                Ok(heads) => {
                    let now = now_millis();
                    for (seq, due, claimed_until) in heads {
                        if claimed_until.is_some_and(|c| c >= now) {
                            // In flight here or on another replica; look
                            // again when that claim would expire.
                            let left = (claimed_until.unwrap_or(now) - now + 1) as u64;
                            sleep = sleep.min(Duration::from_millis(left));
                            continue;
                        }
                        if due > now {
                            sleep = sleep.min(Duration::from_millis((due - now) as u64));
                            continue;
                        }
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            break;
                        };
                        match hooks.claim(seq, &owner).await {
                            Ok(Some(c)) => {
                                tasks.spawn(lane(
                                    hooks.clone(),
                                    c,
                                    owner.clone(),
                                    permit,
                                    shutdown.clone(),
                                ));
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot claim a webhook delivery");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the webhook queues"),
            }
        }
        tokio::select! {
            _ = hooks.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    // Attempts in flight hand their claims back on the same token.
    while tasks.join_next().await.is_some() {}
}

/// One slot's work: a claimed delivery, then up to [`CHAIN`] more of the
/// same subscription while they are due.
async fn lane(
    hooks: Arc<Webhooks>,
    first: Claimed,
    owner: String,
    _permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let mut next = Some(first);
    let mut done = 0;
    while let Some(d) = next.take() {
        done += 1;
        let seq = d.seq;
        match hooks.attempt(d, &owner, done < CHAIN, &shutdown).await {
            Ok(n) => next = n,
            Err(e) => {
                // The claim expires and the delivery is tried again.
                tracing::warn!(error = %e, seq, "could not record a webhook attempt");
            }
        }
    }
    hooks.wake();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        for _ in 0..50 {
            let d1 = backoff(base, max, 1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= base, "{d1:?}");
            let d3 = backoff(base, max, 3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d20 = backoff(base, max, 20);
            assert!(d20 >= Duration::from_millis(500) && d20 <= max, "{d20:?}");
            assert!(backoff(base, max, 100) <= max);
        }
    }
}
