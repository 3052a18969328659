use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use eddy::queue::{Command, NewItem, QueueKind, QueueRef, Reply, Selector, ServiceConfig, Tags};
use eddy::raft::Peer;
use eddy::config::{NodeConfig, Timings};
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
    peers: Vec<Peer>,
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

    async fn with_tls(
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
    async fn add_joiner(&mut self) -> u64 {
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
        start(self.settings(id, join)).await.unwrap()
    }

    /// The configuration node `id` starts with.
    pub(crate) fn settings(&self, id: u64, join: bool) -> NodeConfig {
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

    pub(crate) async fn leader(&self) -> u64 {
        for _ in 0..200 {
            for n in self.nodes.iter().flatten() {
                let s = n.node.status();
                if s.leader == Some(s.id) {
                    return s.id;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader elected");
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

    /// Restart node `id` with its settings changed by `change`.
    pub(crate) async fn restart_with(
        &mut self,
        id: u64,
        change: impl FnOnce(&mut NodeConfig),
    ) -> anyhow::Result<()> {
        let mut settings = self.settings(id, false);
        change(&mut settings);
        let n = start(settings).await?;
        self.nodes[(id - 1) as usize] = Some(n);
        Ok(())
    }
}

fn queue() -> QueueRef {
    QueueRef::new("svc", QueueKind::Input)
}

async fn put(node: &RunningNode, data: &str) -> u64 {
    let item = NewItem {
        request_id: uuid::Uuid::new_v4().to_string(),
        tags: Tags::new(),
        data: Bytes::from(data.to_string()),
        priority: 0,
        path: String::new(),
    };
    match node
        .node
        .propose(Command::Put {
            queue: queue(),
            item,
        })
        .await
        .unwrap()
    {
        Reply::Put { index, .. } => index,
        other => panic!("put: {other:?}"),
    }
}

pub(crate) async fn create_service(node: &RunningNode) {
    let cmd = Command::CreateService {
        name: "svc".into(),
        config: ServiceConfig::default(),
    };
    assert_eq!(node.node.propose_admin(cmd).await.unwrap(), Reply::Done);
}

fn length_on(node: &RunningNode) -> usize {
    node.node.read(|s| s.queue(&queue()).map_or(0, |q| q.len()))
}

async fn wait_for_length(node: &RunningNode, expected: usize) {
    for _ in 0..200 {
        if length_on(node) == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "node {} has {} items, expected {expected}",
        node.node.id,
        length_on(node)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_forwarding_failover_and_restart() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    // Writes through a follower are forwarded to the leader.
    create_service(c.node(follower)).await;
    let mut last = 0;
    for i in 0..20 {
        let idx = put(c.node(follower), &format!("f{i}")).await;
        assert!(idx > last);
        last = idx;
    }
    for id in 1..=3 {
        wait_for_length(c.node(id), 20).await;
    }
    // The leader goes away: the others elect a new one and keep accepting.
    c.stop(leader).await;
    let new_leader = c.leader().await;
    assert_ne!(new_leader, leader);
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    for i in 0..10 {
        let idx = put(c.node(survivor), &format!("after{i}")).await;
        assert!(idx > last, "indexes keep increasing across leaders");
        last = idx;
    }
    // The old leader comes back and catches up.
    c.restart(leader).await;
    wait_for_length(c.node(leader), 30).await;
    let frames = c.node(leader).node.read(|s| {
        s.queue(&queue()).unwrap().peek(&Selector {
            from_index: Some(0),
            length: 100,
            tags: Tags::new(),
        })
    });
    assert_eq!(frames.len(), 30);
    assert_eq!(frames[0].data, Bytes::from_static(b"f0"));
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

/// The length to cut node log file `wal` to so that it ends right after the
/// batch holding entry `index`, before any later record (the commit of that
/// entry among them), as if the node had stopped right then.
fn length_ending_after_entry(wal: &std::path::Path, index: u64) -> u64 {
    let bytes = std::fs::read(wal).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("raft.wal");
    for len in 1..=bytes.len() {
        std::fs::write(&copy, &bytes[..len]).unwrap();
        // Shorter than the file header: not a log file yet.
        let Ok(report) = eddy::raft::check_wal(scratch.path()) else {
            continue;
        };
        if matches!(report.tail, eddy::raft::WalTail::Clean) && report.last_index == Some(index) {
            let committed = report
                .committed
                .as_deref()
                .and_then(|c| c.rsplit('.').next()?.parse().ok());
            assert!(
                committed.is_none_or(|c: u64| c < index),
                "entry {index} and its commit share a batch"
            );
            return len as u64;
        }
    }
    panic!("no batch ends with entry {index} in {}", wal.display());
}

/// A leader sends entries to its followers before its own write of them is
/// durable. Killed before that write, it comes back without an entry that a
/// follower holds uncommitted: the log ids it then hands out must never be
/// ones that follower holds for other entries (which a leader restored in
/// its old term would do), or the follower applies its own entry where the
/// others apply the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_unwritten_tail_never_reuses_its_log_ids() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (behind, ahead) = (followers[0], followers[1]);
    for i in 0..5 {
        put(c.node(leader), &format!("both{i}")).await;
    }
    for id in 1..=3 {
        wait_for_length(c.node(id), 5).await;
    }
    c.stop(behind).await;
    let wal = {
        let dirs: Vec<_> = (1..=3).map(|id| c.data_dir(id)).collect();
        move |id: u64| dirs[(id - 1) as usize].join("raft").join("raft.wal")
    };
    let leader_wrote = std::fs::metadata(wal(leader)).unwrap().len();
    put(c.node(leader), "only-on-the-follower").await;
    let lost = c.node(leader).node.status().last_log_index.unwrap();
    c.stop(leader).await;
    c.stop(ahead).await;
    // The state a kill leaves when the leader had sent entry `lost` but not
    // written it: the follower wrote it and heard of no commit, the leader
    // and the other follower never had it.
    let cut = |id, len| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(wal(id))
            .unwrap()
            .set_len(len)
            .unwrap()
    };
    cut(leader, leader_wrote);
    cut(ahead, length_ending_after_entry(&wal(ahead), lost));
    c.restart(leader).await;
    c.restart(ahead).await;
    c.restart(behind).await;
    c.leader().await;
    put(c.node(leader), "after").await;
    replicas_agree(&c, &[1, 2, 3]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_is_caught_up_by_snapshot() {
    let mut c = Cluster::new(3, 50).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    let lagging = (1..=3).find(|i| *i != leader).unwrap();
    let lagging_last = c.node(lagging).node.status().last_log_index.unwrap_or(0);
    c.stop(lagging).await;
    for i in 0..400 {
        put(c.node(leader), &format!("x{i}")).await;
    }
    // The leader no longer has the entries the lagging node misses, so only
    // a snapshot can bring it up to date.
    for _ in 0..200 {
        if c.node(leader).node.status().purged.unwrap_or(0) > lagging_last + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        c.node(leader).node.status().purged.unwrap_or(0) > lagging_last + 1,
        "leader purged its log"
    );
    c.restart(lagging).await;
    wait_for_length(c.node(lagging), 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_side_refuses_writes() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    c.stop(others[0]).await;
    c.stop(others[1]).await;
    let item = NewItem {
        request_id: "r".into(),
        tags: Tags::new(),
        data: Bytes::from_static(b"x"),
        priority: 0,
        path: String::new(),
    };
    let env = eddy::queue::Envelope {
        id: 1,
        now_ms: 0,
        command: Command::Put {
            queue: queue(),
            item,
        },
    };
    let r = c
        .node(leader)
        .node
        .propose_envelope(env, Duration::from_secs(2))
        .await;
    assert!(
        r.is_err(),
        "a lone node must not acknowledge a write: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_add_and_remove() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    for i in 0..10 {
        put(c.node(leader), &format!("m{i}")).await;
    }
    let new = c.add_joiner().await;
    let raft_addr = c.peers[(new - 1) as usize].raft_addr.clone();
    let api = c.node(new).http_addr.to_string();
    c.node(leader)
        .node
        .add_member(new, raft_addr, api)
        .await
        .unwrap();
    wait_for_length(c.node(new), 10).await;
    assert!(c.node(leader).node.status().voters.contains(&new));
    // Remove a follower that is not the new node; the cluster keeps working.
    let gone = (1..=3).find(|i| *i != leader).unwrap();
    c.node(leader).node.remove_member(gone).await.unwrap();
    let voters = c.node(leader).node.status().voters;
    assert!(!voters.contains(&gone) && voters.contains(&new) && voters.len() == 3);
    c.stop(gone).await;
    put(c.node(new), "after-removal").await;
    wait_for_length(c.node(new), 11).await;
}

/// A CA and one certificate for 127.0.0.1, shared by the nodes that use it.
fn tls_identity(dir: &std::path::Path) -> eddy::tls::TlsIdentity {
    eddy::tls::generate(dir, None, &["node".to_string()], &[], false, false).unwrap();
    eddy::tls::TlsIdentity::load(
        &dir.join("node.pem"),
        &dir.join("node-key.pem"),
        &dir.join("ca.pem"),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_replicates_and_shuts_out_a_node_of_another_ca() {
    let certs = tempfile::tempdir().unwrap();
    let ours = tls_identity(&certs.path().join("ours"));
    let theirs = tls_identity(&certs.path().join("theirs"));
    let mut c = Cluster::with_tls(
        3,
        20_000,
        vec![Some(ours.clone()), Some(ours), Some(theirs)],
    )
    .await;
    let leader = c.leader().await;
    assert_ne!(leader, 3, "node 3 cannot reach a quorum over TLS");
    let follower = if leader == 1 { 2 } else { 1 };
    create_service(c.node(follower)).await;
    for i in 0..20 {
        put(c.node(follower), &format!("item-{i}")).await;
    }
    wait_for_length(c.node(leader), 20).await;
    wait_for_length(c.node(follower), 20).await;
    // Node 3 shares the cluster secret but not the CA: nothing reaches it.
    for _ in 0..20 {
        assert_eq!(length_on(c.node(3)), 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.node(3).node.status().leader.is_none_or(|l| l == 3));
    for id in 1..=3 {
        c.stop(id).await;
    }
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
    use axum::extract::connect_info::MockConnectInfo;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let app = eddy::api::router(c.node(id).app_state.clone())
        .layer(MockConnectInfo(SocketAddr::from((from, 40_000))));
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
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}
