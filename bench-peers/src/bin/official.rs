//! Microsoft's official `azure_messaging_eventhubs` producer, driven the way its docs show,
//! against the same hub and payload as `examples/bench.rs`.
//!
//! ```text
//! official --connection-string CS --endpoint amqp://127.0.0.1:PORT|amqps://localhost:PORT
//!          [--mode batch|single|latency] [--events N] [--payload-bytes B] [--concurrency C]
//! ```
//! * `batch`: `create_batch` / `try_add_event_data` until full / `send_batch`, with C tasks doing
//!   that concurrently on one shared `ProducerClient` (C=1 is the documented sequential loop).
//! * `single`: `send_event` from C concurrent tasks (each awaits its outcome, the crate's API
//!   has no pipelined single send).
//! * `latency`: `send_event` one at a time; reports p50/p99.
//!
//! TLS: trust the hub's CA with `SSL_CERT_FILE=ca.pem` (the crate uses the platform verifier).
//! Prints one JSON line (with `stalled_sends`, see `guard`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use azure_messaging_eventhubs::models::EventData;
use azure_messaging_eventhubs::ProducerClient;
use hubsend_bench_peers::{bodies, install_crypto_provider, percentiles, Args, Report};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends whose outcome never resolved within `--stall-timeout-ms` (see `guard`).
static STALLS: AtomicU64 = AtomicU64::new(0);
static STALL_TIMEOUT_MS: AtomicU64 = AtomicU64::new(1000);

/// Awaits one send of the official crate, giving up after the stall timeout.
///
/// On loopback against a fast hub, azure_messaging_eventhubs 0.16 (fe2o3-amqp 0.16 underneath)
/// now and then never resolves a send although the hub's settled `accepted` disposition for that
/// delivery has arrived (seen with strace: transfer out, disposition in, future still pending).
/// Rather than hang the benchmark, such a send is counted as a stall (its event did reach the
/// hub) and the loop goes on; the stall time stays in the measured time.
async fn guard<F>(send: F) -> Result<bool, BoxError>
where
    F: std::future::Future<Output = azure_messaging_eventhubs::Result<()>>,
{
    let limit = std::time::Duration::from_millis(STALL_TIMEOUT_MS.load(Ordering::Relaxed));
    match tokio::time::timeout(limit, send).await {
        Ok(r) => r.map(|()| false).map_err(Into::into),
        Err(_) => {
            STALLS.fetch_add(1, Ordering::Relaxed);
            Ok(true)
        }
    }
}

fn event(body: &[u8]) -> EventData {
    EventData::builder().with_body(body.to_vec()).build()
}

/// Takes up to `want` events from the shared budget; returns how many were granted.
fn take(budget: &AtomicU64, want: u64) -> u64 {
    let mut cur = budget.load(Ordering::Relaxed);
    loop {
        if cur == 0 {
            return 0;
        }
        let n = cur.min(want);
        match budget.compare_exchange(cur, cur - n, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return n,
            Err(actual) => cur = actual,
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    install_crypto_provider();
    let args = Args::parse();
    let cs = args
        .get("connection-string")
        .map(str::to_owned)
        .or_else(|| std::env::var("EVENTHUB_CONNECTION_STRING").ok())
        .expect("--connection-string or EVENTHUB_CONNECTION_STRING");
    let mode = args.string("mode", "batch");
    let events = args.num("events", 200_000);
    let payload = args.num("payload-bytes", 100) as usize;
    let concurrency = args.num("concurrency", 1).max(1) as usize;
    let pool = Arc::new(bodies(payload, 1024));
    STALL_TIMEOUT_MS.store(args.num("stall-timeout-ms", 1000), Ordering::Relaxed);

    let mut builder = ProducerClient::builder();
    if let Some(endpoint) = args.get("endpoint") {
        builder = builder.with_custom_endpoint(endpoint.to_owned());
    }
    let verbose = std::env::var_os("BENCH_VERBOSE").is_some();
    let producer = Arc::new(builder.open_with_connection_string(&cs, None).await?);
    if verbose {
        eprintln!("connected");
    }

    // Warm-up: attach the link and send one event, untimed.
    guard(producer.send_event(event(&pool[0]), None)).await?;

    let mut latency = None;
    let start = Instant::now();
    let sent = match mode.as_str() {
        "batch" => {
            let budget = Arc::new(AtomicU64::new(events));
            let sent = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for t in 0..concurrency {
                let (producer, pool, budget, sent) =
                    (producer.clone(), pool.clone(), budget.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = t * 7919;
                    loop {
                        let batch = producer.create_batch(None).await?;
                        let mut n = 0u64;
                        while take(&budget, 1) == 1 {
                            if batch.try_add_event_data(event(&pool[i % pool.len()]), None)? {
                                i += 1;
                                n += 1;
                            } else {
                                // Full: give the event back; the next batch rebuilds it.
                                budget.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                        if n == 0 {
                            return Ok::<(), BoxError>(());
                        }
                        guard(producer.send_batch(batch, None)).await?;
                        sent.fetch_add(n, Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                t.await??;
            }
            sent.load(Ordering::Relaxed)
        }
        "single" => {
            let budget = Arc::new(AtomicU64::new(events));
            let mut tasks = Vec::new();
            for t in 0..concurrency {
                let (producer, pool, budget) = (producer.clone(), pool.clone(), budget.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = t * 7919;
                    let mut n = 0u64;
                    while take(&budget, 1) == 1 {
                        guard(producer.send_event(event(&pool[i % pool.len()]), None)).await?;
                        i += 1;
                        n += 1;
                    }
                    Ok::<u64, BoxError>(n)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            total
        }
        "latency" => {
            let mut samples = Vec::with_capacity(events as usize);
            for i in 0..events as usize {
                let t = Instant::now();
                let stalled = guard(producer.send_event(event(&pool[i % pool.len()]), None)).await?;
                // Stalls are reported apart (stalled_sends); percentiles are over the rest.
                if !stalled {
                    samples.push(t.elapsed());
                }
                if verbose {
                    eprintln!("sent {i}");
                }
            }
            latency = Some(percentiles(samples));
            events
        }
        other => return Err(format!("unknown --mode {other}").into()),
    };
    let seconds = start.elapsed().as_secs_f64();

    Report {
        tool: "official",
        mode,
        events: sent,
        payload_bytes: payload as u64,
        seconds,
        latency_ms: latency,
        extra: vec![
            ("concurrency", concurrency.to_string()),
            ("stalled_sends", STALLS.load(Ordering::Relaxed).to_string()),
            // Throughput with the stalled sends and their timeouts taken out: what the crate
            // would do without that bug (for single sends with concurrency 1 this is exact).
            ("events_per_sec_excl_stalls", {
                let stalls = STALLS.load(Ordering::Relaxed);
                let t = seconds - stalls as f64 * STALL_TIMEOUT_MS.load(Ordering::Relaxed) as f64 / 1e3;
                format!("{:.1}", (sent.saturating_sub(stalls)) as f64 / t.max(1e-9))
            }),
        ],
    }
    .print();
    if let Ok(p) = Arc::try_unwrap(producer) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), p.close()).await;
    }
    Ok(())
}
