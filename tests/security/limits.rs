//! Bounds on what one request may write into the replicated log besides its
//! payload, driven through the HTTP router in process.

use axum::body::Body;
use axum::http::{Request, StatusCode};

use crate::harness::{Cluster, eventually, send};

async fn call(c: &Cluster, req: Request<Body>) -> (StatusCode, String) {
    let (status, _, bytes) = send(c, 1, req).await;
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn queue_length(c: &Cluster) -> usize {
    c.node(1).node.read(|s| {
        s.service("svc")
            .map_or(0, |svc| svc.input.len() + svc.sink.len())
    })
}

/// Finding 7: a 60 KB consumer-group header, too many tags or a huge tag
/// are refused with 400 before anything is proposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_and_tags_are_bounded() {
    let mut c = Cluster::new(1, 20_000).await;
    crate::harness::create_service(c.node(1)).await;
    let big_group = "g".repeat(60_000);
    let commit = Request::builder()
        .method("PUT")
        .uri("/api/predict/svc?_index_=1")
        .header("X-EAS-QueueService-Redis-Gid", &big_group)
        .body(Body::empty())
        .unwrap();
    let (status, text) = call(&c, commit).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let watch = Request::builder()
        .uri("/api/predict/svc?_watch_=true")
        .header("X-EAS-QueueService-Redis-Gid", &big_group)
        .body(Body::empty())
        .unwrap();
    let (status, _) = call(&c, watch).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(c.node(1).node.read(|s| {
        s.service("svc")
            .is_some_and(|svc| svc.input.groups.keys().all(|g| g.len() <= 128))
    }));

    let many: String = (0..40).map(|i| format!("k{i}=v&")).collect();
    let long_value = format!("k={}", "v".repeat(5_000));
    for query in [many, long_value] {
        let put = Request::builder()
            .method("POST")
            .uri(format!("/api/predict/svc?{query}"))
            .body(Body::from("payload"))
            .unwrap();
        let (status, text) = call(&c, put).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    }
    assert_eq!(queue_length(&c), 0, "nothing was stored");
    let ok = Request::builder()
        .method("POST")
        .uri("/api/predict/svc?k=v")
        .body(Body::from("payload"))
        .unwrap();
    assert_eq!(call(&c, ok).await.0, StatusCode::OK);
    c.stop(1).await;
}

/// Finding 5: half-sent requests are dropped after the header-read timeout,
/// and idle connections beyond the limit wait in the backlog instead of
/// taking descriptors; once they are gone the node serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_time_out_and_connections_are_limited() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    let c = Cluster::configured(1, |c| {
        c.config.listener = eddy::api::ListenerLimits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(500),
            ..Default::default()
        };
    })
    .await;
    let addr = c.node(1).http_addr;
    let mut half_sent = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half_sent.push(s);
    }
    // All 8 slots are held; the server closes every half-sent request once
    // its time is up, and a complete request waiting meanwhile is served.
    slots_come_free(addr, half_sent).await;
}

/// Security finding 5, the connections that send no request: ones that
/// say nothing at all, one that starts an HTTP/2 preface, and one that
/// speaks HTTP/2 (it would answer pings for ever) are all closed within the
/// header-read timeout, and a request waiting behind them is served (old
/// code: the protocol version was read with no timeout and idle HTTP/2
/// connections were kept, so they held every slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_no_request_give_up_their_slots() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    let c = Cluster::configured(1, |c| {
        c.config.listener = eddy::api::ListenerLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(500),
            ..Default::default()
        };
    })
    .await;
    let addr = c.node(1).http_addr;
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut preface = TcpStream::connect(addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    idle.push(preface);
    let mut h2 = TcpStream::connect(addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    idle.push(h2);
    slots_come_free(addr, idle).await;
}

/// With every connection slot of the node at `addr` held by `held`, a
/// complete request waits; every held connection must be closed by the
/// server within 3 s, and the waiting request then served.
async fn slots_come_free(addr: std::net::SocketAddr, mut held: Vec<tokio::net::TcpStream>) {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut waiting = tokio::net::TcpStream::connect(addr).await.unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for (i, s) in held.iter_mut().enumerate() {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "held connection {i} was kept open: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    let closed_after = started.elapsed();
    assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), waiting.read_to_end(&mut answer))
        .await
        .expect("the waiting request was served")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// A put whose headers declare 1 MiB but whose body stops after a few bytes
/// is answered 408 and closed once the body timeout has passed, and
/// nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_body_times_out() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let mut c = Cluster::new(1, 20_000).await;
    c.config.listener = eddy::api::ListenerLimits {
        body_timeout: Duration::from_millis(700),
        ..Default::default()
    };
    c.stop(1).await;
    c.restart(1).await;
    crate::harness::create_service(c.node(1)).await;
    let mut s = TcpStream::connect(c.node(1).http_addr).await.unwrap();
    s.write_all(
        b"POST /api/predict/svc HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\nfirst bytes",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the half-sent body was answered and closed")
        .unwrap();
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    println!("half-sent body answered and closed after {took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(queue_length(&c), 0, "nothing was stored");
    c.stop(1).await;
}

/// URL sub-paths are stored with every item (`_path_`): one over 1 KiB,
/// with more than 32 segments, or with an empty, `.` or `..` segment is
/// refused with 400 and nothing is stored; a plain one is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_sub_paths_are_bounded() {
    let mut c = Cluster::new(1, 20_000).await;
    crate::harness::create_service(c.node(1)).await;
    let long = "p".repeat(2_000);
    let deep = vec!["s"; 40].join("/");
    for sub in [long.as_str(), deep.as_str(), "a/../b", "a/./b", "a//b"] {
        let put = Request::builder()
            .method("POST")
            .uri(format!("/api/predict/svc/{sub}"))
            .body(Body::from("payload"))
            .unwrap();
        let (status, text) = call(&c, put).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{sub:.40}: {text}");
    }
    assert_eq!(queue_length(&c), 0, "nothing was stored");
    let ok = Request::builder()
        .method("POST")
        .uri("/api/predict/svc/models/v2")
        .body(Body::from("payload"))
        .unwrap();
    let (status, text) = call(&c, ok).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(queue_length(&c), 1);
    c.stop(1).await;
}

/// A hand-back whose reason is longer than the server takes (1 KiB; a
/// model's error text, say) is cut to fit instead of being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_hand_back_reason_is_cut_to_fit() {
    let mut c = Cluster::new(1, 20_000).await;
    crate::harness::create_service(c.node(1)).await;
    let client = eddy::client::QueueClient::new(&c.node(1).http_addr.to_string(), "svc", "");
    let none = std::collections::BTreeMap::new();
    client
        .put(bytes::Bytes::from_static(b"payload"), &none, 0)
        .await
        .unwrap();
    let read = eddy::protocol::GetOp {
        from_index: Some(0),
        length: 1,
        timeout: std::time::Duration::ZERO,
        raw: Some(false),
        auto_delete: false,
    };
    let taken = client.get(&read, &none).await.unwrap();
    assert_eq!(taken.len(), 1);
    // Multi-byte characters across the cut.
    let reason = "é".repeat(3_000);
    client
        .negative(&[taken[0].index], "ModelError", &reason)
        .await
        .expect("the hand-back is accepted");
    assert_eq!(eddy::protocol::truncate(&reason, 1024).len(), 1024);
    assert_eq!(eddy::protocol::truncate("éé", 3), "é");
    c.stop(1).await;
}

/// Send `head` and the first `body` bytes of a request on a new connection
/// and leave it open (the rest of the body never comes).
async fn half_sent(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s
}

/// The status line of the answer on `s`, if the headers of one arrive
/// within `limit`.
async fn status_within(
    s: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.lines()
        .next()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
}

/// The engine's synchronous endpoint checks the token and takes a place
/// before it reads a byte of the body, then reads at most its limit: an
/// unauthenticated request is answered 401 while its body is still on the
/// way, one declaring more than the limit 413, and callers beyond the
/// engine's concurrency 429 at once even while the places are held by
/// bodies that never finish. Those callers hold no slot of the concurrency
/// budget, so queue work goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_sync_endpoint_checks_token_and_place_before_reading_the_body() {
    use std::time::Duration;

    let mut c = Cluster::new(1, 20_000).await;
    crate::harness::create_service(c.node(1)).await;
    let serve = |app: axum::Router| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(eddy::api::serve(listener, app, std::future::pending()));
        addr
    };
    let model = serve(eddy::api::demo_model_router(eddy::api::DemoModel {
        delay: Duration::from_millis(200),
        ..Default::default()
    }))
    .await;
    let engine = eddy::engine::Engine::new(eddy::engine::EngineSettings {
        endpoints: vec![c.node(1).http_addr.to_string()],
        service: "svc".into(),
        token: "svc-token".into(),
        model: format!("http://{model}"),
        concurrency: 2,
        prefetch: 0,
        group: "engine".into(),
        instance: "engine-1".into(),
        request_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(1),
        eddy_timeouts: Default::default(),
    })
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(engine.clone().run(async move {
        let _ = stopped.await;
    }));
    let limit = 1024 * 1024;
    let sync = serve(eddy::api::sync_router(engine.clone(), "svc".into(), limit)).await;
    let request = |token: &str, length: u64| {
        format!(
            "POST /api/predict/svc HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\
             Content-Length: {length}\r\n\r\n"
        )
    };
    let prompt = Duration::from_secs(3);

    // No token, a body within the limit still on the way: 401 now.
    let mut s = half_sent(sync, &request("wrong", 512 * 1024), &[b'x'; 64 * 1024]).await;
    let status = status_within(&mut s, prompt).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 401 Unauthorized"));
    // More than the limit declared: 413 before reading.
    let mut s = half_sent(sync, &request("svc-token", limit + 1), b"[").await;
    let status = status_within(&mut s, prompt).await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 413 Payload Too Large"));

    // Every place taken by bodies that never finish (with concurrency 2,
    // one place: half the budget stays with queue work).
    assert_eq!(engine.sync_places(), 1);
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(half_sent(sync, &request("svc-token", 512 * 1024), b"[{").await);
    }
    let body = br#"[{"a": 1}]"#;
    let full = |token: &str| {
        format!(
            "{}{}",
            request(token, body.len() as u64),
            String::from_utf8_lossy(body)
        )
    };
    // The held requests take their places as soon as they are parsed.
    eventually("every place held", Duration::from_secs(10), || {
        engine.sync_places_free() == 0
    })
    .await;
    let mut s = half_sent(sync, &full("svc-token"), b"").await;
    let refused = status_within(&mut s, prompt).await;
    assert_eq!(refused.as_deref(), Some("HTTP/1.1 429 Too Many Requests"));

    // Queue work is served meanwhile: an item put now gets its result.
    let client = eddy::client::QueueClient::new(&c.node(1).http_addr.to_string(), "svc", "");
    client
        .put(
            bytes::Bytes::from_static(br#"[{"x": 1}]"#),
            &Default::default(),
            0,
        )
        .await
        .unwrap();
    let sink_len = || {
        c.node(1)
            .node
            .read(|s| s.service("svc").map_or(0, |svc| svc.sink.len()))
    };
    eventually("the result in the sink", Duration::from_secs(10), || {
        sink_len() > 0
    })
    .await;
    assert_eq!(
        sink_len(),
        1,
        "queue work waited for the synchronous callers"
    );

    // Once the held callers go, their places are free again.
    drop(held);
    eventually("every place free", Duration::from_secs(10), || {
        engine.sync_places_free() == engine.sync_places()
    })
    .await;
    let mut s = half_sent(sync, &full("svc-token"), b"").await;
    let served = status_within(&mut s, prompt).await;
    assert_eq!(served.as_deref(), Some("HTTP/1.1 200 OK"));

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
    c.stop(1).await;
}
