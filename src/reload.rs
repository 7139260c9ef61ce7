//! Live reload: on SIGHUP, and when the config file or a certificate file changes on disk, the
//! config and certificates are read again. A valid config takes effect for new requests and
//! handshakes at once; open WebSockets and streams keep the route and backend they have. An
//! invalid one is refused, and the old one keeps serving.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{CertFiles, Config, ConfigError};
use crate::drain::Drain;
use crate::metrics::ResultLabel;
use crate::proxy::Gateway;
use crate::router::Router;
use crate::tls::{self, CertStore, TlsError};

/// How often the files are checked. Polling (rather than inotify) also sees Kubernetes
/// ConfigMap and Secret updates, which swap a symlink rather than write the file.
const POLL_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What a reload needs to swap.
pub struct Reloader {
    pub path: PathBuf,
    pub gateway: Arc<Gateway>,
    pub certs: Arc<CertStore>,
    /// The config in force, to warn about settings that only a restart applies.
    pub running: std::sync::Mutex<Config>,
    /// What routes build their backends with (the resolver is replaced when `[resolver]`
    /// changes).
    pub fleet: std::sync::Mutex<crate::upstream::UpstreamContext>,
}

impl Reloader {
    /// Reads the config and certificates and, if both are valid, puts them in force.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let result = self.try_reload();
        let label = ResultLabel {
            result: if result.is_ok() { "success" } else { "failure" },
        };
        self.gateway.metrics.reloads.get_or_create(&label).inc();
        match &result {
            Ok(()) => tracing::info!(path = %self.path.display(), "config reloaded"),
            Err(e) => tracing::error!(
                error = %crate::proxy::error::error_chain(e),
                "config reload refused, the previous config stays in force"
            ),
        }
        result
    }

    fn try_reload(&self) -> Result<(), ReloadError> {
        let config = Config::load(&self.path)?;
        let certs = tls::load_certs(&config.certs)?;
        self.certs.replace(&certs)?;
        let (routes_changed, resolver_changed) = match self.running.lock() {
            Ok(running) => (
                running.routes != config.routes,
                running.resolver != config.resolver,
            ),
            Err(_) => (true, true),
        };
        // A certificate-only change swaps certificates and nothing else.
        if routes_changed || resolver_changed {
            if let Ok(mut fleet) = self.fleet.lock() {
                if resolver_changed || fleet.resolver.is_none() {
                    fleet.resolver = crate::resolver_for(&config);
                    fleet.refresh = config.resolver.refresh;
                }
                let previous = self.gateway.router();
                // A new resolver means new watchers: rebuild the routes that discover.
                let keep = if resolver_changed {
                    None
                } else {
                    Some(&*previous)
                };
                let router = Router::new(&config.routes, &fleet, keep.or(Some(&*previous)));
                self.gateway.replace_router(router);
            }
        }
        for c in &certs {
            c.log();
        }
        self.gateway.set_log_query(config.log.query);
        if let Ok(mut running) = self.running.lock() {
            warn_restart_only(&running, &config);
            *running = config;
        }
        Ok(())
    }

    /// Listens for SIGHUP from now on: call before the gateway reports ready, so a SIGHUP can
    /// never find the default action (exit) in place.
    pub fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload on file change only");
                None
            }
        }
    }

    /// Reloads on SIGHUP and on file changes until the drain begins.
    pub async fn watch(
        self: Arc<Self>,
        mut hangup: Option<tokio::signal::unix::Signal>,
        drain: Drain,
    ) {
        let mut seen = self.fingerprint();
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = drain.draining() => return,
                _ = async {
                    match hangup.as_mut() {
                        Some(s) => { s.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    tracing::info!("SIGHUP received, reloading");
                    // Fingerprint first: a file written during the reload is seen next tick.
                    let now = self.fingerprint();
                    let _ = self.reload();
                    seen = now;
                }
                _ = tick.tick() => {
                    let now = self.fingerprint();
                    if now != seen {
                        tracing::info!(path = %self.path.display(), "config or certificate files changed, reloading");
                        // Remember the new contents even if they are refused: a broken file is
                        // reported once, not every second.
                        let _ = self.reload();
                        seen = now;
                    }
                }
            }
        }
    }

    /// A hash of the config file and the certificate files it names (as far as they exist).
    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        hash_file(&self.path, &mut h);
        let certs: Vec<CertFiles> = self
            .running
            .lock()
            .map(|c| c.certs.clone())
            .unwrap_or_default();
        for c in &certs {
            hash_file(&c.cert, &mut h);
            hash_file(&c.key, &mut h);
        }
        // JWKS files (`jwt_jwks`) are watched like certificates.
        let jwks: Vec<PathBuf> = self
            .running
            .lock()
            .map(|c| {
                c.routes
                    .iter()
                    .filter_map(|r| Some(r.auth.as_ref()?.jwks_file()?.to_path_buf()))
                    .collect()
            })
            .unwrap_or_default();
        for path in &jwks {
            hash_file(path, &mut h);
        }
        h.finish()
    }
}

fn hash_file(path: &Path, h: &mut DefaultHasher) {
    match std::fs::read(path) {
        Ok(bytes) => bytes.hash(h),
        Err(e) => e.kind().hash(h),
    }
}

fn warn_restart_only(old: &Config, new: &Config) {
    let changed = |what: &str| {
        tracing::warn!(
            setting = what,
            "changed in the file, but only a restart applies it"
        );
    };
    if old.listen.https != new.listen.https
        || old.listen.http != new.listen.http
        || old.listen.admin != new.listen.admin
    {
        changed("listen");
    }
    if old.listen.http_mode != new.listen.http_mode {
        changed("listen.http_mode");
    }
    if format!("{:?}", old.limits) != format!("{:?}", new.limits) {
        changed("limits");
    }
    if old.shutdown.grace != new.shutdown.grace || old.shutdown.delay != new.shutdown.delay {
        tracing::info!("shutdown.grace and shutdown.delay changes apply to the next shutdown");
    }
    if old.worker_threads != new.worker_threads {
        changed("runtime.worker_threads");
    }
    if old.log.access != new.log.access || old.log.format != new.log.format {
        changed("log.access, log.format");
    }
    if old.listen.control_socket != new.listen.control_socket {
        changed("listen.control_socket");
    }
    if old.acme != new.acme {
        changed("acme");
    }
}
