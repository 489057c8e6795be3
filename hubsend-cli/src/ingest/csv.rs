//! CSV input: a header row naming the fields, then one record per row, each row bounded by the
//! record limit.

use std::io::{BufRead, BufReader, Read};

use serde_json::{Map, Number, Value};

use super::record::{Record, RecordError, Schema, VALUE};
use super::{preview, ParsedLine};

/// Turns one CSV row into a record, given the header's field names.
///
/// `value` becomes a JSON number when it parses as a finite number (integers stay integers),
/// otherwise a string; every other column passes through as a string.
///
/// # Errors
/// [`RecordError::Csv`] when the row's length differs from the header's,
/// [`RecordError::EmptyValue`] for an empty `value` cell, otherwise as [`Record::from_object`].
#[cfg(test)]
pub(crate) fn parse_csv_row<S: AsRef<str>>(
    headers: &[S],
    fields: &[S],
) -> Result<Record, RecordError> {
    parse_csv_row_as(headers, fields, Schema::Telemetry)
}

/// [`parse_csv_row`] under `schema`: with [`Schema::None`] every cell stays a string and any
/// header passes.
///
/// # Errors
/// As [`parse_csv_row`]; under [`Schema::None`] only [`RecordError::Csv`].
pub(crate) fn parse_csv_row_as<S: AsRef<str>>(
    headers: &[S],
    fields: &[S],
    schema: Schema,
) -> Result<Record, RecordError> {
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
        let value = if name == VALUE && schema == Schema::Telemetry {
            if cell.trim().is_empty() {
                return Err(RecordError::EmptyValue);
            }
            csv_value(cell)
        } else {
            Value::String(cell.to_owned())
        };
        object.insert(name.to_owned(), value);
    }
    Record::with_schema(object, schema)
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

/// Reads CSV rows; the first row is the header.
///
/// Rows are parsed with `csv-core` into one buffer bounded by the record limit: a longer row
/// is skipped to its end (counting its lines) without being held, and reported with the line it
/// starts on. A quoted field still open at the end of the input is an error naming the line the
/// quote opened on, not a record that swallowed the rest of the file.
#[derive(Debug)]
pub(crate) struct CsvRecords<R> {
    input: BufReader<CrlfToLf<R>>,
    parser: csv_core::Reader,
    limit: usize,
    headers: Option<Vec<String>>,
    /// The current row's fields, back to back (the first `used` bytes), and where each ends.
    fields: Vec<u8>,
    used: usize,
    ends: Vec<usize>,
    stage: CsvStage,
    schema: Schema,
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
    pub(crate) fn new(reader: R, max_record_bytes: usize) -> Self {
        CsvRecords {
            input: BufReader::with_capacity(64 * 1024, CrlfToLf::new(reader)),
            parser: csv_core::Reader::new(),
            limit: max_record_bytes,
            headers: None,
            fields: Vec::new(),
            used: 0,
            ends: Vec::new(),
            stage: CsvStage::Input,
            schema: Schema::Telemetry,
        }
    }

    /// Validates rows under `schema` (default [`Schema::Telemetry`]).
    pub(crate) fn with_schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
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
                    raw: Some(preview(&reencode_csv(&self.lossy_fields()))),
                    result: Err(RecordError::UnterminatedQuote(opened)),
                }));
            }
            if row.too_long {
                return Some(Ok(ParsedLine {
                    line,
                    raw: Some(preview(&reencode_csv(&self.lossy_fields()))),
                    result: Err(RecordError::TooLong(self.limit)),
                }));
            }
            let Some(mut fields) = self.field_strings() else {
                return Some(Ok(ParsedLine {
                    line,
                    raw: Some(reencode_csv(&self.lossy_fields())),
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
                        raw: Some(reencode_csv(&fields)),
                        result: parse_csv_row_as(headers, &fields, self.schema),
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use super::super::RAW_PREVIEW_CHARS;
    use crate::ingest::record::parse_ndjson_line;

    /// The record limit of the tests that do not test it: the default hub's message limit.
    const LIMIT: usize = 1024 * 1024;

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
            assert!(long_row.raw.as_deref().unwrap().chars().count() <= RAW_PREVIEW_CHARS + 1);
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
        assert_eq!(
            rows[0].raw.as_deref().unwrap(),
            "a,2025-01-01T00:00:00Z,1.5,\"hello, world\""
        );
        assert!(rows[1].result.is_err());
        assert_eq!(rows[1].raw.as_deref().unwrap(), "b,not-a-time,2,x");
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
}
