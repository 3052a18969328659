//! The snapshot file: its on-disk format, a streaming writer and a verifying
//! streaming reader, and [`SnapshotFile`], the handle openraft passes around
//! as the snapshot data (built, sent, received, installed).
//!
//! Format, version 3 (version 2 had no envelope times in the
//! de-duplication table; its files are refused as an unknown version):
//!
//! ```text
//! "EDDYSNAP" | version: u8 | meta length: u32 LE | meta (postcard)
//!            | queue state (postcard) | CRC-32 of every byte before it: u32 LE
//! ```
//!
//! Invariants:
//! - A handle reads one inode: renaming another file over its path later
//!   does not change what it reads.
//! - Neither writing nor reading holds the whole file in memory: the state is
//!   encoded into and decoded from a buffered stream.
//! - Nothing is decoded into a state that the caller sees unless the
//!   checksum over the whole file matched.
//! - A handle on an unpublished temp file removes the file when dropped, so
//!   a failed or refused build, transfer or install leaves nothing behind.
//!   (After a crash, [`super::crashsafe::remove_leftovers`] does it.)

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use postcard::de_flavors::Flavor;

use super::crashsafe;
use super::types::SnapshotMeta;
use crate::queue::QueueState;

/// The name of the current snapshot in a state directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";

const MAGIC: &[u8; 8] = b"EDDYSNAP";
const VERSION: u8 = 3;
const HEADER_FIXED: u64 = MAGIC.len() as u64 + 1 + 4;
const TRAILER: u64 = 4;
/// Snapshot meta is a log id and a membership: anything near this is a
/// corrupt length, not a real header.
const MAX_META: u32 = 16 * 1024 * 1024;
const IO_BUFFER: usize = 1024 * 1024;

/// Why a snapshot file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("snapshot file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot file {path} is not an Eddy snapshot (no EDDYSNAP header)")]
    NotASnapshot { path: PathBuf },
    #[error("snapshot file {path} has format version {found}; this build reads version {VERSION}")]
    UnknownVersion { path: PathBuf, found: u8 },
    #[error(
        "snapshot file {path} is corrupt: checksum mismatch (stored {stored:08x}, computed {computed:08x} over {len} bytes)"
    )]
    Checksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
        len: u64,
    },
    #[error("snapshot file {path} is corrupt: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("snapshot file {path} holds the snapshot at {found}, expected {expected}")]
    WrongSnapshot {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

impl SnapshotFileError {
    /// Whether this is a failure of local storage (as opposed to bad data).
    pub fn is_io(&self) -> bool {
        matches!(self, Self::Io { .. })
    }
}

impl From<SnapshotFileError> for io::Error {
    fn from(e: SnapshotFileError) -> Self {
        let kind = match &e {
            SnapshotFileError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// An open snapshot file, the `SnapshotData` of Eddy's Raft.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    path: PathBuf,
    len: u64,
    /// An unpublished temp file this node wrote: removed on drop.
    temp: bool,
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.temp {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SnapshotFileError + '_ {
    move |source| SnapshotFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the published snapshot of a state directory lives.
pub fn current_path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

impl SnapshotFile {
    /// Open the published snapshot in `dir`, if there is one.
    pub fn open_current(dir: &Path) -> Result<Option<Self>, SnapshotFileError> {
        let path = current_path(dir);
        match File::open(&path) {
            Ok(file) => {
                let len = file.metadata().map_err(io_at(&path))?.len();
                Ok(Some(Self {
                    file,
                    path,
                    len,
                    temp: false,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Encode `meta` and `state` into a new fsynced temp file in `dir`.
    pub fn write(
        dir: &Path,
        meta: &SnapshotMeta,
        state: &QueueState,
    ) -> Result<Self, SnapshotFileError> {
        let mut out = Self::create_temp(dir)?;
        let path = out.path.clone();
        let meta_bytes = postcard::to_allocvec(meta).map_err(|e| SnapshotFileError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let mut w = BufWriter::with_capacity(IO_BUFFER, CrcWriter::new(&out.file));
        let result = (|| -> io::Result<()> {
            w.write_all(MAGIC)?;
            w.write_all(&[VERSION])?;
            w.write_all(&(meta_bytes.len() as u32).to_le_bytes())?;
            w.write_all(&meta_bytes)?;
            postcard::to_io(state, &mut w).map_err(io::Error::other)?;
            let mut inner = w.into_inner().map_err(|e| e.into_error())?;
            let crc = inner.crc();
            inner.write_all(&crc.to_le_bytes())?;
            Ok(())
        })();
        result.map_err(io_at(&path))?;
        out.file.sync_all().map_err(io_at(&path))?;
        out.len = out.file.metadata().map_err(io_at(&path))?.len();
        Ok(out)
    }

    /// A new empty temp file in `dir`, for bytes received from a peer.
    pub fn create_temp(dir: &Path) -> Result<Self, SnapshotFileError> {
        let path = crashsafe::temp_path(dir, SNAPSHOT_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at(&path))?;
        Ok(Self {
            file,
            path,
            len: 0,
            temp: true,
        })
    }

    /// Append received bytes (only to a temp file this node created).
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), SnapshotFileError> {
        debug_assert!(self.temp, "appending to a published snapshot");
        self.file
            .write_all_at(bytes, self.len)
            .map_err(io_at(&self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Make appended bytes durable.
    pub fn sync(&self) -> Result<(), SnapshotFileError> {
        self.file.sync_all().map_err(io_at(&self.path))
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read up to `max` bytes at `offset` (fewer only at the end).
    pub fn read_chunk(&self, offset: u64, max: usize) -> Result<Vec<u8>, SnapshotFileError> {
        let n = (self.len.saturating_sub(offset)).min(max as u64) as usize;
        let mut buf = vec![0; n];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(io_at(&self.path))?;
        Ok(buf)
    }

    fn reader(&self) -> PositionedReader<'_> {
        PositionedReader {
            file: &self.file,
            pos: 0,
            end: self.len,
        }
    }

    /// The snapshot meta from the header, without checking the rest.
    pub fn read_meta(&self) -> Result<SnapshotMeta, SnapshotFileError> {
        let mut r = BufReader::new(self.reader());
        self.read_header(&mut r)
    }

    fn read_header(&self, r: &mut impl Read) -> Result<SnapshotMeta, SnapshotFileError> {
        let path = &self.path;
        if self.len < HEADER_FIXED + TRAILER {
            return Err(SnapshotFileError::Malformed {
                path: path.clone(),
                detail: format!("{} bytes is too short for a snapshot", self.len),
            });
        }
        let mut fixed = [0u8; HEADER_FIXED as usize];
        r.read_exact(&mut fixed).map_err(io_at(path))?;
        if &fixed[..MAGIC.len()] != MAGIC {
            return Err(SnapshotFileError::NotASnapshot { path: path.clone() });
        }
        let version = fixed[MAGIC.len()];
        if version != VERSION {
            return Err(SnapshotFileError::UnknownVersion {
                path: path.clone(),
                found: version,
            });
        }
        let meta_len = u32::from_le_bytes(fixed[MAGIC.len() + 1..].try_into().unwrap());
        if meta_len > MAX_META || HEADER_FIXED + meta_len as u64 + TRAILER > self.len {
            return Err(SnapshotFileError::Malformed {
                path: path.clone(),
                detail: format!("meta length {meta_len} does not fit the file"),
            });
        }
        let mut meta = vec![0; meta_len as usize];
        r.read_exact(&mut meta).map_err(io_at(path))?;
        postcard::from_bytes(&meta).map_err(|e| SnapshotFileError::Malformed {
            path: path.clone(),
            detail: format!("meta: {e}"),
        })
    }

    fn stored_crc(&self) -> Result<u32, SnapshotFileError> {
        let mut crc = [0u8; 4];
        self.file
            .read_exact_at(&mut crc, self.len - TRAILER)
            .map_err(io_at(&self.path))?;
        Ok(u32::from_le_bytes(crc))
    }

    fn check_crc(&self, computed: u32) -> Result<(), SnapshotFileError> {
        let stored = self.stored_crc()?;
        if stored == computed {
            Ok(())
        } else {
            Err(SnapshotFileError::Checksum {
                path: self.path.clone(),
                stored,
                computed,
                len: self.len,
            })
        }
    }

    /// Check the whole file (header and checksum) and return its meta.
    pub fn verify(&self) -> Result<SnapshotMeta, SnapshotFileError> {
        if self.len < HEADER_FIXED + TRAILER {
            return Err(SnapshotFileError::Malformed {
                path: self.path.clone(),
                detail: format!("{} bytes is too short for a snapshot", self.len),
            });
        }
        let mut body = CrcReader::new(PositionedReader {
            file: &self.file,
            pos: 0,
            end: self.len - TRAILER,
        });
        io::copy(&mut body, &mut io::sink()).map_err(io_at(&self.path))?;
        self.check_crc(body.crc())?;
        self.read_meta()
    }

    /// Decode the file into its meta and queue state, checking the checksum.
    pub fn decode(&self) -> Result<(SnapshotMeta, QueueState), SnapshotFileError> {
        if self.len < HEADER_FIXED + TRAILER {
            return Err(SnapshotFileError::Malformed {
                path: self.path.clone(),
                detail: format!("{} bytes is too short for a snapshot", self.len),
            });
        }
        let body_len = self.len - TRAILER;
        let mut r = BufReader::with_capacity(
            IO_BUFFER,
            CrcReader::new(PositionedReader {
                file: &self.file,
                pos: 0,
                end: body_len,
            }),
        );
        // A header that does not parse may still be a checksum failure.
        let meta = match self.read_header(&mut r) {
            Ok(meta) => meta,
            Err(e) => return Err(self.prefer_checksum_error(r, e)),
        };
        let remaining = body_len - r.get_ref().inner.pos + r.buffer().len() as u64;
        let flavor = ReadFlavor {
            reader: r,
            remaining,
            scratch: Vec::new(),
            io_error: None,
        };
        let mut de = postcard::Deserializer::from_flavor(flavor);
        let decoded = serde::Deserialize::deserialize(&mut de);
        let flavor = de
            .finalize()
            .expect("finalizing the read flavor cannot fail");
        let ReadFlavor {
            reader: mut r,
            remaining,
            io_error,
            ..
        } = flavor;
        if let Some(e) = io_error {
            return Err(io_at(&self.path)(e));
        }
        let mut state: QueueState = match decoded {
            Ok(state) if remaining == 0 => state,
            Ok(_) => {
                let e = SnapshotFileError::Malformed {
                    path: self.path.clone(),
                    detail: format!("{remaining} bytes after the state"),
                };
                return Err(self.prefer_checksum_error(r, e));
            }
            Err(e) => {
                let e = SnapshotFileError::Malformed {
                    path: self.path.clone(),
                    detail: format!("state: {e}"),
                };
                return Err(self.prefer_checksum_error(r, e));
            }
        };
        let _ = io::copy(&mut r, &mut io::sink()).map_err(io_at(&self.path))?;
        self.check_crc(r.get_ref().crc())?;
        state.rebuild_derived();
        Ok((meta, state))
    }

    /// After a parse failure: report a checksum mismatch if there is one
    /// (the clearer diagnosis), else the parse failure.
    fn prefer_checksum_error(
        &self,
        mut r: BufReader<CrcReader<PositionedReader<'_>>>,
        parse: SnapshotFileError,
    ) -> SnapshotFileError {
        if let Err(e) = io::copy(&mut r, &mut io::sink()) {
            return io_at(&self.path)(e);
        }
        match self.check_crc(r.get_ref().crc()) {
            Err(checksum) => checksum,
            Ok(()) => parse,
        }
    }

    /// Make this snapshot the current one in `dir`: rename it there if it is
    /// a temp file of that directory, else copy it to a temp file there
    /// first. The caller decides whether it should replace the current one.
    pub fn publish(self, dir: &Path) -> Result<Self, SnapshotFileError> {
        let mut source = self;
        if !(source.temp && source.path.parent() == Some(dir)) {
            let mut copy = Self::create_temp(dir)?;
            let mut w = BufWriter::with_capacity(IO_BUFFER, &copy.file);
            io::copy(&mut source.reader(), &mut w)
                .and_then(|_| w.flush())
                .map_err(io_at(&copy.path))?;
            drop(w);
            copy.len = source.len;
            source = copy;
        }
        source.sync()?;
        crashsafe::publish(&source.path, dir, SNAPSHOT_FILE).map_err(io_at(&source.path))?;
        source.temp = false;
        source.path = current_path(dir);
        Ok(source)
    }
}

/// Sequential reads through `pread`, so that several readers of one handle
/// never disturb each other's position.
struct PositionedReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "snapshot file shrank while being read",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

struct CrcReader<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R> CrcReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: crc32fast::Hasher::new(),
        }
    }

    fn crc(&self) -> u32 {
        self.hasher.clone().finalize()
    }
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W> CrcWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: crc32fast::Hasher::new(),
        }
    }

    fn crc(&self) -> u32 {
        self.hasher.clone().finalize()
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// postcard decoding from a reader into owned values, with one reusable
/// scratch buffer. Unlike postcard's own reader flavor it needs no buffer
/// sized in advance for the largest payload, and it refuses a length that
/// exceeds what is left of the file before allocating for it.
struct ReadFlavor<R> {
    reader: R,
    remaining: u64,
    scratch: Vec<u8>,
    io_error: Option<io::Error>,
}

impl<R: Read> ReadFlavor<R> {
    fn fill(&mut self, n: usize) -> postcard::Result<()> {
        if n as u64 > self.remaining {
            return Err(postcard::Error::DeserializeUnexpectedEnd);
        }
        if self.scratch.len() < n {
            self.scratch.resize(n, 0);
        }
        if let Err(e) = self.reader.read_exact(&mut self.scratch[..n]) {
            self.io_error = Some(e);
            return Err(postcard::Error::DeserializeUnexpectedEnd);
        }
        self.remaining -= n as u64;
        Ok(())
    }
}

impl<'de, R: Read + 'de> Flavor<'de> for ReadFlavor<R> {
    type Remainder = Self;
    type Source = R;

    fn pop(&mut self) -> postcard::Result<u8> {
        self.fill(1)?;
        Ok(self.scratch[0])
    }

    fn size_hint(&self) -> Option<usize> {
        usize::try_from(self.remaining).ok()
    }

    /// Borrowed data cannot outlive the scratch buffer; the queue state
    /// owns all of its strings and bytes, so this is never reached.
    fn try_take_n(&mut self, _ct: usize) -> postcard::Result<&'de [u8]> {
        Err(postcard::Error::DeserializeBadEncoding)
    }

    fn try_take_n_temp<'a>(&'a mut self, ct: usize) -> postcard::Result<&'a [u8]>
    where
        'de: 'a,
    {
        self.fill(ct)?;
        Ok(&self.scratch[..ct])
    }

    fn finalize(self) -> postcard::Result<Self> {
        Ok(self)
    }
}
