//! Helpers shared by the integration tests: a test hub with logging, producers with fast
//! retries, and the checks every fault test makes (nothing reported stored that the hub does
//! not hold; nothing lost).
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use hubsend::{Producer, ProducerOptions, RetryOptions};
use hubsend_testhub::{HubConfig, TestHub};

/// The hub every test sends to.
pub const HUB: &str = "telemetry";

/// Starts a test hub with `config`, with test logging from `RUST_LOG`.
pub async fn start(config: HubConfig) -> TestHub {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    TestHub::start(config).await.expect("test hub starts")
}

/// Retries that are quick to run through: 20 ms doubling to 500 ms, 10 retries.
pub fn fast_retry() -> RetryOptions {
    RetryOptions::new()
        .max_retries(10)
        .base_delay(Duration::from_millis(20))
        .max_delay(Duration::from_millis(500))
}

/// A producer on `hub` with `options`.
pub async fn producer_with(hub: &TestHub, options: ProducerOptions) -> Producer {
    Producer::builder()
        .connection_string(hub.connection_string())
        .options(options)
        .connect()
        .await
        .expect("producer connects")
}

/// The `n` application property of every event the hub stored, with how often it was stored.
pub fn stored_counts(hub: &TestHub) -> HashMap<i64, usize> {
    let mut seen = HashMap::new();
    for e in hub.events(HUB) {
        if let Some(n) = e.application_properties.get("n").and_then(|v| v.as_i64()) {
            *seen.entry(n).or_default() += 1;
        }
    }
    seen
}

/// The events reported as stored that the hub does not hold: must always be empty.
pub fn reported_but_not_stored(hub: &TestHub, reported: &BTreeSet<i64>) -> Vec<i64> {
    let stored = stored_counts(hub);
    reported
        .iter()
        .filter(|n| !stored.contains_key(n))
        .copied()
        .collect()
}

/// Waits (on the hub's counters, bounded) until it has accepted `at_least` deliveries.
pub async fn wait_until_accepted(hub: &TestHub, at_least: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while hub.stats().deliveries_accepted < at_least && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
