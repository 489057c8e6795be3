//! The delay proxy over real TCP sockets on loopback: the delay it adds, the bytes it carries,
//! its bound on bytes in the air, and how it closes. Each test runs both ways of starting a
//! proxy (on the caller's runtime and on a thread of its own).

use std::net::SocketAddr;
use std::time::Duration;

use hubsend_testhub::{DelayProxy, DelayProxyPeaks};
use rand::{rngs::StdRng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

/// Long enough that only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Run {
    /// `DelayProxyBuilder::start`: on the test's runtime.
    Here,
    /// `DelayProxyBuilder::start_on_own_thread`.
    OwnThread,
}

const RUNS: [Run; 2] = [Run::Here, Run::OwnThread];

async fn proxy(run: Run, to: SocketAddr, delay: Duration, max_in_air: Option<usize>) -> DelayProxy {
    let mut builder = DelayProxy::builder(to, delay);
    if let Some(bytes) = max_in_air {
        builder = builder.max_in_air(bytes);
    }
    match run {
        Run::Here => builder.start().await,
        Run::OwnThread => builder.start_on_own_thread(),
    }
    .expect("proxy started")
}

/// An echo server on loopback: every connection gets its bytes back, and a shut-down write
/// half once the client shuts down its own.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// One byte there and back through the proxy: each way waits out the delay, so the round trip
/// is at least twice it (a 10 % margin for timer rounding, no upper bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_takes_at_least_twice_the_delay() {
    let echo = echo_server().await;
    for run in RUNS {
        let proxy = proxy(run, echo, Duration::from_millis(50), None).await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.set_nodelay(true).unwrap();
        for round in 0..3u8 {
            let sent = Instant::now();
            client.write_all(&[round]).await.unwrap();
            let mut back = [0u8; 1];
            timeout(PATIENCE, client.read_exact(&mut back))
                .await
                .expect("the echo came back")
                .unwrap();
            let rtt = sent.elapsed();
            assert_eq!(back, [round]);
            assert!(
                rtt >= Duration::from_millis(90),
                "{run:?}, round {round}: a round trip through 50 ms each way took {rtt:?}"
            );
        }
    }
}

/// 5 MB of a seeded random pattern through the proxy to an echo server and back (written and
/// read at once, so the proxy holds many chunks in the air): every byte, in order, and the
/// proxy closes the client once the echo does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_and_in_order() {
    let echo = echo_server().await;
    let mut pattern = vec![0u8; 5_000_000];
    StdRng::seed_from_u64(0x5eed).fill_bytes(&mut pattern);
    for run in RUNS {
        let proxy = proxy(run, echo, Duration::from_millis(5), None).await;
        let (mut r, mut w) = TcpStream::connect(proxy.addr()).await.unwrap().into_split();
        let out = pattern.clone();
        let writer = tokio::spawn(async move {
            // Uneven writes, so chunk edges fall anywhere.
            for piece in out.chunks(7_919) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::with_capacity(pattern.len());
        timeout(PATIENCE, r.read_to_end(&mut back))
            .await
            .expect("the echo ended")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), pattern.len(), "{run:?}: bytes lost or added");
        let first_bad = back.iter().zip(&pattern).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "{run:?}: the bytes came back changed");
        let peaks = proxy.take_peaks();
        assert!(
            peaks.to_upstream > 0 && peaks.to_client > 0,
            "{run:?}: {peaks:?}"
        );
    }
}

/// An upstream that reads nothing for a while: the proxy holds at most `max_in_air` bytes of
/// the client's 32 MiB in the air (the rest waits in the sockets and the client's write),
/// reaches that bound, and still delivers every byte once the upstream reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_in_the_air_stay_within_the_bound_with_a_slow_reader() {
    const BOUND: usize = 256 << 10;
    const TOTAL: usize = 32 << 20;
    // A small receive buffer (fixed, so not autotuned) on the upstream: the kernel takes up
    // little of what the proxy writes while the upstream does not read.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let upstream = listener.local_addr().unwrap();
    let pattern: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
    for run in RUNS {
        let proxy = proxy(run, upstream, Duration::from_millis(10), Some(BOUND)).await;
        let client = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut stalled, _) = listener.accept().await.unwrap();
        let out = pattern.clone();
        let writer = tokio::spawn(async move {
            let mut client = client;
            client.write_all(&out).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        // The upstream reads nothing: the proxy's queue fills up to the bound and stops.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stalled_peaks = proxy.take_peaks();
        // Then it reads slowly: 16 KiB at a time with a pause.
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = vec![0u8; 16 << 10];
        let read_all = async {
            loop {
                let n = stalled.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() < 2 << 20 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        timeout(PATIENCE, read_all)
            .await
            .expect("the upstream got to the end");
        let _client = writer.await.unwrap();
        let peaks = proxy.take_peaks();
        for (when, p) in [("stalled", stalled_peaks), ("draining", peaks)] {
            assert!(
                p.to_upstream <= BOUND as u64,
                "{run:?}, {when}: {} bytes in the air toward the upstream, bound {BOUND}",
                p.to_upstream
            );
            assert_eq!(p.to_client, 0, "{run:?}, {when}: nothing was sent back");
        }
        assert!(
            stalled_peaks.to_upstream >= (BOUND / 2) as u64,
            "{run:?}: a stalled upstream should fill the proxy's queue: {stalled_peaks:?}"
        );
        assert_eq!(got.len(), TOTAL, "{run:?}: bytes lost or added");
        assert!(got == pattern, "{run:?}: the bytes arrived changed");
        assert_eq!(
            proxy.take_peaks(),
            DelayProxyPeaks::default(),
            "{run:?}: all written"
        );
    }
}

/// The upstream writes a little and closes: the client gets those bytes, then end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_closed_when_the_upstream_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    for run in RUNS {
        let proxy = proxy(run, upstream, Duration::from_millis(20), None).await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        server.write_all(b"bye").await.unwrap();
        drop(server);
        let mut got = Vec::new();
        timeout(PATIENCE, client.read_to_end(&mut got))
            .await
            .expect("the proxy closed the client")
            .unwrap();
        assert_eq!(got, b"bye", "{run:?}");
    }
}

/// An upstream nobody listens on: the proxy accepts, fails to dial it, and closes the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_closed_when_the_upstream_is_unreachable() {
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for run in RUNS {
        let proxy = proxy(run, nobody, Duration::from_millis(5), None).await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let read = timeout(PATIENCE, client.read(&mut buf))
            .await
            .expect("the proxy closed the client");
        assert!(matches!(read, Ok(0) | Err(_)), "{run:?}: {read:?}");
    }
}

/// Dropping the proxy stops it accepting; a connection it accepted before goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_stops_accepting_but_not_its_connections() {
    let echo = echo_server().await;
    for run in RUNS {
        let proxy = proxy(run, echo, Duration::from_millis(5), None).await;
        let addr = proxy.addr();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"one").await.unwrap();
        let mut back = [0u8; 3];
        client.read_exact(&mut back).await.unwrap();
        drop(proxy);
        // The own thread's accept loop ends when it sees the stop: allow it a moment.
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "{run:?}: still accepting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client.write_all(b"two").await.unwrap();
        timeout(PATIENCE, client.read_exact(&mut back))
            .await
            .expect("the old connection still echoes")
            .unwrap();
        assert_eq!(&back, b"two", "{run:?}");
    }
}
