//! Outbound webhooks: registry and build events, POSTed to URLs that users
//! subscribe, signed, in order per subscription, retried until they land.
//!
//! Owns: the subscriptions (`webhook_subscriptions`: scope, target URL,
//! body format, filters, signing secret), the `webhooks` consumer of the
//! event log that fans each event out into one delivery per matching
//! subscription with its body rendered once (`webhook_deliveries`), the
//! delivery workers (signed POSTs, per-subscription order, a global cap on
//! attempts in flight, exponential backoff with jitter, `dead` after
//! `webhooks.max_attempts`, expiring claims so that one replica attempts a
//! delivery), the attempt log (`webhook_attempts`) and redelivery.
//!
//! Must not: serve HTTP or check who may manage a subscription (`web-api`
//! does both, by the subscription's scope); write tables other than its
//! own; hold a database transaction across an HTTP call (a slow target
//! would then hold the only SQLite write connection and stall the
//! registry); call a loopback or private address unless
//! `webhooks.allow_private_targets` (checked when a subscription is saved
//! and again on every connection, after DNS resolution).

mod deliver;
mod fanout;
pub mod format;
pub mod sign;
mod subscriptions;
mod target;

use std::sync::Arc;
use std::time::Duration;

use dockyard_core::Db;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use deliver::{Attempt, Delivery};
pub use format::Format;
pub use subscriptions::{Scope, Subscription, SubscriptionInput, SubscriptionPatch};

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0} not found")]
    NotFound(String),
    /// Bad input from a caller; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    #[error("HTTP client: {0}")]
    Client(String),
}

pub type Result<T, E = WebhookError> = std::result::Result<T, E>;

/// How deliveries are made (from `webhooks.*` in the configuration, plus
/// where this server is reachable, for links in the bodies).
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_attempts: u32,
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub concurrency: u32,
    pub allow_private_targets: bool,
    /// Public base URL of the registry, without a trailing slash (CloudEvents
    /// `source`, Distribution `target.url`).
    pub public_url: String,
    /// `host:port` of this server (Distribution `source.addr`).
    pub source_addr: String,
}

impl Settings {
    pub fn from_config(
        config: &dockyard_core::config::WebhooksConfig,
        public_url: &str,
        source_addr: &str,
    ) -> Settings {
        Settings {
            max_attempts: config.max_attempts.max(1),
            timeout: config.timeout,
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max.max(config.backoff_base),
            concurrency: config.concurrency.max(1),
            allow_private_targets: config.allow_private_targets,
            public_url: public_url.trim_end_matches('/').to_string(),
            source_addr: source_addr.to_string(),
        }
    }
}

/// The webhooks service: subscriptions and deliveries over the database,
/// and (after [`Webhooks::start`]) the fan-out consumer and the workers.
pub struct Webhooks {
    db: Db,
    settings: Settings,
    /// Wakes the delivery dispatcher (fan-out committed, an attempt ended,
    /// a redelivery was queued).
    wake: Notify,
    client: reqwest::Client,
    /// Identifies this process (claims, Distribution `source.instanceID`).
    instance: String,
}

impl Webhooks {
    pub fn new(db: Db, settings: Settings) -> Result<Arc<Webhooks>> {
        let client = target::client(&settings)?;
        Ok(Arc::new(Webhooks {
            db,
            settings,
            wake: Notify::new(),
            client,
            instance: uuid::Uuid::new_v4().to_string(),
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Spawns the fan-out consumer and the delivery dispatcher; the handle
    /// completes when both stopped after `shutdown` (attempts in flight are
    /// abandoned and their claims released, so another process retries them
    /// at once).
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let consumer = tokio::spawn(dockyard_core::events::run_consumer(
            self.db.clone(),
            fanout::CONSUMER,
            Arc::new(fanout::FanOut::new(self.clone())),
            dockyard_core::events::ConsumerOptions {
                // Short transactions: on SQLite the fan-out holds the only
                // write connection while it inserts.
                batch: 20,
                ..Default::default()
            },
            shutdown.clone(),
        ));
        let dispatcher = tokio::spawn(deliver::run(self.clone(), shutdown));
        tokio::spawn(async move {
            let _ = consumer.await;
            let _ = dispatcher.await;
        })
    }

    fn wake(&self) {
        self.wake.notify_one();
    }
}
