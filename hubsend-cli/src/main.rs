//! `hubsend`: stream telemetry files into Azure Event Hubs, benchmark a hub, inspect a hub.
//!
//! This file only parses arguments; the commands live in [`commands`], the record parsing and
//! streaming in [`ingest`].

mod commands;
mod ingest;
mod iot;
mod signals;
mod spooled;
mod text;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// The end of `hubsend send --help`: stopping and exit statuses (scripts depend on them).
const SEND_AFTER_HELP: &str = "\
Stopping: the first Ctrl-C or SIGTERM stops reading, sends what is buffered, waits for the hub's
outcomes and prints the summary; a second one stops at once and counts the events still without
an outcome as `unknown`.

Lines and CSV rows longer than the hub's message limit are rejected with their line number.

Exit status:
  0    every valid record was stored by the hub
  1    a valid record was not stored, or the hub could not be used
  2    usage error (e.g. no connection string)
  3    --strict and some lines were invalid
  4    a second signal stopped the wait for the hub's outcomes
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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate NDJSON or CSV telemetry records and send them as batched events.
    #[command(after_help = SEND_AFTER_HELP)]
    Send(SendArgs),
    /// Send synthetic telemetry at full speed and report throughput and latency.
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

    /// File to read, or `-` for standard input.
    #[arg(long, value_name = "PATH", default_value = "-")]
    input: String,

    /// Input format.
    #[arg(long, value_enum, default_value_t = Format::Ndjson)]
    format: Format,

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // `send` and `info` run on one thread: the reading side and the buffered producer's lanes
    // hand every event from task to task, and across worker threads each hand-off cost a
    // wake-up and a cross-thread free (1M telemetry lines: ~140k lines/s on two workers,
    // ~270k on one thread, same machine and sitting). `bench` may run the test hub in-process,
    // which wants threads of its own.
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
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Send(args) => commands::send(args.into()).await,
            Command::Bench(args) => commands::bench(args.into()).await,
            Command::Info(args) => commands::info(args.into()).await,
            Command::Iot(args) => iot::run(args).await,
        }
    });
    // The input reader thread may be blocked on a terminal: don't wait for it.
    runtime.shutdown_background();
    ExitCode::from(code)
}

/// Parses the command line. Help and version go to stdout as clap prints them; a usage error is
/// printed without any argument value that could be a secret, and gives the exit status.
fn parse_args() -> Result<Cli, u8> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    Cli::try_parse_from(&argv).map_err(|error| {
        let code = u8::try_from(error.exit_code()).unwrap_or(commands::EXIT_USAGE);
        if matches!(
            error.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            let _ = error.print();
        } else {
            eprint!("{}", usage_error_text(&error, &argv));
        }
        code
    })
}

/// Case-insensitive markers of Event Hubs secrets: a SAS key or token, or a token's signature.
const SECRET_MARKERS: &[&str] = &["sharedaccesskey=", "sharedaccesssignature", "sig="];

fn looks_secret(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| lower.contains(m))
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
    for arg in argv.iter().skip(1) {
        let arg = arg.to_string_lossy();
        if looks_secret(&arg) {
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
    if looks_secret(&text) {
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
            input: a.input,
            csv: a.format == Format::Csv,
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
