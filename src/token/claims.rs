//! What makes a token servable: a JWT (not opaque), signed by the issuer (JWKS; HS* refused), not
//! expired, for the configured audience and issuer, and carrying `uid` = the client id. Each rule is
//! one [`Verifier`] method (`doctor` reports them one by one) and each failure its own
//! [`CheckError`], whose message says how to fix it.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Map, Value};

use super::jwks::{Jwks, decoding_key};
use crate::auth::ResolvedEndpoints;
use crate::auth::grant::sanitize;
use crate::clock::SharedClock;
use crate::config::{TokenSettings, UidCheck};

/// The Auth0 credentials-exchange Action that sets the uid claim `claim` (quoted in errors and
/// `doctor`).
fn uid_action(claim: &str) -> String {
    format!(
        "exports.onExecuteCredentialsExchange = async (event, api) => {{\n  api.accessToken.setCustomClaim({}, event.client.client_id);\n}};",
        Value::from(claim)
    )
}

/// Why a token is refused (or, for [`CheckError::ClaimMissing`], what is worth a warning). The
/// message is [`CheckError::problem`] followed by [`CheckError::fix`]; `doctor` prints them apart.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}; {}", self.problem(), self.fix())]
pub enum CheckError {
    Opaque,
    Malformed(String),
    Algorithm(String),
    Signature(String),
    UnknownKid(String),
    /// Signatures are checked, but no JWKS URL is configured or discovered.
    NoJwksUrl,
    /// The JWKS answers with something that is not one, or a key the agent cannot use.
    Jwks(String),
    /// The JWKS could not be had now (unreachable, 5xx, 429): an outage, retried as one.
    JwksDown(String),
    Expired(String),
    /// `nbf` or `iat` is later than now (beyond [`CLOCK_LEEWAY`]).
    NotYetValid {
        claim: &'static str,
        at: String,
    },
    Audience {
        expected: String,
        got: Vec<String>,
    },
    Issuer {
        expected: String,
        /// The claim as [`shown`] (or the JSON of one that is not a string); empty when absent.
        got: String,
    },
    UidMissing {
        claim: String,
    },
    /// `azp`, `client_id` or an Auth0 `sub` names another client than auth.client_id.
    ClientMismatch {
        claim: &'static str,
        expected: String,
        /// The claim as [`shown`], or the JSON of one that is not a string.
        got: String,
    },
    UidMismatch {
        claim: String,
        expected: String,
        /// The claim as [`shown`], or the JSON of one that is not a string.
        got: String,
    },
    /// A claim Behest reads is absent: a warning, never a refusal.
    ClaimMissing {
        claim: String,
    },
}

/// How far `nbf` and `iat` may be ahead of this machine's clock (jsonwebtoken's default leeway).
pub const CLOCK_LEEWAY: std::time::Duration = std::time::Duration::from_secs(60);

/// The remedy for a token from another issuer than the configured one.
const SAME_ISSUER: &str =
    "make auth.domain (or auth.issuer / auth.jwks_url) name the IdP that issues the token";

impl CheckError {
    /// What is wrong with the token, without the remedy.
    pub fn problem(&self) -> String {
        match self {
            CheckError::Opaque => "the access token is opaque, not the JWT Behest needs".into(),
            CheckError::Malformed(m) => format!("the access token is not a well-formed JWT: {m}"),
            CheckError::Algorithm(alg) => format!(
                "the token is signed with {alg}, which the agent refuses (only RS*, PS* and ES* can be checked against the issuer's public keys)"
            ),
            CheckError::Signature(m) => {
                format!("the token's signature does not verify against the issuer's JWKS: {m}")
            }
            CheckError::UnknownKid(kid) => format!(
                "the token's key id `{}` is not in the issuer's JWKS, even after fetching it again",
                sanitize(kid)
            ),
            CheckError::NoJwksUrl => {
                "no JWKS URL is known, so the token's signature cannot be checked".into()
            }
            CheckError::Jwks(m) | CheckError::JwksDown(m) => {
                format!("cannot get the issuer's JWKS: {m}")
            }
            CheckError::Expired(at) => format!("the token expired at {at}"),
            CheckError::NotYetValid { claim, at } => format!(
                "the token's `{claim}` claim is {at}, later than this machine's clock (more than {}s ahead)",
                CLOCK_LEEWAY.as_secs()
            ),
            CheckError::Audience { expected, got } => {
                format!("the token's audience {got:?} does not include `{expected}`")
            }
            CheckError::Issuer { expected, got } if got.is_empty() => {
                format!("the token names no issuer (a string `iss` claim); expected `{expected}`")
            }
            CheckError::Issuer { expected, got } => {
                format!("the token's issuer {got} is not `{expected}`")
            }
            CheckError::UidMissing { claim } => {
                format!("the token has no `{claim}` claim, and Behest identifies machines by it")
            }
            CheckError::ClientMismatch {
                claim,
                expected,
                got,
            } => format!(
                "the token was issued to another client: its `{claim}` claim is {got}, not auth.client_id `{expected}`"
            ),
            CheckError::UidMismatch {
                claim,
                expected,
                got,
            } => format!(
                "the token's `{claim}` claim is {got}, not the expected `{expected}` (the client id, unless token.expected_uid says otherwise)"
            ),
            CheckError::ClaimMissing { claim } => {
                format!("the token has no `{claim}` claim; Behest may refuse it")
            }
        }
    }

    /// What to do about it: the one place each remedy is written.
    pub fn fix(&self) -> String {
        match self {
            CheckError::Opaque => "set auth.audience to the Behest API identifier: Auth0 issues opaque tokens when no audience is asked for (another IdP: make it issue JWT access tokens for that API, e.g. with a resource indicator, auth.resource)".into(),
            CheckError::Malformed(_) => "check auth.domain (or auth.issuer) names the IdP, and that the API issues signed JWTs (Auth0: an API with signing algorithm RS256)".into(),
            CheckError::Algorithm(_) => "set the API's signing algorithm to RS256 (Auth0: Applications > APIs > the API > Settings)".into(),
            CheckError::Signature(_) => format!("the token was not signed by this issuer: {SAME_ISSUER}"),
            CheckError::UnknownKid(_) => format!("the token comes from another IdP or tenant: {SAME_ISSUER}"),
            CheckError::NoJwksUrl => "set auth.jwks_url (or auth.issuer, for discovery, if the IdP's discovery document names its `jwks_uri`), or token.verify_signature = false".into(),
            CheckError::Jwks(_) | CheckError::JwksDown(_) => "check auth.jwks_url (or auth.domain / auth.issuer) names the IdP's JWKS and that this machine reaches it; if the IdP is having an outage, try again later".into(),
            CheckError::Expired(_) => "check this machine's clock (`timedatectl status`); if it is right, the IdP issues tokens that are already expired: check the API's token lifetime".into(),
            CheckError::NotYetValid { .. } => "check this machine's clock (`timedatectl status`) and the IdP's: one of them is wrong".into(),
            CheckError::ClientMismatch { .. } => "the cached or issued token belongs to another client: delete token.cache_file if it was copied from elsewhere, and check auth.client_id and auth.domain".into(),
            CheckError::Audience { .. } => "set auth.audience to the Behest API identifier (Auth0: Applications > APIs > the API > Identifier), and authorize the application for that API".into(),
            CheckError::Issuer { .. } => "set auth.domain (Auth0) or auth.issuer (OIDC) to the IdP that issues the token".into(),
            CheckError::UidMissing { claim } => format!(
                "add this Action to Auth0's Machine to Machine (credentials exchange) trigger and to that flow:\n{}\n(or set token.uid_check = \"warn\" to serve such tokens anyway)",
                uid_action(claim)
            ),
            CheckError::UidMismatch {
                claim, expected, ..
            } => format!(
                "make the credentials-exchange Action set it to `{expected}` (event.client.client_id, unless token.expected_uid names another value), or correct token.expected_uid:\n{}",
                uid_action(claim)
            ),
            CheckError::ClaimMissing { claim } => format!(
                "set it in the credentials-exchange Action with api.accessToken.setCustomClaim(\"{claim}\", …)"
            ),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            CheckError::Opaque => "opaque_token",
            CheckError::Malformed(_) => "malformed_token",
            CheckError::Algorithm(_) => "refused_algorithm",
            CheckError::Signature(_) => "bad_signature",
            CheckError::UnknownKid(_) => "unknown_kid",
            CheckError::NoJwksUrl | CheckError::Jwks(_) | CheckError::JwksDown(_) => {
                "jwks_unavailable"
            }
            CheckError::Expired(_) => "expired",
            CheckError::NotYetValid { .. } => "not_yet_valid",
            CheckError::ClientMismatch { .. } => "client_mismatch",
            CheckError::Audience { .. } => "wrong_audience",
            CheckError::Issuer { .. } => "wrong_issuer",
            CheckError::UidMissing { .. } => "uid_missing",
            CheckError::UidMismatch { .. } => "uid_mismatch",
            CheckError::ClaimMissing { .. } => "claim_missing",
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

/// A NumericDate (RFC 7519: seconds, which may have a fraction) as whole seconds; `None` when
/// negative or not a number.
fn unix_seconds(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

/// Where the key that verifies a token's signature comes from.
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    /// The issuer's JWKS, fetched (once, and again on an unknown key id).
    Jwks(&'a ResolvedEndpoints),
    /// The key stored with a cached token when it was verified against the JWKS, and the issuer
    /// expected from the configuration: a check without the network.
    Stored {
        issuer: Option<&'a str>,
        key: Option<&'a Jwk>,
    },
}

impl Keys<'_> {
    /// The `iss` the token must carry, when known.
    fn issuer(&self) -> Option<&str> {
        match self {
            Keys::Jwks(endpoints) => endpoints.issuer.as_deref(),
            Keys::Stored { issuer, .. } => *issuer,
        }
    }
}

/// A token that passed every check.
#[derive(Debug)]
pub struct Checked {
    pub claims: Claims,
    /// Findings that did not refuse it.
    pub warnings: Vec<String>,
    /// The issuer's key that verified its signature (none when signatures are not checked).
    pub key: Option<Jwk>,
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

    /// What `aud` must contain, when anything is required.
    pub fn audience(&self) -> Option<&str> {
        self.audience.as_deref()
    }

    /// Checks `token` against the issuer's JWKS; on success returns its claims and any warnings.
    pub async fn check(
        &self,
        token: &SecretString,
        endpoints: &ResolvedEndpoints,
    ) -> Result<(Claims, Vec<String>), CheckError> {
        let c = self.check_with(token, Keys::Jwks(endpoints)).await?;
        Ok((c.claims, c.warnings))
    }

    /// Checks `token`, its signature against `keys`; on success returns its claims, any warnings
    /// and the key that verified it.
    pub async fn check_with(
        &self,
        token: &SecretString,
        keys: Keys<'_>,
    ) -> Result<Checked, CheckError> {
        let (claims, key) = self.verify_from(token, keys).await?;
        self.check_expiry(&claims)?;
        self.check_issuer(&claims, keys.issuer())?;
        self.check_audience(&claims)?;
        self.check_client(&claims)?;
        let mut warnings = Vec::new();
        if let Err(e) = self.check_uid(&claims) {
            match self.settings.uid_check {
                UidCheck::Enforce => return Err(e),
                UidCheck::Warn => warnings.push(e.to_string()),
            }
        }
        for name in &self.settings.required_claims {
            if !claims.raw.contains_key(name) {
                let missing = CheckError::ClaimMissing {
                    claim: name.clone(),
                };
                warnings.push(missing.to_string());
            }
        }
        Ok(Checked {
            claims,
            warnings,
            key,
        })
    }

    /// The format, the algorithm and (unless turned off) the signature: on success the token's
    /// claims, which can then be trusted to say what the issuer said, but are not checked yet.
    pub async fn verify(
        &self,
        token: &SecretString,
        endpoints: &ResolvedEndpoints,
    ) -> Result<Claims, CheckError> {
        Ok(self.verify_from(token, Keys::Jwks(endpoints)).await?.0)
    }

    /// [`Verifier::verify`] against `keys`, and the key that verified the signature (none when
    /// signatures are not checked).
    async fn verify_from(
        &self,
        token: &SecretString,
        keys: Keys<'_>,
    ) -> Result<(Claims, Option<Jwk>), CheckError> {
        let text = token.expose_secret();
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() != 3 {
            return Err(CheckError::Opaque);
        }
        let header = jsonwebtoken::decode_header(text).map_err(|_| unknown_alg(parts[0]))?;
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
        let mut used = None;
        if let Some(jwks) = &self.jwks {
            let jwk = match keys {
                Keys::Jwks(endpoints) => {
                    let url = endpoints.jwks_url.as_ref().ok_or(CheckError::NoJwksUrl)?;
                    jwks.key(url, header.kid.as_deref()).await?
                }
                Keys::Stored { key: Some(k), .. } => k.clone(),
                Keys::Stored { key: None, .. } => {
                    return Err(CheckError::Jwks(
                        "no key of the issuer's was stored with the cached token".into(),
                    ));
                }
            };
            let key = decoding_key(&jwk, header.alg)?;
            let mut validation = Validation::new(header.alg);
            validation.validate_exp = false;
            validation.validate_aud = false;
            validation.required_spec_claims.clear();
            jsonwebtoken::decode::<Value>(text, &key, &validation)
                .map_err(|e| CheckError::Signature(e.to_string()))?;
            used = Some(jwk);
        }

        let exp = raw
            .get("exp")
            .and_then(unix_seconds)
            .ok_or_else(|| CheckError::Malformed("no numeric `exp` claim".into()))?;
        if exp > super::MAX_RFC3339_UNIX {
            return Err(CheckError::Malformed(
                "the `exp` claim is after year 9999".into(),
            ));
        }
        let uid = raw
            .get(&self.settings.uid_claim)
            .and_then(Value::as_str)
            .map(String::from);
        Ok((Claims { exp, raw, uid }, used))
    }

    /// Valid now: not expired, and neither `nbf` nor `iat` (when present) later than now by more
    /// than [`CLOCK_LEEWAY`] — such a token is refused by the upstream too.
    pub fn check_expiry(&self, claims: &Claims) -> Result<(), CheckError> {
        let now = self.clock.now();
        let exp_time = crate::clock::from_unix(claims.exp)
            .ok_or_else(|| CheckError::Malformed("the `exp` claim is out of range".into()))?;
        if exp_time <= now {
            return Err(CheckError::Expired(super::rfc3339(exp_time)));
        }
        for claim in ["nbf", "iat"] {
            let Some(value) = claims.raw.get(claim) else {
                continue;
            };
            let at = unix_seconds(value)
                .and_then(crate::clock::from_unix)
                .ok_or_else(|| {
                    CheckError::Malformed(format!("the `{claim}` claim is not a time"))
                })?;
            if at > now + CLOCK_LEEWAY {
                return Err(CheckError::NotYetValid {
                    claim,
                    at: super::rfc3339(at),
                });
            }
        }
        Ok(())
    }

    /// The client the token was issued to, where it says (`azp`, `client_id`, or Auth0's
    /// `sub` = `CLIENT@clients`), is auth.client_id. Checked whatever `token.uid_check` says: a
    /// token of another client (a tampered or copied cache) is never served.
    pub fn check_client(&self, claims: &Claims) -> Result<(), CheckError> {
        let expected = &self.settings.client_id;
        for claim in ["azp", "client_id", "sub"] {
            let got = match claims.raw.get(claim) {
                None => continue,
                // A `sub` names a client only as Auth0's `CLIENT@clients`.
                Some(Value::String(s)) if claim == "sub" => match s.strip_suffix("@clients") {
                    Some(client) => client,
                    None => continue,
                },
                Some(Value::String(s)) => s.as_str(),
                // Not a string (`["c2"]`, `1`): not the client id, whatever it holds.
                Some(other) => {
                    return Err(CheckError::ClientMismatch {
                        claim,
                        expected: expected.clone(),
                        got: not_a_string(other),
                    });
                }
            };
            if got != expected {
                return Err(CheckError::ClientMismatch {
                    claim,
                    expected: expected.clone(),
                    got: shown(got),
                });
            }
        }
        Ok(())
    }

    /// `iss` is `expected` (one trailing slash aside), when an issuer is known.
    pub fn check_issuer(&self, claims: &Claims, expected: Option<&str>) -> Result<(), CheckError> {
        let Some(expected) = expected else {
            return Ok(());
        };
        let one = |s: &'_ str| s.strip_suffix('/').unwrap_or(s).to_string();
        let got = match claims.raw.get("iss") {
            Some(Value::String(got)) if one(got) == one(expected) => return Ok(()),
            None | Some(Value::Null) => String::new(),
            Some(Value::String(got)) => shown(got),
            Some(other) => not_a_string(other),
        };
        Err(CheckError::Issuer {
            expected: expected.to_string(),
            got,
        })
    }

    /// `aud` includes the configured audience, when one is configured.
    pub fn check_audience(&self, claims: &Claims) -> Result<(), CheckError> {
        let Some(aud) = &self.audience else {
            return Ok(());
        };
        let got = claims.audiences();
        if !got.iter().any(|a| a == aud) {
            return Err(CheckError::Audience {
                expected: aud.clone(),
                got,
            });
        }
        Ok(())
    }

    /// The uid claim is the expected uid (whether that refuses the token is `token.uid_check`'s).
    pub fn check_uid(&self, claims: &Claims) -> Result<(), CheckError> {
        let t = &self.settings;
        match claims.raw.get(&t.uid_claim) {
            None | Some(Value::Null) => Err(CheckError::UidMissing {
                claim: t.uid_claim.clone(),
            }),
            Some(Value::String(got)) if *got == t.expected_uid => Ok(()),
            Some(got) => Err(CheckError::UidMismatch {
                claim: t.uid_claim.clone(),
                expected: t.expected_uid.clone(),
                got: match got {
                    Value::String(s) => shown(s),
                    other => not_a_string(other),
                },
            }),
        }
    }
}

/// A claim's value quoted exactly, so that what differs from the expected one shows: a trailing
/// space, a control character or a look-alike letter is escaped (`"c1 "`, `"c1\u{0}"`,
/// `"\u{441}1"`); at most 200 characters.
pub fn shown(value: &str) -> String {
    let cut: String = value.chars().take(200).collect();
    let more = if cut.len() < value.len() { "…" } else { "" };
    format!("\"{}\"{more}", cut.escape_default())
}

/// A claim that is not a string, shown as its JSON.
fn not_a_string(value: &Value) -> String {
    format!("{} (not a string)", sanitize(&value.to_string()))
}

/// Why a header `jsonwebtoken` cannot read is refused: an algorithm it does not know (`none`
/// among them) is named as such; anything else is malformed.
fn unknown_alg(header: &str) -> CheckError {
    let alg = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|h| serde_json::from_slice::<Map<String, Value>>(&h).ok())
        .and_then(|h| h.get("alg").and_then(Value::as_str).map(String::from));
    match alg {
        Some(alg) => {
            CheckError::Algorithm(format!("{:?}", alg.chars().take(32).collect::<String>()))
        }
        None => CheckError::Malformed("the header is not base64url JSON".into()),
    }
}
