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
//! A gateway signs each device's token with its policy key (the policy needs DeviceConnect)
//! and puts it for the device's audience on first use, so a device the hub refuses fails its
//! own sends and no one else's. IoT Hub holds about 999 tokens per connection; a gateway opens
//! another connection once one carries
//! [`max_devices_per_connection`](IotHubBuilder::max_devices_per_connection) devices (default
//! 900).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::Mutex;

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
    max_devices_per_connection: usize,
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
            .field(
                "max_devices_per_connection",
                &self.max_devices_per_connection,
            )
            .field("network", &self.network)
            .finish()
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
            max_devices_per_connection: DEFAULT_MAX_DEVICES_PER_CONNECTION,
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
        let tls = if self.plaintext {
            None
        } else {
            Some(crate::tls::client_config_with_pems(&self.extra_roots_pem)?)
        };
        let options = &self.options;
        let (route, framing) = self
            .network
            .resolve(cs.connect_host(), "/$iothub/websocket")?;
        let default_port = if tls.is_some() { 5671 } else { 5672 };
        let default_port = self
            .network
            .default_port(tls.is_some())
            .unwrap_or(default_port);
        Ok(ConnectConfig {
            port: self.port.unwrap_or(default_port),
            route,
            framing,
            host: cs.connect_host().to_owned(),
            dial_host: None,
            hub: cs.hub_name().to_owned(),
            tls,
            provider: cs.token_provider(options.token_lifetime),
            connect_timeout: options.connect_timeout,
            operation_timeout: options.operation_timeout,
            max_frame_size: 65536,
            retry: options.retry.clone(),
            max_message_size: options.max_message_size.min(MAX_MESSAGE_SIZE),
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
        let engine = Engine::connect(
            config,
            self.options.max_in_flight,
            Some(entity.audience.clone()),
        )
        .await?;
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
        Ok(Gateway {
            inner: Arc::new(GatewayInner {
                host_name: cs.host_name().to_owned(),
                config,
                queue_depth: self.options.max_in_flight,
                max_devices: self.max_devices_per_connection,
                pipeline: self.pipeline(),
                shards: Mutex::new(Shards::default()),
            }),
        })
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
        self.inner.link.max_message_size
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
        new_batch(Route::default(), self.inner.link.max_message_size, max_size)
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
        let sections = Sections::single(&message, None, link.max_message_size)?;
        self.inner
            .pipeline
            .submit(&self.inner.engine, link, sections, true, wait)
            .await
    }
}

/// Sends device-to-cloud messages as any device of the hub, over shared connections.
///
/// Cheap to clone; every clone shares the connections, links and in-flight bounds.
#[derive(Clone, Debug)]
pub struct Gateway {
    inner: Arc<GatewayInner>,
}

struct GatewayInner {
    host_name: String,
    config: ConnectConfig,
    queue_depth: usize,
    max_devices: usize,
    pipeline: Pipeline,
    shards: Mutex<Shards>,
}

impl std::fmt::Debug for GatewayInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("host", &self.host_name)
            .field("max_devices_per_connection", &self.max_devices)
            .finish_non_exhaustive()
    }
}

/// The gateway's connections and which device lives on which.
#[derive(Debug, Default)]
struct Shards {
    engines: Vec<Arc<Engine>>,
    /// Devices per connection, by index in `engines`.
    load: Vec<usize>,
    devices: HashMap<String, usize>,
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
}

impl Gateway {
    /// A builder.
    pub fn builder() -> IotHubBuilder {
        IotHubBuilder::default()
    }

    /// A gateway from a policy connection string, with default options.
    ///
    /// # Errors
    /// As [`IotHubBuilder::gateway`].
    pub async fn from_connection_string(connection_string: &str) -> Result<Gateway> {
        Self::builder()
            .connection_string(connection_string)
            .gateway()
            .await
    }

    /// Queues one message as `device_id`'s; the future resolves with the hub's outcome. The
    /// device's token and link are set up on its first message.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an id IoT Hub does not allow; the device's
    /// authorisation or not-found errors (for this device alone); as
    /// [`DeviceSender::send`].
    pub async fn send(&self, device_id: &str, message: Event) -> Result<DeliveryFuture> {
        let (engine, link) = self.device(device_id).await?;
        let sections = Sections::single(&message, None, link.max_message_size)?;
        self.inner
            .pipeline
            .submit(&engine, link, sections, true, true)
            .await
    }

    /// An empty batch for `device_id`, as large as its link allows.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn create_batch(&self, device_id: &str) -> Result<EventBatch> {
        let (_, link) = self.device(device_id).await?;
        new_batch(Route::default(), link.max_message_size, None)
    }

    /// Queues a batch as one delivery of `device_id`.
    ///
    /// # Errors
    /// As [`DeviceSender::send_batch`].
    pub async fn send_batch(&self, device_id: &str, batch: EventBatch) -> Result<DeliveryFuture> {
        let (engine, link) = self.device(device_id).await?;
        self.inner
            .pipeline
            .submit_batch(&engine, link, batch, true)
            .await
    }

    /// Connections, devices and deliveries in flight.
    pub async fn stats(&self) -> GatewayStats {
        let shards = self.inner.shards.lock().await;
        GatewayStats {
            connections: shards.engines.len(),
            devices: shards.devices.len(),
            in_flight: self.inner.pipeline.in_flight(),
        }
    }

    /// Waits for every outcome, then closes every connection.
    ///
    /// # Errors
    /// The first close handshake that failed.
    pub async fn close(self) -> Result<()> {
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
    async fn device(&self, device_id: &str) -> Result<(Arc<Engine>, Arc<LinkHandle>)> {
        if let Err(problem) = crate::iothub::sas::check_id("device id", device_id) {
            return Err(Error::new(ErrorKind::InvalidArgument, problem));
        }
        let entity = entity::device_events(&self.inner.host_name, device_id);
        let engine = {
            let mut shards = self.inner.shards.lock().await;
            match shards.devices.get(device_id) {
                Some(&i) => shards.engines[i].clone(),
                None => {
                    let i = match shards.load.iter().position(|&n| n < self.inner.max_devices) {
                        Some(i) => i,
                        None => {
                            let engine = Engine::connect(
                                self.inner.config.clone(),
                                self.inner.queue_depth,
                                None,
                            )
                            .await?;
                            shards.engines.push(engine);
                            shards.load.push(0);
                            shards.engines.len() - 1
                        }
                    };
                    shards.load[i] += 1;
                    shards.devices.insert(device_id.to_owned(), i);
                    shards.engines[i].clone()
                }
            }
        };
        let link = engine.link_to(entity, None).await?;
        Ok((engine, link))
    }
}
