//! Throughput / latency / memory benchmark for hubsend, with Microsoft's official crate and a
//! raw fe2o3-amqp "ceiling" sender run against the same hub and payload for comparison.
//!
//! ```text
//! cargo build --release -p hubsend-testhub
//! cargo build --release -p hubsend-cli               # for --mode cli (part of all)
//! (cd bench-peers && cargo build --release)          # optional: official + ceiling peers
//! cargo run --release --example bench -- [--events N] [--payload-bytes B[,B2..]] [--tls|--both]
//!                                         [--mode batch|single|latency|cli|all] [--json]
//! ```
//!
//! Options (all optional):
//! * `--events N` events per batched run (default 2,000,000); `--single-events N` for the
//!   single-event pipelined runs (default N/4); `--latency-events N` (default 2,000, sent one at
//!   a time, after 200 warm-up sends); `--official-events N` caps the official crate's batched
//!   run and `--official-single-events N` its single-send run (defaults N/4 and 20,000).
//! * `--payload-bytes 100,1024` event body sizes (default 100: a telemetry JSON record).
//! * `--tls` TLS only, `--both` plain then TLS (default: plain only).
//! * `--official-concurrency C` concurrent tasks driving the official crate's batched mode
//!   (default 4) and `--official-single-concurrency C` its send_event mode (default 1: more
//!   concurrent send_event calls only queue inside the crate and make its stalls, below, worse);
//!   `--official-latency-events N` (default 500).
//! * The official crate (0.16, on fe2o3-amqp 0.16) sometimes never resolves a send whose
//!   `accepted` disposition has arrived; the peer gives up on such a send after 1 s and reports
//!   `stalled_sends`. The table shows its raw rate; ratios use the rate with stalls taken out.
//! * `--steady-seconds S` also runs hubsend's batched mode at full speed for S seconds with
//!   its resident memory sampled every second (the "RSS flat" target: the mean of the last 10
//!   samples within 10 % of the mean of seconds 10-20; default 0: skipped).
//! * `--max-in-flight N` / `--max-in-flight-bytes B` hubsend's in-flight bounds (default: the
//!   library's).
//! * `--no-peers` skip the official and ceiling binaries even when they are built.
//! * `--idempotent` also runs every hubsend mode with idempotent retries, in rows of their
//!   own next to the plain ones.
//! * `--mode cli` (also part of `all`, there for payloads up to 128 B only): the release
//!   `hubsend send --input FILE --json` (`HUBSEND_BIN`, else next to this example's target dir)
//!   on an NDJSON file of `--cli-lines N` telemetry lines (default `--events`; see
//!   `telemetry_lines`: varying ids, timestamps and values, some strings like `"Running"`,
//!   each valid as it stands), written to the target dir and removed afterwards, against the
//!   same hub. Rows: `hubsend batch (cli bodies)` (the batch mode sending the file's bodies
//!   with content type `application/json`, as `hubsend send` sends them; run first) and `hubsend cli` (lines/s and MB/s as `hubsend` reports them, from the start
//!   of sending; CPU µs per line and peak RSS of the `hubsend` process over its whole life).
//!   The targets add "cli >= 1M lines/s" and "cli >= 70% of batch (same bodies)" (#16).
//!   Not with `--rtt-ms`.
//! * `--mode buffered` (also part of `all`): `BufferedProducer::enqueue`, one event per call.
//!   `--mode` also takes a list: `--mode batch,single`.
//! * `--rtt-ms 0,5,20,50`: far from the hub. Each round-trip time puts a delay proxy (the test
//!   hub's [`DelayProxy`], on a thread of its own) between the children and the hub, half the time each way, no bandwidth
//!   limit; 0 is the proxy without delay, the base the other times are compared with. The
//!   ceiling peer is skipped (it dials the hub directly); the official crate goes through the
//!   proxy. `--repeat N` runs every point N times (spread over the sweep) and reports each run.
//!   The table adds CPU µs per event (the child's time on a CPU over the timed part), the
//!   in-flight count (batches and single sends awaiting an outcome, sampled every 5 ms: max
//!   and mean) and the rate against 0 ms. p50/p99 are per batch (batch, buffered), per
//!   sampled send (single: one in 16) or per send (latency, after `--latency-warmup N`
//!   untimed sends, default 200). AMQP only (not with `--transports`).
//!   `bench/run.sh rtt` runs the sweep over TLS.
//! * `--mode iot`: the IoT Hub gateway alone (see [`iot`]): `--devices 1,100,1000` devices
//!   sharing `--iot-events N` messages (default 200,000), batched per device, through one
//!   `Gateway` against the test hub in IoT Hub mode; `--shard K` adds rows with at most K
//!   devices per connection (default 250, 0: none). Rows give messages/s, CPU µs per message
//!   (this process: the gateway), batch latency p50/p99 and peak RSS.
//! * `--transports` also runs batch, single and latency over WebSockets (`wss`/`ws`) and the
//!   HTTPS REST API against the same spawned hub (`--rest --ws-port 0`); build the example
//!   with `--features websockets,https`.
//!
//! The hub: `EVENTHUB_CONNECTION_STRING` (+ `EVENTHUB_CA_FILE`) when set; otherwise the
//! release `hubsend-testhub` binary (`HUBSEND_TESTHUB_BIN`, else next to this example's
//! target dir) is started as a separate process, one per transport, and killed at the end.
//! Every measured mode runs in its own child process (this binary with `--child`), so the
//! peak RSS (VmHWM) reported for a mode is that mode's alone. Peers are found through
//! `HUBSEND_BENCH_OFFICIAL_BIN` / `HUBSEND_BENCH_CEILING_BIN`, else in the same target dir,
//! else in `bench-peers/target/release`.
//!
//! MB/s counts event body bytes (payload), not wire bytes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubsend::{BatchOptions, Event, Producer, ProducerOptions, SendOptions, TryAddError};
use hubsend_testhub::DelayProxy;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// shared helpers (same payload generator as bench-peers/src/lib.rs)

struct Args(Vec<(String, String)>);

impl Args {
    fn parse() -> Args {
        let mut out = Vec::new();
        let mut it = std::env::args().skip(1).peekable();
        while let Some(a) = it.next() {
            if a == "--bench" {
                continue; // passed by `cargo bench`-style harnesses
            }
            let Some(key) = a.strip_prefix("--") else {
                eprintln!("unexpected argument {a:?}; see the header of examples/bench.rs");
                std::process::exit(2);
            };
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().unwrap(),
                _ => "true".to_owned(),
            };
            out.push((key.to_owned(), value));
        }
        Args(out)
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn num(&self, key: &str, default: u64) -> u64 {
        self.get(key)
            .map(|v| {
                v.replace('_', "").parse().unwrap_or_else(|_| {
                    eprintln!("--{key} wants a number, got {v:?}");
                    std::process::exit(2)
                })
            })
            .unwrap_or(default)
    }
    fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v != "false")
    }
}

#[path = "common/bodies.rs"]
mod bodies;
use bodies::{bodies, closed};
#[path = "common/cpu.rs"]
mod cpu;
use cpu::{children_cpu_seconds, cpu_seconds, cpu_seconds_precise};

/// `count` distinct NDJSON telemetry lines of `bytes` bytes (longer when the fields alone
/// are; never cut, so every line stays valid), for `--mode cli`: 291 sensor ids, timestamps
/// over an hour (a quarter with milliseconds), numeric values and one in eight a string such
/// as `"Running"`. Every line passes `hubsend send`'s telemetry schema as it stands (the
/// timestamp already canonical UTC), so each is sent as its own bytes.
fn telemetry_lines(bytes: usize, count: usize) -> Vec<Vec<u8>> {
    const STATES: [&str; 3] = ["Running", "Idle", "Fault"];
    const AXES: [&str; 3] = ["x", "y", "z"];
    (0..count)
        .map(|i| {
            let value = if i % 8 == 7 {
                format!("\"{}\"", STATES[i / 8 % 3])
            } else {
                format!("{}.{}", 40 + i % 50, i % 10)
            };
            let millis = if i % 4 == 0 {
                format!(".{:03}", i % 999 + 1)
            } else {
                String::new()
            };
            let s = format!(
                "{{\"sensor_id\":\"compressor-{}:vibe_{}\",\"timestamp\":\"2025-08-19T08:{:02}:{:02}{millis}Z\",\"value\":{value}",
                i % 97,
                AXES[i % 3],
                i / 60 % 60,
                i % 60,
            );
            closed(s, bytes).into_bytes()
        })
        .collect()
}

// Our own, as in the CLI: a line of /proc/self/status is a few lines; procfs or sysinfo
// would be a dev-dependency of the library for it.
fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// Exact, over one timed mode's samples (a bounded run, unlike a `hubsend send` that may go
// on for days, which uses a histogram); no hdrhistogram dev-dependency for a benchmark.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.50), at(0.99))
}

// ---------------------------------------------------------------------------------------------
// child: one hubsend mode in this process

fn run_child(args: &Args) -> hubsend::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(child(args))
}

async fn child(args: &Args) -> hubsend::Result<()> {
    let mode = args.get("child").unwrap_or("batch").to_owned();
    let cs = args.get("cs").expect("--cs").to_owned();
    let mut events = args.num("events", 1_000_000);
    let payload = args.num("payload-bytes", 100) as usize;
    // `--pool telemetry`: the lines `--mode cli` writes to its file (the batch it is compared with).
    let pool = match args.get("pool") {
        Some("telemetry") => telemetry_lines(payload, 1024),
        _ => bodies(payload, 1024),
    };
    // `--content-type T`: every event carries it, as every event `hubsend send` builds does
    // (`application/json`): an AMQP properties section more per event.
    let content_type = args.get("content-type").map(str::to_owned);
    let new_event = |body: &Vec<u8>| match &content_type {
        Some(t) => Event::new(body.clone()).with_content_type(t.as_str()),
        None => Event::new(body.clone()),
    };

    let mut options = ProducerOptions::new();
    if let Some(n) = args.get("max-in-flight") {
        options = options.max_in_flight(n.parse().expect("--max-in-flight"));
    }
    if let Some(n) = args.get("max-in-flight-bytes") {
        options = options.max_in_flight_bytes(n.parse().expect("--max-in-flight-bytes"));
    }
    options = options.idempotent(args.flag("idempotent"));
    let mut builder = Producer::builder().connection_string(cs).options(options);
    if let Some(ca) = args.get("ca") {
        builder = builder.add_root_certificate_pem(std::fs::read(ca).expect("reading --ca"));
    }
    // A custom endpoint (its scheme picks the transport: `https://…` needs `--features https`).
    if let Some(endpoint) = args.get("endpoint") {
        builder = builder.endpoint(endpoint);
    }
    let producer = builder.connect().await?;
    // Warm-up: attach the link, one round trip, untimed.
    producer
        .send_and_wait(Event::new(pool[0].clone()), SendOptions::new())
        .await?;

    // Outcomes are awaited in order by a separate task, so the loop below only queues. A send
    // stamped with the time it was handed over gives a latency sample (submit to outcome):
    // every batch, one single send in SAMPLE_EVERY (reading the clock for each would cost
    // the single-send rows a few percent of their CPU).
    const SAMPLE_EVERY: usize = 16;
    type Stamped = (Option<Instant>, hubsend::DeliveryFuture);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Stamped>();
    let waiter = tokio::spawn(async move {
        let mut n = 0u64;
        let mut samples = Vec::new();
        while let Some((sent, fut)) = rx.recv().await {
            fut.await?;
            if let Some(sent) = sent {
                samples.push(sent.elapsed());
            }
            n += 1;
        }
        hubsend::Result::Ok((n, samples))
    });
    // Batches and single sends waiting for their outcome, sampled every 5 ms while timed:
    // with a round-trip time, rate = in flight / (RTT + the hub's time), so this shows which
    // bound holds a mode back. Not in `latency` (one at a time), whose CPU per send the
    // sampler's wake-ups would dominate.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(mode != "latency"));
    let sampler = {
        let producer = producer.clone();
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (mut max, mut sum, mut n) = (0usize, 0u64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let now = producer.stats().in_flight;
                max = max.max(now);
                sum += now as u64;
                n += 1;
            }
            (max, sum as f64 / n.max(1) as f64)
        })
    };
    let buffered_samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));

    let mut latency = None;
    let mut batches = 0u64;
    let mut rss_samples: Vec<u64> = Vec::new();
    let cpu0 = cpu_seconds_precise();
    let start = Instant::now();
    match mode.as_str() {
        "steady" => {
            // Full-speed batches for a fixed time, with resident memory sampled every second.
            let run_for = Duration::from_secs(args.num("seconds", 60));
            let mut next_sample = Instant::now() + Duration::from_secs(1);
            let mut batch = producer.create_batch(BatchOptions::new()).await?;
            let mut i = 0usize;
            while start.elapsed() < run_for {
                let event = Event::new(pool[i % pool.len()].clone());
                i += 1;
                if let Err(e) = batch.try_add(event) {
                    let event = e.into_event();
                    let full = std::mem::replace(
                        &mut batch,
                        producer.create_batch(BatchOptions::new()).await?,
                    );
                    tx.send((None, producer.send_batch(full).await?)).ok();
                    batches += 1;
                    batch.try_add(event).expect("fits an empty batch");
                    if Instant::now() >= next_sample {
                        rss_samples.push(proc_status_kib("VmRSS:"));
                        next_sample += Duration::from_secs(1);
                    }
                }
            }
            events = i as u64 - batch.len() as u64;
        }
        "batch" => {
            let mut batch = producer.create_batch(BatchOptions::new()).await?;
            for i in 0..events as usize {
                let event = new_event(&pool[i % pool.len()]);
                if let Err(e) = batch.try_add(event) {
                    let TryAddError::Full(event) = e else {
                        panic!("a {payload}-byte event does not fit an empty batch");
                    };
                    let full = std::mem::replace(
                        &mut batch,
                        producer.create_batch(BatchOptions::new()).await?,
                    );
                    let sent = Instant::now();
                    tx.send((Some(sent), producer.send_batch(full).await?)).ok();
                    batches += 1;
                    batch.try_add(event).expect("fits an empty batch");
                }
            }
            if !batch.is_empty() {
                let sent = Instant::now();
                tx.send((Some(sent), producer.send_batch(batch).await?))
                    .ok();
                batches += 1;
            }
        }
        "buffered" => {
            // Default options; the success callback only records each batch's latency.
            let samples = buffered_samples.clone();
            let options = hubsend::BufferedOptions::new().on_success(move |b| {
                if let Ok(mut s) = samples.lock() {
                    s.push(b.latency);
                }
            });
            let buffered = hubsend::BufferedProducer::new(producer.clone(), options);
            for i in 0..events as usize {
                let event = Event::new(pool[i % pool.len()].clone());
                buffered.enqueue(event, SendOptions::new()).await?;
            }
            let report = buffered.close().await;
            assert_eq!(report.sent, events, "{report:?}");
        }
        "single" => {
            for i in 0..events as usize {
                let event = Event::new(pool[i % pool.len()].clone());
                let sent = (i % SAMPLE_EVERY == 0).then(Instant::now);
                tx.send((sent, producer.send(event, SendOptions::new()).await?))
                    .ok();
            }
        }
        "latency" => {
            for i in 0..args.num("latency-warmup", 200) as usize {
                producer
                    .send_and_wait(Event::new(pool[i % pool.len()].clone()), SendOptions::new())
                    .await?;
            }
            let mut samples = Vec::with_capacity(events as usize);
            let t0 = Instant::now();
            for i in 0..events as usize {
                let t = Instant::now();
                producer
                    .send_and_wait(Event::new(pool[i % pool.len()].clone()), SendOptions::new())
                    .await?;
                samples.push(t.elapsed());
            }
            let _ = t0;
            latency = Some(percentiles(samples));
        }
        other => panic!("unknown child mode {other}"),
    }
    drop(tx);
    let (settled, outcome_samples) = waiter.await.expect("waiter task")?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds_precise() - cpu0;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (in_flight_max, in_flight_mean) = sampler.await.expect("sampler task");
    if latency.is_none() {
        let mut samples = outcome_samples;
        if let Ok(mut b) = buffered_samples.lock() {
            samples.append(&mut b);
        }
        if !samples.is_empty() {
            latency = Some(percentiles(samples));
        }
    }
    if mode == "batch" || mode == "steady" {
        assert_eq!(settled, batches);
    } else if mode == "single" {
        assert_eq!(settled, events);
    }

    let eps = events as f64 / seconds;
    let mut line = format!(
        "{{\"tool\":\"hubsend\",\"mode\":\"{mode}\",\"events\":{events},\"payload_bytes\":{payload},\"seconds\":{seconds:.4},\"events_per_sec\":{eps:.1},\"mb_per_sec\":{:.2},\"peak_rss_kib\":{},\"cpu_seconds\":{:.2}",
        eps * payload as f64 / 1e6,
        proc_status_kib("VmHWM:"),
        cpu_seconds()
    );
    if let Some((p50, p99)) = latency {
        line.push_str(&format!(",\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3}"));
    }
    if !rss_samples.is_empty() {
        let mib: Vec<String> = rss_samples
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect();
        line.push_str(&format!(",\"rss_samples_mib\":[{}]", mib.join(",")));
    }
    if mode == "batch" || mode == "steady" {
        line.push_str(&format!(
            ",\"batches\":{batches},\"max_message_size\":{}",
            producer.max_message_size()
        ));
    }
    line.push_str(&format!(
        ",\"cpu_us_per_event\":{:.3},\"in_flight_max\":{in_flight_max},\"in_flight_mean\":{in_flight_mean:.1},\"window_mib\":{:.1}",
        cpu * 1e6 / events.max(1) as f64,
        producer.stats().in_flight_window_bytes as f64 / (1 << 20) as f64
    ));
    line.push('}');
    println!("{line}");
    let _ = tokio::time::timeout(Duration::from_secs(5), producer.close()).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// child: `hubsend send` of an NDJSON file (`--mode cli`)

/// `--child cli`: writes `--events` telemetry lines ([`telemetry_lines`], cycled) to a file in
/// the target directory, runs the release `hubsend send --input FILE --json` on it against
/// the hub (connection string in its environment, `--ca-file` for TLS), and prints the JSON
/// line the other children print: lines/s and MB/s as `hubsend` reports them (from the start
/// of sending, after connecting), the CPU of the `hubsend` process over its whole life (user +
/// system, from this process's waited-for children: reading, validating, TLS, start-up), and
/// its peak RSS (VmHWM, sampled every 10 ms until it exits). The file is removed afterwards.
fn run_cli_child(args: &Args) -> Result<(), String> {
    use std::io::Write;
    let bin = PathBuf::from(args.get("hubsend-bin").ok_or("--hubsend-bin")?);
    let cs = args.get("cs").ok_or("--cs")?;
    let lines = args.num("events", 1_000_000);
    let payload = args.num("payload-bytes", 100) as usize;
    let pool = telemetry_lines(payload, 1024);
    let dir = release_dir().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("bench-cli-{}.ndjson", std::process::id()));
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let _remove = Remove(path.clone());
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut file_bytes = 0u64;
    for i in 0..lines as usize {
        let line = &pool[i % pool.len()];
        out.write_all(line)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        file_bytes += line.len() as u64 + 1;
    }
    out.flush()
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    drop(out);

    let mut cmd = Command::new(&bin);
    cmd.args(["send", "--json", "--progress", "never", "--input"])
        .arg(&path)
        .env("EVENTHUB_CONNECTION_STRING", cs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(ca) = args.get("ca") {
        cmd.arg("--ca-file").arg(ca);
    }
    let cpu0 = children_cpu_seconds();
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let pid = child.id();
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(kib) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
        {
            peak_kib = peak_kib.max(kib);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for hubsend: {e}")),
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let cpu = children_cpu_seconds() - cpu0;
    let mut stdout = String::new();
    if let Some(mut s) = child.stdout.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut stdout);
    }
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .ok_or_else(|| format!("hubsend send ({status}) printed no JSON summary: {stdout}"))?;
    let sent = summary.get("sent").and_then(Value::as_u64).unwrap_or(0);
    if !status.success() || sent != lines {
        return Err(format!(
            "hubsend send ({status}) sent {sent} of {lines} lines: {summary}"
        ));
    }
    let num = |k: &str| summary.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let line = serde_json::json!({
        "tool": "hubsend",
        "mode": "cli",
        "events": sent,
        "payload_bytes": payload,
        "file_bytes": file_bytes,
        "seconds": num("seconds"),
        "wall_seconds": wall,
        "events_per_sec": num("events_per_sec"),
        "mb_per_sec": num("mb_per_sec"),
        "p50_ms": num("p50_ms"),
        "p99_ms": num("p99_ms"),
        "batches": num("batches"),
        "peak_rss_kib": peak_kib,
        "cpu_seconds": cpu,
        "cpu_us_per_event": cpu * 1e6 / sent.max(1) as f64,
    });
    println!("{line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// parent: hub process, children, peers, table

/// `target/release` (or `$CARGO_TARGET_DIR/release`) this example was built into.
fn release_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?; // .../release/examples
    if dir.file_name()? == "examples" {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

fn find_bin(env: &str, name: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let mut candidates = Vec::new();
    if let Some(d) = release_dir() {
        candidates.push(d.join(name));
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(Path::new(&t).join("release").join(name));
    }
    candidates.push(PathBuf::from("target/release").join(name));
    candidates.push(PathBuf::from("bench-peers/target/release").join(name));
    candidates.into_iter().find(|p| p.exists())
}

struct Hub {
    cs: String,
    ca: Option<PathBuf>,
    tls: bool,
    process: Option<Child>,
    /// The spawned hub's WebSocket upgrade URL and REST base URL (`--transports`).
    ws_url: Option<String>,
    rest_url: Option<String>,
}

impl Hub {
    fn start(tls: bool, more_transports: bool) -> Hub {
        if let Ok(cs) = std::env::var("EVENTHUB_CONNECTION_STRING") {
            if !cs.trim().is_empty() {
                let ca = std::env::var("EVENTHUB_CA_FILE").ok().map(PathBuf::from);
                let tls = !cs
                    .to_ascii_lowercase()
                    .contains("usedevelopmentemulator=true");
                return Hub {
                    cs,
                    ca,
                    tls,
                    process: None,
                    ws_url: None,
                    rest_url: None,
                };
            }
        }
        let Some(bin) = find_bin("HUBSEND_TESTHUB_BIN", "hubsend-testhub") else {
            eprintln!(
                "the test hub binary was not found. Build it with\n    \
                 cargo build --release -p hubsend-testhub\n\
                 (same CARGO_TARGET_DIR as this example), or set HUBSEND_TESTHUB_BIN, or set \
                 EVENTHUB_CONNECTION_STRING to use an existing hub."
            );
            std::process::exit(1);
        };
        let dir = std::env::temp_dir().join(format!("hubsend-bench-{}", std::process::id()));
        let mut cmd = Command::new(&bin);
        // Like the service's retention, the hub keeps only the newest events per partition, so
        // its memory (and its page faults on fresh memory) stay flat however long the runs are.
        cmd.args([
            "--host",
            "127.0.0.1",
            "--partitions",
            "4",
            "--retain-events",
            "100000",
        ]);
        if tls {
            cmd.arg("--tls-dir").arg(&dir);
        }
        if more_transports {
            cmd.args(["--rest", "--ws-port", "0"]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let cs = lines
            .next()
            .and_then(|l| l.ok())
            .expect("the test hub prints its connection string");
        // The CA is written before anything is printed.
        let ca = tls.then(|| dir.join("ca.pem"));
        let (mut ws_url, mut rest_url) = (None, None);
        if more_transports {
            // `REST endpoint: URL`, then the last line `WebSocket: URL`.
            for line in lines.by_ref().map_while(|l| l.ok()) {
                if let Some(url) = line.strip_prefix("REST endpoint: ") {
                    rest_url = Some(url.trim().to_owned());
                }
                if let Some(url) = line.strip_prefix("WebSocket: ") {
                    ws_url = Some(url.trim().to_owned());
                    break;
                }
            }
        }
        // Keep reading what else the hub prints: with its stdout closed the hub would die on
        // its next line (EPIPE), which is how spawned hubs used to vanish mid-run.
        std::thread::spawn(move || for _ in lines {});
        Hub {
            cs,
            ca,
            tls,
            process: Some(child),
            ws_url,
            rest_url,
        }
    }

    /// `host:port` from the connection string's Endpoint.
    fn authority(&self) -> String {
        let ep = self
            .cs
            .split(';')
            .find_map(|p| p.trim().strip_prefix("Endpoint="))
            .unwrap_or("");
        let rest = ep.split_once("://").map_or(ep, |x| x.1);
        rest.trim_end_matches('/').to_owned()
    }

    /// The hub's AMQP listener, for the delay proxy (`localhost` is the loopback address the
    /// spawned hub listens on).
    fn socket_addr(&self) -> std::net::SocketAddr {
        use std::net::ToSocketAddrs;
        let authority = self.authority().replacen("localhost", "127.0.0.1", 1);
        authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("the hub's endpoint {authority:?} is not host:port"))
    }

    fn rss_mib(&self) -> Option<f64> {
        let pid = self.process.as_ref()?.id();
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: f64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Runs a command that prints one JSON line; returns it, or None (with a note) on failure.
fn run_json(label: &str, cmd: &mut Command) -> Option<Value> {
    eprintln!("  running {label} ...");
    let out = match cmd.stderr(Stdio::piped()).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("  {label}: cannot start: {e}");
            return None;
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        // Asked for logs: the child's are shown, not only a failed one's.
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .and_then(|l| serde_json::from_str::<Value>(l).ok());
    if json.is_none() || !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        eprintln!(
            "  {label}: failed ({}):\n    {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
        );
        return None;
    }
    json
}

struct Row {
    transport: &'static str,
    payload: u64,
    /// The round-trip time the delay proxy added (`--rtt-ms`); None: straight to the hub.
    rtt_ms: Option<u64>,
    /// Which of `--repeat` runs (from 1).
    run: u64,
    name: String,
    json: Value,
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

/// The official crate's rate with its stalled sends taken out, when that means something:
/// the peer subtracts one second per stall, and with several concurrent senders the stalls
/// overlap, so a run that was mostly stalls would claim an absurd rate. Then the raw rate is
/// what compares.
fn excl_stalls(j: &Value) -> Option<f64> {
    let raw = j.get("events_per_sec").and_then(Value::as_f64)?;
    j.get("events_per_sec_excl_stalls")
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite() && *x > 0.0 && *x <= raw * 10.0)
}

/// Logs to stderr: what RUST_LOG chooses when set (`hubsend::amqp::window=debug` shows the
/// in-flight window's decisions), else `default`.
fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() {
    let args = Args::parse();
    if args.get("child") == Some("cli") {
        if let Err(e) = run_cli_child(&args) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.get("child").is_some() {
        // Silent unless RUST_LOG asks (the parent shows what a child logs).
        init_logs("off");
        if let Err(e) = run_child(&args) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.get("mode") == Some("iot") {
        iot::run(&args);
        return;
    }
    // The delay proxies run in this process and warn through `tracing` (an upstream they
    // cannot reach): to stderr, as the bench's own notes.
    init_logs("hubsend_testhub=warn");

    let events = args.num("events", 2_000_000);
    let single_events = args.num("single-events", (events / 4).max(1));
    let latency_events = args.num("latency-events", 2_000);
    let official_events = args.num("official-events", (events / 4).max(1));
    let official_single_events = args.num("official-single-events", 2_000);
    let official_latency_events = args.num("official-latency-events", 500);
    let official_conc = args.num("official-concurrency", 4);
    let official_single_conc = args.num("official-single-concurrency", 1);
    let steady_seconds = args.num("steady-seconds", 0);
    let mode = args.get("mode").unwrap_or("all").to_owned();
    let mut modes: Vec<&str> = Vec::new();
    for m in mode.split(',').map(str::trim) {
        match m {
            "all" => modes.extend(["batch", "buffered", "single", "latency", "cli"]),
            "batch" | "buffered" | "single" | "latency" | "cli" => modes.push(m),
            other => {
                eprintln!("--mode batch|buffered|single|latency|cli|all (or a list), not {other}");
                std::process::exit(2);
            }
        }
    }
    // `--rtt-ms 0,5,20`: each round-trip time through a delay proxy; none: straight to the hub.
    let rtts: Vec<Option<u64>> = match args.get("rtt-ms") {
        None => vec![None],
        Some(list) => list
            .split(',')
            .map(|r| {
                Some(r.trim().parse().unwrap_or_else(|_| {
                    eprintln!("--rtt-ms wants milliseconds, like 0,5,20,50; got {r:?}");
                    std::process::exit(2)
                }))
            })
            .collect(),
    };
    let rtt_mode = args.get("rtt-ms").is_some();
    if rtt_mode && args.flag("transports") {
        eprintln!("--rtt-ms covers AMQP (plain or TLS) only; run --transports without it");
        std::process::exit(2);
    }
    // `cli` runs `hubsend send` on a file, straight to the hub: not through the delay proxy.
    if rtt_mode {
        modes.retain(|m| *m != "cli");
    }
    // In `all`, only for telemetry-sized lines (a 1 KiB file of `--events` lines is large).
    let cli_explicit = mode.split(',').any(|m| m.trim() == "cli");
    let cli_lines = args.num("cli-lines", events);
    let hubsend_bin = modes
        .contains(&"cli")
        .then(|| find_bin("HUBSEND_BIN", "hubsend"))
        .flatten();
    if modes.contains(&"cli") && hubsend_bin.is_none() {
        eprintln!(
            "note: the hubsend binary was not found (cli mode skipped); build it with\n    \
             cargo build --release -p hubsend-cli   # same CARGO_TARGET_DIR, or set HUBSEND_BIN"
        );
    }
    let repeat = args.num("repeat", 1).max(1);
    let payloads: Vec<u64> = args
        .get("payload-bytes")
        .unwrap_or("100")
        .split(',')
        .map(|p| p.trim().parse().expect("--payload-bytes"))
        .collect();
    let transports: Vec<bool> = if args.flag("both") {
        vec![false, true]
    } else {
        vec![args.flag("tls")]
    };
    let json_out = args.flag("json");
    let peers = !args.flag("no-peers");
    let official = peers
        .then(|| find_bin("HUBSEND_BENCH_OFFICIAL_BIN", "official"))
        .flatten();
    let ceiling = peers
        .then(|| find_bin("HUBSEND_BENCH_CEILING_BIN", "ceiling"))
        .flatten();
    if peers && (official.is_none() || ceiling.is_none()) {
        eprintln!(
            "note: bench-peers binaries not found (official: {}, ceiling: {}); build them with\n    \
             (cd bench-peers && cargo build --release)   # same CARGO_TARGET_DIR",
            official.is_some(),
            ceiling.is_some()
        );
    }
    let me = std::env::current_exe().expect("current exe");

    let mut rows: Vec<Row> = Vec::new();
    for &tls in &transports {
        let more_transports = args.flag("transports");
        let hub = Hub::start(tls, more_transports);
        let transport = if hub.tls { "tls" } else { "plain" };
        // The endpoint only: the connection string carries the hub's key.
        let endpoint = hub.cs.split(';').next().unwrap_or_default();
        eprintln!("hub ({transport}): {endpoint}");
        // One delay proxy per round-trip time, in front of this hub's AMQP port.
        let proxies: Vec<(Option<u64>, Option<DelayProxy>)> = rtts
            .iter()
            .map(|&rtt| {
                let proxy = rtt.map(|ms| {
                    let upstream = hub.socket_addr();
                    let one_way = Duration::from_micros(ms * 500);
                    DelayProxy::builder(upstream, one_way)
                        .start_on_own_thread()
                        .unwrap_or_else(|e| panic!("starting the delay proxy: {e}"))
                });
                (rtt, proxy)
            })
            .collect();
        // Runs of one point are spread over the whole sweep (all RTTs, then all again), so a
        // busy spell on the shared machine hits one run of several points, not both of one.
        let proxies = &proxies;
        for (&payload, run, (rtt, proxy)) in payloads
            .iter()
            .flat_map(|p| (0..repeat).flat_map(move |run| proxies.iter().map(move |x| (p, run, x))))
        {
            let rtt = *rtt;
            let describe = |name: &str| match rtt {
                Some(ms) => format!(
                    "{name} ({transport}, {payload} B, {ms} ms RTT, run {})",
                    run + 1
                ),
                None => format!("{name} ({transport}, {payload} B)"),
            };
            // The proxied endpoint: the hub's name on its certificate, the proxy's port.
            let via = proxy.as_ref().map(|p| {
                let host = hub.authority();
                let host = host.rsplit_once(':').map_or(host.as_str(), |h| h.0);
                let scheme = if hub.tls { "amqps" } else { "amqp" };
                format!("{scheme}://{host}:{}", p.addr().port())
            });
            let mut push = |name: &str, json: Option<Value>| {
                if let Some(mut json) = json {
                    if let Some(p) = proxy {
                        let peaks = p.take_peaks();
                        json["proxy_peak_to_hub_kib"] = Value::from(peaks.to_upstream / 1024);
                        json["proxy_peak_to_client_kib"] = Value::from(peaks.to_client / 1024);
                    }
                    if json_out {
                        let mut j = json.clone();
                        j["transport"] = Value::from(transport);
                        j["row"] = Value::from(name);
                        if let Some(ms) = rtt {
                            j["rtt_ms"] = Value::from(ms);
                            j["run"] = Value::from(run + 1);
                        }
                        println!("{j}");
                    }
                    rows.push(Row {
                        transport,
                        payload,
                        rtt_ms: rtt,
                        run: run + 1,
                        name: name.to_owned(),
                        json,
                    });
                }
            };
            // A hubsend child measuring `mode`; `amount` is `--events N` or `--seconds S`.
            let hubsend_child = |mode: &str, amount: (&str, u64)| {
                let mut cmd = Command::new(&me);
                cmd.arg("--child")
                    .arg(mode)
                    .arg("--cs")
                    .arg(&hub.cs)
                    .arg(format!("--{}", amount.0))
                    .arg(amount.1.to_string())
                    .arg("--payload-bytes")
                    .arg(payload.to_string());
                if let Some(ca) = &hub.ca {
                    cmd.arg("--ca").arg(ca);
                }
                for flag in ["max-in-flight", "max-in-flight-bytes", "latency-warmup"] {
                    if let Some(value) = args.get(flag) {
                        cmd.arg(format!("--{flag}")).arg(value);
                    }
                }
                if let Some(via) = &via {
                    cmd.arg("--endpoint").arg(via);
                }
                cmd
            };
            // The same modes over WebSockets and the REST API, on the same hub.
            let others = [("wss", hub.ws_url.clone()), ("https", hub.rest_url.clone())];
            for (label, url) in others.iter().filter(|_| more_transports) {
                let Some(url) = url else { continue };
                for m in modes.iter().filter(|m| **m != "buffered" && **m != "cli") {
                    let n = match *m {
                        "batch" => events,
                        "single" => {
                            single_events.min(if *label == "https" { 20_000 } else { u64::MAX })
                        }
                        _ => latency_events,
                    };
                    let mut cmd = hubsend_child(m, ("events", n));
                    cmd.arg("--endpoint").arg(url);
                    let name = format!("hubsend {label} {m}");
                    push(
                        &name,
                        run_json(&format!("{name} ({transport}, {payload} B)"), &mut cmd),
                    );
                }
            }
            let idempotent_too = args.flag("idempotent");
            for m in &modes {
                if *m == "cli" {
                    let Some(bin) = &hubsend_bin else { continue };
                    if payload > 128 && !cli_explicit {
                        continue;
                    }
                    // The batch with the file's bodies first, then `hubsend send` of the file.
                    let mut cmd = hubsend_child("batch", ("events", cli_lines));
                    cmd.args(["--pool", "telemetry", "--content-type", "application/json"]);
                    let name = "hubsend batch (cli bodies)";
                    push(name, run_json(&describe(name), &mut cmd));
                    let mut cmd = hubsend_child("cli", ("events", cli_lines));
                    cmd.arg("--hubsend-bin").arg(bin);
                    let name = "hubsend cli";
                    push(name, run_json(&describe(name), &mut cmd));
                    continue;
                }
                let n = match *m {
                    "batch" | "buffered" => events,
                    "single" => single_events,
                    _ => latency_events,
                };
                for idempotent in [false, true] {
                    if idempotent && !idempotent_too {
                        continue;
                    }
                    let mut cmd = hubsend_child(m, ("events", n));
                    let name = if idempotent {
                        cmd.arg("--idempotent");
                        format!("hubsend idem. {m}")
                    } else {
                        format!("hubsend {m}")
                    };
                    push(&name, run_json(&describe(&name), &mut cmd));
                }
            }
            if steady_seconds > 0 {
                let mut cmd = hubsend_child("steady", ("seconds", steady_seconds));
                let label = format!("hubsend steady {steady_seconds}s ({transport}, {payload} B)");
                push("hubsend steady", run_json(&label, &mut cmd));
            }
            // The ceiling dials the connection string's endpoint: not through the proxy.
            if let Some(bin) = ceiling.as_ref().filter(|_| rtt.is_none()) {
                if modes.contains(&"batch") {
                    let mut cmd = Command::new(bin);
                    cmd.arg("--connection-string")
                        .arg(&hub.cs)
                        .arg("--events")
                        .arg(events.to_string())
                        .arg("--payload-bytes")
                        .arg(payload.to_string());
                    if let Some(ca) = &hub.ca {
                        cmd.arg("--ca").arg(ca);
                    }
                    push(
                        "ceiling (raw fe2o3)",
                        run_json(&format!("ceiling ({transport}, {payload} B)"), &mut cmd),
                    );
                }
            }
            if let Some(bin) = &official {
                let endpoint = if let Some(via) = &via {
                    via.clone()
                } else if hub.tls {
                    // The official crate verifies through the platform verifier: trust the
                    // hub's CA via SSL_CERT_FILE and dial the name on the certificate.
                    format!("amqps://{}", hub.authority())
                } else {
                    format!("amqp://{}", hub.authority())
                };
                // The official crate has no buffered producer and no file sender.
                for m in modes.iter().filter(|m| !matches!(**m, "cli" | "buffered")) {
                    let (n, conc) = match *m {
                        "batch" => (official_events, official_conc),
                        "single" => (official_single_events, official_single_conc),
                        _ => (official_latency_events, 1),
                    };
                    let mut cmd = Command::new(bin);
                    cmd.arg("--connection-string")
                        .arg(&hub.cs)
                        .arg("--endpoint")
                        .arg(&endpoint)
                        .arg("--mode")
                        .arg(m)
                        .arg("--events")
                        .arg(n.to_string())
                        .arg("--payload-bytes")
                        .arg(payload.to_string())
                        .arg("--concurrency")
                        .arg(conc.to_string());
                    if let Some(ca) = &hub.ca {
                        cmd.env("SSL_CERT_FILE", ca);
                    }
                    let name = match *m {
                        "batch" => "official batch".to_owned(),
                        "single" => "official send_event".to_owned(),
                        _ => "official latency".to_owned(),
                    };
                    push(&name, run_json(&describe(&name), &mut cmd));
                }
            }
        }
        if let Some(rss) = hub.rss_mib() {
            eprintln!("hub ({transport}) RSS at the end: {rss:.0} MiB");
        }
    }

    if rtt_mode {
        print_rtt_table(&rows);
    } else {
        print_table(&rows);
    }
}

fn print_table(rows: &[Row]) {
    let get = |t: &str, p: u64, name: &str| {
        rows.iter()
            .find(|r| r.transport == t && r.payload == p && r.name == name)
            .map(|r| &r.json)
    };
    println!();
    println!(
        "{:<6} {:>6}  {:<26} {:>10} {:>12} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9}",
        "link",
        "bytes",
        "mode",
        "events",
        "events/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "RSS MB",
        "CPU s",
        "CPU µs/ev"
    );
    println!("{}", "-".repeat(120));
    let opt = |v: Option<f64>, prec: usize| match v {
        Some(x) => format!("{x:.prec$}"),
        None => "-".to_owned(),
    };
    for r in rows {
        let j = &r.json;
        let is_latency = r.name.ends_with("latency");
        let stalls = f(j, "stalled_sends").filter(|s| *s > 0.0);
        let name = if stalls.is_some() {
            format!("{} *", r.name)
        } else {
            r.name.clone()
        };
        println!(
            "{:<6} {:>6}  {:<26} {:>10} {:>12} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9}",
            r.transport,
            r.payload,
            name,
            f(j, "events").map_or("-".into(), |e| format!("{e:.0}")),
            if is_latency {
                "-".to_owned()
            } else {
                f(j, "events_per_sec").map_or("-".into(), |e| group(e as u64))
            },
            if is_latency {
                "-".to_owned()
            } else {
                opt(f(j, "mb_per_sec"), 1)
            },
            opt(f(j, "p50_ms"), 3),
            opt(f(j, "p99_ms"), 3),
            opt(f(j, "peak_rss_kib").map(|k| k * 1024.0 / 1e6), 1),
            opt(f(j, "cpu_seconds"), 2),
            opt(f(j, "cpu_us_per_event"), 3),
        );
        if let Some(s) = stalls {
            match excl_stalls(j).filter(|_| !is_latency) {
                Some(x) => println!(
                    "{:>16}* {s} stalled sends (1 s timeout each, official-crate bug); {} ev/s without them",
                    "",
                    group(x as u64)
                ),
                None => println!(
                    "{:>16}* {s} stalled sends excluded from the percentiles (official-crate bug)",
                    ""
                ),
            }
        }
    }

    // Ratios and targets, per transport and payload.
    let mut keys: Vec<(&str, u64)> = rows.iter().map(|r| (r.transport, r.payload)).collect();
    keys.dedup();
    println!();
    for (t, p) in keys {
        let eps = |name: &str| get(t, p, name).and_then(|j| f(j, "events_per_sec"));
        let hb = eps("hubsend batch");
        let hs = eps("hubsend single");
        // For the official crate, the rate with its stalled sends taken out (see
        // bench-peers/src/bin/official.rs `guard`): the comparison it would get without that bug.
        let eps_official =
            |name: &str| get(t, p, name).and_then(|j| excl_stalls(j).or(f(j, "events_per_sec")));
        let ob = eps_official("official batch");
        let os = eps_official("official send_event");
        let ce = eps("ceiling (raw fe2o3)");
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "n/a".to_owned(),
        };
        println!("[{t}, {p} B]");
        println!("  hubsend batch  / official batch      = {}", ratio(hb, ob));
        println!("  hubsend single / official send_event = {}", ratio(hs, os));
        println!(
            "  hubsend batch  / ceiling             = {}",
            match (hb, ce) {
                (Some(a), Some(b)) => format!("{:.1}%", 100.0 * a / b),
                _ => "n/a".to_owned(),
            }
        );
        let cli = eps("hubsend cli");
        let cli_batch = eps("hubsend batch (cli bodies)");
        if cli.is_some() {
            println!(
                "  hubsend cli    / batch (same bodies) = {}",
                match (cli, cli_batch) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.1}%", 100.0 * a / b),
                    _ => "n/a".to_owned(),
                }
            );
        }
        if let (Some(a), Some(b)) = (
            get(t, p, "hubsend latency").and_then(|j| f(j, "p99_ms")),
            get(t, p, "official latency").and_then(|j| f(j, "p99_ms")),
        ) {
            println!("  single send p99: hubsend {a:.3} ms, official {b:.3} ms");
        }
        if p <= 128 {
            let mark = |ok: Option<bool>| match ok {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let rss_max = rows
                .iter()
                .filter(|r| r.transport == t && r.payload == p && r.name.starts_with("hubsend"))
                .filter_map(|r| f(&r.json, "peak_rss_kib"))
                .fold(None::<f64>, |m, k| Some(m.map_or(k, |m| m.max(k))));
            let p99 = get(t, p, "hubsend latency").and_then(|j| f(j, "p99_ms"));
            println!("  targets (stated for TLS, ~100 B events):");
            let targets = [
                ("batched >= 1.5M ev/s ........", hb.map(|v| v >= 1.5e6)),
                (
                    "batched >= 80% of ceiling ...",
                    hb.zip(ce).map(|(a, b)| a >= 0.8 * b),
                ),
                (
                    "batched >= 5x official ......",
                    hb.zip(ob).map(|(a, b)| a >= 5.0 * b),
                ),
                ("single >= 200k ev/s .........", hs.map(|v| v >= 2e5)),
                (
                    "single >= 20x send_event ....",
                    hs.zip(os).map(|(a, b)| a >= 20.0 * b),
                ),
                ("single send p99 < 2 ms ......", p99.map(|v| v < 2.0)),
                (
                    "peak RSS < 64 MB ............",
                    rss_max.map(|k| k * 1024.0 < 64e6),
                ),
            ];
            for (label, met) in targets {
                println!("    {label} {}", mark(met));
            }
            if cli.is_some() {
                let cli_targets = [
                    ("cli >= 1M lines/s ...........", cli.map(|v| v >= 1e6)),
                    (
                        "cli >= 70% of batch (same) ..",
                        cli.zip(cli_batch).map(|(a, b)| a >= 0.7 * b),
                    ),
                ];
                for (label, met) in cli_targets {
                    println!("    {label} {}", mark(met));
                }
            }
            if let Some(samples) = get(t, p, "hubsend steady")
                .and_then(|j| j.get("rss_samples_mib"))
                .and_then(Value::as_array)
            {
                let mib: Vec<f64> = samples.iter().filter_map(Value::as_f64).collect();
                // Flat: no growth trend. The mean of the last 10 samples is within 10 % of the
                // mean of the 10 after a 10 s warm-up (single samples jitter by a few MB as
                // batches come and go; a leak shows up as a rising mean).
                let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
                let flat = (mib.len() >= 30)
                    .then(|| mean(&mib[mib.len() - 10..]) <= mean(&mib[10..20]) * 1.10);
                println!(
                    "    RSS flat over {:>2} s ......... {}",
                    mib.len(),
                    mark(flat)
                );
                let every_10: Vec<String> = mib
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (i + 1) % 10 == 0)
                    .map(|(i, m)| format!("{}s {m:.0}", i + 1))
                    .collect();
                println!("      RSS MiB over the steady run: {}", every_10.join(", "));
            }
        }
    }
}

/// `--rtt-ms`: one row per mode × transport × round-trip time × run, then the targets of
/// issue #16 that depend on distance, from the mean of the runs.
fn print_rtt_table(rows: &[Row]) {
    let opt = |v: Option<f64>, prec: usize| match v {
        Some(x) => format!("{x:.prec$}"),
        None => "-".to_owned(),
    };
    // Mean events/s of a mode's runs at one point.
    let mean_eps = |t: &str, p: u64, name: &str, rtt: u64| {
        let v: Vec<f64> = rows
            .iter()
            .filter(|r| r.transport == t && r.payload == p && r.name == name)
            .filter(|r| r.rtt_ms == Some(rtt))
            .filter_map(|r| f(&r.json, "events_per_sec"))
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut sorted: Vec<&Row> = rows.iter().collect();
    // Stable: runs stay in the order they ran.
    sorted.sort_by_key(|r| (r.transport, r.payload, r.name.clone(), r.rtt_ms));
    println!();
    println!(
        "{:<5} {:>5} {:>4}  {:<20} {:>3} {:>10} {:>7} {:>7} {:>8} {:>8} {:>7} {:>9} {:>7} {:>7}",
        "link",
        "bytes",
        "RTT",
        "mode",
        "run",
        "events/s",
        "MB/s",
        "µs/ev",
        "p50 ms",
        "p99 ms",
        "RSS MB",
        "in-flight",
        "mean",
        "vs 0ms"
    );
    println!("{}", "-".repeat(124));
    for r in sorted {
        let j = &r.json;
        let is_latency = r.name.ends_with("latency");
        let eps = f(j, "events_per_sec").filter(|_| !is_latency);
        let base = mean_eps(r.transport, r.payload, &r.name, 0).filter(|_| !is_latency);
        println!(
            "{:<5} {:>5} {:>4}  {:<20} {:>3} {:>10} {:>7} {:>7} {:>8} {:>8} {:>7} {:>9} {:>7} {:>7}",
            r.transport,
            r.payload,
            r.rtt_ms.map_or("-".into(), |m| m.to_string()),
            r.name,
            r.run,
            eps.map_or("-".into(), |e| group(e as u64)),
            opt(f(j, "mb_per_sec").filter(|_| !is_latency), 1),
            opt(f(j, "cpu_us_per_event"), 2),
            opt(f(j, "p50_ms"), 2),
            opt(f(j, "p99_ms"), 2),
            opt(f(j, "peak_rss_kib").map(|k| k * 1024.0 / 1e6), 1),
            opt(f(j, "in_flight_max"), 0),
            opt(f(j, "in_flight_mean"), 1),
            match (eps, base) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.0}%", 100.0 * a / b),
                _ => "-".to_owned(),
            },
        );
    }
    let mut keys: Vec<(&str, u64)> = rows.iter().map(|r| (r.transport, r.payload)).collect();
    keys.sort();
    keys.dedup();
    let mark = |ok: Option<bool>| match ok {
        Some(true) => "MET",
        Some(false) => "MISSED",
        None => "n/a",
    };
    for (t, p) in keys {
        println!();
        println!("[{t}, {p} B] issue #16 targets at a distance (mean of the runs; 0 ms: through the proxy, no delay):");
        let batch = |rtt| mean_eps(t, p, "hubsend batch", rtt);
        let single = |rtt| mean_eps(t, p, "hubsend single", rtt);
        let buffered = |rtt| mean_eps(t, p, "hubsend buffered", rtt);
        let mut rtts: Vec<u64> = rows.iter().filter_map(|r| r.rtt_ms).collect();
        rtts.sort();
        rtts.dedup();
        for rtt in rtts.iter().copied().filter(|r| *r > 0) {
            let pct = |a: Option<f64>, b: Option<f64>| {
                a.zip(b)
                    .map_or("n/a".to_owned(), |(a, b)| format!("{:.1}%", 100.0 * a / b))
            };
            println!(
                "  {rtt:>3} ms: batch {} of 0 ms{}; single {} ev/s{}; buffered {} of batch",
                pct(batch(rtt), batch(0)),
                if rtt == 20 {
                    format!(
                        " (>= 80%: {})",
                        mark(batch(rtt).zip(batch(0)).map(|(a, b)| a >= 0.8 * b))
                    )
                } else {
                    String::new()
                },
                single(rtt).map_or("n/a".into(), |e| group(e as u64)),
                if rtt == 20 {
                    format!(" (>= 500,000: {})", mark(single(rtt).map(|e| e >= 5e5)))
                } else {
                    String::new()
                },
                pct(buffered(rtt), batch(rtt)),
            );
        }
    }
}

/// 1234567 -> "1,234,567".
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// `--mode iot`: the gateway

/// `--mode iot`: one `Gateway` sending as N devices to a spawned test hub in IoT Hub mode.
///
/// Each row: N devices registered up front (`--iot-device`), one warm-up message each (token
/// and link set up, not timed), then `--iot-events` messages in all, each device filling
/// 256 KB batches of its share, all devices at once. Timed: from the first batch to the last
/// outcome. CPU is this process's user + system time over that window (the hub runs in its
/// own process), divided by the messages.
mod iot {
    use super::{bodies, cpu_seconds, find_bin, percentiles, proc_status_kib, Args};
    use hubsend::iothub::{Gateway, IotHubBuilder};
    use hubsend::{Event, ProducerOptions, TryAddError};
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const KEY: &str = "YmVuY2gtZGV2aWNlLWtleS1mb3ItdGhlLWlvdC1iZW5jaA==";

    pub(super) fn run(args: &Args) {
        let total = args.num("iot-events", 200_000);
        let payload = args.num("payload-bytes", 100) as usize;
        let shard = args.num("shard", 250) as usize;
        let tls = args.flag("tls");
        let counts: Vec<usize> = args
            .get("devices")
            .unwrap_or("1,100,1000")
            .split(',')
            .map(|d| d.trim().parse().expect("--devices"))
            .collect();
        let mut rows = Vec::new();
        for &n in &counts {
            rows.push((n, 900, one(n, 900, total, payload, tls)));
            if shard > 0 && n > shard {
                rows.push((n, shard, one(n, shard, total, payload, tls)));
            }
        }
        println!(
            "{:>8} {:>8} {:>6} {:>10} {:>12} {:>10} {:>8} {:>8} {:>8}",
            "devices",
            "per-conn",
            "conns",
            "messages",
            "messages/s",
            "CPU µs/msg",
            "p50 ms",
            "p99 ms",
            "RSS MiB"
        );
        for (n, per, r) in &rows {
            println!(
                "{n:>8} {per:>8} {:>6} {:>10} {:>12.0} {:>10.2} {:>8.1} {:>8.1} {:>8.1}",
                r.connections, r.messages, r.rate, r.cpu_us, r.p50, r.p99, r.rss_mib
            );
        }
        if args.flag("json") {
            for (n, per, r) in &rows {
                println!(
                    "{}",
                    serde_json::json!({
                        "mode": "iot", "devices": n, "max_devices_per_connection": per,
                        "connections": r.connections, "messages": r.messages,
                        "messages_per_sec": r.rate, "cpu_us_per_message": r.cpu_us,
                        "p50_ms": r.p50, "p99_ms": r.p99, "peak_rss_mib": r.rss_mib,
                        "payload_bytes": payload, "tls": tls,
                    })
                );
            }
        }
    }

    struct Result {
        connections: usize,
        messages: u64,
        rate: f64,
        cpu_us: f64,
        p50: f64,
        p99: f64,
        rss_mib: f64,
    }

    /// The spawned hub: its AMQP port and CA file; killed when dropped.
    struct Hub {
        child: std::process::Child,
        port: u16,
        ca: Option<std::path::PathBuf>,
    }

    impl Drop for Hub {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn hub(devices: usize, tls: bool) -> Hub {
        let bin = find_bin("HUBSEND_TESTHUB_BIN", "hubsend-testhub")
            .expect("the test hub binary: cargo build --release -p hubsend-testhub");
        let dir = std::env::temp_dir().join(format!("hubsend-iot-bench-{}", std::process::id()));
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--iothub", "bench.azure-devices.net"])
            .args([
                "--retain-events",
                "1000",
                "--policy-key",
                &format!("device={KEY}"),
            ]);
        for i in 0..devices {
            cmd.arg("--iot-device").arg(format!("{}={KEY}", id(i)));
        }
        if tls {
            cmd.arg("--tls-dir").arg(&dir);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the test hub");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines
            .next()
            .and_then(|l| l.ok())
            .expect("the hub's first line");
        let port = first
            .split(';')
            .find_map(|kv| kv.strip_prefix("GatewayHostName="))
            .and_then(|g| g.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("GatewayHostName=localhost:PORT");
        std::thread::spawn(move || for _ in lines {});
        Hub {
            child,
            port,
            ca: tls.then(|| dir.join("ca.pem")),
        }
    }

    fn id(i: usize) -> String {
        format!("bench-device-{i:05}")
    }

    fn one(devices: usize, per_connection: usize, total: u64, payload: usize, tls: bool) -> Result {
        let hub = hub(devices, tls);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let cs = format!(
                "HostName=bench.azure-devices.net;SharedAccessKeyName=device;SharedAccessKey={KEY}"
            );
            let scheme = if hub.ca.is_some() {
                "amqps://localhost"
            } else {
                "amqp://127.0.0.1"
            };
            let mut builder = IotHubBuilder::default()
                .connection_string(cs)
                .endpoint(format!("{scheme}:{}", hub.port))
                .max_devices_per_connection(per_connection)
                .idle_timeout(None)
                .options(ProducerOptions::new().max_in_flight(4096));
            if let Some(ca) = &hub.ca {
                builder = builder.add_root_certificate_pem(std::fs::read(ca).expect("CA"));
            }
            let gateway = builder.gateway().await.expect("gateway");
            // Warm-up: every device's token and link.
            let mut warm = Vec::new();
            for i in 0..devices {
                let g = gateway.clone();
                warm.push(tokio::spawn(async move {
                    g.send(&id(i), Event::new("warm-up"))
                        .await
                        .expect("queued")
                        .await
                        .expect("stored");
                }));
            }
            for w in warm {
                w.await.expect("warm-up");
            }
            let per_device = (total / devices as u64).max(1);
            let body_set = std::sync::Arc::new(bodies(payload, 64));
            let cpu0 = cpu_seconds();
            let started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..devices {
                let g = gateway.clone();
                let body_set = body_set.clone();
                tasks.push(tokio::spawn(device_run(g, id(i), per_device, body_set)));
            }
            let mut latencies = Vec::new();
            for t in tasks {
                latencies.extend(t.await.expect("device task"));
            }
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu0;
            let messages = per_device * devices as u64;
            let connections = gateway.stats().await.connections;
            let (p50, p99) = percentiles(latencies);
            let _ = gateway.close().await;
            drop(hub);
            Result {
                connections,
                messages,
                rate: messages as f64 / elapsed,
                cpu_us: cpu * 1e6 / messages as f64,
                p50,
                p99,
                rss_mib: proc_status_kib("VmHWM:") as f64 / 1024.0,
            }
        })
    }

    /// Sends `count` messages as `device` in full batches; returns each batch's latency.
    async fn device_run(
        gateway: Gateway,
        device: String,
        count: u64,
        body_set: std::sync::Arc<Vec<Vec<u8>>>,
    ) -> Vec<Duration> {
        let mut pending = Vec::new();
        let mut batch = gateway.create_batch(&device).await.expect("batch");
        for n in 0..count {
            let event = Event::new(body_set[n as usize % body_set.len()].clone());
            match batch.try_add(event) {
                Ok(()) => continue,
                Err(TryAddError::Full(event)) => {
                    let full = std::mem::replace(
                        &mut batch,
                        gateway.create_batch(&device).await.expect("batch"),
                    );
                    pending.push(timed(
                        gateway.send_batch(&device, full).await.expect("queued"),
                    ));
                    batch.try_add(event).expect("an event fits an empty batch");
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        if !batch.is_empty() {
            pending.push(timed(
                gateway.send_batch(&device, batch).await.expect("queued"),
            ));
        }
        let mut latencies = Vec::with_capacity(pending.len());
        for outcome in pending {
            latencies.push(outcome.await.expect("outcome task"));
        }
        latencies
    }

    /// Waits for `outcome` on a task of its own; resolves to the time from now to the outcome.
    fn timed(outcome: hubsend::DeliveryFuture) -> tokio::task::JoinHandle<Duration> {
        let sent = Instant::now();
        tokio::spawn(async move {
            outcome.await.expect("stored");
            sent.elapsed()
        })
    }
}
