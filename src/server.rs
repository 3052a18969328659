//! Wiring of one node: Raft member, watch hub, HTTP API, and the services
//! declared at start-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{AppState, Hub, MemoryBudget, router};
use crate::config::NodeConfig;
use crate::queue::{Command, Rejection, Reply};
use crate::raft::{Peer, RaftNode};

/// How often a node checks its lease (watchers are closed within this of
/// losing it).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// How often a node compares the consumers the replicated state shows on
/// it with the connections it holds.
const ORPHAN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long the declaration of start-up services waits for a leader
/// between tries.
const SERVICE_DECLARATION_RETRY: Duration = Duration::from_millis(500);

pub struct RunningNode {
    pub node: Arc<RaftNode>,
    pub http_addr: SocketAddr,
    pub hub: Arc<Hub>,
    /// What the HTTP handlers share (for driving the router in process).
    pub app_state: Arc<AppState>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stop serving and shut Raft down (as a crash would, minus the kill).
    pub async fn shutdown(mut self) {
        self.stop_serving().await;
        self.node.shutdown().await;
    }

    /// Stop the HTTP API only: the node goes on as a Raft member whose
    /// client port refuses connections.
    pub async fn stop_serving(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            // Once the task is gone so is its listener: a node restarted
            // at once can bind the same address.
            let _ = server.await;
        }
    }
}

/// Start a node with `config` (checked first): its Raft member, its watch
/// hub and housekeeping tasks, and its HTTP API, which serves until
/// [`RunningNode::shutdown`].
pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
    config.check()?;
    let http = tokio::net::TcpListener::bind(config.http_listen).await?;
    let http_addr = http.local_addr()?;
    let advertise = Peer {
        id: config.id,
        raft_addr: config.advertise_raft.clone(),
        api_addr: config
            .advertise_http
            .clone()
            .unwrap_or_else(|| http_addr.to_string()),
    };
    let config = Arc::new(config);
    let (node, events) = RaftNode::start(config.clone(), advertise).await?;
    let hub = Hub::new(config.id);
    tokio::spawn(hub.clone().run(node.clone(), events));
    tokio::spawn(close_watchers_without_lease(node.clone(), hub.clone()));
    tokio::spawn(detach_consumers_without_connection(
        node.clone(),
        hub.clone(),
    ));
    if !config.services.is_empty() {
        let node = node.clone();
        let services = config.services.clone();
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
                            tokio::time::sleep(SERVICE_DECLARATION_RETRY).await;
                        }
                    }
                }
            }
        });
    }
    let state = Arc::new(AppState {
        node: node.clone(),
        hub: hub.clone(),
        memory: MemoryBudget::new(config.max_memory_bytes),
        config: config.clone(),
        draining: Default::default(),
        console_rates: Default::default(),
    });
    let app = router(state.clone());
    let mut listener = config.listener;
    // A watch whose peer is gone is found within about the watch idle limit
    // even when nothing is sent to it.
    listener
        .dead_peer_timeout
        .get_or_insert(config.effective_watch_idle());
    let client_tls = config.client_tls.clone();
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
        server: Some(server),
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
    let mut tick = tokio::time::interval(LEASE_CHECK_INTERVAL);
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
    let mut tick = tokio::time::interval(ORPHAN_CHECK_INTERVAL);
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
