//! `streamgate-bench`: streamgate against nginx, HAProxy and the backend directly, on one
//! machine, every scenario interleaved across the targets (issue 6). `bench/run.sh` installs
//! the tools, builds and runs `all`.

mod backend;
mod proxies;
mod report;
mod scenarios;
mod sys;
mod tls;
mod ws;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use proxies::{Kind, Setup};
use scenarios::{Env, Log};

#[derive(Parser)]
#[command(name = "streamgate-bench", about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every scenario against streamgate, nginx, HAProxy and the backend directly; writes
    /// the results to <results>/<UTC time>.md and <results>/latest.md.
    All(RunArgs),
    /// Some scenarios only (printed, and written as <UTC time>-partial.md).
    Scenario {
        /// Scenario names, in any order; they run in the usual order.
        #[arg(required = true, value_parser = clap::builder::PossibleValuesParser::new(scenarios::NAMES))]
        names: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// The backend server (the bench starts it as its own process, on core 1).
    Backend {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The streamgate binary to measure.
    #[arg(long, default_value = "target/release/streamgate")]
    gateway: PathBuf,
    /// Shortened scenarios (1 s runs, 2k round trips, 100 idle connections, 20 stalled
    /// readers) and one round unless --rounds says otherwise, for trying the bench out; its
    /// results are not for comparison.
    #[arg(long)]
    quick: bool,
    /// Rounds per scenario (each round runs every target once, in turn); figures are the
    /// medians over the rounds. Default 3, or 1 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: Option<u16>,
    /// Keep the temp dir (configs, certificate, proxy logs) and print its path.
    #[arg(long)]
    keep_temp: bool,
    /// Where the results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results: PathBuf,
    /// The targets to run, comma-separated (the others are neither started nor measured).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "streamgate,nginx,haproxy,direct"
    )]
    targets: Vec<Kind>,
    /// Also write the table's rows to this file as tab-separated values (scenario, metric,
    /// better, streamgate, nginx, HAProxy, direct; empty where there is no figure), for
    /// scripts such as bench/ab.sh.
    #[arg(long)]
    tsv: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Backend { addr } => backend::run(addr),
        Cmd::All(run) => bench(run, Vec::new()),
        Cmd::Scenario { names, run } => bench(run, names),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamgate-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: RunArgs, only: Vec<String>) -> anyhow::Result<()> {
    let t_start = Instant::now();
    let (stamp, started_utc) = report::utc_now();
    // Cores online, not the ones this process may use (run.sh already pins it to core 1).
    let cores = sys::cores_online();
    if cores < 2 {
        bail!("the bench needs two cores (proxy on 0, load generator and backend on 1)");
    }
    // Before any thread exists, so the runtime and every child inherit core 1.
    sys::pin_to_core(1).context("cannot pin the bench to core 1")?;
    let nofile = sys::raise_nofile().context("cannot raise RLIMIT_NOFILE")?;
    let kinds: Vec<Kind> = Kind::PROXIES
        .into_iter()
        .filter(|k| args.targets.contains(k))
        .collect();
    let mut tools = vec!["wrk", "h2load", "taskset"];
    for (k, tool) in [(Kind::Nginx, "nginx"), (Kind::Haproxy, "haproxy")] {
        if kinds.contains(&k) {
            tools.push(tool);
        }
    }
    for tool in tools {
        if which(tool).is_none() {
            bail!("{tool} is not installed: run bench/run.sh, which installs it");
        }
    }
    let gateway = std::fs::canonicalize(&args.gateway)
        .with_context(|| format!("no streamgate binary at {}", args.gateway.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("streamgate-bench-")
        .tempdir()?;
    let cert = tls::make_cert(dir.path())?;
    let exe = std::env::current_exe()?;
    let (backend, backend_addr) = proxies::start_backend(&exe)?;
    eprintln!("backend on {backend_addr} (pid {})", backend.pid());
    let setup = Setup {
        dir: dir.path().to_path_buf(),
        cert,
        backend: backend_addr,
        gateway: gateway.clone(),
        nofile,
    };
    let mut started = Vec::new();
    for k in kinds {
        let p = proxies::start(k, &setup)?;
        eprintln!("{} on {} (pid {})", k.name(), p.addr, p.pid());
        started.push(p);
    }
    let env = Env {
        setup,
        proxies: RefCell::new(started),
        direct: args.targets.contains(&Kind::Direct),
        backend_pid: backend.pid(),
        quick: args.quick,
        rounds: rounds(&args),
        tls: tls::Clients::new(),
        log: RefCell::new(Log::default()),
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tls_seen = rt.block_on(async {
        tokio::select! {
            r = async {
                let tls = probe(&env).await?;
                scenarios::run(&env, &only).await?;
                anyhow::Ok(tls)
            } => r,
            s = interrupted() => Err(anyhow::anyhow!("{s}: stopping")),
        }
    })?;

    let configs = ["streamgate.toml", "nginx.conf", "haproxy.cfg"]
        .iter()
        .flat_map(|f| [f.to_string(), format!("fleet-{f}")])
        .filter_map(|f| {
            let text = std::fs::read_to_string(env.setup.dir.join(&f)).ok()?;
            Some((f, text))
        })
        .collect();
    // Stop everything before writing: the guards kill the processes they started.
    let Env { log, proxies, .. } = env;
    drop(proxies);
    drop(backend);

    let repo = exe_repo_dir();
    let meta = report::Meta {
        started_utc,
        minutes: t_start.elapsed().as_secs_f64() / 60.0,
        script_minutes: script_minutes(),
        rounds: rounds(&args),
        quick: args.quick,
        command: command_line(),
        versions: vec![
            (
                "streamgate".into(),
                format!(
                    "{} (git {})",
                    sys::version_of(&gateway.to_string_lossy(), &["--version"]),
                    sys::version_of("git", &["-C", &repo, "describe", "--always", "--dirty"])
                ),
            ),
            ("nginx".into(), sys::version_of("nginx", &["-v"])),
            ("HAProxy".into(), sys::version_of("haproxy", &["-v"])),
            ("wrk".into(), sys::version_of("wrk", &["-v"])),
            ("h2load".into(), sys::version_of("h2load", &["--version"])),
        ],
        cpu_model: cpu_model(),
        cores,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        nofile,
        idle_n: if args.quick {
            100
        } else {
            proxies::idle_capacity(nofile)
        },
        tls: tls_seen,
        configs,
    };
    let text = report::render(&meta, &log.borrow());
    println!("{text}");
    let stamp = if only.is_empty() {
        stamp
    } else {
        format!("{stamp}-partial")
    };
    for f in report::write(&args.results, &stamp, args.quick, only.is_empty(), &text)? {
        eprintln!("wrote {}", f.display());
    }
    if let Some(path) = &args.tsv {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, report::tsv(&log.borrow()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.keep_temp {
        eprintln!("kept {}", dir.keep().display());
    }
    Ok(())
}

/// One request through every target before the scenarios: a broken config fails here, and the
/// negotiated TLS parameters go into the report.
async fn probe(env: &Env) -> anyhow::Result<Vec<(Kind, String)>> {
    let mut seen = Vec::new();
    for t in env.targets() {
        scenarios::http::one_request(&t, t.tls(&env.tls.h1))
            .await
            .with_context(|| format!("{} does not answer GET /small", t.kind.name()))?;
        let s = tls::connect(t.addr, t.tls(&env.tls.h1), None).await?;
        seen.push((t.kind, tls::describe(&s)));
    }
    Ok(seen)
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn rounds(args: &RunArgs) -> usize {
    args.rounds
        .map(usize::from)
        .unwrap_or(if args.quick { 1 } else { 3 })
}

/// Minutes since bench/run.sh started, from the `STREAMGATE_BENCH_T0` (Unix seconds) it sets.
fn script_minutes() -> Option<f64> {
    let t0: u64 = std::env::var("STREAMGATE_BENCH_T0").ok()?.parse().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(now.checked_sub(t0)? as f64 / 60.0)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    format!("taskset -c 1 {}", args.join(" "))
}

fn exe_repo_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/..").to_string()
}
