//! The control socket (`listen.control_socket`): a Unix socket on which the running gateway
//! answers `GET /healthz` and `GET /readyz` as the admin listener does, so `streamgate health`
//! asks the process itself and never guesses an address from a config file.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;

use crate::admin::Readiness;

/// The environment variable naming the socket, for the gateway (when the config leaves
/// `listen.control_socket` out) and for `streamgate health`.
pub const SOCKET_ENV: &str = "STREAMGATE_CONTROL_SOCKET";

/// Where the socket is when nothing names it: `$XDG_RUNTIME_DIR/streamgate.sock` (a directory
/// of the user's own), else `/tmp/streamgate-<uid>.sock`. Both are writable by a non-root
/// user, and both are what `streamgate health` looks at by default.
pub fn default_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Path::new(&dir).join("streamgate.sock");
    }
    // The uid without unsafe code: the owner of our own /proc entry.
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self") {
        Ok(m) => PathBuf::from(format!("/tmp/streamgate-{}.sock", m.uid())),
        Err(_) => PathBuf::from("/tmp/streamgate.sock"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot open the control socket {path} (listen.control_socket)")]
    Bind {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path} is in use by another running gateway (set listen.control_socket or {SOCKET_ENV} to another path)")]
    InUse { path: String },
    #[error("control socket {path} exists and is not a socket: not replacing it")]
    NotASocket { path: String },
}

/// The bound socket; its file is removed when this (or its [`SocketFile`]) is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    file: SocketFile,
}

/// The socket's path; the file is removed when this is dropped.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ControlSocket {
    /// Binds `path` (mode 0600). A socket file left by a gateway that is gone is replaced; one
    /// that a live gateway answers on is not.
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let shown = || path.display().to_string();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket { path: shown() });
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse { path: shown() });
            }
            // Stale: its gateway is gone.
            let _ = std::fs::remove_file(path);
        }
        let bind = || -> io::Result<UnixListener> {
            let listener = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Ok(listener)
        };
        let listener = bind().map_err(|source| ControlError::Bind {
            path: shown(),
            source,
        })?;
        Ok(ControlSocket {
            listener,
            file: SocketFile(path.to_path_buf()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// The listener to serve, and the file to remove once serving is over.
    pub fn split(self) -> (UnixListener, SocketFile) {
        (self.listener, self.file)
    }
}

/// Answers on `listener` until the task is dropped (like the admin listener, it outlives the
/// drain, so `/readyz` says 503 while connections finish).
pub async fn serve(listener: UnixListener, ready: Arc<Readiness>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = answer(&req, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer<B>(req: &Request<B>, ready: &Readiness) -> Response<Full<Bytes>> {
    let (status, body): (StatusCode, &'static [u8]) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, b"ok\n"),
        "/readyz" if ready.is_ready() => (StatusCode::OK, b"ready\n"),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, b"draining\n"),
        _ => (
            StatusCode::NOT_FOUND,
            b"control socket endpoints: /healthz /readyz\n",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    response
}

/// What `streamgate health` does: `GET /healthz` on the socket at `path`, blocking, each step
/// under `timeout`. Ok(status) when something answered.
pub fn ask_health(path: &Path, timeout: Duration) -> io::Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.strip_prefix("HTTP/1.1 "))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/1.1 answer"))
}
