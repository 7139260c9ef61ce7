//! What the admin listener shows of the running gateway: `/backends` (JSON) and the live
//! `/events` stream the dashboard reads, one snapshot a second.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use serde::Serialize;

use crate::metrics::ConnLabels;
use crate::proxy::{Gateway, RecentError};

#[derive(Serialize)]
struct BackendView {
    url: String,
    address: String,
    state: &'static str,
    open: u64,
    weight: u32,
}

#[derive(Serialize)]
struct RouteView {
    route: String,
    balance: &'static str,
    backends: Vec<BackendView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    websockets: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sse_streams: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors_total: Option<u64>,
}

#[derive(Serialize)]
struct BackendsDoc {
    routes: Vec<RouteView>,
}

#[derive(Serialize)]
struct LiveDoc {
    time_ms: u64,
    connections: i64,
    routes: Vec<RouteView>,
    /// Newest first.
    errors: Vec<RecentError>,
}

/// Every route of the table in force with its backends; `live` adds the dashboard's counters.
fn routes(gateway: &Gateway, live: bool) -> Vec<RouteView> {
    let router = gateway.router();
    router
        .routes()
        .iter()
        .map(|r| {
            let backends = r
                .upstream
                .snapshot()
                .into_iter()
                .map(|(b, state)| BackendView {
                    url: b.url.to_string(),
                    address: b.address.to_string(),
                    state: state.as_str(),
                    open: b.open(),
                    weight: b.weight(),
                })
                .collect();
            let (requests, errors) = r.metrics.totals();
            RouteView {
                route: r.name.clone(),
                balance: r.config.balance.name(),
                backends,
                websockets: live.then(|| r.metrics.websockets.get()),
                sse_streams: live.then(|| r.metrics.sse_streams.get()),
                requests_total: live.then_some(requests),
                errors_total: live.then_some(errors),
            }
        })
        .collect()
}

/// `GET /backends`.
pub fn backends_json(gateway: &Gateway) -> String {
    let doc = BackendsDoc {
        routes: routes(gateway, false),
    };
    serde_json::to_string(&doc).unwrap_or_else(|_| "{\"routes\":[]}".into()) + "\n"
}

/// Brings `streamgate_backend_up` up to date (an ejection ends by time, not by an event).
pub fn refresh_backend_gauges(gateway: &Gateway) {
    for r in gateway.router().routes() {
        r.upstream.snapshot();
    }
}

fn live_json(gateway: &Gateway) -> String {
    let connections = ["https", "http"]
        .iter()
        .flat_map(|listener| ["h1", "h2"].map(|protocol| (*listener, protocol)))
        .map(|(listener, protocol)| {
            gateway
                .metrics
                .connections
                .get_or_create(&ConnLabels { listener, protocol })
                .get()
        })
        .sum();
    let errors = gateway
        .recent_errors
        .lock()
        .map(|e| e.iter().rev().cloned().collect())
        .unwrap_or_default();
    let doc = LiveDoc {
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        connections,
        routes: routes(gateway, true),
        errors,
    };
    serde_json::to_string(&doc).unwrap_or_default()
}

/// `GET /events`: a snapshot at once, then one a second, until the viewer leaves.
pub struct Snapshots {
    gateway: Arc<Gateway>,
    tick: tokio::time::Interval,
}

impl Snapshots {
    pub fn new(gateway: Arc<Gateway>) -> Snapshots {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Snapshots { gateway, tick }
    }
}

impl Body for Snapshots {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match this.tick.poll_tick(cx) {
            Poll::Ready(_) => {
                let event = format!("event: snapshot\ndata: {}\n\n", live_json(&this.gateway));
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
