//! Store and forward for [`hubsend`]: a bounded, crash-safe disk spool in front of
//! [`BufferedProducer`](hubsend::BufferedProducer) or an IoT Hub gateway ([`IotHubSink`]), so
//! a gateway loses nothing across uplink outages, restarts, kills and power cuts.
//!
//! [`SpooledProducer::enqueue`] returns once the event is in the spool (see [`Commit`] for
//! what "in" means: fsynced by group commit, by each call, or written with a background
//! fsync). A drain task reads the spool in order and sends through a `BufferedProducer` (its
//! batching, linger and pipelining), or through any other [`Sink`]
//! ([`SpooledProducer::start_with_sink`]), reconnecting for as long as the hub is
//! unreachable; a record leaves the spool only once the hub accepted it. On start, whatever a
//! previous run left is sent first.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use hubsend::{BufferedOptions, Event, Producer};
//! use hubsend_spool::{Route, Spool, SpoolOptions, SpooledProducer};
//!
//! let spool = Spool::open("/var/spool/telemetry", SpoolOptions::new().max_bytes(256 << 20))?;
//! let connection_string = std::env::var("EVENTHUB_CONNECTION_STRING")?;
//! let producer = SpooledProducer::start(
//!     spool,
//!     move || {
//!         Producer::builder()
//!             .connection_string(connection_string.clone())
//!             .connect()
//!     },
//!     BufferedOptions::new(),
//! );
//! producer
//!     .enqueue(Event::new(r#"{"t":21.5}"#), Route::partition_key("sensor-1"))
//!     .await?;
//! let report = producer.close().await; // waits until the hub has everything
//! println!("{} sent, {} resumed from a previous run", report.sent, report.resumed);
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Nothing accepted is lost** short of the size policy: a record is deleted only after the
//!   hub accepted it, or when [`WhenFull::DropOldest`] drops it (counted).
//! - **At least once.** After a crash, records the hub accepted after the last cursor write
//!   (at most ~100 ms of acknowledgements) are sent again; within one run, a batch that failed
//!   and is retried from the spool skips what was already accepted. With
//!   [`SpooledProducer::start_idempotent`], **exactly once** where the hub still remembers the
//!   producer: what is sent again carries its original sequence numbers and the hub drops
//!   what it has (see [Idempotent producers](#idempotent-producers)).
//! - **Order per route** is the enqueue order, except that a batch that failed after the
//!   producer's retries is sent again after the ones behind it that had already succeeded.
//! - **Bounded**: the segment files never hold more than
//!   [`max_bytes`](SpoolOptions::max_bytes); memory is bounded by the buffered producer's limits,
//!   not by the spool's size or the outage's length.
//! - **Crash safety**: every record carries a CRC-32. On open, a torn or corrupt tail is cut off
//!   and reported ([`Recovery::corrupt`], with file and offset); every record before it is kept.
//!
//! # Layout
//!
//! - `log` (private): segment files, the writer thread, the cursor, recovery; its options
//!   ([`SpoolOptions`], [`Commit`], [`WhenFull`]) are re-exported here.
//! - `producer` (private): [`SpooledProducer`], and the Event Hubs sink in front of
//!   `BufferedProducer`.
//! - `sink` (private): the drain loop, generic over where it sends: [`Sink`], [`SinkSession`],
//!   [`Acks`], [`Ticket`], [`NotTaken`].
//! - `iothub` (private): [`IotHubSink`], the drain to an IoT Hub gateway or device sender
//!   (see [IoT Hub](#iot-hub)).
//! - `record` (private): how an event and its [`Route`] are encoded in a record.
//! - `numbered` (private): the numbers journal and the idempotent drain behind
//!   [`SpooledProducer::start_idempotent`].
//! - `error` (private): [`SpoolError`], [`SpoolErrorKind`], [`CorruptRegion`].
//!
//! # Idempotent producers
//!
//! [`SpooledProducer::start_idempotent`] makes a restart resume **without duplicates** where
//! the hub still remembers the producer. Keeping only the producer state (id, epoch, last
//! sequence number per partition) is not enough for that: after a crash the records that
//! were in flight must reach the hub again *as the same deliveries with the same numbers*,
//! and neither the partition a round-robin record went to nor the numbers a producer hands
//! out (they shift whenever a delivery is refused and the ones behind it are renumbered) can
//! be recomputed. So the spool fixes them on disk before anything is sent:
//!
//! 1. The drain reads records in order and fills one batch per route. When a batch is
//!    complete it knows its partition (a key is hashed, a round-robin batch got its turn when
//!    it was created), takes that partition's next sequence numbers, and appends one entry to
//!    `numbers.log` in the spool directory — partition, producer id, epoch, first number, the
//!    route, and the records' spool positions — fsynced together with the other batches of
//!    the same round (one fsync per round, not per record).
//! 2. Only then is the batch sent, with exactly those numbers
//!    ([`Producer::send_batch_numbered`](hubsend::Producer::send_batch_numbered)); the link
//!    never renumbers such a batch.
//! 3. Once the hub accepts it, its records are acknowledged in the spool and the entry is
//!    dropped (the journal is rewritten with only live entries at every start and once it
//!    passes 8 MiB).
//! 4. On start (after a crash, or when the drain starts over after an outage), the journal
//!    gives each partition's producer id and epoch to the new producer, and every entry whose
//!    records are still in the spool is rebuilt from them and sent first, in number order,
//!    with its original numbers. What the hub stored already it acknowledges as a duplicate
//!    and drops; what it never got it stores. Entries are resent whole (or as their tail,
//!    when the cursor had passed their first records), so a resend never straddles the
//!    hub's last stored number. Then the rest of the spool is numbered as in step 1.
//!
//! **When the hub forgot the producer** (a new producer id or epoch in its attach answer, a
//! refused attach such as `amqp:not-allowed` for an unknown id, a stolen epoch, or the same
//! numbers refused as out of order on two starts in a row): the partition starts afresh under
//! the id the hub gives now; its unaccepted records are numbered again and sent. Nothing is
//! lost, but records the old producer had stored may be stored a second time; they are
//! counted in [`SpoolReport::renumbered`]. The same happens when
//! [`WhenFull::DropOldest`] drops a record that already had numbers (a hole the hub refuses).
//!
//! [`SpoolReport::duplicates_avoided`] counts resent events the hub confirmed it had: when
//! the hub answers a resumed attach with its last stored number, the producer knows which
//! resends are duplicates; a hub that only echoes the number it was given drops them all the
//! same but the count stays lower.
//!
//! # IoT Hub
//!
//! [`SpooledProducer::start_with_sink`] with an [`IotHubSink`] spools device-to-cloud
//! messages: each record's [`Route::device`] names its device (and the name to give it when a
//! gateway with auto-create creates it; the name is kept in the record, so a resumed run
//! names the device as the first would have). The drain sends through a
//! [`Gateway`](hubsend::iothub::Gateway) or a [`DeviceSender`](hubsend::iothub::DeviceSender)
//! that the sink connects (again after each failure), awaits each message's outcome in order,
//! and removes a record once the hub accepted it: at least once, in order per device, with
//! the guarantees above. See the [`IotHubSink`] docs for what is retried and what is given up.
//!
//! [`Spool::set_state`] and [`Spool::state`] keep small JSON values (written atomically,
//! beside the records) for any other state that must survive with them.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]

mod error;
mod iothub;
mod log;
mod numbered;
mod producer;
mod record;
mod sink;

use std::path::Path;
use std::sync::Arc;

pub use error::{CorruptRegion, Result, SpoolError, SpoolErrorKind};
pub use iothub::{DeviceOutcome, IotHubSender, IotHubSession, IotHubSink};
pub use log::{Commit, Recovery, SpoolOptions, WhenFull};
pub use producer::{SpoolReport, SpooledProducer};
pub use record::Route;
pub use sink::{Acks, NotTaken, Sink, SinkSession, Ticket};

/// An open spool directory. Cheap to clone; closed (writer stopped, cursor written) when the
/// last clone and the [`SpooledProducer`] using it are gone.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Closer>,
}

/// Closes the log when the last handle goes.
#[derive(Debug)]
struct Closer {
    log: Arc<log::Log>,
    /// Serialises read-modify-write of the state file.
    state: std::sync::Mutex<()>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.log.close();
    }
}

impl Spool {
    /// Opens `dir` (creating it), locks it against a second user, and recovers what it holds:
    /// see [`recovery`](Self::recovery).
    ///
    /// # Errors
    /// [`SpoolErrorKind::NotWritable`] for a read-only directory or file system,
    /// [`SpoolErrorKind::Locked`] when another spool has it open, [`SpoolErrorKind::Io`]
    /// otherwise.
    pub fn open(dir: impl AsRef<Path>, options: SpoolOptions) -> Result<Spool> {
        let log = log::Log::open(dir.as_ref(), options)?;
        let recovery = log.recovery();
        if recovery.pending > 0 || !recovery.corrupt.is_empty() {
            tracing::info!(
                pending = recovery.pending,
                corrupt = recovery.corrupt.len(),
                lost = recovery.lost,
                dir = %dir.as_ref().display(),
                "spool recovered"
            );
        }
        Ok(Spool {
            inner: Arc::new(Closer {
                log,
                state: std::sync::Mutex::new(()),
            }),
        })
    }

    pub(crate) fn log(&self) -> &Arc<log::Log> {
        &self.inner.log
    }

    /// What was found on open: records left to send, damaged regions cut off.
    pub fn recovery(&self) -> &Recovery {
        self.inner.log.recovery()
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        self.inner.log.dir()
    }

    /// The tag of the last record written (by this run or, after a restart, a previous one):
    /// the input position a resumed reader continues from. See
    /// [`SpooledProducer::enqueue_tagged`].
    pub fn last_tag(&self) -> Option<u64> {
        self.inner.log.counters().3
    }

    /// Bytes the segment files hold now.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.log.counters().1
    }

    /// Records not yet accepted by the hub.
    pub fn pending(&self) -> u64 {
        self.inner.log.counters().0
    }

    /// Stores `value` under `key` (replacing it), durably (written to a new file, fsynced,
    /// renamed), for state that must live with the records: e.g. an idempotent producer's
    /// state per partition.
    ///
    /// # Errors
    /// [`SpoolErrorKind::Io`] or [`SpoolErrorKind::NotWritable`] when the file cannot be
    /// written.
    pub fn set_state(&self, key: &str, value: serde_json::Value) -> Result<()> {
        let _guard = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = self.all_state();
        all.insert(key.to_string(), value);
        let bytes = serde_json::to_vec(&serde_json::Value::Object(all)).map_err(|e| {
            SpoolError::new(SpoolErrorKind::Io, format!("cannot encode state: {e}"))
        })?;
        self.inner.log.write_state_file(&bytes)
    }

    /// The value stored under `key`, if any.
    pub fn state(&self, key: &str) -> Option<serde_json::Value> {
        self.all_state().remove(key)
    }

    fn all_state(&self) -> serde_json::Map<String, serde_json::Value> {
        self.inner
            .log
            .read_state_file()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| match v {
                serde_json::Value::Object(m) => Some(m),
                _ => None,
            })
            .unwrap_or_default()
    }
}
