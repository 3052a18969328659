//! The `_attrs_` view of a queue: a flat map of string keys and values, as
//! the SDKs read it (§7 of the protocol), formatted from the queue's state
//! (which knows nothing of this format).

use std::collections::BTreeMap;

use super::{HEADER_GROUP, HEADER_PRIORITY, HEADER_USER};
use crate::queue::{ConsumerStatus, Queue, QueueKind, ServiceConfig};

/// Items the queue holds.
pub const ATTR_LENGTH: &str = "stream.length";
/// The index of the newest item (absent when the queue is empty).
pub const ATTR_LAST_ENTRY: &str = "stream.lastEntry";

fn format_idle(ms: u64) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

/// Attributes of one queue of `service`, as of `now_ms` (for idle times).
pub fn attributes(
    service: &str,
    config: &ServiceConfig,
    kind: QueueKind,
    queue: &Queue,
    now_ms: u64,
) -> BTreeMap<String, String> {
    let limits = config.limits(kind);
    let name = match kind {
        QueueKind::Input => service.to_string(),
        QueueKind::Sink => format!("{service}/sink"),
    };
    let mut a = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        a.insert(k.to_string(), v);
    };
    set("meta.name", name);
    set("meta.backend", "eddy".into());
    set(
        "meta.state",
        if queue.ended { "End" } else { "Running" }.into(),
    );
    set("meta.maxPayloadBytes", limits.max_payload_bytes.to_string());
    set("meta.maxDelivery", config.max_delivery.to_string());
    set("meta.header.user", HEADER_USER.into());
    set("meta.header.group", HEADER_GROUP.into());
    set("meta.header.priority", HEADER_PRIORITY.into());
    set("meta.header.userIdentifyHeader", HEADER_USER.into());
    set("meta.header.groupIdentifyHeader", HEADER_GROUP.into());
    set(ATTR_LENGTH, queue.len().to_string());
    set("stream.approxMaxLength", limits.max_length.to_string());
    set("stream.autoEvict", limits.evict_oldest.to_string());
    set("stream.inFlight", queue.in_flight_count().to_string());
    set("stream.deadLetters", queue.dead.len().to_string());
    if let Some(first) = queue.items.keys().next() {
        set("stream.firstEntry", first.to_string());
    }
    if let Some(last) = queue.items.keys().next_back() {
        set(ATTR_LAST_ENTRY, last.to_string());
    }
    set("stream.nextIndex", queue.next_index.to_string());
    // Autoscaling signals: the backlog (what the busiest group has still to
    // be given), the age of the oldest item, and how full the running
    // consumers' windows are.
    let in_flight = queue.in_flight_count();
    set("stream.backlog", queue.backlog().to_string());
    set(
        "stream.oldestAgeMs",
        queue.oldest_age_ms(now_ms).unwrap_or(0).to_string(),
    );
    let window = queue.running_window();
    set("stream.window", window.to_string());
    set(
        "stream.windowOccupancy",
        if window == 0 {
            "0".to_string()
        } else {
            format!("{:.3}", in_flight as f64 / window as f64)
        },
    );
    let mut total = 0usize;
    for (gi, (gid, group)) in queue.groups.iter().enumerate() {
        set(
            &format!("groups.list.[{gi}]"),
            format!(
                "Id: {gid}, Consumers: {}, Pending: {}, Acked: {}",
                group.consumers.len(),
                group.in_flight.len(),
                group.acked.len()
            ),
        );
        for (uid, c) in &group.consumers {
            let status = match c.status {
                ConsumerStatus::Running => "Running",
                ConsumerStatus::Leaving { .. } => "Leaving",
            };
            let (window, slots) = if c.auto_commit {
                (0, 0)
            } else {
                (c.window, c.window.saturating_sub(c.pending))
            };
            let mut line = format!(
                "Id: {gid}.{uid}, Index: {}, Pending: {}, Status: {status}, Idle: {}, Window: {window}, Slots: {slots}, AutoCommit: {}, Node: {}",
                c.last_index,
                c.pending,
                format_idle(now_ms.saturating_sub(c.last_active_ms)),
                c.auto_commit,
                c.node,
            );
            if !c.tags.is_empty() {
                let tags: Vec<String> = c.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                line.push_str(&format!(", Tags: tags[{}]", tags.join(" ")));
            }
            set(&format!("consumers.list.[{total}]"), line);
            total += 1;
        }
    }
    set("consumers.stats.total", total.to_string());
    set("consumers.status.total", total.to_string());
    set("groups.stats.total", queue.groups.len().to_string());
    a
}
