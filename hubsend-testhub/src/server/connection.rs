//! Connections: the listener, the handshake (TLS, SASL, open) over the [`Wire`], the
//! per-connection context (tokens, fault commands), and the dispatch of each session's attaches
//! to the request nodes, producer and consumer links.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp_types::{
    definitions::{self, Role},
    messaging::{Source, Target, TargetArchetype},
    performatives::Attach,
};
use tokio::{net::TcpListener, sync::mpsc, time::Instant};

use crate::{
    faults::ConnCommand,
    sas::{covers, normalise},
    wire::{Wire, WireControl},
    ws::{self, Framing},
    Right,
};

use super::{
    amqp_error,
    consumer::{consumer_attach, is_consumer_address},
    link_properties, now_ms,
    producer::producer_attach,
    request::{node_of, reply_loop, request_loop, Node, Replies, ReplyLink},
    sasl::HubSasl,
    Shared,
};

#[derive(Debug, Clone)]
pub(super) struct Token {
    pub(super) audience: String,
    pub(super) expires_at_ms: i64,
    pub(super) rights: Vec<Right>,
    /// IoT Hub: signed with a device's own key (scope `device`), not a policy's (`hub`).
    pub(super) device_key: bool,
}

/// Per-connection state.
pub(super) struct ConnCtx {
    pub(super) shared: Arc<Shared>,
    pub(super) plain_policy: Option<String>,
    pub(super) tokens: Mutex<Vec<Token>>,
    pub(super) control: Arc<WireControl>,
    pub(super) host: String,
    /// Commands to this connection's own task (faults aimed at one connection).
    pub(super) commands: mpsc::UnboundedSender<ConnCommand>,
    /// Producer transfers received on this connection.
    pub(super) transfers: AtomicU64,
}

pub(super) enum Auth {
    No,
    Forever,
    Until(i64),
}

impl ConnCtx {
    /// Whether the connection may use `entity` (normalised path) with `right`, and until when.
    /// When the link on `entity` needing `right` must re-check its authorisation (a day away
    /// for ever-valid credentials), or the detach error once no token covers it any more.
    pub(super) fn auth_deadline(
        &self,
        entity: &str,
        right: Right,
    ) -> Result<Instant, definitions::Error> {
        match self.authorised(entity, Some(right)) {
            Auth::No => Err(amqp_error(
                "amqp:unauthorized-access",
                format!(
                    "The token has expired. Code: RenewToken. Details: Unauthorized access. '{right:?}' claim(s) are required to perform this operation. Resource: 'sb://{}/{entity}'.",
                    self.host
                ),
            )),
            Auth::Forever => Ok(Instant::now() + Duration::from_secs(3600 * 24)),
            Auth::Until(ms) => Ok(Instant::now()
                + Duration::from_millis((ms - now_ms()).max(0) as u64 + 5)),
        }
    }

    /// The service's description of an entity path that does not exist.
    pub(super) fn not_found(&self, path: &str) -> String {
        format!(
            "The messaging entity 'sb://{}/{path}' could not be found.",
            self.host
        )
    }

    /// The service's description of an attach lacking `right` on `path`.
    pub(super) fn unauthorised(&self, right: Right, path: &str) -> String {
        format!(
            "Unauthorized access. '{right:?}' claim(s) are required to perform this operation. Resource: 'sb://{}/{path}'.",
            self.host
        )
    }

    pub(super) fn authorised(&self, entity: &str, right: Option<Right>) -> Auth {
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

    /// IoT Hub: whether the live token covering `entity` (the longest-lived one) was signed
    /// with a device's own key rather than a policy's.
    pub(super) fn device_key_for(&self, entity: &str) -> bool {
        let now = now_ms();
        let tokens = self.tokens.lock().unwrap();
        tokens
            .iter()
            .filter(|t| t.expires_at_ms > now && covers(&t.audience, entity))
            .max_by_key(|t| t.expires_at_ms)
            .is_some_and(|t| t.device_key)
    }
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    framing: Framing,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tracing::debug!(%peer, "tcp connection");
                tokio::spawn(handle_connection(tcp, shared.clone(), tls.clone(), framing));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(super) async fn handle_connection(
    tcp: tokio::net::TcpStream,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    framing: Framing,
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
    let container_id = format!("{:032x}_G{id}", rand::random::<u128>());
    let acceptor = ConnectionAcceptor::builder()
        .container_id(container_id.clone())
        .max_frame_size(65536)
        .channel_max(4999)
        .idle_time_out(240_000u32)
        .sasl_acceptor(HubSasl {
            shared: shared.clone(),
            authed: authed.clone(),
        })
        .build();
    // Clients that skip SASL (Microsoft's IoT device SDKs with CBS) open with the AMQP header.
    let plain_acceptor = ConnectionAcceptor::builder()
        .container_id(container_id)
        .max_frame_size(65536)
        .channel_max(4999)
        .idle_time_out(240_000u32)
        .build();
    let kill = |raw: &Option<std::net::TcpStream>, control: &WireControl| {
        control.killed.store(true, Ordering::SeqCst);
        if let Some(r) = raw {
            let _ = r.shutdown(std::net::Shutdown::Both);
        }
    };

    let handshake = async {
        let wire_control = control.clone();
        let stream: Box<dyn Stream> = match tls {
            Some(tls) => Box::new(tls.accept(tcp).await.map_err(|e| e.to_string())?),
            None => Box::new(tcp),
        };
        let stream: Box<dyn Stream> = match framing {
            Framing::Raw => stream,
            Framing::WebSocket => {
                let socket = ws::accept(stream, shared.ws_upgrade(), shared.clone()).await?;
                shared.stat(|s| s.websockets_accepted += 1);
                Box::new(socket)
            }
        };
        let (stream, sasl) = peek_header(stream).await.map_err(|e| e.to_string())?;
        if sasl {
            acceptor
                .accept(Wire::new(stream, wire_control))
                .await
                .map_err(|e| e.to_string())
        } else {
            plain_acceptor
                .accept(Wire::new(stream, wire_control))
                .await
                .map_err(|e| e.to_string())
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

pub(super) async fn session_loop(mut session: ListenerSessionHandle, ctx: Arc<ConnCtx>) {
    let replies: Replies = Arc::new(Mutex::new(Vec::new()));
    while let Some(attach) = session.next_incoming_attach().await {
        handle_attach(attach, &mut session, &ctx, &replies).await;
    }
}

pub(super) async fn refuse(
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

pub(super) async fn handle_attach(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &Arc<ConnCtx>,
    replies: &Replies,
) {
    match attach.role {
        Role::Sender => {
            let addr = target_address(&attach);
            match addr {
                Some(a) if node_of(&a).is_some() => {
                    let node = node_of(&a).unwrap_or(Node::Cbs);
                    match node_acceptor()
                        .accept_incoming_attach(attach, session)
                        .await
                    {
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
                    let target = target_address(&attach);
                    match node_acceptor()
                        .accept_incoming_attach(attach, session)
                        .await
                    {
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
                    if is_consumer_address(&a) {
                        return consumer_attach(attach, a, session, ctx).await;
                    }
                    let desc = ctx.not_found(&normalise(&a, false).path);
                    refuse(attach, session, ctx, "amqp:not-found", desc).await
                }
            }
        }
    }
}

/// The target address of an attach, if it names one.
fn target_address(attach: &Attach) -> Option<String> {
    attach.target.as_deref().and_then(|t| match t {
        TargetArchetype::Target(t) => t.address.clone(),
        #[allow(unreachable_patterns)]
        _ => None,
    })
}

/// fe2o3's link acceptor with the default source and target checks.
type PlainLinkAcceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

/// The acceptor of request and reply links.
fn node_acceptor() -> PlainLinkAcceptor {
    LinkAcceptor::builder()
        .properties(link_properties())
        .build()
}

/// A byte stream the hub serves AMQP over (TCP or TLS).
pub(super) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Unpin + Send + 'static
{
}
impl<
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Unpin + Send + 'static,
    > Stream for T
{
}

/// Reads the client's 8-byte protocol header and hands it back in front of the stream; says
/// whether it asks for SASL (protocol id 3) or for AMQP straight away (id 0).
async fn peek_header(mut stream: Box<dyn Stream>) -> std::io::Result<(Prefixed, bool)> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await?;
    let sasl = header[4] == 3;
    Ok((
        Prefixed {
            prefix: header.to_vec(),
            at: 0,
            inner: stream,
        },
        sasl,
    ))
}

/// A stream whose first bytes were already read: they are read again first.
#[derive(Debug)]
pub(super) struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: Box<dyn Stream>,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
