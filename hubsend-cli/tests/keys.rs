//! `hubsend send --partition-key-field` with 10,000 distinct keys: the records of many keys
//! share one batch per partition, and every event is stored on the partition the service's hash
//! gives its key, with its key set (the test hub checks each one against its own hash).

use std::collections::BTreeMap;
use std::time::Duration;

use hubsend_testhub::{HubConfig, TestHub};
use serde_json::Value;

const HUB: &str = "telemetry";
const KEYS: usize = 10_000;
const ROUNDS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sensor_ids_share_batches_and_land_on_their_partitions() {
    let hub = TestHub::start(HubConfig::new().hub(HUB, 16).verify_partition_keys(true))
        .await
        .unwrap();
    let mut input = String::new();
    for round in 0..ROUNDS {
        for k in 0..KEYS {
            input.push_str(&format!(
                "{{\"sensor_id\":\"dev-{k:05}:temp\",\"timestamp\":\"2025-08-19T08:30:0{round}Z\",\"value\":{round}}}\n"
            ));
        }
    }
    let path = std::env::temp_dir().join(format!("hubsend-keys-{}.ndjson", std::process::id()));
    std::fs::write(&path, input).unwrap();
    let args = [
        "send".to_owned(),
        "--connection-string".to_owned(),
        hub.connection_string(),
        "--input".to_owned(),
        path.display().to_string(),
        "--partition-key-field".to_owned(),
        "sensor_id".to_owned(),
        "--json".to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hubsend"))
            .args(&args)
            .env_remove("EVENTHUB_CONNECTION_STRING")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["sent"], (KEYS * ROUNDS) as u64, "{report}");
    assert_eq!(report["failed"], 0);
    assert_eq!(report["partition_keys"], KEYS as u64);
    // A lane per key sent one event per batch (20,000); with keys resolved on the client a
    // partition's batch holds what came within one linger (50 ms) or filled it.
    let batches = report["batches"].as_u64().unwrap();
    assert!(batches < (KEYS * ROUNDS / 2) as u64, "{batches} batches");

    let events = hub
        .wait_for_events(HUB, KEYS * ROUNDS, Duration::from_secs(10))
        .await;
    assert_eq!(events.len(), KEYS * ROUNDS);
    let mut values: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &events {
        let body: Value = serde_json::from_slice(&e.body).unwrap();
        let key = body["sensor_id"].as_str().unwrap().to_owned();
        assert_eq!(e.partition_key.as_deref(), Some(key.as_str()));
        assert_eq!(e.partition, hub.partition_for_key(HUB, &key), "key {key}");
        // Resolved on the client: sent to the partition's link, not the hub's.
        assert_eq!(e.link_target, format!("{HUB}/Partitions/{}", e.partition));
        values
            .entry(key)
            .or_default()
            .push(body["value"].as_i64().unwrap());
    }
    assert_eq!(values.len(), KEYS);
    assert!(values.values().all(|v| v == &[0, 1]), "order per key");
    assert_eq!(hub.stats().deliveries_rejected, 0);
}
