//! The scenarios, what they share (targets, CPU meters, result rows), and the order they run
//! in: for each scenario, each target in turn.

pub mod bulk;
pub mod fleet;
pub mod http;
pub mod idle;
pub mod sse;
pub mod stalled;
pub mod wsock;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

use crate::proxies::{self, Kind, Proxy, Setup};
use crate::sys;
use crate::tls::Clients;

/// Everything the scenarios run against.
pub struct Env {
    pub setup: Setup,
    /// The proxies under test (all three unless --targets says otherwise); replaced by fresh
    /// processes before the idle-memory scenario.
    pub proxies: RefCell<Vec<Proxy>>,
    /// Whether the backend itself is a target (--targets).
    pub direct: bool,
    pub backend_pid: u32,
    pub quick: bool,
    /// Rounds per scenario: each round runs every target once, in order (--rounds).
    pub rounds: usize,
    pub tls: Clients,
    pub log: RefCell<Log>,
}

/// What the report prints besides the table.
#[derive(Default)]
pub struct Log {
    pub rows: Vec<Row>,
    pub cpu: Vec<CpuNote>,
    pub notes: Vec<String>,
}

/// One target of one scenario run.
#[derive(Clone)]
pub struct Target {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// The proxy's pid; None for direct.
    pub pid: Option<u32>,
}

impl Target {
    pub fn of(p: &Proxy) -> Target {
        Target {
            kind: p.kind,
            addr: p.addr,
            pid: Some(p.pid()),
        }
    }

    pub fn is_direct(&self) -> bool {
        self.kind == Kind::Direct
    }

    /// The TLS client for this target (None: plain, the backend itself).
    pub fn tls<'a>(&self, c: &'a TlsConnector) -> Option<&'a TlsConnector> {
        (!self.is_direct()).then_some(c)
    }

    /// `https://addr` or `http://addr` for wrk and h2load.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.is_direct() { "http" } else { "https" };
        format!("{scheme}://{}{path}", self.addr)
    }
}

impl Env {
    /// Proxies first, direct last, in a fixed order for every scenario.
    pub fn targets(&self) -> Vec<Target> {
        let mut t: Vec<Target> = self.proxies.borrow().iter().map(Target::of).collect();
        if self.direct {
            t.push(Target {
                kind: Kind::Direct,
                addr: self.setup.backend,
                pid: None,
            });
        }
        t
    }

    /// The kinds of proxy under test, in order.
    pub fn proxy_kinds(&self) -> Vec<Kind> {
        self.proxies.borrow().iter().map(|p| p.kind).collect()
    }

    /// Stops the proxies and starts fresh ones (new processes, new ports).
    pub fn restart_proxies(&self) -> anyhow::Result<()> {
        let kinds = self.proxy_kinds();
        let mut p = self.proxies.borrow_mut();
        p.clear();
        for k in kinds {
            p.push(proxies::start(k, &self.setup)?);
        }
        Ok(())
    }

    /// Scenario length: `full` normally, `quick` with --quick.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// The rounds of a scenario, 1-based, announced on stderr.
    pub fn rounds(&self) -> impl Iterator<Item = usize> + '_ {
        (1..=self.rounds).inspect(|r| {
            if self.rounds > 1 {
                eprintln!("  round {r} of {}", self.rounds);
            }
        })
    }

    pub fn row(&self, row: Row) {
        self.log.borrow_mut().rows.push(row);
    }

    pub fn note(&self, note: String) {
        eprintln!("  note: {note}");
        self.log.borrow_mut().notes.push(note);
    }

    pub fn cpu(&self, scenario: &str, kind: Kind, u: &Usage) {
        eprintln!(
            "  {:<12} wall {:>6.2}s  proxy {:>6.2}s  load gen {:>6.2}s  backend {:>6.2}s  other {:>5.2}s / {:>5.2}s",
            kind.name(),
            u.wall,
            u.proxy,
            u.loadgen,
            u.backend,
            u.other0,
            u.other1
        );
        self.log.borrow_mut().cpu.push(CpuNote {
            scenario: scenario.to_string(),
            kind,
            usage: *u,
        });
    }
}

/// CPU seconds spent during one measurement, by process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall: f64,
    pub proxy: f64,
    pub backend: f64,
    /// The bench process itself plus the wrk / h2load it waited for.
    pub loadgen: f64,
    /// Busy seconds of cores 0 and 1 not accounted to the proxy (core 0) or to the load
    /// generator and backend (core 1): other processes, steal, interrupts.
    pub other0: f64,
    pub other1: f64,
}

pub struct CpuNote {
    pub scenario: String,
    pub kind: Kind,
    pub usage: Usage,
}

/// Reads CPU counters at the start of a measurement.
pub struct Meter {
    t0: Instant,
    pid: Option<u32>,
    backend_pids: Vec<u32>,
    proxy0: f64,
    backend0: f64,
    self0: f64,
    children0: f64,
    cores0: Vec<f64>,
}

impl Meter {
    pub fn start(env: &Env, t: &Target) -> Meter {
        Meter::start_with(t, &[env.backend_pid])
    }

    /// With other backend processes than the shared one (their CPU summed).
    pub fn start_with(t: &Target, backend_pids: &[u32]) -> Meter {
        Meter {
            t0: Instant::now(),
            pid: t.pid,
            backend_pids: backend_pids.to_vec(),
            proxy0: t.pid.map(sys::tree_cpu).unwrap_or(0.0),
            backend0: backends_cpu(backend_pids),
            self0: sys::self_cpu(),
            children0: sys::children_cpu(),
            cores0: sys::cores_busy(),
        }
    }

    pub fn finish(&self) -> Usage {
        let cores = sys::cores_busy();
        let core = |i: usize| match (cores.get(i), self.cores0.get(i)) {
            (Some(b), Some(a)) => b - a,
            _ => 0.0,
        };
        let mut u = Usage {
            wall: self.t0.elapsed().as_secs_f64(),
            proxy: self.pid.map(sys::tree_cpu).unwrap_or(0.0) - self.proxy0,
            backend: backends_cpu(&self.backend_pids) - self.backend0,
            loadgen: (sys::self_cpu() - self.self0) + (sys::children_cpu() - self.children0),
            other0: 0.0,
            other1: 0.0,
        };
        u.other0 = (core(0) - u.proxy).max(0.0);
        u.other1 = (core(1) - u.loadgen - u.backend).max(0.0);
        u
    }
}

fn backends_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| sys::proc_cpu(p)).sum()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Better {
    Higher,
    Lower,
    /// Context, not a score.
    Info,
}

/// The target for a row, relative to the better of nginx and HAProxy, or absolute.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// streamgate >= k x the higher of the two.
    AtLeast(f64),
    /// streamgate <= k x the lower of the two.
    AtMost(f64),
    /// streamgate <= this value, whatever the others do.
    Below(f64),
}

/// One line of the results table: a metric for each target (streamgate, nginx, HAProxy,
/// direct), one sample per round (none where it does not apply or the run failed).
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub better: Better,
    pub samples: [Vec<f64>; 4],
    pub goal: Option<Goal>,
    /// The scenario's headline figure: checked for "every target lands on the same figure"
    /// (the load generator is the limit).
    pub headline: bool,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, better: Better) -> Row {
        Row {
            scenario: scenario.to_string(),
            metric: metric.to_string(),
            better,
            samples: Default::default(),
            goal: None,
            headline: false,
        }
    }

    pub fn goal(mut self, g: Goal) -> Row {
        self.goal = Some(g);
        self
    }

    /// Marks the scenario's headline figure (see `headline`).
    pub fn headline(mut self) -> Row {
        self.headline = true;
        self
    }

    /// Adds this round's figure for `k` (nothing for None).
    pub fn set(&mut self, k: Kind, v: Option<f64>) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.samples[k.index()].push(v);
        }
    }

    /// The median of `k`'s rounds.
    pub fn median(&self, k: Kind) -> Option<f64> {
        Stats::of(&self.samples[k.index()]).map(|s| s.median)
    }

    pub fn stats(&self, k: Kind) -> Option<Stats> {
        Stats::of(&self.samples[k.index()])
    }
}

/// Median and range of one target's rounds.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(v: &[f64]) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        })
    }

    /// (max - min) / |median|, None for one sample or a zero median.
    pub fn spread(&self) -> Option<f64> {
        (self.n > 1 && self.median != 0.0).then(|| (self.max - self.min) / self.median.abs())
    }
}

/// Sorted latency samples.
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn new(mut v: Vec<u64>) -> Latencies {
        v.sort_unstable();
        Latencies(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The q-quantile (nearest rank), in the samples' unit; None without samples.
    pub fn q(&self, q: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        Some(self.0[rank - 1] as f64)
    }
}

/// `GET path` from a backend process over plain HTTP/1.1 (its `/count` or `/bulk-stats`);
/// the body as text.
pub async fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use anyhow::bail;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}{path}: no response head");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{addr}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Time a target run may take beyond its planned length before it is abandoned.
pub const SLACK: Duration = Duration::from_secs(30);

/// The scenarios in the order they run, by the names `--only` takes.
pub const NAMES: [&str; 13] = [
    "h1",
    "h2",
    "fleet",
    "newconn",
    "resume",
    "ws-echo",
    "ws-tput",
    "sse-h1",
    "sse-h2",
    "idle",
    "stalled",
    "bulk-http",
    "bulk-ws",
];

pub async fn run(env: &Env, only: &[String]) -> anyhow::Result<()> {
    for name in NAMES {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("== {name}");
        let t0 = Instant::now();
        match name {
            "h1" => http::keepalive(env, false).await,
            "h2" => http::keepalive(env, true).await,
            "fleet" => fleet::run(env).await,
            "newconn" => http::new_connections(env, false).await,
            "resume" => http::new_connections(env, true).await,
            "ws-echo" => wsock::echo_latency(env).await,
            "ws-tput" => wsock::throughput(env).await,
            "sse-h1" => sse::run(env, false).await,
            "sse-h2" => sse::run(env, true).await,
            "idle" => idle::run(env).await?,
            "stalled" => stalled::run(env).await,
            "bulk-http" => bulk::http(env).await,
            "bulk-ws" => bulk::websocket(env).await,
            _ => unreachable!("NAMES lists every scenario"),
        }
        eprintln!("   ({:.1} s)", t0.elapsed().as_secs_f64());
    }
    Ok(())
}
