//! Request smuggling and open-proxy probes against a running proxy, over raw TCP, through the
//! public API only (`Proxy` + `TokenSource` + the embedded IdP).
//!
//! The upstream here is a recording one ([`Recorder`]): it keeps every byte it was sent and every
//! request it parsed, so a probe can prove what reached it. A second listener ([`Evil`]) stands
//! for "another host": probes name it (absolute-form targets, `Host`, userinfo, `//host` paths,
//! `CONNECT`), and it must never see a connection. Every probe is either refused (a 4xx, or the
//! connection closed without an answer) or normalised (forwarded to the configured upstream under
//! its base path with the agent's bearer), never forwarded anywhere else.
//!
//! [`Rig`] is shared with `props`, whose TCP properties drive the same set-up.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use behest_agent::clock;
use behest_agent::config::ListenAddr;
use behest_agent::proxy::Proxy;
use behest_agent::token::TokenSource;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::util::Harness;

/// Turns a hang into a failure; never a timing assertion.
const HANG: Duration = Duration::from_secs(20);
/// The upstream's base path: every forwarded request must stay under it.
pub const BASE: &str = "/base";

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG, f).await.expect("the test hung")
}

// ---------------------------------------------------------------------------------------------
// The recording upstream

/// One request as the upstream parsed it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The request target as received (origin-form: path and query).
    pub target: String,
    pub path: String,
    pub query: Option<String>,
    /// Every field in arrival order, names lowercase, values as bytes (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Records what a stream reads, byte for byte.
struct Tap {
    io: TcpStream,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.raw
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1:0 that answers 200 `ok` and records everything.
pub struct Recorder {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    raw: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let raw: Arc<Mutex<Vec<u8>>> = Arc::default();
        let connections = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (s, r, c, st) = (seen.clone(), raw.clone(), connections.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let io = tokio::select! {
                    () = st.cancelled() => return,
                    a = listener.accept() => match a { Ok((io, _)) => io, Err(_) => continue },
                };
                c.fetch_add(1, Ordering::SeqCst);
                let seen = s.clone();
                let tap = Tap { io, raw: r.clone() };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let headers = parts
                                .headers
                                .iter()
                                .map(|(n, v)| {
                                    (
                                        n.as_str().to_string(),
                                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                    )
                                })
                                .collect();
                            seen.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                path: parts.uri.path().to_string(),
                                query: parts.uri.query().map(str::to_string),
                                headers,
                                body,
                            });
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                            resp.headers_mut()
                                .insert("content-type", "text/plain".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tap), service);
                    tokio::select! {
                        _ = conn => {}
                        () = st.cancelled() => {}
                    }
                });
            }
        });
        Recorder {
            addr,
            seen,
            raw,
            connections,
            stop,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Every byte any connection sent it.
    pub fn raw(&self) -> Vec<u8> {
        self.raw.lock().unwrap().clone()
    }
}

/// "Another host": a listener that only counts the connections it gets (it must get none).
pub struct Evil {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for Evil {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Evil {
    pub async fn start() -> Evil {
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
        Evil { addr, hits, stop }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy under test

/// The embedded IdP, a token source, the recording upstream at `http://ADDR/base`, an evil
/// listener, and the proxy serving on 127.0.0.1:0.
pub struct Rig {
    pub h: Harness,
    pub up: Recorder,
    pub evil: Evil,
    pub tokens: TokenSource,
    pub addr: SocketAddr,
    /// `Bearer <agent token>`, what the upstream must see, once, on every request.
    pub bearer: String,
    stop: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the client got back for one probe.
#[derive(Debug)]
pub struct Outcome {
    /// 0 when the connection closed without an answer.
    pub status: u16,
    pub text: String,
    /// Whether the proxy closed the connection after answering; only checked by
    /// [`Rig::probe_closing`] (an open connection costs a wait).
    pub closed: bool,
}

impl Outcome {
    pub fn refused(&self) -> bool {
        self.status == 0 || (400..500).contains(&self.status)
    }
}

impl Rig {
    pub async fn start() -> Rig {
        let h = Harness::start().await;
        let up = Recorder::start().await;
        let evil = Evil::start().await;
        let upstream = format!("http://{}{BASE}", up.addr);
        let settings = h.settings(&[
            ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0"),
            ("BEHEST_AGENT__PROXY__UPSTREAM", upstream.as_str()),
            ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
        ]);
        let tokens = TokenSource::new(&settings, clock::system()).expect("the token source");
        let token = within(tokens.get(Duration::ZERO))
            .await
            .expect("the agent gets a token from the embedded IdP");
        let bearer = token.bearer().to_str().unwrap().to_string();
        h.remember(bearer.trim_start_matches("Bearer "));
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
            evil,
            tokens,
            addr,
            bearer,
            stop,
            served: Some(served),
        }
    }

    /// A `Host` the proxy accepts: its own listen address.
    pub fn host(&self) -> String {
        self.addr.to_string()
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

    async fn probe_on(&self, bytes: &[u8]) -> (Outcome, TcpStream) {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let _ = s.write_all(bytes).await;
        let text = within(read_response(&mut s)).await;
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|t| t.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let out = Outcome {
            status,
            text,
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
        let before = self.up.count();
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
        assert_eq!(
            self.up.count(),
            before,
            "a refused request reached the upstream: {:?}",
            String::from_utf8_lossy(bytes)
        );
        self.assert_never_elsewhere();
        out
    }

    /// A probe that may be refused or served, and when served, served from the configured
    /// upstream only (one more request there, normalised).
    pub async fn assert_refused_or_normalised(&self, bytes: &[u8]) -> Outcome {
        let before = self.up.count();
        let out = self.probe(bytes).await;
        let what = String::from_utf8_lossy(bytes);
        assert!(
            out.refused() || (200..300).contains(&out.status),
            "{what:?}: {}",
            out.text
        );
        if out.refused() {
            assert_eq!(
                self.up.count(),
                before,
                "{what:?} was refused yet forwarded"
            );
        }
        self.assert_never_elsewhere();
        out
    }

    /// Every request the upstream saw was normalised: the configured authority in `Host`, a
    /// path under the base path, exactly one `Authorization` (the agent's), no
    /// `Proxy-Authorization`; and the evil listener saw nothing.
    pub fn assert_never_elsewhere(&self) {
        assert_eq!(
            self.evil.hits(),
            0,
            "a connection reached the evil listener"
        );
        let authority = self.up.addr.to_string();
        for r in self.up.seen() {
            assert_eq!(r.all("host"), [authority.as_str()], "{r:?}");
            assert!(
                under_base(&r.path),
                "the upstream path {:?} leaves {BASE}/: {r:?}",
                r.path
            );
            assert_eq!(r.all("authorization"), [self.bearer.as_str()], "{r:?}");
            assert!(r.all("proxy-authorization").is_empty(), "{r:?}");
        }
    }

    /// Stops the proxy and checks no secret reached the logs.
    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(s) = self.served.take() {
            within(s).await.unwrap();
        }
        self.h.assert_no_secrets_logged();
    }
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

async fn read_response(s: &mut TcpStream) -> String {
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

/// True when the peer closed the connection (EOF or reset) rather than keeping it open.
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn head(rig: &Rig, line: &str, fields: &str) -> String {
    format!("{line}\r\nHost: {}\r\n{fields}\r\n", rig.host())
}

// ---------------------------------------------------------------------------------------------
// Framing: Content-Length and Transfer-Encoding

/// A request line an upstream would take as a second request if the body framing were read two
/// ways; it must never arrive as one.
const SMUGGLED: &str = "GET /base/smuggled HTTP/1.1\r\nHost: evil.example\r\n\r\n";

fn assert_nothing_smuggled(rig: &Rig) {
    for r in rig.up.seen() {
        assert!(
            !r.path.contains("smuggled"),
            "a smuggled request arrived: {r:?}"
        );
    }
    rig.assert_never_elsewhere();
}

/// SPEC §4 (RFC 9112 §6.1, §6.3): a request with both `Content-Length` and `Transfer-Encoding`
/// is read as chunked with the length dropped (hyper's behaviour), or refused with 400; either way
/// the connection closes after its answer, so what follows is never read as a request, and no
/// upstream request carries both.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_or_refused_and_closes() {
    let rig = Rig::start().await;
    let chunked_then_smuggled = format!("0\r\n\r\n{SMUGGLED}");
    for fields in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "content-length: 0\r\ntransfer-encoding: chunked\r\n",
        "TRANSFER-ENCODING: chunked\r\nCONTENT-LENGTH: 58\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Transfer-Encoding:\tchunked\r\nContent-Length:\t5\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: abc\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5, 5\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 99999999999999999999999\r\n",
    ] {
        let req = head(&rig, "POST /v1/chat/completions HTTP/1.1", fields) + &chunked_then_smuggled;
        let out = rig.probe_closing(req.as_bytes()).await;
        assert!(matches!(out.status, 200 | 400), "{fields:?}: {}", out.text);
        assert!(out.closed, "{fields:?}: the connection stays open");
    }
    for r in rig.up.seen() {
        assert!(
            r.all("content-length").is_empty() || r.all("transfer-encoding").is_empty(),
            "an upstream request carries both: {r:?}"
        );
    }
    assert_nothing_smuggled(&rig);
    rig.finish().await;
}

#[tokio::test]
async fn two_different_content_lengths_are_refused_and_equal_ones_are_collapsed() {
    let rig = Rig::start().await;
    for fields in [
        "Content-Length: 3\r\nContent-Length: 4\r\n",
        "Content-Length: 3, 4\r\n",
        "Content-Length: 3, 3\r\n",
        "Content-Length: +3\r\n",
        "Content-Length: 0x3\r\n",
        "Content-Length: 3 3\r\n",
        "Content-Length: -3\r\n",
        "Content-Length: 18446744073709551616\r\n",
    ] {
        let req = head(&rig, "POST /v1/x HTTP/1.1", fields) + "abcd" + SMUGGLED;
        let out = rig.assert_refused_closing(req.as_bytes()).await;
        assert_eq!(out.status, 400, "{fields:?}: {}", out.text);
        assert!(out.closed, "{fields:?}: the connection stays open");
    }
    // The same length twice is one length (RFC 9110 §8.6): forwarded with one Content-Length.
    let req = head(
        &rig,
        "POST /v1/x HTTP/1.1",
        "Content-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n",
    ) + "abc";
    let out = rig.probe(req.as_bytes()).await;
    assert_eq!(out.status, 200, "{}", out.text);
    let seen = rig.up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].all("content-length"), ["3"]);
    assert_eq!(seen[0].body, b"abc");
    assert_nothing_smuggled(&rig);
    rig.finish().await;
}

#[tokio::test]
async fn transfer_encodings_other_than_a_final_chunked_are_refused() {
    let rig = Rig::start().await;
    for fields in [
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: \"chunked\"\r\n",
        "Transfer-Encoding: chunked;q=1\r\n",
        "Transfer-Encoding : chunked\r\n",
        "Transfer-Encoding\t: chunked\r\n",
        " Transfer-Encoding: chunked\r\n",
        "Transfer_Encoding: chunked\r\nContent-Length: 5\r\n",
    ] {
        let req = head(&rig, "POST /v1/x HTTP/1.1", fields) + "0\r\n\r\n" + SMUGGLED;
        let out = rig.probe_closing(req.as_bytes()).await;
        if fields.starts_with("Transfer_Encoding") {
            // Not a framing field at all: a Content-Length body of 5 bytes, then garbage that
            // hyper refuses as a second request. Only the first may reach the upstream.
            assert_eq!(out.status, 200, "{fields:?}: {}", out.text);
            continue;
        }
        assert!(out.refused(), "{fields:?}: {}", out.text);
        assert!(out.closed, "{fields:?}: the connection stays open");
    }
    // HTTP/1.0 has no chunked coding (RFC 9112 §6.1).
    let req = format!(
        "POST /v1/x HTTP/1.0\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        rig.host()
    );
    let out = rig.probe(req.as_bytes()).await;
    assert!(out.refused(), "{}", out.text);
    assert!(rig.up.count() <= 1);
    assert_nothing_smuggled(&rig);
    rig.finish().await;
}

#[tokio::test]
async fn obs_fold_and_bare_cr_header_lines_are_refused() {
    let rig = Rig::start().await;
    let evil = rig.evil.addr;
    for fields in [
        "X-Note: a\r\n Transfer-Encoding: chunked\r\n".to_string(),
        "X-Note: a\r\n\tContent-Length: 40\r\n".to_string(),
        format!("X-Forwarded-Host: a\r\n {evil}\r\n"),
        "X-Note: a\rTransfer-Encoding: chunked\r\n".to_string(),
        "X-Note: a\0b\r\n".to_string(),
        "X-No-Colon\r\n".to_string(),
    ] {
        let req = head(&rig, "POST /v1/x HTTP/1.1", &fields) + "0\r\n\r\n";
        let out = rig.assert_refused(req.as_bytes()).await;
        assert_eq!(out.status, 400, "{fields:?}: {}", out.text);
    }
    // A folded Host line.
    let req = format!("GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n {evil}\r\n\r\n");
    rig.assert_refused(req.as_bytes()).await;
    rig.finish().await;
}

#[tokio::test]
async fn a_body_that_looks_like_a_request_stays_a_body() {
    let rig = Rig::start().await;
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    // Content-Length body holding a request, then a chunked one holding another, then a real
    // request: exactly three requests reach the upstream, the bodies intact.
    let chunk = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let bytes = format!(
        "POST /v1/a HTTP/1.1\r\nHost: {h}\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}\
         POST /v1/b HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}\
         GET /v1/c HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n",
        h = rig.host(),
        n = SMUGGLED.len(),
    );
    s.write_all(bytes.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    within(s.read_to_end(&mut all)).await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 3, "{text}");
    let seen = rig.up.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/base/v1/a", "/base/v1/b", "/base/v1/c"]);
    assert_eq!(seen[0].body, SMUGGLED.as_bytes());
    assert_eq!(seen[1].body, SMUGGLED.as_bytes());
    assert_nothing_smuggled(&rig);
    rig.finish().await;
}

#[tokio::test]
async fn client_credentials_in_chunked_trailers_never_reach_the_upstream() {
    let rig = Rig::start().await;
    let req = head(
        &rig,
        "POST /v1/x HTTP/1.1",
        "Transfer-Encoding: chunked\r\nTrailer: Authorization, Proxy-Authorization, X-T\r\nTE: trailers\r\nConnection: close\r\n",
    ) + "3\r\nabc\r\n0\r\nAuthorization: Bearer sk-trailer-secret\r\nProxy-Authorization: Basic dHJhaWxlcg==\r\nX-T: 1\r\n\r\n";
    let out = rig.probe(req.as_bytes()).await;
    assert!(out.status == 200 || out.refused(), "{}", out.text);
    let raw = String::from_utf8_lossy(&rig.up.raw()).into_owned();
    assert!(!raw.contains("sk-trailer-secret"), "{raw}");
    assert!(!raw.contains("dHJhaWxlcg=="), "{raw}");
    rig.assert_never_elsewhere();
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Where the request goes: absolute-form, userinfo, `@`, `%2F`, dot segments, `//host`, Host

#[tokio::test]
async fn absolute_form_with_userinfo_never_reaches_another_host() {
    let rig = Rig::start().await;
    let (up, evil) = (rig.up.addr, rig.evil.addr);
    for target in [
        "http://user@evil.example/v1/models".to_string(),
        "http://user:pass@evil.example/base/v1/models".to_string(),
        format!("http://user@{evil}/base/v1/models"),
        format!("http://{up}@{evil}/base/v1/models"),
        format!("http://{up}:x@{evil}/base/v1/models"),
        format!("http://{evil}/base/v1/models"),
        format!("https://{evil}/base/v1/models"),
        format!("http://evil.example:{}/base/v1/models", up.port()),
        format!("http://127.0.0.2:{}/base/v1/models", up.port()),
        format!("http://[::1]:{}/base/v1/models", up.port()),
        format!("ftp://{evil}/base/v1/models"),
        format!("http://{evil}#@{up}/base/v1/models"),
        format!("http://{evil}%40{up}/base/v1/models"),
    ] {
        let req = head(&rig, &format!("GET {target} HTTP/1.1"), "");
        let out = rig.assert_refused(req.as_bytes()).await;
        assert_ne!(out.status, 0, "{target}: closed without an answer");
    }
    // Userinfo on the upstream's own authority: forwarded without it, to the configured host.
    for target in [
        format!("http://user@{up}/base/v1/models"),
        format!("http://{evil}@{up}/base/v1/models"),
    ] {
        let before = rig.up.count();
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert!(out.refused() || out.status == 200, "{target}: {}", out.text);
        if out.status == 200 {
            let seen = rig.up.seen();
            assert_eq!(seen.len(), before + 1);
            let last = seen.last().unwrap();
            assert_eq!(last.target, "/base/v1/models", "{target}");
            assert!(!rig.up.raw().windows(5).any(|w| w == b"user@"));
        }
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn at_sign_and_encoded_slash_tricks_in_paths_stay_under_the_base() {
    let rig = Rig::start().await;
    let evil = rig.evil.addr;
    let refused = [
        "/v1/models%2F..%2F..%2Fsecret".to_string(),
        "/%2F%2Fevil.example/v1/models".to_string(),
        format!("/%2f%2f{evil}/v1/models"),
        "/v1/..%2f..%2fsecret".to_string(),
        "/v1/%5c..%5c..%5csecret".to_string(),
        "/v1/%00".to_string(),
    ];
    for target in &refused {
        let req = head(&rig, &format!("GET {target} HTTP/1.1"), "");
        let out = rig.assert_refused(req.as_bytes()).await;
        assert_eq!(out.status, 400, "{target}: {}", out.text);
    }
    // `@` is an ordinary path character: forwarded as a path, never read as userinfo.
    for (target, path) in [
        (
            "/@evil.example/v1/models".to_string(),
            "/base/@evil.example/v1/models".to_string(),
        ),
        (
            format!("/user@{evil}/v1/models"),
            format!("/base/user@{evil}/v1/models"),
        ),
        (
            "/s/x@evil.example/v1/models".to_string(),
            "/base/v1/models".to_string(),
        ),
        (
            "/v1/models%40evil.example".to_string(),
            "/base/v1/models%40evil.example".to_string(),
        ),
        // A session id is a header value, never a path: its `/` and `..` go nowhere.
        (
            "/s/job%2F..%2F..%2F/v1/models".to_string(),
            "/base/v1/models".to_string(),
        ),
        (
            "/s/%2F/v1/models".to_string(),
            "/base/v1/models".to_string(),
        ),
    ] {
        let before = rig.up.count();
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert_eq!(out.status, 200, "{target}: {}", out.text);
        let seen = rig.up.seen();
        assert_eq!(seen.len(), before + 1, "{target}");
        assert_eq!(seen.last().unwrap().path, path, "{target}");
    }
    // Not a path at all.
    for target in [
        "@evil.example/v1/models".to_string(),
        format!("{evil}/v1/models"),
        "*".into(),
    ] {
        let req = head(&rig, &format!("GET {target} HTTP/1.1"), "");
        rig.assert_refused(req.as_bytes()).await;
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn percent_encoded_dot_segments_never_leave_the_base_path() {
    let rig = Rig::start().await;
    for target in [
        "/%2e%2e/secret",
        "/%2E%2E/secret",
        "/.%2e/secret",
        "/%2e./secret",
        "/v1/%2e%2e/%2e%2e/secret",
        "/v1/%2e%2e%2f%2e%2e/secret",
        "/s/job/%2e%2e/%2e%2e/secret",
        "/s/job/%2e%2e",
        "/./../secret",
        "/v1/..;/..;/secret",
        "/v1/%2e%2e;x/%2e%2e/secret",
        "/v1/%2e%2e%3b/secret/..",
        "/v1/..%00/..",
    ] {
        let req = head(&rig, &format!("GET {target} HTTP/1.1"), "");
        let out = rig.assert_refused(req.as_bytes()).await;
        assert_eq!(out.status, 400, "{target}: {}", out.text);
    }
    // Inside the base, dot segments are resolved before forwarding; a double-encoded one is
    // data, forwarded still encoded.
    for (target, path) in [
        ("/v1/x/%2e%2e/models", "/base/v1/models"),
        ("/s/job/v1/./x/../models", "/base/v1/models"),
        (
            "/v1/%252e%252e/%252e%252e/x",
            "/base/v1/%252e%252e/%252e%252e/x",
        ),
        ("/s/../v1/models", "/base/v1/models"),
    ] {
        let before = rig.up.count();
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert_eq!(out.status, 200, "{target}: {}", out.text);
        let seen = rig.up.seen();
        assert_eq!(seen.len(), before + 1);
        assert_eq!(seen.last().unwrap().path, path, "{target}");
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn double_slash_paths_are_paths_under_the_base_never_an_authority() {
    let rig = Rig::start().await;
    let evil = rig.evil.addr;
    for target in [
        "//evil.example/v1/models".to_string(),
        format!("//{evil}/v1/models"),
        format!("///{evil}/v1/models"),
        format!("/s/job//{evil}/v1/models"),
        format!("//user@{evil}/v1/models"),
    ] {
        let before = rig.up.count();
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert!(out.status == 200 || out.refused(), "{target}: {}", out.text);
        if out.status == 200 {
            let seen = rig.up.seen();
            assert_eq!(seen.len(), before + 1);
            assert!(seen.last().unwrap().path.starts_with("/base//"), "{target}");
        }
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn foreign_host_headers_are_refused_against_dns_rebinding() {
    let rig = Rig::start().await;
    let evil = rig.evil.addr;
    // What a browser sends after a DNS-rebinding attack: the attacker's name.
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{}", rig.addr.port()),
        "localhost.evil.example".to_string(),
        "127.0.0.1.evil.example".to_string(),
        "127.0.0.1.nip.io".to_string(),
        "0x7f000001.evil.example".to_string(),
        "[::ffff:192.0.2.1]".to_string(),
        "192.0.2.1".to_string(),
        "user@127.0.0.1".to_string(),
        "127.0.0.1@evil.example".to_string(),
        "".to_string(),
        "127.0.0.1:notaport".to_string(),
        format!("{}:{}", rig.addr.ip(), "99999"),
    ] {
        let req = format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let out = rig.assert_refused(req.as_bytes()).await;
        assert!(
            out.status == 403 || out.status == 400,
            "Host {host:?}: {}",
            out.text
        );
    }
    // Not host names a browser can send; whatever the verdict, the Host is never used to route.
    for host in [
        "evil.example#.localhost",
        "evil.example/.localhost",
        "evil.example:1@x.localhost",
    ] {
        let req = format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        rig.assert_refused(req.as_bytes()).await;
    }
    // Two Host fields, a loopback one first (RFC 9112 §3.2: 400).
    rig.assert_refused(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n")
        .await;
    // No Host at all on HTTP/1.1.
    rig.assert_refused(b"GET /v1/models HTTP/1.1\r\n\r\n").await;
    // A loopback Host naming the evil listener's port is this machine: served, but from the
    // configured upstream (the Host is replaced), never from the port it names.
    let before = rig.up.count();
    let req = format!("GET /v1/models HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n");
    let out = rig.probe(req.as_bytes()).await;
    assert_eq!(out.status, 200, "{}", out.text);
    assert_eq!(rig.up.count(), before + 1);
    // Two Host fields: RFC 9112 §3.2 asks for a 400; at the least the first must be checked and
    // the request must not go anywhere but the upstream.
    for hosts in [
        format!("Host: evil.example\r\nHost: {}", rig.host()),
        format!("Host: {}\r\nHost: evil.example", rig.host()),
    ] {
        let req = format!("GET /v1/models HTTP/1.1\r\n{hosts}\r\nConnection: close\r\n\r\n");
        let out = rig.probe(req.as_bytes()).await;
        assert!(
            out.refused() || out.status == 200,
            "{hosts:?}: {}",
            out.text
        );
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn connect_is_refused_and_never_tunnels() {
    let rig = Rig::start().await;
    let evil = rig.evil.addr;
    for target in [
        evil.to_string(),
        "evil.example:443".to_string(),
        rig.up.addr.to_string(),
        format!("http://{evil}/"),
    ] {
        // What a tunnel would carry follows the CONNECT head at once.
        let req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET /tunnelled HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        );
        let out = rig.assert_refused(req.as_bytes()).await;
        assert!(
            out.status == 405 || out.status == 400 || out.status == 403,
            "CONNECT {target}: {}",
            out.text
        );
    }
    for r in rig.up.seen() {
        assert!(!r.path.contains("tunnelled"), "{r:?}");
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn upgrade_requests_are_forwarded_without_upgrading() {
    let rig = Rig::start().await;
    for fields in [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    ] {
        let before = rig.up.count();
        let req = head(&rig, "GET /v1/models HTTP/1.1", fields)
            + "GET /after-upgrade HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        let out = rig.probe(req.as_bytes()).await;
        assert!(
            out.status == 200 || out.refused(),
            "{fields:?}: {}",
            out.text
        );
        if out.status == 200 {
            let last = rig.up.seen()[before].clone();
            assert!(last.all("upgrade").is_empty(), "{last:?}");
            assert!(
                last.all("connection")
                    .iter()
                    .all(|c| !c.to_ascii_lowercase().contains("upgrade"))
            );
        }
    }
    // The bytes after the head are never tunnelled: at most a request hyper parsed, refused for
    // its foreign Host.
    for r in rig.up.seen() {
        assert!(!r.path.contains("after-upgrade"), "{r:?}");
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn h2c_authority_never_chooses_the_upstream_host() {
    let rig = Rig::start().await;
    let evil = rig.evil.addr;
    let io = TcpStream::connect(rig.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for uri in [
        format!("http://{evil}/v1/models"),
        "http://evil.example/v1/models".to_string(),
        format!("https://user@{evil}/v1/models"),
    ] {
        let req = Request::builder()
            .uri(uri.as_str())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = within(send.send_request(req)).await.unwrap();
        statuses.push((uri, resp.status().as_u16()));
    }
    // A loopback `:authority` (the evil port is on 127.0.0.1) is served from the upstream; a
    // foreign one is refused.
    assert_eq!(statuses[0].1, 200, "{statuses:?}");
    assert_eq!(statuses[1].1, 403, "{statuses:?}");
    assert!(statuses[2].1 == 200 || statuses[2].1 == 403, "{statuses:?}");
    rig.assert_never_elsewhere();
    rig.finish().await;
}
