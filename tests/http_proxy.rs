//! The core gateway over real TLS, for HTTP/1.1 and HTTP/2 clients: routing, balancing,
//! backend errors, header rules and streamed bodies.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use crate::support::{
    dead_backend_url, empty, full, pattern_body, pattern_digest, route, within, Backend, Blackhole,
    Digest, Echo, GatewayBuilder, Proto, Streaming,
};

#[tokio::test]
async fn route_by_exact_and_wildcard_host() {
    let exact = Backend::echo("exact").await;
    let wildcard = Backend::echo("wildcard").await;
    let fallback = Backend::echo("fallback").await;
    let gw = GatewayBuilder::new()
        .route(route("/").host("a.gw.test").to(exact.url()))
        .route(route("/").host("*.apps.gw.test").to(wildcard.url()))
        .route(route("/").to(fallback.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        for (host, want) in [
            ("a.gw.test", "exact"),
            ("x.apps.gw.test", "wildcard"),
            // A wildcard needs a label in front of its suffix.
            ("apps.gw.test", "fallback"),
            ("b.gw.test", "fallback"),
        ] {
            let echo = gw.client(proto, host).await.get("/").await.echo();
            assert_eq!(echo.backend, want, "{proto} host {host}");
        }
    }
}

#[tokio::test]
async fn route_by_path_prefix_on_segment_boundaries() {
    let root = Backend::echo("root").await;
    let ws = Backend::echo("ws").await;
    let deep = Backend::echo("ws-deep").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(root.url()))
        .route(route("/ws").to(ws.url()))
        .route(route("/ws/deep").to(deep.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        for (target, want) in [
            ("/ws", "ws"),
            ("/ws/", "ws"),
            ("/ws/a", "ws"),
            ("/ws?x=1", "ws"),
            ("/wsx", "root"),
            ("/ws/deep", "ws-deep"),
            ("/ws/deep/1", "ws-deep"),
            ("/ws/deeper", "ws"),
            ("/", "root"),
        ] {
            let echo = client.get(target).await.echo();
            assert_eq!(echo.backend, want, "{proto} {target}");
            assert_eq!(
                echo.target, target,
                "{proto}: target is forwarded unchanged"
            );
        }
    }
}

#[tokio::test]
async fn path_and_query_reach_the_backend_byte_for_byte() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        for target in [
            "/api//ws/2?q=%2F&x",
            // (Dot segments in the path are refused: tests/integrity.rs; the query is data.)
            "/a/.b/..c?x=1&x=2&empty=&next=/../x",
            "/%7Euser/%2e%2ex/file;v=1?q=a+b%20c",
            "/?",
        ] {
            let echo = client.get(target).await.echo();
            assert_eq!(echo.target, target, "{proto}");
        }
    }
}

#[tokio::test]
async fn strip_prefix_forwards_the_rest_of_the_path() {
    let api = Backend::echo("api").await;
    let gw = GatewayBuilder::new()
        .route(route("/api").strip_prefix().to(api.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        for (target, want) in [
            ("/api/a", "/a"),
            ("/api/a?b=1", "/a?b=1"),
            ("/api", "/"),
            ("/api?x=1", "/?x=1"),
            ("/api//ws/2?q=%2F&x", "//ws/2?q=%2F&x"),
        ] {
            let echo = client.get(target).await.echo();
            assert_eq!(echo.target, want, "{proto} {target}");
        }
        // Segment boundary: /apix is not under /api.
        assert_eq!(
            client.get("/apix").await.status,
            StatusCode::NOT_FOUND,
            "{proto}"
        );
    }
}

#[tokio::test]
async fn round_robin_alternates_between_backends() {
    let one = Backend::echo("one").await;
    let two = Backend::echo("two").await;
    let gw = GatewayBuilder::new()
        .route(
            route("/")
                .to(one.url())
                .to(two.url())
                .set("balance", "\"round_robin\""),
        )
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(client.get("/").await.echo().backend);
        }
        for pair in seen.windows(2) {
            assert_ne!(
                pair[0], pair[1],
                "{proto}: consecutive requests alternate: {seen:?}"
            );
        }
        assert!(seen.contains(&"one".to_string()), "{proto}: {seen:?}");
        assert!(seen.contains(&"two".to_string()), "{proto}: {seen:?}");
    }
}

#[tokio::test]
async fn dead_backend_is_skipped() {
    let live = Backend::echo("live").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(dead_backend_url()).to(live.url()))
        .start()
        .await;
    let body = crate::support::body::pattern(0, 100_000);
    let mut sent = Digest::new();
    sent.update(&body);

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        // Round-robin moves one backend per request, so of two consecutive requests one starts
        // on the dead backend and must be moved to the live one.
        for i in 0..2 {
            let echo = client.get(&format!("/get/{i}")).await.echo();
            assert_eq!(echo.backend, "live", "{proto} GET {i}");
        }
        for i in 0..2 {
            let req = client
                .request(Method::POST, &format!("/post/{i}"))
                .body(full(body.clone()))
                .expect("valid request");
            let echo = client.fetch(req).await.echo();
            assert_eq!(echo.backend, "live", "{proto} POST {i}");
            assert_eq!(echo.method, "POST");
            assert_eq!(echo.body_len, sent.len(), "{proto} POST {i}: body length");
            assert_eq!(
                echo.body_sha256,
                sent.hex(),
                "{proto} POST {i}: body content"
            );
        }
    }
}

#[tokio::test]
async fn no_route_is_404() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").host("a.gw.test").to(backend.url()))
        .route(route("/only").to(backend.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "other.gw.test").await;
        let res = client.get("/elsewhere").await;
        assert_eq!(res.status, StatusCode::NOT_FOUND, "{proto}: {}", res.text());
        assert!(res.text().contains("no route"), "{proto}: {}", res.text());
        // The connection stays usable after a 404.
        assert_eq!(client.get("/only/x").await.echo().backend, "b", "{proto}");
    }
}

#[tokio::test]
async fn all_backends_refused_is_502_naming_the_route() {
    let gw = GatewayBuilder::new()
        .route(route("/down").to(dead_backend_url()).to(dead_backend_url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let res = gw.client(proto, "a.gw.test").await.get("/down/x").await;
        assert_eq!(
            res.status,
            StatusCode::BAD_GATEWAY,
            "{proto}: {}",
            res.text()
        );
        assert!(
            res.text().contains("*/down"),
            "{proto}: body names the route: {}",
            res.text()
        );
    }
}

#[tokio::test]
async fn backend_connect_timeout_is_504_naming_the_route() {
    let blackhole = Blackhole::new().await;
    let gw = GatewayBuilder::new()
        .route(
            route("/slow")
                .to(blackhole.url())
                .set("connect_timeout", "\"300ms\"")
                .set("response_header_timeout", "\"30s\""),
        )
        .start()
        .await;

    for proto in Proto::ALL {
        let res = gw.client(proto, "a.gw.test").await.get("/slow").await;
        assert_eq!(
            res.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{proto}: {}",
            res.text()
        );
        let text = res.text();
        assert!(
            text.contains("*/slow"),
            "{proto}: body names the route: {text}"
        );
        assert!(
            text.contains("did not accept a connection"),
            "{proto}: the connect timed out, not the response: {text}"
        );
    }
}

#[tokio::test]
async fn backend_response_timeout_is_504() {
    let silent = Backend::start(|_req| futures_util::future::pending()).await;
    let gw = GatewayBuilder::new()
        .route(
            route("/silent")
                .to(silent.url())
                .set("response_header_timeout", "\"300ms\""),
        )
        .start()
        .await;

    for proto in Proto::ALL {
        let res = gw.client(proto, "a.gw.test").await.get("/silent").await;
        assert_eq!(
            res.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{proto}: {}",
            res.text()
        );
        let text = res.text();
        assert!(
            text.contains("*/silent"),
            "{proto}: body names the route: {text}"
        );
        assert!(text.contains("no response head"), "{proto}: {text}");
    }
}

#[tokio::test]
async fn hop_by_hop_request_headers_do_not_reach_the_backend() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;

    // HTTP/2 has no connection-specific headers (RFC 9113 8.2.2): only HTTP/1.1 can send them.
    let mut client = gw.client(Proto::H1, "a.gw.test").await;
    let req = client
        .request(Method::GET, "/hop")
        .header("connection", "close, X-Custom-Hop")
        .header("x-custom-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("upgrade", "h2c")
        .header("x-end-to-end", "kept")
        .body(empty())
        .expect("valid request");
    let echo = client.fetch(req).await.echo();
    for name in [
        "connection",
        "x-custom-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert_eq!(echo.header(name), None, "{name} must not reach the backend");
    }
    assert_eq!(echo.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let backend = Backend::start(|_req| async {
        http::Response::builder()
            .header("connection", "x-resp-hop")
            .header("x-resp-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "kept")
            .body(full("hello"))
            .expect("valid response")
    })
    .await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        for _ in 0..2 {
            // Read whole: over HTTP/2 a connection header would have reset the stream.
            let res = client.get("/").await;
            assert_eq!(res.status, StatusCode::OK, "{proto}");
            assert_eq!(res.body, "hello", "{proto}");
            for name in ["connection", "x-resp-hop", "keep-alive"] {
                assert!(
                    !res.headers.contains_key(name),
                    "{proto}: {name} reached the client"
                );
            }
            assert_eq!(res.headers["x-end-to-end"], "kept", "{proto}");
        }
    }
}

#[tokio::test]
async fn forwarded_headers_are_set_and_host_is_kept() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test:8443").await;
        let req = client
            .request(Method::GET, "/fwd")
            .header("x-forwarded-for", "10.1.2.3")
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "spoofed.example")
            .body(empty())
            .expect("valid request");
        let echo = client.fetch(req).await.echo();
        // Not a trusted proxy: what it claimed is replaced, not appended to (issue 11).
        assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"), "{proto}");
        assert_eq!(echo.header("x-forwarded-proto"), Some("https"), "{proto}");
        assert_eq!(
            echo.header("x-forwarded-host"),
            Some("a.gw.test:8443"),
            "{proto}"
        );
        // Over HTTP/2 the gateway builds Host from :authority.
        assert_eq!(echo.header("host"), Some("a.gw.test:8443"), "{proto}");
        assert_eq!(
            echo.version, "HTTP/1.1",
            "{proto}: backends are spoken to in HTTP/1.1"
        );

        // Without a prior X-Forwarded-For, the chain starts with the client.
        let echo = client.get("/fwd").await.echo();
        assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"), "{proto}");

        // Even a chain sent as several field lines is replaced when the client is not a trusted
        // proxy (tests/trust.rs has the trusted case).
        let req = client
            .request(Method::GET, "/fwd")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2, 10.0.0.3")
            .body(empty())
            .expect("valid request");
        let echo = client.fetch(req).await.echo();
        assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"), "{proto}");
    }
}

const LARGE: u64 = 20 * 1024 * 1024;

#[tokio::test]
async fn large_request_body_streams_to_the_backend() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let want = pattern_digest(LARGE);

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        let req = client
            .request(Method::PUT, "/upload")
            .body(pattern_body(LARGE, 64 * 1024))
            .expect("valid request");
        let echo = client.fetch(req).await.echo();
        assert_eq!(
            echo.body_len, LARGE,
            "{proto}: bytes received by the backend"
        );
        assert_eq!(
            echo.body_sha256,
            want.hex(),
            "{proto}: content received by the backend"
        );
    }
}

#[tokio::test]
async fn large_response_body_streams_to_the_client() {
    let backend =
        Backend::start(|_req| async { http::Response::new(pattern_body(LARGE, 64 * 1024)) }).await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let want = pattern_digest(LARGE);

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        let req = client
            .request(Method::GET, "/download")
            .body(empty())
            .expect("valid request");
        let mut body = client.send(req).await.into_body();
        let mut got = Digest::new();
        while let Some(frame) = within("next response frame", body.frame()).await {
            if let Some(data) = frame.expect("body streams without error").data_ref() {
                got.update(data);
            }
        }
        assert_eq!(got.len(), LARGE, "{proto}: bytes received by the client");
        assert_eq!(
            got.hex(),
            want.hex(),
            "{proto}: content received by the client"
        );
    }
}

#[tokio::test]
async fn response_chunk_arrives_before_the_backend_finishes() {
    let mut streaming = Streaming::start().await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(streaming.backend.url()))
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "a.gw.test").await;
        let req = client
            .request(Method::GET, "/stream")
            .body(empty())
            .expect("valid request");
        let response = client.send(req);
        let (response, writer) = tokio::join!(response, streaming.writer());
        let mut body = response.into_body();

        writer
            .send(Bytes::from_static(b"first"))
            .await
            .expect("body open");
        // The backend has not written "last" yet: the first chunk must arrive on its own.
        let mut received = Vec::new();
        while received.len() < b"first".len() {
            let frame = within("the first chunk", body.frame())
                .await
                .expect("body still open")
                .expect("body streams without error");
            received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d));
        }
        assert_eq!(received, b"first", "{proto}");

        writer
            .send(Bytes::from_static(b"last"))
            .await
            .expect("body open");
        drop(writer);
        let rest = within("the rest of the body", body.collect())
            .await
            .expect("body ends cleanly")
            .to_bytes();
        assert_eq!(rest, "last", "{proto}");
    }
}

#[test]
fn echo_parses_what_the_echo_backend_writes() {
    let echo = Echo::parse(b"backend=b\nmethod=GET\ntarget=/a=b?c=d\nversion=HTTP/1.1\nbody_len=3\nbody_sha256=00\nh:host=x:1\nh:a=1\nh:a=2\n");
    assert_eq!(echo.target, "/a=b?c=d");
    assert_eq!(echo.header("host"), Some("x:1"));
    assert_eq!(echo.header_all("a"), ["1", "2"]);
}
