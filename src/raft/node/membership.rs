//! Adding and removing members (admin operations, on the leader).

use super::*;

impl RaftNode {
    /// Refuse a membership change on a node that is shutting down or whose
    /// storage failed: it has no say in the cluster any more.
    fn ensure_running(&self) -> Result<(), ProposeError> {
        self.ensure_storage_sound()?;
        if *self.stopping.borrow() {
            return Err(ProposeError::ShuttingDown);
        }
        Ok(())
    }

    /// On the leader: add a node as a learner, wait until it caught up (for
    /// as long as that takes), then make it a voter, waiting at most
    /// `commit_within` for that change to commit.
    pub async fn add_member(
        &self,
        id: u64,
        raft_addr: String,
        api_addr: String,
        commit_within: Duration,
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
        self.change_voters(voters, commit_within).await
    }

    /// Make `voters` the voters, waiting at most `commit_within` for the
    /// change to commit: a leader that lost its quorum never commits it.
    async fn change_voters(
        &self,
        voters: BTreeSet<u64>,
        commit_within: Duration,
    ) -> Result<(), ProposeError> {
        // Given up on, the change stays in the leader's log and may still
        // commit; openraft refuses other changes until it has or not.
        match tokio::time::timeout(commit_within, self.raft.change_membership(voters, false)).await
        {
            Ok(changed) => changed.map(|_| ()).map_err(ProposeError::from),
            Err(_) => Err(ProposeError::Unavailable(format!(
                "no quorum committed the change within {:.1} s; its outcome is unknown, \
                 and other membership changes are refused until it is settled",
                commit_within.as_secs_f64()
            ))),
        }
    }

    /// On the leader: remove a node from the voters (and the cluster),
    /// waiting at most `commit_within` for the change to commit.
    pub async fn remove_member(
        &self,
        id: u64,
        commit_within: Duration,
    ) -> Result<(), ProposeError> {
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
        self.change_voters(voters, commit_within).await
    }
}
