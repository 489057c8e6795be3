//! A Particle-like cloud gateway: a fleet of simulated devices publishes sensor readings
//! (`{"sensor_id":...,"timestamp":...,"value":...}`) through one IoT Hub [`Gateway`], which
//! creates each device's identity on first use and writes its name once into its twin.
//!
//! With `IOTHUB_CONNECTION_STRING` set (a policy with RegistryWrite and DeviceConnect, e.g.
//! `iothubowner`), it sends to that hub; otherwise to a local test hub started in-process in
//! IoT Hub mode, with its registry REST API on the same device store. Against the local hub
//! it then reads every message back from the hub's built-in Event Hubs-compatible endpoint,
//! prints the per-device counts and exits 1 if any device's count differs from what it sent.
//!
//! ```text
//! cargo run --example iot_gateway --features registry [-- DEVICES READINGS_PER_DEVICE]
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use hubsend::iothub::{AutoCreate, Gateway, IotHubBuilder, Registry};
use hubsend::Event;
use hubsend_testhub::iothub_http::IotHubRest;
use hubsend_testhub::{HubConfig, TestHub};

/// The local hub's IoT hub name.
const HOST: &str = "fleet.azure-devices.net";

/// The local hub and its registry REST server, kept alive for the run.
struct Local {
    hub: TestHub,
    _rest: IotHubRest,
}

/// A Particle-style device id: 24 hex digits, derived from the device's number.
fn device_id(n: usize) -> String {
    format!("{:024x}", 0xe00f_ce68_0000_0000_0000_0000u128 + n as u128)
}

/// One reading of device `n`, as a Particle integration forwards it.
fn reading(n: usize, i: usize) -> String {
    let value = 20.0 + ((n * 31 + i * 7) % 100) as f64 / 10.0;
    serde_json::json!({
        "sensor_id": device_id(n),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "value": value,
    })
    .to_string()
}

/// The gateway: to `IOTHUB_CONNECTION_STRING`, or to a local test hub in IoT Hub mode.
async fn connect() -> hubsend::Result<(Gateway, Option<Local>)> {
    if let Ok(cs) = std::env::var("IOTHUB_CONNECTION_STRING") {
        if !cs.trim().is_empty() {
            let registry = Registry::builder(&cs)?.build()?;
            let gateway = IotHubBuilder::default()
                .connection_string(cs)
                .auto_create(registry, AutoCreate::OnNotFound)
                .gateway()
                .await?;
            return Ok((gateway, None));
        }
    }
    // The local hub allows 5,000 registry calls a minute (an S3 unit), so 200 creates and
    // names do not wait on the S1 rate of 100 a minute.
    let hub = TestHub::start(
        HubConfig::new()
            .iothub(HOST)
            .iot_registry_rate_limit(5_000, Duration::from_secs(60)),
    )
    .await
    .expect("the local test hub starts");
    let state = hub.iothub_state().expect("IoT Hub mode");
    let rest = IotHubRest::start(state, "127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("the registry REST server starts");
    eprintln!(
        "no IOTHUB_CONNECTION_STRING: using a local IoT hub on {} (registry {})",
        hub.addr(),
        rest.url()
    );
    let cs = hub.iothub_connection_string("iothubowner");
    let registry = Registry::builder(&cs)?
        .registry_url(rest.url())
        .danger_allow_http(true)
        .operations_per_minute(5_000)
        .build()?;
    let gateway = IotHubBuilder::default()
        .connection_string(cs)
        .port(hub.addr().port())
        .danger_plaintext(true)
        .auto_create(registry, AutoCreate::OnNotFound)
        .gateway()
        .await?;
    Ok((gateway, Some(Local { hub, _rest: rest })))
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let devices = args.next().and_then(Result::ok).unwrap_or(200);
    let per_device = args.next().and_then(Result::ok).unwrap_or(10);

    let (gateway, local) = match connect().await {
        Ok(connected) => connected,
        Err(e) => {
            eprintln!("connecting: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    // Every device publishes on its own task, as a fleet does: one gateway for all of them.
    let tasks: Vec<_> = (0..devices)
        .map(|n| {
            let gateway = gateway.clone();
            tokio::spawn(async move {
                let id = device_id(n);
                let name = format!("sensor {n}");
                let mut stored = 0usize;
                let mut outcomes = Vec::with_capacity(per_device);
                for i in 0..per_device {
                    let event = Event::new(reading(n, i)).with_content_type("application/json");
                    match gateway.send_named(&id, Some(&name), event).await {
                        Ok(outcome) => outcomes.push(outcome),
                        Err(e) => eprintln!("{id}: not queued: {e}"),
                    }
                }
                for outcome in outcomes {
                    match outcome.await {
                        Ok(_) => stored += 1,
                        Err(e) => eprintln!("{id}: not stored: {e}"),
                    }
                }
                (id, stored)
            })
        })
        .collect();
    let mut sent = BTreeMap::new();
    for task in tasks {
        match task.await {
            Ok((id, stored)) => {
                sent.insert(id, stored);
            }
            Err(e) => eprintln!("a device task failed: {e}"),
        }
    }
    let elapsed = started.elapsed();
    let stats = gateway.stats().await;
    let total: usize = sent.values().sum();
    println!(
        "{total} readings from {} devices stored in {:.2?}; {} identities created, {} names written, \
         {} connection(s), {} device(s) refused",
        sent.len(),
        elapsed,
        stats.devices_created,
        stats.names_written,
        stats.connections,
        stats.devices_refused
    );
    if let Err(e) = gateway.close().await {
        eprintln!("closing the gateway: {e}");
    }

    let Some(local) = local else {
        println!(
            "read-back skipped: it needs the hub's built-in Event Hubs-compatible endpoint's \
             connection string (Azure portal: Built-in endpoints), which this example does not take"
        );
        return if total == devices * per_device {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    };
    // Read back: every D2C message on the built-in endpoint, grouped by the device IoT Hub
    // stamped on it (`iothub-connection-device-id`), its body's sensor_id checked against it.
    let mut read: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatched = 0usize;
    for event in local.hub.iothub_builtin_events() {
        let device = event.iothub_device_id.clone().unwrap_or_default();
        let sensor = serde_json::from_slice::<serde_json::Value>(&event.body)
            .ok()
            .and_then(|v| v["sensor_id"].as_str().map(str::to_owned));
        if sensor.as_deref() != Some(device.as_str()) {
            mismatched += 1;
        }
        *read.entry(device).or_default() += 1;
    }
    let mut wrong = 0usize;
    println!("device                    sent  read");
    for (id, &count) in &sent {
        let back = read.get(id).copied().unwrap_or(0);
        let flag = if back == count && count == per_device {
            ""
        } else {
            wrong += 1;
            "  <- differs"
        };
        println!("{id}  {count:4}  {back:4}{flag}");
    }
    let unexpected = read.keys().filter(|id| !sent.contains_key(*id)).count();
    println!(
        "read back {} messages from the built-in endpoint: {wrong} device(s) differ, \
         {unexpected} unexpected device(s), {mismatched} body/device mismatch(es)",
        read.values().sum::<usize>()
    );
    if wrong == 0 && unexpected == 0 && mismatched == 0 && sent.len() == devices {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
