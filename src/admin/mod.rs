//! The admin listener (`listen.admin`, off unless set): `/healthz` (the process is up),
//! `/readyz` (it takes traffic; 503 once a drain begins), `/metrics` (Prometheus text),
//! `/backends` (every route's backends as JSON) and `/` (a live dashboard fed by `/events`).

mod snapshot;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::proxy::Gateway;
use snapshot::Snapshots;

/// The dashboard: one self-contained page, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Whether the gateway should get new traffic: true from start until a drain begins.
#[derive(Debug)]
pub struct Readiness(AtomicBool);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(AtomicBool::new(true))
    }
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set_not_ready(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Serves the admin endpoints until the task is dropped (it outlives the drain on purpose, so
/// `/readyz` can answer 503 while connections finish).
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, ready: Arc<Readiness>) {
    let mut errors = crate::listener::AcceptErrors::new("admin");
    loop {
        // Out of file descriptors and the like: backs off instead of spinning.
        let (tcp, _) = errors.accept(&listener).await;
        let (gateway, ready) = (gateway.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = answer(&req, &gateway, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

type AdminBody = http_body_util::Either<Full<Bytes>, Snapshots>;

fn answer(
    req: &Request<Incoming>,
    gateway: &Arc<Gateway>,
    ready: &Readiness,
) -> Response<AdminBody> {
    let (status, content_type, body) = match req.uri().path() {
        "/" => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(DASHBOARD.as_bytes()),
        ),
        "/backends" => (
            StatusCode::OK,
            "application/json",
            Bytes::from(snapshot::backends_json(gateway)),
        ),
        "/events" => {
            let mut response = Response::new(http_body_util::Either::Right(Snapshots::new(
                gateway.clone(),
            )));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            );
            return response;
        }
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" if ready.is_ready() => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"draining\n"),
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from({
                // Refreshes streamgate_backend_up, whose ejections end by time, not by event.
                snapshot::refresh_backend_gauges(gateway);
                gateway.metrics.render()
            }),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"admin endpoints: / /healthz /readyz /metrics /backends /events\n"),
        ),
    };
    let mut response = Response::new(http_body_util::Either::Left(Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
