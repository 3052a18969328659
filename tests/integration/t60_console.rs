//! The web console (`/ui`) and the operator endpoints it uses, through the
//! router of an in-process three-node cluster: what each page shows, who
//! may read it and who may act, requeueing a dead letter, draining a node.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use eddy::queue::{Command, ConsumerSpec, Reply, ServiceConfig, Tags};

use crate::harness::*;

const ADMIN: &str = "test-admin-token";

/// A consumer attached through a node that does not exist: it holds what
/// it is given for as long as the test runs (no node detaches it).
fn far_consumer(group: &str, user: &str, window: u32) -> Command {
    Command::Attach {
        queue: svc_input(),
        consumer: ConsumerSpec {
            group: group.into(),
            user: user.into(),
            node: 99,
            connection: 1,
            window,
            auto_commit: false,
            index_only: false,
            tags: Tags::new(),
            start_index: Some(0),
        },
    }
}

fn request_id_of(c: &Cluster, index: u64) -> String {
    c.node(1).node.read(|s| {
        let q = s.queue(&svc_input()).unwrap();
        q.items
            .get(&index)
            .or_else(|| q.dead.get(&index))
            .unwrap()
            .request_id
            .to_string()
    })
}

/// Service "svc" (one delivery before dead-lettering) with five items:
/// item 1 dead-lettered, items 2 and 3 held by group "workers" (w1 and w2,
/// window 1 each), item 2 also held by group "audit" (window 1).
async fn cluster_with_a_backlog() -> Cluster {
    let c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let config = ServiceConfig {
        max_delivery: 1,
        ..ServiceConfig::default()
    };
    create_service_with(c.node(leader), config).await;
    for i in 1..=5 {
        put(c.node(leader), &format!("item {i}")).await;
    }
    let node = &c.node(leader).node;
    node.propose(far_consumer("workers", "w1", 1))
        .await
        .unwrap();
    // Item 1 went to w1; handing it back dead-letters it (one delivery).
    let back = Command::Negative {
        queue: svc_input(),
        group: "workers".into(),
        indexes: vec![1],
        code: "500".into(),
        reason: "model <b>crashed</b>".into(),
    };
    assert_eq!(node.propose(back).await.unwrap(), Reply::Done);
    node.propose(far_consumer("workers", "w2", 1))
        .await
        .unwrap();
    node.propose(far_consumer("audit", "a1", 1)).await.unwrap();
    // A group named by a client with characters a metric label escapes;
    // it attaches with a window of 0 and takes nothing.
    node.propose(far_consumer("odd\"group\\", "o1", 0))
        .await
        .unwrap();
    eventually(
        "every node applied the backlog",
        Duration::from_secs(5),
        || {
            (1..=3).all(|id| {
                c.node(id).node.accepts_watchers()
                    && c.node(id).node.read(|s| {
                        s.queue(&svc_input())
                            .is_some_and(|q| q.dead.len() == 1 && q.in_flight_count() == 3)
                    })
            })
        },
    )
    .await;
    c
}

/// A form posted from the console's own page, as a browser sends it.
fn form(path: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("host", "127.0.0.1:8080")
        .header("origin", "http://127.0.0.1:8080")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn get_page(c: &Cluster, id: u64, path: &str) -> (StatusCode, String) {
    call(c, id, [10, 0, 0, 9], "GET", path, None, "").await
}

/// Polls `/readyz` on node `id` until it answers 200; panics with the last
/// answer if it does not within `within`.
async fn assert_ready_within(c: &Cluster, id: u64, within: Duration) {
    let start = std::time::Instant::now();
    loop {
        let (status, text) = get_page(c, id, "/readyz").await;
        if status == StatusCode::OK {
            return;
        }
        assert!(
            start.elapsed() < within,
            "node {id} not ready within {within:?}: {status} {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_show_the_cluster_the_services_and_one_service() {
    let c = cluster_with_a_backlog().await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();

    // Cluster, from a follower: every member answered, the leader named.
    let (status, html) = get_page(&c, follower, "/ui").await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains(&format!("node {follower}")), "{html}");
    assert!(html.contains(&format!("id=\"leader\">{leader}<")), "{html}");
    for id in 1..=3 {
        assert!(html.contains(&format!("id=\"member-{id}\"")), "{html}");
    }
    assert_eq!(
        html.matches("<td class=\"ok\">yes</td>").count(),
        3,
        "{html}"
    );
    assert!(!html.contains("id=\"no-leader\""));

    // Services: the input holds 4 items, 3 in flight (2 groups), 1 dead letter.
    let (status, html) = get_page(&c, follower, "/ui/services").await;
    assert_eq!(status, StatusCode::OK);
    let row = html
        .split("<tr id=\"svc-svc-input\">")
        .nth(1)
        .unwrap()
        .split("</tr>")
        .next()
        .unwrap();
    assert!(row.contains("<td class=\"n length\">4</td>"), "{row}");
    assert!(row.contains("<td class=\"n in-flight\">3</td>"), "{row}");
    assert!(row.contains("<td class=\"n consumers\">4</td>"), "{row}");
    assert!(row.contains("<td class=\"n dead-letters\">1</td>"), "{row}");
    assert!(row.contains("3 / 3 (100%)"), "{row}");

    // One service: consumers of both groups, the dead letter with its reason.
    let dead_id = request_id_of(&c, 1);
    let (status, html) = get_page(&c, follower, "/ui/services/svc").await;
    assert_eq!(status, StatusCode::OK);
    for user in ["w1", "w2", "a1"] {
        assert!(html.contains(&format!("<td>{user}</td>")), "{user}: {html}");
    }
    assert!(html.contains("<td class=\"group\">audit</td>"));
    let dead = html.split("id=\"input-dead-letters\"").nth(1).unwrap();
    // Text from clients is escaped, never markup.
    assert!(
        dead.contains(&dead_id) && dead.contains("500: model &lt;b&gt;crashed&lt;/b&gt;"),
        "{dead}"
    );
    assert!(!html.contains("<b>crashed"));
    // Items 2..=5 are listed, oldest first, with who holds them.
    let items = html.split("id=\"input-items\"").nth(1).unwrap();
    assert!(
        items.contains("workers/w2") && items.contains("audit/a1"),
        "{items}"
    );
    assert!(!html.contains("item 2"), "payloads are never shown");

    // Where a request is.
    let (_, html) = get_page(
        &c,
        follower,
        &format!("/ui/services/svc?request_id={dead_id}"),
    )
    .await;
    let lookup = html.split("id=\"lookup\"").nth(1).unwrap();
    assert!(lookup.contains("input dead letter 1"), "{lookup}");
    let held = request_id_of(&c, 2);
    let (_, html) = get_page(&c, follower, &format!("/ui/services/svc?request_id={held}")).await;
    assert!(
        html.contains("input item 2: in flight to audit/a1, workers/w1"),
        "{html}"
    );

    let (status, _) = get_page(&c, follower, "/ui/services/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The same figures as metrics and in _attrs_ (autoscaling signals).
    let (_, metrics) = get_page(&c, follower, "/metrics").await;
    assert!(
        metrics.contains("eddy_queue_window_occupancy{service=\"svc\",queue=\"input\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "eddy_group_in_flight{service=\"svc\",queue=\"input\",group=\"workers\"} 2\n"
        )
    );
    assert!(metrics.contains("eddy_node_ready 1\n"));
    assert!(
        metrics.contains(
            "eddy_group_in_flight{service=\"svc\",queue=\"input\",group=\"odd\\\"group\\\\\"} 0\n"
        ),
        "{metrics}"
    );
    let (_, attrs) = call(
        &c,
        follower,
        [10, 0, 0, 9],
        "GET",
        "/api/predict/svc?_attrs_=true",
        None,
        "",
    )
    .await;
    let attrs: serde_json::Value = serde_json::from_str(&attrs).unwrap();
    // Items 2..=5 are live: "workers" holds 2 and 3 (2 left to give),
    // "audit" holds 2 (3 left), the odd group took nothing (4 left): the
    // backlog is the busiest group's.
    assert_eq!(attrs["stream.backlog"], "4");
    // Outstanding: "audit" and the odd group have 4 unfinished each.
    assert!(metrics.contains("eddy_queue_outstanding{service=\"svc\",queue=\"input\"} 4\n"));
    for (group, backlog) in [("workers", 2), ("audit", 3)] {
        assert!(
            metrics.contains(&format!(
                "eddy_group_backlog{{service=\"svc\",queue=\"input\",group=\"{group}\"}} {backlog}\n"
            )),
            "{group}"
        );
    }
    assert_eq!(attrs["stream.windowOccupancy"], "1.000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_actions_need_the_admin_token_a_confirmation_and_this_origin() {
    let c = cluster_with_a_backlog().await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let dead_id = request_id_of(&c, 1);
    let requeue = "service=svc&queue=input&index=1&confirm=yes";

    // The confirmation page is a form; reading it changes nothing.
    let (status, html) = get_page(
        &c,
        follower,
        "/ui/confirm/requeue-dead-letters?service=svc&queue=input&index=1",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("name=\"admin_token\"") && html.contains("name=\"confirm\""));

    let (status, _, body) = send(
        &c,
        follower,
        form("/ui/actions/requeue-dead-letters", requeue),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token: {body:?}");
    let wrong = format!("{requeue}&admin_token=not-the-token");
    let (status, _, _) = send(
        &c,
        follower,
        form("/ui/actions/requeue-dead-letters", &wrong),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let unconfirmed = format!("service=svc&queue=input&index=1&admin_token={ADMIN}");
    let (status, _, _) = send(
        &c,
        follower,
        form("/ui/actions/requeue-dead-letters", &unconfirmed),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let good = format!("{requeue}&admin_token={ADMIN}");
    let mut cross_site = form("/ui/actions/requeue-dead-letters", &good);
    cross_site
        .headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    let (status, _, _) = send(&c, follower, cross_site).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A post that names no origin at all (not from a browser's page).
    let mut no_origin = form("/ui/actions/requeue-dead-letters", &good);
    no_origin.headers_mut().remove("origin");
    let (status, _, _) = send(&c, follower, no_origin).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A browser that sends no Origin but says the form is its own page's.
    let mut same_site_fetch = form("/ui/actions/requeue-dead-letters", &unconfirmed);
    same_site_fetch.headers_mut().remove("origin");
    same_site_fetch
        .headers_mut()
        .insert("sec-fetch-site", "same-origin".parse().unwrap());
    let (status, _, _) = send(&c, follower, same_site_fetch).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "past the origin check, refused as unconfirmed"
    );
    assert_eq!(
        c.node(follower)
            .node
            .read(|s| s.queue(&svc_input()).unwrap().dead.len()),
        1,
        "refused actions changed nothing"
    );

    // Requeued through a follower: a new item with the same request id.
    let same_site = form("/ui/actions/requeue-dead-letters", &good);
    let (status, _, body) = send(&c, follower, same_site).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("1 dead letter(s) of svc requeued, now items 6."),
        "{body}"
    );
    eventually(
        "the requeued item on every node",
        Duration::from_secs(5),
        || {
            (1..=3).all(|id| {
                c.node(id).node.read(|s| {
                    let q = s.queue(&svc_input()).unwrap();
                    q.dead.is_empty()
                        && q.items
                            .get(&6)
                            .is_some_and(|it| it.request_id == *dead_id && it.deliveries == 0)
                })
            })
        },
    )
    .await;

    // That dead letter is gone: a clear refusal, nothing changes.
    let (status, _, body) = send(
        &c,
        follower,
        form("/ui/actions/requeue-dead-letters", &good),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("has no dead letter at index 1"));

    // Create and delete a service from the console.
    let create = format!("service=made-here&token=&max_length=10&confirm=yes&admin_token={ADMIN}");
    let (status, _, body) = send(&c, follower, form("/ui/actions/create-service", &create)).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let max_length = |c: &Cluster| {
        c.node(follower).node.read(|s| {
            s.service("made-here")
                .map(|svc| svc.config.input.max_length)
        })
    };
    eventually(
        "the service on the follower",
        Duration::from_secs(5),
        || max_length(&c) == Some(10),
    )
    .await;
    let (status, _, _) = send(&c, follower, form("/ui/actions/create-service", &create)).await;
    assert_eq!(status, StatusCode::CONFLICT, "a second create is refused");
    let delete = format!("service=made-here&confirm=yes&admin_token={ADMIN}");
    let (status, _, _) = send(&c, follower, form("/ui/actions/delete-service", &delete)).await;
    assert_eq!(status, StatusCode::OK);
    eventually(
        "the service gone on the follower",
        Duration::from_secs(5),
        || max_length(&c).is_none(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_takes_no_watches_and_is_not_ready_until_undrained() {
    let c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    let [a, b] = {
        let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        [others[0], others[1]]
    };
    // Readiness also needs a lease and a caught-up log, which a loaded
    // machine can take a moment to give every member after the election.
    assert_ready_within(&c, a, Duration::from_secs(10)).await;
    assert_ready_within(&c, b, Duration::from_secs(10)).await;
    // Drain node b from node a's console.
    let drain = format!("node={b}&confirm=yes&admin_token={ADMIN}");
    let (status, _, body) = send(&c, a, form("/ui/actions/drain-node", &drain)).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (status, text) = get_page(&c, b, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("draining"), "{text}");
    let watch = Request::builder()
        .uri("/api/predict/svc?_watch_=true&_window_=1")
        .header("x-eas-queueservice-group", "g")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&c, b, watch).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    let (_, metrics) = get_page(&c, b, "/metrics").await;
    assert!(metrics.contains("eddy_node_draining 1\n") && metrics.contains("eddy_node_ready 0\n"));
    // Node a is untouched; the admin endpoint undrains b.
    let (_, text) = get_page(&c, a, "/readyz").await;
    assert!(!text.contains("draining"), "{text}");
    assert_ready_within(&c, a, Duration::from_secs(10)).await;
    let (status, _) = call(
        &c,
        b,
        [10, 0, 0, 9],
        "DELETE",
        "/admin/node/drain",
        Some(ADMIN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, text) = get_page(&c, b, "/readyz").await;
    assert!(!text.contains("draining"), "{text}");
    assert_ready_within(&c, b, Duration::from_secs(10)).await;
    let (status, _) = call(&c, b, [10, 0, 0, 9], "POST", "/admin/node/drain", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_status_token_the_console_asks_for_it_and_takes_it_as_a_basic_password() {
    use base64::Engine as _;
    let c = Cluster::configured(1, |c| c.config.status_token = "status-secret".into()).await;
    let (status, headers, _) = send(
        &c,
        1,
        Request::builder().uri("/ui").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Basic realm=\"eddy\"");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("anyone:status-secret")
    );
    for path in ["/ui", "/ui/services", "/metrics"] {
        let (status, _) = call(&c, 1, [10, 0, 0, 9], "GET", path, Some(&basic), "").await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("anyone:guess")
    );
    let (status, _) = call(&c, 1, [10, 0, 0, 9], "GET", "/ui", Some(&wrong), "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// With no admin token (a single node on a laptop), console actions are
/// open to this machine only, and only through a loopback name: a page
/// served under another name that resolves here (DNS rebinding) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_console_actions_need_a_loopback_host() {
    let c = Cluster::new(1, 20_000).await;
    let create = "service=local&confirm=yes&admin_token=";
    let local = |host: &str, origin: &str| {
        let mut req = form("/ui/actions/create-service", create);
        req.headers_mut().insert("host", host.parse().unwrap());
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                40_000,
            ))));
        req
    };
    let (status, _, body) = send(
        &c,
        1,
        local("rebound.example:8080", "http://rebound.example:8080"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body:?}");
    assert!(c.node(1).node.read(|s| s.service("local").is_none()));
    for (host, origin) in [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("localhost:8080", "http://localhost:8080"),
    ] {
        let (status, _, body) = send(&c, 1, local(host, origin)).await;
        let body = String::from_utf8_lossy(&body);
        assert!(
            status == StatusCode::OK
                || (status == StatusCode::CONFLICT && host.starts_with("localhost")),
            "{host}: {status} {body}"
        );
    }
    assert!(c.node(1).node.read(|s| s.service("local").is_some()));
}
