//! Balancing policies: which backend of a route gets a new request, WebSocket or stream.
//!
//! Long-lived connections make round-robin wrong (it balances arrivals, not what is open), so
//! `least_conn` is the default. `hash` is rendezvous hashing: adding or removing one of n
//! backends moves about 1/n of the keys, and a key whose backend is down goes to its
//! second-best backend and comes back when the first recovers. `cookie` pins a client to the
//! backend named by an opaque cookie value.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap};

use super::backend::Backend;
use crate::config::HashKey;

/// What a policy may look at in a request.
pub struct PickInput<'a> {
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
}

/// FNV-1a, then a finaliser: stable across processes and builds (gateway replicas must agree
/// on where a key goes), and well spread even for similar inputs.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The affinity cookie's value for a backend: a keyed hash of its address, so the cookie
/// names a backend without revealing it, and every gateway replica computes the same value.
pub fn affinity_value(route: &str, address: &str) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        format!("streamgate affinity {route}").as_bytes(),
    );
    let tag = ring::hmac::sign(&key, address.as_bytes());
    tag.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of cookie `name` in the request, if any (several `Cookie` fields are allowed).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The hash of a request's key, or None when the request lacks it (then least_conn decides).
pub fn key_hash(key: &HashKey, input: &PickInput<'_>) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match input.client_ip {
            IpAddr::V4(ip) => stable_hash(&ip.octets()),
            IpAddr::V6(ip) => stable_hash(&ip.octets()),
        }),
        HashKey::Header(name) => input.headers.get(name).map(|v| stable_hash(v.as_bytes())),
        HashKey::Cookie(name) => cookie(input.headers, name).map(|v| stable_hash(v.as_bytes())),
        HashKey::Query(name) => query_param(input.query, name).map(|v| stable_hash(v.as_bytes())),
    }
}

/// A backend as a policy sees it: its effective weight now (weight x slow-start percent).
pub struct Candidate<'a> {
    pub backend: &'a Arc<Backend>,
    pub weight: u64,
}

/// Fewest open relative to weight: compares (open + 1) / weight, so a backend in slow start
/// (small weight) only wins once the others are busy enough. Ties are broken at random.
pub fn least_conn<'a>(candidates: impl Iterator<Item = Candidate<'a>>) -> Option<&'a Arc<Backend>> {
    let mut best: Option<(&Arc<Backend>, u64, u64)> = None;
    let mut ties = 0u32;
    for c in candidates {
        let load = c.backend.open() + 1;
        match best {
            None => {
                best = Some((c.backend, load, c.weight));
                ties = 1;
            }
            Some((_, best_load, best_weight)) => {
                // load / weight < best_load / best_weight, in integers.
                let lhs = u128::from(load) * u128::from(best_weight);
                let rhs = u128::from(best_load) * u128::from(c.weight);
                if lhs < rhs {
                    best = Some((c.backend, load, c.weight));
                    ties = 1;
                } else if lhs == rhs {
                    ties += 1;
                    // Reservoir sampling: each tied backend is kept with equal chance.
                    if fastrand::u32(0..ties) == 0 {
                        best = Some((c.backend, load, c.weight));
                    }
                }
            }
        }
    }
    best.map(|(b, _, _)| b)
}

/// Weighted rendezvous hashing: the backend with the highest weight / -ln(hash) for the key.
pub fn rendezvous<'a>(
    key: u64,
    candidates: impl Iterator<Item = Candidate<'a>>,
) -> Option<&'a Arc<Backend>> {
    let mut best: Option<(&Arc<Backend>, f64)> = None;
    for c in candidates {
        let h = mix(key ^ c.backend.hash_id);
        // A uniform number in (0, 1), never 0 (ln 0) nor 1 (division by 0).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = c.weight as f64 / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((c.backend, score));
        }
    }
    best.map(|(b, _)| b)
}

/// Weighted round-robin, nginx's smooth variant: each pick adds every backend's weight to its
/// running score, takes the highest and subtracts the total from it, so weights 1:3 give
/// b, b, a, b rather than a, b, b, b. Equal weights (the usual case) take turns by counter.
pub fn round_robin<'a>(
    n: u64,
    scores: &std::sync::Mutex<std::collections::HashMap<u64, i64>>,
    candidates: &[Candidate<'a>],
) -> Option<&'a Arc<Backend>> {
    let first = candidates.first()?;
    if candidates.iter().all(|c| c.weight == first.weight) {
        return Some(candidates[(n % candidates.len() as u64) as usize].backend);
    }
    let mut scores = scores.lock().ok()?;
    let total: i64 = candidates.iter().map(|c| c.weight as i64).sum();
    let mut best: Option<(&Arc<Backend>, i64)> = None;
    for c in candidates {
        let score = scores.entry(c.backend.hash_id).or_insert(0);
        *score += c.weight as i64;
        if best.is_none_or(|(_, s)| *score > s) {
            best = Some((c.backend, *score));
        }
    }
    let (chosen, _) = best?;
    if let Some(score) = scores.get_mut(&chosen.hash_id) {
        *score -= total;
    }
    // Backends that left keep no score.
    if scores.len() > candidates.len() * 2 {
        scores.retain(|id, _| candidates.iter().any(|c| c.backend.hash_id == *id));
    }
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_and_query_values_are_found() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; sg_affinity=abc".parse().expect("valid"),
        );
        h.append(header::COOKIE, "b=2".parse().expect("valid"));
        assert_eq!(cookie(&h, "sg_affinity"), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
        assert_eq!(query_param(Some("x=1&user=ann"), "user"), Some("ann"));
        assert_eq!(query_param(Some("x=1"), "user"), None);
    }

    #[test]
    fn affinity_value_hides_the_address_and_is_stable() {
        let v = affinity_value("*/ws", "10.0.0.5:9000");
        assert_eq!(v, affinity_value("*/ws", "10.0.0.5:9000"));
        assert_ne!(v, affinity_value("*/ws", "10.0.0.6:9000"));
        assert!(!v.contains("10.0.0.5"));
        assert_eq!(v.len(), 24);
    }

    #[test]
    fn stable_hash_does_not_change_between_builds() {
        // Gateway replicas and restarts must send a key to the same backend.
        assert_eq!(stable_hash(b"user-1"), stable_hash(b"user-1"));
        assert_eq!(stable_hash(b""), mix(0xcbf2_9ce4_8422_2325));
    }
}
