//! The telemetry schema: what makes a JSON object a [`Record`], and why a line is refused.
//!
//! Every record is a JSON object that carries `sensor_id` (a non-empty string), `timestamp`
//! (RFC 3339; normalised to UTC, `…Z`) and `value` (a number or a string such as `"Running"`).
//! Any other field passes through unchanged. A line that breaks these rules becomes a
//! [`RecordError`] naming the reason; it is never sent.

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use chrono::{DateTime, SecondsFormat, Utc};
use hubsend::Event;
use serde_json::{Map, Number, Value};

use super::scan::{self, Scanned};

/// The field naming the sensor.
pub(crate) const SENSOR_ID: &str = "sensor_id";
/// The field holding the reading's time.
pub(crate) const TIMESTAMP: &str = "timestamp";
/// The field holding the reading.
pub(crate) const VALUE: &str = "value";

/// Why a line was not turned into a [`Record`]. The `Display` text is the reason shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum RecordError {
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

/// Which records `hubsend send` accepts (`--schema`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Schema {
    /// The telemetry schema: `sensor_id`, `timestamp`, `value` (see the module docs).
    #[default]
    Telemetry,
    /// Any JSON object (NDJSON: sent byte for byte as the line holds it; CSV: the row as an
    /// object of header name to cell text).
    None,
}

/// A record to send: under [`Schema::Telemetry`] a validated JSON object with `sensor_id`, a
/// UTC `timestamp` and `value`, plus any other fields unchanged; under [`Schema::None`] any
/// JSON object.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// The object; for a line taken as it stands (see [`scan`](super::scan)) it is parsed
    /// from `body` only when something asks for it (a partition key field other than
    /// `sensor_id`), which gives the same object the full parse would have built.
    object: OnceLock<Map<String, Value>>,
    /// `None` under [`Schema::None`].
    timestamp: Option<DateTime<Utc>>,
    /// The event body as read, when it is one: under [`Schema::None`] an NDJSON line, and
    /// under the telemetry schema an NDJSON line that needed no normalisation (its own bytes
    /// are sent, not re-serialised: field order, spacing and number spelling as written).
    body: Option<String>,
    /// Where `sensor_id`'s text lies in `body`, when the line was taken as it stands and the
    /// id holds no escapes.
    sensor_id_span: Option<Range<usize>>,
}

impl PartialEq for Record {
    fn eq(&self, other: &Record) -> bool {
        self.timestamp == other.timestamp
            && self.body == other.body
            && self.object() == other.object()
    }
}

impl Record {
    /// Validates a JSON object and normalises its `timestamp` to UTC.
    ///
    /// # Errors
    /// The first rule the object breaks, checked in the order `sensor_id`, `timestamp`, `value`.
    pub(crate) fn from_object(object: Map<String, Value>) -> Result<Record, RecordError> {
        Record::checked(object).map(|(record, _)| record)
    }

    /// [`from_object`](Self::from_object), also telling whether the object was left as it
    /// was (its `timestamp` already normal).
    fn checked(mut object: Map<String, Value>) -> Result<(Record, bool), RecordError> {
        let normalised: String;
        let already_normal: bool;
        match object.get(SENSOR_ID) {
            None | Some(Value::Null) => return Err(RecordError::MissingField(SENSOR_ID)),
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(_) => return Err(RecordError::InvalidSensorId),
        }
        let timestamp = match object.get(TIMESTAMP) {
            None | Some(Value::Null) => return Err(RecordError::MissingField(TIMESTAMP)),
            Some(Value::String(s)) => {
                let timestamp = parse_timestamp(s)?;
                normalised = format_timestamp(&timestamp);
                already_normal = normalised == *s;
                timestamp
            }
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
        if !already_normal {
            object.insert(TIMESTAMP.to_owned(), Value::String(normalised));
        }
        let record = Record {
            object: OnceLock::from(object),
            timestamp: Some(timestamp),
            body: None,
            sensor_id_span: None,
        };
        Ok((record, already_normal))
    }

    /// A record of any JSON object (`--schema none`); `body`, when given, is sent instead of
    /// the object's encoding (the NDJSON line as read).
    pub(crate) fn unchecked(object: Map<String, Value>, body: Option<String>) -> Record {
        Record {
            object: OnceLock::from(object),
            timestamp: None,
            body,
            sensor_id_span: None,
        }
    }

    /// Validates `object` under `schema`.
    ///
    /// # Errors
    /// Under [`Schema::Telemetry`], as [`Record::from_object`]; never under [`Schema::None`].
    pub(crate) fn with_schema(
        object: Map<String, Value>,
        schema: Schema,
    ) -> Result<Record, RecordError> {
        match schema {
            Schema::Telemetry => Record::from_object(object),
            Schema::None => Ok(Record::unchecked(object, None)),
        }
    }

    /// Builds a record from its three required fields.
    pub(crate) fn new(
        sensor_id: impl Into<String>,
        timestamp: DateTime<Utc>,
        value: Value,
    ) -> Record {
        let mut object = Map::new();
        object.insert(SENSOR_ID.to_owned(), Value::String(sensor_id.into()));
        object.insert(
            TIMESTAMP.to_owned(),
            Value::String(format_timestamp(&timestamp)),
        );
        object.insert(VALUE.to_owned(), value);
        Record {
            object: OnceLock::from(object),
            timestamp: Some(timestamp),
            body: None,
            sensor_id_span: None,
        }
    }

    /// Adds or replaces a pass-through field (not one of the three required ones).
    pub(crate) fn with_field(mut self, name: impl Into<String>, value: Value) -> Record {
        let name = name.into();
        if name != SENSOR_ID && name != TIMESTAMP && name != VALUE {
            self.object_mut().insert(name, value);
        }
        self
    }

    /// The sensor id.
    #[cfg(test)]
    pub(crate) fn sensor_id(&self) -> &str {
        self.object()
            .get(SENSOR_ID)
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The reading's time, in UTC.
    #[cfg(test)]
    pub(crate) fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp.unwrap_or_default()
    }

    /// The reading: a JSON number or string.
    #[cfg(test)]
    pub(crate) fn value(&self) -> &Value {
        self.object().get(VALUE).unwrap_or(&Value::Null)
    }

    /// The whole record as a JSON object, `timestamp` already normalised.
    #[cfg(test)]
    pub(crate) fn as_json(&self) -> &Map<String, Value> {
        self.object()
    }

    /// A record of a line taken as it stands: `line` is the body, the object is parsed from it
    /// when asked for.
    fn from_line(line: &str, scanned: Scanned) -> Record {
        Record {
            object: OnceLock::new(),
            timestamp: scanned.timestamp,
            body: Some(line.to_owned()),
            sensor_id_span: scanned.sensor_id,
        }
    }

    /// The line this record's body was read from, when the body is an NDJSON line as it
    /// stands (without a byte-order mark); `None` when the body is the record's encoding.
    pub(crate) fn line_text(&self) -> Option<&str> {
        self.body.as_deref()
    }

    /// The object, parsed from the body the first time for a line taken as it stands.
    fn object(&self) -> &Map<String, Value> {
        self.object.get_or_init(|| {
            // The body is a JSON object the scan accepted, so this parse succeeds.
            match self.body.as_deref().map(serde_json::from_str::<Value>) {
                Some(Ok(Value::Object(object))) => object,
                _ => Map::new(),
            }
        })
    }

    fn object_mut(&mut self) -> &mut Map<String, Value> {
        self.object();
        // Initialised just above.
        self.object.get_mut().expect("the object is initialised")
    }

    /// The record's JSON encoding: the event body.
    pub(crate) fn to_json_bytes(&self) -> Vec<u8> {
        if let Some(body) = &self.body {
            return body.clone().into_bytes();
        }
        // Serialising a map of JSON values cannot fail.
        serde_json::to_vec(self.object()).unwrap_or_default()
    }

    /// The record as an event: its JSON encoding with content type `application/json`.
    pub(crate) fn to_event(&self) -> Event {
        Event::new(self.to_json_bytes()).with_content_type("application/json")
    }

    /// [`to_event`](Self::to_event), moving a body read from the input into the event
    /// instead of copying it.
    pub(crate) fn into_event(self) -> Event {
        let body = match self.body {
            Some(body) => body.into_bytes(),
            None => serde_json::to_vec(self.object()).unwrap_or_default(),
        };
        Event::new(body).with_content_type("application/json")
    }

    /// The partition key for this record: the string form of `field`'s value (strings as they
    /// are, numbers and booleans as JSON writes them).
    ///
    /// # Errors
    /// [`RecordError::MissingPartitionKey`] when the field is absent or `null`,
    /// [`RecordError::InvalidPartitionKey`] when it is an object or array.
    pub(crate) fn partition_key(&self, field: &str) -> Result<String, RecordError> {
        if field == SENSOR_ID {
            if let (Some(span), Some(body)) = (&self.sensor_id_span, &self.body) {
                if let Some(id) = body.get(span.clone()) {
                    return Ok(id.to_owned());
                }
            }
        }
        match self.object().get(field) {
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
pub(crate) fn format_timestamp(timestamp: &DateTime<Utc>) -> String {
    timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub(crate) fn truncate(text: &str, max_chars: usize) -> String {
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
#[cfg(test)]
pub(crate) fn parse_ndjson_line(line: &str) -> Result<Record, RecordError> {
    parse_ndjson_line_as(line, Schema::Telemetry)
}

/// Parses one NDJSON line under `schema`: any JSON object passes [`Schema::None`], and its
/// event body is the line itself; under the telemetry schema the line is the body too when it
/// needed no normalisation (a byte-order mark is never part of it).
///
/// # Errors
/// [`RecordError::NotAnObject`] for anything that is not a JSON object, otherwise as
/// [`Record::with_schema`].
pub(crate) fn parse_ndjson_line_as(line: &str, schema: Schema) -> Result<Record, RecordError> {
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    let scanned = match schema {
        Schema::Telemetry => scan::telemetry(line),
        Schema::None => scan::object(line),
    };
    match scanned {
        Some(scanned) => Ok(Record::from_line(line, scanned)),
        None => parse_ndjson_line_full(line, schema),
    }
}

/// [`parse_ndjson_line_as`] with a [`Value`] built for every line (`line` without a
/// byte-order mark): the path for the lines the scan leaves to it, which names every reason and
/// normalises.
fn parse_ndjson_line_full(line: &str, schema: Schema) -> Result<Record, RecordError> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) if schema == Schema::None => {
            Ok(Record::unchecked(object, Some(line.to_owned())))
        }
        Ok(Value::Object(object)) => {
            let (mut record, unchanged) = Record::checked(object)?;
            if unchanged {
                record.body = Some(line.to_owned());
            }
            Ok(record)
        }
        Ok(other) => Err(RecordError::NotAnObject(format!(
            "found {}",
            json_type(&other)
        ))),
        Err(e) => Err(RecordError::NotAnObject(e.to_string())),
    }
}

/// A synthetic telemetry record for benchmarks: sensor `sensor-{i % cardinality}` (or
/// `sensor-{i}` when `cardinality` is 0), the current time, a numeric value, and a `payload`
/// padding field sized so the JSON body is about `payload_bytes` long.
pub(crate) fn synthetic_record(i: u64, payload_bytes: usize, cardinality: u64) -> Record {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    /// Lines that probe every difference a borrowing scan could have from building a `Value`.
    fn tricky_lines() -> Vec<String> {
        let ts = "2025-08-19T08:30:00.250Z";
        let mut lines: Vec<String> = [
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00.250Z","value":1}"#,
            r#"{ "value" : 1.50 , "timestamp":"2025-08-19T08:30:00.250Z", "sensor_id":"a" }"#,
            "\t{\"sensor_id\":\"a\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":2}  ",
            r#"{"sensor_id":"a\"b\\c\u00e9\ud83d\ude00","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"é☃😀","timestamp":"2025-08-19T08:30:00Z","value":"Running"}"#,
            r#"{"sensor\u005fid":"a","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025\u002d08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":"\ud800"}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":"\x"}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1e3}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":-0}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":-0.0}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":123456789012345678901234567890}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1e400}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1,"x":1e400}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1,"x":[1,{"y":-1e999}]}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":01}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1.}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":NaN}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":""}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":true}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":null}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":[1]}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":{}}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z"}"#,
            r#"{"sensor_id":"","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":7,"timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":null,"timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T10:30:00+02:00","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19t08:30:00z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00.000Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00.250000Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00+00:00","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:60Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-02-30T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19 08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"yesterday","value":1}"#,
            r#"{"sensor_id":"a","timestamp":1700000000,"value":1}"#,
            r#"{"sensor_id":"a","timestamp":null,"value":1}"#,
            r#"{"sensor_id":"a","sensor_id":"b","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","sensor_id":"","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":7,"sensor_id":"b","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"x","timestamp":"2025-08-19T08:30:00Z","value":1}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1,"value":true}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1,"u":1,"u":"x"}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1,"unit":"mm/s","tags":{"a":[1,2,null,true,false,"s"]}}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1,}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1} x"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1}{}"#,
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1"#,
            "{\"sensor_id\":\"a\tb\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":1}",
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00Z","value":1,"on":true,"n":null,"f":2.50,"i":-7}"#,
            "{}",
            "[]",
            "[1,2]",
            "42",
            "\"s\"",
            "null",
            "",
            "garbage",
            "\u{feff}{\"sensor_id\":\"a\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":1}",
            "\u{feff}\u{feff}{\"sensor_id\":\"a\",\"timestamp\":\"2025-08-19T08:30:00Z\",\"value\":1}",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        // Nesting at and past the parser's recursion limit, in an extra field.
        for depth in [126, 127, 128, 200] {
            lines.push(format!(
                r#"{{"sensor_id":"a","timestamp":"{ts}","value":1,"deep":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            ));
        }
        lines
    }

    #[test]
    fn the_scan_accepts_refuses_and_sends_exactly_what_the_full_parse_does() {
        let fields = [
            SENSOR_ID, TIMESTAMP, VALUE, "x", "u", "unit", "on", "n", "f", "i", "tags",
        ];
        let mut scanned = 0;
        for line in tricky_lines() {
            for schema in [Schema::Telemetry, Schema::None] {
                let fast = parse_ndjson_line_as(&line, schema);
                let stripped = line.strip_prefix('\u{feff}').unwrap_or(&line);
                let full = parse_ndjson_line_full(stripped, schema);
                assert_eq!(fast, full, "{schema:?} {line}");
                let (Ok(fast), Ok(full)) = (fast, full) else {
                    continue;
                };
                assert_eq!(fast.body, full.body, "{schema:?} {line}");
                assert_eq!(fast.to_event().body(), full.to_event().body(), "{line}");
                assert_eq!(fast.clone().into_event().body(), full.to_event().body());
                for field in fields {
                    assert_eq!(
                        fast.partition_key(field),
                        full.partition_key(field),
                        "{schema:?} {field} {line}"
                    );
                }
                if fast.object.get().is_none() || fast.sensor_id_span.is_some() {
                    scanned += 1;
                }
            }
        }
        // The scan did take lines as they stand (this is not a comparison of the full parse
        // with itself).
        assert!(scanned >= 15, "{scanned}");
        let canonical = r#"{"sensor_id":"s-1","timestamp":"2025-08-19T08:30:00Z","value":1}"#;
        let scan = scan::telemetry(canonical).unwrap();
        assert_eq!(&canonical[scan.sensor_id.unwrap()], "s-1");
        assert!(scan::telemetry(
            r#"{"sensor_id":"a","timestamp":"2025-08-19T08:30:00+00:00","value":1}"#
        )
        .is_none());
    }

    #[test]
    fn a_line_needing_no_normalisation_is_sent_as_its_own_bytes() {
        // Spacing, field order and number spelling as written: not what serde_json writes.
        let line =
            r#"{ "value": 1.50, "timestamp": "2025-08-19T08:30:00.250Z", "sensor_id": "a" }"#;
        let r = parse_ndjson_line(line).unwrap();
        let event = r.to_event();
        assert_eq!(event.body(), line.as_bytes());
        assert_eq!(event.content_type(), Some("application/json"));
        let reserialised = serde_json::to_vec(r.as_json()).unwrap();
        assert_ne!(reserialised, line.as_bytes());
        // A timestamp to normalise: the re-serialised record, as before.
        let offset = r#"{"sensor_id":"a","timestamp":"2025-08-19T10:30:00.250+02:00","value":1}"#;
        let r = parse_ndjson_line(offset).unwrap();
        assert_eq!(
            r.to_event().body(),
            serde_json::to_vec(r.as_json()).unwrap()
        );
        let body: Value = serde_json::from_slice(r.to_event().body()).unwrap();
        assert_eq!(body["timestamp"], "2025-08-19T08:30:00.250Z");
        // A byte-order mark is not part of the body.
        let bom = format!("\u{feff}{line}");
        let r = parse_ndjson_line(&bom).unwrap();
        assert_eq!(r.to_event().body(), line.as_bytes());
        // CSV rows are never sent as their text (it is not JSON).
        let csv = Record::from_object(obj(
            json!({"sensor_id": "a", "timestamp": "2025-08-19T08:30:00Z", "value": 1}),
        ))
        .unwrap();
        assert_eq!(
            csv.to_event().body(),
            serde_json::to_vec(csv.as_json()).unwrap()
        );
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
}
