//! The `streamgate` command: parse the CLI, load and validate the config, run the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamgate::config::Config;
use streamgate::{tls, Listeners};

/// `streamgate --version`: the crate version, the git commit and the build date (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("STREAMGATE_COMMIT"),
    ", built ",
    env!("STREAMGATE_BUILD_DATE"),
    ")"
);

/// mimalloc rather than the C library's allocator: the request path allocates small, short-
/// lived buffers on every request, and musl's allocator (the static image's) is slow at that.
/// Without the default `mimalloc` feature the C library's allocator serves, which heap
/// profilers such as heaptrack can follow (bench/README.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A TLS gateway for WebSocket, Server-Sent Events and HTTP services.
#[derive(Parser)]
#[command(name = "streamgate", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Log format of the main log: pretty for people, json for collectors. Default: `[log]
    /// format`, else pretty on a terminal and json otherwise. The level comes from RUST_LOG
    /// (default info). The access log follows `[log] format` first, then this.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,

    /// The config file. Default: config/streamgate.toml.
    #[arg(long, env = "STREAMGATE_CONFIG")]
    config: Option<PathBuf>,
}

/// Where the config is when neither `--config` nor STREAMGATE_CONFIG says.
const DEFAULT_CONFIG: &str = "config/streamgate.toml";

/// `--config` after the subcommand, else before it (or STREAMGATE_CONFIG), else the default.
/// Not a global option: `demo` and `health` read no config, and their help says so by not
/// offering one.
fn config_path(own: Option<PathBuf>, top: Option<PathBuf>) -> PathBuf {
    own.or(top).unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

impl From<LogFormat> for streamgate::config::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Pretty => streamgate::config::LogFormat::Pretty,
            LogFormat::Json => streamgate::config::LogFormat::Json,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Exit 0 if the running gateway answers GET /healthz on its control socket (the config
    /// file is not read). For container HEALTHCHECKs, which have no shell or curl.
    Health {
        /// The control socket. Default: $XDG_RUNTIME_DIR/streamgate.sock, else
        /// /tmp/streamgate-<uid>.sock (where a gateway opens it unless its config says otherwise).
        #[arg(long, env = "STREAMGATE_CONTROL_SOCKET")]
        socket: Option<PathBuf>,
        /// Check instead that a TLS listener accepts on this address (TCP connect).
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// Load and validate the config and certificates, print the route table, and exit
    /// (0 when valid, 2 with the reason on stderr when not).
    Check {
        /// The config file. Default: config/streamgate.toml.
        #[arg(long, env = "STREAMGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a self-contained demo on https://localhost:8443: a self-signed certificate made at
    /// start-up, built-in backends, and a page at / that shows them working.
    Demo {
        /// Where the demo's TLS listener binds.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format.map(Into::into);
    // The gateway's logging needs `[log]` from its config; the other commands log to stderr.
    if cli.command.is_some() {
        let defaults = streamgate::config::LogConfig::default();
        // Cannot fail: only a log.access file can.
        let _ = streamgate::log::init(format, &defaults);
    }
    let result = match cli.command {
        Some(Command::Health { socket, addr }) => return health(socket, addr),
        Some(Command::Check { config }) => check(&config_path(config, cli.config)),
        Some(Command::Demo { listen }) => runtime(None).and_then(|rt| rt.block_on(demo(listen))),
        None => run(&config_path(None, cli.config), format),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// One worker per core by default. With `worker_threads = 1` everything runs on the main
/// thread (a current-thread runtime): no work stealing and no cross-thread wake-ups, which is
/// what a one-core deployment (or a benchmark pinned to one core) wants.
fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    // Unset, tokio starts one worker per CPU the process may use, which std reads from the
    // cgroup CPU quota in a container (a Kubernetes CPU limit), not the node's core count.
    let (threads, from) = match worker_threads {
        Some(n) => (n, "runtime.worker_threads"),
        None => (
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            "CPUs available (the cgroup CPU limit when there is one)",
        ),
    };
    tracing::info!(worker_threads = threads, from, "runtime");
    builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn load(path: &Path) -> anyhow::Result<(Config, Vec<tls::LoadedCert>)> {
    let config = Config::load(path)?;
    let certs = tls::load_certs(&config.certs)?;
    Ok((config, certs))
}

fn check(path: &Path) -> anyhow::Result<()> {
    let (config, certs) = load(path)?;
    println!("{}: ok", config.path.display());
    println!("listen https {}", config.listen.https);
    if let Some(http) = config.listen.http {
        let mode = match config.listen.http_mode {
            streamgate::config::HttpMode::Redirect => "redirects to https",
            streamgate::config::HttpMode::Proxy => "proxies like https",
        };
        println!("listen http  {http} ({mode})");
    }
    if let Some(admin) = config.listen.admin {
        println!("listen admin {admin} (/healthz /readyz /metrics /backends, dashboard at /)");
    }
    for c in &certs {
        let expired = if c.expired { "  EXPIRED" } else { "" };
        println!(
            "cert  {}  names {:?}  until {}{expired}",
            c.source, c.names, c.not_after
        );
    }
    if let Some(acme) = &config.acme {
        // Offline: the cache is read, the CA is not asked.
        println!(
            "acme  {} ({}), cache {}",
            acme.directory,
            acme.challenge.name(),
            acme.cache.display()
        );
        let cache = streamgate::acme::cache::Cache::new(acme);
        for name in config.acme_names(certs.iter().flat_map(|c| &c.names)) {
            match cache.cert(&name) {
                Some(c) => {
                    let expired = if c.expired { "  EXPIRED" } else { "" };
                    println!(
                        "cert  {}  names {:?}  until {}  (acme){expired}",
                        c.source, c.names, c.not_after
                    );
                }
                None => println!("cert  acme {name:?}: none cached, ordered at start-up"),
            }
        }
    }
    let mut named: Vec<String> = certs.iter().flat_map(|c| c.names.clone()).collect();
    if config.acme.is_some() {
        named.extend(config.acme_names(&named));
    }
    for w in config.uncovered_hosts(&named) {
        eprintln!("warning: {w}");
    }
    // A runtime of its own: building routes starts health checkers, and DNS names are looked up.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let resolver = streamgate::resolver_for(&config);
        let ctx = streamgate::upstream::UpstreamContext {
            metrics: std::sync::Arc::new(streamgate::metrics::Metrics::new()),
            drain: streamgate::drain::Drain::new(),
            resolver: resolver.clone(),
            refresh: config.resolver.refresh,
        };
        let router = streamgate::router::Router::new(&config.routes, &ctx, None);
        println!("routes, in match order:");
        for r in router.routes() {
            let c = &r.config;
            let mut policy = format!("balance {}", c.balance.name());
            if let streamgate::config::Balance::Hash(key) = &c.balance {
                policy.push_str(&format!(" on {key}"));
            }
            policy.push_str(&format!(", retries {}", c.retries));
            if let Some(s) = c.slow_start {
                policy.push_str(&format!(", slow start {}", humantime::format_duration(s)));
            }
            if let Some(h) = &c.health {
                policy.push_str(&format!(
                    ", health check {} every {}",
                    h.path,
                    humantime::format_duration(h.interval)
                ));
            }
            if c.strip_prefix {
                policy.push_str(", strip prefix");
            }
            println!("  {}  ({policy})", r.name);
            for b in &c.backends {
                let weight = format!("weight {}", b.weight);
                if !b.discover {
                    println!("      -> {}  {weight}", b.url);
                    continue;
                }
                let found = match &resolver {
                    None => "no DNS resolver could be set up (warning)".to_string(),
                    Some(res) => match tokio::time::timeout(
                        std::time::Duration::from_secs(3),
                        res.resolve(b.authority.host()),
                    )
                    .await
                    {
                        Ok(Ok(found)) => {
                            let addrs: Vec<String> =
                                found.addrs.iter().map(|a| a.to_string()).collect();
                            format!("now {}", addrs.join(", "))
                        }
                        Ok(Err(e)) => format!("does not resolve yet (warning): {e}"),
                        Err(_) => "DNS did not answer within 3s (warning)".to_string(),
                    },
                };
                println!("      -> {}  {weight}, discovered by DNS: {found}", b.url);
            }
        }
    });
    Ok(())
}

fn run(path: &Path, format: Option<streamgate::config::LogFormat>) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    // What loading logs (certificate warnings) goes to stderr: the global subscriber needs the
    // config's [log].
    let loading = tracing_subscriber::registry().with(streamgate::log::main_layer(format));
    let (config, certs) = tracing::subscriber::with_default(loading, || load(path))?;
    let access_file = streamgate::log::init(format, &config.log)
        .context("cannot open the access log (log.access)")?;
    let rt = runtime(config.worker_threads)?;
    rt.block_on(async {
        // Before anything listens, so a SIGUSR1 never meets the default action (exit).
        let reopen =
            streamgate::log::reopen_on_sigusr1(access_file).context("cannot listen for SIGUSR1")?;
        tokio::spawn(reopen);
        let control = open_control(&config.listen.control_socket, true)?;
        let listeners = Listeners::bind(&config.listen).await?;
        let admin = match config.listen.admin {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (listen.admin)"))?,
            ),
            None => None,
        };
        let mut server = streamgate::Server::new(config, &certs, listeners)?.watch_config();
        if let Some(admin) = admin {
            server = server.with_admin(admin);
        }
        if let Some(control) = control {
            server = server.with_control(control);
        }
        server.run(shutdown_then_force()).await;
        Ok(())
    })
}

/// The first SIGTERM/SIGINT starts the drain; a second one exits at once. The handlers are
/// installed here, before anything listens, and kept, so no signal falls between two of them.
fn shutdown_then_force() -> impl std::future::Future<Output = ()> {
    let mut signals = Signals::install();
    async move {
        signals.next().await;
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!("second signal: exiting without waiting for connections");
            std::process::exit(1);
        });
    }
}

/// The control socket `listen.control_socket` names. One the file sets (or
/// `STREAMGATE_CONTROL_SOCKET` names) must open when `strict`; the default one is a warning.
fn open_control(
    socket: &streamgate::config::ControlSocket,
    strict: bool,
) -> anyhow::Result<Option<streamgate::control::ControlSocket>> {
    use streamgate::config::ControlSocket;
    let (path, required) = match socket {
        ControlSocket::Off => return Ok(None),
        ControlSocket::Default(path) => (path, false),
        ControlSocket::At(path) => (path, strict),
    };
    match streamgate::control::ControlSocket::bind(path) {
        Ok(socket) => Ok(Some(socket)),
        Err(e) if required => Err(e.into()),
        Err(e) => {
            tracing::warn!(
                error = %streamgate::proxy::error::error_chain(&e),
                "no control socket: `streamgate health` cannot reach this gateway (set listen.control_socket)"
            );
            Ok(None)
        }
    }
}

/// Asks the running gateway, never the config file: a file edited (or broken) since the
/// gateway started says nothing about the process that is running.
fn health(socket: Option<PathBuf>, addr: Option<SocketAddr>) -> ExitCode {
    use std::time::Duration;
    let timeout = Duration::from_secs(3);
    if let Some(addr) = addr {
        return match std::net::TcpStream::connect_timeout(&local(addr), timeout) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("streamgate: unhealthy: nothing accepts on {addr}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let path = socket.unwrap_or_else(streamgate::control::default_path);
    match streamgate::control::ask_health(&path, timeout) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!(
                "streamgate: unhealthy: the gateway on {} answered {status} to /healthz",
                path.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "streamgate: unhealthy: no gateway answers on the control socket {}: {e} (is it running? --socket PATH or {} names another socket, --addr ADDR checks a TLS port)",
                path.display(),
                streamgate::control::SOCKET_ENV
            );
            ExitCode::FAILURE
        }
    }
}

/// A wildcard listen address is checked on loopback.
fn local(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

async fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    let demo = streamgate::demo::Demo::start(listen).await?;
    let addr = demo.listeners.https_addr()?;
    println!("streamgate demo: https://localhost:{}/", addr.port());
    println!("certificate SHA-256 fingerprint: {}", demo.fingerprint);
    println!(
        "(self-signed, made at start-up: your browser will ask you to accept it; curl needs -k)"
    );
    // The demo opens its control socket if it can (`streamgate health` in the image).
    let control = open_control(&demo.config.listen.control_socket, false)?;
    let mut server = streamgate::Server::new(demo.config, &demo.certs, demo.listeners)?;
    if let Some(control) = control {
        server = server.with_control(control);
    }
    server.run(shutdown_then_force()).await;
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from creation on.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, signal = name, "cannot listen for signal");
                None
            }
        };
        Signals {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            int: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    async fn next(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => tracing::info!("SIGTERM received"),
            _ = recv(&mut self.int) => tracing::info!("SIGINT received"),
        }
    }
}
