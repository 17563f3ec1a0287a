//! Connections to the one configured upstream. There is a single authority, so no keyed pool:
//! idle HTTP/1.1 connections wait on a stack (the most recently used first, so the warm ones are
//! reused and the cold ones age out), and an HTTP/2 connection, when ALPN picks h2, is shared by
//! every request. A request on HTTP/1.1 leases its connection until its response body has been
//! read to the end; only then does the connection go back (a response cut short closes it).
//! Until ALPN has once picked HTTP/1.1, new connections are opened one at a time, so that a burst
//! of first requests to an h2 upstream shares one connection (and one TLS handshake).
//!
//! hyper-util's general client did the same for any number of authorities, at a measured cost on
//! every request: a hashed pool look-up, a large future moved several times, and a task spawned
//! per HTTP/1 request to put the connection back.

use std::future::Future;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

use super::body::UpstreamBody;
use super::timer::after_from;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream's connections.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    /// The `Host` of HTTP/1.1 requests.
    host: HeaderValue,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Idle>,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    /// An h2 connection was ever shared: until then, requests do not look at `h2` (a lock).
    h2_seen: AtomicBool,
    /// Taken by a connect whose protocol is not known yet, so that requests needing a
    /// connection meanwhile wait for it: a burst of first requests to an h2 upstream then opens
    /// one connection, not one each (a TLS handshake each, on a real upstream).
    connect_turn: tokio::sync::Mutex<()>,
    /// ALPN picked HTTP/1.1, or the upstream is plain http: connects need not take turns.
    h1_known: AtomicBool,
    /// The last connect failed.
    connect_failed: AtomicBool,
}

enum Connected {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

#[derive(Default)]
struct Idle {
    /// Oldest first; taken from the end. Each with when its idle time is over.
    conns: Vec<(http1::SendRequest<UpstreamBody>, Instant)>,
    /// A task closes the connections idle past `idle_timeout` while there are any.
    reaper: bool,
}

/// An HTTP/1.1 connection lent to one request; [`Lease::release`] gives it back.
pub struct Lease {
    pool: Weak<Pool>,
    tx: http1::SendRequest<UpstreamBody>,
}

impl Lease {
    /// The response body was read to its end (`now`): the connection can serve another request.
    /// Dropping a lease instead lets the connection close once hyper is done with it.
    pub fn release(self, now: Instant) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.tx, now);
        }
    }
}

/// How a request went out: on HTTP/1.1 with the connection it holds, or on the shared h2 one.
pub type Sent = (Response<Incoming>, Option<Lease>);

/// What hyper answers a request on an HTTP/1 connection with: the response, or the request back
/// when the connection closed before writing it.
pub type Answer = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>;

pin_project_lite::pin_project! {
    /// [`Pool::send`]'s future.
    #[project = SendingProj]
    pub enum Sending<'a, A, H> {
        /// Written to a kept-alive HTTP/1 connection; waiting for the answer.
        H1 {
            pool: &'a Arc<Pool>,
            tx: Option<http1::SendRequest<UpstreamBody>>,
            #[pin]
            answer: A,
        },
        /// On the shared h2 connection.
        H2 {
            #[pin]
            answer: H,
        },
        /// The request could not be made (its h2 URI).
        Failed {
            error: Option<BoxError>,
        },
        /// Connecting (TCP, TLS, the HTTP handshake) makes a large future. Boxed, it does not
        /// weigh on every request's future, which hyper keeps allocated for as long as the client
        /// connection lives (measured with 1,000 open streams: 4 MiB less).
        Other {
            sent: Pin<Box<dyn Future<Output = Result<Sent, BoxError>> + Send + 'a>>,
        },
    }
}

impl<A, H> Future for Sending<'_, A, H>
where
    A: Future<Output = Answer>,
    H: Future<Output = hyper::Result<Response<Incoming>>>,
{
    type Output = Result<Sent, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let again = match self.as_mut().project() {
            SendingProj::H2 { answer } => {
                return answer.poll(cx).map(|r| Ok((r?, None)));
            }
            SendingProj::Failed { error } => {
                return Poll::Ready(Err(error.take().expect("Sending polled after it finished")));
            }
            SendingProj::Other { sent } => return sent.as_mut().poll(cx),
            SendingProj::H1 { pool, tx, answer } => match ready!(answer.poll(cx)) {
                Ok(resp) => {
                    let tx = tx.take().expect("Sending polled after it finished");
                    return Poll::Ready(Ok((resp, Some(pool.lease(tx)))));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was closing. Another one gets it.
                    Some(back) => pool.send_again(back),
                    None => return Poll::Ready(Err(e.into_error().into())),
                },
            },
        };
        self.set(Sending::Other {
            sent: Box::pin(again),
        });
        self.poll(cx)
    }
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        target: Uri,
        host: HeaderValue,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            host,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Idle::default()),
            h2: Mutex::new(None),
            h2_seen: AtomicBool::new(false),
            connect_turn: tokio::sync::Mutex::new(()),
            // Plain http has no ALPN: always HTTP/1.1 (h2c upstreams are not spoken to).
            h1_known: AtomicBool::new(target.scheme() == Some(&http::uri::Scheme::HTTP)),
            connect_failed: AtomicBool::new(false),
            target,
        })
    }

    /// Sends `req` (an origin-form URI: the path and query) on a pooled connection or a new one.
    /// A request that could not be written because its pooled connection had closed meanwhile is
    /// sent again on another; any other failure is returned.
    ///
    /// The common case, a kept-alive connection, takes the request here, before the future is
    /// made: the future holds hyper's receiver of the answer, not the request on its way. (It
    /// lives in the client connection's memory, which with many connections open is not in the
    /// cache: every byte written there costs; see `Forwarder::handle`.)
    pub fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        now: Instant,
    ) -> Sending<
        '_,
        impl Future<Output = Answer>,
        impl Future<Output = hyper::Result<Response<Incoming>>>,
    > {
        if let Some(tx) = self.shared_h2() {
            return match self.send_h2(tx, req) {
                Ok(answer) => Sending::H2 { answer },
                Err(e) => Sending::Failed { error: Some(e) },
            };
        }
        match self.take_idle(now) {
            Some(mut tx) => {
                req.headers_mut().insert(HOST, self.host.clone());
                let answer = tx.try_send_request(req);
                Sending::H1 {
                    pool: self,
                    tx: Some(tx),
                    answer,
                }
            }
            None => Sending::Other {
                sent: Box::pin(self.send_again(req)),
            },
        }
    }

    /// [`Pool::send`], waiting for what it must: a request that came back from a closing
    /// connection, or one with no idle connection to take it.
    async fn send_again(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Sent, BoxError> {
        loop {
            if let Some(tx) = self.shared_h2() {
                return Ok((self.send_h2(tx, req)?.await?, None));
            }
            let Some(mut tx) = self.take_idle(Instant::now()) else {
                break;
            };
            req.headers_mut().insert(HOST, self.host.clone());
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(self.lease(tx)))),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was closing. Another one gets it.
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        self.send_on_new(req).await
    }

    async fn send_on_new(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Sent, BoxError> {
        // Until ALPN has picked HTTP/1.1 once, connects take turns: the one before may have
        // brought an h2 connection to share. After a failed connect they don't (each request
        // would otherwise wait out the failures of all those before it).
        let mut turn = None;
        if !self.h1_known.load(Ordering::Relaxed) {
            let t = self.connect_turn.lock().await;
            if let Some(tx) = self.shared_h2() {
                drop(t);
                return Ok((self.send_h2(tx, req)?.await?, None));
            }
            if !self.connect_failed.load(Ordering::Relaxed)
                && !self.h1_known.load(Ordering::Relaxed)
            {
                turn = Some(t);
            }
        }
        let connected = self.connect().await;
        self.connect_failed
            .store(connected.is_err(), Ordering::Relaxed);
        match connected? {
            Connected::H2(tx) => {
                *self.h2.lock().expect("pool lock") = Some(tx.clone());
                self.h2_seen.store(true, Ordering::Release);
                drop(turn);
                Ok((self.send_h2(tx, req)?.await?, None))
            }
            Connected::H1(mut tx) => {
                self.h1_known.store(true, Ordering::Relaxed);
                drop(turn);
                req.headers_mut().insert(HOST, self.host.clone());
                poll_fn(|cx| tx.poll_ready(cx)).await?;
                let resp = tx.send_request(req).await?;
                Ok((resp, Some(self.lease(tx))))
            }
        }
    }

    /// A new connection, in the protocol ALPN picked; its task is spawned.
    async fn connect(&self) -> Result<Connected, BoxError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(self.target.clone()).await?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "upstream h2 connection ended with an error");
                }
            });
            return Ok(Connected::H2(tx));
        }
        // One buffer per write, not a vectored write: see the proxy listener's builder.
        let (tx, conn) = http1::Builder::new().writev(false).handshake(io).await?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(Connected::H1(tx))
    }

    /// Sends `req` on the shared h2 connection: `:scheme` and `:authority` from the
    /// configuration, no `Host` (the client's named this proxy). The request goes to hyper now
    /// (an h2 connection takes any number; the h2 layer queues streams past the peer's limit).
    fn send_h2(
        &self,
        mut tx: http2::SendRequest<UpstreamBody>,
        mut req: Request<UpstreamBody>,
    ) -> Result<impl Future<Output = hyper::Result<Response<Incoming>>> + use<>, BoxError> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = self.target.scheme().cloned();
        parts.authority = self.target.authority().cloned();
        *req.uri_mut() = Uri::from_parts(parts)?;
        req.headers_mut().remove(HOST);
        Ok(tx.send_request(req))
    }

    fn lease(self: &Arc<Self>, tx: http1::SendRequest<UpstreamBody>) -> Lease {
        Lease {
            pool: Arc::downgrade(self),
            tx,
        }
    }

    /// The shared h2 connection while it is open.
    fn shared_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        if !self.h2_seen.load(Ordering::Acquire) {
            return None;
        }
        let mut h2 = self.h2.lock().expect("pool lock");
        match &*h2 {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }

    /// The most recently used idle connection that can take a request now. Those idle too long,
    /// closed, or not ready (still finishing an exchange) are dropped on the way.
    fn take_idle(&self, now: Instant) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((mut tx, expires)) = idle.conns.pop() {
            if expires <= now {
                // The rest are older still.
                idle.conns.clear();
                return None;
            }
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            if let Poll::Ready(Ok(())) = tx.poll_ready(&mut cx) {
                return Some(tx);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, tx: http1::SendRequest<UpstreamBody>, now: Instant) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.conns.len() >= self.max_idle {
            return;
        }
        idle.conns.push((tx, after_from(now, self.idle_timeout)));
        if !std::mem::replace(&mut idle.reaper, true) {
            let pool = Arc::downgrade(self);
            let every = self.idle_timeout;
            tokio::spawn(reap(pool, every));
        }
    }
}

/// Closes the connections idle past the timeout, every `every`, until none is left (the next
/// [`Pool::put`] starts it again) or the pool is gone.
async fn reap(pool: Weak<Pool>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().expect("pool lock");
        let now = Instant::now();
        idle.conns
            .retain(|(tx, expires)| *expires > now && !tx.is_closed());
        if idle.conns.is_empty() {
            idle.reaper = false;
            return;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use hyper_rustls::HttpsConnectorBuilder;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::{Notify, oneshot};

    fn pool_for(addr: std::net::SocketAddr) -> Arc<Pool> {
        crate::tls::install_default_provider();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config(None).unwrap())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let target: Uri = format!("http://{addr}/").parse().unwrap();
        let host = HeaderValue::from_str(&addr.to_string()).unwrap();
        Pool::new(https, target, host, Duration::from_secs(30), 8)
    }

    fn get() -> Request<UpstreamBody> {
        Request::get("/v1/models")
            .body(UpstreamBody::Empty)
            .unwrap()
    }

    /// Reads one request head and answers `{}`.
    pub(in crate::proxy) async fn answer(s: &mut tokio::net::TcpStream) -> bool {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        assert!(
            head.starts_with(b"GET /v1/models HTTP/1.1\r\n"),
            "origin form"
        );
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_request_on_a_pooled_connection_closed_meanwhile_goes_out_on_a_new_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let close_first = Arc::new(Notify::new());
        let (closed_tx, closed_rx) = oneshot::channel();
        let (n, close) = (accepted.clone(), close_first.clone());
        tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.unwrap();
            n.fetch_add(1, Ordering::SeqCst);
            assert!(answer(&mut first).await);
            close.notified().await;
            drop(first);
            closed_tx.send(()).unwrap();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move { while answer(&mut s).await {} });
            }
        });
        let pool = pool_for(addr);

        let (resp, lease) = pool.send(get(), Instant::now()).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "{}");
        lease
            .expect("HTTP/1.1 leases its connection")
            .release(Instant::now());
        // The server closes the idle connection; the request that follows runs before the
        // connection's task has seen the end of the stream, so it is queued on it, handed back
        // unsent, and sent again on a new connection.
        close_first.notify_one();
        closed_rx.await.unwrap();
        let (resp, _) = pool.send(get(), Instant::now()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "{}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (eof_tx, mut eof_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let eof = eof_tx.clone();
                tokio::spawn(async move {
                    while answer(&mut s).await {}
                    let _ = eof.send(());
                });
            }
        });
        let pool = pool_for(addr);
        let (resp, lease) = pool.send(get(), Instant::now()).await.unwrap();
        resp.into_body().collect().await.unwrap();
        lease.unwrap().release(Instant::now());
        assert_eq!(pool.idle.lock().unwrap().conns.len(), 1);
        // The reaper closes it within twice the timeout; the server sees the end of the stream.
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(pool.idle.lock().unwrap().conns.is_empty());
        eof_rx.recv().await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_idle_for_the_idle_timeout_is_not_taken_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move { while answer(&mut s).await {} });
            }
        });
        let pool = pool_for(addr);
        let released = Instant::now();
        for (idle, taken) in [(29, true), (30, false)] {
            let (resp, lease) = pool.send(get(), Instant::now()).await.unwrap();
            resp.into_body().collect().await.unwrap();
            lease.unwrap().release(released);
            let later = released + Duration::from_secs(idle);
            assert_eq!(pool.take_idle(later).is_some(), taken, "idle {idle} s");
            assert!(pool.idle.lock().unwrap().conns.is_empty());
        }
    }
}
