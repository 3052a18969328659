//! Why a proposal or a read failed, and the one mapping from openraft's
//! errors to it.

use openraft::errors::RaftError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("this node is not the leader")]
    NotLeader { leader: Option<u64> },
    #[error("no leader is available: {0}")]
    Unavailable(String),
    /// The command is not acceptable (malformed or not allowed).
    #[error("{0}")]
    Refused(String),
    /// The data volume is short of space (HTTP 507).
    #[error("{0}")]
    NoSpace(String),
    /// Raft stopped for good on this node after a fault (storage, a panic),
    /// or something that cannot happen did (an entry answered with a reply
    /// of another kind).
    #[error("raft stopped: {0}")]
    Fatal(String),
    /// This node is stopping (a clean shutdown); another node can take the
    /// request.
    #[error("this node is shutting down")]
    ShuttingDown,
}

impl ProposeError {
    /// Whether trying again on this node cannot help: it stopped (after a
    /// fault, or shutting down), the disk is full, or the command is
    /// refused. Other errors (no leader, no quorum in time) may pass with an
    /// election.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ProposeError::Fatal(_)
                | ProposeError::ShuttingDown
                | ProposeError::NoSpace(_)
                | ProposeError::Refused(_)
        )
    }
}

/// The one mapping from openraft's errors: a redirect names the leader,
/// an API error means no answer now, a fatal error means Raft stopped:
/// `Stopped` without a fault is a shutdown (a storage fault is reported as
/// one, and proposals check the storage's health first).
impl<E> From<RaftError<crate::raft::types::TypeConfig, E>> for ProposeError
where
    E: std::error::Error
        + openraft::TryAsRef<openraft::errors::ForwardToLeader<crate::raft::types::TypeConfig>>,
{
    fn from(e: RaftError<crate::raft::types::TypeConfig, E>) -> Self {
        if let Some(f) = e.forward_to_leader() {
            return ProposeError::NotLeader {
                leader: f.leader_id,
            };
        }
        match e {
            RaftError::APIError(e) => ProposeError::Unavailable(e.to_string()),
            RaftError::Fatal(openraft::errors::Fatal::Stopped) => ProposeError::ShuttingDown,
            RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
        }
    }
}
