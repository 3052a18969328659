//! In-process tests, in layers: the HTTP API through the router (t10),
//! clusters of several nodes (t20), failover (t30), restarts (t40) and
//! watches (t50), the console (t60), all on the harness's in-process clusters; and the
//! security tests of `tests/security`, driven the same way.

mod harness;
#[path = "../security/admin.rs"]
mod security_admin;
#[path = "../security/cluster_auth.rs"]
mod security_cluster_auth;
#[path = "../security/limits.rs"]
mod security_limits;
#[path = "../security/process.rs"]
mod security_process;
mod t10_api;
mod t20_cluster;
mod t30_failover;
mod t40_restart;
mod t50_watch;
mod t60_console;
