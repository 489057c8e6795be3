//! Sends one event, then 10,000 in batches, to the event hub of EVENTHUB_CONNECTION_STRING.
use hubsend::{BatchOptions, Event, Producer, SendOptions, TryAddError};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=HUB
    let connection_string = std::env::var("EVENTHUB_CONNECTION_STRING")?;
    let producer = Producer::from_connection_string(&connection_string).await?;

    // One event: `send` returns once it is queued; awaiting the delivery gives the hub's outcome.
    let reading = Event::new(r#"{"sensor_id":"compressor-7","value":42.1}"#)
        .with_content_type("application/json");
    let options = SendOptions::new().partition_key("compressor-7");
    let delivery = producer.send(reading, options).await?;
    delivery.await?; // stored by the hub

    // A list of events: batches filled to the hub's size limit, several in flight at once.
    let events: Vec<Event> = (0..10_000)
        .map(|i| Event::new(format!("event {i}")))
        .collect();
    let mut batch = producer.create_batch(BatchOptions::new()).await?;
    let mut deliveries = Vec::new();
    for event in events {
        match batch.try_add(event) {
            Ok(()) => {}
            Err(TryAddError::Full(event)) => {
                let next = producer.create_batch(BatchOptions::new()).await?;
                let full = std::mem::replace(&mut batch, next);
                deliveries.push(producer.send_batch(full).await?);
                batch.try_add(event)?;
            }
            Err(too_large) => return Err(too_large.into()),
        }
    }
    deliveries.push(producer.send_batch(batch).await?);
    for delivery in deliveries {
        delivery.await?;
    }
    println!("10,001 events stored in {}", producer.event_hub());

    // Waits for every outcome, then closes the connection (dropping it would not wait).
    producer.close().await?;
    Ok(())
}
