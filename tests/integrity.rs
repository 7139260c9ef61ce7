//! Request integrity (issue 11): one authoritative host, strict framing, cookies joined for
//! HTTP/1.1, no dot segments, error bodies that tell the client little, no "open" WebSocket
//! without a tunnel, SSE compression left alone, and the WebSocket version answer. Each test
//! checks the status, what the backend saw (or that it saw nothing) and that other clients
//! were unaffected.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::client::{Client, Fetched};
use crate::support::gateway::TestGateway;
use crate::support::logs::Logs;
use crate::support::{
    dead_backend_url, empty, full, route, within, Backend, Blackhole, GatewayBuilder, Proto,
};

/// One request a [`Recorder`] read whole.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    target: String,
    headers: HeaderMap,
}

/// A backend that answers every request `200 NAME` after reading its body, and records each
/// request head that arrived and each request it read whole.
struct Recorder {
    backend: Backend,
    heads: Arc<Mutex<usize>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start(name: &'static str) -> Recorder {
        let heads = Arc::new(Mutex::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (heads.clone(), seen.clone());
        let backend = Backend::start(move |req| {
            *h.lock().expect("not poisoned") += 1;
            let s = s.clone();
            async move {
                let (parts, body) = req.into_parts();
                let Ok(_whole) = body.collect().await else {
                    return Response::builder()
                        .status(500)
                        .body(full("body broke off"))
                        .expect("valid response");
                };
                s.lock().expect("not poisoned").push(Seen {
                    method: parts.method,
                    target: parts.uri.to_string(),
                    headers: parts.headers,
                });
                Response::new(full(name))
            }
        })
        .await;
        Recorder {
            backend,
            heads,
            seen,
        }
    }

    fn url(&self) -> String {
        self.backend.url()
    }

    /// Request heads that reached the backend, complete or not.
    fn heads(&self) -> usize {
        *self.heads.lock().expect("not poisoned")
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }

    fn last(&self) -> Seen {
        self.seen().pop().expect("the backend saw a request")
    }
}

fn header<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ASCII header"))
        .collect()
}

/// Another client, on a connection of its own, is served as usual.
async fn others_are_served(gw: &TestGateway, host: &str, path: &str, name: &str) {
    for proto in Proto::ALL {
        let res = gw.client(proto, host).await.get(path).await;
        assert_eq!(res.status, StatusCode::OK, "{proto}: {}", res.text());
        assert_eq!(res.text(), name, "{proto}");
    }
}

// ---------------------------------------------------------------------------------------------
// One authoritative host

async fn two_hosts() -> (TestGateway, Recorder, Recorder) {
    let a = Recorder::start("a").await;
    let b = Recorder::start("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").host("a.gw.test").to(a.url()))
        .route(route("/").host("b.gw.test").to(b.url()))
        .start()
        .await;
    (gw, a, b)
}

#[tokio::test]
async fn host_header_that_disagrees_with_the_target_authority_is_400_over_http1() {
    let (gw, a, b) = two_hosts().await;
    let cases: [&[u8]; 3] = [
        b"GET https://a.gw.test/x HTTP/1.1\r\nHost: b.gw.test\r\nConnection: close\r\n\r\n",
        b"GET https://a.gw.test:9999/x HTTP/1.1\r\nHost: a.gw.test\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a.gw.test\r\nHost: b.gw.test\r\nConnection: close\r\n\r\n",
    ];
    for request in cases {
        let (status, text) = gw.raw_h1(request).await;
        assert_eq!(status, 400, "{}: {text}", String::from_utf8_lossy(request));
        assert!(
            text.contains("Host"),
            "the body says what was wrong: {text}"
        );
    }
    assert_eq!(a.heads() + b.heads(), 0, "no backend saw a refused request");

    // Absolute form with an agreeing Host: routed on it, and that is the Host a's backend sees.
    let (status, text) = gw
        .raw_h1(
            b"GET https://A.gw.test/x?q HTTP/1.1\r\nHost: a.gw.test:443\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let seen = a.last();
    assert_eq!(seen.target, "/x?q", "the backend gets origin form");
    assert_eq!(header(&seen, "host"), ["A.gw.test"]);
    assert_eq!(header(&seen, "x-forwarded-host"), ["A.gw.test"]);
    assert_eq!(b.heads(), 0);
    others_are_served(&gw, "b.gw.test", "/y", "b").await;
}

#[tokio::test]
async fn host_field_that_disagrees_with_authority_is_400_over_http2() {
    let (gw, a, b) = two_hosts().await;
    let mut client = gw.client(Proto::H2, "a.gw.test").await;
    for hosts in [&["b.gw.test"][..], &["a.gw.test", "a.gw.test"]] {
        let mut req = client.request(Method::GET, "/x");
        for h in hosts {
            req = req.header("host", *h);
        }
        let res = client.fetch(req.body(empty()).expect("valid")).await;
        assert_eq!(
            res.status,
            StatusCode::BAD_REQUEST,
            "{hosts:?}: {}",
            res.text()
        );
    }
    assert_eq!(a.heads() + b.heads(), 0, "no backend saw a refused request");

    // The same connection goes on: a matching host field is fine, and :authority is the
    // Host the backend sees (and X-Forwarded-Host).
    let req = client
        .request(Method::GET, "/x")
        .header("host", "a.gw.test")
        .body(empty())
        .expect("valid");
    let res = client.fetch(req).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.text(), "a");
    let seen = a.last();
    assert_eq!(header(&seen, "host"), ["a.gw.test"]);
    assert_eq!(header(&seen, "x-forwarded-host"), ["a.gw.test"]);
    others_are_served(&gw, "b.gw.test", "/y", "b").await;
}

#[tokio::test]
async fn redirect_names_the_host_the_request_was_routed_on() {
    let a = Recorder::start("a").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(a.url()))
        .plain_listener("redirect")
        .start()
        .await;
    for proto in Proto::ALL {
        let res = gw.plain_client(proto, "a.gw.test").await.get("/x?y").await;
        assert_eq!(res.status, StatusCode::PERMANENT_REDIRECT, "{proto}");
        let location = res.headers["location"].to_str().expect("ASCII");
        assert!(
            location.starts_with("https://a.gw.test:") && location.ends_with("/x?y"),
            "{proto}: {location}"
        );
    }
    let addr = gw.http.expect("plain listener");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        b"GET http://a.gw.test/x HTTP/1.1\r\nHost: b.gw.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut text = String::new();
    within("the answer", tcp.read_to_string(&mut text))
        .await
        .expect("read");
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "no redirect to either host: {text}"
    );
    assert_eq!(a.heads(), 0);
}

// ---------------------------------------------------------------------------------------------
// Strict message framing (HTTP/1.1 only: HTTP/2 has no Transfer-Encoding or chunks)

#[tokio::test]
async fn unknown_transfer_codings_get_501_and_an_access_line() {
    let logs = Logs::capture();
    let backend = Recorder::start("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let cases = [
        ("cow", "Transfer-Encoding: cow, chunked\r\n"),
        ("twice", "Transfer-Encoding: chunked, chunked\r\n"),
        (
            "two-lines",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ),
        ("gzip", "Transfer-Encoding: gzip, chunked\r\n"),
    ];
    for (name, te) in cases {
        let request =
            format!("POST /te/{name} HTTP/1.1\r\nHost: gw.test\r\n{te}\r\n5\r\nhello\r\n0\r\n\r\n");
        // Read to the end: the gateway closes the connection after the 501 by itself.
        let (status, text) = gw.raw_h1(request.as_bytes()).await;
        assert_eq!(status, 501, "{name}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        logs.line(&[
            "streamgate::access",
            &format!("path=\"/te/{name}\""),
            "status=501",
        ])
        .await;
    }

    // A last coding other than chunked: hyper refuses it with a 400 of its own, before the
    // gateway sees the request (so no access line can be written for it).
    let (status, _) = gw
        .raw_h1(
            b"POST /te/last HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked, cow\r\n\r\n",
        )
        .await;
    assert_eq!(status, 400);

    assert_eq!(backend.heads(), 0, "the backend saw none of them");
    others_are_served(&gw, "gw.test", "/ok", "b").await;
    assert_eq!(backend.seen().len(), 2);
}

#[tokio::test]
async fn malformed_chunked_body_is_400_not_502_and_logged() {
    let logs = Logs::capture();
    let backend = Recorder::start("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let cases = [
        ("bad-size", "zz\r\nhello\r\n0\r\n\r\n"),
        // 2^64 and more: the chunk size overflows.
        ("overflow", "10000000000000000\r\nhello\r\n0\r\n\r\n"),
        ("bad-ending", "5\r\nhelloXX0\r\n\r\n"),
    ];
    for (name, body) in cases {
        let request = format!(
            "POST /chunk/{name} HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let (status, text) = gw.raw_h1(request.as_bytes()).await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(
            text.contains("request body is malformed"),
            "{name}: the client's fault, said so: {text}"
        );
        assert!(
            !text.contains("127.0.0.1"),
            "{name}: no backend address: {text}"
        );
        let line = logs
            .line(&[
                "streamgate::access",
                &format!("path=\"/chunk/{name}\""),
                "status=400",
            ])
            .await;
        assert!(line.contains("backend=\"127.0.0.1:"), "{line}");
    }
    // The backend may have seen a head, never a whole request.
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    // The gateway does not blame the backend (no "request failed" warning, no ejection).
    assert!(logs.lines_with(&["request failed"]).is_empty());
    others_are_served(&gw, "gw.test", "/ok", "b").await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 to HTTP/1.1

#[tokio::test]
async fn split_cookie_fields_reach_the_backend_as_one() {
    let backend = Recorder::start("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let mut req = client.request(Method::GET, "/c");
        req = match proto {
            // RFC 9113 8.2.3: an HTTP/2 client may split the cookies.
            Proto::H2 => req
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .header("cookie", "c=3"),
            Proto::H1 => req.header("cookie", "a=1; b=2; c=3"),
        };
        let res = client.fetch(req.body(empty()).expect("valid")).await;
        assert_eq!(res.status, StatusCode::OK, "{proto}");
        assert_eq!(
            header(&backend.last(), "cookie"),
            ["a=1; b=2; c=3"],
            "{proto}"
        );
    }
    others_are_served(&gw, "gw.test", "/ok", "b").await;
}

// ---------------------------------------------------------------------------------------------
// Dot segments

#[tokio::test]
async fn dot_segments_are_refused_not_routed_by_prefix() {
    let public = Recorder::start("public").await;
    let private = Recorder::start("private").await;
    let gw = GatewayBuilder::new()
        .route(route("/public").to(public.url()))
        .route(route("/private").to(private.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let before = public.heads() + private.heads();
        for target in [
            "/public/../private",
            "/public/%2e%2e/private",
            "/public/%2E./private",
            "/public/.%2e/private",
            "/public/..%2fprivate",
            "/public/./x",
        ] {
            let res = client.get(target).await;
            assert_eq!(
                res.status,
                StatusCode::BAD_REQUEST,
                "{proto} {target}: {}",
                res.text()
            );
            assert!(res.text().contains("dot segment"), "{}", res.text());
        }
        assert_eq!(public.heads() + private.heads(), before, "{proto}");
        // Dots inside a segment are just names.
        let res = client.get("/public/a..b/.well-known").await;
        assert_eq!(res.text(), "public", "{proto}");
        assert_eq!(public.last().target, "/public/a..b/.well-known");
    }
    others_are_served(&gw, "gw.test", "/private/x", "private").await;
}

// ---------------------------------------------------------------------------------------------
// Errors tell clients little and operators everything

#[tokio::test]
async fn error_bodies_name_route_and_class_never_the_backend() {
    let logs = Logs::capture();
    let refused = dead_backend_url();
    let blackhole = Blackhole::new().await;
    let gw = GatewayBuilder::new()
        .route(route("/refused").to(refused.clone()))
        .route(
            route("/slow")
                .to(blackhole.url())
                .set("connect_timeout", "\"200ms\""),
        )
        .start()
        .await;
    let cases = [
        ("/refused", &refused, 502, "refused the connection"),
        (
            "/slow",
            &blackhole.url(),
            504,
            "did not accept a connection in time",
        ),
    ];
    for proto in Proto::ALL {
        for (path, url, status, class) in cases {
            let addr = url.trim_start_matches("http://");
            let res = gw.client(proto, "gw.test").await.get(path).await;
            let text = res.text();
            assert_eq!(res.status.as_u16(), status, "{proto} {path}: {text}");
            assert_eq!(
                text,
                format!("streamgate: route *{path}: backend {class}\n"),
                "{proto}"
            );
            let port = addr.rsplit(':').next().expect("port");
            assert!(!text.contains(port), "{proto}: no backend port: {text}");
            // The operator's line has all of it.
            let line = logs
                .line(&["request failed", &format!("backend={addr:?}")])
                .await;
            assert!(line.contains(&format!("route=\"*{path}\"")), "{line}");
            if status == 502 {
                assert!(line.to_lowercase().contains("refused"), "{line}");
            }
            logs.clear();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket handshakes

/// A backend that answers everything 200 with a page, upgrades included (an SPA catch-all).
async fn spa_backend() -> Recorder {
    Recorder::start("<html>spa</html>").await
}

fn upgrade_request(client: &Client, version: &str) -> http::Request<crate::support::Body> {
    let mut req = match client.proto {
        Proto::H1 => client
            .request(Method::GET, "/ws")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        Proto::H2 => client.request(Method::CONNECT, "/ws"),
    }
    .header("sec-websocket-version", version)
    .body(empty())
    .expect("valid request");
    if client.proto == Proto::H2 {
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
    }
    req
}

#[tokio::test]
async fn ws_handshake_answered_200_by_backend_is_502_for_http2_and_relayed_for_http1() {
    let logs = Logs::capture();
    let spa = spa_backend().await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(spa.url()))
        .start()
        .await;

    // HTTP/2: a 200 would mean "open" (RFC 8441 5), with no tunnel behind it.
    let mut client = gw.client(Proto::H2, "gw.test").await;
    let req = upgrade_request(&client, "13");
    let res = client.fetch(req).await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY, "{}", res.text());
    assert_eq!(
        res.text(),
        "streamgate: route */: backend broke the WebSocket handshake\n"
    );
    let seen = spa.last();
    assert_eq!(seen.method, Method::GET);
    assert_eq!(header(&seen, "upgrade"), ["websocket"]);
    let line = logs.line(&["request failed", "instead of 101"]).await;
    assert!(line.contains("answered 200"), "{line}");
    // The same connection serves its next stream.
    assert_eq!(client.get("/page").await.text(), "<html>spa</html>");

    // HTTP/1.1: a 200 is no 101, so the client cannot take it for an open WebSocket.
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let req = upgrade_request(&client, "13");
    let res = client.fetch(req).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.text(), "<html>spa</html>");
    assert_eq!(spa.seen().len(), 3);
    others_are_served(&gw, "gw.test", "/page", "<html>spa</html>").await;
}

#[tokio::test]
async fn ws_version_other_than_13_gets_426_naming_13() {
    let backend = Recorder::start("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let req = upgrade_request(&client, "12");
        let res = client.fetch(req).await;
        assert_eq!(
            res.status,
            StatusCode::UPGRADE_REQUIRED,
            "{proto}: {}",
            res.text()
        );
        assert_eq!(
            res.headers
                .get("sec-websocket-version")
                .map(|v| v.as_bytes()),
            Some(&b"13"[..]),
            "{proto}: RFC 6455 4.4"
        );
    }
    assert_eq!(backend.heads(), 0);
    others_are_served(&gw, "gw.test", "/ok", "b").await;
}

// ---------------------------------------------------------------------------------------------
// SSE with Content-Encoding

#[tokio::test]
async fn compressed_event_stream_passes_untouched_without_heartbeats() {
    use std::io::Write;
    let logs = Logs::capture();
    let events = b"id: 1\ndata: one\n\nid: 2\ndata: two\n\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(events).expect("compress");
    let compressed = Bytes::from(gz.finish().expect("compress"));
    let (first, rest) = (compressed.slice(..10), compressed.slice(10..));

    let (writers_tx, mut writers) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |_req| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let _ = writers_tx.send(tx);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok(hyper::body::Frame::data(chunk)), rx))
        });
        let body = http_body_util::StreamBody::new(stream).boxed();
        async move {
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("content-encoding", "gzip")
                .body(body)
                .expect("valid response")
        }
    })
    .await;
    let plain = Recorder::start("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(plain.url()))
        .route(
            route("/events")
                .to(backend.url())
                .set("sse", r#"{ heartbeat = "50ms", shutdown_retry = "1s" }"#),
        )
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let res = client.send(
            client
                .request(Method::GET, "/events")
                .body(empty())
                .expect("valid"),
        );
        let (res, writer) = tokio::join!(res, async {
            within("the backend's stream", writers.recv())
                .await
                .expect("backend alive")
        });
        assert_eq!(res.status(), StatusCode::OK, "{proto}");
        assert_eq!(res.headers()["content-encoding"], "gzip", "{proto}");
        writer.send(first.clone()).await.expect("send");
        // Several heartbeat intervals of silence in the middle of the compressed body.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        writer.send(rest.clone()).await.expect("send");
        drop(writer);
        let got = Fetched::read(res).await;
        assert_eq!(
            got.body, compressed,
            "{proto}: byte for byte, nothing added"
        );
        logs.line(&["Content-Encoding", "no heartbeats"]).await;
    }
    others_are_served(&gw, "gw.test", "/ok", "b").await;
}
