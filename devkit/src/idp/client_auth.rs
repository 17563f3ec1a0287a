//! Client authentication at the token endpoint, checked the way Auth0 checks it:
//! `client_secret_post`, `client_secret_basic` (RFC 6749 §2.3.1) and `private_key_jwt` (RFC 7523
//! with Auth0's rules: `iss` = `sub` = client id, `aud` = the issuer with its trailing slash,
//! `exp` at most five minutes ahead, single-use `jti`, 10 s of clock skew).
//!
//! The secret and the assertion are moved out of the form into `SecretString`s as soon as a request
//! is parsed, so what remains can be recorded; no error message here quotes either.

use std::collections::HashMap;
use std::sync::Mutex;

use aws_lc_rs::constant_time::verify_slices_are_equal;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use percent_encoding::percent_decode_str;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use super::keys::ClientKey;
use super::{OauthError, Params, lock};

/// The only `client_assertion_type` there is (RFC 7523 §2.2).
pub(super) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Auth0 refuses assertions whose `exp` is further ahead than this.
const MAX_ASSERTION_LIFETIME_SECS: u64 = 300;
/// Clock skew Auth0 tolerates on assertion times.
const CLOCK_SKEW_SECS: u64 = 10;

/// How a token request authenticated the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_id` and `client_secret` in the form.
    ClientSecretPost,
    /// HTTP Basic with the form-urlencoded id and secret.
    ClientSecretBasic,
    /// A signed `client_assertion`.
    PrivateKeyJwt,
    /// No credentials at all.
    None,
}

/// The client the IdP knows.
#[derive(Debug)]
pub(super) struct Client {
    pub(super) id: String,
    /// Replaced whole when the secret is rotated ([`super::Idp::set_client_secret`]).
    pub(super) secret: Mutex<SecretString>,
    pub(super) public_key: Option<ClientKey>,
}

/// What a client assertion is checked against besides the client's key.
pub(super) struct AssertionRules<'a> {
    /// Unix seconds, from the IdP's clock.
    pub(super) now: u64,
    /// Acceptable `aud` values: the issuer (trailing slash) and the token endpoint URL.
    pub(super) audiences: [&'a str; 2],
}

/// Assertion `jti`s already used, with their `exp`, so a replay is refused until the assertion
/// could not pass the expiry check anyway.
#[derive(Debug, Default)]
pub(super) struct JtiLedger {
    used: Mutex<HashMap<String, u64>>,
}

impl JtiLedger {
    /// Records `jti`; false when it was seen before.
    fn claim(&self, jti: &str, exp: u64, now: u64) -> bool {
        let mut used = lock(&self.used);
        used.retain(|_, seen_exp| *seen_exp + CLOCK_SKEW_SECS >= now);
        if used.contains_key(jti) {
            return false;
        }
        used.insert(jti.to_owned(), exp);
        true
    }
}

/// The credentials one token request presented, not yet checked.
#[derive(Debug)]
pub(super) struct Credentials {
    presented: Presented,
    /// `client_id` from the form (with Basic it may repeat the header's id).
    form_client_id: Option<String>,
    /// More than one method in one request, which RFC 6749 §2.3 forbids.
    several_methods: bool,
    secret_sent: bool,
    assertion_sent: bool,
}

// `SecretString`'s Debug is redacted, so deriving Debug here prints no secret.
#[derive(Debug)]
enum Presented {
    Basic(Result<(String, SecretString), &'static str>),
    Post(SecretString),
    Assertion {
        assertion: SecretString,
        assertion_type: Option<String>,
    },
    Nothing,
}

impl Credentials {
    /// Takes the credentials out of a request: the `Authorization` header, and the
    /// `client_secret` and `client_assertion` fields, which are removed from `params`.
    pub(super) fn take(headers: &HeaderMap, params: &mut Params) -> Self {
        let secret = params.remove("client_secret").map(SecretString::from);
        let assertion = params.remove("client_assertion").map(SecretString::from);
        let basic = headers
            .get(AUTHORIZATION)
            .map(|value| parse_basic(value.as_bytes()));
        let several_methods = usize::from(basic.is_some())
            + usize::from(secret.is_some())
            + usize::from(assertion.is_some())
            > 1;
        let secret_sent = secret.is_some() || matches!(basic, Some(Ok(_)));
        let assertion_sent = assertion.is_some();
        let presented = match (basic, assertion, secret) {
            (Some(basic), _, _) => Presented::Basic(basic),
            (None, Some(assertion), _) => Presented::Assertion {
                assertion,
                assertion_type: params.get("client_assertion_type").cloned(),
            },
            (None, None, Some(secret)) => Presented::Post(secret),
            (None, None, None) => Presented::Nothing,
        };
        Self {
            presented,
            form_client_id: params.get("client_id").cloned(),
            several_methods,
            secret_sent,
            assertion_sent,
        }
    }

    pub(super) fn method(&self) -> AuthMethod {
        match self.presented {
            Presented::Basic(_) => AuthMethod::ClientSecretBasic,
            Presented::Post(_) => AuthMethod::ClientSecretPost,
            Presented::Assertion { .. } => AuthMethod::PrivateKeyJwt,
            Presented::Nothing => AuthMethod::None,
        }
    }

    /// The client id the request named: Basic's, else the form's.
    pub(super) fn client_id(&self) -> Option<&str> {
        match &self.presented {
            Presented::Basic(Ok((id, _))) => Some(id),
            _ => self.form_client_id.as_deref(),
        }
    }

    pub(super) fn secret_sent(&self) -> bool {
        self.secret_sent
    }

    pub(super) fn assertion_sent(&self) -> bool {
        self.assertion_sent
    }

    /// Checks the credentials against the registered client.
    pub(super) fn authenticate(
        &self,
        client: &Client,
        rules: &AssertionRules<'_>,
        jtis: &JtiLedger,
    ) -> Result<(), OauthError> {
        if self.several_methods {
            return Err(OauthError::invalid_request(
                "use exactly one client authentication method: HTTP Basic, client_secret or client_assertion",
            ));
        }
        match &self.presented {
            Presented::Basic(Err(why)) => {
                Err(OauthError::invalid_client(*why).with_basic_challenge())
            }
            Presented::Basic(Ok((id, secret))) => {
                if self
                    .form_client_id
                    .as_ref()
                    .is_some_and(|form_id| form_id != id)
                {
                    return Err(OauthError::invalid_client(
                        "client_id in the form differs from the one in HTTP Basic",
                    )
                    .with_basic_challenge());
                }
                check_secret(client, id, secret).map_err(OauthError::with_basic_challenge)
            }
            Presented::Post(secret) => {
                let id = self
                    .form_client_id
                    .as_deref()
                    .ok_or_else(|| OauthError::invalid_client("client_id is missing"))?;
                check_secret(client, id, secret)
            }
            Presented::Assertion {
                assertion,
                assertion_type,
            } => {
                if assertion_type.as_deref() != Some(ASSERTION_TYPE) {
                    return Err(OauthError::invalid_request(format!(
                        "client_assertion_type must be {ASSERTION_TYPE}"
                    )));
                }
                self.check_assertion(assertion, client, rules, jtis)
            }
            Presented::Nothing => Err(OauthError::invalid_client(
                "client authentication is required: send client_secret, HTTP Basic credentials or a client_assertion",
            )),
        }
    }

    fn check_assertion(
        &self,
        assertion: &SecretString,
        client: &Client,
        rules: &AssertionRules<'_>,
        jtis: &JtiLedger,
    ) -> Result<(), OauthError> {
        let key = client.public_key.as_ref().ok_or_else(|| {
            OauthError::invalid_client(
                "this client has no public key registered for private_key_jwt",
            )
        })?;
        let assertion = assertion.expose_secret();
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| OauthError::invalid_client("client_assertion is not a JWT"))?;
        if !key.algorithms().contains(&header.alg) {
            return Err(OauthError::invalid_client(format!(
                "client_assertion is signed with {:?} but the credential is registered for {:?}",
                header.alg,
                key.algorithms()
            )));
        }

        // Only the signature is left to jsonwebtoken: times are checked below against the IdP's
        // injected clock, and `aud` against Auth0's two accepted forms.
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Map<String, Value>>(assertion, key.decoding_key(), &validation)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => OauthError::invalid_client(
                    "client_assertion signature does not verify with the client's registered public key",
                ),
                _ => OauthError::invalid_client("client_assertion is not a valid signed JWT"),
            })?
            .claims;

        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        if text("iss") != Some(client.id.as_str()) || text("sub") != Some(client.id.as_str()) {
            return Err(OauthError::invalid_client(
                "client_assertion iss and sub must both be the client_id",
            ));
        }
        if self
            .form_client_id
            .as_ref()
            .is_some_and(|form_id| *form_id != client.id)
        {
            return Err(OauthError::invalid_client(
                "client_id in the form differs from the client_assertion issuer",
            ));
        }

        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(aud)) => vec![aud],
            Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !audiences.iter().any(|aud| rules.audiences.contains(aud)) {
            return Err(OauthError::invalid_client(format!(
                "client_assertion aud must be {} (with the trailing slash) or {}",
                rules.audiences[0], rules.audiences[1]
            )));
        }

        let now = rules.now;
        let exp = numeric_date(claims.get("exp"))
            .ok_or_else(|| OauthError::invalid_client("client_assertion has no exp"))?;
        if exp + CLOCK_SKEW_SECS < now {
            return Err(OauthError::invalid_client("client_assertion has expired"));
        }
        if exp > now + MAX_ASSERTION_LIFETIME_SECS + CLOCK_SKEW_SECS {
            return Err(OauthError::invalid_client(
                "client_assertion exp is more than 5 minutes ahead",
            ));
        }
        for name in ["nbf", "iat"] {
            if numeric_date(claims.get(name)).is_some_and(|t| t > now + CLOCK_SKEW_SECS) {
                return Err(OauthError::invalid_client(format!(
                    "client_assertion {name} is in the future"
                )));
            }
        }

        let jti = text("jti")
            .filter(|jti| !jti.is_empty())
            .ok_or_else(|| OauthError::invalid_client("client_assertion has no jti"))?;
        if !jtis.claim(jti, exp, now) {
            return Err(OauthError::invalid_client(
                "client_assertion jti was already used: make a new assertion for every request",
            ));
        }
        Ok(())
    }
}

fn check_secret(client: &Client, id: &str, secret: &SecretString) -> Result<(), OauthError> {
    if id != client.id {
        return Err(OauthError::invalid_client("unknown client_id"));
    }
    // Constant time, as a real server must; cheap enough to do right here too.
    let expected = lock(&client.secret).clone();
    verify_slices_are_equal(
        secret.expose_secret().as_bytes(),
        expected.expose_secret().as_bytes(),
    )
    .map_err(|_| OauthError::invalid_client("wrong client_secret for this client_id"))
}

/// Parses `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn parse_basic(value: &[u8]) -> Result<(String, SecretString), &'static str> {
    let value = std::str::from_utf8(value).map_err(|_| "Authorization header is not ASCII")?;
    let (scheme, encoded) = value
        .split_once(' ')
        .ok_or("Authorization must be HTTP Basic client credentials")?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err("Authorization must be HTTP Basic client credentials");
    }
    let decoded = Zeroizing::new(
        STANDARD
            .decode(encoded.trim())
            .map_err(|_| "HTTP Basic credentials are not valid base64")?,
    );
    let decoded =
        std::str::from_utf8(&decoded).map_err(|_| "HTTP Basic credentials are not UTF-8")?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or("HTTP Basic credentials have no ':' between client_id and client_secret")?;
    let id = form_decode(id).ok_or("HTTP Basic client_id is not form-urlencoded UTF-8")?;
    let secret = form_decode(secret)
        .map(SecretString::from)
        .ok_or("HTTP Basic client_secret is not form-urlencoded UTF-8")?;
    Ok((id, secret))
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, then `%XX`.
fn form_decode(value: &str) -> Option<String> {
    let spaced = Zeroizing::new(value.replace('+', " "));
    percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// A JWT NumericDate: whole seconds, tolerating the fractional form RFC 7519 allows.
fn numeric_date(value: Option<&Value>) -> Option<u64> {
    let value = value?;
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|secs| secs.is_finite() && *secs >= 0.0)
            .map(|secs| secs as u64)
    })
}
