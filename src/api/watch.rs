//! Watches: WebSocket (binary frames, one `DataFrameProto` each) and HTTP
//! streaming (`[u32 BE length][DataFrameProto]` chunks), and the hub that
//! routes delivery events from the state machine to this node's
//! connections.
//!
//! A connection is registered with the hub before its `Attach` is proposed,
//! so no delivery can arrive for a connection the hub does not know yet.
//! When a connection ends (close, error, silence after pings, a send that
//! does not complete, an overflowing buffer) the node proposes `Detach`;
//! the consumer's items then wait out the grace period.
//!
//! Invariants:
//! - Every connection's buffer in the hub is bounded, by frames
//!   ([`MAX_BUFFERED_FRAMES`]) and bytes ([`MAX_BUFFERED_BYTES`]). A
//!   connection whose client reads too slowly to stay under the bound is
//!   closed (WebSocket close code 1008, "consumer too slow") and detached;
//!   what it held goes back to its group after the grace period. Every
//!   consumer holds a bounded number of items (its window, or the
//!   auto-commit window), so the bound is reached only with large items.
//! - Auto-commit is lossless within the node: the state machine keeps an
//!   auto-commit consumer's items in flight like any other's (within
//!   [`crate::queue::AUTO_COMMIT_WINDOW`] items and
//!   [`crate::queue::AUTO_COMMIT_WINDOW_BYTES`]), and the session proposes
//!   their `Commit` only once their frames are written: to the socket for a
//!   WebSocket (the send flushed), to the HTTP connection's writer for a
//!   stream (the body took the frame's last piece). Small frames waiting
//!   together go out in one WebSocket write, flushed once; they count as
//!   written when that flush completes, so a write that fails part way
//!   sends its frames again (to this group's next consumer), including any
//!   the client had already read. The commits of one
//!   connection go out in batches, one proposal at a time, and its `Detach`
//!   follows its last commit. Frames still buffered when a connection ends
//!   were never committed and return to the group with the consumer's other
//!   items; only a frame written to a connection whose client then never
//!   reads it is gone with the connection (auto-commit promises no more),
//!   and a node failing between a write and its commit delivers the item
//!   again.
//! - A close decided by the node or the state machine (the lease lost, a
//!   consumer taken over, a snapshot installed) takes effect at once, ahead
//!   of the frames buffered for the connection and in the middle of a frame
//!   being written: once the cluster may be redelivering its items, the
//!   connection pushes nothing more.
//! - No send waits longer than the idle limit (`--watch-idle-ms`): a
//!   WebSocket send (frame, ping or close) that cannot complete in that time
//!   ends the connection, so a client that stopped reading cannot keep its
//!   items by blocking the session before it reaches its idle check.
//! - The HTTP stream has no way back from the client and the wire format has
//!   no no-op frame (a zero-length frame ends the Go SDK's reader), so its
//!   liveness rule is the write: frames are handed to the response body in
//!   pieces of at most [`STREAM_PIECE`] bytes, and a piece the body does not
//!   take within the idle limit (the client stopped reading and every buffer
//!   on the way is full) ends the stream, detaches the consumer and resets
//!   the TCP connection: the end of the body could never be written to the
//!   full socket, and the connection would keep its slot of the listener's
//!   connection limit. A stream that ends for any other reason answers with
//!   `Connection: close` and is reset if its end is not written within the
//!   idle limit. A client that holds its items and reads nothing more (all it
//!   was sent fitted in the socket buffers) is found only when its host or
//!   network is gone (TCP keepalive, [`super::ListenerLimits::dead_peer_timeout`]);
//!   a live but stuck process is indistinguishable from an idle consumer.
//!   What bounds that case (and a worker whose process answers pings while
//!   its work hangs) is the hold limit (`--watch-max-hold-ms`): a connection
//!   still holding an item that longer after its frame was written is
//!   ended like a stalled one, and the item goes back to its group after the
//!   grace period. An item sent again (given back, then dispatched to the
//!   same connection) counts from its latest send; an auto-commit item
//!   counts until its commit applies (one whose commit failed is held).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, close_code};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{Notify, mpsc, watch};

use super::eas::{Request, frame_proto};
use super::params::identity;
use super::{ApiError, AppState, ConnectionCloser};
use crate::protocol::WatchOp;
use crate::queue::{Command, ConsumerSpec, Event, Frame, QueueRef, Reply};
use crate::raft::RaftNode;

/// Frames buffered in the hub for one connection, at most. An auto-commit
/// consumer is handed its whole backlog at once, so this is generous; the
/// byte bound is what usually applies.
pub const MAX_BUFFERED_FRAMES: usize = 65_536;
/// Bytes buffered in the hub for one connection, at most (a single larger
/// frame is still accepted into an empty buffer).
pub const MAX_BUFFERED_BYTES: usize = 32 * 1024 * 1024;
/// What a buffered frame costs beyond its payload, tags and strings.
const FRAME_OVERHEAD: usize = 128;
/// Largest piece of a frame handed to the HTTP stream body at once, so the
/// body's own buffering stops taking pieces when the client stops reading.
pub const STREAM_PIECE: usize = 64 * 1024;

/// Why a connection ends on the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// The state machine or the node closed it (takeover, resync).
    Ended,
    /// The client read too slowly: its buffer reached the bound.
    Overflow,
}

/// The hub's end of one connection.
struct Outbox {
    tx: mpsc::Sender<Frame>,
    bytes: Arc<AtomicUsize>,
    /// Set once the connection must close, and why.
    end: watch::Sender<Option<Closed>>,
}

impl Outbox {
    /// Tell the connection to close now, ahead of what is buffered (the
    /// first reason given stays).
    fn end(&self, why: Closed) {
        self.end.send_if_modified(|end| {
            let first = end.is_none();
            if first {
                *end = Some(why);
            }
            first
        });
    }
}

/// The connection's end: frames in order, or why it must close.
struct Inbox {
    rx: mpsc::Receiver<Frame>,
    bytes: Arc<AtomicUsize>,
    end: watch::Receiver<Option<Closed>>,
    /// A frame taken from `rx` that did not fit the last write: the next.
    next: Option<Frame>,
}

impl Inbox {
    async fn recv(&mut self) -> Result<Frame, Closed> {
        // An end comes before anything buffered: after an overflow the
        // buffered frames are what the client could not take, and a node
        // that lost its lease or a consumer taken over must push no more.
        if let Some(frame) = self.next.take() {
            return match *self.end.borrow() {
                Some(why) => Err(why),
                None => Ok(frame),
            };
        }
        tokio::select! {
            biased;
            why = self.end.wait_for(Option::is_some) => {
                Err(why.ok().and_then(|w| *w).unwrap_or(Closed::Ended))
            }
            push = self.rx.recv() => match push {
                Some(frame) => {
                    self.bytes.fetch_sub(frame_cost(&frame), Ordering::Relaxed);
                    Ok(frame)
                }
                None => Err(Closed::Ended),
            },
        }
    }

    /// A frame already buffered, unless the connection must close or the
    /// frame costs more than `room`.
    fn try_recv_within(&mut self, room: usize) -> Option<Frame> {
        if self.end.borrow().is_some() {
            return None;
        }
        let frame = match self.next.take() {
            Some(frame) => frame,
            None => {
                let frame = self.rx.try_recv().ok()?;
                self.bytes.fetch_sub(frame_cost(&frame), Ordering::Relaxed);
                frame
            }
        };
        if frame_cost(&frame) > room {
            self.next = Some(frame);
            return None;
        }
        Some(frame)
    }

    /// Resolves once the connection must close; a send in progress races
    /// it, so neither a slow client nor a frame being written keeps the
    /// connection after its end.
    fn ended(&self) -> impl Future<Output = ()> + use<> {
        let mut end = self.end.clone();
        async move {
            let _ = end.wait_for(Option::is_some).await;
        }
    }
}

fn frame_cost(frame: &Frame) -> usize {
    let tags: usize = frame.tags.iter().map(|(k, v)| k.len() + v.len()).sum();
    FRAME_OVERHEAD + frame.data.len() + frame.path.len() + frame.message.len() + tags
}

/// Routes events to local watch connections and wakes long polls.
pub struct Hub {
    node_id: u64,
    connections: Mutex<HashMap<u64, Outbox>>,
    /// Long polls waiting for items, by queue.
    changes: QueueChanges,
}

/// Long polls wait for a change to their own queue: a put elsewhere wakes
/// none of them. Each queue someone waits on has one [`Notify`], shared by
/// its waiters and dropped with the last of them.
#[derive(Default)]
struct QueueChanges {
    by_queue: Mutex<HashMap<QueueRef, Weak<Notify>>>,
}

/// Queues remembered before those nobody waits on any more are swept out.
const SWEEP_QUEUE_CHANGES_AT: usize = 256;

impl QueueChanges {
    fn subscribe(&self, queue: &QueueRef) -> Arc<Notify> {
        let mut by_queue = self.by_queue.lock().unwrap();
        if let Some(notify) = by_queue.get(queue).and_then(Weak::upgrade) {
            return notify;
        }
        if by_queue.len() >= SWEEP_QUEUE_CHANGES_AT {
            by_queue.retain(|_, w| w.strong_count() > 0);
        }
        let notify = Arc::new(Notify::new());
        by_queue.insert(queue.clone(), Arc::downgrade(&notify));
        notify
    }

    fn changed(&self, queue: &QueueRef) {
        let notify = self
            .by_queue
            .lock()
            .unwrap()
            .get(queue)
            .and_then(Weak::upgrade);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    fn all_changed(&self) {
        let all: Vec<Arc<Notify>> = self
            .by_queue
            .lock()
            .unwrap()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for notify in all {
            notify.notify_waiters();
        }
    }
}

impl Hub {
    pub fn new(node_id: u64) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            connections: Mutex::new(HashMap::new()),
            changes: QueueChanges::default(),
        })
    }

    /// What a long poll on `queue` waits on: notified whenever items of
    /// that queue are added or removed (and when the whole state is
    /// replaced). Take a `notified()` future from it before looking at the
    /// queue, so a change between the look and the wait is not missed.
    pub fn changes_of(&self, queue: &QueueRef) -> Arc<Notify> {
        self.changes.subscribe(queue)
    }

    /// Consume the state machine's events for the lifetime of the node.
    ///
    /// A node applies the log at its own pace; one that lags (after a
    /// restart, say) would push deliveries the cluster has long since
    /// superseded, such as an item another consumer already committed. So
    /// before pushing, the node catches up with the commit index it last
    /// heard of, and pushes only deliveries its current state still holds.
    pub async fn run(
        self: Arc<Self>,
        node: Arc<RaftNode>,
        mut events: mpsc::UnboundedReceiver<Vec<Event>>,
    ) {
        while let Some(mut batch) = events.recv().await {
            let received = std::time::Instant::now();
            while let Ok(more) = events.try_recv() {
                batch.extend(more);
            }
            let mine =
                |e: &Event| matches!(e, Event::Deliver { node, .. } if *node == self.node_id);
            if batch.iter().any(mine)
                && let Some(committed) = node.status().committed
            {
                node.wait_applied(committed, DELIVERY_APPLY_WAIT).await;
            }
            let mut changed = std::collections::BTreeSet::new();
            let mut all_changed = false;
            for event in batch {
                match event {
                    Event::Deliver {
                        node: n,
                        connection,
                        frame,
                        queue,
                    } if n == self.node_id
                        && node
                            .read(|s| s.delivery_is_current(&queue, connection, frame.index)) =>
                    {
                        self.push(connection, frame);
                        crate::latency::Stage::Deliver.record(received.elapsed());
                    }
                    Event::Close { node, connection } if node == self.node_id => {
                        self.end(connection);
                    }
                    Event::Changed { queue } => {
                        changed.insert(queue);
                    }
                    Event::Resync => {
                        self.close_all();
                        all_changed = true;
                    }
                    _ => {}
                }
            }
            if all_changed {
                self.changes.all_changed();
            } else {
                for queue in &changed {
                    self.changes.changed(queue);
                }
            }
        }
    }

    /// Queue `frame` for `connection`; a connection whose buffer is full is
    /// told to close instead (the frame is not kept).
    fn push(&self, connection: u64, frame: Frame) {
        let map = self.connections.lock().unwrap();
        let Some(out) = map.get(&connection) else {
            return;
        };
        let cost = frame_cost(&frame);
        let held = out.bytes.fetch_add(cost, Ordering::Relaxed);
        let fits = held == 0 || held + cost <= MAX_BUFFERED_BYTES;
        if fits && out.tx.try_send(frame).is_ok() {
            return;
        }
        out.bytes.fetch_sub(cost, Ordering::Relaxed);
        if out.end.borrow().is_none() {
            tracing::warn!(
                connection,
                buffered_bytes = held,
                "watch client reads too slowly: buffer full, closing the connection"
            );
        }
        out.end(Closed::Overflow);
    }

    /// Close `connection` now, ahead of the frames buffered for it.
    fn end(&self, connection: u64) {
        if let Some(out) = self.connections.lock().unwrap().get(&connection) {
            out.end(Closed::Ended);
        }
    }

    fn register(&self) -> (u64, Inbox) {
        let (tx, rx) = mpsc::channel(MAX_BUFFERED_FRAMES);
        let (end_tx, end_rx) = watch::channel(None);
        let bytes = Arc::new(AtomicUsize::new(0));
        let mut map = self.connections.lock().unwrap();
        let mut id = uuid::Uuid::new_v4().as_u64_pair().0;
        while id == 0 || map.contains_key(&id) {
            id = uuid::Uuid::new_v4().as_u64_pair().0;
        }
        map.insert(
            id,
            Outbox {
                tx,
                bytes: bytes.clone(),
                end: end_tx,
            },
        );
        (
            id,
            Inbox {
                rx,
                bytes,
                end: end_rx,
                next: None,
            },
        )
    }

    fn unregister(&self, connection: u64) {
        self.connections.lock().unwrap().remove(&connection);
    }

    /// Close every local connection now, ahead of what is buffered and
    /// in the middle of a frame being written (this node lost touch with
    /// the leader: the cluster may be redelivering these items already).
    pub fn close_all(&self) {
        for out in self.connections.lock().unwrap().values() {
            out.end(Closed::Ended);
        }
    }

    /// Whether `connection` is open on this node.
    pub fn holds(&self, connection: u64) -> bool {
        self.connections.lock().unwrap().contains_key(&connection)
    }

    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// Payload bytes buffered for all local connections.
    pub fn buffered_bytes(&self) -> usize {
        self.connections
            .lock()
            .unwrap()
            .values()
            .map(|o| o.bytes.load(Ordering::Relaxed))
            .sum()
    }
}

struct Session {
    state: Arc<AppState>,
    connection: u64,
    auto_commit: bool,
    /// Indexes whose frames were written, for [`settle`] to commit.
    written: mpsc::UnboundedSender<u64>,
}

impl Session {
    /// Stop routing deliveries here; [`settle`] then commits what was
    /// written and proposes the detach. Runs even when the handler future
    /// is dropped.
    fn end(self) {
        self.state.hub.unregister(self.connection);
    }
}

struct SessionGuard(Option<Session>);

impl SessionGuard {
    /// The frame of item `index` was written to the connection: an
    /// auto-commit consumer's item is committed now.
    fn written(&self, index: u64) {
        if let Some(s) = &self.0
            && s.auto_commit
        {
            let _ = s.written.send(index);
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.end();
        }
    }
}

/// The consumer's side of a session in the replicated state: commits the
/// items whose frames were written (auto-commit; in batches, one proposal
/// at a time), and once the session has ended and its last commit was
/// proposed, detaches the consumer. The channel holds at most the
/// consumer's auto-commit window of indexes: no further item is dispatched
/// to it before some of these commits apply.
async fn settle(
    state: Arc<AppState>,
    queue: QueueRef,
    group: String,
    user: String,
    connection: u64,
    mut written: mpsc::UnboundedReceiver<u64>,
) {
    while let Some(first) = written.recv().await {
        let mut indexes = vec![first];
        while let Ok(index) = written.try_recv() {
            indexes.push(index);
        }
        let cmd = Command::Commit {
            queue: queue.clone(),
            group: group.clone(),
            indexes,
        };
        // Not committed, the items stay with the consumer and return to the
        // group after it leaves: delivered again rather than lost.
        if let Err(e) = state.node.propose(cmd).await {
            tracing::warn!(error = %e, connection, "auto-commit not applied");
        }
    }
    let cmd = Command::Detach {
        queue,
        group,
        user,
        connection,
    };
    if let Err(e) = state.node.propose(cmd).await {
        tracing::warn!(error = %e, connection, "detach not applied");
    }
}

/// How long, before pushing deliveries, a node waits to catch up with the
/// commit index it last heard of (see [`Hub::run`]); a node further behind
/// pushes anyway, only what its state still holds.
const DELIVERY_APPLY_WAIT: Duration = Duration::from_secs(2);
/// Bounds of how often a watch looks for items held past the hold limit.
const HOLD_CHECK_MIN: Duration = Duration::from_millis(100);
const HOLD_CHECK_MAX: Duration = Duration::from_secs(10);

/// A WebSocket close frame's reason is cut to this many bytes (the frame
/// allows 123).
const MAX_CLOSE_REASON_BYTES: usize = 120;

/// At most this many buffered frames, and this many bytes in all (a
/// larger first frame goes alone), go out in one write: bursts of small
/// frames share a write, large frames go one by one (a write that fails
/// sends its frames again, to another consumer).
const MAX_FRAMES_PER_WRITE: usize = 64;
const MAX_BYTES_PER_WRITE: usize = 64 * 1024;

/// Largest WebSocket message (and frame) a watching client may send.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// Open a watch (`op`) for the consumer the request's headers name: a
/// WebSocket session when the request upgrades, else an HTTP stream.
pub async fn watch(
    state: Arc<AppState>,
    queue: QueueRef,
    req: Request,
    op: WatchOp,
) -> Result<Response, ApiError> {
    let WatchOp {
        from_index: start_index,
        window,
        auto_commit,
        index_only,
    } = op;
    let (group, user) = identity(&req.headers)?;
    if !state.node.accepts_watchers() {
        return Err(ApiError::Unavailable(
            "this node is starting; watch through another node or retry".into(),
        ));
    }
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::Unavailable(
            "this node is draining for maintenance; watch through another node".into(),
        ));
    }
    let user = user.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let tags = req.query.tags.clone();
    let spec = move |connection| ConsumerSpec {
        group: group.clone(),
        user: user.clone(),
        node: 0,
        connection,
        window,
        auto_commit,
        index_only,
        tags: tags.clone(),
        start_index,
    };
    match req.ws {
        // Clients only send small control messages; frames are capped like
        // messages so no fragment buffers more than that.
        Ok(upgrade) => Ok(upgrade
            .max_message_size(MAX_CLIENT_MESSAGE)
            .max_frame_size(MAX_CLIENT_MESSAGE)
            .on_upgrade(move |socket| serve_socket(state, queue, socket, spec))),
        Err(_) => serve_stream(state, queue, spec, req.closer).await,
    }
}

async fn attach(
    state: &Arc<AppState>,
    queue: &QueueRef,
    spec: impl Fn(u64) -> ConsumerSpec,
) -> Result<(SessionGuard, Inbox), ApiError> {
    let (connection, rx) = state.hub.register();
    let mut consumer = spec(connection);
    consumer.node = state.node.id;
    let (group, user, auto_commit) = (
        consumer.group.clone(),
        consumer.user.clone(),
        consumer.auto_commit,
    );
    match state
        .node
        .propose(Command::Attach {
            queue: queue.clone(),
            consumer,
        })
        .await
    {
        Ok(Reply::Rejected(r)) => {
            state.hub.unregister(connection);
            Err(r.into())
        }
        Ok(_) => {
            let (written, to_settle) = mpsc::unbounded_channel();
            tokio::spawn(settle(
                state.clone(),
                queue.clone(),
                group,
                user,
                connection,
                to_settle,
            ));
            let session = Session {
                state: state.clone(),
                connection,
                auto_commit,
                written,
            };
            Ok((SessionGuard(Some(session)), rx))
        }
        Err(e) => {
            state.hub.unregister(connection);
            Err(e.into())
        }
    }
}

fn idle_limit(state: &AppState) -> Duration {
    state.config.effective_watch_idle()
}

/// When a connection's frames were written, in order, for the hold limit.
///
/// Writing costs the same however many frames were written since the last
/// look: a frame written again (given back and sent anew) is not searched
/// for, its earlier entry is skipped when it reaches the front.
struct HoldClock {
    limit: Option<Duration>,
    written: std::collections::VecDeque<(u64, tokio::time::Instant)>,
    /// The latest time each index in `written` was written.
    latest: std::collections::HashMap<u64, tokio::time::Instant>,
}

impl HoldClock {
    fn new(state: &AppState) -> Self {
        Self {
            limit: state.config.watch_max_hold,
            written: Default::default(),
            latest: Default::default(),
        }
    }

    /// How often to look: a tenth of the limit, between 100 ms and 10 s.
    fn interval(&self) -> Duration {
        // Without a limit the check never finds anything: look rarely.
        self.limit.map_or(Duration::from_secs(3600), |l| {
            (l / 10).clamp(HOLD_CHECK_MIN, HOLD_CHECK_MAX)
        })
    }

    /// The frame of `index` was written: its time starts now, also when it
    /// was written before (given back and sent again).
    fn written(&mut self, index: u64) {
        self.written_at(index, tokio::time::Instant::now());
    }

    fn written_at(&mut self, index: u64, now: tokio::time::Instant) {
        if self.limit.is_some() {
            self.latest.insert(index, now);
            self.written.push_back((index, now));
            // Frames written again leave earlier entries behind: drop them
            // once they are as many as the live ones (amortized O(1)), so
            // this holds what one entry per index would, twice at most.
            if self.written.len() > 2 * self.latest.len() + 64 {
                let latest = &self.latest;
                self.written.retain(|(i, at)| latest.get(i) == Some(at));
            }
        }
    }

    /// Whether `connection` still holds an item whose frame was written
    /// longer than the limit ago (items it no longer holds are forgotten).
    fn overdue(&mut self, state: &AppState, queue: &QueueRef, connection: u64) -> bool {
        self.overdue_at(tokio::time::Instant::now(), |index| {
            state
                .node
                .read(|s| s.delivery_is_current(queue, connection, index))
        })
    }

    /// [`Self::overdue`] at `now`, with `held` telling whether the
    /// connection still holds an item.
    fn overdue_at(&mut self, now: tokio::time::Instant, held: impl Fn(u64) -> bool) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        while let Some(&(index, at)) = self.written.front() {
            if self.latest.get(&index) == Some(&at) {
                if held(index) {
                    return now.saturating_duration_since(at) > limit;
                }
                self.latest.remove(&index);
            }
            // Held no more, or written again later (its later entry counts).
            self.written.pop_front();
        }
        false
    }
}

/// Write `frames` and flush them once, all within `limit`.
async fn send_frames_within(socket: &mut WebSocket, frames: Vec<Frame>, limit: Duration) -> bool {
    use futures::SinkExt as _;
    let write = async {
        for frame in frames {
            let bytes = frame_proto(frame).encode_to_vec();
            socket.feed(Message::Binary(bytes.into())).await?;
        }
        socket.flush().await
    };
    matches!(tokio::time::timeout(limit, write).await, Ok(Ok(())))
}

/// Send one message, or fail when the client does not take it within
/// `limit` (it stopped reading and the socket's buffers are full).
async fn send_within(socket: &mut WebSocket, msg: Message, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, socket.send(msg)).await,
        Ok(Ok(()))
    )
}

async fn serve_socket(
    state: Arc<AppState>,
    queue: QueueRef,
    mut socket: WebSocket,
    spec: impl Fn(u64) -> ConsumerSpec,
) {
    let idle = idle_limit(&state);
    let (guard, mut inbox) = match attach(&state, &queue, spec).await {
        Ok(v) => v,
        Err(e) => {
            let close = Message::Close(Some(axum::extract::ws::CloseFrame {
                code: close_code::ERROR,
                reason: crate::protocol::truncate(&e.to_string(), MAX_CLOSE_REASON_BYTES)
                    .to_string()
                    .into(),
            }));
            send_within(&mut socket, close, idle).await;
            return;
        }
    };
    let connection = guard.0.as_ref().map(|s| s.connection);
    let mut hold = HoldClock::new(&state);
    let mut hold_check = tokio::time::interval(hold.interval());
    hold_check.tick().await;
    // Every conforming WebSocket client answers pings; one that stops
    // answering (and sends nothing else) for the idle limit is gone.
    let mut last_heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(idle / 3);
    ping.tick().await;
    loop {
        tokio::select! {
            push = inbox.recv() => match push {
                Ok(frame) => {
                    // Small frames already waiting go out with this one,
                    // flushed once: one write to the socket for a burst of
                    // deliveries rather than one each. A frame counts as
                    // written once its write is flushed.
                    let mut bytes = frame_cost(&frame);
                    let mut frames = vec![frame];
                    while frames.len() < MAX_FRAMES_PER_WRITE
                        && bytes < MAX_BYTES_PER_WRITE
                        && let Some(more) = inbox.try_recv_within(MAX_BYTES_PER_WRITE - bytes)
                    {
                        bytes += frame_cost(&more);
                        frames.push(more);
                    }
                    let indexes: Vec<u64> = frames.iter().map(|f| f.index).collect();
                    let ended = inbox.ended();
                    tokio::select! {
                        sent = send_frames_within(&mut socket, frames, idle) => if sent {
                            for index in indexes {
                                guard.written(index);
                                hold.written(index);
                            }
                        } else {
                            tracing::info!(connection, "watch client does not take frames; dropping");
                            break;
                        },
                        // The socket is mid-message: no close frame can follow.
                        _ = ended => break,
                    }
                }
                Err(closed) => {
                    let frame = (closed == Closed::Overflow).then(|| axum::extract::ws::CloseFrame {
                        code: close_code::POLICY,
                        reason: "consumer too slow: its send buffer is full".into(),
                    });
                    send_within(&mut socket, Message::Close(frame), idle).await;
                    break;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => last_heard = tokio::time::Instant::now(),
            },
            _ = hold_check.tick() => {
                if connection.is_some_and(|c| hold.overdue(&state, &queue, c)) {
                    tracing::info!(connection, "watch held an item past the hold limit; dropping");
                    let frame = axum::extract::ws::CloseFrame {
                        code: close_code::POLICY,
                        reason: "an item was held past the hold limit".into(),
                    };
                    send_within(&mut socket, Message::Close(Some(frame)), idle).await;
                    break;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > idle {
                    tracing::info!(connection, "watch stopped answering pings; dropping");
                    break;
                }
                if !send_within(&mut socket, Message::Ping(Bytes::from_static(b"eddy")), idle).await {
                    tracing::info!(connection, "watch client does not take pings; dropping");
                    break;
                }
            }
        }
    }
    drop(guard);
}

/// Why writing a frame to an HTTP stream stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamStop {
    /// The client went away (the body was dropped).
    Gone,
    /// The client did not take a piece for the idle limit.
    Stalled,
    /// The node ended the watch mid-frame.
    Ended,
}

/// A frame as the HTTP stream carries it: its length (4 bytes, big
/// endian), then the protobuf `DataFrameProto`.
fn length_prefixed(frame: Frame) -> Bytes {
    let body = frame_proto(frame).encode_to_vec();
    let mut chunk = Vec::with_capacity(body.len() + 4);
    chunk.extend_from_slice(&(body.len() as u32).to_be_bytes());
    chunk.extend_from_slice(&body);
    Bytes::from(chunk)
}

/// Hand `chunk` to the response body piece by piece, each within `idle`;
/// done once the body has taken the last piece (the whole frame is then
/// with the connection's writer).
async fn write_frame(
    body_tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    inbox: &Inbox,
    chunk: Bytes,
    idle: Duration,
) -> Result<(), StreamStop> {
    let mut at = 0;
    while at < chunk.len() {
        let piece = chunk.slice(at..(at + STREAM_PIECE).min(chunk.len()));
        at += piece.len();
        let ended = inbox.ended();
        tokio::select! {
            sent = tokio::time::timeout(idle, body_tx.send(Ok(piece))) => match sent {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(StreamStop::Gone),
                Err(_) => return Err(StreamStop::Stalled),
            },
            _ = ended => return Err(StreamStop::Ended),
        }
    }
    // Room in the channel again: the body took the last piece.
    match tokio::time::timeout(idle, body_tx.reserve()).await {
        Ok(Ok(_permit)) => Ok(()),
        Ok(Err(_)) => Err(StreamStop::Gone),
        Err(_) => Err(StreamStop::Stalled),
    }
}

/// End an HTTP stream: a stalled one is reset (its connection closed, or
/// the HTTP/2 stream failed); a finished one ends its body, which is given
/// the idle limit to reach the socket before the connection is closed.
async fn end_stream(
    body_tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    closer: Option<ConnectionCloser>,
    stalled: bool,
    idle: Duration,
) {
    if stalled {
        // Without a closer (HTTP/2), an error resets the response's
        // stream, if there is room to say so.
        let err = std::io::Error::other("watch client stopped reading");
        let _ = body_tx.try_send(Err(err));
    }
    if let Some(closer) = closer {
        if stalled {
            closer.close();
        } else if !body_tx.is_closed() {
            // The body ends here; its end must still reach the socket.
            drop(body_tx);
            tokio::time::sleep(idle).await;
            closer.close();
        }
    }
}

async fn serve_stream(
    state: Arc<AppState>,
    queue: QueueRef,
    spec: impl Fn(u64) -> ConsumerSpec,
    closer: Option<ConnectionCloser>,
) -> Result<Response, ApiError> {
    let idle = idle_limit(&state);
    let (guard, mut inbox) = attach(&state, &queue, spec).await?;
    // One piece in hand at a time: the pump below waits for the body to take
    // each piece, so a client that stops reading stalls it within the
    // response body's and the socket's buffers.
    let (body_tx, mut body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let mut hold = HoldClock::new(&state);
    tokio::spawn(async move {
        let connection = guard.0.as_ref().map(|s| s.connection);
        let mut hold_check = tokio::time::interval(hold.interval());
        hold_check.tick().await;
        // Whether the client stalled: its connection cannot be ended cleanly.
        let mut stalled = false;
        loop {
            let push = tokio::select! {
                p = inbox.recv() => p,
                // The client went away (the body was dropped).
                _ = body_tx.closed() => break,
                _ = hold_check.tick() => {
                    if connection.is_some_and(|c| hold.overdue(&state, &queue, c)) {
                        tracing::info!(connection, "watch stream held an item past the hold limit; dropping");
                        stalled = true;
                        break;
                    }
                    continue;
                }
            };
            let frame = match push {
                Ok(frame) => frame,
                Err(closed) => {
                    if closed == Closed::Overflow {
                        tracing::info!(
                            connection,
                            "watch stream client too slow: its send buffer is full"
                        );
                        stalled = true;
                    }
                    break;
                }
            };
            let index = frame.index;
            match write_frame(&body_tx, &inbox, length_prefixed(frame), idle).await {
                Ok(()) => {
                    guard.written(index);
                    hold.written(index);
                }
                Err(stop) => {
                    if stop == StreamStop::Stalled {
                        tracing::info!(
                            connection,
                            "watch stream not read for the idle limit; dropping"
                        );
                    }
                    // Mid-frame, the connection cannot be ended cleanly.
                    stalled = stop != StreamStop::Gone;
                    break;
                }
            }
        }
        drop(guard);
        end_stream(body_tx, closer, stalled, idle).await;
    });
    let stream = futures::stream::poll_fn(move |cx| body_rx.poll_recv(cx));
    Ok((
        [
            (header::CONTENT_TYPE, crate::proto::PROTOBUF_MEDIA_TYPE),
            // The stream's connection is not reused: it is reset when the
            // client stops reading, and a late reset must hit no other request.
            (header::CONNECTION, "close"),
        ],
        Body::from_stream(stream.boxed()),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueKind;
    use futures::FutureExt;

    fn hold_clock(limit: Duration) -> HoldClock {
        HoldClock {
            limit: Some(limit),
            written: Default::default(),
            latest: Default::default(),
        }
    }

    /// The hold limit counts from an item's latest write, skips items no
    /// longer held, and writing costs the same however often frames are
    /// written again (it searched every entry since the last look).
    #[test]
    fn the_hold_clock_counts_from_the_latest_write_of_a_held_item() {
        let t0 = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        let mut clock = hold_clock(ms(1_000));
        clock.written_at(1, t0);
        clock.written_at(2, t0);
        clock.written_at(1, t0 + ms(600));
        // Item 2 is held and was written 1.2 s ago.
        assert!(clock.overdue_at(t0 + ms(1_200), |_| true));
        // Once 2 is committed, item 1 counts from its second write.
        assert!(!clock.overdue_at(t0 + ms(1_200), |i| i == 1));
        assert!(clock.overdue_at(t0 + ms(1_700), |i| i == 1));
        // Nothing held: nothing overdue, and nothing left to look at.
        assert!(!clock.overdue_at(t0 + ms(5_000), |_| false));
        assert!(clock.written.is_empty() && clock.latest.is_empty());
        // An item written again and again behind a held one: the entries
        // stay within twice the items (plus a constant).
        clock.written_at(7, t0);
        for k in 0..10_000u64 {
            clock.written_at(8 + k % 3, t0 + ms(k));
        }
        assert!(
            clock.written.len() <= 2 * 4 + 64 + 1,
            "{}",
            clock.written.len()
        );
        assert!(!clock.overdue_at(t0 + ms(500), |_| true));
        assert!(clock.overdue_at(t0 + ms(1_001), |_| true));
    }

    #[test]
    fn a_long_poll_wakes_for_its_own_queue_only() {
        let changes = QueueChanges::default();
        let a = QueueRef::new("a", QueueKind::Input);
        let b = QueueRef::new("b", QueueKind::Input);
        let on_a = changes.subscribe(&a);
        let on_b = changes.subscribe(&b);
        {
            let mut waiting_a = std::pin::pin!(on_a.notified());
            let mut waiting_b = std::pin::pin!(on_b.notified());
            changes.changed(&b);
            assert!(
                waiting_a.as_mut().now_or_never().is_none(),
                "a put on b woke a"
            );
            assert!(waiting_b.as_mut().now_or_never().is_some());
            changes.changed(&a);
            assert!(waiting_a.as_mut().now_or_never().is_some());
        }
        // Waiters of one queue share one notifier; once they are gone it is
        // swept out.
        assert!(Arc::ptr_eq(&on_a, &changes.subscribe(&a)));
        drop((on_a, on_b));
        for i in 0..SWEEP_QUEUE_CHANGES_AT {
            changes.subscribe(&QueueRef::new(format!("q{i}"), QueueKind::Sink));
        }
        assert!(changes.by_queue.lock().unwrap().len() <= SWEEP_QUEUE_CHANGES_AT);
        // A replaced state wakes everyone.
        let on_c = changes.subscribe(&QueueRef::new("c", QueueKind::Sink));
        let mut waiting_c = std::pin::pin!(on_c.notified());
        changes.all_changed();
        assert!(waiting_c.as_mut().now_or_never().is_some());
    }
}
