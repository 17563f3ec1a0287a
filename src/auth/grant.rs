//! One client-credentials grant: read the secret (again, so a rotated file is picked up), build the
//! client authentication, ask the token endpoint with `oauth2`, and turn every failure into a
//! [`GrantError`] that keeps the OAuth2 error code, the HTTP status and the wait hint.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, Scope,
    StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use serde::{Deserialize, Serialize};

use super::http::{Adapter, ResponseMeta, TransportError};
use super::{GrantError, ResolvedEndpoints, assertion, endpoints};
use crate::clock::SharedClock;
use crate::config::{AuthSettings, ClientAuth, SecretSource};

/// What the IdP handed out, not yet checked.
pub struct IssuedToken {
    pub access_token: SecretString,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken").finish_non_exhaustive()
    }
}

/// The token endpoint's answer as the agent reads it: the access token and its type. The
/// lifetime is the JWT's `exp`, so `expires_in` is not read at all — a negative or fractional one
/// (seen from IdPs) must not refuse an otherwise valid token.
#[derive(Debug, Serialize, Deserialize)]
struct TokenBody {
    access_token: AccessToken,
    token_type: BasicTokenType,
}

impl TokenResponse for TokenBody {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        None
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        None
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        None
    }
}

type OAuthClient<HasTokenUrl> = oauth2::Client<
    BasicErrorResponse,
    TokenBody,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    HasTokenUrl,
>;

/// Performs grants for one configured client.
#[derive(Debug)]
pub struct Grant {
    settings: AuthSettings,
    http: reqwest::Client,
    /// The proxies `http` goes through, to name the one in a transport error.
    egress: crate::egress::Egress,
    clock: SharedClock,
    endpoints: tokio::sync::OnceCell<ResolvedEndpoints>,
}

impl Grant {
    pub fn new(
        settings: AuthSettings,
        http: reqwest::Client,
        egress: crate::egress::Egress,
        clock: SharedClock,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            http,
            egress,
            clock,
            endpoints: tokio::sync::OnceCell::new(),
        })
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The endpoints, discovered on first use when configured so.
    pub async fn endpoints(&self) -> Result<&ResolvedEndpoints, GrantError> {
        self.endpoints
            .get_or_try_init(|| endpoints::resolve(&self.settings.endpoints, &self.http))
            .await
    }

    /// Asks the token endpoint for a new token.
    pub async fn request(&self) -> Result<IssuedToken, GrantError> {
        let endpoints = self.endpoints().await?;
        let s = &self.settings;
        let mut client = OAuthClient::new(ClientId::new(s.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(endpoints.token_url.clone()));
        let mut assertion: Option<SecretString> = None;
        // What an IdP might echo back in an error (a debug page, a confused error code): never
        // repeated in a log line, an error, a metric or `status`.
        let mut sent: Vec<SecretString> = Vec::new();
        match &s.client_auth {
            ClientAuth::ClientSecretPost | ClientAuth::ClientSecretBasic => {
                let secret = self.read_secret().await?;
                sent.push(secret.clone());
                client = client
                    .set_client_secret(ClientSecret::new(secret.expose_secret().to_string()))
                    .set_auth_type(match s.client_auth {
                        ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
                        _ => AuthType::RequestBody,
                    });
            }
            ClientAuth::PrivateKeyJwt(key) => {
                client = client.set_auth_type(AuthType::RequestBody);
                let aud = endpoints
                    .issuer
                    .clone()
                    .unwrap_or_else(|| endpoints.token_url.to_string());
                let signed = assertion::sign(key, &s.client_id, &aud, self.clock.unix())
                    .map_err(GrantError::Assertion)?;
                sent.push(signed.clone());
                assertion = Some(signed);
            }
        }

        let mut request = client.exchange_client_credentials();
        if let Some(a) = &s.audience {
            request = request.add_extra_param("audience", a.clone());
        }
        if let Some(r) = &s.resource {
            request = request.add_extra_param("resource", r.clone());
        }
        if let Some(o) = &s.organization {
            request = request.add_extra_param("organization", o.clone());
        }
        if let Some(scope) = &s.scope {
            request =
                request.add_scopes(scope.split_whitespace().map(|x| Scope::new(x.to_string())));
        }
        for (k, v) in &s.extra_params {
            request = request.add_extra_param(k.clone(), v.clone());
        }
        if let Some(a) = &assertion {
            request = request
                .add_extra_param(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                )
                .add_extra_param("client_assertion", a.expose_secret().to_string());
        }

        let adapter = Adapter {
            client: self.http.clone(),
            meta: Arc::new(Mutex::new(None)),
            now: self.clock.now(),
        };
        let result: Result<TokenBody, RequestTokenError<TransportError, BasicErrorResponse>> =
            request.request_async(&adapter).await;
        let meta = adapter.meta.lock().expect("meta lock").clone();
        match result {
            // RFC 6749 §7.1: a token of a type the client does not understand is not used; the
            // agent sends Bearer tokens (RFC 6750), as Behest expects.
            // oauth2 reads only `bearer` as Bearer; RFC 6749 §5.1 has the type case-insensitive.
            Ok(token) if !token.token_type().as_ref().eq_ignore_ascii_case("bearer") => {
                Err(GrantError::Malformed(sanitize(&format!(
                    "the IdP issued a token of type `{}`; the agent sends Bearer tokens only",
                    token.token_type().as_ref()
                ))))
            }
            Ok(token) => Ok(IssuedToken {
                access_token: SecretString::from(token.access_token().secret().to_string()),
            }),
            Err(e) => Err(self.map_error(e, meta, &endpoints.token_url, &sent)),
        }
    }

    /// What went wrong, in the IdP's words where it gave some: cut to one short line, with every
    /// credential in `sent` taken out first (an IdP may echo them back).
    fn map_error(
        &self,
        error: RequestTokenError<TransportError, BasicErrorResponse>,
        meta: Option<ResponseMeta>,
        token_url: &url::Url,
        sent: &[SecretString],
    ) -> GrantError {
        let mut credentials: Vec<(String, SecretString)> = sent
            .iter()
            .map(|s| (self.settings.client_id.clone(), s.clone()))
            .collect();
        credentials.extend(self.egress.credentials());
        let quote = |text: &str| sanitize(&redact(text, &credentials));
        let status = meta.as_ref().map(|m| m.status).unwrap_or(0);
        let retry_after = meta.as_ref().and_then(|m| m.retry_after);
        match error {
            RequestTokenError::ServerResponse(e) => GrantError::Refused {
                status,
                error: quote(e.error().as_ref()),
                description: e.error_description().map(|d| quote(d)),
                retry_after,
            },
            RequestTokenError::Request(TransportError::TooLarge) if status == 200 => {
                GrantError::Malformed(TransportError::TooLarge.to_string())
            }
            RequestTokenError::Request(e @ TransportError::TooLarge) => GrantError::Http {
                status,
                snippet: e.to_string(),
                retry_after,
            },
            RequestTokenError::Request(t) => GrantError::Transport {
                url: token_url.to_string(),
                message: self.egress.through(token_url.as_str(), t),
            },
            // A 200 body may hold the token: never quote it. Error bodies are quoted, shortened.
            RequestTokenError::Parse(e, body) => {
                if status == 200 {
                    GrantError::Malformed(quote(&format!("not a token response ({})", e.inner())))
                } else {
                    GrantError::Http {
                        status,
                        snippet: quote(&String::from_utf8_lossy(&body)),
                        retry_after,
                    }
                }
            }
            RequestTokenError::Other(m) if status == 200 => GrantError::Malformed(quote(&m)),
            RequestTokenError::Other(m) => GrantError::Http {
                status,
                snippet: quote(&m),
                retry_after,
            },
        }
    }

    /// The client credential as bytes, for deriving the fleet's entry key: the secret (read again,
    /// as for a grant) or the private key's PEM. Never logged.
    pub async fn credential(&self) -> Result<SecretSlice<u8>, GrantError> {
        match &self.settings.client_auth {
            ClientAuth::PrivateKeyJwt(key) => Ok(key.pem.expose_secret().to_vec().into()),
            _ => Ok(self
                .read_secret()
                .await?
                .expose_secret()
                .as_bytes()
                .to_vec()
                .into()),
        }
    }

    async fn read_secret(&self) -> Result<SecretString, GrantError> {
        match &self.settings.secret {
            SecretSource::File { path, .. } => {
                let text =
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| GrantError::Secret {
                            from: self.settings.secret.describe(),
                            message: e.to_string(),
                        })?;
                let secret = crate::config::secret_text(&text).map_err(|e| GrantError::Secret {
                    from: self.settings.secret.describe(),
                    message: e.into(),
                })?;
                Ok(SecretString::from(secret.to_string()))
            }
            SecretSource::Env { value, .. } => Ok(value.clone()),
            SecretSource::None => Err(GrantError::Secret {
                from: "configuration".into(),
                message: "no client secret configured".into(),
            }),
        }
    }
}

/// `text` without the `(user, secret)` credentials in any form they were sent in: as they are,
/// form-encoded (`~` is `%7E`), or inside HTTP Basic (of the plain or the form-encoded pair, as
/// RFC 6749 §2.3.1 has it). A text that still holds a secret once percent-decoded (`%7e`) is
/// withheld whole.
fn redact(text: &str, credentials: &[(String, SecretString)]) -> String {
    use base64::Engine as _;
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic =
        |u: &str, s: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{s}"));
    let mut out = text.to_string();
    for (user, secret) in credentials {
        let secret = secret.expose_secret();
        if secret.is_empty() {
            continue;
        }
        let forms = [
            basic(user, secret),
            basic(&encode(user), &encode(secret)),
            encode(secret),
            secret.to_string(),
        ];
        for form in forms {
            out = out.replace(&form, "[redacted]");
        }
    }
    let secrets: Vec<&str> = credentials
        .iter()
        .map(|(_, s)| s.expose_secret())
        .filter(|s| !s.is_empty())
        .collect();
    if holds_secret(&out, &secrets) {
        return "(withheld: it repeats a credential the agent sent)".into();
    }
    out
}

/// Whether `text` still holds one of `secrets` in a form an echo may have put it in: percent-
/// encoded (once, twice or thrice; `+` for a space), as HTML character references, cut by white
/// space, or inside a run of base64 (either alphabet, padded or not) or hex.
fn holds_secret(text: &str, secrets: &[&str]) -> bool {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let lenient = |alphabet: &base64::alphabet::Alphabet| {
        GeneralPurpose::new(
            alphabet,
            GeneralPurposeConfig::new()
                .with_decode_padding_mode(DecodePaddingMode::Indifferent)
                .with_decode_allow_trailing_bits(true),
        )
    };
    let std_b64 = lenient(&base64::alphabet::STANDARD);
    let url_b64 = lenient(&base64::alphabet::URL_SAFE);
    let mut views = vec![text.to_string(), html_unescaped(text)];
    for run in text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=-_".contains(c))) {
        let run = run.trim_end_matches('=');
        if run.len() < 8 {
            continue;
        }
        for engine in [&std_b64, &url_b64] {
            if let Ok(bytes) = engine.decode(run) {
                views.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        if run.len() % 2 == 0
            && let Ok(bytes) = (0..run.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&run[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
        {
            views.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    let mut decoded = Vec::new();
    for view in &views {
        let mut v = view.clone();
        for _ in 0..3 {
            v = percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            decoded.push(v.clone());
        }
    }
    views.extend(decoded);
    let squeezed = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    views.iter().any(|v| {
        let v = squeezed(v);
        secrets
            .iter()
            .any(|s| !squeezed(s).is_empty() && v.contains(&squeezed(s)))
    })
}

/// `&#126;` and `&#x7e;` as the characters they stand for.
fn html_unescaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("&#") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let (hex, digits) = match after.strip_prefix(['x', 'X']) {
            Some(h) => (true, h),
            None => (false, after),
        };
        let end = digits.find(';').unwrap_or(0);
        let code = u32::from_str_radix(&digits[..end], if hex { 16 } else { 10 });
        match code.ok().filter(|_| end > 0).and_then(char::from_u32) {
            Some(c) => {
                out.push(c);
                rest = &digits[end + 1..];
            }
            None => {
                out.push_str("&#");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One line, printable, at most 200 characters: safe to put in a log line or an error.
pub fn sanitize(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let collapsed = one_line.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return "(empty body)".into();
    }
    let mut out: String = collapsed.chars().take(200).collect();
    if collapsed.chars().count() > 200 {
        out.push('…');
    }
    out
}
