//! Plain HTTP forwarding: one request to one backend, bodies streamed both ways, a refused
//! backend skipped once; event streams get [`SseBody`]. [`send`] is shared with the WebSocket
//! handshake.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{self, Authority, PathAndQuery};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

use super::access::AccessEntry;
use super::body::{BodySlot, GatewayBody, UpstreamBody};
use super::error::ProxyError;
use super::headers::{add_forwarded, remove_hop_by_hop};
use super::sse::{is_event_stream, SseBody};
use super::ConnInfo;
use crate::drain::Drain;
use crate::router::Route;
use crate::upstream::{classify, Failure};

/// Forwards `req` on `route` and returns the backend's response with its body streaming.
/// `entry` learns the backend that answered, and whether the response is an event stream.
pub async fn forward(
    route: &Arc<Route>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    drain: &Drain,
    entry: &mut AccessEntry,
) -> Result<Response<GatewayBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    prepare_headers(&mut parts.headers, &parts.uri, conn);
    let (body, slot) = UpstreamBody::new(body, &route.metrics.bytes_in);
    let mut response = send(
        route,
        conn.id,
        parts.method,
        &parts.uri,
        parts.headers,
        body,
        slot,
        &mut entry.backend,
    )
    .await?;
    remove_hop_by_hop(response.headers_mut());
    if is_event_stream(response.headers()) {
        // The gateway may add heartbeats and a retry hint: the length is no longer known.
        response.headers_mut().remove(header::CONTENT_LENGTH);
        entry.stream = true;
        let route = route.clone();
        return Ok(
            response.map(|body| GatewayBody::boxed(SseBody::new(body, route, conn.id, drain)))
        );
    }
    Ok(response.map(|body| GatewayBody::Upstream { body }))
}

/// Sends a request to the route's next backend, and once more to the one after it if the
/// first refused the connection (and the body has not started to go out).
#[allow(clippy::too_many_arguments)] // one request's parts, kept apart to avoid a clone
pub(super) async fn send(
    route: &Arc<Route>,
    conn_id: u64,
    method: Method,
    uri: &Uri,
    mut headers: HeaderMap,
    body: UpstreamBody,
    slot: Option<BodySlot>,
    backend_used: &mut Option<Authority>,
) -> Result<Response<Incoming>, ProxyError> {
    let path = backend_path(route, uri)?;
    let mut body = Some(body);
    // At most two tries, whatever the number of backends.
    let attempts = route.config.backends.len().min(2);
    let mut tries = route.backends().take(attempts).peekable();
    let mut failed = None;
    while let Some(backend) = tries.next() {
        let last = tries.peek().is_none();
        let target = Uri::from_parts({
            let mut parts = uri::Parts::default();
            parts.scheme = Some(uri::Scheme::HTTP);
            parts.authority = Some(backend.clone());
            parts.path_and_query = Some(path.clone());
            parts
        })
        .map_err(|_| ProxyError::BadRequest("request target is not a valid URI"))?;
        let body = body.take().unwrap_or_else(|| match &slot {
            Some(slot) => UpstreamBody::from_slot(slot, &route.metrics.bytes_in),
            None => UpstreamBody::Empty,
        });
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = target;
        *req.version_mut() = Version::HTTP_11;
        // A retry needs the headers again (a failed request is not handed back), so routes
        // with two or more backends pay for one clone per request.
        *req.headers_mut() = if last {
            std::mem::take(&mut headers)
        } else {
            headers.clone()
        };

        *backend_used = Some(backend.clone());
        let sent = tokio::time::timeout(
            route.config.response_header_timeout,
            route.upstream.request(req),
        )
        .await;
        let error = match sent {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(e)) => e,
            Err(_elapsed) => {
                return Err(ProxyError::ResponseTimeout {
                    route: route.name.clone(),
                    backend: backend.to_string(),
                })
            }
        };
        let failure = classify(&error);
        if error.is_connect() {
            route.all_metrics.connect_failure(backend.as_ref());
        }
        if failure == Failure::Refused && !last && UpstreamBody::unsent(&slot) {
            tracing::warn!(
                conn_id,
                route = %route.name,
                %backend,
                "backend refused the connection, trying the next one"
            );
            continue;
        }
        failed = Some(failure.into_error(route, backend, error));
        break;
    }
    // `failed` is None only for a route without backends, which config validation refuses.
    Err(failed.unwrap_or(ProxyError::BadRequest("route has no backends")))
}

/// The path and query for the backend: the client's, shared as it is, or with the route's
/// prefix removed when `strip_prefix` is set.
fn backend_path(route: &Route, uri: &Uri) -> Result<PathAndQuery, ProxyError> {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path = route.backend_path(original.as_str());
    if path.len() == original.as_str().len() {
        // Unchanged (stripping always shortens it): share the original, no copy.
        return Ok(original);
    }
    path.parse()
        .map_err(|_| ProxyError::BadRequest("request target is not a valid URI"))
}

/// Hop-by-hop headers out, X-Forwarded-* in, and `Host` as the client sent it (an HTTP/2
/// client sends `:authority` instead, which becomes `Host` towards the HTTP/1.1 backend).
pub(super) fn prepare_headers(headers: &mut HeaderMap, uri: &Uri, conn: &ConnInfo) {
    let host = headers.get(header::HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    remove_hop_by_hop(headers);
    add_forwarded(headers, conn.peer.ip(), conn.tls, host.as_ref());
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
}
