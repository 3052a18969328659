//! Results written in batches: the completes (result and input commit)
//! that wait at the same moment go to the node in one request
//! (`_complete_=batch`), each with its own answer.
//!
//! There is no writer task. The item that finds fewer than
//! [`BATCHES_IN_FLIGHT`] batches on their way sends the waiting items (itself
//! first) as a batch. When that batch is answered and items wait, it hands
//! its place to the oldest of them, which sends the next batch (itself
//! first); otherwise it gives the place up. So a lone result goes out at
//! once, under load a batch carries whatever arrived during the last one's
//! round trip, and no item's work is held up sending others' results.
//!
//! Invariants:
//! - Whether items wait and how many places are taken are read and changed
//!   under one lock, and a place is given up only when nothing waits under
//!   that lock: no item is left waiting with no sender.
//! - A place handed to an item travels with the message that hands it
//!   over ([`Place`]): if that item's work is gone, the place is handed on
//!   or given up when the message is dropped, never lost.
//! - Every waiting item gets an answer: the node's answer for it, "failed"
//!   (the batch got no answer; the caller tries again, and the complete is
//!   idempotent: a result written by the lost batch makes the next try a
//!   duplicate), or "alone" (write it with a single `_complete_`).
//! - Only small results travel in batches ([`BATCH_ITEM_MAX_BYTES`]); a
//!   larger one is written alone. A batch of several items that the node
//!   refuses as too large (413) is written item by item and halves the
//!   batches' bound on encoded bytes (a result above the bound is then
//!   written alone). A node that does not know batches (it refuses
//!   `_complete_=batch` as a bad `_complete_` index: 400) turns batches off
//!   for the engine's life.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::Engine;
use crate::client::ClientError;
use crate::proto::CompleteProto;
use crate::protocol::{MAX_COMPLETE_BATCH, REQUEST_ID_TAG};

/// Results larger than this are written alone.
pub(super) const BATCH_ITEM_MAX_BYTES: usize = 64 * 1024;
/// A batch takes no more items once its results reach this size (halved
/// by each batch the node refuses as too large).
const BATCH_MAX_BYTES: usize = 256 * 1024;
/// Batches on their way to the node at once: one being answered while the
/// next fills.
pub(super) const BATCHES_IN_FLIGHT: usize = 2;

/// The items waiting for a batch, and the places of the batches on their
/// way.
pub(super) struct ResultBatches {
    waiting: Mutex<Waiting>,
    /// The node refused a batch as an unknown request: write alone.
    off: AtomicBool,
    /// The byte bound of a batch.
    max_bytes: AtomicUsize,
}

impl ResultBatches {
    #[cfg(test)]
    pub(super) fn max_bytes(&self) -> usize {
        self.max_bytes.load(Ordering::Relaxed)
    }
}

impl Default for ResultBatches {
    fn default() -> Self {
        Self {
            waiting: Mutex::default(),
            off: AtomicBool::new(false),
            max_bytes: AtomicUsize::new(BATCH_MAX_BYTES),
        }
    }
}

#[derive(Default)]
struct Waiting {
    items: VecDeque<Pending>,
    /// Places taken: batches on their way, or handed to an item that is
    /// about to send one.
    in_flight: usize,
}

struct Pending {
    item: CompleteProto,
    answer: oneshot::Sender<Turn>,
}

impl Waiting {
    /// The next batch: waiting items from the oldest, within the batch's
    /// bounds (at least one); an item counts by its encoded size, tags and
    /// all.
    fn take_batch(&mut self, max_bytes: usize) -> Vec<Pending> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < MAX_COMPLETE_BATCH && bytes < max_bytes {
            let Some(p) = self.items.pop_front() else {
                break;
            };
            bytes += prost::Message::encoded_len(&p.item);
            batch.push(p);
        }
        batch
    }
}

/// What became of a result given to a batch.
#[derive(Debug)]
pub(super) enum Written {
    /// The node's answer for this item, as a single `_complete_` would
    /// have given it: whether a result was already there, or a refusal.
    Answer(Result<bool, ClientError>),
    /// The batch got no answer (no node reached, a node failing): nothing
    /// is known of this item; try again.
    Failed(String),
    /// Not sent in a batch: write it with a single `_complete_`.
    Alone,
}

/// What a waiting item is told: what became of it, or that it is its turn
/// to send a batch (itself first), with the place.
#[derive(Debug)]
enum Turn {
    Done(Written),
    Send(CompleteProto, Place),
}

/// A place among the batches in flight. Handed on when its batch is
/// answered; dropped without that (the work holding it, or the message
/// carrying it, was dropped), it is handed on all the same.
pub(super) struct Place {
    /// None once handed on.
    batches: Option<Arc<ResultBatches>>,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Place")
    }
}

impl Place {
    fn new(batches: &Arc<ResultBatches>) -> Self {
        Self {
            batches: Some(batches.clone()),
        }
    }

    /// Hand the place to the oldest item that still waits, or give it up
    /// when none does.
    fn hand_on(mut self) {
        if let Some(batches) = self.batches.take() {
            hand_on(&batches);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(batches) = self.batches.take() {
            hand_on(&batches);
        }
    }
}

fn hand_on(batches: &Arc<ResultBatches>) {
    loop {
        // The next item is taken under the lock and the place sent to it
        // outside: a place dropped with an undelivered message takes the
        // lock itself. The place stays counted meanwhile, so an item that
        // arrives in between waits, and the lock decides below whether
        // anyone does.
        let next = {
            let mut waiting = lock(&batches.waiting);
            match waiting.items.pop_front() {
                Some(next) => next,
                None => {
                    waiting.in_flight -= 1;
                    return;
                }
            }
        };
        match next.answer.send(Turn::Send(next.item, Place::new(batches))) {
            Ok(()) => return,
            // That item's work is gone; the place comes back in the
            // message, emptied here so that its drop does not hand it on.
            Err(Turn::Send(_, mut place)) => place.batches = None,
            Err(_) => {}
        }
    }
}

/// The lock, also after a panic elsewhere held it: its state (a queue and
/// a count changed in single steps) is whole at every point, and a place's
/// drop that panicked on a poisoned lock would abort the process.
fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Engine {
    /// Write a result and commit its input in a batch with the others
    /// waiting now (see the module's doc).
    pub(super) async fn complete_in_batch(
        &self,
        index: u64,
        request_id: &str,
        tags: &std::collections::BTreeMap<String, String>,
        body: &Bytes,
    ) -> Written {
        let batches = &self.batches;
        let max_bytes = batches.max_bytes.load(Ordering::Relaxed);
        if body.len() > BATCH_ITEM_MAX_BYTES.min(max_bytes) || batches.off.load(Ordering::Relaxed) {
            return Written::Alone;
        }
        let mut item_tags: std::collections::HashMap<String, String> =
            tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        item_tags.insert(REQUEST_ID_TAG.to_string(), request_id.to_string());
        let mut item = CompleteProto {
            input_index: index,
            tags: item_tags,
            result: body.clone(),
        };
        let mut handed: Option<Place> = None;
        loop {
            let (answer, answered) = oneshot::channel();
            let max_bytes = batches.max_bytes.load(Ordering::Relaxed);
            let batch = {
                let mut waiting = lock(&batches.waiting);
                let place = handed.take().or_else(|| {
                    (waiting.in_flight < BATCHES_IN_FLIGHT).then(|| {
                        waiting.in_flight += 1;
                        Place::new(batches)
                    })
                });
                let pending = Pending { item, answer };
                match place {
                    // A sender goes first in its own batch.
                    Some(place) => {
                        waiting.items.push_front(pending);
                        Some((waiting.take_batch(max_bytes), place))
                    }
                    None => {
                        waiting.items.push_back(pending);
                        None
                    }
                }
            };
            if let Some((batch, place)) = batch {
                self.send_batch(batch).await;
                place.hand_on();
            }
            match answered.await {
                Ok(Turn::Send(returned, place)) => {
                    item = returned;
                    handed = Some(place);
                }
                Ok(Turn::Done(written)) => return written,
                Err(_) => return Written::Failed("the batch's sender stopped".into()),
            }
        }
    }

    /// Send one batch and answer each of its items.
    async fn send_batch(&self, batch: Vec<Pending>) {
        let (items, answers): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.item, p.answer)).unzip();
        self.stats.result_batches.fetch_add(1, Ordering::Relaxed);
        match self.sink().complete_batch(items).await {
            Ok(outcomes) => {
                // A node failing an item (no leader, unavailable) is left
                // once for the whole batch.
                if outcomes
                    .iter()
                    .any(|o| matches!(o, Err(ClientError::Status { status, .. }) if *status >= 500))
                {
                    self.next_endpoint();
                }
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(Turn::Done(Written::Answer(outcome)));
                }
            }
            Err(ClientError::Status { status: 400, body })
                if body.contains(crate::protocol::param::COMPLETE) =>
            {
                // A node that predates batches reads `_complete_=batch` as
                // a bad index ("_complete_: expected a non-negative
                // integer"). Any other 400 is what each item would get
                // alone (below).
                if !self.batches.off.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        status = 400,
                        reason = %body.trim(),
                        "the node refused a batch of results; writing each result alone from now on"
                    );
                }
                for answer in answers {
                    let _ = answer.send(Turn::Done(Written::Alone));
                }
            }
            Err(ClientError::Status { status: 413, .. }) => {
                // A result too large for the sink alone is refused alone
                // too; only a batch of several says batches are too large.
                if answers.len() > 1 {
                    let bound = &self.batches.max_bytes;
                    let _ = bound.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                        Some((b / 2).max(1))
                    });
                }
                for answer in answers {
                    let _ = answer.send(Turn::Done(Written::Alone));
                }
            }
            Err(ClientError::Status { status, body }) if status < 500 && status != 408 => {
                // Refused for every item alike, as each would have been
                // alone (a token, a service that is gone, a rate limit).
                for answer in answers {
                    let _ = answer.send(Turn::Done(Written::Answer(Err(ClientError::Status {
                        status,
                        body: body.clone(),
                    }))));
                }
            }
            Err(e) => {
                // No answer for any item (408: the body did not reach the
                // node in time): the items are tried again, not refused.
                tracing::warn!(error = %e, "a batch of results got no answer; trying the next node");
                self.next_endpoint();
                let reason = e.to_string();
                for answer in answers {
                    let _ = answer.send(Turn::Done(Written::Failed(reason.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(size: usize) -> (Pending, oneshot::Receiver<Turn>) {
        let (answer, rx) = oneshot::channel();
        let item = CompleteProto {
            input_index: 1,
            tags: Default::default(),
            result: Bytes::from(vec![0u8; size]),
        };
        (Pending { item, answer }, rx)
    }

    #[test]
    fn a_batch_is_bounded_by_items_and_bytes_and_takes_at_least_one() {
        let mut w = Waiting::default();
        let mut receivers = Vec::new();
        for _ in 0..MAX_COMPLETE_BATCH + 10 {
            let (p, rx) = pending(10);
            w.items.push_back(p);
            receivers.push(rx);
        }
        assert_eq!(w.take_batch(BATCH_MAX_BYTES).len(), MAX_COMPLETE_BATCH);
        assert_eq!(w.take_batch(BATCH_MAX_BYTES).len(), 10);
        assert!(w.take_batch(BATCH_MAX_BYTES).is_empty());
        for _ in 0..10 {
            let (p, rx) = pending(BATCH_ITEM_MAX_BYTES);
            w.items.push_back(p);
            receivers.push(rx);
        }
        let by_bytes = w.take_batch(BATCH_MAX_BYTES);
        assert_eq!(by_bytes.len(), BATCH_MAX_BYTES / BATCH_ITEM_MAX_BYTES);
        let (big, rx) = pending(10 * BATCH_MAX_BYTES);
        w.items.push_front(big);
        receivers.push(rx);
        assert_eq!(
            w.take_batch(BATCH_MAX_BYTES).len(),
            1,
            "one item, however large, is a batch"
        );
    }

    /// A place is never lost: dropped without being handed on (the work
    /// holding it was dropped half way), it goes to the oldest item whose
    /// work still waits, skipping one whose work is gone; a place handed
    /// to an item that drops it unused goes on the same way, and with no
    /// item waiting it is given up.
    #[test]
    fn a_dropped_place_is_handed_on_or_given_up() {
        let batches = Arc::new(ResultBatches::default());
        let (gone, gone_rx) = pending(1);
        let (waits, mut waits_rx) = pending(2);
        drop(gone_rx);
        {
            let mut w = batches.waiting.lock().unwrap();
            w.in_flight = 1;
            w.items.push_back(gone);
            w.items.push_back(waits);
        }
        drop(Place::new(&batches));
        let handed = match waits_rx.try_recv() {
            Ok(Turn::Send(item, place)) => {
                assert_eq!(item.result.len(), 2);
                place
            }
            other => panic!("the waiting item did not get the place: {other:?}"),
        };
        {
            let w = batches.waiting.lock().unwrap();
            assert_eq!((w.in_flight, w.items.len()), (1, 0));
        }
        drop(handed);
        assert_eq!(batches.waiting.lock().unwrap().in_flight, 0);
    }
}
