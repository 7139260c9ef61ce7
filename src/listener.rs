//! Accept loops: take connections while under the connection cap, give each its own task
//! (spawned through the drain), and stop accepting when shutdown begins.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors or memory: say so, and give the system a moment.
                    tracing::error!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
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

/// Errors that concern one connection only (RST before accept and the like), not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
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
