//! Watches: WebSocket (binary frames, one `DataFrameProto` each) and HTTP
//! streaming (`[u32 BE length][DataFrameProto]` chunks), and the hub that
//! routes delivery events from the state machine to this node's
//! connections.
//!
//! A connection is registered with the hub before its `Attach` is proposed,
//! so no delivery can arrive for a connection the hub does not know yet.
//! When a connection ends (close, error, silence after pings) the node
//! proposes `Detach`; the consumer's items then wait out the grace period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{Notify, mpsc};

use super::eas::{Request, frame_proto};
use super::params::identity;
use super::{ApiError, AppState};
use crate::queue::{Command, ConsumerSpec, Event, Frame, QueueRef, Reply};
use crate::raft::RaftNode;

enum Push {
    Frame(Frame),
    Close,
}

/// Routes events to local watch connections and wakes long polls.
pub struct Hub {
    node_id: u64,
    connections: Mutex<HashMap<u64, mpsc::UnboundedSender<Push>>>,
    /// Notified whenever items are added or removed anywhere.
    pub changed: Notify,
}

impl Hub {
    pub fn new(node_id: u64) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            connections: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        })
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
            while let Ok(more) = events.try_recv() {
                batch.extend(more);
            }
            let mine =
                |e: &Event| matches!(e, Event::Deliver { node, .. } if *node == self.node_id);
            if batch.iter().any(mine)
                && let Some(committed) = node.status().committed
            {
                node.wait_applied(committed, Duration::from_secs(2)).await;
            }
            let mut changed = false;
            for event in batch {
                match event {
                    Event::Deliver {
                        node: n,
                        connection,
                        frame,
                        queue,
                    } if n == self.node_id => {
                        if node.read(|s| s.delivery_is_current(&queue, connection, frame.index)) {
                            self.push(connection, Push::Frame(frame));
                        }
                    }
                    Event::Close { node, connection } if node == self.node_id => {
                        self.push(connection, Push::Close);
                    }
                    Event::Changed { .. } => changed = true,
                    Event::Resync => {
                        self.close_all();
                        changed = true;
                    }
                    _ => {}
                }
            }
            if changed {
                self.changed.notify_waiters();
            }
        }
    }

    fn push(&self, connection: u64, msg: Push) {
        if let Some(tx) = self.connections.lock().unwrap().get(&connection) {
            let _ = tx.send(msg);
        }
    }

    fn register(&self) -> (u64, mpsc::UnboundedReceiver<Push>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut map = self.connections.lock().unwrap();
        let mut id = uuid::Uuid::new_v4().as_u64_pair().0;
        while id == 0 || map.contains_key(&id) {
            id = uuid::Uuid::new_v4().as_u64_pair().0;
        }
        map.insert(id, tx);
        (id, rx)
    }

    fn unregister(&self, connection: u64) {
        self.connections.lock().unwrap().remove(&connection);
    }

    /// Close every local connection (this node lost touch with the leader).
    pub fn close_all(&self) {
        let all: Vec<u64> = self.connections.lock().unwrap().keys().copied().collect();
        for c in all {
            self.push(c, Push::Close);
        }
    }

    /// Whether `connection` is open on this node.
    pub fn holds(&self, connection: u64) -> bool {
        self.connections.lock().unwrap().contains_key(&connection)
    }

    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }
}

struct Session {
    state: Arc<AppState>,
    queue: QueueRef,
    group: String,
    user: String,
    connection: u64,
}

impl Session {
    /// Propose the detach; runs even when the handler future is dropped.
    fn end(self) {
        let Session {
            state,
            queue,
            group,
            user,
            connection,
        } = self;
        state.hub.unregister(connection);
        tokio::spawn(async move {
            let cmd = Command::Detach {
                queue,
                group,
                user,
                connection,
            };
            if let Err(e) = state.node.propose(cmd).await {
                tracing::warn!(error = %e, connection, "detach not applied");
            }
        });
    }
}

struct SessionGuard(Option<Session>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.end();
        }
    }
}

/// Largest WebSocket message (and frame) a watching client may send.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

pub async fn watch(
    state: Arc<AppState>,
    queue: QueueRef,
    req: Request,
) -> Result<Response, ApiError> {
    let q = &req.query;
    let auto_commit = q.flag("_auto_commit_")?;
    let window = q.u64_or("_window_", 1)?;
    if !auto_commit && window == 0 {
        return Err(ApiError::BadRequest(
            "_window_ must be at least 1 without _auto_commit_".into(),
        ));
    }
    let window = window.min(u32::MAX as u64) as u32;
    let index_only = q.flag("_index_only_")?;
    let start_index = q.start_index()?;
    let (group, user) = identity(&req.headers)?;
    if !state.node.accepts_watchers() {
        return Err(ApiError::Unavailable(
            "this node is starting; watch through another node or retry".into(),
        ));
    }
    let user = user.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let tags = q.tags.clone();
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
        Err(_) => serve_stream(state, queue, spec).await,
    }
}

async fn attach(
    state: &Arc<AppState>,
    queue: &QueueRef,
    spec: impl Fn(u64) -> ConsumerSpec,
) -> Result<(SessionGuard, mpsc::UnboundedReceiver<Push>), ApiError> {
    let (connection, rx) = state.hub.register();
    let mut consumer = spec(connection);
    consumer.node = state.node.id;
    let session = Session {
        state: state.clone(),
        queue: queue.clone(),
        group: consumer.group.clone(),
        user: consumer.user.clone(),
        connection,
    };
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
        Ok(_) => Ok((SessionGuard(Some(session)), rx)),
        Err(e) => {
            state.hub.unregister(connection);
            Err(e.into())
        }
    }
}

async fn serve_socket(
    state: Arc<AppState>,
    queue: QueueRef,
    mut socket: WebSocket,
    spec: impl Fn(u64) -> ConsumerSpec,
) {
    let (guard, mut rx) = match attach(&state, &queue, spec).await {
        Ok(v) => v,
        Err(e) => {
            let _ = socket
                .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                    code: 1011,
                    reason: e.to_string().chars().take(120).collect::<String>().into(),
                })))
                .await;
            return;
        }
    };
    // Every conforming WebSocket client answers pings; one that stops
    // answering (and sends nothing else) for the idle limit is gone.
    let idle = Duration::from_millis(state.watch_idle_ms.max(300));
    let mut last_heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(idle / 3);
    ping.tick().await;
    loop {
        tokio::select! {
            push = rx.recv() => match push {
                Some(Push::Frame(frame)) => {
                    let bytes = frame_proto(frame).encode_to_vec();
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                }
                Some(Push::Close) | None => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => last_heard = tokio::time::Instant::now(),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > idle {
                    tracing::info!(connection = guard.0.as_ref().map(|s| s.connection), "watch stopped answering pings; dropping");
                    break;
                }
                if socket.send(Message::Ping(Bytes::from_static(b"eddy"))).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(guard);
}

async fn serve_stream(
    state: Arc<AppState>,
    queue: QueueRef,
    spec: impl Fn(u64) -> ConsumerSpec,
) -> Result<Response, ApiError> {
    let (guard, rx) = attach(&state, &queue, spec).await?;
    let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        match rx.recv().await {
            Some(Push::Frame(frame)) => {
                let body = frame_proto(frame).encode_to_vec();
                let mut chunk = Vec::with_capacity(body.len() + 4);
                chunk.extend_from_slice(&(body.len() as u32).to_be_bytes());
                chunk.extend_from_slice(&body);
                Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), (rx, guard)))
            }
            Some(Push::Close) | None => None,
        }
    });
    Ok((
        [(header::CONTENT_TYPE, crate::proto::PROTOBUF_MEDIA_TYPE)],
        Body::from_stream(stream.boxed()),
    )
        .into_response())
}
