//! The HTTP face of a node: the only module that knows axum.
//!
//! - `eas`: the PAI-EAS queue-service protocol (put, get, commit, ...).
//! - `watch`: WebSocket and HTTP-streaming watches, and the hub that routes
//!   state-machine delivery events to this node's connections.
//! - `admin`: services, cluster status, health, readiness and metrics.
//! - `console`: the web console at `/ui` (server-rendered pages and the
//!   operator actions behind the admin token).
//! - `engine_http`: the engine's synchronous endpoint and the demo model.
//!
//! Errors map to status codes in one place ([`ApiError`]); every refusal has
//! a short text body and changes nothing.

mod admin;
mod console;
mod eas;
mod engine_http;
mod params;
mod watch;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::queue::Rejection;
use crate::raft::{ProposeError, RaftNode};

pub use engine_http::{DEFAULT_SYNC_MAX_BODY_BYTES, DemoModel, demo_model_router, sync_router};
pub use watch::Hub;

/// Shared by every handler.
pub struct AppState {
    pub node: Arc<RaftNode>,
    pub hub: Arc<Hub>,
    /// The node's configuration (tokens, client TLS, watch limits, the
    /// default service), as the node was started with it.
    pub config: Arc<crate::config::NodeConfig>,
    /// Admission control of this node: puts are refused (429) once the
    /// estimated memory of the items held would pass this.
    pub memory: MemoryBudget,
    /// Set by an operator before maintenance: this node closes its watch
    /// connections, refuses new ones and reports not ready.
    pub draining: std::sync::atomic::AtomicBool,
    /// Per-queue rates shown by the console.
    pub console_rates: console::Rates,
}

/// Per-node memory admission, checked at the API edge before proposing and
/// never inside `apply`: replicas may run with different limits, and the
/// replicated state must not depend on them.
///
/// The estimate is the payload bytes the state holds, plus
/// [`ITEM_OVERHEAD_BYTES`] per stored item, plus what items hold in tags,
/// sub-paths, messages and request ids that are not UUIDs
/// ([`crate::queue::QueueState::meta_bytes_held`]), plus what the de-duplication
/// table holds (ids remembered for retries and the take replies kept with
/// their items: [`crate::queue::QueueState::dedup_bytes`]), plus the
/// payloads of puts that were admitted and are still being proposed (so
/// concurrent puts cannot all pass the same check).
pub struct MemoryBudget {
    pub max_bytes: u64,
    in_flight: std::sync::atomic::AtomicU64,
}

/// Memory an item costs beyond its payload (item record, request-id and
/// ready indexes, the log's share, allocator slack): each node of a
/// three-node cluster holding 1,000,100 items of 256 bytes (node-assigned
/// request ids, no consumer group) took 533 MiB more than empty, ~303
/// bytes per item beyond the payload; a consumer group's ready set adds
/// ~35 per group, hence the margin. Tags and client-chosen request ids are
/// counted apart, by what they hold.
pub const ITEM_OVERHEAD_BYTES: u64 = 400;

impl MemoryBudget {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            in_flight: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Reserve `size` payload bytes for a put, or refuse it. The reservation
    /// is released when the guard drops (the put was applied or failed).
    pub fn admit(&self, node: &RaftNode, size: u64) -> Result<Admitted<'_>, ApiError> {
        use std::sync::atomic::Ordering;
        let now = crate::raft::now_ms();
        let (items_held, dedup) = node.read(|s| {
            let items: u64 = s
                .services
                .values()
                .map(|svc| (svc.input.len() + svc.sink.len()) as u64)
                .sum();
            (
                s.payload_bytes_held() + s.meta_bytes_held() + items * ITEM_OVERHEAD_BYTES,
                s.dedup_bytes(now),
            )
        });
        let held = items_held + dedup;
        let cost = size + ITEM_OVERHEAD_BYTES;
        let before = self.in_flight.fetch_add(cost, Ordering::AcqRel);
        let guard = Admitted { budget: self, cost };
        if held.saturating_add(before).saturating_add(cost) > self.max_bytes {
            return Err(ApiError::Full(format!(
                "node memory limit reached: items held take about {items_held} bytes, \
                 replies kept for retries {dedup} bytes (for 30 s), and this put {cost} more, \
                 over the node's limit of {} bytes (--max-memory-bytes); consume or delete \
                 items, or retry later",
                self.max_bytes
            )));
        }
        Ok(guard)
    }
}

/// Payload bytes reserved by an admitted put.
pub struct Admitted<'a> {
    budget: &'a MemoryBudget,
    cost: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.budget
            .in_flight
            .fetch_sub(self.cost, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A refusal with its status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Full(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request body did not arrive in time.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::protocol::QueryError> for ApiError {
    fn from(e: crate::protocol::QueryError) -> Self {
        ApiError::BadRequest(e.0)
    }
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Full(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, format!("{self}\n")).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        let text = r.to_string();
        match r {
            Rejection::NoSuchService(_) => ApiError::NotFound(text),
            Rejection::ServiceExists(_) => ApiError::Conflict(text),
            Rejection::Full(_) | Rejection::FullBytes { .. } | Rejection::SinkFull(_) => {
                ApiError::Full(text)
            }
            Rejection::TooLarge { .. } => ApiError::TooLarge(text),
            Rejection::Invalid(_) => ApiError::BadRequest(text),
            // Leader housekeeping only; never the answer to a client call.
            Rejection::StaleTerm { .. } => ApiError::Unavailable(text),
            Rejection::RequestMismatch { .. } => ApiError::Conflict(text),
            Rejection::InputGone { .. } | Rejection::ReplyNotKept => ApiError::Gone(text),
        }
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NoSpace(m) => ApiError::InsufficientStorage(m),
            // The details are in the node's log; clients only need to know
            // to go elsewhere.
            ProposeError::Fatal(m) => {
                tracing::error!(error = %m, "request refused: this node has stopped");
                ApiError::Unavailable("this node cannot write after a fault (see its log)".into())
            }
            ProposeError::ShuttingDown => {
                ApiError::Unavailable("this node is shutting down: send to another node".into())
            }
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(admin::routes())
        .merge(console::routes())
        .merge(eas::routes())
        // Payload limits are per service and checked by the put handler.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// How long the listener waits after a failed accept (out of descriptors,
/// say) before it tries again, instead of spinning.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Limits on the HTTP listener, applied before any request is parsed.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Connections served at once; more wait in the kernel's backlog, so a
    /// flood of idle connections cannot take every descriptor (the peer
    /// gRPC port needs some too).
    pub max_connections: usize,
    /// A request's headers must arrive within this (slow or half-sent
    /// requests are dropped); it also bounds an idle keep-alive connection.
    pub header_read_timeout: std::time::Duration,
    /// A request's whole body must arrive within this, counted from its
    /// headers: a body sent slowly or never finished cannot hold a
    /// connection (and the memory of what it sent) for ever.
    pub body_timeout: std::time::Duration,
    /// When set, a connection whose peer stopped answering at the TCP level
    /// (its host died, the network between was cut) is aborted by the
    /// kernel within about this long, even when nothing is being sent: TCP
    /// keepalive probes start after half of it, and `TCP_USER_TIMEOUT`
    /// aborts once data or probes went unacknowledged for all of it. A
    /// watch holding items it already received is otherwise silent on an
    /// HTTP stream, and only this detects the dead peer. A peer whose host
    /// is up acknowledges both however stuck its process is.
    pub dead_peer_timeout: Option<std::time::Duration>,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: crate::config::DEFAULT_HEADER_READ_TIMEOUT,
            body_timeout: crate::config::DEFAULT_BODY_TIMEOUT,
            dead_peer_timeout: None,
        }
    }
}

/// Set keepalive and `TCP_USER_TIMEOUT` on an accepted connection so that a
/// dead peer is found within about `timeout` (see
/// [`ListenerLimits::dead_peer_timeout`]).
pub fn detect_dead_peer(
    stream: &tokio::net::TcpStream,
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    use std::time::Duration;
    // Keepalive counts in whole seconds: probe after half the limit, then
    // about six times within it; the user timeout ends the connection once
    // the limit has passed without an answer.
    let secs = timeout.as_secs().max(2);
    let idle = Duration::from_secs(secs / 2);
    let interval = Duration::from_secs((secs / 6).max(1));
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(((secs - idle.as_secs()) / interval.as_secs()).max(1) as u32 + 1),
    )?;
    sock.set_tcp_user_timeout(Some(timeout.max(Duration::from_secs(1))))
}

/// Lets a handler end the HTTP/1 connection its request came on, at once
/// and whatever the connection is doing: a response body whose client
/// stopped reading cannot be finished (the end of a chunked body is one
/// more write to a full socket), and the connection would keep its slot of
/// [`ListenerLimits::max_connections`] for as long as the client stays
/// silent. Present in a request's extensions for HTTP/1 requests only (an
/// HTTP/2 connection carries other requests' streams).
#[derive(Clone, Debug, Default)]
pub struct ConnectionCloser(Arc<tokio::sync::Notify>);

impl ConnectionCloser {
    /// Abort the connection (a TCP reset: what is still unsent is dropped).
    pub fn close(&self) {
        self.0.notify_one();
    }

    async fn closed(&self) {
        self.0.notified().await;
    }
}

/// The error of a request body that did not arrive within
/// [`ListenerLimits::body_timeout`].
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub std::time::Duration);

impl BodyTimedOut {
    /// Whether `e`, or an error it wraps, is a body timeout.
    pub fn is_cause_of(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(e);
        while let Some(err) = cause {
            if err.is::<BodyTimedOut>() {
                return true;
            }
            cause = err.source();
        }
        false
    }
}

/// A request body that fails with [`BodyTimedOut`] once its deadline has
/// passed before it ended.
struct DeadlineBody<B> {
    inner: B,
    timeout: std::time::Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<B> hyper::body::Body for DeadlineBody<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(self.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The client port's connection before its first request, which the
/// server starts by reading up to the length of the HTTP/2 preface to tell
/// the protocol version, with no timeout of its own. Reads fail with
/// `TimedOut` once the deadline has passed before those bytes arrived (a
/// client that connects and says nothing, or half a preface, would
/// otherwise hold its connection slot for ever; past them, the header-read
/// timeout applies), and with `InvalidData` if they are the HTTP/2 preface:
/// the port speaks HTTP/1.1 (every SDK does, and WebSocket upgrades from
/// it), and an HTTP/2 connection without streams that answers pings would
/// keep its slot for ever.
struct PrefaceGuard<S> {
    inner: S,
    /// Until a byte read differs from the HTTP/2 preface; then the
    /// connection is HTTP/1 and reads pass straight through.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// How many bytes of the HTTP/2 preface were read so far.
    seen: usize,
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<S> PrefaceGuard<S> {
    fn new(inner: S, within: std::time::Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            seen: 0,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for PrefaceGuard<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        if self.deadline.is_none() {
            return std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let fresh = &buf.filled()[before..];
        if !fresh.is_empty() {
            let seen = self.seen;
            let compared = fresh.len().min(H2_PREFACE.len() - seen);
            if fresh[..compared] != H2_PREFACE[seen..seen + compared] {
                // Not HTTP/2: from here on the header-read timeout applies.
                self.deadline = None;
            } else {
                self.seen += compared;
                if self.seen == H2_PREFACE.len() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "HTTP/2 is not served on this port",
                    )));
                }
            }
            return read;
        }
        if let (Poll::Pending, Some(deadline)) = (&read, self.deadline.as_mut())
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within the header-read timeout",
            )));
        }
        read
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for PrefaceGuard<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, within `limits`
/// (a request body must arrive within the body timeout), over TLS when `tls` is given (the handshake, too, must finish within the
/// header-read timeout). Each request carries the caller's address
/// (`ConnectInfo`): admin routes without a token answer loopback callers
/// only, and the audit log names it.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ListenerLimits,
    tls: Option<crate::tls::ClientPortTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::extract::ConnectInfo;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // HTTP/1.1 only (see `PrefaceGuard`); an idle HTTP/1 connection is
    // closed by the header-read timeout.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        if let Some(timeout) = limits.dead_peer_timeout
            && let Err(e) = detect_dead_peer(&stream, timeout)
        {
            tracing::debug!(error = %e, %peer, "could not set keepalive on a connection");
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let closer = ConnectionCloser::default();
        let app = app.clone();
        let body_timeout = limits.body_timeout;
        let request_closer = closer.clone();
        let service = tower::ServiceBuilder::new()
            .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                use hyper::body::Body as _;
                let mut req = if req.body().is_end_stream() {
                    req.map(axum::body::Body::new)
                } else {
                    req.map(|inner| {
                        axum::body::Body::new(DeadlineBody {
                            inner,
                            timeout: body_timeout,
                            deadline: Box::pin(tokio::time::sleep(body_timeout)),
                        })
                    })
                };
                req.extensions_mut().insert(ConnectInfo(peer));
                if req.version() <= axum::http::Version::HTTP_11 {
                    req.extensions_mut().insert(request_closer.clone());
                }
                req
            })
            .service(app);
        let service = TowerToHyperService::new(service);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let stream = PrefaceGuard::new(stream, handshake_timeout);
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    serve_until_closed(watcher.watch(conn.into_owned()), &closer, fd).await
                }
                Some(tls) => {
                    match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let stream = PrefaceGuard::new(stream, handshake_timeout);
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            serve_until_closed(watcher.watch(conn.into_owned()), &closer, fd).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Drive one connection until it ends, or until a handler asks for it to
/// be closed: then reset it (socket `fd`, still open while `conn` lives) and
/// drop it, which frees its descriptor and its connection slot.
async fn serve_until_closed<E>(
    conn: impl std::future::Future<Output = Result<(), E>>,
    closer: &ConnectionCloser,
    fd: std::os::fd::RawFd,
) -> Result<(), E> {
    tokio::pin!(conn);
    tokio::select! {
        result = &mut conn => return result,
        () = closer.closed() => {}
    }
    // SAFETY: `conn` owns the socket and is alive until this returns, so
    // `fd` is open and is this connection's.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&socket).set_linger(Some(std::time::Duration::ZERO));
    Ok(())
}

/// [`serve_with`] with the default limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, ListenerLimits::default(), None, shutdown).await
}
