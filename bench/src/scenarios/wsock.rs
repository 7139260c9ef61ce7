//! Scenarios 3 and 4: WSS echo latency on one connection (tokio-tungstenite client), and
//! echo throughput on 16 pipelined connections (raw frames: a writer and a reader half per
//! connection, a bounded window in flight).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Better, Env, Goal, Latencies, Meter, Row, Target, SLACK};
use crate::proxies::Kind;
use crate::{tls, ws};

/// `wss://localhost/PATH` for proxies, `ws://` for the backend.
pub fn ws_url(t: &Target, path: &str) -> String {
    let scheme = if t.is_direct() { "ws" } else { "wss" };
    format!("{scheme}://localhost{path}")
}

pub async fn echo_latency(env: &Env) {
    let scen = "3. WSS echo latency, 1 connection, 64 B";
    let n = env.pick(10_000, 2_000);
    let warm = env.pick(500, 200);
    let q = [0.5, 0.99, 0.999];
    let names = ["p50", "p99", "p99.9"];
    let mut abs: Vec<Row> = names
        .iter()
        .map(|p| Row::new(scen, &format!("round trip {p} (µs)"), Better::Lower))
        .collect();
    let mut added: Vec<Row> = names
        .iter()
        .map(|p| {
            let row = Row::new(scen, &format!("added over direct {p} (µs)"), Better::Lower);
            if *p == "p99" {
                row.goal(Goal::AtMost(0.8))
            } else {
                row
            }
        })
        .collect();
    for _ in env.rounds() {
        // This round's percentiles per target; "added" pairs each proxy with this round's
        // direct run.
        let mut all = [None, None, None, None];
        for t in env.targets() {
            let m = Meter::start(env, &t);
            let r =
                tokio::time::timeout(Duration::from_secs(60) + SLACK, echo_run(env, &t, warm, n))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
            let u = m.finish();
            env.cpu(scen, t.kind, &u);
            match r {
                Ok(lat) => {
                    let v: Vec<Option<f64>> =
                        q.iter().map(|&q| lat.q(q).map(|ns| ns / 1e3)).collect();
                    for (row, x) in abs.iter_mut().zip(&v) {
                        row.set(t.kind, *x);
                    }
                    all[t.kind.index()] = Some(v);
                }
                Err(e) => env.note(format!("{scen}, {}: failed: {e:#}", t.kind.name())),
            }
        }
        let direct = all[Kind::Direct.index()].clone();
        for (i, row) in added.iter_mut().enumerate() {
            for k in Kind::PROXIES {
                let v = all[k.index()].as_ref().zip(direct.as_ref());
                row.set(k, v.and_then(|(a, d)| Some(a[i]? - d[i]?)));
            }
        }
    }
    abs.extend(added);
    env.note(format!(
        "{scen}: {n} round trips after {warm} unmeasured; direct is ws:// to the backend; \
         added = target - direct at the same percentile, in the same round"
    ));
    for r in abs {
        env.row(r);
    }
}

async fn echo_run(env: &Env, t: &Target, warm: usize, n: usize) -> anyhow::Result<Latencies> {
    let s = tls::connect(t.addr, t.tls(&env.tls.h1), None).await?;
    let (mut wsock, _) = tokio_tungstenite::client_async(ws_url(t, "/ws"), s)
        .await
        .context("WebSocket handshake")?;
    let payload = bytes::Bytes::from(vec![b'a'; 64]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t0 = std::time::Instant::now();
        wsock.send(Message::Binary(payload.clone())).await?;
        loop {
            match wsock.next().await {
                Some(Ok(Message::Binary(b))) if b.len() == 64 => break,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => bail!("expected the echo, got {other:?}"),
            }
        }
        if i >= warm {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
    }
    let _ = wsock.close(None).await;
    Ok(Latencies::new(samples))
}

const TPUT_CONNS: usize = 16;
const TPUT_MSG: usize = 1024;
/// Messages in flight per connection, and per write.
const WINDOW: u32 = 128;
const BATCH: u32 = 16;

pub async fn throughput(env: &Env) {
    let scen = "4. WSS echo throughput, 16 connections, 1 KiB";
    let warm = Duration::from_millis(500);
    let dur = Duration::from_secs(env.pick(super::http::RUN_SECS, 1));
    let mut rate = Row::new(scen, "messages/s (echoed)", Better::Higher)
        .goal(Goal::AtLeast(1.0))
        .headline();
    let mut cpu = Row::new(scen, "proxy CPU s per 100k messages", Better::Lower);
    let mut busy = Row::new(scen, "proxy core busy (%)", Better::Info);
    for t in env.rounds().flat_map(|_| env.targets()) {
        let r = tokio::time::timeout(warm + dur + SLACK, tput_run(env, &t, warm, dur))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
        match r {
            Ok((msgs_per_s, total, u)) => {
                env.cpu(scen, t.kind, &u);
                rate.set(t.kind, Some(msgs_per_s));
                if !t.is_direct() {
                    cpu.set(t.kind, Some(u.proxy / total as f64 * 1e5));
                    busy.set(t.kind, Some(u.proxy / u.wall * 100.0));
                }
            }
            Err(e) => env.note(format!("{scen}, {}: failed: {e:#}", t.kind.name())),
        }
    }
    env.note(format!(
        "{scen}: each connection has a writer and a reader half, {WINDOW} messages in flight, \
         written {BATCH} per write; counted over {} s after {} s warm-up",
        dur.as_secs_f64(),
        warm.as_secs_f64()
    ));
    for r in [rate, cpu, busy] {
        env.row(r);
    }
}

async fn tput_run(
    env: &Env,
    t: &Target,
    warm: Duration,
    dur: Duration,
) -> anyhow::Result<(f64, u64, super::Usage)> {
    let mut conns = Vec::new();
    for _ in 0..TPUT_CONNS {
        let mut s = tls::connect(t.addr, t.tls(&env.tls.h1), None).await?;
        let rest = ws::client_handshake(&mut s, "/ws").await?;
        conns.push((s, rest));
    }
    let echoed = Arc::new(AtomicU64::new(0));
    let m = Meter::start(env, t);
    let start = Instant::now();
    let deadline = start + warm + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (s, rest)) in conns.into_iter().enumerate() {
        let (mut rd, mut wr) = tokio::io::split(s);
        let window = Arc::new(Semaphore::new(WINDOW as usize));
        let w2 = window.clone();
        let mask = [0x11, 0x22, 0x33, i as u8];
        let frame = ws::client_frame(ws::OP_BINARY, &[b'm'; TPUT_MSG], mask);
        let batch: Vec<u8> = frame.repeat(BATCH as usize);
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let permit = tokio::time::timeout_at(deadline, w2.acquire_many(BATCH)).await;
                match permit {
                    Ok(Ok(p)) => p.forget(),
                    _ => break,
                }
                if wr.write_all(&batch).await.is_err() {
                    break;
                }
            }
            // Hold the write half until the reader is done: dropping it does not close, but
            // the tunnel stays as it was for the reader's last messages.
            tokio::time::sleep_until(deadline + Duration::from_secs(1)).await;
            drop(wr);
        });
        let echoed = echoed.clone();
        tasks.spawn(async move {
            let mut fc = ws::FrameCounter::default();
            fc.feed(&rest);
            let mut seen = fc.frames;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match tokio::time::timeout_at(
                    deadline + Duration::from_secs(1),
                    rd.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
                fc.feed(&buf[..n]);
                let d = fc.frames - seen;
                seen = fc.frames;
                if d > 0 {
                    if Instant::now() < deadline {
                        echoed.fetch_add(d, Ordering::Relaxed);
                    }
                    window.add_permits(d as usize);
                }
            }
        });
    }
    tokio::time::sleep_until(start + warm).await;
    let c0 = echoed.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep_until(deadline).await;
    let c1 = echoed.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let u = m.finish();
    while tasks.join_next().await.is_some() {}
    if c1 == 0 {
        bail!("no message came back");
    }
    Ok(((c1 - c0) as f64 / elapsed, c1, u))
}
