//! The fleet: every agent using the same client shares one token through Redis (or Valkey), so a
//! fleet of ephemeral runners makes one grant per token lifetime, not one per job (SPEC §10).
//!
//! One [`Fleet`] per token source, keyed by its disk cache key: `{prefix}token:{hash}` holds the
//! token sealed ([`seal`]) with a TTL of its remaining lifetime, `{prefix}lock:{hash}` is taken
//! (`SET NX PX lock_timeout`, a random value) by the one agent that grants, and released only by
//! it (a compare-and-delete script). The token engine asks [`Fleet::acquire`] before any grant:
//! a shared token its checks accept, or the lock, or — Redis down, slow, or holding garbage — go
//! on alone. Redis is never needed to serve.
//!
//! What Redis sees: the key names (a hash of the cache key), the sealed blob, the lock's random
//! value. Never the token, the client credential, the derived key, or the cache key itself; nor
//! do the logs, the errors or `status`.

mod link;
pub mod seal;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::Jwk;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use link::{FleetError, Health};
pub use seal::{Entry, OpenError, SealKey};

use crate::auth::Grant;
use crate::config::FleetSettings;
use crate::telemetry::Metrics;
use crate::token::cache::Identity;
use link::Link;

/// A follower's first pause between two looks at the entry; it doubles up to [`POLL_MAX`], each
/// jittered, so a fleet starting together does not poll in step.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(500);
/// How often the daemon checks a connected Redis, so `status` does not say connected for long
/// after it went away.
const CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Releases the lock only if it still holds this holder's value: a holder whose lock expired
/// must not delete the next holder's.
const RELEASE: &str = "if redis.call('GETRANGE', KEYS[1], 0, -1) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// What [`Fleet::acquire`] found.
pub enum Acquired<T> {
    /// A shared token the caller's checks accepted: no grant.
    Shared(T),
    /// This agent holds the fleet's lock: grant, [`Fleet::publish`], then [`Lease::release`].
    Leader(Lease),
    /// Grant alone: Redis failed (it was warned about), or the lock's holder never published.
    Alone,
}

/// The fleet's grant lock, held by this agent until released (or, if dropped, released in the
/// background), or until `lock_timeout` passes.
pub struct Lease {
    fleet: Fleet,
    value: Option<String>,
}

impl Lease {
    /// Releases the lock if this agent still holds it.
    pub async fn release(mut self) {
        if let Some(v) = self.value.take() {
            self.fleet.release_lock(&v).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(v) = self.value.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let fleet = self.fleet.clone();
            rt.spawn(async move { fleet.release_lock(&v).await });
        }
    }
}

/// What the shared entry holds, as [`Fleet::probe`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// No entry: no agent shared a token yet, or it expired or was evicted.
    Absent,
    /// A token sealed under this client's credential (its checks are the grant's business).
    Readable,
    /// Sealed under another credential (a rotated secret), or altered.
    Unreadable,
    /// Not an entry at all.
    Garbage,
}

/// The fleet's state for `status`: never a token, a credential or a key.
#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    /// `off`, `connecting` (not asked anything yet), `connected` or `unreachable`.
    pub state: &'static str,
    /// Why it is unreachable, or what was wrong with the entry last read.
    pub error: Option<String>,
    pub redis: Option<String>,
    /// Looks before a grant, by outcome.
    pub reads: Reads,
    /// Grants this agent made and shared.
    pub grants: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Reads {
    pub hit: u64,
    pub miss: u64,
    pub error: u64,
}

impl FleetStatus {
    pub fn off() -> FleetStatus {
        FleetStatus {
            state: "off",
            error: None,
            redis: None,
            reads: Reads::default(),
            grants: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadResult {
    Hit,
    Miss,
    Error,
}

struct Inner {
    link: Link,
    /// `{prefix}token:{hash}` and `{prefix}lock:{hash}`.
    entry_key: String,
    lock_key: String,
    /// The cache key's canonical JSON: HKDF's context, so each token has its own entry key.
    cache_key: Vec<u8>,
    /// Reads the client credential the entry key is derived from.
    grant: Arc<Grant>,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    grants: AtomicU64,
    /// The last problem with the entry's value (garbage), reported once until a good read.
    entry_problem: std::sync::Mutex<Option<String>>,
    metrics: OnceLock<Arc<Metrics>>,
    /// [`Fleet::run`] is running.
    started: AtomicBool,
}

/// The shared token of one token source. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("redis", &self.inner.link.url())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// The fleet of the token named by `cache_key`, whose credential `grant` reads. Connects on
    /// first use.
    pub fn new(settings: &FleetSettings, cache_key: &Identity, grant: Arc<Grant>) -> Fleet {
        let cache_key = serde_json::to_vec(cache_key).expect("strings serialize");
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &cache_key);
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let prefix = &settings.key_prefix;
        Fleet {
            inner: Arc::new(Inner {
                link: Link::new(settings.clone()),
                entry_key: format!("{prefix}token:{hex}"),
                lock_key: format!("{prefix}lock:{hex}"),
                cache_key,
                grant,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                grants: AtomicU64::new(0),
                entry_problem: std::sync::Mutex::new(None),
                metrics: OnceLock::new(),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// The Redis key holding the sealed token.
    pub fn entry_key(&self) -> &str {
        &self.inner.entry_key
    }

    /// The Redis key of the grant lock.
    pub fn lock_key(&self) -> &str {
        &self.inner.lock_key
    }

    /// Counts reads and grants in `metrics` from now on (once).
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.inner.metrics.set(metrics);
    }

    /// The daemon's companion: connects at start, then checks the connection every
    /// [`CHECK_INTERVAL`] while it works and, from the first failed call on, reconnects with
    /// backoff until it works again, until `shutdown`. Runs once per fleet; a second call returns at once.
    pub async fn run(&self, shutdown: CancellationToken) {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        loop {
            let pause = match self.check().await {
                Ok(()) => CHECK_INTERVAL,
                Err(_) => self
                    .inner
                    .link
                    .until_retry()
                    .max(Duration::from_millis(100)),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.inner.link.failed_call() => {}
            }
        }
    }

    /// Reads the shared entry, at most one byte more than a sealed entry can hold (a larger value
    /// is garbage): whoever can write the key cannot make every agent read megabytes. An absent
    /// entry reads as empty.
    fn read_entry(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("GETRANGE");
        cmd.arg(&self.inner.entry_key).arg(0).arg(seal::MAX_ENTRY);
        cmd
    }

    /// Is Redis there, and may this agent read the entry? (A `PING` passed an ACL that refuses
    /// every command the fleet needs, and the state read `connected`.)
    pub async fn check(&self) -> Result<(), FleetError> {
        match self.inner.link.call::<Vec<u8>>(&self.read_entry()).await {
            // Something else under the key: Redis answers; a read calls the entry garbage.
            Err(FleetError::Refused { code, .. }) if code == "WRONGTYPE" => Ok(()),
            other => other.map(drop),
        }
    }

    /// What `doctor` checks: Redis answers, and lets this agent do what the fleet needs (`SET NX
    /// PX` and the compare-and-delete script, on a probe key beside the entry); then what the
    /// entry holds for this client.
    pub async fn probe(&self) -> Result<Peek, FleetError> {
        self.check().await?;
        let mut bytes = [0u8; 8];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG works");
        let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("{}probe:{value}", self.inner.link.settings().key_prefix);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(&value).arg("NX").arg("PX").arg(10_000);
        self.inner.link.call::<Option<String>>(&set).await?;
        let mut release = redis::cmd("EVAL");
        release.arg(RELEASE).arg(1).arg(&key).arg(&value);
        self.inner.link.call::<i64>(&release).await?;
        let value: Vec<u8> = match self.inner.link.call(&self.read_entry()).await {
            Err(FleetError::Refused { code, .. }) if code == "WRONGTYPE" => {
                return Ok(Peek::Garbage);
            }
            other => other?,
        };
        if value.is_empty() {
            return Ok(Peek::Absent);
        }
        let Some(key) = self.seal_key().await else {
            return Ok(Peek::Unreadable);
        };
        Ok(match key.open(&self.inner.entry_key, &value) {
            Ok(_) => Peek::Readable,
            Err(OpenError::Unreadable) => Peek::Unreadable,
            Err(OpenError::Garbage) => Peek::Garbage,
        })
    }

    pub fn status(&self) -> FleetStatus {
        let i = &self.inner;
        let (state, error) = match i.link.health() {
            Health::Connecting => ("connecting", None),
            Health::Connected => (
                "connected",
                i.entry_problem.lock().expect("entry problem lock").clone(),
            ),
            Health::Unreachable(e) => ("unreachable", Some(e)),
        };
        FleetStatus {
            state,
            error,
            redis: Some(i.link.url().to_string()),
            reads: Reads {
                hit: i.hits.load(Ordering::Relaxed),
                miss: i.misses.load(Ordering::Relaxed),
                error: i.errors.load(Ordering::Relaxed),
            },
            grants: i.grants.load(Ordering::Relaxed),
        }
    }

    /// Before a grant: a shared token `accept` takes (it runs the token checks, and refuses one
    /// past its refresh point or too short for the caller), else the grant lock, else — after
    /// waiting up to `lock_timeout` for the holder to publish, polling with jitter — alone.
    /// Any Redis failure: alone at once. Counted once in `reads`: hit, miss or error.
    pub async fn acquire<T, F, Fut>(&self, mut accept: F) -> Acquired<T>
    where
        F: FnMut(Entry) -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let Some(key) = self.seal_key().await else {
            self.count(ReadResult::Error);
            return Acquired::Alone;
        };
        let deadline = Instant::now() + self.inner.link.settings().lock_timeout;
        let mut pause = POLL_FIRST;
        // The value last refused, so a follower does not check the same entry at every poll.
        let mut refused: Option<Vec<u8>> = None;
        let mut garbage = false;
        loop {
            match self
                .look(&key, &mut accept, &mut refused, &mut garbage)
                .await
            {
                Ok(Some(t)) => {
                    self.count(ReadResult::Hit);
                    return Acquired::Shared(t);
                }
                Ok(None) => {}
                Err(()) => {
                    self.count(ReadResult::Error);
                    return Acquired::Alone;
                }
            }
            match self.try_lock().await {
                Ok(Some(lease)) => {
                    // The previous holder may have published just before releasing.
                    return match self
                        .look(&key, &mut accept, &mut refused, &mut garbage)
                        .await
                    {
                        Ok(Some(t)) => {
                            lease.release().await;
                            self.count(ReadResult::Hit);
                            Acquired::Shared(t)
                        }
                        Ok(None) => {
                            self.count(if garbage {
                                ReadResult::Error
                            } else {
                                ReadResult::Miss
                            });
                            Acquired::Leader(lease)
                        }
                        Err(()) => {
                            self.count(ReadResult::Error);
                            Acquired::Alone
                        }
                    };
                }
                Ok(None) => {}
                Err(_) => {
                    self.count(ReadResult::Error);
                    return Acquired::Alone;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    lock = %self.inner.lock_key,
                    waited = %humantime::format_duration(self.inner.link.settings().lock_timeout),
                    "fleet: another agent holds the grant lock but published no token; granting alone"
                );
                self.count(ReadResult::Miss);
                return Acquired::Alone;
            }
            let jittered = pause.mul_f64(0.5 + fastrand::f64());
            tokio::time::sleep(jittered.min(deadline - now)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Shares a token this agent was granted, with the key that verified it: sealed, with a TTL
    /// of its remaining lifetime. A failure is logged (once per change) and otherwise ignored:
    /// the token is served anyway.
    pub async fn publish(
        &self,
        token: &SecretString,
        obtained_at: SystemTime,
        verified_with: Option<&Jwk>,
        ttl: Duration,
    ) {
        let ttl_ms = ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        if ttl_ms == 0 {
            return;
        }
        let Some(key) = self.seal_key().await else {
            return;
        };
        let sealed = key.seal(&self.inner.entry_key, token, obtained_at, verified_with);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&self.inner.entry_key)
            .arg(sealed)
            .arg("PX")
            .arg(ttl_ms);
        if self.inner.link.call::<()>(&cmd).await.is_ok() {
            self.inner.grants.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = self.inner.metrics.get() {
                m.fleet_grants.inc();
            }
            *self.inner.entry_problem.lock().expect("entry problem lock") = None;
        }
    }

    /// The entry's key for the credential as it is now (a rotated secret is read again). An
    /// unreadable credential is no key: the grant that follows reports it.
    async fn seal_key(&self) -> Option<SealKey> {
        let credential = self.inner.grant.credential().await.ok()?;
        Some(SealKey::derive(
            credential.expose_secret(),
            &self.inner.cache_key,
        ))
    }

    /// Reads the entry: `Ok(Some)` when `accept` takes its token; `Ok(None)` when there is none
    /// to use (absent, sealed under another credential, refused by the checks, garbage);
    /// `Err` when Redis failed.
    async fn look<T, F, Fut>(
        &self,
        key: &SealKey,
        accept: &mut F,
        refused: &mut Option<Vec<u8>>,
        garbage: &mut bool,
    ) -> Result<Option<T>, ()>
    where
        F: FnMut(Entry) -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let value: Vec<u8> = match self.inner.link.call(&self.read_entry()).await {
            Ok(v) => v,
            Err(FleetError::Refused { code, .. }) if code == "WRONGTYPE" => {
                *garbage = true;
                self.entry_problem("it is not a string value");
                return Ok(None);
            }
            Err(_) => return Err(()),
        };
        if value.is_empty() {
            return Ok(None);
        }
        if refused.as_deref() == Some(value.as_slice()) {
            return Ok(None);
        }
        let outcome = match key.open(&self.inner.entry_key, &value) {
            Ok(entry) => accept(entry).await,
            Err(OpenError::Unreadable) => {
                tracing::debug!(
                    entry = %self.inner.entry_key,
                    "fleet: the shared entry does not open with this client's credential (a rotated secret, or altered): a miss"
                );
                None
            }
            Err(OpenError::Garbage) => {
                *garbage = true;
                self.entry_problem(&OpenError::Garbage.to_string());
                None
            }
        };
        if outcome.is_none() {
            *refused = Some(value);
        }
        Ok(outcome)
    }

    /// Reports garbage in the entry once per change; the grant that follows overwrites it.
    fn entry_problem(&self, what: &str) {
        let mut p = self.inner.entry_problem.lock().expect("entry problem lock");
        let message = format!(
            "the shared entry {} is garbage: {what}",
            self.inner.entry_key
        );
        if p.as_deref() != Some(message.as_str()) {
            tracing::warn!(
                redis = %self.inner.link.url(),
                "fleet: {message}; ignoring it (this agent's grant replaces it)"
            );
            *p = Some(message);
        }
    }

    /// `SET lock VALUE NX PX lock_timeout`: the lease when taken, `None` when another holds it.
    async fn try_lock(&self) -> Result<Option<Lease>, FleetError> {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG works");
        let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let ms = self.inner.link.settings().lock_timeout.as_millis().max(1) as u64;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&self.inner.lock_key)
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(ms);
        let taken: Option<String> = self.inner.link.call(&cmd).await?;
        Ok(taken.map(|_| Lease {
            fleet: self.clone(),
            value: Some(value),
        }))
    }

    async fn release_lock(&self, value: &str) {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RELEASE).arg(1).arg(&self.inner.lock_key).arg(value);
        if let Err(e) = self.inner.link.call::<i64>(&cmd).await {
            tracing::debug!(error = %e, "fleet: the grant lock was not released; it expires by itself");
        }
    }

    fn count(&self, r: ReadResult) {
        let (counter, label) = match r {
            ReadResult::Hit => (&self.inner.hits, "hit"),
            ReadResult::Miss => (&self.inner.misses, "miss"),
            ReadResult::Error => (&self.inner.errors, "error"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.inner.metrics.get() {
            m.fleet_read(label);
        }
    }
}
