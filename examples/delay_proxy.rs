//! A TCP proxy that adds a fixed delay to every byte in each direction, for benchmarking far
//! from the hub on machines without `tc netem`: bandwidth is kept, latency is added (the test
//! hub's [`DelayProxy`](hubsend_testhub::DelayProxy), run on its own).
//!
//! `cargo run --release --example delay_proxy -- --listen 127.0.0.1:15671 --to 127.0.0.1:5671 --delay-ms 10`
//! (10 ms each way = 20 ms round-trip time). Point a connection string at the listen port.

use std::time::Duration;

use hubsend_testhub::DelayProxy;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:15671".into());
    let to = arg("--to").expect("--to HOST:PORT");
    let to = tokio::net::lookup_host(&to)
        .await?
        .next()
        .expect("--to resolves to an address");
    let delay = Duration::from_millis(arg("--delay-ms").and_then(|d| d.parse().ok()).unwrap_or(10));
    let proxy = DelayProxy::start(&listen, to, delay).await?;
    println!("{}", proxy.addr());
    proxy.wait().await;
    Ok(())
}
