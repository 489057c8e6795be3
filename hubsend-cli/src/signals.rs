//! Stopping on a signal. The first SIGINT (Ctrl-C) or SIGTERM (docker stop, systemd,
//! Kubernetes) asks the run to drain: stop reading, send what is buffered, wait for every
//! outcome, print the summary. A second one abandons the wait, for a hub that stopped answering:
//! the summary then says how many events have no known outcome.

use tokio::sync::watch;

/// Counts the stop signals received since [`Signals::install`].
#[derive(Debug, Clone)]
pub(crate) struct Signals {
    count: watch::Receiver<u32>,
}

impl Signals {
    /// Starts listening. Without signal support nothing ever arrives.
    pub(crate) fn install() -> Signals {
        let (tx, count) = watch::channel(0u32);
        tokio::spawn(async move {
            if let Some(mut stops) = Stops::new() {
                while stops.next().await {
                    tx.send_modify(|n| *n += 1);
                }
            }
            // Keep the sender: `nth` must wait forever, not resolve on a closed channel.
            std::future::pending::<()>().await;
            drop(tx);
        });
        Signals { count }
    }

    /// Resolves once `n` signals have arrived.
    pub(crate) async fn nth(&self, n: u32) {
        let mut count = self.count.clone();
        if count.wait_for(|c| *c >= n).await.is_err() {
            // Only when the runtime is shutting down.
            std::future::pending::<()>().await;
        }
    }

    /// How many have arrived.
    pub(crate) fn received(&self) -> u32 {
        *self.count.borrow()
    }
}

/// The signal streams; a tokio stream keeps counting between polls, so none is missed.
#[cfg(unix)]
struct Stops {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Stops {
    fn new() -> Option<Stops> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Stops {
            interrupt: signal(SignalKind::interrupt()).ok()?,
            terminate: signal(SignalKind::terminate()).ok()?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM; `false` when none can come any more.
    async fn next(&mut self) -> bool {
        tokio::select! {
            s = self.interrupt.recv() => s.is_some(),
            s = self.terminate.recv() => s.is_some(),
        }
    }
}

#[cfg(not(unix))]
struct Stops;

#[cfg(not(unix))]
impl Stops {
    fn new() -> Option<Stops> {
        Some(Stops)
    }

    /// Waits for the next Ctrl-C; `false` when it cannot be watched.
    async fn next(&mut self) -> bool {
        tokio::signal::ctrl_c().await.is_ok()
    }
}
