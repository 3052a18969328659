//! The `eddy` binary: a node (`serve`), and a command-line client for the
//! queue protocol, services and the cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use eddy::client::QueueClient;
use eddy::queue::{QueueLimits, ServiceConfig};
use eddy::raft::Peer;
use eddy::server::{ServeSettings, start};

/// jemalloc returns freed memory to the system within seconds (background
/// purging of dirty pages); glibc's malloc kept a node's RSS at its peak long
/// after the items were gone (see the memory soak test).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "eddy",
    version,
    about = "A replicated queue service for asynchronous ML inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Put one item on a queue; prints the index and request id.
    Put(PutArgs),
    /// Read items from a queue.
    Get(GetArgs),
    /// Commit items by index.
    Commit(CommitArgs),
    /// Show a queue's attributes.
    Attrs(QueueArgs),
    /// Watch a queue and print the frames.
    Watch(WatchArgs),
    /// Create, list, show or delete services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Cluster status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Measure put throughput and latency against a running node.
    Bench(BenchArgs),
    /// Run the asynchronous inference engine beside a model server.
    Engine(EngineArgs),
    /// Run a small demo model server (for trying Eddy out and for tests).
    DemoModel(DemoModelArgs),
    /// Inspect a stopped node's storage.
    #[command(subcommand)]
    Wal(WalCmd),
    /// Make TLS certificates and a cluster secret.
    #[command(subcommand)]
    Certs(CertsCmd),
}

#[derive(Subcommand)]
enum WalCmd {
    /// Scan the raft log of a data dir (or its raft dir): exit 0 if clean or
    /// torn at the end (cut on start), 1 if corrupt.
    Check { dir: PathBuf },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a new CA, a certificate and key per node (valid for the node
    /// name, localhost and 127.0.0.1), a random `cluster-secret` and a
    /// random `admin-token`. The CA key goes to a separate directory: no
    /// node needs it.
    Generate {
        /// Directory to write into: what nodes mount (each node only its
        /// own certificate and key).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Where the CA key goes (default: `private/` inside --out, which
        /// `kubectl create secret --from-file=DIR/` skips). Keep it off the
        /// nodes.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        /// Node names (host names peers use), comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// More names every node certificate is valid for (DNS names,
        /// wildcards such as `*.eddy.default.svc.cluster.local`, or IPs).
        #[arg(long = "name", value_delimiter = ',')]
        names: Vec<String>,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct EngineArgs {
    /// Eddy nodes, comma separated; the engine moves on when one fails.
    #[arg(
        long,
        short = 'e',
        env = "EDDY_ENDPOINT",
        value_delimiter = ',',
        default_value = "127.0.0.1:8080"
    )]
    endpoint: Vec<String>,
    /// Service whose input queue the engine serves.
    #[arg(long, env = "EDDY_ENGINE_SERVICE", default_value = "demo")]
    service: String,
    #[arg(
        long,
        short = 't',
        env = "EDDY_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    token: String,
    /// The model server's base URL.
    #[arg(
        long,
        env = "EDDY_ENGINE_MODEL",
        default_value = "http://127.0.0.1:8000"
    )]
    model: String,
    /// Items processed at once (the watch window).
    #[arg(long, env = "EDDY_ENGINE_CONCURRENCY", default_value_t = 4)]
    concurrency: u32,
    /// Consumer group of the engines of this service (default: `engine`).
    #[arg(long, env = "EDDY_ENGINE_GROUP", default_value = "engine")]
    group: String,
    /// This engine's consumer id (default: a random id).
    #[arg(long, env = "EDDY_ENGINE_INSTANCE")]
    instance: Option<String>,
    /// Per-request model timeout in milliseconds.
    #[arg(long, env = "EDDY_ENGINE_TIMEOUT_MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Serve synchronous `POST /api/predict/{service}` here (optional).
    #[arg(long, env = "EDDY_ENGINE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Largest body of a synchronous request (HTTP 413 beyond).
    #[arg(long, env = "EDDY_ENGINE_SYNC_MAX_BODY_BYTES", default_value_t = eddy::api::DEFAULT_SYNC_MAX_BODY_BYTES)]
    sync_max_body_bytes: u64,
    /// How long shutdown waits for items in progress, in milliseconds.
    #[arg(long, env = "EDDY_ENGINE_DRAIN_MS", default_value_t = 30_000)]
    drain_ms: u64,
    /// Limit on each request to Eddy and on silence of the watch, in
    /// milliseconds (connecting gets at most 5 s of it); a node that takes
    /// longer counts as failed and the engine moves to the next endpoint.
    #[arg(long, env = "EDDY_ENGINE_EDDY_TIMEOUT_MS", default_value_t = 10_000)]
    eddy_timeout_ms: u64,
}

#[derive(Args)]
struct DemoModelArgs {
    #[arg(long, env = "EDDY_DEMO_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Delay per request, emulating long inference.
    #[arg(long, env = "EDDY_DEMO_DELAY_MS", default_value_t = 0)]
    delay_ms: u64,
    /// Every Nth request fails (0: never).
    #[arg(long, env = "EDDY_DEMO_FAIL_EVERY", default_value_t = 0)]
    fail_every: u64,
    #[arg(long, env = "EDDY_DEMO_FAIL_STATUS", default_value_t = 500)]
    fail_status: u16,
    /// Answer with empty bodies (results delivered elsewhere).
    #[arg(long, env = "EDDY_DEMO_EMPTY", default_value_t = false)]
    empty: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    q: QueueArgs,
    /// Concurrent producers, each with one put in flight.
    #[arg(long, short = 'p', default_value_t = 4)]
    producers: usize,
    /// Total puts.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    count: usize,
    /// Payload bytes.
    #[arg(long, short = 's', default_value_t = 256)]
    size: usize,
    /// Truncate the queue afterwards.
    #[arg(long, default_value_t = true)]
    cleanup: bool,
    /// Leave the items on the queue (overrides --cleanup).
    #[arg(long)]
    keep: bool,
    /// Measure the asynchronous path instead: put → engine → model → sink,
    /// from the put until the result arrives on the sink (an engine must be
    /// running). With --model, also time direct calls to the model.
    #[arg(long)]
    e2e: bool,
    #[arg(long)]
    model: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// Node id (unique in the cluster, > 0).
    #[arg(long, env = "EDDY_NODE_ID", default_value_t = 1)]
    id: u64,
    /// Take the node id from the trailing ordinal of the host name (a
    /// StatefulSet's `eddy-0` is node 1).
    #[arg(long, env = "EDDY_ID_FROM_HOSTNAME", default_value_t = false)]
    id_from_hostname: bool,
    /// Where the Raft log and snapshots live.
    #[arg(long, env = "EDDY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP (EAS protocol, admin, metrics) listen address. This machine
    /// only by default: the quick start's demo service has no token (the
    /// container image listens on every interface).
    #[arg(long, env = "EDDY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Node-to-node gRPC listen address (this machine only by default).
    #[arg(long, env = "EDDY_RAFT_LISTEN", default_value = "127.0.0.1:9090")]
    raft_listen: SocketAddr,
    /// How peers reach this node's gRPC port (host:port).
    #[arg(long, env = "EDDY_ADVERTISE_RAFT")]
    advertise_raft: Option<String>,
    /// How clients reach this node's HTTP port (host:port).
    #[arg(long, env = "EDDY_ADVERTISE_HTTP")]
    advertise_http: Option<String>,
    /// Initial members: `ID@HOST:RAFT_PORT[@HOST:HTTP_PORT]`, comma separated
    /// (this node included). Empty: a single-node cluster.
    #[arg(long, env = "EDDY_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Shared secret that authenticates node-to-node calls. Required when
    /// the cluster has more than one member; there is no default.
    #[arg(
        long,
        env = "EDDY_CLUSTER_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    cluster_secret: String,
    /// Mutual TLS between nodes: this node's certificate (PEM). With
    /// `--peer-tls-key` and `--peer-tls-ca`; `eddy certs generate` makes them.
    #[arg(long, env = "EDDY_PEER_TLS_CERT", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    peer_tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "EDDY_PEER_TLS_KEY", requires = "peer_tls_cert")]
    peer_tls_key: Option<PathBuf>,
    /// The CA every peer's certificate must chain to (PEM).
    #[arg(long, env = "EDDY_PEER_TLS_CA", requires = "peer_tls_cert")]
    peer_tls_ca: Option<PathBuf>,
    /// Serve the client port (HTTP, WebSocket) over TLS with this
    /// certificate chain (PEM). With `--tls-key`.
    #[arg(long, env = "EDDY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client port's private key (PEM).
    #[arg(long, env = "EDDY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that other nodes' client-port certificates chain to (PEM):
    /// a node passes admin calls it cannot serve (membership changes) to
    /// the leader's client port over TLS, verifying it with this CA.
    /// Default: the peer CA (`--peer-tls-ca`).
    #[arg(long, env = "EDDY_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Read the cluster secret from this file (a mounted Kubernetes or
    /// Compose secret); surrounding whitespace is ignored.
    #[arg(
        long,
        env = "EDDY_CLUSTER_SECRET_FILE",
        conflicts_with = "cluster_secret"
    )]
    cluster_secret_file: Option<PathBuf>,
    /// Token for the admin routes. Required on a member of a cluster of
    /// more than one node (the same on every node). A single node without
    /// one answers admin calls from this machine only (loopback).
    #[arg(
        long,
        env = "EDDY_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    admin_token: String,
    /// Read the admin token from this file (a mounted Kubernetes or Compose
    /// secret); surrounding whitespace is ignored.
    #[arg(long, env = "EDDY_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    admin_token_file: Option<PathBuf>,
    /// Services to declare at start-up: `NAME` or `NAME:TOKEN`, comma separated.
    #[arg(
        long = "service",
        env = "EDDY_SERVICES",
        hide_env_values = true,
        value_delimiter = ',',
        default_value = "demo"
    )]
    services: Vec<String>,
    /// Limits of declared services.
    #[arg(long, env = "EDDY_MAX_LENGTH", default_value_t = 100_000)]
    max_length: u64,
    #[arg(long, env = "EDDY_MAX_PAYLOAD_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_payload_bytes: u64,
    #[arg(long, env = "EDDY_EVICT_OLDEST", default_value_t = false)]
    evict_oldest: bool,
    /// Payload bytes each queue of a declared service may hold.
    #[arg(long, env = "EDDY_MAX_BYTES", default_value_t = eddy::queue::DEFAULT_MAX_BYTES)]
    max_bytes: u64,
    /// Dead letters each queue of a declared service keeps (oldest dropped).
    #[arg(long, env = "EDDY_MAX_DEAD_LETTERS", default_value_t = eddy::queue::DEFAULT_MAX_DEAD_LETTERS)]
    max_dead_letters: u64,
    /// This node refuses puts (429) once the items it holds would take more
    /// memory than this. Default: half the cgroup's or the machine's memory.
    #[arg(long, env = "EDDY_MAX_MEMORY_BYTES")]
    max_memory_bytes: Option<u64>,
    #[arg(long, env = "EDDY_MAX_DELIVERY", default_value_t = 5)]
    max_delivery: u32,
    #[arg(long, env = "EDDY_CONSUMER_GRACE_MS", default_value_t = 2_000)]
    consumer_grace_ms: u64,
    #[arg(long, env = "EDDY_HEARTBEAT_MS", default_value_t = eddy::server::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    #[arg(long, env = "EDDY_ELECTION_TIMEOUT_MS", default_value_t = eddy::server::DEFAULT_ELECTION_TIMEOUT_MS)]
    election_timeout_ms: u64,
    /// A member silent this long loses its consumers' items to others.
    #[arg(long, env = "EDDY_NODE_LOST_MS", default_value_t = eddy::server::DEFAULT_NODE_LOST_MS)]
    node_lost_ms: u64,
    #[arg(long, env = "EDDY_SNAPSHOT_EVERY", default_value_t = 20_000)]
    snapshot_every: u64,
    /// Do not form a cluster: wait to be added (`eddy cluster add`).
    #[arg(long, env = "EDDY_JOIN", default_value_t = false)]
    join: bool,
    /// A watcher that answers no ping, or takes no frame, for this long is
    /// dropped; client connections whose peer host is gone are aborted
    /// within about this long (TCP keepalive and user timeout).
    #[arg(long, env = "EDDY_WATCH_IDLE_MS", default_value_t = 10_000)]
    watch_idle_ms: u64,
    /// A watcher still holding an item this long after it was sent is
    /// dropped and its items go to others (0: no limit). The only bound on
    /// a stuck client of the HTTP stream, which cannot be pinged.
    #[arg(long, env = "EDDY_WATCH_MAX_HOLD_MS", default_value_t = 1_800_000)]
    watch_max_hold_ms: u64,
    /// When set, `/metrics` and `/admin/cluster` need this token (or the
    /// admin token) in `Authorization`.
    #[arg(
        long,
        env = "EDDY_STATUS_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    status_token: String,
    /// HTTP connections served at once (more wait in the backlog). Lowered
    /// at start when it does not fit the descriptor limit.
    #[arg(long, env = "EDDY_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Connections to the peer gRPC port held at once (more wait in the
    /// backlog). Lowered at start when it does not fit the descriptor limit.
    #[arg(long, env = "EDDY_MAX_PEER_CONNECTIONS", default_value_t = 512)]
    max_peer_connections: usize,
    /// A request's headers must arrive within this; also the idle limit of
    /// a keep-alive connection.
    #[arg(long, env = "EDDY_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    http_header_timeout_ms: u64,
    /// A request's whole body must arrive within this (HTTP 408 after).
    #[arg(long, env = "EDDY_HTTP_BODY_TIMEOUT_MS", default_value_t = 60_000)]
    http_body_timeout_ms: u64,
    /// New data is refused (HTTP 507) while less than this many bytes are
    /// free on the data volume; 0 turns the check off.
    #[arg(long, env = "EDDY_MIN_FREE_DISK_BYTES", default_value_t = 256 * 1024 * 1024)]
    min_free_disk_bytes: u64,
}

#[derive(Args, Clone)]
struct Endpoint {
    /// Node address (any node of the cluster).
    #[arg(
        long,
        short = 'e',
        env = "EDDY_ENDPOINT",
        default_value = "127.0.0.1:8080"
    )]
    endpoint: String,
    /// Service token.
    #[arg(
        long,
        short = 't',
        env = "EDDY_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    token: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct QueueArgs {
    #[command(flatten)]
    ep: Endpoint,
    /// Queue: `SERVICE` (input) or `SERVICE/sink`.
    queue: String,
}

#[derive(Args)]
struct PutArgs {
    #[command(flatten)]
    q: QueueArgs,
    /// Payload (`-` reads standard input).
    data: String,
    /// Tags as `key=value`.
    #[arg(long = "tag")]
    tags: Vec<String>,
    #[arg(long, default_value_t = 0)]
    priority: u32,
}

#[derive(Args)]
struct GetArgs {
    #[command(flatten)]
    q: QueueArgs,
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    index: i64,
    #[arg(long, default_value_t = 1)]
    length: u32,
    #[arg(long, default_value = "0s")]
    timeout: String,
    /// Delete what is read.
    #[arg(long)]
    delete: bool,
    #[arg(long)]
    request_id: Option<String>,
}

#[derive(Args)]
struct CommitArgs {
    #[command(flatten)]
    q: QueueArgs,
    indexes: Vec<u64>,
    /// Consumer group.
    #[arg(long, default_value = "eas")]
    group: String,
}

#[derive(Args)]
struct WatchArgs {
    #[command(flatten)]
    q: QueueArgs,
    #[arg(long, default_value_t = 1)]
    window: u32,
    /// Commit each frame after printing it.
    #[arg(long)]
    commit: bool,
    #[arg(long)]
    auto_commit: bool,
    /// Stop after this many frames.
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, default_value = "eas")]
    group: String,
}

#[derive(Subcommand)]
enum ServiceCmd {
    Create(ServiceCreate),
    List(AdminArgs),
    Show(ServiceName),
    Delete(ServiceName),
}

#[derive(Args)]
struct AdminArgs {
    #[arg(
        long,
        short = 'e',
        env = "EDDY_ENDPOINT",
        default_value = "127.0.0.1:8080"
    )]
    endpoint: String,
    #[arg(
        long,
        env = "EDDY_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    admin_token: String,
    /// Read the admin token from this file.
    #[arg(long, env = "EDDY_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    admin_token_file: Option<PathBuf>,
}

#[derive(Args)]
struct ServiceName {
    #[command(flatten)]
    admin: AdminArgs,
    name: String,
}

#[derive(Args)]
struct ServiceCreate {
    #[command(flatten)]
    admin: AdminArgs,
    name: String,
    #[arg(long, default_value = "")]
    token: String,
    #[arg(long)]
    max_length: Option<u64>,
    #[arg(long)]
    max_payload_bytes: Option<u64>,
    #[arg(long)]
    evict_oldest: bool,
    #[arg(long)]
    sink_max_length: Option<u64>,
    #[arg(long)]
    max_bytes: Option<u64>,
    #[arg(long)]
    max_dead_letters: Option<u64>,
    #[arg(long)]
    max_delivery: Option<u32>,
    #[arg(long)]
    consumer_grace_ms: Option<u64>,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term, commit and apply indexes.
    Status(AdminArgs),
    /// Add a node (started with --join): learner catch-up, then voter.
    Add(MemberAdd),
    /// Remove a node from the voters.
    Remove(MemberRemove),
}

#[derive(Args)]
struct MemberAdd {
    #[command(flatten)]
    admin: AdminArgs,
    id: u64,
    /// The new node's gRPC address (host:port).
    raft_addr: String,
    /// The new node's HTTP address (host:port).
    #[arg(default_value = "")]
    api_addr: String,
}

#[derive(Args)]
struct MemberRemove {
    #[command(flatten)]
    admin: AdminArgs,
    id: u64,
}

fn http_base(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.trim_end_matches('/').to_string()
    } else {
        format!("http://{endpoint}")
    }
}

fn parse_peer(s: &str) -> anyhow::Result<Peer> {
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

/// A secret from a mounted file, without surrounding whitespace; an empty
/// file is an error rather than a silently missing secret.
fn read_secret_file(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let value = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} from {}", path.display()))?
        .trim()
        .to_string();
    if value.is_empty() {
        bail!("{} is empty: expected {what}", path.display());
    }
    Ok(value)
}

fn ordinal_from_hostname() -> anyhow::Result<u64> {
    let host = std::env::var("HOSTNAME").context("HOSTNAME is not set")?;
    let ordinal: u64 = host
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .with_context(|| format!("host name {host:?} has no trailing -N ordinal"))?;
    Ok(ordinal + 1)
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let id = if a.id_from_hostname {
        ordinal_from_hostname()?
    } else {
        a.id
    };
    if id == 0 {
        bail!("node id must be greater than 0");
    }
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
    let admin_token = match &a.admin_token_file {
        Some(path) => read_secret_file(path, "the admin token")?,
        None => a.admin_token.clone(),
    };
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
    let (max_connections, max_peer_connections) = match eddy::server::raise_descriptor_limit() {
        Some(descriptors) => {
            let fitted = eddy::server::fit_connection_limits(
                descriptors,
                a.max_connections,
                a.max_peer_connections,
            );
            if fitted != (a.max_connections, a.max_peer_connections) {
                tracing::warn!(
                    descriptors,
                    max_connections = fitted.0,
                    max_peer_connections = fitted.1,
                    requested_max_connections = a.max_connections,
                    requested_max_peer_connections = a.max_peer_connections,
                    "connection limits lowered to fit the descriptor limit (with {} kept for storage); \
                     raise the hard limit (ulimit -Hn, LimitNOFILE) to serve more",
                    eddy::server::DESCRIPTOR_RESERVE
                );
            } else {
                tracing::info!(descriptors, "open-descriptor limit");
            }
            fitted
        }
        None => (a.max_connections, a.max_peer_connections),
    };
    let client_tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = eddy::tls::ClientPortTls::load(cert, key)?;
            match a.tls_ca.as_ref().or(a.peer_tls_ca.as_ref()) {
                Some(ca) => {
                    let pem = std::fs::read(ca)
                        .with_context(|| format!("reading the TLS CA {}", ca.display()))?;
                    Some(tls.with_ca(&pem)?)
                }
                None => Some(tls),
            }
        }
        _ => None,
    };
    let advertise_raft = match (&a.advertise_raft, peers.iter().find(|p| p.id == id)) {
        (Some(adv), _) => adv.clone(),
        (None, Some(p)) => p.raft_addr.clone(),
        (None, None) => format!("127.0.0.1:{}", a.raft_listen.port()),
    };
    let config = ServiceConfig {
        token: String::new(),
        input: QueueLimits {
            max_length: a.max_length,
            max_payload_bytes: a.max_payload_bytes,
            evict_oldest: a.evict_oldest,
            max_bytes: a.max_bytes,
            max_dead_letters: a.max_dead_letters,
        },
        sink: QueueLimits {
            max_length: a.max_length,
            max_payload_bytes: a.max_payload_bytes,
            evict_oldest: a.evict_oldest,
            max_bytes: a.max_bytes,
            max_dead_letters: a.max_dead_letters,
        },
        max_delivery: a.max_delivery,
        consumer_grace_ms: a.consumer_grace_ms,
    };
    let services: Vec<(String, ServiceConfig)> = a
        .services
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (name, token) = s.split_once(':').unwrap_or((s, ""));
            (
                name.to_string(),
                ServiceConfig {
                    token: token.to_string(),
                    ..config.clone()
                },
            )
        })
        .collect();
    let settings = ServeSettings {
        id,
        data_dir: a
            .data_dir
            .unwrap_or_else(|| PathBuf::from(format!("data/eddy-{id}"))),
        http_listen: a.listen,
        raft_listen: a.raft_listen,
        advertise_http: a.advertise_http.clone().unwrap_or_default(),
        advertise_raft,
        peers,
        cluster_secret,
        peer_tls,
        admin_token,
        status_token: a.status_token,
        heartbeat_ms: a.heartbeat_ms,
        election_timeout_ms: a.election_timeout_ms,
        node_lost_ms: a.node_lost_ms,
        snapshot_every: a.snapshot_every,
        join: a.join,
        min_free_disk_bytes: a.min_free_disk_bytes,
        client_tls,
        listener: eddy::api::ListenerLimits {
            max_connections,
            header_read_timeout: std::time::Duration::from_millis(a.http_header_timeout_ms),
            body_timeout: std::time::Duration::from_millis(a.http_body_timeout_ms),
            // Follows --watch-idle-ms (set by the server).
            dead_peer_timeout: None,
        },
        peer_listener: eddy::raft::PeerListenerLimits {
            max_connections: max_peer_connections,
            ..Default::default()
        },
        watch_idle_ms: a.watch_idle_ms,
        watch_max_hold_ms: a.watch_max_hold_ms,
        max_memory_bytes: a
            .max_memory_bytes
            .unwrap_or_else(eddy::server::default_max_memory_bytes),
        default_service: services.first().map(|(n, _)| n.clone()),
        services,
    };
    let running = start(settings.clone()).await?;
    tracing::info!(
        id,
        http = %running.http_addr,
        raft = %settings.raft_listen,
        data = %settings.data_dir.display(),
        services = ?settings.services.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        "eddy node serving"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let storage_failed = running.node.health.failed();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
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

/// Exit status of a node that stopped after a storage error.
const STORAGE_FAILED_EXIT_CODE: i32 = 3;

fn client(q: &QueueArgs) -> QueueClient {
    QueueClient::new(&q.ep.endpoint, &q.queue, &q.ep.token)
}

fn parse_tags(tags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    tags.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("tag {t:?}: expected key=value"))
        })
        .collect()
}

fn print_frame(f: &eddy::proto::DataFrameProto, json: bool) {
    let tags: BTreeMap<_, _> = f.tags.iter().collect();
    if json {
        use base64::Engine as _;
        println!(
            "{}",
            serde_json::json!({"index": f.index, "tags": tags, "data": base64::engine::general_purpose::STANDARD.encode(&f.data)})
        );
    } else {
        println!(
            "{}\t{:?}\t{}",
            f.index,
            tags,
            String::from_utf8_lossy(&f.data)
        );
    }
}

async fn admin_request(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let token = match &admin.admin_token_file {
        Some(path) => read_secret_file(path, "the admin token")?,
        None => admin.admin_token.clone(),
    };
    let http = reqwest::Client::new();
    let mut rb = http
        .request(method, format!("{}{path}", http_base(&admin.endpoint)))
        .header("Authorization", token);
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = rb.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{status}: {}", text.trim());
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.trim().to_string())))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn engine(a: EngineArgs) -> anyhow::Result<()> {
    let settings = eddy::engine::EngineSettings {
        endpoints: a.endpoint,
        service: a.service.clone(),
        token: a.token,
        model: a.model,
        concurrency: a.concurrency.max(1),
        group: a.group,
        instance: a
            .instance
            .unwrap_or_else(|| format!("engine-{}", uuid::Uuid::new_v4())),
        request_timeout: std::time::Duration::from_millis(a.timeout_ms),
        drain_timeout: std::time::Duration::from_millis(a.drain_ms),
        eddy_timeouts: {
            let limit = std::time::Duration::from_millis(a.eddy_timeout_ms.max(300));
            eddy::client::Timeouts {
                connect: limit.min(std::time::Duration::from_secs(5)),
                request: limit,
                idle: limit,
            }
        },
    };
    tracing::info!(service = %settings.service, instance = %settings.instance, concurrency = settings.concurrency, "engine starting");
    let engine = eddy::engine::Engine::new(settings)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(listen) = a.listen {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let app = eddy::api::sync_router(engine.clone(), a.service, a.sync_max_body_bytes);
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = eddy::api::serve(listener, app, stop).await {
                tracing::error!(error = %e, "engine HTTP server stopped");
            }
        });
    }
    engine.clone().run(terminated()).await;
    let _ = stop_tx.send(true);
    let s = &engine.stats;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        completed = s.completed.load(Relaxed),
        duplicates = s.duplicates.load(Relaxed),
        failed_calls = s.failed_calls.load(Relaxed),
        handed_back = s.handed_back.load(Relaxed),
        not_written = s.not_written.load(Relaxed),
        "engine stopped"
    );
    Ok(())
}

fn percentiles(mut lat: Vec<u64>) -> (f64, f64, f64) {
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    (pct(0.5), pct(0.99), pct(1.0))
}

/// Put → engine → model → sink, timed per request id.
async fn bench_e2e(a: BenchArgs) -> anyhow::Result<()> {
    let input = client(&a.q);
    let sink = QueueClient::new(
        &a.q.ep.endpoint,
        &format!("{}/sink", a.q.queue),
        &a.q.ep.token,
    );
    let body = Bytes::from(format!(
        "[{{\"x\": \"{}\"}}]",
        "y".repeat(a.size.saturating_sub(12))
    ));
    let started = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        std::time::Instant,
    >::new()));
    let (done_tx, mut done_rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, std::time::Instant)>();
    let watcher = {
        let sink = sink.clone();
        tokio::spawn(async move {
            sink.watch(256, true, |f| {
                let tx = done_tx.clone();
                async move {
                    let rid = f.tags.get("requestId").cloned().unwrap_or_default();
                    tx.send((rid, std::time::Instant::now())).is_ok()
                }
            })
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let start = std::time::Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut producers = Vec::new();
    for _ in 0..a.producers {
        let (c, body, next, started, total) = (
            input.clone(),
            body.clone(),
            next.clone(),
            started.clone(),
            a.count,
        );
        producers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let t = std::time::Instant::now();
                let (_, rid) = c.put(body.clone(), &BTreeMap::new(), 0).await?;
                started.lock().unwrap().insert(rid, t);
            }
            anyhow::Ok(())
        }));
    }
    let mut lat = Vec::new();
    let mut pending = Vec::new();
    while lat.len() < a.count {
        let (rid, at) = tokio::time::timeout(std::time::Duration::from_secs(60), done_rx.recv())
            .await
            .context("no result for 60 s: is an engine running?")?
            .context("sink watch ended")?;
        pending.push((rid, at));
        pending.retain(|(rid, at)| match started.lock().unwrap().get(rid) {
            Some(t) => {
                lat.push(at.duration_since(*t).as_micros() as u64);
                false
            }
            None => true,
        });
    }
    let wall = start.elapsed().as_secs_f64();
    for p in producers {
        p.await??;
    }
    watcher.abort();
    let n = lat.len();
    let (p50, p99, max) = percentiles(lat);
    println!(
        "{n} requests through put → engine → model → sink by {} producers in {wall:.2} s: {:.0} requests/s, latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        a.producers,
        n as f64 / wall
    );
    if let Some(model) = &a.model {
        let m = eddy::engine::ModelClient::new(model, std::time::Duration::from_secs(10));
        let mut direct = Vec::new();
        for _ in 0..2000 {
            let t = std::time::Instant::now();
            m.call("", body.clone()).await?;
            direct.push(t.elapsed().as_micros() as u64);
        }
        let (d50, d99, _) = percentiles(direct);
        println!(
            "direct model calls (sequential): p50 {d50:.2} ms, p99 {d99:.2} ms; the queue adds p50 {:.2} ms",
            p50 - d50
        );
    }
    Ok(())
}

async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.e2e {
        return bench_e2e(a).await;
    }
    let c = client(&a.q);
    let payload = Bytes::from(vec![b'x'; a.size]);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tags = BTreeMap::new();
    // Warm up connections and the leader's caches.
    for _ in 0..100 {
        c.put(payload.clone(), &tags, 0).await?;
    }
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.producers {
        let (c, payload, next, tags, total) = (
            c.clone(),
            payload.clone(),
            next.clone(),
            tags.clone(),
            a.count,
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let t = std::time::Instant::now();
                c.put(payload.clone(), &tags, 0).await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let wall = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    let result = serde_json::json!({
        "producers": a.producers, "puts": lat.len(), "payload_bytes": a.size,
        "wall_s": (wall * 1000.0).round() / 1000.0,
        "puts_per_s": (lat.len() as f64 / wall).round(),
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
    });
    if a.q.ep.json {
        println!("{result}");
    } else {
        println!(
            "{} puts of {} B by {} producers in {:.2} s: {:.0} puts/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            a.size,
            a.producers,
            wall,
            lat.len() as f64 / wall,
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    if a.cleanup
        && !a.keep
        && let Some(last) = c
            .attributes()
            .await?
            .get("stream.lastEntry")
            .and_then(|v| v.parse::<u64>().ok())
    {
        let http = reqwest::Client::new();
        http.delete(format!("{}?_index_={}&_trunc_=true", c.url, last + 1))
            .header("Authorization", &c.token)
            .send()
            .await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG")
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(a) => serve(*a).await?,
        Cmd::Certs(CertsCmd::Generate {
            out,
            ca_key_dir,
            nodes,
            names,
            force,
        }) => {
            let generated =
                eddy::tls::generate(&out, ca_key_dir.as_deref(), &nodes, &names, true, force)?;
            for f in generated.files {
                println!("{}", f.display());
            }
        }
        Cmd::Put(a) => {
            let data = if a.data == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                Bytes::from(buf)
            } else {
                Bytes::from(a.data.clone())
            };
            let (index, rid) = client(&a.q)
                .put(data, &parse_tags(&a.tags)?, a.priority)
                .await?;
            if a.q.ep.json {
                println!("{}", serde_json::json!({"index": index, "request_id": rid}));
            } else {
                println!("index {index}\nrequest id {rid}");
            }
        }
        Cmd::Get(a) => {
            let mut tags = BTreeMap::new();
            if let Some(r) = &a.request_id {
                tags.insert("requestId".to_string(), r.clone());
            }
            let frames = client(&a.q)
                .get(a.index, a.length, &a.timeout, a.delete, &tags)
                .await?;
            if frames.is_empty() && !a.q.ep.json {
                eprintln!("(nothing)");
            }
            for f in &frames {
                print_frame(f, a.q.ep.json);
            }
        }
        Cmd::Commit(a) => {
            let mut c = client(&a.q);
            c.group = a.group;
            c.commit(&a.indexes).await?;
            println!("OK");
        }
        Cmd::Attrs(a) => {
            let attrs = client(&a).attributes().await?;
            if a.ep.json {
                println!("{}", serde_json::to_string_pretty(&attrs)?);
            } else {
                for (k, v) in attrs {
                    println!("{k:32} {v}");
                }
            }
        }
        Cmd::Watch(a) => {
            let mut c = client(&a.q);
            c.group = a.group.clone();
            let committer = c.clone();
            let json = a.q.ep.json;
            let mut seen = 0u64;
            let limit = a.count;
            let commit = a.commit;
            c.watch(a.window, a.auto_commit, |f| {
                let committer = committer.clone();
                seen += 1;
                let more = limit.is_none_or(|l| seen < l);
                async move {
                    print_frame(&f, json);
                    if commit && let Err(e) = committer.commit(&[f.index]).await {
                        eprintln!("commit {}: {e}", f.index);
                    }
                    more
                }
            })
            .await?;
        }
        Cmd::Service(cmd) => {
            let out = match cmd {
                ServiceCmd::Create(s) => {
                    let body = serde_json::json!({
                        "name": s.name, "token": s.token, "max_length": s.max_length,
                        "max_payload_bytes": s.max_payload_bytes, "evict_oldest": s.evict_oldest,
                        "sink_max_length": s.sink_max_length, "max_delivery": s.max_delivery,
                        "consumer_grace_ms": s.consumer_grace_ms, "max_bytes": s.max_bytes,
                        "max_dead_letters": s.max_dead_letters,
                    });
                    admin_request(
                        &s.admin,
                        reqwest::Method::POST,
                        "/admin/services",
                        Some(body),
                    )
                    .await?
                }
                ServiceCmd::List(a) => {
                    admin_request(&a, reqwest::Method::GET, "/admin/services", None).await?
                }
                ServiceCmd::Show(s) => {
                    admin_request(
                        &s.admin,
                        reqwest::Method::GET,
                        &format!("/admin/services/{}", s.name),
                        None,
                    )
                    .await?
                }
                ServiceCmd::Delete(s) => {
                    admin_request(
                        &s.admin,
                        reqwest::Method::DELETE,
                        &format!("/admin/services/{}", s.name),
                        None,
                    )
                    .await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Bench(a) => bench(a).await?,
        Cmd::Engine(a) => engine(a).await?,
        Cmd::DemoModel(a) => {
            let model = eddy::api::DemoModel {
                delay: std::time::Duration::from_millis(a.delay_ms),
                fail_every: a.fail_every,
                fail_status: a.fail_status,
                empty: a.empty,
            };
            let listener = tokio::net::TcpListener::bind(a.listen).await?;
            tracing::info!(listen = %listener.local_addr()?, "demo model serving");
            eddy::api::serve(listener, eddy::api::demo_model_router(model), terminated()).await?;
        }
        Cmd::Cluster(ClusterCmd::Add(m)) => {
            let body =
                serde_json::json!({"id": m.id, "raft_addr": m.raft_addr, "api_addr": m.api_addr});
            let out = admin_request(
                &m.admin,
                reqwest::Method::POST,
                "/admin/cluster/members",
                Some(body),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Cluster(ClusterCmd::Remove(m)) => {
            let path = format!("/admin/cluster/members/{}", m.id);
            let out = admin_request(&m.admin, reqwest::Method::DELETE, &path, None).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Wal(WalCmd::Check { dir }) => {
            let report = eddy::raft::check_wal(&dir)?;
            println!("{report}");
            if report.is_corrupt() {
                std::process::exit(1);
            }
        }
        Cmd::Cluster(ClusterCmd::Status(a)) => {
            let out = admin_request(&a, reqwest::Method::GET, "/admin/cluster", None).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}
