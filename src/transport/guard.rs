//! A read-side check of what the peer sends, before fe2o3 sees it (issue #11, defect 10).
//!
//! fe2o3's session walks every delivery id a DISPOSITION names, one by one, whether or not
//! any of them is in flight: a single 30-byte frame covering ids `0..=u32::MAX` costs about
//! 35 s of CPU inside the session loop, during which the connection is deaf. No hubsend
//! connection ever has more than a few thousand deliveries unsettled, so a disposition that
//! covers vastly more ids is hostile or broken, and the connection is better dropped than
//! obeyed.
//!
//! [`FrameGuard`] follows the byte stream sans-IO: the 8-byte protocol headers (SASL, then
//! AMQP), then frames (4-byte size, data offset, type, channel). Of each AMQP frame it reads at
//! most the first [`PERFORMATIVE_PREFIX`] bytes of the body, which is enough to recognise a
//! disposition and read its `first` and `last`; the rest of every frame (transfer payloads)
//! is skipped by counting, never copied. The bytes themselves are not changed or delayed:
//! a read that completes a refused frame fails instead of handing the frame on, so fe2o3
//! never decodes it. [`Guarded`] puts the guard on a stream's read half.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most delivery ids one disposition may cover.
///
/// hubsend keeps at most `max_in_flight` deliveries unsettled per producer (1024 by default;
/// a few thousand in practice), so a legitimate disposition covers at most that many ids.
/// 2^20 leaves a thousand-fold margin for callers who raise that bound, while capping what
/// one frame can cost inside fe2o3's session at about 2^20 / 2^32 of the 35 s measured for
/// the full range: under 10 ms.
pub(crate) const MAX_DISPOSITION_IDS: u64 = 1 << 20;

/// How many bytes of an AMQP frame body the guard looks at: the longest encoding of a
/// disposition up to its `last` field. That is the described-type constructor (1), the
/// descriptor as a 32-bit-length symbol `amqp:disposition:list` (1 + 4 + 21), a list32 header
/// (1 + 4 + 4), `role` as a boolean with a value byte (2), and `first` and `last` as full
/// uints (5 + 5).
pub(crate) const PERFORMATIVE_PREFIX: usize = 48;

/// The disposition performative's descriptor code (AMQP 1.0 §2.7.6).
const DISPOSITION_CODE: u64 = 0x15;

/// The disposition performative's descriptor name.
const DISPOSITION_NAME: &[u8] = b"amqp:disposition:list";

/// Protocol header and frame header are both 8 bytes.
const HEADER_LEN: usize = 8;

/// What the guard refuses; each variant ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GuardError {
    /// A disposition covers more than [`MAX_DISPOSITION_IDS`] delivery ids.
    DispositionTooWide { first: u32, last: u32 },
    /// Where a protocol header belongs, the peer sent these bytes instead.
    ProtocolHeader([u8; HEADER_LEN]),
    /// A frame header no AMQP frame can have: a size below the 8-byte header, or a data
    /// offset below 2 words or past the end of the frame.
    FrameHeader { size: u32, doff: u8 },
}

impl GuardError {
    /// How many delivery ids `first..=last` covers, in the serial-number arithmetic AMQP
    /// uses for delivery ids (so a range may wrap past `u32::MAX`).
    fn ids(first: u32, last: u32) -> u64 {
        u64::from(last.wrapping_sub(first)) + 1
    }
}

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GuardError::DispositionTooWide { first, last } => write!(
                f,
                "the peer sent a disposition covering {} delivery ids ({first} to {last}); \
                 hubsend refuses more than {MAX_DISPOSITION_IDS} in one disposition",
                GuardError::ids(first, last),
            ),
            GuardError::ProtocolHeader(bytes) => write!(
                f,
                "the peer sent {bytes:02x?} where an AMQP protocol header belongs"
            ),
            GuardError::FrameHeader { size, doff } => write!(
                f,
                "the peer sent a frame header of size {size} with data offset {doff}, \
                 which no AMQP frame has"
            ),
        }
    }
}

impl std::error::Error for GuardError {}

impl From<GuardError> for io::Error {
    fn from(error: GuardError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

/// Which protocol layer the stream is in; it decides which protocol header may come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// Nothing read yet: a SASL or an AMQP header comes first.
    Start,
    /// Inside SASL: its frames, then the AMQP header.
    Sasl,
    /// Inside AMQP: frames to the end.
    Amqp,
}

/// Where in the byte stream the guard is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting an 8-byte protocol header.
    ProtocolHeader,
    /// Collecting an 8-byte frame header.
    FrameHeader,
    /// Skipping `left` bytes (extended frame header or frame body); then, if `body` is set,
    /// inspecting an AMQP frame body of that many bytes, else the next frame header.
    Skip { left: u32, body: Option<u32> },
    /// Collecting the first `want` bytes of an AMQP frame body, with `rest` bytes after them.
    Performative { want: usize, rest: u32 },
}

/// Follows an AMQP byte stream from the peer and refuses the frames fe2o3 cannot survive.
///
/// Feed it every byte read, in order, in pieces of any size. Once it has refused something
/// it stays refused: every later [`inspect`](Self::inspect) returns the same error.
#[derive(Debug, Clone)]
pub(crate) struct FrameGuard {
    layer: Layer,
    state: State,
    /// The header or performative prefix collected so far (its first `have` bytes).
    scratch: [u8; PERFORMATIVE_PREFIX],
    have: usize,
    refused: Option<GuardError>,
}

impl Default for FrameGuard {
    fn default() -> Self {
        FrameGuard::new()
    }
}

impl FrameGuard {
    /// A guard for a stream that starts with a protocol header.
    pub(crate) fn new() -> FrameGuard {
        FrameGuard {
            layer: Layer::Start,
            state: State::ProtocolHeader,
            scratch: [0; PERFORMATIVE_PREFIX],
            have: 0,
            refused: None,
        }
    }

    /// Checks the next bytes the peer sent.
    ///
    /// # Errors
    /// The first refused header or disposition, then the same error on every later call.
    pub(crate) fn inspect(&mut self, bytes: &[u8]) -> Result<(), GuardError> {
        if let Some(error) = &self.refused {
            return Err(error.clone());
        }
        self.advance(bytes).inspect_err(|error| {
            self.refused = Some(error.clone());
        })
    }

    fn advance(&mut self, mut bytes: &[u8]) -> Result<(), GuardError> {
        while let Some(&next) = bytes.first() {
            match self.state {
                State::Skip { left, body } => {
                    // `left` fits in usize on every target tokio runs on (at least 32 bits).
                    let n = bytes.len().min(left as usize);
                    bytes = &bytes[n..];
                    self.state = State::skip(left - n as u32, body);
                }
                // SASL frames are at most 512 bytes (AMQP 1.0 §5.3.1), so a frame size never
                // starts with `A` (0x41); after the outcome the AMQP header follows.
                State::FrameHeader
                    if self.layer == Layer::Sasl && self.have == 0 && next == b'A' =>
                {
                    self.state = State::ProtocolHeader;
                }
                State::ProtocolHeader | State::FrameHeader => {
                    bytes = self.collect(HEADER_LEN, bytes);
                    if self.have == HEADER_LEN {
                        self.have = 0;
                        let header: [u8; HEADER_LEN] = self.scratch[..HEADER_LEN]
                            .try_into()
                            .expect("eight bytes collected");
                        self.state = if self.state == State::ProtocolHeader {
                            self.protocol_header(header)?
                        } else {
                            frame_header(header)?
                        };
                    }
                }
                State::Performative { want, rest } => {
                    bytes = self.collect(want, bytes);
                    if self.have == want {
                        self.have = 0;
                        if let Some((first, last)) = disposition_range(&self.scratch[..want]) {
                            if GuardError::ids(first, last) > MAX_DISPOSITION_IDS {
                                return Err(GuardError::DispositionTooWide { first, last });
                            }
                        }
                        self.state = State::skip(rest, None);
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies into `scratch` until it holds `want` bytes; returns what is left of `bytes`.
    fn collect<'a>(&mut self, want: usize, bytes: &'a [u8]) -> &'a [u8] {
        let n = (want - self.have).min(bytes.len());
        self.scratch[self.have..self.have + n].copy_from_slice(&bytes[..n]);
        self.have += n;
        &bytes[n..]
    }

    /// `AMQP`, a protocol id (3 for SASL, 0 for AMQP), then version 1.0.0.
    fn protocol_header(&mut self, header: [u8; HEADER_LEN]) -> Result<State, GuardError> {
        let layer = match (header, self.layer) {
            ([b'A', b'M', b'Q', b'P', 3, 1, 0, 0], Layer::Start) => Layer::Sasl,
            ([b'A', b'M', b'Q', b'P', 0, 1, 0, 0], Layer::Start | Layer::Sasl) => Layer::Amqp,
            _ => return Err(GuardError::ProtocolHeader(header)),
        };
        self.layer = layer;
        Ok(State::FrameHeader)
    }
}

impl State {
    /// Skips `left` bytes, then goes on to `body` (see [`State::Skip`]).
    fn skip(left: u32, body: Option<u32>) -> State {
        match (left, body) {
            (0, Some(body)) => State::performative(body),
            (0, None) => State::FrameHeader,
            (left, body) => State::Skip { left, body },
        }
    }

    /// Inspects the start of an AMQP frame body of `body` (> 0) bytes.
    fn performative(body: u32) -> State {
        let want = PERFORMATIVE_PREFIX.min(body as usize);
        State::Performative {
            want,
            rest: body - want as u32,
        }
    }
}

/// Size (4 bytes), data offset in 4-byte words, type (0 AMQP, 1 SASL), channel (2 bytes).
fn frame_header(header: [u8; HEADER_LEN]) -> Result<State, GuardError> {
    let size = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let doff = header[4];
    let body_offset = u32::from(doff) * 4;
    if size < HEADER_LEN as u32 || doff < 2 || body_offset > size {
        return Err(GuardError::FrameHeader { size, doff });
    }
    let extended = body_offset - HEADER_LEN as u32;
    let body = size - body_offset;
    // Only AMQP frames with a body carry a performative; an empty frame is a heartbeat.
    Ok(if header[5] == 0 && body > 0 {
        State::skip(extended, Some(body))
    } else {
        State::skip(extended + body, None)
    })
}

/// `Some((first, last))` when `body` starts with a disposition whose `first` (and `last`, if
/// present) the guard can read; `None` for every other performative and for encodings fe2o3
/// refuses anyway (it fails the connection on those itself).
fn disposition_range(body: &[u8]) -> Option<(u32, u32)> {
    let mut input = Input(body);
    // A performative is a described list: 0x00, the descriptor, the list.
    if input.byte()? != 0x00 || !input.is_disposition_descriptor()? {
        return None;
    }
    let count = input.list_count()?;
    // role, first, last, ...: `first` is mandatory, `last` may be left off or null.
    if count < 2 {
        return None;
    }
    input.boolean()?;
    let first = input.uint()??;
    let last = if count >= 3 { input.uint()? } else { None };
    Some((first, last.unwrap_or(first)))
}

/// A cursor over the performative prefix; every read is `None` once the prefix runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn be32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("four bytes")))
    }

    /// Whether the descriptor names a disposition. Any integer or text encoding of the code
    /// or the name counts: more than the spec allows, so that nothing serde_amqp would
    /// accept as a disposition slips past.
    fn is_disposition_descriptor(&mut self) -> Option<bool> {
        let code = |value: u64| Some(value == DISPOSITION_CODE);
        match self.byte()? {
            // ulong, uint
            0x80 => code(u64::from_be_bytes(self.take(8)?.try_into().ok()?)),
            0x70 => code(u64::from(self.be32()?)),
            // smallulong, smalluint
            0x53 | 0x52 => code(u64::from(self.byte()?)),
            // ulong0, uint0
            0x44 | 0x43 => code(0),
            // sym8, str8
            0xa3 | 0xa1 => {
                let len = self.byte()?;
                Some(self.take(usize::from(len))? == DISPOSITION_NAME)
            }
            // sym32, str32
            0xb3 | 0xb1 => {
                let len = self.be32()?;
                Some(self.take(usize::try_from(len).ok()?)? == DISPOSITION_NAME)
            }
            _ => Some(false),
        }
    }

    /// The element count of a list0, list8 or list32.
    fn list_count(&mut self) -> Option<u32> {
        match self.byte()? {
            0x45 => Some(0),
            0xc0 => {
                let _size = self.byte()?;
                self.byte().map(u32::from)
            }
            0xd0 => {
                let _size = self.be32()?;
                self.be32()
            }
            _ => None,
        }
    }

    /// Skips a boolean: true, false, or the one-byte-value form.
    fn boolean(&mut self) -> Option<()> {
        match self.byte()? {
            0x41 | 0x42 => Some(()),
            0x56 => self.byte().map(drop),
            _ => None,
        }
    }

    /// A uint (uint, smalluint, uint0) as `Some(Some(n))`, null as `Some(None)`.
    fn uint(&mut self) -> Option<Option<u32>> {
        match self.byte()? {
            0x70 => self.be32().map(Some),
            0x52 => self.byte().map(|b| Some(u32::from(b))),
            0x43 => Some(Some(0)),
            0x40 => Some(None),
            _ => None,
        }
    }
}

/// A stream whose reads pass through a [`FrameGuard`].
pub(crate) struct Guarded<S> {
    inner: S,
    guard: FrameGuard,
}

impl<S> Guarded<S> {
    /// Guards the read half of `inner`, a stream that starts with the peer's protocol header.
    pub(crate) fn new(inner: S) -> Guarded<S> {
        Guarded {
            inner,
            guard: FrameGuard::new(),
        }
    }
}

impl<S> fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Once refused, fail at once: the stream is dead, and waiting on it could hang.
        if let Some(error) = &this.guard.refused {
            return Poll::Ready(Err(error.clone().into()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            if let Err(error) = this.guard.inspect(&buf.filled()[before..]) {
                tracing::warn!(error = %error, "refusing what the peer sent");
                // Hand on none of this read: the refused frame must not reach fe2o3.
                buf.set_filled(before);
                return Poll::Ready(Err(error.into()));
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::definitions::{Handle, Role};
    use fe2o3_amqp_types::messaging::{Accepted, DeliveryState};
    use fe2o3_amqp_types::performatives::{
        Begin, ChannelMax, Close, Disposition, Flow, MaxFrameSize, Open, Performative, Transfer,
    };
    use fe2o3_amqp_types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};
    use serde_amqp::primitives::{Array, Binary, Symbol};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const SASL_HEADER: &[u8] = b"AMQP\x03\x01\x00\x00";
    const AMQP_HEADER: &[u8] = b"AMQP\x00\x01\x00\x00";

    /// A frame with data offset 2 (no extended header).
    fn frame(frame_type: u8, channel: u16, body: &[u8]) -> Vec<u8> {
        frame_with_extended_header(frame_type, channel, &[], body)
    }

    /// A frame whose header is followed by `extended` (a multiple of 4 bytes).
    fn frame_with_extended_header(
        frame_type: u8,
        channel: u16,
        extended: &[u8],
        body: &[u8],
    ) -> Vec<u8> {
        assert_eq!(extended.len() % 4, 0);
        let size = u32::try_from(HEADER_LEN + extended.len() + body.len()).unwrap();
        let doff = u8::try_from(2 + extended.len() / 4).unwrap();
        let mut bytes = size.to_be_bytes().to_vec();
        bytes.extend([doff, frame_type]);
        bytes.extend(channel.to_be_bytes());
        bytes.extend(extended);
        bytes.extend(body);
        bytes
    }

    /// An AMQP frame on channel 0: the performative as fe2o3 encodes it, then `payload`.
    fn amqp_frame(performative: &Performative, payload: &[u8]) -> Vec<u8> {
        let mut body = serde_amqp::to_vec(performative).unwrap();
        body.extend(payload);
        frame(0, 0, &body)
    }

    fn disposition(first: u32, last: Option<u32>) -> Performative {
        Performative::Disposition(Disposition {
            role: Role::Receiver,
            first,
            last,
            settled: true,
            state: Some(DeliveryState::Accepted(Accepted {})),
            batchable: false,
        })
    }

    /// The bytes a hub sends up to an open session with credit: SASL, then AMQP.
    fn session_start() -> Vec<u8> {
        let mechanisms = SaslMechanisms {
            sasl_server_mechanisms: Array::from(vec![Symbol::from("ANONYMOUS")]),
        };
        let outcome = SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        };
        let open = Performative::Open(Open {
            container_id: "test-peer".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(65536),
            channel_max: ChannelMax(255),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        let begin = Performative::Begin(Begin {
            remote_channel: Some(0),
            next_outgoing_id: 1,
            incoming_window: 5000,
            outgoing_window: 5000,
            handle_max: Handle(255),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        let mut bytes = SASL_HEADER.to_vec();
        bytes.extend(frame(1, 0, &serde_amqp::to_vec(&mechanisms).unwrap()));
        bytes.extend(frame(1, 0, &serde_amqp::to_vec(&outcome).unwrap()));
        bytes.extend(AMQP_HEADER);
        bytes.extend(amqp_frame(&open, &[]));
        bytes.extend(amqp_frame(&begin, &[]));
        bytes.extend(amqp_frame(&flow(), &[]));
        bytes
    }

    fn flow() -> Performative {
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 5000,
            next_outgoing_id: 1,
            outgoing_window: 5000,
            handle: Some(Handle(0)),
            delivery_count: Some(0),
            link_credit: Some(1000),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        })
    }

    fn transfer(payload: &[u8]) -> Vec<u8> {
        let transfer = Performative::Transfer(Transfer {
            handle: Handle(0),
            delivery_id: Some(7),
            delivery_tag: Some(Binary::from(vec![0, 0, 0, 7])),
            message_format: Some(0),
            settled: Some(false),
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        });
        amqp_frame(&transfer, payload)
    }

    /// Ordinary traffic after the session is up: a large transfer, a heartbeat, dispositions
    /// of every legitimate shape, a flow, and the close.
    fn ordinary_traffic(transfer_payload: usize) -> Vec<u8> {
        let mut bytes = transfer(&vec![0x5a; transfer_payload]);
        bytes.extend(frame(0, 0, &[]));
        bytes.extend(amqp_frame(&disposition(0, None), &[]));
        bytes.extend(amqp_frame(&disposition(1, Some(1023)), &[]));
        bytes.extend(amqp_frame(&disposition(u32::MAX - 2, Some(4)), &[]));
        bytes.extend(amqp_frame(&flow(), &[]));
        bytes.extend(amqp_frame(&Performative::Close(Close { error: None }), &[]));
        bytes
    }

    fn whole(bytes: &[u8]) -> Result<(), GuardError> {
        FrameGuard::new().inspect(bytes)
    }

    /// Feeds one byte at a time; on refusal, the index of the byte whose read was refused.
    fn bytewise(bytes: &[u8]) -> Result<(), (usize, GuardError)> {
        let mut guard = FrameGuard::new();
        for (i, byte) in bytes.iter().enumerate() {
            guard
                .inspect(std::slice::from_ref(byte))
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn refuses_wide(first: u32, last: u32) -> Result<(), GuardError> {
        let mut bytes = session_start();
        bytes.extend(amqp_frame(&disposition(first, Some(last)), &[]));
        whole(&bytes)
    }

    #[test]
    fn ordinary_traffic_passes_whole_bytewise_and_in_uneven_pieces() {
        let mut bytes = session_start();
        bytes.extend(ordinary_traffic(256 * 1024));
        whole(&bytes).unwrap();
        bytewise(&bytes).unwrap();
        let mut guard = FrameGuard::new();
        let mut rest = &bytes[..];
        for size in [1usize, 7, 3, 64, 5, 1000, 13].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at(rest.len().min(*size));
            guard.inspect(piece).unwrap();
            rest = tail;
        }
        // Ended at a frame boundary, ready for the next frame header.
        assert_eq!(guard.state, State::FrameHeader);
        assert_eq!(guard.have, 0);
    }

    #[test]
    fn a_disposition_of_every_delivery_id_is_refused_within_its_frame() {
        let mut bytes = session_start();
        bytes.extend(ordinary_traffic(4096));
        let start = bytes.len();
        let wide = amqp_frame(&disposition(0, Some(u32::MAX)), &[]);
        bytes.extend(&wide);
        let expected = GuardError::DispositionTooWide {
            first: 0,
            last: u32::MAX,
        };
        assert_eq!(whole(&bytes), Err(expected.clone()));
        let (at, error) = bytewise(&bytes).unwrap_err();
        assert_eq!(error, expected);
        assert!(
            (start..start + wide.len()).contains(&at),
            "refused at byte {at}, the frame is {start}..{}",
            start + wide.len()
        );
        assert!(error
            .to_string()
            .contains("disposition covering 4294967296 delivery ids"));
    }

    #[test]
    fn a_split_anywhere_still_refuses_once() {
        let mut bytes = session_start();
        bytes.extend(ordinary_traffic(512));
        bytes.extend(amqp_frame(&disposition(3, Some(u32::MAX / 2)), &[]));
        for split in 0..=bytes.len() {
            let mut guard = FrameGuard::new();
            let first = guard.inspect(&bytes[..split]);
            let second = guard.inspect(&bytes[split..]);
            // The refusal comes in whichever piece completes the disposition's `last`; a
            // refused guard refuses the second piece too.
            assert!(second.is_err(), "split at {split}: never refused");
            if first.is_err() {
                assert_eq!(first, second, "split at {split}");
            }
        }
    }

    #[test]
    fn the_bound_passes_and_one_id_more_is_refused() {
        let bound = u32::try_from(MAX_DISPOSITION_IDS).unwrap();
        refuses_wide(5, 5 + bound - 1).unwrap();
        assert_eq!(
            refuses_wide(5, 5 + bound),
            Err(GuardError::DispositionTooWide {
                first: 5,
                last: 5 + bound
            })
        );
    }

    #[test]
    fn ranges_count_in_serial_arithmetic() {
        // Wrapped past u32::MAX: seven ids.
        refuses_wide(u32::MAX - 2, 3).unwrap();
        // `last` before `first`: all but five of the 2^32 ids.
        assert!(refuses_wide(10, 5).is_err());
        // No `last`: one id, wherever it is.
        let mut bytes = session_start();
        bytes.extend(amqp_frame(&disposition(u32::MAX, None), &[]));
        whole(&bytes).unwrap();
    }

    #[test]
    fn a_refusal_is_final() {
        let mut bytes = session_start();
        bytes.extend(amqp_frame(&disposition(0, Some(u32::MAX)), &[]));
        let mut guard = FrameGuard::new();
        let error = guard.inspect(&bytes).unwrap_err();
        assert_eq!(guard.inspect(&amqp_frame(&flow(), &[])), Err(error.clone()));
        assert_eq!(guard.inspect(&[]), Err(error));
    }

    #[test]
    fn transfer_payloads_are_skipped_not_read() {
        // A payload that holds a wide disposition frame is data, not a frame.
        let mut bytes = session_start();
        let mut payload = amqp_frame(&disposition(0, Some(u32::MAX)), &[]);
        payload.extend(b"AMQP\x00\x01\x00\x00");
        payload.extend(vec![0xffu8; 100_000]);
        bytes.extend(transfer(&payload));
        bytes.extend(amqp_frame(&flow(), &[]));
        whole(&bytes).unwrap();
        bytewise(&bytes).unwrap();
    }

    #[test]
    fn the_disposition_after_an_extended_header_is_read() {
        let body = serde_amqp::to_vec(&disposition(0, Some(u32::MAX))).unwrap();
        let mut bytes = session_start();
        bytes.extend(frame_with_extended_header(0, 0, &[0xee; 8], &body));
        assert!(whole(&bytes).is_err());
        assert!(bytewise(&bytes).is_err());

        let narrow = serde_amqp::to_vec(&disposition(0, Some(9))).unwrap();
        let mut bytes = session_start();
        bytes.extend(frame_with_extended_header(0, 0, &[0xee; 8], &narrow));
        bytes.extend(amqp_frame(&flow(), &[]));
        bytewise(&bytes).unwrap();
    }

    #[test]
    fn only_the_sasl_then_amqp_headers_are_taken() {
        // AMQP without SASL is fine.
        let mut bytes = AMQP_HEADER.to_vec();
        bytes.extend(amqp_frame(&flow(), &[]));
        bytewise(&bytes).unwrap();

        let mut twice_sasl = SASL_HEADER.to_vec();
        twice_sasl.extend(SASL_HEADER);
        let tls_header = *b"AMQP\x02\x01\x00\x00";
        let http = *b"HTTP/1.1";
        for (bytes, header) in [
            (twice_sasl, *b"AMQP\x03\x01\x00\x00"),
            (tls_header.to_vec(), tls_header),
            (http.to_vec(), http),
        ] {
            assert_eq!(
                bytewise(&bytes).map_err(|(_, e)| e),
                Err(GuardError::ProtocolHeader(header))
            );
        }
        assert!(GuardError::ProtocolHeader(http)
            .to_string()
            .contains("where an AMQP protocol header belongs"));
    }

    #[test]
    fn impossible_frame_headers_are_refused() {
        for (size, doff) in [(5u32, 2u8), (16, 1), (8, 3)] {
            let mut bytes = AMQP_HEADER.to_vec();
            bytes.extend(size.to_be_bytes());
            bytes.extend([doff, 0, 0, 0]);
            assert_eq!(whole(&bytes), Err(GuardError::FrameHeader { size, doff }));
        }
    }

    /// Every way of writing a disposition that serde_amqp (so fe2o3) decodes, with a range
    /// over the bound, is refused: the guard reads what the decoder reads.
    #[test]
    fn every_encoding_fe2o3_decodes_as_a_wide_disposition_is_refused() {
        let name = |code: u8, len: &[u8]| [&[code], len, DISPOSITION_NAME].concat();
        let descriptors: Vec<Vec<u8>> = vec![
            vec![0x53, 0x15],
            [&[0x80][..], &0x15u64.to_be_bytes()].concat(),
            [&[0x70][..], &0x15u32.to_be_bytes()].concat(),
            vec![0x52, 0x15],
            name(0xa3, &[21]),
            name(0xb3, &21u32.to_be_bytes()),
            name(0xa1, &[21]),
            name(0xb1, &21u32.to_be_bytes()),
            // Encodings the guard does not read: serde_amqp must refuse them too.
            vec![0x00, 0x53, 0x15],
            vec![0x60, 0x00, 0x15],
            vec![0x55, 0x15],
        ];
        let roles: [&[u8]; 3] = [&[0x41], &[0x42], &[0x56, 0x00]];
        let firsts: [&[u8]; 5] = [
            &[0x43],
            &[0x52, 0x00],
            &[0x70, 0, 0, 0, 0],
            &[0x53, 0],
            &[0x44],
        ];
        let lasts: [&[u8]; 3] = [
            &[0x70, 0xff, 0xff, 0xff, 0xff],
            &[0x80, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            &[0x60, 0xff, 0xff],
        ];
        let mut decoded_wide = 0;
        for descriptor in &descriptors {
            for role in roles {
                for first in firsts {
                    for last in lasts {
                        let fields = [role, first, last, &[0x41]].concat();
                        for list in [list8(4, &fields), list32(4, &fields)] {
                            let body = [&[0x00][..], descriptor, &list].concat();
                            let fe2o3 = serde_amqp::from_slice::<Performative>(&body);
                            let wide = matches!(
                                fe2o3,
                                Ok(Performative::Disposition(Disposition { first, last, .. }))
                                    if GuardError::ids(first, last.unwrap_or(first))
                                        > MAX_DISPOSITION_IDS
                            );
                            let mut bytes = AMQP_HEADER.to_vec();
                            bytes.extend(frame(0, 0, &body));
                            let refused = whole(&bytes).is_err();
                            assert!(
                                !wide || refused,
                                "fe2o3 decodes {body:02x?} as a wide disposition; the guard passes it"
                            );
                            decoded_wide += usize::from(wide);
                        }
                    }
                }
            }
        }
        // serde_amqp decodes four of the descriptors (smallulong, ulong, sym8, sym32) with
        // every role, `first` from uint0/smalluint/uint, `last` as a uint, in both lists:
        // the comparison above is not empty.
        assert_eq!(decoded_wide, 4 * 3 * 3 * 2);
    }

    fn list8(count: u8, fields: &[u8]) -> Vec<u8> {
        let size = u8::try_from(fields.len() + 1).unwrap();
        [&[0xc0, size, count][..], fields].concat()
    }

    fn list32(count: u32, fields: &[u8]) -> Vec<u8> {
        let size = u32::try_from(fields.len() + 4).unwrap();
        [
            &[0xd0][..],
            &size.to_be_bytes(),
            &count.to_be_bytes(),
            fields,
        ]
        .concat()
    }

    #[tokio::test]
    async fn a_guarded_stream_hands_on_ordinary_bytes_unchanged() {
        let mut bytes = session_start();
        bytes.extend(ordinary_traffic(100_000));
        let (ours, mut peer) = tokio::io::duplex(4096);
        let mut stream = Guarded::new(ours);
        let sent = bytes.clone();
        let writer = tokio::spawn(async move {
            peer.write_all(&sent).await.unwrap();
            peer
        });
        let mut read = vec![0u8; bytes.len()];
        stream.read_exact(&mut read).await.unwrap();
        assert_eq!(read, bytes);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_guarded_read_that_completes_a_wide_disposition_fails_and_hands_on_nothing() {
        let mut bytes = session_start();
        let clean = bytes.len();
        bytes.extend(amqp_frame(&disposition(0, Some(u32::MAX)), &[]));
        let (ours, mut peer) = tokio::io::duplex(4096);
        peer.write_all(&bytes).await.unwrap();
        let mut stream = Guarded::new(ours);
        let mut read = vec![0u8; clean];
        stream.read_exact(&mut read).await.unwrap();
        let mut rest = [0u8; 256];
        let error = stream.read(&mut rest).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error
            .to_string()
            .contains("disposition covering 4294967296 delivery ids"));
        let mut buf = ReadBuf::new(&mut rest);
        let again = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, &mut buf));
        // A refused stream fails at once rather than waiting on the peer (which is silent).
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), again)
            .await
            .expect("a refused stream waited for more bytes");
        assert!(again.is_err());
        assert!(buf.filled().is_empty(), "refused bytes were handed on");
    }
}
