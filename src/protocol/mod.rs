//! The EAS queue-service protocol as both sides speak it (specified in
//! `eas-queue-protocol.md`): its vocabulary, each name written once (the
//! headers, control parameters, tag keys and defaults that the server,
//! the client, the engine, the command line and the state machine share);
//! the query string ([`Query`]); and the operations on a queue URL
//! ([`QueueOp`]), parsed by the server and encoded by the client from the
//! same type. Pure: no I/O, and no HTTP framework (`api` owns axum, the
//! client owns reqwest).

mod attributes;
mod op;
mod query;

pub use attributes::{ATTR_LAST_ENTRY, ATTR_LENGTH, attributes};
pub use op::{
    COMPLETE_BATCH, GetOp, MAX_COMPLETE_BATCH, MAX_READ_LENGTH, QueueOp, ReadOp, WatchOp,
};
pub use query::{
    MAX_CONTROL_VALUE_BYTES, MAX_POLL, MAX_TAG_KEY_BYTES, MAX_TAG_VALUE_BYTES, MAX_TAGS, Query,
    QueryError, check_tags, parse_duration, parse_index_list, parse_priority,
};

/// The control parameters of a queue URL's query string.
pub mod param {
    /// Start index of a read or a watch (`-1`: the newest).
    pub const INDEX: &str = "_index_";
    /// Comma-separated indexes of a commit, a hand-back or a delete.
    pub const INDEXES: &str = "_indexes_";
    /// Items a read returns at most.
    pub const LENGTH: &str = "_length_";
    /// How long a read waits for an item (long poll).
    pub const TIMEOUT: &str = "_timeout_";
    /// A read answers the payload itself (`true`) or a list of frames.
    pub const RAW: &str = "_raw_";
    /// A read takes the items it returns (they are deleted).
    pub const AUTO_DELETE: &str = "_auto_delete_";
    /// A read served from this node's state without a read index.
    pub const LOCAL: &str = "_local_";
    /// A put's priority (also the priority header).
    pub const PRIORITY: &str = "_priority_";
    /// Open a watch (also a WebSocket upgrade).
    pub const WATCH: &str = "_watch_";
    /// Items a watcher may hold uncommitted.
    pub const WINDOW: &str = "_window_";
    /// Items are committed as they are sent.
    pub const AUTO_COMMIT: &str = "_auto_commit_";
    /// Frames carry indexes and tags without payloads.
    pub const INDEX_ONLY: &str = "_index_only_";
    /// The queue's attributes.
    pub const ATTRIBUTES: &str = "_attrs_";
    /// Where an index stands: pending, or how many wait before it.
    pub const SEARCH: &str = "_search_";
    /// How many items (of a priority, matching the tags) wait.
    pub const COUNT: &str = "_count_";
    /// The dead letters.
    pub const DEAD: &str = "_dead_";
    /// Hand the items back instead of committing them.
    pub const NEGATIVE: &str = "_negative_";
    /// Why items are handed back: a short code and a reason (query or
    /// form body).
    pub const CODE: &str = "_code_";
    pub const REASON: &str = "_reason_";
    /// Delete every item before `_index_`.
    pub const TRUNCATE: &str = "_trunc_";
    /// Write a result to the sink and commit the input item of this index.
    pub const COMPLETE: &str = "_complete_";
    /// End of stream: no more items will be put.
    pub const END_OF_STREAM: &str = "_eos_";
    /// With `_eos_`: end now, dropping what waits.
    pub const FORCE: &str = "_force_";
}

/// The header a put's answer carries the request id in.
pub const REQUEST_ID_HEADER: &str = "X-Eas-Queueservice-Request-Id";

/// Eddy's own answer header on a `_complete_`: `true` when a result for the
/// request id was already held (an idempotent retry), so nothing was added.
pub const DUPLICATE_HEADER: &str = "x-eddy-duplicate";

/// The consumer (user) id of a watcher or a committer.
pub const HEADER_USER: &str = "X-EAS-QueueService-Redis-Uid";
/// The consumer group of a watcher or a committer.
pub const HEADER_GROUP: &str = "X-EAS-QueueService-Redis-Gid";
/// A put's priority.
pub const HEADER_PRIORITY: &str = "X-EAS-QueueService-Priority";

/// Tag key of a result the engine wrote for a model answer other than 200:
/// the model's HTTP status.
pub const LAST_CODE_TAG: &str = "lastCode";

/// Longest hand-back code and reason (`_code_`, `_reason_`), in bytes.
pub const MAX_CODE_BYTES: usize = 64;
pub const MAX_REASON_BYTES: usize = 1024;

/// Tag key under which every item carries its request id.
pub const REQUEST_ID_TAG: &str = "requestId";

/// W3C trace context: the header a put may carry, and the tag under which
/// the item (and its result) keeps it, so one request can be followed from
/// put to result.
pub const TRACEPARENT_HEADER: &str = "traceparent";
pub const TRACEPARENT_TAG: &str = "traceparent";

/// Whether `value` is a W3C `traceparent` this node passes on: version 00
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lower case,
/// ids not all zero). Anything else is ignored, as the recommendation asks
/// of a receiver, never refused.
pub fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let not_zero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, parent, flags]
        if *version == "00" && hex(trace, 32) && not_zero(trace)
            && hex(parent, 16) && not_zero(parent) && hex(flags, 2))
}

/// A new random parent id for a call made on a trace's behalf.
pub fn new_span_id() -> u64 {
    // The version and variant bits of a v4 UUID sit at different places in
    // its two halves: their exclusive or is 64 random bits.
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    high ^ low
}

/// The `traceparent` of a call made on behalf of `parent`: the same trace
/// and flags, a new parent id (`span_id`).
pub fn child_traceparent(parent: &str, span_id: u64) -> Option<String> {
    if !valid_traceparent(parent) {
        return None;
    }
    let mut parts = parent.split('-');
    let (_, trace, _, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // An all-zero parent id is invalid.
    let span = format!("{:016x}", span_id.max(1));
    Some(format!("00-{trace}-{span}-{flags}"))
}

/// Tag key carrying the sub-path an item was put on, when there is one.
/// Clients cannot set it: `_x_` query keys are control parameters.
pub const PATH_TAG: &str = "_path_";

/// The consumer group of a client that names none.
pub const DEFAULT_GROUP: &str = "eas";

/// The protocol bounds some texts in bytes (a hand-back's code and
/// reason, a WebSocket close reason); both sides cut them with this.
/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod trace_context_tests {
    use super::*;

    #[test]
    fn a_traceparent_is_passed_on_only_when_well_formed() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
        let child = child_traceparent(good, 0x0102030405060708).unwrap();
        assert_eq!(
            child,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        assert!(valid_traceparent(&child));
        assert!(valid_traceparent(&child_traceparent(good, 0).unwrap()));
        assert_eq!(child_traceparent("junk", 1), None);
    }
}
