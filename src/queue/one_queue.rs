//! One queue: its items, its consumer groups and the dispatch rule.
//!
//! Invariants (checked by the property test in `tests/model.rs`):
//! - indexes are strictly increasing, never 0, never reused;
//! - an item is in flight to at most one consumer per group, and then it is
//!   not in that group's ready set;
//! - a consumer without auto-commit never holds more than `window` items
//!   (a takeover with a smaller window may leave it above until commits);
//! - a consumer with auto-commit holds at most [`AUTO_COMMIT_WINDOW`] items,
//!   and takes another only while the items it holds count for less than
//!   [`AUTO_COMMIT_WINDOW_BYTES`];
//! - an item leaves the queue only by commit of every group that sees it,
//!   by delete/truncate/take/eviction, or by dead-lettering.
//!
//! - `bytes_held` is the sum of the payload sizes of `items` and `dead`
//!   (checked after every step of the property tests).
//!
//! The ready set of a group, the request-id index, the byte count and the
//! bytes each consumer holds are derived state: they are rebuilt after a
//! snapshot is restored rather than stored.
//!
//! Auto-commit. The protocol says an auto-commit item is committed once it
//! is sent, and ignores `_window_`. Here an auto-commit consumer holds its
//! items in flight exactly like any other consumer, within a window of its
//! own ([`AUTO_COMMIT_WINDOW`] items, [`AUTO_COMMIT_WINDOW_BYTES`]); the node
//! that holds its connection proposes the `Commit` once a frame has been
//! written to the connection. So an item the node could not write (the
//! client stopped reading, the connection closed) is still in flight when
//! the consumer detaches and goes back to its group like any other, and
//! what a node buffers for an auto-commit connection is bounded by the
//! window rather than by the queue's backlog. Committing after the write
//! rather than at dispatch can deliver an item twice when a node fails
//! between the write and the commit; an item that was written and that the
//! client never read is gone with its connection, as the protocol implies.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::command::{
    ConsumerSpec, Event, Frame, NewItem, NodeId, QueueLimits, QueueRef, Rejection, Selector, Tags,
};
use super::request_id::RequestId;

use crate::protocol::{PATH_TAG, REQUEST_ID_TAG};

/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// A request id travels back in the `X-Eas-Queueservice-Request-Id` header
/// and is a lookup key: it must be a non-empty header value of visible
/// ASCII, at most [`MAX_REQUEST_ID_BYTES`] long.
pub fn validate_request_id(id: &str) -> Result<(), Rejection> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Rejection::Invalid(format!(
            "requestId must be 1-{MAX_REQUEST_ID_BYTES} visible ASCII characters (no spaces or \
             control characters)"
        )));
    }
    Ok(())
}

/// A stored item.
///
/// Kept small, since a queue may hold millions: 88 bytes inline, under an
/// `Arc` (so copying the state for a snapshot copies pointers, not items),
/// plus the payload (and the request id when it is not a UUID as nodes
/// assign them: see [`RequestId`]). The request id and the sub-path
/// are not repeated as tags (a map of one entry costs a whole tree node);
/// what few items have (other tags, a sub-path, a negative-commit message)
/// sits in one optional box. Serialized exactly as the earlier layout
/// (`tags` a map holding `requestId` and `path` too), so snapshots written
/// before read back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub index: u64,
    pub request_id: RequestId,
    pub data: Bytes,
    pub priority: u32,
    /// How many times the item was handed to a consumer.
    pub deliveries: u32,
    pub enqueued_ms: u64,
    extras: Option<Box<ItemExtras>>,
}

/// What few items have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ItemExtras {
    /// Sub-path the item was put on (for the engine).
    path: Box<str>,
    /// The last negative-commit code and reason, shown with redeliveries.
    message: Box<str>,
    /// The tags other than `requestId` and (when the item has a sub-path)
    /// `path`, sorted by key.
    tags: Box<[(Box<str>, Box<str>)]>,
}

impl Item {
    /// The stored form of `item`, put at `index` at `enqueued_ms`.
    fn new(index: u64, item: NewItem, enqueued_ms: u64) -> Self {
        let has_path = !item.path.is_empty();
        let tags: Box<[(Box<str>, Box<str>)]> = item
            .tags
            .into_iter()
            .filter(|(k, _)| k != REQUEST_ID_TAG && !(has_path && k == PATH_TAG))
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        let extras = (has_path || !tags.is_empty()).then(|| {
            Box::new(ItemExtras {
                path: item.path.into_boxed_str(),
                message: Box::default(),
                tags,
            })
        });
        Self {
            index,
            request_id: RequestId::from(item.request_id),
            data: item.data,
            priority: item.priority,
            deliveries: 0,
            enqueued_ms,
            extras,
        }
    }

    /// Sub-path the item was put on (for the engine), empty for `/`.
    pub fn path(&self) -> &str {
        self.extras.as_ref().map_or("", |x| &x.path)
    }

    /// The last negative-commit code and reason, shown with redeliveries.
    pub fn message(&self) -> &str {
        self.extras.as_ref().map_or("", |x| &x.message)
    }

    /// Set the message; an item whose extras are all empty holds none, so
    /// equal items are equal however they were built (replicas compare
    /// their states).
    fn set_message(&mut self, message: &str) {
        if message.is_empty() && self.extras.is_none() {
            return;
        }
        let extras = self.extras.get_or_insert_default();
        extras.message = message.into();
        if extras.path.is_empty() && extras.message.is_empty() && extras.tags.is_empty() {
            self.extras = None;
        }
    }

    /// Heap bytes the item holds besides its record and its payload (its
    /// extras, and a request id that is not a node's UUID), roughly as the
    /// allocator counts them: what memory admission adds to
    /// `ITEM_OVERHEAD_BYTES` for it.
    pub fn meta_bytes(&self) -> u64 {
        /// An allocation's bookkeeping and rounding, on average.
        const SLACK: usize = 16;
        let id = self.request_id.heap_bytes();
        let extras = self.extras.as_ref().map_or(0, |x| {
            let tags: usize = x
                .tags
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2 * SLACK + 32)
                .sum();
            size_of::<ItemExtras>() + SLACK + x.path.len() + x.message.len() + tags
        });
        (id + extras) as u64
    }

    /// The item's key in its queue's request-id index.
    fn request_key(&self) -> (u64, u64) {
        (request_id_hash(&self.request_id.text()), self.index)
    }

    fn extra_tags(&self) -> &[(Box<str>, Box<str>)] {
        self.extras.as_ref().map_or(&[], |x| &x.tags)
    }

    /// The value of tag `key` other than `requestId` (see
    /// [`Self::request_id`]): `path` included.
    pub fn tag(&self, key: &str) -> Option<&str> {
        if key == PATH_TAG && !self.path().is_empty() {
            return Some(self.path());
        }
        let tags = self.extra_tags();
        tags.binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*tags[i].1)
    }

    /// Whether the item carries every pair of `filter`.
    pub fn matches(&self, filter: &Tags) -> bool {
        filter.iter().all(|(k, v)| {
            if k == REQUEST_ID_TAG {
                self.request_id == **v
            } else {
                self.tag(k) == Some(v.as_str())
            }
        })
    }

    /// Every tag, `requestId` (whose text is `request_id`) and `path`
    /// included, by key.
    fn tag_pairs<'a>(&'a self, request_id: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut pairs: Vec<(&str, &str)> = self
            .extra_tags()
            .iter()
            .map(|(k, v)| (&**k, &**v))
            .collect();
        pairs.push((REQUEST_ID_TAG, request_id));
        if !self.path().is_empty() {
            pairs.push((PATH_TAG, self.path()));
        }
        pairs.sort_unstable_by_key(|(k, _)| *k);
        pairs
    }

    /// Every tag, `requestId` and `path` included.
    pub fn tags(&self) -> Tags {
        self.tag_pairs(&self.request_id.text())
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The tags the item was put with: [`Self::tags`] without `requestId`
    /// and `path`, which a put carries apart.
    fn put_tags(&self) -> Tags {
        self.extra_tags()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn frame(&self, with_data: bool) -> Frame {
        Frame {
            index: self.index,
            tags: self.tags(),
            data: if with_data {
                self.data.clone()
            } else {
                Bytes::new()
            },
            path: self.path().to_string(),
            message: self.message().to_string(),
            deliveries: 0,
        }
    }

    /// The frame that hands this item to a consumer: with the count of
    /// deliveries, which tells a first delivery from one after a failure.
    fn delivery(&self, with_data: bool) -> Frame {
        Frame {
            deliveries: self.deliveries,
            ..self.frame(with_data)
        }
    }

    fn order_key(&self) -> ReadyKey {
        (u32::MAX - self.priority, self.index)
    }

    /// What the item counts for in the bytes a consumer holds: its payload
    /// (which never changes) and a fixed overhead.
    pub fn held_bytes(&self) -> u64 {
        self.data.len() as u64 + HELD_ITEM_OVERHEAD
    }
}

/// The serialized layout of an [`Item`]: see [`Item`].
#[derive(Serialize)]
struct StoredItemRef<'a> {
    index: u64,
    request_id: &'a str,
    tags: TagPairs<'a>,
    data: &'a Bytes,
    priority: u32,
    path: &'a str,
    enqueued_ms: u64,
    deliveries: u32,
    message: &'a str,
}

/// Tags serialized as a map, in key order.
struct TagPairs<'a>(Vec<(&'a str, &'a str)>);

impl Serialize for TagPairs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().copied())
    }
}

#[derive(Deserialize)]
struct StoredItem {
    index: u64,
    request_id: String,
    tags: Tags,
    data: Bytes,
    priority: u32,
    path: String,
    enqueued_ms: u64,
    deliveries: u32,
    message: String,
}

impl Serialize for Item {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let request_id = self.request_id.text();
        StoredItemRef {
            index: self.index,
            request_id: &request_id,
            tags: TagPairs(self.tag_pairs(&request_id)),
            data: &self.data,
            priority: self.priority,
            path: self.path(),
            enqueued_ms: self.enqueued_ms,
            deliveries: self.deliveries,
            message: self.message(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = StoredItem::deserialize(d)?;
        let new = NewItem {
            request_id: stored.request_id,
            tags: stored.tags,
            data: stored.data,
            priority: stored.priority,
            path: stored.path,
        };
        let mut item = Item::new(stored.index, new, stored.enqueued_ms);
        item.deliveries = stored.deliveries;
        item.set_message(&stored.message);
        Ok(item)
    }
}

/// The key of a request id in a queue's request-id index: a fixed hash,
/// so replicas (and runs) agree on the derived state.
fn request_id_hash(request_id: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(request_id)
}

/// Dispatch order: higher priority first, then lower index.
type ReadyKey = (u32, u64);

/// Most items an auto-commit consumer holds between dispatch and the
/// commit its node proposes once they are written: enough to keep a
/// consumer busy across a commit's round trip, few enough that a consumer
/// that stops reading ties up little of the queue.
pub const AUTO_COMMIT_WINDOW: u32 = 256;

/// An auto-commit consumer takes no further item while the items it holds
/// count for this many bytes or more ([`Item::held_bytes`]); a single larger
/// item still goes to a consumer that holds nothing. Well below what a
/// node buffers for one connection, so a reader that keeps up is never
/// closed for its buffer.
pub const AUTO_COMMIT_WINDOW_BYTES: u64 = 8 * 1024 * 1024;

/// What a held item counts for beyond its payload.
const HELD_ITEM_OVERHEAD: u64 = 128;

/// Whether `tags` contains every pair of `filter`.
pub fn tags_match(tags: &Tags, filter: &Tags) -> bool {
    filter.iter().all(|(k, v)| tags.get(k) == Some(v))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerStatus {
    Running,
    /// The connection dropped at `since_ms`; items are kept until the grace
    /// period ends or the consumer reconnects.
    Leaving {
        since_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumer {
    pub node: NodeId,
    pub connection: u64,
    pub window: u32,
    pub auto_commit: bool,
    pub index_only: bool,
    pub tags: Tags,
    pub start_index: u64,
    pub status: ConsumerStatus,
    /// Items delivered and not yet committed.
    pub pending: u32,
    pub last_index: u64,
    pub last_active_ms: u64,
    /// [`Item::held_bytes`] of the items it holds (derived).
    #[serde(skip)]
    pub pending_bytes: u64,
}

impl Consumer {
    pub fn has_free_slot(&self) -> bool {
        if self.status != ConsumerStatus::Running {
            return false;
        }
        if self.auto_commit {
            self.pending < AUTO_COMMIT_WINDOW
                && (self.pending == 0 || self.pending_bytes < AUTO_COMMIT_WINDOW_BYTES)
        } else {
            self.pending < self.window
        }
    }
}

/// Consumers sharing one group id: each item goes to one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The tag filter the group was created with; items it does not match
    /// are not waited for when deciding whether an item is consumed.
    pub tags: Tags,
    pub consumers: BTreeMap<String, Consumer>,
    /// index -> user id of the consumer holding it.
    pub in_flight: BTreeMap<u64, String>,
    /// Items this group committed that other groups still have to consume.
    pub acked: BTreeSet<u64>,
    /// Items the group sees that are neither in flight nor committed by
    /// it (derived), in dispatch order.
    #[serde(skip)]
    ready: BTreeSet<ReadyKey>,
    /// For each tag filter of a consumer that is narrower than the group's:
    /// the ready items it matches (derived). Dispatch looks only at the
    /// items a consumer takes, so what it costs does not grow with items a
    /// consumer's filter passes over.
    #[serde(skip)]
    narrowed: BTreeMap<Tags, BTreeSet<ReadyKey>>,
}

/// No ready items: what a consumer sees whose filter has no set yet.
static NO_ITEMS: BTreeSet<ReadyKey> = BTreeSet::new();

/// The first key of `ready` at or after `start_index` in dispatch order:
/// one range lookup per priority level holding items before `start_index`,
/// never a walk over them.
fn first_ready_from(
    ready: &BTreeSet<ReadyKey>,
    start_index: u64,
    lookups: &mut LocalCounter,
) -> Option<ReadyKey> {
    let mut from = (0, start_index);
    loop {
        lookups.0 += 1;
        let &(level, index) = ready.range(from..).next()?;
        if index >= start_index {
            return Some((level, index));
        }
        // Nothing at this level is at or after start_index: the next level.
        from = (level, start_index);
    }
}

impl Group {
    fn sees(&self, item: &Item) -> bool {
        item.matches(&self.tags)
    }

    /// Whether every item the group sees passes `filter` too.
    fn implies(&self, filter: &Tags) -> bool {
        tags_match(&self.tags, filter)
    }

    /// `item` (which the group sees) is ready to be given.
    fn make_ready(&mut self, item: &Item) {
        let key = item.order_key();
        self.ready.insert(key);
        for (filter, ready) in &mut self.narrowed {
            if item.matches(filter) {
                ready.insert(key);
            }
        }
    }

    /// The item of `key` is no longer ready.
    fn unready(&mut self, key: &ReadyKey) {
        if self.ready.remove(key) {
            for ready in self.narrowed.values_mut() {
                ready.remove(key);
            }
        }
    }

    /// The ready items `consumer` may be given, before its start index.
    fn ready_for(&self, consumer: &Consumer) -> &BTreeSet<ReadyKey> {
        if self.implies(&consumer.tags) {
            &self.ready
        } else {
            let ready = self.narrowed.get(&consumer.tags);
            debug_assert!(
                ready.is_some(),
                "no ready set for filter {:?}",
                consumer.tags
            );
            ready.unwrap_or(&NO_ITEMS)
        }
    }

    /// Keep one narrowed set per filter of a consumer narrower than the
    /// group's: build those of new filters from the ready set, drop those
    /// no consumer uses any more.
    fn sync_narrowed(&mut self, items: &BTreeMap<u64, Arc<Item>>) {
        let wanted: BTreeSet<&Tags> = self
            .consumers
            .values()
            .map(|c| &c.tags)
            .filter(|t| !self.implies(t))
            .collect();
        self.narrowed.retain(|t, _| wanted.contains(t));
        let missing: Vec<Tags> = wanted
            .into_iter()
            .filter(|t| !self.narrowed.contains_key(*t))
            .cloned()
            .collect();
        for filter in missing {
            let ready = self
                .ready
                .iter()
                .filter(|(_, index)| items.get(index).is_some_and(|it| it.matches(&filter)))
                .copied()
                .collect();
            self.narrowed.insert(filter, ready);
        }
    }

    /// Whether the ready sets are what the items say they are: the ready
    /// set, and one narrowed set per narrower filter in use, each exactly
    /// the ready items it matches.
    #[cfg(test)]
    pub(crate) fn check_ready_sets(&self, items: &BTreeMap<u64, Arc<Item>>) -> Result<(), String> {
        let mut expected = self.clone();
        expected.rebuild_ready(items);
        if expected.ready != self.ready {
            return Err(format!(
                "ready {:?}, expected {:?}",
                self.ready, expected.ready
            ));
        }
        if expected.narrowed != self.narrowed {
            return Err(format!(
                "narrowed {:?}, expected {:?}",
                self.narrowed, expected.narrowed
            ));
        }
        Ok(())
    }

    /// Rebuild the ready sets from the items.
    fn rebuild_ready(&mut self, items: &BTreeMap<u64, Arc<Item>>) {
        self.ready = items
            .values()
            .filter(|it| {
                self.sees(it)
                    && !self.in_flight.contains_key(&it.index)
                    && !self.acked.contains(&it.index)
            })
            .map(|it| it.order_key())
            .collect();
        self.narrowed.clear();
        self.sync_narrowed(items);
    }

    /// A group without consumers is inactive: it remembers what it committed
    /// (so a returning group is not handed those items again) but no item
    /// waits for it.
    fn is_active(&self) -> bool {
        !self.consumers.is_empty() || !self.in_flight.is_empty()
    }

    /// The windows of the group's running consumers, summed.
    pub fn running_window(&self) -> u64 {
        self.consumers
            .values()
            .filter(|c| c.status == ConsumerStatus::Running)
            .map(|c| u64::from(c.window))
            .sum()
    }

    fn waits_for(&self, item: &Item) -> bool {
        self.is_active() && self.sees(item) && !self.acked.contains(&item.index)
    }

    /// Take `item` out of flight, from whichever consumer holds it.
    fn release(&mut self, item: &Item) {
        if let Some(user) = self.in_flight.remove(&item.index)
            && let Some(c) = self.consumers.get_mut(&user)
        {
            c.pending = c.pending.saturating_sub(1);
            c.pending_bytes = c.pending_bytes.saturating_sub(item.held_bytes());
        }
    }
}

/// Where dispatch writes the deliveries it decides: the queue they are
/// from, and the events the apply emits.
struct Outbox<'a> {
    queue: &'a QueueRef,
    events: &'a mut Vec<Event>,
}

/// One connection of a consumer, as a `Detach` names it.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerConnection<'a> {
    pub group: &'a str,
    pub user: &'a str,
    pub connection: u64,
}

/// Items a consumer of `group` hands back (`Negative`), with the message
/// they keep: each is delivered again, or dead-lettered once it was
/// delivered `max_delivery` times (0: never).
#[derive(Debug, Clone)]
pub struct HandBack<'a> {
    pub group: &'a str,
    pub indexes: &'a [u64],
    pub message: String,
    pub max_delivery: u32,
}

/// One queue (the input or the sink of a service): its items, its
/// consumer groups with what each holds, and its dead letters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub items: BTreeMap<u64, Arc<Item>>,
    /// The index the next put gets. Starts at 1.
    pub next_index: u64,
    pub groups: BTreeMap<String, Group>,
    /// Items given up on after too many deliveries, kept for inspection.
    pub dead: BTreeMap<u64, Arc<Item>>,
    pub ended: bool,
    /// Totals since the queue was created (for metrics).
    pub puts_total: u64,
    pub commits_total: u64,
    /// Dead letters dropped to stay within `max_dead_letters` or purged.
    pub dead_dropped_total: u64,
    /// (hash of the request id, index) of every item: a request id may be
    /// held by several items (results written twice on the sink), and
    /// every one of them stays findable. A hash rather than the id itself,
    /// so the id is stored once; lookups compare the items' ids.
    #[serde(skip)]
    by_request_id: BTreeSet<(u64, u64)>,
    /// Payload bytes of `items` and `dead`.
    #[serde(skip)]
    bytes_held: u64,
    /// [`Item::meta_bytes`] of `items` (derived; dead letters are few).
    #[serde(skip)]
    meta_bytes_held: u64,
    /// Items handed back to their group for another delivery (a negative
    /// commit, a consumer gone); counted by this replica as it applies.
    #[serde(skip)]
    pub redeliveries: LocalCounter,
    /// Lookups in ready sets dispatch made to find items for consumers
    /// (by this replica): the measure of what dispatch costs.
    #[serde(skip)]
    pub dispatch_lookups: LocalCounter,
}

/// A figure this replica counts for its metrics since it started (or last
/// installed a snapshot): not part of the replicated state, so it is
/// neither stored nor compared (replicas equal in state are equal whatever
/// their counters say).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalCounter(pub u64);

impl PartialEq for LocalCounter {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for LocalCounter {}

impl Queue {
    pub fn new() -> Self {
        Self {
            next_index: 1,
            ..Default::default()
        }
    }

    /// Rebuild derived indexes after deserialization.
    pub fn rebuild_derived(&mut self) {
        self.bytes_held = self
            .items
            .values()
            .chain(self.dead.values())
            .map(|it| it.data.len() as u64)
            .sum();
        self.by_request_id = self.items.values().map(|it| it.request_key()).collect();
        self.meta_bytes_held = self.items.values().map(|it| it.meta_bytes()).sum();
        for group in self.groups.values_mut() {
            group.rebuild_ready(&self.items);
            for c in group.consumers.values_mut() {
                c.pending_bytes = 0;
            }
            for (index, user) in &group.in_flight {
                if let (Some(item), Some(c)) =
                    (self.items.get(index), group.consumers.get_mut(user))
                {
                    c.pending_bytes += item.held_bytes();
                }
            }
        }
    }

    /// A copy of what a snapshot stores, without the derived indexes (ready
    /// sets, request-id index), which a restore rebuilds: cheaper to take
    /// under the state lock than a full clone. Items are shared, not copied.
    pub fn snapshot_copy(&self) -> Self {
        Self {
            items: self.items.clone(),
            next_index: self.next_index,
            groups: self
                .groups
                .iter()
                .map(|(id, g)| {
                    let group = Group {
                        tags: g.tags.clone(),
                        consumers: g.consumers.clone(),
                        in_flight: g.in_flight.clone(),
                        acked: g.acked.clone(),
                        ..Group::default()
                    };
                    (id.clone(), group)
                })
                .collect(),
            dead: self.dead.clone(),
            ended: self.ended,
            puts_total: self.puts_total,
            commits_total: self.commits_total,
            dead_dropped_total: self.dead_dropped_total,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Payload bytes held by the queue: its items and its dead letters.
    pub fn bytes_held(&self) -> u64 {
        self.bytes_held
    }

    /// What its items hold on the heap besides their records and payloads
    /// ([`Item::meta_bytes`]): tags, sub-paths, messages, request ids that
    /// are not UUIDs. For memory admission.
    pub fn meta_bytes_held(&self) -> u64 {
        self.meta_bytes_held
    }

    /// The oldest item holding `request_id`.
    pub fn index_of_request(&self, request_id: &str) -> Option<u64> {
        self.indexes_of_request(request_id).next()
    }

    /// Every item holding `request_id`, oldest first.
    pub fn indexes_of_request<'a>(
        &'a self,
        request_id: &'a str,
    ) -> impl DoubleEndedIterator<Item = u64> + 'a {
        let hash = request_id_hash(request_id);
        self.by_request_id
            .range((hash, 0)..=(hash, u64::MAX))
            .map(|(_, i)| *i)
            .filter(move |i| {
                self.items
                    .get(i)
                    .is_some_and(|it| it.request_id == *request_id)
            })
    }

    pub fn in_flight_count(&self) -> usize {
        self.groups.values().map(|g| g.in_flight.len()).sum()
    }

    // ---- mutations ---------------------------------------------------------

    pub fn put(
        &mut self,
        qref: &QueueRef,
        limits: &QueueLimits,
        item: NewItem,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<u64, Rejection> {
        let size = item.data.len() as u64;
        if size > limits.max_payload_bytes {
            return Err(Rejection::TooLarge {
                size,
                limit: limits.max_payload_bytes,
            });
        }
        let over_length = |q: &Self| q.items.len() as u64 >= limits.max_length;
        let over_bytes = |q: &Self| q.bytes_held.saturating_add(size) > limits.max_bytes;
        // Checked before evicting anything: a refused put changes nothing.
        if size > limits.max_bytes {
            return Err(Rejection::FullBytes {
                limit: limits.max_bytes,
            });
        }
        if over_length(self) && (!limits.evict_oldest || limits.max_length == 0) {
            return Err(Rejection::Full(limits.max_length));
        }
        if over_bytes(self) && !limits.evict_oldest {
            return Err(Rejection::FullBytes {
                limit: limits.max_bytes,
            });
        }
        while over_length(self) {
            let oldest = *self.items.keys().next().expect("queue is non-empty");
            self.remove_item(oldest);
        }
        // Dead letters make room first: they are kept for inspection only.
        while over_bytes(self) {
            if let Some((_, dead)) = self.dead.pop_first() {
                self.bytes_held -= dead.data.len() as u64;
                self.dead_dropped_total += 1;
            } else {
                let oldest = *self.items.keys().next().expect("bytes are held by items");
                self.remove_item(oldest);
            }
        }
        let index = self.next_index;
        self.next_index += 1;
        let stored = Item::new(index, item, now_ms);
        for group in self.groups.values_mut() {
            if group.sees(&stored) {
                group.make_ready(&stored);
            }
        }
        self.by_request_id.insert(stored.request_key());
        self.bytes_held += size;
        self.meta_bytes_held += stored.meta_bytes();
        self.items.insert(index, Arc::new(stored));
        self.puts_total += 1;
        events.push(Event::Changed {
            queue: qref.clone(),
        });
        self.dispatch_all(qref, now_ms, events);
        Ok(index)
    }

    /// Remove an item everywhere. Returns it if it existed.
    fn remove_item(&mut self, index: u64) -> Option<Arc<Item>> {
        let item = self.items.remove(&index)?;
        self.bytes_held -= item.data.len() as u64;
        self.meta_bytes_held -= item.meta_bytes();
        self.by_request_id.remove(&item.request_key());
        let key = item.order_key();
        for group in self.groups.values_mut() {
            group.unready(&key);
            group.acked.remove(&index);
            group.release(&item);
        }
        Some(item)
    }

    /// Items matching `selector`, oldest first (a read; nothing changes).
    pub fn select(&self, selector: &Selector) -> Vec<&Item> {
        let limit = selector.length.max(1) as usize;
        // A request-id lookup is the common case for results: use the index.
        if let Some(rid) = selector.tags.get(REQUEST_ID_TAG) {
            let mut matching = self
                .indexes_of_request(rid)
                .filter_map(|i| self.items.get(&i).map(|it| &**it))
                .filter(|it| it.matches(&selector.tags));
            return match selector.from_index {
                None => matching.next_back().into_iter().collect(),
                Some(from) => matching.filter(|it| it.index >= from).take(limit).collect(),
            };
        }
        match selector.from_index {
            None => self
                .items
                .values()
                .rev()
                .map(|it| &**it)
                .filter(|it| it.matches(&selector.tags))
                .take(1)
                .collect(),
            Some(from) => self
                .items
                .range(from..)
                .map(|(_, it)| &**it)
                .filter(|it| it.matches(&selector.tags))
                .take(limit)
                .collect(),
        }
    }

    pub fn peek(&self, selector: &Selector) -> Vec<Frame> {
        self.select(selector)
            .into_iter()
            .map(|it| it.frame(true))
            .collect()
    }

    pub fn take(
        &mut self,
        qref: &QueueRef,
        selector: &Selector,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Vec<Frame> {
        let indexes: Vec<u64> = self.select(selector).iter().map(|it| it.index).collect();
        let frames: Vec<Frame> = indexes
            .iter()
            .filter_map(|i| self.remove_item(*i))
            .map(|it| it.frame(true))
            .collect();
        if !frames.is_empty() {
            events.push(Event::Changed {
                queue: qref.clone(),
            });
            self.dispatch_all(qref, now_ms, events);
        }
        frames
    }

    pub fn delete(
        &mut self,
        qref: &QueueRef,
        indexes: &[u64],
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let mut any = false;
        for i in indexes {
            any |= self.remove_item(*i).is_some();
        }
        if any {
            events.push(Event::Changed {
                queue: qref.clone(),
            });
            self.dispatch_all(qref, now_ms, events);
        }
    }

    pub fn truncate(&mut self, qref: &QueueRef, before: u64, now_ms: u64, events: &mut Vec<Event>) {
        let doomed: Vec<u64> = self.items.range(..before).map(|(i, _)| *i).collect();
        self.delete(qref, &doomed, now_ms, events);
    }

    pub fn end(&mut self, qref: &QueueRef, force: bool, now_ms: u64, events: &mut Vec<Event>) {
        self.ended = true;
        if force {
            let undelivered: Vec<u64> = self
                .items
                .keys()
                .filter(|i| !self.groups.values().any(|g| g.in_flight.contains_key(i)))
                .copied()
                .collect();
            self.delete(qref, &undelivered, now_ms, events);
        }
        events.push(Event::Changed {
            queue: qref.clone(),
        });
    }

    /// Commit `indexes` for `group`. Unknown indexes are ignored: a commit
    /// racing a redelivery must not fail the client.
    pub fn commit(
        &mut self,
        qref: &QueueRef,
        group: &str,
        indexes: &[u64],
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let mut changed = false;
        for &index in indexes {
            changed |= self.commit_one(group, index);
        }
        if changed {
            events.push(Event::Changed {
                queue: qref.clone(),
            });
            self.dispatch_all(qref, now_ms, events);
        }
    }

    /// Returns whether anything changed.
    fn commit_one(&mut self, group_id: &str, index: u64) -> bool {
        let Some(item) = self.items.get(&index) else {
            return false;
        };
        let key = item.order_key();
        match self.groups.get_mut(group_id) {
            Some(group) => {
                group.release(item);
                group.unready(&key);
                group.acked.insert(index);
            }
            None => {
                // A commit from outside any watching group consumes the item
                // only if no group is waiting for it.
                if self.groups.values().any(|g| g.is_active() && g.sees(item)) {
                    return false;
                }
            }
        }
        self.commits_total += 1;
        self.release_if_consumed(index);
        true
    }

    /// Delete the item if no active group still waits for it.
    fn release_if_consumed(&mut self, index: u64) {
        let Some(item) = self.items.get(&index) else {
            return;
        };
        if !self.groups.values().any(|g| g.waits_for(item)) {
            self.remove_item(index);
        }
    }

    /// Items handed back by a consumer go back to their group (or to the
    /// dead letters); items it does not hold are ignored.
    pub fn negative(
        &mut self,
        qref: &QueueRef,
        hand_back: HandBack<'_>,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let HandBack {
            group: group_id,
            indexes,
            message,
            max_delivery,
        } = hand_back;
        let mut changed = false;
        for &index in indexes {
            let held = self
                .groups
                .get(group_id)
                .is_some_and(|g| g.in_flight.contains_key(&index));
            if held {
                if let Some(item) = self.items.get_mut(&index) {
                    let item = Arc::make_mut(item);
                    self.meta_bytes_held -= item.meta_bytes();
                    item.set_message(&message);
                    self.meta_bytes_held += item.meta_bytes();
                }
                self.requeue(group_id, index, max_delivery);
                changed = true;
            }
        }
        if changed {
            events.push(Event::Changed {
                queue: qref.clone(),
            });
            self.dispatch_all(qref, now_ms, events);
        }
    }

    /// Take `index` back from its consumer in `group_id` and make it ready
    /// again, or dead-letter it once it was delivered `max_delivery` times.
    fn requeue(&mut self, group_id: &str, index: u64, max_delivery: u32) {
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        let Some(item) = self.items.get(&index) else {
            group.in_flight.remove(&index);
            return;
        };
        group.release(item);
        if max_delivery > 0 && item.deliveries >= max_delivery {
            if let Some(item) = self.remove_item(index) {
                self.bytes_held += item.data.len() as u64;
                self.dead.insert(index, item);
            }
        } else {
            group.make_ready(item);
            self.redeliveries.0 += 1;
        }
    }

    pub fn attach(
        &mut self,
        qref: &QueueRef,
        spec: ConsumerSpec,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let start_index = spec.start_index.unwrap_or(self.next_index);
        if !self.groups.contains_key(&spec.group) {
            let mut group = Group {
                tags: spec.tags.clone(),
                ..Default::default()
            };
            group.rebuild_ready(&self.items);
            self.groups.insert(spec.group.clone(), group);
        }
        let group = self.groups.get_mut(&spec.group).expect("group exists");
        let fresh = Consumer {
            node: spec.node,
            connection: spec.connection,
            window: spec.window,
            auto_commit: spec.auto_commit,
            index_only: spec.index_only,
            tags: spec.tags,
            start_index,
            status: ConsumerStatus::Running,
            pending: 0,
            last_index: 0,
            last_active_ms: now_ms,
            pending_bytes: 0,
        };
        match group.consumers.get_mut(&spec.user) {
            Some(existing) => {
                // Takeover: the new connection replaces the old one and gets
                // the consumer's uncommitted items again.
                if existing.connection != fresh.connection {
                    events.push(Event::Close {
                        node: existing.node,
                        connection: existing.connection,
                    });
                }
                let (pending, pending_bytes) = (existing.pending, existing.pending_bytes);
                let last_index = existing.last_index;
                *existing = Consumer {
                    pending,
                    pending_bytes,
                    last_index,
                    ..fresh
                };
                let with_data = !existing.index_only;
                let (node, connection) = (existing.node, existing.connection);
                for (index, _) in group.in_flight.iter().filter(|(_, u)| **u == spec.user) {
                    if let Some(item) = self.items.get(index) {
                        events.push(Event::Deliver {
                            node,
                            connection,
                            queue: qref.clone(),
                            // Sent again, not delivered again: its count
                            // is not said (the first copy may be at work).
                            frame: item.frame(with_data),
                        });
                    }
                }
            }
            None => {
                group.consumers.insert(spec.user, fresh);
            }
        }
        group.sync_narrowed(&self.items);
        self.dispatch_group(qref, &spec.group, now_ms, events);
    }

    /// A consumer's connection ended: the consumer leaves at once when it
    /// holds nothing (or the service has no grace period), else it keeps
    /// its items for `grace_ms` (see [`Self::expire`]). A connection the
    /// consumer no longer uses (it reconnected) changes nothing.
    pub fn detach(
        &mut self,
        qref: &QueueRef,
        ended: ConsumerConnection<'_>,
        grace_ms: u64,
        max_delivery: u32,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let ConsumerConnection {
            group: group_id,
            user,
            connection,
        } = ended;
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        let Some(c) = group.consumers.get_mut(user) else {
            return;
        };
        if c.connection != connection {
            return; // an old connection of a consumer that was taken over
        }
        if c.pending == 0 || grace_ms == 0 {
            self.remove_consumer(qref, group_id, user, max_delivery, now_ms, events);
        } else if c.status == ConsumerStatus::Running {
            c.status = ConsumerStatus::Leaving { since_ms: now_ms };
        }
    }

    /// Remove consumers whose grace period ended by `now_ms`.
    pub fn expire(
        &mut self,
        qref: &QueueRef,
        grace_ms: u64,
        max_delivery: u32,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let expired: Vec<(String, String)> = self
            .groups
            .iter()
            .flat_map(|(gid, g)| {
                g.consumers
                    .iter()
                    .filter_map(move |(uid, c)| match c.status {
                        ConsumerStatus::Leaving { since_ms }
                            if now_ms.saturating_sub(since_ms) >= grace_ms =>
                        {
                            Some((gid.clone(), uid.clone()))
                        }
                        _ => None,
                    })
            })
            .collect();
        for (gid, uid) in expired {
            self.remove_consumer(qref, &gid, &uid, max_delivery, now_ms, events);
        }
    }

    /// The earliest time at which `expire` would remove a consumer.
    pub fn next_expiry(&self, grace_ms: u64) -> Option<u64> {
        self.groups
            .values()
            .flat_map(|g| g.consumers.values())
            .filter_map(|c| match c.status {
                ConsumerStatus::Leaving { since_ms } => Some(since_ms.saturating_add(grace_ms)),
                ConsumerStatus::Running => None,
            })
            .min()
    }

    /// Remove every consumer attached through `node`.
    pub fn node_gone(
        &mut self,
        qref: &QueueRef,
        node: NodeId,
        max_delivery: u32,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let gone: Vec<(String, String, u64)> = self
            .groups
            .iter()
            .flat_map(|(gid, g)| {
                g.consumers
                    .iter()
                    .filter(|(_, c)| c.node == node)
                    .map(move |(uid, c)| (gid.clone(), uid.clone(), c.connection))
            })
            .collect();
        for (gid, uid, connection) in gone {
            events.push(Event::Close { node, connection });
            self.remove_consumer(qref, &gid, &uid, max_delivery, now_ms, events);
        }
    }

    fn remove_consumer(
        &mut self,
        qref: &QueueRef,
        group_id: &str,
        user: &str,
        max_delivery: u32,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let Some(group) = self.groups.get_mut(group_id) else {
            return;
        };
        if group.consumers.remove(user).is_none() {
            return;
        }
        group.sync_narrowed(&self.items);
        let held: Vec<u64> = group
            .in_flight
            .iter()
            .filter(|(_, u)| u.as_str() == user)
            .map(|(i, _)| *i)
            .collect();
        for index in held {
            self.requeue(group_id, index, max_delivery);
        }
        let group = self.groups.get(group_id).expect("group exists");
        if !group.is_active() {
            // Items this group was the last to wait for are consumed now.
            let candidates: BTreeSet<u64> = self
                .groups
                .values()
                .flat_map(|g| g.acked.iter().copied())
                .collect();
            for index in candidates {
                self.release_if_consumed(index);
            }
            if self
                .groups
                .get(group_id)
                .is_some_and(|g| g.acked.is_empty())
            {
                self.groups.remove(group_id);
            }
            events.push(Event::Changed {
                queue: qref.clone(),
            });
        } else {
            self.dispatch_group(qref, group_id, now_ms, events);
        }
    }

    // ---- dispatch ----------------------------------------------------------

    fn dispatch_all(&mut self, qref: &QueueRef, now_ms: u64, events: &mut Vec<Event>) {
        let ids: Vec<String> = self.groups.keys().cloned().collect();
        for gid in ids {
            self.dispatch_group(qref, &gid, now_ms, events);
        }
    }

    /// Hand ready items to consumers with free slots: the least loaded
    /// consumer first (ties by user id), each getting its first eligible item
    /// in priority-then-index order.
    fn dispatch_group(
        &mut self,
        qref: &QueueRef,
        group_id: &str,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let mut target = Outbox {
            queue: qref,
            events,
        };
        let mut exhausted: BTreeSet<String> = BTreeSet::new();
        loop {
            let Some(group) = self.groups.get(group_id) else {
                return;
            };
            if group.ready.is_empty() {
                return;
            }
            let candidate = group
                .consumers
                .iter()
                .filter(|(uid, c)| c.has_free_slot() && !exhausted.contains(*uid))
                .min_by_key(|(uid, c)| (c.pending, (*uid).clone()))
                .map(|(uid, _)| uid.clone());
            let Some(user) = candidate else { return };
            let consumer = &group.consumers[&user];
            let pick = first_ready_from(
                group.ready_for(consumer),
                consumer.start_index,
                &mut self.dispatch_lookups,
            )
            .map(|(_, index)| index);
            match pick {
                Some(index) => self.assign(&mut target, group_id, &user, index, now_ms),
                None => {
                    exhausted.insert(user);
                }
            }
        }
    }

    fn assign(
        &mut self,
        target: &mut Outbox<'_>,
        group_id: &str,
        user: &str,
        index: u64,
        now_ms: u64,
    ) {
        let item = Arc::make_mut(self.items.get_mut(&index).expect("ready items exist"));
        item.deliveries += 1;
        let key = item.order_key();
        let group = self.groups.get_mut(group_id).expect("group exists");
        group.unready(&key);
        let consumer = group.consumers.get_mut(user).expect("consumer exists");
        consumer.last_index = index;
        consumer.last_active_ms = now_ms;
        target.events.push(Event::Deliver {
            node: consumer.node,
            connection: consumer.connection,
            queue: target.queue.clone(),
            frame: item.delivery(!consumer.index_only),
        });
        // Auto-commit items too stay in flight: the consumer's node commits
        // them once their frames are written (see the module docs).
        consumer.pending += 1;
        consumer.pending_bytes += item.held_bytes();
        group.in_flight.insert(index, user.to_string());
    }

    // ---- reads -------------------------------------------------------------

    /// `_search_`: whether the item is being processed, and how many ready
    /// items are ahead of it.
    pub fn search(&self, index: u64) -> Option<(bool, u64)> {
        let item = self.items.get(&index)?;
        if self
            .groups
            .values()
            .any(|g| g.in_flight.contains_key(&index))
        {
            return Some((true, 0));
        }
        let key = item.order_key();
        let ahead = self
            .items
            .values()
            .filter(|it| {
                it.order_key() < key
                    && !self
                        .groups
                        .values()
                        .any(|g| g.in_flight.contains_key(&it.index))
            })
            .count() as u64;
        Some((false, ahead))
    }

    /// `_count_`: items with the given tags (and priority, when given).
    pub fn count(&self, priority: Option<u32>, tags: &Tags) -> u64 {
        self.items
            .values()
            .filter(|it| priority.is_none_or(|p| it.priority == p) && it.matches(tags))
            .count() as u64
    }

    /// Drop the oldest dead letters beyond `max`.
    pub fn trim_dead_letters(&mut self, max: u64) {
        while self.dead.len() as u64 > max {
            if let Some((_, item)) = self.dead.pop_first() {
                self.bytes_held -= item.data.len() as u64;
                self.dead_dropped_total += 1;
            }
        }
    }

    /// Drop every dead letter; returns how many there were.
    pub fn purge_dead_letters(&mut self) -> usize {
        let purged = std::mem::take(&mut self.dead);
        for item in purged.values() {
            self.bytes_held -= item.data.len() as u64;
        }
        self.dead_dropped_total += purged.len() as u64;
        purged.len()
    }

    /// Put dead letters back on the queue, each as a new item: the same
    /// request id, tags, payload, priority and path, a new index, no
    /// deliveries yet. `indexes` names dead letters by the index they had
    /// (empty: every one, oldest first). A dead letter whose request id a
    /// live item holds again (the client put it anew) is not requeued when
    /// `unique_request_ids` (the input queue: a request id is its
    /// idempotency key): skipped when requeueing all, refused when named,
    /// as is naming one that is not there (nothing changes then). Each goes
    /// through [`Queue::put`] within the queue's limits but never evicts
    /// anything: at the first refusal that dead letter and the ones after
    /// it stay, and the refusal is returned unless some were requeued
    /// before it. Returns the new items (without payloads).
    pub fn requeue_dead_letters(
        &mut self,
        qref: &QueueRef,
        limits: &QueueLimits,
        indexes: &[u64],
        unique_request_ids: bool,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Vec<Frame>, Rejection> {
        let chosen: Vec<u64> = if indexes.is_empty() {
            self.dead.keys().copied().collect()
        } else {
            // Named dead letters are checked before anything changes: each
            // must be there, and (with unique request ids) not put anew.
            for index in indexes {
                let Some(dead) = self.dead.get(index) else {
                    return Err(Rejection::Invalid(format!(
                        "{qref} has no dead letter at index {index}"
                    )));
                };
                if unique_request_ids
                    && let Some(live) = self.index_of_request(&dead.request_id.text())
                {
                    return Err(Rejection::Invalid(format!(
                        "the request of dead letter {index} was put again (item {live}); \
                         requeueing it would run it twice"
                    )));
                }
            }
            let mut chosen = indexes.to_vec();
            chosen.sort_unstable();
            chosen.dedup();
            chosen
        };
        let limits = QueueLimits {
            evict_oldest: false,
            ..limits.clone()
        };
        let mut requeued = Vec::with_capacity(chosen.len());
        for old in chosen {
            let live = self
                .dead
                .get(&old)
                .is_some_and(|d| self.index_of_request(&d.request_id.text()).is_some());
            if unique_request_ids && live {
                continue;
            }
            let Some(dead) = self.dead.remove(&old) else {
                continue;
            };
            self.bytes_held -= dead.data.len() as u64;
            let again = NewItem {
                request_id: dead.request_id.to_string(),
                tags: dead.put_tags(),
                data: dead.data.clone(),
                priority: dead.priority,
                path: dead.path().to_string(),
            };
            match self.put(qref, &limits, again, now_ms, events) {
                Ok(index) => requeued.push(self.items[&index].frame(false)),
                Err(refused) => {
                    self.bytes_held += dead.data.len() as u64;
                    self.dead.insert(old, dead);
                    if requeued.is_empty() {
                        return Err(refused);
                    }
                    break;
                }
            }
        }
        Ok(requeued)
    }

    /// What the busiest group has not finished: items still to be given
    /// plus items in flight to its consumers (every item when no group
    /// consumes the queue). The figure to size a pool of workers by: it
    /// stays up while workers are busy, unlike the backlog.
    pub fn outstanding(&self) -> usize {
        self.groups
            .values()
            .filter(|g| g.is_active())
            .map(|g| g.ready.len() + g.in_flight.len())
            .max()
            .unwrap_or(self.items.len())
    }

    /// The windows of every group's running consumers, summed.
    pub fn running_window(&self) -> u64 {
        self.groups.values().map(Group::running_window).sum()
    }

    /// How long the oldest item has been on the queue at `now_ms`.
    pub fn oldest_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.items
            .values()
            .next()
            .map(|it| now_ms.saturating_sub(it.enqueued_ms))
    }

    /// Items `group` could be given now: its backlog.
    pub fn group_backlog(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |g| g.ready.len())
    }

    /// The queue's backlog: what its busiest group still has to be given
    /// (every item when no group consumes it).
    pub fn backlog(&self) -> usize {
        self.groups
            .values()
            .filter(|g| g.is_active())
            .map(|g| g.ready.len())
            .max()
            .unwrap_or(self.items.len())
    }

    pub fn dead_letters(&self, limit: usize) -> Vec<Frame> {
        self.dead
            .values()
            .take(limit)
            .map(|it| it.frame(true))
            .collect()
    }
}
