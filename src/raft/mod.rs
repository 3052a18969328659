//! Replication: the only module that knows openraft and the peer protocol.
//!
//! - `crashsafe`: whole-file replacement that survives a crash at any point.
//! - `health`: the fail-stop latch for storage errors.
//! - `log_store`: the durable Raft log (write-ahead file, group fsync).
//! - `state_machine`: applies log entries to the pure queue state; snapshots.
//! - `snapshot_file`: the snapshot file format and the handle openraft moves.
//! - `network` / `service`: node-to-node gRPC (client and server).
//! - `node`: a running member; proposing, forwarding, leader housekeeping.

pub mod crashsafe;
mod health;
mod log_store;
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

pub use health::StorageHealth;
pub use log_store::{FSYNC_BUCKETS_MICROS, FsyncStats};
pub use node::{ClusterStatus, Peer, ProposeError, RaftNode, RaftSettings, now_ms};
