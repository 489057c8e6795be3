//! The `send`, `bench` and `info` commands: wiring from parsed arguments to the library, plus
//! the progress display and summaries. Each returns the process exit status.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::exit;
use crate::ingest::record::{self, Schema, SENSOR_ID};
use crate::ingest::report::{IngestReport, Progress, Reject};
use crate::ingest::stream::{self, IngestObserver, IngestOptions, Routing};
use crate::ingest::{self, InputFormat, Lines, ParsedLine, CHUNK_LINES};
use crate::progress::{CountingReader, ProgressMode, ProgressView};
use crate::style::EventStyle;
use hubsend::{ErrorKind, Producer, ProducerBuilder, ProducerOptions, Transport};
use serde_json::json;
use tokio::sync::mpsc;

use crate::signals::Signals;
use crate::text::{error_chain, sanitize, shown};

/// How much the command prints (`-q`, `-v`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ui {
    /// Only errors on standard error.
    pub(crate) quiet: bool,
    /// Also the connection and the hub's limits.
    pub(crate) verbose: bool,
}

/// Why a command could not run: the message (without secrets), the `error_kind` of `--json`
/// and the exit status.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) kind: String,
    pub(crate) code: u8,
}

impl Failure {
    /// A usage failure (exit status 2).
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            kind: exit::KIND_USAGE.to_owned(),
            code: exit::USAGE,
        }
    }

    /// Prints the message on standard error.
    pub(crate) fn print(&self) {
        eprintln!("hubsend: {}", self.message);
    }

    /// `report` with this failure's `error` and `error_kind`.
    pub(crate) fn into_report(self, report: IngestReport) -> IngestReport {
        IngestReport {
            error: Some(self.message),
            error_kind: Some(self.kind),
            ..report
        }
    }
}

/// Where and how to connect.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) connection_string: Option<String>,
    pub(crate) ca_file: Option<PathBuf>,
    /// Idempotent retries (`--idempotent`).
    pub(crate) idempotent: bool,
    /// `--event-hub`, for namespace-level connection strings.
    pub(crate) event_hub: Option<String>,
    /// `--connect-timeout`.
    pub(crate) connect_timeout: Option<Duration>,
}

/// `--transport`, `--endpoint`, `--proxy`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Network {
    pub(crate) transport: Option<Transport>,
    pub(crate) endpoint: Option<String>,
    pub(crate) proxy: Option<String>,
    /// Without `proxy`, take one from `HTTPS_PROXY` (honouring `NO_PROXY`).
    pub(crate) proxy_from_env: bool,
}

impl Network {
    /// `builder` going the way these options say (used with and without `--spool`).
    pub(crate) fn apply(&self, mut builder: ProducerBuilder) -> ProducerBuilder {
        if let Some(transport) = self.transport {
            builder = builder.transport(transport);
        }
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint(endpoint);
        }
        // An explicit --proxy, else $HTTPS_PROXY unless $NO_PROXY exempts the host.
        match &self.proxy {
            Some(proxy) => builder.proxy(proxy),
            None => builder.proxy_from_env(self.proxy_from_env),
        }
    }

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
    /// `--schema`.
    pub(crate) schema: Schema,
    /// `--content-type` and `--property`.
    pub(crate) style: EventStyle,
    /// `--progress`.
    pub(crate) progress: ProgressMode,
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
    /// `--progress`.
    pub(crate) progress: ProgressMode,
}

/// Arguments of `hubsend info`.
#[derive(Debug)]
pub(crate) struct InfoConfig {
    pub(crate) connection: Connection,
    pub(crate) json: bool,
}

fn no_connection_string() -> Failure {
    Failure::usage(
        "no connection string: pass --connection-string or set EVENTHUB_CONNECTION_STRING",
    )
}

/// The producer options of `connection`.
pub(crate) fn producer_options(connection: &Connection, max_in_flight: usize) -> ProducerOptions {
    let options = ProducerOptions::new()
        .max_in_flight(max_in_flight)
        .idempotent(connection.idempotent);
    match connection.connect_timeout {
        Some(timeout) => options.connect_timeout(timeout),
        None => options,
    }
}

/// Reads `--ca-file`.
pub(crate) fn read_ca_file(connection: &Connection) -> Result<Option<Vec<u8>>, Failure> {
    let Some(path) = connection.ca_file.as_ref() else {
        return Ok(None);
    };
    std::fs::read(path).map(Some).map_err(|e| {
        Failure::usage(format!(
            "cannot read CA file {}: {e}",
            shown(&path.to_string_lossy())
        ))
    })
}

/// The environment variable `send` and `info` read when `--connection-string` is not given.
const CONNECTION_STRING_ENV: &str = "EVENTHUB_CONNECTION_STRING";

/// Connects; on failure, a clear reason with its causes and a hint.
async fn connect(
    connection_string: &str,
    connection: &Connection,
    max_in_flight: usize,
    network: &Network,
) -> Result<Producer, Failure> {
    let mut builder = Producer::builder()
        .connection_string(connection_string)
        .options(producer_options(connection, max_in_flight));
    if let Some(hub) = &connection.event_hub {
        builder = builder.event_hub(hub);
    }
    builder = network.apply(builder);
    if let Some(pem) = read_ca_file(connection)? {
        builder = builder.add_root_certificate_pem(pem);
    }
    if let Some(runtime) = network_runtime() {
        builder = builder.runtime(runtime);
    }
    builder.connect().await.map_err(|e| connect_failure(&e))
}

/// The runtime of the producer's network work (AMQP engine, TLS, link tasks): one thread of
/// its own, so that it runs beside the run's thread (which turns records into batches) and
/// the input reader's. On one thread with the rest, `hubsend send` of 2M NDJSON lines made
/// ~1.2M lines/s; with this, ~1.5M (2 cores, TLS test hub). Kept for the whole process and
/// never dropped (dropping a runtime inside another one's context panics); `None` if it
/// cannot be started, and the producer then runs on the caller's runtime.
fn network_runtime() -> Option<tokio::runtime::Handle> {
    static NETWORK: std::sync::OnceLock<Option<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    NETWORK
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("hubsend-net")
                .enable_all()
                .build()
                .map_err(|e| tracing::warn!(error = %e, "no network thread; running on one"))
                .ok()
        })
        .as_ref()
        .map(|runtime| runtime.handle().clone())
}

/// Why connecting failed, as `send` reports it with and without `--spool`: the error with its
/// cause and a hint at what to check, its `error_kind`, and the exit status for its kind.
pub(crate) fn connect_failure(e: &hubsend::Error) -> Failure {
    let hint = match e.kind() {
        ErrorKind::Unauthorized => {
            " (check SharedAccessKeyName and SharedAccessKey, and that the policy may send)"
        }
        ErrorKind::NotFound => " (check EntityPath: the event hub does not exist)",
        ErrorKind::InvalidConnectionString => {
            " (expected Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…)"
        }
        ErrorKind::Connection | ErrorKind::Timeout => unreachable_hint(e),
        _ => "",
    };
    Failure {
        message: format!("cannot connect: {}{hint}", error_chain(e)),
        kind: e.kind().to_string(),
        // A transport, endpoint or proxy option that cannot work is a usage error.
        code: exit::for_kind(e.kind()),
    }
}

/// What to check when the hub cannot be reached, from the innermost I/O error's kind (an
/// unknown host and a refused connection read differently).
fn unreachable_hint(error: &hubsend::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    " (the host answered but nothing accepts connections on that port)"
                }
                std::io::ErrorKind::TimedOut => " (no answer: a firewall, or the wrong address?)",
                _ if io.to_string().contains("lookup") => {
                    " (the host name does not resolve: check Endpoint)"
                }
                _ => "",
            };
        }
        source = e.source();
    }
    if error.kind() == ErrorKind::Timeout {
        " (no answer in time: a firewall, the wrong port, or raise --connect-timeout)"
    } else {
        ""
    }
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

/// Shows progress and reports rejects on stderr and in the rejects file.
pub(crate) struct CliObserver {
    view: ProgressView,
    quiet: bool,
    rejects: Option<BufWriter<File>>,
    rejects_error: Option<std::io::Error>,
}

impl CliObserver {
    /// Reports rejects (on stderr unless `quiet`, and to `rejects`) and shows progress in
    /// `view`.
    pub(crate) fn new(rejects: Option<BufWriter<File>>, view: ProgressView, quiet: bool) -> Self {
        CliObserver {
            view,
            quiet,
            rejects,
            rejects_error: None,
        }
    }

    /// Flushes the rejects file; returns the first write error, if any.
    pub(crate) fn finish(&mut self) -> Option<std::io::Error> {
        self.view.finish();
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
        // The reason may quote the input (or the hub): nothing in it may steer the terminal.
        let reason = sanitize(&reject.reason);
        if !self.quiet {
            self.view
                .println(&format!("line {}: {reason}", reject.line));
        }
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
        self.view.update(p);
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

/// Prints `report` as the `--json` summary when asked to.
fn print_json(json: bool, report: &IngestReport, transport: Transport) {
    if json {
        println!("{}", report_json(report, transport));
    }
}

/// `send` failed before reading: the message, the `--json` summary, the status.
fn send_failed(config: &SendConfig, failure: Failure) -> u8 {
    failure.print();
    let code = failure.code;
    let report = failure.into_report(IngestReport::default());
    print_json(config.json, &report, config.network.requested());
    code
}

/// Opens `--input` (or FILE); `-` is standard input. The byte counter counts what is read,
/// for the progress bar; the size is known for regular files.
fn open_input(
    path: &str,
    read: &Arc<AtomicU64>,
) -> Result<(Box<dyn std::io::Read + Send>, Option<u64>), Failure> {
    if path == "-" {
        let stdin = CountingReader::new(std::io::stdin(), read.clone());
        return Ok((Box::new(stdin), None));
    }
    let file = File::open(path)
        .map_err(|e| Failure::usage(format!("cannot open input {}: {e}", shown(path))))?;
    let size = file
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    Ok((Box::new(CountingReader::new(file, read.clone())), size))
}

/// `hubsend send`.
pub(crate) async fn send(config: SendConfig, ui: Ui) -> u8 {
    let Some(cs) = config.connection.connection_string.clone() else {
        return send_failed(&config, no_connection_string());
    };
    let format = if config.csv {
        InputFormat::Csv
    } else {
        InputFormat::Ndjson
    };
    // Opened before connecting so a wrong path fails at once; read only once the hub's message
    // limit is known, since that limit caps every line and row.
    let read = Arc::new(AtomicU64::new(0));
    let (source, size) = match open_input(&config.input, &read) {
        Ok(opened) => opened,
        Err(failure) => return send_failed(&config, failure),
    };
    let rejects = match &config.rejects {
        None => None,
        Some(path) => match File::create(path) {
            Ok(f) => Some(BufWriter::new(f)),
            Err(e) => {
                let failure = Failure::usage(format!(
                    "cannot create rejects file {}: {e}",
                    shown(&path.to_string_lossy())
                ));
                return send_failed(&config, failure);
            }
        },
    };
    let signals = Signals::install();
    if let Some(dir) = config.spool.clone() {
        return crate::spooled::send(config, &dir, source, rejects, signals, ui).await;
    }
    let connecting = connect(
        &cs,
        &config.connection,
        config.max_in_flight,
        &config.network,
    );
    let producer = tokio::select! {
        connected = connecting => match connected {
            Ok(p) => p,
            Err(failure) => return send_failed(&config, failure),
        },
        _ = signals.nth(1) => {
            // Stopped before anything was read.
            let report = IngestReport {
                interrupted: true,
                ..IngestReport::default()
            };
            if !ui.quiet {
                human_summary(&report);
            }
            print_json(config.json, &report, config.network.requested());
            return exit::INTERRUPTED;
        }
    };
    let transport = producer.transport();
    if ui.verbose {
        eprintln!(
            "hubsend: connected to event hub {} over {transport}; the hub's message limit is {} bytes",
            sanitize(producer.event_hub()),
            producer.max_message_size()
        );
    }
    let input = ingest::spawn_reader(source, format, config.schema, record_limit(&producer));
    let routing = match (config.partition_key_field, config.partition_id) {
        (Some(field), _) => Routing::PartitionKeyField(field),
        (None, Some(id)) => Routing::PartitionId(id),
        (None, None) => Routing::RoundRobin,
    };
    let options = IngestOptions::new()
        .routing(routing)
        .style(config.style.clone());
    let view = ProgressView::new(config.progress, ui.quiet, Some(read), size);
    let mut observer = CliObserver::new(rejects, view, ui.quiet);
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
    if let Some(e) = &rejects_error {
        report
            .error
            .get_or_insert_with(|| format!("writing the rejects file failed: {e}"));
        report
            .error_kind
            .get_or_insert_with(|| exit::KIND_INPUT.to_owned());
    }

    if !ui.quiet {
        human_summary(&report);
    }
    if let Some(error) = &report.error {
        eprintln!("hubsend: {error}");
    }
    print_json(config.json, &report, transport);
    if abandoned {
        eprintln!(
            "hubsend: stopped without waiting for the hub: {} event(s) have no known outcome",
            report.unknown
        );
        exit::ABANDONED
    } else if rejects_error.is_some() {
        exit::FAILED
    } else if !report.all_sent() {
        exit::for_kind_name(report.error_kind.as_deref())
    } else if config.strict && report.rejected > 0 {
        eprintln!(
            "hubsend: {} invalid line(s) and --strict was given",
            report.rejected
        );
        exit::REJECTED
    } else if report.interrupted && signals.received() > 0 {
        exit::INTERRUPTED
    } else {
        exit::OK
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 when unknown.
// Our own: one line of /proc/self/status is a few lines of code, and the crates that read it
// (procfs, sysinfo, memory-stats) bring far more than this one number needs.
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
                        raw: None,
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
) -> Result<(String, hubsend_testhub::TestHub), Failure> {
    let transport = network.requested();
    if transport == Transport::WebSockets && network.endpoint.is_none() {
        return Err(Failure::usage(
            "the local test hub has no WebSocket listener; give --connection-string",
        ));
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
        Err(e) => Err(Failure {
            message: format!("cannot start the local test hub: {}", error_chain(&e)),
            kind: exit::KIND_INPUT.to_owned(),
            code: exit::FAILED,
        }),
    }
}

/// Without the `local-hub` feature, `bench` needs a connection string like every command.
#[cfg(not(feature = "local-hub"))]
async fn start_local_hub(
    _quiet: bool,
    _network: &mut Network,
) -> Result<(String, NoLocalHub), Failure> {
    Err(Failure::usage(
        "no --connection-string, and this build has no local test hub (feature `local-hub`)",
    ))
}

/// Stands for the local hub a build without `local-hub` never has.
#[cfg(not(feature = "local-hub"))]
struct NoLocalHub;

/// The `--json` object of `bench`.
fn bench_json(
    config: &BenchConfig,
    report: &IngestReport,
    peak: f64,
    transport: Transport,
) -> serde_json::Value {
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
    if let (Some(error), Some(kind)) = (&report.error, &report.error_kind) {
        summary["error"] = json!(error);
        summary["error_kind"] = json!(kind);
    }
    summary
}

/// `bench` failed before sending: the message, the `--json` summary, the status.
fn bench_failed(config: &BenchConfig, failure: Failure) -> u8 {
    failure.print();
    let code = failure.code;
    let report = failure.into_report(IngestReport::default());
    if config.json {
        println!(
            "{}",
            bench_json(config, &report, peak_rss_mb(), config.network.requested())
        );
    }
    code
}

/// `hubsend bench`.
pub(crate) async fn bench(mut config: BenchConfig, ui: Ui) -> u8 {
    let signals = Signals::install();
    // Without --connection-string, benchmark against a local test hub in this process.
    let (cs, _local_hub) = match &config.connection.connection_string {
        Some(cs) => (cs.clone(), None),
        None => {
            if std::env::var_os(CONNECTION_STRING_ENV).is_some() && !ui.quiet {
                eprintln!(
                    "hubsend: bench ignores ${CONNECTION_STRING_ENV}; give --connection-string to load a real hub"
                );
            }
            match start_local_hub(config.json || ui.quiet, &mut config.network).await {
                Ok((cs, hub)) => (cs, Some(hub)),
                Err(failure) => return bench_failed(&config, failure),
            }
        }
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
        Err(failure) => return bench_failed(&config, failure),
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
    let view = ProgressView::new(config.progress, ui.quiet, None, None);
    let mut observer = CliObserver::new(None, view, ui.quiet);
    let report = run(&producer, input, &options, &mut observer, &signals).await;
    observer.finish();
    let counters = producer.clone();
    if signals.received() < 2 {
        close(producer, &signals).await;
    }

    let peak = peak_rss_mb();
    let mut summary = bench_json(&config, &report, peak, transport);
    if config.connection.idempotent {
        summary["duplicates_avoided"] = json!(counters.stats().duplicates_avoided);
    }
    if !ui.quiet {
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
    }
    if let Some(error) = &report.error {
        eprintln!("hubsend: {error}");
    }
    if config.json {
        println!("{summary}");
    }
    if report.all_sent() && report.sent == config.events {
        exit::OK
    } else if signals.received() >= 2 {
        exit::ABANDONED
    } else if report.all_sent() && signals.received() > 0 {
        exit::INTERRUPTED
    } else {
        exit::for_kind_name(report.error_kind.as_deref())
    }
}

/// `info` failed: the message, `{"error":…,"error_kind":…}` with `--json`, the status.
fn info_failed(json: bool, failure: Failure) -> u8 {
    failure.print();
    if json {
        println!(
            "{}",
            json!({"error": failure.message, "error_kind": failure.kind})
        );
    }
    failure.code
}

/// `hubsend info`.
pub(crate) async fn info(config: InfoConfig, _ui: Ui) -> u8 {
    let Some(cs) = config.connection.connection_string.as_deref() else {
        return info_failed(config.json, no_connection_string());
    };
    let producer = match connect(cs, &config.connection, 1, &Network::default()).await {
        Ok(p) => p,
        Err(failure) => return info_failed(config.json, failure),
    };
    let read_failed = |what: String, e: hubsend::Error| Failure {
        message: format!("cannot read {what}: {}", error_chain(&e)),
        kind: e.kind().to_string(),
        code: exit::for_kind(e.kind()),
    };
    let hub = match producer.hub_properties().await {
        Ok(h) => h,
        Err(e) => {
            return info_failed(config.json, read_failed("the hub's properties".into(), e));
        }
    };
    let mut partitions = Vec::new();
    for id in &hub.partition_ids {
        match producer.partition_properties(id).await {
            Ok(p) => partitions.push(p),
            Err(e) => {
                let what = format!("partition {}'s properties", sanitize(id));
                return info_failed(config.json, read_failed(what, e));
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
    exit::OK
}
