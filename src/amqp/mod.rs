//! The AMQP engine behind a [`Producer`](crate::Producer): one connection and session, CBS
//! authorisation with timed token refresh, one task per sender link, and `$management` reads.

mod cbs;
mod error;
mod ledger;
mod link;
mod management;
mod queue;
mod window;

use error::{attach_error, from_amqp_error};
pub(crate) use error::{outcome_result, send_error};
use management::Management;
pub(crate) use queue::{LinkQueue, Pushed, Queued, Waiters};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::{Duration, SystemTime};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::SenderSettleMode;
use fe2o3_amqp::{Connection, Sender, Session};
use fe2o3_amqp_management::client::MgmtClient;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::auth::TokenProvider;
use crate::entity::{self, Entity};
use crate::error::{Error, ErrorKind, Result};
use crate::idempotent::{self, PartitionPublishingState};
use crate::retry::RetryOptions;
use crate::transport::{self, Connected, Endpoint, Lost};
use cbs::Authorizer;

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct ConnectConfig {
    pub(crate) host: String,
    /// The host to dial (and the TLS server name) when it is not `host`: a custom endpoint.
    /// `host` stays the AMQP `hostname`, and audiences keep naming it.
    pub(crate) dial_host: Option<String>,
    pub(crate) port: u16,
    pub(crate) hub: String,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) provider: Arc<dyn TokenProvider>,
    pub(crate) connect_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) max_frame_size: u32,
    pub(crate) retry: RetryOptions,
    /// The largest message size hubsend believes a link announces (see
    /// [`ProducerOptions::max_message_size`](crate::ProducerOptions::max_message_size)).
    pub(crate) max_message_size: u64,
    /// Deliveries a link keeps awaiting their outcome before single sends wait and gather
    /// (see `ProducerOptions::single_window`).
    pub(crate) single_window: usize,
    /// Through a proxy or not, AMQP raw or in WebSocket messages.
    pub(crate) route: transport::Route,
    pub(crate) framing: transport::Framing,
    /// Idempotent publishing: partition links negotiate it, starting from these states.
    pub(crate) idempotent: Option<Vec<PartitionPublishingState>>,
}

/// How long link tasks get to fail what they hold once the producer is closed, before they
/// are stopped (their callers then see [`ErrorKind::Closed`] all the same).
const CLOSED_GRACE: Duration = Duration::from_millis(500);

/// Where a producer's connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Sending.
    Open,
    /// `close` was called: no new sends; queued and unsettled deliveries still settle.
    Closing,
    /// Closed: nothing is sent, nothing reconnects; whatever is still unsettled fails.
    Closed,
}

/// A live sender link: its queue and the task that drains it.
pub(crate) struct LinkHandle {
    pub(crate) queue: Arc<LinkQueue>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The last handle gone (the link released, the engine dropped): the link takes no more
/// sends, settles what it holds and detaches.
impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.queue.close_intake();
    }
}

impl LinkHandle {
    /// The link's message size limit: what the hub allows now (it follows re-attaches),
    /// within the producer's own cap.
    pub(crate) fn max_message_size(&self) -> u64 {
        self.queue.limit()
    }
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("max_message_size", &self.max_message_size())
            .field("open", &!self.queue.is_closed())
            .finish()
    }
}

/// The sender links [`Engine::link`] attached, by route: the hub's and each partition's.
#[derive(Default)]
struct Routes {
    hub: Option<Arc<LinkHandle>>,
    partitions: HashMap<String, Arc<LinkHandle>>,
}

impl Routes {
    /// The link of `partition` (else the hub's), while its task still takes sends.
    fn open(&self, partition: Option<&str>) -> Option<Arc<LinkHandle>> {
        let link = match partition {
            None => self.hub.as_ref(),
            Some(p) => self.partitions.get(p),
        }?;
        (!link.queue.is_closed()).then(|| link.clone())
    }

    /// Records `link` as the link of `partition` (else the hub's).
    fn put(&mut self, partition: Option<&str>, link: Arc<LinkHandle>) {
        match partition {
            None => self.hub = Some(link),
            Some(p) => {
                self.partitions.insert(p.to_owned(), link);
            }
        }
    }
}

/// The connection a producer owns.
pub(crate) struct Engine {
    config: ConnectConfig,
    /// The runtime the connection was opened on: link tasks and reconnects run there too
    /// (see [`ProducerBuilder::runtime`](crate::ProducerBuilder::runtime)).
    runtime: tokio::runtime::Handle,
    connection: Mutex<ConnectionHandle<()>>,
    session: Mutex<SessionHandle<()>>,
    /// The token of every audience on this connection, kept fresh.
    authorizer: Arc<Authorizer>,
    /// Flips the moment the current connection's stream ends (no polling).
    lost: std::sync::Mutex<Lost>,
    links: Mutex<HashMap<String, Arc<LinkHandle>>>,
    /// The hub's and its partitions' open sender links, which [`link`](Self::link) reads
    /// without `links`'s async lock or building the link's address: one lookup per send.
    routes: std::sync::RwLock<Routes>,
    management: Mutex<Option<Management>>,
    link_counter: AtomicU64,
    /// Idempotent publishing: every partition's state.
    pub(crate) publishing: Option<Arc<Publishing>>,
    /// The token refresh queue and the connection watch, stopped on close and drop.
    refresher: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The generation of the current connection, for the connection watch.
    replaced: tokio::sync::watch::Sender<u64>,
    /// Serialises reconnects so concurrent link tasks open one new connection, not several.
    reconnect_lock: Mutex<()>,
    /// Connections opened after the first; also the generation of the current connection.
    pub(crate) reconnects: AtomicU64,
    /// Links re-attached after a loss.
    pub(crate) recoveries: AtomicU64,
    /// Delivery outcome counters, shared with the link tasks.
    pub(crate) counters: Arc<Counters>,
    /// Connection state changes, for applications that watch them.
    pub(crate) events: tokio::sync::broadcast::Sender<ConnectionEvent>,
    /// Open, closing or closed; link tasks watch it.
    lifecycle: tokio::sync::watch::Sender<Lifecycle>,
}

/// Delivery outcome counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Deliveries the hub accepted.
    pub(crate) accepted: AtomicU64,
    /// Deliveries sent again (after throttling or a lost link or connection).
    pub(crate) retried: AtomicU64,
    /// Deliveries that failed for good.
    pub(crate) failed: AtomicU64,
    /// Events of resent deliveries the hub had stored already (idempotent links), which it
    /// acknowledged without storing them again.
    pub(crate) duplicates_avoided: AtomicU64,
    /// The in-flight byte window, grown by what accepted deliveries show.
    pub(crate) window: window::Window,
}

/// The idempotent publishing state of every partition, as the link tasks last confirmed it.
#[derive(Debug, Default)]
pub(crate) struct Publishing {
    states: std::sync::Mutex<HashMap<String, PartitionPublishingState>>,
}

impl Publishing {
    fn new(initial: &[PartitionPublishingState]) -> Publishing {
        let states = initial
            .iter()
            .map(|s| (s.partition_id.clone(), s.clone()))
            .collect();
        Publishing {
            states: std::sync::Mutex::new(states),
        }
    }

    /// Records a partition's state.
    pub(crate) fn publish(&self, state: PartitionPublishingState) {
        if let Ok(mut states) = self.states.lock() {
            states.insert(state.partition_id.clone(), state);
        }
    }

    fn get(&self, partition: &str) -> Option<PartitionPublishingState> {
        self.states.lock().ok()?.get(partition).cloned()
    }

    /// Every partition's state, by partition id.
    pub(crate) fn snapshot(&self) -> Vec<PartitionPublishingState> {
        let mut all: Vec<_> = self
            .states
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| {
            let n = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
            (n(&a.partition_id), &a.partition_id).cmp(&(n(&b.partition_id), &b.partition_id))
        });
        all
    }
}

/// What an idempotent partition link asks for when it attaches: the state it knows (id,
/// epoch, last confirmed sequence number), or nothing to be assigned a new producer id.
pub(crate) type IdempotentRequest = Option<(i64, i16, i32)>;

/// One idempotent partition link's producer state and numbering (PROTOCOL-2 §I).
#[derive(Debug)]
pub(crate) struct Sequencer {
    pub(crate) partition: String,
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    /// The sequence number the next new delivery starts at.
    pub(crate) next: i32,
    /// The last sequence number the hub confirmed, and the ticket of the delivery that
    /// confirmed it.
    pub(crate) committed: i32,
    pub(crate) committed_ticket: Option<u64>,
    /// Numbers handed out so far: each assignment (new or renumbered) gets the next ticket,
    /// so tickets follow sequence-number order even when deliveries are renumbered.
    pub(crate) tickets: u64,
    /// Refused deliveries wait to be resent in order; no new ones go out meanwhile.
    pub(crate) hold: bool,
    /// The longest back-off among them.
    pub(crate) hold_until: Option<tokio::time::Instant>,
    /// The first delivery that failed for good with numbers, its first number and ticket: the
    /// deliveries behind it are renumbered over it.
    pub(crate) gap: Option<(ledger::DeliveryId, i32, u64)>,
    /// The next re-attach asks for a new producer id.
    pub(crate) fresh: bool,
}

impl Sequencer {
    fn new(partition: String, (producer_id, epoch, last): (i64, i16, i32)) -> Sequencer {
        Sequencer {
            partition,
            producer_id,
            epoch,
            next: idempotent::seq_add(last, 1),
            committed: last,
            committed_ticket: None,
            tickets: 0,
            hold: false,
            hold_until: None,
            gap: None,
            fresh: false,
        }
    }

    /// What a re-attach asks for.
    pub(crate) fn request(&self) -> IdempotentRequest {
        (!self.fresh).then_some((self.producer_id, self.epoch, self.committed))
    }

    /// The state to publish.
    pub(crate) fn state(&self) -> PartitionPublishingState {
        PartitionPublishingState::new(
            self.partition.clone(),
            self.producer_id,
            self.epoch,
            self.committed,
        )
    }
}

/// The producer id, epoch and last sequence number the hub answered an idempotent attach
/// with (fe2o3 merges the peer's attach properties into the link's own).
pub(crate) fn idempotent_reply(sender: &Sender, target: &str) -> Result<(i64, i16, i32)> {
    use fe2o3_amqp::types::primitives::{Symbol, Value};
    let read = |key: &str| -> Option<i64> {
        sender.properties(|p| match p.as_ref()?.get(&Symbol::from(key))? {
            Value::Long(v) => Some(*v),
            Value::Int(v) => Some(*v as i64),
            Value::Short(v) => Some(*v as i64),
            Value::Byte(v) => Some(*v as i64),
            _ => None,
        })
    };
    let id = read(idempotent::PRODUCER_ID);
    let epoch = read(idempotent::EPOCH).and_then(|e| i16::try_from(e).ok());
    let seq = read(idempotent::SEQUENCE).and_then(|s| i32::try_from(s).ok());
    match (id, epoch, seq) {
        (Some(id), Some(epoch), Some(seq)) => Ok((id, epoch, seq)),
        _ => Err(Error::new(
            ErrorKind::Link,
            format!("`{target}` did not answer with an idempotent producer state: the hub does not support idempotent publishing"),
        )),
    }
}

impl Counters {
    /// Hands a final outcome to every caller waiting on one delivery, and counts it once per
    /// caller (a delivery can carry several single-event sends).
    fn settle(&self, waiters: Waiters, result: Result<()>) {
        let counter = if result.is_ok() {
            &self.accepted
        } else {
            &self.failed
        };
        counter.fetch_add(waiters.len() as u64, Ordering::Relaxed);
        waiters.answer(result);
    }
}

/// A change in a producer's connection, delivered by [`Producer::subscribe`](crate::Producer::subscribe).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The connection's stream ended (noticed the moment it happens, not by polling); the
    /// next send, or the links with deliveries in flight, reconnect.
    Disconnected {
        /// Why, as far as the transport knows (peer closed, read or write error).
        cause: String,
    },
    /// The connection was lost; hubsend is opening a new one.
    Reconnecting,
    /// A new connection is open and authorised.
    Reconnected,
    /// A fresh token was put on the connection before the old one expired.
    TokenRefreshed,
    /// Refreshing the token failed; it will be tried again before the old one expires.
    TokenRefreshFailed(String),
    /// A sender link was lost and re-attached; its unsettled deliveries were sent again.
    LinkRecovered {
        /// The link's target (`hub` or `hub/Partitions/N`).
        target: String,
        /// How many deliveries were sent again.
        resent: usize,
    },
    /// Recovery gave up; the link's deliveries failed with this error.
    GaveUp {
        /// The link's target.
        target: String,
        /// Why.
        error: String,
    },
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("host", &self.config.host)
            .field("port", &self.config.port)
            .field("hub", &self.config.hub)
            .field("tls", &self.config.tls.is_some())
            .finish()
    }
}

impl Engine {
    /// The audience of the hub, which covers its partitions.
    pub(crate) fn audience(&self) -> String {
        entity::eventhubs::audience(&self.config.host, &self.config.hub)
    }

    pub(crate) fn hub(&self) -> &str {
        &self.config.hub
    }

    /// Opens the connection and session and, when given, authorises `audience` with the
    /// connection's credential (so bad credentials fail at connect).
    pub(crate) async fn connect(
        config: ConnectConfig,
        audience: Option<String>,
    ) -> Result<Arc<Engine>> {
        let span = tracing::info_span!("connection", host = %config.host, port = config.port, hub = %config.hub);
        async move {
            let timeout = config.connect_timeout;
            let (connection, session, cbs, lost) = tokio::time::timeout(timeout, open(&config))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "connecting to {}:{} took longer than {:?}",
                            config.host, config.port, timeout
                        ),
                    )
                })??;
            let authorizer = Arc::new(Authorizer::new(config.operation_timeout));
            authorizer.set_client(cbs).await;
            if let Some(audience) = audience {
                tokio::time::timeout(
                    timeout,
                    authorizer.authorize(&audience, config.provider.clone()),
                )
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("authorising `{audience}` took longer than {timeout:?}"),
                    )
                })??;
            }
            tracing::info!("connected");
            let publishing = config
                .idempotent
                .as_ref()
                .map(|initial| Arc::new(Publishing::new(initial)));
            let engine = Arc::new(Engine {
                publishing,
                config,
                runtime: tokio::runtime::Handle::current(),
                connection: Mutex::new(connection),
                session: Mutex::new(session),
                authorizer,
                lost: std::sync::Mutex::new(lost),
                links: Mutex::new(HashMap::new()),
                routes: std::sync::RwLock::new(Routes::default()),
                management: Mutex::new(None),
                link_counter: AtomicU64::new(0),
                refresher: std::sync::Mutex::new(Vec::new()),
                replaced: tokio::sync::watch::channel(0).0,
                reconnect_lock: Mutex::new(()),
                reconnects: AtomicU64::new(0),
                recoveries: AtomicU64::new(0),
                counters: Arc::new(Counters::default()),
                events: tokio::sync::broadcast::channel(64).0,
                lifecycle: tokio::sync::watch::channel(Lifecycle::Open).0,
            });
            let refresher = tokio::spawn(
                refresh_tokens(engine.authorizer.clone(), engine.events.clone())
                    .instrument(tracing::Span::current()),
            );
            let watcher = tokio::spawn(
                watch_connection(Arc::downgrade(&engine), engine.replaced.subscribe())
                    .instrument(tracing::Span::current()),
            );
            if let Ok(mut slot) = engine.refresher.lock() {
                slot.push(refresher);
                slot.push(watcher);
            }
            Ok(engine)
        }
        .instrument(span)
        .await
    }

    /// The sender link for the hub or one of its partitions, attached on first use.
    /// Sends find an open one in `routes`; the first send of a route, or one after its link
    /// task stopped, takes the locked path and records what it found.
    pub(crate) async fn link(self: &Arc<Self>, partition: Option<&str>) -> Result<Arc<LinkHandle>> {
        self.check_open()?;
        if let Some(link) = self.routes.read().ok().and_then(|r| r.open(partition)) {
            return Ok(link);
        }
        let entity = entity::eventhubs::sender(&self.config.host, &self.config.hub, partition);
        let idempotent = partition.filter(|_| self.publishing.is_some());
        let link = self.attach_link(entity, None, idempotent).await?;
        if let Ok(mut routes) = self.routes.write() {
            routes.put(partition, link.clone());
        }
        Ok(link)
    }

    /// The sender link for `entity`, attached on first use. Its audience is authorised first
    /// (with `provider`, else the connection's own credential) unless it already is; an
    /// audience the hub refuses fails this link alone.
    pub(crate) async fn link_to(
        self: &Arc<Self>,
        entity: Entity,
        provider: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Arc<LinkHandle>> {
        self.attach_link(entity, provider, None).await
    }

    /// [`link_to`](Self::link_to); an idempotent link to `idempotent` (a partition id) when
    /// given.
    async fn attach_link(
        self: &Arc<Self>,
        entity: Entity,
        provider: Option<Arc<dyn TokenProvider>>,
        idempotent: Option<&str>,
    ) -> Result<Arc<LinkHandle>> {
        self.check_open()?;
        let publishing = idempotent.and_then(|p| Some((p, self.publishing.clone()?)));
        let request: Option<IdempotentRequest> = publishing.as_ref().map(|(p, publishing)| {
            publishing.get(p).map(|s| {
                (
                    s.producer_group_id,
                    s.owner_level,
                    s.last_published_sequence_number,
                )
            })
        });
        let target = entity.address.clone();
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(&target) {
            if !link.queue.is_closed() {
                return Ok(link.clone());
            }
        }
        if !self.authorizer.knows(&entity.audience) {
            let provider = provider.unwrap_or_else(|| self.config.provider.clone());
            self.authorizer
                .authorize(&entity.audience, provider)
                .await?;
        }
        // fe2o3 can report IllegalState for an attach right after a refused one on the same
        // session (a race over the released handle); a short pause resolves it.
        let mut attempt = 0;
        let (sender, generation) = loop {
            match self.attach_sender(&target, request.as_ref()).await {
                Err(e) if e.kind() == ErrorKind::Link && e.condition().is_none() && attempt < 3 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "attach failed locally; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        let span = tracing::info_span!("link", name = %sender.name(), target = %target);
        let cap = self
            .config
            .max_message_size
            .min(entity.max_message_size.max(1));
        let max_message_size = link::link_limit(&sender, cap);
        let _enter = span.enter();
        tracing::info!(max_message_size, "sender link attached");
        drop(_enter);
        let idem = match publishing {
            Some((partition, publishing)) => {
                let reply = idempotent_reply(&sender, &target)?;
                let sequencer = Sequencer::new(partition.to_owned(), reply);
                publishing.publish(sequencer.state());
                Some((sequencer, publishing))
            }
            None => None,
        };
        let queue = Arc::new(LinkQueue::new(max_message_size));
        let task = link::LinkTask::new(
            Arc::downgrade(self),
            target.clone(),
            entity.audience.clone(),
            sender,
            generation,
            self.config.retry.clone(),
            self.counters.clone(),
            cap,
            self.lifecycle.subscribe(),
            idem,
            queue.clone(),
            self.config.single_window,
        );
        let task = self.runtime.spawn(task.run().instrument(span));
        let handle = Arc::new(LinkHandle {
            queue,
            task: std::sync::Mutex::new(Some(task)),
        });
        links.insert(target, handle.clone());
        Ok(handle)
    }

    /// Lets go of the sender link to `target` and stops refreshing `audience`: the next
    /// [`link_to`](Self::link_to) attaches a new link (and puts a new token). Sends already
    /// queued keep their handle; the link task settles them, then detaches.
    pub(crate) async fn release_link(&self, target: &str, audience: &str) {
        let released = self.links.lock().await.remove(target);
        self.forget_routes();
        self.authorizer.forget(audience);
        drop(released);
    }

    /// Empties `routes`, so that the next send of every route takes the locked path.
    fn forget_routes(&self) {
        if let Ok(mut routes) = self.routes.write() {
            *routes = Routes::default();
        }
    }

    /// Fails with [`ErrorKind::Closed`] once `close` was called.
    pub(crate) fn check_open(&self) -> Result<()> {
        match *self.lifecycle.borrow() {
            Lifecycle::Open => Ok(()),
            _ => Err(Error::new(ErrorKind::Closed, "the producer is closed")),
        }
    }

    /// Attaches a sender to `target`, reconnecting first when the connection is gone; with
    /// `idempotent`, one that asks for idempotent publishing with that state.
    pub(crate) async fn attach_sender(
        &self,
        target: &str,
        idempotent: Option<&IdempotentRequest>,
    ) -> Result<(Sender, (u64, Lost))> {
        let ended =
            self.session.lock().await.is_ended() || self.connection.lock().await.is_closed();
        if ended {
            self.reconnect().await?;
        }
        let n = self.link_counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("hubsend-sender-{n}");
        let mut session = self.session.lock().await;
        let (generation, lost) = self.current();
        let mut builder = Sender::builder()
            .name(name)
            .target(target.to_owned())
            .sender_settle_mode(SenderSettleMode::Unsettled);
        if let Some(request) = idempotent {
            use fe2o3_amqp::types::primitives::{OrderedMap, Symbol, Value};
            builder = builder.add_desired_capabilities(idempotent::CAPABILITY);
            let mut properties = OrderedMap::new();
            if let Some((id, epoch, last)) = request {
                properties.insert(Symbol::from(idempotent::PRODUCER_ID), Value::Long(*id));
                properties.insert(Symbol::from(idempotent::EPOCH), Value::Short(*epoch));
                properties.insert(Symbol::from(idempotent::SEQUENCE), Value::Int(*last));
            }
            builder = builder.properties(properties);
        }
        let attach =
            tokio::time::timeout(self.config.operation_timeout, builder.attach(&mut session));
        // fe2o3 may not wake an attach whose connection dies under it: watch the stream.
        let lost_handle = lost.clone();
        let lost = lost.lost();
        tokio::select! {
            result = attach => result
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("attaching a sender to `{target}` timed out"),
                    )
                })?
                .map_err(|e| attach_error(e, &format!("cannot send to `{target}`")))
                .map(|sender| (sender, (generation, lost_handle))),
            () = lost => Err(Error::new(
                ErrorKind::Connection,
                format!("the connection was lost while attaching to `{target}`"),
            )),
        }
    }

    /// The current connection's generation and its loss watch.
    pub(crate) fn current(&self) -> (u64, Lost) {
        // Read under the lock that reconnect holds while it swaps both.
        let lost = self.lost.lock().map(|l| l.clone());
        let generation = self.reconnects.load(Ordering::Acquire);
        match lost {
            Ok(lost) => (generation, lost),
            // A poisoned lock: report the connection as lost so callers recover.
            Err(_) => (generation, Lost::already()),
        }
    }

    /// Opens a new connection, session and CBS link and re-authorises, unless another task
    /// already did since the old connection failed.
    async fn reconnect(&self) -> Result<()> {
        self.reconnect_from(None).await
    }

    /// Reconnects; with `Some(generation)`, also when that connection still looks alive (it
    /// stopped answering), unless another task already replaced it.
    async fn reconnect_from(&self, stale: Option<u64>) -> Result<()> {
        let _one_at_a_time = self.reconnect_lock.lock().await;
        if *self.lifecycle.borrow() == Lifecycle::Closed {
            return Err(Error::new(
                ErrorKind::Closed,
                "the producer is closed; not reconnecting",
            ));
        }
        let alive = !self.current().1.is_lost()
            && !self.session.lock().await.is_ended()
            && !self.connection.lock().await.is_closed();
        let replace_stale = stale == Some(self.reconnects.load(Ordering::Relaxed));
        if alive && !replace_stale {
            return Ok(());
        }
        tracing::info!("reconnecting");
        let _ = self.events.send(ConnectionEvent::Reconnecting);
        // Opened on the connection's runtime, whichever task noticed the loss.
        let config = self.config.clone();
        let opening = tokio_util::task::AbortOnDropHandle::new(self.runtime.spawn(async move {
            tokio::time::timeout(config.connect_timeout, open(&config)).await
        }));
        let opened = match opening.await {
            Ok(opened) => opened,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "the producer's runtime shut down; not reconnecting",
                ))
            }
        };
        let (connection, session, cbs, lost) =
            opened.map_err(|_| Error::new(ErrorKind::Timeout, "reconnecting timed out"))??;
        *self.management.lock().await = None;
        self.authorizer.set_client(cbs).await;
        // Every audience again; one the hub refuses fails its own links when they attach.
        if let Err(e) = self.authorizer.reauthorize_all().await {
            if !matches!(e.kind(), ErrorKind::Unauthorized | ErrorKind::NotFound) {
                return Err(e);
            }
            tracing::warn!(error = %e, "an audience was refused on the new connection");
        }
        *self.session.lock().await = session;
        let old = std::mem::replace(&mut *self.connection.lock().await, connection);
        drop(old);
        if let Ok(mut slot) = self.lost.lock() {
            *slot = lost;
            self.reconnects.fetch_add(1, Ordering::Release);
        }
        self.replaced
            .send_replace(self.reconnects.load(Ordering::Acquire));
        tracing::info!("reconnected");
        let _ = self.events.send(ConnectionEvent::Reconnected);
        Ok(())
    }

    /// Performs one `$management` READ and returns the response body.
    pub(crate) async fn management_read(
        &self,
        entity_type: &str,
        partition: Option<&str>,
    ) -> Result<fe2o3_amqp_types::primitives::Value> {
        let token = self.authorizer.token(&self.audience()).ok_or_else(|| {
            Error::new(ErrorKind::Unauthorized, "the hub's audience has no token")
        })?;
        let mut slot = self.management.lock().await;
        if slot.is_none() {
            let mut session = self.session.lock().await;
            *slot = Some(Management::attach(&mut session, self.config.operation_timeout).await?);
        }
        let management = slot
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Management, "management link unavailable"))?;
        let result = tokio::time::timeout(
            self.config.operation_timeout,
            management.read(entity_type, &self.config.hub, partition, token.secret()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                "the $management request timed out",
            ))
        });
        if result
            .as_ref()
            .is_err_and(|e| e.kind() != ErrorKind::NotFound)
        {
            // Replies are matched by order; after a failure start afresh.
            *slot = None;
        }
        result
    }

    /// Puts a fresh token for `audience` (a link was detached for an expired one).
    pub(crate) async fn refresh(&self, audience: &str) -> Result<SystemTime> {
        self.authorizer.refresh(audience).await
    }

    /// Closes the producer: no new sends; every queued and unsettled delivery settles (with
    /// recovery where needed) until `deadline`; whatever is still unsettled then fails with
    /// [`ErrorKind::Closed`]. Then the CBS links, session and connection close, and nothing
    /// reconnects afterwards. Returns how many callers had no outcome at the deadline.
    pub(crate) async fn close(
        &self,
        deadline: Option<Duration>,
        in_flight: impl Fn() -> usize,
    ) -> Result<usize> {
        self.lifecycle.send_if_modified(|state| {
            let open = *state == Lifecycle::Open;
            if open {
                *state = Lifecycle::Closing;
            }
            open
        });
        if let Ok(mut slot) = self.refresher.lock() {
            for task in slot.drain(..) {
                task.abort();
            }
        }
        let links: Vec<Arc<LinkHandle>> = self.links.lock().await.drain().map(|(_, l)| l).collect();
        self.forget_routes();
        let tasks: Vec<JoinHandle<()>> = links
            .iter()
            .filter_map(|l| l.task.lock().ok().and_then(|mut t| t.take()))
            .collect();
        drop(links);
        let aborts: Vec<tokio::task::AbortHandle> =
            tasks.iter().map(|t| t.abort_handle()).collect();
        let mut all = futures_util::future::join_all(tasks);
        let mut unresolved = 0;
        let drained = match deadline {
            None => {
                (&mut all).await;
                true
            }
            Some(deadline) => tokio::time::timeout(deadline, &mut all).await.is_ok(),
        };
        // From here on nothing reconnects; link tasks still running fail what they hold.
        self.lifecycle.send_replace(Lifecycle::Closed);
        if !drained {
            unresolved = in_flight();
            // A task inside a send or an attach notices within its try; don't wait that long.
            if tokio::time::timeout(CLOSED_GRACE, &mut all).await.is_err() {
                for abort in &aborts {
                    abort.abort();
                }
                all.await;
            }
        }
        if let Some(m) = self.management.lock().await.take() {
            m.close().await;
        }
        let mut connection = self.connection.lock().await;
        let mut session = self.session.lock().await;
        let _ = tokio::time::timeout(self.config.operation_timeout, session.end()).await;
        match tokio::time::timeout(self.config.operation_timeout, connection.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if !drained => tracing::debug!(error = %e, "closing the connection failed"),
            Ok(Err(e)) => {
                return Err(
                    Error::new(ErrorKind::Connection, "closing the connection failed")
                        .with_source(e),
                )
            }
            Err(_) => tracing::debug!("the hub did not answer the close"),
        }
        tracing::info!(hub = %self.config.hub, "connection closed");
        Ok(unresolved)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.refresher.lock() {
            for task in slot.drain(..) {
                task.abort();
            }
        }
    }
}

/// Opens a connection, its session and its `$cbs` links.
async fn open(
    config: &ConnectConfig,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>, MgmtClient, Lost)> {
    let dial = config.dial_host.as_deref().unwrap_or(config.host.as_str());
    let endpoint = Endpoint::new(dial, config.port)
        .tls(config.tls.clone())
        .connect_timeout(config.connect_timeout)
        .route(config.route.clone())
        .framing(config.framing.clone());
    let Connected { io, lost } = transport::connect(&endpoint).await?;
    let container_id = format!("hubsend-{}", uuid::Uuid::new_v4().simple());
    let builder = Connection::builder()
        .container_id(container_id)
        .hostname(config.host.as_str())
        .scheme("amqp")
        .max_frame_size(config.max_frame_size)
        .sasl_profile(SaslProfile::Anonymous);
    let open_error = |e: fe2o3_amqp::connection::OpenError| {
        let context = format!("opening the AMQP connection to {} failed", config.host);
        match &e {
            fe2o3_amqp::connection::OpenError::RemoteClosedWithError(err) => {
                from_amqp_error(err, &context)
            }
            _ => Error::new(ErrorKind::Connection, context).with_source(e),
        }
    };
    let mut connection = builder.open_with_stream(io).await.map_err(open_error)?;
    let mut session = Session::begin(&mut connection).await.map_err(|e| {
        Error::new(ErrorKind::Connection, "beginning the AMQP session failed").with_source(e)
    })?;
    let cbs = Authorizer::attach(&mut session).await?;
    Ok((connection, session, cbs, lost))
}

/// Keeps every audience's token fresh, and tells the application.
async fn refresh_tokens(
    authorizer: Arc<Authorizer>,
    events: tokio::sync::broadcast::Sender<ConnectionEvent>,
) {
    authorizer
        .run_refresh(|audience, result| match result {
            Ok(_) => {
                tracing::info!(audience, "token refreshed");
                let _ = events.send(ConnectionEvent::TokenRefreshed);
            }
            Err(error) => {
                tracing::warn!(audience, error = %error, "token refresh failed; retrying");
                let _ = events.send(ConnectionEvent::TokenRefreshFailed(error.to_string()));
            }
        })
        .await;
}

#[cfg(test)]
mod tests;

/// Tells the application the moment the current connection's stream ends, once per
/// connection.
async fn watch_connection(
    engine: std::sync::Weak<Engine>,
    mut replaced: tokio::sync::watch::Receiver<u64>,
) {
    loop {
        let Some((generation, lost)) = engine.upgrade().map(|e| e.current()) else {
            return;
        };
        lost.lost().await;
        let Some(e) = engine.upgrade() else {
            return;
        };
        if *e.lifecycle.borrow() == Lifecycle::Closed {
            return;
        }
        let cause = lost
            .cause()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "the connection ended".to_owned());
        tracing::warn!(%cause, "connection lost");
        let _ = e.events.send(ConnectionEvent::Disconnected { cause });
        drop(e);
        // Wait for the reconnect that replaces it.
        if replaced.wait_for(|g| *g != generation).await.is_err() {
            return;
        }
    }
}
