//! The in-process test harness: clusters of nodes in this process on
//! loopback ports, each with its own temporary data directory, started from
//! `NodeConfig::for_tests`; helpers that drive nodes through the replicated
//! state, the HTTP router (`call`) and raw HTTP-stream watches; and bounded
//! waits on a condition instead of sleeps.

use std::net::SocketAddr;
use std::time::Duration;

use eddy::config::{NodeConfig, Timings};
use eddy::queue::{Command, NewItem, QueueKind, QueueRef, Reply, ServiceConfig, Tags};
use eddy::raft::Peer;
use eddy::server::{RunningNode, start};

/// A loopback port for a node's listener that stays this node's across a
/// restart. Ports the kernel hands out for `:0` binds and outgoing
/// connections come from the ephemeral range (32768 and up), so one freed by
/// a stopped node could be taken by another test before the node restarts;
/// these come from below that range, each handed out once per process.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 400) as u16 * 25;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(offset < 2_000, "no free port below the ephemeral range");
        let port = base + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Wait (bounded) until `f` holds, polling; how long it took.
pub(crate) async fn eventually(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> bool,
) -> Duration {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if f() {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {within:?}");
}

pub(crate) struct Cluster {
    dir: tempfile::TempDir,
    pub(crate) peers: Vec<Peer>,
    nodes: Vec<Option<RunningNode>>,
    snapshot_every: u64,
    /// Per node id (index id - 1): its TLS identity, if the cluster uses TLS.
    tls: Vec<Option<eddy::tls::TlsIdentity>>,
    /// What every node is started with, before its own id, addresses,
    /// data directory and TLS identity are filled in: tests adjust it in
    /// `Cluster::configured`. Short timings by default, for quick tests.
    pub(crate) config: NodeConfig,
}

impl Cluster {
    pub(crate) async fn new(n: u64, snapshot_every: u64) -> Self {
        Self::with_tls(n, snapshot_every, vec![None; n as usize]).await
    }

    pub(crate) async fn with_tls(
        n: u64,
        snapshot_every: u64,
        tls: Vec<Option<eddy::tls::TlsIdentity>>,
    ) -> Self {
        Self::build(n, snapshot_every, tls, |_| {}).await
    }

    /// A cluster whose settings `configure` adjusts before any node starts.
    pub(crate) async fn configured(n: u64, configure: impl FnOnce(&mut Cluster)) -> Self {
        Self::build(n, 20_000, vec![None; n as usize], configure).await
    }

    async fn build(
        n: u64,
        snapshot_every: u64,
        tls: Vec<Option<eddy::tls::TlsIdentity>>,
        configure: impl FnOnce(&mut Cluster),
    ) -> Self {
        // `EDDY_LOG=...` shows the nodes' logs beside a failing test's output.
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let peers: Vec<Peer> = (1..=n)
            .map(|id| Peer {
                id,
                raft_addr: format!("127.0.0.1:{}", free_port()),
                api_addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            peers,
            nodes: Vec::new(),
            snapshot_every,
            tls,
            config: NodeConfig {
                // A member of a cluster of several nodes needs an admin token.
                admin_token: if n > 1 {
                    "test-admin-token".into()
                } else {
                    String::new()
                },
                cluster_secret: "test-secret".into(),
                timings: Timings {
                    heartbeat: Duration::from_millis(50),
                    election_timeout: Duration::from_millis(300),
                    node_lost: Duration::from_millis(1_000),
                },
                ..NodeConfig::for_tests(0, std::path::PathBuf::new(), 0, 0)
            },
        };
        configure(&mut c);
        for id in 1..=n {
            let node = c.start_node(id).await;
            c.nodes.push(Some(node));
        }
        c
    }

    async fn start_node(&self, id: u64) -> RunningNode {
        self.start_with(id, false).await
    }

    /// Start a node that waits to be added instead of forming a cluster.
    pub(crate) async fn add_joiner(&mut self) -> u64 {
        let id = self.peers.len() as u64 + 1;
        self.peers.push(Peer {
            id,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            api_addr: format!("127.0.0.1:{}", free_port()),
        });
        let node = self.start_with(id, true).await;
        self.nodes.push(Some(node));
        id
    }

    async fn start_with(&self, id: u64, join: bool) -> RunningNode {
        start(self.config_of(id, join)).await.unwrap()
    }

    /// The configuration node `id` starts with.
    pub(crate) fn config_of(&self, id: u64, join: bool) -> NodeConfig {
        let me = &self.peers[(id - 1) as usize];
        NodeConfig {
            id,
            data_dir: self.data_dir(id),
            http_listen: me.api_addr.parse().unwrap(),
            raft_listen: me.raft_addr.parse::<SocketAddr>().unwrap(),
            advertise_raft: me.raft_addr.clone(),
            peers: self.peers.clone(),
            peer_tls: self.tls.get((id - 1) as usize).cloned().flatten(),
            snapshot_every: self.snapshot_every,
            join,
            ..self.config.clone()
        }
    }

    /// Where node `id` keeps its data.
    pub(crate) fn data_dir(&self, id: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    pub(crate) fn node(&self, id: u64) -> &RunningNode {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .expect("node is running")
    }

    pub(crate) fn node_mut(&mut self, id: u64) -> &mut RunningNode {
        self.nodes[(id - 1) as usize]
            .as_mut()
            .expect("node is running")
    }

    /// Send `req` to node `id`'s router in process from loopback, in a task
    /// of its own; its response.
    pub(crate) fn spawn_request(
        &self,
        id: u64,
        req: axum::http::Request<axum::body::Body>,
    ) -> tokio::task::JoinHandle<axum::response::Response> {
        use tower::ServiceExt;
        let app = self.router_as_seen_from(id, [127, 0, 0, 1]);
        tokio::spawn(async move { app.oneshot(req).await.unwrap() })
    }

    /// Node `id`'s router, with its callers at `from` (the address the
    /// admin and status routes see).
    pub(crate) fn router_as_seen_from(&self, id: u64, from: [u8; 4]) -> axum::Router {
        use axum::extract::connect_info::MockConnectInfo;
        eddy::api::router(self.node(id).app_state.clone())
            .layer(MockConnectInfo(SocketAddr::from((from, 40_000))))
    }

    pub(crate) async fn leader(&self) -> u64 {
        let leader = || {
            self.nodes.iter().flatten().find_map(|n| {
                let s = n.node.status();
                (s.leader == Some(s.id)).then_some(s.id)
            })
        };
        eventually("a leader elected", Duration::from_secs(10), || {
            leader().is_some()
        })
        .await;
        leader().expect("a leader")
    }

    pub(crate) async fn stop(&mut self, id: u64) {
        if let Some(n) = self.nodes[(id - 1) as usize].take() {
            n.shutdown().await;
        }
    }

    pub(crate) async fn restart(&mut self, id: u64) {
        let n = self.start_node(id).await;
        self.nodes[(id - 1) as usize] = Some(n);
    }

    /// Restart node `id` with its configuration changed by `change`.
    pub(crate) async fn restart_with(
        &mut self,
        id: u64,
        change: impl FnOnce(&mut NodeConfig),
    ) -> anyhow::Result<()> {
        let mut config = self.config_of(id, false);
        change(&mut config);
        let n = start(config).await?;
        self.nodes[(id - 1) as usize] = Some(n);
        Ok(())
    }
}

pub(crate) fn svc_input() -> QueueRef {
    QueueRef::new("svc", QueueKind::Input)
}

/// Put `data` on the input of service "svc" through `node`'s proposer;
/// its index.
pub(crate) async fn put(node: &RunningNode, data: &str) -> u64 {
    put_item(node, data.as_bytes().to_vec()).await
}

/// Put `data` on the input of service "svc" through `node`'s proposer;
/// its index.
pub(crate) async fn put_item(node: &RunningNode, data: Vec<u8>) -> u64 {
    let item = NewItem {
        request_id: uuid::Uuid::new_v4().to_string(),
        tags: Tags::new(),
        data: bytes::Bytes::from(data),
        priority: 0,
        path: String::new(),
    };
    match node
        .node
        .propose(Command::Put {
            queue: svc_input(),
            item,
        })
        .await
        .unwrap()
    {
        Reply::Put { index, .. } => index,
        other => panic!("put: {other:?}"),
    }
}

/// A service "svc" with the default configuration, created through `node`.
pub(crate) async fn create_service(node: &RunningNode) {
    create_service_with(node, ServiceConfig::default()).await
}

/// A service "svc" with `config`, created through `node`.
pub(crate) async fn create_service_with(node: &RunningNode, config: ServiceConfig) {
    let cmd = Command::CreateService {
        name: "svc".into(),
        config,
    };
    assert_eq!(node.node.propose_admin(cmd).await.unwrap(), Reply::Done);
}

pub(crate) fn length_on(node: &RunningNode) -> usize {
    node.node
        .read(|s| s.queue(&svc_input()).map_or(0, |q| q.len()))
}

pub(crate) async fn wait_for_length(node: &RunningNode, expected: usize) {
    let what = format!("node {} holding {expected} items", node.node.id);
    eventually(&what, Duration::from_secs(5), || {
        length_on(node) == expected
    })
    .await;
}

/// The consumer `user` of group "g", if attached.
pub(crate) fn consumer(
    node: &eddy::server::RunningNode,
    user: &str,
) -> Option<eddy::queue::Consumer> {
    node.node.read(|s| {
        s.queue(&svc_input())
            .and_then(|q| q.groups.get("g"))
            .and_then(|g| g.consumers.get(user).cloned())
    })
}

/// Until every running node stands at one applied index, then whether
/// their states are equal there (digest per node on failure).
pub(crate) async fn replicas_agree(c: &Cluster, ids: &[u64]) -> Result<(), String> {
    let mut seen = Vec::new();
    for _ in 0..400 {
        seen = ids
            .iter()
            .map(|id| c.node(*id).node.state_digest().unwrap())
            .collect::<Vec<_>>();
        if seen.iter().all(|d| d.applied == seen[0].applied) {
            return if seen.iter().all(|d| d.crc32 == seen[0].crc32) {
                Ok(())
            } else {
                Err(format!("replicas diverged: {seen:?}"))
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!("never at one applied index together: {seen:?}"))
}

/// Call node `id`'s router in process as a caller at `from` (the address
/// the admin and status routes see), with an optional `Authorization`.
pub(crate) async fn call(
    c: &Cluster,
    id: u64,
    from: [u8; 4],
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (axum::http::StatusCode, String) {
    use tower::ServiceExt;

    let app = c.router_as_seen_from(id, from);
    let mut req = axum::http::Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", t);
    }
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let resp = app
        .oneshot(req.body(axum::body::Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let (status, _, bytes) = read_response(resp).await;
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Send `req` to node `id`'s router in process; its status, headers and
/// body.
pub(crate) async fn send(
    c: &Cluster,
    id: u64,
    req: axum::http::Request<axum::body::Body>,
) -> (axum::http::StatusCode, axum::http::HeaderMap, bytes::Bytes) {
    use tower::ServiceExt;

    let resp = eddy::api::router(c.node(id).app_state.clone())
        .oneshot(req)
        .await
        .unwrap();
    read_response(resp).await
}

pub(crate) async fn read_response(
    resp: axum::response::Response,
) -> (axum::http::StatusCode, axum::http::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt;

    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

/// A CA and one certificate for 127.0.0.1, shared by the nodes that use it.
pub(crate) fn tls_identity(dir: &std::path::Path) -> eddy::tls::TlsIdentity {
    eddy::tls::generate(dir, None, &["node".to_string()], &[], false, false).unwrap();
    eddy::tls::TlsIdentity::load(
        &dir.join("node.pem"),
        &dir.join("node-key.pem"),
        &dir.join("ca.pem"),
    )
    .unwrap()
}

/// A TCP connection to `addr` with a small receive buffer, so that a client
/// that does not read stalls the sender soon.
pub(crate) async fn small_buffer_connection(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

pub(crate) async fn plain_connection(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr).await.unwrap()
}

/// The request that opens an HTTP-stream watch of service "svc" as `user`
/// of group "g", window 1, from the first item.
pub(crate) fn stream_watch_request(user: &str) -> String {
    format!(
        "GET /api/predict/svc?_watch_=true&_index_=0&_window_=1 HTTP/1.1\r\nHost: x\r\n\
         X-EAS-QueueService-Redis-Uid: {user}\r\nX-EAS-QueueService-Redis-Gid: g\r\n\r\n"
    )
}

/// Read `connection` until it ends (end of stream or error): the bytes it
/// still delivered, or `None` if it was open `within` later.
pub(crate) async fn read_until_closed(
    connection: &mut tokio::net::TcpStream,
    within: Duration,
) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0; 1 << 16];
    let mut got = 0;
    tokio::time::timeout(within, async {
        loop {
            match connection.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .ok()?;
    Some(got)
}

/// An HTTP-stream watch of "svc" as `user` through node `on`, over
/// `connect`'s connection, once the node answered 200 (the response head is
/// read). A node that answers otherwise (its lease lapsed under load between
/// the check and the request, say) is asked again, as a client would.
pub(crate) async fn open_stream_watch<F, Fut>(
    c: &Cluster,
    on: u64,
    user: &str,
    connect: F,
) -> tokio::net::TcpStream
where
    F: Fn(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = tokio::net::TcpStream>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..5 {
        eventually("the node takes watchers", Duration::from_secs(10), || {
            c.node(on).node.accepts_watchers()
        })
        .await;
        let mut stream = connect(c.node(on).http_addr).await;
        stream
            .write_all(stream_watch_request(user).as_bytes())
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
        })
        .await;
        assert!(read.is_ok(), "node {on} sent no response head to {user}");
        if head.starts_with(b"HTTP/1.1 200") {
            return stream;
        }
        println!(
            "watch of {user} on node {on} answered {}; asking again",
            String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or("nothing")
        );
    }
    panic!("node {on} refused the watch of {user} five times");
}

/// An HTTP-stream watcher of "svc" as `user`, attached through node `on`,
/// holding one item put for it (the state read on node `observer`).
pub(crate) async fn watcher_holding_an_item(
    c: &Cluster,
    on: u64,
    observer: u64,
    user: &str,
) -> tokio::net::TcpStream {
    let stream = open_stream_watch(c, on, user, plain_connection).await;
    eventually(
        &format!("{user} attached on node {on}, seen on node {observer}"),
        Duration::from_secs(10),
        || consumer(c.node(observer), user).is_some(),
    )
    .await;
    put_item(c.node(observer), b"held".to_vec()).await;
    eventually(
        &format!("{user} holds an item"),
        Duration::from_secs(5),
        || consumer(c.node(observer), user).is_some_and(|c| c.pending == 1),
    )
    .await;
    stream
}

/// A watcher on each follower of `c`'s leader, each holding an item, in a
/// service whose grace period (60 s) outlasts the test: the leader, and per
/// follower its id, the watcher's user, its connection and the consumer as
/// the leader saw it.
pub(crate) async fn a_holding_watcher_on_each_follower(
    c: &Cluster,
) -> (
    u64,
    Vec<(u64, String, tokio::net::TcpStream, eddy::queue::Consumer)>,
) {
    let leader = c.leader().await;
    create_service_with(
        c.node(leader),
        ServiceConfig {
            consumer_grace_ms: 60_000,
            ..Default::default()
        },
    )
    .await;
    let mut watchers = Vec::new();
    for f in (1..=3).filter(|i| *i != leader) {
        let user = format!("on-{f}");
        let stream = watcher_holding_an_item(c, f, leader, &user).await;
        let held = consumer(c.node(leader), &user).unwrap();
        watchers.push((f, user, stream, held));
    }
    (leader, watchers)
}
