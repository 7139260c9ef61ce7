//! Plain HTTP forwarding: one request to one backend of the route, chosen by its balancing
//! policy, with retries where sending again is safe; event streams get [`SseBody`].
//! [`send`] is shared with the WebSocket handshake.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

use super::access::AccessEntry;
use super::body::{BodySlot, GatewayBody, UpstreamBody};
use super::error::ProxyError;
use super::headers::{add_forwarded, remove_hop_by_hop};
use super::request::RequestFacts;
use super::sse::resume::StreamRequest;
use super::sse::{is_event_stream, SseBody};
use super::ConnInfo;
use crate::drain::Drain;
use crate::router::Route;
use crate::upstream::pool::{Conn, ConnectError};
use crate::upstream::{Backend, OpenGuard, PickInput, PooledBody};

/// Forwards `req` on `route` and returns the backend's response with its body streaming.
/// `entry` learns the backend that answered, and whether the response is an event stream.
pub async fn forward(
    route: &Arc<Route>,
    req: Request<Incoming>,
    facts: &RequestFacts,
    conn: &ConnInfo,
    drain: &Drain,
    entry: &mut AccessEntry,
) -> Result<Response<GatewayBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let expires_at = parts
        .extensions
        .get::<crate::auth::TokenExpiry>()
        .map(|e| e.0);
    prepare_headers(&mut parts.headers, facts, conn);
    // `[route.sse] resume`: what it takes to open an event stream again elsewhere. Only a GET
    // can be sent again (EventSource only sends GETs).
    // Shared handles here (cheap); copied only if the answer turns out to be an event stream.
    let again = (route.config.sse.resume && parts.method == Method::GET)
        .then(|| {
            Some(StreamRequest {
                method: Method::GET,
                path: backend_path(route, &parts.uri).ok()?,
                headers: parts.headers.clone(),
                client: conn.client,
            })
        })
        .flatten();
    if !http_body::Body::is_end_stream(&body) {
        entry.request_bytes = Some(Default::default());
    }
    let (body, slot) =
        UpstreamBody::new(body, &route.metrics.bytes_in, entry.request_bytes.as_ref());
    let sent = send(
        BackendRequest {
            route,
            conn,
            method: parts.method,
            uri: &parts.uri,
            headers: parts.headers,
            body,
            slot,
            upgrade: None,
        },
        entry,
    )
    .await?;
    let set_cookie = sent.set_cookie.then(|| {
        route
            .upstream
            .affinity_cookie(sent.open.backend(), &route.config.path, conn.tls)
    });
    let mut response = sent.response;
    remove_hop_by_hop(response.headers_mut());
    if let Some(Some(cookie)) = set_cookie {
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    let (parts, body) = response.into_parts();
    let body = PooledBody::new(body, sent.conn, Some(sent.open));
    let mut response = Response::from_parts(parts, body);
    if is_event_stream(response.headers()) {
        // The gateway may add heartbeats and a retry hint: the length is no longer known.
        response.headers_mut().remove(header::CONTENT_LENGTH);
        // The stream writes the access line when it ends.
        let line = entry.hand_off(super::access::Protocol::Sse, response.status().as_u16());
        let route = route.clone();
        let encoded = is_encoded(response.headers());
        if encoded {
            // Heartbeats and the retry hint are plain text: spliced into a compressed body they
            // would corrupt it. The stream passes untouched (idle timeout and drain still apply).
            tracing::debug!(
                conn_id = conn.id,
                route = %route.name,
                "event stream has a Content-Encoding: no heartbeats or retry hint"
            );
        }
        return Ok(response.map(|body| {
            GatewayBody::boxed(
                SseBody::new(
                    body,
                    route,
                    conn.id,
                    drain,
                    encoded,
                    again.map(StreamRequest::owned),
                    line,
                )
                .expiring(expires_at),
            )
        }));
    }
    Ok(response.map(|body| GatewayBody::Upstream { body }))
}

/// One request on its way to a backend: what it takes to send it, and to send it again.
pub(super) struct BackendRequest<'a> {
    pub route: &'a Arc<Route>,
    pub conn: &'a ConnInfo,
    pub method: Method,
    /// The client's target; the backend gets its path (after `strip_prefix`).
    pub uri: &'a Uri,
    pub headers: HeaderMap,
    pub body: UpstreamBody,
    /// Where the client's body waits until a backend connection takes it (see [`UpstreamBody`]).
    pub slot: Option<BodySlot>,
    /// A WebSocket handshake: the connection goes to a task of the drain that hands the socket
    /// over after the 101, instead of back to the pool.
    pub upgrade: Option<&'a Drain>,
}

/// A backend's response head, and what the caller needs to finish the exchange.
pub(super) struct Sent {
    pub response: Response<Incoming>,
    /// The connection to drive along with the body (None for an upgrade).
    pub conn: Option<Conn>,
    /// Counts the exchange as open on the backend until dropped.
    pub open: OpenGuard,
    /// `balance = "cookie"`: the response must set the affinity cookie.
    pub set_cookie: bool,
}

/// Sends a request to the backend the route's policy picks. A try that failed before the
/// request could have had any effect goes to another backend, up to `retries` more times:
/// the connection was refused, timed out or was reset before a byte was written, or an
/// idempotent request without a body met a kept-alive connection that the backend had just
/// closed. Never once a response head arrived or a body began to go out.
pub(super) async fn send(
    req: BackendRequest<'_>,
    entry: &mut AccessEntry,
) -> Result<Sent, ProxyError> {
    let BackendRequest {
        route,
        conn,
        method,
        uri,
        mut headers,
        body,
        slot,
        upgrade,
    } = req;
    let path = backend_path(route, uri)?;
    // Time to first byte: from the first try to the response head.
    let began = std::time::Instant::now();
    let config = &route.config;
    let tries = 1 + config.retries as usize;
    let replayable =
        matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) && slot.is_none();
    let mut body = Some(body);
    let mut previous: Option<Arc<Backend>> = None;
    for attempt in 1..=tries {
        let last_try = attempt == tries;
        let input = PickInput {
            client_ip: conn.client,
            headers: &headers,
            query: uri.query(),
        };
        let pick = route
            .upstream
            .pick(&input, previous.as_ref())
            .ok_or_else(|| ProxyError::NoBackend {
                route: route.name.clone(),
            })?;
        let backend = pick.backend;
        entry.backend = Some(backend.address.clone());
        let open = backend.begin();
        let outlier = &route.upstream.outlier;
        let retry = |why: &dyn std::fmt::Display| {
            tracing::warn!(conn_id = conn.id, route = %route.name, backend = %backend.address, error = %why, attempt, "backend try failed, trying again");
        };

        let mut connection = match backend
            .pool
            .checkout(&backend, config.connect_timeout)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                route.all_metrics.connect_failure(backend.address.as_str());
                if let Some(ejected) = backend.record_failure(outlier) {
                    log_ejection(route, &backend, ejected);
                }
                // Another backend may answer; the same one refused a moment ago.
                if !last_try && route.upstream.len() > 1 {
                    retry(&crate::proxy::error::error_chain(&e));
                    previous = Some(backend.clone());
                    continue;
                }
                return Err(connect_error(route, &backend, e));
            }
        };
        let mut request = Request::new(body.take().unwrap_or_else(|| match &slot {
            Some(slot) => {
                UpstreamBody::from_slot(slot, &route.metrics.bytes_in, entry.request_bytes.as_ref())
            }
            None => UpstreamBody::Empty,
        }));
        *request.method_mut() = method.clone();
        *request.uri_mut() = Uri::from(path.clone());
        *request.version_mut() = Version::HTTP_11;
        // A retry needs the headers again (a failed request is not handed back whole), so
        // requests that may be tried again pay for one clone: on a route of several backends,
        // or on a kept-alive connection that the backend may have closed meanwhile.
        let reused = connection.reused;
        let may_retry = !last_try && (reused || route.upstream.len() > 1);
        *request.headers_mut() = if may_retry {
            headers.clone()
        } else {
            std::mem::take(&mut headers)
        };

        let sending = async {
            match upgrade {
                None => connection
                    .send(request)
                    .await
                    .map(|r| (r, Some(connection))),
                Some(drain) => connection
                    .send_upgrade(request, |driver| drain.spawn(driver))
                    .await
                    .map(|r| (r, None)),
            }
        };
        let error = match tokio::time::timeout(config.response_header_timeout, sending).await {
            Err(_elapsed) => {
                return Err(ProxyError::ResponseTimeout {
                    route: route.name.clone(),
                    backend: backend.address.to_string(),
                })
            }
            Ok(Ok((response, connection))) => {
                entry.upstream = Some(began.elapsed());
                let status = response.status().as_u16();
                backend.metrics.response(status);
                if matches!(status, 502..=504) {
                    if let Some(ejected) = backend.record_failure(outlier) {
                        log_ejection(route, &backend, ejected);
                    }
                } else {
                    backend.record_success();
                }
                return Ok(Sent {
                    response,
                    conn: connection,
                    open,
                    set_cookie: pick.set_cookie,
                });
            }
            Ok(Err(e)) => e,
        };
        if client_body_failed(&error.error) {
            // The client's body was malformed or broke off while it went out (hyper reports
            // what our body yielded as a "user body" error). The backend is not to blame.
            return Err(ProxyError::BadRequestBody {
                route: route.name.clone(),
                backend: backend.address.to_string(),
                source: Box::new(error.error),
            });
        }
        // Nothing was written, or a kept-alive connection was closed under an idempotent
        // request (the backend's idle close racing our reuse): sending again is safe.
        // (A fresh connection to the only backend is worth it only for a reused one.)
        let unsent = error.unsent.is_some()
            && UpstreamBody::unsent(&slot)
            && (reused || route.upstream.len() > 1);
        let stale = reused && replayable && !error.error.is_timeout();
        if !reused {
            if let Some(ejected) = backend.record_failure(outlier) {
                log_ejection(route, &backend, ejected);
            }
        }
        if reused {
            // The backend closed one kept-alive connection: it may have closed (or, restarted,
            // lost) all of them, and the next try should not meet another.
            backend.pool.clear();
        }
        if (unsent || stale) && may_retry {
            retry(&crate::proxy::error::error_chain(&error.error));
            previous = Some(backend.clone());
            continue;
        }
        return Err(ProxyError::BackendFailed {
            route: route.name.clone(),
            backend: backend.address.to_string(),
            source: Box::new(error.error),
        });
    }
    // The loop returns on its last try.
    Err(ProxyError::NoBackend {
        route: route.name.clone(),
    })
}

/// Whether hyper failed the exchange because the request body (the client's `Incoming`, the
/// only source of body errors in [`UpstreamBody`]) yielded an error.
fn client_body_failed(error: &hyper::Error) -> bool {
    use std::error::Error;
    error.is_user()
        && error
            .source()
            .is_some_and(|s| s.downcast_ref::<hyper::Error>().is_some())
}

/// A `Content-Encoding` other than `identity`.
pub(crate) fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"))
}

fn connect_error(route: &Route, backend: &Backend, e: ConnectError) -> ProxyError {
    let (route, backend) = (route.name.clone(), backend.address.to_string());
    match e {
        ConnectError::Timeout => ProxyError::ConnectTimeout { route, backend },
        ConnectError::Refused(_) => ProxyError::BackendRefused {
            route,
            backend,
            source: Box::new(e),
        },
        other => ProxyError::BackendFailed {
            route,
            backend,
            source: Box::new(other),
        },
    }
}

fn log_ejection(route: &Route, backend: &Backend, length: std::time::Duration) {
    tracing::warn!(
        route = %route.name,
        backend = %backend.address,
        ejection_ms = length.as_millis() as u64,
        "backend ejected after consecutive failures"
    );
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

/// Hop-by-hop headers out, X-Forwarded-* in, and `Host` set to the request's one authoritative
/// host (the one it was routed on: [`RequestFacts`]). Split cookie fields become one.
pub(super) fn prepare_headers(headers: &mut HeaderMap, facts: &RequestFacts, conn: &ConnInfo) {
    remove_hop_by_hop(headers);
    // Only a trusted proxy's forwarding headers survive; everyone else's are replaced.
    crate::trust::strip_untrusted(headers, conn.forwarded_trusted);
    // The hop the gateway saw: the trusted proxy (its client is already in the list), or
    // the client itself.
    let hop = if conn.forwarded_trusted {
        conn.peer.ip()
    } else {
        conn.client
    };
    let proto_from_proxy = if conn.forwarded_trusted {
        headers.get(super::headers::X_FORWARDED_PROTO).cloned()
    } else {
        None
    };
    add_forwarded(headers, hop, conn.tls, facts.host_header.as_ref());
    if let Some(proto) = proto_from_proxy {
        // A TLS-ending balancer in front: the client spoke https even if the hop to us is plain.
        headers.insert(super::headers::X_FORWARDED_PROTO, proto);
    }
    match &facts.host_header {
        Some(host) => {
            headers.insert(header::HOST, host.clone());
        }
        None => {
            headers.remove(header::HOST);
        }
    }
    // Only the certificate this connection verified; a client's own header never passes.
    crate::auth::set_client_cert(headers, conn.client_cert.as_deref());
    join_cookies(headers);
}

/// RFC 9113 8.2.3: an HTTP/2 client may send each cookie in a field of its own; towards an
/// HTTP/1.1 backend they are one field, joined with "; ".
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Valid header bytes joined by "; " are valid header bytes.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cookies_are_joined_in_order() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2; c=3"));
        h.append(header::COOKIE, HeaderValue::from_static("d=4"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3; d=4"]);
        let mut one = HeaderMap::new();
        one.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut one);
        assert_eq!(one[header::COOKIE], "a=1");
    }

    #[test]
    fn content_encoding_other_than_identity_counts() {
        let mut h = HeaderMap::new();
        assert!(!is_encoded(&h));
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!is_encoded(&h));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(is_encoded(&h));
    }
}
