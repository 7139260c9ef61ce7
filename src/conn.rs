//! One client connection: the TLS handshake under a deadline, then hyper's HTTP/1.1 or HTTP/2
//! server (by ALPN, else by the preface) with the protection limits, until the client leaves or
//! the drain ends it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::config::Limits;
use crate::drain::Drain;
use crate::metrics::ConnLabels;
use crate::proxy::{ConnInfo, Gateway};

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Everything a connection task needs, shared by all connections of a listener.
pub struct ConnContext {
    pub gateway: Arc<Gateway>,
    pub limits: Limits,
    pub drain: Drain,
    /// hyper's server settings, built once from `limits`, one per protocol. The protocol is
    /// decided before either is used (ALPN, else the preface), so a connection speaks exactly
    /// one: hyper-util's `auto` builder ignores `http1_only`/`http2_only` when serving with
    /// upgrades and would let an `h2` client speak HTTP/1.1.
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// Open connections by client address, for `limits.per_ip_connections`.
    by_ip: Arc<crate::limiter::ConnectionsByIp>,
}

impl ConnContext {
    pub fn new(gateway: Arc<Gateway>, limits: Limits, drain: Drain) -> ConnContext {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // The exact limit on a request head (431 beyond it); the buffer bound alone depends
            // on how the bytes happen to arrive.
            .max_header_size(limits.max_header_size)
            .max_buf_size(limits.max_header_size)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
            .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
            .max_header_list_size(limits.max_header_size as u32)
            // RFC 8441 3: WebSockets over HTTP/2.
            .enable_connect_protocol();
        ConnContext {
            gateway,
            limits,
            drain,
            h1,
            h2,
            by_ip: Arc::default(),
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
        let mut tcp = tcp;
        let Some(admitted) = self.admit(&mut tcp, peer).await else {
            return;
        };
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
        if alpn.as_deref().map(str::as_bytes) == Some(crate::acme::ACME_TLS_ALPN) {
            // RFC 8737 3: an ACME tls-alpn-01 validation; the handshake was the answer. Never
            // served as HTTP.
            tracing::debug!("acme tls-alpn-01 validation answered");
            let mut tls = tls;
            let _ = tokio::time::timeout(self.limits.tls_handshake_timeout, tls.shutdown()).await;
            return;
        }
        // The protocol ALPN chose is the protocol spoken (RFC 7301 3.2; RFC 9113 3.2).
        let proto = match alpn.as_deref() {
            Some("h2") => Proto::H2,
            Some(_) => Proto::H1,
            None => Proto::Auto,
        };
        let accepted = Accepted {
            id,
            peer,
            listener: "https",
            tls: true,
            tls_version: match session.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
                Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
                _ => None,
            },
            // Only a certificate that verified against `listen.client_ca` gets this far.
            client_cert: session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| crate::auth::ClientCert::from_der(leaf))
                .map(Arc::new),
            permit: slot,
            admitted,
        };
        self.serve(tls, accepted, proto).await
    }

    /// Serves a connection accepted on the plain listener.
    pub async fn serve_plain(
        self: Arc<Self>,
        id: u64,
        tcp: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
    ) {
        let mut tcp = tcp;
        let Some(admitted) = self.admit(&mut tcp, peer).await else {
            return;
        };
        let accepted = Accepted {
            id,
            peer,
            listener: "http",
            tls: false,
            tls_version: None,
            client_cert: None,
            permit: slot,
            admitted,
        };
        self.serve(tcp, accepted, Proto::Auto).await
    }

    /// Who the client is, and whether it may open another connection: the PROXY protocol
    /// header first when it is required (only trusted balancers may send one, under the header
    /// read deadline), then `limits.per_ip_connections` for that client. None: closed.
    async fn admit(&self, tcp: &mut TcpStream, peer: SocketAddr) -> Option<Admitted> {
        let gateway = &self.gateway;
        let peer_trusted = gateway.trusted.contains(peer.ip());
        let (client, proxied) = if gateway.proxy_protocol {
            if !peer_trusted {
                tracing::debug!("closed: not a trusted proxy, and proxy_protocol requires one");
                return None;
            }
            let read = crate::proxy_protocol::read_header(tcp, self.limits.header_read_timeout);
            match read.await {
                Ok(source) => (source.map_or(peer.ip(), |s| s.ip()), true),
                Err(e) => {
                    tracing::debug!(error = %e, "closed: bad PROXY protocol header");
                    return None;
                }
            }
        } else {
            (peer.ip(), false)
        };
        let ip_guard = match self.limits.per_ip_connections {
            0 => None,
            max => match self.by_ip.try_open(client, max) {
                Some(guard) => Some(guard),
                None => {
                    tracing::debug!(client = %client, max, "closed: limits.per_ip_connections reached");
                    gateway.metrics.per_ip_refused.inc();
                    return None;
                }
            },
        };
        if proxied {
            tracing::Span::current().record("client.addr", tracing::field::display(client));
        }
        Some(Admitted {
            client,
            forwarded_trusted: peer_trusted && !proxied,
            ip_guard,
        })
    }

    /// Counts the connection as open until its last holder lets go of the slot.
    fn slot(&self, accepted: Accepted, h2: bool) -> Arc<ConnSlot> {
        let protocol = if h2 { "h2" } else { "h1" };
        let open = self
            .gateway
            .metrics
            .connections
            .get_or_create_owned(&ConnLabels {
                listener: accepted.listener,
                protocol,
            });
        open.inc();
        Arc::new(ConnSlot {
            _permit: accepted.permit,
            _ip: accepted.admitted.ip_guard,
            open,
        })
    }

    async fn serve<I>(&self, io: I, accepted: Accepted, proto: Proto)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        // Every write to the client reports whether it could proceed (write_stall_timeout).
        let write_stall = Arc::new(crate::stall::WriteStall::new(
            self.limits.write_stall_timeout,
        ));
        let io = crate::stall::Watched::new(io, write_stall.clone());
        let (io, h2) = match proto {
            Proto::H1 => (Rewind::new(io, Bytes::new()), false),
            // h2 by ALPN: the preface is checked here, so a bad one gets a GOAWAY (hyper's h2
            // server just closes). No ALPN (the plain listener, or a TLS client that offered
            // none): the preface decides. Both under the idle deadline and the drain.
            Proto::H2 | Proto::Auto => {
                let detected = tokio::select! {
                    r = detect(io) => r,
                    _ = activity.idle(self.limits.idle_timeout) => {
                        tracing::debug!("connection closed before its first bytes");
                        return;
                    }
                    _ = self.drain.draining() => return,
                };
                match detected {
                    Ok((io, false)) if matches!(proto, Proto::H2) => {
                        tracing::debug!("invalid http/2 preface");
                        self.refuse_h2(io).await;
                        return;
                    }
                    Ok(detected) => detected,
                    Err(e) => {
                        tracing::debug!(error = %e, "connection ended before its first bytes");
                        return;
                    }
                }
            }
        };
        let conn = ConnInfo {
            id: accepted.id,
            peer: accepted.peer,
            client: accepted.admitted.client,
            forwarded_trusted: accepted.admitted.forwarded_trusted,
            tls: accepted.tls,
            tls_version: accepted.tls_version,
            client_cert: accepted.client_cert.clone(),
            slot: self.slot(accepted, h2),
            activity: activity.clone(),
            write_stall: write_stall.clone(),
        };
        let gateway = self.gateway.clone();
        let refused = (conn.id, conn.client, conn.tls_version);
        // HTTP/2 streams run in tasks of their own: carry the connection's span into them.
        let span = tracing::Span::current();
        let service = service_fn(move |req| {
            gateway
                .clone()
                .handle(req, conn.clone())
                .instrument(span.clone())
        });
        if h2 {
            // hyper answers every PING and SETTINGS: the guard bounds how many a client gets.
            let io = TokioIo::new(crate::h2_flood::FloodGuard::new(io));
            let served = self.h2.serve_connection(io, service);
            let _ = self
                .drive(served, |c| c.graceful_shutdown(), &activity, &write_stall)
                .await;
        } else {
            let io = TokioIo::new(io);
            let served = self.h1.serve_connection(io, service).with_upgrades();
            let result = self
                .drive(served, |c| c.graceful_shutdown(), &activity, &write_stall)
                .await;
            // hyper answers a request head it cannot parse itself (RFC 9110 15.5.1, RFC 6585
            // 5), before the gateway sees a request: its access line is written here, with
            // the status hyper chose (a URI too long gets 414 from hyper, counted as 431 here:
            // hyper's error does not tell the two apart).
            if let Err(e) = result {
                let status = if e.is_parse_too_large() {
                    Some((431, "request head too large"))
                } else if e.is_parse() && !e.is_parse_version_h2() && !e.is_parse_status() {
                    Some((400, "malformed request head"))
                } else {
                    None
                };
                if let Some((status, reason)) = status {
                    let (id, client, tls) = refused;
                    crate::proxy::access::refused_by_hyper(id, client, tls, status, reason);
                }
            }
        }
    }

    /// Ends an `h2` connection whose client preface is invalid: a connection error of type
    /// PROTOCOL_ERROR (RFC 9113 3.4), so our preface (an empty SETTINGS) and a GOAWAY (5.4.1).
    async fn refuse_h2<I>(&self, mut io: I)
    where
        I: AsyncWrite + Unpin,
    {
        const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        // Length 8, type GOAWAY, stream 0; last stream 0, error code PROTOCOL_ERROR (0x1).
        const GOAWAY: [u8; 17] = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1];
        let refused = async {
            io.write_all(&[SETTINGS.as_slice(), GOAWAY.as_slice()].concat())
                .await?;
            io.shutdown().await
        };
        match tokio::time::timeout(self.limits.header_read_timeout, refused).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "goaway not sent"),
            Err(_) => tracing::debug!("goaway not sent in time"),
        }
    }

    /// Drives a hyper connection until it ends, its client has not read for
    /// `limits.write_stall_timeout` while data waited (closed at once), it has been idle for
    /// `limits.idle_timeout`, or the drain begins; the last two shut it down gracefully and cut
    /// it when the drain's grace ends.
    async fn drive<C>(
        &self,
        served: C,
        graceful_shutdown: fn(Pin<&mut C>),
        activity: &Activity,
        write_stall: &crate::stall::WriteStall,
    ) -> hyper::Result<()>
    where
        C: Future<Output = hyper::Result<()>>,
    {
        tokio::pin!(served);
        let result = tokio::select! {
            r = served.as_mut() => r,
            _ = write_stall.stalled() => {
                // Dropping the connection drops its responses, and their backend connections
                // with them.
                tracing::warn!(
                    timeout_ms = self.limits.write_stall_timeout.as_millis() as u64,
                    "client stopped reading: closed after limits.write_stall_timeout"
                );
                Ok(())
            }
            _ = activity.idle(self.limits.idle_timeout) => {
                tracing::debug!("idle connection closed");
                graceful_shutdown(served.as_mut());
                tokio::select! {
                    r = served.as_mut() => r,
                    _ = self.drain.cut() => Ok(()),
                }
            }
            _ = self.drain.draining() => {
                // Finish in-flight requests, take no new ones; cut at the end of the grace.
                graceful_shutdown(served.as_mut());
                tokio::select! {
                    r = served.as_mut() => r,
                    _ = self.drain.cut() => Ok(()),
                }
            }
        };
        if let Err(e) = &result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        result
    }
}

/// An accepted connection before its protocol is known.
struct Accepted {
    id: u64,
    peer: SocketAddr,
    listener: &'static str,
    tls: bool,
    tls_version: Option<&'static str>,
    /// The verified client certificate (`listen.client_ca`).
    client_cert: Option<Arc<crate::auth::ClientCert>>,
    permit: OwnedSemaphorePermit,
    admitted: Admitted,
}

/// What [`ConnContext::admit`] learnt about a new connection.
struct Admitted {
    client: std::net::IpAddr,
    forwarded_trusted: bool,
    ip_guard: Option<crate::limiter::IpGuard>,
}

/// Reads until the bytes are the HTTP/2 preface (RFC 9113 3.4) or cannot become it, and returns
/// the connection with those bytes put back and whether it is HTTP/2. Like hyper-util's `auto`,
/// which this replaces, it stops at the first byte that differs, so an HTTP/1.1 request shorter
/// than the preface is not kept waiting.
async fn detect<I>(mut io: I) -> io::Result<(Rewind<I>, bool)>
where
    I: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    while buf.len() < H2_PREFACE.len() {
        let before = buf.len();
        let mut chunk = [0; 24];
        let want = H2_PREFACE.len() - before;
        let n = io.read(&mut chunk[..want]).await?;
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 || buf[before..] != H2_PREFACE[before..buf.len()] {
            return Ok((Rewind::new(io, buf.into()), false));
        }
    }
    Ok((Rewind::new(io, buf.into()), true))
}

/// A connection with bytes already read from it put back in front.
struct Rewind<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    fn new(io: I, prefix: Bytes) -> Rewind<I> {
        Rewind { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What an open client connection holds, for as long as it is open: its place under
/// `limits.max_connections` and its count in `open_connections`. An HTTP/1.1 WebSocket tunnel
/// outlives hyper's connection task and keeps a clone, so the connection still counts.
#[derive(Debug)]
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    /// The connection's place under `limits.per_ip_connections`.
    _ip: Option<crate::limiter::IpGuard>,
    open: Gauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The protocol a connection speaks: by ALPN, or, without ALPN, by its first bytes.
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
