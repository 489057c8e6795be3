//! The main job: streams a realistic telemetry load — many sensors, numeric readings and state
//! strings — in batches filled to the hub's limit with many in flight, shows progress, and ends
//! with what the hub stored and the throughput reached.
//!
//! `cargo run --release --example send_telemetry`
//!
//! Environment: `EVENTHUB_CONNECTION_STRING` (else a local test hub starts in-process),
//! `EVENTHUB_CA_FILE` (extra trusted root), `TELEMETRY_EVENTS` (default 1,000,000),
//! `TELEMETRY_SENSORS` (default 2,000).
//!
//! Against the Event Hubs emulator (Docker): `export ACCEPT_EULA=Y` (accepting its licence
//! terms), `docker compose up -d --wait` (returns once its health check passes), then export
//! the emulator's connection string from `docker-compose.yml` and run this.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use hubsend::{BatchOptions, ProducerOptions, Telemetry, TelemetryValue, TryAddError};

const KINDS: [&str; 5] = ["vibe_x", "vibe_y", "temp_c", "pressure_bar", "state"];
const STATES: [&str; 3] = ["Running", "Idle", "Fault"];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// A deterministic, varied reading for event number `i`.
fn reading(i: usize, sensors: usize) -> Telemetry {
    let sensor = i % sensors;
    let kind = KINDS[sensor % KINDS.len()];
    let value = if kind == "state" {
        TelemetryValue::Text(STATES[(i / sensors) % STATES.len()].to_owned())
    } else {
        let base = (sensor % 97) as f64;
        TelemetryValue::Number(((base + ((i as f64) * 0.37).sin() * 5.0) * 100.0).round() / 100.0)
    };
    Telemetry::new(
        format!("compressor-{}:{kind}", sensor / KINDS.len()),
        Utc::now(),
        value,
    )
}

#[tokio::main]
async fn main() -> hubsend::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let total = env_usize("TELEMETRY_EVENTS", 1_000_000);
    let sensors = env_usize("TELEMETRY_SENSORS", 2_000).max(1);
    let target = common::connect(ProducerOptions::new().max_in_flight(64)).await?;
    let producer = target.producer.clone();
    eprintln!(
        "streaming {total} readings from {sensors} sensors to `{}` (batches up to {} bytes)",
        producer.event_hub(),
        producer.max_message_size()
    );

    // Outcomes are awaited by a separate task, in order, so the sender never stops to wait.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, hubsend::DeliveryFuture)>();
    let settled = tokio::spawn(async move {
        let mut accepted = 0usize;
        let mut failed = 0usize;
        while let Some((n, delivery)) = rx.recv().await {
            match delivery.await {
                Ok(()) => accepted += n,
                Err(e) => {
                    failed += n;
                    eprintln!("a batch of {n} readings failed: {e}");
                }
            }
        }
        (accepted, failed)
    });

    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut bytes = 0u64;
    let mut batches = 0usize;
    let mut batch = producer.create_batch(BatchOptions::new()).await?;
    for i in 0..total {
        let event = reading(i, sensors).to_event()?;
        if let Err(err) = batch.try_add(event) {
            let event = match err {
                TryAddError::Full(event) => event,
                other => panic!("a reading never exceeds the limit: {other}"),
            };
            let full = std::mem::replace(
                &mut batch,
                producer.create_batch(BatchOptions::new()).await?,
            );
            bytes += full.size_in_bytes();
            batches += 1;
            tx.send((full.len(), producer.send_batch(full).await?)).ok();
            if batch.try_add(event).is_err() {
                unreachable!("an empty batch takes any reading");
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  {:>10} readings  {:>10.0} events/s  {:>7.1} MB/s",
                i,
                i as f64 / secs,
                bytes as f64 / secs / 1e6
            );
        }
    }
    if !batch.is_empty() {
        bytes += batch.size_in_bytes();
        batches += 1;
        tx.send((batch.len(), producer.send_batch(batch).await?))
            .ok();
    }
    drop(tx);
    let (accepted, failed) = settled.await.expect("the settling task ends");
    let secs = started.elapsed().as_secs_f64();
    target.producer.close().await?;

    println!("readings accepted by the hub: {accepted} (failed: {failed}) in {batches} batches");
    println!(
        "throughput: {:.0} events/s, {:.1} MB/s over {:.2} s",
        accepted as f64 / secs,
        bytes as f64 / secs / 1e6,
        secs
    );
    if let Some(hub) = target.local {
        let stored = hub.events("telemetry");
        let mut per_partition = std::collections::BTreeMap::new();
        for e in &stored {
            *per_partition.entry(e.partition).or_insert(0usize) += 1;
        }
        println!(
            "the local hub stored {} events: {per_partition:?}",
            stored.len()
        );
        if stored.len() != accepted {
            eprintln!(
                "MISMATCH: the hub stored {} but {accepted} were accepted",
                stored.len()
            );
            std::process::exit(1);
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
