//! Under faults: the IdP failing in every way we know (what the proxy answers, what `status` and
//! readiness say, recovery without restart), the upstream failing mid-stream, and the process under
//! SIGTERM with many open streams or a slow grant (and a second SIGTERM), SIGHUP storms, a cache
//! file removed at run time, and a clock that jumps a day.

use std::process::Stdio;
use std::time::Duration;

use devkit::idp::Fault;
use devkit::upstream::UpstreamFault;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::proxy::{Stack, http, stack, stack_with};
use crate::util::{eventually, exits_cleanly, signal};

const FAST_BACKOFF: [(&str, &str); 2] = [
    ("BEHEST_AGENT__TOKEN__MIN_BACKOFF", "50ms"),
    ("BEHEST_AGENT__TOKEN__MAX_BACKOFF", "200ms"),
];

async fn models(s: &Stack) -> (u16, Value) {
    let r = http()
        .get(format!("{}/models", s.base))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Before any token: each IdP fault gives a 503 `token_unavailable` naming the problem, readiness
/// is false, `status` has the error code; once the IdP recovers, the agent does too.
#[tokio::test]
async fn each_idp_fault_gives_token_unavailable_then_recovers_without_restart() {
    let cases: Vec<(Fault, &str)> = vec![
        (Fault::Status(500), "http_500"),
        (Fault::Status(502), "http_502"),
        (Fault::Status(503), "http_503"),
        (
            Fault::TooManyRequests {
                retry_after: Some(1),
                reset_in: None,
            },
            "too_many_requests",
        ),
        (
            Fault::TooManyRequests {
                retry_after: None,
                reset_in: Some(1),
            },
            "too_many_requests",
        ),
        (
            Fault::Unavailable {
                retry_after: Some(1),
            },
            "temporarily_unavailable",
        ),
        (Fault::Malformed, "malformed_response"),
        (Fault::Empty, "malformed_response"),
        (Fault::OpaqueToken, "opaque_token"),
        (Fault::BadSignature, "bad_signature"),
        (Fault::JwksDown, "jwks_unavailable"),
        (Fault::Delay(Duration::from_secs(5)), "unreachable"),
    ];
    for (fault, code) in cases {
        let mut extra = FAST_BACKOFF.to_vec();
        extra.push(("BEHEST_AGENT__AUTH__TIMEOUT", "1s"));
        let s = stack_with(|_| {}, &extra).await;
        s.h.idp.set_fault(Some(fault.clone()));
        eventually(Duration::from_secs(30), "a failed grant", || {
            s.tokens.status().last_error.is_some()
        })
        .await;
        let (status, body) = models(&s).await;
        assert_eq!(status, 503, "{fault:?}: {body}");
        assert_eq!(body["error"]["code"], "token_unavailable", "{fault:?}");
        assert!(!s.tokens.is_ready(), "{fault:?}: not ready");
        assert_eq!(
            s.tokens.status().last_error_code.as_deref(),
            Some(code),
            "{fault:?}"
        );
        assert_eq!(
            s.upstream.request_count(),
            0,
            "nothing forwarded without a token"
        );
        s.h.idp.set_fault(None);
        eventually(Duration::from_secs(30), "recovery", || s.tokens.is_ready()).await;
        assert_eq!(models(&s).await.0, 200, "{fault:?}: recovered");
        s.finish().await;
    }
}

#[tokio::test]
async fn an_idp_that_refuses_connections_gives_token_unavailable_with_the_reason() {
    let s = stack_with(
        |_| {},
        &[
            ("BEHEST_AGENT__AUTH__DOMAIN", "http://127.0.0.1:9"),
            FAST_BACKOFF[0],
            FAST_BACKOFF[1],
        ],
    )
    .await;
    let (status, body) = models(&s).await;
    assert_eq!(status, 503);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("cannot reach the IdP"), "{msg}");
    s.finish().await;
}

#[tokio::test]
async fn credentials_revoked_while_a_token_is_cached_keep_the_cached_token_in_service() {
    let s = stack().await;
    assert_eq!(models(&s).await.0, 200);
    s.h.idp.set_fault(Some(Fault::Oauth {
        status: 401,
        error: "invalid_client".into(),
        description: "Client credentials revoked".into(),
    }));
    let err = s.tokens.refresh_now().await.unwrap_err();
    assert!(err.is_config_error());
    assert_eq!(models(&s).await.0, 200, "the cached token is still served");
    assert!(s.tokens.is_ready());
    let st = s.tokens.status();
    assert_eq!(st.last_error_code.as_deref(), Some("invalid_client"));
    assert!(st.last_error.unwrap().contains("revoked"));
    s.finish().await;
}

#[tokio::test]
async fn an_upstream_reset_mid_stream_reaches_the_client_and_in_flight_returns_to_zero() {
    let s = stack().await;
    s.upstream
        .fail_next(1, UpstreamFault::DropStream { after_events: 2 });
    let mut resp = http()
        .post(format!("{}/chat/completions", s.base))
        .json(&json!({"model": "echo-1", "stream": true, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let ended_with_error = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(
        ended_with_error,
        "a cut upstream stream is a cut client stream, not a clean end"
    );
    assert!(!String::from_utf8_lossy(&got).contains("[DONE]"));
    eventually(Duration::from_secs(10), "in-flight back to zero", || {
        s.upstream.in_flight() == 0 && s.metrics.in_flight_requests.get() == 0
    })
    .await;
    assert_eq!(models(&s).await.0, 200, "the proxy still serves");
    s.finish().await;
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let s = stack().await;
    s.upstream.fail_next(1, UpstreamFault::Status(503));
    let (status, body) = models(&s).await;
    assert_eq!(status, 503);
    assert_ne!(
        body["error"]["type"], "behest_agent_error",
        "the upstream's own answer: {body}"
    );
    s.finish().await;
}

// ---- the process

fn daemon(s: &Stack) -> Command {
    let mut c = s.h.agent_with_upstream(
        &s.upstream.base_url(),
        &["run"],
        &[("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0")],
    );
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// The daemon's proxy base URL, from `behest-agent env`.
async fn daemon_base(s: &Stack) -> String {
    let socket = s.h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the daemon's socket", || {
        socket.exists()
    })
    .await;
    let out =
        s.h.agent(&["env", "--format", "dotenv"], &[])
            .output()
            .await
            .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("OPENAI_BASE_URL=")
        .to_string()
}

#[tokio::test]
async fn sigterm_with_100_open_streams_lets_them_all_finish_then_exits_0() {
    let s = stack_with(|o| o.sse_interval = Duration::from_millis(100), &[]).await;
    let mut child = daemon(&s).spawn().unwrap();
    let base = daemon_base(&s).await;
    let client = http();
    let mut streams = Vec::new();
    for i in 0..100 {
        let resp = client
            .post(format!("{base}/chat/completions"))
            .header("x-echo-events", "10")
            .json(&json!({"model": "echo-1", "stream": true, "messages": [{"role": "user", "content": format!("s{i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(resp);
    }
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let mut done = 0;
    for mut r in streams {
        let mut body = Vec::new();
        while let Some(c) = r.chunk().await.expect("not cut within the grace") {
            body.extend_from_slice(&c);
        }
        if String::from_utf8_lossy(&body).contains("data: [DONE]") {
            done += 1;
        }
    }
    assert_eq!(done, 100);
    exits_cleanly(&mut child).await;
    s.finish().await;
}

/// At SIGTERM the listening socket closes at once: a new client is refused, not left in the
/// backlog of a listener nobody accepts on until the open streams are done.
#[tokio::test]
async fn sigterm_closes_the_listener_while_streams_drain() {
    let s = stack_with(|o| o.sse_interval = Duration::from_millis(100), &[]).await;
    let mut child = daemon(&s).spawn().unwrap();
    let base = daemon_base(&s).await;
    let mut stream = http()
        .post(format!("{base}/chat/completions"))
        .header("x-echo-events", "600")
        .json(&json!({"model": "echo-1", "stream": true, "messages": [{"role": "user", "content": "long"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    stream.chunk().await.unwrap().expect("the first event");
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    // Asked of the kernel (/proc/net/tcp: local address, state 0A = LISTEN): a connect would only
    // join the backlog.
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let listening = || {
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f[1] == format!("0100007F:{port:04X}") && f[3] == "0A"
            })
    };
    assert!(listening());
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    eventually(Duration::from_secs(10), "the listener to close", || {
        !listening()
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still draining the stream"
    );
    assert!(
        stream.chunk().await.unwrap().is_some(),
        "the stream goes on"
    );
    let _ = child.kill().await;
    s.finish().await;
}

#[tokio::test]
async fn a_sighup_storm_keeps_serving_and_makes_no_extra_grant() {
    let s = stack().await;
    let mut child = daemon(&s).spawn().unwrap();
    let base = daemon_base(&s).await;
    let client = http();
    let grants_before = s.h.idp.grants();
    for _ in 0..20 {
        signal(&child, nix::sys::signal::Signal::SIGHUP);
        let r = client.get(format!("{base}/models")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(
        s.h.idp.grants() <= grants_before + 1,
        "reloads with the same identity make no grant"
    );
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
    s.finish().await;
}

#[tokio::test]
async fn a_cache_file_removed_at_run_time_is_rewritten_at_the_next_grant() {
    let s = stack().await;
    assert_eq!(models(&s).await.0, 200);
    let cache = s.h.path("state/token.json");
    assert!(cache.exists());
    std::fs::remove_file(&cache).unwrap();
    s.tokens.refresh_now().await.expect("refresh");
    assert!(cache.exists(), "written again at the next grant");
    assert_eq!(crate::util::mode_of(&cache), 0o600);
    assert!(s.tokens.status().cache_error.is_none());
    s.finish().await;
}

#[tokio::test]
async fn a_cache_file_replaced_by_a_directory_keeps_the_token_in_memory_and_says_so() {
    let s = stack().await;
    assert_eq!(models(&s).await.0, 200);
    let cache = s.h.path("state/token.json");
    // A directory where the file should be: the write fails, the token is still served.
    std::fs::remove_file(&cache).unwrap();
    std::fs::create_dir(&cache).unwrap();
    s.tokens
        .refresh_now()
        .await
        .expect("the grant succeeds even though the cache cannot be written");
    assert_eq!(models(&s).await.0, 200);
    let problem = s
        .tokens
        .status()
        .cache_error
        .expect("status names the problem");
    assert!(problem.contains("token.json"), "{problem}");
    s.finish().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_upload_cancels_the_upstream_request() {
    use tokio::io::AsyncWriteExt;
    let s = stack().await;
    let addr = s
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![b'a'; 1 << 20]).await.unwrap();
    s.upstream.wait_for(|u| u.in_flight() == 1).await;
    assert_eq!(s.metrics.in_flight_requests.get(), 1);
    drop(conn);
    eventually(
        Duration::from_secs(10),
        "the upload cancelled on both sides",
        || s.upstream.in_flight() == 0 && s.metrics.in_flight_requests.get() == 0,
    )
    .await;
    assert_eq!(models(&s).await.0, 200, "the proxy still serves");
    s.finish().await;
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_large_streamed_response_passes_through_without_growing_the_agents_memory() {
    let s = stack_with(|o| o.sse_interval = Duration::ZERO, &[]).await;
    let child = daemon(&s).spawn().unwrap();
    let pid = child.id().unwrap();
    let base = daemon_base(&s).await;
    let client = http();
    assert_eq!(
        client
            .get(format!("{base}/models"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let before = rss_kib(pid, "VmRSS:");
    let mut resp = client
        .post(format!("{base}/chat/completions"))
        .header("x-echo-events", "300000")
        .json(&json!({"model": "echo-1", "stream": true, "messages": [{"role": "user", "content": "a long answer"}]}))
        .send()
        .await
        .unwrap();
    let mut bytes = 0usize;
    while let Some(c) = resp.chunk().await.unwrap() {
        bytes += c.len();
    }
    let peak = rss_kib(pid, "VmHWM:");
    assert!(bytes > 40 << 20, "a large response: {bytes} bytes");
    assert!(
        peak < before + 24 * 1024,
        "the agent's peak RSS grew from {before} KiB to {peak} KiB for a {bytes}-byte stream: buffered"
    );
    drop(child);
    s.finish().await;
}

#[tokio::test]
async fn sigterm_during_a_slow_grant_exits_without_waiting_for_the_idp() {
    let h = crate::util::Harness::start().await;
    h.idp
        .set_fault(Some(Fault::Delay(Duration::from_secs(600))));
    let mut child = h
        .agent(&["run"], &[("BEHEST_AGENT__AUTH__TIMEOUT", "20m")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(30), "the grant under way", || {
        h.idp.token_requests() >= 1
    })
    .await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_without_waiting_for_streams() {
    let s = stack_with(|o| o.sse_interval = Duration::from_secs(1), &[]).await;
    let mut cmd = daemon(&s);
    cmd.env("BEHEST_AGENT__PROXY__SHUTDOWN_GRACE", "10m");
    let mut child = cmd.spawn().unwrap();
    let base = daemon_base(&s).await;
    let mut stream = http()
        .post(format!("{base}/chat/completions"))
        .header("x-echo-events", "1000")
        .json(&json!({"model": "echo-1", "stream": true, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    stream.chunk().await.unwrap();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    // The first signal is taken once the proxy stops accepting.
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    eventually(Duration::from_secs(30), "the proxy closed", || {
        std::net::TcpStream::connect(&addr).is_err()
    })
    .await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the second signal ends the wait for the stream")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    s.finish().await;
}
