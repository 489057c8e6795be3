//! Consumer links: a raw fe2o3 Receiver with the SDKs' selector filters reads events back.

mod support;

use std::time::Duration;

use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{connection::ConnectionHandle, types::messaging::Outcome, Receiver, Sender};
use fe2o3_amqp_types::{
    messaging::{
        annotations::OwnedKey, ApplicationProperties, Body, Message, MessageAnnotations,
        Properties, Source,
    },
    primitives::{Binary, SimpleValue, Symbol, Value},
};
use hubsend_testhub::TestHub;
use serde_amqp::{described::Described, descriptor::Descriptor};
use support::{hub, MANAGE_KEY, SEND_KEY};

const SELECTOR: &str = "apache.org:selector-filter:string";

/// A connection and session with a put-token for `telemetry` under `policy`.
async fn connect(
    hub: &TestHub,
    policy: &str,
    key: &str,
) -> (ConnectionHandle<()>, SessionHandle<()>) {
    let (conn, mut session) = support::connect_to(hub.addr()).await;
    let audience = format!("sb://localhost:{}/telemetry", hub.addr().port());
    support::put_token(&mut session, &audience, policy, key)
        .await
        .unwrap();
    (conn, session)
}

fn event(i: usize, key: &str) -> Message<Body<Value>> {
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(
            MessageAnnotations::builder()
                .insert("x-opt-partition-key", key)
                .build(),
        ),
        properties: Some(Properties {
            content_type: Some(Symbol::from("text/plain")),
            ..Default::default()
        }),
        application_properties: Some(
            ApplicationProperties::builder()
                .insert("i", SimpleValue::Int(i as i32))
                .build(),
        ),
        body: Body::Data(
            vec![fe2o3_amqp_types::messaging::Data(Binary::from(
                format!("event {i}").into_bytes(),
            ))]
            .into(),
        ),
        footer: None,
    }
}

async fn produce(session: &mut SessionHandle<()>, key: &str, range: std::ops::Range<usize>) {
    let mut sender = Sender::attach(session, format!("producer-{}", range.start), "telemetry")
        .await
        .unwrap();
    for i in range {
        let outcome = sender.send(event(i, key)).await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    sender.close().await.unwrap();
}

async fn consumer(
    session: &mut SessionHandle<()>,
    name: &str,
    address: &str,
    selector: Option<&str>,
    credit: u32,
) -> Result<Receiver, String> {
    let mut source = Source::builder().address(address);
    if let Some(sel) = selector {
        source = source.add_to_filter(
            SELECTOR,
            Described {
                descriptor: Descriptor::Name(Symbol::from(SELECTOR)),
                value: Value::String(sel.to_string()),
            },
        );
    }
    let mut receiver = Receiver::builder()
        .name(name)
        .source(source.build())
        .credit_mode(CreditMode::Manual)
        .attach(session)
        .await
        .map_err(|e| format!("{e:?}"))?;
    receiver.set_credit(credit).await.unwrap();
    Ok(receiver)
}

fn annotation<'a>(msg: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    msg.message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
}

async fn next(receiver: &mut Receiver) -> Message<Body<Value>> {
    let delivery = tokio::time::timeout(Duration::from_secs(5), receiver.recv::<Body<Value>>())
        .await
        .expect("no delivery within 5 s")
        .unwrap();
    receiver.accept(&delivery).await.unwrap();
    delivery.into_message()
}

fn seq(msg: &Message<Body<Value>>) -> i64 {
    match annotation(msg, "x-opt-sequence-number") {
        Some(Value::Long(n)) => *n,
        other => panic!("x-opt-sequence-number: {other:?}"),
    }
}

#[tokio::test]
async fn reads_back_from_the_start_with_annotations() {
    let hub = hub().await;
    let (mut conn, mut session) = connect(&hub, "manage", MANAGE_KEY).await;
    produce(&mut session, "pump-1", 0..3).await;
    let p = hub.partition_for_key("telemetry", "pump-1");
    let stored = hub.partition_events("telemetry", p);
    assert_eq!(stored.len(), 3);

    let address = format!("telemetry/ConsumerGroups/$Default/Partitions/{p}");
    let mut rx = consumer(
        &mut session,
        "c1",
        &address,
        Some("amqp.annotation.x-opt-offset > '-1'"),
        10,
    )
    .await
    .unwrap();
    for (i, ev) in stored.iter().enumerate() {
        let msg = next(&mut rx).await;
        assert_eq!(seq(&msg), i as i64);
        assert_eq!(
            annotation(&msg, "x-opt-offset"),
            Some(&Value::String(ev.offset.to_string()))
        );
        match annotation(&msg, "x-opt-enqueued-time") {
            Some(Value::Timestamp(t)) => assert_eq!(t.milliseconds(), ev.enqueued_time_ms),
            other => panic!("x-opt-enqueued-time: {other:?}"),
        }
        assert_eq!(
            annotation(&msg, "x-opt-partition-key"),
            Some(&Value::String("pump-1".into()))
        );
        let Body::Data(data) = &msg.body else {
            panic!("body {:?}", msg.body)
        };
        assert_eq!(
            data.iter().next().unwrap().0.to_vec(),
            format!("event {i}").into_bytes()
        );
        assert_eq!(
            msg.properties.as_ref().unwrap().content_type,
            Some(Symbol::from("text/plain"))
        );
        assert_eq!(
            msg.application_properties.as_ref().unwrap().0.get("i"),
            Some(&SimpleValue::Int(i as i32))
        );
    }

    // New events follow as they arrive.
    produce(&mut session, "pump-1", 3..4).await;
    let msg = next(&mut rx).await;
    assert_eq!(seq(&msg), 3);
    rx.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn sequence_offset_time_and_latest_filters() {
    let hub = hub().await;
    let (mut conn, mut session) = connect(&hub, "manage", MANAGE_KEY).await;
    produce(&mut session, "k", 0..6).await;
    let p = hub.partition_for_key("telemetry", "k");
    let stored = hub.partition_events("telemetry", p);
    // The amqps:// address form (Python) and any consumer group.
    let address = format!(
        "amqps://localhost:{}/telemetry/ConsumerGroups/analytics/Partitions/{p}",
        hub.addr().port()
    );
    let cases = [
        ("amqp.annotation.x-opt-sequence-number > 2", 3),
        ("amqp.annotation.x-opt-sequence-number >= '2'", 2),
        (
            &format!("amqp.annotation.x-opt-offset > '{}'", stored[4].offset) as &str,
            5,
        ),
        (
            &format!("amqp.annotation.x-opt-offset >= '{}'", stored[4].offset),
            4,
        ),
        (
            &format!(
                "amqp.annotation.x-opt-enqueued-time > '{}'",
                stored[0].enqueued_time_ms - 1
            ),
            0,
        ),
    ];
    for (n, (selector, first)) in cases.iter().enumerate() {
        let mut rx = consumer(&mut session, &format!("f{n}"), &address, Some(selector), 1)
            .await
            .unwrap();
        assert_eq!(seq(&next(&mut rx).await), *first, "{selector}");
        rx.close().await.unwrap();
    }

    let mut rx = consumer(
        &mut session,
        "latest",
        &address,
        Some("amqp.annotation.x-opt-offset > '@latest'"),
        5,
    )
    .await
    .unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), rx.recv::<Body<Value>>()).await;
    assert!(nothing.is_err(), "@latest delivered a stored event");
    produce(&mut session, "k", 6..7).await;
    assert_eq!(seq(&next(&mut rx).await), 6);
    rx.close().await.unwrap();

    let err = consumer(
        &mut session,
        "bad",
        &address,
        Some("amqp.annotation.x-opt-offset > 'abc'"),
        1,
    )
    .await
    .unwrap_err();
    assert!(err.contains("argument-error"), "{err}");
    let _ = session.end().await;
    let _ = conn.close().await;
}

#[tokio::test]
async fn respects_link_credit() {
    let hub = hub().await;
    let (mut conn, mut session) = connect(&hub, "manage", MANAGE_KEY).await;
    produce(&mut session, "credit", 0..5).await;
    let p = hub.partition_for_key("telemetry", "credit");
    let address = format!("telemetry/ConsumerGroups/$Default/Partitions/{p}");
    let mut rx = consumer(&mut session, "credit", &address, None, 2)
        .await
        .unwrap();
    assert_eq!(seq(&next(&mut rx).await), 0);
    assert_eq!(seq(&next(&mut rx).await), 1);
    let more = tokio::time::timeout(Duration::from_millis(300), rx.recv::<Body<Value>>()).await;
    assert!(more.is_err(), "delivered beyond the granted credit");
    rx.set_credit(3).await.unwrap();
    for want in 2..5 {
        assert_eq!(seq(&next(&mut rx).await), want);
    }
    rx.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn listen_right_required_and_unknown_partition_not_found() {
    let hub = hub().await;
    let (_conn, mut session) = connect(&hub, "send", SEND_KEY).await;
    let err = consumer(
        &mut session,
        "nolisten",
        "telemetry/ConsumerGroups/$Default/Partitions/0",
        None,
        1,
    )
    .await
    .unwrap_err();
    assert!(err.contains("UnauthorizedAccess"), "{err}");

    let (_conn2, mut session2) = connect(&hub, "manage", MANAGE_KEY).await;
    let err = consumer(
        &mut session2,
        "nopartition",
        "telemetry/ConsumerGroups/$Default/Partitions/9",
        None,
        1,
    )
    .await
    .unwrap_err();
    assert!(err.contains("NotFound"), "{err}");
}
