//! The client side of node-to-node gRPC: openraft's network traits on tonic.
//!
//! One lazily connected `Channel` per peer, cached by address and shared by
//! Raft replication and write forwarding. Every call carries the cluster
//! secret and the node id the caller means to reach; the receiver refuses a
//! mismatch of either, so a node never acts on a message meant for another.
//! Raft payloads are postcard-encoded openraft structures inside protobuf
//! envelopes, so only this module and `service.rs` know their shape.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::tls::TlsIdentity;

use super::pb::raft_client::RaftClient;
use super::pb::{RaftRequest, SnapshotChunk};
use super::types::{NodeInfo, Snapshot, TypeConfig, Vote};

pub const SECRET_HEADER: &str = "x-eddy-cluster-secret";
pub(super) const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// Chunks read ahead of the gRPC stream while sending a snapshot.
const SNAPSHOT_CHUNKS_AHEAD: usize = 4;
/// The deadline of a snapshot transfer with no data; openraft's
/// `install_snapshot_timeout` is set to this.
pub const SNAPSHOT_TRANSFER_BASE: Duration = Duration::from_secs(10);
/// The slowest transfer (and verify and install) rate a deadline allows for.
const SNAPSHOT_MIN_BYTES_PER_SEC: u64 = 20 * 1024 * 1024;

/// How long sending and installing a snapshot of `len` bytes may take: the
/// base plus the time for its size at a conservative rate.
pub fn snapshot_transfer_timeout(base: Duration, len: u64) -> Duration {
    base + Duration::from_millis(len.saturating_mul(1000) / SNAPSHOT_MIN_BYTES_PER_SEC)
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("raft messages always encode")
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    postcard::from_bytes(b).map_err(|e| format!("decode: {e}"))
}

/// Cached channels to peers, keyed by `host:port`; over mutual TLS when the
/// node has a TLS identity.
#[derive(Clone, Default)]
pub struct Channels {
    inner: Arc<Mutex<HashMap<String, Channel>>>,
    tls: Option<ClientTlsConfig>,
}

impl Channels {
    pub fn new(tls: Option<&TlsIdentity>) -> Self {
        Self {
            inner: Default::default(),
            tls: tls.map(|id| {
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&id.ca_pem))
                    .identity(Identity::from_pem(&id.cert_pem, &id.key_pem))
            }),
        }
    }

    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.inner.lock().unwrap();
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint.connect_lazy();
        map.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Adds the cluster secret to an outgoing request.
pub fn authorized<T>(secret: &str, msg: T, timeout: Option<Duration>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = secret.parse() {
        req.metadata_mut().insert(SECRET_HEADER, v);
    }
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    req
}

#[derive(Clone)]
pub struct Network {
    pub channels: Channels,
    pub secret: Arc<String>,
    pub quorum: Arc<LeaderQuorum>,
    pub links: LinkFaults,
}

/// Peers this node treats as unreachable whatever the network says: how a
/// test partitions nodes that share one process (each side cuts the
/// other). Nothing is cut unless [`LinkFaults::cut`] is called. A cut link
/// fails every call this node starts to that peer, and ends the replication
/// stream to it; since every exchange between nodes is a call one of them
/// starts, cutting both ends isolates the pair.
#[derive(Clone)]
pub struct LinkFaults(Arc<tokio::sync::watch::Sender<BTreeSet<u64>>>);

impl Default for LinkFaults {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(BTreeSet::new())))
    }
}

impl LinkFaults {
    /// Treat `peer` as unreachable from now on.
    pub fn cut(&self, peer: u64) {
        self.0.send_modify(|cut| {
            cut.insert(peer);
        });
    }

    /// Reach `peer` again.
    pub fn heal(&self, peer: u64) {
        self.0.send_modify(|cut| {
            cut.remove(&peer);
        });
    }

    pub fn is_cut(&self, peer: u64) -> bool {
        self.0.borrow().contains(&peer)
    }

    /// Resolves once the link to `peer` is cut.
    pub(crate) fn until_cut(&self, peer: u64) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|cut| cut.contains(&peer)).await;
        }
    }

    fn check(&self, peer: u64) -> Result<(), Unreachable<TypeConfig>> {
        if self.is_cut(peer) {
            Err(Unreachable::from_string(format!(
                "link to node {peer} is cut"
            )))
        } else {
            Ok(())
        }
    }
}

/// The leader's part of its followers' lease: how long ago a quorum last
/// acknowledged this node as leader, sent with every replication request
/// (see [`super::RaftNode::holds_lease`]).
#[derive(Default)]
pub struct LeaderQuorum(
    std::sync::OnceLock<
        openraft::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>,
    >,
);

impl LeaderQuorum {
    /// Read this node's metrics from now on (once Raft runs).
    pub fn set(
        &self,
        metrics: openraft::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>,
    ) {
        let _ = self.0.set(metrics);
    }

    /// Milliseconds since a quorum last acknowledged this node as leader:
    /// 0 when it is the only voter, `u64::MAX` when no quorum has yet.
    pub fn age_ms(&self) -> u64 {
        use openraft::Instant as _;
        use openraft::async_runtime::WatchReceiver as _;
        let Some(metrics) = self.0.get() else {
            return u64::MAX;
        };
        let m = metrics.borrow_watched();
        if m.membership_config.membership().voter_ids().count() <= 1 {
            return 0;
        }
        m.last_quorum_acked
            .as_ref()
            .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> PeerConnection {
        PeerConnection {
            target,
            addr: node.raft_addr.clone(),
            channels: self.channels.clone(),
            secret: self.secret.clone(),
            quorum: self.quorum.clone(),
            links: self.links.clone(),
        }
    }
}

pub struct PeerConnection {
    target: u64,
    addr: String,
    channels: Channels,
    secret: Arc<String>,
    quorum: Arc<LeaderQuorum>,
    links: LinkFaults,
}

fn status_to_rpc<E: std::error::Error>(s: tonic::Status) -> RPCError<TypeConfig, E> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::from_string(s.message()))
        }
        _ => RPCError::Network(NetworkError::from_string(format!(
            "{}: {}",
            s.code(),
            s.message()
        ))),
    }
}

impl PeerConnection {
    fn client(&self) -> Result<RaftClient<Channel>, Unreachable<TypeConfig>> {
        self.links.check(self.target)?;
        let ch = self
            .channels
            .get(&self.addr)
            .map_err(|e| Unreachable::new(&e))?;
        Ok(RaftClient::new(ch).max_decoding_message_size(super::node::MAX_PEER_MESSAGE))
    }

    fn request(&self, body: Vec<u8>, option: &RPCOption) -> tonic::Request<RaftRequest> {
        authorized(
            &self.secret,
            RaftRequest {
                target: self.target,
                body: body.into(),
                leader_quorum_age_ms: Some(self.quorum.age_ms()),
            },
            Some(option.soft_ttl()),
        )
    }
}

fn network_error(e: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(e))
}

/// Decode a unary reply: the remote error, or the encoded response.
fn decode_reply<T: DeserializeOwned>(
    r: Result<tonic::Response<super::pb::RaftReply>, tonic::Status>,
) -> Result<T, RPCError<TypeConfig>> {
    let body = reply_body(r.map_err(status_to_rpc)?.into_inner()).map_err(network_error)?;
    decode(&body).map_err(network_error)
}

fn reply_body(r: super::pb::RaftReply) -> Result<bytes::Bytes, String> {
    if r.error.is_empty() {
        Ok(r.body)
    } else {
        Err(r.error)
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = super::types::SnapshotData;

    /// After an unreachable peer, retry at growing intervals (50 ms to
    /// 500 ms) instead of spinning on connection errors.
    fn backoff(&self) -> Option<openraft::network::Backoff> {
        let steps = (0..).map(|i: u32| Duration::from_millis((50u64 << i.min(4)).min(500)));
        Some(openraft::network::Backoff::new(steps))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        decode_reply(
            client
                .append_entries(self.request(encode(&rpc), &option))
                .await,
        )
    }

    /// Pipelined replication over one bidirectional gRPC stream: openraft
    /// keeps feeding requests while responses come back in order.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let target = self.target;
        let secret = self.secret.clone();
        let quorum = self.quorum.clone();
        let client = self.client();
        let links = self.links.clone();
        Box::pin(async move {
            // A stream that fails to start is retried at once, without the
            // backoff openraft applies inside a running stream: a peer that
            // refuses connections (dead, or cut) would be retried in a busy
            // loop. Failing no sooner than one heartbeat after the attempt
            // began paces the retries as the heartbeats are.
            let retry_at = tokio::time::Instant::now() + option.soft_ttl();
            let paced = |e: RPCError<TypeConfig>| async move {
                tokio::time::sleep_until(retry_at).await;
                e
            };
            let mut client = match client {
                Ok(c) => c,
                Err(e) => return Err(paced(RPCError::Unreachable(e)).await),
            };
            // A cut ends the stream: nothing more is sent, and replies still
            // on the way are lost, as on a broken connection.
            let requests = input
                .map(move |r| RaftRequest {
                    target,
                    body: encode(&r).into(),
                    leader_quorum_age_ms: Some(quorum.age_ms()),
                })
                .take_until(links.until_cut(target));
            let call = client.stream_append(authorized(&secret, requests, None));
            let response = match tokio::time::timeout(option.soft_ttl(), call).await {
                Ok(Ok(response)) => response,
                Ok(Err(status)) => return Err(paced(status_to_rpc(status)).await),
                Err(_) => {
                    return Err(RPCError::Unreachable(Unreachable::from_string(
                        "stream append: no answer",
                    )));
                }
            };
            let replies = response.into_inner().map(move |r| match r {
                _ if links.is_cut(target) => Err(RPCError::Unreachable(Unreachable::from_string(
                    format!("link to node {target} is cut"),
                ))),
                Ok(reply) => {
                    decode_reply::<StreamAppendResult<TypeConfig>>(Ok(tonic::Response::new(reply)))
                }
                Err(status) => Err(status_to_rpc(status)),
            });
            Ok(Box::pin(replies) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        decode_reply(client.vote(self.request(encode(&rpc), &option)).await)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        decode_reply(client.pre_vote(self.request(encode(&rpc), &option)).await)
    }

    /// Stream the snapshot file in chunks read on a blocking thread, a few
    /// ahead of the network; the deadline grows with the file's size.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let unreachable = |e: String| StreamingError::Unreachable(Unreachable::from_string(e));
        let mut client = self.client()?;
        let file = snapshot.snapshot;
        let len = file.len();
        let target = self.target;
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_CHUNKS_AHEAD);
        tx.try_send(SnapshotChunk {
            target,
            meta: encode(&(vote, snapshot.meta)).into(),
            data: Default::default(),
        })
        .expect("a fresh channel has room");
        let reader = tokio::task::spawn_blocking(move || {
            let mut offset = 0;
            while offset < len {
                let data = file.read_chunk(offset, SNAPSHOT_CHUNK)?;
                offset += data.len() as u64;
                let chunk = SnapshotChunk {
                    target,
                    meta: Default::default(),
                    data: data.into(),
                };
                if tx.blocking_send(chunk).is_err() {
                    break; // the call ended
                }
            }
            Ok::<_, super::snapshot_file::SnapshotFileError>(())
        });
        let timeout = snapshot_transfer_timeout(option.hard_ttl(), len);
        let req = authorized(
            &self.secret,
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(timeout),
        );
        let call = tokio::time::timeout(timeout, client.install_snapshot(req));
        let reply = tokio::select! {
            r = call => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        // A local read failure explains a refused (truncated) transfer.
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(1), reader).await {
            return Err(unreachable(format!("sending snapshot: {e}")));
        }
        let reply = reply
            .map_err(|_| {
                unreachable(format!(
                    "snapshot of {len} bytes not installed within {timeout:?}"
                ))
            })?
            .map_err(|s| unreachable(s.to_string()))?;
        let body = reply_body(reply.into_inner()).map_err(unreachable)?;
        decode(&body).map_err(unreachable)
    }
}
