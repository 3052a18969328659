//! What a stored item costs in memory, counted by the allocator the node
//! runs (jemalloc, in its size classes) for the allocations of this test's
//! thread. The node's memory admission charges
//! [`crate::api::ITEM_OVERHEAD_BYTES`] per item on top of its payload; this
//! keeps the state's part of that honest.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

use tikv_jemallocator::Jemalloc;

use super::*;

/// jemalloc, counting the usable bytes each thread holds.
struct Counting;

thread_local! {
    static HELD: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    // Ignored while the thread's locals are being torn down.
    let _ = HELD.try_with(|h| h.set(h.get() + delta));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { Jemalloc.alloc(layout) };
        if !p.is_null() {
            count(unsafe { tikv_jemallocator::usable_size(p) } as i64);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        count(-(unsafe { tikv_jemallocator::usable_size(p) } as i64));
        unsafe { Jemalloc.dealloc(p, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { Jemalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            count(unsafe { tikv_jemallocator::usable_size(p) } as i64);
        }
        p
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let before = unsafe { tikv_jemallocator::usable_size(p) } as i64;
        let q = unsafe { Jemalloc.realloc(p, layout, new_size) };
        if !q.is_null() {
            count(unsafe { tikv_jemallocator::usable_size(q) } as i64 - before);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> i64 {
    HELD.with(Cell::get)
}

/// Bytes the state holds per item beyond the payloads, after `items` puts
/// of `size`-byte payloads with UUID request ids (as a node assigns them)
/// or, `traced`, with a client's request id and a `traceparent` tag; and
/// what the state reports of them for admission ([`Queue::meta_bytes_held`]
/// per item).
fn overhead_per_item(items: usize, size: usize, with_group: bool, traced: bool) -> (i64, i64) {
    let mut h = Harness::with_input_limits(
        QueueLimits {
            max_length: u64::MAX,
            max_bytes: u64::MAX,
            ..QueueLimits::default()
        },
        0,
    );
    if with_group {
        // A group whose only consumer is busy: every item waits in its
        // ready set.
        h.attach("eas", "busy", 1, 1, false);
    }
    let before = held();
    // Payloads exactly sized, as a decoded log entry's are; the request ids
    // move into the items.
    let payloads: Vec<Bytes> = (0..items)
        .map(|i| Bytes::from(vec![(i % 251) as u8; size]))
        .collect();
    let ids: Vec<String> = (0..items)
        .map(|i| {
            if traced {
                format!("client-request-{i:08}-of-the-benchmark")
            } else {
                uuid::Uuid::new_v4().to_string()
            }
        })
        .collect();
    for (data, request_id) in payloads.into_iter().zip(ids) {
        let reply = h.run(Command::Put {
            queue: input(),
            item: NewItem {
                request_id,
                tags: if traced {
                    let mut tags = Tags::new();
                    tags.insert(
                        "traceparent".into(),
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                    );
                    tags
                } else {
                    Tags::new()
                },
                data,
                priority: 0,
                path: String::new(),
            },
        });
        assert!(matches!(reply, Reply::Put { .. }), "{reply:?}");
        h.events.clear();
    }
    // The de-duplication table remembers each put for a while; it is
    // counted apart (DEDUP_ENTRY_BYTES), so forget it here, and measure it.
    let remembered = held();
    h.now += DEDUP_WINDOW_MS + 1;
    assert!(matches!(h.put_sized(size), Reply::Put { .. }));
    h.events.clear();
    let after = held();
    assert_eq!(h.queue().len(), items + 1);
    let held = (after - before - (items as i64 + 1) * size as i64) / items as i64;
    let per_id = (remembered - after) / items as i64;
    assert!(
        per_id <= DEDUP_ENTRY_BYTES as i64,
        "a remembered put id costs {per_id} bytes, counted as {DEDUP_ENTRY_BYTES}"
    );
    (held, h.queue().meta_bytes_held() as i64 / items as i64)
}

/// Performance finding (memory): a node held 1.58 GB for 1,000,100 queued
/// 256-byte items, ~1,300 bytes per item beyond the payload: the request id
/// was stored three times (field, tag, index) and every item's tags were a
/// map, a whole tree node for one entry.
#[test]
fn a_stored_item_costs_little_beyond_its_payload() {
    let (bare, none) = overhead_per_item(100_000, 256, false, false);
    let (grouped, _) = overhead_per_item(100_000, 256, true, false);
    let (traced, meta) = overhead_per_item(100_000, 256, true, true);
    eprintln!(
        "state bytes per 256-byte item beyond its payload: {bare} (with a group: {grouped}; \
         traced, with a client's id: {traced}, of which counted as meta bytes: {meta})"
    );
    assert!(bare <= 240, "{bare} bytes per item");
    assert!(grouped <= 280, "{grouped} bytes per item with a group");
    assert_eq!(none, 0, "a bare item holds nothing beyond its record");
    // Memory admission charges ITEM_OVERHEAD_BYTES per item plus the meta
    // bytes: that covers a traced item too.
    assert!(
        traced <= meta + 280,
        "{traced} bytes per traced item, {meta} of them counted"
    );
    const { assert!(crate::api::ITEM_OVERHEAD_BYTES >= 280 + 100) };
}
