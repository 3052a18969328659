//! Crash-safe replacement of whole files: the log's compaction and every
//! snapshot go through here.
//!
//! A file is written under a temp name unique to this process and call,
//! fsynced, renamed over its final name, and then the directory is fsynced,
//! so after a crash at any point the final name holds either the old or the
//! new contents, never a mixture. Unique temp names keep two writers of the
//! same final name (a snapshot being built while another is installed) from
//! writing into one temp file.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Temp files carry this suffix; a node may delete leftovers on start.
pub const TEMP_SUFFIX: &str = ".tmp";

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// fsync a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A fresh temp path in `dir` for a file that will become `name`.
pub fn temp_path(dir: &Path, name: &str) -> PathBuf {
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{name}.{}.{n}{TEMP_SUFFIX}", std::process::id()))
}

/// Why a replacement failed, and so whether the old file can still be
/// trusted.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    /// Writing or syncing the temp file failed: the old file is untouched
    /// and the temp file was removed.
    #[error("preparing the replacement: {0}")]
    Prepare(io::Error),
    /// The rename or the directory fsync failed: which version the name
    /// holds after a crash is unknown.
    #[error("publishing the replacement: {0}")]
    Publish(io::Error),
}

impl ReplaceError {
    /// Whether the replacement only ran out of space before anything was
    /// published: the old file is intact and nothing failed to sync, so the
    /// caller may carry on with it and try again later. Any other error, an
    /// EIO from fsync included, means the disk cannot be trusted.
    pub fn is_out_of_space_before_publishing(&self) -> bool {
        match self {
            ReplaceError::Prepare(e) => is_out_of_space(e),
            ReplaceError::Publish(_) => false,
        }
    }
}

/// ENOSPC or EDQUOT.
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

impl From<ReplaceError> for io::Error {
    fn from(e: ReplaceError) -> Self {
        match e {
            ReplaceError::Prepare(e) | ReplaceError::Publish(e) => e,
        }
    }
}

/// Replace `dir/name` with what `fill` writes. On any error the temp file is
/// removed; a `Prepare` error leaves the old file (if any) as it was.
pub fn replace_file(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), ReplaceError> {
    let tmp = temp_path(dir, name);
    let prepared = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all()
    })();
    let result = match prepared {
        Ok(()) => publish(&tmp, dir, name).map_err(ReplaceError::Publish),
        Err(e) => Err(ReplaceError::Prepare(e)),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Rename a complete, fsynced temp file over `dir/name` and make the rename
/// durable.
pub fn publish(tmp: &Path, dir: &Path, name: &str) -> io::Result<()> {
    std::fs::rename(tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Remove temp files left in `dir` by a crash (they were never published).
pub fn remove_leftovers(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_the_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        replace_file(dir.path(), "f", |f| f.write_all(b"old")).unwrap();
        let err = replace_file(dir.path(), "f", |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk on fire"))
        });
        assert!(matches!(err, Err(ReplaceError::Prepare(_))));
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }

    #[test]
    fn temp_names_are_unique() {
        let dir = Path::new("/x");
        assert_ne!(temp_path(dir, "s"), temp_path(dir, "s"));
    }
}
