//! The EAS HTTP API driven in process through the router
//! (`Router::oneshot`) and over a WebSocket: status codes, headers and
//! bodies of puts, reads, deletes and watches, and admission limits.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use eddy::protocol::{HEADER_GROUP, HEADER_USER, REQUEST_ID_HEADER};
use eddy::queue::ServiceConfig;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite;

use crate::harness::*;

fn request(method: &str, uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::from(body.to_string()))
        .unwrap()
}

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next data frame of a protobuf watch (bounded wait).
async fn next_frame(ws: &mut WebSocket) -> eddy::proto::DataFrameProto {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(tungstenite::Message::Binary(b)))) => {
                return eddy::proto::DataFrameProto::decode(b).unwrap();
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no frame: {other:?}"),
        }
    }
}

fn input_length(c: &Cluster) -> usize {
    c.node(1)
        .node
        .read(|s| s.queue(&svc_input()).map_or(0, |q| q.len()))
}

/// A put answers its bare index (no newline) and the request id header;
/// the item reads back by index as the JSON frame list the SDKs expect,
/// tagged with that request id, and `_attrs_` counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_answers_its_index_and_request_id_and_reads_back() {
    let c = Cluster::new(1, 20_000).await;
    create_service(c.node(1)).await;
    let (status, headers, body) = send(&c, 1, request("POST", "/api/predict/svc", "abc")).await;
    assert_eq!(status, StatusCode::OK);
    let index: u64 = std::str::from_utf8(&body)
        .unwrap()
        .parse()
        .expect("a bare index");
    let request_id = headers[REQUEST_ID_HEADER].to_str().unwrap().to_string();
    assert!(!request_id.is_empty());

    let uri =
        format!("/api/predict/svc?_index_={index}&_length_=1&_raw_=false&_auto_delete_=false");
    let (status, _, body) = send(&c, 1, request("GET", &uri, "")).await;
    assert_eq!(status, StatusCode::OK);
    let frames: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(frames[0]["index"].as_u64(), Some(index), "{frames}");
    assert_eq!(frames[0]["data"], "YWJj", "base64 of the payload: {frames}");
    assert_eq!(frames[0]["tags"]["requestId"], request_id.as_str());

    let (status, _, body) = send(&c, 1, request("GET", "/api/predict/svc?_attrs_=true", "")).await;
    assert_eq!(status, StatusCode::OK);
    let attrs: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(attrs["stream.length"], "1", "{attrs}");
}

/// A put that reaches a node while it shuts down cleanly is told so, with
/// 503: not that the node stopped after a storage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_a_node_shutting_down_is_told_so() {
    let c = Cluster::new(1, 20_000).await;
    create_service(c.node(1)).await;
    c.node(1).node.shutdown().await;
    let (status, _, body) = send(&c, 1, request("POST", "/api/predict/svc", "abc")).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("shutting down"), "{text}");
}

/// Bad input gets a clear error with the right status and a text body,
/// and nothing already stored changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let c = Cluster::new(1, 20_000).await;
    let limits = eddy::queue::QueueLimits {
        max_payload_bytes: 16,
        ..Default::default()
    };
    create_service_with(
        c.node(1),
        ServiceConfig {
            token: "the-token".into(),
            input: limits.clone(),
            sink: limits,
            ..Default::default()
        },
    )
    .await;
    let with_token = |method: &str, uri: &str, body: &str| {
        let mut req = request(method, uri, body);
        req.headers_mut()
            .insert("authorization", "the-token".parse().unwrap());
        req
    };
    let (status, _, _) = send(&c, 1, with_token("POST", "/api/predict/svc", "keep")).await;
    assert_eq!(status, StatusCode::OK);
    let cases = [
        (
            with_token("POST", "/api/predict/svc", &"x".repeat(17)),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            request("POST", "/api/predict/svc", "x"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            with_token("POST", "/api/predict/no-such-service", "x"),
            StatusCode::NOT_FOUND,
        ),
        (
            with_token("GET", "/api/predict/svc?_index_=abc", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            with_token("GET", "/api/predict/svc?_timeout_=forever", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            with_token("PUT", "/api/predict/svc?_indexes_=1,x", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            with_token("DELETE", "/api/predict/svc?_indexes_=-1", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            with_token("POST", "/api/predict/svc?_priority_=high", "x"),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (req, expected) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, _, body) = send(&c, 1, req).await;
        assert_eq!(
            status,
            expected,
            "{what}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(!body.is_empty(), "{what}: an error has a text body");
    }
    assert_eq!(input_length(&c), 1, "the stored item is untouched");
}

/// A WebSocket watch, in process over the node's listener: a watcher with
/// window 1 gets one item, the next only after it commits the first, and
/// the frames are the protobuf `DataFrameProto` the SDKs decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_watch_holds_at_most_its_window_and_a_commit_frees_the_slot() {
    use tungstenite::client::IntoClientRequest;

    let c = Cluster::new(1, 20_000).await;
    let node = c.node(1);
    create_service(node).await;
    let first = put(node, "one").await;
    let second = put(node, "two").await;
    // A node takes watchers once it has announced its start.
    eventually("the node accepts watchers", Duration::from_secs(10), || {
        node.node.accepts_watchers()
    })
    .await;

    let url = format!(
        "ws://{}/api/predict/svc?_watch_=true&_window_=1&_index_=0",
        node.http_addr
    );
    let mut req = url.into_client_request().unwrap();
    let headers = req.headers_mut();
    headers.insert(HEADER_USER, "worker-1".parse().unwrap());
    headers.insert(HEADER_GROUP, "eas".parse().unwrap());
    headers.insert("accept", eddy::proto::PROTOBUF_MEDIA_TYPE.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let frame = next_frame(&mut ws).await;
    assert_eq!((frame.index, frame.data.as_ref()), (first, &b"one"[..]));
    assert_eq!(frame.deliveries, 1, "a first delivery says so");

    // The window is full: the second item waits (the state shows it ready,
    // and nothing more arrives while a ping is answered).
    ws.send(tungstenite::Message::Ping(b"p".to_vec().into()))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(tungstenite::Message::Pong(p)))) => assert_eq!(p.as_ref(), b"p"),
        other => panic!("expected the pong before any second frame: {other:?}"),
    }
    let held = node.node.read(|s| {
        s.queue(&svc_input())
            .map(|q| q.groups["eas"].in_flight.len())
    });
    assert_eq!(held, Some(1), "one item out to a window of 1");

    let commit = Request::builder()
        .method("PUT")
        .uri(format!("/api/predict/svc?_indexes_={first}"))
        .header(HEADER_USER, "worker-1")
        .header(HEADER_GROUP, "eas")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&c, 1, commit).await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"OK"[..]));
    let frame = next_frame(&mut ws).await;
    assert_eq!((frame.index, frame.data.as_ref()), (second, &b"two"[..]));
    assert_eq!(
        frame.tags.get("requestId").map(|s| s.is_empty()),
        Some(false)
    );
    ws.close(None).await.unwrap();
}

/// Delivery under faults, memory: the replies the de-duplication table keeps
/// for retries count against the node's memory limit, so a node whose
/// table is full answers puts 429 (old code: the table, up to 64 MiB of
/// take replies, was not counted and puts went on being admitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dedup_table_makes_puts_answer_429() {
    let limit = 24 * 1024 * 1024;
    let c = Cluster::configured(1, |c| c.config.max_memory_bytes = limit).await;
    let node = c.node(1);
    create_service_with(node, ServiceConfig::default()).await;
    let call = |req: Request<Body>| {
        let c = &c;
        async move {
            let (status, _, body) = send(c, 1, req).await;
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

/// Long polls that take (`_auto_delete_=true`) wait without writing to the
/// log: a change to another service wakes them, but only an item they can
/// take makes them propose (old code: every wake-up of every waiting take
/// proposed a `Take`, so 20 waiting pollers turned 10 puts on an unrelated
/// service into some 200 fsynced log entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_takes_write_nothing_to_the_log_while_other_queues_change() {
    let c = Cluster::new(1, 20_000).await;
    let node = c.node(1);
    create_service(node).await;
    let other = eddy::queue::Command::CreateService {
        name: "other".into(),
        config: ServiceConfig::default(),
    };
    node.node.propose_admin(other).await.unwrap();
    // The node's own start announcement is written before anything is
    // measured.
    eventually(
        "the node announced its start",
        Duration::from_secs(10),
        || node.node.accepts_watchers(),
    )
    .await;
    // Commands, not log entries: concurrent proposals share entries.
    let commands_logged = || c.node(1).node.read(|s| s.commands_remembered() as u64);
    let before = commands_logged();
    let pollers: Vec<_> = (0..20)
        .map(|_| {
            let app = eddy::api::router(node.app_state.clone());
            tokio::spawn(async move {
                use tower::ServiceExt;
                let req = request(
                    "GET",
                    "/api/predict/svc?_auto_delete_=true&_timeout_=3s&_raw_=false",
                    "",
                );
                app.oneshot(req).await.unwrap().status()
            })
        })
        .collect();
    // Each poller's first try is one take.
    eventually("every poller tried once", Duration::from_secs(10), || {
        commands_logged() >= before + 20
    })
    .await;
    let waiting = commands_logged();
    for i in 0..10 {
        let put = request("POST", "/api/predict/other", &format!("x{i}"));
        let (status, _, _) = send(&c, 1, put).await;
        assert_eq!(status, StatusCode::OK);
    }
    // The pollers woke for each put; give them time to act on it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The 10 puts, and room for a command of the node's own housekeeping.
    let written = commands_logged() - waiting;
    assert!(
        written <= 12,
        "10 puts elsewhere wrote {written} commands to the log while 20 takes waited"
    );
    // An item they can take is taken by exactly one of them.
    let (status, _, _) = send(&c, 1, request("POST", "/api/predict/svc", "job")).await;
    assert_eq!(status, StatusCode::OK);
    let mut statuses = Vec::new();
    for p in pollers {
        statuses.push(p.await.unwrap());
    }
    let taken = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let empty = statuses
        .iter()
        .filter(|s| **s == StatusCode::NO_CONTENT)
        .count();
    assert_eq!((taken, empty), (1, 19), "{statuses:?}");
    assert_eq!(input_length(&c), 0);
}

/// A put's W3C trace context: the header is kept as the item's
/// `traceparent` tag (over one given as a tag), a malformed header is
/// ignored, a malformed tag is refused, and the header counts toward the
/// tag limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_travels_with_the_item_and_a_malformed_tag_is_refused() {
    let c = Cluster::new(1, 20_000).await;
    create_service(c.node(1)).await;
    let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tag = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let put = |query: String, traceparent: Option<&str>| {
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("/api/predict/svc{query}"));
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        req.body(Body::from("x")).unwrap()
    };
    let tag_of = |index: u64| {
        c.node(1).node.read(|s| {
            s.queue(&svc_input()).unwrap().items[&index]
                .tag("traceparent")
                .map(str::to_string)
        })
    };
    let index_of = |body: &bytes::Bytes| std::str::from_utf8(body).unwrap().parse::<u64>().unwrap();
    let (status, _, body) = send(&c, 1, put(String::new(), Some(header))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tag_of(index_of(&body)).as_deref(), Some(header));
    let (status, _, body) = send(&c, 1, put(format!("?traceparent={tag}"), Some(header))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        tag_of(index_of(&body)).as_deref(),
        Some(header),
        "the header wins"
    );
    let (status, _, body) = send(&c, 1, put(format!("?traceparent={tag}"), Some("garbage"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        tag_of(index_of(&body)).as_deref(),
        Some(tag),
        "a malformed header is ignored"
    );
    let (status, _, body) = send(&c, 1, put(String::new(), Some("00-xyz"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tag_of(index_of(&body)), None);
    let before = input_length(&c);
    let (status, _, body) = send(&c, 1, put("?traceparent=00-bad".into(), None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
    let full: String = (0..32).map(|i| format!("&t{i}=v")).collect();
    let (status, _, body) = send(&c, 1, put(format!("?{}", &full[1..]), Some(header))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
    assert_eq!(input_length(&c), before, "refused puts change nothing");
}

/// A batch of completes (`_complete_=batch`) answers each item with what a
/// single `_complete_` would have answered (written, a duplicate, commit
/// only, another request's input, an input that is gone, a refused tag),
/// in order, and changes exactly what those singles would have; a batch
/// refused as a whole (not the sink, a body that does not decode, too many
/// items, too large) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_completes_answers_each_item_as_a_single_complete_would() {
    use eddy::proto::{CompleteBatchProto, CompleteBatchReplyProto, CompleteProto};

    let c = Cluster::new(1, 20_000).await;
    let sink_limits = eddy::queue::QueueLimits {
        max_payload_bytes: 20_000,
        ..Default::default()
    };
    create_service_with(
        c.node(1),
        ServiceConfig {
            sink: sink_limits,
            ..Default::default()
        },
    )
    .await;
    let mut inputs = Vec::new();
    for data in ["a", "b", "c", "d"] {
        let (status, headers, body) = send(&c, 1, request("POST", "/api/predict/svc", data)).await;
        assert_eq!(status, StatusCode::OK);
        let index: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
        inputs.push((
            index,
            headers[REQUEST_ID_HEADER].to_str().unwrap().to_string(),
        ));
    }
    let [(a, ra), (b, _), (c_index, rc), (d, rd)] = inputs.try_into().unwrap();
    let (status, _, _) = send(
        &c,
        1,
        request("DELETE", &format!("/api/predict/svc?_indexes_={d}"), ""),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let sink_length = |c: &Cluster| {
        c.node(1).node.read(|s| {
            s.queue(&eddy::queue::QueueRef::new(
                "svc",
                eddy::queue::QueueKind::Sink,
            ))
            .map_or(0, |q| q.len())
        })
    };
    let item = |index: u64, request_id: &str, extra: &[(&str, &str)], result: &str| {
        let mut tags: std::collections::HashMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if !request_id.is_empty() {
            tags.insert("requestId".into(), request_id.into());
        }
        CompleteProto {
            input_index: index,
            tags,
            result: bytes::Bytes::from(result.to_string()),
        }
    };
    let batch_request = |uri: &str, body: Vec<u8>| {
        Request::builder()
            .method("POST")
            .uri(uri)
            .header(HEADER_GROUP, "eas")
            .header(HEADER_USER, "engine-1")
            .body(Body::from(body))
            .unwrap()
    };
    let sink_batch = "/api/predict/svc/sink?_complete_=batch";
    let outcomes = |body: &[u8]| {
        CompleteBatchReplyProto::decode(body)
            .unwrap()
            .outcomes
            .into_iter()
            .map(|o| (o.status, o.sink_index > 0, o.duplicate, o.error))
            .collect::<Vec<_>>()
    };

    // Refused as a whole: nothing changes.
    let too_many = CompleteBatchProto {
        items: (0..=eddy::protocol::MAX_COMPLETE_BATCH as u64)
            .map(|_| item(a, &ra, &[], ""))
            .collect(),
    };
    let too_large = CompleteBatchProto {
        items: vec![item(a, &ra, &[], &"x".repeat(20_001))],
    };
    let one = CompleteBatchProto {
        items: vec![item(a, &ra, &[], "r")],
    };
    for (uri, body, expected) in [
        (
            "/api/predict/svc?_complete_=batch",
            one.encode_to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            sink_batch,
            b"\xff\xff\xff".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            sink_batch,
            too_many.encode_to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            sink_batch,
            too_large.encode_to_vec(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "/api/predict/svc/sink?_complete_=batches",
            one.encode_to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/predict/svc/sink?_complete_=batch&requestId=x",
            one.encode_to_vec(),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, _, body) = send(&c, 1, batch_request(uri, body)).await;
        assert_eq!(
            status,
            expected,
            "{uri}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(!body.is_empty(), "{uri}: an error has a text body");
    }
    assert_eq!((input_length(&c), sink_length(&c)), (3, 0));

    let batch = CompleteBatchProto {
        items: vec![
            item(a, &ra, &[("lastCode", "201")], "result a"),
            item(b, &rc, &[], "not b's"),
            item(d, &rd, &[], "gone"),
            item(0, &rc, &[], "no index"),
            item(c_index, "", &[], "no request id"),
            item(c_index, &rc, &[("_x_", "y")], "a control key"),
            item(
                c_index,
                &rc,
                &[("traceparent", "nope")],
                "a bad traceparent",
            ),
        ],
    };
    let (status, headers, body) =
        send(&c, 1, batch_request(sink_batch, batch.encode_to_vec())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/vnd.google.protobuf");
    let got = outcomes(&body);
    let statuses: Vec<u32> = got.iter().map(|o| o.0).collect();
    assert_eq!(statuses, [200, 409, 410, 400, 400, 400, 400], "{got:?}");
    assert!(got[0].1 && !got[0].2 && got[0].3.is_empty(), "{got:?}");
    assert!(
        got[1].3.contains(&rc),
        "the mismatch names the request id: {got:?}"
    );
    assert!(got[2].3.contains("not written"), "{got:?}");
    assert!(got[1..].iter().all(|o| !o.1 && !o.3.is_empty()), "{got:?}");
    assert_eq!(
        (input_length(&c), sink_length(&c)),
        (2, 1),
        "a completed, b and c kept"
    );
    let result = c.node(1).node.read(|s| {
        let sink = s
            .queue(&eddy::queue::QueueRef::new(
                "svc",
                eddy::queue::QueueKind::Sink,
            ))
            .unwrap();
        let it = sink.items.values().next().unwrap();
        (
            it.request_id.to_string(),
            it.tags().clone(),
            it.data.clone(),
        )
    });
    assert_eq!(result.0, ra);
    assert_eq!(result.1.get("lastCode").map(String::as_str), Some("201"));
    assert_eq!(&result.2[..], b"result a");

    // a again (a duplicate: nothing written), c commit only (empty result)
    let batch = CompleteBatchProto {
        items: vec![item(a, &ra, &[], "again"), item(c_index, &rc, &[], "")],
    };
    let (status, _, body) = send(&c, 1, batch_request(sink_batch, batch.encode_to_vec())).await;
    assert_eq!(status, StatusCode::OK);
    let got = outcomes(&body);
    assert_eq!(
        got.iter().map(|o| (o.0, o.1, o.2)).collect::<Vec<_>>(),
        [(200, false, true), (200, false, false)],
        "{got:?}"
    );
    assert_eq!((input_length(&c), sink_length(&c)), (1, 1));
}
