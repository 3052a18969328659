//! Coalesced entries: envelopes gathered by the leader into one log entry
//! are applied exactly as they would be one entry each, and the shape is
//! bounded when decoded.

use super::*;

fn envelope(id: u128, now_ms: u64, command: Command) -> Envelope {
    Envelope {
        id,
        now_ms,
        command,
    }
}

/// A day of commands on service "svc": puts, a consumer, a take, a
/// commit, a duplicate put and a refused put.
fn commands() -> Vec<Command> {
    let consumer = ConsumerSpec {
        group: "g".into(),
        user: "u".into(),
        node: 1,
        connection: 7,
        window: 2,
        auto_commit: false,
        index_only: false,
        tags: Tags::new(),
        start_index: Some(0),
    };
    let put = |rid: &str| Command::Put {
        queue: input(),
        item: item(rid, rid),
    };
    vec![
        Command::CreateService {
            name: "svc".into(),
            config: ServiceConfig::default(),
        },
        put("a"),
        put("b"),
        Command::Attach {
            queue: input(),
            consumer,
        },
        put("c"),
        Command::Commit {
            queue: input(),
            group: "g".into(),
            indexes: vec![1],
        },
        Command::Take {
            queue: input(),
            selector: take_all(),
        },
        put("a"),
        Command::Put {
            queue: QueueRef::new("nope", QueueKind::Input),
            item: item("x", "x"),
        },
    ]
}

#[test]
fn a_coalesced_entry_applies_exactly_like_its_envelopes_one_entry_each() {
    let envelopes: Vec<Envelope> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, c)| envelope(100 + i as u128, 5_000 + i as u64, c))
        .collect();
    let mut alone = QueueState::new();
    let mut alone_replies = Vec::new();
    let mut alone_events = Vec::new();
    for e in &envelopes {
        let (reply, events) = alone.apply(e);
        alone_replies.push(reply);
        alone_events.extend(events);
    }
    // The same envelopes in three entries of 1, 5 and 3.
    let mut together = QueueState::new();
    let mut together_replies = Vec::new();
    let mut together_events = Vec::new();
    for (n, group) in [&envelopes[..1], &envelopes[1..6], &envelopes[6..]]
        .into_iter()
        .enumerate()
    {
        let outer = envelope(1_000 + n as u128, 0, Command::Coalesced(group.to_vec()));
        let (reply, events) = together.apply(&outer);
        match reply {
            Reply::Coalesced(replies) => {
                assert_eq!(replies.len(), group.len());
                together_replies.extend(replies);
            }
            other => panic!("a coalesced entry answered {other:?}"),
        }
        together_events.extend(events);
    }
    assert_eq!(together_replies, alone_replies);
    assert_eq!(together_events, alone_events);
    assert_eq!(
        together, alone,
        "the states are equal, de-duplication table included"
    );
    assert!(
        matches!(alone_replies[6], Reply::Items(ref f) if !f.is_empty()),
        "the take took items: {:?}",
        alone_replies[6]
    );
}

#[test]
fn an_envelope_retried_alone_after_its_coalesced_entry_is_applied_once() {
    let mut state = QueueState::new();
    let put = envelope(
        11,
        5_000,
        Command::Put {
            queue: input(),
            item: item("r1", "one"),
        },
    );
    let create = envelope(
        10,
        5_000,
        Command::CreateService {
            name: "svc".into(),
            config: ServiceConfig::default(),
        },
    );
    let (reply, _) = state.apply(&envelope(
        1,
        5_000,
        Command::Coalesced(vec![create, put.clone()]),
    ));
    let Reply::Coalesced(replies) = reply else {
        panic!("{reply:?}")
    };
    let before = state.clone();
    let (again, events) = state.apply(&put);
    assert_eq!(again, replies[1]);
    assert!(events.is_empty());
    assert_eq!(state, before, "the retry changed nothing");
    assert_eq!(state.queue(&input()).unwrap().len(), 1);
}

#[test]
fn coalesced_entries_never_nest_when_applied_or_inside_a_batch() {
    let mut h = Harness::new(ServiceConfig::default());
    let inner = envelope(50, 1_000, Command::Coalesced(vec![]));
    let put = envelope(
        51,
        1_000,
        Command::Put {
            queue: input(),
            item: item("p", "p"),
        },
    );
    let (reply, _) = h
        .state
        .apply(&envelope(52, 1_000, Command::Coalesced(vec![inner, put])));
    let Reply::Coalesced(replies) = reply else {
        panic!("{reply:?}")
    };
    assert!(matches!(replies[0], Reply::Rejected(Rejection::Invalid(_))));
    assert!(
        matches!(replies[1], Reply::Put { .. }),
        "the rest is applied"
    );
    let batch = h.run(Command::Batch(vec![Command::Coalesced(vec![])]));
    assert!(
        matches!(&batch, Reply::Batch(r) if matches!(r[0], Reply::Rejected(Rejection::Invalid(_)))),
        "{batch:?}"
    );
}

#[test]
fn a_coalesced_entry_holds_batches_but_no_coalesced_entry_when_decoded() {
    let tick = |id| envelope(id, 1, Command::Tick);
    let batch = envelope(2, 1, Command::Batch(vec![Command::Tick]));
    let flat = Command::Coalesced(vec![tick(1), batch]);
    let bytes = postcard::to_allocvec(&flat).unwrap();
    assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), flat);
    assert!(!flat.has_nested_batch());

    let nested = Command::Coalesced(vec![envelope(3, 1, flat.clone())]);
    assert!(nested.has_nested_batch());
    let bytes = postcard::to_allocvec(&nested).unwrap();
    assert!(postcard::from_bytes::<Command>(&bytes).is_err());

    let in_batch = Command::Batch(vec![flat.clone()]);
    assert!(in_batch.has_nested_batch());
    let bytes = postcard::to_allocvec(&in_batch).unwrap();
    assert!(postcard::from_bytes::<Command>(&bytes).is_err());

    // The markers were reset: the flat one still decodes.
    let bytes = postcard::to_allocvec(&flat).unwrap();
    assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), flat);
}

#[test]
fn the_replies_of_a_coalesced_entry_are_never_encoded() {
    assert!(postcard::to_allocvec(&Reply::Coalesced(vec![Reply::Done])).is_err());
}

/// The commands that end or give back a consumer's work travel in their
/// own lane into the log (and to the leader), apart from puts: a commit, a
/// negative commit, a completion, a detach; nothing that adds work.
#[test]
fn only_the_end_of_a_consumers_work_takes_the_release_lane() {
    let commit = Command::Commit {
        queue: input(),
        group: "g".into(),
        indexes: vec![1],
    };
    let negative = Command::Negative {
        queue: input(),
        group: "g".into(),
        indexes: vec![1],
        code: "c".into(),
        reason: "r".into(),
    };
    let complete = Command::Complete {
        service: "svc".into(),
        group: "g".into(),
        input_index: 1,
        result: None,
    };
    let detach = Command::Detach {
        queue: input(),
        group: "g".into(),
        user: "u".into(),
        connection: 1,
    };
    for releases in [&commit, &negative, &complete, &detach] {
        assert!(releases.releases_work(), "{releases:?}");
    }
    let put = Command::Put {
        queue: input(),
        item: NewItem {
            request_id: "r".into(),
            tags: Tags::new(),
            data: bytes::Bytes::from_static(b"x"),
            priority: 0,
            path: String::new(),
        },
    };
    assert!(!put.releases_work());
    assert!(!Command::Tick.releases_work());
    assert!(
        !Command::Batch(vec![commit]).releases_work(),
        "a batch goes with the rest"
    );
}
