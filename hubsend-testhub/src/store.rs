//! Stored events per hub and partition, and decoding of AMQP messages into [`StoredEvent`]s.
//!
//! Events are kept as the bytes the producer sent: one shared buffer per delivery and a
//! (start, length) span per event, so storing a 1 MiB batch of 10,000 events costs one
//! allocation and 80 KB of spans. They are decoded into [`StoredEvent`]s only when read.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use fe2o3_amqp_types::{
    messaging::{message::__private::Deserializable, Body, Message, MessageId},
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
    /// IoT Hub mode: the device that sent it (`iothub-connection-device-id`, as the built-in
    /// endpoint's consumers see it).
    pub iothub_device_id: Option<String>,
}

/// Payload buffers of deliveries that retention dropped, kept for reuse: fresh memory costs
/// the hub a page fault per 4 KiB, which at a few hundred MB/s was most of its CPU.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Buffers kept at most.
    const MAX: usize = 64;
    /// Smaller buffers are not worth keeping.
    const MIN_CAPACITY: usize = 64 * 1024;

    /// Offers a buffer for reuse.
    pub(crate) fn put(&self, mut buf: Vec<u8>) {
        if buf.capacity() < Self::MIN_CAPACITY {
            return;
        }
        buf.clear();
        let mut bufs = self.bufs.lock().unwrap();
        if bufs.len() < Self::MAX {
            bufs.push(buf);
        }
    }

    /// An empty buffer of at least 64 KiB capacity, if one is pooled.
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        self.bufs.lock().unwrap().pop()
    }
}

/// Events of one hub.
#[derive(Debug, Default)]
pub(crate) struct HubStore {
    pub partitions: Vec<PartitionLog>,
    pub round_robin: u32,
    pub created_at_ms: i64,
}

impl HubStore {
    pub(crate) fn new(partitions: u32, created_at_ms: i64) -> Self {
        Self {
            partitions: (0..partitions).map(PartitionLog::new).collect(),
            round_robin: 0,
            created_at_ms,
        }
    }

    /// Events currently retained, over all partitions.
    pub(crate) fn len(&self) -> usize {
        self.partitions.iter().map(PartitionLog::len).sum()
    }
}

/// What every event of one delivery shares.
#[derive(Clone, Debug)]
pub(crate) struct DeliveryMeta {
    /// Arrived in a 0x80013700 batch.
    pub batched: bool,
    /// Target address of the producer link, as the client sent it.
    pub link_target: Arc<str>,
    /// Partition key the delivery was routed by (the envelope's, or the first event's).
    pub route_key: Option<Arc<str>>,
    /// Enqueued time, Unix milliseconds.
    pub enqueued_time_ms: i64,
    /// IoT Hub: the device-to-cloud origin the built-in endpoint stamps on each event.
    pub iot: Option<Arc<IotOrigin>>,
}

/// Who sent a device-to-cloud message, as IoT Hub's built-in endpoint tells consumers.
#[derive(Debug)]
pub(crate) struct IotOrigin {
    /// `iothub-connection-device-id`.
    pub device_id: String,
    /// `iothub-connection-auth-generation-id`: the identity's generation id.
    pub generation_id: String,
    /// `iothub-connection-auth-method`, a JSON object.
    pub auth_method: String,
}

/// The events of one delivery in one partition.
#[derive(Debug)]
struct Segment {
    /// The delivery's payload as received.
    buf: Arc<Vec<u8>>,
    /// (start, length) in `buf` of each event's encoded message.
    spans: Box<[(u32, u32)]>,
    first_seq: i64,
    first_offset: i64,
    meta: DeliveryMeta,
}

/// How far an event of `len` encoded bytes moves the partition's offset.
fn offset_step(len: u32) -> i64 {
    i64::from(len.max(1))
}

/// One partition's retained events.
#[derive(Debug)]
pub(crate) struct PartitionLog {
    partition: u32,
    segments: VecDeque<Segment>,
    /// Events at the front of `segments[0]` already dropped by retention.
    trimmed: usize,
    begin_seq: i64,
    next_seq: i64,
    next_offset: i64,
}

impl PartitionLog {
    fn new(partition: u32) -> Self {
        Self {
            partition,
            segments: VecDeque::new(),
            trimmed: 0,
            begin_seq: 0,
            next_seq: 0,
            next_offset: 0,
        }
    }

    /// Events retained.
    pub(crate) fn len(&self) -> usize {
        (self.next_seq - self.begin_seq) as usize
    }

    /// Whether no event is retained.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence number of the first retained event (= the next one's when empty).
    pub(crate) fn begin_sequence(&self) -> i64 {
        self.begin_seq
    }

    /// Sequence number the next event will get.
    pub(crate) fn next_sequence(&self) -> i64 {
        self.next_seq
    }

    /// Appends one delivery's events (`spans` into `buf`), then drops the oldest events beyond
    /// `retain`. Sequence numbers and offsets keep counting across dropped events.
    pub(crate) fn append(
        &mut self,
        buf: Arc<Vec<u8>>,
        spans: Box<[(u32, u32)]>,
        meta: DeliveryMeta,
        retain: Option<usize>,
        pool: &BufferPool,
    ) {
        if spans.is_empty() {
            return;
        }
        let count = spans.len() as i64;
        let bytes: i64 = spans.iter().map(|s| offset_step(s.1)).sum();
        self.segments.push_back(Segment {
            buf,
            spans,
            first_seq: self.next_seq,
            first_offset: self.next_offset,
            meta,
        });
        self.next_seq += count;
        self.next_offset += bytes;
        if let Some(retain) = retain {
            self.trim(retain, pool);
        }
    }

    fn trim(&mut self, retain: usize, pool: &BufferPool) {
        while self.len() > retain {
            let excess = self.len() - retain;
            let Some(front) = self.segments.front() else {
                break;
            };
            let left = front.spans.len() - self.trimmed;
            if excess >= left {
                if let Some(seg) = self.segments.pop_front() {
                    // Unless a reader still holds it.
                    if let Ok(buf) = Arc::try_unwrap(seg.buf) {
                        pool.put(buf);
                    }
                }
                self.trimmed = 0;
                self.begin_seq += left as i64;
            } else {
                self.trimmed += excess;
                self.begin_seq += excess as i64;
            }
        }
    }

    fn event(&self, seg: &Segment, index: usize, offset: i64) -> EventRef {
        let (start, len) = seg.spans[index];
        EventRef {
            partition: self.partition,
            sequence_number: seg.first_seq + index as i64,
            offset,
            buf: seg.buf.clone(),
            start,
            len,
            meta: seg.meta.clone(),
        }
    }

    /// Up to `max` retained events from sequence number `from` on (from the first retained one
    /// when `from` is older).
    pub(crate) fn range(&self, from: i64, max: usize) -> Vec<EventRef> {
        let from = from.max(self.begin_seq);
        if from >= self.next_seq || max == 0 {
            return Vec::new();
        }
        // The segment holding `from`: the last one starting at or before it.
        let mut si = self.segments.partition_point(|s| s.first_seq <= from) - 1;
        let mut index = (from - self.segments[si].first_seq) as usize;
        let seg = &self.segments[si];
        let mut offset = seg.first_offset
            + seg.spans[..index]
                .iter()
                .map(|s| offset_step(s.1))
                .sum::<i64>();
        let mut out = Vec::with_capacity(max.min(self.len()));
        while out.len() < max {
            let Some(seg) = self.segments.get(si) else {
                break;
            };
            if index >= seg.spans.len() {
                si += 1;
                index = 0;
                continue;
            }
            out.push(self.event(seg, index, offset));
            offset += offset_step(seg.spans[index].1);
            index += 1;
        }
        out
    }

    /// Every retained event.
    pub(crate) fn all(&self) -> Vec<EventRef> {
        self.range(self.begin_seq, self.len())
    }

    /// The newest retained event.
    pub(crate) fn last(&self) -> Option<EventRef> {
        if self.is_empty() {
            return None;
        }
        let seg = self.segments.back()?;
        let index = seg.spans.len() - 1;
        let offset = self.next_offset - offset_step(seg.spans[index].1);
        Some(self.event(seg, index, offset))
    }
}

/// A stored event, still encoded; cheap to clone (the delivery's buffer is shared).
#[derive(Clone, Debug)]
pub(crate) struct EventRef {
    pub partition: u32,
    pub sequence_number: i64,
    pub offset: i64,
    buf: Arc<Vec<u8>>,
    start: u32,
    len: u32,
    pub meta: DeliveryMeta,
}

impl EventRef {
    /// The event's encoded message, as the producer sent it.
    pub(crate) fn raw(&self) -> &[u8] {
        let start = self.start as usize;
        &self.buf[start..start + self.len as usize]
    }

    /// Enqueued time, Unix milliseconds.
    pub(crate) fn enqueued_time_ms(&self) -> i64 {
        self.meta.enqueued_time_ms
    }

    /// The event decoded, if it decodes.
    pub(crate) fn message(&self) -> Option<Message<Body<Value>>> {
        serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(self.raw())
            .ok()
            .map(|d| d.0)
    }

    /// The event as the public [`StoredEvent`].
    pub(crate) fn to_stored(&self) -> StoredEvent {
        let d = match self.message() {
            Some(msg) => decode(&msg),
            None => Decoded {
                body: self.raw().to_vec(),
                ..Decoded::default()
            },
        };
        StoredEvent {
            partition: self.partition,
            sequence_number: self.sequence_number,
            offset: self.offset,
            enqueued_time_ms: self.meta.enqueued_time_ms,
            body: d.body,
            content_type: d.content_type,
            message_id: d.message_id,
            correlation_id: d.correlation_id,
            partition_key: d
                .partition_key
                .or_else(|| self.meta.route_key.as_deref().map(str::to_string)),
            application_properties: d.application_properties,
            batched: self.meta.batched,
            link_target: self.meta.link_target.to_string(),
            encoded_message: self.raw().to_vec(),
            iothub_device_id: self.meta.iot.as_ref().map(|o| o.device_id.clone()),
        }
    }
}

/// The fields of a decoded event.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub partition_key: Option<String>,
    pub application_properties: BTreeMap<String, serde_json::Value>,
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

/// The fields of one (non-batch) message.
pub(crate) fn decode(msg: &Message<Body<Value>>) -> Decoded {
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
        content_type: props.and_then(|p| p.content_type.as_ref().map(|s| s.0.clone())),
        message_id: props.and_then(|p| p.message_id.as_ref().map(message_id_string)),
        correlation_id: props.and_then(|p| p.correlation_id.as_ref().map(message_id_string)),
        partition_key: partition_key_of(msg),
        application_properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> DeliveryMeta {
        DeliveryMeta {
            batched: true,
            link_target: Arc::from("telemetry"),
            route_key: None,
            enqueued_time_ms: 7,
            iot: None,
        }
    }

    type Delivery = (Arc<Vec<u8>>, Box<[(u32, u32)]>);

    /// A delivery of `n` events of `len` bytes each, tagged with `tag`.
    fn delivery(n: usize, len: u32, tag: u8) -> Delivery {
        let buf = vec![tag; n * len as usize + 3];
        let spans = (0..n as u32).map(|i| (3 + i * len, len)).collect();
        (Arc::new(buf), spans)
    }

    #[test]
    fn offsets_and_sequence_numbers_across_deliveries() {
        let pool = BufferPool::default();
        let mut log = PartitionLog::new(2);
        assert!(log.last().is_none());
        assert!(log.range(0, 10).is_empty());
        for (n, len, tag) in [(3, 10, 1u8), (1, 0, 2), (2, 5, 3)] {
            let (buf, spans) = delivery(n, len, tag);
            log.append(buf, spans, meta(), None, &pool);
        }
        let all = log.all();
        let seqs: Vec<i64> = all.iter().map(|e| e.sequence_number).collect();
        let offsets: Vec<i64> = all.iter().map(|e| e.offset).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5]);
        // An empty event still moves the offset by one.
        assert_eq!(offsets, vec![0, 10, 20, 30, 31, 36]);
        assert_eq!(all[4].raw(), &[3u8; 5]);
        assert_eq!(all[3].raw(), &[] as &[u8]);
        assert_eq!(all[0].partition, 2);
        let last = log.last().unwrap();
        assert_eq!((last.sequence_number, last.offset), (5, 36));
        let mid = log.range(1, 3);
        assert_eq!(
            mid.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![10, 20, 30]
        );
    }

    #[test]
    fn retention_drops_the_oldest_and_keeps_counting() {
        let pool = BufferPool::default();
        let mut log = PartitionLog::new(0);
        let (buf, spans) = delivery(3, 100_000, 1);
        log.append(buf, spans, meta(), Some(4), &pool);
        let (buf, spans) = delivery(2, 10, 2);
        log.append(buf, spans, meta(), Some(4), &pool);
        assert_eq!(log.len(), 4);
        assert_eq!(log.begin_sequence(), 1);
        let all = log.all();
        assert_eq!(all[0].sequence_number, 1);
        assert_eq!(all[0].offset, 100_000);
        assert_eq!(all[3].offset, 300_010);
        // Reading from before the retained range starts at its beginning.
        assert_eq!(log.range(0, 1)[0].sequence_number, 1);
        drop(all);
        let (buf, spans) = delivery(3, 10, 3);
        log.append(buf, spans, meta(), Some(4), &pool);
        assert_eq!(log.begin_sequence(), 4);
        assert_eq!(log.next_sequence(), 8);
        assert_eq!(log.all()[0].raw(), &[2u8; 10]);
        // The first delivery's buffer went to the pool.
        let reused = pool.take().expect("pooled");
        assert!(reused.is_empty() && reused.capacity() >= 300_003);
        assert!(pool.take().is_none());
    }
}
