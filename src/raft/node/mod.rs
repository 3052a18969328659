//! A running Raft member: log store, state machine, openraft, the gRPC
//! server for peers, and the proposer that turns queue commands into log
//! entries on whichever node leads.
//!
//! Proposing: every command is wrapped in an [`Envelope`] with a fresh uuid
//! and this node's clock. On the leader it goes straight into openraft;
//! elsewhere it is forwarded once to the leader over gRPC. Retries after a
//! lost answer reuse the envelope, and the state machine's de-duplication
//! table applies it once.
//!
//! Time: the leader stamps every envelope with its clock as it appends it
//! ([`RaftNode::write_local`]); the state machine never lets time go back.
//! A leader's clock never reads behind the applied state's
//! ([`RaftNode::cluster_clock_ms`]): after a leader whose clock ran ahead,
//! the next one counts on from where that one left off, so a grace period
//! lasts as long as it says whatever the offsets between nodes' clocks.
//!
//! The leader also runs the housekeeping that needs a clock: it proposes
//! `GraceExpired` when a leaving consumer's grace period ends, and
//! `NodeLost` for a member whose replication acks stopped (its consumers'
//! items move on). Both carry the leader's term, are never forwarded, and
//! are void when applied in another term; `NodeLost` is decided only while
//! the leader holds its lease (a quorum acknowledged it recently).
//!
//! The lease ([`RaftNode::holds_lease`]): a leader not acknowledged by a
//! quorum for [`RaftNode::leader_lease`], or another member whose leader
//! was not for [`RaftNode::member_lease`] (the leader sends the age of its
//! last quorum acknowledgement with every replication request, and the
//! member counts from the last request it accepted minus that age), closes
//! its watchers and is not ready, before any leader would move its
//! consumers' items. Both are shorter than node-lost (the timings and the
//! leases derived from them are in [`crate::config::Timings`]).

mod clock;
mod coalesce;
mod error;
mod forward_stream;
mod housekeeping;
mod lease;
mod membership;
mod propose;
mod reads;
mod status;

pub use error::ProposeError;
pub use propose::Leadership;

use coalesce::{Lanes, Route};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::{Config, ServerState, SnapshotPolicy};
use tokio::sync::mpsc;

use super::StorageHealth;
use super::disk_guard::DiskGuard;
use super::log::LogStore;
use super::network::{Channels, LeaderQuorum, LinkFaults, Network, authorized, decode, encode};
use super::pb::ForwardRequest;
use super::pb::raft_client::RaftClient;
use super::service::{PeerServer, PeerService};
use super::state_machine::{SharedState, StateMachine};
use super::types::{NodeInfo, Raft};
use crate::config::NodeConfig;
use crate::queue::{Command, Envelope, Event, QueueState, Reply};

/// Take a snapshot (and purge the log behind it) once the entries held in
/// memory pass this many bytes, whatever `snapshot_every` says: large
/// payloads must not pile up in the log's memory.
const SNAPSHOT_LOG_BYTES: u64 = 256 * 1024 * 1024;

/// How long a command (or a linearizable read) may take to be applied,
/// through elections and forwarding, before the caller is told the outcome
/// is unknown; also the bound of one forwarded call.
pub(crate) const PROPOSE_DEADLINE: Duration = Duration::from_secs(5);
/// Between tries, how long a proposer waits for the leader to change.
const LEADER_CHANGE_WAIT: Duration = Duration::from_millis(200);
/// The least time one try is given, however little of the deadline is left.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);
/// How long the leader's read index may take to arrive.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);

/// Entries kept behind a snapshot (at most `snapshot_every`), so that a
/// follower a little behind catches up from the log instead of a snapshot.
const LOG_KEPT_AFTER_SNAPSHOT: u64 = 1_000;
/// Log entries purged at once behind a snapshot.
const PURGE_BATCH: u64 = 256;

/// How long a stopping node's peer server may take to finish its calls.
const PEER_SERVER_DRAIN: Duration = Duration::from_millis(500);

/// The peer server pings a connection quiet for this long, and closes it
/// when the ping is not answered within [`PEER_KEEPALIVE_TIMEOUT`].
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest peer message decoded: replies, and the replication calls.
/// Replication reads are capped by bytes well below this, and a single entry
/// is at most one payload. Other calls have smaller limits (see
/// `service::PeerServer`).
pub(crate) const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;

/// A cluster member as configured: id, Raft (gRPC) address, HTTP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
}

/// Cluster view for status endpoints and readiness.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    pub id: u64,
    pub state: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    /// Log entries up to here were purged after a snapshot.
    pub purged: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub nodes: BTreeMap<u64, (String, String)>,
    /// Per follower (on the leader): how far its log matches ours.
    pub replication: BTreeMap<u64, Option<u64>>,
    pub millis_since_quorum_ack: Option<u64>,
    /// Per follower (on the leader): milliseconds since it last
    /// acknowledged a heartbeat or replication (none: never). Absent from
    /// the status of a node of an earlier version, hence the defaults.
    #[serde(default)]
    pub millis_since_contact: BTreeMap<u64, Option<u64>>,
    /// This node's log fsyncs: how many, and their mean duration.
    #[serde(default)]
    pub fsync_count: u64,
    #[serde(default)]
    pub fsync_mean_micros: Option<u64>,
}

pub struct RaftNode {
    pub id: u64,
    pub(in crate::raft) raft: Raft,
    pub(in crate::raft) shared: Arc<SharedState>,
    pub(in crate::raft) log: LogStore,
    /// Latched on the first storage I/O error: the node stops acknowledging.
    pub health: Arc<StorageHealth>,
    /// Refuses new data before the data volume runs full.
    pub disk: Arc<DiskGuard>,
    pub(crate) secret: String,
    channels: Channels,
    /// Peers cut off on purpose (partition tests); see [`LinkFaults`].
    links: LinkFaults,
    /// How far this node's clock reads ahead of the system clock (behind
    /// when negative); 0 except in tests that model clock offsets.
    clock_offset_ms: std::sync::atomic::AtomicI64,
    /// The peer gRPC server's task, awaited on shutdown.
    peer_server: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When this node last saw itself leading (see `holds_lease`).
    led_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// The term this node last won, and when it first saw itself lead in
    /// it (see `holds_lease`).
    won_at: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    /// The term, time and instant of this node's last cluster-clock
    /// reading ([`RaftNode::cluster_clock_ms`]).
    clock_anchor: std::sync::Mutex<Option<(u64, u64, std::time::Instant)>>,
    /// The node's configuration, as it was started with it.
    config: Arc<NodeConfig>,
    /// How peers reach this node's gRPC server and HTTP API.
    advertise: Peer,
    stopping: tokio::sync::watch::Sender<bool>,
    /// Set once this node announced that consumers it held before a restart
    /// are gone; watches are refused on this node until then.
    watchers_welcome: std::sync::atomic::AtomicBool,
    /// When this node last accepted replication from a leader (a follower's
    /// side of the lease).
    leader_contact: std::sync::Mutex<Option<std::time::Instant>>,
    /// When each peer last forwarded a command here: a peer that forwards
    /// is alive, even while the leader's replication to it is backing off.
    peer_contact: std::sync::Mutex<BTreeMap<u64, std::time::Instant>>,
    /// Tries again of proposals and reads after a failed try
    /// ([`RaftNode::proposal_retries`]).
    proposal_retries: std::sync::atomic::AtomicU64,
    /// Gathers envelopes proposed here while this node leads into shared
    /// log entries.
    coalescer: Lanes,
    /// Gathers data-plane envelopes proposed here while another node leads
    /// into groups forwarded together.
    forwarder: Lanes,
    /// The streams the forwarder's groups travel on to the leader.
    forward_streams: forward_stream::ForwardStreams,
}

/// On whose behalf a command is proposed: forwarded admin commands carry
/// proof of the admin token, which the leader checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    DataPlane,
    Admin,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// openraft's configuration for these settings.
fn openraft_config(config: &NodeConfig) -> anyhow::Result<Config> {
    let timings = config.timings;
    Ok(Config {
        cluster_name: "eddy".into(),
        heartbeat_interval: timings.heartbeat.as_millis() as u64,
        election_timeout_min: timings.election_timeout.as_millis() as u64,
        // Also openraft's leader lease (votes refused this long after the
        // last heartbeat), which `Timings::leader_lease` stays within.
        election_timeout_max: timings.election_timeout.as_millis() as u64 * 2,
        enable_pre_vote: Some(true),
        broadcast_submitted_on_append: Some(true),
        // A restarted leader stands for election like any node. Entries go
        // to followers before the leader's own write of them is durable; a
        // leader killed before that write and restored in its old term would
        // hand out log ids (term, index) that a follower already holds for
        // other entries, and that follower would apply its own entry where
        // the others apply the new one.
        enable_leader_restore: Some(false),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
        max_in_snapshot_log_to_keep: config.snapshot_every.min(LOG_KEPT_AFTER_SNAPSHOT),
        purge_batch_size: PURGE_BATCH,
        // The base of a transfer's deadline; the network adds time for the
        // snapshot's size.
        install_snapshot_timeout: super::network::SNAPSHOT_TRANSFER_BASE.as_millis() as u64,
        ..Default::default()
    }
    .validate()?)
}

impl RaftNode {
    /// Open storage, start openraft and the peer gRPC server, and form the
    /// cluster if it was never formed. `advertise` is how peers reach this
    /// node. Returns the node and the stream of state-machine events for
    /// the watch hub.
    pub async fn start(
        config: Arc<NodeConfig>,
        advertise: Peer,
    ) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<Vec<Event>>)> {
        let health = StorageHealth::new();
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir)?;
        let disk = DiskGuard::new(
            data_dir.clone(),
            config.min_free_disk_bytes,
            vec![super::snapshot_file::current_path(&data_dir.join("state"))],
        );
        let log = LogStore::open(&data_dir.join("raft"), health.clone())?;
        let (sm, events) = StateMachine::open(&data_dir.join("state"), health.clone())?;
        let shared = sm.shared();
        let channels = Channels::new(config.peer_tls.as_ref());
        let quorum = Arc::new(LeaderQuorum::default());
        let links = LinkFaults::default();
        let network = Network {
            channels: channels.clone(),
            secret: Arc::new(config.cluster_secret.clone()),
            quorum: quorum.clone(),
            links: links.clone(),
        };
        let raft = Raft::new(
            config.id,
            Arc::new(openraft_config(&config)?),
            network,
            log.clone(),
            sm,
        )
        .await?;
        quorum.set(raft.metrics());
        let mut coalescer_tasks = Vec::new();
        let node = Arc::new_cyclic(|me| {
            let (coalescer, tasks) = Lanes::start(me.clone(), Route::Log);
            let (forwarder, forwarder_tasks) = Lanes::start(me.clone(), Route::Leader);
            coalescer_tasks = tasks.into_iter().chain(forwarder_tasks).collect();
            Self {
                forwarder,
                id: config.id,
                coalescer,
                raft,
                shared,
                log,
                health,
                disk,
                secret: config.cluster_secret.clone(),
                channels,
                links,
                clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
                clock_anchor: std::sync::Mutex::new(None),
                led_until: std::sync::Mutex::new(None),
                won_at: std::sync::Mutex::new(None),
                peer_server: std::sync::Mutex::new(None),
                config,
                advertise,
                stopping: tokio::sync::watch::Sender::new(false),
                watchers_welcome: std::sync::atomic::AtomicBool::new(false),
                leader_contact: std::sync::Mutex::new(None),
                peer_contact: std::sync::Mutex::new(BTreeMap::new()),
                proposal_retries: Default::default(),
                forward_streams: Default::default(),
            }
        });
        for task in coalescer_tasks {
            tokio::spawn(task.run());
        }
        node.serve_peers().await?;
        node.initialize_if_pristine().await?;
        tokio::spawn(node.clone().housekeeping());
        tokio::spawn(node.disk.clone().run(node.stopped()));
        Ok((node, events))
    }

    /// Start the gRPC server that peers call (replication, votes,
    /// forwarded commands), on `raft_listen`, until shutdown.
    async fn serve_peers(self: &Arc<Self>) -> anyhow::Result<()> {
        // The secret is checked on the headers first; each method's decode
        // limit then applies to the messages of an authenticated call.
        let contacts = Arc::new(super::listener::PeerContacts::default());
        let service = tonic::service::interceptor::InterceptedService::new(
            PeerServer::new(PeerService { node: self.clone() }),
            super::service::authenticate(self.secret.clone(), contacts.clone()),
        );
        let limits = self.config.peer_listener;
        let mut server = tonic::transport::Server::builder()
            // The server pings a connection that stays quiet, and closes it
            // when the ping is not answered.
            .http2_keepalive_interval(Some(PEER_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(PEER_KEEPALIVE_TIMEOUT));
        if let Some(id) = &self.config.peer_tls {
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            server = server.tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&id.cert_pem, &id.key_pem))
                    .client_ca_root(Certificate::from_pem(&id.ca_pem))
                    .timeout(limits.handshake),
            )?;
        }
        let listener = tokio::net::TcpListener::bind(self.config.raft_listen).await?;
        let stopped = self.stopped();
        let peer_server = tokio::spawn(async move {
            // No per-request timeout: a snapshot upload may rightly take
            // long (the sender bounds it by its size), and a caller without
            // the cluster secret is refused before its body is read.
            let incoming = super::listener::bounded_incoming(listener, limits, contacts);
            if let Err(e) = server
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped)
                .await
            {
                tracing::error!(error = %e, "raft gRPC server stopped");
            }
        });
        *self.peer_server.lock().unwrap() = Some(peer_server);
        Ok(())
    }

    /// Resolves once [`RaftNode::shutdown`] was called.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Stop Raft, the peer server and the background tasks.
    pub async fn shutdown(&self) {
        self.stopping.send_replace(true);
        self.forward_streams.close().await;
        let _ = self.raft.shutdown().await;
        // Nothing writes the log after this, whatever tasks still hold the
        // node: a node started again in this process opens the file alone.
        self.log.close().await;
        // The peer server drains its calls, then lets go of its listener;
        // a peer's replication stream may keep a call open, so it gets a
        // moment and is then ended. Afterwards the port is free: a node
        // restarted at once can bind it.
        let server = self.peer_server.lock().unwrap().take();
        if let Some(mut server) = server
            && tokio::time::timeout(PEER_SERVER_DRAIN, &mut server)
                .await
                .is_err()
        {
            server.abort();
            let _ = server.await;
        }
    }

    fn members(&self) -> BTreeMap<u64, NodeInfo> {
        let mut peers = self.config.peers.clone();
        if !peers.iter().any(|p| p.id == self.id) {
            peers.push(self.advertise.clone());
        }
        peers
            .into_iter()
            .map(|p| (p.id, NodeInfo::new(p.raft_addr, p.api_addr)))
            .collect()
    }

    /// Only the lowest configured id forms the cluster, and only from an
    /// empty log, so a cluster is initialised once whatever the start order.
    async fn initialize_if_pristine(&self) -> anyhow::Result<()> {
        let members = self.members();
        let lowest = *members.keys().next().expect("at least this node");
        if self.config.join || lowest != self.id || self.raft.is_initialized().await? {
            return Ok(());
        }
        match self.raft.initialize(members).await {
            Ok(()) => tracing::info!(id = self.id, "cluster initialised"),
            Err(e) => tracing::info!(error = %e, "cluster initialisation skipped"),
        }
        Ok(())
    }

    /// Where snapshot files live; received ones are written here too.
    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.config.data_dir.join("state")
    }

    /// A fingerprint of the applied state (index and CRC-32). Encodes the
    /// whole state while holding it: blocking, for diagnostics only.
    pub fn state_digest(&self) -> std::io::Result<super::StateDigest> {
        self.shared.digest()
    }

    /// The fsync durations of this node's log so far.
    pub fn fsync_stats(&self) -> super::FsyncStats {
        self.log.fsync_stats.lock().unwrap().clone()
    }

    /// Read the applied state.
    pub fn read<R>(&self, f: impl FnOnce(&QueueState) -> R) -> R {
        let applied = self.shared.applied.read().unwrap();
        f(&applied.state)
    }

    /// Wait until the local state machine applied at least `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.applied_index.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|i| *i >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    #[cfg(test)]
    pub(crate) fn advertised_raft_addr(&self) -> String {
        self.advertise.raft_addr.clone()
    }

    /// Whether `proof` shows knowledge of this node's admin token. A node
    /// without one takes no forwarded admin command: only a single node
    /// runs without a token, and nobody forwards to it.
    pub(crate) fn admin_proof_matches(&self, proof: &[u8]) -> bool {
        !self.config.admin_token.is_empty()
            && crate::secret::matches_digest(proof, self.config.admin_token.as_bytes())
    }

    /// Whether peers talk to this node over mutual TLS.
    pub(crate) fn uses_peer_tls(&self) -> bool {
        self.config.peer_tls.is_some()
    }

    /// The HTTP address member `id` advertised, if it is a member and gave
    /// one.
    pub fn member_api_addr(&self, id: u64) -> Option<String> {
        self.node_info(id).map(|n| n.data).filter(|a| !a.is_empty())
    }

    pub(crate) fn node_info(&self, id: u64) -> Option<NodeInfo> {
        let m = self.raft.metrics().borrow_watched().clone();
        m.membership_config.membership().get_node(&id).cloned()
    }

    /// The links to peers this node treats as cut (partition tests).
    pub fn links(&self) -> &LinkFaults {
        &self.links
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }
}
