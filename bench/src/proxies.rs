//! The processes under test: config writers and start/stop for streamgate, nginx and HAProxy
//! (each pinned to core 0, one worker, no access log), and the backend (core 1).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::sys::ProcGuard;
use crate::tls::CertFiles;

pub const PROXY_CORE: &str = "0";
pub const CLIENT_CORE: &str = "1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kind {
    Streamgate,
    Nginx,
    Haproxy,
    Direct,
}

impl Kind {
    pub const PROXIES: [Kind; 3] = [Kind::Streamgate, Kind::Nginx, Kind::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Streamgate => "streamgate",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "HAProxy",
            Kind::Direct => "direct",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One running proxy.
pub struct Proxy {
    pub kind: Kind,
    pub addr: SocketAddr,
    guard: ProcGuard,
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

/// What every proxy config needs.
pub struct Setup {
    pub dir: PathBuf,
    pub cert: CertFiles,
    pub backend: SocketAddr,
    pub gateway: PathBuf,
    /// The hard RLIMIT_NOFILE, which each proxy inherits (run.sh raises the soft limit to it).
    pub nofile: u64,
}

pub fn start_backend(exe: &Path) -> anyhow::Result<(ProcGuard, SocketAddr)> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", CLIENT_CORE])
        .arg(exe)
        .args(["backend", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut guard = ProcGuard::spawn("backend", cmd)?;
    let stdout = guard.take_stdout().context("backend stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("backend did not say where it listens: {line:?}"))?;
    Ok((guard, addr))
}

/// A free loopback port (bound, read, released: the proxy binds it right after).
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A proxy in front of the shared backend.
pub fn start(kind: Kind, s: &Setup) -> anyhow::Result<Proxy> {
    start_with(kind, s, "", &[s.backend])
}

/// A proxy in front of `backends` (balanced by least connections when there are several);
/// its config, log and nginx prefix files are named with `tag` in front.
pub fn start_with(
    kind: Kind,
    s: &Setup,
    tag: &str,
    backends: &[SocketAddr],
) -> anyhow::Result<Proxy> {
    let addr = free_port()?;
    let mut cmd = match kind {
        Kind::Streamgate => {
            let path = s.dir.join(format!("{tag}streamgate.toml"));
            let mut config = streamgate_config(addr, s, backends);
            if access_log_off_supported(&s.gateway, &path, &config) {
                config.push_str(ACCESS_LOG_OFF);
            }
            std::fs::write(&path, config)?;
            let mut cmd = pinned(&s.gateway);
            cmd.arg("--config")
                .arg(&path)
                .args(["--log-format", "json"])
                .env("RUST_LOG", "warn");
            cmd
        }
        Kind::Nginx => {
            let path = s.dir.join(format!("{tag}nginx.conf"));
            let prefix = s.dir.join(format!("{tag}nginx"));
            std::fs::create_dir_all(&prefix)?;
            std::fs::write(&path, nginx_config(addr, s, &prefix, backends))?;
            let mut cmd = pinned(Path::new("nginx"));
            cmd.arg("-p")
                .arg(&prefix)
                .arg("-e")
                .arg(prefix.join("error.log"))
                .arg("-c")
                .arg(&path)
                .args(["-g", "daemon off;"]);
            cmd
        }
        Kind::Haproxy => {
            let path = s.dir.join(format!("{tag}haproxy.cfg"));
            std::fs::write(&path, haproxy_config(addr, s, backends))?;
            let mut cmd = pinned(Path::new("haproxy"));
            cmd.arg("-f").arg(&path).arg("-db");
            cmd
        }
        Kind::Direct => bail!("direct is the backend, not a proxy"),
    };
    let log = s.dir.join(format!("{tag}{}.log", kind.name()));
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let mut guard = ProcGuard::spawn(kind.name(), cmd)?;
    wait_listening(&mut guard, addr, kind, &log)?;
    Ok(Proxy { kind, addr, guard })
}

fn pinned(program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", PROXY_CORE]).arg(program);
    cmd
}

fn wait_listening(
    g: &mut ProcGuard,
    addr: SocketAddr,
    kind: Kind,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Err(e) = g.check_alive() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{e:#}\n{log}");
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} does not listen on {addr} after 15 s", kind.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Descriptors a proxy may use for idle connections: each proxied connection holds two (client
/// and backend), and a margin stays for listeners, logs and the like.
pub fn idle_capacity(nofile: u64) -> usize {
    (nofile.saturating_sub(200) / 2) as usize
}

/// HAProxy needs 2 x maxconn descriptors plus a few and, not allowed to raise its hard limit
/// here, refuses to start when they do not fit: what fits, which is more than `idle_capacity`.
pub fn haproxy_maxconn(nofile: u64) -> u64 {
    nofile.saturating_sub(100) / 2
}

/// No access log, as for nginx and HAProxy: since `[log]` exists, RUST_LOG no longer
/// silences access lines, and writing one per request costs about a fifth of the CPU.
const ACCESS_LOG_OFF: &str = "\n[log]\naccess = \"off\"\n";

/// Whether `gateway` knows `[log] access` (binaries from before it refuse the table, and
/// RUST_LOG=warn is what silences their access lines). Asked once per binary, with `check`.
fn access_log_off_supported(gateway: &Path, path: &Path, config: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static KNOWN: Mutex<Option<HashMap<PathBuf, bool>>> = Mutex::new(None);
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let known = known.get_or_insert_with(HashMap::new);
    if let Some(yes) = known.get(gateway) {
        return *yes;
    }
    let probe = path.with_extension("probe.toml");
    let yes = std::fs::write(&probe, format!("{config}{ACCESS_LOG_OFF}")).is_ok()
        && Command::new(gateway)
            .arg("check")
            .arg("--config")
            .arg(&probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&probe);
    known.insert(gateway.to_path_buf(), yes);
    yes
}

/// `"http://a", "http://b"` for a TOML array.
fn backend_urls(backends: &[SocketAddr]) -> String {
    let urls: Vec<String> = backends.iter().map(|b| format!("\"http://{b}\"")).collect();
    urls.join(", ")
}

/// No `balance` key: the gateway's default is least connections from the upstream rewrite on
/// (round robin before it), and binaries from before it reject the unknown key.
fn streamgate_config(addr: SocketAddr, s: &Setup, backends: &[SocketAddr]) -> String {
    let balance = if backends.len() > 1 {
        "# No `balance` key: least_conn is the default (older binaries reject the key).\n"
    } else {
        ""
    };
    format!(
        r#"# streamgate-bench: one worker thread, the bench certificate, every path to the backend.
[listen]
https = "{addr}"

[limits]
max_connections = 100000

[runtime]
worker_threads = 1

[[cert]]
cert = "{cert}"
key = "{key}"

[[route]]
path = "/"
{balance}backends = [{backends}]
"#,
        cert = s.cert.cert.display(),
        key = s.cert.key.display(),
        backends = backend_urls(backends),
    )
}

/// nginx as its documentation advises for WebSocket (HTTP/1.1, the Upgrade/Connection map,
/// long read timeout), SSE (proxy_buffering off) and upstream keep-alive (HTTP/1.1 with an
/// empty Connection header); TLS 1.3 only, a shared session cache and session tickets on
/// (nginx's default for tickets), so clients that resume can (scenario 2b).
fn nginx_config(addr: SocketAddr, s: &Setup, d: &Path, backends: &[SocketAddr]) -> String {
    let mut upstream = String::new();
    if backends.len() > 1 {
        upstream.push_str("least_conn;\n        ");
    }
    for b in backends {
        upstream.push_str(&format!("server {b};\n        "));
    }
    format!(
        r#"# streamgate-bench: one worker, no access log, pinned to core 0 by taskset.
user root;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    # Twice the file limit: nginx starts closing fresh connections once fewer than 1/16 of
    # its slots are free, so the file limit, not this, must be what binds.
    worker_connections {wc};
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    tcp_nodelay on;
    keepalive_timeout 65s;
    # Default 1000: a keep-alive benchmark would measure reconnects, not requests.
    keepalive_requests 1000000;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream backend {{
        {upstream}keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen {addr} ssl http2;
        server_name localhost;

        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 1d;
        ssl_session_tickets on;

        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;

        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}

        location /ws {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}

        location /events {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"#,
        nofile = s.nofile,
        wc = s.nofile * 2,
        d = d.display(),
        cert = s.cert.cert.display(),
        key = s.cert.key.display(),
    )
}

/// HAProxy as its documentation advises for WebSocket (`mode http`, `timeout tunnel`), h2 on
/// the bind by ALPN, connection reuse towards the backend, and `option http-no-delay` on the
/// event-stream backend (low-latency streaming; without it the kernel may hold small chunks).
/// Session resumption as it comes: its session cache (`tune.ssl.cachesize`) and tickets on.
fn haproxy_config(addr: SocketAddr, s: &Setup, backends: &[SocketAddr]) -> String {
    let mut servers = String::new();
    if backends.len() > 1 {
        servers.push_str("    balance leastconn\n");
    }
    for (i, b) in backends.iter().enumerate() {
        servers.push_str(&format!("    server s{} {b}\n", i + 1));
    }
    format!(
        r#"# streamgate-bench: one thread, no log, pinned to core 0 by taskset.
global
    nbthread 1
    maxconn {maxconn}
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
    ssl-default-bind-options prefer-client-ciphers ssl-min-ver TLSv1.3

defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout tunnel 1h

frontend fe
    bind {addr} ssl crt {pem} alpn h2,http/1.1
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    use_backend be_sse if {{ path_beg /events }}
    default_backend be

backend be
{servers}
backend be_sse
    option http-no-delay
{servers}"#,
        maxconn = haproxy_maxconn(s.nofile),
        pem = s.cert.combined.display(),
    )
}
