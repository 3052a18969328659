//! A property test of the delivery rules against a reference model:
//! random puts, attaches, detaches, commits, hand-backs, deletes, takes,
//! clock advances and node losses, applied to the state and to a model of
//! what a client can observe. After every step: no item is handed to two
//! consumers of a group, none is redelivered after its group committed it,
//! none moves away from a live consumer, windows hold, dispatch leaves no
//! free slot beside a ready item, and no item vanishes; at the end the
//! state survives a snapshot round trip.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

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
        2 => (0u8..2, 0u8..3, prop::bool::weighted(0.3)).prop_map(|(group, user, tagged)| Op::Attach { group, user, tagged }),
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
    /// The connection id the next attach uses.
    next_connection: u64,
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
        let mut model = Model { next_connection: 100, ..Model::default() };
        for op in ops {
            step(&mut h, &mut model, &op)?;
            check_step(&mut h, &mut model)?;
        }
        check_snapshot_round_trip(&h)?;
    }
}

/// Apply `op` to the state, and what a client learns from it to the model.
fn step(h: &mut Harness, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match op.clone() {
        Op::Put { priority, tagged } => {
            let mut tags = Tags::new();
            if tagged {
                tags.insert("k".into(), "v".into());
            }
            let item = NewItem {
                request_id: format!("r{}", h.next_id),
                tags,
                data: Bytes::from_static(b"d"),
                priority,
                path: String::new(),
            };
            if let Reply::Put { index, .. } = h.run(Command::Put {
                queue: input(),
                item,
            }) {
                prop_assert!(model.live.iter().all(|i| *i < index));
                model.live.insert(index);
            }
        }
        Op::Attach {
            group,
            user,
            tagged,
        } => {
            model.next_connection += 1;
            let (g, u) = (format!("g{group}"), format!("u{user}"));
            let mut tags = Tags::new();
            if tagged {
                tags.insert("k".into(), "v".into());
            }
            // A group keeps the filter of its first consumer; a later one
            // filters the same, or narrower (k=v in an untagged group).
            if let Some(gr) = h.queue().groups.get(&g)
                && !(gr.tags.is_empty() && tagged)
            {
                tags = gr.tags.clone();
            }
            // User 2 watches with auto-commit: its node commits what it wrote.
            let spec = ConsumerSpec {
                group: g.clone(),
                user: u.clone(),
                node: 1 + u64::from(user % 2),
                connection: model.next_connection,
                window: window_of(user),
                auto_commit: user == 2,
                index_only: false,
                tags,
                start_index: Some(0),
            };
            model
                .connections
                .insert(model.next_connection, (g.clone(), u.clone()));
            // A takeover moves what the old connection held to the new one.
            for ((hg, _), conn) in model.holder.iter_mut() {
                if *hg == g && model.connections.get(conn).is_some_and(|(_, cu)| *cu == u) {
                    *conn = model.next_connection;
                }
            }
            h.run(Command::Attach {
                queue: input(),
                consumer: spec,
            });
        }
        Op::Detach { group, user } => {
            let (g, u) = (format!("g{group}"), format!("u{user}"));
            if let Some(c) = h.queue().groups.get(&g).and_then(|gr| gr.consumers.get(&u)) {
                let connection = c.connection;
                h.run(Command::Detach {
                    queue: input(),
                    group: g,
                    user: u,
                    connection,
                });
            }
        }
        Op::Commit { group, pick } | Op::Negative { group, pick } => {
            let g = format!("g{group}");
            let held: Vec<u64> = model
                .holder
                .keys()
                .filter(|(hg, _)| *hg == g)
                .map(|(_, i)| *i)
                .collect();
            if held.is_empty() {
                return Ok(());
            }
            let index = held[pick % held.len()];
            if matches!(op, Op::Commit { .. }) {
                model.holder.remove(&(g.clone(), index));
                model.committed.insert((g.clone(), index));
                h.run(Command::Commit {
                    queue: input(),
                    group: g,
                    indexes: vec![index],
                });
            } else {
                model.holder.remove(&(g.clone(), index));
                h.run(Command::Negative {
                    queue: input(),
                    group: g,
                    indexes: vec![index],
                    // A message, or none: a later empty one clears it.
                    code: if pick % 2 == 0 {
                        String::new()
                    } else {
                        "500".into()
                    },
                    reason: String::new(),
                });
            }
        }
        Op::Delete { pick } => {
            if model.live.is_empty() {
                return Ok(());
            }
            let index = *model.live.iter().nth(pick % model.live.len()).unwrap();
            model.live.remove(&index);
            model.holder.retain(|(_, i), _| *i != index);
            h.run(Command::Delete {
                queue: input(),
                indexes: vec![index],
            });
        }
        Op::Advance { ms } => {
            h.now += ms;
            h.run(Command::Tick);
        }
        Op::NodeGone => {
            h.run(Command::NodeGone { node: 2 });
        }
        Op::Take => {
            if let Reply::Items(frames) = h.run(Command::Take {
                queue: input(),
                selector: Selector {
                    from_index: Some(0),
                    length: 1,
                    tags: Tags::new(),
                },
            }) {
                for f in frames {
                    model.live.remove(&f.index);
                    model.holder.retain(|(_, i), _| *i != f.index);
                }
            }
        }
    }
    Ok(())
}

/// After a step: forget what the state took back, learn the deliveries,
/// and check the delivery rules and the state against the model.
fn check_step(h: &mut Harness, model: &mut Model) -> Result<(), TestCaseError> {
    let queue = h.queue().clone();
    forget_taken_back(&queue, model)?;
    learn_deliveries(std::mem::take(&mut h.events), model)?;
    check_state(&queue, model)
}

/// Requeues (grace expiry, node loss) drop holdings the model must forget;
/// an item may move away from its holder only once the holder left.
fn forget_taken_back(queue: &Queue, model: &mut Model) -> Result<(), TestCaseError> {
    let mut stale = Vec::new();
    for ((g, i), conn) in &model.holder {
        let user = &model.connections[conn].1;
        match queue.groups.get(g).and_then(|gr| gr.in_flight.get(i)) {
            Some(now_holder) if now_holder == user => {}
            Some(_) => {
                // Moved to another consumer: only allowed once the
                // holder is gone from the group.
                let still_there = queue.groups[g].consumers.contains_key(user);
                prop_assert!(
                    !still_there,
                    "item {} moved away from live consumer {}",
                    i,
                    user
                );
                stale.push((g.clone(), *i));
            }
            None => stale.push((g.clone(), *i)),
        }
    }
    for key in stale {
        model.holder.remove(&key);
    }
    Ok(())
}

/// Deliveries: never of an item the group committed, never to two holders.
fn learn_deliveries(events: Vec<Event>, model: &mut Model) -> Result<(), TestCaseError> {
    for e in events {
        if let Event::Deliver {
            connection, frame, ..
        } = e
        {
            let (g, _) = model.connections[&connection].clone();
            prop_assert!(
                !model.committed.contains(&(g.clone(), frame.index)),
                "committed item {} redelivered to {}",
                frame.index,
                g
            );
            if let Some(other) = model.holder.get(&(g.clone(), frame.index)) {
                prop_assert_eq!(
                    *other,
                    connection,
                    "item {} held by two consumers of {}",
                    frame.index,
                    g
                );
            }
            model.holder.insert((g, frame.index), connection);
        }
    }
    Ok(())
}

/// The state matches the model: what each consumer holds, within its
/// window; dispatch leaves no free slot beside a ready item; no item lost.
fn check_state(queue: &Queue, model: &Model) -> Result<(), TestCaseError> {
    for (gid, group) in &queue.groups {
        if let Err(e) = group.check_ready_sets(&queue.items) {
            return Err(TestCaseError::fail(format!("group {gid}: {e}")));
        }
        for (uid, c) in &group.consumers {
            let held = group.in_flight.values().filter(|u| *u == uid).count() as u32;
            prop_assert_eq!(c.pending, held);
            let held_bytes: u64 = group
                .in_flight
                .iter()
                .filter(|(_, u)| *u == uid)
                .map(|(i, _)| queue.items[i].held_bytes())
                .sum();
            prop_assert_eq!(c.pending_bytes, held_bytes);
            let window = if c.auto_commit {
                AUTO_COMMIT_WINDOW
            } else {
                c.window
            };
            prop_assert!(
                c.pending <= window,
                "{}.{} holds {} > window {}",
                gid,
                uid,
                c.pending,
                window
            );
        }
        for (index, uid) in &group.in_flight {
            let conn = model.holder.get(&(gid.clone(), *index));
            prop_assert!(
                conn.is_some(),
                "in flight {} in {} unknown to the model",
                index,
                gid
            );
            prop_assert_eq!(&model.connections[conn.unwrap()].1, uid);
        }
        // Dispatch is work-conserving: no running consumer with a free
        // slot sits beside a ready item it accepts.
        for (uid, c) in &group.consumers {
            if c.has_free_slot() {
                let idle_item = queue.items.values().find(|it| {
                    it.matches(&group.tags)
                        && it.matches(&c.tags)
                        && !group.in_flight.contains_key(&it.index)
                        && !group.acked.contains(&it.index)
                });
                prop_assert!(
                    idle_item.is_none(),
                    "{}.{} idle beside item {:?}",
                    gid,
                    uid,
                    idle_item.map(|i| i.index)
                );
            }
        }
    }
    // No item lost: every live index is stored, or consumed by a group.
    for index in &model.live {
        let stored = queue.items.contains_key(index) || queue.dead.contains_key(index);
        let consumed = model.committed.iter().any(|(_, i)| i == index);
        prop_assert!(stored || consumed, "item {} vanished", index);
    }
    Ok(())
}

/// Determinism and the snapshot round trip: the encoded state decodes to
/// an equal state, and the copy a snapshot is written from encodes the same.
fn check_snapshot_round_trip(h: &Harness) -> Result<(), TestCaseError> {
    let bytes = postcard::to_allocvec(&h.state).unwrap();
    prop_assert_eq!(
        &postcard::to_allocvec(&h.state.snapshot_copy()).unwrap(),
        &bytes
    );
    let mut restored: QueueState = postcard::from_bytes(&bytes).unwrap();
    restored.rebuild_derived();
    prop_assert_eq!(restored, h.state.clone());
    Ok(())
}
