//! Adding and removing members (admin operations, on the leader).

use super::*;

impl RaftNode {
    pub(super) fn write_error(
        e: RaftError<
            crate::raft::types::TypeConfig,
            ClientWriteError<crate::raft::types::TypeConfig>,
        >,
    ) -> ProposeError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::NotLeader {
                leader: f.leader_id,
            },
            RaftError::APIError(e) => ProposeError::Unavailable(e.to_string()),
            RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
        }
    }

    /// On the leader: add a node as a learner, wait until it caught up, then
    /// make it a voter.
    pub async fn add_member(
        &self,
        id: u64,
        raft_addr: String,
        api_addr: String,
    ) -> Result<(), ProposeError> {
        if self.settings.admin_token.is_empty() {
            return Err(ProposeError::Refused(
                "a cluster of more than one node needs an admin token on every node; \
                 this node has none"
                    .into(),
            ));
        }
        self.raft
            .add_learner(id, NodeInfo::new(raft_addr, api_addr), true)
            .await
            .map_err(Self::write_error)?;
        let mut voters: BTreeSet<u64> = self.status().voters.into_iter().collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(Self::write_error)?;
        Ok(())
    }

    /// On the leader: remove a node from the voters (and the cluster).
    pub async fn remove_member(&self, id: u64) -> Result<(), ProposeError> {
        let mut voters: BTreeSet<u64> = self.status().voters.into_iter().collect();
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
            .map_err(Self::write_error)?;
        Ok(())
    }
}
