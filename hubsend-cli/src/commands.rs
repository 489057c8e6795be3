//! The `send`, `bench` and `info` commands: wiring from parsed arguments to the library, plus
//! the progress display and summaries. Each returns the process exit status.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::ingest::record::{self, SENSOR_ID};
use crate::ingest::report::{IngestReport, Progress, Reject};
use crate::ingest::stream::{self, IngestObserver, IngestOptions, Routing};
use crate::ingest::{self, InputFormat, Lines, ParsedLine, CHUNK_LINES};
use hubsend::{ErrorKind, Producer, ProducerOptions, Transport};
use serde_json::json;
use tokio::sync::mpsc;

use crate::signals::Signals;
use crate::text::{error_chain, sanitize};

/// Exit status: success.
pub(crate) const EXIT_OK: u8 = 0;
/// Exit status: a valid record was not stored, or the hub could not be used.
pub(crate) const EXIT_FAILED: u8 = 1;
/// Exit status: bad usage (e.g. no connection string).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status: `--strict` and some lines were invalid.
pub(crate) const EXIT_REJECTED: u8 = 3;
/// Exit status: a second stop signal abandoned the wait for the hub's outcomes; the summary
/// counts the events without a known outcome as `unknown`.
pub(crate) const EXIT_ABANDONED: u8 = 4;
/// Exit status: stopped by Ctrl-C or SIGTERM (everything read so far was stored).
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// Where and how to connect.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) connection_string: Option<String>,
    pub(crate) ca_file: Option<PathBuf>,
    /// Idempotent retries (`--idempotent`).
    pub(crate) idempotent: bool,
}

/// `--transport`, `--endpoint`, `--proxy`.
#[derive(Debug, Default)]
pub(crate) struct Network {
    pub(crate) transport: Option<Transport>,
    pub(crate) endpoint: Option<String>,
    pub(crate) proxy: Option<String>,
    /// Without `proxy`, take one from `HTTPS_PROXY` (honouring `NO_PROXY`).
    pub(crate) proxy_from_env: bool,
}

impl Network {
    /// The transport these options ask for: `--transport`, else what `--endpoint`'s scheme
    /// implies, else AMQP (the producer reports the one it uses).
    fn requested(&self) -> Transport {
        let implied = self.endpoint.as_deref().and_then(|e| {
            let scheme = e.split("://").next()?.to_ascii_lowercase();
            Some(match scheme.as_str() {
                "https" | "http" => Transport::Https,
                "wss" | "ws" => Transport::WebSockets,
                _ => Transport::Amqp,
            })
        });
        self.transport.or(implied).unwrap_or(Transport::Amqp)
    }
}

/// Arguments of `hubsend send`.
#[derive(Debug)]
pub(crate) struct SendConfig {
    pub(crate) connection: Connection,
    pub(crate) network: Network,
    pub(crate) input: String,
    pub(crate) csv: bool,
    pub(crate) partition_key_field: Option<String>,
    pub(crate) partition_id: Option<String>,
    pub(crate) max_in_flight: usize,
    pub(crate) rejects: Option<PathBuf>,
    pub(crate) json: bool,
    pub(crate) strict: bool,
    /// `--spool DIR`: store and forward through a disk spool.
    pub(crate) spool: Option<PathBuf>,
}

/// Arguments of `hubsend bench`.
#[derive(Debug)]
pub(crate) struct BenchConfig {
    pub(crate) connection: Connection,
    pub(crate) network: Network,
    pub(crate) events: u64,
    pub(crate) payload_bytes: usize,
    pub(crate) key_cardinality: u64,
    pub(crate) max_in_flight: usize,
    pub(crate) json: bool,
}

/// Arguments of `hubsend info`.
#[derive(Debug)]
pub(crate) struct InfoConfig {
    pub(crate) connection: Connection,
    pub(crate) json: bool,
}

fn no_connection_string() -> u8 {
    eprintln!(
        "hubsend: no connection string: pass --connection-string or set EVENTHUB_CONNECTION_STRING"
    );
    EXIT_USAGE
}

/// Connects, printing a clear reason on failure.
async fn connect(
    connection_string: &str,
    connection: &Connection,
    max_in_flight: usize,
    network: &Network,
) -> Result<Producer, u8> {
    let mut builder = Producer::builder()
        .connection_string(connection_string)
        .options(
            ProducerOptions::new()
                .max_in_flight(max_in_flight)
                .idempotent(connection.idempotent),
        );
    if let Some(transport) = network.transport {
        builder = builder.transport(transport);
    }
    if let Some(endpoint) = &network.endpoint {
        builder = builder.endpoint(endpoint);
    }
    // An explicit --proxy, else $HTTPS_PROXY unless $NO_PROXY exempts the host.
    builder = match &network.proxy {
        Some(proxy) => builder.proxy(proxy),
        None => builder.proxy_from_env(network.proxy_from_env),
    };
    if let Some(path) = connection.ca_file.as_ref() {
        match std::fs::read(path) {
            Ok(pem) => builder = builder.add_root_certificate_pem(pem),
            Err(e) => {
                eprintln!("hubsend: cannot read CA file {}: {e}", path.display());
                return Err(EXIT_FAILED);
            }
        }
    }
    builder.connect().await.map_err(|e| {
        let hint = match e.kind() {
            ErrorKind::Unauthorized => {
                " (check SharedAccessKeyName and SharedAccessKey, and that the policy may send)"
            }
            ErrorKind::NotFound => " (check EntityPath: the event hub does not exist)",
            ErrorKind::InvalidConnectionString => {
                " (expected Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…)"
            }
            _ => "",
        };
        eprintln!("hubsend: cannot connect: {}{hint}", error_chain(&e));
        // A transport, endpoint or proxy option that cannot work is a usage error.
        if e.kind() == ErrorKind::InvalidConfig {
            EXIT_USAGE
        } else {
            EXIT_FAILED
        }
    })
}

/// `report` as JSON with the `transport` field.
fn report_json(report: &IngestReport, transport: Transport) -> String {
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("transport".into(), transport.as_str().into());
    }
    value.to_string()
}

/// The longest input line or CSV row read: the hub's message limit. A record that long cannot
/// become an event the hub stores (the event adds its framing), so nothing longer is worth
/// holding in memory.
fn record_limit(producer: &Producer) -> usize {
    usize::try_from(producer.max_message_size()).unwrap_or(usize::MAX)
}

/// Shows progress on a terminal and reports rejects on stderr and in the rejects file.
pub(crate) struct CliObserver {
    terminal: bool,
    progress_shown: bool,
    rejects: Option<BufWriter<File>>,
    rejects_error: Option<std::io::Error>,
}

impl CliObserver {
    pub(crate) fn new(rejects: Option<BufWriter<File>>) -> Self {
        CliObserver {
            terminal: std::io::stderr().is_terminal(),
            progress_shown: false,
            rejects,
            rejects_error: None,
        }
    }

    fn clear_progress(&mut self) {
        if self.progress_shown {
            eprint!("\r\x1b[2K");
            self.progress_shown = false;
        }
    }

    /// Flushes the rejects file; returns the first write error, if any.
    pub(crate) fn finish(&mut self) -> Option<std::io::Error> {
        self.clear_progress();
        if let Some(mut w) = self.rejects.take() {
            if let Err(e) = w.flush() {
                self.rejects_error.get_or_insert(e);
            }
        }
        self.rejects_error.take()
    }
}

impl IngestObserver for CliObserver {
    fn rejected(&mut self, reject: &Reject) {
        self.clear_progress();
        // The reason may quote the input (or the hub): nothing in it may steer the terminal.
        let reason = sanitize(&reject.reason);
        eprintln!("line {}: {reason}", reject.line);
        if let Some(w) = &mut self.rejects {
            let entry = Reject {
                line: reject.line,
                reason: reason.into_owned(),
                raw: reject.raw.clone(),
            };
            if let Err(e) = writeln!(w, "{}", entry.to_json_line()) {
                self.rejects_error.get_or_insert(e);
                self.rejects = None;
            }
        }
    }

    fn progress(&mut self, p: &Progress) {
        if !self.terminal {
            return;
        }
        eprint!(
            "\r\x1b[2K{} records, {} sent, {} rejected, {} failed | {:.0} events/s, {:.2} MB/s | {} in flight, {} retries",
            p.records,
            p.sent,
            p.rejected,
            p.failed,
            p.events_per_sec(),
            p.mb_per_sec(),
            p.in_flight,
            p.retries
        );
        self.progress_shown = true;
    }
}

pub(crate) fn human_summary(report: &IngestReport) {
    let unknown = if report.unknown > 0 {
        format!(", {} without a known outcome", report.unknown)
    } else {
        String::new()
    };
    eprintln!(
        "hubsend: sent {} events ({:.2} MB) in {:.2} s: {:.0} events/s, {:.2} MB/s; {} rejected, {} failed{unknown}{}",
        report.sent,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.events_per_sec,
        report.mb_per_sec,
        report.rejected,
        report.failed,
        if report.interrupted { " (stopped early)" } else { "" }
    );
}

/// Streams `input`: the first signal drains, the second abandons the wait.
async fn run(
    producer: &Producer,
    input: mpsc::Receiver<Lines>,
    options: &IngestOptions,
    observer: &mut CliObserver,
    signals: &Signals,
) -> IngestReport {
    stream::ingest(
        producer,
        input,
        options,
        observer,
        signals.nth(1),
        signals.nth(2),
    )
    .await
}

/// Closes the connection, unless a second signal says not to wait for the hub any more.
async fn close(producer: Producer, signals: &Signals) {
    tokio::select! {
        closed = producer.close() => {
            if let Err(e) = closed {
                tracing::debug!(error = %e, "closing the connection failed");
            }
        }
        _ = signals.nth(2) => {}
    }
}

/// `hubsend send`.
pub(crate) async fn send(config: SendConfig) -> u8 {
    let Some(cs) = config.connection.connection_string.as_deref() else {
        return no_connection_string();
    };
    let format = if config.csv {
        InputFormat::Csv
    } else {
        InputFormat::Ndjson
    };
    // Opened before connecting so a wrong path fails at once; read only once the hub's message
    // limit is known, since that limit caps every line and row.
    let source: Box<dyn std::io::Read + Send> = if config.input == "-" {
        Box::new(std::io::stdin())
    } else {
        match File::open(&config.input) {
            Ok(file) => Box::new(file),
            Err(e) => {
                eprintln!("hubsend: cannot open input {}: {e}", config.input);
                return EXIT_FAILED;
            }
        }
    };
    let rejects = match &config.rejects {
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
    if let Some(dir) = config.spool.clone() {
        return crate::spooled::send(config, &dir, source, rejects, signals).await;
    }
    let connecting = connect(
        cs,
        &config.connection,
        config.max_in_flight,
        &config.network,
    );
    let producer = tokio::select! {
        connected = connecting => match connected {
            Ok(p) => p,
            Err(code) => return code,
        },
        _ = signals.nth(1) => {
            // Stopped before anything was read.
            let report = IngestReport {
                interrupted: true,
                ..IngestReport::default()
            };
            human_summary(&report);
            if config.json {
                println!("{}", report_json(&report, config.network.requested()));
            }
            return EXIT_INTERRUPTED;
        }
    };
    let transport = producer.transport();
    let input = ingest::spawn_reader(source, format, record_limit(&producer));
    let routing = match (config.partition_key_field, config.partition_id) {
        (Some(field), _) => Routing::PartitionKeyField(field),
        (None, Some(id)) => Routing::PartitionId(id),
        (None, None) => Routing::RoundRobin,
    };
    let options = IngestOptions::new().routing(routing);
    let mut observer = CliObserver::new(rejects);
    let mut report = run(&producer, input, &options, &mut observer, &signals).await;
    let rejects_error = observer.finish();
    let abandoned = signals.received() >= 2;
    let counters = producer.clone();
    if !abandoned {
        close(producer, &signals).await;
    }
    if config.connection.idempotent {
        report.duplicates_avoided = Some(counters.stats().duplicates_avoided);
    }

    human_summary(&report);
    if let Some(error) = &report.error {
        eprintln!("hubsend: {error}");
    }
    if let Some(e) = &rejects_error {
        eprintln!("hubsend: writing the rejects file failed: {e}");
    }
    if config.json {
        println!("{}", report_json(&report, transport));
    }
    if abandoned {
        eprintln!(
            "hubsend: stopped without waiting for the hub: {} event(s) have no known outcome",
            report.unknown
        );
        EXIT_ABANDONED
    } else if !report.all_sent() || rejects_error.is_some() {
        EXIT_FAILED
    } else if config.strict && report.rejected > 0 {
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

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 when unknown.
fn peak_rss_mb() -> f64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Feeds `count` synthetic records into a channel for [`stream::ingest`].
fn synthetic_input(count: u64, payload_bytes: usize, cardinality: u64) -> mpsc::Receiver<Lines> {
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let mut next = 0;
        while next < count {
            let end = count.min(next + CHUNK_LINES as u64);
            let chunk = (next..end)
                .map(|i| {
                    Ok(ParsedLine {
                        line: i + 1,
                        raw: String::new(),
                        result: Ok(record::synthetic_record(i, payload_bytes, cardinality)),
                    })
                })
                .collect();
            if tx.send(chunk).await.is_err() {
                break;
            }
            next = end;
        }
    });
    rx
}

/// A test hub in this process for `bench` without a connection string: its connection string
/// and the hub (which stops when dropped). It keeps only the newest events (like the service's
/// retention), so the peak RSS reported is the producer's and not a store of everything sent.
#[cfg(feature = "local-hub")]
async fn start_local_hub(
    quiet: bool,
    network: &mut Network,
) -> Result<(String, hubsend_testhub::TestHub), u8> {
    let transport = network.requested();
    if transport == Transport::WebSockets && network.endpoint.is_none() {
        eprintln!(
            "hubsend: the local test hub has no WebSocket listener; give --connection-string"
        );
        return Err(EXIT_USAGE);
    }
    let hub_config = hubsend_testhub::HubConfig::new()
        .retain_events(Some(100_000))
        .rest(transport == Transport::Https);
    match hubsend_testhub::TestHub::start(hub_config).await {
        Ok(hub) => {
            if network.endpoint.is_none() {
                network.endpoint = hub.rest_url();
            }
            if !quiet {
                eprintln!(
                    "hubsend: no connection string; using a local test hub on {}",
                    network
                        .endpoint
                        .clone()
                        .unwrap_or_else(|| hub.addr().to_string())
                );
            }
            Ok((hub.connection_string(), hub))
        }
        Err(e) => {
            eprintln!("hubsend: cannot start the local test hub: {e}");
            Err(EXIT_FAILED)
        }
    }
}

/// Without the `local-hub` feature, `bench` needs a connection string like every command.
#[cfg(not(feature = "local-hub"))]
async fn start_local_hub(_quiet: bool, _network: &mut Network) -> Result<(String, NoLocalHub), u8> {
    Err(no_connection_string())
}

/// Stands for the local hub a build without `local-hub` never has.
#[cfg(not(feature = "local-hub"))]
struct NoLocalHub;

/// `hubsend bench`.
pub(crate) async fn bench(mut config: BenchConfig) -> u8 {
    let signals = Signals::install();
    // Without a connection string, benchmark against a local test hub in this process.
    let (cs, _local_hub) = match &config.connection.connection_string {
        Some(cs) => (cs.clone(), None),
        None => match start_local_hub(config.json, &mut config.network).await {
            Ok((cs, hub)) => (cs, Some(hub)),
            Err(code) => return code,
        },
    };
    let producer = match connect(
        &cs,
        &config.connection,
        config.max_in_flight,
        &config.network,
    )
    .await
    {
        Ok(p) => p,
        Err(code) => return code,
    };
    let transport = producer.transport();
    let routing = if config.key_cardinality > 0 {
        Routing::PartitionKeyField(SENSOR_ID.to_owned())
    } else {
        Routing::RoundRobin
    };
    let options = IngestOptions::new()
        .routing(routing)
        .max_open_batches(config.key_cardinality.clamp(1, 1024) as usize)
        .linger(Duration::from_millis(200));
    let input = synthetic_input(config.events, config.payload_bytes, config.key_cardinality);
    let mut observer = CliObserver::new(None);
    let report = run(&producer, input, &options, &mut observer, &signals).await;
    observer.finish();
    let counters = producer.clone();
    if signals.received() < 2 {
        close(producer, &signals).await;
    }

    let peak = peak_rss_mb();
    let mut summary = json!({
        "events": report.sent,
        "failed": report.failed,
        "bytes": report.bytes,
        "seconds": report.seconds,
        "events_per_sec": report.events_per_sec,
        "mb_per_sec": report.mb_per_sec,
        "p50_ms": report.p50_ms,
        "p99_ms": report.p99_ms,
        "peak_rss_mb": peak,
        "batches": report.batches,
        "payload_bytes": config.payload_bytes,
        "partition_keys": report.partition_keys,
        "local_hub": config.connection.connection_string.is_none(),
        "transport": transport.as_str(),
    });
    if config.connection.idempotent {
        summary["duplicates_avoided"] = json!(counters.stats().duplicates_avoided);
    }
    eprintln!(
        "hubsend bench: {} events ({:.2} MB) in {:.2} s: {:.0} events/s, {:.2} MB/s; batch latency p50 {:.1} ms, p99 {:.1} ms; peak RSS {:.1} MB; over {transport}",
        report.sent,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.events_per_sec,
        report.mb_per_sec,
        report.p50_ms,
        report.p99_ms,
        peak
    );
    if let Some(error) = &report.error {
        eprintln!("hubsend: {error}");
    }
    if config.json {
        println!("{summary}");
    }
    if report.all_sent() && report.sent == config.events {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// `hubsend info`.
pub(crate) async fn info(config: InfoConfig) -> u8 {
    let Some(cs) = config.connection.connection_string.as_deref() else {
        return no_connection_string();
    };
    let producer = match connect(cs, &config.connection, 1, &Network::default()).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let hub = match producer.hub_properties().await {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "hubsend: cannot read the hub's properties: {}",
                error_chain(&e)
            );
            return EXIT_FAILED;
        }
    };
    let mut partitions = Vec::new();
    for id in &hub.partition_ids {
        match producer.partition_properties(id).await {
            Ok(p) => partitions.push(p),
            Err(e) => {
                eprintln!(
                    "hubsend: cannot read partition {id}'s properties: {}",
                    error_chain(&e)
                );
                return EXIT_FAILED;
            }
        }
    }
    if let Err(e) = producer.close().await {
        tracing::debug!(error = %e, "closing the connection failed");
    }
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| record::format_timestamp(&t));
    if config.json {
        let parts: Vec<_> = partitions
            .iter()
            .map(|p| {
                json!({
                    "id": p.id,
                    "begin_sequence_number": p.begin_sequence_number,
                    "last_enqueued_sequence_number": p.last_enqueued_sequence_number,
                    "last_enqueued_offset": p.last_enqueued_offset,
                    "last_enqueued_time": time(p.last_enqueued_time),
                    "is_empty": p.is_empty,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "name": hub.name,
                "created_at": time(hub.created_at),
                "partition_ids": hub.partition_ids,
                "partitions": parts,
            })
        );
    } else {
        println!("hub:        {}", hub.name);
        if let Some(created) = time(hub.created_at) {
            println!("created at: {created}");
        }
        println!("partitions: {}", hub.partition_ids.join(", "));
        println!();
        println!(
            "{:>9}  {:>14}  {:>14}  {:>14}  {:<24}  empty",
            "partition", "begin seq", "last seq", "last offset", "last enqueued"
        );
        for p in &partitions {
            println!(
                "{:>9}  {:>14}  {:>14}  {:>14}  {:<24}  {}",
                p.id,
                p.begin_sequence_number,
                p.last_enqueued_sequence_number,
                p.last_enqueued_offset,
                time(p.last_enqueued_time).unwrap_or_else(|| "-".into()),
                if p.is_empty { "yes" } else { "no" }
            );
        }
    }
    EXIT_OK
}
