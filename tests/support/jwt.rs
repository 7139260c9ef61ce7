//! Tokens made at test time: signing keys generated per test, their public JWKS, claims with
//! chosen times, and a loopback JWKS server whose keys a test can rotate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::backend::Backend;
use super::body::full;

pub const ISSUER: &str = "https://idp.gw.test/";
pub const AUDIENCE: &str = "chat";

/// An ES256 key pair made for one test, with its `kid`.
pub struct Signer {
    pub kid: String,
    key: EncodingKey,
    /// The public half, as a JWKS lists it.
    pub jwk: Jwk,
}

impl Signer {
    pub fn es256(kid: &str) -> Signer {
        let pair = rcgen::KeyPair::generate().expect("generate P-256 key");
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("public JWK");
        jwk.common.key_id = Some(kid.to_string());
        Signer {
            kid: kid.to_string(),
            key,
            jwk,
        }
    }

    /// A token with `claims`, signed by this key and naming its `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// A token signed by this key but naming `kid`.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_string());
        encode(&header, claims, &self.key).expect("sign token")
    }
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims that pass: our issuer and audience, subject `sub`, expiring in an hour.
pub fn claims(sub: &str) -> Value {
    json!({
        "sub": sub,
        "email": format!("{sub}@gw.test"),
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// `claims(sub)` with `key` set to `value`.
pub fn claims_with(sub: &str, key: &str, value: Value) -> Value {
    let mut c = claims(sub);
    c[key] = value;
    c
}

/// The public JWKS document for `signers`.
pub fn jwks(signers: &[&Signer]) -> String {
    let set = JwkSet {
        keys: signers.iter().map(|s| s.jwk.clone()).collect(),
    };
    serde_json::to_string(&set).expect("serialize JWKS")
}

/// A JWKS file in `dir`, for `jwt_jwks`.
pub fn jwks_file(dir: &std::path::Path, signers: &[&Signer]) -> std::path::PathBuf {
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(signers)).expect("write JWKS file");
    path
}

/// A `[route.auth]` inline table checking tokens against the JWKS file at `path`, from
/// every place a browser can put one, with `sub` and `email` as headers; `extra` adds keys.
pub fn auth_table(keys: &str, extra: &str) -> String {
    format!(
        "{{ {keys}, jwt_issuer = {ISSUER:?}, jwt_audience = [{AUDIENCE:?}], jwt_leeway = \"0s\", \
         token_from = [\"header:Authorization\", \"cookie:access_token\", \"query:access_token\", \"protocol:bearer.\"], \
         claims_to_headers = {{ sub = \"X-User-Id\", email = \"X-User-Email\" }}{extra} }}"
    )
}

/// A JWKS server on 127.0.0.1:0 whose document the test can replace.
pub struct JwksServer {
    pub backend: Backend,
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    pub async fn start(signers: &[&Signer]) -> JwksServer {
        let document = Arc::new(Mutex::new(jwks(signers)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), fetches.clone());
        let backend = Backend::start(move |_req| {
            count.fetch_add(1, Ordering::SeqCst);
            let body = doc.lock().expect("document lock").clone();
            async move {
                http::Response::builder()
                    .header("content-type", "application/json")
                    .body(full(body))
                    .expect("valid response")
            }
        })
        .await;
        JwksServer {
            backend,
            document,
            fetches,
        }
    }

    pub fn url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.backend.url())
    }

    /// Serves `signers` from now on.
    pub fn rotate(&self, signers: &[&Signer]) {
        *self.document.lock().expect("document lock") = jwks(signers);
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}
