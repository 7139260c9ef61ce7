//! The access log: one line per request, WebSocket or event stream, written when it ends, so
//! it can report the bytes that really went out and how long the whole exchange took. A
//! WebSocket or stream takes the line over from its request ([`AccessEntry::hand_off`]) and
//! writes it when it closes; nothing writes two.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;

use super::body::{BoxError, GatewayBody};
use crate::metrics::RouteMetrics;
use crate::router::Route;
use crate::stall::{StreamWait, WriteStall};

/// What the access line calls the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    H1,
    H2,
    /// A WebSocket, over HTTP/1.1 or HTTP/2.
    Ws,
    /// An event stream.
    Sse,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H1 => "h1",
            Protocol::H2 => "h2",
            Protocol::Ws => "ws",
            Protocol::Sse => "sse",
        }
    }
}

/// What is known about a request when its response head is ready.
#[derive(Debug)]
pub struct AccessEntry {
    pub route: Option<Arc<Route>>,
    pub backend: Option<http::uri::Authority>,
    pub method: http::Method,
    /// The request target as received (a shared handle, not a copy).
    pub uri: http::Uri,
    pub status: u16,
    pub start: Instant,
    pub bytes_out: u64,
    pub complete: bool,
    /// A WebSocket or event stream: its lifetime is not a request duration.
    pub stream: bool,
    pub conn_id: u64,
    /// Keeps the connection from counting as idle until the response body is done.
    pub active: Option<crate::conn::ActiveGuard>,
    /// Counted here when no route matched.
    pub unrouted: Arc<RouteMetrics>,
    /// The client (`ConnInfo::client` once trusted proxies had their say).
    pub client: IpAddr,
    /// The request's authoritative host, as the backend gets it (port kept).
    pub host: Option<HeaderValue>,
    pub protocol: Protocol,
    /// "TLSv1.3", "TLSv1.2"; None on the plain listener.
    pub tls: Option<&'static str>,
    /// From the first try at a backend to its response head (time to first byte).
    pub upstream: Option<Duration>,
    /// The client's body bytes as they go to the backend (None: no body).
    pub request_bytes: Option<Counter>,
    pub user_agent: Option<HeaderValue>,
    /// `X-Request-Id`: a trusted proxy's, or made by the gateway.
    pub request_id: Option<HeaderValue>,
    /// How edge authentication decided ("-" in the line while None).
    pub auth: Option<&'static str>,
    /// `log.query`: the line shows the query string.
    pub query: bool,
    /// A WebSocket or stream writes the line instead (see [`AccessEntry::hand_off`]).
    handed_off: bool,
}

impl AccessEntry {
    pub fn new(
        method: &http::Method,
        uri: &http::Uri,
        start: Instant,
        unrouted: Arc<RouteMetrics>,
    ) -> AccessEntry {
        AccessEntry {
            route: None,
            backend: None,
            method: method.clone(),
            uri: uri.clone(),
            status: 0,
            start,
            bytes_out: 0,
            complete: false,
            stream: false,
            conn_id: 0,
            active: None,
            unrouted,
            client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            host: None,
            protocol: Protocol::H1,
            tls: None,
            upstream: None,
            request_bytes: None,
            user_agent: None,
            request_id: None,
            auth: None,
            query: false,
            handed_off: false,
        }
    }

    /// The WebSocket or stream this request became takes the line, with `status`; it is
    /// written when that is dropped. The request's own metrics stay with the entry.
    pub fn hand_off(&mut self, protocol: Protocol, status: u16) -> AccessLine {
        self.stream = true;
        self.handed_off = true;
        let mut line = self.take_line();
        line.protocol = protocol;
        line.status = status;
        // The line lives as long as the WebSocket or stream: it must not keep the request
        // head's buffer alive (see `headers::owned_value`).
        use super::headers::{owned_uri, owned_value};
        line.uri = owned_uri(&line.uri);
        for v in [&mut line.host, &mut line.user_agent, &mut line.request_id]
            .into_iter()
            .flatten()
        {
            *v = owned_value(v);
        }
        line
    }

    fn take_line(&mut self) -> AccessLine {
        AccessLine {
            conn_id: self.conn_id,
            client: self.client,
            method: std::mem::take(&mut self.method),
            uri: std::mem::take(&mut self.uri),
            query: self.query,
            host: self.host.take(),
            protocol: self.protocol,
            tls: self.tls,
            route: self.route.clone(),
            backend: self.backend.clone(),
            status: self.status,
            start: self.start,
            upstream: self.upstream,
            bytes_in: self.request_bytes.as_ref().map_or(0, |c| c.get()),
            bytes_out: self.bytes_out,
            user_agent: self.user_agent.take(),
            request_id: self.request_id.take(),
            auth: self.auth,
            complete: self.complete,
            close_code: None,
            closed_by: "-",
            reason: "-",
            messages_in: None,
            messages_out: None,
            events: None,
        }
    }
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        let metrics = self.route.as_ref().map_or(&*self.unrouted, |r| &r.metrics);
        metrics.request(self.status);
        metrics.bytes_out.inc_by(self.bytes_out);
        if !self.stream {
            metrics.duration.observe(self.start.elapsed().as_secs_f64());
        }
        if !self.handed_off {
            drop(self.take_line());
        }
    }
}

/// One access line, written when it is dropped: at the end of the request's response body, or
/// of the WebSocket or stream that took it over.
#[derive(Debug)]
pub struct AccessLine {
    conn_id: u64,
    client: IpAddr,
    method: http::Method,
    uri: http::Uri,
    query: bool,
    host: Option<HeaderValue>,
    protocol: Protocol,
    tls: Option<&'static str>,
    route: Option<Arc<Route>>,
    backend: Option<http::uri::Authority>,
    status: u16,
    start: Instant,
    upstream: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    user_agent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    auth: Option<&'static str>,
    pub complete: bool,
    /// A WebSocket's close code (RFC 6455 7.4; 1006 when none was received).
    pub close_code: Option<u16>,
    /// Who ended a WebSocket or stream: "client", "backend" or "gateway".
    pub closed_by: &'static str,
    /// Why, in a word or two ("idle-timeout", "shutdown", "message rate exceeded").
    pub reason: &'static str,
    pub messages_in: Option<u64>,
    pub messages_out: Option<u64>,
    /// An event stream's events.
    pub events: Option<u64>,
}

/// A header value as text, "-" when absent or not visible ASCII.
fn text(v: &Option<HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let path = if self.query {
            self.uri.path_and_query().map_or("/", |pq| pq.as_str())
        } else {
            self.uri.path()
        };
        // A root event: the line carries everything itself, whatever span it ends in.
        tracing::info!(
            target: "streamgate::access",
            parent: None,
            conn_id = self.conn_id,
            client = %self.client,
            method = %self.method,
            host = text(&self.host),
            path = if path.is_empty() { "-" } else { path },
            protocol = self.protocol.as_str(),
            tls = self.tls.unwrap_or("-"),
            status = self.status,
            route = self.route.as_ref().map_or("-", |r| r.name.as_str()),
            backend = self.backend.as_ref().map_or("-", |b| b.as_str()),
            upstream_ms = self.upstream.map(|d| d.as_millis() as u64),
            duration_ms = self.start.elapsed().as_millis() as u64,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            user_agent = text(&self.user_agent),
            request_id = text(&self.request_id),
            auth = self.auth.unwrap_or("-"),
            complete = self.complete,
            close_code = self.close_code,
            closed_by = self.closed_by,
            reason = self.reason,
            messages_in = self.messages_in,
            messages_out = self.messages_out,
            events = self.events,
            "access"
        );
    }
}

/// A line for a request hyper refused before the gateway saw it (an HTTP/1.1 head too large or
/// malformed): what the connection knows, and the status hyper answered with.
pub fn refused_by_hyper(
    conn_id: u64,
    client: IpAddr,
    tls: Option<&'static str>,
    status: u16,
    reason: &'static str,
) {
    tracing::info!(
        target: "streamgate::access",
        parent: None,
        conn_id,
        client = %client,
        method = "-",
        host = "-",
        path = "-",
        protocol = "h1",
        tls = tls.unwrap_or("-"),
        status,
        route = "-",
        backend = "-",
        duration_ms = 0u64,
        bytes_in = 0u64,
        bytes_out = 0u64,
        user_agent = "-",
        request_id = "-",
        auth = "-",
        complete = true,
        closed_by = "-",
        reason,
        "access"
    );
}

pin_project! {
    /// A response body that counts what it passes on and logs the entry when it is dropped.
    pub struct Logged {
        #[pin]
        body: GatewayBody,
        entry: AccessEntry,
        // HTTP/2: the connection's stall watch, and (from the first frame that does not end
        // the body) this body's place in it (see `stall::StreamWait`).
        stall: Option<Arc<WriteStall>>,
        wait: Option<Arc<StreamWait>>,
    }
}

impl Logged {
    pub fn new(body: GatewayBody, mut entry: AccessEntry) -> Logged {
        // hyper never polls a body that is already at its end.
        entry.complete = body.is_end_stream();
        Logged {
            body,
            entry,
            stall: None,
            wait: None,
        }
    }

    /// An HTTP/2 response: flow control, not the socket, stops it when the client stops
    /// reading, so the body itself reports how long it has waited to be asked for more.
    pub fn watched(mut self, stall: &Arc<WriteStall>) -> Logged {
        if !self.body.is_end_stream() {
            self.stall = Some(stall.clone());
        }
        self
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut body = this.body;
        if let Some(wait) = this.wait {
            wait.asked();
        }
        let polled = body.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.entry.bytes_out += data.len() as u64;
                }
                // hyper stops polling once the body says it is at its end.
                if body.is_end_stream() {
                    this.entry.complete = true;
                } else if let Some(stall) = this.stall {
                    // Registered only now: a response that ends with its first frame (most
                    // of them) never takes a place.
                    this.wait
                        .get_or_insert_with(|| stall.stream())
                        .waiting(stall);
                }
            }
            Poll::Ready(None) => this.entry.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
