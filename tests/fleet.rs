//! The upstream fleet of a route, black-box: balancing (least_conn by open requests,
//! WebSockets and event streams; weights; round robin; rendezvous hash; cookie affinity),
//! active health checks, passive ejection, retries, and the admin `/backends` report, against
//! real backends on 127.0.0.1 that name themselves and count what they serve.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http::{header, HeaderMap, Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::support::admin::{backends, backends_until};
use crate::support::backend::{KeepAliveRace, RaceSeen, Tagged, X_BACKEND};
use crate::support::client::{Client, Fetched};
use crate::support::gateway::TestGateway;
use crate::support::sse::{SseClient, SseStream};
use crate::support::ws::{self, drain_to_end, WsClient};
use crate::support::{
    dead_backend_url, empty, full, route, within, Blackhole, GatewayBuilder, Proto,
};

// ---------------------------------------------------------------------------------------------
// Helpers

/// `[route.health]` that notices a change within a few hundred milliseconds.
const HEALTH_100MS: &str = r#"{ path = "/healthz", interval = "100ms", timeout = "50ms", unhealthy_after = 2, healthy_after = 2 }"#;

/// The admin listener of a gateway built with `.admin()`.
fn admin(gw: &TestGateway) -> SocketAddr {
    gw.admin.expect("the gateway was built with .admin()")
}

/// The backend that answered, by its `x-backend` header.
fn served_by(headers: &HeaderMap) -> String {
    headers
        .get(X_BACKEND)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {X_BACKEND} header: the backend did not answer: {headers:?}"))
        .to_string()
}

/// The backend that answered `got` with 200.
fn ok_from(got: &Fetched, what: &str) -> String {
    assert_eq!(got.status, StatusCode::OK, "{what}: {}", got.text());
    served_by(&got.headers)
}

/// How many of `tags` are `name`.
fn count(tags: &[String], name: &str) -> usize {
    tags.iter().filter(|t| *t == name).count()
}

/// An error body the gateway wrote for `route` must name the route and no backend address.
fn assert_error_body(got: &Fetched, route: &str, addrs: &[SocketAddr], what: &str) {
    let text = got.text();
    assert!(
        text.contains(route),
        "{what}: the body names the route {route}: {text}"
    );
    for addr in addrs {
        assert!(
            !text.contains(&addr.to_string()),
            "{what}: the body must not name a backend address ({addr}): {text}"
        );
    }
}

/// A WebSocket through the gateway: HTTP/1.1 Upgrade or an RFC 8441 extended CONNECT.
enum Ws {
    H1(Box<WsClient>),
    /// The client is kept: the tunnel lives on its connection.
    H2(Box<(Client, WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>)>),
}

impl Ws {
    /// Opens a WebSocket to `path` with extra handshake `headers`; returns it and the headers of
    /// the 101 (HTTP/1.1) or 200 (HTTP/2) that accepted it.
    async fn open(
        gw: &TestGateway,
        proto: Proto,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Ws, HeaderMap) {
        match proto {
            Proto::H1 => {
                let mut req = ws::request(path);
                for (k, v) in headers {
                    req.headers_mut().append(
                        http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                        v.parse().expect("header value"),
                    );
                }
                let (ws, response) = ws::try_connect(gw, req)
                    .await
                    .unwrap_or_else(|e| panic!("WebSocket handshake to {path} failed: {e}"));
                assert_eq!(response.status(), 101);
                (Ws::H1(Box::new(ws)), response.headers().clone())
            }
            Proto::H2 => {
                let mut client = gw.client(Proto::H2, "gw.test").await;
                let mut req = client
                    .request(Method::CONNECT, path)
                    .header("sec-websocket-version", "13");
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                let mut req = req.body(empty()).expect("valid request");
                req.extensions_mut()
                    .insert(hyper::ext::Protocol::from_static("websocket"));
                let response = client.send(req).await;
                assert_eq!(
                    response.status(),
                    StatusCode::OK,
                    "RFC 8441 5: success is 200"
                );
                let headers = response.headers().clone();
                let upgraded = within("the HTTP/2 stream to upgrade", hyper::upgrade::on(response))
                    .await
                    .expect("upgrade");
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None)
                        .await;
                (Ws::H2(Box::new((client, ws))), headers)
            }
        }
    }

    /// Asks the backend its name (it answers `who` with `NAME:who`).
    async fn who(&mut self) -> String {
        match self {
            Ws::H1(ws) => ws::who(ws).await,
            Ws::H2(h2) => ws::who(&mut h2.1).await,
        }
    }

    /// Closes from the client and reads to the end.
    async fn close(self) {
        match self {
            Ws::H1(mut ws) => close(&mut *ws).await,
            Ws::H2(h2) => {
                let (client, mut ws) = *h2;
                close(&mut ws).await;
                drop(client);
            }
        }
    }
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    within("the Close to be sent", ws.close(None))
        .await
        .expect("send Close");
    drain_to_end(ws).await;
}

/// An event stream held open, and which backend serves it.
struct HeldStream {
    from: String,
    stream: SseStream,
    /// HTTP/1.1: the stream's own connection, closed with it.
    _client: Option<SseClient>,
}

/// Opens event streams through a gateway: one connection each over HTTP/1.1, all on one
/// connection over HTTP/2.
struct Streams<'a> {
    gw: &'a TestGateway,
    proto: Proto,
    shared: Option<SseClient>,
}

impl Streams<'_> {
    fn new(gw: &TestGateway, proto: Proto) -> Streams<'_> {
        Streams {
            gw,
            proto,
            shared: None,
        }
    }

    /// Opens a stream at `target` with extra request headers; checks its first event names
    /// the backend that the `x-backend` header names.
    async fn open(&mut self, target: &str, headers: &[(&str, &str)]) -> HeldStream {
        let (gw, proto) = (self.gw, self.proto);
        let mut own = None;
        let client = match proto {
            Proto::H1 => own.insert(SseClient::connect(gw.https, &gw.ca, proto).await),
            Proto::H2 => {
                if self.shared.is_none() {
                    self.shared = Some(SseClient::connect(gw.https, &gw.ca, proto).await);
                }
                self.shared.as_mut().expect("set just above")
            }
        };
        let mut req = client.get(target);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut stream = client
            .open_with(req.body(empty()).expect("valid request"))
            .await;
        let from = stream
            .header(X_BACKEND)
            .unwrap_or_else(|| panic!("{proto}: no {X_BACKEND} on the event stream"))
            .to_string();
        assert_eq!(stream.event().await.data, from, "{proto}: the first event");
        HeldStream {
            from,
            stream,
            _client: own,
        }
    }
}

/// The value of the affinity cookie `name` that `headers` set, after checking its attributes:
/// `Path=<path>; HttpOnly; Secure; SameSite=Lax` (TLS; see [`affinity_cookie_plain`]).
fn affinity_cookie(headers: &HeaderMap, name: &str, path: &str) -> String {
    let (value, has, line) = cookie_parts(headers, name);
    assert!(has("path", path), "Path={path}: {line}");
    assert!(has("httponly", ""), "HttpOnly: {line}");
    assert!(has("secure", ""), "Secure on TLS: {line}");
    assert!(has("samesite", "lax"), "SameSite=Lax: {line}");
    value
}

/// [`affinity_cookie`] for an answer on the plain listener: no `Secure` there.
fn affinity_cookie_plain(headers: &HeaderMap, name: &str, path: &str) -> String {
    let (value, has, line) = cookie_parts(headers, name);
    assert!(has("path", path), "Path={path}: {line}");
    assert!(has("httponly", ""), "HttpOnly: {line}");
    assert!(!has("secure", ""), "no Secure over plain HTTP: {line}");
    assert!(has("samesite", "lax"), "SameSite=Lax: {line}");
    value
}

/// The only Set-Cookie for `name`: its value, a test for attribute `k` with value `v` (empty
/// for a flag), and the whole line.
fn cookie_parts(headers: &HeaderMap, name: &str) -> (String, impl Fn(&str, &str) -> bool, String) {
    let prefix = format!("{name}=");
    let set: Vec<&str> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|c| c.starts_with(&prefix))
        .collect();
    assert_eq!(set.len(), 1, "one Set-Cookie for {name}: {headers:?}");
    let mut parts = set[0].split(';').map(str::trim);
    let value = parts
        .next()
        .and_then(|p| p.strip_prefix(&prefix))
        .expect("name=value first")
        .to_string();
    assert!(!value.is_empty(), "an affinity value: {}", set[0]);
    let attrs: Vec<(String, String)> = parts
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), v.trim().to_string()),
            None => (p.to_ascii_lowercase(), String::new()),
        })
        .collect();
    // Attribute names are case-insensitive, and so is SameSite's value; Path's is not.
    let has = move |k: &str, v: &str| {
        attrs.iter().any(|(ak, av)| {
            ak == k
                && if k == "samesite" {
                    av.eq_ignore_ascii_case(v)
                } else {
                    av == v
                }
        })
    };
    (value, has, set[0].to_string())
}

/// The value of any Set-Cookie for `name` in `headers`.
fn set_cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix(&prefix))
        .map(|rest| rest.split(';').next().unwrap_or_default().to_string())
}

// ---------------------------------------------------------------------------------------------
// least_conn and weights

#[tokio::test]
async fn least_conn_sends_new_websockets_to_the_emptiest_backend() {
    for proto in Proto::ALL {
        let a = Tagged::start("a").await;
        let b = Tagged::start("b").await;
        let gw = GatewayBuilder::new()
            .admin()
            .route(route("/ws").to(a.url()).to(b.url()))
            .start()
            .await;

        // One by one, each goes where fewer are open: ties are random, so six end up 3 and 3.
        let mut open = Vec::new();
        for _ in 0..6 {
            let (mut ws, _) = Ws::open(&gw, proto, "/ws", &[]).await;
            let from = ws.who().await;
            open.push((from, ws));
        }
        let tags: Vec<String> = open.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(
            (count(&tags, "a"), count(&tags, "b")),
            (3, 3),
            "{proto}: {tags:?}"
        );
        assert_eq!(
            (a.upgrades(), b.upgrades()),
            (3, 3),
            "{proto}: the backends' count"
        );
        let view = backends(admin(&gw)).await;
        assert_eq!(view.backend("*/ws", &a.url()).open, 3, "{}", view.text);
        assert_eq!(view.backend("*/ws", &b.url()).open, 3, "{}", view.text);

        // Close every WebSocket on a: a is empty, b holds three.
        let (on_a, on_b): (Vec<_>, Vec<_>) = open.into_iter().partition(|(t, _)| t == "a");
        for (_, ws) in on_a {
            ws.close().await;
        }
        a.wait("a's WebSockets to end", |a| a.open_websockets() == 0)
            .await;
        let a_url = a.url();
        backends_until(admin(&gw), "a to have nothing open", |v| {
            v.backend("*/ws", &a_url).open == 0
        })
        .await;

        let mut again = Vec::new();
        for i in 0..3 {
            let (mut ws, _) = Ws::open(&gw, proto, "/ws", &[]).await;
            assert_eq!(
                ws.who().await,
                "a",
                "{proto}: new WebSocket {i} goes to the emptier a"
            );
            again.push(ws);
        }
        assert_eq!((a.upgrades(), b.upgrades()), (6, 3), "{proto}");
        assert_eq!(
            (a.open_websockets(), b.open_websockets()),
            (3, 3),
            "{proto}"
        );
        drop((on_b, again));
    }
}

#[tokio::test]
async fn least_conn_sends_new_event_streams_to_the_emptiest_backend() {
    for proto in Proto::ALL {
        let a = Tagged::start("a").await;
        let b = Tagged::start("b").await;
        let gw = GatewayBuilder::new()
            .admin()
            .route(route("/events").to(a.url()).to(b.url()))
            .start()
            .await;

        let mut streams = Streams::new(&gw, proto);
        let mut open = Vec::new();
        for _ in 0..6 {
            open.push(streams.open("/events", &[]).await);
        }
        let tags: Vec<String> = open.iter().map(|s| s.from.clone()).collect();
        assert_eq!(
            (count(&tags, "a"), count(&tags, "b")),
            (3, 3),
            "{proto}: {tags:?}"
        );
        assert_eq!(
            (a.streams(), b.streams()),
            (3, 3),
            "{proto}: the backends' count"
        );

        // Let go of a's streams (HTTP/2: a reset each; HTTP/1.1: their connections close).
        open.retain(|s| s.from == "b");
        a.wait("a's streams to end", |a| a.open_streams() == 0)
            .await;
        let a_url = a.url();
        backends_until(admin(&gw), "a to have nothing open", |v| {
            v.backend("*/events", &a_url).open == 0
        })
        .await;

        for i in 0..3 {
            let s = streams.open("/events", &[]).await;
            assert_eq!(s.from, "a", "{proto}: new stream {i} goes to the emptier a");
            open.push(s);
        }
        assert_eq!((a.streams(), b.streams()), (6, 3), "{proto}");
        assert_eq!((a.open_streams(), b.open_streams()), (3, 3), "{proto}");
    }
}

#[tokio::test]
async fn weights_are_respected() {
    for proto in Proto::ALL {
        let a = Tagged::start("a").await;
        let b = Tagged::start("b").await;
        let gw = GatewayBuilder::new()
            .admin()
            .route(
                route("/events")
                    .backend_with(a.url(), "weight = 1")
                    .backend_with(b.url(), "weight = 3"),
            )
            .start()
            .await;

        // 40 streams held open: least_conn relative to weight puts about 10 on a, 30 on b.
        let mut streams = Streams::new(&gw, proto);
        let mut open = Vec::new();
        for _ in 0..40 {
            open.push(streams.open("/events", &[]).await);
        }
        let tags: Vec<String> = open.iter().map(|s| s.from.clone()).collect();
        let (on_a, on_b) = (count(&tags, "a"), count(&tags, "b"));
        assert_eq!(on_a + on_b, 40, "{proto}: {tags:?}");
        assert!(
            (7..=13).contains(&on_a),
            "{proto}: weight 1 of 4 got {on_a} of 40"
        );
        assert_eq!(
            (a.streams(), b.streams()),
            (on_a, on_b),
            "{proto}: the backends' count"
        );

        let view = backends(admin(&gw)).await;
        let (va, vb) = (
            view.backend("*/events", &a.url()),
            view.backend("*/events", &b.url()),
        );
        assert_eq!((va.weight, vb.weight), (1, 3), "{}", view.text);
        assert_eq!(
            (va.open, vb.open),
            (on_a as u64, on_b as u64),
            "{}",
            view.text
        );
    }
}

#[tokio::test]
async fn least_conn_counts_requests_in_flight_by_weight() {
    for proto in Proto::ALL {
        let a = Tagged::start("a").await;
        let b = Tagged::start("b").await;
        let gw = GatewayBuilder::new()
            .admin()
            .route(route("/").to(a.url()).backend_with(b.url(), "weight = 3"))
            .start()
            .await;

        // 40 requests held at the backends, each sent once the one before has arrived.
        let (mut a_changes, mut b_changes) = (a.changes(), b.changes());
        let mut pending = Vec::new();
        for i in 0..40 {
            let mut client = gw.client(proto, "gw.test").await;
            pending.push(tokio::spawn(async move {
                client.get(&format!("/hold/{i}")).await
            }));
            within("the request to be held", async {
                while a.held() + b.held() < i + 1 {
                    tokio::select! {
                        _ = a_changes.changed() => {}
                        _ = b_changes.changed() => {}
                    }
                }
            })
            .await;
        }
        let (on_a, on_b) = (a.held(), b.held());
        assert_eq!(on_a + on_b, 40, "{proto}");
        assert!(
            (7..=13).contains(&on_a),
            "{proto}: weight 1 of 4 holds {on_a} of 40"
        );
        let view = backends(admin(&gw)).await;
        assert_eq!(
            (
                view.backend("*/", &a.url()).open,
                view.backend("*/", &b.url()).open
            ),
            (on_a as u64, on_b as u64),
            "{}",
            view.text
        );

        a.release(on_a);
        b.release(on_b);
        let mut tags = Vec::new();
        for task in pending {
            let got = within("a released request", task).await.expect("no panic");
            tags.push(ok_from(&got, &format!("{proto}: a released request")));
        }
        assert_eq!(
            (count(&tags, "a"), count(&tags, "b")),
            (on_a, on_b),
            "{proto}"
        );
    }
}

#[tokio::test]
async fn round_robin_follows_weights() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let c = Tagged::start("c").await;
    let weighted = Tagged::start("w1").await;
    let heavy = Tagged::start("w3").await;
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/even")
                .to(a.url())
                .to(b.url())
                .to(c.url())
                .set("balance", "\"round_robin\""),
        )
        .route(
            route("/weighted")
                .to(weighted.url())
                .backend_with(heavy.url(), "weight = 3")
                .set("balance", "\"round_robin\""),
        )
        .start()
        .await;

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let mut tags = Vec::new();
        for i in 0..30 {
            let got = client.get(&format!("/even/{i}")).await;
            tags.push(ok_from(&got, &format!("{proto} GET {i}")));
        }
        for name in ["a", "b", "c"] {
            assert_eq!(
                count(&tags, name),
                10,
                "{proto}: equal weights share evenly: {tags:?}"
            );
        }
        for pair in tags.windows(2) {
            assert_ne!(
                pair[0], pair[1],
                "{proto}: round robin never repeats: {tags:?}"
            );
        }

        let mut tags = Vec::new();
        for i in 0..40 {
            let got = client.get(&format!("/weighted/{i}")).await;
            tags.push(ok_from(&got, &format!("{proto} GET {i}")));
        }
        let light = count(&tags, "w1");
        assert_eq!(light + count(&tags, "w3"), 40, "{proto}: {tags:?}");
        assert!(
            (7..=13).contains(&light),
            "{proto}: weight 1 of 4 got {light} of 40: {tags:?}"
        );
    }
    assert_eq!((a.requests(), b.requests(), c.requests()), (20, 20, 20));
    assert_eq!(weighted.requests() + heavy.requests(), 80);
    assert_eq!(
        backends(admin(&gw)).await.route("*/weighted").balance,
        "round_robin"
    );
}

// ---------------------------------------------------------------------------------------------
// hash

/// The backend each key is sent to, by `GET /` with `X-User: key`.
async fn map_keys(gw: &TestGateway, proto: Proto, keys: &[String]) -> BTreeMap<String, String> {
    let mut client = gw.client(proto, "gw.test").await;
    let mut map = BTreeMap::new();
    for key in keys {
        let got = client.get_with("/", &[("x-user", key.as_str())]).await;
        map.insert(key.clone(), ok_from(&got, &format!("{proto} key {key}")));
    }
    map
}

fn hash_route(backends: &[&Tagged]) -> crate::support::gateway::Route {
    let mut r = route("/")
        .set("balance", "\"hash\"")
        .set("hash_key", "\"header:X-User\"");
    for b in backends {
        r = r.to(b.url());
    }
    r
}

#[tokio::test]
async fn hash_keeps_keys_put_and_moves_about_one_nth() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let c = Tagged::start("c").await;
    let d = Tagged::start("d").await;
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();

    let three = GatewayBuilder::new()
        .route(hash_route(&[&a, &b, &c]))
        .start()
        .await;
    let first = map_keys(&three, Proto::H1, &keys).await;
    let again = map_keys(&three, Proto::H2, &keys).await;
    assert_eq!(
        first, again,
        "the same key goes to the same backend, over either protocol"
    );
    let placed: Vec<String> = first.values().cloned().collect();
    for (name, backend) in [("a", &a), ("b", &b), ("c", &c)] {
        let n = count(&placed, name);
        assert!(n > 0, "every backend gets keys: {first:?}");
        assert_eq!(backend.requests(), 2 * n, "{name}: the backend's count");
    }

    // Without the key: least_conn, still served.
    let got = three.client(Proto::H2, "gw.test").await.get("/").await;
    ok_from(&got, "a request without X-User");

    // The hash is a function of the key and the backend set alone: a second gateway with one
    // more backend moves only the keys the new backend wins, about a quarter of them.
    let four = GatewayBuilder::new()
        .route(hash_route(&[&a, &b, &c, &d]))
        .start()
        .await;
    let grown = map_keys(&four, Proto::H1, &keys).await;
    assert_eq!(
        grown,
        map_keys(&four, Proto::H2, &keys).await,
        "stable on the second gateway"
    );
    let moved: Vec<&String> = keys.iter().filter(|k| first[*k] != grown[*k]).collect();
    for key in &moved {
        assert_eq!(grown[*key], "d", "{key} moved, and only to the new backend");
    }
    // Expected 15 of 60 (binomial, p = 1/4): 5..=27 fails by chance less than once in 2000 runs.
    assert!(
        (5..=27).contains(&moved.len()),
        "{} of 60 keys moved to the 4th backend: {moved:?}",
        moved.len()
    );
    assert_eq!(d.requests(), 2 * moved.len(), "d's count");
}

#[tokio::test]
async fn hash_key_leaves_a_down_backend_and_comes_back() {
    let backends_list = [
        Tagged::start("a").await,
        Tagged::start("b").await,
        Tagged::start("c").await,
    ];
    let refs: Vec<&Tagged> = backends_list.iter().collect();
    let gw = GatewayBuilder::new()
        .admin()
        .route(hash_route(&refs).set("health", HEALTH_100MS))
        .start()
        .await;
    let urls: Vec<String> = backends_list.iter().map(Tagged::url).collect();
    let all_healthy = |v: &crate::support::admin::Backends| {
        urls.iter().all(|u| v.backend("*/", u).state == "healthy")
    };
    backends_until(admin(&gw), "every backend healthy", all_healthy).await;

    let keys: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let before = map_keys(&gw, Proto::H1, &keys).await;
    let down_name = before["user-0"].clone();
    let down = backends_list
        .iter()
        .find(|t| t.name == down_name)
        .expect("a known backend");
    down.set_health(503);
    let down_url = down.url();
    backends_until(admin(&gw), "the backend to be unhealthy", |v| {
        v.backend("*/", &down_url).state == "unhealthy"
    })
    .await;

    let served = down.requests();
    let during = map_keys(&gw, Proto::H2, &keys).await;
    for key in &keys {
        if before[key] == down_name {
            assert_ne!(during[key], down_name, "{key} leaves the unhealthy backend");
        } else {
            assert_eq!(during[key], before[key], "{key} stays where it was");
        }
    }
    assert_eq!(
        down.requests(),
        served,
        "nothing reaches the unhealthy backend"
    );

    down.set_health(200);
    backends_until(admin(&gw), "the backend to be healthy again", |v| {
        v.backend("*/", &down_url).state == "healthy"
    })
    .await;
    let after = map_keys(&gw, Proto::H1, &keys).await;
    assert_eq!(after, before, "every key is back where it was");
}

#[tokio::test]
async fn hash_on_client_ip_keeps_each_address_on_one_backend() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let c = Tagged::start("c").await;
    let gw = GatewayBuilder::new()
        .route(
            route("/")
                .to(a.url())
                .to(b.url())
                .to(c.url())
                .set("balance", "\"hash\"")
                .set("hash_key", "\"client_ip\""),
        )
        .start()
        .await;

    let mut placed = BTreeMap::new();
    for last in 2..=13u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        let mut tags = Vec::new();
        // New connections each time: the address decides, not the connection.
        for proto in Proto::ALL {
            for _ in 0..2 {
                let got = gw.client_from(ip, proto, "gw.test").await.get("/").await;
                tags.push(ok_from(&got, &format!("{proto} from {ip}")));
            }
        }
        assert!(tags.iter().all(|t| *t == tags[0]), "{ip}: {tags:?}");
        placed.insert(ip, tags[0].clone());
    }
    let used: Vec<String> = placed.values().cloned().collect();
    assert!(
        ["a", "b", "c"]
            .iter()
            .filter(|n| count(&used, n) > 0)
            .count()
            >= 2,
        "twelve addresses spread over the backends: {placed:?}"
    );
    for (name, backend) in [("a", &a), ("b", &b), ("c", &c)] {
        assert_eq!(backend.requests(), 4 * count(&used, name), "{name}'s count");
    }
}

#[tokio::test]
async fn hash_on_a_query_or_cookie_value() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let c = Tagged::start("c").await;
    let fleet = |r: crate::support::gateway::Route| r.to(a.url()).to(b.url()).to(c.url());
    let gw = GatewayBuilder::new()
        .route(
            fleet(route("/q"))
                .set("balance", "\"hash\"")
                .set("hash_key", "\"query:room\""),
        )
        .route(
            fleet(route("/c"))
                .set("balance", "\"hash\"")
                .set("hash_key", "\"cookie:session\""),
        )
        .start()
        .await;

    let mut by_room = BTreeMap::new();
    let mut by_session = BTreeMap::new();
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        for i in 0..20 {
            let value = format!("v{i}");
            let got = client.get(&format!("/q/x?other=1&room={value}")).await;
            let from = ok_from(&got, &format!("{proto} room {value}"));
            assert_eq!(
                by_room.entry(value.clone()).or_insert(from.clone()),
                &from,
                "{proto}: room {value} stays put"
            );
            let cookie = format!("theme=dark; session={value}");
            let got = client
                .get_with("/c/x", &[("cookie", cookie.as_str())])
                .await;
            let from = ok_from(&got, &format!("{proto} session {value}"));
            assert_eq!(
                by_session.entry(value.clone()).or_insert(from.clone()),
                &from,
                "{proto}: session {value} stays put"
            );
        }
        // Without the key: least_conn, still served.
        ok_from(&client.get("/q/x?other=1").await, "no room");
        ok_from(&client.get("/c/x").await, "no session");
    }
    for map in [&by_room, &by_session] {
        let used: Vec<String> = map.values().cloned().collect();
        let spread = ["a", "b", "c"]
            .iter()
            .filter(|n| count(&used, n) > 0)
            .count();
        assert!(spread >= 2, "20 values spread over the backends: {map:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// cookie affinity

#[tokio::test]
async fn cookie_affinity_across_gets_and_a_websocket() {
    let mut fleet = vec![
        Tagged::start("a").await,
        Tagged::start("b").await,
        Tagged::start("c").await,
    ];
    let mut r = route("/app").set("balance", "\"cookie\"");
    for t in &fleet {
        r = r.to(t.url());
    }
    let gw = GatewayBuilder::new().route(r).start().await;
    let ports: Vec<String> = fleet.iter().map(|t| t.addr.port().to_string()).collect();

    let mut pinned = None;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let got = client.get("/app/page").await;
        let home = ok_from(&got, &format!("{proto}: first GET"));
        let value = affinity_cookie(&got.headers, "sg_affinity", "/app");
        assert!(
            !value.contains("127.0.0.1"),
            "{proto}: the value hides the backend: {value}"
        );
        for port in &ports {
            assert!(
                !value.contains(port.as_str()),
                "{proto}: the value hides the port: {value}"
            );
        }

        let before: Vec<usize> = fleet.iter().map(Tagged::requests).collect();
        let cookie = format!("theme=dark; sg_affinity={value}");
        for i in 0..10 {
            let got = client
                .get_with(&format!("/app/{i}"), &[("cookie", cookie.as_str())])
                .await;
            assert_eq!(
                ok_from(&got, &format!("{proto} GET {i}")),
                home,
                "{proto} GET {i}"
            );
            if let Some(v) = set_cookie_value(&got.headers, "sg_affinity") {
                assert_eq!(v, value, "{proto} GET {i}: a valid cookie is not replaced");
            }
        }
        for (t, was) in fleet.iter().zip(before) {
            let want = if t.name == home { was + 10 } else { was };
            assert_eq!(t.requests(), want, "{proto}: {}'s count", t.name);
        }
        pinned = Some((home, value));
    }
    let (home, value) = pinned.expect("ran");
    let cookie = format!("sg_affinity={value}");

    // A WebSocket with the cookie goes where the GETs went, over either protocol.
    for proto in Proto::ALL {
        let upgrades: Vec<usize> = fleet.iter().map(Tagged::upgrades).collect();
        let (mut ws, accepted) =
            Ws::open(&gw, proto, "/app/ws", &[("cookie", cookie.as_str())]).await;
        assert_eq!(
            ws.who().await,
            home,
            "{proto}: the WebSocket follows the cookie"
        );
        if let Some(v) = set_cookie_value(&accepted, "sg_affinity") {
            assert_eq!(v, value, "{proto}: a valid cookie is not replaced");
        }
        for (t, was) in fleet.iter().zip(upgrades) {
            let want = if t.name == home { was + 1 } else { was };
            assert_eq!(t.upgrades(), want, "{proto}: {}'s upgrades", t.name);
        }
        ws.close().await;
    }

    // A WebSocket without one is placed, and its 101 carries the cookie that keeps it there.
    let (mut ws, accepted) = Ws::open(&gw, Proto::H1, "/app/ws", &[]).await;
    let ws_home = ws.who().await;
    let ws_value = affinity_cookie(&accepted, "sg_affinity", "/app");
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let ws_cookie = format!("sg_affinity={ws_value}");
    let got = client
        .get_with("/app/after-ws", &[("cookie", ws_cookie.as_str())])
        .await;
    assert_eq!(ok_from(&got, "GET with the WebSocket's cookie"), ws_home);
    ws.close().await;

    // A cookie that is not one of the gateway's is replaced.
    let got = client
        .get_with("/app/x", &[("cookie", "sg_affinity=garbage")])
        .await;
    ok_from(&got, "GET with a forged cookie");
    let fresh = affinity_cookie(&got.headers, "sg_affinity", "/app");
    assert_ne!(fresh, "garbage");

    // The pinned backend dies: the cookie's next request is served elsewhere, with a new cookie
    // that sticks.
    let at = fleet
        .iter()
        .position(|t| t.name == home)
        .expect("a known backend");
    fleet[at].kill().await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let got = client
            .get_with("/app/after-kill", &[("cookie", cookie.as_str())])
            .await;
        let moved = ok_from(&got, &format!("{proto}: GET after the kill"));
        assert_ne!(moved, home, "{proto}");
        let replaced = affinity_cookie(&got.headers, "sg_affinity", "/app");
        assert_ne!(replaced, value, "{proto}: the cookie is replaced");
        let next = format!("sg_affinity={replaced}");
        for i in 0..3 {
            let got = client
                .get_with(&format!("/app/{i}"), &[("cookie", next.as_str())])
                .await;
            assert_eq!(
                ok_from(&got, &format!("{proto} GET {i}")),
                moved,
                "{proto} GET {i}"
            );
        }
    }
}

#[tokio::test]
async fn affinity_cookie_name_and_path_follow_the_route() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let gw = GatewayBuilder::new()
        .plain_listener("proxy")
        .route(
            route("/")
                .to(a.url())
                .to(b.url())
                .set("balance", "\"cookie\"")
                .set("affinity_cookie", "\"pin\""),
        )
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let got = client.get("/x").await;
        let home = ok_from(&got, &format!("{proto}: first GET"));
        assert_eq!(
            set_cookie_value(&got.headers, "sg_affinity"),
            None,
            "{proto}"
        );
        let value = affinity_cookie(&got.headers, "pin", "/");
        let cookie = format!("pin={value}");
        for i in 0..5 {
            let got = client
                .get_with(&format!("/{i}"), &[("cookie", cookie.as_str())])
                .await;
            assert_eq!(ok_from(&got, &format!("{proto} GET {i}")), home);
        }
    }

    // On the plain listener the cookie is the same but for Secure.
    let mut client = gw.plain_client(Proto::H1, "gw.test").await;
    let got = client.get("/plain").await;
    let home = ok_from(&got, "plain GET");
    let value = affinity_cookie_plain(&got.headers, "pin", "/");
    let cookie = format!("pin={value}");
    let got = client
        .get_with("/plain/2", &[("cookie", cookie.as_str())])
        .await;
    assert_eq!(ok_from(&got, "plain GET with the cookie"), home);
}

// ---------------------------------------------------------------------------------------------
// Passive ejection and active health checks

#[tokio::test]
async fn blackholed_backend_costs_a_few_requests_then_none() {
    let hole = Blackhole::new().await;
    let a = Tagged::start("a").await;
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/slow")
                .to(hole.url())
                .to(a.url())
                .set("connect_timeout", "\"300ms\"")
                .set("retries", "0"),
        )
        .start()
        .await;
    let addrs = [hole.addr, a.addr];

    // Without retries each pick of the blackhole costs a 504, until the third in a row ejects it.
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let mut statuses = Vec::new();
    while statuses.iter().filter(|s| **s == 504).count() < 3 {
        assert!(
            statuses.len() < 60,
            "the blackhole was picked fewer than 3 times in 60: {statuses:?}"
        );
        let got = client.get(&format!("/slow/{}", statuses.len())).await;
        match got.status.as_u16() {
            200 => assert_eq!(served_by(&got.headers), "a"),
            504 => assert_error_body(&got, "*/slow", &addrs, "504"),
            other => panic!("GET {}: {other}: {}", statuses.len(), got.text()),
        }
        statuses.push(got.status.as_u16());
    }
    let hole_url = hole.url();
    let view = backends_until(admin(&gw), "the blackhole to be ejected", |v| {
        v.backend("*/slow", &hole_url).state == "ejected"
    })
    .await;
    assert_eq!(
        view.backend("*/slow", &a.url()).state,
        "healthy",
        "{}",
        view.text
    );

    // Ejected: nothing more is lost.
    let mut client = gw.client(Proto::H2, "gw.test").await;
    for i in 0..20 {
        let got = client.get(&format!("/slow/after/{i}")).await;
        assert_eq!(ok_from(&got, &format!("GET {i} after the ejection")), "a");
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(a.requests(), ok + 20, "a's count: {statuses:?}");
    assert_eq!(
        backends(admin(&gw))
            .await
            .backend("*/slow", &hole.url())
            .state,
        "ejected",
        "still ejected (10 s by default)"
    );
}

#[tokio::test]
async fn blackholed_backend_is_retried_on_the_other_by_default() {
    let hole = Blackhole::new().await;
    let a = Tagged::start("a").await;
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/slow")
                .to(hole.url())
                .to(a.url())
                .set("connect_timeout", "\"300ms\""),
        )
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        for i in 0..15 {
            let got = client.get(&format!("/slow/{i}")).await;
            assert_eq!(ok_from(&got, &format!("{proto} GET {i}")), "a");
        }
    }
    assert_eq!(a.requests(), 30);
    let hole_url = hole.url();
    backends_until(admin(&gw), "the blackhole to be ejected", |v| {
        v.backend("*/slow", &hole_url).state == "ejected"
    })
    .await;
}

#[tokio::test]
async fn refusing_backend_is_retried_elsewhere_and_ejected() {
    let dead = dead_backend_url();
    let a = Tagged::start("a").await;
    let gw = GatewayBuilder::new()
        .admin()
        .route(route("/").to(dead.clone()).to(a.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        for i in 0..15 {
            let got = client.get(&format!("/{i}")).await;
            assert_eq!(ok_from(&got, &format!("{proto} GET {i}")), "a");
        }
    }
    assert_eq!(a.requests(), 30);
    backends_until(admin(&gw), "the refusing backend to be ejected", |v| {
        v.backend("*/", &dead).state == "ejected"
    })
    .await;
}

#[tokio::test]
async fn error_bodies_name_the_route_never_a_backend() {
    let dead = [dead_backend_url(), dead_backend_url()];
    let dead_addrs: Vec<SocketAddr> = dead
        .iter()
        .map(|u| {
            u.strip_prefix("http://")
                .and_then(|a| a.parse().ok())
                .expect("http://ADDR")
        })
        .collect();
    let hole = Blackhole::new().await;
    let gw = GatewayBuilder::new()
        .route(route("/down").to(dead[0].clone()).to(dead[1].clone()))
        .route(
            route("/slow")
                .to(hole.url())
                .set("connect_timeout", "\"300ms\""),
        )
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let got = client.get("/down/x").await;
        assert_eq!(
            got.status,
            StatusCode::BAD_GATEWAY,
            "{proto}: {}",
            got.text()
        );
        assert_error_body(&got, "*/down", &dead_addrs, &format!("{proto} 502"));
        let got = client.get("/slow/x").await;
        assert_eq!(
            got.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{proto}: {}",
            got.text()
        );
        assert_error_body(&got, "*/slow", &[hole.addr], &format!("{proto} 504"));
    }
}

#[tokio::test]
async fn health_check_503_removes_then_restores() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    b.set_health(503);
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/")
                .to(a.url())
                .to(b.url())
                .set("health", HEALTH_100MS),
        )
        .start()
        .await;
    let (a_url, b_url) = (a.url(), b.url());
    let view = backends_until(admin(&gw), "b to be unhealthy", |v| {
        v.backend("*/", &b_url).state == "unhealthy"
    })
    .await;
    assert_eq!(view.backend("*/", &a_url).state, "healthy", "{}", view.text);
    assert!(
        b.health_checks() >= 2,
        "b was checked: {}",
        b.health_checks()
    );

    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        for i in 0..10 {
            let got = client.get(&format!("/{i}")).await;
            assert_eq!(ok_from(&got, &format!("{proto} GET {i}")), "a");
        }
    }
    assert_eq!((a.requests(), b.requests()), (20, 0));

    b.set_health(200);
    backends_until(admin(&gw), "b to be back", |v| {
        matches!(
            v.backend("*/", &b_url).state.as_str(),
            "healthy" | "slow_start"
        )
    })
    .await;
    let mut client = gw.client(Proto::H2, "gw.test").await;
    let mut tags = Vec::new();
    for i in 0..20 {
        let got = client.get(&format!("/back/{i}")).await;
        tags.push(ok_from(&got, &format!("GET {i} after recovery")));
    }
    // Ties go either way at random: 20 misses in a row would be 1 in a million.
    assert!(count(&tags, "b") > 0, "b gets requests again: {tags:?}");
    assert_eq!(b.requests(), count(&tags, "b"));
    assert!(a.health_checks() >= 2, "a is checked too");
}

#[tokio::test]
async fn every_backend_unhealthy_is_tried_anyway() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    a.set_health(503);
    b.set_health(503);
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/")
                .to(a.url())
                .to(b.url())
                .set("health", HEALTH_100MS),
        )
        .start()
        .await;
    let (a_url, b_url) = (a.url(), b.url());
    backends_until(admin(&gw), "both unhealthy", |v| {
        v.backend("*/", &a_url).state == "unhealthy" && v.backend("*/", &b_url).state == "unhealthy"
    })
    .await;
    // A guess beats a sure 502: the backends answer 200 to everything but their health path.
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        for i in 0..10 {
            ok_from(
                &client.get(&format!("/{i}")).await,
                &format!("{proto} GET {i}"),
            );
        }
    }
    assert_eq!(a.requests() + b.requests(), 20);
}

#[tokio::test]
async fn slow_start_follows_a_recovery() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    b.set_health(503);
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/")
                .to(a.url())
                .to(b.url())
                .set("health", HEALTH_100MS)
                .set("slow_start", "\"2s\""),
        )
        .start()
        .await;
    let b_url = b.url();
    backends_until(admin(&gw), "b to be unhealthy", |v| {
        v.backend("*/", &b_url).state == "unhealthy"
    })
    .await;
    assert_eq!(b.requests(), 0);

    let recovered = std::time::Instant::now();
    b.set_health(200);
    backends_until(admin(&gw), "b in slow start", |v| {
        v.backend("*/", &b_url).state == "slow_start"
    })
    .await;
    backends_until(admin(&gw), "b's slow start to end", |v| {
        v.backend("*/", &b_url).state == "healthy"
    })
    .await;
    // Slow start begins after the health flips, so it cannot be over sooner than its length.
    assert!(
        recovered.elapsed() >= std::time::Duration::from_secs(2),
        "slow start lasted {:?}",
        recovered.elapsed()
    );
    let mut client = gw.client(Proto::H2, "gw.test").await;
    let mut tags = Vec::new();
    for i in 0..20 {
        tags.push(ok_from(
            &client.get(&format!("/{i}")).await,
            &format!("GET {i}"),
        ));
    }
    assert!(count(&tags, "b") > 0, "b takes requests again: {tags:?}");
}

#[tokio::test]
async fn ejection_doubles_when_a_backend_fails_again() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    b.set_status(503);
    let gw = GatewayBuilder::new()
        .admin()
        .route(route("/").to(a.url()).to(b.url()).set(
            "outlier",
            r#"{ consecutive_failures = 3, ejection = "300ms" }"#,
        ))
        .start()
        .await;
    let b_url = b.url();
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let mut lasted = Vec::new();
    for round in 0..2 {
        // Send until a 503 of b's gets it ejected; note when that request went out.
        let mut sent = 0;
        let began = loop {
            assert!(sent < 60, "round {round}: b not ejected after 60 requests");
            let before = std::time::Instant::now();
            let got = client.get(&format!("/{round}/{sent}")).await;
            sent += 1;
            match (got.status.as_u16(), served_by(&got.headers).as_str()) {
                (200, "a") => continue,
                (503, "b") => {}
                (status, from) => panic!("round {round}: {status} from {from}"),
            }
            let view = backends(admin(&gw)).await;
            if view.backend("*/", &b_url).state == "ejected" {
                break before;
            }
        };
        backends_until(admin(&gw), "b's ejection to end", |v| {
            v.backend("*/", &b_url).state == "healthy"
        })
        .await;
        // The ejection began after `began`, so this is never shorter than the ejection.
        lasted.push(began.elapsed());
    }
    let ms = |d: std::time::Duration| d.as_millis();
    assert!(
        ms(lasted[0]) >= 300,
        "the first ejection lasts 300 ms: {lasted:?}"
    );
    assert!(
        ms(lasted[1]) >= 600,
        "the second ejection lasts twice as long: {lasted:?}"
    );
}

#[tokio::test]
async fn backend_answering_502_is_ejected() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    b.set_status(502);
    let gw = GatewayBuilder::new()
        .admin()
        .route(route("/").to(a.url()).to(b.url()))
        .start()
        .await;

    // b's 502s reach the client as b sent them (an answer is not retried), until the third in a
    // row ejects b.
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let mut statuses = Vec::new();
    while statuses.iter().filter(|s| **s == 502).count() < 3 {
        assert!(
            statuses.len() < 60,
            "b was picked fewer than 3 times in 60: {statuses:?}"
        );
        let got = client.get(&format!("/{}", statuses.len())).await;
        let from = served_by(&got.headers);
        match got.status.as_u16() {
            200 => assert_eq!(from, "a"),
            502 => assert_eq!(from, "b", "b's own 502"),
            other => panic!("GET {}: {other}: {}", statuses.len(), got.text()),
        }
        statuses.push(got.status.as_u16());
    }
    let b_url = b.url();
    backends_until(admin(&gw), "b to be ejected", |v| {
        v.backend("*/", &b_url).state == "ejected"
    })
    .await;

    let mut client = gw.client(Proto::H2, "gw.test").await;
    for i in 0..20 {
        let got = client.get(&format!("/after/{i}")).await;
        assert_eq!(ok_from(&got, &format!("GET {i} after the ejection")), "a");
    }
    assert_eq!(
        b.requests(),
        3,
        "b got nothing after its third 502: {statuses:?}"
    );
    assert_eq!(
        a.requests(),
        statuses.iter().filter(|s| **s == 200).count() + 20
    );
}

// ---------------------------------------------------------------------------------------------
// Retries

#[tokio::test]
async fn keepalive_race_is_retried_for_get_never_for_post() {
    for proto in Proto::ALL {
        let race = KeepAliveRace::start().await;
        let gw = GatewayBuilder::new()
            .route(route("/").to(race.url()))
            .start()
            .await;
        let mut client = gw.client(proto, "gw.test").await;

        // Every GET after the first finds a pooled connection the backend then closes on it:
        // the gateway tries again on a new connection, and the client never knows.
        let killed_get = |seen: &[RaceSeen]| seen.iter().any(|s| s.method == "GET" && !s.answered);
        let mut gets = 0;
        while gets < 2 || (!killed_get(&race.seen()) && gets < 6) {
            let got = client.get(&format!("/get/{gets}")).await;
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{proto} GET {gets}: {}",
                got.text()
            );
            gets += 1;
        }
        let seen = race.seen();
        assert!(
            killed_get(&seen),
            "{proto}: the gateway never reused a connection for a GET: {seen:?}"
        );
        let answered = seen
            .iter()
            .filter(|s| s.method == "GET" && s.answered)
            .count();
        assert_eq!(answered, gets, "{proto}: each GET answered once: {seen:?}");

        // A POST on a reused connection that the backend closes is not tried again: 502.
        let mut raced = false;
        for attempt in 0..5 {
            let before = race.seen().len();
            let req = client
                .request(Method::POST, &format!("/post/{attempt}"))
                .body(full("hello there"))
                .expect("valid request");
            let got = client.fetch(req).await;
            let new = race.seen()[before..].to_vec();
            match new.as_slice() {
                [s] if s.method == "POST" && !s.answered => {
                    assert_eq!(
                        got.status,
                        StatusCode::BAD_GATEWAY,
                        "{proto}: POST {attempt}: {}",
                        got.text()
                    );
                    assert_error_body(&got, "*/", &[race.addr], "502");
                    raced = true;
                    break;
                }
                // The connection was new (the pool had none idle): no race to lose.
                [s] if s.method == "POST" && s.answered => {
                    assert_eq!(got.status, StatusCode::OK, "{proto}: POST {attempt}");
                }
                other => panic!(
                    "{proto}: POST {attempt} reached the backend as {other:?}, answered {}",
                    got.status
                ),
            }
        }
        assert!(
            raced,
            "{proto}: no POST went out on a reused connection: {:?}",
            race.seen()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// /backends

#[tokio::test]
async fn backends_json_matches_reality() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let c = Tagged::start("c").await;
    let gw = GatewayBuilder::new()
        .admin()
        .route(
            route("/live")
                .to(a.url())
                .backend_with(b.url(), "weight = 3")
                .set("balance", "\"hash\"")
                .set("hash_key", "\"header:X-Pin\""),
        )
        .route(
            route("/")
                .host("api.gw.test")
                .to(c.url())
                .set("balance", "\"round_robin\""),
        )
        .start()
        .await;

    let idle = backends(admin(&gw)).await;
    assert_eq!(idle.routes.len(), 2, "{}", idle.text);
    let live = idle.route("*/live");
    assert_eq!(live.balance, "hash", "{}", idle.text);
    assert_eq!(live.backends.len(), 2, "{}", idle.text);
    for (t, weight) in [(&a, 1), (&b, 3)] {
        let v = idle.backend("*/live", &t.url());
        assert_eq!(v.address, t.addr.to_string(), "{}", idle.text);
        assert_eq!(
            (v.state.as_str(), v.open, v.weight),
            ("healthy", 0, weight),
            "{}",
            idle.text
        );
    }
    let api = idle.route("api.gw.test/");
    assert_eq!(api.balance, "round_robin", "{}", idle.text);
    assert_eq!(api.backends.len(), 1, "{}", idle.text);
    assert_eq!(api.backends[0].url, c.url());
    assert_eq!(api.backends[0].address, c.addr.to_string());

    // Keys that the hash sends to a and to b.
    let mut client = gw.client(Proto::H1, "gw.test").await;
    let (mut to_a, mut to_b) = (None, None);
    for i in 0..64 {
        let key = format!("k{i}");
        let got = client.get_with("/live", &[("x-pin", key.as_str())]).await;
        match ok_from(&got, &key).as_str() {
            "a" => to_a = to_a.or(Some(key)),
            _ => to_b = to_b.or(Some(key)),
        }
        if to_a.is_some() && to_b.is_some() {
            break;
        }
    }
    let (to_a, to_b) = (
        to_a.expect("a key for a in 64"),
        to_b.expect("a key for b in 64"),
    );
    let pin_a = [("x-pin", to_a.as_str())];
    let pin_b = [("x-pin", to_b.as_str())];

    // Two WebSockets on a (one per protocol); an event stream and a request in flight on b.
    let (mut ws1, _) = Ws::open(&gw, Proto::H1, "/live/ws", &pin_a).await;
    let (mut ws2, _) = Ws::open(&gw, Proto::H2, "/live/ws", &pin_a).await;
    assert_eq!((ws1.who().await, ws2.who().await), ("a".into(), "a".into()));
    let mut streams = Streams::new(&gw, Proto::H2);
    let stream = streams.open("/live/events", &pin_b).await;
    assert_eq!(stream.from, "b");
    let mut holder = gw.client(Proto::H1, "gw.test").await;
    let held = tokio::spawn(async move {
        holder
            .get_with("/live/hold", &[("x-pin", to_b.as_str())])
            .await
    });
    b.wait("the request to be held at b", |b| b.held() == 1)
        .await;

    let busy = backends(admin(&gw)).await;
    let (va, vb) = (
        busy.backend("*/live", &a.url()),
        busy.backend("*/live", &b.url()),
    );
    assert_eq!(
        (va.open, vb.open),
        (2, 2),
        "2 WebSockets on a; a stream and a request on b: {}",
        busy.text
    );
    assert_eq!(
        (va.state.as_str(), vb.state.as_str()),
        ("healthy", "healthy"),
        "{}",
        busy.text
    );
    assert_eq!(
        busy.route("api.gw.test/").backends[0].open,
        0,
        "{}",
        busy.text
    );

    b.release(1);
    let got = within("the held request", held).await.expect("no panic");
    assert_eq!(ok_from(&got, "the held request"), "b");
    let b_url = b.url();
    backends_until(admin(&gw), "b's finished request to leave the count", |v| {
        v.backend("*/live", &b_url).open == 1
    })
    .await;

    // Closed by the client (WebSockets) and by the backend (the stream).
    ws1.close().await;
    ws2.close().await;
    b.end_streams();
    let mut stream = stream;
    let (_, end) = stream.stream.finish().await;
    assert_eq!(end, Ok(()), "the stream ends cleanly");
    let (a_url, b_url) = (a.url(), b.url());
    backends_until(admin(&gw), "everything closed", |v| {
        v.backend("*/live", &a_url).open == 0 && v.backend("*/live", &b_url).open == 0
    })
    .await;
    assert_eq!((a.open_websockets(), b.upgrades(), a.upgrades()), (0, 0, 2));
}

// ---------------------------------------------------------------------------------------------
// The pool, reloads, DNS discovery and per-backend metrics

#[tokio::test]
async fn pool_reuses_one_kept_alive_connection_for_sequential_requests() {
    let a = Tagged::start("a").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(a.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        for _ in 0..20 {
            assert_eq!(ok_from(&client.get("/x").await, "GET /x"), "a");
        }
    }
    assert_eq!(a.requests(), 40);
    assert_eq!(
        a.connections(),
        1,
        "40 requests one after another, over h1 and h2, share one backend connection"
    );
}

/// The `/` route over `backends` with fast health checks.
fn checked_route(backends: &[&Tagged]) -> crate::support::gateway::Route {
    backends
        .iter()
        .fold(route("/").set("health", HEALTH_100MS), |r, b| r.to(b.url()))
}

#[tokio::test]
async fn reload_keeps_health_state_and_the_open_websockets_of_a_removed_backend() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    let c = Tagged::start("c").await;
    b.set_health(503);
    let gw = GatewayBuilder::new()
        .admin()
        .route(checked_route(&[&a, &b]))
        .start()
        .await;
    let (a_url, b_url, c_url) = (a.url(), b.url(), c.url());
    backends_until(admin(&gw), "b to fail its checks", |v| {
        v.backend("*/", &b_url).state == "unhealthy"
    })
    .await;
    let (mut ws, _) = Ws::open(&gw, Proto::H1, "/", &[]).await;
    assert_eq!(
        ws.who().await,
        "a",
        "b is unhealthy: the WebSocket goes to a"
    );

    // a leaves the route, c joins, b stays as it was.
    gw.reload(&[checked_route(&[&b, &c])])
        .await
        .expect("the new config is valid");
    let view = backends(admin(&gw)).await;
    assert_eq!(
        view.backend("*/", &b_url).state,
        "unhealthy",
        "b's health carries over the reload (a new backend would start healthy): {}",
        view.text
    );
    let leaving = view.backend("*/", &a_url);
    assert_eq!(
        (leaving.state.as_str(), leaving.open),
        ("draining", 1),
        "{}",
        view.text
    );
    assert_eq!(
        ws.who().await,
        "a",
        "the WebSocket on the removed backend goes on"
    );
    let mut client = gw.client(Proto::H1, "gw.test").await;
    for _ in 0..6 {
        assert_eq!(
            ok_from(&client.get("/").await, "after the reload"),
            "c",
            "new work: not the draining a, not the unhealthy b"
        );
    }
    assert_eq!(a.requests(), 0);
    assert_eq!(b.requests(), 0);

    ws.close().await;
    backends_until(admin(&gw), "a to be forgotten once empty", |v| {
        v.route("*/").backends.iter().all(|x| x.url != a_url)
    })
    .await;
    assert!(backends(admin(&gw)).await.backend("*/", &c_url).open == 0);
}

#[tokio::test]
async fn websocket_limit_holds_across_reloads() {
    let a = Tagged::start("a").await;
    let limited = |timeout: &str| {
        route("/")
            .to(a.url())
            .set("connect_timeout", &format!("{timeout:?}"))
            .set("websocket", "{ max_connections = 2 }")
    };
    let gw = GatewayBuilder::new()
        .admin()
        .route(limited("5s"))
        .start()
        .await;
    let (first, _) = Ws::open(&gw, Proto::H1, "/", &[]).await;
    let (mut second, _) = Ws::open(&gw, Proto::H1, "/", &[]).await;
    // Each reload changes the route (so it is rebuilt) but not its limit.
    for timeout in ["4s", "3s", "2s"] {
        gw.reload(&[limited(timeout)]).await.expect("valid config");
        assert_eq!(
            ws::refused_status(&gw, ws::request("/")).await,
            503,
            "after a reload to connect_timeout {timeout}, two are still open of two"
        );
    }
    assert_eq!(
        a.upgrades(),
        2,
        "the refused ones never reached the backend"
    );
    first.close().await;
    a.wait("the first WebSocket to end", |a| a.open_websockets() == 1)
        .await;
    let (mut third, _) = Ws::open(&gw, Proto::H1, "/", &[]).await;
    assert_eq!(third.who().await, "a");
    assert_eq!(second.who().await, "a");
}

#[tokio::test]
async fn dns_discovery_adds_and_drains_addresses() {
    let ips: [IpAddr; 2] = [
        Ipv4Addr::new(127, 0, 0, 2).into(),
        Ipv4Addr::new(127, 0, 0, 3).into(),
    ];
    let tagged = Tagged::start_on_each(&["two", "three"], &ips).await;
    let port = tagged[0].addr.port();
    let (two, three) = (
        SocketAddr::new(ips[0], port).to_string(),
        SocketAddr::new(ips[1], port).to_string(),
    );
    let dns = crate::support::dns::DnsServer::start().await;
    dns.set("app.gw.test", &ips[..1], 1);
    let gw = GatewayBuilder::new()
        .admin()
        .toml(&format!(
            "[resolver]\nnameservers = [\"{}\"]\nrefresh = \"1s\"",
            dns.addr()
        ))
        .route(route("/").backend_with(format!("http://app.gw.test:{port}"), "discover = \"dns\""))
        .start()
        .await;
    backends_until(admin(&gw), "the name's address to join", |v| {
        v.at("*/", &two).is_some_and(|b| b.state == "healthy")
    })
    .await;
    let mut client = gw.client(Proto::H2, "gw.test").await;
    assert_eq!(ok_from(&client.get("/").await, "one address"), "two");
    let (mut on_two, _) = Ws::open(&gw, Proto::H1, "/", &[]).await;
    assert_eq!(on_two.who().await, "two");

    // Scale out: a second address joins and, holding nothing, gets the next WebSocket.
    dns.set("app.gw.test", &ips, 1);
    let view = backends_until(admin(&gw), "the second address to join", |v| {
        v.at("*/", &three).is_some()
    })
    .await;
    assert_eq!(
        view.route("*/").backends.len(),
        2,
        "one backend per address: {}",
        view.text
    );
    let (mut on_three, _) = Ws::open(&gw, Proto::H1, "/", &[]).await;
    assert_eq!(
        on_three.who().await,
        "three",
        "least_conn: the new address is emptier"
    );

    // The first address disappears: it drains, keeping its WebSocket; new work goes to three.
    dns.set("app.gw.test", &ips[1..], 1);
    backends_until(admin(&gw), "the first address to drain", |v| {
        v.at("*/", &two)
            .is_some_and(|b| b.state == "draining" && b.open == 1)
    })
    .await;
    let before = tagged[0].requests();
    for _ in 0..6 {
        assert_eq!(ok_from(&client.get("/").await, "after scale-in"), "three");
    }
    assert_eq!(tagged[0].requests(), before, "nothing new reaches two");
    assert_eq!(
        on_two.who().await,
        "two",
        "its open WebSocket goes on while it drains"
    );
    on_two.close().await;
    backends_until(admin(&gw), "the drained address to be forgotten", |v| {
        v.at("*/", &two).is_none()
    })
    .await;
    assert_eq!(on_three.who().await, "three");
}

#[tokio::test]
async fn backend_metrics_follow_the_fleet() {
    let a = Tagged::start("a").await;
    let b = Tagged::start("b").await;
    b.set_status(502);
    let gw = GatewayBuilder::new()
        .admin()
        .route(route("/").to(a.url()).to(b.url()).set("retries", "0"))
        .start()
        .await;
    let b_url = b.url();
    let mut client = gw.client(Proto::H1, "gw.test").await;
    while b.requests() < 3 {
        client.get("/").await;
    }
    backends_until(admin(&gw), "b to be ejected", |v| {
        v.backend("*/", &b_url).state == "ejected"
    })
    .await;
    let (mut ws, _) = Ws::open(&gw, Proto::H1, "/", &[]).await;
    assert_eq!(ws.who().await, "a");

    let mut admin_client = Client::plain(Proto::H1, admin(&gw), "admin").await;
    let text = admin_client.get("/metrics").await.text();
    let (pa, pb) = (a.addr.to_string(), b.addr.to_string());
    for want in [
        format!("streamgate_backend_open{{route=\"*/\",backend=\"{pa}\"}} 1"),
        format!("streamgate_backend_open{{route=\"*/\",backend=\"{pb}\"}} 0"),
        format!("streamgate_backend_up{{route=\"*/\",backend=\"{pa}\"}} 1"),
        format!("streamgate_backend_up{{route=\"*/\",backend=\"{pb}\"}} 0"),
        format!("streamgate_backend_ejections_total{{route=\"*/\",backend=\"{pb}\"}} 1"),
        format!(
            "streamgate_backend_requests_total{{route=\"*/\",backend=\"{pb}\",code_class=\"5xx\"}} 3"
        ),
    ] {
        assert!(text.contains(&want), "/metrics lacks {want}:\n{text}");
    }
    ws.close().await;
}
