//! End-to-end tests of `hubsend iot send`: the real binary against a test hub in IoT Hub mode
//! (AMQP and the registry REST side on one device store) running in this process.

use std::process::Stdio;

use hubsend_testhub::iothub_http::IotHubRest;
use hubsend_testhub::{HubConfig, Right, TestHub};
use serde_json::Value;

mod support;
use support::{command, free_port, scratch, spawn_silent, spool_bytes};

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
        let mut child = command(&["iot", "send"])
            .args(&args)
            .env("IOTHUB_CONNECTION_STRING", cs)
            .stdin(Stdio::piped())
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

/// SIGKILLs `child` (a spooled run) once its spool holds `bytes` bytes; it must not end
/// before.
async fn kill_once_spooled(child: std::process::Child, spool: &std::path::Path, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Watches the spool grow; the kill lands wherever the writer is at that moment.
    kill_when(child, deadline, "spooled", || spool_bytes(spool) >= bytes).await;
}

/// SIGKILLs `child` once `reached` holds (checked every millisecond); it must not end before,
/// and `reached` must hold before `deadline` ("nothing {what}" otherwise).
async fn kill_when(
    mut child: std::process::Child,
    deadline: std::time::Instant,
    what: &str,
    mut reached: impl FnMut() -> bool,
) {
    while !reached() {
        assert!(std::time::Instant::now() < deadline, "nothing {what}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "run 1 ended on its own"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

/// The `value` of each message stored for `device`, in the order the hub stored them.
fn stored_values(iot: &Iot, device: &str) -> Vec<u64> {
    iot.hub
        .iothub_messages(device)
        .iter()
        .map(|e| {
            serde_json::from_slice::<Value>(&e.body).expect("JSON body")["value"]
                .as_u64()
                .expect("value")
        })
        .collect()
}

/// A fleet run over `devices` devices (`dev-0`, …): `lines` records round robin over them
/// (record `i` has value `i`) in a file in `dir`, a policy string for `fleet` (written out:
/// its hub may not run yet), and the `iot send --spool DIR/spool` arguments that send them to
/// the hub on `port`.
struct Fleet {
    spool: std::path::PathBuf,
    cs: String,
    args: Vec<String>,
    port: u16,
    devices: u64,
}

impl Fleet {
    fn new(dir: &std::path::Path, lines: u64, devices: u64) -> Fleet {
        let input: String = (0..lines)
            .map(|i| record(Some(&format!("dev-{}", i % devices)), "x", i as u32) + "\n")
            .collect();
        let input_path = dir.join("in.ndjson");
        std::fs::write(&input_path, input).unwrap();
        let spool = dir.join("spool");
        let port = free_port();
        let args = args(&[
            "--input",
            input_path.to_str().unwrap(),
            "--device-field",
            "device",
            "--endpoint",
            &format!("amqp://127.0.0.1:{port}"),
            "--spool",
            spool.to_str().unwrap(),
            "--json",
        ]);
        Fleet {
            spool,
            cs: format!("HostName={HOST};SharedAccessKeyName=fleet;SharedAccessKey={KEY}"),
            args,
            port,
            devices,
        }
    }

    /// The hub on the fleet's port, with its devices and the `fleet` policy (DeviceConnect).
    async fn hub(&self) -> Iot {
        let mut config = HubConfig::new().port(self.port).iothub(HOST).policy(
            "fleet",
            KEY,
            &[Right::DeviceConnect],
        );
        for d in 0..self.devices {
            config = config.iot_device(format!("dev-{d}"), KEY);
        }
        start(config).await
    }

    /// `iot send` with the fleet's arguments, as a child to kill.
    fn spawn(&self) -> std::process::Child {
        let mut argv = self.args.clone();
        argv.splice(0..0, ["iot".to_owned(), "send".to_owned()]);
        spawn_silent(&argv, &[("IOTHUB_CONNECTION_STRING", &self.cs)])
    }
}

/// `iot send --spool` with a policy string over several devices: run 1 starts with the hub
/// unreachable and is killed (SIGKILL) at a moment that depends on the process id; run 2, the
/// same command with the hub up, sends what the spool held and the rest of the input. Every
/// record is stored once, under its device, in order; a third run finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_resumes_a_killed_gateway_run_and_stores_each_record_once_under_its_device() {
    const LINES: u64 = 12_000;
    const DEVICES: u64 = 5;
    let dir = scratch("iot-spool");
    let fleet = Fleet::new(&dir, LINES, DEVICES);
    let (cs, a) = (&fleet.cs, &fleet.args);
    let threshold = 4096 + u64::from(std::process::id()) % 600_000;
    kill_once_spooled(fleet.spawn(), &fleet.spool, threshold).await;

    let iot = fleet.hub().await;
    let run = iot_send(cs, a.clone(), String::new()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    let (spooled, resumed) = (
        j["spooled"].as_u64().unwrap(),
        j["resumed"].as_u64().unwrap(),
    );
    assert!(resumed > 0, "the kill left records in the spool: {j}");
    assert_eq!(spooled + resumed, LINES, "{j}");
    assert_eq!(j["sent"], LINES, "{j}");
    assert_eq!(j["failed"], 0, "{j}");

    let mut duplicates = 0;
    for d in 0..DEVICES {
        let device = format!("dev-{d}");
        let values = stored_values(&iot, &device);
        let mut distinct = values.clone();
        distinct.dedup();
        duplicates += values.len() - distinct.len();
        let expected: Vec<u64> = (0..LINES).filter(|i| i % DEVICES == d).collect();
        // In order per device, each once, none lost, none under another device.
        assert_eq!(values, expected, "{device}");
        assert_eq!(j["devices"][&device]["sent"], LINES / DEVICES, "{j}");
    }
    println!("killed at {threshold} spool bytes; run 2: {j}; {duplicates} stored twice");
    assert_eq!(duplicates, 0);

    // Nothing left, nothing new to read.
    let run = iot_send(cs, a.clone(), String::new()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    assert_eq!(
        (j["spooled"].as_u64(), j["resumed"].as_u64()),
        (Some(0), Some(0)),
        "{j}"
    );
    assert_eq!(
        iot.hub.iothub_messages("dev-0").len() as u64,
        LINES / DEVICES
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--create-devices --device-name-field` through the spool: each device's name is only in
/// its first record, and run 1 (killed before the hub could be reached) may have spooled it,
/// so run 2 can only name the devices from what the spool kept. Devices are created and named
/// once; a later run with a fresh spool creates and names nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_creates_devices_and_writes_their_names_once() {
    let iot = start(HubConfig::new().iothub(HOST)).await;
    let dir = scratch("iot-spool-create");
    let spool = dir.join("spool");
    let names = [
        ("boiler-a", "Boiler A"),
        ("boiler-b", "Boiler B"),
        ("pump-c", "Pump C"),
    ];
    let mut lines = Vec::new();
    for n in 0..40u32 {
        let (device, name) = names[n as usize % names.len()];
        let mut v = serde_json::json!({
            "sensor_id": "temp", "timestamp": "2026-01-01T00:00:00Z", "value": n,
            "device": device,
        });
        if (n as usize) < names.len() {
            v["name"] = name.into();
        }
        lines.push(v.to_string());
    }
    let input_path = dir.join("in.ndjson");
    std::fs::write(&input_path, lines.join("\n") + "\n").unwrap();
    let cs = iot.hub.iothub_connection_string("iothubowner");
    let with = |endpoint: String, spool: &std::path::Path| {
        args(&[
            "--input",
            input_path.to_str().unwrap(),
            "--device-field",
            "device",
            "--create-devices",
            "--device-name-field",
            "name",
            "--endpoint",
            &endpoint,
            "--registry-url",
            &iot.rest.url(),
            "--spool",
            spool.to_str().unwrap(),
            "--json",
        ])
    };
    let nowhere = format!("amqp://127.0.0.1:{}", free_port());
    let mut argv = with(nowhere, &spool);
    argv.splice(0..0, ["iot".to_owned(), "send".to_owned()]);
    let child = spawn_silent(&argv, &[("IOTHUB_CONNECTION_STRING", &cs)]);
    kill_once_spooled(child, &spool, 1).await;
    assert!(iot.hub.iothub_state().unwrap().devices().is_empty());

    let here = format!("amqp://127.0.0.1:{}", iot.hub.addr().port());
    let run = iot_send(&cs, with(here.clone(), &spool), String::new()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    assert_eq!(
        j["spooled"].as_u64().unwrap() + j["resumed"].as_u64().unwrap(),
        40,
        "{j}"
    );
    assert_eq!(j["sent"], 40, "{j}");
    assert_eq!(j["devices_created"], 3, "{j}");
    assert_eq!(j["names_written"], 3, "{j}");
    let state = iot.hub.iothub_state().unwrap();
    for (device, name) in names {
        assert_eq!(state.device(device).unwrap().desired["deviceName"], name);
        assert_eq!(
            iot.hub.iothub_messages(device).len(),
            if device == "boiler-a" { 14 } else { 13 }
        );
    }
    let created = state.counts().created;

    // A fresh spool, the same input: the devices exist, so nothing is created or renamed.
    let run = iot_send(&cs, with(here, &dir.join("spool-2")), String::new()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    assert_eq!(
        (j["devices_created"].as_u64(), j["names_written"].as_u64()),
        (Some(0), Some(0)),
        "{j}"
    );
    assert_eq!(state.counts().created, created);
    assert_eq!(iot.hub.iothub_messages("pump-c").len(), 26);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `iot send --spool` with a policy the hub refuses (no DeviceConnect): exit 5 naming the
/// right, and the records stay in the spool; the same spool with a policy that may send
/// delivers them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_keeps_the_records_when_the_hub_refuses_the_credentials() {
    let iot = start(
        HubConfig::new()
            .iothub(HOST)
            .iot_device("d1", KEY)
            .iot_device("d2", KEY)
            .policy(
                "readonly",
                KEY,
                &[Right::ServiceConnect, Right::RegistryRead],
            ),
    )
    .await;
    let dir = scratch("iot-spool-refused");
    let spool = dir.join("spool");
    let input: String = (0..10)
        .map(|n| record(Some(if n % 2 == 0 { "d1" } else { "d2" }), "x", n) + "\n")
        .collect();
    let mut a = args(&[
        "--device-field",
        "device",
        "--spool",
        spool.to_str().unwrap(),
        "--json",
    ]);
    a.extend(iot.endpoints().into_iter().take(2));
    let cs = iot.hub.iothub_connection_string("readonly");
    let run = iot_send(&cs, a.clone(), input.clone()).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(run.stderr.contains("DeviceConnect"), "{}", run.stderr);
    assert!(!run.stderr.contains(KEY) && !run.stdout.contains(KEY));
    let j = run.json();
    // A refusal stops the reading too: on a slow machine the refusal may come before the
    // reader handed over the whole input, and the same command reads on after what it kept.
    let kept = j["spooled"].as_u64().expect("spooled");
    assert!(kept <= 10, "{j}");
    assert_eq!(
        (j["sent"].as_u64(), j["failed"].as_u64()),
        (Some(0), Some(0)),
        "{j}"
    );
    assert_eq!(j["error_kind"], "unauthorized", "{j}");
    assert!(iot.hub.iothub_messages("d1").is_empty());

    // The same command with a policy that may send: what the spool kept goes first, then
    // the rest of the input.
    let cs = iot.hub.iothub_connection_string("device");
    let run = iot_send(&cs, a, input).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    assert_eq!(
        (
            j["resumed"].as_u64(),
            j["spooled"].as_u64(),
            j["sent"].as_u64()
        ),
        (Some(kept), Some(10 - kept), Some(10)),
        "{j}"
    );
    assert_eq!(stored_values(&iot, "d1"), [0, 2, 4, 6, 8]);
    assert_eq!(stored_values(&iot, "d2"), [1, 3, 5, 7, 9]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `iot send --spool` killed mid-drain: run 1 starts with the hub unreachable, the hub comes
/// up (answering each delivery 30 ms late, so some are stored but unconfirmed) and run 1 is
/// SIGKILLed once the hub holds a pid-dependent number of messages; run 2 resends what the
/// spool still held. Nothing is lost; what is stored twice is counted, and only records run 2
/// resumed from the spool can be among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_resumes_a_gateway_run_killed_mid_drain_losing_nothing() {
    const LINES: u64 = 12_000;
    const DEVICES: u64 = 4;
    let dir = scratch("iot-spool-mid-drain");
    let fleet = Fleet::new(&dir, LINES, DEVICES);
    let first = fleet.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while spool_bytes(&fleet.spool) < 8192 {
        assert!(std::time::Instant::now() < deadline, "nothing spooled");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let iot = fleet.hub().await;
    iot.hub
        .faults()
        .delay_dispositions(std::time::Duration::from_millis(30));
    let stored = |iot: &Iot| -> u64 {
        (0..DEVICES)
            .map(|d| iot.hub.iothub_messages(&format!("dev-{d}")).len() as u64)
            .sum()
    };
    let threshold = 200 + u64::from(std::process::id()) % 6_000;
    kill_when(first, deadline, "stored", || stored(&iot) >= threshold).await;
    let at_kill = stored(&iot);
    iot.hub.faults().clear();

    let run = iot_send(&fleet.cs, fleet.args.clone(), String::new()).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    let (spooled, resumed) = (
        j["spooled"].as_u64().unwrap(),
        j["resumed"].as_u64().unwrap(),
    );
    assert!(resumed > 0, "{j}");
    assert_eq!(j["sent"].as_u64(), Some(spooled + resumed), "{j}");
    assert_eq!(j["failed"], 0, "{j}");
    let mut duplicates = 0;
    for d in 0..DEVICES {
        let device = format!("dev-{d}");
        let mut values = stored_values(&iot, &device);
        let total = values.len();
        values.sort_unstable();
        values.dedup();
        duplicates += total - values.len();
        let expected: Vec<u64> = (0..LINES).filter(|i| i % DEVICES == d).collect();
        assert_eq!(values, expected, "{device}: every record, under its device");
    }
    println!("killed with {at_kill} stored (threshold {threshold}); run 2: {j}; {duplicates} stored twice");
    assert!(
        duplicates as u64 <= resumed,
        "{duplicates} duplicates, {resumed} resumed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device connection string through the spool: every record is sent as that device.
#[tokio::test]
async fn spool_with_a_device_string_sends_as_that_device() {
    let iot = start(HubConfig::new().iothub(HOST).iot_device("solo", KEY)).await;
    let dir = scratch("iot-spool-device");
    let input: String = (0..5)
        .map(|n| record(Some("ignored"), "x", n) + "\n")
        .collect();
    let cs = iot.hub.iothub_device_connection_string("solo");
    let mut a = args(&["--spool", dir.join("spool").to_str().unwrap(), "--json"]);
    a.extend(iot.endpoints().into_iter().take(2));
    let run = iot_send(&cs, a, input).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["spooled"], 5, "{j}");
    assert_eq!(j["sent"], 5, "{j}");
    assert_eq!(j["devices"]["solo"]["sent"], 5, "{j}");
    assert_eq!(j["connections"], 1, "{j}");
    assert_eq!(stored_values(&iot, "solo"), [0, 1, 2, 3, 4]);
    assert!(iot.hub.iothub_messages("ignored").is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
