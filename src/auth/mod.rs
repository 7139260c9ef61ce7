//! Edge access control (issue 14): who may use a route. Client certificates (mTLS) arrive with
//! the connection ([`ClientCert`]); a route's `[route.auth]` ([`RouteAuth`]) checks a JWT
//! ([`jwt`], keys from [`jwks`]) found where browsers can put one, and asks a forward-auth
//! service ([`forward`]), after routing and rate limits and before any backend is contacted.

pub mod forward;
pub mod jwks;
pub mod jwt;

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use prometheus_client::metrics::counter::Counter;

use crate::config::{AuthConfig, JwksSource, TokenSource};
use crate::drain::Drain;
use crate::metrics::{AuthLabels, Metrics};
use crate::proxy::error::ProxyError;
use forward::{Answer, Asked, ForwardAuth};
use jwks::{KeySet, UrlKeys};
use jwt::Refusal;

pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const SEC_WEBSOCKET_PROTOCOL: HeaderName = HeaderName::from_static("sec-websocket-protocol");

/// A client certificate the TLS listener verified against `listen.client_ca`.
#[derive(Debug)]
pub struct ClientCert {
    /// `X-Forwarded-Client-Cert` as Envoy writes it: `Hash=…;Subject="…";URI=…;DNS=…`.
    pub xfcc: HeaderValue,
    pub subject: String,
}

impl ClientCert {
    /// Describes the leaf certificate; None if it cannot be parsed (rustls verified it, so
    /// it can).
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let hash = ring::digest::digest(&ring::digest::SHA256, der);
        let mut text = String::from("Hash=");
        for b in hash.as_ref() {
            text.push_str(&format!("{b:02x}"));
        }
        let subject = cert.subject().to_string();
        let quoted = subject.replace('\\', "\\\\").replace('"', "\\\"");
        text.push_str(&format!(";Subject=\"{quoted}\""));
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => text.push_str(&format!(";URI={u}")),
                    GeneralName::DNSName(d) => text.push_str(&format!(";DNS={d}")),
                    _ => {}
                }
            }
        }
        Some(ClientCert {
            xfcc: HeaderValue::from_str(&text).ok()?,
            subject,
        })
    }
}

/// Sets `X-Forwarded-Client-Cert` from the verified client certificate; a client-sent one is
/// always removed.
pub fn set_client_cert(headers: &mut HeaderMap, cert: Option<&ClientCert>) {
    headers.remove(X_FORWARDED_CLIENT_CERT);
    if let Some(c) = cert {
        headers.insert(X_FORWARDED_CLIENT_CERT, c.xfcc.clone());
    }
}

/// When the token a request was let in with expires: WebSockets and event streams opened
/// with it end then (`end_at_expiry`). Carried in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct TokenExpiry(pub Instant);

/// Where the keys of a route come from, ready to use.
enum Keys {
    File(Arc<KeySet>),
    Url(Arc<UrlKeys>),
}

/// The outcomes counted in `streamgate_auth_total{route,result}`.
const RESULTS: [&str; 7] = [
    "allowed",
    "missing",
    "invalid",
    "expired",
    "forbidden",
    "forward_denied",
    "forward_error",
];

/// A route's `[route.auth]` with its state: keys, the auth service's pool, counters.
pub struct RouteAuth {
    pub config: AuthConfig,
    keys: Option<Keys>,
    /// The claim checks of `config.jwt`, built once.
    checks: Option<jwt::Checks>,
    forward: Option<ForwardAuth>,
    counters: [Counter; RESULTS.len()],
}

/// What the check decided, when the request may not simply go on.
pub enum Verdict {
    /// Go on; the token expires then (when `end_at_expiry`).
    Pass(Option<Instant>),
    /// The auth service's own answer, for the client.
    Answer(Response<bytes::Bytes>),
}

impl RouteAuth {
    /// The auth state for `config`, keeping the fetched keys of `previous` (the same route
    /// before a reload) when the URL did not change.
    pub fn new(
        config: &AuthConfig,
        route: &str,
        metrics: &Metrics,
        previous: Option<&RouteAuth>,
    ) -> RouteAuth {
        let keys = config.jwt.as_ref().map(|j| match &j.keys {
            JwksSource::File { set, .. } => {
                // Validation built this very set once already.
                Keys::File(Arc::new(KeySet::new(set).unwrap_or_default()))
            }
            JwksSource::Url(url) => match previous.and_then(|p| p.keys.as_ref()) {
                Some(Keys::Url(old)) if old.url == *url => Keys::Url(old.clone()),
                _ => Keys::Url(Arc::new(UrlKeys::new(url.clone()))),
            },
        });
        RouteAuth {
            config: config.clone(),
            keys,
            checks: config.jwt.as_ref().map(jwt::Checks::new),
            forward: config.forward_auth.as_ref().map(ForwardAuth::new),
            counters: RESULTS.map(|result| {
                metrics.auth.get_or_create_owned(&AuthLabels {
                    route: route.to_string(),
                    result,
                })
            }),
        }
    }

    /// Starts fetching a JWKS URL (at start-up and after a reload; once per set).
    pub fn start(&self, drain: &Drain) {
        if let Some(Keys::Url(keys)) = &self.keys {
            keys.start(drain);
        }
    }

    /// The request target as the access log may show it: without a query token.
    pub fn log_target(&self, uri: &Uri) -> Uri {
        let mut uri = uri.clone();
        for source in &self.config.token_from {
            if let TokenSource::Query(name) = source {
                if let Some((_, without)) = without_query(&uri, name) {
                    uri = without;
                }
            }
        }
        uri
    }

    fn count(&self, result: &'static str) -> &'static str {
        if let Some(i) = RESULTS.iter().position(|r| *r == result) {
            self.counters[i].inc();
        }
        result
    }

    /// Checks `req` on route `route`: tokens and headers the gateway manages are taken out of
    /// it, claims and the auth service's headers put in. `outcome` learns the result for the
    /// access log.
    pub async fn check<B>(
        &self,
        req: &mut Request<B>,
        route: &str,
        conn: &crate::proxy::ConnInfo,
        host: Option<&HeaderValue>,
        outcome: &mut Option<&'static str>,
    ) -> Result<Verdict, ProxyError> {
        let c = &self.config;
        for name in c.managed_headers() {
            req.headers_mut().remove(name);
        }
        let token = take_token(req, &c.token_from);
        let mut expires = None;
        if let (Some(jwt), Some(keys), Some(checks)) = (&c.jwt, &self.keys, &self.checks) {
            let Some(token) = token else {
                *outcome = Some(self.count("missing"));
                return Err(ProxyError::TokenMissing {
                    route: route.to_string(),
                });
            };
            let set = match keys {
                Keys::File(set) => set.clone(),
                Keys::Url(url) => {
                    let kid = jsonwebtoken::decode_header(&token).ok().and_then(|h| h.kid);
                    url.keys_for(kid.as_deref()).await
                }
            };
            let verified = jwt::verify(&token, &set, checks).map_err(|refusal| {
                let route = route.to_string();
                match refusal {
                    Refusal::Invalid(reason) => {
                        *outcome = Some(self.count("invalid"));
                        ProxyError::TokenInvalid { route, reason }
                    }
                    Refusal::Expired => {
                        *outcome = Some(self.count("expired"));
                        ProxyError::TokenExpired { route }
                    }
                    Refusal::Forbidden(reason) => {
                        *outcome = Some(self.count("forbidden"));
                        ProxyError::TokenForbidden { route, reason }
                    }
                }
            })?;
            for (claim, name) in &c.claims_to_headers {
                let value = verified.claims.get(claim).map(jwt::claim_text);
                if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    req.headers_mut().insert(name.clone(), v);
                }
            }
            if c.end_at_expiry {
                expires = verified
                    .exp
                    .map(|exp| Instant::now() + jwt::until(exp, jwt.leeway));
            }
        }
        if let Some(forward) = &self.forward {
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let asked = Asked {
                method: req.method(),
                uri: target,
                headers: req.headers(),
                host,
                tls: conn.tls,
                client: conn.client,
            };
            match forward.check(asked).await {
                Ok(Answer::Allow(headers)) => {
                    for (name, value) in headers {
                        req.headers_mut().insert(name, value);
                    }
                }
                Ok(Answer::Deny(response)) => {
                    *outcome = Some(self.count("forward_denied"));
                    return Ok(Verdict::Answer(response));
                }
                Err(e) => {
                    *outcome = Some(self.count("forward_error"));
                    return Err(ProxyError::AuthUnavailable {
                        route: route.to_string(),
                        source: Box::new(e),
                    });
                }
            }
        }
        *outcome = Some(self.count("allowed"));
        Ok(Verdict::Pass(expires))
    }
}

/// Counts a request refused for want of a client certificate (`require_client_cert`).
pub fn count_forbidden(metrics: &Metrics, route: &str) {
    metrics
        .auth
        .get_or_create(&AuthLabels {
            route: route.to_string(),
            result: "forbidden",
        })
        .inc();
}

/// The first token found in the configured places. Every query parameter and subprotocol
/// entry that could carry one is removed, used or not, so no token reaches the backend or the
/// access log that way.
fn take_token<B>(req: &mut Request<B>, sources: &[TokenSource]) -> Option<String> {
    let mut found = None;
    for source in sources {
        let token = match source {
            TokenSource::Header(name) => header_token(req.headers(), name),
            TokenSource::Cookie(name) => cookie(req.headers(), name),
            TokenSource::Query(name) => take_query(req, name),
            TokenSource::Protocol(prefix) => take_protocol(req.headers_mut(), prefix),
        };
        if found.is_none() {
            found = token.filter(|t| !t.is_empty());
        }
    }
    found
}

/// `Authorization: Bearer …` (the scheme is case-insensitive, RFC 9110 11.1); another header
/// as it is, with a `Bearer ` taken off if present.
fn header_token(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    let bearer = value
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("bearer "))
        .map(|_| value[7..].trim());
    match bearer {
        Some(t) => Some(t.to_string()),
        None if name == header::AUTHORIZATION => None,
        None => Some(value.to_string()),
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// Takes `name` out of the request target and returns its value.
fn take_query<B>(req: &mut Request<B>, name: &str) -> Option<String> {
    let (found, uri) = without_query(req.uri(), name)?;
    *req.uri_mut() = uri;
    Some(found)
}

/// The first value of query parameter `name`, and `uri` with every `name` removed; None when
/// the query has no `name`.
fn without_query(uri: &Uri, name: &str) -> Option<(String, Uri)> {
    let query = uri.query()?;
    let mut found = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == name {
                if found.is_none() {
                    found = Some(v.to_string());
                }
                false
            } else {
                true
            }
        })
        .collect();
    let found = found?;
    let path = uri.path();
    let target = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = target.parse().ok();
    match Uri::from_parts(parts) {
        Ok(uri) => Some((found, uri)),
        Err(_) => Some((found, uri.clone())),
    }
}

/// Takes the `Sec-WebSocket-Protocol` entries starting with `prefix` out of the offer and
/// returns what follows the prefix in the first.
fn take_protocol(headers: &mut HeaderMap, prefix: &str) -> Option<String> {
    if !headers.contains_key(&SEC_WEBSOCKET_PROTOCOL) {
        return None;
    }
    let mut found = None;
    let mut kept = Vec::new();
    for entry in headers
        .get_all(&SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        match entry.strip_prefix(prefix) {
            Some(token) => {
                if found.is_none() {
                    found = Some(token.to_string());
                }
            }
            None => kept.push(entry.to_string()),
        }
    }
    found.as_ref()?;
    headers.remove(&SEC_WEBSOCKET_PROTOCOL);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            headers.insert(SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut r = Request::get(target).body(()).expect("request");
        for (k, v) in headers {
            r.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        r
    }

    #[test]
    fn tokens_are_found_in_order_and_taken_out() {
        let sources = [
            TokenSource::Header(header::AUTHORIZATION),
            TokenSource::Cookie("access_token".into()),
            TokenSource::Query("access_token".into()),
            TokenSource::Protocol("bearer.".into()),
        ];
        let mut r = request(
            "/ws?a=1&access_token=Q&b=2",
            &[
                ("cookie", "x=1; access_token=C"),
                ("sec-websocket-protocol", "chat, bearer.P"),
            ],
        );
        assert_eq!(take_token(&mut r, &sources).as_deref(), Some("C"));
        assert_eq!(r.uri().to_string(), "/ws?a=1&b=2");
        assert_eq!(r.headers()["sec-websocket-protocol"], "chat");

        let mut r = request("/ws?access_token=Q", &[("authorization", "Basic eA==")]);
        assert_eq!(take_token(&mut r, &sources).as_deref(), Some("Q"));
        assert_eq!(r.uri().to_string(), "/ws");

        let mut r = request("/", &[("sec-websocket-protocol", "bearer.P")]);
        assert_eq!(take_token(&mut r, &sources).as_deref(), Some("P"));
        assert!(!r.headers().contains_key("sec-websocket-protocol"));

        let mut r = request("/", &[("authorization", "bearer  H ")]);
        assert_eq!(take_token(&mut r, &sources).as_deref(), Some("H"));
    }
}
