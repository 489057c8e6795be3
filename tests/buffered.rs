//! The buffered producer against the test hub: everything enqueued arrives (or is reported
//! failed), in order per key, through faults, with bounded buffering.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use hubsend::{
    BufferedOptions, BufferedProducer, ErrorKind, Event, Producer, ProducerOptions, SendOptions,
};
use hubsend_testhub::{HubConfig, TestHub};
use support::{producer_with, retry, start, wait_until_accepted, HUB};

mod support;

async fn setup(retries: u32) -> (TestHub, Producer) {
    let hub = start(HubConfig::new().max_message_size(64 * 1024)).await;
    let options = ProducerOptions::new()
        .max_in_flight(16)
        .retry(retry(retries, Duration::from_millis(300)));
    let producer = producer_with(&hub, options).await;
    (hub, producer)
}

/// Enqueues `n` events over 8 keys; returns the buffered producer's final report.
async fn stream(buffered: &BufferedProducer, n: usize) {
    for i in 0..n {
        let key = format!("sensor-{}", i % 8);
        let event = Event::new(format!(r#"{{"sensor_id":"{key}","value":{i}}}"#))
            .with_property("n", i as i64);
        buffered
            .enqueue(event, SendOptions::new().partition_key(key))
            .await
            .unwrap();
    }
}

fn check_all_arrived_in_order(hub: &TestHub, n: usize) -> usize {
    let stored = hub.events(HUB);
    let mut seen = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &stored {
        let i = e.application_properties["n"].as_i64().unwrap();
        if seen.insert(i) {
            per_key
                .entry(e.partition_key.clone().unwrap())
                .or_default()
                .push(i);
        }
    }
    assert_eq!(seen.len(), n, "every event arrived");
    for (key, ns) in per_key {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "order within {key}");
    }
    stored.len() - n
}

#[tokio::test]
async fn everything_enqueued_arrives_in_order_per_key() {
    let (hub, producer) = setup(8).await;
    let buffered = BufferedProducer::new(
        producer,
        BufferedOptions::new().linger(Duration::from_millis(200)),
    );
    stream(&buffered, 100_000).await;
    let report = buffered.close().await;
    assert_eq!(report.enqueued, 100_000);
    assert_eq!(report.sent, 100_000);
    assert_eq!(report.failed, 0);
    assert_eq!(check_all_arrived_in_order(&hub, 100_000), 0);
    // Batches were filled (about 600 of these events fit in 64 KiB), not sent one by one.
    assert!(hub.stats().transfers_received < 2_000, "{:?}", hub.stats());
}

#[tokio::test]
async fn everything_arrives_through_a_dropped_connection() {
    let (hub, producer) = setup(10).await;
    let buffered = BufferedProducer::new(producer.clone(), BufferedOptions::new());
    let faults = hub.faults();
    let inject = async {
        wait_until_accepted(&hub, 40).await;
        faults.drop_connections();
    };
    tokio::join!(stream(&buffered, 100_000), inject);
    let report = buffered.close().await;
    assert_eq!(report.sent, 100_000, "{report:?}");
    let duplicates = check_all_arrived_in_order(&hub, 100_000);
    println!("buffered tcp drop: {duplicates} duplicates");
    assert!(producer.stats().reconnects >= 1);
}

#[tokio::test]
async fn everything_arrives_through_forced_detaches() {
    let (hub, producer) = setup(10).await;
    hub.faults()
        .detach_links_after(30, "amqp:link:detach-forced", "injected");
    let buffered = BufferedProducer::new(producer, BufferedOptions::new());
    stream(&buffered, 100_000).await;
    let report = buffered.close().await;
    assert_eq!(report.sent, 100_000, "{report:?}");
    let duplicates = check_all_arrived_in_order(&hub, 100_000);
    println!("buffered detach-forced: {duplicates} duplicates");
}

#[tokio::test]
async fn failures_are_reported_with_their_events() {
    let (hub, producer) = setup(0).await;
    hub.faults().reject_every_nth(2, "amqp:not-allowed");
    let returned = Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let seen = returned.clone();
    let buffered = BufferedProducer::new(
        producer,
        BufferedOptions::new().on_failure(move |failed| {
            // Keys are resolved on the client: the batch names its partition, each event keeps
            // its key.
            assert!(failed.partition_id.is_some());
            assert_eq!(failed.partition_keys.len(), failed.events.len());
            assert!(failed.partition_keys.iter().all(Option::is_some));
            assert_eq!(failed.error.kind(), ErrorKind::Rejected);
            let mut seen = seen.lock().unwrap();
            for event in &failed.events {
                let n = event
                    .properties()
                    .find_map(|(k, v)| match (k, v) {
                        ("n", hubsend::PropertyValue::Long(n)) => Some(*n),
                        _ => None,
                    })
                    .expect("the event comes back whole, properties included");
                seen.push(n);
            }
        }),
    );
    stream(&buffered, 20_000).await;
    let report = buffered.close().await;
    assert_eq!(report.sent + report.failed, 20_000);
    assert!(report.failed > 0);
    let returned = returned.lock().unwrap().clone();
    assert_eq!(
        returned.len() as u64,
        report.failed,
        "every failed event comes back"
    );
    // Stored and returned events are disjoint and together are everything enqueued.
    let stored: HashSet<i64> = hub
        .events(HUB)
        .iter()
        .map(|e| e.application_properties["n"].as_i64().unwrap())
        .collect();
    assert_eq!(stored.len() as u64, report.sent);
    let returned: HashSet<i64> = returned.into_iter().collect();
    assert!(stored.is_disjoint(&returned));
    assert_eq!(stored.len() + returned.len(), 20_000);
}

#[tokio::test]
async fn flush_sends_partial_batches_and_waits() {
    let (hub, producer) = setup(8).await;
    let buffered = BufferedProducer::new(
        producer,
        BufferedOptions::new().linger(Duration::from_secs(60)),
    );
    for i in 0..10u8 {
        buffered
            .enqueue(Event::new(vec![i]), SendOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(hub.events(HUB).len(), 0, "lingering, not sent yet");
    buffered.flush().await;
    assert_eq!(hub.events(HUB).len(), 10);
    assert_eq!(buffered.report().sent, 10);
    let err = buffered
        .enqueue(
            Event::new(b"x".to_vec()),
            SendOptions::new().partition_id("77"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let report = buffered.clone().close().await;
    assert_eq!(report.sent, 10);
    let err = buffered
        .enqueue(Event::new(b"late".to_vec()), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

/// A buffered producer holding at most `events`, and `fill` round-robin events (each body
/// its number, four bytes) put in it with `try_enqueue`.
async fn bounded(
    producer: Producer,
    events: usize,
    linger: Duration,
    fill: u32,
) -> BufferedProducer {
    let buffered = BufferedProducer::new(
        producer,
        BufferedOptions::new()
            .max_buffered_events(events)
            .linger(linger),
    );
    for i in 0..fill {
        buffered
            .try_enqueue(Event::new(i.to_be_bytes().to_vec()), SendOptions::new())
            .await
            .unwrap();
    }
    buffered
}

#[tokio::test]
async fn the_buffer_is_bounded() {
    let (hub, producer) = setup(8).await;
    let buffered = bounded(producer, 100, Duration::from_secs(60), 100).await;
    let err = buffered
        .try_enqueue(Event::new(b"one too many".to_vec()), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    buffered.flush().await;
    buffered
        .try_enqueue(Event::new(b"room again".to_vec()), SendOptions::new())
        .await
        .unwrap();
    let report = buffered.close().await;
    assert_eq!(report.sent, 101);
    assert_eq!(hub.events(HUB).len(), 101);
}

/// Round-robin events take their buffer slots a few at a time (a lane holds some ahead); a
/// caller who finds the buffer otherwise full gets the unused ones back at once, rather than
/// the round-robin batch being shipped early to make room, and `Busy` means every slot holds
/// an event.
#[tokio::test]
async fn slots_a_lane_holds_ahead_go_to_whoever_needs_them() {
    let (hub, producer) = setup(8).await;
    let buffered = bounded(producer, 1000, Duration::from_secs(600), 995).await;
    for i in 0..5u8 {
        tokio::time::timeout(
            Duration::from_secs(10),
            buffered.enqueue(Event::new(vec![i]), SendOptions::new().partition_id("2")),
        )
        .await
        .expect("a free slot, not a wait")
        .unwrap();
    }
    let err = buffered
        .try_enqueue(Event::new(b"one too many".to_vec()), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert_eq!(
        hub.events(HUB).len(),
        0,
        "nothing shipped before its linger to make room"
    );
    let report = buffered.close().await;
    assert_eq!(report.sent, 1000);
    let stored = hub.events(HUB);
    assert_eq!(stored.len(), 1000);
    assert_eq!(
        stored
            .iter()
            .filter(|e| e.partition == 2 && e.body.len() == 1)
            .count(),
        5
    );
}

#[tokio::test]
async fn close_within_a_deadline_reports_what_is_still_pending() {
    let (hub, producer) = setup(8).await;
    hub.faults().delay_dispositions(Duration::from_secs(3));
    let buffered = BufferedProducer::new(producer, BufferedOptions::new());
    for i in 0..1_000 {
        buffered
            .enqueue(Event::new(format!("{i}")), SendOptions::new())
            .await
            .unwrap();
    }
    let started = tokio::time::Instant::now();
    let report = buffered.close_within(Duration::from_millis(300)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(report.enqueued, 1_000);
    assert_eq!(report.pending, 1_000 - report.sent - report.failed);
    assert!(report.pending > 0, "{report:?}");
    // Nothing is lost by giving up waiting: the deliveries still land.
    assert_eq!(
        hub.wait_for_events(HUB, 1_000, Duration::from_secs(10))
            .await
            .len(),
        1_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_success_hook_reports_every_stored_batch() {
    let (hub, producer) = setup(0).await;
    let settled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = settled.clone();
    let buffered = BufferedProducer::new(
        producer.clone(),
        BufferedOptions::new().on_success(move |batch| seen.lock().unwrap().push(batch)),
    );
    stream(&buffered, 5000).await;
    let report = buffered.close().await;
    assert_eq!(check_all_arrived_in_order(&hub, 5000), 0, "no duplicates");
    let settled = std::mem::take(&mut *settled.lock().unwrap());
    let events: usize = settled.iter().map(|b| b.events).sum();
    let bytes: u64 = settled.iter().map(|b| b.body_bytes).sum();
    assert_eq!(events as u64, report.sent);
    let stored: u64 = hub.events(HUB).iter().map(|e| e.body.len() as u64).sum();
    assert_eq!(bytes, stored);
    assert!(settled.iter().all(|b| b.partition_id.is_some()));
    assert!(settled.iter().all(|b| b.latency < Duration::from_secs(10)));
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_routes_than_lanes_retire_the_least_recently_used() {
    let (hub, producer) = setup(0).await;
    // Two lanes for eight keys: every new key retires one, nothing is refused or lost.
    let buffered = BufferedProducer::new(producer.clone(), BufferedOptions::new().max_lanes(2));
    stream(&buffered, 2000).await;
    buffered.flush().await;
    assert_eq!(buffered.report().sent, 2000);
    let report = buffered.close().await;
    assert_eq!((report.sent, report.failed, report.pending), (2000, 0, 0));
    assert_eq!(check_all_arrived_in_order(&hub, 2000), 0, "no duplicates");
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_can_be_counted_without_keeping_the_events() {
    let (hub, producer) = setup(0).await;
    hub.faults()
        .reject_every_nth(1, "com.microsoft:argument-error");
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = failed.clone();
    let buffered = BufferedProducer::new(
        producer.clone(),
        BufferedOptions::new()
            .keep_failed_events(false)
            .on_failure(move |batch| seen.lock().unwrap().push((batch.count, batch.events.len()))),
    );
    stream(&buffered, 300).await;
    let report = buffered.close().await;
    assert_eq!(report.failed, 300);
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    assert_eq!(failed.iter().map(|(count, _)| count).sum::<usize>(), 300);
    assert!(failed.iter().all(|(_, kept)| *kept == 0));
    producer.close().await.unwrap();
}
