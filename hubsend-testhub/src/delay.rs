//! The test hub's one delay proxy: a TCP proxy that adds a fixed one-way delay to each
//! direction and nothing else (no bandwidth limit, no reordering, no loss), for distance from
//! the hub in tests and benchmarks on machines without `tc netem`. It owns the listener, the
//! per-connection pipes, the bound on bytes in the air per direction and the gauges of their
//! peaks (which `examples/bench.rs` reports as `proxy_peak_to_hub_kib` and
//! `proxy_peak_to_client_kib`).
//!
//! Every chunk is stamped with its due time (read time + delay) when it is read and waits in a
//! queue; the writer waits only for the head's due time, so any number of chunks are in the
//! air at once and a direction carries bandwidth × delay bytes, as a long link does. (Not the
//! `noxious` crate, a Rust Toxiproxy: its latency toxic (1.0.4) is
//! `input.then(|chunk| sleep(latency))`, each chunk waiting out the whole latency before the
//! next is looked at, so one direction carries one 8 KiB read buffer per latency: about
//! 0.8 MB/s at 10 ms each way, a bandwidth cap, not a round-trip time. Toxiproxy itself has
//! the same shape.)
//!
//! Each direction of each connection holds at most [`DelayProxy::DEFAULT_MAX_IN_AIR`] bytes
//! in the air unless [`DelayProxyBuilder::max_in_air`] says otherwise (a link buffer: past it
//! the reader waits; at 25 ms each way 64 MiB is only reached above 2.6 GB/s). Tokio's timer
//! has 1 ms resolution and rounds up, so a chunk arrives up to 1 ms late each way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The most one read takes from a socket: a chunk in the air is at most this long.
const READ_CHUNK: usize = 64 * 1024;

/// A running delay proxy. Dropping it stops accepting connections; those accepted go on
/// until either side closes.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runner: Runner,
}

/// Where the accept loop runs.
#[derive(Debug)]
enum Runner {
    /// A task on the runtime that started the proxy; aborted on drop.
    Task(JoinHandle<()>),
    /// A thread and runtime of its own: dropping `_stop` ends the accept loop; `ended` fires
    /// when the loop has ended (the listener failed, or the stop).
    Thread {
        _stop: oneshot::Sender<()>,
        ended: oneshot::Receiver<()>,
    },
}

/// How to start a [`DelayProxy`]: from [`DelayProxy::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until started"]
pub struct DelayProxyBuilder {
    listen: String,
    to: SocketAddr,
    delay: Duration,
    max_in_air: usize,
}

/// The most bytes a [`DelayProxy`] held in the air at once, per direction, summed over its
/// connections, since the last [`DelayProxy::take_peaks`] (or its start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayProxyPeaks {
    /// Read from clients, not yet written to the upstream.
    pub to_upstream: u64,
    /// Read from the upstream, not yet written to clients.
    pub to_client: u64,
}

impl DelayProxy {
    /// The bytes one direction of one connection may hold in the air unless
    /// [`DelayProxyBuilder::max_in_air`] sets otherwise: 64 MiB.
    pub const DEFAULT_MAX_IN_AIR: usize = 64 << 20;

    /// Listens on `listen` and forwards each connection to `to`, every chunk written `delay`
    /// after it was read, both ways (so the round trip grows by twice `delay`), on the current
    /// runtime, with [`DelayProxy::DEFAULT_MAX_IN_AIR`]. The same as
    /// `DelayProxy::builder(to, delay).listen(listen).start()`.
    ///
    /// # Errors
    /// When `listen` cannot be bound.
    pub async fn start(listen: &str, to: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        Self::builder(to, delay).listen(listen).start().await
    }

    /// A proxy to `to` adding `delay` each way, listening on `127.0.0.1:0` (any free port)
    /// unless [`DelayProxyBuilder::listen`] says otherwise.
    pub fn builder(to: SocketAddr, delay: Duration) -> DelayProxyBuilder {
        DelayProxyBuilder {
            listen: "127.0.0.1:0".into(),
            to,
            delay,
            max_in_air: Self::DEFAULT_MAX_IN_AIR,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The most bytes in the air per direction since the last call (or the start), summed
    /// over connections; the next period starts from what is in the air now.
    pub fn take_peaks(&self) -> DelayProxyPeaks {
        DelayProxyPeaks {
            to_upstream: self.shared.to_upstream.take_peak(),
            to_client: self.shared.to_client.take_peak(),
        }
    }

    /// Runs until the listener fails.
    pub async fn wait(mut self) {
        match &mut self.runner {
            Runner::Task(task) => {
                let _ = task.await;
            }
            Runner::Thread { ended, .. } => {
                let _ = ended.await;
            }
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Runner::Task(task) = &self.runner {
            task.abort();
        }
    }
}

impl DelayProxyBuilder {
    /// The address to listen on (default `127.0.0.1:0`: any free loopback port).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }

    /// The most bytes one direction of one connection holds in the air (read, not yet
    /// written); past it the proxy stops reading that side until the writer catches up
    /// (default [`DelayProxy::DEFAULT_MAX_IN_AIR`]; at least 1).
    pub fn max_in_air(mut self, bytes: usize) -> Self {
        self.max_in_air = bytes.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// Binds and starts accepting on the current runtime: the proxy's pipes share its
    /// threads with the caller.
    ///
    /// # Errors
    /// When the listen address cannot be bound.
    pub async fn start(self) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind(&self.listen).await?;
        let addr = listener.local_addr()?;
        let shared = self.shared();
        let task = tokio::spawn(serve(listener, shared.clone(), None));
        Ok(DelayProxy {
            addr,
            shared,
            runner: Runner::Task(task),
        })
    }

    /// Binds and starts accepting on a thread and single-threaded runtime of its own, so the
    /// delay is not distorted by the caller's load and the proxy's CPU is not the caller's.
    /// Needs no runtime (it blocks only while the thread's runtime comes up). After the proxy
    /// is dropped the thread ends once its last connection has.
    ///
    /// # Errors
    /// When the listen address cannot be bound, or the runtime or thread cannot be made.
    pub fn start_on_own_thread(self) -> std::io::Result<DelayProxy> {
        let listener = std::net::TcpListener::bind(&self.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = self.shared();
        let (stop, stopped) = oneshot::channel::<()>();
        let (end, ended) = oneshot::channel::<()>();
        let serving = shared.clone();
        // The runtime is made and dropped on the thread (a runtime dropped in the caller's
        // async context would panic); the caller waits only for it to come up.
        let (ready, up) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
        std::thread::Builder::new()
            .name(format!("delay-proxy-{}", addr.port()))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    // Every connection holds a clone of `live`; `recv` is None once all ended.
                    let (live, mut all_ended) = mpsc::channel::<()>(1);
                    tokio::select! {
                        () = serve(listener, serving, Some(live)) => {}
                        _ = stopped => {}
                    }
                    let _ = end.send(());
                    let _ = all_ended.recv().await;
                });
            })?;
        up.recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the delay proxy's thread ended")))?;
        Ok(DelayProxy {
            addr,
            shared,
            runner: Runner::Thread { _stop: stop, ended },
        })
    }

    fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            to: self.to,
            delay: self.delay,
            max_in_air: self.max_in_air,
            to_upstream: Gauge::default(),
            to_client: Gauge::default(),
        })
    }
}

/// What every connection of one proxy reads: its settings and its gauges.
#[derive(Debug)]
struct Shared {
    to: SocketAddr,
    delay: Duration,
    max_in_air: usize,
    to_upstream: Gauge,
    to_client: Gauge,
}

/// Bytes in the air now and at most since the last [`Gauge::take_peak`], for one direction
/// summed over connections.
#[derive(Debug, Default)]
struct Gauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    fn add(&self, n: u64) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: u64) {
        self.now.fetch_sub(n, Ordering::Relaxed);
    }

    fn take_peak(&self) -> u64 {
        self.peak
            .swap(self.now.load(Ordering::Relaxed), Ordering::Relaxed)
    }
}

/// Accepts until the listener fails; each connection is a task of its own holding a clone of
/// `live`, if given.
async fn serve(listener: TcpListener, shared: Arc<Shared>, live: Option<mpsc::Sender<()>>) {
    while let Ok((client, _)) = listener.accept().await {
        let shared = shared.clone();
        let live = live.clone();
        tokio::spawn(async move {
            connection(client, shared).await;
            drop(live);
        });
    }
}

/// Dials the upstream for `client` and pipes both ways until both directions have closed.
/// An unreachable upstream closes the client.
async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let upstream = match TcpStream::connect(shared.to).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::warn!(upstream = %shared.to, %error, "delay proxy: upstream unreachable, closing the client");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let up = tokio::spawn(direction(
        client_read,
        upstream_write,
        shared.clone(),
        |s| &s.to_upstream,
    ));
    let down = tokio::spawn(direction(upstream_read, client_write, shared, |s| {
        &s.to_client
    }));
    let _ = tokio::join!(up, down);
}

/// One direction: a reader stamping chunks and a writer releasing each at its due time. EOF
/// or an error on `from` drains what is in the air, then shuts `to` down.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    gauge: fn(&Shared) -> &Gauge,
) {
    // One permit a byte; no chunk is longer than the bound, so each can always get its room.
    let room = Arc::new(Semaphore::new(shared.max_in_air));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Chunk)>();
    let reader_shared = shared.clone();
    // Both own their ends: a writer that fails drops `rx`, and the reader's next send ends it.
    let reader = async move {
        let shared = reader_shared;
        let mut buf = vec![0u8; READ_CHUNK.min(shared.max_in_air)];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break, // EOF or reset: the writer drains, then closes
                Ok(n) => {
                    // Stamped when read: the delay runs from here, whatever waits ahead.
                    let due = Instant::now() + shared.delay;
                    let permits = u32::try_from(n).expect("a read is at most READ_CHUNK");
                    let Ok(room) = room.clone().acquire_many_owned(permits).await else {
                        break;
                    };
                    gauge(&shared).add(n as u64);
                    let chunk = Chunk {
                        bytes: buf[..n].to_vec(),
                        _room: room,
                    };
                    if tx.send((due, chunk)).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let result = to.write_all(&chunk.bytes).await;
            // Out of the gauge before the room is given back: the gauge never passes the bound.
            gauge(&shared).sub(chunk.bytes.len() as u64);
            drop(chunk);
            if result.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Bytes read from one side, holding their share of the direction's room until written.
struct Chunk {
    bytes: Vec<u8>,
    _room: OwnedSemaphorePermit,
}
