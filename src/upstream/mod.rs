//! The backends of a route and everything that outlives a request about them.
//!
//! - [`backend`]: one backend's address, weight, open count and health.
//! - [`pool`]: its keep-alive connections, driven by the request's own task.
//! - [`balance`]: the policies that pick a backend for new work.
//! - [`health`]: active checks; [`discovery`]: DNS names that stand for several backends.
//!
//! An [`Upstream`] is one route's set of backends. A reload builds a new one from the
//! previous, keeping every backend (pool, health, ejection, open count) that is still listed;
//! a backend that left keeps its open WebSockets and streams and shows as `draining` until
//! they end.

pub mod backend;
pub mod balance;
pub mod discovery;
pub mod health;
pub mod held;
pub mod pool;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use tokio_util::sync::CancellationToken;

pub use backend::{Backend, OpenGuard, State};
pub use balance::PickInput;
pub use held::{Held, MoveReason};
pub use pool::{PooledBody, SendError};

use crate::config::{BackendConfig, Balance, HealthConfig, OutlierConfig, RouteConfig};
use crate::drain::Drain;
use crate::metrics::Metrics;

/// What building an [`Upstream`] needs from the gateway.
#[derive(Clone)]
pub struct UpstreamContext {
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// None when no route discovers by DNS, or the resolver could not be set up (logged).
    pub resolver: Option<Arc<discovery::Resolver>>,
    pub refresh: Duration,
}

/// A backend chosen for one try.
pub struct Pick {
    pub backend: Arc<Backend>,
    /// `balance = "cookie"`: the request had no valid cookie for it, so the response sets one.
    pub set_cookie: bool,
}

/// One route's backends.
pub struct Upstream {
    route: String,
    balance: Balance,
    slow_start: Option<Duration>,
    pub outlier: OutlierConfig,
    health: Option<HealthConfig>,
    /// The backends that may get new work (and their states decide which do), in file order;
    /// replaced whole when DNS changes a name's addresses.
    active: ArcSwap<Vec<Arc<Backend>>>,
    /// Per `backends` entry: its backends now (one for a URL, one per address for DNS).
    entries: Mutex<Vec<Vec<Arc<Backend>>>>,
    /// Backends that left while connections were open on them.
    draining: Mutex<Vec<Arc<Backend>>>,
    round_robin: AtomicU64,
    /// Smooth weighted round-robin's running scores, by backend.
    round_robin_scores: Mutex<std::collections::HashMap<u64, i64>>,
    ctx: UpstreamContext,
    /// Stops this upstream's DNS watchers and rebalancer when it is replaced or dropped.
    stop: CancellationToken,
    /// `backend_drain`: how long a departed backend keeps its WebSockets and streams.
    backend_drain: Duration,
    /// The upstream a reload built in this one's place: a stream that began before the
    /// reload resumes on the backends listed now.
    successor: Mutex<Weak<Upstream>>,
}

impl Upstream {
    /// Builds the backends of `config`, taking over those of `previous` that are still listed.
    pub fn new(
        config: &RouteConfig,
        route: &str,
        previous: Option<&Upstream>,
        ctx: &UpstreamContext,
    ) -> Arc<Upstream> {
        let mut old: Vec<Arc<Backend>> = previous.map_or_else(Vec::new, |p| {
            let mut all = p.active.load().as_ref().clone();
            all.extend(p.draining.lock().map(|d| d.clone()).unwrap_or_default());
            all
        });
        let old_entries: Vec<(String, Vec<Arc<Backend>>)> = previous
            .and_then(|p| {
                let entries = p.entries.lock().ok()?;
                Some(
                    entries
                        .iter()
                        .filter_map(|e| Some((e.first()?.url.to_string(), e.clone())))
                        .collect(),
                )
            })
            .unwrap_or_default();
        let added_later = previous.is_some() && config.slow_start.is_some();
        let mut take = |url: &str, address: &Authority, weight: u32| -> Arc<Backend> {
            let found = old
                .iter()
                .position(|b| &*b.url == url && b.address == *address);
            match found {
                Some(i) => {
                    let b = old.swap_remove(i);
                    b.set_weight(weight);
                    b.set_listed();
                    b
                }
                None => Arc::new(Backend::new(
                    url.into(),
                    address.clone(),
                    weight,
                    &ctx.metrics,
                    route,
                    added_later,
                )),
            }
        };
        let entries: Vec<Vec<Arc<Backend>>> = config
            .backends
            .iter()
            .map(|b| {
                if !b.discover {
                    return vec![take(&b.url, &b.authority, b.weight)];
                }
                // Keep the addresses the name had until the watcher says otherwise.
                old_entries
                    .iter()
                    .find(|(url, _)| url == &b.url)
                    .map(|(_, list)| {
                        list.iter()
                            .map(|o| take(&b.url, &o.address, b.weight))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let active: Vec<Arc<Backend>> = entries.iter().flatten().cloned().collect();
        // Whatever was not taken over has left the route (or had left it before).
        let draining: Vec<Arc<Backend>> = old
            .into_iter()
            .filter(|b| {
                if !b.is_draining() {
                    let epoch = b.set_draining();
                    drain_later(b, epoch, config.backend_drain, route, &ctx.drain);
                }
                health::stop(b);
                b.open() > 0
            })
            .collect();
        for b in &draining {
            tracing::info!(route, backend = %b.address, open = b.open(), "backend left the route, draining its open connections");
        }
        if let Some(p) = previous {
            p.stop.cancel();
        }
        let upstream = Arc::new(Upstream {
            route: route.to_string(),
            balance: config.balance.clone(),
            slow_start: config.slow_start,
            outlier: config.outlier.clone(),
            health: config.health.clone(),
            active: ArcSwap::from_pointee(active),
            entries: Mutex::new(entries),
            draining: Mutex::new(draining),
            round_robin: AtomicU64::new(0),
            round_robin_scores: Mutex::default(),
            ctx: ctx.clone(),
            stop: CancellationToken::new(),
            backend_drain: config.backend_drain,
            successor: Mutex::new(Weak::new()),
        });
        if let Some(p) = previous {
            if let Ok(mut next) = p.successor.lock() {
                *next = Arc::downgrade(&upstream);
            }
        }
        upstream.check_health();
        if config.rebalance {
            upstream.rebalance();
        }
        for (i, b) in config.backends.iter().enumerate() {
            if b.discover {
                upstream.discover(i, b);
            }
        }
        upstream
    }

    /// Starts the health checkers that should run and are not running yet.
    fn check_health(&self) {
        for b in self.active.load().iter() {
            match &self.health {
                Some(h) => health::ensure(b, h, &self.ctx.drain),
                None => health::stop(b),
            }
        }
    }

    /// Watches the DNS name of entry `index`; each change replaces that entry's backends.
    fn discover(self: &Arc<Self>, index: usize, config: &BackendConfig) {
        let Some(resolver) = self.ctx.resolver.clone() else {
            tracing::warn!(route = %self.route, backend = %config.url, "no DNS resolver: this backend has no addresses");
            return;
        };
        let host = config.authority.host().to_string();
        let port = config.authority.port_u16().unwrap_or(80);
        let weak: Weak<Upstream> = Arc::downgrade(self);
        let (url, weight) = (config.url.clone(), config.weight);
        let (stop, drain) = (self.stop.clone(), self.ctx.drain.clone());
        let refresh = self.ctx.refresh;
        self.ctx.drain.spawn(async move {
            let update = move |addrs: Vec<std::net::SocketAddr>| {
                if let Some(upstream) = weak.upgrade() {
                    upstream.set_addresses(index, &url, weight, &addrs);
                }
            };
            tokio::select! {
                _ = discovery::watch(resolver, host, port, refresh, stop.clone(), update) => {}
                _ = drain.draining() => {}
            }
        });
    }

    /// DNS answered for entry `index`: new addresses join (in slow start when set), those no
    /// longer listed drain.
    fn set_addresses(&self, index: usize, url: &str, weight: u32, addrs: &[std::net::SocketAddr]) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let Some(entry) = entries.get_mut(index) else {
            return;
        };
        let first = entry.is_empty();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let Ok(address) = Authority::try_from(addr.to_string().as_str()) else {
                continue;
            };
            match entry.iter().find(|b| b.address == address) {
                Some(b) => next.push(b.clone()),
                None => {
                    tracing::info!(route = %self.route, backend = %address, name = url, "dns: backend joined");
                    next.push(Arc::new(Backend::new(
                        url.into(),
                        address,
                        weight,
                        &self.ctx.metrics,
                        &self.route,
                        !first && self.slow_start.is_some(),
                    )));
                }
            }
        }
        for gone in entry
            .iter()
            .filter(|b| !next.iter().any(|n| Arc::ptr_eq(n, b)))
        {
            tracing::info!(route = %self.route, backend = %gone.address, name = url, open = gone.open(), "dns: backend left, draining");
            let epoch = gone.set_draining();
            drain_later(
                gone,
                epoch,
                self.backend_drain,
                &self.route,
                &self.ctx.drain,
            );
            health::stop(gone);
            if gone.open() > 0 {
                if let Ok(mut d) = self.draining.lock() {
                    d.push(gone.clone());
                }
            }
        }
        *entry = next;
        self.active
            .store(Arc::new(entries.iter().flatten().cloned().collect()));
        drop(entries);
        self.check_health();
    }

    /// The backend for a new request, WebSocket or stream; `exclude` is the one just tried.
    /// Backends that are unhealthy, ejected or draining get nothing while another can take
    /// it; when none can, every listed backend is tried anyway (a guess beats a sure 502).
    pub fn pick(&self, input: &PickInput<'_>, exclude: Option<&Arc<Backend>>) -> Option<Pick> {
        let active = self.active.load();
        if active.len() == 1 {
            return Some(Pick {
                set_cookie: self.cookie_missing(input, &active[0]),
                backend: active[0].clone(),
            });
        }
        let now = backend::now_ms();
        let up = |b: &Arc<Backend>| b.state_at(now, self.slow_start).takes_new_work();
        let other = |b: &Arc<Backend>| exclude.is_none_or(|x| !Arc::ptr_eq(x, b));
        // Tiers: up and not just tried; up; anything listed.
        self.pick_among(input, &active, now, |b| up(b) && other(b))
            .or_else(|| self.pick_among(input, &active, now, up))
            .or_else(|| self.pick_among(input, &active, now, other))
            .or_else(|| {
                active.first().map(|b| Pick {
                    backend: b.clone(),
                    set_cookie: self.cookie_missing(input, b),
                })
            })
    }

    fn pick_among(
        &self,
        input: &PickInput<'_>,
        active: &[Arc<Backend>],
        now: u64,
        filter: impl Fn(&Arc<Backend>) -> bool + Copy,
    ) -> Option<Pick> {
        let slow_start = self.slow_start;
        let candidates = || {
            active
                .iter()
                .filter(move |b| filter(b))
                .map(move |b| balance::Candidate {
                    backend: b,
                    weight: u64::from(b.weight()) * b.slow_start_factor(now, slow_start),
                })
        };
        let chosen = match &self.balance {
            Balance::LeastConn => balance::least_conn(candidates()),
            Balance::RoundRobin => {
                let list: Vec<_> = candidates().collect();
                let n = self.round_robin.fetch_add(1, Ordering::Relaxed);
                balance::round_robin(n, &self.round_robin_scores, &list)
            }
            Balance::Hash(key) => match balance::key_hash(key, input) {
                Some(h) => balance::rendezvous(h, candidates()),
                None => balance::least_conn(candidates()),
            },
            Balance::Cookie(name) => {
                let wanted = balance::cookie(input.headers, name);
                let pinned = wanted.and_then(|v| candidates().find(|c| c.backend.affinity == v));
                match pinned {
                    Some(c) => {
                        return Some(Pick {
                            backend: c.backend.clone(),
                            set_cookie: false,
                        })
                    }
                    None => balance::least_conn(candidates()),
                }
            }
        }?;
        Some(Pick {
            set_cookie: self.cookie_missing(input, chosen),
            backend: chosen.clone(),
        })
    }

    /// `balance = "cookie"` and the request does not already name `backend`.
    fn cookie_missing(&self, input: &PickInput<'_>, backend: &Backend) -> bool {
        match &self.balance {
            Balance::Cookie(name) => {
                balance::cookie(input.headers, name) != Some(&backend.affinity)
            }
            _ => false,
        }
    }

    /// The `Set-Cookie` value that pins a client to `backend`.
    pub fn affinity_cookie(&self, backend: &Backend, path: &str, tls: bool) -> Option<String> {
        let Balance::Cookie(name) = &self.balance else {
            return None;
        };
        let path = if path.is_empty() { "/" } else { path };
        let secure = if tls { "; Secure" } else { "" };
        Some(format!(
            "{name}={}; Path={path}; HttpOnly{secure}; SameSite=Lax",
            backend.affinity
        ))
    }

    /// Whether this upstream looks names up with `resolver` (a reload that replaces the
    /// resolver rebuilds the routes, so their DNS watchers use the new one).
    pub fn uses_resolver(&self, resolver: &Option<Arc<discovery::Resolver>>) -> bool {
        match (&self.ctx.resolver, resolver) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The upstream that serves this route now: this one, or the one a reload put in its
    /// place (a stream that began before a reload resumes on the backends listed now).
    pub fn latest(self: &Arc<Self>) -> Arc<Upstream> {
        let mut current = self.clone();
        // A chain of reloads; bounded all the same, in case of a cycle that cannot happen.
        for _ in 0..1_000 {
            let next = current.successor.lock().ok().and_then(|n| n.upgrade());
            match next {
                Some(n) => current = n,
                None => break,
            }
        }
        current
    }

    /// `rebalance = true`: once a second, a backend that has held more than 1.25x its weighted
    /// share of the route's WebSockets and streams for a while sheds connections, at most a
    /// tenth of the route's a second, until it is down to its share.
    fn rebalance(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let (stop, drain) = (self.stop.clone(), self.ctx.drain.clone());
        self.ctx.drain.spawn(async move {
            let mut states: std::collections::HashMap<u64, held::ShedState> = Default::default();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                    _ = drain.draining() => return,
                }
                let Some(upstream) = weak.upgrade() else {
                    return;
                };
                upstream.rebalance_tick(&mut states);
            }
        });
    }

    fn rebalance_tick(&self, states: &mut std::collections::HashMap<u64, held::ShedState>) {
        let now = tokio::time::Instant::now();
        let ms = backend::now_ms();
        let active = self.active.load();
        // Only backends that take new work share the load: a moved connection must have
        // somewhere to go.
        let up: Vec<(&Arc<Backend>, usize, usize)> = active
            .iter()
            .filter(|b| b.state_at(ms, self.slow_start).takes_new_work())
            .map(|b| {
                let (all, staying) = b.held();
                (b, all, staying)
            })
            .collect();
        states.retain(|id, _| up.iter().any(|(b, ..)| b.hash_id == *id));
        if up.len() < 2 {
            return;
        }
        let total: usize = up.iter().map(|(_, all, _)| all).sum();
        let weights: u64 = up.iter().map(|(b, ..)| u64::from(b.weight())).sum();
        let mut budget = (total / 10).max(1);
        for (b, _, staying) in &up {
            let share = total as f64 * f64::from(b.weight()) / weights.max(1) as f64;
            let state = states.entry(b.hash_id).or_default();
            let n = held::shed(state, *staying, share, budget, now);
            if n > 0 {
                let asked = b.held.ask_some(n, MoveReason::Rebalance);
                budget -= asked.min(budget);
                tracing::info!(
                    route = %self.route,
                    backend = %b.address,
                    held = staying,
                    share = format!("{share:.1}"),
                    moving = asked,
                    "rebalancing: moving connections off a backend above its share"
                );
            }
        }
    }

    /// How many backends could be tried for one request (retries never exceed it).
    pub fn len(&self) -> usize {
        self.active.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn balance(&self) -> &Balance {
        &self.balance
    }

    /// Every backend with its state now, listed ones first, then those draining; draining
    /// backends whose last connection ended are forgotten here.
    pub fn snapshot(&self) -> Vec<(Arc<Backend>, State)> {
        let now = backend::now_ms();
        let mut out: Vec<(Arc<Backend>, State)> = self
            .active
            .load()
            .iter()
            .map(|b| (b.clone(), b.state_at(now, self.slow_start)))
            .collect();
        if let Ok(mut draining) = self.draining.lock() {
            draining.retain(|b| b.open() > 0);
            out.extend(draining.iter().map(|b| (b.clone(), State::Draining)));
        }
        for (b, state) in &out {
            b.metrics.up.set(i64::from(state.takes_new_work()));
        }
        out
    }
}

/// After `after`, asks the WebSockets and streams still open on `backend` to move, unless it
/// was listed again meanwhile (or the gateway is shutting down: the drain closes them then).
fn drain_later(backend: &Arc<Backend>, epoch: u64, after: Duration, route: &str, drain: &Drain) {
    if backend.held.is_empty() {
        return;
    }
    let (backend, route, stop) = (backend.clone(), route.to_string(), drain.clone());
    drain.spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(after) => {}
            _ = stop.draining() => return,
        }
        if backend.draining_since(epoch) {
            let moved = backend.held.ask_all(MoveReason::Drain);
            if moved > 0 {
                tracing::info!(route, backend = %backend.address, moving = moved, "backend_drain over: moving its WebSockets and streams");
            }
        }
    });
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("route", &self.route)
            .finish()
    }
}
