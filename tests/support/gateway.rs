//! The gateway under test: a config written from a builder, certificates from a test CA, and
//! `streamgate::serve` on listeners bound to 127.0.0.1:0, exactly as `main` runs it.

use std::net::SocketAddr;
use std::path::Path;

use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::client::{tls_connect, Client, Proto};
use super::pki::TestCa;
use super::within;

/// The names the default certificate covers: tests use hosts under `gw.test`.
pub const DEFAULT_NAMES: &[&str] = &["gw.test", "*.gw.test", "*.apps.gw.test"];

/// One `[[route]]`.
pub struct Route {
    host: Option<String>,
    path: String,
    backends: Vec<String>,
    settings: Vec<(String, String)>,
}

/// A route for `path` on any host; add backends with [`Route::to`].
pub fn route(path: &str) -> Route {
    Route {
        host: None,
        path: path.to_string(),
        backends: Vec::new(),
        settings: Vec::new(),
    }
}

impl Route {
    pub fn host(mut self, host: &str) -> Route {
        self.host = Some(host.to_string());
        self
    }

    /// Adds a backend by URL (`http://127.0.0.1:PORT`).
    pub fn to(mut self, url: impl Into<String>) -> Route {
        self.backends.push(url.into());
        self
    }

    pub fn strip_prefix(self) -> Route {
        self.set("strip_prefix", "true")
    }

    /// Sets another key of the route: `value` is TOML (quote strings yourself).
    pub fn set(mut self, key: &str, value: &str) -> Route {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    fn toml(&self) -> String {
        let mut t = String::from("[[route]]\n");
        if let Some(host) = &self.host {
            t.push_str(&format!("host = {host:?}\n"));
        }
        t.push_str(&format!("path = {:?}\n", self.path));
        t.push_str(&format!("backends = {:?}\n", self.backends));
        for (k, v) in &self.settings {
            t.push_str(&format!("{k} = {v}\n"));
        }
        t
    }
}

/// Builds and starts a gateway.
pub struct GatewayBuilder {
    certs: Vec<Vec<&'static str>>,
    routes: Vec<Route>,
    http_mode: Option<&'static str>,
    extra: String,
}

impl GatewayBuilder {
    pub fn new() -> GatewayBuilder {
        GatewayBuilder {
            certs: Vec::new(),
            routes: Vec::new(),
            http_mode: None,
            extra: String::new(),
        }
    }

    /// Adds a `[[cert]]` for `names`; without any, one certificate covers [`DEFAULT_NAMES`].
    pub fn cert(mut self, names: &[&'static str]) -> GatewayBuilder {
        self.certs.push(names.to_vec());
        self
    }

    pub fn route(mut self, route: Route) -> GatewayBuilder {
        self.routes.push(route);
        self
    }

    /// Binds the plain listener too, with `http_mode` set to `mode`.
    pub fn plain_listener(mut self, mode: &'static str) -> GatewayBuilder {
        self.http_mode = Some(mode);
        self
    }

    /// Adds raw TOML tables (`[limits]`, `[shutdown]`) to the config.
    pub fn toml(mut self, text: &str) -> GatewayBuilder {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    pub async fn start(self) -> TestGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new();
        let certs = if self.certs.is_empty() {
            vec![DEFAULT_NAMES.to_vec()]
        } else {
            self.certs
        };

        let mut text = String::from("[listen]\nhttps = \"127.0.0.1:0\"\n");
        if let Some(mode) = self.http_mode {
            text.push_str(&format!("http = \"127.0.0.1:0\"\nhttp_mode = {mode:?}\n"));
        }
        text.push_str(&self.extra);
        let mut leaves = Vec::new();
        for (i, names) in certs.iter().enumerate() {
            let leaf = ca.leaf(names);
            let cert = dir.path().join(format!("cert{i}.pem"));
            let key = dir.path().join(format!("cert{i}.key"));
            std::fs::write(&cert, &leaf.cert_pem).expect("write cert");
            std::fs::write(&key, &leaf.key_pem).expect("write key");
            text.push_str(&format!("[[cert]]\ncert = {cert:?}\nkey = {key:?}\n"));
            leaves.push(leaf.der);
        }
        for r in &self.routes {
            text.push_str(&r.toml());
        }

        let config = streamgate::config::Config::parse(Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
        let loaded = streamgate::tls::load_certs(&config.certs).expect("load test certificates");
        let https = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
        let http = match self.http_mode {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind http")),
            None => None,
        };
        let https_addr = https.local_addr().expect("https address");
        let http_addr = http.as_ref().map(|l| l.local_addr().expect("http address"));
        let listeners = streamgate::Listeners { https, http };

        let (shutdown, stop) = oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            let stop = async {
                let _ = stop.await;
            };
            streamgate::serve(&config, &loaded, listeners, stop)
                .await
                .map_err(|e| e.to_string())
        });
        TestGateway {
            https: https_addr,
            http: http_addr,
            ca,
            leaves,
            shutdown: Some(shutdown),
            serving,
            _dir: dir,
        }
    }
}

/// A running gateway. Dropping it ends the test's use of it; the runtime ends the task.
pub struct TestGateway {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub ca: TestCa,
    /// The leaf certificate of each `[[cert]]`, in config order.
    pub leaves: Vec<CertificateDer<'static>>,
    shutdown: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), String>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    /// A TLS client that sends SNI and `Host`/`:authority` for `authority` (`host[:port]`).
    pub async fn client(&self, proto: Proto, authority: &str) -> Client {
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        self.client_with_sni(proto, Some(host), authority).await
    }

    /// A TLS client whose SNI (`None`: no SNI) differs from the host it names in requests.
    pub async fn client_with_sni(
        &self,
        proto: Proto,
        sni: Option<&str>,
        authority: &str,
    ) -> Client {
        let tls = tls_connect(self.https, &self.ca, sni, &[proto.alpn()], true).await;
        Client::over_tls(proto, tls, authority).await
    }

    /// A client on the plain listener.
    pub async fn plain_client(&self, proto: Proto, authority: &str) -> Client {
        let addr = self.http.expect("gateway was built with a plain listener");
        Client::plain(proto, addr, authority).await
    }

    /// Resolves the shutdown future passed to `serve`.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub fn is_serving(&self) -> bool {
        !self.serving.is_finished()
    }

    /// Waits for `serve` to return and checks it returned `Ok`.
    pub async fn stopped(self) {
        within("serve to return after shutdown", self.serving)
            .await
            .expect("serve does not panic")
            .expect("serve returns Ok");
    }
}
