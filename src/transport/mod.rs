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
//! # Where the next transports go
//! [`Route`] says how the TCP connection reaches the host, [`Framing`] what the AMQP bytes
//! travel in. An HTTP CONNECT proxy is a `Route` variant: dial the proxy, ask it for a tunnel,
//! and carry on with the tunnel's `TcpStream`, so TLS above it is unchanged. AMQP over
//! WebSockets is a `Framing` variant: after TLS, upgrade to a WebSocket and adapt its binary
//! messages back into a byte stream, which the guard and watch then wrap like any other.

// Nothing dials through here yet: the AMQP layer's `open()` moves onto `connect` in the lead's
// rewrite. Until then only the tests use this module.
#![cfg_attr(
    not(test),
    expect(
        dead_code,
        unused_imports,
        reason = "open() is not wired to the transport layer yet"
    )
)]

pub(crate) mod guard;
pub(crate) mod watch;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};

pub(crate) use watch::{Loss, Lost};

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
    // Next: `Proxy(Proxy)`, an HTTP CONNECT tunnel: dial the proxy, send
    // `CONNECT host:port` (with Basic credentials that `Debug` never shows), read the answer
    // head exactly (no read-ahead past it), and continue over the same `TcpStream`.
}

/// What carries the AMQP bytes over TLS (or TCP).
#[derive(Debug, Clone, Default)]
pub(crate) enum Framing {
    /// AMQP frames directly on the stream.
    #[default]
    Raw,
    // Next: `WebSocket(WebSocket)`, binary messages on an HTTP upgrade of `path` with a
    // chosen subprotocol (`AMQPWSB10` or `amqp`), adapted back into a byte stream before the
    // guard; `host`/`port` then name the WebSocket server (443).
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

/// A stream to the hub and the handle that tells when it is gone.
pub(crate) struct Connected {
    /// Hand this to fe2o3 (`Connection::builder()...open_with_stream(io)`).
    pub(crate) io: BoxIo,
    /// Resolves once `io` has ended, for whatever reason (see [`Loss`]).
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

/// Dials `endpoint`: TCP, then TLS if configured, under the frame guard and loss watch.
///
/// # Errors
/// [`ErrorKind::Connection`] when the name does not resolve, the host refuses or cannot be
/// reached, or the TLS handshake fails; [`ErrorKind::Timeout`] when
/// [`Endpoint::connect_timeout`] runs out first. The message names the step.
pub(crate) async fn connect(endpoint: &Endpoint) -> Result<Connected> {
    let deadline = Instant::now() + endpoint.connect_timeout;
    let tcp = match &endpoint.route {
        Route::Direct => dial(endpoint, deadline).await?,
    };
    let connected = match &endpoint.tls {
        Some(config) => {
            let handshake = crate::tls::connect(config.clone(), &endpoint.host, tcp);
            Connected::over(within(endpoint, deadline, "in the TLS handshake", handshake).await?)
        }
        None => Connected::over(tcp),
    };
    match &endpoint.framing {
        Framing::Raw => Ok(connected),
    }
}

/// Resolves the host and opens a TCP connection to the first address that answers.
async fn dial(endpoint: &Endpoint, deadline: Instant) -> Result<TcpStream> {
    let Endpoint { host, port, .. } = endpoint;
    let lookup = async {
        tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map_err(|e| {
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
            Some((addr, e)) => tcp_error(endpoint, *addr, e),
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
fn tcp_error(endpoint: &Endpoint, addr: SocketAddr, e: std::io::Error) -> Error {
    let Endpoint { host, port, .. } = endpoint;
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
