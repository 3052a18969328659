//! Tests of the byte and dead-letter limits: refusal, eviction, the derived
//! byte count, the dead-letter cap and purge.

use proptest::prelude::*;

use super::*;

impl Harness {
    /// Attach a consumer, negatively commit what it gets until every item
    /// it is handed is dead-lettered (`max_delivery` 1: one refusal each).
    fn dead_letter_all(&mut self, connection: u64) {
        let consumer = ConsumerSpec {
            group: "g".into(),
            user: "u".into(),
            node: 1,
            connection,
            window: 1000,
            auto_commit: false,
            index_only: true,
            tags: Tags::new(),
            start_index: Some(0),
        };
        self.run(Command::Attach {
            queue: input(),
            consumer,
        });
        let held: Vec<u64> = self.queue().groups["g"].in_flight.keys().copied().collect();
        self.run(Command::Negative {
            queue: input(),
            group: "g".into(),
            indexes: held,
            code: "500".into(),
            reason: "boom".into(),
        });
    }
}

/// The byte count a queue should have: the sum of what it stores.
fn summed_bytes(q: &Queue) -> u64 {
    q.items
        .values()
        .chain(q.dead.values())
        .map(|it| it.data.len() as u64)
        .sum()
}

fn limits(max_bytes: u64, evict_oldest: bool) -> QueueLimits {
    QueueLimits {
        max_length: 1_000,
        max_payload_bytes: max_bytes.min(100),
        evict_oldest,
        max_bytes,
        max_dead_letters: 1_000,
    }
}

#[test]
fn a_put_past_max_bytes_is_refused_and_changes_nothing() {
    let mut h = Harness::with_input_limits(limits(100, false), 5);
    assert!(matches!(h.put_sized(60), Reply::Put { index: 1, .. }));
    assert!(matches!(h.put_sized(40), Reply::Put { index: 2, .. }));
    let before = h.state.clone();
    assert_eq!(
        h.put_sized(1),
        Reply::Rejected(Rejection::FullBytes { limit: 100 })
    );
    // Only the dedup table moved; the queue is as it was.
    assert_eq!(h.queue(), before.queue(&input()).unwrap());
    assert_eq!(h.queue().bytes_held(), 100);
    h.run(Command::Delete {
        queue: input(),
        indexes: vec![1],
    });
    assert_eq!(h.queue().bytes_held(), 40);
    assert!(matches!(h.put_sized(60), Reply::Put { index: 3, .. }));
}

#[test]
fn evicting_queues_drop_the_oldest_items_to_make_room() {
    let mut h = Harness::with_input_limits(limits(100, true), 5);
    for _ in 0..4 {
        h.put_sized(30);
    }
    // 4 × 30 > 100: the first item went to make room for the fourth.
    assert_eq!(
        h.queue().items.keys().copied().collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert!(matches!(h.put_sized(100), Reply::Put { index: 5, .. }));
    assert_eq!(h.queue().items.keys().copied().collect::<Vec<_>>(), [5]);
    assert_eq!(h.queue().bytes_held(), 100);
}

#[test]
fn evicting_queues_drop_dead_letters_before_items() {
    let mut h = Harness::with_input_limits(limits(100, true), 1);
    h.put_sized(40);
    h.put_sized(40);
    h.dead_letter_all(7);
    assert_eq!(h.queue().dead.len(), 2);
    assert!(h.queue().items.is_empty());
    h.run(Command::Detach {
        queue: input(),
        group: "g".into(),
        user: "u".into(),
        connection: 7,
    });
    h.put_sized(10); // index 3, 90 bytes held
    h.put_sized(30); // needs one dead letter gone: the oldest (index 1)
    assert_eq!(h.queue().dead.keys().copied().collect::<Vec<_>>(), [2]);
    assert_eq!(h.queue().items.keys().copied().collect::<Vec<_>>(), [3, 4]);
    assert_eq!(h.queue().dead_dropped_total, 1);
    assert_eq!(h.queue().bytes_held(), summed_bytes(h.queue()));
}

#[test]
fn a_payload_larger_than_max_bytes_evicts_nothing() {
    // Validation keeps max_payload_bytes within max_bytes; the queue still
    // refuses such a put before evicting anything.
    let lim = QueueLimits {
        max_payload_bytes: 1_000,
        ..limits(100, true)
    };
    assert!(lim.validate("input").is_err());
    let mut q = Queue::new();
    let mut events = Vec::new();
    let item = |size| NewItem {
        request_id: format!("r{size}"),
        tags: Tags::new(),
        data: Bytes::from(vec![b'x'; size]),
        priority: 0,
        path: String::new(),
    };
    q.put(&input(), &lim, item(50), 0, &mut events).unwrap();
    let before = q.clone();
    assert_eq!(
        q.put(&input(), &lim, item(101), 0, &mut events),
        Err(Rejection::FullBytes { limit: 100 })
    );
    assert_eq!(q, before);
}

#[test]
fn settings_out_of_range_are_refused() {
    let mut h = Harness::with_input_limits(QueueLimits::default(), 5);
    let bad = [
        QueueLimits {
            max_bytes: 0,
            ..QueueLimits::default()
        },
        QueueLimits {
            max_payload_bytes: 2 << 30,
            ..QueueLimits::default()
        },
        QueueLimits {
            max_dead_letters: MAX_DEAD_LETTERS_CEILING + 1,
            ..QueueLimits::default()
        },
        // Must fit one replication message with room to spare.
        QueueLimits {
            max_payload_bytes: MAX_PAYLOAD_CEILING + 1,
            max_bytes: 1 << 40,
            ..QueueLimits::default()
        },
        QueueLimits {
            max_payload_bytes: 0,
            ..QueueLimits::default()
        },
    ];
    for limits in bad {
        let reply = h.run(Command::CreateService {
            name: "svc".into(),
            config: ServiceConfig {
                sink: limits.clone(),
                ..Default::default()
            },
        });
        assert!(
            matches!(reply, Reply::Rejected(Rejection::Invalid(_))),
            "{limits:?} accepted: {reply:?}"
        );
    }
    for config in [
        ServiceConfig {
            consumer_grace_ms: u64::MAX,
            ..Default::default()
        },
        ServiceConfig {
            token: "t".repeat(MAX_TOKEN_BYTES + 1),
            ..Default::default()
        },
    ] {
        let reply = h.run(Command::UpdateService {
            name: "svc".into(),
            config,
        });
        assert!(
            matches!(reply, Reply::Rejected(Rejection::Invalid(_))),
            "{reply:?}"
        );
    }
    assert_eq!(
        h.state.service("svc").unwrap().config,
        ServiceConfig {
            input: QueueLimits::default(),
            max_delivery: 5,
            ..Default::default()
        }
    );
}

#[test]
fn dead_letters_are_capped_oldest_first_and_purgeable() {
    let mut h = Harness::with_input_limits(
        QueueLimits {
            max_dead_letters: 3,
            ..limits(10_000, false)
        },
        1,
    );
    for _ in 0..5 {
        h.put_sized(10);
    }
    h.dead_letter_all(7);
    assert_eq!(
        h.queue().dead.keys().copied().collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!(h.queue().dead_dropped_total, 2);
    assert_eq!(h.queue().bytes_held(), 30);
    // Lowering the cap trims at once.
    let config = ServiceConfig {
        input: QueueLimits {
            max_dead_letters: 1,
            ..limits(10_000, false)
        },
        max_delivery: 1,
        ..Default::default()
    };
    h.run(Command::UpdateService {
        name: "svc".into(),
        config,
    });
    assert_eq!(h.queue().dead.keys().copied().collect::<Vec<_>>(), [5]);
    assert_eq!(
        h.run(Command::PurgeDeadLetters { queue: input() }),
        Reply::Done
    );
    assert!(h.queue().dead.is_empty());
    assert_eq!(h.queue().bytes_held(), 0);
    assert_eq!(h.queue().dead_dropped_total, 5);
    assert_eq!(
        h.run(Command::PurgeDeadLetters {
            queue: QueueRef::new("nope", QueueKind::Input)
        }),
        Reply::Rejected(Rejection::NoSuchService("nope".into()))
    );
}

#[derive(Debug, Clone)]
enum Op {
    Put { size: usize },
    Delete { pick: usize },
    Take,
    Truncate { pick: usize },
    DeadLetterAll,
    Purge,
    Evicting(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..=40).prop_map(|size| Op::Put { size }),
        2 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        1 => Just(Op::Take),
        1 => any::<usize>().prop_map(|pick| Op::Truncate { pick }),
        1 => Just(Op::DeadLetterAll),
        1 => Just(Op::Purge),
        1 => any::<bool>().prop_map(Op::Evicting),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// After any sequence: the byte count is the sum of what is stored, it
    /// stays within max_bytes, dead letters stay within their cap, and the
    /// count survives a snapshot round trip.
    #[test]
    fn byte_count_is_exact_and_bounded(ops in prop::collection::vec(op(), 1..120)) {
        let max_bytes = 100;
        let mut lim = QueueLimits { max_dead_letters: 4, ..limits(max_bytes, false) };
        let mut h = Harness::with_input_limits(lim.clone(), 1);
        let mut connection = 10;
        for op in ops {
            match op {
                Op::Put { size } => {
                    let before = h.queue().clone();
                    let fits = before.bytes_held() + size as u64 <= max_bytes;
                    match h.put_sized(size) {
                        Reply::Put { .. } => prop_assert!(fits || lim.evict_oldest),
                        Reply::Rejected(Rejection::FullBytes { .. }) => {
                            prop_assert!(!fits && !lim.evict_oldest);
                            prop_assert_eq!(h.queue(), &before);
                        }
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                Op::Delete { pick } => {
                    let keys: Vec<u64> = h.queue().items.keys().copied().collect();
                    if keys.is_empty() { continue; }
                    h.run(Command::Delete { queue: input(), indexes: vec![keys[pick % keys.len()]] });
                }
                Op::Take => {
                    h.run(Command::Take { queue: input(), selector: Selector { from_index: Some(0), length: 2, tags: Tags::new() } });
                }
                Op::Truncate { pick } => {
                    let before = h.queue().next_index;
                    h.run(Command::Truncate { queue: input(), before: (pick as u64) % (before + 1) });
                }
                Op::DeadLetterAll => {
                    connection += 1;
                    h.dead_letter_all(connection);
                    h.run(Command::Detach { queue: input(), group: "g".into(), user: "u".into(), connection });
                }
                Op::Purge => { h.run(Command::PurgeDeadLetters { queue: input() }); }
                Op::Evicting(on) => {
                    lim.evict_oldest = on;
                    let config = ServiceConfig { input: lim.clone(), max_delivery: 1, ..Default::default() };
                    h.run(Command::UpdateService { name: "svc".into(), config });
                }
            }
            let q = h.queue();
            prop_assert_eq!(q.bytes_held(), summed_bytes(q));
            prop_assert!(q.bytes_held() <= max_bytes);
            prop_assert!(q.dead.len() as u64 <= lim.max_dead_letters);
            prop_assert_eq!(h.state.payload_bytes_held(), q.bytes_held());
        }
        let bytes = postcard::to_allocvec(&h.state).unwrap();
        let mut restored: QueueState = postcard::from_bytes(&bytes).unwrap();
        restored.rebuild_derived();
        prop_assert_eq!(restored.queue(&input()).unwrap().bytes_held(), h.queue().bytes_held());
        prop_assert_eq!(restored, h.state.clone());
    }
}

#[test]
fn requeued_dead_letters_are_new_items_with_their_request_ids_within_the_limits() {
    let mut h = Harness::with_input_limits(
        QueueLimits {
            max_length: 3,
            ..limits(10_000, false)
        },
        1,
    );
    for _ in 0..3 {
        h.put_sized(10);
    }
    h.dead_letter_all(7);
    let ids: Vec<String> = h
        .queue()
        .dead
        .values()
        .map(|it| it.request_id.to_string())
        .collect();
    assert_eq!(h.queue().dead.len(), 3);
    // One named dead letter; unknown indexes are ignored.
    // Naming one that is not there refuses the whole request.
    let reply = h.run(Command::RequeueDeadLetters {
        queue: input(),
        indexes: vec![2, 99],
    });
    assert!(
        matches!(reply, Reply::Rejected(Rejection::Invalid(_))),
        "{reply:?}"
    );
    assert_eq!(h.queue().dead.len(), 3);
    let reply = h.run(Command::RequeueDeadLetters {
        queue: input(),
        indexes: vec![2],
    });
    let Reply::Items(frames) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(frames.iter().map(|f| f.index).collect::<Vec<_>>(), [4]);
    assert!(frames[0].data.is_empty(), "replies carry no payloads");
    let again = h.queue().items.get(&4).unwrap();
    assert_eq!(
        (again.request_id.to_string(), again.data.len()),
        (ids[1].clone(), 10)
    );
    assert_eq!(h.queue().dead.keys().copied().collect::<Vec<_>>(), [1, 3]);
    assert_eq!(h.queue().bytes_held(), 30, "moved, not copied");
    // The consumer is still attached: the requeued item is delivered afresh
    // (its delivery count starts again).
    assert_eq!(h.queue().items[&4].deliveries, 1);
    // Fill the queue to its length limit: requeueing all of them stops at
    // the first refusal, and those left stay dead letters.
    h.put_sized(10);
    h.put_sized(10);
    assert_eq!(h.queue().len(), 3);
    let reply = h.run(Command::RequeueDeadLetters {
        queue: input(),
        indexes: vec![],
    });
    assert_eq!(reply, Reply::Rejected(Rejection::Full(3)));
    assert_eq!(h.queue().dead.keys().copied().collect::<Vec<_>>(), [1, 3]);
    assert_eq!(h.queue().bytes_held(), 50);
    h.commit("g", vec![4, 5, 6]);
    let reply = h.run(Command::RequeueDeadLetters {
        queue: input(),
        indexes: vec![],
    });
    let Reply::Items(frames) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(frames.len(), 2);
    assert!(h.queue().dead.is_empty());
    let mut requeued: Vec<String> = h
        .queue()
        .items
        .values()
        .map(|it| it.request_id.to_string())
        .collect();
    requeued.sort();
    let mut expected = vec![ids[0].clone(), ids[2].clone()];
    expected.sort();
    assert_eq!(requeued, expected);
    assert_eq!(
        h.run(Command::RequeueDeadLetters {
            queue: QueueRef::new("nope", QueueKind::Input),
            indexes: vec![],
        }),
        Reply::Rejected(Rejection::NoSuchService("nope".into()))
    );
}

#[test]
fn requeueing_dead_letters_never_evicts_and_skips_request_ids_put_anew() {
    let mut h = Harness::with_input_limits(
        QueueLimits {
            max_length: 2,
            ..limits(10_000, true)
        },
        1,
    );
    h.put_sized(10);
    h.put_sized(10);
    h.dead_letter_all(7);
    let dead: Vec<String> = h
        .queue()
        .dead
        .values()
        .map(|it| it.request_id.to_string())
        .collect();
    h.put_sized(10);
    h.put_sized(10);
    let live: Vec<u64> = h.queue().items.keys().copied().collect();
    assert_eq!(live, [3, 4]);
    // The queue is full and evicts for puts, never for a requeue.
    let reply = h.run(Command::RequeueDeadLetters {
        queue: input(),
        indexes: vec![],
    });
    assert_eq!(reply, Reply::Rejected(Rejection::Full(2)));
    assert_eq!(h.queue().items.keys().copied().collect::<Vec<_>>(), live);
    assert_eq!(h.queue().dead.len(), 2);
    // The client put the first request again: that dead letter stays.
    h.commit("g", live);
    let again = NewItem {
        request_id: dead[0].clone(),
        tags: Tags::new(),
        data: Bytes::from_static(b"again"),
        priority: 0,
        path: String::new(),
    };
    assert!(matches!(
        h.run(Command::Put {
            queue: input(),
            item: again
        }),
        Reply::Put { index: 5, .. }
    ));
    let Reply::Items(frames) = h.run(Command::RequeueDeadLetters {
        queue: input(),
        indexes: vec![],
    }) else {
        panic!("requeue refused")
    };
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].tags["requestId"], dead[1]);
    assert_eq!(
        h.queue()
            .dead
            .values()
            .map(|it| it.request_id.to_string())
            .collect::<Vec<_>>(),
        [dead[0].clone()]
    );
    assert_eq!(h.queue().bytes_held(), summed_bytes(h.queue()));
    // Naming the one whose request was put again is refused.
    let skipped = *h.queue().dead.keys().next().unwrap();
    assert!(matches!(
        h.run(Command::RequeueDeadLetters {
            queue: input(),
            indexes: vec![skipped],
        }),
        Reply::Rejected(Rejection::Invalid(_))
    ));
    // Naming a dead letter that is not there is refused.
    assert!(matches!(
        h.run(Command::RequeueDeadLetters {
            queue: input(),
            indexes: vec![42],
        }),
        Reply::Rejected(Rejection::Invalid(_))
    ));
}
