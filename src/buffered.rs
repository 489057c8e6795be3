//! [`BufferedProducer`]: fire-and-forget with guarantees. `enqueue` returns once an event is
//! in a bounded buffer; background lanes (one per route) pack batches up to the size limit
//! or a linger time, keep several in flight, and report every outcome.
//!
//! # Partition keys
//! Like Microsoft's buffered producers, it resolves a partition key to its partition on the
//! client, with the service's own hash (lookup3 over the key's UTF-8 bytes, folded to 16
//! bits, modulo the partition count), so events of any number of keys share one lane and one
//! batch per partition. Each event keeps its key as its own `x-opt-partition-key` annotation,
//! which the hub stores with it and consumers read back. The partition ids are the hub's: an
//! idempotent producer's (fixed when it connected), or read from `$management` when the first
//! keyed event comes and re-read every minute after that (and again a minute after a failed
//! read).
//!
//! - If the partition count changes (Event Hubs only ever adds partitions), keys are hashed
//!   over the new count from the next read on, as the service does for keyed events sent to
//!   the hub; events already in open batches still go where they were resolved, so one key's
//!   order holds up to the change and again after it, not across it.
//! - If the partition ids cannot be read (the HTTPS transport, or `$management` refuses),
//!   keyed events go to the hub with the key on the batch and the hub picks the partition:
//!   one lane per key, as [`max_lanes`](BufferedOptions::max_lanes) bounds.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::batch::{BatchOptions, EventBatch, Rejection};
use crate::entity::eventhubs::partition_for_key;
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::producer::{DeliveryFuture, Producer, SendOptions};

/// Events the hub did not store, reported to the failure callback: the events themselves, so
/// the application can keep, log or re-route every one of them.
#[derive(Debug)]
#[non_exhaustive]
pub struct FailedBatch {
    /// The events that were not stored, in `enqueue` order (one batch's worth, or a single
    /// event refused before sending). Empty when
    /// [`keep_failed_events`](BufferedOptions::keep_failed_events) is off.
    pub events: Vec<Event>,
    /// How many events failed (`events.len()` when they are kept).
    pub count: usize,
    /// The partition key the batch was routed by, if any (none when the events' keys were
    /// resolved to a partition on the client: see [`partition_keys`](Self::partition_keys)).
    pub partition_key: Option<String>,
    /// The partition id the batch was sent to, if any.
    pub partition_id: Option<String>,
    /// Each kept event's own partition key, in the order of [`events`](Self::events), when
    /// it was resolved to a partition on the client (see the [module docs](self)): the key to
    /// enqueue it with again. `None` for events enqueued without a key.
    pub partition_keys: Vec<Option<String>>,
    /// Why it failed, after the retry policy was spent.
    pub error: Error,
}

type FailureCallback = Arc<dyn Fn(FailedBatch) + Send + Sync>;

/// A batch the hub stored, reported to the success callback.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SettledBatch {
    /// How many events it held.
    pub events: usize,
    /// The sum of their body lengths.
    pub body_bytes: u64,
    /// From handing the batch to the producer to the hub's outcome (retries included).
    pub latency: Duration,
    /// The partition key the batch was routed by, if any (none when its events' keys were
    /// resolved to a partition on the client: then `partition_id` names it).
    pub partition_key: Option<String>,
    /// The partition id the batch was sent to, if any.
    pub partition_id: Option<String>,
}

type SuccessCallback = Arc<dyn Fn(SettledBatch) + Send + Sync>;

/// Tunables of a [`BufferedProducer`].
///
/// | setting | default |
/// |---|---|
/// | [`max_buffered_events`](Self::max_buffered_events) | 50,000 |
/// | [`linger`](Self::linger) | 10 ms |
/// | [`max_lanes`](Self::max_lanes) | 1,024 |
/// | [`keep_failed_events`](Self::keep_failed_events) | on (with a failure callback) |
/// | [`resolve_partition_keys`](Self::resolve_partition_keys) | on |
#[derive(Clone)]
#[must_use]
pub struct BufferedOptions {
    max_buffered_events: usize,
    linger: Duration,
    max_lanes: usize,
    on_failure: Option<FailureCallback>,
    keep_failed_events: bool,
    on_success: Option<SuccessCallback>,
    resolve_partition_keys: bool,
}

impl fmt::Debug for BufferedOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferedOptions")
            .field("max_buffered_events", &self.max_buffered_events)
            .field("linger", &self.linger)
            .field("max_lanes", &self.max_lanes)
            .field("on_failure", &self.on_failure.is_some())
            .field("keep_failed_events", &self.keep_failed_events)
            .field("on_success", &self.on_success.is_some())
            .field("resolve_partition_keys", &self.resolve_partition_keys)
            .finish()
    }
}

impl Default for BufferedOptions {
    fn default() -> Self {
        BufferedOptions {
            max_buffered_events: 50_000,
            linger: Duration::from_millis(10),
            max_lanes: 1024,
            on_failure: None,
            keep_failed_events: true,
            on_success: None,
            resolve_partition_keys: true,
        }
    }
}

impl BufferedOptions {
    /// The defaults listed above.
    pub fn new() -> BufferedOptions {
        BufferedOptions::default()
    }

    /// At most this many events wait in the buffer (not yet sent); `enqueue` waits beyond it.
    /// Together with the producer's in-flight bounds this caps memory.
    pub fn max_buffered_events(mut self, events: usize) -> Self {
        self.max_buffered_events = events.max(1);
        self
    }

    /// How long a partly filled batch waits for more events before it is sent.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// At most this many routes (partitions, or partition keys when they cannot be resolved
    /// on the client, see the [module docs](self)) have a lane at once. A new route
    /// beyond that retires the least recently used lane: its open batch is sent (partly filled)
    /// and its outcomes still count towards [`flush`](BufferedProducer::flush) and
    /// [`close`](BufferedProducer::close).
    pub fn max_lanes(mut self, lanes: usize) -> Self {
        self.max_lanes = lanes.max(1);
        self
    }

    /// Called once for every batch the hub did not store (after retries), with its events.
    ///
    /// While a callback is set, each lane keeps the events of its batches until the hub's
    /// outcome (they are moved, not copied), so in-flight memory roughly doubles.
    pub fn on_failure(mut self, callback: impl Fn(FailedBatch) + Send + Sync + 'static) -> Self {
        self.on_failure = Some(Arc::new(callback));
        self
    }

    /// Whether the failure callback gets the failed events themselves (default) or only their
    /// [`count`](FailedBatch::count). Off, lanes do not keep the events of in-flight batches,
    /// for callers that only need to know what failed and why.
    pub fn keep_failed_events(mut self, keep: bool) -> Self {
        self.keep_failed_events = keep;
        self
    }

    /// Whether partition keys are resolved to partitions on the client, so that events of many
    /// keys share one lane and batch per partition (default, see the [module docs](self)).
    /// Off, each key has a lane of its own and the hub hashes the key: for callers whose
    /// bookkeeping follows the routes they enqueued with, since the callbacks then name the
    /// key of every batch.
    pub fn resolve_partition_keys(mut self, on: bool) -> Self {
        self.resolve_partition_keys = on;
        self
    }

    /// Called once for every batch the hub stored, with its event count, body bytes and
    /// latency (for progress displays, metrics, or advancing a checkpoint). It runs on the
    /// lane's settling task: keep it short.
    pub fn on_success(mut self, callback: impl Fn(SettledBatch) + Send + Sync + 'static) -> Self {
        self.on_success = Some(Arc::new(callback));
        self
    }
}

/// What a [`BufferedProducer`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BufferedReport {
    /// Events accepted into the buffer.
    pub enqueued: u64,
    /// Events the hub stored.
    pub sent: u64,
    /// Events in batches the hub did not store.
    pub failed: u64,
    /// Events without an outcome yet (non-zero only from [`BufferedProducer::close_within`]
    /// when its deadline passed first).
    pub pending: u64,
}

/// What a lane is told besides its events (those go straight into its open batch, see
/// [`LaneShared`]).
enum LaneCommand {
    Flush(oneshot::Sender<()>),
}

/// How often the partition ids keys are resolved against are read again.
const PARTITION_REFRESH: Duration = Duration::from_secs(60);

/// Resolves partition keys to partitions on the client (see the [module docs](self)).
#[derive(Default)]
struct KeyRouter {
    /// What is known of the partition ids, once they were read (or failed to be).
    known: std::sync::RwLock<Option<Known>>,
    /// Held while they are read the first time.
    first_read: tokio::sync::Mutex<()>,
    /// Set while a re-read runs in the background.
    refreshing: std::sync::atomic::AtomicBool,
    /// Lookups so far: the ids' age is checked on every [`AGE_CHECK_EVERY`]th, not on each.
    lookups: AtomicU64,
    /// Bumped (under `known`'s write lock, after it changed) whenever `known` is replaced, so
    /// [`PartitionLanes`] can tell without a lock whether the ids it holds are still the ones
    /// keys resolve over.
    generation: AtomicU64,
}

/// How many key lookups share one look at the clock for the ids' age.
const AGE_CHECK_EVERY: u64 = 256;

struct Known {
    /// The ids, or `None` when they could not be read (keyed events then go to the hub).
    ids: Option<Arc<[String]>>,
    read_at: Instant,
    /// An idempotent producer's: never re-read.
    fixed: bool,
}

/// Where a keyed event goes.
enum Resolved {
    /// The partition at this index of these ids.
    Partition(Arc<[String]>, usize),
    /// To the hub, which hashes the key itself.
    Hub,
    /// Not known yet: the ids were never read.
    Unknown,
}

impl KeyRouter {
    fn new(producer: &Producer) -> KeyRouter {
        let router = KeyRouter::default();
        if let Some(ids) = producer.fixed_partition_ids() {
            router.set(Some(ids.into()), true);
        }
        router
    }

    fn set(&self, ids: Option<Arc<[String]>>, fixed: bool) {
        if let Ok(mut known) = self.known.write() {
            *known = Some(Known {
                ids,
                read_at: Instant::now(),
                fixed,
            });
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// The current [`generation`](Self::generation).
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The partition `key` goes to, or `None` when the partition ids are not available (read
    /// now if they were never read; read again in the background when they are old).
    async fn resolve(
        self: &Arc<Self>,
        producer: &Producer,
        key: &str,
    ) -> Option<(Arc<[String]>, usize)> {
        match self.lookup(producer, key) {
            Resolved::Partition(ids, at) => return Some((ids, at)),
            Resolved::Hub => return None,
            Resolved::Unknown => {}
        }
        let _first = self.first_read.lock().await;
        if let Resolved::Unknown = self.lookup(producer, key) {
            self.read(producer).await;
        }
        match self.lookup(producer, key) {
            Resolved::Partition(ids, at) => Some((ids, at)),
            Resolved::Hub | Resolved::Unknown => None,
        }
    }

    fn lookup(self: &Arc<Self>, producer: &Producer, key: &str) -> Resolved {
        let Ok(known) = self.known.read() else {
            return Resolved::Hub;
        };
        let Some(known) = known.as_ref() else {
            return Resolved::Unknown;
        };
        if self
            .lookups
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(AGE_CHECK_EVERY)
        {
            self.refresh_if_old(producer, known);
        }
        match &known.ids {
            Some(ids) => Resolved::Partition(ids.clone(), partition_for_key(key, ids.len())),
            None => Resolved::Hub,
        }
    }

    /// Starts a re-read of the ids in the background when they are older than
    /// [`PARTITION_REFRESH`] (and may change) and none runs yet.
    fn refresh_if_old(self: &Arc<Self>, producer: &Producer, known: &Known) {
        if !known.fixed
            && known.read_at.elapsed() >= PARTITION_REFRESH
            && !self.refreshing.swap(true, Ordering::Relaxed)
        {
            let (router, producer) = (self.clone(), producer.clone());
            tokio::spawn(async move {
                router.read(&producer).await;
                router.refreshing.store(false, Ordering::Relaxed);
            });
        }
    }

    /// [`refresh_if_old`](Self::refresh_if_old) for a caller that resolved a key without
    /// [`lookup`](Self::lookup).
    fn check_age(self: &Arc<Self>, producer: &Producer) {
        if let Ok(known) = self.known.read() {
            if let Some(known) = known.as_ref() {
                self.refresh_if_old(producer, known);
            }
        }
    }

    /// Reads the partition ids. When that fails, ids read before stay in use; without any,
    /// keyed events go to the hub. Either way it is tried again after another interval.
    async fn read(&self, producer: &Producer) {
        let read = match producer.hub_properties().await {
            Ok(hub) if !hub.partition_ids.is_empty() => Ok(hub.partition_ids),
            Ok(_) => Err("the hub reported no partition ids".to_owned()),
            Err(error) => Err(error.to_string()),
        };
        let Ok(mut known) = self.known.write() else {
            return;
        };
        let before = known.as_ref().and_then(|k| k.ids.clone());
        let ids = match (read, before) {
            (Ok(ids), before) => {
                if before.is_some_and(|b| b.len() != ids.len()) {
                    tracing::info!(
                        partitions = ids.len(),
                        "the hub's partition count changed; keys now resolve over the new count"
                    );
                }
                Some(ids.into())
            }
            (Err(error), Some(before)) => {
                tracing::debug!(%error, "re-reading the partition ids failed");
                Some(before)
            }
            (Err(error), None) => {
                tracing::debug!(
                    %error,
                    "partition ids unavailable: keyed events go to the hub, which picks their partition"
                );
                None
            }
        };
        *known = Some(Known {
            ids,
            read_at: Instant::now(),
            fixed: false,
        });
        self.generation.fetch_add(1, Ordering::Release);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RouteKey {
    partition_key: Option<String>,
    partition_id: Option<String>,
}

impl RouteKey {
    /// Neither a key nor an id.
    fn is_round_robin(&self) -> bool {
        self.partition_key.is_none() && self.partition_id.is_none()
    }

    fn partition(id: String) -> RouteKey {
        RouteKey::id(Some(id))
    }

    fn id(partition_id: Option<String>) -> RouteKey {
        RouteKey {
            partition_key: None,
            partition_id,
        }
    }

    fn key(key: String) -> RouteKey {
        RouteKey {
            partition_key: Some(key),
            partition_id: None,
        }
    }
}

/// The lanes of the partitions keys resolved to, by index into the ids they were resolved
/// with; new ids (a re-read) start it afresh. Generic over the lane only so its tests need
/// no producer.
struct PartitionLanes<L = Arc<LaneShared>> {
    ids: Option<Arc<[String]>>,
    lanes: Vec<Option<L>>,
    /// The [`KeyRouter`] generation in which `ids` were seen to be the router's: while it is
    /// still the router's, a key resolves over `ids` here, under this lock, without the
    /// router's lock or a clone of its ids (`None`: not seen since they were set).
    verified: Option<u64>,
    /// Keys resolved here: every [`AGE_CHECK_EVERY`]th checks the ids' age.
    resolved: u64,
}

impl<L> Default for PartitionLanes<L> {
    fn default() -> Self {
        PartitionLanes {
            ids: None,
            lanes: Vec::new(),
            verified: None,
            resolved: 0,
        }
    }
}

impl<L: Clone> PartitionLanes<L> {
    /// The index of the partition `key` goes to, when the ids held here are still the ones
    /// the router (now at `generation`) resolves over and that partition's lane is known.
    /// `check_age` is set on every [`AGE_CHECK_EVERY`]th key resolved here.
    fn resolve(&mut self, key: &str, generation: u64) -> Option<(usize, bool)> {
        if self.verified != Some(generation) {
            return None;
        }
        let at = partition_for_key(key, self.ids.as_ref()?.len());
        self.lanes.get(at)?.as_ref()?;
        self.resolved = self.resolved.wrapping_add(1);
        Some((at, self.resolved.is_multiple_of(AGE_CHECK_EVERY)))
    }

    /// Notes that `ids` were the router's in `generation` (read before they were looked up),
    /// when they are the ones held here; whether they are.
    fn verify(&mut self, ids: &Arc<[String]>, generation: u64) -> bool {
        let held = self
            .ids
            .as_ref()
            .is_some_and(|known| Arc::ptr_eq(known, ids));
        if held {
            self.verified = Some(generation);
        }
        held
    }

    fn get(&self, ids: &Arc<[String]>, at: usize) -> Option<L> {
        self.get_ref(ids, at).cloned()
    }

    fn get_ref(&self, ids: &Arc<[String]>, at: usize) -> Option<&L> {
        match &self.ids {
            Some(known) if Arc::ptr_eq(known, ids) => self.lanes.get(at)?.as_ref(),
            _ => None,
        }
    }

    fn set(&mut self, ids: &Arc<[String]>, at: usize, lane: L) {
        if !self
            .ids
            .as_ref()
            .is_some_and(|known| Arc::ptr_eq(known, ids))
        {
            self.ids = Some(ids.clone());
            self.lanes = vec![None; ids.len()];
            self.verified = None;
        }
        if let Some(slot) = self.lanes.get_mut(at) {
            *slot = Some(lane);
        }
    }
}

/// Where one `enqueue` goes: a route, or a partition a key resolved to (its route is built
/// only when its lane has to be looked up).
enum Target {
    Route(RouteKey),
    Partition(Arc<[String]>, usize),
}

impl Target {
    fn route(&self) -> RouteKey {
        match self {
            Target::Route(route) => route.clone(),
            Target::Partition(ids, at) => RouteKey::partition(ids[*at].clone()),
        }
    }
}

struct Lane {
    /// Dropping it makes the lane send what it holds and end.
    tx: mpsc::Sender<LaneCommand>,
    shared: Arc<LaneShared>,
    task: JoinHandle<()>,
    /// When an event last went to this lane (a count of `put`s), to retire the least recently
    /// used one.
    last_used: u64,
}

/// The lanes: open ones by route, and retired ones still settling their last batches (at most
/// one per route: a new lane for the route takes over the wait, see [`LaneTask::run`]).
#[derive(Default)]
struct Lanes {
    open: HashMap<RouteKey, Lane>,
    retired: Vec<(RouteKey, JoinHandle<()>)>,
    uses: u64,
}

struct Shared {
    producer: Producer,
    keys: Arc<KeyRouter>,
    options: BufferedOptions,
    buffer: Arc<Semaphore>,
    lanes: tokio::sync::Mutex<Lanes>,
    /// The route of the last `enqueue` and its lane: the next event on the same route (all of
    /// them, without keys or ids) skips the lookup in `lanes`.
    recent: Mutex<Option<(RouteKey, Arc<LaneShared>)>>,
    /// Keyed events' lanes by partition index (keys resolved on the client alternate between
    /// partitions, so `recent` rarely matches them).
    by_partition: Mutex<PartitionLanes>,
    enqueued: AtomicU64,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    closed: AtomicBool,
}

/// A producer front that batches for you. Cheap to clone; see the [module docs](self).
///
/// Create it with [`BufferedProducer::new`]. Call [`flush`](Self::flush) to wait for every
/// outcome so far and [`close`](Self::close) to flush and stop. Order per route (partition key,
/// partition id, or none) is the order of `enqueue` calls.
#[derive(Clone)]
pub struct BufferedProducer {
    shared: Arc<Shared>,
}

impl fmt::Debug for BufferedProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferedProducer")
            .field("hub", &self.shared.producer.event_hub())
            .field("report", &self.report())
            .finish()
    }
}

impl BufferedProducer {
    /// A buffered front on `producer`.
    pub fn new(producer: Producer, options: BufferedOptions) -> BufferedProducer {
        BufferedProducer {
            shared: Arc::new(Shared {
                buffer: Arc::new(Semaphore::new(options.max_buffered_events)),
                keys: Arc::new(KeyRouter::new(&producer)),
                producer,
                options,
                lanes: tokio::sync::Mutex::new(Lanes::default()),
                recent: Mutex::new(None),
                by_partition: Mutex::new(PartitionLanes::default()),
                enqueued: AtomicU64::new(0),
                sent: Arc::new(AtomicU64::new(0)),
                failed: Arc::new(AtomicU64::new(0)),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Puts `event` in the buffer, waiting while it is full.
    ///
    /// # Errors
    /// [`ErrorKind::Closed`] after [`close`](Self::close); [`ErrorKind::InvalidConfig`]
    /// when both a partition key and id are given; [`ErrorKind::NotFound`] for an unknown
    /// partition (found when its lane first attaches).
    pub async fn enqueue(&self, event: Event, options: SendOptions) -> Result<()> {
        self.admit(event, options, true).await
    }

    /// [`enqueue`](Self::enqueue) when `wait`, else [`try_enqueue`](Self::try_enqueue).
    async fn admit(&self, event: Event, options: SendOptions, wait: bool) -> Result<()> {
        // The common cases: a round-robin event into the last lane, or a keyed one into its
        // partition's, on a slot the lane holds.
        let (event, options) = if options.is_round_robin() {
            match self.add_round_robin_prepaid(event) {
                Ok(()) => return Ok(()),
                Err(event) => (event, options),
            }
        } else {
            match self.add_keyed(event, options, ()) {
                Ok(()) => return Ok(()),
                Err((event, options, ())) => (event, options),
            }
        };
        // A free slot is taken without the waiting future.
        let permit = match self.shared.buffer.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) if wait => {
                self.unblock_full_buffer().await;
                self.shared
                    .buffer
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::new(ErrorKind::Closed, "the buffered producer is closed"))?
            }
            Err(_) => {
                // Busy only when no lane holds a slot unused either.
                self.return_spare_slots().await;
                self.shared
                    .buffer
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Error::new(ErrorKind::Busy, "the buffer is full"))?
            }
        };
        if options.is_round_robin() {
            return match self.add_round_robin(event, permit) {
                Ok(()) => Ok(()),
                Err((event, permit)) => self.put(event, options, permit).await,
            };
        }
        match self.add_keyed(event, options, permit) {
            Ok(()) => Ok(()),
            Err((event, options, permit)) => self.put(event, options, permit).await,
        }
    }

    /// The most common case: a round-robin event while the last route was round robin too
    /// goes into that lane on one of the buffer slots the lane took ahead
    /// ([`LaneShared::add_prepaid`]), with no atomic operation of its own but the count.
    /// Hands the event back when that is not the case or the lane holds no slot and none is
    /// free.
    fn add_round_robin_prepaid(&self, event: Event) -> std::result::Result<(), Event> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(event);
        }
        // The lane is used under the shortcut's lock (recent, then the lane's state: the one
        // order in which both are taken), which saves cloning it.
        let recent = self.recent();
        let Some((key, lane)) = &*recent else {
            return Err(event);
        };
        if !key.is_round_robin() {
            return Err(event);
        }
        lane.add_prepaid(event, None).map_err(|(event, _)| event)?;
        drop(recent);
        self.shared.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// For an event with a partition key resolved on the client, when its partition's lane is
    /// known: the event and its key go into that lane, on `slot` (a buffer permit, or `()`
    /// for one of the slots the lane holds, as
    /// [`add_round_robin_prepaid`](Self::add_round_robin_prepaid) does). Hands all three
    /// back otherwise.
    #[allow(clippy::result_large_err)]
    fn add_keyed<S: Slot>(
        &self,
        event: Event,
        options: SendOptions,
        slot: S,
    ) -> std::result::Result<(), (Event, SendOptions, S)> {
        if self.shared.closed.load(Ordering::Acquire) || !self.shared.options.resolve_partition_keys
        {
            return Err((event, options, slot));
        }
        let Some(key) = options.key_only() else {
            return Err((event, options, slot));
        };
        let router = &self.shared.keys;
        let generation = router.generation();
        // The partition shortcut's lock, then the lane's (the one order both are taken in).
        let mut by_partition = self.by_partition();
        let at = match by_partition.resolve(key, generation) {
            Some((at, check_age)) => {
                if check_age {
                    router.check_age(&self.shared.producer);
                }
                at
            }
            None => {
                drop(by_partition);
                let Resolved::Partition(ids, at) = router.lookup(&self.shared.producer, key) else {
                    return Err((event, options, slot));
                };
                by_partition = self.by_partition();
                // Its lane is looked up below, among these ids' lanes only.
                if !by_partition.verify(&ids, generation) {
                    return Err((event, options, slot));
                }
                at
            }
        };
        let Some(lane) = by_partition.lanes.get(at).and_then(Option::as_ref) else {
            return Err((event, options, slot));
        };
        let (key, _) = options.into_route();
        match slot.add_to(lane, event, key) {
            Ok(()) => {
                drop(by_partition);
                self.shared.enqueued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err((event, key, slot)) => {
                let options = match key {
                    Some(key) => SendOptions::new().partition_key(key),
                    None => SendOptions::new(),
                };
                Err((event, options, slot))
            }
        }
    }

    /// Returns the buffer slots that lanes took ahead and hold unused
    /// ([`LaneShared::add_prepaid`]), so a caller about to wait for a slot does not wait
    /// for slots nobody fills. Returns the lanes open now.
    async fn return_spare_slots(&self) -> Vec<Arc<LaneShared>> {
        let lanes: Vec<Arc<LaneShared>> = {
            let lanes = self.shared.lanes.lock().await;
            lanes
                .open
                .values()
                .map(|lane| lane.shared.clone())
                .collect()
        };
        for lane in &lanes {
            lane.lock().return_spare();
        }
        lanes
    }

    /// Without an await: a round-robin event while the last route was round robin too goes
    /// straight into that lane, on the slot `permit` holds. Hands the event back otherwise
    /// (closed, another last route, or a lane that ended), for [`put`](Self::put). Called before `put`, not
    /// from it: building `put`'s future (the event, options and permit moved into it) cost
    /// 0.31 -> 0.36 us per event when the shortcut was moved inside.
    #[allow(clippy::result_large_err)]
    fn add_round_robin(
        &self,
        event: Event,
        permit: OwnedSemaphorePermit,
    ) -> std::result::Result<(), (Event, OwnedSemaphorePermit)> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err((event, permit));
        }
        let lane = match &*self.recent() {
            Some((key, lane)) if key.is_round_robin() => lane.clone(),
            _ => return Err((event, permit)),
        };
        match lane.add(event, None, permit) {
            Ok(()) => {
                self.shared.enqueued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err((event, _, permit)) => Err((event, permit)),
        }
    }

    /// The buffer is full. When no lane is shipping and most of the buffer sits in open
    /// batches (many lanes, none full yet: many partitions, or a small buffer), waiting would
    /// only end at the linger time, since no batch can fill while every slot is taken; so the
    /// fullest open batch is sealed and shipped now. While a lane ships, its permits come back
    /// without help, and nothing is sealed early.
    async fn unblock_full_buffer(&self) {
        let lanes = self.return_spare_slots().await;
        if self.shared.buffer.available_permits() > 0 {
            return;
        }
        let mut open = 0;
        let mut fullest: Option<(usize, &Arc<LaneShared>)> = None;
        for lane in &lanes {
            if lane.shipping.load(Ordering::Acquire) {
                return;
            }
            let state = lane.lock();
            if !state.sealed.is_empty() {
                return;
            }
            let len = state.open.len();
            open += len;
            if fullest.is_none_or(|(most, _)| len > most) {
                fullest = Some((len, lane));
            }
        }
        if open * 2 < self.shared.options.max_buffered_events {
            return;
        }
        if let Some((len, lane)) = fullest.filter(|(len, _)| *len > 0) {
            tracing::trace!(
                events = len,
                "buffer full of open batches; shipping the fullest"
            );
            lane.seal_open();
        }
    }

    /// Like [`enqueue`](Self::enqueue) but fails with [`ErrorKind::Busy`] when the buffer is full.
    ///
    /// # Errors
    /// As [`enqueue`](Self::enqueue), plus [`ErrorKind::Busy`].
    pub async fn try_enqueue(&self, event: Event, options: SendOptions) -> Result<()> {
        self.admit(event, options, false).await
    }

    async fn put(
        &self,
        event: Event,
        options: SendOptions,
        permit: OwnedSemaphorePermit,
    ) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                "the buffered producer is closed",
            ));
        }
        let (partition_key, partition_id) = options.into_route();
        if partition_key.is_some() && partition_id.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "give a partition key or a partition id, not both",
            ));
        }
        // A key resolved on the client travels with its event to the partition's lane.
        let (target, key) = match partition_key {
            Some(key) if !self.shared.options.resolve_partition_keys => {
                (Target::Route(RouteKey::key(key)), None)
            }
            Some(key) => match self.shared.keys.resolve(&self.shared.producer, &key).await {
                Some((ids, at)) => (Target::Partition(ids, at), Some(key)),
                None => (Target::Route(RouteKey::key(key)), None),
            },
            None => (Target::Route(RouteKey::id(partition_id)), None),
        };
        let (mut event, mut key, mut permit) = (event, key, permit);
        let mut lane = match &target {
            Target::Route(route) => self.recent_lane(route),
            Target::Partition(ids, at) => self.by_partition().get(ids, *at),
        };
        loop {
            let current = match lane.take() {
                Some(lane) => lane,
                None => {
                    let route = target.route();
                    let found = self.lane(&route).await?;
                    match &target {
                        Target::Route(_) => *self.recent() = Some((route, found.clone())),
                        Target::Partition(ids, at) => {
                            self.by_partition().set(ids, *at, found.clone())
                        }
                    }
                    found
                }
            };
            // A lane that ended between the lookup and the add hands the event back; the next
            // lookup starts the route's new lane.
            match current.add(event, key.take(), permit) {
                Ok(()) => break,
                Err((e, k, p)) => (event, key, permit) = (e, k, p),
            }
        }
        self.shared.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn by_partition(&self) -> std::sync::MutexGuard<'_, PartitionLanes> {
        self.shared
            .by_partition
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Option<(RouteKey, Arc<LaneShared>)>> {
        self.shared.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last route's lane, if `route` is that route.
    fn recent_lane(&self, route: &RouteKey) -> Option<Arc<LaneShared>> {
        match &*self.recent() {
            Some((key, lane)) if key == route => Some(lane.clone()),
            _ => None,
        }
    }

    async fn lane(&self, route: &RouteKey) -> Result<Arc<LaneShared>> {
        let mut guard = self.shared.lanes.lock().await;
        let lanes = &mut *guard;
        lanes.uses += 1;
        // The last route was used up to now, though its events skipped this lookup.
        if let Some((key, _)) = &*self.recent() {
            if let Some(lane) = lanes.open.get_mut(key) {
                lane.last_used = lanes.uses;
            }
        }
        // So were the partitions keyed events reached through the shortcut.
        {
            let by_partition = self.by_partition();
            if let Some(ids) = &by_partition.ids {
                for (id, cached) in ids.iter().zip(&by_partition.lanes) {
                    if cached.is_some() {
                        if let Some(lane) = lanes.open.get_mut(&RouteKey::partition(id.clone())) {
                            lane.last_used = lanes.uses;
                        }
                    }
                }
            }
        }
        lanes.uses += 1;
        if let Some(lane) = lanes.open.get_mut(route) {
            if !lane.tx.is_closed() && !lane.shared.is_closed() {
                lane.last_used = lanes.uses;
                return Ok(lane.shared.clone());
            }
        }
        let route = route.clone();
        lanes
            .open
            .retain(|_, lane| !lane.tx.is_closed() && !lane.shared.is_closed());
        lanes.retired.retain(|(_, task)| !task.is_finished());
        if lanes.open.len() >= self.shared.options.max_lanes {
            // Retire the least recently used lane: dropping its sender makes it send its open
            // batch and end once its outcomes are in.
            let oldest = lanes
                .open
                .iter()
                .min_by_key(|(_, lane)| lane.last_used)
                .map(|(key, _)| key.clone());
            if let Some((key, lane)) = oldest.and_then(|key| lanes.open.remove_entry(&key)) {
                lanes.retired.push((key, lane.task));
                // No event may join the retired lane through the partition shortcut.
                *self.by_partition() = PartitionLanes::default();
            }
        }
        // A lane retired on this route may still be sending: the new one starts after it has
        // settled, so order per route holds.
        let predecessor = lanes
            .retired
            .iter()
            .position(|(key, _)| *key == route)
            .map(|i| lanes.retired.swap_remove(i).1);
        let mut batch_options = BatchOptions::new();
        if let Some(k) = &route.partition_key {
            batch_options = batch_options.partition_key(k.clone());
        }
        if let Some(p) = &route.partition_id {
            batch_options = batch_options.partition_id(p.clone());
        }
        // Fails early (unknown partition) before any event is taken.
        let first = self.shared.producer.create_batch(batch_options).await?;
        let (tx, rx) = mpsc::channel(16);
        let options = &self.shared.options;
        let failures = Failures {
            failed: self.shared.failed.clone(),
            on_failure: options.on_failure.clone(),
            keep_events: options.keep_failed_events,
            partition_key: route.partition_key.clone(),
            partition_id: route.partition_id.clone(),
        };
        let shared = Arc::new(LaneShared {
            state: Mutex::new(LaneState {
                keep: failures.keeps_events(),
                open: first,
                permits: None,
                kept: Kept::default(),
                sealed: VecDeque::new(),
                closed: false,
            }),
            shipping: AtomicBool::new(false),
            wake: Notify::new(),
            failures: failures.clone(),
            buffer: self.shared.buffer.clone(),
            take_ahead: take_ahead(options.max_buffered_events),
        });
        let lane = LaneTask {
            producer: self.shared.producer.clone(),
            linger: options.linger,
            successes: Successes {
                sent: self.shared.sent.clone(),
                on_success: options.on_success.clone(),
                partition_key: route.partition_key.clone(),
                partition_id: route.partition_id.clone(),
            },
            failures,
        };
        let task = tokio::spawn(lane.run(predecessor, shared.clone(), rx));
        lanes.open.insert(
            route,
            Lane {
                tx,
                shared: shared.clone(),
                task,
                last_used: lanes.uses,
            },
        );
        Ok(shared)
    }

    /// Sends every partly filled batch now and waits until every event enqueued before the
    /// call has an outcome.
    pub async fn flush(&self) {
        let (senders, retired): (Vec<mpsc::Sender<LaneCommand>>, Vec<_>) = {
            let mut lanes = self.shared.lanes.lock().await;
            let senders = lanes.open.values().map(|l| l.tx.clone()).collect();
            (senders, std::mem::take(&mut lanes.retired))
        };
        // Retired lanes have sent everything they had: they end when it has settled.
        for (_, task) in retired {
            let _ = task.await;
        }
        let mut waits = Vec::new();
        for tx in senders {
            let (done, wait) = oneshot::channel();
            if tx.send(LaneCommand::Flush(done)).await.is_ok() {
                waits.push(wait);
            }
        }
        for wait in waits {
            let _ = wait.await;
        }
    }

    /// Counters so far.
    pub fn report(&self) -> BufferedReport {
        let enqueued = self.shared.enqueued.load(Ordering::Relaxed);
        let sent = self.shared.sent.load(Ordering::Relaxed);
        let failed = self.shared.failed.load(Ordering::Relaxed);
        BufferedReport {
            enqueued,
            sent,
            failed,
            pending: enqueued.saturating_sub(sent + failed),
        }
    }

    /// Like [`close`](Self::close), but returns when `deadline` passes even if outcomes are
    /// still outstanding; the report's `pending` says how many events had none by then. The
    /// deliveries still in flight keep going in the background.
    pub async fn close_within(self, deadline: Duration) -> BufferedReport {
        let observer = self.clone();
        match tokio::time::timeout(deadline, self.close()).await {
            Ok(report) => report,
            Err(_) => {
                let report = observer.report();
                tracing::warn!(
                    pending = report.pending,
                    "close deadline passed with events in flight"
                );
                report
            }
        }
    }

    /// Flushes, stops the lanes and returns the final counters. Enqueueing afterwards fails
    /// with [`ErrorKind::Closed`]. The underlying [`Producer`] stays open.
    pub async fn close(self) -> BufferedReport {
        self.shared.closed.store(true, Ordering::Release);
        self.flush().await;
        let lanes: Vec<Lane> = self
            .shared
            .lanes
            .lock()
            .await
            .open
            .drain()
            .map(|(_, l)| l)
            .collect();
        for lane in lanes {
            drop(lane.tx);
            let _ = lane.task.await;
        }
        self.shared.buffer.close();
        self.report()
    }
}

/// An event and its key that a lane refused, with the slot it came with.
type Refused<S> = (Event, Option<String>, S);

/// The buffer slot an event takes in a lane: a permit of its own, or `()` for one of the
/// slots the lane took ahead. Handed back with the event when the lane refuses it.
trait Slot: Sized {
    /// Adds `event` with `key` to `lane` on this slot.
    fn add_to(self, lane: &LaneShared, event: Event, key: Option<String>) -> AddResult<Self>;
}

/// What [`Slot::add_to`] gives back.
type AddResult<S> = std::result::Result<(), Refused<S>>;

impl Slot for OwnedSemaphorePermit {
    fn add_to(self, lane: &LaneShared, event: Event, key: Option<String>) -> AddResult<Self> {
        lane.add(event, key, self)
    }
}

impl Slot for () {
    fn add_to(self, lane: &LaneShared, event: Event, key: Option<String>) -> AddResult<Self> {
        let refused = |(event, key)| (event, key, ());
        lane.add_prepaid(event, key).map_err(refused)
    }
}

/// One route's open batch, filled by the callers of `enqueue` themselves (an event is encoded
/// into it under a short lock, with no hand-off to another task), and the batches they filled,
/// which the lane's task ships. The task is woken only when a batch is sealed or a new one
/// gets its first event (to start its linger time), not per event.
struct LaneShared {
    state: Mutex<LaneState>,
    /// Set while the lane's task hands a batch to the producer (its permits are still held).
    shipping: AtomicBool,
    wake: Notify,
    failures: Failures,
    /// The buffered producer's slots, which [`add_prepaid`](Self::add_prepaid) takes ahead.
    buffer: Arc<Semaphore>,
    /// How many slots it takes at once.
    take_ahead: usize,
}

/// How many buffer slots a lane takes at once for the events that reach it through a
/// shortcut (round robin, or a key resolved to a known partition's lane): a 64th of the buffer, at most 256 (so the one atomic operation on
/// the buffer's semaphore is shared by that many events, and what a lane holds unused stays
/// a small part of the buffer).
fn take_ahead(max_buffered_events: usize) -> usize {
    (max_buffered_events / 64).clamp(1, 256)
}

struct LaneState {
    open: EventBatch,
    /// The buffer permits of the open batch's events (one each) and the lane's spare slots
    /// (the rest: taken ahead, no event's yet), merged into one so shipping releases a
    /// batch's with one call rather than one per event.
    permits: Option<OwnedSemaphorePermit>,
    /// The open batch's events (only when the failure callback wants them) and body bytes.
    kept: Kept,
    /// Whether to keep the events.
    keep: bool,
    /// Full batches, oldest first, waiting for the lane's task to send them.
    sealed: VecDeque<Filled>,
    /// Set when the task has taken its last batches: adding then hands the event back.
    closed: bool,
}

/// A batch with the permits and events that go with it.
struct Filled {
    batch: EventBatch,
    permits: Option<OwnedSemaphorePermit>,
    kept: Kept,
}

impl LaneShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        // The state is consistent between statements; a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Seals the open batch (if it holds anything) for the lane's task to ship now.
    fn seal_open(&self) {
        let mut state = self.lock();
        if state.closed || state.open.is_empty() {
            return;
        }
        let filled = state.take_open();
        state.sealed.push_back(filled);
        drop(state);
        self.wake.notify_one();
    }

    /// Encodes `event` into the open batch (sealing it first when it is full), or hands it
    /// back when the lane has ended.
    #[allow(clippy::result_large_err)]
    fn add(
        &self,
        event: Event,
        key: Option<String>,
        permit: OwnedSemaphorePermit,
    ) -> std::result::Result<(), (Event, Option<String>, OwnedSemaphorePermit)> {
        let state = self.lock();
        if state.closed {
            return Err((event, key, permit));
        }
        self.add_locked(state, event, key, Some(permit));
        Ok(())
    }

    /// Like [`add`](Self::add), on one of the lane's spare slots, taking more ahead when it
    /// has none ([`take_ahead`]); hands the event back when the lane has ended, or holds no
    /// slot and none is free.
    #[allow(clippy::result_large_err)]
    fn add_prepaid(
        &self,
        event: Event,
        key: Option<String>,
    ) -> std::result::Result<(), (Event, Option<String>)> {
        let mut state = self.lock();
        if state.closed {
            return Err((event, key));
        }
        if state.spare() == 0 {
            let want = self.take_ahead.min(self.buffer.available_permits());
            let Ok(taken) = u32::try_from(want) else {
                return Err((event, key));
            };
            if taken == 0 {
                return Err((event, key));
            }
            let Ok(permit) = self.buffer.clone().try_acquire_many_owned(taken) else {
                return Err((event, key));
            };
            state.hold(permit);
        }
        self.add_locked(state, event, key, None);
        Ok(())
    }

    /// Encodes `event` into the open batch under `state`'s lock, on `permit`'s slot or (None)
    /// a spare one.
    fn add_locked(
        &self,
        mut state: std::sync::MutexGuard<'_, LaneState>,
        event: Event,
        key: Option<String>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        // A first event starts the linger time: the task arms it.
        let mut wake = state.open.is_empty();
        loop {
            match state.open.add_keyed(&event, key.as_deref()) {
                Ok(()) => {
                    let state = &mut *state;
                    // On a spare slot the event now holds it: nothing to move.
                    if let Some(permit) = permit {
                        state.hold(permit);
                    }
                    state.kept.body_bytes += event.body().len() as u64;
                    if state.keep {
                        state.kept.events.push(event);
                        state.kept.keys.push(key);
                    }
                    break;
                }
                Err(Rejection::Full) => {
                    let filled = state.take_open();
                    state.sealed.push_back(filled);
                    wake = true;
                }
                Err(Rejection::TooLarge) => {
                    // Its slot goes back: `permit` dropped, or a spare one left spare.
                    drop(state);
                    let len = event.body().len();
                    let kept = Kept {
                        body_bytes: 0,
                        events: vec![event],
                        keys: vec![key],
                    };
                    self.failures.report(
                        1,
                        kept,
                        Error::new(
                            ErrorKind::MessageTooLarge,
                            format!("an event with a {len}-byte body exceeds the batch size limit"),
                        ),
                    );
                    return;
                }
            }
        }
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }
}

impl LaneState {
    /// Every batch not shipped yet, oldest first: the sealed ones, then the open one (taken
    /// under one lock, so that a batch sealed meanwhile by an `enqueue` on another thread
    /// cannot be shipped after the newer open batch).
    fn take_all(&mut self) -> Vec<Filled> {
        let mut all: Vec<Filled> = self.sealed.drain(..).collect();
        all.push(self.take_open());
        all
    }

    /// Adds `permit`'s slots to the lane's.
    fn hold(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.permits {
            Some(held) => held.merge(permit),
            None => self.permits = Some(permit),
        }
    }

    /// How many slots the lane holds that no event in the open batch does.
    fn spare(&self) -> usize {
        self.permits
            .as_ref()
            .map_or(0, |held| held.num_permits().saturating_sub(self.open.len()))
    }

    /// Gives the spare slots back to the buffer.
    fn return_spare(&mut self) {
        let spare = self.spare();
        if spare == 0 {
            return;
        }
        match &mut self.permits {
            Some(held) if held.num_permits() > spare => drop(held.split(spare)),
            _ => self.permits = None,
        }
    }

    /// The open batch's permits, split off the spare ones.
    fn take_open_permits(&mut self) -> Option<OwnedSemaphorePermit> {
        if self.spare() == 0 {
            return self.permits.take();
        }
        match self.open.len() {
            0 => None,
            events => self.permits.as_mut()?.split(events),
        }
    }

    /// The open batch and what goes with it, replaced by an empty one.
    fn take_open(&mut self) -> Filled {
        let empty = self.open.empty_like();
        Filled {
            permits: self.take_open_permits(),
            batch: std::mem::replace(&mut self.open, empty),
            kept: std::mem::take(&mut self.kept),
        }
    }
}

/// One route's shipping loop.
struct LaneTask {
    producer: Producer,
    linger: Duration,
    successes: Successes,
    failures: Failures,
}

/// Where one lane's stored batches are told: the shared counter and the application's callback.
#[derive(Clone)]
struct Successes {
    sent: Arc<AtomicU64>,
    on_success: Option<SuccessCallback>,
    partition_key: Option<String>,
    partition_id: Option<String>,
}

impl Successes {
    /// Counts `count` stored events and tells the callback.
    fn report(&self, count: usize, body_bytes: u64, shipped_at: Instant) {
        self.sent.fetch_add(count as u64, Ordering::Relaxed);
        if let Some(cb) = &self.on_success {
            cb(SettledBatch {
                events: count,
                body_bytes,
                latency: shipped_at.elapsed(),
                partition_key: self.partition_key.clone(),
                partition_id: self.partition_id.clone(),
            });
        }
    }
}

/// Where one lane's failed events go: the shared counter and the application's callback.
#[derive(Clone)]
struct Failures {
    failed: Arc<AtomicU64>,
    on_failure: Option<FailureCallback>,
    /// Whether the callback wants the events themselves.
    keep_events: bool,
    partition_key: Option<String>,
    partition_id: Option<String>,
}

impl Failures {
    /// Whether the lane must keep the events of its batches until their outcome.
    fn keeps_events(&self) -> bool {
        self.on_failure.is_some() && self.keep_events
    }

    /// Counts `count` failed events and hands the kept ones (if any) to the callback.
    fn report(&self, count: usize, kept: Kept, error: Error) {
        self.failed.fetch_add(count as u64, Ordering::Relaxed);
        let (events, partition_keys) = if self.keep_events {
            (kept.events, kept.keys)
        } else {
            (Vec::new(), Vec::new())
        };
        tracing::warn!(events = count, error = %error, "buffered events failed");
        if let Some(cb) = &self.on_failure {
            cb(FailedBatch {
                events,
                count,
                partition_key: self.partition_key.clone(),
                partition_id: self.partition_id.clone(),
                partition_keys,
                error,
            });
        }
    }
}

impl LaneTask {
    async fn run(
        self,
        predecessor: Option<JoinHandle<()>>,
        shared: Arc<LaneShared>,
        mut rx: mpsc::Receiver<LaneCommand>,
    ) {
        if let Some(earlier) = predecessor {
            let _ = earlier.await;
        }
        // Outcomes are awaited in order by a settler, so the lane never waits on the hub
        // except through the producer's in-flight bound.
        let (settle_tx, mut settle_rx) = mpsc::unbounded_channel::<Shipped>();
        let successes = self.successes.clone();
        let failures = self.failures.clone();
        let settler = tokio::spawn(async move {
            while let Some(shipped) = settle_rx.recv().await {
                let Shipped {
                    count,
                    delivery,
                    kept,
                    at,
                    flushed,
                } = shipped;
                match delivery.await {
                    Ok(()) if count > 0 => successes.report(count, kept.body_bytes, at),
                    Ok(()) => {}
                    Err(error) => failures.report(count, kept, error),
                }
                if let Some(done) = flushed {
                    let _ = done.send(());
                }
            }
        });
        // When the open batch is sent partly filled.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let linger = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                command = rx.recv() => {
                    let Some(LaneCommand::Flush(done)) = command else { break };
                    let all = shared.lock().take_all();
                    let last = all.len() - 1;
                    let mut done = Some(done);
                    for (i, filled) in all.into_iter().enumerate() {
                        let flushed = if i == last { done.take() } else { None };
                        self.ship(&shared, filled, &settle_tx, flushed).await;
                    }
                    deadline = None;
                }
                () = shared.wake.notified() => {
                    if self.ship_sealed(&shared, &settle_tx).await {
                        // The open batch was started after the shipped one: its own time.
                        deadline = None;
                    }
                }
                () = linger => {
                    let all = shared.lock().take_all();
                    for filled in all {
                        self.ship(&shared, filled, &settle_tx, None).await;
                    }
                    deadline = None;
                }
            }
            if deadline.is_none() && !shared.lock().open.is_empty() {
                deadline = Some(tokio::time::Instant::now() + self.linger);
            }
        }
        // The last batches: from now on an add hands its event back (to the route's next lane).
        let last = {
            let mut state = shared.lock();
            state.closed = true;
            state.return_spare();
            state.take_all()
        };
        for filled in last {
            self.ship(&shared, filled, &settle_tx, None).await;
        }
        drop(settle_tx);
        let _ = settler.await;
    }

    /// Ships the sealed batches in order; whether there were any.
    async fn ship_sealed(
        &self,
        shared: &LaneShared,
        settle: &mpsc::UnboundedSender<Shipped>,
    ) -> bool {
        let mut any = false;
        loop {
            let next = shared.lock().sealed.pop_front();
            let Some(filled) = next else { return any };
            any = true;
            self.ship(shared, filled, settle, None).await;
        }
    }

    /// Sends a batch (if it holds anything) and then releases its buffer permits.
    async fn ship(
        &self,
        shared: &LaneShared,
        filled: Filled,
        settle: &mpsc::UnboundedSender<Shipped>,
        flushed: Option<oneshot::Sender<()>>,
    ) {
        // Cleared before the permits go back: an `enqueue` that sees it set can count on them
        // (see `unblock_full_buffer`).
        shared.shipping.store(true, Ordering::Release);
        let permits = self.hand_over(filled, settle, flushed).await;
        shared.shipping.store(false, Ordering::Release);
        drop(permits);
    }

    /// Hands one batch to the producer; returns its buffer permits.
    async fn hand_over(
        &self,
        filled: Filled,
        settle: &mpsc::UnboundedSender<Shipped>,
        flushed: Option<oneshot::Sender<()>>,
    ) -> Option<OwnedSemaphorePermit> {
        let Filled {
            batch,
            permits,
            kept,
        } = filled;
        if batch.is_empty() {
            if let Some(done) = flushed {
                // Nothing open: the flush is done once earlier batches settle.
                let (tx, rx) = oneshot::channel::<crate::Result<()>>();
                let _ = tx.send(Ok(()));
                let _ = settle.send(Shipped {
                    count: 0,
                    delivery: DeliveryFuture::from_receiver(rx),
                    kept: Kept::default(),
                    at: Instant::now(),
                    flushed: Some(done),
                });
            }
            return permits;
        }
        let count = batch.len();
        let at = Instant::now();
        match self.producer.send_batch(batch).await {
            Ok(delivery) => {
                let _ = settle.send(Shipped {
                    count,
                    delivery,
                    kept,
                    at,
                    flushed,
                });
            }
            Err(error) => {
                self.failures.report(count, kept, error);
                if let Some(done) = flushed {
                    let _ = done.send(());
                }
            }
        }
        permits
    }
}

/// What a lane keeps of its open batch besides the encoding.
#[derive(Default)]
struct Kept {
    /// Its events, when a failure callback wants them back.
    events: Vec<Event>,
    /// Their own partition keys (see [`FailedBatch::partition_keys`]), kept with them.
    keys: Vec<Option<String>>,
    /// The sum of their body lengths, for the success callback.
    body_bytes: u64,
}

/// A batch handed to the producer, waiting for its outcome in the lane's settler.
struct Shipped {
    count: usize,
    delivery: DeliveryFuture,
    kept: Kept,
    /// When it was handed to the producer.
    at: Instant,
    flushed: Option<oneshot::Sender<()>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Arc<[String]> {
        (0..n).map(|i| i.to_string()).collect()
    }

    /// A key whose partition among `n` is `at`.
    fn key_for(at: usize, n: usize) -> String {
        (0..)
            .map(|i| format!("sensor-{i}"))
            .find(|k| partition_for_key(k, n) == at)
            .unwrap()
    }

    #[test]
    fn keys_resolve_without_the_router_only_over_ids_verified_in_its_generation() {
        let mut lanes = PartitionLanes::<&str>::default();
        let four = ids(4);
        let key = key_for(2, 4);
        lanes.set(&four, 2, "lane 2");
        // Set but never seen to be the router's: the router is asked.
        assert_eq!(lanes.resolve(&key, 7), None);
        lanes.verify(&four, 7);
        assert_eq!(lanes.resolve(&key, 7), Some((2, false)));
        // A partition without a lane yet.
        assert_eq!(lanes.resolve(&key_for(1, 4), 7), None);
        // The router re-read its ids: generation 8.
        assert_eq!(lanes.resolve(&key, 8), None);
        // Other ids than those held here verify nothing.
        let eight = ids(8);
        lanes.verify(&eight, 8);
        assert_eq!(lanes.resolve(&key, 8), None);
        // New ids start afresh, unverified.
        lanes.set(&eight, partition_for_key(&key, 8), "lane of 8");
        assert_eq!(lanes.resolve(&key, 8), None);
        lanes.verify(&eight, 8);
        assert_eq!(
            lanes.resolve(&key, 8),
            Some((partition_for_key(&key, 8), false))
        );
    }

    #[test]
    fn every_256th_key_resolved_without_the_router_checks_the_ids_age() {
        let mut lanes = PartitionLanes::<&str>::default();
        let one = ids(1);
        lanes.set(&one, 0, "lane");
        lanes.verify(&one, 1);
        let checks: Vec<usize> = (1..=600)
            .filter(|_| lanes.resolve("k", 1).unwrap().1)
            .collect();
        assert_eq!(checks, [256, 512]);
    }
}
