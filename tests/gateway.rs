//! The IoT Hub gateway against the test hub's IoT Hub mode over real sockets, with the
//! registry REST server on the same device store: devices created over REST send at once,
//! disabled and deleted devices are refused alone, the per-connection token cap, and the
//! gateway's own auto-create, name sync, idle close and sharding (feature `registry`).

mod support;

use hubsend::iothub::{EnsureOutcome, IotHubBuilder, Registry};
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

fn config() -> HubConfig {
    HubConfig::new().iothub(HOST)
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
    gateway
        .send("Dev-A", Event::new("via gateway"))
        .await
        .unwrap()
        .await
        .expect("stored");
    // Disabled: its open link's next delivery is refused, and it cannot connect again.
    assert!(iot.state().set_device_enabled("Dev-A", false));
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
async fn the_token_cap_refuses_the_put_token_past_it() {
    let iot = Iot::start(config().iot_token_cap(3)).await;
    for i in 0..4 {
        iot.state().add_device(format!("c-{i}"), POLICY_KEY);
    }
    let gateway = iot
        .builder(iot.hub.iothub_connection_string("device"))
        .max_devices_per_connection(10)
        .gateway()
        .await
        .unwrap();
    for i in 0..3 {
        gateway
            .send(&format!("c-{i}"), Event::new("x"))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A fourth device token on that connection is refused with IoT Hub's 403005.
    let err = gateway.send("c-3", Event::new("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(
        err.to_string().contains("IotHubMaxCbsTokenExceeded"),
        "{err}"
    );
    for i in 0..3 {
        gateway
            .send(&format!("c-{i}"), Event::new("y"))
            .await
            .unwrap()
            .await
            .expect("the first three keep sending");
    }
    assert_eq!(iot.hub.stats().put_tokens_rejected, 1);
}
