//! Noticing a lost stream the moment it happens.
//!
//! [`Watched`] wraps the connection's byte stream and flips a [`tokio::sync::watch`] the first
//! time the stream shows it is finished: a read returns end of stream or an error, a write or
//! flush fails, or the wrapper itself is dropped (fe2o3 drops the stream when its connection
//! task ends, whatever the reason). [`Lost`] is the other end: a cheap clone that the engine
//! awaits beside its other work, so nobody polls `is_closed()` on a timer.
//!
//! The wrapper never changes the bytes or the errors that pass through it; it only records
//! the first [`Loss`]. The cost on the hot path is one branch per read and write.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// Why a stream counts as lost: the first sign of its end, as [`Watched`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Loss {
    /// A read returned end of stream: the peer (or a proxy between) closed its side.
    Closed,
    /// A read failed: a reset, a TLS alert, or the frame guard refusing what the peer sent.
    ReadFailed {
        kind: io::ErrorKind,
        message: String,
    },
    /// A write or flush failed.
    WriteFailed {
        kind: io::ErrorKind,
        message: String,
    },
    /// The stream was dropped on our side (the AMQP connection task ended).
    Dropped,
}

impl Loss {
    fn read_failed(error: &io::Error) -> Loss {
        Loss::ReadFailed {
            kind: error.kind(),
            message: error.to_string(),
        }
    }

    fn write_failed(error: &io::Error) -> Loss {
        Loss::WriteFailed {
            kind: error.kind(),
            message: error.to_string(),
        }
    }
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::Closed => f.write_str("the peer closed the connection"),
            Loss::ReadFailed { message, .. } => write!(f, "reading failed: {message}"),
            Loss::WriteFailed { message, .. } => write!(f, "writing failed: {message}"),
            Loss::Dropped => f.write_str("the connection was closed on this side"),
        }
    }
}

/// A handle that tells whether, and why, a [`Watched`] stream has ended.
///
/// Cloning is cheap (one `watch` receiver); every clone sees the same loss.
#[derive(Debug, Clone)]
pub(crate) struct Lost {
    rx: watch::Receiver<Option<Loss>>,
}

impl Lost {
    /// Resolves once the stream is lost; at once if it already is.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future loses nothing, and a new call sees the same state.
    pub(crate) async fn lost(&self) {
        let mut rx = self.rx.clone();
        // `Watched` always records a loss before its sender goes away (at the latest in its
        // `Drop`), so an error here (sender gone) also means lost.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Whether the stream has been lost.
    pub(crate) fn is_lost(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Why the stream was lost, or `None` while it is not.
    pub(crate) fn cause(&self) -> Option<Loss> {
        self.rx.borrow().clone()
    }
}

/// A stream that reports its own end through [`Lost`].
pub(crate) struct Watched<S> {
    inner: S,
    /// `Some` until the first loss is recorded; taking it makes every later check free.
    tx: Option<watch::Sender<Option<Loss>>>,
}

impl<S> Watched<S> {
    /// Wraps `inner`; the returned [`Lost`] resolves when it ends.
    pub(crate) fn new(inner: S) -> (Watched<S>, Lost) {
        let (tx, rx) = watch::channel(None);
        (
            Watched {
                inner,
                tx: Some(tx),
            },
            Lost { rx },
        )
    }

    /// Records the first loss; later ones are ignored (the first is the cause).
    fn lose(&mut self, loss: impl FnOnce() -> Loss) {
        if let Some(tx) = self.tx.take() {
            let loss = loss();
            tracing::debug!(cause = %loss, "transport stream lost");
            tx.send_replace(Some(loss));
        }
    }
}

impl<S> Watched<S> {
    /// Passes on the result of a write, flush or shutdown, recording a failure as the loss.
    fn written<T>(&mut self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result {
            self.lose(|| Loss::write_failed(e));
        }
        result
    }
}

impl<S> Drop for Watched<S> {
    fn drop(&mut self) {
        self.lose(|| Loss::Dropped);
    }
}

impl<S> fmt::Debug for Watched<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("lost", &self.tx.is_none())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let room = buf.remaining();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &result {
            // Nothing read into a buffer that had room is end of stream; a read into a full
            // buffer says nothing about the stream.
            Poll::Ready(Ok(())) if room > 0 && buf.filled().len() == before => {
                this.lose(|| Loss::Closed)
            }
            Poll::Ready(Err(e)) => this.lose(|| Loss::read_failed(e)),
            _ => {}
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        this.written(result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.written(result)
    }

    /// Shutting down our writing half is not a loss by itself: the peer's answer (its close
    /// frame, then end of stream) still arrives on the reading half.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.written(result)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Far above what any of these waits needs; a failure means the watch never flipped.
    const PROMPTLY: Duration = Duration::from_secs(5);

    async fn resolves(lost: &Lost) {
        tokio::time::timeout(PROMPTLY, lost.lost())
            .await
            .expect("lost() did not resolve");
    }

    #[tokio::test]
    async fn stays_unlost_while_bytes_flow() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let (mut stream, lost) = Watched::new(ours);
        peer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        stream.write_all(b"pong").await.unwrap();
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        assert!(!lost.is_lost());
        assert_eq!(lost.cause(), None);
        let pending = tokio::time::timeout(Duration::from_millis(20), lost.lost()).await;
        assert!(pending.is_err(), "lost() resolved on a live stream");
    }

    #[tokio::test]
    async fn peer_drop_is_noticed_by_the_pending_read() {
        let (ours, peer) = tokio::io::duplex(64);
        let (mut stream, lost) = Watched::new(ours);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = stream.read(&mut buf).await.unwrap();
            (n, stream)
        });
        let waiter = {
            let lost = lost.clone();
            tokio::spawn(async move { lost.lost().await })
        };
        drop(peer);
        tokio::time::timeout(PROMPTLY, waiter)
            .await
            .expect("lost() did not resolve after the peer dropped")
            .unwrap();
        let (n, _stream) = reader.await.unwrap();
        assert_eq!(n, 0);
        assert_eq!(lost.cause(), Some(Loss::Closed));
    }

    #[tokio::test]
    async fn read_into_a_full_buffer_is_not_end_of_stream() {
        let (ours, _peer) = tokio::io::duplex(64);
        let (mut stream, lost) = Watched::new(ours);
        let n = stream.read(&mut []).await.unwrap();
        assert_eq!(n, 0);
        assert!(!lost.is_lost());
    }

    #[tokio::test]
    async fn write_error_is_a_loss() {
        let (ours, peer) = tokio::io::duplex(64);
        let (mut stream, lost) = Watched::new(ours);
        drop(peer);
        let error = stream.write_all(b"frame").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        resolves(&lost).await;
        match lost.cause() {
            Some(Loss::WriteFailed { kind, .. }) => assert_eq!(kind, io::ErrorKind::BrokenPipe),
            other => panic!("unexpected cause {other:?}"),
        }
    }

    #[tokio::test]
    async fn read_error_is_a_loss_and_the_first_cause_stays() {
        let (mut stream, lost) = Watched::new(FailingRead);
        let error = stream.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        resolves(&lost).await;
        drop(stream);
        match lost.cause() {
            Some(Loss::ReadFailed { kind, message }) => {
                assert_eq!(kind, io::ErrorKind::ConnectionReset);
                assert_eq!(message, "reset by test");
            }
            other => panic!("unexpected cause {other:?}"),
        }
    }

    #[tokio::test]
    async fn dropping_the_wrapper_is_a_loss() {
        let (ours, _peer) = tokio::io::duplex(64);
        let (stream, lost) = Watched::new(ours);
        let waiter = {
            let lost = lost.clone();
            tokio::spawn(async move { lost.lost().await })
        };
        assert!(!lost.is_lost());
        drop(stream);
        tokio::time::timeout(PROMPTLY, waiter)
            .await
            .expect("lost() did not resolve after the drop")
            .unwrap();
        assert_eq!(lost.cause(), Some(Loss::Dropped));
        // Already lost: resolves at once, every time, on every clone.
        resolves(&lost).await;
        resolves(&lost.clone()).await;
    }

    /// A stream whose reads fail, for the read-error case (a duplex cannot fail a read).
    struct FailingRead;

    impl AsyncRead for FailingRead {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let error = io::Error::new(io::ErrorKind::ConnectionReset, "reset by test");
            Poll::Ready(Err(error))
        }
    }
}
