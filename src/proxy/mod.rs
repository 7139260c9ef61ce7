//! The request path: [`Gateway::handle`] takes one request from a client connection, finds its
//! route and hands it to [`forward`] (plain HTTP and SSE) or the WebSocket bridge.

pub mod access;
pub mod body;
pub mod error;
pub mod forward;
pub mod headers;
pub mod request;
pub mod sse;
pub mod websocket;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::config::{HttpMode, RateKey};
use crate::drain::Drain;
use crate::metrics::{Metrics, RouteMetrics};
use crate::router::{Route, Router};
use access::{AccessEntry, Logged};
use body::GatewayBody;
use error::ProxyError;
use request::RequestFacts;

/// What the request path knows about the client connection a request came in on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The connection's id in logs (`conn_id`).
    pub id: u64,
    /// The TCP peer: the client, or a load balancer in front.
    pub peer: SocketAddr,
    /// The client: the peer, the address a PROXY protocol header gave, or (per request, set
    /// by [`Gateway::handle`]) what a trusted proxy's `X-Forwarded-For` says. Logs, limits and
    /// `hash_key = "client_ip"` use it.
    pub client: std::net::IpAddr,
    /// The peer is a trusted proxy speaking HTTP: its `X-Forwarded-*` headers are believed.
    /// (A PROXY protocol peer is a TCP balancer: the HTTP headers are the client's own.)
    pub forwarded_trusted: bool,
    /// Whether the request arrived on the TLS listener.
    pub tls: bool,
    /// The TLS version the handshake settled on ("TLSv1.3"), for the access log.
    pub tls_version: Option<&'static str>,
    /// The connection's place under `limits.max_connections` and in `open_connections`.
    /// WebSocket tunnels hold a clone, so an upgraded connection still counts after hyper has
    /// let go of it.
    pub slot: Arc<crate::conn::ConnSlot>,
    /// Requests and tunnels in flight, for the connection's idle timeout.
    pub activity: Arc<crate::conn::Activity>,
    /// Whether writes to the client proceed (`limits.write_stall_timeout`); WebSocket tunnels
    /// watch it after hyper has let go of the connection.
    pub write_stall: Arc<crate::stall::WriteStall>,
    /// The client certificate the TLS handshake verified (`listen.client_ca`).
    pub client_cert: Option<Arc<crate::auth::ClientCert>>,
}

/// The shared state every request sees: the route table and how the plain listener behaves.
pub struct Gateway {
    /// Swapped whole on reload; a request (and the stream it opens) keeps the routes it began
    /// with.
    router: ArcSwap<Router>,
    http_mode: HttpMode,
    /// `listen.trusted_proxies` and `listen.proxy_protocol`.
    pub trusted: crate::trust::TrustedProxies,
    pub proxy_protocol: bool,
    /// Port of the TLS listener, for redirects from the plain one.
    https_port: u16,
    /// `listen.hsts`: added to TLS responses that have no `Strict-Transport-Security`.
    hsts: Option<HeaderValue>,
    /// WebSocket tunnels outlive their request: they are spawned here so shutdown sees them.
    drain: Drain,
    pub metrics: Arc<Metrics>,
    /// Requests that matched no route are counted under route "-".
    unrouted: Arc<RouteMetrics>,
    /// The latest failures on the backend side, newest last, for the dashboard.
    pub recent_errors: std::sync::Mutex<std::collections::VecDeque<RecentError>>,
    /// `log.query`: access lines show the query string (reloadable).
    log_query: std::sync::atomic::AtomicBool,
    /// Pending ACME http-01 answers, served on the plain listener.
    acme: Arc<crate::acme::Challenges>,
}

/// One failure the dashboard lists (what the client was told, not the backend's address).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentError {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub route: String,
    pub status: u16,
    pub error: String,
}

/// How many failures the dashboard keeps.
const RECENT_ERRORS: usize = 20;

impl Gateway {
    pub fn new(
        router: Router,
        listen: &crate::config::Listen,
        https_port: u16,
        drain: Drain,
        metrics: Arc<Metrics>,
    ) -> Gateway {
        start_auth(&router, &drain);
        Gateway {
            hsts: listen.hsts.clone(),
            router: ArcSwap::from_pointee(router),
            http_mode: listen.http_mode,
            trusted: listen.trusted_proxies.clone(),
            proxy_protocol: listen.proxy_protocol,
            https_port,
            drain,
            unrouted: Arc::new(metrics.route("-")),
            metrics,
            recent_errors: Default::default(),
            log_query: Default::default(),
            acme: Arc::default(),
        }
    }

    /// Answers the ACME http-01 challenges pending in `challenges` on the plain listener.
    pub fn with_acme(mut self, challenges: Arc<crate::acme::Challenges>) -> Gateway {
        self.acme = challenges;
        self
    }

    /// `log.query`: whether access lines show the query string, from the next request on.
    pub fn set_log_query(&self, on: bool) {
        self.log_query
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn router(&self) -> Arc<Router> {
        self.router.load_full()
    }

    /// New requests use `router` from now on.
    pub fn replace_router(&self, router: Router) {
        start_auth(&router, &self.drain);
        self.router.store(Arc::new(router));
    }

    /// Answers one request. Never fails: every error becomes a response with a one-line reason,
    /// and every response carries the access-log entry that is written when it is done.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        mut conn: ConnInfo,
    ) -> Result<Response<Logged>, Infallible> {
        if conn.forwarded_trusted {
            // A trusted proxy names its client in X-Forwarded-For.
            conn.client = self.trusted.client(conn.peer.ip(), req.headers());
        }
        let mut entry = AccessEntry::new(
            req.method(),
            req.uri(),
            Instant::now(),
            self.unrouted.clone(),
        );
        entry.conn_id = conn.id;
        entry.active = Some(conn.activity.begin());
        entry.client = conn.client;
        entry.tls = conn.tls_version;
        entry.protocol = match req.version() {
            Version::HTTP_2 => access::Protocol::H2,
            _ => access::Protocol::H1,
        };
        entry.user_agent = req.headers().get(header::USER_AGENT).cloned();
        entry.query = self.log_query.load(std::sync::atomic::Ordering::Relaxed);
        // One id for the log line, the backend and the client.
        let request_id = request_id(req.headers(), conn.forwarded_trusted);
        req.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        entry.request_id = Some(request_id.clone());
        let version = req.version();
        // Boxed: the routing future is a few KiB, and hyper moves the request future around
        // (into a task per HTTP/2 stream); a pointer moves cheaper than the state machine.
        let response = match Box::pin(self.route(req, &conn, &mut entry)).await {
            Ok(response) => response,
            Err(error) => {
                let route = entry.route.as_ref().map_or("-", |r| r.name.as_str());
                // conn_id is a field, not only the span's: spans are filtered with the level.
                if error.is_upstream() {
                    tracing::warn!(
                        conn_id = conn.id,
                        route,
                        backend = error.backend().unwrap_or("-"),
                        error = %error,
                        detail = %error.detail(),
                        "request failed"
                    );
                    self.remember(route, &error);
                } else {
                    tracing::debug!(
                        conn_id = conn.id,
                        route,
                        backend = error.backend().unwrap_or("-"),
                        error = %error,
                        detail = %error.detail(),
                        "request refused"
                    );
                }
                let mut response = error_response(&error);
                let framing = matches!(
                    error,
                    ProxyError::UnsupportedTransferCoding | ProxyError::BadRequestBody { .. }
                );
                if framing && version < Version::HTTP_2 {
                    // Where this request's body ends is in doubt: no next request on it.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        };
        entry.status = response.status().as_u16();
        let mut response = response;
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        if let (true, Some(hsts)) = (conn.tls, &self.hsts) {
            let headers = response.headers_mut();
            if !headers.contains_key(header::STRICT_TRANSPORT_SECURITY) {
                headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
        }
        let logged = |body| {
            let logged = Logged::new(body, entry);
            if version == Version::HTTP_2 {
                logged.watched(&conn.write_stall)
            } else {
                logged
            }
        };
        Ok(response.map(logged))
    }

    fn remember(&self, route: &str, error: &ProxyError) {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Ok(mut recent) = self.recent_errors.lock() {
            if recent.len() == RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(RecentError {
                time_ms,
                route: route.to_string(),
                status: error.status().as_u16(),
                error: error.to_string(),
            });
        }
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        entry: &mut AccessEntry,
    ) -> Result<Response<GatewayBody>, ProxyError> {
        // ACME http-01 (RFC 8555 8.3): before redirects and routes, on the plain listener.
        if !conn.tls && req.method() == Method::GET {
            if let Some(answer) = self.acme.http_answer(req.uri().path()) {
                let mut response = Response::new(GatewayBody::full(answer));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                return Ok(response);
            }
        }
        // One host for routing, Host, X-Forwarded-Host and redirects (and the checks a route
        // boundary relies on), decided before anything reads them.
        let facts = RequestFacts::of(&req)?;
        entry.host = facts.host_header.clone();
        let host = facts.host.as_deref();
        if !conn.tls && self.http_mode == HttpMode::Redirect {
            return self.redirect(&req, host);
        }
        let is_websocket = is_websocket_request(&req);
        if req.method() == Method::CONNECT && !is_websocket {
            return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
        }
        let route = self
            .router
            .load()
            .find(host, req.uri().path())
            .ok_or_else(|| ProxyError::NoRoute {
                host: host.unwrap_or_default().to_string(),
                path: req.uri().path().to_string(),
            })?
            .clone();
        entry.route = Some(route.clone());
        if let Some(auth) = &route.auth {
            // A token in the query never reaches the access log, whatever happens next.
            entry.uri = auth.log_target(req.uri());
        }
        check_rate(&route, &req, conn)?;
        let mut req = req;
        if route.config.require_client_cert && conn.client_cert.is_none() {
            crate::auth::count_forbidden(&route.all_metrics, &route.name);
            entry.auth = Some("forbidden");
            return Err(ProxyError::ClientCertRequired {
                route: route.name.clone(),
            });
        }
        if let Some(auth) = &route.auth {
            let host = facts.host_header.as_ref();
            match auth
                .check(&mut req, &route.name, conn, host, &mut entry.auth)
                .await?
            {
                crate::auth::Verdict::Answer(response) => {
                    return Ok(response.map(GatewayBody::full));
                }
                crate::auth::Verdict::Pass(Some(at)) => {
                    req.extensions_mut().insert(crate::auth::TokenExpiry(at));
                }
                crate::auth::Verdict::Pass(None) => {}
            }
        }
        admit_stream(&route, is_websocket, req.headers())?;
        if is_websocket {
            websocket::bridge(&route, req, &facts, conn, &self.drain, entry).await
        } else {
            forward::forward(&route, req, &facts, conn, &self.drain, entry).await
        }
    }

    /// 308 to the same host, path and query on the TLS listener (the plain listener's default).
    fn redirect(
        &self,
        req: &Request<Incoming>,
        host: Option<&str>,
    ) -> Result<Response<GatewayBody>, ProxyError> {
        let host = host.ok_or(ProxyError::BadRequest("missing Host header"))?;
        let port = match self.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let location = HeaderValue::from_str(&format!("https://{host}{port}{target}"))
            .map_err(|_| ProxyError::BadRequest("request target cannot be redirected"))?;
        let mut response = Response::new(GatewayBody::empty());
        *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
        response.headers_mut().insert(header::LOCATION, location);
        Ok(response)
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id: a trusted proxy's `X-Request-Id` (visible ASCII, at most 128 bytes), else
/// 128 random bits in hex. A client that is not trusted cannot choose the id its request is
/// logged and forwarded under.
fn request_id(headers: &http::HeaderMap, trusted: bool) -> HeaderValue {
    if trusted {
        if let Some(id) = headers.get(X_REQUEST_ID).filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
        }) {
            return id.clone();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut id = [0u8; 32];
    for (i, c) in id.iter_mut().enumerate() {
        *c = HEX[(bits >> (124 - 4 * i) & 0xf) as usize];
    }
    // Hex digits are valid header bytes.
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("-"))
}

/// Starts what routes with `[route.auth]` run in the background (JWKS URL refresh).
fn start_auth(router: &Router, drain: &Drain) {
    for route in router.routes() {
        if let Some(auth) = &route.auth {
            auth.start(drain);
        }
    }
}

/// An HTTP/1.1 `Upgrade: websocket` or an HTTP/2 extended CONNECT with `:protocol websocket`.
fn is_websocket_request<B>(req: &Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    }
    headers::has_token(req.headers(), header::UPGRADE, "websocket")
}

/// `[route.rate_limit]`: a token for this client (or header value), or 429 before any backend
/// is contacted.
fn check_rate<B>(route: &Route, req: &Request<B>, conn: &ConnInfo) -> Result<(), ProxyError> {
    let Some((config, limiter)) = route
        .config
        .rate_limit
        .as_ref()
        .zip(route.rate_limiter.as_ref())
    else {
        return Ok(());
    };
    // Keys of the two kinds cannot collide; a request without the header counts by address,
    // so leaving the header out is no way around the limit.
    let header = match &config.key {
        RateKey::Header(name) => req.headers().get(name),
        RateKey::ClientIp => None,
    };
    let key: Vec<u8> = match header {
        Some(v) => [b"h:", v.as_bytes()].concat(),
        None => match conn.client {
            std::net::IpAddr::V4(ip) => [&b"4:"[..], &ip.octets()].concat(),
            std::net::IpAddr::V6(ip) => [&b"6:"[..], &ip.octets()].concat(),
        },
    };
    limiter.check(&key).map_err(|wait| {
        route.metrics.limited_requests.inc();
        ProxyError::RateLimited {
            route: route.name.clone(),
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    })
}

/// Whether the client asks for an event stream (`Accept: text/event-stream`, as EventSource
/// sends): admission control must decide before any backend has answered.
fn accepts_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| {
            t.split(|b| *b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii()
        })
        .any(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
}

/// `max_new_streams_per_second`: a new WebSocket or stream takes a token of the route's bucket,
/// or gets 503 with a `Retry-After` of 1 to 5 s, random so that refused clients do not come
/// back together.
/// Only WebSocket upgrades and event-stream requests take a token; the `Accept` header is
/// read only on routes that have the limit.
fn admit_stream(
    route: &Route,
    is_websocket: bool,
    headers: &http::HeaderMap,
) -> Result<(), ProxyError> {
    let Some(bucket) = &route.stream_admission else {
        return Ok(());
    };
    if !is_websocket && !accepts_event_stream(headers) {
        return Ok(());
    }
    if bucket.take() {
        return Ok(());
    }
    route.metrics.admission_rejected.inc();
    Err(ProxyError::StreamsLimited {
        route: route.name.clone(),
        retry_after: fastrand::u64(1..=5),
    })
}

/// The gateway's own answer to an error: the status, and the reason as a one-line text body.
pub fn error_response(error: &ProxyError) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(format!("streamgate: {error}\n")));
    *response.status_mut() = error.status();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let ProxyError::RateLimited { retry_after, .. }
    | ProxyError::StreamsLimited { retry_after, .. } = error
    {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
    }
    if matches!(
        error,
        ProxyError::TokenMissing { .. }
            | ProxyError::TokenInvalid { .. }
            | ProxyError::TokenExpired { .. }
    ) {
        // RFC 6750 3.1.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    if let ProxyError::UnsupportedWebSocketVersion { .. } = error {
        // RFC 6455 4.4: the 426 names the version the gateway speaks.
        response.headers_mut().insert(
            HeaderName::from_static("sec-websocket-version"),
            HeaderValue::from_static("13"),
        );
    }
    response
}
