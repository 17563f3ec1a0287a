//! The proxy end to end through its public API (`Proxy::new`/`bind`/`serve`, `stats`,
//! `attach_metrics`, `replace_with`), on loopback, in front of devkit's echo upstream
//! ([`crate::rig`]): SPEC §4's paths, sessions and headers, the guards this module owns (the
//! open-proxy and smuggling probes are `smuggling`'s), head limits, the 401 replay, streaming,
//! timeouts, cancellation, shutdown, h2c, a TLS upstream with ALPN, the counters and the log line.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devkit::idp::Fault;
use devkit::upstream::{EVENTS_HEADER, Recorded, Upstream, UpstreamFault, UpstreamOptions};
use http::{HeaderMap, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use behest_agent::config::ListenAddr;
use behest_agent::proxy::{Proxy, SetupError};
use behest_agent::telemetry::Metrics;

use crate::rig::{
    HANG, Rig, closed, path_of, read_response, send_on, sha256_hex, status_of, within,
};
use crate::util::{AUDIENCE, Start, eventually, logs, mode_of, random};

/// Status, headers and the body as JSON.
async fn json_of(resp: http::Response<Incoming>) -> (StatusCode, HeaderMap, Value) {
    let (parts, body) = resp.into_parts();
    let bytes = within(body.collect()).await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(&bytes)));
    (parts.status, parts.headers, v)
}

/// Asserts an agent-made OpenAI-shaped error with `status` and `code`.
async fn assert_agent_error(resp: http::Response<Incoming>, status: u16, code: &str) -> Value {
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

/// `GET path` on a new connection, with these fields besides `Host` (repeated names repeated).
async fn get_with(rig: &Rig, path: &str, fields: &[(&str, &str)]) -> http::Response<Incoming> {
    let mut request = rig.request("GET", path);
    for (name, value) in fields {
        request = request.header(*name, *value);
    }
    rig.send(request.body(Empty::<Bytes>::new()).unwrap()).await
}

/// The last request the upstream received.
fn last(rig: &Rig) -> Recorded {
    rig.up
        .requests()
        .pop()
        .expect("the upstream received a request")
}

/// A chat completion asking for `content` back, streamed or not.
fn chat(content: &str, stream: bool) -> Bytes {
    let body = json!({
        "model": "echo-1",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    });
    Bytes::from(body.to_string())
}

/// A streamed chat completion request to the proxy.
fn stream_request(rig: &Rig) -> Request<Full<Bytes>> {
    rig.request("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(chat("one event at a time", true)))
        .unwrap()
}

/// A request body of unknown length (chunked on HTTP/1.1), sent frame by frame.
type Chunked =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// `data` in `chunk`-byte frames.
fn chunked(data: &[u8], chunk: usize) -> Chunked {
    let frames: Vec<_> = data
        .chunks(chunk)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

/// Reads frames until `want` is in what was read.
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

/// Server-sent events in `bytes`.
fn events(bytes: &[u8]) -> usize {
    bytes.windows(2).filter(|w| w == b"\n\n").count()
}

/// An h2c (prior knowledge) connection to the proxy.
async fn h2c(rig: &Rig) -> SendRequest<Empty<Bytes>> {
    let io = TokioIo::new(TcpStream::connect(rig.addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

// ---------------------------------------------------------------------------------------------
// Forwarding and headers

#[tokio::test]
async fn forwards_under_the_base_path_with_the_agent_bearer_instead_of_client_credentials() {
    let rig = Rig::start().await;
    let body = chat("hello", false);
    let request = rig
        .request("POST", "/v1/chat/completions?stream=true&x=%20")
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
        .body(Full::new(body.clone()))
        .unwrap();
    let (status, headers, answer) = json_of(rig.send(request).await).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "hello");
    assert_eq!(
        headers["x-request-id"], "req_0",
        "the upstream's own headers"
    );
    let r = last(&rig);
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/base/v1/chat/completions?stream=true&x=%20");
    assert_eq!(r.body_len, body.len() as u64);
    assert_eq!(r.body_sha256, sha256_hex(&body));
    assert!(rig.carries_only_the_agents_bearer(&r), "{r:?}");
    for gone in [
        "proxy-authorization",
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
    ] {
        assert!(
            r.header_values(gone).is_empty(),
            "{gone} was forwarded: {r:?}"
        );
    }
    assert_eq!(r.header("host"), Some(rig.up_authority().as_str()));
    assert_eq!(r.header("accept"), Some("text/event-stream"));
    assert_eq!(r.header("openai-beta"), Some("assistants=v2"));
    assert_eq!(r.header("openai-organization"), Some("org-1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let id = r.header("x-request-id").expect("a request id is added");
    assert_eq!(id.len(), 32);
    assert_eq!(r.session_id, None);
}

#[tokio::test]
async fn client_request_id_and_session_header_are_kept() {
    let rig = Rig::start().await;
    let resp = get_with(
        &rig,
        "/v1/models",
        &[
            ("x-request-id", "client-chosen"),
            ("x-session-id", "from-header"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let r = last(&rig);
    assert_eq!(r.header_values("x-request-id"), ["client-chosen"]);
    assert_eq!(r.header_values("x-session-id"), ["from-header"]);
}

#[tokio::test]
async fn session_path_prefix_sets_x_session_id_and_is_stripped() {
    let rig = Rig::with(|s| s.session_id = Some("configured".into())).await;
    let (status, _, _) = json_of(rig.get("/s/run%2D42/v1/models?limit=1").await).await;
    assert_eq!(status, 200);
    let r = last(&rig);
    assert_eq!(r.path, "/base/v1/models?limit=1");
    assert_eq!(r.header_values("x-session-id"), ["run-42"]);
}

#[tokio::test]
async fn configured_session_id_is_sent_only_when_the_client_sent_none() {
    let rig = Rig::with(|s| s.session_id = Some("ci-job-7".into())).await;
    assert_eq!(rig.get("/v1/models").await.status(), 200);
    assert_eq!(last(&rig).header_values("x-session-id"), ["ci-job-7"]);
    let resp = get_with(&rig, "/v1/models", &[("x-session-id", "mine")]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(last(&rig).header_values("x-session-id"), ["mine"]);
}

#[tokio::test]
async fn bad_session_ids_are_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let long = format!("/s/{}/v1/models", "x".repeat(129));
    for path in ["/s/a%20b/v1/models", "/s/%00/v1/models", long.as_str()] {
        assert_agent_error(rig.get(path).await, 400, "bad_request").await;
    }
    let resp = get_with(&rig, "/v1/models", &[("x-session-id", "has space")]).await;
    assert_agent_error(resp, 400, "bad_request").await;
    assert_eq!(rig.up.request_count(), 0);
}

/// `X-Session-Id` follows the one rule of `/s/ID/`: every value is checked, and a request names
/// one session (a second header, valid or not, would go upstream unchecked or split the cost).
#[tokio::test]
async fn a_second_x_session_id_header_is_refused_and_never_forwarded() {
    let rig = Rig::start().await;
    let long = "x".repeat(129);
    for second in ["has space", "also-valid", long.as_str()] {
        let resp = get_with(
            &rig,
            "/v1/models",
            &[("x-session-id", "job-1"), ("x-session-id", second)],
        )
        .await;
        let v = assert_agent_error(resp, 400, "bad_request").await;
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("X-Session-Id")),
            "{v}"
        );
    }
    assert_eq!(rig.up.request_count(), 0);
}

#[tokio::test]
async fn header_names_with_an_underscore_are_not_forwarded() {
    let rig = Rig::start().await;
    let resp = get_with(
        &rig,
        "/v1/models",
        &[("x_session_id", "spoofed"), ("x-kept", "1")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let r = last(&rig);
    assert_eq!(r.header("x-kept"), Some("1"));
    assert!(r.header_values("x_session_id").is_empty(), "{r:?}");
    assert_eq!(r.session_id, None);
}

// ---------------------------------------------------------------------------------------------
// Guards (the open-proxy probes are `smuggling`'s)

#[tokio::test]
async fn absolute_form_to_the_upstream_itself_is_forwarded_under_its_base() {
    let rig = Rig::start().await;
    let up = rig.up_authority();
    let line = format!(
        "GET http://{up}/base/v1/models?a=1 HTTP/1.1\r\nHost: {up}\r\nConnection: close\r\n\r\n"
    );
    let out = rig.probe(line.as_bytes()).await;
    assert_eq!(out.status, 200, "{}", out.text);
    assert_eq!(last(&rig).path, "/base/v1/models?a=1");
    // Outside the base path: refused.
    let line = format!("GET http://{up}/other HTTP/1.1\r\nHost: {up}\r\n\r\n");
    let out = rig.probe(line.as_bytes()).await;
    assert_eq!(out.status, 400, "{}", out.text);
    assert!(out.refused());
    assert_eq!(rig.up.request_count(), 1);
}

#[tokio::test]
async fn browser_origin_is_refused_unless_configured() {
    let rig = Rig::with(|s| s.allowed_origins = vec!["https://tools.example".to_string()]).await;
    let request = |origin: &str| {
        rig.request("POST", "/v1/chat/completions")
            .header("origin", origin)
            .header("content-type", "application/json")
            .body(Full::new(chat("from a page", false)))
            .unwrap()
    };
    assert_agent_error(
        rig.send(request("https://evil.example")).await,
        403,
        "forbidden_origin",
    )
    .await;
    assert_eq!(rig.up.request_count(), 0);
    let (status, _, _) = json_of(rig.send(request("https://tools.example")).await).await;
    assert_eq!(status, 200);
    assert_eq!(last(&rig).header("origin"), Some("https://tools.example"));
}

// ---------------------------------------------------------------------------------------------
// Request-head limits

#[tokio::test]
async fn request_head_over_32_kib_gets_431() {
    let rig = Rig::start().await;
    // Exactly 32 KiB of a head that is still not complete: hyper has read every byte sent when it
    // gives up, so its 431 is not lost to a reset.
    let mut head =
        format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\nX-Big: ", rig.host()).into_bytes();
    head.resize(behest_agent::server::MAX_HEAD, b'a');
    let (out, mut s) = rig.probe_on(&head).await;
    assert_eq!(out.status, 431, "{}", out.text);
    assert!(closed(&mut s).await);
    assert_eq!(rig.up.request_count(), 0);
}

#[tokio::test]
async fn more_than_100_headers_get_431() {
    let rig = Rig::start().await;
    let mut head = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n", rig.host());
    for i in 0..100 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let out = rig.probe(head.as_bytes()).await;
    assert_eq!(out.status, 431, "{}", out.text);
    assert!(out.refused());
    // 100 in all is fine. (Hop-by-hop fields among them, so that what the agent adds leaves the
    // forwarded request within the upstream's own limit of 100.)
    let mut head = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nTE: trailers\r\n",
        rig.host()
    );
    for i in 0..95 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let out = rig.probe(head.as_bytes()).await;
    assert_eq!(out.status, 200, "{}", out.text);
    let r = last(&rig);
    assert_eq!(r.header("x-h94"), Some("v"));
    assert_eq!(rig.up.request_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Streaming

#[tokio::test]
async fn sse_events_reach_the_client_one_by_one() {
    let rig = Rig::start().await;
    rig.up
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let resp = rig.send(stream_request(&rig)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    // The upstream sends its second event only once let go on: the first came through alone.
    read_until(&mut body, &mut seen, b"\n\n").await;
    assert_eq!(events(&seen), 1);
    rig.up.resume_stream();
    read_until(&mut body, &mut seen, b"data: [DONE]\n\n").await;
    assert!(within(body.frame()).await.is_none());
    assert_eq!(events(&seen), last(&rig).sse_sent_at.len());
}

#[tokio::test]
async fn multi_mib_request_bodies_stream_through_intact() {
    let rig = Rig::start().await;
    let boundary = "behest-rig-7MA4YWxk";
    let file: Vec<u8> = (0..6 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    // Chunked, of unknown size: never kept for a replay, streamed as it comes.
    let request = rig
        .request("POST", "/v1/files")
        .header("content-type", &content_type)
        .body(chunked(&body, 64 * 1024))
        .unwrap();
    let (status, _, answer) = json_of(rig.send(request).await).await;
    assert_eq!(status, 200, "{answer}");
    // With a Content-Length over the replay limit: not kept either.
    let request = rig
        .request("POST", "/v1/files")
        .header("content-type", &content_type)
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let (status, _, answer) = json_of(rig.send(request).await).await;
    assert_eq!(status, 200, "{answer}");
    let seen = rig.up.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.body_len, body.len() as u64);
        assert_eq!(r.body_sha256, sha256_hex(&body));
        let upload = r.upload.as_ref().expect("the file part");
        assert_eq!(upload.sha256, sha256_hex(&file));
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_are_served() {
    let rig = Rig::start().await;
    let mut sender = h2c(&rig).await;
    let r = Request::builder()
        .uri(format!("http://{}/s/h2job/v1/models", rig.host()))
        .header("authorization", "Bearer sk-client")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (status, _, _) = json_of(resp).await;
    assert_eq!(status, 200);
    let r = last(&rig);
    assert_eq!(r.path, "/base/v1/models");
    assert_eq!(r.session_id.as_deref(), Some("h2job"));
    assert!(rig.carries_only_the_agents_bearer(&r), "{r:?}");
    // `:authority` is the Host of h2: a foreign one is refused.
    let r = Request::builder()
        .uri("http://evil.example/v1/models")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_agent_error(resp, 403, "forbidden_host").await;
    // h2 has no header-count limit of its own: over 100 fields get 431 from the proxy.
    let mut r = Request::builder().uri(format!("http://{}/v1/models", rig.host()));
    for i in 0..101 {
        r = r.header(format!("x-h{i}"), "v");
    }
    let resp = within(sender.send_request(r.body(Empty::<Bytes>::new()).unwrap()))
        .await
        .unwrap();
    assert_agent_error(resp, 431, "request_header_fields_too_large").await;
    assert_eq!(rig.up.request_count(), 1);
    // h2 lets a client split `Cookie` into several fields; the HTTP/1.1 upstream gets one.
    let r = Request::builder()
        .uri(format!("http://{}/v1/models", rig.host()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let r = last(&rig);
    let cookies: Vec<_> = r.headers.iter().filter(|(n, _)| n == "cookie").collect();
    assert_eq!(cookies, [&("cookie".to_string(), "a=1; b=2".to_string())]);
}

// ---------------------------------------------------------------------------------------------
// Token and 401 replay

#[tokio::test]
async fn upstream_401_refreshes_the_token_and_replays_the_request_once() {
    let rig = Rig::start().await;
    // The agent holds a token; then the IdP rotates its key and drops the old one, so the
    // upstream refuses that token.
    within(rig.tokens.get(Duration::ZERO))
        .await
        .expect("a first token");
    rig.h.idp.rotate_key(false);
    let request = rig
        .request("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(chat("again", false)))
        .unwrap();
    let (status, _, answer) = json_of(rig.send(request).await).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "again",
        "the replay carried the body"
    );
    let seen = rig.up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].status, Some(401));
    assert_eq!(seen[0].claims, None, "the first try carried the old token");
    assert!(
        rig.carries_only_the_agents_bearer(&seen[1]),
        "the replay carries the new token: {:?}",
        seen[1]
    );
    assert_eq!(
        rig.h.idp.grants(),
        2,
        "one grant for the first token, one to replace it"
    );
    assert_eq!(rig.stat(&["replays"]), 1);
}

/// The replay after a 401 sends the head the client sent (every field, repeated ones in order),
/// with only the token new.
#[tokio::test]
async fn a_replay_carries_the_clients_head_as_the_first_try_did() {
    let rig = Rig::start().await;
    rig.up.fail_next(1, UpstreamFault::Unauthorized);
    let resp = get_with(
        &rig,
        "/s/job-7/v1/models?limit=2",
        &[
            ("x-request-id", "r-1"),
            ("x-stainless-lang", "js"),
            ("x-multi", "one"),
            ("accept", "application/json"),
            ("x-multi", "two, three"),
            ("authorization", "Bearer placeholder"),
        ],
    )
    .await;
    let (status, _, _) = json_of(resp).await;
    assert_eq!(status, 200);
    let seen = rig.up.requests();
    let [first, replay] = seen.as_slice() else {
        panic!("a first try and a replay, got {seen:?}");
    };
    assert_eq!(first.status, Some(401));
    assert_eq!(first.header_values("x-multi"), ["one", "two, three"]);
    assert_eq!(first.session_id.as_deref(), Some("job-7"));
    assert_eq!(
        (&replay.method, &replay.path, &replay.headers),
        (&first.method, &first.path, &first.headers)
    );
    assert!(rig.carries_only_the_agents_bearer(first), "{first:?}");
    assert!(rig.carries_only_the_agents_bearer(replay), "{replay:?}");
}

#[tokio::test]
async fn a_chunked_body_of_unknown_length_streams_and_its_401_goes_back() {
    // Only a body whose length is announced and fits `max_replay_body` is kept for a replay; one
    // of unknown length streams through as it comes.
    let rig = Rig::start().await;
    rig.up.fail_next(1, UpstreamFault::Unauthorized);
    let data = vec![b'x'; 100_000];
    let request = rig
        .request("POST", "/v1/files")
        .body(chunked(&data, 10_000))
        .unwrap();
    assert_eq!(rig.send(request).await.status(), 401);
    assert_eq!(rig.up.request_count(), 1);
    assert_eq!(last(&rig).body_len, 100_000);
    assert_eq!(rig.stat(&["replays"]), 0);
}

#[tokio::test]
async fn a_body_that_comes_in_two_parts_goes_out_whole_and_is_replayed_whole() {
    // First to an upstream that takes the token, then to one that refuses it once: the first part
    // comes with the head, the second later (a body this small is read whole before it is sent).
    let body = br#"{"input": "in two parts"}"#;
    for rejections in [0, 1] {
        let rig = Rig::start().await;
        rig.up.fail_next(rejections, UpstreamFault::Unauthorized);
        let mut s = TcpStream::connect(rig.addr).await.unwrap();
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            rig.host(),
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body[..4]).await.unwrap();
        s.flush().await.unwrap();
        s.write_all(&body[4..]).await.unwrap();
        let text = within(read_response(&mut s)).await;
        assert_eq!(status_of(&text), 200, "{text}");
        let seen = rig.up.requests();
        assert_eq!(seen.len(), 1 + rejections as usize);
        for r in &seen {
            let len = body.len().to_string();
            assert_eq!(
                r.header("content-length"),
                Some(len.as_str()),
                "{rejections}"
            );
            assert_eq!(r.body_sha256, sha256_hex(body), "{rejections}");
        }
        assert_eq!(rig.stat(&["replays"]), u64::from(rejections));
    }
}

#[tokio::test]
async fn an_h2_request_body_is_replayed_after_401() {
    let rig = Rig::start().await;
    rig.up.fail_next(1, UpstreamFault::Unauthorized);
    let io = TokioIo::new(TcpStream::connect(rig.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = br#"{"model":"embed-1","input":"h2"}"#;
    // With and without a length: h2 may say it or not. (An h2 body's DATA frame is usually not
    // read yet when the handler first looks.)
    for with_length in [true, false] {
        let mut r = Request::builder()
            .method("POST")
            .uri(format!("http://{}/v1/embeddings", rig.host()));
        if with_length {
            r = r.header("content-length", body.len());
        }
        let r = r.body(Full::new(Bytes::from_static(body))).unwrap();
        let resp = within(sender.send_request(r)).await.unwrap();
        let (status, _, answer) = json_of(resp).await;
        assert_eq!(status, 200, "{with_length}: {answer}");
    }
    let seen = rig.up.requests();
    assert_eq!(seen.len(), 3, "the first request was refused and replayed");
    for r in &seen {
        assert_eq!(r.body_sha256, sha256_hex(body));
    }
    assert_eq!(rig.stat(&["replays"]), 1);
}

#[tokio::test]
async fn a_token_the_upstream_keeps_refusing_is_replaced_once_and_its_401_goes_back_as_is() {
    let rig = Rig::start().await;
    rig.up.set_fault(Some(UpstreamFault::Unauthorized));
    let resp = rig.get("/v1/models").await;
    assert_eq!(resp.status(), 401);
    let (_, headers, body) = json_of(resp).await;
    // The upstream's answer, not one the agent made.
    assert_eq!(headers["x-request-id"], "req_1");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert_eq!(rig.up.request_count(), 2, "one replay, no more");
    assert_eq!(rig.stat(&["replays"]), 1);
    assert_eq!(rig.stat(&["responses", "4xx"]), 1);
    for _ in 0..4 {
        assert_eq!(rig.get("/v1/models").await.status(), 401);
    }
    assert_eq!(rig.h.idp.grants(), 2, "one refresh, not one per request");
    assert_eq!(rig.up.request_count(), 6, "no replay without a new token");
    assert_eq!(rig.stat(&["replays"]), 1);
}

#[tokio::test]
async fn a_401_on_a_body_too_big_to_keep_is_returned_without_replay() {
    let rig = Rig::with(|s| s.max_replay_body = 1024).await;
    rig.up.fail_next(2, UpstreamFault::Unauthorized);
    // Its Content-Length says it is too big: never kept.
    let request = rig
        .request("POST", "/v1/files")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    assert_eq!(rig.send(request).await.status(), 401);
    assert_eq!(rig.up.request_count(), 1);
    // Chunked, outgrowing the limit on the way: no replay either.
    let request = rig
        .request("POST", "/v1/files")
        .body(chunked(&[b'x'; 8 * 1024], 1024))
        .unwrap();
    assert_eq!(rig.send(request).await.status(), 401);
    assert_eq!(rig.up.request_count(), 2);
    assert_eq!(rig.stat(&["replays"]), 0);
}

#[tokio::test]
async fn no_token_answers_503_token_unavailable_with_the_grants_error_and_no_secret() {
    let rig = Rig::start().await;
    rig.h.idp.set_fault(Some(Fault::Status(503)));
    let v = assert_agent_error(rig.get("/v1/models").await, 503, "token_unavailable").await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("503"), "{message}");
    assert!(!message.contains(&rig.h.secret), "{message}");
    assert_eq!(rig.up.request_count(), 0);
}

/// With no token held, a request the guards refuse is answered at once: it never waits for (or
/// spends) a grant, and never reaches the upstream. A good one then gets the first grant.
#[tokio::test]
async fn a_refused_request_with_no_token_held_spends_no_grant() {
    let rig = Rig::start().await;
    assert_agent_error(rig.get("/s/a%20b/v1/models").await, 400, "bad_request").await;
    let request = rig
        .request("POST", "/v1/chat/completions")
        .header("origin", "https://evil.example")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_agent_error(rig.send(request).await, 403, "forbidden_origin").await;
    assert_eq!(rig.h.idp.token_requests(), 0);
    assert_eq!(rig.up.request_count(), 0);
    assert_eq!(rig.get("/v1/models").await.status(), 200);
    assert_eq!(rig.h.idp.grants(), 1);
}

// ---------------------------------------------------------------------------------------------
// Upstream failures, timeouts, cancellation

#[tokio::test]
async fn unreachable_upstream_answers_502_in_the_openai_shape() {
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let rig = Rig::builder()
        .upstream_url(format!("http://{closed_port}/base"))
        .start()
        .await;
    let v = assert_agent_error(rig.get("/v1/models").await, 502, "upstream_unreachable").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&closed_port.to_string()),
        "{v}"
    );
    assert_eq!(rig.stat(&["upstream_errors"]), 1);
    assert_eq!(rig.stat(&["responses", "5xx"]), 1);
}

#[tokio::test]
async fn an_https_upstream_url_for_a_plain_http_server_says_so() {
    // A plain HTTP server answers the TLS hello with a 400 in clear text.
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = plain.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        while let Ok((mut c, _)) = plain.accept().await {
            let _ = c.read(&mut [0; 1024]).await;
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let rig = Rig::builder()
        .upstream_url(format!("https://{addr}/base"))
        .start()
        .await;
    let v = assert_agent_error(rig.get("/v1/models").await, 502, "upstream_unreachable").await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("speaks plain HTTP"), "{v}");
    serving.abort();
}

#[tokio::test]
async fn an_upstream_that_never_finishes_its_tls_handshake_is_given_up_at_connect_timeout() {
    // Accepts the connection, then says nothing: a TLS handshake (or an egress proxy's CONNECT)
    // that never ends is bounded by connect_timeout, not left to upstream_timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let rig = Rig::builder()
        .upstream_url(format!("https://{addr}/base"))
        .proxy(|s| {
            s.connect_timeout = Duration::from_millis(300);
            s.upstream_timeout = Duration::from_secs(3600);
        })
        .start()
        .await;
    let v = assert_agent_error(rig.get("/v1/models").await, 502, "upstream_unreachable").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no connection within 300ms"),
        "{v}"
    );
    held.abort();
}

#[tokio::test]
async fn upstream_silent_past_upstream_timeout_answers_504() {
    let rig = Rig::with(|s| s.upstream_timeout = Duration::from_millis(50)).await;
    rig.up.set_fault(Some(UpstreamFault::Hold));
    assert_agent_error(rig.get("/v1/models").await, 504, "upstream_timeout").await;
    assert_eq!(rig.stat(&["upstream_errors"]), 1);
}

/// The HTTP/1 requests of a connection share one upstream timer: each is still bounded by its
/// own deadline (not the one before's), and a timeout does not spill into the next request.
#[tokio::test]
async fn each_request_on_a_kept_alive_connection_has_its_own_upstream_timeout() {
    let timeout = Duration::from_millis(300);
    let rig = Rig::with(move |s| s.upstream_timeout = timeout).await;
    let io = TokioIo::new(TcpStream::connect(rig.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    for slow in [false, true, false, true, true, false] {
        if slow {
            rig.up.fail_next(1, UpstreamFault::Hold);
        }
        let started = Instant::now();
        let request = rig
            .request("GET", "/v1/models")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = within(sender.send_request(request)).await.unwrap();
        if slow {
            assert_agent_error(resp, 504, "upstream_timeout").await;
            // Not before its own deadline (a correctness bound, not a speed one).
            assert!(started.elapsed() >= timeout, "timed out early");
        } else {
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
        }
    }
    assert_eq!(rig.stat(&["upstream_errors"]), 3);
}

/// h2 streams run together: each has an upstream timer of its own, and all of them time out.
#[tokio::test]
async fn concurrent_h2_streams_each_time_out() {
    let rig = Rig::with(|s| s.upstream_timeout = Duration::from_millis(200)).await;
    rig.up.set_fault(Some(UpstreamFault::Hold));
    let sender = h2c(&rig).await;
    let answers = futures_util::future::join_all((0..3).map(|_| {
        let mut sender = sender.clone();
        let r = Request::builder()
            .uri(format!("http://{}/v1/models", rig.host()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        async move { within(sender.send_request(r)).await.unwrap() }
    }))
    .await;
    for resp in answers {
        assert_agent_error(resp, 504, "upstream_timeout").await;
    }
    assert_eq!(rig.up.request_count(), 3);
}

#[tokio::test]
async fn a_stream_silent_past_idle_timeout_is_cut() {
    let rig = Rig::with(|s| s.idle_timeout = Duration::from_millis(50)).await;
    // One event, then never another byte, never the end.
    rig.up
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let resp = rig.send(stream_request(&rig)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"\n\n").await;
    let end = within(body.frame()).await;
    assert!(
        matches!(end, Some(Err(_))),
        "the stream is cut, not ended cleanly: {end:?}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_a_stream_is_cut_after_idle_timeout() {
    // A stream far longer than the socket buffers, sent as fast as it is read; the client reads
    // nothing.
    let rig = Rig::builder()
        .upstream(|o| o.sse_interval = Duration::ZERO)
        .proxy(|s| s.idle_timeout = Duration::from_millis(300))
        .start()
        .await;
    let body = chat("long", true);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\n{EVENTS_HEADER}: 1000000\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        rig.host(),
        body.len()
    );
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    // Buffers fill up; no byte moves either way; the agent cuts both sides.
    within(rig.up.wait_for(|u| u.cancelled() == 1)).await;
    let mut rest = Vec::new();
    within(s.read_to_end(&mut rest)).await.ok();
    eventually(HANG, "the client connection to be closed", || {
        rig.stat(&["connections"]) == 0
    })
    .await;
}

/// An h2c client that stops reading a stream (its window stays shut) is cut after `idle_timeout`
/// though it keeps bytes moving with PINGs: the stream held its request slot and upstream
/// connection for as long as the client liked.
#[tokio::test]
async fn an_h2c_stream_the_client_stops_reading_is_cut_though_pings_flow() {
    let rig = Rig::builder()
        .upstream(|o| o.sse_interval = Duration::ZERO)
        .proxy(|s| s.idle_timeout = Duration::from_millis(300))
        .start()
        .await;
    let io = TokioIo::new(TcpStream::connect(rig.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .initial_stream_window_size(0)
        .keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let r = Request::post(format!("http://{}/v1/chat/completions", rig.host()))
        .header(EVENTS_HEADER, "1000000")
        .header("content-type", "application/json")
        .body(Full::new(chat("long", true)))
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The head came (it is not flow-controlled); no byte of the body can. The agent closes the
    // connection, and the client's task ends.
    within(conn).await.unwrap().ok();
    within(rig.up.wait_for(|u| u.cancelled() == 1)).await;
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_after_idle_timeout() {
    let rig = Rig::with(|s| s.idle_timeout = Duration::from_millis(200)).await;
    let io = TokioIo::new(TcpStream::connect(rig.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let r = Request::builder()
        .uri(format!("http://{}/v1/models", rig.host()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send_request(r)).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    // No request after it: the agent closes the connection (the client's task then ends).
    within(conn).await.unwrap().ok();
    eventually(HANG, "the connection to be gone", || {
        rig.stat(&["connections"]) == 0
    })
    .await;
}

/// Before any request too: an h2c client that sends its preface and nothing else is an idle
/// connection, not a slow request head (it lived until `header_read_timeout`).
#[tokio::test]
async fn an_h2c_connection_without_a_request_is_closed_after_idle_timeout() {
    let rig = Rig::with(|s| {
        s.idle_timeout = Duration::from_millis(200);
        s.header_read_timeout = Duration::from_secs(3600);
    })
    .await;
    let io = TokioIo::new(TcpStream::connect(rig.addr).await.unwrap());
    let (_sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), io)
            .await
            .unwrap();
    within(conn).await.ok();
    eventually(HANG, "the connection to be gone", || {
        rig.stat(&["connections"]) == 0
    })
    .await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let rig = Rig::start().await;
    rig.up.set_fault(Some(UpstreamFault::Hold));
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    let head = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n\r\n", rig.host());
    s.write_all(head.as_bytes()).await.unwrap();
    within(rig.up.wait_for(|u| u.requests().len() == 1)).await;
    assert_eq!(rig.stat(&["in_flight"]), 1);
    drop(s);
    within(rig.up.wait_for(|u| u.cancelled() == 1)).await;
    eventually(HANG, "the request to be over", || {
        rig.stat(&["in_flight"]) == 0
    })
    .await;
}

/// A request waiting for an upstream connection when all are taken gets the first one that goes
/// back idle (it waited for one to close, which an idle pooled connection does not do for 30 s,
/// and got 503 `upstream_busy`).
#[tokio::test]
async fn a_request_waiting_for_an_upstream_connection_gets_one_that_goes_back_idle() {
    let rig = Rig::with(|s| {
        s.max_upstream_connections = 1;
        s.connect_timeout = Duration::from_secs(10);
    })
    .await;
    rig.up
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let resp = rig.send(stream_request(&rig)).await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"\n\n").await;
    // A second request finds the one connection taken, and waits.
    let req = rig
        .request("GET", "/v1/models")
        .body(Full::<Bytes>::default())
        .unwrap();
    let waiting = tokio::spawn(send_on(TcpStream::connect(rig.addr).await.unwrap(), req));
    eventually(HANG, "the second request in flight", || {
        rig.stat(&["in_flight"]) == 2
    })
    .await;
    rig.up.resume_stream();
    read_until(&mut body, &mut seen, b"data: [DONE]\n\n").await;
    assert!(within(body.frame()).await.is_none());
    assert_eq!(within(waiting).await.unwrap().status(), 200);
    assert_eq!(rig.up.connections(), 1, "the same connection served both");
}

/// An upstream that closes each connection right after its answer without saying so: a POST
/// waiting for a connection is not handed one it is closing (a request with a body is never sent
/// twice, so it would fail with 502); it gets a new one.
#[tokio::test]
async fn a_waiting_post_gets_a_new_connection_not_one_the_upstream_is_closing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let (go, received) = (go.clone(), received.clone());
        async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (go, received) = (go.clone(), received.clone());
                tokio::spawn(async move {
                    // Each request's head and its small body arrive together.
                    if crate::util::read_head(&mut s).await.is_none() {
                        return;
                    }
                    received.fetch_add(1, Ordering::SeqCst);
                    let _ = go.acquire().await.unwrap();
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    // Closed a moment after, unread, with no `Connection: close` said.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        }
    });
    let rig = Rig::builder()
        .upstream_url(format!("http://{addr}"))
        .proxy(|s| {
            s.max_upstream_connections = 2;
            s.connect_timeout = Duration::from_secs(10);
        })
        .start()
        .await;
    let post = || {
        let req = rig
            .request("POST", "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let addr = rig.addr;
        tokio::spawn(async move { send_on(TcpStream::connect(addr).await.unwrap(), req).await })
    };
    let posts: Vec<_> = (0..3).map(|_| post()).collect();
    eventually(HANG, "three requests in flight", || {
        rig.stat(&["in_flight"]) == 3
    })
    .await;
    go.add_permits(3);
    for p in posts {
        assert_eq!(within(p).await.unwrap().status(), 200);
    }
    assert_eq!(received.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_it_upstream_and_its_connection_is_not_reused() {
    let rig = Rig::start().await;
    rig.up
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let resp = rig.send(stream_request(&rig)).await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"\n\n").await;
    drop(body);
    within(rig.up.wait_for(|u| u.cancelled() == 1)).await;
    // The next stream cannot get the connection that carried the first one.
    let resp = rig.send(stream_request(&rig)).await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"data: [DONE]\n\n").await;
    assert_eq!(rig.up.connections(), 2);
}

/// Reads one request head and answers `{}`.
async fn answer_once(s: &mut TcpStream) -> bool {
    let Some(head) = crate::util::read_head(s).await else {
        return false;
    };
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
    // A protocol probe rather than an upstream: one request per connection, closed after the
    // answer without `Connection: close`, as a server does when its keep-alive timeout fires just
    // after a response.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut accepted = 0;
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            accepted += 1;
            tokio::spawn(async move { answer_once(&mut s).await });
            if accepted == 20 {
                return accepted;
            }
        }
    });
    let rig = Rig::builder()
        .upstream_url(format!("http://{addr}"))
        .start()
        .await;
    for i in 0..20 {
        let resp = rig.get("/v1/models").await;
        assert_eq!(resp.status(), 200, "request {i}");
        let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}");
        if i % 2 == 0 {
            // Give the closed connection's task a turn sometimes, and sometimes not.
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(within(server).await.unwrap(), 20, "a connection a request");
}

/// An upstream that closes a kept-alive connection just as the next request is written: a GET
/// without a body is sent again on a new connection, a POST is not (502, seen once).
#[tokio::test]
async fn a_close_racing_a_reused_connection_repeats_a_get_but_never_a_post() {
    for (method, status, seen) in [("GET", 200, 2), ("POST", 502, 1)] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The first connection answers one request, then reads the next and closes unanswered;
        // the others answer. Counts the requests after the first.
        let heads = Arc::new(AtomicUsize::new(0));
        let counted = heads.clone();
        let server = tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.unwrap();
            assert!(answer_once(&mut first).await);
            if crate::util::read_head(&mut first).await.is_some() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            drop(first);
            while let Ok((mut s, _)) = listener.accept().await {
                if answer_once_any(&mut s).await {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let rig = Rig::builder()
            .upstream_url(format!("http://{addr}"))
            .start()
            .await;
        let resp = rig.get("/v1/models").await;
        within(resp.into_body().collect()).await.unwrap();
        let req = rig
            .request(method, "/v1/models")
            .body(Empty::<Bytes>::new());
        let resp = rig.send(req.unwrap()).await;
        assert_eq!(resp.status(), status, "{method}");
        // Sent again (or not) before the answer: nothing more comes after it.
        assert_eq!(
            heads.load(Ordering::SeqCst),
            seen,
            "{method}: requests after the first"
        );
        server.abort();
    }
}

/// A refusal before the body is read (here an unknown profile) leaves an HTTP/1 connection
/// usable when the body comes after the head: the proxy reads it away. (It closed the connection
/// with the body unread, and the reset that followed could take the refusal with it.)
#[tokio::test]
async fn a_refused_request_whose_body_comes_late_keeps_its_connection() {
    let rig = Rig::start().await;
    let mut c = TcpStream::connect(rig.addr).await.unwrap();
    let body = br#"{"model":"m","messages":[]}"#;
    for i in 0..5 {
        let head = format!(
            "POST /p/nope/v1/chat/completions HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            rig.host(),
            body.len()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        // The head alone first: the refusal is decided before the body arrives.
        let mut first = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(50), c.peek(&mut first)).await;
        c.write_all(body).await.unwrap();
        let head = within(crate::util::read_head(&mut c))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "request {i} (answered early: {}): the connection closed",
                    early.is_ok()
                )
            });
        let text = String::from_utf8_lossy(&head).to_lowercase();
        assert!(text.starts_with("http/1.1 404"), "{text}");
        assert!(!text.contains("connection: close"), "{text}");
        let length: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let at = text.find("\r\n\r\n").unwrap() + 4;
        let mut rest = head[at..].to_vec();
        while rest.len() < length {
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "request {i}: the body was cut");
            rest.extend_from_slice(&buf[..n]);
        }
    }
}

/// Reads one request head, whatever it is, and answers `{}`.
async fn answer_once_any(s: &mut TcpStream) -> bool {
    if crate::util::read_head(s).await.is_none() {
        return false;
    }
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .is_ok()
}

/// An upstream answer with both lengths is read as chunked (RFC 9112 §6.1), and its
/// Content-Length is not forwarded: the client would wait for 100 bytes and get 2 (h2: a
/// PROTOCOL_ERROR).
#[tokio::test]
async fn an_upstream_content_length_beside_transfer_encoding_is_not_forwarded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        if crate::util::read_head(&mut s).await.is_none() {
            return;
        }
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            )
            .await;
    });
    let rig = Rig::builder()
        .upstream_url(format!("http://{addr}"))
        .start()
        .await;
    let resp = rig.get("/v1/models").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("content-length").is_none(),
        "{:?}",
        resp.headers()
    );
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
}

/// An upstream answer hyper cannot read (a head of 101 fields) is a 502 `bad_upstream_response`
/// that says so: the upstream was reached (it was `upstream_unreachable`, "cannot reach").
#[tokio::test]
async fn an_unreadable_upstream_head_is_a_bad_response_not_an_unreachable_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        if crate::util::read_head(&mut s).await.is_none() {
            return;
        }
        let fields: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
        let answer = format!("HTTP/1.1 200 OK\r\n{fields}content-length: 2\r\n\r\nok");
        let _ = s.write_all(answer.as_bytes()).await;
    });
    let rig = Rig::builder()
        .upstream_url(format!("http://{addr}"))
        .start()
        .await;
    let resp = rig.get("/v1/models").await;
    assert_eq!(resp.status(), 502);
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("\"code\":\"bad_upstream_response\"") && text.contains("head"),
        "{text}"
    );
}

/// An upstream response head is read up to 64 KiB (the status line and fields): one just under
/// is passed on, one just over is a 502 `bad_upstream_response`.
#[tokio::test]
async fn an_upstream_head_over_64_kib_is_a_bad_response() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Some(head) = crate::util::read_head(&mut s).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap();
                let size: usize = target.rsplit('/').next().unwrap().parse().unwrap();
                let start = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-big: ";
                let value = "a".repeat(size - start.len() - 4);
                let answer = format!("{start}{value}\r\n\r\nok");
                assert_eq!(answer.len(), size + 2);
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let rig = Rig::builder()
        .upstream_url(format!("http://{addr}"))
        .start()
        .await;
    let resp = rig.get("/v1/65536").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-big"].len(), 65536 - 47);
    let resp = rig.get("/v1/65537").await;
    assert_eq!(resp.status(), 502);
    let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("\"code\":\"bad_upstream_response\""),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Listeners, connections, shutdown

#[tokio::test]
async fn unix_socket_listener_has_mode_0660_and_serves() {
    let rig = Rig::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let proxy = Proxy::new(&rig.settings, rig.tokens.clone()).unwrap();
    let listeners = Proxy::bind(&[ListenAddr::Unix(path.clone())])
        .await
        .unwrap();
    assert_eq!(
        listeners[0].local_addr().unwrap(),
        ListenAddr::Unix(path.clone())
    );
    assert_eq!(mode_of(&path), 0o660);
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
    let resp = send_on(UnixStream::connect(&path).await.unwrap(), r).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(last(&rig).path, "/base/v1/models");
    shutdown.cancel();
    within(served).await.unwrap();
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[tokio::test]
async fn upstream_connections_are_reused_once_a_response_was_read_to_its_end() {
    let rig = Rig::start().await;
    // Each request on a client connection of its own, one after the other.
    for i in 0..10 {
        let (status, _, _) = json_of(rig.get("/v1/models").await).await;
        assert_eq!(status, 200, "request {i}");
    }
    assert_eq!(rig.up.request_count(), 10);
    assert_eq!(
        rig.up.connections(),
        1,
        "one upstream connection served them all"
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let rig = Rig::with(|s| s.max_connections = 1).await;
    let get_on = |from: &str| {
        format!(
            "GET /v1/models?from={from} HTTP/1.1\r\nHost: {}\r\n\r\n",
            rig.host()
        )
    };
    let mut a = TcpStream::connect(rig.addr).await.unwrap();
    a.write_all(get_on("a").as_bytes()).await.unwrap();
    assert_eq!(status_of(&within(read_response(&mut a)).await), 200);
    // B's connect completes in the kernel's backlog, but the proxy does not take it while A
    // holds the only slot, so its request is not forwarded...
    let mut b = TcpStream::connect(rig.addr).await.unwrap();
    b.write_all(get_on("b").as_bytes()).await.unwrap();
    // ...even while A is served again.
    a.write_all(get_on("a").as_bytes()).await.unwrap();
    assert_eq!(status_of(&within(read_response(&mut a)).await), 200);
    assert_eq!(rig.up.request_count(), 2);
    assert_eq!(rig.stat(&["connections"]), 1);
    // A goes away: B is taken and served.
    drop(a);
    let text = within(read_response(&mut b)).await;
    assert_eq!(status_of(&text), 200, "{text}");
    assert_eq!(last(&rig).path, "/base/v1/models?from=b");
    assert_eq!(rig.up.request_count(), 3);
}

#[tokio::test]
async fn a_request_head_not_sent_within_header_read_timeout_closes_the_connection() {
    let rig = Rig::with(|s| s.header_read_timeout = Duration::from_millis(50)).await;
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    s.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n", rig.host()).as_bytes())
        .await
        .unwrap();
    // The rest of the head never comes.
    assert!(closed(&mut s).await);
    assert_eq!(rig.up.request_count(), 0);
}

/// Before hyper's own head-read timeout can start, the first bytes must tell HTTP/1 from h2
/// prior knowledge: a client that sends nothing, or the start of an h2 preface and no more, is
/// closed after `header_read_timeout` too, and does not hold a connection slot for good.
#[tokio::test]
async fn a_connection_that_sends_nothing_or_half_a_preface_is_closed_after_header_read_timeout() {
    let rig = Rig::with(|s| s.header_read_timeout = Duration::from_millis(100)).await;
    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut s = TcpStream::connect(rig.addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        assert!(closed(&mut s).await, "{:?}", String::from_utf8_lossy(sent));
    }
    // A whole preface is h2: hyper's from there (its SETTINGS come back at once).
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 9];
    within(s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(buf[3], 0x4, "a SETTINGS frame");
    assert_eq!(rig.up.request_count(), 0);
}

/// The connection's timer serves the head-read and the upstream timeouts in turn: after a
/// request that waited on its upstream past the head-read timeout (the timer then moved to the
/// 10-minute upstream deadline), the next head is still timed by the head-read timeout.
#[tokio::test]
async fn the_next_head_on_a_kept_alive_connection_is_timed_after_a_slow_upstream() {
    let rig = Rig::with(|s| s.header_read_timeout = Duration::from_millis(100)).await;
    rig.up
        .fail_next(1, UpstreamFault::SlowHeaders(Duration::from_millis(300)));
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    let head = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n", rig.host());
    s.write_all(format!("{head}\r\n").as_bytes()).await.unwrap();
    let text = within(read_response(&mut s)).await;
    assert_eq!(status_of(&text), 200, "{text}");
    // Half a head, and never the rest.
    s.write_all(head.as_bytes()).await.unwrap();
    assert!(closed(&mut s).await);
    assert_eq!(rig.up.request_count(), 1);
}

#[tokio::test]
async fn a_request_body_silent_past_idle_timeout_is_answered_408() {
    let rig = Rig::with(|s| s.idle_timeout = Duration::from_millis(50)).await;
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\r\nabc",
        rig.host()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The other 7 bytes never come.
    let text = within(read_response(&mut s)).await;
    assert_eq!(status_of(&text), 408, "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    let said = "\"the request body could not be read: no data for longer than proxy.idle_timeout\"";
    assert!(text.contains(said), "{text}");
    // A chunked body is told the same, in the same words.
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        rig.host()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let text = within(read_response(&mut s)).await;
    assert_eq!(status_of(&text), 408, "{text}");
    assert!(text.contains(said), "{text}");
    assert_eq!(rig.stat(&["upstream_errors"]), 0);
}

/// A malformed chunked body is a 400 that says what was wrong, in hyper's words for it only.
#[tokio::test]
async fn a_malformed_chunked_body_is_answered_400_saying_what_was_wrong() {
    let rig = Rig::start().await;
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        rig.host()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let text = within(read_response(&mut s)).await;
    assert_eq!(status_of(&text), 400, "{text}");
    assert!(
        text.contains("\"the request body could not be read: Invalid chunk size line"),
        "{text}"
    );
    assert_eq!(rig.up.request_count(), 0);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_open_streams_finish() {
    let mut rig = Rig::start().await;
    rig.up
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let resp = rig.send(stream_request(&rig)).await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"\n\n").await;
    let served = rig.shut_down();
    // Once the listener is closed, new connections are refused.
    let addr = rig.addr;
    within(async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!served.is_finished(), "serve waits for the open stream");
    rig.up.resume_stream();
    read_until(&mut body, &mut seen, b"data: [DONE]\n\n").await;
    assert!(
        within(body.frame()).await.is_none(),
        "the stream ended cleanly"
    );
    within(served).await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_idle_kept_alive_connections_without_waiting_for_the_grace() {
    // A grace far beyond the test's deadline: only a prompt close lets `serve` return in time.
    let mut rig = Rig::with(|s| s.shutdown_grace = Duration::from_secs(3600)).await;
    let (out, mut stream) = rig
        .probe_on(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    assert_eq!(out.status, 200, "{}", out.text);
    // The connection is now idle and kept alive.
    within(rig.shut_down()).await.unwrap();
    assert!(closed(&mut stream).await);
}

#[tokio::test]
async fn shutdown_closes_connections_that_sent_nothing_yet_without_waiting_for_the_grace() {
    // Neither the grace nor the head-read timeout ends these connections within the test.
    let mut rig = Rig::with(|s| {
        s.shutdown_grace = Duration::from_secs(3600);
        s.header_read_timeout = Duration::from_secs(3600);
    })
    .await;
    let mut silent = TcpStream::connect(rig.addr).await.unwrap();
    let mut half = TcpStream::connect(rig.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    eventually(HANG, "both connections to be taken", || {
        rig.stat(&["connections"]) == 2
    })
    .await;
    within(rig.shut_down()).await.unwrap();
    assert!(closed(&mut silent).await);
    assert!(closed(&mut half).await);
}

#[tokio::test]
async fn shutdown_cuts_streams_still_open_after_the_grace() {
    let mut rig = Rig::with(|s| s.shutdown_grace = Duration::from_millis(50)).await;
    rig.up
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let resp = rig.send(stream_request(&rig)).await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"\n\n").await;
    within(rig.shut_down()).await.unwrap();
    let end = within(body.frame()).await;
    assert!(matches!(end, Some(Err(_)) | None), "{end:?}");
    assert_eq!(events(&seen), 1, "{}", String::from_utf8_lossy(&seen));
}

// ---------------------------------------------------------------------------------------------
// Counters, metrics, reload, the log line

#[tokio::test]
async fn stats_count_requests_by_status_class() {
    let rig = Rig::start().await;
    let _ = json_of(rig.get("/v1/models").await).await;
    let _ = json_of(rig.get("/../x").await).await;
    let resp = get_with(&rig, "/v1/models", &[("origin", "https://evil.example")]).await;
    let _ = json_of(resp).await;
    let stats = rig.proxy.stats();
    assert_eq!(stats["requests_total"], 3, "{stats}");
    assert_eq!(stats["responses"]["2xx"], 1, "{stats}");
    assert_eq!(stats["responses"]["4xx"], 2, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["replays"], 0, "{stats}");
    assert_eq!(stats["upstream_errors"], 0, "{stats}");
    let upstream = rig.settings.upstream.as_ref().unwrap().to_string();
    assert_eq!(stats["upstream"], upstream);
    assert!(!stats.to_string().contains("Bearer"));
}

#[tokio::test]
async fn proxy_without_upstream_is_a_setup_error() {
    let rig = Rig::start().await;
    let mut settings = rig.settings.clone();
    settings.upstream = None;
    let e = Proxy::new(&settings, rig.tokens.clone()).unwrap_err();
    assert!(matches!(e, SetupError::NoUpstream));
    assert!(e.to_string().contains("proxy.upstream"));
    settings.upstream = rig.settings.upstream.clone();
    settings.session_id = Some("has space".into());
    assert!(matches!(
        Proxy::new(&settings, rig.tokens.clone()).unwrap_err(),
        SetupError::SessionId(_)
    ));
}

#[tokio::test]
async fn replace_with_sends_new_requests_to_the_new_upstream_and_keeps_the_totals() {
    let rig = Rig::start().await;
    let (new_up, _stop) = Upstream::start(UpstreamOptions::for_idp(&rig.h.idp, AUDIENCE))
        .await
        .unwrap();
    assert_eq!(rig.get("/v1/models").await.status(), 200);
    let mut settings = rig.settings.clone();
    settings.upstream = Some(format!("{}/other", new_up.base_url()).parse().unwrap());
    let next = Proxy::new(&settings, rig.tokens.clone()).unwrap();
    rig.proxy.replace_with(&next);
    assert_eq!(rig.get("/v1/models").await.status(), 200);
    assert_eq!(new_up.requests()[0].path, "/other/v1/models");
    assert_eq!((rig.up.request_count(), new_up.request_count()), (1, 1));
    assert_eq!(next.stats()["requests_total"], 2, "{}", next.stats());
}

#[tokio::test]
async fn attached_metrics_count_responses_upstream_errors_and_replays() {
    let rig = Rig::start().await;
    rig.up.fail_next(1, UpstreamFault::Unauthorized);
    let metrics = std::sync::Arc::new(Metrics::new());
    rig.proxy.attach_metrics(metrics.clone());
    let (status, _, _) = json_of(rig.get("/v1/models").await).await;
    assert_eq!(status, 200);
    let _ = json_of(rig.get("/../x").await).await;
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
    let rig = Rig::start().await;
    rig.up
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let metrics = std::sync::Arc::new(Metrics::new());
    rig.proxy.attach_metrics(metrics.clone());
    let resp = rig.send(stream_request(&rig)).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    read_until(&mut body, &mut seen, b"\n\n").await;
    assert_eq!(metrics.in_flight_streams.get(), 1);
    rig.up.resume_stream();
    read_until(&mut body, &mut seen, b"data: [DONE]\n\n").await;
    assert!(within(body.frame()).await.is_none());
    eventually(HANG, "the streams gauge to drop", || {
        metrics.in_flight_streams.get() == 0
    })
    .await;
}

#[tokio::test]
async fn one_debug_line_per_request_without_credentials_or_query() {
    let rig = Rig::start().await;
    let session = format!("job-{}", random(12));
    let (client_key, query_secret) = (
        format!("sk-client-{}", random(16)),
        format!("query-{}", random(16)),
    );
    rig.h.remember(&client_key);
    rig.h.remember(&query_secret);
    let path = format!("/s/{session}/v1/chat/completions");
    let request = rig
        .request("POST", &format!("{path}?api_key={query_secret}"))
        .header("authorization", format!("Bearer {client_key}"))
        .header("content-type", "application/json")
        .body(Full::new(chat("log me", false)))
        .unwrap();
    let (status, _, _) = json_of(rig.send(request).await).await;
    assert_eq!(status, 200);
    let ours = || -> Vec<String> {
        logs()
            .lines()
            .filter(|l| l.contains("proxied request") && l.contains(&session))
            .map(str::to_string)
            .collect()
    };
    eventually(HANG, "the request's log line", || !ours().is_empty()).await;
    let lines = ours();
    assert_eq!(lines.len(), 1, "{lines:?}");
    for field in [
        "method=POST".to_string(),
        format!("path=\"{path}\""),
        "status=200".to_string(),
        format!("session=\"{session}\""),
        "bytes=".to_string(),
    ] {
        assert!(lines[0].contains(&field), "{field} missing: {}", lines[0]);
    }
    // The client's key, the query, the agent's token and the client secret: none is logged.
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// A TLS upstream, HTTP/2 or HTTP/1.1 by ALPN

#[tokio::test]
async fn a_tls_upstream_is_spoken_to_in_http2_or_http1_as_alpn_decides_over_one_connection() {
    for (alpn, version) in [
        (&[b"h2".as_slice(), b"http/1.1"][..], "HTTP/2.0"),
        (&[b"http/1.1".as_slice()][..], "HTTP/1.1"),
    ] {
        let rig = Rig::builder().tls(alpn).start().await;
        // Sequential requests, then concurrent ones.
        for _ in 0..3 {
            let (status, _, v) = json_of(rig.get("/v1/models").await).await;
            assert_eq!(status, 200, "{version}: {v}");
        }
        for r in rig.up.requests() {
            assert_eq!(r.version, version);
            assert_eq!(path_of(&r), "/base/v1/models");
            assert!(rig.carries_only_the_agents_bearer(&r), "{r:?}");
            // h2 names the authority in `:authority` only; HTTP/1.1 in `Host` (never the
            // client's).
            let host = (version == "HTTP/1.1").then(|| rig.up_authority());
            assert_eq!(r.header("host").map(str::to_string), host, "{version}");
        }
        assert_eq!(rig.up.connections(), 1, "{version}: one connection");
        let answers = futures_util::future::join_all((0..8).map(|_| rig.get("/v1/models"))).await;
        for r in answers {
            assert_eq!(r.status(), 200, "{version}");
            let _ = json_of(r).await;
        }
        if version == "HTTP/2.0" {
            assert_eq!(rig.up.connections(), 1, "h2 multiplexes on one connection");
        }
    }
}

#[tokio::test]
async fn a_tls_upstream_with_a_certificate_the_agent_does_not_trust_is_a_502() {
    // No `ca_file`: the test CA is not among the system's roots.
    let rig = Rig::builder()
        .tls(&[b"h2", b"http/1.1"])
        .proxy(|s| s.ca_file = None)
        .start()
        .await;
    let v = assert_agent_error(rig.get("/v1/models").await, 502, "upstream_unreachable").await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(rig.up.request_count(), 0);
}
