//! The IoT Hub gateway against the test hub's IoT Hub mode over real sockets, with the
//! registry REST server on the same device store: devices created over REST send at once,
//! disabled and deleted devices are refused alone, the per-connection token cap, and the
//! gateway's own auto-create, name sync, idle close and sharding (feature `registry`).

mod support;

use std::time::Duration;

use hubsend::iothub::{AutoCreate, DeviceState, EnsureOutcome, Gateway, IotHubBuilder, Registry};
use hubsend::{ErrorKind, Event};
use hubsend_testhub::iothub_http::{IotHubRest, IotHubState};
use hubsend_testhub::{HubConfig, Right, TestHub};

const HOST: &str = "plant.azure-devices.net";
const POLICY_KEY: &str = "cG9saWN5LWtleS1mb3ItdGhlLWdhdGV3YXktdGVzdHM=";

/// A hub in IoT Hub mode with its REST registry on the same store.
struct Iot {
    hub: TestHub,
    rest: IotHubRest,
}

impl Iot {
    async fn start(config: HubConfig) -> Iot {
        let hub = support::start(config).await;
        let state = hub.iothub_state().expect("IoT Hub mode");
        let rest = IotHubRest::start(state, "127.0.0.1:0".parse().unwrap())
            .await
            .expect("rest starts");
        Iot { hub, rest }
    }

    fn state(&self) -> IotHubState {
        self.hub.iothub_state().unwrap()
    }

    fn builder(&self, connection_string: String) -> IotHubBuilder {
        IotHubBuilder::default()
            .connection_string(connection_string)
            .port(self.hub.addr().port())
            .danger_plaintext(true)
    }

    fn registry(&self, policy: &str) -> Registry {
        Registry::builder(&self.hub.iothub_connection_string(policy))
            .unwrap()
            .registry_url(self.rest.url())
            .danger_allow_http(true)
            .build()
            .unwrap()
    }
}

/// Sends `body` as `device_id` and waits until the hub stored it.
async fn stored(gateway: &Gateway, device_id: &str, body: impl Into<Vec<u8>>) {
    gateway
        .send(device_id, Event::new(body.into()))
        .await
        .unwrap_or_else(|e| panic!("{device_id}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("{device_id} not stored: {e}"));
}

fn config() -> HubConfig {
    HubConfig::new().iothub(HOST)
}

/// [`config`] with devices `{prefix}0` … `{prefix}{n-1}` registered, each keyed with
/// `POLICY_KEY`.
fn with_devices(prefix: &str, n: usize) -> HubConfig {
    (0..n).fold(config(), |config, i| {
        config.iot_device(format!("{prefix}{i}"), POLICY_KEY)
    })
}

#[tokio::test]
async fn a_device_created_over_rest_sends_and_disabled_or_deleted_is_refused() {
    let iot = Iot::start(config()).await;
    let registry = iot.registry("iothubowner");
    assert_eq!(
        registry.create_device("Dev-A").await.unwrap(),
        EnsureOutcome::Created
    );
    // Its REST-generated key signs its device token on the AMQP side.
    let cs = iot.hub.iothub_device_connection_string("Dev-A");
    let device = iot
        .builder(cs.clone())
        .device_sender()
        .await
        .expect("connects");
    device
        .send(Event::new("hello"))
        .await
        .unwrap()
        .await
        .expect("stored");
    assert_eq!(iot.hub.iothub_messages("Dev-A")[0].body, b"hello");
    // Ids are case-sensitive: `dev-a` is another, unknown device.
    assert!(iot.hub.iothub_messages("dev-a").is_empty());
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("device"))
        .gateway()
        .await
        .unwrap();
    let err = gateway
        .send("dev-a", Event::new("x"))
        .await
        .expect_err("unknown");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    stored(&gateway, "Dev-A", "via gateway").await;
    // Disabled: the hub detaches its two live links (the device sender's and the gateway's),
    // their next delivery is refused, and it cannot connect again.
    assert!(iot.state().set_device_enabled("Dev-A", false));
    let stats = iot
        .hub
        .wait_for_stats(|s| s.device_links_detached == 2, Duration::from_secs(10))
        .await;
    assert_eq!(stats.device_links_detached, 2);
    let err = device
        .send(Event::new("after disable"))
        .await
        .unwrap()
        .await
        .expect_err("disabled");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = iot.builder(cs.clone()).device_sender().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert_eq!(iot.hub.iothub_messages("Dev-A").len(), 2);
    // Enabled again, then deleted: gone for the registry and the AMQP side alike.
    assert!(iot.state().set_device_enabled("Dev-A", true));
    let again = iot
        .builder(cs.clone())
        .device_sender()
        .await
        .expect("enabled");
    again.send(Event::new("back")).await.unwrap().await.unwrap();
    assert!(iot.state().remove_device("Dev-A"));
    let stats = iot
        .hub
        .wait_for_stats(|s| s.device_links_detached == 3, Duration::from_secs(10))
        .await;
    assert_eq!(stats.device_links_detached, 3);
    let err = registry.get_device("Dev-A").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = again
        .send(Event::new("after delete"))
        .await
        .unwrap()
        .await
        .expect_err("deleted");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(iot.hub.iothub_messages("Dev-A").len(), 3);
}

#[tokio::test]
async fn devices_registered_up_front_are_in_the_rest_registry() {
    let key = "c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA==";
    let iot = Iot::start(config().iot_device("pre-1", key)).await;
    let device = iot
        .registry("registryRead")
        .get_device("pre-1")
        .await
        .unwrap();
    assert_eq!(device.status, "enabled");
    assert_eq!(iot.state().device_key("pre-1").as_deref(), Some(key));
}

#[tokio::test]
async fn a_policy_without_device_connect_cannot_send() {
    let iot = Iot::start(config().iot_device("d1", POLICY_KEY).policy(
        "svc",
        POLICY_KEY,
        &[Right::ServiceConnect, Right::RegistryRead],
    ))
    .await;
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("svc"))
        .gateway()
        .await
        .unwrap();
    let err = gateway.send("d1", Event::new("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(err.to_string().contains("DeviceConnect"), "{err}");
    assert!(iot.hub.iothub_messages("d1").is_empty());
}

#[tokio::test]
async fn past_the_token_cap_devices_shard_over_more_connections() {
    // The hub takes 3 tokens per connection; the gateway would put 10 devices on one.
    let iot = Iot::start(config().iot_token_cap(3)).await;
    for i in 0..10 {
        iot.state().add_device(format!("c-{i}"), POLICY_KEY);
    }
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("device"))
        .max_devices_per_connection(10)
        .gateway()
        .await
        .unwrap();
    for round in 0..2 {
        for i in 0..10 {
            stored(&gateway, &format!("c-{i}"), format!("{round}")).await;
        }
    }
    let stats = gateway.stats().await;
    assert_eq!((stats.connections, stats.devices), (4, 10), "{stats:?}");
    assert_eq!(stats.devices_refused, 0, "{stats:?}");
    // Each full connection refused one put-token with 403005, then took no more devices.
    assert_eq!(iot.hub.stats().put_tokens_rejected, 3);
    for i in 0..10 {
        assert_eq!(iot.hub.iothub_messages(&format!("c-{i}")).len(), 2, "c-{i}");
    }
}

/// A registry on the hub's REST side for `policy`, with a rate that does not slow tests.
fn fast_registry(iot: &Iot, policy: &str) -> Registry {
    Registry::builder(&iot.hub.iothub_connection_string(policy))
        .unwrap()
        .registry_url(iot.rest.url())
        .danger_allow_http(true)
        .operations_per_minute(60_000)
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_gateway_creates_unknown_devices_and_writes_each_name_once() {
    const DEVICES: usize = 60;
    let iot = Iot::start(config().iot_registry_rate_limit(1000, Duration::from_secs(60))).await;
    // `iothubowner`: registry read/write, service connect and device connect in one policy.
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("iothubowner"))
        .auto_create(fast_registry(&iot, "iothubowner"), AutoCreate::OnNotFound)
        .gateway()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("Particle-{i:02}");
            let name = format!("kitchen sensor {i}");
            let mut outcomes = Vec::new();
            for n in 0..3 {
                let body = format!(r#"{{"device":{i},"n":{n}}}"#);
                outcomes.push(
                    gateway
                        .send_named(&id, Some(&name), Event::new(body))
                        .await
                        .expect("queued"),
                );
            }
            for outcome in outcomes {
                outcome.await.expect("stored");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = gateway.stats().await;
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert_eq!(stats.devices_created, DEVICES as u64, "{stats:?}");
    assert_eq!(stats.names_written, DEVICES as u64, "{stats:?}");
    let counts = iot.state().counts();
    assert_eq!(counts.created, DEVICES as u64);
    assert_eq!(counts.twin_updates, DEVICES as u64);
    for i in 0..DEVICES {
        let id = format!("Particle-{i:02}");
        let device = iot.state().device(&id).expect("created");
        assert_eq!(device.desired["deviceName"], format!("kitchen sensor {i}"));
        let stored = iot.hub.iothub_messages(&id);
        assert_eq!(stored.len(), 3, "{id}");
        for (n, e) in stored.iter().enumerate() {
            assert_eq!(e.body, format!(r#"{{"device":{i},"n":{n}}}"#).into_bytes());
        }
    }
    gateway.close().await.unwrap();

    // A restarted gateway, checking every device before its first use, renames nothing.
    let restarted = iot
        .builder(iot.hub.iothub_connection_string("iothubowner"))
        .auto_create(
            fast_registry(&iot, "iothubowner"),
            AutoCreate::BeforeFirstUse,
        )
        .gateway()
        .await
        .unwrap();
    for i in 0..DEVICES {
        restarted
            .send_named(
                &format!("Particle-{i:02}"),
                Some("renamed"),
                Event::new("again"),
            )
            .await
            .unwrap()
            .await
            .expect("stored");
    }
    let stats = restarted.stats().await;
    assert_eq!(
        (stats.devices_created, stats.names_written),
        (0, 0),
        "{stats:?}"
    );
    let counts = iot.state().counts();
    assert_eq!(counts.twin_updates, DEVICES as u64, "no name written twice");
    assert_eq!(
        counts.conflicts, DEVICES as u64,
        "each existing device answered 409"
    );
    assert_eq!(
        iot.state().device("Particle-07").unwrap().desired["deviceName"],
        "kitchen sensor 7"
    );
    assert_eq!(iot.hub.iothub_messages("Particle-07").len(), 4);
}

#[tokio::test]
async fn without_registry_rights_only_the_unknown_devices_fail() {
    let iot = Iot::start(config().iot_device("known-1", POLICY_KEY).policy(
        "gw",
        POLICY_KEY,
        &[Right::DeviceConnect, Right::ServiceConnect],
    ))
    .await;
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("gw"))
        .auto_create(fast_registry(&iot, "gw"), AutoCreate::OnNotFound)
        .gateway()
        .await
        .unwrap();
    stored(&gateway, "known-1", "a").await;
    let err = gateway
        .send_named("new-1", Some("n"), Event::new("x"))
        .await
        .expect_err("cannot be created");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(err.to_string().contains("RegistryWrite"), "{err}");
    assert!(matches!(
        gateway.device_state("new-1").await,
        Some(DeviceState::Refused(e)) if e.kind() == ErrorKind::Unauthorized
    ));
    // The refusal is answered locally: no second registry call.
    let calls = iot.state().counts().total;
    let again = gateway.send("new-1", Event::new("x")).await.unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Unauthorized);
    assert_eq!(iot.state().counts().total, calls);
    stored(&gateway, "known-1", "b").await;
    assert_eq!(iot.hub.iothub_messages("known-1").len(), 2);
    assert!(iot.state().device("new-1").is_none());
    let stats = gateway.stats().await;
    assert_eq!((stats.devices, stats.devices_refused), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn a_disabled_device_fails_alone_while_the_others_keep_sending() {
    let iot = Iot::start(with_devices("d", 5)).await;
    iot.state().set_device_enabled("d2", false);
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("iothubowner"))
        .auto_create(fast_registry(&iot, "iothubowner"), AutoCreate::OnNotFound)
        .refused_retry_after(Duration::ZERO)
        .gateway()
        .await
        .unwrap();
    for round in 0..3 {
        for i in 0..5 {
            let sent = gateway
                .send(&format!("d{i}"), Event::new(format!("{round}")))
                .await;
            if i == 2 {
                let err = sent.expect_err("disabled");
                assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
            } else {
                sent.unwrap().await.expect("stored");
            }
        }
    }
    assert!(iot.hub.iothub_messages("d2").is_empty());
    for i in [0, 1, 3, 4] {
        assert_eq!(iot.hub.iothub_messages(&format!("d{i}")).len(), 3);
    }
    let stats = gateway.stats().await;
    // The disabled device holds no slot; it was never re-created (409 each try).
    assert_eq!((stats.devices, stats.devices_created), (4, 0), "{stats:?}");
    assert_eq!(iot.state().counts().conflicts, 3);
    // Enabled again, it sends.
    iot.state().set_device_enabled("d2", true);
    stored(&gateway, "d2", "back").await;
}

#[tokio::test]
async fn idle_device_links_are_closed_and_attached_again_on_use() {
    let iot = Iot::start(with_devices("i", 3)).await;
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("device"))
        .idle_timeout(Some(Duration::from_millis(200)))
        .gateway()
        .await
        .unwrap();
    for i in 0..3 {
        stored(&gateway, &format!("i{i}"), "first").await;
    }
    assert_eq!(iot.hub.stats().producer_links_attached, 3);
    // Wait (bounded) for the gateway to close the three idle links.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stats = gateway.stats().await;
            if stats.idle_closed == 3 {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("idle links closed");
    assert_eq!(closed.devices, 0, "{closed:?}");
    assert!(matches!(
        gateway.device_state("i0").await,
        Some(DeviceState::Idle)
    ));
    for i in 0..3 {
        stored(&gateway, &format!("i{i}"), "second").await;
    }
    // Each device is open again, or (on a slow machine, 200 ms after its send) closed again.
    let stats = gateway.stats().await;
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert_eq!(
        stats.devices as u64 + (stats.idle_closed - 3),
        3,
        "every device attached again: {stats:?}"
    );
    assert_eq!(iot.hub.stats().producer_links_attached, 6);
    for i in 0..3 {
        let stored = iot.hub.iothub_messages(&format!("i{i}"));
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[1].body, b"second");
    }
}

#[tokio::test]
async fn a_throttled_registry_is_waited_out_and_every_device_still_sends() {
    // The registry answers 429 past 3 calls a second; 8 new devices arriving one after the
    // other (so each is created alone, not in a bulk call) need 16 calls.
    let iot = Iot::start(config().iot_registry_rate_limit(3, Duration::from_secs(1))).await;
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("iothubowner"))
        .auto_create(fast_registry(&iot, "iothubowner"), AutoCreate::OnNotFound)
        .registry_concurrency(2)
        .gateway()
        .await
        .unwrap();
    for i in 0..8 {
        let id = format!("t{i}");
        gateway
            .send_named(&id, Some(&format!("name {i}")), Event::new("x"))
            .await
            .expect("queued")
            .await
            .expect("created and stored despite 429s");
    }
    let counts = iot.state().counts();
    assert!(counts.throttled >= 1, "{counts:?}");
    assert_eq!((counts.created, counts.twin_updates), (8, 8), "{counts:?}");
    for i in 0..8 {
        assert_eq!(iot.hub.iothub_messages(&format!("t{i}")).len(), 1);
        assert_eq!(
            iot.state().device(&format!("t{i}")).unwrap().desired["deviceName"],
            format!("name {i}")
        );
    }
}

#[tokio::test]
async fn concurrent_first_sends_of_one_new_device_create_it_once() {
    let iot = Iot::start(config()).await;
    for (n, when) in [AutoCreate::OnNotFound, AutoCreate::BeforeFirstUse]
        .into_iter()
        .enumerate()
    {
        let gateway = iot
            .builder(iot.hub.iothub_connection_string("iothubowner"))
            .auto_create(fast_registry(&iot, "iothubowner"), when)
            .gateway()
            .await
            .unwrap();
        let id = format!("shared-new-{n}");
        let sends = (0..20).map(|i| {
            let (gateway, id) = (gateway.clone(), id.clone());
            tokio::spawn(async move {
                let name = format!("name {i}");
                gateway
                    .send_named(&id, Some(&name), Event::new(format!("{i}")))
                    .await?
                    .await
            })
        });
        for send in futures_util::future::join_all(sends).await {
            send.unwrap().expect("stored");
        }
        let counts = iot.state().counts();
        // One create and one name write per device, no 409: the other sends waited.
        let created = n as u64 + 1;
        assert_eq!(
            (counts.created, counts.conflicts, counts.twin_updates),
            (created, 0, created),
            "{when:?}: {counts:?}"
        );
        assert_eq!(iot.hub.iothub_messages(&id).len(), 20);
    }
}

#[tokio::test]
async fn every_d2c_message_is_on_the_builtin_endpoint_under_its_device() {
    let iot = Iot::start(config()).await;
    let devices = ["north-1", "North-1", "south:2"];
    for d in devices {
        iot.state().add_device(d, POLICY_KEY);
    }
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("device"))
        .gateway()
        .await
        .unwrap();
    for i in 0..4 {
        for d in devices {
            let event = Event::new(format!("{d}/{i}"))
                .with_content_type("application/json")
                .with_message_id(format!("{d}-{i}"))
                .with_property("n", i.to_string());
            gateway.send(d, event).await.unwrap().await.unwrap();
        }
    }
    // A batch counts one event per message on the built-in endpoint.
    let mut batch = gateway.create_batch("south:2").await.unwrap();
    for i in 4..7 {
        batch
            .try_add(Event::new(format!("south:2/{i}")))
            .expect("fits");
    }
    gateway
        .send_batch("south:2", batch)
        .await
        .unwrap()
        .await
        .unwrap();
    let events = iot.hub.iothub_builtin_events();
    assert_eq!(events.len(), 15);
    for d in devices {
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.iothub_device_id.as_deref() == Some(d))
            .collect();
        let want = if d == "south:2" { 7 } else { 4 };
        assert_eq!(mine.len(), want, "{d}");
        // One partition per device, the one its id hashes to, in send order.
        let partition = iot.hub.partition_for_key("plant", d);
        for (i, e) in mine.iter().enumerate() {
            assert_eq!(e.partition, partition, "{d}");
            assert_eq!(e.body, format!("{d}/{i}").into_bytes());
            if i < 4 {
                assert_eq!(e.message_id.as_deref(), Some(format!("{d}-{i}").as_str()));
                assert_eq!(e.application_properties["n"], i.to_string());
                assert_eq!(e.content_type.as_deref(), Some("application/json"));
            }
        }
    }
    // Readable with the `service` policy's Event Hubs connection string, not outside IoT mode.
    let cs = iot.hub.iothub_builtin_connection_string("service").unwrap();
    assert!(cs.contains("SharedAccessKeyName=service;") && cs.contains("EntityPath=plant"));
}

/// Sends one message as each of `ids` in order; returns each device's connection.
async fn placements(gateway: &Gateway, ids: &[String]) -> Vec<usize> {
    let mut out = Vec::new();
    for id in ids {
        stored(gateway, id, "x").await;
        match gateway.device_state(id).await {
            Some(DeviceState::Active { connection }) => out.push(connection),
            other => panic!("{id}: {other:?}"),
        }
    }
    out
}

/// Waits (bounded) until the gateway has closed every device link for idleness.
async fn all_idle(gateway: &Gateway) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while gateway.stats().await.devices > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("idle links closed");
}

#[tokio::test]
async fn past_the_per_connection_limit_devices_shard_by_a_stable_hash_of_their_id() {
    let iot = Iot::start(config()).await;
    let fillers: Vec<String> = (0..12).map(|i| format!("fill-{i}")).collect();
    let fleet: Vec<String> = (0..6).map(|i| format!("meter-{i}")).collect();
    for id in fillers.iter().chain(&fleet) {
        iot.state().add_device(id.clone(), POLICY_KEY);
    }
    let mut seen = Vec::new();
    for reversed in [false, true] {
        let gateway = iot
            .builder(iot.hub.iothub_connection_string("device"))
            .max_devices_per_connection(4)
            .idle_timeout(Some(Duration::from_secs(2)))
            .gateway()
            .await
            .unwrap();
        // 12 devices fill three connections of 4; then all go idle, the connections stay.
        let filled = placements(&gateway, &fillers).await;
        assert_eq!(gateway.stats().await.connections, 3);
        assert!(filled.iter().all(|&c| c < 3));
        all_idle(&gateway).await;
        // The fleet arrives in another order in the second gateway; with room everywhere
        // each id goes where its hash says, not to the first connection with room.
        let mut order = fleet.clone();
        if reversed {
            order.reverse();
        }
        let mut placed = placements(&gateway, &order).await;
        if reversed {
            placed.reverse();
        }
        assert_eq!(gateway.stats().await.connections, 3);
        seen.push(placed);
        gateway.close().await.unwrap();
    }
    assert_eq!(seen[0], seen[1], "placement depends on arrival order");
    let used: std::collections::BTreeSet<_> = seen[0].iter().collect();
    assert!(
        used.len() > 1,
        "every device on one connection: {:?}",
        seen[0]
    );
    for id in &fleet {
        assert_eq!(iot.hub.iothub_messages(id).len(), 2, "{id}");
    }
}

#[tokio::test]
async fn many_unknown_devices_at_once_are_created_with_bulk_calls() {
    const DEVICES: usize = 150;
    // One registry call at a time, each answered after 250 ms: whatever devices arrive while
    // a call is out queue up and go together in the next, however slowly the machine lets
    // them arrive.
    let iot = Iot::start(config().iot_registry_delay(Duration::from_millis(250))).await;
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("iothubowner"))
        .auto_create(fast_registry(&iot, "iothubowner"), AutoCreate::OnNotFound)
        .registry_concurrency(1)
        .gateway()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("fleet-{i:03}");
            gateway
                .send_named(&id, Some(&format!("Unit {i}")), Event::new(id.clone()))
                .await
                .expect("queued")
                .await
                .expect("stored");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = gateway.stats().await;
    assert_eq!(
        (stats.devices_created, stats.names_written),
        (DEVICES as u64, DEVICES as u64),
        "{stats:?}"
    );
    let counts = iot.state().counts();
    assert_eq!(counts.created, DEVICES as u64);
    // One create and one name write per device would be 300 calls; bulk calls carry many
    // devices with their names.
    assert!(counts.bulk_calls >= 1, "{counts:?}");
    assert!(counts.total < DEVICES as u64, "{counts:?}");
    for i in 0..DEVICES {
        let id = format!("fleet-{i:03}");
        let device = iot.state().device(&id).expect("created");
        assert_eq!(device.desired["deviceName"], format!("Unit {i}"));
        assert_eq!(iot.hub.iothub_messages(&id).len(), 1, "{id}");
    }
}

/// `DELETE /devices/{id}` on the test hub's registry REST server, as a service client sends
/// it (a policy SAS for the hub host, signed here with the base64-decoded `iothubowner` key);
/// the HTTP status.
async fn delete_over_rest(iot: &Iot, device_id: &str) -> u16 {
    use base64::Engine as _;
    use hmac::Mac as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let key = iot.state().policy("iothubowner").unwrap().key.clone();
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap();
    let se = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let sr = enc(HOST);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let request = format!(
        "DELETE /devices/{}?api-version=2021-04-12 HTTP/1.1\r\nHost: {HOST}\r\n\
         Authorization: SharedAccessSignature sr={sr}&sig={}&se={se}&skn=iothubowner\r\n\
         If-Match: \"*\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        enc(device_id),
        enc(&sig)
    );
    let mut stream = tokio::net::TcpStream::connect(iot.rest.addr())
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

/// What one device's stream saw: each send's body and outcome, in order, and whether it was
/// submitted after the device's deletion had been answered.
type Outcomes = Vec<(String, bool, hubsend::Result<()>)>;

/// Streams as `device_id` with at most `window` sends unresolved, until it has tried at least
/// `total` sends and `after` of them since `deleted` was set (once the victim's deletion was
/// answered); every send is resolved before it returns.
async fn stream(
    gateway: Gateway,
    device_id: String,
    window: usize,
    deleted: tokio::sync::watch::Receiver<bool>,
    (total, after): (usize, usize),
) -> Outcomes {
    let mut outcomes: Outcomes = Vec::new();
    let mut waiting = std::collections::VecDeque::new();
    let mut tried_after = 0;
    for n in 0..20_000 {
        let late = *deleted.borrow();
        if n >= total && tried_after >= after {
            break;
        }
        tried_after += usize::from(late);
        let body = format!("{device_id}-{n}");
        let index = outcomes.len();
        outcomes.push((body.clone(), late, Ok(())));
        match gateway.send(&device_id, Event::new(body)).await {
            Ok(outcome) => waiting.push_back((index, outcome)),
            Err(e) => outcomes[index].2 = Err(e),
        }
        if waiting.len() >= window {
            let (index, outcome) = waiting.pop_front().unwrap();
            outcomes[index].2 = outcome.await;
        }
    }
    for (index, outcome) in waiting {
        outcomes[index].2 = outcome.await;
    }
    outcomes
}

#[tokio::test]
async fn a_device_deleted_through_the_registry_mid_stream_fails_alone_and_nothing_is_lost() {
    let iot = Iot::start(with_devices("s", 4)).await;
    // No auto-create: the deleted device must stay deleted.
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("device"))
        .gateway()
        .await
        .unwrap();
    let (deleted_tx, deleted) = tokio::sync::watch::channel(false);
    let mut streams = Vec::new();
    for i in 0..4 {
        let id = format!("s{i}");
        let rx = deleted.clone();
        // The victim streams on until 20 sends after its deletion have been tried; the
        // others stream across the deletion, 40 sends after it (at least 100 in all).
        let until = if i == 1 { (0, 20) } else { (100, 40) };
        streams.push(tokio::spawn(stream(gateway.clone(), id, 8, rx, until)));
    }
    // Mid-stream: once the hub stored 10 of s1's messages (its link is live, more are in
    // flight), s1 is deleted through the registry REST API.
    iot.hub
        .wait_for_iothub_messages("s1", 10, Duration::from_secs(30))
        .await;
    assert_eq!(delete_over_rest(&iot, "s1").await, 204);
    deleted_tx.send_replace(true);
    let mut results = Vec::new();
    for s in streams {
        results.push(s.await.unwrap());
    }
    // The hub detached s1's live link (and only that one).
    assert_eq!(iot.hub.stats().device_links_detached, 1);

    let victim = &results[1];
    let stored: Vec<Vec<u8>> = iot
        .hub
        .iothub_messages("s1")
        .into_iter()
        .map(|e| e.body)
        .collect();
    let succeeded: Vec<Vec<u8>> = victim
        .iter()
        .filter(|(_, _, r)| r.is_ok())
        .map(|(b, _, _)| b.clone().into_bytes())
        .collect();
    // Not lost silently: what was reported sent is exactly what the hub stored, in order.
    assert_eq!(succeeded, stored);
    assert!(stored.len() >= 10);
    for (body, late, result) in victim {
        match result {
            // Every failure is the typed not-found, also for what was in flight at the detach.
            Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{body}: {e}"),
            // Nothing submitted after the deletion was answered is accepted.
            Ok(()) => assert!(!late, "{body} was accepted after the deletion"),
        }
    }
    assert_eq!(victim.iter().filter(|(_, late, _)| *late).count(), 20);
    assert!(matches!(
        gateway.device_state("s1").await,
        Some(DeviceState::Refused(e)) if e.kind() == ErrorKind::NotFound
    ));
    // The others went on: every send accepted and stored once, in order.
    for i in [0, 2, 3] {
        let sent = &results[i];
        assert!(sent.iter().filter(|(_, late, _)| *late).count() >= 40);
        let bodies: Vec<Vec<u8>> = sent
            .iter()
            .map(|(body, _, result)| {
                assert!(result.is_ok(), "{body}: {result:?}");
                body.clone().into_bytes()
            })
            .collect();
        let stored: Vec<Vec<u8>> = iot
            .hub
            .iothub_messages(&format!("s{i}"))
            .into_iter()
            .map(|e| e.body)
            .collect();
        assert_eq!(bodies, stored, "s{i}");
    }
    let stats = gateway.stats().await;
    assert_eq!((stats.devices, stats.in_flight), (3, 0), "{stats:?}");
}

#[tokio::test]
async fn a_message_over_256_kb_is_refused_by_the_gateway_before_sending() {
    // The hub would take up to 1 MiB, so only the gateway's own check can refuse.
    let iot = Iot::start(
        config()
            .iot_device("big-1", POLICY_KEY)
            .max_message_size(1024 * 1024),
    )
    .await;
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("device"))
        .gateway()
        .await
        .unwrap();
    stored(&gateway, "big-1", "small first").await;
    let transfers = iot.hub.stats().transfers_received;
    let err = gateway
        .send("big-1", Event::new(vec![b'x'; 300 * 1024]))
        .await
        .expect_err("too large");
    assert_eq!(err.kind(), ErrorKind::MessageTooLarge, "{err}");
    let mut batch = gateway.create_batch("big-1").await.unwrap();
    assert!(matches!(
        batch.try_add(Event::new(vec![b'y'; 300 * 1024])),
        Err(hubsend::TryAddError::TooLarge(_))
    ));
    let mut added = 0;
    while batch.try_add(Event::new(vec![b'z'; 10 * 1024])).is_ok() {
        added += 1;
    }
    assert!(batch.size_in_bytes() <= 256 * 1024);
    assert!((24..=25).contains(&added), "{added}");
    // Nothing reached the hub; the device still sends, its full batch accepted.
    assert_eq!(iot.hub.stats().transfers_received, transfers);
    gateway
        .send_batch("big-1", batch)
        .await
        .unwrap()
        .await
        .expect("stored");
    assert_eq!(iot.hub.iothub_messages("big-1").len(), 1 + added);
}
