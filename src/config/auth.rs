//! Edge access control settings (issue 14): `[listen]` TLS policy and client certificates,
//! `[route.auth]` tokens and forward auth, validated into typed settings that name their key.

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use jsonwebtoken::jwk::JwkSet;

use super::raw::{RawAuth, RawListen, Text};
use super::{ConfigError, Located};

/// `listen.tls_min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMinVersion {
    Tls12,
    Tls13,
}

/// `listen.client_auth`: what a TLS handshake without a valid client certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake succeeds; routes with `require_client_cert` answer 403.
    Optional,
    /// The handshake fails.
    Required,
}

/// `listen.client_ca` and `listen.client_auth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCa {
    pub path: PathBuf,
    /// `file:line:col: listen.client_ca`, for errors about the file.
    pub origin: String,
    pub auth: ClientAuth,
}

/// `[route.auth]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub jwt: Option<JwtConfig>,
    /// Where a token is looked for, in order.
    pub token_from: Vec<TokenSource>,
    /// Claim name -> request header set from it.
    pub claims_to_headers: Vec<(String, HeaderName)>,
    pub forward_auth: Option<ForwardAuthConfig>,
    /// WebSockets and event streams opened with a token end when it expires.
    pub end_at_expiry: bool,
}

impl AuthConfig {
    /// Headers the gateway sets itself: a client's own are removed first (no forging).
    pub fn managed_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.claims_to_headers
            .iter()
            .map(|(_, h)| h)
            .chain(self.forward_auth.iter().flat_map(|f| f.copy_headers.iter()))
    }

    /// The JWKS file, when the keys come from one (watched and reloaded like certificates).
    pub fn jwks_file(&self) -> Option<&std::path::Path> {
        match self.jwt.as_ref().map(|j| &j.keys) {
            Some(JwksSource::File { path, .. }) => Some(path),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    pub keys: JwksSource,
    pub issuer: Option<String>,
    /// Empty: `aud` is not checked.
    pub audience: Vec<String>,
    pub leeway: Duration,
}

/// Where the signing keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    /// Read at load time: a reload reads it again, and a change in it is a change of route.
    File {
        path: PathBuf,
        origin: String,
        set: JwkSet,
    },
    /// Fetched by the route at start-up, refreshed on an interval and on an unknown `kid`.
    Url(Uri),
}

/// One entry of `token_from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `header:NAME`; a `Bearer ` scheme is taken off.
    Header(HeaderName),
    Cookie(String),
    /// Removed from the target before it is forwarded or logged.
    Query(String),
    /// A `Sec-WebSocket-Protocol` entry starting with this prefix; removed from the offer.
    Protocol(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuthConfig {
    /// `http://host:port/path`.
    pub url: Uri,
    /// Response headers of a 2xx copied onto the request.
    pub copy_headers: Vec<HeaderName>,
}

impl Located<'_> {
    /// `listen.tls_min_version`, `listen.hsts`, `listen.client_ca`, `listen.client_auth`.
    pub(super) fn edge_tls(
        &self,
        raw: &RawListen,
    ) -> Result<(TlsMinVersion, Option<HeaderValue>, Option<ClientCa>), ConfigError> {
        let min = match &raw.tls_min_version {
            None => TlsMinVersion::Tls12,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsMinVersion::Tls12,
                "1.3" => TlsMinVersion::Tls13,
                other => {
                    return Err(self.error(
                        v.span(),
                        format!(
                            "listen.tls_min_version: expected \"1.2\" or \"1.3\", got {other:?}"
                        ),
                    ))
                }
            },
        };
        let hsts = match &raw.hsts {
            None => None,
            Some(v) => {
                let text = v.get_ref().trim();
                let valid = text.to_ascii_lowercase().contains("max-age=");
                match HeaderValue::from_str(text) {
                    Ok(h) if valid => Some(h),
                    _ => {
                        return Err(self.error(
                            v.span(),
                            format!("listen.hsts: expected a Strict-Transport-Security value such as \"max-age=63072000; includeSubDomains\", got {:?}", v.get_ref()),
                        ))
                    }
                }
            }
        };
        let auth = match &raw.client_auth {
            None => ClientAuth::Optional,
            Some(v) => match v.get_ref().as_str() {
                "optional" => ClientAuth::Optional,
                "required" => ClientAuth::Required,
                other => {
                    return Err(self.error(
                        v.span(),
                        format!(
                        "listen.client_auth: expected \"optional\" or \"required\", got {other:?}"
                    ),
                    ))
                }
            },
        };
        let client_ca = match (&raw.client_ca, &raw.client_auth) {
            (Some(path), _) => Some(ClientCa {
                path: PathBuf::from(path.get_ref()),
                origin: self.origin(path.span(), "listen.client_ca"),
                auth,
            }),
            (None, Some(v)) => {
                return Err(self.error(
                    v.span(),
                    "listen.client_auth: needs listen.client_ca (the CA bundle client certificates are checked against)",
                ))
            }
            (None, None) => None,
        };
        Ok((min, hsts, client_ca))
    }

    /// `[route.auth]`.
    pub(super) fn auth(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &toml::Spanned<RawAuth>,
    ) -> Result<AuthConfig, ConfigError> {
        let a = raw.get_ref();
        let keys = match (&a.jwt_jwks, &a.jwt_jwks_url) {
            (Some(_), Some(url)) => {
                return Err(self.error(
                    url.span(),
                    format!(
                        "{}: set jwt_jwks or jwt_jwks_url, not both",
                        key("auth.jwt_jwks_url")
                    ),
                ))
            }
            (Some(file), None) => Some(self.jwks_file(&key("auth.jwt_jwks"), file)?),
            (None, Some(url)) => Some(JwksSource::Url(self.url(
                &key("auth.jwt_jwks_url"),
                url,
                &["http", "https"],
            )?)),
            (None, None) => None,
        };
        let jwt = match keys {
            Some(keys) => Some(JwtConfig {
                keys,
                issuer: a.jwt_issuer.as_ref().map(|i| i.get_ref().clone()),
                audience: a
                    .jwt_audience
                    .iter()
                    .flatten()
                    .map(|a| a.get_ref().clone())
                    .collect(),
                leeway: self.duration_or(
                    &key("auth.jwt_leeway"),
                    &a.jwt_leeway,
                    Duration::from_secs(30),
                )?,
            }),
            None => {
                let stray = [&a.jwt_issuer, &a.jwt_leeway]
                    .into_iter()
                    .flatten()
                    .chain(a.jwt_audience.iter().flatten())
                    .next();
                if let Some(v) = stray {
                    return Err(self.error(
                        v.span(),
                        format!(
                            "{}: JWT checks need jwt_jwks or jwt_jwks_url (the keys tokens are signed with)",
                            key("auth")
                        ),
                    ));
                }
                None
            }
        };
        let token_from = match &a.token_from {
            None => vec![TokenSource::Header(http::header::AUTHORIZATION)],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    token_source(v.get_ref()).map_err(|why| {
                        self.error(v.span(), format!("{}[{i}]: {why}", key("auth.token_from")))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let claims_to_headers = match &a.claims_to_headers {
            None => Vec::new(),
            Some(map) => map
                .get_ref()
                .iter()
                .map(|(claim, header)| {
                    self.header_name(&key(&format!("auth.claims_to_headers.{claim}")), header)
                        .map(|h| (claim.clone(), h))
                })
                .collect::<Result<_, _>>()?,
        };
        let forward_auth = match &a.forward_auth {
            None => {
                if let Some(v) = a.forward_auth_headers.iter().flatten().next() {
                    return Err(self.error(
                        v.span(),
                        format!(
                            "{}: needs auth.forward_auth",
                            key("auth.forward_auth_headers")
                        ),
                    ));
                }
                None
            }
            Some(url) => Some(ForwardAuthConfig {
                url: self.url(&key("auth.forward_auth"), url, &["http"])?,
                copy_headers: a
                    .forward_auth_headers
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(i, h)| {
                        self.header_name(&key(&format!("auth.forward_auth_headers[{i}]")), h)
                    })
                    .collect::<Result<_, _>>()?,
            }),
        };
        if jwt.is_none() && forward_auth.is_none() {
            return Err(self.error(
                raw.span(),
                format!(
                    "{}: set jwt_jwks, jwt_jwks_url or forward_auth (or remove the table)",
                    key("auth")
                ),
            ));
        }
        if jwt.is_none() && !claims_to_headers.is_empty() {
            return Err(self.error(
                raw.span(),
                format!(
                    "{}: claims_to_headers needs jwt_jwks or jwt_jwks_url",
                    key("auth")
                ),
            ));
        }
        Ok(AuthConfig {
            jwt,
            token_from,
            claims_to_headers,
            forward_auth,
            end_at_expiry: a.end_at_expiry.as_ref().is_none_or(|v| *v.get_ref()),
        })
    }

    /// Reads and checks a JWKS file now, so a bad one stops start-up (and a reload) with the
    /// key and the file named.
    fn jwks_file(&self, key: &str, value: &Text) -> Result<JwksSource, ConfigError> {
        let path = PathBuf::from(value.get_ref());
        let set = crate::auth::jwks::read_file(&path)
            .map_err(|why| self.error(value.span(), format!("{key}: {}: {why}", path.display())))?;
        Ok(JwksSource::File {
            origin: self.origin(value.span(), key),
            path,
            set,
        })
    }

    fn url(&self, key: &str, value: &Text, schemes: &[&str]) -> Result<Uri, ConfigError> {
        let text = value.get_ref();
        let uri: Option<Uri> = text.parse().ok();
        match uri {
            Some(u)
                if u.scheme_str().is_some_and(|s| schemes.contains(&s))
                    && u.authority().is_some_and(|a| !a.host().is_empty()) =>
            {
                Ok(u)
            }
            _ => Err(self.error(
                value.span(),
                format!(
                    "{key}: expected a URL such as \"{}://127.0.0.1:9100/check\", got {text:?}",
                    schemes[0]
                ),
            )),
        }
    }

    fn header_name(&self, key: &str, value: &Text) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(value.get_ref().as_bytes()).map_err(|_| {
            self.error(
                value.span(),
                format!(
                    "{key}: expected a header name such as \"X-User-Id\", got {:?}",
                    value.get_ref()
                ),
            )
        })
    }
}

fn token_source(text: &str) -> Result<TokenSource, String> {
    let (kind, name) = text.split_once(':').unwrap_or((text, ""));
    let token_chars = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    match kind {
        "header" => HeaderName::from_bytes(name.as_bytes())
            .map(TokenSource::Header)
            .map_err(|_| format!("expected header:NAME with a header name, got {text:?}")),
        "cookie" if token_chars(name) => Ok(TokenSource::Cookie(name.to_string())),
        "query" if !name.is_empty() && !name.contains(['&', '=', '#', ' ']) => {
            Ok(TokenSource::Query(name.to_string()))
        }
        "protocol" if token_chars(name) => Ok(TokenSource::Protocol(name.to_string())),
        _ => Err(format!(
            "expected \"header:NAME\", \"cookie:NAME\", \"query:NAME\" or \"protocol:PREFIX\", got {text:?}"
        )),
    }
}
