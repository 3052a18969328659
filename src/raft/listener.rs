//! The peer gRPC port's accept loop: a bounded number of connections, each
//! closed when it stays silent too long.
//!
//! Invariants:
//! - at most [`PeerListenerLimits::max_connections`] accepted connections
//!   exist at once (a slot is held by the connection object, through the
//!   TLS handshake and the whole HTTP/2 session, and freed when it drops);
//!   further clients wait in the kernel's backlog, so a flood of idle
//!   connections cannot take the descriptors that storage needs;
//! - a connection from which nothing is read for
//!   [`PeerListenerLimits::idle`] fails its reads and is closed. hyper's
//!   HTTP/2 keep-alive only starts after the HTTP/2 handshake, so this is
//!   what closes a client that connects and never sends its preface. Live
//!   peers ping every second (see `Channels::get`) and answer the server's
//!   keep-alive pings, so they are never idle that long;
//! - until a call on it passed the cluster secret ([`PeerContacts::authenticated`]),
//!   what a connection sends does not extend its time: it is closed the idle
//!   time after it was accepted, so a client without the secret cannot keep
//!   a slot by answering pings or repeating refused calls.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Limits of the peer gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerListenerLimits {
    /// Connections held at once; more wait in the backlog.
    pub max_connections: usize,
    /// A connection from which nothing arrives for this long is closed.
    pub idle: Duration,
    /// The TLS handshake (mutual TLS between nodes) must end within this.
    pub handshake: Duration,
}

impl Default for PeerListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: crate::config::DEFAULT_MAX_PEER_CONNECTIONS,
            idle: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
        }
    }
}

/// The accepted connections no call has authenticated yet, by the peer's
/// address; the interceptor that checks the cluster secret marks them.
#[derive(Default)]
pub(crate) struct PeerContacts {
    pending: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Arc<AtomicBool>>>,
}

impl PeerContacts {
    fn register(&self, peer: std::net::SocketAddr) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.pending.lock().unwrap().insert(peer, flag.clone());
        flag
    }

    fn forget(&self, peer: &std::net::SocketAddr) {
        self.pending.lock().unwrap().remove(peer);
    }

    /// A call from `peer` passed the cluster secret: its connection's
    /// traffic now keeps it open.
    pub(crate) fn authenticated(&self, peer: std::net::SocketAddr) {
        if let Some(flag) = self.pending.lock().unwrap().remove(&peer) {
            flag.store(true, Ordering::Release);
        }
    }
}

/// Accepted connections of `listener`, never more than
/// `limits.max_connections` alive at once.
pub(crate) fn bounded_incoming(
    listener: TcpListener,
    limits: PeerListenerLimits,
    contacts: Arc<PeerContacts>,
) -> impl Stream<Item = io::Result<PeerConn>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        // Small Raft messages must not wait for Nagle's algorithm.
        .with_nodelay(Some(true))
        // A peer that vanished without a FIN (power loss, partition) is
        // noticed by the kernel too.
        .with_keepalive(Some(Duration::from_secs(30)));
    futures::stream::unfold((incoming, slots), move |(mut incoming, slots)| {
        let contacts = contacts.clone();
        async move {
            use futures::StreamExt;
            // Wait for a free slot before accepting: the client stays in the
            // backlog meanwhile.
            let slot = slots.clone().acquire_owned().await.ok()?;
            let accepted = match incoming.next().await? {
                Ok(stream) => Ok(PeerConn::new(stream, slot, limits.idle, &contacts)),
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning
                    // (the server retries at once).
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(e)
                }
            };
            Some((accepted, (incoming, slots)))
        }
    })
}

/// An accepted peer connection holding its slot; reads fail with
/// `TimedOut` once nothing was read for the idle time, or, before a call on
/// it was authenticated, once the idle time since it was accepted passed.
pub(crate) struct PeerConn {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    authenticated: Arc<AtomicBool>,
    /// Where it is registered in `contacts` until authenticated.
    registered: Option<(std::net::SocketAddr, Arc<PeerContacts>)>,
}

impl PeerConn {
    fn new(
        io: TcpStream,
        slot: OwnedSemaphorePermit,
        idle: Duration,
        contacts: &Arc<PeerContacts>,
    ) -> Self {
        let (authenticated, registered) = match io.peer_addr() {
            Ok(peer) => (contacts.register(peer), Some((peer, contacts.clone()))),
            // Not addressable: no call can vouch for it.
            Err(_) => (Arc::new(AtomicBool::new(false)), None),
        };
        Self {
            io,
            _slot: slot,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            authenticated,
            registered,
        }
    }
}

impl Drop for PeerConn {
    fn drop(&mut self) {
        if let Some((peer, contacts)) = &self.registered {
            contacts.forget(peer);
        }
    }
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && self.authenticated.load(Ordering::Acquire) {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "peer connection silent for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    /// A client that connects and sends nothing is closed after the idle
    /// time, and its slot is given to the next client.
    #[tokio::test]
    async fn silent_connection_is_closed_and_its_slot_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = PeerListenerLimits {
            max_connections: 1,
            idle: Duration::from_millis(200),
            handshake: Duration::from_secs(1),
        };
        let mut incoming = Box::pin(bounded_incoming(listener, limits, Default::default()));
        let _first_client = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut first = incoming.next().await.unwrap().unwrap();
        let _second_client = TcpStream::connect(addr).await.unwrap();
        // The only slot is taken: the second is not accepted yet.
        let waiting = tokio::time::timeout(Duration::from_millis(100), incoming.next()).await;
        assert!(
            waiting.is_err(),
            "a second connection got past a limit of one"
        );
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf))
            .await
            .expect("the silent connection timed out")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Not before its idle time, counted from when it was accepted.
        assert!(started.elapsed() >= limits.idle, "{:?}", started.elapsed());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("the freed slot admits the waiting connection");
        assert!(second.unwrap().is_ok());
    }

    /// Security finding 5 on the peer port: a client that keeps sending (as
    /// one answering HTTP/2 pings, or repeating calls refused for want of
    /// the secret) but whose calls never passed the secret is closed the
    /// idle time after it was accepted; once a call on a connection was
    /// authenticated, its traffic keeps it open (old code: any byte read
    /// kept every connection open).
    #[tokio::test]
    async fn only_authenticated_connections_are_kept_open_by_their_traffic() {
        use tokio::io::AsyncWriteExt;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = PeerListenerLimits {
            max_connections: 4,
            idle: Duration::from_millis(400),
            handshake: Duration::from_secs(1),
        };
        let contacts = Arc::new(PeerContacts::default());
        let mut incoming = Box::pin(bounded_incoming(listener, limits, contacts.clone()));
        let mut stranger = TcpStream::connect(addr).await.unwrap();
        let mut stranger_conn = incoming.next().await.unwrap().unwrap();
        let mut member = TcpStream::connect(addr).await.unwrap();
        let mut member_conn = incoming.next().await.unwrap().unwrap();
        contacts.authenticated(member.local_addr().unwrap());
        let started = std::time::Instant::now();
        // Both keep talking, a byte every 50 ms, for three idle times. Each
        // side's reader drains what arrived until a read would wait, as a
        // server's reader does (a read that finds data never looks at the
        // deadline). Paced: unpaced one-byte writes to a reader that stopped
        // reading fill the socket buffers, and the writer then stalls.
        let mut buf = [0u8; 8];
        let mut stranger_closed = None;
        let mut pace = tokio::time::interval(Duration::from_millis(50));
        while started.elapsed() < limits.idle * 3 {
            pace.tick().await;
            member.write_all(b"x").await.unwrap();
            if stranger_closed.is_none() {
                let _ = stranger.write_all(b"x").await;
                if let Err(e) = drain(&mut stranger_conn, &mut buf).await {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                    stranger_closed = Some(started.elapsed());
                }
            }
            let read = drain(&mut member_conn, &mut buf).await;
            assert!(
                read.is_ok(),
                "the authenticated connection was closed after {:?}: {read:?}",
                started.elapsed()
            );
        }
        let closed =
            stranger_closed.expect("the unauthenticated connection was kept open by its traffic");
        assert!(closed < limits.idle * 2, "closed after {closed:?}");
    }

    /// Read what `conn` has until a read would wait 10 ms; the error of a
    /// read that failed.
    async fn drain(conn: &mut PeerConn, buf: &mut [u8]) -> io::Result<()> {
        loop {
            match tokio::time::timeout(Duration::from_millis(10), conn.read(buf)).await {
                Ok(Ok(0)) | Err(_) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}
