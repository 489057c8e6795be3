//! The cloud gateway: device-to-cloud messages as any number of devices over shared
//! connections, with identities created on first use (feature `registry`), idle links closed,
//! and every device's failure kept to that device.
//!
//! # Devices and connections
//! Each device gets its own token (signed with the gateway's policy key, which needs
//! DeviceConnect) and its own sender link, set up on its first message. A connection takes
//! up to [`max_devices_per_connection`](super::IotHubBuilder::max_devices_per_connection)
//! devices (default 900, under IoT Hub's cap of about 999 tokens per connection). A device is
//! placed by a stable hash of its id (FNV-1a, then jump consistent hashing over the
//! connections open): the same id lands on the same connection whenever that one has room,
//! whatever order devices arrive in, and opening one more connection moves only about
//! 1/(n+1) of the ids' targets. A device whose connection is full goes to the next one (in
//! hash order) with room; when none has room, a new connection is opened and the device goes
//! there. When the hub refuses a token because
//! its connection holds too many (403005 `IotHubMaxCbsTokenExceeded`: tokens of devices gone
//! idle still count until they expire), that connection takes no new devices for one token
//! lifetime and the device is placed on another.
//!
//! # Creating identities (Particle's flow)
//! With `IotHubBuilder::auto_create` (feature `registry`), a device the hub does not know is
//! created through `Registry::ensure_device` and, only when this created it and a name was
//! given ([`Gateway::send_named`]), its name is written once to
//! `properties.desired.deviceName`; then its link is attached and the message sent. An
//! identity that existed already (409) is never renamed, so a second gateway, or a restart,
//! writes nothing. [`AutoCreate`] says when: on the hub's not-found (the default: registry
//! calls only for new devices) or before each device's first use. At most
//! [`registry_concurrency`](super::IotHubBuilder::registry_concurrency) registry calls run at
//! once, and the registry client paces itself at its rate (100 operations a minute by
//! default, IoT Hub's S1 limit) and waits out 429s. New devices that wait for a registry call
//! together (many unknown devices arriving at once; a call waits in 20 ms rounds, at most
//! 200 ms, while devices being set up meanwhile keep joining) go out in one bulk call
//! (`Registry::create_devices`, up to 100 per call, each name set in the same call); a device
//! alone is created with one create and, when it has a name, one twin write.
//!
//! # Failures stay with their device
//! A device the hub refuses (not found without auto-create, disabled, unauthorised,
//! throttled, or whose creation failed) fails its own sends with a typed error, frees its slot
//! on its connection, and is answered with that same error without asking the hub again until
//! [`refused_retry_after`](super::IotHubBuilder::refused_retry_after) has passed.
//! [`Gateway::device_state`] reports each device.
//!
//! # Idle devices and memory
//! A device with no message for [`idle_timeout`](super::IotHubBuilder::idle_timeout) has its
//! link closed (what it had in flight settles first) and its token no longer refreshed; its
//! next message attaches again. What the gateway keeps per device is a small fixed record
//! (placement, last use, whether it was checked in the registry, a refusal), plus a link and
//! its queue only while the device is active; queued messages are bounded by the shared
//! in-flight limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::amqp::{ConnectConfig, Engine, LinkHandle};
use crate::batch::{EventBatch, Route, Sections};
use crate::entity::{iothub as entity, Entity};
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::producer::{new_batch, DeliveryFuture, Pipeline};

#[cfg(feature = "registry")]
use super::registry::{EnsureOutcome, Registry};

/// When a [`Gateway`] with `IotHubBuilder::auto_create` (feature `registry`) creates a
/// device's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AutoCreate {
    /// When the hub refuses the device's link as not found (404001): registry calls only for
    /// devices the hub does not know.
    #[default]
    OnNotFound,
    /// Before the device's first link, once per device and gateway: one registry call (a
    /// create, answered 409 when it exists) for every device the gateway sees.
    BeforeFirstUse,
}

/// What a gateway knows of one device.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DeviceState {
    /// The device has a link, on connection number `connection` (0-based, in opening order).
    Active {
        /// Which of the gateway's connections carries it.
        connection: usize,
    },
    /// The device sent before; its link was closed (idle) or is not set up yet.
    Idle,
    /// The hub or the registry refused the device; its sends fail with this error until the
    /// refusal expires.
    Refused(Error),
}

/// What a gateway has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct GatewayStats {
    /// Connections open.
    pub connections: usize,
    /// Devices with a link.
    pub devices: usize,
    /// Deliveries waiting for the hub's outcome.
    pub in_flight: usize,
    /// Identities this gateway created in the registry.
    pub devices_created: u64,
    /// Device names written to twins (once per created identity that had a name).
    pub names_written: u64,
    /// Device links closed for idleness.
    pub idle_closed: u64,
    /// Times a device was refused (by the hub or the registry).
    pub devices_refused: u64,
}

/// How the builder configures a gateway.
pub(super) struct GatewaySettings {
    pub(super) host_name: String,
    pub(super) config: ConnectConfig,
    pub(super) max_devices: usize,
    pub(super) pipeline: Pipeline,
    pub(super) token_lifetime: Duration,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) refused_for: Duration,
    #[cfg(feature = "registry")]
    pub(super) creator: Option<(Registry, AutoCreate, usize)>,
}

/// Sends device-to-cloud messages as any device of the hub, over shared connections.
///
/// Cheap to clone; every clone shares the connections, links and in-flight bounds. See the
/// [module docs](self) for placement, auto-create, refusals and idle links.
#[derive(Clone, Debug)]
pub struct Gateway {
    inner: Arc<GatewayInner>,
}

struct GatewayInner {
    host_name: String,
    config: ConnectConfig,
    max_devices: usize,
    pipeline: Pipeline,
    token_lifetime: Duration,
    idle_timeout: Option<Duration>,
    refused_for: Duration,
    #[cfg(feature = "registry")]
    creator: Option<Creator>,
    shards: Mutex<Shards>,
    /// One set-up at a time per device, so concurrent first sends create it once.
    setups: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    counters: Counters,
    sweeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[cfg(feature = "registry")]
struct Creator {
    registry: Registry,
    when: AutoCreate,
    permits: tokio::sync::Semaphore,
    /// Creations waiting for the next registry call: whoever gets a permit takes up to
    /// [`MAX_BULK_DEVICES`](super::registry::MAX_BULK_DEVICES) of them into one bulk call.
    queue: std::sync::Mutex<Vec<PendingCreate>>,
}

/// How long a registry call waits, per round, for other new devices set up at the same time
/// to join it (only while there are such devices and the queue grows; 10 rounds at most).
#[cfg(feature = "registry")]
const BULK_GATHER: Duration = Duration::from_millis(20);

/// A device waiting to be created, and where its outcome goes.
#[cfg(feature = "registry")]
type PendingCreate = (
    String,
    Option<String>,
    tokio::sync::oneshot::Sender<Result<EnsureOutcome>>,
);

#[derive(Default)]
struct Counters {
    created: AtomicU64,
    names: AtomicU64,
    idle_closed: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for GatewayInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("host", &self.host_name)
            .field("max_devices_per_connection", &self.max_devices)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// The gateway's connections and which device lives on which.
#[derive(Default)]
struct Shards {
    engines: Vec<Arc<Engine>>,
    /// Devices with a link, per connection (by index in `engines`).
    load: Vec<usize>,
    /// A connection the hub said holds too many tokens takes no new device until then.
    full_until: Vec<Option<Instant>>,
    devices: HashMap<String, DeviceEntry>,
}

/// The fixed-size record kept per device.
struct DeviceEntry {
    shard: Option<usize>,
    last_used: Instant,
    /// Checked in the registry (created or found existing) by this gateway.
    #[cfg_attr(not(feature = "registry"), allow(dead_code))]
    ensured: bool,
    refused: Option<(Error, Instant)>,
}

impl DeviceEntry {
    fn new() -> DeviceEntry {
        DeviceEntry {
            shard: None,
            last_used: Instant::now(),
            ensured: false,
            refused: None,
        }
    }
}

/// Whether the hub refused a token because its connection holds too many.
fn is_token_cap(error: &Error) -> bool {
    error.kind() == ErrorKind::Unauthorized && {
        let text = error.to_string();
        text.contains("IotHubMaxCbsTokenExceeded") || text.contains("403005")
    }
}

/// Errors that say something about the device (kept as its refusal), not the connection.
fn is_refusal(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::NotFound
            | ErrorKind::Unauthorized
            | ErrorKind::ServerBusy
            | ErrorKind::InvalidArgument
            | ErrorKind::Rejected
    )
}

impl Gateway {
    pub(super) fn new(settings: GatewaySettings) -> Gateway {
        let inner = Arc::new(GatewayInner {
            host_name: settings.host_name,
            config: settings.config,
            max_devices: settings.max_devices,
            pipeline: settings.pipeline,
            token_lifetime: settings.token_lifetime,
            idle_timeout: settings.idle_timeout,
            refused_for: settings.refused_for,
            #[cfg(feature = "registry")]
            creator: settings.creator.map(|(registry, when, n)| Creator {
                registry,
                when,
                permits: tokio::sync::Semaphore::new(n.max(1)),
                queue: std::sync::Mutex::new(Vec::new()),
            }),
            shards: Mutex::new(Shards::default()),
            setups: std::sync::Mutex::new(HashMap::new()),
            counters: Counters::default(),
            sweeper: std::sync::Mutex::new(None),
        });
        if let Some(idle) = inner.idle_timeout {
            let task = tokio::spawn(sweep(Arc::downgrade(&inner), idle));
            if let Ok(mut slot) = inner.sweeper.lock() {
                *slot = Some(task);
            }
        }
        Gateway { inner }
    }

    /// A builder.
    pub fn builder() -> super::IotHubBuilder {
        super::IotHubBuilder::default()
    }

    /// A gateway from a policy connection string, with default options.
    ///
    /// # Errors
    /// As [`IotHubBuilder::gateway`](super::IotHubBuilder::gateway).
    pub async fn from_connection_string(connection_string: &str) -> Result<Gateway> {
        Self::builder()
            .connection_string(connection_string)
            .gateway()
            .await
    }

    /// Queues one message as `device_id`'s; the future resolves with the hub's outcome. The
    /// device's token and link are set up on its first message (and after it went idle).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an id IoT Hub does not allow; the device's refusal
    /// ([`ErrorKind::NotFound`], [`ErrorKind::Unauthorized`], [`ErrorKind::ServerBusy`]; also
    /// the registry's errors when it was being created), for this device alone; as
    /// [`DeviceSender::send`](super::DeviceSender::send).
    pub async fn send(&self, device_id: &str, message: Event) -> Result<DeliveryFuture> {
        self.send_named(device_id, None, message).await
    }

    /// As [`send`](Self::send); when this call creates the device's identity (auto-create),
    /// `name` is written once to its twin's `properties.desired.deviceName`. Ignored for a
    /// device that exists.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn send_named(
        &self,
        device_id: &str,
        name: Option<&str>,
        message: Event,
    ) -> Result<DeliveryFuture> {
        let (engine, link) = self.device(device_id, name).await?;
        let sections = Sections::single(&message, None, link.max_message_size())?;
        self.inner
            .pipeline
            .submit(&engine, link, sections, true, true)
            .await
    }

    /// An empty batch for `device_id`, as large as its link allows (sets the device up).
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn create_batch(&self, device_id: &str) -> Result<EventBatch> {
        let (_, link) = self.device(device_id, None).await?;
        new_batch(Route::default(), link.max_message_size(), None)
    }

    /// Queues a batch as one delivery of `device_id`.
    ///
    /// # Errors
    /// As [`DeviceSender::send_batch`](super::DeviceSender::send_batch) and
    /// [`send`](Self::send).
    pub async fn send_batch(&self, device_id: &str, batch: EventBatch) -> Result<DeliveryFuture> {
        self.send_batch_named(device_id, None, batch).await
    }

    /// As [`send_batch`](Self::send_batch), with the device's name for auto-create (see
    /// [`send_named`](Self::send_named)).
    ///
    /// # Errors
    /// As [`send_batch`](Self::send_batch).
    pub async fn send_batch_named(
        &self,
        device_id: &str,
        name: Option<&str>,
        batch: EventBatch,
    ) -> Result<DeliveryFuture> {
        let (engine, link) = self.device(device_id, name).await?;
        self.inner
            .pipeline
            .submit_batch(&engine, link, batch, true)
            .await
    }

    /// Connections, devices, deliveries in flight and what auto-create and idle closing did.
    pub async fn stats(&self) -> GatewayStats {
        let shards = self.inner.shards.lock().await;
        let c = &self.inner.counters;
        GatewayStats {
            connections: shards.engines.len(),
            devices: shards.load.iter().sum(),
            in_flight: self.inner.pipeline.in_flight(),
            devices_created: c.created.load(Ordering::Relaxed),
            names_written: c.names.load(Ordering::Relaxed),
            idle_closed: c.idle_closed.load(Ordering::Relaxed),
            devices_refused: c.refused.load(Ordering::Relaxed),
        }
    }

    /// What the gateway knows of `device_id`; `None` for a device it never sent as.
    pub async fn device_state(&self, device_id: &str) -> Option<DeviceState> {
        let shards = self.inner.shards.lock().await;
        let entry = shards.devices.get(device_id)?;
        Some(match (&entry.refused, entry.shard) {
            (Some((error, until)), _) if Instant::now() < *until => {
                DeviceState::Refused(error.clone())
            }
            (_, Some(connection)) => DeviceState::Active { connection },
            _ => DeviceState::Idle,
        })
    }

    /// Waits for every outcome, then closes every connection.
    ///
    /// # Errors
    /// The first close handshake that failed.
    pub async fn close(self) -> Result<()> {
        if let Ok(mut slot) = self.inner.sweeper.lock() {
            if let Some(task) = slot.take() {
                task.abort();
            }
        }
        let engines = std::mem::take(&mut self.inner.shards.lock().await.engines);
        let mut first = Ok(());
        for engine in engines {
            if let Err(e) = engine.close(None, || 0).await {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// The connection and link of `device_id`, set up on first use.
    async fn device(
        &self,
        device_id: &str,
        name: Option<&str>,
    ) -> Result<(Arc<Engine>, Arc<LinkHandle>)> {
        if let Err(problem) = crate::iothub::sas::check_id("device id", device_id) {
            return Err(Error::new(ErrorKind::InvalidArgument, problem));
        }
        let entity = entity::device_events(&self.inner.host_name, device_id);
        if let Some(found) = self.active(device_id, &entity).await? {
            return Ok(found);
        }
        let lock = {
            let mut setups = self.inner.setups.lock().unwrap_or_else(|e| e.into_inner());
            setups.entry(device_id.to_owned()).or_default().clone()
        };
        let result = {
            let _one = lock.lock().await;
            // Another send may have set it up meanwhile.
            match self.active(device_id, &entity).await? {
                Some(found) => Ok(found),
                None => self.set_up(device_id, name, &entity).await,
            }
        };
        if let Ok(mut setups) = self.inner.setups.lock() {
            if Arc::strong_count(&lock) <= 2 {
                setups.remove(device_id);
            }
        }
        result
    }

    /// The device's live link when it has one; its refusal while that holds.
    async fn active(
        &self,
        device_id: &str,
        entity: &Entity,
    ) -> Result<Option<(Arc<Engine>, Arc<LinkHandle>)>> {
        let engine = {
            let mut shards = self.inner.shards.lock().await;
            let Some(entry) = shards.devices.get_mut(device_id) else {
                return Ok(None);
            };
            entry.last_used = Instant::now();
            if let Some((error, until)) = &entry.refused {
                if Instant::now() < *until {
                    return Err(error.clone());
                }
                entry.refused = None;
            }
            match entry.shard {
                Some(i) => shards.engines[i].clone(),
                None => return Ok(None),
            }
        };
        // A live link is returned at once; a lost one is attached again here.
        Ok(engine
            .link_to(entity.clone(), None)
            .await
            .ok()
            .map(|link| (engine, link)))
    }

    /// Places the device, attaches its link, and creates its identity when asked to.
    async fn set_up(
        &self,
        device_id: &str,
        name: Option<&str>,
        entity: &Entity,
    ) -> Result<(Arc<Engine>, Arc<LinkHandle>)> {
        #[cfg(feature = "registry")]
        let mut created = false;
        #[cfg(feature = "registry")]
        if let Some(creator) = &self.inner.creator {
            if creator.when == AutoCreate::BeforeFirstUse && !self.ensured(device_id).await {
                if let Err(e) = self.create(creator, device_id, name).await {
                    return Err(self.refuse(device_id, e).await);
                }
                created = true;
            }
        }
        #[cfg(not(feature = "registry"))]
        let _ = name;
        let mut placements = 0;
        loop {
            placements += 1;
            let (i, engine) = self.place(device_id).await?;
            match engine.link_to(entity.clone(), None).await {
                Ok(link) => return Ok((engine, link)),
                Err(e) if is_token_cap(&e) && placements <= self.connections().await + 1 => {
                    tracing::info!(
                        connection = i,
                        "connection holds too many tokens; placing elsewhere"
                    );
                    self.unplace(device_id, Some(i)).await;
                }
                #[cfg(feature = "registry")]
                Err(e) if e.kind() == ErrorKind::NotFound && !created => {
                    self.unplace(device_id, None).await;
                    let Some(creator) = &self.inner.creator else {
                        return Err(self.refuse(device_id, e).await);
                    };
                    if let Err(e) = self.create(creator, device_id, name).await {
                        return Err(self.refuse(device_id, e).await);
                    }
                    created = true;
                }
                Err(e) => {
                    self.unplace(device_id, None).await;
                    return Err(if is_refusal(&e) {
                        self.refuse(device_id, e).await
                    } else {
                        e
                    });
                }
            }
        }
    }

    async fn connections(&self) -> usize {
        self.inner.shards.lock().await.engines.len()
    }

    /// Puts the device on a connection with room (opening one when none has), or where it is.
    async fn place(&self, device_id: &str) -> Result<(usize, Arc<Engine>)> {
        let mut shards = self.inner.shards.lock().await;
        if let Some(i) = shards.devices.get(device_id).and_then(|e| e.shard) {
            return Ok((i, shards.engines[i].clone()));
        }
        let now = Instant::now();
        let max = self.inner.max_devices;
        let n = shards.engines.len();
        let target = shard_of(device_id, n);
        let free = (0..n).map(|k| (target + k) % n.max(1)).find(|&i| {
            shards.load[i] < max && shards.full_until[i].is_none_or(|until| now >= until)
        });
        let i = match free {
            Some(i) => i,
            None => {
                let engine = Engine::connect(self.inner.config.clone(), None).await?;
                shards.engines.push(engine);
                shards.load.push(0);
                shards.full_until.push(None);
                shards.engines.len() - 1
            }
        };
        shards.load[i] += 1;
        shards
            .devices
            .entry(device_id.to_owned())
            .or_insert_with(DeviceEntry::new)
            .shard = Some(i);
        Ok((i, shards.engines[i].clone()))
    }

    /// Frees the device's slot; `full` marks that connection as holding too many tokens.
    async fn unplace(&self, device_id: &str, full: Option<usize>) {
        let mut shards = self.inner.shards.lock().await;
        if let Some(i) = shards
            .devices
            .get_mut(device_id)
            .and_then(|e| e.shard.take())
        {
            shards.load[i] = shards.load[i].saturating_sub(1);
        }
        if let Some(i) = full {
            shards.full_until[i] = Some(Instant::now() + self.inner.token_lifetime);
        }
    }

    /// Records the device's refusal and counts it; returns the error.
    async fn refuse(&self, device_id: &str, error: Error) -> Error {
        if is_refusal(&error) {
            self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            let mut shards = self.inner.shards.lock().await;
            let entry = shards
                .devices
                .entry(device_id.to_owned())
                .or_insert_with(DeviceEntry::new);
            entry.refused = Some((error.clone(), Instant::now() + self.inner.refused_for));
        }
        tracing::warn!(error = %error, "device refused");
        error
    }

    #[cfg(feature = "registry")]
    async fn ensured(&self, device_id: &str) -> bool {
        let shards = self.inner.shards.lock().await;
        shards.devices.get(device_id).is_some_and(|e| e.ensured)
    }

    /// Creates the identity (writing its name once when this created it), within the
    /// registry concurrency bound. Devices waiting together go out in one bulk call.
    #[cfg(feature = "registry")]
    async fn create(&self, creator: &Creator, device_id: &str, name: Option<&str>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&creator.queue).push((device_id.to_owned(), name.map(str::to_owned), tx));
        let permit = creator
            .permits
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "the gateway is closed"))?;
        // Other devices being set up at the same time may be new too: give them a moment to
        // join this call.
        // Gathering goes on while the queue keeps growing, for at most 10 rounds.
        let mut queued = 0;
        for _ in 0..10 {
            let now = lock(&creator.queue).len();
            let setting_up = self.inner.setups.lock().map_or(0, |s| s.len());
            if now <= queued || now >= super::registry::MAX_BULK_DEVICES || setting_up <= now {
                break;
            }
            queued = now;
            tokio::time::sleep(BULK_GATHER).await;
        }
        let batch: Vec<PendingCreate> = {
            let mut queue = lock(&creator.queue);
            let n = queue.len().min(super::registry::MAX_BULK_DEVICES);
            queue.drain(..n).collect()
        };
        run_creates(&creator.registry, batch).await;
        drop(permit);
        // Another caller's call may have carried this device; if that caller went away
        // mid-call, create it here.
        let outcome = match rx.await {
            Ok(outcome) => outcome?,
            Err(_) => creator.registry.ensure_device(device_id, name).await?,
        };
        if outcome == EnsureOutcome::Created {
            self.inner.counters.created.fetch_add(1, Ordering::Relaxed);
            if name.is_some() {
                self.inner.counters.names.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(named = name.is_some(), "device identity created");
        }
        let mut shards = self.inner.shards.lock().await;
        shards
            .devices
            .entry(device_id.to_owned())
            .or_insert_with(DeviceEntry::new)
            .ensured = true;
        Ok(())
    }
}

/// Creates `batch` (one device: create, then its name; more: one bulk call carrying the
/// names) and sends each device its outcome.
#[cfg(feature = "registry")]
async fn run_creates(registry: &Registry, batch: Vec<PendingCreate>) {
    match batch.len() {
        0 => {}
        1 => {
            for (id, name, tx) in batch {
                let _ = tx.send(registry.ensure_device(&id, name.as_deref()).await);
            }
        }
        n => {
            tracing::debug!(devices = n, "bulk registry create");
            let list: Vec<(&str, Option<&str>)> = batch
                .iter()
                .map(|(id, name, _)| (id.as_str(), name.as_deref()))
                .collect();
            let outcomes = registry.create_devices(&list).await;
            let mut outcomes = match outcomes {
                Ok(o) => o.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
                Err(e) => vec![Err(e); n],
            };
            outcomes.resize_with(n, || Ok(EnsureOutcome::Existed));
            for ((_, _, tx), outcome) in batch.into_iter().zip(outcomes) {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// Locks a std mutex, taking it back from a panicked holder.
#[cfg(feature = "registry")]
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection (of `connections`) a device id hashes to: FNV-1a 64 of its bytes, then
/// jump consistent hashing (Lamping and Veach), so growing from n to n+1 connections moves
/// only the ids that now hash to the new one. Stable across runs and platforms.
fn shard_of(device_id: &str, connections: usize) -> usize {
    if connections <= 1 {
        return 0;
    }
    let mut key = device_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let (mut bucket, mut next) = (0_i64, 0_i64);
    while next < connections as i64 {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        let scale = (1_u64 << 31) as f64 / ((key >> 33) + 1) as f64;
        next = ((bucket + 1) as f64 * scale) as i64;
    }
    bucket as usize
}

/// Closes the links of devices idle for `idle`, until the gateway is gone.
async fn sweep(gateway: Weak<GatewayInner>, idle: Duration) {
    let period = (idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = gateway.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut released = Vec::new();
        {
            let mut shards = inner.shards.lock().await;
            let Shards {
                engines,
                load,
                devices,
                ..
            } = &mut *shards;
            for (id, entry) in devices.iter_mut() {
                let Some(i) = entry.shard else { continue };
                if now.duration_since(entry.last_used) >= idle {
                    entry.shard = None;
                    load[i] = load[i].saturating_sub(1);
                    released.push((engines[i].clone(), id.clone()));
                }
            }
        }
        for (engine, id) in released {
            let e = entity::device_events(&inner.host_name, &id);
            engine.release_link(&e.address, &e.audience).await;
            inner.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("idle device link closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shard_of;

    #[test]
    fn the_shard_hash_is_stable_and_moves_few_ids_when_connections_grow() {
        let ids: Vec<String> = (0..2000).map(|i| format!("sensor-{i}")).collect();
        for id in &ids {
            assert_eq!(shard_of(id, 1), 0);
            assert!(shard_of(id, 7) < 7);
            assert_eq!(shard_of(id, 7), shard_of(id, 7));
        }
        // Growing 4 -> 5 moves only ids to the new connection, about a fifth of them.
        let moved: Vec<&String> = ids
            .iter()
            .filter(|id| shard_of(id, 4) != shard_of(id, 5))
            .collect();
        assert!(moved.iter().all(|id| shard_of(id, 5) == 4));
        assert!((300..500).contains(&moved.len()), "{}", moved.len());
        // Spread evenly.
        let mut counts = [0; 5];
        for id in &ids {
            counts[shard_of(id, 5)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (330..470).contains(&c)),
            "{counts:?}"
        );
    }
}
