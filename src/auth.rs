//! Getting a token from the IdP: endpoints (fixed or discovered), client authentication (secret post,
//! secret basic, private_key_jwt) and the client-credentials grant itself, run by the `oauth2` crate
//! over the project's own reqwest client. It hands back the IdP's answer unchecked: checking and
//! caching the token is the `token` module's, which builds on this one and never the other way
//! round. It never formats a secret into an error.

pub mod assertion;
pub mod endpoints;
pub mod grant;
pub mod http;

use std::time::Duration;

pub use endpoints::ResolvedEndpoints;
pub use grant::{Grant, IssuedToken};

/// Why a grant did not produce a token. Cloned to every request waiting on that grant. The message
/// is [`GrantError::problem`] followed by [`GrantError::fix`]; `doctor` prints them on two lines.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}; {}", self.problem(), self.fix())]
pub enum GrantError {
    /// The IdP answered with an OAuth2 error (RFC 6749 §5.2).
    Refused {
        status: u16,
        error: String,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The IdP answered with an error status that is not an OAuth2 error (a proxy's HTML page, …).
    Http {
        status: u16,
        snippet: String,
        retry_after: Option<Duration>,
    },
    Transport {
        url: String,
        message: String,
    },
    Malformed(String),
    Discovery {
        url: String,
        message: String,
    },
    Secret {
        from: String,
        message: String,
    },
    Assertion(String),
}

/// The keys that say where the IdP is, for remedies that cannot know which one is in use.
const IDP_KEYS: &str = "auth.domain (or auth.issuer / auth.token_url)";

/// The fix when the IdP refused the client's own credentials.
const CREDENTIALS_FIX: &str = "check auth.client_id and the client secret: they must be the machine-to-machine application's Client ID and Client Secret (Auth0: Applications > the application > Settings); with private_key_jwt, its public key must be registered with the application (Auth0: Applications > the application > Credentials) and auth.key_id must name it";

impl GrantError {
    /// What went wrong, without the remedy.
    pub fn problem(&self) -> String {
        match self {
            GrantError::Refused {
                status,
                error,
                description,
                ..
            } => format!(
                "the IdP refused the grant with `{error}`{} (HTTP {status})",
                description
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            ),
            GrantError::Http {
                status, snippet, ..
            } => format!("the IdP answered HTTP {status}: {snippet}"),
            GrantError::Transport { url, message } => {
                format!("cannot reach the IdP at {url}: {message}")
            }
            GrantError::Malformed(m) => format!("the IdP's token response is malformed: {m}"),
            GrantError::Discovery { url, message } => {
                format!("OIDC discovery at {url} failed: {message}")
            }
            GrantError::Secret { from, message } => {
                format!("cannot read the client secret from {from}: {message}")
            }
            GrantError::Assertion(m) => format!("cannot sign the client assertion: {m}"),
        }
    }

    /// What to do about it: the one place each remedy is written.
    pub fn fix(&self) -> String {
        match self {
            GrantError::Refused {
                error, retry_after, ..
            } => match self.refused_credentials().unwrap_or(error.as_str()) {
                "unauthorized_client" => "enable the client-credentials grant for the application (Auth0: Applications > the application > Advanced Settings > Grant Types > Client Credentials)".into(),
                "access_denied" => "set auth.audience to the Behest API's identifier if it is not set, authorize the application for that API (Auth0: Applications > APIs > the API > Machine to Machine Applications), and check auth.audience is that API's identifier".into(),
                "invalid_client" => CREDENTIALS_FIX.into(),
                "invalid_scope" => "ask only for scopes the API grants this application (auth.scope), or remove auth.scope".into(),
                "invalid_target" => "auth.resource is not a resource this IdP knows: correct it, or use auth.audience".into(),
                "too_many_requests" => format!(
                    "the tenant's rate limit or machine-to-machine quota is spent: wait{}, and keep the disk cache (token.cache_file) so restarts and CLI calls reuse the token",
                    retry_after
                        .map(|d| format!(" {}", humantime::format_duration(d)))
                        .unwrap_or_default()
                ),
                "temporarily_unavailable" | "server_error" => {
                    "the IdP is having trouble: try again later (the daemon retries by itself)".into()
                }
                _ => "check the application's settings in the tenant and what the agent asks for (auth.audience, auth.scope, auth.extra_params)".into(),
            },
            // A token endpoint's 401 without an OAuth2 body: still the client's authentication.
            GrantError::Http { status: 401, .. } => CREDENTIALS_FIX.into(),
            // Only a proxy sends it: an `http` IdP is reached through the egress proxy.
            GrantError::Http { status: 407, .. } => "the egress proxy wants other credentials: check the user in egress.proxy and egress.proxy_password_file (or the ones in HTTPS_PROXY / http_proxy)".into(),
            GrantError::Http { .. } => format!(
                "check {IDP_KEYS} names the IdP itself, not a proxy or a web page; if the IdP is down, try again later"
            ),
            GrantError::Transport { .. } => format!(
                "check {IDP_KEYS} and that this machine reaches the IdP (DNS, firewall; behind a company proxy, set [egress] proxy or HTTPS_PROXY, and check the proxy's user and password — `doctor` shows the egress in use); for an IdP behind a private CA, set proxy.ca_file"
            ),
            GrantError::Malformed(_) => {
                format!("check {IDP_KEYS} names an OAuth2 token endpoint")
            }
            GrantError::Discovery { .. } => "check auth.issuer (the IdP's issuer URL, exactly as its discovery document names it) and that this machine reaches it; or set auth.token_url and auth.jwks_url to skip discovery".into(),
            GrantError::Secret { .. } => "put the application's Client Secret there, readable by the user the agent runs as and no one else (mode 0600)".into(),
            GrantError::Assertion(_) => "check auth.private_key_file and auth.signing_alg match (an RSA key for RS*/PS*, an EC P-256 key for ES256)".into(),
        }
    }

    /// The refusal's error code, read as `invalid_client` when the IdP refused the client's own
    /// credentials: Auth0 answers a wrong secret with 401 `access_denied` ("Unauthorized"), where
    /// 403 `access_denied` is about the API asked for.
    pub fn refused_credentials(&self) -> Option<&'static str> {
        match self {
            GrantError::Refused {
                status: 401, error, ..
            } if error == "access_denied" => Some("invalid_client"),
            _ => None,
        }
    }

    /// Errors only a configuration change fixes: reported loudly, retried at the slow end.
    pub fn is_config_error(&self) -> bool {
        match self {
            GrantError::Refused { error, .. } => matches!(
                error.as_str(),
                "invalid_client"
                    | "unauthorized_client"
                    | "access_denied"
                    | "invalid_scope"
                    | "invalid_target"
            ),
            GrantError::Secret { .. } | GrantError::Assertion(_) => true,
            _ => false,
        }
    }

    /// The IdP asked us to wait this long (Retry-After, or x-ratelimit-reset).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GrantError::Refused { retry_after, .. } | GrantError::Http { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// A short machine-readable code for metrics and JSON: RFC 6749 §5.2's codes and those
    /// Auth0 adds; any other the IdP sent is `other` (a metric label must not take whatever an
    /// IdP answers).
    pub fn code(&self) -> String {
        match self {
            GrantError::Refused { error, .. } => match error.as_str() {
                "invalid_request"
                | "invalid_client"
                | "invalid_grant"
                | "unauthorized_client"
                | "unsupported_grant_type"
                | "invalid_scope"
                | "access_denied"
                | "server_error"
                | "temporarily_unavailable"
                | "too_many_requests"
                | "invalid_target" => error.clone(),
                _ => "other".into(),
            },
            GrantError::Http { status, .. } => format!("http_{status}"),
            GrantError::Transport { .. } => "unreachable".into(),
            GrantError::Malformed(_) => "malformed_response".into(),
            GrantError::Discovery { .. } => "discovery_failed".into(),
            GrantError::Secret { .. } => "secret_unreadable".into(),
            GrantError::Assertion(_) => "assertion_failed".into(),
        }
    }
}
