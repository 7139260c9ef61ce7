//! streamgate: a TLS gateway in front of WebSocket, Server-Sent Events and plain HTTP services.
//!
//! # Layout
//! - [`config`]: the TOML file, parsed and validated into [`config::Config`].
//! - [`tls`]: certificates, SNI selection, the rustls server config; [`acme`]: certificates
//!   ordered and renewed from an ACME CA (`[acme]`), swapped into the same store.
//! - [`listener`]: accept loops and the connection cap; [`conn`]: one client connection
//!   (PROXY protocol via [`proxy_protocol`], per-address limits via [`limiter`], writes
//!   watched by [`stall`], HTTP/2 PING and SETTINGS floods ended by [`h2_flood`]).
//! - [`trust`]: who the client is (trusted proxies, X-Forwarded-*).
//! - [`router`]: the route table.
//! - [`auth`]: edge access control: client certificates, JWTs (keys from a JWKS file or
//!   URL), forward auth.
//! - [`upstream`]: each route's backends: balancing policies, the keep-alive pool (driven by
//!   the request's own task), active health checks, passive ejection and DNS discovery.
//! - [`proxy`]: the request path (the facts of a request in `proxy::request`, forwarding,
//!   headers, errors, access log).
//! - [`upstream::held`]: WebSockets and streams asked to move (drain, age, rebalance);
//!   [`proxy::sse`] resumes streams on another backend.
//! - [`drain`]: shutdown; [`reload`]: live reload (keeps what did not change); [`admin`] and
//!   [`metrics`]: health, Prometheus metrics, `/backends` and the dashboard; [`demo`]: the
//!   built-in demo.
//!
//! # Request flow
//! accept ([`listener`]) -> PROXY header and per-address limit, TLS handshake under a
//! deadline ([`conn`]) -> hyper h1 or h2 as ALPN chose -> [`proxy::Gateway::handle`] (client
//! address, host and target checks) -> [`router::Router::find`] -> rate limit -> access
//! control ([`auth`]) -> [`proxy::forward`] ->
//! [`upstream::Upstream::pick`] (policy, health) -> [`upstream::pool`] connection, polled by
//! this request's task -> the backend's response, streamed back frame by frame; a try that
//! could not have had any effect goes to another backend.
//!
//! [`Server`] is what `main` runs and what the integration tests drive: bound listeners, a
//! validated config, loaded certificates and a shutdown future.

pub mod acme;
pub mod admin;
pub mod auth;
pub mod config;
pub mod conn;
pub mod control;
pub mod demo;
pub mod drain;
pub mod h2_flood;
pub mod limiter;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod router;
pub mod stall;
pub mod tls;
pub mod trust;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use admin::Readiness;
use config::Config;
use conn::ConnContext;
use drain::Drain;
use metrics::Metrics;
use proxy::Gateway;
use reload::Reloader;
use router::Router;
use tls::{CertStore, LoadedCert, TlsError};

/// The gateway's sockets, bound before [`serve`] so callers (tests) can bind port 0 and learn
/// the port.
pub struct Listeners {
    pub https: TcpListener,
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in `[listen]`.
    pub async fn bind(listen: &config::Listen) -> Result<Listeners, BindError> {
        let https = bind(listen.https, listen.backlog)?;
        let http = match listen.http {
            Some(addr) => Some(bind(addr, listen.backlog)?),
            None => None,
        };
        Ok(Listeners { https, http })
    }

    pub fn https_addr(&self) -> std::io::Result<SocketAddr> {
        self.https.local_addr()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (is another process using the port?)")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds with `SO_REUSEADDR` (a restart finds the port in TIME_WAIT) and `[listen] backlog`.
fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, BindError> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    };
    socket
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(backlog)
        })
        .map_err(|source| BindError { addr, source })
}

/// A gateway ready to run: routes, certificates and listeners in place.
pub struct Server {
    config: Config,
    listeners: Listeners,
    admin: Option<TcpListener>,
    /// The control socket (`listen.control_socket`), bound by the caller.
    control: Option<control::ControlSocket>,
    gateway: Arc<Gateway>,
    certs: Arc<CertStore>,
    tls: Arc<rustls::ServerConfig>,
    drain: Drain,
    ready: Arc<Readiness>,
    reloader: Option<Arc<Reloader>>,
    hangup: Option<tokio::signal::unix::Signal>,
    /// What routes need to build their backends; a reload builds with it too.
    fleet: upstream::UpstreamContext,
    /// `[acme]`: orders and renews certificates while the gateway runs.
    acme: Option<Arc<acme::Acme>>,
}

impl Server {
    pub fn new(
        config: Config,
        certs: &[LoadedCert],
        listeners: Listeners,
    ) -> Result<Server, TlsError> {
        // [acme] without [[cert]]: a self-signed default answers until certificates arrive.
        let fallback = match (&config.acme, certs.is_empty()) {
            (Some(_), true) => Some(acme_fallback(&config, certs)?),
            _ => None,
        };
        let store = Arc::new(CertStore::with_fallback(certs, fallback)?);
        let tls = tls::server_config(store.clone(), &config.listen)?;
        let https_port = config
            .listen
            .public_https_port
            .unwrap_or_else(|| listeners.https.local_addr().map_or(443, |a| a.port()));
        let metrics = Arc::new(Metrics::new());
        store.report_expiry(metrics.certificate_expiry.clone());
        let acme = match &config.acme {
            Some(a) => {
                let names = config.acme_names(certs.iter().flat_map(|c| &c.names));
                let acme = acme::Acme::new(a, names, store.clone()).map_err(TlsError::from)?;
                (!acme.names().is_empty()).then(|| Arc::new(acme))
            }
            None => None,
        };
        let drain = Drain::new();
        let fleet = upstream::UpstreamContext {
            metrics: metrics.clone(),
            drain: drain.clone(),
            resolver: resolver_for(&config),
            refresh: config.resolver.refresh,
        };
        let router = Router::new(&config.routes, &fleet, None);
        log_startup(&config, certs, &listeners, &router);
        let gateway = Arc::new(
            Gateway::new(router, &config.listen, https_port, drain.clone(), metrics)
                .with_acme(store.challenges()),
        );
        gateway.set_log_query(config.log.query);
        Ok(Server {
            config,
            listeners,
            admin: None,
            control: None,
            gateway,
            certs: store,
            tls,
            drain,
            ready: Arc::new(Readiness::default()),
            reloader: None,
            hangup: None,
            fleet,
            acme,
        })
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on `listener`.
    pub fn with_admin(mut self, listener: TcpListener) -> Server {
        self.admin = Some(listener);
        self
    }

    /// Answers `/healthz` and `/readyz` on the control socket (removed when the server ends).
    pub fn with_control(mut self, socket: control::ControlSocket) -> Server {
        self.control = Some(socket);
        self
    }

    /// Reloads from `config.path` on SIGHUP and when the files change. Needs a tokio runtime.
    pub fn watch_config(mut self) -> Server {
        self.reloader = Some(self.reloader_for());
        self.hangup = Reloader::hangup_signal();
        self
    }

    fn reloader_for(&self) -> Arc<Reloader> {
        Arc::new(Reloader {
            path: self.config.path.clone(),
            gateway: self.gateway.clone(),
            certs: self.certs.clone(),
            running: std::sync::Mutex::new(self.config.clone()),
            fleet: std::sync::Mutex::new(self.fleet.clone()),
        })
    }

    /// A handle to reload by hand (what SIGHUP does), for tests and embedders.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone().unwrap_or_else(|| self.reloader_for())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.gateway.metrics.clone()
    }

    /// Runs until `shutdown` resolves, then drains: not ready at once, still serving for
    /// `shutdown.delay`, then no new connections, in-flight requests finish, WebSockets get
    /// Close 1001 and event streams end at an event boundary, all within `shutdown.grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let ctx = Arc::new(ConnContext::new(
            self.gateway.clone(),
            self.config.limits.clone(),
            self.drain.clone(),
        ));
        let slots = Arc::new(Semaphore::new(self.config.limits.max_connections));
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(listener::accept_loop(
            self.listeners.https,
            listener::Kind::Tls(tokio_rustls::TlsAcceptor::from(self.tls)),
            ctx.clone(),
            slots.clone(),
        ));
        if let Some(http) = self.listeners.http {
            loops.spawn(listener::accept_loop(
                http,
                listener::Kind::Plain,
                ctx.clone(),
                slots,
            ));
        }
        // The admin listener outlives the drain, so /readyz can say 503 while it runs.
        let admin = self.admin.map(|l| {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "admin listening: /healthz /readyz /metrics");
            }
            tokio::spawn(admin::serve(l, self.gateway.clone(), self.ready.clone()))
        });
        // Like the admin listener, the control socket answers until the end.
        let control = self.control.map(|socket| {
            tracing::info!(path = %socket.path().display(), "control socket listening: /healthz /readyz");
            let (listener, file) = socket.split();
            (tokio::spawn(control::serve(listener, self.ready.clone())), file)
        });
        if let Some(reloader) = &self.reloader {
            tokio::spawn(reloader.clone().watch(self.hangup, self.drain.clone()));
        }
        if let Some(acme) = &self.acme {
            self.drain.spawn(acme.clone().run(self.drain.clone()));
        }

        shutdown.await;
        self.ready.set_not_ready();
        // The shutdown settings in force: a reload may have changed them.
        let settings = self
            .reloader
            .as_ref()
            .and_then(|r| r.running.lock().ok().map(|c| c.shutdown.clone()))
            .unwrap_or_else(|| self.config.shutdown.clone());
        let delay = settings.delay;
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "draining: not ready, still serving for shutdown.delay"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!(
            grace_ms = settings.grace.as_millis() as u64,
            open = self.drain.active(),
            "shutting down: no new connections, finishing in-flight requests and streams"
        );
        self.drain.shutdown(settings.grace, settings.spread).await;
        while loops.join_next().await.is_some() {}
        if let Some(admin) = admin {
            admin.abort();
        }
        if let Some((control, _file)) = control {
            control.abort();
        }
        tracing::info!("shutdown complete");
    }
}

/// Runs the gateway on `listeners` until `shutdown` resolves, then drains (see [`Server::run`]).
pub async fn serve(
    config: &Config,
    certs: &[LoadedCert],
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError> {
    Server::new(config.clone(), certs, listeners)?
        .run(shutdown)
        .await;
    Ok(())
}

/// The default certificate of an `[acme]`-only gateway, until (and for clients without SNI
/// after) its certificates arrive: self-signed for the names to certify, made in memory.
fn acme_fallback(config: &Config, certs: &[LoadedCert]) -> Result<LoadedCert, TlsError> {
    let names = config.acme_names(certs.iter().flat_map(|c| &c.names));
    let names: Vec<&str> = match names.is_empty() {
        true => vec!["streamgate.invalid"],
        false => names.iter().map(String::as_str).collect(),
    };
    let (mut cert, _) = tls::self_signed(&names)?;
    cert.source = "self-signed fallback (in memory, until ACME certificates arrive)".to_string();
    Ok(cert)
}

/// The DNS resolver for `discover = "dns"` backends, when a route has one. A resolver that
/// cannot be set up is a warning: those backends stay empty, the rest of the gateway serves.
pub fn resolver_for(config: &Config) -> Option<Arc<upstream::discovery::Resolver>> {
    let needed = config
        .routes
        .iter()
        .any(|r| r.backends.iter().any(|b| b.discover));
    if !needed {
        return None;
    }
    match upstream::discovery::Resolver::new(&config.resolver) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            tracing::warn!(error = %proxy::error::error_chain(&e), "cannot set up DNS discovery; discovered backends get no addresses");
            None
        }
    }
}

fn log_startup(config: &Config, certs: &[LoadedCert], listeners: &Listeners, router: &Router) {
    if let Ok(addr) = listeners.https.local_addr() {
        tracing::info!(%addr, protocols = "h2, http/1.1", "listening (TLS)");
    }
    if let Some(addr) = listeners.http.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, mode = ?config.listen.http_mode, "listening (plain HTTP)");
    }
    for c in certs {
        c.log();
    }
    // Names [acme] is obtaining count as covered.
    let mut named: Vec<String> = certs.iter().flat_map(|c| c.names.clone()).collect();
    named.extend(config.acme_names(&named));
    for w in config.uncovered_hosts(&named) {
        tracing::warn!(index = w.route, host = %w.host, "route host is not covered by any certificate: clients will see a name mismatch");
    }
    for r in router.routes() {
        let backends = r.config.backend_list();
        tracing::info!(route = %r.name, balance = r.config.balance.name(), %backends, strip_prefix = r.config.strip_prefix, "route");
    }
}
