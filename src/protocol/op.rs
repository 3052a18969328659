//! The operations on a queue URL, one type for both sides: the server
//! parses a request's method and control parameters into a [`QueueOp`]
//! ([`QueueOp::parse`]); the client encodes the op it wants into the same
//! method and parameters ([`QueueOp::method`], [`QueueOp::query`]). What
//! an op leaves to the request's headers (the consumer identity, the
//! priority header, `Accept`) and body (a put's payload, a hand-back's form)
//! stays with the caller.

use std::time::Duration;

use super::param;
use super::query::{Query, QueryError, parse_priority};

/// The `_complete_` value that asks for a batch of completes.
pub const COMPLETE_BATCH: &str = "batch";

/// Most completes in one batch.
pub const MAX_COMPLETE_BATCH: usize = 256;

/// Longest list a read or a dead-letter listing returns at once.
pub const MAX_READ_LENGTH: u64 = 10_000;

/// What a request to a queue URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueOp {
    /// `POST`: add the body as an item (tags from the query).
    Put {
        /// `_priority_`, when the query gives one.
        priority: Option<u32>,
    },
    /// `POST ?_complete_=INDEX`: write the body to the sink as the result
    /// of input item `INDEX` and commit that item (0: not given).
    Complete { input_index: u64 },
    /// `POST ?_complete_=batch`: several completes, a `CompleteBatchProto`
    /// body (Eddy's own; a node that predates it refuses the value).
    CompleteBatch,
    /// `POST ?_eos_=true`: end of stream.
    EndOfStream { force: bool },
    /// `GET ?_watch_=true`, or a WebSocket upgrade: stream items.
    Watch(WatchOp),
    /// Every other `GET`: a read, served after a read index through the
    /// leader when `linearizable`.
    Read { read: ReadOp, linearizable: bool },
    /// `PUT ?_indexes_=...`: commit.
    Commit { indexes: Vec<u64> },
    /// `PUT ?_indexes_=...&_negative_=true`: hand the items back; the code
    /// and reason may also come in a form body, which wins.
    Negative {
        indexes: Vec<u64>,
        code: Option<String>,
        reason: Option<String>,
    },
    /// `DELETE ?_indexes_=...`.
    Delete { indexes: Vec<u64> },
    /// `DELETE ?_index_=I&_trunc_=true`: delete every item before `I`.
    Truncate { before: u64 },
}

/// The reads of a `GET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOp {
    /// `_attrs_=true`.
    Attributes,
    /// `_search_=true&_index_=I`, `I` positive.
    Search { index: u64 },
    /// `_count_=true`, of one priority when given.
    Count { priority: Option<u32> },
    /// `_dead_=true`: at most `length` dead letters.
    DeadLetters { length: u64 },
    /// Items from an index.
    Get(GetOp),
}

/// A read of items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetOp {
    /// `None`: from the newest (`_index_=-1`).
    pub from_index: Option<u64>,
    /// At most this many (1 to [`MAX_READ_LENGTH`]).
    pub length: u64,
    /// How long to wait for an item (at most [`super::MAX_POLL`]).
    pub timeout: Duration,
    /// `_raw_` as given: `None` leaves it to the `Accept` header.
    pub raw: Option<bool>,
    /// Take the items (they are deleted).
    pub auto_delete: bool,
}

/// A watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOp {
    /// `None`: from the newest (`_index_=-1`).
    pub from_index: Option<u64>,
    /// Items held uncommitted at most (at least 1 unless auto-commit).
    pub window: u32,
    pub auto_commit: bool,
    pub index_only: bool,
}

impl QueueOp {
    /// The op a request asks for, from its method, its query and whether
    /// it is a WebSocket upgrade. Control parameters an op does not use
    /// are ignored, as the protocol says.
    pub fn parse(method: &str, q: &Query, upgrade: bool) -> Result<Self, QueryError> {
        match method {
            "POST" if q.flag(param::END_OF_STREAM)? => Ok(Self::EndOfStream {
                force: q.flag(param::FORCE)?,
            }),
            "POST" if q.get(param::COMPLETE) == Some(COMPLETE_BATCH) => Ok(Self::CompleteBatch),
            "POST" if q.get(param::COMPLETE).is_some() => Ok(Self::Complete {
                input_index: q.u64_or(param::COMPLETE, 0)?,
            }),
            "POST" => Ok(Self::Put {
                priority: q.get(param::PRIORITY).map(parse_priority).transpose()?,
            }),
            "GET" if q.flag(param::WATCH)? || upgrade => Ok(Self::Watch(WatchOp::parse(q)?)),
            "GET" => {
                let local = q.flag(param::LOCAL)?;
                let auto_delete = q.flag_or(param::AUTO_DELETE, false)?;
                Ok(Self::Read {
                    read: ReadOp::parse(q)?,
                    linearizable: !local && !auto_delete,
                })
            }
            "PUT" if q.flag(param::NEGATIVE)? => Ok(Self::Negative {
                indexes: q.indexes()?,
                code: q.get(param::CODE).map(String::from),
                reason: q.get(param::REASON).map(String::from),
            }),
            "PUT" => Ok(Self::Commit {
                indexes: q.indexes()?,
            }),
            "DELETE" if q.flag(param::TRUNCATE)? => match q.start_index()? {
                Some(before) => Ok(Self::Truncate { before }),
                None => Err(QueryError("_index_ must be an index for truncate".into())),
            },
            "DELETE" => Ok(Self::Delete {
                indexes: q.indexes()?,
            }),
            other => Err(QueryError(format!(
                "method {other} is not supported on a queue"
            ))),
        }
    }

    /// The HTTP method of this op.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Put { .. }
            | Self::Complete { .. }
            | Self::CompleteBatch
            | Self::EndOfStream { .. } => "POST",
            Self::Watch(_) | Self::Read { .. } => "GET",
            Self::Commit { .. } | Self::Negative { .. } => "PUT",
            Self::Delete { .. } | Self::Truncate { .. } => "DELETE",
        }
    }

    /// The control parameters that ask for this op (tags are the caller's
    /// to add). A watch is asked for with `_watch_=true` whether or not it
    /// then upgrades to a WebSocket.
    pub fn query(&self) -> Vec<(&'static str, String)> {
        let yes = || "true".to_string();
        let list = |indexes: &[u64]| {
            indexes
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let from = |index: Option<u64>| index.map_or("-1".to_string(), |i| i.to_string());
        let mut out = Vec::new();
        match self {
            Self::Put { priority } => {
                if let Some(p) = priority {
                    out.push((param::PRIORITY, p.to_string()));
                }
            }
            Self::Complete { input_index } => {
                out.push((param::COMPLETE, input_index.to_string()));
            }
            Self::CompleteBatch => out.push((param::COMPLETE, COMPLETE_BATCH.to_string())),
            Self::EndOfStream { force } => {
                out.push((param::END_OF_STREAM, yes()));
                if *force {
                    out.push((param::FORCE, yes()));
                }
            }
            Self::Watch(w) => {
                out.push((param::WATCH, yes()));
                out.push((param::INDEX, from(w.from_index)));
                out.push((param::WINDOW, w.window.to_string()));
                out.push((param::INDEX_ONLY, w.index_only.to_string()));
                out.push((param::AUTO_COMMIT, w.auto_commit.to_string()));
            }
            Self::Read { read, linearizable } => {
                match read {
                    ReadOp::Attributes => out.push((param::ATTRIBUTES, yes())),
                    ReadOp::Search { index } => {
                        out.push((param::SEARCH, yes()));
                        out.push((param::INDEX, index.to_string()));
                    }
                    ReadOp::Count { priority } => {
                        out.push((param::COUNT, yes()));
                        if let Some(p) = priority {
                            out.push((param::PRIORITY, p.to_string()));
                        }
                    }
                    ReadOp::DeadLetters { length } => {
                        out.push((param::DEAD, yes()));
                        out.push((param::LENGTH, length.to_string()));
                    }
                    ReadOp::Get(g) => {
                        out.push((param::INDEX, from(g.from_index)));
                        out.push((param::LENGTH, g.length.to_string()));
                        out.push((param::TIMEOUT, format!("{}us", g.timeout.as_micros())));
                        if let Some(raw) = g.raw {
                            out.push((param::RAW, raw.to_string()));
                        }
                        out.push((param::AUTO_DELETE, g.auto_delete.to_string()));
                    }
                }
                // A take is never linearized (it goes through the log);
                // any other read is unless asked to be local.
                let takes = matches!(read, ReadOp::Get(g) if g.auto_delete);
                if !linearizable && !takes {
                    out.push((param::LOCAL, yes()));
                }
            }
            Self::Commit { indexes } | Self::Delete { indexes } => {
                out.push((param::INDEXES, list(indexes)));
            }
            Self::Negative {
                indexes,
                code,
                reason,
            } => {
                out.push((param::INDEXES, list(indexes)));
                out.push((param::NEGATIVE, yes()));
                if let Some(c) = code {
                    out.push((param::CODE, c.clone()));
                }
                if let Some(r) = reason {
                    out.push((param::REASON, r.clone()));
                }
            }
            Self::Truncate { before } => {
                out.push((param::INDEX, before.to_string()));
                out.push((param::TRUNCATE, yes()));
            }
        }
        out
    }
}

impl ReadOp {
    fn parse(q: &Query) -> Result<Self, QueryError> {
        if q.flag(param::ATTRIBUTES)? {
            Ok(Self::Attributes)
        } else if q.flag(param::SEARCH)? {
            match q.start_index()? {
                Some(index) if index > 0 => Ok(Self::Search { index }),
                _ => Err(QueryError(
                    "_index_ must be a positive index for search".into(),
                )),
            }
        } else if q.flag(param::COUNT)? {
            Ok(Self::Count {
                priority: q.get(param::PRIORITY).map(parse_priority).transpose()?,
            })
        } else if q.flag(param::DEAD)? {
            Ok(Self::DeadLetters {
                length: q.u64_or(param::LENGTH, 100)?.clamp(1, MAX_READ_LENGTH),
            })
        } else {
            Ok(Self::Get(GetOp {
                raw: match q.get(param::RAW) {
                    None => None,
                    Some(_) => Some(q.flag(param::RAW)?),
                },
                length: q.u64_or(param::LENGTH, 1)?.clamp(1, MAX_READ_LENGTH),
                from_index: q.start_index()?,
                auto_delete: q.flag_or(param::AUTO_DELETE, false)?,
                timeout: q.timeout()?,
            }))
        }
    }
}

impl WatchOp {
    fn parse(q: &Query) -> Result<Self, QueryError> {
        let auto_commit = q.flag(param::AUTO_COMMIT)?;
        let window = q.u64_or(param::WINDOW, 1)?;
        if !auto_commit && window == 0 {
            return Err(QueryError(
                "_window_ must be at least 1 without _auto_commit_".into(),
            ));
        }
        Ok(Self {
            window: window.min(u32::MAX as u64) as u32,
            index_only: q.flag(param::INDEX_ONLY)?,
            from_index: q.start_index()?,
            auto_commit,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parsed(op: &QueueOp) -> QueueOp {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(op.query())
            .finish();
        let q = Query::parse(Some(&query)).unwrap();
        QueueOp::parse(op.method(), &q, false).unwrap()
    }

    fn get(from_index: Option<u64>, auto_delete: bool) -> GetOp {
        GetOp {
            from_index,
            length: 5,
            timeout: Duration::from_millis(1_500),
            raw: Some(false),
            auto_delete,
        }
    }

    #[test]
    fn every_op_the_client_encodes_is_the_op_the_server_parses() {
        let ops = [
            QueueOp::Put { priority: None },
            QueueOp::Put { priority: Some(3) },
            QueueOp::Complete { input_index: 7 },
            QueueOp::CompleteBatch,
            QueueOp::EndOfStream { force: false },
            QueueOp::EndOfStream { force: true },
            QueueOp::Watch(WatchOp {
                from_index: Some(0),
                window: 4,
                auto_commit: false,
                index_only: true,
            }),
            QueueOp::Watch(WatchOp {
                from_index: None,
                window: 0,
                auto_commit: true,
                index_only: false,
            }),
            QueueOp::Read {
                read: ReadOp::Attributes,
                linearizable: true,
            },
            QueueOp::Read {
                read: ReadOp::Search { index: 9 },
                linearizable: false,
            },
            QueueOp::Read {
                read: ReadOp::Count { priority: Some(1) },
                linearizable: true,
            },
            QueueOp::Read {
                read: ReadOp::DeadLetters { length: 20 },
                linearizable: true,
            },
            QueueOp::Read {
                read: ReadOp::Get(get(Some(12), false)),
                linearizable: true,
            },
            QueueOp::Read {
                read: ReadOp::Get(get(None, false)),
                linearizable: false,
            },
            QueueOp::Read {
                read: ReadOp::Get(get(Some(1), true)),
                linearizable: false,
            },
            QueueOp::Commit {
                indexes: vec![1, 2, 30],
            },
            QueueOp::Negative {
                indexes: vec![4],
                code: Some("Shutdown".into()),
                reason: Some("engine stopping".into()),
            },
            QueueOp::Delete { indexes: vec![5] },
            QueueOp::Truncate { before: 100 },
        ];
        for op in ops {
            assert_eq!(parsed(&op), op, "{:?}", op.query());
        }
    }

    #[test]
    fn the_sdks_requests_parse_as_the_protocol_says() {
        let parse = |method: &str, query: &str, upgrade: bool| {
            QueueOp::parse(method, &Query::parse(Some(query)).unwrap(), upgrade)
        };
        // A WebSocket upgrade is a watch, with window 1 by default.
        assert_eq!(
            parse("GET", "_index_=0", true).unwrap(),
            QueueOp::Watch(WatchOp {
                from_index: Some(0),
                window: 1,
                auto_commit: false,
                index_only: false
            })
        );
        // A take is never linearized; `_raw_` absent is left to Accept.
        let QueueOp::Read {
            read: ReadOp::Get(g),
            linearizable,
        } = parse("GET", "_auto_delete_=true&_length_=99999", false).unwrap()
        else {
            panic!("a get");
        };
        assert!(!linearizable && g.auto_delete);
        assert_eq!((g.raw, g.length), (None, MAX_READ_LENGTH));
        // An empty `_priority_` is the normal priority, not the header's.
        assert_eq!(
            parse("POST", "_priority_=", false).unwrap(),
            QueueOp::Put { priority: Some(0) }
        );
        for (method, query) in [
            ("GET", "_watch_=true&_window_=0"),
            ("GET", "_watch_=maybe"),
            ("GET", "_attrs_=true&_local_=perhaps"),
            ("GET", "_timeout_=forever"),
            ("GET", "_search_=true"),
            ("GET", "_search_=true&_index_=-1"),
            ("PUT", ""),
            ("PUT", "_indexes_=1,x"),
            ("DELETE", "_trunc_=true&_index_=-1"),
            ("POST", "_priority_=high"),
            ("PATCH", ""),
        ] {
            assert!(parse(method, query, false).is_err(), "{method} {query}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn gets_and_watches_round_trip(
            from_index in proptest::option::of(0u64..u64::MAX),
            length in 1u64..=MAX_READ_LENGTH,
            timeout_ms in 0u64..300_000,
            raw in proptest::option::of(any::<bool>()),
            auto_delete in any::<bool>(),
            local in any::<bool>(),
            window in 1u32..u32::MAX,
            flags in any::<(bool, bool)>(),
        ) {
            let get = QueueOp::Read {
                read: ReadOp::Get(GetOp {
                    from_index,
                    length,
                    timeout: Duration::from_millis(timeout_ms),
                    raw,
                    auto_delete,
                }),
                linearizable: !local && !auto_delete,
            };
            prop_assert_eq!(parsed(&get), get);
            let watch = QueueOp::Watch(WatchOp {
                from_index,
                window,
                auto_commit: flags.0,
                index_only: flags.1,
            });
            prop_assert_eq!(parsed(&watch), watch);
        }
    }
}
