//! AMQP over WebSockets and through HTTP CONNECT proxies, over real sockets against the test
//! hub's WebSocket listener, checking what the hub stored.
//!
//! The proxy tests run a real proxy server, proxy.py from PyPI, which
//! `tests/interop/websockets.sh` installs into the interop venv and `.ci/run` names in
//! `HUBSEND_PROXY_PY` (the venv's `proxy` script). Without that variable they print why and
//! pass without running; CI always sets it.
//!
//! Needs the `websockets` and `proxy` features:
//! `cargo test -p hubsend --features websockets,proxy --test transport`.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hubsend::iothub::IotHubBuilder;
use hubsend::{
    BatchOptions, ConnectionEvent, DeliveryFuture, ErrorKind, Event, Producer, ProducerBuilder,
    ProducerOptions, RetryOptions, SendOptions, TryAddError,
};
use hubsend_testhub::{HubConfig, Right, TestHub};
use support::{numbered, stored_counts, HUB, WAIT};
use tokio::sync::broadcast;

/// A hub with the WebSocket listener, TLS or plain.
async fn ws_hub(tls: bool) -> TestHub {
    support::start(HubConfig::new().tls(tls).websocket(true)).await
}

/// A producer builder for `hub`'s WebSocket listener (trusting its CA when it has TLS).
fn ws_builder(hub: &TestHub) -> ProducerBuilder {
    let mut builder = Producer::builder()
        .connection_string(hub.connection_string())
        .websockets(true)
        .port(hub.ws_port().expect("the hub has a WebSocket listener"));
    if let Some(ca) = hub.ca_pem() {
        builder = builder.add_root_certificate_pem(ca);
    }
    builder
}

/// Retries that outlast a proxy restart or a reconnect storm: 20 ms doubling to 250 ms, 60
/// times (~15 s).
fn patient() -> ProducerOptions {
    ProducerOptions::new().retry(
        RetryOptions::new()
            .max_retries(60)
            .base_delay(Duration::from_millis(20))
            .max_delay(Duration::from_millis(250)),
    )
}

/// Waits (bounded) for the first event on `events` that `wanted` picks.
async fn wait_for(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    what: &str,
    wanted: impl Fn(&ConnectionEvent) -> bool,
) {
    let found = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(event) if wanted(&event) => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("no more events; {what}"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "timed out waiting for {what}");
}

/// Sends `range` one by one through `send` (two-stage), returning their delivery futures.
async fn send_all(producer: &Producer, range: std::ops::Range<i64>) -> Vec<DeliveryFuture> {
    let mut pending = Vec::new();
    for n in range {
        pending.push(
            producer
                .send(numbered(n), SendOptions::new())
                .await
                .expect("queued"),
        );
    }
    pending
}

/// Awaits every delivery: each must be reported stored.
async fn settle(pending: Vec<DeliveryFuture>) {
    for delivery in pending {
        tokio::time::timeout(WAIT, delivery)
            .await
            .expect("settled in time")
            .expect("stored");
    }
}

/// Every number in `0..count` is stored at least once; returns how many were stored twice.
fn all_stored(hub: &TestHub, count: i64) -> usize {
    let stored = stored_counts(hub);
    let missing: BTreeSet<i64> = (0..count).filter(|n| !stored.contains_key(n)).collect();
    assert!(missing.is_empty(), "lost events: {missing:?}");
    stored.values().filter(|&&c| c > 1).count()
}

/// Connects once, with no retries, expecting a refusal: returns the error's message, after
/// checking it is [`ErrorKind::Connection`].
async fn refused(builder: ProducerBuilder) -> String {
    let error = builder
        .options(ProducerOptions::new().retry(RetryOptions::new().max_retries(0)))
        .connect()
        .await
        .expect_err("the connection is refused");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    error.to_string()
}

/// Full batches, single sends, a partition key and a partition id, over one WebSocket.
async fn sends_every_way(hub: &TestHub, producer: &Producer) {
    // A batch filled until it is full.
    let mut batch = producer.create_batch(BatchOptions::new()).await.unwrap();
    let mut next = 0i64;
    let overflow = loop {
        match batch.try_add(numbered(next)) {
            Ok(()) => next += 1,
            Err(TryAddError::Full(event)) => break event,
            Err(other) => panic!("{other:?}"),
        }
    };
    assert!(batch.len() > 100, "a 1 MiB batch holds many small events");
    producer.send_batch(batch).await.unwrap().await.unwrap();
    // Single sends, the overflow first.
    producer
        .send_and_wait(overflow, SendOptions::new())
        .await
        .unwrap();
    next += 1;
    settle(send_all(producer, next..next + 50).await).await;
    next += 50;
    // A partition key, on a batch and on a single send.
    let key = "compressor-7";
    let mut keyed = producer
        .create_batch(BatchOptions::new().partition_key(key))
        .await
        .unwrap();
    for n in next..next + 10 {
        keyed.try_add(numbered(n)).unwrap();
    }
    producer.send_batch(keyed).await.unwrap().await.unwrap();
    producer
        .send_and_wait(numbered(next + 10), SendOptions::new().partition_key(key))
        .await
        .unwrap();
    // A partition id.
    producer
        .send_and_wait(numbered(next + 11), SendOptions::new().partition_id("2"))
        .await
        .unwrap();
    let total = next + 12;
    assert_eq!(
        hub.wait_for_events(HUB, total as usize, WAIT).await.len(),
        total as usize
    );
    assert_eq!(all_stored(hub, total), 0, "nothing stored twice");
    let by_key = hub.partition_for_key(HUB, key);
    let keyed: Vec<_> = hub
        .partition_events(HUB, by_key)
        .into_iter()
        .filter(|e| e.partition_key.as_deref() == Some(key))
        .collect();
    assert_eq!(
        keyed.len(),
        11,
        "the keyed events are in partition {by_key}"
    );
    let in_two = hub.partition_events(HUB, 2);
    assert!(
        in_two
            .iter()
            .any(|e| e.application_properties["n"] == serde_json::json!(next + 11)),
        "the partition-id event is in partition 2"
    );
}

#[tokio::test]
async fn everything_goes_over_tls_websockets() {
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub).connect().await.expect("connects over wss");
    sends_every_way(&hub, &producer).await;
    let stats = hub.stats();
    assert_eq!(stats.websockets_accepted, 1, "{stats:?}");
    assert_eq!(stats.connections_accepted, 1, "{stats:?}");
    producer.close().await.unwrap();
}

#[tokio::test]
async fn everything_goes_over_plain_websockets_to_loopback() {
    // The plain hub's connection string says UseDevelopmentEmulator=true: no TLS, loopback.
    let hub = ws_hub(false).await;
    let producer = ws_builder(&hub).connect().await.expect("connects over ws");
    sends_every_way(&hub, &producer).await;
    assert_eq!(hub.stats().websockets_accepted, 1);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn frames_that_span_websocket_messages_are_reassembled() {
    let hub = ws_hub(true).await;
    hub.faults().split_websocket_messages(true);
    let producer = ws_builder(&hub).connect().await.unwrap();
    settle(send_all(&producer, 0..200).await).await;
    assert_eq!(all_stored(&hub, 200), 0);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn an_idle_websocket_answers_the_hubs_pings() {
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub).connect().await.unwrap();
    for round in 1..=3 {
        // The producer sends nothing meanwhile: only its reading side can answer.
        hub.faults().ping_websockets();
        let stats = hub
            .wait_for_stats(|s| s.websocket_pongs_received >= round, WAIT)
            .await;
        assert!(
            stats.websocket_pongs_received >= round,
            "no pong for ping {round}"
        );
    }
    producer
        .send_and_wait(numbered(0), SendOptions::new())
        .await
        .unwrap();
    all_stored(&hub, 1);
    assert_eq!(hub.stats().connections_accepted, 1);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn both_subprotocols_are_accepted_and_others_refused() {
    let hub = ws_hub(true).await;
    for (n, subprotocol) in ["AMQPWSB10", "amqp"].into_iter().enumerate() {
        let producer = ws_builder(&hub)
            .websocket_subprotocol(subprotocol)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{subprotocol}: {e}"));
        producer
            .send_and_wait(numbered(n as i64), SendOptions::new())
            .await
            .unwrap();
        producer.close().await.unwrap();
    }
    assert_eq!(all_stored(&hub, 2), 0);
    assert_eq!(hub.stats().websockets_accepted, 2);
    let text = refused(ws_builder(&hub).websocket_subprotocol("mqtt")).await;
    assert!(text.contains("400"), "{text}");
}

#[tokio::test]
async fn a_server_that_does_not_echo_the_subprotocol_is_refused() {
    let hub = support::start(
        HubConfig::new()
            .tls(true)
            .websocket(true)
            .websocket_echo_subprotocol(false),
    )
    .await;
    let text = refused(ws_builder(&hub)).await;
    assert!(text.contains("WebSocket"), "{text}");
    assert!(text.contains("subprotocol"), "{text}");
    assert_eq!(hub.stats().connections_accepted, 0);
}

#[tokio::test]
async fn tokens_are_refreshed_over_the_same_websocket() {
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub)
        .options(ProducerOptions::new().token_lifetime(Duration::from_secs(2)))
        .connect()
        .await
        .unwrap();
    let mut events = producer.subscribe();
    for round in 0..3 {
        wait_for(&mut events, "a token refresh", |e| {
            matches!(e, ConnectionEvent::TokenRefreshed)
        })
        .await;
        producer
            .send_and_wait(numbered(round), SendOptions::new())
            .await
            .expect("sends keep working across token refreshes");
    }
    assert_eq!(all_stored(&hub, 3), 0);
    let stats = hub.stats();
    assert_eq!(
        stats.connections_accepted, 1,
        "one WebSocket throughout: {stats:?}"
    );
    assert!(stats.put_tokens_accepted >= 4, "{stats:?}");
    producer.close().await.unwrap();
}

/// Sends 0..400 with dispositions held back, so deliveries are in flight when `fault` cuts
/// the connection; then checks every one was stored after the reconnect.
async fn recovers_with_nothing_lost(hub: &TestHub, producer: &Producer, fault: impl FnOnce()) {
    let mut events = producer.subscribe();
    settle(send_all(producer, 0..200).await).await;
    hub.faults().delay_dispositions(Duration::from_millis(200));
    let in_flight = send_all(producer, 200..400).await;
    fault();
    wait_for(&mut events, "the disconnect", |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    hub.faults().delay_dispositions(Duration::ZERO);
    wait_for(&mut events, "the reconnect", |e| {
        matches!(e, ConnectionEvent::Reconnected)
    })
    .await;
    settle(in_flight).await;
    settle(send_all(producer, 400..500).await).await;
    let twice = all_stored(hub, 500);
    eprintln!("stored twice after the reconnect: {twice}");
    assert!(hub.stats().connections_accepted >= 2);
}

#[tokio::test]
async fn a_closed_websocket_is_recovered_with_nothing_lost() {
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub).options(patient()).connect().await.unwrap();
    let faults = hub.faults();
    recovers_with_nothing_lost(&hub, &producer, || faults.close_websockets()).await;
    assert_eq!(hub.stats().websockets_accepted, 2);
    producer.close().await.unwrap();
}

#[tokio::test]
async fn a_dropped_websocket_connection_is_recovered_with_nothing_lost() {
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub).options(patient()).connect().await.unwrap();
    let faults = hub.faults();
    recovers_with_nothing_lost(&hub, &producer, || faults.drop_connections()).await;
    producer.close().await.unwrap();
}

#[tokio::test]
async fn an_amqp_close_over_websockets_is_recovered() {
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub).options(patient()).connect().await.unwrap();
    let mut events = producer.subscribe();
    // The fault fires on a connection's first transfer: arm it before any.
    hub.faults()
        .close_each_connection_after_first_transfer("amqp:connection:forced");
    let doomed = send_all(&producer, 0..20).await;
    // Let one connection take the fault, then stop it so the resends can land.
    wait_for(&mut events, "the disconnect", |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    hub.faults().clear();
    settle(doomed).await;
    all_stored(&hub, 20);
    assert!(hub.stats().websockets_accepted >= 2);
    producer.close().await.unwrap();
}

const IOT_HOST: &str = "plant.azure-devices.net";
const DEVICE_KEY: &str = "c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA==";

#[tokio::test]
async fn an_iot_hub_device_sends_over_the_iothub_websocket() {
    let hub = support::start(
        HubConfig::new()
            .tls(true)
            .websocket(true)
            .iothub(IOT_HOST)
            .iot_device("sensor-ws", DEVICE_KEY),
    )
    .await;
    assert!(hub.ws_url().unwrap().ends_with("/$iothub/websocket"));
    for subprotocol in ["AMQPWSB10", "amqp"] {
        let device = IotHubBuilder::default()
            .connection_string(hub.iothub_device_connection_string("sensor-ws"))
            .add_root_certificate_pem(hub.ca_pem().unwrap())
            .websockets(true)
            .websocket_subprotocol(subprotocol)
            .port(hub.ws_port().unwrap())
            .device_sender()
            .await
            .unwrap_or_else(|e| panic!("{subprotocol}: {e}"));
        device
            .send(Event::new(format!("over {subprotocol}")))
            .await
            .unwrap()
            .await
            .unwrap();
        let mut batch = device.create_batch(None).unwrap();
        for i in 0..20 {
            batch
                .try_add(Event::new(format!("{subprotocol} {i}")))
                .unwrap();
        }
        device.send_batch(batch).await.unwrap().await.unwrap();
        device.close().await.unwrap();
    }
    let stored = hub.iothub_messages("sensor-ws");
    assert_eq!(stored.len(), 42);
    assert_eq!(stored[0].body, b"over AMQPWSB10");
    assert_eq!(stored[21].body, b"over amqp");
    assert_eq!(hub.stats().websockets_accepted, 2);
}

#[tokio::test]
async fn the_event_hubs_path_is_not_served_in_iot_hub_mode() {
    // A client that asks for the wrong upgrade path gets 404, named in the error.
    let hub = support::start(
        HubConfig::new()
            .tls(true)
            .websocket(true)
            .iothub(IOT_HOST)
            .policy("device", DEVICE_KEY, &[Right::Send])
            .iot_device("sensor-ws", DEVICE_KEY),
    )
    .await;
    let text = refused(Producer::builder()
        .connection_string(format!(
            "Endpoint=sb://localhost/;SharedAccessKeyName=device;SharedAccessKey={DEVICE_KEY};EntityPath=telemetry"
        ))
        .add_root_certificate_pem(hub.ca_pem().unwrap())
        .websockets(true)
        .port(hub.ws_port().unwrap())).await;
    assert!(text.contains("404"), "{text}");
}

// ---- Through a real proxy server (proxy.py) ----

/// A proxy.py process in a process group of its own (so its acceptor processes go with it),
/// listening on loopback; killed when dropped.
struct ProxyPy {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    credentials: Option<(&'static str, &'static str)>,
    child: Option<Child>,
}

impl ProxyPy {
    /// The proxy.py script `HUBSEND_PROXY_PY` names, or `None` (and a note saying why the
    /// test does not run) when it is unset.
    fn binary(test: &str) -> Option<PathBuf> {
        match std::env::var_os("HUBSEND_PROXY_PY") {
            Some(path) => Some(PathBuf::from(path)),
            None => {
                eprintln!(
                    "SKIPPED {test}: HUBSEND_PROXY_PY is not set (the interop venv's proxy.py; \
                     .ci/run sets it once tests/interop/websockets.sh has installed it)"
                );
                None
            }
        }
    }

    /// Starts proxy.py on a free port, with Basic `credentials` required when given.
    fn start(binary: PathBuf, credentials: Option<(&'static str, &'static str)>) -> ProxyPy {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("hubsend-proxy-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut proxy = ProxyPy {
            binary,
            dir,
            port: 0,
            credentials,
            child: None,
        };
        proxy.spawn();
        proxy
    }

    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let port_file = self.dir.join("port");
        let _ = std::fs::remove_file(&port_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("proxy.log"))
            .unwrap();
        let mut command = Command::new(&self.binary);
        command
            .args(["--hostname", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--port-file")
            .arg(&port_file)
            .args(["--num-workers", "1", "--num-acceptors", "1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        if let Some((user, pass)) = self.credentials {
            command.args(["--basic-auth", &format!("{user}:{pass}")]);
        }
        self.child = Some(command.spawn().expect("proxy.py starts"));
        // proxy.py writes the port it bound to this file once it listens; no event to await.
        let deadline = std::time::Instant::now() + WAIT;
        self.port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break port;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "proxy.py did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
    }

    /// Kills proxy.py and its acceptors (its process group): every tunnel closes at once.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
        }
    }

    /// Starts proxy.py again on the same port.
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `http://[user:pass@]127.0.0.1:PORT`, with `password` instead of the right one if given.
    fn url_with(&self, password: Option<&str>) -> String {
        match self.credentials {
            Some((user, pass)) => format!(
                "http://{user}:{}@127.0.0.1:{}",
                password.unwrap_or(pass),
                self.port
            ),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    fn url(&self) -> String {
        self.url_with(None)
    }

    /// What proxy.py logged (its access log names each CONNECT).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }

    /// How many tunnels proxy.py has logged to `target` (`host:port`).
    fn tunnels_to(&self, port: u16) -> usize {
        self.log()
            .matches(&format!("CONNECT localhost:{port} "))
            .count()
    }
}

impl Drop for ProxyPy {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) until proxy.py's access log names `count` tunnels to `port`: it writes
/// the line when a tunnel closes. proxy.py is another process whose only signal is its log
/// file, so this one wait polls (every 20 ms).
async fn wait_for_tunnels(proxy: &ProxyPy, port: u16, count: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while proxy.tunnels_to(port) < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy.py logged no tunnel to {port}: {}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn raw_amqp_over_tls_goes_through_a_connect_proxy() {
    let Some(binary) = ProxyPy::binary("raw_amqp_over_tls_goes_through_a_connect_proxy") else {
        return;
    };
    let proxy = ProxyPy::start(binary, None);
    let hub = support::start(HubConfig::new().tls(true)).await;
    let producer = Producer::builder()
        .connection_string(hub.connection_string())
        .add_root_certificate_pem(hub.ca_pem().unwrap())
        .proxy(proxy.url())
        .connect()
        .await
        .expect("connects through the proxy");
    sends_every_way(&hub, &producer).await;
    producer.close().await.unwrap();
    wait_for_tunnels(&proxy, hub.addr().port(), 1).await;
}

#[tokio::test]
async fn websockets_go_through_a_proxy_with_basic_auth() {
    let Some(binary) = ProxyPy::binary("websockets_go_through_a_proxy_with_basic_auth") else {
        return;
    };
    let proxy = ProxyPy::start(binary, Some(("hubsend", "s3cret-pass")));
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub)
        .proxy(proxy.url())
        .connect()
        .await
        .expect("connects through the proxy");
    sends_every_way(&hub, &producer).await;
    assert_eq!(hub.stats().websockets_accepted, 1);
    producer.close().await.unwrap();
    wait_for_tunnels(&proxy, hub.ws_port().unwrap(), 1).await;
}

#[tokio::test]
async fn a_wrong_proxy_password_is_a_typed_error_naming_the_proxy() {
    let Some(binary) = ProxyPy::binary("a_wrong_proxy_password_is_a_typed_error_naming_the_proxy")
    else {
        return;
    };
    let proxy = ProxyPy::start(binary, Some(("hubsend", "s3cret-pass")));
    let hub = ws_hub(true).await;
    for (url, given) in [
        (proxy.url_with(Some("not-the-password")), true),
        (format!("http://127.0.0.1:{}", proxy.port), false),
    ] {
        let text = refused(ws_builder(&hub).proxy(url)).await;
        assert!(text.contains("proxy 127.0.0.1:"), "{text}");
        assert!(text.contains("407"), "{text}");
        assert!(!text.contains("not-the-password"), "{text}");
        let why = if given {
            "were refused"
        } else {
            "no credentials"
        };
        assert!(text.contains(why), "{text}");
    }
    assert_eq!(hub.stats().websockets_accepted, 0);
}

#[tokio::test]
async fn an_unreachable_proxy_is_a_typed_error_naming_it() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let hub = ws_hub(true).await;
    let text =
        refused(ws_builder(&hub).proxy(format!("http://user:hunter2@127.0.0.1:{port}"))).await;
    assert!(text.contains(&format!("proxy 127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn a_proxy_that_dies_mid_stream_is_recovered_with_nothing_lost() {
    let Some(binary) =
        ProxyPy::binary("a_proxy_that_dies_mid_stream_is_recovered_with_nothing_lost")
    else {
        return;
    };
    for websockets in [true, false] {
        let mut proxy = ProxyPy::start(binary.clone(), Some(("hubsend", "s3cret-pass")));
        let hub = ws_hub(true).await;
        let builder = if websockets {
            ws_builder(&hub)
        } else {
            Producer::builder()
                .connection_string(hub.connection_string())
                .add_root_certificate_pem(hub.ca_pem().unwrap())
        };
        let producer = builder
            .proxy(proxy.url())
            .options(patient())
            .connect()
            .await
            .unwrap();
        recovers_with_nothing_lost(&hub, &producer, || proxy.restart()).await;
        producer.close().await.unwrap();
        let port = if websockets {
            hub.ws_port().unwrap()
        } else {
            hub.addr().port()
        };
        wait_for_tunnels(&proxy, port, 1).await;
    }
}

/// Set in the child process [`proxy_from_env_follows_https_proxy_and_no_proxy`] starts: the
/// proxy.py log to find the tunnel in, or empty when the connection must go direct.
const CHILD: &str = "HUBSEND_TRANSPORT_TEST_CHILD";

#[tokio::test]
async fn proxy_from_env_follows_https_proxy_and_no_proxy() {
    const NAME: &str = "proxy_from_env_follows_https_proxy_and_no_proxy";
    if let Ok(log) = std::env::var(CHILD) {
        return env_proxy_child(log).await;
    }
    let Some(binary) = ProxyPy::binary(NAME) else {
        return;
    };
    let proxy = ProxyPy::start(binary, Some(("hubsend", "s3cret-pass")));
    let nobody = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    // Through proxy.py; then exempted by NO_PROXY, with HTTPS_PROXY naming a port nobody
    // listens on, so a connection that ignored NO_PROXY would fail.
    let log = proxy.dir.join("proxy.log").display().to_string();
    let cases = [
        (proxy.url(), "", log),
        (
            format!("http://127.0.0.1:{nobody}"),
            ".example, localhost",
            String::new(),
        ),
    ];
    // The variables are the process's own: set them in a child running just this test, so
    // no other test's thread reads the environment while it changes.
    for (https_proxy, no_proxy, log) in cases {
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture"])
            .env(CHILD, log)
            .env("HTTPS_PROXY", https_proxy)
            .env("NO_PROXY", no_proxy)
            .env_remove("https_proxy")
            .env_remove("no_proxy")
            .status()
            .unwrap();
        assert!(status.success(), "NO_PROXY={no_proxy:?}: the child failed");
    }
}

/// In the child: connects with `proxy_from_env(true)`, sends, and when `log` names proxy.py's
/// log, waits for the tunnel there.
async fn env_proxy_child(log: String) {
    let hub = ws_hub(true).await;
    let producer = ws_builder(&hub)
        .proxy_from_env(true)
        .connect()
        .await
        .expect("connects as HTTPS_PROXY and NO_PROXY say");
    producer
        .send_and_wait(numbered(0), SendOptions::new())
        .await
        .unwrap();
    producer.close().await.unwrap();
    all_stored(&hub, 1);
    if log.is_empty() {
        return;
    }
    let tunnel = format!("CONNECT localhost:{} ", hub.ws_port().unwrap());
    let deadline = tokio::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&log).unwrap().contains(&tunnel) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no tunnel in proxy.py's log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
