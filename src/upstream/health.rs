//! Active health checks: a task per backend that asks its health path on a fresh connection
//! every interval (jittered, so a fleet is not probed in the same millisecond) and marks the
//! backend unhealthy or healthy after enough results in a row. Passive ejection lives on
//! [`Backend`] itself, fed by the request path.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{header, HeaderValue, Request};
use tokio_util::sync::CancellationToken;

use super::backend::Backend;
use super::pool;
use crate::config::HealthConfig;
use crate::drain::Drain;
use crate::proxy::body::UpstreamBody;

/// Starts (or restarts, when the settings changed) the checker of `backend`.
pub fn ensure(backend: &Arc<Backend>, config: &HealthConfig, drain: &Drain) {
    let Ok(mut checker) = backend.checker.lock() else {
        return;
    };
    if let Some((running, stop)) = checker.as_ref() {
        if running == config && !stop.is_cancelled() {
            return;
        }
        stop.cancel();
    }
    let stop = CancellationToken::new();
    *checker = Some((config.clone(), stop.clone()));
    let (weak, config, drain2) = (Arc::downgrade(backend), config.clone(), drain.clone());
    drain.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = drain2.draining() => {}
            _ = run(weak, config) => {}
        }
    });
}

/// Stops the checker of `backend`, if one runs; the backend counts as up again.
pub fn stop(backend: &Backend) {
    if let Ok(mut checker) = backend.checker.lock() {
        if let Some((_, stop)) = checker.take() {
            stop.cancel();
        }
    }
    backend.set_active_down(false);
}

async fn run(backend: Weak<Backend>, config: HealthConfig) {
    // The first check soon after start, spread over a tenth of the interval.
    let mut wait = jitter(config.interval / 10);
    let (mut good, mut bad) = (0u32, 0u32);
    let mut down = false;
    loop {
        tokio::time::sleep(wait).await;
        wait = config.interval.mul_f64(0.9) + jitter(config.interval / 5);
        let Some(b) = backend.upgrade() else {
            return;
        };
        match check(&b, &config).await {
            Ok(()) => {
                good += 1;
                bad = 0;
                if down && good >= config.healthy_after {
                    down = false;
                    b.set_active_down(false);
                    tracing::info!(backend = %b.address, "backend passed its health checks, taking traffic again");
                }
            }
            Err(why) => {
                bad += 1;
                good = 0;
                if !down && bad >= config.unhealthy_after {
                    down = true;
                    b.set_active_down(true);
                    tracing::warn!(backend = %b.address, path = %config.path, error = %why, "backend failed its health checks, no new traffic until it recovers");
                } else {
                    tracing::debug!(backend = %b.address, error = %why, "health check failed");
                }
            }
        }
    }
}

fn jitter(max: Duration) -> Duration {
    max.mul_f64(fastrand::f64())
}

/// One check: a GET of the health path on a new connection; any 2xx within the timeout passes.
async fn check(backend: &Backend, config: &HealthConfig) -> Result<(), String> {
    let attempt = async {
        let mut conn = pool::connect(backend, config.timeout)
            .await
            .map_err(|e| crate::proxy::error::error_chain(&e))?;
        let host = backend
            .url
            .strip_prefix("http://")
            .unwrap_or(backend.address.as_str())
            .trim_end_matches('/');
        let mut req = Request::new(UpstreamBody::Empty);
        *req.uri_mut() = config
            .path
            .as_str()
            .parse()
            .map_err(|_| "bad path".to_string())?;
        let headers = req.headers_mut();
        if let Ok(host) = HeaderValue::from_str(host) {
            headers.insert(header::HOST, host);
        }
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("streamgate-health-check"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let response = conn
            .send(req)
            .await
            .map_err(|e| crate::proxy::error::error_chain(&e.error))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "health path answered {}",
                response.status().as_u16()
            ))
        }
    };
    match tokio::time::timeout(config.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(config.timeout)
        )),
    }
}
