//! Time: this node's clock and the cluster clock every envelope is stamped
//! with (see [`RaftNode::cluster_clock_ms`]).

use super::*;

impl RaftNode {
    /// This node's clock: the system clock, plus the offset a test set.
    pub(super) fn wall_clock_ms(&self) -> u64 {
        let offset = self
            .clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        now_ms().saturating_add_signed(offset)
    }

    /// Run this node's clock `offset_ms` ahead of the system clock (behind
    /// when negative): how tests model the offsets between nodes' clocks.
    pub fn set_clock_offset_ms(&self, offset_ms: i64) {
        self.clock_offset_ms
            .store(offset_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The time a leader stamps on what it appends and judges expiry by,
    /// and every node reads state times against (ages, idle times): the
    /// latest of this node's clock, the applied state's clock, and, within
    /// one term, the previous reading plus the time since (on the monotonic
    /// clock). A predecessor whose clock ran ahead left the state's clock
    /// there (applied time never goes back); counting on from there,
    /// instead of waiting for this node's clock to catch up, keeps every
    /// grace period its configured length, and the reading never goes back
    /// within a term, not even when the system clock is stepped back. Each
    /// new term starts again from this node's and the state's clocks: a
    /// step of this node's clock is not carried into the next term (the
    /// state's clock, which never goes back, keeps any lead it recorded).
    ///
    /// Not to be called inside [`Self::read`]: it reads the state itself.
    pub fn cluster_clock_ms(&self) -> u64 {
        let wall = self.wall_clock_ms();
        let applied = self.read(|s| s.clock_ms());
        let term = self.raft.metrics().borrow_watched().current_term;
        let mut anchor = self.clock_anchor.lock().unwrap();
        // A reading made for a later term (a concurrent caller saw the
        // new term first) carries on too, and is never replaced by one for
        // an earlier term.
        let carried = match *anchor {
            Some((t, ms, at)) if t >= term => ms.saturating_add(at.elapsed().as_millis() as u64),
            _ => 0,
        };
        let now = wall.max(applied).max(carried);
        let anchor_term = anchor.map_or(term, |(t, _, _)| t.max(term));
        *anchor = Some((anchor_term, now, std::time::Instant::now()));
        now
    }
}
