//! Leader housekeeping: snapshots by size, this node's restart
//! announcement, grace expiry, and declaring silent members lost.

use super::*;

/// How often the leader's timers run: grace periods end, and members are
/// declared lost, within this of when they are due.
const HOUSEKEEPING_TICK: Duration = Duration::from_millis(100);
/// Snapshots taken because the log's memory passed its bound are at least
/// this far apart.
const SIZE_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

impl RaftNode {
    /// Leader-only timers: grace-period expiry and lost members.
    pub(super) async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HOUSEKEEPING_TICK);
        let mut announced_restart = false;
        let mut last_size_snapshot = None;
        // The term this node leads, since when (a node that lost and
        // regained leadership between two ticks starts its wait again), and
        // the leader it followed just before: that one went silent long
        // enough for an election, so it needs less benefit of the doubt.
        let mut leading: Option<(u64, tokio::time::Instant, Option<u64>)> = None;
        // The last leader this node followed, handed to the next term it leads.
        let mut previous_leader: Option<u64> = None;
        let stopped = self.stopped();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopped => return,
            }
            if self.log.entry_bytes() > SNAPSHOT_LOG_BYTES
                && last_size_snapshot
                    .is_none_or(|t: tokio::time::Instant| t.elapsed() > SIZE_SNAPSHOT_INTERVAL)
            {
                last_size_snapshot = Some(tokio::time::Instant::now());
                tracing::info!(
                    bytes = self.log.entry_bytes(),
                    "raft log holds many bytes; taking a snapshot"
                );
                let _ = self.raft.trigger().snapshot().await;
            }
            if !announced_restart && self.status().leader.is_some() {
                // Whatever consumers this node held before it started are
                // gone, whatever the local (possibly stale) state says.
                announced_restart = self
                    .propose(Command::NodeGone { node: self.id })
                    .await
                    .is_ok();
                if announced_restart {
                    self.watchers_welcome
                        .store(true, std::sync::atomic::Ordering::Release);
                }
            }
            let status = self.status();
            if status.leader != Some(self.id) {
                leading = None;
                if let Some(l) = status.leader {
                    previous_leader = Some(l);
                }
                continue;
            }
            let term = status.term;
            if leading.is_none_or(|(t, _, _)| t != term) {
                // The leader followed before this term, if any; a node that
                // led the term before has no predecessor to judge sooner.
                leading = Some((term, tokio::time::Instant::now(), previous_leader.take()));
                self.forget_leader_contact();
            }
            let (since, predecessor) =
                leading.map_or((tokio::time::Instant::now(), None), |(_, at, p)| (at, p));
            let now = self.cluster_clock_ms();
            if self.read(|s| s.next_expiry()).is_some_and(|t| t <= now)
                && let Err(e) = self
                    .propose_housekeeping(Command::GraceExpired { term })
                    .await
            {
                tracing::debug!(error = %e, "grace expiry not applied");
            }
            // Only a leader that hears from a quorum may judge others: one
            // that is itself cut off would otherwise declare the majority
            // lost.
            if !self.holds_lease() {
                continue;
            }
            let limit = self.config.timings.node_lost;
            let old_leader_limit = self.config.timings.predecessor_wait();
            // A new leader gives every member a full timeout to ack, except
            // the old leader, whose silence already caused the election.
            let lost: BTreeSet<u64> = if since.elapsed() >= limit {
                self.lost_members(limit)
            } else if since.elapsed() >= old_leader_limit
                && let Some(old) = predecessor
                && self.silent_since(old, since.into_std())
            {
                self.lost_members(old_leader_limit)
                    .into_iter()
                    .filter(|n| *n == old)
                    .collect()
            } else {
                BTreeSet::new()
            };
            for node in lost {
                tracing::warn!(
                    node,
                    term,
                    "member stopped acknowledging; moving its consumers' items"
                );
                if let Err(e) = self
                    .propose_housekeeping(Command::NodeLost { node, term })
                    .await
                {
                    tracing::debug!(error = %e, "node-lost not applied");
                }
            }
        }
    }

    /// Propose a leader decision on this node only: never forwarded (a
    /// deposed leader's decision is void), bounded in time, and applied only
    /// in the term it carries.
    pub(super) async fn propose_housekeeping(
        &self,
        command: Command,
    ) -> Result<Reply, ProposeError> {
        let envelope = Envelope {
            id: uuid::Uuid::new_v4().as_u128(),
            now_ms: self.wall_clock_ms(),
            command,
        };
        let timeout = self.config.timings.node_lost;
        match tokio::time::timeout(timeout, self.write_local(envelope)).await {
            Ok(Ok(Reply::Rejected(r))) => Err(ProposeError::Refused(r.to_string())),
            Ok(r) => r,
            Err(_) => Err(ProposeError::Unavailable(
                "no quorum acknowledged the decision in time".into(),
            )),
        }
    }

    /// Whether `node` has neither acknowledged this leader's replication
    /// nor forwarded a command since `since` (this leader's election). Only
    /// such an old leader gets the shorter wait: one that has since
    /// followed this leader holds a member's lease, which only the full
    /// node-lost wait outlasts.
    pub(super) fn silent_since(&self, node: u64, since: std::time::Instant) -> bool {
        let acked = self
            .raft
            .metrics()
            .borrow_watched()
            .heartbeat
            .as_ref()
            .and_then(|h| h.get(&node).cloned().flatten())
            .is_some();
        let forwarded = self
            .peer_contact
            .lock()
            .unwrap()
            .get(&node)
            .is_some_and(|t| *t >= since);
        !acked && !forwarded
    }

    /// Members that host consumers and whose last ack is older than the
    /// node-lost timeout (measured on the leader's own clock).
    pub(super) fn lost_members(&self, limit: Duration) -> BTreeSet<u64> {
        let hosting = self.read(|s| s.consumer_nodes());
        let m = self.raft.metrics().borrow_watched().clone();
        let Some(heartbeat) = &m.heartbeat else {
            return BTreeSet::new();
        };
        let forwarded = self.peer_contact.lock().unwrap().clone();
        hosting
            .into_iter()
            .filter(|n| *n != self.id)
            .filter(|n| match heartbeat.get(n) {
                Some(Some(t)) => t.elapsed() > limit,
                // A member the leader never heard from, or not a member.
                Some(None) | None => true,
            })
            // A member that just forwarded a command (an attach after it
            // rejoined, say) is alive, whatever replication says so far.
            .filter(|n| forwarded.get(n).is_none_or(|t| t.elapsed() > limit))
            .collect()
    }
}
