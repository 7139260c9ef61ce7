//! streamgate: a TLS gateway in front of WebSocket, Server-Sent Events and plain HTTP services.
//!
//! # Layout
//! - [`config`]: the TOML file, parsed and validated into [`config::Config`].
//! - [`tls`]: certificates, SNI selection, the rustls server config.
//! - [`listener`]: accept loops and the connection cap; [`conn`]: one client connection.
//! - [`router`]: the route table; [`upstream`]: the pooled backend client.
//! - [`proxy`]: the request path (forwarding, headers, errors, access log).
//! - [`drain`]: shutdown; [`demo`]: the built-in demo.
//!
//! # Request flow
//! accept ([`listener`]) -> TLS handshake under a deadline ([`conn`]) -> hyper h1/h2 by ALPN
//! -> [`proxy::Gateway::handle`] -> [`router::Router::find`] -> [`proxy::forward`] ->
//! [`upstream`] pool -> the backend's response, streamed back frame by frame.
//!
//! [`serve`] is what `main` runs and what the integration tests drive: bound listeners, a
//! validated config, loaded certificates and a shutdown future.

pub mod config;
pub mod conn;
pub mod demo;
pub mod drain;
pub mod listener;
pub mod proxy;
pub mod router;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use config::Config;
use conn::ConnContext;
use drain::Drain;
use proxy::Gateway;
use router::Router;
use tls::{LoadedCert, TlsError};

/// The gateway's sockets, bound before [`serve`] so callers (tests) can bind port 0 and learn
/// the port.
pub struct Listeners {
    pub https: TcpListener,
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in `[listen]`.
    pub async fn bind(listen: &config::Listen) -> Result<Listeners, BindError> {
        let https = bind(listen.https).await?;
        let http = match listen.http {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Listeners { https, http })
    }

    pub fn https_addr(&self) -> std::io::Result<SocketAddr> {
        self.https.local_addr()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source} (is another process using the port?)")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Runs the gateway on `listeners` until `shutdown` resolves, then drains: stops accepting,
/// lets in-flight requests finish within `shutdown.grace`, and cuts what is left.
pub async fn serve(
    config: &Config,
    certs: &[LoadedCert],
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError> {
    let tls = tls::server_config(certs)?;
    let https_addr = listeners.https.local_addr().ok();
    let https_port = https_addr.map_or(443, |a| a.port());
    let router = Router::new(&config.routes);
    log_startup(config, certs, &listeners, &router);

    let drain = Drain::new();
    let gateway = Arc::new(Gateway::new(
        router,
        config.listen.http_mode,
        https_port,
        drain.clone(),
    ));
    let ctx = Arc::new(ConnContext::new(gateway, config.limits.clone(), drain.clone()));
    let slots = Arc::new(Semaphore::new(config.limits.max_connections));

    let mut loops = tokio::task::JoinSet::new();
    loops.spawn(listener::accept_loop(
        listeners.https,
        listener::Kind::Tls(tokio_rustls::TlsAcceptor::from(tls)),
        ctx.clone(),
        slots.clone(),
    ));
    if let Some(http) = listeners.http {
        loops.spawn(listener::accept_loop(http, listener::Kind::Plain, ctx.clone(), slots));
    }

    shutdown.await;
    tracing::info!(
        grace_ms = config.shutdown.grace.as_millis() as u64,
        open = drain.active(),
        "shutting down: no new connections, finishing in-flight requests"
    );
    drain.shutdown(config.shutdown.grace).await;
    while loops.join_next().await.is_some() {}
    tracing::info!("shutdown complete");
    Ok(())
}

fn log_startup(config: &Config, certs: &[LoadedCert], listeners: &Listeners, router: &Router) {
    if let Ok(addr) = listeners.https.local_addr() {
        tracing::info!(%addr, protocols = "h2, http/1.1", "listening (TLS)");
    }
    if let Some(addr) = listeners.http.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, mode = ?config.listen.http_mode, "listening (plain HTTP)");
    }
    for c in certs {
        if c.expired {
            tracing::warn!(source = %c.source, names = ?c.names, not_after = %c.not_after, "certificate has expired: clients will refuse it");
        } else {
            tracing::info!(source = %c.source, names = ?c.names, not_after = %c.not_after, "certificate");
        }
    }
    for r in router.routes() {
        let backends: Vec<String> = r.config.backends.iter().map(|b| b.to_string()).collect();
        tracing::info!(route = %r.name, backends = ?backends, strip_prefix = r.config.strip_prefix, "route");
    }
}
