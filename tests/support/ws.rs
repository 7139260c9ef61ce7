//! WebSocket peers for the integration tests: tokio-tungstenite clients over the gateway's TLS
//! listener, backends on 127.0.0.1:0 that count their connections and report what they see, a
//! raw frame codec with permessage-deflate (RFC 7692) for what tungstenite cannot do, and the
//! real `streamgate` binary for measurements that must not share a process with the test.

use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{generate_key, Request, Response};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as ServerRequest, Response as ServerResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::client::tls_connect;
use super::gateway::TestGateway;
use super::pki::TestCa;
use super::{within, PATIENCE};

/// A tungstenite client connected through the gateway over TLS (HTTP/1.1).
pub type WsClient = WebSocketStream<TlsStream<TcpStream>>;

/// A hand-driven client: the TLS stream, buffered for reading frames.
pub type RawClient = BufReader<TlsStream<TcpStream>>;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;

/// No size limits: the tests send messages larger than tungstenite's defaults (16 MiB frames).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

/// A Close payload with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// The handshake request tungstenite would send for `wss://gw.test{path}`; add headers to it.
pub fn request(path: &str) -> Request {
    format!("wss://gw.test{path}")
        .into_client_request()
        .expect("valid WebSocket URL")
}

/// Opens TLS (ALPN http/1.1, SNI gw.test) to the gateway and runs the WebSocket handshake.
pub async fn try_connect(gw: &TestGateway, req: Request) -> Result<(WsClient, Response), WsError> {
    let tls = tls_connect(gw.https, &gw.ca, Some("gw.test"), &[b"http/1.1"], true).await;
    within(
        "the WebSocket handshake through the gateway",
        tokio_tungstenite::client_async_with_config(req, tls, Some(ws_config())),
    )
    .await
}

/// A WebSocket connection to `path` that must succeed with 101.
pub async fn connect(gw: &TestGateway, path: &str) -> WsClient {
    let (ws, response) = try_connect(gw, request(path))
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake to {path} failed: {e}"));
    assert_eq!(response.status(), 101);
    ws
}

/// The status a refused handshake got (panics if it succeeded or failed another way).
pub async fn refused_status(gw: &TestGateway, req: Request) -> u16 {
    match try_connect(gw, req).await {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
        Ok((_, response)) => panic!("handshake succeeded with {}", response.status()),
    }
}

/// The next message (any kind) from `ws`; panics on an error or the end of the stream.
pub async fn next<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within("a WebSocket message", ws.next())
        .await
        .expect("the connection is still open")
        .unwrap_or_else(|e| panic!("WebSocket error: {e}"))
}

/// The next data message, skipping Ping and Pong.
pub async fn next_data<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match next(ws).await {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Sends `msg` and checks the same message comes back.
pub async fn echo_round_trip<S>(ws: &mut WebSocketStream<S>, msg: Message)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within("a message to be sent", ws.send(msg.clone()))
        .await
        .expect("send a message");
    let back = next_data(ws).await;
    assert!(
        back == msg,
        "echo differs: sent {} bytes, got {back:?}",
        msg.len()
    );
}

/// Reads until a Close arrives (Ping and Pong are skipped, data fails the test) and returns it.
pub async fn expect_close<S>(ws: &mut WebSocketStream<S>) -> CloseFrame
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match next(ws).await {
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(Some(frame)) => return frame,
            other => panic!("expected a Close with a code, got {other:?}"),
        }
    }
}

/// Reads until the stream ends, ignoring what arrives (the close handshake's tail).
pub async fn drain_to_end<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within("the WebSocket to end", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Backends

/// A TCP server on 127.0.0.1:0 that runs `handler` for each connection, counts the connections
/// it accepts, and reports each handler's end. It stops accepting when dropped.
pub struct WsBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    ended: mpsc::UnboundedReceiver<()>,
    accept: JoinHandle<()>,
}

impl WsBackend {
    pub async fn start<F, Fut>(handler: F) -> WsBackend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let count = accepted.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let conn = handler(tcp);
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    conn.await;
                    let _ = ended_tx.send(());
                });
            }
        });
        WsBackend {
            addr,
            accepted,
            ended,
            accept,
        }
    }

    /// A tungstenite backend that echoes data messages and reports what it sees; see
    /// [`echo_connection`] for the commands it obeys.
    pub async fn echo() -> (WsBackend, mpsc::UnboundedReceiver<Seen>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backend = WsBackend::start(move |tcp| echo_connection(tcp, tx.clone())).await;
        (backend, rx)
    }

    /// A hand-written backend that accepts permessage-deflate when offered, inflates what it
    /// receives and answers each data message with a compressed `echo: <text>`.
    pub async fn deflate_echo() -> (WsBackend, mpsc::UnboundedReceiver<RawSeen>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backend = WsBackend::start(move |tcp| deflate_connection(tcp, tx.clone())).await;
        (backend, rx)
    }

    /// `http://127.0.0.1:PORT`, as a route's `backends` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until one more connection handler has returned.
    pub async fn connection_ended(&mut self) {
        within("a backend connection to end", self.ended.recv())
            .await
            .expect("the accept loop is alive");
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What a tungstenite backend saw.
#[derive(Debug)]
pub enum Seen {
    /// The handshake request's headers.
    Handshake(http::HeaderMap),
    /// Any message but Close, as it was read.
    Message(Message),
    Close(Option<CloseFrame>),
}

/// Accepts a WebSocket handshake, reporting the request's headers on `seen` and choosing the
/// last subprotocol the client offered, if any.
pub async fn accept(
    tcp: TcpStream,
    seen: &mpsc::UnboundedSender<Seen>,
) -> Result<WebSocketStream<TcpStream>, WsError> {
    let seen = seen.clone();
    // The signature is tungstenite's `Callback`, large error and all.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &ServerRequest,
                         mut response: ServerResponse|
          -> Result<ServerResponse, ErrorResponse> {
        let _ = seen.send(Seen::Handshake(req.headers().clone()));
        let chosen = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(|p| p.trim().to_string());
        if let Some(p) = chosen {
            let value = http::HeaderValue::from_str(&p).expect("a token is a header value");
            response
                .headers_mut()
                .insert("sec-websocket-protocol", value);
        }
        Ok(response)
    };
    within(
        "the backend's side of the handshake",
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(ws_config())),
    )
    .await
}

/// Echoes Text and Binary messages and reports every message. Text commands instead of echo:
/// `!close CODE REASON` closes from the backend, `!ping PAYLOAD` sends a Ping, `!blob LEN`
/// sends a Binary message of LEN bytes. When the
/// WebSocket has ended it half-closes TCP and waits for the gateway to close its side, so the
/// handler's end (see [`WsBackend::connection_ended`]) means the gateway let go of the connection.
pub async fn echo_connection(tcp: TcpStream, seen: mpsc::UnboundedSender<Seen>) {
    let Ok(mut ws) = accept(tcp, &seen).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        match &msg {
            Message::Close(frame) => {
                let _ = seen.send(Seen::Close(frame.clone()));
                continue;
            }
            Message::Text(text) => {
                if let Some(rest) = text.strip_prefix("!close ") {
                    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                    let code = code.parse().expect("!close takes a numeric code");
                    let _ = ws.close(Some(close_frame(code, reason))).await;
                } else if let Some(len) = text.strip_prefix("!blob ") {
                    let len = len.parse().expect("!blob takes a length");
                    let _ = ws.send(Message::binary(vec![0x5A; len])).await;
                } else if let Some(payload) = text.strip_prefix("!ping ") {
                    let _ = ws
                        .send(Message::Ping(payload.as_bytes().to_vec().into()))
                        .await;
                } else {
                    let _ = ws.send(msg.clone()).await;
                }
            }
            Message::Binary(_) => {
                let _ = ws.send(msg.clone()).await;
            }
            _ => {}
        }
        let _ = seen.send(Seen::Message(msg));
    }
    let tcp = ws.get_mut();
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 256];
    while let Ok(n) = tcp.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// The next [`Seen`] event from a backend.
pub async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within("the backend to see something", seen.recv())
        .await
        .expect("the backend is alive")
}

/// The next handshake the backend saw.
pub async fn seen_handshake(seen: &mut mpsc::UnboundedReceiver<Seen>) -> http::HeaderMap {
    match next_seen(seen).await {
        Seen::Handshake(headers) => headers,
        other => panic!("expected a handshake, the backend saw {other:?}"),
    }
}

/// The next data message the backend saw (handshakes, Ping and Pong skipped).
pub async fn seen_data(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Message {
    loop {
        match next_seen(seen).await {
            Seen::Handshake(_) | Seen::Message(Message::Ping(_) | Message::Pong(_)) => continue,
            Seen::Message(m) => return m,
            Seen::Close(f) => panic!("expected a message, the backend saw Close {f:?}"),
        }
    }
}

/// The Close the backend saw next (handshakes, Ping and Pong skipped; data fails the test).
pub async fn seen_close(seen: &mut mpsc::UnboundedReceiver<Seen>) -> CloseFrame {
    loop {
        match next_seen(seen).await {
            Seen::Handshake(_) | Seen::Message(Message::Ping(_) | Message::Pong(_)) => continue,
            Seen::Close(Some(frame)) => return frame,
            other => panic!("expected a Close with a code, the backend saw {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw frames and permessage-deflate

/// One frame as it was on the wire, and its payload unmasked.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
    /// Header and (masked) payload exactly as read.
    pub wire: Vec<u8>,
}

impl RawFrame {
    /// A Close frame's code.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Encodes a frame (RFC 6455 5.2), masked with `mask` when it goes toward a server.
pub fn encode_frame(
    fin: bool,
    rsv1: bool,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(u8::from(fin) << 7 | u8::from(rsv1) << 6 | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xFFFF => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads one whole frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<RawFrame> {
    let mut wire = vec![0u8; 2];
    r.read_exact(&mut wire).await?;
    let (b0, b1) = (wire[0], wire[1]);
    let len = match b1 & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            wire.extend_from_slice(&b);
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            wire.extend_from_slice(&b);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mask = if b1 & 0x80 != 0 {
        let mut k = [0u8; 4];
        r.read_exact(&mut k).await?;
        wire.extend_from_slice(&k);
        Some(k)
    } else {
        None
    };
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "frame too long"))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    wire.extend_from_slice(&payload);
    if let Some(k) = mask {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= k[i % 4]);
    }
    Ok(RawFrame {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode: b0 & 0x0F,
        mask,
        payload,
        wire,
    })
}

/// The tail a sync flush ends with, which RFC 7692 7.2.1 removes from each message.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// Compresses one message as permessage-deflate does: raw DEFLATE, sync flush, tail removed.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("compress into memory");
    encoder.flush().expect("sync flush into memory");
    let mut out = std::mem::take(encoder.get_mut());
    assert!(
        out.ends_with(&DEFLATE_TAIL),
        "a sync flush ends with 00 00 ff ff"
    );
    out.truncate(out.len() - DEFLATE_TAIL.len());
    out
}

/// Decompresses one permessage-deflate message (RFC 7692 7.2.2: the tail is put back).
pub fn inflate(data: &[u8]) -> Vec<u8> {
    let mut decoder = flate2::write::DeflateDecoder::new(Vec::new());
    decoder.write_all(data).expect("valid DEFLATE data");
    decoder
        .write_all(&DEFLATE_TAIL)
        .expect("valid DEFLATE data");
    decoder.flush().expect("inflate into memory");
    std::mem::take(decoder.get_mut())
}

/// Reads an HTTP head up to and including the blank line.
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<String> {
    let mut head = Vec::new();
    loop {
        if r.read_until(b'\n', &mut head).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if head.ends_with(b"\r\n\r\n") {
            return String::from_utf8(head)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

/// The value of header `name` in an HTTP head (the first, if repeated).
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A hand-driven WebSocket handshake to `path` through the gateway (TLS, ALPN http/1.1) with
/// `extra` header lines (`Name: value\r\n`). Checks the 101 and its accept key; returns the
/// connection and the response head.
pub async fn raw_connect(gw: &TestGateway, path: &str, extra: &str) -> (RawClient, String) {
    let tls = tls_connect(gw.https, &gw.ca, Some("gw.test"), &[b"http/1.1"], true).await;
    let mut io = BufReader::new(tls);
    let key = generate_key();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
    );
    io.write_all(req.as_bytes())
        .await
        .expect("send the handshake");
    io.flush().await.expect("send the handshake");
    let head = within("the gateway's answer to the handshake", read_head(&mut io))
        .await
        .expect("an HTTP response head");
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected 101, got:\n{head}"
    );
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some(derive_accept_key(key.as_bytes()).as_str()),
        "the accept key matches the client's key"
    );
    (io, head)
}

/// Accepts a handshake by hand: reads the request head, answers 101 with `extra` header lines.
pub async fn raw_accept(tcp: TcpStream, extra: &str) -> io::Result<(BufReader<TcpStream>, String)> {
    let mut io = BufReader::new(tcp);
    let head = read_head(&mut io).await?;
    answer_101(&mut io, &head, extra).await?;
    Ok((io, head))
}

/// Answers the handshake whose request head is `head` with a 101 and `extra` header lines.
async fn answer_101<W: AsyncWrite + Unpin>(io: &mut W, head: &str, extra: &str) -> io::Result<()> {
    let key = header(head, "sec-websocket-key")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Sec-WebSocket-Key"))?;
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    );
    io.write_all(response.as_bytes()).await?;
    io.flush().await
}

/// What the hand-written deflate backend saw.
#[derive(Debug)]
pub enum RawSeen {
    Handshake(String),
    Frame(RawFrame),
}

async fn deflate_connection(tcp: TcpStream, seen: mpsc::UnboundedSender<RawSeen>) {
    let mut io = BufReader::new(tcp);
    let Ok(head) = read_head(&mut io).await else {
        return;
    };
    let offered =
        header(&head, "sec-websocket-extensions").is_some_and(|e| e.contains("permessage-deflate"));
    let _ = seen.send(RawSeen::Handshake(head.clone()));
    let extra = if offered {
        "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    } else {
        ""
    };
    if answer_101(&mut io, &head, extra).await.is_err() {
        return;
    }
    while let Ok(frame) = read_frame(&mut io).await {
        let _ = seen.send(RawSeen::Frame(frame.clone()));
        let reply = match frame.opcode {
            OP_CLOSE => encode_frame(true, false, OP_CLOSE, &frame.payload, None),
            OP_TEXT if frame.fin => {
                let text = if frame.rsv1 {
                    inflate(&frame.payload)
                } else {
                    frame.payload.clone()
                };
                let mut answer = b"echo: ".to_vec();
                answer.extend_from_slice(&text);
                encode_frame(true, true, OP_TEXT, &deflate(&answer), None)
            }
            _ => continue,
        };
        if io.write_all(&reply).await.is_err() || frame.opcode == OP_CLOSE {
            break;
        }
    }
}

/// The next event from the deflate backend.
pub async fn next_raw_seen(seen: &mut mpsc::UnboundedReceiver<RawSeen>) -> RawSeen {
    within("the raw backend to see something", seen.recv())
        .await
        .expect("the backend is alive")
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// `streamgate` run as its own process with a config written to a temp dir, so its memory can
/// be read from /proc without the test's own allocations in it. Killed when dropped.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    pub ca: TestCa,
    child: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts the binary with `routes` (TOML `[[route]]` tables) and a certificate for gw.test.
    pub async fn start(routes: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new();
        let leaf = ca.leaf(&["gw.test"]);
        let cert = dir.path().join("gw.pem");
        let key = dir.path().join("gw.key");
        std::fs::write(&cert, &leaf.cert_pem).expect("write cert");
        std::fs::write(&key, &leaf.key_pem).expect("write key");
        let config = dir.path().join("streamgate.toml");
        let log = dir.path().join("streamgate.log");

        // The port is chosen by binding :0 and letting go of it; another process may take it
        // in between, so a start that fails to bind is retried on a fresh port.
        for _attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("find a free port")
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let text = format!(
                "[listen]\nhttps = \"{addr}\"\n[[cert]]\ncert = {cert:?}\nkey = {key:?}\n{routes}"
            );
            std::fs::write(&config, text).expect("write config");
            let mut child = spawn_gateway(&config, &log);
            if listening(&mut child, addr, &log).await {
                return GatewayProcess {
                    addr,
                    ca,
                    child,
                    log,
                    _dir: dir,
                };
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(text.contains("cannot listen"), "streamgate exited:\n{text}");
        }
        panic!("streamgate could not bind a free port in 5 attempts");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway's resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// What the gateway logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A TLS connection (ALPN http/1.1) and WebSocket handshake to `path`.
    pub async fn connect(&self, path: &str) -> WsClient {
        let tls = tls_connect(self.addr, &self.ca, Some("gw.test"), &[b"http/1.1"], true).await;
        let (ws, response) = within(
            "the WebSocket handshake through the gateway process",
            tokio_tungstenite::client_async_with_config(request(path), tls, Some(ws_config())),
        )
        .await
        .unwrap_or_else(|e| panic!("handshake failed: {e}\n{}", self.log_text()));
        assert_eq!(response.status(), 101);
        ws
    }
}

fn spawn_gateway(config: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::File::create(log).expect("create log file");
    std::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn streamgate")
}

/// Polls a TCP connect until the gateway listens (true) or exits (false). Polling: another
/// process offers no event to wait on.
async fn listening(child: &mut std::process::Child, addr: SocketAddr, log: &Path) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    panic!("streamgate did not listen within {PATIENCE:?}:\n{text}");
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks a backend that answers `T` with `NAME:T` (fleet's `Tagged`, events' `WsTagged`)
/// its name through `ws`.
pub async fn who<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> String {
    within("a message to be sent", ws.send(Message::text("who")))
        .await
        .expect("send a message");
    match next_data(ws).await {
        Message::Text(text) => text
            .as_str()
            .strip_suffix(":who")
            .unwrap_or_else(|| panic!("not a tagged echo: {text}"))
            .to_string(),
        other => panic!("expected the tagged echo, got {other:?}"),
    }
}
