//! Edge access control (issue 14): JWTs from every place a browser can put one, refusals for
//! GETs, event streams and WebSocket handshakes over HTTP/1.1 and HTTP/2, key rotation in a
//! JWKS file and at a URL, forward auth, and long-lived connections ending at the token's
//! expiry.

use http::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::jwt::{auth_table, claims, claims_with, jwks_file, now, JwksServer, Signer};
use crate::support::sse::{Item, SseBackend, SseClient};
use crate::support::ws::{self, seen_close, seen_handshake, WsBackend};
use crate::support::{
    dead_backend_url, empty, full, route, within, Backend, Client, GatewayBuilder, Proto,
};

/// A gateway with one route `/` to `backend`, guarded by a JWKS file of `signers`.
async fn guarded(
    backend: &str,
    signers: &[&Signer],
    extra: &str,
) -> (crate::support::gateway::TestGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = jwks_file(dir.path(), signers);
    let keys = format!("jwt_jwks = {:?}", path.display().to_string());
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/")
                .to(backend)
                .set("auth", &auth_table(&keys, extra)),
        )
        .start()
        .await;
    (gw, dir)
}

#[tokio::test]
async fn valid_token_in_header_cookie_or_query_reaches_backend_with_claims() {
    let backend = Backend::echo("b").await;
    let key = Signer::es256("k1");
    let (gw, _dir) = guarded(&backend.url(), &[&key], "").await;
    let token = key.sign(&claims("alice"));
    let bearer = format!("Bearer {token}");
    let cookie = format!("theme=dark; access_token={token}");
    let query = format!("/chat?room=1&access_token={token}");
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        // (where the token is, the request target, extra request headers)
        type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
        let cases: [Case; 3] = [
            (
                "header",
                "/chat?room=1",
                vec![("authorization", bearer.as_str())],
            ),
            ("cookie", "/chat?room=1", vec![("cookie", cookie.as_str())]),
            ("query", query.as_str(), vec![]),
        ];
        for (place, target, mut headers) in cases {
            // Forged identity headers never pass.
            headers.push(("x-user-id", "mallory"));
            let got = client.get_with(target, &headers).await;
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{proto} {place}: {}",
                got.text()
            );
            let echo = got.echo();
            assert_eq!(echo.header_all("x-user-id"), ["alice"], "{proto} {place}");
            assert_eq!(
                echo.header("x-user-email"),
                Some("alice@gw.test"),
                "{proto} {place}"
            );
            assert_eq!(
                echo.target, "/chat?room=1",
                "{proto} {place}: no token in the target"
            );
        }
    }
}

#[tokio::test]
async fn token_in_subprotocol_is_taken_out_of_the_offer() {
    let (backend, mut seen) = WsBackend::echo().await;
    let key = Signer::es256("k1");
    let (gw, _dir) = guarded(&backend.url(), &[&key], "").await;
    let token = key.sign(&claims("bob"));
    let mut req = ws::request("/ws");
    let offer = format!("chat, bearer.{token}");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        offer.parse().expect("header value"),
    );
    req.headers_mut()
        .insert("x-user-id", "mallory".parse().expect("header value"));
    let (mut client, response) = ws::try_connect(&gw, req).await.expect("handshake passes");
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
    let headers = seen_handshake(&mut seen).await;
    assert_eq!(
        headers["sec-websocket-protocol"], "chat",
        "the bearer entry is gone"
    );
    assert_eq!(headers["x-user-id"], "bob");
    ws::echo_round_trip(&mut client, "hi".into()).await;
}

/// How a refused request is made: a GET, an event stream, or a WebSocket handshake.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Get,
    Sse,
    WebSocket,
}

async fn status_of(client: &mut Client, kind: Kind, token: Option<&str>) -> (u16, Option<String>) {
    let proto = client.proto;
    let mut req = match (kind, proto) {
        (Kind::WebSocket, Proto::H2) => client.request(Method::CONNECT, "/ws"),
        _ => client.request(Method::GET, "/ws"),
    };
    match kind {
        Kind::Get => {}
        Kind::Sse => req = req.header("accept", "text/event-stream"),
        Kind::WebSocket => {
            req = req.header("sec-websocket-version", "13");
            if proto == Proto::H1 {
                req = req
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
            }
        }
    }
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut req = req.body(empty()).expect("valid request");
    if let (Kind::WebSocket, Proto::H2) = (kind, proto) {
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
    }
    let response = client.send(req).await;
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string());
    (response.status().as_u16(), challenge)
}

#[tokio::test]
async fn refused_tokens_get_401_or_403_before_any_backend_is_contacted() {
    let backend = crate::support::backend::Tagged::start("b").await;
    let key = Signer::es256("k1");
    let stranger = Signer::es256("k1");
    let (gw, _dir) = guarded(&backend.url(), &[&key], "").await;
    let invalid = Some("Bearer error=\"invalid_token\"".to_string());
    let cases = [
        ("no token", None, 401),
        ("bad signature", Some(stranger.sign(&claims("a"))), 401),
        ("wrong kid", Some(key.sign_as("k9", &claims("a"))), 401),
        (
            "expired",
            Some(key.sign(&claims_with("a", "exp", json!(now() - 600)))),
            401,
        ),
        (
            "not yet valid",
            Some(key.sign(&claims_with("a", "nbf", json!(now() + 600)))),
            401,
        ),
        (
            "wrong issuer",
            Some(key.sign(&claims_with("a", "iss", json!("https://evil/")))),
            403,
        ),
        (
            "wrong audience",
            Some(key.sign(&claims_with("a", "aud", json!(["other"])))),
            403,
        ),
    ];
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        for kind in [Kind::Get, Kind::Sse, Kind::WebSocket] {
            for (what, token, want) in &cases {
                let (status, challenge) = status_of(&mut client, kind, token.as_deref()).await;
                assert_eq!(status, *want, "{proto} {kind:?} {what}");
                if *want == 401 {
                    assert_eq!(challenge, invalid, "{proto} {kind:?} {what}");
                }
            }
        }
        // The same connection with a good token passes: the refusals were the tokens'.
        let good = key.sign(&claims("a"));
        let (status, _) = status_of(&mut client, Kind::Get, Some(&good)).await;
        assert_eq!(status, 200, "{proto}");
    }
    assert_eq!(
        backend.requests(),
        2,
        "only the two good requests reached the backend"
    );
    assert_eq!(backend.upgrades(), 0);
}

/// `GET /` with a bearer token `signer` signed for `sub`: the status the gateway answered.
async fn bearer_status(client: &mut Client, signer: &Signer, sub: &str) -> StatusCode {
    let bearer = format!("Bearer {}", signer.sign(&claims(sub)));
    client
        .get_with("/", &[("authorization", &bearer)])
        .await
        .status
}

#[tokio::test]
async fn key_rotation_in_the_jwks_file_is_picked_up_on_reload() {
    let backend = Backend::echo("b").await;
    let old = Signer::es256("old");
    let new = Signer::es256("new");
    let (gw, dir) = guarded(&backend.url(), &[&old], "").await;
    let mut client = gw.client(Proto::H1, "gw.test").await;
    assert_eq!(bearer_status(&mut client, &old, "c").await, 200);
    assert_eq!(bearer_status(&mut client, &new, "c").await, 401);

    jwks_file(dir.path(), &[&new]);
    let keys = format!(
        "jwt_jwks = {:?}",
        dir.path().join("jwks.json").display().to_string()
    );
    gw.reload(&[route("/")
        .to(backend.url())
        .set("auth", &auth_table(&keys, ""))])
        .await
        .expect("reload accepts the rotated JWKS");
    assert_eq!(bearer_status(&mut client, &new, "c").await, 200);
    assert_eq!(bearer_status(&mut client, &old, "c").await, 401);

    // A broken JWKS file is refused, and the keys in force stay.
    std::fs::write(dir.path().join("jwks.json"), "{\"keys\": 5}").expect("write");
    let err = gw
        .reload(&[route("/")
            .to(backend.url())
            .set("auth", &auth_table(&keys, ""))])
        .await
        .expect_err("a broken JWKS is refused");
    assert!(
        err.contains("route[0].auth.jwt_jwks") && err.contains("jwks.json"),
        "{err}"
    );
    assert_eq!(bearer_status(&mut client, &new, "c").await, 200);
}

#[tokio::test]
async fn key_rotation_at_the_jwks_url_is_picked_up_on_an_unknown_kid() {
    let backend = Backend::echo("b").await;
    let old = Signer::es256("old");
    let new = Signer::es256("new");
    let server = JwksServer::start(&[&old]).await;
    let keys = format!("jwt_jwks_url = {:?}", server.url());
    let gw = GatewayBuilder::new()
        .route(
            route("/")
                .to(backend.url())
                .set("auth", &auth_table(&keys, "")),
        )
        .start()
        .await;
    let mut client = gw.client(Proto::H2, "gw.test").await;
    let auth = |k: &Signer| format!("Bearer {}", k.sign(&claims("d")));
    assert_eq!(bearer_status(&mut client, &old, "d").await, 200);
    let before = server.fetches();
    assert!(before >= 1, "fetched at start-up");

    server.rotate(&[&old, &new]);
    let got = client
        .get_with("/", &[("authorization", &auth(&new))])
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.echo().header("x-user-id"), Some("d"));
    assert_eq!(
        server.fetches(),
        before + 1,
        "one fetch for the unknown kid"
    );

    // Forged kids are rate-limited: no fetch each.
    for _ in 0..3 {
        let got = client
            .get_with(
                "/",
                &[(
                    "authorization",
                    &format!("Bearer {}", new.sign_as("forged", &claims("d"))),
                )],
            )
            .await;
        assert_eq!(got.status, 401);
    }
    assert!(
        server.fetches() <= before + 2,
        "fetches: {}",
        server.fetches()
    );
}

/// An auth service: `Bearer allow` passes with identity headers, anything else is sent to log
/// in.
async fn auth_service() -> Backend {
    Backend::start(|req| async move {
        let allowed = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == "Bearer allow");
        let uri = req
            .headers()
            .get("x-forwarded-uri")
            .map(|v| v.to_str().expect("ascii").to_string())
            .unwrap_or_default();
        if allowed {
            http::Response::builder()
                .header("x-user-id", "u-42")
                .header("x-tenant", "acme")
                .header("x-other", "not copied")
                .header("x-seen-uri", uri)
                .body(full(""))
                .expect("valid response")
        } else {
            http::Response::builder()
                .status(302)
                .header("location", "https://login.gw.test/?next=/app")
                .header("www-authenticate", "Cookie realm=\"app\"")
                .body(full("please log in"))
                .expect("valid response")
        }
    })
    .await
}

#[tokio::test]
async fn forward_auth_allows_copies_headers_denies_with_its_answer_and_503s_when_down() {
    let backend = Backend::echo("b").await;
    let service = auth_service().await;
    let table = |url: &str| {
        format!(
            "{{ forward_auth = \"{url}/check\", forward_auth_headers = [\"X-User-Id\", \"X-Tenant\"] }}"
        )
    };
    let gw = GatewayBuilder::new()
        .route(
            route("/app")
                .to(backend.url())
                .set("auth", &table(&service.url())),
        )
        .route(
            route("/down")
                .to(backend.url())
                .set("auth", &table(&dead_backend_url())),
        )
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let got = client
            .get_with(
                "/app/page?x=1",
                &[("authorization", "Bearer allow"), ("x-tenant", "forged")],
            )
            .await;
        assert_eq!(got.status, 200, "{proto}");
        let echo = got.echo();
        assert_eq!(echo.header("x-user-id"), Some("u-42"), "{proto}");
        assert_eq!(
            echo.header_all("x-tenant"),
            ["acme"],
            "{proto}: the forged one is gone"
        );
        assert_eq!(
            echo.header("x-other"),
            None,
            "{proto}: only listed headers are copied"
        );

        let denied = client
            .get_with("/app/page", &[("authorization", "Bearer nope")])
            .await;
        assert_eq!(denied.status, 302, "{proto}");
        assert_eq!(
            denied.headers["location"],
            "https://login.gw.test/?next=/app"
        );
        assert_eq!(denied.headers["www-authenticate"], "Cookie realm=\"app\"");
        assert_eq!(denied.text(), "please log in");

        let down = client
            .get_with("/down", &[("authorization", "Bearer allow")])
            .await;
        assert_eq!(down.status, 503, "{proto}");
        assert!(
            down.text().contains("*/down"),
            "{proto}: names the route: {}",
            down.text()
        );
    }
}

#[tokio::test]
async fn websocket_is_closed_with_1008_when_its_token_expires() {
    let (backend, mut seen) = WsBackend::echo().await;
    let key = Signer::es256("k1");
    let (gw, _dir) = guarded(&backend.url(), &[&key], "").await;
    let token = key.sign(&claims_with("e", "exp", json!(now() + 2)));
    let mut req = ws::request("/ws");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    let (mut client, _) = ws::try_connect(&gw, req).await.expect("handshake passes");
    ws::echo_round_trip(&mut client, "before expiry".into()).await;
    let close = ws::expect_close(&mut client).await;
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token expired");
    // The handshake was seen first; then the backend's Close is 1001.
    seen_handshake(&mut seen).await;
    assert_eq!(
        ws::seen_data(&mut seen).await,
        Message::text("before expiry"),
        "the backend got the message sent before expiry"
    );
    assert_eq!(u16::from(seen_close(&mut seen).await.code), 1001);
}

#[tokio::test]
async fn event_stream_ends_at_an_event_boundary_when_its_token_expires() {
    let mut backend = SseBackend::start().await;
    let key = Signer::es256("k1");
    let (gw, _dir) = guarded(&backend.url(), &[&key], "").await;
    let exp = now() + 2;
    let token = key.sign(&claims_with("f", "exp", json!(exp)));
    let mut client = SseClient::connect(gw.https, &gw.ca, Proto::H2).await;
    let req = client
        .get("/events")
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .expect("valid request");
    let mut stream = client.open_with(req).await;
    let mut b = backend.stream().await;
    b.write("data: one\n\n").await;
    assert_eq!(stream.event().await.data, "one");
    b.write("data: two\n").await;
    stream.raw_ends_with(b"data: two\n").await;
    // Let the token expire while the event is half written: the stream waits for its end.
    let expiry = std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp as u64 + 1);
    let wait = expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
    b.write("\n").await;
    let (items, end) = stream.finish().await;
    assert_eq!(end, Ok(()), "the stream ends cleanly");
    match items.as_slice() {
        [Item::Event(e)] => assert_eq!(e.data, "two"),
        other => panic!("expected the whole second event, then the end: {other:?}"),
    }
    within("the backend stream to be released", b.disconnected()).await;
}
