//! The whole replicated state: services, their queues, and the table of
//! recently applied command ids that makes retried commands idempotent.
//!
//! De-duplication invariants:
//! - an envelope id is remembered, with its reply, for
//!   [`DEDUP_WINDOW_MS`] of envelope time after it was applied (well past the
//!   propose deadline within which a proposer retries); past
//!   [`DEDUP_MAX_ENTRIES`] ids, the oldest are forgotten sooner, but never
//!   before [`DEDUP_MIN_WINDOW_MS`]: a retry within the propose deadline is
//!   applied once whatever the rate (the memory this takes is counted by
//!   the nodes' memory admission, which refuses puts past its limit);
//! - a remembered id is never applied again: a retry gets the first reply;
//! - take replies keep their items for a retry while the items of all kept
//!   replies stay within [`DEDUP_MAX_REPLY_BYTES`]; past it the oldest kept
//!   replies lose their items and a retry of one of them is answered
//!   [`Rejection::ReplyNotKept`] (never the items again, never "nothing").

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::command::{
    Command, ConsumerSpec, Envelope, Event, NewItem, NodeId, QueueKind, QueueRef, Rejection, Reply,
    ServiceConfig,
};
use super::one_queue::{ConsumerConnection, HandBack, Queue, validate_request_id};

/// How long, in envelope time, an applied command id is remembered: the
/// propose deadline (5 s) plus a wide margin for clock differences between
/// successive leaders.
pub const DEDUP_WINDOW_MS: u64 = 30_000;

/// Command ids beyond which the oldest are forgotten before
/// [`DEDUP_WINDOW_MS`] (but after [`DEDUP_MIN_WINDOW_MS`]): only rates above
/// the fastest measured (14,000 puts/s on one node, 35 s of ids) reach it.
/// An entry with a small reply takes about 225 bytes (a put's, measured in
/// the memory test), about 110 MB for this many.
pub const DEDUP_MAX_ENTRIES: usize = 500_000;

/// The least time an applied command id is remembered, whatever the rate:
/// the propose deadline (5 s) and as much again for clock differences.
pub const DEDUP_MIN_WINDOW_MS: u64 = 10_000;

/// Most payload bytes of take replies kept for retries.
pub const DEDUP_MAX_REPLY_BYTES: u64 = 64 * 1024 * 1024;

/// What a remembered id costs in memory besides the items of its reply
/// (id, time, map node, a small reply): see [`DEDUP_MAX_ENTRIES`]. A put's
/// measured 224 bytes (with its reply under `Arc` and a UUID request id).
pub const DEDUP_ENTRY_BYTES: u64 = 240;

/// Bytes a frame of a kept reply is counted for besides its payload (tags,
/// record): keeps many tiny frames from escaping the byte bound.
const KEPT_FRAME_OVERHEAD: u64 = 128;

/// A queue service: an input queue and a sink queue under one name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub config: ServiceConfig,
    pub input: Queue,
    pub sink: Queue,
}

impl Service {
    pub fn new(config: ServiceConfig) -> Self {
        Self {
            config,
            input: Queue::new(),
            sink: Queue::new(),
        }
    }

    pub fn queue(&self, kind: QueueKind) -> &Queue {
        match kind {
            QueueKind::Input => &self.input,
            QueueKind::Sink => &self.sink,
        }
    }

    pub fn queue_mut(&mut self, kind: QueueKind) -> &mut Queue {
        match kind {
            QueueKind::Input => &mut self.input,
            QueueKind::Sink => &mut self.sink,
        }
    }

    /// Keep both queues within their `max_dead_letters`.
    fn trim_dead_letters(&mut self) {
        self.input
            .trim_dead_letters(self.config.input.max_dead_letters);
        self.sink
            .trim_dead_letters(self.config.sink.max_dead_letters);
    }
}

/// Names a service may have: they appear in URL paths.
pub fn validate_service_name(name: &str) -> Result<(), Rejection> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "sink"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!(
            "service name {name:?}: use 1-128 characters of A-Z a-z 0-9 _ - . (and not \"sink\")"
        )))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub services: BTreeMap<String, Service>,
    /// Applied envelope ids with the envelope time they were applied at,
    /// in log order.
    recent_ids: VecDeque<(u128, u64)>,
    /// Under `Arc`, so that copying the state for a snapshot copies no
    /// reply.
    recent_replies: BTreeMap<u128, Arc<Reply>>,
    /// The latest envelope time applied: time as `apply` sees it never goes
    /// backwards, whatever the clocks of successive leaders say.
    clock_ms: u64,
    /// Ids whose kept reply holds items, in log order (derived).
    #[serde(skip)]
    kept_items: VecDeque<Kept>,
    /// Bytes of the replies in `kept_items`.
    #[serde(skip)]
    kept_item_bytes: u64,
    /// Bytes of every reply ever added to `kept_items` (derived): the bytes
    /// of the replies from any entry on are this minus the entry's `start`.
    #[serde(skip)]
    kept_added: u64,
}

/// A kept reply with items.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    id: u128,
    /// Envelope time it was applied at.
    at_ms: u64,
    bytes: u64,
    /// `kept_added` before it was added.
    start: u64,
}

/// Bytes a reply's items are counted for in the de-duplication table.
fn kept_bytes(reply: &Reply) -> u64 {
    match reply {
        Reply::Items(frames) => frames
            .iter()
            .map(|f| {
                let tags: usize = f.tags.iter().map(|(k, v)| k.len() + v.len()).sum();
                (f.data.len() + tags + f.message.len() + f.path.len()) as u64 + KEPT_FRAME_OVERHEAD
            })
            .sum(),
        Reply::Batch(replies) => replies.iter().map(kept_bytes).sum(),
        _ => 0,
    }
}

/// The reply a retry gets once the first reply's items were dropped. It
/// never copies the items (a reply kept under `Arc` may be shared with a
/// snapshot being built); what it copies has none.
fn without_items(reply: &Reply) -> Reply {
    match reply {
        Reply::Items(frames) if !frames.is_empty() => Reply::Rejected(Rejection::ReplyNotKept),
        Reply::Batch(replies) => Reply::batch(replies.iter().map(without_items).collect()),
        other => other.clone(),
    }
}

impl QueueState {
    pub fn new() -> Self {
        Self::default()
    }

    /// What a snapshot stores, copied without the derived indexes (see
    /// [`Queue::snapshot_copy`]): it encodes exactly as `self` does.
    pub fn snapshot_copy(&self) -> Self {
        Self {
            services: self
                .services
                .iter()
                .map(|(name, svc)| {
                    let copy = Service {
                        config: svc.config.clone(),
                        input: svc.input.snapshot_copy(),
                        sink: svc.sink.snapshot_copy(),
                    };
                    (name.clone(), copy)
                })
                .collect(),
            recent_ids: self.recent_ids.clone(),
            recent_replies: self.recent_replies.clone(),
            clock_ms: self.clock_ms,
            ..Self::default()
        }
    }

    /// Rebuild derived indexes after deserialization.
    pub fn rebuild_derived(&mut self) {
        for svc in self.services.values_mut() {
            svc.input.rebuild_derived();
            svc.sink.rebuild_derived();
        }
        self.kept_items.clear();
        self.kept_item_bytes = 0;
        self.kept_added = 0;
        for (id, at_ms) in &self.recent_ids {
            let Some(reply) = self.recent_replies.get(id) else {
                continue;
            };
            let bytes = kept_bytes(reply);
            if bytes > 0 {
                self.kept_items.push_back(Kept {
                    id: *id,
                    at_ms: *at_ms,
                    bytes,
                    start: self.kept_added,
                });
                self.kept_item_bytes += bytes;
                self.kept_added += bytes;
            }
        }
    }

    /// Memory the de-duplication table holds for ids that are still within
    /// [`DEDUP_WINDOW_MS`] at `now_ms` (or at the latest time applied, if
    /// later): [`DEDUP_ENTRY_BYTES`] per id and the kept replies' items.
    /// Older ids are dropped by the next command applied, so they are not
    /// counted: a node refusing puts for this memory admits them again once
    /// the ids age out. For the node's memory admission, beside
    /// [`Self::payload_bytes_held`].
    pub fn dedup_bytes(&self, now_ms: u64) -> u64 {
        let now_ms = now_ms.max(self.clock_ms);
        let expired = |at_ms: u64| now_ms.saturating_sub(at_ms) >= DEDUP_WINDOW_MS;
        // Both are in log order, and apply's time never goes back.
        let ids = self.recent_ids.len() - self.recent_ids.partition_point(|(_, at)| expired(*at));
        let first_kept = self.kept_items.partition_point(|k| expired(k.at_ms));
        let kept = self
            .kept_items
            .get(first_kept)
            .map_or(0, |k| self.kept_added - k.start);
        ids as u64 * DEDUP_ENTRY_BYTES + kept
    }

    /// Envelopes applied within the de-duplication window, each once
    /// whether it had a log entry of its own or shared one: how many
    /// commands were proposed lately, whatever the log's entries.
    pub fn commands_remembered(&self) -> usize {
        self.recent_ids.len()
    }

    /// Payload bytes held by every queue of every service (items and dead
    /// letters). Nodes use it for admission control before proposing.
    pub fn payload_bytes_held(&self) -> u64 {
        self.services
            .values()
            .map(|s| s.input.bytes_held() + s.sink.bytes_held())
            .sum()
    }

    /// [`Queue::meta_bytes_held`] of every queue of every service.
    pub fn meta_bytes_held(&self) -> u64 {
        self.services
            .values()
            .map(|s| s.input.meta_bytes_held() + s.sink.meta_bytes_held())
            .sum()
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn queue(&self, qref: &QueueRef) -> Option<&Queue> {
        self.services.get(&qref.service).map(|s| s.queue(qref.kind))
    }

    /// Apply one logged command. Deterministic: the same state and envelope
    /// give the same reply, events and next state on every replica.
    pub fn apply(&mut self, envelope: &Envelope) -> (Reply, Vec<Event>) {
        self.apply_in_term(envelope, None)
    }

    /// [`Self::apply`] for an entry of the log written in `term`: leader
    /// housekeeping ([`Command::NodeLost`], [`Command::GraceExpired`]) is
    /// applied only in the term of the leader that decided it.
    pub fn apply_in_term(&mut self, envelope: &Envelope, term: Option<u64>) -> (Reply, Vec<Event>) {
        if let Command::Coalesced(envelopes) = &envelope.command {
            // Each envelope is applied as its own entry would be; the outer
            // id is the leader's and is never retried, so it is not kept.
            let mut events = Vec::new();
            let replies = envelopes
                .iter()
                .map(|inner| {
                    if matches!(inner.command, Command::Coalesced(_)) {
                        return Reply::Rejected(Rejection::Invalid(
                            "nested coalesced entry".into(),
                        ));
                    }
                    let (reply, inner_events) = self.apply_in_term(inner, term);
                    events.extend(inner_events);
                    reply
                })
                .collect();
            return (Reply::Coalesced(replies), events);
        }
        if let Some(reply) = self.recent_replies.get(&envelope.id) {
            return (Reply::clone(reply), Vec::new());
        }
        let decided = match envelope.command {
            Command::NodeLost { term, .. } | Command::GraceExpired { term } => Some(term),
            _ => None,
        };
        if let (Some(decided), Some(applied)) = (decided, term)
            && decided != applied
        {
            let reply = Reply::Rejected(Rejection::StaleTerm { decided, applied });
            self.remember(envelope.id, self.clock_ms, reply.clone());
            return (reply, Vec::new());
        }
        let now_ms = envelope.now_ms.max(self.clock_ms);
        self.clock_ms = now_ms;
        let mut events = Vec::new();
        let reply = self.apply_command(&envelope.command, now_ms, &mut events);
        self.unmark_answered_first_deliveries(&mut events);
        self.remember(envelope.id, now_ms, reply.clone());
        (reply, events)
    }

    /// A first delivery of an input item whose request id already has a
    /// result on the sink (a put retried after its first item was
    /// completed, a requeued dead letter, a result written by someone else)
    /// does not say it is the first (0: not said), so an engine looks for
    /// that result before it calls the model.
    fn unmark_answered_first_deliveries(&self, events: &mut [Event]) {
        for event in events {
            if let Event::Deliver { queue, frame, .. } = event
                && frame.deliveries == 1
                && queue.kind == QueueKind::Input
                && let Some(request_id) = frame.tags.get(crate::protocol::REQUEST_ID_TAG)
                && self
                    .services
                    .get(&queue.service)
                    .is_some_and(|svc| svc.sink.index_of_request(request_id).is_some())
            {
                frame.deliveries = 0;
            }
        }
    }

    fn remember(&mut self, id: u128, now_ms: u64, reply: Reply) {
        // Forget what is old enough (or beyond the backstop) first.
        while let Some(&(old, at)) = self.recent_ids.front() {
            let age = now_ms.saturating_sub(at);
            let crowded = self.recent_ids.len() >= DEDUP_MAX_ENTRIES;
            if age < DEDUP_WINDOW_MS && !(crowded && age >= DEDUP_MIN_WINDOW_MS) {
                break;
            }
            self.recent_ids.pop_front();
            self.recent_replies.remove(&old);
            if self.kept_items.front().is_some_and(|k| k.id == old)
                && let Some(k) = self.kept_items.pop_front()
            {
                self.kept_item_bytes -= k.bytes;
            }
        }
        // A burst's ids are forgotten a window later; give back the room
        // they took rather than hold the burst's peak for good.
        if self.recent_ids.capacity() > 4 * self.recent_ids.len() + 4096 {
            self.recent_ids.shrink_to(2 * self.recent_ids.len());
        }
        let bytes = kept_bytes(&reply);
        let reply = if bytes > DEDUP_MAX_REPLY_BYTES {
            without_items(&reply)
        } else {
            if bytes > 0 {
                self.kept_items.push_back(Kept {
                    id,
                    at_ms: now_ms,
                    bytes,
                    start: self.kept_added,
                });
                self.kept_item_bytes += bytes;
                self.kept_added += bytes;
            }
            reply
        };
        // Past the byte bound the oldest kept replies lose their items.
        while self.kept_item_bytes > DEDUP_MAX_REPLY_BYTES {
            let Some(k) = self.kept_items.pop_front() else {
                break;
            };
            self.kept_item_bytes -= k.bytes;
            if let Some(kept) = self.recent_replies.remove(&k.id) {
                // Never copies the items (a snapshot being built may share
                // the reply).
                self.recent_replies
                    .insert(k.id, Arc::new(without_items(&kept)));
            }
        }
        self.recent_ids.push_back((id, now_ms));
        self.recent_replies.insert(id, Arc::new(reply));
    }

    fn apply_command(&mut self, command: &Command, now_ms: u64, events: &mut Vec<Event>) -> Reply {
        match self.try_apply(command, now_ms, events) {
            Ok(reply) => reply,
            Err(rejection) => Reply::Rejected(rejection),
        }
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service, Rejection> {
        self.services
            .get_mut(name)
            .ok_or_else(|| Rejection::NoSuchService(name.to_string()))
    }

    /// One command: the dispatcher. Each command's rules live in its own
    /// method below; queue-level work is done by [`Queue`].
    fn try_apply(
        &mut self,
        command: &Command,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        match command {
            Command::CreateService { name, config } => self.create_service(name, config),
            Command::UpdateService { name, config } => self.update_service(name, config),
            Command::DeleteService { name } => self.delete_service(name, events),
            Command::Put { queue, item } => self.put(queue, item, now_ms, events),
            Command::Take { queue, selector } => {
                let svc = self.service_mut(&queue.service)?;
                Ok(Reply::Items(
                    svc.queue_mut(queue.kind)
                        .take(queue, selector, now_ms, events),
                ))
            }
            Command::Commit {
                queue,
                group,
                indexes,
            } => {
                let svc = self.service_mut(&queue.service)?;
                svc.queue_mut(queue.kind)
                    .commit(queue, group, indexes, now_ms, events);
                Ok(Reply::Done)
            }
            Command::Negative {
                queue,
                group,
                indexes,
                code,
                reason,
            } => self.negative(queue, group, indexes, (code, reason), now_ms, events),
            Command::Delete { queue, indexes } => {
                let svc = self.service_mut(&queue.service)?;
                svc.queue_mut(queue.kind)
                    .delete(queue, indexes, now_ms, events);
                Ok(Reply::Done)
            }
            Command::Truncate { queue, before } => {
                let svc = self.service_mut(&queue.service)?;
                svc.queue_mut(queue.kind)
                    .truncate(queue, *before, now_ms, events);
                Ok(Reply::Done)
            }
            Command::End { queue, force } => {
                let svc = self.service_mut(&queue.service)?;
                svc.queue_mut(queue.kind).end(queue, *force, now_ms, events);
                Ok(Reply::Done)
            }
            Command::Attach { queue, consumer } => self.attach(queue, consumer, now_ms, events),
            Command::Detach {
                queue,
                group,
                user,
                connection,
            } => self.detach(queue, group, user, *connection, now_ms, events),
            Command::NodeGone { node } | Command::NodeLost { node, .. } => {
                self.node_gone(*node, now_ms, events)
            }
            Command::Tick | Command::GraceExpired { .. } => self.expire(now_ms, events),
            Command::Complete {
                service,
                group,
                input_index,
                result,
            } => self.complete(
                service,
                group,
                *input_index,
                result.as_ref(),
                now_ms,
                events,
            ),
            Command::PurgeDeadLetters { queue } => {
                let svc = self.service_mut(&queue.service)?;
                svc.queue_mut(queue.kind).purge_dead_letters();
                Ok(Reply::Done)
            }
            Command::RequeueDeadLetters { queue, indexes } => {
                let svc = self.service_mut(&queue.service)?;
                let limits = svc.config.limits(queue.kind).clone();
                let unique_request_ids = queue.kind == QueueKind::Input;
                svc.queue_mut(queue.kind)
                    .requeue_dead_letters(
                        queue,
                        &limits,
                        indexes,
                        unique_request_ids,
                        now_ms,
                        events,
                    )
                    .map(Reply::Items)
            }
            Command::Coalesced(_) => Err(Rejection::Invalid(
                "a coalesced entry is applied only as a whole log entry".into(),
            )),
            Command::Batch(commands) => Ok(Reply::batch(
                commands
                    .iter()
                    .map(|c| match c {
                        Command::Batch(_) | Command::Coalesced(_) => {
                            Reply::Rejected(Rejection::Invalid("nested command batch".into()))
                        }
                        c => self.apply_command(c, now_ms, events),
                    })
                    .collect(),
            )),
        }
    }

    fn create_service(&mut self, name: &str, config: &ServiceConfig) -> Result<Reply, Rejection> {
        validate_service_name(name)?;
        config.validate()?;
        if self.services.contains_key(name) {
            return Err(Rejection::ServiceExists(name.to_string()));
        }
        self.services
            .insert(name.to_string(), Service::new(config.clone()));
        Ok(Reply::Done)
    }

    fn update_service(&mut self, name: &str, config: &ServiceConfig) -> Result<Reply, Rejection> {
        config.validate()?;
        let svc = self.service_mut(name)?;
        svc.config = config.clone();
        svc.trim_dead_letters();
        Ok(Reply::Done)
    }

    /// Remove a service; every watcher of its queues is closed.
    fn delete_service(&mut self, name: &str, events: &mut Vec<Event>) -> Result<Reply, Rejection> {
        let svc = self
            .services
            .remove(name)
            .ok_or_else(|| Rejection::NoSuchService(name.to_string()))?;
        for queue in [&svc.input, &svc.sink] {
            for group in queue.groups.values() {
                for c in group.consumers.values() {
                    events.push(Event::Close {
                        node: c.node,
                        connection: c.connection,
                    });
                }
            }
        }
        Ok(Reply::Done)
    }

    fn put(
        &mut self,
        queue: &QueueRef,
        item: &NewItem,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        validate_request_id(&item.request_id)?;
        let svc = self.service_mut(&queue.service)?;
        let request_id = item.request_id.clone();
        // On the input queue a request id is an idempotency key: a retried
        // put answers the item the first one made.
        if queue.kind == QueueKind::Input
            && let Some(index) = svc.input.index_of_request(&request_id)
        {
            return Ok(Reply::Put { index, request_id });
        }
        let limits = svc.config.limits(queue.kind).clone();
        let index = svc
            .queue_mut(queue.kind)
            .put(queue, &limits, item.clone(), now_ms, events)?;
        Ok(Reply::Put { index, request_id })
    }

    /// Hand items back; `(code, reason)` become the message a dead letter
    /// keeps.
    fn negative(
        &mut self,
        queue: &QueueRef,
        group: &str,
        indexes: &[u64],
        (code, reason): (&str, &str),
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        let svc = self.service_mut(&queue.service)?;
        let max_delivery = svc.config.max_delivery;
        let message = match (code.is_empty(), reason.is_empty()) {
            (true, true) => String::new(),
            (false, true) => code.to_string(),
            (true, false) => reason.to_string(),
            (false, false) => format!("{code}: {reason}"),
        };
        let hand_back = HandBack {
            group,
            indexes,
            message,
            max_delivery,
        };
        svc.queue_mut(queue.kind)
            .negative(queue, hand_back, now_ms, events);
        svc.trim_dead_letters();
        Ok(Reply::Done)
    }

    fn attach(
        &mut self,
        queue: &QueueRef,
        consumer: &ConsumerSpec,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        if consumer.group.is_empty() || consumer.user.is_empty() {
            return Err(Rejection::Invalid(
                "consumer group and user must be set".into(),
            ));
        }
        let svc = self.service_mut(&queue.service)?;
        svc.queue_mut(queue.kind)
            .attach(queue, consumer.clone(), now_ms, events);
        Ok(Reply::Done)
    }

    fn detach(
        &mut self,
        queue: &QueueRef,
        group: &str,
        user: &str,
        connection: u64,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        let svc = self.service_mut(&queue.service)?;
        let (grace, max_delivery) = (svc.config.consumer_grace_ms, svc.config.max_delivery);
        let ended = ConsumerConnection {
            group,
            user,
            connection,
        };
        svc.queue_mut(queue.kind)
            .detach(queue, ended, grace, max_delivery, now_ms, events);
        svc.trim_dead_letters();
        Ok(Reply::Done)
    }

    /// Every consumer on `node` is gone at once (no grace): its items go
    /// back to their groups.
    fn node_gone(
        &mut self,
        node: NodeId,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        for (name, svc) in self.services.iter_mut() {
            let max_delivery = svc.config.max_delivery;
            for kind in [QueueKind::Input, QueueKind::Sink] {
                let qref = QueueRef::new(name.clone(), kind);
                svc.queue_mut(kind)
                    .node_gone(&qref, node, max_delivery, now_ms, events);
            }
            svc.trim_dead_letters();
        }
        Ok(Reply::Done)
    }

    /// Leaving consumers whose grace period ended are removed.
    fn expire(&mut self, now_ms: u64, events: &mut Vec<Event>) -> Result<Reply, Rejection> {
        for (name, svc) in self.services.iter_mut() {
            let (grace, max_delivery) = (svc.config.consumer_grace_ms, svc.config.max_delivery);
            for kind in [QueueKind::Input, QueueKind::Sink] {
                let qref = QueueRef::new(name.clone(), kind);
                svc.queue_mut(kind)
                    .expire(&qref, grace, max_delivery, now_ms, events);
            }
            svc.trim_dead_letters();
        }
        Ok(Reply::Done)
    }

    /// A worker's result for input `input_index`: stored on the sink under
    /// the input's request id (once: a second result for it is a
    /// duplicate), and the input committed for `group`.
    fn complete(
        &mut self,
        service: &str,
        group: &str,
        input_index: u64,
        result: Option<&NewItem>,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        let svc = self.service_mut(service)?;
        let input_ref = QueueRef::new(service.to_string(), QueueKind::Input);
        let sink_ref = QueueRef::new(service.to_string(), QueueKind::Sink);
        let mut sink_index = None;
        let mut duplicate = false;
        if let Some(result) = result {
            validate_request_id(&result.request_id)?;
            let input = svc.input.items.get(&input_index);
            if let Some(held) = input
                && held.request_id != *result.request_id
            {
                return Err(Rejection::RequestMismatch {
                    index: input_index,
                    held: held.request_id.to_string(),
                    given: result.request_id.clone(),
                });
            }
            if svc.sink.index_of_request(&result.request_id).is_some() {
                duplicate = true;
            } else if input.is_none() {
                return Err(Rejection::InputGone {
                    index: input_index,
                    dead_lettered: svc.input.dead.contains_key(&input_index),
                });
            } else {
                let limits = svc.config.sink.clone();
                if svc.sink.len() as u64 >= limits.max_length && !limits.evict_oldest {
                    return Err(Rejection::SinkFull(service.to_string()));
                }
                sink_index = Some(
                    svc.sink
                        .put(&sink_ref, &limits, result.clone(), now_ms, events)
                        .map_err(|r| match r {
                            Rejection::Full(_) | Rejection::FullBytes { .. } => {
                                Rejection::SinkFull(service.to_string())
                            }
                            other => other,
                        })?,
                );
            }
        }
        svc.input
            .commit(&input_ref, group, &[input_index], now_ms, events);
        Ok(Reply::Completed {
            sink_index,
            duplicate,
        })
    }

    /// The earliest time at which a `Tick` would remove a leaving consumer.
    pub fn next_expiry(&self) -> Option<u64> {
        self.services
            .values()
            .flat_map(|svc| {
                let grace = svc.config.consumer_grace_ms;
                [svc.input.next_expiry(grace), svc.sink.next_expiry(grace)]
            })
            .flatten()
            .min()
    }

    /// Whether a delivery to `connection` of item `index` is still current:
    /// the consumer on that connection holds the item.
    pub fn delivery_is_current(&self, queue: &QueueRef, connection: u64, index: u64) -> bool {
        let Some(q) = self.queue(queue) else {
            return false;
        };
        q.groups.values().any(|g| {
            g.consumers.iter().any(|(user, c)| {
                c.connection == connection
                    && g.in_flight.get(&index).is_some_and(|holder| holder == user)
            })
        })
    }

    /// The running consumers attached through `node`: (queue, group, user,
    /// connection). A node compares them with the connections it holds.
    pub fn running_consumers_on(&self, node: u64) -> Vec<(QueueRef, String, String, u64)> {
        let mut out = Vec::new();
        for (name, svc) in &self.services {
            for kind in [QueueKind::Input, QueueKind::Sink] {
                for (group, g) in &svc.queue(kind).groups {
                    for (user, c) in &g.consumers {
                        if c.node == node && c.status == super::one_queue::ConsumerStatus::Running {
                            out.push((
                                QueueRef::new(name.clone(), kind),
                                group.clone(),
                                user.clone(),
                                c.connection,
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    /// The latest time `apply` has seen (envelope time, never decreasing).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Nodes that host at least one consumer.
    pub fn consumer_nodes(&self) -> std::collections::BTreeSet<u64> {
        self.services
            .values()
            .flat_map(|s| [&s.input, &s.sink])
            .flat_map(|q| q.groups.values())
            .flat_map(|g| g.consumers.values().map(|c| c.node))
            .collect()
    }
}
