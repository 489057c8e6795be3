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
    let mut de = serde_json::Deserializer::from_str(line);
    let fields = Fields::deserialize_in(&mut de, true).ok()?;
    de.end().ok()?;
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
            } else if n % 1_000_000 == 0 {
                3
            } else if n % 1_000 == 0 {
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
    let mut de = serde_json::Deserializer::from_str(line);
    Fields::deserialize_in(&mut de, false).ok()?;
    de.end().ok()?;
    Some(Scanned {
        sensor_id: None,
        timestamp: None,
    })
}

/// The telemetry fields of one object, borrowed where they can be.
#[derive(Default)]
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

    /// The old check: chrono's RFC 3339 parse, then the canonical form written out and compared.
    fn by_chrono(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let t = chrono::DateTime::parse_from_rfc3339(text)
            .ok()?
            .with_timezone(&chrono::Utc);
        (format_timestamp(&t) == text).then_some(t)
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
