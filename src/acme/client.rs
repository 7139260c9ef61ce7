//! The HTTPS client instant-acme talks to the CA's directory with: hyper's HTTP/1.1 over
//! tokio-rustls (aws-lc-rs, as the listener uses), trusting the public web PKI roots plus
//! `acme.ca_roots`. One connection per request: an order makes a dozen requests, minutes apart.

use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::AcmeError;

/// Connect, handshake, request and whole response, per request to the CA.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

#[derive(Clone)]
pub struct HttpsClient {
    tls: tokio_rustls::TlsConnector,
}

impl HttpsClient {
    /// A client trusting the public roots and, when given, the PEM certificates in `ca_roots`.
    pub fn new(ca_roots: Option<(&Path, &str)>) -> Result<HttpsClient, AcmeError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some((path, origin)) = ca_roots {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| AcmeError::ReadRoots {
                    origin: origin.to_string(),
                    path: path.to_path_buf(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(AcmeError::NoRoots {
                    origin: origin.to_string(),
                    path: path.to_path_buf(),
                });
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(AcmeError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpsClient {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

impl HttpClient for HttpsClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, req)).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => Err(instant_acme::Error::Other(e)),
                Err(_) => Err(instant_acme::Error::Str(
                    "request to the ACME server timed out",
                )),
            }
        })
    }
}

async fn send(
    tls: tokio_rustls::TlsConnector,
    mut req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, BoxError> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(format!("ACME server URL is not https: {uri}").into());
    }
    let host = uri.host().ok_or("ACME server URL has no host")?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((bare, port)).await?;
    let name = ServerName::try_from(bare.to_string())?;
    let stream = tls.connect(name, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;

    // HTTP/1.1 over a connection of its own: origin-form target and a Host header.
    let authority = uri.authority().map_or(host, |a| a.as_str());
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_str(authority)?);
    *req.uri_mut() = uri.path_and_query().map_or("/", |pq| pq.as_str()).parse()?;
    let exchange = async move {
        let response = sender.send_request(req).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, hyper::Error>((parts, body))
        // `sender` is dropped here, which lets the connection task finish.
    };
    let (result, _) = tokio::join!(exchange, conn);
    let (parts, body) = result?;
    Ok(BytesResponse::from(Response::from_parts(
        parts,
        Full::new(body),
    )))
}
