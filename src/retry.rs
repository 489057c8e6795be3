//! [`RetryOptions`] and the one classifier that decides what a failure means for a delivery:
//! retry it, re-attach the link (reconnecting when the connection is gone), or fail.
//!
//! | failure | action | why |
//! |---|---|---|
//! | `com.microsoft:server-busy`, `com.microsoft:timeout`, `amqp:internal-error`, `com.microsoft:operation-cancelled`, released/modified outcomes | retry the delivery after a back-off | the hub is healthy but could not take it now |
//! | `amqp:link:detach-forced`, `amqp:link:stolen`, `amqp:link:transfer-limit-exceeded`, any other lost link | re-attach and resend every unsettled delivery in order | the link is gone, the connection may not be |
//! | `amqp:connection:forced`, framing errors, I/O errors, a dropped socket | reconnect, re-authorise (CBS), re-attach, resend in order | the connection is gone |
//! | `amqp:unauthorized-access` on a link | put a fresh token, then re-attach; a refused token fails | the hub drops links whose token expired |
//! | `amqp:not-found`, `amqp:link:message-size-exceeded`, argument errors, anything else | fail the delivery now | trying again cannot succeed |
//!
//! Retries are at-least-once: a delivery whose outcome was lost with the connection is sent
//! again, so the hub may store it twice. Order on a link is kept for resends after a lost
//! link or connection; a delivery retried after a throttling rejection can land after
//! deliveries queued behind it.

use std::time::Duration;

use crate::error::Error;
#[cfg(test)]
use crate::error::{Condition, ErrorKind};

/// How hard to try before a delivery fails for good.
///
/// | setting | default |
/// |---|---|
/// | [`max_retries`](Self::max_retries) | 8 |
/// | [`base_delay`](Self::base_delay) | 200 ms |
/// | [`max_delay`](Self::max_delay) | 30 s |
/// | [`try_timeout`](Self::try_timeout) | 60 s |
/// | [`deadline`](Self::deadline) | 10 min |
///
/// The n-th retry waits `base_delay × 2^(n-1)`, capped at `max_delay`, plus up to 20 % jitter.
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryOptions {
    pub(crate) max_retries: u32,
    pub(crate) base_delay: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) try_timeout: Duration,
    pub(crate) deadline: Duration,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            max_retries: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            try_timeout: Duration::from_secs(60),
            deadline: Duration::from_secs(600),
        }
    }
}

impl RetryOptions {
    /// The defaults listed above.
    pub fn new() -> RetryOptions {
        RetryOptions::default()
    }

    /// How many times a delivery (or a reconnect) is retried before it fails; 0 disables retries.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The first back-off delay.
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The longest back-off delay.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// How long one attempt may wait for the hub's outcome before the link is treated as
    /// lost (re-attached, and the delivery sent again).
    pub fn try_timeout(mut self, timeout: Duration) -> Self {
        self.try_timeout = timeout;
        self
    }

    /// How long a delivery may take in all, retries included, before it fails with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The delay before retry number `attempt` (1-based), with jitter.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let base = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        base + base.mul_f64(jitter())
    }
}

/// A uniform fraction in `0..0.2`. From getrandom (in the tree anyway, through uuid) instead
/// of a whole `rand` for one number a retry; retries are rare, so one system call each is free.
fn jitter() -> f64 {
    // No randomness from the OS (not seen on supported targets): retry without jitter.
    let bits = getrandom::u64().unwrap_or(0);
    (bits >> 11) as f64 / (1_u64 << 53) as f64 * 0.2
}

pub(crate) use crate::error::Action;

/// The classifier: what a sender link does about a delivery that failed with `error`. It
/// reads the one policy table ([`crate::error::Condition`]'s rows); it owns none.
pub(crate) fn classify(error: &Error) -> Action {
    error.action()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_follows_the_table() {
        let c = |symbol: &str| Error::from_condition(Condition::from_symbol(symbol), None, "t");
        assert_eq!(classify(&c("com.microsoft:server-busy")), Action::Retry);
        assert_eq!(classify(&c("amqp:link:detach-forced")), Action::Reattach);
        assert_eq!(classify(&c("amqp:connection:forced")), Action::Reattach);
        assert_eq!(
            classify(&c("amqp:unauthorized-access")),
            Action::RefreshAndReattach
        );
        assert_eq!(classify(&c("amqp:not-found")), Action::Fail);
        assert_eq!(
            classify(&c("amqp:link:message-size-exceeded")),
            Action::Fail
        );
        assert_eq!(
            classify(&Error::new(ErrorKind::Connection, "reset")),
            Action::Reattach
        );
        assert_eq!(
            classify(&Error::new(ErrorKind::NotStored, "released")),
            Action::Retry
        );
        assert_eq!(
            classify(&Error::new(ErrorKind::InvalidConfig, "x")),
            Action::Fail
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryOptions::new()
            .base_delay(Duration::from_millis(100))
            .max_delay(Duration::from_millis(1000));
        let d1 = r.delay(1);
        assert!(d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(120));
        let d3 = r.delay(3);
        assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(480));
        let d9 = r.delay(9);
        assert!(d9 >= Duration::from_millis(1000) && d9 <= Duration::from_millis(1200));
    }

    #[test]
    fn jitter_is_spread_over_a_fifth() {
        let draws: Vec<f64> = (0..1_000).map(|_| jitter()).collect();
        assert!(draws.iter().all(|j| (0.0..0.2).contains(j)), "{draws:?}");
        // Spread, not one value: both halves of the range are hit.
        assert!(draws.iter().any(|&j| j < 0.1) && draws.iter().any(|&j| j >= 0.1));
    }
}
