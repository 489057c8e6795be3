//! The HTTPS REST transport (`Transport::Https`, feature `https`) against the test hub's REST
//! endpoint, over real sockets: what the producer reports is checked against what the hub
//! stored, in the same partitions its AMQP side serves.

mod support;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubsend::{
    AccessToken, BatchOptions, BufferedOptions, BufferedProducer, Condition, ConnectionEvent,
    ErrorKind, Event, Producer, ProducerOptions, SendOptions, TokenProvider, TokenType, Transport,
    TryAddError,
};
use hubsend_testhub::{HubConfig, TestHub};
use support::{fast_retry, start, HUB};

/// A hub with its REST endpoint, plain HTTP on loopback.
async fn rest_hub(config: HubConfig) -> TestHub {
    start(config.rest(true)).await
}

/// A producer over HTTPS (or plain HTTP to loopback) to `hub`'s REST endpoint.
async fn rest_producer(hub: &TestHub, options: ProducerOptions) -> Producer {
    let mut builder = Producer::builder()
        .connection_string(hub.connection_string())
        .endpoint(hub.rest_url().expect("the hub serves REST"))
        .options(options);
    if let Some(ca) = hub.ca_pem() {
        builder = builder.add_root_certificate_pem(ca);
    }
    builder.connect().await.expect("producer connects")
}

fn n_of(e: &hubsend_testhub::StoredEvent) -> i64 {
    e.application_properties["n"].as_i64().expect("n")
}

#[tokio::test]
async fn full_batches_over_tls_are_stored_exactly() {
    let hub = rest_hub(HubConfig::new().tls(true)).await;
    let producer = rest_producer(&hub, ProducerOptions::new().retry(fast_retry())).await;
    assert_eq!(producer.transport(), Transport::Https);
    let body = |i: i64| -> Vec<u8> {
        match i % 3 {
            0 => format!(r#"{{"reading":{i},"text":"quote \" backslash \\ é"}}"#).into_bytes(),
            1 => vec![0xff, 0x00, (i % 256) as u8, 0x80],
            _ => format!("line {i}\n\t\u{1}").into_bytes(),
        }
    };
    let options = BatchOptions::new().max_size_in_bytes(16 * 1024);
    let mut batch = producer.create_batch(options.clone()).await.unwrap();
    let mut deliveries = Vec::new();
    let mut full = 0;
    for i in 0..3000i64 {
        let event = Event::new(body(i))
            .with_property("n", i)
            .with_property("half", i % 2 == 0)
            .with_property("ratio", i as f64 / 4.0)
            .with_property("site", "plant-3");
        if let Err(TryAddError::Full(event)) = batch.try_add(event) {
            assert!(batch.size_in_bytes() <= 16 * 1024);
            full += 1;
            let sent = std::mem::replace(
                &mut batch,
                producer.create_batch(options.clone()).await.unwrap(),
            );
            deliveries.push(producer.send_batch(sent).await.unwrap());
            batch.try_add(event).expect("fits an empty batch");
        }
    }
    deliveries.push(producer.send_batch(batch).await.unwrap());
    for d in deliveries {
        d.await.expect("stored");
    }
    assert!(full >= 10, "only {full} full batches");
    let stored = hub.events(HUB);
    assert_eq!(stored.len(), 3000);
    let mut by_n = BTreeMap::new();
    for e in &stored {
        assert!(e.batched);
        assert_eq!(e.application_properties["site"], "plant-3");
        assert_eq!(e.application_properties["half"], n_of(e) % 2 == 0);
        assert_eq!(e.application_properties["ratio"], n_of(e) as f64 / 4.0);
        assert!(
            by_n.insert(n_of(e), e.body.clone()).is_none(),
            "stored twice"
        );
    }
    for (n, stored_body) in by_n {
        assert_eq!(stored_body, body(n), "event {n}");
    }
    assert_eq!(hub.rest_stats().created, full + 1);
    assert_eq!(producer.stats().sent, full + 1);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn single_sends_carry_content_type_ids_and_properties() {
    let hub = rest_hub(HubConfig::new()).await;
    let producer = rest_producer(&hub, ProducerOptions::new()).await;
    let event = Event::new(r#"{"vibe_x":42.1}"#)
        .with_content_type("application/json")
        .with_message_id("msg-1")
        .with_correlation_id("corr-1")
        .with_property("Site", "Zürich")
        .with_property("count", 7i64)
        .with_property("ok", true);
    producer
        .send_and_wait(event, SendOptions::new())
        .await
        .unwrap();
    // Pipelined single sends, several in flight.
    let mut deliveries = Vec::new();
    for i in 0..200i64 {
        let event = Event::new(format!("event {i}")).with_property("n", i);
        deliveries.push(producer.send(event, SendOptions::new()).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
    let stored = hub.events(HUB);
    assert_eq!(stored.len(), 201);
    let first = stored.iter().find(|e| e.message_id.is_some()).unwrap();
    assert_eq!(first.body, br#"{"vibe_x":42.1}"#);
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.message_id.as_deref(), Some("msg-1"));
    assert_eq!(first.correlation_id.as_deref(), Some("corr-1"));
    // HTTP header names are case-insensitive: the hub sees them lower-cased.
    assert_eq!(first.application_properties["site"], "Zürich");
    assert_eq!(first.application_properties["count"], 7);
    assert_eq!(first.application_properties["ok"], true);
    assert!(!first.batched);
    let mut ns: Vec<i64> = stored
        .iter()
        .filter(|e| e.message_id.is_none())
        .map(n_of)
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..200).collect::<Vec<_>>());
    // A property that cannot be a header is refused before anything is sent.
    let requests = hub.rest_stats().requests;
    let err = producer
        .send(
            Event::new("x").with_property("has space", 1i64),
            SendOptions::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(hub.rest_stats().requests, requests);
}

#[tokio::test]
async fn partition_keys_and_ids_route_as_the_service_does() {
    let hub = rest_hub(HubConfig::new()).await;
    let producer = rest_producer(&hub, ProducerOptions::new()).await;
    let expected = hub.partition_for_key(HUB, "pump-7");
    let mut batch = producer
        .create_batch(BatchOptions::new().partition_key("pump-7"))
        .await
        .unwrap();
    for i in 0..10i64 {
        batch
            .try_add(Event::new("k").with_property("n", i))
            .unwrap();
    }
    producer.send_batch(batch).await.unwrap().await.unwrap();
    producer
        .send_and_wait(
            Event::new("k").with_property("n", 10i64),
            SendOptions::new().partition_key("pump-7"),
        )
        .await
        .unwrap();
    let mut batch = producer
        .create_batch(BatchOptions::new().partition_id("2"))
        .await
        .unwrap();
    batch
        .try_add(Event::new("p").with_property("n", 11i64))
        .unwrap();
    producer.send_batch(batch).await.unwrap().await.unwrap();
    producer
        .send_and_wait(
            Event::new("p").with_property("n", 12i64),
            SendOptions::new().partition_id("2"),
        )
        .await
        .unwrap();
    let stored = hub.events(HUB);
    assert_eq!(stored.len(), 13);
    for e in &stored {
        if n_of(e) <= 10 {
            assert_eq!(e.partition, expected, "event {}", n_of(e));
            assert_eq!(e.partition_key.as_deref(), Some("pump-7"));
        } else {
            assert_eq!(e.partition, 2, "event {}", n_of(e));
            assert_eq!(e.partition_key, None);
        }
    }
    let err = producer
        .send_and_wait(Event::new("x"), SendOptions::new().partition_id("9"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn batches_filled_to_the_limit_are_never_refused_for_size() {
    // The hub takes 8 KiB requests; the producer fills batches to exactly that.
    let limit = 8 * 1024;
    let hub = rest_hub(HubConfig::new().max_message_size(limit)).await;
    let producer = rest_producer(&hub, ProducerOptions::new().max_message_size(limit)).await;
    let mut sent = 0i64;
    let mut deliveries = Vec::new();
    for round in 0..6 {
        let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
        loop {
            // Escaping-heavy text and binary (base64) bodies of varying length.
            let body: Vec<u8> = if (sent + round) % 2 == 0 {
                "\"\\\u{7}é".repeat(1 + (sent % 37) as usize).into_bytes()
            } else {
                vec![0xfe; 1 + (sent % 101) as usize]
            };
            match batch.try_add(Event::new(body).with_property("n", sent)) {
                Ok(()) => sent += 1,
                Err(TryAddError::Full(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            batch.size_in_bytes() > limit - 700,
            "{}",
            batch.size_in_bytes()
        );
        deliveries.push(producer.send_batch(batch).await.unwrap());
    }
    for d in deliveries {
        d.await.expect("a full batch is stored");
    }
    assert_eq!(hub.rest_stats().too_large, 0);
    assert_eq!(hub.events(HUB).len() as i64, sent);
}

#[tokio::test]
async fn sas_tokens_are_refreshed_before_they_expire() {
    let hub = rest_hub(HubConfig::new()).await;
    let producer = rest_producer(
        &hub,
        ProducerOptions::new().token_lifetime(Duration::from_secs(2)),
    )
    .await;
    let mut events = producer.subscribe();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0i64;
    // Keep sending, each send awaited, until the hub has accepted three different tokens:
    // the hub refuses an expired token, so every success past the first lifetime proves a
    // refresh.
    while hub.rest_stats().distinct_tokens < 3 {
        assert!(Instant::now() < deadline, "no refresh within 20 s");
        producer
            .send_and_wait(Event::new("t").with_property("n", n), SendOptions::new())
            .await
            .unwrap_or_else(|e| panic!("send {n}: {e}"));
        n += 1;
    }
    assert_eq!(hub.rest_stats().unauthorized, 0);
    let mut refreshed = 0;
    while let Ok(event) = events.try_recv() {
        if matches!(event, ConnectionEvent::TokenRefreshed) {
            refreshed += 1;
        }
    }
    assert!(refreshed >= 2, "{refreshed} refreshes reported");
    assert_eq!(hub.events(HUB).len() as i64, n);
}

#[tokio::test]
async fn throttling_is_retried_after_retry_after_and_nothing_is_lost_or_duplicated() {
    let hub = rest_hub(HubConfig::new()).await;
    let producer = rest_producer(&hub, ProducerOptions::new().retry(fast_retry())).await;
    // 503 with Retry-After: 1 on the next 2 requests: the first retry waits a second.
    hub.faults().rest_fail_next(2, 503, Some(1));
    let started = Instant::now();
    producer
        .send_and_wait(Event::new("a").with_property("n", 0i64), SendOptions::new())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After was not honoured: {:?}",
        started.elapsed()
    );
    // 429 without Retry-After on 5 of 100 concurrent sends, then 500 on 3 batches.
    hub.faults().rest_fail_next(5, 429, None);
    let mut deliveries = Vec::new();
    for i in 1..=100i64 {
        let event = Event::new("b").with_property("n", i);
        deliveries.push(producer.send(event, SendOptions::new()).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
    hub.faults().rest_fail_next(3, 500, None);
    let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
    for i in 101..=150i64 {
        batch
            .try_add(Event::new("c").with_property("n", i))
            .unwrap();
    }
    producer.send_batch(batch).await.unwrap().await.unwrap();
    let mut seen: Vec<i64> = hub.events(HUB).iter().map(n_of).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..=150).collect::<Vec<_>>(), "lost or duplicated");
    assert_eq!(hub.rest_stats().injected_failures, 10);
    assert_eq!(producer.stats().retried, 10);
    assert_eq!(producer.stats().failed, 0);
}

#[tokio::test]
async fn throttling_past_the_retries_fails_as_server_busy() {
    let hub = rest_hub(HubConfig::new()).await;
    let retry = fast_retry().max_retries(2);
    let producer = rest_producer(&hub, ProducerOptions::new().retry(retry)).await;
    hub.faults().rest_fail_next(10, 503, None);
    let err = producer
        .send_and_wait(Event::new("x"), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ServerBusy, "{err}");
    assert!(err.is_retriable());
    assert_eq!(hub.rest_stats().injected_failures, 3);
    assert!(hub.events(HUB).is_empty());
}

#[tokio::test]
async fn oversize_is_refused_with_a_typed_error_and_nothing_is_stored() {
    let hub = rest_hub(HubConfig::new().max_message_size(64 * 1024)).await;
    // Client side: the producer's own limit refuses before sending.
    let producer = rest_producer(&hub, ProducerOptions::new().max_message_size(64 * 1024)).await;
    let err = producer
        .send(Event::new(vec![b'x'; 70 * 1024]), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MessageTooLarge);
    let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
    assert!(matches!(
        batch.try_add(Event::new(vec![0xff; 60 * 1024])),
        Err(TryAddError::TooLarge(_))
    ));
    assert_eq!(hub.rest_stats().requests, 0);
    // Hub side: a producer that believes in a larger limit gets the hub's 413.
    let producer = rest_producer(
        &hub,
        ProducerOptions::new()
            .max_message_size(4 * 1024 * 1024)
            .retry(fast_retry()),
    )
    .await;
    let err = producer
        .send_and_wait(Event::new(vec![b'x'; 100 * 1024]), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MessageTooLarge, "{err}");
    assert_eq!(err.condition(), Some(&Condition::MessageSizeExceeded));
    assert!(!err.is_retriable());
    let shown = err.to_string();
    assert!(
        shown.contains("HTTP 413") && shown.contains("65536"),
        "{shown}"
    );
    let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
    for i in 0..2000i64 {
        batch
            .try_add(Event::new(vec![b'y'; 50]).with_property("n", i))
            .unwrap();
    }
    let err = producer.send_batch(batch).await.unwrap().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MessageTooLarge, "{err}");
    let stats = hub.rest_stats();
    assert_eq!((stats.requests, stats.too_large), (2, 2), "not retried");
    assert!(hub.events(HUB).is_empty());
}

#[tokio::test]
async fn a_wrong_key_is_unauthorized() {
    let hub = rest_hub(HubConfig::new()).await;
    let cs = hub.connection_string();
    let key_at = cs.find("SharedAccessKey=").unwrap() + "SharedAccessKey=".len();
    let end = cs[key_at..].find(';').map_or(cs.len(), |i| key_at + i);
    let wrong = format!("{}d3JvbmcK{}", &cs[..key_at], &cs[end..]);
    let producer = Producer::builder()
        .connection_string(wrong)
        .endpoint(hub.rest_url().unwrap())
        .connect()
        .await
        .unwrap();
    let err = producer
        .send_and_wait(Event::new("x"), SendOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(err.is_auth());
    let shown = err.to_string();
    assert!(shown.contains("HTTP 401"), "{shown}");
    assert!(
        !shown.contains("d3JvbmcK") && !shown.contains("sig="),
        "{shown}"
    );
    // Tried once more with a fresh token, then refused.
    assert_eq!(hub.rest_stats().unauthorized, 2);
    assert!(hub.events(HUB).is_empty());
}

/// Hands out HS256 tokens from a trusted issuer, as an Entra ID credential would.
#[derive(Debug)]
struct JwtProvider;

const ISSUER: &str = "https://login.test/tenant/v2.0";
const SECRET: &[u8] = b"rest-test-secret";

impl TokenProvider for JwtProvider {
    fn token<'a>(
        &'a self,
        _audience: &'a str,
    ) -> Pin<Box<dyn std::future::Future<Output = hubsend::Result<AccessToken>> + Send + 'a>> {
        Box::pin(async move {
            let exp = std::time::SystemTime::now() + Duration::from_secs(600);
            let exp_secs = exp.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let claims = serde_json::json!({
                "iss": ISSUER,
                "aud": hubsend_testhub::EVENT_HUBS_AUDIENCE,
                "exp": exp_secs,
                "roles": ["Azure Event Hubs Data Sender"],
            });
            Ok(AccessToken::new(
                hubsend_testhub::sign_jwt_hs256(SECRET, &claims),
                TokenType::Jwt,
                exp,
            ))
        })
    }
}

#[tokio::test]
async fn entra_tokens_go_as_bearer_and_the_audience_keeps_the_namespace() {
    // The producer names the namespace `contoso.servicebus.windows.net` and dials the hub's
    // REST port: the token is for the namespace, the request goes to the endpoint.
    let hub = rest_hub(
        HubConfig::new()
            .namespace_alias("contoso.servicebus.windows.net")
            .trust_jwt_issuer(ISSUER, hubsend_testhub::EVENT_HUBS_AUDIENCE, SECRET),
    )
    .await;
    let producer = Producer::builder()
        .namespace("contoso.servicebus.windows.net")
        .event_hub(HUB)
        .credential(Arc::new(JwtProvider))
        .transport(Transport::Https)
        .endpoint(hub.rest_url().unwrap())
        .connect()
        .await
        .unwrap();
    producer
        .send_and_wait(Event::new("bearer"), SendOptions::new())
        .await
        .unwrap();
    assert_eq!(hub.events(HUB).len(), 1);
    // SAS signed for the namespace name, through the same custom endpoint.
    let cs = hub.connection_string();
    let credentials = &cs[cs.find("SharedAccessKeyName").unwrap()..];
    let producer = Producer::builder()
        .connection_string(format!(
            "Endpoint=sb://contoso.servicebus.windows.net/;{credentials}"
        ))
        .endpoint(hub.rest_url().unwrap())
        .connect()
        .await
        .unwrap();
    producer
        .send_and_wait(Event::new("sas"), SendOptions::new())
        .await
        .unwrap();
    assert_eq!(hub.events(HUB).len(), 2);
}

#[tokio::test]
async fn the_custom_endpoint_decides_the_transport_and_guards_plaintext() {
    let hub = rest_hub(HubConfig::new()).await;
    let builder = || Producer::builder().connection_string(hub.connection_string());
    let err = builder()
        .transport(Transport::Amqp)
        .endpoint(hub.rest_url().unwrap())
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    let err = builder()
        .endpoint("http://rest.contoso.com:8080")
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("loopback"), "{err}");
    // `amqp://` to the hub's AMQP port: the same hub over AMQP.
    let amqp = builder()
        .endpoint(format!("amqp://127.0.0.1:{}", hub.addr().port()))
        .connect()
        .await
        .unwrap();
    assert_eq!(amqp.transport(), Transport::Amqp);
    amqp.send_and_wait(Event::new("amqp"), SendOptions::new())
        .await
        .unwrap();
    // A batch made by one transport's producer is refused by the other's.
    let rest = rest_producer(&hub, ProducerOptions::new()).await;
    let batch = amqp.create_batch(BatchOptions::new()).await.unwrap();
    let err = rest.send_batch(batch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let mut batch = rest.create_batch(BatchOptions::new()).await.unwrap();
    batch.try_add(Event::new("x")).unwrap();
    assert_eq!(
        amqp.send_batch(batch).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(hub.events(HUB).len(), 1);
}

#[tokio::test]
async fn a_buffered_producer_streams_over_https() {
    let hub = rest_hub(HubConfig::new()).await;
    let producer = rest_producer(&hub, ProducerOptions::new().retry(fast_retry())).await;
    hub.faults().rest_fail_next(2, 503, None);
    // A generous linger: on a loaded machine the default one can flush a lane after every
    // few events, and this test is about batching, not timing.
    let buffered = BufferedProducer::new(
        producer,
        BufferedOptions::new().linger(Duration::from_millis(500)),
    );
    for i in 0..5000i64 {
        let key = format!("pump-{}", i % 8);
        let event =
            Event::new(format!(r#"{{"sensor_id":"{key}","value":{i}}}"#)).with_property("n", i);
        buffered
            .enqueue(event, SendOptions::new().partition_key(key))
            .await
            .unwrap();
    }
    let report = buffered.close().await;
    assert_eq!((report.sent, report.failed), (5000, 0), "{report:?}");
    let stored = hub.events(HUB);
    let mut seen: Vec<i64> = stored.iter().map(n_of).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..5000).collect::<Vec<_>>());
    for e in &stored {
        let key = format!("pump-{}", n_of(e) % 8);
        assert_eq!(e.partition_key.as_deref(), Some(key.as_str()));
        assert_eq!(e.partition, hub.partition_for_key(HUB, &key));
    }
    assert!(hub.rest_stats().created < 200, "events were batched");
}
