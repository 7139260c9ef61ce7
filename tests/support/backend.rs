//! Real plain-HTTP backends on 127.0.0.1:0, and addresses where no backend answers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::body::{full, Body, Digest};
use super::within;

/// A hyper HTTP/1.1 server on 127.0.0.1:0 that answers every request with `handler`. It stops
/// accepting when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Backend {
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let handler = Arc::new(handler);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        Backend { addr, accept }
    }

    /// A backend that describes each request it gets; see [`Echo`].
    pub async fn echo(name: &'static str) -> Backend {
        Backend::start(move |req| echo(name, req)).await
    }

    /// `http://127.0.0.1:PORT`, as a route's `backends` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads the whole request body, hashing it as it comes, and answers with an [`Echo`] text.
async fn echo(name: &str, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut digest = Digest::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    digest.update(data);
                }
            }
            Err(e) => {
                return Response::builder()
                    .status(500)
                    .body(full(format!("body error: {e}")))
                    .expect("valid response")
            }
        }
    }
    let mut text = format!(
        "backend={name}\nmethod={}\ntarget={}\nversion={:?}\nbody_len={}\nbody_sha256={}\n",
        parts.method,
        parts.uri,
        parts.version,
        digest.len(),
        digest.hex(),
    );
    for (k, v) in &parts.headers {
        text.push_str(&format!(
            "h:{k}={}\n",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    Response::new(full(text))
}

/// What the echo backend saw of one request.
#[derive(Debug)]
pub struct Echo {
    pub backend: String,
    pub method: String,
    /// The request target exactly as it arrived.
    pub target: String,
    pub version: String,
    pub body_len: u64,
    pub body_sha256: String,
    /// Header names (lowercase) and values, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl Echo {
    pub fn parse(text: &[u8]) -> Echo {
        let text = std::str::from_utf8(text).expect("echo body is text");
        let mut echo = Echo {
            backend: String::new(),
            method: String::new(),
            target: String::new(),
            version: String::new(),
            body_len: 0,
            body_sha256: String::new(),
            headers: Vec::new(),
        };
        for line in text.lines() {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not an echo response: {text}"));
            match key {
                "backend" => echo.backend = value.into(),
                "method" => echo.method = value.into(),
                "target" => echo.target = value.into(),
                "version" => echo.version = value.into(),
                "body_len" => echo.body_len = value.parse().expect("body_len is a number"),
                "body_sha256" => echo.body_sha256 = value.into(),
                _ => {
                    let name = key.strip_prefix("h:").expect("header line");
                    echo.headers.push((name.into(), value.into()));
                }
            }
        }
        echo
    }

    /// The only value of header `name`; panics if it came more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(
            all.len() <= 1,
            "header {name} arrived {} times: {all:?}",
            all.len()
        );
        all.first().copied()
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A backend address where nothing listens: connecting to it is refused at once.
pub fn dead_backend_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}

/// A listening socket whose accept queue is full, so a further TCP connect never completes
/// (Linux drops the SYN when the queue of a `listen(0)` socket holds one connection).
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    pub async fn new() -> Blackhole {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("address");
        // Fill the queue: connect until a connect no longer completes, keeping the ones that did.
        let mut queued = Vec::new();
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_millis(500),
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(stream) => queued.push(stream.expect("connect to the blackhole")),
                Err(_hanging) => break,
            }
            assert!(
                queued.len() < 8,
                "the accept queue of a listen(0) socket never filled"
            );
        }
        Blackhole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A backend that holds each response until the test releases it.
pub struct Held {
    pub backend: Backend,
    arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Held {
    pub async fn start() -> Held {
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let gate = release.clone();
        let backend = Backend::start(move |_req| {
            let _ = arrived_tx.send(());
            let gate = gate.clone();
            async move {
                gate.acquire()
                    .await
                    .expect("semaphore is never closed")
                    .forget();
                Response::new(full("released"))
            }
        })
        .await;
        Held {
            backend,
            arrived,
            release,
        }
    }

    /// Waits until a request has reached the backend.
    pub async fn arrived(&mut self) {
        within("request to reach the held backend", self.arrived.recv())
            .await
            .expect("backend is alive");
    }

    /// Lets one held response go.
    pub fn release(&self) {
        self.release.add_permits(1);
    }
}

/// A backend whose response body is written by the test, chunk by chunk.
pub struct Streaming {
    pub backend: Backend,
    writers: tokio::sync::mpsc::UnboundedReceiver<tokio::sync::mpsc::Sender<Bytes>>,
}

impl Streaming {
    pub async fn start() -> Streaming {
        let (writers_tx, writers) = tokio::sync::mpsc::unbounded_channel();
        let backend = Backend::start(move |_req| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
            let _ = writers_tx.send(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((Ok(hyper::body::Frame::data(chunk)), rx))
            });
            let body = http_body_util::StreamBody::new(stream).boxed();
            async move { Response::new(body) }
        })
        .await;
        Streaming { backend, writers }
    }

    /// The writer of the next request's response body; dropping it ends the body.
    pub async fn writer(&mut self) -> tokio::sync::mpsc::Sender<Bytes> {
        within(
            "request to reach the streaming backend",
            self.writers.recv(),
        )
        .await
        .expect("backend is alive")
    }
}
