//! The server side of node-to-node gRPC: Raft messages into the local
//! openraft instance, and forwarded client commands into the local proposer
//! when this node leads.

use std::sync::Arc;

use futures::StreamExt;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status, Streaming};

use super::StorageHealth;
use super::network::{SECRET_HEADER, decode, encode};
use super::node::{ProposeError, RaftNode};
use super::pb::raft_server::Raft as RaftService;
use super::pb::{ForwardReply, ForwardRequest, RaftReply, RaftRequest, SnapshotChunk};
use super::snapshot_file::{SnapshotFile, SnapshotFileError};
use super::types::{SnapshotMeta, Vote};

pub struct Service {
    pub node: Arc<RaftNode>,
}

impl Service {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let given = req
            .metadata()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if bool::from(given.ct_eq(self.node.secret.as_bytes())) {
            Ok(())
        } else {
            Err(Status::unauthenticated("cluster secret mismatch"))
        }
    }

    /// Authenticate, check the addressee and decode the Raft message.
    fn open<T: serde::de::DeserializeOwned>(&self, req: Request<RaftRequest>) -> Result<T, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.check_target(req.target)?;
        decode(&req.body).map_err(Status::invalid_argument)
    }

    fn check_target(&self, target: u64) -> Result<(), Status> {
        if target == self.node.id {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "this is node {}, not node {target}",
                self.node.id
            )))
        }
    }
}

/// A Raft result as the wire carries it: the encoded value or the error text.
fn raft_reply<T: serde::Serialize, E: std::fmt::Display>(r: Result<T, E>) -> RaftReply {
    match r {
        Ok(v) => RaftReply {
            body: encode(&v).into(),
            error: String::new(),
        },
        Err(e) => RaftReply {
            body: Default::default(),
            error: e.to_string(),
        },
    }
}

fn reply<T: serde::Serialize, E: std::fmt::Display>(
    r: Result<T, E>,
) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(raft_reply(r)))
}

/// Run snapshot file work on a blocking thread; its errors become statuses,
/// and a local storage failure latches the node's storage health.
async fn blocking<T: Send + 'static>(
    health: &StorageHealth,
    f: impl FnOnce() -> Result<T, SnapshotFileError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            if e.is_io() {
                health.fail(format!("receiving a snapshot: {e}"));
                Status::internal(e.to_string())
            } else {
                Status::invalid_argument(e.to_string())
            }
        })
}

type ReplyStream = futures::stream::BoxStream<'static, Result<RaftReply, Status>>;

#[tonic::async_trait]
impl RaftService for Service {
    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc = self.open(req)?;
        reply(self.node.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc = self.open(req)?;
        reply(self.node.raft.pre_vote(rpc).await)
    }

    async fn append_entries(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc = self.open(req)?;
        reply(self.node.raft.append_entries(rpc).await)
    }

    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        req: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        self.check(&req)?;
        let id = self.node.id;
        let input = req.into_inner().filter_map(move |m| async move {
            let m = m.ok()?;
            if m.target != id {
                return None;
            }
            decode(&m.body).ok()
        });
        let output = self
            .node
            .raft
            .stream_append(Box::pin(input))
            .map(|r| Ok(raft_reply(r)));
        Ok(Response::new(Box::pin(output)))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        self.check(&req)?;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_target(first.target)?;
        let (vote, meta): (Vote, SnapshotMeta) =
            decode(&first.meta).map_err(Status::invalid_argument)?;
        let health = &self.node.health;
        let dir = self.node.snapshot_dir();
        let mut file = blocking(health, move || SnapshotFile::create_temp(&dir)).await?;
        let mut next = Some(first.data);
        while let Some(data) = next {
            if !data.is_empty() {
                file = blocking(health, move || file.append(&data).map(|()| file)).await?;
            }
            next = stream.message().await?.map(|chunk| chunk.data);
        }
        // Refuse a damaged transfer here: openraft treats a failed install
        // as a storage failure and stops.
        let expected = meta.clone();
        let file = blocking(health, move || {
            let found = file.verify()?;
            if found != expected {
                return Err(SnapshotFileError::WrongSnapshot {
                    path: file.path().to_path_buf(),
                    found: format!("{:?}", found.last_log_id),
                    expected: format!("{:?}", expected.last_log_id),
                });
            }
            file.sync()?;
            Ok(file)
        })
        .await?;
        let snapshot = super::types::Snapshot {
            meta,
            snapshot: file,
        };
        reply(self.node.raft.install_full_snapshot(vote, snapshot).await)
    }

    async fn read_index(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.check(&req)?;
        reply(self.node.leader_read_index().await)
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardReply>, Status> {
        self.check(&req)?;
        let envelope = decode(&req.into_inner().command).map_err(Status::invalid_argument)?;
        let out = match self.node.write_forwarded(envelope).await {
            Ok(r) => ForwardReply {
                reply: encode(&r).into(),
                ..Default::default()
            },
            Err(ProposeError::NotLeader { leader }) => ForwardReply {
                error_kind: "not_leader".into(),
                error: "not the leader".into(),
                leader_hint: leader.unwrap_or(0),
                ..Default::default()
            },
            Err(e @ ProposeError::NoSpace(_)) => ForwardReply {
                error_kind: "no_space".into(),
                error: e.to_string(),
                ..Default::default()
            },
            Err(e) => ForwardReply {
                error_kind: "unavailable".into(),
                error: e.to_string(),
                ..Default::default()
            },
        };
        Ok(Response::new(out))
    }
}
