//! Backends for tests of streams that outlive their backend: an HTTP/1.1 event-stream backend
//! that serves one shared, deterministic sequence (`id: N`, `data: event N`), resumes from
//! `Last-Event-ID`, and dies on command in each way a backend dies (a reset, half an event then
//! EOF, a clean end); and a WebSocket echo backend that names itself and records the Close
//! codes it receives.
//!
//! The event-stream backend writes HTTP by hand on the socket, so the test knows exactly which
//! bytes were on the wire before a death: a chunk is written whole before the next step, and a
//! half event is followed by FIN (not a reset, which could discard it unread).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

use super::ws::{self, WsBackend};
use super::{within, PATIENCE};

// ---------------------------------------------------------------------------------------------
// The sequence

/// The sequence every [`SeqBackend`] of a test serves: event N exists once it is published,
/// by the test ([`Feed::publish_to`]) or by a ticker ([`Feed::ticking`]). Cloning shares it.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<FeedInner>,
}

struct FeedInner {
    /// The highest event published so far (0: none).
    published: Arc<watch::Sender<u64>>,
    ticker: Option<JoinHandle<()>>,
}

impl Drop for FeedInner {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
    }
}

impl Feed {
    /// A sequence that grows only when the test publishes.
    pub fn manual() -> Feed {
        Feed {
            inner: Arc::new(FeedInner {
                published: Arc::new(watch::Sender::new(0)),
                ticker: None,
            }),
        }
    }

    /// A sequence that publishes one more event every `every`, from now on.
    pub fn ticking(every: Duration) -> Feed {
        let published = Arc::new(watch::Sender::new(0));
        let ticks = published.clone();
        let ticker = tokio::spawn(async move {
            let mut pace = tokio::time::interval(every);
            loop {
                pace.tick().await;
                ticks.send_modify(|p| *p += 1);
            }
        });
        Feed {
            inner: Arc::new(FeedInner {
                published,
                ticker: Some(ticker),
            }),
        }
    }

    /// Makes events up to `n` available (never takes any back).
    pub fn publish_to(&self, n: u64) {
        self.inner.published.send_modify(|p| *p = (*p).max(n));
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.published.subscribe()
    }
}

/// Event `n` of the sequence exactly as a backend writes it.
pub fn event_text(n: u64) -> String {
    format!("id: {n}\ndata: event {n}\n\n")
}

/// Event `n` as a backend writes it without ids.
pub fn event_text_without_id(n: u64) -> String {
    format!("data: event {n}\n\n")
}

/// The half event a backend writes before it dies in [`SeqBackend::partial_then_die`].
pub fn partial_text(n: u64) -> String {
    format!("id: {n}\ndata: cut-off {n}")
}

// ---------------------------------------------------------------------------------------------
// The event-stream backend

/// An HTTP/1.1 backend on 127.0.0.1:0 (keep-alive, chunked) that answers:
/// - a request whose `Accept` holds `text/event-stream`: a 200 event stream of the [`Feed`]'s
///   events from `Last-Event-ID` + 1 (or 1), each written as one chunk as soon as it is
///   published, headers `content-type: text/event-stream` and `x-backend: NAME`;
/// - anything else: 200 with body `NAME`.
///
/// With [`SeqBackend::set_status`] other than 200, every request gets that status instead.
/// Every request is recorded ([`SeqBackend::requests`]).
pub struct SeqBackend {
    pub name: &'static str,
    pub addr: SocketAddr,
    state: Arc<SeqState>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

struct SeqState {
    name: &'static str,
    feed: Feed,
    /// Whether events carry an `id:` field.
    ids: AtomicBool,
    status: AtomicU16,
    /// The latest order and its number. A stream obeys only orders given after it began.
    orders: watch::Sender<(u64, Order)>,
    requests: Mutex<Vec<SeqRequest>>,
    /// Event streams being written now.
    open: AtomicUsize,
    /// Half events written before a death.
    partials: AtomicUsize,
    /// Bumped after every change, for [`SeqBackend::wait`].
    tick: watch::Sender<u64>,
    /// The connection tasks, so a kill can end them all.
    conns: Mutex<JoinSet<()>>,
}

impl SeqState {
    fn bump(&self) {
        self.tick.send_modify(|t| *t += 1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    None,
    /// End with the terminating chunk, at an event boundary.
    End,
    /// Write half of the next event, then FIN without the terminating chunk.
    PartialThenDie,
}

/// One request as the backend read it.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub method: String,
    pub target: String,
    /// Header names (lowercase) and values, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The request's `Last-Event-ID`, if it had one.
    pub last_event_id: Option<String>,
    /// Whether `Accept` held `text/event-stream`.
    pub event_stream: bool,
    /// When the request head was read.
    pub at: Instant,
}

impl SeqRequest {
    /// The value of header `name` (lowercase), which must have arrived at most once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut all = self.headers.iter().filter(|(n, _)| n == name);
        let first = all.next();
        assert!(
            all.next().is_none(),
            "request header {name} arrived more than once"
        );
        first.map(|(_, v)| v.as_str())
    }
}

/// Decrements the open count when a stream ends, however it ends.
struct Open(Arc<SeqState>);

impl Open {
    fn up(state: &Arc<SeqState>) -> Open {
        state.open.fetch_add(1, Ordering::SeqCst);
        state.bump();
        Open(state.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.bump();
    }
}

impl SeqBackend {
    pub async fn start(name: &'static str, feed: &Feed) -> SeqBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind event-stream backend");
        let addr = listener.local_addr().expect("backend address");
        let state = Arc::new(SeqState {
            name,
            feed: feed.clone(),
            ids: AtomicBool::new(true),
            status: AtomicU16::new(200),
            orders: watch::Sender::new((0, Order::None)),
            requests: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            partials: AtomicUsize::new(0),
            tick: watch::Sender::new(0),
            conns: Mutex::new(JoinSet::new()),
        });
        let accept = spawn_accept(state.clone(), listener);
        SeqBackend {
            name,
            addr,
            state,
            accept: Mutex::new(Some(accept)),
        }
    }

    /// `http://127.0.0.1:PORT`, as a route's `backends` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<SeqRequest> {
        self.state.requests.lock().expect("not poisoned").clone()
    }

    /// The `Last-Event-ID` of each event-stream request so far.
    pub fn last_event_ids(&self) -> Vec<Option<String>> {
        self.requests()
            .into_iter()
            .filter(|r| r.event_stream)
            .map(|r| r.last_event_id)
            .collect()
    }

    /// Event-stream requests so far (answered 200 or not).
    pub fn stream_requests(&self) -> usize {
        self.last_event_ids().len()
    }

    /// Event streams being written now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Half events written by [`SeqBackend::partial_then_die`] so far.
    pub fn partials(&self) -> usize {
        self.state.partials.load(Ordering::SeqCst)
    }

    /// Whether events carry `id:` fields from now on (they do at first).
    pub fn set_ids(&self, ids: bool) {
        self.state.ids.store(ids, Ordering::SeqCst);
    }

    /// The status of every answer from now on (200 at first: event streams and plain answers).
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Ends every stream open now cleanly: the terminating chunk, right after a whole event.
    pub fn end_streams(&self) {
        self.order(Order::End);
    }

    /// Stops listening; every stream open now writes half of its next event
    /// ([`partial_text`]) and closes its connection (FIN, no terminating chunk). Wait for
    /// [`SeqBackend::partials`] to know the half events are on the wire.
    pub async fn partial_then_die(&self) {
        self.stop_listening().await;
        self.order(Order::PartialThenDie);
    }

    /// Dies as a crashed process does: stops listening (connects are refused) and resets
    /// every connection; returns once all of them are closed.
    pub async fn kill(&self) {
        self.stop_listening().await;
        loop {
            let mut conns = std::mem::take(&mut *self.state.conns.lock().expect("not poisoned"));
            if conns.is_empty() {
                break;
            }
            // Each socket has SO_LINGER 0: dropping it with its task sends a reset.
            within("the backend's connections to close", conns.shutdown()).await;
        }
    }

    /// Listens again on the same address after [`SeqBackend::kill`].
    pub async fn restart(&self) {
        let listener = within("the backend's port to be free again", async {
            loop {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => return l,
                    // A pacing poll: the port is released by the kernel, not by an event.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        let accept = spawn_accept(self.state.clone(), listener);
        *self.accept.lock().expect("not poisoned") = Some(accept);
    }

    /// A receiver that sees every change (requests, open streams, half events).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.state.tick.subscribe()
    }

    /// Waits until `done(self)` holds; it is checked after every change.
    pub async fn wait(&self, what: &str, done: impl Fn(&SeqBackend) -> bool) {
        until(&[self.changes()], what, || done(self)).await;
    }

    fn order(&self, order: Order) {
        self.state.orders.send_modify(|(n, o)| {
            *n += 1;
            *o = order;
        });
    }

    async fn stop_listening(&self) {
        let accept = self.accept.lock().expect("not poisoned").take();
        if let Some(accept) = accept {
            accept.abort();
            // Awaiting the aborted task: the listener has been dropped when it returns.
            let _ = within("the backend's accept loop to stop", accept).await;
        }
    }
}

impl Drop for SeqBackend {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            accept.abort();
        }
        // Dropping the JoinSet aborts the connection tasks (which hold the state).
        let conns =
            std::mem::take(&mut *self.state.conns.lock().unwrap_or_else(|e| e.into_inner()));
        drop(conns);
    }
}

fn spawn_accept(state: Arc<SeqState>, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            // A kill resets rather than closes: the gateway must see a failure, not an end.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            let conn_state = state.clone();
            let mut conns = state.conns.lock().expect("not poisoned");
            while conns.try_join_next().is_some() {}
            conns.spawn(serve_connection(conn_state, tcp));
        }
    })
}

/// What became of an event stream.
enum Ended {
    /// The terminating chunk went out; the connection can carry another request.
    Clean,
    /// The connection is done with.
    Gone,
}

/// Serves requests on one connection until the gateway closes it or the backend dies.
async fn serve_connection(state: Arc<SeqState>, mut tcp: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut tcp, &mut buf).await else {
            return;
        };
        let Some(request) = parse_head(&head) else {
            let _ = tcp
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            return;
        };
        let event_stream = request.event_stream;
        state
            .requests
            .lock()
            .expect("not poisoned")
            .push(request.clone());
        state.bump();

        let status = state.status.load(Ordering::SeqCst);
        if status != 200 || !event_stream {
            let body = if status == 200 {
                state.name.to_string()
            } else {
                format!("{} answers {status}", state.name)
            };
            let head = format!(
                "HTTP/1.1 {status} Answer\r\ncontent-type: text/plain\r\nx-backend: {}\r\ncontent-length: {}\r\n\r\n{body}",
                state.name,
                body.len()
            );
            if tcp.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        match stream(&state, &mut tcp, &request).await {
            Ended::Clean => continue,
            Ended::Gone => return,
        }
    }
}

/// Reads one request head (through the blank line) into `head`, keeping what follows in
/// `buf`; `None` when the connection ends first.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(buf.drain(..end + 4).collect());
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn parse_head(head: &[u8]) -> Option<SeqRequest> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let event_stream = headers
        .iter()
        .any(|(n, v)| n == "accept" && v.to_ascii_lowercase().contains("text/event-stream"));
    Some(SeqRequest {
        last_event_id: find("last-event-id"),
        method,
        target,
        headers,
        event_stream,
        at: Instant::now(),
    })
}

/// Writes `text` as one chunk of a chunked body.
async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    let chunk = format!("{:x}\r\n{text}\r\n", text.len());
    w.write_all(chunk.as_bytes()).await?;
    w.flush().await
}

/// Writes the event stream for `request` until an order, the gateway's leaving, or a death.
async fn stream(state: &Arc<SeqState>, tcp: &mut TcpStream, request: &SeqRequest) -> Ended {
    let mut next = request
        .last_event_id
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let mut orders = state.orders.subscribe();
    let began = orders.borrow_and_update().0;
    let mut feed = state.feed.subscribe();
    let _open = Open::up(state);
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-backend: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        state.name
    );
    if tcp.write_all(head.as_bytes()).await.is_err() {
        return Ended::Gone;
    }
    let (mut rd, mut wr) = tcp.split();
    let mut scratch = [0u8; 512];
    loop {
        let (number, order) = *orders.borrow_and_update();
        match order {
            _ if number == began => {}
            Order::None => {}
            Order::End => {
                let ended = wr.write_all(b"0\r\n\r\n").await.and(wr.flush().await);
                return if ended.is_ok() {
                    Ended::Clean
                } else {
                    Ended::Gone
                };
            }
            Order::PartialThenDie => {
                if write_chunk(&mut wr, &partial_text(next)).await.is_ok() {
                    // FIN after the half event: the gateway reads it all, then the end.
                    let _ = wr.shutdown().await;
                    state.partials.fetch_add(1, Ordering::SeqCst);
                    state.bump();
                    // Hold the socket until the gateway lets go, so no reset can race the
                    // half event to the gateway.
                    let _ = tokio::time::timeout(PATIENCE, async {
                        while let Ok(n) = rd.read(&mut scratch).await {
                            if n == 0 {
                                break;
                            }
                        }
                    })
                    .await;
                }
                return Ended::Gone;
            }
        }
        if *feed.borrow_and_update() >= next {
            let text = if state.ids.load(Ordering::SeqCst) {
                event_text(next)
            } else {
                event_text_without_id(next)
            };
            if write_chunk(&mut wr, &text).await.is_err() {
                return Ended::Gone;
            }
            next += 1;
            continue;
        }
        tokio::select! {
            _ = orders.changed() => {}
            _ = feed.changed() => {}
            read = rd.read(&mut scratch) => match read {
                // The gateway let go of the stream (a GET has no body to read).
                Ok(0) | Err(_) => return Ended::Gone,
                Ok(_) => {}
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The WebSocket backend

/// A WebSocket backend on 127.0.0.1:0 that answers text `T` with `NAME:T`, echoes binary,
/// counts what it accepts and holds open, and records the code of every Close it receives.
pub struct WsTagged {
    pub addr: SocketAddr,
    state: Arc<WsTaggedState>,
    _backend: WsBackend,
}

struct WsTaggedState {
    name: &'static str,
    accepted: AtomicUsize,
    open: AtomicUsize,
    /// The code of each Close received (`None`: a Close without a code).
    closes: Mutex<Vec<Option<u16>>>,
    tick: watch::Sender<u64>,
}

impl WsTaggedState {
    fn bump(&self) {
        self.tick.send_modify(|t| *t += 1);
    }
}

impl WsTagged {
    pub async fn start(name: &'static str) -> WsTagged {
        let state = Arc::new(WsTaggedState {
            name,
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            closes: Mutex::new(Vec::new()),
            tick: watch::Sender::new(0),
        });
        let conn_state = state.clone();
        let backend =
            WsBackend::start(move |tcp| ws_tagged_connection(conn_state.clone(), tcp)).await;
        WsTagged {
            addr: backend.addr,
            state,
            _backend: backend,
        }
    }

    /// `http://127.0.0.1:PORT`, as a route's `backends` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// WebSocket handshakes completed so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// WebSockets open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// The code of each Close received so far.
    pub fn closes(&self) -> Vec<Option<u16>> {
        self.state.closes.lock().expect("not poisoned").clone()
    }

    /// A receiver that sees every change of a count.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.state.tick.subscribe()
    }

    /// Waits until `done(self)` holds; it is checked after every change.
    pub async fn wait(&self, what: &str, done: impl Fn(&WsTagged) -> bool) {
        until(&[self.changes()], what, || done(self)).await;
    }
}

async fn ws_tagged_connection(state: Arc<WsTaggedState>, tcp: TcpStream) {
    // Nobody listens to the handshake report; the counts below are what tests read.
    let (seen, _) = mpsc::unbounded_channel();
    let Ok(mut ws) = ws::accept(tcp, &seen).await else {
        return;
    };
    state.accepted.fetch_add(1, Ordering::SeqCst);
    state.open.fetch_add(1, Ordering::SeqCst);
    state.bump();
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(text) => Message::text(format!("{}:{}", state.name, text.as_str())),
            Message::Binary(data) => Message::Binary(data),
            Message::Close(frame) => {
                let code = frame.map(|f| u16::from(f.code));
                state.closes.lock().expect("not poisoned").push(code);
                state.bump();
                // tungstenite answers the Close itself as the loop reads on.
                continue;
            }
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
    state.bump();
}

// ---------------------------------------------------------------------------------------------
// Waiting on several backends

/// Waits until `done()` holds, checking it after every change any of `changes` sees; fails the
/// test after the harness's patience.
pub async fn until(changes: &[watch::Receiver<u64>], what: &str, done: impl Fn() -> bool) {
    until_for(PATIENCE, changes, what, done).await;
}

/// [`until`] with a bound of its own, for what takes longer than one awaited event.
pub async fn until_for(
    limit: Duration,
    changes: &[watch::Receiver<u64>],
    what: &str,
    done: impl Fn() -> bool,
) {
    let mut changes: Vec<watch::Receiver<u64>> = changes.to_vec();
    let waited = tokio::time::timeout(limit, async {
        while !done() {
            let any: Vec<Pin<Box<dyn Future<Output = ()> + '_>>> = changes
                .iter_mut()
                .map(|c| {
                    Box::pin(async move {
                        if c.changed().await.is_err() {
                            // The sender is gone: nothing changes any more.
                            std::future::pending::<()>().await;
                        }
                    }) as Pin<Box<dyn Future<Output = ()> + '_>>
                })
                .collect();
            futures_util::future::select_all(any).await;
        }
    })
    .await;
    if waited.is_err() {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}
