//! The AMQP engine behind a [`Producer`](crate::Producer): one connection and session, CBS
//! authorisation with timed token refresh, one task per sender link, and `$management` reads.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use std::time::{Duration, SystemTime};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::link::{DetachError, SendError, SenderAttachError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{self, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Batch, Data, Message, Outcome};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_types::primitives::{Symbol, Timestamp};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::auth::{AccessToken, TokenProvider};
use crate::batch::{Sections, BATCH_MESSAGE_FORMAT};
use crate::error::{Condition, Error, ErrorKind, Result};
use crate::retry::{classify, Action, RetryOptions};

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

fn outcome_result(result: std::result::Result<Outcome, SendError>) -> Result<()> {
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
    task: JoinHandle<()>,
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
                let mut waiters = waiters;
                if let Some(last) = waiters.pop() {
                    for waiter in waiters {
                        let _ = waiter.reply.send(Err(clone_error(&error)));
                    }
                    // The last caller gets the original, with its source chain.
                    let _ = last.reply.send(Err(error));
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
        let max_message_size = link_limit(&sender);
        let _enter = span.enter();
        tracing::info!(max_message_size, "sender link attached");
        drop(_enter);
        let (tx, rx) = mpsc::channel(self.queue_depth);
        let task = tokio::spawn(
            run_link(
                Arc::downgrade(self),
                target.clone(),
                sender,
                generation,
                rx,
                self.config.retry.clone(),
            )
            .instrument(span),
        );
        let handle = Arc::new(LinkHandle {
            tx,
            max_message_size,
            task,
        });
        links.insert(target, handle.clone());
        Ok(handle)
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

    /// Drains every link, then closes the CBS links, session and connection.
    pub(crate) async fn close(&self) -> Result<()> {
        if let Ok(mut slot) = self.refresher.lock() {
            if let Some(task) = slot.take() {
                task.abort();
            }
        }
        let links: Vec<Arc<LinkHandle>> = self.links.lock().await.drain().map(|(_, l)| l).collect();
        for link in links {
            match Arc::try_unwrap(link) {
                Ok(link) => {
                    drop(link.tx);
                    let _ = link.task.await;
                }
                Err(shared) => {
                    // A concurrent send still holds it; its task ends when that send is done.
                    tracing::debug!(
                        still_shared = Arc::strong_count(&shared),
                        "link shared at close"
                    );
                }
            }
        }
        if let Some(m) = self.management.lock().await.take() {
            m.close().await;
        }
        let mut connection = self.connection.lock().await;
        let mut session = self.session.lock().await;
        let _ = session.end().await;
        connection.close().await.map_err(|e| {
            Error::new(ErrorKind::Connection, "closing the connection failed").with_source(e)
        })?;
        tracing::info!(hub = %self.config.hub, "connection closed");
        Ok(())
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
            let description = status.description.unwrap_or_default();
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

/// One delivery the hub has not settled yet, kept so it can be sent again.
struct InFlight {
    /// The delivery's events, compact; the fe2o3 message is built from them for each send.
    sections: Sections,
    /// Every caller whose events this delivery carries.
    waiters: Vec<Waiter>,
    attempts: u32,
    /// When it was first handed to a link (for the overall deadline).
    first_sent: tokio::time::Instant,
    /// When it was last handed to a link (for the per-try timeout).
    last_sent: tokio::time::Instant,
}

type Outcomes = FuturesOrdered<DeliveryFut<std::result::Result<Outcome, SendError>>>;

/// Drains one sender link. Each message is handed to fe2o3 (which waits for credit) and kept
/// until the hub settles it; outcomes come back in order. A throttled delivery is retried
/// after a back-off; a lost link or connection is recovered and every unsettled delivery
/// is sent again, in its original order (see [`crate::retry`]).
async fn run_link(
    engine: Weak<Engine>,
    target: String,
    mut sender: Sender,
    mut generation: u64,
    mut rx: mpsc::Receiver<Outgoing>,
    retry: RetryOptions,
) {
    let counters = match engine.upgrade() {
        Some(e) => e.counters.clone(),
        None => return,
    };
    let mut unsettled: VecDeque<InFlight> = VecDeque::new();
    let mut outcomes: Outcomes = FuturesOrdered::new();
    let mut open = true;
    // A message taken off the queue that could not join the delivery before it.
    let mut carried: Option<Outgoing> = None;
    let mut limit = link_limit(&sender);
    loop {
        if !open && unsettled.is_empty() {
            break;
        }
        let mut lost: Option<Error> = None;
        tokio::select! {
            biased;
            Some(result) = outcomes.next(), if !outcomes.is_empty() => {
                let Some(mut item) = unsettled.pop_front() else { continue };
                match outcome_result(result) {
                    Ok(()) => {
                        counters.settle(item.waiters, Ok(()));
                    }
                    Err(error) => match classify(&error) {
                        Action::Retry
                            if item.attempts < retry.max_retries
                                && item.first_sent.elapsed() < retry.deadline =>
                        {
                            item.attempts += 1;
                            item.last_sent = tokio::time::Instant::now();
                            counters.retried.fetch_add(item.waiters.len() as u64, Ordering::Relaxed);
                            let delay = retry.delay(item.attempts);
                            tracing::debug!(error = %error, attempt = item.attempts, ?delay, "retrying a delivery");
                            tokio::time::sleep(delay).await;
                            match send_unless_lost(&mut sender, &item.sections, &engine, generation, retry.try_timeout).await {
                                Ok(fut) => {
                                    outcomes.push_back(fut);
                                    unsettled.push_back(item);
                                }
                                Err(e) => {
                                    unsettled.push_back(item);
                                    lost = Some(e);
                                }
                            }
                        }
                        Action::Reattach => {
                            unsettled.push_front(item);
                            lost = Some(error);
                        }
                        _ => {
                            counters.settle(item.waiters, Err(error));
                        }
                    },
                }
            }
            () = tokio::time::sleep_until(
                unsettled.front().map(|i| i.last_sent).unwrap_or_else(tokio::time::Instant::now) + retry.try_timeout
            ), if !unsettled.is_empty() => {
                lost = Some(Error::new(
                    ErrorKind::Timeout,
                    format!("no outcome from the hub within {:?}", retry.try_timeout),
                ));
            }
            () = connection_lost(&engine, generation), if !unsettled.is_empty() => {
                lost = Some(Error::new(ErrorKind::Connection, "the connection was lost"));
            }
            message = next_outgoing(&mut carried, &mut rx), if open => match message {
                None => open = false,
                Some(out) => {
                    let (sections, waiters) = coalesce(out, &mut rx, &mut carried, limit);
                    let item = InFlight {
                        sections,
                        waiters,
                        attempts: 0,
                        first_sent: tokio::time::Instant::now(),
                        last_sent: tokio::time::Instant::now(),
                    };
                    match send_unless_lost(&mut sender, &item.sections, &engine, generation, retry.try_timeout).await {
                        Ok(fut) => {
                            tracing::trace!(callers = item.waiters.len(), "transfer sent");
                            outcomes.push_back(fut);
                            unsettled.push_back(item);
                        }
                        Err(e) if e.kind() == ErrorKind::MessageTooLarge => {
                            counters.settle(item.waiters, Err(e));
                        }
                        Err(e) => {
                            unsettled.push_back(item);
                            lost = Some(e);
                        }
                    }
                }
            },
        }
        if let Some(error) = lost {
            settle_ready(&mut outcomes, &mut unsettled, &counters);
            expire(&mut unsettled, &retry, &counters);
            match recover(&engine, &target, &retry, error, &mut unsettled).await {
                Ok((new_sender, new_generation, fresh)) => {
                    sender = new_sender;
                    limit = link_limit(&sender);
                    generation = new_generation;
                    outcomes = fresh;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "giving up on the link");
                    if let Some(e) = engine.upgrade() {
                        let _ = e.events.send(ConnectionEvent::GaveUp {
                            target: target.clone(),
                            error: error.to_string(),
                        });
                    }
                    for item in unsettled.drain(..) {
                        counters.settle(item.waiters, Err(clone_error(&error)));
                    }
                    rx.close();
                    for out in carried
                        .take()
                        .into_iter()
                        .chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    {
                        counters.settle(vec![out.waiter], Err(clone_error(&error)));
                    }
                    return;
                }
            }
        }
    }
    let _ = sender.close().await;
}

/// The largest message a sender link takes. The service always announces its limit; a
/// silent peer (or one announcing 0, "no limit") gets Event Hubs' standard 1 MB.
fn link_limit(sender: &Sender) -> u64 {
    match sender.max_message_size() {
        Some(0) | None => 1024 * 1024,
        Some(limit) => limit,
    }
}

/// The message carried over from the last coalescing pass, else the next one queued.
async fn next_outgoing(
    carried: &mut Option<Outgoing>,
    rx: &mut mpsc::Receiver<Outgoing>,
) -> Option<Outgoing> {
    match carried.take() {
        Some(out) => Some(out),
        None => rx.recv().await,
    }
}

/// Packs the single-event sends queued right behind `first` into its delivery, in order, as
/// long as they share its partition key and the message stays within `limit` bytes. Under
/// load this turns a stream of `send` calls into full batch messages (one transfer, one
/// outcome for all of them); with nothing queued, `first` goes out alone and at once.
fn coalesce(
    first: Outgoing,
    rx: &mut mpsc::Receiver<Outgoing>,
    carried: &mut Option<Outgoing>,
    limit: u64,
) -> (Sections, Vec<Waiter>) {
    let mut sections = first.sections;
    let mut waiters = vec![first.waiter];
    if first.mergeable {
        while let Ok(next) = rx.try_recv() {
            if next.mergeable && sections.can_absorb(&next.sections, limit) {
                sections.absorb(next.sections);
                waiters.push(next.waiter);
            } else {
                *carried = Some(next);
                break;
            }
        }
    }
    (sections, waiters)
}

/// The fe2o3 message for one delivery. It lives only until fe2o3 has serialised it, so the
/// per-event buffers it needs are allocated and freed on this task.
fn sendable(sections: &Sections) -> Sendable<Batch<Data>> {
    Sendable::builder()
        .message(sections.to_message())
        .message_format(BATCH_MESSAGE_FORMAT)
        .build()
}

/// Hands one message to fe2o3, unless the connection is lost while it waits for credit
/// (fe2o3 would otherwise wait for credit forever on a dead link).
async fn send_unless_lost(
    sender: &mut Sender,
    sections: &Sections,
    engine: &Weak<Engine>,
    generation: u64,
    try_timeout: Duration,
) -> Result<DeliveryFut<std::result::Result<Outcome, SendError>>> {
    let sendable = sendable(sections);
    tokio::select! {
        // Biased: when credit is there the send completes on its first poll, and the two
        // watchdog timers below are never registered.
        biased;
        result = sender.send_batchable_ref(&sendable) => result.map_err(|e| send_error(e, "sending failed")),
        () = connection_lost(engine, generation) => Err(Error::new(ErrorKind::Connection, "the connection was lost")),
        // No credit within a try: a silently dead connection looks exactly like this.
        () = tokio::time::sleep(try_timeout) => Err(Error::new(
            ErrorKind::Timeout,
            format!("the hub granted no link credit within {try_timeout:?}"),
        )),
    }
}

/// Resolves once the connection of `generation` is gone.
async fn connection_lost(engine: &Weak<Engine>, generation: u64) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match engine.upgrade() {
            Some(engine) if !engine.is_lost(generation).await => {}
            _ => return,
        }
    }
}

/// Settles, in order, the outcomes that already arrived as accepted (or as final failures),
/// so that recovery resends only what the hub has not settled.
fn settle_ready(outcomes: &mut Outcomes, unsettled: &mut VecDeque<InFlight>, counters: &Counters) {
    while let Some(Some(result)) = outcomes.next().now_or_never() {
        match outcome_result(result) {
            Ok(()) => {
                if let Some(item) = unsettled.pop_front() {
                    counters.settle(item.waiters, Ok(()));
                }
            }
            Err(error) if classify(&error) == Action::Fail => {
                if let Some(item) = unsettled.pop_front() {
                    counters.settle(item.waiters, Err(error));
                }
            }
            Err(_) => break,
        }
    }
}

/// Fails the deliveries that have used up their overall deadline.
fn expire(unsettled: &mut VecDeque<InFlight>, retry: &RetryOptions, counters: &Counters) {
    let (expired, kept): (VecDeque<InFlight>, VecDeque<InFlight>) = unsettled
        .drain(..)
        .partition(|item| item.first_sent.elapsed() >= retry.deadline);
    *unsettled = kept;
    for item in expired {
        counters.settle(
            item.waiters,
            Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "the delivery was not stored within its {:?} deadline",
                    retry.deadline
                ),
            )),
        );
    }
}

/// Re-attaches the link (reconnecting when the connection is gone) and resends every
/// unsettled delivery in order, retrying with back-off.
async fn recover(
    engine: &Weak<Engine>,
    target: &str,
    retry: &RetryOptions,
    cause: Error,
    unsettled: &mut VecDeque<InFlight>,
) -> Result<(Sender, u64, Outcomes)> {
    tracing::warn!(error = %cause, unsettled = unsettled.len(), "sender link lost; recovering");
    let mut last = cause;
    for attempt in 1..=retry.max_retries.max(1) {
        if attempt > 1 {
            tokio::time::sleep(retry.delay(attempt - 1)).await;
        }
        let Some(engine) = engine.upgrade() else {
            return Err(Error::new(
                ErrorKind::Closed,
                "the producer was dropped during recovery",
            ));
        };
        if last.kind() == ErrorKind::Unauthorized {
            // The hub detached the link because the token ran out: put a fresh one first.
            // If the hub refuses it, the credentials are wrong and retrying cannot help.
            if let Err(e) = engine.put_token().await {
                if e.kind() == ErrorKind::Unauthorized {
                    return Err(e);
                }
                last = e;
                continue;
            }
        }
        let (mut sender, generation) = match engine.attach_sender(target).await {
            Ok(attached) => attached,
            Err(e) if classify(&e) == Action::Fail => return Err(e),
            Err(e) if e.kind() == ErrorKind::Timeout => {
                // The connection takes attaches but does not answer: replace it.
                tracing::warn!(error = %e, "the connection stopped answering; replacing it");
                let stale = engine.reconnects.load(Ordering::Relaxed);
                last = match engine.reconnect_from(Some(stale)).await {
                    Ok(()) => {
                        Error::new(ErrorKind::Connection, "replaced an unresponsive connection")
                    }
                    Err(e) => e,
                };
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, "recovery attempt failed");
                last = e;
                continue;
            }
        };
        let mut outcomes: Outcomes = FuturesOrdered::new();
        let mut failed = None;
        for item in unsettled.iter_mut() {
            item.last_sent = tokio::time::Instant::now();
            match sender.send_batchable_ref(&sendable(&item.sections)).await {
                Ok(fut) => outcomes.push_back(fut),
                Err(e) => {
                    failed = Some(send_error(e, "resending failed"));
                    break;
                }
            }
        }
        match failed {
            None => {
                engine.recoveries.fetch_add(1, Ordering::Relaxed);
                engine
                    .counters
                    .retried
                    .fetch_add(unsettled.len() as u64, Ordering::Relaxed);
                tracing::info!(resent = unsettled.len(), "sender link recovered");
                let _ = engine.events.send(ConnectionEvent::LinkRecovered {
                    target: target.to_owned(),
                    resent: unsettled.len(),
                });
                return Ok((sender, generation, outcomes));
            }
            Some(e) => last = e,
        }
    }
    Err(last)
}

fn clone_error(e: &Error) -> Error {
    let copy = Error::new(e.kind(), e.message().to_owned());
    match e.condition() {
        Some(c) => copy.with_condition(c.clone()),
        None => copy,
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
                format!("$management READ {entity_type}: {description}"),
            )
            .with_condition(Condition::NotFound)),
            401 | 403 => Err(Error::new(
                ErrorKind::Unauthorized,
                format!("$management READ {entity_type}: {description}"),
            )
            .with_condition(Condition::UnauthorizedAccess)),
            other => Err(Error::new(
                ErrorKind::Management,
                format!("$management READ {entity_type} answered {other}: {description}"),
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
