//! Replication: the only module that knows openraft and the peer protocol.
//!
//! - `crashsafe`: whole-file replacement that survives a crash at any point.
//! - `disk_guard`: refuses new data before the data volume runs full.
//! - `health`: the fail-stop latch for storage errors.
//! - `log`: the durable Raft log (batched write-ahead file, group fsync,
//!   ordered compaction, fail-stop, recovery and `eddy wal check`).
//! - `state_machine`: applies log entries to the pure queue state; snapshots.
//! - `snapshot_file`: the snapshot file format and the handle openraft moves.
//! - `network` / `service`: node-to-node gRPC (client and server).
//! - `listener`: the peer port's accept loop (connection limit, idle close).
//! - `node`: a running member; proposing, forwarding, reads, the lease,
//!   membership, leader housekeeping, status.
//! - `types`: openraft's type configuration for Eddy.

pub mod crashsafe;
mod disk_guard;
mod health;
mod listener;
mod log;
mod network;
mod node;
mod service;
mod snapshot_file;
mod state_machine;
mod types;

#[allow(clippy::all, missing_docs)]
pub(crate) mod pb {
    tonic::include_proto!("eddy.raft");
}

pub use disk_guard::{DiskGuard, NoSpace};
pub use health::StorageHealth;
pub use listener::PeerListenerLimits;
pub use log::{FSYNC_BUCKETS_MICROS, FsyncStats, Tail as WalTail, WalReport, check as check_wal};
pub use network::LinkFaults;
pub use node::{ClusterStatus, Leadership, Peer, ProposeError, RaftNode, now_ms};
pub use state_machine::StateDigest;
