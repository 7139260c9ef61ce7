//! The integration-test harness: real backends, a gateway started through `streamgate::serve`
//! on 127.0.0.1:0 with certificates made at test time, and HTTP/1.1 and HTTP/2 TLS clients.

pub mod admin;
pub mod backend;
pub mod body;
pub mod client;
pub mod dns;
pub mod events;
pub mod gateway;
pub mod jwt;
pub mod logs;
pub mod pebble;
pub mod pki;
pub mod process;
pub mod sse;
pub mod ws;

use std::future::Future;
use std::time::Duration;

pub use backend::{dead_backend_url, Backend, Blackhole, Echo, Held, Streaming};
pub use body::{empty, full, pattern_body, pattern_digest, Body, Digest};
pub use client::{Client, Proto};
pub use gateway::{route, GatewayBuilder};

/// The longest any single awaited event may take before the test fails. Generous: it only
/// bounds a hang, it never makes a test pass.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it has not finished within [`PATIENCE`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}
