//! `hubsend send --spool DIR`: the input goes into a disk spool (hubsend-spool) and is sent
//! from there, so an interrupted run (Ctrl-C, kill, reboot) resumes with the same command:
//! what the spool holds is sent first, and the input is read on after the last line that
//! made it into the spool (each record carries its line number).
//!
//! The hub need not be reachable: the drain reconnects until it is. A refusal no reconnection
//! fixes ([`Refusal`], shared with `iot send --spool`) ends the run with the exit status and
//! `--json` error that `send` without `--spool` gives, the records left in the spool.

use std::fs::File;
use std::future::Future;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubsend::{
    BufferedOptions, ErrorKind, Event, Producer, ProducerOptions, DEFAULT_MAX_MESSAGE_SIZE,
};
use hubsend_spool::{Commit, Route, Spool, SpoolOptions, SpoolReport, SpooledProducer};
use tokio::sync::{mpsc, watch};

use crate::commands::{
    connect_failure, producer_options, read_ca_file, CliObserver, Failure, SendConfig, Ui,
};
use crate::exit;
use crate::ingest::record::Record;
use crate::ingest::report::{IngestReport, Reject};
use crate::ingest::stream::IngestObserver;
use crate::ingest::{self, reject_text, InputFormat, Lines, ParsedLine};
use crate::progress::ProgressView;
use crate::signals::Signals;

/// Opens the spool in `dir` with group commit per input chunk (each chunk's records reach
/// the disk with one fsync) and reports any damaged tail a crash left, as `send --spool` and
/// `iot send --spool` do.
pub(crate) fn open(dir: &Path) -> Result<Spool, Failure> {
    let spool = Spool::open(
        dir,
        SpoolOptions::new().commit(Commit::Group(Duration::from_millis(2))),
    )
    .map_err(|e| Failure::usage(format!("cannot use the spool: {e}")))?;
    for region in &spool.recovery().corrupt {
        eprintln!(
            "hubsend: spool: damaged tail cut off in {} at byte {} ({} bytes, {})",
            region.file.display(),
            region.offset,
            region.skipped_bytes,
            region.reason
        );
    }
    Ok(spool)
}

/// Reads `input` into `producer`'s spool, as `send --spool` and `iot send --spool` do: every
/// line after `resume_after` (the last line an earlier run spooled) is counted in `report`,
/// made an event and its route by `route` (or rejected with the reason it gives, reported to
/// `observer`), and spooled with its line number as its tag, one commit per input chunk.
/// Stops early (`report.interrupted`) when `stop` resolves. Returns the error that ended the
/// reading early, if any: the input could not be read or the spool not written.
pub(crate) async fn spool_input(
    producer: &SpooledProducer,
    mut input: mpsc::Receiver<Lines>,
    resume_after: u64,
    mut route: impl FnMut(Record) -> Result<(Event, Route), (String, Record)>,
    observer: &mut CliObserver,
    report: &mut IngestReport,
    stop: impl Future<Output = ()>,
) -> Option<String> {
    tokio::pin!(stop);
    let mut error = None;
    'read: loop {
        let chunk = tokio::select! {
            chunk = input.recv() => chunk,
            _ = &mut stop => { report.interrupted = true; break 'read; }
        };
        let Some(chunk) = chunk else { break };
        let mut records = Vec::with_capacity(chunk.len());
        for item in chunk {
            let parsed = match item {
                Ok(p) => p,
                Err(e) => {
                    error = Some(format!("reading the input failed: {e}"));
                    report.interrupted = true;
                    break;
                }
            };
            if parsed.line <= resume_after {
                continue;
            }
            report.records += 1;
            let ParsedLine { line, raw, result } = parsed;
            let routed = match result {
                Ok(record) => {
                    route(record).map_err(|(reason, record)| (reason, reject_text(raw, &record)))
                }
                Err(e) => Err((e.to_string(), raw.unwrap_or_default())),
            };
            match routed {
                Ok((event, route)) => records.push((event, route, line)),
                Err((reason, raw)) => {
                    report.rejected += 1;
                    observer.rejected(&Reject { line, reason, raw });
                }
            }
        }
        if !records.is_empty() {
            if let Err(e) = producer.enqueue_batch_tagged(records).await {
                error = Some(e.to_string());
                report.interrupted = true;
                break;
            }
        }
        if error.is_some() {
            break;
        }
    }
    error
}

/// The first error of a spooled run that no reconnection fixes (a refused credential, an
/// unusable configuration, for `send` also an event hub that does not exist), noted from the
/// sink's connects and outcomes: it stops the reading and the wait for the drain, and the run
/// ends with its exit status, the records left in the spool for a run that can send them.
/// Without one, the drain keeps reconnecting (an unreachable hub is waited for).
#[derive(Clone)]
pub(crate) struct Refusal {
    first: Arc<watch::Sender<Option<hubsend::Error>>>,
    fatal: fn(&hubsend::Error) -> bool,
}

impl Refusal {
    /// Notes the errors `fatal` says no reconnection fixes.
    pub(crate) fn new(fatal: fn(&hubsend::Error) -> bool) -> Refusal {
        Refusal {
            first: Arc::new(watch::channel(None).0),
            fatal,
        }
    }

    /// Keeps `error` if it is fatal and the first one (waking [`noted`](Self::noted)).
    pub(crate) fn check(&self, error: &hubsend::Error) {
        if !(self.fatal)(error) {
            return;
        }
        self.first.send_if_modified(|first| {
            let none = first.is_none();
            first.get_or_insert_with(|| error.clone());
            none
        });
    }

    /// Resolves once a fatal error was noted.
    pub(crate) async fn noted(&self) {
        let mut first = self.first.subscribe();
        let _ = first.wait_for(Option::is_some).await;
    }

    /// The fatal error, if one was noted.
    pub(crate) fn error(&self) -> Option<hubsend::Error> {
        self.first.borrow().clone()
    }

    /// Resolves on the first stop signal or a fatal error: what stops the reading.
    pub(crate) async fn or_signal(&self, signals: &Signals) {
        tokio::select! {
            _ = signals.nth(1) => {}
            _ = self.noted() => {}
        }
    }

    /// Waits until the hub accepted everything spooled; `false` when a (further) stop signal
    /// or a fatal error ended the wait first (what is left stays in the spool). `interrupted`:
    /// the reading stopped early.
    pub(crate) async fn drained(
        &self,
        producer: &SpooledProducer,
        signals: &Signals,
        interrupted: bool,
    ) -> bool {
        // The reading stops on a fatal error too: only a signal it took counts.
        let stop_at = if interrupted && signals.received() > 0 {
            2
        } else {
            1
        };
        tokio::select! {
            _ = producer.drained() => true,
            _ = signals.nth(stop_at) => false,
            _ = self.noted() => false,
        }
    }
}

/// Errors that no reconnection fixes, for any hub: refused credentials (a wrong key, a policy
/// without the right to send, a disabled device) and a configuration that cannot work.
pub(crate) fn no_reconnection_fixes(error: &hubsend::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Unauthorized | ErrorKind::InvalidConfig | ErrorKind::InvalidConnectionString
    )
}

/// For `send --spool`, also an event hub that does not exist (only connect errors are checked,
/// where `NotFound` names the event hub).
fn event_hub_fatal(error: &hubsend::Error) -> bool {
    no_reconnection_fixes(error) || error.kind() == ErrorKind::NotFound
}

/// The summary line of a spooled run on standard error.
pub(crate) fn print_summary(spooled: &SpoolReport, report: &IngestReport) {
    eprintln!(
        "hubsend: spooled {} records, resumed {} from an earlier run, sent {}; {} rejected, {} failed, {} left in the spool{}",
        spooled.spooled,
        spooled.resumed,
        spooled.sent,
        report.rejected,
        report.failed,
        spooled.pending,
        if report.interrupted { " (stopped early)" } else { "" }
    );
}

/// Runs `send` through the spool in `dir`. The hub need not be reachable: records wait in the
/// spool until it is (a stop signal leaves them there for the next run).
pub(crate) async fn send(
    config: SendConfig,
    dir: &Path,
    source: Box<dyn std::io::Read + Send>,
    rejects: Option<BufWriter<File>>,
    signals: Signals,
    ui: Ui,
) -> u8 {
    let failed = |failure: Failure| {
        failure.print();
        let code = failure.code;
        if config.json {
            let report = failure.into_report(IngestReport::default());
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        }
        code
    };
    let Some(cs) = config.connection.connection_string.clone() else {
        return failed(Failure::usage("no connection string"));
    };
    let ca_pem = match read_ca_file(&config.connection) {
        Ok(pem) => pem,
        Err(failure) => return failed(failure),
    };
    let spool = match open(dir) {
        Ok(s) => s,
        Err(failure) => return failed(failure),
    };
    let resume_after = spool.last_tag().unwrap_or(0);
    let base: ProducerOptions = producer_options(&config.connection, config.max_in_flight);
    let idempotent = config.connection.idempotent;
    let event_hub = config.connection.event_hub.clone();
    // `--transport`, `--endpoint` and `--proxy`, as without `--spool`.
    let network = config.network.clone();
    // Every connect of the drain goes through `builder`: a refusal there ends the run.
    let refusal = Refusal::new(event_hub_fatal);
    let connect_refusal = refusal.clone();
    let builder = move |options: ProducerOptions| {
        let mut builder = Producer::builder()
            .connection_string(cs.clone())
            .options(options);
        if let Some(hub) = &event_hub {
            builder = builder.event_hub(hub.clone());
        }
        if let Some(pem) = &ca_pem {
            builder = builder.add_root_certificate_pem(pem.clone());
        }
        builder = network.apply(builder);
        let refusal = connect_refusal.clone();
        async move { builder.connect().await.inspect_err(|e| refusal.check(e)) }
    };
    // Idempotent: the spool fixes each delivery's partition and sequence numbers on disk
    // before sending it, so a resumed run resends them unchanged and the hub drops what it
    // already stored.
    let producer = if idempotent {
        SpooledProducer::start_idempotent(spool, move |states| {
            builder(base.clone().publishing_state(states))
        })
    } else {
        SpooledProducer::start(spool, move || builder(base.clone()), BufferedOptions::new())
    };

    let started = Instant::now();
    let format = if config.csv {
        InputFormat::Csv
    } else {
        InputFormat::Ndjson
    };
    // The hub's limit is not known before it is reached; records above the service's limit
    // are refused by the drain and counted failed.
    let input = ingest::spawn_reader(
        source,
        format,
        config.schema,
        DEFAULT_MAX_MESSAGE_SIZE as usize,
    );
    let mut observer = CliObserver::new(rejects, ProgressView::hidden(), ui.quiet);
    let mut report = IngestReport::default();
    let mut keys = std::collections::HashSet::new();
    let route = |record: Record| {
        let route = match (&config.partition_key_field, &config.partition_id) {
            (Some(field), _) => match record.partition_key(field) {
                Ok(key) => Route::partition_key(key),
                Err(e) => return Err((e.to_string(), record)),
            },
            (None, Some(id)) => Route::partition_id(id.clone()),
            (None, None) => Route::Any,
        };
        // A key seen before is not copied again (most lines' keys are).
        if let Route::PartitionKey(k) = &route {
            if !keys.contains(k.as_str()) {
                keys.insert(k.clone());
            }
        }
        Ok((config.style.apply(record.into_event()), route))
    };
    let error = spool_input(
        &producer,
        input,
        resume_after,
        route,
        &mut observer,
        &mut report,
        refusal.or_signal(&signals),
    )
    .await;

    // Wait for the hub to accept everything, unless a (further) signal says stop or the hub
    // refuses us for good: what is left stays in the spool for the next run.
    let drained = refusal
        .drained(&producer, &signals, report.interrupted)
        .await;
    if !drained {
        report.interrupted = true;
    }
    let spooled = producer.shutdown().await;
    let rejects_error = observer.finish();

    report.sent = spooled.sent;
    report.failed = spooled.failed + spooled.dropped;
    report.partition_keys = keys.len() as u64;
    report.seconds = started.elapsed().as_secs_f64();
    report.events_per_sec = if report.seconds > 0.0 {
        report.sent as f64 / report.seconds
    } else {
        0.0
    };
    if idempotent {
        report.duplicates_avoided = Some(spooled.duplicates_avoided);
    }
    report.spooled = Some(spooled.spooled);
    report.resumed = Some(spooled.resumed);
    // A refusal is what ended the run (the reading stopped because of it); as without
    // --spool, its message, kind and exit status.
    let refused = refusal.error().map(|e| connect_failure(&e));
    let error = match &refused {
        Some(failure) => {
            report.error_kind = Some(failure.kind.clone());
            Some(failure.message.clone())
        }
        None => {
            if error.is_some() {
                report.error_kind = Some(exit::KIND_INPUT.to_owned());
            }
            error
        }
    };
    report.error = error.clone();
    if !ui.quiet {
        print_summary(&spooled, &report);
        if spooled.renumbered > 0 {
            eprintln!(
                "hubsend: spool: {} records were sent again under a new producer id (the hub no longer knew the old one); the hub may hold some of them twice",
                spooled.renumbered
            );
        }
    }
    if let Some(e) = &error {
        eprintln!("hubsend: {e}");
    }
    if let Some(e) = &rejects_error {
        eprintln!("hubsend: writing the rejects file failed: {e}");
    }
    if config.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
    if let Some(failure) = &refused {
        failure.code
    } else if error.is_some() || report.failed > 0 || rejects_error.is_some() {
        exit::FAILED
    } else if config.strict && report.rejected > 0 {
        exit::REJECTED
    } else if report.interrupted {
        exit::INTERRUPTED
    } else {
        exit::OK
    }
}
