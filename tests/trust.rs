//! Who the client is and what one client may hold: trusted proxies and X-Forwarded-*, the
//! PROXY protocol, per-address connection limits, per-route request rates and per-WebSocket
//! message rates. Each case checks the status, what the backend saw (or that it saw nothing)
//! and that other clients were served meanwhile.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures_util::SinkExt;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::support::backend::Tagged;
use crate::support::ws;
use crate::support::{empty, route, within, Backend, GatewayBuilder, Proto};

fn ip(last: u8) -> IpAddr {
    Ipv4Addr::new(127, 0, 0, last).into()
}

#[tokio::test]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .toml("trusted_proxies = [\"127.0.0.2/32\"]")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        // From a stranger: every forwarding header it made up is replaced.
        let mut stranger = gw.client_from(ip(3), proto, "a.gw.test").await;
        let req = stranger
            .request(Method::GET, "/")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "evil.example")
            .header("x-real-ip", "1.2.3.4")
            .header("forwarded", "for=1.2.3.4")
            .body(empty())
            .expect("request");
        let seen = stranger.fetch(req).await.echo();
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.3"), "{proto}");
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{proto}");
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some("a.gw.test"),
            "{proto}"
        );
        assert_eq!(seen.header("x-real-ip"), None, "{proto}");
        assert_eq!(seen.header("forwarded"), None, "{proto}");

        // From the trusted balancer: its client list is kept and it is appended; its
        // X-Forwarded-Proto stands (it ended TLS itself).
        let mut balancer = gw.client_from(ip(2), proto, "a.gw.test").await;
        // A chain in several field lines is one list (RFC 9110 5.3): none is lost.
        let req = balancer
            .request(Method::GET, "/")
            .header("x-forwarded-for", "198.51.100.1")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "http")
            .body(empty())
            .expect("request");
        let seen = balancer.fetch(req).await.echo();
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("198.51.100.1, 203.0.113.9, 127.0.0.2"),
            "{proto}"
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{proto}");
    }
}

#[tokio::test]
async fn hash_on_client_ip_uses_the_client_behind_a_trusted_proxy() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let gw = GatewayBuilder::new()
        .toml("trusted_proxies = [\"127.0.0.2/32\"]")
        .route(
            route("/")
                .to(a.url())
                .to(b.url())
                .set("balance", "\"hash\"")
                .set("hash_key", "\"client_ip\""),
        )
        .start()
        .await;
    let mut balancer = gw.client_from(ip(2), Proto::H1, "gw.test").await;
    // Many clients behind one balancer are spread, each one staying put.
    let mut seen = std::collections::BTreeMap::new();
    for round in 0..2 {
        for i in 0..20u8 {
            let client = format!("198.51.100.{i}");
            let req = balancer
                .request(Method::GET, "/")
                .header("x-forwarded-for", &client)
                .body(empty())
                .expect("request");
            let got = balancer.fetch(req).await;
            assert_eq!(got.status, StatusCode::OK);
            let who = got.headers["x-backend"].to_str().expect("name").to_string();
            if round == 0 {
                seen.insert(client, who);
            } else {
                assert_eq!(seen[&client], who, "{client} stays on its backend");
            }
        }
    }
    let on_a = seen.values().filter(|w| *w == "a").count();
    assert!(
        (1..20).contains(&on_a),
        "the balancer's clients are spread, not all on one backend: {seen:?}"
    );
}

/// A client that connects to the gateway from `local` and starts with `header`.
async fn raw_from(local: IpAddr, to: std::net::SocketAddr, header: &[u8]) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(local, 0))
        .expect("bind");
    let mut tcp = within("connect", socket.connect(to))
        .await
        .expect("connect");
    tcp.write_all(header).await.expect("write header");
    tcp
}

fn proxy_v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.extend_from_slice(&[0x21, 0x11, 0, 12]);
    b.extend_from_slice(&client);
    b.extend_from_slice(&[127, 0, 0, 1]);
    b.extend_from_slice(&port.to_be_bytes());
    b.extend_from_slice(&443u16.to_be_bytes());
    b
}

#[tokio::test]
async fn proxy_protocol_names_the_client_and_only_trusted_peers_may_send_it() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .plain_listener("proxy")
        .toml("trusted_proxies = [\"127.0.0.2/32\"]\nproxy_protocol = true")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let plain = gw.http.expect("plain listener");
    let request = b"GET /x HTTP/1.1\r\nHost: a.gw.test\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n";
    for header in [
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n".to_vec(),
        proxy_v2([203, 0, 113, 7], 5555),
    ] {
        let mut tcp = raw_from(ip(2), plain, &header).await;
        tcp.write_all(request).await.expect("request");
        let mut answer = Vec::new();
        within("the answer", tcp.read_to_end(&mut answer))
            .await
            .expect("read");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        // The client the header named, and not what the client itself claimed.
        assert!(text.contains("h:x-forwarded-for=203.0.113.7\n"), "{text}");
    }

    // Over TLS: the header, then the handshake, on the same connection.
    let tcp = raw_from(ip(2), gw.https, &proxy_v2([203, 0, 113, 8], 6666)).await;
    let config = Arc::new(gw.ca.client_config(&[b"http/1.1"], true));
    let name = rustls_pki_types::ServerName::try_from("a.gw.test").expect("name");
    let tls = within(
        "TLS after the PROXY header",
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake");
    let mut client = crate::support::Client::over_tls(Proto::H1, tls, "a.gw.test").await;
    let seen = client.get("/").await.echo();
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.8"));

    // A peer outside trusted_proxies is closed, whatever it sends; so is a trusted one
    // without a header.
    for (from, bytes) in [
        (
            ip(3),
            b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n".to_vec(),
        ),
        (ip(2), b"GET / HTTP/1.1\r\nHost: a.gw.test\r\n\r\n".to_vec()),
    ] {
        let mut tcp = raw_from(from, plain, &bytes).await;
        let _ = tcp.write_all(request).await;
        let mut answer = Vec::new();
        let _ = within("the close", tcp.read_to_end(&mut answer)).await;
        assert!(
            answer.is_empty(),
            "closed without an answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Three requests with a header reached the backend, nothing else did.
    let mut check = raw_from(ip(2), plain, b"PROXY UNKNOWN\r\n").await;
    check
        .write_all(b"GET /last HTTP/1.1\r\nHost: a.gw.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    within("the answer", check.read_to_end(&mut answer))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("h:x-forwarded-for=127.0.0.2\n"),
        "UNKNOWN: the peer stands: {text}"
    );
}

#[tokio::test]
async fn per_ip_connection_limit_closes_the_extra_connection_only() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .toml("[limits]\nper_ip_connections = 2")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let mut first = gw.client_from(ip(5), Proto::H1, "a.gw.test").await;
    let mut second = gw.client_from(ip(5), Proto::H2, "a.gw.test").await;
    assert_eq!(first.get("/").await.status, StatusCode::OK);
    assert_eq!(second.get("/").await.status, StatusCode::OK);
    // The third from the same address is closed before its handshake.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(ip(5), 0))
        .expect("bind");
    let mut third = socket.connect(gw.https).await.expect("connect");
    let mut buf = [0u8; 1];
    let n = within("the extra connection to close", third.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    // Another address is not affected, and the two open ones still work.
    let mut other = gw.client_from(ip(6), Proto::H1, "a.gw.test").await;
    assert_eq!(other.get("/").await.status, StatusCode::OK);
    assert_eq!(first.get("/").await.status, StatusCode::OK);
    // When one closes, the address may connect again.
    drop(second);
    let again = within("a new connection once one closed", async {
        loop {
            let socket = TcpSocket::new_v4().expect("socket");
            socket
                .bind(std::net::SocketAddr::new(ip(5), 0))
                .expect("bind");
            let tcp = socket.connect(gw.https).await.expect("connect");
            let config = Arc::new(gw.ca.client_config(&[b"http/1.1"], true));
            let name = rustls_pki_types::ServerName::try_from("a.gw.test").expect("name");
            if let Ok(tls) = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
            {
                return tls;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut client = crate::support::Client::over_tls(Proto::H1, again, "a.gw.test").await;
    assert_eq!(client.get("/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn route_rate_limit_answers_429_before_the_backend_and_per_client() {
    let a = Tagged::start("a").await;
    let gw = GatewayBuilder::new()
        .route(
            route("/api")
                .to(a.url())
                .set("rate_limit", "{ requests_per_second = 1, burst = 3 }"),
        )
        .route(route("/").to(a.url()))
        .start()
        .await;
    // Each protocol with addresses of its own, so each starts with a full budget.
    for (proto, mine, theirs) in [(Proto::H1, 7, 8), (Proto::H2, 9, 10)] {
        let before = a.requests();
        let mut client = gw.client_from(ip(mine), proto, "gw.test").await;
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(client.get("/api/x").await);
        }
        let codes: Vec<u16> = statuses.iter().map(|f| f.status.as_u16()).collect();
        // The burst passes; past it (well within a second) 429 with Retry-After.
        assert_eq!(&codes[..3], &[200, 200, 200], "{proto}: {codes:?}");
        assert!(codes[3..].iter().all(|c| *c == 429), "{proto}: {codes:?}");
        let limited = &statuses[4];
        assert_eq!(limited.headers["retry-after"], "1", "{proto}");
        assert!(
            limited.text().contains("route */api"),
            "{proto}: {}",
            limited.text()
        );
        assert_eq!(
            a.requests() - before,
            3,
            "{proto}: 429s never reach the backend"
        );
        // Another client has its own budget; other routes are not limited.
        let mut other = gw.client_from(ip(theirs), proto, "gw.test").await;
        assert_eq!(other.get("/api/x").await.status, StatusCode::OK, "{proto}");
        assert_eq!(client.get("/other").await.status, StatusCode::OK, "{proto}");
    }
}

#[tokio::test]
async fn websocket_message_rate_closes_with_1008() {
    let (backend, mut seen) = ws::WsBackend::echo().await;
    let gw = GatewayBuilder::new()
        .route(
            route("/ws")
                .to(backend.url())
                .set("websocket", "{ max_messages_per_second = 5 }"),
        )
        .start()
        .await;
    let mut client = ws::connect(&gw, "/ws").await;
    // A burst of twice the rate passes...
    for i in 0..10 {
        within("send", client.send(Message::text(format!("m{i}"))))
            .await
            .expect("send");
    }
    // ...the next one, in the same instant, is over the rate.
    within("send", client.send(Message::text("too fast")))
        .await
        .expect("send");
    let mut echoed = 0;
    let close = loop {
        match ws::next(&mut client).await {
            Message::Text(_) => echoed += 1,
            Message::Close(frame) => break frame,
            _ => {}
        }
    };
    let frame = close.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1008);
    assert_eq!(frame.reason.as_str(), "message rate exceeded");
    // Echoes of the burst may come before the Close; nothing can follow it.
    assert!(echoed <= 10, "{echoed}");
    // What the backend got, up to the Close the gateway sent it.
    let mut texts = Vec::new();
    loop {
        match within("the backend's view", seen.recv()).await {
            Some(ws::Seen::Close(_)) | None => break,
            Some(other) => texts.push(format!("{other:?}")),
        }
    }
    assert_eq!(
        texts.iter().filter(|t| t.contains("Text")).count(),
        10,
        "{texts:?}"
    );
    assert!(
        !texts.iter().any(|t| t.contains("too fast")),
        "the message over the rate never reached the backend: {texts:?}"
    );
    // Other WebSockets are unaffected.
    let mut other = ws::connect(&gw, "/ws").await;
    ws::echo_round_trip(&mut other, Message::text("hello")).await;
}

/// A backend whose response body never ends; `dropped` fires when the gateway lets go of it
/// (the backend's side of the exchange released).
async fn endless_backend() -> (Backend, tokio::sync::mpsc::UnboundedReceiver<()>) {
    struct Released(tokio::sync::mpsc::UnboundedSender<()>);
    impl Drop for Released {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |_req| {
        let released = Released(tx.clone());
        async move {
            let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(released, move |r| {
                let chunk = chunk.clone();
                async move {
                    Some((
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)),
                        r,
                    ))
                }
            });
            use http_body_util::BodyExt;
            let body = http_body_util::StreamBody::new(stream)
                .map_err(|never| match never {})
                .boxed();
            http::Response::new(body)
        }
    })
    .await;
    (backend, rx)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_the_backend_released() {
    let (backend, mut released) = endless_backend().await;
    let gw = GatewayBuilder::new()
        .toml("[limits]\nwrite_stall_timeout = \"500ms\"")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    // Reads the head and a little, then nothing more.
    let config = Arc::new(gw.ca.client_config(&[b"http/1.1"], true));
    let tcp = TcpStream::connect(gw.https).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("a.gw.test").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: a.gw.test\r\n\r\n")
        .await
        .expect("request");
    let mut head = [0u8; 1024];
    let n = tls.read(&mut head).await.expect("read");
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
    // The gateway fills the socket, stalls, and after the timeout lets go of both sides.
    released_and_others_served(&gw, &mut released).await;
    drop(tls);
}

/// The stalled client's backend response is released, and other clients are served.
async fn released_and_others_served(
    gw: &crate::support::gateway::TestGateway,
    released: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    within("the backend's response to be released", released.recv())
        .await
        .expect("released");
    let mut client = gw.client(Proto::H2, "a.gw.test").await;
    let response = client
        .send(
            client
                .request(Method::HEAD, "/")
                .body(empty())
                .expect("request"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// Over HTTP/2 flow control stops the gateway before the socket fills: a client that stops
/// reading one response (its stream window stays shut) is found all the same, its connection
/// closed after write_stall_timeout and the backend's response released.
#[tokio::test]
async fn an_h2_client_that_stops_reading_is_closed_and_the_backend_released() {
    let (backend, mut released) = endless_backend().await;
    let gw = GatewayBuilder::new()
        .toml("[limits]\nwrite_stall_timeout = \"500ms\"")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let mut client = gw.client(Proto::H2, "a.gw.test").await;
    let response = client
        .send(
            client
                .request(Method::GET, "/big")
                .body(empty())
                .expect("request"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    // The body is never read: the client's windows fill, and the gateway must stop there.
    released_and_others_served(&gw, &mut released).await;
    drop(response);
}

/// A WebSocket backend that sends 16 KiB messages as fast as it may, until the gateway closes.
async fn flooding_ws_backend() -> ws::WsBackend {
    use futures_util::StreamExt;
    let (seen, _) = tokio::sync::mpsc::unbounded_channel();
    ws::WsBackend::start(move |tcp| {
        let seen = seen.clone();
        async move {
            let Ok(socket) = ws::accept(tcp, &seen).await else {
                return;
            };
            let (mut tx, mut rx) = socket.split();
            let flood = async {
                let msg = Message::binary(vec![7u8; 16 * 1024]);
                while tx.send(msg.clone()).await.is_ok() {}
            };
            let closed = async {
                while let Some(Ok(m)) = rx.next().await {
                    if m.is_close() {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = flood => {}
                _ = closed => {}
            }
        }
    })
    .await
}

/// A WebSocket client that stops reading while its backend keeps sending is closed after
/// write_stall_timeout, over HTTP/1.1 (the socket fills) and over HTTP/2 (the stream's flow
/// control stops the gateway first), and the backend's connection is released.
#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_closed_over_h1_and_h2() {
    use hyper_util::rt::TokioIo;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let mut backend = flooding_ws_backend().await;
    let web = Backend::echo("web").await;
    let gw = GatewayBuilder::new()
        .toml("[limits]\nwrite_stall_timeout = \"500ms\"")
        .route(route("/ws").to(backend.url()))
        .route(route("/").to(web.url()))
        .start()
        .await;

    let h1 = ws::connect(&gw, "/ws").await;
    backend.connection_ended().await;

    let mut client = gw.client(Proto::H2, "gw.test").await;
    let mut req = client
        .request(Method::CONNECT, "/ws")
        .header("sec-websocket-version", "13")
        .body(empty())
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = client.send(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let upgraded = within("the HTTP/2 stream to upgrade", hyper::upgrade::on(response))
        .await
        .expect("upgrade");
    let h2 = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    // Never read: the stream's window fills, and the gateway must notice all the same.
    backend.connection_ended().await;
    assert_eq!(backend.accepted(), 2);

    // Others are served.
    for proto in Proto::ALL {
        let mut other = gw.client(proto, "gw.test").await;
        assert_eq!(other.get("/").await.status, StatusCode::OK);
    }
    drop((h1, h2, client));
}
