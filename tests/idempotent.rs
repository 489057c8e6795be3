//! Idempotent retries against the test hub's implementation of the service's rules
//! (PROTOCOL-2 §I): routing on the client, numbering, resumes under both of the hub's
//! plausible answers, gaps under both, a stolen epoch, state handed to a restarted producer,
//! and wrap-around after `i32::MAX`. The fault matrix in idempotent mode is in
//! `resilience.rs`.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use hubsend::{
    BatchOptions, Condition, Event, PartitionPublishingState, Producer, ProducerOptions,
    SendOptions,
};
use hubsend_testhub::{GapAnswer, HubConfig, ResumeAnswer, TestHub};
use support::{fast_retry, start, HUB};

fn options() -> ProducerOptions {
    ProducerOptions::new()
        .idempotent(true)
        .max_in_flight(16)
        .retry(fast_retry())
}

async fn producer(hub: &TestHub, options: ProducerOptions) -> Producer {
    support::producer_with(hub, options).await
}

fn event(n: i64) -> Event {
    Event::new(format!(r#"{{"sensor_id":"s-{n}","value":{n}}}"#)).with_property("n", n)
}

/// How often each `n` was stored.
fn counts(hub: &TestHub) -> HashMap<i64, usize> {
    support::stored_counts(hub)
}

/// Every `0..total` stored exactly once.
fn assert_exactly_once(hub: &TestHub, total: i64, what: &str) {
    let counts = counts(hub);
    let missing: Vec<i64> = (0..total).filter(|n| !counts.contains_key(n)).collect();
    let twice: Vec<i64> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        twice.is_empty(),
        "{what}: {} stored twice, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    assert_eq!(counts.len() as i64, total, "{what}: unexpected events");
}

#[tokio::test]
async fn events_are_routed_on_the_client_and_keep_their_keys() {
    let hub = start(HubConfig::new()).await;
    let producer = producer(&hub, options()).await;
    assert!(producer.is_idempotent());
    let mut pending = Vec::new();
    for n in 0..40 {
        let options = match n % 4 {
            0 => SendOptions::new(),
            1 => SendOptions::new().partition_key(format!("compressor-{}", n % 7)),
            2 => SendOptions::new().partition_id("2"),
            _ => SendOptions::new().partition_key("pump"),
        };
        pending.push(producer.send(event(n), options).await.unwrap());
    }
    let mut batch = producer
        .create_batch(BatchOptions::new().partition_key("line-3"))
        .await
        .unwrap();
    for n in 40..60 {
        batch.try_add(event(n)).unwrap();
    }
    assert_eq!(batch.partition_key(), Some("line-3"));
    pending.push(producer.send_batch(batch).await.unwrap());
    for p in pending {
        p.await.unwrap();
    }
    assert_exactly_once(&hub, 60, "routing");
    for e in hub.events(HUB) {
        let n = e.application_properties["n"].as_i64().unwrap();
        if let Some(key) = &e.partition_key {
            assert_eq!(e.partition, hub.partition_for_key(HUB, key), "{n}: {key}");
        }
        match n {
            40.. => assert_eq!(e.partition_key.as_deref(), Some("line-3")),
            _ if n % 4 == 1 || n % 4 == 3 => assert!(e.partition_key.is_some(), "{n}"),
            _ if n % 4 == 2 => assert_eq!(e.partition, 2),
            _ => assert!(e.partition_key.is_none()),
        }
        assert!(e.link_target.contains("/Partitions/"), "{}", e.link_target);
    }
    // The state is the hub's: one producer id per partition, numbering from 0.
    let state = producer.publishing_state();
    assert_eq!(state.len(), 4, "{state:?}");
    let stored: i32 = state
        .iter()
        .map(|s| s.last_published_sequence_number + 1)
        .sum();
    assert_eq!(
        stored, 60,
        "{state:?}: 40 single sends and one 20-event batch"
    );
    producer.close().await.unwrap();
}

/// Streams `total` events as single sends over 4 keys, waiting for them all; returns how
/// many failed.
async fn stream(producer: &Producer, from: i64, total: i64) -> usize {
    let mut pending = Vec::new();
    for n in from..from + total {
        let key = format!("sensor-{}", n % 4);
        pending.push(
            producer
                .send(event(n), SendOptions::new().partition_key(key))
                .await
                .unwrap(),
        );
    }
    let mut failed = 0;
    for p in pending {
        if let Err(e) = p.await {
            eprintln!("failed: {e}");
            failed += 1;
        }
    }
    failed
}

#[tokio::test]
async fn a_lost_connection_stores_nothing_twice_whatever_the_hub_answers_on_resume() {
    for answer in [ResumeAnswer::Stored, ResumeAnswer::Echo] {
        // Outcomes held back so that many deliveries are in flight (some stored, their
        // acceptance not yet sent) when the connection goes.
        let hub = start(HubConfig::new().idempotent_resume(answer)).await;
        let producer = producer(&hub, options()).await;
        let faults = hub.faults();
        // Outcomes come 300 ms late: the first deliveries are stored before any is
        // acknowledged, and then the connection drops.
        faults.delay_dispositions(Duration::from_millis(300));
        let sending = stream(&producer, 0, 3_000);
        let inject = async {
            hub.wait_for_stats(|s| s.transfers_received >= 8, support::WAIT)
                .await;
            faults.drop_connections();
            faults.delay_dispositions(Duration::from_millis(5));
            support::wait_until_accepted(&hub, 60).await;
            faults.close_connections("amqp:connection:forced", "maintenance (injected)");
        };
        let (failed, ()) = tokio::join!(sending, inject);
        assert_eq!(failed, 0, "{answer:?}");
        assert_exactly_once(&hub, 3_000, &format!("resume {answer:?}"));
        let stats = producer.stats();
        assert!(stats.reconnects >= 1, "{stats:?}");
        assert!(
            hub.stats().idempotent_duplicates > 0,
            "{answer:?}: the resends reached the hub"
        );
        // What the producer knows it avoided is a lower bound of what the hub dropped; only
        // a hub that reports what it stored tells it anything.
        assert!(stats.duplicates_avoided <= hub.stats().idempotent_duplicates);
        match answer {
            ResumeAnswer::Stored => assert!(stats.duplicates_avoided > 0, "{stats:?}"),
            _ => assert_eq!(stats.duplicates_avoided, 0, "{stats:?}"),
        }
        producer.close().await.unwrap();
    }
}

#[tokio::test]
async fn refusals_are_resent_in_order_whatever_the_hub_does_with_gaps() {
    for gaps in [GapAnswer::Store, GapAnswer::Refuse] {
        let hub = start(HubConfig::new().idempotent_gaps(gaps)).await;
        let producer = producer(&hub, options()).await;
        hub.faults()
            .reject_at_random(9, "com.microsoft:server-busy");
        let started = std::time::Instant::now();
        let failed = stream(&producer, 0, 3_000).await;
        println!(
            "{gaps:?}: {:?}, {:?}, {:?}",
            started.elapsed(),
            producer.stats(),
            hub.stats()
        );
        assert_eq!(failed, 0, "{gaps:?}");
        assert_exactly_once(&hub, 3_000, &format!("gaps {gaps:?}"));
        assert!(hub.stats().deliveries_rejected > 0);
        if gaps == GapAnswer::Refuse {
            // Order per key holds when the hub refuses gaps.
            let mut last: HashMap<String, i64> = HashMap::new();
            for e in hub.events(HUB) {
                let n = e.application_properties["n"].as_i64().unwrap();
                let key = e.partition_key.clone().unwrap();
                if let Some(prev) = last.insert(key.clone(), n) {
                    assert!(prev < n, "{key}: {prev} before {n}");
                }
            }
        }
        producer.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_restarted_producer_continues_with_the_saved_state() {
    let hub = start(HubConfig::new()).await;
    let first = producer(&hub, options()).await;
    assert_eq!(stream(&first, 0, 500).await, 0);
    let saved = first.publishing_state();
    first.close().await.unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let restored: Vec<PartitionPublishingState> = serde_json::from_str(&json).unwrap();
    let second = producer(&hub, options().publishing_state(restored.clone())).await;
    assert_eq!(stream(&second, 500, 500).await, 0);
    assert_exactly_once(&hub, 1_000, "restart");
    for (before, after) in restored.iter().zip(second.publishing_state()) {
        assert_eq!(before.producer_group_id, after.producer_group_id);
        assert!(after.last_published_sequence_number > before.last_published_sequence_number);
    }
    second.close().await.unwrap();

    // State the hub never handed out is refused, and the send fails with it.
    let invented = vec![PartitionPublishingState::new("0", 100, 100, 100)];
    let third = producer(&hub, options().publishing_state(invented)).await;
    let err = third
        .send_and_wait(event(9_999), SendOptions::new().partition_id("0"))
        .await
        .unwrap_err();
    assert_eq!(err.condition(), Some(&Condition::NotAllowed), "{err}");
}

#[tokio::test]
async fn a_higher_epoch_takes_over_and_the_old_producer_is_told() {
    let hub = start(HubConfig::new()).await;
    let old = producer(&hub, options()).await;
    old.send_and_wait(event(0), SendOptions::new().partition_id("1"))
        .await
        .unwrap();
    let state = old
        .publishing_state()
        .into_iter()
        .find(|s| s.partition_id == "1")
        .unwrap();
    let taken =
        PartitionPublishingState::new("1", state.producer_group_id, state.owner_level + 1, -1);
    let new = producer(&hub, options().publishing_state(vec![taken])).await;
    new.send_and_wait(event(1), SendOptions::new().partition_id("1"))
        .await
        .unwrap();
    let err = old
        .send_and_wait(event(2), SendOptions::new().partition_id("1"))
        .await
        .unwrap_err();
    assert_eq!(
        err.condition(),
        Some(&Condition::ProducerEpochStolen),
        "{err}"
    );
    assert!(!counts(&hub).contains_key(&2));
}

#[tokio::test]
async fn numbers_wrap_after_i32_max() {
    let hub = start(HubConfig::new()).await;
    hub.seed_idempotent_producer(HUB, 3, 77, 0, i32::MAX - 10);
    let state = vec![PartitionPublishingState::new("3", 77, 0, i32::MAX - 10)];
    let producer = producer(&hub, options().publishing_state(state)).await;
    let mut pending = Vec::new();
    for n in 0..30 {
        pending.push(
            producer
                .send(event(n), SendOptions::new().partition_id("3"))
                .await
                .unwrap(),
        );
    }
    for p in pending {
        p.await.unwrap();
    }
    assert_exactly_once(&hub, 30, "wrap");
    let state = producer.publishing_state();
    let p3 = state.iter().find(|s| s.partition_id == "3").unwrap();
    assert_eq!(p3.last_published_sequence_number, 19, "{p3:?}");
}

/// A batch of `range` for partition "0".
async fn batch_of(producer: &Producer, range: std::ops::Range<i64>) -> hubsend::EventBatch {
    let mut batch = producer
        .create_batch(BatchOptions::new().partition_id("0"))
        .await
        .unwrap();
    for n in range {
        batch.try_add(event(n)).unwrap();
    }
    batch
}

/// Sends `at..at + 10` for partition "0" numbered from `at`, and waits for its outcome.
async fn send_ten_numbered(producer: &Producer, at: i64) -> hubsend::Result<()> {
    let batch = batch_of(producer, at..at + 10).await;
    producer.send_batch_numbered(batch, at as i32).await?.await
}

/// Partition "0"'s publishing state as a producer that "crashed" after its first batch of
/// ten would have saved it: the later batches stored but not known as stored.
fn saved_after_first_ten(producer: &Producer) -> Vec<PartitionPublishingState> {
    producer
        .publishing_state()
        .into_iter()
        .filter(|s| s.partition_id == "0")
        .map(|s| PartitionPublishingState::new("0", s.producer_group_id, s.owner_level, 9))
        .collect()
}

/// Resends that settle one by one after a resume (a spool draining at the link's pace): each
/// one the hub reported storing is counted as avoided, and the confirmed number never moves
/// back below what the hub reported, so a resend sent after another settled is still known
/// as stored.
#[tokio::test]
async fn resends_settled_one_by_one_are_all_known_as_stored() {
    let hub = start(HubConfig::new().idempotent_resume(ResumeAnswer::Stored)).await;
    let first = producer(&hub, options()).await;
    for at in [0, 10, 20] {
        send_ten_numbered(&first, at).await.unwrap();
    }
    let saved = saved_after_first_ten(&first);
    // "Crashed" before it learned that the last two batches were stored.
    drop(first);

    let second = producer(&hub, options().publishing_state(saved)).await;
    let last_confirmed = |p: &Producer| {
        p.publishing_state()
            .into_iter()
            .find(|s| s.partition_id == "0")
            .map(|s| s.last_published_sequence_number)
    };
    for at in [10, 20] {
        send_ten_numbered(&second, at).await.unwrap();
        assert_eq!(last_confirmed(&second), Some(29), "after resending {at}..");
    }
    send_ten_numbered(&second, 30).await.unwrap();
    assert_exactly_once(&hub, 40, "one by one");
    assert_eq!(hub.stats().idempotent_duplicates, 20);
    assert_eq!(second.stats().duplicates_avoided, 20);
    assert_eq!(last_confirmed(&second), Some(39));
}

/// Caller-numbered batches (a spool resending after a crash): a new producer with the old
/// one's state sends the same events with the same numbers and the hub drops them; numbers
/// that do not follow what the hub stored fail with out-of-order-sequence, and are never
/// renumbered behind the caller's back; a plain producer refuses numbered batches.
#[tokio::test]
async fn numbered_batches_are_resent_with_their_numbers_and_never_renumbered() {
    for resume in [ResumeAnswer::Stored, ResumeAnswer::Echo] {
        let hub = start(HubConfig::new().idempotent_resume(resume)).await;
        let first = producer(&hub, options()).await;
        let batch = batch_of(&first, 0..10).await;
        assert_eq!(batch.partition(), Some("0"));
        first
            .send_batch_numbered(batch, 0)
            .await
            .unwrap()
            .await
            .unwrap();
        send_ten_numbered(&first, 10).await.unwrap();
        let saved = saved_after_first_ten(&first);
        // "Crashed" before it learned that the second batch was stored.
        drop(first);

        let second = producer(&hub, options().publishing_state(saved)).await;
        send_ten_numbered(&second, 10).await.unwrap();
        send_ten_numbered(&second, 20).await.unwrap();
        assert_exactly_once(&hub, 30, &format!("{resume:?}"));
        assert_eq!(hub.stats().idempotent_duplicates, 10, "{resume:?}");
        let expected = if resume == ResumeAnswer::Stored {
            10
        } else {
            0
        };
        assert_eq!(second.stats().duplicates_avoided, expected, "{resume:?}");

        // A hole: refused, not renumbered into place.
        let gap = batch_of(&second, 30..35).await;
        let err = second
            .send_batch_numbered(gap, 40)
            .await
            .unwrap()
            .await
            .unwrap_err();
        assert_eq!(
            err.condition(),
            Some(&Condition::OutOfOrderSequence),
            "{err}"
        );
        assert_eq!(
            counts(&hub).len(),
            30,
            "{resume:?}: nothing stored past the hole"
        );
        second.close().await.unwrap();
    }

    let hub = start(HubConfig::new()).await;
    let plain = support::producer_with(&hub, ProducerOptions::new()).await;
    let batch = plain
        .create_batch(BatchOptions::new().partition_id("0"))
        .await
        .unwrap();
    let err = plain.send_batch_numbered(batch, 0).await.unwrap_err();
    assert_eq!(err.kind(), hubsend::ErrorKind::InvalidArgument, "{err}");
}
