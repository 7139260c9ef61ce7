//! The gateway's configuration: file -> [`raw`] (serde, unknown keys rejected) -> [`Config`]
//! (validated, typed; value ranges and checks between keys in [`validate`]). Every error names
//! the file, the line and column, and the key.

mod auth;
mod raw;
mod upstream;
mod validate;

pub use auth::{
    AuthConfig, ClientAuth, ClientCa, ForwardAuthConfig, JwksSource, JwtConfig, TlsMinVersion,
    TokenSource,
};
pub use validate::{UncoveredHost, MAX_DURATION};

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::Authority;
use raw::{RawConfig, RawRoute};
use toml::Spanned;

/// A configuration that has passed every check that does not need the network or the disk
/// beyond reading the file itself (certificates are loaded by [`crate::tls`]).
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from; certificate paths are relative to the working directory.
    pub path: PathBuf,
    pub listen: Listen,
    pub limits: Limits,
    /// Worker threads of the tokio runtime; `None` means one per core.
    pub worker_threads: Option<usize>,
    pub shutdown: Shutdown,
    pub resolver: ResolverConfig,
    /// `[log]`: the access log.
    pub log: LogConfig,
    pub certs: Vec<CertFiles>,
    pub routes: Vec<RouteConfig>,
    /// `[acme]`: certificates ordered from an ACME CA; `None` without the table.
    pub acme: Option<AcmeConfig>,
}

/// `[acme]`: certificates from an ACME CA (RFC 8555) for names no `[[cert]]` covers.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    /// The CA's directory URL (https).
    pub directory: String,
    /// Contact for the account (`mailto:`), if any.
    pub email: Option<String>,
    /// Names to certify, lowercase; `None`: every exact route host. Either way the names a
    /// `[[cert]]` covers are left out (see [`Config::acme_names`]).
    pub domains: Option<Vec<String>>,
    /// Account credentials and issued certificates, kept across restarts.
    pub cache: PathBuf,
    pub challenge: AcmeChallenge,
    /// PEM certificates trusted for the directory's HTTPS, beside the public roots.
    pub ca_roots: Option<PathBuf>,
    /// `file:line:col: acme.ca_roots`, for errors reading the file at start-up.
    pub ca_roots_origin: String,
}

/// How the CA checks that the gateway answers for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// RFC 8737: a TLS handshake with ALPN `acme-tls/1` on the TLS listener.
    TlsAlpn01,
    /// RFC 8555 8.3: `GET /.well-known/acme-challenge/<token>` on the plain listener.
    Http01,
}

impl AcmeChallenge {
    pub fn name(self) -> &'static str {
        match self {
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
            AcmeChallenge::Http01 => "http-01",
        }
    }
}

/// `[resolver]`: how `discover = "dns"` backends are looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolverConfig {
    /// Empty: the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// Re-resolve this often (or at the records' TTL, whichever is shorter).
    pub refresh: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            refresh: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub http_mode: HttpMode,
    pub admin: Option<SocketAddr>,
    /// Peers that may state their client's address (PROXY protocol, `X-Forwarded-For`) and
    /// keep their `X-Forwarded-Proto`.
    pub trusted_proxies: crate::trust::TrustedProxies,
    /// Connections must start with a PROXY protocol header (v1 or v2), and come from
    /// `trusted_proxies`; others are closed.
    pub proxy_protocol: bool,
    /// The HTTPS port clients use, for redirects from the plain listener (behind a port
    /// mapping or a Service it differs from the listener's own). None: the listener's port.
    pub public_https_port: Option<u16>,
    /// Connections the kernel queues for each listener before they are accepted.
    pub backlog: u32,
    /// `control_socket`: the Unix socket `streamgate health` asks.
    pub control_socket: ControlSocket,
    /// `tls_min_version`: "1.3" refuses TLS 1.2 handshakes.
    pub tls_min_version: TlsMinVersion,
    /// `hsts`: a `Strict-Transport-Security` value added to TLS responses that lack one.
    pub hsts: Option<http::HeaderValue>,
    /// `client_ca` and `client_auth`: the TLS listener asks for client certificates.
    pub client_ca: Option<ClientCa>,
}

/// Where the control socket is (`listen.control_socket`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlSocket {
    /// `"off"`.
    Off,
    /// Left out: [`crate::control::default_path`]; a gateway that cannot open it still runs.
    Default(PathBuf),
    /// Set in the file (or by `STREAMGATE_CONTROL_SOCKET`): a gateway that cannot open it
    /// does not start.
    At(PathBuf),
}

/// `[log]`: where access lines go and how they look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub access: AccessTarget,
    /// None: pretty on a terminal, JSON otherwise.
    pub format: Option<LogFormat>,
    /// Log the query string (off: tokens of browser WebSockets and event streams live there).
    pub query: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            access: AccessTarget::Stderr,
            format: None,
            query: false,
        }
    }
}

/// `log.access`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    Stderr,
    Stdout,
    Off,
    /// A file, appended to, opened again at its path on SIGUSR1 (logrotate).
    File(PathBuf),
}

/// `log.format` (and `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// What the plain-HTTP listener does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// 308 to the same host, path and query on the TLS listener.
    Redirect,
    /// Route and forward exactly as the TLS listener does.
    Proxy,
}

/// Protection that is on by default: every limit bounds what one client can hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to send a complete request head (slowloris); also ends idle keep-alive.
    pub header_read_timeout: Duration,
    /// A client connection with no request or stream in flight for this long is closed
    /// (HTTP/2 gets a GOAWAY); HTTP/1.1 keep-alive is also bounded by `header_read_timeout`.
    pub idle_timeout: Duration,
    /// Largest request head, in bytes; beyond it HTTP/1.1 clients get 431.
    pub max_header_size: usize,
    pub tls_handshake_timeout: Duration,
    /// Open client connections across all listeners; further ones wait in the kernel backlog.
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    /// Streams a client may open and reset before being served (CVE-2023-44487, rapid reset).
    pub h2_max_pending_reset_streams: usize,
    pub h2_max_local_error_reset_streams: usize,
    /// Open connections per client address; 0 = no limit (a company's NAT puts thousands of
    /// people behind one address).
    pub per_ip_connections: usize,
    /// A response, stream or WebSocket that cannot write to its client for this long while
    /// data waits is closed, and its backend side released.
    pub write_stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_header_size: 32 * 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            h2_max_concurrent_streams: 256,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
            per_ip_connections: 0,
            write_stall_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Shutdown {
    /// How long in-flight requests and streams get to finish after a shutdown signal.
    pub grace: Duration,
    /// How long the gateway keeps serving, not ready, before it stops accepting.
    pub delay: Duration,
    /// WebSocket closes and stream ends are spread evenly over this window after the drain
    /// begins, so the remaining replicas are not hit by every client in the same second.
    pub spread: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace: Duration::from_secs(30),
            delay: Duration::ZERO,
            spread: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Where each path was set, `file:line:col: cert[0].cert`, for errors about the files.
    pub cert_origin: String,
    pub key_origin: String,
}

/// One `[[route]]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Position in the file, for messages (`route[2]`).
    pub index: usize,
    pub host: HostMatch,
    /// Path prefix without a trailing slash ("" for `/`).
    pub path: String,
    pub backends: Vec<BackendConfig>,
    pub strip_prefix: bool,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
    pub balance: Balance,
    /// Extra tries on another backend for requests that can safely be sent again.
    pub retries: u32,
    /// A backend that comes (back) up gets a share rising from 10 % to 100 % over this time.
    pub slow_start: Option<Duration>,
    pub health: Option<HealthConfig>,
    pub outlier: OutlierConfig,
    pub websocket: WebSocketConfig,
    pub sse: SseConfig,
    /// `[route.rate_limit]`: requests a second per client (or per header value).
    pub rate_limit: Option<RateLimitConfig>,
    /// How long a backend that left the route keeps its WebSockets and streams before they
    /// are moved (WebSockets closed with 1012, streams resumed elsewhere).
    pub backend_drain: Duration,
    /// Each WebSocket and stream is moved once this old (±10 %).
    pub max_connection_age: Option<Duration>,
    /// Move surplus WebSockets and streams off a backend above its fair share.
    pub rebalance: bool,
    /// WebSocket upgrades and event-stream requests admitted a second (burst: the same).
    pub max_new_streams_per_second: Option<u32>,
    /// 403 without a verified client certificate (`listen.client_ca`).
    pub require_client_cert: bool,
    /// `[route.auth]`: tokens and forward auth.
    pub auth: Option<AuthConfig>,
}

/// `[route.rate_limit]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    pub burst: u32,
    pub key: RateKey,
}

/// Whose requests a route's rate limit counts together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    Header(http::HeaderName),
}

/// One entry of a route's `backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// As written in the file, for `check`, logs and `/backends`.
    pub url: String,
    /// `host:port` of the URL: what is connected to (after DNS discovery, each address).
    pub authority: Authority,
    /// 1..=100: the backend's share relative to the route's other backends.
    pub weight: u32,
    /// `discover = "dns"`: every address the name resolves to is a backend of its own.
    pub discover: bool,
}

/// How a route spreads new requests, WebSockets and streams over its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// Fewest open requests, WebSockets and streams relative to weight (the default).
    LeastConn,
    RoundRobin,
    /// Consistent (rendezvous) hashing on a key of the request.
    Hash(HashKey),
    /// Affinity by a cookie the gateway sets, named here.
    Cookie(String),
}

impl Balance {
    pub fn name(&self) -> &'static str {
        match self {
            Balance::LeastConn => "least_conn",
            Balance::RoundRobin => "round_robin",
            Balance::Hash(_) => "hash",
            Balance::Cookie(_) => "cookie",
        }
    }
}

/// What `balance = "hash"` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
}

impl std::fmt::Display for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
            HashKey::Query(name) => write!(f, "query:{name}"),
        }
    }
}

/// `[route.health]`: active checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// `[route.outlier]`: passive ejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row that eject a backend; 0 switches passive ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length; it doubles on each repeat, up to five minutes.
    pub ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 3,
            ejection: Duration::from_secs(10),
        }
    }
}

impl RouteConfig {
    /// The backends as the file lists them, comma-separated, for logs and `check`.
    pub fn backend_list(&self) -> String {
        let names: Vec<String> = self
            .backends
            .iter()
            .map(|b| {
                let mut s = b.url.clone();
                if b.weight != 1 {
                    s.push_str(&format!(" (weight {})", b.weight));
                }
                if b.discover {
                    s.push_str(" (dns)");
                }
                s
            })
            .collect();
        names.join(", ")
    }

    /// A short name for logs and error bodies: `chat.example.com/ws` or `*/api`.
    pub fn name(&self) -> String {
        let host = match &self.host {
            HostMatch::Any => "*".to_string(),
            HostMatch::Exact(h) => h.clone(),
            HostMatch::Wildcard(suffix) => format!("*{suffix}"),
        };
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        format!("{host}{path}")
    }
}

/// Which `Host` a route answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    /// Lowercase name.
    Exact(String),
    /// Lowercase suffix including the leading dot: `*.example.com` is `.example.com`.
    Wildcard(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct WebSocketConfig {
    pub ping_interval: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_message_size: Option<u64>,
    pub max_connections: Option<usize>,
    pub allowed_origins: Option<Vec<String>>,
    /// Messages a client may send a second on one WebSocket (burst: twice that); beyond it the
    /// WebSocket is closed with 1008.
    pub max_messages_per_second: Option<u32>,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            ping_interval: None,
            idle_timeout: Duration::from_secs(3600),
            max_message_size: None,
            max_connections: None,
            allowed_origins: None,
            max_messages_per_second: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SseConfig {
    /// Send a comment line when the backend has been quiet this long (at an event boundary).
    pub heartbeat: Option<Duration>,
    /// End a stream whose backend has sent nothing for this long.
    pub idle_timeout: Duration,
    /// On shutdown, send `retry: <ms>` before ending the stream, so clients reconnect after it.
    pub shutdown_retry: Option<Duration>,
    /// Continue a stream whose backend failed or was moved on another backend, from the last
    /// event id the client received.
    pub resume: bool,
    /// Backends tried per interruption before the stream ends.
    pub resume_attempts: u32,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            heartbeat: None,
            idle_timeout: Duration::from_secs(3600),
            shutdown_retry: None,
            resume: false,
            resume_attempts: 3,
        }
    }
}

/// Why a config file was refused. Display gives `file:line:col: key: what is wrong`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Whole { path: String, message: String },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if it were read from `path` (which names the file in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let at = Located { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end_matches('\n').replace('\n', "; ");
            match e.span() {
                Some(span) => at.error(span, message),
                None => ConfigError::Whole {
                    path: path.display().to_string(),
                    message,
                },
            }
        })?;
        at.validate(raw)
    }
}

/// The file being validated, to turn a byte span into `file:line:col`.
struct Located<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Located<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let mut start = span.start.min(self.text.len());
        while !self.text.is_char_boundary(start) {
            start -= 1; // never past 0: 0 is always a boundary
        }
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    /// `file:line:col: key`, for messages about a value that is checked later (files on disk).
    fn origin(&self, span: Range<usize>, key: &str) -> String {
        match self.error(span, key) {
            ConfigError::Invalid {
                path,
                line,
                column,
                message,
            } => format!("{path}:{line}:{column}: {message}"),
            other => other.to_string(),
        }
    }

    fn whole(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Whole {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let edge = self.edge_tls(&raw.listen)?;
        let listen = Listen {
            https: self.addr("listen.https", &raw.listen.https)?,
            http: raw
                .listen
                .http
                .as_ref()
                .map(|a| self.addr("listen.http", a))
                .transpose()?,
            http_mode: match raw.listen.http_mode.as_ref() {
                None => HttpMode::Redirect,
                Some(m) => match m.get_ref().as_str() {
                    "redirect" => HttpMode::Redirect,
                    "proxy" => HttpMode::Proxy,
                    other => {
                        return Err(self.error(
                            m.span(),
                            format!(
                            "listen.http_mode: expected \"redirect\" or \"proxy\", got {other:?}"
                        ),
                        ))
                    }
                },
            },
            admin: raw
                .listen
                .admin
                .as_ref()
                .map(|a| self.addr("listen.admin", a))
                .transpose()?,
            trusted_proxies: self.trusted_proxies(&raw.listen)?,
            proxy_protocol: raw
                .listen
                .proxy_protocol
                .as_ref()
                .is_some_and(|p| *p.get_ref()),
            public_https_port: raw
                .listen
                .public_https_port
                .as_ref()
                .map(|p| self.int("listen.public_https_port", p, 1..=65535))
                .transpose()?
                .map(|p| p as u16),
            backlog: self.int_or("listen.backlog", &raw.listen.backlog, 1..=65535, 1024)? as u32,
            control_socket: self.control_socket(&raw.listen.control_socket)?,
            tls_min_version: edge.0,
            hsts: edge.1,
            client_ca: edge.2,
        };
        self.listen_clashes(&raw.listen, &listen)?;
        if let (true, Some(p)) = (
            listen.trusted_proxies.is_empty(),
            &raw.listen.proxy_protocol,
        ) {
            if *p.get_ref() {
                return Err(self.error(
                    p.span(),
                    "listen.proxy_protocol: needs listen.trusted_proxies (the load balancers allowed to send the header)",
                ));
            }
        }

        let d = Limits::default();
        let l = &raw.limits;
        let limits = Limits {
            header_read_timeout: self.positive_duration_or(
                "limits.header_read_timeout",
                &l.header_read_timeout,
                d.header_read_timeout,
            )?,
            idle_timeout: self.positive_duration_or(
                "limits.idle_timeout",
                &l.idle_timeout,
                d.idle_timeout,
            )?,
            // hyper refuses a buffer below 8 KiB.
            max_header_size: self.int_or(
                "limits.max_header_size",
                &l.max_header_size,
                8192..=16 * 1024 * 1024,
                d.max_header_size,
            )?,
            tls_handshake_timeout: self.positive_duration_or(
                "limits.tls_handshake_timeout",
                &l.tls_handshake_timeout,
                d.tls_handshake_timeout,
            )?,
            max_connections: self.int_or(
                "limits.max_connections",
                &l.max_connections,
                1..=10_000_000,
                d.max_connections,
            )?,
            h2_max_concurrent_streams: self.int_or(
                "limits.h2_max_concurrent_streams",
                &l.h2_max_concurrent_streams,
                1..=1_000_000,
                d.h2_max_concurrent_streams as usize,
            )? as u32,
            h2_max_pending_reset_streams: self.int_or(
                "limits.h2_max_pending_reset_streams",
                &l.h2_max_pending_reset_streams,
                1..=1_000_000,
                d.h2_max_pending_reset_streams,
            )?,
            h2_max_local_error_reset_streams: self.int_or(
                "limits.h2_max_local_error_reset_streams",
                &l.h2_max_local_error_reset_streams,
                1..=1_000_000,
                d.h2_max_local_error_reset_streams,
            )?,
            per_ip_connections: self.int_or(
                "limits.per_ip_connections",
                &l.per_ip_connections,
                0..=10_000_000,
                d.per_ip_connections,
            )?,
            write_stall_timeout: self.positive_duration_or(
                "limits.write_stall_timeout",
                &l.write_stall_timeout,
                d.write_stall_timeout,
            )?,
        };

        let worker_threads = raw
            .runtime
            .worker_threads
            .as_ref()
            .map(|n| self.int("runtime.worker_threads", n, 1..=1024))
            .transpose()?;

        let ds = Shutdown::default();
        let shutdown = Shutdown {
            grace: self.duration_or("shutdown.grace", &raw.shutdown.grace, ds.grace)?,
            delay: self.duration_or("shutdown.delay", &raw.shutdown.delay, ds.delay)?,
            spread: self.duration_or("shutdown.spread", &raw.shutdown.spread, ds.spread)?,
        };
        if let Some(spread) = &raw.shutdown.spread {
            if !shutdown.spread.is_zero() && shutdown.spread >= shutdown.grace {
                return Err(self.error(
                    spread.span(),
                    format!(
                        "shutdown.spread: must be shorter than shutdown.grace ({}), or the grace period cuts what the spread has not closed yet",
                        humantime::format_duration(shutdown.grace)
                    ),
                ));
            }
        }

        let resolver = self.resolver(&raw.resolver)?;
        let log = self.log(&raw.log)?;

        if raw.cert.is_empty() && raw.acme.is_none() {
            return Err(self.whole(
                "no [[cert]]: the TLS listener needs at least one certificate and key, or [acme] to obtain them",
            ));
        }
        let certs = raw
            .cert
            .iter()
            .enumerate()
            .map(|(i, c)| CertFiles {
                cert: PathBuf::from(c.cert.get_ref()),
                key: PathBuf::from(c.key.get_ref()),
                cert_origin: self.origin(c.cert.span(), &format!("cert[{i}].cert")),
                key_origin: self.origin(c.key.span(), &format!("cert[{i}].key")),
            })
            .collect();

        if raw.route.is_empty() {
            return Err(self.whole(
                "no [[route]]: add at least one route with a path and backends, or the gateway can only answer 404",
            ));
        }
        let routes = raw
            .route
            .iter()
            .enumerate()
            .map(|(i, r)| self.route(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        self.duplicate_routes(&raw.route, &routes)?;
        if listen.client_ca.is_none() {
            let needs_ca = raw
                .route
                .iter()
                .enumerate()
                .find_map(|(i, r)| Some((i, r.get_ref().require_client_cert.as_ref()?)))
                .filter(|(_, v)| *v.get_ref());
            if let Some((i, v)) = needs_ca {
                return Err(self.error(
                    v.span(),
                    format!("route[{i}].require_client_cert: needs listen.client_ca (the CA bundle client certificates are checked against)"),
                ));
            }
        }
        let acme = raw
            .acme
            .as_ref()
            .map(|a| self.acme(a, &listen, raw.cert.is_empty(), &routes))
            .transpose()?;

        Ok(Config {
            path: self.path.to_path_buf(),
            listen,
            limits,
            worker_threads,
            shutdown,
            resolver,
            log,
            certs,
            routes,
            acme,
        })
    }

    fn route(&self, index: usize, spanned: &Spanned<RawRoute>) -> Result<RouteConfig, ConfigError> {
        let r = spanned.get_ref();
        let key = |name: &str| format!("route[{index}].{name}");

        let host = match &r.host {
            None => HostMatch::Any,
            Some(h) => {
                let name = h.get_ref().trim().to_ascii_lowercase();
                let valid = |s: &str| {
                    !s.is_empty()
                        && s.split('.').all(|label| {
                            !label.is_empty()
                                && label
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        })
                };
                if let Some(suffix) = name.strip_prefix("*.") {
                    if !valid(suffix) {
                        return Err(self.error(
                            h.span(),
                            format!(
                                "{}: expected a host name such as \"*.example.com\", got {:?}",
                                key("host"),
                                h.get_ref()
                            ),
                        ));
                    }
                    HostMatch::Wildcard(format!(".{suffix}"))
                } else if valid(&name) {
                    HostMatch::Exact(name)
                } else {
                    return Err(self.error(
                        h.span(),
                        format!(
                            "{}: expected a host name such as \"chat.example.com\" or \"*.example.com\" (no port), got {:?}",
                            key("host"),
                            h.get_ref()
                        ),
                    ));
                }
            }
        };

        let path = match &r.path {
            None => String::new(),
            Some(p) => {
                let s = p.get_ref();
                if !s.starts_with('/') || s.contains(['?', '#', ' ']) {
                    return Err(self.error(
                        p.span(),
                        format!(
                            "{}: expected a path prefix such as \"/ws\", got {s:?}",
                            key("path")
                        ),
                    ));
                }
                s.trim_end_matches('/').to_string()
            }
        };

        let backends = self.backends(&key("backends"), &r.backends)?;
        let fleet = self.fleet(&key, r)?;
        let rebalance = self.rebalance(&key, r, &fleet.balance)?;

        let d = WebSocketConfig::default();
        let websocket = match &r.websocket {
            None => d,
            Some(w) => WebSocketConfig {
                ping_interval: self.interval(&key("websocket.ping_interval"), &w.ping_interval)?,
                idle_timeout: self.positive_duration_or(
                    &key("websocket.idle_timeout"),
                    &w.idle_timeout,
                    d.idle_timeout,
                )?,
                max_message_size: w
                    .max_message_size
                    .as_ref()
                    .map(|v| self.int(&key("websocket.max_message_size"), v, 1..=u64::MAX as usize))
                    .transpose()?
                    .map(|v| v as u64),
                max_connections: w
                    .max_connections
                    .as_ref()
                    .map(|v| self.int(&key("websocket.max_connections"), v, 1..=10_000_000))
                    .transpose()?,
                allowed_origins: w
                    .allowed_origins
                    .as_ref()
                    .map(|list| self.allowed_origins(&key("websocket.allowed_origins"), list))
                    .transpose()?,
                max_messages_per_second: w
                    .max_messages_per_second
                    .as_ref()
                    .map(|v| self.int(&key("websocket.max_messages_per_second"), v, 1..=1_000_000))
                    .transpose()?
                    .map(|v| v as u32),
            },
        };

        let d = SseConfig::default();
        let sse = match &r.sse {
            None => d,
            Some(s) => SseConfig {
                heartbeat: self.interval(&key("sse.heartbeat"), &s.heartbeat)?,
                idle_timeout: self.positive_duration_or(
                    &key("sse.idle_timeout"),
                    &s.idle_timeout,
                    d.idle_timeout,
                )?,
                shutdown_retry: s
                    .shutdown_retry
                    .as_ref()
                    .map(|v| self.duration(&key("sse.shutdown_retry"), v))
                    .transpose()?,
                resume: s.resume,
                resume_attempts: s
                    .resume_attempts
                    .as_ref()
                    .map(|v| self.int(&key("sse.resume_attempts"), v, 1..=10))
                    .transpose()?
                    .map_or(d.resume_attempts, |v| v as u32),
            },
        };

        Ok(RouteConfig {
            index,
            host,
            path,
            backends,
            strip_prefix: r.strip_prefix,
            connect_timeout: self.positive_duration_or(
                &key("connect_timeout"),
                &r.connect_timeout,
                Duration::from_secs(5),
            )?,
            response_header_timeout: self.positive_duration_or(
                &key("response_header_timeout"),
                &r.response_header_timeout,
                Duration::from_secs(60),
            )?,
            balance: fleet.balance,
            retries: fleet.retries,
            slow_start: fleet.slow_start,
            health: fleet.health,
            outlier: fleet.outlier,
            websocket,
            sse,
            rate_limit: self.rate_limit(&key, &r.rate_limit)?,
            backend_drain: self.duration_or(
                &key("backend_drain"),
                &r.backend_drain,
                Duration::from_secs(300),
            )?,
            max_connection_age: r
                .max_connection_age
                .as_ref()
                .map(|v| self.positive_duration(&key("max_connection_age"), v))
                .transpose()?,
            rebalance,
            max_new_streams_per_second: r
                .max_new_streams_per_second
                .as_ref()
                .map(|v| self.int(&key("max_new_streams_per_second"), v, 1..=1_000_000))
                .transpose()?
                .map(|v| v as u32),
            require_client_cert: r.require_client_cert.as_ref().is_some_and(|v| *v.get_ref()),
            auth: r.auth.as_ref().map(|a| self.auth(&key, a)).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests;
