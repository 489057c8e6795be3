//! The transport layer: a byte stream to the hub, and nothing of AMQP above the frame.
//!
//! [`connect`] dials an [`Endpoint`] and returns a [`Connected`]: a boxed stream ready for
//! fe2o3's `open_with_stream`, and a [`Lost`] handle that resolves the moment that stream ends.
//! What sits between the socket and fe2o3, from the bottom:
//!
//! 1. **TCP**, with Nagle off (AMQP writes whole frames and waits for answers; delaying small
//!    frames only adds latency).
//! 2. **TLS** through [`crate::tls::connect`], when the endpoint has a client configuration.
//!    Azure expects the TLS handshake first, with no AMQP TLS protocol header.
//! 3. **The frame guard** ([`guard`]): follows the peer's frames and fails the read that
//!    would hand fe2o3 a DISPOSITION wide enough to stall its session (issue #11, defect 10).
//! 4. **The loss watch** ([`watch`]): flips [`Lost`] on end of stream, a read or write error
//!    (the guard's refusal included), or when fe2o3 drops the stream.
//!
//! Layers 3 and 4 wrap any stream ([`Connected::over`]), so an in-memory duplex in a test gets
//! the same treatment as a socket.
//!
//! # What can fail
//! Every error is [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] with the cause kept as
//! its source, and its message says which step failed: the host name did not resolve, the
//! host refused the connection (nothing listening on that port), the host could not be
//! reached, the TLS handshake failed, or [`Endpoint::connect_timeout`] ran out (and in which
//! step).
//!
//! # Routes and framings
//! [`Route`] says how the TCP connection reaches the host, [`Framing`] what the AMQP bytes
//! travel in. An HTTP CONNECT proxy (feature `proxy`) is a `Route` variant: dial the proxy,
//! ask it for a tunnel, and carry on with the tunnel's `TcpStream`, so TLS above it is
//! unchanged. AMQP over WebSockets (feature `websockets`) is a `Framing` variant: after TLS,
//! upgrade to a WebSocket and adapt its binary messages back into a byte stream, which the
//! guard and watch then wrap like any other.

pub(crate) mod guard;
#[cfg(feature = "proxy")]
pub(crate) mod proxy;
pub(crate) mod watch;
#[cfg(feature = "websockets")]
pub(crate) mod ws;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};

pub(crate) use watch::Lost;

/// A byte stream the AMQP layer can run over. `Debug` because fe2o3's `open_with_stream`
/// asks for it (it names the stream in its tracing spans).
pub(crate) trait Io: AsyncRead + AsyncWrite + fmt::Debug + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + fmt::Debug + Unpin + Send + 'static> Io for T {}

/// The stream [`connect`] returns, whatever it is made of.
pub(crate) type BoxIo = Box<dyn Io>;

/// How the TCP connection reaches the endpoint's host.
#[derive(Debug, Clone, Default)]
pub(crate) enum Route {
    /// Straight to `host:port`.
    #[default]
    Direct,
    /// Through an HTTP CONNECT tunnel ([`proxy`]): dial the proxy, send `CONNECT host:port`
    /// (with Basic credentials that `Debug` never shows), read the answer head exactly (no
    /// read-ahead past it), and continue over the same `TcpStream`.
    #[cfg(feature = "proxy")]
    Proxy(proxy::Proxy),
    /// Tests only: an in-memory stream to a peer in the same process (no TCP, no TLS), so
    /// engine tests run against fe2o3's acceptor over `tokio::io::duplex` in paused time.
    #[cfg(test)]
    Memory(Memory),
}

/// Tests only: opens a new in-memory stream for each connection ([`Route::Memory`]).
#[cfg(test)]
#[derive(Clone)]
pub(crate) struct Memory(pub(crate) Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>);

#[cfg(test)]
impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Memory")
    }
}

/// What carries the AMQP bytes over TLS (or TCP).
#[derive(Debug, Clone, Default)]
pub(crate) enum Framing {
    /// AMQP frames directly on the stream.
    #[default]
    Raw,
    /// Binary WebSocket messages on an HTTP upgrade ([`ws`]), adapted back into a byte
    /// stream before the guard; `host`/`port` then name the WebSocket server (443).
    #[cfg(feature = "websockets")]
    WebSocket(WebSocket),
}

/// A WebSocket to carry AMQP in.
#[cfg(feature = "websockets")]
#[derive(Debug, Clone)]
pub(crate) struct WebSocket {
    /// The upgrade path: `/$servicebus/websocket/` (Event Hubs) or `/$iothub/websocket`.
    pub(crate) path: String,
    /// `Sec-WebSocket-Protocol`: `AMQPWSB10` (Microsoft's SDKs) or `amqp` (the OASIS binding).
    pub(crate) subprotocol: String,
}

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// The host to dial, and the TLS server name.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// TLS client configuration, or `None` for plain TCP (only the test hub needs that).
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// How long everything up to a usable stream may take: name resolution, TCP, TLS.
    pub(crate) connect_timeout: Duration,
    pub(crate) route: Route,
    pub(crate) framing: Framing,
}

impl Endpoint {
    /// The connect timeout when none is set: the producer's default (`ProducerOptions`).
    pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Plain TCP to `host:port`, direct, raw AMQP framing.
    pub(crate) fn new(host: impl Into<String>, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
            tls: None,
            connect_timeout: Endpoint::DEFAULT_CONNECT_TIMEOUT,
            route: Route::Direct,
            framing: Framing::Raw,
        }
    }

    /// Uses TLS with `config` (or plain TCP with `None`).
    pub(crate) fn tls(mut self, config: Option<Arc<rustls::ClientConfig>>) -> Endpoint {
        self.tls = config;
        self
    }

    /// Sets [`route`](Self::route).
    pub(crate) fn route(mut self, route: Route) -> Endpoint {
        self.route = route;
        self
    }

    /// Sets [`framing`](Self::framing).
    pub(crate) fn framing(mut self, framing: Framing) -> Endpoint {
        self.framing = framing;
        self
    }

    /// `host:port` as it goes in a URL or an HTTP `CONNECT`/`Host` line: an IPv6 literal in
    /// brackets (`[::1]:443`), which a bare `::1:443` would not parse as.
    #[cfg(any(feature = "websockets", feature = "proxy"))]
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub(crate) fn connect_timeout(mut self, timeout: Duration) -> Endpoint {
        self.connect_timeout = timeout;
        self
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The TLS configuration says nothing useful in a log line beyond whether it is on.
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("route", &self.route)
            .field("framing", &self.framing)
            .finish()
    }
}

/// How a builder wants to reach the hub: WebSockets or not, and which proxy. Collected by
/// the builders' setters, turned into a [`Route`] and a [`Framing`] at connect.
#[derive(Clone, Default)]
pub(crate) struct NetworkOptions {
    pub(crate) websockets: bool,
    pub(crate) subprotocol: Option<String>,
    /// The proxy URL as given; it may hold a password, so `Debug` never shows it.
    pub(crate) proxy: Option<String>,
    pub(crate) proxy_from_env: bool,
}

impl fmt::Debug for NetworkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkOptions")
            .field("websockets", &self.websockets)
            .field("subprotocol", &self.subprotocol)
            .field("proxy", &self.proxy.as_ref().map(|_| "<redacted>"))
            .field("proxy_from_env", &self.proxy_from_env)
            .finish()
    }
}

impl NetworkOptions {
    /// The subprotocol Microsoft's SDKs ask for, and hubsend's default.
    #[cfg(feature = "websockets")]
    pub(crate) const DEFAULT_SUBPROTOCOL: &'static str = "AMQPWSB10";

    /// The port to dial when none was set: 443 for WebSockets over TLS, 80 plain, `None`
    /// (the AMQP default) otherwise.
    pub(crate) fn default_port(&self, tls: bool) -> Option<u16> {
        self.websockets.then_some(if tls { 443 } else { 80 })
    }

    /// The route and framing to reach `host`; `ws_path` is the WebSocket upgrade path.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for a proxy URL that does not parse, or an option whose
    /// cargo feature (`websockets`, `proxy`) this build lacks.
    pub(crate) fn resolve(&self, host: &str, ws_path: &str) -> Result<(Route, Framing)> {
        let framing = if self.websockets {
            #[cfg(feature = "websockets")]
            {
                Framing::WebSocket(WebSocket {
                    path: ws_path.to_string(),
                    subprotocol: self
                        .subprotocol
                        .clone()
                        .unwrap_or_else(|| Self::DEFAULT_SUBPROTOCOL.to_string()),
                })
            }
            #[cfg(not(feature = "websockets"))]
            {
                let _ = ws_path;
                return Err(missing_feature("websockets"));
            }
        } else {
            Framing::Raw
        };
        let route = if self.proxy.is_some() || self.proxy_from_env {
            #[cfg(feature = "proxy")]
            {
                let chosen = match &self.proxy {
                    Some(url) => Some(proxy::Proxy::parse(url)?),
                    None => proxy::Proxy::from_env(host)?,
                };
                chosen.map_or(Route::Direct, Route::Proxy)
            }
            #[cfg(not(feature = "proxy"))]
            {
                let _ = host;
                return Err(missing_feature("proxy"));
            }
        } else {
            Route::Direct
        };
        Ok((route, framing))
    }
}

/// The error for an option whose cargo feature this build lacks.
#[cfg(not(all(feature = "websockets", feature = "proxy")))]
fn missing_feature(feature: &str) -> Error {
    Error::new(
        ErrorKind::InvalidConfig,
        format!("this build of hubsend lacks the `{feature}` cargo feature"),
    )
}

/// A stream to the hub and the handle that tells when it is gone.
pub(crate) struct Connected {
    /// Hand this to fe2o3 (`Connection::builder()...open_with_stream(io)`).
    pub(crate) io: BoxIo,
    /// Resolves once `io` has ended, for whatever reason (see [`watch::Loss`]).
    pub(crate) lost: Lost,
}

impl Connected {
    /// Puts the frame guard and the loss watch over `stream`, which must carry AMQP from its
    /// first byte (the peer's protocol header) on.
    pub(crate) fn over(stream: impl Io) -> Connected {
        let (io, lost) = watch::Watched::new(guard::Guarded::new(stream));
        Connected {
            io: Box::new(io),
            lost,
        }
    }
}

impl fmt::Debug for Connected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("lost", &self.lost.cause())
            .finish_non_exhaustive()
    }
}

/// Dials `endpoint`: TCP (directly or through a proxy's tunnel), then TLS if configured,
/// then the WebSocket upgrade if asked for, under the frame guard and loss watch.
///
/// # Errors
/// [`ErrorKind::Connection`] when the name does not resolve, the host refuses or cannot be
/// reached, the proxy cannot be reached or refuses the tunnel (the message names the proxy
/// and its status), the TLS handshake fails, or the WebSocket upgrade is refused;
/// [`ErrorKind::Timeout`] when [`Endpoint::connect_timeout`] runs out first. The message
/// names the step.
pub(crate) async fn connect(endpoint: &Endpoint) -> Result<Connected> {
    let deadline = Instant::now() + endpoint.connect_timeout;
    let tcp = match &endpoint.route {
        Route::Direct => dial(endpoint, &endpoint.host, endpoint.port, deadline).await?,
        #[cfg(feature = "proxy")]
        Route::Proxy(through) => proxy::tunnel(endpoint, through, deadline).await?,
        #[cfg(test)]
        Route::Memory(open) => return Ok(Connected::over((open.0)())),
    };
    let stream: BoxIo = match &endpoint.tls {
        Some(config) => {
            let handshake = crate::tls::connect(config.clone(), &endpoint.host, tcp);
            Box::new(within(endpoint, deadline, "in the TLS handshake", handshake).await?)
        }
        None => Box::new(tcp),
    };
    match &endpoint.framing {
        Framing::Raw => Ok(Connected::over(stream)),
        #[cfg(feature = "websockets")]
        Framing::WebSocket(socket) => {
            let upgrade = ws::upgrade(endpoint, socket, stream);
            let ws = within(endpoint, deadline, "in the WebSocket upgrade", upgrade).await?;
            Ok(Connected::over(ws))
        }
    }
}

/// Resolves `host` and opens a TCP connection to the first address that answers.
async fn dial(endpoint: &Endpoint, host: &str, port: u16, deadline: Instant) -> Result<TcpStream> {
    let port = &port;
    let lookup = async {
        tokio::net::lookup_host((host, *port)).await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot resolve `{host}`: unknown host or DNS failure"),
            )
            .with_source(e)
        })
    };
    let addrs: Vec<SocketAddr> = within(endpoint, deadline, "resolving the host name", lookup)
        .await?
        .collect();
    let attempts = async {
        let mut failure = None;
        for addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => failure = Some((addr, e)),
            }
        }
        Err(match failure {
            Some((addr, e)) => tcp_error(host, *port, *addr, e),
            None => Error::new(
                ErrorKind::Connection,
                format!("cannot resolve `{host}`: it has no address"),
            ),
        })
    };
    let tcp = within(endpoint, deadline, "opening the TCP connection", attempts).await?;
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot turn off Nagle's algorithm");
    }
    Ok(tcp)
}

/// The error for the last address that failed: refused, timed out by the system, or other.
fn tcp_error(host: &str, port: u16, addr: SocketAddr, e: std::io::Error) -> Error {
    let error = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Error::new(
            ErrorKind::Connection,
            format!("{host}:{port} ({addr}) refused the connection: nothing is listening there"),
        ),
        std::io::ErrorKind::TimedOut => Error::new(
            ErrorKind::Timeout,
            format!("connecting to {host}:{port} ({addr}) timed out"),
        ),
        _ => Error::new(
            ErrorKind::Connection,
            format!("cannot reach {host}:{port} ({addr})"),
        ),
    };
    error.with_source(e)
}

/// Runs one step of connecting under the overall deadline; `step` says which in the error.
async fn within<T>(
    endpoint: &Endpoint,
    deadline: Instant,
    step: &str,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|elapsed| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "connecting to {}:{} timed out after {:?} ({step})",
                    endpoint.host, endpoint.port, endpoint.connect_timeout
                ),
            )
            .with_source(elapsed)
        })?
}

#[cfg(test)]
mod tests;
