//! Unit tests of the state machine and a property test against a reference
//! model of the delivery rules.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::protocol::REQUEST_ID_TAG;

fn input() -> QueueRef {
    QueueRef::new("svc", QueueKind::Input)
}

struct Harness {
    state: QueueState,
    next_id: u128,
    now: u64,
    events: Vec<Event>,
}

impl Harness {
    fn new(config: ServiceConfig) -> Self {
        let mut h = Harness {
            state: QueueState::new(),
            next_id: 1,
            now: 1_000,
            events: Vec::new(),
        };
        assert_eq!(
            h.run(Command::CreateService {
                name: "svc".into(),
                config
            }),
            Reply::Done
        );
        h
    }

    fn run(&mut self, command: Command) -> Reply {
        self.next_id += 1;
        let (reply, events) = self.state.apply(&Envelope {
            id: self.next_id,
            now_ms: self.now,
            command,
        });
        self.events.extend(events);
        reply
    }

    fn put(&mut self, data: &str, priority: u32) -> u64 {
        let item = NewItem {
            request_id: format!("r-{data}"),
            tags: Tags::new(),
            data: Bytes::from(data.to_string()),
            priority,
            path: String::new(),
        };
        match self.run(Command::Put {
            queue: input(),
            item,
        }) {
            Reply::Put { index, .. } => index,
            other => panic!("put failed: {other:?}"),
        }
    }

    fn attach(&mut self, group: &str, user: &str, connection: u64, window: u32, auto_commit: bool) {
        let consumer = ConsumerSpec {
            group: group.into(),
            user: user.into(),
            node: 1,
            connection,
            window,
            auto_commit,
            index_only: false,
            tags: Tags::new(),
            start_index: Some(0),
        };
        assert_eq!(
            self.run(Command::Attach {
                queue: input(),
                consumer
            }),
            Reply::Done
        );
    }

    /// Indexes delivered to `connection` since the last call.
    fn delivered(&mut self, connection: u64) -> Vec<u64> {
        let mut out = Vec::new();
        self.events.retain(|e| match e {
            Event::Deliver {
                connection: c,
                frame,
                ..
            } if *c == connection => {
                out.push(frame.index);
                false
            }
            _ => true,
        });
        out
    }

    fn queue(&self) -> &Queue {
        self.state.queue(&input()).unwrap()
    }

    fn commit(&mut self, group: &str, indexes: Vec<u64>) {
        self.run(Command::Commit {
            queue: input(),
            group: group.into(),
            indexes,
        });
    }
}

#[test]
fn indexes_start_at_one_and_increase() {
    let mut h = Harness::new(ServiceConfig::default());
    let a = h.put("a", 0);
    let b = h.put("b", 0);
    assert_eq!(a, 1);
    assert!(b > a);
    let item = &h.queue().items[&a];
    assert_eq!(
        item.tags.get(REQUEST_ID_TAG).map(String::as_str),
        Some("r-a")
    );
}

#[test]
fn window_limits_deliveries_and_commit_frees_a_slot() {
    let mut h = Harness::new(ServiceConfig::default());
    for i in 0..10 {
        h.put(&i.to_string(), 0);
    }
    h.attach("eas", "u1", 7, 5, false);
    let first = h.delivered(7);
    assert_eq!(first, vec![1, 2, 3, 4, 5]);
    h.commit("eas", vec![2]);
    assert_eq!(h.delivered(7), vec![6]);
    assert_eq!(h.queue().len(), 9);
}

#[test]
fn priority_items_go_first() {
    let mut h = Harness::new(ServiceConfig::default());
    h.put("n1", 0);
    h.put("n2", 0);
    let p = h.put("p1", 1);
    h.attach("eas", "u1", 7, 10, false);
    assert_eq!(h.delivered(7), vec![p, 1, 2]);
    assert_eq!(h.queue().count(Some(1), &Tags::new()), 1);
}

#[test]
fn takeover_redelivers_uncommitted_items() {
    let mut h = Harness::new(ServiceConfig::default());
    for i in 0..5 {
        h.put(&i.to_string(), 0);
    }
    h.attach("eas", "u1", 7, 3, false);
    assert_eq!(h.delivered(7), vec![1, 2, 3]);
    h.attach("eas", "u1", 8, 3, false);
    assert!(h.events.contains(&Event::Close {
        node: 1,
        connection: 7
    }));
    assert_eq!(h.delivered(8), vec![1, 2, 3]);
    h.commit("eas", vec![1, 2, 3]);
    assert_eq!(h.delivered(8), vec![4, 5]);
}

#[test]
fn detached_consumer_items_move_after_grace() {
    let mut h = Harness::new(ServiceConfig {
        consumer_grace_ms: 500,
        ..Default::default()
    });
    h.put("a", 0);
    h.put("b", 0);
    h.attach("eas", "u1", 7, 1, false);
    h.attach("eas", "u2", 8, 1, false);
    assert_eq!(h.delivered(7), vec![1]);
    assert_eq!(h.delivered(8), vec![2]);
    h.run(Command::Detach {
        queue: input(),
        group: "eas".into(),
        user: "u1".into(),
        connection: 7,
    });
    h.now += 100;
    h.run(Command::Tick);
    assert!(h.delivered(8).is_empty(), "still within the grace period");
    h.commit("eas", vec![2]);
    h.now += 500;
    h.run(Command::Tick);
    assert_eq!(h.delivered(8), vec![1]);
    assert_eq!(h.queue().items[&1].deliveries, 2);
}

#[test]
fn node_gone_requeues_at_once() {
    let mut h = Harness::new(ServiceConfig::default());
    h.put("a", 0);
    h.attach("eas", "u1", 7, 1, false);
    assert_eq!(h.delivered(7), vec![1]);
    let mut other = ConsumerSpec {
        group: "eas".into(),
        user: "u2".into(),
        node: 2,
        connection: 9,
        window: 1,
        auto_commit: false,
        index_only: false,
        tags: Tags::new(),
        start_index: Some(0),
    };
    h.run(Command::Attach {
        queue: input(),
        consumer: other.clone(),
    });
    h.run(Command::NodeGone { node: 1 });
    assert_eq!(h.delivered(9), vec![1]);
    other.connection = 10;
    assert!(h.events.contains(&Event::Close {
        node: 1,
        connection: 7
    }));
}

#[test]
fn groups_each_see_every_item_and_release_it_together() {
    let mut h = Harness::new(ServiceConfig::default());
    h.attach("g1", "u", 1, 5, false);
    h.attach("g2", "u", 2, 5, false);
    let i = h.put("x", 0);
    assert_eq!(h.delivered(1), vec![i]);
    assert_eq!(h.delivered(2), vec![i]);
    h.commit("g1", vec![i]);
    assert_eq!(h.queue().len(), 1, "g2 has not consumed it yet");
    h.commit("g2", vec![i]);
    assert_eq!(h.queue().len(), 0);
}

#[test]
fn negative_commit_redelivers_then_dead_letters() {
    let mut h = Harness::new(ServiceConfig {
        max_delivery: 2,
        ..Default::default()
    });
    let i = h.put("x", 0);
    h.attach("eas", "u", 1, 1, false);
    assert_eq!(h.delivered(1), vec![i]);
    let nack = |h: &mut Harness| {
        h.run(Command::Negative {
            queue: input(),
            group: "eas".into(),
            indexes: vec![i],
            code: "Shutdown".into(),
            reason: "bye".into(),
        })
    };
    nack(&mut h);
    assert_eq!(h.delivered(1), vec![i]);
    assert_eq!(h.queue().items[&i].message, "Shutdown: bye");
    nack(&mut h);
    assert!(h.delivered(1).is_empty());
    assert!(h.queue().items.is_empty());
    assert_eq!(h.queue().dead.len(), 1);
}

#[test]
fn auto_commit_ignores_window_and_consumes_what_its_node_commits() {
    let mut h = Harness::new(ServiceConfig::default());
    for i in 0..10 {
        h.put(&i.to_string(), 0);
    }
    h.attach("eas", "u", 1, 2, true);
    let delivered = h.delivered(1);
    assert_eq!(delivered.len(), 10);
    // Held until the node says the frames were written.
    assert_eq!(h.queue().len(), 10);
    h.commit("eas", delivered);
    assert!(h.queue().is_empty());
}

/// Delivery under faults, auto-commit: an auto-commit consumer holds a
/// bounded window of items that are not yet written to its connection
/// (old code: it was handed the whole backlog, each item consumed at
/// dispatch, so whatever its node could not write was lost); what was not
/// written returns to the group when it leaves.
#[test]
fn an_auto_commit_consumer_holds_a_bounded_window_and_unwritten_items_return() {
    let config = ServiceConfig {
        consumer_grace_ms: 1_000,
        ..Default::default()
    };
    let mut h = Harness::new(config);
    let total = 3 * AUTO_COMMIT_WINDOW as usize;
    for i in 0..total {
        h.put(&i.to_string(), 0);
    }
    h.attach("eas", "stalled", 1, 0, true);
    let first = h.delivered(1);
    assert_eq!(first.len(), AUTO_COMMIT_WINDOW as usize);
    assert_eq!(h.queue().len(), total);
    // Its node wrote a hundred frames and committed them: as many more come.
    h.commit("eas", first[..100].to_vec());
    assert_eq!(h.delivered(1).len(), 100);
    assert_eq!(h.queue().len(), total - 100);
    let c = &h.queue().groups["eas"].consumers["stalled"];
    assert_eq!(c.pending, AUTO_COMMIT_WINDOW);
    // The connection ends; after the grace period another consumer gets
    // every item that was not written, and nothing else.
    let connection = c.connection;
    h.run(Command::Detach {
        queue: input(),
        group: "eas".into(),
        user: "stalled".into(),
        connection,
    });
    h.now += 1_000;
    h.run(Command::Tick);
    h.attach("eas", "other", 2, 1_000, false);
    let rest = h.delivered(2);
    assert_eq!(rest.len(), total - 100);
    let written: BTreeSet<u64> = first[..100].iter().copied().collect();
    assert!(rest.iter().all(|i| !written.contains(i)));
}

#[test]
fn an_auto_commit_consumer_takes_items_up_to_its_window_bytes() {
    let mut config = ServiceConfig::default();
    config.input.max_payload_bytes = 16 * 1024 * 1024;
    let mut h = Harness::new(config);
    let mib = "x".repeat(1024 * 1024);
    for i in 0..20 {
        h.run(Command::Put {
            queue: input(),
            item: NewItem {
                request_id: format!("r{i}"),
                tags: Tags::new(),
                data: Bytes::from(mib.clone()),
                priority: 0,
                path: String::new(),
            },
        });
    }
    h.attach("eas", "u", 1, 0, true);
    let held = h.delivered(1);
    assert_eq!(held.len() as u64, AUTO_COMMIT_WINDOW_BYTES / (1024 * 1024));
    let c = &h.queue().groups["eas"].consumers["u"];
    assert!(c.pending_bytes >= AUTO_COMMIT_WINDOW_BYTES);
    h.commit("eas", vec![held[0]]);
    assert_eq!(h.delivered(1).len(), 1);
    // One item larger than the window still goes to a consumer holding none.
    let mut h = Harness::new(ServiceConfig {
        input: QueueLimits {
            max_payload_bytes: 16 * 1024 * 1024,
            ..Default::default()
        },
        ..Default::default()
    });
    h.run(Command::Put {
        queue: input(),
        item: NewItem {
            request_id: "big".into(),
            tags: Tags::new(),
            data: Bytes::from("x".repeat(AUTO_COMMIT_WINDOW_BYTES as usize + 1)),
            priority: 0,
            path: String::new(),
        },
    });
    h.put("small", 0);
    h.attach("eas", "u", 1, 0, true);
    assert_eq!(h.delivered(1).len(), 1);
}

#[test]
fn full_queue_refuses_or_evicts() {
    let limits = QueueLimits {
        max_length: 2,
        max_payload_bytes: 4,
        evict_oldest: false,
        ..Default::default()
    };
    let mut h = Harness::new(ServiceConfig {
        input: limits.clone(),
        ..Default::default()
    });
    h.put("a", 0);
    h.put("b", 0);
    let item = NewItem {
        request_id: "c".into(),
        tags: Tags::new(),
        data: Bytes::from_static(b"c"),
        priority: 0,
        path: String::new(),
    };
    assert_eq!(
        h.run(Command::Put {
            queue: input(),
            item: item.clone()
        }),
        Reply::Rejected(Rejection::Full(2))
    );
    let big = NewItem {
        data: Bytes::from_static(b"12345"),
        ..item.clone()
    };
    assert!(matches!(
        h.run(Command::Put {
            queue: input(),
            item: big
        }),
        Reply::Rejected(Rejection::TooLarge { size: 5, limit: 4 })
    ));
    let evicting = ServiceConfig {
        input: QueueLimits {
            evict_oldest: true,
            ..limits
        },
        ..Default::default()
    };
    h.run(Command::UpdateService {
        name: "svc".into(),
        config: evicting,
    });
    assert!(matches!(
        h.run(Command::Put {
            queue: input(),
            item
        }),
        Reply::Put { index: 3, .. }
    ));
    assert_eq!(
        h.queue().items.keys().copied().collect::<Vec<_>>(),
        vec![2, 3]
    );
}

#[test]
fn truncate_is_exclusive_and_search_counts_waiting_items() {
    let mut h = Harness::new(ServiceConfig::default());
    let a = h.put("a", 0);
    let b = h.put("b", 0);
    let c = h.put("c", 0);
    assert_eq!(h.queue().search(c), Some((false, 2)));
    h.run(Command::Truncate {
        queue: input(),
        before: b,
    });
    assert_eq!(
        h.queue().items.keys().copied().collect::<Vec<_>>(),
        vec![b, c]
    );
    assert!(!h.queue().items.contains_key(&a));
    h.attach("eas", "u", 1, 1, false);
    assert_eq!(h.queue().search(b), Some((true, 0)));
}

#[test]
fn complete_writes_result_once_and_commits_input() {
    let mut h = Harness::new(ServiceConfig::default());
    let i = h.put("job", 0);
    h.attach("engines", "e1", 1, 1, false);
    assert_eq!(h.delivered(1), vec![i]);
    let result = NewItem {
        request_id: "r-job".into(),
        tags: Tags::new(),
        data: Bytes::from_static(b"out"),
        priority: 0,
        path: String::new(),
    };
    let complete = |h: &mut Harness| {
        h.run(Command::Complete {
            service: "svc".into(),
            group: "engines".into(),
            input_index: i,
            result: Some(result.clone()),
        })
    };
    assert_eq!(
        complete(&mut h),
        Reply::Completed {
            sink_index: Some(1),
            duplicate: false
        }
    );
    assert_eq!(
        complete(&mut h),
        Reply::Completed {
            sink_index: None,
            duplicate: true
        }
    );
    let svc = h.state.service("svc").unwrap();
    assert!(svc.input.is_empty());
    assert_eq!(svc.sink.len(), 1);
}

#[test]
fn retried_envelope_is_applied_once() {
    let mut h = Harness::new(ServiceConfig::default());
    let env = Envelope {
        id: 42,
        now_ms: 5,
        command: Command::Put {
            queue: input(),
            item: NewItem {
                request_id: "x".into(),
                tags: Tags::new(),
                data: Bytes::new(),
                priority: 0,
                path: String::new(),
            },
        },
    };
    let (first, _) = h.state.apply(&env);
    let (second, _) = h.state.apply(&env);
    assert_eq!(first, second);
    assert_eq!(h.queue().len(), 1);
}

// ---- property test ---------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Put { priority: u32, tagged: bool },
    Attach { group: u8, user: u8, tagged: bool },
    Detach { group: u8, user: u8 },
    Commit { group: u8, pick: usize },
    Negative { group: u8, pick: usize },
    Delete { pick: usize },
    Advance { ms: u64 },
    NodeGone,
    Take,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..3, any::<bool>()).prop_map(|(priority, tagged)| Op::Put { priority, tagged: tagged && priority == 2 }),
        2 => (0u8..2, 0u8..3, prop::bool::weighted(0.1)).prop_map(|(group, user, tagged)| Op::Attach { group, user, tagged }),
        1 => (0u8..2, 0u8..3).prop_map(|(group, user)| Op::Detach { group, user }),
        4 => (0u8..2, any::<usize>()).prop_map(|(group, pick)| Op::Commit { group, pick }),
        1 => (0u8..2, any::<usize>()).prop_map(|(group, pick)| Op::Negative { group, pick }),
        1 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        1 => (0u64..1500).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::NodeGone),
        1 => Just(Op::Take),
    ]
}

/// What the model knows from the outside: which items exist, and what each
/// connection was handed.
#[derive(Default)]
struct Model {
    /// Indexes put and not removed by an explicit delete/take.
    live: BTreeSet<u64>,
    /// (group, index) pairs committed by that group.
    committed: BTreeSet<(String, u64)>,
    /// connection -> (group, user)
    connections: BTreeMap<u64, (String, String)>,
    /// (group, index) -> connection currently believed to hold it.
    holder: BTreeMap<(String, u64), u64>,
}

fn window_of(user: u8) -> u32 {
    u32::from(user) + 1
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn delivery_rules_hold(ops in prop::collection::vec(op(), 1..80)) {
        let config = ServiceConfig { consumer_grace_ms: 1000, max_delivery: 0, ..Default::default() };
        let mut h = Harness::new(config);
        let mut model = Model::default();
        let mut next_conn = 100u64;
        for op in ops {
            match op {
                Op::Put { priority, tagged } => {
                    let mut tags = Tags::new();
                    if tagged { tags.insert("k".into(), "v".into()); }
                    let item = NewItem { request_id: format!("r{}", h.next_id), tags, data: Bytes::from_static(b"d"), priority, path: String::new() };
                    if let Reply::Put { index, .. } = h.run(Command::Put { queue: input(), item }) {
                        prop_assert!(model.live.iter().all(|i| *i < index));
                        model.live.insert(index);
                    }
                }
                Op::Attach { group, user, tagged } => {
                    next_conn += 1;
                    let (g, u) = (format!("g{group}"), format!("u{user}"));
                    let mut tags = Tags::new();
                    if tagged { tags.insert("k".into(), "v".into()); }
                    let exists = h.queue().groups.get(&g).is_some_and(|gr| gr.consumers.contains_key(&u));
                    // Consumers of one group share their tag filter.
                    if let Some(gr) = h.queue().groups.get(&g) { tags = gr.tags.clone(); }
                    // User 2 watches with auto-commit: its node commits what it wrote.
                    let spec = ConsumerSpec { group: g.clone(), user: u.clone(), node: 1 + u64::from(user % 2), connection: next_conn, window: window_of(user), auto_commit: user == 2, index_only: false, tags, start_index: Some(0) };
                    let _ = exists;
                    model.connections.insert(next_conn, (g.clone(), u.clone()));
                    // A takeover moves what the old connection held to the new one.
                    for ((hg, _), conn) in model.holder.iter_mut() {
                        if *hg == g && model.connections.get(conn).is_some_and(|(_, cu)| *cu == u) {
                            *conn = next_conn;
                        }
                    }
                    h.run(Command::Attach { queue: input(), consumer: spec });
                }
                Op::Detach { group, user } => {
                    let (g, u) = (format!("g{group}"), format!("u{user}"));
                    if let Some(c) = h.queue().groups.get(&g).and_then(|gr| gr.consumers.get(&u)) {
                        let connection = c.connection;
                        h.run(Command::Detach { queue: input(), group: g, user: u, connection });
                    }
                }
                Op::Commit { group, pick } | Op::Negative { group, pick } => {
                    let g = format!("g{group}");
                    let held: Vec<u64> = model.holder.keys().filter(|(hg, _)| *hg == g).map(|(_, i)| *i).collect();
                    if held.is_empty() { continue; }
                    let index = held[pick % held.len()];
                    if matches!(op, Op::Commit { .. }) {
                        model.holder.remove(&(g.clone(), index));
                        model.committed.insert((g.clone(), index));
                        h.run(Command::Commit { queue: input(), group: g, indexes: vec![index] });
                    } else {
                        model.holder.remove(&(g.clone(), index));
                        h.run(Command::Negative { queue: input(), group: g, indexes: vec![index], code: String::new(), reason: String::new() });
                    }
                }
                Op::Delete { pick } => {
                    if model.live.is_empty() { continue; }
                    let index = *model.live.iter().nth(pick % model.live.len()).unwrap();
                    model.live.remove(&index);
                    model.holder.retain(|(_, i), _| *i != index);
                    h.run(Command::Delete { queue: input(), indexes: vec![index] });
                }
                Op::Advance { ms } => { h.now += ms; h.run(Command::Tick); }
                Op::NodeGone => { h.run(Command::NodeGone { node: 2 }); }
                Op::Take => {
                    if let Reply::Items(frames) = h.run(Command::Take { queue: input(), selector: Selector { from_index: Some(0), length: 1, tags: Tags::new() } }) {
                        for f in frames {
                            model.live.remove(&f.index);
                            model.holder.retain(|(_, i), _| *i != f.index);
                        }
                    }
                }
            }
            // Requeues (grace expiry, node loss) drop holdings the model must forget.
            let queue = h.queue().clone();
            let mut stale = Vec::new();
            for ((g, i), conn) in &model.holder {
                let user = &model.connections[conn].1;
                match queue.groups.get(g).and_then(|gr| gr.in_flight.get(i)) {
                    Some(now_holder) if now_holder == user => {}
                    Some(_) => {
                        // Moved to another consumer: only allowed once the
                        // holder is gone from the group.
                        let still_there = queue.groups[g].consumers.contains_key(user);
                        prop_assert!(!still_there, "item {} moved away from live consumer {}", i, user);
                        stale.push((g.clone(), *i));
                    }
                    None => stale.push((g.clone(), *i)),
                }
            }
            for key in stale { model.holder.remove(&key); }
            // Deliveries: never of an item the group committed, never to two holders.
            for e in std::mem::take(&mut h.events) {
                if let Event::Deliver { connection, frame, .. } = e {
                    let (g, _) = model.connections[&connection].clone();
                    prop_assert!(!model.committed.contains(&(g.clone(), frame.index)), "committed item {} redelivered to {}", frame.index, g);
                    if let Some(other) = model.holder.get(&(g.clone(), frame.index)) {
                        prop_assert_eq!(*other, connection, "item {} held by two consumers of {}", frame.index, g);
                    }
                    model.holder.insert((g, frame.index), connection);
                }
            }
            // State matches the model.
            for (gid, group) in &queue.groups {
                for (uid, c) in &group.consumers {
                    let held = group.in_flight.values().filter(|u| *u == uid).count() as u32;
                    prop_assert_eq!(c.pending, held);
                    let held_bytes: u64 = group.in_flight.iter().filter(|(_, u)| *u == uid).map(|(i, _)| queue.items[i].held_bytes()).sum();
                    prop_assert_eq!(c.pending_bytes, held_bytes);
                    let window = if c.auto_commit { AUTO_COMMIT_WINDOW } else { c.window };
                    prop_assert!(c.pending <= window, "{}.{} holds {} > window {}", gid, uid, c.pending, window);
                }
                for (index, uid) in &group.in_flight {
                    let conn = model.holder.get(&(gid.clone(), *index));
                    prop_assert!(conn.is_some(), "in flight {} in {} unknown to the model", index, gid);
                    prop_assert_eq!(&model.connections[conn.unwrap()].1, uid);
                }
                // Dispatch is work-conserving: no running consumer with a free
                // slot sits beside a ready item it accepts.
                for (uid, c) in &group.consumers {
                    if c.has_free_slot() {
                        let idle_item = queue.items.values().find(|it| {
                            tags_match(&it.tags, &group.tags) && tags_match(&it.tags, &c.tags)
                                && !group.in_flight.contains_key(&it.index) && !group.acked.contains(&it.index)
                        });
                        prop_assert!(idle_item.is_none(), "{}.{} idle beside item {:?}", gid, uid, idle_item.map(|i| i.index));
                    }
                }
            }
            // No item lost: every live index is stored, or consumed by a group.
            for index in &model.live {
                let stored = queue.items.contains_key(index) || queue.dead.contains_key(index);
                let consumed = model.committed.iter().any(|(_, i)| i == index);
                prop_assert!(stored || consumed, "item {} vanished", index);
            }
        }
        // Determinism and snapshot round trip.
        let bytes = postcard::to_allocvec(&h.state).unwrap();
        let mut restored: QueueState = postcard::from_bytes(&bytes).unwrap();
        restored.rebuild_derived();
        prop_assert_eq!(restored, h.state.clone());
    }
}

/// The encoding of `depth` batches nested around a `Tick`, built by hand
/// (encoding it through serde would itself recurse `depth` deep).
fn nested_batch_bytes(depth: usize) -> Vec<u8> {
    let tick = postcard::to_allocvec(&Command::Tick).unwrap();
    let one = postcard::to_allocvec(&Command::Batch(vec![Command::Tick])).unwrap();
    // `one` is [batch variant][len = 1][tick]: its prefix opens a level.
    let open = &one[..one.len() - tick.len()];
    let mut bytes = open.repeat(depth);
    bytes.extend_from_slice(&tick);
    bytes
}

#[test]
fn a_flat_batch_decodes_and_a_nested_one_is_refused_at_decode_without_recursing() {
    let flat: Command = postcard::from_bytes(&nested_batch_bytes(1)).unwrap();
    assert_eq!(flat, Command::Batch(vec![Command::Tick]));
    for depth in [2, 1_900, 5_000, 200_000] {
        let err = postcard::from_bytes::<Command>(&nested_batch_bytes(depth));
        assert!(err.is_err(), "depth {depth} must be refused");
    }
    // After a refusal the next batch still decodes (the marker was reset).
    let again: Command = postcard::from_bytes(&nested_batch_bytes(1)).unwrap();
    assert!(matches!(again, Command::Batch(_)));
}

/// The encoding of `depth` reply batches nested around a `Done`, built by
/// hand like [`nested_batch_bytes`].
fn nested_reply_bytes(depth: usize) -> Vec<u8> {
    let done = postcard::to_allocvec(&Reply::Done).unwrap();
    let one = postcard::to_allocvec(&Reply::batch(vec![Reply::Done])).unwrap();
    let open = &one[..one.len() - done.len()];
    let mut bytes = open.repeat(depth);
    bytes.extend_from_slice(&done);
    bytes
}

#[test]
fn a_nested_reply_batch_is_refused_at_decode_and_at_construction_without_recursing() {
    let flat: Reply = postcard::from_bytes(&nested_reply_bytes(1)).unwrap();
    assert_eq!(flat, Reply::Batch(vec![Reply::Done]));
    for depth in [2, 1_900, 5_000, 200_000] {
        let err = postcard::from_bytes::<Reply>(&nested_reply_bytes(depth));
        assert!(err.is_err(), "depth {depth} must be refused");
    }
    let again: Reply = postcard::from_bytes(&nested_reply_bytes(1)).unwrap();
    assert!(matches!(again, Reply::Batch(_)));

    let built = Reply::batch(vec![Reply::Done, Reply::batch(vec![Reply::Done])]);
    assert!(!built.has_nested_batch());
    match built {
        Reply::Batch(replies) => {
            assert_eq!(replies[0], Reply::Done);
            assert!(matches!(replies[1], Reply::Rejected(Rejection::Invalid(_))));
        }
        other => panic!("{other:?}"),
    }
}

/// Snapshots carry the de-duplication table, batch replies included: a
/// snapshot whose kept reply is deeply nested is refused when decoded.
#[test]
fn a_snapshot_whose_dedup_table_holds_a_nested_reply_is_refused() {
    let mut h = Harness::new(ServiceConfig::default());
    let reply = h.run(Command::Batch(vec![Command::Truncate {
        queue: input(),
        before: 1,
    }]));
    assert_eq!(reply, Reply::Batch(vec![Reply::Done]));
    let state = postcard::to_allocvec(&h.state).unwrap();
    let kept = postcard::to_allocvec(&reply).unwrap();
    // The table is encoded after the services and ids, before the clock.
    let at = state
        .windows(kept.len())
        .rposition(|w| w == kept)
        .expect("the kept reply is in the snapshot");
    let splice = |depth: usize| {
        let mut forged = state[..at].to_vec();
        forged.extend_from_slice(&nested_reply_bytes(depth));
        forged.extend_from_slice(&state[at + kept.len()..]);
        forged
    };
    let mut same: QueueState = postcard::from_bytes(&splice(1)).unwrap();
    same.rebuild_derived();
    assert_eq!(same, h.state, "the splice replaces the kept reply");
    for depth in [2, 200_000] {
        assert!(
            postcard::from_bytes::<QueueState>(&splice(depth)).is_err(),
            "depth {depth} must be refused"
        );
    }
}

#[test]
fn applying_a_nested_batch_rejects_the_inner_batch_and_applies_the_rest() {
    let mut h = Harness::new(ServiceConfig::default());
    let nested = Command::Batch(vec![
        Command::Batch(vec![Command::Tick]),
        Command::Truncate {
            queue: input(),
            before: 1,
        },
    ]);
    assert!(nested.has_nested_batch());
    match h.run(nested) {
        Reply::Batch(replies) => {
            assert!(matches!(replies[0], Reply::Rejected(Rejection::Invalid(_))));
            assert_eq!(replies[1], Reply::Done);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn creating_an_existing_service_is_refused_and_changes_nothing() {
    let mut h = Harness::new(ServiceConfig {
        token: "owner".into(),
        ..Default::default()
    });
    let takeover = ServiceConfig {
        token: "intruder".into(),
        ..Default::default()
    };
    assert!(matches!(
        h.run(Command::CreateService {
            name: "svc".into(),
            config: takeover.clone(),
        }),
        Reply::Rejected(Rejection::ServiceExists(_))
    ));
    assert_eq!(h.state.service("svc").unwrap().config.token, "owner");
    // Changing settings is its own, explicit command.
    assert_eq!(
        h.run(Command::UpdateService {
            name: "svc".into(),
            config: takeover,
        }),
        Reply::Done
    );
    assert_eq!(h.state.service("svc").unwrap().config.token, "intruder");
    assert!(matches!(
        h.run(Command::UpdateService {
            name: "nope".into(),
            config: ServiceConfig::default(),
        }),
        Reply::Rejected(Rejection::NoSuchService(_))
    ));
}

// ---- delivery findings: request ids, de-duplication, completion -----------

fn sink() -> QueueRef {
    QueueRef::new("svc", QueueKind::Sink)
}

fn item(request_id: &str, data: &str) -> NewItem {
    NewItem {
        request_id: request_id.into(),
        tags: Tags::new(),
        data: Bytes::from(data.to_string()),
        priority: 0,
        path: String::new(),
    }
}

fn take_all() -> Selector {
    Selector {
        from_index: Some(0),
        length: 10_000,
        tags: Tags::new(),
    }
}

#[test]
fn finding4_caller_request_id_is_kept_and_an_input_put_is_idempotent() {
    let mut h = Harness::new(ServiceConfig::default());
    let first = h.run(Command::Put {
        queue: input(),
        item: item("client-1", "a"),
    });
    assert_eq!(
        first,
        Reply::Put {
            index: 1,
            request_id: "client-1".into()
        }
    );
    // A retry (a new envelope: the first reply was lost) adds nothing.
    let retry = h.run(Command::Put {
        queue: input(),
        item: item("client-1", "a"),
    });
    assert_eq!(retry, first);
    assert_eq!(h.queue().len(), 1);
    assert_eq!(h.queue().puts_total, 1);
    // The same holds after a snapshot round trip (the index is derived).
    let bytes = postcard::to_allocvec(&h.state).unwrap();
    h.state = postcard::from_bytes(&bytes).unwrap();
    h.state.rebuild_derived();
    assert_eq!(
        h.run(Command::Put {
            queue: input(),
            item: item("client-1", "a"),
        }),
        first
    );
    assert_eq!(h.queue().len(), 1);
    // A result written under the input's id is found by that id.
    h.run(Command::Put {
        queue: sink(),
        item: item("client-1", "result"),
    });
    let by_id = |h: &Harness| {
        let mut tags = Tags::new();
        tags.insert(REQUEST_ID_TAG.into(), "client-1".into());
        h.state.queue(&sink()).unwrap().peek(&Selector {
            from_index: Some(0),
            length: 10,
            tags,
        })
    };
    assert_eq!(by_id(&h).len(), 1);
    assert_eq!(by_id(&h)[0].data, Bytes::from_static(b"result"));
    // The sink is not de-duplicated: a second result is stored, and both
    // stay findable, also after the first is deleted.
    h.run(Command::Put {
        queue: sink(),
        item: item("client-1", "again"),
    });
    assert_eq!(by_id(&h).len(), 2);
    h.run(Command::Delete {
        queue: sink(),
        indexes: vec![1],
    });
    assert_eq!(by_id(&h).len(), 1);
    assert_eq!(by_id(&h)[0].data, Bytes::from_static(b"again"));
    // Once the input item is consumed, the id may be used again.
    h.commit("eas", vec![1]);
    assert!(h.queue().is_empty());
    assert!(matches!(
        h.run(Command::Put {
            queue: input(),
            item: item("client-1", "a"),
        }),
        Reply::Put { index: 2, .. }
    ));
}

#[test]
fn finding4_invalid_request_ids_are_refused() {
    let mut h = Harness::new(ServiceConfig::default());
    for bad in ["", "has space", "new\nline", "é", &"x".repeat(129)] {
        let reply = h.run(Command::Put {
            queue: input(),
            item: item(bad, "a"),
        });
        assert!(
            matches!(reply, Reply::Rejected(Rejection::Invalid(_))),
            "{bad:?}: {reply:?}"
        );
    }
    assert!(h.queue().is_empty());
    assert!(matches!(
        h.run(Command::Put {
            queue: input(),
            item: item(&"x".repeat(128), "a"),
        }),
        Reply::Put { .. }
    ));
}

#[test]
fn finding5_a_retried_take_gets_the_same_items() {
    let mut h = Harness::new(ServiceConfig::default());
    h.put("a", 0);
    h.put("b", 0);
    let env = Envelope {
        id: 7,
        now_ms: h.now,
        command: Command::Take {
            queue: input(),
            selector: take_all(),
        },
    };
    let (first, _) = h.state.apply(&env);
    let Reply::Items(frames) = &first else {
        panic!("{first:?}")
    };
    assert_eq!(frames.len(), 2);
    h.put("c", 0);
    let (retry, events) = h.state.apply(&Envelope {
        now_ms: h.now + 4_000,
        ..env.clone()
    });
    assert_eq!(retry, first);
    assert!(events.is_empty());
    assert_eq!(h.queue().len(), 1, "the retry took nothing more");
    // Kept across a snapshot as well.
    let bytes = postcard::to_allocvec(&h.state).unwrap();
    let mut restored: QueueState = postcard::from_bytes(&bytes).unwrap();
    restored.rebuild_derived();
    assert_eq!(restored.apply(&env).0, first);
}

/// A put of one item, applied once; a retry re-applies this envelope.
fn applied_put(h: &mut Harness) -> Envelope {
    let put = Envelope {
        id: u128::MAX,
        now_ms: h.now,
        command: Command::Put {
            queue: input(),
            item: item("once", "x"),
        },
    };
    h.state.apply(&put);
    put
}

#[test]
fn finding5_dedup_holds_for_the_window_whatever_the_rate() {
    let mut h = Harness::new(ServiceConfig::default());
    let put = applied_put(&mut h);
    // Far more commands than the old count-based window (20,000), all
    // within a second of envelope time.
    for i in 0..25_000u64 {
        h.now = 1_000 + i / 25;
        h.run(Command::Tick);
    }
    // Consumed meanwhile: a second application would store it again.
    h.commit("eas", vec![1]);
    assert!(h.queue().is_empty());
    h.state.apply(&Envelope {
        now_ms: h.now,
        ..put.clone()
    });
    assert!(
        h.queue().is_empty(),
        "a retry inside the window was applied twice"
    );
    // Past the window the id is forgotten, so memory stays bounded.
    h.now += DEDUP_WINDOW_MS;
    h.run(Command::Tick);
    h.state.apply(&Envelope {
        now_ms: h.now,
        ..put
    });
    assert_eq!(h.queue().len(), 1);
}

/// Delivery finding 5, above any rate: more ids than the table's cap
/// within the propose deadline are all remembered, so a retry inside it is
/// still applied once (old code: past the cap the oldest id was forgotten
/// at once, whatever its age, and the retried put stored a second item).
/// Past the least window the cap forgets the oldest again.
#[test]
fn finding5_dedup_holds_for_the_propose_deadline_above_the_id_cap() {
    let mut h = Harness::new(ServiceConfig::default());
    let put = applied_put(&mut h);
    let start = h.now;
    let burst = DEDUP_MAX_ENTRIES as u64 + 1_000;
    for i in 0..burst {
        h.now = start + i * 1_000 / burst;
        h.run(Command::Tick);
    }
    h.commit("eas", vec![1]);
    assert!(h.queue().is_empty());
    h.state.apply(&Envelope {
        now_ms: h.now,
        ..put.clone()
    });
    assert!(
        h.queue().is_empty(),
        "a retry within a second was applied twice after {burst} commands"
    );
    // Past the least window, a crowded table forgets its oldest ids.
    h.now = start + DEDUP_MIN_WINDOW_MS;
    h.run(Command::Tick);
    h.state.apply(&Envelope {
        now_ms: h.now,
        ..put
    });
    assert_eq!(h.queue().len(), 1);
}

#[test]
fn finding5_take_replies_past_the_byte_bound_are_refused_not_emptied() {
    let mut config = ServiceConfig::default();
    config.input.max_payload_bytes = 8 * 1024 * 1024;
    let mut h = Harness::new(config);
    let big = "x".repeat(4 * 1024 * 1024);
    let takes = (DEDUP_MAX_REPLY_BYTES / (4 * 1024 * 1024)) as u128 + 2;
    let mut replies = Vec::new();
    for id in 0..takes {
        h.run(Command::Put {
            queue: input(),
            item: item(&format!("r{id}"), &big),
        });
        let env = Envelope {
            id: 1_000_000 + id,
            now_ms: h.now,
            command: Command::Take {
                queue: input(),
                selector: take_all(),
            },
        };
        let (reply, _) = h.state.apply(&env);
        assert!(matches!(&reply, Reply::Items(f) if f.len() == 1));
        replies.push((env, reply));
    }
    // The oldest replies lost their items; their retries say so and take
    // nothing. The newest are repeated in full.
    h.put("later", 0);
    let (env, _) = &replies[0];
    assert_eq!(
        h.state.apply(env).0,
        Reply::Rejected(Rejection::ReplyNotKept)
    );
    let (env, reply) = replies.last().unwrap();
    assert_eq!(&h.state.apply(env).0, reply);
    assert_eq!(h.queue().len(), 1);
}

/// Delivery under faults, memory: the de-duplication table reports what it
/// holds for ids still within the window (for the node's memory limit),
/// and stops counting them once they have aged out.
#[test]
fn the_dedup_table_reports_the_memory_of_ids_and_replies_within_the_window() {
    let mut config = ServiceConfig::default();
    config.input.max_payload_bytes = 8 * 1024 * 1024;
    let mut h = Harness::new(config);
    let base = h.state.dedup_bytes(h.now);
    let mib = "x".repeat(1024 * 1024);
    for i in 0..10 {
        h.run(Command::Put {
            queue: input(),
            item: item(&format!("r{i}"), &mib),
        });
        let reply = h.run(Command::Take {
            queue: input(),
            selector: take_all(),
        });
        assert!(matches!(&reply, Reply::Items(f) if f.len() == 1));
    }
    assert!(h.queue().is_empty());
    let held = h.state.dedup_bytes(h.now);
    assert!(
        held >= base + 10 * 1024 * 1024 + 20 * DEDUP_ENTRY_BYTES,
        "{held}"
    );
    assert!(held < base + 11 * 1024 * 1024, "{held}");
    // The same after a snapshot round trip.
    let bytes = postcard::to_allocvec(&h.state).unwrap();
    let mut restored: QueueState = postcard::from_bytes(&bytes).unwrap();
    restored.rebuild_derived();
    assert_eq!(restored.dedup_bytes(h.now), held);
    // Replies past the byte bound lose their items and stop counting them.
    for i in 0..70 {
        h.run(Command::Put {
            queue: input(),
            item: item(&format!("s{i}"), &mib),
        });
        h.run(Command::Take {
            queue: input(),
            selector: take_all(),
        });
    }
    let full = h.state.dedup_bytes(h.now);
    assert!(
        full <= DEDUP_MAX_REPLY_BYTES + 200 * DEDUP_ENTRY_BYTES,
        "{full}"
    );
    assert!(full > DEDUP_MAX_REPLY_BYTES - 2 * 1024 * 1024, "{full}");
    // Aged out: not counted even before the next command drops them.
    assert_eq!(h.state.dedup_bytes(h.now + DEDUP_WINDOW_MS), 0);
    h.now += DEDUP_WINDOW_MS;
    h.run(Command::Tick);
    assert_eq!(h.state.dedup_bytes(h.now), DEDUP_ENTRY_BYTES);
}

#[test]
fn finding6_complete_refuses_another_requests_input_and_tells_gone_from_duplicate() {
    let mut h = Harness::new(ServiceConfig::default());
    let a = h.put("a", 0);
    let b = h.put("b", 0);
    let complete = |h: &mut Harness, index: u64, rid: &str| {
        h.run(Command::Complete {
            service: "svc".into(),
            group: "eas".into(),
            input_index: index,
            result: Some(item(rid, "out")),
        })
    };
    // Another request's id: nothing written, nothing committed.
    assert_eq!(
        complete(&mut h, a, "r-b"),
        Reply::Rejected(Rejection::RequestMismatch {
            index: a,
            held: "r-a".into(),
            given: "r-b".into()
        })
    );
    let svc = h.state.service("svc").unwrap();
    assert_eq!(svc.input.len(), 2);
    assert!(svc.sink.is_empty());
    // An id that is not a header value.
    assert!(matches!(
        complete(&mut h, a, "bad id"),
        Reply::Rejected(Rejection::Invalid(_))
    ));
    // Input gone (deleted) and no result: refused, result not written.
    h.run(Command::Delete {
        queue: input(),
        indexes: vec![b],
    });
    assert_eq!(
        complete(&mut h, b, "r-b"),
        Reply::Rejected(Rejection::InputGone {
            index: b,
            dead_lettered: false
        })
    );
    assert!(h.state.service("svc").unwrap().sink.is_empty());
    // Completed, then completed again: a duplicate, not an error.
    assert_eq!(
        complete(&mut h, a, "r-a"),
        Reply::Completed {
            sink_index: Some(1),
            duplicate: false
        }
    );
    assert_eq!(
        complete(&mut h, a, "r-a"),
        Reply::Completed {
            sink_index: None,
            duplicate: true
        }
    );
    // A dead-lettered input is reported as such.
    let config = ServiceConfig {
        max_delivery: 1,
        ..Default::default()
    };
    h.run(Command::UpdateService {
        name: "svc".into(),
        config,
    });
    let c = h.put("c", 0);
    h.attach("eas", "u", 9, 1, false);
    h.run(Command::Negative {
        queue: input(),
        group: "eas".into(),
        indexes: vec![c],
        code: String::new(),
        reason: String::new(),
    });
    assert_eq!(
        complete(&mut h, c, "r-c"),
        Reply::Rejected(Rejection::InputGone {
            index: c,
            dead_lettered: true
        })
    );
}
