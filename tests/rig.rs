//! The proxy test rig, shared by `forwarding`, `smuggling` and `props`: the agent's proxy through
//! its public API (`Proxy` + `TokenSource`, tokens from the embedded IdP of a [`Harness`]) in front
//! of devkit's echo upstream at `http://ADDR/base`, which verifies every bearer as Behest does and
//! records what it received. A second listener ([`Evil`]) stands for "another host": probes name
//! it, and it must never see a connection.
//!
//! Clients are raw bytes on a `TcpStream` ([`Rig::probe`]) or hyper's own ([`Rig::send`]). Every
//! socket is bound to port 0; waits are on the upstream's changes or on the sockets, never on
//! sleeps (the timeouts here only turn a hang into a failure).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use behest_agent::clock;
use behest_agent::config::{ListenAddr, ProxySettings};
use behest_agent::proxy::Proxy;
use behest_agent::token::TokenSource;
use bytes::Bytes;
use devkit::upstream::{BearerKind, Recorded, Upstream, UpstreamOptions};
use http::Request;
use http_body::Body;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::util::{AUDIENCE, Harness, Start};

/// Turns a hang into a failure; never a timing assertion.
pub const HANG: Duration = Duration::from_secs(20);
/// The upstream's base path: every forwarded request must stay under it.
pub const BASE: &str = "/base";

pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG, f).await.expect("the test hung")
}

/// "Another host": a listener that only counts the connections it gets (it must get none).
pub struct Evil {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    _stop: DropGuard,
}

impl Evil {
    async fn start() -> Evil {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (h, st) = (hits.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = st.cancelled() => return,
                    a = listener.accept() => if a.is_ok() { h.fetch_add(1, Ordering::SeqCst); },
                }
            }
        });
        Evil {
            addr,
            hits,
            _stop: stop.drop_guard(),
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The IdP, the echo upstream, the evil listener and the proxy serving on 127.0.0.1:0 until
/// dropped.
pub struct Rig {
    pub h: Harness,
    /// devkit's echo upstream (whether or not the proxy was pointed elsewhere).
    pub up: Upstream,
    _up: DropGuard,
    pub evil: Evil,
    pub tokens: TokenSource,
    /// What the proxy was built with.
    pub settings: ProxySettings,
    pub proxy: Proxy,
    pub addr: SocketAddr,
    stop: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Edit<T> = Box<dyn FnOnce(&mut T)>;

/// How a [`Rig`] is set up: devkit's defaults and the proxy's unless told otherwise.
pub struct RigBuilder {
    upstream: Edit<UpstreamOptions>,
    alpn: Option<Vec<Vec<u8>>>,
    url: Option<String>,
    proxy: Edit<ProxySettings>,
}

impl RigBuilder {
    /// Changes the echo upstream's options (its SSE pacing…).
    pub fn upstream(mut self, edit: impl FnOnce(&mut UpstreamOptions) + 'static) -> Self {
        self.upstream = Box::new(edit);
        self
    }

    /// Serves the echo upstream over TLS offering `alpn` (a certificate for 127.0.0.1 from the
    /// test CA, which the proxy is told to trust).
    pub fn tls(mut self, alpn: &[&[u8]]) -> Self {
        self.alpn = Some(alpn.iter().map(|p| p.to_vec()).collect());
        self
    }

    /// Points the proxy at `url` instead of the echo upstream (a closed port, a raw responder).
    pub fn upstream_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Changes the proxy's settings.
    pub fn proxy(mut self, tweak: impl FnOnce(&mut ProxySettings) + 'static) -> Self {
        self.proxy = Box::new(tweak);
        self
    }

    pub async fn start(self) -> Rig {
        let h = Harness::start().await;
        let mut opts = UpstreamOptions::for_idp(&h.idp, AUDIENCE);
        (self.upstream)(&mut opts);
        let (up, up_stop, url) = match &self.alpn {
            None => {
                let (up, stop) = Upstream::start(opts).await.expect("the upstream starts");
                let url = format!("{}{BASE}", up.base_url());
                (up, stop, url)
            }
            Some(alpn) => {
                let (up, stop) = serve_tls(opts, alpn.clone()).await;
                let url = up.base_url().replace("http://", "https://") + BASE;
                (up, stop, url)
            }
        };
        let url = self.url.unwrap_or(url);
        let evil = Evil::start().await;
        let mut settings = h.settings(&[
            ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0"),
            ("BEHEST_AGENT__PROXY__UPSTREAM", url.as_str()),
            ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
        ]);
        if self.alpn.is_some() {
            settings.proxy.ca_file =
                Some(format!("{}/upstream-ca.pem", crate::util::FIXTURES).into());
        }
        (self.proxy)(&mut settings.proxy);
        let tokens = TokenSource::new(&settings, clock::system()).expect("the token source");
        let proxy = Proxy::new(&settings.proxy, tokens.clone()).expect("the proxy builds");
        let listeners = Proxy::bind(&settings.proxy.listen).await.unwrap();
        let ListenAddr::Tcp(addr) = listeners[0].local_addr().unwrap() else {
            unreachable!("a TCP listener")
        };
        let stop = CancellationToken::new();
        let (p, s) = (proxy.clone(), stop.clone());
        let served = tokio::spawn(async move { p.serve(listeners, s).await });
        Rig {
            h,
            up,
            _up: up_stop,
            evil,
            tokens,
            settings: settings.proxy,
            proxy,
            addr,
            stop,
            served: Some(served),
        }
    }
}

/// The echo upstream behind TLS with `alpn`, each connection served by hyper as ALPN decided.
async fn serve_tls(opts: UpstreamOptions, alpn: Vec<Vec<u8>>) -> (Upstream, DropGuard) {
    let mut config = crate::util::tls_server_config("upstream-cert.pem", "upstream-key.pem");
    config.alpn_protocols = alpn;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Upstream::new(listener.local_addr().unwrap(), opts);
    let stop = CancellationToken::new();
    let service = up.service(stop.clone());
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = s.cancelled() => return,
                a = listener.accept() => a.unwrap().0,
            };
            let (acceptor, service, s) = (acceptor.clone(), service.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tls), service.for_connection());
                tokio::select! {
                    _ = conn => {}
                    () = s.cancelled() => {}
                }
            });
        }
    });
    (up, stop.drop_guard())
}

/// What the client got back for one probe.
#[derive(Debug)]
pub struct Outcome {
    /// 0 when the connection closed without an answer.
    pub status: u16,
    pub text: String,
    /// The upstream received a request while this probe was answered: the answer is its.
    pub forwarded: bool,
    /// Whether the proxy closed the connection after answering; only checked by
    /// [`Rig::probe_closing`].
    pub closed: bool,
}

impl Outcome {
    /// The proxy answered with a 4xx itself, or closed the connection without an answer.
    pub fn refused(&self) -> bool {
        !self.forwarded && (self.status == 0 || (400..500).contains(&self.status))
    }
}

impl Rig {
    pub fn builder() -> RigBuilder {
        RigBuilder {
            upstream: Box::new(|_| {}),
            alpn: None,
            url: None,
            proxy: Box::new(|_| {}),
        }
    }

    /// Defaults everywhere.
    pub async fn start() -> Rig {
        Rig::builder().start().await
    }

    /// The proxy with `tweak`ed settings.
    pub async fn with(tweak: impl FnOnce(&mut ProxySettings) + 'static) -> Rig {
        Rig::builder().proxy(tweak).start().await
    }

    /// A `Host` the proxy accepts: its own listen address.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Where the echo upstream listens.
    pub fn up_addr(&self) -> SocketAddr {
        let url = self.up.base_url();
        url.trim_start_matches("http://")
            .parse()
            .expect("http://ADDRESS")
    }

    /// `host:port` of the echo upstream, what its `Host` must be.
    pub fn up_authority(&self) -> String {
        self.up_addr().to_string()
    }

    /// One of the proxy's `stats`, by its path in the JSON.
    pub fn stat(&self, path: &[&str]) -> u64 {
        let stats = self.proxy.stats();
        let mut v = &stats;
        for p in path {
            v = &v[*p];
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("stat {path:?} in {stats}"))
    }

    /// A request to the proxy with its `Host`.
    pub fn request(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.host())
    }

    /// Sends `req` on a new HTTP/1.1 connection to the proxy.
    pub async fn send<B>(&self, req: Request<B>) -> http::Response<Incoming>
    where
        B: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
    {
        send_on(TcpStream::connect(self.addr).await.unwrap(), req).await
    }

    pub async fn get(&self, path: &str) -> http::Response<Incoming> {
        self.send(
            self.request("GET", path)
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
    }

    /// Stops accepting; the returned task ends once the open connections are done.
    pub fn shut_down(&mut self) -> tokio::task::JoinHandle<()> {
        self.stop.cancel();
        self.served.take().expect("still serving")
    }

    /// Writes `bytes` on a new connection and reads one response (head plus `Content-Length`
    /// body).
    pub async fn probe(&self, bytes: &[u8]) -> Outcome {
        self.probe_on(bytes).await.0
    }

    /// `probe`, then whether the proxy closes the connection after its answer.
    pub async fn probe_closing(&self, bytes: &[u8]) -> Outcome {
        let (mut out, mut s) = self.probe_on(bytes).await;
        out.closed = out.status == 0 || closed(&mut s).await;
        out
    }

    /// `probe`, and the connection to go on with.
    pub async fn probe_on(&self, bytes: &[u8]) -> (Outcome, TcpStream) {
        let before = self.up.request_count();
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let _ = s.write_all(bytes).await;
        let text = within(read_response(&mut s)).await;
        let out = Outcome {
            status: status_of(&text),
            text,
            forwarded: self.up.request_count() > before,
            closed: false,
        };
        (out, s)
    }

    /// `probe` for a request that must be refused: a 4xx (or a close without an answer), and
    /// nothing reached the upstream.
    pub async fn assert_refused(&self, bytes: &[u8]) -> Outcome {
        self.assert_refused_with(bytes, false).await
    }

    /// `assert_refused`, and check whether the connection was closed ([`Outcome::closed`]).
    pub async fn assert_refused_closing(&self, bytes: &[u8]) -> Outcome {
        self.assert_refused_with(bytes, true).await
    }

    async fn assert_refused_with(&self, bytes: &[u8], closing: bool) -> Outcome {
        let out = if closing {
            self.probe_closing(bytes).await
        } else {
            self.probe(bytes).await
        };
        assert!(
            out.refused(),
            "refused expected for {:?}, got: {}",
            String::from_utf8_lossy(bytes),
            out.text
        );
        self.assert_never_elsewhere();
        out
    }

    /// `r` carried exactly one `Authorization`: a bearer the upstream verified as the IdP's
    /// token for this client (never one a client sent); and no `Proxy-Authorization`.
    pub fn carries_only_the_agents_bearer(&self, r: &Recorded) -> bool {
        r.header_values("authorization").len() == 1
            && r.bearer == BearerKind::Jwt
            && r.claims
                .as_ref()
                .is_some_and(|c| c["uid"] == self.h.client_id.as_str())
            && r.header_values("proxy-authorization").is_empty()
    }

    /// Every request the upstream saw was normalised: the configured authority in `Host`, a
    /// path under the base path, only the agent's bearer; and the evil listener saw nothing.
    pub fn assert_never_elsewhere(&self) {
        assert_eq!(
            self.evil.hits(),
            0,
            "a connection reached the evil listener"
        );
        let authority = self.up_authority();
        for r in self.up.requests() {
            assert_eq!(r.header_values("host"), [authority.as_str()], "{r:?}");
            assert!(
                under_base(path_of(&r)),
                "the upstream path {:?} leaves {BASE}/: {r:?}",
                r.path
            );
            assert!(self.carries_only_the_agents_bearer(&r), "{r:?}");
        }
    }

    /// Stops the proxy and checks no secret reached the logs.
    pub async fn finish(mut self) {
        within(self.shut_down()).await.unwrap();
        if let Some(t) = self.tokens.current() {
            self.h.remember(t.secret().expose_secret());
        }
        self.h.assert_no_secrets_logged();
    }
}

/// Sends one request on a new HTTP/1.1 connection over `io`.
pub async fn send_on<S, B>(io: S, req: Request<B>) -> http::Response<Incoming>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    within(sender.send_request(req))
        .await
        .expect("the proxy answers")
}

/// The path of a recorded request, without its query.
pub fn path_of(r: &Recorded) -> &str {
    r.path.split_once('?').map_or(r.path.as_str(), |(p, _)| p)
}

/// The query of a recorded request.
pub fn query_of(r: &Recorded) -> Option<&str> {
    r.path.split_once('?').map(|(_, q)| q)
}

/// `path` is under the base path once percent-decoded and dot segments are removed the way an
/// upstream server might (RFC 3986 §5.2.4, with `%2e` read as `.`).
pub fn under_base(path: &str) -> bool {
    let prefix = format!("{BASE}/");
    if !path.starts_with(&prefix) {
        return false;
    }
    let decoded: Vec<String> = path[1..]
        .split('/')
        .map(|seg| {
            percent_encoding::percent_decode_str(seg)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let mut kept: Vec<&str> = Vec::new();
    for seg in &decoded {
        // A decoded separator would make a new segment on a server that decodes before routing.
        if seg.contains('/') || seg.contains('\\') {
            return false;
        }
        match seg.as_str() {
            "." => {}
            ".." => {
                if kept.pop().is_none() {
                    return false;
                }
            }
            s => kept.push(s),
        }
    }
    kept.first() == Some(&&BASE[1..])
}

/// Reads one response: until the connection closes, or a head and its `Content-Length` body
/// (a head alone when it has none) arrived.
pub async fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                break;
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when the peer closes the connection (EOF or reset) rather than sending more or keeping
/// it open past [`HANG`].
pub async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(HANG, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The status of a raw HTTP/1.1 response; 0 for none.
pub fn status_of(text: &str) -> u16 {
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Lowercase hex SHA-256, to compare a body with the upstream's digest of it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
