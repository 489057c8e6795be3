use std::path::{Path, PathBuf};
use std::time::Instant;

const N: usize = 100_000;
const GROUP: usize = 1000;
const SYNC_N: usize = 500;
const REC: usize = 256;

fn rec(i: usize) -> Vec<u8> {
    let mut v = format!("{{\"n\":{i},\"v\":").into_bytes();
    v.resize(REC, b'x');
    v
}

fn dir_bytes(p: &Path) -> u64 {
    let mut t = 0;
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        t += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    t
}

fn fresh(name: &str) -> PathBuf {
    let p = PathBuf::from(format!("spool-eval-data/{name}"));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn report(name: &str, what: &str, n: usize, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "{name:10} {what:28} {:>10.0} rec/s ({n} in {s:.2}s)",
        n as f64 / s
    );
}

/// Largest file in a dir (the data file to damage).
fn biggest(p: &Path) -> PathBuf {
    let mut best = (0, p.to_path_buf());
    fn walk(p: &Path, best: &mut (u64, PathBuf)) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                walk(&e.path(), best)
            } else if m.len() >= best.0 {
                *best = (m.len(), e.path())
            }
        }
    }
    walk(p, &mut best);
    best.1
}

/// Overwrites 16 bytes inside the last record written ("{\"n\":9999,"), wherever it is.
fn damage_last_record(p: &Path) {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            if e.metadata().unwrap().is_dir() {
                walk(&e.path(), out)
            } else {
                out.push(e.path())
            }
        }
    }
    let mut files = Vec::new();
    walk(p, &mut files);
    let pat = b"{\"n\":9999,";
    for f in files {
        let mut b = std::fs::read(&f).unwrap();
        if let Some(pos) = b.windows(pat.len()).rposition(|w| w == pat) {
            for x in &mut b[pos + 20..pos + 36] {
                *x ^= 0x5A;
            }
            std::fs::write(&f, &b).unwrap();
            println!(
                "           corrupted last record in {} at {}",
                f.display(),
                pos
            );
        }
    }
}

fn damage_tail(p: &Path, garbage: bool) {
    use std::io::Write;
    let f = biggest(p);
    let len = f.metadata().unwrap().len();
    if garbage {
        let mut h = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        use std::io::Seek;
        h.seek(std::io::SeekFrom::Start(len.saturating_sub(200)))
            .unwrap();
        h.write_all(&[0xA5; 200]).unwrap();
    } else {
        let h = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        h.set_len(len.saturating_sub(100)).unwrap();
    }
    println!(
        "           damaged {} ({} bytes) {}",
        f.display(),
        len,
        if garbage {
            "overwrote last 200 bytes"
        } else {
            "truncated 100 bytes"
        }
    );
}

mod r {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("q");
    pub fn run() {
        let d = fresh("redb");
        let path = d.join("q.redb");
        let db = Database::create(&path).unwrap();
        let t = Instant::now();
        for g in 0..N / GROUP {
            let w = db.begin_write().unwrap();
            {
                let mut tb = w.open_table(T).unwrap();
                for i in g * GROUP..(g + 1) * GROUP {
                    tb.insert(i as u64, rec(i).as_slice()).unwrap();
                }
            }
            w.commit().unwrap();
        }
        report("redb", "append, commit/1000", N, t);
        println!(
            "           disk bytes/rec {:.1}",
            dir_bytes(&d) as f64 / N as f64
        );
        let t = Instant::now();
        for i in N..N + SYNC_N {
            let w = db.begin_write().unwrap();
            {
                let mut tb = w.open_table(T).unwrap();
                tb.insert(i as u64, rec(i).as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        report("redb", "append, commit each", SYNC_N, t);
        let t = Instant::now();
        let mut seen = 0;
        loop {
            let keys: Vec<u64> = {
                let rtx = db.begin_read().unwrap();
                let tb = rtx.open_table(T).unwrap();
                tb.iter()
                    .unwrap()
                    .take(GROUP)
                    .map(|kv| {
                        let kv = kv.unwrap();
                        std::hint::black_box(kv.1.value().len());
                        kv.0.value()
                    })
                    .collect()
            };
            if keys.is_empty() {
                break;
            }
            seen += keys.len();
            let w = db.begin_write().unwrap();
            {
                let mut tb = w.open_table(T).unwrap();
                for k in keys {
                    tb.remove(k).unwrap();
                }
            }
            w.commit().unwrap();
        }
        report("redb", "read+remove, commit/1000", seen, t);
        // crash: 10k then damage
        for mode in 0..3 {
            let garbage = mode == 0;
            drop(std::fs::remove_file(&path));
            {
                let db = Database::create(&path).unwrap();
                for g in 0..10 {
                    let w = db.begin_write().unwrap();
                    {
                        let mut tb = w.open_table(T).unwrap();
                        for i in g * GROUP..(g + 1) * GROUP {
                            tb.insert(i as u64, rec(i).as_slice()).unwrap();
                        }
                    }
                    w.commit().unwrap();
                }
            }
            if mode == 2 {
                damage_last_record(&d)
            } else {
                damage_tail(&d, garbage)
            }
            match Database::create(&path) {
                Ok(db) => {
                    let rtx = db.begin_read().unwrap();
                    match rtx.open_table(T) {
                        Ok(tb) => {
                            let n = tb.len().unwrap();
                            let mut ok = 0;
                            let mut err = None;
                            for kv in tb.iter().unwrap() {
                                match kv {
                                    Ok(kv) => {
                                        if kv.1.value() == rec(kv.0.value() as usize).as_slice() {
                                            ok += 1
                                        }
                                    }
                                    Err(e) => {
                                        err = Some(e.to_string());
                                        break;
                                    }
                                }
                            }
                            println!("           reopened: {n} records, {ok} intact, iter error: {err:?}")
                        }
                        Err(e) => println!("           reopened, table error: {e}"),
                    }
                }
                Err(e) => println!("           reopen error: {e}"),
            }
        }
    }
}

mod f {
    use super::*;
    use fjall::{Database, KeyspaceCreateOptions, PersistMode};
    pub fn run() {
        let d = fresh("fjall");
        let t;
        {
            let db = Database::builder(&d).open().unwrap();
            let ks = db.keyspace("q", KeyspaceCreateOptions::default).unwrap();
            t = Instant::now();
            for i in 0..N {
                ks.insert((i as u64).to_be_bytes(), rec(i)).unwrap();
                if (i + 1) % GROUP == 0 {
                    db.persist(PersistMode::SyncAll).unwrap();
                }
            }
            report("fjall", "append, persist/1000", N, t);
            println!(
                "           disk bytes/rec {:.1}",
                dir_bytes(&d) as f64 / N as f64
            );
            let t = Instant::now();
            for i in N..N + SYNC_N {
                ks.insert((i as u64).to_be_bytes(), rec(i)).unwrap();
                db.persist(PersistMode::SyncAll).unwrap();
            }
            report("fjall", "append, persist each", SYNC_N, t);
            let t = Instant::now();
            let mut seen = 0;
            loop {
                let keys: Vec<_> = ks
                    .iter()
                    .take(GROUP)
                    .map(|kv| {
                        let (k, v) = kv.into_inner().unwrap();
                        std::hint::black_box(v.len());
                        k
                    })
                    .collect();
                if keys.is_empty() {
                    break;
                }
                seen += keys.len();
                for k in keys {
                    ks.remove(k).unwrap();
                }
                db.persist(PersistMode::SyncAll).unwrap();
            }
            report("fjall", "read+remove, persist/1000", seen, t);
        }
        for mode in 0..3 {
            let garbage = mode == 0;
            let d = fresh(&format!("fjall-crash-{mode}"));
            {
                let db = Database::builder(&d).open().unwrap();
                let ks = db.keyspace("q", KeyspaceCreateOptions::default).unwrap();
                for i in 0..10_000 {
                    ks.insert((i as u64).to_be_bytes(), rec(i)).unwrap();
                }
                db.persist(PersistMode::SyncAll).unwrap();
            }
            if mode == 2 {
                damage_last_record(&d)
            } else {
                damage_tail(&d, garbage)
            }
            match Database::builder(&d).open() {
                Ok(db) => {
                    let ks = db.keyspace("q", KeyspaceCreateOptions::default).unwrap();
                    let mut ok = 0;
                    let mut n = 0;
                    for kv in ks.iter() {
                        n += 1;
                        if let Ok((k, v)) = kv.into_inner() {
                            if &*v
                                == rec(u64::from_be_bytes(k[..8].try_into().unwrap()) as usize)
                                    .as_slice()
                            {
                                ok += 1
                            }
                        }
                    }
                    println!("           reopened: {n} records, {ok} intact")
                }
                Err(e) => println!("           reopen error: {e:?}"),
            }
        }
    }
}

mod q {
    use super::*;
    use queue_file::QueueFile;
    pub fn run() {
        let d = fresh("queue-file");
        let path = d.join("q");
        let mut qf = QueueFile::open(&path).unwrap();
        let t = Instant::now();
        for g in 0..N / GROUP {
            qf.add_n((g * GROUP..(g + 1) * GROUP).map(rec)).unwrap();
        }
        report("queue-file", "append, add_n(1000) synced", N, t);
        println!(
            "           disk bytes/rec {:.1}",
            dir_bytes(&d) as f64 / N as f64
        );
        let t = Instant::now();
        for i in N..N + SYNC_N {
            qf.add(&rec(i)).unwrap();
        }
        report("queue-file", "append, add each synced", SYNC_N, t);
        let t = Instant::now();
        let mut seen = 0;
        while !qf.is_empty() {
            let n = qf
                .iter()
                .take(GROUP)
                .map(|b| std::hint::black_box(b.len()))
                .count();
            qf.remove_n(n).unwrap();
            seen += n;
        }
        report("queue-file", "read+remove_n(1000)", seen, t);
        for mode in 0..3 {
            let garbage = mode == 0;
            let _ = std::fs::remove_file(&path);
            {
                let mut qf = QueueFile::open(&path).unwrap();
                for g in 0..10 {
                    qf.add_n((g * GROUP..(g + 1) * GROUP).map(rec)).unwrap();
                }
            }
            if mode == 2 {
                damage_last_record(&d)
            } else {
                damage_tail(&d, garbage)
            }
            match QueueFile::open(&path) {
                Ok(qf) => {
                    let ok = qf
                        .iter()
                        .enumerate()
                        .filter(|(i, b)| **b == *rec(*i))
                        .count();
                    println!(
                        "           reopened: {} elements, {} intact of 10000",
                        qf.size(),
                        ok
                    )
                }
                Err(e) => println!("           reopen error: {e}"),
            }
        }
    }
}

mod y {
    use super::*;
    pub async fn run() {
        let d = fresh("yaque");
        let (mut tx, mut rx) = yaque::channel(&d).unwrap();
        let t = Instant::now();
        for g in 0..N / GROUP {
            tx.send_batch((g * GROUP..(g + 1) * GROUP).map(rec))
                .await
                .unwrap();
        }
        report("yaque", "append, send_batch (no fsync)", N, t);
        println!(
            "           disk bytes/rec {:.1}",
            dir_bytes(&d) as f64 / N as f64
        );
        let t = Instant::now();
        let mut seen = 0;
        while seen < N {
            let g = rx.recv_batch(GROUP).await.unwrap();
            seen += g.len();
            g.commit().unwrap();
        }
        report("yaque", "recv_batch+commit", seen, t);
    }
}

mod o {
    use super::*;
    use okaywal::{Entry, EntryId, LogManager, SegmentReader, WriteAheadLog};
    #[derive(Debug, Default)]
    struct M(usize);
    impl LogManager for M {
        fn recover(&mut self, e: &mut Entry<'_>) -> std::io::Result<()> {
            if let Some(c) = e.read_all_chunks()? {
                self.0 += c.len();
            }
            Ok(())
        }
        fn checkpoint_to(
            &mut self,
            _: EntryId,
            _: &mut SegmentReader,
            _: &WriteAheadLog,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }
    pub fn run() {
        let d = fresh("okaywal");
        let wal = WriteAheadLog::recover(&d, M::default()).unwrap();
        let t = Instant::now();
        for g in 0..N / GROUP {
            let mut w = wal.begin_entry().unwrap();
            for i in g * GROUP..(g + 1) * GROUP {
                w.write_chunk(&rec(i)).unwrap();
            }
            w.commit().unwrap();
        }
        report("okaywal", "append, entry of 1000 committed", N, t);
        println!(
            "           disk bytes/rec {:.1}",
            dir_bytes(&d) as f64 / N as f64
        );
        let t = Instant::now();
        for i in 0..SYNC_N {
            let mut w = wal.begin_entry().unwrap();
            w.write_chunk(&rec(i)).unwrap();
            w.commit().unwrap();
        }
        report("okaywal", "append, entry each committed", SYNC_N, t);
        wal.shutdown().unwrap();
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    if which.is_empty() || which == "redb" {
        r::run();
    }
    if which.is_empty() || which == "fjall" {
        f::run();
    }
    if which.is_empty() || which == "queue-file" {
        q::run();
    }
    if which.is_empty() || which == "yaque" {
        y::run().await;
    }
    if which.is_empty() || which == "okaywal" {
        o::run();
    }
}
