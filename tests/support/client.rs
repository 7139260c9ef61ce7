//! HTTP clients that control ALPN and SNI exactly: hyper's connection-level HTTP/1.1 and
//! HTTP/2 clients over tokio-rustls (or plain TCP for the plain listener).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::backend::Echo;
use super::body::{empty, Body};
use super::pki::TestCa;
use super::within;

/// The HTTP version a client speaks to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::H1, Proto::H2];

    pub fn alpn(self) -> &'static [u8] {
        match self {
            Proto::H1 => b"http/1.1",
            Proto::H2 => b"h2",
        }
    }

    pub fn version(self) -> Version {
        match self {
            Proto::H1 => Version::HTTP_11,
            Proto::H2 => Version::HTTP_2,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        })
    }
}

/// Opens a TLS connection to `addr`, sending `sni` (none when `None`) and offering `alpn`.
/// With `check_name` false the certificate must chain to `ca` but need not name `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &TestCa,
    sni: Option<&str>,
    alpn: &[&[u8]],
    check_name: bool,
) -> TlsStream<TcpStream> {
    let mut config = ca.client_config(alpn, check_name);
    let name = match sni {
        Some(name) => ServerName::try_from(name.to_string()).expect("valid SNI name"),
        None => {
            // rustls sends no SNI for an IP address; say so explicitly all the same.
            config.enable_sni = false;
            ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
        }
    };
    let tcp = within("TCP connect to the gateway", TcpStream::connect(addr))
        .await
        .expect("gateway accepts connections");
    within(
        "TLS handshake with the gateway",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake succeeds")
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

/// One client connection to the gateway.
pub struct Client {
    pub proto: Proto,
    scheme: &'static str,
    /// What the client names as the host: `Host` over HTTP/1.1, `:authority` over HTTP/2.
    authority: String,
    sender: Sender,
    conn: JoinHandle<()>,
    /// The certificate chain the gateway presented (empty over plain TCP).
    pub peer_certs: Vec<CertificateDer<'static>>,
}

impl Client {
    /// HTTP over an established TLS connection; asserts ALPN agreed on `proto`.
    pub async fn over_tls(proto: Proto, tls: TlsStream<TcpStream>, authority: &str) -> Client {
        let (_, session) = tls.get_ref();
        assert_eq!(
            session.alpn_protocol(),
            Some(proto.alpn()),
            "ALPN should select {proto}"
        );
        let peer_certs = session
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let mut client = Client::handshake(proto, tls, "https", authority).await;
        client.peer_certs = peer_certs;
        client
    }

    /// HTTP over a TLS connection on which no ALPN was agreed (the gateway goes by the
    /// preface); `proto` is what the client speaks all the same.
    pub async fn over_tls_without_alpn(
        proto: Proto,
        tls: TlsStream<TcpStream>,
        authority: &str,
    ) -> Client {
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            None,
            "no ALPN should be agreed"
        );
        Client::handshake(proto, tls, "https", authority).await
    }

    /// HTTP over plain TCP (HTTP/2 with prior knowledge).
    pub async fn plain(proto: Proto, addr: SocketAddr, authority: &str) -> Client {
        let tcp = within("TCP connect to the gateway", TcpStream::connect(addr))
            .await
            .expect("gateway accepts connections");
        Client::handshake(proto, tcp, "http", authority).await
    }

    async fn handshake<I>(proto: Proto, io: I, scheme: &'static str, authority: &str) -> Client
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        let (sender, conn) = match proto {
            Proto::H1 => {
                let (sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("HTTP/1.1 handshake");
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (Sender::H1(sender), conn)
            }
            Proto::H2 => {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .expect("HTTP/2 handshake");
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (Sender::H2(sender), conn)
            }
        };
        Client {
            proto,
            scheme,
            authority: authority.to_string(),
            sender,
            conn,
            peer_certs: Vec::new(),
        }
    }

    /// A request for `target` (origin-form, e.g. `/a?b`) as this client's protocol spells it:
    /// `Host` over HTTP/1.1, the full URI (hence `:authority`) over HTTP/2.
    pub fn request(&self, method: Method, target: &str) -> http::request::Builder {
        let builder = Request::builder().method(method);
        match self.proto {
            Proto::H1 => builder
                .uri(target)
                .header(http::header::HOST, &self.authority),
            Proto::H2 => builder
                .version(Version::HTTP_2)
                .uri(format!("{}://{}{target}", self.scheme, self.authority)),
        }
    }

    /// Sends `req` and waits for the response head.
    pub async fn try_send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        let sent = async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
            }
        };
        let response = within("response head from the gateway", sent).await?;
        assert_eq!(response.version(), self.proto.version(), "response version");
        Ok(response)
    }

    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        let proto = self.proto;
        self.try_send(req)
            .await
            .unwrap_or_else(|e| panic!("{proto} request failed: {e}"))
    }

    /// Sends `req` and reads the whole response.
    pub async fn fetch(&mut self, req: Request<Body>) -> Fetched {
        let response = self.send(req).await;
        Fetched::read(response).await
    }

    /// `GET target` with no body, read whole.
    pub async fn get(&mut self, target: &str) -> Fetched {
        let req = self
            .request(Method::GET, target)
            .body(empty())
            .expect("valid request");
        self.fetch(req).await
    }

    /// `GET target` with extra request headers, read whole.
    pub async fn get_with(&mut self, target: &str, headers: &[(&str, &str)]) -> Fetched {
        let mut req = self.request(Method::GET, target);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.fetch(req.body(empty()).expect("valid request")).await
    }

    /// Waits until the gateway closes this connection.
    pub async fn closed(self) {
        let Client { sender, conn, .. } = self;
        // Keep the sender: dropping it would close the connection from our side.
        within("the gateway to close the connection", conn)
            .await
            .expect("connection task does not panic");
        drop(sender);
    }
}

/// A whole response.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Fetched {
    pub async fn read(response: Response<Incoming>) -> Fetched {
        let (parts, body) = response.into_parts();
        let body = within("response body", body.collect())
            .await
            .expect("response body arrives whole")
            .to_bytes();
        Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The echo backend's report; asserts the gateway answered 200.
    pub fn echo(&self) -> Echo {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.text());
        Echo::parse(&self.body)
    }
}

/// [`tls_connect`] from a chosen local address (`127.0.0.2`, `127.0.0.3`, ...: all of 127/8 is
/// this host), so the gateway sees a different client IP.
pub async fn tls_connect_from(
    local: IpAddr,
    addr: SocketAddr,
    ca: &TestCa,
    sni: &str,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let config = ca.client_config(alpn, true);
    let name = ServerName::try_from(sni.to_string()).expect("valid SNI name");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind the client's local address");
    let tcp = within("TCP connect to the gateway", socket.connect(addr))
        .await
        .expect("gateway accepts connections");
    within(
        "TLS handshake with the gateway",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake succeeds")
}
