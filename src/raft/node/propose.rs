//! Proposing: admission on the entry node, writing on the leader (stamped
//! with the cluster clock), forwarding to the leader from anywhere else,
//! and retrying one envelope through elections until its deadline.

use super::*;

impl RaftNode {
    /// Refuse anything once this node's storage failed.
    pub(super) fn ensure_storage_sound(&self) -> Result<(), ProposeError> {
        match self.health.failure() {
            Some(reason) => Err(ProposeError::Fatal(format!("storage failed: {reason}"))),
            None => Ok(()),
        }
    }

    /// Refuse a command this node must not write: any, once storage failed;
    /// new data, while the data volume is short of space.
    pub(super) fn admit(&self, command: &Command) -> Result<(), ProposeError> {
        self.ensure_storage_sound()?;
        if command.has_nested_batch() {
            return Err(ProposeError::Refused("nested command batch".into()));
        }
        self.disk
            .admit(command.added_bytes())
            .map_err(|e| ProposeError::NoSpace(e.to_string()))
    }

    /// Propose a command forwarded by another node: this node's storage
    /// admits it, then it goes to the local Raft.
    pub async fn write_forwarded(&self, envelope: Envelope) -> Result<Reply, ProposeError> {
        self.admit(&envelope.command)?;
        self.write_local(envelope).await
    }

    /// Propose a command on the leader. Only this node; no forwarding.
    /// The envelope is stamped with this (the leader's) clock when its log
    /// entry is formed, so all time the state machine sees comes from
    /// leaders, never from the node that happened to receive a request.
    /// Envelopes proposed together may share an entry (see `coalesce`).
    pub async fn write_local(&self, envelope: Envelope) -> Result<Reply, ProposeError> {
        // A new leader refuses writes until a quorum has acknowledged it
        // (its lease), a round trip after its election: a write that
        // arrives before then waits for it here instead of being refused.
        // (A write forwarded here would be refused as "not the leader", and
        // its node, seeing no change of leader, would wait out the bound.
        // The metrics can trail the Raft core by a moment: a write in that
        // moment is still refused, and retried.)
        let seen = self.leadership();
        // (Only a leader is ever unacknowledged.)
        if !seen.acknowledged {
            self.wait_for_leader_change(seen, LEADER_CHANGE_WAIT).await;
        }
        self.coalescer.write(envelope).await
    }

    /// Propose `command` wherever the leader is, retrying through elections
    /// for up to `deadline`.
    pub async fn propose(&self, command: Command) -> Result<Reply, ProposeError> {
        self.propose_as(command, Origin::DataPlane).await
    }

    /// Propose an admin command (create or delete a service) on behalf of a
    /// caller the API authenticated as an administrator.
    pub async fn propose_admin(&self, command: Command) -> Result<Reply, ProposeError> {
        self.propose_as(command, Origin::Admin).await
    }

    pub(super) async fn propose_as(
        &self,
        command: Command,
        origin: Origin,
    ) -> Result<Reply, ProposeError> {
        let envelope = Envelope {
            id: uuid::Uuid::new_v4().as_u128(),
            now_ms: self.wall_clock_ms(),
            command,
        };
        self.propose_envelope_as(envelope, origin, PROPOSE_DEADLINE)
            .await
    }

    /// Propose a data-plane envelope as it is (a retry reuses its id, and
    /// the state machine applies it once).
    pub async fn propose_envelope(
        &self,
        envelope: Envelope,
        deadline: Duration,
    ) -> Result<Reply, ProposeError> {
        self.propose_envelope_as(envelope, Origin::DataPlane, deadline)
            .await
    }

    pub(super) async fn propose_envelope_as(
        &self,
        envelope: Envelope,
        origin: Origin,
        deadline: Duration,
    ) -> Result<Reply, ProposeError> {
        // The entry node stores the entry too: it checks its own disk
        // before the leader checks its.
        self.admit(&envelope.command)?;
        let started = std::time::Instant::now();
        let envelope = &envelope;
        let result = self
            .retry_until(deadline, |remaining| {
                async move {
                    // Straight to the leader this node knows of; if it leads
                    // (or knows none), into its own log.
                    let known = self.raft.metrics().borrow_watched().current_leader;
                    let local = match known {
                        Some(leader) if leader != self.id => Err(ProposeError::NotLeader {
                            leader: Some(leader),
                        }),
                        // A leader without a quorum never commits: bound each
                        // attempt.
                        _ => tokio::time::timeout(remaining, self.write_local(envelope.clone()))
                            .await
                            .unwrap_or_else(|_| {
                                Err(ProposeError::Unavailable(
                                    "no quorum acknowledged the write in time; outcome unknown"
                                        .into(),
                                ))
                            }),
                    };
                    match (local, origin) {
                        (
                            Err(ProposeError::NotLeader {
                                leader: Some(leader),
                            }),
                            Origin::DataPlane,
                        ) if leader != self.id => self.forwarder.write(envelope.clone()).await,
                        (
                            Err(ProposeError::NotLeader {
                                leader: Some(leader),
                            }),
                            Origin::Admin,
                        ) if leader != self.id => self.forward(leader, envelope, origin).await,
                        (other, _) => other,
                    }
                }
            })
            .await;
        crate::latency::Stage::Propose.record(started.elapsed());
        result
    }

    /// Run `attempt` (given the time left, at least [`MIN_ATTEMPT`]) until
    /// it succeeds, fails for good, or `deadline` has passed. After a
    /// failed try the next waits until the leader, the term or whether this
    /// node's leadership is acknowledged differs from what it was when the
    /// failed one began (at most [`LEADER_CHANGE_WAIT`]). Waiting for any
    /// change of the metrics instead did not wait at all (a fresh receiver
    /// has never marked the current report seen, and every refused write
    /// sends another), so a node without a leader tried without pause.
    /// Without a leader at the end the error says so.
    pub(super) async fn retry_until<T, Fut>(
        &self,
        deadline: Duration,
        mut attempt: impl FnMut(Duration) -> Fut,
    ) -> Result<T, ProposeError>
    where
        Fut: std::future::Future<Output = Result<T, ProposeError>>,
    {
        let start = tokio::time::Instant::now();
        loop {
            let remaining = deadline.saturating_sub(start.elapsed()).max(MIN_ATTEMPT);
            let seen = self.leadership();
            let err = match attempt(remaining).await {
                Ok(done) => return Ok(done),
                Err(e) if e.is_final() => return Err(e),
                Err(e) => e,
            };
            if start.elapsed() >= deadline {
                return Err(match err {
                    ProposeError::NotLeader { .. } => {
                        ProposeError::Unavailable("no leader elected".into())
                    }
                    e => e,
                });
            }
            self.proposal_retries.fetch_add(1, Ordering::Relaxed);
            self.wait_for_leader_change(seen, LEADER_CHANGE_WAIT).await;
        }
    }

    /// Who leads as this node sees it (see [`Leadership`]).
    pub fn leadership(&self) -> Leadership {
        Leadership::of(&self.raft.metrics().borrow_watched())
    }

    /// Wait, at most `max`, until who leads differs from `seen`.
    pub async fn wait_for_leader_change(&self, seen: Leadership, max: Duration) {
        let mut metrics = self.raft.metrics();
        let changed = async {
            loop {
                if Leadership::of(&metrics.borrow_watched()) != seen {
                    return;
                }
                if metrics.changed().await.is_err() {
                    // The Raft core stopped: nothing will change, and the
                    // bound still paces the tries.
                    std::future::pending::<()>().await;
                }
            }
        };
        let _ = tokio::time::timeout(max, changed).await;
    }

    /// How many times proposals and leader reads on this node were tried
    /// again after a try failed (no leader, a failed forward, an election).
    pub fn proposal_retries(&self) -> u64 {
        self.proposal_retries.load(Ordering::Relaxed)
    }

    /// How many forward streams this node has opened (one per lane, commands
    /// that release work and the rest, and leader it forwarded to, and one
    /// more after each that broke).
    pub fn forward_streams_opened(&self) -> u64 {
        self.forward_streams.opened()
    }

    /// A gRPC client for member `id`, over the cached channel to it.
    pub(super) fn peer_client(
        &self,
        id: u64,
    ) -> Result<RaftClient<tonic::transport::Channel>, ProposeError> {
        if self.links.is_cut(id) {
            return Err(ProposeError::Unavailable(format!(
                "link to node {id} is cut"
            )));
        }
        let addr = self
            .node_info(id)
            .map(|n| n.raft_addr)
            .ok_or(ProposeError::NotLeader { leader: None })?;
        let channel = self
            .channels
            .get(&addr)
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        Ok(RaftClient::new(channel).max_decoding_message_size(MAX_PEER_MESSAGE))
    }

    pub(super) async fn forward(
        &self,
        leader: u64,
        envelope: &Envelope,
        origin: Origin,
    ) -> Result<Reply, ProposeError> {
        let mut client = self.peer_client(leader)?;
        let admin_proof = match origin {
            Origin::Admin => crate::secret::digest(self.config.admin_token.as_bytes()).to_vec(),
            Origin::DataPlane => Vec::new(),
        };
        let req = authorized(
            &self.secret,
            ForwardRequest {
                command: encode(envelope).into(),
                from: self.id,
                admin_proof: admin_proof.into(),
            },
            Some(PROPOSE_DEADLINE),
        );
        let started = std::time::Instant::now();
        let reply = client.forward(req).await;
        crate::latency::Stage::Forward.record(started.elapsed());
        let reply = reply
            .map_err(|s| {
                ProposeError::Unavailable(format!("forward to node {leader}: {}", s.message()))
            })?
            .into_inner();
        super::coalesce::forward_reply(leader, reply)
    }
}

/// Who leads as one node sees it: what a write refused for want of a leader
/// waits to see change before it is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    leader: Option<u64>,
    term: u64,
    /// On the leader: whether a quorum has acknowledged it in this term,
    /// without which it refuses writes (its lease). Set by the first
    /// acknowledgement, not by each one after, so a wait for a change does
    /// not wake at every heartbeat. (A leader whose lease lapsed later, cut
    /// off from the others, stays acknowledged here: its writes wait out the
    /// bound.) Always set on other nodes.
    acknowledged: bool,
}

impl Leadership {
    fn of(m: &openraft::RaftMetrics<crate::raft::types::TypeConfig>) -> Self {
        Self {
            leader: m.current_leader,
            term: m.current_term,
            // Only a leader waits for acknowledgement (a follower's metrics
            // never carry one); a lone voter is its own quorum.
            acknowledged: m.current_leader != Some(m.id)
                || m.last_quorum_acked.is_some()
                || m.membership_config
                    .membership()
                    .voter_ids()
                    .nth(1)
                    .is_none(),
        }
    }
}
