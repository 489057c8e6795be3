//! What a run reports: rejects, progress snapshots and the final summary (whose JSON form is
//! the `--json` output of `hubsend send`).

use std::time::Duration;

use serde::Serialize;

/// An invalid line as reported to users and written to a rejects file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Reject {
    /// 1-based line number.
    pub(crate) line: u64,
    /// Why the line was not sent.
    pub(crate) reason: String,
    /// The input text.
    pub(crate) raw: String,
}

impl Reject {
    /// One JSON object on one line (no terminator): `{"line":…,"reason":…,"raw":…}`.
    pub(crate) fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A snapshot of an [`ingest`] run, for progress displays.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Progress {
    /// Lines read (valid and invalid).
    pub(crate) records: u64,
    /// Events the hub accepted so far.
    pub(crate) sent: u64,
    /// Invalid lines so far.
    pub(crate) rejected: u64,
    /// Events whose delivery failed so far.
    pub(crate) failed: u64,
    /// Body bytes of the accepted events.
    pub(crate) bytes: u64,
    /// Batches awaiting the hub's outcome.
    pub(crate) in_flight: usize,
    /// Deliveries the producer sent again (throttling, lost links or connections).
    pub(crate) retries: u64,
    /// Time since the run started.
    pub(crate) elapsed: Duration,
}

impl Progress {
    /// Accepted events per second so far.
    pub(crate) fn events_per_sec(&self) -> f64 {
        rate(self.sent as f64, self.elapsed)
    }

    /// Accepted body megabytes (10^6 bytes) per second so far.
    pub(crate) fn mb_per_sec(&self) -> f64 {
        rate(self.bytes as f64 / 1e6, self.elapsed)
    }
}

pub(crate) fn rate(amount: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

/// The outcome of an [`ingest`] run. Serialises to the JSON summary the `hubsend` command prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct IngestReport {
    /// Events the hub accepted.
    pub(crate) sent: u64,
    /// Invalid lines (not sent).
    pub(crate) rejected: u64,
    /// Valid records that were not stored: the hub refused their batch, the send failed, or
    /// the event is larger than the hub's maximum message size.
    pub(crate) failed: u64,
    /// Events sent whose outcome was not known when the run was abandoned (a second signal
    /// while waiting for the hub). Only in the JSON when not zero.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) unknown: u64,
    /// With `--idempotent`: events the hub acknowledged as already stored when they were
    /// resent (so it did not store them twice). Only in the JSON with `--idempotent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) duplicates_avoided: Option<u64>,
    /// Body bytes of the accepted events.
    pub(crate) bytes: u64,
    /// Wall-clock duration of the run.
    pub(crate) seconds: f64,
    /// `sent / seconds`.
    pub(crate) events_per_sec: f64,
    /// `bytes / 10^6 / seconds`.
    pub(crate) mb_per_sec: f64,
    /// Lines read (valid and invalid).
    pub(crate) records: u64,
    /// Batches sent (accepted or not).
    pub(crate) batches: u64,
    /// Distinct partition keys seen (partition-key routing only).
    pub(crate) partition_keys: u64,
    /// Median time from sending a batch to its outcome, in milliseconds.
    pub(crate) p50_ms: f64,
    /// 99th percentile of the same, in milliseconds.
    pub(crate) p99_ms: f64,
    /// Whether the run was stopped early (shutdown signal or a fatal error).
    pub(crate) interrupted: bool,
    /// The first error that made events fail, without secrets.
    pub(crate) error: Option<String>,
    /// The kind of that error, e.g. `unauthorized`.
    pub(crate) error_kind: Option<String>,
    /// With `--spool`: records this run wrote to the spool. Absent without `--spool`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) spooled: Option<u64>,
    /// With `--spool`: records an earlier, interrupted run had left in the spool (sent by
    /// this one). Absent without `--spool`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) resumed: Option<u64>,
}

impl IngestReport {
    /// Whether every valid record read was accepted by the hub.
    pub(crate) fn all_sent(&self) -> bool {
        self.failed == 0 && self.error.is_none()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Batch latencies, kept as a histogram: memory stays bounded (about 26 kB) however many
/// batches a run sends, and each percentile is within 0.4 % of the exact one.
#[derive(Debug, Clone)]
pub(crate) struct Latencies(hdrhistogram::Histogram<u64>);

impl Latencies {
    /// The longest latency told apart, in microseconds (one hour); longer ones count as it.
    const HIGHEST_MICROS: u64 = 3_600_000_000;
}

impl Default for Latencies {
    fn default() -> Self {
        // 1 µs to one hour at two significant digits (buckets at most 1/128 of their value
        // wide; a percentile is the middle of one): always valid bounds.
        match hdrhistogram::Histogram::new_with_bounds(1, Self::HIGHEST_MICROS, 2) {
            Ok(h) => Self(h),
            Err(_) => unreachable!("1..=3.6e9 at 2 significant digits is a valid histogram"),
        }
    }
}

impl Latencies {
    /// Counts one latency.
    pub(crate) fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    /// The `q` quantile (0..=1) of the recorded latencies, in milliseconds; 0 when empty.
    pub(crate) fn percentile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let value = self.0.value_at_quantile(q.clamp(0.0, 1.0));
        self.0.median_equivalent(value) as f64 / 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn reject_lines_are_json() {
        let r = Reject {
            line: 3,
            reason: "missing field `value`".into(),
            raw: "{\"a\":\"b\"}".into(),
        };
        let v: Value = serde_json::from_str(&r.to_json_line()).unwrap();
        assert_eq!(
            v,
            json!({"line":3,"reason":"missing field `value`","raw":"{\"a\":\"b\"}"})
        );
    }

    #[test]
    fn percentiles_are_within_half_a_percent() {
        let close = |got: f64, want: f64| {
            assert!(
                (got - want).abs() <= want * 5e-3,
                "{got} ms, expected {want} ms"
            );
        };
        let mut d = Latencies::default();
        // Bounded memory: a fixed number of counters, not one entry per batch.
        assert!(
            d.0.distinct_values() <= 4_096,
            "{} counters",
            d.0.distinct_values()
        );
        assert_eq!(d.percentile_ms(0.5), 0.0);
        d.record(Duration::from_millis(1));
        close(d.percentile_ms(0.99), 1.0);
        for ms in 2..=100 {
            d.record(Duration::from_millis(ms));
        }
        close(d.percentile_ms(0.5), 50.0);
        close(d.percentile_ms(0.99), 99.0);
        close(d.percentile_ms(1.0), 100.0);
        // Sub-millisecond and very long latencies: neither lost nor out of range.
        let mut e = Latencies::default();
        e.record(Duration::from_micros(250));
        close(e.percentile_ms(0.5), 0.25);
        e.record(Duration::from_secs(10_000));
        close(e.percentile_ms(1.0), 3_600_000.0);
        // Many latencies of every magnitude: each percentile stays close to the exact one.
        let mut f = Latencies::default();
        let exact: Vec<f64> = (1..=100_000_u64)
            .map(|i| (i * i % 977_123) as f64 / 1e3)
            .collect();
        for ms in &exact {
            f.record(Duration::from_secs_f64(ms / 1e3));
        }
        let mut sorted = exact.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.5, 0.9, 0.99, 0.999] {
            let rank = (q * sorted.len() as f64).ceil() as usize - 1;
            close(f.percentile_ms(q), sorted[rank]);
        }
        assert_eq!(f.0.distinct_values(), d.0.distinct_values());
    }

    #[test]
    fn report_serialises_with_the_documented_fields() {
        let v = serde_json::to_value(IngestReport::default()).unwrap();
        for field in [
            "sent",
            "rejected",
            "failed",
            "bytes",
            "seconds",
            "events_per_sec",
        ] {
            assert!(v.get(field).is_some(), "{field}");
        }
    }
}
