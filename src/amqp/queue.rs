//! A sender link's queue: the messages waiting for the link's task. A single-event send joins
//! the message at the back of the queue while that one still waits, so the sends that queue up
//! behind a busy link (or a full in-flight window) leave together in one delivery, and each
//! caller's permits are merged into the delivery's instead of being handed back one by one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};

use crate::batch::Sections;
use crate::error::Result;

/// The callers of one delivery and the in-flight permits they hold together.
pub(crate) struct Waiters {
    replies: Vec<oneshot::Sender<Result<()>>>,
    /// One permit per semaphore, merged from every caller's (given back when dropped).
    permits: Vec<OwnedSemaphorePermit>,
}

impl Waiters {
    /// One caller with its permits.
    pub(crate) fn one(
        reply: oneshot::Sender<Result<()>>,
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Waiters {
        let mut waiters = Waiters {
            replies: vec![reply],
            permits: Vec::with_capacity(2),
        };
        waiters.hold(permits.0);
        waiters.hold(permits.1);
        waiters
    }

    /// How many callers wait.
    pub(crate) fn len(&self) -> usize {
        self.replies.len()
    }

    /// Adds one more caller with its permits.
    fn join_one(
        &mut self,
        reply: oneshot::Sender<Result<()>>,
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) {
        self.replies.push(reply);
        self.hold(permits.0);
        self.hold(permits.1);
    }

    /// Adds `other`'s callers and permits to these.
    fn join(&mut self, other: Waiters) {
        self.replies.extend(other.replies);
        for permit in other.permits {
            self.hold(permit);
        }
    }

    fn hold(&mut self, permit: OwnedSemaphorePermit) {
        match self
            .permits
            .iter_mut()
            .find(|p| std::sync::Arc::ptr_eq(p.semaphore(), permit.semaphore()))
        {
            Some(held) => held.merge(permit),
            None => self.permits.push(permit),
        }
    }

    /// Answers every caller with `result` (the permits go back when `self` is dropped, after).
    pub(crate) fn answer(self, result: Result<()>) {
        let Waiters { replies, permits } = self;
        match result {
            Ok(()) => {
                for reply in replies {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        drop(permits);
    }
}

/// One message waiting for the link: its sections and its callers.
pub(crate) struct Queued {
    pub(crate) sections: Sections,
    /// Whether single sends may still join it (a caller's own batch goes as built).
    pub(crate) mergeable: bool,
    pub(crate) waiters: Waiters,
}

/// [`LinkQueue::push`] found the link taking no more sends (the message was dropped, which
/// answers its callers as closed and gives their permits back).
#[derive(Debug)]
pub(crate) struct QueueClosed;

/// How [`LinkQueue::push_event`] went.
pub(crate) enum Pushed {
    /// Queued: the reply comes with the delivery's outcome.
    Queued,
    /// The link takes no more sends.
    Closed,
    /// Not queued: the permits were not free at once, or the event needs a message of its own
    /// that this way does not build (too large, ...). The caller takes the general way, with
    /// the event's own message when this way built it already (no second encoding).
    Declined(Option<Sections>),
}

#[derive(Default)]
struct State {
    items: VecDeque<Queued>,
    /// No more sends are taken; what is queued is still handed out.
    closed: bool,
}

/// The queue between the sending handles and one link's task.
pub(crate) struct LinkQueue {
    state: Mutex<State>,
    /// Woken when the queue goes from empty to not empty, and when it is closed.
    ready: Notify,
    /// The link's message size limit: merged messages stay within it.
    limit: AtomicU64,
    /// `State::closed`, readable without the lock (every send's route lookup asks).
    closed: AtomicBool,
}

impl LinkQueue {
    /// An empty queue for a link whose messages may be `limit` bytes.
    pub(crate) fn new(limit: u64) -> LinkQueue {
        LinkQueue {
            state: Mutex::default(),
            ready: Notify::new(),
            limit: AtomicU64::new(limit),
            closed: AtomicBool::new(false),
        }
    }

    /// The link's message size limit now (it follows re-attaches).
    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The link was attached again with this message size limit.
    pub(crate) fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `item`. A mergeable one joins the mergeable message at the back instead when that
    /// one can take it (same partition key and stamping, and within the link's message size
    /// limit), so it leaves in the same delivery. Refused once the link takes no more sends.
    pub(crate) fn push(&self, item: Queued) -> std::result::Result<(), QueueClosed> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut state = self.lock();
        if state.closed {
            drop(state);
            drop(item);
            return Err(QueueClosed);
        }
        if item.mergeable {
            if let Some(back) = state.items.back_mut() {
                if back.mergeable && back.sections.can_absorb(&item.sections, limit) {
                    back.sections.absorb(item.sections);
                    back.waiters.join(item.waiters);
                    return Ok(());
                }
            }
        }
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Encodes one plain single send straight onto the mergeable message at the back, with
    /// permits for the bytes it adds taken at once from `permits` (which answers `None` when
    /// they are not free); else queues it as a message of its own the same way. Saves the
    /// separate message and its copy that [`push`](Self::push) needs.
    pub(crate) fn push_event(
        &self,
        event: &crate::Event,
        key: Option<&str>,
        reply: oneshot::Sender<Result<()>>,
        permits: impl FnOnce(u64) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    ) -> Pushed {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut state = self.lock();
        if state.closed {
            return Pushed::Closed;
        }
        if let Some(back) = state.items.back_mut().filter(|b| b.mergeable) {
            if let Some(added) = back.sections.try_push(event, key, limit) {
                return match permits(added) {
                    Some(p) => {
                        back.waiters.join_one(reply, p);
                        Pushed::Queued
                    }
                    None => {
                        back.sections.pop_last(added);
                        Pushed::Declined(None)
                    }
                };
            }
        }
        let Ok(sections) = Sections::single(event, key.map(str::to_owned), limit) else {
            return Pushed::Declined(None);
        };
        let Some(p) = permits(sections.size()) else {
            return Pushed::Declined(Some(sections));
        };
        let was_empty = state.items.is_empty();
        state.items.push_back(Queued {
            sections,
            mergeable: true,
            waiters: Waiters::one(reply, p),
        });
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Pushed::Queued
    }

    /// Whether the link takes no more sends.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Takes no more sends; what is queued is still handed out by [`next`](Self::next).
    pub(crate) fn close_intake(&self) {
        self.lock().closed = true;
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Takes no more sends and hands back everything still queued.
    pub(crate) fn close(&self) -> Vec<Queued> {
        let mut state = self.lock();
        state.closed = true;
        self.closed.store(true, Ordering::Release);
        let items = state.items.drain(..).collect();
        drop(state);
        self.ready.notify_one();
        items
    }

    /// The message at the front, unless it is a mergeable one and `take_mergeable` is false
    /// (the link's window is full: single sends wait and gather behind it). `None` when there
    /// is nothing to take; `Some(None)` once the queue is closed and empty.
    fn pop(&self, take_mergeable: bool) -> Option<Option<Queued>> {
        let mut state = self.lock();
        match state.items.front() {
            None if state.closed => Some(None),
            None => None,
            Some(front) if front.mergeable && !take_mergeable => None,
            Some(_) => state.items.pop_front().map(Some),
        }
    }

    /// The next message to send (see [`pop`](Self::pop) for `take_mergeable`), waiting for one;
    /// `None` once the queue is closed and everything queued was taken.
    pub(crate) async fn next(&self, take_mergeable: bool) -> Option<Queued> {
        loop {
            if let Some(next) = self.pop(take_mergeable) {
                return next;
            }
            // `notify_one` keeps a wake-up for a waiter that is not waiting yet, so a push
            // between the look above and this wait is not missed.
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn single(
        body: &str,
        key: Option<&str>,
        sems: &(Arc<Semaphore>, Arc<Semaphore>),
    ) -> (Queued, oneshot::Receiver<Result<()>>) {
        let event = crate::Event::new(body.as_bytes().to_vec());
        let sections = Sections::single(&event, key.map(str::to_owned), 1024 * 1024).expect("fits");
        let (reply, rx) = oneshot::channel();
        let permits = (
            sems.0.clone().try_acquire_owned().expect("permit"),
            sems.1.clone().try_acquire_many_owned(10).expect("permits"),
        );
        (
            Queued {
                sections,
                mergeable: true,
                waiters: Waiters::one(reply, permits),
            },
            rx,
        )
    }

    /// Every caller was answered with success and every permit of `sems()` is back.
    async fn every_caller_stored_and_every_permit_back(
        replies: Vec<oneshot::Receiver<Result<()>>>,
        s: &(Arc<Semaphore>, Arc<Semaphore>),
    ) {
        for rx in replies {
            assert!(rx.await.expect("answered").is_ok());
        }
        assert_eq!(s.0.available_permits(), 100, "every permit is back");
        assert_eq!(s.1.available_permits(), 1000);
    }

    fn sems() -> (Arc<Semaphore>, Arc<Semaphore>) {
        (
            Arc::new(Semaphore::new(100)),
            Arc::new(Semaphore::new(1000)),
        )
    }

    #[tokio::test]
    async fn single_sends_join_the_message_at_the_back_and_share_its_permits() {
        let s = sems();
        let q = LinkQueue::new(1024 * 1024);
        let mut replies = Vec::new();
        for key in [None, None, None, Some("k"), Some("k"), None] {
            let (item, rx) = single("x", key, &s);
            assert!(q.push(item).is_ok(), "open");
            replies.push(rx);
        }
        // Runs of equal keys share a message: [3 unkeyed] [2 keyed] [1 unkeyed].
        let lens: Vec<usize> = std::iter::from_fn(|| q.pop(true).flatten())
            .map(|m| {
                assert_eq!(
                    m.waiters.permits.len(),
                    2,
                    "one merged permit per semaphore"
                );
                let n = m.waiters.len();
                assert_eq!(m.sections.len(), n);
                m.waiters.answer(Ok(()));
                n
            })
            .collect();
        assert_eq!(lens, [3, 2, 1]);
        every_caller_stored_and_every_permit_back(replies, &s).await;
    }

    #[tokio::test]
    async fn events_are_encoded_onto_the_back_message_and_a_refused_one_leaves_no_trace() {
        let s = sems();
        let q = LinkQueue::new(1024 * 1024);
        let take = |bytes: u64| {
            Some((
                s.0.clone().try_acquire_owned().ok()?,
                s.1.clone().try_acquire_many_owned(bytes as u32).ok()?,
            ))
        };
        let mut replies = Vec::new();
        for (body, key) in [("a", None), ("b", None), ("c", Some("k")), ("d", Some("k"))] {
            let (reply, rx) = oneshot::channel();
            let event = crate::Event::new(body.as_bytes().to_vec());
            assert!(matches!(
                q.push_event(&event, key, reply, take),
                Pushed::Queued
            ));
            replies.push(rx);
        }
        // No permits: declined, and the message at the back is as it was.
        let (reply, _rx) = oneshot::channel();
        let size_before = q.lock().items.back().map(|m| m.sections.size());
        let event = crate::Event::new(b"e".to_vec());
        assert!(matches!(
            q.push_event(&event, Some("k"), reply, |_| None),
            Pushed::Declined(None)
        ));
        assert_eq!(
            q.lock().items.back().map(|m| m.sections.size()),
            size_before
        );
        let mut lens = Vec::new();
        while let Some(m) = q.pop(true).flatten() {
            // The merged message is exactly as large as one batch of the same events.
            let key = if lens.is_empty() {
                None
            } else {
                Some("k".to_owned())
            };
            let bodies: &[&str] = if lens.is_empty() {
                &["a", "b"]
            } else {
                &["c", "d"]
            };
            let mut batch = crate::batch::EventBatch::new(
                crate::batch::Route {
                    partition_key: key,
                    partition_id: None,
                },
                1 << 20,
            )
            .expect("batch");
            for body in bodies {
                assert!(batch
                    .add_ref(&crate::Event::new(body.as_bytes().to_vec()))
                    .is_ok());
            }
            assert_eq!(m.sections.size(), batch.size_in_bytes());
            assert_eq!(m.sections.len(), bodies.len());
            lens.push(m.waiters.len());
            m.waiters.answer(Ok(()));
        }
        assert_eq!(lens, [2, 2], "one message per run of equal keys");
        every_caller_stored_and_every_permit_back(replies, &s).await;
    }

    #[tokio::test]
    async fn a_full_window_holds_single_sends_back_but_not_batches() {
        let s = sems();
        let q = LinkQueue::new(1024 * 1024);
        let (item, _rx) = single("x", None, &s);
        assert!(q.push(item).is_ok(), "open");
        assert!(
            q.pop(false).is_none(),
            "a single send waits while the window is full"
        );
        let (mut batch, _rx2) = single("y", None, &s);
        batch.mergeable = false;
        assert!(q.push(batch).is_ok(), "open");
        // The batch is behind the single send: order is kept, both wait.
        assert!(q.pop(false).is_none());
        assert_eq!(q.pop(true).flatten().map(|m| m.mergeable), Some(true));
        assert_eq!(q.pop(false).flatten().map(|m| m.mergeable), Some(false));
    }

    #[tokio::test]
    async fn a_closed_queue_refuses_sends_and_hands_out_what_it_holds() {
        let s = sems();
        let q = LinkQueue::new(1024 * 1024);
        let (item, _rx) = single("x", None, &s);
        assert!(q.push(item).is_ok(), "open");
        q.close_intake();
        assert!(q.is_closed());
        let (late, _rx2) = single("y", None, &s);
        assert!(q.push(late).is_err());
        assert!(q.next(true).await.is_some());
        assert!(q.next(true).await.is_none(), "closed and drained");
    }

    #[tokio::test]
    async fn a_waiting_link_task_is_woken_by_a_send() {
        let s = sems();
        let q = Arc::new(LinkQueue::new(1024 * 1024));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next(true).await.map(|m| m.waiters.len()) }
        });
        tokio::task::yield_now().await;
        let (item, _rx) = single("x", None, &s);
        assert!(q.push(item).is_ok(), "open");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(got, Some(1));
    }
}
