//! The one certificate every proxy serves (ECDSA P-256, made at run time) and the client side:
//! TLS 1.3 only, no verification (the bench talks to processes it started, on loopback), no
//! resumption (every connection is a full handshake) except for the clients of scenario 2b.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

/// A connection to a target: TLS for the proxies, plain TCP for the backend itself.
pub type Stream = Either<TlsStream<TcpStream>, TcpStream>;

/// The certificate files in the temp dir.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file, as HAProxy's `crt` wants it.
    pub combined: PathBuf,
}

pub fn make_cert(dir: &Path) -> anyhow::Result<CertFiles> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    let cert = params.self_signed(&key)?;
    let files = CertFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("combined.pem"),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    std::fs::write(
        &files.combined,
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    Ok(files)
}

#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS 1.3 only, the ALPN given, no session resumption.
pub fn client_config(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3") // our own fixed choice, not peer input
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c.resumption = Resumption::disabled();
    Arc::new(c)
}

/// A client that resumes: TLS 1.3 only, ALPN as given, its own in-memory session store
/// (rustls' default: up to 8 TLS 1.3 tickets per server name, each used once). Every
/// connection made through it offers a ticket from an earlier one when it has one.
pub fn resuming(alpn: &[&[u8]]) -> TlsConnector {
    let mut c = (*client_config(alpn)).clone();
    c.resumption = Resumption::in_memory_sessions(64);
    TlsConnector::from(Arc::new(c))
}

/// Whether the connection's TLS handshake resumed a session (false for plain TCP).
pub fn resumed(s: &Stream) -> bool {
    match s {
        Either::Left(t) => t.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        Either::Right(_) => false,
    }
}

/// Client TLS configs, made once.
#[derive(Clone)]
pub struct Clients {
    pub h1: TlsConnector,
    pub h2: TlsConnector,
}

impl Clients {
    pub fn new() -> Clients {
        Clients {
            h1: TlsConnector::from(client_config(&[b"http/1.1"])),
            h2: TlsConnector::from(client_config(&[b"h2"])),
        }
    }
}

/// TCP connect with TCP_NODELAY, optionally from a given source address (127.0.0.x), so one
/// client can hold more connections than one address's ephemeral ports.
pub async fn tcp(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        s.bind(SocketAddr::new(ip, 0))?;
    }
    let s = s.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A connection to `addr`: TLS through `tls` when given, else plain.
pub async fn connect(
    addr: SocketAddr,
    tls: Option<&TlsConnector>,
    src: Option<IpAddr>,
) -> anyhow::Result<Stream> {
    let tcp = tcp(addr, src)
        .await
        .with_context(|| format!("connect {addr}"))?;
    match tls {
        Some(c) => {
            let name = ServerName::try_from("localhost").expect("valid DNS name");
            let s = c
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {addr}"))?;
            Ok(Either::Left(s))
        }
        None => Ok(Either::Right(tcp)),
    }
}

/// Negotiated protocol details of a TLS connection, for the fairness section.
pub fn describe(s: &Stream) -> String {
    match s {
        Either::Left(t) => {
            let c = t.get_ref().1;
            format!(
                "{:?}, {:?}, {:?}",
                c.protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default(),
                c.negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite()))
                    .unwrap_or_default(),
                c.negotiated_key_exchange_group()
                    .map(|g| format!("{:?}", g.name()))
                    .unwrap_or_default(),
            )
            .replace('"', "")
        }
        Either::Right(_) => "plain TCP".to_string(),
    }
}
