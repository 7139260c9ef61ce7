//! Scenario 8: memory per stalled reader. N HTTPS/1.1 clients each ask the proxy for a large
//! response (`/bulk`, 32 MiB), read the head and the first 64 KiB of the body, then stop
//! reading and keep the connection open. The proxies are started afresh for each round, so
//! that none is still giving back earlier scenarios' memory. Once the proxy's resident memory
//! and the backend's output have both stopped moving, the proxy's memory growth per client is
//! the figure (the absolute goal: at most 0.5 MiB); the backend says how much it was
//! made to send and whether its responses are still open (the proxy holds the backend
//! connection and pushes back) or finished (the proxy read the whole response: into memory,
//! or into files).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::one_request;
use super::idle::{settle_rss, wait_fds};
use super::{get_text, Better, Env, Goal, Meter, Row, Target};
use crate::{sys, tls};

const SCEN: &str = "8. Stalled readers (HTTPS/1.1, 32 MiB responses not read)";
/// Response size: several times what the kernel can hold in socket buffers on both hops
/// (tcp_wmem's 4 MiB maximum on each side, and the client's receive buffer).
const SIZE: u64 = 32 << 20;
/// Body bytes each client reads before it stops.
const READ_FIRST: usize = 64 << 10;
/// How long memory and the backend's output may keep moving before the reading is taken
/// anyway.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_secs(1);
/// The goal: at most 0.5 MiB per stalled reader.
const GOAL_KIB: f64 = 512.0;

pub async fn run(env: &Env) {
    let n: usize = env.pick(50, 20);
    let mut per = Row::new(SCEN, "proxy RSS per stalled reader (KiB)", Better::Lower)
        .goal(Goal::Below(GOAL_KIB));
    let mut pulled = Row::new(SCEN, "read from the backend per reader (MiB)", Better::Info);
    let mut open = Row::new(SCEN, "backend responses still open (%)", Better::Info);
    let mut settle = Row::new(SCEN, "time until steady (s)", Better::Info);
    let backend = env.setup.backend;
    for t in env.rounds().flat_map(|_| {
        // Fresh processes every round, as for the idle scenario: a proxy still giving back
        // the memory of earlier scenarios (the idle one's ten thousand connections) would
        // shrink while the readers stall and hide what they cost.
        if let Err(e) = env.restart_proxies() {
            env.note(format!("{SCEN}: cannot restart the proxies: {e:#}"));
        }
        env.targets().into_iter().filter(|t| !t.is_direct())
    }) {
        let Some(pid) = t.pid else { continue };
        let name = t.kind.name();
        match measure(env, &t, pid, backend, n).await {
            Ok(r) => {
                per.set(t.kind, Some(r.rss_growth_kib / n as f64));
                pulled.set(t.kind, Some(r.sent as f64 / n as f64 / (1 << 20) as f64));
                open.set(t.kind, Some(r.open as f64 / n as f64 * 100.0));
                settle.set(t.kind, Some(r.settle_s));
                if r.settle_s >= SETTLE_LIMIT.as_secs_f64() {
                    env.note(format!(
                        "{SCEN}, {name}: still moving after {} s; read then",
                        SETTLE_LIMIT.as_secs()
                    ));
                }
            }
            Err(e) => env.note(format!("{SCEN}, {name}: failed: {e:#}")),
        }
        // Whatever happened, let the proxy and the backend drop the connections before the
        // next target.
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            match bulk_stats(backend).await {
                Ok((0, _)) | Err(_) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    env.note(format!(
        "{SCEN}: per target and round, {n} clients each send `GET /bulk?bytes={SIZE}` through \
         the proxy, read the head and {} KiB of the body, then stop reading (the connection \
         stays open). Proxies started afresh for each round; the baseline is their VmRSS \
         (process tree) once steady after one small request. Readings once the proxy's VmRSS \
         and the backend's bytes sent have both stayed put for {} s (at most {} s): RSS per \
         reader = (RSS then - RSS \
         before) / {n}; read from the backend = what the backend handed out for these \
         responses, per reader; still open = backend responses neither finished nor dropped \
         (100 %: the proxy holds the backend connection and pushes back; 0 %: it read the \
         whole response, nginx into its temp files with its default `proxy_buffering on`). \
         Goal: at most {GOAL_KIB} KiB per reader (absolute). No direct row",
        READ_FIRST >> 10,
        QUIET.as_secs(),
        SETTLE_LIMIT.as_secs()
    ));
    for r in [per, pulled, open, settle] {
        env.row(r);
    }
}

struct Reading {
    rss_growth_kib: f64,
    /// Backend bytes handed out for these responses.
    sent: u64,
    /// Backend responses neither finished nor dropped.
    open: u64,
    settle_s: f64,
}

async fn measure(
    env: &Env,
    t: &Target,
    pid: u32,
    backend: SocketAddr,
    n: usize,
) -> anyhow::Result<Reading> {
    // One request first, so lazily built state is in the baseline, and a steady baseline.
    one_request(t, t.tls(&env.tls.h1))
        .await
        .context("GET /small")?;
    let rss0 = settle_rss(pid, Duration::from_secs(5)).await;
    let fds0 = sys::tree_fds(pid);
    let (open0, sent0) = bulk_stats(backend).await?;
    let m = Meter::start(env, t);
    let t0 = Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (t, tls) = (t.clone(), env.tls.h1.clone());
        opening.spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), stall(&t, &tls))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no 64 KiB of body within 10 s")))
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut first_err = None;
    while let Some(r) = opening.join_next().await {
        match r {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(e.into());
            }
        }
    }
    if let Some(e) = first_err {
        bail!("{} of {n} clients failed: {e:#}", n - held.len());
    }
    // Poll until neither the proxy's memory nor the backend's output has moved for QUIET.
    let mut last = (sys::tree_rss_kib(pid), bulk_stats(backend).await?.1);
    let mut since = Instant::now();
    let reading = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rss = sys::tree_rss_kib(pid);
        let (open, sent) = bulk_stats(backend).await?;
        let rss_moved = rss.abs_diff(last.0) > (last.0 / 100).max(256);
        let sent_moved = sent.abs_diff(last.1) > 256 << 10;
        if rss_moved || sent_moved {
            last = (rss, sent);
            since = Instant::now();
        }
        if since.elapsed() >= QUIET || t0.elapsed() >= SETTLE_LIMIT {
            break Reading {
                rss_growth_kib: rss as f64 - rss0 as f64,
                sent: sent - sent0,
                open: open.saturating_sub(open0),
                settle_s: t0.elapsed().as_secs_f64(),
            };
        }
    };
    let u = m.finish();
    env.cpu(SCEN, t.kind, &u);
    drop(held);
    wait_fds(pid, fds0).await;
    Ok(reading)
}

/// Connects, asks for the large response, reads its head and READ_FIRST bytes of body, and
/// returns the connection unread from there on.
async fn stall(t: &Target, tls: &tokio_rustls::TlsConnector) -> anyhow::Result<tls::Stream> {
    let mut s = tls::connect(t.addr, t.tls(tls), None).await?;
    s.write_all(format!("GET /bulk?bytes={SIZE} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 16 << 10];
    let mut got = Vec::with_capacity(16 << 10);
    let body_start = loop {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            bail!("connection closed before the response head");
        }
        got.extend_from_slice(&buf[..k]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if !got.starts_with(b"HTTP/1.1 200") {
                let head = String::from_utf8_lossy(&got[..end]).into_owned();
                bail!("response: {}", head.lines().next().unwrap_or(""));
            }
            break end + 4;
        }
        if got.len() > 64 << 10 {
            bail!("response head too long");
        }
    };
    let mut body = got.len() - body_start;
    while body < READ_FIRST {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            bail!("connection closed after {body} body bytes");
        }
        body += k;
    }
    Ok(s)
}

/// The backend's `/bulk-stats`: (responses open, bytes handed out so far).
async fn bulk_stats(backend: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let text = tokio::time::timeout(Duration::from_secs(5), get_text(backend, "/bulk-stats"))
        .await
        .context("backend /bulk-stats: no answer within 5 s")??;
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(open)), Some(Ok(sent))) => Ok((open, sent)),
        _ => bail!("backend /bulk-stats: {text:?}"),
    }
}
