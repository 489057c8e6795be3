//! End-to-end tests of `hubsend iot send`: the real binary against a test hub in IoT Hub mode
//! (AMQP and the registry REST side on one device store) running in this process.

use std::process::{Command, Stdio};

use hubsend_testhub::iothub_http::IotHubRest;
use hubsend_testhub::{HubConfig, Right, TestHub};
use serde_json::Value;

const HOST: &str = "plant.azure-devices.net";
const KEY: &str = "cG9saWN5LWtleS1mb3ItdGhlLWNsaS1pb3QtdGVzdHM=";

struct Iot {
    hub: TestHub,
    rest: IotHubRest,
}

async fn start(config: HubConfig) -> Iot {
    let hub = TestHub::start(config).await.expect("hub starts");
    let state = hub.iothub_state().expect("IoT Hub mode");
    let rest = IotHubRest::start(state, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("registry starts");
    Iot { hub, rest }
}

impl Iot {
    /// `--endpoint` to this hub (plain AMQP on loopback) and `--registry-url`.
    fn endpoints(&self) -> Vec<String> {
        vec![
            "--endpoint".into(),
            format!("amqp://127.0.0.1:{}", self.hub.addr().port()),
            "--registry-url".into(),
            self.rest.url(),
        ]
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        let last = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("`{last}` is not JSON ({e}); stderr:\n{}", self.stderr))
    }
}

/// Runs `hubsend iot send ARGS` with `cs` as $IOTHUB_CONNECTION_STRING and `input` on stdin,
/// off the runtime so the hub keeps serving.
async fn iot_send(cs: &str, args: Vec<String>, input: String) -> Run {
    let cs = cs.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hubsend"))
            .args(["iot", "send"])
            .args(&args)
            .env("IOTHUB_CONNECTION_STRING", cs)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hubsend");
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()));
        child.wait_with_output().expect("wait")
    })
    .await
    .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn record(device: Option<&str>, name: &str, n: u32) -> String {
    let mut v = serde_json::json!({
        "sensor_id": "temp", "timestamp": "2026-01-01T00:00:00Z", "value": n, "name": name,
    });
    if let Some(d) = device {
        v["device"] = d.into();
    }
    v.to_string()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_gateway_sends_each_record_as_its_device_creating_and_naming_new_ones() {
    let iot = start(HubConfig::new().iothub(HOST).iot_device("known", KEY)).await;
    let mut lines = Vec::new();
    for n in 0..4 {
        lines.push(record(Some("known"), "Known one", n));
        lines.push(record(Some("new-a"), "Boiler A", n));
        lines.push(record(Some("new-b"), "Boiler B", n));
    }
    lines.push(record(None, "nobody", 9)); // line 13: no device id
    lines.push(record(Some(""), "empty", 9)); // line 14: an empty one
    let input = lines.join("\n") + "\n";
    let mut a = args(&[
        "--device-field",
        "device",
        "--create-devices",
        "--device-name-field",
        "name",
        "--json",
    ]);
    a.extend(iot.endpoints());
    let cs = iot.hub.iothub_connection_string("iothubowner");
    let run = iot_send(&cs, a.clone(), input.clone()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("line 13: missing or empty device id field `device`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("line 14:"), "{}", run.stderr);
    let j = run.json();
    assert_eq!(
        (
            j["sent"].as_u64(),
            j["rejected"].as_u64(),
            j["failed"].as_u64()
        ),
        (Some(12), Some(2), Some(0))
    );
    assert_eq!(j["devices_created"], 2);
    assert_eq!(j["names_written"], 2);
    assert_eq!(j["connections"], 1);
    for d in ["known", "new-a", "new-b"] {
        assert_eq!(j["devices"][d]["sent"], 4, "{j}");
        assert_eq!(j["devices"][d]["failed"], 0, "{j}");
        let stored = iot.hub.iothub_messages(d);
        let values: Vec<u64> = stored
            .iter()
            .map(|e| {
                serde_json::from_slice::<Value>(&e.body).unwrap()["value"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(values, [0, 1, 2, 3], "{d}");
    }
    for key in ["seconds", "events_per_sec", "records", "bytes"] {
        assert!(j.get(key).is_some(), "{key} missing: {j}");
    }
    let state = iot.hub.iothub_state().unwrap();
    assert_eq!(
        state.device("new-a").unwrap().desired["deviceName"],
        "Boiler A"
    );
    assert!(state
        .device("known")
        .unwrap()
        .desired
        .get("deviceName")
        .is_none());

    // Again with --strict: the same records are sent (no device created now), exit 3.
    a.push("--strict".into());
    let run = iot_send(&cs, a, input).await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(run.json()["devices_created"], 0);
    assert_eq!(iot.hub.iothub_messages("new-b").len(), 8);
}

#[tokio::test]
async fn a_device_string_sends_every_record_as_that_device() {
    let iot = start(HubConfig::new().iothub(HOST).iot_device("solo", KEY)).await;
    let input: String = (0..5)
        .map(|n| record(Some("ignored"), "x", n) + "\n")
        .collect();
    let cs = iot.hub.iothub_device_connection_string("solo");
    let mut a = args(&["--json"]);
    a.extend(iot.endpoints().into_iter().take(2));
    let run = iot_send(&cs, a, input).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["devices"]["solo"]["sent"], 5);
    assert_eq!(iot.hub.iothub_messages("solo").len(), 5);
    assert!(iot.hub.iothub_messages("ignored").is_empty());
}

#[tokio::test]
async fn missing_rights_and_unreachable_hubs_fail_with_a_clear_message() {
    let iot = start(HubConfig::new().iothub(HOST).iot_device("d1", KEY).policy(
        "readonly",
        KEY,
        &[Right::ServiceConnect, Right::RegistryRead],
    ))
    .await;
    let input = record(Some("d1"), "x", 1) + "\n";
    let mut a = args(&["--device-field", "device", "--json"]);
    a.extend(iot.endpoints());
    let run = iot_send(
        &iot.hub.iothub_connection_string("readonly"),
        a.clone(),
        input.clone(),
    )
    .await;
    // Unauthorized: exit status 5, as for `send`.
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(run.stderr.contains("DeviceConnect"), "{}", run.stderr);
    assert!(!run.stderr.contains(KEY) && !run.stdout.contains(KEY));
    assert_eq!(run.json()["failed"], 1);
    assert!(iot.hub.iothub_messages("d1").is_empty());

    // Nobody listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let a = args(&[
        "--device-field",
        "device",
        "--endpoint",
        &format!("amqp://127.0.0.1:{port}"),
    ]);
    let run = iot_send(
        &iot.hub.iothub_connection_string("device"),
        a,
        input.clone(),
    )
    .await;
    // Unreachable: exit status 6, as for `send`.
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert!(run.stderr.contains("connect"), "{}", run.stderr);

    // A policy string needs to be told where the device id is.
    let run = iot_send(&iot.hub.iothub_connection_string("device"), vec![], input).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--device-field"), "{}", run.stderr);
}
