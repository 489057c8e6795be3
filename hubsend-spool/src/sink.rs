//! Where a spool drains to: the [`Sink`] trait, one [`SinkSession`] per connection, the
//! [`Acks`] a session reports the hub's outcomes through, and the drain loop that reads the
//! spool in order and feeds them.
//!
//! Two sinks come with the crate: the Event Hubs one behind [`SpooledProducer::start`]
//! (a [`BufferedProducer`](hubsend::BufferedProducer)), and [`IotHubSink`] (an IoT Hub
//! gateway or device sender); [`SpooledProducer::start_with_sink`] takes any.
//!
//! [`SpooledProducer::start`]: crate::SpooledProducer::start
//! [`SpooledProducer::start_with_sink`]: crate::SpooledProducer::start_with_sink
//! [`IotHubSink`]: crate::IotHubSink

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubsend::Event;
use tokio::sync::{watch, Notify};

use crate::log::Log;
use crate::producer::{cursor_task, pause, Counters, RECONNECT_MAX, RECONNECT_MIN};
use crate::record::{self, Route};

/// Records read from the spool at a time.
const READ_CHUNK: usize = 1024;
/// How long a session closing because of a failure may take to settle what it has in flight
/// (their outcomes are recorded; what does not settle is sent again).
const SETTLE_ON_RESTART: Duration = Duration::from_secs(30);
/// The same when the producer is shutting down.
const SETTLE_ON_STOP: Duration = Duration::from_secs(5);

/// Names one record the drain handed to a [`SinkSession`]; give it back to [`Acks`] with the
/// hub's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub(crate) u64);

/// Why [`SinkSession::send`] did not take a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotTaken {
    /// The record can never be sent (too large for the hub, a route this sink cannot serve,
    /// a device the hub does not know): it is removed from the spool and counted failed.
    Never,
    /// Not now (connection lost, hub busy, credentials refused): the drain closes the
    /// session and starts over; the record stays in the spool.
    Later,
}

/// A destination for spooled records: connects a [`SinkSession`], again after each failure.
///
/// The drain is the same whatever the hub: it reads records in spool order (skipping what
/// was accepted already), hands each to the session with a [`Ticket`], and removes a record
/// only when the session says the hub accepted it ([`Acks::accepted`]) or that it can never
/// be sent ([`Acks::refused`], counted failed). When the session says "not now"
/// ([`Acks::retry`], or [`NotTaken::Later`] from [`SinkSession::send`]), the drain closes
/// it, waits (100 ms doubling to 5 s), connects again and reads the spool again from the
/// first record not accepted.
///
/// Implement it to drain a spool anywhere; [`SpooledProducer::start_with_sink`] runs it.
///
/// [`SpooledProducer::start_with_sink`]: crate::SpooledProducer::start_with_sink
pub trait Sink: Send + Sync + 'static {
    /// One connection's worth of sending.
    type Session: SinkSession;

    /// Reaches the hub (the hub need not be reachable: an error is retried with backoff).
    /// The session reports every record's outcome through `acks`.
    fn connect(&self, acks: Acks) -> impl Future<Output = hubsend::Result<Self::Session>> + Send;
}

/// One connection of a [`Sink`]: takes records in spool order and reports each one's outcome
/// through the session's [`Acks`].
pub trait SinkSession: Send + 'static {
    /// Takes one record; returns once the record is queued for sending (waiting while the
    /// hub's in-flight bounds are reached). Each record taken must be reported once through
    /// [`Acks`] (or the session must end: what was never reported is sent again). Records of
    /// one route must reach the hub in the order they are given.
    ///
    /// # Errors
    /// [`NotTaken`] when the record was not taken.
    ///
    /// # Cancel safety
    /// The drain drops this future when the session is asked to start over or the producer
    /// stops, and then ends the session; a record taken anyway may still be reported.
    fn send(
        &mut self,
        ticket: Ticket,
        event: Event,
        route: Route,
    ) -> impl Future<Output = Result<(), NotTaken>> + Send;

    /// Lets what is in flight settle for at most `deadline` (reporting the outcomes), then
    /// closes the connection. Outcomes reported after this returns are ignored.
    fn close(self, deadline: Duration) -> impl Future<Output = ()> + Send;
}

/// Where a [`SinkSession`] reports outcomes: records the hub accepted leave the spool, records
/// that can never be sent leave it counted failed, and [`retry`](Self::retry) starts the drain
/// over. Cheap to clone; one per session (reports after the session ended are ignored).
#[derive(Clone)]
pub struct Acks {
    inner: Arc<AcksInner>,
}

struct AcksInner {
    log: Arc<Log>,
    counters: Arc<Counters>,
    restart: AtomicBool,
    wake: Notify,
    /// Records handed to the session and not reported yet, and whether the session ended.
    state: Mutex<(u64, bool)>,
}

impl std::fmt::Debug for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acks")
            .field("restart", &self.inner.restart.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Acks {
    fn new(log: Arc<Log>, counters: Arc<Counters>) -> Acks {
        Acks {
            inner: Arc::new(AcksInner {
                log,
                counters,
                restart: AtomicBool::new(false),
                wake: Notify::new(),
                state: Mutex::new((0, false)),
            }),
        }
    }

    /// Counts `n` reported records off the ones held; `false` once the session ended.
    fn settle(&self, n: u64) -> bool {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.1 {
            return false;
        }
        let n = n.min(state.0);
        state.0 -= n;
        self.inner
            .counters
            .in_memory
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// The hub accepted these records: they leave the spool.
    pub fn accepted(&self, tickets: impl IntoIterator<Item = Ticket>) {
        let seqs: Vec<u64> = tickets.into_iter().map(|t| t.0).collect();
        if seqs.is_empty() || !self.settle(seqs.len() as u64) {
            return;
        }
        self.inner
            .counters
            .sent
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        self.inner.log.ack(seqs);
    }

    /// These records can never be sent (the hub refused them for good): they leave the spool
    /// and are counted failed.
    pub fn refused(&self, tickets: impl IntoIterator<Item = Ticket>) {
        let seqs: Vec<u64> = tickets.into_iter().map(|t| t.0).collect();
        if seqs.is_empty() || !self.settle(seqs.len() as u64) {
            return;
        }
        self.inner
            .counters
            .failed
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        self.inner.log.ack(seqs);
    }

    /// Something failed that a new session may get through (an outage longer than the
    /// retries): the drain stops handing records to this session, closes it and starts over
    /// from the first record not accepted.
    pub fn retry(&self) {
        self.inner.restart.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    fn restart_requested(&self) -> bool {
        self.inner.restart.load(Ordering::SeqCst)
    }

    /// One more record held by the session.
    fn handed(&self) {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        self.inner
            .counters
            .in_memory
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The session ended: what it still held is no longer in memory, later reports are
    /// ignored (those records are read again from the spool).
    fn retire(&self) {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 = true;
        self.inner
            .counters
            .in_memory
            .fetch_sub(state.0, Ordering::Relaxed);
        state.0 = 0;
    }
}

/// Reads the spool in order and sends each pending record through sessions of `sink`, until
/// stopped.
pub(crate) async fn drain<S: Sink>(
    log: Arc<Log>,
    sink: S,
    counters: Arc<Counters>,
    mut stopped: watch::Receiver<bool>,
) {
    let cursor = cursor_task(log.clone(), stopped.clone());
    let mut reader = Some(log.reader());
    let mut delay = RECONNECT_MIN;
    'connect: while !*stopped.borrow() {
        let acks = Acks::new(log.clone(), counters.clone());
        let session = tokio::select! {
            s = sink.connect(acks.clone()) => s,
            _ = stopped.changed() => break,
        };
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "spool: hub not reachable");
                if pause(delay, &mut stopped).await {
                    break;
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        let (mut next, _) = log.bounds();
        'read: loop {
            if acks.restart_requested() || *stopped.borrow() {
                break;
            }
            let appended = log.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let Some(mut r) = reader.take() else { break };
            let from = next;
            let (r, chunk) = match tokio::task::spawn_blocking(move || {
                let chunk = r.read(from, READ_CHUNK);
                (r, chunk)
            })
            .await
            {
                Ok(v) => v,
                Err(_) => break 'connect,
            };
            reader = Some(r);
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // A record the recovery scan passed is now unreadable (disk error): skip it
                    // rather than stop the whole spool.
                    tracing::warn!(error = %e, seq = next, "spool: record unreadable; skipped");
                    log.ack([next]);
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    next += 1;
                    continue;
                }
            };
            if chunk.is_empty() {
                let (watermark, _) = log.bounds();
                next = next.max(watermark);
                tokio::select! {
                    _ = &mut appended => {}
                    _ = acks.inner.wake.notified() => {}
                    _ = stopped.changed() => {}
                }
                continue;
            }
            for stored in chunk {
                next = stored.seq + 1;
                if !log.is_pending(stored.seq) {
                    continue;
                }
                let Some((event, route)) = record::decode(&stored.payload) else {
                    tracing::warn!(
                        seq = stored.seq,
                        "spool: record in an unknown format; skipped"
                    );
                    log.ack([stored.seq]);
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                acks.handed();
                let sent = tokio::select! {
                    r = session.send(Ticket(stored.seq), event, route) => r.map_err(Some),
                    _ = acks.inner.wake.notified() => Err(None),
                    _ = stopped.changed() => Err(None),
                };
                match sent {
                    Ok(()) => {}
                    Err(Some(NotTaken::Never)) => {
                        acks.refused([Ticket(stored.seq)]);
                    }
                    Err(Some(NotTaken::Later)) => {
                        acks.settle(1);
                        acks.retry();
                        break 'read;
                    }
                    // Cancelled: the session may hold the record or not; it ends now, and
                    // what it did not report is read again.
                    Err(None) => {
                        acks.retry();
                        break 'read;
                    }
                }
            }
            delay = RECONNECT_MIN;
        }
        // Let what is in flight settle (its outcomes are recorded), then start over from the
        // first record not accepted.
        let stopping = *stopped.borrow();
        let deadline = if stopping {
            SETTLE_ON_STOP
        } else {
            SETTLE_ON_RESTART
        };
        session.close(deadline).await;
        acks.retire();
        if stopping {
            break;
        }
        counters.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::info!("spool: drain restarting after a failure");
        if pause(delay, &mut stopped).await {
            break;
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
    let _ = cursor.await;
}
