//! Linearizable reads: the leader's read index, asked of the leader from
//! any node, and the wait until this node has applied it.

use super::*;

impl RaftNode {
    /// On the leader: confirm leadership with a quorum round and return the
    /// index a read must observe to be linearizable.
    pub async fn leader_read_index(&self) -> Result<u64, ProposeError> {
        match self
            .raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Ok(read) => Ok(read.log_id().index()),
            Err(e) => Err(e.into()),
        }
    }

    /// Wait until this node's state reflects every write acknowledged before
    /// the call: ask the leader (itself or over gRPC) for its read index and
    /// wait until it is applied here.
    pub async fn linearize(&self) -> Result<(), ProposeError> {
        let start = tokio::time::Instant::now();
        let index = self
            .retry_until(PROPOSE_DEADLINE, |_| self.leader_read_index_anywhere())
            .await?;
        let left = PROPOSE_DEADLINE
            .saturating_sub(start.elapsed())
            .max(MIN_ATTEMPT);
        if self.wait_applied(index, left).await {
            Ok(())
        } else {
            Err(ProposeError::Unavailable(
                "this node is not catching up with the leader".into(),
            ))
        }
    }

    pub(super) async fn leader_read_index_anywhere(&self) -> Result<u64, ProposeError> {
        match tokio::time::timeout(READ_INDEX_TIMEOUT, self.leader_read_index()).await {
            Err(_) => Err(ProposeError::Unavailable("read index timed out".into())),
            Ok(Err(ProposeError::NotLeader { leader: Some(l) })) if l != self.id => {
                let mut client = self.peer_client(l)?;
                let req = authorized(
                    &self.secret,
                    crate::raft::pb::RaftRequest {
                        target: l,
                        body: Default::default(),
                        leader_quorum_age_ms: None,
                    },
                    Some(READ_INDEX_TIMEOUT),
                );
                let reply = client
                    .read_index(req)
                    .await
                    .map_err(|s| {
                        ProposeError::Unavailable(format!(
                            "read index from node {l}: {}",
                            s.message()
                        ))
                    })?
                    .into_inner();
                if !reply.error.is_empty() {
                    return Err(ProposeError::NotLeader { leader: None });
                }
                decode(&reply.body).map_err(ProposeError::Unavailable)
            }
            Ok(other) => other,
        }
    }
}
