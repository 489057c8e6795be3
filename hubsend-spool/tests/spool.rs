//! The spool against the test hub over real sockets: a producer killed with SIGKILL in a child
//! process loses nothing it had accepted; full-spool policies; a corrupt tail; a read-only
//! directory; a long outage drained with memory flat.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hubsend::PartitionPublishingState;
use hubsend::{BufferedOptions, Event, Producer, ProducerOptions, RetryOptions};
use hubsend_spool::{
    Commit, Route, Spool, SpoolErrorKind, SpoolOptions, SpooledProducer, WhenFull,
};
use hubsend_testhub::{HubConfig, ResumeAnswer, TestHub};

const HUB: &str = "telemetry";
const KEY: &str = "c3Bvb2wtdGVzdC1rZXktbm90LWEtc2VjcmV0LTAxMjM0NTY3";

/// Events the crash test streams (a few seconds: it runs by default).
const CRASH_EVENTS: u64 = 200_000;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hubsend-spool-test-{}-{name}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A port nothing listens on (bound once, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn connection_string(port: u16) -> String {
    format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=send-only;SharedAccessKey={KEY};EntityPath={HUB};UseDevelopmentEmulator=true"
    )
}

async fn hub_on(port: u16) -> TestHub {
    hub_with(port, ResumeAnswer::Stored).await
}

/// A hub on `port` answering idempotent resumes with `resume`.
async fn hub_with(port: u16, resume: ResumeAnswer) -> TestHub {
    TestHub::start(
        HubConfig::new()
            .port(port)
            .policy_key("send-only", KEY)
            .max_message_size(64 * 1024)
            .idempotent_resume(resume),
    )
    .await
    .expect("test hub starts")
}

/// Connects an idempotent producer continuing `states` (what the spool kept).
fn idempotent_connector(
    port: u16,
) -> impl Fn(
    Vec<PartitionPublishingState>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = hubsend::Result<Producer>> + Send>>
       + Send
       + Sync
       + 'static {
    move |states| {
        Box::pin(
            Producer::builder()
                .connection_string(connection_string(port))
                .options(
                    ProducerOptions::new()
                        .max_in_flight(16)
                        .idempotent(true)
                        .publishing_state(states)
                        .retry(
                            RetryOptions::new()
                                .max_retries(3)
                                .base_delay(Duration::from_millis(20))
                                .max_delay(Duration::from_millis(200)),
                        ),
                )
                .connect(),
        )
    }
}

fn connector(
    port: u16,
) -> impl Fn()
    -> std::pin::Pin<Box<dyn std::future::Future<Output = hubsend::Result<Producer>> + Send>>
       + Send
       + Sync
       + 'static {
    move || {
        Box::pin(
            Producer::builder()
                .connection_string(connection_string(port))
                .options(
                    ProducerOptions::new().max_in_flight(16).retry(
                        RetryOptions::new()
                            .max_retries(3)
                            .base_delay(Duration::from_millis(20))
                            .max_delay(Duration::from_millis(200)),
                    ),
                )
                .connect(),
        )
    }
}

fn event(n: u64) -> (Event, Route) {
    let key = format!("sensor-{}", n % 8);
    (
        Event::new(format!(r#"{{"sensor_id":"{key}","value":{n}}}"#)).with_property("n", n as i64),
        Route::partition_key(key),
    )
}

/// How often the hub stored each `n`.
fn stored(hubs: &[&TestHub]) -> HashMap<u64, usize> {
    let mut seen = HashMap::new();
    for hub in hubs {
        for e in hub.events(HUB) {
            if let Some(n) = e.application_properties.get("n").and_then(|v| v.as_u64()) {
                *seen.entry(n).or_default() += 1;
            }
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------
// The crash test: the child role and the parent.

/// The child process's role (only when the parent sets `HUBSEND_SPOOL_CHILD`): `fill` streams
/// events into the spool and appends to the ack file how many `enqueue` calls have returned;
/// `drain` sends what the spool holds and prints its report.
#[tokio::test]
async fn spool_child_role() {
    let Ok(mode) = std::env::var("HUBSEND_SPOOL_CHILD") else {
        return;
    };
    init_logs();
    let dir = PathBuf::from(std::env::var("HUBSEND_SPOOL_DIR").expect("dir"));
    let port: u16 = std::env::var("HUBSEND_SPOOL_PORT")
        .expect("port")
        .parse()
        .expect("port");
    let spool = Spool::open(
        &dir,
        SpoolOptions::new()
            .max_bytes(256 << 20)
            .commit(Commit::Group(Duration::from_millis(2))),
    )
    .expect("spool opens");
    let producer = if std::env::var("HUBSEND_SPOOL_IDEMPOTENT").is_ok() {
        SpooledProducer::start_idempotent(spool, idempotent_connector(port))
    } else {
        SpooledProducer::start(spool, connector(port), BufferedOptions::new())
    };
    match mode.as_str() {
        "fill" => {
            let total: u64 = std::env::var("HUBSEND_SPOOL_EVENTS")
                .expect("events")
                .parse()
                .expect("events");
            let mut acks = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(std::env::var("HUBSEND_SPOOL_ACKS").expect("acks"))
                .expect("ack file");
            let mut n = 0;
            while n < total {
                let end = (n + 500).min(total);
                producer
                    .enqueue_batch((n..end).map(event), Some(end))
                    .await
                    .expect("enqueue");
                n = end;
                // One write per batch: the count of events whose enqueue has returned.
                acks.write_all(format!("{n}\n").as_bytes()).expect("ack");
            }
            // Stay alive (the hub is unreachable) until the parent kills us.
            std::future::pending::<()>().await;
        }
        _ => {
            let report = producer.close().await;
            println!(
                "REPORT resumed={} sent={} pending={} corrupt={} duplicates_avoided={} renumbered={}",
                report.resumed,
                report.sent,
                report.pending,
                report.corrupt_regions,
                report.duplicates_avoided,
                report.renumbered
            );
        }
    }
}

fn child(mode: &str, dir: &Path, port: u16, acks: &Path, idempotent: bool) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "spool_child_role",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("HUBSEND_SPOOL_CHILD", mode)
    .env("HUBSEND_SPOOL_DIR", dir)
    .env("HUBSEND_SPOOL_PORT", port.to_string())
    .env("HUBSEND_SPOOL_EVENTS", CRASH_EVENTS.to_string())
    .env("HUBSEND_SPOOL_ACKS", acks)
    .stdin(Stdio::null());
    if idempotent {
        cmd.env("HUBSEND_SPOOL_IDEMPOTENT", "1");
    }
    cmd
}

fn last_ack(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.parse::<u64>().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_enqueue_returned_for() {
    crash(Crash::default()).await;
}

/// The same with the hub up while the child streams: the kill lands mid-drain, so records the
/// hub accepted after the last cursor write are sent again (counted as duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_draining_loses_nothing() {
    crash(Crash {
        hub_up_while_filling: true,
        ..Crash::default()
    })
    .await;
}

/// Idempotent, hub unreachable while the child streams: the restart sends everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_sigkill_with_the_hub_down_stores_each_event_once() {
    crash(Crash {
        idempotent: Some(ResumeAnswer::Stored),
        ..Crash::default()
    })
    .await;
}

/// Idempotent, killed mid-drain while deliveries are in flight (the hub stores each one
/// and answers 30 ms later, so some are stored but unconfirmed at the kill): the restart
/// resends them with their numbers and the hub drops them. The hub answers the resumed
/// attach with its last stored number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_sigkill_mid_drain_stores_each_event_once() {
    crash(Crash {
        hub_up_while_filling: true,
        idempotent: Some(ResumeAnswer::Stored),
        ..Crash::default()
    })
    .await;
}

/// The same against a hub that echoes the resumed number instead of its own: the outcome is
/// the same (the hub still drops what it has), only fewer duplicates are reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_sigkill_mid_drain_with_echoed_resume_stores_each_event_once() {
    crash(Crash {
        hub_up_while_filling: true,
        idempotent: Some(ResumeAnswer::Echo),
        ..Crash::default()
    })
    .await;
}

/// Killed mid-drain, then restarted against a hub that forgot every producer (a new hub
/// process holding what the first stored): the partitions start afresh with new producer
/// ids, nothing is lost, and the records resent under the new ids are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_sigkill_then_a_hub_that_forgot_the_producer_loses_nothing() {
    crash(Crash {
        hub_up_while_filling: true,
        idempotent: Some(ResumeAnswer::Stored),
        hub_forgets: true,
    })
    .await;
}

#[derive(Debug, Clone, Copy, Default)]
struct Crash {
    hub_up_while_filling: bool,
    /// Idempotent mode, and how the hub answers resumes.
    idempotent: Option<ResumeAnswer>,
    /// The restart meets a new hub (no producer state; events checked across both).
    hub_forgets: bool,
}

async fn crash(how: Crash) {
    init_logs();
    let Crash {
        hub_up_while_filling,
        idempotent,
        hub_forgets,
    } = how;
    let dir = temp_dir("crash");
    let acks = dir.with_extension("acks");
    let port = free_port();
    let resume = idempotent.unwrap_or_default();
    // A random moment: after a random number of accepted events (the child keeps streaming).
    let kill_at = rand::random::<u64>() % (CRASH_EVENTS - 1000) + 500;
    let early_hub = if hub_up_while_filling {
        let hub = hub_with(port, resume).await;
        if idempotent.is_some() {
            // Stored, answered later: deliveries are in flight (some stored but unconfirmed)
            // whenever the kill lands.
            hub.faults().delay_dispositions(Duration::from_millis(30));
        }
        Some(hub)
    } else {
        None
    };

    let mut filler = child("fill", &dir, port, &acks, idempotent.is_some())
        .stdout(Stdio::null())
        .spawn()
        .expect("child starts");
    // Waits on the ack file the child writes (bounded; the child's own pace sets the time).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while last_ack(&acks) < kill_at {
        assert!(std::time::Instant::now() < deadline, "child too slow");
        assert!(
            filler.try_wait().expect("wait").is_none(),
            "child exited early"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    filler.kill().expect("SIGKILL");
    let _ = filler.wait();
    let accepted = last_ack(&acks);
    assert!(accepted >= kill_at);

    let (hub, forgetful) = match early_hub {
        Some(hub) if hub_forgets => {
            // What the first hub stored stays counted; the new one knows no producer.
            let earlier = stored(&[&hub]);
            drop(hub);
            tokio::time::sleep(Duration::from_millis(100)).await;
            (hub_with(port, resume).await, Some(earlier))
        }
        Some(hub) => {
            hub.faults().clear();
            (hub, None)
        }
        None => (hub_with(port, resume).await, None),
    };
    let mut drainer = child("drain", &dir, port, &acks, idempotent.is_some())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child starts");
    let stdout = drainer.stdout.take().expect("stdout");
    let report = tokio::task::spawn_blocking(move || {
        let lines: Vec<String> = std::io::BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            .collect();
        lines
            .iter()
            .find_map(|l| l.find("REPORT").map(|at| l[at..].to_string()))
            .ok_or(lines)
    });
    let report = tokio::time::timeout(Duration::from_secs(300), report)
        .await
        .expect("drain finishes")
        .expect("join")
        .expect("the drain child prints its report");
    assert!(drainer.wait().expect("wait").success());

    let mut seen = stored(&[&hub]);
    if let Some(earlier) = &forgetful {
        for (n, c) in earlier {
            *seen.entry(*n).or_default() += c;
        }
    }
    let lost: Vec<u64> = (0..accepted).filter(|n| !seen.contains_key(n)).collect();
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!(
        "sigkill ({how:?}) after {accepted} accepted events (target {kill_at}): {} stored, {} lost, {duplicates} duplicates, hub dropped {} resent as duplicates; child: {report}",
        seen.len(),
        lost.len(),
        hub.stats().idempotent_duplicates
    );
    assert!(
        lost.is_empty(),
        "lost {} events, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(report.contains("pending=0"), "{report}");
    if idempotent.is_some() && forgetful.is_none() {
        assert_eq!(duplicates, 0, "stored twice with idempotent mode; {report}");
        // What the hub dropped is what the report says was avoided: all of it when the hub
        // answers resumes with its last stored number, part of it when it echoes.
        let avoided: u64 = report
            .split_whitespace()
            .find_map(|w| w.strip_prefix("duplicates_avoided="))
            .and_then(|v| v.parse().ok())
            .expect("duplicates_avoided in the report");
        let dropped = hub.stats().idempotent_duplicates;
        match resume {
            ResumeAnswer::Echo => assert!(avoided <= dropped, "{report}"),
            _ => assert_eq!(avoided, dropped, "{report}"),
        }
    }
    // With a forgetful hub, finishing at all (pending=0 above) shows the partitions started
    // afresh (the old producer ids are refused at attach); what is stored twice can only be
    // among the records sent again under the new ids.
    if forgetful.is_some() {
        let renumbered: usize = report
            .split_whitespace()
            .find_map(|w| w.strip_prefix("renumbered="))
            .and_then(|v| v.parse().ok())
            .expect("renumbered in the report");
        assert!(duplicates <= renumbered, "{report}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&acks);
}

// ---------------------------------------------------------------------------------------
// Full spool policies.

fn small_options(policy: WhenFull) -> SpoolOptions {
    SpoolOptions::new()
        .max_bytes(64 * 1024)
        .segment_bytes(8 * 1024)
        .commit(Commit::Background(Duration::from_millis(5)))
        .when_full(policy)
}

#[tokio::test]
async fn full_spool_refuses_with_a_typed_error() {
    let dir = temp_dir("refuse");
    let port = free_port(); // nothing listens: the spool fills
    let spool = Spool::open(&dir, small_options(WhenFull::Refuse)).unwrap();
    let producer = SpooledProducer::start(spool, connector(port), BufferedOptions::new());
    let mut accepted = 0u64;
    let error = loop {
        let (e, r) = event(accepted);
        match producer.enqueue(e, r).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 10_000, "never full");
    };
    assert_eq!(error.kind(), SpoolErrorKind::Full, "{error}");
    let report = producer.report();
    assert!(report.disk_bytes <= 64 * 1024, "{report:?}");
    assert_eq!(report.pending, accepted);

    // The hub comes up: everything accepted arrives, and there is room again.
    let hub = hub_on(port).await;
    producer.drained().await;
    let (e, r) = event(accepted);
    producer.enqueue(e, r).await.expect("room after the drain");
    let report = producer.close().await;
    let seen = stored(&[&hub]);
    assert!((0..=accepted).all(|n| seen.contains_key(&n)), "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn full_spool_drops_the_oldest_and_counts_them() {
    let dir = temp_dir("drop");
    let port = free_port();
    let spool = Spool::open(&dir, small_options(WhenFull::DropOldest)).unwrap();
    let producer = SpooledProducer::start(spool, connector(port), BufferedOptions::new());
    let total = 3_000u64;
    for n in 0..total {
        let (e, r) = event(n);
        producer.enqueue(e, r).await.expect("never refused");
    }
    let report = producer.report();
    assert!(report.dropped > 0, "{report:?}");
    assert!(report.disk_bytes <= 64 * 1024, "{report:?}");
    assert_eq!(report.dropped + report.pending, total, "{report:?}");

    let hub = hub_on(port).await;
    let report = producer.close().await;
    let seen = stored(&[&hub]);
    // The newest survive; exactly the dropped ones (the oldest) are missing.
    let kept = total - report.dropped;
    assert!(
        (total - kept..total).all(|n| seen.contains_key(&n)),
        "{report:?}"
    );
    assert!(
        (0..total - kept).all(|n| !seen.contains_key(&n)),
        "{report:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn full_spool_waits_until_the_drain_frees_space() {
    let dir = temp_dir("wait");
    let port = free_port();
    let spool = Spool::open(&dir, small_options(WhenFull::Wait)).unwrap();
    let producer = SpooledProducer::start(spool, connector(port), BufferedOptions::new());
    let total = 3_000u64; // about five times what fits
    let writer = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for n in 0..total {
                let (e, r) = event(n);
                producer.enqueue(e, r).await.expect("waits, never refused");
            }
        })
    };
    // The writer blocks once the spool is full (progress notifications, no sleeps).
    let log_full = async {
        loop {
            let r = producer.report();
            if r.disk_bytes + 200 > 64 * 1024 {
                return r;
            }
            tokio::task::yield_now().await;
        }
    };
    let at_full = tokio::time::timeout(Duration::from_secs(30), log_full)
        .await
        .expect("the spool fills");
    assert!(!writer.is_finished());
    assert!(at_full.spooled < total, "{at_full:?}");
    let hub = hub_on(port).await;
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer finishes once the hub drains")
        .unwrap();
    let report = producer.close().await;
    assert_eq!(report.dropped, 0);
    let seen = stored(&[&hub]);
    assert!((0..total).all(|n| seen.contains_key(&n)), "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Corruption and a read-only directory.

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Fills a spool with `n` events (nothing reachable) and closes it.
async fn spool_with(dir: &Path, n: u64) {
    let spool = Spool::open(
        dir,
        SpoolOptions::new().commit(Commit::Background(Duration::from_millis(5))),
    )
    .unwrap();
    let producer = SpooledProducer::start(spool, connector(free_port()), BufferedOptions::new());
    producer
        .enqueue_batch((0..n).map(event), Some(n))
        .await
        .unwrap();
    producer.shutdown().await;
}

#[tokio::test]
async fn corrupt_tail_is_reported_cut_off_and_the_rest_is_sent() {
    for damage in ["garbage", "truncate", "flip"] {
        let dir = temp_dir(damage);
        spool_with(&dir, 1000).await;
        let seg = segment_files(&dir).pop().expect("a segment");
        let len = std::fs::metadata(&seg).unwrap().len();
        match damage {
            // A torn append: half a record of garbage after the last good one.
            "garbage" => {
                let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
                f.write_all(&[0x5a; 37]).unwrap();
            }
            // A crash mid-write: the last record is cut short.
            "truncate" => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&seg)
                    .unwrap()
                    .set_len(len - 10)
                    .unwrap();
            }
            // A bad sector: one byte of the last record's body flipped.
            _ => {
                let mut bytes = std::fs::read(&seg).unwrap();
                let at = bytes.len() - 5;
                bytes[at] ^= 0xff;
                std::fs::write(&seg, &bytes).unwrap();
            }
        }
        let spool = Spool::open(&dir, SpoolOptions::new()).unwrap();
        let recovery = spool.recovery().clone();
        assert_eq!(recovery.corrupt.len(), 1, "{damage}: {recovery:?}");
        let region = &recovery.corrupt[0];
        assert_eq!(region.file, seg);
        let expected_pending = if damage == "garbage" { 1000 } else { 999 };
        assert_eq!(recovery.pending, expected_pending, "{damage}: {recovery:?}");
        match damage {
            "garbage" => assert_eq!((region.offset, region.skipped_bytes), (len, 37)),
            "truncate" => assert_eq!(region.offset + region.skipped_bytes, len - 10),
            _ => assert_eq!(region.offset + region.skipped_bytes, len),
        }
        // Everything before the damage is sent.
        let port = free_port();
        let hub = hub_on(port).await;
        let producer = SpooledProducer::start(spool, connector(port), BufferedOptions::new());
        let report = producer.close().await;
        assert_eq!(report.resumed, expected_pending);
        assert_eq!(report.corrupt_regions, 1);
        let seen = stored(&[&hub]);
        assert!(
            (0..expected_pending).all(|n| seen.contains_key(&n)),
            "{damage}: {report:?}"
        );
        // The cut is durable: opening again finds nothing wrong and nothing pending.
        drop(producer_free(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn producer_free(dir: &Path) -> Spool {
    let spool = Spool::open(dir, SpoolOptions::new()).unwrap();
    assert!(
        spool.recovery().corrupt.is_empty(),
        "{:?}",
        spool.recovery()
    );
    assert_eq!(spool.recovery().pending, 0);
    spool
}

#[tokio::test]
async fn read_only_directory_is_a_typed_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("ro");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let error = Spool::open(&dir, SpoolOptions::new()).expect_err("read-only");
    assert_eq!(error.kind(), SpoolErrorKind::NotWritable, "{error}");
    assert!(error.to_string().contains(&dir.display().to_string()));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A second open of a spool in use is refused too.
    let first = Spool::open(&dir, SpoolOptions::new()).unwrap();
    let error = Spool::open(&dir, SpoolOptions::new()).expect_err("locked");
    assert_eq!(error.kind(), SpoolErrorKind::Locked);
    drop(first);
    Spool::open(&dir, SpoolOptions::new()).expect("free again");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// A long outage.

#[cfg(feature = "slow-tests")]
const OUTAGE_EVENTS: u64 = 200_000;
#[cfg(not(feature = "slow-tests"))]
const OUTAGE_EVENTS: u64 = 30_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_outage_drains_when_the_hub_returns_with_memory_flat() {
    init_logs();
    let dir = temp_dir("outage");
    let port = free_port();
    let hub = hub_on(port).await;
    // Room for the whole outage (~100 bytes a record): the policy is not what is tested here.
    let max_bytes = OUTAGE_EVENTS * 200;
    let spool = Spool::open(
        &dir,
        SpoolOptions::new()
            .max_bytes(max_bytes)
            .commit(Commit::Background(Duration::from_millis(5))),
    )
    .unwrap();
    let producer = SpooledProducer::start(
        spool,
        connector(port),
        BufferedOptions::new().max_buffered_events(1_000),
    );
    // Some events while the hub is up.
    producer
        .enqueue_batch((0..1_000).map(event), None)
        .await
        .unwrap();
    producer.drained().await;
    // The hub goes away for the rest of the stream.
    hub_stop(hub);
    let mut max_in_memory = 0;
    let mut n = 1_000;
    while n < OUTAGE_EVENTS {
        let end = (n + 1_000).min(OUTAGE_EVENTS);
        producer
            .enqueue_batch((n..end).map(event), None)
            .await
            .unwrap();
        n = end;
        let r = producer.report();
        max_in_memory = max_in_memory.max(r.in_memory);
        assert!(r.disk_bytes <= max_bytes, "{r:?}");
    }
    let during = producer.report();
    println!("outage: {during:?}, most records in memory {max_in_memory}");
    // Memory holds at most the buffered producer's share, whatever the outage's length.
    // The bound: the buffered producer's 1,000 queued events plus 16 batches in flight (at
    // most 1,000 of these ~60-byte events fit one 64 KiB batch); the rest waits on disk.
    let bound = 1_000 + 16 * 1_000;
    assert!(max_in_memory <= bound, "{max_in_memory}");
    assert!(
        during.pending >= OUTAGE_EVENTS - 1_000 - bound,
        "{during:?}"
    );

    let hub = hub_on(port).await;
    let report = tokio::time::timeout(Duration::from_secs(120), producer.close())
        .await
        .expect("drains once the hub is back");
    assert_eq!(report.pending, 0, "{report:?}");
    let seen = stored(&[&hub]);
    // The first hub's store went with it; the second has every later event.
    let missing: Vec<u64> = (1_000..OUTAGE_EVENTS)
        .filter(|n| !seen.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} missing, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stops a hub (dropping it closes its listener and connections).
fn hub_stop(hub: TestHub) {
    drop(hub);
}

#[tokio::test]
async fn state_blobs_survive_a_restart_beside_the_records() {
    let dir = temp_dir("state");
    {
        let spool = Spool::open(&dir, SpoolOptions::new()).unwrap();
        assert_eq!(spool.state("idempotent"), None);
        let blob = serde_json::json!({"0": {"producer_id": 7, "epoch": 1, "last_sequence": 41}});
        spool.set_state("idempotent", blob).unwrap();
        spool.set_state("other", serde_json::json!([1, 2])).unwrap();
        spool
            .set_state(
                "idempotent",
                serde_json::json!({"0": {"producer_id": 7, "epoch": 1, "last_sequence": 99}}),
            )
            .unwrap();
    }
    let spool = Spool::open(&dir, SpoolOptions::new()).unwrap();
    assert_eq!(
        spool.state("idempotent"),
        Some(serde_json::json!({"0": {"producer_id": 7, "epoch": 1, "last_sequence": 99}}))
    );
    assert_eq!(spool.state("other"), Some(serde_json::json!([1, 2])));
    drop(spool);
    let _ = std::fs::remove_dir_all(&dir);
}
