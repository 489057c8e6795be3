//! Many partition keys against round robin (issue #16's "many partition keys" target):
//! `BufferedProducer::enqueue` and `hubsend send --partition-key-field` with 10,000 distinct
//! sensor ids, each side by side with the same events sent round robin, over TLS to the release
//! test hub in a separate process. Prints events/s per run and the keyed/round-robin ratio.
//! A control runs round robin events that carry a 41-byte application property, as many
//! bytes as the key annotation each keyed event carries, to tell the cost of the key's bytes
//! from the cost of routing by key.
//!
//! ```text
//! cargo build --release -p hubsend-testhub -p hubsend-cli
//! cargo run --release --example keys_bench -- [--events N] [--keys K] [--rounds R]
//!                                             [--partitions P] [--plain]
//! ```
//!
//! The binaries are found in the release directory next to this example (or give
//! `HUBSEND_TESTHUB_BIN` / `HUBSEND_BIN`); without the `hubsend` binary only the library runs.
//! Defaults: 1,000,000 events of ~100 bytes, 10,000 keys, 3 rounds (each mode once per round,
//! alternating, best round reported), 4 partitions, TLS.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use hubsend::{BufferedOptions, BufferedProducer, Event, Producer, SendOptions};

#[path = "common/cpu.rs"]
mod cpu;
use cpu::{children_cpu_seconds, tasks_cpu_seconds};

/// CPU seconds every thread of process `pid` has had so far, 0 where that is unknown.
fn task_cpu(pid: u32) -> f64 {
    tasks_cpu_seconds(&pid.to_string()).unwrap_or(0.0)
}

struct Args {
    events: usize,
    keys: usize,
    rounds: usize,
    partitions: u32,
    tls: bool,
}

fn args() -> Args {
    let mut a = Args {
        events: 1_000_000,
        keys: 10_000,
        rounds: 3,
        partitions: 4,
        tls: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse::<usize>().ok());
        match flag.as_str() {
            "--events" => a.events = value().expect("--events N"),
            "--keys" => a.keys = value().expect("--keys K").max(1),
            "--rounds" => a.rounds = value().expect("--rounds R").max(1),
            "--partitions" => a.partitions = value().expect("--partitions P") as u32,
            "--plain" => a.tls = false,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// A release binary: `env`, else next to this example.
fn binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join(name);
    path.exists().then_some(path)
}

/// The ~100-byte telemetry record `i`, from sensor `i % keys`.
fn record(i: usize, keys: usize) -> String {
    format!(
        r#"{{"sensor_id":"sensor-{:05}","timestamp":"2025-08-19T08:30:00Z","value":{}.25,"seq":{i}}}"#,
        i % keys,
        i % 1000
    )
}

/// How [`buffered`] sends each event.
#[derive(Clone, Copy, PartialEq)]
enum Sent {
    /// Round robin, no key.
    RoundRobin,
    /// Keyed by its sensor id (the key annotation adds 41 bytes to each event).
    Keyed,
    /// Round robin with the sensor id as a 19-character application property: the same 41
    /// bytes per event as the key annotation, without a key. The control that tells the cost
    /// of the key's bytes from the cost of routing by key.
    SameBytes,
}

/// The application property of [`Sent::SameBytes`]: its name is as long as the
/// `x-opt-partition-key` symbol, so the section is as long as the key annotation.
const SAME_BYTES_PROPERTY: &str = "sensor_id_partition";

/// Enqueues every event (as `sent` says) and waits for every outcome; events/s.
/// The sensor ids, `sensor-00000` on: built once, as a gateway holds its devices' ids, and
/// cloned into each event. Formatting each event's key anew was a cost of the bench's own
/// that round robin did not pay (~60 ns per event in a profile of the keyed phase).
fn sensor_ids(keys: usize) -> Vec<String> {
    (0..keys).map(|k| format!("sensor-{k:05}")).collect()
}

async fn buffered(cs: &str, ca: Option<&[u8]>, args: &Args, sent: Sent) -> f64 {
    let ids = sensor_ids(args.keys);
    let mut builder = Producer::builder().connection_string(cs);
    if let Some(pem) = ca {
        builder = builder.add_root_certificate_pem(pem.to_vec());
    }
    let producer = builder.connect().await.expect("connect");
    let buffered = BufferedProducer::new(producer.clone(), BufferedOptions::new());
    let started = Instant::now();
    for i in 0..args.events {
        let mut event = Event::new(record(i, args.keys)).with_content_type("application/json");
        let options = match sent {
            Sent::RoundRobin => SendOptions::new(),
            Sent::Keyed => SendOptions::new().partition_key(ids[i % args.keys].clone()),
            Sent::SameBytes => {
                event = event.with_property(SAME_BYTES_PROPERTY, ids[i % args.keys].clone());
                SendOptions::new()
            }
        };
        buffered.enqueue(event, options).await.expect("enqueue");
    }
    let report = buffered.close().await;
    let rate = report.sent as f64 / started.elapsed().as_secs_f64();
    assert_eq!(report.sent, args.events as u64, "{report:?}");
    producer.close().await.expect("close");
    rate
}

/// `hubsend send` of the NDJSON file (with `--partition-key-field sensor_id` when keyed, with
/// a constant 41-byte property for the control); the events/s it reports.
fn cli(bin: &PathBuf, cs: &str, ca: Option<&PathBuf>, input: &PathBuf, sent: Sent) -> f64 {
    let mut cmd = Command::new(bin);
    cmd.args(["send", "--connection-string", cs, "--json", "--input"])
        .arg(input);
    if let Some(ca) = ca {
        cmd.arg("--ca-file").arg(ca);
    }
    match sent {
        Sent::RoundRobin => {}
        Sent::Keyed => {
            cmd.args(["--partition-key-field", "sensor_id"]);
        }
        Sent::SameBytes => {
            cmd.arg("--property")
                .arg(format!("{SAME_BYTES_PROPERTY}=sensor-00000"));
        }
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run hubsend");
    assert!(out.status.success(), "hubsend send failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a report")).expect("JSON report");
    report["events_per_sec"].as_f64().expect("events_per_sec")
}

fn main() {
    let args = args();
    let hub_bin = binary("HUBSEND_TESTHUB_BIN", "hubsend-testhub")
        .expect("build the test hub: cargo build --release -p hubsend-testhub");
    let dir = std::env::temp_dir().join(format!("hubsend-keys-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let mut hub = Command::new(&hub_bin);
    hub.args(["--port", "0", "--retain-events", "100000", "--partitions"])
        .arg(args.partitions.to_string());
    if args.tls {
        hub.arg("--tls-dir").arg(&dir);
    }
    let mut hub = hub
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the test hub");
    let mut lines = BufReader::new(hub.stdout.take().expect("stdout")).lines();
    let cs = lines
        .next()
        .and_then(|l| l.ok())
        .expect("connection string");
    std::thread::spawn(move || for _ in lines {});
    let ca_path = args.tls.then(|| dir.join("ca.pem"));
    let ca = ca_path.as_ref().map(|p| std::fs::read(p).expect("CA"));

    let input = dir.join("telemetry.ndjson");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&input).expect("input"));
    for i in 0..args.events {
        writeln!(file, "{}", record(i, args.keys)).expect("write input");
    }
    drop(file);
    let hubsend = binary("HUBSEND_BIN", "hubsend");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let hub_pid = hub.id();
    let mut best = [0f64; 6];
    // Per slot, the least client and hub CPU µs per event seen over the rounds.
    let mut cpu = [(f64::MAX, f64::MAX); 6];
    let per_event = |seconds: f64| seconds * 1e6 / args.events as f64;
    for round in 0..args.rounds {
        let mut rates = [0f64; 6];
        for (slot, sent) in [
            (0, Sent::RoundRobin),
            (1, Sent::Keyed),
            (4, Sent::SameBytes),
        ] {
            let (me, hub) = (task_cpu(std::process::id()), task_cpu(hub_pid));
            rates[slot] = runtime.block_on(buffered(&cs, ca.as_deref(), &args, sent));
            let used = (
                per_event(task_cpu(std::process::id()) - me),
                per_event(task_cpu(hub_pid) - hub),
            );
            cpu[slot] = (cpu[slot].0.min(used.0), cpu[slot].1.min(used.1));
        }
        if let Some(bin) = &hubsend {
            for (slot, sent) in [
                (2, Sent::RoundRobin),
                (3, Sent::Keyed),
                (5, Sent::SameBytes),
            ] {
                let (me, hub) = (children_cpu_seconds(), task_cpu(hub_pid));
                rates[slot] = cli(bin, &cs, ca_path.as_ref(), &input, sent);
                let used = (
                    per_event(children_cpu_seconds() - me),
                    per_event(task_cpu(hub_pid) - hub),
                );
                cpu[slot] = (cpu[slot].0.min(used.0), cpu[slot].1.min(used.1));
            }
        }
        println!(
            "round {}: buffered {:.0} / keyed {:.0} / same bytes {:.0}; hubsend send {:.0} / keyed {:.0} / same bytes {:.0} events/s",
            round + 1,
            rates[0],
            rates[1],
            rates[4],
            rates[2],
            rates[3],
            rates[5]
        );
        for (b, r) in best.iter_mut().zip(rates) {
            *b = b.max(r);
        }
    }
    println!(
        "\n{} events, {} keys, {} partitions, {} (best of {} rounds)",
        args.events,
        args.keys,
        args.partitions,
        if args.tls { "TLS" } else { "plain" },
        args.rounds
    );
    println!(
        "| mode | round robin | {} keys | ratio | >= 80 % (#16) | CPU µs/event, client + hub: rr / keyed / same bytes |",
        args.keys
    );
    println!("|---|---|---|---|---|---|");
    let rows: &[(&str, usize)] = if hubsend.is_some() {
        &[("BufferedProducer::enqueue", 0), ("hubsend send", 2)]
    } else {
        &[("BufferedProducer::enqueue", 0)]
    };
    for (name, at) in rows {
        let (rr, keyed) = (best[*at], best[at + 1]);
        let same = if *at == 0 { 4 } else { 5 };
        let show = |(client, hub): (f64, f64)| format!("{client:.3} + {hub:.3}");
        let ratio = keyed / rr.max(1.0);
        println!(
            "| {name} | {rr:.0} | {keyed:.0} | {:.0} % | {} | {} / {} / {} |",
            100.0 * ratio,
            if ratio >= 0.8 { "met" } else { "not met" },
            show(cpu[*at]),
            show(cpu[at + 1]),
            show(cpu[same])
        );
    }
    // The control: keyed against round robin events of the same size.
    println!(
        "\ncontrol: round robin events with a 41-byte application property, the key annotation's size"
    );
    println!("| mode | same bytes, round robin | keyed | keyed / control |");
    println!("|---|---|---|---|");
    let controls: &[(&str, usize, usize)] = if hubsend.is_some() {
        &[("BufferedProducer::enqueue", 4, 1), ("hubsend send", 5, 3)]
    } else {
        &[("BufferedProducer::enqueue", 4, 1)]
    };
    for (name, same, keyed) in controls {
        let (same, keyed) = (best[*same], best[*keyed]);
        println!(
            "| {name} | {same:.0} | {keyed:.0} | {:.0} % |",
            100.0 * keyed / same.max(1.0)
        );
    }
    let _ = hub.kill();
    let _ = hub.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
