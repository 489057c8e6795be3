//! AMQP over WebSockets: an HTTP upgrade on the (TLS) stream, then AMQP frames in binary
//! messages, adapted back into a byte stream for the guard, the watch and fe2o3.
//!
//! Message boundaries mean nothing (a frame may span messages, one message may hold several
//! frames), so the adapter hands each binary message's bytes on as they come and sends each
//! write as one message. A text message is a protocol error; ping and pong are answered by
//! tungstenite itself; a close message is the end of the stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tokio_tungstenite::WebSocketStream;

use super::{BoxIo, Endpoint, WebSocket};
use crate::error::{Error, ErrorKind, Result};

/// Upgrades `stream` (TLS or plain TCP to `endpoint`) to a WebSocket at `ws.path`, asking for
/// `ws.subprotocol`, and returns the byte-stream adapter over it.
pub(super) async fn upgrade(endpoint: &Endpoint, ws: &WebSocket, stream: BoxIo) -> Result<WsIo> {
    let scheme = if endpoint.tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}{}", endpoint.authority(), ws.path);
    let refused = |detail: String| {
        Error::new(
            ErrorKind::Connection,
            format!("the WebSocket upgrade at {url} failed: {detail}"),
        )
    };
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| refused("invalid URL".into()).with_source(e))?;
    let protocol = HeaderValue::from_str(&ws.subprotocol)
        .map_err(|e| refused("invalid subprotocol".into()).with_source(e))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol);
    let (socket, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| match &e {
            tungstenite::Error::Http(response) => {
                refused(format!("the server answered {}", response.status())).with_source(e)
            }
            _ => refused(e.to_string()).with_source(e),
        })?;
    // tungstenite refuses a 101 naming a subprotocol we did not ask for, or none at all.
    tracing::debug!(status = %response.status(), subprotocol = %ws.subprotocol, "WebSocket open");
    Ok(WsIo {
        socket,
        pending: Bytes::new(),
    })
}

/// A WebSocket carrying AMQP, as a byte stream.
pub(crate) struct WsIo {
    socket: WebSocketStream<BoxIo>,
    /// What is left of the last binary message after a short read.
    pending: Bytes,
}

impl fmt::Debug for WsIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsIo")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")
        }
        other => io::Error::other(other),
    }
}

impl AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match ready!(Pin::new(&mut this.socket).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer sent a text WebSocket message; AMQP travels in binary ones",
                    )))
                }
                // Pings are answered by tungstenite; pongs and raw frames carry nothing.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.socket).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut this.socket)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(io_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket)
            .poll_close(cx)
            .map_err(io_error)
    }
}
