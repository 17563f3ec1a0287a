//! Where the token endpoint and the JWKS are: given (Auth0, explicit URLs) or found by OIDC discovery
//! (RFC 8414 / OpenID Connect Discovery), which is done once and kept.

use serde::Deserialize;
use url::Url;

use super::GrantError;
use crate::config::{Endpoints, parse_url};

/// Endpoints ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoints {
    /// The expected `iss` claim (and the client assertion's `aud`), when known.
    pub issuer: Option<String>,
    pub token_url: Url,
    pub jwks_url: Option<Url>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
    jwks_uri: Option<String>,
}

/// Resolves the configured endpoints, asking the issuer when it must.
pub async fn resolve(
    endpoints: &Endpoints,
    http: &reqwest::Client,
) -> Result<ResolvedEndpoints, GrantError> {
    match endpoints {
        Endpoints::Fixed {
            issuer,
            token_url,
            jwks_url,
        } => Ok(ResolvedEndpoints {
            issuer: issuer.clone(),
            token_url: token_url.clone(),
            jwks_url: jwks_url.clone(),
        }),
        Endpoints::Discover { issuer } => discover(issuer, http).await,
    }
}

/// The issuer tokens must name, from the configuration alone: what [`resolve`] gives without asking
/// the network (discovery only succeeds when its document names the configured issuer).
pub fn configured_issuer(endpoints: &Endpoints) -> Option<String> {
    match endpoints {
        Endpoints::Fixed { issuer, .. } => issuer.clone(),
        Endpoints::Discover { issuer } => Some(issuer.as_str().to_string()),
    }
}

async fn discover(issuer: &Url, http: &reqwest::Client) -> Result<ResolvedEndpoints, GrantError> {
    let base = issuer.as_str().trim_end_matches('/');
    let url = format!("{base}/.well-known/openid-configuration");
    let fail = |message: String| GrantError::Discovery {
        url: url.clone(),
        message,
    };
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| fail(super::http::describe_reqwest(&e)))?;
    if !response.status().is_success() {
        return Err(fail(format!("HTTP {}", response.status().as_u16())));
    }
    let body = super::http::body(response)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let doc: Discovery = serde_json::from_slice(&body)
        .map_err(|e| fail(format!("not a discovery document: {e}")))?;
    if doc.issuer.trim_end_matches('/') != base {
        return Err(fail(format!(
            "the document names issuer `{}`, not the configured `{}`; set auth.issuer to the IdP's issuer exactly",
            doc.issuer, issuer
        )));
    }
    let token_url =
        parse_url(&doc.token_endpoint).map_err(|m| fail(format!("token_endpoint: {m}")))?;
    let jwks_url = doc
        .jwks_uri
        .map(|u| parse_url(&u).map_err(|m| fail(format!("jwks_uri: {m}"))))
        .transpose()?;
    // An https issuer's endpoints are https too: one named in plain http (loopback or not) would
    // take the client secret, or the keys tokens are checked with, out of TLS.
    for (name, url) in [
        ("token_endpoint", Some(&token_url)),
        ("jwks_uri", jwks_url.as_ref()),
    ] {
        if issuer.scheme() == "https" && url.is_some_and(|u| u.scheme() != "https") {
            return Err(fail(format!(
                "{name}: the https issuer names a plain http URL; the IdP's discovery document must name https endpoints"
            )));
        }
    }
    Ok(ResolvedEndpoints {
        issuer: Some(doc.issuer),
        token_url,
        jwks_url,
    })
}
