//! Scenario 1c: small GETs on 64 kept-alive HTTP/1.1 connections (wrk, as 1a) through proxies
//! that balance over three backend processes by least connections. The scenario starts its
//! own backends and proxies (configs `fleet-*`) and stops them when it ends; each backend's
//! `/count`, read before and after a run, gives the share of requests it got. No direct row:
//! there is no one backend to compare with.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use super::http::{one_request, wrk, CONNS, RUN_SECS};
use super::{Better, Env, Meter, Row, Target};
use crate::proxies;
use crate::sys::ProcGuard;

const BACKENDS: usize = 3;
const SCEN: &str = "1c. HTTPS small GET, HTTP/1.1, 3 backends, least conn";

pub async fn run(env: &Env) {
    if let Err(e) = run_fleet(env).await {
        env.note(format!("{SCEN}: failed: {e:#}"));
    }
}

async fn run_fleet(env: &Env) -> anyhow::Result<()> {
    let dur = env.pick(RUN_SECS, 1);
    let exe = std::env::current_exe()?;
    let mut backends = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..BACKENDS {
        let (g, a) = proxies::start_backend(&exe)?;
        backends.push(g);
        addrs.push(a);
    }
    let pids: Vec<u32> = backends.iter().map(ProcGuard::pid).collect();
    let mut fleet = Vec::new();
    for k in env.proxy_kinds() {
        let p = proxies::start_with(k, &env.setup, "fleet-", &addrs)
            .with_context(|| format!("cannot start {} for the fleet", k.name()))?;
        fleet.push(p);
    }

    let mut rps = Row::new(SCEN, "requests/s", Better::Higher).headline();
    let mut p50 = Row::new(SCEN, "latency p50 (ms)", Better::Lower);
    let mut p99 = Row::new(SCEN, "latency p99 (ms)", Better::Lower);
    let mut cpu = Row::new(SCEN, "proxy CPU s per 100k requests", Better::Lower);
    let mut share: Vec<Row> = (1..=BACKENDS)
        .map(|i| Row::new(SCEN, &format!("requests to backend {i} (%)"), Better::Info))
        .collect();
    let targets: Vec<Target> = fleet.iter().map(Target::of).collect();
    for t in env.rounds().flat_map(|_| targets.clone()) {
        let name = t.kind.name();
        if let Err(e) = one_request(&t, t.tls(&env.tls.h1)).await {
            env.note(format!("{SCEN}, {name}: does not answer GET /small: {e:#}"));
            continue;
        }
        let before = counts(&addrs).await;
        let m = Meter::start_with(&t, &pids);
        let r = wrk(&t, dur).await;
        let u = m.finish();
        env.cpu(SCEN, t.kind, &u);
        match r {
            Ok(r) => {
                rps.set(t.kind, Some(r.rps));
                p50.set(t.kind, r.p50_ms);
                p99.set(t.kind, r.p99_ms);
                if r.requests > 0.0 {
                    cpu.set(t.kind, Some(u.proxy / r.requests * 1e5));
                }
                if !r.errors.is_empty() {
                    env.note(format!("{SCEN}, {name}: {}", r.errors));
                }
            }
            Err(e) => env.note(format!("{SCEN}, {name}: failed: {e:#}")),
        }
        match (before, counts(&addrs).await) {
            (Ok(b), Ok(a)) => {
                let got: Vec<u64> = a
                    .iter()
                    .zip(&b)
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect();
                let total: u64 = got.iter().sum();
                if total > 0 {
                    for (row, n) in share.iter_mut().zip(&got) {
                        row.set(t.kind, Some(*n as f64 / total as f64 * 100.0));
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => env.note(format!(
                "{SCEN}, {name}: cannot read the backends' counts: {e:#}"
            )),
        }
    }
    env.note(format!(
        "{SCEN}: wrk -t1 -c{CONNS} through each proxy to {BACKENDS} backend processes (core 1, \
         like the load generator); nginx `least_conn`, HAProxy `balance leastconn`, streamgate \
         with no `balance` key (its default: least_conn from the upstream rewrite on, round \
         robin in earlier binaries, which reject the key). Shares are each backend's `/small` \
         count over the run. Direct: n/a (three backends)"
    ));
    for r in [rps, p50, p99, cpu].into_iter().chain(share) {
        env.row(r);
    }
    // The fleet's proxies, then its backends, are stopped here (their guards).
    drop(fleet);
    drop(backends);
    Ok(())
}

/// Each backend's `/small` count, in order.
async fn counts(addrs: &[SocketAddr]) -> anyhow::Result<Vec<u64>> {
    let mut v = Vec::with_capacity(addrs.len());
    for a in addrs {
        let n = tokio::time::timeout(Duration::from_secs(5), count(*a))
            .await
            .with_context(|| format!("{a}: no answer within 5 s"))??;
        v.push(n);
    }
    Ok(v)
}

async fn count(addr: SocketAddr) -> anyhow::Result<u64> {
    let body = super::get_text(addr, "/count").await?;
    body.trim()
        .parse()
        .with_context(|| format!("{addr}/count: {body:?}"))
}
