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
        let deadline = Duration::from_secs(5);
        let start = tokio::time::Instant::now();
        loop {
            let index = match self.leader_read_index_anywhere().await {
                Ok(i) => i,
                Err(ProposeError::Fatal(e)) => return Err(ProposeError::Fatal(e)),
                Err(e) if start.elapsed() >= deadline => {
                    return Err(match e {
                        ProposeError::NotLeader { .. } => {
                            ProposeError::Unavailable("no leader elected".into())
                        }
                        e => e,
                    });
                }
                Err(_) => {
                    self.wait_for_leader_change(Duration::from_millis(200))
                        .await;
                    continue;
                }
            };
            let left = deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(100));
            return if self.wait_applied(index, left).await {
                Ok(())
            } else {
                Err(ProposeError::Unavailable(
                    "this node is not catching up with the leader".into(),
                ))
            };
        }
    }

    pub(super) async fn leader_read_index_anywhere(&self) -> Result<u64, ProposeError> {
        let timeout = Duration::from_secs(2);
        match tokio::time::timeout(timeout, self.leader_read_index()).await {
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
                    Some(timeout),
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
