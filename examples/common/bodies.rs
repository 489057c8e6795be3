//! The telemetry event bodies every client in the benchmark sends: `examples/bench.rs` and
//! the comparison peers in `bench-peers/` (which include this file by path), so that hubsend,
//! Microsoft's crate and the raw fe2o3 ceiling always carry the same bytes.

/// A pool of distinct event bodies of exactly `bytes` bytes each, shaped like telemetry JSON.
pub fn bodies(bytes: usize, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let s = format!(
                "{{\"sensor_id\":\"compressor-{}:vibe_x\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":{}.{}",
                i % 10,
                40 + i % 50,
                i % 10
            );
            let mut v = closed(s, bytes).into_bytes();
            v.truncate(bytes);
            v
        })
        .collect()
}

/// `s` (an object missing its `}`) padded to `bytes` with a `pad` field or spaces, then closed.
pub fn closed(mut s: String, bytes: usize) -> String {
    if s.len() + 1 < bytes {
        let pad = bytes - s.len() - 1;
        if pad > 9 {
            s.push_str(",\"pad\":\"");
            s.push_str(&"x".repeat(pad - 9));
            s.push('"');
        } else {
            s.push_str(&" ".repeat(pad));
        }
    }
    s.push('}');
    s
}
