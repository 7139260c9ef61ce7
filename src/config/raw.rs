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
    pub cert: Vec<RawCert>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub https: Text,
    pub http: Option<Text>,
    pub http_mode: Option<Text>,
    pub admin: Option<Text>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub worker_threads: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub grace: Option<Text>,
    pub delay: Option<Text>,
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
    pub backends: Spanned<Vec<Text>>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub connect_timeout: Option<Text>,
    pub response_header_timeout: Option<Text>,
    pub websocket: Option<RawWebSocket>,
    pub sse: Option<RawSse>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebSocket {
    pub ping_interval: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub max_message_size: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub allowed_origins: Option<Vec<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSse {
    pub heartbeat: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub shutdown_retry: Option<Text>,
}
