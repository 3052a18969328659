//! Delivery under faults, in process: consumer liveness reconciliation,
//! the lease that makes a cut-off node close its watchers before anyone
//! redelivers, and the leader's clock on every envelope.

use std::time::{Duration, Instant};

use eddy::queue::{
    Command, ConsumerSpec, Envelope, NewItem, QueueKind, QueueRef, Reply, ServiceConfig, Tags,
};

use crate::cluster::{Cluster, create_service, eventually};

fn svc_input() -> QueueRef {
    QueueRef::new("svc", QueueKind::Input)
}

/// Delivery finding 1(a): a consumer the replicated state shows running on
/// a node that holds no such connection (its `Detach` was lost: no quorum,
/// an election) is detached by that node's reconciliation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_detach_was_lost_is_detached_by_reconciliation() {
    let c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    let holder = (1..=3).find(|i| *i != leader).unwrap();
    // The state of an attach whose connection then closed without a
    // successful detach.
    let consumer = ConsumerSpec {
        group: "g".into(),
        user: "orphan".into(),
        node: holder,
        connection: 424_242,
        window: 1,
        auto_commit: false,
        index_only: false,
        tags: Tags::new(),
        start_index: Some(0),
    };
    let reply = c
        .node(leader)
        .node
        .propose(Command::Attach {
            queue: svc_input(),
            consumer,
        })
        .await
        .unwrap();
    assert!(!matches!(reply, Reply::Rejected(_)), "{reply:?}");
    let running = |c: &Cluster| {
        c.node(leader)
            .node
            .read(|s| s.running_consumers_on(holder).len())
    };
    assert_eq!(running(&c), 1);
    let took = eventually("orphan detached", Duration::from_secs(10), || {
        running(&c) == 0
    })
    .await;
    println!("orphaned consumer detached after {took:?}");
}

/// Delivery finding 2: a follower cut off from both other nodes gives up
/// its lease within `member_lease()` (shorter than `node_lost_ms`, so before
/// the majority would redeliver its consumers' items): it refuses watchers and
/// `/readyz` answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_follower_gives_up_its_lease_before_items_are_redelivered() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let other = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let node_lost = Duration::from_millis(1_000); // the cluster's node_lost_ms
    let lease = c.node(follower).node.member_lease();
    assert!(
        lease < node_lost,
        "lease {lease:?} not shorter than node-lost"
    );
    eventually("follower ready", Duration::from_secs(10), || {
        c.node(follower).node.accepts_watchers()
    })
    .await;
    let readyz = |c: &Cluster| {
        let app = eddy::api::router(c.node(follower).app_state.clone());
        async move {
            app.oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(readyz(&c).await, StatusCode::OK);

    // Timings whose lease would lapse between two heartbeats (healthy
    // followers would close their watchers) are refused at start.
    assert!(c.settings(follower, false).check().is_ok());
    let mut short = c.settings(follower, false);
    short.timings.node_lost = Duration::from_millis(300);
    let refusal = short.check().unwrap_err().to_string();
    assert!(refusal.contains("--node-lost-ms"), "{refusal}");
    let mut inverted = c.settings(follower, false);
    inverted.timings.node_lost = Duration::from_millis(1_000);
    inverted.timings.election_timeout = Duration::from_millis(1_000);
    assert!(inverted.check().is_err());

    c.stop(leader).await;
    c.stop(other).await;
    let cut_off_at = Instant::now();
    let took = eventually("follower gave up its lease", Duration::from_secs(5), || {
        !c.node(follower).node.holds_lease()
    })
    .await;
    println!(
        "cut-off follower gave up its lease after {took:?} (lease {lease:?}, node-lost {node_lost:?})"
    );
    assert!(
        cut_off_at.elapsed() < node_lost,
        "the lease outlived node-lost: {:?}",
        cut_off_at.elapsed()
    );
    assert!(!c.node(follower).node.accepts_watchers());
    assert_eq!(readyz(&c).await, StatusCode::SERVICE_UNAVAILABLE);
}

/// Delivery finding 7: an envelope proposed with a node's skewed clock is
/// applied with the leader's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_envelope_carries_the_leaders_clock() {
    let c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let before = eddy::raft::now_ms();
    // A node whose clock says 1970 (or one a day ahead).
    for skewed in [1_000, before + 86_400_000] {
        let envelope = Envelope {
            id: uuid::Uuid::new_v4().as_u128(),
            now_ms: skewed,
            command: Command::Truncate {
                queue: svc_input(),
                before: 1,
            },
        };
        c.node(follower)
            .node
            .propose_envelope(envelope, Duration::from_secs(5))
            .await
            .unwrap();
        let clock = c.node(leader).node.read(|s| s.clock_ms());
        assert!(
            clock >= before && clock <= eddy::raft::now_ms(),
            "applied at {clock}, the follower said {skewed}, the leader's clock {before}.."
        );
    }
}

/// Delivery finding 7, successive leaders: after a leader whose clock ran
/// 30 s ahead, the next leader (clock right) ends a leaving consumer's
/// 1 s grace period about 1 s after it began, not once its own clock has
/// caught up (old code: held the item 30 s longer, since applied time
/// never goes back and the new leader judged expiry by its own clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_lasts_its_length_after_a_leader_whose_clock_ran_ahead() {
    let mut c = Cluster::new(3, 20_000).await;
    let ahead = c.leader().await;
    c.node(ahead).node.set_clock_offset_ms(30_000);
    let grace = Duration::from_millis(1_000);
    create_service_with(
        c.node(ahead),
        ServiceConfig {
            consumer_grace_ms: grace.as_millis() as u64,
            ..Default::default()
        },
    )
    .await;
    let holder = (1..=3).find(|i| *i != ahead).unwrap();
    let stream = watcher_holding_an_item(&c, holder, holder, "leaver").await;
    // The worker goes away; its grace period starts on the fast clock.
    drop(stream);
    eventually("the consumer is leaving", Duration::from_secs(5), || {
        consumer(c.node(holder), "leaver")
            .is_some_and(|c| c.status != eddy::queue::ConsumerStatus::Running)
    })
    .await;
    let left = Instant::now();
    assert!(
        c.node(holder).node.read(|s| s.clock_ms()) > eddy::raft::now_ms() + 20_000,
        "the applied clock does not show the fast leader's time"
    );
    c.stop(ahead).await;
    let took = eventually(
        "the grace period ended under the next leader",
        Duration::from_secs(10),
        || consumer(c.node(holder), "leaver").is_none(),
    )
    .await;
    println!(
        "grace of {grace:?} ended {:?} after it began ({took:?} after the fast leader stopped)",
        left.elapsed()
    );
    assert!(
        left.elapsed() >= grace,
        "the grace period was cut short: {:?}",
        left.elapsed()
    );
    // The item is no longer held.
    assert_eq!(
        c.node(holder).node.read(|s| s
            .queue(&svc_input())
            .and_then(|q| q.groups.get("g"))
            .map_or(0, |g| g.in_flight.len())),
        0
    );
}

/// A service "svc" with `config`, created through `node`.
async fn create_service_with(node: &eddy::server::RunningNode, config: ServiceConfig) {
    let cmd = Command::CreateService {
        name: "svc".into(),
        config,
    };
    assert_eq!(node.node.propose_admin(cmd).await.unwrap(), Reply::Done);
}

async fn put_item(node: &eddy::server::RunningNode, data: Vec<u8>) -> u64 {
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

/// A TCP connection to `addr` with a small receive buffer, so that a client
/// that does not read stalls the sender soon.
async fn small_buffer_connection(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// The request that opens an HTTP-stream watch of service "svc" as `user`
/// of group "g", window 1, from the first item.
fn stream_watch_request(user: &str) -> String {
    format!(
        "GET /api/predict/svc?_watch_=true&_index_=0&_window_=1 HTTP/1.1\r\nHost: x\r\n\
         X-EAS-QueueService-Redis-Uid: {user}\r\nX-EAS-QueueService-Redis-Gid: g\r\n\r\n"
    )
}

/// Read `connection` until it ends (end of stream or error): the bytes it
/// still delivered, or `None` if it was open `within` later.
async fn read_until_closed(
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
async fn open_stream_watch<F, Fut>(
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

async fn plain_connection(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr).await.unwrap()
}

/// An HTTP-stream watcher of "svc" as `user`, attached through node `on`,
/// holding one item put for it (the state read on node `observer`).
async fn watcher_holding_an_item(
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
async fn a_holding_watcher_on_each_follower(
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

/// The consumer `user` of group "g", if attached.
fn consumer(node: &eddy::server::RunningNode, user: &str) -> Option<eddy::queue::Consumer> {
    node.node.read(|s| {
        s.queue(&svc_input())
            .and_then(|q| q.groups.get("g"))
            .and_then(|g| g.consumers.get(user).cloned())
    })
}

/// Delivery under faults, auto-commit: a watcher with `_auto_commit_` that
/// stops reading loses no item. The node holds at most the auto-commit
/// window for it (old code: the whole backlog, dispatched and committed at
/// once, until the buffer overflowed and the connection was closed with
/// the buffered frames); once the node gives up on it, what the client did
/// receive plus what another watcher then gets is every item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_commit_watcher_that_stops_reading_loses_no_item() {
    use futures::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let c = Cluster::configured(1, |c| c.config.watch_idle = Duration::from_millis(1_500)).await;
    let node = c.node(1);
    create_service_with(
        node,
        ServiceConfig {
            consumer_grace_ms: 300,
            ..Default::default()
        },
    )
    .await;
    eventually("node takes watchers", Duration::from_secs(10), || {
        node.node.accepts_watchers()
    })
    .await;
    // 40 MiB of items: more than a connection's buffer in the node.
    let total = 640u64;
    let mut all = std::collections::BTreeSet::new();
    for i in 0..total {
        let mut data = vec![(i % 251) as u8; 64 * 1024];
        data[..8].copy_from_slice(&i.to_be_bytes());
        all.insert(put_item(node, data).await);
    }
    let url = format!(
        "ws://{}/api/predict/svc?_watch_=true&_index_=0&_window_=1&_auto_commit_=true",
        node.http_addr
    );
    let watch_request = |user: &str| {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("X-EAS-QueueService-Redis-Uid", user.parse().unwrap());
        req.headers_mut()
            .insert("X-EAS-QueueService-Redis-Gid", "g".parse().unwrap());
        req
    };
    let tcp = small_buffer_connection(node.http_addr).await;
    let (mut stalled, _) = tokio_tungstenite::client_async(watch_request("stalled"), tcp)
        .await
        .unwrap();
    let queue_length = || {
        node.node
            .read(|s| s.queue(&svc_input()).map_or(0, |q| q.len() as u64))
    };
    // Attached, or already handed items (and possibly gone again).
    eventually("stalled watcher attached", Duration::from_secs(10), || {
        consumer(node, "stalled").is_some() || queue_length() < total
    })
    .await;
    // The client reads nothing: the node holds a bounded part of the queue
    // for it, and the rest stays in the queue.
    let mut peak_buffered = 0;
    let mut peak_held = 0;
    let gone = eventually(
        "the node gave up on the stalled watcher",
        Duration::from_secs(20),
        || {
            peak_buffered = peak_buffered.max(node.hub.buffered_bytes());
            let held = consumer(node, "stalled").map_or(0, |c| c.pending);
            peak_held = peak_held.max(held);
            consumer(node, "stalled")
                .is_none_or(|c| c.status != eddy::queue::ConsumerStatus::Running)
        },
    )
    .await;
    println!(
        "stalled watcher detached after {gone:?}: node buffered at most {peak_buffered} bytes, \
         it held at most {peak_held} items"
    );
    assert!(
        peak_buffered as u64 <= eddy::queue::AUTO_COMMIT_WINDOW_BYTES + 128 * 1024,
        "the node buffered {peak_buffered} bytes for a client that reads nothing"
    );
    assert!(peak_held <= eddy::queue::AUTO_COMMIT_WINDOW, "{peak_held}");
    // What reached the client's socket is still readable there.
    let mut received = std::collections::BTreeSet::new();
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), stalled.next()).await
    {
        if let Message::Binary(bytes) = msg {
            let frame = eddy::proto::DataFrameProto::decode(bytes).unwrap();
            assert_eq!(
                u64::from_be_bytes(frame.data[..8].try_into().unwrap()) + 1,
                frame.index
            );
            received.insert(frame.index);
        }
    }
    // Another watcher gets everything else, once the grace period is over.
    let (mut other, _) = tokio_tungstenite::connect_async(watch_request("other"))
        .await
        .unwrap();
    let mut later = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.len() + later.len() < all.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), other.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => {
                later.insert(eddy::proto::DataFrameProto::decode(bytes).unwrap().index);
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    let _ = other.close(None).await;
    let missing: Vec<u64> = all
        .iter()
        .filter(|i| !received.contains(i) && !later.contains(i))
        .copied()
        .collect();
    println!(
        "stalled client received {}, the other watcher {}, missing {}",
        received.len(),
        later.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} items lost, the first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Everything was committed once written: the queue drains.
    eventually("queue empty", Duration::from_secs(10), || {
        queue_length() == 0
    })
    .await;
    let _ = stalled.send(Message::Close(None)).await;
}

/// Delivery under faults, connection slots: an HTTP stream ended by the
/// idle check (its client stopped reading) is reset, so its connection
/// gives back its slot of the listener's limit (old code: the end of the
/// body waited on the full socket for ever, holding the slot, and every
/// later connection waited in the backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http_stream_ended_by_the_idle_check_frees_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let c = Cluster::configured(1, |c| {
        c.config.watch_idle = Duration::from_millis(1_000);
        c.config.listener = eddy::api::ListenerLimits {
            max_connections: 1,
            ..Default::default()
        };
    })
    .await;
    let node = c.node(1);
    create_service_with(
        node,
        ServiceConfig {
            consumer_grace_ms: 60_000,
            ..Default::default()
        },
    )
    .await;
    eventually("node takes watchers", Duration::from_secs(10), || {
        node.node.accepts_watchers()
    })
    .await;
    let mut stalled = small_buffer_connection(node.http_addr).await;
    stalled
        .write_all(stream_watch_request("stalled").as_bytes())
        .await
        .unwrap();
    eventually("stream attached", Duration::from_secs(10), || {
        consumer(node, "stalled").is_some()
    })
    .await;
    put_item(node, vec![7; 8 * 1024 * 1024]).await;
    eventually(
        "the idle check ended the stream",
        Duration::from_secs(15),
        || {
            consumer(node, "stalled")
                .is_some_and(|c| c.status != eddy::queue::ConsumerStatus::Running)
        },
    )
    .await;
    let ended = Instant::now();
    // The only connection slot is free again: another request is served.
    let mut next = tokio::net::TcpStream::connect(node.http_addr)
        .await
        .unwrap();
    next.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), next.read_to_end(&mut answer))
        .await
        .expect("a request after the stalled stream is served")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    println!("slot free {:?} after the stream ended", ended.elapsed());
    // And the stalled client's connection is over: reading it ends.
    assert!(
        read_until_closed(&mut stalled, Duration::from_secs(5))
            .await
            .is_some(),
        "the stalled stream's connection stayed open"
    );
}

/// Delivery under faults, memory: the replies the de-duplication table keeps
/// for retries count against the node's memory limit, so a node whose
/// table is full answers puts 429 (old code: the table, up to 64 MiB of
/// take replies, was not counted and puts went on being admitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dedup_table_makes_puts_answer_429() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    let limit = 24 * 1024 * 1024;
    let c = Cluster::configured(1, |c| c.config.max_memory_bytes = limit).await;
    let node = c.node(1);
    create_service_with(node, ServiceConfig::default()).await;
    let app = eddy::api::router(node.app_state.clone());
    let call = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 8 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let mib = vec![b'x'; 1024 * 1024];
    let mut refused = None;
    for round in 0..80 {
        let (status, body) = call(
            Request::post("/api/predict/svc")
                .body(Body::from(mib.clone()))
                .unwrap(),
        )
        .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((round, body));
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        // Taken at once: the queue stays empty, the take's reply is kept.
        let (status, _) = call(
            Request::get("/api/predict/svc?_index_=0&_length_=1&_auto_delete_=true&_raw_=false")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let held = node
        .node
        .read(|s| s.dedup_bytes(eddy::raft::now_ms()) + s.payload_bytes_held());
    let (round, body) = refused.expect("puts were admitted while the dedup table grew");
    println!("refused at round {round} with {held} bytes held: {body}");
    assert!(body.contains("replies kept for retries"), "{body}");
    assert_eq!(
        node.node
            .read(|s| s.queue(&svc_input()).map_or(0, |q| q.len())),
        0
    );
    assert!(held <= limit, "{held} held past the limit {limit}");
    assert!(round >= 15, "refused too early: round {round}");
}

/// Delivery under faults, the lease in a cluster of five: a follower cut
/// off together with the leader (a minority of two) keeps accepting that
/// leader's replication, but the leader no longer has a quorum; the
/// follower gives up its lease as the leader does, before the majority
/// would move its consumers' items (old code: it kept its lease, and its
/// watchers, for as long as the leader kept sending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_left_with_a_leader_without_quorum_gives_up_its_lease() {
    let mut c = Cluster::new(5, 20_000).await;
    let leader = c.leader().await;
    let follower = (1..=5).find(|i| *i != leader).unwrap();
    let node_lost = Duration::from_millis(1_000); // the cluster's node_lost_ms
    eventually("follower holds its lease", Duration::from_secs(10), || {
        c.node(follower).node.holds_lease()
    })
    .await;
    let others: Vec<u64> = (1..=5).filter(|i| *i != leader && *i != follower).collect();
    for id in &others {
        c.stop(*id).await;
    }
    let cut_off_at = Instant::now();
    let took = eventually("follower gave up its lease", Duration::from_secs(5), || {
        !c.node(follower).node.holds_lease()
    })
    .await;
    println!("follower beside a leader without quorum gave up its lease after {took:?}");
    assert!(
        cut_off_at.elapsed() < node_lost,
        "the lease outlived node-lost: {:?}",
        cut_off_at.elapsed()
    );
    assert!(!c.node(leader).node.holds_lease());
    assert!(!c.node(follower).node.accepts_watchers());
    // It was still hearing from that leader all along.
    assert_eq!(c.node(follower).node.status().leader, Some(leader));
}

/// Delivery under faults, dead peers: every accepted HTTP connection has
/// TCP keepalive and a user timeout derived from the watch idle limit, so a
/// watch whose host died is aborted by the kernel within about that limit
/// even when the node has nothing to send it (old code: neither was set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_detect_a_dead_peer_within_the_watch_idle_limit() {
    use std::os::fd::BorrowedFd;

    let c = Cluster::configured(1, |c| c.config.watch_idle = Duration::from_millis(6_000)).await;
    let server = c.node(1).http_addr;
    let client = tokio::net::TcpStream::connect(server).await.unwrap();
    let ours = client.local_addr().unwrap();
    // The node's end of this connection, among this process's descriptors.
    let mut found = None;
    for _ in 0..100 {
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // SAFETY: only read through, while the descriptor table is
            // not changed by this test for the connection looked for.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&borrowed);
            let matches = sock.local_addr().ok().and_then(|a| a.as_socket()) == Some(server)
                && sock.peer_addr().ok().and_then(|a| a.as_socket()) == Some(ours);
            if matches {
                found = Some((
                    sock.keepalive().unwrap(),
                    sock.tcp_keepalive_time().unwrap(),
                    sock.tcp_keepalive_interval().unwrap(),
                    sock.tcp_keepalive_retries().unwrap(),
                    sock.tcp_user_timeout().unwrap(),
                ));
            }
        }
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (on, time, interval, retries, user_timeout) =
        found.expect("the node's end of the connection");
    println!(
        "keepalive {on}, after {time:?}, every {interval:?}, {retries} probes, user timeout {user_timeout:?}"
    );
    assert!(on, "no keepalive on an accepted connection");
    assert_eq!(user_timeout, Some(Duration::from_millis(6_000)));
    // The first probe goes out well within the limit, and probing outlasts it
    // (the user timeout, not the probe count, ends the connection).
    assert!(time <= Duration::from_secs(3), "{time:?}");
    assert!(time + interval * retries >= Duration::from_secs(6));
    drop(client);
}

/// Delivery finding 1b: an HTTP-stream watcher whose process is stuck (its
/// host and TCP connection alive, so keepalive is answered, the small item
/// fitted in the socket buffers, and the stream has no way to ping) holds
/// the item until the hold limit, then the node ends its connection and the
/// item goes to another watcher of the group after the grace period (old
/// code: held for as long as the connection lived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_http_stream_watcher_gives_up_its_item_at_the_hold_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let hold = Duration::from_millis(1_500);
    let c = Cluster::configured(1, |c| c.config.watch_max_hold = Some(hold)).await;
    let node = c.node(1);
    create_service_with(
        node,
        ServiceConfig {
            consumer_grace_ms: 200,
            ..Default::default()
        },
    )
    .await;
    eventually("node takes watchers", Duration::from_secs(10), || {
        node.node.accepts_watchers()
    })
    .await;
    let mut stuck = tokio::net::TcpStream::connect(node.http_addr)
        .await
        .unwrap();
    stuck
        .write_all(stream_watch_request("a-stuck").as_bytes())
        .await
        .unwrap();
    eventually("stuck stream attached", Duration::from_secs(10), || {
        consumer(node, "a-stuck").is_some()
    })
    .await;
    let index = put_item(node, b"small".to_vec()).await;
    let held = || {
        node.node.read(|s| {
            s.queue(&svc_input())
                .and_then(|q| q.groups.get("g"))
                .and_then(|g| g.in_flight.get(&index).cloned())
        })
    };
    eventually(
        "item held by the stuck watcher",
        Duration::from_secs(5),
        || held().as_deref() == Some("a-stuck"),
    )
    .await;
    let held_at = Instant::now();
    // A second watcher of the group, idle until the item comes back.
    let mut healthy = tokio::net::TcpStream::connect(node.http_addr)
        .await
        .unwrap();
    healthy
        .write_all(stream_watch_request("b-healthy").as_bytes())
        .await
        .unwrap();
    eventually("healthy stream attached", Duration::from_secs(10), || {
        consumer(node, "b-healthy").is_some()
    })
    .await;
    // The stuck client reads nothing more, and commits nothing.
    let took = eventually(
        "the item moved to the healthy watcher",
        hold + Duration::from_secs(10),
        || held().as_deref() == Some("b-healthy"),
    )
    .await;
    assert!(
        held_at.elapsed() >= hold,
        "moved after {:?}, before the hold limit",
        held_at.elapsed()
    );
    println!(
        "item moved {:?} after it was held (hold limit {hold:?})",
        took
    );
    // The stuck watcher's connection was ended by the node.
    assert!(
        read_until_closed(&mut stuck, Duration::from_secs(5))
            .await
            .is_some(),
        "the stuck watcher's connection stayed open"
    );
    // The healthy watcher got the item's frame.
    let mut sink = vec![0; 1 << 16];
    let mut got = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while !got.windows(5).any(|w| w == b"small") {
            let n = healthy.read(&mut sink).await.unwrap();
            assert!(n > 0, "healthy stream ended");
            got.extend_from_slice(&sink[..n]);
        }
    })
    .await;
    assert!(found.is_ok(), "the healthy watcher did not get the item");
}

/// Delivery finding 3: a leader cut off from both followers judges no one:
/// it appends no `NodeLost` for the members it no longer hears from,
/// however long it waits (a heal within the propose window would commit
/// one, closing healthy workers on the majority side). With the lease check
/// in housekeeping removed this passes as well (measured): the cut-off
/// leader appends nothing by then in any case, so this guards the outcome,
/// not that check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_its_lease_declares_no_member_lost() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    create_service_with(
        c.node(leader),
        ServiceConfig {
            consumer_grace_ms: 60_000,
            ..Default::default()
        },
    )
    .await;
    // A consumer attached through a follower, holding an item.
    let attach = Command::Attach {
        queue: svc_input(),
        consumer: ConsumerSpec {
            group: "g".into(),
            user: "on-a-follower".into(),
            node: followers[0],
            connection: 1,
            window: 1,
            auto_commit: false,
            index_only: false,
            tags: Tags::new(),
            start_index: Some(0),
        },
    };
    c.node(leader).node.propose(attach).await.unwrap();
    put_item(c.node(leader), b"held".to_vec()).await;
    eventually(
        "the follower's consumer holds the item",
        Duration::from_secs(5),
        || consumer(c.node(leader), "on-a-follower").is_some_and(|c| c.pending == 1),
    )
    .await;
    for f in &followers {
        c.stop(*f).await;
    }
    let lease = c.node(leader).node.leader_lease();
    eventually(
        "the leader gave up its lease",
        Duration::from_secs(5),
        || !c.node(leader).node.holds_lease(),
    )
    .await;
    let before = c.node(leader).node.status().last_log_index;
    // Well past node-lost (1 s) and the old leader's shorter limit.
    let node_lost = Duration::from_millis(1_000);
    tokio::time::sleep(node_lost * 2 + lease).await;
    let after = c.node(leader).node.status();
    assert_eq!(
        after.last_log_index, before,
        "a leader without its lease appended entries (state {}, term {})",
        after.state, after.term
    );
}

/// Delivery under faults: a node that loses its lease closes its watchers
/// at once, also one whose frame is being written (an 8 MiB item to a
/// client that reads nothing), so it stops pushing before the leader
/// redelivers the item elsewhere (old code: the close waited behind the
/// frame, up to the 10 s idle limit of the stalled write, and a client
/// that read on got the whole item after the lease was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_lease_stops_a_frame_it_is_writing() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let other = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    create_service_with(c.node(leader), ServiceConfig::default()).await;
    eventually("follower takes watchers", Duration::from_secs(10), || {
        c.node(follower).node.accepts_watchers()
    })
    .await;
    let mut client = open_stream_watch(&c, follower, "reader", small_buffer_connection).await;
    eventually("stream attached", Duration::from_secs(10), || {
        consumer(c.node(leader), "reader").is_some()
    })
    .await;
    let size = 8 * 1024 * 1024;
    put_item(c.node(leader), vec![7; size]).await;
    eventually(
        "the follower holds the item for the reader",
        Duration::from_secs(5),
        || consumer(c.node(follower), "reader").is_some_and(|c| c.pending == 1),
    )
    .await;
    let hub = c.node(follower).app_state.hub.clone();
    assert_eq!(hub.connection_count(), 1);
    c.stop(leader).await;
    c.stop(other).await;
    let cut = Instant::now();
    let node_lost = Duration::from_millis(1_000);
    eventually("the follower dropped its watcher", node_lost, || {
        hub.connection_count() == 0
    })
    .await;
    println!("watcher dropped {:?} after the cut", cut.elapsed());
    // What reaches the client now is what was on the way: not the item.
    let got = read_until_closed(&mut client, Duration::from_secs(5))
        .await
        .expect("the connection stayed open");
    assert!(
        got < size,
        "the whole {size}-byte item was written after the lease was lost ({got} bytes)"
    );
}

/// Delivery finding 3: a leader cut off from both followers, healed after
/// the majority elected a new leader and after node-lost had passed on the
/// old leader's clock (inside the 5 s a proposal may take), evicts no
/// consumer of the majority: its verdict that they were lost is never
/// applied (old code: it proposed `NodeLost` for both followers, the
/// proposal went to the new leader after the heal, and every consumer on
/// the healthy nodes was removed, its items requeued). A consumer that
/// attaches on the healed node right after is not declared lost either.
/// Any one of the guards (the lease in housekeeping, the term a verdict
/// carries, never forwarding it) stops the verdict here; the term and
/// forwarding guards are also tested alone, in the state machine and the
/// peer service.
///
/// The followers' own watchers may close during the election (a node
/// without a leader gives up its lease); they then keep their items through
/// the grace period (60 s here), which is what is checked: still there,
/// still holding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_leader_evicts_no_consumer_of_the_majority() {
    let c = Cluster::new(3, 20_000).await;
    let (old, watchers) = a_holding_watcher_on_each_follower(&c).await;
    let followers: Vec<u64> = watchers.iter().map(|w| w.0).collect();

    for f in &followers {
        c.node(old).node.links().cut(*f);
        c.node(*f).node.links().cut(old);
    }
    let cut = Instant::now();
    let new = {
        let f = followers[0];
        eventually(
            "the majority elected a leader",
            Duration::from_secs(10),
            || {
                let s = c.node(f).node.status();
                s.leader.is_some_and(|l| l != old) && s.term > c.node(old).node.status().term
            },
        )
        .await;
        c.node(f).node.status().leader.unwrap()
    };
    // Past node-lost (1 s) on the old leader's clock, well inside the 5 s
    // a proposal of its verdict could wait for a quorum.
    let node_lost = Duration::from_millis(1_000);
    tokio::time::sleep((node_lost + Duration::from_millis(500)).saturating_sub(cut.elapsed()))
        .await;
    assert_eq!(
        c.node(old).node.status().leader,
        Some(old),
        "the old leader noticed the cut too early for this test"
    );
    for f in &followers {
        c.node(old).node.links().heal(*f);
        c.node(*f).node.links().heal(old);
    }
    println!("healed {:?} after the cut; new leader {new}", cut.elapsed());
    eventually("the old leader follows", Duration::from_secs(10), || {
        c.node(old).node.status().leader == Some(new)
    })
    .await;
    // A consumer attaching on the healed node right away.
    let mut rejoined = watcher_holding_an_item(&c, old, new, "on-healed").await;
    let attached = consumer(c.node(new), "on-healed").unwrap();
    // Anything proposed before or at the heal has been applied by now, and
    // a fresh verdict on the healed node would come within node-lost.
    tokio::time::sleep(node_lost * 2).await;
    for (f, user, _, was) in &watchers {
        let now = consumer(c.node(new), user);
        assert_eq!(
            now.as_ref().map(|c| (c.node, c.connection, c.pending)),
            Some((was.node, was.connection, 1)),
            "the consumer on node {f} was evicted"
        );
    }
    let now = consumer(c.node(new), "on-healed");
    assert_eq!(
        now.map(|c| (c.connection, c.status)),
        Some((attached.connection, attached.status)),
        "the consumer that attached on the healed node was declared lost"
    );
    assert_eq!(
        read_until_closed(&mut rejoined, Duration::from_millis(100)).await,
        None,
        "the watcher on the healed node was closed"
    );
}

/// Delivery: a healthy worker is not disturbed by the death of the leader.
/// With the default timings, the other members' lease (node-lost less its
/// margin, from the dead leader's last quorum acknowledgement) outlasts the
/// election, which cannot end before two election timeouts: their watchers
/// stay open and keep their items (with a lease of at most two election
/// timeouts, every follower closed every watcher at each leader failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_keep_their_watchers_when_the_leader_dies() {
    let mut c = Cluster::configured(3, |c| c.config.timings = Default::default()).await;
    let (old, mut watchers) = a_holding_watcher_on_each_follower(&c).await;
    let followers: Vec<u64> = watchers.iter().map(|w| w.0).collect();
    c.stop(old).await;
    let died = Instant::now();
    // Watch the followers' leases and connections until a new leader has
    // a quorum and both followers hold their lease under it.
    let mut lapses = Vec::new();
    let mut settled = None;
    while died.elapsed() < Duration::from_secs(15) {
        for f in &followers {
            let node = c.node(*f);
            if !node.node.holds_lease() || node.app_state.hub.connection_count() != 1 {
                lapses.push((*f, died.elapsed()));
            }
        }
        let leader = c.node(followers[0]).node.status().leader;
        if let Some(new) = leader.filter(|l| *l != old)
            && c.node(new).node.holds_lease()
            && followers.iter().all(|f| {
                c.node(*f).node.status().leader == Some(new) && c.node(*f).node.holds_lease()
            })
        {
            settled = Some((new, died.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (new, took) = settled.expect("no new leader with a quorum within 15 s");
    println!(
        "leader {old} died; leader {new} settled after {took:?} (member lease {:?})",
        c.node(followers[0]).node.member_lease()
    );
    assert!(
        lapses.is_empty(),
        "followers lost their lease or a watcher during the election: {:?}",
        &lapses[..lapses.len().min(5)]
    );
    for (f, user, stream, was) in watchers.iter_mut() {
        let now = consumer(c.node(new), user);
        assert_eq!(
            now.as_ref().map(|c| (c.connection, c.status, c.pending)),
            Some((was.connection, eddy::queue::ConsumerStatus::Running, 1)),
            "the consumer on node {f} was disturbed"
        );
        assert_eq!(
            read_until_closed(stream, Duration::from_millis(100)).await,
            None,
            "the watcher on node {f} was closed"
        );
    }
}
