//! Forward auth: before a request is forwarded (or upgraded), a `GET` to the route's auth
//! service says yes (2xx, with headers to copy onto the request) or answers the client itself.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::ForwardAuthConfig;
use crate::proxy::headers::{
    remove_hop_by_hop, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};

/// The whole exchange with the auth service: connect, answer and body.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer body passed on to a refused client.
const MAX_BODY: usize = 64 * 1024;

const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");

/// One route's auth service, with a keep-alive pool of its own.
pub struct ForwardAuth {
    client: Client<HttpConnector, Empty<Bytes>>,
    url: Uri,
    copy_headers: Vec<HeaderName>,
}

/// What the auth service said.
pub enum Answer {
    /// 2xx: the listed headers of its answer, to set on the request.
    Allow(Vec<(HeaderName, HeaderValue)>),
    /// Anything else, passed to the client as it is.
    Deny(Response<Bytes>),
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("auth service unreachable")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    #[error("auth service answer broke off or was too large")]
    Body,
    #[error("auth service did not answer within {}s", TIMEOUT.as_secs())]
    Timeout,
}

/// What the auth service is told about the request.
pub struct Asked<'a> {
    pub method: &'a http::Method,
    /// Path and query, as forwarded (a query token already removed).
    pub uri: &'a str,
    pub headers: &'a HeaderMap,
    pub host: Option<&'a HeaderValue>,
    pub tls: bool,
    pub client: std::net::IpAddr,
}

impl ForwardAuth {
    pub fn new(config: &ForwardAuthConfig) -> ForwardAuth {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        connector.set_nodelay(true);
        ForwardAuth {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector),
            url: config.url.clone(),
            copy_headers: config.copy_headers.clone(),
        }
    }

    pub async fn check(&self, asked: Asked<'_>) -> Result<Answer, ForwardError> {
        match tokio::time::timeout(TIMEOUT, self.exchange(asked)).await {
            Ok(r) => r,
            Err(_) => Err(ForwardError::Timeout),
        }
    }

    async fn exchange(&self, asked: Asked<'_>) -> Result<Answer, ForwardError> {
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.uri_mut() = self.url.clone();
        let h = req.headers_mut();
        for name in [header::AUTHORIZATION, header::COOKIE] {
            for v in asked.headers.get_all(&name) {
                h.append(name.clone(), v.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(asked.method.as_str()) {
            h.insert(X_FORWARDED_METHOD, v);
        }
        h.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if asked.tls { "https" } else { "http" }),
        );
        if let Some(host) = asked.host {
            h.insert(X_FORWARDED_HOST, host.clone());
        }
        if let Ok(v) = HeaderValue::from_str(asked.uri) {
            h.insert(X_FORWARDED_URI, v);
        }
        if let Ok(v) = HeaderValue::from_str(&asked.client.to_canonical().to_string()) {
            h.insert(X_FORWARDED_FOR, v);
        }
        let response = self
            .client
            .request(req)
            .await
            .map_err(ForwardError::Unreachable)?;
        if response.status().is_success() {
            let copied = self
                .copy_headers
                .iter()
                .filter_map(|n| Some((n.clone(), response.headers().get(n)?.clone())))
                .collect();
            // Read the (small) body so the connection goes back to the pool.
            let _ = Limited::new(response.into_body(), MAX_BODY).collect().await;
            return Ok(Answer::Allow(copied));
        }
        let (mut parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|_| ForwardError::Body)?
            .to_bytes();
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Answer::Deny(Response::from_parts(parts, body)))
    }
}
