//! Sends a few single events (round robin, by partition key, to a partition) and waits for
//! the hub's outcome of each.
//!
//! `cargo run --example send_events` (uses `EVENTHUB_CONNECTION_STRING` when set).

mod common;

use hubsend::{Event, ProducerOptions, SendOptions};

#[tokio::main]
async fn main() -> hubsend::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let target = common::connect(ProducerOptions::new()).await?;
    let producer = target.producer;

    // Two-stage send: queue now, learn the hub's outcome later.
    let pending = producer
        .send(
            Event::new(b"hello, hub".to_vec()).with_content_type("text/plain"),
            SendOptions::new(),
        )
        .await?;
    pending.await?;

    // Same key, same partition, in order.
    for i in 0..3 {
        let event = Event::json(&serde_json::json!({"sensor_id": "pump-1:state", "seq": i}))?;
        producer
            .send_and_wait(event, SendOptions::new().partition_key("pump-1"))
            .await?;
    }
    // Straight to partition 0.
    producer
        .send_and_wait(
            Event::new(b"for partition 0".to_vec()),
            SendOptions::new().partition_id("0"),
        )
        .await?;
    println!("sent 5 events to {}", producer.event_hub());
    producer.close().await?;
    if let Some(hub) = target.local {
        for e in hub.events(producer_hub()) {
            println!(
                "partition {} seq {}: {}",
                e.partition,
                e.sequence_number,
                String::from_utf8_lossy(&e.body)
            );
        }
    }
    Ok(())
}

fn producer_hub() -> &'static str {
    "telemetry"
}
