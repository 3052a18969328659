//! Forwarding to the leader over one long-lived gRPC stream instead of a
//! call per group.
//!
//! A unary call costs a trip through the channel's buffer task, a new
//! HTTP/2 stream with its headers, and a task per call on the leader; a
//! message on an open stream costs none of these. On the machine the
//! project is measured on, a 300-byte echo took 0.25 ms as a unary call and
//! 0.13 ms on an open bidirectional stream, and a forward is most of what a
//! write through a follower adds.
//!
//! - One stream per lane of the forwarder (commands that release a
//!   consumer's work, and the rest), to the leader this node forwards to,
//!   so a commit never queues behind a large put group on one HTTP/2
//!   stream; a forward to another leader closes the lane's stream and opens
//!   one to that leader.
//! - Opening is bounded by [`OPEN_TIMEOUT`]; an open that timed out is
//!   remembered for [`OPEN_RETRY`], so the groups that waited for it fail at
//!   once instead of each waiting out the bound again in turn (an open that
//!   fails at once, say a refused connection, is not: the next may work).
//! - Each group is one `ForwardBatchRequest` with a number of its own
//!   (`seq`); the leader answers each with that number, in whatever order
//!   they are written (it writes groups concurrently).
//! - A stream that breaks, is cut (partition tests), or leaves a group
//!   unanswered past [`PROPOSE_DEADLINE`] (and [`ANSWER_MARGIN`]) is closed: every group waiting on
//!   it is answered "outcome unknown", and its proposer tries the same
//!   envelope again (the state machine applies an envelope once). The next
//!   forward opens a new stream.
//! - A leader of an earlier version answers `Unimplemented`; the caller then
//!   forwards with unary calls, and the stream is tried again after
//!   [`UNSUPPORTED_RECHECK`] (the leader may have been upgraded).
//!
//! Invariants:
//! - A group is queued to be sent and registered under its number under
//!   one lock, so its answer always finds it; every registered group gets
//!   exactly one answer: its replies, or (by the drop of its sender when
//!   the stream closes or its wait ends) an error.
//! - A closed stream takes no more groups: registering and closing happen
//!   under one lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};

use super::{PROPOSE_DEADLINE, ProposeError, RaftNode};
use crate::raft::network::authorized;
use crate::raft::pb::{ForwardBatchRequest, ForwardReply};

/// How long a leader that does not know the stream is forwarded to with
/// unary calls before the stream is tried again.
const UNSUPPORTED_RECHECK: Duration = Duration::from_secs(60);
/// How long opening a stream may take: a connection (at most 0.5 s), the
/// HTTP/2 handshake and the leader's answer, each a round trip on a
/// healthy link.
const OPEN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an open that timed out answers the groups that ask for the
/// same leader before one tries again (about a proposal's pause between
/// tries).
const OPEN_RETRY: Duration = Duration::from_millis(200);
/// How much longer than the propose deadline a group's answer is waited
/// for.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// Why a group was not forwarded by one route (the stream, or a
/// `ForwardBatch` call).
pub(super) enum NotForwarded {
    /// The leader runs a version without the route's method: try the next.
    Unsupported,
    /// Not sent, or sent with no answer (outcome unknown).
    Failed(ProposeError),
}

/// This node's streams to the leader it forwards to, one per lane.
#[derive(Default)]
pub(super) struct ForwardStreams {
    lanes: [tokio::sync::Mutex<Option<Link>>; 2],
    opened: AtomicU64,
}

enum Link {
    Open(Arc<Stream>),
    Unsupported {
        leader: u64,
        since: Instant,
    },
    /// The last open timed out: groups for `leader` get `why` until
    /// `until`.
    Failed {
        leader: u64,
        until: Instant,
        why: ProposeError,
    },
}

impl Drop for ForwardStreams {
    /// As [`ForwardStreams::close`], for a node dropped without a shutdown.
    fn drop(&mut self) {
        for lane in &mut self.lanes {
            if let Some(Link::Open(stream)) = lane.get_mut() {
                stream.close();
            }
        }
    }
}

/// One open stream.
struct Stream {
    leader: u64,
    state: Mutex<StreamState>,
    /// Wakes the task reading the stream's answers when the stream is
    /// closed from this side.
    closing: Notify,
}

struct StreamState {
    /// None once closed: no more groups are taken.
    requests: Option<mpsc::UnboundedSender<ForwardBatchRequest>>,
    next_seq: u64,
    waiting: HashMap<u64, oneshot::Sender<Vec<ForwardReply>>>,
}

impl Stream {
    fn is_closed(&self) -> bool {
        self.state.lock().unwrap().requests.is_none()
    }

    /// Take no more groups, answer every waiting one with an error (by
    /// dropping its sender), and stop reading answers.
    fn close(&self) {
        let mut state = self.state.lock().unwrap();
        state.requests = None;
        state.waiting.clear();
        drop(state);
        self.closing.notify_one();
    }

    /// Register a group and send it; the receiver gets its replies.
    fn send(
        &self,
        commands: Vec<bytes::Bytes>,
        from: u64,
    ) -> Option<oneshot::Receiver<Vec<ForwardReply>>> {
        let mut state = self.state.lock().unwrap();
        let seq = state.next_seq;
        let requests = state.requests.as_ref()?;
        let (answer, answered) = oneshot::channel();
        let queued = requests.send(ForwardBatchRequest {
            commands,
            from,
            seq,
        });
        if queued.is_err() {
            // The stream's request side is gone: take no more groups.
            state.requests = None;
            return None;
        }
        state.next_seq += 1;
        state.waiting.insert(seq, answer);
        Some(answered)
    }

    fn answer(&self, seq: u64, replies: Vec<ForwardReply>) {
        let waiting = self.state.lock().unwrap().waiting.remove(&seq);
        if let Some(answer) = waiting {
            let _ = answer.send(replies);
        }
    }
}

impl ForwardStreams {
    /// Streams this node has opened (each after the last one closed, or to
    /// another leader).
    pub(super) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Close the open stream, if any (the node stops): its groups are
    /// answered "outcome unknown", and the leader sees the stream end.
    pub(super) async fn close(&self) {
        for lane in &self.lanes {
            if let Some(Link::Open(stream)) = lane.lock().await.take() {
                stream.close();
            }
        }
    }

    /// Send `commands` to `leader` as one group on `lane`'s stream (1:
    /// commands that release a consumer's work) and wait for their
    /// replies, one per command, in order.
    pub(super) async fn send(
        &self,
        node: &RaftNode,
        lane: usize,
        leader: u64,
        commands: Vec<bytes::Bytes>,
    ) -> Result<Vec<ForwardReply>, NotForwarded> {
        let lane = &self.lanes[lane];
        let mut sent = None;
        // A stream that closed just before the group went (it broke, or a
        // group on it timed out) gets one successor.
        for _ in 0..2 {
            let stream = self.stream_to(node, lane, leader).await?;
            if let Some(answered) = stream.send(commands.clone(), node.id) {
                sent = Some((stream, answered));
                break;
            }
        }
        let Some((stream, answered)) = sent else {
            // Nothing went.
            return Err(NotForwarded::Failed(ProposeError::Unavailable(format!(
                "the forward stream to node {leader} closed"
            ))));
        };
        // The leader answers a group it could not write within the
        // deadline (counted from when it read the group) itself; this waits
        // a moment longer, so that a slow group does not close the stream
        // on the others.
        match tokio::time::timeout(PROPOSE_DEADLINE + ANSWER_MARGIN, answered).await {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(_)) => Err(NotForwarded::Failed(ProposeError::Unavailable(format!(
                "the forward stream to node {leader} broke; outcome unknown"
            )))),
            Err(_) => {
                // A leader that keeps a group this long may keep the
                // others too: start over on a new stream (closing it drops
                // this group's registration with the others').
                stream.close();
                Err(NotForwarded::Failed(ProposeError::Unavailable(format!(
                    "node {leader} did not answer a forward in time; outcome unknown"
                ))))
            }
        }
    }

    /// The lane's open stream to `leader`, opened now if there is none.
    async fn stream_to(
        &self,
        node: &RaftNode,
        lane: &tokio::sync::Mutex<Option<Link>>,
        leader: u64,
    ) -> Result<Arc<Stream>, NotForwarded> {
        let mut current = lane.lock().await;
        // (Checked under the lock that `close` takes after the node is
        // marked stopping: no stream is opened after it closed the last.)
        if *node.stopping.borrow() {
            return Err(NotForwarded::Failed(ProposeError::ShuttingDown));
        }
        match &*current {
            // (A cut is also noticed by the stream's reader; this closes
            // the moment before it does.)
            Some(Link::Open(s))
                if s.leader == leader && !s.is_closed() && !node.links.is_cut(leader) =>
            {
                return Ok(s.clone());
            }
            Some(Link::Unsupported { leader: l, since })
                if *l == leader && since.elapsed() < UNSUPPORTED_RECHECK =>
            {
                return Err(NotForwarded::Unsupported);
            }
            Some(Link::Failed {
                leader: l,
                until,
                why,
            }) if *l == leader && Instant::now() < *until => {
                return Err(NotForwarded::Failed(why.clone()));
            }
            Some(Link::Open(s)) => s.close(),
            _ => {}
        }
        *current = None;
        let opened = tokio::select! {
            opened = tokio::time::timeout(OPEN_TIMEOUT, self.open(node, leader)) => opened,
            () = node.stopped() => Ok(Err(NotForwarded::Failed(ProposeError::ShuttingDown))),
        };
        let opened = match opened {
            Ok(opened) => opened,
            Err(_) => {
                let why = ProposeError::Unavailable(format!(
                    "forward stream to node {leader}: no answer in {OPEN_TIMEOUT:?}"
                ));
                *current = Some(Link::Failed {
                    leader,
                    until: Instant::now() + OPEN_RETRY,
                    why: why.clone(),
                });
                return Err(NotForwarded::Failed(why));
            }
        };
        match opened {
            Ok(stream) => {
                *current = Some(Link::Open(stream.clone()));
                Ok(stream)
            }
            Err(NotForwarded::Unsupported) => {
                *current = Some(Link::Unsupported {
                    leader,
                    since: Instant::now(),
                });
                Err(NotForwarded::Unsupported)
            }
            Err(e @ NotForwarded::Failed(_)) => Err(e),
        }
    }

    /// Open a stream to `leader` and start reading its answers.
    async fn open(&self, node: &RaftNode, leader: u64) -> Result<Arc<Stream>, NotForwarded> {
        let mut client = node.peer_client(leader).map_err(NotForwarded::Failed)?;
        let (requests, to_send) = mpsc::unbounded_channel();
        // A cut ends the stream, as a broken connection would.
        let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(to_send)
            .take_until(node.links.until_cut(leader));
        let call = client.forward_stream(authorized(&node.secret, outgoing, None));
        let answers = match call.await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Err(NotForwarded::Unsupported);
            }
            Err(status) => {
                return Err(NotForwarded::Failed(ProposeError::Unavailable(format!(
                    "forward stream to node {leader}: {}",
                    status.message()
                ))));
            }
        };
        let stream = Arc::new(Stream {
            leader,
            state: Mutex::new(StreamState {
                requests: Some(requests),
                next_seq: 0,
                waiting: HashMap::new(),
            }),
            closing: Notify::new(),
        });
        self.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(read_answers(
            stream.clone(),
            answers,
            node.links.until_cut(leader),
        ));
        Ok(stream)
    }
}

/// Hand each answer on the stream to its group, until the stream ends, is
/// cut or is closed from this side; then close it.
async fn read_answers(
    stream: Arc<Stream>,
    mut answers: tonic::Streaming<crate::raft::pb::ForwardBatchReply>,
    cut: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(cut);
    loop {
        tokio::select! {
            answer = answers.message() => match answer {
                Ok(Some(reply)) => stream.answer(reply.seq, reply.replies),
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(leader = stream.leader, error = %status.message(), "forward stream broke");
                    break;
                }
            },
            () = &mut cut => break,
            () = stream.closing.notified() => break,
        }
    }
    stream.close();
}
