//! Idempotent publishing ("idempotent retries", PROTOCOL-2 §I): the per-partition producer
//! state a hub hands out, the annotations that stamp each event with its sequence number, and
//! their arithmetic (numbers run to `i32::MAX` and start over at 0).
//!
//! # What is guaranteed
//! With [`ProducerOptions::idempotent`](crate::ProducerOptions::idempotent) on, every event
//! goes to a partition link that negotiated `com.microsoft:idempotent-producer`, and carries
//! its partition's producer id, epoch and its own sequence number. A delivery keeps the
//! numbers it was first sent with through every retry, re-attach and reconnect, so the hub
//! acknowledges a resend of something it already stored without storing it again:
//! **no event is stored twice because hubsend retried it, for as long as this producer's
//! state survives** (the producer lives, or a restarted one is given
//! [`Producer::publishing_state`](crate::Producer::publishing_state) back through
//! [`ProducerOptions::publishing_state`](crate::ProducerOptions::publishing_state)).
//!
//! What it does not cover: events the application sends twice itself; a restart without the
//! saved state (the new producer gets a new id, and what the old one had in flight may be
//! stored again if the application resends it); and a delivery that fails for good (its
//! deadline or retry budget ran out) while its outcome was unknown — the partition's state is
//! then started afresh (a new producer id), and that one delivery may or may not have been
//! stored. `com.microsoft:producer-epoch-stolen` (another producer took the partition over
//! with a higher epoch) fails that partition's deliveries with
//! [`Condition::ProducerEpochStolen`](crate::Condition::ProducerEpochStolen).

use std::sync::OnceLock;

use fe2o3_amqp_types::messaging::MessageAnnotations;
use fe2o3_amqp_types::primitives::{Symbol, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::event::PARTITION_KEY_ANNOTATION;

/// The link capability that turns idempotent publishing on.
pub(crate) const CAPABILITY: &str = "com.microsoft:idempotent-producer";
/// Attach property and event annotation: the producer (group) id, an AMQP long.
pub(crate) const PRODUCER_ID: &str = "com.microsoft:producer-id";
/// Attach property and event annotation: the owner level (epoch), an AMQP short.
pub(crate) const EPOCH: &str = "com.microsoft:producer-epoch";
/// Attach property and event annotation: the sequence number, an AMQP int.
pub(crate) const SEQUENCE: &str = "com.microsoft:producer-sequence-number";

/// One partition's idempotent publishing state: who the hub knows this producer as there,
/// and the last sequence number the hub confirmed storing.
///
/// Read it with [`Producer::publishing_state`](crate::Producer::publishing_state) (for
/// example when shutting down) and hand it to a new producer with
/// [`ProducerOptions::publishing_state`](crate::ProducerOptions::publishing_state) so it
/// continues where the old one stopped. Serialisable with serde.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPublishingState {
    /// The partition id.
    pub partition_id: String,
    /// The producer (group) id the hub assigned.
    pub producer_group_id: i64,
    /// The owner level (epoch) the hub assigned.
    pub owner_level: i16,
    /// The last sequence number the hub confirmed storing; -1 before the first.
    pub last_published_sequence_number: i32,
}

impl PartitionPublishingState {
    /// A partition's state, as read earlier from
    /// [`Producer::publishing_state`](crate::Producer::publishing_state).
    pub fn new(
        partition_id: impl Into<String>,
        producer_group_id: i64,
        owner_level: i16,
        last_published_sequence_number: i32,
    ) -> PartitionPublishingState {
        PartitionPublishingState {
            partition_id: partition_id.into(),
            producer_group_id,
            owner_level,
            last_published_sequence_number,
        }
    }

    /// Checks the bounds the service imposes (id ≥ 0, epoch ≥ 0, sequence ≥ -1).
    pub(crate) fn validate(&self) -> Result<()> {
        if self.producer_group_id < 0
            || self.owner_level < 0
            || self.last_published_sequence_number < -1
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "publishing state for partition `{}` is out of range (producer id {}, owner level {}, sequence {})",
                    self.partition_id,
                    self.producer_group_id,
                    self.owner_level,
                    self.last_published_sequence_number
                ),
            ));
        }
        Ok(())
    }
}

/// The numbers a delivery's events are stamped with: the link's producer id and epoch, and
/// the first event's sequence number (the others follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    pub(crate) first: i32,
}

/// `s` advanced by `n` on the ring of sequence numbers (0..=i32::MAX).
pub(crate) fn seq_add(s: i32, n: u64) -> i32 {
    const RING: i64 = 1 << 31;
    ((s as i64 + (n % RING as u64) as i64).rem_euclid(RING)) as i32
}

/// Whether sequence number `a` lies at or behind `b` on the ring (within half of it).
pub(crate) fn seq_at_or_before(a: i32, b: i32) -> bool {
    const RING: i64 = 1 << 31;
    (b as i64 - a as i64).rem_euclid(RING) < RING / 2
}

/// The message-annotations section of one stamped event (or of a batch envelope, without
/// `key`).
pub(crate) fn annotations(
    key: Option<&str>,
    producer_id: i64,
    epoch: i16,
    seq: i32,
) -> MessageAnnotations {
    let mut builder = MessageAnnotations::builder();
    if let Some(key) = key {
        builder = builder.insert(PARTITION_KEY_ANNOTATION, key.to_owned());
    }
    builder
        .insert(Symbol::from(PRODUCER_ID), Value::Long(producer_id))
        .insert(Symbol::from(EPOCH), Value::Short(epoch))
        .insert(Symbol::from(SEQUENCE), Value::Int(seq))
        .build()
}

/// Appends the annotations section of one stamped event to `out`.
pub(crate) fn write_annotations(
    out: &mut Vec<u8>,
    key: Option<&str>,
    producer_id: i64,
    epoch: i16,
    seq: i32,
) -> Result<()> {
    annotations(key, producer_id, epoch, seq)
        .serialize(&mut serde_amqp::ser::Serializer::new(out))
        .map_err(|e| {
            Error::new(ErrorKind::Protocol, "failed to encode an AMQP message").with_source(e)
        })
}

/// One delivery's stamp, encoded once: the annotations section with a placeholder sequence
/// number written as a full-width AMQP int, which each event's copy overwrites with its own
/// number (a full-width int is a valid encoding of any number, and as wide as the reserve).
pub(crate) struct Template {
    bytes: Vec<u8>,
    /// Where the sequence number's four bytes start.
    at: usize,
}

impl Template {
    /// A placeholder that serde_amqp writes as a full-width int and that cannot occur in
    /// text (0xC0 is never UTF-8).
    const PLACEHOLDER: i32 = 0x5EC0_5EC0;

    pub(crate) fn new(key: Option<&str>, producer_id: i64, epoch: i16) -> Result<Template> {
        let mut bytes = Vec::new();
        write_annotations(&mut bytes, key, producer_id, epoch, Self::PLACEHOLDER)?;
        let mut pattern = [0x71u8; 5];
        pattern[1..].copy_from_slice(&Self::PLACEHOLDER.to_be_bytes());
        // The sequence number is the map's last entry: its last occurrence is the one.
        let at = bytes
            .windows(5)
            .rposition(|w| w == pattern)
            .map(|i| i + 1)
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "failed to encode an AMQP message"))?;
        Ok(Template { bytes, at })
    }

    /// Appends the annotations section stamped with `seq` to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, seq: i32) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        out[start + self.at..start + self.at + 4].copy_from_slice(&seq.to_be_bytes());
    }
}

/// The bytes stamping adds to one event (or to an envelope, without `key`) at most: the
/// annotations encoded with the widest values. Real numbers encode to as many bytes or fewer.
pub(crate) fn reserve(key: Option<&str>) -> Result<u64> {
    static KEYLESS: OnceLock<u64> = OnceLock::new();
    size_per_key(&KEYLESS, key, |key| {
        let mut out = Vec::new();
        write_annotations(&mut out, key, i64::MAX, i16::MAX, i32::MAX)?;
        Ok(out.len() as u64)
    })
}

/// The bytes giving a stamp (sized by [`reserve`] without a key) the partition key `key` adds
/// at most: the map entry (the `x-opt-partition-key` symbol, 21 bytes, and the string with
/// its widest header, 5 bytes) and the map header's growth from 8-bit to 32-bit sizes (6).
/// Cheap enough to compute per event, for batches whose events carry keys of their own.
pub(crate) fn key_reserve(key: &str) -> usize {
    const SYMBOL: usize = 2 + PARTITION_KEY_ANNOTATION.len();
    SYMBOL + 5 + key.len() + 6
}

/// `measure(key)`, with the keyless answer computed once and kept in `keyless`.
pub(crate) fn size_per_key(
    keyless: &OnceLock<u64>,
    key: Option<&str>,
    measure: impl Fn(Option<&str>) -> Result<u64>,
) -> Result<u64> {
    match (key, keyless.get()) {
        (None, Some(size)) => Ok(*size),
        (None, None) => {
            let size = measure(None)?;
            Ok(*keyless.get_or_init(|| size))
        }
        (Some(key), _) => measure(Some(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_wrap_after_i32_max() {
        assert_eq!(seq_add(5, 3), 8);
        assert_eq!(seq_add(i32::MAX, 1), 0);
        assert_eq!(seq_add(i32::MAX - 1, 3), 1);
        assert_eq!(seq_add(-1, 1), 0);
        assert!(seq_at_or_before(3, 3));
        assert!(seq_at_or_before(i32::MAX, 2));
        assert!(!seq_at_or_before(2, i32::MAX));
    }

    #[test]
    fn the_template_stamps_what_serde_amqp_decodes() {
        use fe2o3_amqp_types::messaging::MessageAnnotations;
        for key in [None, Some("compressor-7:vibe_x")] {
            let template = Template::new(key, 1_000, 3).unwrap();
            for seq in [0, 5, 127, 128, i32::MAX] {
                let mut out = Vec::new();
                template.write(&mut out, seq);
                assert!(out.len() as u64 <= reserve(key).unwrap());
                let decoded: MessageAnnotations = serde_amqp::from_slice(&out).unwrap();
                let get = |k: &str| {
                    decoded
                        .0
                        .get(&fe2o3_amqp_types::messaging::annotations::OwnedKey::Symbol(
                            Symbol::from(k),
                        ))
                        .cloned()
                };
                assert_eq!(get(SEQUENCE), Some(Value::Int(seq)));
                assert_eq!(get(PRODUCER_ID), Some(Value::Long(1_000)));
                assert_eq!(get(EPOCH), Some(Value::Short(3)));
            }
        }
    }

    #[test]
    fn a_keys_reserve_bounds_what_it_adds_to_a_stamp() {
        let keyless = reserve(None).unwrap();
        for len in [0, 1, 40, 200, 230, 254, 255, 256, 300, 1000] {
            let key = "k".repeat(len);
            let keyed = reserve(Some(&key)).unwrap();
            assert!(
                keyed <= keyless + key_reserve(&key) as u64,
                "key of {len} bytes"
            );
        }
    }

    #[test]
    fn the_reserve_bounds_every_real_stamp() {
        for key in [None, Some("compressor-7:vibe_x")] {
            let max = reserve(key).unwrap();
            for (id, epoch, seq) in [(0, 0, 0), (1_000, 3, 127), (i64::MAX, i16::MAX, i32::MAX)] {
                let mut out = Vec::new();
                write_annotations(&mut out, key, id, epoch, seq).unwrap();
                assert!(out.len() as u64 <= max, "{id} {epoch} {seq}");
            }
        }
    }
}
