//! Engine tests that need its insides: several audiences on one connection against the test
//! hub here; edge cases against a small fe2o3 acceptor in paused time in [`duplex`].

mod duplex;

use std::sync::Arc;
use std::time::Duration;

use hubsend_testhub::{HubConfig, TestHub};
use tokio::sync::{oneshot, Semaphore};

use super::{Engine, LinkHandle, Queued, Waiters};
use crate::batch::Sections;
use crate::connection_string::ConnectionString;
use crate::entity::eventhubs;
use crate::error::ErrorKind;
use crate::{Event, Producer, ProducerOptions};

/// Queues one event on `link` and returns where its outcome arrives.
async fn send_on(link: &LinkHandle, n: usize) -> oneshot::Receiver<crate::Result<()>> {
    let permits = Arc::new(Semaphore::new(1 << 20));
    let event = Event::new(format!("{n}"));
    let sections = Sections::single(&event, None, link.max_message_size()).expect("fits");
    let (reply, rx) = oneshot::channel();
    let waiters = Waiters::one(
        reply,
        (
            permits.clone().acquire_owned().await.expect("permit"),
            permits.acquire_owned().await.expect("permit"),
        ),
    );
    link.queue
        .push(Queued {
            sections,
            mergeable: true,
            waiters,
        })
        .map_err(|_| "link closed")
        .expect("queued");
    rx
}

/// Sends one event on each link every `pause` (awaiting each outcome, which must be
/// stored) for `lasting`; returns how many each link sent.
async fn stream_both(links: [&LinkHandle; 2], lasting: Duration, pause: Duration) -> usize {
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < lasting {
        let a = send_on(links[0], n).await;
        let b = send_on(links[1], n).await;
        a.await.expect("answered").expect("first link stored");
        b.await.expect("answered").expect("second link stored");
        n += 1;
        tokio::time::sleep(pause).await;
    }
    n
}

fn engine(producer: &Producer) -> Arc<Engine> {
    producer.engine().clone()
}

#[tokio::test]
async fn each_audience_is_refreshed_before_its_own_expiry_and_a_refused_one_fails_alone() {
    let hub = TestHub::start(
        HubConfig::new()
            .hub("telemetry", 2)
            .hub("alarms", 2)
            .hub("secret", 1),
    )
    .await
    .expect("hub");
    // The connection's own audience (telemetry): 2 s tokens, refreshed about every second.
    let producer = Producer::builder()
        .connection_string(hub.connection_string())
        .options(ProducerOptions::new().token_lifetime(Duration::from_secs(2)))
        .connect()
        .await
        .expect("connects");
    let engine = engine(&producer);
    let host = hub.addr().ip().to_string();
    let host = ConnectionString::parse(&hub.connection_string())
        .map(|cs| cs.host().to_owned())
        .unwrap_or(host);
    // A second audience on the same connection with its own provider: 3 s tokens.
    let alarms_provider =
        ConnectionString::parse(&hub.connection_string_for("send-only", "alarms"))
            .expect("parses")
            .credential()
            .into_provider(Duration::from_secs(3));
    let alarms = engine
        .link_to(
            eventhubs::sender(&host, "alarms", None),
            Some(alarms_provider),
        )
        .await
        .expect("alarms link");
    let telemetry = engine.link(None).await.expect("telemetry link");
    let before = hub.stats().put_tokens_accepted;

    // Stream on both links for 7 s: several lifetimes of each token.
    let n = stream_both(
        [&telemetry, &alarms],
        Duration::from_secs(7),
        Duration::from_millis(20),
    )
    .await;
    let puts = hub.stats().put_tokens_accepted - before;
    // telemetry: ~7 refreshes (every ~1 s); alarms: ~4 (every ~1.5 s).
    assert!(puts >= 9, "only {puts} tokens put in 7 s");
    // No link was ever detached for an expired token: each was re-put in time.
    assert_eq!(
        engine.recoveries.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a link was lost to an expired token"
    );
    assert_eq!(hub.events("telemetry").len(), n);
    assert_eq!(hub.events("alarms").len(), n);

    // An audience the hub refuses (a wrong key) fails its own link only.
    let wrong = ConnectionString::parse(
        &hub.connection_string_for("send-only", "secret")
            .replace("SharedAccessKey=", "SharedAccessKey=wrong"),
    )
    .expect("parses")
    .credential()
    .into_provider(Duration::from_secs(60));
    let Err(err) = engine
        .link_to(eventhubs::sender(&host, "secret", None), Some(wrong))
        .await
    else {
        panic!("a wrong key was accepted");
    };
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    send_on(&telemetry, n)
        .await
        .await
        .expect("answered")
        .expect("telemetry still sends");
    send_on(&alarms, n)
        .await
        .await
        .expect("answered")
        .expect("alarms still sends");
    producer.close().await.expect("closes");
}

#[tokio::test]
async fn a_route_keeps_its_link_until_the_link_task_stops_then_gets_a_new_one() {
    let hub = TestHub::start(HubConfig::new().hub("telemetry", 2))
        .await
        .expect("hub");
    let producer = Producer::builder()
        .connection_string(hub.connection_string())
        .connect()
        .await
        .expect("connects");
    let engine = engine(&producer);
    let first = engine.link(None).await.expect("hub link");
    let again = engine.link(None).await.expect("hub link");
    assert!(Arc::ptr_eq(&first, &again), "a second send reuses the link");
    let partition = engine.link(Some("1")).await.expect("partition link");
    assert!(
        !Arc::ptr_eq(&first, &partition),
        "a partition has its own link"
    );
    assert!(Arc::ptr_eq(
        &partition,
        &engine.link(Some("1")).await.expect("partition link")
    ));

    // The hub link's task stops: its queue closes, and the next send must not get it.
    let task = first.task.lock().ok().and_then(|mut t| t.take());
    task.expect("the link task").abort();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !first.queue.is_closed() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the queue closes with its task");
    let fresh = engine.link(None).await.expect("a new hub link");
    assert!(!Arc::ptr_eq(&first, &fresh), "a stopped link is replaced");
    let stored = send_on(&fresh, 7).await;
    stored
        .await
        .expect("answered")
        .expect("the new link stores the event");
    assert!(Arc::ptr_eq(
        &fresh,
        &engine.link(None).await.expect("hub link")
    ));
    producer.close().await.expect("closes");
}
