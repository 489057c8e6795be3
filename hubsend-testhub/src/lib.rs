//! A local, scriptable Event Hubs-compatible AMQP 1.0 server for tests and offline use.
//!
//! It speaks the service's wire protocol (SASL MSSBCBS/PLAIN/ANONYMOUS, `$cbs` put-token with
//! SAS verification (and HS256 `jwt` tokens from trusted issuers), producer links per hub and partition, batches, `$management` READ), stores
//! what it receives for inspection, and injects faults on request.

#![deny(missing_docs)]

mod delay;
mod faults;
mod fullframe;
mod hash;
mod http_server;
pub mod iothub_http;
mod jwt;
mod raw;
mod sas;
mod server;
mod store;
mod tls;
mod wire;
mod ws;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use delay::{DelayProxy, DelayProxyBuilder, DelayProxyPeaks};
pub use faults::Faults;
pub use jwt::{sign_hs256 as sign_jwt_hs256, EVENT_HUBS_AUDIENCE};
pub use server::idempotent::{GapAnswer, ResumeAnswer};
pub use server::rest::RestStats;
pub use store::StoredEvent;

/// A right a SAS policy grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Right {
    /// Send events.
    Send,
    /// Receive events.
    Listen,
    /// Manage entities (implies nothing else here; list Send/Listen explicitly).
    Manage,
    /// IoT Hub: send device-to-cloud messages as any device (a policy) or as itself (a
    /// device key).
    DeviceConnect,
    /// IoT Hub: the service side (twins, the built-in endpoint).
    ServiceConnect,
    /// IoT Hub: read the identity registry.
    RegistryRead,
    /// IoT Hub: write the identity registry.
    RegistryWrite,
}

#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub name: String,
    pub key: String,
    pub rights: Vec<Right>,
}

/// Configuration of a [`TestHub`]; builder style.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: bool,
    pub(crate) hubs: Vec<(String, u32)>,
    hubs_customised: bool,
    pub(crate) policies: Vec<Policy>,
    policies_customised: bool,
    pub(crate) max_message_size: u64,
    pub(crate) advertised_max_message_size: Option<u64>,
    pub(crate) link_credit: u32,
    pub(crate) jwt_issuers: Vec<jwt::TrustedIssuer>,
    pub(crate) retain_events: Option<usize>,
    /// IoT Hub mode: the hub's host name (`NAME.azure-devices.net`), when set.
    pub(crate) iothub: Option<String>,
    /// IoT Hub mode: policies, token cap and registry limits (devices are added when the
    /// hub starts, each hub getting a store of its own).
    pub(crate) iot: Option<iothub_http::IotHubState>,
    /// IoT Hub devices: id and base64 key.
    pub(crate) iot_devices: Vec<(String, String)>,
    /// IoT Hub mode: the built-in Event Hubs-compatible endpoint's event hub (one of `hubs`).
    pub(crate) iot_builtin: Option<String>,
    /// How an idempotent producer's resume is answered.
    pub(crate) idempotent_resume: ResumeAnswer,
    /// What a gap in an idempotent producer's numbers gets.
    pub(crate) idempotent_gaps: GapAnswer,
    /// Serve the Event Hubs REST send API as well ([`TestHub::rest_url`]).
    pub(crate) rest: bool,
    /// More namespace host names token audiences may name.
    pub(crate) namespace_aliases: Vec<String>,
    /// The WebSocket listener's port, when it is on (0 = any free port).
    pub(crate) websocket_port: Option<u16>,
    /// Whether the WebSocket upgrade echoes the chosen subprotocol.
    pub(crate) websocket_echo: bool,
    /// Refuse a keyed event on a partition link whose key hashes to another partition.
    pub(crate) verify_partition_keys: bool,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self::new()
    }
}

fn random_key() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl HubConfig {
    /// Defaults: 127.0.0.1, port 0, no TLS, hub `telemetry` with 4 partitions, policies
    /// `send-only` (Send) and `manage` (Manage, Send, Listen) with random keys, 1 MiB
    /// max-message-size, link credit 300, every event retained.
    pub fn new() -> Self {
        Self {
            host: "127.0.0.1".to_string(),
            port: 0,
            tls: false,
            hubs: vec![("telemetry".to_string(), 4)],
            hubs_customised: false,
            policies: vec![
                Policy {
                    name: "send-only".to_string(),
                    key: random_key(),
                    rights: vec![Right::Send],
                },
                Policy {
                    name: "manage".to_string(),
                    key: random_key(),
                    rights: vec![Right::Manage, Right::Send, Right::Listen],
                },
            ],
            policies_customised: false,
            max_message_size: 1_048_576,
            advertised_max_message_size: None,
            link_credit: 300,
            jwt_issuers: Vec::new(),
            retain_events: None,
            iothub: None,
            iot: None,
            iot_devices: Vec::new(),
            iot_builtin: None,
            idempotent_resume: ResumeAnswer::default(),
            idempotent_gaps: GapAnswer::default(),
            rest: false,
            namespace_aliases: Vec::new(),
            websocket_port: None,
            websocket_echo: true,
            verify_partition_keys: false,
        }
    }

    /// Interface to bind.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Port to bind (0 = any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Serve raw TLS (as Azure's 5671) with a generated CA and a server certificate for
    /// `localhost` and 127.0.0.1.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Also serve AMQP over WebSockets, as the service does on port 443, on a second port
    /// ([`TestHub::ws_addr`]; any free port unless [`websocket_port`](Self::websocket_port)
    /// says), in front of the same server: same hubs, store, policies, CBS, IoT Hub mode and
    /// [`Faults`]. TLS (`wss`) when [`tls`](Self::tls) is on, plain `ws` otherwise. The
    /// upgrade path is `/$servicebus/websocket` (with or without a trailing slash), or
    /// `/$iothub/websocket` in IoT Hub mode; other paths get 404. `Sec-WebSocket-Protocol`
    /// must offer `AMQPWSB10` or `amqp` (else 400), and the first of them offered is echoed.
    /// Binary messages only (a text message closes the WebSocket with 1003); message
    /// boundaries mean nothing; pings are answered.
    pub fn websocket(mut self, on: bool) -> Self {
        self.websocket_port = on.then(|| self.websocket_port.unwrap_or(0));
        self
    }

    /// Port of the WebSocket listener (0 = any free port); turns it on.
    pub fn websocket_port(mut self, port: u16) -> Self {
        self.websocket_port = Some(port);
        self
    }

    /// A misbehaving hub: with `false` the WebSocket upgrade's 101 answer leaves out
    /// `Sec-WebSocket-Protocol` instead of echoing the client's choice (RFC 6455 requires a
    /// client to fail such a handshake). Default `true`.
    pub fn websocket_echo_subprotocol(mut self, echo: bool) -> Self {
        self.websocket_echo = echo;
        self
    }

    /// Adds a hub; the first call replaces the default hub.
    pub fn hub(mut self, name: impl Into<String>, partitions: u32) -> Self {
        if !self.hubs_customised {
            self.hubs.clear();
            self.hubs_customised = true;
        }
        self.hubs.push((name.into(), partitions.max(1)));
        self
    }

    /// Speaks IoT Hub instead of Event Hubs, as hub `host_name` (e.g.
    /// `plant.azure-devices.net`): device-to-cloud links at `/devices/{id}/messages/events` (also
    /// `amqps://host/devices/...`), put-token answered with **200**, SAS verified the IoT Hub
    /// way (HMAC with the base64-*decoded* key; a device key covers its own device, a policy
    /// key with [`Right::DeviceConnect`] covers every device), at most 999 live tokens per
    /// connection ([`iot_token_cap`](Self::iot_token_cap)), 256 KB messages, unknown and
    /// disabled devices refused with `amqp:not-found`. Device ids are case-sensitive.
    ///
    /// The hub has IoT Hub's default policies (`iothubowner` with every right, `service`,
    /// `device`, `registryRead`, `registryReadWrite`) with random keys; [`policy`](Self::policy)
    /// adds one or replaces the one of its name, [`policy_key`](Self::policy_key) sets a key.
    /// Devices live in one store, [`TestHub::iothub_state`], shared with the registry and twin
    /// REST server ([`iothub_http::IotHubRest`]) when one is started on it: a device created
    /// over REST can send at once, a disabled or deleted one is refused (one deleted or disabled
    /// while its D2C links are live has them detached with `amqp:not-found`, counted in
    /// [`HubStats::device_links_detached`]). Register devices up
    /// front with [`iot_device`](Self::iot_device); read what each sent with
    /// [`TestHub::iothub_messages`]. See the `server::iothub` module docs for the choices
    /// made where the service's behaviour is inferred.
    ///
    /// Every accepted D2C message is also put on the hub's **built-in Event Hubs-compatible
    /// endpoint**: an event hub named after the IoT hub (the first label of `host_name`, e.g.
    /// `plant`; [`iot_builtin_partitions`](Self::iot_builtin_partitions), 4 by default),
    /// partitioned by device id, that any Event Hubs consumer reads with a policy holding
    /// ServiceConnect ([`TestHub::iothub_builtin_connection_string`]; Event Hubs SAS, signed
    /// with the key text as Event Hubs does). Each event is the message as the device sent it
    /// with IoT Hub's system properties added as message annotations, which a device cannot
    /// spoof: `iothub-connection-device-id`, `iothub-connection-auth-method`
    /// (`{"scope":"device"|"hub","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}`:
    /// `device` for a device-key token, `hub` for a policy token),
    /// `iothub-connection-auth-generation-id` (the identity's generation id),
    /// `iothub-enqueuedtime` (timestamp) and `iothub-message-source` (`Telemetry`), next to
    /// the usual `x-opt-sequence-number`, `x-opt-offset` and `x-opt-enqueued-time`.
    pub fn iothub(mut self, host_name: impl Into<String>) -> Self {
        let host = host_name.into().to_ascii_lowercase();
        let mut state = iothub_http::IotHubState::new(host.clone());
        if self.policies_customised {
            for p in &self.policies {
                state =
                    state.with_policy(server::iot_policy(p.name.clone(), p.key.clone(), &p.rights));
            }
        }
        let builtin = server::iot_builtin_name(&host);
        self.iothub = Some(host);
        self.iot = Some(state);
        self.max_message_size = 256 * 1024;
        if !self.hubs_customised {
            self.hubs.clear();
            self.hubs_customised = true;
        }
        self.hubs.push((builtin.clone(), 4));
        self.iot_builtin = Some(builtin);
        self
    }

    /// IoT Hub mode: the partition count of the built-in Event Hubs-compatible endpoint
    /// (default 4, as a new IoT hub has). Call after [`iothub`](Self::iothub).
    pub fn iot_builtin_partitions(mut self, partitions: u32) -> Self {
        if let Some(name) = &self.iot_builtin {
            for hub in self.hubs.iter_mut().filter(|h| &h.0 == name) {
                hub.1 = partitions.max(1);
            }
        }
        self
    }

    /// Registers an IoT Hub device with its base64 symmetric key (IoT Hub mode), enabled.
    pub fn iot_device(mut self, id: impl Into<String>, key_base64: impl Into<String>) -> Self {
        self.iot_devices.push((id.into(), key_base64.into()));
        self
    }

    /// IoT Hub mode: how many live CBS tokens one connection may hold before put-token
    /// answers 403005 `IotHubMaxCbsTokenExceeded` (default 999; lower it to test sharding).
    pub fn iot_token_cap(mut self, cap: usize) -> Self {
        self.iot = self.iot.map(|s| s.with_token_cap(cap));
        self
    }

    /// IoT Hub mode: the registry REST side answers 429 (with `Retry-After`) once more than
    /// `limit` requests arrive within `window` (IoT Hub: 100 a minute per S1 unit).
    pub fn iot_registry_rate_limit(mut self, limit: u32, window: Duration) -> Self {
        self.iot = self
            .iot
            .map(|s| s.with_rate_limit(Some(limit)).with_rate_window(window));
        self
    }

    /// IoT Hub mode: the registry REST side waits `delay` before it answers each request, as a
    /// distant or busy hub does (tests use it to let a client's queue of registry work build up).
    pub fn iot_registry_delay(mut self, delay: Duration) -> Self {
        self.iot = self.iot.map(|s| s.with_response_delay(delay));
        self
    }

    /// Adds a SAS policy; the first call replaces the default policies. In IoT Hub mode
    /// (after [`iothub`](Self::iothub)) it adds an IoT Hub policy with the IoT Hub rights among
    /// `rights`, replacing only the policy of the same name.
    pub fn policy(
        mut self,
        name: impl Into<String>,
        key: impl Into<String>,
        rights: &[Right],
    ) -> Self {
        if let Some(state) = self.iot.take() {
            let policy = server::iot_policy(name.into(), key.into(), rights);
            self.iot = Some(state.with_policy(policy));
            return self;
        }
        if !self.policies_customised {
            self.policies.clear();
            self.policies_customised = true;
        }
        self.policies.push(Policy {
            name: name.into(),
            key: key.into(),
            rights: rights.to_vec(),
        });
        self
    }

    /// Sets the key of the policy `name` (a default one or one added before); a name not
    /// configured yet is added with every right (Manage, Send, Listen). Keeps the defaults.
    pub fn policy_key(mut self, name: impl Into<String>, key: impl Into<String>) -> Self {
        let (name, key) = (name.into(), key.into());
        if let Some(state) = self.iot.take() {
            let state = match state.policy(&name) {
                Some(_) => state.with_policy_key(&name, key),
                None => state.with_policy(server::iot_policy(
                    name,
                    key,
                    &[
                        Right::DeviceConnect,
                        Right::ServiceConnect,
                        Right::RegistryRead,
                        Right::RegistryWrite,
                    ],
                )),
            };
            self.iot = Some(state);
            return self;
        }
        match self.policies.iter_mut().find(|p| p.name == name) {
            Some(p) => p.key = key,
            None => self.policies.push(Policy {
                name,
                key,
                rights: vec![Right::Manage, Right::Send, Right::Listen],
            }),
        }
        self
    }

    /// Largest accepted delivery in bytes (advertised on producer links).
    pub fn max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Advertise a different max-message-size than the one enforced (a misbehaving hub, for
    /// testing the server-side rejection with clients that check sizes locally, or, with
    /// `u64::MAX`, clients that size buffers by the link limit). The producer ATTACH reply
    /// carries exactly this value, whatever the client asked for. To announce and also accept
    /// any size, use [`max_message_size`](Self::max_message_size)`(u64::MAX)` instead: that
    /// value is announced to clients that attach without a limit of their own.
    pub fn advertise_max_message_size(mut self, bytes: u64) -> Self {
        self.advertised_max_message_size = Some(bytes);
        self
    }

    /// Credit granted to producer links.
    pub fn link_credit(mut self, credit: u32) -> Self {
        self.link_credit = credit.max(1);
        self
    }

    /// Also serve the Event Hubs HTTPS REST send API (`POST /{hub}/messages`,
    /// `/{hub}/partitions/{id}/messages`) on a port of its own, storing into the same
    /// partitions: over TLS with the same CA when [`tls`](Self::tls) is on, plain HTTP
    /// otherwise. See [`TestHub::rest_url`], [`TestHub::rest_stats`] and
    /// [`Faults::rest_fail_next`].
    pub fn rest(mut self, on: bool) -> Self {
        self.rest = on;
        self
    }

    /// Also answers as namespace `host` (e.g. `contoso.servicebus.windows.net`): token
    /// audiences and AMQP `hostname`s may name it, as they do when a client dials the hub
    /// through a custom endpoint address while its tokens keep the namespace's name.
    pub fn namespace_alias(mut self, host: impl Into<String>) -> Self {
        self.namespace_aliases
            .push(host.into().to_ascii_lowercase());
        self
    }

    /// Keep at most `events` events per partition (`None`, the default, keeps all), dropping
    /// the oldest, like the service's retention: sequence numbers and offsets keep counting,
    /// and consumers and `$management` see only what is retained. Bounds the hub's memory in
    /// long runs.
    pub fn retain_events(mut self, events: Option<usize>) -> Self {
        self.retain_events = events;
        self
    }

    /// What an idempotent producer that re-attaches with known state is told its last
    /// sequence number is (undocumented by the service; [`ResumeAnswer::Stored`] by default).
    pub fn idempotent_resume(mut self, answer: ResumeAnswer) -> Self {
        self.idempotent_resume = answer;
        self
    }

    /// What an idempotent delivery whose numbers skip ahead gets (undocumented by the
    /// service; [`GapAnswer::Refuse`] by default).
    pub fn idempotent_gaps(mut self, answer: GapAnswer) -> Self {
        self.idempotent_gaps = answer;
        self
    }

    /// A test check the service does not make: an event sent to a partition link with an
    /// `x-opt-partition-key` that hashes to another partition (by this hub's own hash, as
    /// [`TestHub::partition_for_key`]) gets its delivery rejected with
    /// `amqp:precondition-failed`.
    ///
    /// Off by default, as the service: it stores such an event on the link's partition with
    /// its key (inferred: Microsoft's buffered producers resolve keys on the client and stamp
    /// each event with its key, and their docs warn that a key may land on another partition
    /// than other producers would give it, so the service neither moves nor refuses them).
    /// Every stored event keeps its key either way ([`StoredEvent::partition_key`]).
    pub fn verify_partition_keys(mut self, on: bool) -> Self {
        self.verify_partition_keys = on;
        self
    }
}

/// Counters of what the hub has seen.
#[derive(Clone, Debug, Default)]
pub struct HubStats {
    /// Connections that completed the AMQP open.
    pub connections_accepted: u64,
    /// WebSocket upgrades accepted on the WebSocket listener ([`HubConfig::websocket`]).
    pub websockets_accepted: u64,
    /// Pongs received on WebSockets (answers to [`Faults::ping_websockets`]).
    pub websocket_pongs_received: u64,
    /// put-token requests answered 202.
    pub put_tokens_accepted: u64,
    /// Of those, `jwt` (Entra ID) tokens.
    pub jwt_put_tokens_accepted: u64,
    /// put-token requests answered with an error status.
    pub put_tokens_rejected: u64,
    /// Deliveries received on producer links.
    pub transfers_received: u64,
    /// Deliveries disposed Accepted.
    pub deliveries_accepted: u64,
    /// Deliveries disposed Rejected.
    pub deliveries_rejected: u64,
    /// Links attached (all kinds).
    pub links_attached: u64,
    /// Of those, producer links (a client sending events).
    pub producer_links_attached: u64,
    /// Link attaches refused.
    pub links_refused: u64,
    /// `$management` requests answered.
    pub management_requests: u64,
    /// Events from idempotent producers acknowledged as duplicates and not stored.
    pub idempotent_duplicates: u64,
    /// IoT Hub mode: live D2C links detached because their device was deleted or disabled.
    pub device_links_detached: u64,
}

/// Errors starting a [`TestHub`].
#[derive(Debug, thiserror::Error)]
pub enum TestHubError {
    /// Binding or socket setup failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Certificate generation or TLS setup failed.
    #[error("tls setup failed: {0}")]
    Tls(String),
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A running hub. Shuts the server down when dropped.
#[derive(Debug)]
pub struct TestHub {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    ca_pem: Option<String>,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    rest: Option<server::rest::RestServer>,
    /// The WebSocket listener's address and accept task, when it is on.
    ws: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl TestHub {
    /// Binds and starts serving.
    ///
    /// # Errors
    /// Fails when binding fails, the configuration has no hub, or TLS setup fails.
    pub async fn start(config: HubConfig) -> Result<TestHub, TestHubError> {
        if config.hubs.is_empty() && config.iot.is_none() {
            return Err(TestHubError::Config("no hub configured".to_string()));
        }
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port)).await?;
        let addr = listener.local_addr()?;
        let (tls_acceptor, ca_pem) = if config.tls {
            let (acc, pem) = tls::make_acceptor(&config.host).map_err(TestHubError::Tls)?;
            (Some(acc), Some(pem))
        } else {
            (None, None)
        };
        let rest_addr = (config.host.clone(), 0);
        let ws_listener = match config.websocket_port {
            Some(port) => Some(tokio::net::TcpListener::bind((config.host.as_str(), port)).await?),
            None => None,
        };
        let shared = Arc::new(server::Shared::new(config));
        let rest = if shared.config.rest {
            let acceptor = tls_acceptor.clone();
            Some(server::rest::RestServer::start(shared.clone(), rest_addr, acceptor).await?)
        } else {
            None
        };
        let ws = match ws_listener {
            Some(listener) => {
                let ws_addr = listener.local_addr()?;
                let task = tokio::spawn(server::accept_loop(
                    listener,
                    shared.clone(),
                    tls_acceptor.clone(),
                    ws::Framing::WebSocket,
                ));
                Some((ws_addr, task))
            }
            None => None,
        };
        let accept_task = tokio::spawn(server::accept_loop(
            listener,
            shared.clone(),
            tls_acceptor,
            ws::Framing::Raw,
        ));
        Ok(TestHub {
            addr,
            shared,
            ca_pem,
            accept_task: Some(accept_task),
            rest,
            ws,
        })
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The WebSocket listener's address ([`HubConfig::websocket`]), if it is on.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws.as_ref().map(|(addr, _)| *addr)
    }

    /// The WebSocket listener's port, if it is on.
    pub fn ws_port(&self) -> Option<u16> {
        self.ws_addr().map(|addr| addr.port())
    }

    /// The URL a client upgrades at: `wss://localhost:PORT/$servicebus/websocket/` (`ws://`
    /// and the bound IP without TLS; `/$iothub/websocket` in IoT Hub mode), if the WebSocket
    /// listener is on.
    pub fn ws_url(&self) -> Option<String> {
        let addr = self.ws_addr()?;
        let (scheme, host) = if self.shared.config.tls {
            ("wss", "localhost".to_string())
        } else {
            ("ws", addr.ip().to_string())
        };
        let path = if self.shared.config.iothub.is_some() {
            ws::IOT_HUB_PATH.to_string()
        } else {
            format!("{}/", ws::EVENT_HUBS_PATH)
        };
        Some(format!("{scheme}://{host}:{}{path}", addr.port()))
    }

    /// Connection string for the first hub and the first policy with the Send right.
    pub fn connection_string(&self) -> String {
        self.connection_string_with(Right::Send)
    }

    /// Connection string for the first hub and the first policy with the Listen right (by
    /// default `manage`), for reading events back.
    pub fn listen_connection_string(&self) -> String {
        self.connection_string_with(Right::Listen)
    }

    /// Connection string for the first hub and the first policy granting `right` (else the
    /// first policy).
    fn connection_string_with(&self, right: Right) -> String {
        let cfg = &self.shared.config;
        let policy = cfg
            .policies
            .iter()
            .find(|p| p.rights.contains(&right))
            .or_else(|| cfg.policies.first())
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let hub = cfg.hubs.first().map(|h| h.0.clone()).unwrap_or_default();
        self.connection_string_for(&policy, &hub)
    }

    /// Connection string for `policy` and `hub` (names are not checked).
    pub fn connection_string_for(&self, policy: &str, hub: &str) -> String {
        let cfg = &self.shared.config;
        let key = cfg
            .policies
            .iter()
            .find(|p| p.name == policy)
            .map(|p| p.key.clone())
            .unwrap_or_default();
        self.event_hubs_connection_string(policy, &key, hub)
    }

    /// IoT Hub mode: the Event Hubs connection string of the built-in Event Hubs-compatible
    /// endpoint ([`HubConfig::iothub`]) for IoT Hub policy `policy` (it needs ServiceConnect
    /// to read, e.g. `service` or `iothubowner`); `None` outside IoT Hub mode.
    pub fn iothub_builtin_connection_string(&self, policy: &str) -> Option<String> {
        let hub = self.shared.config.iot_builtin.as_deref()?;
        let key = self.shared.iot.as_ref()?.policy(policy)?.key.clone();
        Some(self.event_hubs_connection_string(policy, &key, hub))
    }

    /// IoT Hub mode: what the built-in Event Hubs-compatible endpoint holds, as an Event Hubs
    /// consumer would read it, ordered by (partition, sequence number).
    pub fn iothub_builtin_events(&self) -> Vec<StoredEvent> {
        match self.shared.config.iot_builtin.as_deref() {
            Some(hub) => self.events(hub),
            None => Vec::new(),
        }
    }

    /// An Event Hubs connection string for this hub's address.
    fn event_hubs_connection_string(&self, policy: &str, key: &str, hub: &str) -> String {
        let cfg = &self.shared.config;
        let port = self.addr.port();
        if cfg.tls {
            format!(
                "Endpoint=sb://localhost:{port}/;SharedAccessKeyName={policy};SharedAccessKey={key};EntityPath={hub}"
            )
        } else {
            let ip = self.addr.ip();
            let host = if ip.is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                ip.to_string()
            };
            format!(
                "Endpoint=sb://{host}:{port}/;SharedAccessKeyName={policy};SharedAccessKey={key};EntityPath={hub};UseDevelopmentEmulator=true"
            )
        }
    }

    /// The REST endpoint's base URL (with [`HubConfig::rest`]): `https://localhost:PORT`
    /// with TLS (trust [`ca_pem`](Self::ca_pem)), `http://127.0.0.1:PORT` without.
    pub fn rest_url(&self) -> Option<String> {
        self.rest.as_ref().map(|r| r.url())
    }

    /// The REST endpoint's counters (zero without [`HubConfig::rest`]).
    pub fn rest_stats(&self) -> RestStats {
        self.rest.as_ref().map(|r| r.stats()).unwrap_or_default()
    }

    /// PEM of the CA that signed the server certificate (TLS only).
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// IoT Hub mode: what device `device_id` (exact case) sent, in order.
    pub fn iothub_messages(&self, device_id: &str) -> Vec<StoredEvent> {
        self.events(&server::iot_store_name(device_id))
    }

    /// IoT Hub mode: waits until device `device_id` has at least `count` messages stored or
    /// `timeout` passes; returns what is stored then.
    pub async fn wait_for_iothub_messages(
        &self,
        device_id: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<StoredEvent> {
        self.wait_for_events(&server::iot_store_name(device_id), count, timeout)
            .await
    }

    /// IoT Hub mode: the one device store (devices, keys, status, twins, policies), shared
    /// with the AMQP side; start an [`iothub_http::IotHubRest`] on it for the registry and
    /// twin REST API.
    pub fn iothub_state(&self) -> Option<iothub_http::IotHubState> {
        self.shared.iot.clone()
    }

    /// IoT Hub mode: a policy's connection string (`HostName` is the IoT hub's name,
    /// `GatewayHostName` this hub's address; connect with plaintext or this hub's CA).
    pub fn iothub_connection_string(&self, policy: &str) -> String {
        let key = self
            .shared
            .iot
            .as_ref()
            .and_then(|s| s.policy(policy).map(|p| p.key.clone()))
            .unwrap_or_default();
        format!(
            "HostName={};GatewayHostName={};SharedAccessKeyName={policy};SharedAccessKey={key}",
            self.shared.config.iothub.clone().unwrap_or_default(),
            self.addr().ip()
        )
    }

    /// IoT Hub mode: a device's connection string with its own (primary) key.
    pub fn iothub_device_connection_string(&self, device_id: &str) -> String {
        let key = self
            .shared
            .iot
            .as_ref()
            .and_then(|s| s.device_key(device_id))
            .unwrap_or_default();
        format!(
            "HostName={};GatewayHostName={};DeviceId={device_id};SharedAccessKey={key}",
            self.shared.config.iothub.clone().unwrap_or_default(),
            self.addr().ip()
        )
    }

    /// All stored events of `hub`, ordered by (partition, sequence number). In IoT Hub mode,
    /// `devices/{id}` holds what device `id` sent (see [`iothub_messages`](Self::iothub_messages)).
    pub fn events(&self, hub: &str) -> Vec<StoredEvent> {
        self.shared.events(hub, None)
    }

    /// Stored events of one partition of `hub`.
    pub fn partition_events(&self, hub: &str, partition: u32) -> Vec<StoredEvent> {
        self.shared.events(hub, Some(partition))
    }

    /// Waits until at least `count` events of `hub` are stored or `timeout` passes; returns
    /// what is stored then.
    pub async fn wait_for_events(
        &self,
        hub: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<StoredEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.stored.notified();
            if self.shared.event_count(hub) >= count {
                return self.events(hub);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.events(hub);
            }
        }
    }

    /// Waits until the counters satisfy `until` or `timeout` passes; returns the counters
    /// then (check them: a timeout is not an error). Woken by every change of the counters,
    /// so a test waits for the event itself instead of polling: e.g.
    /// `hub.wait_for_stats(|s| s.deliveries_accepted >= 40, WAIT)` before injecting a fault.
    pub async fn wait_for_stats(
        &self,
        until: impl Fn(&HubStats) -> bool,
        timeout: Duration,
    ) -> HubStats {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.stats_changed.notified();
            let stats = self.stats();
            if until(&stats) || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return stats;
            }
        }
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> HubStats {
        let mut stats = self.shared.stats.lock().unwrap().clone();
        stats.idempotent_duplicates = self.shared.idempotent.lock().unwrap().duplicates;
        stats
    }

    /// Registers an idempotent producer on `hub`'s `partition` as if it had stored events up
    /// to sequence number `last` with `epoch` (to test restarts and wrap-around).
    pub fn seed_idempotent_producer(
        &self,
        hub: &str,
        partition: u32,
        id: i64,
        epoch: i16,
        last: i32,
    ) {
        let hub = self
            .shared
            .find_hub(hub)
            .map(|h| h.0)
            .unwrap_or_else(|| hub.to_owned());
        self.shared
            .idempotent
            .lock()
            .unwrap()
            .seed(&hub, partition, id, epoch, last);
    }

    /// Handle to fault injection.
    pub fn faults(&self) -> Faults {
        Faults {
            shared: self.shared.faults.clone(),
        }
    }

    /// The partition the service would route `key` to in `hub` (PROTOCOL J).
    pub fn partition_for_key(&self, hub: &str, key: &str) -> u32 {
        let count = self.shared.partition_count(hub).unwrap_or(1);
        hash::partition_for_key(key, count)
    }

    /// Stops accepting and drops every connection.
    pub async fn shutdown(mut self) {
        self.stop();
        tokio::task::yield_now().await;
    }

    fn stop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        self.rest = None;
        if let Some((_, task)) = &self.ws {
            task.abort();
        }
        self.faults().drop_connections();
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds a SAS token for `resource` (signed over the upper-case percent-encoded resource).
pub fn sign_sas_token(
    resource: &str,
    key_name: &str,
    key: &str,
    expires_at_unix_secs: u64,
) -> String {
    sas::sign(resource, key_name, key, expires_at_unix_secs)
}
