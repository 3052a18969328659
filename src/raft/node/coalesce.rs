//! Coalescing: envelopes proposed on one node while earlier ones are still
//! on their way travel together.
//!
//! Two routes, one shape:
//! - [`Route::Log`], on the leader: envelopes that arrive while
//!   [`MAX_IN_FLIGHT`] entries of this node are being written wait, then go
//!   into the log together as one [`Command::Coalesced`] entry.
//! - [`Route::Leader`], on any other node: data-plane envelopes that arrive
//!   while [`MAX_IN_FLIGHT`] forwards are out go to the leader together as
//!   one group on the node's forward stream (`forward_stream`; one
//!   `ForwardBatch` call to a leader of an earlier version), and the leader
//!   proposes them together (so they share its entries too).
//!
//! Why: every log entry and every forward costs the same fixed work
//! whatever it holds (a trip through openraft's core, a log record, a
//! replication message per follower, an apply; a gRPC call), and on a
//! loaded cluster that work, not the disk, limits puts and commits. Under
//! light load nothing waits: an envelope goes alone, as it always did, with
//! one task hop added.
//!
//! Each route has two lanes, each its own coalescer with its own
//! [`MAX_IN_FLIGHT`]: commands that end or give back a consumer's work
//! (commits, negative commits, completions, detaches;
//! [`Command::releases_work`]) and everything else. Under a flood of puts a
//! commit then waits for no put group, so consumers' window slots come back
//! as fast as the log commits, and the queue drains instead of growing.
//! Within a lane groups form in the order envelopes were handed over. A
//! proposer that waits for each answer before the next keeps its order in
//! any lane; one that gave up on an answer (outcome unknown) and went on
//! may see its next command applied first, in either lane, since several
//! groups are out at once.
//!
//! Invariants:
//! - Envelopes keep their ids; the state machine applies each as its own
//!   entry would be applied (de-duplicated by id, in order), so coalescing
//!   changes no reply and no state, only how many entries carry them.
//! - Every envelope in one entry is stamped with one reading of the leader's
//!   cluster clock, taken when the entry is formed.
//! - A group is at most [`MAX_ENVELOPES`] envelopes and, unless it is a
//!   single envelope, at most [`MAX_GROUP_BYTES`] encoded: entries and
//!   forwards stay within the peer message limits.
//! - Each waiting proposer gets exactly one answer: its own reply, or the
//!   error of the entry or call that carried it. One whose answer is lost
//!   sees "outcome unknown" and retries the same envelope, which the state
//!   machine applies once.

use std::sync::{Arc, Weak};
use std::time::Instant;

use openraft::async_runtime::WatchReceiver;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::forward_stream::NotForwarded;
use super::{ProposeError, RaftNode};
use crate::latency::Stage;
use crate::queue::{Command, Envelope, Reply};
use crate::raft::network::encode;
use crate::raft::pb::{ForwardBatchRequest, ForwardError, ForwardReply};

/// Groups a coalescer may have out at once. With a few proposers each
/// still gets a group of its own (two left four producers waiting 0.2 ms
/// for a slot); with many, those arriving while all are out wait and share
/// a group.
const MAX_IN_FLIGHT: usize = 4;
/// At most this many envelopes share a group.
const MAX_ENVELOPES: usize = 512;
/// A group of several envelopes stays within this many encoded bytes (a
/// single larger envelope still goes, alone).
const MAX_GROUP_BYTES: usize = 1 << 20;
/// What an envelope weighs beside its payload on the route into the log
/// (ids, clock, request id, tags: bounded by the request's header limits).
const ENVELOPE_WEIGHT: usize = 256;

type Answer = oneshot::Sender<Result<Reply, ProposeError>>;

/// Where a coalescer sends its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Into this node's log (it leads).
    Log,
    /// To the leader, as one group on its forward stream.
    Leader,
}

/// One envelope waiting for its group.
struct Waiting {
    envelope: Envelope,
    /// Its encoding, made once, on the route to the leader (which sends
    /// it); none on the route into the log (which encodes the entry).
    encoded: Option<Vec<u8>>,
    /// What it weighs in its group's byte bound: its encoded length, or on
    /// the route into the log the payload it adds and [`ENVELOPE_WEIGHT`].
    weight: usize,
    answer: Answer,
    /// When it was handed over (for the latency budget).
    since: Instant,
}

/// The two lanes of one route.
pub(super) struct Lanes {
    /// Commands that end a consumer's work.
    release: Coalescer,
    /// Everything else.
    other: Coalescer,
}

impl Lanes {
    /// Start both lanes' tasks for `node` on `route`.
    pub(super) fn start(node: Weak<RaftNode>, route: Route) -> (Self, [CoalescerTask; 2]) {
        let (release, release_task) = Coalescer::start(node.clone(), route);
        let (other, other_task) = Coalescer::start(node, route);
        (Self { release, other }, [release_task, other_task])
    }

    /// Hand `envelope` to its lane and wait for its reply.
    pub(super) async fn write(&self, envelope: Envelope) -> Result<Reply, ProposeError> {
        let lane = if envelope.command.releases_work() {
            &self.release
        } else {
            &self.other
        };
        lane.write(envelope).await
    }
}

/// The queue of envelopes waiting for a group on one lane of a route.
pub(super) struct Coalescer {
    waiting: mpsc::UnboundedSender<(Envelope, Answer, Instant)>,
}

impl Coalescer {
    /// Start the task that forms groups for `node`; it ends when the node
    /// is dropped.
    pub(super) fn start(node: Weak<RaftNode>, route: Route) -> (Self, CoalescerTask) {
        let (waiting, rx) = mpsc::unbounded_channel();
        (
            Self { waiting },
            CoalescerTask {
                node,
                route,
                rx,
                carried: None,
            },
        )
    }

    /// Hand `envelope` to the coalescer and wait for its reply.
    pub(super) async fn write(&self, envelope: Envelope) -> Result<Reply, ProposeError> {
        let (answer, answered) = oneshot::channel();
        self.waiting
            .send((envelope, answer, Instant::now()))
            .map_err(|_| ProposeError::ShuttingDown)?;
        answered.await.unwrap_or_else(|_| {
            Err(ProposeError::Unavailable(
                "the write carrying this command was abandoned; outcome unknown".into(),
            ))
        })
    }
}

pub(super) struct CoalescerTask {
    node: Weak<RaftNode>,
    route: Route,
    rx: mpsc::UnboundedReceiver<(Envelope, Answer, Instant)>,
    /// An envelope that did not fit the last group: it starts the next.
    carried: Option<Waiting>,
}

impl CoalescerTask {
    pub(super) async fn run(mut self) {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let Some(group) = self.next_group().await else {
                return;
            };
            let Some(node) = self.node.upgrade() else {
                return;
            };
            let route = self.route;
            let waited = match route {
                Route::Log => Stage::CoalesceLog,
                Route::Leader => Stage::CoalesceForward,
            };
            for w in &group {
                waited.record(w.since.elapsed());
            }
            tokio::spawn(async move {
                match route {
                    Route::Log => write_entry(&node, group).await,
                    Route::Leader => forward_group(&node, group).await,
                }
                drop(slot);
            });
        }
    }

    /// Wait for one envelope, then take every other that is already
    /// waiting, within the group's bounds.
    async fn next_group(&mut self) -> Option<Vec<Waiting>> {
        let first = match self.carried.take() {
            Some(w) => w,
            None => waiting(self.route, self.rx.recv().await?),
        };
        let mut bytes = first.weight;
        let mut group = vec![first];
        while group.len() < MAX_ENVELOPES {
            let Ok(next) = self.rx.try_recv() else { break };
            let next = waiting(self.route, next);
            if bytes + next.weight > MAX_GROUP_BYTES {
                self.carried = Some(next);
                break;
            }
            bytes += next.weight;
            group.push(next);
        }
        Some(group)
    }
}

fn waiting(route: Route, (envelope, answer, since): (Envelope, Answer, Instant)) -> Waiting {
    let (encoded, weight) = match route {
        Route::Leader => {
            let encoded = encode(&envelope);
            let weight = encoded.len();
            (Some(encoded), weight)
        }
        Route::Log => (
            None,
            envelope.command.added_bytes() as usize + ENVELOPE_WEIGHT,
        ),
    };
    Waiting {
        envelope,
        encoded,
        weight,
        answer,
        since,
    }
}

/// Write `group` as one log entry (a lone envelope as itself) and answer
/// each of its proposers.
async fn write_entry(node: &RaftNode, mut group: Vec<Waiting>) {
    let now_ms = node.cluster_clock_ms();
    if group.len() == 1 {
        let Waiting {
            mut envelope,
            answer,
            ..
        } = group.pop().expect("one envelope");
        envelope.now_ms = now_ms;
        let started = Instant::now();
        let result = node.raft.client_write(envelope).await;
        Stage::RaftWrite.record(started.elapsed());
        let _ = answer.send(result.map(|r| r.data).map_err(ProposeError::from));
        return;
    }
    let (envelopes, answers): (Vec<Envelope>, Vec<Answer>) = group
        .into_iter()
        .map(|mut w| {
            w.envelope.now_ms = now_ms;
            (w.envelope, w.answer)
        })
        .unzip();
    let coalesced = Envelope {
        id: uuid::Uuid::new_v4().as_u128(),
        now_ms,
        command: Command::Coalesced(envelopes),
    };
    let started = Instant::now();
    let written = node.raft.client_write(coalesced).await;
    Stage::RaftWrite.record(started.elapsed());
    let replies = match written {
        Ok(resp) => match resp.data {
            Reply::Coalesced(replies) if replies.len() == answers.len() => {
                replies.into_iter().map(Ok).collect()
            }
            other => {
                let why = format!("a coalesced entry was answered {other:?}");
                vec![Err(ProposeError::Fatal(why)); answers.len()]
            }
        },
        Err(e) => vec![Err(ProposeError::from(e)); answers.len()],
    };
    for (answer, reply) in answers.into_iter().zip(replies) {
        let _ = answer.send(reply);
    }
}

/// Forward `group` to the leader as one group on the forward stream (to a
/// leader of an earlier version: in one call, a lone envelope by itself)
/// and answer each proposer.
async fn forward_group(node: &RaftNode, group: Vec<Waiting>) {
    let leader = node.raft.metrics().borrow_watched().current_leader;
    let Some(leader) = leader.filter(|l| *l != node.id) else {
        // The leader changed since these were handed over: each proposer
        // waits for the next one and tries again.
        for w in group {
            let _ = w.answer.send(Err(ProposeError::NotLeader { leader }));
        }
        return;
    };
    forward_group_to(node, leader, group).await
}

/// Forward `group` to `leader`: on the forward stream, or to a leader
/// without it in one `ForwardBatch` call (or a call each).
async fn forward_group_to(node: &RaftNode, leader: u64, mut group: Vec<Waiting>) {
    let sent = forward_over_stream(node, leader, &mut group).await;
    let Some(mut group) = answer_unless_unsupported(group, sent) else {
        return;
    };
    if group.len() > 1 {
        let sent = forward_batch(node, leader, &mut group).await;
        match answer_unless_unsupported(group, sent) {
            Some(unsent) => group = unsent,
            None => return,
        }
    }
    let forwards = group.into_iter().map(|w| async move {
        let reply = node
            .forward(leader, &w.envelope, super::Origin::DataPlane)
            .await;
        let _ = w.answer.send(reply);
    });
    futures::future::join_all(forwards).await;
}

/// Answer each proposer of `group` from what one route made of it; the
/// group back, unanswered, if the leader does not know the route.
fn answer_unless_unsupported(
    group: Vec<Waiting>,
    sent: Result<Vec<Result<Reply, ProposeError>>, NotForwarded>,
) -> Option<Vec<Waiting>> {
    match sent {
        Ok(replies) => {
            for (w, reply) in group.into_iter().zip(replies) {
                let _ = w.answer.send(reply);
            }
            None
        }
        Err(NotForwarded::Failed(e)) => {
            for w in group {
                let _ = w.answer.send(Err(e.clone()));
            }
            None
        }
        Err(NotForwarded::Unsupported) => Some(group),
    }
}

/// The group's envelopes as they travel (each encoded once).
fn encoded_commands(group: &mut [Waiting]) -> Vec<bytes::Bytes> {
    group
        .iter_mut()
        .map(|w| match w.encoded.take() {
            Some(bytes) => bytes.into(),
            None => encode(&w.envelope).into(),
        })
        .collect()
}

/// What `leader`'s replies to a group of `sent` commands mean to their
/// proposers: one reply per command, or none of them.
fn replies_to_group(
    leader: u64,
    sent: usize,
    replies: Vec<ForwardReply>,
) -> Result<Vec<Result<Reply, ProposeError>>, NotForwarded> {
    if replies.len() != sent {
        return Err(NotForwarded::Failed(ProposeError::Unavailable(format!(
            "node {leader} answered {} of {sent} forwarded commands",
            replies.len(),
        ))));
    }
    Ok(replies
        .into_iter()
        .map(|r| forward_reply(leader, r))
        .collect())
}

/// Send `group` to the leader on this node's forward stream.
async fn forward_over_stream(
    node: &RaftNode,
    leader: u64,
    group: &mut [Waiting],
) -> Result<Vec<Result<Reply, ProposeError>>, NotForwarded> {
    let commands = encoded_commands(group);
    // (A lane's envelopes all release work, or none does.)
    let lane = usize::from(group[0].envelope.command.releases_work());
    let started = Instant::now();
    let replies = node
        .forward_streams
        .send(node, lane, leader, commands)
        .await;
    if !matches!(replies, Err(NotForwarded::Unsupported)) {
        Stage::Forward.record(started.elapsed());
    }
    replies_to_group(leader, group.len(), replies?)
}

/// Send `group` to the leader in one `ForwardBatch` call.
async fn forward_batch(
    node: &RaftNode,
    leader: u64,
    group: &mut [Waiting],
) -> Result<Vec<Result<Reply, ProposeError>>, NotForwarded> {
    let mut client = node.peer_client(leader).map_err(NotForwarded::Failed)?;
    let req = crate::raft::network::authorized(
        &node.secret,
        ForwardBatchRequest {
            commands: encoded_commands(group),
            from: node.id,
            seq: 0,
        },
        Some(super::PROPOSE_DEADLINE),
    );
    let started = Instant::now();
    let answer = client.forward_batch(req).await;
    Stage::Forward.record(started.elapsed());
    let replies = match answer {
        Ok(r) => r.into_inner().replies,
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            return Err(NotForwarded::Unsupported);
        }
        Err(s) => {
            return Err(NotForwarded::Failed(ProposeError::Unavailable(format!(
                "forward to node {leader}: {}",
                s.message()
            ))));
        }
    };
    replies_to_group(leader, group.len(), replies)
}

/// What one forwarded command's answer means to its proposer.
pub(super) fn forward_reply(leader: u64, reply: ForwardReply) -> Result<Reply, ProposeError> {
    use crate::raft::network::decode;
    match reply.error_kind() {
        // A reply without a kind but with an error comes from a node of
        // another version (see raft.proto): retried, never misread.
        ForwardError::None if reply.reply.is_empty() && !reply.error.is_empty() => {
            Err(ProposeError::Unavailable(reply.error))
        }
        ForwardError::None => decode(&reply.reply).map_err(ProposeError::Unavailable),
        ForwardError::NotLeader => Err(ProposeError::NotLeader { leader: None }),
        ForwardError::Rejected => Err(ProposeError::Refused(reply.error)),
        ForwardError::NoSpace => Err(ProposeError::NoSpace(format!(
            "node {leader}: {}",
            reply.error
        ))),
        ForwardError::Unavailable => Err(ProposeError::Unavailable(reply.error)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::config::NodeConfig;
    use crate::raft::Peer;
    use crate::raft::pb::raft_server::{Raft as RaftService, RaftServer};
    use crate::raft::pb::{
        ForwardBatchReply, ForwardRequest, RaftReply, RaftRequest, SnapshotChunk,
    };

    /// A peer of an earlier version: it knows `ForwardBatch` and `Forward`,
    /// which it answers `Reply::Done`, and no `ForwardStream`. Counts the
    /// calls it gets.
    #[derive(Default)]
    struct EarlierLeader {
        streams: AtomicUsize,
        batches: AtomicUsize,
        singles: AtomicUsize,
    }

    type Replies<T> = futures::stream::BoxStream<'static, Result<T, Status>>;

    fn done() -> ForwardReply {
        ForwardReply {
            reply: encode(&Reply::Done).into(),
            ..Default::default()
        }
    }

    #[tonic::async_trait]
    impl RaftService for Arc<EarlierLeader> {
        async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unavailable("not in this test"))
        }
        async fn pre_vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unavailable("not in this test"))
        }
        async fn append_entries(
            &self,
            _: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unavailable("not in this test"))
        }
        type StreamAppendStream = Replies<RaftReply>;
        async fn stream_append(
            &self,
            _: Request<Streaming<RaftRequest>>,
        ) -> Result<Response<Self::StreamAppendStream>, Status> {
            Err(Status::unavailable("not in this test"))
        }
        async fn install_snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unavailable("not in this test"))
        }
        async fn forward(
            &self,
            _: Request<ForwardRequest>,
        ) -> Result<Response<ForwardReply>, Status> {
            self.singles.fetch_add(1, Ordering::Relaxed);
            Ok(Response::new(done()))
        }
        async fn forward_batch(
            &self,
            req: Request<ForwardBatchRequest>,
        ) -> Result<Response<ForwardBatchReply>, Status> {
            self.batches.fetch_add(1, Ordering::Relaxed);
            let replies = req.get_ref().commands.iter().map(|_| done()).collect();
            Ok(Response::new(ForwardBatchReply { replies, seq: 0 }))
        }
        type ForwardStreamStream = Replies<ForwardBatchReply>;
        /// What a server without the method answers.
        async fn forward_stream(
            &self,
            _: Request<Streaming<ForwardBatchRequest>>,
        ) -> Result<Response<Self::ForwardStreamStream>, Status> {
            self.streams.fetch_add(1, Ordering::Relaxed);
            Err(Status::unimplemented("unknown method ForwardStream"))
        }
        async fn read_index(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unavailable("not in this test"))
        }
    }

    fn free_port() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("127.0.0.1:{port}")
    }

    /// Forward `n` envelopes from `node` to `leader` as one group; their
    /// answers.
    async fn forward_envelopes(
        node: &RaftNode,
        leader: u64,
        n: u128,
    ) -> Vec<Result<Reply, ProposeError>> {
        let mut answers = Vec::new();
        let group = (0..n)
            .map(|id| {
                let (answer, answered) = oneshot::channel();
                answers.push(answered);
                waiting(
                    Route::Leader,
                    (
                        Envelope {
                            id,
                            now_ms: 0,
                            command: Command::Tick,
                        },
                        answer,
                        Instant::now(),
                    ),
                )
            })
            .collect();
        forward_group_to(node, leader, group).await;
        let mut replies = Vec::new();
        for answered in answers {
            replies.push(answered.await.unwrap());
        }
        replies
    }

    async fn done_replies(node: &RaftNode, leader: u64, n: u128) -> Vec<Reply> {
        forward_envelopes(node, leader, n)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    /// Node 1 of two, node 2 being at `peer_addr` (not started here), once
    /// it knows node 2 as a member.
    async fn node_beside(peer_addr: String) -> (Arc<RaftNode>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let own_addr = free_port();
        let mut config = NodeConfig::for_tests(1, dir.path().to_path_buf(), 0, 0);
        config.raft_listen = own_addr.parse().unwrap();
        config.advertise_raft = own_addr.clone();
        config.cluster_secret = "the-secret".into();
        config.peers = vec![
            Peer {
                id: 1,
                raft_addr: own_addr.clone(),
                api_addr: "127.0.0.1:1".into(),
            },
            Peer {
                id: 2,
                raft_addr: peer_addr,
                api_addr: "127.0.0.1:1".into(),
            },
        ];
        let advertise = config.peers[0].clone();
        let (node, _events) = RaftNode::start(Arc::new(config), advertise).await.unwrap();
        // It formed the cluster: it knows node 2 once its first entry is in.
        let mut metrics = node.raft.metrics();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            metrics.wait_until(|m| m.membership_config.membership().voter_ids().count() == 2),
        )
        .await
        .expect("the membership is known")
        .unwrap();
        (node, dir)
    }

    /// During a rolling upgrade a node forwards to a leader of an earlier
    /// version, which has no `ForwardStream`: the groups go by
    /// `ForwardBatch` (a lone envelope by `Forward`), and the stream is not
    /// asked for again for each group.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_without_the_forward_stream_gets_batch_calls() {
        let earlier = Arc::new(EarlierLeader::default());
        let earlier_addr = free_port();
        let listener = tokio::net::TcpListener::bind(&earlier_addr).await.unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(earlier.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (node, _dir) = node_beside(earlier_addr).await;

        assert_eq!(done_replies(&node, 2, 3).await, vec![Reply::Done; 3]);
        assert_eq!(done_replies(&node, 2, 1).await, vec![Reply::Done]);
        assert_eq!(done_replies(&node, 2, 2).await, vec![Reply::Done; 2]);
        assert_eq!(
            earlier.streams.load(Ordering::Relaxed),
            1,
            "stream asked for once"
        );
        assert_eq!(earlier.batches.load(Ordering::Relaxed), 2);
        assert_eq!(earlier.singles.load(Ordering::Relaxed), 1);
        assert_eq!(node.forward_streams_opened(), 0);
        node.shutdown().await;
        server.abort();
    }

    /// A leader that takes connections and never answers (hung, or out of
    /// connection slots with the kernel still accepting), at the address it
    /// returns; each connection it takes is announced on the receiver.
    async fn silent_leader() -> (
        String,
        mpsc::UnboundedReceiver<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (taken, connections) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                let _ = taken.send(());
            }
        });
        (addr, connections, task)
    }

    /// The groups waiting to be forwarded to a silent leader fail together
    /// within the open's bound, not one open after another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_for_a_leader_that_never_answers_fail_together() {
        let (addr, _connections, silent) = silent_leader().await;
        let (node, _dir) = node_beside(addr).await;
        let started = Instant::now();
        let groups = (0..8).map(|_| forward_envelopes(&node, 2, 1));
        let answers: Vec<_> = futures::future::join_all(groups)
            .await
            .into_iter()
            .flatten()
            .collect();
        let took = started.elapsed();
        assert_eq!(answers.len(), 8);
        assert!(answers.iter().all(|a| a.is_err()), "{answers:?}");
        assert!(
            took < std::time::Duration::from_secs(3),
            "8 groups for a silent leader failed after {took:?}"
        );
        node.shutdown().await;
        silent.abort();
    }

    /// A node stopping while it opens a stream to a silent leader does not
    /// wait for the open's bound: the open gives up, its group is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_stops_at_once_while_it_opens_a_forward_stream() {
        let (addr, mut connections, silent) = silent_leader().await;
        let (node, _dir) = node_beside(addr).await;
        let forwarding = {
            let node = node.clone();
            tokio::spawn(async move { forward_envelopes(&node, 2, 1).await })
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), connections.recv())
            .await
            .expect("the node connects to the leader");
        let stopping = Instant::now();
        node.shutdown().await;
        let took = stopping.elapsed();
        println!("shutdown took {took:?}");
        assert!(
            took < std::time::Duration::from_millis(700),
            "shutdown during an open took {took:?}"
        );
        let answers = forwarding.await.unwrap();
        assert!(matches!(answers[..], [Err(_)]), "{answers:?}");
        silent.abort();
    }
}
