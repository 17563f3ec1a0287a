//! One request, from the client to the upstream and back: the guards, the upstream URI built from
//! the configured scheme and authority (never from the request), the header rewrite (hop-by-hop
//! headers and the client's credentials out, the agent's bearer token in), the 401 replay, the
//! timeouts, and the agent's own OpenAI-shaped errors. Bodies stream both ways.
//!
//! The hot path takes the token with a read-mostly load, holds no lock across an await, and never
//! buffers a response: each frame is passed on as it comes (hyper copies it into the connection's
//! write buffer, which for small frames costs less than a vectored write).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION,
    TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;
use url::Url;

use super::Stats;
use super::body::{ResponseBody, UpstreamBody};
use super::error::{ProxyError, SetupError};
use super::framing::Framing;
use super::timer::{ConnTimer, Lazy, after_from};
use super::upstream::{Lease, Pool, Sent};
use super::{guard, path};
use crate::telemetry::metrics::Metrics;
use crate::token::{Token, TokenSource};

/// `X-Session-Id`: per-job cost attribution at Behest.
pub const X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
/// `X-Request-Id`: added when the client sent none, to correlate logs on both sides.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// More fields than this in a request head get 431 (hyper enforces it on HTTP/1; this on h2).
pub const MAX_HEADERS: usize = 100;

/// Headers that describe one hop, never forwarded either way (RFC 9110 §7.6.1), besides those the
/// `Connection` header names.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
];

/// The configured upstream, parsed once.
#[derive(Debug, Clone)]
pub struct Upstream {
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

impl Upstream {
    pub fn from_url(url: &Url) -> Result<Upstream, SetupError> {
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
        Ok(Upstream {
            scheme,
            authority,
            host,
            port,
            base: url.path().trim_end_matches('/').to_string(),
            url: url.to_string(),
        })
    }

    /// The origin-form target sent upstream (`/base/path?query`, the client's query as it came);
    /// the scheme and authority are the connection pool's, from the configuration. When `path` is
    /// the client's own path under an empty base (the usual case), the client's path and query are
    /// reused: hyper has checked them, and a reference count costs less than a copy and a check.
    pub fn target(&self, client: &Uri, path: &str) -> Result<Uri, ProxyError> {
        if self.base.is_empty()
            && path == client.path()
            && let Some(pq) = client.path_and_query()
        {
            return Ok(Uri::from(pq.clone()));
        }
        let query = client.query();
        let mut pq =
            String::with_capacity(self.base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(&self.base);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        PathAndQuery::from_maybe_shared(Bytes::from(pq))
            .map(Uri::from)
            .map_err(|_| {
                ProxyError::BadRequest("the request path is not a valid URI path".to_string())
            })
    }
}

/// What a connection knows about itself, shared by its requests.
pub struct ConnInfo {
    /// The TCP address it was accepted on; `None` on a Unix socket.
    pub local: Option<guard::Local>,
    /// What the framing watcher saw in the raw HTTP/1 bytes.
    pub framing: Arc<Framing>,
    /// Requests seen so far on this connection, to match them with the watcher's heads.
    pub requests: AtomicU64,
    /// The timer of its HTTP/1 requests, which come one at a time: their head-read and upstream
    /// timeouts take turns on it (h2 streams, concurrent, have timers of their own).
    pub timer: ConnTimer,
}

/// Everything a request needs, shared by all connections.
pub struct Forwarder {
    pub tokens: TokenSource,
    pub pool: Arc<Pool>,
    pub upstream: Upstream,
    /// `proxy.session_id`, sent when the client sent no session.
    pub session_id: Option<HeaderValue>,
    pub allowed_origins: Vec<String>,
    pub max_replay_body: usize,
    pub upstream_timeout: Duration,
    pub idle_timeout: Duration,
    pub stats: Stats,
    /// Prometheus metrics, when the daemon exports them.
    pub metrics: OnceLock<Arc<Metrics>>,
}

/// nginx's "client closed request": the client went away before a response was chosen.
const CLIENT_CLOSED: u16 = 499;

/// One request's line in the log and its place in the counters; logged when the response body
/// ends or is dropped (the client went away), so `bytes` and `duration` cover the whole stream.
pub struct RequestRecord {
    fwd: Arc<Forwarder>,
    /// What the debug line names, kept only when that line is written: the client's target and
    /// session header share the memory of the connection's read buffer, and holding them for the
    /// whole response would make hyper allocate a new 8 KiB buffer for its next read.
    logged: Option<Box<Logged>>,
    /// [`CLIENT_CLOSED`] until a response is chosen.
    status: u16,
    /// A `text/event-stream` response (counted in the streams gauge).
    stream: bool,
    pub bytes: u64,
    pub completed: bool,
    start: Instant,
    /// The HTTP/1.1 upstream connection the response comes on, released to the pool when the
    /// response body was read to its end.
    lease: Option<Lease>,
}

struct Logged {
    method: Method,
    /// Only its path is logged, never the query.
    target: Uri,
    session: Option<HeaderValue>,
}

impl RequestRecord {
    /// The upstream's body failed mid-stream (`kind`: `reset`, `idle_timeout`).
    pub fn upstream_error(&self, kind: &str) {
        self.fwd
            .stats
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.fwd.metrics.get() {
            m.upstream_error(kind);
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // One look at the clock for the pool and the metrics.
        let now = Instant::now();
        if let Some(lease) = self.lease.take()
            && self.completed
        {
            lease.release(now);
        }
        self.fwd.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(m) = self.fwd.metrics.get() {
            m.proxy_response(self.status, now.saturating_duration_since(self.start));
            m.in_flight_requests.dec();
            if self.stream {
                m.in_flight_streams.dec();
            }
        }
        if let Some(l) = &self.logged {
            self.log(l);
        }
    }
}

impl RequestRecord {
    /// The debug line (only written when `logged` was kept).
    #[cold]
    #[inline(never)]
    fn log(&self, l: &Logged) {
        tracing::debug!(
            method = %l.method,
            path = l.target.path(),
            status = self.status,
            bytes = self.bytes,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            session = l.session.as_ref().and_then(|s| s.to_str().ok()).unwrap_or("-"),
            completed = self.completed,
            "proxied request"
        );
    }
}

/// The first frame of a request body, as polled once.
type First = Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>>;

/// A request ready to go upstream, and what a replay needs.
struct Prepared {
    req: Request<UpstreamBody>,
    replay: Replay,
    again: Option<Box<Again>>,
}

/// The head of a request kept for a replay: the method, the URI, and the header fields packed in
/// one buffer (the `Authorization` left out: a replay carries a new token). Boxed, as the future
/// that keeps it lives in the client connection's memory. Packed, it is one allocation to make
/// and one to free, with nothing to read back when it is dropped (a `HeaderMap` clone is three,
/// and its drop walks every field): it is dropped when the response head arrives, by which time
/// the requests of other connections have pushed it out of the cache.
struct Again {
    method: Method,
    uri: Uri,
    /// For each field: its name's length (`u32`, native order), the name, its value's length (the
    /// top bit set for a sensitive value), the value.
    fields: Vec<u8>,
}

/// In [`Again::fields`], the flag of a sensitive value's length (a head is at most 32 KiB).
const SENSITIVE: u32 = 1 << 31;

impl Again {
    fn new(method: &Method, uri: &Uri, headers: &HeaderMap) -> Box<Again> {
        let kept = || headers.iter().filter(|(name, _)| *name != AUTHORIZATION);
        let size = kept().map(|(n, v)| 8 + n.as_str().len() + v.len()).sum();
        let mut fields = Vec::with_capacity(size);
        for (name, value) in kept() {
            let sensitive = if value.is_sensitive() { SENSITIVE } else { 0 };
            for (part, flag) in [(name.as_str().as_bytes(), 0), (value.as_bytes(), sensitive)] {
                fields.extend_from_slice(&(part.len() as u32 | flag).to_ne_bytes());
                fields.extend_from_slice(part);
            }
        }
        Box::new(Again {
            method: method.clone(),
            uri: uri.clone(),
            fields,
        })
    }

    /// The header fields as they were (`None` if one no longer parses, which a field that came
    /// from a `HeaderMap` always does).
    fn headers(&self) -> Option<HeaderMap> {
        fn take(b: &[u8]) -> Option<(&[u8], bool, &[u8])> {
            let (len, rest) = b.split_first_chunk::<4>()?;
            let len = u32::from_ne_bytes(*len);
            let n = (len & !SENSITIVE) as usize;
            (n <= rest.len()).then(|| (&rest[..n], len & SENSITIVE != 0, &rest[n..]))
        }
        let mut headers = HeaderMap::new();
        let mut rest = &self.fields[..];
        while !rest.is_empty() {
            let (name, _, r) = take(rest)?;
            let (value, sensitive, r) = take(r)?;
            rest = r;
            let mut value = HeaderValue::from_bytes(value).ok()?;
            value.set_sensitive(sensitive);
            headers.append(HeaderName::from_bytes(name).ok()?, value);
        }
        Some(headers)
    }
}

/// Where the replayable copy of a request body is.
enum Replay {
    /// Not replayable: the body is larger than `max_replay_body`.
    No,
    /// No body at all.
    Empty,
    /// The whole body, taken at once.
    Whole(Bytes),
    /// The tee hands over the chunks once the whole body went through and fitted.
    Kept(super::body::Kept),
}

impl Forwarder {
    /// Answers one request. Never fails: errors become OpenAI-shaped answers.
    ///
    /// This and the other functions on the request path return an `async` block rather than
    /// being `async fn`s: an `async fn` moves each argument it takes by value into a second slot
    /// of its future when first polled, so the request was copied twice at each layer. The
    /// futures live in each client connection's own memory, which with many connections is not
    /// in the cache when the next request comes: every byte written there costs.
    #[expect(clippy::manual_async_fn, reason = "no second copy of the request")]
    pub fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<ResponseBody>> {
        async move {
            let n = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = self.metrics.get() {
                m.in_flight_requests.inc();
            }
            let mut record = RequestRecord {
                fwd: self.clone(),
                logged: tracing::enabled!(tracing::Level::DEBUG).then(|| {
                    Box::new(Logged {
                        method: req.method().clone(),
                        target: req.uri().clone(),
                        session: None,
                    })
                }),
                status: CLIENT_CLOSED,
                stream: false,
                bytes: 0,
                completed: false,
                start: Instant::now(),
                lease: None,
            };
            let result = if conn.framing.conflict_at(n) {
                Err(ProxyError::ConflictingFraming)
            } else {
                self.forward(&conn, req, &mut record).await
            };
            match result {
                Ok((resp, lease)) => {
                    record.lease = lease;
                    // The upstream's head, edited in place for the client.
                    let (mut parts, body) = resp.into_parts();
                    let seen = Seen::scan(&parts.headers);
                    seen.strip(&mut parts.headers);
                    parts.version = Version::HTTP_11;
                    parts.extensions.clear();
                    record.status = parts.status.as_u16();
                    self.stats.count_status(parts.status);
                    if let Some(m) = self.metrics.get()
                        && seen.event_stream
                    {
                        record.stream = true;
                        m.in_flight_streams.inc();
                    }
                    Response::from_parts(
                        parts,
                        ResponseBody::stream(body, self.idle_timeout, record),
                    )
                }
                Err(e) => self.failed(e, record),
            }
        }
    }

    /// The answer to a request that failed before a response came. Out of line, like every rare
    /// path on the way of a request, so that the common one is packed in fewer cache lines.
    #[cold]
    #[inline(never)]
    fn failed(&self, e: ProxyError, mut record: RequestRecord) -> Response<ResponseBody> {
        let kind = match e {
            ProxyError::UpstreamUnreachable { .. } => Some("unreachable"),
            ProxyError::UpstreamTimeout { .. } => Some("timeout"),
            _ => None,
        };
        if let Some(kind) = kind {
            record.upstream_error(kind);
            tracing::warn!(error = %e, "upstream request failed");
        }
        let status = e.status();
        record.status = status.as_u16();
        self.stats.count_status(status);
        e.response_with(|b| ResponseBody::full(b, record))
    }

    #[expect(clippy::manual_async_fn, reason = "no second copy of the request")]
    fn forward(
        &self,
        conn: &ConnInfo,
        mut req: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> impl Future<Output = Result<Sent, ProxyError>> {
        async move {
            // The held token is a read-mostly load; only without one does the request wait on a
            // grant (checked first: a bad request never waits for one), whose (large) future is
            // boxed so it does not weigh on every request's.
            let token = match self.tokens.valid(Duration::ZERO) {
                Some(t) => t,
                None => {
                    self.check(conn, &req)?;
                    Box::pin(self.tokens.get(Duration::ZERO))
                        .await
                        .map_err(token_unavailable)?
                }
            };
            // A body that may be replayed: its first frame, usually in with the head (polled
            // once; nothing waits here).
            let first = match self.keeps(req.body()) {
                true => {
                    Some(poll_fn(|cx| Poll::Ready(Pin::new(req.body_mut()).poll_frame(cx))).await)
                }
                false => None,
            };
            // HTTP/1 requests on a connection come one at a time and share its timer.
            let timer = (req.version() != Version::HTTP_2).then_some(&conn.timer);
            // Nothing waits from here to the send, so the head is edited on the stack: only what
            // outlives the send is kept in this future.
            let Prepared { req, replay, again } = self.prepare(conn, req, record, &token, first)?;
            let sent = self.send(req, record.start, timer).await?;
            if sent.0.status() != StatusCode::UNAUTHORIZED {
                return Ok(sent);
            }
            // Rare, and kept out of the common path's future.
            Box::pin(self.replay(sent, &token, replay, again, timer)).await
        }
    }

    /// The guards: the request's path (relative to the upstream's base) and session, or why it is
    /// refused. Run first by [`Forwarder::prepare`], and on their own before a wait for a grant.
    fn check<'r>(
        &self,
        conn: &ConnInfo,
        req: &'r Request<Incoming>,
    ) -> Result<(path::Resolved<'r>, Seen), ProxyError> {
        guard::check_method(req.method())?;
        if req.headers().len() > MAX_HEADERS {
            return Err(too_many_headers());
        }
        let rel = guard::target(req, conn.local.as_ref(), &self.upstream)?;
        let seen = Seen::scan(req.headers());
        if seen.origin {
            guard::check_origin(req.headers(), &self.allowed_origins)?;
        }
        Ok((path::resolve(rel)?, seen))
    }

    /// The guards, then the request as sent upstream: the URI built from the configured upstream,
    /// the head rewritten, the token in, and the body with its copy for a replay.
    fn prepare(
        &self,
        conn: &ConnInfo,
        req: Request<Incoming>,
        record: &mut RequestRecord,
        token: &Token,
        first: Option<First>,
    ) -> Result<Prepared, ProxyError> {
        let (path::Resolved { session, path }, seen) = self.check(conn, &req)?;
        let uri = self.upstream.target(req.uri(), &path)?;

        // The client's head is edited in place: its method and header map are the upstream
        // request's.
        let (mut parts, body) = req.into_parts();
        // The client's URI shares the connection's read buffer: let it go now, not when the
        // response head arrives (see `RequestRecord::logged`).
        drop(std::mem::replace(&mut parts.uri, uri));
        parts.version = Version::HTTP_11;
        parts.extensions.clear();
        let headers = &mut parts.headers;
        seen.strip(headers);
        // The client's `Authorization` is replaced below (`insert` drops every value it had);
        // nothing reads the headers before. The client's `Host` names this proxy: the pool
        // replaces it with the upstream's on HTTP/1.1 and removes it on h2 (where `:authority`
        // says it).
        if let Some(session) = session {
            headers.insert(X_SESSION_ID, session);
        } else if let Some(session) = &self.session_id {
            headers
                .entry(X_SESSION_ID)
                .or_insert_with(|| session.clone());
        }
        if let Some(l) = &mut record.logged {
            l.session = headers.get(X_SESSION_ID).cloned();
        }
        if seen.request_id {
            // Kept, unless `Connection` named it.
            headers.entry(X_REQUEST_ID).or_insert_with(request_id);
        } else {
            headers.append(X_REQUEST_ID, request_id());
        }
        headers.insert(AUTHORIZATION, token.bearer().clone());

        let (body, replay) = self.request_body(body, first)?;
        // The head is kept for a replay only when the body can be replayed.
        let again = match replay {
            Replay::No => None,
            _ => Some(Again::new(&parts.method, &parts.uri, &parts.headers)),
        };
        Ok(Prepared {
            req: Request::from_parts(parts, body),
            replay,
            again,
        })
    }

    /// Whether the body may be replayed, so its first frame is worth a look: there is one, a
    /// replay is allowed, and its announced length (if any) fits the limit.
    fn keeps(&self, body: &Incoming) -> bool {
        let limit = self.max_replay_body;
        !body.is_end_stream()
            && limit != 0
            && body.size_hint().upper().is_none_or(|n| n <= limit as u64)
    }

    /// The body to send upstream, and where its copy for a replay is. `first` is the first frame
    /// of a body that [`Forwarder::keeps`]. A body that fits the replay limit usually came in with
    /// its head: when it is whole in the first frame, it goes out as that frame and is kept by a
    /// reference count, with no tee.
    fn request_body(
        &self,
        body: Incoming,
        first: Option<First>,
    ) -> Result<(UpstreamBody, Replay), ProxyError> {
        let limit = self.max_replay_body;
        let first = match first {
            None if body.is_end_stream() => return Ok((UpstreamBody::Empty, Replay::Empty)),
            None => {
                let (b, _) = UpstreamBody::stream(None, body, self.idle_timeout, None);
                return Ok((b, Replay::No));
            }
            Some(Poll::Pending) => None,
            Some(Poll::Ready(None)) => return Ok((UpstreamBody::Empty, Replay::Empty)),
            Some(Poll::Ready(Some(Err(e)))) => return Err(body_failed(&e)),
            Some(Poll::Ready(Some(Ok(frame)))) => {
                if body.is_end_stream() && frame.data_ref().is_some_and(|d| d.len() <= limit) {
                    let whole = frame.into_data().expect("a data frame");
                    return Ok((
                        UpstreamBody::Full(Some(whole.clone())),
                        Replay::Whole(whole),
                    ));
                }
                Some(frame)
            }
        };
        let (b, kept) = UpstreamBody::stream(first, body, self.idle_timeout, Some(limit));
        Ok((b, kept.map_or(Replay::No, Replay::Kept)))
    }

    /// After a 401: the upstream refused the token. Replaces it (one grant shared by every
    /// request that saw it, rate-limited by the token source) so the next request works, and
    /// replays this one once if its whole body was kept. A second 401 goes back as is.
    async fn replay(
        &self,
        sent: Sent,
        token: &Arc<Token>,
        replay: Replay,
        again: Option<Box<Again>>,
        timer: Option<&ConnTimer>,
    ) -> Result<Sent, ProxyError> {
        let body = match replay {
            Replay::No => None,
            Replay::Empty => Some(UpstreamBody::Empty),
            Replay::Whole(b) => Some(UpstreamBody::Full(Some(b))),
            Replay::Kept(mut rx) => rx.try_recv().ok().map(UpstreamBody::replay),
        };
        let Some(new) = self.tokens.refresh_rejected(token).await else {
            return Ok(sent);
        };
        let (Some(body), Some(again)) = (body, again) else {
            return Ok(sent);
        };
        let Some(mut headers) = again.headers() else {
            return Ok(sent);
        };
        let Again { method, uri, .. } = *again;
        // The 401's body is not read: its connection closes rather than going back.
        drop(sent);
        self.stats.replays.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.replays.inc();
        }
        tracing::debug!("replaying a request the upstream answered 401 with a new token");
        headers.insert(AUTHORIZATION, new.bearer().clone());
        self.send(build(method, uri, headers, body), Instant::now(), timer)
            .await
    }

    /// Sends upstream, bounded until the response head by the upstream timeout from `start`, on
    /// the connection's timer when one is given (HTTP/1 clients), else on one of its own.
    fn send<'a>(
        &'a self,
        req: Request<UpstreamBody>,
        start: Instant,
        timer: Option<&'a ConnTimer>,
    ) -> impl Future<Output = Result<Sent, ProxyError>> + 'a {
        Exchange {
            fwd: self,
            sent: self.pool.send(req, start),
            deadline: after_from(start, self.upstream_timeout),
            timer,
            own: Lazy::default(),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Forwarder::send`]'s future: the pool's, polled in place (an `async` block would move it
    /// into a pinned slot of its own first; see [`Pool::send`]).
    struct Exchange<'a, S> {
        fwd: &'a Forwarder,
        #[pin]
        sent: S,
        deadline: Instant,
        timer: Option<&'a ConnTimer>,
        own: Lazy,
    }
}

impl<S> Future for Exchange<'_, S>
where
    S: Future<Output = Result<Sent, super::upstream::BoxError>>,
{
    type Output = Result<Sent, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = match this.sent.poll(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let expired = match this.timer {
                    Some(t) => t.poll_until(*this.deadline, cx),
                    None => this.own.poll_until(*this.deadline, cx),
                };
                return expired.map(|()| Err(this.fwd.timed_out()));
            }
        };
        Poll::Ready(outcome.map_err(|e| this.fwd.send_failed(&*e)))
    }
}

/// The errors of the send, out of line (see [`Forwarder::failed`]).
impl Forwarder {
    #[cold]
    #[inline(never)]
    fn timed_out(&self) -> ProxyError {
        ProxyError::UpstreamTimeout {
            authority: self.upstream.authority.to_string(),
            after: humantime::format_duration(self.upstream_timeout).to_string(),
        }
    }

    #[cold]
    #[inline(never)]
    fn send_failed(&self, e: &(dyn std::error::Error + 'static)) -> ProxyError {
        match client_body_failed(e) {
            Some(timed_out) => ProxyError::RequestBody {
                timed_out,
                reason: chain(e),
            },
            None => ProxyError::UpstreamUnreachable {
                authority: self.upstream.authority.to_string(),
                reason: chain(e),
            },
        }
    }
}

#[cold]
#[inline(never)]
fn too_many_headers() -> ProxyError {
    ProxyError::HeadersTooLarge(format!(
        "the request has more than {MAX_HEADERS} header fields"
    ))
}

#[cold]
#[inline(never)]
fn token_unavailable(e: impl std::fmt::Display) -> ProxyError {
    ProxyError::TokenUnavailable(e.to_string())
}

#[cold]
#[inline(never)]
fn body_failed(e: &hyper::Error) -> ProxyError {
    ProxyError::RequestBody {
        timed_out: false,
        reason: chain(e),
    }
}

fn build(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req
}

/// Removes the hop-by-hop headers and those `Connection` names.
#[cfg(test)]
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    Seen::scan(headers).strip(headers);
}

/// What one pass over a head's fields found: the hop-by-hop names, and the few others the
/// request path asks about (each a hashed look-up otherwise).
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// Which of [`HOP_BY_HOP`] are there (bit `i` for `HOP_BY_HOP[i]`).
    hop: u16,
    /// `Connection` lines: an HTTP/1.1 upstream sends one on nearly every response.
    connections: u32,
    origin: bool,
    request_id: bool,
    content_type: bool,
    /// The (first) `Content-Type` is `text/event-stream`.
    event_stream: bool,
}

impl Seen {
    fn scan(headers: &HeaderMap) -> Seen {
        let mut seen = Seen::default();
        for (name, value) in headers.iter() {
            match name.as_str() {
                "origin" => seen.origin = true,
                "x-request-id" => seen.request_id = true,
                "content-type" if !seen.content_type => {
                    seen.content_type = true;
                    seen.event_stream = value.as_bytes().starts_with(b"text/event-stream");
                }
                name => {
                    if let Some(i) = hop_by_hop_index(name) {
                        seen.hop |= 1 << i;
                        seen.connections += u32::from(i == 0);
                    }
                }
            }
        }
        seen
    }

    /// Removes the hop-by-hop headers found and those `Connection` names: usually none is
    /// there, and only those present cost a hashed removal.
    fn strip(&self, headers: &mut HeaderMap) {
        if self.hop == 0 {
            return;
        }
        // `HOP_BY_HOP[0]` is `Connection`: what it names goes too.
        if self.connections == 1 {
            if let Some(v) = headers.remove(CONNECTION) {
                remove_named(headers, &v);
            }
        } else if self.connections > 1 {
            remove_connection(headers);
        }
        for (i, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
            if self.hop & (1 << i) != 0 {
                headers.remove(name);
            }
        }
    }
}

/// The place of `name` in [`HOP_BY_HOP`]. A string match (length first, then the bytes) costs a
/// few instructions per name; comparing with each of the nine names in turn cost ~100.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "proxy-authorization" => 7,
        "proxy-authenticate" => 8,
        _ => return None,
    })
}

/// Removes the `Connection` lines, more than one, and the fields they name.
#[cold]
#[inline(never)]
fn remove_connection(headers: &mut HeaderMap) {
    let values: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
    headers.remove(CONNECTION);
    for v in &values {
        remove_named(headers, v);
    }
}

fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    // What an HTTP/1.1 server sends on nearly every response names nothing to remove.
    let whole = connection.as_bytes();
    if whole == b"keep-alive"
        || whole.eq_ignore_ascii_case(b"keep-alive")
        || whole.eq_ignore_ascii_case(b"close")
    {
        return;
    }
    let Ok(list) = connection.to_str() else {
        return;
    };
    for token in list.split(',') {
        let token = token.trim();
        // The usual values: `keep-alive` is removed anyway, `close` is no header. Skipping them
        // spares building a header name (an allocation) for each response of an HTTP/1.1 server.
        if token.is_empty()
            || token.eq_ignore_ascii_case("keep-alive")
            || token.eq_ignore_ascii_case("close")
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            headers.remove(name);
        }
    }
}

/// Each byte's two hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

/// 128 random bits in hex.
fn request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    for (pair, byte) in buf
        .chunks_exact_mut(2)
        .zip(fastrand::u128(..).to_ne_bytes())
    {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

/// `Some(timed_out)` when the upstream request failed because the client's body did (it broke
/// off, or went silent past `idle_timeout`): the client's fault, not the upstream's.
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> Option<bool> {
    let mut user = false;
    let mut timed_out = false;
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            user |= h.is_user();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        next = err.source();
    }
    user.then_some(timed_out)
}

/// An error and its sources, `: `-joined (hyper's errors say little at the top level).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HOST;

    #[test]
    fn the_head_kept_for_a_replay_comes_back_field_for_field_but_the_token() {
        let mut h = HeaderMap::new();
        let mut secret = HeaderValue::from_static("a=1");
        secret.set_sensitive(true);
        for (k, v) in [
            ("accept", HeaderValue::from_static("application/json")),
            ("x-stainless-lang", HeaderValue::from_static("js")),
            ("cookie", secret),
            ("x-multi", HeaderValue::from_static("one")),
            ("authorization", HeaderValue::from_static("Bearer old")),
            ("x-multi", HeaderValue::from_static("two, three")),
            ("x-obs", HeaderValue::from_bytes(b"caf\xe9\t!").unwrap()),
            ("x-empty", HeaderValue::from_static("")),
        ] {
            h.append(HeaderName::from_static(k), v);
        }
        let uri: Uri = "/base/v1/chat/completions?x=1".parse().unwrap();
        let again = Again::new(&Method::POST, &uri, &h);
        assert_eq!(
            again.fields.capacity(),
            again.fields.len(),
            "sized to what it keeps"
        );
        let back = again.headers().expect("the fields parse");
        h.remove(AUTHORIZATION);
        assert_eq!(back, h);
        let flags = |m: &HeaderMap| m.iter().map(|(_, v)| v.is_sensitive()).collect::<Vec<_>>();
        assert_eq!(flags(&back), flags(&h));
        assert!(back.get("cookie").unwrap().is_sensitive());
        assert_eq!((&again.method, &again.uri), (&Method::POST, &uri));
        assert_eq!(
            Again::new(&Method::GET, &uri, &HeaderMap::new()).headers(),
            Some(HeaderMap::new())
        );
        let mut broken = Again::new(&Method::GET, &uri, &h);
        broken.fields.truncate(broken.fields.len() - 1);
        assert_eq!(broken.headers(), None, "a cut buffer is no head");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("x-private", "1"),
            ("x-other", "1"),
            ("accept", "text/event-stream"),
            ("openai-beta", "assistants=v2"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "openai-beta"]);
    }

    #[test]
    fn one_connection_line_goes_with_the_fields_it_names() {
        for value in ["Keep-Alive, X-Private", "x-private", "keep-alive"] {
            let mut h = HeaderMap::new();
            for (k, v) in [
                ("x-private", "1"),
                ("connection", value),
                ("content-type", "application/json"),
            ] {
                h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            strip_hop_by_hop(&mut h);
            let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            let kept = value == "keep-alive";
            let want: &[&str] = if kept {
                &["x-private", "content-type"]
            } else {
                &["content-type"]
            };
            assert_eq!(left, want, "{value}");
        }
    }

    #[test]
    fn the_hop_by_hop_index_matches_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i), "{name}");
        }
        for name in [
            HOST,
            AUTHORIZATION,
            X_SESSION_ID,
            HeaderName::from_static("tea"),
        ] {
            assert_eq!(hop_by_hop_index(name.as_str()), None, "{name}");
        }
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} was kept");
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
    }

    #[test]
    fn the_upstream_target_is_the_base_path_then_the_path_and_the_clients_query() {
        let up = Upstream::from_url(&Url::parse("https://api.behest.test/base/").unwrap()).unwrap();
        assert_eq!(up.base, "/base");
        assert_eq!(up.port, 443);
        let client: Uri = "/s/job/v1/x?q=1".parse().unwrap();
        let uri = up.target(&client, "/v1/x").unwrap();
        assert_eq!(uri.to_string(), "/base/v1/x?q=1");
        // Origin form only: the authority is the pool's, whatever the path looks like.
        let client: Uri = "http://api.behest.test/base//evil.example/x"
            .parse()
            .unwrap();
        let uri = up.target(&client, "//evil.example/x").unwrap();
        assert_eq!(
            (uri.authority(), uri.path()),
            (None, "/base//evil.example/x")
        );

        let root = Upstream::from_url(&Url::parse("http://127.0.0.1:9/").unwrap()).unwrap();
        assert_eq!(root.base, "");
        for (client, path, want) in [
            // The client's own path and query, reused.
            ("/v1/models?limit=2", "/v1/models", "/v1/models?limit=2"),
            ("/v1/models?", "/v1/models", "/v1/models?"),
            (
                "http://127.0.0.1:9//evil.example/x",
                "//evil.example/x",
                "//evil.example/x",
            ),
            // A path the agent changed is built.
            (
                "/s/job/v1/models?limit=2",
                "/v1/models",
                "/v1/models?limit=2",
            ),
            ("/v1/a/../models", "/v1/models", "/v1/models"),
        ] {
            let uri = root.target(&client.parse().unwrap(), path).unwrap();
            assert_eq!(uri.authority(), None, "{client}");
            assert_eq!(uri.to_string(), want, "{client}");
        }
    }

    #[test]
    fn request_ids_are_random_hex() {
        let a = request_id();
        let b = request_id();
        assert_eq!(a.len(), 32);
        assert!(
            a.as_bytes()
                .iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        );
        assert_ne!(a, b);
        assert_eq!(
            (HEX_PAIRS[0x00], HEX_PAIRS[0x9f], HEX_PAIRS[0xa0]),
            (*b"00", *b"9f", *b"a0")
        );
    }
}
