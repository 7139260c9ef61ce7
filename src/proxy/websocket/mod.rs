//! WebSocket bridging: checks the client's handshake (HTTP/1.1 Upgrade, or HTTP/2 extended
//! CONNECT per RFC 8441), makes an HTTP/1.1 upgrade to the backend, answers the client, and
//! hands both upgraded connections to the [`relay`].

pub mod frame;
pub mod relay;

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tracing::Instrument;

use super::access::{AccessEntry, AccessLine};
use super::body::{GatewayBody, UpstreamBody};
use super::error::ProxyError;
use super::forward::{prepare_headers, send, BackendRequest};
use super::headers::{has_token, remove_hop_by_hop};
use super::request::RequestFacts;
use super::ConnInfo;
use crate::drain::Drain;
use crate::router::Route;
use crate::upstream::PooledBody;
use relay::{relay, RelayConfig};

const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");
const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");

/// Bridges one WebSocket handshake on `route`. On success the returned response is the 101
/// (HTTP/1.1) or 200 (HTTP/2) for the client, and the relay runs in a task of the drain.
pub async fn bridge(
    route: &Arc<Route>,
    mut req: Request<Incoming>,
    facts: &RequestFacts,
    conn: &ConnInfo,
    drain: &Drain,
    entry: &mut AccessEntry,
) -> Result<Response<GatewayBody>, ProxyError> {
    let h2 = req.method() == Method::CONNECT;
    let bad = |reason: String| ProxyError::BadHandshake {
        route: route.name.clone(),
        reason,
    };
    if !h2 && req.method() != Method::GET {
        // RFC 6455 4.1: the opening handshake is a GET.
        return Err(bad(format!("method must be GET, got {}", req.method())));
    }
    check_handshake(req.headers(), h2).map_err(|e| match e {
        HandshakeError::Version(version) => ProxyError::UnsupportedWebSocketVersion {
            route: route.name.clone(),
            version,
        },
        HandshakeError::Bad(reason) => bad(reason),
    })?;
    check_origin(route, req.headers())?;
    let slot = match &route.websocket_slots {
        Some(slots) => {
            Some(
                slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| ProxyError::RouteFull {
                        route: route.name.clone(),
                    })?,
            )
        }
        None => None,
    };

    // Must be taken before the response goes out (hyper's upgrade order).
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _empty_body) = req.into_parts();
    let expires_at = parts
        .extensions
        .get::<crate::auth::TokenExpiry>()
        .map(|e| tokio::time::Instant::from_std(e.0));
    prepare_headers(&mut parts.headers, facts, conn);
    if route.config.websocket.max_message_size.is_some() {
        // The relay counts message sizes on the wire; a compressed message could inflate far
        // past the limit in the backend. So on a route with a limit, compression is not
        // offered to the backend, and the limit bounds what the backend receives.
        strip_deflate(&mut parts.headers);
    }
    // Upgrade and Connection are hop-by-hop and were just removed: put the pair back.
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let key = if h2 {
        // RFC 8441 has no key; the HTTP/1.1 backend needs one (RFC 6455 4.1).
        let key = generate_key();
        parts.headers.insert(
            SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&key).map_err(|_| bad("cannot make a key".into()))?,
        );
        Some(key)
    } else {
        None
    };

    let sent = send(
        BackendRequest {
            route,
            conn,
            method: Method::GET,
            uri: &parts.uri,
            headers: parts.headers,
            body: UpstreamBody::Empty,
            slot: None,
            upgrade: Some(drain),
        },
        entry,
    )
    .await?;
    let mut response = sent.response;
    let open = sent.open;
    let backend = open.backend().address.to_string();
    let cookie = if sent.set_cookie {
        route
            .upstream
            .affinity_cookie(open.backend(), &route.config.path, conn.tls)
            .and_then(|c| HeaderValue::from_str(&c).ok())
    } else {
        None
    };
    let upstream_bad = |reason: &str| ProxyError::BadUpstreamHandshake {
        route: route.name.clone(),
        backend: backend.clone(),
        reason: reason.to_string(),
    };
    if h2 && response.status().is_success() {
        // RFC 8441 5: to an HTTP/2 client a 2xx means "open". A backend that answered 2xx
        // without switching (an SPA catch-all) left no tunnel behind it: relaying its answer
        // would tell the client a WebSocket is open when none is.
        return Err(upstream_bad(&format!(
            "answered {} instead of 101 to the upgrade",
            response.status().as_u16()
        )));
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The backend said no: its answer reaches the client as it is (not a 101, and over
        // HTTP/2 not a 2xx, so the client cannot take it for an open WebSocket).
        tracing::info!(
            conn_id = conn.id,
            route = %route.name,
            %backend,
            status = response.status().as_u16(),
            "backend declined the WebSocket handshake"
        );
        remove_hop_by_hop(response.headers_mut());
        return Ok(response.map(|body| GatewayBody::Upstream {
            body: PooledBody::new(body, None, Some(open)),
        }));
    }
    if !has_token(response.headers(), header::UPGRADE, "websocket") {
        return Err(upstream_bad("101 without Upgrade: websocket"));
    }
    if let Some(key) = &key {
        let expected = derive_accept_key(key.as_bytes());
        if response
            .headers()
            .get(SEC_WEBSOCKET_ACCEPT)
            .map(|v| v.as_bytes())
            != Some(expected.as_bytes())
        {
            return Err(upstream_bad("wrong Sec-WebSocket-Accept"));
        }
    }

    let mut headers = std::mem::take(response.headers_mut());
    remove_hop_by_hop(&mut headers);
    let mut reply = Response::new(GatewayBody::empty());
    if h2 {
        // RFC 8441 5: success is a 200, and there is no accept key on HTTP/2.
        headers.remove(SEC_WEBSOCKET_ACCEPT);
    } else {
        *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    *reply.headers_mut() = headers;
    if let Some(cookie) = cookie {
        reply.headers_mut().append(header::SET_COOKIE, cookie);
    }
    // The tunnel writes the access line when it ends, with its lifetime, bytes and close.
    let line = entry.hand_off(super::access::Protocol::Ws, reply.status().as_u16());

    let tunnel = Tunnel {
        client: client_upgrade,
        backend: hyper::upgrade::on(response),
        route: route.clone(),
        backend_name: backend,
        conn_id: conn.id,
        line,
        drain: drain.clone(),
        write_stall: conn.write_stall.limit(),
        // Registered on its backend, which may ask it to move (drain, rebalance).
        held: open.backend().hold(),
        expires_at,
        // Held for the tunnel's life: the route's place, the connection's place under
        // max_connections, its count as busy (not idle), its count on the backend, and
        // its count among those a paced shutdown spreads.
        _guards: (
            slot,
            conn.slot.clone(),
            conn.activity.begin(),
            open,
            drain.long_lived(),
        ),
    };
    drain.spawn(tunnel.run().instrument(tracing::Span::current()));
    Ok(reply)
}

/// One WebSocket after the handshake: both upgrades, relayed, then its access line.
struct Tunnel {
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    route: Arc<Route>,
    backend_name: String,
    conn_id: u64,
    /// Written when the tunnel is dropped, however it ends.
    line: AccessLine,
    drain: Drain,
    /// `limits.write_stall_timeout`, which the relay applies to its own writes to the client.
    write_stall: std::time::Duration,
    held: crate::upstream::Held,
    /// When the token the WebSocket was opened with expires (`end_at_expiry`).
    expires_at: Option<tokio::time::Instant>,
    _guards: (
        Option<tokio::sync::OwnedSemaphorePermit>,
        Arc<crate::conn::ConnSlot>,
        crate::conn::ActiveGuard,
        crate::upstream::OpenGuard,
        crate::drain::LongLived,
    ),
}

impl Tunnel {
    /// Not an `async fn`: one keeps a second copy of `self` in its state for as long as it
    /// runs (rust-lang/rust#62958), 664 bytes more in every idle tunnel's task.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl std::future::Future<Output = ()> {
        async move {
            // The whole tunnel lives as long as the future, guards and access line included:
            // the block would otherwise capture only the fields it uses (edition 2021).
            let _whole = &self;
            let (route, backend, conn_id) = (&self.route, &self.backend_name, self.conn_id);
            let start = Instant::now();
            self.line.reason = "upgrade failed";
            let (client, backend_io) = match tokio::try_join!(&mut self.client, &mut self.backend) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(
                        conn_id,
                        route = %route.name,
                        %backend,
                        error = %e,
                        "websocket upgrade failed"
                    );
                    return;
                }
            };
            let ws = &route.config.websocket;
            let config = RelayConfig {
                ping_interval: ws.ping_interval,
                idle_timeout: ws.idle_timeout,
                max_message_size: ws.max_message_size,
                max_messages_per_second: ws.max_messages_per_second,
                write_stall: Some(self.write_stall),
                moves: Some(self.held.signal().clone()),
                age_at: crate::upstream::held::age_deadline(route.config.max_connection_age),
                expires_at: self.expires_at,
            };
            let metrics = &route.metrics;
            metrics.websockets.inc();
            let (client, backend_io) = (TokioIo::new(client), TokioIo::new(backend_io));
            // One relay for both protocols: over HTTP/2 the client side is the tunnel's stream,
            // whose flow control can stop the gateway's writes before the socket fills; the relay
            // watches its own writes either way.
            let stats = relay(client, backend_io, config, &self.drain).await;
            metrics.websockets.dec();
            if stats.reason == Some("token expired") {
                route
                    .all_metrics
                    .token_expired
                    .get_or_create(&crate::metrics::StreamLabels {
                        route: route.name.clone(),
                        kind: "websocket",
                    })
                    .inc();
            }
            if stats.reason == Some("message rate exceeded") {
                metrics.limited_messages.inc();
            }
            if let Some(reason) = stats.moved {
                metrics.moved(reason);
            }
            metrics
                .websocket_lifetime
                .observe(start.elapsed().as_secs_f64());
            metrics.bytes_in.inc_by(stats.to_backend.bytes);
            metrics.bytes_out.inc_by(stats.to_client.bytes);
            let line = &mut self.line;
            line.bytes_in = stats.to_backend.bytes;
            line.bytes_out = stats.to_client.bytes;
            line.messages_in = Some(stats.to_backend.messages);
            line.messages_out = Some(stats.to_client.messages);
            line.closed_by = stats.closed_by.as_str();
            line.close_code = Some(stats.close_code.unwrap_or(1006));
            line.complete = stats.close_code.is_some();
            line.reason = stats.reason.unwrap_or("-");
        }
    }
}

/// Why a client's handshake is refused.
#[derive(Debug, PartialEq)]
enum HandshakeError {
    /// 400, with the reason as its body.
    Bad(String),
    /// RFC 6455 4.4: a version the gateway does not speak gets 426 naming version 13.
    Version(String),
}

const SEC_WEBSOCKET_EXTENSIONS: HeaderName = HeaderName::from_static("sec-websocket-extensions");

/// Removes `permessage-deflate` offers (RFC 7692) from the client's extension list, keeping
/// any other extension.
fn strip_deflate(headers: &mut HeaderMap) {
    if !headers.contains_key(SEC_WEBSOCKET_EXTENSIONS) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|offer| {
            let name = offer.split(';').next().unwrap_or("").trim();
            !name.eq_ignore_ascii_case("permessage-deflate") && !name.is_empty()
        })
        .map(str::to_string)
        .collect();
    headers.remove(SEC_WEBSOCKET_EXTENSIONS);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(SEC_WEBSOCKET_EXTENSIONS, v);
        }
    }
}

/// RFC 6455 4.2.1 (HTTP/1.1) and RFC 8441 4 (HTTP/2).
fn check_handshake(headers: &HeaderMap, h2: bool) -> Result<(), HandshakeError> {
    let bad = |reason: &str| Err(HandshakeError::Bad(reason.into()));
    if !h2 {
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return bad("Connection header must contain \"upgrade\"");
        }
        match headers.get(SEC_WEBSOCKET_KEY).map(|v| v.as_bytes()) {
            None => return bad("missing Sec-WebSocket-Key header"),
            Some(k) if !is_websocket_key(k) => {
                return bad("Sec-WebSocket-Key must be 16 bytes in base64")
            }
            Some(_) => {}
        }
    }
    match headers.get(SEC_WEBSOCKET_VERSION) {
        Some(v) if v.as_bytes() == b"13" => Ok(()),
        Some(v) => Err(HandshakeError::Version(
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        )),
        None => bad("missing Sec-WebSocket-Version header"),
    }
}

/// 16 bytes in base64: 22 characters of the alphabet, then "==".
fn is_websocket_key(k: &[u8]) -> bool {
    k.len() == 24
        && k.ends_with(b"==")
        && k[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Cross-site WebSocket hijacking guard: with `allowed_origins` set, the Origin must be listed.
fn check_origin(route: &Route, headers: &HeaderMap) -> Result<(), ProxyError> {
    let Some(allowed) = &route.config.websocket.allowed_origins else {
        return Ok(());
    };
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let normalized = origin.trim_end_matches('/').to_ascii_lowercase();
    if allowed.iter().any(|a| a == &normalized) {
        Ok(())
    } else {
        Err(ProxyError::OriginForbidden {
            route: route.name.clone(),
            origin: origin.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn deflate_offers_are_stripped_and_others_kept() {
        let mut h = headers(&[(
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits, x-webkit-deflate-frame",
        )]);
        h.append(
            "sec-websocket-extensions",
            HeaderValue::from_static("PerMessage-Deflate"),
        );
        strip_deflate(&mut h);
        assert_eq!(
            h.get_all("sec-websocket-extensions")
                .iter()
                .collect::<Vec<_>>(),
            ["x-webkit-deflate-frame"]
        );
        let mut only = headers(&[("sec-websocket-extensions", "permessage-deflate")]);
        strip_deflate(&mut only);
        assert!(only.is_empty());
    }

    #[test]
    fn valid_handshakes_pass() {
        let h1 = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]);
        assert_eq!(check_handshake(&h1, false), Ok(()));
        let h2 = headers(&[("sec-websocket-version", "13")]);
        assert_eq!(check_handshake(&h2, true), Ok(()));
    }

    #[test]
    fn each_bad_handshake_names_its_header() {
        let base = [
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ];
        // (header to drop, header to add instead, what the reason must mention)
        type Case = (usize, Option<(&'static str, &'static str)>, &'static str);
        let cases: [Case; 4] = [
            (0, Some(("connection", "keep-alive")), "Connection"),
            (1, None, "missing Sec-WebSocket-Key"),
            (1, Some(("sec-websocket-key", "short")), "Sec-WebSocket-Key"),
            (2, None, "missing Sec-WebSocket-Version"),
        ];
        for (skip, replace, expected) in cases {
            let mut h = HeaderMap::new();
            for (i, (k, v)) in base.iter().enumerate() {
                if i != skip {
                    h.append(*k, HeaderValue::from_static(v));
                }
            }
            if let Some((k, v)) = replace {
                h.append(k, HeaderValue::from_static(v));
            }
            let err = check_handshake(&h, false).expect_err("handshake is bad");
            let HandshakeError::Bad(err) = err else {
                panic!("{err:?} should be a 400");
            };
            assert!(err.contains(expected), "{err:?} should mention {expected}");
        }
    }

    #[test]
    fn other_versions_get_426() {
        let h = headers(&[("sec-websocket-version", "12")]);
        assert_eq!(
            check_handshake(&h, true),
            Err(HandshakeError::Version("12".into()))
        );
    }
}
