//! Eddy: a replicated queue service for asynchronous ML inference.
//!
//! Module map, and the foreign crates each module owns (no other module
//! names them):
//! - [`config`]: a node's configuration, built once, with its defaults and
//!   the timing relations (leases) derived from it.
//! - [`queue`]: the pure state machine (items, groups, consumers, dispatch):
//!   no I/O, no clock, no tokio.
//! - [`protocol`]: the EAS protocol both sides speak: its vocabulary, the
//!   query string, the operations on a queue URL, the `_attrs_` format.
//! - [`raft`]: openraft and tonic (log store, state-machine adapter, gRPC
//!   network, the proposer), and postcard (the log's and snapshots'
//!   encoding; the queue's tests use it to check snapshot round trips).
//! - [`api`]: axum, and the HTTP stack under it (hyper, hyper-util, tower,
//!   http-body-util, socket2 for the listener's TCP options): the EAS HTTP
//!   and WebSocket endpoints, admin routes, metrics, status codes. The
//!   peer service's tests drive a raw gRPC body with hyper types.
//! - [`server`]: the wiring of one node (Raft member, watch hub, HTTP API,
//!   liveness tasks).
//! - [`client`]: reqwest and tokio-tungstenite (a Rust client of the EAS
//!   protocol and the admin API, for the CLI, the engine and the benchmark).
//!   The engine calls its model's HTTP endpoint with reqwest directly
//!   (`engine/model.rs` says why).
//! - [`engine`]: the asynchronous inference worker.
//! - [`latency`]: the latency budget, stage histograms any module records
//!   into (no foreign crate).
//! - [`proto`]: the EAS frames as prost messages; prost is the one protobuf
//!   codec, used where each message is encoded.
//! - [`tls`]: rustls and rcgen (certificates: generation and the PEM files
//!   a node loads).
//! - [`secret`]: subtle and sha2 (constant-time comparison of secrets and
//!   tokens).
//! - rustix (system calls without a safe std form): the descriptor limit in
//!   [`server`] and the data volume's free space in `raft`'s disk guard,
//!   one call each.
//! - The `eddy` binary (`src/main.rs`, `src/cli/`) owns clap.

pub mod api;
pub mod client;
pub mod config;
pub mod engine;
pub mod latency;
pub mod proto;
pub mod protocol;
pub mod queue;
pub mod raft;
pub mod secret;
pub mod server;
pub mod tls;
