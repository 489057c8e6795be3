//! How an event and its route are laid out inside one spool record: a compact, versioned
//! binary form (the frame around it, with the checksum, belongs to [`crate::log`]).

use hubsend::{Event, PropertyValue};

use crate::error::{Result, SpoolError, SpoolErrorKind};

/// Where a spooled event goes: like [`hubsend::SendOptions`], which cannot be read back, so
/// the spool keeps its own copy of the choice. The Event Hubs sink takes `Any`,
/// `PartitionKey` and `PartitionId`; the [`IotHubSink`](crate::IotHubSink) takes `Device`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// Round robin (the hub decides).
    #[default]
    Any,
    /// By partition key: same key, same partition, in order.
    PartitionKey(String),
    /// To one partition id.
    PartitionId(String),
    /// As one IoT Hub device (for an [`IotHubSink`](crate::IotHubSink)): a device-to-cloud
    /// message on that device's stream, in order per device.
    Device {
        /// The device id.
        id: String,
        /// The name to write to the device's twin (`properties.desired.deviceName`) if the
        /// gateway creates its identity on the way (auto-create); ignored otherwise. Kept in
        /// the record, so a resumed run names the device as the first run would have.
        name: Option<String>,
    },
}

impl Route {
    /// Routes by `key`.
    pub fn partition_key(key: impl Into<String>) -> Route {
        Route::PartitionKey(key.into())
    }

    /// Sends to partition `id`.
    pub fn partition_id(id: impl Into<String>) -> Route {
        Route::PartitionId(id.into())
    }

    /// As the IoT Hub device `id`, with the `name` to give it if it is created on the way.
    pub fn device(id: impl Into<String>, name: Option<String>) -> Route {
        Route::Device {
            id: id.into(),
            name,
        }
    }

    /// The Event Hubs send options; `None` for a device route.
    pub(crate) fn send_options(&self) -> Option<hubsend::SendOptions> {
        Some(match self {
            Route::Any => hubsend::SendOptions::new(),
            Route::PartitionKey(k) => hubsend::SendOptions::new().partition_key(k.clone()),
            Route::PartitionId(p) => hubsend::SendOptions::new().partition_id(p.clone()),
            Route::Device { .. } => return None,
        })
    }

    /// The route a settled or failed batch reports.
    pub(crate) fn from_parts(key: Option<&String>, id: Option<&String>) -> Route {
        match (key, id) {
            (Some(k), _) => Route::PartitionKey(k.clone()),
            (None, Some(p)) => Route::PartitionId(p.clone()),
            (None, None) => Route::Any,
        }
    }
}

/// The record format's version. Route tags: 0 any, 1 partition key, 2 partition id, 3 device
/// (id, optional name; added without a new version, so records written before it read the
/// same, and a version without it skips a device record as "unknown format").
const VERSION: u8 = 1;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
    }
}

/// Encodes `event` with `route`.
pub(crate) fn encode(event: &Event, route: &Route) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(event.body().len() + 32);
    out.push(VERSION);
    match route {
        Route::Any => out.push(0),
        Route::PartitionKey(k) => {
            out.push(1);
            put_bytes(&mut out, k.as_bytes());
        }
        Route::PartitionId(p) => {
            out.push(2);
            put_bytes(&mut out, p.as_bytes());
        }
        Route::Device { id, name } => {
            out.push(3);
            put_bytes(&mut out, id.as_bytes());
            put_opt(&mut out, name.as_deref());
        }
    }
    put_opt(&mut out, event.content_type());
    put_opt(&mut out, event.content_encoding());
    put_opt(&mut out, event.message_id());
    put_opt(&mut out, event.correlation_id());
    let properties: Vec<_> = event.properties().collect();
    out.extend_from_slice(&(properties.len() as u32).to_le_bytes());
    for (name, value) in properties {
        put_bytes(&mut out, name.as_bytes());
        match value {
            PropertyValue::Bool(b) => {
                out.push(0);
                out.push(u8::from(*b));
            }
            PropertyValue::Long(v) => {
                out.push(1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            PropertyValue::Double(v) => {
                out.push(2);
                out.extend_from_slice(&v.to_le_bytes());
            }
            PropertyValue::String(s) => {
                out.push(3);
                put_bytes(&mut out, s.as_bytes());
            }
            PropertyValue::Binary(b) => {
                out.push(4);
                put_bytes(&mut out, b);
            }
            PropertyValue::Timestamp(t) => {
                out.push(5);
                out.extend_from_slice(&t.timestamp_millis().to_le_bytes());
            }
            _ => {
                return Err(SpoolError::new(
                    SpoolErrorKind::Unsupported,
                    format!("application property {name:?} has a type the spool cannot store"),
                ))
            }
        }
    }
    put_bytes(&mut out, event.body());
    Ok(out)
}

/// Reads what [`encode`] wrote. `None` for bytes it did not write (the checksum passed, so
/// this means a newer or foreign format).
pub(crate) fn decode(bytes: &[u8]) -> Option<(Event, Route)> {
    let mut r = Reader::new(bytes);
    if r.u8()? != VERSION {
        return None;
    }
    let route = match r.u8()? {
        0 => Route::Any,
        1 => Route::PartitionKey(r.string()?),
        2 => Route::PartitionId(r.string()?),
        3 => Route::Device {
            id: r.string()?,
            name: r.opt()?,
        },
        _ => return None,
    };
    let content_type = r.opt()?;
    let content_encoding = r.opt()?;
    let message_id = r.opt()?;
    let correlation_id = r.opt()?;
    let count = r.u32()?;
    let mut properties = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        let name = r.string()?;
        let value = match r.u8()? {
            0 => PropertyValue::Bool(r.u8()? != 0),
            1 => PropertyValue::Long(i64::from_le_bytes(r.take(8)?.try_into().ok()?)),
            2 => PropertyValue::Double(f64::from_le_bytes(r.take(8)?.try_into().ok()?)),
            3 => PropertyValue::String(r.string()?),
            4 => PropertyValue::Binary(r.bytes()?.to_vec()),
            5 => {
                let ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
                PropertyValue::Timestamp(chrono::DateTime::from_timestamp_millis(ms)?)
            }
            _ => return None,
        };
        properties.push((name, value));
    }
    let body = r.bytes()?.to_vec();
    let mut event = Event::new(body);
    if let Some(v) = content_type {
        event = event.with_content_type(v);
    }
    if let Some(v) = content_encoding {
        event = event.with_content_encoding(v);
    }
    if let Some(v) = message_id {
        event = event.with_message_id(v);
    }
    if let Some(v) = correlation_id {
        event = event.with_correlation_id(v);
    }
    for (name, value) in properties {
        event = event.with_property(name, value);
    }
    Some((event, route))
}

/// Little-endian reads over a record's bytes (also the numbers journal's): each `None` when the
/// bytes end early or do not decode.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub(crate) fn i16(&mut self) -> Option<i16> {
        Some(i16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    pub(crate) fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub(crate) fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn opt(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.string()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_and_property_type_round_trips() {
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_000_123).expect("time");
        let event = Event::new(b"\x00body\xff".to_vec())
            .with_content_type("application/json")
            .with_content_encoding("gzip")
            .with_message_id("m-1")
            .with_correlation_id("c-1")
            .with_property("b", true)
            .with_property("l", -7i64)
            .with_property("d", 2.5f64)
            .with_property("s", "text")
            .with_property("x", vec![1u8, 2, 3])
            .with_property("t", at);
        for route in [
            Route::Any,
            Route::partition_key("k"),
            Route::partition_id("3"),
            Route::device("sensor-1", None),
            Route::device("sensor-2", Some("Boiler B".into())),
        ] {
            let bytes = encode(&event, &route).expect("encodes");
            assert_eq!(decode(&bytes), Some((event.clone(), route)));
            // Cut anywhere, it is refused rather than misread.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
            }
        }
    }

    /// A record as this format wrote it before the device route existed (written out byte
    /// for byte) still reads.
    #[test]
    fn records_written_before_the_device_route_still_read() {
        let old: Vec<u8> = [
            &[1u8, 1][..], // version 1, route tag 1 (partition key)
            &[5, 0, 0, 0], // the key's length
            b"key-7",      // the key
            &[0, 0, 0, 0], // no content type, encoding, message or correlation id
            &[0, 0, 0, 0], // no properties
            &[2, 0, 0, 0], // the body's length
            b"{}",         // the body
        ]
        .concat();
        assert_eq!(
            decode(&old),
            Some((Event::new(b"{}".to_vec()), Route::partition_key("key-7")))
        );
        // An unknown route tag is refused, not misread.
        let mut unknown = old.clone();
        unknown[1] = 9;
        assert_eq!(decode(&unknown), None);
    }
}
