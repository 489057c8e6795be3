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
    let timestamp = chrono::DateTime::parse_from_rfc3339(&text)
        .ok()?
        .with_timezone(&chrono::Utc);
    if format_timestamp(&timestamp) != *text {
        return None;
    }
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
