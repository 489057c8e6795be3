//! The IoT Hub registry client against the test hub's REST side, over real sockets.

use std::time::{Duration, Instant};

use hubsend::iothub::{EnsureOutcome, Registry};
use hubsend::ErrorKind;
use hubsend_testhub::iothub_http::{IotHubRest, IotHubState};

const HOST: &str = "testhub.azure-devices.net";

async fn start(limit: Option<u32>) -> IotHubRest {
    let state = IotHubState::new(HOST)
        .with_rate_limit(limit)
        .with_rate_window(Duration::from_secs(2));
    IotHubRest::start(state, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn registry(hub: &IotHubRest, policy: &str) -> Registry {
    Registry::builder(&hub.state().connection_string(policy).unwrap())
        .unwrap()
        .registry_url(hub.url())
        .danger_allow_http(true)
        .build()
        .unwrap()
}

#[tokio::test]
async fn create_then_exists_then_get() {
    let hub = start(None).await;
    let registry = registry(&hub, "iothubowner");
    assert_eq!(
        registry.create_device("dev#1").await.unwrap(),
        EnsureOutcome::Created
    );
    assert_eq!(
        registry.create_device("dev#1").await.unwrap(),
        EnsureOutcome::Existed
    );
    let device = registry.get_device("dev#1").await.unwrap();
    assert_eq!(device.device_id, "dev#1");
    assert_eq!(device.status, "enabled");
    assert!(!device.etag.is_empty());
    assert_eq!(hub.state().devices().len(), 1);
    assert_eq!(hub.state().counts().conflicts, 1);
    let err = registry.get_device("nobody").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("DeviceNotFound"), "{err}");
}

#[tokio::test]
async fn ensure_device_writes_the_name_exactly_once() {
    let hub = start(None).await;
    let registry = registry(&hub, "iothubowner");
    assert_eq!(
        registry
            .ensure_device("sensor-1", Some("Kitchen"))
            .await
            .unwrap(),
        EnsureOutcome::Created
    );
    assert_eq!(
        registry
            .ensure_device("sensor-1", Some("Renamed"))
            .await
            .unwrap(),
        EnsureOutcome::Existed
    );
    assert_eq!(hub.state().counts().twin_updates, 1);
    let twin = registry.get_twin("sensor-1").await.unwrap();
    assert_eq!(twin["properties"]["desired"]["deviceName"], "Kitchen");
    assert_eq!(
        hub.state().device("sensor-1").unwrap().desired["deviceName"],
        "Kitchen"
    );
}

#[tokio::test]
async fn a_bad_key_or_a_missing_right_is_unauthorized() {
    let hub = start(None).await;
    let wrong = hub
        .state()
        .connection_string("iothubowner")
        .unwrap()
        .rsplit_once("SharedAccessKey=")
        .map(|(head, _)| format!("{head}SharedAccessKey=d3Jvbmcta2V5LXdyb25nLWtleQ=="))
        .unwrap();
    let bad = Registry::builder(&wrong)
        .unwrap()
        .registry_url(hub.url())
        .danger_allow_http(true)
        .build()
        .unwrap();
    let err = bad.create_device("d").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(!err.to_string().contains("d3Jvbmc"), "{err}");
    // `registryRead` may read but not create: the error names the right.
    let read_only = registry(&hub, "registryRead");
    let err = read_only.create_device("d").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(err.to_string().contains("RegistryWrite"), "{err}");
    assert!(hub.state().devices().is_empty());
}

#[tokio::test]
async fn a_stale_etag_is_a_typed_error() {
    let hub = start(None).await;
    let registry = registry(&hub, "iothubowner");
    registry.create_device("d").await.unwrap();
    let twin = registry.get_twin("d").await.unwrap();
    let etag = twin["etag"].as_str().unwrap().to_owned();
    registry
        .update_twin_desired("d", serde_json::json!({"a": 1}), Some(&etag))
        .await
        .unwrap();
    let err = registry
        .update_twin_desired("d", serde_json::json!({"a": 2}), Some(&etag))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("PreconditionFailed"), "{err}");
    assert_eq!(hub.state().device("d").unwrap().desired["a"], 1);
}

#[tokio::test]
async fn throttling_is_waited_out() {
    // Two calls per 2 s window on the hub; the client retries after the Retry-After it sent.
    let hub = start(Some(2)).await;
    let registry = registry(&hub, "iothubowner");
    registry.create_device("a").await.unwrap();
    registry.create_device("b").await.unwrap();
    let started = Instant::now();
    let third = tokio::time::timeout(Duration::from_secs(20), registry.create_device("c")).await;
    assert_eq!(third.unwrap().unwrap(), EnsureOutcome::Created);
    assert!(hub.state().counts().throttled >= 1);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(hub.state().devices().len(), 3);
}

#[tokio::test]
async fn https_with_the_hubs_ca_and_refused_without_it() {
    let state = IotHubState::new(HOST);
    let hub = IotHubRest::start_tls(state, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let cs = hub.state().connection_string("iothubowner").unwrap();
    let trusted = Registry::builder(&cs)
        .unwrap()
        .registry_url(hub.url())
        .add_root_certificate_pem(hub.ca_pem().unwrap().as_bytes().to_vec())
        .build()
        .unwrap();
    assert_eq!(
        trusted.ensure_device("tls-1", Some("Roof")).await.unwrap(),
        EnsureOutcome::Created
    );
    let untrusted = Registry::builder(&cs)
        .unwrap()
        .registry_url(hub.url())
        .build()
        .unwrap();
    let err = untrusted.get_device("tls-1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    // Plain http is refused unless asked for.
    let err = Registry::builder(&cs)
        .unwrap()
        .registry_url("http://127.0.0.1:1")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
}

#[tokio::test]
async fn bulk_create_makes_hundreds_in_three_calls_with_names_and_per_device_outcomes() {
    let hub = start(None).await;
    let owner = registry(&hub, "iothubowner");
    owner.ensure_device("old-1", Some("Old")).await.unwrap();
    let ids: Vec<String> = (0..249).map(|i| format!("new-{i}")).collect();
    let names: Vec<String> = (0..249).map(|i| format!("Meter {i}")).collect();
    let mut list: Vec<(&str, Option<&str>)> = ids
        .iter()
        .zip(&names)
        .map(|(id, name)| (id.as_str(), Some(name.as_str())))
        .collect();
    list.push(("old-1", Some("Renamed")));
    list.push(("bad id/with slash", None));
    list.push(("new-0", Some("Meter 0"))); // a duplicate, sent once
    let before = hub.state().counts();
    let outcomes = owner.create_devices(&list).await.unwrap();
    assert_eq!(outcomes.len(), list.len());
    for (i, (id, outcome)) in outcomes.iter().enumerate() {
        assert_eq!(id, list[i].0);
        match id.as_str() {
            "old-1" => assert_eq!(outcome.as_ref().unwrap(), &EnsureOutcome::Existed),
            "bad id/with slash" => {
                let err = outcome.as_ref().unwrap_err();
                assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
                assert!(err.to_string().contains("bad id/with slash"), "{err}");
            }
            _ => assert_eq!(outcome.as_ref().unwrap(), &EnsureOutcome::Created, "{id}"),
        }
    }
    let counts = hub.state().counts();
    // 251 distinct ids: calls of 100, 100 and 51.
    assert_eq!(counts.bulk_calls - before.bulk_calls, 3);
    assert_eq!(counts.total - before.total, 3);
    assert_eq!(counts.created - before.created, 249);
    // Read back from the hub's store (the client's rate limit would make 249 reads slow).
    for (id, name) in ids.iter().zip(&names) {
        let device = hub.state().device(id).expect("created");
        assert_eq!(device.desired["deviceName"], name.as_str());
    }
    let old = owner.get_twin("old-1").await.unwrap();
    assert_eq!(old["properties"]["desired"]["deviceName"], "Old");
    assert!(hub.state().device("bad id/with slash").is_none());

    // Without RegistryWrite every device of the call fails with a typed error.
    let read_only = registry(&hub, "registryRead");
    let outcomes = read_only
        .create_devices(&[("x-1", None), ("x-2", None)])
        .await
        .unwrap();
    for (_, outcome) in outcomes {
        let err = outcome.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized);
        assert!(err.to_string().contains("RegistryWrite"), "{err}");
    }
}
