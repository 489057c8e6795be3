//! [`IotHubSink`]: spooled records sent as IoT Hub device-to-cloud messages, through a
//! [`Gateway`] (each record as the device its [`Route::Device`] names) or a [`DeviceSender`]
//! (every record as that one device).
//!
//! See [`IotHubSink`] for how it sends and what it retries.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hubsend::iothub::{DeviceSender, Gateway};
use hubsend::{DeliveryFuture, ErrorKind, Event};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::producer::{permanent, BoxFuture};
use crate::record::Route;
use crate::sink::{Acks, NotTaken, Sink, SinkSession, Ticket};

/// Messages sent and awaiting the hub's outcome in one session, at most (each holds only its
/// outcome's channel; the sender's own in-flight bounds come first).
const MAX_PENDING: usize = 8192;
/// How long closing the gateway or device sender may take once its outcomes are in.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// What an [`IotHubSink`] sends through.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum IotHubSender {
    /// One device: records routed to another device are refused (removed, counted failed).
    Device(DeviceSender),
    /// Any device, the one each record's [`Route::Device`] names; with auto-create (on its
    /// builder) unknown devices are created and named from the route.
    Gateway(Gateway),
}

/// One record's outcome, as [`IotHubSink::on_outcome`] reports it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum DeviceOutcome<'a> {
    /// The hub accepted it; it left the spool.
    Sent,
    /// It can never be sent (see [`IotHubSink`]); it left the spool, counted failed.
    Failed(&'a hubsend::Error),
    /// Not now: it stays in the spool and is sent again after the drain reconnects.
    Retrying(&'a hubsend::Error),
}

type ConnectFn = Arc<dyn Fn() -> BoxFuture<hubsend::Result<IotHubSender>> + Send + Sync>;
type Observer = Arc<dyn Fn(&str, DeviceOutcome<'_>) + Send + Sync>;

/// A [`Sink`] that sends spooled records to IoT Hub as device-to-cloud messages: give it to
/// [`SpooledProducer::start_with_sink`](crate::SpooledProducer::start_with_sink).
///
/// Each record is one message, sent with the gateway's or device sender's own pipelining;
/// the outcomes are awaited in the order the records were sent (so records of one device
/// settle in order) and reported to the drain one by one: a record leaves the spool once the
/// hub accepted it.
///
/// # What is retried and what is given up
/// - The hub does not know the device (and the gateway does not create it), the message is
///   over 256 KB, or the device id is one IoT Hub does not allow: the record can never be
///   sent; it is removed and counted failed ([`SpoolReport::failed`](crate::SpoolReport)).
/// - Anything else (connection lost, throttled, credentials refused: a policy without
///   DeviceConnect, a disabled device) keeps the record: the drain closes the gateway,
///   connects a new one with backoff and sends again from the first record not accepted. A
///   refusal that only the operator can lift stays until they do: watch for it with
///   [`IotHubSink::on_outcome`] ([`DeviceOutcome::Retrying`]).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use hubsend::iothub::IotHubBuilder;
/// use hubsend::Event;
/// use hubsend_spool::{IotHubSender, IotHubSink, Route, Spool, SpoolOptions, SpooledProducer};
///
/// let spool = Spool::open("/var/spool/fleet", SpoolOptions::new())?;
/// let policy = std::env::var("IOTHUB_CONNECTION_STRING")?;
/// let sink = IotHubSink::new(move || {
///     let builder = IotHubBuilder::default().connection_string(policy.clone());
///     async move { builder.gateway().await.map(IotHubSender::Gateway) }
/// });
/// let producer = SpooledProducer::start_with_sink(spool, sink);
/// let route = Route::device("boiler-7", Some("Boiler 7".into()));
/// producer.enqueue(Event::new(r#"{"t":71.5}"#), route).await?;
/// let report = producer.close().await;
/// println!("{} sent, {} resumed from a previous run", report.sent, report.resumed);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct IotHubSink {
    connect: ConnectFn,
    observer: Option<Observer>,
}

impl std::fmt::Debug for IotHubSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotHubSink")
            .field("on_outcome", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl IotHubSink {
    /// A sink that calls `connect` for a gateway or device sender, again after each failure
    /// (with backoff from 100 ms to 5 s): the hub need not be reachable now.
    pub fn new<F, Fut>(connect: F) -> IotHubSink
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hubsend::Result<IotHubSender>> + Send + 'static,
    {
        IotHubSink {
            connect: Arc::new(move || Box::pin(connect())),
            observer: None,
        }
    }

    /// Calls `observer` with the device id and the outcome of every record: to count per
    /// device, or to notice a refusal that needs the operator (a policy without
    /// DeviceConnect keeps being retried). It runs on the drain's tasks: keep it short.
    pub fn on_outcome(
        mut self,
        observer: impl Fn(&str, DeviceOutcome<'_>) + Send + Sync + 'static,
    ) -> IotHubSink {
        self.observer = Some(Arc::new(observer));
        self
    }
}

/// Whether the record can never be sent (removed) or may get through later (kept).
fn classify(error: &hubsend::Error) -> NotTaken {
    if permanent(error.kind()) || error.kind() == ErrorKind::NotFound {
        NotTaken::Never
    } else {
        NotTaken::Later
    }
}

fn observe(observer: &Option<Observer>, device: &str, outcome: DeviceOutcome<'_>) {
    if let Some(f) = observer {
        f(device, outcome);
    }
}

/// A sent message whose outcome is awaited.
type Pending = (Ticket, String, DeliveryFuture);

/// One connection of an [`IotHubSink`]: a gateway or device sender, and the task that awaits
/// its outcomes in order.
pub struct IotHubSession {
    sender: IotHubSender,
    pending: mpsc::Sender<Pending>,
    settler: JoinHandle<()>,
    observer: Option<Observer>,
}

impl std::fmt::Debug for IotHubSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotHubSession")
            .field("sender", &self.sender)
            .finish_non_exhaustive()
    }
}

impl Sink for IotHubSink {
    type Session = IotHubSession;

    async fn connect(&self, acks: Acks) -> hubsend::Result<IotHubSession> {
        let sender = (self.connect)().await?;
        let (pending, outcomes) = mpsc::channel(MAX_PENDING);
        let settler = tokio::spawn(settle(outcomes, acks, self.observer.clone()));
        Ok(IotHubSession {
            sender,
            pending,
            settler,
            observer: self.observer.clone(),
        })
    }
}

/// Awaits each sent message's outcome in sending order and reports it.
async fn settle(mut outcomes: mpsc::Receiver<Pending>, acks: Acks, observer: Option<Observer>) {
    while let Some((ticket, device, delivery)) = outcomes.recv().await {
        match delivery.await {
            Ok(()) => {
                acks.accepted([ticket]);
                observe(&observer, &device, DeviceOutcome::Sent);
            }
            Err(e) => match classify(&e) {
                NotTaken::Never => {
                    tracing::warn!(error = %e, "spool: record refused for good; removed");
                    acks.refused([ticket]);
                    observe(&observer, &device, DeviceOutcome::Failed(&e));
                }
                _ => {
                    tracing::debug!(error = %e, "spool: delivery failed; the drain starts over");
                    acks.retry();
                    observe(&observer, &device, DeviceOutcome::Retrying(&e));
                }
            },
        }
    }
}

impl SinkSession for IotHubSession {
    async fn send(&mut self, ticket: Ticket, event: Event, route: Route) -> Result<(), NotTaken> {
        let observer = self.observer.clone();
        let Route::Device { id, name } = route else {
            tracing::warn!("spool: a record without a device route cannot go to IoT Hub; removed");
            return Err(NotTaken::Never);
        };
        let sent = match &self.sender {
            IotHubSender::Device(device) => {
                if device.device_id() != id {
                    tracing::warn!(
                        "spool: a record spooled for another device than this sender's; removed"
                    );
                    return Err(NotTaken::Never);
                }
                device.send(event).await
            }
            IotHubSender::Gateway(gateway) => gateway.send_named(&id, name.as_deref(), event).await,
        };
        match sent {
            Ok(delivery) => {
                if self.pending.send((ticket, id, delivery)).await.is_err() {
                    // The settling task is gone (the runtime is stopping).
                    return Err(NotTaken::Later);
                }
                Ok(())
            }
            Err(e) => {
                let not_taken = classify(&e);
                if not_taken == NotTaken::Never {
                    tracing::warn!(error = %e, "spool: record refused for good; removed");
                    observe(&observer, &id, DeviceOutcome::Failed(&e));
                } else {
                    tracing::debug!(error = %e, "spool: send failed; the drain starts over");
                    observe(&observer, &id, DeviceOutcome::Retrying(&e));
                }
                Err(not_taken)
            }
        }
    }

    async fn close(self, deadline: Duration) {
        let IotHubSession {
            sender,
            pending,
            mut settler,
            ..
        } = self;
        drop(pending);
        if tokio::time::timeout(deadline, &mut settler).await.is_err() {
            settler.abort();
        }
        let closed = match sender {
            IotHubSender::Device(d) => tokio::time::timeout(CLOSE_WITHIN, d.close()).await,
            IotHubSender::Gateway(g) => tokio::time::timeout(CLOSE_WITHIN, g.close()).await,
        };
        if let Ok(Err(e)) = closed {
            tracing::debug!(error = %e, "spool: closing the connection failed");
        }
    }
}
