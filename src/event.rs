//! What gets sent: [`Event`] (body plus metadata), its application [`PropertyValue`]s, and the
//! [`Telemetry`] record that most hubsend users stream.

use std::fmt;

use chrono::{DateTime, Utc};
use fe2o3_amqp_types::messaging::{
    message::__private::Serializable, ApplicationProperties, Message, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// The message annotation that carries an event's partition key.
pub(crate) const PARTITION_KEY_ANNOTATION: &str = "x-opt-partition-key";

/// One event: an opaque body plus the metadata Event Hubs keeps with it.
///
/// ```
/// let event = hubsend::Event::new(br#"{"sensor_id":"a","value":1}"#.to_vec())
///     .with_content_type("application/json")
///     .with_property("site", "plant-3");
/// assert_eq!(event.body().len(), 27);
/// ```
#[derive(Clone, Default, PartialEq)]
pub struct Event {
    body: Vec<u8>,
    content_type: Option<String>,
    /// The rarer metadata, boxed so that an event with a body and at most a content type (what
    /// telemetry sends) stays small as it moves through queues and batches. `Some` only when
    /// one of its fields is set (setters never unset one), so equality stays structural.
    extra: Option<Box<Extra>>,
}

/// An [`Event`]'s metadata beyond its content type.
#[derive(Clone, Default, PartialEq)]
struct Extra {
    content_encoding: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    properties: Vec<(String, PropertyValue)>,
}

// Events are moved by value through the buffered producer's queue and into batches: keep them
// at a body, a content type and one pointer.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Event>() == 56);

impl fmt::Debug for Event {
    // Payloads may be sensitive and large: Debug shows their size, never their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("body_len", &self.body.len())
            .field("content_type", &self.content_type)
            .field("content_encoding", &self.content_encoding())
            .field("message_id", &self.message_id())
            .field("correlation_id", &self.correlation_id())
            .field("properties", &self.property_list().len())
            .finish()
    }
}

impl Event {
    /// An event with this body and no metadata.
    pub fn new(body: impl Into<Vec<u8>>) -> Event {
        Event {
            body: body.into(),
            ..Event::default()
        }
    }

    /// The rarer metadata, created on first use.
    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// The application properties, empty when there are none.
    fn property_list(&self) -> &[(String, PropertyValue)] {
        self.extra.as_deref().map_or(&[], |extra| &extra.properties)
    }

    /// An event whose body is `value` serialised as JSON, with content type `application/json`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when `value` cannot be serialised.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Event> {
        let body = serde_json::to_vec(value).map_err(|e| {
            Error::new(ErrorKind::InvalidArgument, "event body is not serialisable").with_source(e)
        })?;
        Ok(Event::new(body).with_content_type("application/json"))
    }

    /// Sets the MIME content type (AMQP `content-type`).
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Event {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the message id (AMQP `message-id`, sent as a string).
    pub fn with_message_id(mut self, id: impl Into<String>) -> Event {
        self.extra_mut().message_id = Some(id.into());
        self
    }

    /// Sets the correlation id (AMQP `correlation-id`, sent as a string).
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Event {
        self.extra_mut().correlation_id = Some(id.into());
        self
    }

    /// Adds an application property. Setting the same key twice keeps the last value.
    pub fn with_property(
        mut self,
        key: impl Into<String>,
        value: impl Into<PropertyValue>,
    ) -> Event {
        let key = key.into();
        let value = value.into();
        let properties = &mut self.extra_mut().properties;
        match properties.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => properties.push((key, value)),
        }
        self
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The content type, if set.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// Sets the AMQP `content-encoding` (IoT Hub routes on JSON bodies only with `utf-8`,
    /// `utf-16` or `utf-32` here).
    pub fn with_content_encoding(mut self, encoding: impl Into<String>) -> Event {
        self.extra_mut().content_encoding = Some(encoding.into());
        self
    }

    /// The `content-encoding`, if set.
    pub fn content_encoding(&self) -> Option<&str> {
        self.extra.as_deref()?.content_encoding.as_deref()
    }

    /// The message id, if set.
    pub fn message_id(&self) -> Option<&str> {
        self.extra.as_deref()?.message_id.as_deref()
    }

    /// The correlation id, if set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.extra.as_deref()?.correlation_id.as_deref()
    }

    /// The application properties in insertion order.
    pub fn properties(&self) -> impl Iterator<Item = (&str, &PropertyValue)> {
        self.property_list().iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Builds the AMQP message for this event, with the partition key annotation when given.
    ///
    /// Only the reference for [`encode`](Self::encode)'s byte layout (the hot path writes the
    /// sections directly and never clones the body).
    #[cfg(test)]
    pub(crate) fn to_message(
        &self,
        partition_key: Option<&str>,
    ) -> Message<fe2o3_amqp_types::messaging::Data> {
        let mut builder = Message::builder();
        if let Some(annotations) = annotations(partition_key) {
            builder = builder.message_annotations(annotations);
        }
        if let Some(properties) = self.amqp_properties() {
            builder = builder.properties(properties);
        }
        if let Some(app) = self.application_properties() {
            builder = builder.application_properties(app);
        }
        builder.data(Binary::from(self.body.clone())).build()
    }

    /// Whether the event is a body alone, with no metadata section.
    fn is_bare(&self) -> bool {
        self.content_type.is_none() && self.extra.is_none()
    }

    /// For a bare event, its exact encoded size with the key annotation of `partition_key`
    /// (if any), known without encoding it.
    pub(crate) fn bare_encoded_len(&self, partition_key: Option<&str>) -> Option<usize> {
        (self.is_bare() && u32::try_from(self.body.len()).is_ok()).then(|| {
            partition_key.map_or(0, key_annotation_len)
                + self.body.len()
                + data_section_header(self.body.len()).1
        })
    }

    fn amqp_properties(&self) -> Option<Properties> {
        let extra = self.extra.as_deref();
        let field = |get: fn(&Extra) -> &Option<String>| extra.and_then(|e| get(e).clone());
        let (message_id, correlation_id, content_encoding) = (
            field(|e| &e.message_id),
            field(|e| &e.correlation_id),
            field(|e| &e.content_encoding),
        );
        if self.content_type.is_none()
            && content_encoding.is_none()
            && message_id.is_none()
            && correlation_id.is_none()
        {
            return None;
        }
        Some(Properties {
            message_id: message_id.map(MessageId::String),
            correlation_id: correlation_id.map(MessageId::String),
            content_type: self.content_type.clone().map(Symbol::from),
            content_encoding: content_encoding.map(Symbol::from),
            ..Properties::default()
        })
    }

    fn application_properties(&self) -> Option<ApplicationProperties> {
        if self.property_list().is_empty() {
            return None;
        }
        let mut app = ApplicationProperties::builder();
        for (k, v) in self.property_list() {
            app = app.insert(k.clone(), v.to_simple_value());
        }
        Some(app.build())
    }

    /// The complete AMQP encoding of this event as one message, in a buffer of its own.
    #[cfg(test)]
    pub(crate) fn encode(&self, partition_key: Option<&str>) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.body.len() + DATA_SECTION_HEADER_MAX);
        self.encode_into(&mut out, partition_key)?;
        Ok(out)
    }

    /// Appends the complete AMQP encoding of this event as one message (one batch section's
    /// payload) to `out`: the key annotation, the properties and application-properties
    /// sections (when there are any) and the data section around the body, each written
    /// directly, byte for byte as serde_amqp encodes them, into one reservation of the exact
    /// size. No fe2o3 message is built and nothing is cloned. A value too long for AMQP's
    /// 32-bit sizes goes to serde_amqp, which refuses it.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>, partition_key: Option<&str>) -> Result<()> {
        if self.is_bare() {
            // Two writes: no reservation (it costs more than it saves in a batch's buffer).
            if let Some(key) = partition_key {
                write_key_annotation(out, key);
            }
            return write_data_section(out, &self.body);
        }
        self.encode_with_metadata_into(out, partition_key)
    }

    /// [`encode_into`](Self::encode_into) for an event with metadata (kept out of line, so a
    /// body alone takes the short path it always took).
    #[inline(never)]
    fn encode_with_metadata_into(
        &self,
        out: &mut Vec<u8>,
        partition_key: Option<&str>,
    ) -> Result<()> {
        let Some(layout) = self.layout() else {
            return self.encode_into_serde(out, partition_key);
        };
        out.reserve(
            partition_key.map_or(0, key_annotation_len)
                + layout.len()
                + self.body.len()
                + DATA_SECTION_HEADER_MAX,
        );
        if let Some(key) = partition_key {
            write_key_annotation(out, key);
        }
        if let Some((count, content)) = layout.properties {
            out.extend_from_slice(&[0x00, 0x53, 0x73]);
            write_compound_header(out, LIST, content, count);
            for (i, field) in self.properties_fields()[..count].iter().enumerate() {
                match field {
                    // Fields 0 and 5 (message-id, correlation-id) are strings, 6 and 7
                    // (content-type, content-encoding) symbols.
                    Some(value) => write_var(out, if i < 6 { STR } else { SYM }, value.as_bytes()),
                    None => out.push(NULL),
                }
            }
        }
        if let Some(content) = layout.application {
            out.extend_from_slice(&[0x00, 0x53, 0x74]);
            let properties = self.property_list();
            write_compound_header(out, MAP, content, 2 * properties.len());
            for (key, value) in properties {
                write_var(out, STR, key.as_bytes());
                value.write(out);
            }
        }
        write_data_section(out, &self.body)
    }

    /// [`encode_into`](Self::encode_into) through serde_amqp's sections, for values the direct
    /// writer leaves to it.
    #[cold]
    fn encode_into_serde(&self, out: &mut Vec<u8>, partition_key: Option<&str>) -> Result<()> {
        if let Some(key) = partition_key {
            write_key_annotation(out, key);
        }
        if let Some(properties) = self.amqp_properties() {
            write_section(out, &properties)?;
        }
        if let Some(app) = self.application_properties() {
            write_section(out, &app)?;
        }
        write_data_section(out, &self.body)
    }

    /// The AMQP properties list's first 8 fields (message-id, user-id, to, subject, reply-to,
    /// correlation-id, content-type, content-encoding): the ones an event sets, and the ones
    /// between them it never does. The rest are never set.
    fn properties_fields(&self) -> [Option<&str>; 8] {
        [
            self.message_id(),
            None,
            None,
            None,
            None,
            self.correlation_id(),
            self.content_type(),
            self.content_encoding(),
        ]
    }

    /// The sizes of the metadata sections, or `None` when a value is too long for the direct
    /// writer (AMQP's 32-bit sizes).
    fn layout(&self) -> Option<Layout> {
        let fields = self.properties_fields();
        let properties = match fields.iter().rposition(Option::is_some) {
            // As serde_amqp: the list ends with the last field set.
            Some(last) => {
                let mut content = 0;
                for field in &fields[..=last] {
                    content += match field {
                        Some(value) => var_len(value.len())?,
                        None => 1,
                    };
                }
                Some((last + 1, compound_content(content)?))
            }
            None => None,
        };
        let application = match self.property_list().is_empty() {
            true => None,
            false => {
                let mut content = 0;
                for (key, value) in self.property_list() {
                    content += var_len(key.len())? + value.encoded_len()?;
                }
                Some(compound_content(content)?)
            }
        };
        Some(Layout {
            properties,
            application,
        })
    }
}

/// The sizes of an event's metadata sections as [`Event::encode_into`] writes them.
struct Layout {
    /// The properties list's field count and the size of its fields, if there is one.
    properties: Option<(usize, usize)>,
    /// The size of the application-properties map's entries, if there is one.
    application: Option<usize>,
}

impl Layout {
    /// The encoded size of both sections, with descriptors and headers.
    fn len(&self) -> usize {
        let section = |content: usize| 3 + compound_header_len(content) + content;
        self.properties.map_or(0, |(_, content)| section(content))
            + self.application.map_or(0, section)
    }
}

/// The one-byte null (an unset field between set ones).
const NULL: u8 = 0x40;
/// The 8- and 32-bit constructors of strings, symbols and binaries, lists and maps.
const STR: (u8, u8) = (0xa1, 0xb1);
const SYM: (u8, u8) = (0xa3, 0xb3);
const BIN: (u8, u8) = (0xa0, 0xb0);
const LIST: (u8, u8) = (0xc0, 0xd0);
const MAP: (u8, u8) = (0xc1, 0xd1);
/// The longest string, binary or compound content serde_amqp writes (its 32-bit forms count
/// the size field's own 4 bytes).
const VAR_MAX: usize = u32::MAX as usize - 4;

/// The encoded size of a string, symbol or binary of `len` bytes (the 8-bit form below 255
/// bytes, as serde_amqp), or `None` beyond [`VAR_MAX`].
fn var_len(len: usize) -> Option<usize> {
    match len {
        0..255 => Some(2 + len),
        _ if len <= VAR_MAX => Some(5 + len),
        _ => None,
    }
}

/// Appends a string, symbol or binary with the constructor pair `codes` (8-bit, 32-bit).
#[inline]
fn write_var(out: &mut Vec<u8>, codes: (u8, u8), bytes: &[u8]) {
    if bytes.len() < u8::MAX as usize {
        out.extend_from_slice(&[codes.0, bytes.len() as u8]);
    } else {
        out.push(codes.1);
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

/// `content` if a list or map may hold that many bytes of elements.
fn compound_content(content: usize) -> Option<usize> {
    (content <= VAR_MAX).then_some(content)
}

/// The size of a list or map header (constructor, size, count) around `content` bytes.
fn compound_header_len(content: usize) -> usize {
    if content < u8::MAX as usize {
        3
    } else {
        9
    }
}

/// Appends a list or map header as serde_amqp writes it: list8/map8 while the elements take
/// fewer than 255 bytes, else list32/map32; the size counts the count field.
fn write_compound_header(out: &mut Vec<u8>, codes: (u8, u8), content: usize, count: usize) {
    if content < u8::MAX as usize {
        out.extend_from_slice(&[codes.0, (content + 1) as u8, count as u8]);
    } else {
        out.push(codes.1);
        out.extend_from_slice(&((content + 4) as u32).to_be_bytes());
        out.extend_from_slice(&(count as u32).to_be_bytes());
    }
}

/// The longest data-section header: descriptor (3 bytes) and a vbin32 constructor (5 bytes).
const DATA_SECTION_HEADER_MAX: usize = 8;

/// The header of a data section around `len` bytes (as serde_amqp writes it: vbin8 below 255
/// bytes, vbin32 from there on) and how many of its bytes are used. `len` must fit a u32.
fn data_section_header(len: usize) -> ([u8; DATA_SECTION_HEADER_MAX], usize) {
    let mut header = [0x00, 0x53, 0x75, 0, 0, 0, 0, 0];
    if len < u8::MAX as usize {
        header[3] = 0xa0;
        header[4] = len as u8;
        (header, 5)
    } else {
        header[3] = 0xb0;
        header[4..8].copy_from_slice(&(len as u32).to_be_bytes());
        (header, 8)
    }
}

/// Appends one message section (annotations, properties, ...) as serde_amqp encodes it.
fn write_section<T: Serialize>(out: &mut Vec<u8>, section: &T) -> Result<()> {
    section
        .serialize(&mut serde_amqp::ser::Serializer::new(out))
        .map_err(|e| {
            Error::new(ErrorKind::Protocol, "failed to encode an AMQP message").with_source(e)
        })
}

/// Appends one AMQP data section (descriptor `0x75`, then the bytes as binary) exactly as
/// serde_amqp encodes `Data`: vbin8 below 255 bytes, vbin32 from there on.
#[inline]
fn write_data_section(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    if u32::try_from(bytes.len()).is_err() {
        return Err(Error::new(
            ErrorKind::MessageTooLarge,
            format!("an event body of {} bytes cannot be encoded", bytes.len()),
        ));
    }
    let (header, len) = data_section_header(bytes.len());
    out.extend_from_slice(&header[..len]);
    out.extend_from_slice(bytes);
    Ok(())
}

/// The encoded size of the key annotation [`write_key_annotation`] writes.
fn key_annotation_len(key: &str) -> usize {
    let value_header = if key.len() < u8::MAX as usize { 2 } else { 5 };
    let entries = 2 + PARTITION_KEY_ANNOTATION.len() + value_header + key.len();
    3 + compound_header_len(entries) + entries
}

/// Appends the message-annotations section `{x-opt-partition-key: key}` as serde_amqp
/// encodes it (PROTOCOL E.2: `00 53 72`, a map8 `c1 size 02` while it fits 255 bytes, else
/// map32; the symbol; the key as str8 below 255 bytes, else str32), without building a map:
/// batches whose events carry keys of their own write one per event.
fn write_key_annotation(out: &mut Vec<u8>, key: &str) {
    const SYMBOL: &[u8] = PARTITION_KEY_ANNOTATION.as_bytes();
    // The usual key (its annotation map within 255 bytes): the 29 bytes before the key are
    // fixed but for two lengths, written at once.
    const SHORT_PREFIX: usize = 3 + 3 + 2 + SYMBOL.len() + 2;
    const SHORT_MAX: usize = u8::MAX as usize - 1 - (SHORT_PREFIX - 6);
    const TEMPLATE: [u8; SHORT_PREFIX] = {
        let mut t = [0u8; SHORT_PREFIX];
        let head = [0x00, 0x53, 0x72, 0xc1, 0, 0x02, 0xa3, SYMBOL.len() as u8];
        let mut i = 0;
        while i < head.len() {
            t[i] = head[i];
            i += 1;
        }
        let mut i = 0;
        while i < SYMBOL.len() {
            t[head.len() + i] = SYMBOL[i];
            i += 1;
        }
        t[SHORT_PREFIX - 2] = 0xa1;
        t
    };
    if key.len() <= SHORT_MAX {
        let mut prefix = TEMPLATE;
        prefix[4] = (SHORT_PREFIX - 6 + key.len() + 1) as u8;
        prefix[SHORT_PREFIX - 1] = key.len() as u8;
        out.reserve(SHORT_PREFIX + key.len());
        out.extend_from_slice(&prefix);
        out.extend_from_slice(key.as_bytes());
        return;
    }
    let value_header = if key.len() < u8::MAX as usize { 2 } else { 5 };
    let entries = 2 + SYMBOL.len() + value_header + key.len();
    out.extend_from_slice(&[0x00, 0x53, 0x72]);
    if entries < u8::MAX as usize {
        out.extend_from_slice(&[0xc1, (entries + 1) as u8, 0x02]);
    } else {
        out.push(0xd1);
        out.extend_from_slice(&((entries + 4) as u32).to_be_bytes());
        out.extend_from_slice(&2u32.to_be_bytes());
    }
    out.extend_from_slice(&[0xa3, SYMBOL.len() as u8]);
    out.extend_from_slice(SYMBOL);
    if value_header == 2 {
        out.extend_from_slice(&[0xa1, key.len() as u8]);
    } else {
        out.push(0xb1);
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(key.as_bytes());
}

/// The message-annotations section carrying a partition key, if there is one.
#[cfg(test)]
fn annotations(
    partition_key: Option<&str>,
) -> Option<fe2o3_amqp_types::messaging::MessageAnnotations> {
    partition_key.map(|key| {
        fe2o3_amqp_types::messaging::MessageAnnotations::builder()
            .insert(PARTITION_KEY_ANNOTATION, key.to_owned())
            .build()
    })
}

/// Encodes a message exactly as it goes on the wire.
pub(crate) fn encode_message<B: serde::Serialize>(message: &Message<B>) -> Result<Vec<u8>>
where
    for<'a> Serializable<&'a Message<B>>: serde::Serialize,
{
    serde_amqp::to_vec(&Serializable(message)).map_err(|e| {
        Error::new(ErrorKind::Protocol, "failed to encode an AMQP message").with_source(e)
    })
}

/// An application property value: the AMQP simple types Event Hubs stores.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer (AMQP `long`).
    Long(i64),
    /// A 64-bit float (AMQP `double`).
    Double(f64),
    /// A UTF-8 string.
    String(String),
    /// Raw bytes.
    Binary(Vec<u8>),
    /// A point in time (AMQP `timestamp`, millisecond precision).
    Timestamp(DateTime<Utc>),
}

impl PropertyValue {
    /// The encoded size of [`write`](Self::write)'s output, or `None` when it is too long for
    /// AMQP's 32-bit sizes.
    fn encoded_len(&self) -> Option<usize> {
        match self {
            PropertyValue::Bool(_) => Some(1),
            PropertyValue::Long(-128..=127) => Some(2),
            PropertyValue::Long(_) | PropertyValue::Double(_) | PropertyValue::Timestamp(_) => {
                Some(9)
            }
            PropertyValue::String(s) => var_len(s.len()),
            PropertyValue::Binary(b) => var_len(b.len()),
        }
    }

    /// Appends the value as serde_amqp encodes its [`SimpleValue`]: booleans as `true`/`false`
    /// (0x41/0x42), a long in -128..=127 as smalllong, timestamps in milliseconds.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            PropertyValue::Bool(true) => out.push(0x41),
            PropertyValue::Bool(false) => out.push(0x42),
            PropertyValue::Long(v @ -128..=127) => out.extend_from_slice(&[0x55, *v as u8]),
            PropertyValue::Long(v) => write_fixed(out, 0x81, v.to_be_bytes()),
            PropertyValue::Double(v) => write_fixed(out, 0x82, v.to_be_bytes()),
            PropertyValue::Timestamp(t) => {
                write_fixed(out, 0x83, t.timestamp_millis().to_be_bytes())
            }
            PropertyValue::String(s) => write_var(out, STR, s.as_bytes()),
            PropertyValue::Binary(b) => write_var(out, BIN, b),
        }
    }

    fn to_simple_value(&self) -> SimpleValue {
        match self {
            PropertyValue::Bool(b) => SimpleValue::Bool(*b),
            PropertyValue::Long(v) => SimpleValue::Long(*v),
            PropertyValue::Double(v) => SimpleValue::Double((*v).into()),
            PropertyValue::String(s) => SimpleValue::String(s.clone()),
            PropertyValue::Binary(b) => SimpleValue::Binary(Binary::from(b.clone())),
            PropertyValue::Timestamp(t) => SimpleValue::Timestamp(
                fe2o3_amqp_types::primitives::Timestamp::from_milliseconds(t.timestamp_millis()),
            ),
        }
    }
}

/// Appends an 8-byte value with its constructor.
fn write_fixed(out: &mut Vec<u8>, code: u8, bytes: [u8; 8]) {
    out.push(code);
    out.extend_from_slice(&bytes);
}

impl From<bool> for PropertyValue {
    fn from(v: bool) -> Self {
        PropertyValue::Bool(v)
    }
}
impl From<i64> for PropertyValue {
    fn from(v: i64) -> Self {
        PropertyValue::Long(v)
    }
}
impl From<i32> for PropertyValue {
    fn from(v: i32) -> Self {
        PropertyValue::Long(v.into())
    }
}
impl From<f64> for PropertyValue {
    fn from(v: f64) -> Self {
        PropertyValue::Double(v)
    }
}
impl From<&str> for PropertyValue {
    fn from(v: &str) -> Self {
        PropertyValue::String(v.to_owned())
    }
}
impl From<String> for PropertyValue {
    fn from(v: String) -> Self {
        PropertyValue::String(v)
    }
}
impl From<Vec<u8>> for PropertyValue {
    fn from(v: Vec<u8>) -> Self {
        PropertyValue::Binary(v)
    }
}
impl From<DateTime<Utc>> for PropertyValue {
    fn from(v: DateTime<Utc>) -> Self {
        PropertyValue::Timestamp(v)
    }
}

/// One sensor reading: the ingestion schema hubsend's users stream.
///
/// Serialises as `{"sensor_id":"compressor-7:vibe_x","timestamp":"2025-08-19T08:30:00Z","value":42.1}`;
/// `value` may also be a string such as `"Running"`. Timestamps are kept in UTC; any RFC 3339
/// offset on input is normalised.
///
/// ```
/// let t: hubsend::Telemetry = serde_json::from_str(
///     r#"{"sensor_id":"pump-1:state","timestamp":"2025-08-19T10:30:00+02:00","value":"Running"}"#,
/// ).unwrap();
/// assert_eq!(t.timestamp.to_rfc3339(), "2025-08-19T08:30:00+00:00");
/// let event = t.to_event().unwrap();
/// assert_eq!(event.content_type(), Some("application/json"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Which sensor produced the reading, e.g. `compressor-7:vibe_x`.
    pub sensor_id: String,
    /// When the reading was taken, in UTC.
    #[serde(with = "rfc3339_utc")]
    pub timestamp: DateTime<Utc>,
    /// The reading itself.
    pub value: TelemetryValue,
}

/// A telemetry reading's value: a number or a state string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TelemetryValue {
    /// A numeric reading.
    Number(f64),
    /// A state or other textual reading, such as `"Running"`.
    Text(String),
}

impl From<f64> for TelemetryValue {
    fn from(v: f64) -> Self {
        TelemetryValue::Number(v)
    }
}
impl From<&str> for TelemetryValue {
    fn from(v: &str) -> Self {
        TelemetryValue::Text(v.to_owned())
    }
}

impl Telemetry {
    /// A reading of `value` from `sensor_id` at `timestamp`.
    pub fn new(
        sensor_id: impl Into<String>,
        timestamp: DateTime<Utc>,
        value: impl Into<TelemetryValue>,
    ) -> Telemetry {
        Telemetry {
            sensor_id: sensor_id.into(),
            timestamp,
            value: value.into(),
        }
    }

    /// The reading as a JSON event (`application/json`).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when a numeric value is not finite (JSON has no NaN).
    pub fn to_event(&self) -> Result<Event> {
        if let TelemetryValue::Number(v) = self.value {
            if !v.is_finite() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("telemetry value for `{}` is not finite", self.sensor_id),
                ));
            }
        }
        Event::json(self)
    }
}

mod rfc3339_utc {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("timestamp is not RFC 3339: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_annotation_is_written_as_serde_amqp_writes_it() {
        // Every length across both map8/map32 (231/232) and str8/str32 (254/255) limits.
        for len in (0..300).chain([70_000]) {
            let key = "ü".repeat(len / 2) + &"k".repeat(len % 2);
            let mut ours = b"before".to_vec();
            write_key_annotation(&mut ours, &key);
            let mut theirs = Vec::new();
            write_section(&mut theirs, &annotations(Some(&key)).unwrap()).unwrap();
            assert_eq!(ours[6..], theirs[..], "key of {len} bytes");
        }
    }

    #[test]
    fn telemetry_round_trips_with_number_and_text() {
        let json = r#"{"sensor_id":"compressor-7:vibe_x","timestamp":"2025-08-19T08:30:00Z","value":42.1}"#;
        let t: Telemetry = serde_json::from_str(json).unwrap();
        assert_eq!(t.value, TelemetryValue::Number(42.1));
        assert_eq!(serde_json::to_string(&t).unwrap(), json);
        let s: Telemetry = serde_json::from_str(
            r#"{"sensor_id":"p","timestamp":"2025-08-19T08:30:00.250-01:00","value":"Running"}"#,
        )
        .unwrap();
        assert_eq!(s.value, TelemetryValue::Text("Running".into()));
        assert_eq!(
            serde_json::to_value(&s).unwrap()["timestamp"],
            "2025-08-19T09:30:00.250Z"
        );
        assert!(serde_json::from_str::<Telemetry>(
            r#"{"sensor_id":"p","timestamp":"yesterday","value":1}"#
        )
        .is_err());
    }

    #[test]
    fn encoding_matches_the_documented_byte_layout() {
        // PROTOCOL.md E.2: annotations{x-opt-partition-key:"pk"} + data "hello" = 41 bytes.
        let bytes = Event::new(b"hello".to_vec()).encode(Some("pk")).unwrap();
        let mut expected = vec![0x00, 0x53, 0x72, 0xc1, 0x1a, 0x02, 0xa3, 0x13];
        expected.extend_from_slice(b"x-opt-partition-key");
        expected.extend_from_slice(&[0xa1, 0x02, b'p', b'k', 0x00, 0x53, 0x75, 0xa0, 0x05]);
        expected.extend_from_slice(b"hello");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn direct_encoding_equals_serde_amqp_message_encoding() {
        let ts = DateTime::from_timestamp_millis(1_755_592_200_000).unwrap();
        let events = [
            Event::new(Vec::new()),
            Event::new(vec![7u8; 100]),
            Event::new(vec![1u8; 254]),
            Event::new(vec![2u8; 255]),
            Event::new(vec![3u8; 70_000]),
            Event::new(b"{}".to_vec())
                .with_content_type("application/json")
                .with_message_id("m-1")
                .with_correlation_id("c-1"),
            Event::new(b"x".to_vec())
                .with_property("site", "plant-3")
                .with_property("n", 42i64)
                .with_property("ok", true)
                .with_property("t", ts)
                .with_property("raw", vec![0u8, 1]),
        ];
        for event in &events {
            for key in [None, Some("compressor-7")] {
                let expected = encode_message(&event.to_message(key)).unwrap();
                assert_eq!(
                    event.encode(key).unwrap(),
                    expected,
                    "{event:?} key {key:?}"
                );
            }
        }
    }

    /// `event`'s direct encoding against serde_amqp's encoding of the same message, without
    /// and with a partition key.
    fn assert_encodes_as_serde_amqp(event: &Event, what: &str) {
        for key in [None, Some("compressor-7"), Some(&*"k".repeat(300))] {
            let expected = encode_message(&event.to_message(key)).unwrap();
            let mut ours = b"before".to_vec();
            event.encode_into(&mut ours, key).unwrap();
            assert_eq!(&ours[..6], b"before", "{what}: appends");
            assert_eq!(ours[6..], expected[..], "{what} ({event:?}), key {key:?}");
        }
    }

    #[test]
    fn properties_and_values_are_written_as_serde_amqp_writes_them() {
        let ts = |ms| PropertyValue::Timestamp(DateTime::from_timestamp_millis(ms).unwrap());
        let values = [
            PropertyValue::Bool(true),
            PropertyValue::Bool(false),
            PropertyValue::Long(0),
            PropertyValue::Long(-128),
            PropertyValue::Long(127),
            PropertyValue::Long(128),
            PropertyValue::Long(-129),
            PropertyValue::Long(i64::MIN),
            PropertyValue::Long(i64::MAX),
            PropertyValue::Double(42.1),
            PropertyValue::Double(-0.0),
            PropertyValue::Double(f64::INFINITY),
            PropertyValue::Double(f64::MIN_POSITIVE),
            ts(0),
            ts(1_755_592_200_000),
            ts(-86_400_001),
            PropertyValue::String(String::new()),
            PropertyValue::String("Grüße, 温度 🌡".into()),
            PropertyValue::Binary(Vec::new()),
            PropertyValue::Binary(vec![0, 0xff, 0x40]),
        ];
        for (i, value) in values.iter().enumerate() {
            let event = Event::new(b"{}".to_vec()).with_property("v", value.clone());
            assert_encodes_as_serde_amqp(&event, &format!("value {i}"));
        }
        let event = values
            .iter()
            .enumerate()
            .fold(Event::new(vec![9u8; 100]), |e, (i, v)| {
                e.with_property(format!("p{i}"), v.clone())
            });
        assert_encodes_as_serde_amqp(&event, "all values");
        // NaN compares unequal to itself: the bytes are compared, never the events.
        let nan = Event::new(Vec::new()).with_property("nan", f64::NAN);
        assert_encodes_as_serde_amqp(&nan, "NaN");
    }

    #[test]
    fn every_properties_field_combination_is_written_as_serde_amqp_writes_it() {
        for mask in 0..16u8 {
            for len in [0, 1, 254, 255, 256] {
                let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
                assert_eq!(text.len(), len);
                let mut event = Event::new(b"body".to_vec());
                if mask & 1 != 0 {
                    event = event.with_message_id(text.clone());
                }
                if mask & 2 != 0 {
                    event = event.with_correlation_id(text.clone());
                }
                if mask & 4 != 0 {
                    event = event.with_content_type(text.replace('é', "j"));
                }
                if mask & 8 != 0 {
                    event = event.with_content_encoding(text.replace('é', "u"));
                }
                assert_encodes_as_serde_amqp(&event, &format!("fields {mask:04b}, {len} bytes"));
                let event = event.with_property("k", text);
                assert_encodes_as_serde_amqp(&event, &format!("fields {mask:04b} + one property"));
            }
        }
    }

    #[test]
    fn lengths_around_the_8_bit_limits_are_written_as_serde_amqp_writes_them() {
        // Single strings, keys and binaries of 253..=257 bytes (str8/str32, vbin8/vbin32) and
        // sections whose content crosses 255 bytes (list8/list32, map8/map32) one byte at a time.
        for len in 200..300 {
            let text = "s".repeat(len);
            let events = [
                Event::new(Vec::new()).with_message_id(text.clone()),
                Event::new(Vec::new()).with_content_type(text.clone()),
                Event::new(Vec::new())
                    .with_correlation_id("c")
                    .with_content_encoding(text.clone()),
                Event::new(Vec::new()).with_property(text.clone(), true),
                Event::new(Vec::new()).with_property("k", text.clone()),
                Event::new(Vec::new()).with_property("k", text.clone().into_bytes()),
                Event::new(vec![1u8; len])
                    .with_content_type("application/json")
                    .with_property("a", 1i64)
                    .with_property("b", "x".repeat(len - 190)),
            ];
            for (i, event) in events.iter().enumerate() {
                assert_encodes_as_serde_amqp(event, &format!("shape {i}, {len} bytes"));
            }
        }
    }

    #[test]
    fn random_events_are_written_as_serde_amqp_writes_them() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(16);
        let text = |rng: &mut StdRng| {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(0..4),
                1 => rng.gen_range(250..260),
                2 => rng.gen_range(0..600),
                _ => rng.gen_range(0..40),
            };
            (0..len)
                .map(|_| ['a', 'Z', '-', 'ß', '€', '🚀'][rng.gen_range(0..6)])
                .collect::<String>()
        };
        for round in 0..500 {
            let mut event = Event::new(vec![b'b'; rng.gen_range(0..400)]);
            if rng.gen_bool(0.5) {
                event = event.with_content_type(text(&mut rng));
            }
            if rng.gen_bool(0.3) {
                event = event.with_content_encoding(text(&mut rng));
            }
            if rng.gen_bool(0.3) {
                event = event.with_message_id(text(&mut rng));
            }
            if rng.gen_bool(0.3) {
                event = event.with_correlation_id(text(&mut rng));
            }
            for _ in 0..rng.gen_range(0..12) {
                let value = match rng.gen_range(0..6) {
                    0 => PropertyValue::Bool(rng.gen()),
                    1 => PropertyValue::Long(match rng.gen_bool(0.5) {
                        true => rng.gen_range(-300..300),
                        false => rng.gen(),
                    }),
                    2 => PropertyValue::Double(rng.gen::<f64>() * 1e6),
                    3 => PropertyValue::String(text(&mut rng)),
                    4 => PropertyValue::Binary(text(&mut rng).into_bytes()),
                    _ => PropertyValue::Timestamp(
                        DateTime::from_timestamp_millis(rng.gen_range(-1e13 as i64..1e13 as i64))
                            .unwrap(),
                    ),
                };
                event = event.with_property(text(&mut rng), value);
            }
            assert_encodes_as_serde_amqp(&event, &format!("round {round}"));
        }
    }

    #[test]
    fn encode_into_reserves_exactly_what_it_writes() {
        let event = Event::new(vec![5u8; 300])
            .with_content_type("application/json")
            .with_message_id("m")
            .with_property("site", "plant-3")
            .with_property("n", 1_000i64);
        let mut out = Vec::new();
        event.encode_into(&mut out, Some("compressor-7")).unwrap();
        let layout = event.layout().unwrap();
        assert_eq!(
            out.len(),
            key_annotation_len("compressor-7") + layout.len() + 300 + 8
        );
        for len in [0, 1, 231, 232, 254, 255, 256, 70_000] {
            let key = "k".repeat(len);
            let mut out = Vec::new();
            write_key_annotation(&mut out, &key);
            assert_eq!(out.len(), key_annotation_len(&key), "key of {len} bytes");
            // A body alone is sized without encoding it; batches count on that size.
            for body in [0, 1, 254, 255, 1000] {
                let event = Event::new(vec![1u8; body]);
                for key in [None, Some(key.as_str())] {
                    assert_eq!(
                        event.bare_encoded_len(key),
                        Some(event.encode(key).unwrap().len()),
                        "body {body}, key {:?} bytes",
                        key.map(str::len)
                    );
                }
            }
        }
        assert_eq!(event.bare_encoded_len(None), None, "not bare");
    }

    #[test]
    fn debug_hides_the_body() {
        let e = Event::new(b"secret-payload".to_vec());
        assert!(!format!("{e:?}").contains("secret"));
    }
}
