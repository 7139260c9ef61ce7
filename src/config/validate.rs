//! Checks on values and between keys: addresses, numbers and durations in range, origins,
//! listeners that would clash, routes that repeat, and route hosts no certificate covers.

use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawAcme, RawListen, RawRateLimit, RawRoute, Text};
use super::{
    AcmeChallenge, AcmeConfig, Config, ConfigError, HostMatch, Listen, Located, RateKey,
    RateLimitConfig, RouteConfig,
};

/// Let's Encrypt's production directory: `acme.directory` when the key is left out.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// `acme.cache` when the key is left out.
pub const ACME_CACHE: &str = "/var/lib/streamgate/acme";

/// The longest duration any key accepts. Far beyond any sensible timeout, and far below what
/// overflows when added to an `Instant` (humantime parses "300000000000y" without complaint).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// `[log]` and `listen.control_socket`.
impl Located<'_> {
    pub(super) fn log(&self, raw: &super::raw::RawLog) -> Result<super::LogConfig, ConfigError> {
        use super::{AccessTarget, LogFormat};
        let access = match &raw.access {
            None => AccessTarget::Stderr,
            Some(v) => match v.get_ref().as_str() {
                "stderr" => AccessTarget::Stderr,
                "stdout" => AccessTarget::Stdout,
                "off" => AccessTarget::Off,
                "" => return Err(self.error(
                    v.span(),
                    "log.access: expected \"stderr\", \"stdout\", \"off\" or a file path, got \"\"",
                )),
                path => AccessTarget::File(std::path::PathBuf::from(path)),
            },
        };
        let format = match &raw.format {
            None => None,
            Some(v) => Some(match v.get_ref().as_str() {
                "json" => LogFormat::Json,
                "pretty" => LogFormat::Pretty,
                other => {
                    return Err(self.error(
                        v.span(),
                        format!("log.format: expected \"json\" or \"pretty\", got {other:?}"),
                    ))
                }
            }),
        };
        Ok(super::LogConfig {
            access,
            format,
            query: raw.query.as_ref().is_some_and(|q| *q.get_ref()),
        })
    }

    /// A path, or `"off"`; left out, the default path (see [`crate::control::default_path`]).
    pub(super) fn control_socket(
        &self,
        raw: &Option<Text>,
    ) -> Result<super::ControlSocket, ConfigError> {
        use super::ControlSocket;
        let Some(v) = raw else {
            return Ok(match std::env::var_os(crate::control::SOCKET_ENV) {
                Some(path) if !path.is_empty() => ControlSocket::At(path.into()),
                _ => ControlSocket::Default(crate::control::default_path()),
            });
        };
        match v.get_ref().as_str() {
            "off" => Ok(ControlSocket::Off),
            "" => Err(self.error(
                v.span(),
                "listen.control_socket: expected a path or \"off\", got \"\"",
            )),
            path => Ok(ControlSocket::At(path.into())),
        }
    }
}

impl Located<'_> {
    /// `listen.trusted_proxies`: networks (`10.0.0.0/8`) or single addresses.
    pub(super) fn trusted_proxies(
        &self,
        raw: &RawListen,
    ) -> Result<crate::trust::TrustedProxies, ConfigError> {
        let Some(list) = &raw.trusted_proxies else {
            return Ok(Default::default());
        };
        let nets = list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = v.get_ref().trim();
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        self.error(
                            v.span(),
                            format!(
                                "listen.trusted_proxies[{i}]: expected a network such as \"10.0.0.0/8\" or an address, got {s:?}"
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::trust::TrustedProxies::new(nets))
    }

    /// `[acme]`. Reads nothing and contacts no one: `check` stays offline.
    pub(super) fn acme(
        &self,
        raw: &Spanned<RawAcme>,
        listen: &Listen,
        no_certs: bool,
        routes: &[RouteConfig],
    ) -> Result<AcmeConfig, ConfigError> {
        let a = raw.get_ref();
        let directory = match &a.directory {
            None => LETS_ENCRYPT.to_string(),
            Some(d) => {
                let uri: Option<http::Uri> = d.get_ref().parse().ok();
                let https = uri.as_ref().is_some_and(|u| {
                    u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty())
                });
                if !https {
                    return Err(self.error(
                        d.span(),
                        format!(
                            "acme.directory: expected an https URL such as \"{LETS_ENCRYPT}\", got {:?}",
                            d.get_ref()
                        ),
                    ));
                }
                d.get_ref().clone()
            }
        };
        let email = match &a.email {
            None => None,
            Some(e) => {
                let v = e.get_ref().trim();
                let valid = v.split_once('@').is_some_and(|(user, domain)| {
                    !user.is_empty() && domain.contains('.') && !v.contains([' ', ',', '<', '>'])
                });
                if !valid {
                    return Err(self.error(
                        e.span(),
                        format!(
                            "acme.email: expected an address such as \"ops@example.com\", got {:?}",
                            e.get_ref()
                        ),
                    ));
                }
                Some(v.to_string())
            }
        };
        let domains = match &a.domains {
            None => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, d)| {
                        acme_name(d.get_ref()).map_err(|why| {
                            self.error(
                                d.span(),
                                format!("acme.domains[{i}]: {why}, got {:?}", d.get_ref()),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        // The CA's tls-alpn-01 validation connects without a client certificate: a listener
        // that requires one would refuse it.
        let requires_client_cert = listen
            .client_ca
            .as_ref()
            .is_some_and(|ca| ca.auth == super::ClientAuth::Required);
        let required_refuses = |span: std::ops::Range<usize>| {
            self.error(
                span,
                "acme.challenge: \"tls-alpn-01\" cannot pass while listen.client_auth = \"required\" (the CA's validation connection has no client certificate); use challenge = \"http-01\", or client_auth = \"optional\" with require_client_cert on the routes",
            )
        };
        let challenge = match &a.challenge {
            None if requires_client_cert => return Err(required_refuses(raw.span())),
            None => AcmeChallenge::TlsAlpn01,
            Some(c) => match c.get_ref().as_str() {
                "tls-alpn-01" if requires_client_cert => return Err(required_refuses(c.span())),
                "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
                "http-01" if listen.http.is_some() => AcmeChallenge::Http01,
                "http-01" => {
                    return Err(self.error(
                        c.span(),
                        "acme.challenge: \"http-01\" needs listen.http (the CA asks on port 80 of the plain listener)",
                    ))
                }
                other => {
                    return Err(self.error(
                        c.span(),
                        format!(
                            "acme.challenge: expected \"tls-alpn-01\" or \"http-01\", got {other:?}"
                        ),
                    ))
                }
            },
        };
        let cache = match &a.cache {
            None => std::path::PathBuf::from(ACME_CACHE),
            Some(c) if c.get_ref().trim().is_empty() => {
                return Err(self.error(
                    c.span(),
                    "acme.cache: expected a directory for the account key and certificates",
                ))
            }
            Some(c) => std::path::PathBuf::from(c.get_ref()),
        };
        let (ca_roots, ca_roots_origin) = match &a.ca_roots {
            None => (None, String::new()),
            Some(r) => (
                Some(std::path::PathBuf::from(r.get_ref())),
                self.origin(r.span(), "acme.ca_roots"),
            ),
        };
        let config = AcmeConfig {
            directory,
            email,
            domains,
            cache,
            challenge,
            ca_roots,
            ca_roots_origin,
        };
        let exact_hosts = routes.iter().any(|r| matches!(r.host, HostMatch::Exact(_)));
        let usable = match &config.domains {
            Some(d) => !d.is_empty(),
            None => exact_hosts,
        };
        if no_certs && !usable {
            return Err(self.error(
                raw.span(),
                "acme: no names to certify and no [[cert]]: list them in acme.domains, give a route an exact host, or add a [[cert]]",
            ));
        }
        Ok(config)
    }

    /// `[route.rate_limit]`.
    pub(super) fn rate_limit(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &Option<RawRateLimit>,
    ) -> Result<Option<RateLimitConfig>, ConfigError> {
        let Some(r) = raw else { return Ok(None) };
        let rps = self.int(
            &key("rate_limit.requests_per_second"),
            &r.requests_per_second,
            1..=1_000_000,
        )? as u32;
        let burst = match &r.burst {
            None => rps,
            Some(b) => self.int(&key("rate_limit.burst"), b, 1..=10_000_000)? as u32,
        };
        let by = match &r.key {
            None => RateKey::ClientIp,
            Some(k) => match k.get_ref().as_str() {
                "client_ip" => RateKey::ClientIp,
                other => match other
                    .strip_prefix("header:")
                    .and_then(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
                {
                    Some(name) => RateKey::Header(name),
                    None => {
                        return Err(self.error(
                            k.span(),
                            format!(
                                "{}: expected \"client_ip\" or \"header:NAME\", got {other:?}",
                                key("rate_limit.key")
                            ),
                        ))
                    }
                },
            },
        };
        Ok(Some(RateLimitConfig {
            requests_per_second: rps,
            burst,
            key: by,
        }))
    }

    pub(super) fn addr(&self, key: &str, value: &Text) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().map_err(|_| {
            self.error(
                value.span(),
                format!(
                    "{key}: expected an address and port such as \"0.0.0.0:8443\" or \"[::]:8443\", got {:?}",
                    value.get_ref()
                ),
            )
        })
    }

    /// A duration from 0s up to [`MAX_DURATION`]: for keys where zero means "none" or "at once".
    pub(super) fn duration(&self, key: &str, value: &Text) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(value.get_ref()).map_err(|e| {
            self.error(
                value.span(),
                format!(
                    "{key}: expected a duration such as \"500ms\", \"15s\" or \"5m\", got {:?} ({e})",
                    value.get_ref()
                ),
            )
        })?;
        if d > MAX_DURATION {
            return Err(self.error(
                value.span(),
                format!("{key}: must be at most 365d, got {:?}", value.get_ref()),
            ));
        }
        Ok(d)
    }

    pub(super) fn duration_or(
        &self,
        key: &str,
        value: &Option<Text>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        value
            .as_ref()
            .map_or(Ok(default), |v| self.duration(key, v))
    }

    /// A duration that must not be zero: a zero interval would spin, a zero timeout would end
    /// every connection or request at once.
    pub(super) fn positive_duration(
        &self,
        key: &str,
        value: &Text,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(key, value)?;
        if d.is_zero() {
            return Err(self.error(value.span(), format!("{key}: must be more than 0s")));
        }
        Ok(d)
    }

    pub(super) fn positive_duration_or(
        &self,
        key: &str,
        value: &Option<Text>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        value
            .as_ref()
            .map_or(Ok(default), |v| self.positive_duration(key, v))
    }

    /// An optional interval: zero is refused with the way to switch it off instead.
    pub(super) fn interval(
        &self,
        key: &str,
        value: &Option<Text>,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(v) = value else { return Ok(None) };
        let d = self.duration(key, v)?;
        if d.is_zero() {
            return Err(self.error(
                v.span(),
                format!("{key}: must be more than 0s (leave the key out for none)"),
            ));
        }
        Ok(Some(d))
    }

    pub(super) fn int(
        &self,
        key: &str,
        value: &Spanned<i64>,
        range: RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        usize::try_from(*value.get_ref())
            .ok()
            .filter(|v| range.contains(v))
            .ok_or_else(|| {
                self.error(
                    value.span(),
                    format!(
                        "{key}: expected a whole number from {} to {}, got {}",
                        range.start(),
                        range.end(),
                        value.get_ref()
                    ),
                )
            })
    }

    pub(super) fn int_or(
        &self,
        key: &str,
        value: &Option<Spanned<i64>>,
        range: RangeInclusive<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        value
            .as_ref()
            .map_or(Ok(default), |v| self.int(key, v, range))
    }

    /// `websocket.allowed_origins`: each entry an origin as browsers send it (RFC 6454 6.1),
    /// `scheme://host[:port]`, lowercase, without the scheme's default port.
    pub(super) fn allowed_origins(
        &self,
        key: &str,
        list: &[Text],
    ) -> Result<Vec<String>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, o)| {
                origin(o.get_ref())
                    .map_err(|why| self.error(o.span(), format!("{key}[{i}]: {why}")))
            })
            .collect()
    }

    /// Two listeners on one port would fail at start-up with "address in use"; say which keys.
    pub(super) fn listen_clashes(
        &self,
        raw: &RawListen,
        listen: &Listen,
    ) -> Result<(), ConfigError> {
        let mut set: Vec<(&str, SocketAddr, Range<usize>)> =
            vec![("listen.https", listen.https, raw.https.span())];
        if let (Some(addr), Some(text)) = (listen.http, &raw.http) {
            set.push(("listen.http", addr, text.span()));
        }
        if let (Some(addr), Some(text)) = (listen.admin, &raw.admin) {
            set.push(("listen.admin", addr, text.span()));
        }
        for (i, (key, addr, span)) in set.iter().enumerate() {
            for (other, other_addr, _) in &set[..i] {
                if addr == other_addr && addr.port() != 0 {
                    return Err(self.error(
                        span.clone(),
                        format!("{key}: same address as {other} ({other_addr}); each listener needs its own"),
                    ));
                }
                if clash(*addr, *other_addr) {
                    return Err(self.error(
                        span.clone(),
                        format!("{key}: {addr} overlaps {other} ({other_addr}) on port {}; each listener needs its own port", addr.port()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Two routes with the same host and path: the router would keep only one of them.
    pub(super) fn duplicate_routes(
        &self,
        raw: &[Spanned<RawRoute>],
        routes: &[RouteConfig],
    ) -> Result<(), ConfigError> {
        for (i, r) in routes.iter().enumerate() {
            if let Some(first) = routes[..i]
                .iter()
                .find(|o| o.host == r.host && o.path == r.path)
            {
                return Err(self.error(
                    raw[i].span(),
                    format!(
                        "route[{}]: same host and path as route[{}] ({})",
                        r.index,
                        first.index,
                        r.name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Same port (not 0, which picks a free one) where one address is the other or a wildcard
/// that takes the port on every address (on Linux `[::]` takes IPv4's too).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Parses one `allowed_origins` entry; the error says what to write instead.
fn origin(s: &str) -> Result<String, String> {
    let trimmed = s.trim();
    if trimmed == "*" {
        return Err("\"*\" is not an origin (omit allowed_origins to allow any origin)".into());
    }
    let expected = |why: &str| {
        format!("expected an origin such as \"https://chat.example.com\" (scheme://host[:port]{why}), got {s:?}")
    };
    let Some((scheme, rest)) = trimmed.split_once("://") else {
        return Err(format!("{} (write \"https://{trimmed}\")", expected("")));
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return Err(expected(", with scheme http or https")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(expected(", no path"));
    }
    let authority: http::uri::Authority = rest.parse().map_err(|_| expected(""))?;
    // `Authority` parses the port lazily: "x:port" and "x:99999" parse, with no port.
    let has_port = authority.as_str().len() > authority.host().len();
    if authority.host().is_empty() || (has_port && authority.port_u16().is_none()) {
        return Err(expected(""));
    }
    let host = authority.host().to_ascii_lowercase();
    // Browsers leave the default port out of Origin, so "https://x:443" must compare as "https://x".
    Ok(match authority.port_u16() {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// A route whose host no certificate names: clients that check the name will refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UncoveredHost {
    pub route: usize,
    pub host: String,
}

impl std::fmt::Display for UncoveredHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "route[{}] host {:?} is not covered by any certificate (clients will see a name mismatch)",
            self.route, self.host
        )
    }
}

impl Config {
    /// Exact route hosts that none of `cert_names` (each certificate's DNS names, lowercase)
    /// covers, exactly or as a one-label wildcard (RFC 6125 6.4.3). Not an error: a
    /// certificate may be on its way, or clients may not check names.
    pub fn uncovered_hosts<'a>(
        &self,
        cert_names: impl IntoIterator<Item = &'a String>,
    ) -> Vec<UncoveredHost> {
        let names: Vec<&str> = cert_names.into_iter().map(String::as_str).collect();
        self.routes
            .iter()
            .filter_map(|r| match &r.host {
                HostMatch::Exact(host) => Some((r.index, host)),
                HostMatch::Any | HostMatch::Wildcard(_) => None,
            })
            .filter(|(_, host)| !names.iter().any(|n| covers(n, host)))
            .map(|(route, host)| UncoveredHost {
                route,
                host: host.clone(),
            })
            .collect()
    }
}

impl Config {
    /// The names `[acme]` obtains certificates for: `acme.domains`, else every exact route
    /// host, less those that one of `cert_names` (the `[[cert]]` files' names) covers.
    pub fn acme_names<'a>(&self, cert_names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        let Some(acme) = &self.acme else {
            return Vec::new();
        };
        let names: Vec<&str> = cert_names.into_iter().map(String::as_str).collect();
        let wanted: Vec<String> = match &acme.domains {
            Some(d) => d.clone(),
            None => self
                .routes
                .iter()
                .filter_map(|r| match &r.host {
                    HostMatch::Exact(h) => Some(h.clone()),
                    HostMatch::Any | HostMatch::Wildcard(_) => None,
                })
                .collect(),
        };
        let mut out: Vec<String> = Vec::new();
        for w in wanted {
            if !names.iter().any(|n| covers(n, &w)) && !out.contains(&w) {
                out.push(w);
            }
        }
        out
    }
}

/// An `acme.domains` entry: a DNS name (lowercase), not a wildcard and not an address.
fn acme_name(given: &str) -> Result<String, &'static str> {
    let name = given.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.starts_with("*.") {
        return Err("wildcard names need the dns-01 challenge, which streamgate does not do");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("expected a DNS name, not an address");
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err("expected a DNS name such as \"chat.example.com\"");
    }
    Ok(name)
}

/// Whether a certificate name covers `host`: equal, or `*.suffix` with exactly one label before.
fn covers(name: &str, host: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == host {
        return true;
    }
    match (name.strip_prefix("*."), host.split_once('.')) {
        (Some(suffix), Some((label, rest))) => !label.is_empty() && rest == suffix,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalised_or_refused_with_a_hint() {
        let ok = [
            ("https://Chat.Example.com/", "https://chat.example.com"),
            ("https://chat.example.com:443", "https://chat.example.com"),
            ("http://localhost:80", "http://localhost"),
            ("http://localhost:8080", "http://localhost:8080"),
            ("HTTPS://[::1]:8443", "https://[::1]:8443"),
        ];
        for (given, want) in ok {
            assert_eq!(origin(given).as_deref(), Ok(want), "{given}");
        }
        let refused = [
            ("*", "omit allowed_origins to allow any origin"),
            ("example.com", "write \"https://example.com\""),
            ("ftp://example.com", "scheme http or https"),
            ("wss://example.com", "scheme http or https"),
            ("https://example.com/app", "no path"),
            ("https://user@example.com", "no path"),
            ("https://", "got \"https://\""),
            ("https://x:99999", "got \"https://x:99999\""),
            ("null", "write"),
        ];
        for (given, hint) in refused {
            let e = origin(given).expect_err(given);
            assert!(e.contains(hint), "{given}: {e}");
        }
    }

    #[test]
    fn listeners_clash_on_one_port_unless_it_is_zero() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(clash(a("127.0.0.1:8443"), a("127.0.0.1:8443")));
        assert!(clash(a("0.0.0.0:8443"), a("127.0.0.1:8443")));
        assert!(clash(a("127.0.0.1:8443"), a("[::]:8443")));
        assert!(!clash(a("127.0.0.1:8443"), a("127.0.0.2:8443")));
        assert!(!clash(a("0.0.0.0:8443"), a("0.0.0.0:8080")));
        assert!(!clash(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

    #[test]
    fn certificate_names_cover_exact_hosts_and_one_label_under_a_wildcard() {
        assert!(covers("chat.example.com", "chat.example.com"));
        assert!(covers("Chat.Example.com", "chat.example.com"));
        assert!(covers("*.example.com", "chat.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.chat.example.com"));
        assert!(!covers("example.com", "chat.example.com"));
    }

    #[test]
    fn tls_alpn_01_is_refused_when_client_certificates_are_required() {
        let text = |auth: &str, challenge: &str| {
            format!(
                "[listen]\nhttps = \"127.0.0.1:8443\"\nhttp = \"127.0.0.1:8080\"\nclient_ca = \"ca.pem\"\nclient_auth = \"{auth}\"\n\n[[route]]\nhost = \"chat.example.com\"\nbackends = [\"http://127.0.0.1:9000\"]\n\n[acme]\n{challenge}"
            )
        };
        let parse = |t: String| Config::parse(std::path::Path::new("sg.toml"), &t);
        for challenge in ["", "challenge = \"tls-alpn-01\"\n"] {
            let e = parse(text("required", challenge))
                .expect_err(challenge)
                .to_string();
            assert!(e.contains("sg.toml:"), "{e}");
            assert!(
                e.contains("cannot pass while listen.client_auth = \"required\""),
                "{e}"
            );
            assert!(parse(text("optional", challenge)).is_ok(), "{challenge}");
        }
        assert!(parse(text("required", "challenge = \"http-01\"\n")).is_ok());
    }

    #[test]
    fn acme_is_validated_and_makes_cert_optional() {
        let base = "[listen]\nhttps = \"127.0.0.1:8443\"\n\n[[route]]\nhost = \"chat.example.com\"\nbackends = [\"http://127.0.0.1:9000\"]\n";
        let parse = |extra: &str| {
            Config::parse(std::path::Path::new("sg.toml"), &format!("{base}{extra}"))
                .map_err(|e| e.to_string())
        };
        let refused = |extra: &str| parse(extra).expect_err(extra);

        assert!(refused("").contains("no [[cert]]"), "{}", refused(""));
        let acme = parse("[acme]\n").expect("[acme] alone is a complete TLS setup");
        assert_eq!(acme.acme_names([]), vec!["chat.example.com".to_string()]);
        let covered = ["*.example.com".to_string()];
        assert!(acme.acme_names(&covered).is_empty(), "a [[cert]] covers it");
        let a = acme.acme.expect("[acme] parsed");
        assert_eq!(a.directory, LETS_ENCRYPT);
        assert_eq!(a.challenge, AcmeChallenge::TlsAlpn01);

        let cases = [
            (
                "[acme]\ndirectory = \"http://ca.test/dir\"\n",
                "sg.toml:8:13: acme.directory: expected an https URL",
            ),
            (
                "[acme]\nchallenge = \"http-01\"\n",
                "sg.toml:8:13: acme.challenge: \"http-01\" needs listen.http",
            ),
            (
                "[acme]\nchallenge = \"dns-01\"\n",
                "acme.challenge: expected \"tls-alpn-01\" or \"http-01\"",
            ),
            (
                "[acme]\ndomains = [\"ok.test\", \"*.example.com\"]\n",
                "sg.toml:8:23: acme.domains[1]: wildcard",
            ),
            (
                "[acme]\ndomains = [\"a b\"]\n",
                "acme.domains[0]: expected a DNS name",
            ),
            (
                "[acme]\nemail = \"ops\"\n",
                "acme.email: expected an address",
            ),
            (
                "[acme]\ndomains = []\n",
                "acme: no names to certify and no [[cert]]",
            ),
            ("[acme]\nstaging = true\n", "unknown field `staging`"),
        ];
        for (extra, want) in cases {
            let got = refused(extra);
            assert!(got.contains(want), "{extra}: {got}");
        }
        let explicit = parse("[acme]\ndomains = [\"Events.Example.com.\"]\n").expect("valid");
        assert_eq!(
            explicit.acme_names([]),
            vec!["events.example.com".to_string()]
        );
    }
}
