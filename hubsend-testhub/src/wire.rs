//! The byte stream under each connection: a kill switch for fault injection, a rewriter
//! that puts `max-message-size` into producer ATTACH replies without fe2o3 enforcing it, and
//! the capture of producer payloads on the way in.
//!
//! fe2o3's receiver detaches the whole link when a delivery exceeds the advertised size, but
//! the service rejects only that delivery (PROTOCOL E.3/J). So producer links are accepted with
//! no local limit and the advertised limit is written into the outgoing ATTACH here.
//!
//! Capture: fe2o3 would scan and decode every byte of every delivery (and its batch sections
//! one by one) before the hub sees it, which made the decoding the hub's whole cost. So the
//! read side follows the client's ATTACH/DETACH/END frames to know which (channel, handle)
//! pairs are producer links (client role sender, target not `$cbs`/`$management`), lifts the
//! payload out of their TRANSFER frames, and hands fe2o3 the same frames with the payload
//! removed; the last frame of a delivery carries instead a tiny message naming a ticket
//! ([`marker`]) under which the payload waits in [`WireControl`]. fe2o3 still runs the link
//! protocol (credit, windows, settlement, multi-frame assembly) on frames it sees one for one.

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

use std::{future::Future, sync::atomic::AtomicU32};

use fe2o3_amqp_types::{
    definitions::Role,
    messaging::{Accepted, Body, DeliveryState, Message, TargetArchetype},
    performatives::{Attach, Begin, Detach, Disposition, Transfer},
    primitives::Value,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{faults::FaultShared, store::BufferPool};

/// Descriptor of the amqp-value that stands in for a captured payload.
const MARKER_DESCRIPTOR: &[u8] = b"hubsend-testhub:captured-payload";
/// Read buffer size: many 64 KiB frames per read.
const READ_CHUNK: usize = 1024 * 1024;
/// First capacity of a multi-frame payload's buffer when the pool has none (untouched pages
/// of a large allocation cost nothing; the buffer is shrunk to fit when complete).
const FIRST_CAPACITY: u64 = 4 * 1024 * 1024;
/// Frames larger than this are not parsed (fe2o3 refuses them anyway).
const MAX_PARSED_FRAME: usize = 64 * 1024 * 1024;
/// An empty AMQP frame (a heartbeat): size 8, data offset 2, type 0, channel 0.
const HEARTBEAT: [u8; 8] = [0, 0, 0, 8, 2, 0, 0, 0];

/// A producer delivery's payload, lifted out of its TRANSFER frames.
#[derive(Debug, Default)]
pub(crate) struct Captured {
    /// The encoded message; empty when the delivery was larger than the capture limit.
    pub bytes: Vec<u8>,
    /// The delivery's full size in bytes.
    pub size: u64,
}

/// Shared per-connection controls for a [`Wire`].
#[derive(Debug, Default)]
pub(crate) struct WireControl {
    /// Once set, reads see EOF and writes fail; nothing more reaches the peer.
    pub killed: AtomicBool,
    /// Link name → max-message-size to advertise in our ATTACH for that link.
    pub advertise: Mutex<HashMap<String, u64>>,
    /// Captured payloads by ticket, until the producer link takes them.
    captured: Mutex<HashMap<u64, Captured>>,
    /// Payloads larger than this are counted, not kept (they are rejected as oversize).
    pub capture_limit: u64,
    /// Where multi-frame payloads get their buffers.
    pool: Arc<BufferPool>,
    /// The hub's fault switches (the heartbeat flood, the all-ids disposition).
    faults: Arc<FaultShared>,
    /// Rejected dispositions still to hold back until the disposition after them.
    hold_requests: AtomicU32,
    /// Client channel → our channel, from the BEGIN replies we wrote.
    sessions: Mutex<HashMap<u16, u16>>,
    /// Frames the hub writes on its own (faults), whole, waiting for the next chance.
    inject: Mutex<Vec<u8>>,
}

impl WireControl {
    /// Controls whose capture keeps payloads up to `capture_limit` bytes, in buffers from
    /// `pool` when it has some.
    pub(crate) fn new(capture_limit: u64, pool: Arc<BufferPool>) -> Self {
        Self {
            capture_limit,
            pool,
            ..Self::default()
        }
    }

    /// The same controls, consulting `faults`.
    pub(crate) fn with_faults(mut self, faults: Arc<FaultShared>) -> Self {
        self.faults = faults;
        self
    }

    /// The next Rejected DISPOSITION written is held back and goes out in one write together
    /// with the DISPOSITION written after it (see [`Faults::reject_every_nth_coalesced`]).
    ///
    /// [`Faults::reject_every_nth_coalesced`]: crate::Faults::reject_every_nth_coalesced
    pub(crate) fn hold_next_rejection(&self) {
        self.hold_requests.fetch_add(1, Ordering::SeqCst);
    }

    /// Consumes one hold request if `frame` (a DISPOSITION body) is a rejection and one is due.
    fn take_hold(&self, body: &[u8]) -> bool {
        if self.hold_requests.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let rejected = serde_amqp::from_slice::<Disposition>(body)
            .is_ok_and(|d| matches!(d.state, Some(DeliveryState::Rejected(_))));
        rejected
            && self
                .hold_requests
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }

    /// Queues one DISPOSITION settling (accepted) every delivery id, on our end of the session
    /// the client opened on `client_channel`.
    fn inject_dispose_all(&self, client_channel: u16) {
        let channel = self
            .sessions
            .lock()
            .unwrap()
            .get(&client_channel)
            .copied()
            .unwrap_or(client_channel);
        let disposition = Disposition {
            role: Role::Receiver,
            first: 0,
            last: Some(u32::MAX),
            settled: true,
            state: Some(DeliveryState::Accepted(Accepted {})),
            batchable: false,
        };
        let Ok(body) = serde_amqp::to_vec(&disposition) else {
            return;
        };
        let mut frame = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[2, 0]);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&body);
        let frame = crate::fullframe::pad(&frame).unwrap_or(frame);
        self.inject.lock().unwrap().extend_from_slice(&frame);
    }

    /// Takes the payload a received message stands in for, if it is a capture marker.
    pub(crate) fn take(&self, msg: &Message<Body<Value>>) -> Option<Captured> {
        let Body::Value(v) = &msg.body else {
            return None;
        };
        let Value::Described(d) = &v.0 else {
            return None;
        };
        let named = matches!(&d.descriptor,
            serde_amqp::descriptor::Descriptor::Name(n) if n.0.as_bytes() == MARKER_DESCRIPTOR);
        let Value::Ulong(ticket) = d.value else {
            return None;
        };
        if !named {
            return None;
        }
        self.captured.lock().unwrap().remove(&ticket)
    }
}

/// The encoded message fe2o3 receives in place of a captured payload: an amqp-value section
/// holding `ticket` described by [`MARKER_DESCRIPTOR`].
fn marker(ticket: u64) -> Vec<u8> {
    let mut m = vec![0x00, 0x53, 0x77, 0x00, 0xa3, MARKER_DESCRIPTOR.len() as u8];
    m.extend_from_slice(MARKER_DESCRIPTOR);
    m.push(0x80);
    m.extend_from_slice(&ticket.to_be_bytes());
    m
}

/// Whether a target address names a request node (`$cbs`, `$management`) rather than a hub.
pub(crate) fn is_request_node(addr: &str) -> bool {
    let a = addr.trim_start_matches('/');
    a.eq_ignore_ascii_case("$cbs") || a.eq_ignore_ascii_case("$management")
}

/// Where a frame's performative is: the frame's data offset, the performative's descriptor
/// code (from a smallulong or ulong descriptor), and the offset of its list within the frame
/// body. `None` for a frame without a described performative (e.g. a heartbeat).
pub(crate) fn performative(frame: &[u8]) -> Option<(usize, u64, usize)> {
    let doff = *frame.get(4)? as usize * 4;
    if doff < 8 {
        return None;
    }
    let body = frame.get(doff..)?;
    if *body.first()? != 0x00 {
        return None;
    }
    match *body.get(1)? {
        0x53 => Some((doff, u64::from(*body.get(2)?), 3)),
        0x80 => Some((
            doff,
            u64::from_be_bytes(body.get(2..10)?.try_into().ok()?),
            10,
        )),
        _ => None,
    }
}

/// Appends to `out` a frame with the header of `frame` (whose header runs to `keep`: its data
/// offset, or further to keep the start of the body too), then `rest`, with the size fixed.
pub(crate) fn reframe_into(out: &mut Vec<u8>, frame: &[u8], keep: usize, rest: &[u8]) {
    let total = keep + rest.len();
    out.reserve(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&frame[4..keep]);
    out.extend_from_slice(rest);
}

/// [`reframe_into`] a new buffer.
pub(crate) fn reframe(frame: &[u8], keep: usize, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    reframe_into(&mut out, frame, keep, rest);
    out
}

/// A producer delivery being assembled.
#[derive(Debug, Default)]
struct Assembly {
    bytes: Vec<u8>,
    size: u64,
}

/// Read side state: unparsed input and frames ready for fe2o3.
#[derive(Debug, Default)]
struct ReadSide {
    /// Input buffer; `buf[start..end]` is unparsed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes for fe2o3; `ready[ready_pos..]` not handed out yet.
    ready: Vec<u8>,
    ready_pos: usize,
    /// Producer links of the client: (channel, handle) → delivery being assembled.
    producers: HashMap<(u16, u32), Option<Assembly>>,
    next_ticket: u64,
    /// Size of the incomplete frame at `start`, once its header is in.
    need: usize,
    /// Stop parsing and pass everything through (input we do not understand).
    raw: bool,
    eof: bool,
}

/// Stream wrapper; see the module docs.
pub(crate) struct Wire<S> {
    inner: S,
    control: Arc<WireControl>,
    read: ReadSide,
    /// Bytes accepted from fe2o3 but not yet parsed into whole units.
    pending: Vec<u8>,
    /// Bytes ready for the socket.
    out: Vec<u8>,
    /// Raw bytes still to pass through for a frame that was forced out partially.
    passthrough: usize,
    /// A rejection is waiting in `out` for the disposition after it; nothing is written.
    holding: bool,
    /// Next empty frame of the heartbeat flood, while it is armed.
    flood: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the hub has sent its OPEN: empty frames are legal only after it (a client in
    /// the middle of SASL or the open handshake would refuse them).
    opened: bool,
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
            read: ReadSide::default(),
            pending: Vec::new(),
            out: Vec::new(),
            passthrough: 0,
            holding: false,
            flood: None,
            opened: false,
        }
    }

    /// Notes what an outgoing frame means for the faults: the channel pairs of BEGIN replies,
    /// and the hold around a coalesced rejection (held from the rejection to the next
    /// disposition, which releases both).
    fn note_outgoing(&mut self, frame: &[u8]) {
        let Some((doff, code, _)) = performative(frame).filter(|_| frame[5] == 0) else {
            return;
        };
        let body = &frame[doff..];
        match code {
            0x10 => self.opened = true,
            0x11 => {
                if let Ok(Begin {
                    remote_channel: Some(theirs),
                    ..
                }) = serde_amqp::from_slice::<Begin>(body)
                {
                    let ours = u16::from_be_bytes([frame[6], frame[7]]);
                    self.control.sessions.lock().unwrap().insert(theirs, ours);
                }
            }
            0x15 if self.holding => self.holding = false,
            0x15 => self.holding = self.control.take_hold(body),
            _ => {}
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
            self.note_outgoing(&frame);
            self.out.extend_from_slice(&frame);
        }
    }

    fn rewrite(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let (doff, code, _) = performative(frame)?;
        if frame[5] != 0 || code != 0x12 {
            return None;
        }
        let body = &frame[doff..];
        let mut attach: Attach = serde_amqp::from_slice(body).ok()?;
        let size = {
            let map = self.control.advertise.lock().unwrap();
            *map.get(&attach.name)?
        };
        attach.max_message_size = Some(size);
        let new_body = serde_amqp::to_vec(&attach).ok()?;
        Some(reframe(frame, doff, &new_body))
    }
}

impl ReadSide {
    /// Parses every complete unit in the input into `ready`.
    fn parse(&mut self, control: &WireControl) {
        while self.start < self.end {
            let avail = &self.buf[self.start..self.end];
            if self.raw {
                self.ready.extend_from_slice(avail);
                self.start = self.end;
                return;
            }
            if avail.len() < 8 {
                self.need = 8;
                return;
            }
            if &avail[..4] == b"AMQP" {
                self.ready.extend_from_slice(&avail[..8]);
                self.start += 8;
                continue;
            }
            let size = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
            if !(8..=MAX_PARSED_FRAME).contains(&size) {
                self.raw = true;
                continue;
            }
            if avail.len() < size {
                self.need = size;
                return;
            }
            let (start, end) = (self.start, self.start + size);
            self.start = end;
            self.need = 0;
            let buf = std::mem::take(&mut self.buf);
            self.frame(&buf[start..end], control);
            self.buf = buf;
        }
    }

    /// Handles one whole frame: passes it on, noting producer links, or lifts its payload.
    fn frame(&mut self, frame: &[u8], control: &WireControl) {
        let channel = u16::from_be_bytes([frame[6], frame[7]]);
        let Some((doff, code, list)) = performative(frame).filter(|_| frame[5] == 0) else {
            self.ready.extend_from_slice(frame);
            return;
        };
        let body = &frame[doff..];
        match code {
            0x12 => {
                if let Ok(attach) = serde_amqp::from_slice::<Attach>(body) {
                    let key = (channel, attach.handle.0);
                    let address = attach.target.as_deref().and_then(|t| match t {
                        TargetArchetype::Target(t) => t.address.as_deref(),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    });
                    let producer =
                        attach.role == Role::Sender && address.is_some_and(|a| !is_request_node(a));
                    if producer {
                        self.producers.insert(key, None);
                    } else {
                        self.producers.remove(&key);
                    }
                }
            }
            0x16 => {
                if let Ok(detach) = serde_amqp::from_slice::<Detach>(body) {
                    self.producers.remove(&(channel, detach.handle.0));
                }
            }
            0x17 => self.producers.retain(|k, _| k.0 != channel),
            0x14 => {
                if let Some(perf_end) = crate::raw::skip_value(body, list) {
                    if self.transfer(frame, doff, perf_end, channel, control) {
                        return;
                    }
                }
            }
            _ => {}
        }
        self.ready.extend_from_slice(frame);
    }

    /// Lifts the payload of a producer link's TRANSFER; false when the frame is not one.
    fn transfer(
        &mut self,
        frame: &[u8],
        doff: usize,
        perf_end: usize,
        channel: u16,
        control: &WireControl,
    ) -> bool {
        let body = &frame[doff..];
        let Ok(transfer) = serde_amqp::from_slice::<Transfer>(&body[..perf_end]) else {
            return false;
        };
        let Some(slot) = self.producers.get_mut(&(channel, transfer.handle.0)) else {
            return false;
        };
        let payload = &body[perf_end..];
        let replacement = if transfer.aborted {
            *slot = None;
            Vec::new()
        } else {
            let asm = slot.get_or_insert_with(|| Assembly {
                bytes: if !transfer.more {
                    Vec::with_capacity(payload.len())
                } else {
                    control.pool.take().unwrap_or_else(|| {
                        Vec::with_capacity(control.capture_limit.min(FIRST_CAPACITY) as usize)
                    })
                },
                size: 0,
            });
            asm.size += payload.len() as u64;
            if asm.size <= control.capture_limit {
                asm.bytes.extend_from_slice(payload);
            } else {
                asm.bytes = Vec::new();
            }
            if transfer.more {
                Vec::new()
            } else {
                let asm = slot.take().unwrap_or_default();
                let mut bytes = asm.bytes;
                if bytes.capacity() - bytes.len() > bytes.len() / 8 + 4096 {
                    bytes.shrink_to_fit();
                }
                if control.faults.take_dispose_all() {
                    control.inject_dispose_all(channel);
                }
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                control.captured.lock().unwrap().insert(
                    ticket,
                    Captured {
                        bytes,
                        size: asm.size,
                    },
                );
                marker(ticket)
            }
        };
        reframe_into(&mut self.ready, frame, doff + perf_end, &replacement);
        true
    }
}

impl<S: AsyncRead + Unpin> Wire<S> {
    /// Fills `read.ready` with at least one byte, or reports EOF (nothing ready) or pending.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = &mut self.read;
        loop {
            if r.ready_pos < r.ready.len() {
                return Poll::Ready(Ok(()));
            }
            r.ready.clear();
            r.ready_pos = 0;
            r.parse(&self.control);
            if !r.ready.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if r.eof {
                // A truncated unit at EOF goes through as is; fe2o3 reports it.
                r.ready.extend_from_slice(&r.buf[r.start..r.end]);
                r.start = r.end;
                return Poll::Ready(Ok(()));
            }
            // Make room: move the unparsed tail to the front when the free space is short or
            // the incomplete frame would not fit.
            let want = READ_CHUNK.max(r.need);
            if r.buf.len() < want {
                r.buf.resize(want, 0);
            }
            if r.start > 0
                && (r.start == r.end
                    || r.buf.len() - r.end < READ_CHUNK / 8
                    || r.buf.len() - r.start < r.need)
            {
                r.buf.copy_within(r.start..r.end, 0);
                r.end -= r.start;
                r.start = 0;
            }
            let mut rb = ReadBuf::new(&mut r.buf[r.end..]);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        r.eof = true;
                    }
                    r.end += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    /// Writes what the hub sends on its own: injected frames and the heartbeat flood. Called
    /// from the read side, which fe2o3 polls all the time; only between whole frames.
    fn poll_inject(&mut self, cx: &mut Context<'_>) {
        if self.passthrough > 0 || !self.pending.is_empty() || self.killed() {
            return;
        }
        self.out.append(&mut self.control.inject.lock().unwrap());
        match self
            .control
            .faults
            .heartbeat_every()
            .filter(|_| self.opened)
        {
            Some(every) => {
                let timer = self
                    .flood
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
                while timer.as_mut().poll(cx).is_ready() {
                    self.out.extend_from_slice(&HEARTBEAT);
                    timer.as_mut().reset(tokio::time::Instant::now() + every);
                }
            }
            None => self.flood = None,
        }
        if !self.out.is_empty() && self.poll_drain(cx).is_ready() {
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.holding {
            return Poll::Ready(Ok(()));
        }
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

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.control.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        let filled = this.poll_fill(cx);
        this.poll_inject(cx);
        match filled {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let r = &mut this.read;
        let n = buf.remaining().min(r.ready.len() - r.ready_pos);
        buf.put_slice(&r.ready[r.ready_pos..r.ready_pos + n]);
        r.ready_pos += n;
        Poll::Ready(Ok(()))
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
        if this.holding {
            // Reported flushed: fe2o3 must go on to write the disposition that releases it.
            return Poll::Ready(Ok(()));
        }
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.holding = false;
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

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::{
        definitions::{Handle, ReceiverSettleMode, SenderSettleMode},
        messaging::{message::__private::Deserializable, Source, Target},
    };

    fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
        let mut f = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0]);
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn attach(handle: u32, role: Role, target: &str) -> Vec<u8> {
        let attach = Attach {
            name: format!("link-{handle}"),
            handle: Handle(handle),
            role,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::default())),
            target: Some(Box::new(TargetArchetype::Target(
                Target::builder().address(target).build(),
            ))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        serde_amqp::to_vec(&attach).unwrap()
    }

    fn transfer(handle: u32, id: u32, more: bool, payload: &[u8]) -> Vec<u8> {
        let t = Transfer {
            handle: Handle(handle),
            delivery_id: Some(id),
            delivery_tag: Some(vec![id as u8].into()),
            message_format: Some(0),
            settled: None,
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        let mut b = serde_amqp::to_vec(&t).unwrap();
        b.extend_from_slice(payload);
        b
    }

    /// Runs `input` through a read side; returns the frames fe2o3 would see.
    fn run(input: &[u8], control: &WireControl) -> Vec<Vec<u8>> {
        let mut rs = ReadSide {
            buf: input.to_vec(),
            end: input.len(),
            ..ReadSide::default()
        };
        rs.parse(control);
        assert_eq!(rs.start, rs.end, "everything parsed");
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < rs.ready.len() {
            let n = if &rs.ready[pos..pos + 4] == b"AMQP" {
                8
            } else {
                u32::from_be_bytes(rs.ready[pos..pos + 4].try_into().unwrap()) as usize
            };
            out.push(rs.ready[pos..pos + n].to_vec());
            pos += n;
        }
        out
    }

    /// The payload of a TRANSFER frame.
    fn payload(frame: &[u8]) -> &[u8] {
        let body = &frame[8..];
        &body[crate::raw::skip_value(body, 3).unwrap()..]
    }

    #[test]
    fn producer_payloads_are_captured_and_others_pass() {
        let control = WireControl::new(1 << 20, Arc::default());
        let message = vec![0x00, 0x53, 0x75, 0xa0, 6, 1, 2, 3, 4, 5, 6];
        let mut input = b"AMQP\x00\x01\x00\x00".to_vec();
        input.extend(frame(0, &attach(0, Role::Sender, "telemetry")));
        input.extend(frame(0, &attach(1, Role::Sender, "$cbs")));
        // A delivery in three frames on the producer link.
        input.extend(frame(0, &transfer(0, 0, true, &message[..4])));
        input.extend(frame(0, &transfer(0, 0, true, &message[4..9])));
        input.extend(frame(0, &transfer(0, 0, false, &message[9..])));
        // A request on $cbs and a transfer on another channel pass through.
        input.extend(frame(0, &transfer(1, 1, false, &message)));
        input.extend(frame(3, &transfer(0, 2, false, &message)));
        // After the detach, handle 0 is not a producer any more.
        let detach = Detach {
            handle: Handle(0),
            closed: true,
            error: None,
        };
        input.extend(frame(0, &serde_amqp::to_vec(&detach).unwrap()));
        input.extend(frame(0, &transfer(0, 3, false, &message)));

        let frames = run(&input, &control);
        assert_eq!(frames.len(), 10);
        assert_eq!(frames[0], b"AMQP\x00\x01\x00\x00");
        assert_eq!(
            frames[1..3],
            [
                frame(0, &attach(0, Role::Sender, "telemetry")),
                frame(0, &attach(1, Role::Sender, "$cbs"))
            ]
        );
        // Partial frames reach fe2o3 without their payload; the last carries a marker.
        assert!(payload(&frames[3]).is_empty());
        assert!(payload(&frames[4]).is_empty());
        let marked: Deserializable<Message<Body<Value>>> =
            serde_amqp::from_slice(payload(&frames[5])).unwrap();
        let captured = control.take(&marked.0).expect("marker names a capture");
        assert_eq!(captured.bytes, message);
        assert_eq!(captured.size, message.len() as u64);
        assert!(control.take(&marked.0).is_none(), "taken once");
        // Performatives are kept as they were.
        let t: Transfer = serde_amqp::from_slice(&frames[4][8..]).unwrap();
        assert!(t.more);
        assert_eq!(t.delivery_id, Some(0));
        for f in &frames[6..] {
            assert!(
                f == &frame(0, &transfer(1, 1, false, &message))
                    || f == &frame(3, &transfer(0, 2, false, &message))
                    || f == &frame(0, &serde_amqp::to_vec(&detach).unwrap())
                    || f == &frame(0, &transfer(0, 3, false, &message))
            );
        }
        assert_eq!(payload(&frames[9]), &message[..]);
    }

    #[test]
    fn oversize_payloads_are_counted_not_kept() {
        let control = WireControl::new(8, Arc::default());
        let mut input = frame(0, &attach(5, Role::Sender, "telemetry/Partitions/1"));
        input.extend(frame(0, &transfer(5, 0, true, &[0u8; 6])));
        input.extend(frame(0, &transfer(5, 0, false, &[0u8; 6])));
        let frames = run(&input, &control);
        let marked: Deserializable<Message<Body<Value>>> =
            serde_amqp::from_slice(payload(&frames[2])).unwrap();
        let captured = control.take(&marked.0).unwrap();
        assert!(captured.bytes.is_empty());
        assert_eq!(captured.size, 12);
    }

    #[test]
    fn a_plain_value_message_is_not_a_marker() {
        let control = WireControl::new(8, Arc::default());
        let msg: Message<Body<Value>> = Message::builder()
            .body(Body::Value(fe2o3_amqp_types::messaging::AmqpValue(
                Value::Ulong(0),
            )))
            .build();
        assert!(control.take(&msg).is_none());
    }
}
