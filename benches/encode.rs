//! The encode hot path: filling an [`EventBatch`] with telemetry events, each encoded into the
//! batch's buffer as it is added.
//!
//! ```text
//! cargo bench --bench encode                 # full run; `-- --quick` for a short one
//! cargo bench --bench encode -- props/1024   # one shape and size
//! ```
//!
//! Each iteration fills a fresh 1 MiB batch to the brim (as many events as fit, counted once
//! beforehand; they are built before the timed part, since `try_add` takes them by value) and
//! reports throughput in events. Shapes:
//! * `plain`: the body alone;
//! * `batch_key`: a batch created with a partition key (the key is on the envelope, so the
//!   events are encoded as in `plain`);
//! * `event_key`: each event carries its own partition key annotation, as a
//!   `BufferedProducer` lane writes events whose key it resolved itself;
//! * `props`: content type `application/json` and three application properties (a string,
//!   an integer, a boolean).
//!
//! Bodies are the telemetry record
//! `{"sensor_id":"compressor-7:vibe_x","timestamp":"2025-08-19T08:30:00Z","value":42.1}`
//! padded with JSON whitespace to 100 bytes and to 1 KiB.
//!
//! Instruction counts: with `HUBSEND_ENCODE_IR=SHAPE/SIZE/N` the binary only fills batches
//! with N events of that shape (no criterion) in `fill`, so
//! `valgrind --tool=callgrind --toggle-collect='encode::fill*' target/release/deps/encode-HASH`
//! counts the adds alone: Ir / N per event.

use std::hint::black_box;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use hubsend::batch::__bench;
use hubsend::{BatchOptions, Event, EventBatch};

/// The batch limit: the service's usual maximum message size.
const MAX_SIZE: u64 = 1024 * 1024;
const RECORD: &str =
    r#"{"sensor_id":"compressor-7:vibe_x","timestamp":"2025-08-19T08:30:00Z","value":42.1}"#;
const SENSOR: &str = "compressor-7:vibe_x";
const SHAPES: [&str; 4] = ["plain", "batch_key", "event_key", "props"];
const SIZES: [usize; 2] = [100, 1024];

fn body(size: usize) -> Vec<u8> {
    let mut body = RECORD.as_bytes().to_vec();
    body.resize(size.max(body.len()), b' ');
    body
}

fn event(shape: &str, size: usize) -> Event {
    let event = Event::new(body(size));
    match shape {
        "props" => event
            .with_content_type("application/json")
            .with_property("sensor_id", SENSOR)
            .with_property("seq", 1_234_567i64)
            .with_property("calibrated", true),
        _ => event,
    }
}

fn batch(shape: &str) -> EventBatch {
    let options = match shape {
        "batch_key" => BatchOptions::new().partition_key("compressor-7"),
        _ => BatchOptions::new(),
    };
    __bench::offline_batch(options, MAX_SIZE).expect("a 1 MiB batch")
}

/// Adds every event to `batch` (all fit); `event_key` adds them with their own key.
#[inline(never)]
fn fill(shape: &str, batch: &mut EventBatch, events: Vec<Event>) {
    if shape == "event_key" {
        for event in &events {
            assert!(
                __bench::add_keyed(batch, event, SENSOR),
                "the batch is full"
            );
        }
        return;
    }
    for event in events {
        assert!(batch.try_add(event).is_ok(), "the batch is full");
    }
}

fn encode(c: &mut Criterion) {
    for shape in SHAPES {
        let mut group = c.benchmark_group(shape);
        for size in SIZES {
            let template = event(shape, size);
            let n = capacity(shape, &template);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(size.to_string(), |b| {
                b.iter_batched(
                    || (batch(shape), vec![template.clone(); n]),
                    |(mut batch, events)| {
                        fill(shape, &mut batch, events);
                        black_box(batch)
                    },
                    BatchSize::LargeInput,
                )
            });
        }
        group.finish();
    }
}

/// How many copies of `event` fill one batch.
fn capacity(shape: &str, event: &Event) -> usize {
    let mut batch = batch(shape);
    let mut n = 0;
    while match shape {
        "event_key" => __bench::add_keyed(&mut batch, event, SENSOR),
        _ => batch.try_add(event.clone()).is_ok(),
    } {
        n += 1;
    }
    n
}

/// `HUBSEND_ENCODE_IR=SHAPE/SIZE/N`: N events in full batches, nothing else.
fn instruction_run(spec: &str) {
    let parts: Vec<&str> = spec.split('/').collect();
    let [shape, size, n] = parts[..] else {
        panic!("HUBSEND_ENCODE_IR is SHAPE/SIZE/N, got {spec:?}");
    };
    assert!(SHAPES.contains(&shape), "shape is one of {SHAPES:?}");
    let size: usize = size.parse().expect("SIZE is a number");
    let n: usize = n.parse().expect("N is a number");
    let template = event(shape, size);
    let per_batch = capacity(shape, &template);
    let mut left = n;
    while left > 0 {
        let take = left.min(per_batch);
        let mut batch = batch(shape);
        fill(shape, &mut batch, vec![template.clone(); take]);
        assert_eq!(black_box(batch).len(), take);
        left -= take;
    }
}

criterion_group!(benches, encode);

fn main() {
    if let Ok(spec) = std::env::var("HUBSEND_ENCODE_IR") {
        instruction_run(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
