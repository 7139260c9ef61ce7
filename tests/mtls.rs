//! The TLS listener's edge policy (issue 14): client certificates (mTLS) required or left to
//! the route, `X-Forwarded-Client-Cert` to the backend, `tls_min_version`, and HSTS.

use std::sync::Arc;

use http::{Method, StatusCode};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, SanType};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::gateway::TestGateway;
use crate::support::pki::TestCa;
use crate::support::{empty, route, within, Backend, Client, GatewayBuilder, Proto};

/// A CA for client certificates, written where `listen.client_ca` can read it.
struct ClientCa {
    ca: TestCa,
    dir: tempfile::TempDir,
}

/// A client certificate and its key.
struct ClientCert {
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl ClientCa {
    fn new() -> ClientCa {
        let ca = TestCa::named("streamgate test client CA");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("clients-ca.pem"), ca.pem()).expect("write CA");
        ClientCa { ca, dir }
    }

    fn path(&self) -> String {
        self.dir.path().join("clients-ca.pem").display().to_string()
    }

    /// A client certificate for `cn` with a SPIFFE URI, signed by this CA.
    fn client(&self, cn: &str) -> ClientCert {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://gw.test/{cn}").try_into().expect("URI"),
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (der, key) = self.ca.sign(params);
        ClientCert { der, key }
    }
}

/// A TLS client config trusting the gateway's CA, offering `alpn`, presenting `cert`, limited
/// to `versions`.
fn client_config(
    gw: &TestGateway,
    alpn: &[u8],
    cert: Option<&ClientCert>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(gw.ca.der()).expect("CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(vec![c.der.clone()], c.key.clone_key())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// Connects; Err if the handshake (or the first exchange, where TLS 1.3 reports a refused
/// client certificate) fails.
async fn connect(
    gw: &TestGateway,
    proto: Proto,
    cert: Option<&ClientCert>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = client_config(gw, proto.alpn(), cert, versions);
    let tcp = TcpStream::connect(gw.https).await?;
    let name = ServerName::try_from("gw.test").expect("name");
    within(
        "the TLS handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
}

async fn client(gw: &TestGateway, proto: Proto, cert: Option<&ClientCert>) -> Client {
    let tls = connect(gw, proto, cert, rustls::DEFAULT_VERSIONS)
        .await
        .expect("handshake succeeds");
    Client::over_tls(proto, tls, "gw.test").await
}

/// A raw HTTP/1.1 GET on a fresh connection without a certificate: what came back (empty or
/// an error when the gateway refused the handshake).
async fn raw_get_without_cert(gw: &TestGateway) -> Result<Vec<u8>, std::io::Error> {
    let mut tls = connect(gw, Proto::H1, None, rustls::DEFAULT_VERSIONS).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: gw.test\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    within("the gateway to answer or close", tls.read_to_end(&mut out)).await?;
    Ok(out)
}

#[tokio::test]
async fn required_client_auth_refuses_a_client_without_a_certificate() {
    let backend = Backend::echo("b").await;
    let ca = ClientCa::new();
    let gw = GatewayBuilder::new()
        .toml(&format!(
            "client_ca = {:?}\nclient_auth = \"required\"\n",
            ca.path()
        ))
        .route(route("/").to(backend.url()))
        .start()
        .await;
    // The handshake fails, or (TLS 1.3, where the client finishes first) the connection is
    // closed before any answer.
    if let Ok(bytes) = raw_get_without_cert(&gw).await {
        assert!(
            bytes.is_empty(),
            "no answer: {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    // A certificate of another CA is refused the same way.
    let other = ClientCa::new().client("eve");
    let refused = match connect(&gw, Proto::H1, Some(&other), rustls::DEFAULT_VERSIONS).await {
        Err(_) => true,
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"GET / HTTP/1.1\r\nhost: gw.test\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let read = within("the gateway to close", tls.read_to_end(&mut out)).await;
            read.is_err() || out.is_empty()
        }
    };
    assert!(refused, "a foreign client certificate is refused");

    let alice = ca.client("alice");
    for proto in Proto::ALL {
        let mut c = client(&gw, proto, Some(&alice)).await;
        let got = c.get("/").await;
        assert_eq!(got.status, StatusCode::OK, "{proto}");
    }
}

#[tokio::test]
async fn optional_client_auth_lets_the_route_decide_and_the_backend_sees_the_certificate() {
    let backend = Backend::echo("b").await;
    let ca = ClientCa::new();
    let gw = GatewayBuilder::new()
        .toml(&format!(
            "client_ca = {:?}\nclient_auth = \"optional\"\n",
            ca.path()
        ))
        .route(
            route("/admin")
                .to(backend.url())
                .set("require_client_cert", "true"),
        )
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let alice = ca.client("alice");
    let digest = ring::digest::digest(&ring::digest::SHA256, &alice.der);
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    for proto in Proto::ALL {
        let mut anon = client(&gw, proto, None).await;
        let forged = anon
            .request(Method::GET, "/")
            .header("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\"")
            .body(empty())
            .expect("request");
        let got = anon.fetch(forged).await;
        assert_eq!(got.status, StatusCode::OK, "{proto}: other routes pass");
        assert_eq!(
            got.echo().header("x-forwarded-client-cert"),
            None,
            "{proto}: a client-sent XFCC never passes"
        );
        let got = anon.get("/admin").await;
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{proto}: {}", got.text());

        let mut known = client(&gw, proto, Some(&alice)).await;
        let got = known.get("/admin").await;
        assert_eq!(got.status, StatusCode::OK, "{proto}");
        let xfcc = got
            .echo()
            .header("x-forwarded-client-cert")
            .expect("the backend sees the certificate")
            .to_string();
        assert_eq!(
            xfcc,
            format!("Hash={hash};Subject=\"CN=alice\";URI=spiffe://gw.test/alice"),
            "{proto}"
        );
    }
}

#[tokio::test]
async fn tls_min_version_13_refuses_tls12_and_hsts_is_added() {
    let backend = Backend::start(|req| async move {
        let mut r = http::Response::new(crate::support::full("ok"));
        if req.uri().path() == "/own" {
            r.headers_mut().insert(
                "strict-transport-security",
                "max-age=5".parse().expect("value"),
            );
        }
        r
    })
    .await;
    let gw = GatewayBuilder::new()
        .toml("tls_min_version = \"1.3\"\nhsts = \"max-age=63072000; includeSubDomains\"\n")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let tls12 = connect(&gw, Proto::H1, None, &[&rustls::version::TLS12]).await;
    assert!(tls12.is_err(), "a TLS 1.2 client is refused");
    let tls13 = connect(&gw, Proto::H1, None, &[&rustls::version::TLS13]).await;
    assert!(tls13.is_ok(), "TLS 1.3 is served");
    for proto in Proto::ALL {
        let mut c = client(&gw, proto, None).await;
        let got = c.get("/").await;
        assert_eq!(
            got.headers["strict-transport-security"], "max-age=63072000; includeSubDomains",
            "{proto}"
        );
        let got = c.get("/nowhere-but-backend").await;
        assert!(got.headers.contains_key("strict-transport-security"));
        let got = c.get("/own").await;
        assert_eq!(
            got.headers["strict-transport-security"], "max-age=5",
            "{proto}: kept"
        );
    }
}

#[tokio::test]
async fn tls12_is_served_by_default() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let tls12 = connect(&gw, Proto::H1, None, &[&rustls::version::TLS12]).await;
    assert!(
        tls12.is_ok(),
        "TLS 1.2 is allowed unless tls_min_version says 1.3"
    );
    let mut c = client(&gw, Proto::H1, None).await;
    let got = c.get("/").await;
    assert!(
        !got.headers.contains_key("strict-transport-security"),
        "no HSTS unless configured"
    );
}
