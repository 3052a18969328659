//! The writer thread of the log: the only code that writes the log file.
//!
//! It takes jobs strictly in submission order. Consecutive writes are
//! gathered into one batch, written with one `write` call and covered by one
//! fsync (group commit); their callbacks fire only after that fsync. Records
//! no one waits for (the committed index, a purge) wait, gathered, for the
//! next batch someone waits for: no batch is written without an fsync. A
//! compaction is a barrier in the order: the writes queued before it are
//! written to the old file and fsynced first, then the file is replaced by
//! one built from the live state captured at that point of the order, and
//! the writes queued after it go to the new file.
//!
//! Fail-stop: after a failed write, fsync or replacement nothing on disk can
//! be trusted (after a failed fsync not even the page cache), so the flusher
//! latches the node's [`StorageHealth`] with a reason naming the file, fails
//! the callbacks of that batch, and from then on fails every job at once
//! without touching the file. The same happens once anyone else latched the
//! health.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::IOFlushed;

use super::record::{BATCH_HEADER_LEN, LiveState, WAL_FILE, new_salt, seal_batch};
use crate::raft::StorageHealth;
use crate::raft::crashsafe::{ReplaceError, replace_file};
use crate::raft::types::TypeConfig;

/// Gathered writes are cut into a new batch beyond this size, which bounds
/// the flusher's buffer when a large backlog is queued.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// Zeros are written ahead of the log only while recent batches are
/// smaller than this on average.
const PREPARE_BELOW_MEAN_BATCH: f64 = 32.0 * 1024.0;

/// The log file as the flusher sees it. Tests wrap it to inject failures.
pub(super) trait WalFile: Send {
    fn path(&self) -> &Path;
    /// Write `bytes` at `offset`, over zeros prepared there or past the
    /// end of the file.
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Make everything appended so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Replace the whole file, crash-safely, with what `fill` writes; later
    /// appends go to the new file.
    fn replace(
        &mut self,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), ReplaceError>;
}

/// The real log file: `dir/raft.wal`.
pub(super) struct DiskFile {
    file: File,
    dir: PathBuf,
    path: PathBuf,
}

impl DiskFile {
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(WAL_FILE);
        Ok(Self {
            file: OpenOptions::new().write(true).open(&path)?,
            dir: dir.to_path_buf(),
            path,
        })
    }
}

impl WalFile for DiskFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, bytes, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn replace(
        &mut self,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), ReplaceError> {
        replace_file(&self.dir, WAL_FILE, |f| {
            let mut w = BufWriter::with_capacity(1 << 20, f);
            fill(&mut w)?;
            w.flush()
        })?;
        self.file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(ReplaceError::Publish)?;
        Ok(())
    }
}

pub(super) enum Job {
    /// Encoded records after `BATCH_HEADER_LEN` reserved bytes.
    Write { records: Vec<u8>, done: Done },
    /// Rewrite the file from this state.
    Compact(LiveState),
    /// Hold the flusher until the sender is used or dropped, so a test can
    /// queue jobs that the flusher then takes in one go.
    #[cfg(test)]
    Hold(mpsc::Receiver<()>),
    /// Do what the flusher does when it runs out of jobs, then answer.
    #[cfg(test)]
    Idle(tokio::sync::oneshot::Sender<()>),
}

/// Who is told when a write is durable (or failed).
pub(super) enum Done {
    Flushed(IOFlushed<TypeConfig>),
    Reply(tokio::sync::oneshot::Sender<io::Result<()>>),
    Nothing,
}

impl Done {
    fn complete(self, result: Result<(), &str>) {
        let result = result.map_err(io::Error::other);
        match self {
            Done::Flushed(cb) => cb.io_completed(result),
            Done::Reply(tx) => {
                let _ = tx.send(result);
            }
            Done::Nothing => {}
        }
    }
}

/// Histogram of fsync durations, read by the metrics endpoint.
#[derive(Default, Clone)]
pub struct FsyncStats {
    pub count: u64,
    pub total_micros: u64,
    /// Cumulative counts for the bucket bounds in `FSYNC_BUCKETS_MICROS`.
    pub buckets: [u64; FSYNC_BUCKETS_MICROS.len()],
}

pub const FSYNC_BUCKETS_MICROS: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
];

pub(super) struct Flusher {
    pub file: Box<dyn WalFile>,
    /// Salt of the current file, for batch headers.
    pub salt: u64,
    /// Where the log in the current file ends: where the next batch goes.
    pub size: u64,
    /// The file holds zeros from `size` up to here (when this is past
    /// `size`; a zero write cut short by a full disk may leave some further).
    pub prepared: u64,
    /// Zeros are written ahead in pieces of this many bytes (0: never).
    pub prepare_bytes: u64,
    /// The mean size of recent batches, in bytes.
    pub mean_batch: f64,
    /// The disk had no room for zeros ahead (until the next compaction).
    pub prepare_refused: bool,
    /// Batch size used when rewriting the file.
    pub compact_batch_bytes: u64,
    pub stats: Arc<Mutex<FsyncStats>>,
    pub health: Arc<StorageHealth>,
}

/// Whether a flush writes what is gathered whatever it holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flush {
    Now,
    /// Only if someone waits for a record gathered.
    IfAwaited,
}

/// Writes gathered for the next batch.
#[derive(Default)]
struct Pending {
    batch: Option<Vec<u8>>,
    done: Vec<Done>,
}

impl Flusher {
    pub fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut pending = Pending::default();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(job) = next.take().or_else(|| rx.try_recv().ok()) {
                match job {
                    Job::Write { records, done } => {
                        match &mut pending.batch {
                            None => pending.batch = Some(records),
                            Some(batch) => {
                                batch.extend_from_slice(&records[BATCH_HEADER_LEN as usize..])
                            }
                        }
                        pending.done.push(done);
                        if pending
                            .batch
                            .as_ref()
                            .is_some_and(|b| b.len() >= MAX_BATCH_BYTES)
                        {
                            self.flush(&mut pending, Flush::Now);
                        }
                    }
                    Job::Compact(state) => {
                        self.flush(&mut pending, Flush::Now);
                        self.compact(&state);
                    }
                    #[cfg(test)]
                    Job::Hold(release) => {
                        self.flush(&mut pending, Flush::Now);
                        let _ = release.recv();
                    }
                    #[cfg(test)]
                    Job::Idle(answer) => {
                        self.flush(&mut pending, Flush::IfAwaited);
                        let _ = answer.send(());
                    }
                }
            }
            self.flush(&mut pending, Flush::IfAwaited);
        }
        // The store was closed or dropped, and waits for this: what no one
        // waited for (the last committed index, say) is written now, so a
        // node stopped cleanly starts again from where it was.
        self.flush(&mut pending, Flush::Now);
    }

    /// Write and fsync the gathered batch, then complete its callbacks.
    ///
    /// With [`Flush::IfAwaited`], records no one waits to be durable (the
    /// committed index, a purge; both may be lost without harm) stay
    /// gathered, and go out in the next batch someone waits for: each commit
    /// used to cost every node a fsync of its own (a batch holding just the
    /// committed index), which also held back the next entries behind it.
    /// They are never written without an fsync, so that every batch but the
    /// last is durable before the next is written, which is what recovery
    /// relies on to tell a torn tail from corruption.
    fn flush(&mut self, pending: &mut Pending, when: Flush) {
        if when == Flush::IfAwaited && pending.done.iter().all(|d| matches!(d, Done::Nothing)) {
            return;
        }
        let done = std::mem::take(&mut pending.done);
        let Some(mut batch) = pending.batch.take() else {
            return;
        };
        let started = Instant::now();
        let result = self.write_batch(&mut batch);
        crate::latency::Stage::LogFlush.record(started.elapsed());
        for d in done {
            d.complete(result.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }

    fn write_batch(&mut self, batch: &mut [u8]) -> Result<(), String> {
        if let Some(reason) = self.health.failure() {
            return Err(format!("raft log not written: storage failed: {reason}"));
        }
        seal_batch(batch, self.salt, self.size);
        let path = self.file.path().display().to_string();
        if let Err(e) = self.file.write_at(self.size, batch) {
            return Err(self.fail(format!("writing {path}: {e}")));
        }
        self.prepare_ahead(self.size + batch.len() as u64, batch.len() as u64)?;
        let start = Instant::now();
        if let Err(e) = self.file.sync() {
            return Err(self.fail(format!("fsync of {path}: {e}")));
        }
        self.size += batch.len() as u64;
        self.record_fsync(start.elapsed().as_micros() as u64);
        Ok(())
    }

    /// Keep zeros written ahead of the log, which ends at `end`, so that a
    /// batch's fsync covers blocks already allocated within the file's
    /// length: it then carries the data alone, with no change of size or
    /// allocation for the file system to journal. On ext4 here that halved
    /// the fsync of a 4 KiB write (0.27 -> 0.16 ms, the zeros' own writes
    /// included). The zeros go out with a batch, under its fsync, once per
    /// `prepare_bytes` of log: nothing touches the file between batches.
    ///
    /// Only while batches are small: the zeros double the bytes written,
    /// and with large batches the disk's bandwidth, not the journal, is what
    /// an fsync waits for (three nodes on one disk, 64 KiB puts at P=4:
    /// 1,067 and 1,073 puts/s without zeros, 795 and 909 with them).
    ///
    /// A disk without room for the zeros is no failure (the batches grow
    /// the file as they would without them), and no zeros are tried again
    /// until the next compaction; any other error is, as for a batch.
    fn prepare_ahead(&mut self, end: u64, batch: u64) -> Result<(), String> {
        // A mean over the last few dozen batches.
        self.mean_batch += (batch as f64 - self.mean_batch) / 32.0;
        if self.prepare_bytes == 0
            || self.prepare_refused
            || self.prepared >= end + self.prepare_bytes
            || self.mean_batch > PREPARE_BELOW_MEAN_BATCH
        {
            return Ok(());
        }
        let from = self.prepared.max(end);
        let until = end + 2 * self.prepare_bytes;
        let zeros = vec![0; (until - from) as usize];
        match self.file.write_at(from, &zeros) {
            Ok(()) => {
                self.prepared = until;
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::StorageFull
                        | io::ErrorKind::QuotaExceeded
                        | io::ErrorKind::FileTooLarge
                ) =>
            {
                let path = self.file.path().display();
                tracing::warn!(%path, error = %e, "raft log: no room for zeros ahead of the log; not trying again until the next compaction");
                self.prepare_refused = true;
                Ok(())
            }
            Err(e) => {
                let path = self.file.path().display().to_string();
                Err(self.fail(format!("writing zeros ahead of the log in {path}: {e}")))
            }
        }
    }

    fn compact(&mut self, state: &LiveState) {
        if self.health.is_failed() {
            return;
        }
        let salt = new_salt();
        let mut len = 0;
        let batch_bytes = self.compact_batch_bytes;
        let result = self.file.replace(&mut |w| {
            len = state.write_file(salt, batch_bytes, w)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                tracing::info!(bytes = len, "raft log compacted");
                self.salt = salt;
                self.size = len;
                self.prepared = len;
                self.prepare_refused = false;
            }
            // Out of space before anything was renamed: the old file is
            // intact, keep appending to it and try again at the next purge.
            Err(e) if e.is_out_of_space_before_publishing() => {
                let path = self.file.path().display();
                tracing::warn!(%path, error = %e, "raft log compaction skipped: no space; keeping the old file");
            }
            Err(e) => {
                let path = self.file.path().display().to_string();
                self.fail(format!("compacting {path}: {e}"));
            }
        }
    }

    fn fail(&self, reason: String) -> String {
        self.health.fail(&reason);
        reason
    }

    fn record_fsync(&self, micros: u64) {
        let mut stats = self.stats.lock().unwrap();
        stats.count += 1;
        stats.total_micros += micros;
        for (i, bound) in FSYNC_BUCKETS_MICROS.iter().enumerate() {
            if micros <= *bound {
                stats.buckets[i] += 1;
            }
        }
    }
}
