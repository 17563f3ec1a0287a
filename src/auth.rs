//! Getting a token from the IdP: endpoints (fixed or discovered), client authentication (secret post,
//! secret basic, private_key_jwt) and the client-credentials grant itself, run by the `oauth2` crate
//! over the project's own reqwest client. This module never checks or caches the token (that is
//! [`crate::token`]) and never formats a secret into an error.

pub mod assertion;
pub mod endpoints;
pub mod grant;
pub mod http;

use std::time::Duration;

pub use endpoints::ResolvedEndpoints;
pub use grant::{Grant, IssuedToken};

use crate::token::CheckError;

/// Why a grant did not produce a usable token. Cloned to every request waiting on that grant.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GrantError {
    /// The IdP answered with an OAuth2 error (RFC 6749 §5.2).
    #[error("the IdP refused the grant with `{error}`{} (HTTP {status}){}", describe(.description), hint(.error))]
    Refused {
        status: u16,
        error: String,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The IdP answered with an error status that is not an OAuth2 error (a proxy's HTML page, …).
    #[error("the IdP answered HTTP {status}: {snippet}")]
    Http {
        status: u16,
        snippet: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach the IdP at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("the IdP's token response is malformed: {0}")]
    Malformed(String),
    #[error("OIDC discovery at {url} failed: {message}")]
    Discovery { url: String, message: String },
    #[error("cannot read the client secret from {from}: {message}")]
    Secret { from: String, message: String },
    #[error("cannot sign the client assertion: {0}")]
    Assertion(String),
    /// The IdP issued a token that failed the agent's checks; it is never served.
    #[error("the IdP issued a token the agent refuses: {0}")]
    Rejected(CheckError),
}

fn describe(d: &Option<String>) -> String {
    d.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
}

fn hint(error: &str) -> &'static str {
    match error {
        "invalid_client" => {
            "; check auth.client_id and the client secret (or private key) — they do not match an application in the tenant"
        }
        "unauthorized_client" => {
            "; the application is not allowed the client-credentials grant: enable it in the application's Advanced Settings > Grant Types"
        }
        "access_denied" => {
            "; authorize the application for the API named by auth.audience (Auth0: Applications > APIs > Machine to Machine Applications), and check auth.audience is the API identifier"
        }
        "invalid_scope" => "; ask only for scopes the API grants this application (auth.scope)",
        "invalid_target" => "; auth.resource is not a resource this IdP knows",
        "too_many_requests" => "; the tenant's rate limit or M2M quota is exhausted",
        _ => "",
    }
}

impl GrantError {
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
            GrantError::Secret { .. } | GrantError::Assertion(_) | GrantError::Rejected(_) => true,
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

    /// A short machine-readable code for metrics and JSON.
    pub fn code(&self) -> String {
        match self {
            GrantError::Refused { error, .. } => error.clone(),
            GrantError::Http { status, .. } => format!("http_{status}"),
            GrantError::Transport { .. } => "unreachable".into(),
            GrantError::Malformed(_) => "malformed_response".into(),
            GrantError::Discovery { .. } => "discovery_failed".into(),
            GrantError::Secret { .. } => "secret_unreadable".into(),
            GrantError::Assertion(_) => "assertion_failed".into(),
            GrantError::Rejected(e) => e.code().into(),
        }
    }
}
