//! The spool's IoT Hub sink against the test hub's IoT Hub mode over real sockets: records
//! routed to devices are sent as those devices, in order; records that can never be sent (an
//! unknown device, a route the sink cannot serve) are removed and counted failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hubsend::iothub::IotHubBuilder;
use hubsend::{BufferedOptions, Event, Producer};
use hubsend_spool::{
    DeviceOutcome, IotHubSender, IotHubSink, Route, Spool, SpoolOptions, SpooledProducer,
};
use hubsend_testhub::{HubConfig, TestHub};

const HOST: &str = "plant.azure-devices.net";
const KEY: &str = "c3Bvb2wtaW90LXRlc3Qta2V5LW5vdC1hLXNlY3JldC0wMQ==";

fn temp_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "hubsend-spool-iot-test-{}-{name}-{}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

fn reading(n: u64) -> Event {
    Event::new(format!(r#"{{"value":{n}}}"#))
}

fn values(hub: &TestHub, device: &str) -> Vec<u64> {
    hub.iothub_messages(device)
        .iter()
        .map(|e| {
            let body: serde_json::Value = serde_json::from_slice(&e.body).expect("JSON");
            body["value"].as_u64().expect("value")
        })
        .collect()
}

#[tokio::test]
async fn a_gateway_sink_sends_each_record_as_its_device_and_gives_up_what_cannot_be_sent() {
    let hub = TestHub::start(
        HubConfig::new()
            .iothub(HOST)
            .iot_device("d1", KEY)
            .iot_device("d2", KEY),
    )
    .await
    .expect("hub starts");
    let cs = hub.iothub_connection_string("iothubowner");
    let endpoint = format!("amqp://127.0.0.1:{}", hub.addr().port());
    let outcomes: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let seen = outcomes.clone();
    let sink = IotHubSink::new(move || {
        let builder = IotHubBuilder::default()
            .connection_string(cs.clone())
            .endpoint(endpoint.clone());
        async move { builder.gateway().await.map(IotHubSender::Gateway) }
    })
    .on_outcome(move |device, outcome| {
        let mut seen = seen.lock().unwrap();
        let entry = seen.entry(device.to_owned()).or_default();
        match outcome {
            DeviceOutcome::Sent => entry.0 += 1,
            DeviceOutcome::Failed(_) => entry.1 += 1,
            other => panic!("{device}: {other:?}"),
        }
    });
    let dir = temp_dir("gateway");
    let spool = Spool::open(&dir, SpoolOptions::new()).expect("spool opens");
    let producer = SpooledProducer::start_with_sink(spool, sink);
    for n in 0..6 {
        let device = if n % 2 == 0 { "d1" } else { "d2" };
        producer
            .enqueue(reading(n), Route::device(device, None))
            .await
            .expect("spooled");
    }
    // The hub does not know `ghost` (and nothing creates it); an Event Hubs route has no
    // device.
    for n in 6..8 {
        producer
            .enqueue(reading(n), Route::device("ghost", None))
            .await
            .expect("spooled");
    }
    producer
        .enqueue(reading(8), Route::partition_key("k"))
        .await
        .expect("spooled");
    producer
        .enqueue(reading(9), Route::device("d1", None))
        .await
        .expect("spooled");
    let report = producer.close().await;
    assert_eq!(
        (report.spooled, report.sent, report.failed, report.pending),
        (10, 7, 3, 0),
        "{report:?}"
    );
    assert_eq!(values(&hub, "d1"), [0, 2, 4, 9]);
    assert_eq!(values(&hub, "d2"), [1, 3, 5]);
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.get("d1"), Some(&(4, 0)));
    assert_eq!(outcomes.get("ghost"), Some(&(0, 2)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device record given to the Event Hubs sink is removed and counted failed; the rest goes.
#[tokio::test]
async fn the_event_hubs_sink_refuses_a_device_record() {
    let hub = TestHub::start(HubConfig::new()).await.expect("hub starts");
    let cs = hub.connection_string();
    let dir = temp_dir("event-hubs");
    let spool = Spool::open(&dir, SpoolOptions::new()).expect("spool opens");
    let producer = SpooledProducer::start(
        spool,
        move || Producer::builder().connection_string(cs.clone()).connect(),
        BufferedOptions::new(),
    );
    producer
        .enqueue(reading(1), Route::device("d1", Some("Boiler".into())))
        .await
        .expect("spooled");
    producer
        .enqueue(reading(2), Route::partition_key("k"))
        .await
        .expect("spooled");
    let report = producer.close().await;
    assert_eq!(
        (report.sent, report.failed, report.pending),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(hub.events("telemetry").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
