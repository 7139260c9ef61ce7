//! The `streamgate` command: parse the CLI, load and validate the config, run the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use streamgate::config::Config;
use streamgate::{tls, Listeners};

/// A TLS gateway for WebSocket, Server-Sent Events and HTTP services.
#[derive(Parser)]
#[command(name = "streamgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The config file.
    #[arg(
        long,
        global = true,
        env = "STREAMGATE_CONFIG",
        default_value = "config/streamgate.toml"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
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
    init_logging();
    let result = match cli.command {
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder.enable_all().build().context("cannot start the tokio runtime")
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
        println!("listen http  {http} ({:?})", config.listen.http_mode);
    }
    for c in &certs {
        let expired = if c.expired { "  EXPIRED" } else { "" };
        println!("cert  {}  names {:?}  until {}{expired}", c.source, c.names, c.not_after);
    }
    let router = streamgate::router::Router::new(&config.routes);
    println!("routes, in match order:");
    for r in router.routes() {
        let backends: Vec<String> = r.config.backends.iter().map(|b| b.to_string()).collect();
        let strip = if r.config.strip_prefix { "  (strip prefix)" } else { "" };
        println!("  {:<32} -> {}{strip}", r.name, backends.join(", "));
    }
    Ok(())
}

fn run(path: &Path) -> anyhow::Result<()> {
    let (config, certs) = load(path)?;
    let rt = runtime(config.worker_threads)?;
    rt.block_on(async {
        let listeners = Listeners::bind(&config.listen).await?;
        streamgate::serve(&config, &certs, listeners, shutdown_signal()).await?;
        Ok(())
    })
}

async fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    let demo = streamgate::demo::Demo::start(listen).await?;
    let addr = demo.listeners.https_addr()?;
    println!("streamgate demo: https://localhost:{}/", addr.port());
    println!("certificate SHA-256 fingerprint: {}", demo.fingerprint);
    println!("(self-signed, made at start-up: your browser will ask you to accept it; curl needs -k)");
    streamgate::serve(&demo.config, &demo.certs, demo.listeners, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
