//! The task behind one sender link: it takes messages off the link's queue, packs queued single
//! sends into shared deliveries, hands them to fe2o3 and settles each caller with the hub's
//! outcome for its own delivery.
//!
//! Failures follow [`crate::retry`]: a throttled delivery is sent again after a back-off; a lost
//! link or connection is recovered and every unsettled delivery is sent again in the order it
//! was first sent. Every wait is bounded: by the per-try timeout (credit, outcome), by each
//! delivery's overall deadline, and by the producer closing. Consecutive recoveries after which
//! nothing was stored back off, and a delivery blamed for losing the link or connection more
//! often than the retry budget allows fails alone, so the rest keep flowing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use fe2o3_amqp::link::delivery::{DeliveryFut, Sendable};
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::types::messaging::{Batch, Data, Outcome};
use fe2o3_amqp::Sender;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ledger::{DeliveryId, Ledger, State};
use super::{
    outcome_result, send_error, ConnectionEvent, Counters, Engine, Lifecycle, Outgoing, Waiter,
};
use crate::batch::{Sections, BATCH_MESSAGE_FORMAT};
use crate::error::{Error, ErrorKind, Result};
use crate::retry::{classify, Action, RetryOptions};

/// What a link keeps of one unsettled delivery: enough to send it again and to answer its
/// callers.
pub(crate) struct Pending {
    sections: Sections,
    waiters: Vec<Waiter>,
}

/// The hub's outcome for one delivery, tagged with the delivery's id in the ledger.
struct Tagged {
    id: DeliveryId,
    fut: DeliveryFut<std::result::Result<Outcome, SendError>>,
}

impl Future for Tagged {
    type Output = (DeliveryId, std::result::Result<Outcome, SendError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        Pin::new(&mut self.fut).poll(cx).map(|result| (id, result))
    }
}

/// Everything one sender link's task owns.
pub(crate) struct LinkTask {
    engine: Weak<Engine>,
    target: String,
    /// The audience whose token authorises the link.
    audience: String,
    sender: Sender,
    /// The connection generation the sender was attached on.
    generation: u64,
    retry: RetryOptions,
    counters: Arc<Counters>,
    ledger: Ledger<Pending>,
    outcomes: FuturesUnordered<Tagged>,
    /// The link's message size limit, clamped to the configured cap.
    limit: u64,
    cap: u64,
    /// Recoveries in a row after which the hub stored nothing (drives their back-off).
    fruitless: u32,
    lifecycle: watch::Receiver<Lifecycle>,
}

impl LinkTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: Weak<Engine>,
        target: String,
        audience: String,
        sender: Sender,
        generation: u64,
        retry: RetryOptions,
        counters: Arc<Counters>,
        cap: u64,
        lifecycle: watch::Receiver<Lifecycle>,
    ) -> LinkTask {
        let limit = link_limit(&sender, cap);
        LinkTask {
            engine,
            target,
            audience,
            sender,
            generation,
            retry,
            counters,
            ledger: Ledger::default(),
            outcomes: FuturesUnordered::new(),
            limit,
            cap,
            fruitless: 0,
            lifecycle,
        }
    }

    /// Drains the link's queue until it closes and every delivery is settled.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut open = true;
        let mut intake_closed = false;
        // A message taken off the queue that could not join the delivery before it.
        let mut carried: Option<Outgoing> = None;
        loop {
            if !open && carried.is_none() && self.ledger.is_empty() {
                break;
            }
            let lifecycle = *self.lifecycle.borrow();
            if lifecycle != Lifecycle::Open && !intake_closed {
                // Closing: no new sends; what is queued already still goes out.
                rx.close();
                intake_closed = true;
            }
            if lifecycle == Lifecycle::Closed {
                self.abandon(
                    Error::new(
                        ErrorKind::Closed,
                        "the producer was closed before the hub settled the delivery",
                    ),
                    &mut rx,
                    &mut carried,
                );
                return;
            }
            let next_retry = self.ledger.next_retry();
            let waiting = self.ledger.longest_waiting();
            let expiry = self.ledger.next_expiry(self.retry.deadline);
            let try_timeout = self.retry.try_timeout;
            let mut lost: Option<Error> = None;
            tokio::select! {
                biased;
                Some((id, result)) = self.outcomes.next(), if !self.outcomes.is_empty() => {
                    lost = self.on_outcome(id, result);
                }
                _ = self.lifecycle.changed() => {}
                () = sleep_until(expiry), if expiry.is_some() => self.expire(),
                () = sleep_until(next_retry), if next_retry.is_some() => {
                    lost = self.send_due_retries().await.err();
                }
                () = sleep_until(waiting.map(|(_, sent)| sent + try_timeout)), if waiting.is_some() => {
                    let error = Error::new(
                        ErrorKind::Timeout,
                        format!("no outcome from the hub within {try_timeout:?}"),
                    );
                    if let Some((id, _)) = waiting {
                        self.blame(id, &error);
                    }
                    lost = Some(error);
                }
                () = connection_lost(&self.engine, self.generation), if !self.ledger.is_empty() => {
                    let error = Error::new(ErrorKind::Connection, "the connection was lost");
                    if let Some((id, _)) = waiting {
                        self.blame(id, &error);
                    }
                    lost = Some(error);
                }
                message = next_outgoing(&mut carried, &mut rx), if open => match message {
                    None => open = false,
                    Some(out) => {
                        let (sections, waiters) = coalesce(out, &mut rx, &mut carried, self.limit);
                        lost = self.send_new(sections, waiters).await.err();
                    }
                },
            }
            if let Some(cause) = lost {
                if let Err(error) = self.recover(cause).await {
                    tracing::warn!(error = %error, "giving up on the link");
                    if let Some(engine) = self.engine.upgrade() {
                        let _ = engine.events.send(ConnectionEvent::GaveUp {
                            target: self.target.clone(),
                            error: error.to_string(),
                        });
                    }
                    self.abandon(error, &mut rx, &mut carried);
                    return;
                }
            }
        }
        let _ = self.sender.close().await;
    }

    /// Fails every unsettled and queued delivery with `error` and stops taking new ones.
    fn abandon(
        &mut self,
        error: Error,
        rx: &mut mpsc::Receiver<Outgoing>,
        carried: &mut Option<Outgoing>,
    ) {
        for entry in self.ledger.drain() {
            self.counters
                .settle(entry.payload.waiters, Err(error.clone()));
        }
        rx.close();
        for out in carried
            .take()
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            self.counters.settle(vec![out.waiter], Err(error.clone()));
        }
    }

    /// Settles a delivery for good and answers its callers.
    fn settle(&mut self, id: DeliveryId, result: Result<()>) {
        if let Some(entry) = self.ledger.settle(id) {
            if result.is_ok() {
                self.fruitless = 0;
            }
            self.counters.settle(entry.payload.waiters, result);
        }
    }

    /// Counts a lost link or connection against delivery `id`; one that has used up its
    /// retries fails alone with `error`. Returns whether it is still unsettled.
    fn blame(&mut self, id: DeliveryId, error: &Error) -> bool {
        let max = self.retry.max_retries;
        let Some(entry) = self.ledger.get_mut(id) else {
            return false;
        };
        entry.attempts += 1;
        if entry.attempts > max {
            tracing::warn!(error = %error, attempts = entry.attempts, "a delivery keeps failing its link; giving up on it");
            self.settle(id, Err(error.clone()));
            return false;
        }
        true
    }

    /// Takes the hub's outcome for delivery `id`. Returns the error that lost the link, when
    /// the outcome says the link must be re-attached.
    fn on_outcome(
        &mut self,
        id: DeliveryId,
        result: std::result::Result<Outcome, SendError>,
    ) -> Option<Error> {
        let Some(entry) = self.ledger.get_mut(id) else {
            // Settled already (a stale outcome): nothing to pair it with.
            return None;
        };
        let error = match outcome_result(result) {
            Ok(()) => {
                self.settle(id, Ok(()));
                return None;
            }
            Err(error) => error,
        };
        match classify(&error) {
            Action::Retry
                if entry.attempts < self.retry.max_retries
                    && entry.first_sent.elapsed() < self.retry.deadline =>
            {
                entry.attempts += 1;
                let delay = self.retry.delay(entry.attempts);
                self.counters
                    .retried
                    .fetch_add(entry.payload.waiters.len() as u64, Ordering::Relaxed);
                tracing::debug!(error = %error, attempt = entry.attempts, ?delay, "retrying a delivery");
                self.ledger.retry_at(id, Instant::now() + delay);
                None
            }
            Action::Reattach | Action::RefreshAndReattach => {
                entry.state = State::Unsent;
                self.blame(id, &error).then_some(error)
            }
            _ => {
                self.settle(id, Err(error));
                None
            }
        }
    }

    /// Fails the deliveries that have used up their overall deadline.
    fn expire(&mut self) {
        let deadline = self.retry.deadline;
        for entry in self.ledger.expire(Instant::now(), deadline) {
            self.counters.settle(
                entry.payload.waiters,
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!("the delivery was not stored within its {deadline:?} deadline"),
                )),
            );
        }
    }

    /// Sends delivery `id` (already in the ledger) on the current link.
    async fn transmit(&mut self, id: DeliveryId) -> Result<()> {
        let Some(entry) = self.ledger.get_mut(id) else {
            return Ok(());
        };
        let result = send_unless_lost(
            &mut self.sender,
            &entry.payload.sections,
            &self.engine,
            self.generation,
            self.retry.try_timeout,
        )
        .await;
        match result {
            Ok(fut) => {
                self.ledger.sent(id, Instant::now());
                self.outcomes.push(Tagged { id, fut });
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::MessageTooLarge => {
                self.settle(id, Err(e));
                Ok(())
            }
            Err(e) => {
                if let Some(entry) = self.ledger.get_mut(id) {
                    entry.state = State::Unsent;
                }
                Err(e)
            }
        }
    }

    async fn send_new(&mut self, sections: Sections, waiters: Vec<Waiter>) -> Result<()> {
        let callers = waiters.len();
        let id = self
            .ledger
            .push(Pending { sections, waiters }, Instant::now());
        self.transmit(id).await?;
        tracing::trace!(callers, "transfer sent");
        Ok(())
    }

    async fn send_due_retries(&mut self) -> Result<()> {
        for id in self.ledger.due_retries(Instant::now()) {
            self.transmit(id).await?;
        }
        Ok(())
    }

    /// Takes the outcomes that already arrived, so recovery resends only what the hub has not
    /// settled; each settles its own delivery.
    fn settle_ready(&mut self) {
        while let Some(Some((id, result))) = self.outcomes.next().now_or_never() {
            // A second re-attach-class refusal in the same read: the link is being recovered
            // already; the delivery stays unsettled and is resent with the rest.
            let _ = self.on_outcome(id, result);
        }
        self.outcomes = FuturesUnordered::new();
        self.ledger.lose_in_flight();
    }

    /// Re-attaches the link (reconnecting when the connection is gone) and resends every
    /// unsettled delivery in order, retrying with back-off. Consecutive recoveries after
    /// which nothing was stored wait longer each time.
    async fn recover(&mut self, cause: Error) -> Result<()> {
        self.settle_ready();
        self.expire();
        tracing::warn!(error = %cause, unsettled = self.ledger.len(), "sender link lost; recovering");
        let mut last = cause;
        if self.fruitless > 0 {
            let pause = self.retry.delay(self.fruitless);
            tracing::debug!(
                ?pause,
                fruitless = self.fruitless,
                "backing off before recovering"
            );
            self.pause(pause).await?;
        }
        self.fruitless += 1;
        for attempt in 1..=self.retry.max_retries.max(1) {
            if attempt > 1 {
                self.pause(self.retry.delay(attempt - 1)).await?;
                self.expire();
            }
            let Some(engine) = self.engine.upgrade() else {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "the producer was dropped during recovery",
                ));
            };
            if *self.lifecycle.borrow() == Lifecycle::Closed {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "the producer was closed during recovery",
                ));
            }
            if last.kind() == ErrorKind::Unauthorized
                || classify(&last) == Action::RefreshAndReattach
            {
                // The hub detached the link because the token ran out: put a fresh one first.
                // If the hub refuses it, the credentials are wrong and retrying cannot help.
                if let Err(e) = engine.refresh(&self.audience).await {
                    if e.kind() == ErrorKind::Unauthorized {
                        return Err(e);
                    }
                    last = e;
                    continue;
                }
            }
            let (sender, generation) = match engine.attach_sender(&self.target).await {
                Ok(attached) => attached,
                Err(e) if classify(&e) == Action::Fail => return Err(e),
                Err(e) if e.kind() == ErrorKind::Timeout => {
                    // The connection takes attaches but does not answer: replace it.
                    tracing::warn!(error = %e, "the connection stopped answering; replacing it");
                    let stale = engine.reconnects.load(Ordering::Relaxed);
                    last = match engine.reconnect_from(Some(stale)).await {
                        Ok(()) => {
                            Error::new(ErrorKind::Connection, "replaced an unresponsive connection")
                        }
                        Err(e) => e,
                    };
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "recovery attempt failed");
                    last = e;
                    continue;
                }
            };
            drop(engine);
            let old = std::mem::replace(&mut self.sender, sender);
            drop(old);
            self.generation = generation;
            self.limit = link_limit(&self.sender, self.cap);
            let ids = self.ledger.ids();
            let resent = ids.len();
            let mut failed = None;
            for id in ids {
                if let Err(e) = self.transmit(id).await {
                    failed = Some(e);
                    break;
                }
            }
            match failed {
                None => {
                    if let Some(engine) = self.engine.upgrade() {
                        engine.recoveries.fetch_add(1, Ordering::Relaxed);
                        let _ = engine.events.send(ConnectionEvent::LinkRecovered {
                            target: self.target.clone(),
                            resent,
                        });
                    }
                    self.counters
                        .retried
                        .fetch_add(resent as u64, Ordering::Relaxed);
                    tracing::info!(resent, "sender link recovered");
                    return Ok(());
                }
                Some(e) => {
                    // Whatever went out before the failure is lost with this link too.
                    self.outcomes = FuturesUnordered::new();
                    self.ledger.lose_in_flight();
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Sleeps for `pause`, unless the producer is closed meanwhile.
    async fn pause(&mut self, pause: Duration) -> Result<()> {
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            if *self.lifecycle.borrow() == Lifecycle::Closed {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "the producer was closed during recovery",
                ));
            }
            tokio::select! {
                () = &mut sleep => return Ok(()),
                changed = self.lifecycle.changed() => {
                    if changed.is_err() {
                        // The engine is gone: nothing to wait for.
                        (&mut sleep).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The largest message a sender link takes: what the hub announced, clamped to `cap` (what
/// the service tiers allow). A silent peer (or one announcing 0, "no limit") gets the cap.
pub(crate) fn link_limit(sender: &Sender, cap: u64) -> u64 {
    match sender.max_message_size() {
        Some(0) | None => cap,
        Some(limit) => limit.min(cap),
    }
}

/// The message carried over from the last coalescing pass, else the next one queued.
async fn next_outgoing(
    carried: &mut Option<Outgoing>,
    rx: &mut mpsc::Receiver<Outgoing>,
) -> Option<Outgoing> {
    match carried.take() {
        Some(out) => Some(out),
        None => rx.recv().await,
    }
}

/// Packs the single-event sends queued right behind `first` into its delivery, in order, as
/// long as they share its partition key and the message stays within `limit` bytes. Under
/// load this turns a stream of `send` calls into full batch messages (one transfer, one
/// outcome for all of them); with nothing queued, `first` goes out alone and at once.
fn coalesce(
    first: Outgoing,
    rx: &mut mpsc::Receiver<Outgoing>,
    carried: &mut Option<Outgoing>,
    limit: u64,
) -> (Sections, Vec<Waiter>) {
    let mut sections = first.sections;
    let mut waiters = vec![first.waiter];
    if first.mergeable {
        while let Ok(next) = rx.try_recv() {
            if next.mergeable && sections.can_absorb(&next.sections, limit) {
                sections.absorb(next.sections);
                waiters.push(next.waiter);
            } else {
                *carried = Some(next);
                break;
            }
        }
    }
    (sections, waiters)
}

/// The fe2o3 message for one delivery. It lives only until fe2o3 has serialised it, so the
/// per-event buffers it needs are allocated and freed on this task.
fn sendable(sections: &Sections) -> Sendable<Batch<Data>> {
    Sendable::builder()
        .message(sections.to_message())
        .message_format(BATCH_MESSAGE_FORMAT)
        .build()
}

/// Hands one message to fe2o3, unless the connection is lost or no credit comes within a try
/// (fe2o3 would otherwise wait for credit forever on a dead link).
async fn send_unless_lost(
    sender: &mut Sender,
    sections: &Sections,
    engine: &Weak<Engine>,
    generation: u64,
    try_timeout: Duration,
) -> Result<DeliveryFut<std::result::Result<Outcome, SendError>>> {
    let sendable = sendable(sections);
    tokio::select! {
        // Biased: when credit is there the send completes on its first poll, and the two
        // watchdog timers below are never registered.
        biased;
        result = sender.send_batchable_ref(&sendable) => result.map_err(|e| send_error(e, "sending failed")),
        () = connection_lost(engine, generation) => Err(Error::new(ErrorKind::Connection, "the connection was lost")),
        // No credit within a try: a silently dead connection looks exactly like this.
        () = tokio::time::sleep(try_timeout) => Err(Error::new(
            ErrorKind::Timeout,
            format!("the hub granted no link credit within {try_timeout:?}"),
        )),
    }
}

/// Resolves once the connection of `generation` is gone.
async fn connection_lost(engine: &Weak<Engine>, generation: u64) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match engine.upgrade() {
            Some(engine) if !engine.is_lost(generation).await => {}
            _ => return,
        }
    }
}
