//! [`Producer`]: a cheap, cloneable handle that streams events and batches over one AMQP
//! connection, with a bounded number of deliveries in flight.
//!
//! # Delivery model
//!
//! Sending is two-stage. `send(..).await` returns as soon as the event is validated, sized
//! against the link's limit, and queued on its sender link; it yields a [`DeliveryFuture`].
//! Awaiting that future gives the hub's outcome: `Ok(())` once the hub accepted (stored) the
//! event, or the error it answered with. Many deliveries can be in flight at once, up to
//! [`ProducerOptions::max_in_flight`] batches, [`ProducerOptions::max_pending_sends`] single
//! sends and [`ProducerOptions::max_in_flight_bytes`] bytes; past that `send` waits
//! (backpressure) and `try_send` fails with [`ErrorKind::Busy`]. Order on a link is the
//! order of calls.
//!
//! Every single event travels as a one-event batch message (format 0x80013700), as
//! Microsoft's JavaScript SDK does, so its size is known exactly before anything is sent.
//!
//! # Transports
//! [`ProducerBuilder::transport`] picks how events travel ([`Transport`]): AMQP over TLS (the
//! default), AMQP over WebSockets, or the Event Hubs HTTPS REST API (feature `https`). The
//! API is the same over each: the same [`Event`], [`EventBatch`] (sized for the transport's
//! encoding: a REST batch counts its JSON body), [`SendOptions`], in-flight bounds and
//! two-stage [`DeliveryFuture`]. Over HTTPS every delivery is one POST (several in flight on
//! pooled keep-alive connections); `$management` reads, reconnect and link counters are
//! AMQP's alone.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::amqp::{ConnectConfig, ConnectionEvent, Engine, LinkHandle, Pushed, Queued, Waiters};
use crate::auth::TokenProvider;
use crate::batch::{BatchOptions, EventBatch, Route, Sections};
use crate::connection_string::ConnectionString;
use crate::endpoint::{CustomEndpoint, Transport};
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::retry::RetryOptions;

/// Tunables of a [`Producer`]. Every setter has a sensible default:
///
/// | setting | default |
/// |---|---|
/// | [`max_in_flight`](Self::max_in_flight) | 1024 batches |
/// | [`max_in_flight_bytes`](Self::max_in_flight_bytes) | a window from 2 MiB to 16 MiB |
/// | [`max_pending_sends`](Self::max_pending_sends) | 65,536 single sends |
/// | [`token_lifetime`](Self::token_lifetime) | 1 hour (SAS keys) |
/// | [`connect_timeout`](Self::connect_timeout) | 30 s |
/// | [`operation_timeout`](Self::operation_timeout) | 60 s |
/// | [`retry`](Self::retry) | [`RetryOptions::default`] |
/// | [`max_message_size`](Self::max_message_size) | 1 MiB ([`DEFAULT_MAX_MESSAGE_SIZE`]) |
/// | [`idempotent`](Self::idempotent) | off |
#[derive(Debug, Clone)]
#[must_use]
pub struct ProducerOptions {
    pub(crate) max_in_flight: usize,
    pub(crate) max_in_flight_bytes: usize,
    /// The byte bound is the default: a window that grows (over AMQP), not a fixed bound.
    pub(crate) growing_window: bool,
    pub(crate) max_pending_sends: usize,
    pub(crate) token_lifetime: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) retry: RetryOptions,
    pub(crate) max_message_size: u64,
    pub(crate) idempotent: bool,
    pub(crate) publishing_state: Vec<crate::PartitionPublishingState>,
}

/// The largest message any Event Hubs tier takes (Standard, Premium and Dedicated: 1 MB;
/// Basic announces 256 KB itself). A link that announces more is held to this, so a peer's
/// claim cannot make hubsend build messages of any size.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = crate::entity::eventhubs::MAX_MESSAGE_SIZE;

/// The in-flight byte window's start (see [`ProducerOptions::max_in_flight_bytes`]).
const START_WINDOW: usize = 2 * 1024 * 1024;

/// How many largest messages' worth of deliveries a link keeps awaiting their outcome before
/// single sends gather (see [`ProducerOptions::max_pending_sends`]).
const SINGLE_WINDOW_BYTES: u64 = 8 * 1024 * 1024;

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            max_in_flight: 1024,
            max_in_flight_bytes: 16 * 1024 * 1024,
            growing_window: true,
            max_pending_sends: 65_536,
            token_lifetime: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(60),
            retry: RetryOptions::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            idempotent: false,
            publishing_state: Vec::new(),
        }
    }
}

impl ProducerOptions {
    /// The defaults listed above.
    pub fn new() -> ProducerOptions {
        ProducerOptions::default()
    }

    /// At most this many batches (and, over HTTPS, single events) await the hub's outcome
    /// at once.
    ///
    /// Over AMQP, single sends ([`Producer::send`]) are bounded by
    /// [`max_pending_sends`](Self::max_pending_sends) instead: the sends queued behind each
    /// other travel together in one delivery, so counting them as deliveries would cap a
    /// producer far from the hub at this many events per round trip.
    pub fn max_in_flight(mut self, deliveries: usize) -> Self {
        self.max_in_flight = deliveries.max(1);
        self
    }

    /// How many deliveries a link keeps awaiting their outcome before the single sends behind
    /// them wait and gather into one message: as many full messages of `max_message_size` as
    /// 8 MiB (or a smaller byte bound) holds, at least 2 so sends still overlap a round trip.
    /// Not the window's start: single sends' deliveries are mostly small, and their bytes are
    /// bounded by the window anyway.
    pub(crate) fn single_window(&self, max_message_size: u64) -> usize {
        let bytes = SINGLE_WINDOW_BYTES.min(self.max_in_flight_bytes as u64);
        let full = bytes / max_message_size.max(1);
        full.clamp(2, 1024) as usize
    }

    /// The in-flight byte window a producer starts with (see
    /// [`max_in_flight_bytes`](Self::max_in_flight_bytes)).
    pub(crate) fn start_window(&self) -> usize {
        if self.growing_window {
            self.max_in_flight_bytes.min(START_WINDOW)
        } else {
            self.max_in_flight_bytes
        }
    }

    /// Over AMQP: at most this many single-event sends ([`Producer::send`],
    /// [`Producer::try_send`]) are queued or await the hub's outcome at once (their bytes
    /// count against [`max_in_flight_bytes`](Self::max_in_flight_bytes) as well). Past it
    /// `send` waits and `try_send` fails with [`ErrorKind::Busy`].
    ///
    /// The sends queued on a link while it waits for the hub leave together, packed into as
    /// few deliveries as the message size allows; this bound is how many may wait that way.
    /// A link waits while as many deliveries await their outcome as 8 MiB holds messages of
    /// the largest size (8 of 1 MB; a smaller [`max_in_flight_bytes`](Self::max_in_flight_bytes)
    /// fewer, at least 2; a window grown past 8 MiB more): a lone send leaves at once, and sends
    /// under load travel together in full messages instead of one small delivery each.
    ///
    /// An [idempotent](Self::idempotent) producer's single sends count against
    /// [`max_in_flight`](Self::max_in_flight) instead, each send one: on an idempotent link
    /// every delivery behind a refused one is refused too and resent in order, so the number
    /// of events in flight there is what each refusal costs (and how often the events behind
    /// it are tried again).
    pub fn max_pending_sends(mut self, sends: usize) -> Self {
        self.max_pending_sends = sends.max(1);
        self
    }

    /// At most this many encoded bytes await the hub's outcome at once (never less than one
    /// maximum-size message): a fixed bound.
    ///
    /// Unset, the bound is a window that follows bandwidth × round trip: it starts at 2 MiB
    /// and, over AMQP, grows by half, at most once per round trip, toward 16 MiB while it is
    /// full and deliveries come back within twice the shortest round trip (their bytes on the
    /// way, not waiting in a queue), and gives a growth back (never below its start) when a
    /// delivery's trip is more than three times the shortest, mostly queue. Near the hub
    /// deliveries queue for the hub's CPU once two or three are in flight, so it stays at its
    /// start or a growth or two above it; 5 ms and more away it grows to 10-16 MiB.
    /// [`Producer::stats`] tells its size.
    ///
    /// Resident memory grows by about 3 to 4 bytes per byte of the window: the producer keeps
    /// each unsettled delivery for resending, and fe2o3 keeps its encoding. At 2 MiB a
    /// full-speed producer holds near 30-40 MB; at 16 MiB near 75-85 MB. Set this bound to
    /// keep memory where you want it, or to go past 16 MiB where bandwidth × round trip is
    /// larger still (or for large events: 32 MiB took 1 KiB batches from ~0.5M to ~0.9M
    /// events/s near the hub).
    pub fn max_in_flight_bytes(mut self, bytes: usize) -> Self {
        self.max_in_flight_bytes = bytes.max(1);
        self.growing_window = false;
        self
    }

    /// Lifetime of the SAS tokens hubsend signs; they are re-put on the same connection
    /// before they expire.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// How long opening the connection (TCP, TLS, SASL, CBS) may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How failed deliveries, lost links and lost connections are retried.
    pub fn retry(mut self, retry: RetryOptions) -> Self {
        self.retry = retry;
        self
    }

    /// How long a link attach, put-token or management request may take.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// The most a sender link's announced max-message-size is believed: batches are filled
    /// to the smaller of the two. Raise it only for a hub known to take larger messages.
    pub fn max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes.max(1);
        self
    }

    /// Idempotent retries: every event goes to a partition link that negotiates idempotent
    /// publishing and carries a sequence number, so the hub drops what a retry sends again
    /// after it was stored (see [`crate::idempotent`] for exactly what is guaranteed).
    /// Deliveries stay pipelined. Events without a partition id go round robin over the
    /// partitions, and a partition key is resolved to its partition on the client with the
    /// service's hash (the event keeps its key). Off by default.
    pub fn idempotent(mut self, on: bool) -> Self {
        self.idempotent = on;
        self
    }

    /// With [`idempotent`](Self::idempotent): the partitions' state a previous producer left
    /// ([`Producer::publishing_state`]), so this one continues its numbering and the hub
    /// still drops what the old one had stored. Partitions not listed start afresh.
    pub fn publishing_state(mut self, states: Vec<crate::PartitionPublishingState>) -> Self {
        self.publishing_state = states;
        self
    }
}

/// Per-send routing: partition key or partition id (not both).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct SendOptions {
    route: Route,
}

impl SendOptions {
    /// Round robin over partitions (the hub decides).
    pub fn new() -> SendOptions {
        SendOptions::default()
    }

    /// Routes by this key: events with the same key land on the same partition, in order.
    pub fn partition_key(mut self, key: impl Into<String>) -> SendOptions {
        self.route.partition_key = Some(key.into());
        self
    }

    /// Sends to this partition id.
    pub fn partition_id(mut self, id: impl Into<String>) -> SendOptions {
        self.route.partition_id = Some(id.into());
        self
    }

    pub(crate) fn into_route(self) -> (Option<String>, Option<String>) {
        (self.route.partition_key, self.route.partition_id)
    }

    /// The partition key, when it is the only route given.
    pub(crate) fn key_only(&self) -> Option<&str> {
        match &self.route.partition_id {
            Some(_) => None,
            None => self.route.partition_key.as_deref(),
        }
    }

    /// Neither a partition key nor a partition id: round robin.
    pub(crate) fn is_round_robin(&self) -> bool {
        self.route.partition_key.is_none() && self.route.partition_id.is_none()
    }
}

/// Builds a [`Producer`]. Setters never fail; [`connect`](Self::connect) reports every problem.
#[must_use]
pub struct ProducerBuilder {
    connection_string: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    hub: Option<String>,
    provider: Option<Arc<dyn TokenProvider>>,
    extra_roots_pem: Vec<Vec<u8>>,
    plaintext: bool,
    options: ProducerOptions,
    network: crate::transport::NetworkOptions,
    transport: Option<Transport>,
    endpoint: Option<String>,
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for ProducerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerBuilder")
            .field(
                "connection_string",
                &self.connection_string.as_ref().map(|_| "<redacted>"),
            )
            .field("host", &self.host)
            .field("port", &self.port)
            .field("hub", &self.hub)
            .field("provider", &self.provider)
            .field("extra_roots", &self.extra_roots_pem.len())
            .field("plaintext", &self.plaintext)
            .field("options", &self.options)
            .field("network", &self.network)
            .field("transport", &self.transport)
            .field("endpoint", &self.endpoint)
            .field("runtime", &self.runtime.is_some())
            .finish()
    }
}

impl ProducerBuilder {
    /// Takes namespace, hub and credentials from a connection string
    /// (`Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…`).
    pub fn connection_string(mut self, connection_string: impl Into<String>) -> Self {
        self.connection_string = Some(connection_string.into());
        self
    }

    /// The namespace host, e.g. `contoso.servicebus.windows.net` (with [`credential`](Self::credential)).
    pub fn namespace(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// The port (default 5671 for TLS, 5672 plain).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The event hub name; must equal the connection string's `EntityPath` when both are set.
    pub fn event_hub(mut self, hub: impl Into<String>) -> Self {
        self.hub = Some(hub.into());
        self
    }

    /// Authorises with this token provider instead of the connection string's credentials.
    pub fn credential(mut self, provider: Arc<dyn TokenProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Trusts this root CA (PEM) in addition to the platform's, for private endpoints and tests.
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_roots_pem.push(pem.into());
        self
    }

    /// Connects over plain TCP without TLS. Only for local test hubs and the emulator (which a
    /// connection string with `UseDevelopmentEmulator=true` selects on its own).
    pub fn danger_plaintext(mut self, plaintext: bool) -> Self {
        self.plaintext = plaintext;
        self
    }

    /// Carries AMQP in WebSocket binary messages on
    /// `wss://{namespace}:443/$servicebus/websocket/`, for networks that open only port 443
    /// (needs the `websockets` cargo feature; without it [`connect`](Self::connect) fails
    /// with [`ErrorKind::InvalidConfig`]). The port then defaults to 443 (80 with
    /// [`danger_plaintext`](Self::danger_plaintext)); a port from the connection string is
    /// the AMQP one and is ignored, [`port`](Self::port) still wins. CBS, links, batches and
    /// recovery are the same as over raw AMQP.
    pub fn websockets(mut self, on: bool) -> Self {
        self.network.websockets = on;
        self
    }

    /// The `Sec-WebSocket-Protocol` to ask for with [`websockets`](Self::websockets):
    /// `AMQPWSB10` by default (what Microsoft's SDKs send), or `amqp` (the OASIS binding, what
    /// fe2o3-amqp-ws sends). The server must echo it, or connecting fails.
    pub fn websocket_subprotocol(mut self, subprotocol: impl Into<String>) -> Self {
        self.network.subprotocol = Some(subprotocol.into());
        self
    }

    /// Tunnels the connection (raw AMQP over TLS, or WebSockets) through this HTTP CONNECT
    /// proxy: `http://[user:pass@]host[:port]` (port 8080 when left out). Basic credentials
    /// are sent to the proxy only and never printed (`Debug` shows `<redacted>`). Needs the
    /// `proxy` cargo feature. A proxy that cannot be reached or refuses the tunnel (407, 403,
    /// any other status) fails [`connect`](Self::connect) and reconnects with
    /// [`ErrorKind::Connection`], the message naming the proxy and its status. Overrides
    /// [`proxy_from_env`](Self::proxy_from_env).
    pub fn proxy(mut self, url: impl Into<String>) -> Self {
        self.network.proxy = Some(url.into());
        self
    }

    /// Takes the proxy from `HTTPS_PROXY` (or `https_proxy`), unless `NO_PROXY` (or
    /// `no_proxy`: `*`, host names, domain suffixes) exempts the namespace. Off by default:
    /// a library that quietly sends its traffic where an environment variable says is a
    /// surprise in services that set `HTTPS_PROXY` for other clients, and Microsoft's SDKs
    /// do not read it for AMQP either; the `hubsend` command turns it on. Read at each
    /// connect. Needs the `proxy` cargo feature.
    pub fn proxy_from_env(mut self, on: bool) -> Self {
        self.network.proxy_from_env = on;
        self
    }

    /// How events travel to the hub (default [`Transport::Amqp`]). [`Transport::WebSockets`]
    /// is what [`websockets(true)`](Self::websockets) sets; [`Transport::Https`] sends over
    /// the Event Hubs REST API (needs the `https` cargo feature; without it
    /// [`connect`](Self::connect) fails with [`ErrorKind::InvalidConfig`]): one POST per
    /// event or batch to `https://{namespace}/{hub}/messages` (port 443, 80 with
    /// [`danger_plaintext`](Self::danger_plaintext)), with the same credentials, proxy
    /// settings and root CAs. A [custom endpoint](Self::endpoint)'s scheme implies the
    /// transport; naming another one is an [`ErrorKind::InvalidConfig`] error.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Dials this address instead of the namespace, while token audiences, the AMQP
    /// `hostname` and entity names keep the namespace's name (as the custom endpoint address
    /// of Microsoft's SDKs does): for gateways, private endpoints and local test hubs. The
    /// scheme implies the transport: `amqps://` and `amqp://` ([`Transport::Amqp`]), `wss://`
    /// and `ws://` ([`Transport::WebSockets`], the path is the upgrade path, default
    /// `/$servicebus/websocket/`), `https://` and `http://` ([`Transport::Https`], a path is a
    /// prefix before `/{hub}/messages`). The port defaults to the scheme's (5671, 5672, 443,
    /// 80); [`port`](Self::port) and a connection string's port do not apply. Plaintext
    /// schemes (`amqp`, `ws`, `http`) are refused with [`ErrorKind::InvalidConfig`] unless the
    /// host is `localhost` or a loopback address, or
    /// [`danger_plaintext(true)`](Self::danger_plaintext) was called.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// Replaces the tunables.
    pub fn options(mut self, options: ProducerOptions) -> Self {
        self.options = options;
        self
    }

    /// Runs the producer's network work on `runtime` rather than on the runtime that calls
    /// [`connect`](Self::connect): over AMQP (raw or WebSockets) the connection and session,
    /// TLS, the sender links' tasks, token refreshes and reconnects. Sends, batches and
    /// [`BufferedProducer`](crate::BufferedProducer) calls still run where they are made.
    ///
    /// For a process whose own thread is busy making events (parsing input, say): with the
    /// network on a thread of its own, `hubsend send` went from about 1.2 to 1.5 million
    /// NDJSON lines/s on two cores. The runtime must outlive the producer.
    ///
    /// ```no_run
    /// # async fn demo() -> hubsend::Result<()> {
    /// let network = tokio::runtime::Builder::new_multi_thread()
    ///     .worker_threads(1)
    ///     .enable_all()
    ///     .build()
    ///     .expect("a runtime");
    /// let producer = hubsend::Producer::builder()
    ///     .connection_string("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=a2V5;EntityPath=hub")
    ///     .runtime(network.handle().clone())
    ///     .connect()
    ///     .await?;
    /// # drop(producer); drop(network); Ok(()) }
    /// ```
    pub fn runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Opens the connection, authorises it and attaches the hub's sender link.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConnectionString`] or [`ErrorKind::InvalidConfig`] for bad input,
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] when the hub cannot be reached,
    /// [`ErrorKind::Unauthorized`] when it refuses the credentials, [`ErrorKind::NotFound`]
    /// when the hub does not exist; [`ErrorKind::Closed`] when the [`runtime`](Self::runtime)
    /// it was given shut down first.
    pub async fn connect(mut self) -> Result<Producer> {
        let Some(runtime) = self.runtime.take() else {
            return self.connect_here().await;
        };
        // Connected on `runtime`, so that everything the connection spawns runs there; the
        // connect is aborted if this future is dropped (a caller's timeout).
        let connecting =
            tokio_util::task::AbortOnDropHandle::new(runtime.spawn(self.connect_here()));
        match connecting.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::new(
                ErrorKind::Closed,
                "the producer's runtime shut down while connecting",
            )),
        }
    }

    /// [`connect`](Self::connect) on the current runtime.
    async fn connect_here(self) -> Result<Producer> {
        let mut host = self.host;
        let mut port = self.port;
        let mut hub = self.hub;
        let mut plaintext = self.plaintext;
        let mut provider = self.provider;
        if let Some(cs) = &self.connection_string {
            let parsed = ConnectionString::parse(cs)?;
            host.get_or_insert_with(|| parsed.host().to_owned());
            port.get_or_insert(parsed.port());
            plaintext |= parsed.use_development_emulator();
            match (&hub, parsed.entity_path()) {
                (Some(explicit), Some(path)) if explicit != path => {
                    return Err(Error::new(
                        ErrorKind::InvalidConfig,
                        format!("event hub `{explicit}` differs from the connection string's EntityPath `{path}`"),
                    ))
                }
                (None, Some(path)) => hub = Some(path.to_owned()),
                _ => {}
            }
            if provider.is_none() {
                provider = Some(
                    parsed
                        .credential()
                        .into_provider(self.options.token_lifetime),
                );
            }
        }
        let host = host.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                "no namespace: give a connection string or `namespace`",
            )
        })?;
        let hub = hub.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                "no event hub: give `EntityPath` in the connection string or `event_hub`",
            )
        })?;
        let provider = provider.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                "no credentials: give a connection string or `credential`",
            )
        })?;
        let custom = match &self.endpoint {
            Some(url) => Some(CustomEndpoint::parse(url, self.plaintext)?),
            None => None,
        };
        let transport = choose_transport(self.transport, custom.as_ref(), self.network.websockets)?;
        if transport == Transport::Https && self.options.idempotent {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "idempotent retries need AMQP (the REST API has no idempotent producer)",
            ));
        }
        if transport == Transport::Https {
            return connect_https(
                host,
                hub,
                provider,
                custom,
                plaintext,
                self.port,
                self.extra_roots_pem,
                self.network,
                self.options,
            )
            .await;
        }
        let mut network = self.network;
        network.websockets = transport == Transport::WebSockets;
        if let Some(custom) = &custom {
            plaintext = !custom.tls;
        }
        let tls = if plaintext {
            None
        } else {
            Some(crate::tls::client_config_with_pems(&self.extra_roots_pem)?)
        };
        let ws_path = match &custom {
            Some(c) if !c.path.is_empty() => format!("{}/", c.path),
            _ => "/$servicebus/websocket/".to_owned(),
        };
        let (route, framing) = network.resolve(
            custom.as_ref().map_or(host.as_str(), |c| c.host.as_str()),
            &ws_path,
        )?;
        let port = match (&custom, network.default_port(tls.is_some())) {
            (Some(custom), _) => custom.port,
            (None, Some(ws_port)) => self.port.unwrap_or(ws_port),
            (None, None) => port.unwrap_or(if tls.is_some() { 5671 } else { 5672 }),
        };
        let config = ConnectConfig {
            dial_host: custom.map(|c| c.host),
            port,
            route,
            framing,
            host,
            hub,
            tls,
            provider,
            connect_timeout: self.options.connect_timeout,
            operation_timeout: self.options.operation_timeout,
            max_frame_size: 65536,
            retry: self.options.retry.clone(),
            max_message_size: self.options.max_message_size,
            single_window: self.options.single_window(self.options.max_message_size),
            idempotent: None,
        };
        let mut config = config;
        if self.options.idempotent {
            for state in &self.options.publishing_state {
                state.validate()?;
            }
            config.idempotent = Some(self.options.publishing_state.clone());
        }
        let audience = crate::entity::eventhubs::audience(&config.host, &config.hub);
        let engine = Engine::connect(config, Some(audience)).await?;
        // Attach the hub link now so a missing hub or missing rights fail at connect.
        let link = engine.link(None).await?;
        let max_message_size = link.max_message_size();
        let partitions = if self.options.idempotent {
            let ids = read_hub_properties(&engine).await?.partition_ids;
            if ids.is_empty() {
                return Err(Error::new(
                    ErrorKind::Management,
                    "the hub reported no partitions, which idempotent publishing needs",
                ));
            }
            Some(Partitions {
                ids,
                next: std::sync::atomic::AtomicUsize::new(0),
            })
        } else {
            None
        };
        let pipeline = Pipeline::new(&self.options, max_message_size);
        pipeline.grow_with(&engine, &self.options, max_message_size);
        Ok(Producer {
            inner: Arc::new(Inner {
                backend: Backend::Amqp(engine),
                pipeline,
                max_message_size,
                partitions,
                transport,
            }),
        })
    }
}

/// The transport asked for, explicitly, by the custom endpoint's scheme, or by
/// `websockets(true)`; they must agree.
fn choose_transport(
    explicit: Option<Transport>,
    custom: Option<&CustomEndpoint>,
    websockets: bool,
) -> Result<Transport> {
    let implied = custom.map(|c| c.transport);
    match (explicit, implied) {
        (Some(asked), Some(scheme)) if asked != scheme => Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("the transport `{asked}` differs from the one the custom endpoint's scheme implies (`{scheme}`)"),
        )),
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) if websockets => Ok(Transport::WebSockets),
        (None, None) => Ok(Transport::Amqp),
    }
}

/// [`ProducerBuilder::connect`] for [`Transport::Https`].
#[cfg(feature = "https")]
#[allow(clippy::too_many_arguments)]
async fn connect_https(
    host: String,
    hub: String,
    provider: Arc<dyn TokenProvider>,
    custom: Option<CustomEndpoint>,
    plaintext: bool,
    port: Option<u16>,
    extra_roots_pem: Vec<Vec<u8>>,
    network: crate::transport::NetworkOptions,
    options: ProducerOptions,
) -> Result<Producer> {
    use crate::http::{HttpClientOptions, HttpProxy};
    let (base, tls, dial_host) = match &custom {
        Some(c) => {
            let scheme = if c.tls { "https" } else { "http" };
            let host = if c.host.contains(':') {
                format!("[{}]", c.host)
            } else {
                c.host.clone()
            };
            (
                format!("{scheme}://{host}:{}{}", c.port, c.path),
                c.tls,
                c.host.clone(),
            )
        }
        None => {
            let (scheme, default_port) = if plaintext {
                ("http", 80)
            } else {
                ("https", 443)
            };
            let port = port.unwrap_or(default_port);
            (
                format!("{scheme}://{host}:{port}"),
                !plaintext,
                host.clone(),
            )
        }
    };
    if !tls && !plaintext && !crate::endpoint::is_loopback_host(&dial_host) {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("refusing plain HTTP to `{dial_host}`, which is not a loopback host"),
        ));
    }
    let proxy = match (&network.proxy, network.proxy_from_env) {
        (Some(url), _) => HttpProxy::Url(url.clone()),
        (None, true) => HttpProxy::FromEnv,
        (None, false) => HttpProxy::Off,
    };
    let http = HttpClientOptions {
        extra_roots_pem,
        danger_allow_http: !tls,
        timeout: options.retry.try_timeout,
        loopback: crate::endpoint::is_loopback_host(&dial_host),
        proxy,
    };
    let rest = crate::http::rest::Rest::connect(crate::http::rest::RestConfig {
        base,
        audience: format!("https://{host}/{hub}"),
        hub,
        provider,
        http,
        retry: options.retry.clone(),
    })
    .await?;
    let max_message_size = options.max_message_size;
    Ok(Producer {
        inner: Arc::new(Inner {
            backend: Backend::Https(rest),
            pipeline: Pipeline::new(&options, max_message_size),
            max_message_size,
            partitions: None,
            transport: Transport::Https,
        }),
    })
}

/// Without the `https` feature, [`Transport::Https`] is a configuration error.
#[cfg(not(feature = "https"))]
#[allow(clippy::too_many_arguments)]
async fn connect_https(
    _host: String,
    _hub: String,
    _provider: Arc<dyn TokenProvider>,
    _custom: Option<CustomEndpoint>,
    _plaintext: bool,
    _port: Option<u16>,
    _extra_roots_pem: Vec<Vec<u8>>,
    _network: crate::transport::NetworkOptions,
    _options: ProducerOptions,
) -> Result<Producer> {
    Err(Error::new(
        ErrorKind::InvalidConfig,
        "this build of hubsend lacks the `https` cargo feature (the HTTPS REST transport)",
    ))
}

/// A handle onto one AMQP connection to one event hub.
///
/// Cheap to clone (`Arc` inside; don't wrap it in another) and `Send + Sync`: every clone
/// shares the connection, its sender links and its in-flight bound. Create it with
/// [`Producer::builder`] or [`Producer::from_connection_string`].
///
/// Dropping every clone stops token refresh and lets the connection's tasks end once their
/// queued deliveries settle, without waiting; call [`close`](Self::close) to wait for every
/// outcome and close the connection cleanly.
#[derive(Clone, Debug)]
pub struct Producer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    pipeline: Pipeline,
    max_message_size: u64,
    /// Idempotent producers route every event to a partition on the client.
    partitions: Option<Partitions>,
    transport: Transport,
}

/// The hub's partitions, for routing on the client.
#[derive(Debug)]
struct Partitions {
    ids: Vec<String>,
    /// Round robin for events without a partition key or id.
    next: std::sync::atomic::AtomicUsize,
}

impl Partitions {
    /// The partition `route` goes to: its id, its key's partition by the service's hash, or
    /// the next one in turn.
    fn resolve(&self, route: &Route) -> Result<String> {
        if let Some(id) = &route.partition_id {
            if !self.ids.contains(id) {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("the hub has no partition `{id}`"),
                ));
            }
            return Ok(id.clone());
        }
        let index = match &route.partition_key {
            Some(key) => crate::entity::eventhubs::partition_for_key(key, self.ids.len()),
            None => self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.ids.len(),
        };
        Ok(self.ids[index].clone())
    }
}

/// What carries the deliveries: the AMQP engine (over TCP/TLS or WebSockets), or the REST
/// backend. Every public method hands REST calls over first; the rest of each is AMQP's.
#[derive(Debug)]
enum Backend {
    Amqp(Arc<Engine>),
    #[cfg(feature = "https")]
    Https(crate::http::rest::Rest),
}

/// The in-flight bounds every sending handle shares: deliveries and bytes awaiting the hub's
/// outcome. A send takes its permits before it is queued and gives them back when its outcome
/// is settled, so memory is bounded by these, not by the input rate.
#[derive(Debug)]
pub(crate) struct Pipeline {
    deliveries: Arc<Semaphore>,
    /// Single sends over AMQP, which share deliveries (see `ProducerOptions::max_pending_sends`).
    sends: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_in_flight: usize,
    max_sends: usize,
    /// Single sends hold a delivery permit each (idempotent producers; see
    /// `ProducerOptions::max_pending_sends`).
    singles_are_deliveries: bool,
}

impl Pipeline {
    /// The bounds `options` set; the byte bound is at least one message of
    /// `max_message_size` (so the largest message can always go) and fits a semaphore.
    pub(crate) fn new(options: &ProducerOptions, max_message_size: u64) -> Pipeline {
        let (bytes, _) = Self::byte_bounds(options, max_message_size);
        let sends = options.max_pending_sends.min(Semaphore::MAX_PERMITS);
        Pipeline {
            deliveries: Arc::new(Semaphore::new(options.max_in_flight)),
            sends: Arc::new(Semaphore::new(sends)),
            bytes: Arc::new(Semaphore::new(bytes)),
            max_in_flight: options.max_in_flight,
            max_sends: sends,
            singles_are_deliveries: options.idempotent,
        }
    }

    /// The byte budget's start and ceiling: at least one message of `max_message_size`, and
    /// within what a delivery's permits (`u32`) can ask for.
    fn byte_bounds(options: &ProducerOptions, max_message_size: u64) -> (usize, usize) {
        let limit = u32::MAX as usize;
        let largest = usize::try_from(max_message_size).unwrap_or(limit);
        let start = options.start_window().max(largest).min(limit);
        let ceiling = options.max_in_flight_bytes.max(start).min(limit);
        (start, ceiling)
    }

    /// Lets `engine`'s link tasks grow the byte budget toward the configured ceiling (see
    /// [`ProducerOptions::max_in_flight_bytes`]).
    fn grow_with(&self, engine: &Engine, options: &ProducerOptions, max_message_size: u64) {
        let (start, ceiling) = Self::byte_bounds(options, max_message_size);
        engine.counters.window.attach(
            self.bytes.clone(),
            start as u64,
            ceiling as u64,
            max_message_size,
        );
    }

    /// Queues a caller's batch on `link` as one delivery, as it was built.
    pub(crate) async fn submit_batch(
        &self,
        engine: &Engine,
        link: Arc<LinkHandle>,
        batch: EventBatch,
        wait: bool,
    ) -> Result<DeliveryFuture> {
        if batch.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidBatchSize,
                "the batch holds no event",
            ));
        }
        if batch.format() != crate::batch::Format::Amqp {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the batch was made by a producer of another transport; make it with this producer's `create_batch`",
            ));
        }
        Self::check_size(&batch, &link)?;
        self.submit(engine, link, batch.into_sections(), false, wait)
            .await
    }

    /// [`submit_batch`](Self::submit_batch) with the batch's first sequence number fixed.
    pub(crate) async fn submit_numbered(
        &self,
        engine: &Engine,
        link: Arc<LinkHandle>,
        batch: EventBatch,
        first: i32,
    ) -> Result<DeliveryFuture> {
        if batch.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidBatchSize,
                "the batch holds no event",
            ));
        }
        Self::check_size(&batch, &link)?;
        let mut sections = batch.into_sections();
        sections.fixed = Some(first);
        self.submit(engine, link, sections, false, true).await
    }

    /// Refuses a batch larger than `link` allows.
    fn check_size(batch: &EventBatch, link: &LinkHandle) -> Result<()> {
        if batch.size_in_bytes() > link.max_message_size() {
            return Err(Error::new(
                ErrorKind::MessageTooLarge,
                format!(
                    "the batch is {} bytes but the link allows {}",
                    batch.size_in_bytes(),
                    link.max_message_size()
                ),
            ));
        }
        Ok(())
    }

    /// Deliveries (and single sends) waiting for an outcome.
    pub(crate) fn in_flight(&self) -> usize {
        (self.max_in_flight - self.deliveries.available_permits())
            + (self.max_sends - self.sends.available_permits())
    }

    /// Queues `sections` on `link` once permits are free (`wait`) or fails with `Busy`.
    pub(crate) async fn submit(
        &self,
        engine: &Engine,
        link: Arc<LinkHandle>,
        sections: Sections,
        mergeable: bool,
        wait: bool,
    ) -> Result<DeliveryFuture> {
        let size = sections.size().min(u32::MAX as u64) as u32;
        engine.check_open()?;
        let count = if mergeable && !self.singles_are_deliveries {
            &self.sends
        } else {
            &self.deliveries
        };
        let permits = Self::acquire(count, &self.bytes, size, wait).await?;
        let (reply, rx) = oneshot::channel();
        link.queue
            .push(Queued {
                sections,
                mergeable,
                waiters: Waiters::one(reply, permits),
            })
            .map_err(|_| Error::new(ErrorKind::Closed, "the sender link has stopped"))?;
        Ok(DeliveryFuture::from_receiver(rx))
    }

    /// Queues one plain single send on `link`: encoded straight onto the message waiting at
    /// the back of the link's queue when the permits are free at once (the common case under
    /// load, and the cheap one), else the general way of [`submit`](Self::submit).
    pub(crate) async fn submit_event(
        &self,
        engine: &Engine,
        link: Arc<LinkHandle>,
        event: &Event,
        partition_key: Option<String>,
        wait: bool,
    ) -> Result<DeliveryFuture> {
        engine.check_open()?;
        if !self.singles_are_deliveries {
            let (reply, rx) = oneshot::channel();
            let permits = |bytes: u64| {
                let bytes = u32::try_from(bytes).ok()?;
                Self::try_acquire(&self.sends, &self.bytes, bytes).ok()
            };
            match link
                .queue
                .push_event(event, partition_key.as_deref(), reply, permits)
            {
                Pushed::Queued => return Ok(DeliveryFuture::from_receiver(rx)),
                Pushed::Closed => {
                    return Err(Error::new(ErrorKind::Closed, "the sender link has stopped"))
                }
                // The event's own message, when the queue built it already.
                Pushed::Declined(Some(sections)) => {
                    return self.submit(engine, link, sections, true, wait).await
                }
                Pushed::Declined(None) => {}
            }
        }
        let sections = Sections::single(event, partition_key, link.max_message_size())?;
        self.submit(engine, link, sections, true, wait).await
    }

    /// The permits for one delivery of `bytes` bytes: waits for them (`wait`) or fails with
    /// [`ErrorKind::Busy`]. They are given back when dropped.
    #[cfg(feature = "https")]
    pub(crate) async fn permits(
        &self,
        bytes: u32,
        wait: bool,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        Self::acquire(&self.deliveries, &self.bytes, bytes, wait).await
    }

    /// One permit of `count` and `bytes` permits of `budget`, waited for or [`ErrorKind::Busy`].
    async fn acquire(
        count: &Arc<Semaphore>,
        budget: &Arc<Semaphore>,
        bytes: u32,
        wait: bool,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let closed = |_| Error::new(ErrorKind::Closed, "the producer is closed");
        if wait {
            let d = count.clone().acquire_owned().await.map_err(closed)?;
            let b = budget
                .clone()
                .acquire_many_owned(bytes)
                .await
                .map_err(closed)?;
            Ok((d, b))
        } else {
            Self::try_acquire(count, budget, bytes)
        }
    }

    /// One permit of `count` and `bytes` permits of `budget` if both are free now, else
    /// [`ErrorKind::Busy`] (and neither is held).
    fn try_acquire(
        count: &Arc<Semaphore>,
        budget: &Arc<Semaphore>,
        bytes: u32,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let busy = |_| Error::new(ErrorKind::Busy, "the in-flight bound is reached");
        let d = count.clone().try_acquire_owned().map_err(busy)?;
        let b = budget.clone().try_acquire_many_owned(bytes).map_err(busy)?;
        Ok((d, b))
    }
}

/// A snapshot of a producer's counters (see [`Producer::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProducerStats {
    /// Batches and single sends waiting for the hub's outcome.
    pub in_flight: usize,
    /// Deliveries (events or batches) the hub accepted.
    pub sent: u64,
    /// Deliveries sent again after throttling or a lost link or connection.
    pub retried: u64,
    /// Deliveries that failed for good.
    pub failed: u64,
    /// New connections opened after the first one was lost.
    pub reconnects: u64,
    /// Sender links re-attached (and their unsettled deliveries resent) after a loss.
    pub link_recoveries: u64,
    /// With idempotent retries: events the hub acknowledged as already stored when they
    /// were resent (known from the sequence number it reported on re-attaching), so it did
    /// not store them twice. A lower bound: a hub that does not report what it stored drops
    /// duplicates all the same, uncounted.
    pub duplicates_avoided: u64,
    /// Over AMQP: the in-flight byte window now (see
    /// [`ProducerOptions::max_in_flight_bytes`]); 0 over HTTPS.
    pub in_flight_window_bytes: u64,
}

/// Properties of an event hub, read from `$management`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HubProperties {
    /// The hub's name.
    pub name: String,
    /// When the hub was created.
    pub created_at: Option<DateTime<Utc>>,
    /// The partition ids, in the hub's order.
    pub partition_ids: Vec<String>,
}

/// Properties of one partition, read from `$management`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PartitionProperties {
    /// The hub's name.
    pub hub: String,
    /// The partition id.
    pub id: String,
    /// Sequence number of the first event still retained (-1 when empty).
    pub begin_sequence_number: i64,
    /// Sequence number of the last event enqueued (-1 when empty).
    pub last_enqueued_sequence_number: i64,
    /// Offset of the last event enqueued.
    pub last_enqueued_offset: String,
    /// When the last event was enqueued.
    pub last_enqueued_time: Option<DateTime<Utc>>,
    /// Whether the partition holds no event.
    pub is_empty: bool,
}

// Without the `https` feature, AMQP is the only backend and each hand-over `match` has one arm.
#[cfg_attr(not(feature = "https"), allow(clippy::infallible_destructuring_match))]
impl Producer {
    /// The engine behind this producer (engine tests).
    #[cfg(test)]
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        match &self.inner.backend {
            Backend::Amqp(engine) => engine,
            #[cfg(feature = "https")]
            Backend::Https(_) => panic!("engine tests run over AMQP"),
        }
    }

    /// A builder for a producer.
    pub fn builder() -> ProducerBuilder {
        ProducerBuilder {
            connection_string: None,
            host: None,
            port: None,
            hub: None,
            provider: None,
            extra_roots_pem: Vec::new(),
            plaintext: false,
            options: ProducerOptions::default(),
            network: Default::default(),
            transport: None,
            endpoint: None,
            runtime: None,
        }
    }

    /// Connects with a connection string and default options.
    ///
    /// # Errors
    /// As [`ProducerBuilder::connect`].
    pub async fn from_connection_string(connection_string: &str) -> Result<Producer> {
        Producer::builder()
            .connection_string(connection_string)
            .connect()
            .await
    }

    /// The hub this producer sends to.
    pub fn event_hub(&self) -> &str {
        match &self.inner.backend {
            Backend::Amqp(engine) => engine.hub(),
            #[cfg(feature = "https")]
            Backend::Https(rest) => rest.hub(),
        }
    }

    /// How this producer's events travel.
    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// The largest message (event or batch) the hub's link takes, in bytes.
    pub fn max_message_size(&self) -> u64 {
        self.inner.max_message_size
    }

    /// Counters of this producer's connection: deliveries in flight, accepted, retried and
    /// failed, reconnects and recovered links.
    pub fn stats(&self) -> ProducerStats {
        let engine = match &self.inner.backend {
            Backend::Amqp(engine) => engine,
            #[cfg(feature = "https")]
            Backend::Https(rest) => return rest.stats(self.inner.pipeline.in_flight()),
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ProducerStats {
            in_flight: self.inner.pipeline.in_flight(),
            sent: load(&engine.counters.accepted),
            retried: load(&engine.counters.retried),
            failed: load(&engine.counters.failed),
            reconnects: load(&engine.reconnects),
            link_recoveries: load(&engine.recoveries),
            duplicates_avoided: load(&engine.counters.duplicates_avoided),
            in_flight_window_bytes: engine.counters.window.granted(),
        }
    }

    /// With idempotent retries: every partition's publishing state as the hub last
    /// confirmed it (empty otherwise). Save it when shutting down and hand it to the next
    /// producer with [`ProducerOptions::publishing_state`] to continue without duplicates.
    pub fn publishing_state(&self) -> Vec<crate::PartitionPublishingState> {
        match &self.inner.backend {
            Backend::Amqp(engine) => engine
                .publishing
                .as_ref()
                .map(|p| p.snapshot())
                .unwrap_or_default(),
            #[cfg(feature = "https")]
            Backend::Https(_) => Vec::new(),
        }
    }

    /// Whether this producer publishes idempotently.
    pub fn is_idempotent(&self) -> bool {
        self.inner.partitions.is_some()
    }

    /// With idempotent retries: the partition ids it routes to, fixed when it connected.
    pub(crate) fn fixed_partition_ids(&self) -> Option<&[String]> {
        self.inner.partitions.as_ref().map(|p| p.ids.as_slice())
    }

    /// Connection state changes (reconnecting, reconnected, token refreshed, link recovered,
    /// gave up) from now on. A receiver that falls more than 64 events behind skips the oldest.
    ///
    /// Over HTTPS only token refreshes are reported.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ConnectionEvent> {
        match &self.inner.backend {
            Backend::Amqp(engine) => engine.events.subscribe(),
            #[cfg(feature = "https")]
            Backend::Https(rest) => rest.subscribe(),
        }
    }

    /// Queues one event; the returned future resolves with the hub's outcome.
    ///
    /// Waits while the in-flight bound is reached.
    ///
    /// # Errors
    /// [`ErrorKind::MessageTooLarge`] (nothing is sent), [`ErrorKind::NotFound`] for an
    /// unknown partition, [`ErrorKind::InvalidArgument`] when both a partition key and id are
    /// given, connection and authorisation errors when a new link cannot be attached.
    ///
    /// # Cancel safety
    /// Cancelling before it returns sends nothing.
    pub async fn send(&self, event: Event, options: SendOptions) -> Result<DeliveryFuture> {
        self.send_single(event, options.route, true).await
    }

    /// Like [`send`](Self::send) but fails with [`ErrorKind::Busy`] instead of waiting when
    /// the in-flight bound is reached.
    ///
    /// # Errors
    /// As [`send`](Self::send), plus [`ErrorKind::Busy`].
    pub async fn try_send(&self, event: Event, options: SendOptions) -> Result<DeliveryFuture> {
        self.send_single(event, options.route, false).await
    }

    /// Sends one event and waits for the hub's outcome.
    ///
    /// # Errors
    /// As [`send`](Self::send), plus the hub's rejection.
    pub async fn send_and_wait(&self, event: Event, options: SendOptions) -> Result<()> {
        self.send(event, options).await?.await
    }

    /// An empty batch whose size limit is the link's maximum message size (or less).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidBatchSize`] when the requested size is zero or above the link's
    /// maximum; [`ErrorKind::NotFound`] for an unknown partition id.
    pub async fn create_batch(&self, options: BatchOptions) -> Result<EventBatch> {
        let route = Route {
            partition_key: options.partition_key,
            partition_id: options.partition_id,
        };
        check_route(&route)?;
        let engine = match &self.inner.backend {
            Backend::Amqp(engine) => engine,
            #[cfg(feature = "https")]
            Backend::Https(_) => {
                let max = batch_limit(self.inner.max_message_size, options.max_size)?;
                return EventBatch::new_json(route, max);
            }
        };
        if let Some(partitions) = &self.inner.partitions {
            let partition = partitions.resolve(&route)?;
            let link = engine.link(Some(&partition)).await?;
            let max = batch_limit(link.max_message_size(), options.max_size)?;
            return EventBatch::new_idempotent(route, partition, max);
        }
        let link = engine.link(route.partition_id.as_deref()).await?;
        new_batch(route, link.max_message_size(), options.max_size)
    }

    /// Queues a batch; the returned future resolves with the hub's outcome for all its events.
    ///
    /// # Errors
    /// As [`send`](Self::send). An empty batch is an [`ErrorKind::InvalidBatchSize`] error.
    pub async fn send_batch(&self, batch: EventBatch) -> Result<DeliveryFuture> {
        let engine = match &self.inner.backend {
            Backend::Amqp(engine) => engine,
            #[cfg(feature = "https")]
            Backend::Https(rest) => {
                return rest.send_batch(&self.inner.pipeline, batch, true).await;
            }
        };
        if self.inner.partitions.is_some() != batch.is_idempotent() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the batch was not created by this producer (idempotent and plain batches do not mix)",
            ));
        }
        let link = engine.link(batch.link_partition()).await?;
        self.inner
            .pipeline
            .submit_batch(engine, link, batch, true)
            .await
    }

    /// With idempotent retries: queues `batch` with its events numbered from
    /// `first_sequence_number` on, instead of the partition's next numbers. For a caller that
    /// keeps the numbers durably (a disk spool) so that, after a crash, a new producer resends
    /// what may or may not have been stored with the numbers it was first sent with, and the
    /// hub drops what it already has.
    ///
    /// The caller owns the partition's numbering: numbered batches must follow each other
    /// without gaps, in order, from the last number the hub stored (resends of numbers the hub
    /// already stored are acknowledged as duplicates). The link never renumbers such a
    /// batch: when its numbers can no longer be stored in order (a delivery before it failed
    /// for good, the hub refused them as out of order, or the partition's producer state
    /// started afresh), it fails with [`Condition::OutOfOrderSequence`](crate::Condition::OutOfOrderSequence)
    /// and the caller starts the partition afresh (a producer without that partition's state).
    ///
    /// # Errors
    /// As [`send_batch`](Self::send_batch); [`ErrorKind::InvalidArgument`] on a producer
    /// without idempotent retries.
    pub async fn send_batch_numbered(
        &self,
        batch: EventBatch,
        first_sequence_number: i32,
    ) -> Result<DeliveryFuture> {
        let engine = match &self.inner.backend {
            Backend::Amqp(engine) => engine,
            #[cfg(feature = "https")]
            Backend::Https(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "numbered batches need idempotent retries over AMQP",
                ))
            }
        };
        if self.inner.partitions.is_none() || !batch.is_idempotent() || first_sequence_number < 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "numbered batches need an idempotent producer, its own batch and a sequence number of 0 or more",
            ));
        }
        let link = engine.link(batch.link_partition()).await?;
        self.inner
            .pipeline
            .submit_numbered(engine, link, batch, first_sequence_number)
            .await
    }

    /// The AMQP engine, or the error for an operation only AMQP has.
    #[cfg_attr(not(feature = "https"), allow(unused_variables))]
    fn amqp_only(&self, what: &str) -> Result<&Arc<Engine>> {
        match &self.inner.backend {
            Backend::Amqp(engine) => Ok(engine),
            #[cfg(feature = "https")]
            Backend::Https(_) => Err(Error::new(
                ErrorKind::Management,
                format!(
                    "{what} are read from `$management` over AMQP; this producer sends over HTTPS"
                ),
            )),
        }
    }

    /// Reads the hub's properties from `$management`.
    ///
    /// # Errors
    /// [`ErrorKind::Management`] for an unexpected reply, [`ErrorKind::Unauthorized`] when
    /// the credentials lack the right to read.
    pub async fn hub_properties(&self) -> Result<HubProperties> {
        read_hub_properties(self.amqp_only("hub properties")?).await
    }

    /// Reads one partition's properties from `$management`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown partition, as [`hub_properties`](Self::hub_properties) otherwise.
    pub async fn partition_properties(&self, id: &str) -> Result<PartitionProperties> {
        let value = self
            .amqp_only("partition properties")?
            .management_read("com.microsoft:partition", Some(id))
            .await?;
        let map = MapView::new(&value)?;
        Ok(PartitionProperties {
            hub: map.string("name").unwrap_or_default(),
            id: map.string("partition").unwrap_or_else(|| id.to_owned()),
            begin_sequence_number: map.long("begin_sequence_number").unwrap_or(-1),
            last_enqueued_sequence_number: map.long("last_enqueued_sequence_number").unwrap_or(-1),
            last_enqueued_offset: map
                .string("last_enqueued_offset")
                .unwrap_or_else(|| "-1".into()),
            last_enqueued_time: map.timestamp("last_enqueued_time_utc"),
            is_empty: map.bool("is_partition_empty").unwrap_or(false),
        })
    }

    /// Closes the producer: no new sends (from any clone), every queued and unsettled
    /// delivery settles (recovering lost links as usual, within each delivery's deadline),
    /// then links, session and connection close. Nothing reconnects afterwards; other clones
    /// fail with [`ErrorKind::Closed`].
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when the close handshake fails (deliveries are settled by then).
    pub async fn close(self) -> Result<()> {
        match &self.inner.backend {
            Backend::Amqp(engine) => engine.close(None, || 0).await.map(|_| ()),
            #[cfg(feature = "https")]
            Backend::Https(rest) => {
                rest.close(None).await;
                Ok(())
            }
        }
    }

    /// Like [`close`](Self::close), but stops waiting when `deadline` passes: deliveries
    /// still without an outcome then fail with [`ErrorKind::Closed`] (their events may or
    /// may not have been stored), and the connection closes.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] naming how many deliveries still had no outcome.
    pub async fn close_within(self, deadline: Duration) -> Result<()> {
        let inner = self.inner.clone();
        let in_flight = move || inner.pipeline.in_flight();
        let unresolved = match &self.inner.backend {
            Backend::Amqp(engine) => engine.close(Some(deadline), in_flight).await?,
            #[cfg(feature = "https")]
            Backend::Https(rest) => rest.close(Some(deadline)).await,
        };
        if unresolved > 0 {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{unresolved} deliveries had no outcome when the {deadline:?} close deadline passed"
                ),
            ));
        }
        Ok(())
    }

    /// Encodes one event and queues it on its link (looked up once per send), where it may
    /// share a delivery with the single sends queued right behind it.
    async fn send_single(&self, event: Event, route: Route, wait: bool) -> Result<DeliveryFuture> {
        check_route(&route)?;
        let engine = match &self.inner.backend {
            Backend::Amqp(engine) => engine,
            #[cfg(feature = "https")]
            Backend::Https(rest) => {
                let (pipeline, limit) = (&self.inner.pipeline, self.inner.max_message_size);
                return rest.send(pipeline, event, route, limit, wait).await;
            }
        };
        if let Some(partitions) = &self.inner.partitions {
            let partition = partitions.resolve(&route)?;
            let link = engine.link(Some(&partition)).await?;
            let sections = Sections::single_idempotent(
                &event,
                partition,
                route.partition_key,
                link.max_message_size(),
            )?;
            return self.submit_on(engine, link, sections, true, wait).await;
        }
        let link = engine.link(route.partition_id.as_deref()).await?;
        self.inner
            .pipeline
            .submit_event(engine, link, &event, route.partition_key, wait)
            .await
    }

    async fn submit_on(
        &self,
        engine: &Engine,
        link: Arc<LinkHandle>,
        sections: Sections,
        mergeable: bool,
        wait: bool,
    ) -> Result<DeliveryFuture> {
        self.inner
            .pipeline
            .submit(engine, link, sections, mergeable, wait)
            .await
    }
}

/// The hub's properties, read from `engine`'s `$management` node.
async fn read_hub_properties(engine: &Engine) -> Result<HubProperties> {
    let value = engine
        .management_read("com.microsoft:eventhub", None)
        .await?;
    let map = MapView::new(&value)?;
    Ok(HubProperties {
        name: map.string("name").unwrap_or_default(),
        created_at: map.timestamp("created_at"),
        partition_ids: map.strings("partition_ids"),
    })
}

/// An empty batch for `route` on a link that takes `limit` bytes, of `requested` bytes at most.
pub(crate) fn new_batch(route: Route, limit: u64, requested: Option<u64>) -> Result<EventBatch> {
    EventBatch::new(route, batch_limit(limit, requested)?)
}

/// The size limit of a batch of `requested` bytes at most on a link (or API) that takes
/// `limit` bytes.
pub(crate) fn batch_limit(limit: u64, requested: Option<u64>) -> Result<u64> {
    Ok(match requested {
        Some(0) => {
            return Err(Error::new(
                ErrorKind::InvalidBatchSize,
                "a batch size of 0 bytes was requested",
            ))
        }
        Some(requested) if requested > limit => {
            return Err(Error::new(
                ErrorKind::InvalidBatchSize,
                format!("requested {requested} bytes but the link allows at most {limit}"),
            ))
        }
        Some(requested) => requested,
        None => limit,
    })
}

fn check_route(route: &Route) -> Result<()> {
    if route.partition_key.is_some() && route.partition_id.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "give a partition key or a partition id, not both",
        ));
    }
    Ok(())
}

/// Resolves with the hub's outcome for one delivery: `Ok(())` once the hub stored it.
///
/// Dropping it neither cancels the delivery nor leaks in-flight capacity.
#[derive(Debug)]
#[must_use = "the outcome of a delivery is only known by awaiting its future"]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Result<()>>,
}

impl DeliveryFuture {
    pub(crate) fn from_receiver(rx: oneshot::Receiver<Result<()>>) -> DeliveryFuture {
        DeliveryFuture { rx }
    }
}

impl Future for DeliveryFuture {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::new(
                ErrorKind::Closed,
                "the producer stopped before the hub settled the delivery",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Read access to a `$management` reply map with string keys.
struct MapView<'a> {
    entries: Vec<(&'a str, &'a Value)>,
}

impl<'a> MapView<'a> {
    fn new(value: &'a Value) -> Result<MapView<'a>> {
        match value {
            Value::Map(map) => Ok(MapView {
                entries: map
                    .iter()
                    .filter_map(|(k, v)| match k {
                        Value::String(s) => Some((s.as_str(), v)),
                        Value::Symbol(s) => Some((s.0.as_str(), v)),
                        _ => None,
                    })
                    .collect(),
            }),
            _ => Err(Error::new(
                ErrorKind::Management,
                "the $management reply is not a map",
            )),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    fn string(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Symbol(s) => Some(s.0.clone()),
            _ => None,
        }
    }

    fn long(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::Long(v) => Some(*v),
            Value::Int(v) => Some(*v as i64),
            Value::Uint(v) => Some(*v as i64),
            Value::Ulong(v) => i64::try_from(*v).ok(),
            _ => None,
        }
    }

    fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn timestamp(&self, key: &str) -> Option<DateTime<Utc>> {
        match self.get(key)? {
            Value::Timestamp(t) => DateTime::from_timestamp_millis(t.milliseconds()),
            _ => None,
        }
    }

    fn strings(&self, key: &str) -> Vec<String> {
        let items: Vec<&Value> = match self.get(key) {
            Some(Value::Array(a)) => a.0.iter().collect(),
            Some(Value::List(l)) => l.iter().collect(),
            _ => Vec::new(),
        };
        items
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync + Clone>() {}
    is::<Producer>();
    let _ = SimpleValue::Null;
}
