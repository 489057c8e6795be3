//! Stored events per hub and partition, and decoding of AMQP messages into [`StoredEvent`]s.

use std::collections::BTreeMap;

use fe2o3_amqp_types::{
    messaging::{message::__private::Serializable, Body, Message, MessageId},
    primitives::{SimpleValue, Value},
};

/// One event as the hub stored it.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// Partition the event was routed to.
    pub partition: u32,
    /// Per-partition sequence number, starting at 0.
    pub sequence_number: i64,
    /// Byte offset of the event in its partition.
    pub offset: i64,
    /// Enqueued time, Unix milliseconds.
    pub enqueued_time_ms: i64,
    /// Body bytes (data sections concatenated; other body kinds AMQP-encoded).
    pub body: Vec<u8>,
    /// `properties.content-type`.
    pub content_type: Option<String>,
    /// `properties.message-id` in string form, whatever its AMQP type.
    pub message_id: Option<String>,
    /// `properties.correlation-id` in string form.
    pub correlation_id: Option<String>,
    /// The partition key the event was routed by (`x-opt-partition-key`).
    pub partition_key: Option<String>,
    /// Application properties with simple values mapped to JSON.
    pub application_properties: BTreeMap<String, serde_json::Value>,
    /// True when the event arrived inside a 0x80013700 batch.
    pub batched: bool,
    /// The target address of the link it arrived on, as the client sent it.
    pub link_target: String,
    /// The event as the client sent it, as one encoded AMQP message (all its sections); what
    /// consumers receive back, with the service's annotations added.
    pub encoded_message: Vec<u8>,
}

/// Events of one hub.
#[derive(Debug, Default)]
pub(crate) struct HubStore {
    pub partitions: Vec<Vec<StoredEvent>>,
    pub next_offset: Vec<i64>,
    pub round_robin: u32,
    pub created_at_ms: i64,
}

impl HubStore {
    pub(crate) fn new(partitions: u32, created_at_ms: i64) -> Self {
        Self {
            partitions: (0..partitions).map(|_| Vec::new()).collect(),
            next_offset: vec![0; partitions as usize],
            round_robin: 0,
            created_at_ms,
        }
    }
}

/// A decoded event before routing.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub body: Vec<u8>,
    pub encoded_len: usize,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub partition_key: Option<String>,
    pub application_properties: BTreeMap<String, serde_json::Value>,
    /// The message re-encoded (all sections).
    pub raw: Vec<u8>,
}

pub(crate) fn message_id_string(id: &MessageId) -> String {
    match id {
        MessageId::Ulong(n) => n.to_string(),
        MessageId::String(s) => s.clone(),
        MessageId::Uuid(u) => {
            let b = u.as_inner();
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            )
        }
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn simple_to_json(v: &SimpleValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        SimpleValue::Null => J::Null,
        SimpleValue::Bool(b) => J::Bool(*b),
        SimpleValue::Ubyte(n) => J::from(*n),
        SimpleValue::Ushort(n) => J::from(*n),
        SimpleValue::Uint(n) => J::from(*n),
        SimpleValue::Ulong(n) => J::from(*n),
        SimpleValue::Byte(n) => J::from(*n),
        SimpleValue::Short(n) => J::from(*n),
        SimpleValue::Int(n) => J::from(*n),
        SimpleValue::Long(n) => J::from(*n),
        SimpleValue::Float(f) => J::from(f.into_inner()),
        SimpleValue::Double(f) => J::from(f.into_inner()),
        SimpleValue::Char(c) => J::String(c.to_string()),
        SimpleValue::Timestamp(t) => J::from(t.milliseconds()),
        SimpleValue::Uuid(u) => J::String(message_id_string(&MessageId::Uuid(u.clone()))),
        SimpleValue::Binary(b) => J::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        SimpleValue::String(s) => J::String(s.clone()),
        SimpleValue::Symbol(s) => J::String(s.0.clone()),
        other => J::String(format!("{other:?}")),
    }
}

/// The `x-opt-partition-key` message annotation, if present and a string.
pub(crate) fn partition_key_of(msg: &Message<Body<Value>>) -> Option<String> {
    let ann = msg.message_annotations.as_ref()?;
    ann.0.iter().find_map(|(k, v)| {
        let key = match k {
            fe2o3_amqp_types::messaging::annotations::OwnedKey::Symbol(s) => s.0.as_str(),
            _ => return None,
        };
        if key != "x-opt-partition-key" {
            return None;
        }
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Symbol(s) => Some(s.0.clone()),
            _ => None,
        }
    })
}

/// Encoded size of a message (what the client put on the wire).
///
/// For data bodies (every Event Hubs producer's case) the sections around the body are
/// re-encoded and each data section is counted arithmetically (descriptor 3 bytes, then vbin8
/// with a 2-byte header up to 254 bytes, else vbin32 with a 5-byte header), so a 1 MiB batch is not re-serialised just to
/// be measured. Other bodies are re-encoded whole.
pub(crate) fn encoded_len(mut msg: Message<Body<Value>>) -> (usize, Message<Body<Value>>) {
    if let Body::Data(_) = &msg.body {
        let body = std::mem::replace(&mut msg.body, Body::Empty);
        let ser = Serializable(msg);
        // An empty body still encodes (as an amqp-value null): take its bytes off again.
        let empty: Message<Body<Value>> = Message::builder().body(Body::Empty).build();
        let empty_len = serde_amqp::to_vec(&Serializable(empty))
            .map(|v| v.len())
            .unwrap_or(0);
        let around = serde_amqp::to_vec(&ser)
            .map(|v| v.len())
            .unwrap_or(0)
            .saturating_sub(empty_len);
        let mut msg = ser.0;
        let sections: usize = match &body {
            Body::Data(batch) => batch
                .iter()
                // serde_amqp writes vbin8 only up to 254 bytes.
                .map(|d| d.0.len() + if d.0.len() < u8::MAX as usize { 5 } else { 8 })
                .sum(),
            _ => 0,
        };
        msg.body = body;
        return (around + sections, msg);
    }
    let ser = Serializable(msg);
    let len = serde_amqp::to_vec(&ser).map(|v| v.len()).unwrap_or(0);
    (len, ser.0)
}

/// Turns one (non-batch) message into a [`Decoded`].
pub(crate) fn decode(msg: &Message<Body<Value>>, encoded_len: usize) -> Decoded {
    let body = match &msg.body {
        Body::Data(batch) => {
            let mut out = Vec::new();
            for d in batch.iter() {
                out.extend_from_slice(&d.0);
            }
            out
        }
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => b.to_vec(),
            Value::String(s) => s.as_bytes().to_vec(),
            other => serde_amqp::to_vec(other).unwrap_or_default(),
        },
        Body::Sequence(seq) => serde_amqp::to_vec(seq).unwrap_or_default(),
        Body::Empty => Vec::new(),
    };
    let props = msg.properties.as_ref();
    let application_properties = msg
        .application_properties
        .as_ref()
        .map(|ap| {
            ap.0.iter()
                .map(|(k, v)| (k.clone(), simple_to_json(v)))
                .collect()
        })
        .unwrap_or_default();
    Decoded {
        body,
        encoded_len,
        content_type: props.and_then(|p| p.content_type.as_ref().map(|s| s.0.clone())),
        message_id: props.and_then(|p| p.message_id.as_ref().map(message_id_string)),
        correlation_id: props.and_then(|p| p.correlation_id.as_ref().map(message_id_string)),
        partition_key: partition_key_of(msg),
        application_properties,
        raw: serde_amqp::to_vec(&Serializable(msg.clone())).unwrap_or_default(),
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{Data, MessageAnnotations};
    use fe2o3_amqp_types::primitives::Binary;

    #[test]
    fn counted_size_equals_the_encoding() {
        for lens in [
            vec![0usize],
            vec![10, 254, 255, 256, 70_000],
            vec![100; 500],
        ] {
            let sections: Vec<Data> = lens
                .iter()
                .map(|n| Data(Binary::from(vec![7u8; *n])))
                .collect();
            let msg: Message<Body<Value>> = Message::builder()
                .message_annotations(
                    MessageAnnotations::builder()
                        .insert("x-opt-partition-key", "k")
                        .build(),
                )
                .body(Body::Data(sections.into_iter().collect()))
                .build();
            let exact = serde_amqp::to_vec(&Serializable(msg.clone()))
                .unwrap()
                .len();
            assert_eq!(encoded_len(msg).0, exact, "{lens:?}");
        }
    }
}
