//! Continuing an event stream on another backend (`[route.sse] resume`): the same request
//! again, with `Last-Event-ID` set to the last event the client received, to a healthy
//! backend, accepted only when it answers 200 with an event stream.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri, Version};

use super::is_event_stream;
use crate::metrics::ResumeOutcome;
use crate::proxy::body::UpstreamBody;
use crate::router::Route;
use crate::upstream::{Backend, OpenGuard, PickInput, PooledBody};

const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// What it takes to open the stream's request again.
#[derive(Debug)]
pub struct StreamRequest {
    pub method: Method,
    /// The path and query the backend got (after `strip_prefix`).
    pub path: PathAndQuery,
    /// The headers the backend got (forwarding headers included).
    pub headers: HeaderMap,
    pub client: IpAddr,
}

impl StreamRequest {
    /// The same request in allocations of its own: it lives as long as the stream, and must
    /// not keep the request head's buffer alive (see `headers::owned_value`).
    pub fn owned(self) -> StreamRequest {
        let path =
            PathAndQuery::from_maybe_shared(bytes::Bytes::from(self.path.as_str().to_owned()))
                .unwrap_or(self.path);
        StreamRequest {
            path,
            headers: crate::proxy::headers::owned_headers(&self.headers),
            ..self
        }
    }

    /// The client's own `Last-Event-ID`: where the stream stands before any event arrived.
    pub fn last_event_id(&self) -> Option<String> {
        self.headers
            .get(LAST_EVENT_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// A backend that took the stream over.
pub struct Resumed {
    pub body: PooledBody,
    pub backend: Arc<Backend>,
    pub attempts: u32,
}

/// Why no backend took the stream over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotResumed {
    /// `resume_attempts` tries failed.
    Exhausted,
    /// A backend answered 204: the application says the stream is over (WHATWG: the
    /// client stops reconnecting too).
    Stopped,
}

/// Tries up to `resume_attempts` backends, the one that failed last of all.
pub async fn reopen(
    route: Arc<Route>,
    request: Arc<StreamRequest>,
    last_id: String,
    failed: Arc<Backend>,
) -> Result<Resumed, NotResumed> {
    let attempts = route.config.sse.resume_attempts.max(1);
    let mut exclude = failed;
    for attempt in 1..=attempts {
        if attempt > 1 {
            // A moment for a restarting backend, or for health checks to notice a dead one.
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt - 1))).await;
        }
        // The backends listed now: a reload since the stream began may have changed them.
        let upstream = route.upstream.latest();
        let input = PickInput {
            client_ip: request.client,
            headers: &request.headers,
            query: request.path.query(),
        };
        let Some(pick) = upstream.pick(&input, Some(&exclude)) else {
            break;
        };
        let backend = pick.backend;
        match try_backend(&route, &request, &last_id, &backend).await {
            Ok(Some(body)) => {
                route.metrics.resume(ResumeOutcome::Resumed);
                return Ok(Resumed {
                    body,
                    backend,
                    attempts: attempt,
                });
            }
            Ok(None) => return Err(NotResumed::Stopped),
            Err(why) => {
                route.metrics.resume(ResumeOutcome::Failed);
                tracing::warn!(
                    route = %route.name,
                    backend = %backend.address,
                    attempt,
                    error = %why,
                    "event stream resume try failed"
                );
                exclude = backend;
            }
        }
    }
    route.metrics.resume(ResumeOutcome::Exhausted);
    Err(NotResumed::Exhausted)
}

/// One try: Ok(Some) with the new body, Ok(None) for a 204, Err with what went wrong.
async fn try_backend(
    route: &Route,
    request: &StreamRequest,
    last_id: &str,
    backend: &Arc<Backend>,
) -> Result<Option<PooledBody>, String> {
    let config = &route.config;
    let open: OpenGuard = backend.begin();
    let mut conn = match backend.pool.checkout(backend, config.connect_timeout).await {
        Ok(c) => c,
        Err(e) => {
            route.all_metrics.connect_failure(backend.address.as_str());
            backend.record_failure(&route.upstream.outlier);
            return Err(crate::proxy::error::error_chain(&e));
        }
    };
    let mut req = Request::new(UpstreamBody::Empty);
    *req.method_mut() = request.method.clone();
    *req.uri_mut() = Uri::from(request.path.clone());
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = request.headers.clone();
    let id = HeaderValue::from_str(last_id).map_err(|_| "event id is not a header value")?;
    req.headers_mut().insert(LAST_EVENT_ID, id);
    let response = match tokio::time::timeout(config.response_header_timeout, conn.send(req)).await
    {
        Err(_) => return Err("no response head in time".into()),
        Ok(Err(e)) => {
            backend.record_failure(&route.upstream.outlier);
            return Err(crate::proxy::error::error_chain(&e.error));
        }
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    backend.metrics.response(status.as_u16());
    if status == http::StatusCode::NO_CONTENT {
        return Ok(None);
    }
    if status != http::StatusCode::OK || !is_event_stream(response.headers()) {
        if matches!(status.as_u16(), 502..=504) {
            backend.record_failure(&route.upstream.outlier);
        }
        return Err(format!(
            "answered {} without an event stream",
            status.as_u16()
        ));
    }
    if crate::proxy::forward::is_encoded(response.headers()) {
        // Its bytes could not be spliced after the first backend's.
        return Err("answered with a Content-Encoding".into());
    }
    backend.record_success();
    Ok(Some(PooledBody::new(
        response.into_body(),
        Some(conn),
        Some(open),
    )))
}
