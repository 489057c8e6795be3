//! `hubsend`: stream telemetry files into Azure Event Hubs, benchmark a hub, inspect a hub.
//!
//! This file only parses arguments; the commands live in [`commands`], the record parsing and
//! streaming in [`ingest`].

mod commands;
mod exit;
mod ingest;
mod iot;
mod progress;
mod signals;
mod spooled;
mod style;
mod text;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::progress::ProgressMode;

/// mimalloc, not the system allocator: every line's body is allocated on the reader thread
/// and freed on a runtime thread once sent, a cross-thread pattern glibc's malloc serves with
/// arena locks (about a fifth of `hubsend send`'s CPU with it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `hubsend send` accepts, for `--help`: the telemetry schema spelled out.
const SEND_LONG_ABOUT: &str = "\
Validate NDJSON or CSV records and send them as batched events.

Input: a file named as the argument or with --input, or standard input (`-`, the default).
NDJSON is one JSON object per line; CSV has a header row naming the fields.

The telemetry schema (--schema telemetry, the default): every record is a JSON object with
  sensor_id  a non-empty string
  timestamp  an RFC 3339 time, e.g. 2025-08-19T10:30:00.250+02:00 (sent normalised to UTC, ...Z)
  value      a number or a string (CSV: a number when the cell parses as one)
and any other fields, passed through unchanged. Each record is sent as its JSON encoding with
content type application/json. A line that breaks these rules is reported with its line
number and reason (and written to --rejects) and not sent; --strict makes that exit 3.

--schema none sends every NDJSON object byte for byte as the line holds it, and every CSV row
as a JSON object of header name to cell text, with no field required.

Example:
  hubsend send readings.ndjson --partition-key-field sensor_id --property site=plant-7";

/// The end of `hubsend send --help`: stopping and exit statuses (scripts depend on them).
const SEND_AFTER_HELP: &str = "\
Stopping: the first Ctrl-C or SIGTERM stops reading, sends what is buffered, waits for the hub's
outcomes and prints the summary; a second one stops at once and counts the events still without
an outcome as `unknown`.

Lines and CSV rows longer than the hub's message limit are rejected with their line number.

--json prints one summary object as the last line of standard output on every exit, failures
included (then with `error` and `error_kind`).

Exit status:
  0    every valid record was stored by the hub
  1    the hub refused a valid record or it could not be stored (or the input could not be read)
  2    usage error: bad arguments, no or a malformed connection string, an unreadable file
  3    --strict and some lines were invalid
  4    a second signal stopped the wait for the hub's outcomes
  5    unauthorized: the hub refused the credentials
  6    the hub could not be reached: unknown host, connection refused, TLS failure, timeout
  130  stopped by Ctrl-C or SIGTERM; everything read was stored";

/// The environment variable read when `--connection-string` is not given.
const CONNECTION_STRING_ENV: &str = "EVENTHUB_CONNECTION_STRING";

#[derive(Debug, Parser)]
#[command(
    name = "hubsend",
    version,
    about = "Stream telemetry into Azure Event Hubs over AMQP 1.0"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Print only errors: no progress, no per-line rejects, no summary on standard error
    /// (--json output and --rejects files are unchanged).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,

    /// Say more: -v the connection and the hub's limits, -vv debug logs, -vvv trace logs
    /// (RUST_LOG, when set, chooses the logs instead).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate NDJSON or CSV records and send them as batched events.
    #[command(long_about = SEND_LONG_ABOUT, after_help = SEND_AFTER_HELP)]
    Send(SendArgs),
    /// Send synthetic telemetry at full speed and report throughput and latency. Without
    /// --connection-string on the command line it runs against a local test hub in this
    /// process ($EVENTHUB_CONNECTION_STRING is not read, so a real hub is never loaded by
    /// accident).
    #[command(mut_arg("connection_string", |a| a
        .env(None::<&str>)
        .help("Event Hubs connection string of the hub to load; without it, a local test hub")))]
    Bench(BenchArgs),
    /// Show the hub's name, partitions and per-partition properties.
    Info(InfoArgs),
    /// IoT Hub: send telemetry records as device-to-cloud messages (`hubsend iot send`).
    Iot(iot::IotArgs),
}

/// The connection string argument shared by every command.
#[derive(Debug, Args)]
struct ConnectionArgs {
    /// Event Hubs connection string (with EntityPath); defaults to $EVENTHUB_CONNECTION_STRING.
    #[arg(long, env = CONNECTION_STRING_ENV, hide_env_values = true)]
    connection_string: Option<String>,

    /// Extra trusted root CA certificate (PEM), for private or test endpoints.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,

    /// The event hub to use, for a namespace-level connection string (one without
    /// EntityPath). With EntityPath it must name the same hub.
    #[arg(long, value_name = "NAME")]
    event_hub: Option<String>,

    /// Give up connecting (TCP, TLS, authorisation) after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    connect_timeout: Option<Duration>,
}

/// A positive number of seconds, e.g. `10` or `2.5`.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err("expected a positive number of seconds".to_owned()),
    }
}

/// The positional input file: `-` or a path. A value that looks like a secret (a connection
/// string or a key pasted in the wrong place) is refused, and never shown.
fn parse_input_file(text: &str) -> Result<String, String> {
    if text::looks_secret(text) {
        return Err(
            "this looks like a connection string or key; give it with --connection-string"
                .to_owned(),
        );
    }
    if text != "-" && !std::path::Path::new(text).exists() {
        return Err("no such file".to_owned());
    }
    Ok(text.to_owned())
}

/// How `send` and `bench` reach the hub.
#[derive(Debug, Args)]
struct NetworkArgs {
    /// How events travel: amqp (AMQP over TLS, port 5671), websockets (AMQP over WebSockets,
    /// port 443) or https (the Event Hubs REST API, port 443). Default: amqp, or what
    /// --endpoint's scheme implies.
    #[arg(long, value_enum, value_name = "TRANSPORT")]
    transport: Option<TransportArg>,

    /// Dial this address instead of the namespace (tokens still name the namespace):
    /// amqps://, wss://, https:// (amqp://, ws://, http:// to loopback only). Its scheme
    /// implies the transport.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,

    /// HTTP proxy, http://[user:pass@]host:port (CONNECT tunnel for amqp and websockets, the
    /// HTTP client's proxy for https). Default: $HTTPS_PROXY, unless $NO_PROXY exempts the
    /// host.
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

/// The `--transport` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    /// AMQP 1.0 over TLS (port 5671).
    Amqp,
    /// AMQP 1.0 over WebSockets (port 443).
    Websockets,
    /// The Event Hubs HTTPS REST API (port 443).
    Https,
}

/// `--schema` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SchemaArg {
    /// sensor_id, timestamp and value required (see `hubsend send --help`).
    Telemetry,
    /// Any JSON object or CSV row, sent as it is.
    None,
}

/// Input formats of `hubsend send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One JSON object per line.
    Ndjson,
    /// Comma-separated values with a header row.
    Csv,
}

#[derive(Debug, Args)]
struct SendArgs {
    #[command(flatten)]
    connection: ConnectionArgs,

    #[command(flatten)]
    network: NetworkArgs,

    /// File to read, or `-` for standard input (the default).
    #[arg(value_name = "FILE", value_parser = parse_input_file, conflicts_with = "input")]
    file: Option<String>,

    /// File to read, or `-` for standard input (the default); the same as FILE.
    #[arg(long, value_name = "PATH")]
    input: Option<String>,

    /// Input format.
    #[arg(long, value_enum, default_value_t = Format::Ndjson)]
    format: Format,

    /// Which records are valid: telemetry (sensor_id, timestamp, value; see above) or none
    /// (any JSON object or CSV row, sent as it is).
    #[arg(long, value_enum, default_value_t = SchemaArg::Telemetry)]
    schema: SchemaArg,

    /// Content type of every event (default application/json).
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,

    /// Add an application property to every event (string value); repeat for more.
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = style::parse_property)]
    properties: Vec<(String, String)>,

    /// Progress display: auto (a bar when standard error is a terminal), always (a plain line
    /// every few seconds when it is not), never.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,

    /// Route each record by this field's value (string form) as its partition key.
    #[arg(long, value_name = "FIELD", conflicts_with = "partition_id")]
    partition_key_field: Option<String>,

    /// Send every record to this partition.
    #[arg(long, value_name = "ID")]
    partition_id: Option<String>,

    /// At most this many batches await the hub's outcome at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,

    /// Write every invalid line to this file as one JSON object per line.
    #[arg(long, value_name = "PATH")]
    rejects: Option<PathBuf>,

    /// Print the summary as one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,

    /// Idempotent retries: the hub drops what a retry sends again after it was stored, so a
    /// fault stores no event twice (the summary gains `duplicates_avoided`).
    #[arg(long)]
    idempotent: bool,

    /// Exit with status 3 when any line is invalid.
    #[arg(long)]
    strict: bool,

    /// Store and forward: put the input into a disk spool in DIR and send from there. An
    /// interrupted run (Ctrl-C, kill, reboot) resumes with the same command: the records
    /// still spooled are sent first and the input is read on after the last spooled line.
    /// The hub need not be reachable; the run waits for it (Ctrl-C leaves the rest spooled).
    /// A refused credential (exit 5) or an event hub that does not exist (exit 1) ends the run
    /// and leaves the records in the spool.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    connection: ConnectionArgs,

    #[command(flatten)]
    network: NetworkArgs,

    /// How many events to send.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    events: u64,

    /// Approximate JSON body size of each event, in bytes.
    #[arg(long, value_name = "B", default_value_t = 256)]
    payload_bytes: usize,

    /// Route by `sensor_id` over this many distinct sensors (0: no partition key).
    #[arg(long, value_name = "K", default_value_t = 0)]
    partitions_key_cardinality: u64,

    /// At most this many batches await the hub's outcome at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,

    /// Print the results as one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,

    /// Idempotent retries (see `hubsend send --idempotent`).
    #[arg(long)]
    idempotent: bool,

    /// Progress display: auto, always or never (see `hubsend send --help`).
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
}

#[derive(Debug, Args)]
struct InfoArgs {
    #[command(flatten)]
    connection: ConnectionArgs,

    /// Print the properties as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return ExitCode::from(code),
    };
    let level = match cli.verbose {
        0 => "error",
        1 => "warn",
        2 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // `send` and `info` run on one thread: the reading side and the buffered producer's lanes
    // hand every event from task to task, and across worker threads each hand-off cost a
    // wake-up and a cross-thread free (1M telemetry lines: ~140k lines/s on two workers,
    // ~270k on one thread, same machine and sitting). The producer's network work (AMQP
    // engine, TLS, link tasks) runs beside it on a thread of its own (see
    // `commands::network_runtime`). `bench` may run the test hub in-process, which wants
    // threads of its own.
    let mut builder = match &cli.command {
        Command::Bench(_) => tokio::runtime::Builder::new_multi_thread(),
        Command::Send(_) | Command::Info(_) | Command::Iot(_) => {
            tokio::runtime::Builder::new_current_thread()
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hubsend: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ui = commands::Ui {
        quiet: cli.quiet,
        verbose: cli.verbose > 0,
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Send(args) => commands::send(args.into(), ui).await,
            Command::Bench(args) => commands::bench(args.into(), ui).await,
            Command::Info(args) => commands::info(args.into(), ui).await,
            Command::Iot(args) => iot::run(args, ui).await,
        }
    });
    // The input reader thread may be blocked on a terminal: don't wait for it.
    runtime.shutdown_background();
    ExitCode::from(code)
}

/// Parses the command line. Help and version go to stdout as clap prints them; a usage error is
/// printed without any argument value that could be a secret, and gives the exit status (with
/// `--json` among the arguments, also as `{"error":…,"error_kind":"usage"}` on stdout).
fn parse_args() -> Result<Cli, u8> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    Cli::try_parse_from(&argv).map_err(|error| {
        let code = u8::try_from(error.exit_code()).unwrap_or(exit::USAGE);
        if matches!(
            error.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            let _ = error.print();
        } else {
            let text = usage_error_text(&error, &argv);
            eprint!("{text}");
            if argv.iter().any(|a| a == "--json") {
                let first = text.lines().next().unwrap_or("invalid arguments");
                let message = first.strip_prefix("error: ").unwrap_or(first);
                println!(
                    "{}",
                    serde_json::json!({"error": message, "error_kind": exit::KIND_USAGE})
                );
            }
        }
        code
    })
}

/// clap's message for a usage error with the values that must not be echoed replaced:
/// an unexpected positional value (a connection string or a bare key pasted in the wrong place
/// looks like any other word, so none is shown), and any argument that looks like it holds a
/// secret. If a marker still shows after that, only a generic line is printed.
fn usage_error_text(error: &clap::Error, argv: &[OsString]) -> String {
    const HIDDEN: &str = "<value not shown>";
    let mut hidden: Vec<String> = Vec::new();
    if error.kind() == ErrorKind::UnknownArgument {
        if let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) {
            if !arg.starts_with('-') {
                hidden.push(arg.clone());
            }
        }
    }
    if error.kind() == ErrorKind::ValueValidation {
        // A value refused by a parser, e.g. a key given as the input file.
        if let Some(ContextValue::String(value)) = error.get(ContextKind::InvalidValue) {
            if text::looks_like_key(value) {
                hidden.push(value.clone());
            }
        }
    }
    for arg in argv.iter().skip(1) {
        let arg = arg.to_string_lossy();
        if text::looks_secret(&arg) {
            if let Some((_, value)) = arg.split_once('=').filter(|_| arg.starts_with("--")) {
                hidden.push(value.to_owned());
            }
            hidden.push(arg.into_owned());
        }
    }
    // Longest first, so a whole argument is replaced before a part of it.
    hidden.sort_by_key(|h| std::cmp::Reverse(h.len()));
    let mut text = error.render().to_string();
    for value in hidden.iter().filter(|v| !v.is_empty()) {
        text = text.replace(value.as_str(), HIDDEN);
    }
    if text::looks_secret(&text) {
        return "error: invalid arguments (not shown: they look like they hold a secret)\n\n\
                For more information, try '--help'.\n"
            .to_owned();
    }
    text
}

impl From<ConnectionArgs> for commands::Connection {
    fn from(a: ConnectionArgs) -> Self {
        commands::Connection {
            connection_string: a.connection_string.filter(|s| !s.trim().is_empty()),
            ca_file: a.ca_file,
            idempotent: false,
            event_hub: a.event_hub.filter(|s| !s.trim().is_empty()),
            connect_timeout: a.connect_timeout,
        }
    }
}

impl From<NetworkArgs> for commands::Network {
    fn from(a: NetworkArgs) -> Self {
        commands::Network {
            transport: a.transport.map(|t| match t {
                TransportArg::Amqp => hubsend::Transport::Amqp,
                TransportArg::Websockets => hubsend::Transport::WebSockets,
                TransportArg::Https => hubsend::Transport::Https,
            }),
            endpoint: a.endpoint.filter(|s| !s.trim().is_empty()),
            proxy: a.proxy.filter(|s| !s.trim().is_empty()),
            proxy_from_env: true,
        }
    }
}

impl From<SendArgs> for commands::SendConfig {
    fn from(a: SendArgs) -> Self {
        commands::SendConfig {
            connection: commands::Connection {
                idempotent: a.idempotent,
                ..a.connection.into()
            },
            network: a.network.into(),
            input: a.file.or(a.input).unwrap_or_else(|| "-".to_owned()),
            csv: a.format == Format::Csv,
            schema: match a.schema {
                SchemaArg::Telemetry => ingest::record::Schema::Telemetry,
                SchemaArg::None => ingest::record::Schema::None,
            },
            style: style::EventStyle {
                content_type: a.content_type,
                properties: a.properties,
            },
            progress: a.progress,
            partition_key_field: a.partition_key_field,
            partition_id: a.partition_id,
            max_in_flight: a.max_in_flight as usize,
            rejects: a.rejects,
            json: a.json,
            strict: a.strict,
            spool: a.spool,
        }
    }
}

impl From<BenchArgs> for commands::BenchConfig {
    fn from(a: BenchArgs) -> Self {
        commands::BenchConfig {
            connection: commands::Connection {
                idempotent: a.idempotent,
                ..a.connection.into()
            },
            network: a.network.into(),
            events: a.events,
            payload_bytes: a.payload_bytes,
            key_cardinality: a.partitions_key_cardinality,
            max_in_flight: a.max_in_flight as usize,
            json: a.json,
            progress: a.progress,
        }
    }
}

impl From<InfoArgs> for commands::InfoConfig {
    fn from(a: InfoArgs) -> Self {
        commands::InfoConfig {
            connection: a.connection.into(),
            json: a.json,
        }
    }
}
