//! Adding and removing members (admin operations, on the leader).

use super::*;

impl RaftNode {
    /// Refuse a membership change on a node that is shutting down or whose
    /// storage failed: it has no say in the cluster any more.
    fn ensure_running(&self) -> Result<(), ProposeError> {
        if let Some(reason) = self.health.failure() {
            return Err(ProposeError::Fatal(format!("storage failed: {reason}")));
        }
        if *self.stopping.borrow() {
            return Err(ProposeError::ShuttingDown);
        }
        Ok(())
    }

    /// On the leader: add a node as a learner, wait until it caught up, then
    /// make it a voter.
    pub async fn add_member(
        &self,
        id: u64,
        raft_addr: String,
        api_addr: String,
    ) -> Result<(), ProposeError> {
        self.ensure_running()?;
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
        self.ensure_running()?;
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
