//! Results written in batches: the completes (result and input commit)
//! that wait at the same moment go to the node in one request
//! (`_complete_=batch`), each with its own answer.
//!
//! There is no writer task. The item that finds fewer than
//! [`BATCHES_IN_FLIGHT`] batches on their way sends the waiting items as a
//! batch itself, and keeps sending what waits when its batch is answered,
//! until nothing waits; items that arrive while every batch place is taken
//! wait for the next batch. So a lone result goes out at once, and under
//! load a batch carries whatever arrived during the last one's round trip.
//!
//! Invariants:
//! - Whether items wait and how many batches are on their way are read and
//!   changed under one lock, and a sender stops only when it finds nothing
//!   waiting under that lock: no item is left waiting with no sender.
//! - Every waiting item gets an answer: the node's answer for it, "failed"
//!   (the batch got no answer; the caller tries again, and the complete is
//!   idempotent: a result written by the lost batch makes the next try a
//!   duplicate), or "alone" (write it with a single `_complete_`). A sender
//!   whose work is dropped half way answers "failed" to what it was sending
//!   and to what waits when no other sender is left.
//! - A sender's own item keeps its place in the engine's window until the
//!   sender stops sending (at most [`BATCHES_IN_FLIGHT`] items at once).
//! - Only small results travel in batches ([`BATCH_ITEM_MAX_BYTES`]); a
//!   larger one is written alone, so a batch stays small next to the sink's
//!   payload limit. A batch the node refuses as too large is written item
//!   by item, and a node that does not know batches (it takes
//!   `_complete_=batch` for a bad index: 400) turns batches off for the
//!   engine's life.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::Engine;
use crate::client::ClientError;
use crate::proto::CompleteProto;
use crate::protocol::{MAX_COMPLETE_BATCH, REQUEST_ID_TAG};

/// Results larger than this are written alone.
pub(super) const BATCH_ITEM_MAX_BYTES: usize = 64 * 1024;
/// A batch takes no more items once its results reach this size.
const BATCH_MAX_BYTES: usize = 256 * 1024;
/// Batches on their way to the node at once: one being answered while the
/// next fills.
pub(super) const BATCHES_IN_FLIGHT: usize = 2;

/// The items waiting for a batch, and the batches on their way.
#[derive(Default)]
pub(super) struct ResultBatches {
    waiting: Mutex<Waiting>,
    /// The node refused a batch as an unknown request: write alone.
    off: AtomicBool,
}

#[derive(Default)]
struct Waiting {
    items: VecDeque<Pending>,
    in_flight: usize,
}

struct Pending {
    item: CompleteProto,
    answer: oneshot::Sender<Written>,
}

impl Waiting {
    /// The next batch: waiting items from the oldest, within the batch's
    /// bounds (at least one).
    fn take_batch(&mut self) -> Vec<Pending> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < MAX_COMPLETE_BATCH && bytes < BATCH_MAX_BYTES {
            let Some(p) = self.items.pop_front() else {
                break;
            };
            bytes += p.item.result.len();
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

/// A sender's place among the batches in flight; given up under the lock
/// when nothing waits, or, if its work is dropped half way, with "failed"
/// for what it was sending (the dropped answers) and for what waits when no
/// other sender is left.
struct Sending<'a> {
    batches: &'a ResultBatches,
    done: bool,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut waiting = self.batches.waiting.lock().unwrap();
        waiting.in_flight -= 1;
        if waiting.in_flight == 0 {
            for p in waiting.items.drain(..) {
                let _ = p
                    .answer
                    .send(Written::Failed("the batch's sender stopped".into()));
            }
        }
    }
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
        if body.len() > BATCH_ITEM_MAX_BYTES || batches.off.load(Ordering::Relaxed) {
            return Written::Alone;
        }
        let mut item_tags: std::collections::HashMap<String, String> =
            tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        item_tags.insert(REQUEST_ID_TAG.to_string(), request_id.to_string());
        let (answer, answered) = oneshot::channel();
        let first = {
            let mut waiting = batches.waiting.lock().unwrap();
            waiting.items.push_back(Pending {
                item: CompleteProto {
                    input_index: index,
                    tags: item_tags,
                    result: body.clone(),
                },
                answer,
            });
            (waiting.in_flight < BATCHES_IN_FLIGHT).then(|| {
                waiting.in_flight += 1;
                waiting.take_batch()
            })
        };
        if let Some(mut batch) = first {
            let mut place = Sending {
                batches,
                done: false,
            };
            loop {
                self.send_batch(batch).await;
                let mut waiting = batches.waiting.lock().unwrap();
                if waiting.items.is_empty() {
                    waiting.in_flight -= 1;
                    place.done = true;
                    break;
                }
                batch = waiting.take_batch();
            }
        }
        answered
            .await
            .unwrap_or_else(|_| Written::Failed("the batch's sender stopped".into()))
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
                    let _ = answer.send(Written::Answer(outcome));
                }
            }
            Err(ClientError::Status { status: 400, body }) => {
                // A node that predates batches reads `_complete_=batch` as
                // a bad index; a node that knows them refuses a batch as a
                // whole only for what would refuse each item alone too.
                if !self.batches.off.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        status = 400,
                        reason = %body.trim(),
                        "the node refused a batch of results; writing each result alone from now on"
                    );
                }
                for answer in answers {
                    let _ = answer.send(Written::Alone);
                }
            }
            Err(ClientError::Status { status: 413, .. }) => {
                for answer in answers {
                    let _ = answer.send(Written::Alone);
                }
            }
            Err(ClientError::Status { status, body }) if status < 500 => {
                // Refused for every item alike, as each would have been
                // alone (a token, a service that is gone).
                for answer in answers {
                    let _ = answer.send(Written::Answer(Err(ClientError::Status {
                        status,
                        body: body.clone(),
                    })));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "a batch of results got no answer; trying the next node");
                self.next_endpoint();
                let reason = e.to_string();
                for answer in answers {
                    let _ = answer.send(Written::Failed(reason.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(size: usize) -> (Pending, oneshot::Receiver<Written>) {
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
        assert_eq!(w.take_batch().len(), MAX_COMPLETE_BATCH);
        assert_eq!(w.take_batch().len(), 10);
        assert!(w.take_batch().is_empty());
        for _ in 0..10 {
            let (p, rx) = pending(BATCH_ITEM_MAX_BYTES);
            w.items.push_back(p);
            receivers.push(rx);
        }
        let by_bytes = w.take_batch();
        assert_eq!(by_bytes.len(), BATCH_MAX_BYTES / BATCH_ITEM_MAX_BYTES);
        let (big, rx) = pending(10 * BATCH_MAX_BYTES);
        w.items.push_front(big);
        receivers.push(rx);
        assert_eq!(
            w.take_batch().len(),
            1,
            "one item, however large, is a batch"
        );
    }
}
