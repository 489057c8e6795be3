//! No event lost: each test streams 100,000 events (10,000 without the `slow-tests` feature) through the batch API while the test hub
//! injects one fault, then checks that every event arrived, that order per partition key held
//! (where the recovery path promises it), and reports duplicates.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hubsend::{
    BatchOptions, BufferedOptions, BufferedProducer, ConnectionEvent, ErrorKind, Event, Producer,
    ProducerOptions, RetryOptions, SendOptions, TryAddError,
};
use hubsend_testhub::{HubConfig, TestHub};
use support::{fast_retry, producer_with, start, wait_until_accepted, HUB};

mod support;
const EVENTS: usize = if cfg!(feature = "slow-tests") {
    100_000
} else {
    10_000
};
const KEYS: usize = 8;

/// The hub's message size: 64 KiB (~500 events per batch, ~200 deliveries) for 100,000
/// events; 8 KiB for the short run, so it too has ~150 deliveries for faults to hit.
const MESSAGE_SIZE: u64 = if cfg!(feature = "slow-tests") {
    64 * 1024
} else {
    8 * 1024
};

/// A delivery count chosen for the 100,000-event run, scaled to this run's deliveries.
fn deliveries(at_100k: u64) -> u64 {
    (at_100k * EVENTS as u64 * 64 * 1024 / (100_000 * MESSAGE_SIZE)).max(2)
}

async fn start_hub() -> TestHub {
    start(HubConfig::new().max_message_size(MESSAGE_SIZE)).await
}

async fn producer(hub: &TestHub, lifetime: Duration, idempotent: bool) -> Producer {
    let options = ProducerOptions::new()
        .idempotent(idempotent)
        .max_in_flight(32)
        .token_lifetime(lifetime)
        .retry(fast_retry());
    producer_with(hub, options).await
}

/// The two ways to stream: batches built by the caller, or the buffered producer.
#[derive(Debug, Clone, Copy)]
enum Api {
    Batches,
    Buffered,
}

/// Each API, plain and with idempotent retries.
const MODES: [(Api, bool); 4] = [
    (Api::Batches, false),
    (Api::Buffered, false),
    (Api::Batches, true),
    (Api::Buffered, true),
];

/// Streams `EVENTS` events over `KEYS` partition keys through `api`; returns how many
/// deliveries (batch API) or events (buffered API) failed for good.
async fn stream(producer: &Producer, api: Api) -> usize {
    match api {
        Api::Batches => stream_batches(producer).await,
        Api::Buffered => stream_buffered(producer).await,
    }
}

async fn stream_buffered(producer: &Producer) -> usize {
    let buffered = BufferedProducer::new(producer.clone(), BufferedOptions::new());
    for i in 0..EVENTS {
        let k = i % KEYS;
        let body = format!(
            r#"{{"sensor_id":"sensor-{k}","timestamp":"2025-08-19T08:30:00Z","value":{i},"n":{i}}}"#
        );
        let event = Event::new(body).with_property("n", i as i64);
        buffered
            .enqueue(
                event,
                SendOptions::new().partition_key(format!("sensor-{k}")),
            )
            .await
            .unwrap();
    }
    let report = buffered.close().await;
    assert_eq!(report.enqueued, EVENTS as u64);
    report.failed as usize
}

/// Streams `EVENTS` events, `KEYS` partition keys, one open batch per key, every batch's
/// outcome awaited at the end. Returns the number of deliveries that failed for good.
async fn stream_batches(producer: &Producer) -> usize {
    let mut batches = Vec::new();
    for k in 0..KEYS {
        batches.push(
            producer
                .create_batch(BatchOptions::new().partition_key(format!("sensor-{k}")))
                .await
                .unwrap(),
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<hubsend::DeliveryFuture>();
    let settle = tokio::spawn(async move {
        let mut failed = 0;
        while let Some(f) = rx.recv().await {
            if let Err(e) = f.await {
                eprintln!("delivery failed: {e}");
                failed += 1;
            }
        }
        failed
    });
    for i in 0..EVENTS {
        let k = i % KEYS;
        let body = format!(
            r#"{{"sensor_id":"sensor-{k}","timestamp":"2025-08-19T08:30:00Z","value":{i},"n":{i}}}"#
        );
        let event = Event::new(body).with_property("n", i as i64);
        if let Err(TryAddError::Full(event)) = batches[k].try_add(event) {
            let full = std::mem::replace(
                &mut batches[k],
                producer
                    .create_batch(BatchOptions::new().partition_key(format!("sensor-{k}")))
                    .await
                    .unwrap(),
            );
            tx.send(producer.send_batch(full).await.unwrap()).unwrap();
            batches[k].try_add(event).unwrap();
        }
    }
    for batch in batches {
        tx.send(producer.send_batch(batch).await.unwrap()).unwrap();
    }
    drop(tx);
    settle.await.unwrap()
}

/// Every event arrived; returns the duplicate count. With `ordered`, each key's first
/// occurrences are in send order.
fn verify(hub: &TestHub, name: &str, ordered: bool) -> usize {
    let stored = hub.events(HUB);
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &stored {
        let n = e.application_properties["n"].as_i64().unwrap();
        let count = seen.entry(n).or_default();
        *count += 1;
        if *count == 1 {
            per_key
                .entry(e.partition_key.clone().unwrap_or_default())
                .or_default()
                .push(n);
        }
    }
    let missing: Vec<i64> = (0..EVENTS as i64)
        .filter(|n| !seen.contains_key(n))
        .collect();
    let duplicates = stored.len() - seen.len();
    println!(
        "{name}: stored {} events, {} unique, {duplicates} duplicates, {} missing",
        stored.len(),
        seen.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{name}: lost {} events, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(per_key.len(), KEYS);
    if ordered {
        for (key, ns) in per_key {
            assert!(
                ns.windows(2).all(|w| w[0] < w[1]),
                "{name}: order broken for {key}"
            );
        }
    }
    duplicates
}

/// [`verify`]; with idempotent retries also in order and without a single duplicate.
fn check(hub: &TestHub, name: &str, ordered: bool, idempotent: bool) -> usize {
    let duplicates = verify(hub, name, ordered || idempotent);
    if idempotent {
        assert_eq!(
            duplicates, 0,
            "{name}: idempotent retries stored duplicates"
        );
    }
    duplicates
}

#[tokio::test]
async fn link_detached_with_detach_forced() {
    for (api, idempotent) in MODES {
        let hub = start_hub().await;
        let producer = producer(&hub, Duration::from_secs(3600), idempotent).await;
        hub.faults().detach_links_after(
            deliveries(40),
            "amqp:link:detach-forced",
            "Idle timeout (injected)",
        );
        assert_eq!(stream(&producer, api).await, 0);
        check(
            &hub,
            &format!("detach-forced ({api:?}, idempotent: {idempotent})"),
            true,
            idempotent,
        );
        assert!(producer.stats().link_recoveries >= 1);
    }
}

#[tokio::test]
async fn link_detached_with_server_busy() {
    for (api, idempotent) in MODES {
        let hub = start_hub().await;
        let producer = producer(&hub, Duration::from_secs(3600), idempotent).await;
        hub.faults().detach_links_after(
            deliveries(60),
            "com.microsoft:server-busy",
            "throttled (injected)",
        );
        assert_eq!(stream(&producer, api).await, 0);
        check(
            &hub,
            &format!("detach server-busy ({api:?}, idempotent: {idempotent})"),
            false,
            idempotent,
        );
        assert!(producer.stats().link_recoveries >= 1);
    }
}

#[tokio::test]
async fn connection_closed_with_connection_forced() {
    for (api, idempotent) in MODES {
        let hub = start_hub().await;
        let producer = producer(&hub, Duration::from_secs(3600), idempotent).await;
        let mut events = producer.subscribe();
        let faults = hub.faults();
        let stream = stream(&producer, api);
        let inject = async {
            wait_until_accepted(&hub, deliveries(50)).await;
            faults.close_connections("amqp:connection:forced", "maintenance (injected)");
        };
        let (failed, ()) = tokio::join!(stream, inject);
        assert_eq!(failed, 0);
        check(
            &hub,
            &format!("connection:forced ({api:?}, idempotent: {idempotent})"),
            true,
            idempotent,
        );
        let stats = producer.stats();
        assert!(stats.reconnects >= 1, "{stats:?}");
        assert!(
            stats.retried >= 1 && stats.failed == 0 && stats.sent >= deliveries(100),
            "{stats:?}"
        );
        assert!(hub.stats().connections_accepted >= 2);
        // The application saw it happen.
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            seen.push(event);
        }
        assert!(seen.contains(&ConnectionEvent::Reconnecting), "{seen:?}");
        assert!(seen.contains(&ConnectionEvent::Reconnected), "{seen:?}");
        assert!(
            seen.iter()
                .any(|e| matches!(e, ConnectionEvent::LinkRecovered { .. })),
            "{seen:?}"
        );
    }
}

#[tokio::test]
async fn tcp_dropped_without_close() {
    for (api, idempotent) in MODES {
        let hub = start_hub().await;
        let producer = producer(&hub, Duration::from_secs(3600), idempotent).await;
        let faults = hub.faults();
        let stream = stream(&producer, api);
        let inject = async {
            wait_until_accepted(&hub, deliveries(70)).await;
            faults.drop_connections();
        };
        let (failed, ()) = tokio::join!(stream, inject);
        assert_eq!(failed, 0);
        check(
            &hub,
            &format!("tcp drop ({api:?}, idempotent: {idempotent})"),
            true,
            idempotent,
        );
        assert!(producer.stats().reconnects >= 1);
    }
}

#[tokio::test]
async fn every_nth_delivery_rejected_server_busy() {
    for (api, idempotent) in MODES {
        let hub = start_hub().await;
        let producer = producer(&hub, Duration::from_secs(3600), idempotent).await;
        if idempotent {
            // A held partition resends in cycles of a fixed length; a fault with a fixed
            // period can fall into step with them and hit the same delivery on every try,
            // which no real throttling does.
            hub.faults()
                .reject_at_random(7, "com.microsoft:server-busy");
        } else {
            hub.faults()
                .reject_every_nth(7, "com.microsoft:server-busy");
        }
        assert_eq!(stream(&producer, api).await, 0);
        let duplicates = check(
            &hub,
            &format!("reject every 7th ({api:?}, idempotent: {idempotent})"),
            false,
            idempotent,
        );
        assert_eq!(
            duplicates, 0,
            "a rejected delivery was not stored, so a retry cannot duplicate"
        );
        assert!(hub.stats().deliveries_rejected >= deliveries(20));
        // Every rejection was retried (with idempotent retries, the deliveries refused as out
        // of order behind a rejected one are resent with it and not counted as retries).
        if !idempotent {
            assert!(
                producer.stats().retried >= hub.stats().deliveries_rejected,
                "{:?}",
                producer.stats()
            );
        }
    }
}

#[tokio::test]
async fn short_lived_tokens_expire_and_are_refreshed() {
    for (api, idempotent) in MODES {
        let hub = start_hub().await;
        let producer = producer(&hub, Duration::from_secs(2), idempotent).await;
        let start = tokio::time::Instant::now();
        // Stream three times over several token lifetimes.
        for round in 0..3 {
            assert_eq!(stream(&producer, api).await, 0, "round {round}");
            // Deliberate: idle for most of a 2 s token lifetime between rounds.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        assert!(start.elapsed() > Duration::from_secs(4));
        let stored = hub.events(HUB).len();
        assert!(stored >= 3 * EVENTS, "{stored}");
        assert!(hub.stats().put_tokens_accepted >= 3, "{:?}", hub.stats());
    }
}

#[tokio::test]
async fn credit_withheld_for_a_while() {
    for (api, idempotent) in MODES {
        let hub = start_hub().await;
        let producer = producer(&hub, Duration::from_secs(3600), idempotent).await;
        let faults = hub.faults();
        let stream = stream(&producer, api);
        let inject = async {
            wait_until_accepted(&hub, deliveries(30)).await;
            faults.withhold_credit(Duration::from_millis(1500));
        };
        let (failed, ()) = tokio::join!(stream, inject);
        assert_eq!(failed, 0);
        check(
            &hub,
            &format!("credit withheld ({api:?}, idempotent: {idempotent})"),
            true,
            idempotent,
        );
    }
}

#[tokio::test]
async fn non_retriable_failures_fail_fast() {
    let hub = start_hub().await;
    let started = tokio::time::Instant::now();
    let cs = hub
        .connection_string()
        .replace("EntityPath=telemetry", "EntityPath=missing");
    let err = Producer::from_connection_string(&cs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    hub.faults().fail_put_tokens(1, 401);
    let err = Producer::from_connection_string(&hub.connection_string())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    let producer = producer(&hub, Duration::from_secs(3600), false).await;
    hub.faults()
        .reject_every_nth(1, "amqp:link:message-size-exceeded");
    let err = producer
        .send_and_wait(Event::new(b"x".to_vec()), hubsend::SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MessageTooLarge);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_silent_hub_is_retried_after_the_try_timeout_and_fails_at_the_deadline() {
    let hub = start_hub().await;
    let producer = Producer::builder()
        .connection_string(hub.connection_string())
        .options(
            ProducerOptions::new().retry(
                RetryOptions::new()
                    .base_delay(Duration::from_millis(20))
                    .try_timeout(Duration::from_millis(400))
                    .deadline(Duration::from_millis(1500)),
            ),
        )
        .connect()
        .await
        .unwrap();
    // Outcomes that take 1 s: the first try times out, the link is re-attached, the delivery
    // is sent again; once the hub answers in time again it succeeds.
    hub.faults().delay_dispositions(Duration::from_millis(1000));
    let slow = producer
        .send(Event::new(b"slow".to_vec()), hubsend::SendOptions::new())
        .await
        .unwrap();
    // Deliberate: the slow outcomes last 600 ms, past the first 400 ms try.
    tokio::time::sleep(Duration::from_millis(600)).await;
    hub.faults().clear();
    slow.await.expect("stored after a retry");
    assert!(
        producer.stats().link_recoveries >= 1,
        "{:?}",
        producer.stats()
    );

    // A hub that never answers in time: the delivery fails once the deadline has passed.
    hub.faults().delay_dispositions(Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    let err = producer
        .send_and_wait(Event::new(b"never".to_vec()), hubsend::SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(hub.events(HUB).iter().any(|e| e.body == b"slow"));
}
