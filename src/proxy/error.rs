//! What can go wrong with one request, and the single place that maps it to an HTTP status.

use http::StatusCode;

/// A request the gateway answers itself. Display is the one-line reason that goes into the
/// response body and the log, naming the route and backend where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("method {0} is not supported: streamgate is not a forward proxy")]
    MethodNotAllowed(http::Method),
    #[error("route {route}: backend {backend} refused the connection")]
    BackendRefused {
        route: String,
        backend: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("route {route}: backend {backend} failed: {}", error_chain(source))]
    BackendFailed {
        route: String,
        backend: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("route {route}: backend {backend} did not accept a connection in time")]
    ConnectTimeout { route: String, backend: String },
    #[error("route {route}: backend {backend} sent no response head in time")]
    ResponseTimeout { route: String, backend: String },
    #[error("route {route}: bad WebSocket handshake: {reason}")]
    BadHandshake { route: String, reason: String },
    #[error("route {route}: Origin {origin:?} is not in websocket.allowed_origins")]
    OriginForbidden { route: String, origin: String },
    #[error("route {route}: websocket.max_connections reached")]
    RouteFull { route: String },
    #[error("route {route}: backend {backend} broke the WebSocket handshake: {reason}")]
    BadUpstreamHandshake {
        route: String,
        backend: String,
        reason: String,
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
            ProxyError::BadRequest(_) | ProxyError::BadHandshake { .. } => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::OriginForbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::BackendRefused { .. }
            | ProxyError::BackendFailed { .. }
            | ProxyError::BadUpstreamHandshake { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. } | ProxyError::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::RouteFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether the backend side failed (logged at warn) rather than the client (logged at info).
    pub fn is_upstream(&self) -> bool {
        self.status().is_server_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> hyper_util::client::legacy::Error {
        // A real connect error: nothing listens on a port we just released.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let addr = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                l.local_addr().expect("addr")
            };
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let uri: http::Uri = format!("http://{addr}/").parse().expect("uri");
            client.get(uri).await.expect_err("nothing listens")
        })
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
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
        }
    }
}
