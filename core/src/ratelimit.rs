//! Failed-login limiting: after too many failures for one account or from
//! one client address inside a window, further attempts are refused until
//! the window has passed (answered with 429 and `Retry-After`).
//!
//! The counters live in memory, per process: with several replicas each
//! one limits on its own, which still bounds guessing to replicas × limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed per account inside the window.
pub const PER_ACCOUNT: usize = 10;
/// Failures allowed per client address inside the window.
pub const PER_ADDRESS: usize = 30;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(300);

/// Counts recent failures by account and by address.
#[derive(Default)]
pub struct LoginLimiter {
    accounts: Mutex<HashMap<String, Vec<Instant>>>,
    addresses: Mutex<HashMap<String, Vec<Instant>>>,
}

fn prune(v: &mut Vec<Instant>, now: Instant) {
    v.retain(|t| now.duration_since(*t) < WINDOW);
}

fn wait(
    map: &Mutex<HashMap<String, Vec<Instant>>>,
    key: &str,
    limit: usize,
    now: Instant,
) -> Option<Duration> {
    let mut m = map.lock().expect("limiter");
    let v = m.get_mut(key)?;
    prune(v, now);
    (v.len() >= limit).then(|| {
        WINDOW
            .saturating_sub(now.duration_since(v[0]))
            .max(Duration::from_secs(1))
    })
}

fn add(map: &Mutex<HashMap<String, Vec<Instant>>>, key: &str, now: Instant) {
    let mut m = map.lock().expect("limiter");
    if m.len() > 100_000 {
        m.retain(|_, v| {
            prune(v, now);
            !v.is_empty()
        });
    }
    m.entry(key.to_string()).or_default().push(now);
}

impl LoginLimiter {
    pub fn new() -> LoginLimiter {
        LoginLimiter::default()
    }

    /// `Err(retry_after)` when `account` or `address` has failed too often.
    pub fn check(&self, account: &str, address: &str) -> Result<(), Duration> {
        let now = Instant::now();
        if let Some(w) = wait(&self.accounts, account, PER_ACCOUNT, now) {
            return Err(w);
        }
        if !address.is_empty()
            && let Some(w) = wait(&self.addresses, address, PER_ADDRESS, now)
        {
            return Err(w);
        }
        Ok(())
    }

    /// Records a failed attempt.
    pub fn failed(&self, account: &str, address: &str) {
        let now = Instant::now();
        add(&self.accounts, account, now);
        if !address.is_empty() {
            add(&self.addresses, address, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_by_account_and_address() {
        let l = LoginLimiter::new();
        for _ in 0..PER_ACCOUNT {
            assert!(l.check("alice", "10.0.0.1").is_ok());
            l.failed("alice", "10.0.0.1");
        }
        let wait = l.check("alice", "10.0.0.2").unwrap_err();
        assert!(wait > Duration::from_secs(200) && wait <= WINDOW);
        assert!(l.check("bob", "10.0.0.2").is_ok());
        for i in 0..PER_ADDRESS {
            l.failed(&format!("user{i}"), "10.0.0.9");
        }
        assert!(l.check("carol", "10.0.0.9").is_err(), "address limit");
        assert!(l.check("carol", "10.0.0.8").is_ok());
    }
}
