//! Fault injection: shared switches that connection, CBS and producer-link tasks consult.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
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
    /// Accepted deliveries left before every connection is closed with this condition, once.
    pub close_after: Option<(u64, String)>,
    pub reject_every: Option<(u64, String)>,
    /// Reject each transfer with probability 1/n instead of every nth.
    pub reject_at_random: bool,
    pub transfer_count: u64,
    pub withhold_until: Option<Instant>,
    pub delay: Duration,
    pub fail_put: Option<(u32, i32)>,
    /// Hold each injected rejection until the link's next settlement and write both at once.
    pub coalesce_rejections: bool,
    /// Never dispose a producer delivery.
    pub never_settle: bool,
    /// Close each connection (with this condition) on its first producer transfer.
    pub close_after_first_transfer: Option<String>,
    /// Detach each producer link (with this condition) on its first transfer.
    pub detach_after_first_transfer: Option<String>,
    /// REST: answer the next N requests with (status, Retry-After seconds) and store nothing.
    pub rest_fail: Option<(u32, u16, Option<u64>)>,
}

/// Withholding "forever": far enough that no test outlives it, near enough not to overflow.
fn forever() -> Instant {
    Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600)
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
    /// Interval of the empty-frame flood in microseconds (0 = off); read by every wire.
    pub heartbeat_every_us: AtomicU64,
    /// Armed until the first producer transfer after arming takes it (see
    /// [`Faults::dispose_all_deliveries_once`]).
    pub dispose_all: AtomicBool,
    /// Bumped to make every live WebSocket close (see [`Faults::close_websockets`]).
    pub ws_close: watch::Sender<u64>,
    /// Send each chunk the hub writes as two WebSocket messages.
    pub ws_split: AtomicBool,
    /// Bumped to make every live WebSocket send a ping (see [`Faults::ping_websockets`]).
    pub ws_ping: watch::Sender<u64>,
}

impl Default for FaultShared {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultShared {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(FaultState::default()),
            detach_tx: watch::channel(None).0,
            credit_tx: watch::channel(0).0,
            connections: Mutex::new(Vec::new()),
            heartbeat_every_us: AtomicU64::new(0),
            dispose_all: AtomicBool::new(false),
            ws_close: watch::channel(0).0,
            ws_split: AtomicBool::new(false),
            ws_ping: watch::channel(0).0,
        }
    }

    /// Reads the fault state under its lock.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&FaultState) -> T) -> T {
        f(&self.state.lock().unwrap())
    }

    /// The empty-frame flood interval, if armed.
    pub(crate) fn heartbeat_every(&self) -> Option<Duration> {
        match self.heartbeat_every_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Takes the one-shot all-ids disposition, if armed.
    pub(crate) fn take_dispose_all(&self) -> bool {
        self.dispose_all.load(Ordering::Relaxed) && self.dispose_all.swap(false, Ordering::SeqCst)
    }

    /// Counts one incoming transfer; returns the rejection condition if this one must fail.
    pub(crate) fn on_transfer(&self) -> Option<String> {
        let mut st = self.state.lock().unwrap();
        st.transfer_count += 1;
        match &st.reject_every {
            Some((n, cond)) if *n > 0 && st.reject_at_random => rand::random::<u64>()
                .is_multiple_of(*n)
                .then(|| cond.clone()),
            Some((n, cond)) if *n > 0 && st.transfer_count.is_multiple_of(*n) => Some(cond.clone()),
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
        let detach = fire.then(|| st.detach_after.take()).flatten();
        drop(st);
        if let Some((_, cond, desc)) = detach {
            self.detach_tx.send_modify(|v| {
                let gen = v.as_ref().map(|x| x.0 + 1).unwrap_or(1);
                *v = Some((gen, cond, desc));
            });
        }
    }

    /// Counts one delivery stored (to be accepted, its disposition not yet sent); `true` when
    /// it is the one the close fault waits for: every connection is then being closed, and
    /// this delivery must never be acknowledged. Counted at the store, not at the
    /// acknowledgement, so the close always leaves at least this delivery stored but
    /// unacknowledged, however the client paces its batches.
    pub(crate) fn on_stored(&self) -> bool {
        let close = {
            let mut st = self.state.lock().unwrap();
            let fire = match st.close_after.as_mut() {
                Some((remaining, _)) => {
                    *remaining = remaining.saturating_sub(1);
                    *remaining == 0
                }
                None => false,
            };
            fire.then(|| st.close_after.take()).flatten()
        };
        let Some((_, condition)) = close else {
            return false;
        };
        self.broadcast(ConnCommand::Close {
            condition,
            description: "Closed by fault injection after stored deliveries.".to_string(),
        });
        true
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

    /// Takes one REST failure (status, Retry-After seconds), if armed.
    pub(crate) fn take_rest_failure(&self) -> Option<(u16, Option<u64>)> {
        let mut st = self.state.lock().unwrap();
        let (n, status, retry_after) = st.rest_fail.as_mut()?;
        *n -= 1;
        let taken = (*status, *retry_after);
        if *n == 0 {
            st.rest_fail = None;
        }
        Some(taken)
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

    /// REST endpoint: answer the next `requests` requests with HTTP `status` (e.g. 503 or 429)
    /// and, when given, `Retry-After: retry_after_secs`, storing nothing (`0` turns it off).
    pub fn rest_fail_next(&self, requests: u32, status: u16, retry_after_secs: Option<u64>) {
        self.shared.state.lock().unwrap().rest_fail =
            (requests > 0).then_some((requests, status, retry_after_secs));
    }

    /// Close every current connection now with a Close frame carrying that error.
    pub fn close_connections(&self, condition: &str, description: &str) {
        self.shared.broadcast(ConnCommand::Close {
            condition: condition.to_string(),
            description: description.to_string(),
        });
    }

    /// When the `deliveries`th accepted delivery from now (across all producer links) has been
    /// stored, close every connection with a CLOSE carrying `condition` (e.g.
    /// `amqp:connection:forced`) before acknowledging it, once. That delivery, and any others
    /// stored but not yet acknowledged then (see
    /// [`delay_dispositions`](Self::delay_dispositions)), are never acknowledged: the client
    /// must resend them, and only an idempotent producer avoids storing them twice. `0`
    /// closes them now.
    pub fn close_connections_after(&self, deliveries: u64, condition: &str) {
        if deliveries == 0 {
            self.close_connections(
                condition,
                "Closed by fault injection after accepted deliveries.",
            );
            return;
        }
        self.shared.state.lock().unwrap().close_after = Some((deliveries, condition.to_string()));
    }

    /// Drop every current TCP connection without a Close frame.
    pub fn drop_connections(&self) {
        self.shared.broadcast(ConnCommand::Drop);
    }

    /// Dispose every `n`th transfer as Rejected with `condition` and store nothing for it
    /// (`0` turns this off, coalescing too).
    pub fn reject_every_nth(&self, n: u64, condition: &str) {
        let mut st = self.shared.state.lock().unwrap();
        st.reject_every = (n > 0).then(|| (n, condition.to_string()));
        st.coalesce_rejections = false;
        st.reject_at_random = false;
        st.transfer_count = 0;
    }

    /// Like [`reject_every_nth`](Self::reject_every_nth), but each transfer is rejected with
    /// probability 1/`n`: a client whose retries fall into step with a fixed period (a held
    /// partition resending one delivery per cycle) is not hit on every try, as it would not
    /// be by a real service's throttling.
    pub fn reject_at_random(&self, n: u64, condition: &str) {
        self.reject_every_nth(n, condition);
        self.shared.state.lock().unwrap().reject_at_random = n > 0;
    }

    /// Like [`reject_every_nth`](Self::reject_every_nth), and each rejection is held back until
    /// the same link's next delivery is settled: the client then receives the rejection's
    /// DISPOSITION and the next delivery's DISPOSITION (normally an acceptance) in one TCP write,
    /// flushed once, so both usually arrive in a single read. A rejection with no following
    /// delivery within 100 ms is sent alone. Legal AMQP; it catches clients that pair outcomes
    /// with deliveries by arrival order instead of by delivery id. `0` turns this off.
    pub fn reject_every_nth_coalesced(&self, n: u64, condition: &str) {
        self.reject_every_nth(n, condition);
        self.shared.state.lock().unwrap().coalesce_rejections = n > 0;
    }

    /// Producer links attach normally but are never granted any credit while this is on (for
    /// every link of every connection, already attached or attached later; [`clear`](Self::clear)
    /// ends it). The client sees its ATTACH answered and a FLOW with link-credit 0, and can
    /// never send a delivery.
    pub fn never_grant_credit(&self) {
        self.shared.state.lock().unwrap().withhold_until = Some(forever());
        self.shared.credit_tx.send_modify(|g| *g += 1);
    }

    /// Producer deliveries are never settled (no DISPOSITION, nothing stored) while this is
    /// on; credit keeps being granted, so the client can keep sending. Combine with
    /// [`flood_heartbeats`](Self::flood_heartbeats) for a peer that looks alive forever.
    pub fn never_settle(&self) {
        self.shared.state.lock().unwrap().never_settle = true;
    }

    /// Every connection writes an empty AMQP frame (a heartbeat, 8 bytes) every `every` while
    /// this is on, on top of its normal traffic, so the client's idle timeout never fires.
    /// `Duration::ZERO` turns it off.
    pub fn flood_heartbeats(&self, every: Duration) {
        let us = every
            .as_micros()
            .clamp(u128::from(!every.is_zero()), u128::from(u64::MAX));
        self.shared
            .heartbeat_every_us
            .store(us as u64, Ordering::Relaxed);
    }

    /// Each connection is closed with a CLOSE carrying `condition` (e.g.
    /// `amqp:connection:forced`) as soon as its first producer TRANSFER arrives; that delivery
    /// is neither settled nor stored. Every new connection gets the same treatment, so a
    /// client that reconnects and resends storms; count it with
    /// [`HubStats::connections_accepted`](crate::HubStats::connections_accepted).
    pub fn close_each_connection_after_first_transfer(&self, condition: &str) {
        self.shared.state.lock().unwrap().close_after_first_transfer = Some(condition.to_string());
    }

    /// Each producer link is detached (closed=true) with `condition` (e.g.
    /// `amqp:link:detach-forced`) as soon as its first TRANSFER arrives; that delivery is
    /// neither settled nor stored. Every link attached later gets the same, so a client that
    /// re-attaches and resends storms; count it with
    /// [`HubStats::producer_links_attached`](crate::HubStats::producer_links_attached).
    pub fn detach_each_link_after_first_transfer(&self, condition: &str) {
        self.shared
            .state
            .lock()
            .unwrap()
            .detach_after_first_transfer = Some(condition.to_string());
    }

    /// Once, right after the next producer TRANSFER arrives, its connection sends one
    /// DISPOSITION (role receiver, settled, accepted) on that session covering delivery ids
    /// first=0 to last=4294967295 (`u32::MAX`). The delivery itself is then processed and
    /// settled normally. A client that walks the range id by id spends tens of seconds in it
    /// (fe2o3's session loop does, ~35 s of CPU).
    pub fn dispose_all_deliveries_once(&self) {
        self.shared.dispose_all.store(true, Ordering::SeqCst);
    }

    /// Every WebSocket open now is closed at the WebSocket level (a close frame, code 1001
    /// "going away", then the TCP connection), with no AMQP CLOSE first: what a load
    /// balancer or proxy in front of the service does. Connections opened later are not
    /// affected. Raw AMQP connections are not touched; [`drop_connections`](Self::drop_connections)
    /// drops both kinds.
    pub fn close_websockets(&self) {
        self.shared.ws_close.send_modify(|g| *g += 1);
    }

    /// Every WebSocket open now sends one ping (payload `hubsend-testhub`), as a proxy or load
    /// balancer checking an idle connection would; the pongs that come back are counted in
    /// [`HubStats::websocket_pongs_received`](crate::HubStats::websocket_pongs_received).
    pub fn ping_websockets(&self) {
        self.shared.ws_ping.send_modify(|g| *g += 1);
    }

    /// While on, the WebSocket listener sends each chunk the AMQP server writes as two binary
    /// messages, so AMQP frames span messages (legal: message boundaries carry no meaning).
    pub fn split_websocket_messages(&self, on: bool) {
        self.shared.ws_split.store(on, Ordering::Relaxed);
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
        self.shared.heartbeat_every_us.store(0, Ordering::Relaxed);
        self.shared.dispose_all.store(false, Ordering::SeqCst);
        self.shared.ws_split.store(false, Ordering::Relaxed);
        self.shared.credit_tx.send_modify(|g| *g += 1);
    }
}
