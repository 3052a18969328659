//! Admin authentication in clusters of several nodes: a member needs an
//! admin token (loopback is no proof of an administrator when a sidecar or
//! `kubectl port-forward` arrives there), while a single node on one
//! machine still runs without one; and admin calls a follower passes to
//! the leader go over TLS when the client ports use it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Cluster, call, eventually, free_port};

const LOCAL: [u8; 4] = [127, 0, 0, 1];

/// A `eddy serve` process; killed when dropped.
struct Serve {
    child: Child,
    http_port: u16,
    stderr: std::path::PathBuf,
}

impl Serve {
    /// Start `eddy serve` on loopback ports with `args` and `envs`, without
    /// any admin setting inherited from this process's environment.
    fn spawn(
        dir: &Path,
        http_port: u16,
        raft_port: u16,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let stderr = dir.join(format!("serve-{http_port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_eddy"))
            .arg("serve")
            .args([
                "--data-dir",
                dir.join(format!("data-{http_port}")).to_str().unwrap(),
            ])
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .args(["--raft-listen", &format!("127.0.0.1:{raft_port}")])
            .args(args)
            .env_remove("EDDY_ADMIN_TOKEN")
            .env_remove("EDDY_ADMIN_TOKEN_FILE")
            .env_remove("EDDY_PEERS")
            .env_remove("EDDY_CLUSTER_SECRET")
            .env_remove("EDDY_CLUSTER_SECRET_FILE")
            .envs(envs.iter().copied())
            .env("EDDY_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            http_port,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait (bounded) for the process to exit; `None` if it still runs.
    fn exit_status(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Send one HTTP/1.1 request and read the whole answer; `None` while
    /// the port does not accept connections.
    async fn http(&self, request: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .ok()?;
        s.write_all(request.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    /// Wait (bounded) until `GET path` is answered with `status`.
    async fn wait_for(&self, path: &str, status: &str) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(r) = self.http(&request).await
                && r.starts_with(&format!("HTTP/1.1 {status}"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {status} on {path}: {}", self.log());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A member of a three-node cluster refuses to start without an admin
/// token, naming the settings; with one (from a file), a caller on
/// loopback without the token is refused 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_member_needs_an_admin_token_even_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, (h, r))| format!("{}@127.0.0.1:{r}@127.0.0.1:{h}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let (http_port, raft_port) = ports[0];
    let member = ["--id", "1", "--peers", &peers, "--cluster-secret", "s3cret"];

    let mut without = Serve::spawn(dir.path(), http_port, raft_port, &member, &[]);
    let status = without.exit_status(Duration::from_secs(20));
    let log = without.log();
    assert!(
        status.is_some_and(|s| !s.success()),
        "a cluster member started without an admin token: {log}"
    );
    for flag in ["--admin-token-file", "--admin-token"] {
        assert!(
            log.contains(flag),
            "the refusal does not name {flag}: {log}"
        );
    }
    drop(without);

    // An empty token file is no token either.
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let mut args = member.to_vec();
    args.extend(["--admin-token-file", empty.to_str().unwrap()]);
    let mut with_empty = Serve::spawn(dir.path(), http_port, raft_port, &args, &[]);
    assert!(
        with_empty
            .exit_status(Duration::from_secs(20))
            .is_some_and(|s| !s.success()),
        "started with an empty admin token file: {}",
        with_empty.log()
    );
    drop(with_empty);

    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "the-admin-token\n").unwrap();
    let node = Serve::spawn(
        dir.path(),
        http_port,
        raft_port,
        &member,
        &[("EDDY_ADMIN_TOKEN_FILE", token_file.to_str().unwrap())],
    );
    node.wait_for("/healthz", "200").await;
    let list = |auth: &str| {
        format!("GET /admin/services HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
    };
    let answer = node.http(&list("")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = node
        .http(&list("Authorization: the-admin-token\r\n"))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A node with peers refuses to start without a cluster secret, whether
/// its peer list names itself or only the others, and an empty secret file
/// is no secret; a secret read from a file forms a working node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_member_needs_a_cluster_secret() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let peer = |i: usize| {
        format!(
            "{}@127.0.0.1:{}@127.0.0.1:{}",
            i + 1,
            ports[i].1,
            ports[i].0
        )
    };
    let all = (0..3).map(peer).collect::<Vec<_>>().join(",");
    let others = (1..3).map(peer).collect::<Vec<_>>().join(",");
    let (http_port, raft_port) = ports[0];
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "the-admin-token\n").unwrap();
    let empty = dir.path().join("empty-secret");
    std::fs::write(&empty, "\n").unwrap();
    let secret = dir.path().join("cluster-secret");
    std::fs::write(&secret, "s3cret-from-a-file\n").unwrap();
    let admin = ["--admin-token-file", token.to_str().unwrap()];

    for (peers, extra) in [
        (&all, vec![]),
        (&others, vec![]),
        (&all, vec!["--cluster-secret-file", empty.to_str().unwrap()]),
    ] {
        let mut args = vec!["--id", "1", "--peers", peers.as_str()];
        args.extend(admin);
        args.extend(extra.iter().copied());
        let mut node = Serve::spawn(dir.path(), http_port, raft_port, &args, &[]);
        let status = node.exit_status(Duration::from_secs(20));
        let log = node.log();
        assert!(
            status.is_some_and(|s| !s.success()),
            "a cluster member started without a secret ({args:?}): {log}"
        );
        assert!(
            log.contains("--cluster-secret-file") || log.contains("is empty"),
            "the refusal does not name the setting: {log}"
        );
    }

    let mut args = vec!["--id", "1", "--peers", all.as_str()];
    args.extend(admin);
    let node = Serve::spawn(
        dir.path(),
        http_port,
        raft_port,
        &args,
        &[("EDDY_CLUSTER_SECRET_FILE", secret.to_str().unwrap())],
    );
    node.wait_for("/healthz", "200").await;
}

/// The quick start: `eddy serve` and then `eddy service create` on the
/// same machine, with no token and no secret anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_node_quick_start_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let (http_port, raft_port) = (free_port(), free_port());
    let node = Serve::spawn(dir.path(), http_port, raft_port, &[], &[]);
    node.wait_for("/readyz", "200").await;
    assert!(
        node.log().contains("loopback"),
        "no warning: {}",
        node.log()
    );
    let endpoint = format!("127.0.0.1:{http_port}");
    for args in [
        &["service", "create", "quick", "-e", &endpoint][..],
        &["service", "list", "-e", &endpoint][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_eddy"))
            .args(args)
            .env_remove("EDDY_ADMIN_TOKEN")
            .env_remove("EDDY_ADMIN_TOKEN_FILE")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("quick"), "{args:?}: {stdout}");
    }
}

/// A single node without an admin token does not grow into a cluster: it
/// would then be a member without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_an_admin_token_adds_no_members() {
    let mut c = Cluster::new(1, 20_000).await;
    c.leader().await;
    let body = format!(
        r#"{{"id":2,"raft_addr":"127.0.0.1:{}","api_addr":"127.0.0.1:1"}}"#,
        free_port()
    );
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        call(&c, 1, LOCAL, "POST", "/admin/cluster/members", None, &body),
    )
    .await
    .expect("the add was refused at once");
    assert_eq!(answer.0, StatusCode::FORBIDDEN, "{}", answer.1);
    assert!(answer.1.contains("admin token"), "{}", answer.1);
    let direct = tokio::time::timeout(
        Duration::from_secs(10),
        c.node(1).node.add_member(
            2,
            format!("127.0.0.1:{}", free_port()),
            String::new(),
            Duration::from_secs(10),
        ),
    )
    .await
    .expect("the add was refused at once");
    assert!(
        matches!(&direct, Err(eddy::raft::ProposeError::Refused(m)) if m.contains("admin token")),
        "{direct:?}"
    );
    assert_eq!(c.node(1).node.status().nodes.len(), 1);
    c.stop(1).await;
}

/// A member restarted without its peer list and without a token is still a
/// member (its log says so): loopback callers are not administrators there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_without_a_token_refuses_loopback_admin_calls() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let other = (1..=3).find(|i| *i != leader).unwrap();
    c.stop(other).await;
    c.restart_with(other, |s| {
        s.peers = Vec::new();
        s.admin_token = String::new();
    })
    .await
    .expect("a node without peers starts without a token");
    eventually(
        "the restarted node knows its cluster",
        Duration::from_secs(10),
        || c.node(other).node.status().nodes.len() >= 3,
    )
    .await;
    let body = r#"{"name":"sneaky","token":""}"#;
    let (status, text) = call(&c, other, LOCAL, "POST", "/admin/services", None, body).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("admin token"), "{text}");
    assert!(c.node(leader).node.read(|s| s.service("sneaky").is_none()));
    for id in 1..=3 {
        c.stop(id).await;
    }
}

fn client_port_tls(certs: &Path, ca: &Path) -> eddy::tls::ClientPortTls {
    eddy::tls::ClientPortTls::load(&certs.join("node.pem"), &certs.join("node-key.pem"))
        .unwrap()
        .with_ca(&std::fs::read(ca).unwrap())
        .unwrap()
}

/// With TLS on the client ports, a membership change sent to a follower
/// reaches the leader over TLS, verified against the configured CA; a
/// follower that trusts another CA refuses to send the admin token there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_reach_a_leader_serving_tls() {
    let certs = tempfile::tempdir().unwrap();
    let (ours, theirs) = (certs.path().join("ours"), certs.path().join("theirs"));
    for dir in [&ours, &theirs] {
        eddy::tls::generate(dir, None, &["node".to_string()], &[], false, false).unwrap();
    }
    let tls = client_port_tls(&ours, &ours.join("ca.pem"));
    let mut c = Cluster::configured(3, |c| c.config.client_tls = Some(tls.clone())).await;
    let token = c.config.admin_token.clone();
    let leader = c.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let gone = (1..=3).find(|i| *i != leader && *i != follower).unwrap();

    // Settings that could not forward at all are refused at start.
    let mut blind = c.config_of(follower, false);
    blind.client_tls = Some(
        eddy::tls::ClientPortTls::load(&ours.join("node.pem"), &ours.join("node-key.pem")).unwrap(),
    );
    let refusal = blind.check().unwrap_err().to_string();
    assert!(refusal.contains("--tls-ca"), "{refusal}");

    let path = format!("/admin/cluster/members/{gone}");
    let (status, text) = call(&c, follower, LOCAL, "DELETE", &path, Some(&token), "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    eventually(
        "the removed node no longer a voter",
        Duration::from_secs(10),
        || !c.node(leader).node.status().voters.contains(&gone),
    )
    .await;

    // The follower restarted trusting another CA: the leader's certificate
    // does not verify, and nothing is sent.
    c.stop(follower).await;
    c.restart_with(follower, |s| {
        s.client_tls = Some(client_port_tls(&ours, &theirs.join("ca.pem")))
    })
    .await
    .unwrap();
    eventually(
        "the follower found the leader",
        Duration::from_secs(10),
        || c.node(follower).node.status().leader == Some(leader),
    )
    .await;
    let path = format!("/admin/cluster/members/{follower}");
    let started = Instant::now();
    let (status, text) = call(&c, follower, LOCAL, "DELETE", &path, Some(&token), "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("TLS"), "{text}");
    // A certificate that does not verify is no reason to look for another
    // leader: the answer comes at once.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
    assert!(c.node(leader).node.status().voters.contains(&follower));
    for id in 1..=3 {
        c.stop(id).await;
    }
}
