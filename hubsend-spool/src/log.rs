//! The spool's on-disk log: segment files of checksummed records, a writer thread that
//! group-commits appends, a cursor file that remembers what the hub has accepted, and the
//! recovery scan that finds a torn or corrupt tail after a crash.
//!
//! Layout of the spool directory:
//!
//! | file | what |
//! |---|---|
//! | `LOCK` | held (`flock`) while a [`Spool`](crate::Spool) has the directory open |
//! | `{first_seq:020}.seg` | a segment: records `first_seq..` back to back |
//! | `cursor` | every record below this sequence number was accepted (or dropped); its tag |
//! | `state.json` | the application's state blobs ([`Spool::set_state`](crate::Spool::set_state)) |
//!
//! A record is a 24-byte header and the payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | payload length (u32 LE) |
//! | 4..8 | CRC-32 of bytes 8.. (sequence, tag, payload) |
//! | 8..16 | sequence number (u64 LE), one more than the record before |
//! | 16..24 | tag (u64 LE; `u64::MAX` for none): the caller's input position |
//! | 24.. | payload ([`crate::record`]) |
//!
//! Recovery reads each segment front to back and stops at the first record whose length runs
//! past the file, whose checksum fails, or whose sequence number is not the next one: that
//! offset and everything after it is reported ([`CorruptRegion`]) and cut off; every record
//! before it is kept.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::error::{CorruptRegion, Result, SpoolError, SpoolErrorKind};

pub(crate) const HEADER: usize = 24;
const NO_TAG: u64 = u64::MAX;
/// A payload longer than this is taken for a damaged length field (the hub's largest message is
/// 1 MiB; this leaves room for any future limit).
const MAX_PAYLOAD: u32 = 64 * 1024 * 1024;
/// Most requests the writer takes into one write and one fsync.
const MAX_GROUP: usize = 8192;

/// When `enqueue` returns, and when the spool calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Commit {
    /// Group commit: the writer gathers the records that arrive within this interval of the
    /// first, writes them, calls fsync once, then every one of those `enqueue` calls returns.
    /// Survives a power cut. Callers that enqueue one at a time should use
    /// [`enqueue_batch`](crate::SpooledProducer::enqueue_batch) or several tasks.
    Group(Duration),
    /// One fsync per `enqueue` call (requests that queued up while an fsync ran still share
    /// the next one). Survives a power cut; the slowest mode.
    EachCall,
    /// `enqueue` returns once the record is written to the file (the operating system has
    /// it: survives a crash or kill of the process); fsync runs in the background at this
    /// interval, so a power cut can lose up to the last interval.
    Background(Duration),
}

/// What `enqueue` does when the spool is at its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenFull {
    /// Wait until the drain frees space (the default).
    #[default]
    Wait,
    /// Fail at once with [`SpoolErrorKind::Full`].
    Refuse,
    /// Delete the oldest segment (its unsent records are counted in
    /// [`SpoolReport::dropped`](crate::SpoolReport::dropped)) and take the new record.
    DropOldest,
}

/// Tunables of a [`Spool`](crate::Spool).
///
/// | setting | default |
/// |---|---|
/// | [`max_bytes`](Self::max_bytes) | 1 GiB |
/// | [`segment_bytes`](Self::segment_bytes) | max_bytes / 8, between 64 KiB and 64 MiB |
/// | [`commit`](Self::commit) | [`Commit::Group`] of 5 ms |
/// | [`when_full`](Self::when_full) | [`WhenFull::Wait`] |
#[derive(Debug, Clone)]
#[must_use]
pub struct SpoolOptions {
    pub(crate) max_bytes: u64,
    pub(crate) segment_bytes: Option<u64>,
    pub(crate) commit: Commit,
    pub(crate) when_full: WhenFull,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            max_bytes: 1 << 30,
            segment_bytes: None,
            commit: Commit::Group(Duration::from_millis(5)),
            when_full: WhenFull::Wait,
        }
    }
}

impl SpoolOptions {
    /// The defaults listed above.
    pub fn new() -> SpoolOptions {
        SpoolOptions::default()
    }

    /// The most bytes the segment files may hold together (records and their headers). The
    /// directory also holds a 20-byte cursor, the lock file and the state file.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes.max(4096);
        self
    }

    /// The size at which a new segment file is started. Space comes back a segment at a
    /// time (once the hub accepted all of it), and [`WhenFull::DropOldest`] drops a segment
    /// at a time.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = Some(bytes.max(1024));
        self
    }

    /// When `enqueue` returns and when fsync runs.
    pub fn commit(mut self, commit: Commit) -> Self {
        self.commit = commit;
        self
    }

    /// What `enqueue` does at the size limit.
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.when_full = policy;
        self
    }

    fn segment_limit(&self) -> u64 {
        self.segment_bytes
            .unwrap_or((self.max_bytes / 8).clamp(64 * 1024, 64 * 1024 * 1024))
            .min(self.max_bytes / 2)
            .max(1024)
    }
}

/// One segment file as the log knows it.
#[derive(Debug)]
struct Segment {
    first_seq: u64,
    /// One past the last record written (and readable).
    end_seq: u64,
    bytes: u64,
    path: PathBuf,
}

/// What the log has, under one lock.
#[derive(Debug)]
struct State {
    segments: VecDeque<Segment>,
    next_seq: u64,
    /// Every record below this was accepted by the hub or dropped.
    watermark: u64,
    /// Accepted records above the watermark (acks arrive out of order across routes).
    acked_above: BTreeSet<u64>,
    disk_bytes: u64,
    /// Bytes of records admitted but not written yet.
    reserved: u64,
    last_tag: Option<u64>,
    dropped: u64,
    /// The cursor file is behind the watermark.
    cursor_dirty: bool,
    closed: bool,
}

/// A write the writer thread does.
struct Append {
    payload: Vec<u8>,
    tag: u64,
    done: oneshot::Sender<std::io::Result<u64>>,
}

/// The log, shared by the spool handle, the writer thread and the drain.
#[derive(Debug)]
pub(crate) struct Log {
    dir: PathBuf,
    options: SpoolOptions,
    state: Mutex<State>,
    /// Notified when records were written.
    pub(crate) appended: Notify,
    /// Notified when segments were deleted (space for waiting writers) or records acked.
    pub(crate) progress: Notify,
    writer: Mutex<Option<mpsc::Sender<Append>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: File,
    recovery: Recovery,
}

/// What the spool found when it was opened.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Recovery {
    /// Records left from before (not yet accepted by the hub): they are sent first.
    pub pending: u64,
    /// Damaged regions cut off (torn writes, garbage, a truncated file).
    pub corrupt: Vec<CorruptRegion>,
    /// Records lost between segments because a segment's tail was cut off.
    pub lost: u64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Builds the frame of one record.
fn frame(out: &mut Vec<u8>, seq: u64, tag: u64, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One record read back.
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) tag: Option<u64>,
    pub(crate) payload: Vec<u8>,
}

/// Reads the record at the reader's position; `Err(reason)` when it is damaged or absent
/// (`"end"` at a clean end of file).
fn read_frame(r: &mut impl Read, remaining: u64) -> std::result::Result<Stored, &'static str> {
    if remaining == 0 {
        return Err("end");
    }
    if remaining < HEADER as u64 {
        return Err("torn record header");
    }
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header).map_err(|_| "unreadable")?;
    let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
    if len > MAX_PAYLOAD {
        return Err("impossible record length");
    }
    if u64::from(len) > remaining - HEADER as u64 {
        return Err("record runs past the end of the file");
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|_| "unreadable")?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..]);
    hasher.update(&payload);
    if hasher.finalize() != crc {
        return Err("checksum mismatch");
    }
    let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let tag = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
    Ok(Stored {
        seq,
        tag: (tag != NO_TAG).then_some(tag),
        payload,
    })
}

/// The cursor file: watermark, tag (or `NO_TAG`), CRC-32 of both.
fn read_cursor(path: &Path) -> Option<(u64, Option<u64>)> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() != 20 {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    if crc32fast::hash(&bytes[..16]) != crc {
        return None;
    }
    let watermark = u64::from_le_bytes(bytes[0..8].try_into().ok()?);
    let tag = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    Some((watermark, (tag != NO_TAG).then_some(tag)))
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

impl Log {
    /// Opens (creating) the spool directory, locks it and recovers what it holds.
    pub(crate) fn open(dir: &Path, options: SpoolOptions) -> Result<Arc<Log>> {
        std::fs::create_dir_all(dir).map_err(|e| SpoolError::io("cannot create", dir, e))?;
        let meta = std::fs::metadata(dir).map_err(|e| SpoolError::io("cannot read", dir, e))?;
        // A directory whose mode grants no write access is refused even when the process
        // could write anyway (root): the operator marked it read-only.
        if meta.permissions().readonly() {
            return Err(SpoolError::new(
                SpoolErrorKind::NotWritable,
                format!("{} is read-only", dir.display()),
            ));
        }
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| SpoolError::io("cannot create", &lock_path, e))?;
        lock_file.try_lock().map_err(|_| {
            SpoolError::new(
                SpoolErrorKind::Locked,
                format!("{} is open in another spool", dir.display()),
            )
        })?;

        let mut recovery = Recovery::default();
        let cursor = read_cursor(&dir.join("cursor"));
        let (mut watermark, cursor_tag) = cursor.unwrap_or((0, None));
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| SpoolError::io("cannot list", dir, e))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        firsts.sort_unstable();
        let mut segments = VecDeque::new();
        let mut last_tag = cursor_tag;
        let mut expected: Option<u64> = None;
        for first in firsts {
            let path = segment_path(dir, first);
            let (end_seq, good_bytes, tag, damage) = scan_segment(&path, first)?;
            if let Some(region) = damage {
                tracing::warn!(
                    file = %region.file.display(),
                    offset = region.offset,
                    skipped_bytes = region.skipped_bytes,
                    reason = region.reason,
                    "spool: corrupt tail cut off"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| SpoolError::io("cannot repair", &path, e))?;
                f.set_len(good_bytes)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| SpoolError::io("cannot repair", &path, e))?;
                recovery.corrupt.push(region);
            }
            if let Some(exp) = expected {
                if first > exp {
                    recovery.lost += first - exp.max(watermark).min(first);
                }
            }
            expected = Some(end_seq);
            if end_seq <= watermark || good_bytes == 0 {
                // Fully accepted before the crash (or empty): its deletion did not happen.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if tag.is_some() {
                last_tag = tag;
            }
            segments.push_back(Segment {
                first_seq: first,
                end_seq,
                bytes: good_bytes,
                path,
            });
        }
        if let Some(first) = segments.front() {
            watermark = watermark.max(first.first_seq);
        }
        let next_seq = segments.back().map(|s| s.end_seq).unwrap_or(watermark);
        recovery.pending = next_seq - watermark;
        let disk_bytes = segments.iter().map(|s| s.bytes).sum();
        let state = State {
            segments,
            next_seq,
            watermark,
            acked_above: BTreeSet::new(),
            disk_bytes,
            reserved: 0,
            last_tag,
            dropped: 0,
            cursor_dirty: true,
            closed: false,
        };
        let log = Arc::new(Log {
            dir: dir.to_path_buf(),
            options,
            state: Mutex::new(state),
            appended: Notify::new(),
            progress: Notify::new(),
            writer: Mutex::new(None),
            writer_thread: Mutex::new(None),
            _lock: lock_file,
            recovery,
        });
        // Proves the directory writable now, not at the first enqueue.
        log.persist_cursor()?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            log: log.clone(),
            file: None,
        };
        let thread = std::thread::Builder::new()
            .name("hubsend-spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| SpoolError::io("cannot start the writer for", dir, e))?;
        *log.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        *log.writer_thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(log)
    }

    pub(crate) fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Admits a record of `payload_len` bytes under the size policy.
    pub(crate) async fn reserve(&self, payload_len: usize) -> Result<()> {
        let need = (payload_len + HEADER) as u64;
        if need > self.options.max_bytes {
            return Err(SpoolError::new(
                SpoolErrorKind::TooLarge,
                format!(
                    "a {payload_len}-byte record exceeds the spool's {} bytes",
                    self.options.max_bytes
                ),
            ));
        }
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = lock(&self.state);
                if s.closed {
                    return Err(SpoolError::new(
                        SpoolErrorKind::Closed,
                        "the spool is closed",
                    ));
                }
                if s.disk_bytes + s.reserved + need <= self.options.max_bytes {
                    s.reserved += need;
                    return Ok(());
                }
                match self.options.when_full {
                    WhenFull::Wait => {}
                    WhenFull::Refuse => {
                        return Err(SpoolError::new(
                            SpoolErrorKind::Full,
                            format!(
                                "{} holds {} of {} bytes",
                                self.dir.display(),
                                s.disk_bytes,
                                self.options.max_bytes
                            ),
                        ))
                    }
                    WhenFull::DropOldest => {
                        if self.drop_oldest(&mut s) {
                            continue;
                        }
                    }
                }
            }
            notified.await;
        }
    }

    /// Deletes the oldest segment that is not being written; false if there is none.
    fn drop_oldest(&self, s: &mut State) -> bool {
        if s.segments.len() < 2 {
            return false;
        }
        let Some(seg) = s.segments.pop_front() else {
            return false;
        };
        let from = seg.first_seq.max(s.watermark);
        let acked = s.acked_above.range(from..seg.end_seq).count() as u64;
        let unsent = seg.end_seq.saturating_sub(from).saturating_sub(acked);
        s.dropped += unsent;
        s.watermark = s.watermark.max(seg.end_seq);
        s.acked_above = s.acked_above.split_off(&s.watermark);
        s.disk_bytes -= seg.bytes;
        s.cursor_dirty = true;
        tracing::warn!(records = unsent, file = %seg.path.display(), "spool full: oldest segment dropped");
        let _ = std::fs::remove_file(&seg.path);
        true
    }

    /// Hands a record to the writer; resolves with its sequence number when it is committed.
    pub(crate) fn append(
        &self,
        payload: Vec<u8>,
        tag: Option<u64>,
    ) -> Result<oneshot::Receiver<std::io::Result<u64>>> {
        let (done, rx) = oneshot::channel();
        let sent = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|w| {
                w.send(Append {
                    payload,
                    tag: tag.unwrap_or(NO_TAG),
                    done,
                })
                .is_ok()
            })
            .unwrap_or(false);
        if !sent {
            return Err(SpoolError::new(
                SpoolErrorKind::Closed,
                "the spool is closed",
            ));
        }
        Ok(rx)
    }

    /// Marks `seqs` accepted (or failed for good); frees segments the watermark passed.
    pub(crate) fn ack(&self, seqs: impl IntoIterator<Item = u64>) {
        let removed: Vec<PathBuf> = {
            let mut s = lock(&self.state);
            for seq in seqs {
                if seq >= s.watermark {
                    s.acked_above.insert(seq);
                }
            }
            let before = s.watermark;
            while s.acked_above.first() == Some(&s.watermark) {
                s.acked_above.pop_first();
                s.watermark += 1;
            }
            if s.watermark != before {
                s.cursor_dirty = true;
            }
            let mut removed = Vec::new();
            // Never the last segment: the writer appends to it.
            while s.segments.len() > 1 && s.segments.front().map(|f| f.end_seq) <= Some(s.watermark)
            {
                if let Some(seg) = s.segments.pop_front() {
                    s.disk_bytes -= seg.bytes;
                    removed.push(seg.path);
                }
            }
            removed
        };
        for path in &removed {
            let _ = std::fs::remove_file(path);
        }
        self.progress.notify_waiters();
    }

    /// Whether `seq` still has to be sent (not accepted, not dropped).
    pub(crate) fn is_pending(&self, seq: u64) -> bool {
        let s = lock(&self.state);
        seq >= s.watermark && !s.acked_above.contains(&seq)
    }

    /// The first record not yet accepted, and one past the last written.
    pub(crate) fn bounds(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.watermark, s.next_seq)
    }

    /// Writes the cursor file if the watermark moved since the last time.
    pub(crate) fn persist_cursor(&self) -> Result<()> {
        let (watermark, tag) = {
            let mut s = lock(&self.state);
            if !s.cursor_dirty {
                return Ok(());
            }
            s.cursor_dirty = false;
            (s.watermark, s.last_tag)
        };
        let mut bytes = Vec::with_capacity(20);
        bytes.extend_from_slice(&watermark.to_le_bytes());
        bytes.extend_from_slice(&tag.unwrap_or(NO_TAG).to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        write_atomically(&self.dir, "cursor", &bytes).map_err(|e| {
            lock(&self.state).cursor_dirty = true;
            SpoolError::io("cannot write the cursor in", &self.dir, e)
        })
    }

    pub(crate) fn write_state_file(&self, bytes: &[u8]) -> Result<()> {
        write_atomically(&self.dir, "state.json", bytes)
            .map_err(|e| SpoolError::io("cannot write the state in", &self.dir, e))
    }

    pub(crate) fn read_state_file(&self) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join("state.json")).ok()
    }

    /// Counters for the report: (pending records, disk bytes, dropped, last tag).
    pub(crate) fn counters(&self) -> (u64, u64, u64, Option<u64>) {
        let s = lock(&self.state);
        let pending = (s.next_seq - s.watermark).saturating_sub(s.acked_above.len() as u64);
        (pending, s.disk_bytes, s.dropped, s.last_tag)
    }

    /// A reader over written records, starting at `seq`.
    pub(crate) fn reader(self: &Arc<Self>) -> LogReader {
        LogReader {
            log: self.clone(),
            open: None,
        }
    }

    /// Stops the writer (after it committed everything queued) and writes the cursor.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.progress.notify_waiters();
        drop(self.writer.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        if let Err(e) = self.persist_cursor() {
            tracing::warn!(error = %e, "spool: cursor not written at close");
        }
    }

    fn segment_of(&self, seq: u64) -> Option<(u64, u64, PathBuf)> {
        let s = lock(&self.state);
        s.segments
            .iter()
            .find(|g| g.first_seq <= seq && seq < g.end_seq)
            .or_else(|| {
                s.segments
                    .iter()
                    .find(|g| g.first_seq > seq && g.end_seq > g.first_seq)
            })
            .map(|g| (g.first_seq, g.end_seq, g.path.clone()))
    }

    fn segment_end(&self, first_seq: u64) -> Option<(u64, u64)> {
        let s = lock(&self.state);
        s.segments
            .iter()
            .find(|g| g.first_seq == first_seq)
            .map(|g| (g.end_seq, g.bytes))
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        drop(self.writer.get_mut().map(|w| w.take()));
    }
}

/// Scans a segment: (end_seq, bytes of good records, last tag, damage found).
fn scan_segment(path: &Path, first: u64) -> Result<(u64, u64, Option<u64>, Option<CorruptRegion>)> {
    let file = File::open(path).map_err(|e| SpoolError::io("cannot open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| SpoolError::io("cannot read", path, e))?
        .len();
    let mut r = BufReader::with_capacity(1 << 16, file);
    let mut offset = 0u64;
    let mut seq = first;
    let mut tag = None;
    loop {
        match read_frame(&mut r, len - offset) {
            Ok(rec) if rec.seq == seq => {
                offset += (HEADER + rec.payload.len()) as u64;
                seq += 1;
                if rec.tag.is_some() {
                    tag = rec.tag;
                }
            }
            other => {
                let reason = match other {
                    Err("end") => return Ok((seq, offset, tag, None)),
                    Err(reason) => reason,
                    Ok(_) => "sequence number out of order",
                };
                let region = CorruptRegion {
                    file: path.to_path_buf(),
                    offset,
                    skipped_bytes: len - offset,
                    reason,
                };
                return Ok((seq, offset, tag, Some(region)));
            }
        }
    }
}

/// The writer thread: owns the segment being written.
struct Writer {
    log: Arc<Log>,
    file: Option<(u64, File)>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Append>) {
        let commit = self.log.options.commit;
        let mut last_sync = Instant::now();
        let mut dirty = false;
        let mut buf = Vec::with_capacity(1 << 20);
        loop {
            let first = match commit {
                Commit::Background(interval) if dirty => {
                    let wait = interval.saturating_sub(last_sync.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(a) => a,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.sync();
                            dirty = false;
                            last_sync = Instant::now();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(a) => a,
                    Err(_) => break,
                },
            };
            let mut group = vec![first];
            match commit {
                Commit::Group(interval) => {
                    let until = Instant::now() + interval;
                    while group.len() < MAX_GROUP {
                        let left = until.saturating_duration_since(Instant::now());
                        let next = if left.is_zero() {
                            rx.try_recv().ok()
                        } else {
                            rx.recv_timeout(left).ok()
                        };
                        match next {
                            Some(a) => group.push(a),
                            None => break,
                        }
                    }
                }
                Commit::EachCall | Commit::Background(_) => {
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(a) => group.push(a),
                            Err(_) => break,
                        }
                    }
                }
            }
            let result = self.write_group(&mut buf, &group);
            let synced = match (&result, commit) {
                (Ok(_), Commit::Background(interval)) => {
                    dirty = true;
                    if last_sync.elapsed() >= interval {
                        self.sync();
                        dirty = false;
                        last_sync = Instant::now();
                    }
                    Ok(())
                }
                (Ok(_), _) => self.sync_checked(),
                (Err(_), _) => Ok(()),
            };
            match (result, synced) {
                (Ok(first_seq), Ok(())) => {
                    for (i, a) in group.into_iter().enumerate() {
                        let _ = a.done.send(Ok(first_seq + i as u64));
                    }
                }
                (Err(e), _) | (Ok(_), Err(e)) => {
                    tracing::warn!(error = %e, "spool: write failed");
                    for a in group {
                        let _ = a
                            .done
                            .send(Err(std::io::Error::new(e.kind(), e.to_string())));
                    }
                }
            }
        }
        self.sync();
    }

    fn sync(&mut self) {
        if let Err(e) = self.sync_checked() {
            tracing::warn!(error = %e, "spool: fsync failed");
        }
    }

    fn sync_checked(&mut self) -> std::io::Result<()> {
        match &self.file {
            Some((_, f)) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Writes `group` to the active segment (starting a new one when it is full); returns the
    /// first sequence number. The state learns of the records only once they are written.
    fn write_group(&mut self, buf: &mut Vec<u8>, group: &[Append]) -> std::io::Result<u64> {
        let limit = self.log.options.segment_limit();
        let (first_seq, active_bytes, reserved) = {
            let s = lock(&self.log.state);
            let active = s.segments.back();
            let active_bytes = match (&self.file, active) {
                (Some((first, _)), Some(seg)) if seg.first_seq == *first => Some(seg.bytes),
                (None, Some(seg)) if seg.end_seq == s.next_seq => Some(seg.bytes),
                _ => None,
            };
            let reserved: u64 = group
                .iter()
                .map(|a| (a.payload.len() + HEADER) as u64)
                .sum();
            (s.next_seq, active_bytes, reserved)
        };
        let roll = active_bytes.is_none_or(|b| b >= limit);
        if roll {
            if let Some((_, f)) = self.file.take() {
                f.sync_data()?;
            }
            let path = segment_path(&self.log.dir, first_seq);
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            sync_dir(&self.log.dir)?;
            self.file = Some((first_seq, f));
            lock(&self.log.state).segments.push_back(Segment {
                first_seq,
                end_seq: first_seq,
                bytes: 0,
                path,
            });
        } else if self.file.is_none() {
            // Reopened after recovery: append to the last segment.
            let path = segment_path(
                &self.log.dir,
                lock(&self.log.state)
                    .segments
                    .back()
                    .map(|s| s.first_seq)
                    .unwrap_or(first_seq),
            );
            let f = OpenOptions::new().append(true).open(&path)?;
            let first = lock(&self.log.state)
                .segments
                .back()
                .map(|s| s.first_seq)
                .unwrap_or(first_seq);
            self.file = Some((first, f));
        }
        buf.clear();
        let mut last_tag = None;
        for (i, a) in group.iter().enumerate() {
            frame(buf, first_seq + i as u64, a.tag, &a.payload);
            if a.tag != NO_TAG {
                last_tag = Some(a.tag);
            }
        }
        let written = match &mut self.file {
            Some((_, f)) => f.write_all(buf),
            None => Ok(()),
        };
        let mut s = lock(&self.log.state);
        s.reserved = s.reserved.saturating_sub(reserved);
        written?;
        let n = group.len() as u64;
        s.next_seq += n;
        s.disk_bytes += buf.len() as u64;
        if last_tag.is_some() {
            s.last_tag = last_tag;
        }
        if let Some(seg) = s.segments.back_mut() {
            seg.end_seq += n;
            seg.bytes += buf.len() as u64;
        }
        drop(s);
        self.log.appended.notify_waiters();
        Ok(first_seq)
    }
}

/// Reads written records in order; keeps one segment file open.
pub(crate) struct LogReader {
    log: Arc<Log>,
    /// (segment first_seq, reader, offset in file, next seq at that offset)
    open: Option<(u64, BufReader<File>, u64, u64)>,
}

impl LogReader {
    /// Up to `max` records from `from` on (fewer at the end of what is written). Records the
    /// drop-oldest policy removed are skipped over.
    pub(crate) fn read(&mut self, from: u64, max: usize) -> std::io::Result<Vec<Stored>> {
        let mut out = Vec::new();
        let mut seq = from;
        while out.len() < max {
            let positioned =
                matches!(&self.open, Some((first, _, _, next)) if *next == seq && *first <= seq);
            if !positioned {
                let Some((first, end, path)) = self.log.segment_of(seq) else {
                    break;
                };
                seq = seq.max(first);
                if seq >= end {
                    break;
                }
                let mut r = BufReader::with_capacity(1 << 16, File::open(&path)?);
                let mut offset = 0u64;
                let mut next = first;
                // Skip to `seq` (only after a rewind or a drop).
                while next < seq {
                    let mut header = [0u8; HEADER];
                    r.read_exact(&mut header)?;
                    let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
                    r.seek_relative(i64::from(len))?;
                    offset += (HEADER as u64) + u64::from(len);
                    next += 1;
                }
                self.open = Some((first, r, offset, next));
            }
            let Some((first, r, offset, next)) = &mut self.open else {
                break;
            };
            let Some((end, bytes)) = self.log.segment_end(*first) else {
                // The segment was dropped under us.
                self.open = None;
                continue;
            };
            if *next >= end {
                // Everything written here is read; move on if a later segment exists.
                let (_, next_seq) = self.log.bounds();
                if *next < next_seq && self.log.segment_of(*next).is_some_and(|g| g.0 != *first) {
                    self.open = None;
                    continue;
                }
                break;
            }
            match read_frame(r, bytes - *offset) {
                Ok(rec) => {
                    *offset += (HEADER + rec.payload.len()) as u64;
                    *next += 1;
                    seq = *next;
                    out.push(rec);
                }
                Err(reason) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("spool record {next} unreadable: {reason}"),
                    ))
                }
            }
        }
        // The seek position may be stale if the file was reopened; keep the offset honest.
        if let Some((_, r, offset, _)) = &mut self.open {
            if r.stream_position().ok() != Some(*offset) {
                self.open = None;
            }
        }
        Ok(out)
    }
}
