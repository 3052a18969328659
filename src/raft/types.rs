//! The openraft type configuration of Eddy and short aliases for it.

use crate::queue::{Envelope, Reply};

openraft::declare_raft_types!(
    /// Raft types of an Eddy cluster: log entries carry queue command
    /// envelopes, and applying one yields a queue reply.
    pub TypeConfig: D = Envelope, R = Reply, Node = openraft::NodeInfo
);

pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type NodeInfo = openraft::NodeInfo;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// Snapshots are files, streamed from disk when sent and to disk when received.
pub type SnapshotData = super::snapshot_file::SnapshotFile;
pub type Raft = openraft::Raft<TypeConfig, super::state_machine::StateMachine>;
