//! Telemetry ingestion: parse NDJSON or CSV records, validate them against the telemetry schema,
//! and stream them into a hub as size-filled batches with many batches in flight.
//!
//! # Records
//!
//! Every record is a JSON object that carries `sensor_id` (a non-empty string), `timestamp`
//! (RFC 3339; normalised to UTC, `…Z`) and `value` (a number or a string such as `"Running"`).
//! Any other field passes through unchanged. A line that breaks these rules becomes a
//! [`RecordError`] naming the reason; it is never sent.
//!
//! ```
//! use hubsend::ingest::parse_ndjson_line;
//!
//! let record = parse_ndjson_line(
//!     r#"{"sensor_id":"pump-1","timestamp":"2025-08-19T10:30:00+02:00","value":"Running","site":"p3"}"#,
//! )
//! .unwrap();
//! assert_eq!(record.timestamp().to_rfc3339(), "2025-08-19T08:30:00+00:00");
//! assert_eq!(record.as_json()["timestamp"], "2025-08-19T08:30:00Z");
//! assert_eq!(record.as_json()["site"], "p3");
//!
//! let err = parse_ndjson_line(r#"{"timestamp":"2025-08-19T08:30:00Z","value":1}"#).unwrap_err();
//! assert_eq!(err.to_string(), "missing field `sensor_id`");
//! ```
//!
//! # Streaming
//!
//! [`ingest`] takes parsed lines from a channel (fed by [`spawn_reader`] or any other task),
//! packs valid records into [`EventBatch`]es filled to the hub's size limit, keeps up to
//! [`IngestOptions::max_in_flight`] batches awaiting the hub's outcome at once, and returns an
//! [`IngestReport`] with the counters a command-line summary needs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Map, Number, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::batch::{BatchOptions, EventBatch, TryAddError};
use crate::error::{Error, ErrorKind};
use crate::event::Event;
use crate::producer::Producer;

/// The field naming the sensor.
pub const SENSOR_ID: &str = "sensor_id";
/// The field holding the reading's time.
pub const TIMESTAMP: &str = "timestamp";
/// The field holding the reading.
pub const VALUE: &str = "value";

/// Why a line was not turned into a [`Record`]. The `Display` text is the reason shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// The line is not a JSON object (invalid JSON, or JSON of another type).
    NotAnObject(String),
    /// A required field is absent (or JSON `null`).
    MissingField(&'static str),
    /// `sensor_id` is not a string, or is empty.
    InvalidSensorId,
    /// `timestamp` is not an RFC 3339 string; holds the parser's explanation.
    InvalidTimestamp(String),
    /// `value` is neither a number nor a string.
    InvalidValue,
    /// A CSV `value` cell is empty.
    EmptyValue,
    /// The partition key field is absent or `null`.
    MissingPartitionKey(String),
    /// The partition key field is an object or array.
    InvalidPartitionKey(String),
    /// The line is not valid UTF-8.
    NotUtf8,
    /// The CSV row could not be read, or its shape does not match the header.
    Csv(String),
    /// The line (NDJSON) or record (CSV) is longer than the limit, in bytes; it was skipped
    /// without being read into memory whole.
    TooLong(usize),
    /// A CSV quoted field opened on this line is still open at the end of the input.
    UnterminatedQuote(u64),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::NotAnObject(why) => write!(f, "not a JSON object: {why}"),
            RecordError::MissingField(name) => write!(f, "missing field `{name}`"),
            RecordError::InvalidSensorId => f.write_str("`sensor_id` must be a non-empty string"),
            RecordError::InvalidTimestamp(why) => write!(f, "`timestamp` is not RFC 3339: {why}"),
            RecordError::InvalidValue => f.write_str("`value` must be a number or a string"),
            RecordError::EmptyValue => f.write_str("`value` is empty"),
            RecordError::MissingPartitionKey(field) => {
                write!(f, "missing partition key field `{field}`")
            }
            RecordError::InvalidPartitionKey(field) => write!(
                f,
                "partition key field `{field}` must be a string, number or boolean"
            ),
            RecordError::NotUtf8 => f.write_str("line is not valid UTF-8"),
            RecordError::Csv(why) => write!(f, "malformed CSV: {why}"),
            RecordError::TooLong(limit) => {
                write!(f, "longer than the {limit}-byte record limit (skipped)")
            }
            RecordError::UnterminatedQuote(line) => write!(
                f,
                "malformed CSV: the quoted field opened on line {line} is never closed"
            ),
        }
    }
}

impl std::error::Error for RecordError {}

/// A validated telemetry record: a JSON object with `sensor_id`, a UTC `timestamp` and `value`,
/// plus any other fields unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    object: Map<String, Value>,
    timestamp: DateTime<Utc>,
}

impl Record {
    /// Validates a JSON object and normalises its `timestamp` to UTC.
    ///
    /// # Errors
    /// The first rule the object breaks, checked in the order `sensor_id`, `timestamp`, `value`.
    pub fn from_object(mut object: Map<String, Value>) -> Result<Record, RecordError> {
        match object.get(SENSOR_ID) {
            None | Some(Value::Null) => return Err(RecordError::MissingField(SENSOR_ID)),
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(_) => return Err(RecordError::InvalidSensorId),
        }
        let timestamp = match object.get(TIMESTAMP) {
            None | Some(Value::Null) => return Err(RecordError::MissingField(TIMESTAMP)),
            Some(Value::String(s)) => parse_timestamp(s)?,
            Some(other) => {
                return Err(RecordError::InvalidTimestamp(format!(
                    "expected a string, found {}",
                    json_type(other)
                )))
            }
        };
        match object.get(VALUE) {
            None | Some(Value::Null) => return Err(RecordError::MissingField(VALUE)),
            Some(Value::Number(_)) | Some(Value::String(_)) => {}
            Some(_) => return Err(RecordError::InvalidValue),
        }
        object.insert(
            TIMESTAMP.to_owned(),
            Value::String(format_timestamp(&timestamp)),
        );
        Ok(Record { object, timestamp })
    }

    /// Builds a record from its three required fields.
    pub fn new(sensor_id: impl Into<String>, timestamp: DateTime<Utc>, value: Value) -> Record {
        let mut object = Map::new();
        object.insert(SENSOR_ID.to_owned(), Value::String(sensor_id.into()));
        object.insert(
            TIMESTAMP.to_owned(),
            Value::String(format_timestamp(&timestamp)),
        );
        object.insert(VALUE.to_owned(), value);
        Record { object, timestamp }
    }

    /// Adds or replaces a pass-through field (not one of the three required ones).
    pub fn with_field(mut self, name: impl Into<String>, value: Value) -> Record {
        let name = name.into();
        if name != SENSOR_ID && name != TIMESTAMP && name != VALUE {
            self.object.insert(name, value);
        }
        self
    }

    /// The sensor id.
    pub fn sensor_id(&self) -> &str {
        self.object
            .get(SENSOR_ID)
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The reading's time, in UTC.
    pub fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp
    }

    /// The reading: a JSON number or string.
    pub fn value(&self) -> &Value {
        self.object.get(VALUE).unwrap_or(&Value::Null)
    }

    /// Any field by name.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.object.get(name)
    }

    /// The whole record as a JSON object, `timestamp` already normalised.
    pub fn as_json(&self) -> &Map<String, Value> {
        &self.object
    }

    /// The record's JSON encoding: the event body.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Serialising a map of JSON values cannot fail.
        serde_json::to_vec(&self.object).unwrap_or_default()
    }

    /// The record as an event: its JSON encoding with content type `application/json`.
    pub fn to_event(&self) -> Event {
        Event::new(self.to_json_bytes()).with_content_type("application/json")
    }

    /// The partition key for this record: the string form of `field`'s value (strings as they
    /// are, numbers and booleans as JSON writes them).
    ///
    /// # Errors
    /// [`RecordError::MissingPartitionKey`] when the field is absent or `null`,
    /// [`RecordError::InvalidPartitionKey`] when it is an object or array.
    pub fn partition_key(&self, field: &str) -> Result<String, RecordError> {
        match self.object.get(field) {
            None | Some(Value::Null) => Err(RecordError::MissingPartitionKey(field.to_owned())),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Bool(b)) => Ok(b.to_string()),
            Some(_) => Err(RecordError::InvalidPartitionKey(field.to_owned())),
        }
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, RecordError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| RecordError::InvalidTimestamp(format!("{e} (`{}`)", truncate(text, 64))))
}

/// The canonical UTC form used in event bodies, e.g. `2025-08-19T08:30:00.250Z`.
pub fn format_timestamp(timestamp: &DateTime<Utc>) -> String {
    timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Parses and validates one NDJSON line (without its line terminator).
///
/// # Errors
/// [`RecordError::NotAnObject`] for anything that is not a JSON object, otherwise as
/// [`Record::from_object`].
pub fn parse_ndjson_line(line: &str) -> Result<Record, RecordError> {
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) => Record::from_object(object),
        Ok(other) => Err(RecordError::NotAnObject(format!(
            "found {}",
            json_type(&other)
        ))),
        Err(e) => Err(RecordError::NotAnObject(e.to_string())),
    }
}

/// Turns one CSV row into a record, given the header's field names.
///
/// `value` becomes a JSON number when it parses as a finite number (integers stay integers),
/// otherwise a string; every other column passes through as a string.
///
/// # Errors
/// [`RecordError::Csv`] when the row's length differs from the header's,
/// [`RecordError::EmptyValue`] for an empty `value` cell, otherwise as [`Record::from_object`].
pub fn parse_csv_row<S: AsRef<str>>(headers: &[S], fields: &[S]) -> Result<Record, RecordError> {
    if headers.len() != fields.len() {
        return Err(RecordError::Csv(format!(
            "the row has {} fields but the header has {}",
            fields.len(),
            headers.len()
        )));
    }
    let mut object = Map::new();
    for (name, cell) in headers.iter().zip(fields) {
        let (name, cell) = (name.as_ref(), cell.as_ref());
        let value = if name == VALUE {
            if cell.trim().is_empty() {
                return Err(RecordError::EmptyValue);
            }
            csv_value(cell)
        } else {
            Value::String(cell.to_owned())
        };
        object.insert(name.to_owned(), value);
    }
    Record::from_object(object)
}

/// A CSV `value` cell as JSON: an integer, a finite float, or the text itself.
fn csv_value(cell: &str) -> Value {
    let trimmed = cell.trim();
    if let Ok(i) = trimmed.parse::<i64>() {
        return Value::Number(i.into());
    }
    if let Ok(u) = trimmed.parse::<u64>() {
        return Value::Number(u.into());
    }
    match trimmed.parse::<f64>() {
        Ok(f) if f.is_finite() => Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(cell.to_owned())),
        _ => Value::String(cell.to_owned()),
    }
}

/// Input formats [`records`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputFormat {
    /// One JSON object per line; blank lines are skipped.
    #[default]
    Ndjson,
    /// Comma-separated values with a header row naming the fields.
    Csv,
}

/// One input line (or CSV row) after parsing: a record or the reason it was refused.
#[derive(Debug, Clone)]
pub struct ParsedLine {
    /// 1-based line number in the input (for CSV: the line the row starts on).
    pub line: u64,
    /// The input text (for CSV: the row re-encoded as CSV), for reject reports.
    pub raw: String,
    /// The record, or why the line is invalid.
    pub result: Result<Record, RecordError>,
}

/// An invalid line as reported to users and written to a rejects file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reject {
    /// 1-based line number.
    pub line: u64,
    /// Why the line was not sent.
    pub reason: String,
    /// The input text.
    pub raw: String,
}

impl Reject {
    /// One JSON object on one line (no terminator): `{"line":…,"reason":…,"raw":…}`.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// How much of an over-long line or record is kept for the reject report.
const RAW_PREVIEW_CHARS: usize = 256;

/// Reads NDJSON lines from a buffered reader. Blank lines are skipped but counted.
///
/// A line longer than the record limit is never held whole: its first bytes are kept for the
/// reject report and the rest is skipped up to the next newline, so memory stays bounded by the
/// limit whatever the input holds.
#[derive(Debug)]
pub struct NdjsonRecords<R> {
    reader: R,
    line: u64,
    limit: usize,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> NdjsonRecords<R> {
    /// Reads from `reader`, refusing lines longer than `max_record_bytes` (without their line
    /// terminator).
    pub fn new(reader: R, max_record_bytes: usize) -> Self {
        NdjsonRecords {
            reader,
            line: 0,
            limit: max_record_bytes,
            buf: Vec::new(),
            done: false,
        }
    }

    /// Reads the next line into `buf` (at most the limit plus its `\r\n`); returns whether a line
    /// was read and whether it was cut short.
    fn read_line(&mut self) -> std::io::Result<Option<bool>> {
        self.buf.clear();
        // Room for a line at the limit plus its CR LF, so one over the limit is still seen.
        let keep = self.limit.saturating_add(3);
        let mut read_any = false;
        let mut cut = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok(read_any.then_some(cut));
            }
            read_any = true;
            let (chunk, ended) = match memchr::memchr(b'\n', available) {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            let room = keep.saturating_sub(self.buf.len());
            if chunk.len() > room {
                cut = true;
            }
            self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            let consumed = chunk.len();
            self.reader.consume(consumed);
            if ended {
                return Ok(Some(cut));
            }
        }
    }
}

impl<R: BufRead> Iterator for NdjsonRecords<R> {
    type Item = std::io::Result<ParsedLine>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let cut = match self.read_line() {
                Ok(Some(cut)) => cut,
                Ok(None) => {
                    self.done = true;
                    break;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            self.line += 1;
            let mut bytes = self.buf.as_slice();
            if let Some(rest) = bytes.strip_suffix(b"\n") {
                bytes = rest;
            }
            if let Some(rest) = bytes.strip_suffix(b"\r") {
                bytes = rest;
            }
            if cut || bytes.len() > self.limit {
                return Some(Ok(ParsedLine {
                    line: self.line,
                    raw: preview(&String::from_utf8_lossy(bytes)),
                    result: Err(RecordError::TooLong(self.limit)),
                }));
            }
            let parsed = match std::str::from_utf8(bytes) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => ParsedLine {
                    line: self.line,
                    raw: text.to_owned(),
                    result: parse_ndjson_line(text),
                },
                Err(_) => ParsedLine {
                    line: self.line,
                    raw: String::from_utf8_lossy(bytes).into_owned(),
                    result: Err(RecordError::NotUtf8),
                },
            };
            return Some(Ok(parsed));
        }
        None
    }
}

/// The start of an over-long record's text, for its reject report.
fn preview(text: &str) -> String {
    truncate(text, RAW_PREVIEW_CHARS)
}

/// Reads CSV rows; the first row is the header.
///
/// Rows are parsed with `csv-core` into one buffer bounded by the record limit: a longer row
/// is skipped to its end (counting its lines) without being held, and reported with the line it
/// starts on. A quoted field still open at the end of the input is an error naming the line the
/// quote opened on, not a record that swallowed the rest of the file.
#[derive(Debug)]
pub struct CsvRecords<R> {
    input: BufReader<CrlfToLf<R>>,
    parser: csv_core::Reader,
    limit: usize,
    headers: Option<Vec<String>>,
    /// The current row's fields, back to back (the first `used` bytes), and where each ends.
    fields: Vec<u8>,
    used: usize,
    ends: Vec<usize>,
    stage: CsvStage,
}

/// How far [`CsvRecords`] has read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CsvStage {
    /// Reading the input.
    Input,
    /// The input ended; a newline is fed so a last row without one ends normally. Only a row
    /// inside a quoted field is still open after it.
    FinalNewline,
    /// Both fed: an empty input tells the parser there is nothing more.
    Eof,
    /// Nothing more to return.
    Done,
}

/// One CSV row as read, before it becomes a [`ParsedLine`].
struct CsvRow {
    /// The line the row starts on.
    line: u64,
    /// The row was longer than the limit (its fields were not kept).
    too_long: bool,
    /// The line a quoted field still open at the end of the input opened on.
    open_quote: Option<u64>,
}

impl<R: Read> CsvRecords<R> {
    /// Reads from `reader`, refusing rows whose fields hold more than `max_record_bytes`.
    pub fn new(reader: R, max_record_bytes: usize) -> Self {
        CsvRecords {
            input: BufReader::with_capacity(64 * 1024, CrlfToLf::new(reader)),
            parser: csv_core::Reader::new(),
            limit: max_record_bytes,
            headers: None,
            fields: Vec::new(),
            used: 0,
            ends: Vec::new(),
            stage: CsvStage::Input,
        }
    }

    /// Reads the next row into `fields`/`ends`; `None` at the end of the input.
    fn read_row(&mut self) -> std::io::Result<Option<CsvRow>> {
        self.used = 0;
        self.ends.clear();
        let line_before = self.parser.line();
        let mut scratch = [0u8; 4096];
        // Newlines inside the row's fields so far, and when the current field began.
        let mut newlines = 0u64;
        let mut field_newlines = 0u64;
        let mut too_long = false;
        loop {
            let input: &[u8] = match self.stage {
                CsvStage::Input => {
                    let buf = match self.input.fill_buf() {
                        Ok(b) => b,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    if buf.is_empty() {
                        self.stage = CsvStage::FinalNewline;
                        continue;
                    }
                    buf
                }
                CsvStage::FinalNewline => b"\n",
                CsvStage::Eof => b"",
                CsvStage::Done => return Ok(None),
            };
            // Field bytes plus one per field end, so a row of a million empty fields counts too.
            let used = self.used + self.ends.len();
            if used >= self.limit {
                too_long = true;
            } else if self.used == self.fields.len() {
                // Grow geometrically up to the limit; the spare bytes are reused by later rows.
                let grown = (self.fields.len() * 2).max(1024).min(self.limit);
                self.fields.resize(grown.max(self.used + 1), 0);
            }
            let output: &mut [u8] = if too_long {
                &mut scratch
            } else {
                let end = self.fields.len().min(self.used + (self.limit - used));
                &mut self.fields[self.used..end]
            };
            let fed = self.stage;
            let (result, nin, nout) = self.parser.read_field(input, output);
            newlines += memchr::memchr_iter(b'\n', &output[..nout]).count() as u64;
            if !too_long {
                self.used += nout;
            }
            match self.stage {
                CsvStage::Input => self.input.consume(nin),
                CsvStage::FinalNewline if nin > 0 => self.stage = CsvStage::Eof,
                _ => {}
            }
            match result {
                csv_core::ReadFieldResult::InputEmpty => {}
                csv_core::ReadFieldResult::OutputFull => {}
                csv_core::ReadFieldResult::End => {
                    self.stage = CsvStage::Done;
                    return Ok(None);
                }
                csv_core::ReadFieldResult::Field { record_end } => {
                    if !too_long {
                        self.ends.push(self.used);
                    }
                    if !record_end {
                        field_newlines = newlines;
                        continue;
                    }
                    // Only a row still inside a quoted field outlives the final newline.
                    let unterminated = fed == CsvStage::Eof;
                    // The parser stands after the row's terminator (none when unterminated):
                    // the row began that many lines earlier, after any blank lines skipped.
                    let terminator = u64::from(!unterminated);
                    let line = self
                        .parser
                        .line()
                        .saturating_sub(newlines + terminator)
                        .max(line_before);
                    if unterminated {
                        // The final newline fed at the end is not the row's.
                        if self.row().last() == Some(&b'\n') {
                            self.used -= 1;
                            if let Some(end) = self.ends.last_mut() {
                                *end = self.used;
                            }
                        }
                    }
                    return Ok(Some(CsvRow {
                        line,
                        too_long,
                        open_quote: unterminated.then_some(line + field_newlines),
                    }));
                }
            }
        }
    }

    /// The current row's field bytes, back to back.
    fn row(&self) -> &[u8] {
        &self.fields[..self.used]
    }

    /// The current row's fields as text, or `None` when one is not UTF-8.
    fn field_strings(&self) -> Option<Vec<String>> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let field = std::str::from_utf8(&self.row()[start..end]).ok();
                start = end;
                field.map(str::to_owned)
            })
            .collect()
    }

    /// The current row's fields as text, invalid UTF-8 replaced.
    fn lossy_fields(&self) -> Vec<String> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let field = String::from_utf8_lossy(&self.row()[start..end]).into_owned();
                start = end;
                field
            })
            .collect()
    }
}

/// Turns CRLF line ends into LF as bytes stream through, so the CSV reader counts lines the
/// same way for both (a lone CR is kept).
#[derive(Debug)]
pub(crate) struct CrlfToLf<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    pending_cr: bool,
    eof: bool,
}

impl<R: Read> CrlfToLf<R> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: R) -> Self {
        CrlfToLf {
            inner,
            buf: vec![0; 64 * 1024].into_boxed_slice(),
            pos: 0,
            len: 0,
            pending_cr: false,
            eof: false,
        }
    }
}

impl<R: Read> Read for CrlfToLf<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos == self.len {
                if self.eof {
                    if self.pending_cr {
                        self.pending_cr = false;
                        out[0] = b'\r';
                        return Ok(1);
                    }
                    return Ok(0);
                }
                let n = self.inner.read(&mut self.buf)?;
                self.pos = 0;
                self.len = n;
                if n == 0 {
                    self.eof = true;
                }
                continue;
            }
            let mut written = 0;
            while written < out.len() && self.pos < self.len {
                let byte = self.buf[self.pos];
                if self.pending_cr {
                    self.pending_cr = false;
                    if byte != b'\n' {
                        // A lone CR: emit it and look at this byte again.
                        out[written] = b'\r';
                        written += 1;
                        continue;
                    }
                }
                self.pos += 1;
                if byte == b'\r' {
                    self.pending_cr = true;
                } else {
                    out[written] = byte;
                    written += 1;
                }
            }
            if written > 0 {
                return Ok(written);
            }
        }
    }
}

fn reencode_csv(fields: &[String]) -> String {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let _ = writer.write_record(fields);
    let bytes = writer.into_inner().unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    text.strip_suffix('\n').unwrap_or(&text).to_owned()
}

impl<R: Read> Iterator for CsvRecords<R> {
    type Item = std::io::Result<ParsedLine>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let row = match self.read_row() {
                Ok(Some(row)) => row,
                Ok(None) => return None,
                Err(e) => {
                    self.stage = CsvStage::Done;
                    return Some(Err(e));
                }
            };
            let line = row.line;
            if let Some(opened) = row.open_quote {
                return Some(Ok(ParsedLine {
                    line,
                    raw: preview(&reencode_csv(&self.lossy_fields())),
                    result: Err(RecordError::UnterminatedQuote(opened)),
                }));
            }
            if row.too_long {
                return Some(Ok(ParsedLine {
                    line,
                    raw: preview(&reencode_csv(&self.lossy_fields())),
                    result: Err(RecordError::TooLong(self.limit)),
                }));
            }
            let Some(mut fields) = self.field_strings() else {
                return Some(Ok(ParsedLine {
                    line,
                    raw: reencode_csv(&self.lossy_fields()),
                    result: Err(RecordError::NotUtf8),
                }));
            };
            match &self.headers {
                None => {
                    if let Some(first) = fields.first_mut() {
                        if let Some(rest) = first.strip_prefix('\u{feff}') {
                            *first = rest.to_owned();
                        }
                    }
                    self.headers = Some(fields);
                }
                Some(headers) => {
                    // A completely empty line reads as one empty field: skip it.
                    if fields.len() == 1 && fields[0].is_empty() && headers.len() != 1 {
                        continue;
                    }
                    return Some(Ok(ParsedLine {
                        line,
                        raw: reencode_csv(&fields),
                        result: parse_csv_row(headers, &fields),
                    }));
                }
            }
        }
    }
}

/// Parses `reader` in `format`, one [`ParsedLine`] per data line; I/O errors end the stream.
///
/// A line or row longer than `max_record_bytes` becomes a [`RecordError::TooLong`] reject;
/// memory stays bounded by that limit whatever the input holds.
pub fn records<R: Read + Send + 'static>(
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
pub fn spawn_reader<R: Read + Send + 'static>(
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

/// A synthetic telemetry record for benchmarks: sensor `sensor-{i % cardinality}` (or
/// `sensor-{i}` when `cardinality` is 0), the current time, a numeric value, and a `payload`
/// padding field sized so the JSON body is about `payload_bytes` long.
pub fn synthetic_record(i: u64, payload_bytes: usize, cardinality: u64) -> Record {
    let sensor = match cardinality {
        0 => format!("sensor-{i}"),
        k => format!("sensor-{}", i % k),
    };
    let value = Number::from_f64(((i % 1000) as f64) * 0.5).map_or(Value::Null, Value::Number);
    let record = Record::new(sensor, Utc::now(), value).with_field("seq", Value::from(i));
    let base = record.to_json_bytes().len() + r#","payload":"""#.len();
    let pad = payload_bytes.saturating_sub(base);
    if pad == 0 {
        record
    } else {
        record.with_field("payload", Value::String("x".repeat(pad)))
    }
}

/// How [`ingest`] routes events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Routing {
    /// Let the hub spread batches over partitions.
    #[default]
    RoundRobin,
    /// Route each record by the string form of this field's value (one open batch per key).
    PartitionKeyField(String),
    /// Send everything to this partition.
    PartitionId(String),
}

/// Tunables of [`ingest`].
#[derive(Debug, Clone)]
#[must_use]
pub struct IngestOptions {
    /// How events are routed.
    pub routing: Routing,
    /// At most this many batches await the hub's outcome at once (default 64).
    pub max_in_flight: usize,
    /// At most this many partially filled batches are kept open with partition-key routing;
    /// past that the oldest is sent (default 64).
    pub max_open_batches: usize,
    /// When no record arrives for this long, open batches are sent as they are (default 50 ms).
    pub linger: Duration,
    /// How often [`IngestObserver::progress`] is called (default 250 ms).
    pub progress_interval: Duration,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            routing: Routing::RoundRobin,
            max_in_flight: 64,
            max_open_batches: 64,
            linger: Duration::from_millis(50),
            progress_interval: Duration::from_millis(250),
        }
    }
}

impl IngestOptions {
    /// The defaults.
    pub fn new() -> Self {
        IngestOptions::default()
    }

    /// Sets [`routing`](Self::routing).
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Sets [`max_in_flight`](Self::max_in_flight) (at least 1).
    pub fn max_in_flight(mut self, batches: usize) -> Self {
        self.max_in_flight = batches.max(1);
        self
    }

    /// Sets [`max_open_batches`](Self::max_open_batches) (at least 1).
    pub fn max_open_batches(mut self, batches: usize) -> Self {
        self.max_open_batches = batches.max(1);
        self
    }

    /// Sets [`linger`](Self::linger).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }
}

/// A snapshot of an [`ingest`] run, for progress displays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Lines read (valid and invalid).
    pub records: u64,
    /// Events the hub accepted so far.
    pub sent: u64,
    /// Invalid lines so far.
    pub rejected: u64,
    /// Events whose delivery failed so far.
    pub failed: u64,
    /// Body bytes of the accepted events.
    pub bytes: u64,
    /// Batches awaiting the hub's outcome.
    pub in_flight: usize,
    /// Deliveries the producer sent again (throttling, lost links or connections).
    pub retries: u64,
    /// Time since the run started.
    pub elapsed: Duration,
}

impl Progress {
    /// Accepted events per second so far.
    pub fn events_per_sec(&self) -> f64 {
        rate(self.sent as f64, self.elapsed)
    }

    /// Accepted body megabytes (10^6 bytes) per second so far.
    pub fn mb_per_sec(&self) -> f64 {
        rate(self.bytes as f64 / 1e6, self.elapsed)
    }
}

fn rate(amount: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

/// Receives what [`ingest`] reports while it runs. Both methods default to doing nothing.
pub trait IngestObserver: Send {
    /// An invalid line that will not be sent.
    fn rejected(&mut self, _reject: &Reject) {}
    /// Called about every [`IngestOptions::progress_interval`].
    fn progress(&mut self, _progress: &Progress) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl IngestObserver for NoObserver {}

/// The outcome of an [`ingest`] run. Serialises to the JSON summary the `hubsend` command prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IngestReport {
    /// Events the hub accepted.
    pub sent: u64,
    /// Invalid lines (not sent).
    pub rejected: u64,
    /// Valid records that were not stored: the hub refused their batch, the send failed, or
    /// the event is larger than the hub's maximum message size.
    pub failed: u64,
    /// Body bytes of the accepted events.
    pub bytes: u64,
    /// Wall-clock duration of the run.
    pub seconds: f64,
    /// `sent / seconds`.
    pub events_per_sec: f64,
    /// `bytes / 10^6 / seconds`.
    pub mb_per_sec: f64,
    /// Lines read (valid and invalid).
    pub records: u64,
    /// Batches sent (accepted or not).
    pub batches: u64,
    /// Distinct partition keys seen (partition-key routing only).
    pub partition_keys: u64,
    /// Median time from sending a batch to its outcome, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile of the same, in milliseconds.
    pub p99_ms: f64,
    /// Whether the run was stopped early (shutdown signal or a fatal error).
    pub interrupted: bool,
    /// The first error that made events fail, without secrets.
    pub error: Option<String>,
    /// The kind of that error, e.g. `unauthorized`.
    pub error_kind: Option<String>,
}

impl IngestReport {
    /// Whether every valid record read was accepted by the hub.
    pub fn all_sent(&self) -> bool {
        self.failed == 0 && self.error.is_none()
    }
}

struct Outcome {
    events: u64,
    bytes: u64,
    latency: Duration,
    result: crate::Result<()>,
}

struct State<'a> {
    producer: &'a Producer,
    options: &'a IngestOptions,
    observer: &'a mut dyn IngestObserver,
    started: Instant,
    last_progress: Instant,
    in_flight: JoinSet<Outcome>,
    latencies: Vec<Duration>,
    report: IngestReport,
    /// Open batches with their events' body bytes, by partition key ("" without keys).
    open: HashMap<String, (EventBatch, u64)>,
    /// Keys of open batches, oldest first.
    open_order: VecDeque<String>,
    keys: HashSet<String>,
    fatal: bool,
}

impl State<'_> {
    fn batch_options(&self, key: &str) -> BatchOptions {
        match &self.options.routing {
            Routing::RoundRobin => BatchOptions::new(),
            Routing::PartitionKeyField(_) => BatchOptions::new().partition_key(key),
            Routing::PartitionId(id) => BatchOptions::new().partition_id(id.clone()),
        }
    }

    fn note_error(&mut self, error: &Error) {
        if self.report.error.is_none() {
            self.report.error = Some(error.to_string());
            self.report.error_kind = Some(error.kind().to_string());
        }
        if matches!(
            error.kind(),
            ErrorKind::Unauthorized
                | ErrorKind::NotFound
                | ErrorKind::Closed
                | ErrorKind::InvalidConfig
                | ErrorKind::Connection
        ) {
            self.fatal = true;
        }
    }

    fn account(&mut self, outcome: Outcome) {
        self.latencies.push(outcome.latency);
        match outcome.result {
            Ok(()) => {
                self.report.sent += outcome.events;
                self.report.bytes += outcome.bytes;
            }
            Err(e) => {
                tracing::debug!(error = %e, events = outcome.events, "batch failed");
                self.report.failed += outcome.events;
                self.note_error(&e);
            }
        }
    }

    fn account_joined(&mut self, joined: Result<Outcome, tokio::task::JoinError>) {
        match joined {
            Ok(outcome) => self.account(outcome),
            Err(e) => {
                // The delivery task panicked or was cancelled; its events are unaccounted for.
                self.note_error(&Error::new(
                    ErrorKind::Closed,
                    format!("delivery task failed: {e}"),
                ));
            }
        }
    }

    fn reap(&mut self) {
        while let Some(joined) = self.in_flight.try_join_next() {
            self.account_joined(joined);
        }
    }

    fn maybe_progress(&mut self) {
        if self.last_progress.elapsed() >= self.options.progress_interval {
            self.last_progress = Instant::now();
            let snapshot = self.progress();
            self.observer.progress(&snapshot);
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            records: self.report.records,
            sent: self.report.sent,
            rejected: self.report.rejected,
            failed: self.report.failed,
            bytes: self.report.bytes,
            in_flight: self.in_flight.len(),
            retries: self.producer.stats().retried,
            elapsed: self.started.elapsed(),
        }
    }

    fn reject(&mut self, line: u64, raw: String, error: &RecordError) {
        self.report.rejected += 1;
        self.observer.rejected(&Reject {
            line,
            reason: error.to_string(),
            raw,
        });
    }

    /// Sends `batch` once a slot in the in-flight set is free.
    async fn dispatch(&mut self, batch: EventBatch, bytes: u64) {
        if batch.is_empty() {
            return;
        }
        self.reap();
        while self.in_flight.len() >= self.options.max_in_flight {
            if let Some(joined) = self.in_flight.join_next().await {
                self.account_joined(joined);
            }
        }
        let events = batch.len() as u64;
        self.report.batches += 1;
        let started = Instant::now();
        match self.producer.send_batch(batch).await {
            Ok(delivery) => {
                self.in_flight.spawn(async move {
                    let result = delivery.await;
                    Outcome {
                        events,
                        bytes,
                        latency: started.elapsed(),
                        result,
                    }
                });
            }
            Err(e) => {
                self.report.failed += events;
                self.note_error(&e);
            }
        }
    }

    async fn flush_key(&mut self, key: &str) {
        if let Some((batch, bytes)) = self.open.remove(key) {
            self.open_order.retain(|k| k != key);
            self.dispatch(batch, bytes).await;
        }
    }

    async fn flush_all(&mut self) {
        while let Some(key) = self.open_order.pop_front() {
            if let Some((batch, bytes)) = self.open.remove(&key) {
                self.dispatch(batch, bytes).await;
            }
        }
    }

    /// Opens a batch for `key`, sending the oldest open batch first when too many are open.
    async fn open_batch(&mut self, key: &str) -> bool {
        while self.open.len() >= self.options.max_open_batches {
            match self.open_order.pop_front() {
                Some(oldest) => {
                    if let Some((batch, bytes)) = self.open.remove(&oldest) {
                        self.dispatch(batch, bytes).await;
                    }
                }
                None => break,
            }
        }
        match self.producer.create_batch(self.batch_options(key)).await {
            Ok(batch) => {
                self.open.insert(key.to_owned(), (batch, 0));
                self.open_order.push_back(key.to_owned());
                true
            }
            Err(e) => {
                self.note_error(&e);
                false
            }
        }
    }

    /// Adds `event` (from input `line`, text `raw`) to its key's open batch.
    async fn add(&mut self, key: String, event: Event, line: u64, raw: &str) {
        let len = event.body().len() as u64;
        let mut event = event;
        let mut fresh = false;
        loop {
            if !self.open.contains_key(&key) {
                if !self.open_batch(&key).await {
                    self.report.failed += 1;
                    return;
                }
                fresh = true;
            }
            let Some((batch, bytes)) = self.open.get_mut(&key) else {
                return;
            };
            match batch.try_add(event) {
                Ok(()) => {
                    *bytes += len;
                    return;
                }
                Err(TryAddError::Full(back)) if !fresh => {
                    event = back;
                    self.flush_key(&key).await;
                }
                Err(e) => {
                    let limit = batch.max_size_in_bytes();
                    let back = e.into_event();
                    let error = Error::new(
                        ErrorKind::MessageTooLarge,
                        format!(
                            "an event with a {}-byte body does not fit the hub's {limit}-byte limit",
                            back.body().len()
                        ),
                    );
                    // Still a failed record (it was valid but cannot be stored), reported
                    // with its line like any refused one.
                    self.report.failed += 1;
                    self.observer.rejected(&Reject {
                        line,
                        reason: error.to_string(),
                        raw: preview(raw),
                    });
                    self.note_error(&error);
                    return;
                }
            }
        }
    }

    async fn record(&mut self, parsed: ParsedLine) {
        self.report.records += 1;
        let record = match parsed.result {
            Ok(record) => record,
            Err(e) => return self.reject(parsed.line, parsed.raw, &e),
        };
        let key = match &self.options.routing {
            Routing::PartitionKeyField(field) => match record.partition_key(field) {
                Ok(key) => {
                    if !self.keys.contains(&key) {
                        self.keys.insert(key.clone());
                    }
                    key
                }
                Err(e) => return self.reject(parsed.line, parsed.raw, &e),
            },
            _ => String::new(),
        };
        self.add(key, record.to_event(), parsed.line, &parsed.raw)
            .await;
    }
}

/// Streams parsed lines into the hub until the input ends, `shutdown` resolves, or a fatal
/// error (unauthorized, hub not found, connection lost) stops it; then sends the open batches,
/// waits for every outcome and reports.
///
/// Invalid lines are passed to `observer` and counted as `rejected`. Valid records become
/// [`Record::to_event`] events packed into batches filled to the hub's size limit; up to
/// [`IngestOptions::max_in_flight`] batches await their outcome at once. An input read error
/// stops reading and is reported in [`IngestReport::error`].
pub async fn ingest<S>(
    producer: &Producer,
    mut input: mpsc::Receiver<std::io::Result<ParsedLine>>,
    options: &IngestOptions,
    observer: &mut dyn IngestObserver,
    shutdown: S,
) -> IngestReport
where
    S: Future<Output = ()>,
{
    let now = Instant::now();
    let mut state = State {
        producer,
        options,
        observer,
        started: now,
        last_progress: now,
        in_flight: JoinSet::new(),
        latencies: Vec::new(),
        report: IngestReport::default(),
        open: HashMap::new(),
        open_order: VecDeque::new(),
        keys: HashSet::new(),
        fatal: false,
    };
    tokio::pin!(shutdown);
    let mut stopped = false;
    while !state.fatal {
        let next = tokio::select! {
            biased;
            _ = &mut shutdown, if !stopped => {
                stopped = true;
                None
            }
            item = tokio::time::timeout(options.linger, input.recv()) => Some(item),
        };
        match next {
            None => {
                state.report.interrupted = true;
                break;
            }
            Some(Err(_idle)) => state.flush_all().await,
            Some(Ok(None)) => break,
            Some(Ok(Some(Ok(parsed)))) => state.record(parsed).await,
            Some(Ok(Some(Err(io)))) => {
                state.report.interrupted = true;
                if state.report.error.is_none() {
                    state.report.error = Some(format!("reading the input failed: {io}"));
                    state.report.error_kind = Some("input".to_owned());
                }
                break;
            }
        }
        state.reap();
        state.maybe_progress();
    }
    drop(input);
    if state.fatal {
        state.report.interrupted = true;
        // Whatever is still open cannot be sent: count it as failed.
        let unsent: u64 = state.open.values().map(|(b, _)| b.len() as u64).sum();
        state.report.failed += unsent;
        state.open.clear();
        state.open_order.clear();
    } else {
        state.flush_all().await;
    }
    while let Some(joined) = state.in_flight.join_next().await {
        state.account_joined(joined);
        state.maybe_progress();
    }
    let final_progress = state.progress();
    state.observer.progress(&final_progress);

    let mut report = state.report;
    let elapsed = state.started.elapsed();
    report.seconds = elapsed.as_secs_f64();
    report.events_per_sec = rate(report.sent as f64, elapsed);
    report.mb_per_sec = rate(report.bytes as f64 / 1e6, elapsed);
    report.partition_keys = state.keys.len() as u64;
    let mut latencies = state.latencies;
    latencies.sort_unstable();
    report.p50_ms = percentile_ms(&latencies, 0.50);
    report.p99_ms = percentile_ms(&latencies, 0.99);
    report
}

/// The `q` quantile (0..=1, nearest rank) of sorted durations, in milliseconds; 0 when empty.
pub fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.saturating_sub(1).min(sorted.len() - 1);
    sorted[index].as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The record limit of the tests that do not test it: the default hub's message limit.
    const LIMIT: usize = 1024 * 1024;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn valid_ndjson_line_is_normalised_and_passes_fields_through() {
        let r = parse_ndjson_line(
            r#"{"sensor_id":"c-7:vibe","timestamp":"2025-08-19T10:30:00.250+02:00","value":42.5,"unit":"mm/s","tags":{"a":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(r.sensor_id(), "c-7:vibe");
        assert_eq!(format_timestamp(&r.timestamp()), "2025-08-19T08:30:00.250Z");
        let body: Value = serde_json::from_slice(&r.to_json_bytes()).unwrap();
        assert_eq!(
            body,
            json!({"sensor_id":"c-7:vibe","timestamp":"2025-08-19T08:30:00.250Z","value":42.5,"unit":"mm/s","tags":{"a":[1,2]}})
        );
        let event = r.to_event();
        assert_eq!(event.content_type(), Some("application/json"));
        assert_eq!(event.body(), r.to_json_bytes().as_slice());
    }

    #[test]
    fn string_values_and_utc_timestamps_are_kept() {
        let r = parse_ndjson_line(
            r#"{"sensor_id":"p","timestamp":"2025-01-01T00:00:00Z","value":"Running"}"#,
        )
        .unwrap();
        assert_eq!(r.value(), &json!("Running"));
        assert_eq!(r.as_json()["timestamp"], "2025-01-01T00:00:00Z");
        // Lower-case separators and offsets are RFC 3339 too.
        let r = parse_ndjson_line(
            r#"{"sensor_id":"p","timestamp":"2025-01-01t01:00:00-00:30","value":-1}"#,
        )
        .unwrap();
        assert_eq!(r.as_json()["timestamp"], "2025-01-01T01:30:00Z");
        assert_eq!(r.value(), &json!(-1));
    }

    #[test]
    fn each_rule_names_its_reason() {
        let cases = [
            ("", "not a JSON object: "),
            ("garbage", "not a JSON object: expected value"),
            ("[1,2]", "not a JSON object: found an array"),
            ("42", "not a JSON object: found a number"),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00Z""#,
                "not a JSON object: EOF",
            ),
            (
                r#"{"timestamp":"2025-01-01T00:00:00Z","value":1}"#,
                "missing field `sensor_id`",
            ),
            (
                r#"{"sensor_id":null,"timestamp":"2025-01-01T00:00:00Z","value":1}"#,
                "missing field `sensor_id`",
            ),
            (
                r#"{"sensor_id":"","timestamp":"2025-01-01T00:00:00Z","value":1}"#,
                "`sensor_id` must be a non-empty string",
            ),
            (
                r#"{"sensor_id":7,"timestamp":"2025-01-01T00:00:00Z","value":1}"#,
                "`sensor_id` must be a non-empty string",
            ),
            (
                r#"{"sensor_id":"a","value":1}"#,
                "missing field `timestamp`",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"yesterday","value":1}"#,
                "`timestamp` is not RFC 3339: ",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01 00:00:00","value":1}"#,
                "`timestamp` is not RFC 3339: ",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00","value":1}"#,
                "`timestamp` is not RFC 3339: ",
            ),
            (
                r#"{"sensor_id":"a","timestamp":1700000000,"value":1}"#,
                "`timestamp` is not RFC 3339: expected a string, found a number",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00Z"}"#,
                "missing field `value`",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00Z","value":null}"#,
                "missing field `value`",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00Z","value":true}"#,
                "`value` must be a number or a string",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00Z","value":[1]}"#,
                "`value` must be a number or a string",
            ),
            (
                r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00Z","value":{"v":1}}"#,
                "`value` must be a number or a string",
            ),
        ];
        for (line, reason) in cases {
            let err = parse_ndjson_line(line).expect_err(line);
            let text = err.to_string();
            assert!(
                text.starts_with(reason),
                "{line}: got `{text}`, want `{reason}…`"
            );
        }
        let err = parse_ndjson_line(r#"{"sensor_id":"a","timestamp":"yesterday","value":1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("`yesterday`"), "{err}");
    }

    #[test]
    fn from_object_checks_fields_in_order() {
        let err = Record::from_object(obj(json!({"value": true}))).unwrap_err();
        assert_eq!(err, RecordError::MissingField("sensor_id"));
        let err = Record::from_object(obj(json!({"sensor_id": "a", "value": true}))).unwrap_err();
        assert_eq!(err, RecordError::MissingField("timestamp"));
    }

    #[test]
    fn partition_keys_take_the_string_form() {
        let r = parse_ndjson_line(
            r#"{"sensor_id":"s1","timestamp":"2025-01-01T00:00:00Z","value":1,"line":7,"on":true,"f":2.5,"o":{},"n":null}"#,
        )
        .unwrap();
        assert_eq!(r.partition_key("sensor_id").unwrap(), "s1");
        assert_eq!(r.partition_key("line").unwrap(), "7");
        assert_eq!(r.partition_key("on").unwrap(), "true");
        assert_eq!(r.partition_key("f").unwrap(), "2.5");
        assert_eq!(
            r.partition_key("timestamp").unwrap(),
            "2025-01-01T00:00:00Z"
        );
        assert_eq!(
            r.partition_key("o").unwrap_err().to_string(),
            "partition key field `o` must be a string, number or boolean"
        );
        assert_eq!(
            r.partition_key("n").unwrap_err().to_string(),
            "missing partition key field `n`"
        );
        assert_eq!(
            r.partition_key("zz").unwrap_err(),
            RecordError::MissingPartitionKey("zz".into())
        );
    }

    #[test]
    fn ndjson_reader_numbers_lines_skips_blanks_and_flags_bad_utf8() {
        let input: &[u8] = b"{\"sensor_id\":\"a\",\"timestamp\":\"2025-01-01T00:00:00Z\",\"value\":1}\r\n\n   \nbad\n\xff\xfe\n{\"sensor_id\":\"b\",\"timestamp\":\"2025-01-01T00:00:00Z\",\"value\":\"x\"}";
        let lines: Vec<ParsedLine> = NdjsonRecords::new(input, LIMIT)
            .map(Result::unwrap)
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].line, 1);
        assert!(lines[0].result.is_ok());
        assert!(!lines[0].raw.ends_with('\r'));
        assert_eq!(lines[1].line, 4);
        assert_eq!(lines[1].raw, "bad");
        assert!(lines[1]
            .result
            .as_ref()
            .unwrap_err()
            .to_string()
            .starts_with("not a JSON object"));
        assert_eq!(lines[2].line, 5);
        assert_eq!(lines[2].result.as_ref().unwrap_err(), &RecordError::NotUtf8);
        assert_eq!(lines[3].line, 6);
        assert_eq!(lines[3].result.as_ref().unwrap().sensor_id(), "b");
    }

    #[test]
    fn an_over_long_ndjson_line_is_refused_with_its_number_and_reading_goes_on() {
        let good = r#"{"sensor_id":"a","timestamp":"2025-01-01T00:00:00Z","value":1}"#;
        let long = format!(r#"{{"sensor_id":"b","pad":"{}"}}"#, "x".repeat(5000));
        let input = format!("{good}\n{long}\r\n{good}\n{long}");
        // A reader that hands out small chunks, so the skip crosses many buffer refills.
        let reader = BufReader::with_capacity(64, input.as_bytes());
        let lines: Vec<ParsedLine> = NdjsonRecords::new(reader, 1000)
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            lines.iter().map(|l| l.line).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        for long_line in [&lines[1], &lines[3]] {
            assert_eq!(
                long_line.result.as_ref().err(),
                Some(&RecordError::TooLong(1000))
            );
            assert!(long_line.raw.starts_with(r#"{"sensor_id":"b""#));
            assert!(long_line.raw.chars().count() <= RAW_PREVIEW_CHARS + 1);
        }
        assert!(lines[0].result.is_ok() && lines[2].result.is_ok());
        assert_eq!(
            lines[1].result.as_ref().unwrap_err().to_string(),
            "longer than the 1000-byte record limit (skipped)"
        );
        // Exactly at the limit is fine, with or without CR LF.
        let at_limit = format!(
            r#"{{"sensor_id":"c","timestamp":"2025-01-01T00:00:00Z","value":"{}"}}"#,
            "v".repeat(100)
        );
        let limit = at_limit.len();
        let input = format!("{at_limit}\r\n{at_limit}");
        let lines: Vec<ParsedLine> = NdjsonRecords::new(input.as_bytes(), limit)
            .map(Result::unwrap)
            .collect();
        assert!(lines.iter().all(|l| l.result.is_ok()), "{lines:?}");
        let lines: Vec<ParsedLine> = NdjsonRecords::new(input.as_bytes(), limit - 1)
            .map(Result::unwrap)
            .collect();
        assert!(lines
            .iter()
            .all(|l| l.result.as_ref().err() == Some(&RecordError::TooLong(limit - 1))));
    }

    #[test]
    fn an_over_long_csv_row_is_refused_with_its_line_and_the_next_rows_read() {
        let long = "y".repeat(3000);
        let csv = format!(
            "sensor_id,timestamp,value,note\n\
             a,2025-01-01T00:00:00Z,1,x\n\
             b,2025-01-01T00:00:00Z,2,\"{long}\n{long}\"\n\
             c,2025-01-01T00:00:00Z,3,{long}\n\
             d,2025-01-01T00:00:00Z,4,{}\n\
             e,2025-01-01T00:00:00Z,5,z\n",
            ",".repeat(2000)
        );
        let rows: Vec<ParsedLine> = CsvRecords::new(csv.as_bytes(), 1000)
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            rows.iter().map(|r| r.line).collect::<Vec<_>>(),
            [2, 3, 5, 6, 7]
        );
        for long_row in &rows[1..4] {
            assert_eq!(
                long_row.result.as_ref().unwrap_err(),
                &RecordError::TooLong(1000)
            );
            assert!(long_row.raw.chars().count() <= RAW_PREVIEW_CHARS + 1);
        }
        assert_eq!(rows[0].result.as_ref().unwrap().sensor_id(), "a");
        assert_eq!(rows[4].result.as_ref().unwrap().sensor_id(), "e");
    }

    #[test]
    fn an_unterminated_csv_quote_at_the_end_is_an_error_naming_its_line() {
        let csv = "sensor_id,timestamp,value,note\n\
                   a,2025-01-01T00:00:00Z,1,\"fine\nover two lines\"\n\
                   b,2025-01-01T00:00:00Z,2,x\n\
                   c,2025-01-01T00:00:00Z,3,\"never\nclosed\n\
                   d,2025-01-01T00:00:00Z,4,y\n";
        let rows: Vec<ParsedLine> = CsvRecords::new(csv.as_bytes(), LIMIT)
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(
            rows[0].result.as_ref().unwrap().as_json()["note"],
            "fine\nover two lines"
        );
        assert_eq!(rows[1].result.as_ref().unwrap().sensor_id(), "b");
        assert_eq!(rows[2].line, 5);
        assert_eq!(
            rows[2].result.as_ref().unwrap_err(),
            &RecordError::UnterminatedQuote(5)
        );
        assert_eq!(
            rows[2].result.as_ref().unwrap_err().to_string(),
            "malformed CSV: the quoted field opened on line 5 is never closed"
        );
        // A quote opened in a later line of a multi-line row is named by its own line.
        let csv = "h1,h2\n\"one\ntwo\",\"three\nfour";
        let rows: Vec<ParsedLine> = CsvRecords::new(csv.as_bytes(), LIMIT)
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].line, 2);
        assert_eq!(
            rows[0].result.as_ref().unwrap_err(),
            &RecordError::UnterminatedQuote(3)
        );
        // An unterminated quote longer than the limit is still reported as unterminated.
        let csv = format!("h\n\"{}", "z\n".repeat(5000));
        let rows: Vec<ParsedLine> = CsvRecords::new(csv.as_bytes(), 100)
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].result.as_ref().unwrap_err(),
            &RecordError::UnterminatedQuote(2)
        );
    }

    #[test]
    fn bom_is_ignored() {
        let r = parse_ndjson_line(
            "\u{feff}{\"sensor_id\":\"a\",\"timestamp\":\"2025-01-01T00:00:00Z\",\"value\":1}",
        );
        assert!(r.is_ok());
        let csv = "\u{feff}sensor_id,timestamp,value\na,2025-01-01T00:00:00Z,1\n";
        let rows: Vec<ParsedLine> = CsvRecords::new(csv.as_bytes(), LIMIT)
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows[0].result.as_ref().unwrap().sensor_id(), "a");
    }

    #[test]
    fn csv_values_become_numbers_when_finite() {
        let h = ["sensor_id", "timestamp", "value", "unit"];
        let row = |v: &str| parse_csv_row(&h, &["s", "2025-01-01T02:00:00+02:00", v, "C"]);
        assert_eq!(row("42").unwrap().value(), &json!(42));
        assert_eq!(row("-3").unwrap().value(), &json!(-3));
        assert_eq!(
            row("18446744073709551615").unwrap().value(),
            &json!(u64::MAX)
        );
        assert_eq!(row("21.5").unwrap().value(), &json!(21.5));
        assert_eq!(row(" 1e3 ").unwrap().value(), &json!(1000.0));
        assert_eq!(row("Running").unwrap().value(), &json!("Running"));
        assert_eq!(row("NaN").unwrap().value(), &json!("NaN"));
        assert_eq!(row("inf").unwrap().value(), &json!("inf"));
        assert_eq!(row("1e999").unwrap().value(), &json!("1e999"));
        assert_eq!(row("").unwrap_err(), RecordError::EmptyValue);
        let r = row("7").unwrap();
        assert_eq!(r.as_json()["unit"], "C");
        assert_eq!(r.as_json()["timestamp"], "2025-01-01T00:00:00Z");
        // Other columns stay strings even when they look numeric.
        let r = parse_csv_row(
            &["sensor_id", "timestamp", "value", "line"],
            &["s", "2025-01-01T00:00:00Z", "1", "12"],
        )
        .unwrap();
        assert_eq!(r.as_json()["line"], "12");
    }

    #[test]
    fn csv_rows_are_validated() {
        let h = ["sensor_id", "timestamp", "value"];
        assert_eq!(
            parse_csv_row(&h, &["", "2025-01-01T00:00:00Z", "1"]).unwrap_err(),
            RecordError::InvalidSensorId
        );
        assert!(matches!(
            parse_csv_row(&h, &["a", "soon", "1"]).unwrap_err(),
            RecordError::InvalidTimestamp(_)
        ));
        assert_eq!(
            parse_csv_row(&h, &["a", "2025-01-01T00:00:00Z"])
                .unwrap_err()
                .to_string(),
            "malformed CSV: the row has 2 fields but the header has 3"
        );
        assert_eq!(
            parse_csv_row(&["sensor_id", "value"], &["a", "1"]).unwrap_err(),
            RecordError::MissingField("timestamp")
        );
    }

    #[test]
    fn csv_reader_reports_line_numbers_and_raw_rows() {
        let csv = "sensor_id,timestamp,value,note\n\
                   a,2025-01-01T00:00:00Z,1.5,\"hello, world\"\n\
                   \n\
                   b,not-a-time,2,x\n\
                   c,2025-01-01T00:00:00Z,3\n\
                   d,2025-01-01T00:00:00Z,Idle,\"two\nlines\"\n\
                   e,2025-01-01T00:00:00Z,4,z\n";
        let rows: Vec<ParsedLine> = CsvRecords::new(csv.as_bytes(), LIMIT)
            .map(Result::unwrap)
            .collect();
        let lines: Vec<u64> = rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 4, 5, 6, 8]);
        assert_eq!(
            rows[0].result.as_ref().unwrap().as_json()["note"],
            "hello, world"
        );
        assert_eq!(rows[0].raw, "a,2025-01-01T00:00:00Z,1.5,\"hello, world\"");
        assert!(rows[1].result.is_err());
        assert_eq!(rows[1].raw, "b,not-a-time,2,x");
        assert!(rows[2]
            .result
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("3 fields"));
        assert_eq!(
            rows[3].result.as_ref().unwrap().as_json()["note"],
            "two\nlines"
        );
        assert_eq!(rows[3].result.as_ref().unwrap().value(), &json!("Idle"));
        assert_eq!(rows[4].result.as_ref().unwrap().sensor_id(), "e");
    }

    #[test]
    fn csv_reader_handles_crlf_and_a_missing_final_newline() {
        let csv =
            "sensor_id,timestamp,value\r\na,2025-01-01T00:00:00Z,1\r\n\r\nb,2025-01-01T00:00:00Z,x";
        let rows: Vec<ParsedLine> = CsvRecords::new(csv.as_bytes(), LIMIT)
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(rows[1].result.as_ref().unwrap().value(), &json!("x"));
        assert_eq!(rows[0].result.as_ref().unwrap().value(), &json!(1));
    }

    #[test]
    fn crlf_becomes_lf_across_buffer_boundaries() {
        struct Dribble(Vec<u8>, usize);
        impl Read for Dribble {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                // One byte at a time, so every CR sits at a boundary.
                if self.1 == self.0.len() || out.is_empty() {
                    return Ok(0);
                }
                out[0] = self.0[self.1];
                self.1 += 1;
                Ok(1)
            }
        }
        for chunked in [false, true] {
            let input = b"a\r\nb\rc\r\r\nd\r".to_vec();
            let mut out = Vec::new();
            if chunked {
                CrlfToLf::new(Dribble(input, 0))
                    .read_to_end(&mut out)
                    .unwrap();
            } else {
                CrlfToLf::new(&input[..]).read_to_end(&mut out).unwrap();
            }
            assert_eq!(out, b"a\nb\rc\r\nd\r", "chunked {chunked}");
        }
    }

    #[test]
    fn csv_reader_handles_empty_and_header_only_input() {
        assert_eq!(CsvRecords::new(&b""[..], LIMIT).count(), 0);
        assert_eq!(
            CsvRecords::new(&b"sensor_id,timestamp,value\n"[..], LIMIT).count(),
            0
        );
    }

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
    fn synthetic_records_have_the_requested_size() {
        for size in [0usize, 64, 200, 1024, 4096] {
            let r = synthetic_record(123, size, 10);
            assert_eq!(r.sensor_id(), "sensor-3");
            let len = r.to_json_bytes().len();
            if size > 100 {
                assert_eq!(len, size, "size {size}");
            }
            let again = Record::from_object(r.as_json().clone()).unwrap();
            assert_eq!(again.as_json(), r.as_json());
        }
        assert_eq!(synthetic_record(5, 0, 0).sensor_id(), "sensor-5");
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&d, 0.5), 50.0);
        assert_eq!(percentile_ms(&d, 0.99), 99.0);
        assert_eq!(percentile_ms(&d, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
        assert_eq!(percentile_ms(&d[..1], 0.99), 1.0);
    }

    mod streaming {
        use super::super::*;
        use super::LIMIT;
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
                LIMIT,
            );
            let mut observer = Collect::default();
            let options = IngestOptions::new()
                .routing(Routing::PartitionKeyField(SENSOR_ID.into()))
                .max_in_flight(2)
                .max_open_batches(2);
            let report = ingest(
                &producer,
                input,
                &options,
                &mut observer,
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
                tx.send(Ok(ParsedLine {
                    line: i + 1,
                    raw: String::new(),
                    result: Ok(record),
                }))
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
                LIMIT,
            );
            let report = ingest(
                &producer,
                input,
                &IngestOptions::new(),
                &mut NoObserver,
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
                tx.send(Ok(ParsedLine {
                    line: i as u64 + 1,
                    raw: String::new(),
                    result: Ok(record),
                }))
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
