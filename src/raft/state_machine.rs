//! The openraft state-machine adapter around the pure [`QueueState`].
//!
//! The queue state lives in memory behind a lock shared with the API (reads)
//! and is snapshotted to a file (format and handle in `snapshot_file`). On
//! start the latest snapshot is loaded; openraft then re-applies the
//! committed log after it (the log store keeps the committed id, durable
//! with the next write someone waits for).
//!
//! Snapshots, built here or received from the leader, are written to temp
//! files with names unique per write and published by rename under one
//! mutex shared by building and installing. Invariants:
//! - The published snapshot never goes backwards: a snapshot at or before
//!   the published one's last log id is discarded, not renamed over it (the
//!   log may already be purged past the older one).
//! - Copying, encoding, decoding and file I/O run on blocking threads, never
//!   on the async workers; the state lock is held only to copy or swap.
//! - A failed write, fsync or rename latches [`StorageHealth`]; a corrupt
//!   snapshot file is refused with an error naming the file.
//!
//! Applying an entry yields a reply for the proposer and events for the
//! watch hub. Events go through an unbounded channel: dropping one would
//! strand a delivered item on a connection that never saw it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use tokio::sync::{mpsc, watch};

use super::StorageHealth;
use super::crashsafe;
use super::snapshot_file::{SnapshotFile, SnapshotFileError};
use super::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use crate::queue::{Envelope, Event, QueueState, Reply};

/// What the rest of the node may look at.
pub struct Applied {
    pub state: QueueState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// Shared between the state machine, snapshot builder and API readers.
pub struct SharedState {
    pub applied: RwLock<Applied>,
    /// The index of the last applied entry; waiters use it for long polls
    /// and read-your-writes.
    pub applied_index: watch::Sender<u64>,
}

/// The applied state's fingerprint at one log index: replicas that applied
/// the same log hold equal states, so equal indexes with different digests
/// mean the replicas diverged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StateDigest {
    pub applied: Option<u64>,
    /// CRC-32 of the state's encoding (as in a snapshot).
    pub crc32: u32,
}

impl SharedState {
    /// Fingerprint the applied state. Encodes the whole state under the read
    /// lock (applying waits meanwhile): for diagnostics, not a hot path.
    pub fn digest(&self) -> io::Result<StateDigest> {
        struct Hashing(crc32fast::Hasher);
        impl io::Write for Hashing {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.update(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let a = self.applied.read().unwrap();
        let mut w = Hashing(crc32fast::Hasher::new());
        postcard::to_io(&a.state, &mut w).map_err(io::Error::other)?;
        Ok(StateDigest {
            applied: a.last_applied.as_ref().map(|l| l.index()),
            crc32: w.0.finalize(),
        })
    }
}

/// Publishes snapshot files in one directory, one at a time, never going
/// backwards.
struct Publisher {
    dir: PathBuf,
    health: Arc<StorageHealth>,
    /// The last log id of the published snapshot (`None`: no snapshot file
    /// yet); held while publishing.
    published: Mutex<Option<Option<LogId>>>,
}

/// Whether the published snapshot is at or beyond `last`.
fn covers(published: &Option<Option<LogId>>, last: &Option<LogId>) -> bool {
    matches!(published, Some(p) if p >= last)
}

impl Publisher {
    /// Whether a snapshot ending at `last` would replace the published one.
    fn would_publish(&self, last: &Option<LogId>) -> bool {
        !covers(&self.published.lock().unwrap(), last)
    }

    /// Make `file` (described by `meta`) the current snapshot unless the
    /// published one is at or beyond it; then `file` is dropped (a temp file
    /// is removed) and the current one returned instead.
    fn publish(
        &self,
        meta: &SnapshotMeta,
        file: SnapshotFile,
    ) -> Result<Option<SnapshotFile>, SnapshotFileError> {
        let mut published = self.published.lock().unwrap();
        if covers(&published, &meta.last_log_id) {
            return Ok(None);
        }
        let file = file.publish(&self.dir)?;
        *published = Some(meta.last_log_id);
        Ok(Some(file))
    }

    /// The current snapshot with its meta.
    fn current(&self) -> Result<Option<Snapshot>, SnapshotFileError> {
        let Some(file) = SnapshotFile::open_current(&self.dir)? else {
            return Ok(None);
        };
        let meta = file.read_meta()?;
        Ok(Some(Snapshot {
            meta,
            snapshot: file,
        }))
    }

    /// Latch storage health on a local I/O failure, and convert for openraft.
    fn check<T>(&self, what: &str, r: Result<T, SnapshotFileError>) -> io::Result<T> {
        r.map_err(|e| {
            if e.is_io() {
                self.health.fail(format!("{what}: {e}"));
            }
            e.into()
        })
    }
}

pub struct StateMachine {
    shared: Arc<SharedState>,
    publisher: Arc<Publisher>,
    events: mpsc::UnboundedSender<Vec<Event>>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)
}

impl StateMachine {
    /// Open the state machine in `dir`, restoring the latest snapshot. A
    /// storage failure in building or installing a snapshot latches `health`.
    pub fn open(
        dir: &Path,
        health: Arc<StorageHealth>,
    ) -> io::Result<(Self, mpsc::UnboundedReceiver<Vec<Event>>)> {
        std::fs::create_dir_all(dir)?;
        crashsafe::remove_leftovers(dir)?;
        let restored = match SnapshotFile::open_current(dir)? {
            None => None,
            Some(file) => Some(file.decode()?),
        };
        let (applied, published) = match restored {
            Some((meta, state)) => (
                Applied {
                    state,
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership.clone(),
                },
                Some(meta.last_log_id),
            ),
            None => (
                Applied {
                    state: QueueState::new(),
                    last_applied: None,
                    membership: StoredMembership::default(),
                },
                None,
            ),
        };
        let index = applied.last_applied.as_ref().map_or(0, |l| l.index());
        let (events, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(SharedState {
            applied: RwLock::new(applied),
            applied_index: watch::Sender::new(index),
        });
        let publisher = Arc::new(Publisher {
            dir: dir.to_path_buf(),
            health,
            published: Mutex::new(published),
        });
        Ok((
            Self {
                shared,
                publisher,
                events,
            },
            rx,
        ))
    }

    pub fn shared(&self) -> Arc<SharedState> {
        self.shared.clone()
    }
}

pub struct SnapshotBuilder {
    shared: Arc<SharedState>,
    publisher: Arc<Publisher>,
}

impl SnapshotBuilder {
    /// Copy the state, write it to a temp file and publish it (or find a
    /// newer one published meanwhile). Runs on a blocking thread.
    fn build_blocking(&self) -> io::Result<Snapshot> {
        let started = std::time::Instant::now();
        let (state, meta) = {
            let a = self.shared.applied.read().unwrap();
            let meta = SnapshotMeta {
                last_log_id: a.last_applied,
                last_membership: a.membership.clone(),
            };
            (a.state.snapshot_copy(), meta)
        };
        // Applying waits while the copy is taken: logged, to see it.
        let copied = started.elapsed();
        let p = &self.publisher;
        if p.would_publish(&meta.last_log_id) {
            let file = p.check(
                "writing a snapshot",
                SnapshotFile::write(&p.dir, &meta, &state),
            )?;
            drop(state);
            if let Some(file) = p.check("publishing a snapshot", p.publish(&meta, file))? {
                tracing::info!(
                    last_log_id = ?meta.last_log_id,
                    bytes = file.len(),
                    copy_ms = copied.as_millis() as u64,
                    total_ms = started.elapsed().as_millis() as u64,
                    "snapshot built"
                );
                return Ok(Snapshot {
                    meta,
                    snapshot: file,
                });
            }
        }
        // An install published this state or a newer one meanwhile.
        p.check("reading the current snapshot", p.current())?
            .ok_or_else(|| io::Error::other("no snapshot although one was published"))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let builder = SnapshotBuilder {
            shared: self.shared.clone(),
            publisher: self.publisher.clone(),
        };
        blocking(move || builder.build_blocking()).await?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let a = self.shared.applied.read().unwrap();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut last_index = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let started = std::time::Instant::now();
            let (reply, events) = {
                let mut a = self.shared.applied.write().unwrap();
                a.last_applied = Some(log_id);
                match &entry.payload {
                    EntryPayload::Blank => (Reply::Done, Vec::new()),
                    EntryPayload::Normal(envelope) => {
                        a.state.apply_in_term(envelope, Some(log_id.leader_id.term))
                    }
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(log_id), m.clone());
                        (Reply::Done, Vec::new())
                    }
                }
            };
            crate::latency::Stage::Apply.record(started.elapsed());
            if tracing::enabled!(target: "eddy::applied", tracing::Level::TRACE) {
                let envelope = match &entry.payload {
                    EntryPayload::Normal(envelope) => Some(envelope),
                    _ => None,
                };
                trace_applied(envelope, log_id, &reply, &events);
            }
            if !events.is_empty() {
                let _ = self.events.send(events);
            }
            if let Some(r) = responder {
                r.send(reply);
            }
            last_index = Some(log_id.index());
        }
        if let Some(i) = last_index {
            self.shared.applied_index.send_replace(i);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            publisher: self.publisher.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let publisher = self.publisher.clone();
        let expected = meta.clone();
        let state = blocking(move || -> io::Result<QueueState> {
            // Bad data is refused without latching: the disk is fine.
            let (found, state) = snapshot.decode()?;
            if found != expected {
                return Err(SnapshotFileError::WrongSnapshot {
                    path: snapshot.path().to_path_buf(),
                    found: format!("{:?}", found.last_log_id),
                    expected: format!("{:?}", expected.last_log_id),
                }
                .into());
            }
            publisher.check(
                "publishing a received snapshot",
                publisher.publish(&expected, snapshot),
            )?;
            Ok(state)
        })
        .await??;
        let old = {
            let mut a = self.shared.applied.write().unwrap();
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
            std::mem::replace(&mut a.state, state)
        };
        // Freeing a large state takes a while: not on an async worker.
        tokio::task::spawn_blocking(move || drop(old));
        // Consumers attached before the snapshot are gone from this node's
        // point of view; the hub re-syncs from state on this signal.
        let _ = self.events.send(vec![Event::Resync]);
        self.shared
            .applied_index
            .send_replace(meta.last_log_id.as_ref().map_or(0, |l| l.index()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let publisher = self.publisher.clone();
        blocking(move || publisher.check("reading the current snapshot", publisher.current()))
            .await?
    }
}

/// One line per applied entry at trace level: what replicas must agree on
/// (entry, reply, deliveries), without payloads, so that the logs of two
/// replicas can be compared line by line.
fn trace_applied(envelope: Option<&Envelope>, log_id: LogId, reply: &Reply, events: &[Event]) {
    fn summary(reply: &Reply) -> String {
        match reply {
            Reply::Items(frames) => {
                let indexes: Vec<u64> = frames.iter().map(|f| f.index).collect();
                format!("items{indexes:?}")
            }
            Reply::Batch(replies) => {
                let parts: Vec<String> = replies.iter().map(summary).collect();
                format!("batch[{}]", parts.join(","))
            }
            Reply::Coalesced(replies) => {
                let parts: Vec<String> = replies.iter().map(summary).collect();
                format!("coalesced[{}]", parts.join(","))
            }
            other => format!("{other:?}"),
        }
    }
    let command = match envelope {
        None => "blank-or-membership".to_string(),
        Some(envelope) => {
            format!(
                "{} {:032x} at {}",
                envelope.command.name(),
                envelope.id,
                envelope.now_ms
            )
        }
    };
    let delivered: Vec<(u64, u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Deliver {
                node,
                connection,
                frame,
                ..
            } => Some((*node, *connection, frame.index)),
            _ => None,
        })
        .collect();
    tracing::trace!(
        target: "eddy::applied",
        "{} {} {command} -> {} deliver{delivered:?}",
        log_id.index(),
        log_id.leader_id.term,
        summary(reply),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Command, Envelope, NewItem, QueueKind, QueueRef, ServiceConfig, Tags};
    use bytes::Bytes;

    fn log_id(index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(1, 1, index)
    }

    /// A queue state with `items` payloads of `size` bytes (`salt` makes
    /// states distinct).
    fn state_with(items: usize, size: usize, salt: u8) -> QueueState {
        let mut state = QueueState::new();
        let mut id = 0u128;
        let mut run = |state: &mut QueueState, command| {
            id += 1;
            state.apply(&Envelope {
                id,
                now_ms: 1_000,
                command,
            })
        };
        run(
            &mut state,
            Command::CreateService {
                name: "svc".into(),
                config: ServiceConfig::default(),
            },
        );
        for i in 0..items {
            let mut data = vec![salt; size];
            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
            run(
                &mut state,
                Command::Put {
                    queue: QueueRef::new("svc", QueueKind::Input),
                    item: NewItem {
                        request_id: format!("r{i}-{salt}"),
                        tags: Tags::new(),
                        data: Bytes::from(data),
                        priority: 0,
                        path: String::new(),
                    },
                },
            );
        }
        state
    }

    /// Set a state machine's applied state directly, as if it had applied
    /// the log up to `index`.
    fn set_applied(sm: &StateMachine, index: u64, state: QueueState) {
        let mut a = sm.shared.applied.write().unwrap();
        a.state = state;
        a.last_applied = Some(log_id(index));
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(crashsafe::TEMP_SUFFIX))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut leader, _) =
            StateMachine::open(&dir.path().join("l"), StorageHealth::new()).unwrap();
        let (mut follower, _) =
            StateMachine::open(&dir.path().join("f"), StorageHealth::new()).unwrap();
        // Payloads larger than any fixed decoding buffer would be.
        let state = state_with(40, 3 * 1024 * 1024 / 2, 7);
        set_applied(&leader, 42, state.clone());
        let built = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(42)));
        assert!(built.snapshot.len() > 60 * 1024 * 1024);

        follower
            .install_snapshot(&built.meta, built.snapshot)
            .await
            .unwrap();
        assert_eq!(follower.shared.applied.read().unwrap().state, state);
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        assert!(temp_files(&dir.path().join("f")).is_empty());

        // And it is what a restart restores.
        drop(follower);
        let (reopened, _) =
            StateMachine::open(&dir.path().join("f"), StorageHealth::new()).unwrap();
        let a = reopened.shared.applied.read().unwrap();
        assert_eq!(a.state, state);
        assert_eq!(a.last_applied, Some(log_id(42)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_snapshot_file_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sm, _) = StateMachine::open(dir.path(), StorageHealth::new()).unwrap();
        set_applied(&sm, 9, state_with(50, 1000, 1));
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        drop(sm);
        let path = super::super::snapshot_file::current_path(dir.path());
        let good = std::fs::read(&path).unwrap();

        // One flipped bit in the middle of the state.
        let mut bad = good.clone();
        bad[good.len() / 2] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let err = StateMachine::open(dir.path(), StorageHealth::new())
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("corrupt: checksum mismatch"), "{msg}");

        // A torn (truncated) file.
        std::fs::write(&path, &good[..good.len() - 100]).unwrap();
        let msg = StateMachine::open(dir.path(), StorageHealth::new())
            .err()
            .expect("refused")
            .to_string();
        assert!(msg.contains("is corrupt"), "{msg}");

        // A received snapshot with a flipped bit is refused before install.
        std::fs::write(&path, &bad).unwrap();
        let file = SnapshotFile::open_current(dir.path()).unwrap().unwrap();
        let msg = file.verify().unwrap_err().to_string();
        assert!(msg.contains("corrupt: checksum mismatch"), "{msg}");
    }

    /// Builds and installs run concurrently (openraft builds on a spawned
    /// task): each writes its own temp file, and the published snapshot only
    /// moves forward.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_builds_and_installs_never_share_a_temp_file_or_go_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let (mut leader, _) =
            StateMachine::open(&dir.path().join("l"), StorageHealth::new()).unwrap();
        let fdir = dir.path().join("f");
        let (mut follower, _) = StateMachine::open(&fdir, StorageHealth::new()).unwrap();
        set_applied(&follower, 50, state_with(300, 4096, 0));

        // Snapshots at 101..=120 to install, built by a leader.
        let mut incoming = Vec::new();
        for i in 1..=20u64 {
            set_applied(&leader, 100 + i, state_with(300, 4096, i as u8));
            let mut b = leader.get_snapshot_builder().await;
            incoming.push(b.build_snapshot().await.unwrap());
        }

        let mut builder = follower.get_snapshot_builder().await;
        let builds = tokio::spawn(async move {
            let mut built = Vec::new();
            for _ in 0..40 {
                built.push(builder.build_snapshot().await.unwrap().meta.last_log_id);
                tokio::task::yield_now().await;
            }
            built
        });
        let mut published = Vec::new();
        for snapshot in incoming {
            let meta = snapshot.meta.clone();
            follower
                .install_snapshot(&meta, snapshot.snapshot)
                .await
                .unwrap();
            let current = follower.get_current_snapshot().await.unwrap().unwrap();
            assert!(
                current.meta.last_log_id >= meta.last_log_id,
                "installed {:?}, then the current snapshot is {:?}",
                meta.last_log_id,
                current.meta.last_log_id
            );
            published.push(current.meta.last_log_id);
        }
        builds.await.unwrap();
        assert!(published.windows(2).all(|w| w[0] <= w[1]), "{published:?}");
        assert!(temp_files(&fdir).is_empty(), "{:?}", temp_files(&fdir));

        drop(follower);
        let (reopened, _) = StateMachine::open(&fdir, StorageHealth::new()).unwrap();
        let a = reopened.shared.applied.read().unwrap();
        assert_eq!(a.last_applied, Some(log_id(120)));
        assert_eq!(a.state, state_with(300, 4096, 20));
    }

    /// The never-backwards rule, step by step: a build that copied the state
    /// before an install published a newer snapshot does not replace it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_build_does_not_replace_a_newer_installed_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut leader, _) =
            StateMachine::open(&dir.path().join("l"), StorageHealth::new()).unwrap();
        let fdir = dir.path().join("f");
        let (mut follower, _) = StateMachine::open(&fdir, StorageHealth::new()).unwrap();
        set_applied(&leader, 20, state_with(10, 100, 2));
        let newer = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();

        // The build's copy and temp file, at index 10.
        let stale_meta = SnapshotMeta {
            last_log_id: Some(log_id(10)),
            last_membership: StoredMembership::default(),
        };
        let stale = SnapshotFile::write(&fdir, &stale_meta, &state_with(10, 100, 1)).unwrap();
        let stale_path = stale.path().to_path_buf();
        // The install, while the build was writing.
        follower
            .install_snapshot(&newer.meta, newer.snapshot)
            .await
            .unwrap();
        // The build publishes last.
        let p = &follower.publisher;
        assert!(p.publish(&stale_meta, stale).unwrap().is_none());
        assert!(!stale_path.exists(), "the discarded temp file is removed");
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(20)));
    }
}
