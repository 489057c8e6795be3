//! NDJSON input: one JSON object per line, each line bounded by the record limit.

use std::io::BufRead;

use super::record::{parse_ndjson_line_as, RecordError, Schema};
use super::{preview, ParsedLine};

/// Reads NDJSON lines from a buffered reader. Blank lines are skipped but counted.
///
/// A line longer than the record limit is never held whole: its first bytes are kept for the
/// reject report and the rest is skipped up to the next newline, so memory stays bounded by the
/// limit whatever the input holds.
#[derive(Debug)]
pub(crate) struct NdjsonRecords<R> {
    reader: R,
    line: u64,
    limit: usize,
    buf: Vec<u8>,
    done: bool,
    schema: Schema,
}

impl<R: BufRead> NdjsonRecords<R> {
    /// Reads from `reader`, refusing lines longer than `max_record_bytes` (without their line
    /// terminator).
    pub(crate) fn new(reader: R, max_record_bytes: usize) -> Self {
        NdjsonRecords {
            reader,
            line: 0,
            limit: max_record_bytes,
            buf: Vec::new(),
            done: false,
            schema: Schema::Telemetry,
        }
    }

    /// Validates lines under `schema` (default [`Schema::Telemetry`]).
    pub(crate) fn with_schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
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
            // The common case: the whole line is in the reader's buffer, and is parsed there.
            // Its bytes are copied once, into the event body (or the reject's text); only a
            // line that runs past the end of the buffer is gathered in `buf` first.
            let (limit, schema) = (self.limit, self.schema);
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            if let Some(end) = memchr::memchr(b'\n', available) {
                self.line += 1;
                // As `read_line` keeps it: at most the limit plus CR LF, so one over the
                // limit is still seen.
                let whole = &available[..=end];
                let keep = limit.saturating_add(3);
                let (bytes, cut) = match whole.len() > keep {
                    true => (&whole[..keep], true),
                    false => (&whole[..end], false),
                };
                let parsed = parse_line(bytes, cut, self.line, limit, schema);
                self.reader.consume(end + 1);
                match parsed {
                    Some(parsed) => return Some(Ok(parsed)),
                    None => continue,
                }
            }
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
            let bytes = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
            if let Some(parsed) = parse_line(bytes, cut, self.line, limit, schema) {
                return Some(Ok(parsed));
            }
        }
        None
    }
}

/// One line (`bytes`, its `\n` already taken off; `cut` when only its start was kept) as a
/// [`ParsedLine`], or `None` for a blank line.
///
/// A line whose record sends the line's own bytes keeps no copy of its text besides the
/// body ([`ParsedLine::raw`] is `None`); any other line keeps its text for a reject report.
fn parse_line(
    bytes: &[u8],
    cut: bool,
    line: u64,
    limit: usize,
    schema: Schema,
) -> Option<ParsedLine> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if cut || bytes.len() > limit {
        return Some(ParsedLine {
            line,
            raw: Some(preview(&String::from_utf8_lossy(bytes))),
            result: Err(RecordError::TooLong(limit)),
        });
    }
    Some(match std::str::from_utf8(bytes) {
        Ok(text) if text.trim().is_empty() => return None,
        Ok(text) => {
            let result = parse_ndjson_line_as(text, schema);
            let raw = match &result {
                // A record's line text is always `text` or `text` without its byte-order
                // mark (`parse_ndjson_line_as`), so equal lengths mean equal texts: no
                // second pass over the line's bytes.
                Ok(record) if record.line_text().map(str::len) == Some(text.len()) => None,
                _ => Some(text.to_owned()),
            };
            ParsedLine { line, raw, result }
        }
        Err(_) => ParsedLine {
            line,
            raw: Some(String::from_utf8_lossy(bytes).into_owned()),
            result: Err(RecordError::NotUtf8),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    use super::super::RAW_PREVIEW_CHARS;

    /// The record limit of the tests that do not test it: the default hub's message limit.
    const LIMIT: usize = 1024 * 1024;

    #[test]
    fn ndjson_reader_numbers_lines_skips_blanks_and_flags_bad_utf8() {
        let input: &[u8] = b"{\"sensor_id\":\"a\",\"timestamp\":\"2025-01-01T00:00:00Z\",\"value\":1}\r\n\n   \nbad\n\xff\xfe\n{\"sensor_id\":\"b\",\"timestamp\":\"2025-01-01T00:00:00Z\",\"value\":\"x\"}";
        let lines: Vec<ParsedLine> = NdjsonRecords::new(input, LIMIT)
            .map(Result::unwrap)
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].line, 1);
        assert!(lines[0].result.is_ok());
        // The line is the record's body, kept once.
        assert_eq!(lines[0].raw, None);
        let body = lines[0].result.as_ref().unwrap().line_text().unwrap();
        assert!(!body.ends_with('\r'));
        assert_eq!(lines[1].line, 4);
        assert_eq!(lines[1].raw.as_deref(), Some("bad"));
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
            let raw = long_line.raw.as_deref().unwrap();
            assert!(raw.starts_with(r#"{"sensor_id":"b""#));
            assert!(raw.chars().count() <= RAW_PREVIEW_CHARS + 1);
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
}
