//! Helpers shared by the test hub's integration tests: a hub with known keys, a raw fe2o3
//! client connection with a put-token, events, and a frame tap that records what the hub
//! writes, read by read.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use fe2o3_amqp::{
    connection::ConnectionHandle, sasl_profile::SaslProfile, session::SessionHandle, Connection,
    Sender, Session,
};
use fe2o3_amqp_cbs::{client::CbsClient, token::CbsToken};
use fe2o3_amqp_types::{
    messaging::{Body, Data, Message, MessageAnnotations},
    performatives::Disposition,
    primitives::{Binary, Value},
};
use hmac::{Hmac, Mac};
use hubsend_testhub::{HubConfig, Right, TestHub};
use sha2::Sha256;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub const SEND_KEY: &str = "c2VuZC1rZXktZm9yLXRoZS10ZXN0LWh1Yi0xMjM0NTY=";
pub const MANAGE_KEY: &str = "bWFuYWdlLWtleS1mb3ItdGhlLXRlc3QtaHViLTEyMzQ=";

/// Hub `telemetry` (4 partitions) with policies `send` (Send) and `manage` (every right).
pub fn config() -> HubConfig {
    HubConfig::new()
        .hub("telemetry", 4)
        .policy("send", SEND_KEY, &[Right::Send])
        .policy(
            "manage",
            MANAGE_KEY,
            &[Right::Manage, Right::Send, Right::Listen],
        )
}

/// Starts [`config`].
pub async fn hub() -> TestHub {
    TestHub::start(config()).await.unwrap()
}

/// A connection (SASL ANONYMOUS) to `addr` and one session on it.
pub async fn connect_to(addr: SocketAddr) -> (ConnectionHandle<()>, SessionHandle<()>) {
    let mut conn = Connection::builder()
        .container_id("test-client")
        .sasl_profile(SaslProfile::Anonymous)
        .open(format!("amqp://127.0.0.1:{}", addr.port()).as_str())
        .await
        .unwrap();
    let session = Session::begin(&mut conn).await.unwrap();
    (conn, session)
}

/// A SAS token for `resource` valid for `ttl` seconds, signed independently of the hub's own
/// signer (upper-case escapes, like .NET/Python).
pub fn sign(resource: &str, key_name: &str, key: &str, ttl: u64) -> String {
    let se = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + ttl;
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let sr = enc(resource);
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={se}&skn={key_name}",
        enc(&sig)
    )
}

/// Puts a token for `audience` on `$cbs` of the session; the error text on refusal.
pub async fn put_token(
    session: &mut SessionHandle<()>,
    audience: &str,
    key_name: &str,
    key: &str,
) -> Result<(), String> {
    let mut cbs = CbsClient::attach(session)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let token = sign(audience, key_name, key, 3600);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        cbs.put_token(
            audience,
            CbsToken::new(token, "servicebus.windows.net:sastoken", None),
        ),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|e| format!("{e:?}"));
    let _ = cbs.close().await;
    r
}

/// [`connect_to`] and a put-token for `telemetry` under the `send` policy.
pub async fn connect_send(addr: SocketAddr) -> (ConnectionHandle<()>, SessionHandle<()>) {
    let (conn, mut session) = connect_to(addr).await;
    put_token(&mut session, "sb://localhost/telemetry", "send", SEND_KEY)
        .await
        .unwrap();
    (conn, session)
}

/// A producer link named `producer` to `telemetry`.
pub async fn producer(session: &mut SessionHandle<()>) -> Sender {
    Sender::attach(session, "producer", "telemetry")
        .await
        .unwrap()
}

/// An event with one data section `body` and, optionally, a partition key.
pub fn event(body: &str, key: Option<&str>) -> Message<Body<Value>> {
    let annotations = key.map(|k| {
        MessageAnnotations::builder()
            .insert("x-opt-partition-key", k)
            .build()
    });
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: annotations,
        properties: None,
        application_properties: None,
        body: Body::Data(vec![Data(Binary::from(body.as_bytes().to_vec()))].into()),
        footer: None,
    }
}

/// One frame the hub wrote (protocol headers are not recorded).
#[derive(Clone, Debug)]
pub struct Frame {
    /// 0 for AMQP, 1 for SASL.
    pub frame_type: u8,
    pub channel: u16,
    /// Performative descriptor code; `None` for an empty frame (a heartbeat).
    pub code: Option<u64>,
    /// The frame body (performative and payload).
    pub body: Vec<u8>,
}

impl Frame {
    fn parse(frame: &[u8]) -> Frame {
        let doff = (frame[4] as usize * 4).clamp(8, frame.len());
        let body = frame[doff..].to_vec();
        let code = match body.as_slice() {
            [0x00, 0x53, c, ..] => Some(u64::from(*c)),
            [0x00, 0x80, rest @ ..] if rest.len() >= 8 => {
                Some(u64::from_be_bytes(rest[..8].try_into().unwrap()))
            }
            _ => None,
        };
        Frame {
            frame_type: frame[5],
            channel: u16::from_be_bytes([frame[6], frame[7]]),
            code,
            body,
        }
    }

    /// Whether this is an empty frame.
    pub fn is_heartbeat(&self) -> bool {
        self.body.is_empty()
    }

    /// The DISPOSITION this frame carries, if it is one.
    pub fn disposition(&self) -> Option<Disposition> {
        (self.frame_type == 0 && self.code == Some(0x15))
            .then(|| serde_amqp::from_slice(&self.body).ok())
            .flatten()
    }
}

/// A TCP proxy in front of a hub that records every frame the hub writes, grouped by the
/// socket read that completed it, and can drop frames instead of forwarding them.
pub struct Tap {
    pub addr: SocketAddr,
    log: Arc<FrameLog>,
    task: tokio::task::JoinHandle<()>,
}

/// What a tap recorded, and a wake-up for whoever waits on it.
#[derive(Default)]
struct FrameLog {
    reads: Mutex<Vec<Vec<Frame>>>,
    recorded: tokio::sync::Notify,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tap {
    /// A tap forwarding to `upstream` every frame for which `drop` is false.
    pub async fn start(upstream: SocketAddr, drop: fn(&Frame) -> bool) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<FrameLog> = Arc::default();
        let recorder = log.clone();
        let task = tokio::spawn(async move {
            let mut pumps = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                let hub = TcpStream::connect(upstream).await.unwrap();
                let _ = (client.set_nodelay(true), hub.set_nodelay(true));
                pumps.push(AbortOnDrop(tokio::spawn(pump(
                    client,
                    hub,
                    drop,
                    recorder.clone(),
                ))));
            }
        });
        Tap { addr, log, task }
    }

    /// The frames of each read from the hub, in order (reads that completed no frame are
    /// left out).
    pub fn reads(&self) -> Vec<Vec<Frame>> {
        self.log.reads.lock().unwrap().clone()
    }

    /// Every frame the hub wrote, in order.
    pub fn frames(&self) -> Vec<Frame> {
        self.reads().into_iter().flatten().collect()
    }

    /// Waits until some recorded frame satisfies `f`, or `timeout` passes (woken by each
    /// read the tap records, no polling).
    pub async fn wait_for(&self, timeout: Duration, f: impl Fn(&Frame) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let recorded = self.log.recorded.notified();
            if self.frames().iter().any(&f) {
                return true;
            }
            if tokio::time::timeout_at(deadline, recorded).await.is_err() {
                return self.frames().iter().any(&f);
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies client → hub as is; hub → client frame by frame, recording and filtering.
async fn pump(client: TcpStream, hub: TcpStream, drop: fn(&Frame) -> bool, log: Arc<FrameLog>) {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut hub_rd, mut hub_wr) = hub.into_split();
    let _up = AbortOnDrop(tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rd, &mut hub_wr).await;
        let _ = hub_wr.shutdown().await;
    }));
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        let n = match hub_rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut group = Vec::new();
        let mut forward = Vec::new();
        loop {
            let size = match buf.get(..4) {
                Some(b"AMQP") if buf.len() >= 8 => 8,
                Some(b"AMQP") | None => break,
                Some(s) => u32::from_be_bytes(s.try_into().unwrap()) as usize,
            };
            if buf.len() < size.max(8) {
                break;
            }
            let unit: Vec<u8> = buf.drain(..size.max(8)).collect();
            if unit.starts_with(b"AMQP") {
                forward.extend_from_slice(&unit);
                continue;
            }
            let frame = Frame::parse(&unit);
            if !drop(&frame) {
                forward.extend_from_slice(&unit);
            }
            group.push(frame);
        }
        if !group.is_empty() {
            log.reads.lock().unwrap().push(group);
            log.recorded.notify_waiters();
        }
        if client_wr.write_all(&forward).await.is_err() {
            break;
        }
    }
    let _ = client_wr.shutdown().await;
}
