//! The queue state machine: pure, deterministic, and the single source of
//! truth for items, consumers and who holds what in flight.
//!
//! `QueueState::apply(envelope)` is the only way state changes. It does no
//! I/O, reads no clock (time arrives inside the envelope) and draws no random
//! numbers, so every replica that applies the same log reaches the same
//! state and emits the same events. Dispatch decisions (which consumer gets
//! which item) are made here, as part of applying the command that made them
//! possible; the node holding a consumer's connection merely pushes the
//! `Deliver` events addressed to it.

mod command;
mod one_queue;
mod request_id;
mod state;

#[cfg(test)]
mod tests;

pub use command::*;
pub use one_queue::{
    AUTO_COMMIT_WINDOW, AUTO_COMMIT_WINDOW_BYTES, Consumer, ConsumerStatus, Group, Item,
    MAX_REQUEST_ID_BYTES, Queue, tags_match, validate_request_id,
};
pub use request_id::{RequestId, RequestIdText};
pub use state::{
    DEDUP_ENTRY_BYTES, DEDUP_MAX_ENTRIES, DEDUP_MAX_REPLY_BYTES, DEDUP_MIN_WINDOW_MS,
    DEDUP_WINDOW_MS, QueueState, Service, validate_service_name,
};
