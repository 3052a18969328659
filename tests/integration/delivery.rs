//! Delivery under faults, in process: consumer liveness reconciliation,
//! the lease that makes a cut-off node close its watchers before anyone
//! redelivers, and the leader's clock on every envelope.

use std::time::{Duration, Instant};

use eddy::queue::{Command, ConsumerSpec, Envelope, QueueKind, QueueRef, Reply, Tags};

use crate::cluster::{Cluster, create_service};

fn svc_input() -> QueueRef {
    QueueRef::new("svc", QueueKind::Input)
}

/// Wait (bounded) until `f` holds, polling.
async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {within:?}");
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
/// its lease within `lease()` (shorter than `node_lost_ms`, so before the
/// majority would redelivers its consumers' items): it refuses watchers and
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
    let lease = c.node(follower).node.lease();
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
        cut_off_at.elapsed() < node_lost + Duration::from_millis(100),
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
