//! Signing keys: a JWKS (RFC 7517) read from a file or fetched from a URL, each key with the
//! algorithms its own type allows, so a token's header can never choose the family.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::drain::Drain;

/// A fetched JWKS is refreshed this often (and on an unknown `kid`).
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// An unknown `kid` fetches the set again at most this often: a stream of forged `kid`s must
/// not become a stream of requests to the identity provider.
pub const KID_REFETCH_EVERY: Duration = Duration::from_secs(10);
/// One fetch: connect, TLS, response and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted.
const MAX_JWKS: usize = 1024 * 1024;

/// One usable verification key.
pub struct Key {
    pub kid: Option<String>,
    /// What this key may verify: from its `alg` when it names one, else from its `kty`/`crv`.
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// The keys of one JWKS.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

impl KeySet {
    /// The signature keys of `set`; encryption keys and curves the gateway cannot verify are
    /// left out. An error when a key is malformed or none is usable.
    pub fn new(set: &JwkSet) -> Result<KeySet, String> {
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let Some(algorithms) = algorithms(jwk) else {
                continue;
            };
            let algorithms = algorithms.map_err(|why| format!("keys[{i}]: {why}"))?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                algorithms,
                key,
            });
        }
        if keys.is_empty() {
            return Err(
                "no signature key the gateway can use (RSA, EC P-256/P-384, Ed25519 or oct)".into(),
            );
        }
        Ok(KeySet { keys })
    }

    /// Keys that may have signed a token with this header: the one its `kid` names (all keys
    /// when it names none), and only if the key's own type allows the token's `alg`.
    pub fn candidates<'a>(&'a self, kid: Option<&'a str>) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |k| kid.is_none() || k.kid.as_deref() == kid)
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// The algorithms `jwk` may verify; None for a key that is not for signatures (or a curve the
/// gateway does not verify with).
fn algorithms(jwk: &Jwk) -> Option<Result<Vec<Algorithm>, String>> {
    use Algorithm::*;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![EdDSA],
            _ => return None,
        },
        AlgorithmParameters::OctetKey(_) => vec![HS256, HS384, HS512],
    };
    match jwk.common.key_algorithm {
        None => Some(Ok(family)),
        Some(
            KeyAlgorithm::RSA1_5
            | KeyAlgorithm::RSA_OAEP
            | KeyAlgorithm::RSA_OAEP_256
            | KeyAlgorithm::UNKNOWN_ALGORITHM,
        ) => None,
        Some(alg) => {
            let named: Option<Algorithm> = alg.to_string().parse().ok();
            match named {
                Some(a) if family.contains(&a) => Some(Ok(vec![a])),
                _ => Some(Err(format!("alg {alg} does not fit the key's type"))),
            }
        }
    }
}

/// Reads and checks a JWKS file.
pub fn read_file(path: &Path) -> Result<JwkSet, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read JWKS file: {e}"))?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|e| format!("not a JWKS document: {e}"))?;
    KeySet::new(&set)?;
    Ok(set)
}

/// Keys fetched from `jwt_jwks_url`: the last good set, refreshed in the background and on an
/// unknown `kid`.
pub struct UrlKeys {
    pub url: Uri,
    current: ArcSwap<KeySet>,
    loaded: AtomicBool,
    /// When an unknown `kid` last caused a fetch.
    kid_fetch: Mutex<Option<Instant>>,
    /// One fetch at a time; requests that wait for one share its result.
    fetching: tokio::sync::Mutex<()>,
    started: AtomicBool,
}

impl UrlKeys {
    pub fn new(url: Uri) -> UrlKeys {
        UrlKeys {
            url,
            current: ArcSwap::from_pointee(KeySet::default()),
            loaded: AtomicBool::new(false),
            kid_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            started: AtomicBool::new(false),
        }
    }

    /// The keys to check `kid` against: the cached set, fetched first if there is none yet
    /// or (rate-limited) if it does not know `kid`.
    pub async fn keys_for(&self, kid: Option<&str>) -> Arc<KeySet> {
        let current = self.current.load_full();
        let unknown = kid.is_some_and(|k| !current.has_kid(k));
        if self.loaded.load(Ordering::Acquire) && !unknown {
            return current;
        }
        if self.loaded.load(Ordering::Acquire) {
            let now = Instant::now();
            let Ok(mut last) = self.kid_fetch.lock() else {
                return current;
            };
            if last.is_some_and(|at| now.duration_since(at) < KID_REFETCH_EVERY) {
                return current;
            }
            *last = Some(now);
        }
        self.refresh(Some(current)).await;
        self.current.load_full()
    }

    /// Fetches the set unless another fetch replaced `seen` meanwhile; a failure keeps the last
    /// good set.
    async fn refresh(&self, seen: Option<Arc<KeySet>>) {
        let _one = self.fetching.lock().await;
        if let Some(seen) = seen {
            if !Arc::ptr_eq(&seen, &self.current.load_full()) {
                return;
            }
        }
        match fetch(&self.url).await {
            Ok(set) => {
                tracing::debug!(url = %self.url, keys = set.keys.len(), "jwks fetched");
                self.current.store(Arc::new(set));
                self.loaded.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "jwks fetch failed, keeping the last good keys")
            }
        }
    }

    /// Fetches now and every [`REFRESH_EVERY`] until the drain begins or the route is gone.
    /// Once per set, however often it is called (routes carried over a reload).
    pub fn start(self: &Arc<Self>, drain: &Drain) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let draining = drain.clone();
        drain.spawn(async move {
            loop {
                let Some(keys) = weak.upgrade() else { return };
                tokio::select! {
                    _ = keys.refresh(None) => {}
                    _ = draining.draining() => return,
                }
                drop(keys);
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH_EVERY) => {}
                    _ = draining.draining() => return,
                }
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("tls handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("request failed")]
    Http(#[source] hyper::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("body unreadable or over 1 MiB")]
    Body,
    #[error("bad JWKS: {0}")]
    Bad(String),
    #[error("timed out")]
    Timeout,
    #[error("bad URL")]
    Url,
}

/// One GET on a connection of its own (a refresh every few minutes needs no pool).
pub async fn fetch(url: &Uri) -> Result<KeySet, FetchError> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_once(url)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout),
    }
}

async fn fetch_once(url: &Uri) -> Result<KeySet, FetchError> {
    let authority = url.authority().ok_or(FetchError::Url)?;
    let https = url.scheme_str() == Some("https");
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(FetchError::Connect)?;
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::Url)?;
    let response = if https {
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| FetchError::Url)?;
        let tls = tokio_rustls::TlsConnector::from(client_tls())
            .connect(name, tcp)
            .await
            .map_err(FetchError::Tls)?;
        send(tls, req).await?
    } else {
        send(tcp, req).await?
    };
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS)
        .collect()
        .await
        .map_err(|_| FetchError::Body)?
        .to_bytes();
    let set: JwkSet = serde_json::from_slice(&body).map_err(|e| FetchError::Bad(e.to_string()))?;
    KeySet::new(&set).map_err(FetchError::Bad)
}

async fn send<I>(
    io: I,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, FetchError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(FetchError::Http)?;
    // Ends with the response body or when the fetch is dropped (its timeout).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(FetchError::Http)
}

/// The TLS client for `https` JWKS URLs: the web PKI roots (compiled in, so a container
/// without a CA bundle works too).
fn client_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                // The aws-lc-rs provider supports the default versions (TLS 1.2 and 1.3).
                .expect("aws-lc-rs supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}
