//! The AMQP engine behind a [`Producer`](crate::Producer): one connection and session, CBS
//! authorisation with timed token refresh, one task per sender link, and `$management` reads.

mod ledger;
mod link;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::{Duration, SystemTime};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{DetachError, SendError, SenderAttachError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{self, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Message, Outcome};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_types::primitives::{Symbol, Timestamp};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::auth::{AccessToken, TokenProvider};
use crate::batch::Sections;
use crate::error::{Condition, Error, ErrorKind, Result};
use crate::retry::RetryOptions;

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct ConnectConfig {
    pub(crate) host: String,
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

/// Maps a fe2o3 AMQP error (condition + description) to ours.
pub(crate) fn from_amqp_error(error: &definitions::Error, context: &str) -> Error {
    let symbol = serde_amqp::to_vec(&error.condition)
        .ok()
        .and_then(|bytes| serde_amqp::from_slice::<Symbol>(&bytes).ok())
        .map(|s| s.0)
        .unwrap_or_else(|| "amqp:internal-error".to_owned());
    Error::from_condition(
        Condition::from_symbol(&symbol),
        error.description.as_deref(),
        context,
    )
}

fn stop_reason_error(reason: &fe2o3_amqp::link::SessionStopReason, context: &str) -> Error {
    use fe2o3_amqp::connection::ConnectionStopReason as C;
    use fe2o3_amqp::link::SessionStopReason as S;
    match reason {
        S::EndedWithError(e) | S::RemoteEndedWithError(e) => from_amqp_error(e, context),
        S::ConnectionStopped(C::ClosedWithError(e) | C::RemoteClosedWithError(e)) => {
            from_amqp_error(e, context)
        }
        _ => Error::new(
            ErrorKind::Connection,
            format!("{context}: the connection or session ended"),
        ),
    }
}

fn detach_error(error: &DetachError, context: &str) -> Error {
    match error {
        DetachError::RemoteDetachedWithError(e) | DetachError::RemoteClosedWithError(e) => {
            from_amqp_error(e, context)
        }
        DetachError::SessionStopped(reason) => stop_reason_error(reason, context),
        _ => Error::new(
            ErrorKind::Link,
            format!("{context}: the hub detached the link"),
        ),
    }
}

pub(crate) fn send_error(error: SendError, context: &str) -> Error {
    use fe2o3_amqp::link::LinkStateError as L;
    match error {
        SendError::LinkStateError(L::RemoteDetachedWithError(e) | L::RemoteClosedWithError(e)) => {
            from_amqp_error(&e, context)
        }
        SendError::LinkStateError(L::SessionStopped(reason)) => stop_reason_error(&reason, context),
        SendError::Detached(d) => detach_error(&d, context),
        SendError::MessageSizeExceeded(e) => {
            Error::new(ErrorKind::MessageTooLarge, format!("{context}: {e}")).with_source(e)
        }
        other => Error::new(ErrorKind::Link, format!("{context}: {other}")).with_source(other),
    }
}

fn attach_error(error: SenderAttachError, context: &str) -> Error {
    match error {
        SenderAttachError::RemoteClosedWithError(e) => from_amqp_error(&e, context),
        SenderAttachError::SessionStopped(reason) => stop_reason_error(&reason, context),
        other => Error::new(ErrorKind::Link, format!("{context}: {other}")).with_source(other),
    }
}

pub(crate) fn outcome_result(result: std::result::Result<Outcome, SendError>) -> Result<()> {
    match result {
        Ok(Outcome::Accepted(_)) => Ok(()),
        Ok(Outcome::Rejected(rejected)) => Err(match rejected.error {
            Some(e) => from_amqp_error(&e, "the hub rejected the delivery"),
            None => Error::new(ErrorKind::Rejected, "the hub rejected the delivery"),
        }),
        Ok(Outcome::Released(_)) => Err(Error::new(
            ErrorKind::NotStored,
            "the hub released the delivery without storing it",
        )),
        Ok(Outcome::Modified(_)) => Err(Error::new(
            ErrorKind::NotStored,
            "the hub returned the delivery as modified without storing it",
        )),
        #[allow(unreachable_patterns)]
        Ok(_) => Err(Error::new(
            ErrorKind::Protocol,
            "the hub settled the delivery with an unexpected state",
        )),
        Err(e) => Err(send_error(e, "delivery failed")),
    }
}

/// One message on its way to a sender link, with the caller's reply slot.
pub(crate) struct Outgoing {
    pub(crate) sections: Sections,
    /// Whether the link may pack this into one delivery with the messages queued right
    /// behind it (single-event sends; a caller's own batch always goes as built).
    pub(crate) mergeable: bool,
    pub(crate) waiter: Waiter,
}

/// A caller waiting for the outcome of (part of) a delivery, and the in-flight permits it holds.
pub(crate) struct Waiter {
    pub(crate) reply: oneshot::Sender<Result<()>>,
    /// Released when the caller's outcome is settled.
    pub(crate) _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// A live sender link: its queue and the task that drains it.
pub(crate) struct LinkHandle {
    pub(crate) tx: mpsc::Sender<Outgoing>,
    pub(crate) max_message_size: u64,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The connection a producer owns.
pub(crate) struct Engine {
    config: ConnectConfig,
    connection: Mutex<ConnectionHandle<()>>,
    session: Mutex<SessionHandle<()>>,
    cbs: Mutex<CbsClient>,
    links: Mutex<HashMap<String, Arc<LinkHandle>>>,
    management: Mutex<Option<Management>>,
    token: Mutex<AccessToken>,
    link_counter: AtomicU64,
    refresher: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// How many messages may wait in a link's queue.
    queue_depth: usize,
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
}

impl Counters {
    /// Hands a final outcome to every caller waiting on one delivery, and counts it once per
    /// caller (a delivery can carry several single-event sends).
    fn settle(&self, waiters: Vec<Waiter>, result: Result<()>) {
        let counter = if result.is_ok() {
            &self.accepted
        } else {
            &self.failed
        };
        counter.fetch_add(waiters.len() as u64, Ordering::Relaxed);
        match result {
            Ok(()) => {
                for waiter in waiters {
                    let _ = waiter.reply.send(Ok(()));
                }
            }
            Err(error) => {
                for waiter in waiters {
                    let _ = waiter.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// A change in a producer's connection, delivered by [`Producer::subscribe`](crate::Producer::subscribe).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
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
    /// The audience every token is put for: the hub, which covers its partitions.
    pub(crate) fn audience(&self) -> String {
        hub_audience(&self.config)
    }

    pub(crate) fn hub(&self) -> &str {
        &self.config.hub
    }

    /// Opens the connection and session and authorises the hub audience.
    pub(crate) async fn connect(config: ConnectConfig, queue_depth: usize) -> Result<Arc<Engine>> {
        let span = tracing::info_span!("connection", host = %config.host, port = config.port, hub = %config.hub);
        async move {
            let timeout = config.connect_timeout;
            let (connection, session, cbs, token) = tokio::time::timeout(timeout, open(&config))
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
            tracing::info!("connected");
            let engine = Arc::new(Engine {
                config,
                connection: Mutex::new(connection),
                session: Mutex::new(session),
                cbs: Mutex::new(cbs),
                links: Mutex::new(HashMap::new()),
                management: Mutex::new(None),
                token: Mutex::new(token),
                link_counter: AtomicU64::new(0),
                refresher: std::sync::Mutex::new(None),
                queue_depth,
                reconnect_lock: Mutex::new(()),
                reconnects: AtomicU64::new(0),
                recoveries: AtomicU64::new(0),
                counters: Arc::new(Counters::default()),
                events: tokio::sync::broadcast::channel(64).0,
                lifecycle: tokio::sync::watch::channel(Lifecycle::Open).0,
            });
            let refresher = tokio::spawn(
                refresh_tokens(Arc::downgrade(&engine)).instrument(tracing::Span::current()),
            );
            if let Ok(mut slot) = engine.refresher.lock() {
                *slot = Some(refresher);
            }
            Ok(engine)
        }
        .instrument(span)
        .await
    }

    /// The sender link for `target` (the hub or `hub/Partitions/N`), attached on first use.
    pub(crate) async fn link(self: &Arc<Self>, partition: Option<&str>) -> Result<Arc<LinkHandle>> {
        let target = match partition {
            Some(id) => format!("{}/Partitions/{}", self.config.hub, id),
            None => self.config.hub.clone(),
        };
        self.check_open()?;
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(&target) {
            if !link.tx.is_closed() {
                return Ok(link.clone());
            }
        }
        // fe2o3 can report IllegalState for an attach right after a refused one on the same
        // session (a race over the released handle); a short pause resolves it.
        let mut attempt = 0;
        let (sender, generation) = loop {
            match self.attach_sender(&target).await {
                Err(e) if e.kind() == ErrorKind::Link && e.condition().is_none() && attempt < 3 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "attach failed locally; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        let span = tracing::info_span!("link", name = %sender.name(), target = %target);
        let max_message_size = link::link_limit(&sender, self.config.max_message_size);
        let _enter = span.enter();
        tracing::info!(max_message_size, "sender link attached");
        drop(_enter);
        let (tx, rx) = mpsc::channel(self.queue_depth);
        let task = link::LinkTask::new(
            Arc::downgrade(self),
            target.clone(),
            sender,
            generation,
            self.config.retry.clone(),
            self.counters.clone(),
            self.config.max_message_size,
            self.lifecycle.subscribe(),
        );
        let task = tokio::spawn(task.run(rx).instrument(span));
        let handle = Arc::new(LinkHandle {
            tx,
            max_message_size,
            task: std::sync::Mutex::new(Some(task)),
        });
        links.insert(target, handle.clone());
        Ok(handle)
    }

    /// Fails with [`ErrorKind::Closed`] once `close` was called.
    pub(crate) fn check_open(&self) -> Result<()> {
        match *self.lifecycle.borrow() {
            Lifecycle::Open => Ok(()),
            _ => Err(Error::new(ErrorKind::Closed, "the producer is closed")),
        }
    }

    /// Attaches a sender to `target`, reconnecting first when the connection is gone.
    pub(crate) async fn attach_sender(&self, target: &str) -> Result<(Sender, u64)> {
        let ended =
            self.session.lock().await.is_ended() || self.connection.lock().await.is_closed();
        if ended {
            self.reconnect().await?;
        }
        let n = self.link_counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("hubsend-sender-{n}");
        let mut session = self.session.lock().await;
        let generation = self.reconnects.load(Ordering::Relaxed);
        let attach = tokio::time::timeout(
            self.config.operation_timeout,
            Sender::builder()
                .name(name)
                .target(target.to_owned())
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .attach(&mut session),
        );
        // fe2o3 may not wake an attach whose connection dies under it: watch the connection.
        let lost = self.connection_closed();
        tokio::select! {
            result = attach => result
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("attaching a sender to `{target}` timed out"),
                    )
                })?
                .map_err(|e| attach_error(e, &format!("cannot send to `{target}`")))
                .map(|sender| (sender, generation)),
            () = lost => Err(Error::new(
                ErrorKind::Connection,
                format!("the connection was lost while attaching to `{target}`"),
            )),
        }
    }

    /// Resolves once the current connection has closed.
    async fn connection_closed(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if self.connection.lock().await.is_closed() {
                return;
            }
        }
    }

    /// Whether the connection of `generation` is gone (replaced, closed or its session ended).
    async fn is_lost(&self, generation: u64) -> bool {
        if self.reconnects.load(Ordering::Relaxed) != generation {
            return true;
        }
        // The session lock is held during attaches; don't wait for it, the connection tells.
        let session_ended = self
            .session
            .try_lock()
            .map(|s| s.is_ended())
            .unwrap_or(false);
        session_ended || self.connection.lock().await.is_closed()
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
        let alive =
            !self.session.lock().await.is_ended() && !self.connection.lock().await.is_closed();
        let replace_stale = stale == Some(self.reconnects.load(Ordering::Relaxed));
        if alive && !replace_stale {
            return Ok(());
        }
        tracing::info!("reconnecting");
        let _ = self.events.send(ConnectionEvent::Reconnecting);
        let (connection, session, cbs, token) =
            tokio::time::timeout(self.config.connect_timeout, open(&self.config))
                .await
                .map_err(|_| Error::new(ErrorKind::Timeout, "reconnecting timed out"))??;
        *self.management.lock().await = None;
        *self.cbs.lock().await = cbs;
        *self.token.lock().await = token;
        *self.session.lock().await = session;
        let old = std::mem::replace(&mut *self.connection.lock().await, connection);
        drop(old);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
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
        let token = self.token.lock().await.clone();
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

    /// Sends the current token for the hub audience again (a refresh).
    async fn put_token(&self) -> Result<SystemTime> {
        let audience = self.audience();
        let token = self.config.provider.token(&audience).await?;
        let expires = token.expires_at();
        let mut cbs = self.cbs.lock().await;
        tokio::select! {
            result = put_token(&mut cbs, &audience, &token, self.config.operation_timeout) => result?,
            // A put-token on a dead connection would hold the CBS lock until it timed out and
            // block the reconnect that replaces it.
            () = self.connection_closed() => {
                return Err(Error::new(ErrorKind::Connection, "the connection closed during put-token"));
            }
        }
        *self.token.lock().await = token;
        Ok(expires)
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
            if let Some(task) = slot.take() {
                task.abort();
            }
        }
        let links: Vec<Arc<LinkHandle>> = self.links.lock().await.drain().map(|(_, l)| l).collect();
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
            if let Some(task) = slot.take() {
                task.abort();
            }
        }
    }
}

fn hub_audience(config: &ConnectConfig) -> String {
    format!("sb://{}/{}", config.host, config.hub)
}

async fn open(
    config: &ConnectConfig,
) -> Result<(
    ConnectionHandle<()>,
    SessionHandle<()>,
    CbsClient,
    AccessToken,
)> {
    let tcp = TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot reach {}:{}", config.host, config.port),
            )
            .with_source(e)
        })?;
    let _ = tcp.set_nodelay(true);
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
    let mut connection = match &config.tls {
        Some(tls) => {
            let stream = crate::tls::connect(tls.clone(), &config.host, tcp).await?;
            builder.open_with_stream(stream).await.map_err(open_error)?
        }
        None => builder.open_with_stream(tcp).await.map_err(open_error)?,
    };
    let mut session = Session::begin(&mut connection).await.map_err(|e| {
        Error::new(ErrorKind::Connection, "beginning the AMQP session failed").with_source(e)
    })?;
    let mut cbs = CbsClient::builder()
        .client_node_addr(format!("hubsend-cbs-{}", uuid::Uuid::new_v4().simple()))
        .attach(&mut session)
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Link, "attaching the $cbs links failed").with_source(e)
        })?;
    let audience = hub_audience(config);
    let token = config.provider.token(&audience).await?;
    put_token(&mut cbs, &audience, &token, config.operation_timeout).await?;
    Ok((connection, session, cbs, token))
}

async fn put_token(
    cbs: &mut CbsClient,
    audience: &str,
    token: &AccessToken,
    timeout: Duration,
) -> Result<()> {
    let expires_ms = token
        .expires_at()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let cbs_token = CbsToken::new(
        token.secret(),
        token.token_type().as_str(),
        Some(Timestamp::from_milliseconds(expires_ms)),
    );
    let result = tokio::time::timeout(timeout, cbs.put_token(audience, cbs_token))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("put-token for `{audience}` timed out"),
            )
        })?;
    match result {
        Ok(()) => {
            tracing::debug!(audience, "token accepted");
            Ok(())
        }
        Err(fe2o3_amqp_management::error::Error::Status(status)) => {
            let code = status.code.0.get();
            let description = crate::error::sanitize(&status.description.unwrap_or_default());
            let kind = match code {
                401 | 403 => ErrorKind::Unauthorized,
                404 => ErrorKind::NotFound,
                _ => ErrorKind::Connection,
            };
            tracing::warn!(audience, code, "token refused");
            Err(Error::new(
                kind,
                format!(
                    "the hub refused the token for audience `{audience}` ({code}): {description}"
                ),
            ))
        }
        Err(e) => Err(Error::new(
            ErrorKind::Connection,
            format!("put-token for `{audience}` failed"),
        )
        .with_source(e)),
    }
}

/// When to put a fresh token: after 80 % of its lifetime, and at least 5 minutes before expiry
/// when the lifetime allows it, but never before half of it has passed.
pub(crate) fn refresh_delay(now: SystemTime, expires_at: SystemTime) -> Duration {
    let lifetime = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    lifetime
        .mul_f64(0.8)
        .min(lifetime.saturating_sub(Duration::from_secs(300)))
        .max(lifetime / 2)
}

async fn refresh_tokens(engine: std::sync::Weak<Engine>) {
    let mut expires_at = match engine.upgrade() {
        Some(e) => e.token.lock().await.expires_at(),
        None => return,
    };
    loop {
        let delay = refresh_delay(SystemTime::now(), expires_at);
        tokio::time::sleep(delay.max(Duration::from_millis(200))).await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match engine.put_token().await {
            Ok(next) => {
                tracing::info!(audience = %engine.audience(), "token refreshed");
                let _ = engine.events.send(ConnectionEvent::TokenRefreshed);
                expires_at = next;
            }
            Err(error) => {
                tracing::warn!(error = %error, "token refresh failed; retrying");
                let _ = engine
                    .events
                    .send(ConnectionEvent::TokenRefreshFailed(error.to_string()));
                // Try again well before the old token runs out.
                let remaining = expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep((remaining / 4).min(Duration::from_secs(30))).await;
                if remaining.is_zero() {
                    // Keep the loop alive; a later success revives new links.
                    expires_at = SystemTime::now() + Duration::from_secs(5);
                }
            }
        }
    }
}

/// The `$management` request/response link pair.
struct Management {
    sender: Sender,
    receiver: Receiver,
    reply_to: String,
    next_id: u64,
}

impl Management {
    async fn attach(session: &mut SessionHandle<()>, timeout: Duration) -> Result<Management> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let reply_to = format!("hubsend-mgmt-{id}");
        let attach = async {
            let sender = Sender::builder()
                .name(format!("{reply_to}-sender"))
                .target("$management")
                .attach(session)
                .await
                .map_err(|e| attach_error(e, "attaching to $management failed"))?;
            let receiver = Receiver::builder()
                .name(format!("{reply_to}-receiver"))
                .source("$management")
                .target(reply_to.clone())
                .attach(session)
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Management, "attaching to $management failed")
                        .with_source(e)
                })?;
            Ok::<_, Error>((sender, receiver))
        };
        let (sender, receiver) = tokio::time::timeout(timeout, attach)
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "attaching to $management timed out"))??;
        Ok(Management {
            sender,
            receiver,
            reply_to,
            next_id: 0,
        })
    }

    async fn read(
        &mut self,
        entity_type: &str,
        hub: &str,
        partition: Option<&str>,
        token: &str,
    ) -> Result<fe2o3_amqp_types::primitives::Value> {
        use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, MessageId, Properties};
        use fe2o3_amqp_types::primitives::{SimpleValue, Value};
        self.next_id += 1;
        let id = self.next_id;
        let mut props = ApplicationProperties::builder()
            .insert("operation", "READ")
            .insert("type", entity_type)
            .insert("name", hub)
            .insert("security_token", token);
        if let Some(p) = partition {
            props = props.insert("partition", p);
        }
        let message = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::Ulong(id)),
                reply_to: Some(self.reply_to.clone()),
                ..Properties::default()
            })
            .application_properties(props.build())
            .value(Value::Null)
            .build();
        let outcome = self
            .sender
            .send(message)
            .await
            .map_err(|e| send_error(e, "the $management request failed"))?;
        if !matches!(outcome, Outcome::Accepted(_)) {
            return Err(Error::new(
                ErrorKind::Management,
                "the $management node did not accept the request",
            ));
        }
        let delivery = self.receiver.recv::<Body<Value>>().await.map_err(|e| {
            Error::new(
                ErrorKind::Management,
                "reading the $management reply failed",
            )
            .with_source(e)
        })?;
        let _ = self.receiver.accept(&delivery).await;
        let message = delivery.into_message();
        let app = message
            .application_properties
            .map(|a| a.0)
            .unwrap_or_default();
        let status = ["status-code", "statusCode"]
            .iter()
            .find_map(|k| app.get(*k))
            .and_then(|v| match v {
                SimpleValue::Int(v) => Some(*v as i64),
                SimpleValue::Uint(v) => Some(*v as i64),
                SimpleValue::Long(v) => Some(*v),
                SimpleValue::Ushort(v) => Some(*v as i64),
                SimpleValue::Short(v) => Some(*v as i64),
                _ => None,
            })
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Management,
                    "the $management reply has no status code",
                )
            })?;
        let description = ["status-description", "statusDescription"]
            .iter()
            .find_map(|k| app.get(*k))
            .and_then(|v| match v {
                SimpleValue::String(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        match status {
            200 => match message.body {
                Body::Value(v) => Ok(v.0),
                _ => Err(Error::new(
                    ErrorKind::Management,
                    "the $management reply has no value body",
                )),
            },
            404 => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "$management READ {entity_type}: {}",
                    crate::error::sanitize(&description)
                ),
            )
            .with_condition(Condition::NotFound)),
            401 | 403 => Err(Error::new(
                ErrorKind::Unauthorized,
                format!(
                    "$management READ {entity_type}: {}",
                    crate::error::sanitize(&description)
                ),
            )
            .with_condition(Condition::UnauthorizedAccess)),
            other => Err(Error::new(
                ErrorKind::Management,
                format!(
                    "$management READ {entity_type} answered {other}: {}",
                    crate::error::sanitize(&description)
                ),
            )),
        }
    }

    async fn close(self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_happens_well_before_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = refresh_delay(now, now + Duration::from_secs(3600));
        assert_eq!(hour, Duration::from_secs(2880));
        let short = refresh_delay(now, now + Duration::from_secs(4));
        assert_eq!(short, Duration::from_secs(2));
        assert_eq!(refresh_delay(now, now), Duration::ZERO);
    }
}
