//! Decoding bounds: nested batches in commands, replies and snapshots are
//! refused without recursing; a refused command changes nothing.

use super::*;

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

/// The layout items had in snapshots before they were made compact: every
/// tag in one map, `requestId` and `path` included.
#[derive(serde::Serialize, serde::Deserialize)]
struct EarlierItem {
    index: u64,
    request_id: String,
    tags: Tags,
    data: Bytes,
    priority: u32,
    path: String,
    enqueued_ms: u64,
    deliveries: u32,
    message: String,
}

/// Snapshots written before items were compact read back the same, and an
/// item is written in that layout still (replicas and files agree).
#[test]
fn items_keep_their_snapshot_layout() {
    let mut tags = Tags::new();
    tags.insert("a".into(), "1".into());
    tags.insert(crate::protocol::REQUEST_ID_TAG.into(), "rid".into());
    tags.insert(crate::protocol::PATH_TAG.into(), "/v1/run".into());
    tags.insert("z".into(), "26".into());
    let earlier = EarlierItem {
        index: 7,
        request_id: "rid".into(),
        tags: tags.clone(),
        data: Bytes::from_static(b"payload"),
        priority: 3,
        path: "/v1/run".into(),
        enqueued_ms: 1_234,
        deliveries: 2,
        message: "500: model crashed".into(),
    };
    let bytes = postcard::to_allocvec(&earlier).unwrap();
    let item: Item = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(item.index, 7);
    assert_eq!(item.request_id.to_string(), "rid");
    assert_eq!(item.tags(), tags);
    assert_eq!(item.tag("a"), Some("1"));
    assert_eq!(item.tag("z"), Some("26"));
    assert_eq!(item.tag("b"), None);
    assert_eq!(item.path(), "/v1/run");
    assert_eq!(item.message(), "500: model crashed");
    assert_eq!(
        (item.priority, item.deliveries, item.enqueued_ms),
        (3, 2, 1_234)
    );
    assert_eq!(postcard::to_allocvec(&item).unwrap(), bytes);
    // Without a path, a `path` tag is an ordinary tag, as it was.
    let plain = EarlierItem {
        path: String::new(),
        message: String::new(),
        ..earlier
    };
    let bytes = postcard::to_allocvec(&plain).unwrap();
    let item: Item = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(item.tag(crate::protocol::PATH_TAG), Some("/v1/run"));
    assert_eq!(item.path(), "");
    assert_eq!(postcard::to_allocvec(&item).unwrap(), bytes);
}
