//! In-process clusters: several nodes in one test process, on loopback
//! ports, each with its own temporary data directory.

mod cluster;
