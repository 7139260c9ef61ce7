//! The access log: one line per request, written when its response body is done (or dropped),
//! so it can report the bytes that really went out and how long the whole exchange took.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::body::{BoxError, GatewayBody};
use crate::metrics::RouteMetrics;

/// What is known about a request when its response head is ready.
#[derive(Debug)]
pub struct AccessEntry {
    pub route: Option<Arc<crate::router::Route>>,
    pub backend: Option<http::uri::Authority>,
    pub method: http::Method,
    /// The request target as received (a shared handle, not a copy).
    pub uri: http::Uri,
    pub status: u16,
    pub start: Instant,
    pub bytes_out: u64,
    pub complete: bool,
    /// A WebSocket or event stream: its lifetime is not a request duration.
    pub stream: bool,
    pub conn_id: u64,
    /// Keeps the connection from counting as idle until the response body is done.
    pub active: Option<crate::conn::ActiveGuard>,
    /// Counted here when no route matched.
    pub unrouted: Arc<RouteMetrics>,
}

impl AccessEntry {
    pub fn new(
        method: &http::Method,
        uri: &http::Uri,
        start: Instant,
        unrouted: Arc<RouteMetrics>,
    ) -> AccessEntry {
        AccessEntry {
            route: None,
            backend: None,
            method: method.clone(),
            uri: uri.clone(),
            status: 0,
            start,
            bytes_out: 0,
            complete: false,
            stream: false,
            conn_id: 0,
            active: None,
            unrouted,
        }
    }
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        let metrics = self.route.as_ref().map_or(&*self.unrouted, |r| &r.metrics);
        metrics.request(self.status);
        metrics.bytes_out.inc_by(self.bytes_out);
        if !self.stream {
            metrics.duration.observe(self.start.elapsed().as_secs_f64());
        }
        tracing::info!(
            target: "streamgate::access",
            conn_id = self.conn_id,
            route = self.route.as_ref().map_or("-", |r| r.name.as_str()),
            backend = self.backend.as_ref().map_or("-", |b| b.as_str()),
            method = %self.method,
            path = self.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            status = self.status,
            duration_ms = self.start.elapsed().as_millis() as u64,
            bytes_out = self.bytes_out,
            complete = self.complete,
            "request"
        );
    }
}

pin_project! {
    /// A response body that counts what it passes on and logs the entry when it is dropped.
    pub struct Logged {
        #[pin]
        body: GatewayBody,
        entry: AccessEntry,
    }
}

impl Logged {
    pub fn new(body: GatewayBody, mut entry: AccessEntry) -> Logged {
        // hyper never polls a body that is already at its end.
        entry.complete = body.is_end_stream();
        Logged { body, entry }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut body = this.body;
        let polled = body.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.entry.bytes_out += data.len() as u64;
                }
                // hyper stops polling once the body says it is at its end.
                if body.is_end_stream() {
                    this.entry.complete = true;
                }
            }
            Poll::Ready(None) => this.entry.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
