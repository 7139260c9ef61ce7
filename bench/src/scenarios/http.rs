//! Scenarios 1 and 2: small GETs on kept-alive connections (wrk for HTTP/1.1, h2load for
//! HTTP/2) and new TLS connections per second (our loop: one request per connection).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Better, Env, Goal, Latencies, Meter, Row, Target, SLACK};
use crate::proxies::{Kind, CLIENT_CORE};
use crate::{sys, tls};

pub(super) const CONNS: usize = 64;
/// Length of one load run (wrk, h2load, the connection loops), without --quick.
pub(super) const RUN_SECS: u64 = 4;

pub(super) struct LoadResult {
    pub requests: f64,
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors: String,
}

pub async fn keepalive(env: &Env, h2: bool) {
    let scen = if h2 {
        "1b. HTTPS small GET, HTTP/2"
    } else {
        "1a. HTTPS small GET, HTTP/1.1"
    };
    let dur = env.pick(RUN_SECS, 1);
    let mut rps = Row::new(scen, "requests/s", Better::Higher)
        .goal(Goal::AtLeast(if h2 { 1.0 } else { 1.2 }))
        .headline();
    let mut p50 = Row::new(scen, "latency p50 (ms)", Better::Lower);
    let mut p99 = Row::new(scen, "latency p99 (ms)", Better::Lower);
    let mut cpu = Row::new(scen, "proxy CPU s per 100k requests", Better::Lower);
    for t in env.rounds().flat_map(|_| env.targets()) {
        let m = Meter::start(env, &t);
        let r = if h2 {
            h2load(env, &t, dur).await
        } else {
            wrk(&t, dur).await
        };
        let u = m.finish();
        env.cpu(scen, t.kind, &u);
        match r {
            Ok(r) => {
                rps.set(t.kind, Some(r.rps));
                p50.set(t.kind, r.p50_ms);
                p99.set(t.kind, r.p99_ms);
                if !t.is_direct() && r.requests > 0.0 {
                    cpu.set(t.kind, Some(u.proxy / r.requests * 1e5));
                }
                if !r.errors.is_empty() {
                    env.note(format!("{scen}, {}: {}", t.kind.name(), r.errors));
                }
            }
            Err(e) => env.note(format!("{scen}, {}: failed: {e:#}", t.kind.name())),
        }
    }
    if h2 {
        env.note(format!(
            "{scen}: direct is h2c (HTTP/2 with prior knowledge, no TLS) to the backend"
        ));
    }
    for r in [rps, p50, p99, cpu] {
        env.row(r);
    }
}

fn client_cmd(program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", CLIENT_CORE, program]);
    c
}

pub(super) async fn wrk(t: &Target, dur: u64) -> anyhow::Result<LoadResult> {
    let mut cmd = client_cmd("wrk");
    cmd.args([
        "-t1",
        &format!("-c{CONNS}"),
        &format!("-d{dur}s"),
        "--timeout",
        "5s",
    ])
    .arg("--latency")
    .arg(t.url("/small"));
    let out = sys::run_bounded(cmd, Duration::from_secs(dur) + SLACK).await?;
    parse_wrk(&out)
}

fn parse_wrk(out: &str) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult {
        requests: 0.0,
        rps: 0.0,
        p50_ms: None,
        p99_ms: None,
        errors: String::new(),
    };
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse()?;
        } else if l.contains(" requests in ") {
            r.requests = l.split_whitespace().next().unwrap_or("0").parse()?;
        } else if let Some(v) = l.strip_prefix("50%") {
            r.p50_ms = Some(wrk_time_ms(v.trim())?);
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_ms = Some(wrk_time_ms(v.trim())?);
        } else if l.starts_with("Non-2xx") || l.starts_with("Socket errors") {
            r.errors.push_str(l);
            r.errors.push_str("; ");
        }
    }
    if r.requests == 0.0 {
        bail!("wrk made no requests:\n{out}");
    }
    Ok(r)
}

fn wrk_time_ms(v: &str) -> anyhow::Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("wrk time without unit: {v}"))?;
    let n: f64 = v[..split].parse()?;
    Ok(match &v[split..] {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        u => bail!("wrk time unit {u}"),
    })
}

async fn h2load(env: &Env, t: &Target, dur: u64) -> anyhow::Result<LoadResult> {
    let log = env.setup.dir.join(format!("h2load-{}.tsv", t.kind.name()));
    let mut cmd = client_cmd("h2load");
    cmd.args([&format!("-c{CONNS}"), "-m4", "-t1", "-D", &dur.to_string()])
        .arg("--log-file")
        .arg(&log)
        .arg(t.url("/small"));
    let out = sys::run_bounded(cmd, Duration::from_secs(dur) + SLACK).await?;
    let mut r = LoadResult {
        requests: 0.0,
        rps: 0.0,
        p50_ms: None,
        p99_ms: None,
        errors: String::new(),
    };
    for l in out.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("finished in ") {
            // "finished in 10.00s, 12345.60 req/s, 1.23MB/s"
            let v = rest.split(", ").nth(1).context("h2load req/s")?;
            r.rps = v.trim_end_matches(" req/s").parse()?;
        } else if let Some(rest) = l.strip_prefix("requests: ") {
            // "N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            let f: Vec<&str> = rest.split(", ").collect();
            r.requests = f
                .iter()
                .find_map(|s| s.strip_suffix(" succeeded"))
                .context("h2load succeeded")?
                .parse()?;
            let failed: u64 = f
                .iter()
                .find_map(|s| s.strip_suffix(" failed"))
                .unwrap_or("0")
                .parse()?;
            if failed > 0 {
                r.errors = format!("h2load: {rest}");
            }
        }
    }
    if r.requests == 0.0 {
        bail!("h2load made no successful requests:\n{out}");
    }
    let lat = read_h2load_log(&log)?;
    r.p50_ms = lat.q(0.50).map(|us| us / 1000.0);
    r.p99_ms = lat.q(0.99).map(|us| us / 1000.0);
    let _ = std::fs::remove_file(&log);
    Ok(r)
}

/// h2load's per-request log: start (us since epoch), status, duration (us).
fn read_h2load_log(path: &Path) -> anyhow::Result<Latencies> {
    let text = std::fs::read_to_string(path).context("h2load log")?;
    let v = text
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<u64>().ok())
        .collect();
    Ok(Latencies::new(v))
}

/// Scenario 2a (`resume` false): a full TLS 1.3 handshake per connection. Scenario 2b
/// (`resume` true): each client keeps its own session store (its own rustls ClientConfig with
/// the default in-memory cache), makes one unmeasured connection to get a ticket, then resumes
/// on every connection the server lets it; the share that did is reported. No direct row for
/// 2b: plain TCP has nothing to resume (2a's direct row is the client's ceiling).
pub async fn new_connections(env: &Env, resume: bool) {
    let scen = if resume {
        "2b. TLS handshakes with session resumption (1 request each)"
    } else {
        "2a. New TLS connections (1 request each)"
    };
    let dur = Duration::from_secs(env.pick(RUN_SECS, 1));
    let mut rate = Row::new(scen, "connections/s", Better::Higher).headline();
    if !resume {
        rate = rate.goal(Goal::AtLeast(1.0));
    }
    let mut resumed = Row::new(scen, "handshakes resumed (%)", Better::Higher);
    let mut p50 = Row::new(scen, "connect+request p50 (ms)", Better::Lower);
    let mut p99 = Row::new(scen, "connect+request p99 (ms)", Better::Lower);
    let mut cpu = Row::new(scen, "proxy CPU s per 100k connections", Better::Lower);
    let targets = || {
        let mut v = env.targets();
        if resume {
            v.retain(|t| !t.is_direct());
        }
        v
    };
    for t in env.rounds().flat_map(|_| targets()) {
        let go = Arc::new(tokio::sync::Barrier::new(CONNS + 1));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..CONNS {
            let (t, go) = (t.clone(), go.clone());
            let tls = if resume {
                tls::resuming(&[b"http/1.1"])
            } else {
                env.tls.h1.clone()
            };
            set.spawn(async move {
                let mut ok = Vec::new();
                let mut resumed = 0u64;
                let mut errors = 0u64;
                let mut last_error = None;
                if resume {
                    // The first handshake is a full one; it leaves a ticket in this client's
                    // store (if the server issues one).
                    if let Err(e) = one_request(&t, t.tls(&tls)).await {
                        errors += 1;
                        last_error = Some(format!("first connection: {e:#}"));
                    }
                }
                go.wait().await;
                let deadline = Instant::now() + dur;
                while Instant::now() < deadline {
                    let t1 = Instant::now();
                    let one =
                        tokio::time::timeout(Duration::from_secs(10), one_request(&t, t.tls(&tls)))
                            .await;
                    match one {
                        Ok(Ok(r)) => {
                            ok.push(t1.elapsed().as_micros() as u64);
                            resumed += u64::from(r);
                        }
                        Ok(Err(e)) => {
                            errors += 1;
                            last_error = Some(format!("{e:#}"));
                        }
                        Err(_) => {
                            errors += 1;
                            last_error = Some("no answer within 10 s".to_string());
                        }
                    }
                    if errors > 1000 {
                        break;
                    }
                }
                (ok, resumed, errors, last_error)
            });
        }
        go.wait().await;
        let m = Meter::start(env, &t);
        let mut samples = Vec::new();
        let mut n_resumed = 0;
        let mut errors = 0;
        let mut last_error = None;
        while let Some(r) = set.join_next().await {
            if let Ok((ok, r, e, le)) = r {
                samples.extend(ok);
                n_resumed += r;
                errors += e;
                last_error = le.or(last_error);
            }
        }
        let u = m.finish();
        env.cpu(scen, t.kind, &u);
        let n = samples.len() as f64;
        let lat = Latencies::new(samples);
        rate.set(t.kind, Some(n / u.wall));
        if resume && n > 0.0 {
            resumed.set(t.kind, Some(n_resumed as f64 / n * 100.0));
        }
        p50.set(t.kind, lat.q(0.5).map(|us| us / 1000.0));
        p99.set(t.kind, lat.q(0.99).map(|us| us / 1000.0));
        if t.kind != Kind::Direct && n > 0.0 {
            cpu.set(t.kind, Some(u.proxy / n * 1e5));
        }
        if errors > 0 {
            env.note(format!(
                "{scen}, {}: {errors} failed connections (last: {})",
                t.kind.name(),
                last_error.unwrap_or_default()
            ));
        }
    }
    if resume {
        env.note(format!(
            "{scen}: {CONNS} concurrent clients, each with its own session store (rustls \
             in-memory cache, TLS 1.3 tickets, single use); one unmeasured full handshake per \
             client first, then as 2a; resumed = rustls reports `HandshakeKind::Resumed`. \
             nginx `ssl_session_tickets on` with `ssl_session_cache shared:SSL:10m`, HAProxy \
             its defaults (tickets on, session cache), streamgate whatever it does. No direct \
             row (plain TCP: see 2a)"
        ));
        for r in [rate, resumed, p50, p99, cpu] {
            env.row(r);
        }
    } else {
        env.note(format!(
            "{scen}: {CONNS} concurrent clients, full TLS 1.3 handshake each time (no \
             resumption), `Connection: close`, close_notify sent after the response; direct \
             is plain TCP"
        ));
        for r in [rate, p50, p99, cpu] {
            env.row(r);
        }
    }
}

/// Connect, `GET /small` with `Connection: close`, read the whole response, close. Returns
/// whether the TLS handshake was a resumption.
pub async fn one_request(
    t: &Target,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<bool> {
    let mut s = tls::connect(t.addr, tls, None).await?;
    let resumed = tls::resumed(&s);
    s.write_all(b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let body = read_response(&mut s).await?;
    if body != 100 {
        bail!("expected a 100-byte body, got {body}");
    }
    let _ = s.shutdown().await;
    Ok(resumed)
}

/// Reads one HTTP/1.1 response with a Content-Length; returns the body length. Fails on a
/// status other than 200.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<usize> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_end, len) = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                bail!("response: {}", head.lines().next().unwrap_or(""));
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .context("response without content-length")?
                .trim()
                .parse::<usize>()?;
            break (end + 4, len);
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too long");
        }
    };
    let mut have = buf.len() - head_end;
    while have < len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed after {have} of {len} body bytes");
        }
        have += n;
    }
    Ok(len)
}
