//! The event log, the spine every reaction hangs off (webhooks, base-image
//! rebuilds, later scanning and signing).
//!
//! A change and its event are written in **one transaction** with
//! [`append`], called as the last statements of that transaction. Consumers
//! read the log in id order from their own position with [`run_consumer`];
//! a consumer's effects (rows it writes) and the move of its position are
//! committed together, so each event reaches each consumer once in normal
//! operation and at least once across crashes.
//!
//! Ordering: on PostgreSQL ids come from a sequence, and two transactions
//! could commit out of id order, letting a consumer skip the smaller id.
//! [`append`] therefore takes `LOCK TABLE events IN EXCLUSIVE MODE` first:
//! writers of events serialize for the few microseconds before commit, so
//! ids become visible in order. SQLite has one writer anyway.
//!
//! Several replicas: a consumer runs wherever its lease is held
//! (`event_consumers.owner`), so one replica handles a given event; another
//! takes over when the lease expires.

use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;

use crate::db::{Backend, Db};
use crate::now_millis;

/// Event types. Dotted names, `<subject>.<what happened>`.
pub mod kinds {
    pub const REPOSITORY_CREATED: &str = "repository.created";
    pub const REPOSITORY_DELETED: &str = "repository.deleted";
    pub const MANIFEST_PUSHED: &str = "manifest.pushed";
    pub const MANIFEST_DELETED: &str = "manifest.deleted";
    /// Pulls, aggregated: `data.count` pulls since the previous such event.
    pub const MANIFEST_PULLED: &str = "manifest.pulled";
    pub const TAG_CREATED: &str = "tag.created";
    pub const TAG_MOVED: &str = "tag.moved";
    pub const TAG_DELETED: &str = "tag.deleted";
    pub const BUILD_QUEUED: &str = "build.queued";
    pub const BUILD_STARTED: &str = "build.started";
    pub const BUILD_SUCCEEDED: &str = "build.succeeded";
    pub const BUILD_FAILED: &str = "build.failed";
    pub const BUILD_CANCELLED: &str = "build.cancelled";
    pub const SIGNATURE_ADDED: &str = "signature.added";
    pub const SCAN_COMPLETED: &str = "scan.completed";
    pub const VULNERABILITY_FOUND: &str = "vulnerability.found";

    /// Every type, for validating subscription filters.
    pub const ALL: &[&str] = &[
        REPOSITORY_CREATED,
        REPOSITORY_DELETED,
        MANIFEST_PUSHED,
        MANIFEST_DELETED,
        MANIFEST_PULLED,
        TAG_CREATED,
        TAG_MOVED,
        TAG_DELETED,
        BUILD_QUEUED,
        BUILD_STARTED,
        BUILD_SUCCEEDED,
        BUILD_FAILED,
        BUILD_CANCELLED,
        SIGNATURE_ADDED,
        SCAN_COMPLETED,
        VULNERABILITY_FOUND,
    ];
}

/// An event to write.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub kind: &'static str,
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    /// Who caused it (user, `owner+robot`, `build:<id>`), if known.
    pub actor: Option<String>,
    /// Details; a JSON object.
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(kind: &'static str, repository: &str) -> NewEvent {
        NewEvent {
            kind,
            repository: Some(repository.to_string()),
            data: serde_json::json!({}),
            ..NewEvent::default()
        }
    }

    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    pub fn digest(mut self, digest: impl Into<String>) -> Self {
        self.digest = Some(digest.into());
        self
    }

    pub fn actor(mut self, actor: Option<&str>) -> Self {
        self.actor = actor.map(str::to_string);
        self
    }

    pub fn data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }
}

/// An event as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub namespace: Option<String>,
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub actor: Option<String>,
    pub data: serde_json::Value,
    /// Unix milliseconds.
    pub created_at: i64,
}

static WAKE: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Tells this process's consumers that events were committed. Optional:
/// consumers also poll.
pub fn wake() {
    WAKE.notify_waiters();
}

/// Writes events inside the caller's transaction. Call it last, just before
/// commit (see the module docs on ordering).
pub async fn append(
    conn: &mut AnyConnection,
    backend: Backend,
    events: &[NewEvent],
) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    if backend == Backend::Postgres {
        sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
            .execute(&mut *conn)
            .await?;
    }
    let now = now_millis();
    for e in events {
        let namespace = e
            .repository
            .as_deref()
            .map(|r| r.split('/').next().unwrap_or(r).to_string());
        sqlx::query(
            "INSERT INTO events (type, namespace, repository, tag, digest, actor, data, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(e.kind)
        .bind(namespace)
        .bind(&e.repository)
        .bind(&e.tag)
        .bind(&e.digest)
        .bind(&e.actor)
        .bind(e.data.to_string())
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Writes events in a transaction of their own (for facts with no other
/// row to change, like aggregated pulls).
pub async fn append_now(db: &Db, events: &[NewEvent]) -> sqlx::Result<()> {
    let mut tx = db.write.begin().await?;
    append(&mut tx, db.backend, events).await?;
    tx.commit().await?;
    wake();
    Ok(())
}

const EVENT_COLUMNS: &str = "id, type, namespace, repository, tag, digest, actor, data, created_at";

fn event_row(r: &sqlx::any::AnyRow) -> sqlx::Result<Event> {
    let data: String = r.try_get(7)?;
    Ok(Event {
        id: r.try_get(0)?,
        kind: r.try_get(1)?,
        namespace: r.try_get(2)?,
        repository: r.try_get(3)?,
        tag: r.try_get(4)?,
        digest: r.try_get(5)?,
        actor: r.try_get(6)?,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
        created_at: r.try_get(8)?,
    })
}

/// Up to `limit` events after `after`, oldest first; only those of
/// `repository` when given.
pub async fn list(
    db: &Db,
    after: i64,
    repository: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<Event>> {
    let rows = match repository {
        Some(r) => {
            sqlx::query(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE repository = $1 AND id > $2 ORDER BY id LIMIT $3"
            ))
            .bind(r)
            .bind(after)
            .bind(limit)
            .fetch_all(&db.read)
            .await?
        }
        None => {
            sqlx::query(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .bind(after)
            .bind(limit)
            .fetch_all(&db.read)
            .await?
        }
    };
    rows.iter().map(event_row).collect()
}

/// One event by id.
pub async fn get(db: &Db, id: i64) -> sqlx::Result<Option<Event>> {
    let row = sqlx::query(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"))
        .bind(id)
        .fetch_optional(&db.read)
        .await?;
    row.as_ref().map(event_row).transpose()
}

/// Deletes events older than `before` (Unix ms) that every consumer has
/// read. Returns how many went.
pub async fn prune(db: &Db, before: i64) -> sqlx::Result<u64> {
    let n = sqlx::query(
        "DELETE FROM events WHERE created_at < $1 \
         AND id <= (SELECT COALESCE(MIN(position), 0) FROM event_consumers)",
    )
    .bind(before)
    .execute(&db.write)
    .await?
    .rows_affected();
    Ok(n)
}

/// Sets `dockyard_events_consumer_lag{consumer}`: events written that each
/// consumer has not read yet.
pub async fn record_lag(db: &Db) -> sqlx::Result<()> {
    let last: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM events")
        .fetch_one(&db.read)
        .await?
        .try_get(0)?;
    for (name, position, _) in consumers(db).await? {
        metrics::gauge!("dockyard_events_consumer_lag", "consumer" => name)
            .set((last - position).max(0) as f64);
    }
    Ok(())
}

/// Where each consumer stands: `(name, position, lease owner)`.
pub async fn consumers(db: &Db) -> sqlx::Result<Vec<(String, i64, Option<String>)>> {
    let rows = sqlx::query("SELECT name, position, owner FROM event_consumers ORDER BY name")
        .fetch_all(&db.read)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}

/// What a consumer does with a batch of events.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies `events` (in id order) inside `tx`; the consumer's position
    /// moves past them in the same transaction. An error rolls both back and
    /// the batch is offered again after a pause.
    ///
    /// On SQLite `tx` holds the only write connection: do not write through
    /// `Db::write` from here, write through `tx`.
    async fn handle(&self, tx: &mut AnyConnection, events: &[Event]) -> Result<(), String>;

    /// Called after the batch committed (wake workers, say).
    fn committed(&self) {}
}

/// Tuning of a consumer loop.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Events per transaction.
    pub batch: i64,
    /// How long a replica's claim lasts without renewal.
    pub lease: Duration,
    /// Poll interval when idle (consumers are also woken by [`wake`]).
    pub idle: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            batch: 200,
            lease: Duration::from_secs(15),
            idle: Duration::from_millis(250),
        }
    }
}

/// Runs a consumer until `shutdown`: claims its lease, reads after its
/// position, hands batches to `handler`.
pub async fn run_consumer(
    db: Db,
    name: &str,
    handler: Arc<dyn Handler>,
    options: ConsumerOptions,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let owner = uuid_like();
    let mut held_until = 0_i64;
    let lease_ms = options.lease.as_millis() as i64;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let now = now_millis();
        // Renew when half the lease has passed (a write, so not every poll).
        if held_until - now < lease_ms / 2 {
            match claim(&db, name, &owner, now, lease_ms).await {
                Ok(true) => held_until = now + lease_ms,
                Ok(false) => {
                    held_until = 0;
                    pause(&shutdown, options.lease / 3).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot claim the event consumer");
                    held_until = 0;
                    pause(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let woken = WAKE.notified();
        match step(&db, name, &owner, &*handler, options.batch, lease_ms).await {
            Ok(Step::Did(n)) => {
                held_until = now_millis() + lease_ms;
                metrics::counter!("dockyard_events_consumed_total", "consumer" => name.to_string())
                    .increment(n as u64);
                handler.committed();
            }
            Ok(Step::Idle) => {
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep(options.idle) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            Ok(Step::LostLease) => held_until = 0,
            Err(e) => {
                tracing::warn!(consumer = name, error = %e, "event consumer failed; retrying the batch");
                pause(&shutdown, Duration::from_secs(1)).await;
            }
        }
    }
    // Let another replica take over at once.
    let _ = sqlx::query(
        "UPDATE event_consumers SET owner = NULL, lease_expires = 0 WHERE name = $1 AND owner = $2",
    )
    .bind(name)
    .bind(&owner)
    .execute(&db.write)
    .await;
}

async fn pause(shutdown: &tokio_util::sync::CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

fn uuid_like() -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

async fn claim(db: &Db, name: &str, owner: &str, now: i64, lease_ms: i64) -> sqlx::Result<bool> {
    sqlx::query(
        "INSERT INTO event_consumers (name, position, owner, lease_expires, updated_at) \
         VALUES ($1, 0, NULL, 0, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(now)
    .execute(&db.write)
    .await?;
    let n = sqlx::query(
        "UPDATE event_consumers SET owner = $1, lease_expires = $2 \
         WHERE name = $3 AND (owner = $1 OR owner IS NULL OR lease_expires < $4)",
    )
    .bind(owner)
    .bind(now + lease_ms)
    .bind(name)
    .bind(now)
    .execute(&db.write)
    .await?
    .rows_affected();
    Ok(n == 1)
}

enum Step {
    Did(usize),
    Idle,
    LostLease,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("{0}")]
    Db(#[from] sqlx::Error),
    #[error("handler: {0}")]
    Handler(String),
}

async fn step(
    db: &Db,
    name: &str,
    owner: &str,
    handler: &dyn Handler,
    batch: i64,
    lease_ms: i64,
) -> Result<Step, StepError> {
    let position: i64 = sqlx::query("SELECT position FROM event_consumers WHERE name = $1")
        .bind(name)
        .fetch_one(&db.read)
        .await?
        .try_get(0)?;
    let events = list(db, position, None, batch).await?;
    let Some(last) = events.last().map(|e| e.id) else {
        return Ok(Step::Idle);
    };
    let mut tx = db.write.begin().await?;
    handler
        .handle(&mut tx, &events)
        .await
        .map_err(StepError::Handler)?;
    let now = now_millis();
    let n = sqlx::query(
        "UPDATE event_consumers SET position = $1, lease_expires = $2, updated_at = $3 \
         WHERE name = $4 AND owner = $5 AND position = $6",
    )
    .bind(last)
    .bind(now + lease_ms)
    .bind(now)
    .bind(name)
    .bind(owner)
    .bind(position)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(Step::LostLease);
    }
    tx.commit().await?;
    Ok(Step::Did(events.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Collect(Arc<Mutex<Vec<i64>>>, bool);

    #[async_trait::async_trait]
    impl Handler for Collect {
        async fn handle(&self, tx: &mut AnyConnection, events: &[Event]) -> Result<(), String> {
            // Effects go through the transaction, like real consumers.
            sqlx::query("INSERT INTO repositories (name, created_at) VALUES ($1, 0)")
                .bind(format!("seen/{}", events[0].id))
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            if self.1 {
                return Err("refused".into());
            }
            self.0.lock().unwrap().extend(events.iter().map(|e| e.id));
            Ok(())
        }
    }

    #[tokio::test]
    async fn consumers_read_in_order_once_and_resume_from_their_position() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(
            &format!("sqlite://{}", dir.path().join("e.db").display()),
            4,
        )
        .await
        .unwrap();
        for i in 0..5 {
            append_now(
                &db,
                &[NewEvent::new(kinds::TAG_CREATED, "a/b").tag(format!("t{i}"))],
            )
            .await
            .unwrap();
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let opts = ConsumerOptions {
            batch: 2,
            lease: Duration::from_secs(5),
            idle: Duration::from_millis(20),
        };
        // A failing handler leaves no effect and no progress.
        let stop = tokio_util::sync::CancellationToken::new();
        let failing = tokio::spawn(run_consumer(
            db.clone(),
            "c",
            Arc::new(Collect(seen.clone(), true)),
            opts.clone(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.cancel();
        failing.await.unwrap();
        assert_eq!(consumers(&db).await.unwrap()[0].1, 0);
        assert!(
            sqlx::query("SELECT 1 FROM repositories WHERE name LIKE 'seen/%'")
                .fetch_optional(&db.read)
                .await
                .unwrap()
                .is_none()
        );

        let stop = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn(run_consumer(
            db.clone(),
            "c",
            Arc::new(Collect(seen.clone(), false)),
            opts.clone(),
            stop.clone(),
        ));
        let wait = || async {
            for _ in 0..100 {
                if seen.lock().unwrap().len() >= 7 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        run.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3, 4, 5]);
        // Two more while stopped; a new run resumes after 5.
        for t in ["x", "y"] {
            append_now(&db, &[NewEvent::new(kinds::TAG_DELETED, "a/b").tag(t)])
                .await
                .unwrap();
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn(run_consumer(
            db.clone(),
            "c",
            Arc::new(Collect(seen.clone(), false)),
            opts,
            stop.clone(),
        ));
        wait().await;
        stop.cancel();
        run.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3, 4, 5, 6, 7]);
        let e = get(&db, 6).await.unwrap().unwrap();
        assert_eq!(e.kind, "tag.deleted");
        assert_eq!(e.namespace.as_deref(), Some("a"));
        // Nothing is pruned that a consumer has not read... all read here.
        assert_eq!(prune(&db, now_millis() + 1).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_held_lease_keeps_other_replicas_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(
            &format!("sqlite://{}", dir.path().join("l.db").display()),
            4,
        )
        .await
        .unwrap();
        let now = now_millis();
        assert!(claim(&db, "c", "one", now, 10_000).await.unwrap());
        assert!(!claim(&db, "c", "two", now, 10_000).await.unwrap());
        assert!(claim(&db, "c", "one", now, 10_000).await.unwrap());
        // Expired: another replica takes over.
        assert!(claim(&db, "c", "two", now + 20_000, 10_000).await.unwrap());
    }
}
