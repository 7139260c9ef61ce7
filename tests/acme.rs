//! Automatic certificates from a real ACME CA (pebble): obtained at start-up with either
//! challenge, served by SNI, renewed without a restart, reused from the cache across restarts,
//! and a failed order that leaves the gateway serving.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::dns::DnsServer;
use crate::support::logs::Logs;
use crate::support::pebble::{self, Pebble, PebbleOptions};
use crate::support::pki::TestCa;
use crate::support::{within, Backend, Client, Proto};

const NAME: &str = "chat.acme.test";

/// The CA, its DNS and the gateway's sockets, bound first so pebble knows where to validate.
struct Setup {
    dns: DnsServer,
    pebble: Pebble,
    https: Option<TcpListener>,
    http: Option<TcpListener>,
    cache: tempfile::TempDir,
    dir: tempfile::TempDir,
}

async fn setup(validity_secs: Option<u64>) -> Option<Setup> {
    if !pebble::available() {
        return None;
    }
    let dns = DnsServer::start().await;
    dns.set(NAME, &[IpAddr::V4(Ipv4Addr::LOCALHOST)], 1);
    let https = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let pebble = Pebble::start(PebbleOptions {
        http_port: http.local_addr().expect("http address").port(),
        tls_port: https.local_addr().expect("https address").port(),
        dns: dns.addr(),
        validity_secs,
    })
    .await;
    Some(Setup {
        dns,
        pebble,
        https: Some(https),
        http: Some(http),
        cache: tempfile::tempdir().expect("cache dir"),
        dir: tempfile::tempdir().expect("config dir"),
    })
}

impl Setup {
    /// The config: listeners, `[acme]` with `challenge`, `extra` TOML, and a route for NAME.
    fn config(&self, challenge: &str, extra: &str, backend: &str) -> String {
        format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n\
             [acme]\ndirectory = {dir:?}\nemail = \"ops@acme.test\"\ncache = {cache:?}\n\
             challenge = {challenge:?}\nca_roots = {roots:?}\n\n{extra}\n\
             [[route]]\nhost = {NAME:?}\npath = \"/\"\nbackends = [{backend:?}]\n",
            dir = self.pebble.directory,
            cache = self.cache.path(),
            roots = self.pebble.ca_roots,
        )
    }

    /// Starts the gateway on the bound sockets (fresh ones after the first start).
    async fn start(&mut self, config: &str) -> Running {
        let path = self.dir.path().join("streamgate.toml");
        std::fs::write(&path, config).expect("write config");
        let config = streamgate::config::Config::load(&path)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{config}"));
        let certs = streamgate::tls::load_certs(&config.certs).expect("load certificates");
        let https = match self.https.take() {
            Some(l) => l,
            None => TcpListener::bind("127.0.0.1:0").await.expect("bind https"),
        };
        let https_addr = https.local_addr().expect("https address");
        let http = self.http.take();
        let listeners = streamgate::Listeners { https, http };
        let server =
            streamgate::Server::new(config, &certs, listeners).expect("the gateway starts");
        let metrics = server.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Running {
            https: https_addr,
            metrics,
            stop: Some(stop),
            task,
        }
    }
}

struct Running {
    https: SocketAddr,
    metrics: Arc<streamgate::metrics::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("the gateway to stop", self.task)
            .await
            .expect("run does not panic");
    }
}

/// Obtains a certificate with `challenge` and checks it is served for NAME, chaining to
/// pebble's root, with its expiry in the metrics and its key in the cache, private.
async fn obtains_and_serves(challenge: &str) {
    let logs = Logs::capture();
    let Some(mut s) = setup(None).await else {
        return;
    };
    let gw = s
        .start(&s.config(challenge, "", "http://127.0.0.1:9"))
        .await;
    logs.line(&["acme certificate installed", NAME]).await;

    let root = s.pebble.issuing_root().await;
    let leaf = pebble::verified_leaf(gw.https, NAME, &root)
        .await
        .unwrap_or_else(|e| panic!("the ACME certificate verifies for {NAME}: {e}"));
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("X.509");
    let not_after = cert.validity().not_after.timestamp();

    let metrics = gw.metrics.render();
    let series = format!("streamgate_certificate_expiry_seconds{{name=\"{NAME}\"}} {not_after}");
    assert!(metrics.contains(&series), "{series} in:\n{metrics}");

    let key = find(s.cache.path(), &format!("{NAME}.key")).expect("the key is cached");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    gw.stop().await;
    drop(s.dns);
}

#[tokio::test]
async fn acme_tls_alpn_01_obtains_and_serves_a_certificate() {
    obtains_and_serves("tls-alpn-01").await;
}

#[tokio::test]
async fn acme_http_01_obtains_and_serves_a_certificate_despite_redirects() {
    // http_mode is "redirect" (the default): the challenge is answered before the redirect.
    obtains_and_serves("http-01").await;
}

#[tokio::test]
async fn acme_renews_a_certificate_without_restart() {
    let logs = Logs::capture();
    // 12 s certificates: renewal comes once 4 s (a third) are left, about 8 s in.
    let Some(mut s) = setup(Some(12)).await else {
        return;
    };
    let gw = s
        .start(&s.config("tls-alpn-01", "", "http://127.0.0.1:9"))
        .await;
    logs.line(&["acme certificate installed", NAME, "renewed=false"])
        .await;
    let root = s.pebble.issuing_root().await;
    let first = pebble::verified_leaf(gw.https, NAME, &root)
        .await
        .expect("the first certificate verifies");

    logs.line(&["acme certificate installed", NAME, "renewed=true"])
        .await;
    let second = pebble::verified_leaf(gw.https, NAME, &root)
        .await
        .expect("the renewed certificate verifies");
    assert_ne!(
        pebble::serial(&first),
        pebble::serial(&second),
        "a new certificate is served after renewal"
    );
    gw.stop().await;
}

#[tokio::test]
async fn acme_restart_reuses_the_cached_certificate_without_ordering() {
    let logs = Logs::capture();
    let Some(mut s) = setup(None).await else {
        return;
    };
    let config = s.config("tls-alpn-01", "", "http://127.0.0.1:9");
    let gw = s.start(&config).await;
    logs.line(&["acme certificate installed", NAME]).await;
    let root = s.pebble.issuing_root().await;
    let first = pebble::verified_leaf(gw.https, NAME, &root)
        .await
        .expect("the certificate verifies");
    gw.stop().await;

    // New sockets: pebble would validate on the old ones, so an order now could not succeed.
    logs.clear();
    let gw = s.start(&config).await;
    logs.line(&["acme certificate from cache", NAME]).await;
    // The scheduler's decision: wait for the renewal time (years away), not order.
    let next = logs.line(&["acme: next order", NAME]).await;
    let wait: u64 = next
        .split("wait_s=")
        .nth(1)
        .and_then(|w| w.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("a wait in {next}"));
    assert!(wait > 86_400, "the cached certificate is fresh: {next}");
    let again = pebble::verified_leaf(gw.https, NAME, &root)
        .await
        .expect("the cached certificate verifies");
    assert_eq!(pebble::serial(&first), pebble::serial(&again));
    assert!(
        logs.lines_with(&["acme order failed"]).is_empty()
            && logs.lines_with(&["acme certificate installed"]).is_empty(),
        "no order after the restart:\n{}",
        logs.text()
    );
    gw.stop().await;
}

#[tokio::test]
async fn acme_failed_order_keeps_serving_the_first_cert_and_logs() {
    let logs = Logs::capture();
    let Some(mut s) = setup(None).await else {
        return;
    };
    // The CA's DNS does not know the name: validation cannot reach the gateway.
    s.dns.remove(NAME);
    let backend = Backend::echo("b").await;
    let ca = TestCa::new();
    let leaf = ca.leaf(&["files.acme.test"]);
    let (cert, key) = (s.dir.path().join("f.pem"), s.dir.path().join("f.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("write cert");
    std::fs::write(&key, &leaf.key_pem).expect("write key");
    let files = format!("[[cert]]\ncert = {cert:?}\nkey = {key:?}\n");
    let gw = s
        .start(&s.config("tls-alpn-01", &files, &backend.url()))
        .await;

    let failed = logs.line(&["acme order failed", NAME]).await;
    assert!(failed.contains("retry_in_s="), "{failed}");
    // Until the name has its certificate, the first [[cert]] answers, and requests are served.
    let tls =
        crate::support::client::tls_connect(gw.https, &ca, Some(NAME), &[Proto::H1.alpn()], false)
            .await;
    let mut client = Client::over_tls(Proto::H1, tls, NAME).await;
    assert_eq!(client.peer_certs.first(), Some(&leaf.der));
    assert_eq!(client.get("/").await.echo().backend, "b");
    gw.stop().await;
    assert!(s.pebble.is_running(), "{}", s.pebble.output());
}

/// The file called `name` somewhere under `dir`.
fn find(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}
