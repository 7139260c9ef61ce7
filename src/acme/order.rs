//! One ACME order for one name (RFC 8555 7.4): the challenge answered while the CA validates,
//! then a CSR for a fresh P-256 key, then the certificate chain.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, Order, OrderStatus,
    RetryPolicy,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{Acme, AcmeError};
use crate::config::AcmeChallenge;
use crate::tls::{self, LoadedCert};

/// How long the CA may take to validate, and then to issue.
fn patience() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(90))
}

impl Acme {
    /// Orders a certificate for `name` and saves it in the cache.
    pub(super) async fn order(
        &self,
        account: &Account,
        name: &str,
    ) -> Result<LoadedCert, AcmeError> {
        let identifiers = [Identifier::Dns(name.to_string())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let kind = match self.config.challenge {
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            AcmeChallenge::Http01 => ChallengeType::Http01,
        };
        // Each answer is served until its guard drops, when the order is over either way.
        let mut answers = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                // Validated recently for this account (authorization reuse): nothing to prove.
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(AcmeError::Invalid {
                        name: name.to_string(),
                        detail: format!("authorization is {status:?}"),
                    })
                }
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or(AcmeError::NoChallenge {
                    name: name.to_string(),
                    kind: self.config.challenge.name(),
                })?;
            let key_authorization = challenge.key_authorization();
            let answer = match self.config.challenge {
                AcmeChallenge::TlsAlpn01 => self
                    .challenges
                    .add_alpn(name, key_authorization.digest().as_ref())
                    .map_err(|source| AcmeError::Key {
                        name: name.to_string(),
                        source,
                    })?,
                AcmeChallenge::Http01 => self
                    .challenges
                    .add_http(&challenge.token, key_authorization.as_str()),
            };
            answers.push(answer);
            challenge.set_ready().await?;
        }
        let status = order.poll_ready(&patience()).await;
        drop(answers);
        match status {
            Ok(OrderStatus::Ready) => {}
            Ok(status) => {
                let detail = why_invalid(&mut order)
                    .await
                    .unwrap_or_else(|| format!("order is {status:?}"));
                return Err(AcmeError::Invalid {
                    name: name.to_string(),
                    detail,
                });
            }
            Err(instant_acme::Error::Api(problem)) => {
                let detail = why_invalid(&mut order)
                    .await
                    .unwrap_or_else(|| problem.to_string());
                return Err(AcmeError::Invalid {
                    name: name.to_string(),
                    detail,
                });
            }
            Err(e) => return Err(e.into()),
        }

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        let csr = key.and_then(|key| {
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            let csr = params.serialize_request(&key)?;
            Ok((key, csr))
        });
        let (key, csr) = csr.map_err(|source| AcmeError::Key {
            name: name.to_string(),
            source,
        })?;
        order.finalize_csr(csr.der()).await?;
        let chain_pem = order.poll_certificate(&patience()).await?;
        let key_pem = key.serialize_pem();

        let unusable = |detail: String| AcmeError::Invalid {
            name: name.to_string(),
            detail,
        };
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unusable(format!("certificate chain from the CA does not parse: {e}")))?;
        if chain.is_empty() {
            return Err(unusable("the CA sent no certificate".to_string()));
        }
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let cache_path = self.cache.cert_path(name);
        let loaded = tls::certified(
            chain,
            key_der,
            &cache_path.display().to_string(),
            &cache_path.with_extension("key"),
        )
        .map_err(|source| AcmeError::Certificate {
            name: name.to_string(),
            source: Box::new(source),
        })?;
        self.cache.save_cert(name, &chain_pem, &key_pem)?;
        Ok(loaded)
    }
}

/// The CA's reason a validation failed, from the challenges of the order's authorizations.
async fn why_invalid(order: &mut Order) -> Option<String> {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            reasons.extend(
                state
                    .challenges
                    .iter()
                    .filter_map(|c| c.error.as_ref())
                    .map(|p| p.to_string()),
            );
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}
