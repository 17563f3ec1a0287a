//! Request smuggling and open-proxy probes against a running proxy, over raw TCP, through the
//! public API only (the rig of [`crate::rig`]: `Proxy` + `TokenSource` + the embedded IdP, in front
//! of devkit's echo upstream, which records every request it parsed, so a probe can prove what
//! reached it). The rig's evil listener stands for "another host": probes name it (absolute-form
//! targets, `Host`, userinfo, `//host` paths, `CONNECT`), and it must never see a connection.
//! Every probe is either refused (a 4xx from the agent, or the connection closed without an
//! answer) or normalised (forwarded to the configured upstream under its base path with the
//! agent's bearer), never forwarded anywhere else.

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::rig::{Rig, sha256_hex, within};

fn head(rig: &Rig, line: &str, fields: &str) -> String {
    format!("{line}\r\nHost: {}\r\n{fields}\r\n", rig.host())
}

// ---------------------------------------------------------------------------------------------
// Framing: Content-Length and Transfer-Encoding

/// A request line an upstream would take as a second request if the body framing were read two
/// ways; it must never arrive as one.
const SMUGGLED: &str = "GET /base/smuggled HTTP/1.1\r\nHost: evil.example\r\n\r\n";

fn assert_nothing_smuggled(rig: &Rig) {
    for r in rig.up.requests() {
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
        assert!(
            out.forwarded || out.refused() && out.status == 400,
            "{fields:?}: {}",
            out.text
        );
        assert!(out.closed, "{fields:?}: the connection stays open");
    }
    for r in rig.up.requests() {
        assert!(
            r.header_values("content-length").is_empty()
                || r.header_values("transfer-encoding").is_empty(),
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
        "Content-Length : 3\r\n",
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
    assert!(out.forwarded, "{}", out.text);
    let seen = rig.up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_values("content-length"), ["3"]);
    assert_eq!(seen[0].body_sha256, sha256_hex(b"abc"));
    assert_nothing_smuggled(&rig);
    rig.finish().await;
}

#[tokio::test]
async fn transfer_encodings_other_than_a_final_chunked_are_refused() {
    let rig = Rig::start().await;
    for fields in [
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
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
        if fields.starts_with("Transfer_Encoding") {
            // Not a framing field at all: a Content-Length body of 5 bytes, then a request for
            // another host, refused. Only the first may reach the upstream.
            let out = rig.probe(req.as_bytes()).await;
            assert!(out.forwarded, "{fields:?}: {}", out.text);
            continue;
        }
        let out = rig.probe_closing(req.as_bytes()).await;
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
    assert!(rig.up.request_count() <= 1);
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
    assert_eq!(text.matches("HTTP/1.1 ").count(), 3, "{text}");
    let seen = rig.up.requests();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/base/v1/a", "/base/v1/b", "/base/v1/c"]);
    assert_eq!(seen[0].body_sha256, sha256_hex(SMUGGLED.as_bytes()));
    assert_eq!(seen[1].body_sha256, sha256_hex(SMUGGLED.as_bytes()));
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
    assert!(out.forwarded || out.refused(), "{}", out.text);
    for r in rig.up.requests() {
        let fields = r.headers.iter().chain(&r.trailers);
        assert!(
            fields
                .clone()
                .all(|(name, _)| name != "proxy-authorization"),
            "{r:?}"
        );
        assert!(
            r.trailers.iter().all(|(name, _)| name != "authorization"),
            "{r:?}"
        );
        for (_, value) in fields {
            assert!(!value.contains("sk-trailer-secret"), "{r:?}");
            assert!(!value.contains("dHJhaWxlcg=="), "{r:?}");
        }
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Where the request goes: absolute-form, userinfo, `@`, `%2F`, dot segments, `//host`, Host

#[tokio::test]
async fn absolute_form_with_userinfo_never_reaches_another_host() {
    let rig = Rig::start().await;
    let (up, evil) = (rig.up_addr(), rig.evil.addr);
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
        // The agent's 403, or hyper's 400 for an authority it cannot parse.
        assert!(matches!(out.status, 400 | 403), "{target}: {}", out.text);
        if out.status == 403 {
            assert!(
                out.text.contains("\"code\":\"forbidden_host\""),
                "{target}: {}",
                out.text
            );
        }
    }
    // Userinfo on the upstream's own authority: forwarded without it, to the configured host.
    for target in [
        format!("http://user@{up}/base/v1/models"),
        format!("http://{evil}@{up}/base/v1/models"),
    ] {
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert!(out.refused() || out.status == 200, "{target}: {}", out.text);
        if out.forwarded {
            let last = rig.up.requests().pop().unwrap();
            assert_eq!(last.path, "/base/v1/models", "{target}");
            let fields = last.headers.iter().map(|(_, v)| v);
            assert!(
                fields.chain([&last.path]).all(|v| !v.contains('@')),
                "{last:?}"
            );
        }
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

#[tokio::test]
async fn an_authority_form_target_outside_connect_is_a_bad_request_that_says_so() {
    let rig = Rig::start().await;
    for authority in [rig.evil.addr.to_string(), rig.up_addr().to_string()] {
        let req = head(&rig, &format!("GET {authority} HTTP/1.1"), "");
        let out = rig.assert_refused(req.as_bytes()).await;
        assert_eq!(out.status, 400, "{authority}: {}", out.text);
        assert!(out.text.contains("authority-form"), "{}", out.text);
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
        "/v1/a%2Fb".to_string(),
        "/v1/a%2f..%2f..%2fsecret".to_string(),
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
        let before = rig.up.request_count();
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert!(out.forwarded, "{target}: {}", out.text);
        assert_eq!(rig.up.request_count(), before + 1, "{target}");
        assert_eq!(rig.up.requests().pop().unwrap().path, path, "{target}");
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
        "/../secret",
        "/v1/../../secret",
        "/s/job/../../secret",
        "/v1/..;/secret",
        // A dot segment where the session goes is not a session (it was forwarded as the path).
        "/s/../v1/models",
        "/s/%2e/v1/models",
    ] {
        let req = head(&rig, &format!("GET {target} HTTP/1.1"), "");
        let out = rig.assert_refused(req.as_bytes()).await;
        assert_eq!(out.status, 400, "{target}: {}", out.text);
        assert!(
            out.text.contains("\"code\":\"bad_request\""),
            "{target}: {}",
            out.text
        );
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
        ("/v1/files/../models/./x", "/base/v1/models/x"),
    ] {
        let before = rig.up.request_count();
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert!(out.forwarded, "{target}: {}", out.text);
        assert_eq!(rig.up.request_count(), before + 1, "{target}");
        assert_eq!(rig.up.requests().pop().unwrap().path, path, "{target}");
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
        let req = head(
            &rig,
            &format!("GET {target} HTTP/1.1"),
            "Connection: close\r\n",
        );
        let out = rig.probe(req.as_bytes()).await;
        assert!(out.forwarded || out.refused(), "{target}: {}", out.text);
        if out.forwarded {
            let last = rig.up.requests().pop().unwrap();
            assert!(last.path.starts_with("/base//"), "{target}: {last:?}");
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
    let before = rig.up.request_count();
    let req = format!("GET /v1/models HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n");
    let out = rig.probe(req.as_bytes()).await;
    assert_eq!(out.status, 200, "{}", out.text);
    assert_eq!(rig.up.request_count(), before + 1);
    // The loopback names, with or without a port, are served.
    for host in [
        "localhost".to_string(),
        format!("localhost:{}", rig.addr.port()),
        "127.0.0.1".to_string(),
        "[::1]:8711".to_string(),
    ] {
        let req = format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let out = rig.probe(req.as_bytes()).await;
        assert_eq!(out.status, 200, "Host {host:?}: {}", out.text);
    }
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
        rig.up_authority(),
        format!("http://{evil}/"),
    ] {
        // What a tunnel would carry follows the CONNECT head at once.
        let req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET /tunnelled HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        );
        let out = rig.assert_refused(req.as_bytes()).await;
        assert_eq!(out.status, 405, "CONNECT {target}: {}", out.text);
        assert!(
            out.text.contains("\"code\":\"method_not_allowed\""),
            "CONNECT {target}: {}",
            out.text
        );
    }
    for r in rig.up.requests() {
        assert!(!r.path.contains("tunnelled"), "{r:?}");
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

/// Only the methods an HTTP API uses are forwarded; the 405 for any other lists them in `Allow`.
#[tokio::test]
async fn methods_no_api_uses_are_refused_with_allow() {
    let rig = Rig::start().await;
    for method in ["TRACE", "TRACK", "PROPFIND", "get", "FOO"] {
        let req = head(&rig, &format!("{method} /v1/models HTTP/1.1"), "");
        let out = rig.probe(req.as_bytes()).await;
        assert_eq!(out.status, 405, "{method}: {}", out.text);
        assert!(
            out.text.contains("\"code\":\"method_not_allowed\"")
                && out
                    .text
                    .contains(&format!("the method {method} is not forwarded")),
            "{method}: {}",
            out.text
        );
        assert!(
            out.text
                .to_ascii_lowercase()
                .contains("\r\nallow: get, head, post, put, patch, delete, options\r\n"),
            "{method}: {}",
            out.text
        );
    }
    assert_eq!(rig.up.request_count(), 0);
    // (HEAD too, but its answer has a length and no body, which `probe` would wait for.)
    for method in ["GET", "DELETE", "OPTIONS", "PUT", "PATCH"] {
        let req = head(&rig, &format!("{method} /v1/models HTTP/1.1"), "");
        let out = rig.probe(req.as_bytes()).await;
        assert_ne!(out.status, 405, "{method}: {}", out.text);
    }
    rig.finish().await;
}

#[tokio::test]
async fn upgrade_requests_are_forwarded_without_upgrading() {
    let rig = Rig::start().await;
    for fields in [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    ] {
        let req = head(&rig, "GET /v1/models HTTP/1.1", fields)
            + "GET /after-upgrade HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        let out = rig.probe(req.as_bytes()).await;
        assert!(
            out.status == 200 || out.refused(),
            "{fields:?}: {}",
            out.text
        );
        if out.forwarded {
            let last = rig.up.requests().pop().unwrap();
            assert!(last.header_values("upgrade").is_empty(), "{last:?}");
            assert!(
                last.header_values("connection")
                    .iter()
                    .all(|c| !c.to_ascii_lowercase().contains("upgrade"))
            );
        }
    }
    // The bytes after the head are never tunnelled: at most a request hyper parsed, refused for
    // its foreign Host.
    for r in rig.up.requests() {
        assert!(!r.path.contains("after-upgrade"), "{r:?}");
    }
    rig.assert_never_elsewhere();
    rig.finish().await;
}

/// The client's `Upgrade` is never forwarded, so an upstream `101` answers a request that asked
/// for no upgrade: passed on, it would leave the client on a connection that speaks something
/// else, and the request pipelined behind it would be lost.
#[tokio::test]
async fn an_upstream_101_to_a_request_that_asked_for_none_is_a_502_and_the_connection_goes_on() {
    let rig = Rig::start().await;
    rig.up
        .fail_next(1, devkit::upstream::UpstreamFault::SwitchProtocols);
    let req = head(&rig, "GET /v1/models HTTP/1.1", "")
        + &head(
            &rig,
            "GET /v1/models?second HTTP/1.1",
            "Connection: close\r\n",
        );
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    within(s.read_to_end(&mut all)).await.unwrap();
    let text = String::from_utf8_lossy(&all);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["502", "200"], "{text}");
    assert!(
        text.contains("\"code\":\"bad_upstream_response\""),
        "{text}"
    );
    assert!(
        text.contains("101 Switching Protocols"),
        "the message says why: {text}"
    );
    assert_eq!(rig.up.request_count(), 2);
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
    // A foreign `Host` beside a loopback `:authority` is refused too (RFC 9113 §8.3.1).
    let req = Request::builder()
        .uri(format!("http://{}/v1/models", rig.host()))
        .header("host", "evil.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(rig.up.request_count(), 1);
    rig.assert_never_elsewhere();
    rig.finish().await;
}
