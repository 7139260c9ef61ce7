//! The config file as TOML spells it: serde structs that reject unknown keys, nothing validated yet.

use serde::Deserialize;
use toml::Spanned;

/// A string value with the place in the file it came from, so validation errors can name a line.
pub type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: RawListen,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub resolver: RawResolver,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub cert: Vec<RawCert>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
    pub acme: Option<Spanned<RawAcme>>,
}

/// `[acme]`: certificates from an ACME CA (RFC 8555) for names no `[[cert]]` covers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: Option<Text>,
    pub email: Option<Text>,
    pub domains: Option<Vec<Text>>,
    pub cache: Option<Text>,
    pub challenge: Option<Text>,
    pub ca_roots: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub https: Text,
    pub http: Option<Text>,
    pub http_mode: Option<Text>,
    pub admin: Option<Text>,
    pub trusted_proxies: Option<Vec<Text>>,
    pub public_https_port: Option<Spanned<i64>>,
    pub backlog: Option<Spanned<i64>>,
    #[serde(default)]
    pub proxy_protocol: Option<Spanned<bool>>,
    pub control_socket: Option<Text>,
    pub tls_min_version: Option<Text>,
    pub hsts: Option<Text>,
    pub client_ca: Option<Text>,
    pub client_auth: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub header_read_timeout: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub max_header_size: Option<Spanned<i64>>,
    pub tls_handshake_timeout: Option<Text>,
    pub max_connections: Option<Spanned<i64>>,
    pub h2_max_concurrent_streams: Option<Spanned<i64>>,
    pub h2_max_pending_reset_streams: Option<Spanned<i64>>,
    pub h2_max_local_error_reset_streams: Option<Spanned<i64>>,
    pub per_ip_connections: Option<Spanned<i64>>,
    pub write_stall_timeout: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub worker_threads: Option<Spanned<i64>>,
}

/// `[log]`: where the access log goes and what it shows.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub access: Option<Text>,
    pub format: Option<Text>,
    pub query: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub grace: Option<Text>,
    pub delay: Option<Text>,
    pub spread: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: Text,
    pub key: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub host: Option<Text>,
    pub path: Option<Text>,
    pub backends: Spanned<Vec<Spanned<RawBackend>>>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub balance: Option<Text>,
    pub hash_key: Option<Text>,
    pub affinity_cookie: Option<Text>,
    pub retries: Option<Spanned<i64>>,
    pub slow_start: Option<Text>,
    pub health: Option<RawHealth>,
    pub outlier: Option<RawOutlier>,
    pub rate_limit: Option<RawRateLimit>,
    pub connect_timeout: Option<Text>,
    pub response_header_timeout: Option<Text>,
    pub backend_drain: Option<Text>,
    pub max_connection_age: Option<Text>,
    pub rebalance: Option<Spanned<bool>>,
    pub max_new_streams_per_second: Option<Spanned<i64>>,
    pub websocket: Option<RawWebSocket>,
    pub sse: Option<RawSse>,
    pub require_client_cert: Option<Spanned<bool>>,
    pub auth: Option<Spanned<RawAuth>>,
}

/// `[route.auth]`: who may use the route (issue 14).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub jwt_jwks: Option<Text>,
    pub jwt_jwks_url: Option<Text>,
    pub jwt_issuer: Option<Text>,
    pub jwt_audience: Option<Vec<Text>>,
    pub jwt_leeway: Option<Text>,
    pub token_from: Option<Vec<Text>>,
    pub claims_to_headers: Option<Spanned<std::collections::BTreeMap<String, Text>>>,
    pub forward_auth: Option<Text>,
    pub forward_auth_headers: Option<Vec<Text>>,
    pub end_at_expiry: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebSocket {
    pub ping_interval: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub max_message_size: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub allowed_origins: Option<Vec<Text>>,
    pub max_messages_per_second: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSse {
    pub heartbeat: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub shutdown_retry: Option<Text>,
    #[serde(default)]
    pub resume: bool,
    pub resume_attempts: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResolver {
    pub nameservers: Option<Vec<Text>>,
    pub refresh: Option<Text>,
}

/// One entry of `backends`: a URL string, or a table with the URL and its settings.
#[derive(Debug)]
pub enum RawBackend {
    Url(String),
    Table(RawBackendTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendTable {
    pub url: Text,
    pub weight: Option<Spanned<i64>>,
    pub discover: Option<Text>,
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawBackend;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL such as \"http://10.0.0.5:9000\" or a table such as { url = \"http://10.0.0.5:9000\", weight = 2 }")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Url(v.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawBackend, A::Error> {
                // The derived table keeps its fields' spans: the map access is toml's own.
                RawBackendTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawBackend::Table)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<Text>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub healthy_after: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub ejection: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: Spanned<i64>,
    pub burst: Option<Spanned<i64>>,
    pub key: Option<Text>,
}
