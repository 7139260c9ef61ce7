//! The upstream connector: a pooled HTTP/1.1 client per route, and the classification of its
//! errors into what the client is told (refused 502, timeout 504).

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::proxy::body::UpstreamBody;
use crate::proxy::error::ProxyError;
use crate::router::Route;

pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

/// A pooled keep-alive client; idle connections are closed after 90 s, as most servers do.
pub fn client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// How a backend request failed, as far as the client's answer is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing listens (ECONNREFUSED): safe to try another backend.
    Refused,
    /// The TCP connect did not finish within `connect_timeout`.
    ConnectTimeout,
    /// Anything else: reset, closed before a response, malformed response, DNS.
    Other,
}

pub fn classify(error: &hyper_util::client::legacy::Error) -> Failure {
    if !error.is_connect() {
        return Failure::Other;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Failure::Refused,
                std::io::ErrorKind::TimedOut => return Failure::ConnectTimeout,
                _ => {}
            }
        }
        source = e.source();
    }
    Failure::Other
}

impl Failure {
    /// The error for the client, logged here with route and backend.
    pub fn into_error(
        self,
        route: &Route,
        backend: &http::uri::Authority,
        source: hyper_util::client::legacy::Error,
    ) -> ProxyError {
        let (route, backend) = (route.name.clone(), backend.to_string());
        match self {
            Failure::Refused => ProxyError::BackendRefused {
                route,
                backend,
                source,
            },
            Failure::ConnectTimeout => ProxyError::ConnectTimeout { route, backend },
            Failure::Other => ProxyError::BackendFailed {
                route,
                backend,
                source,
            },
        }
    }
}
