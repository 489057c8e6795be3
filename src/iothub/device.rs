//! Device-to-cloud messages over AMQP: a [`DeviceSender`] for one device, and a [`Gateway`]
//! that sends as any number of devices over shared connections.
//!
//! Both run on the same engine as the Event Hubs [`Producer`](crate::Producer): one
//! persistent connection, `$cbs` put-token per audience refreshed before expiry, one sender
//! link per device (`/devices/{id}/messages/events`), many deliveries in flight bounded by
//! deliveries and bytes, queued single sends packed into batch messages (format 0x80013700,
//! which IoT Hub takes), recovery of lost links and connections with in-order resend, and the
//! two-stage outcome: `send` returns once the message is queued, the [`DeliveryFuture`]
//! resolves with the hub's outcome.
//!
//! A D2C message is an [`Event`]: its body, `message-id`, `correlation-id`, `content-type`,
//! `content-encoding` and application properties map onto the AMQP message as IoT Hub reads
//! it; [`with_creation_time`] sets `iothub-creation-time-utc`. Messages and batches are at most
//! 256 KB ([`MAX_MESSAGE_SIZE`]).
//!
//! The [`Gateway`] itself (placement, auto-create, idle links, refusals) is in
//! [`gateway`](super::gateway).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

#[cfg(feature = "registry")]
use super::gateway::AutoCreate;
use super::gateway::{Gateway, GatewaySettings};
#[cfg(feature = "registry")]
use super::registry::Registry;
use crate::amqp::{ConnectConfig, Engine, LinkHandle};
use crate::batch::{EventBatch, Route, Sections};
use crate::entity::iothub as entity;
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::iothub::{IotHubConnectionString, IotHubCredentialKind};
use crate::producer::{new_batch, DeliveryFuture, Pipeline, ProducerOptions};

/// IoT Hub's largest device-to-cloud message (and batch).
pub const MAX_MESSAGE_SIZE: u64 = entity::MAX_MESSAGE_SIZE;

/// How many devices a gateway puts on one connection before it opens another: below IoT
/// Hub's cap of about 999 CBS tokens per connection, with room for refresh overlap.
pub const DEFAULT_MAX_DEVICES_PER_CONNECTION: usize = 900;

/// How long a gateway keeps an idle device's link open by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a gateway answers a refused device with its refusal, without asking the hub
/// again, by default.
pub const DEFAULT_REFUSED_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How many registry calls a gateway makes at once by default.
pub const DEFAULT_REGISTRY_CONCURRENCY: usize = 4;

/// Sets `iothub-creation-time-utc` (when the device made the reading), as IoT Hub expects it:
/// ISO 8601 UTC.
pub fn with_creation_time(event: Event, at: DateTime<Utc>) -> Event {
    event.with_property(
        "iothub-creation-time-utc",
        at.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

/// Configures and connects a [`DeviceSender`] or a [`Gateway`].
#[must_use]
pub struct IotHubBuilder {
    connection_string: Option<String>,
    options: ProducerOptions,
    extra_roots_pem: Vec<Vec<u8>>,
    port: Option<u16>,
    plaintext: bool,
    endpoint: Option<String>,
    max_devices_per_connection: usize,
    idle_timeout: Option<Duration>,
    refused_retry_after: Duration,
    #[cfg(feature = "registry")]
    auto_create: Option<(Registry, AutoCreate)>,
    registry_concurrency: usize,
    network: crate::transport::NetworkOptions,
}

impl std::fmt::Debug for IotHubBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotHubBuilder")
            .field(
                "connection_string",
                &self.connection_string.as_ref().map(|_| "<redacted>"),
            )
            .field("options", &self.options)
            .field("port", &self.port)
            .field("plaintext", &self.plaintext)
            .field("endpoint", &self.endpoint)
            .field(
                "max_devices_per_connection",
                &self.max_devices_per_connection,
            )
            .field("idle_timeout", &self.idle_timeout)
            .field("refused_retry_after", &self.refused_retry_after)
            .field("registry_concurrency", &self.registry_concurrency)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

impl Default for IotHubBuilder {
    fn default() -> Self {
        IotHubBuilder {
            connection_string: None,
            options: ProducerOptions::default().max_message_size(MAX_MESSAGE_SIZE),
            extra_roots_pem: Vec::new(),
            port: None,
            plaintext: false,
            endpoint: None,
            max_devices_per_connection: DEFAULT_MAX_DEVICES_PER_CONNECTION,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            refused_retry_after: DEFAULT_REFUSED_RETRY_AFTER,
            #[cfg(feature = "registry")]
            auto_create: None,
            registry_concurrency: DEFAULT_REGISTRY_CONCURRENCY,
            network: Default::default(),
        }
    }
}

impl IotHubBuilder {
    /// An IoT Hub connection string: a device's (for a [`DeviceSender`]) or a policy's with
    /// DeviceConnect (for a [`Gateway`]).
    pub fn connection_string(mut self, connection_string: impl Into<String>) -> Self {
        self.connection_string = Some(connection_string.into());
        self
    }

    /// In-flight bounds, token lifetime, time-outs and retries (as for Event Hubs). The
    /// message size cap is held to 256 KB whatever is set here.
    pub fn options(mut self, options: ProducerOptions) -> Self {
        self.options = options;
        self
    }

    /// The AMQP port (default 5671 with TLS).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Trusts one more root CA (PEM), for a private hub or a test hub.
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_roots_pem.push(pem.into());
        self
    }

    /// Plain AMQP without TLS: tokens cross the network readable. Only for a local test hub.
    pub fn danger_plaintext(mut self, plaintext: bool) -> Self {
        self.plaintext = plaintext;
        self
    }

    /// Dials this address instead of the hub (a private endpoint, a gateway, a local test
    /// hub): `amqps://host[:5671]`, `wss://host[:443][/path]` (default path
    /// `/$iothub/websocket`), or `amqp://`/`ws://` to a loopback host only (unless
    /// [`danger_plaintext`](Self::danger_plaintext)). Token audiences and the AMQP `hostname`
    /// keep the connection string's `HostName`. The scheme overrides
    /// [`port`](Self::port), [`websockets`](Self::websockets) and plaintext; checked when
    /// connecting ([`ErrorKind::InvalidConfig`] for `https://` or a URL that does not parse).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// Carries AMQP in WebSocket binary messages on `wss://{hub}:443/$iothub/websocket`
    /// (port 443 unless [`port`](Self::port) says otherwise), as
    /// [`ProducerBuilder::websockets`](crate::ProducerBuilder::websockets).
    pub fn websockets(mut self, on: bool) -> Self {
        self.network.websockets = on;
        self
    }

    /// The WebSocket subprotocol: `AMQPWSB10` (default, Microsoft's SDKs) or `amqp`, as
    /// [`ProducerBuilder::websocket_subprotocol`](crate::ProducerBuilder::websocket_subprotocol).
    pub fn websocket_subprotocol(mut self, subprotocol: impl Into<String>) -> Self {
        self.network.subprotocol = Some(subprotocol.into());
        self
    }

    /// Tunnels through this HTTP CONNECT proxy (`http://[user:pass@]host[:port]`), as
    /// [`ProducerBuilder::proxy`](crate::ProducerBuilder::proxy).
    pub fn proxy(mut self, url: impl Into<String>) -> Self {
        self.network.proxy = Some(url.into());
        self
    }

    /// Takes the proxy from `HTTPS_PROXY`/`NO_PROXY`, as
    /// [`ProducerBuilder::proxy_from_env`](crate::ProducerBuilder::proxy_from_env).
    pub fn proxy_from_env(mut self, on: bool) -> Self {
        self.network.proxy_from_env = on;
        self
    }

    /// How many devices a gateway puts on one connection (default
    /// [`DEFAULT_MAX_DEVICES_PER_CONNECTION`]; IoT Hub takes about 999 tokens per connection).
    pub fn max_devices_per_connection(mut self, devices: usize) -> Self {
        self.max_devices_per_connection = devices.max(1);
        self
    }

    /// A gateway closes a device's link after this long without a message (default
    /// [`DEFAULT_IDLE_TIMEOUT`]; `None` keeps links open); the next message attaches again.
    pub fn idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// How long a gateway answers a device the hub or registry refused with that refusal,
    /// without asking again (default [`DEFAULT_REFUSED_RETRY_AFTER`]).
    pub fn refused_retry_after(mut self, wait: Duration) -> Self {
        self.refused_retry_after = wait;
        self
    }

    /// A gateway creates the identities of devices the hub does not know through `registry`
    /// (Particle's flow: create, write the name once, then send), at the moment `when` says.
    /// The registry's policy needs RegistryWrite (and ServiceConnect for the name); it may be
    /// the gateway's own policy string.
    #[cfg(feature = "registry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
    pub fn auto_create(mut self, registry: Registry, when: AutoCreate) -> Self {
        self.auto_create = Some((registry, when));
        self
    }

    /// How many registry calls a gateway makes at once (default
    /// [`DEFAULT_REGISTRY_CONCURRENCY`]); the registry client also paces itself at its rate.
    pub fn registry_concurrency(mut self, calls: usize) -> Self {
        self.registry_concurrency = calls.max(1);
        self
    }

    fn parsed(&self) -> Result<IotHubConnectionString> {
        let cs = self.connection_string.as_deref().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                "no IoT Hub connection string given",
            )
        })?;
        IotHubConnectionString::parse(cs)
    }

    fn config(&self, cs: &IotHubConnectionString) -> Result<ConnectConfig> {
        let custom = match &self.endpoint {
            Some(url) => Some(crate::endpoint::CustomEndpoint::parse(url, self.plaintext)?),
            None => None,
        };
        let mut network = self.network.clone();
        let mut plaintext = self.plaintext;
        if let Some(c) = &custom {
            if c.transport == crate::Transport::Https {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    "IoT Hub device-to-cloud goes over AMQP: use an amqps:// or wss:// endpoint",
                ));
            }
            network.websockets = c.transport == crate::Transport::WebSockets;
            plaintext = !c.tls;
        }
        let tls = if plaintext {
            None
        } else {
            Some(crate::tls::client_config_with_pems(&self.extra_roots_pem)?)
        };
        let options = &self.options;
        let ws_path = match &custom {
            Some(c) if !c.path.is_empty() => c.path.clone(),
            _ => "/$iothub/websocket".to_owned(),
        };
        let dial = custom
            .as_ref()
            .map_or(cs.connect_host(), |c| c.host.as_str());
        let (route, framing) = network.resolve(dial, &ws_path)?;
        let default_port = if tls.is_some() { 5671 } else { 5672 };
        let default_port = network.default_port(tls.is_some()).unwrap_or(default_port);
        let port = match &custom {
            Some(c) => c.port,
            None => self.port.unwrap_or(default_port),
        };
        Ok(ConnectConfig {
            port,
            route,
            framing,
            host: cs.connect_host().to_owned(),
            dial_host: custom.map(|c| c.host),
            hub: cs.hub_name().to_owned(),
            tls,
            provider: cs.token_provider(options.token_lifetime),
            connect_timeout: options.connect_timeout,
            operation_timeout: options.operation_timeout,
            max_frame_size: 65536,
            retry: options.retry.clone(),
            max_message_size: options.max_message_size.min(MAX_MESSAGE_SIZE),
            single_window: options.single_window(MAX_MESSAGE_SIZE),
            idempotent: None,
        })
    }

    fn pipeline(&self) -> Pipeline {
        Pipeline::new(&self.options, MAX_MESSAGE_SIZE)
    }

    /// Connects as the device the connection string names (a device key, a device-via-policy
    /// string or a device's pre-made signature), authorises it and attaches its link.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConnectionString`] without a `DeviceId`; connection, authorisation
    /// and not-found errors as for [`Producer`](crate::Producer).
    pub async fn device_sender(self) -> Result<DeviceSender> {
        let cs = self.parsed()?;
        let device_id = cs.device_id().map(str::to_owned).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConnectionString,
                "the connection string names no `DeviceId`; a gateway takes a policy string",
            )
        })?;
        let config = self.config(&cs)?;
        let entity = entity::device_events(cs.host_name(), &device_id);
        let engine = Engine::connect(config, Some(entity.audience.clone())).await?;
        let link = engine.link_to(entity, None).await?;
        Ok(DeviceSender {
            inner: Arc::new(DeviceInner {
                device_id,
                engine,
                link,
                pipeline: self.pipeline(),
            }),
        })
    }

    /// A gateway that sends as any device of the hub. Connections are opened when the first
    /// device needs one.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConnectionString`] unless the string is a policy's (with a key).
    pub async fn gateway(self) -> Result<Gateway> {
        let cs = self.parsed()?;
        if cs.credential_kind() != IotHubCredentialKind::PolicyKey || cs.device_id().is_some() {
            return Err(Error::new(
                ErrorKind::InvalidConnectionString,
                "a gateway needs a shared access policy string (HostName, SharedAccessKeyName, \
                 SharedAccessKey) whose policy has DeviceConnect",
            ));
        }
        let config = self.config(&cs)?;
        Ok(Gateway::new(GatewaySettings {
            host_name: cs.host_name().to_owned(),
            config,
            max_devices: self.max_devices_per_connection,
            pipeline: self.pipeline(),
            token_lifetime: self.options.token_lifetime,
            idle_timeout: self.idle_timeout,
            refused_for: self.refused_retry_after,
            #[cfg(feature = "registry")]
            creator: self
                .auto_create
                .map(|(r, when)| (r, when, self.registry_concurrency)),
        }))
    }
}

/// Sends device-to-cloud messages as one device.
///
/// Cheap to clone; every clone shares the connection, the link and the in-flight bounds.
#[derive(Clone, Debug)]
pub struct DeviceSender {
    inner: Arc<DeviceInner>,
}

#[derive(Debug)]
struct DeviceInner {
    device_id: String,
    engine: Arc<Engine>,
    link: Arc<LinkHandle>,
    pipeline: Pipeline,
}

impl DeviceSender {
    /// A builder.
    pub fn builder() -> IotHubBuilder {
        IotHubBuilder::default()
    }

    /// Connects with a device connection string and default options.
    ///
    /// # Errors
    /// As [`IotHubBuilder::device_sender`].
    pub async fn from_connection_string(connection_string: &str) -> Result<DeviceSender> {
        Self::builder()
            .connection_string(connection_string)
            .device_sender()
            .await
    }

    /// The device this sender speaks for.
    pub fn device_id(&self) -> &str {
        &self.inner.device_id
    }

    /// The largest message (or batch) the link takes: at most 256 KB.
    pub fn max_message_size(&self) -> u64 {
        self.inner.link.max_message_size()
    }

    /// Queues one message; the future resolves with the hub's outcome. Waits while the
    /// in-flight bounds are reached.
    ///
    /// # Errors
    /// [`ErrorKind::MessageTooLarge`] over 256 KB; [`ErrorKind::Closed`] after `close`.
    pub async fn send(&self, message: Event) -> Result<DeliveryFuture> {
        self.submit_one(message, true).await
    }

    /// Like [`send`](Self::send), but fails with [`ErrorKind::Busy`] instead of waiting.
    ///
    /// # Errors
    /// As [`send`](Self::send), and [`ErrorKind::Busy`].
    pub async fn try_send(&self, message: Event) -> Result<DeliveryFuture> {
        self.submit_one(message, false).await
    }

    /// An empty batch as large as the link allows (or `max_size` bytes when smaller).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidBatchSize`] for 0 or more than the link allows.
    pub fn create_batch(&self, max_size: Option<u64>) -> Result<EventBatch> {
        new_batch(
            Route::default(),
            self.inner.link.max_message_size(),
            max_size,
        )
    }

    /// Queues a batch as one delivery.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidBatchSize`] for an empty batch, else as [`send`](Self::send).
    pub async fn send_batch(&self, batch: EventBatch) -> Result<DeliveryFuture> {
        self.inner
            .pipeline
            .submit_batch(&self.inner.engine, self.inner.link.clone(), batch, true)
            .await
    }

    /// Waits for every outcome, then closes the link and the connection.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when the close handshake fails.
    pub async fn close(self) -> Result<()> {
        self.inner.engine.close(None, || 0).await.map(|_| ())
    }

    async fn submit_one(&self, message: Event, wait: bool) -> Result<DeliveryFuture> {
        let link = self.inner.link.clone();
        let sections = Sections::single(&message, None, link.max_message_size())?;
        self.inner
            .pipeline
            .submit(&self.inner.engine, link, sections, true, wait)
            .await
    }
}
