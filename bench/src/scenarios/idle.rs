//! Scenario 6: idle capacity. As many WSS connections as the proxy's open-file limit allows
//! (two descriptors each: client and backend), opened from several 127.0.0.x source
//! addresses; the proxy's resident memory per connection and the time to open them all.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;

use super::wsock::ws_url;
use super::{Better, Env, Goal, Meter, Row, Target};
use crate::{proxies, sys, tls};

const OPENS_IN_FLIGHT: usize = 64;
const PER_SOURCE_ADDR: usize = 1000;
const OPEN_LIMIT: Duration = Duration::from_secs(180);

struct Rows {
    held: Row,
    per: Row,
    open: Row,
    base: Row,
}

pub async fn run(env: &Env) -> anyhow::Result<()> {
    let scen = "6. Idle WSS connections";
    let n = if env.quick {
        100
    } else {
        proxies::idle_capacity(env.setup.nofile)
    };
    let mut rows = Rows {
        held: Row::new(scen, "connections held", Better::Higher),
        per: Row::new(scen, "proxy RSS per connection (KiB)", Better::Lower)
            .goal(Goal::AtMost(0.5)),
        open: Row::new(scen, "time to open all (s)", Better::Lower),
        base: Row::new(scen, "proxy RSS before (MiB)", Better::Info),
    };
    for _ in env.rounds() {
        // Fresh processes every round: memory that earlier scenarios (or rounds) freed would
        // otherwise be reused and hide the cost of new connections.
        env.restart_proxies()
            .context("cannot restart the proxies for the idle scenario")?;
        for t in env.targets() {
            measure(env, scen, &t, n, &mut rows).await;
        }
    }
    env.note(format!(
        "{scen}: N = {n} = (open-file hard limit {} - 200) / 2, the same for every target; \
         RSS is VmRSS of the proxy's process tree once it is steady (unchanged for 1 s), on \
         proxies started afresh for each round; sources 127.0.0.2.. with {PER_SOURCE_ADDR} \
         connections each, {OPENS_IN_FLIGHT} opening at a time",
        env.setup.nofile
    ));
    let Rows {
        held,
        per,
        open,
        base,
    } = rows;
    for r in [held, per, open, base] {
        env.row(r);
    }
    Ok(())
}

/// One target of one round.
async fn measure(env: &Env, scen: &str, t: &Target, n: usize, rows: &mut Rows) {
    // One connection first, so lazily built state (TLS contexts, buffers) is in the
    // baseline, not in the per-connection figure.
    if let Err(e) = open_one(env, t, None).await {
        env.note(format!(
            "{scen}, {}: warm-up connection failed: {e:#}",
            t.kind.name()
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = t.pid;
    let rss0 = pid.map(sys::tree_rss_kib);
    let fds0 = pid.map(sys::tree_fds);
    let m = Meter::start(env, t);
    let t0 = Instant::now();
    let (conns, errors) = open_many(env, t, n).await;
    let elapsed = t0.elapsed().as_secs_f64();
    // Let the proxy finish its bookkeeping before reading its memory.
    let rss1 = match pid {
        Some(pid) => Some(settle_rss(pid, Duration::from_secs(5)).await),
        None => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            None
        }
    };
    let u = m.finish();
    env.cpu(scen, t.kind, &u);
    let k = conns.len();
    rows.held.set(t.kind, Some(k as f64));
    if k > 0 {
        rows.open.set(t.kind, Some(elapsed));
    }
    if let (Some(a), Some(b)) = (rss0, rss1) {
        rows.base.set(t.kind, Some(a as f64 / 1024.0));
        if k > 0 {
            rows.per.set(t.kind, Some((b as f64 - a as f64) / k as f64));
        }
    }
    if let Some((count, first)) = errors {
        env.note(format!(
            "{scen}, {}: {count} of {n} connections failed (first: {first})",
            t.kind.name()
        ));
    }
    drop(conns);
    // Wait for the proxy to let go of them before the next target.
    if let (Some(pid), Some(fds0)) = (pid, fds0) {
        wait_fds(pid, fds0).await;
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Polls the resident memory of `pid`'s tree every 100 ms until it has not changed by more
/// than 1 % (or 256 KiB) for 1 s, or `limit` has passed; returns the last reading (KiB).
pub async fn settle_rss(pid: u32, limit: Duration) -> u64 {
    let until = Instant::now() + limit;
    let mut last = sys::tree_rss_kib(pid);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sys::tree_rss_kib(pid);
        let tol = (last / 100).max(256);
        if now.abs_diff(last) > tol {
            last = now;
            since = Instant::now();
        }
        if since.elapsed() >= Duration::from_secs(1) || Instant::now() >= until {
            return now;
        }
    }
}

/// Waits (at most 20 s) until `pid`'s tree holds no more than 16 descriptors over `fds0`:
/// the proxy has let go of the connections the scenario closed.
pub async fn wait_fds(pid: u32, fds0: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    while sys::tree_fds(pid) > fds0 + 16 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Held = tokio_tungstenite::WebSocketStream<tls::Stream>;

async fn open_one(env: &Env, t: &Target, src: Option<IpAddr>) -> anyhow::Result<Held> {
    let s = tls::connect(t.addr, t.tls(&env.tls.h1), src).await?;
    let (ws, _) = tokio_tungstenite::client_async(ws_url(t, "/ws"), s)
        .await
        .context("WebSocket handshake")?;
    Ok(ws)
}

/// Opens `n` connections; returns those that opened and (failures, first error).
async fn open_many(env: &Env, t: &Target, n: usize) -> (Vec<Held>, Option<(usize, String)>) {
    let gate = Arc::new(Semaphore::new(OPENS_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let deadline = tokio::time::Instant::now() + OPEN_LIMIT;
    for i in 0..n {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE_ADDR) as u8));
        let (gate, t, tls) = (gate.clone(), t.clone(), env.tls.h1.clone());
        tasks.spawn(async move {
            let _p = gate.acquire_owned().await?;
            let open = async {
                let s = tls::connect(t.addr, t.tls(&tls), Some(src)).await?;
                let (ws, _) = tokio_tungstenite::client_async(ws_url(&t, "/ws"), s)
                    .await
                    .context("WebSocket handshake")?;
                anyhow::Ok(ws)
            };
            tokio::time::timeout_at(deadline, open)
                .await
                .context("timed out")?
        });
    }
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(ws)) => conns.push(ws),
            Ok(Err(e)) => {
                failed += 1;
                first.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                failed += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (conns, first.map(|f| (failed, f)))
}
