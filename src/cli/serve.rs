//! `eddy serve`: a node's settings from flags and environment, and its
//! run until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use eddy::config::{NodeConfig, Timings};
use eddy::queue::{QueueLimits, ServiceConfig};
use eddy::raft::Peer;
use eddy::server::start;

use super::{AdminToken, read_secret_file, terminated};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Node id (unique in the cluster, > 0).
    #[arg(long, env = "EDDY_NODE_ID", default_value_t = 1)]
    pub(crate) id: u64,
    /// Take the node id from the trailing ordinal of the host name (a
    /// StatefulSet's `eddy-0` is node 1).
    #[arg(long, env = "EDDY_ID_FROM_HOSTNAME", default_value_t = false)]
    pub(crate) id_from_hostname: bool,
    /// Where the Raft log and snapshots live.
    #[arg(long, env = "EDDY_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// HTTP (EAS protocol, admin, metrics) listen address. This machine
    /// only by default: the quick start's demo service has no token (the
    /// container image listens on every interface).
    #[arg(long, env = "EDDY_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// Node-to-node gRPC listen address (this machine only by default).
    #[arg(long, env = "EDDY_RAFT_LISTEN", default_value = "127.0.0.1:9090")]
    pub(crate) raft_listen: SocketAddr,
    /// How peers reach this node's gRPC port (host:port).
    #[arg(long, env = "EDDY_ADVERTISE_RAFT")]
    pub(crate) advertise_raft: Option<String>,
    /// How clients reach this node's HTTP port (host:port).
    #[arg(long, env = "EDDY_ADVERTISE_HTTP")]
    pub(crate) advertise_http: Option<String>,
    /// Initial members: `ID@HOST:RAFT_PORT[@HOST:HTTP_PORT]`, comma separated
    /// (this node included). Empty: a single-node cluster.
    #[arg(long, env = "EDDY_PEERS", value_delimiter = ',')]
    pub(crate) peers: Vec<String>,
    /// Shared secret that authenticates node-to-node calls. Required when
    /// the cluster has more than one member; there is no default.
    #[arg(
        long,
        env = "EDDY_CLUSTER_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) cluster_secret: String,
    /// Mutual TLS between nodes: this node's certificate (PEM). With
    /// `--peer-tls-key` and `--peer-tls-ca`; `eddy certs generate` makes them.
    #[arg(long, env = "EDDY_PEER_TLS_CERT", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    pub(crate) peer_tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "EDDY_PEER_TLS_KEY", requires = "peer_tls_cert")]
    pub(crate) peer_tls_key: Option<PathBuf>,
    /// The CA every peer's certificate must chain to (PEM).
    #[arg(long, env = "EDDY_PEER_TLS_CA", requires = "peer_tls_cert")]
    pub(crate) peer_tls_ca: Option<PathBuf>,
    /// Serve the client port (HTTP, WebSocket) over TLS with this
    /// certificate chain (PEM). With `--tls-key`.
    #[arg(long, env = "EDDY_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The client port's private key (PEM).
    #[arg(long, env = "EDDY_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// The CA that other nodes' client-port certificates chain to (PEM):
    /// a node passes admin calls it cannot serve (membership changes) to
    /// the leader's client port over TLS, verifying it with this CA.
    /// Default: the peer CA (`--peer-tls-ca`).
    #[arg(long, env = "EDDY_TLS_CA", requires = "tls_cert")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Read the cluster secret from this file (a mounted Kubernetes or
    /// Compose secret); surrounding whitespace is ignored.
    #[arg(
        long,
        env = "EDDY_CLUSTER_SECRET_FILE",
        conflicts_with = "cluster_secret"
    )]
    pub(crate) cluster_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) admin_token: AdminToken,
    /// Services to declare at start-up: `NAME` or `NAME:TOKEN`, comma separated.
    #[arg(
        long = "service",
        env = "EDDY_SERVICES",
        hide_env_values = true,
        value_delimiter = ',',
        default_value = "demo"
    )]
    pub(crate) services: Vec<String>,
    /// Limits of declared services.
    #[arg(long, env = "EDDY_MAX_LENGTH", default_value_t = eddy::queue::DEFAULT_MAX_LENGTH)]
    pub(crate) max_length: u64,
    #[arg(long, env = "EDDY_MAX_PAYLOAD_BYTES", default_value_t = eddy::queue::DEFAULT_MAX_PAYLOAD_BYTES)]
    pub(crate) max_payload_bytes: u64,
    #[arg(long, env = "EDDY_EVICT_OLDEST", default_value_t = false)]
    pub(crate) evict_oldest: bool,
    /// Payload bytes each queue of a declared service may hold.
    #[arg(long, env = "EDDY_MAX_BYTES", default_value_t = eddy::queue::DEFAULT_MAX_BYTES)]
    pub(crate) max_bytes: u64,
    /// Dead letters each queue of a declared service keeps (oldest dropped).
    #[arg(long, env = "EDDY_MAX_DEAD_LETTERS", default_value_t = eddy::queue::DEFAULT_MAX_DEAD_LETTERS)]
    pub(crate) max_dead_letters: u64,
    /// This node refuses puts (429) once the items it holds would take more
    /// memory than this. Default: half the cgroup's or the machine's memory.
    #[arg(long, env = "EDDY_MAX_MEMORY_BYTES")]
    pub(crate) max_memory_bytes: Option<u64>,
    #[arg(long, env = "EDDY_MAX_DELIVERY", default_value_t = eddy::queue::DEFAULT_MAX_DELIVERY)]
    pub(crate) max_delivery: u32,
    #[arg(long, env = "EDDY_CONSUMER_GRACE_MS", default_value_t = eddy::queue::DEFAULT_CONSUMER_GRACE_MS)]
    pub(crate) consumer_grace_ms: u64,
    #[arg(long, env = "EDDY_HEARTBEAT_MS", default_value_t = ms(eddy::config::DEFAULT_HEARTBEAT))]
    pub(crate) heartbeat_ms: u64,
    #[arg(long, env = "EDDY_ELECTION_TIMEOUT_MS", default_value_t = ms(eddy::config::DEFAULT_ELECTION_TIMEOUT))]
    pub(crate) election_timeout_ms: u64,
    /// A member silent this long loses its consumers' items to others.
    #[arg(long, env = "EDDY_NODE_LOST_MS", default_value_t = ms(eddy::config::DEFAULT_NODE_LOST))]
    pub(crate) node_lost_ms: u64,
    #[arg(long, env = "EDDY_SNAPSHOT_EVERY", default_value_t = eddy::config::DEFAULT_SNAPSHOT_EVERY)]
    pub(crate) snapshot_every: u64,
    /// Do not form a cluster: wait to be added (`eddy cluster add`).
    #[arg(long, env = "EDDY_JOIN", default_value_t = false)]
    pub(crate) join: bool,
    /// A watcher that answers no ping, or takes no frame, for this long is
    /// dropped; client connections whose peer host is gone are aborted
    /// within about this long (TCP keepalive and user timeout).
    #[arg(long, env = "EDDY_WATCH_IDLE_MS", default_value_t = ms(eddy::config::DEFAULT_WATCH_IDLE))]
    pub(crate) watch_idle_ms: u64,
    /// A watcher still holding an item this long after it was sent is
    /// dropped and its items go to others (0: no limit). The only bound on
    /// a stuck client of the HTTP stream, which cannot be pinged.
    #[arg(long, env = "EDDY_WATCH_MAX_HOLD_MS", default_value_t = ms(eddy::config::DEFAULT_WATCH_MAX_HOLD))]
    pub(crate) watch_max_hold_ms: u64,
    /// When set, `/metrics` and `/admin/cluster` need this token (or the
    /// admin token) in `Authorization`.
    #[arg(
        long,
        env = "EDDY_STATUS_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub(crate) status_token: String,
    /// HTTP connections served at once (more wait in the backlog). Lowered
    /// at start when it does not fit the descriptor limit.
    #[arg(long, env = "EDDY_MAX_CONNECTIONS", default_value_t = eddy::config::DEFAULT_MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,
    /// Connections to the peer gRPC port held at once (more wait in the
    /// backlog). Lowered at start when it does not fit the descriptor limit.
    #[arg(long, env = "EDDY_MAX_PEER_CONNECTIONS", default_value_t = eddy::config::DEFAULT_MAX_PEER_CONNECTIONS)]
    pub(crate) max_peer_connections: usize,
    /// A request's headers must arrive within this; also the idle limit of
    /// a keep-alive connection.
    #[arg(long, env = "EDDY_HTTP_HEADER_TIMEOUT_MS", default_value_t = ms(eddy::config::DEFAULT_HEADER_READ_TIMEOUT))]
    pub(crate) http_header_timeout_ms: u64,
    /// A request's whole body must arrive within this (HTTP 408 after).
    #[arg(long, env = "EDDY_HTTP_BODY_TIMEOUT_MS", default_value_t = ms(eddy::config::DEFAULT_BODY_TIMEOUT))]
    pub(crate) http_body_timeout_ms: u64,
    /// New data is refused (HTTP 507) while less than this many bytes are
    /// free on the data volume; 0 turns the check off.
    #[arg(long, env = "EDDY_MIN_FREE_DISK_BYTES", default_value_t = eddy::config::DEFAULT_MIN_FREE_DISK_BYTES)]
    pub(crate) min_free_disk_bytes: u64,
}

/// A default duration as the milliseconds its flag takes.
const fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

pub(crate) fn parse_peer(s: &str) -> anyhow::Result<Peer> {
    let mut parts = s.split('@');
    let id: u64 = parts
        .next()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("peer {s:?}: id"))?;
    let raft_addr = parts
        .next()
        .with_context(|| format!("peer {s:?}: expected ID@HOST:PORT"))?
        .to_string();
    let api_addr = match parts.next() {
        Some(a) => a.to_string(),
        None => {
            let host = raft_addr
                .rsplit_once(':')
                .map_or(raft_addr.as_str(), |(h, _)| h);
            format!("{host}:8080")
        }
    };
    Ok(Peer {
        id,
        raft_addr,
        api_addr,
    })
}

pub(crate) fn ordinal_from_hostname() -> anyhow::Result<u64> {
    let host = std::env::var("HOSTNAME").context("HOSTNAME is not set")?;
    let ordinal: u64 = host
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .with_context(|| format!("host name {host:?} has no trailing -N ordinal"))?;
    Ok(ordinal + 1)
}

pub(crate) async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let config = node_config(a)?;
    let (id, raft_listen, data_dir) = (config.id, config.raft_listen, config.data_dir.clone());
    let services: Vec<String> = config.services.iter().map(|(n, _)| n.clone()).collect();
    let running = start(config).await?;
    tracing::info!(
        id,
        http = %running.http_addr,
        raft = %raft_listen,
        data = %data_dir.display(),
        ?services,
        "eddy node serving"
    );
    let storage_failed = running.node.health.failed();
    tokio::select! {
        _ = terminated() => {}
        reason = storage_failed => {
            // Fail-stop: nothing on this disk can be trusted any more. Exit
            // at once so that a supervisor restarts the node into recovery.
            tracing::error!(%reason, "storage failed; exiting for recovery");
            std::process::exit(STORAGE_FAILED_EXIT_CODE);
        }
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// The node's configuration from its flags: secrets and certificates read,
/// connection limits fitted to the descriptor limit.
fn node_config(a: ServeArgs) -> anyhow::Result<NodeConfig> {
    let id = if a.id_from_hostname {
        ordinal_from_hostname()?
    } else {
        a.id
    };
    let peers = a
        .peers
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cluster_secret = match &a.cluster_secret_file {
        Some(path) => read_secret_file(path, "the cluster secret")?,
        None => a.cluster_secret.clone(),
    };
    let admin_token = a.admin_token.value()?;
    if admin_token.is_empty() {
        tracing::warn!(
            "no --admin-token: the admin API answers callers on this machine only (loopback)"
        );
    }
    let peer_tls = match (&a.peer_tls_cert, &a.peer_tls_key, &a.peer_tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(eddy::tls::TlsIdentity::load(cert, key, ca)?),
        _ => None,
    };
    if peer_tls.is_none() && peers.len() > 1 {
        tracing::warn!(
            "node-to-node traffic is not encrypted: set --peer-tls-cert/--peer-tls-key/--peer-tls-ca \
             (eddy certs generate makes them)"
        );
    }
    let (max_connections, max_peer_connections) =
        connection_limits(a.max_connections, a.max_peer_connections);
    let advertise_raft = match (&a.advertise_raft, peers.iter().find(|p| p.id == id)) {
        (Some(adv), _) => adv.clone(),
        (None, Some(p)) => p.raft_addr.clone(),
        (None, None) => format!("127.0.0.1:{}", a.raft_listen.port()),
    };
    let services = declared_services(&a);
    Ok(NodeConfig {
        id,
        data_dir: a
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("data/eddy-{id}"))),
        http_listen: a.listen,
        raft_listen: a.raft_listen,
        advertise_http: a.advertise_http.clone().filter(|s| !s.is_empty()),
        advertise_raft,
        peers,
        join: a.join,
        cluster_secret,
        peer_tls,
        admin_token,
        status_token: a.status_token.clone(),
        client_tls: client_port_tls(&a)?,
        timings: Timings {
            heartbeat: Duration::from_millis(a.heartbeat_ms),
            election_timeout: Duration::from_millis(a.election_timeout_ms),
            node_lost: Duration::from_millis(a.node_lost_ms),
        },
        snapshot_every: a.snapshot_every,
        min_free_disk_bytes: a.min_free_disk_bytes,
        listener: eddy::api::ListenerLimits {
            max_connections,
            header_read_timeout: Duration::from_millis(a.http_header_timeout_ms),
            body_timeout: Duration::from_millis(a.http_body_timeout_ms),
            // Follows --watch-idle-ms (set by the server).
            dead_peer_timeout: None,
        },
        peer_listener: eddy::raft::PeerListenerLimits {
            max_connections: max_peer_connections,
            ..Default::default()
        },
        watch_idle: Duration::from_millis(a.watch_idle_ms),
        watch_max_hold: (a.watch_max_hold_ms > 0)
            .then(|| Duration::from_millis(a.watch_max_hold_ms)),
        max_memory_bytes: a
            .max_memory_bytes
            .unwrap_or_else(eddy::server::default_max_memory_bytes),
        default_service: services.first().map(|(n, _)| n.clone()),
        services,
    })
}

/// The HTTP and peer connection limits, lowered (with a warning) when they
/// do not fit this process's descriptor limit.
fn connection_limits(http: usize, peer: usize) -> (usize, usize) {
    let Some(descriptors) = eddy::server::raise_descriptor_limit() else {
        return (http, peer);
    };
    let fitted = eddy::server::fit_connection_limits(descriptors, http, peer);
    if fitted != (http, peer) {
        tracing::warn!(
            descriptors,
            max_connections = fitted.0,
            max_peer_connections = fitted.1,
            requested_max_connections = http,
            requested_max_peer_connections = peer,
            "connection limits lowered to fit the descriptor limit (with {} kept for storage); \
             raise the hard limit (ulimit -Hn, LimitNOFILE) to serve more",
            eddy::server::DESCRIPTOR_RESERVE
        );
    } else {
        tracing::info!(descriptors, "open-descriptor limit");
    }
    fitted
}

/// TLS of the client port, with the CA that other nodes' client ports are
/// verified with (default: the peer CA).
fn client_port_tls(a: &ServeArgs) -> anyhow::Result<Option<eddy::tls::ClientPortTls>> {
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Ok(None);
    };
    let tls = eddy::tls::ClientPortTls::load(cert, key)?;
    match a.tls_ca.as_ref().or(a.peer_tls_ca.as_ref()) {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the TLS CA {}", ca.display()))?;
            Ok(Some(tls.with_ca(&pem)?))
        }
        None => Ok(Some(tls)),
    }
}

/// The services declared by `--service NAME[:TOKEN]`, each with the limits
/// given by the other flags.
fn declared_services(a: &ServeArgs) -> Vec<(String, ServiceConfig)> {
    let limits = QueueLimits {
        max_length: a.max_length,
        max_payload_bytes: a.max_payload_bytes,
        evict_oldest: a.evict_oldest,
        max_bytes: a.max_bytes,
        max_dead_letters: a.max_dead_letters,
    };
    a.services
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (name, token) = s.split_once(':').unwrap_or((s, ""));
            let config = ServiceConfig {
                token: token.to_string(),
                input: limits.clone(),
                sink: limits.clone(),
                max_delivery: a.max_delivery,
                consumer_grace_ms: a.consumer_grace_ms,
            };
            (name.to_string(), config)
        })
        .collect()
}

/// Exit status of a node that stopped after a storage error.
pub(crate) const STORAGE_FAILED_EXIT_CODE: i32 = 3;
