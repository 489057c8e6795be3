//! The byte stream under each connection: a kill switch for fault injection, and a rewriter
//! that puts `max-message-size` into producer ATTACH replies without fe2o3 enforcing it.
//!
//! fe2o3's receiver detaches the whole link when a delivery exceeds the advertised size, but
//! the service rejects only that delivery (PROTOCOL E.3/J). So producer links are accepted with
//! no local limit and the advertised limit is written into the outgoing ATTACH here.

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use fe2o3_amqp_types::performatives::Attach;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared per-connection controls for a [`Wire`].
#[derive(Debug, Default)]
pub(crate) struct WireControl {
    /// Once set, reads see EOF and writes fail; nothing more reaches the peer.
    pub killed: AtomicBool,
    /// Link name → max-message-size to advertise in our ATTACH for that link.
    pub advertise: Mutex<HashMap<String, u64>>,
}

/// Stream wrapper; see the module docs.
pub(crate) struct Wire<S> {
    inner: S,
    control: Arc<WireControl>,
    /// Bytes accepted from fe2o3 but not yet parsed into whole units.
    pending: Vec<u8>,
    /// Bytes ready for the socket.
    out: Vec<u8>,
    /// Raw bytes still to pass through for a frame that was forced out partially.
    passthrough: usize,
}

impl<S> std::fmt::Debug for Wire<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire").finish_non_exhaustive()
    }
}

impl<S> Wire<S> {
    pub(crate) fn new(inner: S, control: Arc<WireControl>) -> Self {
        Self {
            inner,
            control,
            pending: Vec::new(),
            out: Vec::new(),
            passthrough: 0,
        }
    }

    /// Moves every complete unit (protocol header or frame) from `pending` to `out`.
    fn process(&mut self, force: bool) {
        loop {
            if self.passthrough > 0 {
                let n = self.passthrough.min(self.pending.len());
                self.out.extend(self.pending.drain(..n));
                self.passthrough -= n;
                if self.passthrough > 0 {
                    return;
                }
            }
            if self.pending.is_empty() {
                return;
            }
            if self.pending.len() < 8 {
                if force {
                    self.out.append(&mut self.pending);
                }
                return;
            }
            if &self.pending[..4] == b"AMQP" {
                self.out.extend(self.pending.drain(..8));
                continue;
            }
            let size = u32::from_be_bytes([
                self.pending[0],
                self.pending[1],
                self.pending[2],
                self.pending[3],
            ]) as usize;
            if size < 8 {
                // Not a frame we understand; stop rewriting and pass everything through.
                self.out.append(&mut self.pending);
                return;
            }
            if self.pending.len() < size {
                if force {
                    self.passthrough = size - self.pending.len();
                    self.out.append(&mut self.pending);
                }
                return;
            }
            let frame: Vec<u8> = self.pending.drain(..size).collect();
            let frame = self.rewrite(&frame).unwrap_or(frame);
            let frame = crate::fullframe::pad(&frame).unwrap_or(frame);
            self.out.extend_from_slice(&frame);
        }
    }

    fn rewrite(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let doff = frame[4] as usize * 4;
        let ftype = frame[5];
        if ftype != 0 || doff < 8 || frame.len() <= doff + 3 {
            return None;
        }
        let body = &frame[doff..];
        let is_attach = body[0] == 0x00
            && ((body[1] == 0x53 && body[2] == 0x12)
                || (body[1] == 0x80
                    && body.len() > 10
                    && body[2..10] == [0, 0, 0, 0, 0, 0, 0, 0x12]));
        if !is_attach {
            return None;
        }
        let mut attach: Attach = serde_amqp::from_slice(body).ok()?;
        let size = {
            let map = self.control.advertise.lock().unwrap();
            *map.get(&attach.name)?
        };
        attach.max_message_size = Some(size);
        let new_body = serde_amqp::to_vec(&attach).ok()?;
        let total = doff + new_body.len();
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&(total as u32).to_be_bytes());
        out.extend_from_slice(&frame[4..doff]);
        out.extend_from_slice(&new_body);
        Some(out)
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.out) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    fn killed(&self) -> bool {
        self.control.killed.load(Ordering::SeqCst)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.control.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        this.pending.extend_from_slice(buf);
        this.process(false);
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.process(true);
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.killed() {
            this.process(true);
            match this.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
