//! The vocabulary of the replicated log: commands in, replies and events out.
//!
//! Everything a replica needs to compute the same state travels inside the
//! command: the request id, the proposer's wall-clock stamp, the connection
//! a consumer is attached through. Nothing in `apply` reads a clock or draws
//! a random number.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Node identifier in the cluster (the Raft node id).
pub type NodeId = u64;

/// Which of a service's two queues a command addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum QueueKind {
    /// The input (source) queue: `/api/predict/{service}`.
    Input,
    /// The output queue: `/api/predict/{service}/sink`.
    Sink,
}

impl QueueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Input => "input",
            QueueKind::Sink => "sink",
        }
    }
}

/// A queue address: service name and which of its queues.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueRef {
    pub service: String,
    pub kind: QueueKind,
}

impl QueueRef {
    pub fn new(service: impl Into<String>, kind: QueueKind) -> Self {
        Self {
            service: service.into(),
            kind,
        }
    }
}

impl std::fmt::Display for QueueRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            QueueKind::Input => write!(f, "{}", self.service),
            QueueKind::Sink => write!(f, "{}/sink", self.service),
        }
    }
}

/// Capacity rules of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLimits {
    /// Most items the queue stores (`stream.approxMaxLength`).
    pub max_length: u64,
    /// Largest payload accepted, in bytes (`meta.maxPayloadBytes`).
    pub max_payload_bytes: u64,
    /// When full: evict the oldest item instead of refusing the put.
    pub evict_oldest: bool,
    /// Most payload bytes the queue holds, items and dead letters together.
    pub max_bytes: u64,
    /// Most dead letters kept; the oldest are dropped beyond it.
    pub max_dead_letters: u64,
}

/// Default of [`QueueLimits::max_length`].
pub const DEFAULT_MAX_LENGTH: u64 = 100_000;
/// Default of [`QueueLimits::max_payload_bytes`]: 8 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 8 * 1024 * 1024;
/// Default of [`ServiceConfig::max_delivery`].
pub const DEFAULT_MAX_DELIVERY: u32 = 5;
/// Default of [`ServiceConfig::consumer_grace_ms`].
pub const DEFAULT_CONSUMER_GRACE_MS: u64 = 2_000;
/// Default of [`QueueLimits::max_bytes`]: 1 GiB per queue.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default of [`QueueLimits::max_dead_letters`].
pub const DEFAULT_MAX_DEAD_LETTERS: u64 = 10_000;
/// Ceiling of [`QueueLimits::max_dead_letters`]: dead letters are kept for
/// inspection, not as a second queue.
/// Longest grace period a leaving consumer may keep its items.
pub const MAX_CONSUMER_GRACE_MS: u64 = 24 * 60 * 60 * 1000;

/// Longest service token.
pub const MAX_TOKEN_BYTES: usize = 512;

/// Largest payload a queue may accept. One entry must always fit in one
/// replication message (64 MiB between nodes), with room to spare.
pub const MAX_PAYLOAD_CEILING: u64 = 32 * 1024 * 1024;

pub const MAX_DEAD_LETTERS_CEILING: u64 = 1_000_000;

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_length: DEFAULT_MAX_LENGTH,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            evict_oldest: false,
            max_bytes: DEFAULT_MAX_BYTES,
            max_dead_letters: DEFAULT_MAX_DEAD_LETTERS,
        }
    }
}

impl QueueLimits {
    /// Whether the limits can be met at all: a payload the queue accepts
    /// must fit in its byte budget.
    pub fn validate(&self, which: &str) -> Result<(), Rejection> {
        let invalid = |m: String| Err(Rejection::Invalid(format!("{which}: {m}")));
        if self.max_bytes == 0 {
            return invalid("max_bytes must be at least 1".into());
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_CEILING {
            return invalid(format!(
                "max_payload_bytes ({}) must be between 1 and {MAX_PAYLOAD_CEILING}",
                self.max_payload_bytes
            ));
        }
        if self.max_payload_bytes > self.max_bytes {
            return invalid(format!(
                "max_payload_bytes ({}) exceeds max_bytes ({})",
                self.max_payload_bytes, self.max_bytes
            ));
        }
        if self.max_dead_letters > MAX_DEAD_LETTERS_CEILING {
            return invalid(format!(
                "max_dead_letters ({}) exceeds {MAX_DEAD_LETTERS_CEILING}",
                self.max_dead_letters
            ));
        }
        Ok(())
    }
}

/// How a service is set up. Part of the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// The token clients send in `Authorization`.
    pub token: String,
    pub input: QueueLimits,
    pub sink: QueueLimits,
    /// Deliveries of one item before it is dead-lettered (0 = unlimited).
    pub max_delivery: u32,
    /// How long a consumer whose connection dropped keeps its items
    /// (status `Leaving`) before they go to the rest of its group.
    pub consumer_grace_ms: u64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            token: String::new(),
            input: QueueLimits::default(),
            sink: QueueLimits::default(),
            max_delivery: DEFAULT_MAX_DELIVERY,
            consumer_grace_ms: DEFAULT_CONSUMER_GRACE_MS,
        }
    }
}

impl ServiceConfig {
    pub fn validate(&self) -> Result<(), Rejection> {
        self.input.validate("input")?;
        self.sink.validate("sink")?;
        if self.consumer_grace_ms > MAX_CONSUMER_GRACE_MS {
            return Err(Rejection::Invalid(format!(
                "consumer_grace_ms ({}) exceeds {MAX_CONSUMER_GRACE_MS} (one day)",
                self.consumer_grace_ms
            )));
        }
        if self.token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::Invalid(format!(
                "the service token is longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        Ok(())
    }

    pub fn limits(&self, kind: QueueKind) -> &QueueLimits {
        match kind {
            QueueKind::Input => &self.input,
            QueueKind::Sink => &self.sink,
        }
    }
}

/// Tag set of an item, or a filter that an item's tags must contain.
pub type Tags = BTreeMap<String, String>;

/// The new item a put carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewItem {
    /// The caller's `requestId`, or one assigned by the node that received
    /// the put, before proposing. On the input queue it is also an
    /// idempotency key: a put whose request id an item already holds
    /// answers that item instead of adding another.
    pub request_id: String,
    pub tags: Tags,
    pub data: Bytes,
    pub priority: u32,
    /// Sub-path the item was put on (for the engine), empty for `/`.
    pub path: String,
}

/// How a watch connection wants to be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSpec {
    pub group: String,
    pub user: String,
    /// The node that holds the connection and pushes its frames.
    pub node: NodeId,
    /// Identifies one connection; a takeover gets a new one.
    pub connection: u64,
    pub window: u32,
    pub auto_commit: bool,
    pub index_only: bool,
    pub tags: Tags,
    /// Only items with an index at or above this are delivered.
    /// `None` = only items put after the attach (`_index_=-1`).
    pub start_index: Option<u64>,
}

/// Which items a get or count looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// First index to consider; 0 = head. `None` = only the newest item.
    pub from_index: Option<u64>,
    pub length: u32,
    pub tags: Tags,
}

/// A mutation of the replicated state. Every one is applied by every replica
/// in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateService {
        name: String,
        config: ServiceConfig,
    },
    DeleteService {
        name: String,
    },
    Put {
        queue: QueueRef,
        item: NewItem,
    },
    /// Read and delete in one step (get with `_auto_delete_=true`).
    Take {
        queue: QueueRef,
        selector: Selector,
    },
    Commit {
        queue: QueueRef,
        group: String,
        indexes: Vec<u64>,
    },
    Negative {
        queue: QueueRef,
        group: String,
        indexes: Vec<u64>,
        code: String,
        reason: String,
    },
    Delete {
        queue: QueueRef,
        indexes: Vec<u64>,
    },
    /// Remove every item whose index is below `before`.
    Truncate {
        queue: QueueRef,
        before: u64,
    },
    End {
        queue: QueueRef,
        force: bool,
    },
    Attach {
        queue: QueueRef,
        consumer: ConsumerSpec,
    },
    /// The connection closed; the consumer starts its grace period.
    Detach {
        queue: QueueRef,
        group: String,
        user: String,
        connection: u64,
    },
    /// Every consumer attached through `node` is gone at once (node lost or
    /// restarted): their items go back to their groups now.
    NodeGone {
        node: NodeId,
    },
    /// Consumers whose grace ran out are removed. Kept so that logs written
    /// before [`Command::GraceExpired`] still apply; no longer proposed.
    Tick,
    /// The engine's result: put `result` on the sink and commit `input_index`
    /// on the input queue, as one step. Skipped (but the commit still done)
    /// when the sink already holds a result for the same request id.
    /// Refused, changing nothing, when the input item holds another request
    /// id, or when it is gone and no result for its request is on the sink.
    Complete {
        service: String,
        group: String,
        input_index: u64,
        result: Option<NewItem>,
    },
    /// Several commands in one log entry; replies come back in order.
    /// Batches never nest: a nested batch is refused when decoded, when
    /// proposed and when applied, so no input can make decoding or applying
    /// recurse deeper than one level.
    Batch(#[serde(deserialize_with = "deserialize_flat_batch")] Vec<Command>),
    /// Drop every dead letter of the queue.
    PurgeDeadLetters {
        queue: QueueRef,
    },
    /// Change an existing service's settings (creating one never does).
    UpdateService {
        name: String,
        config: ServiceConfig,
    },
    /// The leader of `term` saw `node` stop acknowledging: every consumer
    /// attached through it is gone. Applied only in the term that decided
    /// it: a deposed leader's decision, committed later, changes nothing.
    NodeLost {
        node: NodeId,
        term: u64,
    },
    /// The leader of `term` saw a leaving consumer's grace run out (on its
    /// clock, the one every envelope carries): such consumers are removed.
    /// Applied only in `term`, like [`Command::NodeLost`].
    GraceExpired {
        term: u64,
    },
    /// Envelopes proposed on the leader while its earlier entries were
    /// being written, gathered into one log entry. Each is applied as if it
    /// were its own entry (its own id, so a retry is still applied once);
    /// replies come back in order as [`Reply::Coalesced`]. Written by the
    /// leader only, never accepted from a peer or a client, and never
    /// nested: a coalesced entry inside another, or inside a batch, is
    /// refused when decoded and when applied.
    Coalesced(#[serde(deserialize_with = "deserialize_coalesced")] Vec<Envelope>),
    /// Put dead letters back on their queue as new items (see
    /// `Queue::requeue_dead_letters`); `indexes` empty: all of them.
    /// Replies with the new items, without payloads.
    RequeueDeadLetters {
        queue: QueueRef,
        indexes: Vec<u64>,
    },
}

thread_local! {
    /// Set while the elements of a command batch are being decoded.
    static DECODING_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set while the elements of a reply batch are being decoded.
    static DECODING_REPLY_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set while the envelopes of a coalesced entry are being decoded.
    static DECODING_COALESCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Decode the elements of a batch, refusing a batch inside them before
/// descending into it (deserialization is synchronous, so a thread-local
/// flag marks the enclosing batch).
fn deserialize_flat<'de, D, T>(
    d: D,
    decoding: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    what: &'static str,
) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Reset(&'static std::thread::LocalKey<std::cell::Cell<bool>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    if decoding.replace(true) {
        return Err(serde::de::Error::custom(what));
    }
    let _reset = Reset(decoding);
    Vec::<T>::deserialize(d)
}

fn deserialize_flat_batch<'de, D>(d: D) -> Result<Vec<Command>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    deserialize_flat(d, &DECODING_BATCH, "nested command batch")
}

/// A coalesced entry holds envelopes whose commands may be batches, but
/// never another coalesced entry, and no batch holds one: decoding goes at
/// most three levels deep (entry, envelope, batch).
fn deserialize_coalesced<'de, D>(d: D) -> Result<Vec<Envelope>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    if DECODING_BATCH.get() {
        return Err(serde::de::Error::custom("coalesced entry inside a batch"));
    }
    deserialize_flat(d, &DECODING_COALESCED, "nested coalesced entry")
}

fn deserialize_flat_reply_batch<'de, D>(d: D) -> Result<Vec<Reply>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    deserialize_flat(d, &DECODING_REPLY_BATCH, "nested reply batch")
}

impl Command {
    /// Whether this is a batch holding another batch (never valid).
    /// Also true for a coalesced entry inside a batch or another coalesced
    /// entry, and for a coalesced entry holding such a command.
    pub fn has_nested_batch(&self) -> bool {
        match self {
            Command::Batch(commands) => commands
                .iter()
                .any(|c| matches!(c, Command::Batch(_) | Command::Coalesced(_))),
            Command::Coalesced(envelopes) => envelopes.iter().any(|e| {
                matches!(e.command, Command::Coalesced(_)) || e.command.has_nested_batch()
            }),
            _ => false,
        }
    }

    /// Whether this command ends or gives back work a consumer holds (a
    /// commit, a negative commit, a result with its input's commit, a
    /// consumer's detach): it frees window slots, so the queue drains
    /// through it.
    pub fn releases_work(&self) -> bool {
        matches!(
            self,
            Command::Commit { .. }
                | Command::Negative { .. }
                | Command::Complete { .. }
                | Command::Detach { .. }
        )
    }

    /// Payload bytes this command adds to the state (puts and results);
    /// what storage admission control weighs.
    pub fn added_bytes(&self) -> u64 {
        match self {
            Command::Put { item, .. } => item.data.len() as u64,
            Command::Complete {
                result: Some(item), ..
            } => item.data.len() as u64,
            Command::Batch(commands) => commands.iter().map(Command::added_bytes).sum(),
            Command::Coalesced(envelopes) => {
                envelopes.iter().map(|e| e.command.added_bytes()).sum()
            }
            _ => 0,
        }
    }
}

/// A command as it travels through the log: a unique id for de-duplication
/// of retries, and the proposer's wall clock in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u128,
    pub now_ms: u64,
    pub command: Command,
}

/// One item as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub index: u64,
    pub tags: Tags,
    pub data: Bytes,
    pub path: String,
    pub message: String,
    /// On a delivery, how many times the item has been handed out, this
    /// one included. 0 when not said: on a read, on a frame sent again to a
    /// consumer that reattached, and on an input item whose request id
    /// already has a result on the sink. Local to the node that delivers
    /// (never encoded: a forwarded reply's items keep the shape older nodes
    /// read).
    #[serde(skip)]
    pub deliveries: u32,
}

/// Why a command was refused. Refusals change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("no such service: {0}")]
    NoSuchService(String),
    #[error("service {0} already exists with another configuration")]
    ServiceExists(String),
    #[error("queue is full ({0} items)")]
    Full(u64),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("sink of service {0} is full")]
    SinkFull(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("queue is full: its payloads reach max_bytes ({limit} bytes)")]
    FullBytes { limit: u64 },
    /// Housekeeping decided by the leader of an earlier term.
    #[error("decided by the leader of term {decided}, applied in term {applied}: ignored")]
    StaleTerm { decided: u64, applied: u64 },
    /// A completion named an input item that belongs to another request.
    #[error(
        "input item {index} carries requestId {held:?}, not {given:?}: nothing was written or committed"
    )]
    RequestMismatch {
        index: u64,
        held: String,
        given: String,
    },
    /// A completion's input item is no longer queued, and no result for its
    /// request is on the sink: the result is not written.
    #[error(
        "input item {index} is no longer on the input queue ({}); the result was not written",
        if *dead_lettered { "it was dead-lettered" } else { "deleted, evicted or consumed" }
    )]
    InputGone { index: u64, dead_lettered: bool },
    /// A retried take whose reply was too large to keep for retries: its
    /// items were handed out when it was first applied.
    #[error(
        "this take was already applied and its items were handed out; its reply was too large \
         to keep for a retry"
    )]
    ReplyNotKept,
}

/// What a command returns to its proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Put {
        index: u64,
        request_id: String,
    },
    Items(Vec<Frame>),
    /// Completing an item: the sink index of the result (if one was written)
    /// and whether an existing result was found instead.
    Completed {
        sink_index: Option<u64>,
        duplicate: bool,
    },
    Rejected(Rejection),
    /// The replies of a [`Command::Batch`], in order. Like command batches,
    /// reply batches never nest: [`Reply::batch`] builds one, and a nested
    /// one is refused when decoded (replies come from peers, in forwarded
    /// answers and in the de-duplication table of snapshots), so decoding
    /// never recurses deeper than one level.
    Batch(#[serde(deserialize_with = "deserialize_flat_reply_batch")] Vec<Reply>),
    /// The replies of a [`Command::Coalesced`] entry, in order, one per
    /// envelope. Handed to the leader's proposer in process and split there;
    /// never encoded (encoding one fails) and never decoded.
    #[serde(skip)]
    Coalesced(Vec<Reply>),
}

impl Reply {
    /// The reply of a batch: `replies` in order, any batch among them
    /// replaced by a rejection (a batch reply never holds another).
    pub fn batch(replies: Vec<Reply>) -> Reply {
        Reply::Batch(
            replies
                .into_iter()
                .map(|r| match r {
                    Reply::Batch(_) => {
                        Reply::Rejected(Rejection::Invalid("nested reply batch".into()))
                    }
                    r => r,
                })
                .collect(),
        )
    }

    /// Whether this is a batch holding another batch (never valid).
    pub fn has_nested_batch(&self) -> bool {
        match self {
            Reply::Batch(replies) => replies.iter().any(|r| matches!(r, Reply::Batch(_))),
            _ => false,
        }
    }
}

/// Side effects of an applied command, for the node that owns the
/// connection concerned. Every replica emits the same events; each node acts
/// only on those addressed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Push this frame over `connection`.
    Deliver {
        node: NodeId,
        connection: u64,
        queue: QueueRef,
        frame: Frame,
    },
    /// Close this connection (it was taken over or its consumer removed).
    Close { node: NodeId, connection: u64 },
    /// Items were added to or removed from this queue (wakes long polls).
    Changed { queue: QueueRef },
    /// The whole state was replaced (a snapshot was installed): every
    /// connection this node holds must be re-established.
    Resync,
}

impl Command {
    /// Short name of the command kind, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::CreateService { .. } => "create-service",
            Command::DeleteService { .. } => "delete-service",
            Command::Put { .. } => "put",
            Command::Take { .. } => "take",
            Command::Commit { .. } => "commit",
            Command::Negative { .. } => "negative",
            Command::Delete { .. } => "delete",
            Command::Truncate { .. } => "truncate",
            Command::End { .. } => "end",
            Command::Attach { .. } => "attach",
            Command::Detach { .. } => "detach",
            Command::NodeGone { .. } => "node-gone",
            Command::Tick => "tick",
            Command::NodeLost { .. } => "node-lost",
            Command::GraceExpired { .. } => "grace-expired",
            Command::Complete { .. } => "complete",
            Command::Batch(_) => "batch",
            Command::Coalesced(_) => "coalesced",
            Command::UpdateService { .. } => "update-service",
            Command::PurgeDeadLetters { .. } => "purge-dead-letters",
            Command::RequeueDeadLetters { .. } => "requeue-dead-letters",
        }
    }
}

impl std::fmt::Display for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{:032x}", self.command.name(), self.id)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Rejected(r) => write!(f, "rejected: {r}"),
            other => write!(f, "{other:?}"),
        }
    }
}
