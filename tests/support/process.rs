//! The real `streamgate` binary for operations tests: config and certificate files in a temp
//! dir (rewritten atomically, as a reload would find them), free ports, the JSON log read line
//! by line so a test can wait for a log event, signals sent with kill(1), and /proc.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::client::{tls_connect, Client, Proto};
use super::pki::TestCa;
use super::{within, PATIENCE};

/// The host clients name; the certificates cover it.
pub const HOST: &str = "gw.test";

pub const SIGHUP: u32 = 1;
pub const SIGTERM: u32 = 15;

/// A config file and the certificate and key it names, in a temp dir.
pub struct GatewayFiles {
    pub ca: TestCa,
    /// The leaf certificate the files hold now.
    pub leaf: CertificateDer<'static>,
    config: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayFiles {
    pub fn new() -> GatewayFiles {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new();
        let leaf = ca.leaf(&[HOST, "*.gw.test"]);
        let cert = dir.path().join("gw.pem");
        let key = dir.path().join("gw.key");
        write_atomically(&key, &leaf.key_pem);
        write_atomically(&cert, &leaf.cert_pem);
        GatewayFiles {
            ca,
            leaf: leaf.der,
            config: dir.path().join("streamgate.toml"),
            cert,
            key,
            _dir: dir,
        }
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The gateway's control socket: each process gets its own, beside its config (through
    /// `STREAMGATE_CONTROL_SOCKET`), so tests running at once never share one.
    pub fn control_socket(&self) -> PathBuf {
        control_socket(&self.config)
    }

    /// A path in the temp dir, for files a test has the gateway write (an access log).
    pub fn path(&self, name: &str) -> PathBuf {
        self.config.with_file_name(name)
    }

    /// The config text: `listen` (lines of the `[listen]` table), the certificate, then `body`
    /// (`[shutdown]` and `[[route]]` tables).
    pub fn text(&self, listen: &str, body: &str) -> String {
        format!(
            "[listen]\n{listen}\n[[cert]]\ncert = {:?}\nkey = {:?}\n{body}",
            self.cert, self.key
        )
    }

    /// Writes the config file whole (a rename), so a reload never reads half of it.
    pub fn write(&self, listen: &str, body: &str) {
        write_atomically(&self.config, &self.text(listen, body));
    }

    /// Puts a new certificate and key for the same names in place of the old ones; returns the
    /// new leaf.
    pub fn replace_cert(&mut self) -> CertificateDer<'static> {
        let leaf = self.ca.leaf(&[HOST, "*.gw.test"]);
        write_atomically(&self.key, &leaf.key_pem);
        write_atomically(&self.cert, &leaf.cert_pem);
        self.leaf = leaf.der.clone();
        leaf.der
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write into the temp dir");
    std::fs::rename(&tmp, path).expect("rename within the temp dir");
}

/// The binary, running with `--config` and `--log-format json`. Killed when dropped.
pub struct GatewayProcess {
    pub files: GatewayFiles,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    listen: String,
    child: Child,
    /// Log lines not yet looked at by [`GatewayProcess::log_event`]; closed when stderr ends.
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line so far, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts the binary with `body` after the `[listen]` (https and admin on free ports) and
    /// `[[cert]]` tables; returns once it is ready and handles SIGHUP and SIGTERM.
    pub async fn start(files: GatewayFiles, body: &str) -> GatewayProcess {
        for _attempt in 0..5 {
            // Free ports: bind port 0 and let go. Another process may take one in between,
            // so a start that cannot listen is retried on fresh ports.
            let (https, admin) = {
                let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
                let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
                (
                    a.local_addr().expect("local address"),
                    b.local_addr().expect("local address"),
                )
            };
            let listen = format!("https = \"{https}\"\nadmin = \"{admin}\"");
            files.write(&listen, body);
            let (mut child, mut lines, log) = spawn(files.config());
            // Logged once the admin listener is bound, which is after the TLS one.
            if next_line(&mut lines, "admin listening", &log)
                .await
                .is_some()
            {
                let process = GatewayProcess {
                    files,
                    https,
                    admin,
                    listen,
                    child,
                    lines,
                    log,
                };
                process.ready().await;
                return process;
            }
            let _ = child.wait();
            let text = log.lock().expect("not poisoned").join("\n");
            assert!(
                text.contains("cannot listen"),
                "streamgate exited at start:\n{text}"
            );
        }
        panic!("streamgate could not listen on free ports in 5 attempts");
    }

    async fn ready(&self) {
        let status = within("/readyz to answer", async {
            loop {
                if let Ok((status, _)) = http_get(self.admin, "/readyz").await {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(status, 200, "a started gateway is ready");
        // The handlers are installed by tasks the runtime starts; a signal that came first
        // would end the process (the default action).
        self.handles(SIGHUP).await;
        self.handles(SIGTERM).await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Rewrites the config file with the same listeners and certificate and a new `body`.
    pub fn rewrite(&self, body: &str) {
        self.files.write(&self.listen, body);
    }

    /// The config text [`GatewayProcess::rewrite`] would write.
    pub fn text(&self, body: &str) -> String {
        self.files.text(&self.listen, body)
    }

    /// Sends `signal` (`"HUP"`, `"TERM"`) to the gateway.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits until the process catches `signo` (its bit in SigCgt of /proc/PID/status).
    pub async fn handles(&self, signo: u32) {
        let path = format!("/proc/{}/status", self.pid());
        within("the gateway to install its signal handler", async {
            loop {
                let status = std::fs::read_to_string(&path).unwrap_or_default();
                let caught = status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                    .is_some_and(|mask| mask >> (signo - 1) & 1 == 1);
                if caught {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// Waits for the next log line that contains `needle` (lines before it are passed over)
    /// and returns it; fails the test if the process exits first.
    pub async fn log_event(&mut self, needle: &str) -> String {
        match next_line(&mut self.lines, needle, &self.log).await {
            Some(line) => line,
            None => panic!(
                "streamgate exited without logging {needle:?}:\n{}",
                self.log_text()
            ),
        }
    }

    /// Everything the process has logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("not poisoned").join("\n")
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running then.
    pub async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the gateway") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the process and waits for it; the files stay.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// An HTTP client over a new TLS connection (SNI and host [`HOST`]).
    pub async fn client(&self, proto: Proto) -> Client {
        connect(self.https, &self.files.ca, proto).await
    }

    /// `GET path` on the admin listener: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        within("an admin request", http_get(self.admin, path))
            .await
            .unwrap_or_else(|e| panic!("admin GET {path} failed: {e}\n{}", self.log_text()))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        // The process this test started, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next line of `lines` that contains `needle`; `None` when the log ends (the process
/// exited) first.
async fn next_line(
    lines: &mut mpsc::UnboundedReceiver<String>,
    needle: &str,
    log: &Mutex<Vec<String>>,
) -> Option<String> {
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    found.unwrap_or_else(|_| {
        let text = log.lock().expect("not poisoned").join("\n");
        panic!("timed out waiting for the log line {needle:?}:\n{text}")
    })
}

type Spawned = (
    Child,
    mpsc::UnboundedReceiver<String>,
    Arc<Mutex<Vec<String>>>,
);

fn control_socket(config: &Path) -> PathBuf {
    config.with_file_name("control.sock")
}

fn spawn(config: &Path) -> Spawned {
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate"))
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .env("STREAMGATE_CONTROL_SOCKET", control_socket(config))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the streamgate binary");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, lines) = mpsc::unbounded_channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let all = log.clone();
    // Read the log to its end, so the gateway never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            all.lock().expect("not poisoned").push(line.clone());
            let _ = tx.send(line);
        }
    });
    (child, lines, log)
}

/// An HTTP client over a new TLS connection to `addr` (SNI and host [`HOST`]).
pub async fn connect(addr: SocketAddr, ca: &TestCa, proto: Proto) -> Client {
    let tls = tls_connect(addr, ca, Some(HOST), &[proto.alpn()], true).await;
    Client::over_tls(proto, tls, HOST).await
}

/// A one-shot HTTP/1.1 `GET` over plain TCP (`Connection: close`): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP/1.1 response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}
