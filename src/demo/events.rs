//! The demo's event backends: two in-process servers of one counter sequence, each of which
//! the demo page can kill abruptly and restart on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{full, DemoBody};

/// How long a killed event backend stays down before it listens again.
pub const RESTART_AFTER: Duration = Duration::from_secs(5);

/// One event backend. Event `n` of the sequence is the same on every backend (`id: n`, count
/// `n`), and a request with `Last-Event-ID: n` starts at `n + 1`, so either backend continues
/// a stream the other began; only the `backend` field of the data says which one wrote it.
pub struct EventBackend {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// The running incarnation: cancelling it stops the listener and cuts every open
    /// connection. `None` while the backend is down.
    life: Mutex<Option<CancellationToken>>,
    /// Event streams open now, for the kill's answer.
    streams: Arc<AtomicUsize>,
}

/// Why a kill did nothing.
#[derive(Debug)]
pub struct AlreadyDown;

impl EventBackend {
    /// Binds 127.0.0.1:0 and serves until killed.
    pub async fn start(name: &'static str) -> std::io::Result<Arc<EventBackend>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = Arc::new(EventBackend {
            name,
            addr: listener.local_addr()?,
            life: Mutex::new(None),
            streams: Arc::new(AtomicUsize::new(0)),
        });
        backend.run(listener);
        Ok(backend)
    }

    pub fn is_up(&self) -> bool {
        self.life().is_some()
    }

    /// Kills the backend as a crash would: the listener closes and every open connection is
    /// dropped mid-stream, without the terminating chunk. It listens again on the same port
    /// after [`RESTART_AFTER`]. Returns the number of event streams cut.
    pub fn kill(self: &Arc<Self>) -> Result<usize, AlreadyDown> {
        let life = self.lock().take().ok_or(AlreadyDown)?;
        let cut = self.streams.load(Ordering::Relaxed);
        life.cancel();
        tracing::info!(backend = self.name, addr = %self.addr, streams = cut, "demo event backend killed");
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(RESTART_AFTER).await;
            me.restart().await;
        });
        Ok(cut)
    }

    async fn restart(self: Arc<Self>) {
        // The port was ours a moment ago; binding again can only race the kernel's cleanup.
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    tracing::info!(backend = self.name, addr = %self.addr, "demo event backend restarted");
                    self.run(listener);
                    return;
                }
                Err(e) => {
                    tracing::debug!(backend = self.name, error = %e, "demo event backend: rebinding");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tracing::warn!(backend = self.name, addr = %self.addr, "demo event backend could not listen again");
    }

    /// Serves `listener` as a new incarnation.
    fn run(self: &Arc<Self>, listener: TcpListener) {
        let life = CancellationToken::new();
        *self.lock() = Some(life.clone());
        tokio::spawn(Arc::clone(self).serve(listener, life));
    }

    async fn serve(self: Arc<Self>, listener: TcpListener, life: CancellationToken) {
        let mut errors = crate::listener::AcceptErrors::new("demo event backend");
        loop {
            let tcp = tokio::select! {
                (tcp, _) = errors.accept(&listener) => tcp,
                // Returning drops the listener: the port refuses connections until the restart.
                _ = life.cancelled() => return,
            };
            let life = life.clone();
            let streams = Arc::clone(&self.streams);
            let name = self.name;
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let service = service_fn(move |req| {
                    let streams = Arc::clone(&streams);
                    async move { Ok::<_, Infallible>(respond(name, streams, &req)) }
                });
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    _ = conn => {}
                    // Dropping the connection closes the socket wherever the body is: the
                    // gateway sees a stream that broke off, not one that ended.
                    _ = life.cancelled() => {}
                }
            });
        }
    }

    fn life(&self) -> Option<CancellationToken> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CancellationToken>> {
        // A panic while holding the lock cannot leave the Option half-written.
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn respond(
    name: &'static str,
    streams: Arc<AtomicUsize>,
    req: &Request<Incoming>,
) -> Response<DemoBody> {
    let response = match req.uri().path() {
        "/events" => events(name, streams, req),
        _ => Response::builder()
            .status(404)
            .body(full(Bytes::from_static(b"demo event backend: not found\n"))),
    };
    response.unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// An event stream: the counter, one event a second, resuming after the `Last-Event-ID` that a
/// reconnecting EventSource (or the gateway, resuming a stream) sends.
fn events(
    name: &'static str,
    streams: Arc<AtomicUsize>,
    req: &Request<Incoming>,
) -> http::Result<Response<DemoBody>> {
    let next = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(1, |id| id + 1);
    streams.fetch_add(1, Ordering::Relaxed);
    let ticks = Counter {
        backend: name,
        next,
        interval: tokio::time::interval(Duration::from_secs(1)),
        streams,
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(ticks.boxed_unsync())
}

struct Counter {
    backend: &'static str,
    next: u64,
    interval: tokio::time::Interval,
    /// The backend's count of open streams, which this one leaves when dropped.
    streams: Arc<AtomicUsize>,
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl http_body::Body for Counter {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::ready!(self.interval.poll_tick(cx));
        let n = self.next;
        self.next += 1;
        let event = format!(
            "id: {n}\nevent: tick\ndata: {{\"count\": {n}, \"backend\": \"{}\"}}\n\n",
            self.backend
        );
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(event)))))
    }
}
