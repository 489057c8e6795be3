//! Engine edge cases against a small peer built on fe2o3's acceptor, over `tokio::io::duplex`
//! in paused time: hours of token refreshes run in milliseconds and every deadline is exact.
//!
//! The peer answers put-token per audience (a status, or never), stores or holds what the hub
//! link receives, and can detach that link once with any condition; it counts connections,
//! hub-link attaches and put-tokens (with the virtual time of each).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SaslAnonymousMechanism,
    SessionAcceptor,
};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, Properties, TargetArchetype,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Symbol, Value};
use fe2o3_amqp::{Receiver, Sender};
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::super::{ConnectConfig, Engine};
use super::{send_on, stream_both};
use crate::auth::{AccessToken, TokenProvider, TokenType};
use crate::entity::eventhubs;
use crate::error::{policy_table, Action, ErrorKind};
use crate::retry::RetryOptions;
use crate::transport::{Framing, Memory, Route};

const HOST: &str = "peer.servicebus.example";
const HOUR: Duration = Duration::from_secs(3600);
/// The engine's bound on one put-token (and every other request).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// What the peer answers a put-token for one audience with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(i32),
    /// Takes the request and never answers.
    Silent,
}

#[derive(Default)]
struct State {
    /// Per audience; 202 when not set.
    answers: HashMap<String, Answer>,
    /// Every put-token: when (virtual time) and for which audience.
    puts: Vec<(Instant, String)>,
    connections: usize,
    hub_attaches: usize,
    stored: usize,
    /// Hold hub transfers unsettled instead of accepting them.
    hold: bool,
    held: Vec<Delivery<Body<Value>>>,
    /// Refuse the hub link's next transfer with this condition (once).
    refuse: Option<&'static str>,
    /// Detach the hub link with this condition on its next transfer (once).
    detach: Option<&'static str>,
    /// Transfers received on hub links.
    transfers: usize,
    /// Hub links that ended (detached or closed by either side).
    hub_links_ended: usize,
}

#[derive(Default)]
struct Peer {
    state: Mutex<State>,
    changed: Notify,
}

impl Peer {
    fn new() -> Arc<Peer> {
        Arc::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap());
        self.changed.notify_waiters();
        out
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap())
    }

    /// Waits (on the peer's own changes, bounded in virtual time) until `until` holds.
    async fn wait(&self, until: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let changed = self.changed.notified();
            if self.read(&until) {
                return;
            }
            tokio::time::timeout_at(deadline, changed)
                .await
                .expect("the peer never got there");
        }
    }

    /// The virtual times at which `audience` was put.
    fn puts(&self, audience: &str) -> Vec<Instant> {
        self.read(|s| {
            s.puts
                .iter()
                .filter(|(_, a)| a == audience)
                .map(|(t, _)| *t)
                .collect()
        })
    }

    /// A route whose every dial opens a fresh duplex served by this peer.
    fn route(self: &Arc<Self>) -> Route {
        let peer = self.clone();
        Route::Memory(Memory(Arc::new(move || {
            let (client, server) = tokio::io::duplex(1 << 20);
            tokio::spawn(serve(peer.clone(), server));
            client
        })))
    }
}

async fn serve(peer: Arc<Peer>, io: DuplexStream) {
    let acceptor = ConnectionAcceptor::builder()
        .container_id("peer")
        .sasl_acceptor(SaslAnonymousMechanism::new())
        .build();
    let Ok(mut connection) = acceptor.accept(io).await else {
        return;
    };
    peer.with(|s| s.connections += 1);
    let sessions = SessionAcceptor::new();
    while let Some(incoming) = connection.next_incoming_session().await {
        let Ok(session) = sessions
            .accept_incoming_session(incoming, &mut connection)
            .await
        else {
            return;
        };
        tokio::spawn(serve_session(peer.clone(), session));
    }
}

fn address(attach: &Attach) -> Option<String> {
    let target = attach.target.as_deref().and_then(|t| match t {
        TargetArchetype::Target(t) => t.address.clone(),
        #[allow(unreachable_patterns)]
        _ => None,
    });
    target.or_else(|| attach.source.as_ref().and_then(|s| s.address.clone()))
}

async fn serve_session(peer: Arc<Peer>, mut session: ListenerSessionHandle) {
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    let mut reply_rx = Some(reply_rx);
    while let Some(attach) = session.next_incoming_attach().await {
        let cbs = address(&attach).is_some_and(|a| a == "$cbs");
        match LinkAcceptor::new()
            .accept_incoming_attach(attach, &mut session)
            .await
        {
            Ok(LinkEndpoint::Receiver(r)) if cbs => {
                tokio::spawn(put_tokens(peer.clone(), r, reply_tx.clone()));
            }
            Ok(LinkEndpoint::Receiver(r)) => {
                peer.with(|s| s.hub_attaches += 1);
                tokio::spawn(hub_link_counted(peer.clone(), r));
            }
            Ok(LinkEndpoint::Sender(s)) => {
                if let Some(rx) = reply_rx.take() {
                    tokio::spawn(replies(s, rx));
                }
            }
            Err(_) => return,
        }
    }
}

async fn put_tokens(
    peer: Arc<Peer>,
    mut requests: Receiver,
    replies: mpsc::UnboundedSender<Message<Body<Value>>>,
) {
    while let Ok(delivery) = requests.recv::<Body<Value>>().await {
        let _ = requests.accept(&delivery).await;
        let request = delivery.into_message();
        let audience = request
            .application_properties
            .as_ref()
            .and_then(|p| match p.0.get("name") {
                Some(SimpleValue::String(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let answer = peer.with(|s| {
            s.puts.push((Instant::now(), audience.clone()));
            s.answers
                .get(&audience)
                .copied()
                .unwrap_or(Answer::Status(202))
        });
        let Answer::Status(code) = answer else {
            continue;
        };
        let mut properties = OrderedMap::new();
        properties.insert("status-code".to_owned(), SimpleValue::Int(code));
        properties.insert(
            "status-description".to_owned(),
            SimpleValue::String(format!("status {code}")),
        );
        let reply = Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                correlation_id: request
                    .properties
                    .as_ref()
                    .and_then(|p| p.message_id.clone()),
                ..Default::default()
            }),
            application_properties: Some(ApplicationProperties(properties)),
            body: Body::Value(AmqpValue(Value::Null)),
            footer: None,
        };
        let _ = replies.send(reply);
    }
}

async fn replies(mut sender: Sender, mut rx: mpsc::UnboundedReceiver<Message<Body<Value>>>) {
    while let Some(reply) = rx.recv().await {
        match sender.send_batchable(reply).await {
            Ok(settled) => drop(settled),
            Err(_) => return,
        }
    }
}

async fn hub_link(peer: Arc<Peer>, mut link: Receiver) {
    loop {
        let Ok(delivery) = link.recv::<Body<Value>>().await else {
            return;
        };
        let (refuse, detach) = peer.with(|s| {
            s.transfers += 1;
            (s.refuse.take(), s.detach.take())
        });
        let error = |condition: &str| {
            definitions::Error::new(
                ErrorCondition::Custom(Symbol::from(condition)),
                Some(format!("{condition} (injected)")),
                None,
            )
        };
        if let Some(condition) = refuse {
            let _ = link.reject(&delivery, error(condition)).await;
            continue;
        }
        if let Some(condition) = detach {
            let _ = link.detach_with_error(error(condition)).await;
            return;
        }
        if peer.read(|s| s.hold) {
            peer.with(|s| s.held.push(delivery));
            continue;
        }
        let _ = link.accept(&delivery).await;
        peer.with(|s| s.stored += 1);
    }
}

/// Counts a hub link whose client side is gone.
async fn hub_link_counted(peer: Arc<Peer>, link: Receiver) {
    hub_link(peer.clone(), link).await;
    peer.with(|s| s.hub_links_ended += 1);
}

/// Tokens of a fixed lifetime from now (wall clock, as a real provider's).
#[derive(Debug)]
struct Lifetime(Duration);

impl TokenProvider for Lifetime {
    fn token<'a>(
        &'a self,
        audience: &'a str,
    ) -> Pin<Box<dyn Future<Output = crate::Result<AccessToken>> + Send + 'a>> {
        Box::pin(async move {
            Ok(AccessToken::new(
                format!("token-for-{audience}"),
                TokenType::SharedAccessSignature,
                SystemTime::now() + self.0,
            ))
        })
    }
}

fn audience(hub: &str) -> String {
    eventhubs::audience(HOST, hub)
}

fn config(peer: &Arc<Peer>, lifetime: Duration) -> ConnectConfig {
    ConnectConfig {
        host: HOST.to_owned(),
        dial_host: None,
        port: 5671,
        hub: "telemetry".to_owned(),
        tls: None,
        provider: Arc::new(Lifetime(lifetime)),
        connect_timeout: Duration::from_secs(30),
        operation_timeout: OPERATION_TIMEOUT,
        max_frame_size: 65536,
        retry: RetryOptions::new()
            .max_retries(5)
            .base_delay(Duration::from_millis(100)),
        max_message_size: 1 << 20,
        single_window: 8,
        route: peer.route(),
        framing: Framing::Raw,
        idempotent: None,
    }
}

/// An engine on `peer` with the hub's audience put (1 h tokens).
async fn connect(peer: &Arc<Peer>) -> Arc<Engine> {
    Engine::connect(config(peer, HOUR), Some(audience("telemetry")))
        .await
        .expect("connects")
}

#[tokio::test(start_paused = true)]
async fn each_audience_is_re_put_before_its_own_expiry_for_ten_hours() {
    let peer = Peer::new();
    let engine = connect(&peer).await;
    let telemetry = engine.link(None).await.expect("telemetry link");
    let alarms = engine
        .link_to(
            eventhubs::sender(HOST, "alarms", None),
            Some(Arc::new(Lifetime(3 * HOUR))),
        )
        .await
        .expect("alarms link");
    // Both links stream one event every ten minutes (virtual) for ten hours.
    let sent = stream_both([&telemetry, &alarms], 10 * HOUR, Duration::from_secs(600)).await;
    let end = Instant::now();
    // 1 h tokens are re-put every 48 min, 3 h tokens every 144 min.
    for (hub, lifetime, at_least) in [("telemetry", HOUR, 12), ("alarms", 3 * HOUR, 4)] {
        let puts = peer.puts(&audience(hub));
        assert!(puts.len() >= at_least, "{hub}: {} puts", puts.len());
        for pair in puts.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap < lifetime,
                "{hub}: re-put after {gap:?}, past its expiry"
            );
            assert!(gap >= lifetime / 2, "{hub}: re-put after only {gap:?}");
        }
        let last = *puts.last().expect("put");
        assert!(end - last < lifetime, "{hub}: expired at the end");
    }
    assert_eq!(peer.read(|s| (s.connections, s.stored)), (1, 2 * sent));
    assert_eq!(
        engine.recoveries.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn put_token_200_and_202_are_accepted_and_other_statuses_refused_by_kind() {
    let cases = [
        (200, None),
        (202, None),
        (401, Some(ErrorKind::Unauthorized)),
        (403, Some(ErrorKind::Unauthorized)),
        (404, Some(ErrorKind::NotFound)),
        (500, Some(ErrorKind::Connection)),
    ];
    for (status, refused) in cases {
        let peer = Peer::new();
        peer.with(|s| {
            s.answers
                .insert(audience("telemetry"), Answer::Status(status))
        });
        let result = Engine::connect(config(&peer, HOUR), Some(audience("telemetry"))).await;
        match (refused, result) {
            (None, Ok(engine)) => {
                let link = engine.link(None).await.expect("link");
                send_on(&link, 0)
                    .await
                    .await
                    .expect("answered")
                    .unwrap_or_else(|e| panic!("{status}: {e}"));
                assert_eq!(peer.read(|s| s.stored), 1, "{status}");
            }
            (Some(kind), Err(error)) => {
                assert_eq!(error.kind(), kind, "{status}: {error}");
                assert!(error.message().contains(&format!("({status})")), "{error}");
            }
            (None, Err(error)) => panic!("{status} refused: {error}"),
            (Some(kind), Ok(_)) => panic!("{status} accepted, expected {kind:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_put_token_never_answered_times_out_at_the_operation_timeout() {
    // At connect: the hub's own audience.
    let peer = Peer::new();
    peer.with(|s| s.answers.insert(audience("telemetry"), Answer::Silent));
    let started = Instant::now();
    let Err(error) = Engine::connect(config(&peer, HOUR), Some(audience("telemetry"))).await else {
        panic!("connected without an answer to put-token");
    };
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.message().contains("put-token"), "{error}");
    assert_eq!(started.elapsed(), OPERATION_TIMEOUT);

    // A second audience that is never answered fails its own link; the first keeps sending.
    let peer = Peer::new();
    peer.with(|s| s.answers.insert(audience("alarms"), Answer::Silent));
    let engine = connect(&peer).await;
    let telemetry = engine.link(None).await.expect("link");
    let started = Instant::now();
    let error = engine
        .link_to(
            eventhubs::sender(HOST, "alarms", None),
            Some(Arc::new(Lifetime(HOUR))),
        )
        .await
        .expect_err("alarms was never authorised");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert_eq!(started.elapsed(), OPERATION_TIMEOUT);
    send_on(&telemetry, 1)
        .await
        .await
        .expect("answered")
        .expect("telemetry still sends");
}

/// Sends one event with the hub link's next transfer refused (`refuse`) or detached
/// (`detach`) with `symbol`, and checks the outcome against the policy table's row.
async fn one_fault_per_row(inject: fn(&mut State, &'static str)) {
    let mut rows = 0;
    for (symbol, kind, action) in policy_table() {
        rows += 1;
        let peer = Peer::new();
        let engine = connect(&peer).await;
        let link = engine.link(None).await.expect("link");
        peer.with(|s| inject(s, symbol));
        // Bounded in virtual time, well inside the 60 s try timeout: the fault itself must
        // decide the outcome.
        let result = tokio::time::timeout(Duration::from_secs(30), send_on(&link, 0).await)
            .await
            .unwrap_or_else(|_| panic!("{symbol}: no outcome in 30 s"))
            .expect("answered");
        let (attaches, transfers, stored, puts) =
            peer.read(|s| (s.hub_attaches, s.transfers, s.stored, s.puts.len()));
        match action {
            Action::Fail => {
                let error = result.expect_err(symbol);
                assert_eq!(error.kind(), kind, "{symbol}: {error}");
                assert_eq!(
                    error.condition().map(|c| c.as_symbol().to_owned()),
                    Some(symbol.to_owned()),
                    "{symbol}"
                );
                assert_eq!((transfers, stored), (1, 0), "{symbol}: sent again");
            }
            Action::Retry => {
                result.unwrap_or_else(|e| panic!("{symbol} was not retried: {e}"));
                assert_eq!((transfers, stored), (2, 1), "{symbol}");
            }
            Action::Reattach | Action::RefreshAndReattach => {
                result.unwrap_or_else(|e| panic!("{symbol} did not recover: {e}"));
                assert_eq!(stored, 1, "{symbol}");
                assert!(attaches >= 2, "{symbol}: the link was not re-attached");
                if action == Action::RefreshAndReattach {
                    assert!(puts >= 2, "{symbol}: no fresh token before re-attaching");
                }
            }
        }
    }
    assert!(rows >= 30, "{rows} rows");
}

#[tokio::test(start_paused = true)]
async fn a_delivery_refused_with_each_condition_is_retried_recovered_or_failed_as_the_table_says() {
    one_fault_per_row(|s, symbol| s.refuse = Some(symbol)).await;
}

/// The same table for a link the hub detaches while a delivery is in flight: the link task
/// notices the detach at once (not at the try timeout) and follows the condition's row.
#[tokio::test(start_paused = true)]
async fn a_link_detached_with_each_condition_recovers_or_fails_as_the_table_says() {
    one_fault_per_row(|s, symbol| s.detach = Some(symbol)).await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_engine_ends_its_link_tasks() {
    let peer = Peer::new();
    let engine = connect(&peer).await;
    let link = engine.link(None).await.expect("link");
    send_on(&link, 0)
        .await
        .await
        .expect("answered")
        .expect("stored");
    let task = link.task.lock().unwrap().take().expect("the link task");
    drop((link, engine));
    // A task that spins instead of ending keeps paused time from advancing, so this counts
    // turns of the scheduler, not time.
    for _ in 0..10_000 {
        if task.is_finished() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the link task outlived its engine");
}

#[tokio::test(start_paused = true)]
async fn close_with_unsettled_deliveries_resolves_every_outcome_and_never_reconnects() {
    let peer = Peer::new();
    peer.with(|s| s.hold = true);
    let engine = connect(&peer).await;
    let link = engine.link(None).await.expect("link");
    let mut outcomes = Vec::new();
    for n in 0..10 {
        outcomes.push(send_on(&link, n).await);
    }
    peer.wait(|s| !s.held.is_empty()).await;
    drop(link);
    let started = Instant::now();
    engine
        .close(Some(Duration::from_secs(2)), || 10)
        .await
        .expect("closes");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for (n, outcome) in outcomes.into_iter().enumerate() {
        let result = tokio::time::timeout(Duration::ZERO, outcome)
            .await
            .unwrap_or_else(|_| panic!("outcome {n} unresolved after close"))
            .unwrap_or_else(|_| panic!("outcome {n} dropped without a result"));
        let error = result.expect_err("nothing was settled");
        assert_eq!(error.kind(), ErrorKind::Closed, "{n}: {error}");
    }
    // An hour later nothing has reconnected or re-attached.
    tokio::time::sleep(HOUR).await;
    assert_eq!(peer.read(|s| (s.connections, s.hub_attaches)), (1, 1));
    assert!(engine.link(None).await.is_err(), "a closed engine attaches");
}
