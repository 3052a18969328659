//! Wiring of one node: Raft member, watch hub, HTTP API, and the services
//! declared at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{AppState, Hub, MemoryBudget, router};
use crate::queue::{Command, Rejection, Reply, ServiceConfig};
use crate::raft::{Peer, RaftNode, RaftSettings};

#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub id: u64,
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub raft_listen: SocketAddr,
    /// Addresses peers and clients use to reach this node (defaults to the
    /// listen addresses).
    pub advertise_http: String,
    pub advertise_raft: String,
    pub peers: Vec<Peer>,
    pub cluster_secret: String,
    /// Mutual TLS between nodes.
    pub peer_tls: Option<crate::tls::TlsIdentity>,
    pub admin_token: String,
    /// When set, `/metrics` and `/admin/cluster` require it.
    pub status_token: String,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub node_lost_ms: u64,
    pub snapshot_every: u64,
    /// Wait to be added to an existing cluster instead of forming one.
    pub join: bool,
    /// Refuse new data while less than this is free on the data volume.
    pub min_free_disk_bytes: u64,
    /// Connection limit and header-read timeout of the HTTP listener.
    pub listener: crate::api::ListenerLimits,
    /// Connection limit and timeouts of the peer gRPC port.
    pub peer_listener: crate::raft::PeerListenerLimits,
    /// TLS on the client port (`--tls-cert`, `--tls-key`).
    pub client_tls: Option<crate::tls::ClientPortTls>,
    pub watch_idle_ms: u64,
    /// See [`crate::api::AppState::watch_max_hold_ms`].
    pub watch_max_hold_ms: u64,
    /// Node memory admission limit (see [`crate::api::MemoryBudget`]).
    pub max_memory_bytes: u64,
    /// Services to create (or update) once the cluster has a leader.
    pub services: Vec<(String, ServiceConfig)>,
    /// Served at the bare `/` and `/sink` paths.
    pub default_service: Option<String>,
}

pub struct RunningNode {
    pub node: Arc<RaftNode>,
    pub http_addr: SocketAddr,
    pub hub: Arc<Hub>,
    /// What the HTTP handlers share (for driving the router in process).
    pub app_state: Arc<AppState>,
    server: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// Stop serving and shut Raft down (as a crash would, minus the kill).
    pub async fn shutdown(self) {
        self.server.abort();
        // Once the task is gone so is its listener: a node restarted at
        // once can bind the same address.
        let _ = self.server.await;
        self.node.shutdown().await;
    }
}

impl ServeSettings {
    /// Whether this node is configured as a member of a cluster of more than
    /// one node: it has peers besides itself, or waits to join a cluster.
    pub fn has_peers(&self) -> bool {
        self.join || self.peers.iter().any(|p| p.id != self.id)
    }
}

/// Why a node refuses to start with the settings it was given.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
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

/// Refuse settings that would leave a cluster open. A single node may run
/// without an admin token (its admin API then answers loopback callers
/// only, for the quick start on one machine); a cluster member may not.
pub fn check_settings(settings: &ServeSettings) -> Result<(), SettingsError> {
    let lease = crate::raft::lease_for(settings.node_lost_ms, settings.election_timeout_ms);
    if settings.has_peers()
        && (lease.as_millis() < 3 * u128::from(settings.heartbeat_ms)
            || settings.node_lost_ms <= settings.election_timeout_ms)
    {
        return Err(SettingsError::Timings {
            lease_ms: lease.as_millis() as u64,
            heartbeat_ms: settings.heartbeat_ms,
            node_lost_ms: settings.node_lost_ms,
            election_timeout_ms: settings.election_timeout_ms,
        });
    }
    if settings.has_peers() && settings.cluster_secret.is_empty() {
        return Err(SettingsError::ClusterSecretRequired);
    }
    if settings.has_peers() && settings.admin_token.is_empty() {
        return Err(SettingsError::AdminTokenRequired);
    }
    if settings.has_peers()
        && settings
            .client_tls
            .as_ref()
            .is_some_and(|t| !t.verifies_other_nodes())
    {
        return Err(SettingsError::ClientTlsCaRequired);
    }
    Ok(())
}

pub async fn start(settings: ServeSettings) -> anyhow::Result<RunningNode> {
    check_settings(&settings)?;
    let http = tokio::net::TcpListener::bind(settings.http_listen).await?;
    let http_addr = http.local_addr()?;
    let raft_settings = RaftSettings {
        id: settings.id,
        data_dir: settings.data_dir.clone(),
        raft_listen: settings.raft_listen,
        advertise: Peer {
            id: settings.id,
            raft_addr: settings.advertise_raft.clone(),
            api_addr: if settings.advertise_http.is_empty() {
                http_addr.to_string()
            } else {
                settings.advertise_http.clone()
            },
        },
        peers: settings.peers.clone(),
        secret: settings.cluster_secret.clone(),
        admin_token: settings.admin_token.clone(),
        peer_tls: settings.peer_tls.clone(),
        heartbeat_ms: settings.heartbeat_ms,
        election_timeout_ms: settings.election_timeout_ms,
        node_lost_ms: settings.node_lost_ms,
        snapshot_every: settings.snapshot_every,
        join: settings.join,
        min_free_disk_bytes: settings.min_free_disk_bytes,
        peer_listener: settings.peer_listener,
    };
    let (node, events) = RaftNode::start(raft_settings).await?;
    let hub = Hub::new(settings.id);
    tokio::spawn(hub.clone().run(node.clone(), events));
    tokio::spawn(close_watchers_without_lease(node.clone(), hub.clone()));
    tokio::spawn(detach_consumers_without_connection(
        node.clone(),
        hub.clone(),
    ));
    if !settings.services.is_empty() {
        let node = node.clone();
        let services = settings.services.clone();
        tokio::spawn(async move {
            for (name, config) in services {
                loop {
                    let cmd = Command::CreateService {
                        name: name.clone(),
                        config: config.clone(),
                    };
                    match node.propose_admin(cmd).await {
                        Ok(Reply::Rejected(Rejection::ServiceExists(_))) => {
                            tracing::info!(
                                service = %name,
                                "service exists; its settings are kept (PUT /admin/services/{name} changes them)"
                            );
                            break;
                        }
                        Ok(Reply::Rejected(r)) => {
                            tracing::error!(service = %name, error = %r, "service declaration refused");
                            break;
                        }
                        Ok(_) => {
                            tracing::info!(service = %name, "service ready");
                            break;
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "waiting for a leader to declare services");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        });
    }
    let state = Arc::new(AppState {
        node: node.clone(),
        hub: hub.clone(),
        default_service: settings.default_service.clone(),
        admin_token: settings.admin_token.clone(),
        status_token: settings.status_token.clone(),
        client_tls: settings.client_tls.clone(),
        watch_idle_ms: settings.watch_idle_ms,
        watch_max_hold_ms: settings.watch_max_hold_ms,
        memory: MemoryBudget::new(settings.max_memory_bytes),
    });
    let app = router(state.clone());
    let mut listener = settings.listener;
    // A watch whose peer is gone is found within about the watch idle limit
    // even when nothing is sent to it.
    listener
        .dead_peer_timeout
        .get_or_insert(Duration::from_millis(settings.watch_idle_ms.max(300)));
    let client_tls = settings.client_tls.clone();
    let server = tokio::spawn(async move {
        if let Err(e) =
            crate::api::serve_with(http, app, listener, client_tls, std::future::pending()).await
        {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(RunningNode {
        app_state: state,
        node,
        http_addr,
        hub,
        server,
    })
}

/// The default node memory limit: half of the memory this process may use,
/// which is the cgroup's limit when there is one (a pod), else the machine's;
/// 4 GiB when neither can be read. Half leaves room for what the estimate
/// does not count: snapshots being built, log entries not yet compacted,
/// buffers of connections.
pub fn default_max_memory_bytes() -> u64 {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, machine) {
        (Some(c), Some(m)) => c.min(m) / 2,
        (Some(x), None) | (None, Some(x)) => x / 2,
        (None, None) => 4 << 30,
    }
}

/// Descriptors kept free of connections: storage (log segments, snapshots,
/// the state file, directory syncs), the listeners, outgoing peer channels
/// and the runtime's own. Running out makes a storage `open` fail, which
/// stops the node.
pub const DESCRIPTOR_RESERVE: u64 = 256;

/// The leader's heartbeat interval by default (`--heartbeat-ms`).
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// The shortest election timeout by default (`--election-timeout-ms`);
/// openraft draws each from between it and twice it.
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 500;
/// How long a member may stay silent by default before its consumers'
/// items move (`--node-lost-ms`). Long enough that the other members'
/// lease outlasts the election after a leader dies (at least two election
/// timeouts, usually a little more), so a leader's death closes no watcher
/// on the other nodes.
pub const DEFAULT_NODE_LOST_MS: u64 = 3_000;

/// Raise this process's soft limit on open descriptors to its hard limit
/// and return the limit in force (`None`: unlimited or unknown).
pub fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && current < maximum
    {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return Some(maximum),
            Err(e) => {
                tracing::warn!(error = %e, current, maximum, "could not raise the descriptor limit")
            }
        }
    }
    limit.current
}

/// Connection limits that fit in `descriptors`: HTTP connections plus peer
/// connections plus [`DESCRIPTOR_RESERVE`] stay within it. Returns the
/// (HTTP, peer) limits, lowered when they did not fit; the peer limit is
/// kept at no more than a quarter of what is left for connections.
pub fn fit_connection_limits(descriptors: u64, http: usize, peer: usize) -> (usize, usize) {
    const FLOOR: u64 = 8;
    let room = descriptors
        .saturating_sub(DESCRIPTOR_RESERVE)
        .max(2 * FLOOR);
    if (http as u64).saturating_add(peer as u64) <= room {
        return (http, peer);
    }
    let peer = (peer as u64).min((room / 4).max(FLOOR));
    let http = (http as u64).min(room - peer).max(FLOOR);
    (http as usize, peer as usize)
}

/// A node without its lease (see [`RaftNode::holds_lease`]) closes its
/// watchers at once, so that clients reconnect to a node that can serve
/// them, and so that no item is pushed here while the rest of the cluster
/// may be moving it elsewhere. New watchers are refused until the lease is
/// back (`accepts_watchers`).
async fn close_watchers_without_lease(node: Arc<RaftNode>, hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = node.stopped();
    tokio::pin!(stopped);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopped => return,
        }
        if node.holds_lease() {
            warned = false;
            continue;
        }
        if hub.connection_count() > 0 {
            if !warned {
                tracing::warn!(
                    "no contact with a leader that has a quorum; closing local watchers"
                );
                warned = true;
            }
            hub.close_all();
        }
    }
}

/// Consumer liveness that cannot be lost: a consumer the replicated state
/// shows running on this node, on a connection this node no longer holds
/// (its `Detach` failed, was lost in an election, or never ran), is
/// detached again, every second, until the state agrees with the node.
async fn detach_consumers_without_connection(node: Arc<RaftNode>, hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = node.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopped => return,
        }
        if !node.accepts_watchers() {
            continue;
        }
        let orphans: Vec<_> = node
            .read(|s| s.running_consumers_on(node.id))
            .into_iter()
            .filter(|(_, _, _, connection)| !hub.holds(*connection))
            .collect();
        for (queue, group, user, connection) in orphans {
            // A connection is registered before its attach is proposed, so
            // one registered meanwhile is live, not orphaned.
            if hub.holds(connection) {
                continue;
            }
            tracing::info!(%queue, %group, %user, connection, "detaching a consumer whose connection is gone");
            let cmd = Command::Detach {
                queue,
                group,
                user,
                connection,
            };
            if let Err(e) = node.propose(cmd).await {
                tracing::debug!(error = %e, connection, "detach not applied; retried");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_fit_in_the_descriptor_limit() {
        // Room enough: unchanged.
        assert_eq!(fit_connection_limits(65_536, 4096, 512), (4096, 512));
        assert_eq!(
            fit_connection_limits(4096 + 512 + 256, 4096, 512),
            (4096, 512)
        );
        // 1,024 descriptors: 768 for connections, a quarter for peers.
        let (http, peer) = fit_connection_limits(1024, 4096, 512);
        assert_eq!((http, peer), (576, 192));
        assert!(http as u64 + peer as u64 + DESCRIPTOR_RESERVE <= 1024);
        // A small peer limit is kept.
        assert_eq!(fit_connection_limits(1024, 4096, 64), (704, 64));
        // Absurdly low limits still leave a few of each.
        assert_eq!(fit_connection_limits(10, 4096, 512), (8, 8));
    }
}
