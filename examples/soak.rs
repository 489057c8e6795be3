//! Soak: one buffered producer streams telemetry into the local test hub for a while, with
//! tokens that live a few seconds and a fault injected every few seconds (forced detach,
//! connection close, TCP drop, throttling, withheld credit). At the end it reports events sent,
//! faults survived, duplicates and lost events — lost must be 0, or it exits 1.
//!
//! `cargo run --release --example soak -- --seconds 300 [--token-seconds 5] [--fault-every 3] [--idempotent]`
//!
//! With `--idempotent` the producer uses idempotent retries, and a single duplicate fails the
//! soak too.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hubsend::{
    BufferedOptions, BufferedProducer, Event, Producer, ProducerOptions, RetryOptions, SendOptions,
};
use hubsend_testhub::{HubConfig, TestHub};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> hubsend::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let seconds = arg("--seconds", 60);
    let token_seconds = arg("--token-seconds", 5);
    let fault_every = arg("--fault-every", 3).max(1);
    let idempotent = std::env::args().any(|a| a == "--idempotent");

    let hub = TestHub::start(HubConfig::new().max_message_size(256 * 1024))
        .await
        .expect("the local test hub starts");
    let producer = Producer::builder()
        .connection_string(hub.connection_string())
        .options(
            ProducerOptions::new()
                .idempotent(idempotent)
                .token_lifetime(Duration::from_secs(token_seconds))
                .retry(
                    RetryOptions::new()
                        .max_retries(20)
                        .base_delay(Duration::from_millis(50))
                        .max_delay(Duration::from_secs(2)),
                ),
        )
        .connect()
        .await?;
    let buffered = BufferedProducer::new(producer.clone(), BufferedOptions::new());
    eprintln!("soak: {seconds} s, tokens live {token_seconds} s, a fault every {fault_every} s, idempotent retries {idempotent}");

    let faults = hub.faults();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let injector = tokio::spawn(async move {
        let mut survived = Vec::new();
        let mut n = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(fault_every)).await;
            if Instant::now() >= stop {
                break;
            }
            faults.clear();
            let name = match n % 5 {
                0 => {
                    faults.detach_links_after(5, "amqp:link:detach-forced", "soak");
                    "detach-forced"
                }
                1 => {
                    faults.close_connections("amqp:connection:forced", "soak");
                    "connection:forced"
                }
                2 => {
                    faults.drop_connections();
                    "tcp drop"
                }
                3 => {
                    faults.reject_at_random(5, "com.microsoft:server-busy");
                    "server-busy for 1 in 5"
                }
                _ => {
                    faults.withhold_credit(Duration::from_millis(800));
                    "credit withheld"
                }
            };
            survived.push(name);
            n += 1;
        }
        faults.clear();
        survived
    });

    let started = Instant::now();
    let mut enqueued = 0u64;
    let mut last = Instant::now();
    while Instant::now() < stop {
        let sensor = enqueued % 500;
        let body = format!(
            r#"{{"sensor_id":"compressor-{}:vibe_x","timestamp":"{}","value":{}}}"#,
            sensor,
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            (enqueued % 1000) as f64 / 10.0
        );
        let event = Event::new(body).with_property("n", enqueued as i64);
        buffered
            .enqueue(
                event,
                SendOptions::new().partition_key(format!("compressor-{sensor}")),
            )
            .await?;
        enqueued += 1;
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            let r = buffered.report();
            eprintln!(
                "  {:>6.0} s: enqueued {enqueued}, sent {}, failed {}, reconnects {}, link recoveries {}",
                started.elapsed().as_secs_f64(),
                r.sent,
                r.failed,
                producer.stats().reconnects,
                producer.stats().link_recoveries
            );
        }
    }
    let report = buffered.close().await;
    let survived = injector.await.expect("the injector ends");
    let stats = producer.stats();
    producer.close().await?;

    let stored = hub.events("telemetry");
    let mut unique = HashSet::new();
    for e in &stored {
        if let Some(n) = e.application_properties.get("n").and_then(|v| v.as_i64()) {
            unique.insert(n);
        }
    }
    let lost = (0..enqueued as i64).filter(|n| !unique.contains(n)).count();
    let duplicates = stored.len() - unique.len();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "events enqueued: {enqueued} ({:.0} events/s)",
        enqueued as f64 / secs
    );
    println!(
        "events reported sent: {}, failed: {}",
        report.sent, report.failed
    );
    println!("faults survived: {} {:?}", survived.len(), survived);
    println!(
        "reconnects: {}, link recoveries: {}, duplicates avoided: {}",
        stats.reconnects, stats.link_recoveries, stats.duplicates_avoided
    );
    println!(
        "stored: {}, duplicates: {duplicates}, lost: {lost}",
        stored.len()
    );
    if lost > 0 || report.failed > 0 || (idempotent && duplicates > 0) {
        eprintln!(
            "SOAK FAILED: {lost} lost, {} failed, {duplicates} duplicates",
            report.failed
        );
        std::process::exit(1);
    }
    Ok(())
}
