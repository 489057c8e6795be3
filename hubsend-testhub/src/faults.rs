//! Fault injection: shared switches that connection, CBS and producer-link tasks consult.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

/// A command to every live connection.
#[derive(Debug, Clone)]
pub(crate) enum ConnCommand {
    Close {
        condition: String,
        description: String,
    },
    Drop,
}

#[derive(Debug, Default)]
pub(crate) struct FaultState {
    pub detach_after: Option<(u64, String, String)>,
    pub reject_every: Option<(u64, String)>,
    pub transfer_count: u64,
    pub withhold_until: Option<Instant>,
    pub delay: Duration,
    pub fail_put: Option<(u32, i32)>,
}

/// Internal shared fault state.
#[derive(Debug)]
pub(crate) struct FaultShared {
    pub state: Mutex<FaultState>,
    /// Bumped with (generation, condition, description) when producer links must detach.
    pub detach_tx: watch::Sender<Option<(u64, String, String)>>,
    /// Bumped whenever credit withholding changes, so links re-check.
    pub credit_tx: watch::Sender<u64>,
    pub connections: Mutex<Vec<mpsc::UnboundedSender<ConnCommand>>>,
}

impl FaultShared {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(FaultState::default()),
            detach_tx: watch::channel(None).0,
            credit_tx: watch::channel(0).0,
            connections: Mutex::new(Vec::new()),
        }
    }

    /// Counts one incoming transfer; returns the rejection condition if this one must fail.
    // `is_multiple_of` needs Rust 1.87; the workspace MSRV is 1.85.
    #[allow(unknown_lints, clippy::manual_is_multiple_of)]
    pub(crate) fn on_transfer(&self) -> Option<String> {
        let mut st = self.state.lock().unwrap();
        st.transfer_count += 1;
        match &st.reject_every {
            Some((n, cond)) if *n > 0 && st.transfer_count % *n == 0 => Some(cond.clone()),
            _ => None,
        }
    }

    /// Counts one accepted delivery; fires the detach fault when its count runs out.
    pub(crate) fn on_accepted(&self) {
        let mut st = self.state.lock().unwrap();
        let fire = match st.detach_after.as_mut() {
            Some((remaining, _, _)) => {
                *remaining = remaining.saturating_sub(1);
                *remaining == 0
            }
            None => false,
        };
        if fire {
            if let Some((_, cond, desc)) = st.detach_after.take() {
                drop(st);
                self.detach_tx.send_modify(|v| {
                    let gen = v.as_ref().map(|x| x.0 + 1).unwrap_or(1);
                    *v = Some((gen, cond, desc));
                });
            }
        }
    }

    pub(crate) fn withheld_until(&self) -> Option<Instant> {
        let st = self.state.lock().unwrap();
        st.withhold_until.filter(|t| *t > Instant::now())
    }

    pub(crate) fn disposition_delay(&self) -> Duration {
        self.state.lock().unwrap().delay
    }

    /// Takes one put-token failure, if armed.
    pub(crate) fn take_put_failure(&self) -> Option<i32> {
        let mut st = self.state.lock().unwrap();
        match st.fail_put.as_mut() {
            Some((n, status)) if *n > 0 => {
                *n -= 1;
                let s = *status;
                if *n == 0 {
                    st.fail_put = None;
                }
                Some(s)
            }
            _ => None,
        }
    }

    fn broadcast(&self, cmd: ConnCommand) {
        let mut conns = self.connections.lock().unwrap();
        conns.retain(|tx| tx.send(cmd.clone()).is_ok());
    }
}

/// Cheap, cloneable handle to the hub's fault injection.
#[derive(Clone, Debug)]
pub struct Faults {
    pub(crate) shared: Arc<FaultShared>,
}

impl Faults {
    /// After `deliveries` more accepted deliveries (across all producer links), detach every
    /// producer link (closed=true) with `condition`/`description`, once.
    pub fn detach_links_after(&self, deliveries: u64, condition: &str, description: &str) {
        if deliveries == 0 {
            self.shared.detach_tx.send_modify(|v| {
                let gen = v.as_ref().map(|x| x.0 + 1).unwrap_or(1);
                *v = Some((gen, condition.to_string(), description.to_string()));
            });
            return;
        }
        self.shared.state.lock().unwrap().detach_after =
            Some((deliveries, condition.to_string(), description.to_string()));
    }

    /// Close every current connection now with a Close frame carrying that error.
    pub fn close_connections(&self, condition: &str, description: &str) {
        self.shared.broadcast(ConnCommand::Close {
            condition: condition.to_string(),
            description: description.to_string(),
        });
    }

    /// Drop every current TCP connection without a Close frame.
    pub fn drop_connections(&self) {
        self.shared.broadcast(ConnCommand::Drop);
    }

    /// Dispose every `n`th transfer as Rejected with `condition` and store nothing for it
    /// (`0` turns this off).
    pub fn reject_every_nth(&self, n: u64, condition: &str) {
        let mut st = self.shared.state.lock().unwrap();
        st.reject_every = (n > 0).then(|| (n, condition.to_string()));
        st.transfer_count = 0;
    }

    /// Stop granting new credit to producer links for `duration`.
    pub fn withhold_credit(&self, duration: std::time::Duration) {
        self.shared.state.lock().unwrap().withhold_until = Some(Instant::now() + duration);
        self.shared.credit_tx.send_modify(|g| *g += 1);
    }

    /// Hold each producer disposition for `delay` (`Duration::ZERO` turns this off).
    pub fn delay_dispositions(&self, delay: std::time::Duration) {
        self.shared.state.lock().unwrap().delay = delay;
    }

    /// Answer the next `count` put-token requests with `status` (e.g. 401).
    pub fn fail_put_tokens(&self, count: u32, status: i32) {
        self.shared.state.lock().unwrap().fail_put = (count > 0).then_some((count, status));
    }

    /// Turn every fault off (links already detached stay detached).
    pub fn clear(&self) {
        let mut st = self.shared.state.lock().unwrap();
        let count = st.transfer_count;
        *st = FaultState::default();
        st.transfer_count = count;
        drop(st);
        self.shared.credit_tx.send_modify(|g| *g += 1);
    }
}
