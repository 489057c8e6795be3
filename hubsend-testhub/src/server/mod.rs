//! The server: the state every task shares (configuration, event store, counters, faults) and
//! the helpers they use; each responsibility lives in a submodule.

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_types::{
    definitions::{self, ErrorCondition, Fields},
    primitives::{OrderedMap, Symbol, Value},
};
use tokio::sync::Notify;

use crate::{
    faults::FaultShared,
    hash, sas,
    store::{BufferPool, DeliveryMeta, EventRef, HubStore, StoredEvent},
    HubConfig, HubStats, Policy, Right,
};

mod cbs;
mod connection;
mod consumer;
pub(crate) mod idempotent;
mod iothub;
mod management;
mod producer;
mod request;
pub(crate) mod rest;
mod sasl;

pub(crate) use connection::accept_loop;
pub(crate) use iothub::{
    builtin_name as iot_builtin_name, policy_with as iot_policy, store_name as iot_store_name,
};

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// State shared by every task of one hub server.
pub(crate) struct Shared {
    pub config: HubConfig,
    pub hosts: Vec<String>,
    pub store: Mutex<HashMap<String, HubStore>>,
    pub stored: Notify,
    pub stats: Mutex<HubStats>,
    /// Woken after every change of `stats` (for [`TestHub::wait_for_stats`](crate::TestHub::wait_for_stats)).
    pub stats_changed: Notify,
    pub faults: Arc<FaultShared>,
    /// Payload buffers of deliveries dropped by retention, for the wire to reuse.
    pub pool: Arc<BufferPool>,
    /// Idempotent producers and what each has stored.
    pub idempotent: Mutex<idempotent::Registry>,
    /// IoT Hub mode: the one device store, shared with the REST registry.
    pub iot: Option<crate::iothub_http::IotHubState>,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("hubs", &self.config.hubs)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(config: HubConfig) -> Self {
        let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let h = config.host.to_ascii_lowercase();
        if !hosts.contains(&h) {
            hosts.push(h);
        }
        if let Some(iot) = &config.iothub {
            hosts.push(iot.clone());
        }
        let iot = config.iot.as_ref().map(|s| {
            let state = s.fresh();
            for (id, key) in &config.iot_devices {
                state.add_device(id.clone(), key.clone());
            }
            state
        });
        hosts.extend(config.namespace_aliases.iter().cloned());
        let created = now_ms();
        let store = config
            .hubs
            .iter()
            .map(|(name, n)| (name.to_ascii_lowercase(), HubStore::new(*n, created)))
            .collect();
        Self {
            config,
            hosts,
            store: Mutex::new(store),
            stored: Notify::new(),
            stats: Mutex::new(HubStats::default()),
            stats_changed: Notify::new(),
            faults: Arc::new(FaultShared::new()),
            pool: Arc::new(BufferPool::default()),
            idempotent: Mutex::new(idempotent::Registry::default()),
            iot,
            next_conn: AtomicU64::new(1),
        }
    }

    /// What this hub's WebSocket listener requires of an upgrade.
    pub(crate) fn ws_upgrade(&self) -> crate::ws::Upgrade {
        crate::ws::Upgrade {
            iothub: self.config.iothub.is_some(),
            echo: self.config.websocket_echo,
        }
    }

    /// Canonical name and partition count of a hub, matched case-insensitively.
    pub(crate) fn find_hub(&self, name: &str) -> Option<(String, u32)> {
        self.config
            .hubs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .cloned()
    }

    pub(crate) fn partition_count(&self, hub: &str) -> Option<u32> {
        self.find_hub(hub).map(|h| h.1)
    }

    /// Runs `f` on the store of `hub` (matched case-insensitively), if it exists.
    pub(crate) fn with_hub<T>(&self, hub: &str, f: impl FnOnce(&HubStore) -> T) -> Option<T> {
        let store = self.store.lock().unwrap();
        store.get(&hub.to_ascii_lowercase()).map(f)
    }

    /// The retained events of `hub` (one partition or all), still encoded.
    pub(crate) fn event_refs(&self, hub: &str, partition: Option<u32>) -> Vec<EventRef> {
        self.with_hub(hub, |hs| {
            hs.partitions
                .iter()
                .enumerate()
                .filter(|(i, _)| partition.is_none_or(|p| p as usize == *i))
                .flat_map(|(_, log)| log.all())
                .collect()
        })
        .unwrap_or_default()
    }

    /// The retained events of `hub` (one partition or all), decoded. The store is not locked
    /// while decoding.
    pub(crate) fn events(&self, hub: &str, partition: Option<u32>) -> Vec<StoredEvent> {
        self.event_refs(hub, partition)
            .iter()
            .map(EventRef::to_stored)
            .collect()
    }

    /// Number of retained events of `hub`.
    pub(crate) fn event_count(&self, hub: &str) -> usize {
        self.with_hub(hub, HubStore::len).unwrap_or(0)
    }

    /// Changes the counters and wakes whoever waits on them.
    pub(crate) fn stat(&self, f: impl FnOnce(&mut HubStats)) {
        f(&mut self.stats.lock().unwrap());
        self.stats_changed.notify_waiters();
    }

    fn policy(&self, name: &str) -> Option<&Policy> {
        self.config.policies.iter().find(|p| p.name == name)
    }

    /// A policy's key; in IoT Hub mode an IoT Hub policy's (Event Hubs tokens for the
    /// built-in endpoint are signed with it).
    fn policy_key(&self, name: &str) -> Option<String> {
        if let Some(state) = &self.iot {
            return state.policy(name).map(|p| p.key.clone());
        }
        self.policy(name).map(|p| p.key.clone())
    }

    fn policy_rights(&self, name: &str) -> Vec<Right> {
        if let Some(state) = &self.iot {
            return state
                .policy(name)
                .map(iothub::rights_of)
                .unwrap_or_default();
        }
        self.policy(name)
            .map(|p| p.rights.clone())
            .unwrap_or_default()
    }

    /// The right a producer link needs: Send, or DeviceConnect in IoT Hub mode.
    pub(crate) fn send_right(&self) -> Right {
        if self.iot.is_some() {
            Right::DeviceConnect
        } else {
            Right::Send
        }
    }

    pub(super) fn verify_token(
        &self,
        token: &str,
        name: &str,
    ) -> Result<sas::VerifiedToken, sas::TokenError> {
        let now = (now_ms() / 1000) as u64;
        sas::verify(
            token,
            name,
            now,
            |n| self.policy_key(n),
            &self.hosts,
            |h| self.find_hub(h).is_some(),
        )
    }

    /// Stores the events of one delivery (`spans` into `payload`); returns the partition used.
    fn store_events(
        &self,
        hub: &str,
        partition: Option<u32>,
        payload: Vec<u8>,
        spans: Box<[(u32, u32)]>,
        meta: DeliveryMeta,
    ) -> u32 {
        self.store_shared(hub, partition, Arc::new(payload), spans, meta)
    }

    /// IoT Hub: stores one accepted D2C delivery in its device's store and on the built-in
    /// endpoint (the same bytes), on the partition the device id hashes to.
    fn store_d2c(
        &self,
        device_store: &str,
        payload: Vec<u8>,
        spans: Box<[(u32, u32)]>,
        meta: DeliveryMeta,
    ) {
        let payload = Arc::new(payload);
        let builtin = self.config.iot_builtin.as_deref();
        let target = builtin.and_then(|b| self.find_hub(b));
        let device = meta.iot.as_ref().map(|o| o.device_id.clone());
        if let (Some((hub, count)), Some(device)) = (target, device) {
            let partition = hash::partition_for_key(&device, count);
            let spans = spans.clone();
            self.store_shared(&hub, Some(partition), payload.clone(), spans, meta.clone());
        }
        self.store_shared(device_store, None, payload, spans, meta);
    }

    /// [`store_events`](Self::store_events) of a payload that may be shared.
    fn store_shared(
        &self,
        hub: &str,
        partition: Option<u32>,
        payload: Arc<Vec<u8>>,
        spans: Box<[(u32, u32)]>,
        mut meta: DeliveryMeta,
    ) -> u32 {
        let mut store = self.store.lock().unwrap();
        let Some(hs) = store.get_mut(&hub.to_ascii_lowercase()) else {
            return 0;
        };
        let count = hs.partitions.len() as u32;
        let p = match (partition, &meta.route_key) {
            (Some(p), _) => p,
            (None, Some(k)) => hash::partition_for_key(k, count),
            (None, None) => {
                let p = hs.round_robin % count.max(1);
                hs.round_robin = hs.round_robin.wrapping_add(1);
                p
            }
        };
        if partition.is_some() {
            meta.route_key = None;
        }
        meta.enqueued_time_ms = now_ms();
        let retain = self.config.retain_events;
        hs.partitions[p as usize].append(payload, spans, meta, retain, &self.pool);
        drop(store);
        self.stored.notify_waiters();
        p
    }
}

fn amqp_error(condition: &str, description: impl Into<String>) -> definitions::Error {
    let mut info: Fields = OrderedMap::new();
    info.insert(
        Symbol::from("com.microsoft:tracking-id"),
        Value::String(format!("{:032x}", rand::random::<u128>())),
    );
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(condition)),
        Some(description.into()),
        Some(info),
    )
}

fn link_properties() -> Fields {
    let mut f: Fields = OrderedMap::new();
    f.insert(
        Symbol::from("com.microsoft:tracking-id"),
        Value::String(format!("{:032x}", rand::random::<u128>())),
    );
    f
}

/// A link the hub ends itself, by closing it.
trait EndLink {
    /// Detaches (closed) with `error`, or plainly.
    async fn close_with(self, error: Option<definitions::Error>) -> Result<(), String>;
}

/// Both link ends close the same way.
macro_rules! end_link_by_closing {
    ($($link:ty),*) => {$(
        impl EndLink for $link {
            async fn close_with(self, error: Option<definitions::Error>) -> Result<(), String> {
                match error {
                    Some(e) => self.close_with_error(e).await,
                    None => self.close().await,
                }
                .map_err(|e| format!("{e:?}"))
            }
        }
    )*};
}

end_link_by_closing!(Sender, Receiver);

/// Closes a `kind` link the hub ends: with `error` (the peer gets 5 s to answer) or plainly
/// (2 s).
async fn end_link(link: impl EndLink, kind: &str, name: &str, error: Option<definitions::Error>) {
    let wait = Duration::from_secs(if error.is_some() { 5 } else { 2 });
    if let Some(err) = &error {
        tracing::info!(link = %name, condition = ?err.condition, "detaching {kind} link");
    }
    if let Ok(Err(e)) = tokio::time::timeout(wait, link.close_with(error)).await {
        tracing::debug!(error = %e, "{kind} link close");
    }
}
