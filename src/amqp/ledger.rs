//! The ledger of a sender link's unsettled deliveries, without any I/O.
//!
//! Every delivery handed to a link gets an id, and every outcome the hub sends back names the
//! id it belongs to: an outcome can settle its own delivery and no other, however the hub
//! orders or groups its dispositions. The ledger also answers the link task's timing questions
//! (which retries are due, which delivery has waited longest for an outcome, which ran out of
//! its overall deadline) and keeps deliveries in the order they were first sent, which is the
//! order they are resent in after a lost link or connection.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// A delivery's number on its link, in the order deliveries were first sent.
pub(crate) type DeliveryId = u64;

/// Where an unsettled delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Handed to the current link; its outcome is awaited.
    InFlight,
    /// Refused for now (throttling); to be sent again at this instant.
    RetryAt(Instant),
    /// Its last transfer was lost with a link or connection; to be sent on the next one.
    Unsent,
}

/// One unsettled delivery.
#[derive(Debug)]
pub(crate) struct Entry<T> {
    /// What the link needs to send it again and to answer its callers.
    pub(crate) payload: T,
    /// Tries that failed: throttled outcomes, and lost links or connections it was blamed for.
    pub(crate) attempts: u32,
    /// When it was first handed to a link (for the overall deadline).
    pub(crate) first_sent: Instant,
    /// When it was last handed to a link (for the per-try timeout).
    pub(crate) last_sent: Instant,
    pub(crate) state: State,
}

/// The unsettled deliveries of one sender link, by id.
#[derive(Debug)]
pub(crate) struct Ledger<T> {
    entries: BTreeMap<DeliveryId, Entry<T>>,
    next_id: DeliveryId,
}

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Ledger {
            entries: BTreeMap::new(),
            next_id: 0,
        }
    }
}

impl<T> Ledger<T> {
    /// Records a delivery just handed to the link; returns its id.
    pub(crate) fn push(&mut self, payload: T, now: Instant) -> DeliveryId {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                payload,
                attempts: 0,
                first_sent: now,
                last_sent: now,
                state: State::InFlight,
            },
        );
        id
    }

    /// How many deliveries are unsettled.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every delivery is settled.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The delivery with this id, while it is unsettled.
    pub(crate) fn get_mut(&mut self, id: DeliveryId) -> Option<&mut Entry<T>> {
        self.entries.get_mut(&id)
    }

    /// Removes a delivery whose outcome is final. `None` when it was settled already.
    pub(crate) fn settle(&mut self, id: DeliveryId) -> Option<Entry<T>> {
        self.entries.remove(&id)
    }

    /// Marks a delivery to be sent again at `at`.
    pub(crate) fn retry_at(&mut self, id: DeliveryId, at: Instant) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.state = State::RetryAt(at);
        }
    }

    /// Marks a delivery as (again) handed to the link at `now`.
    pub(crate) fn sent(&mut self, id: DeliveryId, now: Instant) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.state = State::InFlight;
            entry.last_sent = now;
        }
    }

    /// The earliest instant a throttled delivery is due to be sent again.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| match e.state {
                State::RetryAt(at) => Some(at),
                _ => None,
            })
            .min()
    }

    /// The throttled deliveries whose retry is due at `now`, in order.
    pub(crate) fn due_retries(&self, now: Instant) -> Vec<DeliveryId> {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::RetryAt(at) if at <= now))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The in-flight delivery that has waited longest for its outcome, and since when.
    pub(crate) fn longest_waiting(&self) -> Option<(DeliveryId, Instant)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.state == State::InFlight)
            .map(|(id, e)| (*id, e.last_sent))
            .min_by_key(|(_, sent)| *sent)
    }

    /// When the oldest delivery's overall deadline passes.
    pub(crate) fn next_expiry(&self, deadline: Duration) -> Option<Instant> {
        self.entries
            .values()
            .next()
            .map(|e| e.first_sent + deadline)
    }

    /// Removes and returns the deliveries first sent `deadline` or longer before `now`, in
    /// order, with their ids.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        deadline: Duration,
    ) -> Vec<(DeliveryId, Entry<T>)> {
        let expired: Vec<DeliveryId> = self
            .entries
            .iter()
            .take_while(|(_, e)| now.saturating_duration_since(e.first_sent) >= deadline)
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.entries.remove(&id).map(|e| (id, e)))
            .collect()
    }

    /// The link (or connection) was lost: every in-flight delivery's transfer went with it.
    pub(crate) fn lose_in_flight(&mut self) {
        for entry in self.entries.values_mut() {
            if entry.state == State::InFlight {
                entry.state = State::Unsent;
            }
        }
    }

    /// Every unsettled delivery, in the order it was first sent: what to resend on a new link.
    pub(crate) fn ids(&self) -> Vec<DeliveryId> {
        self.entries.keys().copied().collect()
    }

    /// Removes and returns every unsettled delivery, in order.
    pub(crate) fn drain(&mut self) -> Vec<Entry<T>> {
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn an_outcome_settles_only_its_own_delivery() {
        let t = Instant::now();
        let mut ledger = Ledger::default();
        let a = ledger.push("a", t);
        let b = ledger.push("b", t);
        let c = ledger.push("c", t);
        // The hub settles b first, then refuses a: nothing else may move.
        assert_eq!(ledger.settle(b).map(|e| e.payload), Some("b"));
        ledger.get_mut(a).unwrap().attempts += 1;
        ledger.lose_in_flight();
        assert_eq!(ledger.ids(), vec![a, c]);
        assert_eq!(ledger.get_mut(a).unwrap().payload, "a");
        assert_eq!(ledger.get_mut(a).unwrap().state, State::Unsent);
        // A second outcome for b (a stale future) finds nothing to settle.
        assert!(ledger.settle(b).is_none());
    }

    #[test]
    fn retries_come_due_in_order() {
        let t = Instant::now();
        let mut ledger = Ledger::default();
        let a = ledger.push(1, t);
        let b = ledger.push(2, t);
        let c = ledger.push(3, t);
        ledger.retry_at(c, at(t, 10));
        ledger.retry_at(a, at(t, 30));
        assert_eq!(ledger.next_retry(), Some(at(t, 10)));
        assert_eq!(ledger.due_retries(at(t, 5)), Vec::<u64>::new());
        assert_eq!(ledger.due_retries(at(t, 30)), vec![a, c]);
        ledger.sent(a, at(t, 30));
        ledger.sent(c, at(t, 30));
        assert_eq!(ledger.next_retry(), None);
        // b has waited longest: since t.
        assert_eq!(ledger.longest_waiting(), Some((b, t)));
    }

    #[test]
    fn deadlines_expire_the_oldest_first() {
        let t = Instant::now();
        let mut ledger = Ledger::default();
        ledger.push("old", t);
        ledger.push("new", at(t, 500));
        let deadline = Duration::from_secs(1);
        assert_eq!(ledger.next_expiry(deadline), Some(at(t, 1000)));
        assert!(ledger.expire(at(t, 999), deadline).is_empty());
        let gone: Vec<_> = ledger
            .expire(at(t, 1000), deadline)
            .into_iter()
            .map(|(_, e)| e.payload)
            .collect();
        assert_eq!(gone, vec!["old"]);
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger.drain().len(), 1);
        assert!(ledger.is_empty());
    }
}
