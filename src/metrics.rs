//! Prometheus metrics: one registry per gateway, with per-route handles made once per route so
//! the request path only touches atomics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub listener: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub route: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub route: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub route: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub route: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackendLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendRequestLabels {
    pub route: String,
    pub backend: String,
    pub code_class: &'static str,
}

/// `streamgate_auth_total`: one request's access-control outcome on a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertNameLabel {
    pub name: String,
}

/// `streamgate_certificate_expiry_seconds{name}`: one series per certificate name (a DNS
/// name, or the file for a certificate without one), for the certificate that name is served.
#[derive(Clone, Debug, Default)]
pub struct CertExpiry(Family<CertNameLabel, Gauge>);

impl CertExpiry {
    /// Replaces the series with those of `certs`, in the order the resolver prefers them.
    pub fn set<'a>(&self, certs: impl Iterator<Item = &'a crate::tls::LoadedCert>) {
        self.0.clear();
        let mut seen = std::collections::HashSet::new();
        for c in certs {
            let names: Vec<&String> = if c.names.is_empty() {
                vec![&c.source]
            } else {
                c.names.iter().collect()
            };
            for name in names {
                if seen.insert(name.clone()) {
                    self.0
                        .get_or_create(&CertNameLabel { name: name.clone() })
                        .set(c.not_after_unix);
                }
            }
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Status classes, in the order of the per-class counter arrays.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms to ~9 h in factors of 4.
    Histogram::new(exponential_buckets(0.001, 4.0, 16))
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub connections: Family<ConnLabels, Gauge>,
    pub websockets: Family<RouteLabel, Gauge>,
    pub sse_streams: Family<RouteLabel, Gauge>,
    pub requests: Family<RequestLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub upstream_connect_failures: Family<BackendLabel, Counter>,
    pub tls_handshake_failures: Counter,
    pub reloads: Family<ResultLabel, Counter>,
    pub request_duration: Histograms<RouteLabel>,
    pub stream_lifetime: Histograms<StreamLabels>,
    pub backend_open: Family<RouteBackendLabels, Gauge>,
    pub backend_up: Family<RouteBackendLabels, Gauge>,
    pub backend_requests: Family<BackendRequestLabels, Counter>,
    pub backend_ejections: Family<RouteBackendLabels, Counter>,
    pub rate_limited: Family<StreamLabels, Counter>,
    pub per_ip_refused: Counter,
    pub sse_resumes: Family<OutcomeLabels, Counter>,
    pub moved: Family<ReasonLabels, Counter>,
    pub admission_rejected: Family<RouteLabel, Counter>,
    /// Each certificate name's expiry (notAfter), Unix seconds: files and ACME alike.
    pub certificate_expiry: CertExpiry,
    /// Access-control outcomes by route and result (issue 14).
    pub auth: Family<AuthLabels, Counter>,
    /// WebSockets and streams ended because their token expired, by route and kind.
    pub token_expired: Family<StreamLabels, Counter>,
    /// How many live backends use each label set: removed from the exposition at zero, so
    /// addresses that DNS no longer lists do not pile up.
    backend_users: std::sync::Mutex<std::collections::HashMap<RouteBackendLabels, usize>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("streamgate");
        let m = Metrics {
            connections: Family::default(),
            websockets: Family::default(),
            sse_streams: Family::default(),
            requests: Family::default(),
            bytes: Family::default(),
            upstream_connect_failures: Family::default(),
            tls_handshake_failures: Counter::default(),
            reloads: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            stream_lifetime: Family::new_with_constructor(duration_histogram),
            backend_open: Family::default(),
            backend_up: Family::default(),
            backend_requests: Family::default(),
            backend_ejections: Family::default(),
            rate_limited: Family::default(),
            per_ip_refused: Counter::default(),
            sse_resumes: Family::default(),
            moved: Family::default(),
            admission_rejected: Family::default(),
            certificate_expiry: CertExpiry::default(),
            auth: Family::default(),
            token_expired: Family::default(),
            backend_users: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "open_connections",
            "Open client connections by listener and protocol",
            m.connections.clone(),
        );
        registry.register(
            "open_websockets",
            "Open WebSocket tunnels by route",
            m.websockets.clone(),
        );
        registry.register(
            "open_sse_streams",
            "Open Server-Sent Events streams by route",
            m.sse_streams.clone(),
        );
        registry.register(
            "requests",
            "Requests by route and status class",
            m.requests.clone(),
        );
        registry.register(
            "bytes",
            "Body and tunnel bytes by route, in (to backends) and out (to clients)",
            m.bytes.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed connections to backends",
            m.upstream_connect_failures.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response, by route (streams excluded)",
            m.request_duration.clone(),
        );
        registry.register(
            "stream_lifetime_seconds",
            "Lifetime of WebSocket tunnels and SSE streams, by route and kind",
            m.stream_lifetime.clone(),
        );
        registry.register(
            "backend_open",
            "Requests in flight, WebSockets and SSE streams open on a backend",
            m.backend_open.clone(),
        );
        registry.register(
            "backend_up",
            "Whether a backend takes new work (1) or not (0: unhealthy, ejected or draining)",
            m.backend_up.clone(),
        );
        registry.register(
            "backend_requests",
            "Responses from a backend by status class",
            m.backend_requests.clone(),
        );
        registry.register(
            "backend_ejections",
            "Times a backend was ejected by passive health checking",
            m.backend_ejections.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused (429) and WebSockets closed (1008) for going over a rate, by route and kind",
            m.rate_limited.clone(),
        );
        registry.register(
            "per_ip_refused_connections",
            "Connections closed because their client already held limits.per_ip_connections",
            m.per_ip_refused.clone(),
        );
        registry.register(
            "sse_resumes",
            "Event streams continued on another backend, by route and outcome: resumed, failed (one try), exhausted (resume_attempts used up), not_resumable (no event id)",
            m.sse_resumes.clone(),
        );
        registry.register(
            "moved_connections",
            "WebSockets and event streams the gateway moved off their backend, by route and reason: drain, age, rebalance",
            m.moved.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Expiry (notAfter) of the certificate served for each name, Unix time in seconds; [[cert]] files and [acme] alike",
            m.certificate_expiry.0.clone(),
        );
        registry.register(
            "admission_rejected",
            "WebSocket upgrades and event-stream requests refused (503) over max_new_streams_per_second, by route",
            m.admission_rejected.clone(),
        );
        registry.register(
            "auth",
            "Access-control outcomes by route and result: allowed, missing, invalid, expired, forbidden, forward_denied, forward_error",
            m.auth.clone(),
        );
        registry.register(
            "token_expired_connections",
            "WebSockets (closed with 1008) and event streams ended because their token expired, by route and kind",
            m.token_expired.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The handles of one backend of one route; give them back with [`Metrics::release`].
    pub fn backend(&self, route: &str, backend: &str) -> BackendMetrics {
        let labels = RouteBackendLabels {
            route: route.to_string(),
            backend: backend.to_string(),
        };
        if let Ok(mut users) = self.backend_users.lock() {
            *users.entry(labels.clone()).or_default() += 1;
        }
        let class = |code_class| {
            self.backend_requests
                .get_or_create_owned(&BackendRequestLabels {
                    route: route.to_string(),
                    backend: backend.to_string(),
                    code_class,
                })
        };
        let up = self.backend_up.get_or_create_owned(&labels);
        up.set(1);
        BackendMetrics {
            open: self.backend_open.get_or_create_owned(&labels),
            up,
            requests: CLASSES.map(class),
            ejections: self.backend_ejections.get_or_create_owned(&labels),
            labels,
        }
    }

    /// A backend left for good: its series go when no other backend uses the same labels.
    pub fn release(&self, m: &BackendMetrics) {
        let Ok(mut users) = self.backend_users.lock() else {
            return;
        };
        let Some(n) = users.get_mut(&m.labels) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        users.remove(&m.labels);
        self.backend_open.remove(&m.labels);
        self.backend_up.remove(&m.labels);
        self.backend_ejections.remove(&m.labels);
        for code_class in CLASSES {
            self.backend_requests.remove(&BackendRequestLabels {
                route: m.labels.route.clone(),
                backend: m.labels.backend.clone(),
                code_class,
            });
        }
    }

    /// The Prometheus text exposition (OpenMetrics flavour).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The handles one route uses, created once.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let r = || RouteLabel {
            route: route.to_string(),
        };
        let class = |class| {
            self.requests.get_or_create_owned(&RequestLabels {
                route: route.to_string(),
                class,
            })
        };
        RouteMetrics {
            requests: CLASSES.map(class),
            bytes_in: self.bytes.get_or_create_owned(&BytesLabels {
                route: route.to_string(),
                direction: "in",
            }),
            bytes_out: self.bytes.get_or_create_owned(&BytesLabels {
                route: route.to_string(),
                direction: "out",
            }),
            websockets: self.websockets.get_or_create_owned(&r()),
            sse_streams: self.sse_streams.get_or_create_owned(&r()),
            duration: self.request_duration.get_or_create_owned(&r()),
            websocket_lifetime: self.stream_lifetime.get_or_create_owned(&StreamLabels {
                route: route.to_string(),
                kind: "websocket",
            }),
            sse_lifetime: self.stream_lifetime.get_or_create_owned(&StreamLabels {
                route: route.to_string(),
                kind: "sse",
            }),
            limited_requests: self.rate_limited.get_or_create_owned(&StreamLabels {
                route: route.to_string(),
                kind: "requests",
            }),
            limited_messages: self.rate_limited.get_or_create_owned(&StreamLabels {
                route: route.to_string(),
                kind: "messages",
            }),
            resumes: RESUME_OUTCOMES.map(|outcome| {
                self.sse_resumes.get_or_create_owned(&OutcomeLabels {
                    route: route.to_string(),
                    outcome,
                })
            }),
            moved: MOVE_REASONS.map(|reason| {
                self.moved.get_or_create_owned(&ReasonLabels {
                    route: route.to_string(),
                    reason,
                })
            }),
            admission_rejected: self.admission_rejected.get_or_create_owned(&r()),
        }
    }

    pub fn connect_failure(&self, backend: &str) {
        self.upstream_connect_failures
            .get_or_create(&BackendLabel {
                backend: backend.to_string(),
            })
            .inc();
    }
}

/// A route's metric handles (clones share the underlying atomics).
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    requests: [Counter; 5],
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub websockets: Gauge,
    pub sse_streams: Gauge,
    pub duration: Histogram,
    pub websocket_lifetime: Histogram,
    pub sse_lifetime: Histogram,
    pub limited_requests: Counter,
    pub limited_messages: Counter,
    resumes: [Counter; 4],
    moved: [Counter; 3],
    pub admission_rejected: Counter,
}

/// The outcomes of `streamgate_sse_resumes_total`, in the order of [`ResumeOutcome`].
const RESUME_OUTCOMES: [&str; 4] = ["resumed", "failed", "exhausted", "not_resumable"];
const MOVE_REASONS: [&str; 3] = ["drain", "age", "rebalance"];

/// What became of one try to continue an event stream elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    Resumed = 0,
    Failed = 1,
    Exhausted = 2,
    NotResumable = 3,
}

impl RouteMetrics {
    pub fn request(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[i].inc();
    }

    pub fn resume(&self, outcome: ResumeOutcome) {
        self.resumes[outcome as usize].inc();
    }

    /// A WebSocket or stream moved off its backend.
    pub fn moved(&self, reason: crate::upstream::MoveReason) {
        let i = MOVE_REASONS
            .iter()
            .position(|r| *r == reason.as_str())
            .unwrap_or(0);
        self.moved[i].inc();
    }

    /// Requests answered so far, and how many of them with a 5xx.
    pub fn totals(&self) -> (u64, u64) {
        let all = self.requests.iter().map(|c| c.get()).sum();
        (all, self.requests[4].get())
    }
}

/// One backend's handles (clones share the underlying atomics).
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    /// The open count least_conn reads: the gauge is the count.
    pub open: Gauge,
    pub up: Gauge,
    requests: [Counter; 5],
    pub ejections: Counter,
    labels: RouteBackendLabels,
}

impl BackendMetrics {
    pub fn response(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[i].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_handles_show_up_in_the_exposition() {
        let m = Metrics::new();
        let r = m.route("*/ws");
        r.request(204);
        r.request(502);
        r.bytes_out.inc_by(10);
        r.websockets.inc();
        m.connect_failure("127.0.0.1:9");
        let text = m.render();
        assert!(
            text.contains("streamgate_requests_total{route=\"*/ws\",class=\"2xx\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("streamgate_requests_total{route=\"*/ws\",class=\"5xx\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("streamgate_bytes_total{route=\"*/ws\",direction=\"out\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("streamgate_open_websockets{route=\"*/ws\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("streamgate_upstream_connect_failures_total{backend=\"127.0.0.1:9\"} 1"),
            "{text}"
        );
    }
}
