//! Authentication beyond SAS keys against the local test hub: pre-made SAS tokens (with and
//! without expiry mid-stream) and, with the `entra` feature, Entra ID client secrets fetched
//! from a local OAuth 2.0 token endpoint that issues JWTs the hub trusts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hubsend::{ErrorKind, Event, Producer, SendOptions};
use hubsend_testhub::{HubConfig, Right, TestHub};

use support::{start, HUB};

mod support;

const KEY: &str = "c2VuZC1vbmx5LWtleS1mb3ItdGhlLWF1dGgtdGVzdHM=";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

async fn sas_hub() -> TestHub {
    start(HubConfig::new().policy("send-only", KEY, &[Right::Send])).await
}

/// A connection string carrying a pre-made signature valid for `lifetime_secs`.
fn signature_connection_string(hub: &TestHub, lifetime_secs: u64) -> String {
    let port = hub.addr().port();
    let resource = format!("sb://127.0.0.1:{port}/{HUB}");
    let signature =
        hubsend_testhub::sign_sas_token(&resource, "send-only", KEY, unix_now() + lifetime_secs);
    format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessSignature={signature};EntityPath={HUB};UseDevelopmentEmulator=true"
    )
}

#[tokio::test]
async fn pre_made_sas_token_in_the_connection_string() {
    let hub = sas_hub().await;
    let producer = Producer::from_connection_string(&signature_connection_string(&hub, 3600))
        .await
        .expect("the signature is accepted");
    for i in 0..20 {
        producer
            .send_and_wait(Event::new(format!("sig {i}")), SendOptions::new())
            .await
            .expect("stored");
    }
    let stored = hub.wait_for_events(HUB, 20, Duration::from_secs(10)).await;
    assert_eq!(stored.len(), 20);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn pre_made_sas_token_as_a_provider() {
    let hub = sas_hub().await;
    let port = hub.addr().port();
    let signature = hubsend_testhub::sign_sas_token(
        &format!("sb://127.0.0.1:{port}/{HUB}"),
        "send-only",
        KEY,
        unix_now() + 3600,
    );
    let provider = hubsend::SasTokenProvider::new(signature.clone()).unwrap();
    assert!(!format!("{provider:?}").contains(&signature));
    let producer = Producer::builder()
        .namespace("127.0.0.1")
        .port(port)
        .event_hub(HUB)
        .danger_plaintext(true)
        .credential(std::sync::Arc::new(provider))
        .connect()
        .await
        .expect("the signature is accepted");
    producer
        .send_and_wait(Event::new("one"), SendOptions::new())
        .await
        .unwrap();
    assert_eq!(hub.events(HUB).len(), 1);
}

#[tokio::test]
async fn an_expired_pre_made_token_is_refused_before_connecting() {
    let hub = sas_hub().await;
    let port = hub.addr().port();
    let signature = hubsend_testhub::sign_sas_token(
        &format!("sb://127.0.0.1:{port}/{HUB}"),
        "send-only",
        KEY,
        unix_now() - 10,
    );
    let cs = format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessSignature={signature};EntityPath={HUB};UseDevelopmentEmulator=true"
    );
    let err = Producer::from_connection_string(&cs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("the shared access signature expired at"),
        "{shown}"
    );
    assert!(shown.contains("supply a new one"), "{shown}");
    assert!(!shown.contains("sig="), "{shown}");
    assert_eq!(hub.stats().put_tokens_accepted, 0);
}

#[tokio::test]
async fn a_pre_made_token_expiring_mid_stream_gives_the_documented_error() {
    let hub = sas_hub().await;
    let producer = Producer::from_connection_string(&signature_connection_string(&hub, 3))
        .await
        .expect("the signature is accepted");
    let started = std::time::Instant::now();
    let mut sent = 0;
    let error = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no error after the signature expired"
        );
        match producer
            .send_and_wait(Event::new(format!("e {sent}")), SendOptions::new())
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        // Paces the stream until the 3 s signature expires (the point of the test).
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(sent > 0, "nothing was sent before the signature expired");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error:?}");
    let shown = format!("{error} {error:?}");
    assert!(
        shown.contains("the shared access signature expired at"),
        "{shown}"
    );
    assert!(shown.contains("supply a new one"), "{shown}");
    // Everything reported as sent was stored.
    assert_eq!(hub.events(HUB).len(), sent);
    // Later sends fail the same way instead of hanging.
    let again = tokio::time::timeout(
        Duration::from_secs(15),
        producer.send_and_wait(Event::new("late"), SendOptions::new()),
    )
    .await
    .expect("a send after expiry does not hang")
    .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Unauthorized, "{again:?}");
}

/// Issue #11 defect 5: a signature expiring past chrono's last year (262143) was accepted,
/// and then formatting the provider or a builder holding it panicked. It is now refused up
/// front with the usual typed error, through the provider and the connection string alike.
#[tokio::test]
async fn a_signature_expiring_after_the_year_9999_is_refused_without_a_panic() {
    let signature = "SharedAccessSignature sr=a&sig=SECRETSIG&se=8210298412800";
    let err = hubsend::SasTokenProvider::new(signature).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err:?}");
    assert!(err.to_string().contains("past the year 9999"), "{err}");

    let builder = Producer::builder().connection_string(format!(
        "Endpoint=sb://127.0.0.1:1/;SharedAccessSignature={signature};EntityPath={HUB}"
    ));
    let shown = format!("{builder:?}");
    assert!(!shown.contains("SECRETSIG"), "{shown}");
    let err = builder.connect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConnectionString, "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("past the year 9999"), "{shown}");
    assert!(!shown.contains("SECRETSIG"), "{shown}");

    // The latest accepted expiry still formats everywhere.
    let provider =
        hubsend::SasTokenProvider::new("SharedAccessSignature sr=a&sig=SECRETSIG&se=253402300799")
            .unwrap();
    let builder = Producer::builder().credential(std::sync::Arc::new(provider));
    let shown = format!("{builder:?}");
    assert!(shown.contains("9999-12-31T23:59:59Z"), "{shown}");
    assert!(!shown.contains("SECRETSIG"), "{shown}");
}

#[cfg(feature = "entra")]
mod entra {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use hubsend::ClientSecretCredential;
    use hubsend_testhub::EVENT_HUBS_AUDIENCE;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const TENANT: &str = "0b9f3a52-7c1e-4d3b-9a77-5e2f8c1d6a40";
    const CLIENT: &str = "app-3f1c";
    const SECRET: &str = "Pq8~client-secret-VALUE";
    const SIGNING_KEY: &[u8] = b"shared between the test IdP and the hub";
    const SENDER_ROLE: &str = "Azure Event Hubs Data Sender";

    fn issuer() -> String {
        format!("https://sts.test/{TENANT}/")
    }

    /// What the token endpoint does with a request.
    #[derive(Clone, Copy)]
    enum Mode {
        Issue { expires_in: u64 },
        Hang,
    }

    /// A minimal OAuth 2.0 token endpoint (HTTP/1.1, one request per connection).
    struct TokenEndpoint {
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        issued: Arc<AtomicUsize>,
        problems: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TokenEndpoint {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TokenEndpoint {
        async fn start(mode: Mode, roles: &'static [&'static str]) -> TokenEndpoint {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let requests = Arc::new(AtomicUsize::new(0));
            let issued = Arc::new(AtomicUsize::new(0));
            let problems = Arc::new(Mutex::new(Vec::new()));
            let (r, i, p) = (requests.clone(), issued.clone(), problems.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (r, i, p) = (r.clone(), i.clone(), p.clone());
                    tokio::spawn(async move {
                        serve(stream, mode, roles, &r, &i, &p).await;
                    });
                }
            });
            TokenEndpoint {
                addr,
                requests,
                issued,
                problems,
                task,
            }
        }

        fn authority(&self) -> String {
            format!("http://{}/", self.addr)
        }

        fn credential(&self, secret: &str) -> ClientSecretCredential {
            ClientSecretCredential::new(TENANT, CLIENT, secret)
                .authority_host(self.authority())
                .danger_allow_http(true)
        }

        fn problems(&self) -> Vec<String> {
            self.problems.lock().unwrap().clone()
        }
    }

    /// Reads one request: (request line, headers lower-cased, body).
    async fn read_request(
        stream: &mut TcpStream,
    ) -> Option<(String, Vec<(String, String)>, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let request_line = lines.next()?.to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some((request_line, headers, body))
    }

    async fn serve(
        mut stream: TcpStream,
        mode: Mode,
        roles: &[&str],
        requests: &AtomicUsize,
        issued: &AtomicUsize,
        problems: &Mutex<Vec<String>>,
    ) {
        let Some((request_line, headers, body)) = read_request(&mut stream).await else {
            return;
        };
        requests.fetch_add(1, Ordering::SeqCst);
        let expires_in = match mode {
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Mode::Issue { expires_in } => expires_in,
        };
        let mut wrong = Vec::new();
        let expected_line = format!("POST /{TENANT}/oauth2/v2.0/token HTTP/1.1");
        if request_line != expected_line {
            wrong.push(format!("request line `{request_line}`"));
        }
        let content_type = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str());
        if content_type != Some("application/x-www-form-urlencoded") {
            wrong.push(format!("content type {content_type:?}"));
        }
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        for (name, expected) in [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("scope", "https://eventhubs.azure.net/.default"),
        ] {
            if field(name) != Some(expected) {
                wrong.push(format!("{name} = {:?}", field(name)));
            }
        }
        let (status, json) = if !wrong.is_empty() {
            problems.lock().unwrap().extend(wrong);
            (
                "400 Bad Request",
                serde_json::json!({"error": "invalid_request", "error_description": "AADSTS900144: malformed request"}),
            )
        } else if field("client_secret") != Some(SECRET) {
            (
                "401 Unauthorized",
                serde_json::json!({
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.\r\nTrace ID: 1\r\nCorrelation ID: 2",
                    "error_codes": [7000215],
                }),
            )
        } else {
            let now = unix_now();
            // `exp` rounds up so the hub never expires a token before the client expects.
            let claims = serde_json::json!({
                "iss": issuer(),
                "aud": EVENT_HUBS_AUDIENCE,
                "iat": now,
                "nbf": now,
                "exp": now + 1 + expires_in,
                "appid": CLIENT,
                "tid": TENANT,
                "roles": roles,
            });
            issued.fetch_add(1, Ordering::SeqCst);
            (
                "200 OK",
                serde_json::json!({
                    "token_type": "Bearer",
                    "expires_in": expires_in,
                    "ext_expires_in": expires_in,
                    "access_token": hubsend_testhub::sign_jwt_hs256(SIGNING_KEY, &claims),
                }),
            )
        };
        let body = json.to_string();
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    async fn jwt_hub() -> TestHub {
        start(HubConfig::new().trust_jwt_issuer(issuer(), EVENT_HUBS_AUDIENCE, SIGNING_KEY)).await
    }

    fn builder(hub: &TestHub) -> hubsend::ProducerBuilder {
        Producer::builder()
            .namespace("127.0.0.1")
            .port(hub.addr().port())
            .event_hub(HUB)
            .danger_plaintext(true)
    }

    #[tokio::test]
    async fn client_secret_streams_through_token_refreshes() {
        let hub = jwt_hub().await;
        let idp = TokenEndpoint::start(Mode::Issue { expires_in: 3 }, &[SENDER_ROLE]).await;
        let producer = builder(&hub)
            .credential(Arc::new(idp.credential(SECRET)))
            .connect()
            .await
            .expect("the Entra token is accepted");
        // `$management` takes the JWT as its security token.
        let properties = producer.hub_properties().await.expect("hub properties");
        assert_eq!(properties.partition_ids.len(), 4);

        let started = std::time::Instant::now();
        let mut sent = 0usize;
        while started.elapsed() < Duration::from_secs(8) {
            producer
                .send_and_wait(Event::new(format!("jwt {sent}")), SendOptions::new())
                .await
                .unwrap_or_else(|e| panic!("send {sent} failed: {e:?}"));
            sent += 1;
            // Paces 8 s of streaming over several JWT lifetimes (the point of the test).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stored = hub
            .wait_for_events(HUB, sent, Duration::from_secs(10))
            .await;
        assert_eq!(stored.len(), sent);
        assert!(idp.problems().is_empty(), "{:?}", idp.problems());
        let issued = idp.issued.load(Ordering::SeqCst);
        assert!(issued >= 3, "only {issued} token requests in 8 s");
        let stats = hub.stats();
        assert!(
            stats.jwt_put_tokens_accepted >= 3,
            "only {} jwt put-tokens",
            stats.jwt_put_tokens_accepted
        );
        assert_eq!(stats.put_tokens_rejected, 0);
        producer.close().await.unwrap();
    }

    #[tokio::test]
    async fn convenience_builder_method_uses_the_public_authority() {
        // No network here: only check that the builder accepts it and the Debug stays clean.
        let builder = Producer::builder()
            .namespace("contoso.servicebus.windows.net")
            .event_hub(HUB)
            .entra_client_secret(TENANT, CLIENT, SECRET);
        let debug = format!("{builder:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("login.microsoftonline.com"), "{debug}");
    }

    #[tokio::test]
    async fn a_wrong_secret_is_a_clear_unauthorized_error() {
        let hub = jwt_hub().await;
        let idp = TokenEndpoint::start(Mode::Issue { expires_in: 3600 }, &[SENDER_ROLE]).await;
        let wrong = "WRONG-secret-9d8f7e";
        let err = tokio::time::timeout(
            Duration::from_secs(15),
            builder(&hub)
                .credential(Arc::new(idp.credential(wrong)))
                .connect(),
        )
        .await
        .expect("a wrong secret does not hang")
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err:?}");
        let shown = format!("{err} {err:?}");
        for part in [TENANT, &idp.authority(), "invalid_client", "AADSTS7000215"] {
            assert!(shown.contains(part), "missing {part}: {shown}");
        }
        assert!(!shown.contains(wrong), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(idp.problems().is_empty(), "{:?}", idp.problems());
        assert_eq!(
            idp.requests.load(Ordering::SeqCst),
            1,
            "retried a wrong secret"
        );
        assert_eq!(hub.stats().put_tokens_accepted, 0);
    }

    #[tokio::test]
    async fn a_token_without_the_sender_role_is_refused_by_the_hub() {
        let hub = jwt_hub().await;
        let idp = TokenEndpoint::start(Mode::Issue { expires_in: 3600 }, &["Reader"]).await;
        let err = builder(&hub)
            .credential(Arc::new(idp.credential(SECRET)))
            .connect()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err:?}");
        assert_eq!(hub.stats().put_tokens_rejected, 1);
    }

    #[tokio::test]
    async fn a_silent_token_endpoint_times_out() {
        let hub = jwt_hub().await;
        let idp = TokenEndpoint::start(Mode::Hang, &[SENDER_ROLE]).await;
        let started = std::time::Instant::now();
        let err = builder(&hub)
            .credential(Arc::new(
                idp.credential(SECRET).timeout(Duration::from_millis(500)),
            ))
            .connect()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains(TENANT), "{err}");
    }

    #[tokio::test]
    async fn http_authority_needs_the_danger_switch() {
        let hub = jwt_hub().await;
        let idp = TokenEndpoint::start(Mode::Issue { expires_in: 3600 }, &[SENDER_ROLE]).await;
        let credential =
            ClientSecretCredential::new(TENANT, CLIENT, SECRET).authority_host(idp.authority());
        let err = builder(&hub)
            .credential(Arc::new(credential))
            .connect()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err:?}");
        assert_eq!(idp.requests.load(Ordering::SeqCst), 0);
    }
}
