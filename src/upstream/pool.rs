//! Keep-alive HTTP/1.1 connections to one backend, driven by the request's own task.
//!
//! hyper's client connection is two halves: a `SendRequest` handle and a `Connection` future
//! that does the socket I/O. hyper-util's pooled client spawns the future as a task of its own,
//! so every request and every body chunk crosses tasks (a channel hop each way). Here the
//! request's task polls the connection itself, together with the response future and then
//! with the response body ([`PooledBody`]); when the exchange ends cleanly the pair goes back
//! to the pool, unpolled, until the next request takes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::backend::{Backend, OpenGuard};
use crate::proxy::body::UpstreamBody;

/// Idle connections older than this are closed rather than reused: most servers close theirs
/// after 60-120 s, and a request on a connection the server just closed has to be retried.
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// Idle connections kept per backend; more are closed when they come back.
const MAX_IDLE: usize = 512;

/// The most a backend connection reads ahead (hyper's default grows to ~400 KiB). A body chunk
/// is at most this big, and a response waiting on a client that stopped reading holds about
/// three of them (the channel to the body, the client connection's write queue, TLS), so this
/// bounds the memory a stalled reader costs; also the largest response head a backend may send.
const READ_BUFFER: usize = 32 * 1024;

type Driver = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

/// Idle connections to one backend, warmest last.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<std::collections::VecDeque<(Conn, Instant)>>,
}

impl Pool {
    /// Connections waiting for a request now.
    pub fn idle(&self) -> usize {
        self.idle.lock().map_or(0, |i| i.len())
    }

    /// Closes every idle connection.
    pub fn clear(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A connection ready for a request: an idle one that is still open, or a new one.
    pub async fn checkout(
        &self,
        backend: &Backend,
        timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        loop {
            let idle = self.idle.lock().ok().and_then(|mut i| i.pop_back());
            let Some((mut conn, since)) = idle else { break };
            if since.elapsed() < IDLE_TIMEOUT && conn.ready_now() {
                conn.reused = true;
                return Ok(conn);
            }
            // Dropped: closed, stale or busy.
        }
        connect(backend, timeout).await
    }

    fn checkin(&self, conn: Conn) {
        let now = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            // The oldest are at the front: close those idle too long (a clock read each, so
            // only as far as the first fresh one).
            while idle
                .front()
                .is_some_and(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT)
            {
                idle.pop_front();
            }
            if idle.len() < MAX_IDLE {
                idle.push_back((conn, now));
            }
        }
    }
}

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused(#[source] std::io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed")]
    Io(#[source] std::io::Error),
    #[error("HTTP/1.1 handshake failed")]
    Handshake(#[source] hyper::Error),
}

pub(crate) async fn connect(backend: &Backend, timeout: Duration) -> Result<Conn, ConnectError> {
    let connecting = async {
        match backend.socket {
            Some(addr) => TcpStream::connect(addr).await,
            // A name: resolved by the system at each new connection, as curl or nginx would.
            None => TcpStream::connect(backend.address.as_str()).await,
        }
    };
    let tcp = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(ConnectError::Refused(e))
        }
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    let (sender, driver) = http1::Builder::new()
        .max_buf_size(READ_BUFFER)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(ConnectError::Handshake)?;
    Ok(Conn {
        io: Box::new(Io {
            sender,
            driver,
            done: false,
        }),
        reused: false,
    })
}

/// One connection: the request handle and the future that does its I/O. Boxed, because it
/// travels (pool, request, response body, pool) and hyper's connection state is large.
pub struct Conn {
    io: Box<Io>,
    /// Taken from the pool rather than opened for this request.
    pub reused: bool,
}

struct Io {
    sender: http1::SendRequest<UpstreamBody>,
    driver: Driver,
    /// The driver finished: the connection is closed.
    done: bool,
}

/// Why a request got no response head.
pub struct SendError {
    pub error: hyper::Error,
    /// The request, when hyper gave it back because not a byte of it was written.
    pub unsent: Option<Request<UpstreamBody>>,
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .field("unsent", &self.unsent.is_some())
            .finish()
    }
}

impl Conn {
    /// Whether the connection is open and free, without waiting (for idle ones).
    fn ready_now(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.poll_driver(&mut cx);
        !self.io.done && matches!(self.io.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    fn poll_driver(&mut self, cx: &mut Context<'_>) {
        let io = &mut *self.io;
        if !io.done && Pin::new(&mut io.driver).poll(cx).is_ready() {
            io.done = true;
        }
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile.
    pub async fn send(
        &mut self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let io = &mut *self.io;
        let mut response = std::pin::pin!(io.sender.try_send_request(req));
        let (driver, done) = (&mut io.driver, &mut io.done);
        std::future::poll_fn(|cx| {
            if !*done && Pin::new(&mut *driver).poll(cx).is_ready() {
                *done = true;
            }
            response.as_mut().poll(cx)
        })
        .await
        .map_err(|mut e| SendError {
            unsent: e.take_message(),
            error: e.into_error(),
        })
    }

    /// Sends an upgrade request (WebSocket): the connection is handed to a task that drives
    /// it until hyper gives the socket to `hyper::upgrade::on(response)`. Never pooled.
    pub async fn send_upgrade(
        self,
        req: Request<UpstreamBody>,
        spawn: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>),
    ) -> Result<Response<Incoming>, SendError> {
        let Io {
            mut sender, driver, ..
        } = *self.io;
        spawn(Box::pin(async move {
            let _ = driver.with_upgrades().await;
        }));
        sender
            .try_send_request(req)
            .await
            .map_err(|mut e| SendError {
                unsent: e.take_message(),
                error: e.into_error(),
            })
    }
}

/// A backend's response body: polls the connection along with the body, and puts the
/// connection back in the pool when the body has ended cleanly.
pub struct PooledBody {
    body: Incoming,
    conn: Option<Conn>,
    /// The backend's open count, held until the body is done.
    open: Option<OpenGuard>,
}

impl PooledBody {
    /// `conn` is None when the connection is driven elsewhere (an upgrade connection).
    pub fn new(body: Incoming, conn: Option<Conn>, open: Option<OpenGuard>) -> PooledBody {
        let mut pooled = PooledBody { body, conn, open };
        if pooled.body.is_end_stream() {
            // No body (HEAD, 204, 304, Content-Length: 0): nothing will poll it.
            pooled.finish(&mut Context::from_waker(std::task::Waker::noop()));
        }
        pooled
    }

    /// The open-count guard, for a stream that outlives this body's wrapper.
    pub fn backend(&self) -> Option<&std::sync::Arc<Backend>> {
        self.open.as_ref().map(|g| g.backend())
    }

    /// The exchange is over: the connection goes back to its pool if it can take another
    /// request (the backend kept it open and the request body was all sent).
    fn finish(&mut self, cx: &mut Context<'_>) {
        let Some(mut conn) = self.conn.take() else {
            self.open = None;
            return;
        };
        // One more turn lets hyper see the message end and mark the connection free.
        conn.poll_driver(cx);
        if let Some(open) = self.open.take() {
            if !conn.io.done && matches!(conn.io.sender.poll_ready(cx), Poll::Ready(Ok(()))) {
                open.backend().pool.checkin(conn);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // PooledBody is Unpin: Incoming, the connection and the guard all are.
        let this = self.get_mut();
        if let Some(conn) = &mut this.conn {
            conn.poll_driver(cx);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(cx),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.finish(cx),
            Poll::Ready(Some(Err(_))) => {
                this.conn = None;
                this.open = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
