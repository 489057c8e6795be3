//! The Event Hubs REST API's encodings of an [`Event`]: a batch element of
//! `application/vnd.microsoft.servicebus.json`, and the headers of a single send. Always
//! compiled (it needs only serde_json and base64), so [`EventBatch`](crate::EventBatch) can
//! size JSON batches exactly whatever the features; the HTTPS client itself is feature `https`.
//!
//! A batch element is
//! `{"Body":"…","IsBodyBase64":true,"UserProperties":{…},"BrokerProperties":{"PartitionKey":"…","MessageId":"…","CorrelationId":"…"}}`,
//! each member present only when it says something. A body that is valid UTF-8 travels as a
//! JSON string (escaped as JSON requires), any other as base64 (4/3 the size) with
//! `IsBodyBase64`. Property values map to JSON: booleans, longs and finite doubles as
//! themselves, strings as strings, binary as base64 text, timestamps as RFC 3339 text (so
//! binary and timestamp properties arrive as strings). The API has no place for a content type
//! or content encoding per batch element: they are not sent (a single send carries the content
//! type in `Content-Type`).
// The single-send headers are the REST client's alone.
#![cfg_attr(not(feature = "https"), allow(dead_code))]

use std::io::Write;

use base64::Engine as _;

use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, PropertyValue};

/// `Content-Type` of a batch.
pub(crate) const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";

/// Appends `event`'s batch element to `out`.
///
/// # Errors
/// [`ErrorKind::InvalidArgument`] for a double property that is NaN or infinite (JSON has no
/// such numbers).
pub(crate) fn write_element(
    out: &mut Vec<u8>,
    event: &Event,
    partition_key: Option<&str>,
) -> Result<()> {
    out.extend_from_slice(b"{\"Body\":");
    match std::str::from_utf8(event.body()) {
        Ok(text) => write_string(out, text),
        Err(_) => {
            out.push(b'"');
            let start = out.len();
            let len = base64::encoded_len(event.body().len(), true).unwrap_or(0);
            out.resize(start + len, 0);
            let written = base64::engine::general_purpose::STANDARD
                .encode_slice(event.body(), &mut out[start..])
                .unwrap_or(0);
            out.truncate(start + written);
            out.extend_from_slice(b"\",\"IsBodyBase64\":true");
        }
    }
    let mut properties = event.properties().peekable();
    if properties.peek().is_some() {
        out.extend_from_slice(b",\"UserProperties\":{");
        for (i, (name, value)) in properties.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_string(out, name);
            out.push(b':');
            write_value(out, name, value)?;
        }
        out.push(b'}');
    }
    let broker = [
        ("PartitionKey", partition_key),
        ("MessageId", event.message_id()),
        ("CorrelationId", event.correlation_id()),
    ];
    if broker.iter().any(|(_, v)| v.is_some()) {
        out.extend_from_slice(b",\"BrokerProperties\":");
        write_broker_properties(out, &broker);
    }
    out.push(b'}');
    Ok(())
}

/// `{"PartitionKey":"…",…}` for the members that are set.
fn write_broker_properties(out: &mut Vec<u8>, members: &[(&str, Option<&str>)]) {
    out.push(b'{');
    let mut first = true;
    for (name, value) in members {
        if let Some(value) = value {
            if !first {
                out.push(b',');
            }
            first = false;
            write_string(out, name);
            out.push(b':');
            write_string(out, value);
        }
    }
    out.push(b'}');
}

/// A JSON string literal (serde_json's escaping).
fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail, and a &str always serialises.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn write_value(out: &mut Vec<u8>, name: &str, value: &PropertyValue) -> Result<()> {
    match value {
        PropertyValue::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        PropertyValue::Long(n) => {
            let _ = write!(out, "{n}");
        }
        PropertyValue::Double(d) if d.is_finite() => {
            let _ = serde_json::to_writer(&mut *out, d);
        }
        PropertyValue::Double(_) => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "property `{name}` is NaN or infinite, which JSON (the REST API) cannot carry"
                ),
            ))
        }
        PropertyValue::String(s) => write_string(out, s),
        PropertyValue::Binary(b) => {
            write_string(out, &base64::engine::general_purpose::STANDARD.encode(b))
        }
        PropertyValue::Timestamp(t) => {
            write_string(out, &t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        }
    }
    Ok(())
}

/// JSON text made pure ASCII (every other character as `\uXXXX`), for HTTP header values.
fn ascii(json: Vec<u8>) -> String {
    let text = String::from_utf8(json).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Header names that are HTTP's or the API's own and so cannot be property names.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "content-type",
    "content-length",
    "content-encoding",
    "brokerproperties",
    "user-agent",
    "accept",
    "accept-encoding",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "expect",
    "te",
    "trailer",
    "upgrade",
];

/// The headers of a single send: `BrokerProperties` when there is a partition key, message id
/// or correlation id, and one header per property (its value a JSON literal, ASCII-escaped).
///
/// # Errors
/// [`ErrorKind::InvalidArgument`] for a property whose name cannot be an HTTP header (not an
/// HTTP token, or a standard header's name) or whose value JSON cannot carry.
pub(crate) fn single_headers(
    event: &Event,
    partition_key: Option<&str>,
) -> Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    let broker = [
        ("PartitionKey", partition_key),
        ("MessageId", event.message_id()),
        ("CorrelationId", event.correlation_id()),
    ];
    if broker.iter().any(|(_, v)| v.is_some()) {
        let mut json = Vec::new();
        write_broker_properties(&mut json, &broker);
        headers.push(("BrokerProperties".to_owned(), ascii(json)));
    }
    for (name, value) in event.properties() {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token || RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "property `{}` cannot be sent as an HTTP header in a single REST send; send the event in a batch instead",
                    crate::error::sanitize(name)
                ),
            ));
        }
        let mut json = Vec::new();
        write_value(&mut json, name, value)?;
        headers.push((name.to_owned(), ascii(json)));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(event: &Event, key: Option<&str>) -> serde_json::Value {
        let mut out = Vec::new();
        write_element(&mut out, event, key).unwrap();
        serde_json::from_slice(&out).expect("valid JSON")
    }

    #[test]
    fn text_bodies_are_strings_and_binary_bodies_base64() {
        let v = element(&Event::new("héllo \"q\"\n\u{1}"), None);
        assert_eq!(v["Body"], "héllo \"q\"\n\u{1}");
        assert!(v.get("IsBodyBase64").is_none());
        let v = element(&Event::new(vec![0xff, 0x00, 0x80]), Some("k"));
        assert_eq!(v["Body"], "/wCA");
        assert_eq!(v["IsBodyBase64"], true);
        assert_eq!(v["BrokerProperties"]["PartitionKey"], "k");
    }

    #[test]
    fn properties_and_ids_map_to_json() {
        let event = Event::new("x")
            .with_message_id("m-1")
            .with_correlation_id("c-1")
            .with_property("n", 3i64)
            .with_property("d", 1.5)
            .with_property("b", true)
            .with_property("s", "ü");
        let v = element(&event, None);
        assert_eq!(v["UserProperties"]["n"], 3);
        assert_eq!(v["UserProperties"]["d"], 1.5);
        assert_eq!(v["UserProperties"]["b"], true);
        assert_eq!(v["UserProperties"]["s"], "ü");
        assert_eq!(v["BrokerProperties"]["MessageId"], "m-1");
        assert_eq!(v["BrokerProperties"]["CorrelationId"], "c-1");
        let nan = Event::new("x").with_property("d", f64::NAN);
        assert!(write_element(&mut Vec::new(), &nan, None).is_err());
    }

    #[test]
    fn single_headers_are_ascii_json_literals() {
        let event = Event::new("x")
            .with_property("Site", "Zürich")
            .with_property("count", 2i64);
        let headers = single_headers(&event, Some("pump-1")).unwrap();
        assert_eq!(
            headers[0],
            (
                "BrokerProperties".into(),
                r#"{"PartitionKey":"pump-1"}"#.into()
            )
        );
        assert_eq!(headers[1], ("Site".into(), r#""Z\u00fcrich""#.into()));
        assert_eq!(headers[2], ("count".into(), "2".into()));
        for bad in ["with space", "Content-Type", ""] {
            let e = Event::new("x").with_property(bad, 1i64);
            assert_eq!(
                single_headers(&e, None).unwrap_err().kind(),
                ErrorKind::InvalidArgument
            );
        }
    }
}
