//! [`TokenSource`]: the one handle to the machine's token. It holds the current checked token (a
//! read-mostly load on the hot path), runs at most one grant at a time whatever the number of waiters
//! (single-flight), refreshes before expiry against the wall clock, backs off with jitter on failure
//! (honouring `Retry-After`), keeps serving the cached token until it really expires while the IdP is
//! down, and shares a disk cache with other processes under a file lock. A cached token is checked
//! against the key stored with it, so loading it needs no network. Grants are rationed: at most one
//! forced grant per [`MIN_GRANT_INTERVAL`] (callers within it share its outcome), and never a
//! refresh sooner than that after the last grant. With `[fleet]`, every grant is preceded by a look
//! at the token the fleet shares through Redis ([`crate::fleet`]), and every grant is shared.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use jsonwebtoken::jwk::Jwk;

use super::cache::{CacheLock, Cached, DiskCache, Identity};
use super::claims::{Checked, ClaimsView};
use super::{CheckError, Keys, MIN_GRANT_INTERVAL, Token, Verifier, rfc3339};
use crate::auth::{Grant, GrantError};
use crate::clock::SharedClock;
use crate::config::Settings;
use crate::fleet::{Acquired, Entry, Fleet, FleetStatus};
use crate::telemetry::Metrics;

/// The refresher re-reads the wall clock at least this often, so a machine that slept through a
/// deadline refreshes on wake.
const WALL_CLOCK_RECHECK: Duration = Duration::from_secs(30);
/// A 401 from the upstream forces a new grant at most this often (no grant storm when the upstream
/// rejects every token).
const REJECTION_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Tokens that live shorter than this are warned about: the agent has to grant often to keep one.
pub const SHORT_LIFETIME: Duration = Duration::from_secs(300);

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
    /// The token expired before the next grant is allowed ([`MIN_GRANT_INTERVAL`]).
    #[error("no valid token is available: the IdP issues tokens valid for only {}, and the agent asks for a new one at most every {}; raise the API's token lifetime in the IdP (Auth0: Applications > APIs > the API > Settings)", humantime::format_duration(whole_seconds(*.lifetime)), humantime::format_duration(MIN_GRANT_INTERVAL))]
    ShortLived { lifetime: Duration },
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
    /// An earlier grant (kept beside the disk cache) was told to wait (`Retry-After`), and the
    /// wait is not over: not asked again.
    #[error("{message} (the IdP told an earlier grant to wait until {}; not asking it again before then)", rfc3339(*.until))]
    Waiting {
        code: String,
        message: String,
        until: SystemTime,
    },
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
            // The JWKS down is an outage like the token endpoint's, not a setting to fix.
            RefreshError::Check(e) => !matches!(e, CheckError::JwksDown(_)),
            RefreshError::Waiting { .. } => false,
        }
    }

    /// The IdP asked us to wait this long.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RefreshError::Grant(e) => e.retry_after(),
            RefreshError::Check(_) | RefreshError::Waiting { .. } => None,
        }
    }

    /// A short machine-readable code for metrics and JSON.
    pub fn code(&self) -> String {
        match self {
            RefreshError::Grant(e) => e.code(),
            RefreshError::Check(e) => e.code().into(),
            RefreshError::Waiting { code, .. } => code.clone(),
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
    /// Why the disk cache cannot be written (null when it can, or when there is none): every
    /// restart and one-shot call then makes a grant.
    pub cache_error: Option<String>,
    /// The token shared through Redis: `off` without `[fleet]`.
    pub fleet: FleetStatus,
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
    /// The last forced grant (one asked for while a token not yet due for refresh was held, here
    /// or by another process): when, by the wall clock, and what it gave. Forced grants within
    /// [`MIN_GRANT_INTERVAL`] of it share this outcome instead of asking again.
    last_forced: Option<(SystemTime, Result<Arc<Token>, RefreshError>)>,
    /// Why the disk cache cannot be written, until a write succeeds.
    cache_error: Option<String>,
    /// The entry a failed write did not store: written when the cache can take it (a probe that
    /// succeeds would clear `cache_error`, and every restart still cost a grant).
    unstored: Option<Cached>,
    /// The warnings of the token held, as logged.
    warned: Vec<String>,
}

/// What a grant attempt is for.
#[derive(Debug, Clone, Copy)]
enum Ask {
    /// A token valid at least this long and not due for refresh; one another process cached
    /// will do.
    Valid(Duration),
    /// A new token whatever is held (`refresh`): a forced grant when a good token is held.
    New,
    /// A new token because the upstream refused the one held (limited on its own).
    Replace,
}

struct Inner {
    grant: Arc<Grant>,
    verifier: Verifier,
    clock: SharedClock,
    cache: Option<DiskCache>,
    /// The longest wait for another process's cache lock (`auth.timeout`: as long as one request
    /// to the IdP may take); then this process asks the IdP without it.
    lock_wait: Duration,
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
    /// The metrics, and the profile this engine's are labelled with.
    metrics: OnceLock<(Arc<Metrics>, String)>,
    /// The token shared with the rest of the fleet, with `[fleet]`.
    fleet: Option<Fleet>,
    /// Set by [`TokenSource::run`]: the refresher logs failed grants.
    running: AtomicBool,
}

/// Where an installed token came from, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Grant,
    Cache,
    Fleet,
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
        let http = crate::auth::http::client(
            settings.auth.timeout,
            settings.proxy.ca_file.as_deref(),
            &settings.proxy.egress,
        )?;
        let a = &settings.auth;
        let key = Identity::of(a);
        let cache = settings
            .token
            .cache_file
            .clone()
            .map(|path| DiskCache::new(path, key.clone()));
        let audience = a.audience.clone().or_else(|| a.resource.clone());
        let verifier = Verifier::new(
            settings.token.clone(),
            audience,
            http.clone(),
            clock.clone(),
        );
        let grant = Grant::new(
            a.clone(),
            http,
            settings.proxy.egress.clone(),
            clock.clone(),
        );
        // Keyed like the disk cache: each token (each profile) has its own entry and lock.
        let fleet = settings
            .fleet
            .as_ref()
            .map(|f| Fleet::new(f, &key, grant.clone()));
        Ok(Self::from_parts(grant, verifier, cache, fleet, clock))
    }

    pub fn from_parts(
        grant: Arc<Grant>,
        verifier: Verifier,
        cache: Option<DiskCache>,
        fleet: Option<Fleet>,
        clock: SharedClock,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                lock_wait: grant.settings().timeout,
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
                fleet,
                running: AtomicBool::new(false),
            }),
        }
    }

    /// Counts grant outcomes in `metrics` from now on, as the profile `default` (once; later
    /// calls are ignored).
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        self.attach_metrics_as(metrics, crate::config::DEFAULT_PROFILE);
    }

    /// Counts grant outcomes in `metrics` from now on, labelled `profile` (once).
    pub fn attach_metrics_as(&self, metrics: Arc<Metrics>, profile: &str) {
        if let Some(f) = &self.inner.fleet {
            f.attach_metrics(metrics.clone());
        }
        let _ = self.inner.metrics.set((metrics, profile.to_string()));
    }

    /// The fleet this source shares its token with, with `[fleet]`.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.inner.fleet.as_ref()
    }

    /// Asks Redis once whether it answers, so `status` without a daemon shows the fleet's state.
    pub async fn check_fleet(&self) {
        if let Some(f) = &self.inner.fleet {
            let _ = f.check().await;
        }
    }

    /// The same engine (a clone of this handle)?
    pub fn same(&self, other: &TokenSource) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Sets the token gauges (expiry, time left, ready) just before a scrape, labelled with the
    /// profile given to [`TokenSource::attach_metrics_as`].
    pub fn update_gauges(&self, metrics: &Metrics) {
        let now = self.inner.clock.now();
        let label = crate::telemetry::metrics::ProfileLabels {
            profile: self
                .inner
                .metrics
                .get()
                .map_or(crate::config::DEFAULT_PROFILE, |(_, p)| p.as_str())
                .to_string(),
        };
        match self.current() {
            Some(t) => {
                let exp = t.claims.exp as i64;
                metrics
                    .token_expiry_timestamp
                    .get_or_create(&label)
                    .set(exp);
                let left = match t.expires_at.duration_since(now) {
                    Ok(d) => d.as_secs_f64(),
                    Err(e) => -e.duration().as_secs_f64(),
                };
                metrics
                    .token_seconds_remaining
                    .get_or_create(&label)
                    .set(left);
                metrics
                    .token_ready
                    .get_or_create(&label)
                    .set(i64::from(t.expires_at > now));
            }
            None => {
                metrics.token_ready.get_or_create(&label).set(0);
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

    /// Whether the last grant failed in a way only a configuration change fixes (a refused
    /// client, a token that fails the checks): retrying soon will not help.
    pub fn needs_a_fix(&self) -> bool {
        let st = self.inner.state.lock().expect("state lock");
        st.last_error
            .as_ref()
            .is_some_and(RefreshError::is_config_error)
    }

    /// Notified on every change of state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// A token valid for at least `min_ttl`: the current one, or one new grant shared with every
    /// concurrent caller. While backing off after a failure, answers at once with the last error.
    /// A valid token is served whatever the grant did: an IdP outage does not stop it.
    pub async fn get(&self, min_ttl: Duration) -> Result<Arc<Token>, TokenError> {
        if let Some(t) = self.valid(min_ttl) {
            return Ok(t);
        }
        if let Some(e) = self.short_lived() {
            return Err(e);
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
        let _ = self.attempt(Ask::Valid(min_ttl)).await;
        self.valid(min_ttl).ok_or_else(|| self.shortfall(min_ttl))
    }

    /// Forces a new grant now (the `refresh` command), whatever the backoff but a wait the IdP
    /// asked for (then its error); within [`MIN_GRANT_INTERVAL`] of the last forced grant, that
    /// grant's outcome instead.
    pub async fn refresh_now(&self) -> Result<Arc<Token>, RefreshError> {
        let _guard = self.inner.grant_lock.lock().await;
        // Not while the wait the IdP asked for runs.
        {
            let st = self.inner.state.lock().expect("state lock");
            if let Some(e) = &st.last_error
                && e.retry_after().is_some()
                && st.retry_at.is_some_and(|at| Instant::now() < at)
            {
                return Err(e.clone());
            }
        }
        self.attempt(Ask::New).await
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
        self.attempt(Ask::Replace).await.ok()
    }

    /// Loads the disk cache at start-up: a valid cached token is served without a grant, and
    /// without the network (it is checked against the key stored with it).
    pub async fn load_cache(&self) -> Option<Arc<Token>> {
        let _guard = self.inner.grant_lock.lock().await;
        self.adopt_cached().await;
        self.valid(Duration::ZERO)
    }

    /// Whether the disk cache can be written (a small file is written and removed beside it); the
    /// answer is kept for `status` until the next write. `None` when it can, or there is no cache.
    pub async fn check_cache(&self) -> Option<String> {
        let cache = self.inner.cache.clone()?;
        let result = tokio::task::spawn_blocking(move || cache.probe_writable())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        self.note_cache_write(result);
        self.cache_error()
    }

    fn cache_error(&self) -> Option<String> {
        self.inner
            .state
            .lock()
            .expect("state lock")
            .cache_error
            .clone()
    }

    /// Refreshes before expiry until `shutdown`, which also abandons a grant in flight (an IdP that
    /// is slow to answer does not hold up the daemon's exit). With `[fleet]`, keeps the connection
    /// to Redis too: made at start, made again with backoff.
    pub async fn run(&self, shutdown: CancellationToken) {
        self.inner.running.store(true, Ordering::Relaxed);
        match &self.inner.fleet {
            Some(f) => {
                tokio::join!(self.refresh_until(shutdown.clone()), f.run(shutdown));
            }
            None => self.refresh_until(shutdown).await,
        }
    }

    async fn refresh_until(&self, shutdown: CancellationToken) {
        loop {
            if self.due() {
                let attempt = async {
                    let _guard = self.inner.grant_lock.lock().await;
                    if self.due() {
                        let _ = self.attempt(Ask::Valid(Duration::ZERO)).await;
                    }
                };
                if shutdown.run_until_cancelled(attempt).await.is_none() {
                    tracing::info!("stopping: the grant in flight is abandoned");
                    return;
                }
                continue;
            }
            let wait = self.until_due().min(WALL_CLOCK_RECHECK);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.wake.notified() => {}
            }
            if self.cache_error().is_some() {
                // A cache that could not be written is tried again with what it missed, so the
                // token reaches it and `status` clears once fixed.
                let unstored = self
                    .inner
                    .state
                    .lock()
                    .expect("state lock")
                    .unstored
                    .clone();
                // Only the token held: never an older one over what a grant stored meanwhile.
                let held = |e: &Cached| {
                    self.current().is_some_and(|t| {
                        t.secret().expose_secret() == e.access_token.expose_secret()
                    })
                };
                match (unstored, &self.inner.cache) {
                    (Some(entry), Some(cache)) if held(&entry) => {
                        let result = cache.store_async(&entry).await;
                        if result.is_ok() {
                            self.inner.state.lock().expect("state lock").unstored = None;
                        }
                        self.note_cache_write(result);
                    }
                    _ => {
                        self.check_cache().await;
                    }
                }
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

    /// The token held expired before [`MIN_GRANT_INTERVAL`] allows the next grant: the IdP issues
    /// tokens that live shorter than that.
    fn short_lived(&self) -> Option<TokenError> {
        let now = self.inner.clock.now();
        let t = self.current()?;
        (t.expires_at <= now && now < t.refresh_at).then(|| TokenError::ShortLived {
            lifetime: t.lifetime(),
        })
    }

    /// The token held if it stays valid at least `min_ttl` and is not due for refresh.
    fn good_for(&self, min_ttl: Duration) -> Option<Arc<Token>> {
        let now = self.inner.clock.now();
        self.valid(min_ttl).filter(|t| now < t.refresh_at)
    }

    /// The outcome of a forced grant made less than [`MIN_GRANT_INTERVAL`] ago.
    fn recent_forced(&self, now: SystemTime) -> Option<Result<Arc<Token>, RefreshError>> {
        let st = self.inner.state.lock().expect("state lock");
        let (at, outcome) = st.last_forced.as_ref()?;
        let recent = now
            .duration_since(*at)
            .is_ok_and(|d| d < MIN_GRANT_INTERVAL);
        recent.then(|| outcome.clone())
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

    /// One grant (the grant lock is held), unless it is not needed: for [`Ask::Valid`], a token
    /// another process cached that is good for `min_ttl` and not due for refresh is taken instead
    /// (a cached token too short for the caller never stands in for the grant it asked for); a
    /// forced grant within [`MIN_GRANT_INTERVAL`] of the last one shares that one's outcome.
    async fn attempt(&self, ask: Ask) -> Result<Arc<Token>, RefreshError> {
        if let Ask::Valid(min_ttl) = ask {
            // The cache is replaced by rename, so reading it needs no lock: a good cached token is
            // taken without waiting on another process.
            self.adopt_cached().await;
            if let Some(t) = self.good_for(min_ttl) {
                return Ok(t);
            }
        }
        let _file_lock = self.lock_cache().await;
        if !matches!(ask, Ask::Replace) {
            // Again under the lock: another process may just have made the grant.
            self.adopt_cached().await;
        }
        if let Ask::Valid(min_ttl) = ask
            && let Some(t) = self.good_for(min_ttl)
        {
            return Ok(t);
        }
        let now = self.inner.clock.now();
        // Forced: a grant although a good token is held, or one made for a `min_ttl` (its outcome,
        // long enough or not, is shared with whoever asks again soon).
        let forced = match ask {
            Ask::Replace => false,
            Ask::Valid(min_ttl) if !min_ttl.is_zero() => true,
            _ => self.good_for(Duration::ZERO).is_some(),
        };
        if forced && let Some(outcome) = self.recent_forced(now) {
            tracing::info!(
                "a forced grant was made less than {} ago; sharing its outcome instead of asking again",
                humantime::format_duration(MIN_GRANT_INTERVAL)
            );
            return outcome.map(|t| self.valid(Duration::ZERO).unwrap_or(t));
        }
        // The wait the IdP told an earlier grant (this process's, another command's, or the
        // engine's before a reload) is honoured: the held token while it is valid, else that
        // refusal again, and no retry before it is over.
        if let Some(waiting) = self.waiting(now).await {
            let result = match ask {
                Ask::Valid(min_ttl) => self.valid(min_ttl).ok_or(waiting),
                _ => Err(waiting),
            };
            if let Err(e @ RefreshError::Waiting { until, .. }) = &result {
                let left = until.duration_since(now).unwrap_or_default();
                let mut st = self.inner.state.lock().expect("state lock");
                st.last_error = Some(e.clone());
                st.retry_at = Some(Instant::now() + left);
                st.retry_at_wall = Some(*until);
            }
            return result;
        }
        // Before any grant but a `refresh`: the token the fleet shares, or its grant lock.
        let mut lease = None;
        if let Some(fleet) = &self.inner.fleet
            && !matches!(ask, Ask::New)
        {
            match fleet.acquire(|e| self.shared_token(e, ask)).await {
                Acquired::Shared((t, key)) => {
                    self.store(&t, key, false).await;
                    self.install(t.clone(), Origin::Fleet);
                    return Ok(t);
                }
                Acquired::Leader(l) => lease = Some(l),
                Acquired::Alone => {}
            }
        }
        let result = self.grant_and_check().await;
        self.inner.attempts.fetch_add(1, Ordering::AcqRel);
        if let Some((m, profile)) = self.inner.metrics.get() {
            match &result {
                Ok(_) => m.grant(profile, true, ""),
                Err(e) => m.grant(profile, false, &e.code()),
            }
        }
        let result = match result {
            Ok((t, key)) => {
                if let Some(fleet) = &self.inner.fleet {
                    let ttl = t.remaining(self.inner.clock.now());
                    fleet
                        .publish(t.secret(), t.obtained_at, key.as_ref(), ttl)
                        .await;
                }
                self.store(&t, key, forced).await;
                self.install(t.clone(), Origin::Grant);
                if let Some(cache) = &self.inner.cache {
                    cache.clear_wait();
                }
                Ok(t)
            }
            Err(e) => {
                self.record_failure(&e);
                self.keep_wait(&e, now).await;
                Err(e)
            }
        };
        if let Some(l) = lease {
            l.release().await;
        }
        if forced {
            self.inner.state.lock().expect("state lock").last_forced = Some((now, result.clone()));
        }
        result
    }

    /// The fleet's shared token, checked like any other (against the key shared with it, else the
    /// JWKS), if it serves what `ask` needs: valid for the caller's `min_ttl`, not due for refresh,
    /// and outliving the token held (never the very token being replaced).
    async fn shared_token(&self, e: Entry, ask: Ask) -> Option<(Arc<Token>, Option<Jwk>)> {
        let cached = Cached {
            access_token: e.access_token,
            obtained_at: e.obtained_at,
            verified_with: e.verified_with,
            forced: false,
            credential: None,
        };
        let checked = match self.check_cached(&cached).await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(reason = %err.problem(), "fleet: the shared token fails the checks; not using it");
                return None;
            }
        };
        let now = self.inner.clock.now();
        let t = Token::new(
            cached.access_token,
            checked.claims,
            cached.obtained_at.min(now),
            self.inner.verifier.settings().refresh_margin,
            checked.warnings,
        )
        .ok()?;
        let min_ttl = match ask {
            Ask::Valid(min_ttl) => min_ttl,
            Ask::New | Ask::Replace => Duration::ZERO,
        };
        let usable = t.expires_at > now
            && t.remaining(now) >= min_ttl
            && now < t.refresh_at
            && self
                .current()
                .is_none_or(|cur| cur.expires_at < t.expires_at);
        usable.then(|| (Arc::new(t), cached.verified_with))
    }

    /// Takes the cross-process grant lock, waiting at most `lock_wait`; without it (a stopped
    /// process holds it, or it cannot be opened) the grant goes ahead, at worst one grant too many.
    async fn lock_cache(&self) -> Option<CacheLock> {
        let cache = self.inner.cache.as_ref()?;
        match cache.lock(self.inner.lock_wait).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the token cache lock; asking the IdP without it");
                None
            }
        }
    }

    async fn grant_and_check(&self) -> Result<(Arc<Token>, Option<Jwk>), RefreshError> {
        let obtained_at = self.inner.clock.now();
        let issued = self.inner.grant.request().await?;
        let endpoints = self.inner.grant.endpoints().await?;
        let Checked {
            claims,
            mut warnings,
            key,
        } = self
            .inner
            .verifier
            .check_with(&issued.access_token, Keys::Jwks(endpoints))
            .await?;
        let lifetime = crate::clock::from_unix(claims.exp)
            .and_then(|exp| exp.duration_since(obtained_at).ok())
            .unwrap_or_default();
        if lifetime < SHORT_LIFETIME {
            warnings.push(format!(
                "the IdP issues tokens valid for only {}: the agent must ask for a new one every few minutes or sooner (never more often than every {}), which spends the tenant's machine-to-machine token quota; raise the API's token lifetime (Auth0: Applications > APIs > the API > Settings > Token Expiration)",
                humantime::format_duration(whole_seconds(lifetime)),
                humantime::format_duration(MIN_GRANT_INTERVAL)
            ));
        }
        let token = Token::new(
            issued.access_token,
            claims,
            obtained_at,
            self.inner.verifier.settings().refresh_margin,
            warnings,
        )?;
        Ok((Arc::new(token), key))
    }

    /// Writes a new token to the disk cache, with the key that verified it; remembers a failure
    /// for `status` (and logs it once per change).
    async fn store(&self, t: &Token, key: Option<Jwk>, forced: bool) {
        let Some(cache) = &self.inner.cache else {
            return;
        };
        let entry = Cached {
            access_token: t.secret().clone(),
            obtained_at: t.obtained_at,
            verified_with: key,
            forced,
            credential: self.credential_mark().await,
        };
        let result = cache.store_async(&entry).await;
        self.inner.state.lock().expect("state lock").unstored = result.is_err().then_some(entry);
        self.note_cache_write(result);
    }

    fn note_cache_write(&self, result: std::io::Result<()>) {
        let Some(cache) = &self.inner.cache else {
            return;
        };
        let mut st = self.inner.state.lock().expect("state lock");
        match result {
            Ok(()) => {
                if st.cache_error.take().is_some() {
                    tracing::info!(path = %cache.path().display(), "the token cache can be written again");
                }
            }
            Err(e) => {
                let message = format!(
                    "cannot write the token cache {}: {e}",
                    cache.path().display()
                );
                if st.cache_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(
                        "{message}; the token is served from memory, but restarts and one-shot calls will each make a grant"
                    );
                }
                st.cache_error = Some(message);
            }
        }
    }

    /// [`cache::credential_mark`] of the credential configured now; none when it cannot be read.
    /// The wait the IdP told a grant of this identity and credential (kept beside the disk
    /// cache), when it is not over.
    pub async fn waiting(&self, now: SystemTime) -> Option<RefreshError> {
        let cache = self.inner.cache.clone()?;
        let credential = self.credential_mark().await;
        let (until, wait) =
            tokio::task::spawn_blocking(move || cache.wait(credential.as_deref(), now))
                .await
                .ok()??;
        Some(RefreshError::Waiting {
            code: wait.code,
            message: wait.message,
            until,
        })
    }

    /// Keeps a wait the IdP asked for with `error`, for the next one-shot commands.
    async fn keep_wait(&self, error: &RefreshError, now: SystemTime) {
        let (Some(cache), Some(wait)) = (self.inner.cache.clone(), error.retry_after()) else {
            return;
        };
        let credential = self.credential_mark().await;
        let (code, message) = (error.code(), error.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            cache.store_wait(now, now + wait, credential, &code, &message)
        })
        .await;
    }

    async fn credential_mark(&self) -> Option<String> {
        let credential = self.inner.grant.credential().await.ok()?;
        Some(super::cache::credential_mark(credential.expose_secret()))
    }

    /// Takes the token another process cached when it is valid and outlives the one held; a
    /// forced one counts as this process's last forced grant.
    async fn adopt_cached(&self) {
        let Some((t, forced, obtained_at)) = self.disk_token().await else {
            return;
        };
        // Another process's forced grant is its outcome to share, even when the token held
        // expires as late (`exp` counts whole seconds) or is the very same (a grant in the same
        // second can give the same bytes).
        if forced {
            self.inner.state.lock().expect("state lock").last_forced =
                Some((obtained_at, Ok(t.clone())));
        }
        // The token held, expired or not, is never installed again: that would reset the
        // failure count and the backoff while the IdP is down.
        if self.current().is_some_and(|cur| Arc::ptr_eq(&cur, &t))
            || self
                .valid(Duration::ZERO)
                .is_some_and(|cur| cur.expires_at > t.expires_at)
        {
            return;
        }
        self.install(t, Origin::Cache);
    }

    /// The cached token from disk (the token held, when it is the same), whether it came from a
    /// forced grant and when it was written, if it passes every check; a failing one is
    /// discarded.
    async fn disk_token(&self) -> Option<(Arc<Token>, bool, SystemTime)> {
        let cache = self.inner.cache.as_ref()?;
        let cached = cache.load()?;
        if cached.credential.is_some() && cached.credential != self.credential_mark().await {
            tracing::info!(path = %cache.path().display(), "the cached token was granted with another client secret (or key) than the one configured now: not using it");
            return None;
        }
        // An `obtained_at` in the future (a clock that was ahead, a hand-edited file) would put
        // the refresh after the expiry.
        let obtained_at = cached.obtained_at.min(self.inner.clock.now());
        if let Some(cur) = self.current()
            && cur.secret().expose_secret() == cached.access_token.expose_secret()
        {
            return Some((cur, cached.forced, obtained_at));
        }
        match self.check_cached(&cached).await {
            Ok(Checked {
                claims, warnings, ..
            }) => {
                let t = Token::new(
                    cached.access_token,
                    claims,
                    obtained_at,
                    self.inner.verifier.settings().refresh_margin,
                    warnings,
                )
                .ok()?;
                Some((Arc::new(t), cached.forced, obtained_at))
            }
            Err(e @ (CheckError::Jwks(_) | CheckError::JwksDown(_) | CheckError::NoJwksUrl)) => {
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

    /// Checks a cached token: against the key stored with it, without the network; a token cached
    /// by an older agent (no key stored) against the issuer's JWKS.
    async fn check_cached(&self, cached: &Cached) -> Result<Checked, CheckError> {
        let verifier = &self.inner.verifier;
        if cached.verified_with.is_some() || !verifier.settings().verify_signature {
            let issuer =
                crate::auth::endpoints::configured_issuer(&self.inner.grant.settings().endpoints);
            let keys = Keys::Stored {
                issuer: issuer.as_deref(),
                key: cached.verified_with.as_ref(),
            };
            return verifier.check_with(&cached.access_token, keys).await;
        }
        let endpoints = self
            .inner
            .grant
            .endpoints()
            .await
            .map_err(|e| CheckError::Jwks(e.to_string()))?;
        verifier
            .check_with(&cached.access_token, Keys::Jwks(endpoints))
            .await
    }

    fn install(&self, token: Arc<Token>, origin: Origin) {
        let fresh_grant = origin == Origin::Grant;
        let now = self.inner.clock.now();
        let view = token.claims.view();
        tracing::info!(
            source = match origin {
                Origin::Grant => "grant",
                Origin::Cache => "cache",
                Origin::Fleet => "fleet",
            },
            expires_at = %rfc3339(token.expires_at),
            expires_in = %humantime::format_duration(Duration::from_secs(token.remaining(now).as_secs())),
            uid = view.uid.as_deref().unwrap_or("-"),
            tid = view.tid.as_deref().unwrap_or("-"),
            pid = view.pid.as_deref().unwrap_or("-"),
            tier = view.tier.as_deref().unwrap_or("-"),
            profile = self.inner.metrics.get().map_or("default", |(_, p)| p.as_str()),
            "token ready"
        );
        let obtained_at = token.obtained_at;
        let warnings = token.warnings.clone();
        *self.inner.current.write().expect("token lock") = Some(token);
        {
            let mut st = self.inner.state.lock().expect("state lock");
            // Each token's warnings, said once while they stay the same (a short lifetime would
            // be said at every grant).
            for w in warnings.iter().filter(|w| !st.warned.contains(w)) {
                tracing::warn!("{w}");
            }
            st.warned = warnings;
            // When the token held was issued: a token from the cache or the fleet was not
            // refreshed now.
            st.last_refresh = Some(obtained_at);
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
        // A token still held is refreshed at its own time however soon the backoff ends (a
        // forced `refresh` that failed is not tried again before the token is due).
        let refresh_at = self.current().map(|t| t.refresh_at);
        let mut st = self.inner.state.lock().expect("state lock");
        st.failures = st.failures.saturating_add(1);
        st.grants_failed += 1;
        let mut delay = backoff(s.min_backoff, s.max_backoff, st.failures, error);
        st.retry_at = Some(Instant::now() + delay);
        let now = self.inner.clock.now();
        if let Some(due) = refresh_at.and_then(|at| at.duration_since(now).ok()) {
            delay = delay.max(due);
        }
        st.retry_at_wall = Some(now + delay);
        let message = error.to_string();
        let still_valid = self.valid(Duration::ZERO).is_some();
        if !self.inner.running.load(Ordering::Relaxed) {
            // A command's one-shot source: its caller prints the error, once, and there is no
            // retry to announce.
        } else if error.is_config_error()
            && st.reported_config_error.as_deref() != Some(message.as_str())
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
            cache_error: st.cache_error.clone(),
            fleet: self
                .inner
                .fleet
                .as_ref()
                .map(Fleet::status)
                .unwrap_or_else(FleetStatus::off),
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
        Some(ra) => jittered.max(ra),
        None => jittered,
    }
}
