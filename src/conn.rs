//! One client connection: the TLS handshake under a deadline, then hyper's HTTP/1.1 or HTTP/2
//! server (by ALPN) with the protection limits, until the client leaves or the drain ends it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::config::Limits;
use crate::drain::Drain;
use crate::metrics::ConnLabels;
use crate::proxy::{ConnInfo, Gateway};

/// Everything a connection task needs, shared by all connections of a listener.
pub struct ConnContext {
    pub gateway: Arc<Gateway>,
    pub limits: Limits,
    pub drain: Drain,
    /// hyper's server settings, built once from `limits`: by ALPN, auto-detected, h1, h2.
    auto: auto::Builder<TokioExecutor>,
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

impl ConnContext {
    pub fn new(gateway: Arc<Gateway>, limits: Limits, drain: Drain) -> ConnContext {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_size)
            .keep_alive(true)
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
            .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
            .max_header_list_size(limits.max_header_size as u32)
            .enable_connect_protocol();
        ConnContext {
            gateway,
            limits,
            drain,
            h1: builder.clone().http1_only(),
            h2: builder.clone().http2_only(),
            auto: builder,
        }
    }

    /// Serves a connection accepted on the TLS listener.
    pub async fn serve_tls(
        self: Arc<Self>,
        id: u64,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
        slot: OwnedSemaphorePermit,
    ) {
        let handshake =
            tokio::time::timeout(self.limits.tls_handshake_timeout, acceptor.accept(tcp)).await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.gateway.metrics.tls_handshake_failures.inc();
                tracing::debug!(error = %e, "tls handshake failed");
                return;
            }
            Err(_) => {
                self.gateway.metrics.tls_handshake_failures.inc();
                tracing::debug!("tls handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let alpn = session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let sni = session.server_name().map(str::to_owned);
        let span = tracing::Span::current();
        span.record("sni", sni.as_deref().unwrap_or("-"));
        span.record("alpn", alpn.as_deref().unwrap_or("-"));
        let proto = match alpn.as_deref() {
            Some("h2") => Proto::H2,
            Some(_) => Proto::H1,
            None => Proto::Auto,
        };
        let conn = ConnInfo {
            id,
            peer,
            tls: true,
            slot: self.slot(slot, "https", &proto),
            activity: Arc::new(Activity::new()),
        };
        self.serve(tls, conn, proto).await
    }

    /// Serves a connection accepted on the plain listener.
    pub async fn serve_plain(
        self: Arc<Self>,
        id: u64,
        tcp: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
    ) {
        let conn = ConnInfo {
            id,
            peer,
            tls: false,
            slot: self.slot(slot, "http", &Proto::Auto),
            activity: Arc::new(Activity::new()),
        };
        self.serve(tcp, conn, Proto::Auto).await
    }

    /// Counts the connection as open until its last holder lets go of the slot.
    fn slot(
        &self,
        permit: OwnedSemaphorePermit,
        listener: &'static str,
        proto: &Proto,
    ) -> Arc<ConnSlot> {
        // Without ALPN, hyper tells h1 from h2 by the preface; count those as h1 (the usual case).
        let protocol = if matches!(proto, Proto::H2) {
            "h2"
        } else {
            "h1"
        };
        let open = self
            .gateway
            .metrics
            .connections
            .get_or_create_owned(&ConnLabels { listener, protocol });
        open.inc();
        Arc::new(ConnSlot {
            _permit: permit,
            open,
        })
    }

    async fn serve<I>(&self, io: I, conn: ConnInfo, proto: Proto)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gateway = self.gateway.clone();
        let activity = conn.activity.clone();
        // HTTP/2 streams run in tasks of their own: carry the connection's span into them.
        let span = tracing::Span::current();
        let service = service_fn(move |req| {
            gateway
                .clone()
                .handle(req, conn.clone())
                .instrument(span.clone())
        });
        let builder = match proto {
            Proto::H1 => &self.h1,
            Proto::H2 => &self.h2,
            Proto::Auto => &self.auto,
        };
        let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(served);
        let result = tokio::select! {
            r = served.as_mut() => r,
            _ = activity.idle(self.limits.idle_timeout) => {
                tracing::debug!("idle connection closed");
                served.as_mut().graceful_shutdown();
                tokio::select! {
                    r = served.as_mut() => r,
                    _ = self.drain.cut() => Ok(()),
                }
            }
            _ = self.drain.draining() => {
                // Finish in-flight requests, take no new ones; cut at the end of the grace.
                served.as_mut().graceful_shutdown();
                tokio::select! {
                    r = served.as_mut() => r,
                    _ = self.drain.cut() => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// What an open client connection holds, for as long as it is open: its place under
/// `limits.max_connections` and its count in `open_connections`. An HTTP/1.1 WebSocket tunnel
/// outlives hyper's connection task and keeps a clone, so the connection still counts.
#[derive(Debug)]
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

enum Proto {
    H1,
    H2,
    Auto,
}

/// The span every log line of one connection carries.
pub fn conn_span(id: u64, peer: SocketAddr, listener: &'static str) -> tracing::Span {
    tracing::info_span!(
        "conn",
        conn_id = id,
        client.addr = %peer,
        listener,
        sni = tracing::field::Empty,
        alpn = tracing::field::Empty
    )
}

/// What is in flight on one client connection, so an idle one can be closed: requests until
/// their response body is done, and WebSocket tunnels until they end.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `base` when the connection last became idle.
    idle_since: AtomicU64,
    base: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    /// Marks one request or tunnel in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// How long nothing has been in flight (zero while something is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(since)
    }

    /// Resolves once the connection has been idle for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }
}

/// One request or tunnel in flight on a connection.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let now = self.0.base.elapsed().as_millis() as u64;
        self.0.idle_since.store(now, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
