//! Many partition keys through the buffered producer: keys are resolved to partitions on the
//! client, so events of 10,000 keys share one batch per partition, and every event reaches the
//! partition the service's hash gives its key, with its key set. The test hub checks each
//! keyed event on a partition link against its own, independent hash
//! (`verify_partition_keys`), and the store is checked again here, event by event.

use std::collections::BTreeMap;
use std::time::Duration;

use hubsend::{BufferedOptions, BufferedProducer, Event, Producer, ProducerOptions, SendOptions};
use hubsend_testhub::{HubConfig, TestHub};

const HUB: &str = "telemetry";
const KEYS: usize = 10_000;
const PER_KEY: usize = 2;

async fn hub(partitions: u32) -> TestHub {
    TestHub::start(
        HubConfig::new()
            .hub(HUB, partitions)
            .verify_partition_keys(true),
    )
    .await
    .unwrap()
}

async fn producer(hub: &TestHub, options: ProducerOptions) -> Producer {
    Producer::builder()
        .connection_string(hub.connection_string())
        .options(options)
        .connect()
        .await
        .unwrap()
}

/// Enqueues `PER_KEY` rounds over `KEYS` distinct sensor ids (key `sensor-<k>`, with one
/// non-ASCII key among them), each event's body naming its key and round.
async fn stream(buffered: &BufferedProducer) {
    for round in 0..PER_KEY {
        for k in 0..KEYS {
            let key = sensor(k);
            let event = Event::new(format!(r#"{{"sensor_id":"{key}","round":{round}}}"#))
                .with_content_type("application/json");
            buffered
                .enqueue(event, SendOptions::new().partition_key(key))
                .await
                .unwrap();
        }
    }
}

fn sensor(k: usize) -> String {
    if k == 7 {
        // Non-ASCII: the service hashes UTF-8 bytes.
        "sensor-ß-7".to_owned()
    } else {
        format!("sensor-{k}")
    }
}

/// Every event stored once, on its key's partition by the hub's own hash, with its key, in
/// order per key, sent to partition links; returns how many deliveries carried them.
fn check_store(hub: &TestHub, partitions: u32) -> u64 {
    let events = hub.events(HUB);
    assert_eq!(events.len(), KEYS * PER_KEY, "events lost or duplicated");
    let mut rounds: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut used = std::collections::BTreeSet::new();
    for e in &events {
        let body: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
        let key = body["sensor_id"].as_str().unwrap().to_owned();
        assert_eq!(
            e.partition_key.as_deref(),
            Some(key.as_str()),
            "key not kept"
        );
        assert_eq!(
            e.partition,
            hub.partition_for_key(HUB, &key),
            "key {key} on the wrong partition"
        );
        assert_eq!(
            e.link_target,
            format!("{HUB}/Partitions/{}", e.partition),
            "keyed events go to their partition's link"
        );
        used.insert(e.partition);
        rounds
            .entry(key)
            .or_default()
            .push(body["round"].as_i64().unwrap());
    }
    assert_eq!(rounds.len(), KEYS);
    for (key, r) in &rounds {
        assert_eq!(r, &[0, 1], "order of {key}");
    }
    assert_eq!(
        used.len() as u32,
        partitions,
        "10,000 keys cover every partition"
    );
    let stats = hub.stats();
    assert_eq!(stats.deliveries_rejected, 0);
    stats.deliveries_accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_share_one_batch_per_partition() {
    let hub = hub(32).await;
    let producer = producer(&hub, ProducerOptions::new()).await;
    // A lane per key would need 10,000 lanes; one per partition needs 32. The linger is
    // longer than the run, so batches go out full or at close: a count that does not depend
    // on timing.
    let options = BufferedOptions::new()
        .max_lanes(64)
        .linger(Duration::from_secs(600));
    let buffered = BufferedProducer::new(producer.clone(), options);
    stream(&buffered).await;
    let report = buffered.close().await;
    assert_eq!(report.sent, (KEYS * PER_KEY) as u64, "{report:?}");
    assert_eq!(report.failed, 0);
    let deliveries = check_store(&hub, 32);
    // 20,000 events of ~40 bytes in 1 MiB batches: one per partition, at close (a lane per
    // key sent 10,000 batches or more).
    assert_eq!(deliveries, 32, "keys did not share batches");
    producer.close().await.unwrap();
}

/// A buffer smaller than the partitions' open batches together: no batch can fill while the
/// buffer is full, so an enqueue that finds it full ships the fullest open batch rather than
/// wait for a linger (here ten minutes) to free room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_of_open_batches_does_not_wait_for_the_linger() {
    let hub = hub(8).await;
    let producer = producer(&hub, ProducerOptions::new()).await;
    let options = BufferedOptions::new()
        .max_buffered_events(2_000)
        .linger(Duration::from_secs(600));
    let buffered = BufferedProducer::new(producer.clone(), options);
    tokio::time::timeout(Duration::from_secs(120), stream(&buffered))
        .await
        .expect("enqueue waited for the linger with the buffer full of open batches");
    let report = buffered.close().await;
    assert_eq!(report.sent, (KEYS * PER_KEY) as u64, "{report:?}");
    assert_eq!(report.failed, 0);
    let deliveries = check_store(&hub, 8);
    // Each shipped early batch held at least half the buffer over the 8 partitions.
    assert!(deliveries >= 10, "{deliveries} deliveries");
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_with_idempotent_retries() {
    let hub = hub(8).await;
    let producer = producer(&hub, ProducerOptions::new().idempotent(true)).await;
    let options = BufferedOptions::new().linger(Duration::from_secs(600));
    let buffered = BufferedProducer::new(producer.clone(), options);
    stream(&buffered).await;
    let report = buffered.close().await;
    assert_eq!(report.sent, (KEYS * PER_KEY) as u64, "{report:?}");
    let deliveries = check_store(&hub, 8);
    assert_eq!(deliveries, 8, "one batch per partition, at close");
    // Each event carries its own key next to its own sequence number.
    let events = hub.partition_events(HUB, 0);
    let mut numbers: Vec<i64> = events
        .iter()
        .map(|e| {
            let raw = String::from_utf8_lossy(&e.encoded_message);
            assert!(raw.contains("com.microsoft:producer-sequence-number"));
            e.sequence_number
        })
        .collect();
    numbers.dedup();
    assert_eq!(numbers.len(), events.len());
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_events_come_back_with_their_keys() {
    let hub = hub(4).await;
    hub.faults()
        .reject_every_nth(1, "com.microsoft:argument-error");
    let producer = producer(
        &hub,
        ProducerOptions::new().retry(hubsend::RetryOptions::new().max_retries(0)),
    )
    .await;
    let failed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = failed.clone();
    let buffered = BufferedProducer::new(
        producer.clone(),
        BufferedOptions::new().on_failure(move |batch| {
            let mut sink = sink.lock().unwrap();
            assert_eq!(batch.partition_keys.len(), batch.events.len());
            for (event, key) in batch.events.iter().zip(&batch.partition_keys) {
                sink.push((
                    String::from_utf8_lossy(event.body()).into_owned(),
                    key.clone(),
                ));
            }
        }),
    );
    for k in 0..50 {
        buffered
            .enqueue(
                Event::new(format!("k{k}")),
                SendOptions::new().partition_key(format!("k{k}")),
            )
            .await
            .unwrap();
    }
    let report = buffered.close().await;
    assert_eq!(report.failed, 50);
    {
        let failed = failed.lock().unwrap();
        assert_eq!(failed.len(), 50);
        for (body, key) in failed.iter() {
            assert_eq!(key.as_deref(), Some(body.as_str()));
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), producer.close()).await;
}
