//! The facts of a request, decided once before routing: the one authoritative host (routing,
//! `Host`, `X-Forwarded-Host` and redirects all read it) and the checks on the target and the
//! framing that a route boundary relies on.

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;
use http::{Request, Uri, Version};

use super::error::ProxyError;
use crate::router::route_host;

/// What the gateway decided about a request before it looked at the route table.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// The host to route on: lowercase, no port, no trailing dot.
    pub host: Option<String>,
    /// The same host as the backend sees it in `Host` and `X-Forwarded-Host` (port kept).
    pub host_header: Option<HeaderValue>,
}

impl RequestFacts {
    /// Checks `req` and computes its host. Errors are the client's: two `Host` fields, a `Host`
    /// that disagrees with the target's authority, a dot segment in the path, a transfer coding
    /// the gateway does not implement.
    pub fn of<B>(req: &Request<B>) -> Result<RequestFacts, ProxyError> {
        check_transfer_coding(req.headers())?;
        check_path(req.uri().path())?;
        let authority = req.uri().authority();
        if authority.is_some_and(|a| a.as_str().contains('@')) {
            // RFC 9110 4.2.4: userinfo in an http(s) URI is to be treated as an error.
            return Err(ProxyError::BadRequest("request target carries userinfo"));
        }
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host_field = hosts.next();
        if hosts.next().is_some() {
            // RFC 9112 3.2: a request with more than one Host field is answered 400.
            return Err(ProxyError::BadRequest("more than one Host header"));
        }
        let host_field = match host_field {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<Authority>().ok())
                    .filter(|a| !a.as_str().contains('@'))
                    .ok_or(ProxyError::BadRequest("Host header is not a valid host"))?,
            ),
            None => None,
        };
        // RFC 9112 3.2.2 (absolute form) and RFC 9113 8.3.1 (`:authority`): when the target
        // names an authority, a Host field must name the same one.
        if let (Some(target), Some(field)) = (authority, &host_field) {
            if !same_authority(target, field, req.uri()) {
                return Err(ProxyError::BadRequest(
                    "Host header differs from the request target's authority",
                ));
            }
        }
        let chosen = authority.or(host_field.as_ref());
        let host = chosen.and_then(|a| route_host(a.as_str()));
        if host.is_none() && req.version() == Version::HTTP_11 {
            // RFC 9112 3.2: a server must answer 400 to an HTTP/1.1 request without Host.
            return Err(ProxyError::BadRequest("missing Host header"));
        }
        let host_header = chosen.and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        Ok(RequestFacts { host, host_header })
    }
}

/// Host case-insensitively (and without a trailing dot), ports equal where a missing port is
/// the scheme's default.
fn same_authority(target: &Authority, field: &Authority, uri: &Uri) -> bool {
    let host = |a: &Authority| a.host().trim_end_matches('.').to_ascii_lowercase();
    let default = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => Some(443),
        Some(s) if s.eq_ignore_ascii_case("http") => Some(80),
        _ => None,
    };
    let port = |a: &Authority| a.port_u16().or(default);
    host(target) == host(field) && port(target) == port(field)
}

/// RFC 9112 6.1 and 7: `chunked` is the only transfer coding the gateway implements, and it may
/// be applied once. hyper frames any request whose last coding is `chunked` as chunked, so
/// `gzip, chunked` or `chunked, chunked` reach us: answer those 501, before the body is read.
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ProxyError::UnsupportedTransferCoding),
    }
}

/// Refuses `.` and `..` segments, also percent-encoded (`%2e%2e`, `%2E.`) and hidden behind an
/// encoded slash or backslash (`..%2f`). A route's path prefix is a boundary: the backend
/// (or anything behind it) would resolve `/public/../private` to a path outside the route that
/// matched it. Browsers resolve dot segments before they send, so nothing legitimate is lost.
pub fn check_path(path: &str) -> Result<(), ProxyError> {
    for segment in path.split('/') {
        if is_dot_segment(segment) {
            return Err(ProxyError::BadRequest("dot segment in the request path"));
        }
        if segment.contains('%') {
            let decoded = decode_separators(segment);
            if decoded.split(['/', '\\']).any(is_dot_segment) {
                return Err(ProxyError::BadRequest("dot segment in the request path"));
            }
        }
    }
    Ok(())
}

fn is_dot_segment(segment: &str) -> bool {
    matches!(
        segment.to_ascii_lowercase().as_str(),
        "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."
    )
}

/// Decodes `%2e`, `%2f` and `%5c` (any case), leaving every other escape as it is.
fn decode_separators(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let escape = rest.get(i..i + 3).map(str::to_ascii_lowercase);
        match escape.as_deref() {
            Some("%2e") => out.push('.'),
            Some("%2f") => out.push('/'),
            Some("%5c") => out.push('\\'),
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(req: http::request::Builder) -> Result<RequestFacts, ProxyError> {
        RequestFacts::of(&req.body(()).expect("valid request"))
    }

    #[test]
    fn authority_and_host_must_agree() {
        let ok = facts(
            Request::get("http://A.example/x")
                .header("host", "a.example:80")
                .version(Version::HTTP_11),
        )
        .expect("same authority");
        assert_eq!(ok.host.as_deref(), Some("a.example"));
        assert_eq!(
            ok.host_header.as_ref().map(|v| v.as_bytes()),
            Some(&b"A.example"[..])
        );
        let err = facts(Request::get("http://a.example/x").header("host", "b.example"));
        assert!(matches!(err, Err(ProxyError::BadRequest(_))), "{err:?}");
        let err = facts(Request::get("https://a.example:8443/x").header("host", "a.example"));
        assert!(matches!(err, Err(ProxyError::BadRequest(_))), "{err:?}");
        let err = facts(
            Request::get("/x")
                .header("host", "a.example")
                .header("host", "a.example"),
        );
        assert!(matches!(err, Err(ProxyError::BadRequest(_))), "{err:?}");
        let err = facts(Request::get("http://u@a.example/x"));
        assert!(matches!(err, Err(ProxyError::BadRequest(_))), "{err:?}");
        let missing = facts(Request::get("/x"));
        assert!(matches!(missing, Err(ProxyError::BadRequest(_))));
        let h2 = facts(Request::get("/x").version(Version::HTTP_2)).expect("h2 without host");
        assert_eq!(h2.host, None);
    }

    #[test]
    fn host_field_alone_keeps_its_port() {
        let f = facts(Request::get("/x").header("host", "Chat.Example.com:8443")).expect("ok");
        assert_eq!(f.host.as_deref(), Some("chat.example.com"));
        assert_eq!(
            f.host_header.as_ref().map(|v| v.as_bytes()),
            Some(&b"Chat.Example.com:8443"[..])
        );
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for path in [
            "/public/../private",
            "/public/./x",
            "/public/%2e%2e/private",
            "/public/%2E./private",
            "/public/.%2E/private",
            "/public/%2e",
            "/public/..%2fprivate",
            "/public/..%5Cprivate",
            "/public/x%2F..%2Fy",
            "/..",
        ] {
            assert!(check_path(path).is_err(), "{path}");
        }
        for path in [
            "/",
            "/public/a.b",
            "/public/...",
            "/public/..x",
            "/public/.well-known/x",
            "/api/group%2Fproject",
            "/a%2e%2eb",
            "/100%",
        ] {
            assert!(check_path(path).is_ok(), "{path}");
        }
    }

    #[test]
    fn only_a_single_chunked_coding_is_implemented() {
        let te = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            check_transfer_coding(&h)
        };
        assert!(te(&[]).is_ok());
        assert!(te(&["chunked"]).is_ok());
        assert!(te(&["Chunked"]).is_ok());
        for bad in [
            &["cow, chunked"][..],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["gzip", "chunked"],
            &["cow"],
        ] {
            assert!(
                matches!(te(bad), Err(ProxyError::UnsupportedTransferCoding)),
                "{bad:?}"
            );
        }
    }
}
