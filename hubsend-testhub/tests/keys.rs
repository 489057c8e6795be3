//! Keyed events on partition links, driven by a raw fe2o3 client: each stored event keeps its
//! own `x-opt-partition-key` (many keys in one batch), the link's partition is kept whatever
//! the key hashes to (as the service), and `verify_partition_keys` refuses a misplaced key.

mod support;

use std::time::Duration;

use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::{types::messaging::Outcome, Sender};
use fe2o3_amqp_types::messaging::{message::__private::Serializable, Data, Message};
use fe2o3_amqp_types::primitives::Binary;
use hubsend_testhub::TestHub;
use support::{connect_send, event};

/// One batch message of events `(body, key)`, format 0x80013700, no envelope annotations.
fn batch(events: &[(&str, &str)]) -> Sendable<fe2o3_amqp_types::messaging::Batch<Data>> {
    let inner: Vec<Data> = events
        .iter()
        .map(|(body, key)| {
            let encoded = serde_amqp::to_vec(&Serializable(event(body, Some(key)))).unwrap();
            Data(Binary::from(encoded))
        })
        .collect();
    Sendable::builder()
        .message(Message::builder().data_batch(inner).build())
        .message_format(0x8001_3700)
        .build()
}

/// Keys whose partition (by the hub's hash, 4 partitions) is `p` and ones whose is not.
fn keys_for(hub: &TestHub, p: u32) -> (Vec<String>, Vec<String>) {
    let keys: Vec<String> = (0..64).map(|i| format!("sensor-{i}")).collect();
    keys.into_iter()
        .partition(|k| hub.partition_for_key("telemetry", k) == p)
}

#[tokio::test]
async fn each_event_keeps_its_key_and_a_misplaced_key_is_stored_unless_verified() {
    for verify in [false, true] {
        let hub = TestHub::start(support::config().verify_partition_keys(verify))
            .await
            .unwrap();
        let (home, away) = keys_for(&hub, 1);
        assert!(home.len() >= 3 && !away.is_empty());
        let (_conn, mut session) = connect_send(hub.addr()).await;
        let mut sender = Sender::attach(&mut session, "producer", "telemetry/Partitions/1")
            .await
            .unwrap();
        // Three keys that hash to partition 1, in one batch.
        let good: Vec<(&str, &str)> = home[..3].iter().map(|k| (k.as_str(), k.as_str())).collect();
        let outcome = sender.send(batch(&good)).await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        // The same with one key that hashes elsewhere.
        let mut mixed = good.clone();
        mixed.push((away[0].as_str(), away[0].as_str()));
        let outcome = sender.send(batch(&mixed)).await.unwrap();
        let stored = if verify {
            match &outcome {
                Outcome::Rejected(r) => {
                    let text = format!("{r:?}");
                    assert!(text.contains("PreconditionFailed"), "{text}");
                    assert!(text.contains(&away[0]), "{text}");
                }
                other => panic!("a misplaced key was not refused: {other:?}"),
            }
            3
        } else {
            assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
            7
        };
        let events = hub
            .wait_for_events("telemetry", stored, Duration::from_secs(5))
            .await;
        assert_eq!(events.len(), stored);
        for e in &events {
            assert_eq!(e.partition, 1, "the link's partition is kept");
            let body = String::from_utf8(e.body.clone()).unwrap();
            assert_eq!(
                e.partition_key.as_deref(),
                Some(body.as_str()),
                "own key kept"
            );
        }
    }
}
