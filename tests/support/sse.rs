//! Server-Sent Events for tests: a backend whose event stream the test writes byte by byte, a
//! client that parses what arrives by the WHATWG rules (HTML 9.2.6) and keeps the raw bytes,
//! and the real `streamgate` binary for tests that measure the process.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

use super::body::{empty, Body};
use super::client::{tls_connect, Proto};
use super::pki::TestCa;
use super::within;

/// The host name clients use; the default test certificate covers it.
pub const HOST: &str = "gw.test";

// ---------------------------------------------------------------------------------------------
// Backend

/// A hyper HTTP/1.1 server on 127.0.0.1:0 that answers every request with an event stream and
/// hands the test a [`BackendStream`] to write it. Stops accepting when dropped.
pub struct SseBackend {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
    streams: mpsc::UnboundedReceiver<BackendStream>,
}

/// One response the backend is streaming: the request that opened it and the writer of its
/// body. Dropping it ends the body cleanly (a zero-length chunk).
pub struct BackendStream {
    /// Method, target and headers exactly as the backend received them.
    pub request: http::request::Parts,
    /// The backend's number for this stream, also sent as the `x-stream` response header.
    pub number: u64,
    tx: mpsc::Sender<Bytes>,
    written: u64,
    conn: Arc<BackendConn>,
}

/// What the test needs to cut a backend connection abruptly.
struct BackendConn {
    task: Mutex<Option<AbortHandle>>,
    /// A second descriptor of the socket, so the test can set `SO_LINGER` 0 and make the
    /// close a reset.
    dup: Mutex<Option<std::net::TcpStream>>,
}

/// What became of a write that was given a deadline.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    Written,
    /// The body's channel stayed full: the gateway is not reading.
    Stalled,
    /// The response body is gone: the connection ended.
    Gone,
}

/// The response body: whatever the test sends, as it sends it.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

impl SseBackend {
    pub async fn start() -> SseBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind SSE backend");
        let addr = listener.local_addr().expect("backend address");
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let numbers = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let Some((tcp, dup)) = duplicate(tcp) else {
                    continue;
                };
                let conn = Arc::new(BackendConn {
                    task: Mutex::new(None),
                    dup: Mutex::new(Some(dup)),
                });
                let (streams_tx, numbers, conn_ref) =
                    (streams_tx.clone(), numbers.clone(), conn.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (request, _body) = req.into_parts();
                    let number = numbers.fetch_add(1, Ordering::Relaxed);
                    // Capacity 1: a send waits until hyper has taken the previous chunk, so a
                    // gateway that stops reading stalls the test's writes.
                    let (tx, rx) = mpsc::channel(1);
                    let _ = streams_tx.send(BackendStream {
                        request,
                        number,
                        tx,
                        written: 0,
                        conn: conn_ref.clone(),
                    });
                    let response = Response::builder()
                        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
                        .header(header::CACHE_CONTROL, "no-cache, no-transform")
                        .header("x-accel-buffering", "no")
                        .header("x-stream", number.to_string())
                        .header(header::SET_COOKIE, "seen=1; Secure; HttpOnly")
                        // Hop-by-hop: must not reach the client (an HTTP/2 client resets on it).
                        .header(header::CONNECTION, "keep-alive")
                        .body(ChannelBody { rx })
                        .expect("valid response");
                    async move { Ok::<_, Infallible>(response) }
                });
                let task = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
                *conn.task.lock().expect("not poisoned") = Some(task.abort_handle());
            }
        });
        SseBackend {
            addr,
            accept,
            streams,
        }
    }

    /// `http://127.0.0.1:PORT`, as a route's `backends` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The stream of the next request that reaches the backend.
    pub async fn stream(&mut self) -> BackendStream {
        within("a request to reach the SSE backend", self.streams.recv())
            .await
            .expect("the backend's accept loop is alive")
    }
}

impl Drop for SseBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The accepted socket back as a tokio stream, plus a second descriptor of it.
fn duplicate(tcp: TcpStream) -> Option<(TcpStream, std::net::TcpStream)> {
    let std = tcp.into_std().ok()?;
    let dup = std.try_clone().ok()?;
    Some((TcpStream::from_std(std).ok()?, dup))
}

impl BackendStream {
    /// Writes `bytes` as one chunk; fails the test if the body is gone or the write waits
    /// longer than the harness's patience.
    pub async fn write(&mut self, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        let len = bytes.len() as u64;
        within("the backend's write to be taken", self.tx.send(bytes))
            .await
            .expect("the backend's response body is still being read");
        self.written += len;
    }

    /// Writes `bytes` unless the body's channel stays full for `wait` or the body is gone.
    pub async fn write_within(&mut self, bytes: Bytes, wait: Duration) -> Write {
        match tokio::time::timeout(wait, self.tx.reserve()).await {
            Ok(Ok(permit)) => {
                self.written += bytes.len() as u64;
                permit.send(bytes);
                Write::Written
            }
            Ok(Err(_closed)) => Write::Gone,
            Err(_elapsed) => Write::Stalled,
        }
    }

    /// Bytes written into the body so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Waits until the response body is dropped: the connection to the gateway ended or
    /// hyper gave up on the response.
    pub async fn disconnected(&self) {
        within("the backend to see its stream go away", self.tx.closed()).await;
    }

    /// Whether the response body is already gone.
    pub fn is_disconnected(&self) -> bool {
        self.tx.is_closed()
    }

    /// Ends the body cleanly.
    pub fn end(self) {}

    /// Cuts the connection the way a crashed process does: the serving task dies and the
    /// socket is closed with a reset (`SO_LINGER` 0), mid-body.
    pub fn kill(self) {
        let dup = self.conn.dup.lock().expect("not poisoned").take();
        if let Some(dup) = &dup {
            socket2::SockRef::from(dup)
                .set_linger(Some(Duration::ZERO))
                .expect("set SO_LINGER");
        }
        if let Some(task) = self.conn.task.lock().expect("not poisoned").take() {
            task.abort();
        }
        drop(dup);
    }

    /// The value of request header `name`, which must have arrived at most once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut all = self.request.headers.get_all(name).iter();
        let first = all.next();
        assert!(
            all.next().is_none(),
            "request header {name} arrived more than once"
        );
        first.map(|v| v.to_str().expect("test headers are ASCII"))
    }

    /// The request target as it arrived.
    pub fn target(&self) -> String {
        self.request.uri.to_string()
    }
}

/// A backend written by hand on a raw socket, for what hyper would not send: a close-delimited
/// response (no Content-Length, no chunking; the end of the body is the connection closing).
pub struct RawBackend {
    pub addr: SocketAddr,
    listener: TcpListener,
}

impl RawBackend {
    pub async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw backend");
        let addr = listener.local_addr().expect("raw backend address");
        RawBackend { addr, listener }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Accepts the next connection, reads one request head and writes `head`; returns the
    /// request head and the socket to write the body on.
    pub async fn accept(&self, head: &str) -> (String, TcpStream) {
        let (mut tcp, _) = within(
            "the gateway to connect to the raw backend",
            self.listener.accept(),
        )
        .await
        .expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = within("a request head at the raw backend", tcp.read(&mut buf))
                .await
                .expect("read the request head");
            assert!(n > 0, "the gateway closed before sending a request head");
            request.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(head.as_bytes())
            .await
            .expect("write the response head");
        (String::from_utf8_lossy(&request).into_owned(), tcp)
    }
}

// ---------------------------------------------------------------------------------------------
// Client

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

/// One TLS connection to the gateway, HTTP/1.1 or HTTP/2 by ALPN, that opens event streams.
pub struct SseClient {
    pub proto: Proto,
    sender: Sender,
    /// The connection task; `None` on a second handle of an HTTP/2 connection.
    _conn: Option<JoinHandle<()>>,
}

impl SseClient {
    /// Connects to a gateway at `addr` whose certificate `ca` signed, naming [`HOST`].
    pub async fn connect(addr: SocketAddr, ca: &TestCa, proto: Proto) -> SseClient {
        let tls = tls_connect(addr, ca, Some(HOST), &[proto.alpn()], true).await;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(proto.alpn()),
            "ALPN selects {proto}"
        );
        let io = TokioIo::new(tls);
        let (sender, conn) = match proto {
            Proto::H1 => {
                let (sender, conn) = within(
                    "HTTP/1.1 handshake",
                    hyper::client::conn::http1::handshake(io),
                )
                .await
                .expect("HTTP/1.1 handshake");
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (Sender::H1(sender), conn)
            }
            Proto::H2 => {
                let handshake = hyper::client::conn::http2::handshake(TokioExecutor::new(), io);
                let (sender, conn) = within("HTTP/2 handshake", handshake)
                    .await
                    .expect("HTTP/2 handshake");
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (Sender::H2(sender), conn)
            }
        };
        SseClient {
            proto,
            sender,
            _conn: Some(conn),
        }
    }

    /// Another handle on the same HTTP/2 connection, to open streams concurrently.
    pub fn h2_handle(&self) -> SseClient {
        match &self.sender {
            Sender::H2(s) => SseClient {
                proto: Proto::H2,
                sender: Sender::H2(s.clone()),
                _conn: None,
            },
            Sender::H1(_) => panic!("an HTTP/1.1 connection carries one request at a time"),
        }
    }

    /// `GET target` as an `EventSource` sends it (`Accept: text/event-stream`), spelled for
    /// this client's protocol: `Host` over HTTP/1.1, `:authority` over HTTP/2.
    pub fn get(&self, target: &str) -> http::request::Builder {
        let builder = Request::builder()
            .header(header::ACCEPT, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache");
        match self.proto {
            Proto::H1 => builder.uri(target).header(header::HOST, HOST),
            Proto::H2 => builder
                .version(Version::HTTP_2)
                .uri(format!("https://{HOST}{target}")),
        }
    }

    /// Sends `req` and waits for the response head.
    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        let proto = self.proto;
        let sent = async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
            }
        };
        within("the response head from the gateway", sent)
            .await
            .unwrap_or_else(|e| panic!("{proto} request failed: {}", chain(&e)))
    }

    /// Opens the event stream at `target`; asserts a 200 `text/event-stream` answer.
    pub async fn open(&mut self, target: &str) -> SseStream {
        let req = self.get(target).body(empty()).expect("valid request");
        self.open_with(req).await
    }

    /// Opens an event stream with a request the test built.
    pub async fn open_with(&mut self, req: Request<Body>) -> SseStream {
        let response = self.send(req).await;
        let stream = SseStream::new(response);
        assert_eq!(
            stream.status,
            StatusCode::OK,
            "{}: event stream status",
            self.proto
        );
        assert_eq!(stream.version, self.proto.version(), "response version");
        let content_type = stream
            .header(header::CONTENT_TYPE.as_str())
            .unwrap_or_default();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{}: content-type {content_type:?}",
            self.proto
        );
        stream
    }
}

/// What the client's parser hands on: the three things a WHATWG event stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(Event),
    /// A `:` line, without the colon.
    Comment(String),
    /// A valid `retry:` field: the new reconnection time in milliseconds.
    Retry(u64),
}

/// A dispatched event, as `EventSource` would fire it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The type: the last `event:` field, or "message".
    pub event: String,
    /// The `data:` lines joined with LF.
    pub data: String,
    /// The last event ID at dispatch time (it carries over from earlier events).
    pub id: String,
}

impl Event {
    /// A `message` event.
    pub fn message(id: &str, data: &str) -> Event {
        Event {
            event: "message".into(),
            data: data.into(),
            id: id.into(),
        }
    }
}

/// The event-stream parser of WHATWG HTML 9.2.6: lines end with CRLF, LF or CR (also across
/// chunks); a blank line dispatches; `:` lines are comments; fields event, data, id, retry.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    after_cr: bool,
    started: bool,
    data: String,
    event_type: String,
    id_buffer: String,
    /// The event source's last event ID string: what a reconnect sends as `Last-Event-ID`.
    last_event_id: String,
}

impl Parser {
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut VecDeque<Item>) {
        while !bytes.is_empty() {
            if std::mem::take(&mut self.after_cr) && bytes[0] == b'\n' {
                // The LF of a CRLF whose CR ended the previous chunk.
                bytes = &bytes[1..];
                continue;
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.line.extend_from_slice(bytes);
                    return;
                }
                Some(i) => {
                    self.line.extend_from_slice(&bytes[..i]);
                    self.after_cr = bytes[i] == b'\r';
                    bytes = &bytes[i + 1..];
                    let mut line = std::mem::take(&mut self.line);
                    self.line_done(&line, out);
                    line.clear();
                    self.line = line;
                }
            }
        }
    }

    /// The stream ended: an event without its blank line is discarded.
    pub fn finish(&mut self) {
        self.line.clear();
        self.data.clear();
        self.event_type.clear();
    }

    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    fn line_done(&mut self, mut line: &[u8], out: &mut VecDeque<Item>) {
        if !std::mem::replace(&mut self.started, true) {
            // The UTF-8 decoder strips one leading byte order mark.
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if let Some(comment) = line.strip_prefix(b":") {
            out.push_back(Item::Comment(String::from_utf8_lossy(comment).into_owned()));
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event_type = value.into_owned(),
            b"data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            b"id" if !value.contains('\0') => self.id_buffer = value.into_owned(),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse() {
                    out.push_back(Item::Retry(ms));
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<Item>) {
        self.last_event_id = self.id_buffer.clone();
        let event_type = std::mem::take(&mut self.event_type);
        let mut data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return;
        }
        data.pop(); // the LF after the last data line
        out.push_back(Item::Event(Event {
            event: if event_type.is_empty() {
                "message".into()
            } else {
                event_type
            },
            data,
            id: self.last_event_id.clone(),
        }));
    }
}

/// An event stream as the client receives it: parsed items, and every raw byte.
pub struct SseStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub version: Version,
    body: Incoming,
    parser: Parser,
    items: VecDeque<Item>,
    raw: Vec<u8>,
    /// Set when the body has ended: `Ok` for a clean end, `Err` with hyper's reason.
    end: Option<Result<(), String>>,
}

impl SseStream {
    pub fn new(response: Response<Incoming>) -> SseStream {
        let (parts, body) = response.into_parts();
        SseStream {
            status: parts.status,
            headers: parts.headers,
            version: parts.version,
            body,
            parser: Parser::default(),
            items: VecDeque::new(),
            raw: Vec::new(),
            end: None,
        }
    }

    /// The only value of response header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut all = self.headers.get_all(name).iter();
        let first = all.next();
        assert!(
            all.next().is_none(),
            "response header {name} arrived more than once"
        );
        first.map(|v| v.to_str().expect("test headers are ASCII"))
    }

    /// Every byte of the body received so far.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn last_event_id(&self) -> &str {
        self.parser.last_event_id()
    }

    /// Reads the next frame of the body (waiting at most the harness's patience).
    async fn pull(&mut self) {
        match within("the next bytes of the event stream", self.body.frame()).await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.raw.extend_from_slice(data);
                    self.parser.feed(data, &mut self.items);
                }
            }
            Some(Err(e)) => {
                self.parser.finish();
                self.end = Some(Err(chain(&e)));
            }
            None => {
                self.parser.finish();
                self.end = Some(Ok(()));
            }
        }
    }

    /// The next event, comment or retry; `None` once the stream has ended.
    pub async fn next_item(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.items.pop_front() {
                return Some(item);
            }
            if self.end.is_some() {
                return None;
            }
            self.pull().await;
        }
    }

    /// The next item, which must be an event.
    pub async fn event(&mut self) -> Event {
        match self.next_item().await {
            Some(Item::Event(e)) => e,
            other => panic!(
                "expected an event, got {other:?} (end: {:?}); raw so far: {:?}",
                self.end,
                self.raw_text()
            ),
        }
    }

    /// The next item, which must be a comment; returns its text.
    pub async fn comment(&mut self) -> String {
        match self.next_item().await {
            Some(Item::Comment(c)) => c,
            other => panic!(
                "expected a comment, got {other:?} (end: {:?}); raw so far: {:?}",
                self.end,
                self.raw_text()
            ),
        }
    }

    /// Waits until the raw bytes received end with `tail` (a partial event has arrived).
    pub async fn raw_ends_with(&mut self, tail: &[u8]) {
        while !self.raw.ends_with(tail) {
            assert!(
                self.end.is_none(),
                "stream ended before {:?} arrived; raw: {:?}",
                String::from_utf8_lossy(tail),
                self.raw_text()
            );
            self.pull().await;
        }
    }

    /// Reads to the end of the stream; returns the items not yet taken and how it ended. The
    /// whole wait is bounded: a stream kept alive by heartbeats alone fails the test too.
    pub async fn finish(&mut self) -> (Vec<Item>, Result<(), String>) {
        within("the event stream to end", async {
            while self.end.is_none() {
                self.pull().await;
            }
        })
        .await;
        let items = self.items.drain(..).collect();
        (items, self.end.clone().expect("the stream has ended"))
    }

    pub fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// An error and its sources, for messages.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// The `streamgate` binary, run with a config file written for the test, so the test can
/// measure the process (its resident memory) as an operator would.
pub struct GatewayProcess {
    pub https: SocketAddr,
    pub ca: TestCa,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts the binary with `routes` (TOML `[[route]]` tables) and a certificate for
    /// [`HOST`]; returns once it logs that the TLS listener is up.
    pub async fn start(routes: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new();
        let leaf = ca.leaf(&[HOST]);
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, &leaf.cert_pem).expect("write cert");
        std::fs::write(&key, &leaf.key_pem).expect("write key");
        // A free port: bind port 0 and let it go again.
        let https = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port");
        let config = dir.path().join("streamgate.toml");
        let text = format!(
            "[listen]\nhttps = \"{https}\"\n[[cert]]\ncert = {cert:?}\nkey = {key:?}\n{routes}"
        );
        std::fs::write(&config, &text).expect("write config");

        let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the streamgate binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let lines = log.clone();
        // Keep reading the log to its end, so the gateway never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening (TLS)") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                lines.lock().expect("not poisoned").push(line);
            }
        });
        let up = within("the streamgate binary to listen", ready).await;
        let process = GatewayProcess {
            https,
            ca,
            child,
            log,
            _dir: dir,
        };
        assert!(
            up.is_ok(),
            "streamgate exited before listening:\n{}",
            process.log()
        );
        process
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("not poisoned").join("\n")
    }

    /// A field of /proc/PID/status in KiB: `VmRSS` (resident now), `VmHWM` (peak resident).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status of the gateway");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        // The process this test started, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
