//! The producer against the local test hub over real sockets: what the hub stored is checked,
//! not what the client believes it sent.

use std::time::Duration;

use hubsend::{
    BatchOptions, ConnectionEvent, ErrorKind, Event, Producer, ProducerOptions, SendOptions,
    Telemetry, TryAddError,
};
use hubsend_testhub::{HubConfig, Right};
use support::{hub, producer, producer_with, start, HUB, WAIT};

mod support;

#[tokio::test]
async fn single_events_arrive_with_their_metadata() {
    let hub = hub().await;
    let producer = producer(&hub).await;
    assert_eq!(producer.event_hub(), HUB);
    assert_eq!(producer.max_message_size(), 1_048_576);

    let event = Event::new(b"hello".to_vec())
        .with_content_type("text/plain")
        .with_message_id("m-1")
        .with_correlation_id("c-1")
        .with_property("site", "plant-3")
        .with_property("line", 7i64)
        .with_property("ok", true);
    producer
        .send(event, SendOptions::new())
        .await
        .unwrap()
        .await
        .expect("hub accepts");
    producer
        .send_and_wait(Event::new(b"second".to_vec()), SendOptions::new())
        .await
        .unwrap();

    let stored = hub.wait_for_events(HUB, 2, WAIT).await;
    assert_eq!(stored.len(), 2);
    let first = stored
        .iter()
        .find(|e| e.body == b"hello")
        .expect("first stored");
    assert_eq!(first.content_type.as_deref(), Some("text/plain"));
    assert_eq!(first.message_id.as_deref(), Some("m-1"));
    assert_eq!(first.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(first.application_properties["site"], "plant-3");
    assert_eq!(first.application_properties["line"], 7);
    assert_eq!(first.application_properties["ok"], true);
    assert!(stored.iter().any(|e| e.body == b"second"));
    producer.close().await.unwrap();
}

#[tokio::test]
async fn batches_fill_to_the_limit_and_all_events_arrive() {
    let hub = start(HubConfig::new().max_message_size(16 * 1024)).await;
    let producer = producer(&hub).await;
    assert_eq!(producer.max_message_size(), 16 * 1024);

    let total = 2_000usize;
    let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
    let mut futures = Vec::new();
    let mut batches = 0;
    for i in 0..total {
        let reading = Telemetry::new(
            format!("compressor-{}:vibe_x", i % 13),
            chrono::Utc::now(),
            if i % 5 == 0 {
                "Running".into()
            } else {
                hubsend::TelemetryValue::Number(i as f64)
            },
        );
        let event = reading.to_event().unwrap().with_property("i", i as i64);
        if let Err(TryAddError::Full(event)) = batch.try_add(event) {
            // Full means full: the batch is within a data-section's reach of the limit.
            assert!(
                batch.size_in_bytes() > 16 * 1024 - 300,
                "{}",
                batch.size_in_bytes()
            );
            let full = std::mem::replace(
                &mut batch,
                producer.create_batch(BatchOptions::new()).await.unwrap(),
            );
            futures.push(producer.send_batch(full).await.unwrap());
            batches += 1;
            batch.try_add(event).unwrap();
        }
    }
    futures.push(producer.send_batch(batch).await.unwrap());
    for f in futures {
        f.await
            .expect("hub accepts every batch that try_add filled");
    }
    assert!(batches > 10);
    let stored = hub.wait_for_events(HUB, total, WAIT).await;
    assert_eq!(stored.len(), total);
    let mut seen: Vec<i64> = stored
        .iter()
        .map(|e| e.application_properties["i"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..total as i64).collect::<Vec<_>>());
    assert!(stored.iter().all(|e| e.batched));
    let body: serde_json::Value = serde_json::from_slice(&stored[0].body).unwrap();
    assert!(body["sensor_id"]
        .as_str()
        .unwrap()
        .starts_with("compressor-"));
    assert_eq!(hub.stats().deliveries_rejected, 0);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn partition_keys_route_like_the_service_and_keep_order() {
    let hub = hub().await;
    let producer = producer(&hub).await;
    let keys = ["compressor-7", "pump-1", "7", "FWfAT", "fan-22"];
    let mut futures = Vec::new();
    for round in 0..20 {
        for key in keys {
            let event = Event::new(format!("{key}#{round}").into_bytes());
            futures.push(
                producer
                    .send(event, SendOptions::new().partition_key(key))
                    .await
                    .unwrap(),
            );
        }
    }
    // One batch per key too.
    let mut batch = producer
        .create_batch(BatchOptions::new().partition_key("pump-1"))
        .await
        .unwrap();
    batch.try_add(Event::new(b"pump-1#batch".to_vec())).unwrap();
    futures.push(producer.send_batch(batch).await.unwrap());
    for f in futures {
        f.await.unwrap();
    }
    let stored = hub.wait_for_events(HUB, 101, WAIT).await;
    assert_eq!(stored.len(), 101);
    for key in keys {
        let expected = hub.partition_for_key(HUB, key);
        let mine: Vec<_> = stored
            .iter()
            .filter(|e| e.partition_key.as_deref() == Some(key))
            .collect();
        assert!(mine.len() >= 20, "{key}");
        assert!(mine.iter().all(|e| e.partition == expected), "{key}");
        let rounds: Vec<String> = mine
            .iter()
            .map(|e| String::from_utf8(e.body.clone()).unwrap())
            .filter(|b| !b.ends_with("batch"))
            .collect();
        let want: Vec<String> = (0..20).map(|r| format!("{key}#{r}")).collect();
        assert_eq!(rounds, want, "order within key {key}");
    }
}

#[tokio::test]
async fn partition_ids_target_one_partition_and_unknown_ones_fail() {
    let hub = hub().await;
    let producer = producer(&hub).await;
    producer
        .send_and_wait(
            Event::new(b"p2".to_vec()),
            SendOptions::new().partition_id("2"),
        )
        .await
        .unwrap();
    let mut batch = producer
        .create_batch(BatchOptions::new().partition_id("3"))
        .await
        .unwrap();
    batch.try_add(Event::new(b"p3".to_vec())).unwrap();
    producer.send_batch(batch).await.unwrap().await.unwrap();
    hub.wait_for_events(HUB, 2, WAIT).await;
    assert_eq!(hub.partition_events(HUB, 2)[0].body, b"p2");
    assert_eq!(hub.partition_events(HUB, 3)[0].body, b"p3");

    let err = producer
        .send(
            Event::new(b"x".to_vec()),
            SendOptions::new().partition_id("42"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
    assert!(err.to_string().contains("42"), "{err}");
    assert!(!err.is_retriable());
    let err = producer
        .create_batch(BatchOptions::new().partition_id("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
    let err = producer
        .send(
            Event::new(b"x".to_vec()),
            SendOptions::new().partition_id("1").partition_key("k"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    // The connection is still good.
    producer
        .send_and_wait(Event::new(b"after".to_vec()), SendOptions::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn oversize_events_fail_before_anything_is_sent() {
    let hub = start(HubConfig::new().max_message_size(4096)).await;
    let producer = producer(&hub).await;
    let before = hub.stats().transfers_received;
    let err = producer
        .send(Event::new(vec![0u8; 5000]), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MessageTooLarge);
    assert!(err.to_string().contains("4096"), "{err}");
    let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
    assert!(matches!(
        batch.try_add(Event::new(vec![0u8; 4096])),
        Err(TryAddError::TooLarge(_))
    ));
    let err = producer
        .create_batch(BatchOptions::new().max_size_in_bytes(8192))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidBatchSize);
    assert_eq!(hub.stats().transfers_received, before);
    // An event right at the limit is fine.
    let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
    let mut body = 4096;
    loop {
        match batch.try_add(Event::new(vec![1u8; body])) {
            Ok(()) => break,
            Err(e) => {
                drop(e);
                body -= 1;
            }
        }
    }
    // 8 bytes of section header inside and 8 outside: exactly at the limit.
    assert_eq!(body, 4096 - 16);
    assert_eq!(batch.size_in_bytes(), 4096);
    producer.send_batch(batch).await.unwrap().await.unwrap();
    assert_eq!(hub.wait_for_events(HUB, 1, WAIT).await[0].body.len(), body);
}

#[tokio::test]
async fn wrong_key_is_unauthorized_and_names_the_audience() {
    let hub = hub().await;
    let good = hub.connection_string();
    let bad = good
        .split(';')
        .map(|part| {
            if part.starts_with("SharedAccessKey=") {
                "SharedAccessKey=d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk0NTY3OA==".to_owned()
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(";");
    let err = Producer::from_connection_string(&bad).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(err.is_auth());
    assert!(err.to_string().contains(HUB), "{err}");
    assert!(!err.to_string().contains("d3Jvbmcta2V5"), "{err}");
    assert!(!format!("{err:?}").contains("d3Jvbmcta2V5"));
    assert!(hub.stats().put_tokens_rejected >= 1);
}

#[tokio::test]
async fn unknown_hub_is_not_found() {
    let hub = hub().await;
    let cs = hub
        .connection_string()
        .replace("EntityPath=telemetry", "EntityPath=nope");
    let err = Producer::from_connection_string(&cs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn tls_with_a_generated_ca() {
    let hub = start(HubConfig::new().tls(true)).await;
    let ca = hub.ca_pem().expect("tls hub has a CA");
    let cs = hub.connection_string();
    assert!(!cs.contains("UseDevelopmentEmulator"));
    // Without trusting the CA the handshake fails: verification is on by default.
    let err = Producer::from_connection_string(&cs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let producer = Producer::builder()
        .connection_string(cs)
        .add_root_certificate_pem(ca)
        .connect()
        .await
        .unwrap();
    producer
        .send_and_wait(Event::new(b"over tls".to_vec()), SendOptions::new())
        .await
        .unwrap();
    assert_eq!(hub.wait_for_events(HUB, 1, WAIT).await[0].body, b"over tls");
    producer.close().await.unwrap();
}

#[tokio::test]
async fn tokens_are_refreshed_on_the_same_connection() {
    let hub = hub().await;
    let producer = producer_with(
        &hub,
        ProducerOptions::new().token_lifetime(Duration::from_secs(3)),
    )
    .await;
    // Stream until the producer reports three refreshes (each after half of a 3 s lifetime),
    // not for a fixed time; the 50 ms pause only paces the stream.
    let mut events = producer.subscribe();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut sent, mut refreshed) = (0, 0);
    while refreshed < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{refreshed} refreshes"
        );
        producer
            .send_and_wait(
                Event::new(format!("{sent}").into_bytes()),
                SendOptions::new(),
            )
            .await
            .expect("sends keep working across token refreshes");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(event) = events.try_recv() {
            refreshed += usize::from(event == ConnectionEvent::TokenRefreshed);
        }
    }
    let stats = hub.stats();
    assert_eq!(stats.connections_accepted, 1, "one persistent connection");
    assert!(stats.put_tokens_accepted >= 4, "{stats:?}");
    assert_eq!(hub.wait_for_events(HUB, sent, WAIT).await.len(), sent);
}

#[tokio::test]
async fn hub_and_partition_properties() {
    let hub = start(HubConfig::new().hub("telemetry", 3)).await;
    let producer = producer(&hub).await;
    let props = producer.hub_properties().await.unwrap();
    assert_eq!(props.name, HUB);
    assert_eq!(props.partition_ids, vec!["0", "1", "2"]);
    let empty = producer.partition_properties("1").await.unwrap();
    assert!(empty.is_empty);
    assert_eq!(empty.last_enqueued_sequence_number, -1);
    for i in 0..3 {
        producer
            .send_and_wait(Event::new(vec![i]), SendOptions::new().partition_id("1"))
            .await
            .unwrap();
    }
    let p = producer.partition_properties("1").await.unwrap();
    assert_eq!(p.id, "1");
    assert!(!p.is_empty);
    assert_eq!(p.last_enqueued_sequence_number, 2);
    assert!(p.last_enqueued_time.is_some());
    let err = producer.partition_properties("9").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn rejections_surface_with_the_hubs_condition() {
    let hub = hub().await;
    // With retries off, the hub's throttling reaches the caller as it was sent.
    let producer = producer_with(
        &hub,
        ProducerOptions::new().retry(hubsend::RetryOptions::new().max_retries(0)),
    )
    .await;
    hub.faults()
        .reject_every_nth(2, "com.microsoft:server-busy");
    let mut outcomes = Vec::new();
    for i in 0..10u8 {
        let fut = producer
            .send(Event::new(vec![i]), SendOptions::new())
            .await
            .unwrap();
        outcomes.push(fut.await);
    }
    let failed: Vec<_> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 5);
    for e in failed {
        assert_eq!(e.kind(), ErrorKind::ServerBusy);
        assert_eq!(e.condition(), Some(&hubsend::Condition::ServerBusy));
        assert!(e.is_retriable());
    }
    assert_eq!(hub.events(HUB).len(), 5);

    // With the default policy the same throttling is retried away.
    let retrying = Producer::from_connection_string(&hub.connection_string())
        .await
        .unwrap();
    for i in 10..20u8 {
        retrying
            .send_and_wait(Event::new(vec![i]), SendOptions::new())
            .await
            .expect("server-busy is retried");
    }
    assert_eq!(hub.events(HUB).len(), 15);
}

#[tokio::test]
async fn in_flight_bound_gives_backpressure_or_busy() {
    let hub = hub().await;
    let producer = producer_with(&hub, ProducerOptions::new().max_pending_sends(2)).await;
    hub.faults().delay_dispositions(Duration::from_millis(300));
    let a = producer
        .send(Event::new(b"a".to_vec()), SendOptions::new())
        .await
        .unwrap();
    let b = producer
        .send(Event::new(b"b".to_vec()), SendOptions::new())
        .await
        .unwrap();
    let err = producer
        .try_send(Event::new(b"c".to_vec()), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    // A waiting send proceeds once capacity frees up.
    let started = tokio::time::Instant::now();
    let c = producer
        .send(Event::new(b"c".to_vec()), SendOptions::new())
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    // Dropping a future does not leak capacity.
    drop(a);
    b.await.unwrap();
    c.await.unwrap();
    hub.faults().clear();
    for i in 0..5u8 {
        producer
            .send_and_wait(Event::new(vec![i]), SendOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(hub.wait_for_events(HUB, 8, WAIT).await.len(), 8);
}

#[tokio::test]
async fn the_batch_bound_gives_backpressure() {
    let hub = hub().await;
    let producer = producer_with(&hub, ProducerOptions::new().max_in_flight(1)).await;
    hub.faults().delay_dispositions(Duration::from_millis(300));
    let batch = |body: &'static str| {
        let producer = producer.clone();
        async move {
            let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
            batch.try_add(Event::new(body)).unwrap();
            batch
        }
    };
    let a = producer.send_batch(batch("a").await).await.unwrap();
    let started = tokio::time::Instant::now();
    let b = producer.send_batch(batch("b").await).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(hub.wait_for_events(HUB, 2, WAIT).await.len(), 2);
}

#[tokio::test]
async fn single_sends_far_from_the_hub_are_not_held_to_the_batch_bound() {
    // Every outcome takes two seconds (a far hub). With one batch allowed in flight, single sends
    // still queue without waiting for one another: the delivery bound counts batches, not
    // the single sends that share deliveries.
    let hub = hub().await;
    let producer = producer_with(&hub, ProducerOptions::new().max_in_flight(1)).await;
    hub.faults().delay_dispositions(Duration::from_secs(2));
    let started = tokio::time::Instant::now();
    let mut futures = Vec::new();
    for i in 0..1000u32 {
        let event = Event::new(format!("far-{i}"));
        futures.push(producer.send(event, SendOptions::new()).await.unwrap());
    }
    let queued = started.elapsed();
    assert!(
        queued < Duration::from_millis(1500),
        "1000 sends took {queued:?} to queue: they waited for outcomes"
    );
    for fut in futures {
        fut.await.expect("stored");
    }
    let stored = hub.wait_for_events(HUB, 1000, WAIT).await;
    assert_eq!(stored.len(), 1000);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn a_second_policy_connects_and_reads_management() {
    let hub = start(
        HubConfig::new()
            .policy(
                "send-only",
                "c2VuZC1vbmx5LWtleS0xMjM0NTY3ODkwMTIzNDU2Nzg5MA==",
                &[Right::Send],
            )
            .policy(
                "manage",
                "bWFuYWdlLWtleS0xMjM0NTY3ODkwMTIzNDU2Nzg5MDEyMw==",
                &[Right::Manage, Right::Send, Right::Listen],
            ),
    )
    .await;
    let manage = Producer::from_connection_string(&hub.connection_string_for("manage", HUB))
        .await
        .unwrap();
    assert_eq!(
        manage.hub_properties().await.unwrap().partition_ids.len(),
        4
    );
}

#[tokio::test]
async fn close_waits_for_outcomes_or_reports_at_its_deadline() {
    let hub = hub().await;
    let producer = producer(&hub).await;
    hub.faults().delay_dispositions(Duration::from_millis(300));
    let pending = producer
        .send(Event::new(b"a".to_vec()), SendOptions::new())
        .await
        .unwrap();
    // close() waits: the delivery settles before the connection closes.
    producer.clone().close().await.unwrap();
    pending.await.unwrap();

    let producer = self::producer(&hub).await;
    hub.faults().delay_dispositions(Duration::from_secs(3));
    let _pending = producer
        .send(Event::new(b"b".to_vec()), SendOptions::new())
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = producer
        .close_within(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.to_string().contains("1 deliveries"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn pipelined_single_sends_share_deliveries_but_never_mix_keys() {
    // One credit at a time: every delivery costs a round trip, so sends queue up behind it
    // and the link must pack them into shared deliveries.
    let hub = start(HubConfig::new().link_credit(1)).await;
    let producer = producer(&hub).await;
    let keys = [Some("pump-1"), Some("pump-2"), None];
    let total = 3000usize;
    let mut futures = Vec::with_capacity(total);
    for i in 0..total {
        // Runs of 25 events per key, so neighbours in the queue often share a key.
        let key = keys[(i / 25) % keys.len()];
        let options = match key {
            Some(k) => SendOptions::new().partition_key(k),
            None => SendOptions::new(),
        };
        let body = format!("{}:{i}", key.unwrap_or("-"));
        futures.push(producer.send(Event::new(body), options).await.unwrap());
    }
    for fut in futures {
        fut.await.expect("every send is accepted");
    }
    let stored = hub.wait_for_events(HUB, total, WAIT).await;
    assert_eq!(stored.len(), total, "each event stored exactly once");
    let transfers = hub.stats().transfers_received;
    assert!(
        transfers < total as u64 / 2,
        "{transfers} deliveries for {total} sends: queued sends were not packed together"
    );
    for key in keys {
        let tag = key.unwrap_or("-");
        let seq: Vec<usize> = stored
            .iter()
            .filter_map(|e| {
                let body = std::str::from_utf8(&e.body).unwrap();
                let (k, i) = body.split_once(':').unwrap();
                (k == tag).then(|| {
                    assert_eq!(e.partition_key.as_deref(), key, "event {body} kept its key");
                    i.parse().unwrap()
                })
            })
            .collect();
        assert_eq!(seq.len(), total / keys.len());
        if key.is_some() {
            // A keyed stream lands on one partition in the order it was sent.
            assert!(seq.windows(2).all(|w| w[0] < w[1]), "order kept for {tag}");
        }
    }
    producer.close().await.unwrap();
}

/// Sends `mib` MiB of 1 KiB events in full batches, pipelined, and waits for every outcome.
async fn send_mib(producer: &Producer, mib: usize) -> usize {
    let body = vec![b'x'; 1024];
    let (mut sent, mut futures) = (0, Vec::new());
    while sent < mib << 10 {
        let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
        while sent < mib << 10 && batch.try_add(Event::new(body.clone())).is_ok() {
            sent += 1;
        }
        futures.push(producer.send_batch(batch).await.unwrap());
    }
    for fut in futures {
        fut.await.expect("stored");
    }
    sent
}

/// 200 ms away from the hub (behind a delay proxy) the in-flight window grows from its 2 MiB
/// start toward the 16 MiB default ceiling, as bandwidth × round trip asks, and never past
/// the bound a producer sets. (Near the hub it stays within a few MiB of its start in a
/// release build: the bench reports it per run as `window_mib`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_window_grows_far_from_the_hub_within_its_bound() {
    let hub = hub().await;
    let proxy =
        hubsend_testhub::DelayProxy::start("127.0.0.1:0", hub.addr(), Duration::from_millis(100))
            .await
            .unwrap();
    let port = |p: u16| format!(":{p}/");
    let far = hub
        .connection_string()
        .replace(&port(hub.addr().port()), &port(proxy.addr().port()));
    let connect = |options: ProducerOptions| {
        Producer::builder()
            .connection_string(far.clone())
            .options(options)
            .connect()
    };
    let mut sent = 0;
    for (bound, start, ceiling) in [(None, 2 << 20, 16 << 20), (Some(8 << 20), 8 << 20, 8 << 20)] {
        let options = match bound {
            Some(bytes) => ProducerOptions::new().max_in_flight_bytes(bytes),
            None => ProducerOptions::new(),
        };
        let producer = connect(options).await.unwrap();
        assert_eq!(producer.stats().in_flight_window_bytes, start);
        sent += send_mib(&producer, 32).await;
        let window = producer.stats().in_flight_window_bytes;
        if ceiling > start {
            assert!(
                window > start && window <= ceiling,
                "a 200 ms round trip left the window at {window} bytes"
            );
        } else {
            assert_eq!(window, ceiling, "the window went past the bound");
        }
        producer.close().await.unwrap();
    }
    assert_eq!(hub.events(HUB).len(), sent);
}

/// Sends a batch of `n` events from a current-thread runtime, then blocks that thread (no
/// await) for up to `block`: how many events the hub stored meanwhile.
fn stored_while_the_callers_thread_is_blocked(
    on_its_own_runtime: bool,
    n: usize,
    block: Duration,
) -> usize {
    let hub_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let network = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let hub = hub_runtime.block_on(hub());
    let caller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stored = caller.block_on(async {
        let mut builder = Producer::builder().connection_string(hub.connection_string());
        if on_its_own_runtime {
            builder = builder.runtime(network.handle().clone());
        }
        let producer = builder.connect().await.expect("producer connects");
        let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
        for i in 0..n {
            batch.try_add(Event::new(format!("e-{i}"))).unwrap();
        }
        let delivery = producer.send_batch(batch).await.unwrap();
        // Nothing on this thread runs while it sleeps: only another runtime can send.
        let deadline = std::time::Instant::now() + block;
        let mut stored = hub.events(HUB).len();
        while stored < n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            stored = hub.events(HUB).len();
        }
        delivery.await.expect("the hub accepts the batch");
        assert_eq!(hub.events(HUB).len(), n);
        stored
    });
    drop(caller);
    drop(hub);
    stored
}

#[test]
fn a_producer_given_a_runtime_sends_on_it_while_its_callers_thread_is_busy() {
    assert_eq!(
        stored_while_the_callers_thread_is_blocked(true, 10, WAIT),
        10
    );
    // The same on the caller's runtime: nothing leaves while its only thread is blocked.
    assert_eq!(
        stored_while_the_callers_thread_is_blocked(false, 10, Duration::from_millis(300)),
        0
    );
}
