//! The in-flight byte window of one AMQP producer: it starts at a size that keeps a producer
//! near its hub in a few tens of MB, and grows toward the configured ceiling when the hub is
//! far, by the bandwidth-delay product its own deliveries show (so a long round trip does not
//! cap throughput at window / round trip, and a near hub does not pay the memory).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Semaphore;

/// How much more than the measured bandwidth-delay product the window holds: a delivery's
/// outcome comes only after its last byte reached the hub and was stored, so the pipe holds
/// both the bytes on the way and the ones being stored.
///
/// With a full window the round trip is about window / rate, so the window grows whenever
/// the shortest trip is more than 1 / HEADROOM of the typical one. A hub far away keeps its
/// trips near their shortest and grows it; a near hub short of CPU (sharing two cores with
/// `hubsend send`'s three busy threads) made trips of 20-40 ms all of queueing, and at 2.0
/// grew the window to 10-16 MiB in half the runs (peak RSS 60-94 MB) for no gain. At 1.5
/// it stays at 8 MiB there (52-58 MB over 6 runs), and 20 ms away batches still reach
/// 89-93 % of their loopback rate (bench, TLS).
const HEADROOM: f64 = 1.5;

/// See the module docs. One per connection, shared by its link tasks (which report each
/// accepted delivery) and the producer's pipeline (whose byte budget it grows).
#[derive(Default)]
pub(crate) struct Window {
    /// The pipeline's byte budget and its ceiling, once the producer made it.
    budget: OnceLock<(Arc<Semaphore>, u64)>,
    /// Bytes the budget holds now: read on every turn of a link task's loop, so kept out of
    /// the lock (written under it).
    granted: AtomicU64,
    state: Mutex<WindowState>,
}

/// The bytes of the deliveries a connection's hub accepted so far, and when it accepted the
/// last of them (a link notes it when it sends a delivery).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Delivered {
    bytes: u64,
    at: Option<Instant>,
}

#[derive(Default)]
struct WindowState {
    /// Bytes of the deliveries accepted so far, and when the last was.
    delivered: Delivered,
    /// The shortest time a delivery took from being sent to being accepted.
    min_rtt: Option<Duration>,
    /// The best delivery rate seen, in bytes per second: the bytes accepted while one
    /// delivery was on its way, over the time from the acceptance before it was sent to its
    /// own (so a burst of outcomes read at once does not count as bandwidth).
    best_rate: f64,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("granted", &self.granted())
            .finish()
    }
}

impl Window {
    /// Takes over `budget`, which holds `start` permits now and may grow to `ceiling`.
    pub(crate) fn attach(&self, budget: Arc<Semaphore>, start: u64, ceiling: u64) {
        if self.budget.set((budget, ceiling.max(start))).is_ok() {
            self.granted.store(start, Ordering::Release);
        }
    }

    /// The bytes the window holds now (0 before a pipeline is attached).
    pub(crate) fn granted(&self) -> u64 {
        self.granted.load(Ordering::Acquire)
    }

    /// What was accepted so far; a link notes it when it sends a delivery.
    pub(crate) fn delivered(&self) -> Delivered {
        self.lock().delivered
    }

    /// A delivery of `bytes`, sent at `sent` when [`delivered`](Self::delivered) was
    /// `then`, was accepted `now`: updates the shortest round trip and the best delivery
    /// rate, and grows the window when they say it is too small.
    pub(crate) fn accepted(&self, bytes: u64, (sent, then): (Instant, Delivered), now: Instant) {
        let mut state = self.lock();
        state.delivered.bytes += bytes;
        state.delivered.at = Some(now);
        let Some((budget, ceiling)) = self.budget.get() else {
            return;
        };
        let granted = self.granted();
        if granted >= *ceiling {
            return;
        }
        let rtt = now.saturating_duration_since(sent);
        if rtt.is_zero() {
            return;
        }
        let min_rtt = state.min_rtt.map_or(rtt, |min| min.min(rtt));
        state.min_rtt = Some(min_rtt);
        let since = now.saturating_duration_since(then.at.map_or(sent, |at| at.min(sent)));
        let rate = state.delivered.bytes.saturating_sub(then.bytes) as f64 / since.as_secs_f64();
        state.best_rate = state.best_rate.max(rate);
        let wanted = (HEADROOM * state.best_rate * min_rtt.as_secs_f64()) as u64;
        if wanted <= granted {
            return;
        }
        let grown = wanted.min(*ceiling);
        let more = grown - granted;
        let Ok(more_permits) = usize::try_from(more) else {
            return;
        };
        if more_permits > Semaphore::MAX_PERMITS - budget.available_permits() {
            return;
        }
        budget.add_permits(more_permits);
        tracing::debug!(
            from = granted,
            to = grown,
            rate_mb_s = state.best_rate / 1e6,
            min_rtt_ms = min_rtt.as_secs_f64() * 1e3,
            "in-flight window grown to the bandwidth-delay product"
        );
        self.granted.store(grown, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached(start: u64, ceiling: u64) -> (Window, Arc<Semaphore>) {
        let budget = Arc::new(Semaphore::new(start as usize));
        let window = Window::default();
        window.attach(budget.clone(), start, ceiling);
        (window, budget)
    }

    /// 1 MiB deliveries sent every `every`, each accepted `rtt` later.
    fn run(window: &Window, rtt: Duration, every: Duration, n: u32) {
        let t0 = Instant::now();
        let mut sent = std::collections::VecDeque::new();
        for i in 0..n {
            let now = t0 + every * i;
            while let Some(&(at, then)) = sent.front() {
                if at + rtt > now {
                    break;
                }
                sent.pop_front();
                window.accepted(1 << 20, (at, then), at + rtt);
            }
            sent.push_back((now, window.delivered()));
        }
    }

    #[test]
    fn a_burst_of_outcomes_is_not_bandwidth() {
        // One delivery accepted at 10 ms; ten more sent 3 ms apart from 12 ms on, their
        // outcomes read at once at 50 ms. Over each one's own flight the last would say
        // 10 MiB in 11 ms; from the acceptance before it was sent, 10 MiB in 40 ms.
        let (window, _) = attached(8 << 20, 64 << 20);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let first = window.delivered();
        window.accepted(1 << 20, (t0, first), ms(10));
        let then = window.delivered();
        for i in 0..10 {
            window.accepted(1 << 20, (ms(12 + 3 * i), then), ms(50));
        }
        // ~262 MB/s over the 10 ms shortest trip, times 1.5: ~4 MB, below the start.
        assert_eq!(window.granted(), 8 << 20);
    }

    #[test]
    fn a_near_hub_keeps_the_start_window() {
        // 400 MB/s, 3 ms round trips: 1.5 x 1.2 MB is below the 8 MiB start.
        let (window, budget) = attached(8 << 20, 16 << 20);
        run(
            &window,
            Duration::from_millis(3),
            Duration::from_micros(2620),
            400,
        );
        assert_eq!(window.granted(), 8 << 20);
        assert_eq!(budget.available_permits(), 8 << 20);
    }

    #[test]
    fn a_far_hub_grows_it_to_the_ceiling_and_no_further() {
        // 350 MB/s, 25 ms round trips: 1.5 x 8.7 MB is past the 12 MiB ceiling.
        let (window, budget) = attached(8 << 20, 12 << 20);
        run(
            &window,
            Duration::from_millis(25),
            Duration::from_millis(3),
            400,
        );
        assert_eq!(window.granted(), 12 << 20);
        assert_eq!(budget.available_permits(), 12 << 20);
    }

    #[test]
    fn a_window_at_its_ceiling_stays() {
        let (window, budget) = attached(8 << 20, 8 << 20);
        run(
            &window,
            Duration::from_millis(50),
            Duration::from_millis(4),
            100,
        );
        assert_eq!(window.granted(), 8 << 20);
        assert_eq!(budget.available_permits(), 8 << 20);
    }

    #[test]
    fn nothing_happens_before_a_pipeline_is_attached() {
        let window = Window::default();
        run(
            &window,
            Duration::from_millis(50),
            Duration::from_millis(4),
            100,
        );
        assert_eq!(window.granted(), 0);
    }
}
