//! Exactly once across restarts with an idempotent producer: the numbers journal (which
//! records went to which partition with which sequence numbers, under which producer id and
//! epoch) and the drain that sends through it ([`SpooledProducer::start_idempotent`]).
//!
//! The drain batches records itself (one open batch per route), and only when a batch is
//! complete does it take the next sequence numbers of the batch's partition, write them to
//! `numbers.log` (fsynced), and then send the batch with exactly those numbers
//! ([`Producer::send_batch_numbered`]). A delivery the hub may have stored is therefore
//! always sent again as the same events with the same numbers under the same producer id, so
//! the hub drops what it already has. See the [crate docs](crate#idempotent-producers) for the
//! whole design.
//!
//! [`SpooledProducer::start_idempotent`]: crate::SpooledProducer::start_idempotent

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hubsend::{
    BatchOptions, Condition, ErrorKind, Event, EventBatch, PartitionPublishingState, Producer,
    TryAddError,
};
use tokio::sync::{watch, Notify};

use crate::log::{Log, LogReader, Stored};
use crate::producer::{pause, permanent, Counters, RECONNECT_MAX, RECONNECT_MIN};
use crate::record::{self, Reader, Route};

/// The journal's file name in the spool directory.
const FILE: &str = "numbers.log";
/// Past this size the journal is rewritten with only what is still live.
const REWRITE_AT: u64 = 8 << 20;
/// Records read from the spool at a time.
const READ_CHUNK: usize = 1024;
/// How long a partly filled batch waits for more records once the drain has caught up.
const LINGER: Duration = Duration::from_millis(10);
/// Records held in open batches at most before they are all sent.
const MAX_OPEN: usize = 10_000;
/// Drain restarts in a row in which the hub refused a partition's numbers as out of order
/// before the partition starts afresh under a new producer id.
const TROUBLES_BEFORE_REBASE: u32 = 2;

/// A partition's producer id and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    id: i64,
    epoch: i16,
}

/// One delivery's numbers: its records (spool sequence numbers, in order) went to
/// `partition` numbered from `first` under `identity`.
#[derive(Debug, Clone)]
struct Entry {
    partition: String,
    identity: Identity,
    first: i32,
    route: Route,
    seqs: Vec<u64>,
}

/// What the journal knows of one partition.
#[derive(Debug, Clone)]
struct Part {
    identity: Identity,
    /// The number the next delivery starts at.
    next: i32,
    /// The last number the hub confirmed (-1: none known).
    committed: i32,
    /// Drain restarts in a row caused by out-of-order refusals.
    troubles: u32,
}

/// The journal's contents in memory: partitions and the deliveries not yet accepted.
#[derive(Debug, Default)]
pub(crate) struct Table {
    parts: HashMap<String, Part>,
    entries: BTreeMap<u64, Entry>,
    next_entry: u64,
    /// Records in some entry.
    numbered: HashSet<u64>,
    /// Records whose numbers were given up (their partition started afresh).
    pub(crate) renumbered: u64,
}

fn seq_add(s: i32, n: usize) -> i32 {
    ((i64::from(s) + n as i64).rem_euclid(1 << 31)) as i32
}

impl Table {
    fn insert(&mut self, entry: Entry) -> u64 {
        let id = self.next_entry;
        self.next_entry += 1;
        self.numbered.extend(entry.seqs.iter().copied());
        self.entries.insert(id, entry);
        id
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        for s in &entry.seqs {
            self.numbered.remove(s);
        }
        Some(entry)
    }

    /// Gives up `partition`'s numbers: its producer id is forgotten (the next producer gets
    /// a new one) and its unaccepted records will be numbered afresh.
    fn rebase(&mut self, partition: &str) {
        self.parts.remove(partition);
        let void: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.partition == partition)
            .map(|(id, _)| *id)
            .collect();
        for id in void {
            if let Some(e) = self.remove(id) {
                self.renumbered += e.seqs.len() as u64;
            }
        }
    }

    /// Takes what the producer's link for a partition attached with. The same producer id
    /// and epoch: the numbering goes on. Another (the hub assigned a new one, or forgot the
    /// old): the partition starts afresh from the hub's answer.
    fn adopt(&mut self, state: &PartitionPublishingState) {
        let identity = Identity {
            id: state.producer_group_id,
            epoch: state.owner_level,
        };
        let last = state.last_published_sequence_number;
        if let Some(part) = self.parts.get_mut(&state.partition_id) {
            if part.identity == identity {
                return;
            }
            tracing::warn!(
                partition = %state.partition_id,
                "spool: the partition's idempotent producer changed; its unaccepted records are numbered afresh"
            );
        }
        self.rebase(&state.partition_id);
        self.parts.insert(
            state.partition_id.clone(),
            Part {
                identity,
                next: seq_add(last, 1),
                committed: last,
                troubles: 0,
            },
        );
    }

    /// What a new producer is given to continue every known partition.
    fn states(&self) -> Vec<PartitionPublishingState> {
        self.parts
            .iter()
            .map(|(p, part)| {
                PartitionPublishingState::new(
                    p.clone(),
                    part.identity.id,
                    part.identity.epoch,
                    part.committed,
                )
            })
            .collect()
    }

    /// Numbers a delivery of `count` records to `partition` (whose identity is known).
    fn assign(&mut self, partition: &str, count: usize) -> Option<(Identity, i32)> {
        let part = self.parts.get_mut(partition)?;
        let first = part.next;
        part.next = seq_add(first, count);
        Some((part.identity, first))
    }

    /// A delivery was accepted: forget it, remember its numbers as stored.
    fn accepted(&mut self, id: u64) {
        if let Some(e) = self.remove(id) {
            if let Some(part) = self.parts.get_mut(&e.partition) {
                if part.identity == e.identity {
                    part.committed = seq_add(e.first, e.seqs.len().saturating_sub(1));
                    part.troubles = 0;
                }
            }
        }
    }
}

/// The shared journal: its table, and the file (written by the drain only).
#[derive(Debug)]
pub(crate) struct Journal {
    table: Mutex<Table>,
    path: PathBuf,
    file: Mutex<Option<(File, u64)>>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_route(out: &mut Vec<u8>, route: &Route) {
    match route {
        Route::PartitionKey(k) => {
            out.push(1);
            put_str(out, k);
        }
        Route::PartitionId(p) => {
            out.push(2);
            put_str(out, p);
        }
        _ => out.push(0),
    }
}

/// One journal record: length, CRC-32 of the payload, payload.
fn framed(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn encode_part(partition: &str, part: &Part, out: &mut Vec<u8>) {
    let mut p = vec![1u8];
    put_str(&mut p, partition);
    p.extend_from_slice(&part.identity.id.to_le_bytes());
    p.extend_from_slice(&part.identity.epoch.to_le_bytes());
    p.extend_from_slice(&part.next.to_le_bytes());
    p.extend_from_slice(&part.committed.to_le_bytes());
    framed(&p, out);
}

fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    let mut p = vec![2u8];
    put_str(&mut p, &e.partition);
    p.extend_from_slice(&e.identity.id.to_le_bytes());
    p.extend_from_slice(&e.identity.epoch.to_le_bytes());
    p.extend_from_slice(&e.first.to_le_bytes());
    put_route(&mut p, &e.route);
    p.extend_from_slice(&(e.seqs.len() as u32).to_le_bytes());
    for s in &e.seqs {
        p.extend_from_slice(&s.to_le_bytes());
    }
    framed(&p, out);
}

/// A route as the journal writes it (see `encode_entry`).
fn read_route(c: &mut Reader<'_>) -> Option<Route> {
    Some(match c.u8()? {
        1 => Route::PartitionKey(c.string()?),
        2 => Route::PartitionId(c.string()?),
        _ => Route::Any,
    })
}

/// Reads the journal's records up to the first damaged one (a torn tail: a delivery whose
/// numbers were not fully written was never sent).
fn load(bytes: &[u8]) -> Table {
    let mut table = Table::default();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        at += 8 + len;
        let mut c = Reader::new(payload);
        let parsed = (|| -> Option<()> {
            match c.u8()? {
                1 => {
                    let partition = c.string()?;
                    let identity = Identity {
                        id: c.i64()?,
                        epoch: c.i16()?,
                    };
                    let (next, committed) = (c.i32()?, c.i32()?);
                    if table
                        .parts
                        .get(&partition)
                        .is_some_and(|p| p.identity != identity)
                    {
                        // The partition started afresh: its older numbers are void.
                        let renumbered = table.renumbered;
                        table.rebase(&partition);
                        table.renumbered = renumbered;
                    }
                    table.parts.insert(
                        partition,
                        Part {
                            identity,
                            next,
                            committed,
                            troubles: 0,
                        },
                    );
                }
                2 => {
                    let partition = c.string()?;
                    let identity = Identity {
                        id: c.i64()?,
                        epoch: c.i16()?,
                    };
                    let first = c.i32()?;
                    let route = read_route(&mut c)?;
                    let n = c.u32()? as usize;
                    let mut seqs = Vec::with_capacity(n.min(1 << 16));
                    for _ in 0..n {
                        seqs.push(c.u64()?);
                    }
                    let part = table.parts.get_mut(&partition)?;
                    if part.identity != identity {
                        return None;
                    }
                    let after = seq_add(first, seqs.len());
                    if at_or_before(part.next, after) {
                        part.next = after;
                    }
                    table.insert(Entry {
                        partition,
                        identity,
                        first,
                        route,
                        seqs,
                    });
                }
                _ => {}
            }
            Some(())
        })();
        if parsed.is_none() {
            tracing::warn!("spool: a numbers journal record could not be read; skipped");
        }
    }
    table
}

/// Whether `a` lies at or behind `b` on the ring of sequence numbers.
fn at_or_before(a: i32, b: i32) -> bool {
    (i64::from(b) - i64::from(a)).rem_euclid(1 << 31) < (1 << 30)
}

impl Journal {
    /// Opens the journal in `dir` (an absent file is an empty journal).
    pub(crate) fn open(dir: &Path) -> Journal {
        let path = dir.join(FILE);
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&path) {
            let _ = f.read_to_end(&mut bytes);
        }
        Journal {
            table: Mutex::new(load(&bytes)),
            path,
            file: Mutex::new(None),
        }
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the whole table to a new file (fsynced, renamed over the old one).
    fn rewrite(&self) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        {
            let t = self.table();
            for (p, part) in &t.parts {
                encode_part(p, part, &mut bytes);
            }
            for e in t.entries.values() {
                encode_entry(e, &mut bytes);
            }
        }
        let tmp = self.path.with_extension("log.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let f = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some((f, bytes.len() as u64));
        Ok(())
    }

    /// Appends `entries` (and the partitions they number) and fsyncs: after this returns,
    /// they may be sent.
    fn append(&self, entries: &[Entry]) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        {
            let t = self.table();
            let parts: HashSet<&str> = entries.iter().map(|e| e.partition.as_str()).collect();
            for p in parts {
                if let Some(part) = t.parts.get(p) {
                    encode_part(p, part, &mut bytes);
                }
            }
        }
        for e in entries {
            encode_entry(e, &mut bytes);
        }
        let too_big = {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            match file.as_mut() {
                Some((f, written)) if *written < REWRITE_AT => {
                    f.write_all(&bytes)?;
                    f.sync_data()?;
                    *written += bytes.len() as u64;
                    false
                }
                _ => true,
            }
        };
        if too_big {
            // The table holds these entries already.
            self.rewrite()?;
        }
        Ok(())
    }
}

/// A batch being filled for one route.
struct Open {
    route: Route,
    batch: EventBatch,
    seqs: Vec<u64>,
}

/// Why the drain starts over.
struct Restart {
    flag: AtomicBool,
    wake: Notify,
    /// Partitions whose numbers the hub refused as out of order in this run.
    troubled: Mutex<HashSet<String>>,
}

impl Restart {
    fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

fn batch_options(route: &Route, partition: Option<&str>) -> BatchOptions {
    match (route, partition) {
        (Route::PartitionKey(k), _) => BatchOptions::new().partition_key(k.clone()),
        (Route::PartitionId(p), _) => BatchOptions::new().partition_id(p.clone()),
        (_, Some(p)) => BatchOptions::new().partition_id(p.to_owned()),
        _ => BatchOptions::new(),
    }
}

/// Whether an error means the hub no longer knows (or no longer lets us use) the producer
/// id a partition was given: the partition starts afresh.
fn identity_refused(e: &hubsend::Error) -> bool {
    matches!(
        e.condition(),
        Some(Condition::NotAllowed | Condition::ProducerEpochStolen)
    )
}

pub(crate) type Connect = Arc<
    dyn Fn(Vec<PartitionPublishingState>) -> crate::producer::BoxFuture<hubsend::Result<Producer>>
        + Send
        + Sync
        + 'static,
>;

/// The idempotent drain: connect with the journal's producer state, resend what may be
/// unconfirmed with its numbers, then number and send the rest of the spool.
pub(crate) async fn drain(
    log: Arc<Log>,
    journal: Arc<Journal>,
    connect: Connect,
    counters: Arc<Counters>,
    mut stopped: watch::Receiver<bool>,
) {
    let cursor = crate::producer::cursor_task(log.clone(), stopped.clone());
    let mut reader = Some(log.reader());
    let mut delay = RECONNECT_MIN;
    while !*stopped.borrow() {
        let states = journal.table().states();
        let producer = tokio::select! {
            p = connect(states) => p,
            _ = stopped.changed() => break,
        };
        let producer = match producer {
            Ok(p) if p.is_idempotent() => p,
            Ok(p) => {
                tracing::error!(
                    "spool: start_idempotent needs a producer with idempotent retries; not sending"
                );
                let _ = p.close_within(Duration::from_secs(1)).await;
                if pause(RECONNECT_MAX, &mut stopped).await {
                    break;
                }
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "spool: hub not reachable");
                if pause(delay, &mut stopped).await {
                    break;
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        let restart = Arc::new(Restart {
            flag: AtomicBool::new(false),
            wake: Notify::new(),
            troubled: Mutex::new(HashSet::new()),
        });
        let mut run = Run {
            log: &log,
            journal: &journal,
            producer: &producer,
            counters: &counters,
            restart: &restart,
            settling: tokio::task::JoinSet::new(),
        };
        let outcome = run.go(&mut reader, &mut stopped).await;
        // Let what is in flight settle (its acks are recorded), then start over.
        let stopping = *stopped.borrow();
        let deadline = if stopping { 5 } else { 30 };
        let _ = tokio::time::timeout(Duration::from_secs(deadline), async {
            while run.settling.join_next().await.is_some() {}
        })
        .await;
        run.settling.abort_all();
        counters.in_memory.store(0, Ordering::Relaxed);
        counters
            .duplicates_avoided
            .fetch_add(producer.stats().duplicates_avoided, Ordering::Relaxed);
        let _ = producer.close_within(Duration::from_secs(1)).await;
        {
            let mut t = journal.table();
            let refused =
                std::mem::take(&mut *restart.troubled.lock().unwrap_or_else(|p| p.into_inner()));
            for p in refused {
                if let Some(part) = t.parts.get_mut(&p) {
                    part.troubles += 1;
                }
            }
            let troubled: Vec<String> = t
                .parts
                .iter()
                .filter(|(_, p)| p.troubles >= TROUBLES_BEFORE_REBASE)
                .map(|(k, _)| k.clone())
                .collect();
            for p in troubled {
                tracing::warn!(partition = %p, "spool: the hub keeps refusing the partition's numbers; starting it afresh");
                t.rebase(&p);
            }
        }
        if stopping {
            break;
        }
        counters.restarts.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => delay = RECONNECT_MIN,
            Err(e) => tracing::info!(error = %e, "spool: drain restarting"),
        }
        if pause(delay, &mut stopped).await {
            break;
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
    let _ = cursor.await;
}

/// One connected drain run.
struct Run<'a> {
    log: &'a Arc<Log>,
    journal: &'a Arc<Journal>,
    producer: &'a Producer,
    counters: &'a Arc<Counters>,
    restart: &'a Arc<Restart>,
    settling: tokio::task::JoinSet<()>,
}

impl Run<'_> {
    async fn go(
        &mut self,
        reader: &mut Option<LogReader>,
        stopped: &mut watch::Receiver<bool>,
    ) -> std::result::Result<(), String> {
        // Forget deliveries the hub accepted already (their records are behind the
        // watermark: acknowledged before a crash, or in an earlier run).
        {
            let mut t = self.journal.table();
            let done: Vec<u64> = t
                .entries
                .iter()
                .filter(|(_, e)| !e.seqs.iter().any(|s| self.log.is_pending(*s)))
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                t.remove(id);
            }
        }
        // Attach every known partition: the hub's answer says whether it still knows the
        // producer id the journal has for it.
        let known: Vec<String> = self.journal.table().parts.keys().cloned().collect();
        for p in known {
            if let Err(e) = self
                .producer
                .create_batch(BatchOptions::new().partition_id(p.clone()))
                .await
            {
                if identity_refused(&e) || e.kind() == ErrorKind::NotFound {
                    tracing::warn!(partition = %p, error = %e, "spool: the hub does not take the partition's producer state; starting it afresh");
                    self.journal.table().rebase(&p);
                }
                return Err(e.to_string());
            }
        }
        self.adopt();
        // Write the journal afresh.
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || journal.rewrite())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot write the numbers journal: {e}"))?;
        self.replay(reader).await?;
        self.fresh(reader, stopped).await
    }

    /// Takes the producer's current state of every attached partition.
    fn adopt(&self) {
        let states = self.producer.publishing_state();
        let mut t = self.journal.table();
        for s in &states {
            t.adopt(s);
        }
    }

    /// Sends again, with their numbers, the deliveries that may not have been stored.
    async fn replay(&mut self, reader: &mut Option<LogReader>) -> std::result::Result<(), String> {
        let (wanted, last): (HashMap<u64, u64>, u64) = {
            let t = self.journal.table();
            let mut wanted = HashMap::new();
            let mut last = 0;
            for (id, e) in &t.entries {
                for s in &e.seqs {
                    wanted.insert(*s, *id);
                    last = last.max(*s);
                }
            }
            (wanted, last)
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let mut events: HashMap<u64, Vec<(u64, Event)>> = HashMap::new();
        let (mut next, _) = self.log.bounds();
        while next <= last {
            let chunk = read_off_thread(reader, next, READ_CHUNK)
                .await?
                .map_err(|e| e.to_string())?;
            if chunk.is_empty() {
                break;
            }
            for stored in chunk {
                next = stored.seq + 1;
                let Some(entry) = wanted.get(&stored.seq) else {
                    continue;
                };
                if let Some((event, _)) = record::decode(&stored.payload) {
                    events.entry(*entry).or_default().push((stored.seq, event));
                }
            }
        }
        let entries: Vec<(u64, Entry)> = self
            .journal
            .table()
            .entries
            .iter()
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        let mut resent = 0usize;
        for (id, entry) in entries {
            let found = events.remove(&id).unwrap_or_default();
            // What is left of it must be its tail (records before the watermark were
            // accepted with it); anything else is a hole the hub would refuse.
            let skip = entry.seqs.len() - found.len();
            let tail_ok = found
                .iter()
                .map(|(s, _)| *s)
                .eq(entry.seqs[skip..].iter().copied());
            if found.is_empty() {
                self.journal.table().remove(id);
                continue;
            }
            let options = batch_options(&entry.route, Some(&entry.partition));
            let mut batch = self
                .producer
                .create_batch(options)
                .await
                .map_err(|e| e.to_string())?;
            let mut fits = tail_ok && batch.partition() == Some(entry.partition.as_str());
            for (_, event) in found.iter() {
                if !fits {
                    break;
                }
                fits = batch.try_add(event.clone()).is_ok();
            }
            if !fits {
                tracing::warn!(partition = %entry.partition, "spool: a delivery cannot be sent again as it was; the partition starts afresh");
                self.journal.table().rebase(&entry.partition);
                return Err("a delivery could not be rebuilt".into());
            }
            let first = seq_add(entry.first, skip);
            resent += found.len();
            self.submit(id, batch, first, entry.seqs[skip..].to_vec())
                .await?;
        }
        if resent > 0 {
            tracing::info!(
                records = resent,
                "spool: resent unconfirmed deliveries with their sequence numbers"
            );
        }
        Ok(())
    }

    /// Sends a numbered batch and settles it in the background.
    async fn submit(
        &mut self,
        entry: u64,
        batch: EventBatch,
        first: i32,
        seqs: Vec<u64>,
    ) -> std::result::Result<(), String> {
        let partition = batch.partition().unwrap_or_default().to_owned();
        let n = seqs.len() as u64;
        let delivery = match self.producer.send_batch_numbered(batch, first).await {
            Ok(d) => d,
            Err(e) => return Err(e.to_string()),
        };
        self.counters.in_memory.fetch_add(n, Ordering::Relaxed);
        let (log, journal, counters, restart) = (
            self.log.clone(),
            self.journal.clone(),
            self.counters.clone(),
            self.restart.clone(),
        );
        self.settling.spawn(async move {
            let result = delivery.await;
            counters.in_memory.fetch_sub(n, Ordering::Relaxed);
            match result {
                // Acknowledged in the spool before the journal lets go of them, so the
                // reader never sees them unacknowledged and unnumbered.
                Ok(()) => {
                    counters.sent.fetch_add(n, Ordering::Relaxed);
                    log.ack(seqs);
                    journal.table().accepted(entry);
                }
                Err(e) if permanent(e.kind()) => {
                    tracing::warn!(records = n, error = %e, "spool: records can never be sent; removed");
                    counters.failed.fetch_add(n, Ordering::Relaxed);
                    log.ack(seqs);
                    journal.table().remove(entry);
                    restart.request();
                }
                Err(e) => {
                    if e.condition() == Some(&Condition::OutOfOrderSequence) {
                        restart
                            .troubled
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(partition);
                    } else if identity_refused(&e) {
                        journal.table().rebase(&partition);
                    }
                    tracing::debug!(error = %e, "spool: a numbered delivery failed; the drain starts over");
                    restart.request();
                }
            }
        });
        Ok(())
    }

    /// Numbers and sends whatever is left in the spool, then what is written to it.
    async fn fresh(
        &mut self,
        reader: &mut Option<LogReader>,
        stopped: &mut watch::Receiver<bool>,
    ) -> std::result::Result<(), String> {
        let mut open: HashMap<Route, Open> = HashMap::new();
        let mut held = 0usize;
        let (mut next, _) = self.log.bounds();
        loop {
            if self.restart.requested() || *stopped.borrow() {
                return Ok(());
            }
            let appended = self.log.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let chunk = match read_off_thread(reader, next, READ_CHUNK).await? {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, seq = next, "spool: record unreadable; skipped");
                    self.log.ack([next]);
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    next += 1;
                    continue;
                }
            };
            let caught_up = chunk.len() < READ_CHUNK;
            for stored in chunk {
                next = stored.seq + 1;
                if !self.log.is_pending(stored.seq)
                    || self.journal.table().numbered.contains(&stored.seq)
                {
                    continue;
                }
                let Some((event, route)) = record::decode(&stored.payload) else {
                    tracing::warn!(
                        seq = stored.seq,
                        "spool: record in an unknown format; skipped"
                    );
                    self.fail([stored.seq]);
                    continue;
                };
                if matches!(route, Route::Device { .. }) {
                    tracing::warn!(
                        seq = stored.seq,
                        "spool: an IoT Hub device record cannot go to an event hub; removed"
                    );
                    self.fail([stored.seq]);
                    continue;
                }
                let mut event = Some(event);
                while let Some(e) = event.take() {
                    if !open.contains_key(&route) {
                        match self
                            .producer
                            .create_batch(batch_options(&route, None))
                            .await
                        {
                            Ok(batch) => {
                                if let Some(p) = batch.partition() {
                                    if !self.journal.table().parts.contains_key(p) {
                                        self.adopt();
                                    }
                                }
                                open.insert(
                                    route.clone(),
                                    Open {
                                        route: route.clone(),
                                        batch,
                                        seqs: Vec::new(),
                                    },
                                );
                            }
                            Err(err)
                                if permanent(err.kind()) || err.kind() == ErrorKind::NotFound =>
                            {
                                tracing::warn!(seq = stored.seq, error = %err, "spool: record can never be sent; removed");
                                self.fail([stored.seq]);
                                break;
                            }
                            Err(err) => return Err(err.to_string()),
                        }
                    }
                    let Some(slot) = open.get_mut(&route) else {
                        break;
                    };
                    match slot.batch.try_add(e) {
                        Ok(()) => {
                            slot.seqs.push(stored.seq);
                            held += 1;
                        }
                        Err(TryAddError::Full(back)) if !slot.seqs.is_empty() => {
                            if let Some(full) = open.remove(&route) {
                                held -= full.seqs.len();
                                self.flush(vec![full]).await?;
                            }
                            event = Some(back);
                        }
                        Err(_) => {
                            tracing::warn!(
                                seq = stored.seq,
                                "spool: record larger than a batch may be; removed"
                            );
                            self.fail([stored.seq]);
                        }
                    }
                }
            }
            if held >= MAX_OPEN {
                held = 0;
                self.flush(open.drain().map(|(_, o)| o).collect()).await?;
            }
            if !caught_up {
                continue;
            }
            if !open.is_empty() {
                // Wait a little for more, then send what is open.
                let more = tokio::select! {
                    _ = &mut appended => true,
                    _ = tokio::time::sleep(LINGER) => false,
                    _ = self.restart.wake.notified() => false,
                    _ = stopped.changed() => false,
                };
                if !more {
                    held = 0;
                    self.flush(open.drain().map(|(_, o)| o).collect()).await?;
                }
                continue;
            }
            let (watermark, _) = self.log.bounds();
            next = next.max(watermark);
            tokio::select! {
                _ = &mut appended => {}
                _ = self.restart.wake.notified() => {}
                _ = stopped.changed() => {}
            }
        }
    }

    /// Numbers `batches`, writes their numbers to the journal, then sends them.
    async fn flush(&mut self, batches: Vec<Open>) -> std::result::Result<(), String> {
        let mut numbered = Vec::with_capacity(batches.len());
        let mut entries = Vec::with_capacity(batches.len());
        {
            let mut t = self.journal.table();
            for open in batches {
                let Some(partition) = open.batch.partition().map(str::to_owned) else {
                    return Err("an idempotent batch without a partition".into());
                };
                let Some((identity, first)) = t.assign(&partition, open.seqs.len()) else {
                    return Err(format!("no producer state for partition {partition}"));
                };
                let route = match &open.route {
                    Route::Any => Route::PartitionId(partition.clone()),
                    other => other.clone(),
                };
                let entry = Entry {
                    partition,
                    identity,
                    first,
                    route,
                    seqs: open.seqs.clone(),
                };
                entries.push(entry.clone());
                let id = t.insert(entry);
                numbered.push((id, open, first));
            }
        }
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || journal.append(&entries))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot write the numbers journal: {e}"))?;
        for (id, open, first) in numbered {
            self.submit(id, open.batch, first, open.seqs).await?;
        }
        Ok(())
    }

    fn fail(&self, seqs: impl IntoIterator<Item = u64>) {
        let seqs: Vec<u64> = seqs.into_iter().collect();
        self.counters
            .failed
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        self.log.ack(seqs);
    }
}

/// Reads up to `max` records from `from` on, off the async threads. An unreadable record is
/// `Ok(Err(..))`; the reader itself lost (a panicked read) is `Err(..)`.
async fn read_off_thread(
    reader: &mut Option<LogReader>,
    from: u64,
    max: usize,
) -> std::result::Result<std::io::Result<Vec<Stored>>, String> {
    let Some(mut r) = reader.take() else {
        return Err("the spool reader is gone".into());
    };
    let (r, chunk) = tokio::task::spawn_blocking(move || {
        let chunk = r.read(from, max);
        (r, chunk)
    })
    .await
    .map_err(|e| e.to_string())?;
    *reader = Some(r);
    Ok(chunk)
}
