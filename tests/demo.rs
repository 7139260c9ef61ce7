//! The built-in demo, run as a newcomer runs it (`streamgate demo`): the page, the HTTP echo,
//! the WebSocket echo and the event stream all answer over TLS, with the certificate whose
//! fingerprint the command printed (the client trusts exactly that certificate); and the
//! page's "Kill and restart an event backend" button leaves the event stream running.

use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use crate::support::pki::pinned_client_config;
use crate::support::sse::{Item, SseStream};
use crate::support::within;

fn connector(fingerprint: &[u8], alpn: &[u8]) -> TlsConnector {
    TlsConnector::from(Arc::new(pinned_client_config(fingerprint, alpn)))
}

/// `AB:CD:...` as printed by the demo, as bytes.
fn parse_fingerprint(hex: &str) -> Vec<u8> {
    hex.split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("not hex: {hex:?}")))
        .collect()
}

/// `streamgate demo --listen 127.0.0.1:0`, with the port and fingerprint it printed.
struct DemoProcess {
    child: tokio::process::Child,
    /// Its stdout, kept open: the demo prints a third line, and a closed pipe would kill it.
    _stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    port: u16,
    fingerprint: Vec<u8>,
}

impl DemoProcess {
    async fn start() -> DemoProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .args(["demo", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let url = within("the demo's URL line", lines.next_line())
            .await
            .expect("stdout readable")
            .expect("the demo prints its URL");
        let port: u16 = url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {url:?}"));
        let fingerprint_line = within("the fingerprint line", lines.next_line())
            .await
            .expect("stdout readable")
            .expect("the demo prints the fingerprint");
        let fingerprint =
            parse_fingerprint(fingerprint_line.rsplit(' ').next().expect("a fingerprint"));
        assert_eq!(fingerprint.len(), 32, "a SHA-256: {fingerprint_line}");
        DemoProcess {
            child,
            _stdout: lines,
            port,
            fingerprint,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// An HTTP/2 connection that trusts only the certificate with the printed fingerprint.
    async fn h2(&self) -> SendRequest<Full<Bytes>> {
        let tcp = within("TCP connect", TcpStream::connect(self.addr()))
            .await
            .expect("the demo accepts");
        let tls = within(
            "TLS handshake",
            connector(&self.fingerprint, b"h2").connect(localhost(), tcp),
        )
        .await
        .expect("TLS handshake: the demo presents the certificate it printed");
        let (h2, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        h2
    }

    fn url(&self, target: &str) -> String {
        format!("https://localhost:{}{target}", self.port)
    }
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("valid name")
}

#[tokio::test]
async fn demo_serves_page_echo_websocket_and_events() {
    let mut demo = DemoProcess::start().await;
    let port = demo.port;
    // The page and the HTTP echo, over HTTP/2, with the printed certificate.
    let mut h2 = demo.h2().await;
    let page = h2
        .send_request(
            Request::get(format!("https://localhost:{port}/"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("the page answers");
    assert_eq!(page.status(), 200);
    let body = page
        .into_body()
        .collect()
        .await
        .expect("page body")
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    for needle in [
        "streamgate demo",
        "new WebSocket(",
        "new EventSource('/events')",
        "Kill and restart an event backend",
        "/demo/kill-event-backend",
    ] {
        assert!(body.contains(needle), "the page has {needle}");
    }
    let echo = h2
        .send_request(
            Request::builder()
                .method(Method::POST)
                .uri(format!("https://localhost:{port}/echo/x?y=1"))
                .body(Full::new(Bytes::from_static(b"hello")))
                .expect("request"),
        )
        .await
        .expect("the echo answers");
    let echoed = echo
        .into_body()
        .collect()
        .await
        .expect("echo body")
        .to_bytes();
    let echoed = String::from_utf8_lossy(&echoed);
    assert!(echoed.starts_with("POST /echo/x?y=1 HTTP/1.1"), "{echoed}");
    assert!(echoed.contains("x-forwarded-proto: https"), "{echoed}");
    assert!(echoed.contains("5 body bytes"), "{echoed}");

    // The first event of the live stream.
    let events = h2
        .send_request(
            Request::get(format!("https://localhost:{port}/events"))
                .header("last-event-id", "41")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("the stream answers");
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut stream = events.into_body();
    let first = within("the first event", stream.frame())
        .await
        .expect("a frame")
        .expect("no error")
        .into_data()
        .expect("data");
    assert!(
        String::from_utf8_lossy(&first).starts_with("id: 42\n"),
        "resumes after Last-Event-ID: {first:?}"
    );

    // The WebSocket echo, over HTTP/1.1.
    let tcp = TcpStream::connect(demo.addr())
        .await
        .expect("the demo accepts");
    let tls = connector(&demo.fingerprint, b"http/1.1")
        .connect(localhost(), tcp)
        .await
        .expect("TLS handshake");
    let (mut ws, _) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(format!("wss://localhost:{port}/ws"), tls),
    )
    .await
    .expect("101");
    ws.send(Message::text("hello over wss"))
        .await
        .expect("send");
    let reply = within("the echo", ws.next())
        .await
        .expect("a message")
        .expect("ok");
    assert_eq!(reply, Message::text("hello over wss"));

    demo.child.start_kill().expect("the demo can be stopped");
}

/// One `tick` event of the demo's counter: its id and the backend that wrote it.
struct Tick {
    id: u64,
    backend: String,
}

/// The next event of `stream`, skipping heartbeats. A `retry:` hint or the end of the stream
/// fails the test: the gateway gave up instead of resuming.
async fn next_tick(stream: &mut SseStream) -> Tick {
    loop {
        match stream.next_item().await {
            Some(Item::Event(e)) => {
                let data: serde_json::Value = serde_json::from_str(&e.data)
                    .unwrap_or_else(|err| panic!("tick data is JSON: {err}: {:?}", e.data));
                let id = e.id.parse().unwrap_or_else(|_| panic!("numeric id: {e:?}"));
                assert_eq!(data["count"], id, "the count is the id: {e:?}");
                let backend = data["backend"]
                    .as_str()
                    .expect("a backend name")
                    .to_string();
                return Tick { id, backend };
            }
            Some(Item::Comment(_)) => continue,
            other => panic!(
                "expected the next event, got {other:?}; raw so far: {:?}",
                stream.raw_text()
            ),
        }
    }
}

/// What the page's button does: the backend serving a live stream is killed (its connections
/// dropped without an end, its port closed for a few seconds), and the client's stream goes
/// on from the other backend in the same response, without a missing id or an end
/// (`[route.sse] resume = true`).
#[tokio::test]
async fn demo_event_stream_survives_killing_its_backend() {
    let mut demo = DemoProcess::start().await;
    let mut h2 = demo.h2().await;
    let get = |target: &str| {
        Request::get(demo.url(target))
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let post = |target: &str| {
        Request::post(demo.url(target))
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    async fn answer(h2: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> (u16, String) {
        let res = within("the answer", h2.send_request(req))
            .await
            .expect("the demo answers");
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    // The control reaches only the demo's own event backends, and only by POST.
    let (status, body) = answer(&mut h2, get("/demo/kill-event-backend")).await;
    assert_eq!(status, 405, "{body}");
    let (status, body) = answer(
        &mut h2,
        post("/demo/kill-event-backend?backend=127.0.0.1:22"),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let events = within("the stream's head", h2.send_request(get("/events")))
        .await
        .expect("the stream answers");
    assert_eq!(events.status(), 200);
    let mut stream = SseStream::new(events);
    let first = next_tick(&mut stream).await;

    let (status, body) = answer(
        &mut h2,
        post(&format!(
            "/demo/kill-event-backend?backend={}",
            first.backend
        )),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with(&format!("killed {}", first.backend)),
        "{body}"
    );

    // Eight more events: past the moment the killed backend listens again (5 s).
    let mut last = first.id;
    let mut served_by = Vec::new();
    for _ in 0..8 {
        let tick = next_tick(&mut stream).await;
        assert_eq!(
            tick.id,
            last + 1,
            "ids continue across the kill without a gap or a repeat; raw: {:?}",
            stream.raw_text()
        );
        last = tick.id;
        served_by.push(tick.backend);
    }
    assert!(
        served_by.iter().any(|b| *b != first.backend),
        "the stream moved off {}: {served_by:?}",
        first.backend
    );

    demo.child.start_kill().expect("the demo can be stopped");
}
