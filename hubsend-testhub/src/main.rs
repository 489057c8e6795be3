//! `hubsend-testhub` binary: serves a local Event Hubs-compatible endpoint until interrupted and
//! prints its connection string as the first line of stdout.

use std::path::PathBuf;

use clap::Parser;
use hubsend_testhub::{HubConfig, TestHub};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    name = "hubsend-testhub",
    about = "Local Event Hubs-compatible AMQP 1.0 test server"
)]
struct Args {
    /// Interface to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Event hub name.
    #[arg(long, default_value = "telemetry")]
    hub: String,
    /// Partition count.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Set a policy's key instead of a random one, as NAME=KEY (repeatable). The default
    /// policies are `send-only` (Send) and `manage` (Manage, Send, Listen); other names are
    /// added with every right.
    #[arg(long = "policy-key", value_name = "NAME=KEY", value_parser = parse_policy_key)]
    policy_keys: Vec<(String, String)>,
    /// Enable TLS and write the CA certificate to DIR/ca.pem.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Keep at most N events per partition, dropping the oldest (default: keep all). Bounds
    /// the hub's memory in long benchmarks; sequence numbers and offsets keep counting.
    #[arg(long, value_name = "N")]
    retain_events: Option<usize>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = HubConfig::new()
        .host(args.host)
        .port(args.port)
        .hub(args.hub, args.partitions)
        .tls(args.tls_dir.is_some())
        .retain_events(args.retain_events);
    for (name, key) in args.policy_keys {
        config = config.policy_key(name, key);
    }
    let hub = TestHub::start(config).await?;
    println!("{}", hub.connection_string());
    if let (Some(dir), Some(pem)) = (&args.tls_dir, hub.ca_pem()) {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("ca.pem");
        std::fs::write(&path, pem)?;
        println!("CA certificate: {}", path.display());
    }
    wait_for_signal().await;
    hub.shutdown().await;
    Ok(())
}

/// Parses `NAME=KEY` (the key may itself contain `=`).
fn parse_policy_key(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, k)) if !n.is_empty() && !k.is_empty() => Ok((n.to_string(), k.to_string())),
        _ => Err(format!("expected NAME=KEY, got '{s}'")),
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
