//! Validation of the backend fleet keys: `backends`, `balance`, `retries`, `slow_start`,
//! `[route.health]`, `[route.outlier]` and the top-level `[resolver]`.

use std::time::Duration;

use http::uri::Authority;
use toml::Spanned;

use super::raw::{RawBackend, RawResolver, RawRoute, Text};
use super::{
    BackendConfig, Balance, ConfigError, HashKey, HealthConfig, Located, OutlierConfig,
    ResolverConfig,
};

/// The fleet settings of one route, validated together because they depend on each other.
pub(super) struct Fleet {
    pub balance: Balance,
    pub retries: u32,
    pub slow_start: Option<Duration>,
    pub health: Option<HealthConfig>,
    pub outlier: OutlierConfig,
}

impl Located<'_> {
    pub(super) fn resolver(&self, raw: &RawResolver) -> Result<ResolverConfig, ConfigError> {
        let d = ResolverConfig::default();
        let nameservers = match &raw.nameservers {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let s = a.get_ref();
                    // A bare address means the usual port.
                    s.parse()
                        .or_else(|_| {
                            s.parse::<std::net::IpAddr>()
                                .map(|ip| std::net::SocketAddr::new(ip, 53))
                        })
                        .map_err(|_| {
                            self.error(
                                a.span(),
                                format!(
                                    "resolver.nameservers[{i}]: expected an address such as \"10.96.0.10:53\", got {s:?}"
                                ),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        let refresh = self.duration_or("resolver.refresh", &raw.refresh, d.refresh)?;
        if refresh < Duration::from_secs(1) {
            if let Some(r) = &raw.refresh {
                return Err(self.error(
                    r.span(),
                    "resolver.refresh: must be at least 1s (a lookup per request would flood the DNS server)",
                ));
            }
        }
        Ok(ResolverConfig {
            nameservers,
            refresh,
        })
    }

    /// `rebalance`: moving a connection helps only where the balancer may place it elsewhere;
    /// hash and cookie affinity would send it straight back.
    pub(super) fn rebalance(
        &self,
        key: &dyn Fn(&str) -> String,
        r: &RawRoute,
        balance: &Balance,
    ) -> Result<bool, ConfigError> {
        let Some(value) = &r.rebalance else {
            return Ok(false);
        };
        let on = *value.get_ref();
        if on && matches!(balance, Balance::Hash(_) | Balance::Cookie(_)) {
            return Err(self.error(
                value.span(),
                format!(
                    "{}: moves connections to other backends, which balance = \"{}\" would send straight back; use balance = \"least_conn\" (the default) or \"round_robin\", or leave rebalance off",
                    key("rebalance"),
                    match balance {
                        Balance::Hash(_) => "hash",
                        _ => "cookie",
                    }
                ),
            ));
        }
        Ok(on)
    }

    pub(super) fn backends(
        &self,
        key: &str,
        list: &Spanned<Vec<Spanned<RawBackend>>>,
    ) -> Result<Vec<BackendConfig>, ConfigError> {
        if list.get_ref().is_empty() {
            return Err(self.error(
                list.span(),
                format!("{key}: expected at least one backend such as \"http://127.0.0.1:9000\""),
            ));
        }
        let backends = list
            .get_ref()
            .iter()
            .enumerate()
            .map(|(i, b)| self.backend(&format!("{key}[{i}]"), b))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, b) in backends.iter().enumerate() {
            if backends[..i].iter().any(|o| o.authority == b.authority) {
                return Err(self.error(
                    list.get_ref()[i].span(),
                    format!("{key}[{i}]: {} is listed twice", b.url),
                ));
            }
        }
        Ok(backends)
    }

    fn backend(
        &self,
        key: &str,
        value: &Spanned<RawBackend>,
    ) -> Result<BackendConfig, ConfigError> {
        let (url, url_span, weight, discover) = match value.get_ref() {
            RawBackend::Url(s) => (s.as_str(), value.span(), None, None),
            RawBackend::Table(t) => (
                t.url.get_ref().as_str(),
                t.url.span(),
                t.weight.as_ref(),
                t.discover.as_ref(),
            ),
        };
        let url_key = match value.get_ref() {
            RawBackend::Url(_) => key.to_string(),
            RawBackend::Table(_) => format!("{key}.url"),
        };
        let authority = self.backend_url(&url_key, url, url_span.clone())?;
        let weight = weight
            .map(|w| self.int(&format!("{key}.weight"), w, 1..=100))
            .transpose()?
            .unwrap_or(1) as u32;
        let discover = match discover {
            None => false,
            Some(d) if d.get_ref() == "dns" => true,
            Some(d) => {
                return Err(self.error(
                    d.span(),
                    format!(
                        "{key}.discover: expected \"dns\" (every address of the name is a backend), got {:?}",
                        d.get_ref()
                    ),
                ))
            }
        };
        if discover && authority.port_u16().is_none() {
            return Err(self.error(
                url_span,
                format!("{url_key}: a discovered backend needs a port, such as \"http://chat.svc:9000\""),
            ));
        }
        Ok(BackendConfig {
            url: url.to_string(),
            authority,
            weight,
            discover,
        })
    }

    fn backend_url(
        &self,
        key: &str,
        s: &str,
        span: std::ops::Range<usize>,
    ) -> Result<Authority, ConfigError> {
        let bad = |why: &str| {
            self.error(
                span.clone(),
                format!("{key}: expected http://host:port{why}, got {s:?}"),
            )
        };
        let Some(rest) = s.strip_prefix("http://") else {
            return Err(bad(" (backends are plain HTTP; TLS ends at the gateway)"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad(" with no path"));
        }
        let authority: Authority = rest.parse().map_err(|_| bad(""))?;
        // `Authority` parses the port lazily: "x:port" and "x:99999" parse, with no port.
        let has_port = authority.as_str().len() > authority.host().len();
        if authority.host().is_empty() || (has_port && authority.port_u16().is_none()) {
            return Err(bad(""));
        }
        Ok(authority)
    }

    pub(super) fn fleet(
        &self,
        key: &dyn Fn(&str) -> String,
        r: &RawRoute,
    ) -> Result<Fleet, ConfigError> {
        let balance_name = r.balance.as_ref().map(|b| b.get_ref().as_str());
        let balance = match (balance_name, &r.balance) {
            (None | Some("least_conn"), _) => Balance::LeastConn,
            (Some("round_robin"), _) => Balance::RoundRobin,
            (Some("hash"), Some(b)) => {
                let Some(k) = &r.hash_key else {
                    return Err(self.error(
                        b.span(),
                        format!(
                            "{}: \"hash\" needs hash_key = \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"",
                            key("balance")
                        ),
                    ));
                };
                Balance::Hash(self.hash_key(&key("hash_key"), k)?)
            }
            (Some("cookie"), _) => {
                let name = match &r.affinity_cookie {
                    None => "sg_affinity".to_string(),
                    Some(c) => {
                        let name = c.get_ref();
                        if !is_token(name) {
                            return Err(self.error(
                                c.span(),
                                format!(
                                    "{}: expected a cookie name (letters, digits, - and _), got {name:?}",
                                    key("affinity_cookie")
                                ),
                            ));
                        }
                        name.clone()
                    }
                };
                Balance::Cookie(name)
            }
            (Some(other), Some(b)) => {
                return Err(self.error(
                    b.span(),
                    format!(
                        "{}: expected \"least_conn\", \"round_robin\", \"hash\" or \"cookie\", got {other:?}",
                        key("balance")
                    ),
                ))
            }
            (Some(_), None) => Balance::LeastConn, // unreachable: a name comes from a value
        };
        if let (Some(k), false) = (&r.hash_key, matches!(balance, Balance::Hash(_))) {
            return Err(self.error(
                k.span(),
                format!("{}: only used with balance = \"hash\"", key("hash_key")),
            ));
        }
        if let (Some(c), false) = (&r.affinity_cookie, matches!(balance, Balance::Cookie(_))) {
            return Err(self.error(
                c.span(),
                format!(
                    "{}: only used with balance = \"cookie\"",
                    key("affinity_cookie")
                ),
            ));
        }

        let retries = r
            .retries
            .as_ref()
            .map(|v| self.int(&key("retries"), v, 0..=10))
            .transpose()?
            .unwrap_or(1) as u32;
        let slow_start = r
            .slow_start
            .as_ref()
            .map(|v| self.positive_duration(&key("slow_start"), v))
            .transpose()?;

        let health = match &r.health {
            None => None,
            Some(h) => {
                let path_key = key("health.path");
                let path = match &h.path {
                    None => http::uri::PathAndQuery::from_static("/healthz"),
                    Some(p) => {
                        let s = p.get_ref();
                        let parsed = s.parse::<http::uri::PathAndQuery>().ok();
                        match parsed {
                            Some(pq) if s.starts_with('/') => pq,
                            _ => {
                                return Err(self.error(
                                    p.span(),
                                    format!(
                                    "{path_key}: expected a path such as \"/healthz\", got {s:?}"
                                ),
                                ))
                            }
                        }
                    }
                };
                let interval = match &h.interval {
                    None => Duration::from_secs(5),
                    Some(v) => self.positive_duration(&key("health.interval"), v)?,
                };
                let timeout = match &h.timeout {
                    None => Duration::from_secs(2).min(interval / 2),
                    Some(v) => {
                        let t = self.positive_duration(&key("health.timeout"), v)?;
                        if t >= interval {
                            return Err(self.error(
                                v.span(),
                                format!(
                                    "{}: must be shorter than health.interval ({}), or checks overlap",
                                    key("health.timeout"),
                                    humantime::format_duration(interval)
                                ),
                            ));
                        }
                        t
                    }
                };
                let count = |name: &str, v: &Option<Spanned<i64>>| {
                    v.as_ref()
                        .map(|v| self.int(&key(name), v, 1..=100))
                        .transpose()
                        .map(|n| n.unwrap_or(2) as u32)
                };
                Some(HealthConfig {
                    path,
                    interval,
                    timeout,
                    unhealthy_after: count("health.unhealthy_after", &h.unhealthy_after)?,
                    healthy_after: count("health.healthy_after", &h.healthy_after)?,
                })
            }
        };

        let d = OutlierConfig::default();
        let outlier = match &r.outlier {
            None => d,
            Some(o) => OutlierConfig {
                consecutive_failures: o
                    .consecutive_failures
                    .as_ref()
                    .map(|v| self.int(&key("outlier.consecutive_failures"), v, 0..=1000))
                    .transpose()?
                    .map_or(d.consecutive_failures, |n| n as u32),
                ejection: match &o.ejection {
                    None => d.ejection,
                    Some(v) => self.positive_duration(&key("outlier.ejection"), v)?,
                },
            },
        };

        Ok(Fleet {
            balance,
            retries,
            slow_start,
            health,
            outlier,
        })
    }

    fn hash_key(&self, key: &str, value: &Text) -> Result<HashKey, ConfigError> {
        let s = value.get_ref();
        let bad = || {
            self.error(
                value.span(),
                format!(
                    "{key}: expected \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\", got {s:?}"
                ),
            )
        };
        if s == "client_ip" {
            return Ok(HashKey::ClientIp);
        }
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        match kind {
            "header" => http::HeaderName::from_bytes(name.as_bytes())
                .map(HashKey::Header)
                .map_err(|_| bad()),
            "cookie" if is_token(name) => Ok(HashKey::Cookie(name.to_string())),
            "query" if !name.contains(['&', '=', '#']) => Ok(HashKey::Query(name.to_string())),
            _ => Err(bad()),
        }
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}
