//! One backend of one route: its address, weight, open count, connection pool and health
//! (active checks and passive ejection), all in atomics so the request path only reads them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio_util::sync::CancellationToken;

use super::pool::Pool;
use crate::config::{HealthConfig, OutlierConfig};
use crate::metrics::{BackendMetrics, Metrics};

/// An ejection never lasts longer than this, however often a backend is ejected.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What `/backends` shows, and what decides whether a backend gets new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    /// Failed its active health checks.
    Unhealthy,
    /// Taken out by passive ejection, until the ejection ends.
    Ejected,
    /// Up, with a share still rising after it came (back).
    SlowStart,
    /// Left the route (reload, DNS); keeps its open connections.
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
            State::Ejected => "ejected",
            State::SlowStart => "slow_start",
            State::Draining => "draining",
        }
    }

    /// Whether new requests, WebSockets and streams may go here.
    pub fn takes_new_work(self) -> bool {
        matches!(self, State::Healthy | State::SlowStart)
    }
}

/// Milliseconds since the first call: a clock that fits in an atomic.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 can mean "never" in the atomics below.
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

pub struct Backend {
    /// The URL as the file lists it (`http://chat.svc:9000` for every address of a DNS name).
    pub url: Arc<str>,
    /// What is connected to: `10.0.0.5:9000`. Also the label in metrics and `/backends`.
    pub address: Authority,
    /// `address` parsed, when it is an IP literal (no resolution per connect).
    pub(crate) socket: Option<SocketAddr>,
    weight: AtomicU32,
    pub pool: Pool,
    pub metrics: BackendMetrics,
    registry: Arc<Metrics>,
    /// Stable across processes: places this backend for `balance = "hash"`.
    pub(crate) hash_id: u64,
    /// The `balance = "cookie"` value that names this backend (a keyed hash, never the address).
    pub(crate) affinity: String,
    // Health, written rarely, read on every pick.
    active_down: AtomicBool,
    draining: AtomicBool,
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    last_ejection: AtomicU64,
    consecutive_failures: AtomicU32,
    /// When the backend came (back) up, for slow start; 0 when it has been up all along.
    up_since: AtomicU64,
    /// The active checker running for this backend, and the settings it runs with.
    pub(crate) checker: Mutex<Option<(HealthConfig, CancellationToken)>>,
    /// Its open WebSockets and event streams, which may be asked to move.
    pub(crate) held: super::held::HeldSet,
    /// Bumped each time the backend starts draining, so a drain timer from an earlier
    /// departure (it was listed again since) does nothing.
    drain_epoch: AtomicU64,
}

impl Backend {
    pub fn new(
        url: Arc<str>,
        address: Authority,
        weight: u32,
        registry: &Arc<Metrics>,
        route_name: &str,
        slow_start: bool,
    ) -> Backend {
        let metrics = registry.backend(route_name, address.as_str());
        let socket = address.as_str().parse().ok();
        let hash_id = super::balance::stable_hash(address.as_str().as_bytes());
        let affinity = super::balance::affinity_value(route_name, address.as_str());
        Backend {
            url,
            socket,
            weight: AtomicU32::new(weight.max(1)),
            pool: Pool::default(),
            metrics,
            registry: registry.clone(),
            hash_id,
            affinity,
            active_down: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            last_ejection: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            up_since: AtomicU64::new(if slow_start { now_ms() } else { 0 }),
            checker: Mutex::new(None),
            held: Default::default(),
            drain_epoch: AtomicU64::new(0),
            address,
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// Requests in flight plus WebSockets and streams, now.
    pub fn open(&self) -> u64 {
        self.metrics.open.get().max(0) as u64
    }

    /// Counts one request, WebSocket or stream as open until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> OpenGuard {
        self.metrics.open.inc();
        OpenGuard(self.clone())
    }

    pub fn state(&self, slow_start: Option<Duration>) -> State {
        self.state_at(now_ms(), slow_start)
    }

    pub(crate) fn state_at(&self, now: u64, slow_start: Option<Duration>) -> State {
        if self.draining.load(Ordering::Relaxed) {
            return State::Draining;
        }
        if self.active_down.load(Ordering::Relaxed) {
            return State::Unhealthy;
        }
        let ejected_until = self.ejected_until.load(Ordering::Relaxed);
        if ejected_until > now {
            return State::Ejected;
        }
        if self.slow_start_factor(now, slow_start) < 100 {
            return State::SlowStart;
        }
        State::Healthy
    }

    /// Percent of its weight the backend gets now: rises from 10 to 100 over `slow_start`
    /// after it came up, came back from an ejection or passed its checks again.
    pub(crate) fn slow_start_factor(&self, now: u64, slow_start: Option<Duration>) -> u64 {
        let Some(window) = slow_start else {
            return 100;
        };
        let since = self
            .up_since
            .load(Ordering::Relaxed)
            .max(self.ejected_until.load(Ordering::Relaxed));
        if since == 0 || now <= since {
            return if since == 0 { 100 } else { 10 };
        }
        let elapsed = now - since;
        let window = window.as_millis().max(1) as u64;
        if elapsed >= window {
            return 100;
        }
        (10 + 90 * elapsed / window).min(100)
    }

    /// Takes the backend out of the route; returns the departure's epoch for its drain timer.
    pub fn set_draining(&self) -> u64 {
        self.draining.store(true, Ordering::Relaxed);
        self.metrics.up.set(0);
        self.drain_epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether the backend is still draining since the departure that returned `epoch`.
    pub fn draining_since(&self, epoch: u64) -> bool {
        self.is_draining() && self.drain_epoch.load(Ordering::Relaxed) == epoch
    }

    /// Registers a WebSocket or event stream on this backend, so it can be asked to move.
    pub fn hold(self: &Arc<Self>) -> super::held::Held {
        super::held::Held::new(self.clone())
    }

    /// WebSockets and event streams open here, and how many of them were not asked to move.
    pub fn held(&self) -> (usize, usize) {
        self.held.counts()
    }

    /// Listed again after it had left: takes new work again, in slow start when set.
    pub fn set_listed(&self) {
        if self.draining.swap(false, Ordering::Relaxed) {
            self.up_since.store(now_ms(), Ordering::Relaxed);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The active checker's verdict changed.
    pub(crate) fn set_active_down(&self, down: bool) {
        let was = self.active_down.swap(down, Ordering::Relaxed);
        if was && !down {
            self.up_since.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// A response that says nothing against the backend: its failure streak ends.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failure, a reset before the response, or a 502/503/504 from the backend.
    /// Returns the ejection's length when this failure ejected the backend.
    pub fn record_failure(&self, outlier: &OutlierConfig) -> Option<Duration> {
        if outlier.consecutive_failures == 0 {
            return None;
        }
        let now = now_ms();
        if self.ejected_until.load(Ordering::Relaxed) > now {
            // Tried while ejected (every backend was down): nothing new to learn.
            return None;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < outlier.consecutive_failures {
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        // Repeat offenders are ejected for longer; a backend that behaved for the longest
        // ejection since its last one starts again from the first length.
        let last = self.last_ejection.swap(now, Ordering::Relaxed);
        let repeats = if last != 0 && now - last > MAX_EJECTION.as_millis() as u64 * 2 {
            self.ejections.store(1, Ordering::Relaxed);
            0
        } else {
            self.ejections.fetch_add(1, Ordering::Relaxed)
        };
        let length = outlier
            .ejection
            .saturating_mul(1u32 << repeats.min(16))
            .min(MAX_EJECTION);
        self.ejected_until
            .store(now + length.as_millis() as u64, Ordering::Relaxed);
        self.metrics.ejections.inc();
        Some(length)
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("url", &self.url)
            .field("address", &self.address)
            .finish()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(Some((_, stop))) = self.checker.get_mut().map(|c| c.take()) {
            stop.cancel();
        }
        self.registry.release(&self.metrics);
    }
}

/// One open request, WebSocket or stream on a backend (for least_conn and `/backends`).
#[derive(Debug)]
pub struct OpenGuard(Arc<Backend>);

impl OpenGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.metrics.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn backend() -> Backend {
        Backend::new(
            "http://127.0.0.1:1".into(),
            Authority::from_static("127.0.0.1:1"),
            1,
            &Arc::new(Metrics::new()),
            "r",
            false,
        )
    }

    #[test]
    fn consecutive_failures_eject_and_repeats_double() {
        let b = backend();
        let o = OutlierConfig {
            consecutive_failures: 3,
            ejection: Duration::from_secs(10),
        };
        assert_eq!(b.record_failure(&o), None);
        b.record_success();
        assert_eq!(b.record_failure(&o), None);
        assert_eq!(b.record_failure(&o), None);
        assert_eq!(b.record_failure(&o), Some(Duration::from_secs(10)));
        assert_eq!(b.state(None), State::Ejected);
        // Pretend the ejection is over; the next one is twice as long.
        b.ejected_until.store(1, Ordering::Relaxed);
        assert_eq!(b.state(None), State::Healthy);
        for _ in 0..2 {
            assert_eq!(b.record_failure(&o), None);
        }
        assert_eq!(b.record_failure(&o), Some(Duration::from_secs(20)));
    }

    #[test]
    fn slow_start_rises_from_a_tenth() {
        let b = backend();
        let w = Some(Duration::from_secs(10));
        assert_eq!(b.slow_start_factor(now_ms(), w), 100);
        b.set_active_down(true);
        assert_eq!(b.state(w), State::Unhealthy);
        b.set_active_down(false);
        let since = b.up_since.load(Ordering::Relaxed);
        assert_eq!(b.state_at(since, w), State::SlowStart);
        assert_eq!(b.slow_start_factor(since + 5_000, w), 55);
        assert_eq!(b.slow_start_factor(since + 10_000, w), 100);
        assert_eq!(b.state_at(since + 10_000, w), State::Healthy);
    }
}
