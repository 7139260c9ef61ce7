//! What can go wrong with one request, and the single place that maps it to an HTTP status.

use http::StatusCode;

use super::body::BoxError;

/// A request the gateway answers itself. Display is the one-line reason that goes into the
/// response body: it names the route and the kind of failure, never a backend's address or an
/// error chain (those go to the log, see [`ProxyError::backend`] and `source()`).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// RFC 9112 6.1: a transfer coding other than one `chunked`.
    #[error("transfer coding not implemented: only chunked is")]
    UnsupportedTransferCoding,
    /// The client's body broke off or was malformed (a bad chunk size) while it went to the
    /// backend: the client's fault, whatever the backend then saw.
    #[error("route {route}: request body is malformed or incomplete")]
    BadRequestBody {
        route: String,
        backend: String,
        #[source]
        source: BoxError,
    },
    #[error("method {0} is not supported: streamgate is not a forward proxy")]
    MethodNotAllowed(http::Method),
    #[error("route {route}: backend refused the connection")]
    BackendRefused {
        route: String,
        backend: String,
        #[source]
        source: BoxError,
    },
    #[error("route {route}: backend failed before answering")]
    BackendFailed {
        route: String,
        backend: String,
        #[source]
        source: BoxError,
    },
    #[error("route {route}: backend did not accept a connection in time")]
    ConnectTimeout { route: String, backend: String },
    #[error("route {route}: backend sent no response head in time")]
    ResponseTimeout { route: String, backend: String },
    #[error("route {route}: no backend available")]
    NoBackend { route: String },
    #[error("route {route}: too many requests, try again in {retry_after}s")]
    RateLimited { route: String, retry_after: u64 },
    /// `max_new_streams_per_second`: a reconnect storm is held back at the gateway.
    #[error(
        "route {route}: too many new WebSockets and event streams, try again in {retry_after}s"
    )]
    StreamsLimited { route: String, retry_after: u64 },
    #[error("route {route}: bad WebSocket handshake: {reason}")]
    BadHandshake { route: String, reason: String },
    #[error("route {route}: Origin {origin:?} is not in websocket.allowed_origins")]
    OriginForbidden { route: String, origin: String },
    /// RFC 6455 4.4: answered 426 with the version the gateway speaks.
    #[error("route {route}: Sec-WebSocket-Version must be 13, got {version:?}")]
    UnsupportedWebSocketVersion { route: String, version: String },
    #[error("route {route}: websocket.max_connections reached")]
    RouteFull { route: String },
    #[error("route {route}: backend broke the WebSocket handshake")]
    BadUpstreamHandshake {
        route: String,
        backend: String,
        reason: String,
    },
    /// `[route.auth]`: no token in any `token_from` place (401, `WWW-Authenticate: Bearer`).
    #[error("route {route}: a token is required")]
    TokenMissing { route: String },
    #[error("route {route}: invalid token: {reason}")]
    TokenInvalid { route: String, reason: &'static str },
    #[error("route {route}: the token has expired")]
    TokenExpired { route: String },
    /// A valid token that is not for this route (`iss`, `aud`).
    #[error("route {route}: token not accepted: {reason}")]
    TokenForbidden { route: String, reason: &'static str },
    #[error("route {route}: a verified client certificate is required")]
    ClientCertRequired { route: String },
    /// The forward-auth service could not be asked.
    #[error("route {route}: auth service unavailable")]
    AuthUnavailable {
        route: String,
        #[source]
        source: BoxError,
    },
}

/// `outer: inner: innermost`, for errors whose top layer alone says little ("client error").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_)
            | ProxyError::BadHandshake { .. }
            | ProxyError::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            ProxyError::UnsupportedWebSocketVersion { .. } => StatusCode::UPGRADE_REQUIRED,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::OriginForbidden { .. }
            | ProxyError::TokenForbidden { .. }
            | ProxyError::ClientCertRequired { .. } => StatusCode::FORBIDDEN,
            ProxyError::TokenMissing { .. }
            | ProxyError::TokenInvalid { .. }
            | ProxyError::TokenExpired { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::BackendRefused { .. }
            | ProxyError::BackendFailed { .. }
            | ProxyError::BadUpstreamHandshake { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. } | ProxyError::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::RouteFull { .. }
            | ProxyError::NoBackend { .. }
            | ProxyError::StreamsLimited { .. }
            | ProxyError::AuthUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The backend involved, for the log line (never for the client).
    pub fn backend(&self) -> Option<&str> {
        match self {
            ProxyError::BackendRefused { backend, .. }
            | ProxyError::BackendFailed { backend, .. }
            | ProxyError::ConnectTimeout { backend, .. }
            | ProxyError::ResponseTimeout { backend, .. }
            | ProxyError::BadUpstreamHandshake { backend, .. }
            | ProxyError::BadRequestBody { backend, .. } => Some(backend),
            _ => None,
        }
    }

    /// What the log says beyond the client's line: the handshake reason or the error chain.
    pub fn detail(&self) -> String {
        match self {
            ProxyError::BadUpstreamHandshake { reason, .. } => reason.clone(),
            other => match std::error::Error::source(other) {
                Some(source) => error_chain(source),
                None => String::new(),
            },
        }
    }

    /// Whether the backend side failed (logged at warn) rather than the client (logged at
    /// debug): a 501 for a transfer coding is the client's doing, though it is a 5xx.
    pub fn is_upstream(&self) -> bool {
        self.status().is_server_error() && !matches!(self, ProxyError::UnsupportedTransferCoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> BoxError {
        Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn each_error_maps_to_its_status() {
        let route = || "r".to_string();
        let cases = [
            (
                ProxyError::NoRoute {
                    host: "h".into(),
                    path: "/".into(),
                },
                404,
            ),
            (ProxyError::BadRequest("no host"), 400),
            (
                ProxyError::BadHandshake {
                    route: route(),
                    reason: "x".into(),
                },
                400,
            ),
            (ProxyError::MethodNotAllowed(http::Method::CONNECT), 405),
            (
                ProxyError::OriginForbidden {
                    route: route(),
                    origin: "o".into(),
                },
                403,
            ),
            (
                ProxyError::BackendRefused {
                    route: route(),
                    backend: "b".into(),
                    source: refused(),
                },
                502,
            ),
            (
                ProxyError::ConnectTimeout {
                    route: route(),
                    backend: "b".into(),
                },
                504,
            ),
            (
                ProxyError::ResponseTimeout {
                    route: route(),
                    backend: "b".into(),
                },
                504,
            ),
            (ProxyError::RouteFull { route: route() }, 503),
            (ProxyError::UnsupportedTransferCoding, 501),
            (
                ProxyError::BadRequestBody {
                    route: route(),
                    backend: "b".into(),
                    source: refused(),
                },
                400,
            ),
            (
                ProxyError::UnsupportedWebSocketVersion {
                    route: route(),
                    version: "12".into(),
                },
                426,
            ),
            (ProxyError::NoBackend { route: route() }, 503),
            (
                ProxyError::RateLimited {
                    route: route(),
                    retry_after: 1,
                },
                429,
            ),
            (
                ProxyError::StreamsLimited {
                    route: route(),
                    retry_after: 1,
                },
                503,
            ),
            (ProxyError::TokenMissing { route: route() }, 401),
            (
                ProxyError::TokenInvalid {
                    route: route(),
                    reason: "bad signature",
                },
                401,
            ),
            (ProxyError::TokenExpired { route: route() }, 401),
            (
                ProxyError::TokenForbidden {
                    route: route(),
                    reason: "wrong audience",
                },
                403,
            ),
            (ProxyError::ClientCertRequired { route: route() }, 403),
            (
                ProxyError::AuthUnavailable {
                    route: route(),
                    source: refused(),
                },
                503,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            // The client's line never carries the backend's address.
            assert!(!error.to_string().contains("\"b\""), "{error}");
            if let Some(b) = error.backend() {
                assert!(!error.to_string().contains(&format!(" {b} ")), "{error}");
            }
            // Nor its error chain: that is the log's.
            if let Some(source) = std::error::Error::source(&error) {
                assert!(!error.to_string().contains(&source.to_string()), "{error}");
                assert!(error.detail().contains(&source.to_string()), "{error}");
            }
        }
    }
}
