//! The on-disk format of the Raft log file and its recovery scan.
//!
//! ```text
//! file   = file-header batch*
//! file-header (24 bytes) = "EDDY-WAL" | version u32 | salt u64 | crc32 of the previous 20 bytes u32
//! batch  = batch-header body
//! batch-header (20 bytes) = magic u32 | body length u64 | crc32 of body u32 | header crc u32
//! body   = record*
//! record = length u64 | postcard encoding of `Record`
//! ```
//!
//! All integers are little endian and every length is a u64. The header crc
//! covers the file's random salt, the batch's own byte offset and the first 16
//! header bytes, so a valid batch header cannot be forged by bytes a client
//! put in an entry, nor be a stale copy from elsewhere in the file.
//!
//! A batch is what the flusher writes with one `write` call and covers with
//! one fsync, and it is never overwritten. Every batch but the last was
//! therefore fsynced before the next was written, so only the last batch can
//! be torn by a crash (its pages may reach the disk in any order, the header
//! page included). Recovery reads batches from the start; at the first batch
//! that does not check out it looks for any valid batch header further on:
//! - none: a torn tail, holding nothing that was ever acknowledged; it is
//!   cut off;
//! - one: the damage is not at the end, so acknowledged data is damaged
//!   (corruption); the node must not start, and the error names the file and
//!   the offset.
//!
//! Looking for a later header tests a 4-byte magic at each offset and only
//! computes the 32-byte header checksum where the magic matches, so damaged
//! regions are scanned in linear time.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use openraft::entry::RaftEntry;

use crate::raft::types::{Entry, LogId, Vote};

/// The format this code writes and the only one it reads. Version 1 (before
/// batches) had no file header.
pub const FORMAT_VERSION: u32 = 2;
pub const WAL_FILE: &str = "raft.wal";

const FILE_MAGIC: &[u8; 8] = b"EDDY-WAL";
pub(super) const FILE_HEADER_LEN: u64 = 24;
const BATCH_MAGIC: u32 = 0xBA7C_EDD1;
pub(super) const BATCH_HEADER_LEN: u64 = 20;
const RECORD_LEN_PREFIX: u64 = 8;

/// Why a log file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("raft log {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error(
        "raft log {path} is corrupt at byte offset {offset}: {reason}; refusing to start \
         (inspect it with `eddy wal check`)"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "raft log {path} has format version {found}, this eddy reads only version {FORMAT_VERSION}"
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error(
        "raft log {path} does not start with an eddy log header: it was written by an eddy \
         older than log format {FORMAT_VERSION}, or is not a raft log; move the data \
         directory away to start this node afresh"
    )]
    UnknownFormat { path: PathBuf },
}

impl WalError {
    pub(super) fn io(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
        move |error| WalError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// One change to the log, as decoded from the file.
#[derive(Debug, serde::Deserialize)]
pub(super) enum Record {
    Entry(Entry),
    Vote(Vote),
    Committed(Option<LogId>),
    TruncateAfter(Option<LogId>),
    Purge(LogId),
}

/// The same as [`Record`], borrowed for encoding; serializes identically.
#[derive(serde::Serialize)]
pub(super) enum RecordRef<'a> {
    Entry(&'a Entry),
    Vote(&'a Vote),
    Committed(&'a Option<LogId>),
    TruncateAfter(&'a Option<LogId>),
    Purge(&'a LogId),
}

/// Append one length-prefixed record to `out`; returns its size in bytes,
/// prefix included.
pub(super) fn encode_record(record: &RecordRef, out: &mut Vec<u8>) -> io::Result<u64> {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_LEN_PREFIX as usize]);
    *out = postcard::to_extend(record, std::mem::take(out)).map_err(io::Error::other)?;
    let len = (out.len() - start) as u64 - RECORD_LEN_PREFIX;
    out[start..start + RECORD_LEN_PREFIX as usize].copy_from_slice(&len.to_le_bytes());
    Ok(len + RECORD_LEN_PREFIX)
}

/// Read the records of one batch body (exactly `body_len` bytes of `r`).
/// Each record comes with its encoded size.
pub(super) fn decode_records(
    r: &mut dyn Read,
    body_len: u64,
) -> Result<Vec<(Record, u64)>, String> {
    let mut out = Vec::new();
    let mut left = body_len;
    while left > 0 {
        if left < RECORD_LEN_PREFIX {
            return Err(format!("{left} stray bytes after the last record"));
        }
        let mut prefix = [0; RECORD_LEN_PREFIX as usize];
        r.read_exact(&mut prefix).map_err(|e| e.to_string())?;
        let len = u64::from_le_bytes(prefix);
        left -= RECORD_LEN_PREFIX;
        if len > left {
            return Err(format!(
                "a record of {len} bytes overruns its batch ({left} bytes left)"
            ));
        }
        let mut bytes = vec![0; usize::try_from(len).map_err(|e| e.to_string())?];
        r.read_exact(&mut bytes).map_err(|e| e.to_string())?;
        left -= len;
        let (record, rest) =
            postcard::take_from_bytes::<Record>(&bytes).map_err(|e| format!("a record: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} stray bytes inside a record", rest.len()));
        }
        out.push((record, len + RECORD_LEN_PREFIX));
    }
    Ok(out)
}

pub(super) fn encode_file_header(salt: u64) -> [u8; FILE_HEADER_LEN as usize] {
    let mut h = [0; FILE_HEADER_LEN as usize];
    h[0..8].copy_from_slice(FILE_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32fast::hash(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The salt of a file with this header, or why the file cannot be read.
fn decode_file_header(h: &[u8], path: &Path) -> Result<u64, WalError> {
    if h.len() < FILE_HEADER_LEN as usize || &h[0..8] != FILE_MAGIC {
        return Err(WalError::UnknownFormat {
            path: path.to_path_buf(),
        });
    }
    let crc = u32::from_le_bytes(h[20..24].try_into().unwrap());
    if crc32fast::hash(&h[0..20]) != crc {
        return Err(WalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "file header checksum mismatch".into(),
        });
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(WalError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    Ok(u64::from_le_bytes(h[12..20].try_into().unwrap()))
}

pub(super) fn new_salt() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// The fixed-size head of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BatchHeader {
    pub body_len: u64,
    pub body_crc: u32,
}

fn header_crc(salt: u64, offset: u64, first16: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&offset.to_le_bytes());
    h.update(first16);
    h.finalize()
}

impl BatchHeader {
    pub fn encode(&self, salt: u64, offset: u64) -> [u8; BATCH_HEADER_LEN as usize] {
        let mut h = [0; BATCH_HEADER_LEN as usize];
        h[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        h[4..12].copy_from_slice(&self.body_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = header_crc(salt, offset, &h[0..16]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The header at byte `offset` of a file with `salt`, if `h` is one.
    pub fn decode(h: &[u8], salt: u64, offset: u64) -> Option<Self> {
        if h.len() < BATCH_HEADER_LEN as usize
            || u32::from_le_bytes(h[0..4].try_into().unwrap()) != BATCH_MAGIC
        {
            return None;
        }
        let crc = u32::from_le_bytes(h[16..20].try_into().unwrap());
        if header_crc(salt, offset, &h[0..16]) != crc {
            return None;
        }
        Some(Self {
            body_len: u64::from_le_bytes(h[4..12].try_into().unwrap()),
            body_crc: u32::from_le_bytes(h[12..16].try_into().unwrap()),
        })
    }
}

/// Turn `buf` (a reserved header followed by a body of records) into a
/// batch to be written at `offset`.
pub(super) fn seal_batch(buf: &mut [u8], salt: u64, offset: u64) {
    let body = &buf[BATCH_HEADER_LEN as usize..];
    let header = BatchHeader {
        body_len: body.len() as u64,
        body_crc: crc32fast::hash(body),
    };
    buf[..BATCH_HEADER_LEN as usize].copy_from_slice(&header.encode(salt, offset));
}

/// An empty batch buffer: room for the header, then records are appended.
pub(super) fn new_batch() -> Vec<u8> {
    vec![0; BATCH_HEADER_LEN as usize]
}

/// What follows the last good batch of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The file ends right after a good batch, or only zeros follow it
    /// (space the writer prepared ahead of its writes).
    Clean,
    /// A batch that was being written when the node stopped: nothing valid
    /// after `offset`, `bytes` bytes to cut.
    Torn { offset: u64, bytes: u64 },
    /// Damage at `offset` with valid data after it.
    Corrupt { offset: u64, reason: String },
}

/// Where the walk over the batches of a file stopped.
#[derive(Debug)]
pub(super) struct Walk {
    /// Good batches read.
    pub batches: u64,
    /// End of the last good batch.
    pub good_end: u64,
    pub tail: Tail,
}

/// A reader of exactly one batch body that checksums what passes through.
struct BodyReader<'a, R> {
    inner: io::Take<&'a mut R>,
    crc: crc32fast::Hasher,
}

impl<R: Read> Read for BodyReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

/// Read the batches of a file after its header. Each body is handed to
/// `read_body` as a stream while its checksum is computed; `accept` gets what
/// `read_body` made of a body only once that body's checksum matched. A body
/// with a good checksum that `read_body` rejects is corruption.
pub(super) fn walk_batches<R: Read + Seek, T>(
    r: &mut R,
    salt: u64,
    file_len: u64,
    mut read_body: impl FnMut(&mut dyn Read, u64) -> Result<T, String>,
    mut accept: impl FnMut(u64, T),
) -> io::Result<Walk> {
    let mut pos = FILE_HEADER_LEN;
    let mut batches = 0;
    r.seek(SeekFrom::Start(pos))?;
    loop {
        if pos == file_len {
            return Ok(Walk {
                batches,
                good_end: pos,
                tail: Tail::Clean,
            });
        }
        let bad = |reason: String, r: &mut R| -> io::Result<Walk> {
            // Space the writer filled with zeros ahead of its writes, which
            // no batch reached: the log ends here, as if the file did.
            if zeros_to_end(r, pos, file_len)? {
                return Ok(Walk {
                    batches,
                    good_end: pos,
                    tail: Tail::Clean,
                });
            }
            let tail = match find_batch_header(r, salt, pos + 1, file_len)? {
                Some(next) => Tail::Corrupt {
                    offset: pos,
                    reason: format!("{reason}, and a valid batch follows at offset {next}"),
                },
                None => Tail::Torn {
                    offset: pos,
                    bytes: file_len - pos,
                },
            };
            Ok(Walk {
                batches,
                good_end: pos,
                tail,
            })
        };
        let mut head = [0; BATCH_HEADER_LEN as usize];
        if file_len - pos < BATCH_HEADER_LEN {
            return bad("a short batch header".into(), r);
        }
        r.read_exact(&mut head)?;
        let Some(header) = BatchHeader::decode(&head, salt, pos) else {
            return bad("a bad batch header".into(), r);
        };
        let end = match (pos + BATCH_HEADER_LEN).checked_add(header.body_len) {
            Some(end) if end <= file_len => end,
            _ => {
                return bad(
                    format!(
                        "a batch of {} bytes that the file does not hold",
                        header.body_len
                    ),
                    r,
                );
            }
        };
        let mut body = BodyReader {
            inner: r.by_ref().take(header.body_len),
            crc: crc32fast::Hasher::new(),
        };
        let made = read_body(&mut body, header.body_len);
        io::copy(&mut body, &mut io::sink())?;
        if body.crc.finalize() != header.body_crc {
            return bad("a batch body checksum mismatch".into(), r);
        }
        match made {
            Ok(made) => accept(pos, made),
            Err(reason) => {
                return Ok(Walk {
                    batches,
                    good_end: pos,
                    tail: Tail::Corrupt {
                        offset: pos,
                        reason: format!("a batch with a good checksum does not decode: {reason}"),
                    },
                });
            }
        }
        batches += 1;
        pos = end;
    }
}

/// Whether every byte from `from` to the end of the file is zero.
fn zeros_to_end<R: Read + Seek>(r: &mut R, from: u64, file_len: u64) -> io::Result<bool> {
    r.seek(SeekFrom::Start(from))?;
    let mut rest = r.by_ref().take(file_len - from);
    let mut buf = vec![0; 64 << 10];
    loop {
        let n = rest.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
}

/// The offset of the first valid batch header at or after `from`.
fn find_batch_header<R: Read + Seek>(
    r: &mut R,
    salt: u64,
    from: u64,
    file_len: u64,
) -> io::Result<Option<u64>> {
    const WINDOW: usize = 1 << 20;
    let overlap = BATCH_HEADER_LEN as usize - 1;
    let magic = BATCH_MAGIC.to_le_bytes();
    let mut buf = vec![0; WINDOW + overlap];
    let mut start = from;
    while start + BATCH_HEADER_LEN <= file_len {
        let want = (file_len - start).min(buf.len() as u64) as usize;
        r.seek(SeekFrom::Start(start))?;
        r.read_exact(&mut buf[..want])?;
        let window = &buf[..want];
        let last = want - BATCH_HEADER_LEN as usize;
        for i in 0..=last {
            if window[i..i + 4] == magic
                && BatchHeader::decode(&window[i..], salt, start + i as u64).is_some()
            {
                return Ok(Some(start + i as u64));
            }
        }
        start += last as u64 + 1;
    }
    Ok(None)
}

/// An entry held in memory with the size of its record in the file.
#[derive(Debug, Clone)]
pub(super) struct StoredEntry {
    pub entry: Entry,
    pub size: u64,
}

/// The live state of the log: what replaying its records yields.
#[derive(Debug, Default)]
pub(super) struct Contents {
    pub entries: BTreeMap<u64, StoredEntry>,
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
    /// Sum of the record sizes of `entries`.
    pub entry_bytes: u64,
}

impl Contents {
    pub fn insert(&mut self, entry: Entry, size: u64) {
        self.entry_bytes += size;
        if let Some(old) = self
            .entries
            .insert(entry.index(), StoredEntry { entry, size })
        {
            self.entry_bytes -= old.size;
        }
    }

    pub fn truncate_after(&mut self, after: Option<&LogId>) {
        let from = after.map_or(0, |id| id.index() + 1);
        let removed = self.entries.split_off(&from);
        self.entry_bytes -= removed.values().map(|e| e.size).sum::<u64>();
    }

    pub fn purge(&mut self, upto: &LogId) {
        let keep = self.entries.split_off(&(upto.index() + 1));
        let removed = std::mem::replace(&mut self.entries, keep);
        self.entry_bytes -= removed.values().map(|e| e.size).sum::<u64>();
        self.last_purged = Some(*upto);
    }

    pub fn apply(&mut self, record: Record, size: u64) {
        match record {
            Record::Entry(e) => self.insert(e, size),
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
            Record::TruncateAfter(after) => self.truncate_after(after.as_ref()),
            Record::Purge(upto) => self.purge(&upto),
        }
    }

    pub fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|e| e.entry.log_id())
            .or(self.last_purged)
    }
}

/// A copy of the live state taken at one point of the job order, from
/// which the flusher rewrites the file.
pub(super) struct LiveState {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
    pub entries: Vec<Entry>,
}

impl LiveState {
    pub fn of(c: &Contents) -> Self {
        Self {
            vote: c.vote,
            committed: c.committed,
            last_purged: c.last_purged,
            entries: c.entries.values().map(|e| e.entry.clone()).collect(),
        }
    }

    /// Write a complete log file holding this state to `out`, in batches of
    /// about `batch_bytes`; returns the file's length.
    pub fn write_file(&self, salt: u64, batch_bytes: u64, out: &mut dyn Write) -> io::Result<u64> {
        out.write_all(&encode_file_header(salt))?;
        let mut offset = FILE_HEADER_LEN;
        let mut batch = new_batch();
        if let Some(v) = &self.vote {
            encode_record(&RecordRef::Vote(v), &mut batch)?;
        }
        if let Some(p) = &self.last_purged {
            encode_record(&RecordRef::Purge(p), &mut batch)?;
        }
        encode_record(&RecordRef::Committed(&self.committed), &mut batch)?;
        for e in &self.entries {
            if batch.len() as u64 >= batch_bytes {
                offset += flush_batch(&mut batch, salt, offset, out)?;
            }
            encode_record(&RecordRef::Entry(e), &mut batch)?;
        }
        offset += flush_batch(&mut batch, salt, offset, out)?;
        // A rewritten file is fsynced whole before it is published, so none
        // of it can be torn. An empty closing batch makes damage anywhere in
        // the contents above be followed by a valid batch, and so be refused
        // as corruption instead of cut as a torn tail.
        offset += flush_batch(&mut batch, salt, offset, out)?;
        Ok(offset)
    }
}

fn flush_batch(
    batch: &mut Vec<u8>,
    salt: u64,
    offset: u64,
    out: &mut dyn Write,
) -> io::Result<u64> {
    seal_batch(batch, salt, offset);
    out.write_all(batch)?;
    let len = batch.len() as u64;
    *batch = new_batch();
    Ok(len)
}

/// What recovery found in a log file.
#[derive(Debug)]
pub(super) struct Recovered {
    pub salt: u64,
    pub file_len: u64,
    pub records: u64,
    pub walk: Walk,
    pub contents: Contents,
}

/// Read a whole log file (read only). Unknown formats and I/O errors are
/// errors; damage is reported in `walk.tail`.
pub(super) fn recover(path: &Path) -> Result<Recovered, WalError> {
    let io = WalError::io;
    let file = std::fs::File::open(path).map_err(io(path))?;
    let file_len = file.metadata().map_err(io(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = Vec::new();
    r.by_ref()
        .take(FILE_HEADER_LEN)
        .read_to_end(&mut head)
        .map_err(io(path))?;
    let salt = decode_file_header(&head, path)?;
    let mut contents = Contents::default();
    let mut records = 0;
    let walk = walk_batches(
        &mut r,
        salt,
        file_len,
        |body, len| decode_records(body, len),
        |_, batch| {
            for (record, size) in batch {
                records += 1;
                contents.apply(record, size);
            }
        },
    )
    .map_err(io(path))?;
    Ok(Recovered {
        salt,
        file_len,
        records,
        walk,
        contents,
    })
}

/// What `eddy wal check` reports about a log file.
#[derive(Debug)]
pub struct WalReport {
    pub path: PathBuf,
    pub file_bytes: u64,
    /// Where the last good batch ends; beyond it the file holds zeros
    /// prepared for later writes, or a torn or corrupt tail.
    pub log_bytes: u64,
    pub batches: u64,
    pub records: u64,
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    pub vote: Option<String>,
    pub committed: Option<String>,
    pub purged: Option<String>,
    pub tail: Tail,
}

impl WalReport {
    pub fn is_corrupt(&self) -> bool {
        matches!(self.tail, Tail::Corrupt { .. })
    }
}

impl fmt::Display for WalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "none".into());
        let idx = |o: Option<u64>| o.map_or_else(|| "none".into(), |i| i.to_string());
        writeln!(
            f,
            "file       {} ({} bytes, the log's {})",
            self.path.display(),
            self.file_bytes,
            self.log_bytes
        )?;
        writeln!(f, "format     version {FORMAT_VERSION}")?;
        writeln!(f, "batches    {}", self.batches)?;
        writeln!(f, "records    {}", self.records)?;
        writeln!(
            f,
            "entries    {} ..= {}",
            idx(self.first_index),
            idx(self.last_index)
        )?;
        writeln!(f, "vote       {}", opt(&self.vote))?;
        writeln!(f, "committed  {}", opt(&self.committed))?;
        writeln!(f, "purged     {}", opt(&self.purged))?;
        match &self.tail {
            Tail::Clean => write!(f, "clean"),
            Tail::Torn { offset, bytes } => {
                write!(f, "torn tail at offset {offset} ({bytes} bytes)")
            }
            Tail::Corrupt { offset, reason } => write!(f, "corrupt at offset {offset}: {reason}"),
        }
    }
}

/// Scan the log of a data directory (or of its `raft` directory) without
/// changing it.
pub fn check(dir: &Path) -> Result<WalReport, WalError> {
    let path = [dir.join("raft").join(WAL_FILE), dir.join(WAL_FILE)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("raft").join(WAL_FILE));
    let r = recover(&path)?;
    let c = &r.contents;
    Ok(WalReport {
        file_bytes: r.file_len,
        log_bytes: r.walk.good_end,
        batches: r.walk.batches,
        records: r.records,
        first_index: c.entries.keys().next().copied(),
        last_index: c.entries.keys().next_back().copied(),
        vote: c.vote.as_ref().map(|v| v.to_string()),
        committed: c.committed.as_ref().map(|v| v.to_string()),
        purged: c.last_purged.as_ref().map(|v| v.to_string()),
        tail: r.walk.tail,
        path,
    })
}
