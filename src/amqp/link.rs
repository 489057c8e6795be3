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
use fe2o3_amqp::link::{DetachError, SendError};
use fe2o3_amqp::types::messaging::{Batch, Data, Outcome};
use fe2o3_amqp::Sender;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::error::detach_error;
use super::ledger::{DeliveryId, Ledger, State};
use super::{
    outcome_result, send_error, ConnectionEvent, Counters, Engine, Lifecycle, LinkQueue, Waiters,
};
use super::{Publishing, Sequencer};
use crate::batch::{Sections, BATCH_MESSAGE_FORMAT};
use crate::error::{Condition, Error, ErrorKind, Result};
use crate::idempotent::{seq_add, seq_at_or_before, Stamp};
use crate::retry::{classify, Action, RetryOptions};
use crate::transport::Lost;

/// What a link keeps of one unsettled delivery: enough to send it again and to answer its
/// callers.
pub(crate) struct Pending {
    sections: Sections,
    waiters: Waiters,
    /// On an idempotent link: the sequence number of its first event (the others follow).
    first: Option<i32>,
    /// The hub reported storing it already when the link was re-attached: its acceptance is
    /// a duplicate the hub dropped.
    known_stored: bool,
    /// When its numbers were assigned (see `Sequencer::tickets`).
    ticket: u64,
    /// Its numbers were fixed by the caller (`Producer::send_batch_numbered`): never
    /// renumbered; failed instead where they would have to be.
    fixed: bool,
}

impl Pending {
    /// The sequence number of its last event, on an idempotent link.
    fn last(&self) -> Option<i32> {
        self.first
            .map(|first| seq_add(first, self.sections.len().saturating_sub(1) as u64))
    }

    /// Gives it the numbers from `at` on and `seq`'s next ticket; returns the number after
    /// its last.
    fn number(&mut self, seq: &mut Sequencer, at: i32) -> i32 {
        self.first = Some(at);
        self.known_stored = false;
        self.ticket = seq.tickets;
        seq.tickets += 1;
        seq_add(at, self.sections.len() as u64)
    }
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
    /// Flips when that connection's stream ends.
    lost: Lost,
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
    /// On an idempotent partition link: its producer state and where it is published.
    idem: Option<(Sequencer, Arc<Publishing>)>,
    /// A failure that ends the link for good (a stolen producer epoch).
    fatal: Option<Error>,
    /// Where the sends wait for this task.
    queue: Arc<LinkQueue>,
    /// Single sends wait in the queue while this many deliveries await their outcome, so the
    /// ones that arrive meanwhile leave together.
    window: usize,
}

/// Closes a link's queue when its task ends, however it ends: the engine's route cache then
/// sees the link as stopped, and the sends still queued are answered as closed.
struct CloseOnDrop(Arc<LinkQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        drop(self.0.close());
    }
}

impl LinkTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: Weak<Engine>,
        target: String,
        audience: String,
        sender: Sender,
        (generation, lost): (u64, Lost),
        retry: RetryOptions,
        counters: Arc<Counters>,
        cap: u64,
        lifecycle: watch::Receiver<Lifecycle>,
        idem: Option<(Sequencer, Arc<Publishing>)>,
        queue: Arc<LinkQueue>,
        window: usize,
    ) -> LinkTask {
        let limit = link_limit(&sender, cap);
        LinkTask {
            engine,
            target,
            audience,
            sender,
            generation,
            lost,
            retry,
            counters,
            ledger: Ledger::default(),
            outcomes: FuturesUnordered::new(),
            limit,
            cap,
            fruitless: 0,
            lifecycle,
            idem,
            fatal: None,
            queue,
            window,
        }
    }

    /// Whether an idempotent link holds new deliveries back until the refused ones are resent.
    fn holding(&self) -> bool {
        self.idem.as_ref().is_some_and(|(s, _)| s.hold)
    }

    /// When a held idempotent link resends: once nothing is in flight, after the longest
    /// back-off among the refused deliveries.
    fn resend_at(&self) -> Option<Instant> {
        let (seq, _) = self.idem.as_ref()?;
        if !seq.hold || self.ledger.longest_waiting().is_some() {
            return None;
        }
        Some(seq.hold_until.unwrap_or_else(Instant::now))
    }

    /// Drains the link's queue until it closes and every delivery is settled.
    pub(crate) async fn run(mut self) {
        let queue = self.queue.clone();
        let _closer = CloseOnDrop(queue.clone());
        let mut open = true;
        let mut intake_closed = false;
        loop {
            if !open && self.ledger.is_empty() {
                break;
            }
            let lifecycle = *self.lifecycle.borrow();
            if lifecycle != Lifecycle::Open && !intake_closed {
                // Closing: no new sends; what is queued already still goes out.
                queue.close_intake();
                intake_closed = true;
            }
            if lifecycle == Lifecycle::Closed {
                self.abandon(Error::new(
                    ErrorKind::Closed,
                    "the producer was closed before the hub settled the delivery",
                ));
                return;
            }
            let next_retry = self.ledger.next_retry().filter(|_| self.idem.is_none());
            let resend_at = self.resend_at();
            let accepting = open && !self.holding();
            let waiting = self.ledger.longest_waiting();
            let expiry = self.ledger.next_expiry(self.retry.deadline);
            let try_timeout = self.retry.try_timeout;
            let take_mergeable = self.ledger.len() < self.single_window();
            let mut lost: Option<Error> = None;
            tokio::select! {
                biased;
                Some((id, result)) = self.outcomes.next(), if !self.outcomes.is_empty() => {
                    lost = self.on_outcome(id, result);
                }
                changed = self.lifecycle.changed() => {
                    if changed.is_err() {
                        // The engine is gone (every producer handle dropped without close):
                        // this arm would be ready on every turn and starve the others, and
                        // nothing is left to recover with.
                        self.abandon(
                            Error::new(ErrorKind::Closed, "the producer was dropped"),
                        );
                        return;
                    }
                }
                () = sleep_until(expiry), if expiry.is_some() => self.expire(),
                () = sleep_until(next_retry), if next_retry.is_some() => {
                    lost = self.send_due_retries().await.err();
                }
                () = sleep_until(resend_at), if resend_at.is_some() => {
                    lost = self.resend_held().await.err();
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
                () = self.lost.lost(), if !self.ledger.is_empty() => {
                    let cause = self.lost.cause().map(|c| c.to_string()).unwrap_or_default();
                    let error = Error::new(
                        ErrorKind::Connection,
                        format!("the connection was lost: {cause}"),
                    );
                    if let Some((id, _)) = waiting {
                        self.blame(id, &error);
                    }
                    lost = Some(error);
                }
                // The hub detached the link: its in-flight outcomes will never come.
                detached = self.sender.on_detach(), if !self.ledger.is_empty() => {
                    lost = self.on_remote_detach(&detached, waiting);
                }
                message = queue.next(take_mergeable), if accepting => match message {
                    None => open = false,
                    Some(item) => lost = self.send_new(item.sections, item.waiters).await.err(),
                },
            }
            let lost = match self.fatal.take() {
                Some(fatal) => Some(Err(fatal)),
                None => lost.map(Ok),
            };
            if let Some(cause) = lost {
                let recovered = match cause {
                    Ok(cause) => self.recover(cause).await,
                    Err(fatal) => Err(fatal),
                };
                if let Err(error) = recovered {
                    tracing::warn!(error = %error, "giving up on the link");
                    if let Some(engine) = self.engine.upgrade() {
                        let _ = engine.events.send(ConnectionEvent::GaveUp {
                            target: self.target.clone(),
                            error: error.to_string(),
                        });
                    }
                    self.abandon(error);
                    return;
                }
            }
        }
        let _ = self.sender.close().await;
    }

    /// How many deliveries may await their outcome before single sends wait and gather: the
    /// configured number, or as many largest messages as the in-flight window holds once it
    /// has grown past that.
    fn single_window(&self) -> usize {
        let grown = self.counters.window.granted() / self.limit.max(1);
        self.window.max(grown.min(1024) as usize)
    }

    /// Fails every unsettled and queued delivery with `error` and stops taking new ones.
    fn abandon(&mut self, error: Error) {
        for entry in self.ledger.drain() {
            self.counters
                .settle(entry.payload.waiters, Err(error.clone()));
        }
        for item in self.queue.close() {
            self.counters.settle(item.waiters, Err(error.clone()));
        }
    }

    /// Settles a delivery for good and answers its callers.
    fn settle(&mut self, id: DeliveryId, result: Result<()>) {
        if let Some(entry) = self.ledger.settle(id) {
            if result.is_ok() {
                self.fruitless = 0;
                self.counters
                    .window
                    .accepted(entry.last_sent, Instant::now());
            }
            self.on_settled(id, &entry.payload, result.is_ok());
            self.counters.settle(entry.payload.waiters, result);
        }
    }

    /// Keeps an idempotent link's numbering in step with a delivery settled for good: an
    /// accepted one commits its numbers; a failed one leaves a gap the deliveries behind it
    /// are renumbered over (after they are all back), so the hub sees no hole.
    fn on_settled(&mut self, id: DeliveryId, pending: &Pending, accepted: bool) {
        let Some((seq, publishing)) = self.idem.as_mut() else {
            return;
        };
        let (Some(first), Some(last)) = (pending.first, pending.last()) else {
            return;
        };
        if accepted {
            if pending.known_stored {
                // Numbers at or before what the hub reported storing: `committed` is there
                // already, and moving it back would make later resends look new.
                self.counters
                    .duplicates_avoided
                    .fetch_add(pending.sections.len() as u64, Ordering::Relaxed);
            } else if seq.committed_ticket.is_none_or(|c| c < pending.ticket) {
                seq.committed_ticket = Some(pending.ticket);
                seq.committed = last;
                publishing.publish(seq.state());
            }
        } else {
            if seq.gap.is_none_or(|(gap_id, _, _)| id < gap_id) {
                seq.gap = Some((id, first, pending.ticket));
            }
            seq.hold = true;
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
        // Settled already (a stale outcome): nothing to pair it with.
        self.ledger.get_mut(id)?;
        let error = match outcome_result(result) {
            Ok(()) => {
                self.settle(id, Ok(()));
                return None;
            }
            Err(error) => error,
        };
        if let Some(handled) = self.idempotent_refusal(id, &error) {
            return handled;
        }
        let entry = self.ledger.get_mut(id)?;
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
                let at = Instant::now() + delay;
                self.ledger.retry_at(id, at);
                if let Some((seq, _)) = self.idem.as_mut() {
                    // Everything behind it is refused too: hold the partition and resend in
                    // order once every outcome is in, after the longest back-off.
                    seq.hold = true;
                    seq.hold_until = Some(seq.hold_until.map_or(at, |until| until.max(at)));
                }
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

    /// Takes the hub's detach of the link while deliveries are unsettled (`waiting`: the one
    /// in flight longest), by the policy table. A condition it fails fails the deliveries
    /// that were in flight with that condition; the rest are resent on a re-attached link
    /// (when none are left, the next send re-attaches). Any other detach is returned as the
    /// error to recover from, so the link is re-attached (with a fresh token first where the
    /// table says) and every unsettled delivery is resent in order.
    fn on_remote_detach(
        &mut self,
        detached: &DetachError,
        waiting: Option<(DeliveryId, Instant)>,
    ) -> Option<Error> {
        let error = detach_error(detached, "the hub detached the link");
        let with_condition = matches!(
            detached,
            DetachError::RemoteDetachedWithError(_) | DetachError::RemoteClosedWithError(_)
        );
        if !with_condition || classify(&error) != Action::Fail {
            if let Some((id, _)) = waiting {
                self.blame(id, &error);
            }
            return Some(error);
        }
        tracing::warn!(error = %error, "the hub detached the link; failing the deliveries in flight");
        let in_flight: Vec<DeliveryId> = self
            .ledger
            .ids()
            .into_iter()
            .filter(|id| {
                self.ledger
                    .get_mut(*id)
                    .is_some_and(|e| e.state == State::InFlight)
            })
            .collect();
        // Outcomes that arrived before the detach still count.
        self.settle_ready();
        for id in in_flight {
            if self
                .ledger
                .get_mut(id)
                .is_some_and(|e| e.state == State::Unsent)
            {
                self.settle(id, Err(error.clone()));
            }
        }
        (!self.ledger.is_empty()).then_some(error)
    }

    /// The refusals only an idempotent link has. Every delivery behind a refused one is
    /// refused too (its numbers no longer follow what the hub stored), so the link stops
    /// taking new deliveries, waits for every outcome, and then resends what is unsettled in
    /// order with the numbers it was first sent with. `out-of-order-sequence` behind a
    /// refusal is part of that; without one it means the hub's state and this link's differ,
    /// and the partition starts afresh with a new producer id. A stolen epoch ends the link.
    /// `None` when the refusal is handled like on any link.
    fn idempotent_refusal(&mut self, id: DeliveryId, error: &Error) -> Option<Option<Error>> {
        let earlier_unsettled = self.ledger.ids().first().is_some_and(|first| *first < id);
        let (seq, _) = self.idem.as_mut()?;
        let follows_a_refusal = seq.hold || seq.gap.is_some() || earlier_unsettled;
        match error.condition() {
            Some(Condition::ProducerEpochStolen) => {
                tracing::warn!(error = %error, "another producer took this partition over");
                self.fatal = Some(error.clone());
                Some(None)
            }
            Some(Condition::OutOfOrderSequence) if follows_a_refusal => {
                seq.hold = true;
                self.ledger.retry_at(id, Instant::now());
                Some(None)
            }
            Some(Condition::OutOfOrderSequence) => {
                tracing::warn!(error = %error, "the hub's sequence numbers differ from this producer's; starting the partition afresh");
                seq.fresh = true;
                if let Some(entry) = self.ledger.get_mut(id) {
                    entry.state = State::Unsent;
                }
                Some(Some(error.clone()))
            }
            _ => None,
        }
    }

    /// Resends a held idempotent link's unsettled deliveries in order (renumbered only over a
    /// gap, or behind a later delivery the hub stored) and takes new ones again.
    async fn resend_held(&mut self) -> Result<()> {
        self.renumber(true);
        if let Some((seq, _)) = self.idem.as_mut() {
            seq.hold = false;
            seq.hold_until = None;
        }
        for id in self.ledger.ids() {
            self.transmit(id).await?;
        }
        Ok(())
    }

    /// Renumbers unsettled deliveries where their numbers can no longer be stored: behind a
    /// gap a failed delivery left, and (`refused`: they were all refused, so none of them is
    /// stored) behind a later delivery the hub accepted.
    fn renumber(&mut self, refused: bool) {
        let Some((seq, _)) = self.idem.as_mut() else {
            return;
        };
        let mut cursor: Option<i32> = None;
        let mut void = Vec::new();
        let ids = self.ledger.ids();
        for id in &ids {
            let Some(entry) = self.ledger.get_mut(*id) else {
                continue;
            };
            if cursor.is_none() {
                if refused
                    && seq
                        .committed_ticket
                        .is_some_and(|c| c > entry.payload.ticket)
                {
                    cursor = Some(seq_add(seq.committed, 1));
                } else if let Some((gap_id, first, _)) = seq.gap {
                    if *id > gap_id {
                        cursor = Some(first);
                    }
                }
            }
            if let Some(at) = cursor {
                if entry.payload.fixed {
                    void.push(*id);
                    continue;
                }
                cursor = Some(entry.payload.number(seq, at));
            }
        }
        match (cursor, seq.gap) {
            (Some(next), _) => seq.next = next,
            // A gap with nothing behind it: new deliveries fill it, unless the hub stored
            // something after it.
            (None, Some((gap_id, first, gap_ticket)))
                if ids.last().is_none_or(|last| *last < gap_id)
                    && seq.committed_ticket.is_none_or(|c| c < gap_ticket) =>
            {
                seq.next = first;
            }
            _ => {}
        }
        seq.gap = None;
        self.fail_fixed(void);
    }

    /// Fails caller-numbered deliveries whose numbers can no longer be stored in order: the
    /// caller decides what to send with which numbers, not this link.
    fn fail_fixed(&mut self, ids: Vec<DeliveryId>) {
        if ids.is_empty() {
            return;
        }
        tracing::warn!(
            deliveries = ids.len(),
            "caller-numbered deliveries can no longer be stored in order; failing them"
        );
        for id in ids {
            if let Some(entry) = self.ledger.settle(id) {
                self.counters.settle(
                    entry.payload.waiters,
                    Err(Error::new(
                        ErrorKind::Rejected,
                        "the delivery's fixed sequence numbers no longer follow the partition's producer state",
                    )
                    .with_condition(Condition::OutOfOrderSequence)),
                );
            }
        }
    }

    /// Fails the deliveries that have used up their overall deadline.
    fn expire(&mut self) {
        let deadline = self.retry.deadline;
        for (id, entry) in self.ledger.expire(Instant::now(), deadline) {
            // Their outcome is unknown: on an idempotent link, whatever is behind them is
            // renumbered over the gap they leave.
            self.on_settled(id, &entry.payload, false);
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
        let stamp = match (&self.idem, entry.payload.first) {
            (Some((seq, _)), Some(first)) => Some(Stamp {
                producer_id: seq.producer_id,
                epoch: seq.epoch,
                first,
            }),
            _ => None,
        };
        let transfer = match transfer(&mut entry.payload.sections, stamp) {
            Ok(transfer) => transfer,
            Err(e) => {
                self.settle(id, Err(e));
                return Ok(());
            }
        };
        let result = send_unless_lost(
            &mut self.sender,
            transfer,
            &self.lost,
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

    async fn send_new(&mut self, sections: Sections, waiters: Waiters) -> Result<()> {
        let callers = waiters.len();
        let fixed = sections.fixed;
        let mut pending = Pending {
            sections,
            waiters,
            first: None,
            known_stored: false,
            ticket: 0,
            fixed: fixed.is_some(),
        };
        if let Some((seq, _)) = self.idem.as_mut() {
            if pending.sections.is_stamped() {
                match fixed {
                    Some(first) => {
                        let after = pending.number(seq, first);
                        // Numbers at or before the last the hub confirmed are resends of
                        // what it stored already.
                        pending.known_stored = seq.committed >= 0
                            && pending
                                .last()
                                .is_some_and(|last| seq_at_or_before(last, seq.committed));
                        // `next` never moves back: it is what a re-attach compares the hub's
                        // answer with.
                        if seq_at_or_before(seq.next, after) {
                            seq.next = after;
                        }
                    }
                    None => {
                        let at = seq.next;
                        seq.next = pending.number(seq, at);
                    }
                }
            }
        }
        let id = self.ledger.push(pending, Instant::now());
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
            let request = self.idem.as_ref().map(|(seq, _)| seq.request());
            let (sender, (generation, lost)) = match engine
                .attach_sender(&self.target, request.as_ref())
                .await
            {
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
            self.lost = lost;
            self.limit = link_limit(&self.sender, self.cap);
            self.queue.set_limit(self.limit);
            self.resume_idempotent()?;
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

    /// Takes an idempotent link's state from the hub's answer to its re-attach. The same
    /// producer and epoch: every unsettled delivery keeps its numbers (the hub drops the ones
    /// it stored already), except over a gap. A new producer id or epoch (the link started
    /// afresh, or the hub forgot it): everything unsettled is renumbered from its answer.
    fn resume_idempotent(&mut self) -> Result<()> {
        let Some((seq, _)) = self.idem.as_mut() else {
            return Ok(());
        };
        let (id, epoch, reported) = super::idempotent_reply(&self.sender, &self.target)?;
        tracing::debug!(
            id,
            epoch,
            reported,
            committed = seq.committed,
            next = seq.next,
            unsettled = self.ledger.len(),
            "idempotent link re-attached"
        );
        seq.hold = false;
        seq.hold_until = None;
        let renumber_from = if (id, epoch) != (seq.producer_id, seq.epoch) {
            tracing::info!(
                producer_id = id,
                epoch,
                "the partition's producer state starts afresh"
            );
            seq.producer_id = id;
            seq.epoch = epoch;
            seq.committed = reported;
            seq.committed_ticket = None;
            Some(seq_add(reported, 1))
        } else {
            let last_assigned = seq_add(seq.next, (1u64 << 31) - 1);
            let ahead = reported >= 0
                && reported != last_assigned
                && seq_at_or_before(last_assigned, reported)
                && (seq.next != 0 || seq.committed >= 0);
            if ahead {
                tracing::warn!(
                    reported,
                    last_assigned,
                    "the hub reports more stored than this producer sent; renumbering"
                );
                Some(seq_add(reported, 1))
            } else {
                None
            }
        };
        seq.fresh = false;
        match renumber_from {
            Some(mut at) => {
                seq.gap = None;
                let mut void = Vec::new();
                for id in self.ledger.ids() {
                    if let Some(entry) = self.ledger.get_mut(id) {
                        if entry.payload.fixed {
                            void.push(id);
                            continue;
                        }
                        at = entry.payload.number(seq, at);
                    }
                }
                seq.next = at;
                self.fail_fixed(void);
            }
            None => {
                if reported >= 0 {
                    // The hub stored up to `reported`: resends queued from here on are
                    // compared with it (see `send_new`).
                    if seq.committed < 0 || seq_at_or_before(seq.committed, reported) {
                        seq.committed = reported;
                    }
                    for id in self.ledger.ids() {
                        if let Some(entry) = self.ledger.get_mut(id) {
                            entry.payload.known_stored = entry
                                .payload
                                .last()
                                .is_some_and(|last| seq_at_or_before(last, reported));
                        }
                    }
                }
                self.renumber(false);
            }
        }
        if let Some((seq, publishing)) = self.idem.as_ref() {
            publishing.publish(seq.state());
        }
        Ok(())
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

/// What one delivery is handed to fe2o3 as.
// One lives on the stack for one send; boxing the message would cost an allocation per send.
#[allow(clippy::large_enum_variant)]
enum Transfer {
    /// A message fe2o3 serialises (stamped on an idempotent link). It lives only until fe2o3
    /// has serialised it; its per-event buffers then go back to the thread's pool
    /// ([`crate::batch::recycle`]).
    Message(Sendable<Batch<Data>>),
    /// The message's encoding, shared with the ledger's copy (fe2o3 patched with
    /// `send_batchable_payload`: bench/fe2o3/).
    #[cfg(hubsend_fe2o3_payload)]
    Encoded(bytes::Bytes),
}

/// What one delivery goes to fe2o3 as: with the fe2o3 patch a plain message is encoded once
/// (sealed) and sent from that encoding on every try; otherwise it is built anew each time.
fn transfer(sections: &mut Sections, stamp: Option<Stamp>) -> Result<Transfer> {
    #[cfg(hubsend_fe2o3_payload)]
    {
        sections.seal()?;
        if let Some(wire) = sections.wire() {
            return Ok(Transfer::Encoded(wire.clone()));
        }
    }
    Ok(Transfer::Message(
        Sendable::builder()
            .message(sections.to_message(stamp)?)
            .message_format(BATCH_MESSAGE_FORMAT)
            .build(),
    ))
}

/// Hands one message to fe2o3, unless the connection is lost or no credit comes within a try
/// (fe2o3 would otherwise wait for credit forever on a dead link).
async fn send_unless_lost(
    sender: &mut Sender,
    transfer: Transfer,
    lost: &Lost,
    try_timeout: Duration,
) -> Result<DeliveryFut<std::result::Result<Outcome, SendError>>> {
    let send = async {
        match transfer {
            Transfer::Message(sendable) => {
                let result = sender.send_batchable_ref(&sendable).await;
                crate::batch::recycle(sendable.message);
                result
            }
            #[cfg(hubsend_fe2o3_payload)]
            Transfer::Encoded(payload) => {
                sender
                    .send_batchable_payload(payload, BATCH_MESSAGE_FORMAT)
                    .await
            }
        }
    };
    tokio::select! {
        // Biased: when credit is there the send completes on its first poll, and the two
        // watchdog timers below are never registered.
        biased;
        result = send => result.map_err(|e| send_error(e, "sending failed")),
        () = lost.lost() => Err(Error::new(ErrorKind::Connection, "the connection was lost")),
        // No credit within a try: a silently dead connection looks exactly like this.
        () = tokio::time::sleep(try_timeout) => Err(Error::new(
            ErrorKind::Timeout,
            format!("the hub granted no link credit within {try_timeout:?}"),
        )),
    }
}
