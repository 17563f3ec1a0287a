//! Egress through a company's HTTP proxy (SPEC §11): how the agent reaches the IdP and the
//! upstream when a runner may not connect out directly. `[egress]` names the proxy (`proxy`,
//! `no_proxy`, `proxy_password_file`); without it, `HTTPS_PROXY`, `http_proxy`, `ALL_PROXY` and
//! `NO_PROXY` are read the way curl reads them. `https` destinations are reached through a
//! `CONNECT` tunnel (hyper-util's `Tunnel` for the upstream, reqwest's own for the IdP), `http` ones
//! with absolute-form requests to the proxy. Which destination goes through which proxy is
//! hyper-util's [`Matcher`] (reqwest uses the same one), so both clients agree.
//!
//! A proxy URL may carry a password (from the environment, or `proxy_password_file` put into it):
//! it is kept as a secret and shown nowhere — [`Egress::describe`] names the proxy without it.

use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use secrecy::{ExposeSecret, SecretString};

/// What to add to an error when the egress proxy answered a `CONNECT` with an error status:
/// hyper-util (and reqwest with it) says only "unsuccessful".
pub const CONNECT_REFUSED: &str = " (the egress proxy answered the CONNECT with an error status: does it let this machine reach that host? is egress.proxy_password_file right?)";

/// The proxies in force, resolved from `[egress]` or the environment.
#[derive(Clone, Default)]
pub struct Egress {
    /// For `http://` destinations (a URL that may hold credentials).
    pub http: Option<SecretString>,
    /// For `https://` destinations.
    pub https: Option<SecretString>,
    /// Hosts, domains and CIDRs reached directly (curl's `NO_PROXY` syntax).
    pub no_proxy: String,
    /// Where the setting came from (`egress.proxy`, `HTTPS_PROXY`, …), for `status` and `doctor`.
    pub source: String,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe().unwrap_or_else(|| "direct".into()))
    }
}

impl PartialEq for Egress {
    fn eq(&self, other: &Self) -> bool {
        let url = |s: &Option<SecretString>| s.as_ref().map(|s| s.expose_secret().to_string());
        url(&self.http) == url(&other.http)
            && url(&self.https) == url(&other.https)
            && self.no_proxy == other.no_proxy
    }
}

impl Egress {
    /// Whether any proxy is set.
    pub fn is_direct(&self) -> bool {
        self.http.is_none() && self.https.is_none()
    }

    /// The matcher both clients decide with.
    pub fn matcher(&self) -> Matcher {
        let mut b = Matcher::builder().no(self.no_proxy.clone());
        if let Some(p) = &self.http {
            b = b.http(p.expose_secret().to_string());
        }
        if let Some(p) = &self.https {
            b = b.https(p.expose_secret().to_string());
        }
        b.build()
    }

    /// The proxy for `dst`, with its `Proxy-Authorization`, when one is to be used.
    pub fn intercept(&self, dst: &http::Uri) -> Option<Intercept> {
        if self.is_direct() {
            return None;
        }
        self.matcher().intercept(dst)
    }

    /// `message`, about a request to `url` that failed, naming the proxy it went through if any.
    pub fn through(&self, url: &str, message: impl std::fmt::Display) -> String {
        match url.parse().ok().and_then(|u| self.intercept(&u)) {
            Some(proxy) => format!(
                "through the egress proxy {}: {message}",
                without_credentials(&proxy.uri().to_string())
            ),
            None => message.to_string(),
        }
    }

    /// reqwest's configuration of the same proxies (reqwest builds the same hyper-util matcher
    /// from them, credentials in the URL included); none when direct. Never the environment on
    /// reqwest's own terms.
    pub fn reqwest(&self) -> Vec<reqwest::Proxy> {
        let no = || reqwest::NoProxy::from_string(&self.no_proxy);
        let mut out = Vec::new();
        if let Some(p) = &self.https
            && let Ok(proxy) = reqwest::Proxy::https(p.expose_secret())
        {
            out.push(proxy.no_proxy(no()));
        }
        if let Some(p) = &self.http
            && let Ok(proxy) = reqwest::Proxy::http(p.expose_secret())
        {
            out.push(proxy.no_proxy(no()));
        }
        out
    }

    /// The proxies' credentials as they travel (`user:password`, and both parts), for taking out
    /// of what a proxy echoes back in an error page.
    pub fn credentials(&self) -> Vec<(String, SecretString)> {
        let decoded = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        [&self.http, &self.https]
            .into_iter()
            .flatten()
            .filter_map(|p| url::Url::parse(p.expose_secret()).ok())
            .filter_map(|u| {
                let password = SecretString::from(decoded(u.password()?));
                Some((decoded(u.username()), password))
            })
            .collect()
    }

    /// The proxies in words, without credentials: `None` when the agent connects directly.
    pub fn describe(&self) -> Option<String> {
        if self.is_direct() {
            return None;
        }
        let shown =
            |p: &Option<SecretString>| p.as_ref().map(|p| without_credentials(p.expose_secret()));
        let mut out = match (shown(&self.http), shown(&self.https)) {
            (Some(h), Some(s)) if h == s => format!("through {h}"),
            (Some(h), Some(s)) => format!("https through {s}, http through {h}"),
            (None, Some(s)) => format!("https through {s}"),
            (Some(h), None) => format!("http through {h}"),
            (None, None) => unreachable!("not direct"),
        };
        out.push_str(&format!(" ({})", self.source));
        if !self.no_proxy.trim().is_empty() {
            out.push_str(&format!("; directly: {}", self.no_proxy.trim()));
        }
        Some(out)
    }
}

/// `http://user:secret@host:port/` shown as `http://host:port`.
pub fn without_credentials(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "(unparsable proxy URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(http: Option<&str>, https: Option<&str>, no: &str) -> Egress {
        Egress {
            http: http.map(|s| SecretString::from(s.to_string())),
            https: https.map(|s| SecretString::from(s.to_string())),
            no_proxy: no.into(),
            source: "test".into(),
        }
    }

    #[test]
    fn destinations_are_matched_as_curl_does() {
        let e = egress(
            Some("http://p:3128"),
            Some("http://alice:pw@p:3128"),
            "internal.corp, 10.0.0.0/8",
        );
        let via = |u: &str| {
            e.intercept(&u.parse().unwrap())
                .map(|i| i.uri().to_string())
        };
        assert_eq!(
            via("https://tenant.auth0.com/").as_deref(),
            Some("http://p:3128/")
        );
        assert_eq!(
            via("http://gateway.example/").as_deref(),
            Some("http://p:3128/")
        );
        assert_eq!(via("https://api.internal.corp/"), None);
        assert_eq!(via("https://10.1.2.3/"), None);
        let auth = e
            .intercept(&"https://x/".parse().unwrap())
            .unwrap()
            .basic_auth()
            .cloned();
        assert!(
            auth.is_some(),
            "credentials in the URL become Proxy-Authorization"
        );
        assert_eq!(
            egress(None, None, "")
                .intercept(&"https://x/".parse().unwrap())
                .map(|_| ()),
            None
        );
    }

    #[test]
    fn the_description_never_shows_credentials() {
        let e = egress(
            None,
            Some("http://alice:hunter2@proxy.corp:3128"),
            "localhost",
        );
        let d = e.describe().unwrap();
        assert_eq!(
            d,
            "https through http://proxy.corp:3128 (test); directly: localhost"
        );
        assert!(!format!("{e:?}").contains("hunter2"));
        assert_eq!(egress(None, None, "").describe(), None);
    }
}
