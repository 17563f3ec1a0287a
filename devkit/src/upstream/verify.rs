//! How the echo upstream checks a bearer token, as Behest checks Auth0's: a JWT signed by one of
//! the IdP's keys (picked by `kid`), for the configured audience, from the configured issuer, not
//! expired by the upstream's clock, and carrying `uid`, `tid` and `pid`.
//!
//! It uses `jsonwebtoken` directly and never the agent's own verifier, so a bug in the agent's
//! checks cannot hide behind the same bug here. It never keeps or formats the token.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use url::Url;

use crate::Now;
use crate::idp::Idp;

/// Claims Behest reads and refuses a token without.
const REQUIRED_CLAIMS: [&str; 3] = ["uid", "tid", "pid"];
/// Bound on one JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Where the upstream finds the public keys it verifies tokens with.
#[derive(Debug, Clone)]
pub enum Keys {
    /// The JWKS at this plain-`http` URL (another IdP on this machine), fetched on first use and
    /// again when a token names a key id it does not hold (the IdP rotated its key).
    Jwks(Url),
    /// An embedded IdP in this process: the keys its JWKS publishes, read directly, so they follow
    /// its rotations and are not subject to its JWKS faults.
    Idp(Idp),
}

/// Why a token was refused; the 401's message says it.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    #[error("it is not a JWT")]
    Malformed,
    #[error("it is signed with {0:?}, which Behest does not accept")]
    Algorithm(Algorithm),
    #[error("its key id {0} is not in the IdP's JWKS")]
    UnknownKid(String),
    #[error("it names no key id and the JWKS has several keys")]
    NoKid,
    #[error("it says {token:?} but its key is for {key:?}")]
    KeyAlgorithm { token: Algorithm, key: Algorithm },
    #[error("the JWKS could not be used: {0}")]
    Jwks(String),
    #[error("{0}")]
    Rejected(#[from] jsonwebtoken::errors::Error),
    #[error("its `exp` is not a number")]
    NoExp,
    #[error("it expired at {0} (Unix time)")]
    Expired(u64),
    #[error("its issuer is {got:?}, not {expected}")]
    Issuer { expected: String, got: String },
    #[error("it has no `{0}` claim, which Behest requires")]
    MissingClaim(&'static str),
}

/// Checks tokens against one IdP's keys.
#[derive(Debug)]
pub(super) struct Verifier {
    keys: Keys,
    /// The `iss` tokens must carry, when set (trailing slashes are ignored).
    issuer: Option<String>,
    /// The `aud` tokens must carry.
    audience: String,
    now: Now,
    /// The last JWKS fetched, for [`Keys::Jwks`].
    fetched: RwLock<Option<Arc<JwkSet>>>,
    /// Held while fetching, so a burst of tokens with a new key id makes one request.
    fetching: tokio::sync::Mutex<()>,
}

impl Verifier {
    pub(super) fn new(keys: Keys, issuer: Option<String>, audience: String, now: Now) -> Self {
        Self {
            keys,
            issuer,
            audience,
            now,
            fetched: RwLock::default(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The token's claims, when Behest would take it.
    pub(super) async fn check(&self, token: &str) -> Result<Map<String, Value>, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(Refusal::Algorithm(header.alg));
        }
        let key = self.key(header.kid.as_deref(), header.alg).await?;
        let mut validation = Validation::new(header.alg);
        // `exp` is compared with the upstream's clock below, `iss` ignoring a trailing slash.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.set_audience(&[&self.audience]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)?.claims;

        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(Refusal::NoExp)?;
        if exp <= self.now.unix() {
            return Err(Refusal::Expired(exp));
        }
        if let Some(expected) = &self.issuer {
            let got = claims
                .get("iss")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if got.trim_end_matches('/') != expected.trim_end_matches('/') {
                return Err(Refusal::Issuer {
                    expected: expected.clone(),
                    got: got.to_owned(),
                });
            }
        }
        if let Some(missing) = REQUIRED_CLAIMS
            .into_iter()
            .find(|name| claims.get(*name).is_none_or(Value::is_null))
        {
            return Err(Refusal::MissingClaim(missing));
        }
        Ok(claims)
    }

    /// The key that verifies a token whose header names `kid` and `alg`.
    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, Refusal> {
        let unknown = || Refusal::UnknownKid(kid.unwrap_or("(none)").to_owned());
        let url = match &self.keys {
            Keys::Idp(idp) => return pick(&idp.jwk_set(), kid, alg)?.ok_or_else(unknown),
            Keys::Jwks(url) => url,
        };
        if let Some(key) = self.cached(kid, alg)? {
            return Ok(key);
        }
        let _one_fetch = self.fetching.lock().await;
        // Another request may have fetched a set that has the key while this one waited.
        if let Some(key) = self.cached(kid, alg)? {
            return Ok(key);
        }
        let set = Arc::new(fetch(url).await.map_err(Refusal::Jwks)?);
        *self.fetched.write().unwrap_or_else(PoisonError::into_inner) = Some(set.clone());
        pick(&set, kid, alg)?.ok_or_else(unknown)
    }

    fn cached(&self, kid: Option<&str>, alg: Algorithm) -> Result<Option<DecodingKey>, Refusal> {
        let set = self
            .fetched
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match set {
            Some(set) => pick(&set, kid, alg),
            None => Ok(None),
        }
    }
}

/// The key named `kid` (or the only one, when the token names none); `None` when the set does not
/// hold it.
fn pick(set: &JwkSet, kid: Option<&str>, alg: Algorithm) -> Result<Option<DecodingKey>, Refusal> {
    let jwk = match kid {
        Some(kid) => set.find(kid),
        None if set.keys.len() == 1 => set.keys.first(),
        None => return Err(Refusal::NoKid),
    };
    let Some(jwk) = jwk else {
        return Ok(None);
    };
    if let Some(key_alg) = jwk.common.key_algorithm
        && let Ok(key_alg) = Algorithm::try_from(key_alg)
        && key_alg != alg
    {
        return Err(Refusal::KeyAlgorithm {
            token: alg,
            key: key_alg,
        });
    }
    DecodingKey::from_jwk(jwk)
        .map(Some)
        .map_err(|e| Refusal::Jwks(format!("unusable key: {e}")))
}

/// GETs the JWKS at `url` over plain HTTP/1.1, within [`JWKS_TIMEOUT`].
async fn fetch(url: &Url) -> Result<JwkSet, String> {
    tokio::time::timeout(JWKS_TIMEOUT, fetch_once(url))
        .await
        .unwrap_or_else(|_| Err(format!("{url} did not answer within {JWKS_TIMEOUT:?}")))
}

async fn fetch_once(url: &Url) -> Result<JwkSet, String> {
    let fail = |what: &str, error: &dyn std::fmt::Display| format!("{url}: {what}: {error}");
    if url.scheme() != "http" {
        return Err(format!(
            "{url}: the echo upstream fetches a JWKS over plain http only"
        ));
    }
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(format!("{url}: no host to connect to"));
    };
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| fail("connect", &e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail("handshake", &e))?;
    tokio::spawn(connection);
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let path = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let request = Request::get(path)
        .header(HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail("request", &e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail("request", &e))?;
    if response.status() != StatusCode::OK {
        return Err(format!(
            "{url} answered HTTP {}",
            response.status().as_u16()
        ));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| fail("body", &e))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| fail("not a JWKS", &e))
}
