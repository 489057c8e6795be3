//! Helpers shared by the integration tests: a test hub with logging, producers with fast
//! retries, and the checks every fault test makes (nothing reported stored that the hub does
//! not hold; nothing lost).
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use hubsend::{Event, Producer, ProducerOptions, RetryOptions};
use hubsend_testhub::{HubConfig, HubStats, TestHub};

/// The hub every test sends to.
pub const HUB: &str = "telemetry";

/// Bound on every wait for the hub or an event; a healthy run needs a fraction of it, and
/// every wait returns the moment what it waits for happens.
pub const WAIT: Duration = Duration::from_secs(30);

/// Starts a test hub with `config`, with test logging from `RUST_LOG`.
pub async fn start(config: HubConfig) -> TestHub {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    TestHub::start(config).await.expect("test hub starts")
}

/// A test hub with the default configuration (hub `telemetry`, 4 partitions).
pub async fn hub() -> TestHub {
    start(HubConfig::new()).await
}

/// Retries that are quick to run through: 20 ms doubling to 500 ms, 10 retries.
pub fn fast_retry() -> RetryOptions {
    retry(10, Duration::from_millis(500))
}

/// `max_retries` retries from 20 ms, doubling up to `max_delay`.
pub fn retry(max_retries: u32, max_delay: Duration) -> RetryOptions {
    RetryOptions::new()
        .max_retries(max_retries)
        .base_delay(Duration::from_millis(20))
        .max_delay(max_delay)
}

/// A producer on `hub` with the default options.
pub async fn producer(hub: &TestHub) -> Producer {
    producer_with(hub, ProducerOptions::new()).await
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

/// Event `n`: body `event n`, application property `n` (what [`stored_counts`] reads).
pub fn numbered(n: i64) -> Event {
    Event::new(format!("event {n}")).with_property("n", n)
}

/// The `n` application property of an event built by [`numbered`].
pub fn number_of(event: &Event) -> i64 {
    event
        .properties()
        .find_map(|(k, v)| match (k, v) {
            ("n", hubsend::PropertyValue::Long(n)) => Some(*n),
            _ => None,
        })
        .expect("a numbered event")
}

/// Waits until the hub has accepted `at_least` deliveries (woken by the hub's counters, no
/// polling; bounded by [`WAIT`]) and returns its counters then.
pub async fn wait_until_accepted(hub: &TestHub, at_least: u64) -> HubStats {
    hub.wait_for_stats(|s| s.deliveries_accepted >= at_least, WAIT)
        .await
}
