//! Eddy: a replicated queue service for asynchronous ML inference.
//!
//! Module map:
//! - [`config`]: a node's configuration, built once, with its defaults and
//!   the timing relations (leases) derived from it.
//! - [`queue`]: the pure state machine (items, groups, consumers, dispatch).
//! - `raft`: the only module that knows openraft; log store, state-machine
//!   adapter, gRPC network, forwarding of writes to the leader.
//! - `api`: the only module that knows axum; the EAS HTTP and WebSocket
//!   protocol, admin routes, status codes.
//! - [`protocol`]: the EAS vocabulary (headers, tag keys, defaults), named once.
//! - `client`: a Rust client of the EAS protocol (CLI, engine, benchmark).
//! - `engine`: the asynchronous inference worker.
//! - [`tls`]: certificates: generation and the PEM files a node loads.
//! - [`secret`]: constant-time comparison of secrets and tokens.

pub mod api;
pub mod client;
pub mod config;
pub mod engine;
pub mod proto;
pub mod protocol;
pub mod queue;
pub mod raft;
pub mod secret;
pub mod server;
pub mod tls;
