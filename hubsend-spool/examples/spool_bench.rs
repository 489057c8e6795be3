//! Spooled throughput next to in-memory: events/s into the spool (hub unreachable) and end to
//! end (enqueue until the hub accepted everything) for each commit policy, and the disk bytes
//! per event; each with and without idempotent retries (spooled idempotent: through
//! `start_idempotent`, whose numbers journal adds its bytes per event). Runs against an
//! in-process test hub.
//!
//! `cargo run --release -p hubsend-spool --example spool_bench -- [EVENTS]`

use std::time::{Duration, Instant};

use hubsend::{
    BufferedOptions, BufferedProducer, Event, PartitionPublishingState, Producer, ProducerOptions,
    SendOptions,
};
use hubsend_spool::{Commit, Route, Spool, SpoolOptions, SpooledProducer};
use hubsend_testhub::{HubConfig, TestHub};

const KEYS: u64 = 8;

fn event(n: u64) -> (Event, Route) {
    let key = format!("sensor-{}", n % KEYS);
    let body = format!(r#"{{"sensor_id":"{key}","value":{n},"unit":"C","site":"plant-3"}}"#);
    (
        Event::new(body).with_property("n", n as i64),
        Route::partition_key(key),
    )
}

async fn connect(cs: String) -> hubsend::Result<Producer> {
    Producer::builder().connection_string(cs).connect().await
}

async fn connect_idempotent(
    cs: String,
    states: Vec<PartitionPublishingState>,
) -> hubsend::Result<Producer> {
    Producer::builder()
        .connection_string(cs)
        .options(
            ProducerOptions::new()
                .idempotent(true)
                .publishing_state(states),
        )
        .connect()
        .await
}

/// A spooled producer on `cs`, idempotent or not.
fn spooled(spool: Spool, cs: String, idempotent: bool) -> SpooledProducer {
    if idempotent {
        SpooledProducer::start_idempotent(spool, move |states| {
            connect_idempotent(cs.clone(), states)
        })
    } else {
        SpooledProducer::start(spool, move || connect(cs.clone()), BufferedOptions::new())
    }
}

/// Bytes of the numbers journal in `dir` (idempotent spools).
fn journal_bytes(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join("numbers.log")).map_or(0, |m| m.len())
}

fn rate(n: u64, t: Duration) -> String {
    format!("{:>10.0}", n as f64 / t.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let events: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let hub = TestHub::start(HubConfig::new().retain_events(Some(1000)))
        .await
        .expect("test hub");
    let cs = hub.connection_string();
    let unreachable = {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        cs.replace(&format!(":{}/", hub.addr().port()), &format!(":{port}/"))
    };
    let base = std::env::temp_dir().join(format!("hubsend-spool-bench-{}", std::process::id()));

    println!("{events} events, {KEYS} partition keys, ~80-byte bodies");
    println!(
        "| mode | idempotent | commit | enqueue call | into spool, ev/s | end to end, ev/s | disk bytes/event |"
    );
    println!("|---|---|---|---|---|---|---|");

    // In memory: BufferedProducer alone.
    for idempotent in [false, true] {
        let producer = if idempotent {
            connect_idempotent(cs.clone(), Vec::new()).await
        } else {
            connect(cs.clone()).await
        }
        .expect("connects");
        let buffered = BufferedProducer::new(producer, BufferedOptions::new());
        let t = Instant::now();
        for n in 0..events {
            let (e, r) = event(n);
            let key = match r {
                Route::PartitionKey(k) => k,
                _ => unreachable!(),
            };
            buffered
                .enqueue(e, SendOptions::new().partition_key(key))
                .await
                .expect("enqueue");
        }
        let report = buffered.close().await;
        assert_eq!(report.sent, events);
        println!(
            "| in memory | {} | none | enqueue | - | {} | 0 |",
            if idempotent { "yes" } else { "no" },
            rate(events, t.elapsed())
        );
    }

    let modes: [(&str, Commit, bool, u64); 4] = [
        (
            "group 5 ms",
            Commit::Group(Duration::from_millis(5)),
            true,
            events,
        ),
        (
            "background 100 ms",
            Commit::Background(Duration::from_millis(100)),
            false,
            events,
        ),
        (
            "group 5 ms",
            Commit::Group(Duration::from_millis(5)),
            false,
            2_000,
        ),
        ("each call", Commit::EachCall, false, 2_000),
    ];
    let runs = modes
        .into_iter()
        .flat_map(|m| [(m, false), (m, true)])
        .enumerate();
    for (i, ((name, commit, batched, n), idempotent)) in runs {
        let options = SpoolOptions::new().max_bytes(1 << 30).commit(commit);
        let call = if batched {
            "enqueue_batch(1000)"
        } else {
            "enqueue"
        };
        // Into the spool with the hub unreachable: the disk's pace alone.
        let dir = base.join(format!("spool-{i}"));
        let spool = Spool::open(&dir, options.clone()).expect("spool");
        let producer = spooled(spool, unreachable.clone(), idempotent);
        let t = Instant::now();
        fill(&producer, n, batched).await;
        let into = t.elapsed();
        let bytes = producer.report().disk_bytes;
        producer.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);

        // End to end: enqueue while the drain sends, until the hub accepted everything.
        let spool = Spool::open(&dir, options).expect("spool");
        let producer = spooled(spool, cs.clone(), idempotent);
        let t = Instant::now();
        fill(&producer, n, batched).await;
        let report = producer.close().await;
        let total = t.elapsed();
        assert_eq!(report.sent, n, "{report:?}");
        // The journal's bytes were written while sending (entries leave it once accepted).
        let journal = journal_bytes(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let disk = if idempotent {
            format!(
                "{:.1} + {:.1} journal",
                bytes as f64 / n as f64,
                journal as f64 / n as f64
            )
        } else {
            format!("{:.1}", bytes as f64 / n as f64)
        };
        println!(
            "| spooled | {} | {name} | {call} | {} | {} | {disk} |",
            if idempotent { "yes" } else { "no" },
            rate(n, into),
            rate(n, total),
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}

async fn fill(producer: &SpooledProducer, n: u64, batched: bool) {
    if batched {
        let mut i = 0;
        while i < n {
            let end = (i + 1000).min(n);
            producer
                .enqueue_batch((i..end).map(event), Some(end))
                .await
                .expect("enqueue");
            i = end;
        }
    } else {
        for i in 0..n {
            let (e, r) = event(i);
            producer.enqueue(e, r).await.expect("enqueue");
        }
    }
}
