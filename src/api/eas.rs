//! The EAS queue-service endpoints (§3 of the protocol): one handler per
//! queue URL that dispatches on method and control parameters.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use bytes::Buf as _;
use http_body_util::BodyExt as _;
use prost::Message as _;

use super::params::{identity, priority};
use super::{ApiError, AppState, ConnectionCloser};
use crate::latency::Stage;
use crate::proto::{
    AttributesProto, CompleteBatchProto, CompleteBatchReplyProto, CompleteOutcomeProto,
    DataFrameListProto, DataFrameProto, PROTOBUF_MEDIA_TYPE,
};
use crate::queue::{
    Command, Frame, NewItem, QueueKind, QueueRef, Reply, Selector, Tags, validate_request_id,
};

use crate::protocol::{
    DUPLICATE_HEADER, GetOp, MAX_CODE_BYTES, MAX_COMPLETE_BATCH, MAX_REASON_BYTES, MAX_TAGS, Query,
    QueueOp, REQUEST_ID_HEADER, ReadOp, attributes, param,
};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/predict/{*rest}", any(predict))
        .route("/", any(bare_input))
        .route("/sink", any(bare_sink))
}

/// A resolved queue URL.
pub struct Target {
    pub queue: QueueRef,
    /// Sub-path of the input queue (`/api/predict/svc/a/b` → `a/b`).
    pub path: String,
}

fn resolve(rest: &str) -> Result<Target, ApiError> {
    let rest = rest.trim_matches('/');
    let (service, sub) = rest.split_once('/').unwrap_or((rest, ""));
    if service.is_empty() {
        return Err(ApiError::NotFound("no service in path".into()));
    }
    let sub = sub.trim_matches('/');
    check_sub_path(sub)?;
    Ok(if sub == "sink" {
        Target {
            queue: QueueRef::new(service, QueueKind::Sink),
            path: String::new(),
        }
    } else {
        Target {
            queue: QueueRef::new(service, QueueKind::Input),
            path: sub.to_string(),
        }
    })
}

/// Longest sub-path of a queue URL; it is stored with every item put
/// through it (the `_path_` tag) and replicated.
pub const MAX_SUB_PATH_BYTES: usize = 1024;
/// Most segments of a sub-path.
pub const MAX_SUB_PATH_SEGMENTS: usize = 32;

fn check_sub_path(sub: &str) -> Result<(), ApiError> {
    if sub.is_empty() {
        return Ok(());
    }
    if sub.len() > MAX_SUB_PATH_BYTES {
        return Err(ApiError::BadRequest(format!(
            "URL sub-path of {} bytes is longer than {MAX_SUB_PATH_BYTES}",
            sub.len()
        )));
    }
    let mut segments = 0;
    for segment in sub.split('/') {
        segments += 1;
        if segments > MAX_SUB_PATH_SEGMENTS {
            return Err(ApiError::BadRequest(format!(
                "URL sub-path has more than {MAX_SUB_PATH_SEGMENTS} segments"
            )));
        }
        if matches!(segment, "" | "." | "..") {
            return Err(ApiError::BadRequest(
                "URL sub-path has an empty, '.' or '..' segment".into(),
            ));
        }
    }
    Ok(())
}

/// A request to a queue URL, its query parsed.
pub struct Request {
    pub method: Method,
    pub query: Query,
    pub headers: HeaderMap,
    pub body: Body,
    pub ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    /// Ends the request's connection (HTTP/1 through [`super::serve_with`]).
    pub closer: Option<ConnectionCloser>,
}

/// A request to a queue URL as it arrived (the query not yet parsed: a
/// path that names no service is refused first on the bare paths).
pub struct RawRequest {
    method: Method,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    closer: Option<ConnectionCloser>,
}

impl<S: Send + Sync> FromRequest<S> for RawRequest {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let ws = WebSocketUpgrade::from_request_parts(&mut parts, state).await;
        Ok(Self {
            query: parts.uri.query().map(String::from),
            closer: parts.extensions.get::<ConnectionCloser>().cloned(),
            method: parts.method,
            headers: parts.headers,
            body,
            ws,
        })
    }
}

impl RawRequest {
    fn parse(self) -> Result<Request, ApiError> {
        Ok(Request {
            query: Query::parse(self.query.as_deref())?,
            method: self.method,
            headers: self.headers,
            body: self.body,
            ws: self.ws,
            closer: self.closer,
        })
    }
}

async fn predict(
    State(state): State<Arc<AppState>>,
    Path(rest): Path<String>,
    raw: RawRequest,
) -> Response {
    let served = async {
        let req = raw.parse()?;
        handle(state, resolve(&rest)?, req).await
    };
    served.await.unwrap_or_else(IntoResponse::into_response)
}

/// The bare `/` and `/sink` paths serve the default service.
async fn bare(state: Arc<AppState>, kind: QueueKind, raw: RawRequest) -> Response {
    let served = async {
        let Some(service) = state.config.default_service.clone() else {
            return Err(ApiError::NotFound(
                "no default service is configured; use /api/predict/{service}".into(),
            ));
        };
        let req = raw.parse()?;
        let target = Target {
            queue: QueueRef::new(service, kind),
            path: String::new(),
        };
        handle(state, target, req).await
    };
    served.await.unwrap_or_else(IntoResponse::into_response)
}

async fn bare_input(State(state): State<Arc<AppState>>, raw: RawRequest) -> Response {
    bare(state, QueueKind::Input, raw).await
}

async fn bare_sink(State(state): State<Arc<AppState>>, raw: RawRequest) -> Response {
    bare(state, QueueKind::Sink, raw).await
}

/// Check the service exists and the token matches (constant time).
/// Returns the service's payload limit for the addressed queue.
fn authorize(state: &AppState, queue: &QueueRef, headers: &HeaderMap) -> Result<u64, ApiError> {
    let (token, limit) = state
        .node
        .read(|s| {
            s.service(&queue.service).map(|svc| {
                (
                    svc.config.token.clone(),
                    // A config from an old snapshot was never validated:
                    // clamp it here.
                    svc.config
                        .limits(queue.kind)
                        .max_payload_bytes
                        .min(crate::queue::MAX_PAYLOAD_CEILING),
                )
            })
        })
        .ok_or_else(|| ApiError::NotFound(format!("no such service: {}", queue.service)))?;
    if !token.is_empty() {
        let given = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !crate::secret::matches(given, token.as_bytes()) {
            return Err(ApiError::Unauthorized(
                "invalid or missing token in Authorization".into(),
            ));
        }
    }
    Ok(limit)
}

fn wants_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(PROTOBUF_MEDIA_TYPE))
}

/// Authorize, parse, execute: a request to a queue URL.
async fn handle(state: Arc<AppState>, target: Target, req: Request) -> Result<Response, ApiError> {
    let limit = authorize(&state, &target.queue, &req.headers)?;
    let op = QueueOp::parse(req.method.as_str(), &req.query, req.ws.is_ok())?;
    execute(state, target, req, op, limit).await
}

async fn execute(
    state: Arc<AppState>,
    target: Target,
    req: Request,
    op: QueueOp,
    limit: u64,
) -> Result<Response, ApiError> {
    let queue = target.queue.clone();
    let command = match op {
        QueueOp::Put { priority } => {
            let started = std::time::Instant::now();
            let answer = put(&state, target, req, priority, limit).await;
            Stage::HttpPut.record(started.elapsed());
            return answer;
        }
        QueueOp::Complete { input_index } => {
            return complete(&state, target, req, input_index, limit).await;
        }
        QueueOp::CompleteBatch => return complete_batch(&state, target, req, limit).await,
        QueueOp::Watch(watch) => return super::watch::watch(state, queue, req, watch).await,
        QueueOp::Read { read, linearizable } => {
            // Reads observe every write acknowledged before them (read
            // index through the leader), unless the caller asks for a
            // local read; a take goes through the log anyway.
            if linearizable {
                state.node.linearize().await?;
            }
            return serve_read(&state, &queue, &req.headers, &req.query.tags, read).await;
        }
        QueueOp::EndOfStream { force } => Command::End { queue, force },
        QueueOp::Truncate { before } => Command::Truncate { queue, before },
        QueueOp::Delete { indexes } => Command::Delete { queue, indexes },
        QueueOp::Commit { indexes } => Command::Commit {
            queue,
            group: identity(&req.headers)?.0,
            indexes,
        },
        QueueOp::Negative {
            indexes,
            code,
            reason,
        } => negative(queue, req, indexes, code, reason).await?,
    };
    let started = std::time::Instant::now();
    let is_commit = matches!(command, Command::Commit { .. });
    let answer = state.node.propose(command).await;
    if is_commit {
        Stage::HttpCommit.record(started.elapsed());
    }
    expect_done(answer?)?;
    Ok("OK".into_response())
}

async fn serve_read(
    state: &AppState,
    queue: &QueueRef,
    headers: &HeaderMap,
    tags: &Tags,
    read: ReadOp,
) -> Result<Response, ApiError> {
    match read {
        ReadOp::Attributes => attrs(state, queue, headers),
        ReadOp::Search { index } => search(state, queue, index),
        ReadOp::Count { priority } => count(state, queue, priority, tags),
        ReadOp::DeadLetters { length } => dead(state, queue, length, headers),
        ReadOp::Get(op) => get(state, queue, op, tags, headers).await,
    }
}

fn expect_done(reply: Reply) -> Result<(), ApiError> {
    match reply {
        Reply::Rejected(r) => Err(r.into()),
        _ => Ok(()),
    }
}

/// Read a body, refusing more than `limit` bytes without buffering them.
///
/// The result is always a fresh allocation of exactly the body's size. A
/// body that arrived in one piece is otherwise a slice of the connection's
/// read buffer (8 KiB or more), and a stored item would keep that whole
/// buffer alive for as long as the item, its log entry or its retry-reply
/// lives: ~10 KiB of memory for every 256-byte put.
pub async fn read_body(body: Body, limit: u64) -> Result<Bytes, ApiError> {
    // Saturating: a limit of u64::MAX must not wrap to a limit of 0.
    let limited = http_body_util::Limited::new(
        body,
        usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_add(1),
    );
    let mut buf = limited
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::TooLarge(format!("payload exceeds the limit of {limit} bytes"))
            } else if super::BodyTimedOut::is_cause_of(&*e) {
                ApiError::Timeout(e.to_string())
            } else {
                ApiError::BadRequest(format!("reading body: {e}"))
            }
        })?
        .aggregate();
    let len = buf.remaining();
    if len as u64 > limit {
        return Err(ApiError::TooLarge(format!(
            "payload of {len} bytes exceeds the limit of {limit} bytes"
        )));
    }
    let mut exact = Vec::with_capacity(len);
    while buf.has_remaining() {
        let chunk = buf.chunk();
        exact.extend_from_slice(chunk);
        let n = chunk.len();
        buf.advance(n);
    }
    Ok(Bytes::from(exact))
}

/// The body size a request declares (`Content-Length`), if it does.
fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))
        })
        .transpose()
}

async fn put(
    state: &AppState,
    target: Target,
    req: Request,
    priority_in_query: Option<u32>,
    limit: u64,
) -> Result<Response, ApiError> {
    let priority = priority(priority_in_query, &req.headers)?;
    // Refuse early when the node is already full, before buffering a body:
    // the declared size is reserved while the body is read.
    let declared = declared_length(&req.headers)?;
    if let Some(n) = declared
        && n > limit
    {
        return Err(ApiError::TooLarge(format!(
            "payload of {n} bytes exceeds the limit of {limit} bytes"
        )));
    }
    let reading = state.memory.admit(&state.node, declared.unwrap_or(0))?;
    let data = read_body(req.body, limit).await?;
    drop(reading);
    let _admitted = state.memory.admit(&state.node, data.len() as u64)?;
    let mut tags = req.query.tags;
    // A caller's request id is kept (results are written under the input's
    // id, and on the input queue it makes a retried put idempotent).
    let request_id = match tags.remove(crate::protocol::REQUEST_ID_TAG) {
        Some(id) => {
            validate_request_id(&id)?;
            id
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    let traceparent = trace_context(&req.headers, &mut tags)?;
    let span = tracing::debug_span!(
        "put",
        queue = %target.queue,
        request_id = %request_id,
        traceparent = traceparent.as_deref().unwrap_or_default(),
    );
    let item = NewItem {
        request_id,
        tags,
        data,
        priority,
        path: target.path,
    };
    let reply = {
        use tracing::Instrument as _;
        state
            .node
            .propose(Command::Put {
                queue: target.queue,
                item,
            })
            .instrument(span.clone())
            .await?
    };
    match reply {
        Reply::Put { index, request_id } => {
            span.in_scope(|| tracing::debug!(index, "put acknowledged"));
            let mut resp = index.to_string().into_response();
            resp.headers_mut().insert(
                REQUEST_ID_HEADER,
                HeaderValue::from_str(&request_id)
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            );
            Ok(resp)
        }
        Reply::Rejected(r) => Err(r.into()),
        other => Err(ApiError::Internal(format!(
            "unexpected reply to put: {other:?}"
        ))),
    }
}

/// A `traceparent` tag a caller names must be a W3C traceparent (400
/// otherwise).
fn check_traceparent_tag(tags: &Tags) -> Result<(), ApiError> {
    match tags.get(crate::protocol::TRACEPARENT_TAG) {
        Some(t) if !crate::protocol::valid_traceparent(t) => Err(ApiError::BadRequest(format!(
            "tag traceparent is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>): {t:?}"
        ))),
        _ => Ok(()),
    }
}

/// A put's trace context. A `traceparent` tag given in the query must be a
/// W3C traceparent (400 otherwise: the caller named it on purpose); the
/// `traceparent` header, when well formed, takes its place, and a
/// malformed header is ignored, as the W3C recommendation asks of a
/// receiver. Either way it counts within the tag limit.
fn trace_context(headers: &HeaderMap, tags: &mut Tags) -> Result<Option<String>, ApiError> {
    use crate::protocol::{MAX_TAGS, TRACEPARENT_HEADER, TRACEPARENT_TAG, valid_traceparent};
    check_traceparent_tag(tags)?;
    if let Some(header) = headers
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|t| valid_traceparent(t))
    {
        tags.insert(TRACEPARENT_TAG.to_string(), header.to_string());
        if tags.len() > MAX_TAGS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_TAGS} tags per request, the traceparent header included"
            )));
        }
    }
    Ok(tags.get(TRACEPARENT_TAG).cloned())
}

/// The engine's atomic "write the result and commit the input":
/// `POST {service}/sink?_complete_=<input index>&requestId=<id>[&lastCode=..]`
/// with the result as body (empty: commit only), identity of the input
/// consumer group. Answers the sink index (empty if nothing was written).
async fn complete(
    state: &AppState,
    target: Target,
    req: Request,
    input_index: u64,
    limit: u64,
) -> Result<Response, ApiError> {
    check_sink(&target)?;
    let (group, _) = identity(&req.headers)?;
    let tags = req.query.tags;
    let request_id = complete_request_id(state, &target, input_index, &tags)?;
    // No node memory admission here: completing frees the input item as it
    // stores the result, and refusing it would keep the input from draining.
    // The sink's own max_bytes bounds results.
    let data = read_body(req.body, limit).await?;
    let command = complete_command(target.queue.service, group, input_index, tags, data);
    let (sink_index, duplicate) = completed(state.node.propose(command).await?)?;
    let mut resp = sink_index
        .map(|i| i.to_string())
        .unwrap_or_default()
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        REQUEST_ID_HEADER,
        HeaderValue::from_str(&request_id).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    h.insert(
        DUPLICATE_HEADER,
        HeaderValue::from_static(if duplicate { "true" } else { "false" }),
    );
    Ok(resp)
}

/// Several completes in one request, for the engine:
/// `POST {service}/sink?_complete_=batch` with a `CompleteBatchProto` body
/// (at most [`MAX_COMPLETE_BATCH`] items, the whole body within the sink's
/// payload limit), identity of the input consumer group. Each item is
/// checked and proposed as one `_complete_` would be, and all are proposed
/// at once, so they travel in the same few log entries; the answer is a
/// `CompleteBatchReplyProto` with one outcome per item, in order. A refusal
/// of the whole request (not the sink, no identity, a body that is too
/// large or does not decode) changes nothing.
async fn complete_batch(
    state: &AppState,
    target: Target,
    req: Request,
    limit: u64,
) -> Result<Response, ApiError> {
    check_sink(&target)?;
    let (group, _) = identity(&req.headers)?;
    if !req.query.tags.is_empty() {
        return Err(ApiError::BadRequest(
            "a batch of completes carries each item's tags in its body, not in the query".into(),
        ));
    }
    let body = read_body(req.body, limit).await?;
    let batch = decode_complete_batch(&body)?;
    let target = &target;
    let group = &group;
    let outcomes = futures::future::join_all(batch.items.into_iter().map(|item| async move {
        let input_index = item.input_index;
        let tags: Tags = item.tags.into_iter().collect();
        let answer = async {
            crate::protocol::check_tags(&tags)?;
            complete_request_id(state, target, input_index, &tags)?;
            let command = complete_command(
                target.queue.service.clone(),
                group.clone(),
                input_index,
                tags,
                item.result,
            );
            completed(state.node.propose(command).await?)
        }
        .await;
        match answer {
            Ok((sink_index, duplicate)) => CompleteOutcomeProto {
                status: 200,
                sink_index: sink_index.unwrap_or(0),
                duplicate,
                error: String::new(),
            },
            Err(e) => CompleteOutcomeProto {
                status: u32::from(e.status().as_u16()),
                sink_index: 0,
                duplicate: false,
                error: e.to_string(),
            },
        }
    }))
    .await;
    let reply = CompleteBatchReplyProto { outcomes };
    Ok((
        [(header::CONTENT_TYPE, PROTOBUF_MEDIA_TYPE)],
        reply.encode_to_vec(),
    )
        .into_response())
}

/// A batch's body, counted (see [`check_batch_counts`]) then decoded from
/// a slice, so that each result is its own exact-size copy: a `Bytes` cut
/// from the body would keep the whole body alive for as long as the stored
/// result, unseen by the memory budget.
fn decode_complete_batch(body: &[u8]) -> Result<CompleteBatchProto, ApiError> {
    check_batch_counts(body)?;
    CompleteBatchProto::decode(body).map_err(malformed_batch)
}

fn malformed_batch(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("a batch of completes is a CompleteBatchProto: {e}"))
}

/// Refuses a batch with more than [`MAX_COMPLETE_BATCH`] items or an item
/// with more than [`MAX_TAGS`] tags before it is decoded: decoding first
/// would let a small body take far more memory than its size (an empty item
/// is 2 bytes on the wire and about 90 in memory, an empty tag 2 and about
/// 60), only to be refused afterwards.
fn check_batch_counts(body: &[u8]) -> Result<(), ApiError> {
    let mut items = 0;
    for_each_field(body, |number, item| {
        if number != 1 {
            return Ok(());
        }
        items += 1;
        if items > MAX_COMPLETE_BATCH {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_COMPLETE_BATCH} completes in a batch"
            )));
        }
        let mut tags = 0;
        for_each_field(item, |number, _| {
            if number == 2 {
                tags += 1;
                if tags > MAX_TAGS {
                    return Err(ApiError::BadRequest(format!(
                        "item {items} of the batch: at most {MAX_TAGS} tags per request"
                    )));
                }
            }
            Ok(())
        })
    })
}

/// Calls `f` with the number of each top-level field of the protobuf
/// message in a batch's `buf` and, for a length-delimited field, its bytes
/// (empty for the others), without decoding anything. Bytes that are not
/// such a message are a malformed batch.
fn for_each_field(
    mut buf: &[u8],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let varint = |buf: &mut &[u8]| prost::decode_length_delimiter(buf).map_err(malformed_batch);
    while !buf.is_empty() {
        let key = varint(&mut buf)? as u64;
        let (number, wire_type) = (key >> 3, key & 7);
        let len = match wire_type {
            0 => {
                varint(&mut buf)?;
                0
            }
            1 => 8,
            2 => varint(&mut buf)?,
            5 => 4,
            other => {
                return Err(malformed_batch(format!(
                    "field {number}: wire type {other} is not used by this message"
                )));
            }
        };
        if len > buf.len() {
            return Err(malformed_batch(format!(
                "field {number} runs past the end of the body"
            )));
        }
        let (value, rest) = buf.split_at(len);
        buf = rest;
        f(number, if wire_type == 2 { value } else { &[] })?;
    }
    Ok(())
}

fn check_sink(target: &Target) -> Result<(), ApiError> {
    if target.queue.kind != QueueKind::Sink {
        return Err(ApiError::BadRequest(
            "_complete_ is an operation of the sink queue".into(),
        ));
    }
    Ok(())
}

/// A complete's checks before anything is proposed (a refusal must change
/// nothing): the input index given, the request id given and well formed,
/// a traceparent tag well formed, and no input item at that index with
/// another request id. Returns the request id.
fn complete_request_id(
    state: &AppState,
    target: &Target,
    input_index: u64,
    tags: &Tags,
) -> Result<String, ApiError> {
    if input_index == 0 {
        return Err(ApiError::BadRequest(
            "_complete_ needs the input item's index".into(),
        ));
    }
    let request_id = tags
        .get(crate::protocol::REQUEST_ID_TAG)
        .cloned()
        .ok_or_else(|| ApiError::BadRequest("requestId is required with _complete_".into()))?;
    check_traceparent_tag(tags)?;
    validate_request_id(&request_id)?;
    // An index names one item forever, so an input item seen here with
    // another request id is a mismatch on every replica. (The state machine
    // checks again when a result is written; this also covers commit-only.)
    let held = state.node.read(|s| {
        s.service(&target.queue.service)
            .and_then(|svc| svc.input.items.get(&input_index))
            .map(|it| it.request_id.to_string())
    });
    if let Some(held) = held
        && held != request_id
    {
        return Err(crate::queue::Rejection::RequestMismatch {
            index: input_index,
            held,
            given: request_id,
        }
        .into());
    }
    Ok(request_id)
}

/// The command of a checked complete: the result (the data, unless empty)
/// carries the request id and the other tags.
fn complete_command(
    service: String,
    group: String,
    input_index: u64,
    mut tags: Tags,
    data: Bytes,
) -> Command {
    let request_id = tags
        .remove(crate::protocol::REQUEST_ID_TAG)
        .unwrap_or_default();
    let result = (!data.is_empty()).then(|| NewItem {
        request_id,
        tags,
        data,
        priority: 0,
        path: String::new(),
    });
    Command::Complete {
        service,
        group,
        input_index,
        result,
    }
}

/// A complete's reply: the sink index written (none for commit only or a
/// duplicate) and whether a result was already there.
fn completed(reply: Reply) -> Result<(Option<u64>, bool), ApiError> {
    match reply {
        Reply::Completed {
            sink_index,
            duplicate,
        } => Ok((sink_index, duplicate)),
        Reply::Rejected(r) => Err(r.into()),
        other => Err(ApiError::Internal(format!(
            "unexpected reply to complete: {other:?}"
        ))),
    }
}

pub fn frame_proto(f: Frame) -> DataFrameProto {
    DataFrameProto {
        index: f.index,
        tags: f.tags.into_iter().collect(),
        data: f.data,
        message: f.message,
        deliveries: f.deliveries,
    }
}

/// Content type of a bare payload, as the EAS documentation shows it.
const RAW_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

fn frames_response(frames: Vec<Frame>, headers: &HeaderMap, raw: bool) -> Response {
    if frames.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    if raw {
        let first = frames.into_iter().next().expect("non-empty");
        return ([(header::CONTENT_TYPE, RAW_CONTENT_TYPE)], first.data).into_response();
    }
    if wants_protobuf(headers) {
        let list = DataFrameListProto {
            index: frames.into_iter().map(frame_proto).collect(),
        };
        (
            [(header::CONTENT_TYPE, PROTOBUF_MEDIA_TYPE)],
            list.encode_to_vec(),
        )
            .into_response()
    } else {
        let list: Vec<serde_json::Value> = frames
            .into_iter()
            .map(|f| {
                let mut v = serde_json::json!({
                    "index": f.index,
                    "tags": f.tags,
                    "data": base64::engine::general_purpose::STANDARD.encode(&f.data),
                });
                if !f.message.is_empty() {
                    v["message"] = f.message.into();
                }
                v
            })
            .collect();
        axum::Json(list).into_response()
    }
}

async fn get(
    state: &AppState,
    queue: &QueueRef,
    op: GetOp,
    tags: &Tags,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // `_raw_=false` (what every SDK sends) answers a list of frames;
    // `_raw_=true` and, as in the EAS documentation's curl examples, no
    // `_raw_` at all answer the first item's payload itself, unless the
    // caller asks for protobuf. A bare payload is one item, so it reads
    // (and with `_auto_delete_`, deletes) one item only.
    let raw = op.raw.unwrap_or_else(|| !wants_protobuf(headers));
    let selector = Selector {
        from_index: op.from_index,
        length: if raw { 1 } else { op.length as u32 },
        tags: tags.clone(),
    };
    let auto_delete = op.auto_delete;
    let deadline = tokio::time::Instant::now() + op.timeout;
    let peek = |selector: &Selector| {
        state
            .node
            .read(|s| s.queue(queue).map(|q| q.peek(selector)))
            .ok_or_else(|| ApiError::NotFound(format!("no such service: {}", queue.service)))
    };
    // Whether this node's state holds an item for a waiting take.
    let probe = Selector {
        length: 1,
        ..selector.clone()
    };
    let mut first_try = true;
    let changes = state.hub.changes_of(queue);
    loop {
        // Subscribe before looking, so a put between look and wait wakes us.
        let changed = changes.notified();
        // A take is a log entry. After the first try (which may find items
        // this node has not applied yet) it is proposed only once this
        // node's state holds an item to take: waking up for a change to
        // another queue costs the log nothing.
        let try_take = auto_delete && (first_try || !peek(&probe)?.is_empty());
        first_try = false;
        let frames = if try_take {
            match state
                .node
                .propose(Command::Take {
                    queue: queue.clone(),
                    selector: selector.clone(),
                })
                .await?
            {
                Reply::Items(frames) => frames,
                Reply::Rejected(r) => return Err(r.into()),
                other => {
                    return Err(ApiError::Internal(format!(
                        "unexpected reply to take: {other:?}"
                    )));
                }
            }
        } else if auto_delete {
            Vec::new()
        } else {
            peek(&selector)?
        };
        if !frames.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(frames_response(frames, headers, raw));
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

fn attrs(state: &AppState, queue: &QueueRef, headers: &HeaderMap) -> Result<Response, ApiError> {
    let now = state.node.cluster_clock_ms();
    let map = state
        .node
        .read(|s| {
            s.service(&queue.service).map(|svc| {
                attributes(
                    &queue.service,
                    &svc.config,
                    queue.kind,
                    svc.queue(queue.kind),
                    now,
                )
            })
        })
        .ok_or_else(|| ApiError::NotFound(format!("no such service: {}", queue.service)))?;
    if wants_protobuf(headers) {
        let proto = AttributesProto {
            attributes: map.into_iter().collect(),
        };
        Ok((
            [(header::CONTENT_TYPE, PROTOBUF_MEDIA_TYPE)],
            proto.encode_to_vec(),
        )
            .into_response())
    } else {
        Ok(axum::Json(map).into_response())
    }
}

fn search(state: &AppState, queue: &QueueRef, index: u64) -> Result<Response, ApiError> {
    let found = state.node.read(|s| s.queue(queue).map(|q| q.search(index)));
    match found {
        None => Err(ApiError::NotFound(format!(
            "no such service: {}",
            queue.service
        ))),
        Some(None) => Ok(axum::Json(serde_json::json!({})).into_response()),
        Some(Some((pending, wait))) => Ok(axum::Json(
            serde_json::json!({"IsPending": pending, "WaitCount": wait}),
        )
        .into_response()),
    }
}

fn count(
    state: &AppState,
    queue: &QueueRef,
    prio: Option<u32>,
    tags: &Tags,
) -> Result<Response, ApiError> {
    let n = state
        .node
        .read(|s| s.queue(queue).map(|qu| qu.count(prio, tags)))
        .ok_or_else(|| ApiError::NotFound(format!("no such service: {}", queue.service)))?;
    Ok(n.to_string().into_response())
}

fn dead(
    state: &AppState,
    queue: &QueueRef,
    length: u64,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let limit = length as usize;
    let frames = state
        .node
        .read(|s| s.queue(queue).map(|qu| qu.dead_letters(limit)))
        .ok_or_else(|| ApiError::NotFound(format!("no such service: {}", queue.service)))?;
    Ok(frames_response(frames, headers, false))
}

/// Largest form body of a hand-back (its code and reason, encoded).
const MAX_HAND_BACK_FORM_BYTES: u64 = 64 * 1024;

/// The `Negative` command of a hand-back: its code and reason come from a
/// form body when there is one, else from the query.
async fn negative(
    queue: QueueRef,
    req: Request,
    indexes: Vec<u64>,
    code: Option<String>,
    reason: Option<String>,
) -> Result<Command, ApiError> {
    let (group, _) = identity(&req.headers)?;
    let body = read_body(req.body, MAX_HAND_BACK_FORM_BYTES).await?;
    let form = Query::parse(Some(&String::from_utf8_lossy(&body)))?;
    let code = form
        .get(param::CODE)
        .map(String::from)
        .or(code)
        .unwrap_or_default();
    let reason = form
        .get(param::REASON)
        .map(String::from)
        .or(reason)
        .unwrap_or_default();
    if code.len() > MAX_CODE_BYTES || reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::BadRequest("_code_ or _reason_ too long".into()));
    }
    Ok(Command::Negative {
        queue,
        group,
        indexes,
        code,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_item(tags: usize, result: &[u8]) -> crate::proto::CompleteProto {
        crate::proto::CompleteProto {
            input_index: 7,
            tags: (0..tags)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
            result: Bytes::copy_from_slice(result),
        }
    }

    /// A batch is counted before it is decoded: a small body of many empty
    /// items (2 bytes each on the wire, about 90 in memory) or of an item
    /// with many empty tags is refused without being decoded.
    #[test]
    fn a_batch_is_counted_before_it_is_decoded() {
        let bad = |body: &[u8]| match decode_complete_batch(body) {
            Err(ApiError::BadRequest(text)) => text,
            other => panic!("not refused: {other:?}"),
        };
        let empty_items = [0x0a, 0x00].repeat(1_000_000);
        assert!(bad(&empty_items).contains("at most 256 completes"));
        let mut many_tags = vec![0x0a];
        let tags = [0x12, 0x00].repeat(MAX_TAGS + 1);
        prost::encode_length_delimiter(tags.len(), &mut many_tags).unwrap();
        many_tags.extend_from_slice(&tags);
        assert!(
            bad(&many_tags).contains("at most 32 tags"),
            "{}",
            bad(&many_tags)
        );
        assert!(bad(b"\x0a\x05ab").contains("past the end"));
        assert!(bad(b"\x0b").contains("wire type 3"));
        let full = CompleteBatchProto {
            items: (0..MAX_COMPLETE_BATCH)
                .map(|_| batch_item(MAX_TAGS, b"r"))
                .collect(),
        };
        let decoded = decode_complete_batch(&full.encode_to_vec()).unwrap();
        assert_eq!(decoded, full);
    }

    /// Each result of a decoded batch is its own copy: one that pointed into
    /// the request's body would keep all of it alive with the stored result.
    #[test]
    fn a_decoded_result_does_not_share_the_body() {
        let batch = CompleteBatchProto {
            items: vec![batch_item(1, b"first"), batch_item(0, &[7; 1000])],
        };
        let body = Bytes::from(batch.encode_to_vec());
        let range = body.as_ptr_range();
        let decoded = decode_complete_batch(&body).unwrap();
        assert_eq!(decoded, batch);
        for item in &decoded.items {
            assert!(
                !range.contains(&item.result.as_ptr()),
                "a result points into the body"
            );
        }
    }

    /// A payload limit of u64::MAX (a config never validated) reads the
    /// body instead of wrapping to a limit of nothing.
    #[tokio::test]
    async fn read_body_takes_the_largest_limit() {
        let body = read_body(Body::from("payload"), u64::MAX).await.unwrap();
        assert_eq!(&body[..], b"payload");
        let refused = read_body(Body::from("payload"), 3).await;
        assert!(matches!(refused, Err(ApiError::TooLarge(_))));
    }
}
