//! What the listeners do besides proxying: the plain listener (redirect or proxy), requests
//! the TLS listener refuses (absolute-form targets naming another host, CONNECT, oversized
//! heads), the protocol ALPN chose being the one spoken, and graceful shutdown with a request
//! in flight.

use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::support::backend::Tagged;
use crate::support::client::tls_connect;
use crate::support::gateway::TestGateway;
use crate::support::process::http_get;
use crate::support::{empty, route, within, Backend, Client, GatewayBuilder, Held, Proto};

#[tokio::test]
async fn plain_listener_redirects_to_the_tls_port() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .plain_listener("redirect")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let port = gw.https.port();

    for proto in Proto::ALL {
        for (authority, target) in [
            ("a.gw.test", "/p/a?q=1&x"),
            // The client's port is the plain one; the redirect names the TLS listener's.
            ("a.gw.test:8080", "/"),
        ] {
            let mut client = gw.plain_client(proto, authority).await;
            let res = client.get(target).await;
            assert_eq!(
                res.status,
                StatusCode::PERMANENT_REDIRECT,
                "{proto}: {}",
                res.text()
            );
            assert_eq!(
                res.headers["location"],
                format!("https://a.gw.test:{port}{target}").as_str(),
                "{proto}"
            );
        }
    }
}

#[tokio::test]
async fn redirect_names_the_public_https_port_behind_a_port_mapping() {
    let backend = Backend::echo("b").await;
    for (public, shown) in [("443", ""), ("8443", ":8443")] {
        let gw = GatewayBuilder::new()
            .plain_listener("redirect")
            .toml(&format!("public_https_port = {public}"))
            .route(route("/").to(backend.url()))
            .start()
            .await;
        assert_ne!(
            gw.https.port().to_string(),
            public,
            "the listener's own port differs"
        );
        for proto in Proto::ALL {
            let mut client = gw.plain_client(proto, "a.gw.test").await;
            let res = client.get("/p?q").await;
            assert_eq!(res.status, StatusCode::PERMANENT_REDIRECT, "{proto}");
            assert_eq!(
                res.headers["location"],
                format!("https://a.gw.test{shown}/p?q").as_str(),
                "{proto}"
            );
        }
    }
}

#[tokio::test]
async fn plain_listener_in_proxy_mode_forwards_with_proto_http() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .plain_listener("proxy")
        .route(route("/").to(backend.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.plain_client(proto, "a.gw.test").await;
        let echo = client.get("/plain?x=1").await.echo();
        assert_eq!(echo.target, "/plain?x=1", "{proto}");
        assert_eq!(echo.header("x-forwarded-proto"), Some("http"), "{proto}");
        assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"), "{proto}");
    }
}

/// `GET http://evil.example/x HTTP/1.1`: the gateway is not a forward proxy.
fn absolute_form(client: &Client) -> http::Request<crate::support::Body> {
    assert_eq!(client.proto, Proto::H1);
    http::Request::get("http://evil.example/x")
        .header("host", "evil.example")
        .body(empty())
        .expect("valid request")
}

#[tokio::test]
async fn absolute_form_target_never_reaches_another_host() {
    let backend = Backend::echo("configured").await;

    // Only a host-specific route: the request names a host that has none.
    let gw = GatewayBuilder::new()
        .route(route("/").host("a.gw.test").to(backend.url()))
        .start()
        .await;
    let mut client = gw
        .client_with_sni(Proto::H1, Some("a.gw.test"), "a.gw.test")
        .await;
    let res = client.fetch(absolute_form(&client)).await;
    assert_eq!(res.status, StatusCode::NOT_FOUND, "{}", res.text());

    // An any-host route: the request goes to the configured backend, in origin form.
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let mut client = gw
        .client_with_sni(Proto::H1, Some("a.gw.test"), "a.gw.test")
        .await;
    let echo = client.fetch(absolute_form(&client)).await.echo();
    assert_eq!(echo.backend, "configured");
    assert_eq!(echo.target, "/x");
    assert_eq!(echo.header("host"), Some("evil.example"));
}

#[tokio::test]
async fn connect_method_is_405() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        let mut req = http::Request::connect("evil.example:443")
            .header("host", "evil.example:443")
            .body(empty())
            .expect("valid request");
        if proto == Proto::H2 {
            *req.version_mut() = http::Version::HTTP_2;
            req.headers_mut().remove("host");
        }
        let res = client.fetch(req).await;
        assert_eq!(
            res.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{proto}: {}",
            res.text()
        );
    }
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;

    let mut client = gw.client(Proto::H1, "a.gw.test").await;
    let req = client
        .request(Method::GET, "/")
        .header("x-big", "a".repeat(40 * 1024))
        .body(empty())
        .expect("valid request");
    let res = client.fetch(req).await;
    assert_eq!(res.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // A head just under the limit is served.
    let mut client = gw.client(Proto::H1, "a.gw.test").await;
    let req = client
        .request(Method::GET, "/")
        .header("x-big", "a".repeat(30 * 1024))
        .body(empty())
        .expect("valid request");
    assert_eq!(client.fetch(req).await.echo().backend, "b");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    for proto in Proto::ALL {
        let mut held = Held::start().await;
        let echo = Backend::echo("echo").await;
        let mut gw = GatewayBuilder::new()
            // Longer than the test's patience: serve must return because the drain finished,
            // not because the grace period ran out.
            .toml("[shutdown]\ngrace = \"60s\"")
            .route(route("/held").to(held.backend.url()))
            .route(route("/").to(echo.url()))
            .start()
            .await;

        // An idle keep-alive connection: the gateway closes it when the drain begins.
        let mut idle = gw.client(Proto::H1, "a.gw.test").await;
        assert_eq!(idle.get("/").await.echo().backend, "echo");

        let mut client = gw.client(proto, "a.gw.test").await;
        let req = client
            .request(Method::GET, "/held")
            .body(empty())
            .expect("valid request");
        let in_flight = tokio::spawn(async move { client.fetch(req).await });
        held.arrived().await;

        gw.begin_shutdown();
        idle.closed().await;
        assert!(
            gw.is_serving(),
            "{proto}: serve returned with a request in flight"
        );

        held.release();
        let res = within("the in-flight response", in_flight)
            .await
            .expect("request task does not panic");
        assert_eq!(res.status, StatusCode::OK, "{proto}");
        assert_eq!(res.body, "released", "{proto}");

        // `serve` returns once the drain is done. (Whether the port then refuses connections
        // is not checked: a parallel test may already have been given the same free port.)
        gw.stopped().await;
    }
}

#[tokio::test]
async fn idle_connections_are_closed_busy_ones_are_not() {
    let mut held = Held::start().await;
    let echo = Backend::echo("echo").await;
    let gw = GatewayBuilder::new()
        .toml("[limits]\nidle_timeout = \"300ms\"")
        .route(route("/held").to(held.backend.url()))
        .route(route("/").to(echo.url()))
        .start()
        .await;

    // A busy HTTP/2 connection: a response held past the idle timeout (the idle connections
    // below are closed meanwhile) keeps its connection open.
    let mut busy = gw.client(Proto::H2, "a.gw.test").await;
    let req = busy
        .request(Method::GET, "/held")
        .body(empty())
        .expect("valid request");
    let in_flight = tokio::spawn(async move {
        let res = busy.fetch(req).await;
        (busy, res)
    });
    held.arrived().await;

    // Idle connections of both protocols, each after one request, are closed.
    for proto in Proto::ALL {
        let mut idle = gw.client(proto, "a.gw.test").await;
        assert_eq!(idle.get("/").await.echo().backend, "echo", "{proto}");
        idle.closed().await;
    }

    held.release();
    let (mut busy, res) = within("the held response", in_flight)
        .await
        .expect("request task does not panic");
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, "released");
    // Held well past the idle timeout, the connection is still the same one and still serves.
    assert_eq!(busy.get("/").await.echo().backend, "echo");
}

/// The HTTP/2 client connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const PROTOCOL_ERROR: u32 = 0x1;

/// Opens a TLS connection that negotiated `alpn`, writes `bytes` on it, and returns everything
/// the gateway sent until it closed the connection.
async fn sent_after(gw: &TestGateway, alpn: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut tls = tls_connect(gw.https, &gw.ca, Some("a.gw.test"), &[alpn], true).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "ALPN");
    tls.write_all(bytes).await.expect("write to the gateway");
    tls.flush().await.expect("flush to the gateway");
    read_until_closed(&mut tls).await
}

/// Reads until the peer closes (with or without a TLS close_notify).
async fn read_until_closed(io: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    within("the gateway to close the connection", async {
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    got
}

/// The whole HTTP/2 frames at the start of `bytes` (RFC 9113 4.1) as `(type, payload)`, and
/// what follows them (a partial last frame).
fn split_h2_frames(mut bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, &[u8]) {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        frames.push((bytes[3], bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    (frames, bytes)
}

/// Splits `bytes` into HTTP/2 frames: `(type, payload)`; a partial frame fails the test.
fn h2_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let (frames, rest) = split_h2_frames(bytes);
    assert!(
        rest.is_empty(),
        "truncated or trailing bytes after HTTP/2 frames: {rest:?}"
    );
    frames
}

/// Asserts `sent` is HTTP/2 frames ending in a GOAWAY with PROTOCOL_ERROR.
fn assert_goaway_protocol_error(sent: &[u8]) {
    let frames = h2_frames(sent);
    let types: Vec<u8> = frames.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        types.first(),
        Some(&FRAME_SETTINGS),
        "server preface: {types:?}"
    );
    let (kind, payload) = frames.last().expect("some frames");
    assert_eq!(*kind, FRAME_GOAWAY, "last frame: {types:?}");
    assert!(payload.len() >= 8, "GOAWAY payload: {payload:?}");
    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    assert_eq!(code, PROTOCOL_ERROR, "GOAWAY error code");
}

/// A gateway in front of a backend that counts what reaches it.
async fn counted_gateway() -> (Tagged, TestGateway) {
    let backend = Tagged::start("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    (backend, gw)
}

/// Both protocols still serve on `gw` (each request adds one to the backend's count).
async fn well_behaved_clients_are_served(gw: &TestGateway) {
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        let res = client.get("/").await;
        assert_eq!(res.status, StatusCode::OK, "{proto}: {}", res.text());
    }
}

#[tokio::test]
async fn h2_by_alpn_is_not_served_as_http1() {
    let (backend, gw) = counted_gateway().await;
    let mut tls = tls_connect(gw.https, &gw.ca, Some("a.gw.test"), &[b"h2"], true).await;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: a.gw.test\r\n\r\n")
        .await
        .expect("write to the gateway");
    tls.flush().await.expect("flush to the gateway");

    // Meanwhile, other clients are served.
    well_behaved_clients_are_served(&gw).await;

    let sent = read_until_closed(&mut tls).await;
    assert!(
        !sent.starts_with(b"HTTP/1"),
        "an HTTP/1 answer: {}",
        String::from_utf8_lossy(&sent)
    );
    assert_goaway_protocol_error(&sent);
    assert_eq!(
        backend.requests(),
        2,
        "only the well-behaved requests reach the backend"
    );
}

#[tokio::test]
async fn http1_by_alpn_is_not_served_as_h2() {
    let (backend, gw) = counted_gateway().await;
    // The preface and an empty SETTINGS: the start of every HTTP/2 connection.
    let mut h2_start = H2_PREFACE.to_vec();
    h2_start.extend_from_slice(&[0, 0, 0, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
    let sent = sent_after(&gw, b"http/1.1", &h2_start).await;
    let text = String::from_utf8_lossy(&sent);
    assert!(
        sent.is_empty() || text.starts_with("HTTP/1.1 4"),
        "want an HTTP/1.1 client error or a close, got {text:?}"
    );
    well_behaved_clients_are_served(&gw).await;
    assert_eq!(
        backend.requests(),
        2,
        "only the well-behaved requests reach the backend"
    );
}

/// h2spec 3.5/2: an invalid connection preface is a connection error of type PROTOCOL_ERROR.
#[tokio::test]
async fn invalid_h2_preface_gets_goaway() {
    let (backend, gw) = counted_gateway().await;
    let sent = sent_after(&gw, b"h2", b"INVALID CONNECTION PREFACE\r\n\r\n").await;
    assert_goaway_protocol_error(&sent);
    assert_eq!(backend.requests(), 0);
}

/// Without ALPN the preface decides, and the connection is counted under the protocol served.
#[tokio::test]
async fn without_alpn_the_preface_decides_and_is_counted() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .plain_listener("proxy")
        .admin()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let admin = gw.admin.expect("admin listener");

    let mut clients = Vec::new();
    for proto in Proto::ALL {
        let mut client = gw.plain_client(proto, "a.gw.test").await;
        assert_eq!(client.get("/").await.echo().backend, "b", "{proto}");
        clients.push(client);
    }
    // A client that offers no ALPN over TLS.
    let tls = tls_connect(gw.https, &gw.ca, Some("a.gw.test"), &[], true).await;
    let mut client = Client::over_tls_without_alpn(Proto::H2, tls, "a.gw.test").await;
    assert_eq!(client.get("/").await.echo().backend, "b");
    clients.push(client);

    let (status, text) = within("/metrics", http_get(admin, "/metrics"))
        .await
        .expect("admin listener answers");
    assert_eq!(status, 200);
    for (listener, protocol) in [("http", "h1"), ("http", "h2"), ("https", "h2")] {
        let sample = format!(
            "streamgate_open_connections{{listener=\"{listener}\",protocol=\"{protocol}\"}} 1"
        );
        assert!(
            text.lines().any(|l| l == sample),
            "want {sample:?} in:\n{text}"
        );
    }
    assert!(
        !text.contains("streamgate_open_connections{listener=\"https\",protocol=\"h1\"} 1"),
        "{text}"
    );
}

/// An HTTP/2 client that floods PINGs or SETTINGS (CVE-2019-9512, -9515) gets a bounded number
/// of answers, then GOAWAY with ENHANCE_YOUR_CALM, and its connection ends; other clients are
/// served meanwhile, and a client that pings a little is answered every time.
#[tokio::test]
async fn h2_ping_and_settings_floods_get_goaway_enhance_your_calm() {
    const FRAME_PING: u8 = 0x6;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let (backend, gw) = counted_gateway().await;
    let start = || {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
        bytes
    };
    let ping = [&[0, 0, 8, FRAME_PING, 0, 0, 0, 0, 0][..], &[7; 8]].concat();
    // SETTINGS_MAX_CONCURRENT_STREAMS = 100: a valid setting, each one acknowledged.
    let settings = [0, 0, 6, FRAME_SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100].to_vec();
    for (name, frame, answer) in [
        ("PING", &ping, FRAME_PING),
        ("SETTINGS", &settings, FRAME_SETTINGS),
    ] {
        let mut bytes = start();
        for _ in 0..5_000 {
            bytes.extend_from_slice(frame);
        }
        let sent = sent_after(&gw, b"h2", &bytes).await;
        let frames = h2_frames(&sent);
        let answers = frames.iter().filter(|(t, _)| *t == answer).count();
        assert!(answers < 2_000, "{name}: {answers} answers to 5,000 frames");
        let (kind, payload) = frames.last().expect("some frames");
        assert_eq!(*kind, FRAME_GOAWAY, "{name}: the last frame is a GOAWAY");
        let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        assert_eq!(code, ENHANCE_YOUR_CALM, "{name}: GOAWAY error code");
        well_behaved_clients_are_served(&gw).await;
    }

    // Ten PINGs and a SETTINGS change are a normal client's: every one is answered.
    let mut tls = tls_connect(gw.https, &gw.ca, Some("a.gw.test"), &[b"h2"], true).await;
    let mut bytes = start();
    for _ in 0..10 {
        bytes.extend_from_slice(&ping);
    }
    bytes.extend_from_slice(&settings);
    tls.write_all(&bytes).await.expect("write to the gateway");
    tls.flush().await.expect("flush");
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    within("ten PING ACKs and two SETTINGS ACKs", async {
        loop {
            let (frames, _) = split_h2_frames(&got);
            let pings = frames.iter().filter(|(t, _)| *t == FRAME_PING).count();
            // A SETTINGS ACK has no payload (RFC 9113 6.5); the server's own SETTINGS has some.
            let settings_acks = frames
                .iter()
                .filter(|(t, p)| *t == FRAME_SETTINGS && p.is_empty())
                .count();
            if pings == 10 && settings_acks == 2 {
                assert!(frames.iter().all(|(t, _)| *t != FRAME_GOAWAY), "{frames:?}");
                break;
            }
            let n = tls.read(&mut buf).await.expect("read from the gateway");
            assert!(n > 0, "the gateway closed a well-behaved connection");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(
        backend.requests(),
        4,
        "only the well-behaved requests reach the backend"
    );
}
