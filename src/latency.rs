//! The latency budget: where a request's time goes, stage by stage, as
//! process-wide histograms that `/metrics` exports as
//! `eddy_stage_seconds{stage="..."}` and `eddy bench --breakdown` reads.
//!
//! Stages nest (a put's HTTP handling contains its proposal, which contains
//! its forward or its log write), so their means are read side by side, not
//! added up. Recording is a few relaxed atomic additions: it stays on in
//! production, and costs nothing that shows beside one fsync.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One step of a request's path through a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// An HTTP put, from its request to its answer, on the node that took
    /// it (body read, admission, proposal).
    HttpPut,
    /// An HTTP commit (`PUT ?_indexes_=`), likewise.
    HttpCommit,
    /// A proposal on the node that took the request: to the leader (or into
    /// its own log) and back, retries included.
    Propose,
    /// Waiting in a coalescer on the leader for an entry to join.
    CoalesceLog,
    /// Waiting in a coalescer on a follower for a forward call to join.
    CoalesceForward,
    /// One forward call from a follower to the leader and back.
    Forward,
    /// The leader's write of one entry: append, replication to a quorum,
    /// commit, apply.
    RaftWrite,
    /// One batch of log records written and fsynced (any node).
    LogFlush,
    /// A follower's handling of one replication request, its fsync
    /// included, from reading it to answering it.
    FollowerAppend,
    /// Applying one log entry to the queue state.
    Apply,
    /// An item's push to a watcher: from the applied event reaching the
    /// node's watch hub to the frame handed to the connection.
    Deliver,
}

impl Stage {
    const ALL: [Stage; 11] = [
        Stage::HttpPut,
        Stage::HttpCommit,
        Stage::Propose,
        Stage::CoalesceLog,
        Stage::CoalesceForward,
        Stage::Forward,
        Stage::RaftWrite,
        Stage::LogFlush,
        Stage::FollowerAppend,
        Stage::Apply,
        Stage::Deliver,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::HttpPut => "http_put",
            Stage::HttpCommit => "http_commit",
            Stage::Propose => "propose",
            Stage::CoalesceLog => "coalesce_log",
            Stage::CoalesceForward => "coalesce_forward",
            Stage::Forward => "forward",
            Stage::RaftWrite => "raft_write",
            Stage::LogFlush => "log_flush",
            Stage::FollowerAppend => "follower_append",
            Stage::Apply => "apply",
            Stage::Deliver => "deliver",
        }
    }

    /// Record one occurrence of this stage that took `took`.
    pub fn record(self, took: Duration) {
        STAGES[self as usize].record(took);
    }
}

/// Upper bounds of the histogram buckets, in microseconds.
const BUCKETS_MICROS: [u64; 14] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

struct Histogram {
    count: AtomicU64,
    sum_micros: AtomicU64,
    /// Non-cumulative: occurrences at or under each bound and above the
    /// one before.
    buckets: [AtomicU64; BUCKETS_MICROS.len()],
}

impl Histogram {
    const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; BUCKETS_MICROS.len()],
        }
    }

    fn record(&self, took: Duration) {
        let micros = took.as_micros().min(u64::MAX as u128) as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        if let Some(i) = BUCKETS_MICROS.iter().position(|b| micros <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

static STAGES: [Histogram; Stage::ALL.len()] = [const { Histogram::new() }; Stage::ALL.len()];

/// The stage histograms in Prometheus' text format.
pub fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP eddy_stage_seconds Time spent in each stage of a request's path through this node."
    );
    let _ = writeln!(out, "# TYPE eddy_stage_seconds histogram");
    for stage in Stage::ALL {
        let h = &STAGES[stage as usize];
        let name = stage.name();
        let mut cumulative = 0;
        for (bound, n) in BUCKETS_MICROS.iter().zip(&h.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "eddy_stage_seconds_bucket{{stage=\"{name}\",le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let count = h.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "eddy_stage_seconds_bucket{{stage=\"{name}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "eddy_stage_seconds_sum{{stage=\"{name}\"}} {}",
            h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "eddy_stage_seconds_count{{stage=\"{name}\"}} {count}");
    }
}

/// A histogram of durations with its own bucket bounds (in microseconds),
/// for a figure outside the stages (the engine's model calls).
pub struct DurationHistogram {
    bounds: &'static [u64],
    count: AtomicU64,
    sum_micros: AtomicU64,
    /// Non-cumulative, as in [`Histogram`].
    buckets: Vec<AtomicU64>,
}

impl DurationHistogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn record(&self, took: Duration) {
        let micros = took.as_micros().min(u64::MAX as u128) as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        if let Some(i) = self.bounds.iter().position(|b| micros <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// As Prometheus' text format, under `name` (in seconds).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_stage_shows_in_its_bucket_sum_and_count() {
        let before = STAGES[Stage::Deliver as usize]
            .count
            .load(Ordering::Relaxed);
        Stage::Deliver.record(Duration::from_micros(300));
        let mut out = String::new();
        render(&mut out);
        let count: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("eddy_stage_seconds_count{stage=\"deliver\"} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(count > before);
        // 300 µs is over the 250 µs bound and within the 500 µs one.
        let bucket = |le: &str| -> u64 {
            out.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "eddy_stage_seconds_bucket{{stage=\"deliver\",le=\"{le}\"}} "
                    ))
                })
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(bucket("0.0005") > bucket("0.00025"));
        assert_eq!(bucket("+Inf"), count);
    }
}
