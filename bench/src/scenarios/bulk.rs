//! Scenario 7: bulk transfer through TLS, one connection: a 100 MB HTTP/1.1 download (hyper
//! client), as the issue defines the row, and 100 MB sent by the backend over a WebSocket in
//! 1 MiB binary messages.

use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Better, Env, Goal, Meter, Row, Target, Usage};
use crate::{tls, ws};

const WS_MSG: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

/// 100 MB (10^8 bytes), --quick or not: about a tenth of a second per transfer.
const SIZE: u64 = 100_000_000;

pub async fn http(env: &Env) {
    let n = SIZE;
    let scen = format!("7a. Bulk HTTPS download, {} MB, HTTP/1.1", n / 1_000_000);
    run(env, &scen, n, |env, t| Box::pin(download(env, t, n))).await;
}

pub async fn websocket(env: &Env) {
    let n = SIZE;
    let scen = format!(
        "7b. Bulk WSS transfer, {} MB in 1 MiB messages",
        n / 1_000_000
    );
    run(env, &scen, n, |env, t| Box::pin(ws_receive(env, t, n))).await;
}

type Transfer<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + 'a>>;

async fn run<F>(env: &Env, scen: &str, n: u64, f: F)
where
    F: for<'a> Fn(&'a Env, &'a Target) -> Transfer<'a>,
{
    let mut rate = Row::new(scen, "throughput (MB/s)", Better::Higher)
        .goal(Goal::AtLeast(1.2))
        .headline();
    let mut cpu = Row::new(scen, "proxy CPU s per GiB", Better::Lower);
    for t in env.rounds().flat_map(|_| env.targets()) {
        let m = Meter::start(env, &t);
        let t0 = Instant::now();
        let r = tokio::time::timeout(LIMIT, f(env, &t))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("not done within {LIMIT:?}")));
        let secs = t0.elapsed().as_secs_f64();
        let u: Usage = m.finish();
        env.cpu(scen, t.kind, &u);
        match r {
            Ok(()) => {
                rate.set(t.kind, Some(n as f64 / 1e6 / secs));
                if !t.is_direct() {
                    cpu.set(t.kind, Some(u.proxy / (n as f64 / (1u64 << 30) as f64)));
                }
            }
            Err(e) => env.note(format!("{scen}, {}: failed: {e:#}", t.kind.name())),
        }
    }
    env.note(format!(
        "{scen}: MB = 10^6 bytes; one connection; time from request to last byte"
    ));
    for r in [rate, cpu] {
        env.row(r);
    }
}

async fn download(env: &Env, t: &Target, n: u64) -> anyhow::Result<()> {
    let s = tls::connect(t.addr, t.tls(&env.tls.h1), None).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(format!("/bulk?bytes={n}"))
        .header(header::HOST, "localhost")
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    if resp.status() != StatusCode::OK {
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f?.data_ref() {
            got += d.len() as u64;
        }
    }
    driver.abort();
    if got != n {
        bail!("got {got} of {n} bytes");
    }
    Ok(())
}

async fn ws_receive(env: &Env, t: &Target, n: u64) -> anyhow::Result<()> {
    let mut s = tls::connect(t.addr, t.tls(&env.tls.h1), None).await?;
    let rest = ws::client_handshake(&mut s, &format!("/ws-bulk?bytes={n}&msg={WS_MSG}")).await?;
    let mut fc = ws::FrameCounter::default();
    fc.feed(&rest);
    let mut buf = vec![0u8; 256 * 1024];
    while !fc.done() {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        fc.feed(&buf[..k]);
    }
    let got = fc.payload;
    if got != n {
        bail!("got {got} of {n} bytes");
    }
    let close = ws::client_frame(ws::OP_CLOSE, &1000u16.to_be_bytes(), [1, 2, 3, 4]);
    let _ = s.write_all(&close).await;
    let _ = s.shutdown().await;
    Ok(())
}
