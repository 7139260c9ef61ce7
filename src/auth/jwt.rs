//! JWT checks (RFC 7519): the signature against the key its `kid` names, with an algorithm the
//! key's own type allows, then `exp`, `nbf`, `iss` and `aud` with the configured leeway.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Algorithm, AlgorithmFamily, Validation};
use serde_json::{Map, Value};

use super::jwks::KeySet;
use crate::config::JwtConfig;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401: malformed, unknown key, bad signature, not yet valid.
    Invalid(&'static str),
    /// 401: `exp` has passed.
    Expired,
    /// 403: a valid token for someone else (`iss`, `aud`).
    Forbidden(&'static str),
}

/// A token that passed: its claims, and its `exp` as seconds since the epoch.
#[derive(Debug)]
pub struct Verified {
    pub claims: Map<String, Value>,
    pub exp: Option<u64>,
}

/// A route's claim checks, built once from its [`JwtConfig`]: one `Validation` per key
/// family, allowing the family's algorithms (a key's own list is checked before).
pub struct Checks {
    hmac: Validation,
    rsa: Validation,
    ec: Validation,
    ed: Validation,
}

impl Checks {
    pub fn new(config: &JwtConfig) -> Checks {
        let build = |family| {
            let mut v = Validation::new_for_family(family);
            v.leeway = config.leeway.as_secs();
            v.validate_nbf = true;
            v.validate_exp = true;
            v.set_required_spec_claims(&["exp"]);
            if let Some(iss) = &config.issuer {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            if config.audience.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&config.audience);
                v.required_spec_claims.insert("aud".into());
            }
            v
        };
        Checks {
            hmac: build(AlgorithmFamily::Hmac),
            rsa: build(AlgorithmFamily::Rsa),
            ec: build(AlgorithmFamily::Ec),
            ed: build(AlgorithmFamily::Ed),
        }
    }

    fn for_alg(&self, alg: Algorithm) -> &Validation {
        match alg.family() {
            AlgorithmFamily::Hmac => &self.hmac,
            AlgorithmFamily::Rsa => &self.rsa,
            AlgorithmFamily::Ec => &self.ec,
            AlgorithmFamily::Ed => &self.ed,
        }
    }
}

/// Checks `token` against `keys`.
pub fn verify(token: &str, keys: &KeySet, checks: &Checks) -> Result<Verified, Refusal> {
    // `alg: none` and unknown algorithms do not parse.
    let header = decode_header(token).map_err(|_| Refusal::Invalid("malformed token"))?;
    let validation = checks.for_alg(header.alg);
    let mut seen_key = false;
    let mut last = Refusal::Invalid("no key for the token's kid");
    for key in keys.candidates(header.kid.as_deref()) {
        seen_key = true;
        if !key.algorithms.contains(&header.alg) {
            last = Refusal::Invalid("algorithm not allowed for the key");
            continue;
        }
        match decode::<Map<String, Value>>(token, &key.key, validation) {
            Ok(data) => {
                let exp = data.claims.get("exp").and_then(seconds);
                return Ok(Verified {
                    claims: data.claims,
                    exp,
                });
            }
            Err(e) => {
                let refusal = match e.kind() {
                    // Another key without a kid may have signed it.
                    ErrorKind::InvalidSignature => {
                        last = Refusal::Invalid("bad signature");
                        continue;
                    }
                    ErrorKind::ExpiredSignature => Refusal::Expired,
                    ErrorKind::ImmatureSignature => Refusal::Invalid("not yet valid"),
                    ErrorKind::InvalidIssuer => Refusal::Forbidden("wrong issuer"),
                    ErrorKind::InvalidAudience => Refusal::Forbidden("wrong audience"),
                    ErrorKind::MissingRequiredClaim(c) if c == "iss" => {
                        Refusal::Forbidden("no issuer")
                    }
                    ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
                        Refusal::Forbidden("no audience")
                    }
                    ErrorKind::MissingRequiredClaim(_) => Refusal::Invalid("missing exp"),
                    _ => Refusal::Invalid("invalid token"),
                };
                return Err(refusal);
            }
        }
    }
    if !seen_key && header.kid.is_none() {
        last = Refusal::Invalid("no key");
    }
    Err(last)
}

/// A NumericDate (RFC 7519 2): seconds, possibly fractional.
fn seconds(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64))
}

/// How long until `exp` (plus leeway) passes, from now.
pub fn until(exp: u64, leeway: Duration) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (Duration::from_secs(exp) + leeway).saturating_sub(now)
}

/// A claim as a header value: strings as they are, other values as JSON.
pub fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{encode, EncodingKey, Header};

    /// base64url without padding (RFC 4648 5).
    fn b64(data: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn hs_set(kid: &str, secret: &[u8]) -> KeySet {
        let k = b64(secret);
        let set: JwkSet = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"oct","kid":"{kid}","k":"{k}"}}]}}"#
        ))
        .expect("jwks");
        KeySet::new(&set).expect("keys")
    }

    fn config() -> Checks {
        Checks::new(&JwtConfig {
            keys: crate::config::JwksSource::Url("http://127.0.0.1/".parse().expect("uri")),
            issuer: Some("https://idp/".into()),
            audience: vec!["chat".into()],
            leeway: Duration::ZERO,
        })
    }

    fn token(alg: Algorithm, kid: &str, secret: &[u8], claims: Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, &claims, &EncodingKey::from_secret(secret)).expect("encode")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn each_claim_check_has_its_refusal() {
        let keys = hs_set("k1", b"secret-one");
        let good = serde_json::json!({"sub": "u", "iss": "https://idp/", "aud": "chat", "exp": now() + 60});
        let t = token(Algorithm::HS256, "k1", b"secret-one", good.clone());
        let ok = verify(&t, &keys, &config()).expect("valid");
        assert_eq!(ok.claims["sub"], "u");
        let cases = [
            ("exp", serde_json::json!(now() - 60), Refusal::Expired),
            (
                "nbf",
                serde_json::json!(now() + 60),
                Refusal::Invalid("not yet valid"),
            ),
            (
                "iss",
                serde_json::json!("other"),
                Refusal::Forbidden("wrong issuer"),
            ),
            (
                "aud",
                serde_json::json!("other"),
                Refusal::Forbidden("wrong audience"),
            ),
        ];
        for (claim, value, refusal) in cases {
            let mut c = good.clone();
            c[claim] = value;
            let t = token(Algorithm::HS256, "k1", b"secret-one", c);
            assert_eq!(
                verify(&t, &keys, &config()).expect_err("refused"),
                refusal,
                "{claim}"
            );
        }
        let forged = token(Algorithm::HS256, "k1", b"another", good.clone());
        assert_eq!(
            verify(&forged, &keys, &config()).expect_err("refused"),
            Refusal::Invalid("bad signature")
        );
        let wrong_kid = token(Algorithm::HS256, "k2", b"secret-one", good.clone());
        assert!(matches!(
            verify(&wrong_kid, &keys, &config()),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn alg_none_and_foreign_families_are_refused() {
        let keys = hs_set("k1", b"secret-one");
        let b64 = |s: &str| b64(s.as_bytes());
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","kid":"k1"}"#),
            b64(&format!(r#"{{"exp":{}}}"#, now() + 60))
        );
        assert_eq!(
            verify(&none, &keys, &config()).expect_err("refused"),
            Refusal::Invalid("malformed token")
        );
        // An RS256 header on an oct key: the key's type decides, not the header.
        let rs = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256","kid":"k1"}"#),
            b64(&format!(r#"{{"exp":{}}}"#, now() + 60))
        );
        assert_eq!(
            verify(&rs, &keys, &config()).expect_err("refused"),
            Refusal::Invalid("algorithm not allowed for the key")
        );
    }
}
