//! The gateway under test: a config written from a builder, certificates from a test CA, and
//! `streamgate::serve` on listeners bound to 127.0.0.1:0, exactly as `main` runs it.

use std::net::{IpAddr, SocketAddr};

use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::client::{tls_connect, tls_connect_from, Client, Proto};
use super::pki::TestCa;
use super::within;

/// The names the default certificate covers: tests use hosts under `gw.test`.
pub const DEFAULT_NAMES: &[&str] = &["gw.test", "*.gw.test", "*.apps.gw.test"];

/// One `[[route]]`.
pub struct Route {
    host: Option<String>,
    path: String,
    /// Each backend as a TOML value: a string, or an inline table with `url`.
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
        self.backends.push(format!("{:?}", url.into()));
        self
    }

    /// Adds a backend as an inline table: `url` and more `keys` (TOML, e.g. `weight = 3`).
    pub fn backend_with(mut self, url: impl Into<String>, keys: &str) -> Route {
        self.backends
            .push(format!("{{ url = {:?}, {keys} }}", url.into()));
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
        t.push_str(&format!("backends = [{}]\n", self.backends.join(", ")));
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
    admin: bool,
}

impl GatewayBuilder {
    pub fn new() -> GatewayBuilder {
        GatewayBuilder {
            certs: Vec::new(),
            routes: Vec::new(),
            http_mode: None,
            extra: String::new(),
            admin: false,
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

    /// Starts the admin listener (`/healthz`, `/metrics`, `/backends`, ...) on 127.0.0.1:0 too.
    pub fn admin(mut self) -> GatewayBuilder {
        self.admin = true;
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
        // What a reload keeps: everything but the routes.
        let head = text.clone();
        for r in &self.routes {
            text.push_str(&r.toml());
        }

        // In a real file, so a reload reads it as SIGHUP would.
        let path = dir.path().join("streamgate.toml");
        std::fs::write(&path, &text).expect("write config");
        let config = streamgate::config::Config::load(&path)
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

        let admin = if self.admin {
            Some(TcpListener::bind("127.0.0.1:0").await.expect("bind admin"))
        } else {
            None
        };
        let admin_addr = admin
            .as_ref()
            .map(|l| l.local_addr().expect("admin address"));

        let (shutdown, stop) = oneshot::channel::<()>();
        let (reloader_tx, reloader_rx) = oneshot::channel();
        let serving = tokio::spawn(async move {
            let stop = async {
                let _ = stop.await;
            };
            if let Some(admin) = admin {
                let server = streamgate::Server::new(config, &loaded, listeners)
                    .map_err(|e| e.to_string())?;
                let _ = reloader_tx.send(server.reloader());
                server.with_admin(admin).run(stop).await;
                return Ok(());
            }
            streamgate::serve(&config, &loaded, listeners, stop)
                .await
                .map_err(|e| e.to_string())
        });
        let reloader = match admin_addr {
            Some(_) => Some(
                within("the server to start", reloader_rx)
                    .await
                    .expect("server starts"),
            ),
            None => None,
        };
        TestGateway {
            https: https_addr,
            http: http_addr,
            admin: admin_addr,
            ca,
            leaves,
            shutdown: Some(shutdown),
            serving,
            config: (path, head),
            reloader,
            _dir: dir,
        }
    }
}

/// A running gateway. Dropping it ends the test's use of it; the runtime ends the task.
pub struct TestGateway {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    /// The admin listener, when the builder asked for one.
    pub admin: Option<SocketAddr>,
    pub ca: TestCa,
    /// The leaf certificate of each `[[cert]]`, in config order.
    pub leaves: Vec<CertificateDer<'static>>,
    shutdown: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), String>>,
    /// The config file, and its text without the routes.
    config: (std::path::PathBuf, String),
    /// Reloads the config file (built with `.admin()` only).
    reloader: Option<std::sync::Arc<streamgate::reload::Reloader>>,
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

    /// A TLS client (SNI and host `authority`) whose connection comes from `local`
    /// (`127.0.0.2`, ...), so the gateway sees that client IP.
    pub async fn client_from(&self, local: IpAddr, proto: Proto, authority: &str) -> Client {
        let tls = tls_connect_from(local, self.https, &self.ca, authority, &[proto.alpn()]).await;
        Client::over_tls(proto, tls, authority).await
    }

    /// Writes `request` as raw bytes on a new HTTP/1.1 TLS connection (SNI `gw.test`) and
    /// reads until the gateway closes it: the status and the whole response text.
    pub async fn raw_h1(&self, request: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls =
            tls_connect(self.https, &self.ca, Some("gw.test"), &[b"http/1.1"], true).await;
        tls.write_all(request).await.expect("write the request");
        tls.flush().await.expect("flush");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        within("the gateway to answer and close", async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|t| t.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {text:?}"));
        (status, text)
    }

    /// A client on the plain listener.
    pub async fn plain_client(&self, proto: Proto, authority: &str) -> Client {
        let addr = self.http.expect("gateway was built with a plain listener");
        Client::plain(proto, addr, authority).await
    }

    /// Rewrites the config file with `routes` in place of the routes it had, and reloads it
    /// as SIGHUP would (the gateway must have been built with `.admin()`).
    pub async fn reload(&self, routes: &[Route]) -> Result<(), String> {
        let (path, head) = &self.config;
        let mut text = head.clone();
        for r in routes {
            text.push_str(&r.toml());
        }
        std::fs::write(path, text).expect("write config");
        let reloader = self
            .reloader
            .clone()
            .expect("the gateway was built with .admin(), which keeps its reloader");
        tokio::task::spawn_blocking(move || reloader.reload().map_err(|e| e.to_string()))
            .await
            .expect("reload does not panic")
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
