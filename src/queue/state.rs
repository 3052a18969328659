//! The whole replicated state: services, their queues, and the table of
//! recently applied command ids that makes retried commands idempotent.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::command::{
    Command, Envelope, Event, QueueKind, QueueRef, Rejection, Reply, ServiceConfig,
};
use super::queue::Queue;

/// How many applied command ids are remembered for de-duplication.
pub const DEDUP_CAPACITY: usize = 20_000;

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
    recent_ids: VecDeque<u128>,
    recent_replies: BTreeMap<u128, Reply>,
    /// The latest envelope time applied: time as `apply` sees it never goes
    /// backwards, whatever the clocks of successive leaders say.
    clock_ms: u64,
}

impl QueueState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild derived indexes after deserialization.
    pub fn rebuild_derived(&mut self) {
        for svc in self.services.values_mut() {
            svc.input.rebuild_derived();
            svc.sink.rebuild_derived();
        }
    }

    /// Payload bytes held by every queue of every service (items and dead
    /// letters). Nodes use it for admission control before proposing.
    pub fn payload_bytes_held(&self) -> u64 {
        self.services
            .values()
            .map(|s| s.input.bytes_held() + s.sink.bytes_held())
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
        if let Some(reply) = self.recent_replies.get(&envelope.id) {
            return (reply.clone(), Vec::new());
        }
        let decided = match envelope.command {
            Command::NodeLost { term, .. } | Command::GraceExpired { term } => Some(term),
            _ => None,
        };
        if let (Some(decided), Some(applied)) = (decided, term)
            && decided != applied
        {
            let reply = Reply::Rejected(Rejection::StaleTerm { decided, applied });
            self.remember(envelope.id, reply.clone());
            return (reply, Vec::new());
        }
        let now_ms = envelope.now_ms.max(self.clock_ms);
        self.clock_ms = now_ms;
        let mut events = Vec::new();
        let reply = self.apply_command(&envelope.command, now_ms, &mut events);
        self.remember(envelope.id, reply.clone());
        (reply, events)
    }

    fn remember(&mut self, id: u128, reply: Reply) {
        // Bulk replies are not kept: a retried take must not hand the same
        // items out again, but it need not repeat them either.
        let kept = match reply {
            Reply::Items(_) => Reply::Items(Vec::new()),
            other => other,
        };
        self.recent_ids.push_back(id);
        self.recent_replies.insert(id, kept);
        while self.recent_ids.len() > DEDUP_CAPACITY {
            if let Some(old) = self.recent_ids.pop_front() {
                self.recent_replies.remove(&old);
            }
        }
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

    fn try_apply(
        &mut self,
        command: &Command,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, Rejection> {
        match command {
            Command::CreateService { name, config } => {
                validate_service_name(name)?;
                config.validate()?;
                if self.services.contains_key(name) {
                    return Err(Rejection::ServiceExists(name.clone()));
                }
                self.services
                    .insert(name.clone(), Service::new(config.clone()));
                Ok(Reply::Done)
            }
            Command::UpdateService { name, config } => {
                config.validate()?;
                let svc = self.service_mut(name)?;
                svc.config = config.clone();
                svc.trim_dead_letters();
                Ok(Reply::Done)
            }
            Command::DeleteService { name } => {
                let svc = self
                    .services
                    .remove(name)
                    .ok_or_else(|| Rejection::NoSuchService(name.clone()))?;
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
            Command::Put { queue, item } => {
                let svc = self.service_mut(&queue.service)?;
                let limits = svc.config.limits(queue.kind).clone();
                let request_id = item.request_id.clone();
                let index =
                    svc.queue_mut(queue.kind)
                        .put(queue, &limits, item.clone(), now_ms, events)?;
                Ok(Reply::Put { index, request_id })
            }
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
            } => {
                let svc = self.service_mut(&queue.service)?;
                let max_delivery = svc.config.max_delivery;
                let message = match (code.is_empty(), reason.is_empty()) {
                    (true, true) => String::new(),
                    (false, true) => code.clone(),
                    (true, false) => reason.clone(),
                    (false, false) => format!("{code}: {reason}"),
                };
                svc.queue_mut(queue.kind).negative(
                    queue,
                    group,
                    indexes,
                    message,
                    max_delivery,
                    now_ms,
                    events,
                );
                svc.trim_dead_letters();
                Ok(Reply::Done)
            }
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
            Command::Attach { queue, consumer } => {
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
            Command::Detach {
                queue,
                group,
                user,
                connection,
            } => {
                let svc = self.service_mut(&queue.service)?;
                let (grace, max_delivery) = (svc.config.consumer_grace_ms, svc.config.max_delivery);
                svc.queue_mut(queue.kind).detach(
                    queue,
                    group,
                    user,
                    *connection,
                    grace,
                    max_delivery,
                    now_ms,
                    events,
                );
                svc.trim_dead_letters();
                Ok(Reply::Done)
            }
            Command::NodeGone { node } | Command::NodeLost { node, .. } => {
                for (name, svc) in self.services.iter_mut() {
                    let max_delivery = svc.config.max_delivery;
                    for kind in [QueueKind::Input, QueueKind::Sink] {
                        let qref = QueueRef::new(name.clone(), kind);
                        svc.queue_mut(kind)
                            .node_gone(&qref, *node, max_delivery, now_ms, events);
                    }
                    svc.trim_dead_letters();
                }
                Ok(Reply::Done)
            }
            Command::Tick | Command::GraceExpired { .. } => {
                for (name, svc) in self.services.iter_mut() {
                    let (grace, max_delivery) =
                        (svc.config.consumer_grace_ms, svc.config.max_delivery);
                    for kind in [QueueKind::Input, QueueKind::Sink] {
                        let qref = QueueRef::new(name.clone(), kind);
                        svc.queue_mut(kind)
                            .expire(&qref, grace, max_delivery, now_ms, events);
                    }
                    svc.trim_dead_letters();
                }
                Ok(Reply::Done)
            }
            Command::Complete {
                service,
                group,
                input_index,
                result,
            } => {
                let svc = self.service_mut(service)?;
                let input_ref = QueueRef::new(service.clone(), QueueKind::Input);
                let sink_ref = QueueRef::new(service.clone(), QueueKind::Sink);
                let mut sink_index = None;
                let mut duplicate = false;
                if let Some(result) = result {
                    let already = svc.sink.index_of_request(&result.request_id).is_some()
                        || !svc.input.items.contains_key(input_index);
                    if already {
                        duplicate = true;
                    } else {
                        let limits = svc.config.sink.clone();
                        if svc.sink.len() as u64 >= limits.max_length && !limits.evict_oldest {
                            return Err(Rejection::SinkFull(service.clone()));
                        }
                        sink_index = Some(
                            svc.sink
                                .put(&sink_ref, &limits, result.clone(), now_ms, events)
                                .map_err(|r| match r {
                                    Rejection::Full(_) | Rejection::FullBytes { .. } => {
                                        Rejection::SinkFull(service.clone())
                                    }
                                    other => other,
                                })?,
                        );
                    }
                }
                svc.input
                    .commit(&input_ref, group, &[*input_index], now_ms, events);
                Ok(Reply::Completed {
                    sink_index,
                    duplicate,
                })
            }
            Command::PurgeDeadLetters { queue } => {
                let svc = self.service_mut(&queue.service)?;
                svc.queue_mut(queue.kind).purge_dead_letters();
                Ok(Reply::Done)
            }
            Command::Batch(commands) => Ok(Reply::Batch(
                commands
                    .iter()
                    .map(|c| match c {
                        Command::Batch(_) => {
                            Reply::Rejected(Rejection::Invalid("nested command batch".into()))
                        }
                        c => self.apply_command(c, now_ms, events),
                    })
                    .collect(),
            )),
        }
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
    /// the consumer on that connection holds the item (or takes items with
    /// auto-commit, which keeps nothing in flight).
    pub fn delivery_is_current(&self, queue: &QueueRef, connection: u64, index: u64) -> bool {
        let Some(q) = self.queue(queue) else {
            return false;
        };
        q.groups.values().any(|g| {
            g.consumers.iter().any(|(user, c)| {
                c.connection == connection
                    && (c.auto_commit
                        || g.in_flight.get(&index).is_some_and(|holder| holder == user))
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
                        if c.node == node && c.status == super::queue::ConsumerStatus::Running {
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
