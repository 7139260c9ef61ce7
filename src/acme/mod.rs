//! Automatic certificates (`[acme]`, RFC 8555): for each name no `[[cert]]` covers, a
//! certificate from the cache or a new order, renewed when a third of its lifetime is left,
//! swapped into the [`CertStore`] as a reloaded certificate file would be.
//!
//! - [`challenge`]: the answers the listeners serve while an order is pending (tls-alpn-01 on
//!   the TLS listener, http-01 on the plain one).
//! - `order`: one order, from new-order to the certificate chain.
//! - `cache`: the account and certificates on disk, reused across restarts.
//! - `client`: the HTTPS client to the CA (hyper over tokio-rustls).

pub mod cache;
pub mod challenge;
mod client;
mod order;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{Account, NewAccount};

pub use challenge::{Challenges, ACME_TLS_ALPN, HTTP01_PREFIX};

use crate::config::AcmeConfig;
use crate::drain::Drain;
use crate::tls::{CertStore, LoadedCert, TlsError};

/// The first retry after a failed order; each failure doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{origin}: cannot read CA certificates from {path}")]
    ReadRoots {
        origin: String,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{origin}: no usable certificate in {path}: expected PEM \"-----BEGIN CERTIFICATE-----\" blocks")]
    NoRoots { origin: String, path: PathBuf },
    #[error("cannot set up TLS for the ACME client")]
    Tls(#[source] rustls::Error),
    #[error("ACME server request failed")]
    Server(#[from] instant_acme::Error),
    #[error("{path}: cannot write the ACME cache")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: cannot make a key or certificate request")]
    Key {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{name}: the CA offers no {kind} challenge")]
    NoChallenge { name: String, kind: &'static str },
    #[error("{name}: validation failed: {detail}")]
    Invalid { name: String, detail: String },
    #[error("{name}: the certificate from the CA is unusable")]
    Certificate {
        name: String,
        #[source]
        source: Box<TlsError>,
    },
}

/// Obtains and renews the `[acme]` certificates of one gateway.
pub struct Acme {
    config: AcmeConfig,
    /// The names to certify: `acme.domains` (or the exact route hosts) that no `[[cert]]`
    /// covered at start-up.
    names: Vec<String>,
    store: Arc<CertStore>,
    challenges: Arc<Challenges>,
    cache: cache::Cache,
    http: client::HttpsClient,
    /// Created or loaded on the first order, and forgotten when the CA no longer knows it.
    account: tokio::sync::Mutex<Option<Account>>,
}

impl Acme {
    /// Reads `acme.ca_roots` and installs the cached certificates that can still be served,
    /// so a restart answers with them from the first handshake. Contacts no one.
    pub fn new(
        config: &AcmeConfig,
        names: Vec<String>,
        store: Arc<CertStore>,
    ) -> Result<Acme, AcmeError> {
        let roots = config
            .ca_roots
            .as_deref()
            .map(|p| (p, config.ca_roots_origin.as_str()));
        let http = client::HttpsClient::new(roots)?;
        let cache = cache::Cache::new(config);
        for name in &names {
            if let Some(cert) = cache.cert(name).filter(|c| !c.expired) {
                tracing::info!(%name, not_after = %cert.not_after, source = %cert.source, "acme certificate from cache");
                store.set_acme(name, cert);
            }
        }
        Ok(Acme {
            config: config.clone(),
            names,
            challenges: store.challenges(),
            store,
            cache,
            http,
            account: tokio::sync::Mutex::new(None),
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Keeps every name certified until the drain begins.
    pub async fn run(self: Arc<Self>, drain: Drain) {
        tracing::info!(directory = %self.config.directory, challenge = self.config.challenge.name(), names = ?self.names, "acme: certificates for names no [[cert]] covers");
        let all = self.names.iter().map(|name| self.keep(name));
        tokio::select! {
            _ = futures_util::future::join_all(all) => {}
            _ = drain.draining() => {}
        }
    }

    /// Orders `name` when it has no certificate or its renewal time has come; after a failure,
    /// again after a growing, jittered backoff (the certificate in use stays in use).
    async fn keep(&self, name: &str) {
        let mut current: Option<LoadedCert> = self.store.acme_cert(name);
        let mut renew_at = current.as_ref().map(renewal_time);
        let mut failures = 0u32;
        loop {
            let wait = match (failures, renew_at) {
                (0, None) => Duration::ZERO,
                (0, Some(at)) => until(at),
                (n, _) => backoff(n),
            };
            if !wait.is_zero() {
                tracing::debug!(%name, wait_s = wait.as_secs(), "acme: next order");
                tokio::time::sleep(wait).await;
            }
            let renewing = current.is_some();
            match self.order_once(name).await {
                Ok(cert) => {
                    tracing::info!(%name, not_after = %cert.not_after, renewed = renewing, "acme certificate installed");
                    renew_at = Some(renewal_time(&cert));
                    self.store.set_acme(name, cert.clone());
                    current = Some(cert);
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(
                        %name,
                        error = %crate::proxy::error::error_chain(&e),
                        attempt = failures,
                        retry_in_s = backoff(failures).as_secs(),
                        "acme order failed; serving the fallback or current certificate until a retry succeeds"
                    );
                }
            }
        }
    }

    async fn order_once(&self, name: &str) -> Result<LoadedCert, AcmeError> {
        let account = self.account().await?;
        let result = self.order(&account, name).await;
        if let Err(AcmeError::Server(instant_acme::Error::Api(problem))) = &result {
            if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist") {
                // The CA forgot the account (a test CA restarted): make a new one next time.
                tracing::warn!("acme account unknown to the CA; a new one will be created");
                self.cache.forget_account();
                *self.account.lock().await = None;
            }
        }
        result
    }

    /// The account from the cache, or a new one (saved to the cache).
    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(account) = slot.as_ref() {
            return Ok(account.clone());
        }
        let builder = || Account::builder_with_http(Box::new(self.http.clone()));
        if let Some(credentials) = self.cache.account() {
            match builder().from_credentials(credentials).await {
                Ok(account) => {
                    *slot = Some(account.clone());
                    return Ok(account);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "acme: cached account unusable; creating a new one")
                }
            }
        }
        let contact = self.config.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()
            .create(
                &NewAccount {
                    contact: &contacts,
                    // Configuring [acme] is agreeing to the CA's terms (README, Certificates).
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await?;
        self.cache.save_account(&credentials)?;
        tracing::info!(directory = %self.config.directory, "acme account created");
        *slot = Some(account.clone());
        Ok(account)
    }
}

/// When to renew: once a third of the certificate's lifetime is left, a little earlier by a
/// random share of up to a twentieth of it, so a fleet that started together does not renew
/// together. Unix time in milliseconds.
pub fn renewal_time(cert: &LoadedCert) -> i64 {
    let lifetime_ms = (cert.not_after_unix - cert.not_before_unix).max(0) * 1000;
    let jitter = fastrand::i64(0..=lifetime_ms / 20);
    cert.not_after_unix * 1000 - lifetime_ms / 3 - jitter
}

/// From now until `at` (Unix milliseconds); zero if it has passed.
fn until(at: i64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Duration::from_millis((at - now).max(0) as u64)
}

/// The wait after `failures` failed orders in a row: 10 s doubling to an hour, ±10 %.
fn backoff(failures: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    base.mul_f64(0.9 + fastrand::f64() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_stops_at_an_hour() {
        let secs = |n| backoff(n).as_secs_f64();
        assert!((9.0..=11.0).contains(&secs(1)), "{}", secs(1));
        assert!((18.0..=22.0).contains(&secs(2)), "{}", secs(2));
        assert!((3240.0..=3960.0).contains(&secs(40)), "{}", secs(40));
    }

    #[test]
    fn renewal_comes_when_a_third_of_the_lifetime_is_left() {
        let (cert, _) = crate::tls::self_signed(&["a.test"]).expect("self-signed");
        let cert = LoadedCert {
            not_before_unix: 1_000_000,
            not_after_unix: 1_000_000 + 90 * 86_400,
            ..cert
        };
        for _ in 0..100 {
            let at = renewal_time(&cert);
            let latest = (1_000_000 + 60 * 86_400) * 1000;
            assert!(at <= latest, "{at}");
            assert!(at >= latest - 90 * 86_400 * 1000 / 20, "{at}");
        }
    }
}
