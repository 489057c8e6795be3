//! The hub's ceiling: a bare fe2o3-amqp 0.18 sender that pushes ONE pre-built batch message
//! (format 0x80013700, data sections holding encoded events, filled to the link's
//! max-message-size) over and over with no client-side limit on deliveries in flight other than
//! the link credit the hub grants. Event encoding happens once, before the clock starts, so
//! what is measured is (transport + hub) — an upper bound for any producer on this machine.
//!
//! ```text
//! ceiling --connection-string CS [--ca ca.pem] [--events N] [--payload-bytes B] [--window W]
//! ```
//! Plain AMQP when the connection string has `UseDevelopmentEmulator=true`, else TLS (trusting
//! `--ca`). Prints one JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::connection::Connection;
use fe2o3_amqp::link::Sender;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::Session;
use fe2o3_amqp::types::messaging::{Batch, Data, Message};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp_cbs::{client::CbsClient, token::CbsToken};
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::Outcome;
use hubsend_bench_peers::{bodies, install_crypto_provider, sas_token, Args, ConnStr, Report};
use tokio::net::TcpStream;

const BATCH_FORMAT: u32 = 0x8001_3700;

fn section_overhead(len: usize) -> usize {
    if len <= 255 {
        5
    } else {
        8
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    install_crypto_provider();
    let args = Args::parse();
    let cs = ConnStr::parse(
        &args
            .get("connection-string")
            .map(str::to_owned)
            .or_else(|| std::env::var("EVENTHUB_CONNECTION_STRING").ok())
            .expect("--connection-string or EVENTHUB_CONNECTION_STRING"),
    );
    let events = args.num("events", 2_000_000);
    let payload = args.num("payload-bytes", 100) as usize;
    let window = args.num("window", 0) as usize;
    let tls = !cs.emulator;
    let port = cs.port.unwrap_or(if tls { 5671 } else { 5672 });

    // --- connect: TCP (+TLS), SASL ANONYMOUS, session, CBS put-token, sender link ---
    let tcp = TcpStream::connect((cs.host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let builder = Connection::builder()
        .container_id("hubsend-bench-ceiling")
        .hostname(cs.host.as_str())
        .scheme("amqp")
        .max_frame_size(1024 * 1024)
        .sasl_profile(SaslProfile::Anonymous);
    let mut connection = if tls {
        let mut roots = rustls::RootCertStore::empty();
        let path = args.get("ca").ok_or("a TLS hub needs --ca FILE")?;
        let pem = std::fs::read(path)?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::try_from(cs.host.clone())?;
        let stream = connector.connect(name, tcp).await?;
        builder.open_with_stream(stream).await?
    } else {
        builder.open_with_stream(tcp).await?
    };
    let mut session = Session::begin(&mut connection).await?;
    let mut cbs = CbsClient::attach(&mut session).await?;
    let audience = format!("sb://{}/{}", cs.host, cs.hub);
    let (token, expiry) = sas_token(&audience, &cs.key_name, &cs.key, Duration::from_secs(3600));
    cbs.put_token(
        audience.as_str(),
        CbsToken::new(
            token,
            "servicebus.windows.net:sastoken",
            Some(fe2o3_amqp::types::primitives::Timestamp::from_milliseconds(
                expiry as i64 * 1000,
            )),
        ),
    )
    .await?;
    let mut sender = Sender::builder()
        .name("ceiling-sender")
        .target(cs.hub.as_str())
        .attach(&mut session)
        .await?;
    let limit = sender.max_message_size().unwrap_or(1024 * 1024) as usize;

    // --- build the one batch message, once ---
    let inner: Vec<Vec<u8>> = bodies(payload, 1024)
        .into_iter()
        .map(|b| {
            let m = Message::builder().data(Binary::from(b)).build();
            serde_amqp::to_vec(&Serializable(m)).expect("encodes")
        })
        .collect();
    let empty = serde_amqp::to_vec(&Serializable(
        Message::builder().data_batch(Vec::<Data>::new()).build(),
    ))?
    .len();
    let mut size = empty;
    let mut sections = Vec::new();
    for i in 0.. {
        let e = &inner[i % inner.len()];
        let add = e.len() + section_overhead(e.len());
        if size + add > limit {
            break;
        }
        size += add;
        sections.push(Data(Binary::from(e.clone())));
    }
    let per_batch = sections.len() as u64;
    let message: Message<Batch<Data>> = Message::builder().data_batch(sections).build();
    let encoded = serde_amqp::to_vec(&Serializable(&message))?.len();
    assert!(encoded <= limit, "batch {encoded} > limit {limit}");
    let sendable = fe2o3_amqp::link::delivery::Sendable::builder()
        .message(message)
        .message_format(BATCH_FORMAT)
        .build();
    let batches = events.div_ceil(per_batch).max(1);

    // Warm-up delivery (not timed).
    match sender.send_ref(&sendable).await? {
        Outcome::Accepted(_) => {}
        other => return Err(format!("warm-up batch not accepted: {other:?}").into()),
    }

    // --- timed: push, with outcomes collected by a separate task ---
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<
        fe2o3_amqp::link::delivery::DeliveryFut<Result<Outcome, fe2o3_amqp::link::SendError>>,
    >();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let waiter = tokio::spawn(async move {
        let mut accepted = 0u64;
        while let Some(fut) = rx.recv().await {
            match fut.await {
                Ok(Outcome::Accepted(_)) => accepted += 1,
                other => panic!("batch not accepted: {other:?}"),
            }
            let _ = done_tx.send(());
        }
        accepted
    });
    let start = Instant::now();
    let mut in_flight = 0usize;
    for _ in 0..batches {
        if window > 0 {
            while in_flight >= window {
                done_rx.recv().await;
                in_flight -= 1;
            }
            while done_rx.try_recv().is_ok() {
                in_flight -= 1;
            }
        }
        let fut = sender.send_batchable_ref(&sendable).await?;
        tx.send(fut).ok();
        in_flight += 1;
    }
    drop(tx);
    let accepted = waiter.await?;
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(accepted, batches);

    Report {
        tool: "ceiling",
        mode: "batch".into(),
        events: batches * per_batch,
        payload_bytes: payload as u64,
        seconds,
        latency_ms: None,
        extra: vec![
            ("events_per_batch", per_batch.to_string()),
            ("batch_bytes", encoded.to_string()),
            ("tls", tls.to_string()),
        ],
    }
    .print();
    let _ = sender.close().await;
    let _ = cbs.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(())
}

