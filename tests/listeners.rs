//! What the listeners do besides proxying: the plain listener (redirect or proxy), requests
//! the TLS listener refuses (absolute-form targets naming another host, CONNECT, oversized
//! heads), and graceful shutdown with a request in flight.

use http::{Method, StatusCode};

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
