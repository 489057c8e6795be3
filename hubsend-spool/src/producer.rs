//! [`SpooledProducer`]: `enqueue` writes to the spool; a drain task reads it back in order and
//! sends through a [`Sink`] (see [`crate::sink`]), deleting records only once the hub accepted
//! them. [`SpooledProducer::start`] drains to Event Hubs through a [`BufferedProducer`]
//! (`BufferedSink`, below), [`SpooledProducer::start_with_sink`] to any sink, e.g. an
//! [`IotHubSink`](crate::IotHubSink).
//!
//! The Event Hubs sink learns what the hub accepted from the buffered producer's `on_success`
//! and `on_failure` hooks: each lane settles its batches in order, so a per-route queue of the
//! tickets handed to it says which records a settled batch held. A batch that failed after the
//! producer's retries (an outage longer than the retry budget) makes the drain close that
//! buffered producer, reconnect with backoff, and read the spool again from the first record
//! not accepted; records accepted meanwhile are skipped.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubsend::{BufferedOptions, BufferedProducer, ErrorKind, Event, Producer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Result, SpoolError, SpoolErrorKind};
use crate::log::Log;
use crate::record::{self, Route};
use crate::sink::{Acks, NotTaken, Sink, SinkSession, Ticket};
use crate::Spool;

/// First and largest wait between attempts to reach the hub.
pub(crate) const RECONNECT_MIN: Duration = Duration::from_millis(100);
pub(crate) const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the cursor (what the hub accepted) is written: the most acknowledgements a crash
/// can forget, which are then sent again.
const CURSOR_EVERY: Duration = Duration::from_millis(100);

/// What a [`SpooledProducer`] has done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SpoolReport {
    /// Records written to the spool by this run.
    pub spooled: u64,
    /// Records found in the spool on start, left by an earlier run.
    pub resumed: u64,
    /// Records the hub accepted (this run).
    pub sent: u64,
    /// Records that can never be sent (too large for the hub, an unknown partition, an IoT
    /// Hub device the hub does not know), removed and counted here.
    pub failed: u64,
    /// Records dropped by [`WhenFull::DropOldest`](crate::WhenFull::DropOldest).
    pub dropped: u64,
    /// Records still in the spool, not yet accepted.
    pub pending: u64,
    /// Bytes the segment files hold.
    pub disk_bytes: u64,
    /// Damaged regions cut off when the spool was opened.
    pub corrupt_regions: u64,
    /// Times the drain started over (connection lost, retries spent).
    pub restarts: u64,
    /// Records read back from the spool and held in memory by the sink (the buffered
    /// producer's queues and batches in flight, or IoT Hub messages awaiting their outcome):
    /// bounded by its limits, not by the outage.
    pub in_memory: u64,
    /// With [`start_idempotent`](SpooledProducer::start_idempotent): events the hub
    /// acknowledged as stored already when they were sent again (after a restart, a lost
    /// connection or a retry), so they were not stored twice. Counted when the hub's answer
    /// says so (a hub that only echoes the resumed state drops them without telling).
    pub duplicates_avoided: u64,
    /// With [`start_idempotent`](SpooledProducer::start_idempotent): records whose sequence
    /// numbers were given up because their partition started afresh under a new producer id
    /// (the hub forgot the old one or refused its numbers); they were sent again with new
    /// numbers, so the hub may hold some of them twice.
    pub renumbered: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) spooled: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) in_memory: AtomicU64,
    pub(crate) duplicates_avoided: AtomicU64,
}

type Connect = Arc<dyn Fn() -> BoxFuture<hubsend::Result<Producer>> + Send + Sync + 'static>;

pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'static>>;

struct Inner {
    spool: Spool,
    /// The numbers journal of an idempotent spooled producer.
    journal: Option<Arc<crate::numbered::Journal>>,
    counters: Arc<Counters>,
    resumed: u64,
    stop: watch::Sender<bool>,
    drain: Mutex<Option<JoinHandle<()>>>,
}

/// A producer whose `enqueue` writes to a disk [`Spool`]; see the [crate docs](crate).
/// Cheap to clone.
#[derive(Clone)]
pub struct SpooledProducer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SpooledProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpooledProducer")
            .field("dir", &self.inner.spool.dir())
            .field("report", &self.report())
            .finish()
    }
}

impl SpooledProducer {
    /// Starts the drain on `spool`. `connect` is called to reach the hub, again after each
    /// failure (with backoff from 100 ms to 5 s): the hub need not be reachable now.
    ///
    /// `options` configure the buffered producer the drain sends through; its `on_success`,
    /// `on_failure`, `keep_failed_events` and `resolve_partition_keys` (off: its acknowledgements
    /// follow the routes records were enqueued with) are the spool's own and are replaced (read
    /// [`report`](Self::report) instead).
    pub fn start<F, Fut>(spool: Spool, connect: F, options: BufferedOptions) -> SpooledProducer
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hubsend::Result<Producer>> + Send + 'static,
    {
        let connect: Connect = Arc::new(move || Box::pin(connect()));
        Self::start_with_sink(spool, BufferedSink { connect, options })
    }

    /// Starts the drain on `spool`, sending through `sink`: e.g. an
    /// [`IotHubSink`](crate::IotHubSink), or a sink of your own (see [`Sink`]). The sink is
    /// connected now and again after each failure (with backoff from 100 ms to 5 s): the hub
    /// need not be reachable now.
    pub fn start_with_sink<S: Sink>(spool: Spool, sink: S) -> SpooledProducer {
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = watch::channel(false);
        let drain = tokio::spawn(crate::sink::drain(
            spool.log().clone(),
            sink,
            counters.clone(),
            stopped,
        ));
        SpooledProducer {
            inner: Arc::new(Inner {
                resumed: spool.recovery().pending,
                journal: None,
                spool,
                counters,
                stop,
                drain: Mutex::new(Some(drain)),
            }),
        }
    }

    /// Like [`start`](Self::start), for exactly once across restarts with idempotent
    /// retries: `connect` gets the producer state the spool kept for each partition and must
    /// return a producer built with [`ProducerOptions::idempotent`](hubsend::ProducerOptions::idempotent)
    /// and [`ProducerOptions::publishing_state`](hubsend::ProducerOptions::publishing_state)
    /// set to it. A restart then sends what the hub may not have confirmed with the sequence
    /// numbers it was first sent with, and the hub drops what it already stored: no record is
    /// stored twice as long as the hub remembers the producer (see the
    /// [crate docs](crate#idempotent-producers)).
    ///
    /// The drain batches records itself, because it must fix each batch's numbers on disk
    /// before sending it: one batch per route, sent when full, 10 ms after the drain caught
    /// up with the writers, or when 10,000 records are held; the producer's in-flight bounds
    /// pipeline them.
    pub fn start_idempotent<F, Fut>(spool: Spool, connect: F) -> SpooledProducer
    where
        F: Fn(Vec<hubsend::PartitionPublishingState>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hubsend::Result<Producer>> + Send + 'static,
    {
        let connect: crate::numbered::Connect = Arc::new(move |states| Box::pin(connect(states)));
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = watch::channel(false);
        let journal = Arc::new(crate::numbered::Journal::open(spool.dir()));
        let drain = tokio::spawn(crate::numbered::drain(
            spool.log().clone(),
            journal.clone(),
            connect,
            counters.clone(),
            stopped,
        ));
        SpooledProducer {
            inner: Arc::new(Inner {
                resumed: spool.recovery().pending,
                journal: Some(journal),
                spool,
                counters,
                stop,
                drain: Mutex::new(Some(drain)),
            }),
        }
    }

    /// The spool it writes to.
    pub fn spool(&self) -> &Spool {
        &self.inner.spool
    }

    /// Writes `event` to the spool; returns once it is committed there (see
    /// [`Commit`](crate::Commit)). The hub's outcome comes later, through the drain.
    ///
    /// # Errors
    /// [`SpoolErrorKind::Full`] (policy `Refuse`), [`SpoolErrorKind::TooLarge`],
    /// [`SpoolErrorKind::Unsupported`], [`SpoolErrorKind::Closed`], or an I/O error.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes may still leave the event in the spool.
    pub async fn enqueue(&self, event: Event, route: Route) -> Result<()> {
        self.append(vec![(event, route)], None).await
    }

    /// Like [`enqueue`](Self::enqueue), and records `tag` with it: an input position (line
    /// number, offset) that [`Spool::last_tag`] returns after a restart, so the reader can
    /// resume after the last record that made it into the spool.
    ///
    /// # Errors
    /// As [`enqueue`](Self::enqueue).
    pub async fn enqueue_tagged(&self, event: Event, route: Route, tag: u64) -> Result<()> {
        self.append(vec![(event, route)], Some(tag)).await
    }

    /// Writes several events in one commit (one fsync for all of them): the fast path for a
    /// caller that reads input sequentially. `tag`, if given, is recorded with the last one.
    /// The events are written in order; on an error, a prefix of them may be in the spool.
    ///
    /// # Errors
    /// As [`enqueue`](Self::enqueue).
    pub async fn enqueue_batch(
        &self,
        events: impl IntoIterator<Item = (Event, Route)>,
        tag: Option<u64>,
    ) -> Result<()> {
        self.append(events.into_iter().collect(), tag).await
    }

    /// Like [`enqueue_batch`](Self::enqueue_batch), with a tag on every record (its input
    /// position): after a crash in the middle of the call, [`Spool::last_tag`] names exactly
    /// the last record that made it into the spool.
    ///
    /// # Errors
    /// As [`enqueue`](Self::enqueue).
    pub async fn enqueue_batch_tagged(
        &self,
        events: impl IntoIterator<Item = (Event, Route, u64)>,
    ) -> Result<()> {
        self.append_tagged(
            events
                .into_iter()
                .map(|(e, r, tag)| (e, r, Some(tag)))
                .collect(),
        )
        .await
    }

    async fn append(&self, events: Vec<(Event, Route)>, tag: Option<u64>) -> Result<()> {
        let last = events.len().saturating_sub(1);
        self.append_tagged(
            events
                .into_iter()
                .enumerate()
                .map(|(i, (e, r))| (e, r, if i == last { tag } else { None }))
                .collect(),
        )
        .await
    }

    async fn append_tagged(&self, events: Vec<(Event, Route, Option<u64>)>) -> Result<()> {
        let log = self.inner.spool.log();
        let mut waits = Vec::with_capacity(events.len());
        for (event, route, tag) in events {
            let payload = record::encode(&event, &route)?;
            log.reserve(payload.len()).await?;
            waits.push(log.append(payload, tag)?);
        }
        let n = waits.len() as u64;
        for wait in waits {
            match wait.await {
                Ok(Ok(_seq)) => {}
                Ok(Err(e)) => return Err(SpoolError::io("cannot write to", log.dir(), e)),
                Err(_) => {
                    return Err(SpoolError::new(
                        SpoolErrorKind::Closed,
                        "the spool closed during the write",
                    ))
                }
            }
        }
        self.inner.counters.spooled.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Counters so far.
    pub fn report(&self) -> SpoolReport {
        let log = self.inner.spool.log();
        let (pending, disk_bytes, dropped, _) = log.counters();
        let c = &self.inner.counters;
        SpoolReport {
            spooled: c.spooled.load(Ordering::Relaxed),
            resumed: self.inner.resumed,
            sent: c.sent.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped,
            pending,
            disk_bytes,
            corrupt_regions: log.recovery().corrupt.len() as u64,
            restarts: c.restarts.load(Ordering::Relaxed),
            in_memory: c.in_memory.load(Ordering::Relaxed),
            duplicates_avoided: c.duplicates_avoided.load(Ordering::Relaxed),
            renumbered: self
                .inner
                .journal
                .as_ref()
                .map_or(0, |j| j.table().renumbered),
        }
    }

    /// Waits until the spool holds nothing the hub has not accepted.
    pub async fn drained(&self) {
        let log = self.inner.spool.log();
        loop {
            let notified = log.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if log.counters().0 == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Waits until everything spooled was accepted, then stops the drain and closes the spool.
    /// With the hub unreachable this waits until it is back; see
    /// [`close_within`](Self::close_within) and [`shutdown`](Self::shutdown).
    pub async fn close(self) -> SpoolReport {
        self.drained().await;
        self.shutdown().await
    }

    /// Like [`close`](Self::close), but gives up waiting after `deadline`: what is left stays
    /// in the spool for the next start.
    pub async fn close_within(self, deadline: Duration) -> SpoolReport {
        let _ = tokio::time::timeout(deadline, self.drained()).await;
        self.shutdown().await
    }

    /// Stops the drain now (batches in flight get a moment to settle) and closes the spool;
    /// whatever was not accepted stays in it for the next start.
    pub async fn shutdown(self) -> SpoolReport {
        let _ = self.inner.stop.send(true);
        let drain = self
            .inner
            .drain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = drain {
            let _ = task.await;
        }
        let report = self.report();
        if let Err(e) = self.inner.spool.log().persist_cursor() {
            tracing::warn!(error = %e, "spool: cursor not written");
        }
        report
    }
}

/// Whether an error means the event can never be sent (remove it, count it failed) rather
/// than "not now" (keep it, try again).
pub(crate) fn permanent(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::MessageTooLarge | ErrorKind::InvalidArgument | ErrorKind::InvalidConfig
    )
}

/// Waits for `d`, or less if stop is requested; true when stopping.
pub(crate) async fn pause(d: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
    if *stopped.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stopped.borrow(),
        _ = stopped.changed() => true,
    }
}

/// Writes the cursor off the async threads, at most every [`CURSOR_EVERY`], until stopped.
pub(crate) fn cursor_task(log: Arc<Log>, mut stopped: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !pause(CURSOR_EVERY, &mut stopped).await {
            let l = log.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = l.persist_cursor() {
                    tracing::warn!(error = %e, "spool: cursor not written");
                }
            })
            .await;
        }
    })
}

/// The Event Hubs sink behind [`SpooledProducer::start`]: each session is a [`Producer`] and a
/// [`BufferedProducer`] over it (its batching, linger and pipelining).
///
/// The buffered producer reports outcomes per batch (`on_success`, `on_failure`) with the
/// batch's route and size, and each lane settles its batches in order, so a per-route queue
/// of the tickets handed to it says which records a settled batch held. A batch that failed
/// after the producer's retries makes the session ask for a restart.
struct BufferedSink {
    connect: Connect,
    options: BufferedOptions,
}

/// The tickets handed to each route's lane, in order.
type InFlight = Arc<Mutex<HashMap<Route, VecDeque<Ticket>>>>;

fn take(in_flight: &InFlight, route: &Route, count: usize) -> Vec<Ticket> {
    let mut map = in_flight.lock().unwrap_or_else(|p| p.into_inner());
    let Some(queue) = map.get_mut(route) else {
        return Vec::new();
    };
    let n = count.min(queue.len());
    queue.drain(..n).collect()
}

/// One connection of [`BufferedSink`].
struct BufferedSession {
    producer: Producer,
    buffered: BufferedProducer,
    in_flight: InFlight,
}

impl Sink for BufferedSink {
    type Session = BufferedSession;

    async fn connect(&self, acks: Acks) -> hubsend::Result<BufferedSession> {
        let producer = (self.connect)().await?;
        let in_flight: InFlight = Arc::default();
        let (ok_flight, ok_acks) = (in_flight.clone(), acks.clone());
        let (bad_flight, bad_acks) = (in_flight.clone(), acks);
        // The acknowledgements follow the routes records were enqueued with: every batch
        // must name its records' route, so keys keep lanes of their own.
        let options = self
            .options
            .clone()
            .keep_failed_events(false)
            .resolve_partition_keys(false)
            .on_success(move |batch| {
                let route =
                    Route::from_parts(batch.partition_key.as_ref(), batch.partition_id.as_ref());
                ok_acks.accepted(take(&ok_flight, &route, batch.events));
            })
            .on_failure(move |failed| {
                let route = Route::from_parts(
                    failed.partition_key.as_ref(),
                    failed.partition_id.as_ref(),
                );
                let tickets = take(&bad_flight, &route, failed.count);
                if permanent(failed.error.kind()) {
                    tracing::warn!(records = tickets.len(), error = %failed.error, "spool: records can never be sent; removed");
                    bad_acks.refused(tickets);
                } else {
                    bad_acks.retry();
                }
            });
        let buffered = BufferedProducer::new(producer.clone(), options);
        Ok(BufferedSession {
            producer,
            buffered,
            in_flight,
        })
    }
}

/// Takes a ticket back out of its route's queue unless disarmed: the enqueue it stood for
/// failed or was cancelled.
struct Handed<'a> {
    in_flight: &'a InFlight,
    route: &'a Route,
    ticket: Ticket,
    armed: bool,
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(q) = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.route)
        {
            q.retain(|t| *t != self.ticket);
        }
    }
}

impl SinkSession for BufferedSession {
    async fn send(
        &mut self,
        ticket: Ticket,
        event: Event,
        route: Route,
    ) -> std::result::Result<(), NotTaken> {
        let Some(options) = route.send_options() else {
            tracing::warn!("spool: an IoT Hub device record cannot go to an event hub; removed");
            return Err(NotTaken::Never);
        };
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route.clone())
            .or_default()
            .push_back(ticket);
        let mut handed = Handed {
            in_flight: &self.in_flight,
            route: &route,
            ticket,
            armed: true,
        };
        match self.buffered.enqueue(event, options).await {
            Ok(()) => {
                handed.armed = false;
                Ok(())
            }
            Err(e) if permanent(e.kind()) || e.kind() == ErrorKind::NotFound => {
                tracing::warn!(error = %e, "spool: record can never be sent; removed");
                Err(NotTaken::Never)
            }
            Err(e) => {
                tracing::debug!(error = %e, "spool: enqueue failed");
                Err(NotTaken::Later)
            }
        }
    }

    async fn close(self, deadline: Duration) {
        let _ = self.buffered.close_within(deadline).await;
        let _ = self.producer.close_within(Duration::from_secs(1)).await;
    }
}
