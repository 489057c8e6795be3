//! `hubsend iot send --spool DIR`: records go into a disk spool (hubsend-spool) with their
//! device id and name, and are sent from there through an [`IotHubSink`], so an interrupted
//! run (Ctrl-C, kill, reboot) resumes with the same command: what the spool holds is sent
//! first, and the input is read on after the last line that made it into the spool (each
//! record carries its line number).
//!
//! The hub need not be reachable: records wait in the spool until it is, and the drain
//! connects a new gateway (or device sender) after each failure. A credential the hub
//! refuses (a policy without DeviceConnect, a wrong key, a disabled device) stops the run
//! with exit status 5 and leaves the records in the spool; a device the hub does not know
//! (without `--create-devices`) or a message over 256 KB is given up and counted failed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hubsend::iothub::{Gateway, MAX_MESSAGE_SIZE};
use hubsend_spool::{DeviceOutcome, IotHubSender, IotHubSink, Route, SpooledProducer};

use super::{print_end, set_error, DeviceCount, DeviceOf, DeviceTotals, IotSendArgs, Plan, Sender};
use crate::commands::{CliObserver, Ui};
use crate::exit;
use crate::ingest::record::Record;
use crate::ingest::record::Schema;
use crate::ingest::report::{rate, IngestReport};
use crate::ingest::{self, InputFormat};
use crate::progress::ProgressView;
use crate::signals::Signals;
use crate::spooled::{no_reconnection_fixes, print_summary, spool_input, Refusal};

/// What the drain has seen, shared with the sink's callbacks.
#[derive(Default)]
struct Seen {
    devices: BTreeMap<String, DeviceCount>,
    /// The gateway the drain connected last (a new one per attempt).
    gateway: Option<Gateway>,
    /// What the gateways before it created and named.
    earlier: DeviceTotals,
    /// A device sender was connected.
    device_sender: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `iot send` through the spool in `dir`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn send(
    a: IotSendArgs,
    plan: Arc<Plan>,
    device_of: DeviceOf,
    dir: &Path,
    source: Box<dyn std::io::Read + Send>,
    rejects: Option<BufWriter<File>>,
    signals: Signals,
    ui: Ui,
) -> u8 {
    let spool = match crate::spooled::open(dir) {
        Ok(s) => s,
        Err(failure) => {
            failure.print();
            if a.json {
                let report = failure.clone().into_report(IngestReport::default());
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            }
            return failure.code;
        }
    };
    let resume_after = spool.last_tag().unwrap_or(0);
    let seen = Arc::new(Mutex::new(Seen::default()));
    // The first error no reconnection fixes.
    let refusal = Refusal::new(no_reconnection_fixes);
    let sink = {
        let (seen, refusal) = (seen.clone(), refusal.clone());
        IotHubSink::new(move || {
            let (plan, seen, refusal) = (plan.clone(), seen.clone(), refusal.clone());
            async move {
                let sender = plan.connect().await.inspect_err(|e| refusal.check(e))?;
                Ok(match sender {
                    Sender::Gateway(g) => {
                        // Only the counters of the ones before are kept: a long outage
                        // connects many.
                        let before = lock(&seen).gateway.replace(g.clone());
                        if let Some(before) = before {
                            let stats = before.stats().await;
                            let mut seen = lock(&seen);
                            seen.earlier.created += stats.devices_created;
                            seen.earlier.names_written += stats.names_written;
                        }
                        IotHubSender::Gateway(g)
                    }
                    Sender::Device(d) => {
                        lock(&seen).device_sender = true;
                        IotHubSender::Device(d)
                    }
                })
            }
        })
    }
    .on_outcome({
        let (seen, refusal) = (seen.clone(), refusal.clone());
        move |device, outcome| {
            let mut seen = lock(&seen);
            let count = seen.devices.entry(device.to_owned()).or_default();
            match outcome {
                DeviceOutcome::Sent => count.sent += 1,
                DeviceOutcome::Failed(_) => count.failed += 1,
                DeviceOutcome::Retrying(e) => refusal.check(e),
                _ => {}
            }
        }
    });
    let producer = SpooledProducer::start_with_sink(spool, sink);

    let started = Instant::now();
    let format = if a.format == crate::Format::Csv {
        InputFormat::Csv
    } else {
        InputFormat::Ndjson
    };
    let input = ingest::spawn_reader(source, format, Schema::Telemetry, MAX_MESSAGE_SIZE as usize);
    let mut observer = CliObserver::new(rejects, ProgressView::hidden(), ui.quiet);
    let mut report = IngestReport::default();
    let route = |record: Record| match device_of.route(&record, a.device_name_field.as_deref()) {
        Ok((device, name, event)) => Ok((event, Route::device(device, name))),
        Err(reason) => Err((reason, record)),
    };
    // The first signal, or a refusal no reconnection fixes, stops the reading.
    let input_error = spool_input(
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
    // refuses the credentials: what is left stays in the spool for the next run.
    let drained = refusal
        .drained(&producer, &signals, report.interrupted)
        .await;
    if !drained {
        report.interrupted = true;
    }
    // Read before the drain closes the gateway (its connections count drops to 0).
    let (gateway, mut totals) = {
        let mut seen = lock(&seen);
        (seen.gateway.take(), std::mem::take(&mut seen.earlier))
    };
    if let Some(g) = gateway {
        let s = g.stats().await;
        totals.created += s.devices_created;
        totals.names_written += s.names_written;
        totals.connections = s.connections;
    }
    let spooled = producer.shutdown().await;
    if lock(&seen).device_sender {
        totals.connections = totals.connections.max(1);
    }
    let rejects_error = observer.finish();
    let fatal = refusal.error();

    let elapsed = started.elapsed();
    report.sent = spooled.sent;
    report.failed = spooled.failed + spooled.dropped;
    report.batches = spooled.sent + spooled.failed;
    report.seconds = elapsed.as_secs_f64();
    report.events_per_sec = rate(spooled.sent as f64, elapsed);
    report.spooled = Some(spooled.spooled);
    report.resumed = Some(spooled.resumed);
    set_error(&mut report, input_error.clone(), fatal.as_ref());
    let devices = std::mem::take(&mut lock(&seen).devices);
    if !ui.quiet {
        print_summary(&spooled, &report);
    }
    let rejects_error = rejects_error.as_ref();
    print_end(&report, &devices, &totals, rejects_error, a.json, !ui.quiet);
    if let Some(e) = &fatal {
        // Unauthorized (5) or a usage error (2), as without --spool.
        exit::for_kind(e.kind())
    } else if input_error.is_some() || report.failed > 0 || rejects_error.is_some() {
        exit::FAILED
    } else if a.strict && report.rejected > 0 {
        eprintln!(
            "hubsend: {} invalid line(s) and --strict was given",
            report.rejected
        );
        exit::REJECTED
    } else if report.interrupted {
        exit::INTERRUPTED
    } else {
        exit::OK
    }
}
