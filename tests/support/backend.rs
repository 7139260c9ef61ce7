//! Real plain-HTTP backends on 127.0.0.1:0, and addresses where no backend answers.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::body::{full, Body, Digest};
use super::within;

/// A hyper HTTP/1.1 server on 127.0.0.1:0 that answers every request with `handler`. It stops
/// accepting when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Backend {
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let handler = Arc::new(handler);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        Backend { addr, accept }
    }

    /// A backend that describes each request it gets; see [`Echo`].
    pub async fn echo(name: &'static str) -> Backend {
        Backend::start(move |req| echo(name, req)).await
    }

    /// `http://127.0.0.1:PORT`, as a route's `backends` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads the whole request body, hashing it as it comes, and answers with an [`Echo`] text.
async fn echo(name: &str, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut digest = Digest::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    digest.update(data);
                }
            }
            Err(e) => {
                return Response::builder()
                    .status(500)
                    .body(full(format!("body error: {e}")))
                    .expect("valid response")
            }
        }
    }
    let mut text = format!(
        "backend={name}\nmethod={}\ntarget={}\nversion={:?}\nbody_len={}\nbody_sha256={}\n",
        parts.method,
        parts.uri,
        parts.version,
        digest.len(),
        digest.hex(),
    );
    for (k, v) in &parts.headers {
        text.push_str(&format!(
            "h:{k}={}\n",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    Response::new(full(text))
}

/// What the echo backend saw of one request.
#[derive(Debug)]
pub struct Echo {
    pub backend: String,
    pub method: String,
    /// The request target exactly as it arrived.
    pub target: String,
    pub version: String,
    pub body_len: u64,
    pub body_sha256: String,
    /// Header names (lowercase) and values, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl Echo {
    pub fn parse(text: &[u8]) -> Echo {
        let text = std::str::from_utf8(text).expect("echo body is text");
        let mut echo = Echo {
            backend: String::new(),
            method: String::new(),
            target: String::new(),
            version: String::new(),
            body_len: 0,
            body_sha256: String::new(),
            headers: Vec::new(),
        };
        for line in text.lines() {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not an echo response: {text}"));
            match key {
                "backend" => echo.backend = value.into(),
                "method" => echo.method = value.into(),
                "target" => echo.target = value.into(),
                "version" => echo.version = value.into(),
                "body_len" => echo.body_len = value.parse().expect("body_len is a number"),
                "body_sha256" => echo.body_sha256 = value.into(),
                _ => {
                    let name = key.strip_prefix("h:").expect("header line");
                    echo.headers.push((name.into(), value.into()));
                }
            }
        }
        echo
    }

    /// The only value of header `name`; panics if it came more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(
            all.len() <= 1,
            "header {name} arrived {} times: {all:?}",
            all.len()
        );
        all.first().copied()
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A backend address where nothing listens: connecting to it is refused at once.
pub fn dead_backend_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}

/// A listening socket whose accept queue is full, so a further TCP connect never completes
/// (Linux drops the SYN when the queue of a `listen(0)` socket holds one connection).
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    pub async fn new() -> Blackhole {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("address");
        // Fill the queue: connect until a connect no longer completes, keeping the ones that did.
        let mut queued = Vec::new();
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_millis(500),
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(stream) => queued.push(stream.expect("connect to the blackhole")),
                Err(_hanging) => break,
            }
            assert!(
                queued.len() < 8,
                "the accept queue of a listen(0) socket never filled"
            );
        }
        Blackhole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A backend that holds each response until the test releases it.
pub struct Held {
    pub backend: Backend,
    arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Held {
    pub async fn start() -> Held {
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let gate = release.clone();
        let backend = Backend::start(move |_req| {
            let _ = arrived_tx.send(());
            let gate = gate.clone();
            async move {
                gate.acquire()
                    .await
                    .expect("semaphore is never closed")
                    .forget();
                Response::new(full("released"))
            }
        })
        .await;
        Held {
            backend,
            arrived,
            release,
        }
    }

    /// Waits until a request has reached the backend.
    pub async fn arrived(&mut self) {
        within("request to reach the held backend", self.arrived.recv())
            .await
            .expect("backend is alive");
    }

    /// Lets one held response go.
    pub fn release(&self) {
        self.release.add_permits(1);
    }
}

/// A backend whose response body is written by the test, chunk by chunk.
pub struct Streaming {
    pub backend: Backend,
    writers: tokio::sync::mpsc::UnboundedReceiver<tokio::sync::mpsc::Sender<Bytes>>,
}

impl Streaming {
    pub async fn start() -> Streaming {
        let (writers_tx, writers) = tokio::sync::mpsc::unbounded_channel();
        let backend = Backend::start(move |_req| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
            let _ = writers_tx.send(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((Ok(hyper::body::Frame::data(chunk)), rx))
            });
            let body = http_body_util::StreamBody::new(stream).boxed();
            async move { Response::new(body) }
        })
        .await;
        Streaming { backend, writers }
    }

    /// The writer of the next request's response body; dropping it ends the body.
    pub async fn writer(&mut self) -> tokio::sync::mpsc::Sender<Bytes> {
        within(
            "request to reach the streaming backend",
            self.writers.recv(),
        )
        .await
        .expect("backend is alive")
    }
}

// ---------------------------------------------------------------------------------------------
// Backends of a fleet: they name themselves and count what they serve, so a test can check
// where the gateway sent each request, WebSocket and event stream.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;

/// The response header every [`Tagged`] answer carries: the backend's name.
pub const X_BACKEND: &str = "x-backend";

/// A hyper HTTP/1.1 backend on 127.0.0.1:0 that names itself in an `x-backend` header on every
/// answer and counts what it serves:
/// - `GET /healthz` (the health path) answers the status set by [`Tagged::set_health`];
/// - a WebSocket upgrade gets a 101 and an echo that answers text `T` with `NAME:T`;
/// - a request that accepts `text/event-stream` gets an event stream that sends `data: NAME`
///   and then stays open until the gateway lets go of it or [`Tagged::end_streams`];
/// - a path with a `hold` segment (`/hold`, `/api/hold/1`) waits for [`Tagged::release`]
///   before it is answered;
/// - anything else: its body is read whole and answered with `NAME`, status
///   [`Tagged::set_status`] (200 at first).
///
/// [`Tagged::kill`] stops it the way a crashed process stops: the listener and every
/// connection closed. Dropping it does the same without waiting.
pub struct Tagged {
    pub name: &'static str,
    pub addr: SocketAddr,
    state: Arc<TaggedState>,
    stop: Option<oneshot::Sender<()>>,
    accept: Option<JoinHandle<()>>,
}

struct TaggedState {
    name: &'static str,
    status: AtomicU16,
    health: AtomicU16,
    /// Plain requests answered or being answered (neither health checks, upgrades nor streams).
    requests: AtomicUsize,
    health_checks: AtomicUsize,
    /// TCP connections accepted (to see the gateway's pool reuse them).
    connections: AtomicUsize,
    upgrades: AtomicUsize,
    streams: AtomicUsize,
    open_websockets: AtomicUsize,
    open_streams: AtomicUsize,
    /// Requests waiting on a `hold` path.
    held: AtomicUsize,
    release: Semaphore,
    /// Set to true to end every event stream.
    end_streams: watch::Sender<bool>,
    /// Bumped after every change of a count, for [`Tagged::wait`].
    tick: watch::Sender<u64>,
    /// Connection and WebSocket tasks, so a kill can end them all.
    tasks: Mutex<JoinSet<()>>,
}

impl TaggedState {
    fn bump(&self) {
        self.tick.send_modify(|t| *t += 1);
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().expect("not poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }
}

/// Decrements a gauge of a [`Tagged`] backend when dropped.
struct Gauge {
    state: Arc<TaggedState>,
    which: fn(&TaggedState) -> &AtomicUsize,
}

impl Gauge {
    fn up(state: &Arc<TaggedState>, which: fn(&TaggedState) -> &AtomicUsize) -> Gauge {
        which(state).fetch_add(1, Ordering::SeqCst);
        state.bump();
        Gauge {
            state: state.clone(),
            which,
        }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.which)(&self.state).fetch_sub(1, Ordering::SeqCst);
        self.state.bump();
    }
}

impl Tagged {
    pub async fn start(name: &'static str) -> Tagged {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Tagged::serve(name, listener)
    }

    /// A backend on `ip` at a port free on every address in `ips` (DNS discovery gives
    /// addresses, and the URL's port is the same for all of them).
    pub async fn start_on_each(names: &[&'static str], ips: &[IpAddr]) -> Vec<Tagged> {
        'port: loop {
            let first = TcpListener::bind(SocketAddr::new(ips[0], 0))
                .await
                .expect("bind backend");
            let port = first.local_addr().expect("address").port();
            let mut listeners = vec![first];
            for ip in &ips[1..] {
                match TcpListener::bind(SocketAddr::new(*ip, port)).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => continue 'port,
                }
            }
            return names
                .iter()
                .zip(listeners)
                .map(|(name, l)| Tagged::serve(name, l))
                .collect();
        }
    }

    fn serve(name: &'static str, listener: TcpListener) -> Tagged {
        let addr = listener.local_addr().expect("backend address");
        let state = Arc::new(TaggedState {
            name,
            status: AtomicU16::new(200),
            health: AtomicU16::new(200),
            requests: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            upgrades: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            open_websockets: AtomicUsize::new(0),
            open_streams: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            release: Semaphore::new(0),
            end_streams: watch::Sender::new(false),
            tick: watch::Sender::new(0),
            tasks: Mutex::new(JoinSet::new()),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let accepting = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                accepting.connections.fetch_add(1, Ordering::SeqCst);
                let conn_state = accepting.clone();
                let service = service_fn(move |req| {
                    let state = conn_state.clone();
                    async move { Ok::<_, Infallible>(tagged_answer(state, req).await) }
                });
                accepting.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Tagged {
            name,
            addr,
            state,
            stop: Some(stop),
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`, as a route's `backends` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The status of plain answers from now on.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// The status of health-check answers from now on.
    pub fn set_health(&self, status: u16) {
        self.state.health.store(status, Ordering::SeqCst);
    }

    /// Plain requests received (health checks, upgrades and event streams not counted).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far (health checks included: each uses its own).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// WebSocket upgrades answered with 101.
    pub fn upgrades(&self) -> usize {
        self.state.upgrades.load(Ordering::SeqCst)
    }

    /// Event streams opened.
    pub fn streams(&self) -> usize {
        self.state.streams.load(Ordering::SeqCst)
    }

    pub fn open_websockets(&self) -> usize {
        self.state.open_websockets.load(Ordering::SeqCst)
    }

    pub fn open_streams(&self) -> usize {
        self.state.open_streams.load(Ordering::SeqCst)
    }

    /// Requests waiting on a `hold` path now.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Lets `n` held requests be answered.
    pub fn release(&self, n: usize) {
        self.state.release.add_permits(n);
    }

    /// Ends every event stream, now and later.
    pub fn end_streams(&self) {
        self.state.end_streams.send_replace(true);
    }

    /// A receiver that sees every change of a count, to wait on several backends at once.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.state.tick.subscribe()
    }

    /// Waits until `done(self)` holds; it is checked after every change of a count.
    pub async fn wait(&self, what: &str, done: impl Fn(&Tagged) -> bool) {
        let mut tick = self.state.tick.subscribe();
        within(what, async {
            while !done(self) {
                tick.changed()
                    .await
                    .expect("the state lives as long as self");
            }
        })
        .await;
    }

    /// Stops listening and closes every connection, as a crash would; returns once the port
    /// refuses connections and every socket is closed.
    pub async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(accept) = self.accept.take() {
            within("the backend's accept loop to stop", accept)
                .await
                .expect("the accept loop does not panic");
        }
        loop {
            let mut tasks = std::mem::take(&mut *self.state.tasks.lock().expect("not poisoned"));
            if tasks.is_empty() {
                break;
            }
            within("the backend's connections to close", tasks.shutdown()).await;
        }
    }
}

impl Drop for Tagged {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        // Dropping a JoinSet aborts its tasks (which hold the state, so this breaks the cycle).
        let mut guard = self.state.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let tasks = std::mem::take(&mut *guard);
        drop(guard);
        drop(tasks);
    }
}

fn tagged_response(name: &str, status: u16, body: Body) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(X_BACKEND, name)
        .body(body)
        .expect("valid response")
}

async fn tagged_answer(state: Arc<TaggedState>, mut req: Request<Incoming>) -> Response<Body> {
    let name = state.name;
    let wants = |header: http::header::HeaderName, token: &str| {
        req.headers()
            .get_all(header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains(token))
    };
    let upgrade = wants(http::header::UPGRADE, "websocket");
    let event_stream = wants(http::header::ACCEPT, "text/event-stream");
    if req.uri().path() == "/healthz" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        state.bump();
        let status = state.health.load(Ordering::SeqCst);
        return tagged_response(name, status, full(format!("{name} health {status}")));
    }
    if upgrade {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return tagged_response(name, 400, full("no Sec-WebSocket-Key"));
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        state.upgrades.fetch_add(1, Ordering::SeqCst);
        // Counted open before the 101 leaves, so a client holding the 101 can rely on it.
        let gauge = Gauge::up(&state, |s| &s.open_websockets);
        state.spawn(async move {
            let _gauge = gauge;
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            tagged_websocket(name, upgraded).await;
        });
        return Response::builder()
            .status(101)
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::CONNECTION, "Upgrade")
            .header("sec-websocket-accept", accept)
            .header(X_BACKEND, name)
            .body(super::body::empty())
            .expect("valid response");
    }
    if event_stream {
        state.streams.fetch_add(1, Ordering::SeqCst);
        let gauge = Gauge::up(&state, |s| &s.open_streams);
        let first = Bytes::from(format!("data: {name}\n\n"));
        let end = state.end_streams.subscribe();
        let events = futures_util::stream::unfold(
            (Some(first), end, gauge),
            |(first, mut end, gauge)| async move {
                if let Some(first) = first {
                    let frame = hyper::body::Frame::data(first);
                    return Some((Ok::<_, super::body::BoxError>(frame), (None, end, gauge)));
                }
                // Ends the body when the test says so. When the gateway lets go first, hyper
                // drops the body, and the gauge with it.
                let _ = end.wait_for(|ended| *ended).await;
                drop(gauge);
                None
            },
        );
        let body = http_body_util::StreamBody::new(events).boxed();
        return Response::builder()
            .header(http::header::CONTENT_TYPE, "text/event-stream")
            .header(http::header::CACHE_CONTROL, "no-cache")
            .header(X_BACKEND, name)
            .body(body)
            .expect("valid response");
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    state.bump();
    if req.uri().path().split('/').any(|segment| segment == "hold") {
        state.held.fetch_add(1, Ordering::SeqCst);
        state.bump();
        state
            .release
            .acquire()
            .await
            .expect("the semaphore is never closed")
            .forget();
        state.held.fetch_sub(1, Ordering::SeqCst);
        state.bump();
    }
    let read = req.into_body().collect().await;
    let status = state.status.load(Ordering::SeqCst);
    match read {
        Ok(body) => tagged_response(
            name,
            status,
            full(format!("{name}\nbody_len={}\n", body.to_bytes().len())),
        ),
        Err(e) => tagged_response(name, 500, full(format!("body error: {e}"))),
    }
}

/// Echoes over an upgraded connection: text `T` comes back as `NAME:T`, binary as it is.
async fn tagged_websocket(name: &str, upgraded: hyper::upgrade::Upgraded) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        None,
    )
    .await;
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(text) => Message::text(format!("{name}:{}", text.as_str())),
            Message::Binary(data) => Message::Binary(data),
            // tungstenite answers Ping and Close itself as the loop reads on.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// What the keep-alive race backend saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaceSeen {
    /// The connection's number, from 1, in accept order.
    pub conn: usize,
    /// The request's place on its connection, from 1.
    pub nth: usize,
    pub method: String,
    /// Whether it was answered (the first on a connection) or the socket closed on it.
    pub answered: bool,
}

/// A hand-written HTTP/1.1 backend that answers the first request on a connection with
/// `Connection: keep-alive`, and closes the connection without a word when the next request's
/// head has arrived on it: the race a gateway loses when it reuses a pooled connection that
/// the backend is closing as idle. It records every request it reads.
pub struct KeepAliveRace {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<RaceSeen>>>,
    accept: JoinHandle<()>,
}

impl KeepAliveRace {
    pub async fn start() -> KeepAliveRace {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind race backend");
        let addr = listener.local_addr().expect("backend address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let accept = tokio::spawn(async move {
            let mut conns = 0;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                conns += 1;
                tokio::spawn(race_connection(conns, tcp, log.clone()));
            }
        });
        KeepAliveRace { addr, seen, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request read so far, in order.
    pub fn seen(&self) -> Vec<RaceSeen> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for KeepAliveRace {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn race_connection(conn: usize, tcp: TcpStream, seen: Arc<Mutex<Vec<RaceSeen>>>) {
    let mut io = BufReader::new(tcp);
    for nth in 1.. {
        let Ok(Some(head)) = read_request_head(&mut io).await else {
            return;
        };
        let method = head.split(' ').next().unwrap_or_default().to_string();
        let answered = nth == 1;
        seen.lock().expect("not poisoned").push(RaceSeen {
            conn,
            nth,
            method,
            answered,
        });
        if !answered {
            // Dropping the socket closes it, with the request unanswered.
            return;
        }
        if read_request_body(&mut io, &head).await.is_err() {
            return;
        }
        let body = format!("first request on connection {conn}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n{X_BACKEND}: race\r\n\r\n{body}",
            body.len()
        );
        if io.write_all(response.as_bytes()).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
}

/// Reads a request head up to the blank line; `None` if the connection ends first.
async fn read_request_head(io: &mut BufReader<TcpStream>) -> std::io::Result<Option<String>> {
    let mut head = Vec::new();
    loop {
        if io.read_until(b'\n', &mut head).await? == 0 {
            return Ok(None);
        }
        if head == b"\r\n" {
            head.clear(); // a stray CRLF between requests
            continue;
        }
        if head.ends_with(b"\r\n\r\n") {
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
    }
}

/// Reads and discards the body the head announces (Content-Length or chunked).
async fn read_request_body(io: &mut BufReader<TcpStream>, head: &str) -> std::io::Result<()> {
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad body framing");
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut line = String::new();
            io.read_line(&mut line).await?;
            let size = line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).map_err(|_| bad())?;
            let mut chunk = vec![0u8; size + 2];
            io.read_exact(&mut chunk).await?;
            if size == 0 {
                return Ok(()); // no trailers from the gateway
            }
        }
    }
    let len = match header("content-length") {
        Some(v) => v.parse::<usize>().map_err(|_| bad())?,
        None => 0,
    };
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(())
}
