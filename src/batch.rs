//! [`EventBatch`]: events packed into one AMQP batch message (format 0x80013700) whose size is
//! counted exactly, so a batch that accepted an event is never refused by the hub for size.

use std::cell::RefCell;
use std::fmt;
use std::sync::OnceLock;

use fe2o3_amqp_types::messaging::{Batch, Data, Message, MessageAnnotations};
use fe2o3_amqp_types::primitives::Binary;

use crate::error::{Error, ErrorKind, Result};
use crate::event::{encode_message, Event, PARTITION_KEY_ANNOTATION};
use crate::idempotent::{self, Stamp};

/// The AMQP message format of an Event Hubs batch (Microsoft's vendor format 0x80013700).
pub(crate) const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;

/// Options for [`Producer::create_batch`](crate::Producer::create_batch).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct BatchOptions {
    pub(crate) partition_key: Option<String>,
    pub(crate) partition_id: Option<String>,
    pub(crate) max_size: Option<u64>,
}

impl BatchOptions {
    /// Default options: round-robin over partitions, size limit = the link's maximum.
    pub fn new() -> BatchOptions {
        BatchOptions::default()
    }

    /// Routes the whole batch by this partition key (the hub hashes it to a partition).
    pub fn partition_key(mut self, key: impl Into<String>) -> BatchOptions {
        self.partition_key = Some(key.into());
        self
    }

    /// Sends the whole batch to this partition id.
    pub fn partition_id(mut self, id: impl Into<String>) -> BatchOptions {
        self.partition_id = Some(id.into());
        self
    }

    /// Caps the batch below the link's maximum message size.
    pub fn max_size_in_bytes(mut self, bytes: u64) -> BatchOptions {
        self.max_size = Some(bytes);
        self
    }
}

/// Why [`EventBatch::try_add`] did not take an event. Either way the event is handed back.
#[non_exhaustive]
#[derive(Debug)]
pub enum TryAddError {
    /// The batch has no room left for this event: send it and add the event to a new batch.
    Full(Event),
    /// The event does not fit even into an empty batch: it can never be sent with this limit.
    TooLarge(Event),
}

impl TryAddError {
    /// The event that was not added.
    pub fn into_event(self) -> Event {
        match self {
            TryAddError::Full(e) | TryAddError::TooLarge(e) => e,
        }
    }
}

impl fmt::Display for TryAddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryAddError::Full(_) => f.write_str("the batch is full"),
            TryAddError::TooLarge(_) => {
                f.write_str("the event is larger than the batch size limit")
            }
        }
    }
}

impl std::error::Error for TryAddError {}

/// Why [`EventBatch::add_ref`] refused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// The batch has no room left for it.
    Full,
    /// It does not fit even an empty batch.
    TooLarge,
}

/// How a batch's events are encoded: AMQP sections for the AMQP transports, or elements of a
/// REST JSON batch (`application/vnd.microsoft.servicebus.json`, [`crate::servicebus_json`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Amqp,
    Json,
}

/// Where a batch or event goes: the hub (round robin), a partition key, or a partition id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct Route {
    pub(crate) partition_key: Option<String>,
    pub(crate) partition_id: Option<String>,
}

/// Events packed for one send, counted to the byte.
///
/// Created by [`Producer::create_batch`](crate::Producer::create_batch); sent by
/// [`Producer::send_batch`](crate::Producer::send_batch). Each event is encoded once, when
/// it is added; the encoded size is what the limit is checked against.
pub struct EventBatch {
    format: Format,
    route: Route,
    max_size: u64,
    /// Encoded size of the envelope without any body section (the partition key annotation).
    envelope_size: u64,
    size: u64,
    events: Encoded,
    /// For an idempotent producer: the partition the batch goes to and how its events are
    /// stamped.
    idempotent: Option<Idempotent>,
}

/// How an idempotent producer's batch is routed and stamped (PROTOCOL-2 §I): it goes to one
/// partition (a partition key is resolved on the client), and every event carries the
/// producer's annotations, with the partition key among them when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Idempotent {
    /// The partition link it goes to.
    pub(crate) partition: String,
    /// The partition key each event keeps.
    pub(crate) key: Option<String>,
    /// The bytes stamping adds to each event at most.
    per_event: u64,
}

impl fmt::Debug for EventBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBatch")
            .field("route", &self.route)
            .field("len", &self.events.len())
            .field("size", &self.size)
            .field("max_size", &self.max_size)
            .finish()
    }
}

/// Bytes a data section adds around a payload of `len` bytes: descriptor (3) + vbin8 (2) or
/// vbin32 (5) header. serde_amqp (which fe2o3 encodes with) uses vbin8 only up to 254 bytes.
fn section_overhead(len: usize) -> u64 {
    if len < u8::MAX as usize {
        5
    } else {
        8
    }
}

/// Encoded events, back to back in one buffer, with where each one ends.
///
/// One growing buffer instead of one allocation per event: adding an event is a copy, and
/// the per-event buffers fe2o3's message type needs are made (and freed) on the link's task,
/// right when the message is serialised.
#[derive(Default)]
struct Encoded {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// For stamped (idempotent) events only: each event's own partition key, written into its
    /// stamp when sent (a plain event carries its key in its own encoding). Empty while no
    /// event has one; otherwise as long as `ends`.
    keys: Vec<Option<Box<str>>>,
}

impl Encoded {
    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Each event's encoding as a data section of a batch message (copies, into buffers from
    /// this thread's [`POOL`]).
    fn to_sections(&self) -> Vec<Data> {
        POOL.with_borrow_mut(|pool| {
            let mut sections = pool.list(self.ends.len());
            let mut start = 0;
            for &end in &self.ends {
                let mut buffer = pool.buffer();
                buffer.extend_from_slice(&self.bytes[start..end]);
                sections.push(Data(Binary::from(buffer)));
                start = end;
            }
            sections
        })
    }

    /// Appends `other`'s events after these.
    fn append(&mut self, other: &Encoded) {
        if !other.keys.is_empty() || !self.keys.is_empty() {
            self.keys.resize(self.ends.len(), None);
            self.keys.extend(other.keys.iter().cloned());
            self.keys.resize(self.ends.len() + other.ends.len(), None);
        }
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.ends.extend(other.ends.iter().map(|end| end + base));
    }

    /// Notes the partition key of the event just added (its end already pushed).
    fn push_key(&mut self, key: Option<&str>) {
        if key.is_none() && self.keys.is_empty() {
            return;
        }
        self.keys.resize(self.ends.len() - 1, None);
        self.keys.push(key.map(Box::from));
    }

    /// The partition key event `i` was added with, if any.
    fn key(&self, i: usize) -> Option<&str> {
        self.keys.get(i).and_then(|k| k.as_deref())
    }
}

/// The most bytes of section buffers one thread's [`POOL`] keeps: about two 1 MB messages of
/// small events. Beyond it buffers are freed as before.
const POOL_BYTES: usize = 2 << 20;

/// A section buffer larger than this is freed rather than kept (so one large event does not
/// pin its buffer).
const POOL_BUFFER_MAX: usize = 16 << 10;

thread_local! {
    /// Data section buffers of messages fe2o3 has serialised, for the next message built on
    /// this thread. fe2o3's `Data` owns its bytes, so a batch message needs one `Vec` per
    /// event for as long as it takes to serialise it; reusing them saves allocating and
    /// freeing ~10,000 small buffers per 1 MB message. One pool per worker thread (not per
    /// link), so memory kept does not grow with the number of links.
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// See [`POOL`].
#[derive(Default)]
struct Pool {
    /// Empty buffers.
    buffers: Vec<Vec<u8>>,
    /// Their capacities summed.
    bytes: usize,
    /// Empty section lists.
    lists: Vec<Vec<Data>>,
}

impl Pool {
    /// An empty buffer, reused when there is one.
    fn buffer(&mut self) -> Vec<u8> {
        match self.buffers.pop() {
            Some(buffer) => {
                self.bytes -= buffer.capacity();
                buffer
            }
            None => Vec::new(),
        }
    }

    /// An empty section list with room for `n`.
    fn list(&mut self, n: usize) -> Vec<Data> {
        let mut list = self.lists.pop().unwrap_or_default();
        list.reserve(n);
        list
    }
}

/// Gives the section buffers of a message fe2o3 has serialised back to this thread's pool, as
/// far as it has room.
pub(crate) fn recycle(message: Message<Batch<Data>>) {
    let mut sections = message.body.into_inner();
    POOL.with_borrow_mut(|pool| {
        for Data(buffer) in sections.drain(..) {
            let mut buffer = buffer.into_vec();
            let capacity = buffer.capacity();
            if capacity > POOL_BUFFER_MAX || pool.bytes + capacity > POOL_BYTES {
                continue;
            }
            buffer.clear();
            pool.bytes += capacity;
            pool.buffers.push(buffer);
        }
        if pool.lists.len() < 2 {
            pool.lists.push(sections);
        }
    });
}

impl EventBatch {
    pub(crate) fn new(route: Route, max_size: u64) -> Result<EventBatch> {
        let envelope_size = envelope_size(route.partition_key.as_deref())?;
        EventBatch::empty(Format::Amqp, route, max_size, envelope_size, None)
    }

    /// An empty batch of an idempotent producer for `route`, going to `partition`. Sizes are
    /// counted with the widest stamps, so stamping never takes it over `max_size`.
    pub(crate) fn new_idempotent(
        route: Route,
        partition: String,
        max_size: u64,
    ) -> Result<EventBatch> {
        let key = route.partition_key.clone();
        let per_event = idempotent::reserve(key.as_deref())?;
        let envelope_size = envelope_size(None)? + idempotent::reserve(None)?;
        let layout = Idempotent {
            partition,
            key,
            per_event,
        };
        EventBatch::empty(Format::Amqp, route, max_size, envelope_size, Some(layout))
    }

    fn empty(
        format: Format,
        route: Route,
        max_size: u64,
        envelope_size: u64,
        idempotent: Option<Idempotent>,
    ) -> Result<EventBatch> {
        let smallest = envelope_size + idempotent.as_ref().map_or(0, |i| i.per_event);
        if max_size <= smallest {
            return Err(Error::new(
                ErrorKind::InvalidBatchSize,
                format!("a batch of {max_size} bytes cannot hold any event"),
            ));
        }
        Ok(EventBatch {
            format,
            route,
            max_size,
            envelope_size,
            size: envelope_size,
            events: Encoded::default(),
            idempotent,
        })
    }

    /// An empty batch like this one: same route, format, size limit and stamping layout (for
    /// the buffered producer's lanes, which fill batches one after another).
    pub(crate) fn empty_like(&self) -> EventBatch {
        EventBatch {
            format: self.format,
            route: self.route.clone(),
            max_size: self.max_size,
            envelope_size: self.envelope_size,
            size: self.envelope_size,
            events: Encoded::default(),
            idempotent: self.idempotent.clone(),
        }
    }

    /// An empty REST JSON batch: its size is the request body's, `[` and `]` with the elements
    /// between them, comma-separated.
    #[cfg_attr(not(feature = "https"), allow(dead_code))]
    pub(crate) fn new_json(route: Route, max_size: u64) -> Result<EventBatch> {
        const BRACKETS: u64 = 2;
        EventBatch::empty(Format::Json, route, max_size, BRACKETS, None)
    }

    /// How the events are encoded.
    pub(crate) fn format(&self) -> Format {
        self.format
    }

    /// Adds `event` if it fits; otherwise hands it back (see [`TryAddError`]).
    // The error hands the caller's event back by value (no allocation on the hot path); it is
    // as large as an `Event`.
    #[allow(clippy::result_large_err)]
    pub fn try_add(&mut self, event: Event) -> std::result::Result<(), TryAddError> {
        match self.add_ref(&event) {
            Ok(()) => Ok(()),
            Err(Rejection::Full) => Err(TryAddError::Full(event)),
            Err(Rejection::TooLarge) => Err(TryAddError::TooLarge(event)),
        }
    }

    /// [`try_add`](Self::try_add) for a borrowed event (the caller keeps it).
    pub(crate) fn add_ref(&mut self, event: &Event) -> std::result::Result<(), Rejection> {
        self.add_keyed(event, None)
    }

    /// [`add_ref`](Self::add_ref) for an event that keeps its own partition key: the key
    /// travels as the event's own `x-opt-partition-key` annotation (in its stamp, for an
    /// idempotent batch), as Microsoft's buffered producers send events whose key they
    /// resolved to a partition themselves. Meant for batches bound to one partition, where
    /// events of many keys share one batch; the batch's own key (if any) still marks the
    /// envelope.
    pub(crate) fn add_keyed(
        &mut self,
        event: &Event,
        key: Option<&str>,
    ) -> std::result::Result<(), Rejection> {
        if self.format == Format::Json {
            return self.add_json(event, key);
        }
        // A stamped event gets its key with its stamp; a plain one carries it itself.
        let (own_key, stamp_key) = match &self.idempotent {
            Some(_) => (None, key),
            None => (key, None),
        };
        let reserve = stamp_key.map_or(0, idempotent::key_reserve);
        // A body alone (with its own key, if any) is sized without encoding it: a full batch
        // costs no work, and its size needs no second look once encoded.
        let known = match event.bare_encoded_len(own_key) {
            Some(len) => Some(self.room_for(len + reserve)?),
            None => None,
        };
        let start = self.events.bytes.len();
        let checked = event
            .encode_into(&mut self.events.bytes, own_key)
            .map_err(|_| Rejection::TooLarge)
            .and_then(|()| match known {
                Some(added) => Ok(added),
                None => self.room_for(self.events.bytes.len() - start + reserve),
            });
        let added = match checked {
            Ok(added) => added,
            Err(rejection) => {
                self.events.bytes.truncate(start);
                return Err(rejection);
            }
        };
        self.size += added;
        self.events.ends.push(self.events.bytes.len());
        self.events.push_key(stamp_key);
        Ok(())
    }

    /// [`add_keyed`](Self::add_keyed) for a JSON batch: the element and, after the first, a
    /// comma.
    fn add_json(&mut self, event: &Event, key: Option<&str>) -> std::result::Result<(), Rejection> {
        // A cheap lower bound first: the body alone, unescaped.
        if self.envelope_size + event.body().len() as u64 > self.max_size {
            return Err(Rejection::TooLarge);
        }
        let start = self.events.bytes.len();
        let key = key.or(self.route.partition_key.as_deref());
        if crate::servicebus_json::write_element(&mut self.events.bytes, event, key).is_err() {
            self.events.bytes.truncate(start);
            return Err(Rejection::TooLarge);
        }
        let len = (self.events.bytes.len() - start) as u64;
        let comma = u64::from(!self.is_empty());
        let rejection = if self.envelope_size + len > self.max_size {
            Some(Rejection::TooLarge)
        } else if self.size + comma + len > self.max_size {
            Some(Rejection::Full)
        } else {
            None
        };
        if let Some(rejection) = rejection {
            self.events.bytes.truncate(start);
            return Err(rejection);
        }
        self.size += comma + len;
        self.events.ends.push(self.events.bytes.len());
        Ok(())
    }

    /// The request body of a JSON batch (`[e1,e2,…]`), exactly
    /// [`size_in_bytes`](Self::size_in_bytes) long.
    #[cfg_attr(not(feature = "https"), allow(dead_code))]
    pub(crate) fn into_json(self) -> (Route, Vec<u8>) {
        let mut body = Vec::with_capacity(self.size as usize);
        body.push(b'[');
        let mut start = 0;
        for (i, &end) in self.events.ends.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&self.events.bytes[start..end]);
            start = end;
        }
        body.push(b']');
        (self.route, body)
    }

    /// The bytes an event encoded to `len` bytes would add, if the batch has room for it.
    fn room_for(&self, len: usize) -> std::result::Result<u64, Rejection> {
        let len = len + self.idempotent.as_ref().map_or(0, |i| i.per_event as usize);
        let added = len as u64 + section_overhead(len);
        if self.envelope_size + added > self.max_size {
            return Err(Rejection::TooLarge);
        }
        if self.size + added > self.max_size {
            return Err(Rejection::Full);
        }
        Ok(added)
    }

    /// How many events the batch holds.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.len() == 0
    }

    /// The encoded size of the batch message as it will go on the wire, in bytes.
    pub fn size_in_bytes(&self) -> u64 {
        self.size
    }

    /// The size limit this batch fills up to, in bytes.
    pub fn max_size_in_bytes(&self) -> u64 {
        self.max_size
    }

    /// The partition key the batch is routed by, if any.
    pub fn partition_key(&self) -> Option<&str> {
        self.route.partition_key.as_deref()
    }

    /// The partition id the batch is sent to, if any.
    pub fn partition_id(&self) -> Option<&str> {
        self.route.partition_id.as_deref()
    }

    /// Whether it was made by an idempotent producer.
    pub(crate) fn is_idempotent(&self) -> bool {
        self.idempotent.is_some()
    }

    /// The partition whose link the batch goes to, when it is fixed: the partition id it was
    /// created for, or the one an idempotent producer resolved its key to.
    pub(crate) fn link_partition(&self) -> Option<&str> {
        match &self.idempotent {
            Some(i) => Some(&i.partition),
            None => self.route.partition_id.as_deref(),
        }
    }

    /// The partition the batch goes to, when it is fixed before sending: the partition id it
    /// was created for, or (with idempotent retries) the one its partition key or round-robin
    /// turn resolved to when it was created. `None` for a batch the hub routes.
    pub fn partition(&self) -> Option<&str> {
        self.link_partition()
    }

    /// The batch's encoded events, ready for a link.
    pub(crate) fn into_sections(self) -> Sections {
        let (partition_key, stamping) = match self.idempotent {
            Some(i) => (None, Some(Stamping { key: i.key })),
            None => (self.route.partition_key, None),
        };
        Sections {
            partition_key,
            events: self.events,
            envelope_size: self.envelope_size,
            size: self.size,
            stamping,
            fixed: None,
            #[cfg(hubsend_fe2o3_payload)]
            wire: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn into_message(self) -> Result<Message<Batch<Data>>> {
        self.into_sections().to_message(None)
    }
}

/// Encoded events on their way to a link: the data sections of one batch message, the
/// partition key its envelope carries, and its exact encoded size. Kept by the link until the
/// hub settles the delivery, so it can be sent again.
pub(crate) struct Sections {
    partition_key: Option<String>,
    events: Encoded,
    envelope_size: u64,
    /// Exact for plain messages; for stamped ones an upper bound (the widest stamps).
    size: u64,
    /// Set for an idempotent producer's messages: each event is stamped when sent.
    stamping: Option<Stamping>,
    /// The first sequence number the caller fixed ([`Producer::send_batch_numbered`]): the
    /// link sends it with exactly these numbers and never renumbers it.
    ///
    /// [`Producer::send_batch_numbered`]: crate::Producer::send_batch_numbered
    pub(crate) fixed: Option<i32>,
    /// A plain message once [`seal`](Self::seal)ed: its whole encoding, which every send of
    /// it hands to fe2o3 (a shared buffer, not a copy), and how many events it holds (their
    /// own buffers are freed then).
    #[cfg(hubsend_fe2o3_payload)]
    wire: Option<(bytes::Bytes, usize)>,
}

/// What an idempotent message's events are stamped with besides the link's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamping {
    /// The partition key each event keeps.
    key: Option<String>,
}

impl Sections {
    /// One event as a one-event batch message, or `MessageTooLarge` when it exceeds `limit`.
    pub(crate) fn single(
        event: &Event,
        partition_key: Option<String>,
        limit: u64,
    ) -> Result<Sections> {
        Sections::one(event, partition_key, limit, None)
    }

    /// One event of an idempotent producer, going to `partition` and keeping its
    /// `partition_key`, or `MessageTooLarge` when it exceeds `limit` with its stamp.
    pub(crate) fn single_idempotent(
        event: &Event,
        partition: String,
        partition_key: Option<String>,
        limit: u64,
    ) -> Result<Sections> {
        Sections::one(event, partition_key, limit, Some(partition))
    }

    fn one(
        event: &Event,
        partition_key: Option<String>,
        limit: u64,
        idempotent_partition: Option<String>,
    ) -> Result<Sections> {
        let route = Route {
            partition_key,
            partition_id: None,
        };
        let batch = match idempotent_partition {
            Some(partition) => EventBatch::new_idempotent(route, partition, limit.max(1)),
            None => EventBatch::new(route, limit.max(1)),
        };
        let mut batch = batch.map_err(|_| too_large(event, limit))?;
        // One allocation of the right size for a body alone (an event with metadata reserves
        // its exact size itself), instead of growing from the data section's header.
        if let Some(len) = event.bare_encoded_len(None) {
            batch.events.bytes.reserve_exact(len);
        }
        batch.add_ref(event).map_err(|_| too_large(event, limit))?;
        Ok(batch.into_sections())
    }

    /// How many events the message carries.
    pub(crate) fn len(&self) -> usize {
        #[cfg(hubsend_fe2o3_payload)]
        if let Some((_, len)) = &self.wire {
            return *len;
        }
        self.events.len()
    }

    /// Whether its events are stamped with sequence numbers when sent.
    pub(crate) fn is_stamped(&self) -> bool {
        self.stamping.is_some()
    }

    /// Exact encoded size of the message these sections make.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether `other`'s events can join this message: same partition key, and the merged
    /// message still within `limit` bytes.
    pub(crate) fn can_absorb(&self, other: &Sections, limit: u64) -> bool {
        self.partition_key == other.partition_key
            && self.stamping == other.stamping
            && self.size + (other.size - other.envelope_size) <= limit
    }

    /// Appends `other`'s events after this message's own (check [`can_absorb`](Self::can_absorb) first).
    pub(crate) fn absorb(&mut self, other: Sections) {
        self.size += other.size - other.envelope_size;
        self.events.append(&other.events);
    }

    /// Encodes `event` straight onto the end of this plain message when it shares the message's
    /// partition key and the message stays within `limit` bytes; returns the bytes it added.
    /// `None` (and the message unchanged) otherwise, for whatever reason: the caller then takes
    /// the way that names it.
    pub(crate) fn try_push(&mut self, event: &Event, key: Option<&str>, limit: u64) -> Option<u64> {
        if self.stamping.is_some() || self.fixed.is_some() || self.partition_key.as_deref() != key {
            return None;
        }
        let start = self.events.bytes.len();
        if event.encode_into(&mut self.events.bytes, None).is_err() {
            self.events.bytes.truncate(start);
            return None;
        }
        let len = self.events.bytes.len() - start;
        let added = len as u64 + section_overhead(len);
        if self.size + added > limit {
            self.events.bytes.truncate(start);
            return None;
        }
        self.size += added;
        self.events.ends.push(self.events.bytes.len());
        Some(added)
    }

    /// Takes back the event [`try_push`](Self::try_push) just added (`added` bytes).
    pub(crate) fn pop_last(&mut self, added: u64) {
        if self.events.ends.pop().is_some() {
            let end = self.events.ends.last().copied().unwrap_or(0);
            self.events.bytes.truncate(end);
            self.size -= added;
        }
    }

    /// The whole plain batch message, encoded byte for byte as fe2o3 encodes
    /// [`to_message(None)`](Self::to_message): the envelope, then each event as a data
    /// section. `None` for a stamped message (its stamps are written when it is sent).
    #[cfg_attr(not(hubsend_fe2o3_payload), allow(dead_code))]
    pub(crate) fn encode_plain(&self) -> Result<Option<Vec<u8>>> {
        if self.stamping.is_some() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.size as usize);
        match self.partition_key.as_deref() {
            None => {
                static KEYLESS: OnceLock<Vec<u8>> = OnceLock::new();
                let prefix = match KEYLESS.get() {
                    Some(prefix) => prefix,
                    None => {
                        let prefix = encode_message(&envelope(None, Vec::new()))?;
                        KEYLESS.get_or_init(|| prefix)
                    }
                };
                out.extend_from_slice(prefix);
            }
            Some(key) => out.extend_from_slice(&encode_message(&envelope(Some(key), Vec::new()))?),
        }
        let mut start = 0;
        for &end in &self.events.ends {
            let bytes = &self.events.bytes[start..end];
            start = end;
            // amqp:data:binary (0x00 0x53 0x75), then the bytes as vbin8 or vbin32, as
            // serde_amqp writes them (see `section_overhead`).
            out.extend_from_slice(&[0x00, 0x53, 0x75]);
            match u8::try_from(bytes.len()) {
                Ok(len) if len < u8::MAX => out.extend_from_slice(&[0xa0, len]),
                _ => {
                    let len = u32::try_from(bytes.len()).map_err(|_| {
                        Error::new(ErrorKind::MessageTooLarge, "an event over 4 GiB")
                    })?;
                    out.push(0xb0);
                    out.extend_from_slice(&len.to_be_bytes());
                }
            }
            out.extend_from_slice(bytes);
        }
        debug_assert_eq!(out.len() as u64, self.size);
        Ok(Some(out))
    }

    /// Encodes a plain message once, into the buffer every send of it goes out from (fe2o3
    /// keeps a clone of it, not a copy, until the hub settles the delivery), and frees the
    /// events' own buffers: one copy of the message lives while it is in flight. Stamped
    /// messages are left as they are (renumbering changes their stamps); sealing twice does
    /// nothing.
    #[cfg(hubsend_fe2o3_payload)]
    pub(crate) fn seal(&mut self) -> Result<()> {
        if self.wire.is_some() {
            return Ok(());
        }
        if let Some(encoded) = self.encode_plain()? {
            let len = self.events.len();
            self.events = Encoded::default();
            self.wire = Some((bytes::Bytes::from(encoded), len));
        }
        Ok(())
    }

    /// The encoded message, once [`seal`](Self::seal)ed.
    #[cfg(hubsend_fe2o3_payload)]
    pub(crate) fn wire(&self) -> Option<&bytes::Bytes> {
        self.wire.as_ref().map(|(bytes, _)| bytes)
    }

    /// The batch message (format 0x80013700) these sections make; an idempotent one stamped
    /// with `stamp` (its events numbered from `stamp.first` on, the envelope carrying the
    /// first event's annotations as Microsoft's clients do).
    pub(crate) fn to_message(&self, stamp: Option<Stamp>) -> Result<Message<Batch<Data>>> {
        let (Some(stamping), Some(stamp)) = (&self.stamping, stamp) else {
            return Ok(envelope(
                self.partition_key.as_deref(),
                self.events.to_sections(),
            ));
        };
        let shared_key = stamping.key.as_deref();
        let template = idempotent::Template::new(shared_key, stamp.producer_id, stamp.epoch)?;
        // Events with keys of their own: one template per run of equal keys.
        let mut keyed: Option<(&str, idempotent::Template)> = None;
        let mut sections = POOL.with_borrow_mut(|pool| pool.list(self.events.len()));
        let mut start = 0;
        for (i, &end) in self.events.ends.iter().enumerate() {
            let bytes = &self.events.bytes[start..end];
            start = end;
            let template = match self.events.key(i) {
                Some(key) if Some(key) != shared_key => match &keyed {
                    Some((k, t)) if *k == key => t,
                    _ => {
                        let t =
                            idempotent::Template::new(Some(key), stamp.producer_id, stamp.epoch)?;
                        &keyed.insert((key, t)).1
                    }
                },
                _ => &template,
            };
            let mut out = POOL.with_borrow_mut(Pool::buffer);
            out.reserve(bytes.len() + 160);
            template.write(&mut out, idempotent::seq_add(stamp.first, i as u64));
            out.extend_from_slice(bytes);
            sections.push(Data(Binary::from(out)));
        }
        let annotations =
            idempotent::annotations(None, stamp.producer_id, stamp.epoch, stamp.first);
        Ok(Message::builder()
            .message_annotations(annotations)
            .data_batch(sections)
            .build())
    }
}

fn too_large(event: &Event, limit: u64) -> Error {
    Error::new(
        ErrorKind::MessageTooLarge,
        format!(
            "an event with a {}-byte body does not fit the link's {limit}-byte limit",
            event.body().len()
        ),
    )
}

/// Encoded size of a batch message's envelope without any data section (the partition key
/// annotation, if any). The keyless size is computed once.
fn envelope_size(partition_key: Option<&str>) -> Result<u64> {
    static KEYLESS: OnceLock<u64> = OnceLock::new();
    idempotent::size_per_key(&KEYLESS, partition_key, |key| {
        Ok(encode_message(&envelope(key, Vec::new()))?.len() as u64)
    })
}

fn envelope(partition_key: Option<&str>, sections: Vec<Data>) -> Message<Batch<Data>> {
    let mut builder = Message::builder();
    if let Some(key) = partition_key {
        builder = builder.message_annotations(
            MessageAnnotations::builder()
                .insert(PARTITION_KEY_ANNOTATION, key.to_owned())
                .build(),
        );
    }
    builder.data_batch(sections).build()
}

/// Hooks for the crate's own micro-benchmarks (`benches/encode.rs`), which fill batches without
/// a hub. Not part of the API: no semver promise, may change or go away in any release.
#[doc(hidden)]
pub mod __bench {
    use super::{BatchOptions, EventBatch, Route};
    use crate::error::{Error, ErrorKind, Result};
    use crate::event::Event;

    /// An empty AMQP batch routed as `options` say, holding up to `max_size` bytes, made
    /// without a producer (a real one takes its limit from the link).
    pub fn offline_batch(options: BatchOptions, max_size: u64) -> Result<EventBatch> {
        if options.partition_key.is_some() && options.partition_id.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "give a partition key or a partition id, not both",
            ));
        }
        let route = Route {
            partition_key: options.partition_key,
            partition_id: options.partition_id,
        };
        EventBatch::new(route, options.max_size.unwrap_or(max_size))
    }

    /// Adds `event` carrying its own partition key `key`, as a `BufferedProducer` lane does;
    /// whether it was added.
    pub fn add_keyed(batch: &mut EventBatch, event: &Event, key: &str) -> bool {
        batch.add_keyed(event, Some(key)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(key: Option<&str>) -> Route {
        Route {
            partition_key: key.map(str::to_owned),
            partition_id: None,
        }
    }

    #[test]
    fn size_is_exact_for_small_and_large_events() {
        for key in [None, Some("compressor-7")] {
            let mut batch = EventBatch::new(route(key), 64 * 1024).unwrap();
            for i in 0..40 {
                let body = vec![b'x'; if i % 2 == 0 { 100 } else { 300 + i }];
                batch
                    .try_add(Event::new(body).with_property("i", i as i64))
                    .unwrap();
            }
            let size = batch.size_in_bytes();
            let encoded = encode_message(&batch.into_message().unwrap()).unwrap();
            assert_eq!(encoded.len() as u64, size);
        }
    }

    #[test]
    fn merged_single_sends_keep_an_exact_size_and_respect_the_limit() {
        for key in [None, Some("pump-1")] {
            let key = key.map(str::to_owned);
            let event = |n: usize| Event::new(vec![b'x'; n]).with_property("n", n as i64);
            let mut merged = Sections::single(&event(10), key.clone(), 4096).unwrap();
            for n in [1, 254, 255, 600] {
                let next = Sections::single(&event(n), key.clone(), 4096).unwrap();
                assert!(merged.can_absorb(&next, 4096));
                merged.absorb(next);
            }
            let size = merged.size();
            assert_eq!(
                encode_message(&merged.to_message(None).unwrap())
                    .unwrap()
                    .len() as u64,
                size
            );

            let a = Sections::single(&event(900), key.clone(), 4096).unwrap();
            let b = Sections::single(&event(900), key.clone(), 4096).unwrap();
            assert!(!a.can_absorb(&b, a.size() + 10), "limit respected");
            let other = Sections::single(&event(1), Some("other".into()), 4096).unwrap();
            assert!(!a.can_absorb(&other, 4096), "keys never mix");
        }
        let big = Sections::single(&Event::new(vec![0u8; 5000]), None, 4096);
        assert_eq!(
            big.err().map(|e| e.kind()),
            Some(ErrorKind::MessageTooLarge)
        );
    }

    #[test]
    fn events_with_keys_of_their_own_keep_an_exact_size() {
        // As a BufferedProducer lane adds them: each event carries its own key annotation.
        let limit = 20_000;
        let mut batch = EventBatch::new(route(None), limit).unwrap();
        let mut i = 0usize;
        let rejected = loop {
            let key = "k".repeat(i * 7 % 300);
            let event = Event::new(vec![b'x'; i * 13 % 400]);
            let event = match i % 3 {
                0 => event.with_property("i", i as i64),
                _ => event,
            };
            match batch.add_keyed(&event, Some(&key)) {
                Ok(()) => i += 1,
                Err(rejection) => break rejection,
            }
        };
        assert_eq!(rejected, Rejection::Full);
        let size = batch.size_in_bytes();
        assert!(size <= limit && i > 20, "{i} events, {size} bytes");
        let encoded = encode_message(&batch.into_message().unwrap()).unwrap();
        assert_eq!(encoded.len() as u64, size);
    }

    #[test]
    fn size_is_exact_at_the_vbin8_boundary() {
        // Find bodies whose encoded event is 253..=257 bytes: both sides of vbin8/vbin32.
        for body in 240..260 {
            let mut batch = EventBatch::new(route(None), 64 * 1024).unwrap();
            batch.try_add(Event::new(vec![3u8; body])).unwrap();
            batch.try_add(Event::new(vec![4u8; body + 1])).unwrap();
            let size = batch.size_in_bytes();
            let encoded = encode_message(&batch.into_message().unwrap()).unwrap();
            assert_eq!(encoded.len() as u64, size, "body {body}");
        }
    }

    #[test]
    fn fills_to_the_limit_and_never_beyond() {
        let limit = 10_000;
        let mut batch = EventBatch::new(route(Some("k")), limit).unwrap();
        let mut n = 0;
        let rejected = loop {
            match batch.try_add(Event::new(vec![7u8; 97])) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(rejected, TryAddError::Full(_)));
        assert_eq!(rejected.into_event().body().len(), 97);
        let size = batch.size_in_bytes();
        assert!(size <= limit);
        // The next event would have crossed the limit.
        assert!(size + 97 + 2 + 3 + 5 > limit, "size {size} with {n} events");
        let encoded = encode_message(&batch.into_message().unwrap()).unwrap();
        assert_eq!(encoded.len() as u64, size);
    }

    #[test]
    fn stamped_batches_stay_within_their_counted_size() {
        for key in [None, Some("compressor-7:vibe_x")] {
            let limit = 8_000;
            let mut batch = EventBatch::new_idempotent(route(key), "2".into(), limit).unwrap();
            while batch
                .try_add(Event::new(vec![1u8; 90]).with_property("i", 1i64))
                .is_ok()
            {}
            let counted = batch.size_in_bytes();
            assert!(counted <= limit);
            let n = batch.len();
            let sections = batch.into_sections();
            for (id, epoch, first) in [(0, 0, 0), (i64::MAX, i16::MAX, i32::MAX - 3)] {
                let stamp = Stamp {
                    producer_id: id,
                    epoch,
                    first,
                };
                let message = sections.to_message(Some(stamp)).unwrap();
                let encoded = encode_message(&message).unwrap();
                assert!(
                    encoded.len() as u64 <= counted,
                    "{} > {counted}",
                    encoded.len()
                );
                assert_eq!(message.body.len(), n);
            }
        }
    }

    #[test]
    fn json_batches_are_sized_exactly_and_never_beyond_the_limit() {
        let limit = 4000;
        let mut batch = EventBatch::new_json(route(Some("pump-\"1\"")), limit).unwrap();
        let mut i = 0u32;
        let rejected = loop {
            // Text, escaping-heavy text, and binary (base64) bodies in turn.
            let body: Vec<u8> = match i % 3 {
                0 => format!("reading {i}").into_bytes(),
                1 => "\"\\\n\u{1}ü".repeat(5).into_bytes(),
                _ => vec![0xff; 40],
            };
            match batch.try_add(Event::new(body).with_property("i", i64::from(i))) {
                Ok(()) => i += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(rejected, TryAddError::Full(_)));
        let size = batch.size_in_bytes();
        assert!(size <= limit);
        let (_, body) = batch.into_json();
        assert_eq!(body.len() as u64, size);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.as_array().unwrap().len() as u32, i);
        let mut small = EventBatch::new_json(route(None), 100).unwrap();
        assert!(matches!(
            small.try_add(Event::new(vec![b'x'; 99])),
            Err(TryAddError::TooLarge(_))
        ));
        assert!(matches!(
            small.try_add(Event::new(vec![0xfe; 70])),
            Err(TryAddError::TooLarge(_))
        ));
        assert!(small.is_empty());
    }

    #[test]
    fn plain_messages_encode_byte_for_byte_as_fe2o3_does() {
        for key in [None, Some("pump-7")] {
            let key = key.map(str::to_owned);
            let event = |n: usize| Event::new(vec![b'x'; n]).with_property("n", n as i64);
            // Both sides of the vbin8/vbin32 boundary, merged as single sends are.
            let mut merged = Sections::single(&event(1), key.clone(), 1 << 20).unwrap();
            for n in (220..260).chain([5000, 0]) {
                merged.absorb(Sections::single(&event(n), key.clone(), 1 << 20).unwrap());
            }
            let expected = encode_message(&merged.to_message(None).unwrap()).unwrap();
            let encoded = merged.encode_plain().unwrap().expect("a plain message");
            assert_eq!(encoded, expected);
            assert_eq!(encoded.len() as u64, merged.size());
            // The pooled buffers of the message just serialised serve the next one alike.
            recycle(merged.to_message(None).unwrap());
            let again = encode_message(&merged.to_message(None).unwrap()).unwrap();
            assert_eq!(again, expected);
        }
        let mut stamped = EventBatch::new_idempotent(route(None), "0".into(), 4096).unwrap();
        stamped.try_add(Event::new(vec![1u8; 10])).unwrap();
        assert!(stamped.into_sections().encode_plain().unwrap().is_none());
    }

    #[cfg(hubsend_fe2o3_payload)]
    #[test]
    fn a_sealed_message_keeps_one_encoding_and_its_count() {
        let mut batch = EventBatch::new(route(Some("k")), 256 * 1024).unwrap();
        for i in 0..300 {
            batch.try_add(Event::new(vec![b'y'; 100 + i])).unwrap();
        }
        let mut sections = batch.into_sections();
        let expected = encode_message(&sections.to_message(None).unwrap()).unwrap();
        sections.seal().unwrap();
        let wire = sections.wire().expect("sealed").clone();
        assert_eq!(&wire[..], &expected[..]);
        assert_eq!(sections.len(), 300);
        sections.seal().unwrap();
        assert_eq!(sections.wire().map(|w| w.as_ptr()), Some(wire.as_ptr()));
    }

    #[test]
    fn too_large_event_is_handed_back() {
        let mut batch = EventBatch::new(route(None), 1000).unwrap();
        let err = batch.try_add(Event::new(vec![0u8; 1000])).unwrap_err();
        assert!(matches!(err, TryAddError::TooLarge(_)));
        assert!(batch.is_empty());
        assert!(EventBatch::new(route(Some("k")), 10).is_err());
    }
}
