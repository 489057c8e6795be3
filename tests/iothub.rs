//! IoT Hub device-to-cloud over real AMQP against the test hub in IoT Hub mode: a device
//! sender with its own key, and a gateway sending as many devices over shared connections.

mod support;

use std::time::Duration;

use hubsend::iothub::{with_creation_time, DeviceSender, Gateway, IotHubBuilder};
use hubsend::{ErrorKind, Event, ProducerOptions, TryAddError};
use hubsend_testhub::{HubConfig, Right, TestHub};

const HOST: &str = "plant.azure-devices.net";
const DEVICE_KEY: &str = "c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA==";
const POLICY_KEY: &str = "cG9saWN5LWtleS1mb3ItdGhlLWdhdGV3YXktdGVzdHM=";

async fn hub(devices: usize) -> TestHub {
    let mut config = HubConfig::new()
        .iothub(HOST)
        .policy("device", POLICY_KEY, &[Right::DeviceConnect])
        .policy("registryRead", POLICY_KEY, &[Right::RegistryRead]);
    for i in 0..devices {
        config = config.iot_device(format!("sensor-{i}"), DEVICE_KEY);
    }
    support::start(config).await
}

fn builder(hub: &TestHub, connection_string: String) -> IotHubBuilder {
    IotHubBuilder::default()
        .connection_string(connection_string)
        .port(hub.addr().port())
        .danger_plaintext(true)
}

#[tokio::test]
async fn a_device_sends_messages_and_batches_with_their_properties() {
    let hub = hub(1).await;
    let device = builder(&hub, hub.iothub_device_connection_string("sensor-0"))
        .device_sender()
        .await
        .expect("the device connects");
    assert_eq!(device.device_id(), "sensor-0");
    assert_eq!(device.max_message_size(), 256 * 1024);
    let at = chrono::DateTime::parse_from_rfc3339("2025-08-19T08:30:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let message = with_creation_time(
        Event::new(r#"{"sensor_id":"compressor-7:vibe_x","value":42.1}"#)
            .with_content_type("application/json")
            .with_content_encoding("utf-8")
            .with_message_id("m-1")
            .with_correlation_id("c-1")
            .with_property("site", "plant-3"),
        at,
    );
    device.send(message).await.unwrap().await.expect("stored");
    let mut batch = device.create_batch(None).unwrap();
    for i in 0..100 {
        batch
            .try_add(Event::new(format!("reading {i}")))
            .expect("fits");
    }
    device
        .send_batch(batch)
        .await
        .unwrap()
        .await
        .expect("batch stored");
    let stored = hub.iothub_messages("sensor-0");
    assert_eq!(stored.len(), 101);
    let first = &stored[0];
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.message_id.as_deref(), Some("m-1"));
    assert_eq!(first.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(first.application_properties["site"], "plant-3");
    assert_eq!(
        first.application_properties["iothub-creation-time-utc"],
        "2025-08-19T08:30:00.000Z"
    );
    assert_eq!(stored[100].body, b"reading 99");
    device.close().await.unwrap();
}

#[tokio::test]
async fn the_256_kb_limit_is_enforced_before_sending() {
    let hub = hub(1).await;
    let device = builder(&hub, hub.iothub_device_connection_string("sensor-0"))
        .device_sender()
        .await
        .unwrap();
    let err = device
        .send(Event::new(vec![b'x'; 300 * 1024]))
        .await
        .expect_err("too large");
    assert_eq!(err.kind(), ErrorKind::MessageTooLarge, "{err}");
    let mut batch = device.create_batch(None).unwrap();
    let mut added = 0;
    loop {
        match batch.try_add(Event::new(vec![b'y'; 10 * 1024])) {
            Ok(()) => added += 1,
            Err(TryAddError::Full(_)) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(batch.size_in_bytes() <= 256 * 1024);
    assert!(added >= 24, "{added}");
    device
        .send_batch(batch)
        .await
        .unwrap()
        .await
        .expect("a full batch is stored");
    assert!(device.create_batch(Some(300 * 1024)).is_err());
}

#[tokio::test]
async fn a_wrong_device_key_is_unauthorized() {
    let hub = hub(1).await;
    let wrong = hub
        .iothub_device_connection_string("sensor-0")
        .replace(DEVICE_KEY, POLICY_KEY);
    let err = builder(&hub, wrong)
        .device_sender()
        .await
        .expect_err("a wrong key is refused");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(!format!("{err} {err:?}").contains(POLICY_KEY));
}

#[tokio::test]
async fn a_gateway_sends_as_many_devices_over_one_connection() {
    let hub = hub(50).await;
    let gateway = builder(&hub, hub.iothub_connection_string("device"))
        .gateway()
        .await
        .expect("gateway");
    let mut outcomes = Vec::new();
    for round in 0..4 {
        for i in 0..50 {
            let body = format!(r#"{{"device":{i},"round":{round}}}"#);
            outcomes.push(
                gateway
                    .send(&format!("sensor-{i}"), Event::new(body))
                    .await
                    .unwrap(),
            );
        }
    }
    for outcome in outcomes {
        outcome.await.expect("stored");
    }
    let stats = gateway.stats().await;
    assert_eq!((stats.connections, stats.devices), (1, 50), "{stats:?}");
    assert_eq!(hub.stats().connections_accepted, 1);
    for i in 0..50 {
        let stored = hub.iothub_messages(&format!("sensor-{i}"));
        assert_eq!(stored.len(), 4, "sensor-{i}");
        for (round, e) in stored.iter().enumerate() {
            assert_eq!(
                e.body,
                format!(r#"{{"device":{i},"round":{round}}}"#).into_bytes()
            );
        }
    }
    gateway.close().await.unwrap();
}

#[tokio::test]
async fn a_full_connection_makes_the_gateway_open_another() {
    let hub = hub(25).await;
    let gateway = builder(&hub, hub.iothub_connection_string("device"))
        .max_devices_per_connection(10)
        .gateway()
        .await
        .unwrap();
    for i in 0..25 {
        gateway
            .send(&format!("sensor-{i}"), Event::new("x"))
            .await
            .unwrap()
            .await
            .expect("stored");
    }
    let stats = gateway.stats().await;
    assert_eq!((stats.connections, stats.devices), (3, 25), "{stats:?}");
    assert_eq!(hub.stats().connections_accepted, 3);
}

#[tokio::test]
async fn a_refused_device_fails_alone() {
    let hub = hub(3).await;
    let gateway = builder(&hub, hub.iothub_connection_string("device"))
        .gateway()
        .await
        .unwrap();
    gateway
        .send("sensor-0", Event::new("before"))
        .await
        .unwrap()
        .await
        .unwrap();
    let err = gateway
        .send("not-registered", Event::new("x"))
        .await
        .expect_err("unknown device");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = gateway
        .send("bad/id", Event::new("x"))
        .await
        .expect_err("invalid id");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    for i in 0..3 {
        gateway
            .send(&format!("sensor-{i}"), Event::new("after"))
            .await
            .unwrap()
            .await
            .expect("the others keep sending");
    }
    assert_eq!(hub.iothub_messages("sensor-0").len(), 2);
}

#[tokio::test]
async fn device_tokens_are_refreshed_and_no_link_is_lost() {
    let hub = hub(5).await;
    let gateway = builder(&hub, hub.iothub_connection_string("device"))
        .options(ProducerOptions::new().token_lifetime(Duration::from_secs(2)))
        .gateway()
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        for i in 0..5 {
            gateway
                .send(&format!("sensor-{i}"), Event::new(format!("{sent}")))
                .await
                .unwrap()
                .await
                .expect("stored");
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Five devices, 2 s tokens over 5 s: each re-put about every second.
    assert!(
        hub.stats().put_tokens_accepted >= 5 * 4,
        "{:?}",
        hub.stats()
    );
    // No device's link was ever detached for an expired token and re-attached.
    assert_eq!(hub.stats().producer_links_attached, 5, "{:?}", hub.stats());
    for i in 0..5 {
        assert_eq!(hub.iothub_messages(&format!("sensor-{i}")).len(), sent);
    }
}

#[tokio::test]
async fn connection_strings_of_the_wrong_form_are_refused() {
    let hub = hub(1).await;
    let err = builder(&hub, hub.iothub_connection_string("device"))
        .device_sender()
        .await
        .expect_err("a policy string names no device");
    assert_eq!(err.kind(), ErrorKind::InvalidConnectionString);
    let err = builder(&hub, hub.iothub_device_connection_string("sensor-0"))
        .gateway()
        .await
        .expect_err("a device string is not a gateway's");
    assert_eq!(err.kind(), ErrorKind::InvalidConnectionString);
    assert!(DeviceSender::from_connection_string("HostName=x")
        .await
        .is_err());
    assert!(Gateway::from_connection_string("nonsense").await.is_err());
}
