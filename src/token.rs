//! The machine's access token: the checks every token passes before it is served ([`claims`]), the
//! issuer's keys ([`jwks`]), the disk cache ([`cache`]) and [`TokenSource`], the one handle the proxy,
//! the control API and the CLI use. It builds on [`crate::auth`], which only asks the IdP: a grant's
//! failure and a check's failure meet here, in [`RefreshError`]. A token that failed a check is
//! never served; its text never reaches a log line, an error, a metric or `status`.

pub mod cache;
pub mod claims;
pub mod jwks;
pub mod source;

use std::time::{Duration, SystemTime};

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

pub use cache::Identity;
pub use claims::{CheckError, Checked, Claims, Keys, Verifier};
pub use source::{RefreshError, Status, TokenError, TokenSource};

/// The agent asks the IdP for a token at most this often per identity, except for its first grant
/// and the 401 replay (which has its own limit): it is the floor of the refresh interval (a token
/// that lives shorter is not replaced before then), and forced grants (`refresh`, `token
/// --min-ttl`) within it share the outcome of the one before instead of asking again.
pub const MIN_GRANT_INTERVAL: Duration = Duration::from_secs(5);

/// A checked access token.
pub struct Token {
    secret: SecretString,
    /// `Bearer <token>`, built once and marked sensitive, for the proxy's hot path.
    bearer: HeaderValue,
    pub claims: Claims,
    pub expires_at: SystemTime,
    pub obtained_at: SystemTime,
    /// When the refresher should replace it (before expiry, jittered).
    pub refresh_at: SystemTime,
    /// Check findings that did not refuse the token (missing `tid`, uid under `warn`, …).
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("claims", &self.claims)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Builds a token from a checked secret; `None` if it cannot be a header value.
    pub fn new(
        secret: SecretString,
        claims: Claims,
        obtained_at: SystemTime,
        refresh_margin: Duration,
        warnings: Vec<String>,
    ) -> Result<Token, CheckError> {
        let mut bearer = HeaderValue::try_from(format!("Bearer {}", secret.expose_secret()))
            .map_err(|_| {
                CheckError::Malformed("the token has characters not allowed in a header".into())
            })?;
        bearer.set_sensitive(true);
        let expires_at = crate::clock::from_unix(claims.exp)
            .ok_or_else(|| CheckError::Malformed("the `exp` claim is out of range".into()))?;
        let lifetime = expires_at.duration_since(obtained_at).unwrap_or_default();
        // Refresh when the remaining lifetime falls below max(margin, 10% of lifetime), minus up to a
        // quarter of that window of jitter so a fleet does not refresh in lockstep; never sooner
        // than MIN_GRANT_INTERVAL after the grant (tokens of a few seconds would burn the quota).
        // The jitter is fixed by the token and the machine: every `status` shows the same point,
        // and machines sharing one token (a fleet) still spread out.
        let window = refresh_margin.max(lifetime / 10).min(lifetime / 2);
        let seed = {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            secret.expose_secret().hash(&mut h);
            nix::unistd::gethostname().ok().hash(&mut h);
            h.finish()
        };
        let jitter = window.mul_f64(seed as f64 / u64::MAX as f64 * 0.25);
        let refresh_at = (expires_at - window - jitter).max(obtained_at + MIN_GRANT_INTERVAL);
        Ok(Token {
            secret,
            bearer,
            claims,
            expires_at,
            obtained_at,
            refresh_at,
            warnings,
        })
    }

    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// The `Authorization` header value.
    pub fn bearer(&self) -> &HeaderValue {
        &self.bearer
    }

    /// Time left before expiry at `now` (zero when expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }

    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.obtained_at)
            .unwrap_or_default()
    }
}

/// The last instant RFC 3339 (and humantime) can write: 9999-12-31T23:59:59Z.
pub const MAX_RFC3339_UNIX: u64 = 253_402_300_799;

/// RFC 3339 in UTC, seconds precision; clamped to years 1970..=9999, which is all it can write.
pub fn rfc3339(t: SystemTime) -> String {
    let max = SystemTime::UNIX_EPOCH + Duration::from_secs(MAX_RFC3339_UNIX);
    humantime::format_rfc3339_seconds(t.clamp(SystemTime::UNIX_EPOCH, max)).to_string()
}
