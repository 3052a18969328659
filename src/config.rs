//! A node's configuration, built once and passed down unchanged.
//!
//! `eddy serve` builds a [`NodeConfig`] from its flags and environment
//! (`cli/serve.rs`), tests start from [`NodeConfig::for_tests`]; the server
//! checks it ([`NodeConfig::check`]) and hands the same value, behind an
//! `Arc`, to the Raft member, the HTTP API and the housekeeping tasks, which
//! read it and never copy it field by field. Durations are [`Duration`]s;
//! every default is a named constant here. The timing relations that keep
//! healthy workers from being evicted (the leases and the waits before
//! items move) are computed in one place, [`Timings`].
//!
//! This module holds data and validation only: no I/O, no tasks. It names
//! the limit types of the modules it configures (the HTTP and peer
//! listeners, TLS material, service limits) without using them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::ListenerLimits;
use crate::queue::ServiceConfig;
use crate::raft::{Peer, PeerListenerLimits};

/// The leader's heartbeat interval by default (`--heartbeat-ms`).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(100);
/// The shortest election timeout by default (`--election-timeout-ms`);
/// each election timeout is drawn from between it and twice it.
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a member may stay silent by default before its consumers'
/// items move (`--node-lost-ms`). Long enough that the other members'
/// lease outlasts the election after a leader dies (at least two election
/// timeouts, usually a little more), so a leader's death closes no watcher
/// on the other nodes.
pub const DEFAULT_NODE_LOST: Duration = Duration::from_millis(3_000);
/// A watcher that answers no ping, or takes no frame, for this long is
/// dropped (`--watch-idle-ms`).
pub const DEFAULT_WATCH_IDLE: Duration = Duration::from_secs(10);
/// A watcher still holding an item this long after it was sent is dropped
/// (`--watch-max-hold-ms`).
pub const DEFAULT_WATCH_MAX_HOLD: Duration = Duration::from_secs(30 * 60);
/// The shortest watch idle limit in force, whatever is configured: pings
/// and TCP probes need some time to be answered.
pub const MIN_WATCH_IDLE: Duration = Duration::from_millis(300);
/// HTTP connections served at once by default (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Peer connections held at once by default (`--max-peer-connections`).
pub const DEFAULT_MAX_PEER_CONNECTIONS: usize = 512;
/// A request's headers must arrive within this by default
/// (`--http-header-timeout-ms`).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must arrive within this by default
/// (`--http-body-timeout-ms`).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Log entries between snapshots by default (`--snapshot-every`).
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 20_000;
/// New data is refused while less than this is free on the data volume
/// by default (`--min-free-disk-bytes`).
pub const DEFAULT_MIN_FREE_DISK_BYTES: u64 = 256 * 1024 * 1024;

/// The cluster's failure-detection timings and the leases derived from
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub heartbeat: Duration,
    /// The shortest election timeout; openraft draws each from between it
    /// and twice it.
    pub election_timeout: Duration,
    /// A member silent this long is declared gone (its consumers' items
    /// move).
    pub node_lost: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            heartbeat: DEFAULT_HEARTBEAT,
            election_timeout: DEFAULT_ELECTION_TIMEOUT,
            node_lost: DEFAULT_NODE_LOST,
        }
    }
}

impl Timings {
    /// The margin by which a lease ends before anyone may move the items
    /// of the watchers it covers: a fifth of node-lost, at least 250 ms.
    pub fn lease_margin(&self) -> Duration {
        (self.node_lost / 5).max(Duration::from_millis(250))
    }

    /// The lease a leader holds, counted from the last time a quorum
    /// acknowledged it: node-lost less the margin, and at most two election
    /// timeouts.
    ///
    /// The cap is what makes a partitioned leader safe: a voter refuses to
    /// vote for two election timeouts (the longest election timeout) after
    /// it last heard its leader, so no new leader exists before the old
    /// one's lease has run out; the new leader then waits one more election
    /// timeout before releasing the old leader's consumers (housekeeping).
    pub fn leader_lease(&self) -> Duration {
        self.node_lost
            .saturating_sub(self.lease_margin())
            .min(self.election_timeout.saturating_mul(2))
            .max(Duration::from_millis(1))
    }

    /// The lease any other member holds, counted from the last time a
    /// quorum acknowledged the leader it last accepted replication from:
    /// node-lost less the margin.
    ///
    /// No leader can release a member's consumers sooner: the leader it
    /// followed waits node-lost after the member's last acknowledgement,
    /// which came after that quorum acknowledgement; a new leader is elected
    /// only after it (a quorum stopped acknowledging the old leader to vote)
    /// and waits node-lost from its election. Only the previous leader gets
    /// a shorter wait, and a member that followed another leader since is
    /// not it. Longer than two election timeouts (the earliest a new leader
    /// can be elected) with the default timings, so the followers of a
    /// leader that dies keep their watchers through the election. Eddy
    /// never transfers leadership, which would skip the vote refusal these
    /// bounds rely on.
    pub fn member_lease(&self) -> Duration {
        self.node_lost
            .saturating_sub(self.lease_margin())
            .max(Duration::from_millis(1))
    }

    /// How long a new leader waits before releasing the consumers of the
    /// leader before it, when nothing was heard from that node since the
    /// election: the shorter of node-lost and one election timeout.
    pub fn predecessor_wait(&self) -> Duration {
        self.node_lost.min(self.election_timeout)
    }

    /// How long a node that just won an election goes on serving its
    /// watchers on the member lease it held while voting, until a quorum
    /// first acknowledges it as leader: a quarter of the election timeout.
    /// It only bridges the moment between winning and the first
    /// acknowledgement; no other node can release its consumers that soon
    /// (a successor is elected at the earliest two election timeouts after
    /// this win, and waits [`Self::predecessor_wait`] more).
    pub fn new_leader_grace(&self) -> Duration {
        self.election_timeout / 4
    }

    /// How long a node that led takes no member lease after leading: the
    /// next leader may release its consumers after
    /// [`Self::predecessor_wait`], and the margin covers the gap between
    /// the two clocks' starts.
    pub fn no_member_lease_after_leading(&self) -> Duration {
        self.predecessor_wait() + self.lease_margin()
    }

    /// Refuse timings that would evict healthy workers in a cluster of more
    /// than one node: the leader's lease must cover three heartbeats, and
    /// node-lost must exceed the election timeout.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.leader_lease() < 3 * self.heartbeat || self.node_lost <= self.election_timeout {
            return Err(ConfigError::Timings {
                lease_ms: self.leader_lease().as_millis() as u64,
                heartbeat_ms: self.heartbeat.as_millis() as u64,
                node_lost_ms: self.node_lost.as_millis() as u64,
                election_timeout_ms: self.election_timeout.as_millis() as u64,
            });
        }
        Ok(())
    }
}

/// Everything one node runs with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node id, unique in the cluster, greater than 0.
    pub id: u64,
    /// Where the Raft log, the snapshots and the state file live.
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub raft_listen: SocketAddr,
    /// How peers and clients reach this node's HTTP port (default: the
    /// address the listener bound).
    pub advertise_http: Option<String>,
    /// How peers reach this node's gRPC port.
    pub advertise_raft: String,
    /// All initial members, this node included. Empty, or just this node:
    /// a single-node cluster.
    pub peers: Vec<Peer>,
    /// Wait to be added to an existing cluster instead of forming one.
    pub join: bool,
    /// Authenticates node-to-node calls.
    pub cluster_secret: String,
    /// Mutual TLS between nodes.
    pub peer_tls: Option<crate::tls::TlsIdentity>,
    /// Token of the admin routes (empty: only loopback callers are admins,
    /// allowed on a single node only). Admin commands forwarded to the
    /// leader carry proof of it.
    pub admin_token: String,
    /// When set, `/metrics` and `/admin/cluster` need it (or the admin
    /// token): they show the cluster's topology.
    pub status_token: String,
    /// TLS on the client port; admin calls passed to the leader go over TLS
    /// when this node's client port uses it.
    pub client_tls: Option<crate::tls::ClientPortTls>,
    pub timings: Timings,
    pub snapshot_every: u64,
    /// New data is refused (507) while less than this is free on the data
    /// volume; 0 turns the check off.
    pub min_free_disk_bytes: u64,
    /// Connection limit and timeouts of the HTTP listener.
    pub listener: ListenerLimits,
    /// Connection limit and timeouts of the peer gRPC port.
    pub peer_listener: PeerListenerLimits,
    /// A watch silent this long after a ping is dropped; client connections
    /// whose peer host is gone are aborted within about this long.
    pub watch_idle: Duration,
    /// A watch still holding an item this long after its frame was written
    /// is ended (`None`: never). The only bound on a stuck client of the
    /// HTTP stream, which cannot be pinged.
    pub watch_max_hold: Option<Duration>,
    /// Puts are refused (429) once the estimated memory of the items this
    /// node holds would pass this (see [`crate::api::MemoryBudget`]).
    pub max_memory_bytes: u64,
    /// Services to create once the cluster has a leader (existing ones
    /// keep their settings).
    pub services: Vec<(String, ServiceConfig)>,
    /// Served at the bare `/` and `/sink` paths.
    pub default_service: Option<String>,
}

/// Why a node refuses to start with the configuration it was given.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("node id must be greater than 0")]
    NodeIdZero,
    #[error(
        "this node is a member of a cluster of more than one node and has no cluster secret: \
         set --cluster-secret-file (EDDY_CLUSTER_SECRET_FILE) or --cluster-secret \
         (EDDY_CLUSTER_SECRET) to the same random value on every node"
    )]
    ClusterSecretRequired,
    #[error(
        "this node is a member of a cluster of more than one node and has no admin token: \
         set --admin-token-file (EDDY_ADMIN_TOKEN_FILE) or --admin-token (EDDY_ADMIN_TOKEN) \
         to the same random value on every node. Without a token the admin API would trust \
         any caller on loopback, which includes a sidecar and `kubectl port-forward`"
    )]
    AdminTokenRequired,
    #[error(
        "this node serves its client port over TLS and has peers, but no CA to verify theirs: \
         set --tls-ca (EDDY_TLS_CA) or --peer-tls-ca to the CA of the nodes' client-port \
         certificates (admin calls such as membership changes are passed to the leader's \
         client port)"
    )]
    ClientTlsCaRequired,
    #[error(
        "timings that would evict healthy workers: the lease ({lease_ms} ms, derived from \
         --node-lost-ms and --election-timeout-ms) must be at least three heartbeats \
         ({heartbeat_ms} ms each), and --node-lost-ms ({node_lost_ms}) must exceed \
         --election-timeout-ms ({election_timeout_ms})"
    )]
    Timings {
        lease_ms: u64,
        heartbeat_ms: u64,
        node_lost_ms: u64,
        election_timeout_ms: u64,
    },
}

impl NodeConfig {
    /// A single node on loopback with the defaults, its data in `data_dir`,
    /// its listeners on the given ports (0: any free port). Tests adjust
    /// the fields they need.
    pub fn for_tests(id: u64, data_dir: PathBuf, http_port: u16, raft_port: u16) -> Self {
        let raft_listen = SocketAddr::from(([127, 0, 0, 1], raft_port));
        Self {
            id,
            data_dir,
            http_listen: SocketAddr::from(([127, 0, 0, 1], http_port)),
            raft_listen,
            advertise_http: None,
            advertise_raft: raft_listen.to_string(),
            peers: Vec::new(),
            join: false,
            cluster_secret: String::new(),
            peer_tls: None,
            admin_token: String::new(),
            status_token: String::new(),
            client_tls: None,
            timings: Timings::default(),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            min_free_disk_bytes: 0,
            listener: ListenerLimits::default(),
            peer_listener: PeerListenerLimits::default(),
            watch_idle: DEFAULT_WATCH_IDLE,
            watch_max_hold: None,
            max_memory_bytes: u64::MAX,
            services: Vec::new(),
            default_service: None,
        }
    }

    /// Whether this node is configured as a member of a cluster of more
    /// than one node: it has peers besides itself, or waits to join one.
    pub fn has_peers(&self) -> bool {
        self.join || self.peers.iter().any(|p| p.id != self.id)
    }

    /// The watch idle limit in force (at least [`MIN_WATCH_IDLE`]).
    pub fn effective_watch_idle(&self) -> Duration {
        self.watch_idle.max(MIN_WATCH_IDLE)
    }

    /// Refuse a configuration that would leave a cluster open or evict
    /// healthy workers. A single node may run without an admin token (its
    /// admin API then answers loopback callers only, for the quick start on
    /// one machine); a cluster member may not.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::NodeIdZero);
        }
        if !self.has_peers() {
            return Ok(());
        }
        self.timings.check()?;
        if self.cluster_secret.is_empty() {
            return Err(ConfigError::ClusterSecretRequired);
        }
        if self.admin_token.is_empty() {
            return Err(ConfigError::AdminTokenRequired);
        }
        if self
            .client_tls
            .as_ref()
            .is_some_and(|t| !t.verifies_other_nodes())
        {
            return Err(ConfigError::ClientTlsCaRequired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn leases_with_the_default_timings() {
        let t = Timings::default();
        assert_eq!(t.lease_margin(), ms(600));
        // node-lost less the margin (2,400) capped at two election timeouts.
        assert_eq!(t.leader_lease(), ms(1_000));
        assert_eq!(t.member_lease(), ms(2_400));
        // The member lease outlasts the earliest election after a death.
        assert!(t.member_lease() > 2 * t.election_timeout);
        assert_eq!(t.predecessor_wait(), ms(500));
        assert_eq!(t.no_member_lease_after_leading(), ms(1_100));
        assert!(t.check().is_ok());
    }

    #[test]
    fn timings_that_would_evict_healthy_workers_are_refused() {
        let short_lost = Timings {
            heartbeat: ms(100),
            election_timeout: ms(500),
            node_lost: ms(500),
        };
        assert!(matches!(
            short_lost.check(),
            Err(ConfigError::Timings { .. })
        ));
        let slow_heartbeat = Timings {
            heartbeat: ms(400),
            election_timeout: ms(500),
            node_lost: ms(3_000),
        };
        assert!(slow_heartbeat.check().is_err());
    }

    #[test]
    fn a_cluster_member_needs_a_secret_and_a_token_a_single_node_does_not() {
        let mut c = NodeConfig::for_tests(1, "unused".into(), 0, 0);
        assert!(c.check().is_ok());
        c.peers = vec![
            Peer {
                id: 1,
                raft_addr: "a:1".into(),
                api_addr: "a:2".into(),
            },
            Peer {
                id: 2,
                raft_addr: "b:1".into(),
                api_addr: "b:2".into(),
            },
        ];
        assert!(matches!(c.check(), Err(ConfigError::ClusterSecretRequired)));
        c.cluster_secret = "s".into();
        assert!(matches!(c.check(), Err(ConfigError::AdminTokenRequired)));
        c.admin_token = "t".into();
        assert!(c.check().is_ok());
        c.id = 0;
        assert!(matches!(c.check(), Err(ConfigError::NodeIdZero)));
    }
}
