//! The hostile behaviours of the fault API, each shown on the wire with a raw fe2o3 client
//! (and, where the frames matter, a tap between client and hub).

mod support;

use std::time::Duration;

use fe2o3_amqp::{types::messaging::Outcome, Sender, Session};
use fe2o3_amqp_types::{messaging::DeliveryState, performatives::Attach, primitives::Symbol};
use hubsend_testhub::TestHub;
use support::{connect_send, event, hub, producer, Frame, Tap};

/// The re-attach class of conditions a client must not take for success.
const CONDITIONS: [&str; 6] = [
    "amqp:link:stolen",
    "com.microsoft:partition-not-owned",
    "amqp:illegal-state",
    "amqp:link:detach-forced",
    "amqp:connection:forced",
    "amqp:unauthorized-access",
];

fn is_rejected(f: &Frame) -> bool {
    f.disposition()
        .is_some_and(|d| matches!(d.state, Some(DeliveryState::Rejected(_))))
}

fn is_accepted(f: &Frame) -> bool {
    f.disposition()
        .is_some_and(|d| matches!(d.state, Some(DeliveryState::Accepted(_))))
}

#[tokio::test]
async fn coalesced_rejection_shares_a_read_with_the_next_acceptance() {
    for condition in CONDITIONS {
        let hub = hub().await;
        hub.faults().reject_every_nth_coalesced(3, condition);
        let tap = Tap::start(hub.addr(), |_| false).await;
        let (_conn, mut session) = connect_send(tap.addr).await;
        let mut sender = producer(&mut session).await;
        let mut pending = Vec::new();
        // The last rejection (index 11) has a delivery after it to pair with.
        for i in 0..13 {
            let fut = sender.send_batchable(event(&i.to_string(), None)).await;
            pending.push(fut.unwrap());
        }
        let mut outcomes = Vec::new();
        for fut in pending {
            outcomes.push(fut.await.unwrap());
        }
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Outcome::Rejected(r) if i % 3 == 2 => {
                    let e = r.error.as_ref().unwrap();
                    // Compared as encoded: fe2o3 decodes known symbols into enum variants.
                    assert_eq!(
                        serde_amqp::to_vec(&e.condition).unwrap(),
                        serde_amqp::to_vec(&Symbol::from(condition)).unwrap(),
                        "delivery {i}: {e:?}"
                    );
                }
                Outcome::Accepted(_) if i % 3 != 2 => {}
                other => panic!("{condition}: delivery {i}: {other:?}"),
            }
        }
        assert_eq!(hub.events("telemetry").len(), 9, "{condition}");
        let reads = tap.reads();
        let rejections = reads.iter().flatten().filter(|f| is_rejected(f)).count();
        assert_eq!(rejections, 4, "{condition}");
        for read in &reads {
            for (i, f) in read.iter().enumerate() {
                if is_rejected(f) {
                    assert!(
                        read[i + 1..].iter().any(is_accepted),
                        "{condition}: a rejection arrived without the next acceptance: {read:?}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn plain_rejections_are_not_held() {
    // The contrast: without coalescing the same rejections go out on their own.
    let hub = hub().await;
    hub.faults().reject_every_nth(2, "amqp:link:stolen");
    let tap = Tap::start(hub.addr(), |_| false).await;
    let (_conn, mut session) = connect_send(tap.addr).await;
    let mut sender = producer(&mut session).await;
    for i in 0..4 {
        sender.send(event(&i.to_string(), None)).await.unwrap();
    }
    let reads = tap.reads();
    let alone = reads
        .iter()
        .filter(|r| r.iter().any(is_rejected) && !r.iter().any(is_accepted))
        .count();
    assert_eq!(alone, 2, "{reads:?}");
}

#[tokio::test]
async fn never_grant_credit_blocks_every_send() {
    let hub = hub().await;
    hub.faults().never_grant_credit();
    let (_conn, mut session) = connect_send(hub.addr()).await;
    let mut sender = producer(&mut session).await;
    let r = tokio::time::timeout(Duration::from_millis(500), sender.send(event("x", None))).await;
    assert!(r.is_err(), "a send completed without credit: {r:?}");
    assert_eq!(hub.stats().producer_links_attached, 1);
    assert_eq!(hub.stats().transfers_received, 0);
    // Lifted only by clear().
    hub.faults().clear();
    let outcome = sender.send(event("y", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
}

#[tokio::test]
async fn heartbeat_flood_while_never_settling() {
    let hub = hub().await;
    hub.faults().never_settle();
    hub.faults().flood_heartbeats(Duration::from_millis(1));
    let tap = Tap::start(hub.addr(), |_| false).await;
    let (_conn, mut session) = connect_send(tap.addr).await;
    let mut sender = producer(&mut session).await;
    let before = tap.frames().len();
    let fut = sender.send_batchable(event("x", None)).await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(600), fut).await;
    assert!(r.is_err(), "the delivery was settled: {r:?}");
    let heartbeats = tap.frames().iter().filter(|f| f.is_heartbeat()).count();
    assert!(heartbeats >= 50, "only {heartbeats} empty frames in 600 ms");
    let stats = hub.stats();
    assert_eq!(stats.transfers_received, 1);
    assert_eq!(stats.deliveries_accepted + stats.deliveries_rejected, 0);
    assert!(hub.events("telemetry").is_empty());
    let after_send = &tap.frames()[before..];
    assert!(!after_send.iter().any(|f| f.disposition().is_some()));
}

#[tokio::test]
async fn each_connection_closes_after_its_first_transfer() {
    let hub = hub().await;
    hub.faults()
        .close_each_connection_after_first_transfer("amqp:connection:forced");
    for round in 0..3 {
        let (mut conn, mut session) = connect_send(hub.addr()).await;
        let mut sender = producer(&mut session).await;
        let fut = sender.send_batchable(event("x", None)).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.on_close())
            .await
            .unwrap();
        let text = format!("{closed:?}");
        assert!(text.contains("ConnectionForced"), "round {round}: {text}");
        // fe2o3 leaves the delivery pending; it must not be settled.
        assert_not_settled(fut, Duration::from_millis(100)).await;
    }
    assert_eq!(storm_counts(&hub), (3, 3, 3, 0));
}

#[tokio::test]
async fn connections_close_once_when_the_nth_delivery_is_stored_before_acknowledging_it() {
    let hub = hub().await;
    hub.faults()
        .close_connections_after(2, "amqp:connection:forced");
    let (mut conn, mut session) = connect_send(hub.addr()).await;
    let mut sender = producer(&mut session).await;
    let outcome = sender.send(event("e0", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    // The second is stored, and the connection closes before it is acknowledged.
    let fut = sender.send_batchable(event("e1", None)).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.on_close())
        .await
        .unwrap();
    assert!(
        format!("{closed:?}").contains("ConnectionForced"),
        "{closed:?}"
    );
    assert_not_settled(fut, Duration::from_millis(100)).await;
    assert_eq!(
        hub.events("telemetry").len(),
        2,
        "the unacknowledged one is stored"
    );
    // Once: a new connection keeps sending.
    let (_conn, mut session) = connect_send(hub.addr()).await;
    let mut sender = producer(&mut session).await;
    for i in 2..5 {
        let outcome = sender.send(event(&format!("e{i}"), None)).await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    // Five stored, four acknowledged.
    assert_eq!(storm_counts(&hub), (2, 2, 5, 4));
    assert_eq!(hub.events("telemetry").len(), 5);
}

/// (connections, producer links, transfers, accepted deliveries) the hub counted.
fn storm_counts(hub: &TestHub) -> (u64, u64, u64, u64) {
    let s = hub.stats();
    let c = s.connections_accepted;
    (
        c,
        s.producer_links_attached,
        s.transfers_received,
        s.deliveries_accepted,
    )
}

/// The delivery future does not resolve as settled within `within`.
async fn assert_not_settled<T: std::fmt::Debug, E: std::fmt::Debug>(
    fut: impl std::future::Future<Output = Result<T, E>>,
    within: Duration,
) {
    let r = tokio::time::timeout(within, fut).await;
    assert!(!matches!(r, Ok(Ok(_))), "settled: {r:?}");
}

#[tokio::test]
async fn each_link_detaches_after_its_first_transfer() {
    let hub = hub().await;
    hub.faults()
        .detach_each_link_after_first_transfer("amqp:link:detach-forced");
    let (mut conn, _session) = connect_send(hub.addr()).await;
    for round in 0..3 {
        // A fresh session each time: fe2o3 may reuse a handle before the detach settles.
        // (The token is the connection's.)
        let mut session = Session::begin(&mut conn).await.unwrap();
        let mut sender = Sender::attach(&mut session, format!("producer-{round}"), "telemetry")
            .await
            .unwrap();
        let fut = sender.send_batchable(event("x", None)).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), sender.on_detach())
            .await
            .unwrap();
        assert!(format!("{err:?}").contains("DetachForced"), "{err:?}");
        assert_not_settled(fut, Duration::from_secs(5)).await;
    }
    assert_eq!(storm_counts(&hub), (1, 3, 3, 0));
}

#[tokio::test]
async fn huge_max_message_size_is_announced() {
    let hub = TestHub::start(support::config().max_message_size(u64::MAX))
        .await
        .unwrap();
    let (_conn, mut session) = connect_send(hub.addr()).await;
    let mut sender = producer(&mut session).await;
    assert_eq!(sender.max_message_size(), Some(u64::MAX));
    let outcome = sender.send(event("x", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");

    // Announced whatever the client asks for (fe2o3 then keeps the smaller of the two, so
    // the ATTACH reply is read off the wire).
    let hub = TestHub::start(support::config().advertise_max_message_size(u64::MAX))
        .await
        .unwrap();
    let tap = Tap::start(hub.addr(), |_| false).await;
    let (_conn, mut session) = connect_send(tap.addr).await;
    Sender::builder()
        .name("producer")
        .target("telemetry")
        .max_message_size(1000u64)
        .attach(&mut session)
        .await
        .unwrap();
    let announced: Vec<Option<u64>> = tap
        .frames()
        .iter()
        .filter(|f| f.frame_type == 0 && f.code == Some(0x12))
        .filter_map(|f| serde_amqp::from_slice::<Attach>(&f.body).ok())
        .filter(|a| a.name == "producer")
        .map(|a| a.max_message_size)
        .collect();
    assert_eq!(announced, [Some(u64::MAX)]);
}

fn covers_every_id(f: &Frame) -> bool {
    f.disposition().is_some_and(|d| d.last == Some(u32::MAX))
}

#[tokio::test]
async fn one_disposition_covers_every_delivery_id_once() {
    let hub = hub().await;
    hub.faults().dispose_all_deliveries_once();
    // The tap keeps the range from the client (fe2o3 would spend ~35 s of CPU on it).
    let tap = Tap::start(hub.addr(), covers_every_id).await;
    let (_conn, mut session) = connect_send(tap.addr).await;
    let mut sender = producer(&mut session).await;
    for body in ["a", "b", "c"] {
        let outcome = sender.send(event(body, None)).await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    let frames = tap.frames();
    let ranges: Vec<&Frame> = frames.iter().filter(|f| covers_every_id(f)).collect();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let d = ranges[0].disposition().unwrap();
    assert_eq!(d.first, 0);
    assert!(d.settled);
    assert!(matches!(d.state, Some(DeliveryState::Accepted(_))));
    assert_eq!(d.role, fe2o3_amqp_types::definitions::Role::Receiver);
    // On the session the producer link is on: the hub's own acceptances use that channel.
    let own = frames.iter().rev().find(|f| is_accepted(f)).unwrap();
    assert_eq!(ranges[0].channel, own.channel);
    assert_eq!(hub.events("telemetry").len(), 3);
}
