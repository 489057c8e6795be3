//! The server: listener, SASL, per-connection/session tasks, `$cbs`, `$management` and
//! producer links, and the event store they write to.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fe2o3_amqp::{
    acceptor::SupportedReceiverSettleModes,
    acceptor::{
        sasl_acceptor::SaslServerFrame, ConnectionAcceptor, LinkAcceptor, LinkEndpoint,
        ListenerSessionHandle, SaslAcceptor, SessionAcceptor,
    },
    link::{delivery::DeliveryInfo, receiver::CreditMode},
    Receiver, Sender,
};
use fe2o3_amqp_types::{
    definitions::{self, ErrorCondition, Fields, ReceiverSettleMode, Role},
    messaging::{
        message::__private::Serializable, AmqpValue, ApplicationProperties, Body, Message,
        Properties, TargetArchetype,
    },
    performatives::Attach,
    primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value},
    sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, Notify},
    time::Instant,
};

use crate::{
    faults::{ConnCommand, FaultShared},
    hash, raw,
    sas::{self, covers, normalise},
    store::{BufferPool, DeliveryMeta, EventRef, HubStore, StoredEvent},
    wire::{is_request_node, Captured, Wire, WireControl},
    HubConfig, HubStats, Right,
};

#[path = "consumer.rs"]
mod consumer;

const BATCH_FORMAT: u32 = 0x8001_3700;

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
    pub faults: Arc<FaultShared>,
    /// Payload buffers of deliveries dropped by retention, for the wire to reuse.
    pub pool: Arc<BufferPool>,
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
            faults: Arc::new(FaultShared::new()),
            pool: Arc::new(BufferPool::default()),
            next_conn: AtomicU64::new(1),
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

    fn stat(&self, f: impl FnOnce(&mut HubStats)) {
        f(&mut self.stats.lock().unwrap());
    }

    fn policy_key(&self, name: &str) -> Option<String> {
        self.config
            .policies
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.key.clone())
    }

    fn policy_rights(&self, name: &str) -> Vec<Right> {
        self.config
            .policies
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.rights.clone())
            .unwrap_or_default()
    }

    fn verify_token(&self, token: &str, name: &str) -> Result<sas::VerifiedToken, sas::TokenError> {
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
        hs.partitions[p as usize].append(Arc::new(payload), spans, meta, retain, &self.pool);
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

// ---------------------------------------------------------------------------------------------
// SASL

#[derive(Clone)]
struct HubSasl {
    shared: Arc<Shared>,
    authed: Arc<Mutex<Option<String>>>,
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("PLAIN"),
            Symbol::from("ANONYMOUS"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.0.as_str() {
            "ANONYMOUS" | "MSSBCBS" => outcome(SaslCode::Ok),
            "PLAIN" => {
                let Some(resp) = init.initial_response else {
                    return outcome(SaslCode::Auth);
                };
                let mut parts = resp.split(|b| *b == 0);
                let _authzid = parts.next();
                let user = parts.next().map(|u| String::from_utf8_lossy(u).to_string());
                let pass = parts.next().map(|p| String::from_utf8_lossy(p).to_string());
                match (user, pass) {
                    (Some(u), Some(p))
                        if self.shared.policy_key(&u).as_deref() == Some(p.as_str()) =>
                    {
                        *self.authed.lock().unwrap() = Some(u);
                        outcome(SaslCode::Ok)
                    }
                    _ => {
                        tracing::warn!("sasl plain authentication failed");
                        outcome(SaslCode::Auth)
                    }
                }
            }
            other => {
                tracing::warn!(mechanism = other, "unsupported sasl mechanism");
                outcome(SaslCode::Auth)
            }
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        outcome(SaslCode::Sys)
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

#[derive(Debug, Clone)]
struct Token {
    audience: String,
    expires_at_ms: i64,
    rights: Vec<Right>,
}

/// Per-connection state.
struct ConnCtx {
    shared: Arc<Shared>,
    plain_policy: Option<String>,
    tokens: Mutex<Vec<Token>>,
    control: Arc<WireControl>,
    host: String,
    /// Commands to this connection's own task (faults aimed at one connection).
    commands: mpsc::UnboundedSender<ConnCommand>,
    /// Producer transfers received on this connection.
    transfers: AtomicU64,
}

enum Auth {
    No,
    Forever,
    Until(i64),
}

impl ConnCtx {
    /// Whether the connection may use `entity` (normalised path) with `right`, and until when.
    fn authorised(&self, entity: &str, right: Option<Right>) -> Auth {
        if let Some(p) = &self.plain_policy {
            let rights = self.shared.policy_rights(p);
            if right.is_none_or(|r| rights.contains(&r)) {
                return Auth::Forever;
            }
        }
        let now = now_ms();
        let tokens = self.tokens.lock().unwrap();
        let best = tokens
            .iter()
            .filter(|t| t.expires_at_ms > now)
            .filter(|t| right.is_none_or(|r| t.rights.contains(&r)))
            .filter(|t| covers(&t.audience, entity))
            .map(|t| t.expires_at_ms)
            .max();
        match best {
            Some(t) => Auth::Until(t),
            None => Auth::No,
        }
    }
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tracing::debug!(%peer, "tcp connection");
                tokio::spawn(handle_connection(tcp, shared.clone(), tls.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_connection(
    tcp: tokio::net::TcpStream,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let _ = tcp.set_nodelay(true);
    // Keep a duplicate of the socket so a fault can shut it down under fe2o3's feet.
    let (tcp, raw) = match tcp.into_std().and_then(|s| {
        let dup = s.try_clone()?;
        Ok((tokio::net::TcpStream::from_std(s)?, dup))
    }) {
        Ok((t, d)) => (t, Some(d)),
        Err(e) => {
            tracing::warn!(error = %e, "socket setup failed");
            return;
        }
    };
    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    shared
        .faults
        .connections
        .lock()
        .unwrap()
        .push(cmd_tx.clone());
    let control = Arc::new(
        WireControl::new(shared.config.max_message_size, shared.pool.clone())
            .with_faults(shared.faults.clone()),
    );
    let authed = Arc::new(Mutex::new(None));
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("{:032x}_G{id}", rand::random::<u128>()))
        .max_frame_size(65536)
        .channel_max(4999)
        .idle_time_out(240_000u32)
        .sasl_acceptor(HubSasl {
            shared: shared.clone(),
            authed: authed.clone(),
        })
        .build();
    let kill = |raw: &Option<std::net::TcpStream>, control: &WireControl| {
        control.killed.store(true, Ordering::SeqCst);
        if let Some(r) = raw {
            let _ = r.shutdown(std::net::Shutdown::Both);
        }
    };

    let handshake = async {
        let wire_control = control.clone();
        match tls {
            Some(tls) => {
                let stream = tls.accept(tcp).await.map_err(|e| e.to_string())?;
                acceptor
                    .accept(Wire::new(stream, wire_control))
                    .await
                    .map_err(|e| e.to_string())
            }
            None => acceptor
                .accept(Wire::new(tcp, wire_control))
                .await
                .map_err(|e| e.to_string()),
        }
    };
    let mut conn = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(30), handshake) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("connection handshake timed out");
                return;
            }
        },
        Some(_) = cmd_rx.recv() => {
            kill(&raw, &control);
            return;
        }
    };
    shared.stat(|s| s.connections_accepted += 1);
    let plain_policy = authed.lock().unwrap().clone();
    let host = shared.config.host.clone();
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        plain_policy,
        tokens: Mutex::new(Vec::new()),
        control: control.clone(),
        host: if host == "0.0.0.0" {
            "localhost".into()
        } else {
            host
        },
        commands: cmd_tx,
        transfers: AtomicU64::new(0),
    });
    tracing::info!(connection = id, "connection opened");
    let session_acceptor = SessionAcceptor::builder()
        .incoming_window(5000)
        .outgoing_window(5000)
        .handle_max(255u32)
        .build();
    loop {
        tokio::select! {
            incoming = conn.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                match session_acceptor.accept_incoming_session(incoming, &mut conn).await {
                    Ok(session) => {
                        tokio::spawn(session_loop(session, ctx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = ?e, "session begin failed");
                        break;
                    }
                }
            }
            Some(cmd) = cmd_rx.recv() => {
                match cmd {
                    ConnCommand::Close { condition, description } => {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            conn.close_with_error(amqp_error(&condition, description)),
                        )
                        .await;
                    }
                    ConnCommand::Drop => kill(&raw, &control),
                }
                break;
            }
        }
    }
    tracing::info!(connection = id, "connection ended");
}

// ---------------------------------------------------------------------------------------------
// Sessions and link dispatch

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Cbs,
    Management,
}

struct ReplyLink {
    node: Node,
    name: String,
    target: Option<String>,
    tx: mpsc::UnboundedSender<Message<Body<Value>>>,
}

type Replies = Arc<Mutex<Vec<ReplyLink>>>;

/// The request node a target address names. Everything else a client sends to is a producer
/// target, whose payloads the wire captures (the two must agree: see [`is_request_node`]).
fn node_of(addr: &str) -> Option<Node> {
    if !is_request_node(addr) {
        return None;
    }
    if addr.trim_start_matches('/').eq_ignore_ascii_case("$cbs") {
        Some(Node::Cbs)
    } else {
        Some(Node::Management)
    }
}

async fn session_loop(mut session: ListenerSessionHandle, ctx: Arc<ConnCtx>) {
    let replies: Replies = Arc::new(Mutex::new(Vec::new()));
    while let Some(attach) = session.next_incoming_attach().await {
        handle_attach(attach, &mut session, &ctx, &replies).await;
    }
}

async fn refuse(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    condition: &str,
    description: String,
) {
    let mut attach = attach;
    tracing::info!(link = %attach.name, condition, "refusing link");
    if attach.role == Role::Sender {
        attach.target = None;
    }
    ctx.shared.stat(|s| s.links_refused += 1);
    let acceptor = LinkAcceptor::builder().build();
    let err = amqp_error(condition, description);
    // Inline (not spawned): the client may reuse the handle right after our detach, so the
    // detach exchange must finish before the next attach of this session is processed.
    match acceptor.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Receiver(r)) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), r.close_with_error(err)).await;
        }
        Ok(LinkEndpoint::Sender(s)) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.close_with_error(err)).await;
        }
        Err(e) => tracing::warn!(error = ?e, "could not answer refused attach"),
    }
}

async fn handle_attach(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &Arc<ConnCtx>,
    replies: &Replies,
) {
    match attach.role {
        Role::Sender => {
            let addr = attach.target.as_deref().and_then(|t| match t {
                TargetArchetype::Target(t) => t.address.clone(),
                #[allow(unreachable_patterns)]
                _ => None,
            });
            match addr {
                Some(a) if node_of(&a).is_some() => {
                    let node = node_of(&a).unwrap_or(Node::Cbs);
                    let acceptor = LinkAcceptor::builder()
                        .properties(link_properties())
                        .build();
                    match acceptor.accept_incoming_attach(attach, session).await {
                        Ok(LinkEndpoint::Receiver(r)) => {
                            ctx.shared.stat(|s| s.links_attached += 1);
                            tokio::spawn(request_loop(r, node, ctx.clone(), replies.clone()));
                        }
                        Ok(LinkEndpoint::Sender(_)) => {}
                        Err(e) => tracing::warn!(error = ?e, "request link attach failed"),
                    }
                }
                Some(a) => producer_attach(attach, a, session, ctx).await,
                None => {
                    let desc = "The messaging entity '' could not be found.".to_string();
                    refuse(attach, session, ctx, "amqp:not-found", desc).await
                }
            }
        }
        Role::Receiver => {
            let addr = attach.source.as_ref().and_then(|s| s.address.clone());
            match addr.as_deref().and_then(node_of) {
                Some(node) => {
                    let name = attach.name.clone();
                    let target = attach.target.as_deref().and_then(|t| match t {
                        TargetArchetype::Target(t) => t.address.clone(),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    });
                    let acceptor = LinkAcceptor::builder()
                        .properties(link_properties())
                        .build();
                    match acceptor.accept_incoming_attach(attach, session).await {
                        Ok(LinkEndpoint::Sender(s)) => {
                            ctx.shared.stat(|st| st.links_attached += 1);
                            let (tx, rx) = mpsc::unbounded_channel();
                            replies.lock().unwrap().push(ReplyLink {
                                node,
                                name: name.clone(),
                                target,
                                tx,
                            });
                            tokio::spawn(reply_loop(s, rx, name, replies.clone()));
                        }
                        Ok(LinkEndpoint::Receiver(_)) => {}
                        Err(e) => tracing::warn!(error = ?e, "reply link attach failed"),
                    }
                }
                None => {
                    let a = addr.unwrap_or_default();
                    if consumer::is_consumer_address(&a) {
                        return consumer::consumer_attach(attach, a, session, ctx).await;
                    }
                    let desc = format!(
                        "The messaging entity 'sb://{}/{}' could not be found.",
                        ctx.host,
                        normalise(&a, false).path
                    );
                    refuse(attach, session, ctx, "amqp:not-found", desc).await
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// $cbs and $management

async fn reply_loop(
    mut sender: Sender,
    mut rx: mpsc::UnboundedReceiver<Message<Body<Value>>>,
    name: String,
    replies: Replies,
) {
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                match sender.send_batchable(msg).await {
                    Ok(fut) => drop(fut),
                    Err(e) => {
                        tracing::debug!(error = ?e, "reply send failed");
                        break;
                    }
                }
            }
            _ = sender.on_detach() => break,
        }
    }
    replies.lock().unwrap().retain(|r| r.name != name);
    let _ = tokio::time::timeout(Duration::from_secs(2), sender.close()).await;
}

fn app_prop_string(msg: &Message<Body<Value>>, key: &str) -> Option<String> {
    let ap = msg.application_properties.as_ref()?;
    match ap.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

fn response(
    request: &Message<Body<Value>>,
    status: i32,
    description: &str,
    error_condition: Option<&str>,
    body: Value,
) -> Message<Body<Value>> {
    let mut ap = OrderedMap::new();
    ap.insert("status-code".to_string(), SimpleValue::Int(status));
    ap.insert(
        "status-description".to_string(),
        SimpleValue::String(description.to_string()),
    );
    if let Some(c) = error_condition {
        ap.insert(
            "error-condition".to_string(),
            SimpleValue::Symbol(Symbol::from(c)),
        );
    }
    let correlation_id = request
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id,
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(ap)),
        body: Body::Value(AmqpValue(body)),
        footer: None,
    }
}

async fn request_loop(mut receiver: Receiver, node: Node, ctx: Arc<ConnCtx>, replies: Replies) {
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = ?e, ?node, "request link ended");
                break;
            }
        };
        let _ = receiver.accept(&delivery).await;
        let msg = delivery.into_message();
        let reply = match node {
            Node::Cbs => handle_put_token(&msg, &ctx),
            Node::Management => handle_management(&msg, &ctx),
        };
        let reply_to = msg.properties.as_ref().and_then(|p| p.reply_to.clone());
        route_reply(&replies, node, reply_to, reply).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), receiver.close()).await;
}

async fn route_reply(
    replies: &Replies,
    node: Node,
    reply_to: Option<String>,
    reply: Message<Body<Value>>,
) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let tx = {
            let list = replies.lock().unwrap();
            let candidates: Vec<&ReplyLink> = list.iter().filter(|r| r.node == node).collect();
            let by_target = reply_to.as_ref().and_then(|rt| {
                candidates
                    .iter()
                    .find(|r| r.target.as_deref() == Some(rt.as_str()))
            });
            let by_name = reply_to
                .as_ref()
                .and_then(|rt| candidates.iter().find(|r| &r.name == rt));
            by_target
                .or(by_name)
                .or(candidates.last())
                .map(|r| r.tx.clone())
        };
        if let Some(tx) = tx {
            let _ = tx.send(reply);
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(?node, "no reply link for response; dropped");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn handle_put_token(msg: &Message<Body<Value>>, ctx: &ConnCtx) -> Message<Body<Value>> {
    let shared = &ctx.shared;
    let reject = |status: i32, desc: &str| {
        shared.stat(|s| s.put_tokens_rejected += 1);
        response(msg, status, desc, None, Value::Null)
    };
    if app_prop_string(msg, "operation").is_none_or(|o| o != "put-token") {
        return reject(400, "The operation is not supported.");
    }
    let Some(name) = app_prop_string(msg, "name") else {
        return reject(400, "The 'name' application property is missing.");
    };
    let token = match &msg.body {
        Body::Value(AmqpValue(Value::String(s))) => s.clone(),
        Body::Value(AmqpValue(Value::Binary(b))) => String::from_utf8_lossy(b).to_string(),
        _ => return reject(400, "The token is missing."),
    };
    if let Some(status) = shared.faults.take_put_failure() {
        return reject(
            status,
            "InjectedFault: put-token failure requested by the test.",
        );
    }
    let jwt = app_prop_string(msg, "type").is_some_and(|t| t == "jwt");
    let verified = if jwt {
        let v = shared.verify_jwt(&token, &name);
        v.map(|v| (v.audience, v.expires_at, v.rights))
    } else {
        let v = shared.verify_token(&token, &name);
        v.map(|v| (v.audience, v.expires_at, shared.policy_rights(&v.policy)))
    };
    match verified {
        Ok((audience, expires_at, rights)) => {
            ctx.tokens.lock().unwrap().push(Token {
                audience,
                expires_at_ms: (expires_at as i64).saturating_mul(1000),
                rights,
            });
            shared.stat(|s| s.put_tokens_accepted += 1);
            shared.stat(|s| s.jwt_put_tokens_accepted += u64::from(jwt));
            response(msg, 202, "Accepted", None, Value::Null)
        }
        Err(e) => {
            tracing::warn!(status = e.status(), "put-token refused");
            reject(e.status(), &e.description())
        }
    }
}

fn handle_management(msg: &Message<Body<Value>>, ctx: &ConnCtx) -> Message<Body<Value>> {
    let shared = &ctx.shared;
    shared.stat(|s| s.management_requests += 1);
    let fail = |status: i32, cond: &str, desc: String| {
        response(msg, status, &desc, Some(cond), Value::Null)
    };
    if app_prop_string(msg, "operation").is_none_or(|o| !o.eq_ignore_ascii_case("READ")) {
        return fail(
            501,
            "amqp:not-implemented",
            "The operation is not supported.".into(),
        );
    }
    let hub_name = app_prop_string(msg, "name").unwrap_or_default();
    let Some((hub, count)) = shared.find_hub(&hub_name) else {
        return fail(
            404,
            "amqp:not-found",
            format!(
                "The messaging entity 'sb://{}/{}' could not be found.",
                ctx.host, hub_name
            ),
        );
    };
    let entity = format!("{}/$management", hub.to_ascii_lowercase());
    let authorised = match app_prop_string(msg, "security_token") {
        Some(token) => {
            shared.verify_token(&token, &format!("/{entity}")).is_ok()
                || shared.jwt_security_token_ok(&token, &entity)
        }
        None => !matches!(ctx.authorised(&entity, None), Auth::No),
    };
    if !authorised {
        return fail(
            401,
            "amqp:unauthorized-access",
            "Unauthorized access. A valid security token is required.".into(),
        );
    }
    let kind = app_prop_string(msg, "type").unwrap_or_default();
    let s = |v: &str| Value::String(v.to_string());
    let mut map: OrderedMap<Value, Value> = OrderedMap::new();
    if kind == "com.microsoft:eventhub" {
        let created = shared
            .store
            .lock()
            .unwrap()
            .get(&hub.to_ascii_lowercase())
            .map(|h| h.created_at_ms)
            .unwrap_or(0);
        map.insert(s("name"), s(&hub));
        map.insert(
            s("created_at"),
            Value::Timestamp(Timestamp::from_milliseconds(created)),
        );
        map.insert(s("partition_count"), Value::Int(count as i32));
        map.insert(
            s("partition_ids"),
            Value::Array(Array::from(
                (0..count)
                    .map(|i| Value::String(i.to_string()))
                    .collect::<Vec<_>>(),
            )),
        );
        map.insert(s("type"), s("com.microsoft:eventhub"));
    } else if kind == "com.microsoft:partition" {
        let pid = app_prop_string(msg, "partition").unwrap_or_default();
        let Some(p) = pid.parse::<u32>().ok().filter(|p| *p < count) else {
            return fail(
                404,
                "amqp:not-found",
                format!(
                    "The messaging entity 'sb://{}/{}/Partitions/{}' could not be found.",
                    ctx.host, hub, pid
                ),
            );
        };
        let (begin, empty, last) = shared
            .with_hub(&hub, |hs| {
                let log = &hs.partitions[p as usize];
                (log.begin_sequence(), log.is_empty(), log.last())
            })
            .unwrap_or((0, true, None));
        map.insert(s("name"), s(&hub));
        map.insert(s("partition"), s(&p.to_string()));
        map.insert(s("type"), s("com.microsoft:partition"));
        map.insert(
            s("begin_sequence_number"),
            Value::Long(if empty { -1 } else { begin }),
        );
        map.insert(
            s("last_enqueued_sequence_number"),
            Value::Long(last.as_ref().map(|e| e.sequence_number).unwrap_or(-1)),
        );
        map.insert(
            s("last_enqueued_offset"),
            s(&last.as_ref().map(|e| e.offset).unwrap_or(-1).to_string()),
        );
        map.insert(
            s("last_enqueued_time_utc"),
            Value::Timestamp(Timestamp::from_milliseconds(
                last.as_ref().map(|e| e.enqueued_time_ms()).unwrap_or(0),
            )),
        );
        map.insert(s("is_partition_empty"), Value::Bool(empty));
        map.insert(s("last_enqueued_sequence_number_epoch"), Value::Long(0));
    } else {
        return fail(
            400,
            "com.microsoft:argument-error",
            format!("The entity type '{kind}' is not supported."),
        );
    }
    response(msg, 200, "OK", None, Value::Map(map))
}

// ---------------------------------------------------------------------------------------------
// Producer links

async fn producer_attach(
    mut attach: Attach,
    address: String,
    session: &mut ListenerSessionHandle,
    ctx: &Arc<ConnCtx>,
) {
    let shared = &ctx.shared;
    let path = normalise(&address, false).path;
    let segs: Vec<&str> = path.split('/').collect();
    let not_found = format!(
        "The messaging entity 'sb://{}/{}' could not be found.",
        ctx.host, path
    );
    let Some((hub, count)) = segs.first().and_then(|h| shared.find_hub(h)) else {
        return refuse(attach, session, ctx, "amqp:not-found", not_found).await;
    };
    let partition = match segs.as_slice() {
        [_] => None,
        [_, p, n] if *p == "partitions" => match n.parse::<u32>() {
            Ok(n) if n < count => Some(n),
            _ => return refuse(attach, session, ctx, "amqp:not-found", not_found).await,
        },
        _ => return refuse(attach, session, ctx, "amqp:not-found", not_found).await,
    };
    let entity = path.clone();
    if matches!(ctx.authorised(&entity, Some(Right::Send)), Auth::No) {
        let desc = format!(
            "Unauthorized access. 'Send' claim(s) are required to perform this operation. Resource: 'sb://{}/{}'.",
            ctx.host, path
        );
        return refuse(attach, session, ctx, "amqp:unauthorized-access", desc).await;
    }
    let max = shared.config.max_message_size;
    let mms = attach
        .max_message_size
        .filter(|v| *v > 0)
        .map_or(max, |c| c.min(max));
    let name = attach.name.clone();
    let advertised = shared.config.advertised_max_message_size.unwrap_or(mms);
    ctx.control
        .advertise
        .lock()
        .unwrap()
        .insert(name.clone(), advertised);
    // fe2o3 would detach the link on an oversize delivery; the service rejects only the delivery.
    attach.max_message_size = None;
    let acceptor = LinkAcceptor::builder()
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .properties(link_properties())
        .build();
    match acceptor.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Receiver(r)) => {
            shared.stat(|s| {
                s.links_attached += 1;
                s.producer_links_attached += 1;
            });
            tracing::info!(link = %name, hub = %hub, ?partition, "producer link attached");
            tokio::spawn(producer_loop(
                r,
                ProducerLink {
                    ctx: ctx.clone(),
                    hub,
                    partition,
                    target: address.into(),
                    entity,
                    max_message_size: mms,
                    name,
                },
            ));
        }
        Ok(LinkEndpoint::Sender(_)) => {}
        Err(e) => tracing::warn!(error = ?e, "producer attach failed"),
    }
}

struct ProducerLink {
    ctx: Arc<ConnCtx>,
    hub: String,
    partition: Option<u32>,
    target: Arc<str>,
    entity: String,
    max_message_size: u64,
    name: String,
}

enum Verdict {
    Accept,
    Reject(definitions::Error),
}

fn decode_error(description: &str) -> Verdict {
    Verdict::Reject(amqp_error("amqp:decode-error", description))
}

impl ProducerLink {
    /// Checks one delivery and stores its events. `payload` is the encoded message as the
    /// client sent it; nothing is decoded here, only walked (see [`raw`]).
    fn process(&self, format: u32, delivery_id: u32, payload: Captured) -> Verdict {
        let shared = &self.ctx.shared;
        let size = payload.size;
        if size > self.max_message_size {
            return Verdict::Reject(amqp_error(
                "amqp:link:message-size-exceeded",
                format!(
                    "The received message (delivery-id:{delivery_id}, size:{size} bytes) exceeds the limit ({} bytes) currently allowed on the link.",
                    self.max_message_size
                ),
            ));
        }
        if let Some(cond) = shared.faults.on_transfer() {
            return Verdict::Reject(amqp_error(
                &cond,
                "The request was rejected by fault injection.",
            ));
        }
        let buf = payload.bytes;
        if buf.len() > u32::MAX as usize {
            return decode_error("The message is too large to store.");
        }
        let batched = format == BATCH_FORMAT;
        if !batched && format != 0 {
            return Verdict::Reject(amqp_error(
                "amqp:not-implemented",
                format!("The message format {format} is not supported."),
            ));
        }
        // 100-byte events take ~110 bytes each in a batch.
        let mut spans: Vec<(u32, u32)> =
            Vec::with_capacity(if batched { buf.len() / 96 } else { 1 });
        let mut annotations = None;
        let mut first_key = None;
        let mut bodies = 0usize;
        for section in raw::Sections::new(&buf) {
            let Some(s) = section else {
                tracing::warn!("undecodable message");
                return decode_error("The message is not an encoded AMQP message.");
            };
            if s.code == raw::MESSAGE_ANNOTATIONS {
                annotations = Some(s);
            }
            if !batched || !raw::is_body(s.code) {
                continue;
            }
            bodies += 1;
            let range = (s.code == raw::DATA).then(|| raw::data_range(&buf, &s));
            let Some((start, end)) = range.flatten() else {
                return decode_error("A batch must carry data sections.");
            };
            let event = &buf[start..end];
            let Some(event_annotations) = raw::check_message(event) else {
                tracing::warn!("undecodable event in batch");
                return decode_error("A batch section is not an encoded AMQP message.");
            };
            if spans.is_empty() {
                first_key = event_annotations.and_then(|a| raw::partition_key(event, &a));
            }
            spans.push((start as u32, event.len() as u32));
        }
        if buf.is_empty() {
            return decode_error("The message is not an encoded AMQP message.");
        }
        let key = annotations
            .and_then(|a| raw::partition_key(&buf, &a))
            .or(first_key);
        if batched && bodies == 0 {
            return decode_error("A batch must carry data sections.");
        }
        if !batched {
            spans.push((0, buf.len() as u32));
        }
        shared.store_events(
            &self.hub,
            self.partition,
            buf,
            spans.into_boxed_slice(),
            DeliveryMeta {
                batched,
                link_target: self.target.clone(),
                route_key: key.map(Arc::from),
                enqueued_time_ms: 0,
            },
        );
        Verdict::Accept
    }
}

async fn producer_loop(mut receiver: Receiver, link: ProducerLink) {
    let shared = link.ctx.shared.clone();
    let credit = shared.config.link_credit;
    receiver.set_credit_mode(CreditMode::Manual);
    let mut withheld = shared.faults.withheld_until();
    let _ = receiver
        .set_credit(if withheld.is_some() { 0 } else { credit })
        .await;
    let mut detach_rx = shared.faults.detach_tx.subscribe();
    let mut credit_rx = shared.faults.credit_tx.subscribe();
    let mut pending: std::collections::VecDeque<(Instant, DeliveryInfo, Verdict)> =
        Default::default();
    // A coalesced rejection waiting for the next settlement (and when to give up waiting).
    let mut held: Option<(Instant, DeliveryInfo, Verdict)> = None;
    let mut link_transfers = 0u64;
    let far = || Instant::now() + Duration::from_secs(3600 * 24);
    let close_error: Option<definitions::Error> = loop {
        let auth_deadline = match link.ctx.authorised(&link.entity, Some(Right::Send)) {
            Auth::No => break Some(amqp_error(
                "amqp:unauthorized-access",
                format!(
                    "The token has expired. Code: RenewToken. Details: Unauthorized access. 'Send' claim(s) are required to perform this operation. Resource: 'sb://{}/{}'.",
                    link.ctx.host, link.entity
                ),
            )),
            Auth::Forever => far(),
            Auth::Until(ms) => {
                Instant::now() + Duration::from_millis((ms - now_ms()).max(0) as u64 + 5)
            }
        };
        let next_disposition = pending.front().map(|p| p.0).unwrap_or_else(far);
        let held_until = held.as_ref().map(|h| h.0).unwrap_or_else(far);
        let credit_back = withheld.map(Instant::from_std).unwrap_or_else(far);
        tokio::select! {
            d = receiver.recv::<Body<Value>>() => {
                let delivery = match d {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::debug!(link = %link.name, error = ?e, "producer link ended");
                        break None;
                    }
                };
                shared.stat(|s| s.transfers_received += 1);
                if withheld.is_none() && receiver.credit() < credit / 2 + 1 {
                    let _ = receiver.set_credit(credit).await;
                }
                link_transfers += 1;
                let info = DeliveryInfo::from(&delivery);
                let format = delivery.message_format().unwrap_or(0);
                let id = *delivery.delivery_id();
                let msg = delivery.into_message();
                // The wire captured the payload; a message that is not its marker (a link
                // the wire did not see as a producer) is taken as sent.
                let payload = link.ctx.control.take(&msg).unwrap_or_else(|| {
                    let bytes = serde_amqp::to_vec(&Serializable(msg)).unwrap_or_default();
                    Captured { size: bytes.len() as u64, bytes }
                });
                match first_transfer_fault(&link.ctx, link_transfers) {
                    Some(FirstTransfer::Detach(err)) => break Some(err),
                    Some(FirstTransfer::Closing | FirstTransfer::Unsettled) => continue,
                    None => {}
                }
                let verdict = link.process(format, id, payload);
                let delay = shared.faults.disposition_delay();
                if !delay.is_zero() || !pending.is_empty() {
                    pending.push_back((Instant::now() + delay, info, verdict));
                } else if let Some((_, held_info, held_verdict)) = held.take() {
                    // The held rejection and this settlement leave in one write.
                    link.ctx.control.hold_next_rejection();
                    dispose(&receiver, &shared, held_info, held_verdict).await;
                    dispose(&receiver, &shared, info, verdict).await;
                } else if matches!(verdict, Verdict::Reject(_))
                    && shared.faults.read(|f| f.coalesce_rejections)
                {
                    held = Some((Instant::now() + COALESCE_WAIT, info, verdict));
                } else {
                    dispose(&receiver, &shared, info, verdict).await;
                }
            }
            _ = tokio::time::sleep_until(held_until), if held.is_some() => {
                if let Some((_, info, verdict)) = held.take() {
                    dispose(&receiver, &shared, info, verdict).await;
                }
            }
            _ = tokio::time::sleep_until(next_disposition), if !pending.is_empty() => {
                if let Some((_, info, verdict)) = pending.pop_front() {
                    dispose(&receiver, &shared, info, verdict).await;
                }
            }
            r = detach_rx.changed() => {
                if r.is_err() { continue; }
                let v = detach_rx.borrow_and_update().clone();
                if let Some((_, cond, desc)) = v {
                    while let Some((_, info, verdict)) = held.take().or_else(|| pending.pop_front()) {
                        dispose(&receiver, &shared, info, verdict).await;
                    }
                    break Some(amqp_error(&cond, desc));
                }
            }
            r = credit_rx.changed() => {
                if r.is_err() { continue; }
                let _ = credit_rx.borrow_and_update();
                withheld = shared.faults.withheld_until();
                let _ = receiver.set_credit(if withheld.is_some() { 0 } else { credit }).await;
            }
            _ = tokio::time::sleep_until(credit_back), if withheld.is_some() => {
                withheld = shared.faults.withheld_until();
                if withheld.is_none() {
                    let _ = receiver.set_credit(credit).await;
                }
            }
            _ = tokio::time::sleep_until(auth_deadline) => {
                // Re-evaluated at the top of the loop: a refreshed token extends the link.
            }
        }
    };
    if let Some((_, info, verdict)) = held.take() {
        dispose(&receiver, &shared, info, verdict).await;
    }
    link.ctx
        .control
        .advertise
        .lock()
        .unwrap()
        .remove(&link.name);
    let result = match close_error {
        Some(err) => {
            tracing::info!(link = %link.name, condition = ?err.condition, "detaching producer link");
            tokio::time::timeout(Duration::from_secs(5), receiver.close_with_error(err)).await
        }
        None => tokio::time::timeout(Duration::from_secs(2), receiver.close()).await,
    };
    if let Ok(Err(e)) = result {
        tracing::debug!(error = ?e, "producer link close");
    }
}

/// How long a coalesced rejection waits for the next settlement before it is sent alone.
const COALESCE_WAIT: Duration = Duration::from_millis(100);

/// What a first-transfer or never-settle fault does with a delivery that just arrived.
enum FirstTransfer {
    /// The connection was told to close; leave the delivery unsettled.
    Closing,
    /// Detach the link with this error; leave the delivery unsettled.
    Detach(definitions::Error),
    /// Never settle it (and do not store it).
    Unsettled,
}

/// Applies the faults that act on a delivery before it is looked at: closing the connection
/// on its first transfer, detaching a link on its first (`link_transfers` counts the link's),
/// never settling.
fn first_transfer_fault(ctx: &ConnCtx, link_transfers: u64) -> Option<FirstTransfer> {
    let first_on_connection = ctx.transfers.fetch_add(1, Ordering::SeqCst) == 0;
    let (close, detach, never_settle) = ctx.shared.faults.read(|f| {
        (
            f.close_after_first_transfer.clone(),
            f.detach_after_first_transfer.clone(),
            f.never_settle,
        )
    });
    let description = "Closed by fault injection after the first transfer.";
    if let Some(condition) = close.filter(|_| first_on_connection) {
        let _ = ctx.commands.send(ConnCommand::Close {
            condition,
            description: description.to_string(),
        });
        return Some(FirstTransfer::Closing);
    }
    if let Some(condition) = detach.filter(|_| link_transfers == 1) {
        return Some(FirstTransfer::Detach(amqp_error(&condition, description)));
    }
    never_settle.then_some(FirstTransfer::Unsettled)
}

async fn dispose(receiver: &Receiver, shared: &Shared, info: DeliveryInfo, verdict: Verdict) {
    match verdict {
        Verdict::Accept => {
            let _ = receiver.accept(info).await;
            shared.stat(|s| s.deliveries_accepted += 1);
            shared.faults.on_accepted();
        }
        Verdict::Reject(err) => {
            let _ = receiver.reject(info, err).await;
            shared.stat(|s| s.deliveries_rejected += 1);
        }
    }
}
