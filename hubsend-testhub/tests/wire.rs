//! Drives the test hub with a raw fe2o3 client over real TCP.

mod support;

use std::time::Duration;

use base64::Engine;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::{
    sasl_profile::SaslProfile, types::messaging::Outcome, Connection, Sender, Session,
};
use fe2o3_amqp_types::{
    messaging::{message::__private::Serializable, Body, Data, Message},
    primitives::{Binary, Value},
};
use hubsend_testhub::{HubConfig, Right, TestHub};
use support::{connect_to, event, put_token, sign, MANAGE_KEY, SEND_KEY};

async fn hub(max: u64) -> TestHub {
    TestHub::start(support::config().max_message_size(max))
        .await
        .unwrap()
}

#[tokio::test]
async fn put_token_then_send_plain_and_batch() {
    let hub = hub(1_048_576).await;
    let (mut conn, mut session) = connect_to(hub.addr()).await;
    put_token(&mut session, "sb://localhost/telemetry", "send", SEND_KEY)
        .await
        .unwrap();
    let mut sender = Sender::attach(&mut session, "producer", "telemetry/Partitions/2")
        .await
        .unwrap();
    assert_eq!(sender.max_message_size(), Some(1_048_576));
    let outcome = sender.send(event("hello", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");

    let inner: Vec<Data> = ["a", "b", "c"]
        .iter()
        .map(|s| {
            Data(Binary::from(
                serde_amqp::to_vec(&Serializable(event(s, None))).unwrap(),
            ))
        })
        .collect();
    let envelope = Message::builder().data_batch(inner).build();
    let sendable = Sendable::builder()
        .message(envelope)
        .message_format(0x8001_3700)
        .build();
    let outcome = sender.send(sendable).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");

    let events = hub
        .wait_for_events("telemetry", 4, Duration::from_secs(5))
        .await;
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| e.partition == 2));
    assert_eq!(events[0].body, b"hello");
    assert!(!events[0].batched);
    assert_eq!(events[3].body, b"c");
    assert!(events[3].batched);
    assert_eq!(
        events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(events[0].link_target, "telemetry/Partitions/2");
    let stats = hub.stats();
    assert_eq!(stats.put_tokens_accepted, 1);
    assert_eq!(stats.deliveries_accepted, 2);
    sender.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn wrong_key_is_401_and_attach_without_token_is_refused() {
    let hub = hub(1_048_576).await;
    let (_conn, mut session) = connect_to(hub.addr()).await;
    let err = put_token(
        &mut session,
        "sb://localhost/telemetry",
        "send",
        "wrong-key",
    )
    .await
    .unwrap_err();
    assert!(err.contains("401"), "{err}");
    let err = Sender::attach(&mut session, "producer", "telemetry")
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("UnauthorizedAccess"), "{err:?}");
    assert_eq!(hub.stats().put_tokens_rejected, 1);
    assert_eq!(hub.stats().links_refused, 1);
}

#[tokio::test]
async fn unknown_hub_is_not_found() {
    let hub = hub(1_048_576).await;
    let (mut conn, mut session) = connect_to(hub.addr()).await;
    put_token(&mut session, "sb://localhost/", "send", SEND_KEY)
        .await
        .unwrap();
    let err = Sender::attach(&mut session, "producer", "amqps://localhost:5671/nosuchhub")
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NotFound"), "{err:?}");
    // fe2o3 quirk: attaching again on the same session immediately after a refusal can race
    // the handle release and fail with IllegalState; use a fresh session.
    let mut session2 = Session::begin(&mut conn).await.unwrap();
    let err = Sender::attach(&mut session2, "producer2", "/telemetry/Partitions/9")
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NotFound"), "{err:?}");
    let mut session3 = Session::begin(&mut conn).await.unwrap();
    Sender::attach(&mut session3, "producer-ok", "TELEMETRY")
        .await
        .unwrap();
}

#[tokio::test]
async fn attach_reply_carries_min_max_message_size() {
    let hub = hub(1_048_576).await;
    let (_conn, mut session) = connect_to(hub.addr()).await;
    put_token(
        &mut session,
        "amqps://localhost/telemetry",
        "send",
        SEND_KEY,
    )
    .await
    .unwrap();
    let sender = Sender::builder()
        .name("producer")
        .target("telemetry")
        .max_message_size(4_000_000u64)
        .attach(&mut session)
        .await
        .unwrap();
    assert_eq!(sender.max_message_size(), Some(1_048_576));
    let sender2 = Sender::attach(&mut session, "producer2", "telemetry")
        .await
        .unwrap();
    assert_eq!(sender2.max_message_size(), Some(1_048_576));
}

#[tokio::test]
async fn oversize_is_rejected_and_link_stays_up() {
    // Enforce 1000 bytes but advertise more, so the fe2o3 client does not stop it locally.
    let hub = TestHub::start(
        HubConfig::new()
            .policy("send", SEND_KEY, &[Right::Send])
            .max_message_size(1000)
            .advertise_max_message_size(1_000_000),
    )
    .await
    .unwrap();
    let (_conn, mut session) = connect_to(hub.addr()).await;
    put_token(&mut session, "sb://localhost/telemetry", "send", SEND_KEY)
        .await
        .unwrap();
    let mut sender = Sender::attach(&mut session, "producer", "telemetry")
        .await
        .unwrap();
    let outcome = sender.send(event(&"x".repeat(2000), None)).await.unwrap();
    match outcome {
        Outcome::Rejected(r) => {
            let e = r.error.unwrap();
            assert!(
                format!("{:?}", e.condition).contains("MessageSizeExceeded"),
                "{e:?}"
            );
            assert!(e
                .description
                .unwrap()
                .contains("exceeds the limit (1000 bytes)"));
        }
        other => panic!("{other:?}"),
    }
    let outcome = sender.send(event("small", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    assert_eq!(hub.events("telemetry").len(), 1);
}

#[tokio::test]
async fn partition_key_routing_matches_partition_for_key() {
    let hub = hub(1_048_576).await;
    let (_conn, mut session) = connect_to(hub.addr()).await;
    put_token(&mut session, "sb://localhost/telemetry", "send", SEND_KEY)
        .await
        .unwrap();
    let mut sender = Sender::attach(&mut session, "producer", "telemetry")
        .await
        .unwrap();
    for key in ["7", "FWfAT", "device-42"] {
        let outcome = sender.send(event(key, Some(key))).await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)));
    }
    let events = hub
        .wait_for_events("telemetry", 3, Duration::from_secs(5))
        .await;
    for e in &events {
        let key = e.partition_key.clone().unwrap();
        assert_eq!(
            e.partition,
            hub.partition_for_key("telemetry", &key),
            "{key}"
        );
    }
}

#[tokio::test]
async fn reject_every_nth_fault() {
    let hub = hub(1_048_576).await;
    hub.faults()
        .reject_every_nth(2, "com.microsoft:server-busy");
    let (_conn, mut session) = connect_to(hub.addr()).await;
    put_token(&mut session, "sb://localhost/telemetry", "send", SEND_KEY)
        .await
        .unwrap();
    let mut sender = Sender::attach(&mut session, "producer", "telemetry")
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    for i in 0..4 {
        outcomes.push(sender.send(event(&i.to_string(), None)).await.unwrap());
    }
    assert!(matches!(outcomes[0], Outcome::Accepted(_)));
    match &outcomes[1] {
        Outcome::Rejected(r) => {
            let e = r.error.as_ref().unwrap();
            assert!(format!("{:?}", e.condition).contains("server-busy"));
            assert!(e.info.is_some());
        }
        other => panic!("{other:?}"),
    }
    hub.faults().clear();
    assert_eq!(hub.events("telemetry").len(), 2);
    assert_eq!(hub.stats().deliveries_rejected, 2);
}

#[tokio::test]
async fn detach_after_fault_and_token_refresh() {
    let hub = hub(1_048_576).await;
    let (_conn, mut session) = connect_to(hub.addr()).await;
    put_token(&mut session, "sb://localhost/telemetry", "send", SEND_KEY)
        .await
        .unwrap();
    let mut sender = Sender::attach(&mut session, "producer", "telemetry")
        .await
        .unwrap();
    hub.faults()
        .detach_links_after(1, "amqp:link:detach-forced", "forced by test");
    let outcome = sender.send(event("x", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    let err = tokio::time::timeout(Duration::from_secs(5), sender.on_detach())
        .await
        .unwrap();
    assert!(
        format!("{err:?}").contains("detach-forced") || format!("{err:?}").contains("DetachForced"),
        "{err:?}"
    );
}

#[tokio::test]
async fn management_read() {
    use fe2o3_amqp::link::Receiver;
    use fe2o3_amqp_types::{
        messaging::{ApplicationProperties, Properties},
        primitives::SimpleValue,
    };
    let hub = hub(1_048_576).await;
    let (_conn, mut session) = connect_to(hub.addr()).await;
    let mut sender = Sender::attach(&mut session, "mgmt-sender", "$management")
        .await
        .unwrap();
    let mut receiver = Receiver::builder()
        .name("mgmt-receiver")
        .source("$management")
        .target("mgmt-client")
        .attach(&mut session)
        .await
        .unwrap();
    let token = sign("sb://localhost/telemetry", "manage", MANAGE_KEY, 600);
    let req = Message::builder()
        .properties(
            Properties::builder()
                .message_id(7u64)
                .reply_to("mgmt-client")
                .build(),
        )
        .application_properties(
            ApplicationProperties::builder()
                .insert("operation", SimpleValue::String("READ".into()))
                .insert("type", SimpleValue::String("com.microsoft:eventhub".into()))
                .insert("name", SimpleValue::String("telemetry".into()))
                .insert("security_token", SimpleValue::String(token))
                .build(),
        )
        .value(Value::Null)
        .build();
    sender.send(req).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), receiver.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    receiver.accept(&resp).await.unwrap();
    let ap = resp.message().application_properties.clone().unwrap();
    assert_eq!(ap.0.get("status-code"), Some(&SimpleValue::Int(200)));
    let Body::Value(v) = resp.body() else {
        panic!()
    };
    let Value::Map(map) = &v.0 else {
        panic!("{v:?}")
    };
    assert_eq!(
        map.get(&Value::String("partition_count".into())),
        Some(&Value::Int(4))
    );
    assert!(matches!(
        map.get(&Value::String("partition_ids".into())),
        Some(Value::Array(_))
    ));
}

#[tokio::test]
async fn tls_handshake_with_generated_ca() {
    use std::sync::Arc;
    let hub = TestHub::start(
        HubConfig::new()
            .policy("send", SEND_KEY, &[Right::Send])
            .tls(true),
    )
    .await
    .unwrap();
    let pem = hub.ca_pem().unwrap();
    assert!(hub
        .connection_string()
        .starts_with("Endpoint=sb://localhost:"));
    assert!(!hub.connection_string().contains("UseDevelopmentEmulator"));
    let der = pem_to_der(&pem);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut conn = Connection::builder()
        .container_id("tls-client")
        .sasl_profile(SaslProfile::Anonymous)
        .alt_tls_establishment(true)
        .rustls_connector(connector)
        .open(format!("amqps://localhost:{}", hub.addr().port()).as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    put_token(
        &mut session,
        "amqps://localhost/telemetry",
        "send",
        SEND_KEY,
    )
    .await
    .unwrap();
    let mut sender = Sender::attach(&mut session, "p", "telemetry")
        .await
        .unwrap();
    let outcome = sender.send(event("over tls", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}
