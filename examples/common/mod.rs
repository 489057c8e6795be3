//! Shared by the examples: where to send. With `EVENTHUB_CONNECTION_STRING` set, that hub (and
//! `EVENTHUB_CA_FILE`, if set, as an extra trusted root); otherwise a local test hub started
//! in-process, so every example runs offline.

use hubsend::{Producer, ProducerOptions};
use hubsend_testhub::{HubConfig, TestHub};

/// The producer, and the in-process hub when one was started.
pub struct Target {
    pub producer: Producer,
    pub local: Option<TestHub>,
}

pub async fn connect(options: ProducerOptions) -> hubsend::Result<Target> {
    let mut builder = Producer::builder().options(options);
    let local = match std::env::var("EVENTHUB_CONNECTION_STRING") {
        Ok(cs) if !cs.trim().is_empty() => {
            builder = builder.connection_string(cs);
            if let Ok(path) = std::env::var("EVENTHUB_CA_FILE") {
                let pem = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
                builder = builder.add_root_certificate_pem(pem);
            }
            None
        }
        _ => {
            let hub = TestHub::start(HubConfig::new())
                .await
                .expect("the local test hub starts");
            eprintln!(
                "no EVENTHUB_CONNECTION_STRING: using a local test hub on {}",
                hub.addr()
            );
            builder = builder.connection_string(hub.connection_string());
            Some(hub)
        }
    };
    Ok(Target {
        producer: builder.connect().await?,
        local,
    })
}
