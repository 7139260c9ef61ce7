//! Scenario 5: Server-Sent Events delivery latency at 10 events/s per stream, from the
//! backend's write (a CLOCK_MONOTONIC stamp in the event) to the client's read, over HTTP/1.1
//! (200 streams, one TLS connection each) and HTTP/2 (100 streams on one connection), as the
//! issue defines the two rows.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Better, Env, Goal, Latencies, Meter, Row, Target, Usage, SLACK};
use crate::{sys, tls};

const RATE: u64 = 10;
const H1_STREAMS: usize = 200;
const H2_STREAMS_PER_CONN: usize = 100;
const H2_CONNS: usize = 1;
const CONNECTS_IN_FLIGHT: usize = 64;
const OPEN_BUDGET: Duration = Duration::from_secs(30);

/// What the stream tasks share with the coordinator.
struct Shared {
    /// Events stamped in [start, end) (CLOCK_MONOTONIC ns) are measured; start is u64::MAX
    /// until every stream is open.
    start: AtomicU64,
    end: AtomicU64,
    opened: AtomicUsize,
    samples: Mutex<Vec<u64>>,
    errors: Mutex<Vec<String>>,
}

pub async fn run(env: &Env, h2: bool) {
    let (conns, per_conn) = if h2 {
        (H2_CONNS, H2_STREAMS_PER_CONN)
    } else {
        (H1_STREAMS, 1)
    };
    let streams = conns * per_conn;
    let scen = if h2 {
        format!("5b. SSE delivery, HTTP/2 ({per_conn} streams on {conns} connection, {RATE} ev/s)")
    } else {
        format!("5a. SSE delivery, HTTP/1.1 ({streams} streams, 1 per connection, {RATE} ev/s)")
    };
    let scen = scen.as_str();
    let warm = Duration::from_millis(500);
    let dur = Duration::from_secs(env.pick(3, 1));
    let mut p50 = Row::new(scen, "delivery p50 (ms)", Better::Lower);
    let mut p99 = Row::new(scen, "delivery p99 (ms)", Better::Lower).goal(Goal::AtMost(0.8));
    let mut p999 = Row::new(scen, "delivery p99.9 (ms)", Better::Lower);
    let mut got = Row::new(scen, "events delivered (% of expected)", Better::Higher);
    let mut cpu = Row::new(scen, "proxy CPU s per 100k events", Better::Lower);
    for t in env.rounds().flat_map(|_| env.targets()) {
        let limit = OPEN_BUDGET + warm + dur + SLACK;
        let r = tokio::time::timeout(limit, run_one(env, &t, h2, conns, per_conn, warm, dur))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
        match r {
            Ok((lat, u)) => {
                env.cpu(scen, t.kind, &u);
                let ms = |q| lat.q(q).map(|ns| ns / 1e6);
                p50.set(t.kind, ms(0.5));
                p99.set(t.kind, ms(0.99));
                p999.set(t.kind, ms(0.999));
                let expected = (streams as u64 * RATE) as f64 * dur.as_secs_f64();
                got.set(t.kind, Some(lat.len() as f64 / expected * 100.0));
                if !t.is_direct() && lat.len() > 0 {
                    cpu.set(t.kind, Some(u.proxy / lat.len() as f64 * 1e5));
                }
            }
            Err(e) => env.note(format!("{scen}, {}: failed: {e:#}", t.kind.name())),
        }
    }
    if h2 {
        env.note(format!("{scen}: direct is h2c (no TLS) to the backend"));
    }
    for r in [p50, p99, p999, got, cpu] {
        env.row(r);
    }
}

async fn run_one(
    env: &Env,
    t: &Target,
    h2: bool,
    conns: usize,
    per_conn: usize,
    warm: Duration,
    dur: Duration,
) -> anyhow::Result<(Latencies, Usage)> {
    let shared = Arc::new(Shared {
        start: AtomicU64::new(u64::MAX),
        end: AtomicU64::new(u64::MAX),
        opened: AtomicUsize::new(0),
        samples: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
    });
    // Enough events for the opening, the warm-up and the measurement; the streams are cut
    // when the measurement ends anyway.
    let count = RATE * (OPEN_BUDGET + warm + dur + SLACK).as_secs();
    let connects = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (t, sh, connects) = (t.clone(), shared.clone(), connects.clone());
        let tls = if h2 {
            env.tls.h2.clone()
        } else {
            env.tls.h1.clone()
        };
        tasks.spawn(async move {
            let r = if h2 {
                h2_conn(&t, &tls, per_conn, count, &sh, &connects).await
            } else {
                h1_conn(&t, &tls, count, &sh, &connects).await
            };
            if let Err(e) = r {
                if let Ok(mut v) = sh.errors.lock() {
                    v.push(format!("{e:#}"));
                }
            }
        });
    }
    let streams = conns * per_conn;
    let open_deadline = Instant::now() + OPEN_BUDGET;
    while shared.opened.load(Ordering::Relaxed) < streams {
        let failed = shared.errors.lock().map(|e| e.len()).unwrap_or(0);
        if Instant::now() >= open_deadline || failed > 0 {
            let first = shared.errors.lock().ok().and_then(|e| e.first().cloned());
            bail!(
                "{} of {streams} streams open, {failed} failed (first: {})",
                shared.opened.load(Ordering::Relaxed),
                first.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(warm).await;
    let m = Meter::start(env, t);
    let start = sys::mono_ns();
    shared
        .end
        .store(start + dur.as_nanos() as u64, Ordering::Relaxed);
    shared.start.store(start, Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    let u = m.finish();
    // Events stamped before the end may still be on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let samples = std::mem::take(
        &mut *shared
            .samples
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?,
    );
    if let Ok(errors) = shared.errors.lock() {
        if let Some(e) = errors.first() {
            bail!(
                "{} streams failed during the measurement (first: {e})",
                errors.len()
            );
        }
    }
    Ok((Latencies::new(samples), u))
}

fn request(t: &Target, h2: bool, count: u64) -> anyhow::Result<Request<Empty<Bytes>>> {
    let path = format!("/events?rate={RATE}&count={count}");
    let uri = if h2 {
        let scheme = if t.is_direct() { "http" } else { "https" };
        format!("{scheme}://localhost{path}")
    } else {
        path
    };
    let mut b = Request::get(uri).header(header::ACCEPT, "text/event-stream");
    if !h2 {
        b = b.header(header::HOST, "localhost");
    }
    Ok(b.body(Empty::new())?)
}

/// Aborts the connection's driver task when the stream task ends (or is aborted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn h1_conn(
    t: &Target,
    tls: &tokio_rustls::TlsConnector,
    count: u64,
    sh: &Shared,
    connects: &Semaphore,
) -> anyhow::Result<()> {
    let permit = connects.acquire().await?;
    let s = tls::connect(t.addr, t.tls(tls), None).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = send.send_request(request(t, false, count)?).await?;
    drop(permit);
    read_stream(resp, sh).await
}

async fn h2_conn(
    t: &Target,
    tls: &tokio_rustls::TlsConnector,
    streams: usize,
    count: u64,
    sh: &Shared,
    connects: &Semaphore,
) -> anyhow::Result<()> {
    let permit = connects.acquire().await?;
    let s = tls::connect(t.addr, t.tls(tls), None).await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    drop(permit);
    let each = (0..streams).map(|_| {
        let mut send = send.clone();
        async move {
            send.ready().await?;
            let resp = send.send_request(request(t, true, count)?).await?;
            read_stream(resp, sh).await
        }
    });
    for r in futures_util::future::join_all(each).await {
        r?;
    }
    Ok(())
}

/// Reads `data: <ns>` events until the stream ends, recording the delay of those stamped in
/// the measurement window.
async fn read_stream(
    resp: http::Response<hyper::body::Incoming>,
    sh: &Shared,
) -> anyhow::Result<()> {
    if resp.status() != StatusCode::OK {
        bail!("status {}", resp.status());
    }
    sh.opened.fetch_add(1, Ordering::Relaxed);
    let mut body = resp.into_body();
    let mut line = Vec::new();
    let mut mine = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("event stream")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = sys::mono_ns();
        let (start, end) = (
            sh.start.load(Ordering::Relaxed),
            sh.end.load(Ordering::Relaxed),
        );
        for &b in data.iter() {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            if let Some(ts) = line.strip_prefix(b"data: ") {
                let ts: u64 = std::str::from_utf8(ts)?.trim().parse()?;
                if ts >= start && ts < end {
                    mine.push(now.saturating_sub(ts));
                }
            }
            line.clear();
        }
        if !mine.is_empty() {
            if let Ok(mut s) = sh.samples.lock() {
                s.append(&mut mine);
            }
        }
    }
    bail!("the stream ended early")
}
