//! The built-in demo, run as a newcomer runs it (`streamgate demo`): the page, the HTTP echo,
//! the WebSocket echo and the event stream all answer over TLS, with the certificate whose
//! fingerprint the command printed (the client trusts exactly that certificate).

use std::process::Stdio;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use crate::support::pki::pinned_client_config;
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

#[tokio::test]
async fn demo_serves_page_echo_websocket_and_events() {
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
    let printed = parse_fingerprint(fingerprint_line.rsplit(' ').next().expect("a fingerprint"));
    assert_eq!(printed.len(), 32, "a SHA-256: {fingerprint_line}");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let name = ServerName::try_from("localhost").expect("valid name");

    // The page and the HTTP echo, over HTTP/2, with the printed certificate.
    let tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("the demo accepts");
    // The client trusts only the certificate with the printed fingerprint.
    let tls = within(
        "TLS handshake",
        connector(&printed, b"h2").connect(name.clone(), tcp),
    )
    .await
    .expect("TLS handshake: the demo presents the certificate it printed");
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let page = h2
        .send_request(
            Request::get(format!("https://localhost:{port}/"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
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
    ] {
        assert!(body.contains(needle), "the page has {needle}");
    }
    let echo = h2
        .send_request(
            Request::builder()
                .method(Method::POST)
                .uri(format!("https://localhost:{port}/echo/x?y=1"))
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"hello",
                )))
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
                .body(http_body_util::Full::new(bytes::Bytes::new()))
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
    let tcp = TcpStream::connect(addr).await.expect("the demo accepts");
    let tls = connector(&printed, b"http/1.1")
        .connect(name, tcp)
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

    child.start_kill().expect("the demo can be stopped");
}
