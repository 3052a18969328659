//! Adding and removing members (admin operations, on the leader).

use super::*;

impl RaftNode {
    /// Wait, at most `max`, until this node knows a leader other than
    /// `stale` (any leader when `stale` is `None`), and return it.
    pub async fn await_leader_other_than(&self, stale: Option<u64>, max: Duration) -> Option<u64> {
        let mut metrics = self.raft.metrics();
        let found = async {
            loop {
                let leader = metrics.borrow_watched().current_leader;
                if leader.is_some() && leader != stale {
                    return leader;
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(max, found).await.ok().flatten()
    }

    /// On the leader: add a node as a learner, wait until it caught up, then
    /// make it a voter.
    pub async fn add_member(
        &self,
        id: u64,
        raft_addr: String,
        api_addr: String,
    ) -> Result<(), ProposeError> {
        if self.config.admin_token.is_empty() {
            return Err(ProposeError::Refused(
                "a cluster of more than one node needs an admin token on every node; \
                 this node has none"
                    .into(),
            ));
        }
        self.raft
            .add_learner(id, NodeInfo::new(raft_addr, api_addr), true)
            .await
            .map_err(ProposeError::from)?;
        let mut voters: BTreeSet<u64> = self.status().voters.into_iter().collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(ProposeError::from)?;
        Ok(())
    }

    /// On the leader: remove a node from the voters (and the cluster).
    pub async fn remove_member(&self, id: u64) -> Result<(), ProposeError> {
        let status = self.status();
        // The voters are judged by the leader: a follower's view may not
        // have the latest membership yet (it refused a removal it should
        // have forwarded).
        if status.leader != Some(self.id) {
            return Err(ProposeError::NotLeader {
                leader: status.leader,
            });
        }
        let mut voters: BTreeSet<u64> = status.voters.into_iter().collect();
        if !voters.remove(&id) {
            return Err(ProposeError::Unavailable(format!(
                "node {id} is not a voter"
            )));
        }
        if voters.is_empty() {
            return Err(ProposeError::Unavailable(
                "cannot remove the last voter".into(),
            ));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(ProposeError::from)?;
        Ok(())
    }
}
