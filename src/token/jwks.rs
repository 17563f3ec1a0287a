//! The issuer's signing keys (JWKS), fetched once and kept; fetched again once when a token names a
//! key id the set does not have (the IdP rotated its key). Locks are never held across an await.

use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use url::Url;

use super::CheckError;

/// A cached JWKS.
#[derive(Debug)]
pub struct Jwks {
    http: reqwest::Client,
    /// The last set fetched and where from.
    set: RwLock<Option<(Url, Arc<JwkSet>)>>,
    /// Serializes fetches so a burst of unknown kids makes one request.
    fetching: tokio::sync::Mutex<()>,
}

impl Jwks {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            set: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, url: &Url) -> Option<Arc<JwkSet>> {
        let guard = self.set.read().expect("jwks lock");
        guard
            .as_ref()
            .filter(|(u, _)| u == url)
            .map(|(_, s)| s.clone())
    }

    /// The key that verifies a token with header `kid` (see [`decoding_key`] for `alg`).
    pub async fn key(&self, url: &Url, kid: Option<&str>) -> Result<Jwk, CheckError> {
        if let Some(set) = self.cached(url)
            && let Some(k) = pick(&set, kid)?
        {
            return Ok(k.clone());
        }
        let before = self.cached(url);
        let _guard = self.fetching.lock().await;
        // Someone else may have fetched while we waited.
        let current = self.cached(url);
        let set = match (&before, &current) {
            (Some(b), Some(c)) if !Arc::ptr_eq(b, c) => c.clone(),
            (None, Some(c)) => c.clone(),
            _ => self.fetch(url).await?,
        };
        pick(&set, kid)?
            .cloned()
            .ok_or_else(|| CheckError::UnknownKid(kid.unwrap_or("(none)").to_string()))
    }

    /// Fetches the set at `url` now, and keeps it.
    pub async fn fetch(&self, url: &Url) -> Result<Arc<JwkSet>, CheckError> {
        let response = self.http.get(url.clone()).send().await.map_err(|e| {
            CheckError::JwksDown(format!(
                "{url}: {}",
                crate::auth::http::describe_reqwest(&e)
            ))
        })?;
        let status = response.status();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(CheckError::JwksDown(format!(
                "{url} answered HTTP {}",
                status.as_u16()
            )));
        }
        if !status.is_success() {
            return Err(CheckError::Jwks(format!(
                "{url} answered HTTP {}",
                status.as_u16()
            )));
        }
        let body = crate::auth::http::body(response)
            .await
            .map_err(|e| CheckError::JwksDown(format!("{url}: {e}")))?;
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| CheckError::Jwks(format!("{url} is not a JWKS: {e}")))?;
        let set = Arc::new(set);
        *self.set.write().expect("jwks lock") = Some((url.clone(), set.clone()));
        Ok(set)
    }
}

/// Finds the key by `kid` (or the only key when the token names none).
fn pick<'a>(set: &'a JwkSet, kid: Option<&str>) -> Result<Option<&'a Jwk>, CheckError> {
    match kid {
        Some(kid) => Ok(set.find(kid)),
        None if set.keys.len() == 1 => Ok(set.keys.first()),
        None => Err(CheckError::Malformed(
            "the token names no key id (kid) and the JWKS has several keys".into(),
        )),
    }
}

/// `jwk` as a key for a token signed with `alg`; a key published for another algorithm is refused.
pub fn decoding_key(jwk: &Jwk, alg: Algorithm) -> Result<DecodingKey, CheckError> {
    if let Some(ka) = jwk.common.key_algorithm
        && let Ok(key_alg) = Algorithm::try_from(ka)
        && key_alg != alg
    {
        return Err(CheckError::Signature(format!(
            "the token says {alg:?} but its key is for {key_alg:?}"
        )));
    }
    DecodingKey::from_jwk(jwk).map_err(|e| CheckError::Jwks(format!("unusable key: {e}")))
}
