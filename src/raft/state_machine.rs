//! The openraft state-machine adapter around the pure [`QueueState`].
//!
//! The queue state lives in memory behind a lock shared with the API (reads)
//! and is snapshotted to a file: the snapshot is written to a temp file,
//! fsynced, renamed into place, and the directory fsynced. On start the
//! latest snapshot is loaded; openraft then re-applies the committed log
//! after it (the log store persists the committed id).
//!
//! Applying an entry yields a reply for the proposer and events for the
//! watch hub. Events go through an unbounded channel: dropping one would
//! strand a delivered item on a connection that never saw it.

use std::fs::File;
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use tokio::sync::{mpsc, watch};

use super::crashsafe::sync_dir;
use super::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use crate::queue::{Event, QueueState, Reply};

const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_VERSION: u8 = 1;

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

pub struct StateMachine {
    shared: Arc<SharedState>,
    dir: PathBuf,
    events: mpsc::UnboundedSender<Vec<Event>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

fn encode_state(state: &QueueState) -> io::Result<Vec<u8>> {
    let mut out = vec![SNAPSHOT_VERSION];
    out.extend(postcard::to_allocvec(state).map_err(io::Error::other)?);
    Ok(out)
}

fn decode_state(bytes: &[u8]) -> io::Result<QueueState> {
    match bytes.split_first() {
        Some((&SNAPSHOT_VERSION, rest)) => {
            let mut state: QueueState = postcard::from_bytes(rest).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {e}"))
            })?;
            state.rebuild_derived();
            Ok(state)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot: unknown version",
        )),
    }
}

fn write_snapshot_file(dir: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let file = SnapshotFile {
        meta: meta.clone(),
        data: data.to_vec(),
    };
    let bytes = postcard::to_allocvec(&file).map_err(io::Error::other)?;
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&crc32fast::hash(&bytes).to_le_bytes())?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    sync_dir(dir)
}

fn read_snapshot_file(dir: &Path) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
    let bytes = match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if bytes.len() < 4 || crc32fast::hash(&bytes[4..]).to_le_bytes() != bytes[..4] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot file is corrupt",
        ));
    }
    let file: SnapshotFile = postcard::from_bytes(&bytes[4..])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {e}")))?;
    Ok(Some((file.meta, file.data)))
}

impl StateMachine {
    /// Open the state machine in `dir`, restoring the latest snapshot.
    pub fn open(dir: &Path) -> io::Result<(Self, mpsc::UnboundedReceiver<Vec<Event>>)> {
        std::fs::create_dir_all(dir)?;
        let current = read_snapshot_file(dir)?;
        let applied = match &current {
            Some((meta, data)) => Applied {
                state: decode_state(data)?,
                last_applied: meta.last_log_id.clone(),
                membership: meta.last_membership.clone(),
            },
            None => Applied {
                state: QueueState::new(),
                last_applied: None,
                membership: StoredMembership::default(),
            },
        };
        let index = applied.last_applied.as_ref().map_or(0, |l| l.index());
        let (events, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(SharedState {
            applied: RwLock::new(applied),
            applied_index: watch::Sender::new(index),
        });
        Ok((
            Self {
                shared,
                dir: dir.to_path_buf(),
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
    dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Copy under the read lock, encode and write outside it.
        let (state, meta) = {
            let a = self.shared.applied.read().unwrap();
            let meta = SnapshotMeta {
                last_log_id: a.last_applied.clone(),
                last_membership: a.membership.clone(),
            };
            (a.state.clone(), meta)
        };
        let dir = self.dir.clone();
        let meta2 = meta.clone();
        let data = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let data = encode_state(&state)?;
            write_snapshot_file(&dir, &meta2, &data)?;
            Ok(data)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let a = self.shared.applied.read().unwrap();
        Ok((a.last_applied.clone(), a.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut last_index = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let (reply, events) = {
                let mut a = self.shared.applied.write().unwrap();
                a.last_applied = Some(log_id.clone());
                match &entry.payload {
                    EntryPayload::Blank => (Reply::Done, Vec::new()),
                    EntryPayload::Normal(envelope) => a.state.apply(envelope),
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(log_id.clone()), m.clone());
                        (Reply::Done, Vec::new())
                    }
                }
            };
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
            dir: self.dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let state = decode_state(&data)?;
        let dir = self.dir.clone();
        let meta2 = meta.clone();
        tokio::task::spawn_blocking(move || write_snapshot_file(&dir, &meta2, &data))
            .await
            .map_err(io::Error::other)??;
        {
            let mut a = self.shared.applied.write().unwrap();
            a.state = state;
            a.last_applied = meta.last_log_id.clone();
            a.membership = meta.last_membership.clone();
        }
        // Consumers attached before the snapshot are gone from this node's
        // point of view; the hub re-syncs from state on this signal.
        let _ = self.events.send(vec![Event::Resync]);
        self.shared
            .applied_index
            .send_replace(meta.last_log_id.as_ref().map_or(0, |l| l.index()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let dir = self.dir.clone();
        let found = tokio::task::spawn_blocking(move || read_snapshot_file(&dir))
            .await
            .map_err(io::Error::other)??;
        Ok(found.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Cursor::new(data),
        }))
    }
}
