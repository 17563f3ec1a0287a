//! The proxy end to end on loopback: a real client (hyper, or raw bytes on a `TcpStream`), the
//! proxy, a tiny hyper upstream started per test, and the embedded IdP behind a real
//! [`TokenSource`]. Every socket is bound to port 0; waits are on channels, never on sleeps (the
//! timeouts below only turn a hang into a failure).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::*;
use crate::config::{LoadOptions, ProxySettings};
use devkit::idp::{Fault, Idp, IdpOptions};

const CLIENT_ID: &str = "proxy-test-client";
const SECRET: &str = "proxy-test-secret-do-not-log";
const AUDIENCE: &str = "https://api.behest.test";
/// Turns a hang into a failure; never a timing assertion.
const HANG: Duration = Duration::from_secs(20);

type TestBody = BoxBody<Bytes, Infallible>;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG, f).await.expect("the test hung")
}

// ---------------------------------------------------------------------------------------------
// The upstream

/// A body fed through a channel, one frame per message.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

/// FNV-1a, to compare large bodies without keeping two copies around.
fn fnv(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// Answers 200 with what it received: method, path, query, headers (name → values), body
/// length and checksum.
async fn echo(req: Request<Incoming>) -> Response<TestBody> {
    let (parts, mut body) = req.into_parts();
    let (mut len, mut sum) = (0u64, FNV0);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return full(StatusCode::BAD_REQUEST, "the request body broke off");
        };
        if let Ok(d) = frame.into_data() {
            len += d.len() as u64;
            sum = fnv(sum, &d);
        }
    }
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<Value> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| json!(String::from_utf8_lossy(v.as_bytes())))
            .collect();
        headers.insert(name.as_str().to_string(), Value::Array(values));
    }
    let v = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": len,
        "body_sum": format!("{sum:016x}"),
    });
    let mut r = full(StatusCode::OK, v.to_string());
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert("x-upstream", "yes".parse().unwrap());
    r
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// A hyper server on 127.0.0.1:0 that counts requests and answers with `handler`.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    /// Connections accepted.
    accepted: Arc<AtomicU64>,
    _stop: DropGuard,
}

impl Upstream {
    async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (h, s, n) = (hits.clone(), stop.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = s.cancelled() => return,
                    a = listener.accept() => a.unwrap().0,
                };
                n.fetch_add(1, Ordering::SeqCst);
                let (handler, hits, s) = (handler.clone(), h.clone(), s.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let f = handler(req);
                        async move { Ok::<_, Infallible>(f.await) }
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    // Room for what the proxy adds to a client's 100 fields.
                    builder.http1().max_headers(200);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        () = s.cancelled() => {}
                    }
                });
            }
        });
        Upstream {
            addr,
            hits,
            accepted,
            _stop: stop.drop_guard(),
        }
    }

    async fn echo() -> Upstream {
        Upstream::start(echo).await
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("http://{}/base", self.addr)
    }
}

// ---------------------------------------------------------------------------------------------
// The agent side

/// The embedded IdP on `127.0.0.1:0`, served by [`crate::server::serve`] until the guard drops.
async fn start_idp(opts: IdpOptions) -> (Idp, DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp = Idp::new(listener.local_addr().unwrap(), opts);
    let (service, stop) = (idp.service(), CancellationToken::new());
    tokio::spawn(crate::server::serve(
        vec![crate::server::Listener::Tcp(listener)],
        crate::server::Limits::LOCAL,
        move |_| service.clone(),
        stop.clone(),
    ));
    (idp, stop.drop_guard())
}

/// The IdP, a token source against it, and proxy settings pointing at `upstream_url`.
struct Agent {
    idp: Idp,
    _idp: DropGuard,
    tokens: TokenSource,
    settings: ProxySettings,
}

impl Agent {
    async fn new(upstream_url: &str) -> Agent {
        let (idp, guard) = start_idp(IdpOptions::new(CLIENT_ID, SECRET, AUDIENCE)).await;
        let env: HashMap<String, String> = [
            ("BEHEST_AGENT__AUTH__DOMAIN", idp.base_url()),
            ("BEHEST_AGENT__AUTH__AUDIENCE", AUDIENCE.to_string()),
            ("BEHEST_AGENT__AUTH__CLIENT_ID", CLIENT_ID.to_string()),
            ("AUTH0_CLIENT_SECRET", SECRET.to_string()),
            ("BEHEST_AGENT__TOKEN__CACHE_FILE", String::new()),
            ("BEHEST_AGENT__PROXY__UPSTREAM", upstream_url.to_string()),
            (
                "BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM",
                "true".to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let settings = crate::config::load(&LoadOptions {
            env,
            ..LoadOptions::default()
        })
        .expect("test settings load");
        assert!(settings.token.cache_file.is_none());
        let tokens = TokenSource::new(&settings, crate::clock::system()).unwrap();
        Agent {
            idp,
            _idp: guard,
            tokens,
            settings: settings.proxy,
        }
    }

    /// The bearer header the proxy should send now.
    fn bearer(&self) -> String {
        self.tokens
            .current()
            .expect("a token")
            .bearer()
            .to_str()
            .unwrap()
            .to_string()
    }
}

/// A proxy serving on 127.0.0.1:0 until dropped.
struct Running {
    proxy: Proxy,
    addr: SocketAddr,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Running {
    async fn start(agent: &Agent) -> Running {
        Running::start_with(agent, |_| {}).await
    }

    async fn start_with(agent: &Agent, tweak: impl FnOnce(&mut ProxySettings)) -> Running {
        let mut settings = agent.settings.clone();
        tweak(&mut settings);
        let proxy = Proxy::new(&settings, agent.tokens.clone()).unwrap();
        let listeners = Proxy::bind(&[ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())])
            .await
            .unwrap();
        let ListenAddr::Tcp(addr) = listeners[0].local_addr().unwrap() else {
            unreachable!()
        };
        let shutdown = CancellationToken::new();
        let (p, s) = (proxy.clone(), shutdown.clone());
        let served = tokio::spawn(async move { p.serve(listeners, s).await });
        Running {
            proxy,
            addr,
            shutdown,
            served: Some(served),
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    fn stat(&self, path: &[&str]) -> u64 {
        let mut v = self.proxy.stats();
        for p in path {
            v = v[*p].clone();
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("stat {path:?} in {}", self.proxy.stats()))
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Sends one request on a new HTTP/1.1 connection to `addr`.
async fn send_on<S, B>(io: S, req: Request<B>) -> Response<Incoming>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    within(sender.send_request(req))
        .await
        .expect("the proxy answers")
}

async fn send<B>(addr: SocketAddr, req: Request<B>) -> Response<Incoming>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    send_on(TcpStream::connect(addr).await.unwrap(), req).await
}

fn req(p: &Running, method: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", p.host())
}

async fn get(p: &Running, path: &str) -> Response<Incoming> {
    send(
        p.addr,
        req(p, "GET", path).body(Empty::<Bytes>::new()).unwrap(),
    )
    .await
}

/// Status, headers and the body as JSON.
async fn json_of(resp: Response<Incoming>) -> (StatusCode, HeaderMap, Value) {
    let (parts, body) = resp.into_parts();
    let bytes = within(body.collect()).await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(&bytes)));
    (parts.status, parts.headers, v)
}

/// Asserts an agent-made OpenAI-shaped error with `status` and `code`.
async fn assert_agent_error(resp: Response<Incoming>, status: u16, code: &str) -> Value {
    let (s, h, v) = json_of(resp).await;
    assert_eq!(s.as_u16(), status, "{v}");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(v["error"]["type"], "behest_agent_error", "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    v
}

fn header<'a>(echo: &'a Value, name: &str) -> Option<&'a str> {
    echo["headers"][name][0].as_str()
}

/// Writes raw bytes and reads one response: until the connection closes or a head plus its
/// `Content-Length` body arrived. Returns the text and the stream.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let text = within(read_response(&mut s)).await;
    (text, s)
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
    matches!(within(s.read(&mut buf)).await, Ok(0) | Err(_))
}

fn status_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Forwarding and headers

#[tokio::test]
async fn forwards_under_the_base_path_with_the_agent_bearer_instead_of_client_credentials() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let request = req(&p, "POST", "/v1/chat/completions?stream=true&x=%20")
        .header("authorization", "Bearer sk-client-key")
        .header("authorization", "Basic c2Vjb25kOmtleQ==")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("accept", "text/event-stream")
        .header("openai-beta", "assistants=v2")
        .header("openai-organization", "org-1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
        .unwrap();
    let (status, headers, echo) = json_of(send(p.addr, request).await).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-upstream"], "yes");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/base/v1/chat/completions");
    assert_eq!(echo["query"], "stream=true&x=%20");
    assert_eq!(echo["body_len"], 13);
    let bearer = agent.bearer();
    assert!(bearer.starts_with("Bearer ey"));
    assert_eq!(echo["headers"]["authorization"], json!([bearer]));
    for gone in [
        "proxy-authorization",
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
    ] {
        assert!(
            echo["headers"].get(gone).is_none(),
            "{gone} was forwarded: {echo}"
        );
    }
    assert_eq!(header(&echo, "host"), Some(up.addr.to_string().as_str()));
    assert_eq!(header(&echo, "accept"), Some("text/event-stream"));
    assert_eq!(header(&echo, "openai-beta"), Some("assistants=v2"));
    assert_eq!(header(&echo, "openai-organization"), Some("org-1"));
    assert_eq!(header(&echo, "content-type"), Some("application/json"));
    let id = header(&echo, "x-request-id").expect("a request id is added");
    assert_eq!(id.len(), 32);
    assert!(echo["headers"].get("x-session-id").is_none());
}

#[tokio::test]
async fn client_request_id_and_session_header_are_kept() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let request = req(&p, "GET", "/v1/models")
        .header("x-request-id", "client-chosen")
        .header("x-session-id", "from-header")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (_, _, echo) = json_of(send(p.addr, request).await).await;
    assert_eq!(echo["headers"]["x-request-id"], json!(["client-chosen"]));
    assert_eq!(echo["headers"]["x-session-id"], json!(["from-header"]));
}

#[tokio::test]
async fn session_path_prefix_sets_x_session_id_and_is_stripped() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.session_id = Some("configured".into())).await;
    let (status, _, echo) = json_of(get(&p, "/s/run%2D42/v1/models?limit=1").await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/base/v1/models");
    assert_eq!(echo["query"], "limit=1");
    assert_eq!(echo["headers"]["x-session-id"], json!(["run-42"]));
}

#[tokio::test]
async fn configured_session_id_is_sent_only_when_the_client_sent_none() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.session_id = Some("ci-job-7".into())).await;
    let (_, _, echo) = json_of(get(&p, "/v1/models").await).await;
    assert_eq!(echo["headers"]["x-session-id"], json!(["ci-job-7"]));
    let request = req(&p, "GET", "/v1/models")
        .header("x-session-id", "mine")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (_, _, echo) = json_of(send(p.addr, request).await).await;
    assert_eq!(echo["headers"]["x-session-id"], json!(["mine"]));
}

#[tokio::test]
async fn bad_session_ids_are_refused_and_never_forwarded() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let long = format!("/s/{}/v1/models", "x".repeat(129));
    for path in ["/s/a%20b/v1/models", "/s/%00/v1/models", long.as_str()] {
        assert_agent_error(get(&p, path).await, 400, "bad_request").await;
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn paths_escaping_the_base_are_refused_and_never_forwarded() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    for path in [
        "/../secret",
        "/v1/../../secret",
        "/%2e%2e/secret",
        "/v1/%2E%2e/%2e%2e/secret",
        "/v1/a%2Fb",
        "/v1/a%2f..%2f..%2fsecret",
        "/s/job/../../secret",
        "/v1/..;/secret",
    ] {
        let line = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", p.host());
        let (text, _) = raw(p.addr, line.as_bytes()).await;
        assert!(
            status_line(&text).starts_with("HTTP/1.1 400"),
            "{path}: {text}"
        );
        assert!(text.contains("\"code\":\"bad_request\""), "{path}: {text}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn dot_segments_that_stay_under_the_base_are_resolved() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let (status, _, echo) = json_of(get(&p, "/v1/files/../models/./x").await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/base/v1/models/x");
}

#[tokio::test]
async fn double_slash_and_userinfo_never_change_the_upstream_host() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let (status, _, echo) = json_of(get(&p, "//evil.example/v1/models").await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/base//evil.example/v1/models");
    assert_eq!(header(&echo, "host"), Some(up.addr.to_string().as_str()));
    // Userinfo that looks like the upstream, with another host behind it.
    let line = format!(
        "GET http://{}@evil.example/base/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        up.addr
    );
    let (text, _) = raw(p.addr, line.as_bytes()).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("forbidden_host"), "{text}");
    assert_eq!(up.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// Guards

#[tokio::test]
async fn connect_is_refused_and_never_forwarded() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let (text, _) = raw(
        p.addr,
        format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", up.addr).as_bytes(),
    )
    .await;
    assert!(status_line(&text).starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("behest_agent_error"), "{text}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn absolute_form_to_another_host_is_refused_and_never_forwarded() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    for target in [
        "http://evil.example/v1/models".to_string(),
        format!("http://127.0.0.1:{}/v1/models", up.addr.port() ^ 1),
        format!("https://evil.example:{}/base/v1/models", up.addr.port()),
    ] {
        let line = format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", p.host());
        let (text, _) = raw(p.addr, line.as_bytes()).await;
        assert!(
            status_line(&text).starts_with("HTTP/1.1 403"),
            "{target}: {text}"
        );
        assert!(
            text.contains("\"code\":\"forbidden_host\""),
            "{target}: {text}"
        );
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn absolute_form_to_the_upstream_itself_is_forwarded_under_its_base() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let line = format!(
        "GET http://{0}/base/v1/models?a=1 HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        up.addr
    );
    let (text, _) = raw(p.addr, line.as_bytes()).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"path\":\"/base/v1/models\""), "{text}");
    // Outside the base path: refused.
    let line = format!(
        "GET http://{0}/other HTTP/1.1\r\nHost: {0}\r\n\r\n",
        up.addr
    );
    let (text, _) = raw(p.addr, line.as_bytes()).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn foreign_host_header_is_refused_and_loopback_names_are_served() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    for host in ["evil.example", "evil.example:8711", "192.0.2.1"] {
        let mut r = req(&p, "GET", "/v1/models")
            .body(Empty::<Bytes>::new())
            .unwrap();
        r.headers_mut().insert("host", host.parse().unwrap());
        assert_agent_error(send(p.addr, r).await, 403, "forbidden_host").await;
    }
    assert_eq!(up.hits(), 0);
    for host in [
        "localhost",
        &format!("localhost:{}", p.addr.port()),
        "127.0.0.1",
        "[::1]:8711",
    ] {
        let mut r = req(&p, "GET", "/v1/models")
            .body(Empty::<Bytes>::new())
            .unwrap();
        r.headers_mut().insert("host", host.parse().unwrap());
        let (status, _, _) = json_of(send(p.addr, r).await).await;
        assert_eq!(status, 200, "{host}");
    }
}

#[tokio::test]
async fn browser_origin_is_refused_unless_configured() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| {
        s.allowed_origins = vec!["https://tools.example".to_string()];
    })
    .await;
    let r = req(&p, "POST", "/v1/chat/completions")
        .header("origin", "https://evil.example")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_agent_error(send(p.addr, r).await, 403, "forbidden_origin").await;
    assert_eq!(up.hits(), 0);
    let r = req(&p, "POST", "/v1/chat/completions")
        .header("origin", "https://tools.example")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (status, _, echo) = json_of(send(p.addr, r).await).await;
    assert_eq!(status, 200);
    assert_eq!(header(&echo, "origin"), Some("https://tools.example"));
}

// ---------------------------------------------------------------------------------------------
// Request-head limits and framing

#[tokio::test]
async fn request_head_over_32_kib_gets_431() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    // Exactly 32 KiB of a head that is still not complete: hyper has read every byte sent when it
    // gives up, so its 431 is not lost to a reset.
    let mut head = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\nX-Big: ", p.host()).into_bytes();
    head.resize(crate::server::MAX_HEAD, b'a');
    let (text, mut s) = raw(p.addr, &head).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 431"), "{text}");
    assert!(closed(&mut s).await);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn more_than_100_headers_get_431() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let mut head = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n", p.host());
    for i in 0..100 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let (text, _) = raw(p.addr, head.as_bytes()).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 431"), "{text}");
    // 100 in all is fine.
    let mut head = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        p.host()
    );
    for i in 0..98 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let (text, _) = raw(p.addr, head.as_bytes()).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(up.hits(), 1);
}

/// RFC 9112 §6.1, §6.3: a request with both is read as chunked, the length is not forwarded, and
/// the connection closes after it, so nothing the client sent after it is read as a request.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_the_connection_closed() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    for fields in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
    ] {
        let smuggled = format!("GET /v1/smuggled HTTP/1.1\r\nHost: {}\r\n\r\n", p.host());
        let line = format!(
            "POST /v1/x HTTP/1.1\r\nHost: {}\r\n{fields}\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}",
            p.host()
        );
        let (text, mut s) = raw(p.addr, line.as_bytes()).await;
        assert!(status_line(&text).starts_with("HTTP/1.1 200"), "{text}");
        let echo: Value =
            serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(echo["body_len"], 3, "{text}");
        assert!(closed(&mut s).await, "the connection closes after it");
    }
    assert_eq!(
        up.hits(),
        2,
        "the smuggled request never reached the upstream"
    );
}

#[tokio::test]
async fn differing_content_lengths_and_space_before_colon_get_400_and_close() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    for fields in [
        "Content-Length: 3\r\nContent-Length: 4",
        "Content-Length : 3",
    ] {
        let line = format!(
            "POST /v1/x HTTP/1.1\r\nHost: {}\r\n{fields}\r\n\r\nabc",
            p.host()
        );
        let (text, mut s) = raw(p.addr, line.as_bytes()).await;
        assert!(
            status_line(&text).starts_with("HTTP/1.1 400"),
            "{fields}: {text}"
        );
        assert!(closed(&mut s).await);
    }
    assert_eq!(up.hits(), 0);
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// An upstream that streams `data: 1`, waits for the test's go, then streams `data: 2` and ends.
async fn sse_upstream(go: oneshot::Receiver<()>) -> Upstream {
    let go = Arc::new(Mutex::new(Some(go)));
    Upstream::start(move |_req| {
        let go = go.lock().unwrap().take();
        async move {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
                if let Some(go) = go {
                    let _ = go.await;
                }
                let _ = tx.send(Bytes::from_static(b"data: 2\n\n")).await;
            });
            let mut r = Response::new(ChanBody(rx).boxed());
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
    })
    .await
}

/// Reads frames until `want` is in what was read; returns all of it.
async fn read_until(body: &mut Incoming, seen: &mut Vec<u8>, want: &[u8]) {
    while !seen.windows(want.len()).any(|w| w == want) {
        let frame = within(body.frame())
            .await
            .expect("more body")
            .expect("a good frame");
        if let Ok(d) = frame.into_data() {
            seen.extend_from_slice(&d);
        }
    }
}

#[tokio::test]
async fn sse_events_reach_the_client_one_by_one() {
    let (go, wait) = oneshot::channel();
    let up = sse_upstream(wait).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let resp = get(&p, "/v1/chat/completions").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    // Event 2 is not produced before this returns: event 1 came through alone.
    read_until(&mut body, &mut seen, b"data: 1\n\n").await;
    assert_eq!(seen, b"data: 1\n\n");
    go.send(()).unwrap();
    read_until(&mut body, &mut seen, b"data: 2\n\n").await;
    assert!(within(body.frame()).await.is_none());
    assert_eq!(seen, b"data: 1\n\ndata: 2\n\n");
}

/// A request body sent through a channel (chunked, size unknown).
fn chunked_pattern(total: usize, chunk: usize) -> (ChanBody, u64) {
    let (tx, rx) = mpsc::channel(4);
    let mut sum = FNV0;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    sum = fnv(sum, &data);
    tokio::spawn(async move {
        for piece in data.chunks(chunk) {
            if tx.send(Bytes::copy_from_slice(piece)).await.is_err() {
                return;
            }
        }
    });
    (ChanBody(rx), sum)
}

#[tokio::test]
async fn multi_mib_request_bodies_stream_through_intact() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    // Chunked, of unknown size: teed for a replay until it outgrows the limit.
    let total = 6 * 1024 * 1024 + 7;
    let (body, sum) = chunked_pattern(total, 64 * 1024);
    let r = req(&p, "POST", "/v1/files").body(body).unwrap();
    let (status, _, echo) = json_of(send(p.addr, r).await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["body_len"], total as u64);
    assert_eq!(echo["body_sum"], format!("{sum:016x}"));
    // With a Content-Length over the replay limit: never teed.
    let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 13) as u8).collect();
    let sum = fnv(FNV0, &data);
    let r = req(&p, "POST", "/v1/files")
        .body(Full::new(Bytes::from(data)))
        .unwrap();
    let (status, _, echo) = json_of(send(p.addr, r).await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["body_len"], 3 * 1024 * 1024);
    assert_eq!(echo["body_sum"], format!("{sum:016x}"));
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_are_served() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let io = TokioIo::new(TcpStream::connect(p.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = Request::builder()
        .uri(format!("http://{}/s/h2job/v1/models", p.host()))
        .header("authorization", "Bearer sk-client")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (status, _, echo) = json_of(resp).await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/base/v1/models");
    assert_eq!(echo["headers"]["x-session-id"], json!(["h2job"]));
    assert_eq!(echo["headers"]["authorization"], json!([agent.bearer()]));
    // `:authority` is the Host of h2: a foreign one is refused.
    let r = Request::builder()
        .uri("http://evil.example/v1/models")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_agent_error(resp, 403, "forbidden_host").await;
    // h2 has no header-count limit of its own: over 100 fields get 431 from the proxy.
    let mut r = Request::builder().uri(format!("http://{}/v1/models", p.host()));
    for i in 0..101 {
        r = r.header(format!("x-h{i}"), "v");
    }
    let resp = within(sender.send_request(r.body(Empty::<Bytes>::new()).unwrap()))
        .await
        .unwrap();
    assert_agent_error(resp, 431, "request_header_fields_too_large").await;
    assert_eq!(up.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// Token and 401 replay

/// An upstream answering 401 to the first `rejections` requests, then echoing.
async fn rejecting_upstream(rejections: u64) -> (Upstream, Arc<Mutex<Vec<String>>>) {
    let count = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let up = Upstream::start(move |req| {
        let n = count.fetch_add(1, Ordering::SeqCst);
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        s.lock().unwrap().push(auth);
        async move {
            if n < rejections {
                // Read the body first, as a real server would before answering.
                let _ = req.into_body().collect().await;
                let mut r = full(
                    StatusCode::UNAUTHORIZED,
                    r#"{"error":{"message":"bad token"}}"#,
                );
                r.headers_mut()
                    .insert("www-authenticate", "Bearer".parse().unwrap());
                r
            } else {
                echo(req).await
            }
        }
    })
    .await;
    (up, seen)
}

#[tokio::test]
async fn upstream_401_refreshes_the_token_and_replays_the_request_once() {
    let (up, seen) = rejecting_upstream(1).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let r = req(&p, "POST", "/v1/chat/completions")
        .body(Full::new(Bytes::from_static(
            b"{\"model\":\"m\",\"messages\":[]}",
        )))
        .unwrap();
    let (status, _, echo) = json_of(send(p.addr, r).await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["body_len"], 27);
    assert_eq!(up.hits(), 2);
    assert_eq!(
        agent.idp.grants(),
        2,
        "one grant for the first token, one to replace it"
    );
    assert_eq!(p.stat(&["replays"]), 1);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[1], agent.bearer(), "the replay carries the new token");
}

/// The replay after a 401 sends the head the client sent (every field, repeated ones in order),
/// with only the token new.
#[tokio::test]
async fn a_replay_carries_the_clients_head_as_the_first_try_did() {
    let mut heads = Vec::new();
    for rejections in [0, 1] {
        let (up, seen) = rejecting_upstream(rejections).await;
        let agent = Agent::new(&up.url()).await;
        let p = Running::start(&agent).await;
        let r = req(&p, "GET", "/s/job-7/v1/models?limit=2")
            .header("x-request-id", "r-1")
            .header("x-stainless-lang", "js")
            .header("x-multi", "one")
            .header("accept", "application/json")
            .header("x-multi", "two, three")
            .header("authorization", "Bearer placeholder")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (status, _, mut echo) = json_of(send(p.addr, r).await).await;
        assert_eq!(status, 200);
        assert_eq!(up.hits(), 1 + rejections);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.last().unwrap(), &agent.bearer(), "the current token");
        let fields = echo["headers"].as_object_mut().unwrap();
        fields.remove("authorization");
        let host = fields.remove("host").unwrap();
        assert!(
            up.url()
                .contains(&format!("//{}/", host[0].as_str().unwrap())),
            "{host}"
        );
        heads.push(echo);
    }
    assert_eq!(heads[0]["headers"]["x-multi"], json!(["one", "two, three"]));
    assert_eq!(heads[0]["headers"]["x-session-id"], json!(["job-7"]));
    assert_eq!(heads[1], heads[0]);
}

#[tokio::test]
async fn a_chunked_body_of_unknown_length_streams_and_its_401_goes_back() {
    // Only a body whose length is announced and fits `max_replay_body` is kept for a replay; one
    // of unknown length streams through as it comes.
    let (up, _) = rejecting_upstream(1).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let (body, _) = chunked_pattern(100_000, 10_000);
    let r = req(&p, "POST", "/v1/files").body(body).unwrap();
    let resp = send(p.addr, r).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(up.hits(), 1);
    assert_eq!(p.stat(&["replays"]), 0);
}

#[tokio::test]
async fn a_body_that_comes_in_two_parts_goes_out_whole_and_is_replayed_whole() {
    // First to an upstream that echoes, then to one that refuses the first token: the first part
    // comes with the head, the second later (a body this small is read whole before it is sent).
    for rejections in [0, 1] {
        let (up, _) = rejecting_upstream(rejections).await;
        let agent = Agent::new(&up.url()).await;
        let p = Running::start(&agent).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let head = format!(
            "POST /v1/files HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabcd",
            p.host()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(up.hits(), 0, "not sent before it is whole");
        s.write_all(b"efghij").await.unwrap();
        let text = within(read_response(&mut s)).await;
        assert!(status_line(&text).starts_with("HTTP/1.1 200"), "{text}");
        let echo: Value =
            serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(
            echo["headers"]["content-length"],
            json!(["10"]),
            "{rejections}"
        );
        assert_eq!(echo["body_len"], 10, "{rejections}");
        assert_eq!(
            echo["body_sum"],
            format!("{:016x}", fnv(FNV0, b"abcdefghij"))
        );
        assert_eq!(up.hits(), 1 + rejections);
        assert_eq!(p.stat(&["replays"]), rejections);
    }
}

#[tokio::test]
async fn an_h2_request_body_is_replayed_after_401() {
    let (up, _) = rejecting_upstream(1).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let io = TokioIo::new(TcpStream::connect(p.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = b"{\"model\":\"m\",\"input\":\"h2\"}";
    // With and without a length: h2 may say it or not. (An h2 body's DATA frame is usually not
    // read yet when the handler first looks: it goes through the tee, not as a whole frame.)
    for with_length in [true, false] {
        let mut r = Request::builder()
            .method("POST")
            .uri(format!("http://{}/v1/embeddings", p.host()));
        if with_length {
            r = r.header("content-length", body.len());
        }
        let r = r.body(Full::new(Bytes::from_static(body))).unwrap();
        let resp = within(sender.send_request(r)).await.unwrap();
        let (status, _, echo) = json_of(resp).await;
        assert_eq!(status, 200, "{echo}");
        assert_eq!(echo["body_len"], body.len(), "{with_length}");
        assert_eq!(echo["body_sum"], format!("{:016x}", fnv(FNV0, body)));
    }
    assert_eq!(
        p.stat(&["replays"]),
        1,
        "the first request was refused and replayed"
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_second_401_goes_back_to_the_client_as_is() {
    let (up, _) = rejecting_upstream(u64::MAX).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let resp = get(&p, "/v1/models").await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"error":{"message":"bad token"}}"#);
    assert_eq!(up.hits(), 2, "one replay, no more");
    assert_eq!(p.stat(&["replays"]), 1);
    assert_eq!(p.stat(&["responses", "4xx"]), 1);
}

#[tokio::test]
async fn a_401_on_a_body_too_big_to_keep_is_returned_without_replay() {
    let (up, _) = rejecting_upstream(2).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.max_replay_body = 1024).await;
    // Its Content-Length says it is too big: never kept.
    let r = req(&p, "POST", "/v1/files")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    let resp = send(p.addr, r).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(up.hits(), 1);
    // Chunked, outgrowing the limit on the way: the copy is dropped, no replay either.
    let (body, _) = chunked_pattern(8 * 1024, 1024);
    let r = req(&p, "POST", "/v1/files").body(body).unwrap();
    let resp = send(p.addr, r).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(up.hits(), 2);
    assert_eq!(p.stat(&["replays"]), 0);
}

#[tokio::test]
async fn no_token_answers_503_token_unavailable_without_secrets() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    agent.idp.set_fault(Some(Fault::Status(503)));
    let p = Running::start(&agent).await;
    let v = assert_agent_error(get(&p, "/v1/models").await, 503, "token_unavailable").await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(!message.contains(SECRET), "{message}");
    assert_eq!(up.hits(), 0);
}

/// With no token held, a request the guards refuse is answered at once: it never waits for (or
/// spends) a grant, and never reaches the upstream. A good one then gets the first grant.
#[tokio::test]
async fn a_refused_request_with_no_token_held_spends_no_grant() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    assert_agent_error(get(&p, "/s/a%20b/v1/models").await, 400, "bad_request").await;
    let r = req(&p, "POST", "/v1/chat/completions")
        .header("origin", "https://evil.example")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_agent_error(send(p.addr, r).await, 403, "forbidden_origin").await;
    assert_eq!(agent.idp.token_requests(), 0);
    assert_eq!(up.hits(), 0);
    assert_eq!(get(&p, "/v1/models").await.status(), 200);
    assert_eq!(agent.idp.grants(), 1);
}

// ---------------------------------------------------------------------------------------------
// Upstream failures, timeouts, cancellation

#[tokio::test]
async fn unreachable_upstream_answers_502_in_the_openai_shape() {
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let agent = Agent::new(&format!("http://{closed_port}/base")).await;
    let p = Running::start(&agent).await;
    let v = assert_agent_error(get(&p, "/v1/models").await, 502, "upstream_unreachable").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&closed_port.to_string()),
        "{v}"
    );
    assert_eq!(p.stat(&["upstream_errors"]), 1);
    assert_eq!(p.stat(&["responses", "5xx"]), 1);
}

#[tokio::test]
async fn upstream_silent_past_upstream_timeout_answers_504() {
    let up = Upstream::start(|_req| std::future::pending::<Response<TestBody>>()).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.upstream_timeout = Duration::from_millis(50)).await;
    assert_agent_error(get(&p, "/v1/models").await, 504, "upstream_timeout").await;
    assert_eq!(p.stat(&["upstream_errors"]), 1);
}

/// The HTTP/1 requests of a connection share one upstream timer: each is still bounded by its
/// own deadline (not the one before's), and a timeout does not spill into the next request.
#[tokio::test]
async fn each_request_on_a_kept_alive_connection_has_its_own_upstream_timeout() {
    let up = Upstream::start(|req| async move {
        if req.uri().path().ends_with("/slow") {
            std::future::pending::<()>().await;
        }
        full(StatusCode::OK, "{}")
    })
    .await;
    let agent = Agent::new(&up.url()).await;
    let timeout = Duration::from_millis(300);
    let p = Running::start_with(&agent, |s| s.upstream_timeout = timeout).await;
    let io = TokioIo::new(TcpStream::connect(p.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    for path in [
        "/v1/fast", "/v1/slow", "/v1/fast", "/v1/slow", "/v1/slow", "/v1/fast",
    ] {
        let started = std::time::Instant::now();
        let request = req(&p, "GET", path).body(Empty::<Bytes>::new()).unwrap();
        let resp = within(sender.send_request(request)).await.unwrap();
        if path.ends_with("/slow") {
            assert_agent_error(resp, 504, "upstream_timeout").await;
            // Not before its own deadline (a correctness bound, not a speed one).
            assert!(started.elapsed() >= timeout, "{path} timed out early");
        } else {
            assert_eq!(resp.status(), 200, "{path}");
            resp.into_body().collect().await.unwrap();
        }
    }
    assert_eq!(p.stat(&["upstream_errors"]), 3);
}

/// h2 streams run together: each has an upstream timer of its own, and all of them time out.
#[tokio::test]
async fn concurrent_h2_streams_each_time_out() {
    let up = Upstream::start(|_req| std::future::pending::<Response<TestBody>>()).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.upstream_timeout = Duration::from_millis(200)).await;
    let io = TokioIo::new(TcpStream::connect(p.addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let answers = futures_util::future::join_all((0..3).map(|_| {
        let mut sender = sender.clone();
        let r = Request::builder()
            .uri(format!("http://{}/v1/models", p.host()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        async move { within(sender.send_request(r)).await.unwrap() }
    }))
    .await;
    for resp in answers {
        assert_agent_error(resp, 504, "upstream_timeout").await;
    }
}

#[tokio::test]
async fn a_stream_silent_past_idle_timeout_is_cut() {
    let up = Upstream::start(|_req| async {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
            // Never another byte, never the end.
            std::future::pending::<()>().await;
        });
        Response::new(ChanBody(rx).boxed())
    })
    .await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.idle_timeout = Duration::from_millis(50)).await;
    let resp = get(&p, "/v1/chat/completions").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"data: 1\n\n").await;
    let end = within(body.frame()).await;
    assert!(
        matches!(end, Some(Err(_))),
        "the stream is cut, not ended cleanly: {end:?}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_a_stream_is_cut_after_idle_timeout() {
    // The upstream streams 64 KiB frames for as long as it is read; the client reads nothing.
    let (dropped_tx, dropped) = oneshot::channel();
    let dropped_tx = Arc::new(Mutex::new(Some(dropped_tx)));
    let up = Upstream::start(move |_req| {
        let signal = DropSignal(dropped_tx.lock().unwrap().take());
        async move {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let _signal = signal;
                while tx.send(Bytes::from(vec![b'x'; 64 * 1024])).await.is_ok() {}
            });
            Response::new(ChanBody(rx).boxed())
        }
    })
    .await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.idle_timeout = Duration::from_millis(300)).await;
    let (_head, mut s) = raw(
        p.addr,
        format!(
            "GET /v1/chat/completions HTTP/1.1\r\nHost: {}\r\n\r\n",
            p.host()
        )
        .as_bytes(),
    )
    .await;
    // Buffers fill up; no byte moves either way; the agent cuts both sides.
    within(dropped)
        .await
        .expect("the upstream stream was dropped");
    let mut rest = Vec::new();
    within(s.read_to_end(&mut rest)).await.ok();
    assert_eq!(p.stat(&["connections"]), 0);
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_after_idle_timeout() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.idle_timeout = Duration::from_millis(200)).await;
    let io = TokioIo::new(TcpStream::connect(p.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let r = Request::builder()
        .uri(format!("http://{}/v1/models", p.host()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    // No request after it: the agent closes the connection (the client's task then ends).
    within(conn).await.unwrap().ok();
    assert_eq!(p.stat(&["connections"]), 0);
}

#[tokio::test]
async fn header_names_with_an_underscore_are_not_forwarded() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let r = req(&p, "GET", "/v1/models")
        .header("x_session_id", "spoofed")
        .header("x-kept", "1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, _, echo) = json_of(send(p.addr, r).await).await;
    assert_eq!(status, 200);
    assert_eq!(header(&echo, "x-kept"), Some("1"));
    assert_eq!(echo["headers"].get("x_session_id"), None, "{echo}");
}

/// Signals when dropped.
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let (arrived_tx, mut arrived) = mpsc::channel::<()>(1);
    let (dropped_tx, dropped) = oneshot::channel();
    let dropped_tx = Arc::new(Mutex::new(Some(dropped_tx)));
    let up = Upstream::start(move |_req| {
        let signal = DropSignal(dropped_tx.lock().unwrap().take());
        let arrived = arrived_tx.clone();
        async move {
            let _signal = signal;
            arrived.send(()).await.unwrap();
            std::future::pending::<Response<TestBody>>().await
        }
    })
    .await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /v1/chat/completions HTTP/1.1\r\nHost: {}\r\n\r\n",
            p.host()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    within(arrived.recv()).await.unwrap();
    assert_eq!(p.stat(&["in_flight"]), 1);
    drop(s);
    within(dropped)
        .await
        .expect("the upstream saw the request cancelled");
}

// ---------------------------------------------------------------------------------------------
// Listeners, shutdown, counters

#[tokio::test]
async fn unix_socket_listener_has_mode_0660_and_serves() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let proxy = Proxy::new(&agent.settings, agent.tokens.clone()).unwrap();
    let listeners = Proxy::bind(&[ListenAddr::Unix(path.clone())])
        .await
        .unwrap();
    assert_eq!(
        listeners[0].local_addr().unwrap(),
        ListenAddr::Unix(path.clone())
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A socket something answers on is not taken over.
    let e = Proxy::bind(&[ListenAddr::Unix(path.clone())])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    let shutdown = CancellationToken::new();
    let served = tokio::spawn({
        let (p, s) = (proxy.clone(), shutdown.clone());
        async move { p.serve(listeners, s).await }
    });
    let r = Request::get("/v1/models")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, _, echo) =
        json_of(send_on(UnixStream::connect(&path).await.unwrap(), r).await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/base/v1/models");
    shutdown.cancel();
    within(served).await.unwrap();
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_open_streams_finish() {
    let (go, wait) = oneshot::channel();
    let up = sse_upstream(wait).await;
    let agent = Agent::new(&up.url()).await;
    let mut p = Running::start(&agent).await;
    let resp = get(&p, "/v1/chat/completions").await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"data: 1\n\n").await;
    p.shutdown.cancel();
    // Once the listener is closed, new connections are refused.
    let addr = p.addr;
    within(async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let served = p.served.take().unwrap();
    assert!(!served.is_finished(), "serve waits for the open stream");
    go.send(()).unwrap();
    read_until(&mut body, &mut seen, b"data: 2\n\n").await;
    assert!(
        within(body.frame()).await.is_none(),
        "the stream ended cleanly"
    );
    within(served).await.unwrap();
}

#[tokio::test]
async fn upstream_connections_are_reused_once_a_response_was_read_to_its_end() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    // Each request on a client connection of its own, one after the other.
    for i in 0..10 {
        let (status, _, echo) = json_of(get(&p, "/v1/models").await).await;
        assert_eq!(status, 200, "request {i}");
        assert_eq!(echo["path"], "/base/v1/models");
        assert_eq!(echo["headers"]["host"][0], up.addr.to_string());
    }
    assert_eq!(up.hits(), 10);
    assert_eq!(up.accepted(), 1, "one upstream connection served them all");
}

#[tokio::test]
async fn a_response_cut_short_closes_its_upstream_connection_instead_of_reusing_it() {
    let (_go, wait) = oneshot::channel();
    let up = sse_upstream(wait).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let resp = get(&p, "/v1/chat/completions").await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"data: 1\n\n").await;
    drop(body);
    // The next request cannot get the connection still carrying the first stream.
    let resp = get(&p, "/v1/chat/completions").await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"data: 1\n\n").await;
    assert_eq!(up.accepted(), 2);
}

/// Reads one request head and answers `{}`.
async fn answer_once(s: &mut TcpStream) -> bool {
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
async fn an_upstream_that_closes_idle_connections_costs_no_failed_request() {
    // One request per connection, closed after the answer without `Connection: close`, as a
    // server does when its keep-alive timeout fires just after a response.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let n = accepted.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move { answer_once(&mut s).await });
        }
    });
    let agent = Agent::new(&format!("http://{addr}")).await;
    let p = Running::start(&agent).await;
    for i in 0..20 {
        let resp = get(&p, "/v1/models").await;
        assert_eq!(resp.status(), 200, "request {i}");
        let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}");
        if i % 2 == 0 {
            // Give the closed connection's task a turn sometimes, and sometimes not.
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 20);
    server.abort();
}

#[tokio::test]
async fn shutdown_closes_idle_kept_alive_connections_without_waiting_for_the_grace() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    // A grace far beyond the test's deadline: only a prompt close lets `serve` return in time.
    let mut p = Running::start_with(&agent, |s| s.shutdown_grace = Duration::from_secs(3600)).await;
    let (text, mut stream) = raw(
        p.addr,
        b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&text), "HTTP/1.1 200 OK", "{text}");
    // The connection is now idle and kept alive.
    p.shutdown.cancel();
    within(p.served.take().unwrap()).await.unwrap();
    assert!(closed(&mut stream).await);
}

#[tokio::test]
async fn shutdown_closes_connections_that_sent_nothing_yet_without_waiting_for_the_grace() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    // Neither the grace nor the head-read timeout ends these connections within the test.
    let mut p = Running::start_with(&agent, |s| {
        s.shutdown_grace = Duration::from_secs(3600);
        s.header_read_timeout = Duration::from_secs(3600);
    })
    .await;
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let mut half = TcpStream::connect(p.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    within(async {
        while p.stat(&["connections"]) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    p.shutdown.cancel();
    within(p.served.take().unwrap()).await.unwrap();
    assert!(closed(&mut silent).await);
    assert!(closed(&mut half).await);
}

#[tokio::test]
async fn shutdown_cuts_streams_still_open_after_the_grace() {
    let (_go, wait) = oneshot::channel();
    let up = sse_upstream(wait).await;
    let agent = Agent::new(&up.url()).await;
    let mut p = Running::start_with(&agent, |s| s.shutdown_grace = Duration::from_millis(50)).await;
    let resp = get(&p, "/v1/chat/completions").await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"data: 1\n\n").await;
    p.shutdown.cancel();
    within(p.served.take().unwrap()).await.unwrap();
    let end = within(body.frame()).await;
    assert!(matches!(end, Some(Err(_)) | None), "{end:?}");
    assert!(!seen.windows(7).any(|w| w == b"data: 2"));
}

#[tokio::test]
async fn stats_count_requests_by_status_class() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let _ = json_of(get(&p, "/v1/models").await).await;
    let _ = json_of(get(&p, "/../x").await).await;
    let r = req(&p, "GET", "/v1/models")
        .header("origin", "https://evil.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let _ = json_of(send(p.addr, r).await).await;
    let stats = p.proxy.stats();
    assert_eq!(stats["requests_total"], 3, "{stats}");
    assert_eq!(stats["responses"]["2xx"], 1, "{stats}");
    assert_eq!(stats["responses"]["4xx"], 2, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["replays"], 0, "{stats}");
    assert_eq!(stats["upstream_errors"], 0, "{stats}");
    assert_eq!(
        stats["upstream"],
        format!("{}", url::Url::parse(&up.url()).unwrap())
    );
    assert!(!stats.to_string().contains("Bearer"));
}

#[tokio::test]
async fn proxy_without_upstream_is_a_setup_error() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let mut settings = agent.settings.clone();
    settings.upstream = None;
    let e = Proxy::new(&settings, agent.tokens.clone()).unwrap_err();
    assert!(matches!(e, SetupError::NoUpstream));
    assert!(e.to_string().contains("proxy.upstream"));
    settings.upstream = Some(url::Url::parse(&up.url()).unwrap());
    settings.session_id = Some("has space".into());
    assert!(matches!(
        Proxy::new(&settings, agent.tokens.clone()).unwrap_err(),
        SetupError::SessionId(_)
    ));
}

#[tokio::test]
async fn replace_with_sends_new_requests_to_the_new_upstream_and_keeps_the_totals() {
    let old_up = Upstream::echo().await;
    let new_up = Upstream::echo().await;
    let agent = Agent::new(&old_up.url()).await;
    let p = Running::start(&agent).await;
    let (status, _, _) = json_of(get(&p, "/v1/models").await).await;
    assert_eq!(status, 200);
    let mut settings = agent.settings.clone();
    settings.upstream = Some(url::Url::parse(&format!("http://{}/other", new_up.addr)).unwrap());
    let next = Proxy::new(&settings, agent.tokens.clone()).unwrap();
    p.proxy.replace_with(&next);
    let (status, _, echo) = json_of(get(&p, "/v1/models").await).await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/other/v1/models");
    assert_eq!((old_up.hits(), new_up.hits()), (1, 1));
    assert_eq!(next.stats()["requests_total"], 2, "{}", next.stats());
}

#[tokio::test]
async fn attached_metrics_count_responses_upstream_errors_and_replays() {
    let (up, _) = rejecting_upstream(1).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
    p.proxy.attach_metrics(metrics.clone());
    let (status, _, _) = json_of(get(&p, "/v1/models").await).await;
    assert_eq!(status, 200);
    let _ = json_of(get(&p, "/../x").await).await;
    let text = metrics.encode();
    assert!(
        text.contains("behest_agent_proxy_requests_total{code=\"2xx\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("behest_agent_proxy_requests_total{code=\"4xx\"} 1"),
        "{text}"
    );
    assert!(text.contains("behest_agent_replays_total 1"), "{text}");
    assert!(text.contains("behest_agent_in_flight_requests 0"), "{text}");
    assert!(!text.contains("Bearer"), "{text}");
}

#[tokio::test]
async fn an_open_event_stream_is_counted_in_the_streams_gauge_until_it_ends() {
    let (go, wait) = oneshot::channel();
    let up = sse_upstream(wait).await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
    p.proxy.attach_metrics(metrics.clone());
    let resp = get(&p, "/v1/chat/completions").await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"data: 1\n\n").await;
    assert_eq!(metrics.in_flight_streams.get(), 1);
    go.send(()).unwrap();
    read_until(&mut body, &mut seen, b"data: 2\n\n").await;
    assert!(within(body.frame()).await.is_none());
    assert_eq!(metrics.in_flight_streams.get(), 0);
}

#[tokio::test]
async fn one_debug_line_per_request_without_credentials_or_query() {
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let logs = logs.clone();
        move || Capture(logs.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(writer)
        .with_ansi(false)
        .finish();
    // The test runtime has one thread: the proxy's tasks log through this subscriber too.
    // With a single registered dispatcher, tracing-core computes callsite interest from the
    // default of whichever thread hits a callsite first (another test's: none), disabling it for
    // everyone. A second live dispatcher makes it consult every registered one.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let _guard = tracing::subscriber::set_default(subscriber);
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start(&agent).await;
    let r = req(
        &p,
        "POST",
        "/s/job-9/v1/chat/completions?api_key=query-secret",
    )
    .header("authorization", "Bearer sk-client-secret")
    .body(Full::new(Bytes::from_static(b"{}")))
    .unwrap();
    let (status, _, _) = json_of(send(p.addr, r).await).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("proxied request"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    for field in [
        "method=POST",
        "path=\"/s/job-9/v1/chat/completions\"",
        "status=200",
        "session=\"job-9\"",
        "bytes=",
    ] {
        assert!(lines[0].contains(field), "{field} missing: {}", lines[0]);
    }
    let token = agent.bearer();
    let token = token.trim_start_matches("Bearer ");
    for secret in ["sk-client-secret", "query-secret", token, SECRET] {
        assert!(!text.contains(secret), "a secret reached the log: {text}");
    }
}

/// A `MakeWriter` target collecting log output.
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_request_head_not_sent_within_header_read_timeout_closes_the_connection() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| {
        s.header_read_timeout = Duration::from_millis(50)
    })
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n", p.host()).as_bytes())
        .await
        .unwrap();
    // The rest of the head never comes.
    assert!(closed(&mut s).await);
    assert_eq!(up.hits(), 0);
}

/// Before hyper's own head-read timeout can start, the first bytes must tell HTTP/1 from h2
/// prior knowledge: a client that sends nothing, or the start of an h2 preface and no more, is
/// closed after `header_read_timeout` too, and does not hold a connection slot for good.
#[tokio::test]
async fn a_connection_that_sends_nothing_or_half_a_preface_is_closed_after_header_read_timeout() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| {
        s.header_read_timeout = Duration::from_millis(100)
    })
    .await;
    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        assert!(closed(&mut s).await, "{:?}", String::from_utf8_lossy(sent));
    }
    // A whole preface is h2: hyper's from there (its SETTINGS come back at once).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 9];
    within(s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(buf[3], 0x4, "a SETTINGS frame");
    assert_eq!(up.hits(), 0);
}

/// The connection's timer serves the head-read and the upstream timeouts in turn: after a
/// request that waited on its upstream past the head-read timeout (the timer then moved to the
/// 10-minute upstream deadline), the next head is still timed by the head-read timeout.
#[tokio::test]
async fn the_next_head_on_a_kept_alive_connection_is_timed_after_a_slow_upstream() {
    let up = Upstream::start(|_req| async {
        // A slow upstream (its behaviour under test, not a wait for the test's sake).
        tokio::time::sleep(Duration::from_millis(300)).await;
        full(StatusCode::OK, "{}")
    })
    .await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| {
        s.header_read_timeout = Duration::from_millis(100)
    })
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let head = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n", p.host());
    s.write_all(format!("{head}\r\n").as_bytes()).await.unwrap();
    let text = within(read_response(&mut s)).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 200"), "{text}");
    // Half a head, and never the rest.
    s.write_all(head.as_bytes()).await.unwrap();
    assert!(closed(&mut s).await);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.max_connections = 1).await;
    let get_on = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", p.host());
    let mut a = TcpStream::connect(p.addr).await.unwrap();
    a.write_all(get_on("/v1/a").as_bytes()).await.unwrap();
    assert!(status_line(&within(read_response(&mut a)).await).starts_with("HTTP/1.1 200"));
    // B's connect completes in the kernel's backlog, but the proxy does not take it while A
    // holds the only slot, so its request is not forwarded...
    let mut b = TcpStream::connect(p.addr).await.unwrap();
    b.write_all(get_on("/v1/b").as_bytes()).await.unwrap();
    // ...even while A is served again.
    a.write_all(get_on("/v1/a").as_bytes()).await.unwrap();
    assert!(status_line(&within(read_response(&mut a)).await).starts_with("HTTP/1.1 200"));
    assert_eq!(up.hits(), 2);
    assert_eq!(p.stat(&["connections"]), 1);
    // A goes away: B is taken and served.
    drop(a);
    let text = within(read_response(&mut b)).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("/base/v1/b"), "{text}");
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_request_body_silent_past_idle_timeout_is_answered_408() {
    let up = Upstream::echo().await;
    let agent = Agent::new(&up.url()).await;
    let p = Running::start_with(&agent, |s| s.idle_timeout = Duration::from_millis(50)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\r\nabc",
        p.host()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The other 7 bytes never come.
    let text = within(read_response(&mut s)).await;
    assert!(status_line(&text).starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert_eq!(p.stat(&["upstream_errors"]), 0);
}

// ---------------------------------------------------------------------------------------------
// A TLS upstream, HTTP/2 or HTTP/1.1 by ALPN

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// An HTTPS upstream on 127.0.0.1:0 (certificate for 127.0.0.1 from the test CA in
/// `tests/fixtures`) offering `alpn`, answering with the HTTP version it saw, the path and the
/// bearer; it counts TLS connections.
async fn tls_upstream(alpn: &[&[u8]]) -> (SocketAddr, Arc<AtomicU64>, DropGuard) {
    tls_upstream_gated(alpn, 0).await
}

/// [`tls_upstream`], except that with `gate` > 0 it completes no TLS handshake after the first
/// connection's until `gate` of those connections are waiting for one together.
async fn tls_upstream_gated(
    alpn: &[&[u8]],
    gate: usize,
) -> (SocketAddr, Arc<AtomicU64>, DropGuard) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    crate::tls::install_default_provider();
    let certs = CertificateDer::pem_file_iter(format!("{FIXTURES}/upstream-cert.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(format!("{FIXTURES}/upstream-key.pem")).unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs.map(Result::unwrap).collect(), key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (n, s) = (accepted.clone(), stop.clone());
    let barrier = Arc::new(tokio::sync::Barrier::new(gate.max(1)));
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = s.cancelled() => return,
                a = listener.accept() => a.unwrap().0,
            };
            let k = n.fetch_add(1, Ordering::SeqCst) + 1;
            let acceptor = acceptor.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                if gate > 0 && k >= 2 {
                    barrier.wait().await;
                }
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|req: Request<Incoming>| async move {
                    let v = json!({
                        "version": format!("{:?}", req.version()),
                        "path": req.uri().path(),
                        "authority": req.uri().authority().map(|a| a.to_string())
                            .or_else(|| req.headers().get("host").map(|h| h.to_str().unwrap().to_string())),
                        "authorization": req.headers().get("authorization").map(|h| h.to_str().unwrap().to_string()),
                        "host": req.headers().get("host").map(|h| h.to_str().unwrap().to_string()),
                    });
                    Ok::<_, Infallible>(full(StatusCode::OK, v.to_string()))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, accepted, stop.drop_guard())
}

#[tokio::test]
async fn a_tls_upstream_is_spoken_to_in_http2_or_http1_as_alpn_decides_over_one_connection() {
    for (alpn, version) in [
        (&[b"h2".as_slice(), b"http/1.1"][..], "HTTP/2.0"),
        (&[b"http/1.1".as_slice()][..], "HTTP/1.1"),
    ] {
        let (addr, accepted, _stop) = tls_upstream(alpn).await;
        let mut agent = Agent::new(&format!("https://127.0.0.1:{}/base", addr.port())).await;
        agent.settings.ca_file = Some(format!("{FIXTURES}/upstream-ca.pem").into());
        let p = Running::start(&agent).await;
        // Sequential requests, then concurrent ones.
        for _ in 0..3 {
            let (status, _, v) = json_of(get(&p, "/v1/models").await).await;
            assert_eq!(status, 200, "{version}: {v}");
            assert_eq!(v["version"], version);
            assert_eq!(v["path"], "/base/v1/models");
            assert_eq!(v["authority"], format!("127.0.0.1:{}", addr.port()));
            assert_eq!(v["authorization"], agent.bearer());
            // h2 says it in `:authority` only; HTTP/1.1 in `Host` (never the client's).
            let host = (version == "HTTP/1.1").then(|| format!("127.0.0.1:{}", addr.port()));
            assert_eq!(v["host"], json!(host), "{version}");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "{version}: one connection"
        );
        let answers = futures_util::future::join_all((0..8).map(|_| get(&p, "/v1/models"))).await;
        for r in answers {
            assert_eq!(r.status(), 200, "{version}");
            let _ = json_of(r).await;
        }
        if version == "HTTP/2.0" {
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                1,
                "h2 multiplexes on one connection"
            );
        }
    }
}

#[tokio::test]
async fn a_tls_upstream_with_a_certificate_the_agent_does_not_trust_is_a_502() {
    let (addr, _accepted, _stop) = tls_upstream(&[b"h2", b"http/1.1"]).await;
    // No `ca_file`: the test CA is not among the system's roots.
    let agent = Agent::new(&format!("https://127.0.0.1:{}/base", addr.port())).await;
    let p = Running::start(&agent).await;
    let (status, _, v) = json_of(get(&p, "/v1/models").await).await;
    assert_eq!(status, 502, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
}

#[tokio::test]
async fn after_alpn_picked_http1_new_upstream_connections_open_in_parallel() {
    let (addr, accepted, _stop) = tls_upstream_gated(&[b"http/1.1"], 2).await;
    let mut agent = Agent::new(&format!("https://127.0.0.1:{}/base", addr.port())).await;
    agent.settings.ca_file = Some(format!("{FIXTURES}/upstream-ca.pem").into());
    let p = Running::start_with(&agent, |s| s.upstream_timeout = Duration::from_secs(5)).await;
    let (status, _, v) = json_of(get(&p, "/v1/models").await).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], "HTTP/1.1");
    // Three at once: one takes the pooled connection, two need new ones, and the upstream
    // completes neither handshake until both have connected (taking turns, they would time out).
    let answers = futures_util::future::join_all((0..3).map(|_| get(&p, "/v1/models"))).await;
    for r in answers {
        let (status, _, v) = json_of(r).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// While the first connect's protocol is unknown the others wait for it; when it fails, they
/// must not wait out each other's connects in turn, but connect at once.
#[tokio::test]
async fn after_a_failed_first_connect_the_waiting_requests_connect_together() {
    // An "https" upstream that closes its first connection at once (the TLS handshake fails)
    // and holds the next ones open without a word, counting how many are open together.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let (o, m) = (open.clone(), most.clone());
    tokio::spawn(async move {
        drop(listener.accept().await.unwrap());
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let (o, m) = (o.clone(), m.clone());
            tokio::spawn(async move {
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                // Until the agent gives up on it.
                let mut buf = [0u8; 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let agent = Agent::new(&format!("https://127.0.0.1:{}/", addr.port())).await;
    let p = Running::start_with(&agent, |s| s.upstream_timeout = Duration::from_secs(3)).await;
    let answers = futures_util::future::join_all((0..8).map(|_| get(&p, "/v1/models"))).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort_unstable();
    // The first fails its handshake (502); the seven after it time out together (504).
    assert_eq!(statuses, [502, 504, 504, 504, 504, 504, 504, 504]);
    assert_eq!(
        most.load(Ordering::SeqCst),
        7,
        "the seven connected together"
    );
}
