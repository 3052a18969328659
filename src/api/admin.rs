//! Operations routes: services (create, list, show, delete), cluster status,
//! `/healthz`, `/readyz` and Prometheus `/metrics`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::queue::{
    Command, ConsumerStatus, QueueKind, QueueLimits, QueueRef, Reply, ServiceConfig,
};
use crate::raft::FSYNC_BUCKETS_MICROS;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/cluster", get(cluster))
        .route("/admin/overview", get(overview))
        .route("/admin/cluster/digest", get(state_digest))
        .route("/admin/cluster/members", axum::routing::post(add_member))
        .route(
            "/admin/cluster/members/{id}",
            axum::routing::delete(remove_member),
        )
        .route("/admin/services", get(list_services).post(create_service))
        .route(
            "/admin/services/{name}",
            get(show_service).put(update_service).delete(delete_service),
        )
        .route(
            "/admin/services/{name}/dead-letters",
            axum::routing::delete(purge_dead_letters),
        )
        .route(
            "/admin/services/{name}/dead-letters/requeue",
            axum::routing::post(requeue_dead_letters),
        )
        .route(
            "/admin/node/drain",
            axum::routing::post(drain).delete(undrain),
        )
        // Admin requests are small; nothing bigger is buffered.
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
}

/// Largest admin request body.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// An administrator, authenticated before anything else of the request
/// (its body included) is read: by the admin token, or, while no admin token
/// is configured, by calling from this machine (loopback).
pub(super) struct Admin {
    /// Who, for the audit log: a short digest of the token, or `loopback`.
    who: String,
    peer: Option<SocketAddr>,
}

impl Admin {
    /// Record an admin action on the `audit` tracing target.
    pub(super) fn audit(&self, action: &str, target: &str) {
        tracing::info!(
            target: "audit",
            who = %self.who,
            peer = ?self.peer,
            action,
            target,
            "admin action"
        );
    }
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = ConnectInfo::<SocketAddr>::from_request_parts(parts, state)
            .await
            .ok()
            .map(|c| c.0);
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        Admin::authorize(state, peer, given, parts.uri.path())
    }
}

impl Admin {
    /// Check `given` (the admin token as the caller sent it) for a request
    /// to `path` from `peer`.
    pub(super) fn authorize(
        state: &AppState,
        peer: Option<SocketAddr>,
        given: &[u8],
        path: &str,
    ) -> Result<Admin, ApiError> {
        let refuse = |why: &str| {
            tracing::warn!(target: "audit", peer = ?peer, path = %path, why, "admin call refused");
        };
        if state.config.admin_token.is_empty() {
            // A node restarted without its peers' list still belongs to its
            // cluster: loopback is no proof of an administrator there.
            let members = state.node.status().nodes.len();
            if members > 1 {
                refuse("no admin token configured on a member of a cluster");
                return Err(ApiError::Forbidden(format!(
                    "this node is a member of a cluster of {members} nodes and has no admin \
                     token: restart it with --admin-token-file (or --admin-token)"
                )));
            }
            return if peer.is_some_and(|p| p.ip().is_loopback()) {
                Ok(Admin {
                    who: "loopback".into(),
                    peer,
                })
            } else {
                refuse("no admin token configured and the caller is not local");
                Err(ApiError::Forbidden(
                    "no admin token is configured: admin calls are accepted from this machine \
                     only (start the node with --admin-token to allow others)"
                        .into(),
                ))
            };
        }
        if crate::secret::matches(given, state.config.admin_token.as_bytes()) {
            let digest = crate::secret::digest(given);
            Ok(Admin {
                who: format!(
                    "token:{}",
                    digest[..4]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                ),
                peer,
            })
        } else {
            refuse("wrong or missing admin token");
            Err(ApiError::Unauthorized(
                "admin token required in Authorization".into(),
            ))
        }
    }
}

/// The service settings an operator sends; omitted fields take defaults.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    pub name: String,
    #[serde(default)]
    pub token: String,
    pub max_length: Option<u64>,
    pub max_payload_bytes: Option<u64>,
    pub evict_oldest: Option<bool>,
    pub sink_max_length: Option<u64>,
    pub sink_max_payload_bytes: Option<u64>,
    pub sink_evict_oldest: Option<bool>,
    pub max_bytes: Option<u64>,
    pub sink_max_bytes: Option<u64>,
    pub max_dead_letters: Option<u64>,
    pub sink_max_dead_letters: Option<u64>,
    pub max_delivery: Option<u32>,
    pub consumer_grace_ms: Option<u64>,
}

impl ServiceRequest {
    pub fn to_config(&self) -> ServiceConfig {
        let d = ServiceConfig::default();
        let input = QueueLimits {
            max_length: self.max_length.unwrap_or(d.input.max_length),
            max_payload_bytes: self.max_payload_bytes.unwrap_or(d.input.max_payload_bytes),
            evict_oldest: self.evict_oldest.unwrap_or(d.input.evict_oldest),
            max_bytes: self.max_bytes.unwrap_or(d.input.max_bytes),
            max_dead_letters: self.max_dead_letters.unwrap_or(d.input.max_dead_letters),
        };
        let sink = QueueLimits {
            max_length: self.sink_max_length.unwrap_or(input.max_length),
            max_payload_bytes: self
                .sink_max_payload_bytes
                .unwrap_or(input.max_payload_bytes),
            evict_oldest: self.sink_evict_oldest.unwrap_or(d.sink.evict_oldest),
            max_bytes: self.sink_max_bytes.unwrap_or(input.max_bytes),
            max_dead_letters: self.sink_max_dead_letters.unwrap_or(input.max_dead_letters),
        };
        ServiceConfig {
            token: self.token.clone(),
            input,
            sink,
            max_delivery: self.max_delivery.unwrap_or(d.max_delivery),
            consumer_grace_ms: self.consumer_grace_ms.unwrap_or(d.consumer_grace_ms),
        }
    }
}

async fn create_service(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ServiceRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("service JSON: {e}")))?;
    let config = req.to_config();
    admin.audit("create-service", &req.name);
    match state
        .node
        .propose_admin(Command::CreateService {
            name: req.name.clone(),
            config,
        })
        .await?
    {
        Reply::Rejected(r) => Err(r.into()),
        _ => Ok((
            StatusCode::CREATED,
            axum::Json(service_json(&state, &req.name)),
        )
            .into_response()),
    }
}

/// `PUT /admin/services/{name}`: change an existing service's settings (the
/// body's `name`, if given, must match).
async fn update_service(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("service JSON: {e}")))?;
    if let Some(obj) = value.as_object_mut() {
        match obj.get("name") {
            Some(n) if n.as_str() != Some(name.as_str()) => {
                return Err(ApiError::BadRequest(format!(
                    "body names service {n}, the path {name:?}"
                )));
            }
            _ => {
                obj.insert("name".into(), serde_json::Value::String(name.clone()));
            }
        }
    }
    let req: ServiceRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("service JSON: {e}")))?;
    admin.audit("update-service", &name);
    match state
        .node
        .propose_admin(Command::UpdateService {
            name: name.clone(),
            config: req.to_config(),
        })
        .await?
    {
        Reply::Rejected(r) => Err(r.into()),
        _ => Ok(axum::Json(service_json(&state, &name)).into_response()),
    }
}

fn service_json(state: &AppState, name: &str) -> serde_json::Value {
    state.node.read(|s| {
        s.service(name).map_or(serde_json::Value::Null, |svc| {
            let c = &svc.config;
            serde_json::json!({
                "name": name,
                "max_length": c.input.max_length,
                "max_payload_bytes": c.input.max_payload_bytes,
                "evict_oldest": c.input.evict_oldest,
                "sink_max_length": c.sink.max_length,
                "sink_max_payload_bytes": c.sink.max_payload_bytes,
                "sink_evict_oldest": c.sink.evict_oldest,
                "max_bytes": c.input.max_bytes,
                "sink_max_bytes": c.sink.max_bytes,
                "max_dead_letters": c.input.max_dead_letters,
                "sink_max_dead_letters": c.sink.max_dead_letters,
                "input_bytes": svc.input.bytes_held(),
                "sink_bytes": svc.sink.bytes_held(),
                "input_dead_letters": svc.input.dead.len(),
                "sink_dead_letters": svc.sink.dead.len(),
                "max_delivery": c.max_delivery,
                "consumer_grace_ms": c.consumer_grace_ms,
                "token_set": !c.token.is_empty(),
                "input_length": svc.input.len(),
                "sink_length": svc.sink.len(),
            })
        })
    })
}

async fn list_services(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Response, ApiError> {
    let names: Vec<String> = state.node.read(|s| s.services.keys().cloned().collect());
    let list: Vec<serde_json::Value> = names.iter().map(|n| service_json(&state, n)).collect();
    Ok(axum::Json(list).into_response())
}

async fn show_service(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    match service_json(&state, &name) {
        serde_json::Value::Null => Err(ApiError::NotFound(format!("no such service: {name}"))),
        v => Ok(axum::Json(v).into_response()),
    }
}

async fn delete_service(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin.audit("delete-service", &name);
    match state
        .node
        .propose_admin(Command::DeleteService { name })
        .await?
    {
        Reply::Rejected(r) => Err(r.into()),
        _ => Ok("OK".into_response()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeQuery {
    /// `input` or `sink`; both when absent.
    queue: Option<String>,
}

/// `DELETE /admin/services/{name}/dead-letters[?queue=input|sink]`.
async fn purge_dead_letters(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<PurgeQuery>,
) -> Result<Response, ApiError> {
    admin.audit("purge-dead-letters", &name);
    let kinds = match q.queue.as_deref() {
        None => vec![QueueKind::Input, QueueKind::Sink],
        Some("input") => vec![QueueKind::Input],
        Some("sink") => vec![QueueKind::Sink],
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "queue must be input or sink, not {other:?}"
            )));
        }
    };
    let command = Command::Batch(
        kinds
            .into_iter()
            .map(|kind| Command::PurgeDeadLetters {
                queue: QueueRef::new(name.clone(), kind),
            })
            .collect(),
    );
    match state.node.propose_admin(command).await? {
        Reply::Batch(replies) => {
            for r in replies {
                if let Reply::Rejected(r) = r {
                    return Err(r.into());
                }
            }
            Ok("OK".into_response())
        }
        Reply::Rejected(r) => Err(r.into()),
        other => Err(ApiError::Internal(format!(
            "unexpected reply to purge: {other:?}"
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberRequest {
    id: u64,
    raft_addr: String,
    #[serde(default)]
    api_addr: String,
}

/// How long connecting to another member (and the TLS handshake) may take.
pub(super) const MEMBER_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest answer read back from a member.
const MEMBER_ANSWER_LIMIT: usize = 1024 * 1024;

/// One request to another member's client port at `api` (`host:port`),
/// over TLS when this node's client port uses TLS (every node's does then),
/// verifying that member's certificate for the host of `api`; connecting
/// (and the handshake) may take `connect_within`; `headers` (the caller's
/// `Authorization` among them) go with the request. Returns its status and
/// body.
pub(super) async fn call_node(
    api: &str,
    tls: Option<&crate::tls::ClientPortTls>,
    connect_within: std::time::Duration,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Option<String>,
) -> Result<(StatusCode, String), NodeCallError> {
    use http_body_util::BodyExt as _;
    let failed = |message: String| NodeCallError {
        message,
        unreachable: false,
    };
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(api)
            .await
            .map_err(|e| NodeCallError {
                message: format!("connect: {e}"),
                unreachable: true,
            })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn MemberIo> = match tls {
            None => Box::new(tcp),
            Some(tls) => Box::new(
                tls.connect(crate::tls::host_of(api), tcp)
                    .await
                    .map_err(|e| failed(format!("TLS: {e}")))?,
            ),
        };
        Ok::<_, NodeCallError>(io)
    };
    let io = tokio::time::timeout(connect_within, connect)
        .await
        .map_err(|_| NodeCallError {
            message: format!("no connection within {connect_within:?}"),
            unreachable: true,
        })??;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| failed(format!("HTTP: {e}")))?;
    let connection = tokio::spawn(conn);
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, api);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(all) = request.headers_mut() {
        all.extend(headers);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or_default(),
        )))
        .map_err(|e| failed(format!("request: {e}")))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MEMBER_ANSWER_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
    .await
    .map_err(failed);
    connection.abort();
    result
}

/// Why a call to another member failed.
#[derive(Debug)]
pub(super) struct NodeCallError {
    pub message: String,
    /// No connection to the member's port could be made: connecting
    /// failed (refused, no route, an unknown host), or connecting and the
    /// handshake took longer than allowed. Nothing was sent, and the member
    /// may be down. A handshake that failed (a certificate that does not
    /// verify) or anything later is not this.
    pub unreachable: bool,
}

impl std::fmt::Display for NodeCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A connection to a member's client port, plain or TLS.
trait MemberIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> MemberIo for T {}

/// How long a membership change may look for a leader: through an
/// election, or past a leader that died since this node last heard of it.
const LEADER_SEARCH: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a membership change waits for another leader before it asks
/// the one it knows again (its client port may have refused a connection
/// for a moment only).
const LEADER_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Sent with a membership change one member passes to the leader: the
/// leader answers [`StatusCode::MISDIRECTED_REQUEST`] at once when it no
/// longer leads, and the member that sent it goes on looking within its own
/// time, so one request searches for [`LEADER_SEARCH`] at most.
const PASSED_ON_HEADER: &str = "x-eddy-passed-on";

/// Membership changes run on the leader; other nodes pass the request on.
/// A node that knows no leader (an election is under way, or the cluster
/// just started), whose leader is not yet acknowledged by a quorum, whose
/// leader's port cannot be connected to (nothing was sent: it may have just
/// died), or whose leader answers that it leads no more, waits for the
/// leader to change (at most [`LEADER_RECHECK`]) and tries again, until
/// [`LEADER_SEARCH`] has passed: an operator removing a member that just
/// died asks a follower that may still name the dead one as leader. The
/// last try is given at least 100 ms. `local` gets the time left: the
/// voters' change it proposes as leader is waited for that long (a new
/// learner's catch-up before it, for as long as it takes). An answer
/// from the leader, once the request was sent, is waited for as long as
/// the leader takes (its own search is not repeated: a passed-on request
/// is answered 421 by a node that does not lead or is shutting down).
async fn on_leader<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    method: Method,
    path: String,
    body: Option<serde_json::Value>,
    mut local: F,
) -> Result<Response, ApiError>
where
    F: FnMut(std::time::Duration) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::raft::ProposeError>>,
{
    let passed_on = headers.contains_key(PASSED_ON_HEADER);
    let deadline = tokio::time::Instant::now() + LEADER_SEARCH;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut passed = HeaderMap::new();
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        passed.insert(header::AUTHORIZATION, auth.clone());
    }
    passed.insert(PASSED_ON_HEADER, header::HeaderValue::from_static("1"));
    let body = body.map(|b| b.to_string());
    let mut last;
    loop {
        let seen = state.node.leadership();
        match local(left().max(std::time::Duration::from_millis(100))).await {
            Ok(()) => return Ok("OK".into_response()),
            Err(
                e @ (crate::raft::ProposeError::ShuttingDown
                | crate::raft::ProposeError::NotLeader { .. }),
            ) if passed_on => {
                let why = match e {
                    crate::raft::ProposeError::ShuttingDown => "is shutting down",
                    _ if state.node.is_leader() => {
                        "leads, but no quorum has acknowledged it lately"
                    }
                    _ => "is not the leader",
                };
                return Ok((
                    StatusCode::MISDIRECTED_REQUEST,
                    format!("node {} {why}", state.node.id),
                )
                    .into_response());
            }
            Err(crate::raft::ProposeError::NotLeader { leader: Some(l) }) if l != state.node.id => {
                let api = state.node.member_api_addr(l).ok_or_else(|| {
                    ApiError::Unavailable(format!("leader {l} has no known HTTP address"))
                })?;
                let connect_within = left()
                    .min(MEMBER_CONNECT_TIMEOUT)
                    .max(std::time::Duration::from_millis(100));
                match call_node(
                    &api,
                    state.config.client_tls.as_ref(),
                    connect_within,
                    method.clone(),
                    &path,
                    passed.clone(),
                    body.clone(),
                )
                .await
                {
                    Ok((StatusCode::MISDIRECTED_REQUEST, text)) => {
                        last = format!("leader {l} at {api}: {}", text.trim());
                    }
                    Ok((status, text)) if status.is_success() => {
                        return Ok((status, text).into_response());
                    }
                    Ok((status, text)) => {
                        return Ok((status, format!("leader {l}: {}", text.trim())).into_response());
                    }
                    Err(e) if e.unreachable => last = format!("leader {l} at {api}: {e}"),
                    Err(e) => {
                        return Err(ApiError::Unavailable(format!("leader {l} at {api}: {e}")));
                    }
                }
            }
            Err(crate::raft::ProposeError::NotLeader { .. }) => {
                last = if state.node.is_leader() {
                    "this node leads, but no quorum has acknowledged it lately".into()
                } else {
                    "no leader known".into()
                };
            }
            Err(e) => return Err(e.into()),
        }
        if left().is_zero() {
            return Err(ApiError::Unavailable(format!(
                "no leader reachable within {LEADER_SEARCH:?} (last: {last})"
            )));
        }
        state
            .node
            .wait_for_leader_change(seen, left().min(LEADER_RECHECK))
            .await;
    }
}

async fn add_member(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: MemberRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("member JSON: {e}")))?;
    if req.id == 0 || req.raft_addr.is_empty() {
        return Err(ApiError::BadRequest(
            "id (> 0) and raft_addr are required".into(),
        ));
    }
    if state.config.admin_token.is_empty() {
        return Err(ApiError::Forbidden(
            "this node has no admin token, and a cluster of more than one node needs one: \
             restart it with --admin-token-file (or --admin-token) before adding members"
                .into(),
        ));
    }
    admin.audit(
        "add-member",
        &format!("{} at {} / {}", req.id, req.raft_addr, req.api_addr),
    );
    let json =
        serde_json::json!({"id": req.id, "raft_addr": req.raft_addr, "api_addr": req.api_addr});
    let node = state.node.clone();
    on_leader(
        &state,
        &headers,
        Method::POST,
        "/admin/cluster/members".into(),
        Some(json),
        |commit_within| {
            let (node, raft_addr, api_addr) =
                (node.clone(), req.raft_addr.clone(), req.api_addr.clone());
            async move {
                node.add_member(req.id, raft_addr, api_addr, commit_within)
                    .await
            }
        },
    )
    .await
}

async fn remove_member(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin.audit("remove-member", &id.to_string());
    let node = state.node.clone();
    on_leader(
        &state,
        &headers,
        Method::DELETE,
        format!("/admin/cluster/members/{id}"),
        None,
        |commit_within| {
            let node = node.clone();
            async move { node.remove_member(id, commit_within).await }
        },
    )
    .await
}

/// A caller allowed to read status (`/metrics`, `/admin/cluster`): anyone
/// while no status token is set, else one that sends it or the admin token.
pub(super) struct StatusReader;

impl FromRequestParts<Arc<AppState>> for StatusReader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if status_allowed(state, &parts.headers) {
            Ok(StatusReader)
        } else {
            Err(ApiError::Unauthorized(
                "status token required in Authorization".into(),
            ))
        }
    }
}

/// Whether a request may read status: always while no status token is
/// set, else with the status or the admin token in `Authorization`, as
/// the whole header or as the password of HTTP Basic (browsers).
pub(super) fn status_allowed(state: &AppState, headers: &HeaderMap) -> bool {
    if state.config.status_token.is_empty() {
        return true;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let basic_password = given
        .strip_prefix(b"Basic ")
        .and_then(|b64| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b64).ok()
        })
        .and_then(|pair| {
            let colon = pair.iter().position(|b| *b == b':')?;
            Some(pair[colon + 1..].to_vec())
        });
    let matches = |token: &str| {
        !token.is_empty()
            && (crate::secret::matches(given, token.as_bytes())
                || basic_password
                    .as_deref()
                    .is_some_and(|p| crate::secret::matches(p, token.as_bytes())))
    };
    matches(&state.config.admin_token) || matches(&state.config.status_token)
}

/// Start or stop draining this node: while draining it closes its watch
/// connections, refuses new watches and reports not ready, so that
/// workers move to other nodes before maintenance.
pub(super) fn set_draining(state: &AppState, drain: bool, admin: &Admin) {
    use std::sync::atomic::Ordering;
    admin.audit(
        if drain { "drain-node" } else { "undrain-node" },
        &state.node.id.to_string(),
    );
    state.draining.store(drain, Ordering::SeqCst);
    if drain {
        state.hub.close_all();
    }
}

async fn drain(State(state): State<Arc<AppState>>, admin: Admin) -> Response {
    set_draining(&state, true, &admin);
    "draining\n".into_response()
}

async fn undrain(State(state): State<Arc<AppState>>, admin: Admin) -> Response {
    set_draining(&state, false, &admin);
    "taking watches\n".into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequeueQuery {
    /// `input` (default) or `sink`.
    queue: Option<String>,
    /// One dead letter by its index; all of them when absent.
    index: Option<u64>,
}

/// `POST /admin/services/{name}/dead-letters/requeue[?queue=input|sink][&index=N]`:
/// dead letters back on their queue as new items; answers the new items
/// (index and tags, without payloads) as JSON.
async fn requeue_dead_letters(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RequeueQuery>,
) -> Result<Response, ApiError> {
    let kind = match q.queue.as_deref() {
        None | Some("input") => QueueKind::Input,
        Some("sink") => QueueKind::Sink,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "queue must be input or sink, not {other:?}"
            )));
        }
    };
    admin.audit("requeue-dead-letters", &name);
    match state
        .node
        .propose_admin(Command::RequeueDeadLetters {
            queue: QueueRef::new(name, kind),
            indexes: q.index.into_iter().collect(),
        })
        .await?
    {
        Reply::Items(frames) => Ok(axum::Json(
            frames
                .iter()
                .map(|f| serde_json::json!({"index": f.index, "tags": f.tags}))
                .collect::<Vec<_>>(),
        )
        .into_response()),
        Reply::Rejected(r) => Err(r.into()),
        other => Err(ApiError::Internal(format!(
            "unexpected reply to requeue: {other:?}"
        ))),
    }
}

/// `GET /admin/overview`: every queue's figures and consumers, as this
/// node's applied state has them (what `eddy top` shows). Metadata only.
async fn overview(State(state): State<Arc<AppState>>, _reader: StatusReader) -> Response {
    let now = state.node.cluster_clock_ms();
    let s = state.node.status();
    let queues = state.node.read(|st| {
        let mut queues = Vec::new();
        for (name, svc) in &st.services {
            for kind in [QueueKind::Input, QueueKind::Sink] {
                let q = svc.queue(kind);
                let mut consumers = Vec::new();
                for (group, g) in &q.groups {
                    for (user, c) in &g.consumers {
                        let running = c.status == ConsumerStatus::Running;
                        consumers.push(serde_json::json!({
                            "group": group, "user": user, "node": c.node,
                            "window": c.window, "auto_commit": c.auto_commit,
                            "holds": c.pending,
                            "idle_ms": now.saturating_sub(c.last_active_ms),
                            "state": if running { "running" } else { "leaving" },
                        }));
                    }
                }
                queues.push(serde_json::json!({
                    "service": name,
                    "queue": kind.as_str(),
                    "length": q.len(),
                    "backlog": q.backlog(),
                    "in_flight": q.in_flight_count(),
                    "window": q.running_window(),
                    "oldest_age_ms": q.oldest_age_ms(now),
                    "dead_letters": q.dead.len(),
                    "puts_total": q.puts_total,
                    "commits_total": q.commits_total,
                    "consumers": consumers,
                }));
            }
        }
        queues
    });
    axum::Json(serde_json::json!({
        "node": s.id,
        "leader": s.leader,
        "term": s.term,
        "queues": queues,
    }))
    .into_response()
}

async fn cluster(State(state): State<Arc<AppState>>, _reader: StatusReader) -> Response {
    axum::Json(state.node.status()).into_response()
}

/// The fingerprint of this node's applied state with the index it is at:
/// nodes at the same index must show the same digest. For administrators,
/// one at a time: encoding the whole state holds up applying meanwhile.
async fn state_digest(State(state): State<Arc<AppState>>, _admin: Admin) -> Response {
    static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let Ok(_turn) = ONE_AT_A_TIME.try_acquire() else {
        return ApiError::Full("a state digest is being computed; retry later".into())
            .into_response();
    };
    let node = state.node.clone();
    match tokio::task::spawn_blocking(move || node.state_digest()).await {
        Ok(Ok(digest)) => axum::Json(digest).into_response(),
        Ok(Err(e)) => ApiError::Internal(e.to_string()).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// Liveness: false only once storage failed (the process is then about to
/// exit). A full disk is not a liveness failure: the node recovers by
/// itself once space is freed.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.node.health.failure() {
        None => "ok".into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage failed: {reason}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match not_ready(&state) {
        None => "ready".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Why this node should take no client traffic now, if it should not.
pub(super) fn not_ready(state: &AppState) -> Option<String> {
    if let Some(reason) = state.node.health.failure() {
        return Some(format!("storage failed: {reason}"));
    }
    if let Some(low) = state.node.disk.low_space() {
        return Some(low.to_string());
    }
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Some("draining for maintenance".into());
    }
    let s = state.node.status();
    let caught_up = match (s.committed, s.applied) {
        (Some(c), Some(a)) => a + 10 >= c,
        (None, _) => true,
        _ => false,
    };
    if s.leader.is_some() && s.voters.contains(&s.id) && caught_up && state.node.accepts_watchers()
    {
        None
    } else {
        Some("no leader, not a voter, or catching up".into())
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped
/// (group names are chosen by clients).
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

async fn metrics(State(state): State<Arc<AppState>>, _reader: StatusReader) -> Response {
    let mut out = String::new();
    let now = state.node.cluster_clock_ms();
    let s = state.node.status();
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_term gauge\neddy_raft_term {}",
        s.term
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_is_leader gauge\neddy_raft_is_leader {}",
        u8::from(s.leader == Some(s.id))
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_leader_id gauge\neddy_raft_leader_id {}",
        s.leader.unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_proposal_retries_total counter\neddy_raft_proposal_retries_total {}",
        state.node.proposal_retries()
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_forward_streams_opened_total counter\neddy_raft_forward_streams_opened_total {}",
        state.node.forward_streams_opened()
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_commit_index gauge\neddy_raft_commit_index {}",
        s.committed.unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_applied_index gauge\neddy_raft_applied_index {}",
        s.applied.unwrap_or(0)
    );
    let _ = writeln!(out, "# TYPE eddy_raft_replication_lag gauge");
    let last = s.last_log_index.unwrap_or(0);
    for (peer, matched) in &s.replication {
        let _ = writeln!(
            out,
            "eddy_raft_replication_lag{{peer=\"{peer}\"}} {}",
            last.saturating_sub(matched.unwrap_or(0))
        );
    }
    let _ = writeln!(out, "# TYPE eddy_raft_last_contact_seconds gauge");
    for (peer, ms) in &s.millis_since_contact {
        if let Some(ms) = ms {
            let _ = writeln!(
                out,
                "eddy_raft_last_contact_seconds{{peer=\"{peer}\"}} {}",
                *ms as f64 / 1000.0
            );
        }
    }
    let _ = writeln!(
        out,
        "# TYPE eddy_raft_members gauge\neddy_raft_members {}",
        s.nodes.len()
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_node_ready gauge\neddy_node_ready {}",
        u8::from(not_ready(&state).is_none())
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_node_draining gauge\neddy_node_draining {}",
        u8::from(state.draining.load(std::sync::atomic::Ordering::Relaxed))
    );
    let _ = writeln!(
        out,
        "# TYPE eddy_watch_connections gauge\neddy_watch_connections {}",
        state.hub.connection_count()
    );
    {
        let f = state.node.fsync_stats();
        let _ = writeln!(out, "# TYPE eddy_fsync_seconds histogram");
        for (i, b) in FSYNC_BUCKETS_MICROS.iter().enumerate() {
            let _ = writeln!(
                out,
                "eddy_fsync_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1e6,
                f.buckets[i]
            );
        }
        let _ = writeln!(out, "eddy_fsync_seconds_bucket{{le=\"+Inf\"}} {}", f.count);
        let _ = writeln!(
            out,
            "eddy_fsync_seconds_sum {}",
            f.total_micros as f64 / 1e6
        );
        let _ = writeln!(out, "eddy_fsync_seconds_count {}", f.count);
    }
    crate::latency::render(&mut out);
    state.node.read(|st| {
        let _ = writeln!(out, "# TYPE eddy_queue_length gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_in_flight gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_consumers gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_dead_letters gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_dead_letters_dropped_total counter");
        let _ = writeln!(out, "# TYPE eddy_queue_payload_bytes gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_puts_total counter");
        let _ = writeln!(out, "# TYPE eddy_queue_commits_total counter");
        let _ = writeln!(out, "# TYPE eddy_queue_oldest_item_age_seconds gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_redeliveries_total counter");
        let _ = writeln!(out, "# TYPE eddy_queue_backlog gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_outstanding gauge");
        let _ = writeln!(out, "# TYPE eddy_group_backlog gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_window gauge");
        let _ = writeln!(out, "# TYPE eddy_queue_window_occupancy gauge");
        let _ = writeln!(out, "# TYPE eddy_group_in_flight gauge");
        let _ = writeln!(out, "# TYPE eddy_group_window gauge");
        let _ = writeln!(out, "# TYPE eddy_group_consumers gauge");
        for (name, svc) in &st.services {
            for kind in [QueueKind::Input, QueueKind::Sink] {
                let q = svc.queue(kind);
                let l = format!(
                    "service=\"{}\",queue=\"{}\"",
                    label_value(name),
                    kind.as_str()
                );
                let consumers: usize = q.groups.values().map(|g| g.consumers.len()).sum();
                let oldest = q.oldest_age_ms(now).unwrap_or(0);
                let _ = writeln!(out, "eddy_queue_length{{{l}}} {}", q.len());
                let _ = writeln!(out, "eddy_queue_in_flight{{{l}}} {}", q.in_flight_count());
                let _ = writeln!(out, "eddy_queue_consumers{{{l}}} {consumers}");
                let _ = writeln!(out, "eddy_queue_dead_letters{{{l}}} {}", q.dead.len());
                let _ = writeln!(
                    out,
                    "eddy_queue_dead_letters_dropped_total{{{l}}} {}",
                    q.dead_dropped_total
                );
                let _ = writeln!(out, "eddy_queue_payload_bytes{{{l}}} {}", q.bytes_held());
                let _ = writeln!(out, "eddy_queue_puts_total{{{l}}} {}", q.puts_total);
                let _ = writeln!(out, "eddy_queue_commits_total{{{l}}} {}", q.commits_total);
                let _ = writeln!(
                    out,
                    "eddy_queue_oldest_item_age_seconds{{{l}}} {}",
                    oldest as f64 / 1000.0
                );
                let _ = writeln!(
                    out,
                    "eddy_queue_redeliveries_total{{{l}}} {}",
                    q.redeliveries.0
                );
                let _ = writeln!(out, "eddy_queue_backlog{{{l}}} {}", q.backlog());
                let _ = writeln!(out, "eddy_queue_outstanding{{{l}}} {}", q.outstanding());
                let queue_window = q.running_window();
                for (group, g) in &q.groups {
                    let window = g.running_window();
                    let gl = format!("{l},group=\"{}\"", label_value(group));
                    let _ = writeln!(out, "eddy_group_backlog{{{gl}}} {}", q.group_backlog(group));
                    let _ = writeln!(out, "eddy_group_in_flight{{{gl}}} {}", g.in_flight.len());
                    let _ = writeln!(out, "eddy_group_window{{{gl}}} {window}");
                    let _ = writeln!(out, "eddy_group_consumers{{{gl}}} {}", g.consumers.len());
                }
                let _ = writeln!(out, "eddy_queue_window{{{l}}} {queue_window}");
                // In flight over the windows of running consumers: 1 means
                // every worker is busy (scale out), 0 with a backlog means
                // nobody takes work.
                let occupancy = if queue_window == 0 {
                    0.0
                } else {
                    q.in_flight_count() as f64 / queue_window as f64
                };
                let _ = writeln!(out, "eddy_queue_window_occupancy{{{l}}} {occupancy}");
            }
        }
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
