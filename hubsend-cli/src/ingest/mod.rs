//! Telemetry ingestion for `hubsend send` and `hubsend bench`: parse NDJSON or CSV records,
//! validate them against the telemetry schema, and stream them into a hub.
//!
//! - [`record`]: the schema, [`Record`](record::Record) and [`RecordError`](record::RecordError).
//! - [`ndjson`], [`csv`]: the readers, each bounded by the record limit.
//! - [`report`]: rejects, progress and the summary.
//! - [`stream`]: sending the records.

pub(crate) mod csv;
pub(crate) mod ndjson;
pub(crate) mod record;
pub(crate) mod report;
pub(crate) mod stream;

use std::io::{BufReader, Read};

use tokio::sync::mpsc;

use self::csv::CsvRecords;
use self::ndjson::NdjsonRecords;
use self::record::{truncate, Record, RecordError};

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
    /// The input text (for CSV: the row re-encoded as CSV), for reject reports.
    pub(crate) raw: String,
    /// The record, or why the line is invalid.
    pub(crate) result: Result<Record, RecordError>,
}

/// How much of an over-long line or record is kept for the reject report.
const RAW_PREVIEW_CHARS: usize = 256;

/// The start of an over-long record's text, for its reject report.
pub(crate) fn preview(text: &str) -> String {
    truncate(text, RAW_PREVIEW_CHARS)
}

/// Parses `reader` in `format`, one [`ParsedLine`] per data line; I/O errors end the stream.
///
/// A line or row longer than `max_record_bytes` becomes a [`RecordError::TooLong`] reject;
/// memory stays bounded by that limit whatever the input holds.
pub(crate) fn records<R: Read + Send + 'static>(
    reader: R,
    format: InputFormat,
    max_record_bytes: usize,
) -> Box<dyn Iterator<Item = std::io::Result<ParsedLine>> + Send> {
    match format {
        InputFormat::Ndjson => Box::new(NdjsonRecords::new(
            BufReader::with_capacity(256 * 1024, reader),
            max_record_bytes,
        )),
        InputFormat::Csv => Box::new(CsvRecords::new(reader, max_record_bytes)),
    }
}

/// Parses `reader` on a dedicated OS thread (reading may block, e.g. on a terminal's stdin)
/// and sends every line over a bounded channel. The thread stops at end of input, on a read
/// error (sent as the last item), or when the receiver is dropped.
pub(crate) fn spawn_reader<R: Read + Send + 'static>(
    reader: R,
    format: InputFormat,
    max_record_bytes: usize,
) -> mpsc::Receiver<std::io::Result<ParsedLine>> {
    let (tx, rx) = mpsc::channel(4096);
    std::thread::Builder::new()
        .name("hubsend-reader".into())
        .spawn(move || {
            for item in records(reader, format, max_record_bytes) {
                if tx.blocking_send(item).is_err() {
                    break;
                }
            }
        })
        .expect("spawning the input reader thread");
    rx
}
