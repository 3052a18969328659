//! The lease: how long a node may serve watchers after it last heard from
//! a quorum (the leader) or from a leader a quorum acknowledged (any other
//! member), and the contacts it is counted from.

use super::*;

impl RaftNode {
    /// Whether this node may take watch connections (it announced its
    /// start, so no consumer state from before can be mistaken for new).
    pub fn accepts_watchers(&self) -> bool {
        self.watchers_welcome
            .load(std::sync::atomic::Ordering::Acquire)
            && self.holds_lease()
    }

    /// This node accepted replication from a leader, in a request it
    /// received at `received`. The leader said a quorum last acknowledged
    /// it `quorum_age_ms` before sending (a leader that does not say is
    /// taken to have just then): the member's lease runs from then, so that
    /// a follower cut off together with a leader that lost its quorum (a
    /// minority of two or more, in a cluster of five or more) gives up its
    /// lease as that leader does, and its watchers reconnect to the
    /// majority. Counting from the receipt, not from the reply, keeps a
    /// slow write of the entries from lengthening the lease. Contact never
    /// moves back.
    pub(crate) fn note_leader_contact(
        &self,
        received: std::time::Instant,
        quorum_age_ms: Option<u64>,
    ) {
        let at = match quorum_age_ms {
            None => received,
            // A leader no quorum acknowledged yet (just elected) extends
            // nothing, and takes nothing away either.
            Some(u64::MAX) => return,
            Some(age) => match received.checked_sub(Duration::from_millis(age)) {
                Some(at) => at,
                None => return,
            },
        };
        let mut contact = self.leader_contact.lock().unwrap();
        *contact = Some(contact.map_or(at, |before| before.max(at)));
    }

    /// Forget the contact with earlier leaders once this node leads: if it
    /// steps down, only replication from the next leader gives it a lease,
    /// and not before the wait in [`Self::holds_lease`].
    pub(super) fn forget_leader_contact(&self) {
        *self.leader_contact.lock().unwrap() = None;
        *self.led_until.lock().unwrap() = Some(std::time::Instant::now());
    }

    /// `peer` forwarded a command just now.
    pub(crate) fn note_peer_contact(&self, peer: u64) {
        self.peer_contact
            .lock()
            .unwrap()
            .insert(peer, std::time::Instant::now());
    }

    /// How long the leader may serve watchers after a quorum last
    /// acknowledged it ([`crate::config::Timings::leader_lease`]).
    pub fn leader_lease(&self) -> Duration {
        self.config.timings.leader_lease()
    }

    /// How long any other member may serve watchers after the leader it
    /// last accepted replication from was last acknowledged by a quorum
    /// ([`crate::config::Timings::member_lease`]).
    pub fn member_lease(&self) -> Duration {
        self.config.timings.member_lease()
    }

    /// Whether this node is in touch with a working cluster: a leader whose
    /// quorum acknowledged it within the leader's lease, or a member that
    /// accepted replication from a leader that a quorum acknowledged within
    /// the member's lease ([`Self::note_leader_contact`]), whether it
    /// follows that leader still or is voting in an election. A node
    /// without it must not push items: the rest of the cluster may be
    /// redelivering them.
    pub fn holds_lease(&self) -> bool {
        let m = self.raft.metrics().borrow_watched().clone();
        match m.state {
            ServerState::Leader => {
                let lease = self.leader_lease();
                let acked = m.membership_config.membership().voter_ids().count() <= 1
                    || m.last_quorum_acked
                        .as_ref()
                        .is_some_and(|t| t.elapsed() < lease);
                if acked {
                    self.forget_leader_contact();
                    return true;
                }
                // Just elected, before a quorum acknowledged it: for a short
                // grace after the win, the lease it held as a member (from
                // the leader before) runs on, as it did while voting, so
                // that its watchers are not cut in the moment between
                // winning and the first acknowledgement. No other node can
                // release its consumers within that grace
                // ([`crate::config::Timings::new_leader_grace`]).
                let won = {
                    let mut won_at = self.won_at.lock().unwrap();
                    match *won_at {
                        Some((term, at)) if term == m.current_term => at,
                        _ => {
                            let now = std::time::Instant::now();
                            *won_at = Some((m.current_term, now));
                            now
                        }
                    }
                };
                let in_grace = won.elapsed() < self.config.timings.new_leader_grace();
                let member_lease = self.member_lease();
                let contact = *self.leader_contact.lock().unwrap();
                if in_grace && contact.is_some_and(|t| t.elapsed() < member_lease) {
                    // It counts as having led (the predecessor wait applies
                    // should it step down now).
                    *self.led_until.lock().unwrap() = Some(std::time::Instant::now());
                    return true;
                }
                self.forget_leader_contact();
                false
            }
            ServerState::Shutdown => false,
            _ => {
                // A node that led lately is the next leader's predecessor,
                // whose consumers that leader may release after the shorter
                // wait (housekeeping) if no ack of it arrived by then: it
                // takes no member lease until that wait has passed.
                let predecessor_wait = self.config.timings.no_member_lease_after_leading();
                if self
                    .led_until
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() < predecessor_wait)
                {
                    return false;
                }
                let lease = self.member_lease();
                self.leader_contact
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() < lease)
            }
        }
    }
}
