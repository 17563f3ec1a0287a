//! The loopback proxy: any OpenAI client pointed at it (`OPENAI_BASE_URL=http://127.0.0.1:8711/v1`)
//! talks to Behest with the agent's token. It owns the listening sockets, the pooled upstream
//! client, the per-request rewrite and its counters ([`Proxy::stats`]).
//!
//! It must never be an open proxy (only the configured upstream, never `CONNECT`, never a host taken
//! from a request), never serve a page from another origin or a rebound DNS name, never forward the
//! client's credentials or log the agent's, and never buffer a body: requests and responses stream
//! chunk by chunk, so server-sent events reach the client as they are produced.
//!
//! Layout:
//! - [`listener`]: sockets, the accept loop, connection limits, head limits, graceful shutdown.
//! - [`framing`]: the watcher that finds `Content-Length` + `Transfer-Encoding` conflicts.
//! - [`guard`]: `CONNECT`, absolute-form, `Host` and `Origin` checks.
//! - [`path`]: the `/s/SESSION/` prefix and dot-segment removal under the base path.
//! - [`forward`]: one request upstream and back: headers, token, 401 replay, timeouts.
//! - [`upstream`]: the upstream's connections (pooled HTTP/1.1, shared h2).
//! - [`body`]: the streamed bodies (tee for replays, idle timeout).
//! - [`error`]: the agent's own answers, OpenAI-shaped.

mod body;
mod error;
mod forward;
mod framing;
mod guard;
mod listener;
mod path;
mod timer;
mod upstream;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{ListenAddr, ProxySettings};
use crate::telemetry::metrics::Metrics;
use crate::token::TokenSource;

pub use error::{ProxyError, SetupError};
pub use listener::Listener;

use forward::{Forwarder, Upstream};
use listener::Limits;

/// How long an idle pooled upstream connection is kept: under the 60 s idle timeout of common load
/// balancers (so the agent closes first rather than reusing a connection being closed), and short
/// enough that the memory a burst's connections hold (about 40 KiB each) is released soon after.
/// The pool's reaper closes them within twice this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many idle upstream connections are kept; more are closed when their response
/// ends. A cap below the client concurrency makes the pool churn (measured: a cap of 32 under 128
/// concurrent clients cut throughput by half), so it only bounds the extreme.
const POOL_MAX_IDLE: usize = 256;

/// The proxy: built once from settings, served on listeners until a shutdown. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

/// What a serving proxy reads: the forwarder for new requests (swapped on reload by
/// [`Proxy::replace_with`]) and the server limits.
pub(crate) struct Shared {
    /// Read (and its `Arc` cloned) once per request; the lock is never held across an await.
    current: RwLock<Arc<Forwarder>>,
    limits: Limits,
}

impl Shared {
    pub(crate) fn forwarder(&self) -> Arc<Forwarder> {
        self.current.read().expect("proxy forwarder lock").clone()
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.forwarder().upstream.url)
            .finish_non_exhaustive()
    }
}

/// Counters for `status` ([`Proxy::stats`]).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Requests received (including refused ones).
    pub requests: AtomicU64,
    /// Responses by status class, 1xx to 5xx (upstream's and the agent's own).
    pub by_class: [AtomicU64; 5],
    /// Requests whose response has not finished streaming.
    pub in_flight: AtomicU64,
    /// Open client connections.
    pub connections: AtomicU64,
    /// Requests replayed with a new token after a 401.
    pub replays: AtomicU64,
    /// Upstream failures: unreachable (502), no response head in time (504), or a response body
    /// that broke off or went silent past `idle_timeout` mid-stream.
    pub upstream_errors: AtomicU64,
}

impl Stats {
    fn count_status(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `old`'s running totals (not its gauges), so counters survive a reload.
    fn carry_over(&self, old: &Stats) {
        let add = |to: &AtomicU64, from: &AtomicU64| {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        add(&self.requests, &old.requests);
        for (to, from) in self.by_class.iter().zip(&old.by_class) {
            add(to, from);
        }
        add(&self.replays, &old.replays);
        add(&self.upstream_errors, &old.upstream_errors);
    }
}

impl Proxy {
    /// Builds the proxy and its pooled upstream client (rustls with the system's roots plus
    /// `ca_file`, ALPN h2 and http/1.1). Fails when no upstream is configured.
    pub fn new(settings: &ProxySettings, tokens: TokenSource) -> Result<Proxy, SetupError> {
        let url = settings.upstream.as_ref().ok_or(SetupError::NoUpstream)?;
        let upstream = Upstream::from_url(url)?;
        let session_id = settings
            .session_id
            .as_deref()
            .map(|s| {
                HeaderValue::from_str(s)
                    .ok()
                    .filter(|_| valid_session(s))
                    .ok_or_else(|| SetupError::SessionId(s.to_string()))
            })
            .transpose()?;

        let mut http = HttpConnector::new();
        // The TLS layer handles https; plain http is only reachable because config allowed it.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout).filter(|d| !d.is_zero()));
        let tls =
            crate::tls::client_config(settings.ca_file.as_deref()).map_err(SetupError::Tls)?;
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let target = http::Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SetupError::Upstream(e.to_string()))?;
        let host = HeaderValue::from_str(upstream.authority.as_str())
            .map_err(|e| SetupError::Upstream(e.to_string()))?;
        let pool = upstream::Pool::new(https, target, host, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE);

        // Zero: no limit (tokio clamps the far deadline).
        let upstream_timeout = if settings.upstream_timeout.is_zero() {
            Duration::MAX
        } else {
            settings.upstream_timeout
        };
        let fwd = Forwarder {
            tokens,
            pool,
            upstream,
            session_id,
            allowed_origins: settings.allowed_origins.clone(),
            max_replay_body: settings.max_replay_body,
            upstream_timeout,
            idle_timeout: settings.idle_timeout,
            stats: Stats::default(),
            metrics: OnceLock::new(),
        };
        Ok(Proxy {
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(fwd)),
                limits: Limits {
                    max_connections: settings.max_connections,
                    header_read_timeout: settings.header_read_timeout,
                    shutdown_grace: settings.shutdown_grace,
                },
            }),
        })
    }

    fn forwarder(&self) -> Arc<Forwarder> {
        self.shared.forwarder()
    }

    /// Records requests, durations, in-flight gauges, upstream errors and replays in `metrics`
    /// from now on (once; later calls are ignored).
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.forwarder().metrics.set(metrics);
    }

    /// On reload: requests arriving from now on, on the listeners `self` serves, go through
    /// `new`'s forwarder (upstream, token source, session, origins, timeouts). Requests in flight
    /// finish as they started. The running totals of `stats` carry over to `new`. The listener
    /// limits (`max_connections`, `header_read_timeout`, `shutdown_grace`) are not swapped: they
    /// apply when serving restarts.
    pub fn replace_with(&self, new: &Proxy) {
        if Arc::ptr_eq(&self.shared, &new.shared) {
            return;
        }
        let next = new.forwarder();
        let mut current = self.shared.current.write().expect("proxy forwarder lock");
        if !Arc::ptr_eq(&current, &next) {
            next.stats.carry_over(&current.stats);
            *current = next;
        }
    }

    /// Binds every listen address: TCP, or `unix:/path` (socket mode 0660).
    pub async fn bind(listen: &[ListenAddr]) -> std::io::Result<Vec<Listener>> {
        listener::bind(listen).await
    }

    /// Serves until `shutdown`; then stops accepting, lets in-flight requests and streams finish
    /// for up to `shutdown_grace`, cuts the rest, and returns.
    pub async fn serve(&self, listeners: Vec<Listener>, shutdown: CancellationToken) {
        listener::serve(self.shared.clone(), listeners, shutdown).await
    }

    /// The configured upstream base URL.
    pub fn upstream(&self) -> String {
        self.forwarder().upstream.url.clone()
    }

    /// Counters for `status` (never a header value or a token).
    pub fn stats(&self) -> Value {
        let fwd = self.forwarder();
        let s = &fwd.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "upstream": fwd.upstream.url,
            "requests_total": get(&s.requests),
            "responses": {
                "1xx": get(&s.by_class[0]),
                "2xx": get(&s.by_class[1]),
                "3xx": get(&s.by_class[2]),
                "4xx": get(&s.by_class[3]),
                "5xx": get(&s.by_class[4]),
            },
            "in_flight": get(&s.in_flight),
            "connections": get(&s.connections),
            "replays": get(&s.replays),
            "upstream_errors": get(&s.upstream_errors),
        })
    }
}

/// A configured session id: visible ASCII, 1 to 128 characters (sent as is, not percent-decoded).
fn valid_session(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= path::MAX_SESSION_ID
        && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}
