//! `hubsend-testhub` binary: serves a local Event Hubs-compatible endpoint until interrupted.
//! Stdout: line 1 is the send-only connection string, line 2 the `manage` (Listen) policy's,
//! then, with TLS, the CA certificate's path (the file is written before line 1), then, with
//! `--ws-port`, the WebSocket listener's URL. In IoT Hub mode a `Built-in endpoint: CS` line
//! (after the CA and `Registry:` lines) gives the Event Hubs connection string of the built-in
//! Event Hubs-compatible endpoint.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use hubsend_testhub::{HubConfig, TestHub};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    name = "hubsend-testhub",
    about = "Local Event Hubs-compatible AMQP 1.0 test server",
    after_help = "Stdout: line 1 is the connection string of the send-only policy (Send right), \
line 2 that of the `manage` policy (Manage, Send, Listen: use it to read events back), and with \
--tls-dir line 3 names the CA certificate (written before line 1 is printed). With --rest a \
line `REST endpoint: URL` follows; with --ws-port the last line is `WebSocket: URL`, the \
WebSocket listener's upgrade URL. With --iothub, lines 1 and 2 are the `device` policy's and \
the first device's connection strings, and a line `Built-in endpoint: CS` (after the CA and \
`Registry:` lines) gives the Event Hubs connection string (policy `service`) of the built-in \
Event Hubs-compatible endpoint, where every D2C message can be read back."
)]
struct Args {
    /// Interface to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Event hub name.
    #[arg(long, default_value = "telemetry")]
    hub: String,
    /// Partition count.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Set a policy's key instead of a random one, as NAME=KEY (repeatable). The default
    /// policies are `send-only` (Send) and `manage` (Manage, Send, Listen); other names are
    /// added with every right.
    #[arg(long = "policy-key", value_name = "NAME=KEY", value_parser = parse_policy_key)]
    policy_keys: Vec<(String, String)>,
    /// Also serve AMQP over WebSockets on PORT (0 = any free port), in front of the same
    /// server: `/$servicebus/websocket[/]` (IoT Hub mode: `/$iothub/websocket`), subprotocol
    /// `AMQPWSB10` or `amqp` (echoed), TLS (`wss`) with --tls-dir. The last stdout line is
    /// then `WebSocket: URL`.
    #[arg(long, value_name = "PORT")]
    ws_port: Option<u16>,
    /// Fault: the WebSocket listener sends each chunk as two binary messages, so AMQP frames
    /// span messages.
    #[arg(long, requires = "ws_port")]
    split_websocket_messages: bool,
    /// Enable TLS and write the CA certificate to DIR/ca.pem.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Keep at most N events per partition, dropping the oldest (default: keep all). Bounds
    /// the hub's memory in long benchmarks; sequence numbers and offsets keep counting.
    #[arg(long, value_name = "N")]
    retain_events: Option<usize>,
    /// Largest accepted delivery in bytes, announced on producer links.
    #[arg(long, value_name = "BYTES", default_value_t = 1_048_576)]
    max_message_size: u64,
    /// Announce this max-message-size on producer links whatever is enforced or asked for
    /// (e.g. 18446744073709551615).
    #[arg(long, value_name = "BYTES")]
    advertise_max_message_size: Option<u64>,
    /// Fault: reject every N-th producer delivery with --reject-condition.
    #[arg(long, value_name = "N")]
    reject_every: Option<u64>,
    /// Condition of the rejections of --reject-every.
    #[arg(
        long,
        value_name = "SYMBOL",
        default_value = "com.microsoft:server-busy"
    )]
    reject_condition: String,
    /// Fault: with --reject-every, write each rejection in one TCP write with the next
    /// delivery's settlement.
    #[arg(long, requires = "reject_every")]
    coalesce_rejections: bool,
    /// Fault: attach producer links but never grant them credit.
    #[arg(long)]
    never_grant_credit: bool,
    /// Fault: never settle a producer delivery.
    #[arg(long)]
    never_settle: bool,
    /// Fault: every connection writes an empty frame every MS milliseconds.
    #[arg(long, value_name = "MS")]
    flood_heartbeats_ms: Option<u64>,
    /// Fault: close each connection with SYMBOL (e.g. amqp:connection:forced) on its first
    /// producer transfer.
    #[arg(long, value_name = "SYMBOL")]
    close_after_first_transfer: Option<String>,
    /// Fault: detach each producer link with SYMBOL (e.g. amqp:link:detach-forced) on its
    /// first transfer.
    #[arg(long, value_name = "SYMBOL")]
    detach_after_first_transfer: Option<String>,
    /// Fault: once, after the first producer transfer, send one disposition settling delivery
    /// ids 0 to 4294967295.
    #[arg(long)]
    dispose_all_once: bool,
    /// Fault: hold each producer disposition for MS milliseconds (the events are stored at
    /// once), so a connection that closes meanwhile leaves stored events unacknowledged.
    #[arg(long, value_name = "MS")]
    disposition_delay_ms: Option<u64>,
    /// Fault: once, when the Nth accepted producer delivery is stored, close every connection
    /// with --close-condition before acknowledging it (it, and any held by
    /// --disposition-delay-ms, stay stored but unacknowledged).
    #[arg(long, value_name = "N")]
    close_connections_after: Option<u64>,
    /// Condition of the close of --close-connections-after.
    #[arg(long, value_name = "SYMBOL", default_value = "amqp:connection:forced")]
    close_condition: String,
    /// What an idempotent producer that re-attaches with known state is told its last
    /// sequence number is: the last one the hub `stored`, or the one it sent (`echo`).
    #[arg(long, value_name = "ANSWER", default_value = "stored", value_parser = parse_resume)]
    idempotent_resume: hubsend_testhub::ResumeAnswer,
    /// What an idempotent delivery whose numbers skip ahead gets: `refuse`
    /// (out-of-order-sequence) or `store`.
    #[arg(long, value_name = "ANSWER", default_value = "refuse", value_parser = parse_gaps)]
    idempotent_gaps: hubsend_testhub::GapAnswer,
    /// Test check the service does not make: refuse (amqp:precondition-failed) a delivery to a
    /// partition link holding an event whose x-opt-partition-key hashes to another partition.
    #[arg(long)]
    verify_partition_keys: bool,
    /// Write the hub's counters to FILE as one JSON object when it stops (SIGTERM or Ctrl-C).
    #[arg(long, value_name = "FILE")]
    stats_file: Option<PathBuf>,
    /// Speak IoT Hub as hub HOST (e.g. plant.azure-devices.net) instead of Event Hubs. Stdout
    /// line 1 is then the `device` policy's connection string (DeviceConnect), line 2 the
    /// first device's; both name `GatewayHostName=localhost:PORT`. A `Built-in endpoint: CS` line
    /// follows the CA and `Registry:` lines: the built-in Event Hubs-compatible endpoint.
    #[arg(long, value_name = "HOST")]
    iothub: Option<String>,
    /// IoT Hub mode: register a device with its base64 key, as ID=KEY (repeatable).
    #[arg(long = "iot-device", value_name = "ID=KEY", value_parser = parse_policy_key)]
    iot_devices: Vec<(String, String)>,
    /// IoT Hub mode: register a device with its base64 key, disabled, as ID=KEY
    /// (repeatable): its own tokens are refused, and links to it are refused with
    /// `amqp:not-found` also under a policy token.
    #[arg(long = "iot-disabled-device", value_name = "ID=KEY", value_parser = parse_policy_key, requires = "iothub")]
    iot_disabled_devices: Vec<(String, String)>,
    /// IoT Hub mode: also serve the registry and twin REST API (HTTPS with --tls-dir, its CA
    /// written to DIR/registry-ca.pem) on PORT, on the same device store as AMQP: devices
    /// created there can send at once. Microsoft's service SDKs build the URL from HostName,
    /// so give --iothub localhost:PORT for them. Printed as a `Registry: URL` line.
    #[arg(long, value_name = "PORT", requires = "iothub")]
    iot_registry_port: Option<u16>,

    /// Also serve the Event Hubs HTTPS REST send API (`POST /HUB/messages`,
    /// `/HUB/partitions/ID/messages`) on a port of its own, into the same partitions: HTTPS
    /// with --tls-dir, plain HTTP otherwise. Its URL is printed as `REST endpoint: URL`.
    #[arg(long)]
    rest: bool,
    /// IoT Hub mode: rewrite FILE every 200 ms with a JSON array of every stored D2C message
    /// (device, body, message_id, correlation_id, content_type, properties).
    #[arg(long, value_name = "FILE")]
    dump: Option<PathBuf>,
}

impl Args {
    /// Arms the faults the flags ask for.
    fn arm(&self, faults: &hubsend_testhub::Faults) {
        if let Some(n) = self.reject_every {
            if self.coalesce_rejections {
                faults.reject_every_nth_coalesced(n, &self.reject_condition);
            } else {
                faults.reject_every_nth(n, &self.reject_condition);
            }
        }
        if self.never_grant_credit {
            faults.never_grant_credit();
        }
        if self.never_settle {
            faults.never_settle();
        }
        if let Some(ms) = self.flood_heartbeats_ms {
            faults.flood_heartbeats(Duration::from_millis(ms.max(1)));
        }
        if let Some(c) = &self.close_after_first_transfer {
            faults.close_each_connection_after_first_transfer(c);
        }
        if let Some(c) = &self.detach_after_first_transfer {
            faults.detach_each_link_after_first_transfer(c);
        }
        if self.dispose_all_once {
            faults.dispose_all_deliveries_once();
        }
        if self.split_websocket_messages {
            faults.split_websocket_messages(true);
        }
        if let Some(ms) = self.disposition_delay_ms {
            faults.delay_dispositions(Duration::from_millis(ms));
        }
        if let Some(n) = self.close_connections_after {
            faults.close_connections_after(n, &self.close_condition);
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = HubConfig::new()
        .host(&args.host)
        .port(args.port)
        .hub(&args.hub, args.partitions)
        .tls(args.tls_dir.is_some())
        .retain_events(args.retain_events)
        .max_message_size(args.max_message_size)
        .rest(args.rest)
        .idempotent_resume(args.idempotent_resume)
        .idempotent_gaps(args.idempotent_gaps)
        .verify_partition_keys(args.verify_partition_keys);
    if let Some(port) = args.ws_port {
        config = config.websocket_port(port);
    }
    if let Some(bytes) = args.advertise_max_message_size {
        config = config.advertise_max_message_size(bytes);
    }
    if let Some(host) = &args.iothub {
        config = config.iothub(host);
        for (id, key) in args.iot_devices.iter().chain(&args.iot_disabled_devices) {
            config = config.iot_device(id, key);
        }
    }
    // After `iothub`, so that in IoT Hub mode the keys go to its policies.
    for (name, key) in &args.policy_keys {
        config = config.policy_key(name, key);
    }
    let hub = TestHub::start(config).await?;
    // Disabled before anything is printed, so no client can see them enabled.
    if let Some(state) = hub.iothub_state() {
        for (id, _) in &args.iot_disabled_devices {
            state.set_device_enabled(id, false);
        }
    }
    // The registry and twin REST API on the same device store (IoT Hub mode).
    let registry = match (args.iot_registry_port, hub.iothub_state()) {
        (Some(port), Some(state)) => {
            let addr = (args.host.parse::<std::net::IpAddr>()?, port).into();
            Some(match &args.tls_dir {
                Some(_) => hubsend_testhub::iothub_http::IotHubRest::start_tls(state, addr).await?,
                None => hubsend_testhub::iothub_http::IotHubRest::start(state, addr).await?,
            })
        }
        _ => None,
    };
    args.arm(&hub.faults());
    let ca_path = match (&args.tls_dir, hub.ca_pem()) {
        (Some(dir), Some(pem)) => {
            std::fs::create_dir_all(dir)?;
            let path = dir.join("ca.pem");
            std::fs::write(&path, pem)?;
            Some(path)
        }
        _ => None,
    };
    if args.iothub.is_some() {
        // Clients that take no port option (Microsoft's device SDKs) read it from the gateway.
        let gateway = format!("GatewayHostName=localhost:{}", hub.addr().port());
        let ip = format!("GatewayHostName={}", hub.addr().ip());
        println!(
            "{}",
            hub.iothub_connection_string("device")
                .replace(&ip, &gateway)
        );
        let first = args
            .iot_devices
            .first()
            .map(|(id, _)| id.as_str())
            .unwrap_or("");
        println!(
            "{}",
            hub.iothub_device_connection_string(first)
                .replace(&ip, &gateway)
        );
    } else {
        println!("{}", hub.connection_string());
        println!("{}", hub.listen_connection_string());
    }
    if let Some(path) = ca_path {
        println!("CA certificate: {}", path.display());
    }
    if let Some(rest) = &registry {
        match (&args.tls_dir, rest.ca_pem()) {
            (Some(dir), Some(pem)) => {
                let path = dir.join("registry-ca.pem");
                std::fs::write(&path, pem)?;
                println!(
                    "Registry: {} (CA certificate: {})",
                    rest.url(),
                    path.display()
                );
            }
            _ => println!("Registry: {}", rest.url()),
        }
    }
    // IoT Hub mode: the built-in Event Hubs-compatible endpoint, read with the `service`
    // policy (ServiceConnect), after the lines above so their order stays.
    if let Some(cs) = hub.iothub_builtin_connection_string("service") {
        println!("Built-in endpoint: {cs}");
    }
    if let Some(url) = hub.rest_url() {
        println!("REST endpoint: {url}");
    }
    if let Some(url) = hub.ws_url() {
        println!("WebSocket: {url}");
    }
    match &args.dump {
        Some(path) if args.iothub.is_some() => {
            tokio::select! {
                () = wait_for_signal() => {}
                () = dump_loop(&hub, path) => {}
            }
        }
        _ => wait_for_signal().await,
    }
    if let Some(path) = &args.stats_file {
        std::fs::write(path, stats_json(&hub.stats()).to_string())?;
    }
    hub.shutdown().await;
    Ok(())
}

/// The counters of `--stats-file`, named as the fields of [`hubsend_testhub::HubStats`].
fn stats_json(s: &hubsend_testhub::HubStats) -> serde_json::Value {
    serde_json::json!({
        "connections_accepted": s.connections_accepted,
        "transfers_received": s.transfers_received,
        "deliveries_accepted": s.deliveries_accepted,
        "deliveries_rejected": s.deliveries_rejected,
        "producer_links_attached": s.producer_links_attached,
        "links_refused": s.links_refused,
        "idempotent_duplicates": s.idempotent_duplicates,
    })
}

/// Parses `--idempotent-resume`.
fn parse_resume(s: &str) -> Result<hubsend_testhub::ResumeAnswer, String> {
    match s {
        "stored" => Ok(hubsend_testhub::ResumeAnswer::Stored),
        "echo" => Ok(hubsend_testhub::ResumeAnswer::Echo),
        _ => Err(format!("expected stored or echo, got '{s}'")),
    }
}

/// Parses `--idempotent-gaps`.
fn parse_gaps(s: &str) -> Result<hubsend_testhub::GapAnswer, String> {
    match s {
        "refuse" => Ok(hubsend_testhub::GapAnswer::Refuse),
        "store" => Ok(hubsend_testhub::GapAnswer::Store),
        _ => Err(format!("expected refuse or store, got '{s}'")),
    }
}

/// Rewrites `path` every 200 ms with every D2C message the hub stored (of every device that
/// has been in the registry, also those created over REST or deleted since), as one JSON
/// array.
async fn dump_loop(hub: &TestHub, path: &std::path::Path) {
    let mut devices = std::collections::BTreeSet::new();
    loop {
        if let Some(state) = hub.iothub_state() {
            devices.extend(state.devices().into_iter().map(|d| d.device_id));
        }
        let all: Vec<serde_json::Value> = devices
            .iter()
            .flat_map(|d| {
                hub.iothub_messages(d).into_iter().map(move |e| {
                    serde_json::json!({
                        "device": d,
                        "body": String::from_utf8_lossy(&e.body),
                        "message_id": e.message_id,
                        "correlation_id": e.correlation_id,
                        "content_type": e.content_type,
                        "properties": e.application_properties,
                    })
                })
            })
            .collect();
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::Value::Array(all).to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Parses `NAME=KEY` (the key may itself contain `=`).
fn parse_policy_key(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, k)) if !n.is_empty() && !k.is_empty() => Ok((n.to_string(), k.to_string())),
        _ => Err(format!("expected NAME=KEY, got '{s}'")),
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
