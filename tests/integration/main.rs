//! In-process tests: clusters of several nodes in one test process on
//! loopback ports, each with its own temporary data directory, and the
//! security layer driven through the HTTP router.

mod cluster;
mod delivery;
#[path = "../security/admin.rs"]
mod security_admin;
#[path = "../security/cluster_auth.rs"]
mod security_cluster_auth;
#[path = "../security/limits.rs"]
mod security_limits;
#[path = "../security/process.rs"]
mod security_process;
