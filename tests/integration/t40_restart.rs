//! Restarts: a leader that lost the unwritten tail of its log, and a node
//! that fell behind and is caught up by a snapshot.

use std::time::Duration;

use crate::harness::*;

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
    // The leader must append nothing but the put below once `behind` is
    // stopped: any other entry (a node's start announcement that came late,
    // on a slow run) would be committed by `ahead` and then cut from the
    // leader, a loss no real crash causes.
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
        // Its start is announced (an entry), so it proposes nothing later.
        eventually(
            "the node announced its start",
            Duration::from_secs(10),
            || c.node(id).node.accepts_watchers(),
        )
        .await;
    }
    c.stop(behind).await;
    let wal = {
        let dirs: Vec<_> = (1..=3).map(|id| c.data_dir(id)).collect();
        move |id: u64| dirs[(id - 1) as usize].join("raft").join("raft.wal")
    };
    // Where its log ends (zeros written ahead of it follow).
    let leader_wrote = eddy::raft::check_wal(&c.data_dir(leader).join("raft"))
        .unwrap()
        .log_bytes;
    let before = c.node(leader).node.status().last_log_index.unwrap();
    put(c.node(leader), "only-on-the-follower").await;
    let lost = c.node(leader).node.status().last_log_index.unwrap();
    assert_eq!(lost, before + 1, "the leader appended only the put");
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
    let kept = eddy::raft::check_wal(&c.data_dir(leader).join("raft")).unwrap();
    assert_eq!(
        kept.last_index,
        Some(lost - 1),
        "the leader lost only the put"
    );
    cut(ahead, length_ending_after_entry(&wal(ahead), lost));
    // The leader and `behind` first, so that one of them leads and hands
    // out the log id `ahead` holds for its own entry, before `ahead` is
    // back (had `ahead` been elected, nothing would be tested).
    c.restart(leader).await;
    c.restart(behind).await;
    c.leader().await;
    put(c.node(leader), "after").await;
    c.restart(ahead).await;
    put(c.node(leader), "after ahead is back").await;
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
    eventually(
        "the leader purged past the lagging node",
        Duration::from_secs(5),
        || c.node(leader).node.status().purged.unwrap_or(0) > lagging_last + 1,
    )
    .await;
    assert!(
        c.node(leader).node.status().purged.unwrap_or(0) > lagging_last + 1,
        "leader purged its log"
    );
    c.restart(lagging).await;
    wait_for_length(c.node(lagging), 400).await;
}
