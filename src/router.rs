//! The route table: picks the route for a request's host and path (most specific host, then
//! longest path prefix on a segment boundary).

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::{HostMatch, RouteConfig};
use crate::metrics::{Metrics, RouteMetrics};
use crate::upstream::{Upstream, UpstreamContext};

/// Clients a route's rate limit remembers at most (about 100 bytes each): past it, those seen
/// longest ago start again with a full bucket.
const RATE_LIMIT_KEYS: usize = 65_536;

/// A route as the proxy uses it: its config plus the state shared by its requests.
pub struct Route {
    pub config: RouteConfig,
    /// `host/path` (`*` for any host), computed once for logs, metrics and error bodies.
    pub name: String,
    /// The backends, their pools and health; carried over by reloads that keep the route.
    pub upstream: Arc<Upstream>,
    /// Open WebSockets allowed on this route, when `websocket.max_connections` is set.
    pub websocket_slots: Option<Arc<Semaphore>>,
    /// `[route.rate_limit]`'s buckets; carried over by a reload that keeps the same limit.
    pub rate_limiter: Option<Arc<crate::limiter::KeyedLimiter<Vec<u8>>>>,
    /// `max_new_streams_per_second`; carried over by a reload that keeps the same rate.
    pub stream_admission: Option<Arc<crate::limiter::RouteBucket>>,
    pub metrics: RouteMetrics,
    /// `[route.auth]`: keys, the auth service's pool and counters; a fetched JWKS is carried
    /// over by reloads that keep its URL.
    pub auth: Option<Arc<crate::auth::RouteAuth>>,
    /// Where connect failures are counted, by backend.
    pub all_metrics: Arc<Metrics>,
}

impl Route {
    /// A route for `config`, keeping what `previous` (the same route before a reload) had:
    /// backends with their pools and health, and the WebSocket limit's open count.
    pub fn new(config: RouteConfig, ctx: &UpstreamContext, previous: Option<&Route>) -> Route {
        let name = config.name();
        let websocket_slots = match previous {
            Some(p) if p.config.websocket.max_connections == config.websocket.max_connections => {
                p.websocket_slots.clone()
            }
            _ => config
                .websocket
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n))),
        };
        if let (Some(p), Some(new)) = (previous, &websocket_slots) {
            if let (Some(old), Some(limit)) = (&p.websocket_slots, config.websocket.max_connections)
            {
                // A changed limit: the WebSockets open under the old one still count.
                if !Arc::ptr_eq(old, new) {
                    let open =
                        p.config.websocket.max_connections.unwrap_or(0) - old.available_permits();
                    let _ = new
                        .try_acquire_many(open.min(limit) as u32)
                        .map(|permits| permits.forget());
                }
            }
        }
        let rate_limiter = match (previous, &config.rate_limit) {
            (Some(p), Some(limit)) if p.config.rate_limit.as_ref() == Some(limit) => {
                p.rate_limiter.clone()
            }
            (_, Some(limit)) => Some(Arc::new(crate::limiter::KeyedLimiter::new(
                crate::limiter::Rate {
                    per_second: f64::from(limit.requests_per_second),
                    burst: f64::from(limit.burst),
                },
                RATE_LIMIT_KEYS,
            ))),
            (_, None) => None,
        };
        let stream_admission = match (previous, config.max_new_streams_per_second) {
            (Some(p), Some(rate)) if p.config.max_new_streams_per_second == Some(rate) => {
                p.stream_admission.clone()
            }
            (_, Some(rate)) => Some(Arc::new(crate::limiter::RouteBucket::new(
                crate::limiter::Rate {
                    per_second: f64::from(rate),
                    burst: f64::from(rate),
                },
            ))),
            (_, None) => None,
        };
        let auth = config.auth.as_ref().map(|a| {
            let old = previous.and_then(|p| p.auth.as_deref());
            Arc::new(crate::auth::RouteAuth::new(a, &name, &ctx.metrics, old))
        });
        Route {
            auth,
            rate_limiter,
            stream_admission,
            metrics: ctx.metrics.route(&name),
            all_metrics: ctx.metrics.clone(),
            upstream: Upstream::new(&config, &name, previous.map(|p| &*p.upstream), ctx),
            name,
            websocket_slots,
            config,
        }
    }

    /// The path to send to the backend: the client's path with the prefix removed when
    /// `strip_prefix` is set, byte for byte otherwise.
    pub fn backend_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.config.strip_prefix || self.config.path.is_empty() {
            return path.into();
        }
        let rest = &path[self.config.path.len().min(path.len())..];
        if rest.is_empty() || !rest.starts_with('/') {
            format!("/{rest}").into()
        } else {
            rest.into()
        }
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route").field("name", &self.name).finish()
    }
}

/// All routes, ordered so the first match is the most specific one.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// The route table for `configs`. With `previous` (a reload), a route that did not change
    /// is kept as it is, and a changed one keeps the backends it still lists.
    pub fn new(
        configs: &[RouteConfig],
        ctx: &UpstreamContext,
        previous: Option<&Router>,
    ) -> Router {
        let mut routes: Vec<Arc<Route>> = configs
            .iter()
            .map(|c| {
                let old = previous.and_then(|p| {
                    p.routes
                        .iter()
                        .find(|r| r.config.host == c.host && r.config.path == c.path)
                });
                match old {
                    Some(old)
                        if same_route(&old.config, c)
                            && old.upstream.uses_resolver(&ctx.resolver) =>
                    {
                        old.clone()
                    }
                    _ => Arc::new(Route::new(c.clone(), ctx, old.map(|r| &**r))),
                }
            })
            .collect();
        // Exact hosts, then wildcards (longer suffix first), then any host; within a host class,
        // longer prefixes first. A stable sort keeps file order for equal keys.
        routes.sort_by_key(|r| {
            let host_rank = match &r.config.host {
                HostMatch::Exact(_) => (0, 0),
                HostMatch::Wildcard(s) => (1, usize::MAX - s.len()),
                HostMatch::Any => (2, 0),
            };
            (host_rank, usize::MAX - r.config.path.len())
        });
        Router { routes }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route for `host` (lowercase, no port; `None` when the request named none) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| host_matches(&r.config.host, host) && prefix_matches(&r.config.path, path))
    }
}

/// Equal but for the route's place in the file.
fn same_route(a: &RouteConfig, b: &RouteConfig) -> bool {
    RouteConfig {
        index: b.index,
        ..a.clone()
    } == *b
}

fn host_matches(rule: &HostMatch, host: Option<&str>) -> bool {
    match (rule, host) {
        (HostMatch::Any, _) => true,
        (HostMatch::Exact(name), Some(h)) => name == h,
        // "*.example.com" matches "a.example.com" and "a.b.example.com", not "example.com".
        (HostMatch::Wildcard(suffix), Some(h)) => {
            h.len() > suffix.len() && h.ends_with(suffix.as_str())
        }
        (_, None) => false,
    }
}

/// `/ws` matches `/ws`, `/ws/`, `/ws/a` and `/ws?x`, never `/wsx`. The empty prefix matches all.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The host to route on for an authority (`host[:port]`, from `:authority`, an absolute-form
/// target or `Host`): lowercase, without its port or a trailing dot. Which authority a request
/// names, and whether its `Host` agrees, is decided in `proxy::request`.
pub fn route_host(authority: &str) -> Option<String> {
    let host = strip_port(authority).trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [::1]:8443 -> [::1]
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn router(toml_routes: &str) -> Router {
        let text = format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\n[[cert]]\ncert = \"c\"\nkey = \"k\"\n{toml_routes}"
        );
        let config = Config::parse(Path::new("test.toml"), &text).expect("test config is valid");
        Router::new(&config.routes, &context(), None)
    }

    fn context() -> UpstreamContext {
        UpstreamContext {
            metrics: Arc::new(Metrics::new()),
            drain: crate::drain::Drain::new(),
            resolver: None,
            refresh: std::time::Duration::from_secs(5),
        }
    }

    fn found(r: &Router, host: Option<&str>, path: &str) -> Option<String> {
        r.find(host, path)
            .map(|r| r.config.backends[0].authority.to_string())
    }

    #[test]
    fn most_specific_host_then_longest_prefix_wins() {
        let r = router(
            r#"
[[route]]
path = "/"
backends = ["http://any:1"]
[[route]]
path = "/api"
backends = ["http://any-api:1"]
[[route]]
host = "*.example.com"
backends = ["http://wild:1"]
[[route]]
host = "*.b.example.com"
backends = ["http://wild-b:1"]
[[route]]
host = "chat.example.com"
path = "/ws"
backends = ["http://chat-ws:1"]
[[route]]
host = "chat.example.com"
backends = ["http://chat:1"]
"#,
        );
        let cases = [
            (Some("chat.example.com"), "/ws/a", "chat-ws:1"),
            (Some("chat.example.com"), "/ws", "chat-ws:1"),
            (Some("chat.example.com"), "/wsx", "chat:1"),
            (Some("chat.example.com"), "/api", "chat:1"),
            (Some("x.example.com"), "/api", "wild:1"),
            (Some("x.b.example.com"), "/", "wild-b:1"),
            (Some("example.com"), "/api/v1", "any-api:1"),
            (Some("other.org"), "/apix", "any:1"),
            (None, "/api/", "any-api:1"),
        ];
        for (host, path, want) in cases {
            assert_eq!(
                found(&r, host, path).as_deref(),
                Some(want),
                "{host:?} {path}"
            );
        }
    }

    #[test]
    fn no_route_when_nothing_matches() {
        let r = router(
            "[[route]]\nhost = \"a.example\"\npath = \"/ws\"\nbackends = [\"http://a:1\"]\n",
        );
        assert_eq!(found(&r, Some("a.example"), "/wsx"), None);
        assert_eq!(found(&r, Some("b.example"), "/ws"), None);
        assert_eq!(found(&r, None, "/ws"), None);
    }

    #[test]
    fn strip_prefix_keeps_the_rest_byte_for_byte() {
        let r = router(
            "[[route]]\npath = \"/api/\"\nstrip_prefix = true\nbackends = [\"http://a:1\"]\n",
        );
        let route = r.find(None, "/api//ws/2").expect("route matches");
        assert_eq!(route.backend_path("/api//ws/2?q=%2F"), "//ws/2?q=%2F");
        assert_eq!(route.backend_path("/api"), "/");
        assert_eq!(route.backend_path("/api?x=1"), "/?x=1");
    }

    #[test]
    fn round_robin_visits_every_backend() {
        let r = router("[[route]]\nbalance = \"round_robin\"\nbackends = [\"http://a:1\", \"http://b:1\", \"http://c:1\"]\n");
        let route = &r.routes()[0];
        let headers = http::HeaderMap::new();
        let input = crate::upstream::PickInput {
            client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            headers: &headers,
            query: None,
        };
        let firsts: Vec<String> = (0..3)
            .map(|_| {
                route
                    .upstream
                    .pick(&input, None)
                    .expect("has backends")
                    .backend
                    .address
                    .to_string()
            })
            .collect();
        assert_eq!(firsts, ["a:1", "b:1", "c:1"]);
    }

    #[test]
    fn a_reload_keeps_unchanged_routes_and_listed_backends() {
        let text = |backends: &str| {
            format!("[listen]\nhttps = \"127.0.0.1:0\"\n[[cert]]\ncert = \"c\"\nkey = \"k\"\n[[route]]\npath = \"/a\"\nbackends = [\"http://a:1\"]\n[[route]]\npath = \"/b\"\nbackends = {backends}\n")
        };
        let ctx = context();
        let first = Config::parse(
            Path::new("t.toml"),
            &text("[\"http://b:1\", \"http://c:1\"]"),
        )
        .expect("valid");
        let second = Config::parse(
            Path::new("t.toml"),
            &text("[\"http://c:1\", \"http://d:1\"]"),
        )
        .expect("valid");
        let old = Router::new(&first.routes, &ctx, None);
        let new = Router::new(&second.routes, &ctx, Some(&old));
        let by_path = |r: &Router, p: &str| {
            r.routes()
                .iter()
                .find(|x| x.config.path == p)
                .expect("route")
                .clone()
        };
        assert!(
            Arc::ptr_eq(&by_path(&old, "/a"), &by_path(&new, "/a")),
            "unchanged route kept whole"
        );
        let (old_b, new_b) = (by_path(&old, "/b"), by_path(&new, "/b"));
        let backend = |r: &Route, a: &str| {
            r.upstream
                .snapshot()
                .into_iter()
                .find(|(b, _)| b.address.as_str() == a)
                .map(|(b, _)| b)
        };
        let c_old = backend(&old_b, "c:1").expect("c listed before");
        let c_new = backend(&new_b, "c:1").expect("c listed after");
        assert!(
            Arc::ptr_eq(&c_old, &c_new),
            "a listed backend keeps its state"
        );
        assert!(backend(&new_b, "d:1").is_some());
        assert!(backend(&new_b, "b:1").is_none(), "b left with nothing open");
    }

    #[test]
    fn route_host_lowercases_and_drops_port() {
        assert_eq!(
            route_host("Chat.Example.com:8443").as_deref(),
            Some("chat.example.com")
        );
        assert_eq!(
            route_host("other.example.").as_deref(),
            Some("other.example")
        );
        assert_eq!(route_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(route_host(""), None);
    }
}
