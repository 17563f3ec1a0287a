//! [`TokenSource`]: the one handle to the machine's token. It holds the current checked token (a
//! read-mostly load on the hot path), runs at most one grant at a time whatever the number of waiters
//! (single-flight), refreshes before expiry against the wall clock, backs off with jitter on failure
//! (honouring `Retry-After`), keeps serving the cached token until it really expires while the IdP is
//! down, and shares a disk cache with other processes under a file lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::{CacheKey, DiskCache};
use super::claims::ClaimsView;
use super::{CheckError, Token, Verifier, rfc3339};
use crate::auth::{Grant, GrantError};
use crate::clock::SharedClock;
use crate::config::Settings;
use crate::telemetry::Metrics;

/// The refresher re-reads the wall clock at least this often, so a machine that slept through a
/// deadline refreshes on wake.
const WALL_CLOCK_RECHECK: Duration = Duration::from_secs(30);
/// A 401 from the upstream forces a new grant at most this often (no grant storm when the upstream
/// rejects every token).
const REJECTION_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why no token can be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("no valid token is available{}", last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Unavailable { last_error: Option<RefreshError> },
    #[error("the IdP issues tokens valid for {}, less than the {} asked for", humantime::format_duration(whole_seconds(*.lifetime)), humantime::format_duration(*.min_ttl))]
    TooShort {
        lifetime: Duration,
        min_ttl: Duration,
    },
}

/// `d` rounded up to whole seconds: a lifetime is measured from just before the grant to an `exp`
/// in whole seconds, so it falls a fraction short of what the IdP issues.
fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// Why a refresh (one grant, then the checks of what it issued) gave no token to serve.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    /// The grant failed: the IdP gave no token.
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// The IdP issued a token that failed the agent's checks; it is never served. The message
    /// carries the check's, so it is not also a `source()` (an error chain would say it twice).
    #[error("the IdP issued a token the agent refuses: {0}")]
    Check(CheckError),
}

impl From<CheckError> for RefreshError {
    fn from(e: CheckError) -> Self {
        RefreshError::Check(e)
    }
}

impl RefreshError {
    /// Errors only a configuration change fixes: reported loudly, retried at the slow end. A
    /// refused token is one: the IdP will issue the same again.
    pub fn is_config_error(&self) -> bool {
        match self {
            RefreshError::Grant(e) => e.is_config_error(),
            RefreshError::Check(_) => true,
        }
    }

    /// The IdP asked us to wait this long.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RefreshError::Grant(e) => e.retry_after(),
            RefreshError::Check(_) => None,
        }
    }

    /// A short machine-readable code for metrics and JSON.
    pub fn code(&self) -> String {
        match self {
            RefreshError::Grant(e) => e.code(),
            RefreshError::Check(e) => e.code().into(),
        }
    }
}

/// The token engine's state, for `status` (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `valid`, `expired` or `none`.
    pub state: &'static str,
    pub ready: bool,
    pub expires_at: Option<String>,
    pub expires_in: Option<i64>,
    pub claims: Option<ClaimsView>,
    pub warnings: Vec<String>,
    pub last_refresh: Option<String>,
    pub next_refresh: Option<String>,
    pub last_error: Option<String>,
    pub last_error_code: Option<String>,
    pub consecutive_failures: u32,
    pub grants_ok: u64,
    pub grants_failed: u64,
    pub client_id: String,
    pub issuer: String,
    pub audience: Option<String>,
}

#[derive(Default)]
struct State {
    last_refresh: Option<SystemTime>,
    last_error: Option<RefreshError>,
    failures: u32,
    /// No grant before this (backoff), except a forced one.
    retry_at: Option<Instant>,
    retry_at_wall: Option<SystemTime>,
    last_rejection_refresh: Option<Instant>,
    grants_ok: u64,
    grants_failed: u64,
    /// The last configuration error reported loudly, so it is reported once per change.
    reported_config_error: Option<String>,
}

struct Inner {
    grant: Arc<Grant>,
    verifier: Verifier,
    clock: SharedClock,
    cache: Option<DiskCache>,
    /// The current checked token; replaced whole, read without waiting on a grant.
    current: RwLock<Option<Arc<Token>>>,
    state: Mutex<State>,
    /// Grant attempts finished so far; a waiter that sees it move knows a grant happened meanwhile.
    attempts: AtomicU64,
    /// Held for the whole of a grant: one grant in flight at a time.
    grant_lock: tokio::sync::Mutex<()>,
    /// Wakes the refresher when something changed (a forced refresh, a failure).
    wake: Notify,
    /// Bumped on every change, for watchers (sd_notify STATUS, metrics).
    changes: watch::Sender<u64>,
    /// Where grant outcomes are counted, once attached.
    metrics: OnceLock<Arc<Metrics>>,
}

/// The handle to the machine's token. Cheap to clone.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Builds the engine from settings: the IdP client, the verifier and the disk cache.
    pub fn new(settings: &Settings, clock: SharedClock) -> Result<Self, String> {
        let http =
            crate::auth::http::client(settings.auth.timeout, settings.proxy.ca_file.as_deref())?;
        let a = &settings.auth;
        let cache = settings.token.cache_file.clone().map(|path| {
            DiskCache::new(
                path,
                CacheKey {
                    issuer: a.endpoints.issuer_hint(),
                    client_id: a.client_id.clone(),
                    audience: a.audience.clone(),
                    resource: a.resource.clone(),
                    organization: a.organization.clone(),
                    scope: a.scope.clone(),
                },
            )
        });
        let audience = a.audience.clone().or_else(|| a.resource.clone());
        let verifier = Verifier::new(
            settings.token.clone(),
            audience,
            http.clone(),
            clock.clone(),
        );
        let grant = Grant::new(a.clone(), http, clock.clone());
        Ok(Self::from_parts(grant, verifier, cache, clock))
    }

    pub fn from_parts(
        grant: Arc<Grant>,
        verifier: Verifier,
        cache: Option<DiskCache>,
        clock: SharedClock,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                grant,
                verifier,
                clock,
                cache,
                current: RwLock::new(None),
                state: Mutex::new(State::default()),
                attempts: AtomicU64::new(0),
                grant_lock: tokio::sync::Mutex::new(()),
                wake: Notify::new(),
                changes: watch::channel(0).0,
                metrics: OnceLock::new(),
            }),
        }
    }

    /// Counts grant outcomes in `metrics` from now on (once; later calls are ignored).
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.inner.metrics.set(metrics);
    }

    /// Sets the token gauges (expiry, time left, ready) just before a scrape.
    pub fn update_gauges(&self, metrics: &Metrics) {
        let now = self.inner.clock.now();
        match self.current() {
            Some(t) => {
                let exp = t.claims.exp as i64;
                metrics.token_expiry_timestamp.set(exp);
                let left = match t.expires_at.duration_since(now) {
                    Ok(d) => d.as_secs_f64(),
                    Err(e) => -e.duration().as_secs_f64(),
                };
                metrics.token_seconds_remaining.set(left);
                metrics.token_ready.set(i64::from(t.expires_at > now));
            }
            None => {
                metrics.token_ready.set(0);
            }
        }
    }

    pub fn grant(&self) -> &Arc<Grant> {
        &self.inner.grant
    }

    /// The checks every token passes (for `doctor`, which reports them one by one).
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// The current token, even if expired.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner.current.read().expect("token lock").clone()
    }

    /// The current token if it stays valid at least `min_ttl` (and is not expired).
    pub fn valid(&self, min_ttl: Duration) -> Option<Arc<Token>> {
        let now = self.inner.clock.now();
        self.current()
            .filter(|t| t.expires_at > now && (min_ttl.is_zero() || t.remaining(now) >= min_ttl))
    }

    /// Ready: holds a token that has not expired.
    pub fn is_ready(&self) -> bool {
        self.valid(Duration::ZERO).is_some()
    }

    /// Notified on every change of state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// A token valid for at least `min_ttl`: the current one, or one new grant shared with every
    /// concurrent caller. While backing off after a failure, answers at once with the last error.
    pub async fn get(&self, min_ttl: Duration) -> Result<Arc<Token>, TokenError> {
        if let Some(t) = self.valid(min_ttl) {
            return Ok(t);
        }
        let seen = self.inner.attempts.load(Ordering::Acquire);
        if self.in_backoff() && self.valid(Duration::ZERO).is_none() {
            return Err(self.unavailable());
        }
        let _guard = self.inner.grant_lock.lock().await;
        if let Some(t) = self.valid(min_ttl) {
            return Ok(t);
        }
        if self.inner.attempts.load(Ordering::Acquire) != seen {
            // A grant finished while we waited and did not give what we need: share its outcome
            // instead of asking again.
            return Err(self.shortfall(min_ttl));
        }
        match self.attempt(Some(min_ttl)).await {
            Ok(t) if t.remaining(self.inner.clock.now()) >= min_ttl => Ok(t),
            Ok(_) | Err(_) => Err(self.shortfall(min_ttl)),
        }
    }

    /// Forces a new grant now (the `refresh` command), whatever the backoff.
    pub async fn refresh_now(&self) -> Result<Arc<Token>, RefreshError> {
        let _guard = self.inner.grant_lock.lock().await;
        self.attempt(None).await
    }

    /// The upstream refused `rejected`: replace it, once for all requests that saw it, and at most
    /// every [`REJECTION_REFRESH_INTERVAL`]. Returns the token to retry with, if it is a new one.
    pub async fn refresh_rejected(&self, rejected: &Arc<Token>) -> Option<Arc<Token>> {
        let _guard = self.inner.grant_lock.lock().await;
        if let Some(current) = self.valid(Duration::ZERO)
            && !Arc::ptr_eq(&current, rejected)
        {
            return Some(current);
        }
        {
            let mut st = self.inner.state.lock().expect("state lock");
            if st
                .last_rejection_refresh
                .is_some_and(|at| at.elapsed() < REJECTION_REFRESH_INTERVAL)
            {
                return None;
            }
            st.last_rejection_refresh = Some(Instant::now());
        }
        tracing::info!("the upstream refused the token (401); asking the IdP for a new one");
        self.attempt(None).await.ok()
    }

    /// Loads the disk cache at start-up: a valid cached token is served without a grant.
    pub async fn load_cache(&self) -> Option<Arc<Token>> {
        let _guard = self.inner.grant_lock.lock().await;
        let t = self.disk_token(Duration::ZERO).await?;
        self.install(t.clone(), false);
        Some(t)
    }

    /// Refreshes before expiry until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            if self.due() {
                let _guard = self.inner.grant_lock.lock().await;
                if self.due() {
                    let _ = self.attempt(Some(Duration::ZERO)).await;
                }
                continue;
            }
            let wait = self.until_due().min(WALL_CLOCK_RECHECK);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.wake.notified() => {}
            }
        }
    }

    fn in_backoff(&self) -> bool {
        let st = self.inner.state.lock().expect("state lock");
        st.retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// A grant is due: no usable token or past its refresh time, and not backing off.
    fn due(&self) -> bool {
        if self.in_backoff() {
            return false;
        }
        match self.current() {
            None => true,
            Some(t) => self.inner.clock.now() >= t.refresh_at,
        }
    }

    fn until_due(&self) -> Duration {
        let backoff = {
            let st = self.inner.state.lock().expect("state lock");
            st.retry_at
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or_default()
        };
        let refresh = match self.current() {
            None => Duration::ZERO,
            Some(t) => t
                .refresh_at
                .duration_since(self.inner.clock.now())
                .unwrap_or_default(),
        };
        backoff.max(refresh)
    }

    fn unavailable(&self) -> TokenError {
        TokenError::Unavailable {
            last_error: self
                .inner
                .state
                .lock()
                .expect("state lock")
                .last_error
                .clone(),
        }
    }

    fn shortfall(&self, min_ttl: Duration) -> TokenError {
        match self.valid(Duration::ZERO) {
            Some(t) if !min_ttl.is_zero() && self.last_error().is_none() => TokenError::TooShort {
                lifetime: t.lifetime(),
                min_ttl,
            },
            _ => self.unavailable(),
        }
    }

    fn last_error(&self) -> Option<RefreshError> {
        self.inner
            .state
            .lock()
            .expect("state lock")
            .last_error
            .clone()
    }

    /// One grant (the grant lock is held). With `from_disk: Some(min_ttl)`, a token another
    /// process cached is taken instead of asking the IdP when it is not due for refresh and stays
    /// valid at least `min_ttl`; a cached token too short for the caller never stands in for the
    /// grant it asked for.
    async fn attempt(&self, from_disk: Option<Duration>) -> Result<Arc<Token>, RefreshError> {
        let _file_lock = match &self.inner.cache {
            Some(c) => match c.lock().await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(path = %c.path().display(), error = %e, "cannot lock the token cache; continuing without it");
                    None
                }
            },
            None => None,
        };
        if let Some(min_ttl) = from_disk
            && let Some(t) = self.disk_token(min_ttl).await
        {
            let now = self.inner.clock.now();
            if now < t.refresh_at {
                tracing::debug!("using the token another process just cached");
                self.install(t.clone(), false);
                return Ok(t);
            }
        }
        let result = self.grant_and_check().await;
        self.inner.attempts.fetch_add(1, Ordering::AcqRel);
        if let Some(m) = self.inner.metrics.get() {
            match &result {
                Ok(_) => m.grant(true, ""),
                Err(e) => m.grant(false, &e.code()),
            }
        }
        match result {
            Ok(t) => {
                if let Some(c) = &self.inner.cache
                    && let Err(e) = c.store_async(t.secret(), t.obtained_at).await
                {
                    tracing::warn!(path = %c.path().display(), error = %e, "cannot write the token cache; the token is still served from memory");
                }
                self.install(t.clone(), true);
                Ok(t)
            }
            Err(e) => {
                self.record_failure(&e);
                Err(e)
            }
        }
    }

    async fn grant_and_check(&self) -> Result<Arc<Token>, RefreshError> {
        let obtained_at = self.inner.clock.now();
        let issued = self.inner.grant.request().await?;
        let endpoints = self.inner.grant.endpoints().await?;
        let (claims, warnings) = self
            .inner
            .verifier
            .check(&issued.access_token, endpoints)
            .await?;
        let token = Token::new(
            issued.access_token,
            claims,
            obtained_at,
            self.inner.verifier.settings().refresh_margin,
            warnings,
        )?;
        Ok(Arc::new(token))
    }

    /// The cached token from disk if it passes every check; a failing one is discarded.
    async fn disk_token(&self, min_ttl: Duration) -> Option<Arc<Token>> {
        let cache = self.inner.cache.as_ref()?;
        let cached = cache.load()?;
        if let Some(cur) = self.current()
            && cur.secret().expose_secret() == cached.access_token.expose_secret()
        {
            return None;
        }
        let endpoints = match self.inner.grant.endpoints().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the cached token");
                return None;
            }
        };
        match self
            .inner
            .verifier
            .check(&cached.access_token, endpoints)
            .await
        {
            Ok((claims, warnings)) => {
                let t = Token::new(
                    cached.access_token,
                    claims,
                    cached.obtained_at,
                    self.inner.verifier.settings().refresh_margin,
                    warnings,
                )
                .ok()?;
                (t.remaining(self.inner.clock.now()) >= min_ttl).then(|| Arc::new(t))
            }
            Err(e @ (CheckError::Jwks(_) | CheckError::NoJwksUrl)) => {
                tracing::warn!(error = %e.problem(), "cannot check the cached token against the JWKS now; not using it");
                None
            }
            Err(e) => {
                tracing::warn!(path = %cache.path().display(), reason = %e.problem(), "discarding the cached token: it fails the checks");
                cache.discard();
                None
            }
        }
    }

    fn install(&self, token: Arc<Token>, fresh_grant: bool) {
        let now = self.inner.clock.now();
        let view = token.claims.view();
        tracing::info!(
            source = if fresh_grant { "grant" } else { "cache" },
            expires_at = %rfc3339(token.expires_at),
            expires_in = %humantime::format_duration(Duration::from_secs(token.remaining(now).as_secs())),
            uid = view.uid.as_deref().unwrap_or("-"),
            tid = view.tid.as_deref().unwrap_or("-"),
            pid = view.pid.as_deref().unwrap_or("-"),
            tier = view.tier.as_deref().unwrap_or("-"),
            "token ready"
        );
        for w in &token.warnings {
            tracing::warn!("{w}");
        }
        *self.inner.current.write().expect("token lock") = Some(token);
        {
            let mut st = self.inner.state.lock().expect("state lock");
            st.last_refresh = Some(now);
            st.last_error = None;
            st.failures = 0;
            st.retry_at = None;
            st.retry_at_wall = None;
            st.reported_config_error = None;
            if fresh_grant {
                st.grants_ok += 1;
            }
        }
        self.changed();
    }

    fn record_failure(&self, error: &RefreshError) {
        let s = self.inner.verifier.settings();
        let mut st = self.inner.state.lock().expect("state lock");
        st.failures = st.failures.saturating_add(1);
        st.grants_failed += 1;
        let delay = backoff(s.min_backoff, s.max_backoff, st.failures, error);
        st.retry_at = Some(Instant::now() + delay);
        st.retry_at_wall = Some(self.inner.clock.now() + delay);
        let message = error.to_string();
        let still_valid = self.valid(Duration::ZERO).is_some();
        if error.is_config_error() && st.reported_config_error.as_deref() != Some(message.as_str())
        {
            tracing::error!(
                code = %error.code(),
                retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
                serving_cached = still_valid,
                "configuration error: {message}"
            );
            st.reported_config_error = Some(message);
        } else {
            tracing::warn!(
                code = %error.code(),
                retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
                serving_cached = still_valid,
                "token grant failed: {message}"
            );
        }
        st.last_error = Some(error.clone());
        drop(st);
        self.changed();
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|v| *v += 1);
        self.inner.wake.notify_one();
    }

    /// The engine's state for `status`.
    pub fn status(&self) -> Status {
        let now = self.inner.clock.now();
        let token = self.current();
        let st = self.inner.state.lock().expect("state lock");
        let a = self.inner.grant.settings();
        let next_refresh = match (&token, st.retry_at_wall) {
            (_, Some(at)) => Some(at),
            (Some(t), None) => Some(t.refresh_at),
            (None, None) => None,
        };
        Status {
            state: match &token {
                None => "none",
                Some(t) if t.expires_at > now => "valid",
                Some(_) => "expired",
            },
            ready: token.as_ref().is_some_and(|t| t.expires_at > now),
            expires_at: token.as_ref().map(|t| rfc3339(t.expires_at)),
            expires_in: token
                .as_ref()
                .map(|t| match t.expires_at.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                }),
            claims: token.as_ref().map(|t| t.claims.view()),
            warnings: token
                .as_ref()
                .map(|t| t.warnings.clone())
                .unwrap_or_default(),
            last_refresh: st.last_refresh.map(rfc3339),
            next_refresh: next_refresh.map(rfc3339),
            last_error: st.last_error.as_ref().map(|e| e.to_string()),
            last_error_code: st.last_error.as_ref().map(|e| e.code()),
            consecutive_failures: st.failures,
            grants_ok: st.grants_ok,
            grants_failed: st.grants_failed,
            client_id: a.client_id.clone(),
            issuer: a.endpoints.issuer_hint(),
            audience: a.audience.clone().or_else(|| a.resource.clone()),
        }
    }
}

/// The wait after the `failures`-th consecutive failure: exponential from `min`, capped at `max`,
/// jittered into its upper half; configuration errors wait `max`; `Retry-After` is a floor.
pub fn backoff(min: Duration, max: Duration, failures: u32, error: &RefreshError) -> Duration {
    let exp = if error.is_config_error() {
        max
    } else {
        let factor = 1u32 << failures.saturating_sub(1).min(20);
        min.saturating_mul(factor).min(max)
    };
    let jittered = exp.mul_f64(0.5 + fastrand::f64() * 0.5).max(min);
    match error.retry_after() {
        Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}
