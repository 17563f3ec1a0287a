//! The real binary when things around it fail (SPEC §5): a valid cached token keeps serving one-shot
//! `token`, `status`, `exec` and a daemon (re)started while the IdP is down; `token` during a daemon
//! restart falls back to the disk cache, but not past a daemon that answered with a refusal; a cache
//! lock held by a stopped process never holds a one-shot call without bound; a cache that cannot be
//! written shows in `status` and `doctor`.

use std::future::Future;
use std::os::unix::fs::DirBuilderExt;
use std::process::Stdio;
use std::time::Duration;

use devkit::upstream::{Upstream, UpstreamOptions};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::util::{AUDIENCE, Harness, Start, eventually, exits_cleanly, output, signal};

/// `f`, which must not wait without end (a child still running at the bound is killed on drop).
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within 60 s"))
}

/// A token granted by a one-shot call while the IdP is up, and so cached on disk.
async fn cached_token(h: &Harness) -> String {
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.stdout.trim().to_string()
}

/// The running daemon's proxy base URL, from `behest-agent env`.
async fn daemon_base(h: &Harness) -> String {
    let socket = h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the daemon's socket", || {
        socket.exists()
    })
    .await;
    let out = output(h.agent(&["env", "--format", "dotenv"], &[])).await;
    out.stdout
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("OPENAI_BASE_URL=")
        .to_string()
}

/// The control socket's directory, as a daemon makes it.
fn run_dir(h: &Harness) -> std::path::PathBuf {
    let dir = h.path("run");
    std::fs::DirBuilder::new().mode(0o750).create(&dir).unwrap();
    dir.join("agent.sock")
}

// ---- the IdP down

#[tokio::test]
async fn one_shot_token_and_status_serve_the_cached_token_while_the_idp_is_down() {
    let h = Harness::start().await;
    let token = cached_token(&h).await;
    h.stop_idp().await;
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), token);
    let o = output(h.agent(&["status", "--json"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["token"]["state"], "valid", "{v}");
    assert!(
        h.path("state/token.json").exists(),
        "the cached token is kept"
    );
}

/// `doctor` during the outage: the IdP checks fail, but the cached token passes its checks against
/// the key stored with it, as `token` serves it, and the upstream is tried with it.
#[tokio::test]
async fn doctor_checks_the_cached_token_without_the_idp_during_an_outage() {
    let h = Harness::start().await;
    let (upstream, _stop) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let token = cached_token(&h).await;
    h.stop_idp().await;
    let o = output(h.agent_with_upstream(&upstream.base_url(), &["doctor"], &[])).await;
    assert_eq!(o.code, 1, "the IdP is down:\n{}", o.stdout);
    for line in [
        "✗ JWKS",
        "✓ token: a valid one from the disk cache",
        "✓ signature: verified against the key stored with the cached token",
        &format!("✓ uid: {}", h.client_id),
        "✓ upstream",
    ] {
        assert!(
            o.stdout.lines().any(|l| l.starts_with(line)),
            "no line starting with {line:?} in:\n{}",
            o.stdout
        );
    }
    assert!(!o.stdout.contains(&token));
}

#[tokio::test]
async fn a_one_shot_token_served_from_the_cache_asks_the_idp_nothing() {
    let h = Harness::start().await;
    let token = cached_token(&h).await;
    let (grants, jwks) = (h.idp.token_requests(), h.idp.jwks_requests());
    for _ in 0..3 {
        assert_eq!(cached_token(&h).await, token);
    }
    assert_eq!(h.idp.token_requests(), grants);
    assert_eq!(
        h.idp.jwks_requests(),
        jwks,
        "the JWKS is not fetched again to check a cached token"
    );
}

#[tokio::test]
async fn a_daemon_started_while_the_idp_is_down_serves_the_cached_token() {
    let h = Harness::start().await;
    let (upstream, _stop) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let token = cached_token(&h).await;
    h.stop_idp().await;
    let mut child = h
        .agent_with_upstream(
            &upstream.base_url(),
            &["run"],
            &[("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0")],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = daemon_base(&h).await;
    let r = crate::proxy::http()
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let o = output(h.agent(&["status", "--json"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["token"]["state"], "valid", "{v}");
    assert_eq!(v["token"]["ready"], true, "{v}");
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), token);
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn exec_without_a_daemon_serves_the_cached_token_while_the_idp_is_down() {
    let h = Harness::start().await;
    let (upstream, _stop) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    cached_token(&h).await;
    h.stop_idp().await;
    let script = r#"fetch(process.env.OPENAI_BASE_URL + "/models").then(r => console.log("status " + r.status))"#;
    let o = output(h.agent_with_upstream(
        &upstream.base_url(),
        &["exec", "--", "node", "-e", script],
        &[],
    ))
    .await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("status 200"),
        "{}\n{}",
        o.stdout,
        o.stderr
    );
}

// ---- a daemon stopping or restarting

#[tokio::test]
async fn token_falls_back_to_the_cache_when_the_daemon_goes_away_without_answering() {
    let h = Harness::start().await;
    let token = cached_token(&h).await;
    // No grant is possible: the answer can only come from the disk cache.
    h.stop_idp().await;
    // A daemon on its way out: its socket takes the connection, then closes it unanswered.
    let listener = tokio::net::UnixListener::bind(run_dir(&h)).unwrap();
    let closer = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), token);
    closer.abort();
}

#[tokio::test]
async fn token_does_not_go_around_a_daemon_that_answered_with_a_refusal() {
    let h = Harness::start().await;
    let listener = tokio::net::UnixListener::bind(run_dir(&h)).unwrap();
    let refuser = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = crate::util::read_head(&mut conn).await;
            let body = r#"{"error":{"code":"forbidden","message":"refused-by-the-daemon"}}"#;
            let response = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        }
    });
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    assert!(o.stderr.contains("answered HTTP 403"), "{}", o.stderr);
    assert_eq!(
        h.idp.token_requests(),
        0,
        "no grant behind the daemon's back"
    );
    refuser.abort();
}

// ---- the cache lock

#[tokio::test]
async fn a_one_shot_token_does_not_wait_without_end_on_a_lock_a_stopped_process_holds() {
    let h = Harness::start().await;
    let token = cached_token(&h).await;
    // Held the way a stopped `behest-agent token` holds it.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(h.path("state/token.json.lock"))
        .unwrap();
    lock.lock().unwrap();
    // A valid cached token needs no lock.
    let o = bounded(
        "token with a cached token",
        output(h.agent(&["token"], &[])),
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), token);
    // Nothing cached: the wait is bounded by auth.timeout, then the call grants alone and says why.
    std::fs::remove_file(h.path("state/token.json")).unwrap();
    let o = bounded(
        "token with nothing cached",
        output(h.agent(&["token"], &[("BEHEST_AGENT__AUTH__TIMEOUT", "1s")])),
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.trim().split('.').count() == 3);
    assert!(o.stderr.contains("token.json.lock"), "{}", o.stderr);
    assert_eq!(h.idp.grants(), 2);
    drop(lock);
}

// ---- a cache that cannot be written

#[tokio::test]
async fn a_cache_that_cannot_be_written_shows_in_status_and_doctor() {
    let h = Harness::start().await;
    // A directory where the token file should be: no write succeeds, even as root.
    std::fs::create_dir_all(h.path("state/token.json")).unwrap();
    let mut child = h
        .agent(&["run"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the daemon's socket", || {
        socket.exists()
    })
    .await;
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = output(h.agent(&["status", "--json"], &[])).await;
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    let problem = v["token"]["cache_error"].as_str().unwrap_or_default();
    assert!(problem.contains("token.json"), "{v}");
    let o = output(h.agent(&["status"], &[])).await;
    assert!(o.stdout.contains("cache:"), "{}", o.stdout);
    let o = output(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stdout.contains("✗ token cache"), "{}", o.stdout);
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}
