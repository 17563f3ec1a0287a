//! One request, from the client to the upstream and back, in the order of hyper's gateway example:
//! check the request (guards, path), rewrite it (upstream URI from the configuration, never from
//! the request; hop-by-hop headers and the client's credentials out, the agent's bearer token in),
//! send it, and map the response (hop-by-hop headers out, the body streamed and observed). A 401
//! is answered by one new token and one replay of a kept body. The bodies kept for a replay share
//! one budget ([`ReplayBudget`]): beyond it a body streams and is not kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, EXPECT, HOST,
    HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;

use super::body::{Account, Idle, IdleTimeout, Record, ResponseBody};
use super::error::ProxyError;
use super::upstream::{Busy, Lease, Pool};
use super::{Counters, UpstreamBase, guard, path};
use crate::keys::{self, API_KEY, KeyStore, X_API_KEY};
use crate::server::MAX_HEADERS;
use crate::token::TokenSource;
use crate::usage::{self, Accounting};

/// `X-Session-Id`: per-job cost attribution at Behest.
pub const X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
/// `X-Request-Id`: added when the client sent none, to correlate logs on both sides.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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

/// A request body on its way upstream: kept whole (for a replay), or streamed.
pub type UpstreamBody = Either<Full<Bytes>, Pin<Box<Idle<Incoming>>>>;

/// Where a profile's requests go and with which token.
pub struct Route {
    /// The profile's name (`default` for `[auth]`), for the ledger.
    pub name: Arc<str>,
    pub tokens: TokenSource,
    /// Shared with the other routes to the same upstream.
    pub pool: Arc<Pool>,
    pub upstream: UpstreamBase,
}

/// Everything a request needs, shared by all connections; replaced whole on reload.
pub struct Forwarder {
    /// `[auth]`'s route: a path without `/p/NAME/`.
    pub default: Route,
    /// `[profiles.NAME]`, by name: looked up only for a path with `/p/NAME/`.
    pub profiles: HashMap<Box<str>, Route>,
    /// `proxy.session_id`, sent when the client sent no session.
    pub session_id: Option<HeaderValue>,
    pub allowed_origins: Vec<String>,
    /// `proxy.allowed_hosts`: more names the Host guard accepts.
    pub allowed_hosts: Vec<String>,
    /// `proxy.require_key`: every request presents a local key from `keys`.
    pub require_key: bool,
    pub keys: OnceLock<Arc<KeyStore>>,
    /// Requests in flight at once, over every connection (`proxy.max_connections`): an h2c client
    /// cannot multiply the connection bound by its streams.
    pub max_requests: u64,
    pub max_replay_body: usize,
    pub replay_budget: ReplayBudget,
    pub upstream_timeout: Duration,
    /// Between two frames of a body, either way (`Duration::MAX`: none).
    pub idle_timeout: Duration,
    pub counters: Arc<Counters>,
}

/// What a replay needs: the head as sent (less the token) and the whole body, counted in the
/// replay budget until dropped.
struct Replay<'a> {
    head: http::request::Parts,
    body: Bytes,
    _kept: Option<Kept<'a>>,
}

/// The bytes of request bodies kept for a replay, all requests together, and their limit
/// (`proxy.replay_budget`). Without it, many concurrent requests held by a slow upstream would
/// each keep up to `max_replay_body` in memory.
pub struct ReplayBudget {
    limit: usize,
    used: AtomicUsize,
}

/// `n` bytes of the budget, given back when dropped.
struct Kept<'a> {
    budget: &'a ReplayBudget,
    n: usize,
}

impl ReplayBudget {
    pub fn new(limit: usize) -> ReplayBudget {
        ReplayBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes kept now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// `n` more bytes, when they fit.
    fn take(&self, n: usize) -> Option<Kept<'_>> {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before + n > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        Some(Kept { budget: self, n })
    }
}

impl Drop for Kept<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

impl Forwarder {
    /// Answers one request. Never fails: errors become OpenAI-shaped answers.
    pub async fn handle(
        self: Arc<Self>,
        local: Option<SocketAddr>,
        req: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let mut record = Record::new(self.counters.clone(), &req);
        // HTTP/1, and a body the client will send (with `Expect: 100-continue` it waits for a 100
        // that a refusal never sends).
        let h1 = req.version() < Version::HTTP_2;
        let expects_continue = req.headers().contains_key(EXPECT);
        let mut unread = None;
        match self.forward(local, req, &mut record, &mut unread).await {
            Ok((resp, lease)) => {
                let (mut parts, body) = resp.into_parts();
                // RFC 9112 §6.1: a Transfer-Encoding overrides a Content-Length, which a proxy
                // removes (the body goes on chunked: that length would not match it).
                if parts.headers.contains_key(TRANSFER_ENCODING) {
                    parts.headers.remove(CONTENT_LENGTH);
                }
                strip_hop_by_hop(&mut parts.headers);
                parts.version = Version::HTTP_11;
                let stream = parts
                    .headers
                    .get(CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                record.meter(parts.status, &parts.headers, body.size_hint().exact());
                record.responded(parts.status, stream);
                let body = Idle::new(self.idle_timeout, body);
                Response::from_parts(parts, ResponseBody::upstream(body, record, lease))
            }
            Err(e) => {
                if let Some(kind) = e.upstream_failure() {
                    record.upstream_error(kind);
                    tracing::warn!(error = %e, "upstream request failed");
                }
                record.responded(e.status(), false);
                let mut resp = e.response_with(ResponseBody::full);
                if h1
                    && let Some(body) = unread
                    && (expects_continue || !discard(body).await)
                {
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        }
    }

    /// Forwards `req`. Its body waits in `unread` until it is sent: a refusal before that leaves it
    /// there.
    async fn forward(
        &self,
        local: Option<SocketAddr>,
        req: Request<Incoming>,
        record: &mut Record,
        unread: &mut Option<Incoming>,
    ) -> Result<(Response<Incoming>, Option<Lease>), ProxyError> {
        let (head, body) = req.into_parts();
        *unread = Some(body);
        // This request is counted already.
        if self.counters.stats.in_flight.load(Ordering::Relaxed) > self.max_requests {
            return Err(ProxyError::Overloaded(self.max_requests));
        }
        // Checked before waiting for a token: a bad request never spends a grant.
        let req = Request::from_parts(head, ());
        let (route, session, uri) = self.check(local, &req)?;

        let (mut head, ()) = req.into_parts();
        head.uri = uri;
        head.version = Version::HTTP_11;
        head.extensions = http::Extensions::new();
        let headers = &mut head.headers;
        strip_hop_by_hop(headers);
        // The client's `Host` names this proxy; the client sets the upstream's from the URI.
        headers.remove(HOST);
        drop_underscored(headers);
        join_cookies(headers);
        if self.require_key {
            // The local key: the client's credential, not the upstream's (Authorization is
            // replaced by the token below).
            headers.remove(API_KEY);
            headers.remove(X_API_KEY);
        }
        if let Some(s) = session {
            headers.insert(X_SESSION_ID, s);
        } else if let Some(s) = &self.session_id {
            headers.entry(X_SESSION_ID).or_insert_with(|| s.clone());
        }
        record.session(headers.get(X_SESSION_ID));
        headers.entry(X_REQUEST_ID).or_insert_with(request_id);
        let accounting = self.accounting(&head);
        if let Some(accounting) = accounting {
            // A compressed body's usage cannot be read as it passes.
            head.headers
                .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            let session = usage::session_of(&head.headers);
            let request_id = head
                .headers
                .get(X_REQUEST_ID)
                .map_or_else(String::new, |v| {
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                });
            let path = head.uri.path().to_string();
            let admitted = accounting.admit(&session);
            record.account(Account::new(
                accounting.clone(),
                session.clone(),
                route.name.clone(),
                path,
                request_id,
            ));
            admitted.map_err(|r| ProxyError::BudgetExceeded {
                message: r.message(&session),
                retry_after: r.retry_after,
            })?;
        }

        // A grant's future is tens of KiB: boxed, it is made only when a request waits for one,
        // instead of being copied into every request's future.
        let token = match route.tokens.valid(Duration::ZERO) {
            Some(token) => token,
            None => Box::pin(route.tokens.get(Duration::ZERO))
                .await
                .map_err(|e| ProxyError::TokenUnavailable(e.to_string()))?,
        };
        head.headers.insert(AUTHORIZATION, token.bearer().clone());

        let body = unread.take().expect("the body is sent once");
        let (mut body, mut kept) = self.request_body(body).await?;
        if let (Some(accounting), Some((whole, _))) = (accounting, &kept) {
            record.request_model(usage::request_model(whole));
            if accounting.stream_include_usage()
                && matches!(
                    usage::endpoint(head.uri.path()),
                    Some("/chat/completions" | "/completions")
                )
                && whole.len() <= usage::read::MAX_JSON
                && let Some(asked) = usage::with_include_usage(whole)
            {
                head.headers.insert(CONTENT_LENGTH, asked.len().into());
                body = Either::Left(Full::new(asked.clone()));
                kept = kept.map(|(_, guard)| (asked, guard));
            }
        }
        let req = Request::from_parts(head, body);
        let replay = kept.map(|(body, kept)| Replay {
            head: clone_head(&req),
            body,
            _kept: kept,
        });
        let sent = self.send(route, req).await?;
        if sent.0.status() != StatusCode::UNAUTHORIZED {
            return Ok(sent);
        }

        // The upstream refused the token: replace it (one grant shared by every request that saw
        // it) so the next request works, and replay this one once if its body was kept.
        let Some(new) = Box::pin(route.tokens.refresh_rejected(&token)).await else {
            return Ok(sent);
        };
        let Some(Replay {
            mut head,
            body,
            _kept,
        }) = replay
        else {
            return Ok(sent);
        };
        // The 401's body is not read: its connection closes rather than going back.
        drop(sent);
        self.counters.stats.replays.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.counters.metrics.get() {
            m.replays.inc();
        }
        tracing::debug!("replaying a request the upstream answered 401 with a new token");
        head.headers.insert(AUTHORIZATION, new.bearer().clone());
        self.send(
            route,
            Request::from_parts(head, Either::Left(Full::new(body))),
        )
        .await
    }

    /// The accounting, when this request is one it counts (a `POST` to an accounted endpoint).
    fn accounting(&self, head: &http::request::Parts) -> Option<&Arc<Accounting>> {
        self.counters
            .accounting
            .get()
            .filter(|_| usage::accounted(&head.method, head.uri.path()))
    }

    /// The guards, then where the request goes: its profile's route (from `/p/NAME/`), its
    /// session (from `/s/ID/`) and the upstream URI.
    fn check(
        &self,
        local: Option<SocketAddr>,
        req: &Request<()>,
    ) -> Result<(&Route, Option<HeaderValue>, http::Uri), ProxyError> {
        guard::check_method(req.method())?;
        if req.headers().len() > MAX_HEADERS {
            return Err(ProxyError::HeadersTooLarge(format!(
                "the request has more than {MAX_HEADERS} header fields"
            )));
        }
        let rel = guard::target(req, local, &self.default.upstream, &self.allowed_hosts)?;
        guard::check_origin(req.headers(), &self.allowed_origins)?;
        guard::check_transfer_encoding(req.headers())?;
        let path::Resolved {
            profile,
            mut session,
            path,
        } = path::resolve(rel)?;
        check_session_header(req.headers())?;
        let route = if self.require_key {
            let key = match self.keys.get() {
                Some(store) => store.authenticate(req.headers())?,
                None => {
                    return Err(ProxyError::InvalidLocalKey(
                        "this proxy requires a local key but has no keys file".into(),
                    ));
                }
            };
            // A key bound to a session decides it, over `/s/ID/` and `X-Session-Id`.
            if let Some(s) = &key.session_header {
                session = Some(s.clone());
            }
            // A key bound to a profile selects it when the path names none; another is refused.
            let profile = keys::effective_profile(key.profile.as_deref(), profile)?;
            self.route(profile.as_deref())?
        } else {
            self.route(profile)?
        };
        Ok((
            route,
            session,
            route.upstream.uri(&path, req.uri().query())?,
        ))
    }

    /// The route of the profile named (`None`, or `default`: `[auth]`'s).
    fn route(&self, profile: Option<&str>) -> Result<&Route, ProxyError> {
        match profile {
            None | Some(crate::config::DEFAULT_PROFILE) => Ok(&self.default),
            Some(name) => self.profiles.get(name).ok_or_else(|| {
                ProxyError::UnknownProfile(if crate::config::valid_profile(name) {
                    let mut known: Vec<&str> = self.profiles.keys().map(|k| &**k).collect();
                    known.sort_unstable();
                    known.insert(0, crate::config::DEFAULT_PROFILE);
                    format!(
                        "the agent has no profile `{name}` (/p/{name}/); its profiles: {}",
                        known.join(", ")
                    )
                } else {
                    "the profile in /p/NAME/ is not a profile name (a-z, 0-9, `_`, `-`, at most 32)"
                        .to_string()
                })
            }),
        }
    }

    /// The body to send upstream, and its copy for a replay: a body whose announced length fits
    /// `max_replay_body` and the replay budget is read whole first (as nginx buffers request
    /// bodies); any other streams.
    async fn request_body(
        &self,
        body: Incoming,
    ) -> Result<(UpstreamBody, Option<(Bytes, Option<Kept<'_>>)>), ProxyError> {
        let body = Idle::new(self.idle_timeout, body);
        let kept = match body.size_hint().exact() {
            // No body: nothing to keep, nothing to count.
            Some(0) => None,
            Some(n) if n <= self.max_replay_body as u64 => {
                match self.replay_budget.take(n as usize) {
                    Some(kept) => Some(kept),
                    None => return Ok((Either::Right(Box::pin(body)), None)),
                }
            }
            _ => return Ok((Either::Right(Box::pin(body)), None)),
        };
        let whole = body
            .collect()
            .await
            .map_err(|e| body_failed(&*e))?
            .to_bytes();
        Ok((Either::Left(Full::new(whole.clone())), Some((whole, kept))))
    }

    /// Sends upstream; the response head is due within `upstream_timeout`.
    async fn send(
        &self,
        route: &Route,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), ProxyError> {
        match tokio::time::timeout(self.upstream_timeout, route.pool.send(req)).await {
            // Nothing asked to upgrade (the client's `Upgrade` is never forwarded): a 101 would
            // leave the client on a connection that speaks something else.
            Ok(Ok((resp, _))) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                Err(ProxyError::BadUpstreamResponse {
                    authority: route.upstream.authority.to_string(),
                    reason:
                        "it answered 101 Switching Protocols to a request that asked for no upgrade"
                            .to_string(),
                })
            }
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => match e.downcast_ref::<Busy>() {
                Some(busy) => Err(ProxyError::UpstreamBusy {
                    limit: busy.limit,
                    waited: humantime::format_duration(busy.waited).to_string(),
                }),
                // A head hyper cannot read (over 100 fields, say): it was reached, and answered
                // what no client could read either.
                None if unreadable_head(&*e) => Err(ProxyError::BadUpstreamResponse {
                    authority: route.upstream.authority.to_string(),
                    reason: format!("its response head cannot be read: {}", chain(&*e)),
                }),
                None => Err(body_failed_or(&*e, || ProxyError::UpstreamUnreachable {
                    authority: route.upstream.authority.to_string(),
                    reason: chain(&*e),
                })),
            },
            Err(_) => Err(ProxyError::UpstreamTimeout {
                authority: route.upstream.authority.to_string(),
                after: humantime::format_duration(self.upstream_timeout).to_string(),
            }),
        }
    }
}

/// Reads away the body of a request the proxy refused, so that its HTTP/1 connection stays
/// usable: a connection closed with a body still coming is reset, and the reset can take the
/// refusal with it. Only a body of known size up to 1 MiB, within 5 s; `false` otherwise (the
/// connection then closes, and says so).
async fn discard(body: Incoming) -> bool {
    const MAX: u64 = 1 << 20;
    if body.is_end_stream() {
        return true;
    }
    if body.size_hint().exact().is_none_or(|n| n > MAX) {
        return false;
    }
    let drain = async {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .unwrap_or(false)
}

/// `X-Session-Id` follows the rule of `/s/ID/` and `proxy.session_id` ([`path::valid_session`]),
/// and comes once: two would attribute one request to two sessions.
fn check_session_header(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut values = headers.get_all(X_SESSION_ID).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err(ProxyError::BadRequest(
            "the request has more than one X-Session-Id header; send one".to_string(),
        ));
    }
    if !path::valid_session(first.as_bytes()) {
        return Err(ProxyError::BadRequest(format!(
            "X-Session-Id must be 1 to {} visible ASCII characters",
            path::MAX_SESSION_ID
        )));
    }
    Ok(())
}

/// 128 random bits in hex (`format!` of a `u128` cost 4% of the proxy's instructions).
fn request_id() -> HeaderValue {
    let n = fastrand::u128(..);
    let hex: [u8; 32] =
        std::array::from_fn(|i| b"0123456789abcdef"[(n >> (124 - 4 * i)) as usize & 0xf]);
    HeaderValue::from_bytes(&hex).expect("hex digits are a valid header value")
}

/// The head of a request, for a replay (its extensions are not needed).
pub(super) fn clone_head<B>(req: &Request<B>) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy.into_parts().0
}

/// Removes the hop-by-hop headers and those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually none is there: one pass over the names costs less than nine hashed removals.
    if !headers.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    // What `Connection` names goes too (usually only `keep-alive` or `close`).
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Removes header names with an underscore, as nginx does by default: a server that maps `-` and
/// `_` to the same variable (CGI, many frameworks) could take one for a header the proxy set.
fn drop_underscored(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Joins the `Cookie` fields an HTTP/2 client may send apart into one, with `; ` (RFC 9113
/// §8.2.3): an HTTP/1.1 upstream takes only one (RFC 6265 §5.4).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, joined);
    }
}

/// The request failed because the client's body did (it broke off, or went silent past
/// `idle_timeout`): the client's fault, not the upstream's. Otherwise `other()`.
fn body_failed_or(
    e: &(dyn std::error::Error + 'static),
    other: impl FnOnce() -> ProxyError,
) -> ProxyError {
    let mut user = false;
    let mut timed_out = false;
    let mut next = Some(e);
    while let Some(err) = next {
        user |= err
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_user());
        timed_out |= err.is::<IdleTimeout>();
        next = err.source();
    }
    if user || timed_out {
        ProxyError::RequestBody {
            timed_out,
            reason: cause(e),
        }
    } else {
        other()
    }
}

/// Whether `e` is hyper failing to parse the upstream's response head.
fn unreadable_head(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source())
        .filter_map(|e| e.downcast_ref::<hyper::Error>())
        .any(hyper::Error::is_parse)
}

fn body_failed(e: &(dyn std::error::Error + 'static)) -> ProxyError {
    body_failed_or(e, || ProxyError::RequestBody {
        timed_out: false,
        reason: cause(e),
    })
}

/// What went wrong with a request body: the innermost cause, without the layers hyper wraps
/// around it ("error from user's Body stream", "error reading a body from connection").
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(inner) = e.source() {
        e = inner;
    }
    e.to_string()
}

/// An error and its sources, `: `-joined (hyper's errors say little at the top level).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
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
    s.push_str(crate::tls::tls_hint(e));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn request_ids_are_random_hex() {
        let (a, b) = (request_id(), request_id());
        assert_eq!(a.len(), 32);
        assert!(
            a.as_bytes()
                .iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn header_names_with_an_underscore_are_dropped() {
        let mut h = HeaderMap::new();
        for k in ["x_session_id", "x-session-id", "api_key", "accept"] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static("v"));
        }
        drop_underscored(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-session-id"]);
    }
}
