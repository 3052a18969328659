//! A cluster of several nodes: election, forwarding of writes to the
//! leader, failover, membership changes, mutual TLS between nodes, and the
//! leader's clock on every command.

use std::time::{Duration, Instant};

use bytes::Bytes;
use eddy::queue::{Command, Envelope, NewItem, Selector, ServiceConfig, Tags};

use crate::harness::*;

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
        s.queue(&svc_input()).unwrap().peek(&Selector {
            from_index: Some(0),
            length: 100,
            tags: Tags::new(),
        })
    });
    assert_eq!(frames.len(), 30);
    assert_eq!(frames[0].data, Bytes::from_static(b"f0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_side_refuses_writes() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    c.stop(others[0]).await;
    c.stop(others[1]).await;
    let r = c
        .node(leader)
        .node
        .propose_envelope(put_envelope(1), Duration::from_secs(2))
        .await;
    assert!(
        r.is_err(),
        "a lone node must not acknowledge a write: {r:?}"
    );
}

/// A proposal made where no leader can be elected waits for one between
/// its tries. Its wait for "a change of the Raft metrics" used to return at
/// once, so it tried without pause: some 50,000 tries a second, a core
/// kept busy through every election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_without_a_leader_waits_between_tries() {
    let c = one_of_three_restarted_alone().await;
    let node = &c.node(1).node;
    let before = node.proposal_retries();
    let started = std::time::Instant::now();
    let r = node
        .propose_envelope(put_envelope(1), Duration::from_secs(2))
        .await;
    let took = started.elapsed();
    let retries = node.proposal_retries() - before;
    println!("{retries} retries in {took:?} without a leader");
    assert!(
        r.is_err(),
        "a lone node of three acknowledged a write: {r:?}"
    );
    assert!(took >= Duration::from_secs(2), "gave up after {took:?}");
    // The node's retries: this write's, and its restart announcement's if
    // it restarted believing in the old leader; each retries at most every
    // 200 ms and once more per election round, some 30 in all. Retrying
    // without a pause made about 100,000.
    assert!(
        (2..=100).contains(&retries),
        "{retries} retries in {took:?} without a leader"
    );
}

/// A write waiting for a leader is written as soon as one is elected, on
/// the new leader or forwarded to it: the wait between its tries ends when
/// a leader appears, and the new leader holds a write until a quorum has
/// acknowledged it rather than refusing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_waiting_for_a_leader_is_written_once_one_is_elected() {
    let mut c = one_of_three_restarted_alone().await;
    let first = c.node(1).node.clone();
    let before = first.proposal_retries();
    let on_first = write_on(first.clone(), 1);
    eventually(
        "the write retried without a leader",
        Duration::from_secs(10),
        || first.proposal_retries() > before,
    )
    .await;
    c.restart(2).await;
    // One write on each node: whichever is elected, one of them is
    // forwarded to it.
    let on_second = write_on(c.node(2).node.clone(), 2);
    let leader = c.leader().await;
    let elected = Instant::now();
    for (node, writing) in [(1, on_first), (2, on_second)] {
        let written = tokio::time::timeout(Duration::from_secs(10), writing)
            .await
            .expect("a write still waits 10 s after the election")
            .unwrap();
        let after = elected.elapsed();
        println!("the write on node {node} (leader {leader}) written {after:?} after the election");
        assert!(
            matches!(written, Ok(eddy::queue::Reply::Put { .. })),
            "{written:?}"
        );
        // One that waited out its retry bound (200 ms) instead came 180-200
        // ms after the election: the new leader refused writes until a
        // quorum had acknowledged it, and a write forwarded to it saw no
        // change of leader to wake it.
        assert!(
            after < Duration::from_millis(150),
            "the write on node {node} (leader {leader}) written {after:?} after the election"
        );
    }
}

/// Propose `put_envelope(envelope_id)` on `node`, in a task of its own.
fn write_on(
    node: std::sync::Arc<eddy::raft::RaftNode>,
    envelope_id: u128,
) -> tokio::task::JoinHandle<Result<eddy::queue::Reply, eddy::raft::ProposeError>> {
    tokio::spawn(async move {
        node.propose_envelope(put_envelope(envelope_id), Duration::from_secs(30))
            .await
    })
}

/// A cluster of three with the test service, every node stopped, and node 1
/// started again alone: it cannot elect a leader.
async fn one_of_three_restarted_alone() -> Cluster {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    create_service(c.node(leader)).await;
    for id in 1..=3 {
        c.stop(id).await;
    }
    c.restart(1).await;
    c
}

/// A put of one small item on the test service's input.
fn put_envelope(id: u128) -> Envelope {
    Envelope {
        id,
        now_ms: 0,
        command: Command::Put {
            queue: svc_input(),
            item: NewItem {
                request_id: format!("r{id}"),
                tags: Tags::new(),
                data: Bytes::from_static(b"x"),
                priority: 0,
                path: String::new(),
            },
        },
    }
}

/// A follower forwards its writes to the leader on one stream, not a call
/// each. When its link to the leader is cut the stream ends with it (a
/// write then fails within its deadline, not later), and once the link is
/// back the next write opens a new stream at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_on_one_stream_and_opens_another_after_a_cut() {
    let c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    create_service(c.node(leader)).await;
    let node = c.node(follower).node.clone();
    for i in 0..20 {
        put(c.node(follower), &format!("one-by-one-{i}")).await;
    }
    let puts = (0..200).map(|i| put_item(c.node(follower), format!("together-{i}").into_bytes()));
    let indexes = futures::future::join_all(puts).await;
    // Each put got the answer of its own write: the item at its index.
    for (i, index) in indexes.iter().enumerate() {
        let frames = c.node(leader).node.read(|s| {
            s.queue(&svc_input()).unwrap().peek(&Selector {
                from_index: Some(*index),
                length: 1,
                tags: Tags::new(),
            })
        });
        assert_eq!(frames[0].index, *index);
        assert_eq!(frames[0].data, Bytes::from(format!("together-{i}")));
    }
    assert_eq!(
        node.forward_streams_opened(),
        1,
        "220 forwarded puts, one stream"
    );

    node.links().cut(leader);
    let started = Instant::now();
    let cut_off = node
        .propose_envelope(put_envelope(1), Duration::from_millis(500))
        .await;
    assert!(cut_off.is_err(), "written across a cut link: {cut_off:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a write across a cut link failed only after {:?}",
        started.elapsed()
    );
    node.links().heal(leader);
    let started = Instant::now();
    node.propose_envelope(put_envelope(2), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "the first write after the cut healed took {:?}",
        started.elapsed()
    );
    assert_eq!(node.forward_streams_opened(), 2);
    for id in 1..=3 {
        wait_for_length(c.node(id), 221).await;
    }
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
        .add_member(new, raft_addr, api, Duration::from_secs(10))
        .await
        .unwrap();
    wait_for_length(c.node(new), 10).await;
    assert!(c.node(leader).node.status().voters.contains(&new));
    // Remove a follower that is not the new node; the cluster keeps working.
    let gone = (1..=3).find(|i| *i != leader).unwrap();
    c.node(leader)
        .node
        .remove_member(gone, Duration::from_secs(10))
        .await
        .unwrap();
    let voters = c.node(leader).node.status().voters;
    assert!(!voters.contains(&gone) && voters.contains(&new) && voters.len() == 3);
    c.stop(gone).await;
    put(c.node(new), "after-removal").await;
    wait_for_length(c.node(new), 11).await;
}

/// A removal request for member `id`, with the cluster's admin token.
fn removal(c: &Cluster, id: u64) -> axum::http::Request<axum::body::Body> {
    axum::http::Request::builder()
        .method("DELETE")
        .uri(format!("/admin/cluster/members/{id}"))
        .header("authorization", c.config.admin_token.clone())
        .body(axum::body::Body::empty())
        .unwrap()
}

/// The status and body of a spawned request's answer, within `within`.
async fn answer_of(
    asked: tokio::task::JoinHandle<axum::response::Response>,
    within: Duration,
) -> (axum::http::StatusCode, String) {
    let answer = tokio::time::timeout(within, asked)
        .await
        .expect("answered within its bound")
        .unwrap();
    let (status, _, body) = read_response(answer).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A membership change sent to a node that knows no leader (the former
/// leader, restarted while the rest of its cluster is down: it does not
/// take up its leadership again) waits for one to be elected instead of
/// answering 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_sent_to_a_node_without_a_leader_waits_for_one() {
    let mut c = Cluster::new(3, 20_000).await;
    let alone = c.leader().await;
    let (back, gone) = {
        let mut others = (1..=3).filter(|i| *i != alone);
        (others.next().unwrap(), others.next().unwrap())
    };
    for id in 1..=3 {
        c.stop(id).await;
    }
    c.restart(alone).await;
    assert_eq!(c.node(alone).node.status().leader, None);
    let asked = c.spawn_request(alone, removal(&c, gone));
    c.restart(back).await;
    let (status, text) = answer_of(asked, Duration::from_secs(15)).await;
    assert_eq!(status, axum::http::StatusCode::OK, "{text}");
    eventually(
        "the stopped node is no longer a voter",
        Duration::from_secs(10),
        || !c.node(alone).node.status().voters.contains(&gone),
    )
    .await;
}

/// A membership change a member passed on to a node that does not lead
/// (any more) is answered 421 at once, so that the member that sent it
/// looks for the leader within its own time instead of the two searching
/// one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_passed_on_to_a_node_that_does_not_lead_is_sent_back() {
    let c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let gone = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let mut request = removal(&c, gone);
    request.headers_mut().insert(
        "x-eddy-passed-on",
        axum::http::HeaderValue::from_static("1"),
    );
    let (status, text) =
        answer_of(c.spawn_request(follower, request), Duration::from_secs(5)).await;
    assert_eq!(
        status,
        axum::http::StatusCode::MISDIRECTED_REQUEST,
        "{text}"
    );
    assert!(c.node(leader).node.status().voters.contains(&gone));
}

/// A leader that lost its quorum refuses a membership change once its
/// search is over, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_quorum_refuses_a_membership_change_after_its_search() {
    let mut c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    for id in (1..=3).filter(|i| *i != leader) {
        c.stop(id).await;
    }
    let started = Instant::now();
    let (status, text) = answer_of(
        c.spawn_request(leader, removal(&c, if leader == 1 { 2 } else { 1 })),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        status,
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "{text}"
    );
    assert!(text.contains("quorum"), "{text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(12),
        "answered after {took:?}"
    );
}

/// A membership change sent to a node that is shutting down is told so at
/// once, not after searching for a leader (its Raft no longer changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_sent_to_a_node_shutting_down_is_told_so() {
    let c = one_of_three_restarted_alone().await;
    c.node(1).node.shutdown().await;
    let started = Instant::now();
    let (status, text) =
        answer_of(c.spawn_request(1, removal(&c, 3)), Duration::from_secs(15)).await;
    assert_eq!(
        status,
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "{text}"
    );
    assert!(text.contains("shutting down"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered after {:?}",
        started.elapsed()
    );
}

/// An operator removes a leader that just died by asking a follower that
/// still names it as leader: the follower's connection to the leader's
/// client port is refused (nothing reached it), so it looks for the new
/// leader instead of answering 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_removed_through_a_follower_that_still_names_it() {
    let mut c = Cluster::new(3, 20_000).await;
    let dead = c.leader().await;
    let follower = (1..=3).find(|i| *i != dead).unwrap();
    create_service(c.node(follower)).await;
    eventually(
        "the follower knows the leader",
        Duration::from_secs(10),
        || c.node(follower).node.status().leader == Some(dead),
    )
    .await;
    // The leader's client port goes first; its Raft still leads, so the
    // follower still names it when the request arrives.
    c.node_mut(dead).stop_serving().await;
    let asked = c.spawn_request(follower, removal(&c, dead));
    c.stop(dead).await;
    let (status, text) = answer_of(asked, Duration::from_secs(15)).await;
    assert_eq!(status, axum::http::StatusCode::OK, "{text}");
    let survivor = (1..=3).find(|i| *i != dead && *i != follower).unwrap();
    eventually(
        "both survivors see the dead leader removed",
        Duration::from_secs(10),
        || {
            [follower, survivor]
                .iter()
                .all(|id| !c.node(*id).node.status().voters.contains(&dead))
        },
    )
    .await;
    put(c.node(follower), "after-removal").await;
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

/// Puts proposed at once share log entries, on the leader and through a
/// follower (which forwards them together): 200 concurrent puts write far
/// fewer than 200 entries, each put gets its own index, and every replica
/// holds all of them in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_share_log_entries_on_the_leader_and_through_followers() {
    let c = Cluster::new(3, 20_000).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    create_service(c.node(leader)).await;
    for via in [leader, follower] {
        let before = c.node(leader).node.status().last_log_index.unwrap();
        let length_before = length_on(c.node(leader));
        let puts = (0..200).map(|i| put_item(c.node(via), format!("{via}-{i}").into_bytes()));
        let mut indexes = futures::future::join_all(puts).await;
        let after = c.node(leader).node.status().last_log_index.unwrap();
        indexes.sort_unstable();
        indexes.dedup();
        assert_eq!(indexes.len(), 200, "each put has its own index");
        assert!(
            after - before < 100,
            "200 concurrent puts through node {via} took {} log entries",
            after - before
        );
        for id in 1..=3 {
            wait_for_length(c.node(id), length_before + 200).await;
        }
    }
    replicas_agree(&c, &[1, 2, 3]).await.unwrap();
}
