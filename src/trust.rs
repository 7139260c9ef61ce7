//! Who the client is: the TCP peer, unless that peer is a trusted proxy (`listen.
//! trusted_proxies`), which may state the client in a PROXY protocol header or in
//! `X-Forwarded-For`. Everyone else's forwarding headers are replaced, never believed.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::proxy::headers::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};

pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The networks whose connections may speak for their clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind a request from `peer`: for a trusted peer, the right-most address of
    /// `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends the address it
    /// saw, so entries left of the first untrusted one could be made up by the client); the
    /// peer itself otherwise, or when the header says nothing usable.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut hops: Vec<&str> = Vec::new();
        for v in headers.get_all(X_FORWARDED_FOR) {
            let Ok(v) = v.to_str() else {
                return peer;
            };
            hops.extend(v.split(',').map(str::trim));
        }
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) if self.contains(ip) => continue,
                Some(ip) => return canonical(ip),
                None => return peer,
            }
        }
        peer
    }
}

/// `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`, `192.0.2.1:4711` or `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// An IPv4 client on a dual-stack socket shows as `::ffff:a.b.c.d`: compare it as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Removes the forwarding headers a client may not set: all of them from an untrusted peer;
/// from a trusted one, only `X-Real-IP` and `Forwarded` (the gateway writes `X-Forwarded-*`).
pub fn strip_untrusted(headers: &mut HeaderMap, trusted_peer: bool) {
    if !trusted_peer {
        headers.remove(X_FORWARDED_FOR);
        headers.remove(X_FORWARDED_PROTO);
        headers.remove(X_FORWARDED_HOST);
    }
    headers.remove(X_REAL_IP);
    headers.remove(FORWARDED);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec![
            "10.0.0.0/8".parse().expect("net"),
            "127.0.0.1/32".parse().expect("net"),
        ])
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_FORWARDED_FOR, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn only_trusted_peers_speak_for_their_clients() {
        let t = trusted();
        let client: IpAddr = "203.0.113.9".parse().expect("ip");
        let lb: IpAddr = "10.1.2.3".parse().expect("ip");
        let stranger: IpAddr = "198.51.100.1".parse().expect("ip");
        assert_eq!(t.client(lb, &xff(&["203.0.113.9"])), client);
        assert_eq!(
            t.client(stranger, &xff(&["203.0.113.9"])),
            stranger,
            "not trusted"
        );
        // A client that makes up an entry is left of the real one.
        assert_eq!(t.client(lb, &xff(&["1.2.3.4, 203.0.113.9"])), client);
        // Two trusted hops in a row are skipped.
        assert_eq!(t.client(lb, &xff(&["203.0.113.9", "10.9.9.9"])), client);
        assert_eq!(
            t.client(lb, &xff(&["[2001:db8::1]:443"])),
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            t.client(lb, &xff(&["garbage"])),
            lb,
            "unusable: the peer stands"
        );
        assert_eq!(t.client(lb, &HeaderMap::new()), lb);
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert!(t.contains(mapped), "IPv4-mapped peers match IPv4 networks");
    }

    #[test]
    fn untrusted_forwarding_headers_go() {
        let mut h = xff(&["1.2.3.4"]);
        h.insert(X_FORWARDED_PROTO, "https".parse().expect("v"));
        h.insert(X_REAL_IP, "1.2.3.4".parse().expect("v"));
        h.insert(FORWARDED, "for=1.2.3.4".parse().expect("v"));
        let mut from_lb = h.clone();
        strip_untrusted(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        strip_untrusted(&mut from_lb, true);
        assert!(from_lb.contains_key(X_FORWARDED_FOR) && from_lb.contains_key(X_FORWARDED_PROTO));
        assert!(!from_lb.contains_key(X_REAL_IP) && !from_lb.contains_key(FORWARDED));
    }
}
