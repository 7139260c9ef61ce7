//! The `streamgate` command: parse the CLI, load and validate the config, run the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamgate::config::Config;
use streamgate::{tls, Listeners};

/// mimalloc rather than the C library's allocator: the request path allocates small, short-
/// lived buffers on every request, and musl's allocator (the static image's) is slow at that.
/// `streamgate --version`: the crate version, the git commit and the build date (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("STREAMGATE_COMMIT"),
    ", built ",
    env!("STREAMGATE_BUILD_DATE"),
    ")"
);

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A TLS gateway for WebSocket, Server-Sent Events and HTTP services.
#[derive(Parser)]
#[command(name = "streamgate", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Log format: pretty for people, json for collectors. Default: pretty on a terminal,
    /// json otherwise. The level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,

    /// The config file.
    #[arg(
        long,
        global = true,
        env = "STREAMGATE_CONFIG",
        default_value = "config/streamgate.toml"
    )]
    config: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Exit 0 if the gateway answers: GET /healthz on the admin listener when the config sets
    /// one, else a TLS-port connect. For container HEALTHCHECKs, which have no shell or curl.
    Health {
        /// Check that a TLS listener accepts on this address instead (e.g. a demo's --listen).
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// Load and validate the config and certificates, print the route table, and exit
    /// (0 when valid, 2 with the reason on stderr when not).
    Check,
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
    init_logging(cli.log_format);
    let result = match cli.command {
        Some(Command::Health { addr }) => return health(&cli.config, addr),
        Some(Command::Check) => check(&cli.config),
        Some(Command::Demo { listen }) => runtime(None).and_then(|rt| rt.block_on(demo(listen))),
        None => run(&cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
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
    for w in config.uncovered_hosts(certs.iter().flat_map(|c| &c.names)) {
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

fn run(path: &Path) -> anyhow::Result<()> {
    let (config, certs) = load(path)?;
    let rt = runtime(config.worker_threads)?;
    rt.block_on(async {
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

fn health(path: &Path, addr: Option<SocketAddr>) -> ExitCode {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;
    let timeout = Duration::from_secs(3);
    // The demo has no config file: then its default TLS port is what must answer.
    let config = Config::load(path).ok();
    let admin = if addr.is_some() {
        None
    } else {
        config.as_ref().and_then(|c| c.listen.admin)
    };
    let result = match admin {
        Some(admin) => (|| -> std::io::Result<bool> {
            let mut s = TcpStream::connect_timeout(&local(admin), timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)?;
            Ok(head.starts_with(b"HTTP/1.1 200"))
        })(),
        None => {
            let https = addr
                .or(config.map(|c| c.listen.https))
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8443)));
            TcpStream::connect_timeout(&local(https), timeout).map(|_| true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("streamgate: unhealthy: /healthz did not answer 200");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("streamgate: unhealthy: {e}");
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
    streamgate::Server::new(demo.config, &demo.certs, demo.listeners)?
        .run(shutdown_then_force())
        .await;
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
