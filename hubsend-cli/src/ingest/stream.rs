//! Streaming parsed lines into the hub on a [`BufferedProducer`], the library's one batching
//! engine: each valid record becomes an event enqueued on its route (partition key field,
//! partition id, or none); the buffered producer packs batches to the hub's size limit, keeps
//! them in flight within the producer's bounds, and tells this module every outcome through
//! its success and failure callbacks, which is all the report counts. "Sent" is therefore
//! exactly what the hub accepted.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubsend::{
    BatchOptions, BufferedOptions, BufferedProducer, Error, ErrorKind, Event, FailedBatch,
    Producer, SendOptions, SettledBatch, TryAddError,
};
use tokio::sync::mpsc;

use super::record::RecordError;
use super::report::{rate, IngestReport, Latencies, Progress, Reject};
use super::{preview, reject_text, Lines, ParsedLine};
use crate::style::EventStyle;
use crate::text::error_chain;

/// How [`ingest`] routes events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Routing {
    /// Let the hub spread batches over partitions.
    #[default]
    RoundRobin,
    /// Route each record by the string form of this field's value.
    PartitionKeyField(String),
    /// Send everything to this partition.
    PartitionId(String),
}

/// Tunables of [`ingest`].
#[derive(Debug, Clone)]
#[must_use]
pub(crate) struct IngestOptions {
    /// How events are routed.
    pub(crate) routing: Routing,
    /// At most this many routes have an open batch at once; a new route past that sends the
    /// least recently used one's batch (default 64).
    pub(crate) max_open_batches: usize,
    /// How long a partly filled batch waits for more records (default 50 ms).
    pub(crate) linger: Duration,
    /// How often [`IngestObserver::progress`] is called (default 250 ms).
    pub(crate) progress_interval: Duration,
    /// `--content-type` and `--property`, set on every event.
    pub(crate) style: EventStyle,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            routing: Routing::RoundRobin,
            max_open_batches: 64,
            linger: Duration::from_millis(50),
            progress_interval: Duration::from_millis(250),
            style: EventStyle::default(),
        }
    }
}

impl IngestOptions {
    /// The defaults.
    pub(crate) fn new() -> Self {
        IngestOptions::default()
    }

    /// Sets [`routing`](Self::routing).
    pub(crate) fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Sets [`max_open_batches`](Self::max_open_batches) (at least 1).
    pub(crate) fn max_open_batches(mut self, batches: usize) -> Self {
        self.max_open_batches = batches.max(1);
        self
    }

    /// Sets [`style`](Self::style).
    pub(crate) fn style(mut self, style: EventStyle) -> Self {
        self.style = style;
        self
    }

    /// Sets [`linger`](Self::linger).
    pub(crate) fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }
}

/// Receives what [`ingest`] reports while it runs. Both methods default to doing nothing.
pub(crate) trait IngestObserver: Send {
    /// A line that will not be stored: invalid, or too large for the hub.
    fn rejected(&mut self, _reject: &Reject) {}
    /// Called about every [`IngestOptions::progress_interval`].
    fn progress(&mut self, _progress: &Progress) {}
}

/// An observer that ignores everything.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct NoObserver;

#[cfg(test)]
impl IngestObserver for NoObserver {}

/// Events in the buffer at once: enough to fill a few 1 MiB batches of small events per
/// route while memory stays a few MB.
const MAX_BUFFERED_EVENTS: usize = 16_384;

/// A body this close to the hub's limit is checked against an empty batch before it is
/// enqueued (an event adds its properties and framing), so an event that cannot fit is refused
/// with its line number. Smaller bodies always fit.
const EXACT_SIZE_CHECK_MARGIN: u64 = 4096;

/// A record's route.
enum Route {
    Any,
    Key(String),
    Id(String),
}

impl Route {
    fn send_options(self) -> SendOptions {
        match self {
            Route::Any => SendOptions::new(),
            Route::Key(key) => SendOptions::new().partition_key(key),
            Route::Id(id) => SendOptions::new().partition_id(id),
        }
    }
}

/// What the buffered producer's callbacks have reported.
#[derive(Default)]
struct Tally {
    /// Body bytes of the stored events.
    bytes: u64,
    /// Batches with an outcome.
    batches: u64,
    /// Each stored batch's latency.
    latencies: Latencies,
    /// The first failure: its text (with causes) and kind.
    error: Option<(String, ErrorKind)>,
    /// A failure that will fail everything after it too.
    fatal: bool,
}

impl Tally {
    fn note_error(&mut self, error: &Error) {
        self.note(error_chain(error), error.kind());
    }

    fn note(&mut self, text: String, kind: ErrorKind) {
        if self.error.is_none() {
            self.error = Some((text, kind));
        }
        if matches!(
            kind,
            ErrorKind::Unauthorized
                | ErrorKind::NotFound
                | ErrorKind::Closed
                | ErrorKind::InvalidConfig
                | ErrorKind::Connection
        ) {
            self.fatal = true;
        }
    }
}

type SharedTally = Arc<Mutex<Tally>>;

fn lock(tally: &SharedTally) -> std::sync::MutexGuard<'_, Tally> {
    // A callback that panicked leaves counters that are still the best we know.
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One run: the buffered producer, the callbacks' tally and what the reading side counts.
struct Run<'a> {
    producer: &'a Producer,
    buffered: BufferedProducer,
    options: &'a IngestOptions,
    observer: &'a mut dyn IngestObserver,
    tally: SharedTally,
    started: Instant,
    records: u64,
    rejected: u64,
    /// Valid records that never reached the buffer (too large, or refused by it).
    unsent: u64,
    /// The distinct partition keys seen. foldhash, not SipHash: it is looked up once per
    /// keyed line, and the keys come from the user's own file. Keys of up to 24 bytes are
    /// held in the table itself (`CompactString`), so a look-up reads one place in memory,
    /// not two.
    keys: HashSet<compact_str::CompactString, foldhash::fast::RandomState>,
    interrupted: bool,
    /// The input's read error, if reading failed.
    input_error: Option<String>,
}

impl Run<'_> {
    fn reject(&mut self, line: u64, raw: &str, reason: String) {
        self.observer.rejected(&Reject {
            line,
            reason,
            raw: raw.to_owned(),
        });
    }

    /// Where a record goes, or why it has no route; `key` is its partition key from
    /// [`partition_keys`](Self::partition_keys) when routing by a field.
    fn route(&self, key: Option<Result<String, RecordError>>) -> Result<Route, RecordError> {
        Ok(match (&self.options.routing, key) {
            (Routing::PartitionKeyField(_), Some(key)) => Route::Key(key?),
            (Routing::PartitionKeyField(field), None) => {
                return Err(RecordError::MissingPartitionKey(field.clone()))
            }
            (Routing::RoundRobin, _) => Route::Any,
            (Routing::PartitionId(id), _) => Route::Id(id.clone()),
        })
    }

    /// When routing by a field: each valid record's partition key (`None` for the other
    /// lines), with every key not seen before added to [`keys`](Self::keys).
    ///
    /// A whole chunk at a time, in two tight loops: a look-up in a set of thousands of keys
    /// misses the cache, and one per line amid the encoding of its event was the largest
    /// cost keyed lines had over round robin (~0.08 µs of 0.6 per line with 10,000 keys),
    /// while a loop of look-ups alone lets the processor wait for several misses at once.
    fn partition_keys(&mut self, lines: &Lines) -> Vec<Option<Result<String, RecordError>>> {
        let Routing::PartitionKeyField(field) = &self.options.routing else {
            return Vec::new();
        };
        let keys: Vec<_> = lines
            .iter()
            .map(|line| {
                let record = line.as_ref().ok()?.result.as_ref().ok()?;
                Some(record.partition_key(field))
            })
            .collect();
        for key in keys.iter().flatten().flatten() {
            if !self.keys.contains(key.as_str()) {
                self.keys.insert(compact_str::CompactString::new(key));
            }
        }
        keys
    }

    /// Whether `event`'s body is so near the hub's limit that only a real batch can tell if
    /// it fits.
    fn near_limit(&self, event: &Event) -> bool {
        (event.body().len() as u64).saturating_add(EXACT_SIZE_CHECK_MARGIN)
            >= self.producer.max_message_size()
    }

    /// Whether `event` fits an empty batch on its route; the reason when it cannot.
    async fn check_size(&self, event: &Event, route: &Route) -> Result<(), (String, ErrorKind)> {
        let options = match route {
            Route::Any => BatchOptions::new(),
            Route::Key(key) => BatchOptions::new().partition_key(key.clone()),
            Route::Id(id) => BatchOptions::new().partition_id(id.clone()),
        };
        let mut probe = self
            .producer
            .create_batch(options)
            .await
            .map_err(|e| (error_chain(&e), e.kind()))?;
        match probe.try_add(event.clone()) {
            Err(TryAddError::TooLarge(_)) => Err((
                format!(
                    "{}: an event with a {}-byte body does not fit the hub's {}-byte limit",
                    ErrorKind::MessageTooLarge,
                    event.body().len(),
                    probe.max_size_in_bytes()
                ),
                ErrorKind::MessageTooLarge,
            )),
            _ => Ok(()),
        }
    }

    async fn record(&mut self, parsed: ParsedLine, key: Option<Result<String, RecordError>>) {
        self.records += 1;
        let ParsedLine { line, raw, result } = parsed;
        let record = match result {
            Ok(record) => record,
            Err(e) => {
                self.rejected += 1;
                return self.reject(line, raw.as_deref().unwrap_or_default(), e.to_string());
            }
        };
        let route = match self.route(key) {
            Ok(route) => route,
            Err(e) => {
                self.rejected += 1;
                return self.reject(line, &reject_text(raw, &record), e.to_string());
            }
        };
        let event = self.options.style.apply(record.into_event());
        // The exact check is rare and async; the common path stays a plain enqueue.
        let checked = if self.near_limit(&event) {
            self.check_size(&event, &route).await
        } else {
            Ok(())
        };
        if let Err((reason, kind)) = checked {
            // Still a failed record (valid, but it cannot be stored), reported with its line
            // like a refused one.
            self.unsent += 1;
            // Without a text of its own the line is the event's body (the style sets only
            // metadata).
            let text = match &raw {
                Some(raw) => preview(raw),
                None => preview(&String::from_utf8_lossy(event.body())),
            };
            self.reject(line, &text, reason.clone());
            lock(&self.tally).note(reason, kind);
            return;
        }
        if let Err(e) = self.buffered.enqueue(event, route.send_options()).await {
            self.unsent += 1;
            lock(&self.tally).note_error(&e);
        }
    }

    fn progress(&self) -> Progress {
        let buffered = self.buffered.report();
        let tally = lock(&self.tally);
        Progress {
            records: self.records,
            sent: buffered.sent,
            rejected: self.rejected,
            failed: buffered.failed + self.unsent,
            bytes: tally.bytes,
            in_flight: buffered.pending as usize,
            retries: self.producer.stats().retried,
            elapsed: self.started.elapsed(),
        }
    }

    /// Reads until the input ends, `shutdown` resolves or a fatal failure; then flushes and
    /// waits for every outcome.
    async fn stream<S: Future<Output = ()>>(
        &mut self,
        mut input: mpsc::Receiver<Lines>,
        shutdown: S,
    ) {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(self.options.progress_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        'reading: while !lock(&self.tally).fatal {
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    self.interrupted = true;
                    break;
                }
                _ = ticks.tick() => {
                    let snapshot = self.progress();
                    self.observer.progress(&snapshot);
                }
                chunk = input.recv() => {
                    let Some(lines) = chunk else { break };
                    let mut keys = self.partition_keys(&lines).into_iter();
                    for item in lines {
                        let key = keys.next().flatten();
                        match item {
                            Ok(parsed) => self.record(parsed, key).await,
                            Err(io) => {
                                self.interrupted = true;
                                self.input_error =
                                    Some(format!("reading the input failed: {io}"));
                                break 'reading;
                            }
                        }
                    }
                }
            }
        }
        drop(input);
        if lock(&self.tally).fatal {
            self.interrupted = true;
        }
        // Every outcome, progress still shown while they come in.
        let close = self.buffered.clone().close();
        tokio::pin!(close);
        loop {
            tokio::select! {
                _ = &mut close => break,
                _ = ticks.tick() => {
                    let snapshot = self.progress();
                    self.observer.progress(&snapshot);
                }
            }
        }
    }

    /// The report as things stand; `finished` when every outcome is in.
    fn report(self, finished: bool) -> IngestReport {
        let progress = self.progress();
        self.observer.progress(&progress);
        let buffered = self.buffered.report();
        let mut tally = lock(&self.tally);
        let elapsed = self.started.elapsed();
        let (error, error_kind) = match (self.input_error, tally.error.take()) {
            (Some(input), _) => (Some(input), Some("input".to_owned())),
            (None, Some((text, kind))) => (Some(text), Some(kind.to_string())),
            (None, None) => (None, None),
        };
        IngestReport {
            sent: buffered.sent,
            rejected: self.rejected,
            failed: buffered.failed + self.unsent,
            unknown: if finished { 0 } else { buffered.pending },
            bytes: tally.bytes,
            seconds: elapsed.as_secs_f64(),
            events_per_sec: rate(buffered.sent as f64, elapsed),
            mb_per_sec: rate(tally.bytes as f64 / 1e6, elapsed),
            records: self.records,
            batches: tally.batches,
            partition_keys: self.keys.len() as u64,
            p50_ms: tally.latencies.percentile_ms(0.50),
            p99_ms: tally.latencies.percentile_ms(0.99),
            interrupted: self.interrupted || !finished,
            error,
            error_kind,
            duplicates_avoided: None,
            spooled: None,
            resumed: None,
        }
    }
}

/// Streams parsed lines into the hub until the input ends, `shutdown` resolves (stop reading,
/// then send what is buffered and wait for every outcome), or a fatal error (unauthorized, hub
/// not found, connection lost) stops it. `abandon` resolving stops at once, even while
/// outcomes are awaited (a second Ctrl-C against a hub that stopped answering): the report then
/// counts what has no outcome yet as `unknown`.
///
/// Invalid lines go to `observer` and count as `rejected`; a valid record too large for the hub
/// goes there too, with its line, and counts as `failed`.
pub(crate) async fn ingest<S, A>(
    producer: &Producer,
    input: mpsc::Receiver<Lines>,
    options: &IngestOptions,
    observer: &mut dyn IngestObserver,
    shutdown: S,
    abandon: A,
) -> IngestReport
where
    S: Future<Output = ()>,
    A: Future<Output = ()>,
{
    let tally = SharedTally::default();
    let on_success = {
        let tally = tally.clone();
        move |batch: SettledBatch| {
            let mut tally = lock(&tally);
            tally.bytes += batch.body_bytes;
            tally.batches += 1;
            tally.latencies.record(batch.latency);
        }
    };
    let on_failure = {
        let tally = tally.clone();
        move |batch: FailedBatch| {
            tracing::debug!(error = %batch.error, events = batch.count, "batch failed");
            let mut tally = lock(&tally);
            tally.batches += 1;
            tally.note_error(&batch.error);
        }
    };
    let buffered = BufferedProducer::new(
        producer.clone(),
        BufferedOptions::new()
            .linger(options.linger)
            .max_lanes(options.max_open_batches)
            .max_buffered_events(MAX_BUFFERED_EVENTS)
            .on_success(on_success)
            .on_failure(on_failure)
            .keep_failed_events(false),
    );
    let mut run = Run {
        producer,
        buffered,
        options,
        observer,
        tally,
        started: Instant::now(),
        records: 0,
        rejected: 0,
        unsent: 0,
        keys: HashSet::default(),
        interrupted: false,
        input_error: None,
    };
    let finished = {
        let stream = run.stream(input, shutdown);
        tokio::select! {
            biased;
            _ = abandon => false,
            _ = stream => true,
        }
    };
    run.report(finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::record::Schema;
    use crate::ingest::record::{synthetic_record, SENSOR_ID};
    use crate::ingest::{spawn_reader, InputFormat};
    use serde_json::Value;

    const LIMIT: usize = 1024 * 1024;
    use hubsend_testhub::{HubConfig, TestHub};

    #[derive(Default)]
    struct Collect {
        rejects: Vec<Reject>,
        progress_calls: usize,
    }

    impl IngestObserver for Collect {
        fn rejected(&mut self, reject: &Reject) {
            self.rejects.push(reject.clone());
        }
        fn progress(&mut self, _progress: &Progress) {
            self.progress_calls += 1;
        }
    }

    async fn producer(hub: &TestHub) -> Producer {
        Producer::builder()
            .connection_string(hub.connection_string())
            .connect()
            .await
            .unwrap()
    }

    fn ndjson(n: usize, bad_every: usize) -> Vec<u8> {
        let mut out = String::new();
        for i in 0..n {
            if bad_every > 0 && i % bad_every == 0 {
                out.push_str("{\"sensor_id\":\"x\"}\n");
            } else {
                out.push_str(&format!(
                        "{{\"sensor_id\":\"s{}\",\"timestamp\":\"2025-08-19T08:30:00+01:00\",\"value\":{i}}}\n",
                        i % 5
                    ));
            }
        }
        out.into_bytes()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_valid_records_and_reports_invalid_ones() {
        let hub = TestHub::start(HubConfig::new().max_message_size(8 * 1024))
            .await
            .unwrap();
        let producer = producer(&hub).await;
        let input = spawn_reader(
            std::io::Cursor::new(ndjson(1000, 10)),
            InputFormat::Ndjson,
            Schema::Telemetry,
            LIMIT,
        );
        let mut observer = Collect::default();
        let options = IngestOptions::new()
            .routing(Routing::PartitionKeyField(SENSOR_ID.into()))
            .max_open_batches(2);
        let report = ingest(
            &producer,
            input,
            &options,
            &mut observer,
            std::future::pending(),
            std::future::pending(),
        )
        .await;
        assert_eq!((report.sent, report.rejected, report.failed), (900, 100, 0));
        assert_eq!(report.records, 1000);
        assert_eq!(report.partition_keys, 5);
        assert!(report.batches > 5, "{report:?}");
        assert!(report.all_sent() && !report.interrupted);
        assert!(observer.progress_calls >= 1);
        assert_eq!(observer.rejects.len(), 100);
        assert_eq!(observer.rejects[1].line, 11);
        assert_eq!(observer.rejects[1].reason, "missing field `timestamp`");
        let events = hub.events("telemetry");
        assert_eq!(events.len(), 900);
        assert_eq!(
            report.bytes,
            events.iter().map(|e| e.body.len() as u64).sum::<u64>()
        );
        for e in &events {
            let body: Value = serde_json::from_slice(&e.body).unwrap();
            assert_eq!(e.partition_key.as_deref(), body["sensor_id"].as_str());
            assert_eq!(body["timestamp"], "2025-08-19T07:30:00Z");
        }
        producer.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_stops_reading_and_flushes_open_batches() {
        let hub = TestHub::start(HubConfig::new()).await.unwrap();
        let producer = producer(&hub).await;
        let (tx, rx) = mpsc::channel(16);
        for i in 0..5 {
            let record = synthetic_record(i, 100, 0);
            tx.send(vec![Ok(ParsedLine {
                line: i + 1,
                raw: None,
                result: Ok(record),
            })])
            .await
            .unwrap();
        }
        // The idle flush sends the open batch; once stored, "Ctrl-C" fires while the
        // input is still open.
        let shutdown = async {
            hub.wait_for_events("telemetry", 5, Duration::from_secs(10))
                .await;
        };
        let report = ingest(
            &producer,
            rx,
            &IngestOptions::new(),
            &mut NoObserver,
            shutdown,
            std::future::pending(),
        )
        .await;
        assert_eq!(report.sent, 5);
        assert!(report.interrupted);
        assert!(report.all_sent());
        drop(tx);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_batches_count_as_failed() {
        let hub = TestHub::start(HubConfig::new().max_message_size(4 * 1024))
            .await
            .unwrap();
        hub.faults()
            .reject_every_nth(2, "com.microsoft:argument-error");
        let producer = producer(&hub).await;
        let input = spawn_reader(
            std::io::Cursor::new(ndjson(400, 0)),
            InputFormat::Ndjson,
            Schema::Telemetry,
            LIMIT,
        );
        let report = ingest(
            &producer,
            input,
            &IngestOptions::new(),
            &mut NoObserver,
            std::future::pending(),
            std::future::pending(),
        )
        .await;
        assert!(report.failed > 0, "{report:?}");
        assert_eq!(report.sent + report.failed, 400, "{report:?}");
        assert_eq!(report.sent as usize, hub.events("telemetry").len());
        assert!(!report.all_sent());
        assert!(report.error.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_larger_than_the_hub_limit_fails_alone() {
        let hub = TestHub::start(HubConfig::new().max_message_size(2048))
            .await
            .unwrap();
        let producer = producer(&hub).await;
        let (tx, rx) = mpsc::channel(16);
        for (i, size) in [100usize, 5000, 100].into_iter().enumerate() {
            let record = synthetic_record(i as u64, size, 0);
            tx.send(vec![Ok(ParsedLine {
                line: i as u64 + 1,
                raw: None,
                result: Ok(record),
            })])
            .await
            .unwrap();
        }
        drop(tx);
        let report = ingest(
            &producer,
            rx,
            &IngestOptions::new(),
            &mut NoObserver,
            std::future::pending(),
            std::future::pending(),
        )
        .await;
        assert_eq!((report.sent, report.failed), (2, 1));
        assert_eq!(
            report.error_kind.as_deref(),
            Some("message too large"),
            "{report:?}"
        );
    }
}
