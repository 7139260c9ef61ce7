//! DNS discovery: resolves a backend's host name to its A and AAAA addresses and re-resolves it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use crate::config::ResolverConfig;

/// A TTL below this is waited as this, so a record with TTL 0 cannot make `watch` spin.
const TTL_FLOOR: Duration = Duration::from_secs(1);
/// The shortest wait between lookups whatever `refresh` says, for the same reason.
const MIN_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("resolver: cannot read /etc/resolv.conf; set [resolver] nameservers instead")]
    SystemConfig {
        #[source]
        source: NetError,
    },
    #[error("resolver: cannot set up the DNS resolver")]
    Build {
        #[source]
        source: NetError,
    },
    #[error("dns {host}: no such name (NXDOMAIN)")]
    NoSuchName {
        host: String,
        #[source]
        source: NetError,
    },
    #[error("dns {host}: no A or AAAA records")]
    NoAddresses {
        host: String,
        #[source]
        source: Option<NetError>,
    },
    // The source is in the message too: "lookup failed" alone does not say timeout or refused.
    #[error("dns {host}: lookup failed: {source}")]
    Lookup {
        host: String,
        #[source]
        source: NetError,
    },
}

/// One answer for a host: every address it has now, and how long the answer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// A and AAAA addresses, sorted and deduplicated.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL among the answer's records.
    pub valid_for: Duration,
}

/// hickory's tokio resolver, without a cache, so every lookup asks the nameservers.
#[derive(Debug)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// No nameservers: the system's resolv.conf (its search domains and hosts file included).
    /// Otherwise exactly these servers, over UDP with TCP for truncated answers, and no search
    /// domains or hosts file, so a name means the same on every machine.
    pub fn new(config: &ResolverConfig) -> Result<Resolver, DiscoveryError> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|source| DiscoveryError::SystemConfig { source })?
        } else {
            let servers = config.nameservers.iter().map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            });
            let mut builder = TokioResolver::builder_with_config(
                HickoryConfig::from_name_servers(servers.collect()),
                TokioRuntimeProvider::default(),
            );
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // No cache (hickory's moka cache stores nothing at size 0): a cached answer would hide a
        // changed record until its TTL ran out, and `watch` already waits out the TTL itself.
        options.cache_size = 0;
        let inner = builder
            .build()
            .map_err(|source| DiscoveryError::Build { source })?;
        Ok(Resolver { inner })
    }

    /// Asks the nameservers for `host`'s A and AAAA records. The resolver's own timeout and
    /// attempts (5 s, 2 by default) bound the wait.
    pub async fn resolve(&self, host: &str) -> Result<Resolved, DiscoveryError> {
        let lookup = self
            .inner
            .lookup_ip(host)
            .await
            .map_err(|source| classify(host, source))?;
        let addrs = sorted_unique(lookup.iter());
        if addrs.is_empty() {
            return Err(DiscoveryError::NoAddresses {
                host: host.to_owned(),
                source: None,
            });
        }
        // CNAMEs count: when one expires the addresses behind it may change too.
        let ttl = lookup.as_lookup().answers().iter().map(|r| r.ttl).min();
        let valid_for = Duration::from_secs(ttl.unwrap_or_default().into());
        Ok(Resolved { addrs, valid_for })
    }
}

fn classify(host: &str, source: NetError) -> DiscoveryError {
    let host = host.to_owned();
    if source.is_nx_domain() {
        DiscoveryError::NoSuchName { host, source }
    } else if source.is_no_records_found() {
        DiscoveryError::NoAddresses {
            host,
            source: Some(source),
        }
    } else {
        DiscoveryError::Lookup { host, source }
    }
}

fn sorted_unique(ips: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = ips.collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// How long to wait after a good answer: `refresh`, or sooner when the records expire sooner.
fn next_wait(refresh: Duration, valid_for: Duration) -> Duration {
    refresh.min(valid_for.max(TTL_FLOOR)).max(MIN_WAIT)
}

/// Re-resolves `host` forever: first at once, then every min(refresh, ttl), never sooner than
/// 1 s for a short TTL. Calls `update` with the full sorted set of (ip, port) on the first good
/// answer and whenever the set changes. A failed lookup (NXDOMAIN and empty answers included)
/// keeps the last good set, warns once per failure streak and retries after `refresh`.
/// Returns when `stop` is cancelled.
pub async fn watch(
    resolver: Arc<Resolver>,
    host: String,
    port: u16,
    refresh: Duration,
    stop: CancellationToken,
    mut update: impl FnMut(Vec<SocketAddr>) + Send,
) {
    let mut last: Option<Vec<SocketAddr>> = None;
    let mut failing = false;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = resolver.resolve(&host) => result,
        };
        let wait = match result {
            Ok(resolved) => {
                if failing {
                    tracing::info!(host, "dns lookup recovered");
                    failing = false;
                }
                let addrs: Vec<SocketAddr> = resolved
                    .addrs
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, port))
                    .collect();
                if last.as_ref() != Some(&addrs) {
                    tracing::info!(host, addrs = ?addrs, "dns addresses changed");
                    update(addrs.clone());
                    last = Some(addrs);
                }
                next_wait(refresh, resolved.valid_for)
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(host, error = %e, "dns lookup failed, keeping the last addresses");
                    failing = true;
                }
                refresh.max(MIN_WAIT)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::net::{DnsError, NoRecords};
    use hickory_resolver::proto::op::{Query, ResponseCode};
    use hickory_resolver::proto::rr::{Name, RecordType};

    #[test]
    fn next_wait_takes_the_shorter_of_refresh_and_ttl() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases = [
            // (refresh, ttl, wait)
            (s(30), s(300), s(30)),
            (s(30), s(5), s(5)),
            (s(30), s(0), s(1)),
            (ms(200), s(0), ms(200)),
            (s(0), s(60), ms(100)),
        ];
        for (refresh, ttl, want) in cases {
            assert_eq!(
                next_wait(refresh, ttl),
                want,
                "refresh {refresh:?} ttl {ttl:?}"
            );
        }
    }

    #[test]
    fn addresses_are_sorted_and_deduplicated() {
        let ips = ["2001:db8::1", "192.0.2.2", "192.0.2.1", "192.0.2.2"]
            .map(|ip| ip.parse::<IpAddr>().expect("test literal"));
        let want = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]
            .map(|ip| ip.parse::<IpAddr>().expect("test literal"));
        assert_eq!(sorted_unique(ips.into_iter()), want);
    }

    #[test]
    fn negative_answers_are_told_apart_from_failures() {
        let query = Query::query(Name::root(), RecordType::A);
        let no_records = |code| {
            NetError::from(DnsError::NoRecordsFound(NoRecords::new(
                query.clone(),
                code,
            )))
        };
        assert!(matches!(
            classify("svc", no_records(ResponseCode::NXDomain)),
            DiscoveryError::NoSuchName { .. }
        ));
        assert!(matches!(
            classify("svc", no_records(ResponseCode::NoError)),
            DiscoveryError::NoAddresses { .. }
        ));
        let e = classify("svc", NetError::Timeout);
        assert_eq!(e.to_string(), "dns svc: lookup failed: request timed out");
    }
}
