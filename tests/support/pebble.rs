//! Let's Encrypt's test CA, `pebble` (Debian's package), run for one test: its HTTPS
//! certificate from a CA made at test time, its DNS from a loopback [`DnsServer`], and its
//! validations sent to the gateway's own listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

use super::client::{Client, Proto};
use super::pki::TestCa;
use super::within;

const BINARY: &str = "/usr/bin/pebble";

/// Where pebble validates and how long its certificates last.
pub struct PebbleOptions {
    /// The gateway's plain listener port (http-01) and TLS listener port (tls-alpn-01).
    pub http_port: u16,
    pub tls_port: u16,
    /// The DNS server pebble resolves names with.
    pub dns: SocketAddr,
    /// Certificate lifetime in seconds (pebble's default: five years).
    pub validity_secs: Option<u64>,
}

pub struct Pebble {
    child: Child,
    /// The ACME directory URL.
    pub directory: String,
    management: SocketAddr,
    /// PEM of the CA that signed pebble's own HTTPS certificate: the gateway's `ca_roots`.
    pub ca_roots: PathBuf,
    ca: TestCa,
    output: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// Whether pebble is installed; when it is not, a test skips with a message, except on CI
/// (`CI=true`), where it fails: CI must install it (`apt-get install -y pebble`).
pub fn available() -> bool {
    if std::path::Path::new(BINARY).exists() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{BINARY} is missing on CI: install Debian's pebble package"
    );
    eprintln!("skipped: {BINARY} is not installed (apt-get install -y pebble)");
    false
}

/// A free loopback port: bound, then released (pebble takes no port 0).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

impl Pebble {
    pub async fn start(options: PebbleOptions) -> Pebble {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new();
        let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
        let cert = dir.path().join("pebble.pem");
        let key = dir.path().join("pebble.key");
        let ca_roots = dir.path().join("pebble-ca.pem");
        std::fs::write(&cert, &leaf.cert_pem).expect("write pebble cert");
        std::fs::write(&key, &leaf.key_pem).expect("write pebble key");
        std::fs::write(&ca_roots, pem_of(ca.der())).expect("write pebble CA");

        let (acme_port, management_port) = (free_port(), free_port());
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": cert,
            "privateKey": key,
            "httpPort": options.http_port,
            "tlsPort": options.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(secs) = options.validity_secs {
            pebble["certificateValidityPeriod"] = secs.into();
        }
        let config = dir.path().join("pebble.json");
        std::fs::write(&config, serde_json::json!({ "pebble": pebble }).to_string())
            .expect("write pebble config");

        let mut child = Command::new(BINARY)
            .arg("-config")
            .arg(&config)
            .arg("-dnsserver")
            .arg(options.dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            // No nonces refused at random, no authorizations reused: every order validates.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start pebble");
        let output = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            let ready = if ready_tx.is_some() {
                ready_tx.take()
            } else {
                None
            };
            tokio::spawn(async move {
                let mut ready = ready;
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let listening = line.contains("Listening on");
                    output.lock().expect("not poisoned").push_str(&line);
                    output.lock().expect("not poisoned").push('\n');
                    if listening {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            });
        }
        let started = tokio::time::timeout(super::PATIENCE, ready_rx).await;
        let log = output.lock().expect("not poisoned").clone();
        assert!(
            matches!(started, Ok(Ok(()))),
            "pebble did not start listening:\n{log}"
        );
        // "Listening on" is logged just before the listener accepts: wait until it does.
        within("pebble to accept", async {
            while TcpStream::connect(("127.0.0.1", acme_port)).await.is_err() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        Pebble {
            child,
            directory: format!("https://127.0.0.1:{acme_port}/dir"),
            management: SocketAddr::from(([127, 0, 0, 1], management_port)),
            ca_roots,
            ca,
            output,
            _dir: dir,
        }
    }

    /// What pebble has printed so far (for failure messages).
    pub fn output(&self) -> String {
        self.output.lock().expect("not poisoned").clone()
    }

    /// The root that pebble's certificates chain to (`GET /roots/0` on its management port).
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let tls = super::client::tls_connect(
            self.management,
            &self.ca,
            Some("localhost"),
            &[Proto::H1.alpn()],
            true,
        )
        .await;
        let mut client = Client::over_tls(Proto::H1, tls, "localhost").await;
        let fetched = client.get("/roots/0").await;
        assert_eq!(fetched.status, 200, "{}", fetched.text());
        CertificateDer::pem_slice_iter(&fetched.body)
            .next()
            .expect("a PEM certificate")
            .expect("valid PEM")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

fn pem_of(der: CertificateDer<'_>) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(&der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        let _ = writeln!(pem, "{}", String::from_utf8_lossy(chunk));
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A TLS handshake with the gateway at `addr` for SNI `name`, verifying the chain it presents
/// against `root` and the name; returns the leaf.
pub async fn verified_leaf(
    addr: SocketAddr,
    name: &str,
    root: &CertificateDer<'static>,
) -> Result<CertificateDer<'static>, std::io::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(root.clone())
        .expect("pebble root is a valid certificate");
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string()).expect("valid name");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .expect("the gateway presents a certificate");
    Ok(leaf)
}

/// The serial number of a DER certificate, as hex.
pub fn serial(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parses as X.509");
    cert.raw_serial_as_string()
}
