//! `AzureIdentityCredential` (feature `azure-identity`): an `azure_core` `TokenCredential`, as
//! every credential of the `azure_identity` crate is, drives a real connection to the test hub,
//! which verifies the JWTs it is given (issuer, audience, signature, expiry, roles).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use hubsend::{AzureIdentityCredential, ErrorKind, Event, Producer, SendOptions};
use hubsend_testhub::{HubConfig, TestHub, EVENT_HUBS_AUDIENCE};

const HUB: &str = "telemetry";
const ISSUER: &str = "https://sts.test/azure-identity/";
const SIGNING_KEY: &[u8] = b"the identity platform and the hub share this";

/// A credential as `azure_identity`'s are: asked for scopes, answers with a bearer token and
/// its expiry. This one mints HS256 JWTs the test hub trusts, valid for `lifetime`.
#[derive(Debug)]
struct TestIdentity {
    roles: Vec<&'static str>,
    lifetime: Duration,
    refuse: bool,
    calls: AtomicUsize,
    scopes: Mutex<Vec<String>>,
}

impl TestIdentity {
    fn new(roles: &[&'static str], lifetime: Duration) -> TestIdentity {
        TestIdentity {
            roles: roles.to_vec(),
            lifetime,
            refuse: false,
            calls: AtomicUsize::new(0),
            scopes: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait::async_trait]
impl TokenCredential for TestIdentity {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.scopes
            .lock()
            .unwrap()
            .extend(scopes.iter().map(|s| s.to_string()));
        if self.refuse {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "ManagedIdentityCredential: no identity assigned to this resource",
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let exp = now + self.lifetime.as_secs();
        let claims = serde_json::json!({
            "iss": ISSUER,
            "aud": EVENT_HUBS_AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "roles": self.roles,
        });
        let jwt = hubsend_testhub::sign_jwt_hs256(SIGNING_KEY, &claims);
        let expires_on = azure_core::time::OffsetDateTime::from_unix_timestamp(exp as i64)
            .expect("a valid time");
        Ok(AccessToken::new(jwt, expires_on))
    }
}

async fn jwt_hub() -> TestHub {
    TestHub::start(HubConfig::new().trust_jwt_issuer(ISSUER, EVENT_HUBS_AUDIENCE, SIGNING_KEY))
        .await
        .expect("test hub starts")
}

fn builder(hub: &TestHub, identity: Arc<TestIdentity>) -> hubsend::ProducerBuilder {
    Producer::builder()
        .namespace("127.0.0.1")
        .port(hub.addr().port())
        .event_hub(HUB)
        .danger_plaintext(true)
        .credential(Arc::new(AzureIdentityCredential::new(identity)))
}

#[tokio::test]
async fn a_token_credential_sends_through_token_refreshes() {
    let hub = jwt_hub().await;
    let identity = Arc::new(TestIdentity::new(
        &["Azure Event Hubs Data Sender"],
        Duration::from_secs(3),
    ));
    let producer = builder(&hub, identity.clone())
        .connect()
        .await
        .expect("the credential's token is accepted");
    let started = std::time::Instant::now();
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(7) {
        producer
            .send_and_wait(Event::new(format!("identity {sent}")), SendOptions::new())
            .await
            .unwrap_or_else(|e| panic!("send {sent} failed: {e:?}"));
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = hub
        .wait_for_events(HUB, sent, Duration::from_secs(10))
        .await;
    assert_eq!(stored.len(), sent);
    // 3-second tokens over 7 seconds: asked again before each expired, each one accepted.
    let calls = identity.calls.load(Ordering::SeqCst);
    assert!(calls >= 3, "only {calls} token requests in 7 s");
    let stats = hub.stats();
    assert!(stats.jwt_put_tokens_accepted >= 3, "{stats:?}");
    assert_eq!(stats.put_tokens_rejected, 0);
    assert!(identity
        .scopes
        .lock()
        .unwrap()
        .iter()
        .all(|s| s == "https://eventhubs.azure.net/.default"));
    producer.close().await.unwrap();
}

#[tokio::test]
async fn a_refusing_credential_or_a_missing_role_is_unauthorized() {
    let hub = jwt_hub().await;
    let mut refusing =
        TestIdentity::new(&["Azure Event Hubs Data Sender"], Duration::from_secs(60));
    refusing.refuse = true;
    let err = builder(&hub, Arc::new(refusing))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(err.to_string().contains("no identity assigned"), "{err}");

    // A valid token without a sending role: the hub refuses it.
    let listener = Arc::new(TestIdentity::new(
        &["Azure Event Hubs Data Receiver"],
        Duration::from_secs(60),
    ));
    let err = builder(&hub, listener).connect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(hub.events(HUB).is_empty());
}
