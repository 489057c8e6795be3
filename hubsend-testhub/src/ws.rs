//! The WebSocket listener: AMQP carried in binary WebSocket messages, as the service serves it
//! on port 443, in front of the same AMQP server (same store, SASL, CBS, faults) as the raw
//! listener.
//!
//! After TLS (when the hub has it) the HTTP upgrade is checked: the path must be the one the
//! service serves (`/$servicebus/websocket`, with or without a trailing slash; in IoT Hub mode
//! `/$iothub/websocket`), else 404; `Sec-WebSocket-Protocol` must offer `AMQPWSB10` (what
//! Microsoft's SDKs send) or `amqp` (the OASIS binding), else 400, and the first of those the
//! client offers is echoed (a hub built with
//! [`HubConfig::websocket_echo_subprotocol`](crate::HubConfig::websocket_echo_subprotocol)`(false)`
//! leaves it out, to test clients against a server that does not echo).
//!
//! Then a pump task copies bytes between the WebSocket and an in-memory pipe whose other end
//! the AMQP server reads like any socket. Message boundaries carry no meaning in either
//! direction: what a client sends is fed to the server as a byte stream, and each chunk the
//! server writes goes out as one binary message (or, with
//! [`Faults::split_websocket_messages`](crate::Faults::split_websocket_messages), as two, so
//! frames span messages). A text message is a protocol error: the hub closes with 1003
//! (unsupported data) and drops the connection. Pings are answered by tungstenite while the
//! pump reads, and [`Faults::ping_websockets`](crate::Faults::ping_websockets) makes the hub
//! ping the client (pongs counted); a close from the client ends the connection.

use std::sync::{atomic::Ordering, Arc};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::{
    handshake::server::{ErrorResponse, Request, Response},
    http::{HeaderValue, StatusCode},
    protocol::{frame::coding::CloseCode, CloseFrame},
    Bytes, Message,
};
use tokio_tungstenite::WebSocketStream;

use crate::server::Shared;

/// The upgrade path of Event Hubs (and Service Bus); the service accepts it with or without a
/// trailing slash (Python and .NET send one, JavaScript does not).
pub(crate) const EVENT_HUBS_PATH: &str = "/$servicebus/websocket";
/// The upgrade path of IoT Hub.
pub(crate) const IOT_HUB_PATH: &str = "/$iothub/websocket";
/// The subprotocols accepted, in no order of preference: the first the client offers wins.
pub(crate) const SUBPROTOCOLS: [&str; 2] = ["AMQPWSB10", "amqp"];
/// The pipe between the pump and the AMQP server: room for a few 64 KiB frames.
const PIPE_BYTES: usize = 256 * 1024;

/// What the AMQP bytes of an accepted connection travel in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Straight on the (TLS) stream: the 5671/5672 listener.
    Raw,
    /// In binary WebSocket messages after an HTTP upgrade: the WebSocket listener.
    WebSocket,
}

/// What the upgrade must look like for this hub.
#[derive(Clone, Debug)]
pub(crate) struct Upgrade {
    /// IoT Hub mode serves `/$iothub/websocket`, Event Hubs mode `/$servicebus/websocket`.
    pub(crate) iothub: bool,
    /// Whether the 101 names the chosen subprotocol (a conforming server does).
    pub(crate) echo: bool,
}

impl Upgrade {
    /// The path this hub serves upgrades on.
    fn path(&self) -> &'static str {
        if self.iothub {
            IOT_HUB_PATH
        } else {
            EVENT_HUBS_PATH
        }
    }

    /// Checks the client's upgrade request: the answer, or the refusal to send instead.
    #[allow(clippy::result_large_err)] // tungstenite's callback signature.
    fn check(&self, request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: String| {
            tracing::info!(%status, reason = %why, "websocket upgrade refused");
            let mut refusal = ErrorResponse::new(Some(why));
            *refusal.status_mut() = status;
            refusal
        };
        let path = request.uri().path();
        if path.trim_end_matches('/') != self.path() {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "no WebSocket endpoint at `{path}`; this hub serves `{}`",
                    self.path()
                ),
            ));
        }
        let offered: Vec<&str> = request
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let chosen = offered
            .iter()
            .find_map(|o| SUBPROTOCOLS.iter().copied().find(|p| p == o));
        let Some(chosen) = chosen else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "Sec-WebSocket-Protocol must offer AMQPWSB10 or amqp (offered: {offered:?})"
                ),
            ));
        };
        if self.echo {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
        }
        tracing::debug!(path, subprotocol = chosen, "websocket upgrade");
        Ok(response)
    }
}

/// Runs the upgrade on `stream` and returns the stream the AMQP server reads: one end of a
/// pipe, the other end pumped to and from the WebSocket by a task of its own.
#[allow(clippy::result_large_err)] // tungstenite's callback signature.
pub(crate) async fn accept<S>(
    stream: S,
    upgrade: Upgrade,
    shared: Arc<Shared>,
) -> Result<DuplexStream, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let socket =
        tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp| upgrade.check(req, resp))
            .await
            .map_err(|e| format!("websocket handshake: {e}"))?;
    let (server_end, pump_end) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(pump(socket, pump_end, shared));
    Ok(server_end)
}

/// Copies client messages into the pipe and pipe bytes out as binary messages until either
/// side ends, a text message arrives, or [`Faults::close_websockets`](crate::Faults::close_websockets)
/// fires.
async fn pump<S>(mut socket: WebSocketStream<S>, pipe: DuplexStream, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut from_server, mut to_server) = tokio::io::split(pipe);
    let faults = &shared.faults;
    let mut closing = faults.ws_close.subscribe();
    let mut pinging = faults.ws_ping.subscribe();
    let mut chunk = vec![0u8; 64 * 1024];
    let end = loop {
        tokio::select! {
            incoming = socket.next() => match incoming {
                Some(Ok(Message::Binary(data))) => {
                    if to_server.write_all(&data).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    break Some(CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "AMQP travels in binary messages".into(),
                    });
                }
                // The client's close is answered by tungstenite as the stream ends.
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Ok(Message::Pong(_))) => {
                    shared.stat(|s| s.websocket_pongs_received += 1);
                }
                // Pings are answered by tungstenite; raw frames carry nothing.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    break None;
                }
            },
            read = from_server.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                }),
                Ok(n) => {
                    if send(&mut socket, &chunk[..n], faults).await.is_err() {
                        break None;
                    }
                }
            },
            _ = pinging.changed() => {
                let ping = Message::Ping(Bytes::from_static(b"hubsend-testhub"));
                if socket.send(ping).await.is_err() {
                    break None;
                }
            }
            _ = closing.changed() => {
                tracing::info!("closing websocket (fault)");
                break Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: "closed by the test hub's fault injection".into(),
                });
            }
        }
    };
    if let Some(frame) = end {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), socket.close(Some(frame)))
            .await;
    } else {
        let _ = socket.flush().await;
    }
}

/// Sends `bytes` as one binary message, or as two when messages are to be split.
async fn send<S>(
    socket: &mut WebSocketStream<S>,
    bytes: &[u8],
    faults: &crate::faults::FaultShared,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if bytes.len() > 1 && faults.ws_split.load(Ordering::Relaxed) {
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        socket
            .feed(Message::Binary(Bytes::copy_from_slice(head)))
            .await?;
        socket
            .send(Message::Binary(Bytes::copy_from_slice(tail)))
            .await
    } else {
        socket
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await
    }
}
