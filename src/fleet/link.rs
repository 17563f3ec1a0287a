//! The connection to Redis: one multiplexed connection, made on demand (the password file read
//! again each time, so rotating it needs no restart), every call bounded by `fleet.timeout`
//! connecting included, dropped on a failure and made again only after a jittered backoff, so an
//! unreachable Redis costs a grant at most one timeout. It keeps the health `status` shows and logs
//! each change of it once: Redis flapping or down for hours gives one warning, not one per call.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, FromRedisValue, IntoConnectionInfo, TlsCertificates};
use tokio::time::Instant;

use crate::config::FleetSettings;

/// The first wait before connecting again after a failure; it doubles up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Why a Redis call gave nothing. The message never holds a password or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("no answer within {} (fleet.timeout)", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Connecting failed (refused, DNS, TLS, authentication) or the connection broke.
    #[error("{0}")]
    Connection(String),
    /// Redis answered with an error (`NOPERM`, `OOM`, `READONLY`, `WRONGTYPE`, …).
    #[error("Redis refused the command: {message}")]
    Refused { code: String, message: String },
    /// Not connecting again yet; the last failure.
    #[error("{0}")]
    Waiting(String),
}

impl FleetError {
    /// `timeout`: the bound the connection was given, which its own timeouts report.
    fn from_redis(e: redis::RedisError, timeout: Duration) -> FleetError {
        if e.is_timeout() {
            return FleetError::Timeout(timeout);
        }
        let message = crate::auth::grant::sanitize(&e.to_string());
        match e.code() {
            Some(code)
                if !e.is_io_error() && e.kind() != redis::ErrorKind::AuthenticationFailed =>
            {
                FleetError::Refused {
                    code: code.to_string(),
                    message,
                }
            }
            _ => FleetError::Connection(message),
        }
    }

    /// A failure of the connection itself (not an answer): it is dropped and made again later.
    fn breaks_link(&self) -> bool {
        matches!(self, FleetError::Timeout(_) | FleetError::Connection(_))
    }
}

/// What is known of Redis, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not asked anything yet.
    Connecting,
    Connected,
    /// The last call failed; the error.
    Unreachable(String),
}

struct State {
    conn: Option<MultiplexedConnection>,
    failures: u32,
    /// No new connection before this.
    retry_at: Option<Instant>,
    last_error: Option<FleetError>,
    health: Health,
}

pub(super) struct Link {
    settings: FleetSettings,
    state: Mutex<State>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Woken when a call fails, so the daemon's companion starts reconnecting at once.
    failed: tokio::sync::Notify,
}

impl Link {
    pub(super) fn new(settings: FleetSettings) -> Link {
        Link {
            settings,
            state: Mutex::new(State {
                conn: None,
                failures: 0,
                retry_at: None,
                last_error: None,
                health: Health::Connecting,
            }),
            connecting: tokio::sync::Mutex::new(()),
            failed: tokio::sync::Notify::new(),
        }
    }

    /// Resolves at the next failed call (or at once if one failed since the last wait).
    pub(super) async fn failed_call(&self) {
        self.failed.notified().await
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fleet link lock")
    }

    pub(super) fn settings(&self) -> &FleetSettings {
        &self.settings
    }

    /// The Redis URL as status and logs show it (it never holds credentials).
    pub(super) fn url(&self) -> &str {
        self.settings.redis_url.as_str()
    }

    pub(super) fn health(&self) -> Health {
        self.state().health.clone()
    }

    /// How long until a new connection may be tried (zero when connected or due).
    pub(super) fn until_retry(&self) -> Duration {
        self.state()
            .retry_at
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Runs `cmd`, connecting first when needed; the whole bounded by `fleet.timeout`.
    pub(super) async fn call<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, FleetError> {
        let timeout = self.settings.timeout;
        let outcome = tokio::time::timeout(timeout, async {
            let mut conn = self.connection().await?;
            cmd.query_async::<T>(&mut conn)
                .await
                .map_err(|e| FleetError::from_redis(e, timeout))
        })
        .await
        .unwrap_or(Err(FleetError::Timeout(timeout)));
        match &outcome {
            Ok(_) => self.answered(),
            Err(e) if e.breaks_link() => self.failed(e),
            // An error reply is an answer: the link works, but Redis will not do what the fleet
            // needs (an ACL without the command, out of memory, a read-only replica).
            Err(e @ FleetError::Refused { code, .. }) if code != "WRONGTYPE" => {
                self.set_health(Health::Unreachable(e.to_string()))
            }
            Err(_) => {}
        }
        outcome
    }

    async fn connection(&self) -> Result<MultiplexedConnection, FleetError> {
        if let Some(c) = self.state().conn.clone() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        {
            let st = self.state();
            if let Some(c) = st.conn.clone() {
                return Ok(c);
            }
            if let Some(at) = st.retry_at
                && Instant::now() < at
            {
                let last = st
                    .last_error
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                return Err(FleetError::Waiting(last));
            }
        }
        let conn = self.connect().await?;
        self.state().conn = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<MultiplexedConnection, FleetError> {
        let s = &self.settings;
        let timeout = s.timeout;
        let mut info = s
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(|e| FleetError::from_redis(e, timeout))?;
        let mut redis = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(user) = &s.username {
            redis = redis.set_username(user);
        }
        if let Some(path) = &s.password_file {
            let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                FleetError::Connection(format!(
                    "cannot read fleet.redis_password_file {}: {e}",
                    path.display()
                ))
            })?;
            let password = crate::config::secret_text(&text).map_err(|e| {
                FleetError::Connection(format!("fleet.redis_password_file {}: {e}", path.display()))
            })?;
            redis = redis.set_password(password);
        }
        info = info.set_redis_settings(redis);
        let client = match &s.ca_file {
            Some(ca) => {
                let pem = tokio::fs::read(ca).await.map_err(|e| {
                    FleetError::Connection(format!(
                        "cannot read fleet.ca_file {}: {e}",
                        ca.display()
                    ))
                })?;
                Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => Client::open(info),
        }
        .map_err(|e| FleetError::from_redis(e, timeout))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(s.timeout))
            .set_response_timeout(Some(s.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| FleetError::from_redis(e, timeout))
    }

    fn answered(&self) {
        let mut st = self.state();
        st.failures = 0;
        st.retry_at = None;
        st.last_error = None;
        drop(st);
        self.set_health(Health::Connected);
    }

    fn failed(&self, e: &FleetError) {
        let mut st = self.state();
        st.conn = None;
        st.failures = st.failures.saturating_add(1);
        let exp = RECONNECT_MIN
            .saturating_mul(1 << st.failures.saturating_sub(1).min(10))
            .min(RECONNECT_MAX);
        st.retry_at = Some(Instant::now() + exp.mul_f64(0.5 + fastrand::f64() * 0.5));
        st.last_error = Some(e.clone());
        drop(st);
        self.set_health(Health::Unreachable(e.to_string()));
        self.failed.notify_one();
    }

    /// Records the health, logging a change of state once.
    fn set_health(&self, new: Health) {
        let mut st = self.state();
        let old = std::mem::replace(&mut st.health, new.clone());
        drop(st);
        let url = self.url();
        match (&old, &new) {
            (Health::Connected, Health::Connected)
            | (Health::Unreachable(_), Health::Unreachable(_)) => {}
            (Health::Connecting, Health::Connected) => {
                tracing::info!(redis = %url, "fleet: connected to Redis; the token is shared")
            }
            (Health::Unreachable(_), Health::Connected) => {
                tracing::warn!(redis = %url, "fleet: Redis answers again; the token is shared again")
            }
            (_, Health::Unreachable(error)) => tracing::warn!(
                redis = %url,
                error = %error,
                "fleet: Redis is unreachable; carrying on alone (disk cache, own grants) until it answers. Check fleet.redis_url, redis_username, redis_password_file and ca_file; `behest-agent doctor` tests them"
            ),
            (_, Health::Connecting) => {}
        }
    }
}
