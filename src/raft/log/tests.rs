//! The log store against openraft's storage conformance suite, and its
//! crash behaviour: torn tails, failed writes, fsyncs and compactions.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use openraft::StorageError;
use openraft::entry::RaftEntry;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::OneshotReceiverOf;

use super::flusher::{DiskFile, WalFile};
use super::record::{
    self, BATCH_HEADER_LEN, BatchHeader, FILE_HEADER_LEN, FORMAT_VERSION, WAL_FILE,
    encode_file_header,
};
use super::*;
use crate::queue::{Command, Envelope};
use crate::raft::crashsafe::ReplaceError;
use crate::raft::state_machine::StateMachine;

fn log_id(index: u64) -> LogId {
    openraft::testing::log_id::<TypeConfig>(1, 1, index)
}

/// An entry whose record is a little over `payload` bytes.
fn entry(index: u64, payload: usize) -> Entry {
    Entry::new_normal(
        log_id(index),
        Envelope {
            id: index as u128,
            now_ms: 0,
            command: Command::DeleteService {
                name: "x".repeat(payload),
            },
        },
    )
}

fn vote() -> Vote {
    Vote::new(7, 2)
}

fn callback() -> (
    IOFlushed<TypeConfig>,
    OneshotReceiverOf<TypeConfig, io::Result<()>>,
) {
    let (tx, rx) = TypeConfig::oneshot();
    (IOFlushed::signal(tx), rx)
}

async fn append_durably(store: &mut LogStore, entries: Vec<Entry>) {
    let (cb, rx) = callback();
    store.append(entries, cb).await.unwrap();
    rx.await.unwrap().unwrap();
}

fn indexes(store: &LogStore) -> Vec<u64> {
    store.lock().contents.entries.keys().copied().collect()
}

fn opts() -> LogOptions {
    LogOptions::default()
}

/// Options that compact at every purge that leaves the file mostly dead.
fn always_compact() -> LogOptions {
    LogOptions {
        compact_min_bytes: 0,
        ..opts()
    }
}

/// A log with a fault-injecting file, holding entries 1..=10 of 1,000 bytes.
async fn faulty_log_of_ten(dir: &Path) -> (LogStore, Arc<StorageHealth>, Arc<Faults>) {
    let (mut store, health, faults) = open_faulty(dir, always_compact());
    append_durably(&mut store, (1..=10).map(|i| entry(i, 1000)).collect()).await;
    (store, health, faults)
}

/// Where the log in file `path` ends (zeros written ahead may follow).
fn log_end(path: &Path) -> u64 {
    check(path.parent().unwrap()).unwrap().log_bytes
}

/// Byte offsets of the good batches of a log file.
fn batch_offsets(path: &Path) -> Vec<u64> {
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut head = [0; FILE_HEADER_LEN as usize];
    f.read_exact(&mut head).unwrap();
    let salt = salt_of(&head);
    let mut offsets = Vec::new();
    let walk = record::walk_batches(
        &mut f,
        salt,
        len,
        |_, _| Ok(()),
        |offset, ()| offsets.push(offset),
    )
    .unwrap();
    assert_eq!(walk.tail, Tail::Clean);
    offsets
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(&dir.path().join("log"), StorageHealth::new()).unwrap();
        let (sm, _events) =
            StateMachine::open(&dir.path().join("sm"), StorageHealth::new()).unwrap();
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder).await.unwrap();
}

/// Finding 1: writes queued after a compaction, in the same wake-up of the
/// flusher, land in the new file (the old flusher acknowledged them, then
/// renamed the compacted file over them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_compact_write_in_one_batch_keeps_every_entry_and_the_vote() {
    let dir = tempfile::tempdir().unwrap();
    let options = always_compact();
    let mut store = LogStore::open_with(dir.path(), StorageHealth::new(), options.clone()).unwrap();
    let release = store.hold_flusher();

    let (cb_before, before) = callback();
    store
        .append((1..=10).map(|i| entry(i, 1000)), cb_before)
        .await
        .unwrap();
    store.purge(log_id(8)).await.unwrap();
    let (cb_after, after) = callback();
    store
        .append((11..=12).map(|i| entry(i, 1000)), cb_after)
        .await
        .unwrap();
    store.save_committed(Some(log_id(12))).await.unwrap();
    let mut vote_saved = {
        let mut s = store.clone();
        Box::pin(async move { s.save_vote(&vote()).await })
    };
    // Queue the vote behind the rest before the flusher wakes.
    assert!(futures::poll!(&mut vote_saved).is_pending());

    drop(release);
    before.await.unwrap().unwrap();
    after.await.unwrap().unwrap();
    vote_saved.await.unwrap();
    drop(store);

    let file_len = log_end(&dir.path().join(WAL_FILE));
    assert!(
        file_len < 8 * 1000,
        "the file was rewritten without the 8 purged entries ({file_len} bytes)"
    );
    let mut reopened = LogStore::open_with(dir.path(), StorageHealth::new(), options).unwrap();
    assert_eq!(indexes(&reopened), vec![9, 10, 11, 12]);
    assert_eq!(reopened.read_vote().await.unwrap(), Some(vote()));
    assert_eq!(reopened.read_committed().await.unwrap(), Some(log_id(12)));
    let state = reopened.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(8)));
    assert_eq!(state.last_log_id, Some(log_id(12)));
}

/// A log of five batches of two entries each; returns the file and the
/// offsets of its batches.
async fn five_batches(dir: &Path) -> (PathBuf, Vec<u64>) {
    let mut store = LogStore::open(dir, StorageHealth::new()).unwrap();
    for b in 0..5 {
        append_durably(
            &mut store,
            vec![entry(2 * b + 1, 300), entry(2 * b + 2, 300)],
        )
        .await;
    }
    drop(store);
    let path = dir.join(WAL_FILE);
    let offsets = batch_offsets(&path);
    assert_eq!(offsets.len(), 5);
    (path, offsets)
}

fn flip_bit(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x10;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
}

/// Finding 2: one flipped bit in a body with valid batches after it is
/// corruption: open refuses, naming the file and the offset (the old
/// recovery called it a torn tail and dropped every later record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_mid_file_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, offsets) = five_batches(dir.path()).await;
    flip_bit(&path, offsets[2] + BATCH_HEADER_LEN + 100);
    let len_before = std::fs::metadata(&path).unwrap().len();
    let err = LogStore::open(dir.path(), StorageHealth::new())
        .err()
        .expect("a corrupt log must not open");
    match &err {
        WalError::Corrupt {
            path: p, offset, ..
        } => {
            assert_eq!(p, &path);
            assert_eq!(*offset, offsets[2]);
        }
        other => panic!("expected corruption, got {other}"),
    }
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("offset {}", offsets[2])),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        len_before,
        "a corrupt log is left as it is"
    );
}

/// A damaged batch header mid-file is corruption too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_a_header_mid_file_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, offsets) = five_batches(dir.path()).await;
    flip_bit(&path, offsets[1] + 5);
    let err = LogStore::open(dir.path(), StorageHealth::new()).err();
    assert!(
        matches!(err, Some(WalError::Corrupt { offset, .. }) if offset == offsets[1]),
        "{err:?}"
    );
}

/// A torn last batch (cut short, or with its header page missing) is cut
/// off on open and the earlier batches survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_batch_is_cut() {
    for damage in ["short", "header zeroed", "body bit"] {
        let dir = tempfile::tempdir().unwrap();
        let (path, offsets) = five_batches(dir.path()).await;
        let len = log_end(&path);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        match damage {
            "short" => f.set_len(len - 7).unwrap(),
            "header zeroed" => {
                drop(f);
                let mut bytes = std::fs::read(&path).unwrap();
                let at = offsets[4] as usize;
                bytes[at..at + BATCH_HEADER_LEN as usize].fill(0);
                std::fs::write(&path, bytes).unwrap();
            }
            _ => flip_bit(&path, len - 3),
        }
        let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
        assert_eq!(indexes(&store), (1..=8).collect::<Vec<_>>(), "{damage}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            offsets[4],
            "{damage}"
        );
        // The log goes on after the cut.
        append_durably(&mut store, vec![entry(9, 10)]).await;
        drop(store);
        let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
        assert_eq!(indexes(&store), (1..=9).collect::<Vec<_>>(), "{damage}");
    }
}

/// `eddy wal check` on a clean, a torn and a corrupt log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_check_reports_clean_torn_and_corrupt() {
    let data = tempfile::tempdir().unwrap();
    let raft = data.path().join("raft");
    let (path, offsets) = five_batches(&raft).await;
    let len = log_end(&path);

    for dir in [data.path(), raft.as_path()] {
        let report = check(dir).unwrap();
        assert_eq!(report.path, path);
        assert_eq!(report.tail, Tail::Clean);
        assert_eq!((report.batches, report.records), (5, 10));
        assert_eq!((report.first_index, report.last_index), (Some(1), Some(10)));
        assert!(!report.is_corrupt());
        assert!(report.to_string().ends_with("clean"), "{report}");
    }

    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let report = check(data.path()).unwrap();
    let torn = len - 7 - offsets[4];
    assert_eq!(
        report.tail,
        Tail::Torn {
            offset: offsets[4],
            bytes: torn
        }
    );
    assert_eq!((report.batches, report.last_index), (4, Some(8)));
    assert!(
        report.to_string().ends_with(&format!(
            "torn tail at offset {} ({torn} bytes)",
            offsets[4]
        )),
        "{report}"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        len - 7,
        "check changes nothing"
    );

    flip_bit(&path, offsets[1] + BATCH_HEADER_LEN + 10);
    let report = check(data.path()).unwrap();
    assert!(report.is_corrupt());
    assert!(matches!(report.tail, Tail::Corrupt { offset, .. } if offset == offsets[1]));
    assert_eq!((report.batches, report.last_index), (1, Some(2)));
    assert!(
        report
            .to_string()
            .contains(&format!("corrupt at offset {}: ", offsets[1])),
        "{report}"
    );
}

#[derive(Default)]
struct Faults {
    fail_sync: AtomicBool,
    fail_replace: AtomicBool,
    fail_prepare: AtomicBool,
    appends: AtomicU64,
    syncs: AtomicU64,
}

/// The real file, with failures injected on demand.
struct FaultyFile {
    inner: DiskFile,
    faults: Arc<Faults>,
}

impl WalFile for FaultyFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.faults.appends.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(offset, bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.faults.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected EIO"));
        }
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync()
    }

    fn replace(
        &mut self,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), ReplaceError> {
        if self.faults.fail_replace.load(Ordering::SeqCst) {
            return Err(ReplaceError::Publish(io::Error::other(
                "injected rename failure",
            )));
        }
        if self.faults.fail_prepare.load(Ordering::SeqCst) {
            return Err(ReplaceError::Prepare(io::Error::from(
                io::ErrorKind::StorageFull,
            )));
        }
        self.inner.replace(fill)
    }
}

fn open_faulty(dir: &Path, options: LogOptions) -> (LogStore, Arc<StorageHealth>, Arc<Faults>) {
    let health = StorageHealth::new();
    let faults = Arc::new(Faults::default());
    let f = faults.clone();
    let store = LogStore::open_inner(dir, health.clone(), options, move |inner| {
        Box::new(FaultyFile { inner, faults: f })
    })
    .unwrap();
    (store, health, faults)
}

/// Finding 3: a failed fsync fails that batch, latches the health with a
/// reason naming the file, and nothing is written after it: jobs already
/// queued fail at once, new ones are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, health, faults) = open_faulty(dir.path(), opts());
    append_durably(&mut store, vec![entry(1, 10)]).await;

    faults.fail_sync.store(true, Ordering::SeqCst);
    let first = store.hold_flusher();
    let (cb, failing) = callback();
    store.append(vec![entry(2, 10)], cb).await.unwrap();
    let second = store.hold_flusher();
    let (cb, queued) = callback();
    store.append(vec![entry(3, 10)], cb).await.unwrap();

    drop(first);
    let err = failing.await.unwrap().expect_err("the fsync failed");
    assert!(err.to_string().contains("injected EIO"), "{err}");
    let reason = health.failure().expect("health is latched");
    assert!(
        reason.contains("fsync") && reason.contains(WAL_FILE),
        "{reason}"
    );
    let appends = faults.appends.load(Ordering::SeqCst);
    let len = std::fs::metadata(dir.path().join(WAL_FILE)).unwrap().len();

    // Refused at once.
    let (cb, _never) = callback();
    assert!(store.append(vec![entry(4, 10)], cb).await.is_err());
    assert!(store.save_vote(&vote()).await.is_err());
    assert!(store.save_committed(Some(log_id(1))).await.is_err());
    assert!(store.truncate_after(None).await.is_err());
    assert!(store.purge(log_id(1)).await.is_err());
    assert_eq!(
        store.last_index(),
        Some(3),
        "refused changes are not applied"
    );

    // Queued before the failure, failed after it without a write.
    faults.fail_sync.store(false, Ordering::SeqCst);
    drop(second);
    assert!(queued.await.unwrap().is_err());
    assert_eq!(faults.appends.load(Ordering::SeqCst), appends);
    assert_eq!(
        std::fs::metadata(dir.path().join(WAL_FILE)).unwrap().len(),
        len
    );
}

/// Finding 4 (rename): a failed compaction latches the health and the log
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_compaction_stops_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, health, faults) = faulty_log_of_ten(dir.path()).await;
    faults.fail_replace.store(true, Ordering::SeqCst);
    store.purge(log_id(9)).await.unwrap();
    let reason = tokio::time::timeout(std::time::Duration::from_secs(10), health.failed())
        .await
        .expect("the failed compaction latches the health");
    assert!(
        reason.contains("compacting") && reason.contains(WAL_FILE),
        "{reason}"
    );
    let (cb, _never) = callback();
    assert!(store.append(vec![entry(11, 10)], cb).await.is_err());
    drop(store);
    // The old file is intact: reopening replays it, purge and all.
    let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(indexes(&store), vec![10]);
}

fn file_salt(path: &Path) -> u64 {
    let head = std::fs::read(path).unwrap();
    u64::from_le_bytes(head[12..20].try_into().unwrap())
}

/// A compacted file cannot be torn (it was fsynced whole before the rename):
/// a flipped bit in its last entries is corruption, never a cut tail that
/// silently drops acknowledged entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_at_the_end_of_a_compacted_file_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE);
    let mut store =
        LogStore::open_with(dir.path(), StorageHealth::new(), always_compact()).unwrap();
    append_durably(&mut store, (1..=10).map(|i| entry(i, 1000)).collect()).await;
    let before = file_salt(&path);
    store.purge(log_id(8)).await.unwrap();
    // The rewrite gives the file a new salt: wait for it (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while file_salt(&path) == before {
        assert!(std::time::Instant::now() < deadline, "no compaction");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(store);
    let offsets = batch_offsets(&path);
    assert!(offsets.len() >= 2, "{offsets:?}");
    // The batch holding the entries: the last one before the closing batch.
    let entries_batch = offsets[offsets.len() - 2];
    flip_bit(&path, entries_batch + BATCH_HEADER_LEN + 200);
    let err = LogStore::open(dir.path(), StorageHealth::new()).err();
    assert!(
        matches!(err, Some(WalError::Corrupt { offset, .. }) if offset == entries_batch),
        "{err:?}"
    );
}

/// A compaction that runs out of space before anything was renamed leaves
/// the old file in use: the log goes on, nothing is latched. (Any other
/// failure, a failed fsync of the temp file included, stops the log: see
/// `a_failed_compaction_stops_the_log`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_that_fails_before_publishing_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, health, faults) = faulty_log_of_ten(dir.path()).await;
    faults.fail_prepare.store(true, Ordering::SeqCst);
    store.purge(log_id(9)).await.unwrap();
    append_durably(&mut store, vec![entry(11, 10)]).await;
    assert!(!health.is_failed());
    drop(store);
    let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(indexes(&store), vec![10, 11]);
}

/// Finding 4: lengths are u64 in the batch header and the record prefix.
#[test]
fn lengths_above_u32_max_are_framed_and_parsed() {
    let salt = 0x1234_5678_9abc_def0;
    for body_len in [u32::MAX as u64 + 1, 5 << 30, (1 << 30) + 1, u64::MAX / 2] {
        let header = BatchHeader {
            body_len,
            body_crc: 0xdead_beef,
        };
        let bytes = header.encode(salt, 4096);
        assert_eq!(BatchHeader::decode(&bytes, salt, 4096), Some(header));
        // The header checksum binds the salt and the offset.
        assert_eq!(BatchHeader::decode(&bytes, salt, 4097), None);
        assert_eq!(BatchHeader::decode(&bytes, salt + 1, 4096), None);
    }
    // A record prefix above u32::MAX is read as such (and found to overrun
    // this short body) rather than wrapped.
    let big = (5u64 << 30) + 3;
    let mut body = big.to_le_bytes().to_vec();
    body.extend_from_slice(&[0; 100]);
    let err = record::decode_records(&mut body.as_slice(), body.len() as u64).unwrap_err();
    assert!(err.contains(&format!("a record of {big} bytes")), "{err}");
}

/// Finding 4: a complete batch over 1 GiB is a good batch, not a torn tail
/// (the old recovery cut any record over 1 GiB). The body is a hole in a
/// sparse file, so this neither writes nor holds a GiB.
#[test]
fn a_batch_over_one_gib_is_not_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE);
    let salt = 42;
    let body_len: u64 = (1 << 30) + (1 << 20);
    let zeros = vec![0u8; 1 << 20];
    let mut crc = crc32fast::Hasher::new();
    for _ in 0..body_len / zeros.len() as u64 {
        crc.update(&zeros);
    }
    let header = BatchHeader {
        body_len,
        body_crc: crc.finalize(),
    };
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&encode_file_header(salt)).unwrap();
    f.write_all(&header.encode(salt, FILE_HEADER_LEN)).unwrap();
    let file_len = FILE_HEADER_LEN + BATCH_HEADER_LEN + body_len;
    f.set_len(file_len).unwrap();
    drop(f);

    let mut f = std::fs::File::open(&path).unwrap();
    let mut seen = Vec::new();
    let walk = record::walk_batches(
        &mut f,
        salt,
        file_len,
        |_, len| Ok(len),
        |offset, len| seen.push((offset, len)),
    )
    .unwrap();
    assert_eq!(walk.tail, Tail::Clean);
    assert_eq!(walk.good_end, file_len);
    assert_eq!(seen, vec![(FILE_HEADER_LEN, body_len)]);
}

/// Finding 5 (storage side): replication reads stop at the byte budget and
/// always return at least one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_reads_stop_at_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        read_budget_bytes: 10_000,
        ..opts()
    };
    let mut store = LogStore::open_with(dir.path(), StorageHealth::new(), options).unwrap();
    append_durably(&mut store, vec![entry(1, 25_000)]).await;
    append_durably(&mut store, (2..=11).map(|i| entry(i, 3_000)).collect()).await;

    let one = store.limited_get_log_entries(1, 12).await.unwrap();
    assert_eq!(one.len(), 1, "an entry over the budget still goes alone");
    let some = store.limited_get_log_entries(2, 12).await.unwrap();
    assert_eq!(
        some.iter().map(|e| e.index()).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    let sizes: u64 = store
        .lock()
        .contents
        .entries
        .range(2..=4)
        .map(|(_, e)| e.size)
        .sum();
    assert!(sizes <= 10_000 && sizes > 9_000, "{sizes}");
    let tail = store.limited_get_log_entries(11, 12).await.unwrap();
    assert_eq!(tail.len(), 1);
}

/// The encoded size kept in memory is that of the record in the file, and
/// it survives a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_sizes_match_the_file() {
    fn entry_sizes(store: &LogStore) -> Vec<u64> {
        let inner = store.lock();
        inner.contents.entries.values().map(|e| e.size).collect()
    }
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    append_durably(
        &mut store,
        (1..=3).map(|i| entry(i, 500 * i as usize)).collect(),
    )
    .await;
    let sizes = entry_sizes(&store);
    drop(store);
    let file_len = log_end(&dir.path().join(WAL_FILE));
    assert_eq!(
        sizes.iter().sum::<u64>(),
        file_len - FILE_HEADER_LEN - BATCH_HEADER_LEN
    );
    let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(sizes, entry_sizes(&store));
    assert_eq!(store.lock().contents.entry_bytes, sizes.iter().sum::<u64>());
}

/// Logs of the previous format or of an unknown version are refused with a
/// clear message.
#[test]
fn unknown_formats_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE);
    // A version 1 log began with a record length and checksum.
    std::fs::write(&path, [12, 0, 0, 0, 1, 2, 3, 4, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let err = LogStore::open(dir.path(), StorageHealth::new())
        .err()
        .unwrap();
    assert!(matches!(err, WalError::UnknownFormat { .. }), "{err}");
    assert!(err.to_string().contains("older than log format"), "{err}");

    let mut header = encode_file_header(1);
    header[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc32fast::hash(&header[0..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, header).unwrap();
    let err = LogStore::open(dir.path(), StorageHealth::new())
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains(&format!("format version {}", FORMAT_VERSION + 1)),
        "{err}"
    );
}

/// Garbage after the last batch that is full of batch magics (as a client's
/// payload may be), even with headers checksummed under another salt, is a
/// torn tail: a header only counts with this file's salt and its own offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_full_of_batch_magics_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = five_batches(dir.path()).await;
    let len = log_end(&path);
    let mut garbage = Vec::new();
    while garbage.len() < 4 << 20 {
        let at = len + garbage.len() as u64;
        let forged = BatchHeader {
            body_len: 100,
            body_crc: 0,
        };
        garbage.extend_from_slice(&forged.encode(0, at));
        garbage.extend_from_slice(&forged.encode(1, at + 20)[..4]);
    }
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &garbage, len).unwrap();
    drop(f);
    let report = check(dir.path()).unwrap();
    assert_eq!(
        report.tail,
        Tail::Torn {
            offset: len,
            bytes: garbage.len() as u64
        }
    );
    let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(indexes(&store).len(), 10);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

/// Writes land on zeros prepared ahead of the log, within the file's length
/// (so that their fsync need not change the file's size), and a file with
/// zeros after its log opens clean, whole, and goes on from where the log
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_land_on_zeros_prepared_ahead_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE);
    let prepare = opts().prepare_bytes;
    let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    append_durably(&mut store, vec![entry(1, 300)]).await;
    let end = log_end(&path);
    let file = std::fs::metadata(&path).unwrap().len();
    assert!(file >= end + prepare, "{file} bytes for a log of {end}");
    append_durably(&mut store, vec![entry(2, 300)]).await;
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        file,
        "the next write went within the file"
    );
    drop(store);
    let bytes = std::fs::read(&path).unwrap();
    let end = log_end(&path);
    assert!(bytes[end as usize..].iter().all(|b| *b == 0));
    assert_eq!(check(dir.path()).unwrap().tail, Tail::Clean);

    let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(indexes(&store), vec![1, 2]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), file, "nothing cut");
    // Far past the zeros, with large batches: the file grows with the log
    // (zeros would double what the disk writes).
    append_durably(&mut store, vec![entry(3, 3 * prepare as usize)]).await;
    append_durably(&mut store, vec![entry(4, 300)]).await;
    assert_eq!(std::fs::metadata(&path).unwrap().len(), log_end(&path));
    // Small batches again: zeros follow the log again.
    for i in 5..=60 {
        append_durably(&mut store, vec![entry(i, 300)]).await;
    }
    drop(store);
    let end = log_end(&path);
    assert!(std::fs::metadata(&path).unwrap().len() >= end + prepare);
    let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(indexes(&store), (1..=60).collect::<Vec<_>>());
}

/// A batch torn among the zeros written ahead (some of its pages written,
/// the rest still zeros) is a torn tail: cut on open with the zeros, and
/// the log goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_torn_among_prepared_zeros_is_cut() {
    for torn in ["header only", "body page only"] {
        let dir = tempfile::tempdir().unwrap();
        let (path, offsets) = five_batches(dir.path()).await;
        let end = log_end(&path);
        let bytes = std::fs::read(&path).unwrap();
        // The last batch again, as the start of a sixth one that was being
        // written at `end` when the node stopped.
        let last = &bytes[offsets[4] as usize..end as usize];
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        match torn {
            "header only" => {
                let sealed = BatchHeader {
                    body_len: 4096,
                    body_crc: 7,
                };
                let header = sealed.encode(salt_of(&bytes), end);
                std::os::unix::fs::FileExt::write_all_at(&f, &header, end).unwrap();
            }
            _ => std::os::unix::fs::FileExt::write_all_at(&f, &last[5..], end + 4096).unwrap(),
        }
        drop(f);
        assert!(
            matches!(check(dir.path()).unwrap().tail, Tail::Torn { offset, .. } if offset == end),
            "{torn}"
        );
        let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
        assert_eq!(indexes(&store), (1..=10).collect::<Vec<_>>(), "{torn}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end, "{torn}");
        append_durably(&mut store, vec![entry(11, 10)]).await;
        drop(store);
        let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
        assert_eq!(indexes(&store), (1..=11).collect::<Vec<_>>(), "{torn}");
        assert_eq!(check(dir.path()).unwrap().tail, Tail::Clean);
    }
}

/// The salt of a log file, from its header.
fn salt_of(file: &[u8]) -> u64 {
    u64::from_le_bytes(file[12..20].try_into().unwrap())
}

/// The committed index, which no one waits to be durable, costs no fsync
/// of its own: it waits, gathered, for the next write someone waits for and
/// goes out in that batch, under its fsync (before, each commit cost every
/// node a second fsync). It is readable at once, read back after a reopen,
/// and one still gathered when the store is dropped is written then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_index_rides_on_the_next_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE);
    let (mut store, _health, faults) = open_faulty(dir.path(), opts());
    append_durably(&mut store, vec![entry(1, 100), entry(2, 100)]).await;
    let (syncs, end) = (faults.syncs.load(Ordering::SeqCst), log_end(&path));
    store.save_committed(Some(log_id(2))).await.unwrap();
    assert_eq!(store.read_committed().await.unwrap(), Some(log_id(2)));
    store.flusher_idle().await;
    assert_eq!(
        faults.syncs.load(Ordering::SeqCst),
        syncs,
        "no fsync of its own"
    );
    assert_eq!(log_end(&path), end, "not written without an fsync");
    append_durably(&mut store, vec![entry(3, 100)]).await;
    assert_eq!(faults.syncs.load(Ordering::SeqCst), syncs + 1);
    let report = check(dir.path()).unwrap();
    assert_eq!(
        (report.batches, report.committed.is_some()),
        (2, true),
        "one batch: the committed index and entry 3"
    );
    store.save_committed(Some(log_id(3))).await.unwrap();
    store.flusher_idle().await;
    drop(store);
    let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(store.read_committed().await.unwrap(), Some(log_id(3)));
    assert_eq!(indexes(&store), vec![1, 2, 3]);
}

/// Dropping the last handle to a store waits for its flusher to finish the
/// jobs queued before: once the drop returns, nothing writes the file, so a
/// node restarted in the same process opens a file no late write of the old
/// store can land in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_store_has_finished_writing_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE);
    let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    append_durably(&mut store, vec![entry(1, 100)]).await;
    let end = log_end(&path);
    let release = store.hold_flusher();
    let (cb, written) = callback();
    store.append(vec![entry(2, 100)], cb).await.unwrap();
    let dropper = std::thread::spawn(move || drop(store));
    // While the flusher is held with entry 2 queued, the drop must not
    // return; without the wait it returns within microseconds.
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(300) {
        assert!(
            !dropper.is_finished(),
            "the drop returned before entry 2 was written"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(release);
    dropper.join().unwrap();
    assert!(
        log_end(&path) > end,
        "entry 2 was written before the drop returned"
    );
    written.await.unwrap().unwrap();
    let store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    assert_eq!(indexes(&store), vec![1, 2]);
}

/// Closing a store writes what it gathered (the committed index, which no
/// one waited for) and stops its writer: later changes fail, and nothing
/// writes the file once `close` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_store_wrote_what_it_gathered_and_takes_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path(), StorageHealth::new()).unwrap();
    append_durably(&mut store, vec![entry(1, 100)]).await;
    store.save_committed(Some(log_id(1))).await.unwrap();
    store.close().await;
    let report = check(dir.path()).unwrap();
    assert_eq!(report.committed, Some(log_id(1).to_string()));
    let (cb, _never) = callback();
    assert!(store.append(vec![entry(2, 10)], cb).await.is_err());
    assert_eq!(check(dir.path()).unwrap().log_bytes, report.log_bytes);
}
