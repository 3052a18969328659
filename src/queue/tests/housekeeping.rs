//! Leader housekeeping in the state machine: decisions are applied only in
//! the term of the leader that made them, and time never goes backwards.

use super::*;

struct Replica {
    state: QueueState,
    next_id: u128,
}

impl Replica {
    fn new() -> Self {
        let mut r = Replica {
            state: QueueState::new(),
            next_id: 0,
        };
        let config = ServiceConfig {
            consumer_grace_ms: 1_000,
            ..ServiceConfig::default()
        };
        r.apply(
            1,
            1_000,
            Command::CreateService {
                name: "svc".into(),
                config,
            },
        );
        r
    }

    fn apply(&mut self, term: u64, now_ms: u64, command: Command) -> Reply {
        self.next_id += 1;
        let envelope = Envelope {
            id: self.next_id,
            now_ms,
            command,
        };
        self.state.apply_in_term(&envelope, Some(term)).0
    }

    /// A consumer on `node` holding one item.
    fn consumer_with_item(&mut self, node: u64) {
        let item = NewItem {
            request_id: "r-1".into(),
            tags: Tags::new(),
            data: Bytes::from_static(b"x"),
            priority: 0,
            path: String::new(),
        };
        assert!(matches!(
            self.apply(
                1,
                1_000,
                Command::Put {
                    queue: input(),
                    item
                }
            ),
            Reply::Put { .. }
        ));
        let consumer = ConsumerSpec {
            group: "g".into(),
            user: "u".into(),
            node,
            connection: 7,
            window: 1,
            auto_commit: false,
            index_only: false,
            tags: Tags::new(),
            start_index: Some(0),
        };
        self.apply(
            1,
            1_000,
            Command::Attach {
                queue: input(),
                consumer,
            },
        );
        assert_eq!(self.pending(), Some(1));
    }

    fn pending(&self) -> Option<u32> {
        self.state
            .queue(&input())
            .and_then(|q| q.groups.get("g"))
            .and_then(|g| g.consumers.get("u"))
            .map(|c| c.pending)
    }
}

/// Delivery finding 3: a `NodeLost` decided by the leader of term 1 and
/// committed in term 2 (the deposed leader's entry survived the election)
/// changes nothing; decided and applied in one term, it moves the items.
#[test]
fn node_lost_from_a_deposed_leader_is_void_in_a_later_term() {
    let mut r = Replica::new();
    r.consumer_with_item(2);
    let stale = r.apply(2, 2_000, Command::NodeLost { node: 2, term: 1 });
    assert_eq!(
        stale,
        Reply::Rejected(Rejection::StaleTerm {
            decided: 1,
            applied: 2
        })
    );
    assert_eq!(r.pending(), Some(1), "a healthy consumer was evicted");
    assert_eq!(r.state.running_consumers_on(2).len(), 1);
    assert_eq!(
        r.apply(2, 2_000, Command::NodeLost { node: 2, term: 2 }),
        Reply::Done
    );
    assert_eq!(r.pending(), None);
    assert!(r.state.running_consumers_on(2).is_empty());
}

/// Delivery finding 3, grace expiry: a stale `GraceExpired` does not remove
/// a leaving consumer; one from the current term does.
#[test]
fn grace_expiry_from_a_deposed_leader_is_void_in_a_later_term() {
    let mut r = Replica::new();
    r.consumer_with_item(1);
    r.apply(
        1,
        1_000,
        Command::Detach {
            queue: input(),
            group: "g".into(),
            user: "u".into(),
            connection: 7,
        },
    );
    assert!(matches!(
        r.apply(3, 9_000, Command::GraceExpired { term: 2 }),
        Reply::Rejected(Rejection::StaleTerm { .. })
    ));
    assert_eq!(r.pending(), Some(1));
    assert_eq!(
        r.apply(3, 9_000, Command::GraceExpired { term: 3 }),
        Reply::Done
    );
    assert_eq!(r.pending(), None);
}

/// Delivery finding 7: time in `apply` never goes back. A leader whose
/// clock is behind its predecessor's cannot make a leaving consumer's grace
/// period longer (or, with a clock ahead, the next one's shorter than what
/// the log says).
#[test]
fn time_in_apply_is_monotonic_whatever_the_envelopes_say() {
    let mut r = Replica::new();
    r.consumer_with_item(1);
    assert_eq!(r.state.clock_ms(), 1_000);
    // Leader 1 at 50,000 ms sees the connection close.
    r.apply(
        1,
        50_000,
        Command::Detach {
            queue: input(),
            group: "g".into(),
            user: "u".into(),
            connection: 7,
        },
    );
    // Leader 2's clock is 40 s behind: its envelopes are read as 50,000+.
    r.apply(2, 10_000, Command::GraceExpired { term: 2 });
    assert_eq!(r.state.clock_ms(), 50_000);
    assert_eq!(r.pending(), Some(1), "grace not yet over at 50,000");
    assert_eq!(r.state.next_expiry(), Some(51_000));
    r.apply(2, 51_000, Command::GraceExpired { term: 2 });
    assert_eq!(r.pending(), None);
}

/// Housekeeping without a term (logs written before terms were carried)
/// still applies, and a running consumer is listed for its node's
/// reconciliation.
#[test]
fn consumers_are_listed_by_node_for_reconciliation() {
    let mut r = Replica::new();
    r.consumer_with_item(3);
    assert_eq!(
        r.state.running_consumers_on(3),
        vec![(input(), "g".to_string(), "u".to_string(), 7)]
    );
    assert!(r.state.running_consumers_on(1).is_empty());
    let (reply, _) = r.state.apply(&Envelope {
        id: 999,
        now_ms: 2_000,
        command: Command::NodeGone { node: 3 },
    });
    assert_eq!(reply, Reply::Done);
    assert!(r.state.running_consumers_on(3).is_empty());
}
