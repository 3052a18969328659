//! Watches on one node: consumer liveness (reconciliation of lost
//! detaches, idle and stalled connections, the hold limit) and bounded
//! buffers for consumers that stop reading.

use std::time::{Duration, Instant};

use eddy::queue::{Command, ConsumerSpec, Reply, ServiceConfig, Tags};

use crate::harness::*;

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
    // A frame may reach the client in a write that did not finish: it is
    // sent again (at least once), so the two sets may overlap.
    while received.union(&later).count() < all.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), other.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => {
                later.insert(eddy::proto::DataFrameProto::decode(bytes).unwrap().index);
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    let _ = other.close(None).await;
    // Sent twice: at most the frames of the one write that did not finish
    // (its 64 KiB frames go one per write).
    let twice = received.intersection(&later).count();
    assert!(twice <= 1, "{twice} frames the client read were sent again");
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

/// An engine with a prefetch watches with a window of its concurrency plus
/// the prefetch, while the model still gets at most `concurrency` calls at
/// once: with concurrency 1 and prefetch 2 and a slow model, three items
/// are out to the engine and one is at the model. When the engine stops,
/// the two it had not started are handed back at once (not after the call
/// in progress), and the one at the model gets its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_takes_its_prefetch_beyond_the_calls_at_its_model() {
    use std::sync::atomic::Ordering;

    let c = Cluster::new(1, 20_000).await;
    let node = c.node(1);
    create_service(node).await;
    eventually("the node accepts watchers", Duration::from_secs(10), || {
        node.node.accepts_watchers()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let model = listener.local_addr().unwrap();
    let model_call = Duration::from_secs(4);
    let model_app = eddy::api::demo_model_router(eddy::api::DemoModel {
        delay: model_call,
        ..Default::default()
    });
    tokio::spawn(eddy::api::serve(
        listener,
        model_app,
        std::future::pending(),
    ));
    let engine = eddy::engine::Engine::new(eddy::engine::EngineSettings {
        endpoints: vec![node.http_addr.to_string()],
        service: "svc".into(),
        token: "svc-token".into(),
        model: format!("http://{model}"),
        concurrency: 1,
        prefetch: 2,
        group: "engine".into(),
        instance: "engine-1".into(),
        request_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        eddy_timeouts: Default::default(),
    })
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(engine.clone().run(async move {
        let _ = stopped.await;
    }));
    for i in 0..5 {
        put(node, &format!("[{{\"x\": {i}}}]")).await;
    }
    let out_to_engine = || {
        node.node.read(|s| {
            s.queue(&svc_input())
                .and_then(|q| q.groups.get("engine"))
                .map_or(0, |g| g.in_flight.len())
        })
    };
    eventually(
        "a window of three out to the engine, one at the model",
        Duration::from_secs(10),
        || {
            out_to_engine() == 3
                && engine.held_items() == 3
                && engine.permits.available_permits() == 0
        },
    )
    .await;
    let metrics = engine.render_metrics();
    assert!(metrics.contains("\neddy_engine_in_flight 1\n"), "{metrics}");

    let _ = stop.send(());
    let handed_back = eventually("the two items not started handed back", model_call, || {
        engine.stats.handed_back.load(Ordering::Relaxed) == 2
    })
    .await;
    assert!(
        engine.permits.available_permits() == 0,
        "handed back while the call was still at the model (after {handed_back:?})"
    );
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the engine drains and stops")
        .unwrap();
    let sink_len = node
        .node
        .read(|s| s.service("svc").map_or(0, |svc| svc.sink.len()));
    assert_eq!(sink_len, 1, "the item at the model got its result");
    assert_eq!(length_on(node), 4, "the rest wait in the queue");
}
