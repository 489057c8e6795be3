//! `hubsend iot send`: telemetry records as IoT Hub device-to-cloud messages, as one device (a
//! device connection string, or `--device-id`) or as many through one gateway (a policy string
//! and `--device-field`), creating unknown devices on the way (`--create-devices`). Input
//! reading, rejects, progress, the summary and the exit statuses are `hubsend send`'s.
//! `--spool DIR` stores and forwards through a disk spool ([`spooled`]).

mod spooled;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Subcommand};
use hubsend::iothub::{
    AutoCreate, DeviceSender, Gateway, IotHubBuilder, IotHubConnectionString, IotHubCredentialKind,
    Registry, MAX_MESSAGE_SIZE,
};
use hubsend::{DeliveryFuture, Error, ErrorKind, Event, ProducerOptions};
use serde_json::{json, Value};

use crate::commands::{human_summary, CliObserver, Ui};
use crate::exit::{
    ABANDONED as EXIT_ABANDONED, FAILED as EXIT_FAILED, INTERRUPTED as EXIT_INTERRUPTED,
    OK as EXIT_OK, REJECTED as EXIT_REJECTED, USAGE as EXIT_USAGE,
};
use crate::ingest::record::Record;
use crate::ingest::record::Schema;
use crate::ingest::report::{rate, IngestReport, Progress, Reject};
use crate::ingest::stream::IngestObserver;
use crate::ingest::{self, InputFormat};
use crate::progress::{ProgressMode, ProgressView};
use crate::signals::Signals;
use crate::text::error_chain;

/// The environment variable read when `--connection-string` is not given.
const CONNECTION_STRING_ENV: &str = "IOTHUB_CONNECTION_STRING";

/// Messages awaiting the hub's outcome at most (each holds only its outcome's channel).
const MAX_PENDING: usize = 8192;

/// `hubsend iot …`.
#[derive(Debug, Args)]
pub(crate) struct IotArgs {
    #[command(subcommand)]
    command: IotCommand,
}

#[derive(Debug, Subcommand)]
enum IotCommand {
    /// Send NDJSON or CSV telemetry records as device-to-cloud messages.
    #[command(after_help = IOT_SEND_AFTER_HELP)]
    Send(IotSendArgs),
}

/// The end of `hubsend iot send --help`.
const IOT_SEND_AFTER_HELP: &str = "\
Devices: with a device connection string (DeviceId=…) every record is sent as that device; with
a policy string (its policy needs DeviceConnect) --device-field names the record field holding
each record's device id (a line without it, or with an empty one, is rejected with its line
number), or --device-id sends every record as one device. --create-devices creates devices the
hub does not know (the policy needs RegistryWrite, and ServiceConnect to write names);
--device-name-field writes that field's value to the new device's twin as
properties.desired.deviceName, once, at creation.

--spool DIR stores and forwards, as hubsend send --spool: every record goes into a disk spool
first (with its device id and name) and is sent from there; the hub need not be reachable, and an
interrupted run (Ctrl-C, kill, reboot) resumes with the same command, sending what the spool
holds first and reading the input on after the last spooled line. A refused credential (exit 5)
leaves the records in the spool for the next run.

--json prints one object on the last line: send's fields (sent, rejected, failed, seconds,
events_per_sec, …) plus devices (per device: sent, failed), devices_created, names_written and
connections; with --spool also spooled and resumed.

Exit status: as hubsend send (0 all stored, 1 a record not stored or the hub unusable, 2 usage,
3 --strict with invalid lines, 4 abandoned, 130 stopped by a signal).";

#[derive(Debug, Args)]
struct IotSendArgs {
    /// IoT Hub connection string: a device's, or a shared access policy's with DeviceConnect;
    /// defaults to $IOTHUB_CONNECTION_STRING.
    #[arg(long, env = CONNECTION_STRING_ENV, hide_env_values = true)]
    connection_string: Option<String>,

    /// File to read, or `-` for standard input.
    #[arg(long, value_name = "PATH", default_value = "-")]
    input: String,

    /// Input format.
    #[arg(long, value_enum, default_value_t = crate::Format::Ndjson)]
    format: crate::Format,

    /// With a policy string: the record field holding the device id.
    #[arg(long, value_name = "FIELD", conflicts_with = "device_id")]
    device_field: Option<String>,

    /// With a policy string: send every record as this device.
    #[arg(long, value_name = "ID")]
    device_id: Option<String>,

    /// Create the identities of devices the hub does not know (the gateway's auto-create).
    #[arg(long)]
    create_devices: bool,

    /// With --create-devices: the record field whose value is written as a new device's name.
    #[arg(long, value_name = "FIELD", requires = "create_devices")]
    device_name_field: Option<String>,

    /// Dial this AMQP address instead of the hub (tokens still name HostName): amqps://host:port
    /// or wss://host[:port][/path] (amqp:// and ws:// to loopback only).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,

    /// The registry's base URL (default https://HostName), for --create-devices.
    #[arg(long, value_name = "URL")]
    registry_url: Option<String>,

    /// Extra trusted root CA certificate (PEM), for the AMQP connection and the registry.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,

    /// At most this many deliveries await the hub's outcome at once.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,

    /// Write every invalid line to this file as one JSON object per line.
    #[arg(long, value_name = "PATH")]
    rejects: Option<PathBuf>,

    /// Exit with status 3 when any line is invalid.
    #[arg(long)]
    strict: bool,

    /// Print the summary as one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,

    /// Store and forward: put the input into a disk spool in DIR and send from there. An
    /// interrupted run (Ctrl-C, kill, reboot) resumes with the same command: the records
    /// still spooled are sent first and the input is read on after the last spooled line.
    /// The hub need not be reachable; the run waits for it (Ctrl-C leaves the rest spooled).
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
}

/// Runs `hubsend iot …`; returns the exit status.
pub(crate) async fn run(args: IotArgs, ui: Ui) -> u8 {
    match args.command {
        IotCommand::Send(a) => send(a, ui).await,
    }
}

/// Where each record goes.
#[derive(Clone)]
enum DeviceOf {
    /// Every record as this device.
    Fixed(String),
    /// The record's field.
    Field(String),
}

impl DeviceOf {
    /// `record`'s device id, the name to give it (`--device-name-field`) and its event; the
    /// reject reason when it names no device.
    fn route(
        &self,
        record: &Record,
        name_field: Option<&str>,
    ) -> Result<(String, Option<String>, Event), String> {
        let device = match self {
            DeviceOf::Fixed(id) => id.clone(),
            DeviceOf::Field(field) => field_text(record, field)
                .ok_or_else(|| format!("missing or empty device id field `{field}`"))?,
        };
        let name = name_field.and_then(|f| field_text(record, f));
        Ok((device, name, record.to_event()))
    }
}

/// The device sender or the gateway.
enum Sender {
    Device(DeviceSender),
    Gateway(Gateway),
}

impl Sender {
    async fn send(
        &self,
        device: &str,
        name: Option<&str>,
        event: Event,
    ) -> hubsend::Result<DeliveryFuture> {
        match self {
            Sender::Device(d) => d.send(event).await,
            Sender::Gateway(g) => g.send_named(device, name, event).await,
        }
    }

    /// Identities created, names written and connections open.
    async fn counts(&self) -> DeviceTotals {
        match self {
            Sender::Device(_) => DeviceTotals {
                connections: 1,
                ..DeviceTotals::default()
            },
            Sender::Gateway(g) => {
                let s = g.stats().await;
                DeviceTotals {
                    created: s.devices_created,
                    names_written: s.names_written,
                    connections: s.connections,
                }
            }
        }
    }

    async fn close(self) {
        let closed = match self {
            Sender::Device(d) => d.close().await,
            Sender::Gateway(g) => g.close().await,
        };
        if let Err(e) = closed {
            tracing::debug!(error = %e, "closing the connection failed");
        }
    }
}

/// Per-device outcomes.
#[derive(Default)]
struct DeviceCount {
    sent: u64,
    failed: u64,
}

/// What a run has counted.
#[derive(Default)]
struct Tally {
    devices: BTreeMap<String, DeviceCount>,
    sent: u64,
    failed: u64,
    bytes: u64,
    first_error: Option<Error>,
}

impl Tally {
    fn outcome(&mut self, device: &str, bytes: usize, result: hubsend::Result<()>) {
        let entry = self.devices.entry(device.to_owned()).or_default();
        match result {
            Ok(()) => {
                entry.sent += 1;
                self.sent += 1;
                self.bytes += bytes as u64;
            }
            Err(e) => {
                entry.failed += 1;
                self.failed += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// Errors after which no further record can be sent: the hub cannot be used at all.
fn is_fatal(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Connection | ErrorKind::InvalidConfig | ErrorKind::Closed
    ) || (error.kind() == ErrorKind::Unauthorized && error.to_string().contains("DeviceConnect"))
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, u8> {
    std::fs::read(path).map_err(|e| {
        eprintln!("hubsend: cannot read {what} {}: {e}", path.display());
        EXIT_FAILED
    })
}

/// How to reach the hub, checked once and turned into a fresh builder for each connection
/// (`--spool` connects again after each failure).
struct Plan {
    connection_string: String,
    ca: Option<Vec<u8>>,
    endpoint: Option<String>,
    max_in_flight: u32,
    /// The device of a device connection string.
    device: Option<String>,
    /// With `--create-devices`.
    registry: Option<Registry>,
}

impl Plan {
    fn builder(&self) -> IotHubBuilder {
        let mut builder = IotHubBuilder::default()
            .connection_string(self.connection_string.clone())
            .options(ProducerOptions::new().max_in_flight(self.max_in_flight as usize));
        if let Some(pem) = &self.ca {
            builder = builder.add_root_certificate_pem(pem.clone());
        }
        if let Some(url) = &self.endpoint {
            builder = builder.endpoint(url);
        }
        if let Some(registry) = &self.registry {
            builder = builder.auto_create(registry.clone(), AutoCreate::OnNotFound);
        }
        builder
    }

    /// Connects the device sender (a device string) or the gateway (a policy string).
    async fn connect(&self) -> hubsend::Result<Sender> {
        let builder = self.builder();
        if self.device.is_some() {
            builder.device_sender().await.map(Sender::Device)
        } else {
            builder.gateway().await.map(Sender::Gateway)
        }
    }
}

/// Checks the arguments and the connection string: what to connect and where each record
/// goes, or the exit status after a message.
fn plan(a: &IotSendArgs, cs: &str) -> Result<(Plan, DeviceOf), u8> {
    let parsed = IotHubConnectionString::parse(cs).map_err(|e| {
        eprintln!("hubsend: {}", error_chain(&e));
        EXIT_USAGE
    })?;
    let ca = match &a.ca_file {
        Some(path) => Some(read_file(path, "CA file")?),
        None => None,
    };
    let mut plan = Plan {
        connection_string: cs.to_owned(),
        ca,
        endpoint: a.endpoint.clone(),
        max_in_flight: a.max_in_flight,
        device: None,
        registry: None,
    };
    if let Some(device) = parsed.device_id() {
        if a.device_field.is_some() || a.create_devices {
            eprintln!(
                "hubsend: a device connection string sends as its own device: --device-field and --create-devices need a policy string"
            );
            return Err(EXIT_USAGE);
        }
        plan.device = Some(device.to_owned());
        return Ok((plan, DeviceOf::Fixed(device.to_owned())));
    }
    let device_of = match (&a.device_field, &a.device_id) {
        (Some(field), _) => DeviceOf::Field(field.clone()),
        (None, Some(id)) => DeviceOf::Fixed(id.clone()),
        (None, None) => {
            eprintln!(
                "hubsend: a policy connection string needs --device-field FIELD (or --device-id ID)"
            );
            return Err(EXIT_USAGE);
        }
    };
    if parsed.credential_kind() != IotHubCredentialKind::PolicyKey {
        eprintln!("hubsend: a gateway needs a policy connection string with SharedAccessKey");
        return Err(EXIT_USAGE);
    }
    if a.create_devices {
        let mut registry = Registry::builder(cs).map_err(|e| {
            eprintln!("hubsend: {}", error_chain(&e));
            EXIT_USAGE
        })?;
        if let Some(url) = &a.registry_url {
            let loopback =
                url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost");
            registry = registry.registry_url(url).danger_allow_http(loopback);
        }
        if let Some(pem) = &plan.ca {
            registry = registry.add_root_certificate_pem(pem.clone());
        }
        plan.registry = Some(registry.build().map_err(|e| {
            eprintln!("hubsend: cannot use the registry: {}", error_chain(&e));
            EXIT_USAGE
        })?);
    }
    Ok((plan, device_of))
}

/// Builds the device sender or gateway the arguments ask for.
async fn connect(plan: &Plan) -> Result<Sender, u8> {
    plan.connect().await.map_err(|e| {
        eprintln!("hubsend: cannot connect: {}", error_chain(&e));
        // The same statuses as `send`: usage, unauthorized, unreachable, or failed.
        crate::exit::for_kind(e.kind())
    })
}

/// The string form of `field` in `record`: strings as they are, numbers and booleans as JSON
/// writes them; `None` when absent, null, empty or an object or array.
fn field_text(record: &Record, field: &str) -> Option<String> {
    record.partition_key(field).ok().filter(|s| !s.is_empty())
}

/// What a run did with identities and connections, for the summary.
#[derive(Default)]
struct DeviceTotals {
    created: u64,
    names_written: u64,
    connections: usize,
}

/// Sets `report`'s `error` and `error_kind`: the input's failure first, else the hub's.
fn set_error(report: &mut IngestReport, input_error: Option<String>, hub_error: Option<&Error>) {
    match (input_error, hub_error) {
        (Some(e), _) => {
            report.error = Some(e);
            report.error_kind = Some(crate::exit::KIND_INPUT.to_owned());
        }
        (None, Some(e)) => {
            report.error = Some(error_chain(e));
            report.error_kind = Some(e.kind().to_string());
        }
        (None, None) => {}
    }
}

/// The end of a run's output: the devices line (when `show`), the error, a rejects file that
/// could not be written, and with `json` the summary object with the device fields.
fn print_end(
    report: &IngestReport,
    devices: &BTreeMap<String, DeviceCount>,
    totals: &DeviceTotals,
    rejects_error: Option<&std::io::Error>,
    json: bool,
    show: bool,
) {
    if show {
        eprintln!(
            "hubsend: {} devices, {} created, {} names written, {} connections",
            devices.len(),
            totals.created,
            totals.names_written,
            totals.connections
        );
    }
    if let Some(error) = &report.error {
        eprintln!("hubsend: {error}");
    }
    if let Some(e) = rejects_error {
        eprintln!("hubsend: writing the rejects file failed: {e}");
    }
    if json {
        let mut value = serde_json::to_value(report).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            let devices: serde_json::Map<String, Value> = devices
                .iter()
                .map(|(id, c)| (id.clone(), json!({"sent": c.sent, "failed": c.failed})))
                .collect();
            map.insert("devices".into(), Value::Object(devices));
            map.insert("devices_created".into(), totals.created.into());
            map.insert("names_written".into(), totals.names_written.into());
            map.insert("connections".into(), totals.connections.into());
        }
        println!("{value}");
    }
}

async fn send(a: IotSendArgs, ui: Ui) -> u8 {
    let Some(cs) = a.connection_string.clone().filter(|s| !s.trim().is_empty()) else {
        eprintln!(
            "hubsend: no connection string: pass --connection-string or set {CONNECTION_STRING_ENV}"
        );
        return EXIT_USAGE;
    };
    let source: Box<dyn std::io::Read + Send> = if a.input == "-" {
        Box::new(std::io::stdin())
    } else {
        match File::open(&a.input) {
            Ok(file) => Box::new(file),
            Err(e) => {
                eprintln!("hubsend: cannot open input {}: {e}", a.input);
                return EXIT_FAILED;
            }
        }
    };
    let rejects = match &a.rejects {
        None => None,
        Some(path) => match File::create(path) {
            Ok(f) => Some(BufWriter::new(f)),
            Err(e) => {
                eprintln!(
                    "hubsend: cannot create rejects file {}: {e}",
                    path.display()
                );
                return EXIT_FAILED;
            }
        },
    };
    let signals = Signals::install();
    let (plan, device_of) = match plan(&a, &cs) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Some(dir) = a.spool.clone() {
        return spooled::send(
            a,
            Arc::new(plan),
            device_of,
            &dir,
            source,
            rejects,
            signals,
            ui,
        )
        .await;
    }
    let sender = tokio::select! {
        c = connect(&plan) => match c {
            Ok(c) => c,
            Err(code) => return code,
        },
        _ = signals.nth(1) => return EXIT_INTERRUPTED,
    };
    let format = if a.format == crate::Format::Csv {
        InputFormat::Csv
    } else {
        InputFormat::Ndjson
    };
    let mut input =
        ingest::spawn_reader(source, format, Schema::Telemetry, MAX_MESSAGE_SIZE as usize);
    let mut observer = CliObserver::new(
        rejects,
        ProgressView::new(ProgressMode::Auto, ui.quiet, None, None),
        ui.quiet,
    );
    let started = Instant::now();
    let mut report = IngestReport::default();
    let mut tally = Tally::default();
    let mut pending: VecDeque<(usize, usize, DeliveryFuture)> = VecDeque::new();
    let mut names: Vec<String> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    let mut input_error = None;
    let mut last_progress = Instant::now();
    'read: loop {
        let chunk = tokio::select! {
            chunk = input.recv() => chunk,
            _ = signals.nth(1) => { report.interrupted = true; break 'read; }
        };
        let Some(chunk) = chunk else { break };
        for item in chunk {
            let parsed = match item {
                Ok(p) => p,
                Err(e) => {
                    input_error = Some(format!("reading the input failed: {e}"));
                    report.interrupted = true;
                    break 'read;
                }
            };
            report.records += 1;
            let routed = match parsed.result {
                Ok(record) => device_of
                    .route(&record, a.device_name_field.as_deref())
                    .map_err(|reason| (reason, ingest::reject_text(parsed.raw, &record))),
                Err(e) => Err((e.to_string(), parsed.raw.unwrap_or_default())),
            };
            let (device, name, event) = match routed {
                Ok(r) => r,
                Err((reason, raw)) => {
                    report.rejected += 1;
                    observer.rejected(&Reject {
                        line: parsed.line,
                        reason,
                        raw,
                    });
                    continue;
                }
            };
            let bytes = event.body().len();
            let slot = *index.entry(device.clone()).or_insert_with(|| {
                names.push(device.clone());
                names.len() - 1
            });
            match sender.send(&device, name.as_deref(), event).await {
                Ok(future) => pending.push_back((slot, bytes, future)),
                Err(e) => {
                    let fatal = is_fatal(&e);
                    tally.outcome(&device, bytes, Err(e));
                    if fatal {
                        report.interrupted = true;
                        break 'read;
                    }
                }
            }
            while pending.len() >= MAX_PENDING {
                if let Some((slot, bytes, future)) = pending.pop_front() {
                    tally.outcome(&names[slot], bytes, future.await);
                }
            }
            if last_progress.elapsed().as_millis() >= 250 {
                last_progress = Instant::now();
                observer.progress(&Progress {
                    records: report.records,
                    sent: tally.sent,
                    rejected: report.rejected,
                    failed: tally.failed,
                    bytes: tally.bytes,
                    in_flight: pending.len(),
                    retries: 0,
                    elapsed: started.elapsed(),
                });
            }
        }
    }
    drop(input);
    // Every outcome, unless a (further) signal says stop waiting.
    let stop_at = if report.interrupted && signals.received() > 0 {
        2
    } else {
        1
    };
    let abandoned = loop {
        let Some((slot, bytes, future)) = pending.pop_front() else {
            break false;
        };
        tokio::select! {
            result = future => tally.outcome(&names[slot], bytes, result),
            _ = signals.nth(stop_at) => {
                report.unknown = 1 + pending.len() as u64;
                break true;
            }
        }
    };
    let totals = sender.counts().await;
    if !abandoned {
        sender.close().await;
    }
    let rejects_error = observer.finish();
    let elapsed = started.elapsed();
    report.sent = tally.sent;
    report.failed = tally.failed;
    report.bytes = tally.bytes;
    report.batches = tally.sent + tally.failed;
    report.seconds = elapsed.as_secs_f64();
    report.events_per_sec = rate(tally.sent as f64, elapsed);
    report.mb_per_sec = rate(tally.bytes as f64 / 1e6, elapsed);
    set_error(&mut report, input_error, tally.first_error.as_ref());
    human_summary(&report);
    print_end(
        &report,
        &tally.devices,
        &totals,
        rejects_error.as_ref(),
        a.json,
        true,
    );
    if abandoned {
        EXIT_ABANDONED
    } else if rejects_error.is_some() {
        EXIT_FAILED
    } else if !report.all_sent() {
        // As for `send`: unauthorized (5), unreachable (6), otherwise failed (1).
        crate::exit::for_kind_name(report.error_kind.as_deref())
    } else if a.strict && report.rejected > 0 {
        eprintln!(
            "hubsend: {} invalid line(s) and --strict was given",
            report.rejected
        );
        EXIT_REJECTED
    } else if report.interrupted && signals.received() > 0 {
        EXIT_INTERRUPTED
    } else {
        EXIT_OK
    }
}
