//! Per-client limits whose memory stays bounded whatever the number of clients: token
//! buckets by key (requests per second, WebSocket messages) and open connections by address.
//!
//! A bucket that has refilled to its burst is indistinguishable from a bucket never created,
//! so it can be forgotten at no cost: that is how the map stays small. Only clients that were
//! limited recently take room, and past `capacity` of those the least recently seen go.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shards, so clients on different cores rarely wait on one lock.
const SHARDS: usize = 16;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// How long until one token is there again, once the bucket is empty.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second.max(f64::MIN_POSITIVE))
            .min(Duration::from_secs(3600))
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }
}

/// One token bucket for a whole route: `max_new_streams_per_second`.
#[derive(Debug)]
pub struct RouteBucket {
    rate: Rate,
    bucket: Mutex<Bucket>,
}

impl RouteBucket {
    pub fn new(rate: Rate) -> RouteBucket {
        RouteBucket {
            rate,
            bucket: Mutex::new(Bucket {
                tokens: rate.burst,
                at: Instant::now(),
            }),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token; false when the bucket is empty.
    pub fn take(&self) -> bool {
        let Ok(mut b) = self.bucket.lock() else {
            // A panic elsewhere poisoned the lock: fail open rather than refuse everyone.
            return true;
        };
        b.refill(self.rate, Instant::now());
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Token buckets by key, at most `capacity` of them in memory.
pub struct KeyedLimiter<K> {
    rate: Rate,
    shards: Vec<Mutex<HashMap<K, Bucket>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(rate: Rate, capacity: usize) -> KeyedLimiter<K> {
        KeyedLimiter {
            rate,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token for `key`: Ok, or Err with how long until one is there.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    pub fn check_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let Ok(mut map) = shard.lock() else {
            // A panic elsewhere poisoned the lock: fail open rather than refuse everyone.
            return Ok(());
        };
        if !map.contains_key(key) && map.len() >= self.per_shard {
            self.make_room(&mut map, now);
        }
        let bucket = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.rate.burst,
            at: now,
        });
        bucket.refill(self.rate, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate.per_second.max(f64::MIN_POSITIVE);
            Err(Duration::from_secs_f64(wait.min(3600.0)))
        }
    }

    /// Forgets every bucket that has refilled (no information lost); if all are still in use,
    /// the least recently touched half goes (those clients start again with a full bucket).
    fn make_room(&self, map: &mut HashMap<K, Bucket>, now: Instant) {
        let rate = self.rate;
        map.retain(|_, b| {
            b.refill(rate, now);
            b.tokens < rate.burst
        });
        if map.len() < self.per_shard {
            return;
        }
        let mut ages: Vec<Instant> = map.values().map(|b| b.at).collect();
        let middle = ages.len() / 2;
        let (_, cut, _) = ages.select_nth_unstable(middle);
        let cut = *cut;
        map.retain(|_, b| b.at > cut);
    }

    /// Buckets in memory now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Open connections by client address, for `limits.per_ip_connections`.
#[derive(Default)]
pub struct ConnectionsByIp {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionsByIp {
    /// Counts a connection from `ip` unless it already has `max`; the count drops with the
    /// returned guard. Addresses with nothing open take no room.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpGuard> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpGuard {
            table: self.clone(),
            ip,
        })
    }

    /// Addresses with at least one open connection.
    pub fn addresses(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }
}

/// One open connection's place in [`ConnectionsByIp`].
pub struct IpGuard {
    table: Arc<ConnectionsByIp>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

impl std::fmt::Debug for IpGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpGuard").field("ip", &self.ip).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: f64) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = KeyedLimiter::new(rate(10.0, 3.0), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check_at(&"a", t0), Ok(()));
        }
        let wait = l.check_at(&"a", t0).expect_err("burst used up");
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert_eq!(
            l.check_at(&"b", t0),
            Ok(()),
            "another key has its own bucket"
        );
        assert_eq!(l.check_at(&"a", t0 + Duration::from_millis(100)), Ok(()));
        assert!(l.check_at(&"a", t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn a_hundred_thousand_clients_stay_within_capacity() {
        let l = KeyedLimiter::new(rate(50.0, 100.0), 10_000);
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            // Each client sends one request, all in the same instant: none refills, so room is
            // made by forgetting the least recently seen.
            assert_eq!(
                l.check_at(&i, t0 + Duration::from_micros(u64::from(i))),
                Ok(())
            );
        }
        assert!(l.len() <= 10_000 + SHARDS, "{} buckets kept", l.len());
        // A client that keeps hitting the limit is still limited after the flood.
        let late = t0 + Duration::from_millis(200);
        for _ in 0..100 {
            let _ = l.check_at(&u32::MAX, late);
        }
        assert!(l.check_at(&u32::MAX, late).is_err());
    }

    #[test]
    fn full_buckets_are_forgotten_first() {
        let l = KeyedLimiter::new(rate(1000.0, 2.0), SHARDS);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let _ = l.check_at(&i, t0);
        }
        // A second later every bucket has refilled: the next insert can drop them all.
        let _ = l.check_at(&5000, t0 + Duration::from_secs(1));
        assert!(l.len() <= SHARDS + 1, "{}", l.len());
    }

    #[test]
    fn connections_by_ip_count_and_forget() {
        let table = Arc::new(ConnectionsByIp::default());
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let a = table.try_open(ip, 2).expect("first");
        let b = table.try_open(ip, 2).expect("second");
        assert!(table.try_open(ip, 2).is_none(), "third over the limit");
        drop(a);
        let c = table.try_open(ip, 2).expect("room again");
        drop((b, c));
        assert_eq!(table.addresses(), 0, "nothing open, nothing kept");
    }
}
