//! What makes a token servable: a JWT (not opaque), signed by the issuer (JWKS; HS* refused), not
//! expired, for the configured audience and issuer, and carrying `uid` = the client id. Each failure
//! is its own [`CheckError`] whose message says how to fix it.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Map, Value};

use super::jwks::Jwks;
use crate::auth::ResolvedEndpoints;
use crate::clock::SharedClock;
use crate::config::{TokenSettings, UidCheck};

/// The Auth0 credentials-exchange Action that sets `uid` (quoted in errors and `doctor`).
pub const UID_ACTION: &str = r#"exports.onExecuteCredentialsExchange = async (event, api) => {
  api.accessToken.setCustomClaim("uid", event.client.client_id);
};"#;

/// Why a token is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    #[error(
        "the access token is opaque, not a JWT; Behest needs a JWT: set auth.audience to the Behest API identifier (Auth0 issues opaque tokens when no audience is asked for)"
    )]
    Opaque,
    #[error("the access token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error(
        "the token is signed with {0}, which the agent refuses (only RS*, PS* and ES* can be checked against the issuer's public keys)"
    )]
    Algorithm(String),
    #[error("the token's signature does not verify against the issuer's JWKS: {0}")]
    Signature(String),
    #[error("the token's key id `{0}` is not in the issuer's JWKS, even after fetching it again")]
    UnknownKid(String),
    #[error("cannot get the issuer's JWKS: {0}")]
    Jwks(String),
    #[error("the token expired at {0}")]
    Expired(String),
    #[error("the token's audience {got:?} does not include `{expected}`; check auth.audience")]
    Audience { expected: String, got: Vec<String> },
    #[error("the token's issuer `{got}` is not `{expected}`; check auth.domain / auth.issuer")]
    Issuer { expected: String, got: String },
    #[error(
        "the token has no `{claim}` claim, and Behest identifies machines by it. Add it with an Auth0 Action on the Machine to Machine (credentials exchange) trigger:\n{UID_ACTION}\n(or set token.uid_check = \"warn\" to serve such tokens anyway)"
    )]
    UidMissing { claim: String },
    #[error(
        "the token's `{claim}` claim is `{got}`, not the client id `{expected}`; the credentials-exchange Action must set it to event.client.client_id:\n{UID_ACTION}\n(or set token.expected_uid if another value is intended)"
    )]
    UidMismatch {
        claim: String,
        expected: String,
        got: String,
    },
}

impl CheckError {
    pub fn code(&self) -> &'static str {
        match self {
            CheckError::Opaque => "opaque_token",
            CheckError::Malformed(_) => "malformed_token",
            CheckError::Algorithm(_) => "refused_algorithm",
            CheckError::Signature(_) => "bad_signature",
            CheckError::UnknownKid(_) => "unknown_kid",
            CheckError::Jwks(_) => "jwks_unavailable",
            CheckError::Expired(_) => "expired",
            CheckError::Audience { .. } => "wrong_audience",
            CheckError::Issuer { .. } => "wrong_issuer",
            CheckError::UidMissing { .. } => "uid_missing",
            CheckError::UidMismatch { .. } => "uid_mismatch",
        }
    }
}

/// A token's claims, as read (after the signature was checked).
#[derive(Debug, Clone, Default)]
pub struct Claims {
    pub exp: u64,
    pub raw: Map<String, Value>,
    /// The value of the configured uid claim.
    pub uid: Option<String>,
}

impl Claims {
    pub fn str(&self, name: &str) -> Option<&str> {
        self.raw.get(name).and_then(Value::as_str)
    }

    /// `aud` as a list (it may be a string or an array).
    pub fn audiences(&self) -> Vec<String> {
        match self.raw.get("aud") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The claims worth showing (never the token).
    pub fn view(&self) -> ClaimsView {
        let text = |n: &str| {
            self.raw.get(n).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        ClaimsView {
            uid: self.uid.clone(),
            tid: text("tid"),
            pid: text("pid"),
            tier: text("tier"),
            aud: self.audiences(),
            iss: text("iss"),
            sub: text("sub"),
            scope: text("scope"),
            org_id: text("org_id"),
        }
    }
}

/// The claims shown by `status`, `token --json` and logs.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ClaimsView {
    pub uid: Option<String>,
    pub tid: Option<String>,
    pub pid: Option<String>,
    pub tier: Option<String>,
    pub aud: Vec<String>,
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub scope: Option<String>,
    pub org_id: Option<String>,
}

/// Checks tokens for one configuration.
#[derive(Debug)]
pub struct Verifier {
    settings: TokenSettings,
    audience: Option<String>,
    jwks: Option<Arc<Jwks>>,
    clock: SharedClock,
}

impl Verifier {
    /// `audience`: what `aud` must contain (auth.audience, else auth.resource), when set.
    pub fn new(
        settings: TokenSettings,
        audience: Option<String>,
        http: reqwest::Client,
        clock: SharedClock,
    ) -> Self {
        let jwks = settings.verify_signature.then(|| Arc::new(Jwks::new(http)));
        Self {
            settings,
            audience,
            jwks,
            clock,
        }
    }

    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }

    /// Checks `token`; on success returns its claims and any warnings.
    pub async fn check(
        &self,
        token: &SecretString,
        endpoints: &ResolvedEndpoints,
    ) -> Result<(Claims, Vec<String>), CheckError> {
        let text = token.expose_secret();
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() != 3 {
            return Err(CheckError::Opaque);
        }
        let header = jsonwebtoken::decode_header(text)
            .map_err(|_| CheckError::Malformed("the header is not base64url JSON".into()))?;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1].trim_end_matches('='))
            .map_err(|_| CheckError::Malformed("the payload is not base64url".into()))?;
        let raw: Map<String, Value> = serde_json::from_slice(&payload)
            .map_err(|_| CheckError::Malformed("the payload is not a JSON object".into()))?;

        match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                return Err(CheckError::Algorithm(format!("{:?}", header.alg)));
            }
            _ => {}
        }
        if let Some(jwks) = &self.jwks {
            let url = endpoints.jwks_url.as_ref().ok_or_else(|| {
                CheckError::Jwks(
                    "no JWKS URL is known; set auth.jwks_url, or token.verify_signature = false"
                        .into(),
                )
            })?;
            let key = jwks.key(url, header.kid.as_deref(), header.alg).await?;
            let mut validation = Validation::new(header.alg);
            validation.validate_exp = false;
            validation.validate_aud = false;
            validation.required_spec_claims.clear();
            jsonwebtoken::decode::<Value>(text, &key, &validation)
                .map_err(|e| CheckError::Signature(e.to_string()))?;
        }

        let exp = raw
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| CheckError::Malformed("no numeric `exp` claim".into()))?;
        if exp > super::MAX_RFC3339_UNIX {
            return Err(CheckError::Malformed(
                "the `exp` claim is after year 9999".into(),
            ));
        }
        let exp_time = crate::clock::from_unix(exp)
            .ok_or_else(|| CheckError::Malformed("the `exp` claim is out of range".into()))?;
        if exp_time <= self.clock.now() {
            return Err(CheckError::Expired(super::rfc3339(exp_time)));
        }
        let uid = raw
            .get(&self.settings.uid_claim)
            .and_then(Value::as_str)
            .map(String::from);
        let claims = Claims { exp, raw, uid };

        if let Some(expected) = &endpoints.issuer {
            let got = claims.str("iss").unwrap_or_default();
            if got.trim_end_matches('/') != expected.trim_end_matches('/') {
                return Err(CheckError::Issuer {
                    expected: expected.clone(),
                    got: got.to_string(),
                });
            }
        }
        if let Some(aud) = &self.audience {
            let got = claims.audiences();
            if !got.iter().any(|a| a == aud) {
                return Err(CheckError::Audience {
                    expected: aud.clone(),
                    got,
                });
            }
        }

        let mut warnings = Vec::new();
        let uid_error = match &claims.uid {
            None => Some(CheckError::UidMissing {
                claim: self.settings.uid_claim.clone(),
            }),
            Some(got) if *got != self.settings.expected_uid => Some(CheckError::UidMismatch {
                claim: self.settings.uid_claim.clone(),
                expected: self.settings.expected_uid.clone(),
                got: got.clone(),
            }),
            Some(_) => None,
        };
        if let Some(e) = uid_error {
            match self.settings.uid_check {
                UidCheck::Enforce => return Err(e),
                UidCheck::Warn => warnings.push(e.to_string()),
            }
        }
        for name in &self.settings.required_claims {
            if !claims.raw.contains_key(name) {
                warnings.push(format!(
                    "the token has no `{name}` claim; Behest may refuse it. Set it in the credentials-exchange Action (api.accessToken.setCustomClaim(\"{name}\", …))"
                ));
            }
        }
        Ok((claims, warnings))
    }
}
