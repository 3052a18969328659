//! The durable Raft log: one append-only write-ahead file of checksummed
//! records, replayed on start.
//!
//! Record framing: `[len: u32 LE][crc32 of body: u32 LE][body]`, where the
//! body is a versioned postcard encoding of [`Record`]. Recovery reads
//! records until the first short or corrupt one and cuts the file there: a
//! torn tail can only hold writes that were never acknowledged, because a
//! write is acknowledged (the `IOFlushed` callback, or the return of
//! `save_vote`) only after the `fdatasync` that covers it.
//!
//! All writes go through one flusher thread in submission order, which keeps
//! vote, append, truncate and purge serialized as openraft requires. The
//! flusher drains whatever is queued, writes it, and issues a single
//! `fdatasync` for the lot: concurrent appends share one disk flush (group
//! commit). Entries stay readable in memory from the moment `append` returns.
//!
//! When purged records dominate the file, the flusher rewrites it with only
//! the live state (temp file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::LogState;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};

use super::StorageHealth;
use super::crashsafe::sync_dir;
use super::types::{Entry, LogId, TypeConfig, Vote};

const FORMAT_VERSION: u8 = 1;
const WAL_FILE: &str = "raft.wal";
/// Rewrite the file once it is this large and mostly purged entries.
const COMPACT_MIN_BYTES: u64 = 64 * 1024 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
enum Record {
    Entries(Vec<Entry>),
    Vote(Vote),
    Committed(Option<LogId>),
    TruncateAfter(Option<LogId>),
    Purge(LogId),
}

#[derive(Default)]
struct LogContents {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

impl LogContents {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Entries(entries) => {
                for e in entries {
                    self.entries.insert(e.index(), e);
                }
            }
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
            Record::TruncateAfter(after) => {
                let from = after.map_or(0, |id| id.index() + 1);
                self.entries.split_off(&from);
            }
            Record::Purge(upto) => {
                let keep = self.entries.split_off(&(upto.index() + 1));
                self.entries = keep;
                self.last_purged = Some(upto);
            }
        }
    }

    fn snapshot_records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        if let Some(v) = &self.vote {
            out.push(Record::Vote(v.clone()));
        }
        if let Some(p) = &self.last_purged {
            out.push(Record::Purge(p.clone()));
        }
        out.push(Record::Committed(self.committed.clone()));
        let entries: Vec<Entry> = self.entries.values().cloned().collect();
        for chunk in entries.chunks(1024) {
            out.push(Record::Entries(chunk.to_vec()));
        }
        out
    }
}

fn encode(record: &Record) -> io::Result<Vec<u8>> {
    let mut body = vec![FORMAT_VERSION];
    body.extend(postcard::to_allocvec(record).map_err(io::Error::other)?);
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Read records until the end or the first damaged one; returns the records
/// and the byte length of the intact prefix.
fn read_records(file: &mut File) -> io::Result<(Vec<Record>, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut good = 0u64;
    loop {
        let mut head = [0u8; 8];
        if read_full(&mut reader, &mut head)? < 8 {
            break;
        }
        let len = u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(head[4..8].try_into().unwrap());
        if len == 0 || len > 1 << 30 {
            break;
        }
        let mut body = vec![0u8; len];
        if read_full(&mut reader, &mut body)? < len || crc32fast::hash(&body) != crc {
            break;
        }
        if body[0] != FORMAT_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("raft log record version {} is not supported", body[0]),
            ));
        }
        let record: Record = postcard::from_bytes(&body[1..]).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("raft log record: {e}"))
        })?;
        records.push(record);
        good += 8 + len as u64;
    }
    Ok((records, good))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

enum Job {
    Write {
        bytes: Vec<u8>,
        done: Done,
    },
    /// Rewrite the file from this state if it is worth it.
    MaybeCompact {
        records: Vec<Record>,
    },
}

enum Done {
    Flushed(IOFlushed<TypeConfig>),
    Reply(tokio::sync::oneshot::Sender<io::Result<()>>),
    Nothing,
}

impl Done {
    fn complete(self, result: &io::Result<()>) {
        let copy = || match result {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        match self {
            Done::Flushed(cb) => cb.io_completed(copy()),
            Done::Reply(tx) => {
                let _ = tx.send(copy());
            }
            Done::Nothing => {}
        }
    }
}

/// Histogram of fsync durations, read by the metrics endpoint.
#[derive(Default)]
pub struct FsyncStats {
    pub count: u64,
    pub total_micros: u64,
    /// Cumulative counts for the bucket bounds in `FSYNC_BUCKETS_MICROS`.
    pub buckets: [u64; FSYNC_BUCKETS_MICROS.len()],
}

pub const FSYNC_BUCKETS_MICROS: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
];

struct Flusher {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    size: u64,
    stats: Arc<Mutex<FsyncStats>>,
    health: Arc<StorageHealth>,
}

impl Flusher {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut dones = Vec::new();
            let mut compact = None;
            let mut buf = Vec::new();
            for job in batch {
                match job {
                    Job::Write { bytes, done } => {
                        buf.extend_from_slice(&bytes);
                        dones.push(done);
                    }
                    Job::MaybeCompact { records } => compact = Some(records),
                }
            }
            let result = self.write_and_sync(&buf);
            if let Err(e) = &result {
                self.health
                    .fail(format!("writing {}: {e}", self.path.display()));
            }
            for d in dones {
                d.complete(&result);
            }
            if let Some(records) = compact
                && self.size >= COMPACT_MIN_BYTES
                && let Err(e) = self.compact(records)
            {
                tracing::error!(error = %e, "raft log compaction failed; keeping the old file");
            }
        }
    }

    fn write_and_sync(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(buf)?;
        let start = Instant::now();
        self.file.sync_data()?;
        let micros = start.elapsed().as_micros() as u64;
        self.size += buf.len() as u64;
        let mut stats = self.stats.lock().unwrap();
        stats.count += 1;
        stats.total_micros += micros;
        for (i, bound) in FSYNC_BUCKETS_MICROS.iter().enumerate() {
            if micros <= *bound {
                stats.buckets[i] += 1;
            }
        }
        Ok(())
    }

    fn compact(&mut self, records: Vec<Record>) -> io::Result<()> {
        let mut bytes = Vec::new();
        for r in &records {
            bytes.extend(encode(r)?);
        }
        // Only worth it if the live state is much smaller than the file.
        if bytes.len() as u64 * 2 > self.size {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{WAL_FILE}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.size = bytes.len() as u64;
        tracing::info!(bytes = self.size, "raft log compacted");
        Ok(())
    }
}

/// The log store handed to openraft. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct LogStore {
    contents: Arc<Mutex<LogContents>>,
    jobs: mpsc::Sender<Job>,
    pub fsync_stats: Arc<Mutex<FsyncStats>>,
}

impl LogStore {
    /// Open (or create) the log in `dir`, recovering what is on disk.
    pub fn open(dir: &Path, health: Arc<StorageHealth>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(WAL_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let (records, good) = read_records(&mut file)?;
        let on_disk = file.metadata()?.len();
        if good < on_disk {
            tracing::warn!(
                kept = good,
                dropped = on_disk - good,
                "raft log: cutting a torn tail"
            );
            file.set_len(good)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let mut contents = LogContents::default();
        for r in records {
            contents.apply(r);
        }
        let stats = Arc::new(Mutex::new(FsyncStats::default()));
        let (tx, rx) = mpsc::channel();
        let flusher = Flusher {
            file,
            path,
            dir: dir.to_path_buf(),
            size: good,
            stats: stats.clone(),
            health,
        };
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || flusher.run(rx))?;
        Ok(Self {
            contents: Arc::new(Mutex::new(contents)),
            jobs: tx,
            fsync_stats: stats,
        })
    }

    fn submit(&self, record: &Record, done: Done) -> io::Result<()> {
        let bytes = encode(record)?;
        self.jobs
            .send(Job::Write { bytes, done })
            .map_err(|_| io::Error::other("raft log flusher stopped"))
    }

    async fn submit_and_wait(&self, record: &Record) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(record, Done::Reply(tx))?;
        rx.await
            .map_err(|_| io::Error::other("raft log flusher stopped"))?
    }

    pub fn last_index(&self) -> Option<u64> {
        let c = self.contents.lock().unwrap();
        c.entries
            .keys()
            .next_back()
            .copied()
            .or(c.last_purged.as_ref().map(|l| l.index()))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let c = self.contents.lock().unwrap();
        Ok(c.entries.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.contents.lock().unwrap().vote.clone())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let c = self.contents.lock().unwrap();
        let last = c
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id())
            .or(c.last_purged.clone());
        Ok(LogState {
            last_purged_log_id: c.last_purged.clone(),
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.contents.lock().unwrap().vote = Some(vote.clone());
        self.submit_and_wait(&Record::Vote(vote.clone())).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.contents.lock().unwrap().committed = committed.clone();
        // Not waited for: losing it only means replaying a little more log.
        self.submit(&Record::Committed(committed), Done::Nothing)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.contents.lock().unwrap().committed.clone())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let record = Record::Entries(entries);
        let bytes = encode(&record)?;
        let Record::Entries(entries) = record else {
            unreachable!()
        };
        {
            let mut c = self.contents.lock().unwrap();
            for e in entries {
                c.entries.insert(e.index(), e);
            }
        }
        self.jobs
            .send(Job::Write {
                bytes,
                done: Done::Flushed(callback),
            })
            .map_err(|_| io::Error::other("raft log flusher stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.contents
            .lock()
            .unwrap()
            .apply(Record::TruncateAfter(last_log_id.clone()));
        self.submit_and_wait(&Record::TruncateAfter(last_log_id))
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let records = {
            let mut c = self.contents.lock().unwrap();
            c.apply(Record::Purge(log_id.clone()));
            c.snapshot_records()
        };
        self.submit(&Record::Purge(log_id), Done::Nothing)?;
        let _ = self.jobs.send(Job::MaybeCompact { records });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    struct Builder;

    impl
        StoreBuilder<
            TypeConfig,
            LogStore,
            super::super::state_machine::StateMachine,
            tempfile::TempDir,
        > for Builder
    {
        async fn build(
            &self,
        ) -> Result<
            (
                tempfile::TempDir,
                LogStore,
                super::super::state_machine::StateMachine,
            ),
            StorageError<TypeConfig>,
        > {
            let dir = tempfile::tempdir().unwrap();
            let log = LogStore::open(&dir.path().join("log"), StorageHealth::new()).unwrap();
            let (sm, _events) =
                super::super::state_machine::StateMachine::open(&dir.path().join("sm")).unwrap();
            Ok((dir, log, sm))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.unwrap();
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let mut f = File::create(&path).unwrap();
        let a = encode(&Record::Committed(None)).unwrap();
        let b = encode(&Record::TruncateAfter(None)).unwrap();
        f.write_all(&a).unwrap();
        f.write_all(&b[..b.len() - 1]).unwrap();
        drop(f);
        let mut f = OpenOptions::new().read(true).open(&path).unwrap();
        let (records, good) = read_records(&mut f).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(good, a.len() as u64);
        // A flipped bit in the body is detected too.
        let mut bad = a.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let mut f = OpenOptions::new().read(true).open(&path).unwrap();
        assert_eq!(read_records(&mut f).unwrap().0.len(), 0);
    }
}
