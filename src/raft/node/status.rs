//! The cluster view for status endpoints and readiness.

use super::*;

impl RaftNode {
    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, n)| (*id, (n.raft_addr.clone(), n.data.clone())))
            .collect();
        let replication = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.as_ref().map(|l| l.index())))
                    .collect()
            })
            .unwrap_or_default();
        let millis_since_contact = m
            .heartbeat
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|(id, at)| (*id, at.as_ref().map(|t| t.elapsed().as_millis() as u64)))
                    .collect()
            })
            .unwrap_or_default();
        let fsync = self.fsync_stats();
        ClusterStatus {
            id: self.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed: m.cluster_committed.as_ref().map(|l| l.index()),
            applied: m.last_applied.as_ref().map(|l| l.index()),
            purged: m.purged.as_ref().map(|l| l.index()),
            voters,
            learners,
            nodes,
            replication,
            millis_since_quorum_ack: m
                .last_quorum_acked
                .as_ref()
                .map(|t| t.elapsed().as_millis() as u64),
            millis_since_contact,
            fsync_count: fsync.count,
            fsync_mean_micros: (fsync.count > 0).then(|| fsync.total_micros / fsync.count),
        }
    }
}
