//! Idempotent producers (PROTOCOL-2 §I): the `com.microsoft:idempotent-producer` capability
//! on partition links, the producer ids and epochs the hub hands out, and each delivery's
//! verdict by its sequence numbers (stored, acknowledged as a duplicate and dropped, or
//! refused as out of order).
//!
//! Two answers are not documented by the service and are switches ([`ResumeAnswer`],
//! [`GapAnswer`]) so clients can be tested under both.

use std::collections::HashMap;

use fe2o3_amqp_types::primitives::{OrderedMap, Symbol, Value};

/// The capability a producer link asks for.
pub(crate) const CAPABILITY: &str = "com.microsoft:idempotent-producer";
/// Attach property and message annotation: the producer (group) id, a long.
pub(crate) const PRODUCER_ID: &str = "com.microsoft:producer-id";
/// Attach property and message annotation: the owner level (epoch), a short.
pub(crate) const EPOCH: &str = "com.microsoft:producer-epoch";
/// Attach property and message annotation: a sequence number, an int.
pub(crate) const SEQUENCE: &str = "com.microsoft:producer-sequence-number";
/// Refusal of a sequence number that does not follow the last stored one.
pub(crate) const OUT_OF_ORDER: &str = "com.microsoft:out-of-order-sequence";
/// Refusal of a send from a producer whose epoch another link has taken over.
pub(crate) const EPOCH_STOLEN: &str = "com.microsoft:producer-epoch-stolen";

/// What the hub puts in `producer-sequence-number` when a producer re-attaches with state it
/// knows (the service's answer is undocumented).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResumeAnswer {
    /// The last sequence number the hub stored for the producer (the default: the service is
    /// the authority on what it stored).
    #[default]
    Stored,
    /// The sequence number the client sent, echoed back (the hub still deduplicates by what
    /// it stored).
    Echo,
}

/// What the hub does with a delivery whose first sequence number is past the next expected one.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GapAnswer {
    /// Refuse it with `com.microsoft:out-of-order-sequence` (the default, PROTOCOL-2's model).
    #[default]
    Refuse,
    /// Store it and continue numbering from its last event.
    Store,
}

/// 2^31: sequence numbers run 0..=i32::MAX and then start over at 0.
const RING: i64 = 1 << 31;

/// The sequence number after `s`.
fn next(s: i32) -> i32 {
    if s == i32::MAX {
        0
    } else {
        s + 1
    }
}

/// How far `s` lies behind `last` on the ring (0 = equal); `None` when it lies ahead (more
/// than half the ring behind counts as ahead).
fn behind(last: i32, s: i32) -> Option<i64> {
    let d = (last as i64 - s as i64).rem_euclid(RING);
    (d < RING / 2).then_some(d)
}

#[derive(Debug, Clone, Copy)]
struct State {
    epoch: i16,
    /// The last sequence number stored, -1 before the first.
    last: i32,
}

/// A producer link's identity, fixed at attach.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity {
    pub(crate) id: i64,
    pub(crate) epoch: i16,
}

/// What a client asked for in its attach properties (absent and null alike are `None`).
#[derive(Debug, Default)]
pub(crate) struct Requested {
    id: Option<i64>,
    epoch: Option<i16>,
    sequence: Option<i32>,
}

impl Requested {
    /// Reads the three properties; `Err` names one of the wrong type.
    pub(crate) fn from_properties(
        props: Option<&OrderedMap<Symbol, Value>>,
    ) -> Result<Requested, String> {
        let Some(props) = props else {
            return Ok(Requested::default());
        };
        let get = |key: &str| props.get(&Symbol::from(key));
        let int = |key: &str| -> Result<Option<i64>, String> {
            match get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Long(v)) => Ok(Some(*v)),
                Some(Value::Int(v)) => Ok(Some(*v as i64)),
                Some(Value::Short(v)) => Ok(Some(*v as i64)),
                Some(Value::Byte(v)) => Ok(Some(*v as i64)),
                Some(other) => Err(format!("{key} has the wrong type: {other:?}")),
            }
        };
        let id = int(PRODUCER_ID)?;
        let epoch = int(EPOCH)?
            .map(|e| i16::try_from(e).map_err(|_| format!("{EPOCH} {e} is out of range")))
            .transpose()?;
        let sequence = int(SEQUENCE)?
            .map(|s| i32::try_from(s).map_err(|_| format!("{SEQUENCE} {s} is out of range")))
            .transpose()?;
        Ok(Requested {
            id,
            epoch,
            sequence,
        })
    }
}

/// One event's stamp: producer id, epoch and sequence number.
pub(crate) type Stamp = (Option<i64>, Option<i64>, Option<i64>);

/// A delivery's verdict.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// New events: store them.
    Store,
    /// Already stored: acknowledge, store nothing.
    Duplicate,
    /// Refuse with this condition and description.
    Refuse(&'static str, String),
}

/// Every idempotent producer the hub knows, per hub and partition.
#[derive(Debug)]
pub(crate) struct Registry {
    next_id: i64,
    producers: HashMap<(String, u32, i64), State>,
    /// Events acknowledged as duplicates and not stored.
    pub(crate) duplicates: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            // Service-assigned ids are large numbers; start somewhere that is not 0.
            next_id: 1_000,
            producers: HashMap::new(),
            duplicates: 0,
        }
    }
}

impl Registry {
    /// Answers an idempotent attach: the identity and the sequence number to reply with, or
    /// the condition and description of a refusal.
    pub(crate) fn attach(
        &mut self,
        hub: &str,
        partition: u32,
        requested: Requested,
        resume: ResumeAnswer,
    ) -> Result<(Identity, i32), (&'static str, String)> {
        let not_allowed = |d: String| ("amqp:not-allowed", d);
        let Some(id) = requested.id else {
            if requested.epoch.is_some() || requested.sequence.is_some() {
                return Err(not_allowed(
                    "an epoch or sequence number was given without a producer id".into(),
                ));
            }
            let id = self.next_id;
            self.next_id += 1;
            self.producers.insert(
                (hub.to_owned(), partition, id),
                State { epoch: 0, last: -1 },
            );
            return Ok((Identity { id, epoch: 0 }, -1));
        };
        let key = (hub.to_owned(), partition, id);
        let Some(state) = self.producers.get_mut(&key) else {
            return Err(not_allowed(format!(
                "the producer id {id} is not known on partition {partition}"
            )));
        };
        let epoch = requested.epoch.unwrap_or(state.epoch);
        if epoch < 0 {
            return Err(not_allowed(format!("the epoch {epoch} is negative")));
        }
        if epoch < state.epoch {
            return Err((
                EPOCH_STOLEN,
                format!(
                    "the producer {id} has epoch {} on partition {partition}; {epoch} is stale",
                    state.epoch
                ),
            ));
        }
        if epoch > state.epoch {
            // A takeover: numbering starts over for the new epoch.
            *state = State { epoch, last: -1 };
            return Ok((Identity { id, epoch }, -1));
        }
        let reply = match requested.sequence {
            None => state.last,
            Some(s)
                if s != state.last
                    && (s < -1 || state.last == -1 || behind(state.last, s).is_none()) =>
            {
                return Err(not_allowed(format!(
                    "the sequence number {s} is past the last one stored ({})",
                    state.last
                )));
            }
            Some(s) => match resume {
                ResumeAnswer::Stored => state.last,
                ResumeAnswer::Echo => s,
            },
        };
        Ok((Identity { id, epoch }, reply))
    }

    /// Registers a producer as if it had published up to `last` (for tests of restarts and
    /// wrap-around).
    pub(crate) fn seed(&mut self, hub: &str, partition: u32, id: i64, epoch: i16, last: i32) {
        self.producers
            .insert((hub.to_owned(), partition, id), State { epoch, last });
    }

    /// Judges one delivery of `identity`'s link to `partition` whose events carry `stamps`,
    /// and records what was stored.
    pub(crate) fn check(
        &mut self,
        hub: &str,
        partition: u32,
        identity: Identity,
        stamps: &[Stamp],
        gaps: GapAnswer,
    ) -> Verdict {
        let Some(state) = self
            .producers
            .get_mut(&(hub.to_owned(), partition, identity.id))
        else {
            return Verdict::Refuse("amqp:not-allowed", "the producer is not known".into());
        };
        if state.epoch > identity.epoch {
            return Verdict::Refuse(
                EPOCH_STOLEN,
                format!(
                    "another link took over producer {} with epoch {}",
                    identity.id, state.epoch
                ),
            );
        }
        let mut seqs = Vec::with_capacity(stamps.len());
        for (i, stamp) in stamps.iter().enumerate() {
            let (id, epoch, seq) = *stamp;
            if id != Some(identity.id) || epoch != Some(identity.epoch as i64) {
                return Verdict::Refuse(
                    "amqp:not-allowed",
                    format!(
                        "event {i} does not carry this link's producer id and epoch ({id:?}, {epoch:?})"
                    ),
                );
            }
            let Some(seq) = seq.and_then(|s| i32::try_from(s).ok()).filter(|s| *s >= 0) else {
                return Verdict::Refuse(
                    "amqp:not-allowed",
                    format!("event {i} carries no valid {SEQUENCE}"),
                );
            };
            if let Some(prev) = seqs.last() {
                if seq != next(*prev) {
                    return Verdict::Refuse(
                        OUT_OF_ORDER,
                        format!("event {i} has sequence number {seq} after {prev}"),
                    );
                }
            }
            seqs.push(seq);
        }
        let (Some(&first), Some(&last_in)) = (seqs.first(), seqs.last()) else {
            return Verdict::Refuse("amqp:not-allowed", "the delivery carries no event".into());
        };
        let expected = next(state.last);
        let store = |state: &mut State| {
            state.last = last_in;
            Verdict::Store
        };
        if first == expected {
            return store(state);
        }
        if state.last >= 0 {
            if let (Some(from), Some(to)) = (behind(state.last, first), behind(state.last, last_in))
            {
                if to <= from {
                    self.duplicates += seqs.len() as u64;
                    tracing::debug!(
                        producer_id = identity.id,
                        first,
                        last = last_in,
                        stored = state.last,
                        "dropped a resent delivery as a duplicate"
                    );
                    return Verdict::Duplicate;
                }
            }
            if behind(state.last, first).is_some() {
                return Verdict::Refuse(
                    OUT_OF_ORDER,
                    format!(
                        "sequence numbers {first}..={last_in} straddle the last one stored ({})",
                        state.last
                    ),
                );
            }
        }
        match gaps {
            GapAnswer::Store => store(state),
            GapAnswer::Refuse => Verdict::Refuse(
                OUT_OF_ORDER,
                format!(
                    "the sequence number {first} does not follow the last one stored ({}); expected {expected}",
                    state.last
                ),
            ),
        }
    }
}

/// The attach reply's properties for an accepted idempotent producer.
pub(crate) fn reply_properties(identity: Identity, sequence: i32) -> [(Symbol, Value); 3] {
    [
        (Symbol::from(PRODUCER_ID), Value::Long(identity.id)),
        (Symbol::from(EPOCH), Value::Short(identity.epoch)),
        (Symbol::from(SEQUENCE), Value::Int(sequence)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamps(id: i64, epoch: i16, seqs: impl IntoIterator<Item = i32>) -> Vec<Stamp> {
        seqs.into_iter()
            .map(|s| (Some(id), Some(epoch as i64), Some(s as i64)))
            .collect()
    }

    #[test]
    fn numbering_duplicates_straddles_and_gaps() {
        let mut r = Registry::default();
        let (who, seq) = r
            .attach("h", 0, Requested::default(), ResumeAnswer::Stored)
            .unwrap();
        assert_eq!(seq, -1);
        let check = |r: &mut Registry, seqs: std::ops::Range<i32>, gaps| {
            r.check("h", 0, who, &stamps(who.id, who.epoch, seqs), gaps)
        };
        assert_eq!(check(&mut r, 0..10, GapAnswer::Refuse), Verdict::Store);
        assert_eq!(check(&mut r, 0..10, GapAnswer::Refuse), Verdict::Duplicate);
        assert_eq!(check(&mut r, 5..8, GapAnswer::Refuse), Verdict::Duplicate);
        assert_eq!(r.duplicates, 13);
        assert!(matches!(
            check(&mut r, 5..15, GapAnswer::Refuse),
            Verdict::Refuse(OUT_OF_ORDER, _)
        ));
        assert!(matches!(
            check(&mut r, 11..15, GapAnswer::Refuse),
            Verdict::Refuse(OUT_OF_ORDER, _)
        ));
        assert_eq!(check(&mut r, 11..15, GapAnswer::Store), Verdict::Store);
        assert_eq!(check(&mut r, 15..16, GapAnswer::Refuse), Verdict::Store);
    }

    #[test]
    fn numbers_wrap_after_i32_max() {
        let mut r = Registry::default();
        r.seed("h", 1, 7, 3, i32::MAX - 1);
        let requested = Requested {
            id: Some(7),
            epoch: Some(3),
            sequence: Some(i32::MAX - 1),
        };
        let (who, seq) = r.attach("h", 1, requested, ResumeAnswer::Stored).unwrap();
        assert_eq!(seq, i32::MAX - 1);
        let batch: Vec<Stamp> = stamps(7, 3, [i32::MAX, 0, 1]);
        assert_eq!(
            r.check("h", 1, who, &batch, GapAnswer::Refuse),
            Verdict::Store
        );
        assert_eq!(
            r.check("h", 1, who, &batch, GapAnswer::Refuse),
            Verdict::Duplicate
        );
        assert_eq!(
            r.check("h", 1, who, &stamps(7, 3, [2]), GapAnswer::Refuse),
            Verdict::Store
        );
    }

    #[test]
    fn invented_state_and_epoch_takeover() {
        let mut r = Registry::default();
        let invented = Requested {
            id: Some(100),
            epoch: Some(100),
            sequence: Some(100),
        };
        let refused = r
            .attach("h", 0, invented, ResumeAnswer::Stored)
            .unwrap_err();
        assert_eq!(refused.0, "amqp:not-allowed");
        let (old, _) = r
            .attach("h", 0, Requested::default(), ResumeAnswer::Stored)
            .unwrap();
        assert_eq!(
            r.check("h", 0, old, &stamps(old.id, 0, 0..3), GapAnswer::Refuse),
            Verdict::Store
        );
        // A resume that claims more than was stored is refused; one behind is answered
        // with what was stored (or echoed).
        let ahead = Requested {
            id: Some(old.id),
            epoch: Some(0),
            sequence: Some(9),
        };
        assert!(r.attach("h", 0, ahead, ResumeAnswer::Stored).is_err());
        let behind_ = Requested {
            id: Some(old.id),
            epoch: Some(0),
            sequence: Some(0),
        };
        assert_eq!(
            r.attach("h", 0, behind_, ResumeAnswer::Stored).unwrap().1,
            2
        );
        let behind_ = Requested {
            id: Some(old.id),
            epoch: Some(0),
            sequence: Some(0),
        };
        assert_eq!(r.attach("h", 0, behind_, ResumeAnswer::Echo).unwrap().1, 0);
        let takeover = Requested {
            id: Some(old.id),
            epoch: Some(1),
            sequence: None,
        };
        let (new, seq) = r.attach("h", 0, takeover, ResumeAnswer::Stored).unwrap();
        assert_eq!((new.epoch, seq), (1, -1));
        assert!(matches!(
            r.check("h", 0, old, &stamps(old.id, 0, 3..4), GapAnswer::Refuse),
            Verdict::Refuse(EPOCH_STOLEN, _)
        ));
        assert_eq!(
            r.check("h", 0, new, &stamps(new.id, 1, 0..1), GapAnswer::Refuse),
            Verdict::Store
        );
    }
}
