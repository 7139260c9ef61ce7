//! Answers to pending ACME challenges: tls-alpn-01 certificates (RFC 8737) that the TLS
//! listener's resolver serves, and http-01 key authorizations (RFC 8555 8.3) that the plain
//! listener serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;

/// The ALPN protocol of a tls-alpn-01 validation (RFC 8737 6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The path prefix of an http-01 validation request (RFC 8555 8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// What the listeners answer while orders are pending; shared by the order tasks (which add
/// and remove) and the connections (which look up). Empty without `[acme]`.
#[derive(Debug, Default)]
pub struct Challenges {
    /// tls-alpn-01: the self-signed challenge certificate by (lowercase) name.
    alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// http-01: the key authorization by token.
    http: Mutex<HashMap<String, String>>,
}

impl Challenges {
    /// The challenge certificate for `name`, while its tls-alpn-01 challenge is pending.
    pub fn alpn_cert(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        self.alpn.lock().ok()?.get(&name).cloned()
    }

    /// The key authorization for an http-01 request `path`, while its token is pending.
    pub fn http_answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        self.http.lock().ok()?.get(token).cloned()
    }

    /// Serves the tls-alpn-01 answer for `name` until the guard is dropped.
    pub fn add_alpn(
        self: &Arc<Self>,
        name: &str,
        key_authorization_digest: &[u8],
    ) -> Result<Pending, rcgen::Error> {
        let cert = alpn_certificate(name, key_authorization_digest)?;
        let name = name.to_ascii_lowercase();
        if let Ok(mut alpn) = self.alpn.lock() {
            alpn.insert(name.clone(), cert);
        }
        Ok(Pending {
            challenges: self.clone(),
            what: Entry::Alpn(name),
        })
    }

    /// Serves `key_authorization` at `/.well-known/acme-challenge/<token>` until the guard is
    /// dropped.
    pub fn add_http(self: &Arc<Self>, token: &str, key_authorization: &str) -> Pending {
        if let Ok(mut http) = self.http.lock() {
            http.insert(token.to_string(), key_authorization.to_string());
        }
        Pending {
            challenges: self.clone(),
            what: Entry::Http(token.to_string()),
        }
    }
}

/// One challenge answer being served; removed when dropped (the order is over either way).
pub struct Pending {
    challenges: Arc<Challenges>,
    what: Entry,
}

enum Entry {
    Alpn(String),
    Http(String),
}

impl Drop for Pending {
    fn drop(&mut self) {
        match &self.what {
            Entry::Alpn(name) => {
                if let Ok(mut alpn) = self.challenges.alpn.lock() {
                    alpn.remove(name);
                }
            }
            Entry::Http(token) => {
                if let Ok(mut http) = self.challenges.http.lock() {
                    http.remove(token);
                }
            }
        }
    }
}

/// RFC 8737 3: a self-signed certificate whose only SAN is `name`, with the critical
/// acmeIdentifier extension holding the SHA-256 digest of the key authorization.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_served_while_pending_and_gone_after() {
        let c = Arc::new(Challenges::default());
        let http = c.add_http("tok123", "tok123.thumb");
        let alpn = c
            .add_alpn("Chat.Example.com", &[7; 32])
            .expect("challenge cert");
        assert_eq!(
            c.http_answer("/.well-known/acme-challenge/tok123")
                .as_deref(),
            Some("tok123.thumb")
        );
        assert_eq!(c.http_answer("/.well-known/acme-challenge/other"), None);
        assert_eq!(c.http_answer("/tok123"), None);
        assert!(c.alpn_cert("chat.example.com").is_some());
        assert!(c.alpn_cert("events.example.com").is_none());
        drop((http, alpn));
        assert_eq!(c.http_answer("/.well-known/acme-challenge/tok123"), None);
        assert!(c.alpn_cert("chat.example.com").is_none());
    }

    #[test]
    fn alpn_certificate_carries_the_critical_acme_identifier() {
        let digest = [0xab; 32];
        let cert = alpn_certificate("a.example.com", &digest).expect("challenge cert");
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert.cert[0]).expect("parses as X.509");
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31 (RFC 8737 6.1).
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING (0x04, length 32) around the digest.
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        assert_eq!(&ext.value[2..], &digest);
    }
}
