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
//! - [`guard`]: `CONNECT`, absolute-form, `Host` and `Origin` checks.
//! - [`path`]: the `/s/SESSION/` prefix and dot-segment removal under the base path.
//! - [`forward`]: one request upstream and back: headers, token, 401 replay, timeouts.
//! - [`body`]: the response body streamed to the client, and its request's record.
//! - [`error`]: the agent's own answers, OpenAI-shaped.
//!
//! Sockets, connection limits and the graceful drain are [`crate::server`]'s.

mod body;
mod error;
mod forward;
mod guard;
mod path;
mod upstream;

/// The session id rule, for the CLI's derived sessions.
pub use path::{MAX_SESSION_ID, valid_session};

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, StatusCode, Uri};
use hyper::service::service_fn;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::{ListenAddr, ProxySettings};
use crate::keys::KeyStore;
use crate::server::{self, Limits, Listener};
use crate::telemetry::metrics::Metrics;
use crate::token::TokenSource;
use crate::usage::Accounting;

pub use error::{ProxyError, SetupError};
pub use forward::{X_REQUEST_ID, X_SESSION_ID};

use forward::Forwarder;

/// How long an idle pooled upstream connection is kept: under the 60 s idle timeout of common load
/// balancers, so the agent closes first rather than reusing a connection being closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many idle upstream connections are kept.
const POOL_MAX_IDLE: usize = 256;

/// The proxy: built once from settings, served on listeners until a shutdown. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

/// What a serving proxy reads: the forwarder for new requests (swapped on reload by
/// [`Proxy::replace_with`]) and the server limits.
struct Shared {
    /// Read (and its `Arc` cloned) once per request; the lock is never held across an await.
    current: RwLock<Arc<Forwarder>>,
    limits: Limits,
    /// Open client connections (not swapped on reload: connections outlive a forwarder).
    connections: AtomicU64,
}

/// Counts a client connection for as long as its service lives.
struct Counted(Arc<Shared>);

impl Counted {
    fn new(shared: Arc<Shared>) -> Counted {
        shared.connections.fetch_add(1, Ordering::Relaxed);
        Counted(shared)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.forwarder().default.upstream.url)
            .finish_non_exhaustive()
    }
}

/// What a forwarder counts: the figures of `status` and, when the daemon exports them, the
/// Prometheus metrics.
#[derive(Default)]
struct Counters {
    stats: Stats,
    metrics: OnceLock<Arc<Metrics>>,
    /// Usage accounting and budgets (SPEC §8), when the daemon keeps them.
    accounting: OnceLock<Arc<Accounting>>,
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
        Self::with_profiles(settings, tokens, Vec::new())
    }

    /// [`Proxy::new`], with the `[profiles.NAME]` that `/p/NAME/` selects: each its own token
    /// source and upstream (routes to the same upstream share its connection pool).
    pub fn with_profiles(
        settings: &ProxySettings,
        tokens: TokenSource,
        profiles: Vec<ProxyProfile>,
    ) -> Result<Proxy, SetupError> {
        let url = settings.upstream.as_ref().ok_or(SetupError::NoUpstream)?;
        let upstream = UpstreamBase::from_url(url)?;
        let session_id = settings
            .session_id
            .as_deref()
            .map(|s| {
                HeaderValue::from_str(s)
                    .ok()
                    .filter(|_| path::valid_session(s.as_bytes()))
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
        // Zero: no limit (tokio clamps the far deadline).
        let unbounded = |d: Duration| if d.is_zero() { Duration::MAX } else { d };
        // Both connection bounds within the file descriptor limit (`run` logs the warning).
        let (fit, _) = crate::fds::fit(
            settings.max_connections,
            settings.max_upstream_connections,
            crate::fds::soft_limit(),
        );
        let bounds = upstream::Bounds {
            idle_timeout: POOL_IDLE_TIMEOUT,
            max_idle: POOL_MAX_IDLE,
            max_connections: fit.upstream,
            permit_wait: unbounded(settings.connect_timeout),
            connect_timeout: unbounded(settings.connect_timeout),
        };
        let pool_for = |upstream: &UpstreamBase| -> Result<Arc<upstream::Pool>, SetupError> {
            let target = Uri::builder()
                .scheme(upstream.scheme.clone())
                .authority(upstream.authority.clone())
                .path_and_query("/")
                .build()
                .map_err(|e| SetupError::Upstream(e.to_string()))?;
            let host = HeaderValue::from_str(upstream.authority.as_str())
                .map_err(|e| SetupError::Upstream(e.to_string()))?;
            // Direct, or through the egress proxy (a CONNECT tunnel, or absolute form for http).
            let (route, dial) = upstream::Route::new(target, &settings.egress, http.clone());
            let https = HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(dial);
            Ok(upstream::Pool::new(https, route, host, bounds))
        };
        let pool = pool_for(&upstream)?;
        let mut routes = HashMap::new();
        for p in profiles {
            let up = match &p.upstream {
                Some(u) => UpstreamBase::from_url(u)?,
                None => upstream.clone(),
            };
            let pool = if up.url == upstream.url {
                pool.clone()
            } else {
                pool_for(&up)?
            };
            routes.insert(
                p.name.clone().into_boxed_str(),
                forward::Route {
                    name: p.name.into(),
                    tokens: p.tokens,
                    pool,
                    upstream: up,
                },
            );
        }

        let fwd = Forwarder {
            default: forward::Route {
                name: crate::config::DEFAULT_PROFILE.into(),
                tokens,
                pool,
                upstream,
            },
            profiles: routes,
            session_id,
            allowed_origins: settings.allowed_origins.clone(),
            allowed_hosts: settings.allowed_hosts.clone(),
            require_key: settings.require_key,
            keys: OnceLock::new(),
            max_requests: fit.clients as u64,
            max_replay_body: settings.max_replay_body,
            replay_budget: forward::ReplayBudget::new(settings.replay_budget),
            upstream_timeout: unbounded(settings.upstream_timeout),
            idle_timeout: unbounded(settings.idle_timeout),
            counters: Arc::default(),
        };
        Ok(Proxy {
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(fwd)),
                limits: Limits {
                    max_connections: fit.clients,
                    header_read_timeout: settings.header_read_timeout,
                    idle_timeout: settings.idle_timeout,
                    shutdown_grace: settings.shutdown_grace,
                },
                connections: AtomicU64::new(0),
            }),
        })
    }

    fn forwarder(&self) -> Arc<Forwarder> {
        self.shared
            .current
            .read()
            .expect("proxy forwarder lock")
            .clone()
    }

    /// Records requests, durations, in-flight gauges, upstream errors and replays in `metrics`
    /// from now on (once; later calls are ignored).
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.forwarder().counters.metrics.set(metrics);
    }

    /// Accounts usage and applies budgets with `accounting` from now on (once; later calls are
    /// ignored). A reload's new proxy is given the same one, so the counts carry on.
    pub fn attach_accounting(&self, accounting: Arc<Accounting>) {
        let _ = self.forwarder().counters.accounting.set(accounting);
    }

    /// Checks local keys against `keys` from now on (once; later calls are ignored). Until then,
    /// with `proxy.require_key` every request is refused.
    pub fn attach_keys(&self, keys: Arc<KeyStore>) {
        let _ = self.forwarder().keys.set(keys);
    }

    /// On reload: requests arriving from now on, on the listeners `self` serves, go through
    /// `new`'s forwarder (upstream, token source, session, origins, timeouts, and its own upstream
    /// connections and replay budget). Requests in flight finish as they started, on the old
    /// forwarder's connections and budget. The running totals of `stats` carry over to `new`. The listener
    /// limits (`max_connections`, `header_read_timeout`, `shutdown_grace`) are not swapped: they
    /// apply when serving restarts.
    pub fn replace_with(&self, new: &Proxy) {
        if Arc::ptr_eq(&self.shared, &new.shared) {
            return;
        }
        let next = new.forwarder();
        let mut current = self.shared.current.write().expect("proxy forwarder lock");
        if !Arc::ptr_eq(&current, &next) {
            if !Arc::ptr_eq(&current.counters, &next.counters) {
                next.counters.stats.carry_over(&current.counters.stats);
            }
            *current = next;
        }
    }

    /// Counts into `old`'s counters from now on, before serving anything (a reload: requests
    /// still in flight on the old configuration and the new ones add to the same totals and
    /// gauges).
    pub fn count_with(&self, old: &Proxy) {
        let mut current = self.shared.current.write().expect("proxy forwarder lock");
        if let Some(fwd) = Arc::get_mut(&mut current) {
            fwd.counters = old.forwarder().counters.clone();
        }
    }

    /// Has the connections `self` still serves forward with `new`'s forwarder (a reload that
    /// started new accept loops: the old ones' connections follow the configuration too).
    pub fn forward_with(&self, new: &Proxy) {
        *self.shared.current.write().expect("proxy forwarder lock") = new.forwarder();
    }

    /// Binds every listen address: TCP, or `unix:/path` (socket mode 0660).
    pub async fn bind(listen: &[ListenAddr]) -> std::io::Result<Vec<Listener>> {
        server::bind(listen).await
    }

    /// Serves until `shutdown`; then stops accepting, lets in-flight requests and streams finish
    /// for up to `shutdown_grace`, cuts the rest, and returns.
    pub async fn serve<L: Into<Arc<Listener>>>(
        &self,
        listeners: Vec<L>,
        shutdown: CancellationToken,
    ) {
        self.serve_until(listeners, shutdown.clone(), shutdown)
            .await
    }

    /// [`Proxy::serve`], accepting until `stop` and draining from `drain` on (see
    /// [`server::serve_until`]).
    pub async fn serve_until<L: Into<Arc<Listener>>>(
        &self,
        listeners: Vec<L>,
        stop: CancellationToken,
        drain: CancellationToken,
    ) {
        let proxy = self.clone();
        let make = move |conn: server::Conn| {
            let proxy = proxy.clone();
            let counted = Counted::new(proxy.shared.clone());
            service_fn(move |req| {
                let _ = &counted;
                // The forwarder current when the request arrives (a reload may swap it). Boxed:
                // hyper keeps a slot of the service future's size for as long as the connection
                // lives; a box there frees the request's state once its response head is out.
                let fwd = proxy.forwarder();
                Box::pin(async move { Ok::<_, Infallible>(fwd.handle(conn.local, req).await) })
            })
        };
        server::serve_until(listeners, self.shared.limits, make, stop, drain).await
    }

    /// The configured upstream base URL.
    pub fn upstream(&self) -> String {
        self.forwarder().default.upstream.url.clone()
    }

    /// Counters for `status` (never a header value or a token).
    pub fn stats(&self) -> Value {
        let fwd = self.forwarder();
        let s = &fwd.counters.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "upstream": fwd.default.upstream.url,
            "requests_total": get(&s.requests),
            "responses": {
                "1xx": get(&s.by_class[0]),
                "2xx": get(&s.by_class[1]),
                "3xx": get(&s.by_class[2]),
                "4xx": get(&s.by_class[3]),
                "5xx": get(&s.by_class[4]),
            },
            "in_flight": get(&s.in_flight),
            "connections": get(&self.shared.connections),
            "upstream_connections": fwd.default.pool.open_connections(),
            "replay_kept_bytes": fwd.replay_budget.used(),
            "replays": get(&s.replays),
            "upstream_errors": get(&s.upstream_errors),
        })
    }
}

/// A `[profiles.NAME]` for [`Proxy::with_profiles`].
pub struct ProxyProfile {
    pub name: String,
    pub tokens: TokenSource,
    /// Its own upstream; `None`: the proxy's.
    pub upstream: Option<Url>,
}

/// The configured upstream base URL, parsed once.
#[derive(Debug, Clone)]
pub struct UpstreamBase {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Lower-case host as in a URI (`[::1]` for IPv6), for absolute-form checks.
    pub host: String,
    /// The port, explicit or the scheme's default.
    pub port: u16,
    /// The base path without a trailing `/` (`""` for the root).
    pub base: String,
    /// For messages.
    pub url: String,
}

impl UpstreamBase {
    pub fn from_url(url: &Url) -> Result<UpstreamBase, SetupError> {
        let bad = |m: &str| SetupError::Upstream(format!("`{url}`: {m}"));
        let scheme = match url.scheme() {
            "https" => Scheme::HTTPS,
            "http" => Scheme::HTTP,
            _ => {
                return Err(bad(
                    "the scheme must be https (or http for a local test server)",
                ));
            }
        };
        let host = url
            .host_str()
            .ok_or_else(|| bad("no host"))?
            .to_ascii_lowercase();
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let authority = Authority::try_from(authority).map_err(|e| bad(&e.to_string()))?;
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(bad(
                "must be a base URL without query, fragment or credentials",
            ));
        }
        Ok(UpstreamBase {
            scheme,
            authority,
            host,
            port,
            base: url.path().trim_end_matches('/').to_string(),
            url: url.to_string(),
        })
    }

    /// The upstream URI for a request: the configured scheme, authority and base path, then
    /// `path` (resolved under the base) and the client's query as it came.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let mut pq =
            String::with_capacity(self.base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(&self.base);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::from_maybe_shared(Bytes::from(pq)).map_err(|_| {
            ProxyError::BadRequest("the request path is not a valid URI path".to_string())
        })?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| ProxyError::BadRequest(e.to_string()))
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn the_upstream_uri_is_the_base_path_then_the_path_and_the_clients_query() {
        let up =
            UpstreamBase::from_url(&Url::parse("https://api.behest.test/base/").unwrap()).unwrap();
        assert_eq!((up.base.as_str(), up.port), ("/base", 443));
        let uri = up.uri("/v1/x", Some("q=1")).unwrap();
        assert_eq!(uri.to_string(), "https://api.behest.test/base/v1/x?q=1");
        // The authority is the configuration's, whatever the path looks like.
        let uri = up.uri("//evil.example/x", None).unwrap();
        assert_eq!(
            (uri.authority().unwrap().as_str(), uri.path()),
            ("api.behest.test", "/base//evil.example/x")
        );
        let root = UpstreamBase::from_url(&Url::parse("http://127.0.0.1:9/").unwrap()).unwrap();
        let uri = root.uri("//evil.example/x", Some("")).unwrap();
        assert_eq!(uri.authority().unwrap().as_str(), "127.0.0.1:9");
        assert_eq!(uri.path_and_query().unwrap().as_str(), "//evil.example/x?");
    }
}
