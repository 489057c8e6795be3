//! Telemetry ingestion for `hubsend send` and `hubsend bench`: parse NDJSON or CSV records,
//! validate them against the telemetry schema (unless `--schema none`), and stream them into
//! a hub.
//!
//! - [`record`]: the schema, [`Record`](record::Record) and [`RecordError`](record::RecordError).
//! - [`ndjson`], [`csv`]: the readers, each bounded by the record limit.
//! - [`report`]: rejects, progress and the summary.
//! - [`stream`]: sending the records.

pub(crate) mod csv;
pub(crate) mod ndjson;
pub(crate) mod record;
pub(crate) mod report;
pub(crate) mod scan;
pub(crate) mod stream;

use std::io::{BufReader, Read};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use self::csv::CsvRecords;
use self::ndjson::NdjsonRecords;
use self::record::{truncate, Record, RecordError, Schema};

/// Input formats [`records`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum InputFormat {
    /// One JSON object per line; blank lines are skipped.
    #[default]
    Ndjson,
    /// Comma-separated values with a header row naming the fields.
    Csv,
}

/// One input line (or CSV row) after parsing: a record or the reason it was refused.
#[derive(Debug, Clone)]
pub(crate) struct ParsedLine {
    /// 1-based line number in the input (for CSV: the line the row starts on).
    pub(crate) line: u64,
    /// The input text (for CSV: the row re-encoded as CSV), for reject reports; `None` when it
    /// is the record's body (an NDJSON line sent as it stands is copied once, into its body),
    /// see [`reject_text`].
    pub(crate) raw: Option<String>,
    /// The record, or why the line is invalid.
    pub(crate) result: Result<Record, RecordError>,
}

/// The text a reject report shows for a line whose `record` was refused after parsing (no
/// route, too large for the hub): `raw`, or the record's body when the line was read into it.
pub(crate) fn reject_text(raw: Option<String>, record: &Record) -> String {
    raw.or_else(|| record.line_text().map(str::to_owned))
        .unwrap_or_default()
}

/// How much of an over-long line or record is kept for the reject report.
const RAW_PREVIEW_CHARS: usize = 256;

/// The start of an over-long record's text, for its reject report.
pub(crate) fn preview(text: &str) -> String {
    truncate(text, RAW_PREVIEW_CHARS)
}

/// Parses `reader` in `format` under `schema`, one [`ParsedLine`] per data line; I/O errors end the stream.
///
/// A line or row longer than `max_record_bytes` becomes a [`RecordError::TooLong`] reject;
/// memory stays bounded by that limit whatever the input holds.
pub(crate) fn records<R: Read + Send + 'static>(
    reader: R,
    format: InputFormat,
    schema: Schema,
    max_record_bytes: usize,
) -> Box<dyn Iterator<Item = std::io::Result<ParsedLine>> + Send> {
    match format {
        InputFormat::Ndjson => Box::new(
            NdjsonRecords::new(
                BufReader::with_capacity(256 * 1024, reader),
                max_record_bytes,
            )
            .with_schema(schema),
        ),
        InputFormat::Csv => Box::new(CsvRecords::new(reader, max_record_bytes).with_schema(schema)),
    }
}

/// Parses `reader` on a dedicated OS thread (reading may block, e.g. on a terminal's stdin)
/// and sends every line over a bounded channel. The thread stops at end of input, on a read
/// error (sent as the last item), or when the receiver is dropped.
///
/// Lines travel in chunks of up to [`CHUNK_LINES`]: one hand-off per line cost a thread wake-up
/// per line whenever the run was faster than the reading. A chunk is also handed over before
/// every read of the input, so no line waits in a chunk while reading blocks (a terminal, a
/// pipe that pauses).
pub(crate) fn spawn_reader<R: Read + Send + 'static>(
    reader: R,
    format: InputFormat,
    schema: Schema,
    max_record_bytes: usize,
) -> mpsc::Receiver<Lines> {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    std::thread::Builder::new()
        .name("hubsend-reader".into())
        .spawn(move || {
            let handoff = Arc::new(Handoff {
                pending: Mutex::new(Vec::with_capacity(CHUNK_LINES)),
                tx,
            });
            let input = HandOverBeforeRead {
                inner: reader,
                handoff: handoff.clone(),
            };
            for item in records(input, format, schema, max_record_bytes) {
                let full = {
                    let mut pending = handoff.lock();
                    pending.push(item);
                    pending.len() >= CHUNK_LINES
                };
                if full && !handoff.hand_over() {
                    return;
                }
            }
            handoff.hand_over();
        })
        .expect("spawning the input reader thread");
    rx
}

/// Parsed lines handed over at once.
pub(crate) type Lines = Vec<std::io::Result<ParsedLine>>;

/// Lines per chunk: enough that hand-offs are rare, few enough to stay small (tens of KB).
pub(crate) const CHUNK_LINES: usize = 256;

/// Chunks the channel holds: about 4,096 lines read ahead, as before chunking.
const CHANNEL_CHUNKS: usize = 16;

/// The chunk being filled and where it goes.
struct Handoff {
    pending: Mutex<Lines>,
    tx: mpsc::Sender<Lines>,
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the pending lines, if any; `false` once the run has stopped listening.
    fn hand_over(&self) -> bool {
        let chunk = {
            let mut pending = self.lock();
            if pending.is_empty() {
                return true;
            }
            // The next chunk is allocated once, at its full size.
            std::mem::replace(&mut *pending, Vec::with_capacity(CHUNK_LINES))
        };
        self.tx.blocking_send(chunk).is_ok()
    }
}

/// The input, handing over the pending chunk before each read of it.
struct HandOverBeforeRead<R> {
    inner: R,
    handoff: Arc<Handoff>,
}

impl<R: Read> Read for HandOverBeforeRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.handoff.hand_over() {
            // Nobody reads the lines any more: end the input.
            return Ok(0);
        }
        self.inner.read(buf)
    }
}
