//! The built-in demo: backends that run inside the process, a config that routes to them, a
//! self-signed certificate made at start-up, and a page at `/` that exercises each route.
//!
//! Layout: this file holds the config and the plain backend (the page, the HTTP and WebSocket
//! echoes, the kill control); [`events`] the two event backends that the page's stream moves
//! between; `page.html` the page.

mod events;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use self::events::EventBackend;
use crate::config::Config;
use crate::tls::{self, LoadedCert};
use crate::Listeners;

/// A demo ready to [`crate::serve`].
pub struct Demo {
    pub config: Config,
    pub certs: Vec<LoadedCert>,
    pub listeners: Listeners,
    /// SHA-256 of the self-signed certificate, colon-separated hex, to compare with a browser's.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo backend")]
    Backend(#[from] std::io::Error),
    #[error(transparent)]
    Bind(#[from] crate::BindError),
    #[error("demo certificate")]
    Tls(#[from] tls::TlsError),
    #[error("demo config")]
    Config(#[from] crate::config::ConfigError),
}

impl Demo {
    /// Starts the demo backends on loopback and binds the gateway's listener on `listen`.
    pub async fn start(listen: SocketAddr) -> Result<Demo, DemoError> {
        let backend = TcpListener::bind("127.0.0.1:0").await?;
        let backend_addr = backend.local_addr()?;
        let events: EventBackends = Arc::new([
            EventBackend::start("events-a").await?,
            EventBackend::start("events-b").await?,
        ]);
        let (events_a, events_b) = (events[0].addr, events[1].addr);
        tokio::spawn(serve_backend(backend, events));

        let text = format!(
            r#"
[listen]
https = "{listen}"

[[cert]]
cert = "(in memory)"
key = "(in memory)"

[[route]]
path = "/echo"
backends = ["http://{backend_addr}"]

[[route]]
path = "/events"
backends = ["http://{events_a}", "http://{events_b}"]
[route.sse]
heartbeat = "15s"
shutdown_retry = "2s"
resume = true

[[route]]
path = "/ws"
backends = ["http://{backend_addr}"]
[route.websocket]
ping_interval = "30s"

[[route]]
path = "/"
backends = ["http://{backend_addr}"]
"#
        );
        let config = Config::parse(Path::new("(demo)"), &text)?;
        let (cert, fingerprint) = tls::self_signed(&["localhost", "127.0.0.1"])?;
        let listeners = Listeners::bind(&config.listen).await?;
        Ok(Demo {
            config,
            certs: vec![cert],
            listeners,
            fingerprint,
        })
    }
}

/// The event backends behind `/events`, which the page's kill button reaches.
type EventBackends = Arc<[Arc<EventBackend>; 2]>;

/// The plain backend, behind every route but `/events`.
async fn serve_backend(listener: TcpListener, events: EventBackends) {
    let mut errors = crate::listener::AcceptErrors::new("demo backend");
    loop {
        let (tcp, _) = errors.accept(&listener).await;
        let events = Arc::clone(&events);
        tokio::spawn(async move {
            let service = service_fn(move |req| backend(req, Arc::clone(&events)));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn backend(
    req: Request<Incoming>,
    events: EventBackends,
) -> Result<Response<DemoBody>, Infallible> {
    let path = req.uri().path().to_string();
    let response = if path == "/demo/kill-event-backend" {
        kill_event_backend(&req, &events)
    } else if path == "/ws" {
        websocket_echo(req)
    } else if path == "/echo" || path.starts_with("/echo/") {
        echo(req).await
    } else if path == "/" {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(full(Bytes::from_static(PAGE.as_bytes())))
    } else {
        Response::builder()
            .status(404)
            .body(full(Bytes::from_static(b"demo backend: not found\n")))
    };
    Ok(response.unwrap_or_else(|_| Response::new(full(Bytes::new()))))
}

type DemoBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn full(bytes: Bytes) -> DemoBody {
    Full::new(bytes).boxed_unsync()
}

/// `POST /demo/kill-event-backend[?backend=NAME]`: kills the named event backend (the one the
/// page's stream is on), or the first one up, and has it restart a few seconds later. It can
/// only reach the two event backends of this process.
fn kill_event_backend(
    req: &Request<Incoming>,
    events: &EventBackends,
) -> http::Result<Response<DemoBody>> {
    let text = |status: u16, text: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full(Bytes::from(text)))
    };
    if req.method() != http::Method::POST {
        return text(405, "demo backend: POST to kill an event backend\n".into());
    }
    let wanted = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("backend=")));
    let target = match wanted {
        Some(name) => events.iter().find(|b| b.name == name),
        None => events.iter().find(|b| b.is_up()),
    };
    let Some(target) = target else {
        return text(404, "demo backend: no such event backend\n".into());
    };
    let secs = events::RESTART_AFTER.as_secs();
    if let Some(down) = events.iter().find(|b| b.name != target.name && !b.is_up()) {
        // With both down the stream has nowhere to go: it would end, and EventSource reconnect.
        return text(
            409,
            format!(
                "{} is still down (it restarts within {secs}s): killing {} now would leave the stream no backend\n",
                down.name, target.name
            ),
        );
    }
    match target.kill() {
        Ok(cut) => text(
            200,
            format!(
                "killed {}: {cut} open event stream{} cut off without an end; back on {} in {secs}s\n",
                target.name,
                if cut == 1 { "" } else { "s" },
                target.addr
            ),
        ),
        Err(events::AlreadyDown) => text(
            409,
            format!("{} is down already; it restarts within {secs}s\n", target.name),
        ),
    }
}

/// A WebSocket echo: every text or binary message comes back as it was sent.
fn websocket_echo(mut req: Request<Incoming>) -> http::Result<Response<DemoBody>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role};

    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return Response::builder()
            .status(400)
            .body(full(Bytes::from_static(b"demo backend: WebSocket only\n")));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(101)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(full(Bytes::new()))
}

/// Answers with the request as the backend saw it: what the gateway forwarded.
async fn echo(req: Request<Incoming>) -> http::Result<Response<DemoBody>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut text = format!("{} {} {:?}\n", parts.method, parts.uri, parts.version);
    for (name, value) in &parts.headers {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push_str(&format!("\n{} body bytes\n", body.len()));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(Bytes::from(text)))
}

/// The demo page: one section per route.
const PAGE: &str = include_str!("page.html");
