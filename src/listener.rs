//! Accept loops: take connections while under the connection cap, give each its own task
//! (spawned through the drain), and stop accepting when shutdown begins.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::conn::{conn_span, ConnContext};

/// Connection ids for logs, unique within the process.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// What a listener does with the connections it accepts.
#[derive(Clone)]
pub enum Kind {
    Tls(TlsAcceptor),
    Plain,
}

/// Accepts until the drain begins. `slots` caps open connections across listeners: when it is
/// empty the loop waits, and further clients wait in the kernel's backlog.
pub async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    ctx: Arc<ConnContext>,
    slots: Arc<Semaphore>,
) {
    let name = match kind {
        Kind::Tls(_) => "https",
        Kind::Plain => "http",
    };
    let mut errors = AcceptErrors::new(name);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // closed: never happens, the semaphore lives as long as we do
            },
            _ = ctx.drain.draining() => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    errors.pause(&e).await;
                    continue;
                }
            },
            _ = ctx.drain.draining() => return,
        };
        tune(&tcp);
        let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
        let span = conn_span(id, peer, name);
        let acceptor = match &kind {
            Kind::Tls(a) => Some(a.clone()),
            Kind::Plain => None,
        };
        let conn_ctx = ctx.clone();
        let task = async move {
            tracing::debug!("connection open");
            match acceptor {
                Some(acceptor) => conn_ctx.serve_tls(id, tcp, peer, acceptor, permit).await,
                None => conn_ctx.serve_plain(id, tcp, peer, permit).await,
            }
            tracing::debug!("connection closed");
        };
        ctx.drain.spawn(task.instrument(span));
    }
}

/// What an accept loop does when `accept` fails, so that no loop spins on an error that the
/// next `accept` returns again (axum's `serve` does the same).
pub struct AcceptErrors {
    listener: &'static str,
    last_warned: Option<Instant>,
    /// Errors since the last warning that were not logged, so the next warning can say so.
    unlogged: u64,
}

/// How long a listener waits after an error that is not one connection's: out of file
/// descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM) lasts until something closes.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

impl AcceptErrors {
    /// `listener` names the loop in logs: "https", "http", "admin", "demo backend".
    pub fn new(listener: &'static str) -> AcceptErrors {
        AcceptErrors {
            listener,
            last_warned: None,
            unlogged: 0,
        }
    }

    /// Logs `e` (a warning at most once a second) and waits [`ACCEPT_PAUSE`] unless it concerns
    /// one connection only, which the next `accept` will not see again.
    /// The next connection on `listener`, backing off on errors as [`AcceptErrors::pause`]
    /// does (the accept loops that have nothing else to wait on: admin, demo).
    pub async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => self.pause(&e).await,
            }
        }
    }

    pub async fn pause(&mut self, e: &io::Error) {
        if let Some(pause) = self.record(e, Instant::now()) {
            tokio::time::sleep(pause).await;
        }
    }

    /// The decision of [`AcceptErrors::pause`], at `now`: how long to wait, if at all.
    fn record(&mut self, e: &io::Error, now: Instant) -> Option<Duration> {
        if is_connection_error(e) {
            tracing::debug!(listener = self.listener, error = %e, "accept: connection gone before it was accepted");
            return None;
        }
        let due = self
            .last_warned
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1));
        if due {
            tracing::warn!(listener = self.listener, error = %e, unlogged = self.unlogged, "accept failed: pausing before the next accept");
            self.last_warned = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        Some(ACCEPT_PAUSE)
    }
}

/// Errors that concern one connection only, not the listener: the peer reset or went away
/// between the handshake and `accept`, or a network error pending on the new socket, which
/// Linux's accept(2) reports and says to treat like EAGAIN.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// No Nagle delay (small WebSocket and SSE writes go out at once) and TCP keepalive, so a
/// peer that vanished without a FIN is noticed on long-lived idle connections.
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn accept_errors_of_one_connection_do_not_pause() {
        let mut errors = AcceptErrors::new("test");
        let now = Instant::now();
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::Interrupted,
        ] {
            assert_eq!(errors.record(&io::Error::from(kind), now), None, "{kind:?}");
        }
        // ECONNABORTED as accept(2) returns it.
        #[cfg(target_os = "linux")]
        assert_eq!(errors.record(&os(103), now), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn accept_errors_of_the_system_pause_and_warn_once_a_second() {
        let mut errors = AcceptErrors::new("test");
        let start = Instant::now();
        // EMFILE, ENFILE, ENOBUFS, ENOMEM (Linux numbers).
        for code in [24, 23, 105, 12] {
            assert_eq!(
                errors.record(&os(code), start),
                Some(ACCEPT_PAUSE),
                "{}",
                os(code)
            );
        }
        assert_eq!(errors.last_warned, Some(start), "the first one warned");
        assert_eq!(
            errors.unlogged, 3,
            "the next three in the same second did not"
        );
        let later = start + Duration::from_secs(1);
        errors.record(&os(24), later);
        assert_eq!(errors.last_warned, Some(later));
        assert_eq!(errors.unlogged, 0);
    }
}
