//! WebSocket through the gateway over real TLS: tokio-tungstenite (and hand-written) clients and
//! backends on 127.0.0.1, the gateway started in-process, or as its own binary to measure it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use http::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::backend::{dead_backend_url, Backend};
use crate::support::body::{empty, full};
use crate::support::client::{Client, Fetched, Proto};
use crate::support::gateway::{route, GatewayBuilder, TestGateway};
use crate::support::within;
use crate::support::ws::{
    self, close_frame, connect, deflate, drain_to_end, echo_round_trip, encode_frame, expect_close,
    inflate, next, next_data, next_raw_seen, raw_connect, read_frame, refused_status, request,
    seen_close, seen_data, seen_handshake, try_connect, GatewayProcess, RawSeen, Seen, WsBackend,
    OP_BINARY, OP_TEXT,
};

/// A gateway with one route `/ws` to `backend`; `websocket` is the `[route.websocket]` table as
/// an inline TOML table (`""` for none).
async fn gateway(backend: &str, websocket: &str) -> TestGateway {
    let mut r = route("/ws").to(backend);
    if !websocket.is_empty() {
        r = r.set("websocket", websocket);
    }
    GatewayBuilder::new().route(r).start().await
}

async fn send<S>(ws: &mut WebSocketStream<S>, msg: Message)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("a message to be sent", ws.send(msg))
        .await
        .expect("send a message");
}

/// A masked client frame of the fragmented-message kind (`Message::Frame` writes it as it is;
/// tungstenite masks it because the socket is a client).
fn fragment(opcode: OpCode, payload: &[u8], fin: bool) -> Message {
    Message::Frame(Frame::message(payload.to_vec(), opcode, fin))
}

/// Bytes that do not compress: a xorshift sequence.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Messages

#[tokio::test]
async fn ws_echoes_text_binary_and_empty_messages() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    let messages = [
        Message::text("hello, streamgate"),
        Message::binary(vec![0u8, 1, 2, 0x80, 0xFF]),
        Message::text(""),
        Message::binary(Vec::new()),
    ];
    for msg in messages {
        echo_round_trip(&mut ws, msg.clone()).await;
        assert_eq!(
            seen_data(&mut seen).await,
            msg,
            "the backend got the message as sent"
        );
    }
}

#[tokio::test]
async fn ws_echoes_a_16_mib_message() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    let big: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    echo_round_trip(&mut ws, Message::binary(big.clone())).await;
    match seen_data(&mut seen).await {
        Message::Binary(b) => assert!(b[..] == big[..], "the backend got the 16 MiB intact"),
        other => panic!("backend saw {other:?}"),
    }
}

#[tokio::test]
async fn ws_fragmented_message_reaches_backend_reassembled() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    send(&mut ws, fragment(OpCode::Data(Data::Text), b"Hel", false)).await;
    send(
        &mut ws,
        fragment(OpCode::Data(Data::Continue), b"lo, ", false),
    )
    .await;
    // A control frame between fragments is legal (RFC 6455 5.4) and must pass too.
    send(&mut ws, Message::Ping(b"mid".to_vec().into())).await;
    send(
        &mut ws,
        fragment(OpCode::Data(Data::Continue), b"world", true),
    )
    .await;

    assert_eq!(seen_data(&mut seen).await, Message::text("Hello, world"));
    let mut got = Vec::new();
    while got.len() < 2 {
        match next(&mut ws).await {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"mid");
                got.push("pong");
            }
            Message::Text(t) => {
                assert_eq!(t.as_str(), "Hello, world");
                got.push("echo");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn ws_ping_and_pong_pass_both_ways() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;

    // Client -> backend: the backend's tungstenite answers the Ping.
    send(&mut ws, Message::Ping(b"are you there".to_vec().into())).await;
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );
    match next_seen_message(&mut seen).await {
        Message::Ping(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("backend saw {other:?}"),
    }

    // Backend -> client: the client's tungstenite answers; flushing sends the queued Pong.
    send(&mut ws, Message::text("!ping hi")).await;
    assert_eq!(next(&mut ws).await, Message::Ping(b"hi".to_vec().into()));
    within("the Pong to be written", ws.flush())
        .await
        .expect("flush");
    loop {
        match next_seen_message(&mut seen).await {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"hi");
                break;
            }
            Message::Text(t) if t.as_str() == "!ping hi" => continue,
            other => panic!("backend saw {other:?}"),
        }
    }
}

async fn next_seen_message(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Message {
    loop {
        match ws::next_seen(seen).await {
            Seen::Handshake(_) => continue,
            Seen::Message(m) => return m,
            Seen::Close(f) => panic!("backend saw Close {f:?}"),
        }
    }
}

#[tokio::test]
async fn ws_close_code_reaches_backend() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    within(
        "the Close to be sent",
        ws.close(Some(close_frame(4000, "bye"))),
    )
    .await
    .expect("send Close");
    let at_backend = seen_close(&mut seen).await;
    assert_eq!(
        (u16::from(at_backend.code), at_backend.reason.as_str()),
        (4000, "bye")
    );
    // The backend's answer comes back the same way.
    let answer = expect_close(&mut ws).await;
    assert_eq!(
        (u16::from(answer.code), answer.reason.as_str()),
        (4000, "bye")
    );
    drain_to_end(&mut ws).await;
}

#[tokio::test]
async fn ws_close_code_reaches_client() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    send(&mut ws, Message::text("!close 4000 bye")).await;
    let at_client = expect_close(&mut ws).await;
    assert_eq!(
        (u16::from(at_client.code), at_client.reason.as_str()),
        (4000, "bye")
    );
    assert_eq!(seen_data(&mut seen).await, Message::text("!close 4000 bye"));
    // Reading on sends tungstenite's answer (the same code); the backend sees it.
    drain_to_end(&mut ws).await;
    let answer = seen_close(&mut seen).await;
    assert_eq!(u16::from(answer.code), 4000);
}

// ---------------------------------------------------------------------------------------------
// Handshake

#[tokio::test]
async fn ws_subprotocol_chosen_by_backend_reaches_client() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut req = request("/ws");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("a, b"),
    );
    let (mut ws, response) = try_connect(&gw, req).await.expect("handshake succeeds");
    assert_eq!(response.status(), 101);
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"b"[..]),
        "the client sees the backend's choice"
    );
    let offered = seen_handshake(&mut seen).await;
    assert_eq!(
        offered.get("sec-websocket-protocol").map(|v| v.as_bytes()),
        Some(&b"a, b"[..])
    );
    echo_round_trip(&mut ws, Message::text("in protocol b")).await;
}

#[tokio::test]
async fn ws_permessage_deflate_negotiated_end_to_end() {
    let (backend, mut seen) = WsBackend::deflate_echo().await;
    let gw = gateway(&backend.url(), "").await;
    let (mut client, head) = raw_connect(
        &gw,
        "/ws",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert_eq!(
        ws::header(&head, "sec-websocket-extensions"),
        Some("permessage-deflate")
    );
    let RawSeen::Handshake(request_head) = next_raw_seen(&mut seen).await else {
        panic!("expected the handshake first")
    };
    assert_eq!(
        ws::header(&request_head, "sec-websocket-extensions"),
        Some("permessage-deflate; client_max_window_bits"),
        "the offer reached the backend"
    );

    let text = "streamgate compresses nothing itself; ".repeat(20);
    let compressed = deflate(text.as_bytes());
    assert!(compressed.len() < text.len() / 4, "the text compresses");
    let frame = encode_frame(
        true,
        true,
        OP_TEXT,
        &compressed,
        Some([0x11, 0x22, 0x33, 0x44]),
    );
    client.write_all(&frame).await.expect("send");
    client.flush().await.expect("send");

    let RawSeen::Frame(at_backend) = next_raw_seen(&mut seen).await else {
        panic!("expected a frame")
    };
    assert_eq!(
        at_backend.wire, frame,
        "the backend got the identical RSV1 frame"
    );
    assert!(at_backend.rsv1);
    assert_eq!(inflate(&at_backend.payload), text.as_bytes());

    let reply = within("the compressed echo", read_frame(&mut client))
        .await
        .expect("a frame");
    assert!(reply.rsv1 && reply.fin && reply.mask.is_none());
    assert_eq!(reply.opcode, OP_TEXT);
    let answer = format!("echo: {text}");
    assert_eq!(inflate(&reply.payload), answer.as_bytes());
    assert_eq!(
        reply.wire,
        encode_frame(true, true, OP_TEXT, &deflate(answer.as_bytes()), None),
        "the client got the backend's frame byte for byte"
    );
}

#[tokio::test]
async fn ws_firefox_connection_header_is_accepted() {
    let (backend, _seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut req = request("/ws");
    req.headers_mut().insert(
        "connection",
        http::HeaderValue::from_static("keep-alive, Upgrade"),
    );
    let (mut ws, response) = try_connect(&gw, req).await.expect("handshake succeeds");
    assert_eq!(response.status(), 101);
    echo_round_trip(&mut ws, Message::text("from firefox")).await;
}

#[tokio::test]
async fn ws_bad_handshakes_get_400_with_reason_and_never_reach_backend() {
    let (backend, _seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let good = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    // (header to change, its new value or None to leave it out, what the reason must say)
    let cases = [
        ("sec-websocket-key", None, "missing Sec-WebSocket-Key"),
        // (A version other than 13 gets 426: tests/integrity.rs.)
        (
            "sec-websocket-version",
            None,
            "missing Sec-WebSocket-Version",
        ),
        (
            "connection",
            Some("keep-alive"),
            "Connection header must contain \"upgrade\"",
        ),
    ];
    for (name, value, reason) in cases {
        let mut client = gw.client(Proto::H1, "gw.test").await;
        let mut req = client.request(Method::GET, "/ws");
        for (k, v) in good {
            if k != name {
                req = req.header(k, v);
            }
        }
        if let Some(v) = value {
            req = req.header(name, v);
        }
        let got = client
            .fetch(req.body(empty()).expect("valid request"))
            .await;
        assert_eq!(
            got.status,
            StatusCode::BAD_REQUEST,
            "{name}: {}",
            got.text()
        );
        let body = got.text();
        assert!(
            body.contains(reason),
            "{name}: reason {body:?} should say {reason:?}"
        );
        assert_eq!(
            body.trim_end().lines().count(),
            1,
            "one-line reason: {body:?}"
        );
    }
    // A POST with a valid upgrade is not a handshake (RFC 6455 4.1).
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let mut req = client.request(Method::POST, "/ws");
    for (k, v) in good {
        req = req.header(k, v);
    }
    let got = client
        .fetch(req.body(empty()).expect("valid request"))
        .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST, "POST: {}", got.text());
    assert!(got.text().contains("method must be GET"), "{}", got.text());
    assert_eq!(
        backend.accepted(),
        0,
        "no bad handshake reached the backend"
    );
    // The count does move for a good one.
    let mut ws = connect(&gw, "/ws").await;
    echo_round_trip(&mut ws, Message::text("good")).await;
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn ws_backend_refusal_is_relayed_as_is() {
    let backend = Backend::start(|_req| async {
        http::Response::builder()
            .status(StatusCode::FORBIDDEN)
            .header("x-refused-by", "backend")
            .body(full("no sockets for you\n"))
            .expect("valid response")
    })
    .await;
    let gw = gateway(&backend.url(), "").await;
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let req = client
        .request(Method::GET, "/ws")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .expect("valid request");
    let got = client.fetch(req).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert_eq!(
        got.headers.get("x-refused-by").map(|v| v.as_bytes()),
        Some(&b"backend"[..])
    );
    assert_eq!(got.text(), "no sockets for you\n");
}

#[tokio::test]
async fn ws_backend_down_gives_502() {
    let gw = gateway(&dead_backend_url(), "").await;
    assert_eq!(refused_status(&gw, request("/ws")).await, 502);
}

/// Sends an RFC 8441 extended CONNECT for `/ws` with `headers` on a new HTTP/2 connection.
/// The client is returned with the response: the tunnel lives on its connection.
async fn h2_websocket(
    gw: &TestGateway,
    headers: &[(&str, &str)],
) -> (Client, http::Response<hyper::body::Incoming>) {
    let mut client = gw.client(Proto::H2, "gw.test").await;
    let mut req = client.request(Method::CONNECT, "/ws");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(empty()).expect("valid request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = client.send(req).await;
    (client, response)
}

#[tokio::test]
async fn ws_over_http2_extended_connect_echoes() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let (client, response) = h2_websocket(
        &gw,
        &[
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "a, b"),
        ],
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "RFC 8441 5: success is 200"
    );
    assert!(response.headers().get("sec-websocket-accept").is_none());
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"b"[..]),
        "the backend's subprotocol reaches the HTTP/2 client"
    );

    // The backend got a real HTTP/1.1 handshake with a fresh key (tungstenite checked it).
    let headers = seen_handshake(&mut seen).await;
    let key = headers
        .get("sec-websocket-key")
        .expect("the gateway made a key");
    assert_eq!(key.len(), 24);

    let upgraded = within("the HTTP/2 stream to upgrade", hyper::upgrade::on(response))
        .await
        .expect("upgrade");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    echo_round_trip(&mut ws, Message::text("over h2")).await;
    echo_round_trip(&mut ws, Message::binary(noise(4 << 20))).await;
    assert_eq!(seen_data(&mut seen).await, Message::text("over h2"));
    assert_eq!(seen_data(&mut seen).await, Message::binary(noise(4 << 20)));
    within(
        "the Close to be sent",
        ws.close(Some(close_frame(4001, "h2 done"))),
    )
    .await
    .expect("send Close");
    let at_backend = seen_close(&mut seen).await;
    assert_eq!(
        (u16::from(at_backend.code), at_backend.reason.as_str()),
        (4001, "h2 done")
    );
    let answer = expect_close(&mut ws).await;
    assert_eq!(u16::from(answer.code), 4001);
    drop(client);
}

#[tokio::test]
async fn ws_over_http2_bad_version_gets_426_and_backend_down_502() {
    let (backend, _seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let (_client, response) = h2_websocket(&gw, &[("sec-websocket-version", "8")]).await;
    let got = Fetched::read(response).await;
    // RFC 6455 4.4.
    assert_eq!(got.status, StatusCode::UPGRADE_REQUIRED);
    assert!(
        got.text().contains("Sec-WebSocket-Version must be 13"),
        "{}",
        got.text()
    );
    assert_eq!(backend.accepted(), 0);

    let gw = gateway(&dead_backend_url(), "").await;
    let (_client, response) = h2_websocket(&gw, &[("sec-websocket-version", "13")]).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn ws_shutdown_closes_tunnels_with_1001_both_ways() {
    let (backend, mut seen) = WsBackend::echo().await;
    let mut gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    echo_round_trip(&mut ws, Message::text("before shutdown")).await;
    assert_eq!(seen_data(&mut seen).await, Message::text("before shutdown"));
    gw.begin_shutdown();
    assert_eq!(expect_close(&mut ws).await.code, CloseCode::Away);
    assert_eq!(seen_close(&mut seen).await.code, CloseCode::Away);
    drain_to_end(&mut ws).await;
    // The tunnel ends with its peers' answers, well inside the 30 s grace period.
    gw.stopped().await;
}

// ---------------------------------------------------------------------------------------------
// Route limits

#[tokio::test]
async fn ws_origin_not_allowed_gets_403() {
    let (backend, _seen) = WsBackend::echo().await;
    let gw = gateway(
        &backend.url(),
        r#"{ allowed_origins = ["https://app.example"] }"#,
    )
    .await;
    let mut evil = request("/ws");
    evil.headers_mut().insert(
        "origin",
        http::HeaderValue::from_static("https://evil.example"),
    );
    assert_eq!(refused_status(&gw, evil).await, 403);
    assert_eq!(
        refused_status(&gw, request("/ws")).await,
        403,
        "no Origin at all"
    );
    assert_eq!(
        backend.accepted(),
        0,
        "refused handshakes never reach the backend"
    );

    let mut app = request("/ws");
    app.headers_mut().insert(
        "origin",
        http::HeaderValue::from_static("https://app.example"),
    );
    let (mut ws, _) = try_connect(&gw, app)
        .await
        .expect("a listed origin is let through");
    echo_round_trip(&mut ws, Message::text("same site")).await;
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn ws_route_full_gets_503_until_a_connection_closes() {
    let (mut backend, _seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "{ max_connections = 2 }").await;
    let mut first = connect(&gw, "/ws").await;
    echo_round_trip(&mut first, Message::text("one")).await;
    let mut second = connect(&gw, "/ws").await;
    echo_round_trip(&mut second, Message::text("two")).await;

    assert_eq!(refused_status(&gw, request("/ws")).await, 503);
    assert_eq!(
        backend.accepted(),
        2,
        "the refused handshake never reached the backend"
    );

    within("the Close to be sent", first.close(None))
        .await
        .expect("close");
    drain_to_end(&mut first).await;
    drop(first);
    // The echo backend's handler ends once the gateway has closed its side of the tunnel.
    backend.connection_ended().await;

    let mut third = connect(&gw, "/ws").await;
    echo_round_trip(&mut third, Message::text("three")).await;
    echo_round_trip(&mut second, Message::text("still two")).await;
}

#[tokio::test]
async fn ws_fragmented_message_over_limit_gets_1009_and_backend_1001() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "{ max_message_size = 1024 }").await;
    let mut ws = connect(&gw, "/ws").await;
    // Under the limit passes.
    echo_round_trip(&mut ws, Message::binary(vec![7u8; 1024])).await;
    assert_eq!(seen_data(&mut seen).await, Message::binary(vec![7u8; 1024]));

    // 20 fragments of 100 bytes: no frame is big, the message is.
    send(
        &mut ws,
        fragment(OpCode::Data(Data::Binary), &[1u8; 100], false),
    )
    .await;
    for _ in 0..18 {
        send(
            &mut ws,
            fragment(OpCode::Data(Data::Continue), &[1u8; 100], false),
        )
        .await;
    }
    send(
        &mut ws,
        fragment(OpCode::Data(Data::Continue), &[1u8; 100], true),
    )
    .await;

    let at_client = expect_close(&mut ws).await;
    assert_eq!(at_client.code, CloseCode::Size, "the sender gets 1009");
    let at_backend = seen_close(&mut seen).await;
    assert_eq!(at_backend.code, CloseCode::Away, "the receiver gets 1001");
}

#[tokio::test]
async fn ws_backend_message_over_limit_gets_backend_1009_and_client_1001() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "{ max_message_size = 1024 }").await;
    let mut ws = connect(&gw, "/ws").await;
    send(&mut ws, Message::text("!blob 1024")).await;
    assert_eq!(next_data(&mut ws).await, Message::binary(vec![0x5A; 1024]));
    send(&mut ws, Message::text("!blob 1025")).await;
    let at_client = expect_close(&mut ws).await;
    assert_eq!(at_client.code, CloseCode::Away, "the receiver gets 1001");
    assert_eq!(seen_data(&mut seen).await, Message::text("!blob 1024"));
    assert_eq!(seen_data(&mut seen).await, Message::text("!blob 1025"));
    assert_eq!(
        seen_close(&mut seen).await.code,
        CloseCode::Size,
        "the sender gets 1009"
    );
}

#[tokio::test]
async fn ws_route_with_a_size_limit_does_not_offer_compression_to_the_backend() {
    // The relay counts sizes on the wire; a compressed message could inflate far past the
    // limit in the backend. So a limited route strips permessage-deflate from the offer.
    let (backend, mut seen) = WsBackend::deflate_echo().await;
    let gw = gateway(&backend.url(), "{ max_message_size = 1024 }").await;
    let (mut client, head) = raw_connect(
        &gw,
        "/ws",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert_eq!(
        ws::header(&head, "sec-websocket-extensions"),
        None,
        "no compression negotiated"
    );
    let RawSeen::Handshake(offered) = next_raw_seen(&mut seen).await else {
        panic!("expected the handshake")
    };
    assert!(
        !offered.to_ascii_lowercase().contains("permessage-deflate"),
        "the backend was not offered compression: {offered}"
    );

    // A message over the limit, uncompressed as the negotiation says: 1009 to the sender,
    // nothing of it then 1001 to the backend.
    let frame = encode_frame(true, false, OP_BINARY, &noise(4096), Some([9, 8, 7, 6]));
    client.write_all(&frame).await.expect("send");
    client.flush().await.expect("send");
    let at_client = within("the gateway's Close", read_frame(&mut client))
        .await
        .expect("a frame");
    assert_eq!(at_client.close_code(), Some(1009), "{at_client:?}");
    assert!(
        at_client.mask.is_none(),
        "frames toward the client are unmasked"
    );
    let RawSeen::Frame(at_backend) = next_raw_seen(&mut seen).await else {
        panic!("expected a frame")
    };
    assert_eq!(at_backend.close_code(), Some(1001));
    assert!(
        at_backend.mask.is_some(),
        "frames toward the backend are masked"
    );
}

#[tokio::test]
async fn ws_ping_interval_pings_an_idle_client() {
    let (backend, _seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), r#"{ ping_interval = "200ms" }"#).await;
    let mut ws = connect(&gw, "/ws").await;
    let mut at = Vec::new();
    for _ in 0..2 {
        match next(&mut ws).await {
            Message::Ping(_) => at.push(std::time::Instant::now()),
            other => panic!("expected the gateway's Ping, got {other:?}"),
        }
    }
    // Paced by the interval, not sent on every wake of the relay (a lower bound only: a busy
    // machine can delay the second Ping, never hurry it).
    let gap = at[1] - at[0];
    assert!(gap >= std::time::Duration::from_millis(150), "{gap:?}");
    // The connection is still good after answering the Pings.
    echo_round_trip(&mut ws, Message::text("awake")).await;
}

#[tokio::test]
async fn ws_ping_interval_pings_between_fragments_of_a_slow_message() {
    let (pinged_tx, pinged_rx) = oneshot::channel::<()>();
    let pinged = Arc::new(Mutex::new(Some(pinged_rx)));
    let backend = WsBackend::start(move |tcp| {
        let pinged = pinged.clone();
        async move {
            let (seen, _) = mpsc::unbounded_channel();
            let Ok(mut ws) = ws::accept(tcp, &seen).await else {
                return;
            };
            let first = Frame::message(b"first half, ".to_vec(), OpCode::Data(Data::Text), false);
            ws.send(Message::Frame(first)).await.expect("send frame 1");
            let signal = pinged.lock().await.take().expect("one connection");
            within("the client to see a Ping", signal)
                .await
                .expect("test is alive");
            let rest = Frame::message(b"second half".to_vec(), OpCode::Data(Data::Continue), true);
            ws.send(Message::Frame(rest)).await.expect("send frame 2");
            while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
        }
    })
    .await;
    let gw = gateway(&backend.url(), r#"{ ping_interval = "200ms" }"#).await;
    let mut ws = connect(&gw, "/ws").await;
    // tungstenite holds the first fragment and hands out the Ping that came after it.
    match next(&mut ws).await {
        Message::Ping(_) => {}
        other => panic!("expected a Ping mid-message, got {other:?}"),
    }
    pinged_tx.send(()).expect("backend waits for the signal");
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("first half, second half")
    );
}

#[tokio::test]
async fn ws_idle_timeout_closes_with_1001() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), r#"{ idle_timeout = "300ms" }"#).await;
    // Nothing is sent after the handshake (an echo first could race the 300 ms on a busy
    // machine): the next thing to arrive is the gateway's Close.
    let mut ws = connect(&gw, "/ws").await;
    let at_client = expect_close(&mut ws).await;
    assert_eq!(at_client.code, CloseCode::Away);
    assert_eq!(seen_close(&mut seen).await.code, CloseCode::Away);
}

#[tokio::test]
async fn ws_client_vanishing_gives_backend_1001() {
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    echo_round_trip(&mut ws, Message::text("about to vanish")).await;
    assert_eq!(seen_data(&mut seen).await, Message::text("about to vanish"));
    // TCP closes under the WebSocket: no Close frame, no TLS close_notify.
    drop(ws);
    assert_eq!(seen_close(&mut seen).await.code, CloseCode::Away);
}

#[tokio::test]
async fn ws_backend_frame_sent_with_its_101_is_not_lost() {
    let backend = WsBackend::start(|tcp| async move {
        let mut io = tokio::io::BufReader::new(tcp);
        let Ok(head) = ws::read_head(&mut io).await else {
            return;
        };
        let key = ws::header(&head, "sec-websocket-key").expect("a key");
        // One write: the 101 and the first frame share a segment, as fast servers do.
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        out.extend(encode_frame(true, false, OP_TEXT, b"welcome", None));
        io.write_all(&out).await.expect("write 101 and a frame");
        // Stay until the gateway closes.
        let mut sink = [0u8; 64];
        while let Ok(n) = io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let gw = gateway(&backend.url(), "").await;
    let (mut client, _) = raw_connect(&gw, "/ws", "").await;
    let first = within("the frame that came with the 101", read_frame(&mut client))
        .await
        .expect("a frame");
    assert_eq!(
        (first.opcode, &first.payload[..]),
        (OP_TEXT, &b"welcome"[..])
    );
}

#[tokio::test]
async fn ws_backend_killed_gives_client_1011() {
    let backend = WsBackend::start(|tcp| async move {
        let (seen, _) = mpsc::unbounded_channel();
        let Ok(mut ws) = ws::accept(tcp, &seen).await else {
            return;
        };
        while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut ws).await {
            if msg == Message::text("die") {
                // RST, not FIN: the backend vanishes without a Close.
                socket2::SockRef::from(ws.get_ref())
                    .set_linger(Some(Duration::ZERO))
                    .expect("SO_LINGER");
                drop(ws);
                return;
            }
            ws.send(msg).await.expect("echo");
        }
    })
    .await;
    let gw = gateway(&backend.url(), "").await;
    let mut ws = connect(&gw, "/ws").await;
    echo_round_trip(&mut ws, Message::text("alive")).await;
    send(&mut ws, Message::text("die")).await;
    let at_client = expect_close(&mut ws).await;
    assert_eq!(at_client.code, CloseCode::Error, "1011: {at_client:?}");
}

// ---------------------------------------------------------------------------------------------
// Load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_thousand_concurrent_connections_all_echo() {
    const CONNECTIONS: usize = 1000;
    let (backend, _seen) = WsBackend::echo().await;
    let gw = Arc::new(gateway(&backend.url(), "").await);
    // TLS handshakes in a debug build are slow: open a bounded number at a time, and hold every
    // connection open until all are, so all 1,000 tunnels exist at once.
    let handshakes = Arc::new(Semaphore::new(32));
    let all_open = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let echoed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let (gw, handshakes, all_open, echoed) = (
            gw.clone(),
            handshakes.clone(),
            all_open.clone(),
            echoed.clone(),
        );
        tasks.spawn(async move {
            let permit = handshakes.acquire_owned().await.expect("semaphore is open");
            let mut ws = connect(&gw, "/ws").await;
            drop(permit);
            all_open.wait().await;
            let text = format!("connection {i} says hello");
            echo_round_trip(&mut ws, Message::text(text)).await;
            echo_round_trip(&mut ws, Message::binary(i.to_be_bytes().to_vec())).await;
            echoed.fetch_add(1, Ordering::SeqCst);
            ws.close(None).await.expect("close");
            drain_to_end(&mut ws).await;
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("connection task does not panic");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("1,000 connections finish within 60 s");
    assert_eq!(echoed.load(Ordering::SeqCst), CONNECTIONS);
    assert_eq!(backend.accepted(), CONNECTIONS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_slow_reader_keeps_gateway_memory_bounded() {
    const MESSAGE: usize = 1 << 20;
    const MESSAGES: usize = 200;
    const TOTAL: u64 = (MESSAGE * MESSAGES) as u64;
    // A write that makes no progress for this long means the socket is blocked: the event the
    // test waits for, not a timing assertion on the gateway.
    const STALL: Duration = Duration::from_secs(3);

    // The flood: 200 binary messages of 1 MiB, message i starts with i and is the base
    // pattern after that.
    let base: Arc<Vec<u8>> = Arc::new((0..MESSAGE).map(|j| (j % 253) as u8).collect());
    let (stalled_tx, stalled_rx) = oneshot::channel::<u64>();
    let (done_tx, done_rx) = oneshot::channel::<u64>();
    let stalled_tx = Arc::new(std::sync::Mutex::new(Some(stalled_tx)));
    let done_tx = Arc::new(std::sync::Mutex::new(Some(done_tx)));
    let flood_base = base.clone();
    let backend = WsBackend::start(move |tcp| {
        let (base, stalled_tx, done_tx) = (flood_base.clone(), stalled_tx.clone(), done_tx.clone());
        async move {
            let Ok((mut io, _)) = ws::raw_accept(tcp, "").await else {
                return;
            };
            let tcp = io.get_mut();
            let mut written = 0u64;
            let mut stalled = stalled_tx.lock().expect("not poisoned").take();
            for i in 0..MESSAGES {
                let mut frame = encode_frame(true, false, OP_BINARY, &base, None);
                let header = frame.len() - MESSAGE;
                frame[header..header + 8].copy_from_slice(&(i as u64).to_be_bytes());
                let mut at = 0;
                while at < frame.len() {
                    let n = match stalled.take() {
                        Some(tx) => {
                            match tokio::time::timeout(STALL, tcp.write(&frame[at..])).await {
                                Ok(n) => {
                                    stalled = Some(tx);
                                    n
                                }
                                Err(_blocked) => {
                                    let _ = tx.send(written);
                                    tcp.write(&frame[at..]).await
                                }
                            }
                        }
                        None => tcp.write(&frame[at..]).await,
                    };
                    let n = n.expect("the gateway reads the flood");
                    at += n;
                    written += n as u64;
                }
            }
            if let Some(tx) = done_tx.lock().expect("not poisoned").take() {
                let _ = tx.send(written);
            }
            // Keep the connection until the gateway ends it.
            let mut sink = [0u8; 64];
            while let Ok(n) = tcp.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        }
    })
    .await;
    let routes = format!(
        "[[route]]\npath = \"/ws\"\nbackends = [\"{}\"]\n",
        backend.url()
    );
    let gw = GatewayProcess::start(&routes).await;
    let rss_idle = gw.rss_kib();
    let mut ws = gw.connect("/ws").await;

    // The client reads nothing: the backend must get stuck.
    let mut done_rx = done_rx;
    let stalled = async {
        tokio::select! {
            at = stalled_rx => at.expect("the backend reports its stall"),
            total = &mut done_rx => panic!(
                "the backend pushed all {} bytes into a client that reads nothing",
                total.unwrap_or(0)
            ),
        }
    };
    let stalled_at = tokio::time::timeout(Duration::from_secs(60), stalled)
        .await
        .expect("the backend stalls or finishes within 60 s");
    let rss = gw.rss_kib();
    eprintln!("slow reader: backend stalled after {stalled_at} bytes; gateway VmRSS {rss_idle} KiB idle, {rss} KiB stalled");
    assert!(
        stalled_at < TOTAL / 2,
        "backpressure stops the backend early: {stalled_at} bytes"
    );
    assert!(
        rss < 64 * 1024,
        "gateway VmRSS {rss} KiB with a stalled flood\n{}",
        gw.log_text()
    );

    // Now read: everything arrives, in order and intact.
    let read_all = async {
        for i in 0..MESSAGES {
            match next_data(&mut ws).await {
                Message::Binary(b) => {
                    assert_eq!(b.len(), MESSAGE, "message {i} length");
                    assert_eq!(b[..8], (i as u64).to_be_bytes(), "message {i} is in order");
                    assert!(b[8..] == base[8..], "message {i} is intact");
                }
                other => panic!("message {i}: {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .expect("the flood is read within 120 s");
    let total = within("the backend to finish", done_rx)
        .await
        .expect("the backend reports its total");
    assert_eq!(
        total,
        TOTAL + (MESSAGES as u64) * 10,
        "every frame was written"
    );
}
