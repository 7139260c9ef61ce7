//! TLS termination: loads certificates and keys, picks one by SNI, builds the rustls config
//! (TLS 1.2 and 1.3, ALPN h2 and http/1.1).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::CertFiles;

/// Why certificates could not be loaded; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{origin}: cannot read certificate file {path}")]
    ReadCert {
        origin: String,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{origin}: no certificate found in {path}: expected a PEM file with \"-----BEGIN CERTIFICATE-----\", leaf first")]
    NoCert { origin: String, path: PathBuf },
    #[error("{origin}: cannot read private key {path}")]
    ReadKey {
        origin: String,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{origin}: no private key found in {path}: expected a PEM key (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")")]
    NoKey { origin: String, path: PathBuf },
    #[error("{path}: unsupported private key")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{origin}: private key {key} does not match the certificate in {cert}")]
    KeyMismatch {
        origin: String,
        cert: PathBuf,
        key: PathBuf,
    },
    #[error("{path}: cannot parse certificate: {message}")]
    ParseCert { path: PathBuf, message: String },
    #[error("cannot build TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A loaded certificate with what the logs and `check` show about it.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub source: String,
    /// DNS names from the subject alternative names, lowercase.
    pub names: Vec<String>,
    pub not_after: String,
    pub expired: bool,
    pub key: Arc<CertifiedKey>,
}

impl LoadedCert {
    /// Logs the certificate's names and expiry; an expired one as a warning.
    pub fn log(&self) {
        let (source, names, not_after) = (&self.source, &self.names, &self.not_after);
        if self.expired {
            tracing::warn!(%source, ?names, %not_after, "certificate has expired: clients will refuse it");
        } else {
            tracing::info!(%source, ?names, %not_after, "certificate");
        }
    }
}

/// aws-lc-rs, for the post-quantum hybrid key exchange that current Chrome and Firefox offer
/// first (X25519MLKEM768, which ring lacks); classic X25519 and the NIST curves follow for
/// every other client.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Loads every `[[cert]]` pair, checking that each key matches its certificate.
pub fn load_certs(files: &[CertFiles]) -> Result<Vec<LoadedCert>, TlsError> {
    files.iter().map(load_pair).collect()
}

fn load_pair(files: &CertFiles) -> Result<LoadedCert, TlsError> {
    let (cert_path, key_path) = (&files.cert, &files.key);
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCert {
            origin: files.cert_origin.clone(),
            path: cert_path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            origin: files.cert_origin.clone(),
            path: cert_path.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            origin: files.key_origin.clone(),
            path: key_path.to_path_buf(),
        },
        source => TlsError::ReadKey {
            origin: files.key_origin.clone(),
            path: key_path.to_path_buf(),
            source,
        },
    })?;
    certified(chain, key, &cert_path.display().to_string(), key_path).map_err(|e| match e {
        TlsError::KeyMismatch { cert, key, .. } => TlsError::KeyMismatch {
            origin: files.key_origin.clone(),
            cert,
            key,
        },
        other => other,
    })
}

/// Builds a [`LoadedCert`] from DER, as the demo does with its in-memory certificate.
pub fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    source: &str,
    key_path: &Path,
) -> Result<LoadedCert, TlsError> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: key_path.to_path_buf(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        // rustls cannot tell for some key types; the handshake would fail loudly then.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                origin: key_path.display().to_string(),
                cert: PathBuf::from(source),
                key: key_path.to_path_buf(),
            })
        }
    }
    let (names, not_after, expired) =
        describe(&certified.cert[0]).map_err(|message| TlsError::ParseCert {
            path: PathBuf::from(source),
            message,
        })?;
    Ok(LoadedCert {
        source: source.to_string(),
        names,
        not_after,
        expired,
        key: Arc::new(certified),
    })
}

/// DNS names, expiry date and whether it has passed, read from the leaf certificate.
fn describe(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, String, bool), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    let not_after = cert.validity().not_after;
    let expired = !cert.validity().is_valid() && not_after.timestamp() < now_unix();
    Ok((names, not_after.to_string(), expired))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Chooses the certificate by SNI: an exact SAN name, then a wildcard SAN, then the first
/// `[[cert]]` (clients with no SNI or an unknown name).
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// `certs` must not be empty: config validation guarantees at least one `[[cert]]`.
    pub fn new(certs: &[LoadedCert]) -> Option<SniResolver> {
        let default = certs.first()?.key.clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for name in &c.names {
                // The first certificate to claim a name keeps it.
                if let Some(suffix) = name.strip_prefix('*') {
                    wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| c.key.clone());
                } else {
                    exact.entry(name.clone()).or_insert_with(|| c.key.clone());
                }
            }
        }
        Some(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(|s| s.to_ascii_lowercase()) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        // A wildcard covers exactly one label (RFC 6125 6.4.3).
        if let Some(dot) = name.find('.') {
            if let Some(k) = self.wildcard.get(&name[dot..]) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

/// The certificates in use, swapped whole on reload: handshakes already done keep theirs, new
/// handshakes see the new set at once.
#[derive(Debug)]
pub struct CertStore {
    current: arc_swap::ArcSwap<SniResolver>,
}

impl CertStore {
    pub fn new(certs: &[LoadedCert]) -> Result<CertStore, TlsError> {
        Ok(CertStore {
            current: arc_swap::ArcSwap::from_pointee(resolver(certs)?),
        })
    }

    pub fn replace(&self, certs: &[LoadedCert]) -> Result<(), TlsError> {
        self.current.store(Arc::new(resolver(certs)?));
        Ok(())
    }
}

fn resolver(certs: &[LoadedCert]) -> Result<SniResolver, TlsError> {
    SniResolver::new(certs).ok_or(TlsError::Config(rustls::Error::General(
        "no certificate configured".into(),
    )))
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(hello.server_name()))
    }
}

/// The server config for the TLS listener.
/// TLS 1.2 sessions kept for resumption by ID (about 200 bytes each).
const SESSION_CACHE: usize = 20_000;

pub fn server_config(certs: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption: after a deploy most clients that reconnect are returning ones, and a resumed
    // handshake skips the certificate signature. TLS 1.3 uses tickets, encrypted with keys
    // that rotate every 6 hours (kept in memory: a restart or another replica means a full
    // handshake); TLS 1.2 clients also get session IDs from a bounded cache.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(config))
}

/// A self-signed certificate for `names`, made in memory (the demo; tests make their own).
pub fn self_signed(names: &[&str]) -> Result<(LoadedCert, String), TlsError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let der = generated.cert.der().clone();
    let fingerprint = ring::digest::digest(&ring::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let loaded = certified(
        vec![der],
        key,
        "self-signed (in memory)",
        Path::new("(in memory)"),
    )?;
    Ok((loaded, fingerprint))
}
