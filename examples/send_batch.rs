//! Fills batches to the hub's size limit and sends them with several in flight.
//!
//! `cargo run --example send_batch` (uses `EVENTHUB_CONNECTION_STRING` when set).

mod common;

use hubsend::{BatchOptions, Event, ProducerOptions, TryAddError};

#[tokio::main]
async fn main() -> hubsend::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let target = common::connect(ProducerOptions::new()).await?;
    let producer = target.producer;

    let mut batch = producer.create_batch(BatchOptions::new()).await?;
    let mut in_flight = Vec::new();
    for i in 0..50_000u32 {
        let event = Event::new(format!("event {i}").into_bytes());
        match batch.try_add(event) {
            Ok(()) => {}
            Err(TryAddError::Full(event)) => {
                let full = std::mem::replace(
                    &mut batch,
                    producer.create_batch(BatchOptions::new()).await?,
                );
                println!(
                    "sending a batch of {} events ({} bytes)",
                    full.len(),
                    full.size_in_bytes()
                );
                in_flight.push(producer.send_batch(full).await?);
                batch
                    .try_add(event)
                    .map_err(|e| panic!("fits an empty batch: {e}"))
                    .ok();
            }
            Err(TryAddError::TooLarge(_)) => unreachable!("small events always fit"),
            Err(e) => panic!("{e}"),
        }
    }
    in_flight.push(producer.send_batch(batch).await?);
    let batches = in_flight.len();
    for delivery in in_flight {
        delivery.await?;
    }
    println!("the hub accepted {batches} batches");
    producer.close().await?;
    if let Some(hub) = target.local {
        println!(
            "the local hub stored {} events",
            hub.events("telemetry").len()
        );
    }
    Ok(())
}
