//! The ACME cache directory: the account's credentials and each name's certificate chain and
//! key, so a restart reuses them instead of ordering again. Keys are written mode 0600, each
//! file whole (a temporary file renamed over the old one), under a folder per CA directory so
//! staging and production never mix.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::AcmeError;
use crate::config::AcmeConfig;
use crate::tls::{self, LoadedCert};

#[derive(Debug, Clone)]
pub struct Cache {
    /// `<acme.cache>/<directory host[_port]>`.
    dir: PathBuf,
}

impl Cache {
    pub fn new(config: &AcmeConfig) -> Cache {
        let ca = config
            .directory
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.as_str().replace(':', "_")))
            .unwrap_or_else(|| "ca".to_string());
        Cache {
            dir: config.cache.join(ca),
        }
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    fn cert_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }

    /// The saved account, if there is one for this CA.
    pub fn account(&self) -> Option<AccountCredentials> {
        let text = fs::read(self.account_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn save_account(&self, credentials: &AccountCredentials) -> Result<(), AcmeError> {
        let path = self.account_path();
        let json = serde_json::to_vec_pretty(credentials).map_err(|e| AcmeError::Cache {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        self.write(&path, &json, 0o600)
    }

    /// Forgets the account (the CA no longer knows it).
    pub fn forget_account(&self) {
        let _ = fs::remove_file(self.account_path());
    }

    /// The saved certificate for `name`, if both files are there and usable.
    pub fn cert(&self, name: &str) -> Option<LoadedCert> {
        let (cert, key) = self.cert_paths(name);
        let chain = CertificateDer::pem_file_iter(&cert)
            .ok()?
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        if chain.is_empty() {
            return None;
        }
        let key_der = PrivateKeyDer::from_pem_file(&key).ok()?;
        tls::certified(chain, key_der, &cert.display().to_string(), &key).ok()
    }

    /// Saves `name`'s chain and key; the key first, so a crash between the two leaves a key
    /// without a certificate (ignored) rather than a certificate with the wrong key.
    pub fn save_cert(&self, name: &str, chain_pem: &str, key_pem: &str) -> Result<(), AcmeError> {
        let (cert, key) = self.cert_paths(name);
        self.write(&key, key_pem.as_bytes(), 0o600)?;
        self.write(&cert, chain_pem.as_bytes(), 0o644)
    }

    pub fn cert_path(&self, name: &str) -> PathBuf {
        self.cert_paths(name).0
    }

    fn write(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<(), AcmeError> {
        let err = |source| AcmeError::Cache {
            path: path.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| AcmeError::Cache {
                path: self.dir.clone(),
                source,
            })?;
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(err)?;
        fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path) -> AcmeConfig {
        AcmeConfig {
            directory: "https://127.0.0.1:14000/dir".to_string(),
            email: None,
            domains: None,
            cache: dir.to_path_buf(),
            challenge: crate::config::AcmeChallenge::TlsAlpn01,
            ca_roots: None,
            ca_roots_origin: String::new(),
        }
    }

    #[test]
    fn a_saved_certificate_loads_back_and_its_key_is_private() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let cache = Cache::new(&config(dir));
        let made = rcgen::generate_simple_self_signed(vec!["a.example.com".to_string()])
            .expect("self-signed");
        assert!(cache.cert("a.example.com").is_none());
        cache
            .save_cert(
                "a.example.com",
                &made.cert.pem(),
                &made.signing_key.serialize_pem(),
            )
            .expect("save");
        let loaded = cache.cert("a.example.com").expect("loads back");
        assert_eq!(loaded.names, vec!["a.example.com".to_string()]);
        let key = dir.join("127.0.0.1_14000/a.example.com.key");
        let mode = fs::metadata(&key).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
}
