//! The durable Raft log: one append-only file of checksummed batches of
//! records (`raft/raft.wal`), replayed on start, and the live state in
//! memory that openraft reads.
//!
//! - `record`: the file format, the live state a replay yields, the
//!   recovery scan (torn tail or corruption) and `eddy wal check`.
//! - `flusher`: the writer thread; the job order, group commit, compaction
//!   and the fail-stop on I/O errors.
//! - this module: [`LogStore`], which openraft drives.
//!
//! Invariants:
//! - Every change is applied to memory and queued to the flusher under one
//!   lock, so the flusher's job order is the order of the changes in memory,
//!   and a compaction captures exactly the state at its place in that order.
//! - Nothing is reported durable before the fsync (or, for a compaction, the
//!   fsynced rename) that covers it.
//! - Once the node's [`StorageHealth`] is latched, every method that would
//!   write returns an error and nothing more is written.

mod flusher;
mod record;

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::LogState;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};

pub use flusher::{FSYNC_BUCKETS_MICROS, FsyncStats};
pub use record::{Tail, WalError, WalReport, check};

use super::StorageHealth;
use super::crashsafe::{remove_leftovers, replace_file};
use super::types::{Entry, LogId, TypeConfig, Vote};
use flusher::{DiskFile, Done, Flusher, Job, WalFile};
use record::{Contents, LiveState, RecordRef, WAL_FILE, encode_record, new_batch};

/// Tunables of the log store.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Rewrite the file only once it is at least this large (and at least
    /// twice the live state).
    pub compact_min_bytes: u64,
    /// Size of the batches of a rewritten file.
    pub compact_batch_bytes: u64,
    /// Encoded bytes of entries one `limited_get_log_entries` call returns at
    /// most (but always at least one entry), which bounds one replication
    /// message well below the gRPC message limit.
    pub read_budget_bytes: u64,
    /// Zeros are kept written this far (and up to twice this) ahead of the
    /// log, so that writes land within the file; 0 writes none.
    pub prepare_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            compact_min_bytes: 64 << 20,
            compact_batch_bytes: 32 << 20,
            read_budget_bytes: 8 << 20,
            prepare_bytes: 1 << 20,
        }
    }
}

/// Bytes a rewritten file needs besides the entries (header, vote,
/// committed and purge records); an estimate, used only to decide when to
/// compact.
const LIVE_OVERHEAD_BYTES: u64 = 256;

/// The log store handed to openraft. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    pub fsync_stats: Arc<Mutex<FsyncStats>>,
}

struct Shared {
    inner: Mutex<Inner>,
    health: Arc<StorageHealth>,
    options: LogOptions,
    /// The writer thread, joined when the last handle to the store goes.
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Shared {
    /// Close the job queue (later changes fail with "flusher stopped") and
    /// hand over the flusher thread to be joined, unless that was done.
    fn stop_taking_jobs(&self) -> Option<std::thread::JoinHandle<()>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        drop(std::mem::replace(&mut inner.jobs, mpsc::channel().0));
        self.flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Drop for Shared {
    /// As [`LogStore::close`], for a store never closed.
    fn drop(&mut self) {
        if let Some(thread) = self.stop_taking_jobs()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

struct Inner {
    contents: Contents,
    jobs: mpsc::Sender<Job>,
    /// The log's length in the file (zeros written ahead may follow) once
    /// the flusher has done every queued job.
    file_bytes: u64,
}

impl Inner {
    fn submit(&mut self, records: Vec<u8>, done: Done) -> io::Result<()> {
        self.file_bytes += records.len() as u64;
        self.jobs
            .send(Job::Write { records, done })
            .map_err(|_| io::Error::other("raft log flusher stopped"))
    }
}

impl LogStore {
    /// Open (or create) the log in `dir` and recover what is on disk.
    ///
    /// A torn last batch (a write that was never acknowledged) is cut off
    /// with a warning. Damage followed by valid data is corruption: this
    /// fails with [`WalError::Corrupt`], naming the file and offset, and the
    /// node must not start. So does a file of an unknown format or version.
    pub fn open(dir: &Path, health: Arc<StorageHealth>) -> Result<Self, WalError> {
        Self::open_with(dir, health, LogOptions::default())
    }

    /// [`Self::open`] with other tunables (tests force compaction and small
    /// read budgets through here).
    pub fn open_with(
        dir: &Path,
        health: Arc<StorageHealth>,
        options: LogOptions,
    ) -> Result<Self, WalError> {
        Self::open_inner(dir, health, options, |f| Box::new(f))
    }

    fn open_inner(
        dir: &Path,
        health: Arc<StorageHealth>,
        options: LogOptions,
        wrap: impl FnOnce(DiskFile) -> Box<dyn WalFile>,
    ) -> Result<Self, WalError> {
        let path = dir.join(WAL_FILE);
        let io = WalError::io;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // Only compaction writes temp files here; one left by a crash was
        // never published.
        remove_leftovers(dir).map_err(io(dir))?;
        if !path.exists() {
            let header = record::encode_file_header(record::new_salt());
            replace_file(dir, WAL_FILE, |f| io::Write::write_all(f, &header))
                .map_err(|e| io(&path)(e.into()))?;
        }
        let recovered = record::recover(&path)?;
        let good_end = recovered.walk.good_end;
        // Zeros written ahead by an earlier run may follow the log.
        let mut prepared = recovered.file_len;
        match recovered.walk.tail {
            Tail::Clean => {}
            Tail::Torn { offset, bytes } => {
                tracing::warn!(
                    file = %path.display(),
                    offset,
                    bytes,
                    "raft log: cutting a torn last batch (never acknowledged)"
                );
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                f.set_len(offset).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                prepared = offset;
            }
            Tail::Corrupt { offset, reason } => {
                return Err(WalError::Corrupt {
                    path,
                    offset,
                    reason,
                });
            }
        }
        let file = wrap(DiskFile::open(dir).map_err(io(&path))?);
        let stats = Arc::new(Mutex::new(FsyncStats::default()));
        let (tx, rx) = mpsc::channel();
        let flusher = Flusher {
            file,
            salt: recovered.salt,
            size: good_end,
            prepared,
            prepare_bytes: options.prepare_bytes,
            mean_batch: 0.0,
            prepare_refused: false,
            compact_batch_bytes: options.compact_batch_bytes,
            stats: stats.clone(),
            health: health.clone(),
        };
        let flusher = std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || flusher.run(rx))
            .map_err(io(&path))?;
        Ok(Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    contents: recovered.contents,
                    jobs: tx,
                    file_bytes: good_end,
                }),
                health,
                options,
                flusher: Mutex::new(Some(flusher)),
            }),
            fsync_stats: stats,
        })
    }

    /// Close the job queue and wait for the flusher to finish what was
    /// queued, what no one waited for included: once this returns nothing
    /// writes the file, so it can be opened again in the same process (a
    /// node restarted in place) without a late write of this store landing
    /// in it. Later changes fail with "flusher stopped".
    pub async fn close(&self) {
        if let Some(thread) = self.shared.stop_taking_jobs() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }

    /// Refuse to change anything once storage failed.
    fn writable(&self) -> io::Result<()> {
        match self.shared.health.failure() {
            Some(reason) => Err(io::Error::other(format!(
                "raft log refuses writes: storage failed: {reason}"
            ))),
            None => Ok(()),
        }
    }

    fn encode(record: RecordRef) -> io::Result<Vec<u8>> {
        let mut buf = new_batch();
        encode_record(&record, &mut buf)?;
        Ok(buf)
    }

    /// Apply a change to memory and queue its record, under one lock.
    fn change(
        &self,
        record: RecordRef,
        done: Done,
        apply: impl FnOnce(&mut Contents),
    ) -> io::Result<()> {
        self.writable()?;
        let bytes = Self::encode(record)?;
        let mut inner = self.lock();
        apply(&mut inner.contents);
        inner.submit(bytes, done)
    }

    /// Apply a change and wait until its record is durable.
    async fn change_durably(
        &self,
        record: RecordRef<'_>,
        apply: impl FnOnce(&mut Contents),
    ) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.change(record, Done::Reply(tx), apply)?;
        rx.await
            .map_err(|_| io::Error::other("raft log flusher stopped"))?
    }

    /// Queue a rewrite of the file from the current live state if the file
    /// is large and mostly dead records.
    fn maybe_compact(&self, inner: &mut Inner) {
        let live = inner.contents.entry_bytes + LIVE_OVERHEAD_BYTES;
        if inner.file_bytes >= self.shared.options.compact_min_bytes
            && live.saturating_mul(2) <= inner.file_bytes
        {
            let state = LiveState::of(&inner.contents);
            if inner.jobs.send(Job::Compact(state)).is_ok() {
                inner.file_bytes = live;
            }
        }
    }

    /// Bytes of the entries held in memory (not yet purged): what a snapshot
    /// and the purge after it would give back.
    pub fn entry_bytes(&self) -> u64 {
        self.lock().contents.entry_bytes
    }

    /// The index of the last entry (or of the last purged one), as readable
    /// now.
    #[cfg(test)]
    pub fn last_index(&self) -> Option<u64> {
        self.lock().contents.last_log_id().map(|id| id.index)
    }

    /// Hold the flusher until the returned sender is used or dropped; jobs
    /// queued meanwhile are then taken in one go.
    #[cfg(test)]
    fn hold_flusher(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        self.lock().jobs.send(Job::Hold(rx)).unwrap();
        tx
    }

    /// Resolves once the flusher has done every job queued before this
    /// call and what it does when it runs out of jobs.
    #[cfg(test)]
    async fn flusher_idle(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lock().jobs.send(Job::Idle(tx)).unwrap();
        rx.await.unwrap()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    /// Every entry in `range` that was appended and not truncated or purged,
    /// including entries whose append is not durable yet.
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let inner = self.lock();
        Ok(inner
            .contents
            .entries
            .range(range)
            .map(|(_, e)| e.entry.clone())
            .collect())
    }

    /// The entries of `[start, end)` as [`Self::try_get_log_entries`] would
    /// return them, cut after `read_budget_bytes` of encoded entries, but at
    /// least one. Replication reads through here, so one message stays
    /// bounded whatever the follower's backlog.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        let budget = self.shared.options.read_budget_bytes;
        let inner = self.lock();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for e in inner.contents.entries.range(start..end).map(|(_, e)| e) {
            if !out.is_empty() && bytes + e.size > budget {
                break;
            }
            bytes += e.size;
            out.push(e.entry.clone());
        }
        Ok(out)
    }

    /// The last vote given to [`RaftLogStorage::save_vote`], durable or not.
    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().contents.vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    /// The log as readable now: appended entries count before they are
    /// durable.
    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let inner = self.lock();
        Ok(LogState {
            last_purged_log_id: inner.contents.last_purged,
            last_log_id: inner.contents.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Readable at once; durable when this returns `Ok`, together with every
    /// change queued before it. Fails if storage failed (before or during).
    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.change_durably(RecordRef::Vote(vote), |c| c.vote = Some(*vote))
            .await
    }

    /// Readable at once; durable with the next write someone waits for
    /// (not waited for: a lost `committed` only means that on start the
    /// node re-applies less of its log at once, and the rest once it hears
    /// of a commit again).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.change(RecordRef::Committed(&committed), Done::Nothing, |c| {
            c.committed = committed
        })
    }

    /// The last value given to [`RaftLogStorage::save_committed`] (after a
    /// restart: the last one that was durable).
    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().contents.committed)
    }

    /// The entries are readable when this returns; `callback` fires after the
    /// fsync that covers them and every change queued before them, or with
    /// an error if that write or fsync failed. Returns an error at once if
    /// storage failed.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        self.writable()?;
        let mut buf = new_batch();
        let mut sized = Vec::new();
        for e in entries {
            let size = encode_record(&RecordRef::Entry(&e), &mut buf)?;
            sized.push((e, size));
        }
        let mut inner = self.lock();
        for (e, size) in sized {
            inner.contents.insert(e, size);
        }
        inner.submit(buf, Done::Flushed(callback))
    }

    /// Entries after `last_log_id` are gone from reads when this returns; the
    /// truncation is durable when it returns `Ok`.
    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.change_durably(RecordRef::TruncateAfter(&last_log_id), |c| {
            c.truncate_after(last_log_id.as_ref())
        })
        .await
    }

    /// Entries up to `log_id` are gone from reads when this returns; the
    /// purge becomes durable with the next write someone waits for (not
    /// waited for: entries a lost purge leaves are below the snapshot, and
    /// go with a later purge). May queue a
    /// rewrite of the file from the live state at this point of the order.
    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.writable()?;
        let bytes = Self::encode(RecordRef::Purge(&log_id))?;
        let mut inner = self.lock();
        inner.contents.purge(&log_id);
        inner.submit(bytes, Done::Nothing)?;
        self.maybe_compact(&mut inner);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
