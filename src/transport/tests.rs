//! `connect` over real sockets: each failure named for its cause, and the guard and loss
//! watch on the stream it returns; then fe2o3 over that stream against the test hub.

use std::error::Error as _;
use std::time::Duration;

use fe2o3_amqp::connection::Connection;
use fe2o3_amqp::sasl_profile::SaslProfile;
use hubsend_testhub::{HubConfig, TestHub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// Generous against a loaded machine; a watch that never flips fails long before.
const PROMPTLY: Duration = Duration::from_secs(5);

async fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

fn io_source(error: &Error) -> &std::io::Error {
    error
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .unwrap_or_else(|| panic!("no io::Error source in {error:?}"))
}

fn tls_config(hub: &TestHub) -> Arc<rustls::ClientConfig> {
    let ca = hub.ca_pem().expect("a TLS hub has a CA");
    let roots = crate::tls::parse_pem_certificates(ca.as_bytes()).unwrap();
    crate::tls::client_config(&roots).unwrap()
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_refused() {
    let (listener, port) = listener().await;
    drop(listener);
    let error = connect(&Endpoint::new("127.0.0.1", port))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection);
    assert!(
        error.message().contains("refused the connection"),
        "{error}"
    );
    assert_eq!(
        io_source(&error).kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}

#[tokio::test]
async fn a_name_that_does_not_resolve_says_so() {
    // `.invalid` never resolves (RFC 6761).
    let error = connect(&Endpoint::new("no-such-hub.invalid", 5671))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection);
    assert!(
        error
            .message()
            .contains("cannot resolve `no-such-hub.invalid`"),
        "{error}"
    );
    io_source(&error);
}

#[tokio::test]
async fn a_handshake_that_never_answers_times_out_and_names_the_step() {
    let (listener, port) = listener().await;
    // Accepts and then says nothing, as a black-holed TLS terminator would.
    let silent = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        tokio::time::sleep(PROMPTLY).await;
        drop(socket);
    });
    let roots = crate::tls::client_config(&[]).unwrap();
    let endpoint = Endpoint::new("localhost", port)
        .tls(Some(roots))
        .connect_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let error = connect(&endpoint).await.unwrap_err();
    assert!(started.elapsed() < PROMPTLY);
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(
        error
            .message()
            .contains("timed out after 300ms (in the TLS handshake)"),
        "{error}"
    );
    assert!(error.source().is_some(), "the elapsed timer is kept");
    silent.abort();
}

#[tokio::test]
async fn the_stream_carries_bytes_and_reports_the_peer_closing() {
    let (listener, port) = listener().await;
    let peer = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut header = [0u8; 8];
        socket.read_exact(&mut header).await.unwrap();
        socket.write_all(&header).await.unwrap();
        header
    });
    let Connected { mut io, lost } = connect(&Endpoint::new("127.0.0.1", port)).await.unwrap();
    io.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    let mut echoed = [0u8; 8];
    io.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"AMQP\x00\x01\x00\x00");
    assert_eq!(&peer.await.unwrap(), b"AMQP\x00\x01\x00\x00");
    // The peer task has ended and its socket is closed: the next read sees end of stream.
    assert_eq!(io.read(&mut echoed).await.unwrap(), 0);
    tokio::time::timeout(PROMPTLY, lost.lost()).await.unwrap();
    assert_eq!(lost.cause(), Some(Loss::Closed));
}

#[tokio::test]
async fn a_wide_disposition_from_the_socket_fails_the_read_and_loses_the_stream() {
    let (listener, port) = listener().await;
    let peer = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        // AMQP header, then a disposition (descriptor 0x15, list8 of role, first 0,
        // last u32::MAX) in a frame of 8 + 13 bytes.
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        bytes.extend([0, 0, 0, 21, 2, 0, 0, 0]);
        bytes.extend([0x00, 0x53, 0x15, 0xc0, 0x08, 0x03, 0x41, 0x43]);
        bytes.extend([0x70, 0xff, 0xff, 0xff, 0xff]);
        socket.write_all(&bytes).await.unwrap();
        socket
    });
    let Connected { mut io, lost } = connect(&Endpoint::new("127.0.0.1", port)).await.unwrap();
    let _socket = peer.await.unwrap();
    let mut buf = [0u8; 64];
    let mut got = 0;
    let error = loop {
        match io.read(&mut buf[got..]).await {
            Ok(n) => {
                assert!(n > 0, "end of stream before the guard refused");
                got += n;
            }
            Err(e) => break e,
        }
    };
    assert!(got <= 8, "the refused frame reached the reader");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    tokio::time::timeout(PROMPTLY, lost.lost()).await.unwrap();
    match lost.cause() {
        Some(Loss::ReadFailed { kind, message }) => {
            assert_eq!(kind, std::io::ErrorKind::InvalidData);
            assert!(
                message.contains("covering 4294967296 delivery ids"),
                "{message}"
            );
        }
        other => panic!("unexpected cause {other:?}"),
    }
}

/// The AMQP layer opens over the boxed stream (plain and TLS), and a hub that drops the
/// connection is noticed through `lost()` without any polling.
#[tokio::test]
async fn fe2o3_opens_over_the_stream_and_a_dropped_connection_is_noticed_at_once() {
    for tls in [false, true] {
        let hub = TestHub::start(HubConfig::new().tls(tls)).await.unwrap();
        let endpoint =
            Endpoint::new("localhost", hub.addr().port()).tls(tls.then(|| tls_config(&hub)));
        let Connected { io, lost } = connect(&endpoint).await.unwrap();
        let connection = Connection::builder()
            .container_id("transport-test")
            .hostname("localhost")
            .sasl_profile(SaslProfile::Anonymous)
            .open_with_stream(io)
            .await
            .unwrap_or_else(|e| panic!("open (tls {tls}): {e}"));
        assert!(!lost.is_lost());

        let dropped = Instant::now();
        hub.faults().drop_connections();
        tokio::time::timeout(PROMPTLY, lost.lost()).await.unwrap();
        let noticed = dropped.elapsed();
        assert!(
            noticed < Duration::from_millis(50),
            "tls {tls}: noticed after {noticed:?}"
        );
        assert!(
            matches!(lost.cause(), Some(Loss::Closed | Loss::ReadFailed { .. })),
            "tls {tls}: {:?}",
            lost.cause()
        );
        drop(connection);
        hub.shutdown().await;
    }
}
