//! The backend every target forwards to (and the `direct` target): plain HTTP/1.1 (and h2c
//! prior knowledge, for the direct HTTP/2 rows) on a current-thread runtime, TCP_NODELAY.
//!
//! - `/small`: a 100-byte body.
//! - `/bulk?bytes=N`: N bytes, streamed in 256 KiB chunks of one shared buffer.
//! - `/events?rate=R&count=C`: an event stream, R events/s, C events, each `data: <ns>` with
//!   CLOCK_MONOTONIC at the moment the event is handed to hyper.
//! - `/ws`: WebSocket echo; `/ws-bulk?bytes=N&msg=M`: sends N bytes in M-byte messages.
//! - `/count`: how many `/small` requests this process has answered so far (decimal text),
//!   for the share each backend of the fleet scenario got.
//! - `/bulk-stats`: `<open> <sent>`: `/bulk` responses not yet finished nor dropped, and the
//!   bytes all `/bulk` responses have handed to hyper so far (the stalled-reader scenario).

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpSocket;

use crate::{sys, ws};

const SMALL: &[u8; 100] = b"streamgate-bench small response: 100 bytes of text so every target sends the same body.............\n";
const CHUNK: usize = 256 * 1024;

/// `/small` requests answered (read by `/count`).
static SMALL_SERVED: AtomicU64 = AtomicU64::new(0);
/// `/bulk` bodies alive, and bytes they have produced (read by `/bulk-stats`).
static BULK_OPEN: AtomicU64 = AtomicU64::new(0);
static BULK_SENT: AtomicU64 = AtomicU64::new(0);

pub fn run(addr: SocketAddr) -> anyhow::Result<()> {
    sys::raise_nofile()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let sock = TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        let listener = sock.listen(4096)?;
        // The parent reads this line to learn the port.
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("backend: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let chunk = chunk.clone();
                    async move { Ok::<_, Infallible>(handle(req, chunk)) }
                });
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                b.http2().max_concurrent_streams(1000);
                let _ = b
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn handle(mut req: Request<Incoming>, chunk: Bytes) -> Response<BackendBody> {
    match req.uri().path() {
        "/small" => {
            SMALL_SERVED.fetch_add(1, Ordering::Relaxed);
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .header(header::CONTENT_LENGTH, SMALL.len())
                .body(BackendBody::Full(Some(Bytes::from_static(SMALL))))
        }
        "/count" => {
            let n = Bytes::from(SMALL_SERVED.load(Ordering::Relaxed).to_string());
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .header(header::CONTENT_LENGTH, n.len())
                .body(BackendBody::Full(Some(n)))
        }
        "/bulk" => {
            let n = query(&req, "bytes").unwrap_or(1 << 20);
            BULK_OPEN.fetch_add(1, Ordering::Relaxed);
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, n)
                .body(BackendBody::Bulk {
                    chunk,
                    left: n,
                    open: true,
                })
        }
        "/bulk-stats" => {
            let n = Bytes::from(format!(
                "{} {}",
                BULK_OPEN.load(Ordering::Relaxed),
                BULK_SENT.load(Ordering::Relaxed)
            ));
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .header(header::CONTENT_LENGTH, n.len())
                .body(BackendBody::Full(Some(n)))
        }
        "/events" => {
            let rate = query(&req, "rate").unwrap_or(10).clamp(1, 1000);
            let count = query(&req, "count").unwrap_or(600);
            let period = Duration::from_nanos(1_000_000_000 / rate);
            // Spread the streams' ticks over the period, so 1,000 streams do not all fire in
            // the same millisecond.
            let phase = period.mul_f64(next_phase());
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(BackendBody::Sse {
                    tick: Box::new(tick),
                    left: count,
                })
        }
        "/ws" | "/ws-bulk" => {
            let Some(key) = req.headers().get("sec-websocket-key") else {
                return status(StatusCode::BAD_REQUEST);
            };
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let bulk = (req.uri().path() == "/ws-bulk").then(|| {
                (
                    query(&req, "bytes").unwrap_or(1 << 20),
                    query(&req, "msg").unwrap_or(1 << 20),
                )
            });
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = upgrade.await else { return };
                let io = TokioIo::new(up);
                let _ = match bulk {
                    Some((bytes, msg)) => {
                        ws::serve_bulk(io, bytes, msg.clamp(1, 16 << 20) as usize).await
                    }
                    None => ws::serve_echo(io).await,
                };
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "Upgrade")
                .header("sec-websocket-accept", accept)
                .body(BackendBody::Full(None))
        }
        _ => return status(StatusCode::NOT_FOUND),
    }
    .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
}

fn status(s: StatusCode) -> Response<BackendBody> {
    let mut r = Response::new(BackendBody::Full(None));
    *r.status_mut() = s;
    r
}

/// A golden-ratio sequence in [0, 1): evenly spread phases without a random number generator.
fn next_phase() -> f64 {
    use std::cell::Cell;
    thread_local!(static N: Cell<u64> = const { Cell::new(0) });
    let n = N.with(|c| {
        let n = c.get();
        c.set(n + 1);
        n
    });
    (n as f64 * 0.618_033_988_749_895).fract()
}

pub enum BackendBody {
    Full(Option<Bytes>),
    Bulk {
        chunk: Bytes,
        left: u64,
        /// Counted in BULK_OPEN until the last byte is handed over or the body is dropped.
        open: bool,
    },
    Sse {
        tick: Box<tokio::time::Interval>,
        left: u64,
    },
}

fn close_bulk(open: &mut bool) {
    if std::mem::take(open) {
        BULK_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for BackendBody {
    fn drop(&mut self) {
        if let BackendBody::Bulk { open, .. } = self {
            close_bulk(open);
        }
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            BackendBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BackendBody::Bulk { chunk, left, open } => {
                if *left == 0 {
                    close_bulk(open);
                    return Poll::Ready(None);
                }
                let n = (*left).min(chunk.len() as u64) as usize;
                *left -= n as u64;
                BULK_SENT.fetch_add(n as u64, Ordering::Relaxed);
                if *left == 0 {
                    close_bulk(open);
                }
                Poll::Ready(Some(Ok(Frame::data(chunk.slice(..n)))))
            }
            BackendBody::Sse { tick, left } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                match tick.poll_tick(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => {
                        *left -= 1;
                        let ev = format!("data: {}\n\n", sys::mono_ns());
                        Poll::Ready(Some(Ok(Frame::data(Bytes::from(ev)))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            BackendBody::Full(b) => b.is_none(),
            BackendBody::Bulk { left, .. } | BackendBody::Sse { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BackendBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BackendBody::Full(None) => SizeHint::with_exact(0),
            BackendBody::Bulk { left, .. } => SizeHint::with_exact(*left),
            BackendBody::Sse { .. } => SizeHint::default(),
        }
    }
}
