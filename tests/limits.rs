//! Bounded resources, over real sockets: the bodies kept for a 401 replay share one budget; the
//! upstream connections are capped; h2c clients get a modest stream limit; the control socket and
//! the metrics endpoint bound their connections and their clients' head time like the proxy; and
//! the daemon raises its file descriptor limit and keeps the control socket and new clients served
//! under a flood that would exhaust it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use devkit::upstream::{Upstream, UpstreamFault, UpstreamOptions};
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use behest_agent::control::{self, ControlState};
use behest_agent::telemetry::Metrics;
use behest_agent::telemetry::metrics::{self, Health};

use crate::rig::{HANG, Rig, send_on, status_of, within};
use crate::util::{AUDIENCE, Harness, Start, eventually};

/// A chat completion whose body is about `size` bytes.
fn chat_of_size(size: usize) -> Bytes {
    let body = json!({
        "model": "echo-1",
        "messages": [{"role": "user", "content": "x".repeat(size)}],
    });
    Bytes::from(body.to_string())
}

/// An h2c (prior knowledge) connection to the proxy, and the task that drives it (aborting it
/// closes the connection).
async fn h2c(rig: &Rig) -> (SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>) {
    let io = TokioIo::new(TcpStream::connect(rig.addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

fn models(rig: &Rig) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(format!("http://{}/v1/models", rig.host()))
        .body(Empty::new())
        .unwrap()
}

async fn json_body(resp: http::Response<hyper::body::Incoming>) -> Value {
    let bytes = within(resp.into_body().collect()).await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// The replay budget

#[tokio::test]
async fn a_body_beyond_the_replay_budget_is_not_kept_and_its_401_goes_back() {
    let body = chat_of_size(1000);
    let n = body.len();
    let rig = Rig::with(move |s| s.replay_budget = n + n / 2).await;
    within(rig.tokens.get(Duration::ZERO))
        .await
        .expect("a token");
    // A is kept (it fits), and the upstream holds it: its body holds the budget meanwhile.
    rig.up.fail_next(1, UpstreamFault::Hold);
    let mut a = TcpStream::connect(rig.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n",
        rig.host()
    );
    a.write_all(head.as_bytes()).await.unwrap();
    a.write_all(&body).await.unwrap();
    within(rig.up.wait_for(|u| u.requests().len() == 1)).await;
    assert_eq!(rig.stat(&["replay_kept_bytes"]), n as u64);
    // B fits `max_replay_body` but not the budget beside A: it streams, is not kept, and the
    // upstream's 401 goes back to the client instead of a replay.
    rig.up.fail_next(1, UpstreamFault::Unauthorized);
    let b = rig
        .request("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    assert_eq!(rig.send(b).await.status(), 401);
    assert_eq!(rig.up.request_count(), 2, "B was not replayed");
    assert_eq!(rig.stat(&["replays"]), 0);
    // A's client goes away: A's bytes go back to the budget.
    drop(a);
    eventually(HANG, "A's kept body to be given back", || {
        rig.stat(&["replay_kept_bytes"]) == 0
    })
    .await;
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Upstream connections and h2 streams

#[tokio::test]
async fn upstream_connections_are_capped_and_a_request_finding_none_free_gets_503() {
    let rig = Rig::with(|s| {
        s.max_upstream_connections = 2;
        s.connect_timeout = Duration::from_millis(300);
    })
    .await;
    rig.up.fail_next(2, UpstreamFault::Hold);
    let get = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n\r\n", rig.host());
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(rig.addr).await.unwrap();
        s.write_all(get.as_bytes()).await.unwrap();
        held.push(s);
    }
    within(rig.up.wait_for(|u| u.requests().len() == 2)).await;
    // A third request (here a stream of an h2c connection) finds both upstream connections taken
    // and none closing within connect_timeout.
    let (mut sender, _conn) = h2c(&rig).await;
    let resp = within(sender.send_request(models(&rig))).await.unwrap();
    assert_eq!(resp.status(), 503);
    let v = json_body(resp).await;
    assert_eq!(v["error"]["code"], "upstream_busy", "{v}");
    assert_eq!(v["error"]["type"], "behest_agent_error", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("proxy.max_upstream_connections"),
        "{message}"
    );
    assert_eq!(rig.up.connections(), 2);
    assert_eq!(rig.up.request_count(), 2);
    assert_eq!(rig.stat(&["upstream_connections"]), 2);
    // One held request's client goes away: its upstream connection closes and frees a slot.
    drop(held.pop());
    within(rig.up.wait_for(|u| u.cancelled() == 1)).await;
    eventually(HANG, "the cancelled request's connection to close", || {
        rig.stat(&["upstream_connections"]) == 1
    })
    .await;
    let resp = within(sender.send_request(models(&rig))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(rig.up.connections(), 3);
    drop(held);
    rig.finish().await;
}

/// An h2c client cannot multiply `max_connections` by its streams: requests in flight over every
/// connection are bounded by it too, and the one past it gets 503 `overloaded` at once.
#[tokio::test]
async fn requests_in_flight_over_h2c_streams_are_bounded_by_max_connections() {
    let rig = Rig::with(|s| {
        s.max_connections = 2;
        s.max_upstream_connections = 8;
    })
    .await;
    rig.up.fail_next(2, UpstreamFault::Hold);
    let (mut sender, _conn) = h2c(&rig).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = sender.clone();
        let req = models(&rig);
        held.push(tokio::spawn(async move { s.send_request(req).await }));
    }
    within(rig.up.wait_for(|u| u.requests().len() == 2)).await;
    let resp = within(sender.send_request(models(&rig))).await.unwrap();
    assert_eq!(resp.status(), 503);
    let v = json_body(resp).await;
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("proxy.max_connections"), "{message}");
    assert_eq!(
        rig.up.request_count(),
        2,
        "the refused request never went upstream"
    );
    for h in held {
        h.abort();
    }
    // Once the held requests are gone, a request is served again.
    eventually(HANG, "the held requests to end", || {
        rig.stat(&["in_flight"]) == 0
    })
    .await;
    let resp = within(sender.send_request(models(&rig))).await.unwrap();
    assert_eq!(resp.status(), 200);
    rig.finish().await;
}

/// A pooled upstream connection idle for 30 s is closed by the agent (within 15 s more), not kept
/// open until the next request: an agent that falls idle after a burst holds no upstream
/// connections, even to an upstream that would keep them forever.
#[tokio::test]
async fn an_idle_upstream_connection_is_closed_after_30_s() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rig = Rig::builder()
        .upstream_url(format!("http://{}/v1", listener.local_addr().unwrap()))
        .start()
        .await;
    // One answer, then the connection stays open until the agent closes it.
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        crate::util::read_head(&mut s)
            .await
            .expect("the request head arrives");
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
        s.read(&mut [0; 4096]).await.unwrap()
    });
    let resp = rig.get("/v1/models").await;
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    assert_eq!(rig.stat(&["upstream_connections"]), 1);

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(29)).await;
    tokio::task::yield_now().await;
    assert!(!upstream.is_finished(), "closed before 30 s idle");
    tokio::time::advance(Duration::from_secs(17)).await;
    tokio::time::resume();
    assert_eq!(within(upstream).await.unwrap(), 0, "the agent closes it");
    eventually(HANG, "the pool to count it closed", || {
        rig.stat(&["upstream_connections"]) == 0
    })
    .await;
    rig.finish().await;
}

/// SETTINGS_MAX_CONCURRENT_STREAMS (0x3) in the proxy's first SETTINGS frame: 100, where hyper's
/// default is 200.
#[tokio::test]
async fn h2c_clients_are_offered_at_most_100_concurrent_streams() {
    let rig = Rig::start().await;
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    within(s.read_exact(&mut head)).await.unwrap();
    assert_eq!(head[3], 0x4, "a SETTINGS frame first");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    within(s.read_exact(&mut payload)).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(settings.contains(&(0x3, 100)), "{settings:?}");
}

// ---------------------------------------------------------------------------------------------
// The control socket and the metrics endpoint

/// Reads one response (a head and its `Content-Length` body) and returns its status; 0 when the
/// connection closed first.
async fn answer<S: AsyncRead + Unpin>(s: &mut S) -> u16 {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return status_of(&head.replace("http/1.1", "HTTP/1.1"));
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// True when the peer closes the connection rather than keeping it open past [`HANG`].
async fn closes<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(HANG, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A local server (control socket, metrics) closes a client that does not finish its request
/// head, and serves at most 64 connections: a 65th waits, unaccepted, until one goes away. Run
/// with the clock paused, so "nothing happens while everything is idle" is certain rather than a
/// matter of waiting long enough.
async fn assert_local_limits<S, F, C>(connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> C,
    C: Future<Output = S>,
{
    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut slow = connect().await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    assert!(
        closes(&mut slow).await,
        "a head that never ends is not closed"
    );
    drop(slow);

    let mut held = Vec::new();
    for i in 0..64 {
        let mut s = connect().await;
        s.write_all(GET).await.unwrap();
        assert_eq!(within(answer(&mut s)).await, 200, "connection {i}");
        held.push(s);
    }
    let mut extra = connect().await;
    extra.write_all(GET).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_secs(1), extra.read(&mut buf))
            .await
            .is_err(),
        "a 65th connection was served while 64 were open"
    );
    drop(held.pop());
    assert_eq!(within(answer(&mut extra)).await, 200);
}

struct Ready;

impl Health for Ready {
    fn before_scrape(&self, _: &Metrics) {}
    fn ready(&self, _: Option<&str>) -> Result<(), String> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_metrics_endpoint_bounds_its_connections_and_head_read_time() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(metrics::serve(
        listener,
        Arc::new(Metrics::new()),
        Arc::new(Ready),
        stop.clone(),
    ));
    let _stop = stop.drop_guard();
    assert_local_limits(|| async { TcpStream::connect(addr).await.unwrap() }).await;
}

#[tokio::test(start_paused = true)]
async fn the_control_socket_bounds_its_connections_and_head_read_time() {
    let h = Harness::start().await;
    let tokens = h.source(&[], behest_agent::clock::system());
    let path = h.path("run/control.sock");
    let listener = control::bind(&path, 0o600, 0o700).await.unwrap();
    let state = ControlState {
        tokens: Arc::new(move || tokens.clone()),
        profiles: None,
        daemon: Arc::new(|| json!({})),
        live: None,
        keys: None,
        usage: None,
        shutdown: CancellationToken::new(),
    };
    let stop = CancellationToken::new();
    tokio::spawn(control::serve(listener, state, stop.clone()));
    let _stop = stop.drop_guard();
    assert_local_limits(|| async { UnixStream::connect(&path).await.unwrap() }).await;
}

// ---------------------------------------------------------------------------------------------
// File descriptors (the binary)

/// `behest-agent run` under `sh -c 'ulimit …; exec behest-agent run'`, with the harness's
/// environment, its proxy pointed at `upstream`.
fn daemon_under_ulimit(
    h: &Harness,
    ulimit: &str,
    upstream: &Upstream,
    extra: &[(&str, &str)],
) -> tokio::process::Command {
    let mut env = vec![
        ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0"),
        ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
    ];
    env.extend_from_slice(extra);
    let base = upstream.base_url();
    env.push(("BEHEST_AGENT__PROXY__UPSTREAM", base.as_str()));
    let mut c = tokio::process::Command::new("sh");
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", h.dir.path())
        .envs(h.env(&env))
        .arg("-c")
        .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_behest-agent"))
        .arg("run")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    c
}

/// The daemon's control socket, once it answers, and its proxy's address (from `status`).
async fn daemon_ready(h: &Harness) -> (std::path::PathBuf, String) {
    let socket = h.path("run/agent.sock");
    eventually(
        Duration::from_secs(30),
        "the daemon's control socket",
        || socket.exists(),
    )
    .await;
    let status = get_unix(&socket, "/v1/status").await;
    let addr = status["daemon"]["listen"][0]
        .as_str()
        .unwrap_or_else(|| panic!("the proxy's address in {status}"))
        .to_string();
    (socket, addr)
}

async fn get_unix(socket: &std::path::Path, path: &str) -> Value {
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send_on(UnixStream::connect(socket).await.unwrap(), req).await;
    assert_eq!(resp.status(), 200, "{path}");
    json_body(resp).await
}

/// Collects a child's stderr as it is written.
fn collect(stderr: tokio::process::ChildStderr) -> Arc<std::sync::Mutex<String>> {
    let buf = Arc::new(std::sync::Mutex::new(String::new()));
    let out = buf.clone();
    tokio::spawn(async move {
        let mut stderr = stderr;
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
            out.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

/// `Max open files` of a process: (soft, hard).
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut n = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (n.next().unwrap(), n.next().unwrap())
}

#[tokio::test]
async fn run_raises_its_soft_file_descriptor_limit_to_the_hard_one() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("the test's own limit");
    if hard <= 128 {
        eprintln!("skipped: the hard limit ({hard}) leaves no room to raise a soft one");
        return;
    }
    let h = Harness::start().await;
    let (up, _up) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let mut child = daemon_under_ulimit(&h, "-Sn 128", &up, &[])
        .spawn()
        .unwrap();
    daemon_ready(&h).await;
    assert_eq!(nofile(child.id().unwrap()), (hard, hard));
    child.kill().await.unwrap();
}

/// The probe under a limit too small for the defaults: held h2c streams toward an
/// upstream that stalls would take every descriptor, and then the control socket and new
/// clients got nothing. Now the bounds are lowered to fit (with a warning naming the keys), the
/// streams beyond them get 503, and the control socket and a new client are served.
#[tokio::test]
async fn a_stream_flood_under_a_small_fd_limit_leaves_the_control_socket_and_new_clients_served() {
    let h = Harness::start().await;
    let (up, _up) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    up.set_fault(Some(UpstreamFault::Hold));
    let limit = 200;
    let mut child = daemon_under_ulimit(
        &h,
        &format!("-n {limit}"),
        &up,
        &[("BEHEST_AGENT__PROXY__CONNECT_TIMEOUT", "500ms")],
    )
    .spawn()
    .unwrap();
    let stderr = collect(child.stderr.take().unwrap());
    let (socket, addr) = daemon_ready(&h).await;

    let mut streams = Vec::new();
    for _ in 0..2 {
        let io = TokioIo::new(TcpStream::connect(&addr).await.unwrap());
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..100 {
            let req = Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/v1/chat/completions"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            streams.push(tokio::spawn(sender.clone().send_request(req)));
        }
    }
    // Every stream is answered 503 except those the upstream holds, one per upstream connection.
    let cap = (limit - behest_agent::fds::RESERVED) as usize;
    eventually(HANG, "the streams beyond the upstream cap answered", || {
        streams.iter().filter(|s| s.is_finished()).count() >= 200 - cap
    })
    .await;
    eventually(HANG, "the admitted streams to reach the upstream", || {
        up.in_flight() >= 1
    })
    .await;
    assert!(up.connections() as usize <= cap, "{}", up.connections());

    assert_eq!(get_unix(&socket, "/healthz").await["status"], "ok");
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Refused at once (requests in flight are bounded by the lowered max_connections too).
    assert_eq!(within(answer(&mut s)).await, 503, "overloaded");

    child.kill().await.unwrap();
    let logs = stderr.lock().unwrap().clone();
    assert!(
        logs.contains("proxy.max_connections (4096)") && logs.contains("RLIMIT_NOFILE"),
        "{logs}"
    );
    for stream in streams {
        stream.abort();
    }
}
