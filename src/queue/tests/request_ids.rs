//! Request ids, de-duplication of retried commands, and completion (a
//! result written and its input committed in one step).

use crate::protocol::REQUEST_ID_TAG;

use super::*;

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
