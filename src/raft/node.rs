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
//! consumers' items. Both are shorter than `node_lost_ms`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{Config, ServerState, SnapshotPolicy};
use tokio::sync::mpsc;

use super::StorageHealth;
use super::disk_guard::DiskGuard;
use super::log_store::LogStore;
use super::network::{Channels, LeaderQuorum, LinkFaults, Network, authorized, decode, encode};
use super::pb::ForwardRequest;
use super::pb::raft_client::RaftClient;
use super::service::{PeerServer, Service};
use super::state_machine::{SharedState, StateMachine};
use super::types::{NodeInfo, Raft};
use crate::queue::{Command, Envelope, Event, QueueState, Reply};

/// Take a snapshot (and purge the log behind it) once the entries held in
/// memory pass this many bytes, whatever `snapshot_every` says: large
/// payloads must not pile up in the log's memory.
const SNAPSHOT_LOG_BYTES: u64 = 256 * 1024 * 1024;

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

/// Everything a node needs to join or form its cluster.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub id: u64,
    pub data_dir: PathBuf,
    /// Where the gRPC server listens.
    pub raft_listen: SocketAddr,
    /// How peers reach this node's gRPC server and HTTP API.
    pub advertise: Peer,
    /// All initial members, including this node. Empty or just this node
    /// means a single-node cluster.
    pub peers: Vec<Peer>,
    pub secret: String,
    /// Mutual TLS between nodes: this node's certificate and key, and the
    /// CA that peers' certificates must chain to.
    pub peer_tls: Option<crate::tls::TlsIdentity>,
    /// The admin token; admin commands forwarded to the leader carry proof
    /// of it.
    pub admin_token: String,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// A member silent this long is declared gone (its consumers' items move).
    pub node_lost_ms: u64,
    pub snapshot_every: u64,
    /// Never form a cluster: wait to be added to an existing one.
    pub join: bool,
    /// New data is refused (507) while less than this is free on the data
    /// volume; 0 turns the check off.
    pub min_free_disk_bytes: u64,
    /// Connection limit and timeouts of the peer gRPC port.
    pub peer_listener: super::PeerListenerLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("this node is not the leader")]
    NotLeader { leader: Option<u64> },
    #[error("no leader is available: {0}")]
    Unavailable(String),
    /// The command is not acceptable (malformed or not allowed).
    #[error("{0}")]
    Refused(String),
    /// The data volume is short of space (HTTP 507).
    #[error("{0}")]
    NoSpace(String),
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// On whose behalf a command is proposed: forwarded admin commands carry
/// proof of the admin token, which the leader checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    DataPlane,
    Admin,
}

/// Cluster view for status endpoints and readiness.
#[derive(Debug, Clone, serde::Serialize)]
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
}

pub struct RaftNode {
    pub id: u64,
    pub raft: Raft,
    pub shared: Arc<SharedState>,
    pub log: LogStore,
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
    /// The term, time and instant of this node's last cluster-clock
    /// reading ([`RaftNode::cluster_clock_ms`]).
    clock_anchor: std::sync::Mutex<Option<(u64, u64, std::time::Instant)>>,
    settings: RaftSettings,
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
}

/// The margin by which a lease ends before anyone may move the items of
/// the watchers it covers: a fifth of node-lost, at least 250 ms.
fn lease_margin(node_lost_ms: u64) -> u64 {
    (node_lost_ms / 5).max(250)
}

/// The lease a leader holds with these timings, counted from the last time
/// a quorum acknowledged it: node-lost less the margin, and at most two
/// election timeouts.
///
/// The cap is what makes a partitioned leader safe: openraft refuses to vote
/// for `election_timeout_max` (two election timeouts, set in `start`) after
/// a voter last heard its leader, so no new leader exists before the old
/// one's lease has run out; the new leader then waits one more election
/// timeout before releasing the old leader's consumers (housekeeping).
pub fn lease_for(node_lost_ms: u64, election_timeout_ms: u64) -> Duration {
    Duration::from_millis(
        node_lost_ms
            .saturating_sub(lease_margin(node_lost_ms))
            .min(election_timeout_ms.saturating_mul(2))
            .max(1),
    )
}

/// The lease any other member holds, counted from the last time a quorum
/// acknowledged the leader it last accepted replication from: node-lost
/// less the margin.
///
/// No leader can release a member's consumers sooner: the leader it
/// followed waits node-lost after the member's last acknowledgement, which
/// came after that quorum acknowledgement; a new leader is elected only
/// after it (a quorum stopped acknowledging the old leader to vote) and
/// waits node-lost from its election. Only the previous leader gets a
/// shorter wait, and a member that followed another leader since is not
/// it. Longer than two election timeouts (the earliest a new leader can be
/// elected) with the default timings, so the followers of a leader that
/// dies keep their watchers through the election. Eddy never transfers
/// leadership, which would skip the vote refusal these bounds rely on.
pub fn member_lease_for(node_lost_ms: u64) -> Duration {
    Duration::from_millis(
        node_lost_ms
            .saturating_sub(lease_margin(node_lost_ms))
            .max(1),
    )
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RaftNode {
    /// Open storage, start openraft and the peer gRPC server, and form the
    /// cluster if it was never formed. Returns the node and the stream of
    /// state-machine events for the watch hub.
    pub async fn start(
        settings: RaftSettings,
    ) -> anyhow::Result<(Arc<Self>, mpsc::UnboundedReceiver<Vec<Event>>)> {
        let health = StorageHealth::new();
        std::fs::create_dir_all(&settings.data_dir)?;
        let disk = DiskGuard::new(
            settings.data_dir.clone(),
            settings.min_free_disk_bytes,
            vec![super::snapshot_file::current_path(
                &settings.data_dir.join("state"),
            )],
        );
        let log = LogStore::open(&settings.data_dir.join("raft"), health.clone())?;
        let (sm, events) = StateMachine::open(&settings.data_dir.join("state"), health.clone())?;
        let shared = sm.shared();
        let config = Config {
            cluster_name: "eddy".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_timeout_ms,
            // Also openraft's leader lease (votes refused this long after
            // the last heartbeat), which `lease_for` stays within.
            election_timeout_max: settings.election_timeout_ms * 2,
            enable_pre_vote: Some(true),
            broadcast_submitted_on_append: Some(true),
            // A restarted leader stands for election like any node. Entries
            // go to followers before the leader's own write of them is
            // durable; a leader killed before that write and restored in its
            // old term would hand out log ids (term, index) that a follower
            // already holds for other entries, and that follower would apply
            // its own entry where the others apply the new one.
            enable_leader_restore: Some(false),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.snapshot_every.min(1000),
            purge_batch_size: 256,
            // The base of a transfer's deadline; the network adds time
            // for the snapshot's size.
            install_snapshot_timeout: super::network::SNAPSHOT_TRANSFER_BASE.as_millis() as u64,
            ..Default::default()
        }
        .validate()?;
        let channels = Channels::new(settings.peer_tls.as_ref());
        let quorum = Arc::new(LeaderQuorum::default());
        let links = LinkFaults::default();
        let network = Network {
            channels: channels.clone(),
            secret: Arc::new(settings.secret.clone()),
            quorum: quorum.clone(),
            links: links.clone(),
        };
        let raft = Raft::new(settings.id, Arc::new(config), network, log.clone(), sm).await?;
        quorum.set(raft.metrics());
        let node = Arc::new(Self {
            id: settings.id,
            raft,
            shared,
            log,
            health,
            disk,
            secret: settings.secret.clone(),
            channels,
            links,
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            clock_anchor: std::sync::Mutex::new(None),
            settings: settings.clone(),
            stopping: tokio::sync::watch::Sender::new(false),
            watchers_welcome: std::sync::atomic::AtomicBool::new(false),
            leader_contact: std::sync::Mutex::new(None),
            peer_contact: std::sync::Mutex::new(BTreeMap::new()),
        });

        // The secret is checked on the headers first; each method's decode
        // limit then applies to the messages of an authenticated call.
        let contacts = Arc::new(super::listener::PeerContacts::default());
        let service = tonic::service::interceptor::InterceptedService::new(
            PeerServer::new(Service { node: node.clone() }),
            super::service::authenticate(settings.secret.clone(), contacts.clone()),
        );
        let limits = settings.peer_listener;
        let mut server = tonic::transport::Server::builder()
            // The server pings a connection that stays quiet, and closes it
            // when the ping is not answered.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(id) = &settings.peer_tls {
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            server = server.tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&id.cert_pem, &id.key_pem))
                    .client_ca_root(Certificate::from_pem(&id.ca_pem))
                    .timeout(limits.handshake),
            )?;
        }
        let listener = tokio::net::TcpListener::bind(settings.raft_listen).await?;
        let stopped = node.stopped();
        tokio::spawn(async move {
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

        node.initialize_if_pristine().await?;
        tokio::spawn(node.clone().housekeeping());
        tokio::spawn(node.disk.clone().run(node.stopped()));
        Ok((node, events))
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
        let _ = self.raft.shutdown().await;
    }

    fn members(&self) -> BTreeMap<u64, NodeInfo> {
        let mut peers = self.settings.peers.clone();
        if !peers.iter().any(|p| p.id == self.id) {
            peers.push(self.settings.advertise.clone());
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
        if self.settings.join || lowest != self.id || self.raft.is_initialized().await? {
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
        self.settings.data_dir.join("state")
    }

    /// This node's clock: the system clock, plus the offset a test set.
    fn wall_clock_ms(&self) -> u64 {
        let offset = self
            .clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        now_ms().saturating_add_signed(offset)
    }

    /// Run this node's clock `offset_ms` ahead of the system clock (behind
    /// when negative): how tests model the offsets between nodes' clocks.
    pub fn set_clock_offset_ms(&self, offset_ms: i64) {
        self.clock_offset_ms
            .store(offset_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The time a leader stamps on what it appends and judges expiry by,
    /// and every node reads state times against (ages, idle times): the
    /// latest of this node's clock, the applied state's clock, and, within
    /// one term, the previous reading plus the time since (on the monotonic
    /// clock). A predecessor whose clock ran ahead left the state's clock
    /// there (applied time never goes back); counting on from there,
    /// instead of waiting for this node's clock to catch up, keeps every
    /// grace period its configured length, and the reading never goes back
    /// within a term, not even when the system clock is stepped back. Each
    /// new term starts again from this node's and the state's clocks, so a
    /// lead that is no longer needed is not carried on.
    ///
    /// Not to be called inside [`Self::read`]: it reads the state itself.
    pub fn cluster_clock_ms(&self) -> u64 {
        let wall = self.wall_clock_ms();
        let applied = self.read(|s| s.clock_ms());
        let term = self.raft.metrics().borrow_watched().current_term;
        let mut anchor = self.clock_anchor.lock().unwrap();
        let carried = match *anchor {
            Some((t, ms, at)) if t == term => ms.saturating_add(at.elapsed().as_millis() as u64),
            _ => 0,
        };
        let now = wall.max(applied).max(carried);
        *anchor = Some((term, now, std::time::Instant::now()));
        now
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

    /// Refuse a command this node must not write: any, once storage failed;
    /// new data, while the data volume is short of space.
    fn admit(&self, command: &Command) -> Result<(), ProposeError> {
        if let Some(reason) = self.health.failure() {
            return Err(ProposeError::Fatal(format!("storage failed: {reason}")));
        }
        if command.has_nested_batch() {
            return Err(ProposeError::Refused("nested command batch".into()));
        }
        self.disk
            .admit(command.added_bytes())
            .map_err(|e| ProposeError::NoSpace(e.to_string()))
    }

    /// Propose a command forwarded by another node: this node's storage
    /// admits it, then it goes to the local Raft.
    pub async fn write_forwarded(&self, envelope: Envelope) -> Result<Reply, ProposeError> {
        self.admit(&envelope.command)?;
        self.write_local(envelope).await
    }

    /// Propose a command on the leader. Only this node; no forwarding.
    /// The envelope is stamped with this (the leader's) clock, so all time
    /// the state machine sees comes from leaders, never from the node that
    /// happened to receive a request.
    pub async fn write_local(&self, mut envelope: Envelope) -> Result<Reply, ProposeError> {
        envelope.now_ms = self.cluster_clock_ms();
        match self.raft.client_write(envelope).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(RaftError::APIError(e)) => Err(ProposeError::Unavailable(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(ProposeError::Fatal(f.to_string())),
        }
    }

    /// Propose `command` wherever the leader is, retrying through elections
    /// for up to `deadline`.
    pub async fn propose(&self, command: Command) -> Result<Reply, ProposeError> {
        self.propose_as(command, Origin::DataPlane).await
    }

    /// Propose an admin command (create or delete a service) on behalf of a
    /// caller the API authenticated as an administrator.
    pub async fn propose_admin(&self, command: Command) -> Result<Reply, ProposeError> {
        self.propose_as(command, Origin::Admin).await
    }

    async fn propose_as(&self, command: Command, origin: Origin) -> Result<Reply, ProposeError> {
        let envelope = Envelope {
            id: uuid::Uuid::new_v4().as_u128(),
            now_ms: self.wall_clock_ms(),
            command,
        };
        self.propose_envelope_as(envelope, origin, Duration::from_secs(5))
            .await
    }

    /// Propose a data-plane envelope as it is (a retry reuses its id, and
    /// the state machine applies it once).
    pub async fn propose_envelope(
        &self,
        envelope: Envelope,
        deadline: Duration,
    ) -> Result<Reply, ProposeError> {
        self.propose_envelope_as(envelope, Origin::DataPlane, deadline)
            .await
    }

    async fn propose_envelope_as(
        &self,
        envelope: Envelope,
        origin: Origin,
        deadline: Duration,
    ) -> Result<Reply, ProposeError> {
        // The entry node stores the entry too: it checks its own disk
        // before the leader checks its.
        self.admit(&envelope.command)?;
        let start = tokio::time::Instant::now();
        let mut last_err;
        loop {
            // A leader without a quorum never commits: bound each attempt.
            let remaining = deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(100));
            let attempt = tokio::time::timeout(remaining, self.write_local(envelope.clone()));
            let local = match attempt.await {
                Ok(r) => r,
                Err(_) => Err(ProposeError::Unavailable(
                    "no quorum acknowledged the write in time; outcome unknown".into(),
                )),
            };
            let result = match local {
                Err(ProposeError::NotLeader {
                    leader: Some(leader),
                }) if leader != self.id => self.forward(leader, &envelope, origin).await,
                other => other,
            };
            match result {
                Ok(reply) => {
                    return Ok(reply);
                }
                Err(
                    e @ (ProposeError::Fatal(_)
                    | ProposeError::NoSpace(_)
                    | ProposeError::Refused(_)),
                ) => return Err(e),
                Err(e) => last_err = e,
            }
            if start.elapsed() >= deadline {
                return Err(match last_err {
                    ProposeError::NotLeader { .. } => {
                        ProposeError::Unavailable("no leader elected".into())
                    }
                    e => e,
                });
            }
            self.wait_for_leader_change(Duration::from_millis(200))
                .await;
        }
    }

    async fn wait_for_leader_change(&self, max: Duration) {
        let mut m = self.raft.metrics();
        let _ = tokio::time::timeout(max, m.changed()).await;
    }

    /// A gRPC client for member `id`, over the cached channel to it.
    fn peer_client(&self, id: u64) -> Result<RaftClient<tonic::transport::Channel>, ProposeError> {
        if self.links.is_cut(id) {
            return Err(ProposeError::Unavailable(format!(
                "link to node {id} is cut"
            )));
        }
        let addr = self
            .node_info(id)
            .map(|n| n.raft_addr)
            .ok_or(ProposeError::NotLeader { leader: None })?;
        let channel = self
            .channels
            .get(&addr)
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        Ok(RaftClient::new(channel).max_decoding_message_size(MAX_PEER_MESSAGE))
    }

    async fn forward(
        &self,
        leader: u64,
        envelope: &Envelope,
        origin: Origin,
    ) -> Result<Reply, ProposeError> {
        let mut client = self.peer_client(leader)?;
        let admin_proof = match origin {
            Origin::Admin => crate::secret::digest(self.settings.admin_token.as_bytes()).to_vec(),
            Origin::DataPlane => Vec::new(),
        };
        let req = authorized(
            &self.secret,
            ForwardRequest {
                command: encode(envelope).into(),
                from: self.id,
                admin_proof: admin_proof.into(),
            },
            Some(Duration::from_secs(5)),
        );
        let reply = client
            .forward(req)
            .await
            .map_err(|s| {
                ProposeError::Unavailable(format!("forward to node {leader}: {}", s.message()))
            })?
            .into_inner();
        match reply.error_kind.as_str() {
            "" => decode(&reply.reply).map_err(ProposeError::Unavailable),
            "not_leader" => Err(ProposeError::NotLeader { leader: None }),
            "rejected" => Err(ProposeError::Refused(reply.error)),
            "no_space" => Err(ProposeError::NoSpace(format!(
                "node {leader}: {}",
                reply.error
            ))),
            _ => Err(ProposeError::Unavailable(reply.error)),
        }
    }

    /// On the leader: confirm leadership with a quorum round and return the
    /// index a read must observe to be linearizable.
    pub async fn leader_read_index(&self) -> Result<u64, ProposeError> {
        match self
            .raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Ok(read) => Ok(read.log_id().index()),
            Err(RaftError::APIError(openraft::errors::LinearizableReadError::ForwardToLeader(
                f,
            ))) => Err(ProposeError::NotLeader {
                leader: f.leader_id,
            }),
            Err(RaftError::APIError(e)) => Err(ProposeError::Unavailable(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(ProposeError::Fatal(f.to_string())),
        }
    }

    /// Wait until this node's state reflects every write acknowledged before
    /// the call: ask the leader (itself or over gRPC) for its read index and
    /// wait until it is applied here.
    pub async fn linearize(&self) -> Result<(), ProposeError> {
        let deadline = Duration::from_secs(5);
        let start = tokio::time::Instant::now();
        loop {
            let index = match self.leader_read_index_anywhere().await {
                Ok(i) => i,
                Err(ProposeError::Fatal(e)) => return Err(ProposeError::Fatal(e)),
                Err(e) if start.elapsed() >= deadline => {
                    return Err(match e {
                        ProposeError::NotLeader { .. } => {
                            ProposeError::Unavailable("no leader elected".into())
                        }
                        e => e,
                    });
                }
                Err(_) => {
                    self.wait_for_leader_change(Duration::from_millis(200))
                        .await;
                    continue;
                }
            };
            let left = deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(100));
            return if self.wait_applied(index, left).await {
                Ok(())
            } else {
                Err(ProposeError::Unavailable(
                    "this node is not catching up with the leader".into(),
                ))
            };
        }
    }

    async fn leader_read_index_anywhere(&self) -> Result<u64, ProposeError> {
        let timeout = Duration::from_secs(2);
        match tokio::time::timeout(timeout, self.leader_read_index()).await {
            Err(_) => Err(ProposeError::Unavailable("read index timed out".into())),
            Ok(Err(ProposeError::NotLeader { leader: Some(l) })) if l != self.id => {
                let mut client = self.peer_client(l)?;
                let req = authorized(
                    &self.secret,
                    super::pb::RaftRequest {
                        target: l,
                        body: Default::default(),
                        leader_quorum_age_ms: None,
                    },
                    Some(timeout),
                );
                let reply = client
                    .read_index(req)
                    .await
                    .map_err(|s| {
                        ProposeError::Unavailable(format!(
                            "read index from node {l}: {}",
                            s.message()
                        ))
                    })?
                    .into_inner();
                if !reply.error.is_empty() {
                    return Err(ProposeError::NotLeader { leader: None });
                }
                decode(&reply.body).map_err(ProposeError::Unavailable)
            }
            Ok(other) => other,
        }
    }

    fn write_error(
        e: RaftError<super::types::TypeConfig, ClientWriteError<super::types::TypeConfig>>,
    ) -> ProposeError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::NotLeader {
                leader: f.leader_id,
            },
            RaftError::APIError(e) => ProposeError::Unavailable(e.to_string()),
            RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
        }
    }

    /// On the leader: add a node as a learner, wait until it caught up, then
    /// make it a voter.
    pub async fn add_member(
        &self,
        id: u64,
        raft_addr: String,
        api_addr: String,
    ) -> Result<(), ProposeError> {
        if self.settings.admin_token.is_empty() {
            return Err(ProposeError::Refused(
                "a cluster of more than one node needs an admin token on every node; \
                 this node has none"
                    .into(),
            ));
        }
        self.raft
            .add_learner(id, NodeInfo::new(raft_addr, api_addr), true)
            .await
            .map_err(Self::write_error)?;
        let mut voters: BTreeSet<u64> = self.status().voters.into_iter().collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(Self::write_error)?;
        Ok(())
    }

    /// On the leader: remove a node from the voters (and the cluster).
    pub async fn remove_member(&self, id: u64) -> Result<(), ProposeError> {
        let mut voters: BTreeSet<u64> = self.status().voters.into_iter().collect();
        if !voters.remove(&id) {
            return Err(ProposeError::Unavailable(format!(
                "node {id} is not a voter"
            )));
        }
        if voters.is_empty() {
            return Err(ProposeError::Unavailable(
                "cannot remove the last voter".into(),
            ));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(Self::write_error)?;
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn settings_raft_addr(&self) -> String {
        self.settings.advertise.raft_addr.clone()
    }

    /// Whether `proof` shows knowledge of this node's admin token. A node
    /// without one takes no forwarded admin command: only a single node
    /// runs without a token, and nobody forwards to it.
    pub(crate) fn admin_proof_matches(&self, proof: &[u8]) -> bool {
        !self.settings.admin_token.is_empty()
            && crate::secret::matches_digest(proof, self.settings.admin_token.as_bytes())
    }

    /// Whether peers talk to this node over mutual TLS.
    pub(crate) fn uses_peer_tls(&self) -> bool {
        self.settings.peer_tls.is_some()
    }

    pub fn node_info(&self, id: u64) -> Option<NodeInfo> {
        let m = self.raft.metrics().borrow_watched().clone();
        m.membership_config.membership().get_node(&id).cloned()
    }

    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, n)| (*id, (n.raft_addr.clone(), n.data.clone())))
            .collect();
        let replication = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.as_ref().map(|l| l.index())))
                    .collect()
            })
            .unwrap_or_default();
        ClusterStatus {
            id: self.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed: m.cluster_committed.as_ref().map(|l| l.index()),
            applied: m.last_applied.as_ref().map(|l| l.index()),
            purged: m.purged.as_ref().map(|l| l.index()),
            voters,
            learners,
            nodes,
            replication,
            millis_since_quorum_ack: m
                .last_quorum_acked
                .as_ref()
                .map(|t| t.elapsed().as_millis() as u64),
        }
    }

    /// Whether this node may take watch connections (it announced its
    /// start, so no consumer state from before can be mistaken for new).
    pub fn accepts_watchers(&self) -> bool {
        self.watchers_welcome
            .load(std::sync::atomic::Ordering::Acquire)
            && self.holds_lease()
    }

    /// This node accepted replication from a leader, in a request it
    /// received at `received`. The leader said a quorum last acknowledged
    /// it `quorum_age_ms` before sending (a leader that does not say is
    /// taken to have just then): the member's lease runs from then, so that
    /// a follower cut off together with a leader that lost its quorum (a
    /// minority of two or more, in a cluster of five or more) gives up its
    /// lease as that leader does, and its watchers reconnect to the
    /// majority. Counting from the receipt, not from the reply, keeps a
    /// slow write of the entries from lengthening the lease. Contact never
    /// moves back.
    pub(crate) fn note_leader_contact(
        &self,
        received: std::time::Instant,
        quorum_age_ms: Option<u64>,
    ) {
        let at = match quorum_age_ms {
            None => received,
            // A leader no quorum acknowledged yet (just elected) extends
            // nothing, and takes nothing away either.
            Some(u64::MAX) => return,
            Some(age) => match received.checked_sub(Duration::from_millis(age)) {
                Some(at) => at,
                None => return,
            },
        };
        let mut contact = self.leader_contact.lock().unwrap();
        *contact = Some(contact.map_or(at, |before| before.max(at)));
    }

    /// Forget the contact with earlier leaders once this node leads: if it
    /// steps down, only replication from the next leader gives it a lease.
    fn forget_leader_contact(&self) {
        *self.leader_contact.lock().unwrap() = None;
    }

    /// `peer` forwarded a command just now.
    pub(crate) fn note_peer_contact(&self, peer: u64) {
        self.peer_contact
            .lock()
            .unwrap()
            .insert(peer, std::time::Instant::now());
    }

    /// How long the leader may serve watchers after a quorum last
    /// acknowledged it ([`lease_for`]).
    pub fn leader_lease(&self) -> Duration {
        lease_for(
            self.settings.node_lost_ms,
            self.settings.election_timeout_ms,
        )
    }

    /// How long any other member may serve watchers after the leader it
    /// last accepted replication from was last acknowledged by a quorum
    /// ([`member_lease_for`]).
    pub fn member_lease(&self) -> Duration {
        member_lease_for(self.settings.node_lost_ms)
    }

    /// Whether this node is in touch with a working cluster: a leader whose
    /// quorum acknowledged it within the leader's lease, or a member that
    /// accepted replication from a leader that a quorum acknowledged within
    /// the member's lease ([`Self::note_leader_contact`]), whether it
    /// follows that leader still or is voting in an election. A node
    /// without it must not push items: the rest of the cluster may be
    /// redelivering them.
    pub fn holds_lease(&self) -> bool {
        let m = self.raft.metrics().borrow_watched().clone();
        match m.state {
            ServerState::Leader => {
                self.forget_leader_contact();
                let lease = self.leader_lease();
                m.membership_config.membership().voter_ids().count() <= 1
                    || m.last_quorum_acked
                        .as_ref()
                        .is_some_and(|t| t.elapsed() < lease)
            }
            ServerState::Shutdown => false,
            _ => {
                let lease = self.member_lease();
                self.leader_contact
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() < lease)
            }
        }
    }

    /// The links to peers this node treats as cut (partition tests).
    pub fn links(&self) -> &LinkFaults {
        &self.links
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Leader-only timers: grace-period expiry and lost members.
    async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut announced_restart = false;
        let mut last_size_snapshot = None;
        // The term this node leads, and since when (a node that lost and
        // regained leadership between two ticks starts its wait again).
        let mut leader_since: Option<(u64, tokio::time::Instant)> = None;
        // The leader before this node took over: it went silent long enough
        // for an election, so it needs less benefit of the doubt.
        let mut previous_leader: Option<u64> = None;
        let stopped = self.stopped();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopped => return,
            }
            if self.log.entry_bytes() > SNAPSHOT_LOG_BYTES
                && last_size_snapshot
                    .is_none_or(|t: tokio::time::Instant| t.elapsed() > Duration::from_secs(1))
            {
                last_size_snapshot = Some(tokio::time::Instant::now());
                tracing::info!(
                    bytes = self.log.entry_bytes(),
                    "raft log holds many bytes; taking a snapshot"
                );
                let _ = self.raft.trigger().snapshot().await;
            }
            if !announced_restart && self.status().leader.is_some() {
                // Whatever consumers this node held before it started are
                // gone, whatever the local (possibly stale) state says.
                announced_restart = self
                    .propose(Command::NodeGone { node: self.id })
                    .await
                    .is_ok();
                if announced_restart {
                    self.watchers_welcome
                        .store(true, std::sync::atomic::Ordering::Release);
                }
            }
            if !self.is_leader() {
                leader_since = None;
                if let Some(l) = self.status().leader.filter(|l| *l != self.id) {
                    previous_leader = Some(l);
                }
                continue;
            }
            let term = self.status().term;
            if leader_since.is_none_or(|(t, _)| t != term) {
                leader_since = Some((term, tokio::time::Instant::now()));
                self.forget_leader_contact();
            }
            let since = leader_since.map_or_else(tokio::time::Instant::now, |(_, at)| at);
            let now = self.cluster_clock_ms();
            if self.read(|s| s.next_expiry()).is_some_and(|t| t <= now)
                && let Err(e) = self
                    .propose_housekeeping(Command::GraceExpired { term })
                    .await
            {
                tracing::debug!(error = %e, "grace expiry not applied");
            }
            // Only a leader that hears from a quorum may judge others: one
            // that is itself cut off would otherwise declare the majority
            // lost.
            if !self.holds_lease() {
                continue;
            }
            let limit = Duration::from_millis(self.settings.node_lost_ms);
            let old_leader_limit =
                limit.min(Duration::from_millis(self.settings.election_timeout_ms));
            // A new leader gives every member a full timeout to ack, except
            // the old leader, whose silence already caused the election.
            let lost: BTreeSet<u64> = if since.elapsed() >= limit {
                self.lost_members(limit)
            } else if since.elapsed() >= old_leader_limit
                && let Some(old) = previous_leader
                && self.silent_since(old, since.into_std())
            {
                self.lost_members(old_leader_limit)
                    .into_iter()
                    .filter(|n| *n == old)
                    .collect()
            } else {
                BTreeSet::new()
            };
            for node in lost {
                tracing::warn!(
                    node,
                    term,
                    "member stopped acknowledging; moving its consumers' items"
                );
                if let Err(e) = self
                    .propose_housekeeping(Command::NodeLost { node, term })
                    .await
                {
                    tracing::debug!(error = %e, "node-lost not applied");
                }
            }
        }
    }

    /// Propose a leader decision on this node only: never forwarded (a
    /// deposed leader's decision is void), bounded in time, and applied only
    /// in the term it carries.
    async fn propose_housekeeping(&self, command: Command) -> Result<Reply, ProposeError> {
        let envelope = Envelope {
            id: uuid::Uuid::new_v4().as_u128(),
            now_ms: self.wall_clock_ms(),
            command,
        };
        let timeout = Duration::from_millis(self.settings.node_lost_ms);
        match tokio::time::timeout(timeout, self.write_local(envelope)).await {
            Ok(Ok(Reply::Rejected(r))) => Err(ProposeError::Refused(r.to_string())),
            Ok(r) => r,
            Err(_) => Err(ProposeError::Unavailable(
                "no quorum acknowledged the decision in time".into(),
            )),
        }
    }

    /// Whether `node` has neither acknowledged this leader's replication
    /// nor forwarded a command since `since` (this leader's election). Only
    /// such an old leader gets the shorter wait: one that has since
    /// followed this leader holds a member's lease, which only the full
    /// node-lost wait outlasts.
    fn silent_since(&self, node: u64, since: std::time::Instant) -> bool {
        let acked = self
            .raft
            .metrics()
            .borrow_watched()
            .heartbeat
            .as_ref()
            .and_then(|h| h.get(&node).cloned().flatten())
            .is_some();
        let forwarded = self
            .peer_contact
            .lock()
            .unwrap()
            .get(&node)
            .is_some_and(|t| *t >= since);
        !acked && !forwarded
    }

    /// Members that host consumers and whose last ack is older than the
    /// node-lost timeout (measured on the leader's own clock).
    fn lost_members(&self, limit: Duration) -> BTreeSet<u64> {
        let hosting = self.read(|s| s.consumer_nodes());
        let m = self.raft.metrics().borrow_watched().clone();
        let Some(heartbeat) = &m.heartbeat else {
            return BTreeSet::new();
        };
        let forwarded = self.peer_contact.lock().unwrap().clone();
        hosting
            .into_iter()
            .filter(|n| *n != self.id)
            .filter(|n| match heartbeat.get(n) {
                Some(Some(t)) => t.elapsed() > limit,
                // A member the leader never heard from, or not a member.
                Some(None) | None => true,
            })
            // A member that just forwarded a command (an attach after it
            // rejoined, say) is alive, whatever replication says so far.
            .filter(|n| forwarded.get(n).is_none_or(|t| t.elapsed() > limit))
            .collect()
    }
}
