//! The server side of node-to-node gRPC: Raft messages into the local
//! openraft instance, and forwarded client commands into the local proposer
//! when this node leads.
//!
//! A call is authenticated by the cluster secret on its headers, then each
//! of its messages is held to its method's size limit on its length prefix,
//! then decoded: nothing unauthenticated or oversized is buffered.

use std::sync::Arc;

use futures::StreamExt;
use tonic::codegen::Service as TowerService;
use tonic::codegen::http::Request as HttpRequest;
use tonic::{Request, Response, Status, Streaming};

use super::StorageHealth;
use super::network::{SECRET_HEADER, SNAPSHOT_CHUNK, decode, encode};
use super::node::{MAX_PEER_MESSAGE, PROPOSE_DEADLINE, ProposeError, RaftNode};
use super::pb::raft_server::{Raft as RaftService, RaftServer};
use super::pb::{
    ForwardBatchReply, ForwardBatchRequest, ForwardError, ForwardReply, ForwardRequest, RaftReply,
    RaftRequest, SnapshotChunk,
};
use super::snapshot_file::{SnapshotFile, SnapshotFileError};
use super::types::{SnapshotMeta, Vote};
use crate::queue::{Command, Envelope};

/// The gRPC interceptor that authenticates every peer call by the cluster
/// secret, before its message is decoded. A node without a secret accepts
/// no peer calls at all.
pub(super) fn authenticate(
    secret: String,
    contacts: Arc<super::listener::PeerContacts>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        if secret.is_empty() {
            return Err(Status::unauthenticated(
                "this node has no cluster secret and accepts no peers",
            ));
        }
        let given = req
            .metadata()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if crate::secret::matches(given, secret.as_bytes()) {
            if let Some(peer) = req.remote_addr() {
                contacts.authenticated(peer);
            }
            Ok(req)
        } else {
            Err(Status::unauthenticated("cluster secret mismatch"))
        }
    }
}

/// Largest message of the small peer calls (`Vote`, `PreVote`,
/// `ReadIndex`): a vote and a log id, a few dozen bytes encoded.
pub(super) const CONTROL_MESSAGE_LIMIT: usize = 4 * 1024;

/// Largest forwarded command: one payload at the ceiling plus its request
/// id, tags and sub-path (tens of KiB at most), with ample room.
pub(super) const FORWARD_MESSAGE_LIMIT: usize =
    crate::queue::MAX_PAYLOAD_CEILING as usize + 1024 * 1024;

/// Largest snapshot chunk: [`SNAPSHOT_CHUNK`] bytes of data, or the first
/// chunk's vote and snapshot meta (the membership: small).
pub(super) const SNAPSHOT_MESSAGE_LIMIT: usize = SNAPSHOT_CHUNK + 1024 * 1024;

/// The peer calls grouped by how large a message each legitimately carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallSize {
    Control,
    Forward,
    /// `AppendEntries` and `StreamAppend`: a replication read is cut after
    /// 8 MiB of entries but holds at least one, and an entry is at most one
    /// payload, so these keep the general peer limit.
    Replication,
    Snapshot,
}

impl CallSize {
    const ALL: [CallSize; 4] = [
        CallSize::Control,
        CallSize::Forward,
        CallSize::Replication,
        CallSize::Snapshot,
    ];

    /// The size class of the call at gRPC path `path`. Unknown methods are
    /// answered `Unimplemented` by any server; they get the smallest limit.
    fn of(path: &str) -> Self {
        match path.strip_prefix("/eddy.raft.Raft/") {
            Some("Forward" | "ForwardBatch" | "ForwardStream") => CallSize::Forward,
            Some("AppendEntries" | "StreamAppend") => CallSize::Replication,
            Some("InstallSnapshot") => CallSize::Snapshot,
            _ => CallSize::Control,
        }
    }

    fn decode_limit(self) -> usize {
        match self {
            CallSize::Control => CONTROL_MESSAGE_LIMIT,
            CallSize::Forward => FORWARD_MESSAGE_LIMIT,
            CallSize::Replication => MAX_PEER_MESSAGE,
            CallSize::Snapshot => SNAPSHOT_MESSAGE_LIMIT,
        }
    }
}

/// The peer gRPC service with a decode limit per method: one generated
/// server per size class, all sharing one [`PeerService`], and each call routed
/// by its path to the server of its class. tonic checks every message's
/// length prefix against its server's limit before buffering the message,
/// so an oversized message costs the node nothing but its first bytes.
/// Callers are authenticated before any of this (see [`authenticate`]).
#[derive(Clone)]
pub(super) struct PeerServer {
    by_size: [RaftServer<PeerService>; 4],
}

impl PeerServer {
    pub(super) fn new(service: PeerService) -> Self {
        let service = Arc::new(service);
        Self {
            by_size: CallSize::ALL.map(|size| {
                RaftServer::from_arc(service.clone())
                    .max_decoding_message_size(size.decode_limit())
                    .max_encoding_message_size(MAX_PEER_MESSAGE)
            }),
        }
    }
}

impl tonic::server::NamedService for PeerServer {
    const NAME: &'static str = super::pb::raft_server::SERVICE_NAME;
}

impl<B> TowerService<HttpRequest<B>> for PeerServer
where
    RaftServer<PeerService>: TowerService<HttpRequest<B>>,
{
    type Response = <RaftServer<PeerService> as TowerService<HttpRequest<B>>>::Response;
    type Error = <RaftServer<PeerService> as TowerService<HttpRequest<B>>>::Error;
    type Future = <RaftServer<PeerService> as TowerService<HttpRequest<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The generated servers are always ready; poll each anyway.
        for server in &mut self.by_size {
            std::task::ready!(server.poll_ready(cx))?;
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest<B>) -> Self::Future {
        // `by_size` is in the order of `CallSize::ALL`, the declaration order.
        self.by_size[CallSize::of(req.uri().path()) as usize].call(req)
    }
}

/// Whether the leader may apply `command` forwarded by node `from`: the
/// commands an entry node legitimately forwards are the data-plane ones, its
/// own restart announcement, and admin commands backed by the admin token.
/// Housekeeping decisions belong to the leader alone.
fn forwardable(command: &Command, from: u64, admin: bool) -> Result<(), String> {
    match command {
        Command::Put { .. }
        | Command::Take { .. }
        | Command::Commit { .. }
        | Command::Negative { .. }
        | Command::Delete { .. }
        | Command::Truncate { .. }
        | Command::End { .. }
        | Command::Attach { .. }
        | Command::Detach { .. }
        | Command::Complete { .. } => Ok(()),
        Command::CreateService { .. }
        | Command::DeleteService { .. }
        | Command::UpdateService { .. }
        | Command::PurgeDeadLetters { .. }
        | Command::RequeueDeadLetters { .. } => {
            if admin {
                Ok(())
            } else {
                Err(format!("{} needs the admin token", command.name()))
            }
        }
        Command::NodeGone { node } if *node == from => Ok(()),
        Command::NodeGone { node } => Err(format!(
            "node {from} may not declare node {node} gone; only the leader does"
        )),
        Command::Tick | Command::NodeLost { .. } | Command::GraceExpired { .. } => Err(format!(
            "{} is decided by the leader and never forwarded",
            command.name()
        )),
        Command::Coalesced(_) => Err("a coalesced entry is formed by the leader only".to_string()),
        Command::Batch(commands) => commands.iter().try_for_each(|c| match c {
            Command::Batch(_) | Command::Coalesced(_) => Err("nested command batch".to_string()),
            c => forwardable(c, from, admin),
        }),
    }
}

pub struct PeerService {
    pub node: Arc<RaftNode>,
}

impl PeerService {
    /// Check the addressee and decode the Raft message (the caller was
    /// authenticated before its message was decoded: see [`authenticate`]).
    fn open<T: serde::de::DeserializeOwned>(&self, req: Request<RaftRequest>) -> Result<T, Status> {
        let req = req.into_inner();
        self.check_target(req.target)?;
        decode(&req.body).map_err(Status::invalid_argument)
    }

    /// Over mutual TLS, a forwarded command's sender `from` is who the
    /// connection's certificate says: it must be valid for the host of the
    /// address the membership records for member `from`. Otherwise a member
    /// could speak for another (declare it gone, keep it looking alive).
    fn check_sender(&self, from: u64, cert: Option<&impl AsRef<[u8]>>) -> Result<(), Status> {
        let Some(cert) = cert else {
            return Err(Status::permission_denied(
                "no client certificate on a mutual-TLS connection",
            ));
        };
        let Some(member) = self.node.node_info(from) else {
            tracing::warn!(from, "forward from a node that is not a member refused");
            return Err(Status::permission_denied(format!(
                "node {from} is not a member"
            )));
        };
        let host = crate::tls::host_of(&member.raft_addr);
        if crate::tls::certificate_valid_for_host(cert.as_ref(), host) {
            Ok(())
        } else {
            tracing::warn!(
                from,
                host,
                "forward refused: the peer certificate is not valid for the sender's address"
            );
            Err(Status::permission_denied(format!(
                "the connection's certificate is not node {from}'s (not valid for {host})"
            )))
        }
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
impl RaftService for PeerService {
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
        let received = std::time::Instant::now();
        let quorum_age = req.get_ref().leader_quorum_age_ms;
        let rpc = self.open(req)?;
        let result = self.node.raft.append_entries(rpc).await;
        if result.as_ref().is_ok_and(|r| r.is_success()) {
            self.node.note_leader_contact(received, quorum_age);
        }
        crate::latency::Stage::FollowerAppend.record(received.elapsed());
        reply(result)
    }

    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        req: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let id = self.node.id;
        // When each request was read and the quorum age it carried, in
        // order: openraft answers every request, in order, and may read
        // ahead of its answers.
        let pending = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let reading = pending.clone();
        let input = req.into_inner().filter_map(move |m| {
            let reading = reading.clone();
            async move {
                let m = m.ok()?;
                if m.target != id {
                    return None;
                }
                let rpc = decode(&m.body).ok()?;
                reading
                    .lock()
                    .unwrap()
                    .push_back((std::time::Instant::now(), m.leader_quorum_age_ms));
                Some(rpc)
            }
        });
        let node = self.node.clone();
        let output = self.node.raft.stream_append(Box::pin(input)).map(move |r| {
            let read = pending.lock().unwrap().pop_front();
            if let Some((received, _)) = read {
                crate::latency::Stage::FollowerAppend.record(received.elapsed());
            }
            // Accepted replication: this node is in touch with a leader.
            if let (Ok(Ok(_)), Some((received, quorum_age))) = (&r, read) {
                node.note_leader_contact(received, quorum_age);
            }
            Ok(raft_reply(r))
        });
        Ok(Response::new(Box::pin(output)))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
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

    async fn read_index(&self, _req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        reply(self.node.leader_read_index().await)
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardReply>, Status> {
        let certs = req.peer_certs();
        let req = req.into_inner();
        if self.node.uses_peer_tls() {
            self.check_sender(req.from, certs.as_ref().and_then(|c| c.first()))?;
        }
        let envelope: Envelope = decode(&req.command).map_err(Status::invalid_argument)?;
        self.node.note_peer_contact(req.from);
        let admin = self.node.admin_proof_matches(&req.admin_proof);
        Ok(Response::new(
            self.write_forwarded(envelope, req.from, admin).await,
        ))
    }

    async fn forward_batch(
        &self,
        req: Request<ForwardBatchRequest>,
    ) -> Result<Response<ForwardBatchReply>, Status> {
        let certs = req.peer_certs();
        let req = req.into_inner();
        let envelopes = self.open_group(&req, certs.as_ref().and_then(|c| c.first()))?;
        let replies = self.write_group(envelopes, req.from).await;
        Ok(Response::new(ForwardBatchReply { replies, seq: 0 }))
    }

    type ForwardStreamStream =
        futures::stream::BoxStream<'static, Result<ForwardBatchReply, Status>>;

    /// `ForwardBatch` over one stream: each group is written as it arrives,
    /// beside the others, and answered with its `seq` when it is done. A
    /// group that cannot be read is answered "not written"; one whose
    /// sender the connection's certificate does not vouch for ends the
    /// stream, refused.
    async fn forward_stream(
        &self,
        req: Request<Streaming<ForwardBatchRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let certs = req.peer_certs();
        let mut groups = req.into_inner();
        let node = self.node.clone();
        let (replies, answers) = tokio::sync::mpsc::channel(FORWARD_STREAM_GROUPS);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(FORWARD_STREAM_GROUPS));
        let stopped = node.stopped();
        // The stream is read until it ends, or until this node stops (a
        // peer's open stream must not hold it, nor its shutdown's drain).
        tokio::spawn(async move {
            let service = Arc::new(PeerService { node });
            let cert = certs.as_ref().and_then(|c| c.first());
            tokio::pin!(stopped);
            loop {
                // At most so many groups are written at once; beyond, the
                // stream is not read (the sender's HTTP/2 window fills).
                let next = tokio::select! {
                    next = async {
                        let slot = in_flight.clone().acquire_owned().await;
                        (slot, groups.message().await)
                    } => next,
                    () = &mut stopped => return,
                };
                let req = match next {
                    (Ok(slot), Ok(Some(req))) => (slot, req),
                    (_, Ok(None)) | (Err(_), _) => return,
                    (_, Err(status)) => {
                        let _ =
                            tokio::time::timeout(PROPOSE_DEADLINE, replies.send(Err(status))).await;
                        return;
                    }
                };
                let (slot, req) = req;
                // A member speaking for another ends the stream, refused,
                // as it fails the call; a group this node cannot read is
                // answered as such, and the stream goes on.
                if service.node.uses_peer_tls()
                    && let Err(status) = service.check_sender(req.from, cert)
                {
                    let _ = tokio::time::timeout(PROPOSE_DEADLINE, replies.send(Err(status))).await;
                    return;
                }
                let ForwardBatchRequest {
                    commands,
                    from,
                    seq,
                } = req;
                let decoded = commands
                    .iter()
                    .map(|c| decode::<Envelope>(c))
                    .collect::<Result<Vec<_>, _>>();
                let count = commands.len();
                drop(commands);
                let service = service.clone();
                let replies = replies.clone();
                tokio::spawn(async move {
                    let answer = match decoded {
                        Ok(envelopes) => {
                            service.node.note_peer_contact(from);
                            // The sender stops waiting after the propose
                            // deadline; so does this, instead of holding
                            // its slot.
                            let written = service.write_group(envelopes, from);
                            tokio::time::timeout(PROPOSE_DEADLINE, written)
                                .await
                                .unwrap_or_else(|_| {
                                    unavailable(
                                        count,
                                        "no quorum acknowledged the write in time; outcome unknown",
                                    )
                                })
                        }
                        // As a call with such a group fails: tried again
                        // (the leader may change to one that reads it).
                        Err(why) => unavailable(count, &format!("undecodable command: {why}")),
                    };
                    // Bounded too: a peer that stops reading answers does
                    // not keep the slot (and the stream's reading) for good.
                    let reply = ForwardBatchReply {
                        replies: answer,
                        seq,
                    };
                    let _ = tokio::time::timeout(PROPOSE_DEADLINE, replies.send(Ok(reply))).await;
                    drop(slot);
                });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(answers),
        )))
    }
}

/// Groups of one forward stream written at once: what a sender keeps in
/// flight on one lane (4, the coalescer's bound), with room to spare.
const FORWARD_STREAM_GROUPS: usize = 8;

/// `count` replies saying "not written here; try again".
fn unavailable(count: usize, why: &str) -> Vec<ForwardReply> {
    (0..count)
        .map(|_| ForwardReply {
            error_kind: ForwardError::Unavailable.into(),
            error: why.to_string(),
            ..Default::default()
        })
        .collect()
}

impl PeerService {
    /// Check a forwarded group's sender (over mutual TLS: against the
    /// connection's certificate) and decode its envelopes.
    fn open_group(
        &self,
        req: &ForwardBatchRequest,
        cert: Option<&impl AsRef<[u8]>>,
    ) -> Result<Vec<Envelope>, Status> {
        if self.node.uses_peer_tls() {
            self.check_sender(req.from, cert)?;
        }
        let envelopes = req
            .commands
            .iter()
            .map(|c| decode::<Envelope>(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        self.node.note_peer_contact(req.from);
        Ok(envelopes)
    }

    /// Propose a forwarded group's envelopes, all at once: proposed
    /// together, they share log entries. One reply per envelope, in order.
    async fn write_group(&self, envelopes: Vec<Envelope>, from: u64) -> Vec<ForwardReply> {
        futures::future::join_all(
            envelopes
                .into_iter()
                .map(|envelope| self.write_forwarded(envelope, from, false)),
        )
        .await
    }

    /// Check and propose one forwarded envelope; the answer says how it
    /// went, as the forwarding node needs to know it.
    async fn write_forwarded(&self, envelope: Envelope, from: u64, admin: bool) -> ForwardReply {
        if let Err(why) = forwardable(&envelope.command, from, admin) {
            tracing::warn!(from, %why, "forwarded command refused");
            return ForwardReply {
                error_kind: ForwardError::Rejected.into(),
                error: why,
                ..Default::default()
            };
        }
        match self.node.write_forwarded(envelope).await {
            Ok(r) => ForwardReply {
                reply: encode(&r).into(),
                ..Default::default()
            },
            Err(ProposeError::NotLeader { leader }) => ForwardReply {
                error_kind: ForwardError::NotLeader.into(),
                error: "not the leader".into(),
                leader_hint: leader.unwrap_or(0),
                ..Default::default()
            },
            Err(e @ ProposeError::Refused(_)) => ForwardReply {
                error_kind: ForwardError::Rejected.into(),
                error: e.to_string(),
                ..Default::default()
            },
            Err(e @ ProposeError::NoSpace(_)) => ForwardReply {
                error_kind: ForwardError::NoSpace.into(),
                error: e.to_string(),
                ..Default::default()
            },
            Err(e) => ForwardReply {
                error_kind: ForwardError::Unavailable.into(),
                error: e.to_string(),
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;
    use crate::queue::{QueueKind, QueueRef};
    use crate::raft::Peer;
    use crate::raft::pb::raft_client::RaftClient;
    use std::time::Duration;

    fn tick() -> Command {
        Command::Tick
    }

    #[test]
    fn only_legitimate_commands_are_forwardable() {
        let put = Command::Truncate {
            queue: QueueRef::new("s", QueueKind::Input),
            before: 1,
        };
        assert!(forwardable(&put, 2, false).is_ok());
        assert!(forwardable(&Command::NodeGone { node: 2 }, 2, false).is_ok());
        assert!(forwardable(&Command::NodeGone { node: 3 }, 2, true).is_err());
        assert!(forwardable(&tick(), 2, true).is_err());
        // A leader's own decisions are never forwarded, even with the admin
        // token: a deposed leader's verdict must not reach the new one.
        for decision in [
            Command::NodeLost { node: 3, term: 4 },
            Command::NodeLost { node: 2, term: 4 },
            Command::GraceExpired { term: 4 },
        ] {
            assert!(forwardable(&decision, 2, true).is_err(), "{decision:?}");
            let batch = Command::Batch(vec![put.clone(), decision]);
            assert!(forwardable(&batch, 2, true).is_err());
        }
        let delete = Command::DeleteService { name: "s".into() };
        assert!(forwardable(&delete, 2, false).is_err());
        assert!(forwardable(&delete, 2, true).is_ok());
        assert!(forwardable(&Command::Batch(vec![put.clone(), tick()]), 2, true).is_err());
        assert!(forwardable(&Command::Batch(vec![put.clone()]), 2, false).is_ok());
        // Coalesced entries are the leader's own, whoever asks.
        let coalesced = Command::Coalesced(vec![Envelope {
            id: 1,
            now_ms: 1,
            command: put.clone(),
        }]);
        assert!(forwardable(&coalesced, 2, true).is_err());
        assert!(forwardable(&Command::Batch(vec![coalesced]), 2, true).is_err());
    }

    async fn single_node(secret: &str, admin_token: &str) -> (Arc<RaftNode>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = node_config(
            dir.path(),
            &format!("127.0.0.1:{port}"),
            secret,
            admin_token,
        );
        (start_node(config).await, dir)
    }

    /// Start a Raft member (no HTTP API: peers see `127.0.0.1:1` for it).
    /// Wait until `node`, alone, leads.
    async fn until_it_leads(node: &RaftNode) {
        node.raft
            .wait(Some(std::time::Duration::from_secs(10)))
            .state(openraft::ServerState::Leader, "single node leads")
            .await
            .unwrap();
    }

    async fn start_node(config: NodeConfig) -> Arc<RaftNode> {
        let advertise = Peer {
            id: config.id,
            raft_addr: config.advertise_raft.clone(),
            api_addr: "127.0.0.1:1".into(),
        };
        let (node, _events) = RaftNode::start(Arc::new(config), advertise).await.unwrap();
        node
    }

    /// Node 1, alone and without TLS, listening on `raft_addr`, with short
    /// timings; tests that need peers or TLS adjust the result.
    fn node_config(
        dir: &std::path::Path,
        raft_addr: &str,
        secret: &str,
        admin_token: &str,
    ) -> NodeConfig {
        let mut config = NodeConfig::for_tests(1, dir.to_path_buf(), 0, 0);
        config.raft_listen = raft_addr.parse().unwrap();
        config.advertise_raft = raft_addr.into();
        config.cluster_secret = secret.into();
        config.admin_token = admin_token.into();
        config.timings = crate::config::Timings {
            heartbeat: Duration::from_millis(50),
            election_timeout: Duration::from_millis(300),
            node_lost: Duration::from_millis(1_000),
        };
        config.snapshot_every = 1_000;
        config
    }

    async fn client(node: &RaftNode) -> RaftClient<tonic::transport::Channel> {
        let addr = node.advertised_raft_addr();
        RaftClient::connect(format!("http://{addr}")).await.unwrap()
    }

    fn forward_request(
        secret: &str,
        command: Vec<u8>,
        from: u64,
        proof: Vec<u8>,
    ) -> Request<ForwardRequest> {
        super::super::network::authorized(
            secret,
            ForwardRequest {
                command: command.into(),
                from,
                admin_proof: proof.into(),
            },
            None,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_calls_are_authenticated_before_decoding_and_filtered() {
        let (node, _dir) = single_node("the-secret", "the-admin-token").await;
        let mut c = client(&node).await;

        // A wrong secret is refused before the (undecodable) body is looked at.
        let err = c
            .forward(forward_request("wrong", vec![0xff; 1024], 1, Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        // With the secret: a nested batch is refused at decode.
        let mut nested = Vec::new();
        for _ in 0..5_000 {
            nested.extend_from_slice(&[14, 1]);
        }
        nested.push(12);
        let envelope_prefix = encode(&Envelope {
            id: 7,
            now_ms: 1,
            command: Command::Tick,
        });
        // Replace the trailing `Tick` of a valid envelope by the nested batch.
        let mut bytes = envelope_prefix[..envelope_prefix.len() - 1].to_vec();
        bytes.extend_from_slice(&nested);
        let err = c
            .forward(forward_request("the-secret", bytes, 1, Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // Housekeeping and unproven admin commands are refused; nothing applied.
        let delete = encode(&Envelope {
            id: 8,
            now_ms: 1,
            command: Command::DeleteService { name: "x".into() },
        });
        for (cmd, proof) in [
            (
                encode(&Envelope {
                    id: 9,
                    now_ms: 1,
                    command: Command::Tick,
                }),
                Vec::new(),
            ),
            (delete.clone(), Vec::new()),
            (delete.clone(), crate::secret::digest(b"guess").to_vec()),
        ] {
            let r = c
                .forward(forward_request("the-secret", cmd, 2, proof))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.error_kind(), ForwardError::Rejected, "{}", r.error);
        }
        // With the proof the admin command reaches the state machine (which
        // answers that there is no such service).
        until_it_leads(&node).await;
        let r = c
            .forward(forward_request(
                "the-secret",
                delete,
                2,
                crate::secret::digest(b"the-admin-token").to_vec(),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.error_kind(), ForwardError::None, "{}", r.error);
        node.shutdown().await;
    }

    /// A node without an admin token (only a single node runs so) takes
    /// no forwarded admin command, whatever proof comes with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_an_admin_token_takes_no_forwarded_admin_command() {
        let (node, _dir) = single_node("the-secret", "").await;
        let mut c = client(&node).await;
        until_it_leads(&node).await;
        let delete = encode(&Envelope {
            id: 10,
            now_ms: 1,
            command: Command::DeleteService { name: "x".into() },
        });
        for proof in [Vec::new(), crate::secret::digest(b"").to_vec()] {
            let r = c
                .forward(forward_request("the-secret", delete.clone(), 2, proof))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.error_kind(), ForwardError::Rejected, "{}", r.error);
            assert!(r.error.contains("admin token"), "{}", r.error);
        }
        node.shutdown().await;
    }

    /// Over mutual TLS a Forward speaks only for the member whose address
    /// the connection's certificate is valid for. Node 1 (at 127.0.0.2) of
    /// a three-member cluster (nodes 2 and 3 at 127.0.0.3 and 127.0.0.4)
    /// hears from a client holding node 3's certificate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forward_speaks_only_for_the_member_whose_certificate_it_carries() {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let certs = tempfile::tempdir().unwrap();
        let hosts: Vec<String> = (2..=4).map(|i| format!("127.0.0.{i}")).collect();
        crate::tls::generate(certs.path(), None, &hosts, &[], false, false).unwrap();
        let identity = |host: &str| {
            crate::tls::TlsIdentity::load(
                &certs.path().join(format!("{host}.pem")),
                &certs.path().join(format!("{host}-key.pem")),
                &certs.path().join("ca.pem"),
            )
            .unwrap()
        };
        let port = |host: &str| {
            std::net::TcpListener::bind((host, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let peers: Vec<Peer> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| Peer {
                id: i as u64 + 1,
                raft_addr: format!("{h}:{}", port(h)),
                api_addr: format!("{h}:1"),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            peers: peers.clone(),
            peer_tls: Some(identity(&hosts[0])),
            ..node_config(
                dir.path(),
                &peers[0].raft_addr,
                "the-secret",
                "the-admin-token",
            )
        };
        // Only node 1 runs: it formed the cluster, so it knows all three.
        let node = start_node(config).await;
        for _ in 0..200 {
            if node.status().nodes.len() == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(node.status().nodes.len(), 3);

        let third = identity(&hosts[2]);
        let channel = Endpoint::from_shared(format!("https://{}", peers[0].raft_addr))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&third.ca_pem))
                    .identity(Identity::from_pem(&third.cert_pem, &third.key_pem)),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = RaftClient::new(channel);
        let gone = |node: u64| {
            encode(&Envelope {
                id: 20 + node as u128,
                now_ms: 1,
                command: Command::NodeGone { node },
            })
        };
        // Node 3's certificate claiming to be node 1 (declaring it gone) or
        // node 2: refused before anything is decoded or noted.
        for from in [1, 2] {
            let err = c
                .forward(forward_request("the-secret", gone(from), from, Vec::new()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            assert!(err.message().contains(&format!("node {from}")), "{err:?}");
        }
        // Nor may it speak for a node that is not a member.
        let err = c
            .forward(forward_request("the-secret", gone(9), 9, Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        // Speaking for itself, it is heard (this node is no leader: it says so).
        let r = c
            .forward(forward_request("the-secret", gone(3), 3, Vec::new()))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(r.error_kind(), ForwardError::Rejected, "{}", r.error);
        // The same holds for each group on a forward stream, not only its
        // first: node 3 speaking for itself is heard, then speaking for
        // node 1 ends the stream, refused.
        let groups = vec![(1, 3, vec![gone(3)]), (2, 1, vec![gone(1)])];
        let mut answers = c
            .forward_stream(stream_of("the-secret", groups))
            .await
            .unwrap()
            .into_inner();
        let mut heard = Vec::new();
        let refused = async {
            loop {
                match answers.message().await {
                    Ok(Some(reply)) => heard.push(reply),
                    Ok(None) => panic!("the stream ended without a refusal"),
                    Err(e) => break e,
                }
            }
        };
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), refused)
            .await
            .expect("the group speaking for node 1 was not refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(
            heard.len() <= 1 && heard.iter().all(|r| r.seq == 1),
            "{heard:?}"
        );
        // Alone on its stream, node 3's group is answered.
        let mut answers = c
            .forward_stream(stream_of("the-secret", vec![(1, 3, vec![gone(3)])]))
            .await
            .unwrap()
            .into_inner();
        let reply = answers.message().await.unwrap().unwrap();
        assert_eq!(reply.seq, 1);
        assert_ne!(reply.replies[0].error_kind(), ForwardError::Rejected);
        node.shutdown().await;
    }

    /// Groups `(seq, from, commands)` on one forward stream.
    fn stream_of(
        secret: &str,
        groups: Vec<(u64, u64, Vec<Vec<u8>>)>,
    ) -> Request<impl futures::Stream<Item = ForwardBatchRequest> + Send + 'static> {
        let groups = groups
            .into_iter()
            .map(|(seq, from, commands)| ForwardBatchRequest {
                commands: commands.into_iter().map(Into::into).collect(),
                from,
                seq,
            });
        // Kept open after the groups, as by a node that forwards more later.
        let open = futures::stream::iter(groups).chain(futures::stream::pending());
        super::super::network::authorized(secret, open, None)
    }

    /// On a forward stream each group is answered once, with its number
    /// and one reply per command, as `ForwardBatch` answers it; a group
    /// that cannot be decoded is answered "not written"; a wrong secret
    /// opens no stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forward_stream_answers_each_group_under_its_number() {
        let (node, _dir) = single_node("the-secret", "").await;
        until_it_leads(&node).await;
        let mut c = client(&node).await;
        let envelope = |id: u128, command: Command| {
            encode(&Envelope {
                id,
                now_ms: 1,
                command,
            })
        };
        let put = |id: u128| {
            envelope(
                id,
                Command::Put {
                    queue: QueueRef::new("none", QueueKind::Input),
                    item: crate::queue::NewItem {
                        request_id: format!("r{id}"),
                        tags: Default::default(),
                        data: bytes::Bytes::from_static(b"x"),
                        priority: 0,
                        path: String::new(),
                    },
                },
            )
        };
        let err = c
            .forward_stream(stream_of("wrong", vec![(1, 2, vec![put(1)])]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        // Groups from node 2, among them one that cannot be read (a
        // command of a later version, say): that one is answered "not
        // written" (retried), and the stream goes on.
        let groups = vec![
            (7, 2, vec![put(2), envelope(3, Command::Tick)]),
            (11, 2, vec![vec![0xff; 16]]),
            (3, 2, vec![put(4)]),
        ];
        let mut answers = c
            .forward_stream(stream_of("the-secret", groups))
            .await
            .unwrap()
            .into_inner();
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..3 {
            let reply = tokio::time::timeout(std::time::Duration::from_secs(10), answers.message())
                .await
                .expect("every group is answered")
                .unwrap()
                .unwrap();
            let kinds: Vec<ForwardError> = reply.replies.iter().map(|r| r.error_kind()).collect();
            assert!(seen.insert(reply.seq, kinds).is_none(), "answered twice");
        }
        assert_eq!(
            seen,
            std::collections::BTreeMap::from([
                (3, vec![ForwardError::None]),
                (7, vec![ForwardError::None, ForwardError::Rejected]),
                (11, vec![ForwardError::Unavailable]),
            ])
        );
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_a_secret_accepts_no_peer_calls() {
        let (node, _dir) = single_node("", "").await;
        let mut c = client(&node).await;
        let err = c
            .forward(forward_request("", Vec::new(), 1, Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        node.shutdown().await;
    }

    /// A gRPC call to `method` whose single message declares `declared`
    /// bytes, of which `payload` is sent. Unless `finish`, the request body
    /// then stays open, as from a client still sending. Returns the gRPC
    /// status code the node answers with.
    async fn half_sent_call(
        node: &RaftNode,
        secret: &str,
        method: &str,
        declared: u32,
        payload: &[u8],
        finish: bool,
    ) -> Option<tonic::Code> {
        use tonic::codegen::http;
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            node.advertised_raft_addr()
        ))
        .unwrap()
        .connect()
        .await
        .unwrap();
        let mut message = vec![0u8];
        message.extend_from_slice(&declared.to_be_bytes());
        message.extend_from_slice(payload);
        let first = futures::stream::once(async move {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(message)))
        });
        let frames = if finish {
            first.boxed()
        } else {
            first.chain(futures::stream::pending()).boxed()
        };
        let req = http::Request::post(format!(
            "http://{}/eddy.raft.Raft/{method}",
            node.advertised_raft_addr()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(SECRET_HEADER, secret)
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .unwrap();
        let mut channel = channel;
        std::future::poll_fn(|cx| {
            TowerService::<http::Request<tonic::body::Body>>::poll_ready(&mut channel, cx)
        })
        .await
        .unwrap();
        let resp = TowerService::call(&mut channel, req).await.unwrap();
        let code = |headers: &http::HeaderMap| {
            headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                .map(tonic::Code::from_i32)
        };
        if let Some(c) = code(resp.headers()) {
            return Some(c);
        }
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.ok()?;
        body.trailers().and_then(code)
    }

    /// Each peer method has a decode limit that fits what it carries,
    /// checked on the message's length prefix: with the right secret, a
    /// message over its method's limit (but under the 64 MiB that every
    /// method used to allow) is refused while the client is still sending
    /// it, so the node never buffers it; the node keeps serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_messages_are_refused_by_method_before_they_arrive() {
        use prost::Message as _;
        let (node, _dir) = single_node("the-secret", "").await;
        until_it_leads(&node).await;
        let over = |limit: usize| (limit + 1) as u32;
        for (method, declared) in [
            ("Vote", 16 << 20),
            ("PreVote", over(CONTROL_MESSAGE_LIMIT)),
            ("ReadIndex", 16 << 20),
            ("InstallSnapshot", 16 << 20),
            ("Forward", 40 << 20),
            ("ForwardStream", 40 << 20),
        ] {
            let started = std::time::Instant::now();
            let code = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                half_sent_call(
                    &node,
                    "the-secret",
                    method,
                    declared,
                    &[0x5a; 64 * 1024],
                    false,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                panic!("{method}: a {declared}-byte message was awaited, not refused")
            });
            println!(
                "{method}: {declared}-byte message refused with {code:?} after {:?}",
                started.elapsed()
            );
            assert_eq!(code, Some(tonic::Code::OutOfRange), "{method}");
        }
        // The secret is still checked first.
        let code = half_sent_call(&node, "wrong", "Vote", 16 << 20, &[0x5a; 1024], false).await;
        assert_eq!(code, Some(tonic::Code::Unauthenticated));
        // A message at the limit reaches the method (and is refused there as
        // no vote, not for its size).
        let at_limit = RaftRequest {
            target: 1,
            body: vec![0xff; CONTROL_MESSAGE_LIMIT - 5].into(),
            leader_quorum_age_ms: None,
        }
        .encode_to_vec();
        assert_eq!(at_limit.len(), CONTROL_MESSAGE_LIMIT);
        let code = half_sent_call(
            &node,
            "the-secret",
            "Vote",
            at_limit.len() as u32,
            &at_limit,
            true,
        );
        assert_eq!(code.await, Some(tonic::Code::InvalidArgument));

        // The node still serves peers.
        let mut c = client(&node).await;
        let r = c
            .read_index(super::super::network::authorized(
                "the-secret",
                RaftRequest {
                    target: 1,
                    body: Default::default(),
                    leader_quorum_age_ms: None,
                },
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.error, "");
        let put = encode(&Envelope {
            id: 11,
            now_ms: 1,
            command: Command::Truncate {
                queue: QueueRef::new("s", QueueKind::Input),
                before: 1,
            },
        });
        let r = c
            .forward(forward_request("the-secret", put, 1, Vec::new()))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(r.error_kind(), ForwardError::Unavailable, "{}", r.error);
        node.shutdown().await;
    }

    /// Every method's limit admits the largest message it legitimately
    /// carries: a forwarded put of a payload at the ceiling with the most
    /// and largest tags, a full snapshot chunk, a vote.
    #[test]
    fn method_limits_fit_the_largest_legitimate_messages() {
        use crate::queue::{MAX_PAYLOAD_CEILING, NewItem, Tags};
        use prost::Message as _;
        assert_eq!(CallSize::of("/eddy.raft.Raft/Vote"), CallSize::Control);
        assert_eq!(CallSize::of("/eddy.raft.Raft/Forward"), CallSize::Forward);
        assert_eq!(
            CallSize::of("/eddy.raft.Raft/ForwardStream"),
            CallSize::Forward
        );
        assert_eq!(
            CallSize::of("/eddy.raft.Raft/StreamAppend"),
            CallSize::Replication
        );
        assert_eq!(
            CallSize::of("/eddy.raft.Raft/InstallSnapshot"),
            CallSize::Snapshot
        );
        assert_eq!(CallSize::of("/other.Svc/Forward"), CallSize::Control);

        let tags: Tags = (0..32)
            .map(|i| (format!("{i:0>128}"), "v".repeat(1024)))
            .collect();
        let item = NewItem {
            request_id: "r".repeat(128),
            tags,
            data: bytes::Bytes::from(vec![0u8; MAX_PAYLOAD_CEILING as usize]),
            priority: u32::MAX,
            path: "p".repeat(1024),
        };
        let largest = [
            Command::Put {
                queue: QueueRef::new("s".repeat(128), QueueKind::Input),
                item: item.clone(),
            },
            Command::Complete {
                service: "s".repeat(128),
                group: "g".repeat(128),
                input_index: u64::MAX,
                result: Some(item),
            },
        ];
        for command in largest {
            let request = ForwardRequest {
                command: encode(&Envelope {
                    id: u128::MAX,
                    now_ms: u64::MAX,
                    command,
                })
                .into(),
                from: u64::MAX,
                admin_proof: vec![0u8; 32].into(),
            };
            assert!(request.encoded_len() <= FORWARD_MESSAGE_LIMIT);
        }
        let chunk = SnapshotChunk {
            target: u64::MAX,
            meta: Default::default(),
            data: vec![0u8; SNAPSHOT_CHUNK].into(),
        };
        assert!(chunk.encoded_len() <= SNAPSHOT_MESSAGE_LIMIT);
        let vote = openraft::raft::VoteRequest::<super::super::types::TypeConfig> {
            vote: Vote::new(u64::MAX, u64::MAX),
            last_log_id: Some(
                openraft::testing::log_id::<super::super::types::TypeConfig>(
                    u64::MAX,
                    u64::MAX,
                    u64::MAX,
                ),
            ),
            leadership_transfer: true,
        };
        let request = RaftRequest {
            target: u64::MAX,
            body: encode(&vote).into(),
            leader_quorum_age_ms: None,
        };
        assert!(request.encoded_len() <= CONTROL_MESSAGE_LIMIT);
    }

    mod decode_fuzz {
        //! The peer message decoder on arbitrary and mutated input (bounded
        //! case counts, so a CI run takes seconds): it never panics or
        //! recurses without bound, and what it accepts re-encodes to itself.
        use proptest::prelude::*;

        use super::super::super::network::{decode, encode};
        use super::super::super::types::{Entry, SnapshotMeta, Vote};
        use crate::queue::{
            Command, Envelope, Frame, NewItem, QueueKind, QueueRef, QueueState, Rejection, Reply,
            Tags,
        };

        type AppendRequest =
            openraft::raft::AppendEntriesRequest<super::super::super::types::TypeConfig>;
        type VoteRequest = openraft::raft::VoteRequest<super::super::super::types::TypeConfig>;

        fn sample_envelopes() -> Vec<Vec<u8>> {
            let queue = QueueRef::new("svc", QueueKind::Input);
            let put = Command::Put {
                queue: queue.clone(),
                item: NewItem {
                    request_id: "r-1".into(),
                    tags: Tags::from([("k".to_string(), "v".to_string())]),
                    data: bytes::Bytes::from_static(b"payload"),
                    priority: 3,
                    path: "/p".into(),
                },
            };
            let commit = Command::Truncate { queue, before: 9 };
            [
                put.clone(),
                commit.clone(),
                Command::Batch(vec![put, commit]),
                Command::Tick,
            ]
            .into_iter()
            .enumerate()
            .map(|(i, command)| {
                encode(&Envelope {
                    id: i as u128 + 1,
                    now_ms: 1_000,
                    command,
                })
            })
            .collect()
        }

        fn check_envelope(bytes: &[u8]) {
            if let Ok(e) = decode::<Envelope>(bytes) {
                assert!(!e.command.has_nested_batch(), "a nested batch was decoded");
                let again: Envelope = decode(&encode(&e)).expect("re-encoded envelope decodes");
                assert_eq!(again, e);
            }
        }

        fn check_raft_messages(bytes: &[u8]) {
            let _ = decode::<AppendRequest>(bytes);
            let _ = decode::<VoteRequest>(bytes);
            let _ = decode::<(Vote, SnapshotMeta)>(bytes);
            let _ = decode::<Vec<Entry>>(bytes);
        }

        /// Forwarded answers, and the de-duplication table that snapshots
        /// carry (the queue state, decoded with the same types).
        fn sample_replies() -> Vec<Vec<u8>> {
            let frame = Frame {
                index: 4,
                tags: Tags::from([("k".to_string(), "v".to_string())]),
                data: bytes::Bytes::from_static(b"payload"),
                path: "/p".into(),
                message: String::new(),
                deliveries: 0,
            };
            let put = Reply::Put {
                index: 3,
                request_id: "r-1".into(),
            };
            let items = Reply::Items(vec![frame]);
            let rejected = Reply::Rejected(Rejection::TooLarge { size: 9, limit: 1 });
            [
                put.clone(),
                items.clone(),
                Reply::batch(vec![put, items, rejected]),
                Reply::Done,
            ]
            .iter()
            .map(encode)
            .collect()
        }

        fn check_reply(bytes: &[u8]) {
            if let Ok(r) = decode::<Reply>(bytes) {
                assert!(!r.has_nested_batch(), "a nested reply batch was decoded");
                let again: Reply = decode(&encode(&r)).expect("re-encoded reply decodes");
                assert_eq!(again, r);
            }
            let _ = decode::<QueueState>(bytes);
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic_the_peer_decoder(
                bytes in proptest::collection::vec(any::<u8>(), 0..512)
            ) {
                check_envelope(&bytes);
                check_raft_messages(&bytes);
                check_reply(&bytes);
            }

            #[test]
            fn mutated_envelopes_decode_to_valid_commands_or_errors(
                which in 0usize..4,
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                cut in any::<prop::sample::Index>(),
                nest in proptest::collection::vec(Just(14u8), 0..64),
            ) {
                let mut bytes = sample_envelopes()[which].clone();
                for (at, value) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = value;
                }
                // Sometimes splice batch tags into the command position.
                let at = cut.index(bytes.len());
                let mut spliced = bytes[..at].to_vec();
                for tag in &nest {
                    spliced.extend_from_slice(&[*tag, 1]);
                }
                spliced.extend_from_slice(&bytes[at..]);
                check_envelope(&bytes);
                check_envelope(&spliced);
                check_raft_messages(&spliced);
            }

            #[test]
            fn mutated_replies_decode_to_flat_replies_or_errors(
                which in 0usize..4,
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                cut in any::<prop::sample::Index>(),
                nest in 0usize..64,
            ) {
                let mut bytes = sample_replies()[which].clone();
                for (at, value) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = value;
                }
                // Sometimes splice reply batch openings into the middle.
                let open = {
                    let one = encode(&Reply::batch(vec![Reply::Done]));
                    one[..one.len() - encode(&Reply::Done).len()].to_vec()
                };
                let at = cut.index(bytes.len());
                let mut spliced = bytes[..at].to_vec();
                spliced.extend_from_slice(&open.repeat(nest));
                spliced.extend_from_slice(&bytes[at..]);
                check_reply(&bytes);
                check_reply(&spliced);
            }
        }
    }
}
