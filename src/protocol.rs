//! The EAS queue-service vocabulary, each name written once: the headers,
//! tag keys and defaults that the server (`api`), the client, the engine,
//! the command line and the state machine share (the protocol is specified
//! in `eas-queue-protocol.md`). Constants only: no I/O, no parsing.

/// The header a put's answer carries the request id in.
pub const REQUEST_ID_HEADER: &str = "X-Eas-Queueservice-Request-Id";

/// Eddy's own answer header on a put or a `_complete_`: `true` when the
/// request id was already held (an idempotent retry), so nothing was added.
pub const DUPLICATE_HEADER: &str = "x-eddy-duplicate";

/// The consumer (user) id of a watcher or a committer.
pub const HEADER_USER: &str = "X-EAS-QueueService-Redis-Uid";
/// The consumer group of a watcher or a committer.
pub const HEADER_GROUP: &str = "X-EAS-QueueService-Redis-Gid";
/// A put's priority.
pub const HEADER_PRIORITY: &str = "X-EAS-QueueService-Priority";

/// Tag key under which every item carries its request id.
pub const REQUEST_ID_TAG: &str = "requestId";

/// Tag key carrying the sub-path an item was put on, when there is one.
/// Clients cannot set it: `_x_` query keys are control parameters.
pub const PATH_TAG: &str = "_path_";

/// The consumer group of a client that names none.
pub const DEFAULT_GROUP: &str = "eas";
