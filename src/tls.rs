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
    #[error("{origin}: cannot read client CA bundle {path}")]
    ClientCa {
        origin: String,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{origin}: unusable client CA bundle {path} (expected PEM CA certificates)")]
    BadClientCa {
        origin: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Acme(#[from] crate::acme::AcmeError),
}

/// A loaded certificate with what the logs and `check` show about it.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub source: String,
    /// DNS names from the subject alternative names, lowercase.
    pub names: Vec<String>,
    pub not_after: String,
    pub expired: bool,
    /// The validity period, Unix seconds (the expiry metric, ACME renewal).
    pub not_before_unix: i64,
    pub not_after_unix: i64,
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
    let (names, not_after, expired, validity) =
        describe(&certified.cert[0]).map_err(|message| TlsError::ParseCert {
            path: PathBuf::from(source),
            message,
        })?;
    Ok(LoadedCert {
        source: source.to_string(),
        names,
        not_after,
        expired,
        not_before_unix: validity.0,
        not_after_unix: validity.1,
        key: Arc::new(certified),
    })
}

/// DNS names, expiry date, whether it has passed, and the validity period in Unix seconds,
/// read from the leaf certificate.
#[allow(clippy::type_complexity)]
fn describe(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, String, bool, (i64, i64)), String> {
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
    let validity = (
        cert.validity().not_before.timestamp(),
        not_after.timestamp(),
    );
    Ok((names, not_after.to_string(), expired, validity))
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
        Some(SniResolver::with_default(certs.iter(), default))
    }

    /// Certificates chosen by name from `certs` (the first to claim a name keeps it), and
    /// `default` for the rest.
    fn with_default<'a>(
        certs: impl Iterator<Item = &'a LoadedCert>,
        default: Arc<CertifiedKey>,
    ) -> SniResolver {
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
        SniResolver {
            exact,
            wildcard,
            default,
        }
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

/// The certificates in use, swapped whole on reload or when an ACME certificate arrives:
/// handshakes already done keep theirs, new handshakes see the new set at once.
#[derive(Debug)]
pub struct CertStore {
    current: arc_swap::ArcSwap<SniResolver>,
    certs: std::sync::Mutex<Certs>,
    /// Pending ACME tls-alpn-01 answers (RFC 8737), served to `acme-tls/1` handshakes.
    challenges: Arc<crate::acme::Challenges>,
    /// `streamgate_certificate_expiry_seconds`, rewritten with every change.
    expiry: std::sync::Mutex<Option<crate::metrics::CertExpiry>>,
}

/// What the resolver is built from.
#[derive(Debug, Default)]
struct Certs {
    /// The `[[cert]]` files, in config order; the first is the default.
    files: Vec<LoadedCert>,
    /// `[acme]` certificates by name.
    acme: std::collections::BTreeMap<String, LoadedCert>,
    /// The default when there is no `[[cert]]` (`[acme]` only): self-signed, in memory.
    fallback: Option<LoadedCert>,
}

impl Certs {
    fn resolver(&self) -> Result<SniResolver, TlsError> {
        let default = self
            .files
            .first()
            .or(self.fallback.as_ref())
            .or(self.acme.values().next())
            .ok_or(TlsError::Config(rustls::Error::General(
                "no certificate configured".into(),
            )))?;
        let all = self.files.iter().chain(self.acme.values());
        Ok(SniResolver::with_default(all, default.key.clone()))
    }
}

impl CertStore {
    pub fn new(certs: &[LoadedCert]) -> Result<CertStore, TlsError> {
        CertStore::with_fallback(certs, None)
    }

    /// Like [`CertStore::new`], with `fallback` as the default when `certs` is empty.
    pub fn with_fallback(
        certs: &[LoadedCert],
        fallback: Option<LoadedCert>,
    ) -> Result<CertStore, TlsError> {
        let certs = Certs {
            files: certs.to_vec(),
            acme: Default::default(),
            fallback,
        };
        Ok(CertStore {
            current: arc_swap::ArcSwap::from_pointee(certs.resolver()?),
            certs: std::sync::Mutex::new(certs),
            challenges: Arc::default(),
            expiry: Default::default(),
        })
    }

    /// The `[[cert]]` files, read again (reload); ACME certificates stay.
    pub fn replace(&self, certs: &[LoadedCert]) -> Result<(), TlsError> {
        self.update(|c| c.files = certs.to_vec())
    }

    /// Serves `cert` for `name` from now on (an ACME certificate, new or renewed).
    pub fn set_acme(&self, name: &str, cert: LoadedCert) {
        // Cannot fail: the new set has at least this certificate.
        let _ = self.update(|c| {
            c.acme.insert(name.to_string(), cert);
        });
    }

    /// The ACME certificate served for `name`, if one is.
    pub fn acme_cert(&self, name: &str) -> Option<LoadedCert> {
        self.certs.lock().ok()?.acme.get(name).cloned()
    }

    /// Where pending tls-alpn-01 answers go.
    pub fn challenges(&self) -> Arc<crate::acme::Challenges> {
        self.challenges.clone()
    }

    /// Reports every certificate's expiry to `expiry` from now on.
    pub fn report_expiry(&self, expiry: crate::metrics::CertExpiry) {
        if let Ok(certs) = self.certs.lock() {
            expiry.set(certs.files.iter().chain(certs.acme.values()));
        }
        if let Ok(mut slot) = self.expiry.lock() {
            *slot = Some(expiry);
        }
    }

    fn update(&self, change: impl FnOnce(&mut Certs)) -> Result<(), TlsError> {
        let Ok(mut certs) = self.certs.lock() else {
            return Err(TlsError::Config(rustls::Error::General(
                "certificate store lock poisoned".into(),
            )));
        };
        change(&mut certs);
        self.current.store(Arc::new(certs.resolver()?));
        if let Some(expiry) = self.expiry.lock().ok().as_ref().and_then(|e| e.as_ref()) {
            expiry.set(certs.files.iter().chain(certs.acme.values()));
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = crate::acme::ACME_TLS_ALPN;
        if hello.alpn().is_some_and(|mut p| p.any(|p| p == acme)) {
            // RFC 8737 3: an acme-tls/1 handshake gets the challenge certificate of a pending
            // name, or nothing (the handshake fails); never a real certificate.
            return hello
                .server_name()
                .and_then(|name| self.challenges.alpn_cert(name));
        }
        Some(self.current.load().pick(hello.server_name()))
    }
}

/// The server config for the TLS listener.
/// TLS 1.2 sessions kept for resumption by ID (about 200 bytes each).
const SESSION_CACHE: usize = 20_000;

pub fn server_config(
    certs: Arc<CertStore>,
    listen: &crate::config::Listen,
) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match listen.tls_min_version {
        crate::config::TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        crate::config::TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match &listen.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca)?),
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Last, so only an ACME validation (which offers nothing else) selects it (RFC 8737 3).
    config
        .alpn_protocols
        .push(crate::acme::ACME_TLS_ALPN.to_vec());
    // Resumption: after a deploy most clients that reconnect are returning ones, and a resumed
    // handshake skips the certificate signature. TLS 1.3 uses tickets, encrypted with keys
    // that rotate every 6 hours (kept in memory: a restart or another replica means a full
    // handshake); TLS 1.2 clients also get session IDs from a bounded cache.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(config))
}

/// `listen.client_ca`: client certificates must chain to one of its CAs; with
/// `client_auth = "optional"` a client may also send none (routes decide).
fn client_verifier(
    ca: &crate::config::ClientCa,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let read = |source| TlsError::ClientCa {
        origin: ca.origin.clone(),
        path: ca.path.clone(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(&ca.path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(read)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::BadClientCa {
            origin: ca.origin.clone(),
            path: ca.path.clone(),
            source: Box::new(source),
        })?;
    }
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = match ca.auth {
        crate::config::ClientAuth::Optional => builder.allow_unauthenticated(),
        crate::config::ClientAuth::Required => builder,
    };
    builder.build().map_err(|source| TlsError::BadClientCa {
        origin: ca.origin.clone(),
        path: ca.path.clone(),
        source: Box::new(source),
    })
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
