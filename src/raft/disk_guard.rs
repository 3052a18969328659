//! Free-space admission for new data: a full disk is refused at the door
//! instead of failing inside the log.
//!
//! A write that fails inside the Raft log stops the node for good (see
//! `health`), so running the data directory's filesystem full must never
//! reach the log. Before a command that adds payload bytes (a put, a
//! result) is proposed, [`DiskGuard::admit`] checks that the filesystem
//! keeps at least `reserve` bytes free after it; otherwise the command is
//! refused (HTTP 507) and nothing is written. The reserve leaves room for
//! what must still be written while data is refused: commits, deletes,
//! votes, snapshots and the compaction that frees space. Once space is
//! freed, writes are admitted again without a restart.
//!
//! The reserve grows with the current snapshot: writing the next one needs
//! room for a second copy before the first is replaced.
//!
//! Free space is sampled by a background task; between samples each
//! admitted command is subtracted from the last sample, so a burst cannot
//! overrun the reserve by more than one command.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often free space is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error(
    "insufficient storage: {free} bytes free on the data volume, \
     {reserve} kept in reserve; free space or add capacity"
)]
pub struct NoSpace {
    pub free: u64,
    pub reserve: u64,
}

#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    /// Bytes that must stay free on top of `rewritten`; 0 turns the guard
    /// off.
    reserve: u64,
    /// Files that get rewritten whole (the snapshot): their size is kept
    /// free too.
    rewritten: Vec<PathBuf>,
    /// `reserve` plus the sizes of `rewritten` at the last sample.
    effective_reserve: AtomicU64,
    /// Free bytes at the last sample, minus what was admitted since.
    free: AtomicU64,
}

impl DiskGuard {
    pub fn new(dir: PathBuf, reserve: u64, rewritten: Vec<PathBuf>) -> Arc<Self> {
        let guard = Arc::new(Self {
            dir,
            reserve,
            rewritten,
            effective_reserve: AtomicU64::new(reserve),
            free: AtomicU64::new(u64::MAX),
        });
        guard.sample();
        guard
    }

    /// Read the filesystem's free space now.
    pub fn sample(&self) {
        if self.reserve == 0 {
            return;
        }
        let rewritten: u64 = self
            .rewritten
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        self.effective_reserve
            .store(self.reserve.saturating_add(rewritten), Ordering::Relaxed);
        match rustix::fs::statvfs(&self.dir) {
            Ok(s) => self
                .free
                .store(s.f_bavail.saturating_mul(s.f_frsize), Ordering::Relaxed),
            Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs failed"),
        }
    }

    /// Admit a command that adds `bytes` of data, or refuse it.
    pub fn admit(&self, bytes: u64) -> Result<(), NoSpace> {
        if self.reserve == 0 || bytes == 0 {
            return Ok(());
        }
        // Room for the log record now and the snapshot that later holds it.
        let need = bytes.saturating_mul(2);
        let reserve = self.effective_reserve.load(Ordering::Relaxed);
        let result = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free| {
                (free >= reserve.saturating_add(need)).then(|| free - need)
            });
        result.map(|_| ()).map_err(|free| NoSpace { free, reserve })
    }

    /// Why data is refused now, if it is (for readiness).
    pub fn low_space(&self) -> Option<NoSpace> {
        let free = self.free.load(Ordering::Relaxed);
        let reserve = self.effective_reserve.load(Ordering::Relaxed);
        (self.reserve > 0 && free < reserve).then_some(NoSpace { free, reserve })
    }

    /// Sample until `stopped` resolves.
    pub async fn run(self: Arc<Self>, stopped: impl std::future::Future<Output = ()>) {
        if self.reserve == 0 {
            return;
        }
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopped => return,
            }
            let guard = self.clone();
            let _ = tokio::task::spawn_blocking(move || guard.sample()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_would_eat_into_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::new(dir.path().to_path_buf(), 1000, Vec::new());
        g.free.store(1300, Ordering::Relaxed);
        assert!(g.admit(100).is_ok()); // 1300 - 200 = 1100 left
        assert!(g.low_space().is_none());
        let err = g.admit(100).unwrap_err(); // would leave 900
        assert_eq!((err.free, err.reserve), (1100, 1000));
        assert!(g.admit(0).is_ok(), "commands without data always pass");
        g.free.store(999, Ordering::Relaxed);
        assert!(g.low_space().is_some());
    }

    #[test]
    fn samples_the_real_filesystem_and_can_be_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("snapshot");
        std::fs::write(&snapshot, vec![0u8; 4096]).unwrap();
        let g = DiskGuard::new(dir.path().to_path_buf(), 1, vec![snapshot]);
        assert_eq!(g.effective_reserve.load(Ordering::Relaxed), 4097);
        assert!(g.free.load(Ordering::Relaxed) < u64::MAX);
        assert!(g.admit(1).is_ok());
        let off = DiskGuard::new(dir.path().to_path_buf(), 0, Vec::new());
        assert!(off.admit(u64::MAX / 4).is_ok());
        assert!(off.low_space().is_none());
    }
}
