//! Operations: live reload under load, a refused reload, certificate rotation, the SIGTERM
//! drain, `/metrics` as strict OpenMetrics whose gauges follow the connections held, and the
//! `health` command. The heavy reload test runs in-process; the rest drive the real binary.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::support::body::BoxError;
use crate::support::client::tls_connect;
use crate::support::pki::TestCa;
use crate::support::process::{connect, http_get, GatewayFiles, GatewayProcess, HOST};
use crate::support::{empty, within, Backend, Client, Held, Proto};

// ---------------------------------------------------------------------------------------------
// Peers

/// A WebSocket backend that answers each text message with `TAG:message`, so a client can tell
/// which backend it is talking to. Stops accepting when dropped.
struct TaggedEcho {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl TaggedEcho {
    async fn start(tag: &'static str) -> TaggedEcho {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    // A Close is answered by tungstenite as the loop reads on.
                    while let Some(Ok(msg)) = ws.next().await {
                        if let Message::Text(text) = msg {
                            let reply = Message::text(format!("{tag}:{}", text.as_str()));
                            if ws.send(reply).await.is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        TaggedEcho { addr, accept }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TaggedEcho {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// An event-stream backend: every response it opens gets each number the test publishes, as
/// `id: N` / `data: TAG N`, so a client can check its events are gap-free and whose they are.
struct EventFeed {
    backend: Backend,
    feed: broadcast::Sender<u64>,
}

impl EventFeed {
    async fn start(tag: &'static str) -> EventFeed {
        let (feed, _) = broadcast::channel::<u64>(1024);
        let subscribe = feed.clone();
        let backend = Backend::start(move |_req| {
            // Subscribed before the response head goes out: a client that has the head gets
            // every event published after it.
            let events = subscribe.subscribe();
            let stream = futures_util::stream::unfold(events, move |mut events| async move {
                // A lagging or closed feed ends the body, which the client sees as a gap.
                let n = events.recv().await.ok()?;
                let event = Bytes::from(format!("id: {n}\ndata: {tag} {n}\n\n"));
                Some((Ok::<_, BoxError>(Frame::data(event)), events))
            });
            let body = BodyExt::boxed(http_body_util::StreamBody::new(stream));
            let response = Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(body)
                .expect("valid response");
            async move { response }
        })
        .await;
        EventFeed { backend, feed }
    }

    fn publish(&self, n: u64) {
        // No open stream is no error: the count checks happen at the clients.
        let _ = self.feed.send(n);
    }

    fn url(&self) -> String {
        self.backend.url()
    }
}

/// One set of backends (WebSocket, event stream, plain HTTP) answering as `tag`.
struct Side {
    ws: TaggedEcho,
    events: EventFeed,
    http: Backend,
}

impl Side {
    async fn start(tag: &'static str) -> Side {
        Side {
            ws: TaggedEcho::start(tag).await,
            events: EventFeed::start(tag).await,
            http: Backend::echo(tag).await,
        }
    }

    /// `/ws`, `/events` and `/new` on any host, all to this side.
    fn routes(&self) -> String {
        format!(
            "[[route]]\npath = \"/ws\"\nbackends = [\"{}\"]\n\
             [[route]]\npath = \"/events\"\nbackends = [\"{}\"]\n\
             [[route]]\npath = \"/new\"\nbackends = [\"{}\"]\n",
            self.ws.url(),
            self.events.url(),
            self.http.url()
        )
    }
}

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A WebSocket to `path` over a new TLS connection (HTTP/1.1 upgrade).
async fn ws_connect(addr: SocketAddr, ca: &TestCa, path: &str) -> Ws {
    let tls = tls_connect(addr, ca, Some(HOST), &[b"http/1.1"], true).await;
    let request = format!("wss://{HOST}{path}")
        .into_client_request()
        .expect("valid WebSocket URL");
    let (ws, response) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    .unwrap_or_else(|e| panic!("WebSocket handshake to {path} failed: {e}"));
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Sends `text` and returns the text that comes back.
async fn ws_round_trip(ws: &mut Ws, text: &str) -> String {
    within(
        "a WebSocket message to go out",
        ws.send(Message::text(text)),
    )
    .await
    .unwrap_or_else(|e| panic!("sending {text:?} failed: {e}"));
    match within("a WebSocket reply", ws.next()).await {
        Some(Ok(Message::Text(reply))) => reply.as_str().to_string(),
        other => panic!("expected a reply to {text:?}, got {other:?}"),
    }
}

/// Reads until the WebSocket ends; returns the Close frames' codes seen on the way. Data
/// messages fail the test.
async fn ws_until_end(ws: &mut Ws) -> Vec<u16> {
    let mut codes = Vec::new();
    within("the WebSocket to end", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    codes.push(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return,
                // After a Close, the peer may reset the connection rather than wait for ours.
                Some(Err(_)) if !codes.is_empty() => return,
                Some(other) => panic!("expected the WebSocket to close, got {other:?}"),
            }
        }
    })
    .await;
    codes
}

/// Closes a WebSocket from the client and waits for the close handshake to finish.
async fn ws_close(mut ws: Ws) {
    within("a Close to go out", ws.close(None))
        .await
        .expect("the WebSocket is open");
    let codes = ws_until_end(&mut ws).await;
    assert_eq!(
        codes.len(),
        1,
        "the backend answers the Close through the gateway"
    );
}

/// One block of an event stream (up to a blank line): the fields the tests look at.
#[derive(Debug, Default)]
struct Block {
    id: Option<String>,
    data: Option<String>,
    retry: Option<u64>,
}

/// The client's side of an event stream: blocks as they arrive, and how the stream ended.
struct EventReader {
    body: Incoming,
    buf: Vec<u8>,
}

impl EventReader {
    fn new(response: Response<Incoming>) -> EventReader {
        assert_eq!(response.status(), StatusCode::OK, "event stream status");
        let content_type = response.headers().get(header::CONTENT_TYPE);
        assert_eq!(
            content_type.and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        EventReader {
            body: response.into_body(),
            buf: Vec::new(),
        }
    }

    /// Opens `/events` on `client` (a new stream on an HTTP/2 connection).
    async fn open(client: &mut Client) -> EventReader {
        let req = client
            .request(Method::GET, "/events")
            .body(empty())
            .expect("valid request");
        EventReader::new(client.send(req).await)
    }

    /// The next block; `Ok(None)` when the stream ended cleanly at a block boundary.
    async fn next_block(&mut self) -> Result<Option<Block>, String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Ok(Some(parse_block(&block)));
            }
            match within("event-stream bytes", self.body.frame()).await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(format!("the stream failed: {e}")),
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    let rest = String::from_utf8_lossy(&self.buf);
                    return Err(format!("the stream ended inside an event: {rest:?}"));
                }
            }
        }
    }

    /// The next block with data; fails the test if the stream ends or fails first.
    async fn event(&mut self) -> Block {
        loop {
            match self.next_block().await {
                Ok(Some(block)) if block.data.is_some() => return block,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the event stream ended while an event was expected"),
                Err(e) => panic!("{e}"),
            }
        }
    }
}

fn parse_block(block: &[u8]) -> Block {
    let text = std::str::from_utf8(block).expect("events are UTF-8");
    let mut out = Block::default();
    for line in text.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => out.id = Some(value.to_string()),
            "data" => out.data = Some(value.to_string()),
            "retry" => out.retry = Some(value.parse().expect("retry is a number")),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The gateway in this process

const IN_PROCESS_LISTEN: &str = "https = \"127.0.0.1:0\"";

/// `streamgate::Server` with its admin listener, on 127.0.0.1:0, its config in a real file so
/// [`InProcess::reload`] reads it as SIGHUP would. Shuts down when dropped.
struct InProcess {
    files: GatewayFiles,
    https: SocketAddr,
    admin: SocketAddr,
    reloader: Arc<streamgate::reload::Reloader>,
    _stop: oneshot::Sender<()>,
}

impl InProcess {
    async fn start(body: &str) -> InProcess {
        let files = GatewayFiles::new();
        files.write(IN_PROCESS_LISTEN, body);
        let config = streamgate::config::Config::load(files.config())
            .unwrap_or_else(|e| panic!("test config is invalid: {e}"));
        let certs = streamgate::tls::load_certs(&config.certs).expect("load test certificates");
        let https = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let (https_addr, admin_addr) = (
            https.local_addr().expect("address"),
            admin.local_addr().expect("address"),
        );
        let listeners = streamgate::Listeners { https, http: None };
        let server = streamgate::Server::new(config, &certs, listeners)
            .expect("server starts")
            .with_admin(admin);
        let reloader = server.reloader();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        InProcess {
            files,
            https: https_addr,
            admin: admin_addr,
            reloader,
            _stop: stop,
        }
    }

    fn rewrite(&self, body: &str) {
        self.files.write(IN_PROCESS_LISTEN, body);
    }

    /// What SIGHUP does: read the file again and put it in force if it is valid.
    async fn reload(&self) -> Result<(), String> {
        let reloader = self.reloader.clone();
        tokio::task::spawn_blocking(move || reloader.reload().map_err(|e| e.to_string()))
            .await
            .expect("reload does not panic")
    }

    async fn client(&self, proto: Proto) -> Client {
        connect(self.https, &self.files.ca, proto).await
    }

    async fn metrics(&self) -> Exposition {
        metrics_at(self.admin).await
    }
}

/// Fetches `/metrics` from the admin listener at `admin` and parses it strictly.
async fn metrics_at(admin: SocketAddr) -> Exposition {
    let (status, text) = within("/metrics", http_get(admin, "/metrics"))
        .await
        .expect("admin listener answers");
    assert_eq!(status, 200, "/metrics status");
    parse_exposition(&text)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics: {e}\n{text}"))
}

/// A sample and the value it should have: name, labels, value.
type Want<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Polls `/metrics` until every `(name, labels, value)` in `want` holds; fails the test with
/// the last exposition if they do not within the patience.
async fn metrics_reach(admin: SocketAddr, want: &[Want<'_>]) -> Exposition {
    let mut last = None;
    let reached = tokio::time::timeout(crate::support::PATIENCE, async {
        loop {
            let m = metrics_at(admin).await;
            if want
                .iter()
                .all(|(name, labels, v)| m.get(name, labels) == Some(*v))
            {
                return m;
            }
            last = Some(m);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    reached.unwrap_or_else(|_| {
        let got: Vec<_> = want
            .iter()
            .map(|(name, labels, v)| {
                let now = last.as_ref().and_then(|m| m.get(name, labels));
                format!("{name}{labels:?}: want {v}, got {now:?}")
            })
            .collect();
        panic!("metrics did not reach their values:\n{}", got.join("\n"))
    })
}

/// Waits until every counter in `progress` is at least `at_least(i)`.
async fn all_reach(what: &str, progress: &[Arc<AtomicU64>], at_least: impl Fn(usize) -> u64) {
    within(what, async {
        while !progress
            .iter()
            .enumerate()
            .all(|(i, p)| p.load(Ordering::SeqCst) >= at_least(i))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// OpenMetrics text, parsed strictly

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

#[derive(Debug)]
struct Exposition {
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` with exactly `labels` (in any order).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
    }
}

/// Parses the OpenMetrics text format: `# TYPE`/`# HELP`/`# UNIT` lines, samples
/// `name{label="value",...} value [timestamp]` grouped under their family with the suffixes
/// its type allows, no duplicates, histograms whose buckets add up, and `# EOF` at the end.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .ok_or("the exposition does not end with \"# EOF\"")?;
    if !(body.is_empty() || body.ends_with('\n')) || body.contains('\r') {
        return Err("lines must end with a single \\n".into());
    }
    let mut families: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    let mut samples: Vec<Sample> = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in body.lines().enumerate() {
        let at = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, arg) = (parts.next(), parts.next(), parts.next());
            let name = name
                .filter(|n| valid_metric_name(n))
                .ok_or_else(|| at("bad metadata"))?;
            if current.as_deref() != Some(name) {
                if families.contains_key(name) {
                    return Err(at("metadata for a family that already ended"));
                }
                families.insert(name.to_string(), "unknown".into());
                current = Some(name.to_string());
            }
            match (kind, arg) {
                (Some("TYPE"), Some(t)) => {
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "stateset",
                        "info",
                        "summary",
                        "unknown",
                    ];
                    if !known.contains(&t) {
                        return Err(at("unknown type"));
                    }
                    families.insert(name.to_string(), t.to_string());
                }
                (Some("HELP"), Some(_)) | (Some("UNIT"), Some(_)) => {}
                _ => return Err(at("malformed metadata line")),
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(at("not a sample and not a metadata line"));
        }
        let sample = parse_sample(line).map_err(|e| at(&e))?;
        let family = current
            .as_deref()
            .ok_or_else(|| at("sample before any metadata"))?;
        let suffix = sample
            .name
            .strip_prefix(family)
            .ok_or_else(|| at("sample outside its family"))?;
        let allowed: &[&str] = match families[family].as_str() {
            "counter" => &["_total", "_created"],
            "histogram" | "gaugehistogram" => {
                &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"]
            }
            "summary" => &["", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        if !allowed.contains(&suffix) {
            return Err(at("suffix not allowed for the family's type"));
        }
        if suffix == "_bucket" && !sample.labels.iter().any(|(k, _)| k == "le") {
            return Err(at("bucket without le"));
        }
        let mut key = sample.labels.clone();
        key.sort();
        if !seen.insert((sample.name.clone(), key)) {
            return Err(at("duplicate sample"));
        }
        samples.push(sample);
    }
    check_histograms(&samples)?;
    Ok(Exposition { samples })
}

/// Buckets never decrease with `le`, and the `+Inf` bucket equals `_count`.
fn check_histograms(samples: &[Sample]) -> Result<(), String> {
    // (family, labels without le) -> [(le, cumulative count)], in exposition order.
    type Labels = Vec<(String, String)>;
    let mut series: HashMap<(String, Labels), Vec<(f64, f64)>> = HashMap::new();
    for s in samples {
        let Some(base) = s.name.strip_suffix("_bucket") else {
            continue;
        };
        let mut rest: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        rest.sort();
        let le = s
            .labels
            .iter()
            .find(|(k, _)| k == "le")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let le = parse_value(le).ok_or_else(|| format!("{}: le {le:?} is not a number", s.name))?;
        series
            .entry((base.to_string(), rest))
            .or_default()
            .push((le, s.value));
    }
    for ((base, labels), buckets) in series {
        let mut last = 0.0;
        for &(_, count) in &buckets {
            if count < last {
                return Err(format!("{base}{labels:?}: buckets decrease"));
            }
            last = count;
        }
        if buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
            return Err(format!(
                "{base}{labels:?}: the last bucket is not le=\"+Inf\""
            ));
        }
        let count = samples.iter().find(|s| {
            let mut l = s.labels.clone();
            l.sort();
            s.name == format!("{base}_count") && l == labels
        });
        if count.map(|c| c.value) != Some(last) {
            return Err(format!(
                "{base}{labels:?}: _count differs from the +Inf bucket"
            ));
        }
    }
    Ok(())
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample value: a decimal or exponent number, `+Inf`, `-Inf` or `NaN`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => return Some(f64::INFINITY),
        "-Inf" => return Some(f64::NEG_INFINITY),
        "NaN" => return Some(f64::NAN),
        _ => {}
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match digits.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (digits, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let ok = !(int.is_empty() && frac.is_empty())
        && all_digits(int)
        && all_digits(frac)
        && exponent.is_none_or(|e| !e.is_empty() && all_digits(e));
    if ok {
        s.parse().ok()
    } else {
        None
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            let eq = rest.find('=').ok_or("label without =")?;
            let label = &rest[..eq];
            if !valid_label_name(label) || labels.iter().any(|(k, _): &(String, String)| k == label)
            {
                return Err(format!("bad or repeated label name {label:?}"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value is not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("bad escape in a label value".into()),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            labels.push((label.to_string(), value));
            rest = &rest[close + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            } else {
                return Err("expected , or } after a label".into());
            }
        }
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected one space before the value")?;
    let mut fields = rest.split(' ');
    let value = fields.next().and_then(parse_value).ok_or("bad value")?;
    if let Some(timestamp) = fields.next() {
        parse_value(timestamp).ok_or("bad timestamp")?;
    }
    if fields.next().is_some() {
        return Err("unexpected text after the value".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn metrics_parser_accepts_openmetrics_and_rejects_malformed_lines() {
    let good = "# HELP g A gauge.\n# TYPE g gauge\ng{route=\"*/ws\",x=\"a\\\"b\"} 3\n\
                # TYPE c counter\nc_total 1.5e3\n\
                # TYPE h histogram\nh_sum 0.5\nh_count 2\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\n# EOF\n";
    let m = parse_exposition(good).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.get("g", &[("x", "a\"b"), ("route", "*/ws")]), Some(3.0));
    assert_eq!(m.get("c_total", &[]), Some(1500.0));
    assert_eq!(
        m.get("g", &[("route", "*/ws")]),
        None,
        "labels must match exactly"
    );

    let bad = [
        ("# TYPE g gauge\ng 1\n", "no # EOF"),
        ("# TYPE g gauge\ng 1\n# EOF\nx 1\n", "text after # EOF"),
        ("g 1\n# EOF\n", "a sample without metadata"),
        ("# TYPE g gauge\ng  1\n# EOF\n", "two spaces"),
        ("# TYPE g gauge\ng one\n# EOF\n", "not a number"),
        (
            "# TYPE g gauge\ng{a=b} 1\n# EOF\n",
            "an unquoted label value",
        ),
        (
            "# TYPE g gauge\ng{a=\"b\"c} 1\n# EOF\n",
            "junk after a label",
        ),
        ("# TYPE g gauge\ng{1a=\"b\"} 1\n# EOF\n", "a bad label name"),
        ("# TYPE g gauge\ng 1\ng 2\n# EOF\n", "a duplicate sample"),
        (
            "# TYPE c counter\nc 1\n# EOF\n",
            "a counter sample without _total",
        ),
        ("# TYPE g wibble\n# EOF\n", "an unknown type"),
        ("# TYPE g gauge\ng 1 # {a=\"b\"} 1\n# EOF\n", "an exemplar"),
        (
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n# EOF\n",
            "a wrong _count",
        ),
        ("# TYPE g gauge\n\ng 1\n# EOF\n", "an empty line"),
    ];
    for (text, what) in bad {
        assert!(parse_exposition(text).is_err(), "accepted {what}: {text:?}");
    }
}

/// 200 WebSockets and 200 event streams are busy while a reload moves every route to other
/// backends: none drops or skips a message, each keeps the backend it started with, and new
/// requests, WebSockets and streams go to the new backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_amid_200_websockets_and_200_streams_drops_nothing_and_reroutes_new_requests() {
    const WEBSOCKETS: usize = 200;
    const H1_STREAMS: usize = 100;
    const H2_CONNS: usize = 10;
    const STREAMS_PER_H2: usize = 10;
    const STREAMS: usize = H1_STREAMS + H2_CONNS * STREAMS_PER_H2;
    const EVENTS: u64 = 8;

    let a = Side::start("A").await;
    let b = Side::start("B").await;
    let gw = Arc::new(InProcess::start(&a.routes()).await);

    // Every WebSocket sends numbered messages and checks each echo, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ws_progress: Vec<Arc<AtomicU64>> = (0..WEBSOCKETS).map(|_| Arc::default()).collect();
    let mut chatters = Vec::new();
    for (id, progress) in ws_progress.iter().enumerate() {
        let (gw, progress, stop) = (gw.clone(), progress.clone(), stop.clone());
        chatters.push(tokio::spawn(async move {
            let mut ws = ws_connect(gw.https, &gw.files.ca, "/ws").await;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let text = format!("ws{id}-{n}");
                let reply = ws_round_trip(&mut ws, &text).await;
                assert_eq!(
                    reply,
                    format!("A:{text}"),
                    "WebSocket {id} lost or misrouted a message"
                );
                progress.store(n, Ordering::SeqCst);
            }
            ws_close(ws).await;
            n
        }));
    }

    // Event streams: 100 over HTTP/1.1, 100 as 10 streams on each of 10 HTTP/2 connections.
    let mut opening = Vec::new();
    for i in 0..H1_STREAMS + H2_CONNS {
        let gw = gw.clone();
        opening.push(tokio::spawn(async move {
            let (proto, count) = if i < H1_STREAMS {
                (Proto::H1, 1)
            } else {
                (Proto::H2, STREAMS_PER_H2)
            };
            let mut client = gw.client(proto).await;
            let mut readers = Vec::new();
            for _ in 0..count {
                readers.push(EventReader::open(&mut client).await);
            }
            (client, readers)
        }));
    }
    let mut clients = Vec::new();
    let mut readers = Vec::new();
    for o in opening {
        let (client, r) = o.await.expect("opening streams does not panic");
        clients.push(client);
        readers.extend(r);
    }
    assert_eq!(readers.len(), STREAMS);
    let sse_progress: Vec<Arc<AtomicU64>> = (0..STREAMS).map(|_| Arc::default()).collect();
    let mut listeners = Vec::new();
    for (id, (mut reader, progress)) in readers.into_iter().zip(sse_progress.clone()).enumerate() {
        listeners.push(tokio::spawn(async move {
            for n in 1..=EVENTS {
                let event = reader.event().await;
                assert_eq!(
                    event.id,
                    Some(n.to_string()),
                    "stream {id}: events must be gap-free"
                );
                assert_eq!(
                    event.data,
                    Some(format!("A {n}")),
                    "stream {id}: from backend A"
                );
                progress.store(n, Ordering::SeqCst);
            }
        }));
    }

    // All 400 are open at once, and traffic flows on every one.
    let admin = gw.admin;
    metrics_reach(
        admin,
        &[
            (
                "streamgate_open_websockets",
                &[("route", "*/ws")],
                WEBSOCKETS as f64,
            ),
            (
                "streamgate_open_sse_streams",
                &[("route", "*/events")],
                STREAMS as f64,
            ),
        ],
    )
    .await;
    all_reach(
        "every WebSocket to exchange 3 messages",
        &ws_progress,
        |_| 3,
    )
    .await;
    for n in 1..=3 {
        a.events.publish(n);
        all_reach("every stream to get the event", &sse_progress, |_| n).await;
    }

    // The reload runs while messages and events are in flight.
    gw.rewrite(&b.routes());
    let reload = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.reload().await })
    };
    a.events.publish(4);
    a.events.publish(5);
    reload
        .await
        .expect("reload task")
        .unwrap_or_else(|e| panic!("reload refused: {e}"));
    let at_reload: Vec<u64> = ws_progress
        .iter()
        .map(|p| p.load(Ordering::SeqCst))
        .collect();
    all_reach("every stream to get events 4 and 5", &sse_progress, |_| 5).await;
    for n in 6..=EVENTS {
        a.events.publish(n);
        all_reach("every stream to get the event", &sse_progress, |_| n).await;
    }
    all_reach(
        "every WebSocket to exchange 3 messages after the reload",
        &ws_progress,
        |i| at_reload[i] + 3,
    )
    .await;

    stop.store(true, Ordering::SeqCst);
    for (id, chatter) in chatters.into_iter().enumerate() {
        let sent = within("a WebSocket client to finish", chatter)
            .await
            .unwrap_or_else(|e| panic!("WebSocket {id} failed: {e}"));
        assert!(
            sent >= at_reload[id] + 3,
            "WebSocket {id} kept talking after the reload"
        );
    }
    for (id, listener) in listeners.into_iter().enumerate() {
        within("a stream client to finish", listener)
            .await
            .unwrap_or_else(|e| panic!("event stream {id} failed: {e}"));
    }

    // New requests follow the new routes.
    let mut client = gw.client(Proto::H2).await;
    assert_eq!(client.get("/new").await.echo().backend, "B");
    let mut ws = ws_connect(gw.https, &gw.files.ca, "/ws").await;
    assert_eq!(ws_round_trip(&mut ws, "hello").await, "B:hello");
    let mut stream = EventReader::open(&mut client).await;
    b.events.publish(1);
    assert_eq!(stream.event().await.data.as_deref(), Some("B 1"));
    ws_close(ws).await;
    drop((stream, client, clients));

    let m = metrics_reach(
        admin,
        &[
            ("streamgate_open_websockets", &[("route", "*/ws")], 0.0),
            ("streamgate_open_sse_streams", &[("route", "*/events")], 0.0),
        ],
    )
    .await;
    assert_eq!(
        m.get("streamgate_config_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("streamgate_config_reloads_total", &[("result", "failure")]),
        None
    );
}

/// `/metrics` is strict OpenMetrics, and its gauges and counters follow what the test does:
/// WebSockets, event streams and HTTP/1.1 and HTTP/2 connections held open and then closed,
/// requests answered, a backend that refuses connections, a failed TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_strict_openmetrics_and_follow_the_connections_held() {
    let a = Side::start("A").await;
    let dead = crate::support::dead_backend_url();
    let dead_addr = dead.trim_start_matches("http://").to_string();
    // Idle HTTP/1.1 connections stay open for the length of the test (the default ends them
    // after 10 s, which a slow machine could reach).
    let routes = format!(
        "[limits]\nheader_read_timeout = \"60s\"\n{}[[route]]\npath = \"/dead\"\nbackends = [\"{dead}\"]\n",
        a.routes()
    );
    let gw = InProcess::start(&routes).await;
    let idle = gw.metrics().await;
    for (name, labels) in [
        ("streamgate_open_websockets", &[("route", "*/ws")][..]),
        ("streamgate_open_sse_streams", &[("route", "*/events")][..]),
        (
            "streamgate_requests_total",
            &[("route", "*/new"), ("class", "2xx")][..],
        ),
        ("streamgate_tls_handshake_failures_total", &[][..]),
    ] {
        assert_eq!(
            idle.get(name, labels),
            Some(0.0),
            "{name}{labels:?} before any traffic"
        );
    }

    // Held: 3 WebSockets (HTTP/1.1), a stream on an HTTP/1.1 connection, a stream on an
    // HTTP/2 connection, an idle HTTP/1.1 connection and an idle HTTP/2 connection.
    let mut websockets = Vec::new();
    for i in 0..3 {
        let mut ws = ws_connect(gw.https, &gw.files.ca, "/ws").await;
        assert_eq!(
            ws_round_trip(&mut ws, &format!("m{i}")).await,
            format!("A:m{i}")
        );
        websockets.push(ws);
    }
    let mut h1_stream_conn = gw.client(Proto::H1).await;
    let h1_stream = EventReader::open(&mut h1_stream_conn).await;
    let mut h2_stream_conn = gw.client(Proto::H2).await;
    let h2_stream = EventReader::open(&mut h2_stream_conn).await;
    let mut h1_idle = gw.client(Proto::H1).await;
    let mut h2_idle = gw.client(Proto::H2).await;
    for client in [&mut h1_idle, &mut h2_idle, &mut h2_stream_conn] {
        assert_eq!(client.get("/new").await.echo().backend, "A");
    }
    assert_eq!(h1_idle.get("/new").await.echo().backend, "A");
    assert_eq!(h1_idle.get("/dead").await.status, StatusCode::BAD_GATEWAY);
    // Not TLS: the handshake fails and the gateway closes the connection.
    let mut garbage = TcpStream::connect(gw.https).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = within(
        "the gateway to drop a non-TLS client",
        garbage.read_to_end(&mut sink),
    )
    .await;

    let held = metrics_reach(
        gw.admin,
        &[
            ("streamgate_open_websockets", &[("route", "*/ws")], 3.0),
            ("streamgate_open_sse_streams", &[("route", "*/events")], 2.0),
            (
                "streamgate_open_connections",
                &[("listener", "https"), ("protocol", "h1")],
                5.0,
            ),
            (
                "streamgate_open_connections",
                &[("listener", "https"), ("protocol", "h2")],
                2.0,
            ),
            (
                "streamgate_requests_total",
                &[("route", "*/new"), ("class", "2xx")],
                4.0,
            ),
            (
                "streamgate_requests_total",
                &[("route", "*/dead"), ("class", "5xx")],
                1.0,
            ),
            (
                "streamgate_upstream_connect_failures_total",
                &[("backend", dead_addr.as_str())],
                1.0,
            ),
            ("streamgate_tls_handshake_failures_total", &[], 1.0),
            (
                "streamgate_request_duration_seconds_count",
                &[("route", "*/new")],
                4.0,
            ),
        ],
    )
    .await;
    assert_eq!(
        held.get("streamgate_config_reloads_total", &[("result", "success")]),
        None,
        "no reload happened"
    );

    for ws in websockets {
        ws_close(ws).await;
    }
    drop((
        h1_stream,
        h1_stream_conn,
        h2_stream,
        h2_stream_conn,
        h1_idle,
        h2_idle,
    ));
    let after = metrics_reach(
        gw.admin,
        &[
            ("streamgate_open_websockets", &[("route", "*/ws")], 0.0),
            ("streamgate_open_sse_streams", &[("route", "*/events")], 0.0),
            (
                "streamgate_open_connections",
                &[("listener", "https"), ("protocol", "h1")],
                0.0,
            ),
            (
                "streamgate_open_connections",
                &[("listener", "https"), ("protocol", "h2")],
                0.0,
            ),
        ],
    )
    .await;
    assert_eq!(
        after.get(
            "streamgate_stream_lifetime_seconds_count",
            &[("route", "*/ws"), ("kind", "websocket")]
        ),
        Some(3.0)
    );
    assert_eq!(
        after.get(
            "streamgate_stream_lifetime_seconds_count",
            &[("route", "*/events"), ("kind", "sse")]
        ),
        Some(2.0)
    );
}

/// SIGHUP reloads the running binary, and so does a change to its config file alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_a_config_file_change_each_reload_the_binary() {
    let (a, b, c) = (
        Backend::echo("A").await,
        Backend::echo("B").await,
        Backend::echo("C").await,
    );
    let route = |to: &Backend| {
        format!(
            "[[route]]\npath = \"/new\"\nbackends = [\"{}\"]\n",
            to.url()
        )
    };
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &route(&a)).await;
    assert_eq!(
        gw.client(Proto::H1).await.get("/new").await.echo().backend,
        "A"
    );

    gw.rewrite(&route(&b));
    gw.signal("HUP");
    gw.log_event("SIGHUP received, reloading").await;
    gw.log_event("\"config reloaded\"").await;
    assert_eq!(
        gw.client(Proto::H1).await.get("/new").await.echo().backend,
        "B"
    );

    gw.rewrite(&route(&c));
    gw.log_event("config or certificate files changed, reloading")
        .await;
    gw.log_event("\"config reloaded\"").await;
    assert_eq!(
        gw.client(Proto::H2).await.get("/new").await.echo().backend,
        "C"
    );
    let (status, text) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let m = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let reloads = m.get("streamgate_config_reloads_total", &[("result", "success")]);
    assert!(
        reloads.is_some_and(|n| n >= 2.0),
        "two reloads at least, got {reloads:?}"
    );
}

/// An invalid config written over the running gateway's file is refused: the error names the
/// file and line, the old routes keep serving, and the failure is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_written_over_the_running_binary_keeps_the_old_routes() {
    let (a, b) = (Backend::echo("A").await, Backend::echo("B").await);
    let route = |to: &Backend| {
        format!(
            "[[route]]\npath = \"/new\"\nbackends = [\"{}\"]\n",
            to.url()
        )
    };
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &route(&a)).await;

    let broken = format!("{}connect_timeout = \"soon\"\n", route(&b));
    let line = gw
        .text(&broken)
        .lines()
        .position(|l| l.starts_with("connect_timeout"))
        .expect("the broken line")
        + 1;
    gw.rewrite(&broken);
    let logged = gw.log_event("config reload refused").await;
    assert!(
        logged.contains(&format!("streamgate.toml:{line}:")),
        "the error names the file and line {line}: {logged}"
    );
    assert!(logged.contains("connect_timeout"), "and the key: {logged}");
    assert_eq!(
        gw.client(Proto::H1).await.get("/new").await.echo().backend,
        "A"
    );
    let m = metrics_at(gw.admin).await;
    assert_eq!(
        m.get("streamgate_config_reloads_total", &[("result", "failure")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("streamgate_config_reloads_total", &[("result", "success")]),
        None
    );

    // Fixed, the file is taken up again.
    gw.rewrite(&route(&b));
    gw.log_event("\"config reloaded\"").await;
    assert_eq!(
        gw.client(Proto::H1).await.get("/new").await.echo().backend,
        "B"
    );
    let m = metrics_at(gw.admin).await;
    assert_eq!(
        m.get("streamgate_config_reloads_total", &[("result", "failure")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("streamgate_config_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
}

/// A certificate replaced on disk is presented to new handshakes, while an HTTP/2 connection
/// and a WebSocket opened before keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_is_presented_to_new_handshakes_and_old_connections_stay_up() {
    let a = Side::start("A").await;
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &a.routes()).await;
    let first = gw.files.leaf.clone();
    let mut old_h2 = gw.client(Proto::H2).await;
    assert_eq!(old_h2.peer_certs.first(), Some(&first));
    assert_eq!(old_h2.get("/new").await.echo().backend, "A");
    let mut old_ws = ws_connect(gw.https, &gw.files.ca, "/ws").await;
    assert_eq!(ws_round_trip(&mut old_ws, "before").await, "A:before");

    let second = gw.files.replace_cert();
    assert_ne!(first, second);
    gw.log_event("config or certificate files changed, reloading")
        .await;
    gw.log_event("\"config reloaded\"").await;

    let mut fresh = gw.client(Proto::H1).await;
    assert_eq!(
        fresh.peer_certs.first(),
        Some(&second),
        "a new handshake gets the new certificate"
    );
    assert_eq!(fresh.get("/new").await.echo().backend, "A");
    assert_eq!(
        old_h2.get("/new").await.echo().backend,
        "A",
        "the old HTTP/2 connection still works"
    );
    assert_eq!(
        ws_round_trip(&mut old_ws, "after").await,
        "A:after",
        "the old WebSocket still works"
    );
    ws_close(old_ws).await;
}

/// SIGTERM: `/readyz` turns 503, in-flight requests finish with 200, WebSockets get Close 1001,
/// event streams end cleanly after a `retry:` hint, and the process exits 0 within the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_websockets_and_event_streams_then_exits_zero() {
    const GRACE: Duration = Duration::from_secs(10);
    let a = Side::start("A").await;
    let mut held = Held::start().await;
    let body = format!(
        "[shutdown]\ngrace = \"10s\"\ndelay = \"500ms\"\n{}\
         [[route]]\npath = \"/held\"\nbackends = [\"{}\"]\n",
        a.routes().replace(
            "path = \"/events\"\n",
            "path = \"/events\"\nsse = { shutdown_retry = \"3s\" }\n"
        ),
        held.backend.url()
    );
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &body).await;

    // In flight: one request on HTTP/1.1 and one on HTTP/2, held at the backend.
    let mut in_flight = Vec::new();
    for proto in Proto::ALL {
        let mut client = gw.client(proto).await;
        in_flight.push(tokio::spawn(async move { client.get("/held").await }));
        held.arrived().await;
    }
    let mut websockets = Vec::new();
    for i in 0..3 {
        let mut ws = ws_connect(gw.https, &gw.files.ca, "/ws").await;
        assert_eq!(
            ws_round_trip(&mut ws, &format!("m{i}")).await,
            format!("A:m{i}")
        );
        websockets.push(ws);
    }
    let mut streams = Vec::new();
    for proto in [Proto::H1, Proto::H1, Proto::H2] {
        let mut client = gw.client(proto).await;
        let reader = EventReader::open(&mut client).await;
        streams.push((client, reader));
    }
    a.events.publish(1);
    for (_, reader) in &mut streams {
        assert_eq!(reader.event().await.id.as_deref(), Some("1"));
    }

    gw.signal("TERM");
    let signalled = Instant::now();
    within("/readyz to answer 503", async {
        while gw.admin_get("/readyz").await.0 != 503 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    gw.log_event("shutting down").await;

    for mut ws in websockets {
        let codes = ws_until_end(&mut ws).await;
        assert_eq!(
            codes.first().copied(),
            Some(u16::from(CloseCode::Away)),
            "the WebSocket gets Close 1001"
        );
    }
    for (_client, mut reader) in streams {
        let mut last = None;
        loop {
            match reader.next_block().await {
                Ok(Some(block)) => last = Some(block),
                Ok(None) => break,
                Err(e) => panic!("the event stream did not end cleanly: {e}"),
            }
        }
        assert_eq!(
            last.and_then(|b| b.retry),
            Some(3000),
            "retry: hint before the end"
        );
    }
    // Released only now, with the drain under way: the requests still complete.
    held.release();
    held.release();
    for request in in_flight {
        let response = within("the in-flight request", request)
            .await
            .expect("the request does not panic");
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body, "released");
    }

    let status = gw
        .exit_within(GRACE + Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("the gateway did not exit:\n{}", gw.log_text()));
    assert!(status.success(), "exit status {status}:\n{}", gw.log_text());
    assert!(
        signalled.elapsed() < GRACE,
        "everything finished before the grace ran out"
    );
    let log = gw.log_text();
    assert!(log.contains("shutdown complete"), "{log}");
    assert!(
        !log.contains("grace period over"),
        "nothing had to be cut:\n{log}"
    );
}

/// A second SIGTERM during a drain that would take a minute ends the process at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_during_a_long_drain_exits_at_once() {
    let mut held = Held::start().await;
    let body = format!(
        "[shutdown]\ngrace = \"60s\"\n[[route]]\npath = \"/held\"\nbackends = [\"{}\"]\n",
        held.backend.url()
    );
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &body).await;
    let mut client = gw.client(Proto::H1).await;
    let request = tokio::spawn(async move {
        let req = client
            .request(Method::GET, "/held")
            .body(empty())
            .expect("valid request");
        client.try_send(req).await.map(|r| r.status())
    });
    held.arrived().await;

    gw.signal("TERM");
    gw.log_event("shutting down").await;
    assert!(
        gw.exit_within(Duration::from_millis(200)).await.is_none(),
        "the drain waits for the request"
    );
    gw.signal("TERM");
    let status = gw
        .exit_within(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "a second SIGTERM did not end the process:\n{}",
                gw.log_text()
            )
        });
    assert!(
        !status.success(),
        "a forced exit is not a clean one: {status}"
    );
    gw.log_event("second signal").await;
    let outcome = within("the held request to fail", request)
        .await
        .expect("no panic");
    assert!(outcome.is_err(), "the held request was cut: {outcome:?}");
}

/// `streamgate health` exits 0 while the gateway answers on its control socket, non-zero when
/// nothing does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_command_exits_zero_for_a_running_gateway_and_non_zero_without_one() {
    let a = Backend::echo("A").await;
    let body = format!("[[route]]\npath = \"/\"\nbackends = [\"{}\"]\n", a.url());
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &body).await;
    let health = |socket: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
                .arg("health")
                .arg("--socket")
                .arg(socket)
                .output()
                .expect("run streamgate health")
        })
        .await
        .expect("no panic")
    };
    let config = gw.files.control_socket();
    let up = within("streamgate health", health(config.clone())).await;
    assert!(
        up.status.success(),
        "healthy: {}",
        String::from_utf8_lossy(&up.stderr)
    );

    gw.stop();
    let down = within("streamgate health", health(config)).await;
    assert!(!down.status.success(), "nothing listens: the check fails");
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("unhealthy"),
        "and says why: {}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// Each subcommand's help offers what it uses: `demo` and `health` read no config file, so
/// they offer no `--config`; `check` and the gateway itself do, before or after `check`.
#[test]
fn subcommand_help_offers_only_what_it_uses() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .args(args)
            .output()
            .expect("run streamgate");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let demo = help(&["demo", "--help"]);
    assert!(demo.contains("--listen"), "{demo}");
    assert!(!demo.contains("--config"), "demo reads no config: {demo}");
    let health = help(&["health", "--help"]);
    assert!(health.contains("--socket"), "{health}");
    assert!(
        !health.contains("--config"),
        "health reads no config: {health}"
    );
    assert!(help(&["check", "--help"]).contains("--config"));
    assert!(help(&["--help"]).contains("--config"));
}
