//! The connections to the one configured upstream: idle HTTP/1.1 connections on a stack (the most
//! recently used first), or one HTTP/2 connection shared by every request once ALPN picked h2. A
//! request on HTTP/1.1 leases its connection until its response body was read to the end; only
//! then does it go back (a response cut short closes it); once idle past the idle timeout it is
//! closed. hyper-util's general client does this for any number of authorities; for one, its
//! hashed pool, the futures it moves and the task it spawns per request cost a fifth of the
//! proxy's instructions per request (callgrind, `GET` at 16 connections), so this is worth its
//! lines.
//!
//! At most `max_connections` upstream connections are open at once: each holds a semaphore permit
//! until it has closed (its task owns the permit). A request that needs a new connection when all
//! are taken waits up to `connect_timeout` for one to go back idle or close, then fails with [`Busy`].

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HOST, PROXY_AUTHORIZATION};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower_service::Service;

use super::forward::UpstreamBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest response head read from the upstream (status line and fields, or an h2 header
/// list); a larger one is a 502 `bad_upstream_response`. Envoy's default, and more than clients
/// take: the `h2` libraries refuse lists over 64 KiB.
pub const MAX_UPSTREAM_HEAD: usize = 64 * 1024;

/// The upstream's connections.
pub struct Pool {
    connector: HttpsConnector<Dial>,
    /// What the connector dials: the upstream's `scheme://authority/`, or the egress proxy's for
    /// an `http` upstream behind one.
    dial: Uri,
    /// The upstream's `scheme://authority/`.
    target: Uri,
    /// For an `http` upstream behind an egress proxy: requests go to the proxy in absolute form,
    /// with this `Proxy-Authorization` when it needs one.
    forward: Option<Option<HeaderValue>>,
    /// The egress proxy's URL without credentials, when there is one (for errors).
    via: Option<String>,
    /// The `Host` of HTTP/1.1 requests.
    host: HeaderValue,
    idle_timeout: Duration,
    max_idle: usize,
    /// One per open connection, held by its task until it closes.
    permits: Arc<Semaphore>,
    max_connections: usize,
    /// How long a new connection waits for a permit (`Duration::MAX`: no limit).
    permit_wait: Duration,
    /// How long opening a connection may take: TCP, an egress proxy's CONNECT, TLS.
    connect_timeout: Duration,
    /// Oldest first, each with the time it went idle.
    idle: Mutex<Vec<(http1::SendRequest<UpstreamBody>, Instant)>>,
    /// Told when a connection goes back idle: a request waiting for a slot takes it.
    returned: Notify,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
}

/// Where a request goes out: an idle connection, or a new one under this permit.
enum Slot {
    Idle(http1::SendRequest<UpstreamBody>),
    New(OwnedSemaphorePermit),
}

/// An HTTP/1.1 connection lent to one request; [`Lease::release`] gives it back.
pub struct Lease {
    pool: Weak<Pool>,
    tx: http1::SendRequest<UpstreamBody>,
}

impl Lease {
    /// The response body was read to its end: the connection can serve another request. Dropping
    /// a lease instead lets the connection close once hyper is done with it.
    pub fn release(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.tx);
        }
    }
}

/// Every upstream connection is taken and none came free within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("all {limit} upstream connections are in use")]
pub struct Busy {
    pub limit: usize,
    /// How long the request waited for one.
    pub waited: Duration,
}

/// How the pool bounds its connections.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Idle connections not reused after this long.
    pub idle_timeout: Duration,
    /// Idle connections kept at most.
    pub max_idle: usize,
    /// Open connections at most.
    pub max_connections: usize,
    /// How long a request waits for a connection to close when all are taken.
    pub permit_wait: Duration,
    /// How long opening a connection may take (`Duration::MAX`: no limit).
    pub connect_timeout: Duration,
}

/// Opening a connection (TCP, an egress proxy's `CONNECT`, TLS) took longer than allowed; the
/// egress proxy it went through, if any.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}no connection within {} (proxy.connect_timeout: TCP, any egress proxy's CONNECT and the TLS handshake together)",
    .1.as_ref().map(|p| format!("through the egress proxy {p}: ")).unwrap_or_default(),
    humantime::format_duration(*.0)
)]
pub struct SlowConnect(pub Duration, pub Option<String>);

enum Connected {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<Dial>,
        route: Route,
        host: HeaderValue,
        bounds: Bounds,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            connector,
            dial: route.dial,
            target: route.target,
            forward: route.forward,
            via: route.via,
            host,
            idle_timeout: bounds.idle_timeout,
            max_idle: bounds.max_idle,
            permits: Arc::new(Semaphore::new(bounds.max_connections)),
            max_connections: bounds.max_connections,
            permit_wait: bounds.permit_wait,
            connect_timeout: bounds.connect_timeout,
            idle: Mutex::default(),
            returned: Notify::new(),
            h2: Mutex::default(),
        });
        tokio::spawn(close_idle(Arc::downgrade(&pool)));
        pool
    }

    /// Sends `req` (an absolute URI) on the shared h2 connection, a pooled HTTP/1.1 one or a new
    /// one. A request whose pooled connection closed before it was written goes out on a new
    /// connection; so does a GET, HEAD or OPTIONS without a body whose pooled connection closed or
    /// reset before an answer (the upstream's keep-alive timeout firing as it was written), as
    /// nginx does. Any other failure is returned: a request with a body is never sent twice.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), BoxError> {
        if let Some(mut h2) = self.shared_h2() {
            return Ok((h2.send_request(req).await?, None));
        }
        let mut next = self.take_idle().map(Slot::Idle);
        loop {
            let slot = match next.take() {
                Some(slot) => slot,
                None => self.slot(is_repeatable(&req)).await?,
            };
            let mut tx = match slot {
                Slot::Idle(tx) => tx,
                // Connecting (TCP, TLS, the handshake) is a large future, boxed so that it does
                // not weigh on every request's.
                Slot::New(permit) => {
                    return match Box::pin(self.connect(permit)).await? {
                        Connected::H1(mut tx) => {
                            let resp = tx.send_request(self.h1_form(req)).await?;
                            Ok((resp, Some(self.lease(tx))))
                        }
                        Connected::H2(mut tx) => {
                            *self.h2.lock().expect("h2 lock") = Some(tx.clone());
                            Ok((tx.send_request(req).await?, None))
                        }
                    };
                }
            };
            let again = repeatable(&req);
            match tx.try_send_request(self.h1_form(req)).await {
                Ok(resp) => return Ok((resp, Some(self.lease(tx)))),
                Err(mut e) => match (e.take_message(), again) {
                    (Some(back), _) => req = self.absolute(back),
                    (None, Some(copy)) if closed_before_an_answer(e.error()) => req = copy,
                    (None, _) => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// An idle connection, else a permit for a new one; when every connection is taken, whichever
    /// comes first of one going back idle and one closing, waiting up to `permit_wait`. A
    /// connection that went back idle while waiting was answering a moment ago, and an upstream
    /// that closes after each answer without saying so closes it now: only a request that may be
    /// sent twice (`repeatable`) takes it; another closes it and takes the permit it frees.
    async fn slot(&self, repeatable: bool) -> Result<Slot, Busy> {
        let wait = async {
            // One acquire for the whole wait, so the request keeps its place in the queue.
            let permit = self.permits.clone().acquire_owned();
            tokio::pin!(permit);
            let mut waited = false;
            loop {
                // Asked for before looking, so a connection put back in between is not missed.
                let returned = self.returned.notified();
                tokio::pin!(returned);
                returned.as_mut().enable();
                match self.take_idle() {
                    Some(tx) if repeatable || !waited => return Slot::Idle(tx),
                    // Dropped: it closes, and its permit comes back.
                    Some(_) => {}
                    None => {}
                }
                tokio::select! {
                    permit = &mut permit => {
                        return Slot::New(permit.expect("the semaphore is never closed"));
                    }
                    () = returned => waited = true,
                }
            }
        };
        tokio::time::timeout(self.permit_wait, wait)
            .await
            .map_err(|_| Busy {
                limit: self.max_connections,
                waited: self.permit_wait,
            })
    }

    /// Upstream connections open (or being opened) now.
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.permits.available_permits()
    }

    /// A request put back in origin form, absolute again (an h2 connection needs it so).
    fn absolute(&self, mut req: Request<UpstreamBody>) -> Request<UpstreamBody> {
        let mut parts = self.target.clone().into_parts();
        parts.path_and_query = req.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        req.headers_mut().remove(HOST);
        req
    }

    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Connected, BoxError> {
        let connecting = self.connector.clone().call(self.dial.clone());
        let io = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| SlowConnect(self.connect_timeout, self.via.clone()))??;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_UPSTREAM_HEAD as u32)
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "upstream h2 connection ended with an error");
                }
            });
            return Ok(Connected::H2(tx));
        }
        let (tx, conn) = http1::Builder::new()
            .max_header_size(MAX_UPSTREAM_HEAD)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = conn.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(Connected::H1(tx))
    }

    fn shared_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let mut h2 = self.h2.lock().expect("h2 lock");
        match &*h2 {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }

    fn lease(self: &Arc<Self>, tx: http1::SendRequest<UpstreamBody>) -> Lease {
        Lease {
            pool: Arc::downgrade(self),
            tx,
        }
    }

    /// The most recently used idle connection that is still open and not idle past the timeout.
    fn take_idle(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().expect("idle lock");
        while let Some((tx, since)) = idle.pop() {
            if since.elapsed() >= self.idle_timeout {
                // The rest went idle earlier still: all past the timeout.
                idle.clear();
                return None;
            }
            if !tx.is_closed() {
                return Some(tx);
            }
        }
        None
    }

    /// Drops the idle connections past the idle timeout, which closes them.
    fn close_expired(&self) {
        let mut idle = self.idle.lock().expect("idle lock");
        let expired = idle.partition_point(|(_, since)| since.elapsed() >= self.idle_timeout);
        idle.drain(..expired);
    }

    fn put(&self, tx: http1::SendRequest<UpstreamBody>) {
        if !tx.is_ready() {
            return;
        }
        let mut idle = self.idle.lock().expect("idle lock");
        if idle.len() < self.max_idle {
            idle.push((tx, Instant::now()));
            drop(idle);
            self.returned.notify_one();
        }
    }
}

/// A GET, HEAD or OPTIONS without a body: the upstream may receive it twice.
fn is_repeatable(req: &Request<UpstreamBody>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && req.body().is_end_stream()
}

/// A copy of `req` to send again should its pooled connection close under it, when it is
/// [`is_repeatable`].
fn repeatable(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    if !is_repeatable(req) {
        return None;
    }
    let head = super::forward::clone_head(req);
    Some(Request::from_parts(
        head,
        Either::Left(Full::new(Bytes::new())),
    ))
}

/// The connection closed or was reset with no answer begun (not a response hyper could not read).
fn closed_before_an_answer(e: &hyper::Error) -> bool {
    e.is_incomplete_message()
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Closes the pool's idle connections once past its idle timeout (at most half that later), until
/// the pool is gone: an agent that falls idle after a burst keeps no upstream connection open.
async fn close_idle(pool: Weak<Pool>) {
    let Some(every) = pool.upgrade().map(|p| p.idle_timeout / 2) else {
        return;
    };
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.close_expired(),
            None => return,
        }
    }
}

/// An HTTP/1.1 request names its target in origin form, the authority in `Host`.
impl Pool {
    /// An HTTP/1.1 request as it goes on the wire: in origin form with the upstream's `Host`, or,
    /// to an egress proxy, in absolute form with its `Proxy-Authorization`.
    fn h1_form(&self, mut req: Request<UpstreamBody>) -> Request<UpstreamBody> {
        match &self.forward {
            None => {
                if let Some(pq) = req.uri().path_and_query().cloned() {
                    *req.uri_mut() = Uri::from(pq);
                }
            }
            Some(auth) => {
                if let Some(auth) = auth {
                    req.headers_mut().insert(PROXY_AUTHORIZATION, auth.clone());
                }
            }
        }
        req.headers_mut().insert(HOST, self.host.clone());
        req
    }
}

/// Where the pool connects and how its requests go, for the upstream and the egress in force.
pub struct Route {
    pub dial: Uri,
    pub target: Uri,
    pub forward: Option<Option<HeaderValue>>,
    /// The egress proxy's URL without credentials, when there is one (for errors).
    pub via: Option<String>,
}

impl Route {
    /// The route to `target` (`scheme://authority/`): direct, through a `CONNECT` tunnel for an
    /// `https` upstream behind a proxy, or in absolute form to the proxy for an `http` one. Also
    /// the connector it needs under TLS.
    pub fn new(target: Uri, egress: &crate::egress::Egress, tcp: HttpConnector) -> (Route, Dial) {
        let direct = |target: Uri, tcp| {
            (
                Route {
                    dial: target.clone(),
                    target,
                    forward: None,
                    via: None,
                },
                Dial::Direct(tcp),
            )
        };
        let Some(proxy) = egress.intercept(&target) else {
            return direct(target, tcp);
        };
        let shown = crate::egress::without_credentials(&proxy.uri().to_string());
        if target.scheme() == Some(&http::uri::Scheme::HTTPS) {
            let mut tunnel = Tunnel::new(proxy.uri().clone(), tcp);
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            let route = Route {
                dial: target.clone(),
                target,
                forward: None,
                via: Some(shown.clone()),
            };
            return (route, Dial::Tunnel(Box::new(tunnel), shown));
        }
        let route = Route {
            dial: proxy.uri().clone(),
            target,
            forward: Some(proxy.basic_auth().cloned()),
            via: Some(shown.clone()),
        };
        (route, Dial::Proxy(tcp, shown))
    }
}

/// What the TLS layer dials: a TCP connection to the upstream (or to an egress proxy that gets
/// absolute-form requests), or a `CONNECT` tunnel through the egress proxy (hyper-util's).
#[derive(Clone)]
pub enum Dial {
    Direct(HttpConnector),
    /// To the egress proxy, which gets absolute-form requests; its URL without credentials.
    Proxy(HttpConnector, String),
    /// The tunnel, and the proxy's URL without credentials (for errors).
    Tunnel(Box<Tunnel<HttpConnector>>, String),
}

type Dialed = TokioIo<tokio::net::TcpStream>;

impl Service<Uri> for Dial {
    type Response = Dialed;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Dialed, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Dial::Direct(c) | Dial::Proxy(c, _) => c.poll_ready(cx).map_err(Into::into),
            Dial::Tunnel(t, _) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Dial::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Dial::Proxy(c, proxy) => {
                let connecting = c.call(dst);
                let proxy = proxy.clone();
                Box::pin(async move {
                    connecting
                        .await
                        .map_err(|e| format!("through the egress proxy {proxy}: {e}").into())
                })
            }
            Dial::Tunnel(t, proxy) => {
                let connecting = t.call(dst);
                let proxy = proxy.clone();
                Box::pin(async move {
                    connecting.await.map_err(|e| {
                        let hint = if e.to_string().contains("unsuccessful") {
                            crate::egress::CONNECT_REFUSED
                        } else {
                            ""
                        };
                        format!("through the egress proxy {proxy}: {e}{hint}").into()
                    })
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    /// An `http` upstream behind a proxy is dialled at the proxy: a failure names it.
    #[tokio::test]
    async fn a_failure_to_reach_the_egress_proxy_names_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = format!("http://u:pw-secret@127.0.0.1:{port}");
        let egress = crate::egress::Egress {
            http: Some(SecretString::from(proxy.clone())),
            https: Some(SecretString::from(proxy)),
            no_proxy: "none.invalid".into(),
            source: "test".into(),
        };
        let (route, mut dial) = Route::new(
            Uri::from_static("http://upstream.example/"),
            &egress,
            HttpConnector::new(),
        );
        let e = dial.call(route.dial).await.err().unwrap().to_string();
        assert!(
            e.starts_with(&format!(
                "through the egress proxy http://127.0.0.1:{port}:"
            )),
            "{e}"
        );
        assert!(!e.contains("pw-secret"), "{e}");
    }

    /// A proxy that takes the connection but never answers the `CONNECT`: the timeout names it.
    #[tokio::test]
    async fn a_connect_timeout_through_the_egress_proxy_names_it() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                open.push(s);
            }
        });
        let proxy = SecretString::from(format!("http://127.0.0.1:{port}"));
        let egress = crate::egress::Egress {
            http: Some(proxy.clone()),
            https: Some(proxy),
            no_proxy: "none.invalid".into(),
            source: "test".into(),
        };
        let (route, dial) = Route::new(
            Uri::from_static("https://upstream.example/"),
            &egress,
            HttpConnector::new(),
        );
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config(None).unwrap())
            .https_or_http()
            .enable_http1()
            .wrap_connector(dial);
        let pool = Pool::new(
            https,
            route,
            HeaderValue::from_static("upstream.example"),
            Bounds {
                idle_timeout: Duration::from_secs(60),
                max_idle: 1,
                max_connections: 1,
                permit_wait: Duration::from_secs(1),
                connect_timeout: Duration::from_millis(200),
            },
        );
        let req = Request::get("https://upstream.example/v1/models")
            .body(Either::Left(Full::new(Bytes::new())))
            .unwrap();
        let e = pool.send(req).await.err().unwrap().to_string();
        assert!(
            e.starts_with(&format!(
                "through the egress proxy http://127.0.0.1:{port}: no connection within 200ms"
            )),
            "{e}"
        );
        held.abort();
    }
}
