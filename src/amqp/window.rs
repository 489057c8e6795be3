//! The in-flight byte window of one AMQP producer: it starts small, so a producer near its hub
//! holds a few MB of deliveries, and grows toward the configured ceiling only while the window
//! is what limits it: every byte permit in use, and deliveries coming back about as fast as the
//! fastest one ever did (no queue building anywhere), which is what a far hub looks like and a
//! hub short of CPU does not. Trips that are mostly queue give a growth back, so a window that
//! grew on a lucky run of short trips does not stay grown (it never goes below its start).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Semaphore;

/// How much longer than the shortest round trip a delivery's may be while the window still
/// grows. A full window whose deliveries come back in about the shortest trip is the limit
/// (its bytes are on the wire, not in a queue): it grows. Once deliveries wait in a queue (at
/// the hub, or for a CPU both share) the trips lengthen and it stops, since more bytes in
/// flight would only queue too.
///
/// Near a hub that stores one delivery after the other, a delivery's trip is about as many
/// storing times as deliveries are ahead of it, so the window stops after a growth or two: on
/// this project's 2-core machine (TLS, hub and client sharing the cores) the library's modes
/// stay at the 2 MiB start and `hubsend send` stops at 3-7 MiB. 20 ms away the bench's
/// trips were 1.5 times the shortest at 10 MiB, where batches ran at about 75 % of their
/// loopback rate, so the bound sits past that: there the window reaches its 16 MiB ceiling
/// and batches 85-90 % (`bench/results/window-20261208.md`).
const QUEUE_FACTOR: f64 = 2.0;

/// How much longer than the shortest round trip a delivery's may be before the window gives
/// back a growth: trips that long are mostly queue (near the hub, a window grown on a lucky
/// sample of short trips). Past [`QUEUE_FACTOR`] so the two do not fight: between them the
/// window holds still.
const SHRINK_FACTOR: f64 = 3.0;

/// How many deliveries must have come back before the shortest trip is trusted: the first
/// is its own shortest (and carries the link's warm-up), so on its own it would always grow
/// a full window.
const TRIPS_BEFORE_GROWTH: u32 = 4;

/// How much the window grows (or, never below its start, shrinks) at a time: once per round
/// trip, so each decision is made on a delivery sent after the last change.
const GROWTH: f64 = 1.5;

/// See the module docs. One per connection, shared by its link tasks (which report each
/// accepted delivery) and the producer's pipeline (whose byte budget it grows).
#[derive(Default)]
pub(crate) struct Window {
    /// The pipeline's byte budget, its ceiling, and the largest message (fewer free permits
    /// than that means the window is full).
    budget: OnceLock<Budget>,
    /// Bytes the budget holds now: read on every turn of a link task's loop, so kept out of
    /// the lock (written under it).
    granted: AtomicU64,
    state: Mutex<WindowState>,
}

struct Budget {
    permits: Arc<Semaphore>,
    start: u64,
    ceiling: u64,
    largest: u64,
}

#[derive(Default)]
struct WindowState {
    /// The shortest time a delivery took from being sent to being accepted.
    min_rtt: Option<Duration>,
    /// When the window last changed: only deliveries sent after it say whether it should
    /// again.
    changed_at: Option<Instant>,
    /// Deliveries accepted so far (counted up to [`TRIPS_BEFORE_GROWTH`]).
    trips: u32,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("granted", &self.granted())
            .finish()
    }
}

impl Window {
    /// Takes over `budget`, which holds `start` permits now and may grow to `ceiling`; the
    /// window is full when fewer than `largest` (one message of the largest size) are free.
    pub(crate) fn attach(&self, budget: Arc<Semaphore>, start: u64, ceiling: u64, largest: u64) {
        let budget = Budget {
            permits: budget,
            start,
            ceiling: ceiling.max(start),
            largest: largest.max(1),
        };
        if self.budget.set(budget).is_ok() {
            self.granted.store(start, Ordering::Release);
        }
    }

    /// The bytes the window holds now (0 before a pipeline is attached).
    pub(crate) fn granted(&self) -> u64 {
        self.granted.load(Ordering::Acquire)
    }

    /// A delivery sent at `sent` was accepted `now` (its permits still held): updates the
    /// shortest round trip, and grows the window by [`GROWTH`] when it is full (fewer free
    /// permits than one largest message) and this trip was within [`QUEUE_FACTOR`] of the
    /// shortest, or shrinks it back toward its start when the trip was past
    /// [`SHRINK_FACTOR`]; not for a delivery that left before the last change (or before
    /// enough came back to know the shortest).
    pub(crate) fn accepted(&self, sent: Instant, now: Instant) {
        let Some(budget) = self.budget.get() else {
            return;
        };
        if budget.ceiling <= budget.start {
            return;
        }
        let rtt = now.saturating_duration_since(sent);
        if rtt.is_zero() {
            return;
        }
        let mut state = self.lock();
        let min_rtt = state.min_rtt.map_or(rtt, |min| min.min(rtt));
        state.min_rtt = Some(min_rtt);
        if state.trips < TRIPS_BEFORE_GROWTH {
            state.trips += 1;
            return;
        }
        if state.changed_at.is_some_and(|at| sent <= at) {
            return;
        }
        let granted = self.granted();
        let ratio = rtt.as_secs_f64() / min_rtt.as_secs_f64();
        if ratio > SHRINK_FACTOR {
            if granted > budget.start {
                let wanted = ((granted as f64 / GROWTH) as u64).max(budget.start);
                let shrunk = granted - self.take_back(budget, granted - wanted);
                if shrunk == granted {
                    return;
                }
                self.set(&mut state, (granted, shrunk), (rtt, now));
            }
            return;
        }
        let full = (budget.permits.available_permits() as u64) < budget.largest;
        if !full || ratio > QUEUE_FACTOR || granted >= budget.ceiling {
            return;
        }
        let grown = ((granted as f64 * GROWTH) as u64).min(budget.ceiling);
        let Ok(more) = usize::try_from(grown.saturating_sub(granted)) else {
            return;
        };
        if more == 0 || more > Semaphore::MAX_PERMITS - budget.permits.available_permits() {
            return;
        }
        budget.permits.add_permits(more);
        self.set(&mut state, (granted, grown), (rtt, now));
    }

    /// The window is `to` bytes now (was `from`), decided on a delivery's `rtt` at `now`.
    fn set(
        &self,
        state: &mut WindowState,
        (from, to): (u64, u64),
        (rtt, now): (Duration, Instant),
    ) {
        self.granted.store(to, Ordering::Release);
        state.changed_at = Some(now);
        tracing::debug!(
            from,
            to,
            rtt_ms = rtt.as_secs_f64() * 1e3,
            min_rtt_ms = state.min_rtt.unwrap_or_default().as_secs_f64() * 1e3,
            "in-flight window {}",
            if to > from {
                "grown: full, and no queue in its round trip"
            } else {
                "shrunk: its round trip was mostly queue"
            }
        );
    }

    /// Removes `bytes` permits from the budget for good, and says how many: the free ones at
    /// once, the rest as they come back (a task that waits for them in line with the
    /// producer's sends, so the window is smaller from the next send on, and no send that
    /// holds permits already waits).
    fn take_back(&self, budget: &Budget, bytes: u64) -> u64 {
        let Ok(bytes) = u32::try_from(bytes) else {
            return 0;
        };
        let forgotten = (budget.permits.forget_permits(bytes as usize) as u32).min(bytes);
        let rest = bytes - forgotten;
        if rest == 0 {
            return u64::from(forgotten);
        }
        // Outside a runtime (the unit tests) only the free permits go.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return u64::from(forgotten);
        };
        let permits = budget.permits.clone();
        drop(runtime.spawn(async move {
            if let Ok(permit) = permits.acquire_many_owned(rest).await {
                permit.forget();
            }
        }));
        u64::from(bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const MIB: u64 = 1 << 20;

    fn attached(start: u64, ceiling: u64) -> (Window, Arc<Semaphore>) {
        let budget = Arc::new(Semaphore::new(start as usize));
        let window = Window::default();
        window.attach(budget.clone(), start, ceiling, MIB);
        (window, budget)
    }

    /// A 2 MiB window (ceiling 16 MiB) whose permits are all held, as by sends in flight.
    fn full() -> (Window, Arc<Semaphore>, tokio::sync::OwnedSemaphorePermit) {
        let (window, budget) = attached(2 * MIB, 16 * MIB);
        let held = budget
            .clone()
            .try_acquire_many_owned(2 * MIB as u32)
            .unwrap();
        (window, budget, held)
    }

    /// A delivery sent `sent_ms` after `t0` is accepted `ms` later.
    fn trip(window: &Window, t0: Instant, sent_ms: u64, ms: u64) {
        let sent = t0 + Duration::from_millis(sent_ms);
        window.accepted(sent, sent + Duration::from_millis(ms));
    }

    /// The four trips that set the shortest (10 ms), then one that grows the full window.
    fn grow_once(window: &Window, t0: Instant) {
        (0..4).for_each(|i| trip(window, t0, i, 10));
        trip(window, t0, 10, 10);
    }

    /// A hub `delay` away (round trip) that stores `capacity` bytes per second, one delivery
    /// after the other; a producer that offers `offered` bytes per second (None: as fast as
    /// the window lets it) in 1 MiB deliveries, each holding its permits until accepted.
    /// Runs for `seconds` of simulated time.
    fn run(
        window: &Window,
        budget: &Arc<Semaphore>,
        delay: Duration,
        capacity: f64,
        offered: Option<f64>,
        seconds: f64,
    ) {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let service = MIB as f64 / capacity;
        let every = offered.map_or(0.0, |rate| MIB as f64 / rate);
        let (mut now, mut next_offer, mut hub_free) = (0.0_f64, 0.0_f64, 0.0_f64);
        let mut flight = VecDeque::new();
        while now < seconds {
            if now >= next_offer {
                if let Ok(permit) = budget.clone().try_acquire_many_owned(MIB as u32) {
                    let stored = hub_free.max(now + delay.as_secs_f64() / 2.0) + service;
                    hub_free = stored;
                    flight.push_back((now, stored + delay.as_secs_f64() / 2.0, permit));
                    next_offer = now + every;
                    continue;
                }
            }
            let Some(&(sent, done, _)) = flight.front() else {
                now = next_offer;
                continue;
            };
            if offered.is_some() && next_offer < done && budget.available_permits() >= MIB as usize
            {
                now = next_offer;
                continue;
            }
            now = done;
            window.accepted(at(sent), at(done));
            flight.pop_front();
        }
    }

    #[test]
    fn a_far_hub_grows_it_to_the_ceiling_and_no_further() {
        // 400 MB/s, 25 ms round trips: bandwidth x round trip is 10 MB, past the 8 MiB
        // ceiling; the trips stay near their shortest until the window passes it.
        let (window, budget) = attached(2 * MIB, 8 * MIB);
        run(&window, &budget, Duration::from_millis(25), 4e8, None, 1.0);
        assert_eq!(window.granted(), 8 * MIB);
        assert_eq!(budget.available_permits() as u64, 8 * MIB);
    }

    #[test]
    fn a_far_hub_grows_it_as_far_as_bandwidth_times_round_trip_and_a_queue() {
        // 100 MB/s, 25 ms: 2.5 MB in the pipe, and a 1 MiB delivery takes 10.5 ms to store.
        // Past the pipe, deliveries queue at the hub; trips reach twice the shortest (71 ms)
        // with ~7 MB in flight and three times it with ~10 MB, and the window stays between.
        let (window, budget) = attached(2 * MIB, 64 * MIB);
        run(&window, &budget, Duration::from_millis(25), 1e8, None, 2.0);
        let granted = window.granted();
        assert!(
            (6 * MIB..=11 * MIB).contains(&granted),
            "grew to {granted} bytes"
        );
    }

    #[test]
    fn a_near_hub_short_of_cpu_keeps_it_small() {
        // 300 MB/s, 1 ms round trips, 1 MiB deliveries: each takes 3.5 ms to store, so with
        // two or three in flight they queue and the trips are 2-3 times the shortest.
        let (window, budget) = attached(2 * MIB, 16 * MIB);
        run(&window, &budget, Duration::from_millis(1), 3e8, None, 2.0);
        let granted = window.granted();
        assert!(granted <= 4 * MIB, "grew to {granted} bytes");
    }

    #[test]
    fn a_window_that_is_not_full_does_not_grow() {
        // 25 ms away, but the producer offers only 20 MB/s: one delivery in flight at a time.
        let (window, budget) = attached(2 * MIB, 16 * MIB);
        run(
            &window,
            &budget,
            Duration::from_millis(25),
            4e8,
            Some(2e7),
            2.0,
        );
        assert_eq!(window.granted(), 2 * MIB);
    }

    #[test]
    fn the_first_trips_alone_do_not_grow_it() {
        // A full window, and deliveries coming back in their shortest trip: the first few
        // are all there is to know the shortest by, so they do not count.
        let (window, _budget, _held) = full();
        let t0 = Instant::now();
        trip(&window, t0, 0, 10);
        assert_eq!(window.granted(), 2 * MIB, "the first trip grew it");
        (1..4).for_each(|i| trip(&window, t0, i, 10));
        assert_eq!(window.granted(), 2 * MIB, "the first four trips grew it");
        trip(&window, t0, 20, 10);
        assert_eq!(window.granted(), 3 * MIB);
    }

    #[test]
    fn trips_of_mostly_queue_give_a_growth_back() {
        let (window, budget, _held) = full();
        let t0 = Instant::now();
        let trip = |sent_ms, ms| trip(&window, t0, sent_ms, ms);
        grow_once(&window, t0);
        assert_eq!(
            window.granted(),
            3 * MIB,
            "a full window with short trips grows"
        );
        // Sent before that growth: says nothing about the grown window.
        trip(15, 40);
        assert_eq!(window.granted(), 3 * MIB);
        // Within three times the shortest: holds still.
        trip(25, 25);
        assert_eq!(window.granted(), 3 * MIB);
        trip(30, 40);
        assert_eq!(
            window.granted(),
            2 * MIB,
            "four times the shortest is mostly queue"
        );
        assert_eq!(
            budget.available_permits(),
            0,
            "the granted permits went back"
        );
        // Never below the start.
        trip(80, 100);
        assert_eq!(window.granted(), 2 * MIB);
    }

    #[tokio::test]
    async fn a_shrink_takes_back_permits_held_by_sends_as_they_return() {
        let (window, budget, held) = full();
        let t0 = Instant::now();
        grow_once(&window, t0);
        let more = budget.clone().try_acquire_many_owned(MIB as u32).unwrap();
        assert_eq!(budget.available_permits(), 0, "all 3 MiB in use");
        trip(&window, t0, 30, 40);
        assert_eq!(window.granted(), 2 * MIB);
        // The MiB taken back is the first to come back; the rest is free again.
        drop(more);
        drop(held);
        tokio::task::yield_now().await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while budget.available_permits() != 2 * MIB as usize {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the window's permits settle at 2 MiB");
    }

    #[test]
    fn a_window_at_its_ceiling_stays() {
        let (window, budget) = attached(8 * MIB, 8 * MIB);
        run(&window, &budget, Duration::from_millis(50), 4e8, None, 1.0);
        assert_eq!(window.granted(), 8 * MIB);
        assert_eq!(budget.available_permits() as u64, 8 * MIB);
    }

    #[test]
    fn nothing_happens_before_a_pipeline_is_attached() {
        let window = Window::default();
        window.accepted(Instant::now(), Instant::now() + Duration::from_millis(50));
        assert_eq!(window.granted(), 0);
    }
}
