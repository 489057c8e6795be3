//! Walking AMQP encodings without decoding them: value and section boundaries, the data
//! sections of a batch, and the `x-opt-partition-key` annotation.
//!
//! The hub stores what producers send as raw bytes and decodes an event only when someone reads
//! it, so the hot path needs only where things are, which the encoding's constructor bytes tell
//! (AMQP 1.0 §1.2: the high nibble of a constructor gives its width or size-prefix length).

/// Section descriptor codes (AMQP 1.0 §3.2).
pub(crate) const HEADER: u8 = 0x70;
pub(crate) const DELIVERY_ANNOTATIONS: u8 = 0x71;
pub(crate) const MESSAGE_ANNOTATIONS: u8 = 0x72;
pub(crate) const DATA: u8 = 0x75;
const AMQP_SEQUENCE: u8 = 0x76;
const AMQP_VALUE: u8 = 0x77;
const FOOTER: u8 = 0x78;

/// Whether a section code is a body section (data, amqp-sequence or amqp-value).
pub(crate) fn is_body(code: u8) -> bool {
    (DATA..=AMQP_VALUE).contains(&code)
}

/// How deep descriptors may nest inside one value.
const MAX_DEPTH: u32 = 16;

fn be32(buf: &[u8], at: usize) -> Option<usize> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// End of the value starting at `pos`, or `None` when it is malformed or runs past the end.
pub(crate) fn skip_value(buf: &[u8], pos: usize) -> Option<usize> {
    skip_at_depth(buf, pos, 0)
}

fn skip_at_depth(buf: &[u8], pos: usize, depth: u32) -> Option<usize> {
    let code = *buf.get(pos)?;
    if code == 0x00 {
        if depth >= MAX_DEPTH {
            return None;
        }
        let value = skip_at_depth(buf, pos + 1, depth + 1)?;
        return skip_at_depth(buf, value, depth + 1);
    }
    let body = pos + 1;
    let end = match code >> 4 {
        0x4 => Some(body),
        0x5 => body.checked_add(1),
        0x6 => body.checked_add(2),
        0x7 => body.checked_add(4),
        0x8 => body.checked_add(8),
        0x9 => body.checked_add(16),
        0xa | 0xc | 0xe => (body + 1).checked_add(*buf.get(body)? as usize),
        0xb | 0xd | 0xf => (body + 4).checked_add(be32(buf, body)?),
        _ => None,
    }?;
    (end <= buf.len()).then_some(end)
}

/// Code of a section descriptor at `pos` (numeric or symbolic), and where the descriptor ends.
fn section_code(buf: &[u8], pos: usize) -> Option<(u8, usize)> {
    match *buf.get(pos)? {
        0x53 => Some((*buf.get(pos + 1)?, pos + 2)),
        0x80 => {
            let b = buf.get(pos + 1..pos + 9)?;
            let code = u64::from_be_bytes(b.try_into().ok()?);
            Some((u8::try_from(code).ok()?, pos + 9))
        }
        0xa3 | 0xb3 => {
            let end = skip_value(buf, pos)?;
            let start = if buf[pos] == 0xa3 { pos + 2 } else { pos + 5 };
            let code = match &buf[start..end] {
                b"amqp:header:list" => 0x70,
                b"amqp:delivery-annotations:map" => 0x71,
                b"amqp:message-annotations:map" => 0x72,
                b"amqp:properties:list" => 0x73,
                b"amqp:application-properties:map" => 0x74,
                b"amqp:data:binary" => 0x75,
                b"amqp:amqp-sequence:list" => 0x76,
                b"amqp:amqp-value:*" => 0x77,
                b"amqp:footer:map" => 0x78,
                _ => return None,
            };
            Some((code, end))
        }
        _ => None,
    }
}

/// One section of an encoded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Section {
    /// Descriptor code, 0x70 (header) ..= 0x78 (footer).
    pub code: u8,
    /// Where the section's value starts (its constructor byte).
    pub value: usize,
    /// Where the section ends.
    pub end: usize,
}

/// Whether a section's value has a type its section allows (null is allowed for the optional
/// map and list sections).
fn value_fits(code: u8, constructor: u8) -> bool {
    let list = matches!(constructor, 0x45 | 0xc0 | 0xd0);
    let map = matches!(constructor, 0xc1 | 0xd1);
    match code {
        HEADER | 0x73 => list || constructor == 0x40,
        0x71 | MESSAGE_ANNOTATIONS | 0x74 | FOOTER => map || constructor == 0x40,
        DATA => matches!(constructor, 0xa0 | 0xb0),
        AMQP_SEQUENCE => list,
        AMQP_VALUE => true,
        _ => false,
    }
}

/// Iterator over the sections of an encoded message; yields `None` (and stops) at the first
/// thing that makes it not a message: an unknown or misplaced section, a value of the wrong type
/// for its section, or bytes that run past the end.
pub(crate) struct Sections<'a> {
    buf: &'a [u8],
    pos: usize,
    last: u8,
    done: bool,
}

impl<'a> Sections<'a> {
    /// Walks `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            last: 0,
            done: false,
        }
    }

    fn step(&mut self) -> Option<Section> {
        let buf = self.buf;
        let pos = self.pos;
        // Fast path for the section a batch is made of: a data section after nothing but
        // non-body sections or data sections.
        if let Some(&[0x00, 0x53, DATA, c]) = buf.get(pos..pos + 4) {
            if self.last <= DATA {
                let end = match c {
                    0xa0 => (pos + 5).checked_add(*buf.get(pos + 4)? as usize),
                    0xb0 => (pos + 8).checked_add(be32(buf, pos + 4)?),
                    _ => return None,
                }?;
                if end > buf.len() {
                    return None;
                }
                self.last = DATA;
                self.pos = end;
                return Some(Section {
                    code: DATA,
                    value: pos + 3,
                    end,
                });
            }
        }
        if buf[pos] != 0x00 {
            return None;
        }
        let (code, value) = match buf.get(pos + 1..pos + 3) {
            // The usual small-ulong descriptor, inline.
            Some([0x53, c]) => (*c, pos + 3),
            _ => section_code(buf, pos + 1)?,
        };
        let last = self.last;
        let repeatable_body = code == last && (code == DATA || code == AMQP_SEQUENCE);
        if !(HEADER..=FOOTER).contains(&code) || (code <= last && !repeatable_body) {
            return None;
        }
        // One kind of body only.
        if is_body(code) && is_body(last) && !repeatable_body {
            return None;
        }
        if !value_fits(code, *buf.get(value)?) {
            return None;
        }
        let end = skip_value(buf, value)?;
        self.last = code;
        self.pos = end;
        Some(Section { code, value, end })
    }
}

impl Iterator for Sections<'_> {
    type Item = Option<Section>;

    fn next(&mut self) -> Option<Option<Section>> {
        if self.done || self.pos >= self.buf.len() {
            return None;
        }
        let s = self.step();
        self.done = s.is_none();
        Some(s)
    }
}

/// Whether `buf` is an encoded message (at least one section, nothing else); returns its
/// message-annotations section when it is one.
pub(crate) fn check_message(buf: &[u8]) -> Option<Option<Section>> {
    // Fast path: a message that is one short data section.
    if let [0x00, 0x53, DATA, 0xa0, len, ..] = *buf {
        if len as usize + 5 == buf.len() {
            return Some(None);
        }
    }
    let mut annotations = None;
    let mut any = false;
    for s in Sections::new(buf) {
        let s = s?;
        any = true;
        if s.code == MESSAGE_ANNOTATIONS {
            annotations = Some(s);
        }
    }
    any.then_some(annotations)
}

/// The sections of an encoded message, or `None` when it is not one (see [`Sections`]).
#[cfg(test)]
fn sections(buf: &[u8]) -> Option<Vec<Section>> {
    let out = Sections::new(buf).collect::<Option<Vec<_>>>()?;
    (!out.is_empty()).then_some(out)
}

/// Bytes of a data section's binary (the section must be a [`DATA`] section from [`sections`]).
pub(crate) fn data_range(buf: &[u8], s: &Section) -> Option<(usize, usize)> {
    match *buf.get(s.value)? {
        0xa0 => Some((s.value + 2, s.end)),
        0xb0 => Some((s.value + 5, s.end)),
        _ => None,
    }
}

/// A string or symbol value at `pos`, as UTF-8 text.
fn text_at(buf: &[u8], pos: usize) -> Option<(bool, &str)> {
    let end = skip_value(buf, pos)?;
    let (is_symbol, start) = match *buf.get(pos)? {
        0xa1 => (false, pos + 2),
        0xb1 => (false, pos + 5),
        0xa3 => (true, pos + 2),
        0xb3 => (true, pos + 5),
        _ => return None,
    };
    std::str::from_utf8(&buf[start..end])
        .ok()
        .map(|t| (is_symbol, t))
}

/// The `x-opt-partition-key` annotation (a symbol key with a string or symbol value) in the
/// message-annotations section `s` of `buf`.
pub(crate) fn partition_key(buf: &[u8], s: &Section) -> Option<String> {
    let at = annotation(buf, s, "x-opt-partition-key")?;
    text_at(buf, at).map(|(_, t)| t.to_string())
}

/// Where the value of the annotation with symbol key `key` starts in the message-annotations
/// section `s` of `buf`.
fn annotation(buf: &[u8], s: &Section, key: &str) -> Option<usize> {
    let (count, mut pos) = match *buf.get(s.value)? {
        0xc1 => (*buf.get(s.value + 2)? as usize, s.value + 3),
        0xd1 => (be32(buf, s.value + 5)?, s.value + 9),
        _ => return None,
    };
    for _ in 0..count / 2 {
        let key_end = skip_value(buf, pos)?;
        let value_end = skip_value(buf, key_end)?;
        if text_at(buf, pos) == Some((true, key)) {
            return Some(key_end);
        }
        pos = value_end;
    }
    None
}

/// An integer annotation (AMQP short, int or long in any of their encodings) with symbol key
/// `key` in the message-annotations section `s` of `buf`. `None` when absent, null or not an
/// integer.
pub(crate) fn integer_annotation(buf: &[u8], s: &Section, key: &str) -> Option<i64> {
    let at = annotation(buf, s, key)?;
    let bytes = |n: usize| buf.get(at + 1..at + 1 + n);
    match *buf.get(at)? {
        // smallint, smalllong
        0x54 | 0x55 => bytes(1).map(|b| b[0] as i8 as i64),
        // short
        0x61 => bytes(2).map(|b| i16::from_be_bytes([b[0], b[1]]) as i64),
        // int
        0x71 => bytes(4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64),
        // long
        0x81 => {
            bytes(8).map(|b| i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{
        message::__private::Serializable, AmqpValue, ApplicationProperties, Body, Data, Header,
        Message, MessageAnnotations, Properties,
    };
    use fe2o3_amqp_types::primitives::{Binary, Value};

    fn encode(msg: Message<Body<Value>>) -> Vec<u8> {
        serde_amqp::to_vec(&Serializable(msg)).unwrap()
    }

    #[test]
    fn walks_the_sections_serde_amqp_writes() {
        let msg: Message<Body<Value>> = Message::builder()
            .header(Header::default())
            .message_annotations(
                MessageAnnotations::builder()
                    .insert("other", 5i32)
                    .insert("x-opt-partition-key", "pk-1")
                    .build(),
            )
            .properties(Properties::builder().message_id(String::from("m")).build())
            .application_properties(ApplicationProperties::builder().insert("a", 1i64).build())
            .body(Body::Data(
                vec![
                    Data(Binary::from(vec![1u8; 3])),
                    Data(Binary::from(vec![2u8; 300])),
                ]
                .into_iter()
                .collect(),
            ))
            .build();
        let buf = encode(msg);
        let s = sections(&buf).unwrap();
        let codes: Vec<u8> = s.iter().map(|s| s.code).collect();
        assert_eq!(codes, vec![0x70, 0x72, 0x73, 0x74, 0x75, 0x75]);
        assert_eq!(s.last().unwrap().end, buf.len());
        let (a, b) = data_range(&buf, &s[4]).unwrap();
        assert_eq!(&buf[a..b], &[1u8; 3]);
        let (a, b) = data_range(&buf, &s[5]).unwrap();
        assert_eq!(&buf[a..b], &[2u8; 300][..]);
        assert_eq!(partition_key(&buf, &s[1]).as_deref(), Some("pk-1"));
        assert_eq!(check_message(&buf), Some(Some(s[1])));

        let value: Message<Body<Value>> = Message::builder()
            .body(Body::Value(AmqpValue(Value::String("x".repeat(400)))))
            .build();
        let buf = encode(value);
        let s = sections(&buf).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].code, 0x77);
        assert_eq!(check_message(&buf), Some(None));
    }

    #[test]
    fn refuses_what_is_not_a_message() {
        assert!(sections(b"").is_none());
        assert!(check_message(b"").is_none());
        assert!(check_message(&[0x00, 0x53, 0x75, 0xa0, 1]).is_none());
        assert!(sections(b"hello world").is_none());
        // A data section whose length runs past the end.
        assert!(sections(&[0x00, 0x53, 0x75, 0xa0, 9, 1, 2]).is_none());
        // Data section holding a string.
        assert!(sections(&[0x00, 0x53, 0x75, 0xa1, 1, b'a']).is_none());
        // Header after the body.
        assert!(sections(&[0x00, 0x53, 0x75, 0xa0, 0, 0x00, 0x53, 0x70, 0x45]).is_none());
        // Two kinds of body.
        assert!(sections(&[0x00, 0x53, 0x75, 0xa0, 0, 0x00, 0x53, 0x77, 0x40]).is_none());
        // Trailing garbage.
        assert!(sections(&[0x00, 0x53, 0x75, 0xa0, 0, 0x99]).is_none());
        // The data-section fast path keeps the rules: vbin32 fine, after a value body not,
        // truncated not.
        assert_eq!(
            sections(&[0x00, 0x53, 0x75, 0xb0, 0, 0, 0, 2, 9, 9]).unwrap()[0].end,
            10
        );
        assert!(sections(&[0x00, 0x53, 0x77, 0x40, 0x00, 0x53, 0x75, 0xa0, 0]).is_none());
        assert!(sections(&[0x00, 0x53, 0x75, 0xb0, 0, 0, 1, 0, 9]).is_none());
        assert!(sections(&[0x00, 0x53, 0x75, 0xa1, 0]).is_none());
        assert_eq!(check_message(&[0x00, 0x53, 0x75, 0xa0, 1, 7]), Some(None));
        assert!(check_message(&[0x00, 0x53, 0x75, 0xa0, 2, 7]).is_none());
        // Symbolic descriptors are understood.
        let mut sym = vec![0x00, 0xa3, 16];
        sym.extend_from_slice(b"amqp:data:binary");
        sym.extend_from_slice(&[0xa0, 1, 7]);
        assert_eq!(sections(&sym).unwrap()[0].code, 0x75);
    }
}
