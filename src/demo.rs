//! The built-in demo: backends that run inside the process, a config that routes to them, a
//! self-signed certificate made at start-up, and a page at `/` that exercises each route.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

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
        tokio::spawn(serve_backend(backend));

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
backends = ["http://{backend_addr}"]
[route.sse]
heartbeat = "15s"
shutdown_retry = "2s"

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

async fn serve_backend(listener: TcpListener) {
    let mut errors = crate::listener::AcceptErrors::new("demo backend");
    loop {
        let (tcp, _) = errors.accept(&listener).await;
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), service_fn(backend))
                .await;
        });
    }
}

async fn backend(req: Request<Incoming>) -> Result<Response<DemoBody>, Infallible> {
    let path = req.uri().path().to_string();
    let response = if path == "/events" {
        events(&req)
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

/// An event stream: a counter with `id:` lines, one event a second, resuming after the
/// `Last-Event-ID` a reconnecting EventSource sends.
fn events(req: &Request<Incoming>) -> http::Result<Response<DemoBody>> {
    let next = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(1, |id| id + 1);
    let ticks = Counter {
        next,
        interval: tokio::time::interval(std::time::Duration::from_secs(1)),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(ticks.boxed_unsync())
}

struct Counter {
    next: u64,
    interval: tokio::time::Interval,
}

impl http_body::Body for Counter {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::ready!(self.interval.poll_tick(cx));
        let n = self.next;
        self.next += 1;
        let event = format!("id: {n}\nevent: tick\ndata: {{\"count\": {n}}}\n\n");
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(event)))))
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

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>streamgate demo</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
pre { background: #f4f4f4; padding: .75rem; overflow: auto; min-height: 3rem; max-height: 12rem; }
h2 { margin-top: 2rem; }
</style>
</head>
<body>
<h1>streamgate demo</h1>
<p>This page came through streamgate: TLS ended at the gateway, and the request went on as plain
HTTP to a backend inside the same process. Each section below uses one route.</p>

<h2>HTTP echo: <code>/echo</code></h2>
<p>What the backend received for a request from this page: note the <code>x-forwarded-*</code>
headers the gateway added.</p>
<button id="echo-send">Send a request</button>
<pre id="echo-out">…</pre>

<h2>WebSocket echo: <code>/ws</code></h2>
<p>A WebSocket through the gateway (WSS here, plain WS to the backend). Type and send: the
backend echoes each message.</p>
<form id="ws-form"><input id="ws-text" value="hello over wss" size="40"> <button>Send</button></form>
<pre id="ws-out">connecting…</pre>

<h2>Server-Sent Events: <code>/events</code></h2>
<p>An event stream through the gateway, each event delivered as the backend writes it, with
<code>id:</code> lines so a reconnecting EventSource resumes where it left off.</p>
<pre id="sse-out">connecting…</pre>

<script>
const sseOut = document.getElementById('sse-out');
const source = new EventSource('/events');
const sseLines = [];
function sseShow(line) {
  sseLines.unshift(line);
  sseLines.length = Math.min(sseLines.length, 5);
  sseOut.textContent = sseLines.join('\n');
}
source.addEventListener('tick', (e) => sseShow('event id ' + e.lastEventId + ': ' + e.data));
source.onerror = () => sseShow('reconnecting… (EventSource sends Last-Event-ID)');

const wsOut = document.getElementById('ws-out');
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
ws.onopen = () => { wsOut.textContent = 'open\n'; ws.send('hello from the demo page'); };
ws.onmessage = (e) => { wsOut.textContent += 'echo: ' + e.data + '\n'; };
ws.onclose = (e) => { wsOut.textContent += 'closed ' + e.code + ' ' + e.reason + '\n'; };
document.getElementById('ws-form').onsubmit = (e) => {
  e.preventDefault();
  if (ws.readyState === WebSocket.OPEN) ws.send(document.getElementById('ws-text').value);
};

async function echo() {
  const out = document.getElementById('echo-out');
  try {
    const r = await fetch('/echo/hello?from=demo', { method: 'POST', body: 'hello from the demo page' });
    out.textContent = r.status + ' ' + r.statusText + '\n\n' + await r.text();
  } catch (e) { out.textContent = 'failed: ' + e; }
}
document.getElementById('echo-send').onclick = echo;
echo();
</script>
</body>
</html>
"#;
