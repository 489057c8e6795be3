//! One borrowing pass over an NDJSON line: whether it is a JSON object that a [`Record`] can
//! take as it stands, without building a [`serde_json::Value`] for it.
//!
//! The pass goes through the same serde_json parser as the full parse (`deserialize_any` for
//! every value, so numbers are range-checked, strings unescaped and validated and nesting is
//! bounded exactly as when a `Value` is built), but keeps nothing except the three telemetry
//! fields, borrowed from the line where they hold no escapes. It only ever says "take the line
//! as it is" or "ask the full parse": a line it does not accept (not an object, a broken rule,
//! a duplicate telemetry field, a timestamp to normalise) goes through the full parse, which
//! names the reason and normalises, so both paths accept, refuse and send the same.
//!
//! [`Record`]: super::record::Record

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::record::{format_timestamp, SENSOR_ID, TIMESTAMP, VALUE};

/// What the pass found in a line it accepts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Where the sensor id's text lies in the line, when it holds no escapes.
    pub(crate) sensor_id: Option<Range<usize>>,
    /// The reading's time (already in canonical UTC form); `None` when the telemetry schema
    /// was not checked.
    pub(crate) timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

/// Whether `line` is a JSON object that passes the telemetry schema with a timestamp already
/// in canonical form, so its own bytes are the event body; `None` when only the full parse
/// can tell (it is then refused or normalised there).
pub(crate) fn telemetry(line: &str) -> Option<Scanned> {
    let fields = match flat(line, true) {
        Flat::Fields(fields) => fields,
        Flat::Refused => return None,
        Flat::Unsure => serde_fields(line, true)?,
    };
    let sensor_id = fields.sensor_id?;
    if sensor_id.is_empty() {
        return None;
    }
    let text = fields.timestamp?;
    if !fields.value {
        return None;
    }
    let timestamp = canonical_utc(&text).or_else(|| {
        // Whatever the quick check leaves (a leap second, say): as the full parse decides.
        let timestamp = chrono::DateTime::parse_from_rfc3339(&text)
            .ok()?
            .with_timezone(&chrono::Utc);
        (format_timestamp(&timestamp) == *text).then_some(timestamp)
    })?;
    let sensor_id = match sensor_id {
        Cow::Borrowed(s) => {
            let start = s.as_ptr() as usize - line.as_ptr() as usize;
            Some(start..start + s.len())
        }
        Cow::Owned(_) => None,
    };
    Some(Scanned {
        sensor_id,
        timestamp: Some(timestamp),
    })
}

/// The time `text` names when it is in the canonical form [`format_timestamp`] writes
/// (`YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]Z`, the fraction as short as it can be and
/// absent when zero) and a valid date and time; `None` otherwise, and for a leap second, which
/// are left to chrono. Checked in place: no parse through chrono's general RFC 3339 parser and
/// no `String` to compare with. A time this accepts is one chrono parses to the same instant and
/// writes back as `text` (`canonical_utc_agrees_with_chrono` checks it).
pub(crate) fn canonical_utc(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[b.len() - 1] != b'Z'
    {
        return None;
    }
    let digits = |range: Range<usize>| decimal(&b[range]);
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let fraction = &b[19..b.len() - 1];
    // How many digits the canonical form gives a fraction depends on its value (see
    // chrono's `SecondsFormat::AutoSi`): none when zero, else 3, 6 or 9, the fewest that hold it.
    let nanos = match fraction.len() {
        0 => 0,
        4 | 7 | 10 if fraction[0] == b'.' => {
            let places = fraction.len() - 1;
            let n = digits(20..b.len() - 1)? * 10u32.pow(9 - places as u32);
            let fewest = if n == 0 {
                0
            } else if n.is_multiple_of(1_000_000) {
                3
            } else if n.is_multiple_of(1_000) {
                6
            } else {
                9
            };
            if fewest != places {
                return None;
            }
            n
        }
        _ => return None,
    };
    if second > 59 {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
    let time = chrono::NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    Some(date.and_time(time).and_utc())
}

/// The number `digits` spell (at most 9 ASCII digits); `None` when any is not one.
#[inline(always)]
fn decimal(digits: &[u8]) -> Option<u32> {
    let mut n = 0u32;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n * 10 + u32::from(d);
    }
    Some(n)
}

/// Whether `line` is a JSON object (`--schema none`); `None` when only the full parse can tell.
pub(crate) fn object(line: &str) -> Option<Scanned> {
    match flat(line, false) {
        Flat::Fields(_) => {}
        Flat::Refused => return None,
        Flat::Unsure => {
            serde_fields(line, false)?;
        }
    }
    Some(Scanned {
        sensor_id: None,
        timestamp: None,
    })
}

/// The serde pass over `line`: its fields, or `None` when the full parse must decide.
fn serde_fields(line: &str, telemetry: bool) -> Option<Fields<'_>> {
    let mut de = serde_json::Deserializer::from_str(line);
    let fields = Fields::deserialize_in(&mut de, telemetry).ok()?;
    de.end().ok()?;
    Some(fields)
}

/// What [`flat`] made of a line.
#[derive(Debug, PartialEq, Eq)]
enum Flat<'a> {
    /// A flat object of the plain shape: the fields the serde pass would find in it.
    Fields(Fields<'a>),
    /// Of the plain shape, but the serde pass would give up on it too (a telemetry field of the
    /// wrong type or given twice): the full parse decides.
    Refused,
    /// Not of the plain shape: ask the serde pass.
    Unsure,
}

/// Where a string without escapes or control characters ends: the index in `b` of the first
/// `"`, `\\` or character below 0x20, if there is one. Eight bytes at a time in a `u64` (the
/// strings of a telemetry line are short, so a vector search's set-up would cost more than it
/// saves): a byte is flagged when it equals one of the two or is below 0x20, and a flag can
/// be wrong only in a byte after a right one, so the lowest flag is the answer.
fn string_end(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    /// The high bit of each byte of `w` that is below `n` (n <= 0x80), and maybe of bytes after.
    fn below(w: u64, n: u8) -> u64 {
        w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH
    }
    let mut chunks = b.chunks_exact(8);
    for (k, chunk) in chunks.by_ref().enumerate() {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let flags = below(w ^ (ONES * u64::from(b'"')), 1)
            | below(w ^ (ONES * u64::from(b'\\')), 1)
            | below(w, 0x20);
        if flags != 0 {
            return Some(8 * k + flags.trailing_zeros() as usize / 8);
        }
    }
    let rest = chunks.remainder();
    let tail = rest
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    Some(b.len() - rest.len() + tail)
}

/// A quick pass by hand over the common shape of a telemetry line: one flat object whose keys
/// and string values hold no escapes and no control characters, whose numbers have no
/// exponent and at most 100 characters, and whose other values are `true`, `false` or `null`,
/// with JSON whitespace anywhere between. For such a line it finds what the serde pass finds
/// (serde_json accepts exactly these texts: strings of other characters are valid since `line`
/// is UTF-8, and a number without exponent of that length is never out of range), at a
/// fraction of the cost; anything else (escapes, nesting, exponents, a syntax error) is
/// [`Flat::Unsure`] and goes to the serde pass, so what is accepted does not change
/// (`the_quick_pass_finds_what_serde_finds` checks it).
fn flat(line: &str, telemetry: bool) -> Flat<'_> {
    let b = line.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    // A string without escapes or control characters, `i` just after its opening quote.
    let plain = |i: &mut usize| -> Option<Range<usize>> {
        let start = *i;
        let end = start + string_end(&b[start..])?;
        if b[end] != b'"' {
            return None;
        }
        *i = end + 1;
        Some(start..end)
    };
    let mut fields = Fields::default();
    let mut refused = false;
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return Flat::Unsure;
    }
    i += 1;
    ws(&mut i);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return Flat::Unsure;
            }
            i += 1;
            let Some(key) = plain(&mut i) else {
                return Flat::Unsure;
            };
            ws(&mut i);
            if b.get(i) != Some(&b':') {
                return Flat::Unsure;
            }
            i += 1;
            ws(&mut i);
            enum Kind {
                Text(Range<usize>),
                Number,
                Other,
            }
            let kind = match b.get(i) {
                Some(b'"') => {
                    i += 1;
                    match plain(&mut i) {
                        Some(text) => Kind::Text(text),
                        None => return Flat::Unsure,
                    }
                }
                Some(b'-' | b'0'..=b'9') => {
                    let start = i;
                    if b[i] == b'-' {
                        i += 1;
                    }
                    match b.get(i) {
                        Some(b'0') => i += 1,
                        Some(b'1'..=b'9') => {
                            while i < b.len() && b[i].is_ascii_digit() {
                                i += 1;
                            }
                        }
                        _ => return Flat::Unsure,
                    }
                    if b.get(i) == Some(&b'.') {
                        i += 1;
                        let digits = i;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                        if i == digits {
                            return Flat::Unsure;
                        }
                    }
                    if matches!(b.get(i), Some(b'e' | b'E')) || i - start > 100 {
                        return Flat::Unsure;
                    }
                    Kind::Number
                }
                _ => {
                    let rest = &b[i..];
                    let word = [&b"true"[..], b"false", b"null"]
                        .into_iter()
                        .find(|w| rest.starts_with(w));
                    match word {
                        Some(w) => {
                            i += w.len();
                            Kind::Other
                        }
                        None => return Flat::Unsure,
                    }
                }
            };
            if telemetry {
                match &b[key.clone()] {
                    b"sensor_id" | b"timestamp" => {
                        let slot = if &b[key] == b"sensor_id" {
                            &mut fields.sensor_id
                        } else {
                            &mut fields.timestamp
                        };
                        match kind {
                            Kind::Text(text) if slot.is_none() => {
                                *slot = Some(Cow::Borrowed(&line[text]));
                            }
                            _ => refused = true,
                        }
                    }
                    b"value" => match kind {
                        Kind::Text(_) | Kind::Number if !fields.value => fields.value = true,
                        _ => refused = true,
                    },
                    _ => {}
                }
            }
            ws(&mut i);
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                    ws(&mut i);
                }
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Flat::Unsure,
            }
        }
    }
    ws(&mut i);
    if i != b.len() {
        Flat::Unsure
    } else if refused {
        Flat::Refused
    } else {
        Flat::Fields(fields)
    }
}

/// The telemetry fields of one object, borrowed where they can be.
#[derive(Default, Debug, PartialEq, Eq)]
struct Fields<'a> {
    sensor_id: Option<Cow<'a, str>>,
    timestamp: Option<Cow<'a, str>>,
    /// `value` is present and a number or a string.
    value: bool,
}

impl<'de> Fields<'de> {
    fn deserialize_in<D: Deserializer<'de>>(de: D, telemetry: bool) -> Result<Self, D::Error> {
        de.deserialize_map(FieldsVisitor { telemetry })
    }
}

struct FieldsVisitor {
    /// Keep the telemetry fields (otherwise every value is only checked).
    telemetry: bool,
}

/// Gives up on the line: the full parse decides.
fn give_up<E: de::Error>() -> E {
    E::custom("left to the full parse")
}

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::SensorId if self.telemetry => {
                    if fields.sensor_id.is_some() {
                        return Err(give_up());
                    }
                    fields.sensor_id = Some(map.next_value::<Text<'de>>()?.0);
                }
                Key::Timestamp if self.telemetry => {
                    if fields.timestamp.is_some() {
                        return Err(give_up());
                    }
                    fields.timestamp = Some(map.next_value::<Text<'de>>()?.0);
                }
                Key::Value if self.telemetry => {
                    if fields.value {
                        return Err(give_up());
                    }
                    map.next_value::<Scalar>()?;
                    fields.value = true;
                }
                _ => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// An object key: one of the telemetry fields or another.
enum Key {
    SensorId,
    Timestamp,
    Value,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Key, D::Error> {
        de.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(match key {
            SENSOR_ID => Key::SensorId,
            TIMESTAMP => Key::Timestamp,
            VALUE => Key::Value,
            _ => Key::Other,
        })
    }
}

/// A JSON string, borrowed from the line when it holds no escapes; anything else gives up.
struct Text<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Text<'de>, D::Error> {
        de.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'de>, E> {
        Ok(Text(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'de>, E> {
        Ok(Text(Cow::Owned(s.to_owned())))
    }
}

/// A JSON number or string; anything else gives up.
struct Scalar;

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Scalar, D::Error> {
        de.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or a string")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Scalar, E> {
        Ok(Scalar)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Scalar, E> {
        Ok(Scalar)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Scalar, E> {
        Ok(Scalar)
    }
}

/// Any JSON value, checked as building a `Value` would check it (unlike [`IgnoredAny`](serde::de::IgnoredAny),
/// which serde_json skips without range-checking numbers), and then dropped.
struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Checked, D::Error> {
        de.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_none<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Checked, D::Error> {
        de.deserialize_any(CheckedVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        // Keys are strings in JSON; their text is checked by the parser either way.
        while map.next_key::<KeyText>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// A nested object's key, parsed (and so checked) like a `Value`'s key, then dropped.
struct KeyText;

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<KeyText, D::Error> {
        de.deserialize_str(KeyTextVisitor)
    }
}

struct KeyTextVisitor;

impl Visitor<'_> for KeyTextVisitor {
    type Value = KeyText;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<KeyText, E> {
        Ok(KeyText)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_end_finds_the_first_quote_backslash_or_control_character() {
        let naive = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
        // Every stop byte at every position of strings up to 24 bytes long, over fillers next
        // to the stops in value (0x1f/0x20, 0x21/0x23, 0x5b/0x5d), UTF-8 and 0xff, and a
        // second stop after the first (which a carried borrow could flag).
        let fillers = [
            b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff,
        ];
        let stops = [b'"', b'\\', 0x00, 0x01, 0x1f];
        for len in 0..24 {
            for &fill in &fillers {
                let mut b = vec![fill; len];
                assert_eq!(string_end(&b), None, "{len} bytes of {fill:#x}");
                for at in 0..len {
                    for &stop in &stops {
                        b[at] = stop;
                        assert_eq!(string_end(&b), Some(at), "{stop:#x} at {at} of {len}");
                        for second in at + 1..len {
                            b[second] = 0x00;
                            assert_eq!(string_end(&b), naive(&b));
                            b[second] = fill;
                        }
                        b[at] = fill;
                    }
                }
            }
        }
        // Real text, including multi-byte characters.
        for text in [
            "compressor-7:vibe_x\",\"t\"",
            "Grüße \\n",
            "温度🌡 ok\"",
            "no end",
        ] {
            assert_eq!(
                string_end(text.as_bytes()),
                naive(text.as_bytes()),
                "{text}"
            );
        }
    }

    /// The old check: chrono's RFC 3339 parse, then the canonical form written out and compared.
    fn by_chrono(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let t = chrono::DateTime::parse_from_rfc3339(text)
            .ok()?
            .with_timezone(&chrono::Utc);
        (format_timestamp(&t) == text).then_some(t)
    }

    /// The serde pass's verdict in the quick pass's terms.
    fn by_serde(line: &str, telemetry: bool) -> Option<Fields<'_>> {
        serde_fields(line, telemetry)
    }

    #[test]
    fn the_quick_pass_finds_what_serde_finds() {
        let mut lines: Vec<String> = [
            r#"{"sensor_id":"compressor-7:vibe_x","timestamp":"2025-08-19T08:30:00Z","value":42.1}"#,
            r#" { "sensor_id" : "a" , "timestamp" : "t" , "value" : "Running" } "#,
            "\t{\"value\":-0,\r\"sensor_id\":\"a\",\n\"timestamp\":\"t\"}\r",
            r#"{"sensor_id":"é☃😀","timestamp":"t","value":1,"x":true,"y":false,"z":null}"#,
            r#"{"sensor_id":"a","timestamp":"t","value":123456789012345678901234567890}"#,
            r#"{"sensor_id":"a","timestamp":"t","value":1.5,"pad":"xxxx","pad":"y"}"#,
            r#"{"sensor_id":"","timestamp":"","value":""}"#,
            r#"{"":"","a":0,"b":-0.0,"c":10.01}"#,
            r#"{}"#,
            r#"{ }"#,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        lines.push(format!(
            r#"{{"sensor_id":"a","timestamp":"t","value":{}}}"#,
            "9".repeat(99)
        ));
        lines.push(format!(
            r#"{{"sensor_id":"a","timestamp":"t","value":{}}}"#,
            "9".repeat(400)
        ));
        lines.push(format!(r#"{{"v":0.{}1}}"#, "0".repeat(400)));
        // Every byte of a few lines replaced by characters that matter to JSON, and cut short.
        let bases = lines.clone();
        let swaps = [
            "", " ", "\"", "\\", ":", ",", "{", "}", "[", "]", "-", "+", ".", "0", "1", "e", "E",
            "t", "n", "f", "x", "\u{1}", "\u{7f}", "é", "\t", "\u{feff}",
        ];
        for base in &bases[..4] {
            let chars: Vec<char> = base.chars().collect();
            for at in 0..chars.len() {
                for swap in swaps {
                    let mut t: String = chars[..at].iter().collect();
                    t.push_str(swap);
                    t.extend(&chars[at + 1..]);
                    lines.push(t);
                }
                lines.push(chars[..at].iter().collect());
            }
        }
        let mut quick = 0;
        for line in &lines {
            for keep in [true, false] {
                let serde = by_serde(line, keep);
                match flat(line, keep) {
                    Flat::Fields(fields) => {
                        quick += 1;
                        assert_eq!(Some(fields), serde, "{line:?}");
                    }
                    Flat::Refused => assert_eq!(serde, None, "{line:?}"),
                    Flat::Unsure => {}
                }
            }
        }
        assert!(quick > 1000, "only {quick} lines took the quick pass");
    }

    #[test]
    fn canonical_utc_agrees_with_chrono() {
        let mut texts: Vec<String> = [
            "2025-08-19T08:30:00Z",
            "2025-08-19T08:30:00.250Z",
            "2025-08-19T08:30:00.000Z",
            "2025-08-19T08:30:00.200000Z",
            "2025-08-19T08:30:00.250001Z",
            "2025-08-19T08:30:00.250001000Z",
            "2025-08-19T08:30:00.250001001Z",
            "2025-08-19T08:30:00.000000001Z",
            "2025-08-19T08:30:00.0Z",
            "2025-08-19T08:30:00.25Z",
            "2025-08-19T08:30:00.Z",
            "2025-08-19T08:30:00,250Z",
            "2025-08-19T08:30:00.25aZ",
            "2025-08-19T08:30:00.2500000000Z",
            "2025-08-19T08:30:60Z",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.500Z",
            "2025-08-19T24:00:00Z",
            "2025-08-19T23:60:00Z",
            "2025-02-29T00:00:00Z",
            "2024-02-29T00:00:00Z",
            "2025-02-30T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-00-01T00:00:00Z",
            "2025-01-00T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "2025-08-19t08:30:00Z",
            "2025-08-19T08:30:00z",
            "2025-08-19 08:30:00Z",
            "2025-08-19T08:30:00+00:00",
            "2025-08-19T08:30:00-00:00",
            "2025-08-19T10:30:00+02:00",
            "2025-08-19T08:30:00",
            "2025-8-19T08:30:00Z",
            "+2025-08-19T08:30:00Z",
            "-002-08-19T08:30:00Z",
            "2025-08-19T08:30:0 Z",
            "2025-08-19T08:30:+0Z",
            "２025-08-19T08:30:00Z",
            "2025-08-19T08:30:00ZZ",
            "2025-08-19T08:30:00Z ",
            "",
            "Z",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        // Every digit position through every digit, and fractions of every length.
        let base = "2024-02-29T23:59:59.999999999Z";
        for i in 0..base.len() {
            for c in ('0'..='9').chain(['.', 'Z', ':', '-']) {
                let mut t: Vec<char> = base.chars().collect();
                t[i] = c;
                texts.push(t.into_iter().collect());
            }
        }
        for places in 0..12 {
            for digit in ["0", "1", "5", "9"] {
                let fraction = format!("{}{}", "0".repeat(places.max(1) - 1), digit);
                texts.push(format!("2025-08-19T08:30:00.{}Z", &fraction[..places]));
                texts.push(format!("2025-08-19T08:30:00.{fraction}Z"));
                texts.push(format!(
                    "2025-08-19T08:30:00.{digit}{}Z",
                    "0".repeat(places)
                ));
            }
        }
        let mut accepted = 0;
        for text in &texts {
            let quick = canonical_utc(text);
            if let Some(t) = quick {
                accepted += 1;
                assert_eq!(by_chrono(text), Some(t), "{text:?}");
            } else if let Some(t) = by_chrono(text) {
                // Left to chrono: only leap seconds.
                assert!(t.timestamp_subsec_nanos() >= 1_000_000_000, "{text:?}");
            }
        }
        assert!(accepted >= 40, "{accepted} of {} accepted", texts.len());
    }
}
