//! Security checks against a real `eddy serve` process: what a flood of
//! unauthenticated traffic costs the node (resident memory and descriptors,
//! read from `/proc`), the audit log on its standard error, the WebSocket
//! frame cap, and TLS on the client port. Each test prints the figures it
//! measured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::free_port;

/// A live `eddy serve` node on loopback; killed when dropped.
struct LiveNode {
    child: Child,
    http_port: u16,
    raft_port: u16,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl LiveNode {
    async fn start(extra: &[&str]) -> Self {
        Self::start_limited(extra, None).await
    }

    /// Start with the open-descriptor limit (soft and hard) set to
    /// `descriptors` when given.
    async fn start_limited(extra: &[&str], descriptors: Option<u64>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (http_port, raft_port) = (free_port(), free_port());
        let stderr = dir.path().join("stderr.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_eddy"));
        if let Some(n) = descriptors {
            use std::os::unix::process::CommandExt;
            let limit = rustix::process::Rlimit {
                current: Some(n),
                maximum: Some(n),
            };
            // SAFETY: setrlimit is a single system call, safe between fork
            // and exec.
            unsafe {
                command.pre_exec(move || {
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = command
            .arg("serve")
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .args(["--raft-listen", &format!("127.0.0.1:{raft_port}")])
            .args(["--cluster-secret", "the-cluster-secret"])
            .args(["--admin-token", "the-admin-token"])
            .args(extra)
            .env("EDDY_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let node = Self {
            child,
            http_port,
            raft_port,
            stderr,
            _dir: dir,
        };
        node.wait_listening().await;
        node
    }

    /// Wait until the HTTP port accepts connections (bounded).
    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.http_port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("eddy did not listen on {}: {}", self.http_port, self.log());
    }

    /// Wait until the node answers `/readyz` with 200 (it leads its
    /// single-node cluster), bounded.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let r = self
                .http("GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            if r.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("eddy did not become ready: {}", self.log());
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Send one HTTP/1.1 request on a new connection and read the whole
    /// answer (the request asks the server to close).
    async fn http(&self, request: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }
}

impl Drop for LiveNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Findings 4 and 5 against a live process: a 200 MiB gRPC call with a wrong
/// cluster secret is refused before its body is read, and 1,500 half-sent
/// HTTP requests neither take more descriptors than the connection limit
/// nor stay open past the header-read timeout. Resident memory and
/// descriptor counts are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_floods_leave_memory_and_descriptors_bounded() {
    let node = LiveNode::start(&[
        "--max-connections",
        "256",
        "--http-header-timeout-ms",
        "1500",
    ])
    .await;
    let (rss_start, _) = node.memory_kib();
    let fds_start = node.descriptors();

    // 200 MiB in one gRPC message, with the wrong secret.
    let body_len: usize = 200 << 20;
    let mut body = Vec::with_capacity(body_len + 5);
    body.push(0);
    body.extend_from_slice(&(body_len as u32).to_be_bytes());
    body.resize(body_len + 5, 0x5a);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = Instant::now();
    let answer = client
        .post(format!(
            "http://127.0.0.1:{}/eddy.raft.Raft/Forward",
            node.raft_port
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-eddy-cluster-secret", "a-wrong-secret")
        .body(body)
        .send()
        .await;
    let refused_in = started.elapsed();
    // Refused with Unauthenticated (16) in the headers, or the stream reset
    // while the client was still sending: never accepted.
    if let Ok(resp) = &answer {
        let status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("16"), "{resp:?}");
    }
    let (rss_grpc, hwm_grpc) = node.memory_kib();
    println!(
        "wrong-secret gRPC 200 MiB: refused in {refused_in:?}; RSS {rss_start} KiB -> {rss_grpc} KiB, peak {hwm_grpc} KiB"
    );
    assert!(
        hwm_grpc < rss_start + 64 * 1024,
        "peak RSS {hwm_grpc} KiB grew by more than 64 MiB from {rss_start} KiB"
    );

    // 1,500 half-sent requests.
    let mut half_sent = Vec::new();
    for _ in 0..1_500 {
        let mut s = TcpStream::connect(("127.0.0.1", node.http_port))
            .await
            .unwrap();
        let _ = s
            .write_all(b"POST /api/predict/x HTTP/1.1\r\nHost: x\r\n")
            .await;
        half_sent.push(s);
    }
    let fds_flood = node.descriptors();
    let (rss_flood, _) = node.memory_kib();
    println!(
        "1,500 half-sent requests: descriptors {fds_start} -> {fds_flood} (limit 256 connections); RSS {rss_flood} KiB"
    );
    assert!(
        fds_flood <= fds_start + 256 + 8,
        "{fds_flood} descriptors with a limit of 256 connections"
    );
    // Every half-sent request is closed by the server (those in the backlog
    // once they get a slot and their time runs out); read them all, bounded.
    let started = Instant::now();
    let mut open = 0;
    for s in &mut half_sent {
        let mut buf = Vec::new();
        let remaining = Duration::from_secs(30).saturating_sub(started.elapsed());
        if tokio::time::timeout(remaining, s.read_to_end(&mut buf))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    let drained_in = started.elapsed();
    drop(half_sent);
    println!("half-sent requests closed by the server in {drained_in:?}; still open: {open}");
    assert_eq!(open, 0, "half-sent requests still open after 30 s");
    let health = node
        .http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let fds_end = node.descriptors();
    println!("descriptors after the flood: {fds_end}");
    assert!(fds_end <= fds_start + 8, "{fds_end} descriptors left open");
}

/// Finding 8 (admin actions not logged; WebSocket frames up to 16 MiB):
/// every admin action and refusal is an `audit` line naming who and what,
/// and a WebSocket frame over the 64 KiB message cap closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_are_audited_and_websocket_frames_are_capped() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let node = LiveNode::start(&[]).await;
    node.wait_ready().await;
    let create = r#"{"name":"audited","token":"svc-token"}"#;
    let request = |token: &str| {
        format!(
            "POST /admin/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{create}",
            create.len()
        )
    };
    let refused = node.http(&request("a-wrong-token")).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let created = node.http(&request("the-admin-token")).await;
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    let log = node.log();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("audit")).collect();
    assert!(
        audit.iter().any(|l| l.contains("create-service")
            && l.contains("audited")
            && l.contains("127.0.0.1")),
        "no audit line for the creation: {audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("refused") && l.contains("127.0.0.1")),
        "no audit line for the refusal: {audit:#?}"
    );
    assert!(
        !log.contains("the-admin-token") && !log.contains("a-wrong-token"),
        "a token was written to the log"
    );

    let url = format!(
        "ws://127.0.0.1:{}/api/predict/audited?_watch_=true&_window_=1",
        node.http_port
    );
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut()
        .insert("authorization", "svc-token".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    // A frame just over the 64 KiB cap.
    let _ = ws
        .send(Message::Binary(vec![7u8; 64 * 1024 + 1].into()))
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "an oversized frame did not end the connection"
    );
    let health = node
        .http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

/// The peer gRPC port under a flood of 2,000 idle connections, on a node
/// whose descriptor limit is 1,024: the port holds no more than its
/// connection limit (the rest wait in the backlog), the node keeps the
/// descriptors storage needs, and it still answers `/healthz` and takes a
/// put. The HTTP connection limit was lowered at start to fit the
/// descriptor limit. Descriptors and resident memory are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_peer_connections_are_bounded() {
    let node = LiveNode::start_limited(&["--max-peer-connections", "64"], Some(1024)).await;
    node.wait_ready().await;
    let log = node.log();
    assert!(
        log.contains("connection limits lowered"),
        "no warning that --max-connections 4096 does not fit 1,024 descriptors: {log}"
    );
    let fds_start = node.descriptors();
    let (rss_start, _) = node.memory_kib();

    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..2_000 {
        let port = node.raft_port;
        connects.spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(3),
                TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            .ok()
            .and_then(Result::ok)
        });
    }
    let mut idle = Vec::new();
    while let Some(c) = connects.join_next().await {
        if let Some(s) = c.unwrap() {
            idle.push(s);
        }
    }
    let fds_flood = node.descriptors();
    let (rss_flood, _) = node.memory_kib();
    println!(
        "2,000 idle peer connections ({} completed TCP, the rest not let in): descriptors \
         {fds_start} -> {fds_flood} (limit 64 peer connections); RSS {rss_start} KiB -> {rss_flood} KiB",
        idle.len()
    );
    assert!(
        fds_flood <= fds_start + 64 + 16,
        "{fds_flood} descriptors with a limit of 64 peer connections"
    );

    let health = node
        .http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let put = node
        .http(
            "POST /api/predict/demo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: 5\r\n\r\nhello",
        )
        .await;
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    let mut node = node;
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the node exited: {}",
        node.log()
    );
    drop(idle);
}

fn generate_certs(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(["certs", "generate", "--nodes", "node-1", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TLS on the client port (`--tls-cert`, `--tls-key`): a client that trusts
/// the CA is served over TLS; plaintext HTTP gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_port_serves_tls_when_configured() {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

    let certs = tempfile::tempdir().unwrap();
    generate_certs(certs.path());
    let cert = certs.path().join("node-1.pem");
    let key = certs.path().join("node-1-key.pem");
    let node = LiveNode::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.path().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", node.http_port))
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with a client that trusts the CA");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("answered over TLS")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Plaintext on the TLS port: the handshake fails and nothing HTTP comes
    // back.
    let plain = node
        .http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(!plain.contains("200 OK"), "{plain}");
}

/// `--help` describes an empty admin token as loopback-only, and shows no
/// token or secret taken from the environment.
#[test]
fn help_hides_tokens_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(["serve", "--help"])
        .env("EDDY_ADMIN_TOKEN", "env-admin-token-value")
        .env("EDDY_STATUS_TOKEN", "env-status-token-value")
        .env("EDDY_CLUSTER_SECRET", "env-cluster-secret-value")
        .env("EDDY_SERVICES", "svc:env-service-token-value")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(
        !help.contains("env-"),
        "a token from the environment is shown: {help}"
    );
    assert!(help.contains("loopback"), "{help}");
    assert!(!help.contains("empty: open"), "{help}");
    for sub in [
        &["engine", "--help"][..],
        &["service", "list", "--help"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_eddy"))
            .args(sub)
            .env("EDDY_ADMIN_TOKEN", "env-admin-token-value")
            .env("EDDY_TOKEN", "env-service-token-value")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(!help.contains("env-"), "{sub:?} shows a token: {help}");
    }
}
